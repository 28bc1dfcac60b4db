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

use crate::{extract, ApiError, AppState};

#[derive(Debug, Serialize)]
pub struct StateView {
    pub device: DeviceId,
    pub desired: serde_json::Value,
    pub desired_version: u64,
    pub desired_at_ms: Option<TimestampMs>,
    pub reported: serde_json::Value,
    pub reported_version: u64,
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

/// `GET /api/v1/devices/{id}/state`.
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Patch {
    /// A JSON merge patch (RFC 7386) of the desired state: `null` removes a key.
    pub desired: serde_json::Value,
    /// Apply only if the desired state is at this version (409 otherwise).
    pub version: Option<u64>,
}

/// `PATCH /api/v1/devices/{id}/state`: 200 with the state after the patch; 409 `refused`
/// if `version` is not the current one; 400 if `desired` is not a JSON object.
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
