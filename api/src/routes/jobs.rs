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
use crate::{extract, openapi as doc, ApiError, AppState};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1_000;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3_600);
const DEFAULT_RATE: f64 = 10.0;
const DEFAULT_CONCURRENCY: u32 = 100;

/// Which devices: `ids` or `tags`, exactly one of the two.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SelectorBody {
    /// These devices (at most 100,000), each registered.
    pub ids: Option<Vec<String>>,
    /// The devices carrying every one of these tags, resolved once, now (at least one tag).
    pub tags: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewJobBody {
    /// The command's name, 1 to 128 bytes.
    #[schema(example = "update")]
    pub name: String,
    #[serde(default)]
    pub params: serde_json::Value,
    /// Each command's timeout (default 1 hour, at most 30 days).
    #[serde(default, with = "humantime_serde")]
    #[schema(value_type = Option<String>, example = "30s")]
    pub timeout: Option<Duration>,
    pub selector: SelectorBody,
    /// Commands created per second (default 10; more than 0, at most 1000).
    pub rate: Option<f64>,
    /// Most of the job's commands not ended at once (default 100).
    pub concurrency: Option<u32>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobView {
    #[serde(flatten)]
    pub job: Job,
    /// The job's commands by status.
    #[schema(value_type = BTreeMap<String, u64>)]
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

/// Start a fleet job.
///
/// One command to every device of the selector, at `rate` a second with at most
/// `concurrency` not ended; 202 with the job.
#[utoipa::path(
    post,
    path = "/commands",
    operation_id = "create_job",
    tag = "jobs",
    request_body = NewJobBody,
    responses(
        (status = 202, description = "The job, started", body = JobView),
        (status = 400, description = "A bad selector, device id or command (`invalid_body`, `invalid_device_id`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "A device of `ids` is not registered (`device_not_found`)", body = doc::ErrorBody),
        (status = 409, description = "The registry refused it (`refused`)", body = doc::ErrorBody),
        (status = 413, response = doc::PayloadTooLarge),
        (status = 415, response = doc::UnsupportedMediaType),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["operator"]))
)]
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

/// Show a fleet job.
///
/// With its commands' counts by status and the devices still `pending`.
#[utoipa::path(
    get,
    path = "/commands/{job}",
    operation_id = "get_job",
    tag = "jobs",
    params(("job" = String, Path, description = "The job's id (`j-` and 20 hex digits)")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 400, description = "A path that is not UTF-8 once decoded (`invalid_path`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such job (`job_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn get_one(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
) -> Result<Json<JobView>, ApiError> {
    match state.devices.job(&id).await? {
        Some(job) => Ok(Json(view(&state, job).await?)),
        None => Err(not_found(&id)),
    }
}

/// Abort a fleet job.
///
/// Nothing more is sent, and its commands not yet delivered are cancelled; the job as it is
/// after.
#[utoipa::path(
    post,
    path = "/commands/{job}/abort",
    operation_id = "abort_job",
    tag = "jobs",
    params(("job" = String, Path, description = "The job's id (`j-` and 20 hex digits)")),
    responses(
        (status = 200, description = "The job, aborted (or ended before)", body = JobView),
        (status = 400, description = "A path that is not UTF-8 once decoded (`invalid_path`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such job (`job_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["operator"]))
)]
pub async fn abort(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
) -> Result<Json<JobView>, ApiError> {
    match state.devices.abort_job(&id).await? {
        Some(job) => Ok(Json(view(&state, job).await?)),
        None => Err(not_found(&id)),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Jobs per page (default 100; more than 1000 is taken as 1000).
    #[param(minimum = 1)]
    #[serde(default, deserialize_with = "extract::saturating::usize")]
    pub limit: Option<usize>,
    /// The `next` of the previous page: a job id.
    pub before: Option<String>,
    /// Only jobs in this status.
    pub status: Option<JobStatus>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
    pub next: Option<String>,
}

/// List fleet jobs.
///
/// Newest first, paged by `before`.
#[utoipa::path(
    get,
    path = "/commands",
    operation_id = "list_jobs",
    tag = "jobs",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of jobs", body = JobList),
        (status = 400, description = "A bad parameter (`invalid_query`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn list(
    State(state): State<AppState>,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<JobList>, ApiError> {
    let limit = page_limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let rows = state.devices.jobs(q.status, q.before, limit + 1).await?;
    let (jobs, next) = page(rows, limit, |j| j.id.clone());
    Ok(Json(JobList { jobs, next }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DevicesQuery {
    /// Only the devices whose command is in this status.
    pub status: Option<CommandStatus>,
    /// Devices per page (default 100; more than 1000 is taken as 1000).
    #[param(minimum = 1)]
    #[serde(default, deserialize_with = "extract::saturating::usize")]
    pub limit: Option<usize>,
    /// The `next` of the previous page.
    pub after: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobDevice {
    pub device: DeviceId,
    /// The device's command.
    pub command: String,
    pub status: CommandStatus,
    #[schema(value_type = i64)]
    pub updated_at_ms: TimestampMs,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobDevices {
    pub devices: Vec<JobDevice>,
    pub next: Option<String>,
}

/// List a fleet job's devices.
///
/// The devices that have a command of the job (in that status), in the order they got it.
#[utoipa::path(
    get,
    path = "/commands/{job}/devices",
    operation_id = "list_job_devices",
    tag = "jobs",
    params(("job" = String, Path, description = "The job's id (`j-` and 20 hex digits)"), DevicesQuery),
    responses(
        (status = 200, description = "A page of the job's devices and their commands", body = JobDevices),
        (status = 400, description = "A bad parameter (`invalid_query`, `invalid_path`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such job (`job_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
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
