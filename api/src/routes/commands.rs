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
use crate::{extract, openapi as doc, ApiError, AppState};

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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCommand {
    /// 1 to 128 bytes.
    #[schema(example = "reboot")]
    pub name: String,
    /// Any JSON, for the device to interpret.
    #[serde(default)]
    pub params: serde_json::Value,
    /// How long the command may wait for its device and its result, e.g. `"30s"` (default
    /// 1 hour, at most 30 days).
    #[serde(default, with = "humantime_serde")]
    #[schema(value_type = Option<String>, example = "30s")]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CreateQuery {
    /// Wait this long (at most 5 minutes, e.g. `10s`) for the command to end, and answer
    /// with it as it is then.
    #[serde(default, with = "humantime_serde")]
    #[param(value_type = Option<String>, example = "1s")]
    pub wait: Option<Duration>,
}

fn one_of(id: &str) -> Result<DeviceId, ApiError> {
    Ok(DeviceId::parse(id)?)
}

/// Send a device a command.
///
/// 202 with the command; with `?wait=`, 200 once it has ended (succeeded, failed, expired or
/// cancelled), or 202 with its status when the wait runs out.
#[utoipa::path(
    post,
    path = "/devices/{id}/commands",
    operation_id = "create_command",
    tag = "commands",
    params(("id" = DeviceId, Path, description = "The device's id"), CreateQuery),
    request_body = NewCommand,
    responses(
        (status = 200, description = "The command, ended within the wait", body = Command),
        (status = 202, description = "The command, queued or on its way", body = Command),
        (status = 400, description = "Not a valid device id (`invalid_device_id`), wait (`invalid_query`) or command (`invalid_body`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such device (`device_not_found`)", body = doc::ErrorBody),
        (status = 409, description = "The registry refused it (`refused`)", body = doc::ErrorBody),
        (status = 413, response = doc::PayloadTooLarge),
        (status = 415, response = doc::UnsupportedMediaType),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["operator"]))
)]
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Commands per page (default 100; more than 1000 is taken as 1000).
    #[param(minimum = 1)]
    #[serde(default, deserialize_with = "extract::saturating::usize")]
    pub limit: Option<usize>,
    /// The `next` of the previous page: a command id.
    pub before: Option<String>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct CommandList {
    pub commands: Vec<Command>,
    pub next: Option<String>,
}

/// List a device's commands.
///
/// Newest first, paged by `before`.
#[utoipa::path(
    get,
    path = "/devices/{id}/commands",
    operation_id = "list_commands",
    tag = "commands",
    params(("id" = DeviceId, Path, description = "The device's id"), ListQuery),
    responses(
        (status = 200, description = "A page of commands", body = CommandList),
        (status = 400, description = "Not a valid device id (`invalid_device_id`) or parameter (`invalid_query`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
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

/// Show a command.
#[utoipa::path(
    get,
    path = "/devices/{id}/commands/{command}",
    operation_id = "get_command",
    tag = "commands",
    params(
        ("id" = DeviceId, Path, description = "The device's id"),
        ("command" = String, Path, description = "The command's id (`c-` and 20 hex digits)"),
    ),
    responses(
        (status = 200, description = "The command", body = Command),
        (status = 400, description = "Not a valid device id (`invalid_device_id`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "The device has no such command (`command_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
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

/// Cancel a command.
///
/// Only one that has not been delivered (200 with it); 409 `refused` once it has been, or
/// has ended.
#[utoipa::path(
    delete,
    path = "/devices/{id}/commands/{command}",
    operation_id = "cancel_command",
    tag = "commands",
    params(
        ("id" = DeviceId, Path, description = "The device's id"),
        ("command" = String, Path, description = "The command's id (`c-` and 20 hex digits)"),
    ),
    responses(
        (status = 200, description = "The command, cancelled", body = Command),
        (status = 400, description = "Not a valid device id (`invalid_device_id`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "The device has no such command (`command_not_found`)", body = doc::ErrorBody),
        (status = 409, description = "Delivered or ended already (`refused`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["operator"]))
)]
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
