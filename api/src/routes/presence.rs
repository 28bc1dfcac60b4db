//! Presence, from what the gate reports of connections: `GET /api/v1/devices/{id}/presence`
//! (online or not, since when, last seen, the last disconnect and why),
//! `GET /api/v1/devices/{id}/connections` (the history, newest first) and
//! `GET /api/v1/presence` (fleet counts).

use axum::{extract::State, Json};
use serde::{Deserialize, Serialize};
use tellus_core::{now_ms, DeviceId, PresenceCounts, Session, TimestampMs};

use super::{blocking, page, page_limit};
use crate::{extract, openapi as doc, ApiError, AppState};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1_000;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Presence {
    pub device: DeviceId,
    pub online: bool,
    /// When the current connection was admitted (online only).
    #[schema(value_type = Option<i64>)]
    pub connected_since_ms: Option<TimestampMs>,
    /// Now while online (the gate closes a connection silent for 1.5 keep-alives), else
    /// when the last connection ended; `null` if the device never connected.
    #[schema(value_type = Option<i64>)]
    pub last_seen_ms: Option<TimestampMs>,
    #[schema(value_type = Option<i64>)]
    pub last_disconnect_ms: Option<TimestampMs>,
    pub last_disconnect_reason: Option<String>,
    /// The address and MQTT version of the newest connection.
    pub peer: Option<String>,
    pub protocol: Option<String>,
}

/// The device must exist: presence of an unknown id is a 404, not "offline".
async fn known(state: &AppState, id: &str) -> Result<DeviceId, ApiError> {
    let device = DeviceId::parse(id)?;
    let registry = state.registry.clone();
    let d = device.clone();
    blocking(move || match registry.device(&d)? {
        Some(_) => Ok(()),
        None => Err(ApiError::DeviceNotFound(d)),
    })
    .await?;
    Ok(device)
}

/// Show whether a device is online.
///
/// Since when, when it was last seen, the last disconnect and its reason, its peer and MQTT
/// version.
#[utoipa::path(
    get,
    path = "/devices/{id}/presence",
    operation_id = "get_presence",
    tag = "presence",
    params(("id" = DeviceId, Path, description = "The device's id")),
    responses(
        (status = 200, description = "The device's presence", body = Presence),
        (status = 400, description = "Not a valid device id (`invalid_device_id`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such device (`device_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn get_one(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
) -> Result<Json<Presence>, ApiError> {
    let device = known(&state, &id).await?;
    // The newest two: the current connection and, when it is open, the one that ended last.
    let newest = state.devices.sessions(&device, None, 2).await?;
    let current = newest.first().filter(|s| s.disconnected_at_ms.is_none());
    let ended = newest.iter().find(|s| s.disconnected_at_ms.is_some());
    Ok(Json(Presence {
        online: current.is_some(),
        connected_since_ms: current.map(|s| s.connected_at_ms),
        last_seen_ms: match current {
            Some(_) => Some(now_ms()),
            None => ended.and_then(|s| s.disconnected_at_ms),
        },
        last_disconnect_ms: ended.and_then(|s| s.disconnected_at_ms),
        last_disconnect_reason: ended.and_then(|s| s.reason.clone()),
        peer: newest.first().map(|s| s.peer.clone()),
        protocol: newest.first().map(|s| s.protocol.clone()),
        device,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Connections per page (default 100; more than 1000 is taken as 1000).
    #[param(minimum = 1)]
    #[serde(default, deserialize_with = "extract::saturating::usize")]
    pub limit: Option<usize>,
    /// The `next` of the previous page: connections with a smaller id.
    pub before: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Connections {
    pub connections: Vec<Session>,
    pub next: Option<i64>,
}

/// List a device's connections.
///
/// Newest first, each with its end and why; paged by `before`.
#[utoipa::path(
    get,
    path = "/devices/{id}/connections",
    operation_id = "list_connections",
    tag = "presence",
    params(("id" = DeviceId, Path, description = "The device's id"), ListQuery),
    responses(
        (status = 200, description = "A page of connections", body = Connections),
        (status = 400, description = "Not a valid device id (`invalid_device_id`) or parameter (`invalid_query`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such device (`device_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn connections(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<Connections>, ApiError> {
    let device = known(&state, &id).await?;
    let limit = page_limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let rows = state.devices.sessions(&device, q.before, limit + 1).await?;
    let (connections, next) = page(rows, limit, |s| s.id);
    Ok(Json(Connections { connections, next }))
}

/// Count the fleet's online devices.
///
/// `{"devices": n, "online": n}`.
#[utoipa::path(
    get,
    path = "/presence",
    operation_id = "presence_counts",
    tag = "presence",
    responses(
        (status = 200, description = "Registered devices, and how many are online", body = PresenceCounts),
        doc::Guarded,
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn counts(State(state): State<AppState>) -> Result<Json<PresenceCounts>, ApiError> {
    Ok(Json(state.devices.presence_counts().await?))
}
