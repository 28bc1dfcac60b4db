//! Device state: `GET /api/v1/devices/{id}/state` (desired, reported, the delta between
//! them, their versions and times) and `PATCH /api/v1/devices/{id}/state`
//! (`{"desired": {…merge patch…}, "version": n}`: a JSON merge patch of the desired state,
//! applied only if the desired state is still at version `n`, when given).
//!
//! Tellus publishes the desired state retained on `devices/{id}/state/desired` as
//! `{"version", "state", "at_ms"}` when it changes and when the device subscribes again;
//! the device publishes merge patches of its reported state on `devices/{id}/state/reported`.

use axum::{extract::State, Json};
use serde::{Deserialize, Serialize};
use tellus_core::{
    state::{self, DeviceState},
    DeviceId, TimestampMs,
};

use crate::{extract, openapi as doc, ApiError, AppState};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StateView {
    pub device: DeviceId,
    /// A JSON object.
    pub desired: serde_json::Value,
    pub desired_version: u64,
    #[schema(value_type = Option<i64>)]
    pub desired_at_ms: Option<TimestampMs>,
    /// A JSON object.
    pub reported: serde_json::Value,
    pub reported_version: u64,
    #[schema(value_type = Option<i64>)]
    pub reported_at_ms: Option<TimestampMs>,
    /// What the desired state asks that the reported state does not show yet.
    pub delta: serde_json::Value,
}

impl StateView {
    fn new(device: DeviceId, s: DeviceState) -> StateView {
        StateView {
            delta: state::delta(&s.desired, &s.reported),
            device,
            desired: s.desired,
            desired_version: s.desired_version,
            desired_at_ms: s.desired_at_ms,
            reported: s.reported,
            reported_version: s.reported_version,
            reported_at_ms: s.reported_at_ms,
        }
    }
}

/// Show a device's state.
///
/// Desired and reported, with their versions and times, and the delta between them.
#[utoipa::path(
    get,
    path = "/devices/{id}/state",
    operation_id = "get_state",
    tag = "state",
    params(("id" = DeviceId, Path, description = "The device's id")),
    responses(
        (status = 200, description = "The device's state", body = StateView),
        (status = 400, description = "Not a valid device id (`invalid_device_id`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such device (`device_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn get(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
) -> Result<Json<StateView>, ApiError> {
    let device = DeviceId::parse(&id)?;
    match state.devices.state(&device).await? {
        Some(s) => Ok(Json(StateView::new(device, s))),
        None => Err(ApiError::DeviceNotFound(device)),
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Patch {
    /// A JSON merge patch (RFC 7386) of the desired state: `null` removes a key.
    pub desired: serde_json::Value,
    /// Apply only if the desired state is at this version (409 otherwise).
    pub version: Option<u64>,
}

/// Patch a device's desired state.
///
/// 200 with the state after the patch; 409 `refused` if `version` is not the current one;
/// 400 if `desired` is not a JSON object, or the state would grow too large.
#[utoipa::path(
    patch,
    path = "/devices/{id}/state",
    operation_id = "patch_state",
    tag = "state",
    params(("id" = DeviceId, Path, description = "The device's id")),
    request_body = Patch,
    responses(
        (status = 200, description = "The device's state after the patch", body = StateView),
        (status = 400, description = "Not a valid device id (`invalid_device_id`) or patch (`invalid_body`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such device (`device_not_found`)", body = doc::ErrorBody),
        (status = 409, description = "`version` is not the current one (`refused`)", body = doc::ErrorBody),
        (status = 413, response = doc::PayloadTooLarge),
        (status = 415, response = doc::UnsupportedMediaType),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["operator"]))
)]
pub async fn patch(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
    extract::Json(body): extract::Json<Patch>,
) -> Result<Json<StateView>, ApiError> {
    let device = DeviceId::parse(&id)?;
    let patched = state
        .devices
        .patch_desired(&device, body.desired, body.version)
        .await?;
    Ok(Json(StateView::new(device, patched)))
}
