//! Commands to one device: `POST /api/v1/devices/{id}/commands` (`?wait=10s` to wait for
//! its end), `GET …/commands`, `GET …/commands/{command_id}`, `DELETE …` to cancel.
//!
//! A command is JSON: its id, device, name, params, status (`queued`, `sent`, `delivered`,
//! `succeeded`, `failed`, `expired`, `cancelled`), the times of its steps (ms since the
//! epoch) and the device's `output`; see `tellus_broker::commands` for how it moves.

use std::time::Duration;

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;
use tellus_broker::devices::DeviceError;
use tellus_core::{Command, DeviceId};

use super::{page, page_limit};
use crate::{extract, ApiError, AppState};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1_000;
/// A command's timeout when the request names none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3_600);
/// The longest `?wait=`.
const MAX_WAIT: Duration = Duration::from_secs(300);

impl From<DeviceError> for ApiError {
    fn from(e: DeviceError) -> Self {
        match e {
            DeviceError::UnknownDevice(id) => ApiError::DeviceNotFound(id),
            DeviceError::Invalid(why) => ApiError::InvalidBody(why),
            DeviceError::Registry(tellus_core::RegistryError::Refused(why)) => {
                ApiError::Refused(why)
            }
            e @ (DeviceError::Registry(_) | DeviceError::Blocking) => ApiError::internal(e),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCommand {
    pub name: String,
    #[serde(default)]
    pub params: serde_json::Value,
    /// How long the command may wait for its device and its result, e.g. `"30s"`.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateQuery {
    /// Wait this long for the command to end, and answer with it as it is then.
    #[serde(default, with = "humantime_serde")]
    pub wait: Option<Duration>,
}

fn one_of(id: &str) -> Result<DeviceId, ApiError> {
    Ok(DeviceId::parse(id)?)
}

/// `POST /api/v1/devices/{id}/commands`: 202 with the command; with `?wait=`, 200 once it
/// has ended (succeeded, failed, expired or cancelled), or 202 with its status when the
/// wait runs out.
pub async fn create(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
    extract::Query(q): extract::Query<CreateQuery>,
    extract::Json(body): extract::Json<NewCommand>,
) -> Result<Response, ApiError> {
    let device = one_of(&id)?;
    let wait = match q.wait {
        Some(w) if w > MAX_WAIT => {
            return Err(ApiError::InvalidQuery(format!(
                "wait is at most {}s",
                MAX_WAIT.as_secs()
            )))
        }
        w => w,
    };
    // Watching before creating: no change between the two is missed.
    let changes = state.devices.watch();
    let timeout = body.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let command = state
        .devices
        .create(&device, &body.name, body.params, timeout)
        .await?;
    let command = match wait {
        Some(wait) => state
            .devices
            .wait(&device, &command.id, changes, wait)
            .await?
            .unwrap_or(command),
        None => command,
    };
    let status = if command.status.is_final() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(command)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub limit: Option<usize>,
    /// The `next` of the previous page: a command id.
    pub before: Option<String>,
}

#[derive(Debug, serde::Serialize)]
pub struct CommandList {
    pub commands: Vec<Command>,
    pub next: Option<String>,
}

/// `GET /api/v1/devices/{id}/commands?limit=&before=`: newest first.
pub async fn list(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<CommandList>, ApiError> {
    let device = one_of(&id)?;
    let limit = page_limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let rows = state.devices.list(&device, q.before, limit + 1).await?;
    let (commands, next) = page(rows, limit, |c| c.id.clone());
    Ok(Json(CommandList { commands, next }))
}

fn not_found(device: &DeviceId, command: &str) -> ApiError {
    ApiError::CommandNotFound(device.clone(), command.to_owned())
}

/// `GET /api/v1/devices/{id}/commands/{command_id}`.
pub async fn get_one(
    State(state): State<AppState>,
    extract::Path((id, command)): extract::Path<(String, String)>,
) -> Result<Json<Command>, ApiError> {
    let device = one_of(&id)?;
    match state.devices.get(&device, &command).await? {
        Some(c) => Ok(Json(c)),
        None => Err(not_found(&device, &command)),
    }
}

/// `DELETE /api/v1/devices/{id}/commands/{command_id}`: cancels a command that has not been
/// delivered (200 with it); 409 `refused` once it has been, or has ended.
pub async fn cancel(
    State(state): State<AppState>,
    extract::Path((id, command)): extract::Path<(String, String)>,
) -> Result<Json<Command>, ApiError> {
    let device = one_of(&id)?;
    match state.devices.cancel(&device, &command).await? {
        Some((c, true)) => Ok(Json(c)),
        Some((c, false)) => Err(ApiError::Refused(format!(
            "command {command} is {}: only a queued or sent command can be cancelled",
            c.status.as_str()
        ))),
        None => Err(not_found(&device, &command)),
    }
}
