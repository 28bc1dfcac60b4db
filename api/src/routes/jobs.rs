//! Fleet commands: `POST /api/v1/commands` starts a job (one command to every selected
//! device, at a rate and a concurrency), `GET /api/v1/commands` lists jobs,
//! `GET /api/v1/commands/{job}` shows one with its per-status counts,
//! `GET /api/v1/commands/{job}/devices?status=` lists its devices and their commands, and
//! `POST /api/v1/commands/{job}/abort` stops it (nothing more is sent; commands not yet
//! delivered are cancelled).

use std::{collections::BTreeMap, time::Duration};

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};
use tellus_broker::devices::jobs::{NewJob, Selector};
use tellus_core::{
    command::{Job, JobStatus},
    CommandStatus, DeviceId, TimestampMs,
};

use super::{page, page_limit};
use crate::{extract, ApiError, AppState};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1_000;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3_600);
const DEFAULT_RATE: f64 = 10.0;
const DEFAULT_CONCURRENCY: u32 = 100;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectorBody {
    pub ids: Option<Vec<String>>,
    pub tags: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewJobBody {
    pub name: String,
    #[serde(default)]
    pub params: serde_json::Value,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    pub selector: SelectorBody,
    /// Commands created per second (default 10).
    pub rate: Option<f64>,
    /// Most of the job's commands not ended at once (default 100).
    pub concurrency: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct JobView {
    #[serde(flatten)]
    pub job: Job,
    /// The job's commands by status.
    pub counts: BTreeMap<CommandStatus, u64>,
    /// Devices whose command is not created yet.
    pub pending: u64,
}

async fn view(state: &AppState, job: Job) -> Result<JobView, ApiError> {
    let counts = state.devices.job_counts(&job.id).await?;
    let created: u64 = counts.values().sum();
    Ok(JobView {
        pending: job.total.saturating_sub(created),
        job,
        counts,
    })
}

/// `POST /api/v1/commands`: 202 with the job.
pub async fn create(
    State(state): State<AppState>,
    extract::Json(body): extract::Json<NewJobBody>,
) -> Result<Response, ApiError> {
    let selector = match (body.selector.ids, body.selector.tags) {
        (Some(ids), None) => Selector::Ids(
            ids.iter()
                .map(|id| DeviceId::parse(id))
                .collect::<Result<_, _>>()?,
        ),
        (None, Some(tags)) => Selector::Tags(tags.into_iter().collect()),
        _ => {
            return Err(ApiError::InvalidBody(
                "selector: give either \"ids\" or \"tags\"".into(),
            ))
        }
    };
    let job = state
        .devices
        .start_job(NewJob {
            name: body.name,
            params: body.params,
            timeout: body.timeout.unwrap_or(DEFAULT_TIMEOUT),
            selector,
            rate: body.rate.unwrap_or(DEFAULT_RATE),
            concurrency: body.concurrency.unwrap_or(DEFAULT_CONCURRENCY),
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(view(&state, job).await?)).into_response())
}

fn not_found(id: &str) -> ApiError {
    ApiError::JobNotFound(id.to_owned())
}

/// `GET /api/v1/commands/{job}`.
pub async fn get_one(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
) -> Result<Json<JobView>, ApiError> {
    match state.devices.job(&id).await? {
        Some(job) => Ok(Json(view(&state, job).await?)),
        None => Err(not_found(&id)),
    }
}

/// `POST /api/v1/commands/{job}/abort`: the job as it is after.
pub async fn abort(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
) -> Result<Json<JobView>, ApiError> {
    match state.devices.abort_job(&id).await? {
        Some(job) => Ok(Json(view(&state, job).await?)),
        None => Err(not_found(&id)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub limit: Option<usize>,
    pub before: Option<String>,
    pub status: Option<JobStatus>,
}

#[derive(Debug, Serialize)]
pub struct JobList {
    pub jobs: Vec<Job>,
    pub next: Option<String>,
}

/// `GET /api/v1/commands?status=&limit=&before=`: jobs, newest first.
pub async fn list(
    State(state): State<AppState>,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<JobList>, ApiError> {
    let limit = page_limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let rows = state.devices.jobs(q.status, q.before, limit + 1).await?;
    let (jobs, next) = page(rows, limit, |j| j.id.clone());
    Ok(Json(JobList { jobs, next }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesQuery {
    pub status: Option<CommandStatus>,
    pub limit: Option<usize>,
    /// The `next` of the previous page.
    pub after: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct JobDevice {
    pub device: DeviceId,
    pub command: String,
    pub status: CommandStatus,
    pub updated_at_ms: TimestampMs,
}

#[derive(Debug, Serialize)]
pub struct JobDevices {
    pub devices: Vec<JobDevice>,
    pub next: Option<String>,
}

/// `GET /api/v1/commands/{job}/devices?status=&limit=&after=`: the devices that have a
/// command of the job (in that status), in the order they got it.
pub async fn devices(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
    extract::Query(q): extract::Query<DevicesQuery>,
) -> Result<Json<JobDevices>, ApiError> {
    if state.devices.job(&id).await?.is_none() {
        return Err(not_found(&id));
    }
    let limit = page_limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let rows = state
        .devices
        .job_commands(&id, q.status, q.after, limit + 1)
        .await?;
    let (commands, next) = page(rows, limit, |c| c.id.clone());
    let devices = commands
        .into_iter()
        .map(|c| JobDevice {
            device: c.device,
            command: c.id,
            status: c.status,
            updated_at_ms: c.updated_at_ms,
        })
        .collect();
    Ok(Json(JobDevices { devices, next }))
}
