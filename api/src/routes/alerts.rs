//! Alerts that rules raised: `GET /api/v1/alerts` lists them newest first (filters `status`,
//! `open=true`, `device`, `rule`), `GET /api/v1/alerts/{id}` shows one, and
//! `POST /api/v1/alerts/{id}/acknowledge` marks an active one seen. An alert lives
//! active → acknowledged → cleared (or active → cleared); it is cleared by its rule when the
//! condition stops holding, or when its rule is disabled or deleted, or its device deleted.

use axum::{extract::State, Json};
use serde::{Deserialize, Serialize};
use tellus_core::{now_ms, Alert, AlertQuery, AlertStatus, DeviceId};

use super::{blocking, page, page_limit};
use crate::{extract, openapi as doc, ApiError, AppState};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1_000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only alerts in this status (wins over `open`).
    pub status: Option<AlertStatus>,
    /// Only active and acknowledged ones.
    #[serde(default)]
    pub open: bool,
    /// Only this device's.
    #[param(value_type = Option<DeviceId>)]
    pub device: Option<String>,
    /// Only this rule's (its id).
    pub rule: Option<String>,
    /// Alerts per page (default 100; more than 1000 is taken as 1000).
    #[param(minimum = 1)]
    #[serde(default, deserialize_with = "extract::saturating::usize")]
    pub limit: Option<usize>,
    /// The `next` of the previous page.
    pub after: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AlertList {
    pub alerts: Vec<Alert>,
    pub next: Option<String>,
}

/// List alerts.
///
/// Newest first, paged by `after`; filtered by status, device and rule.
#[utoipa::path(
    get,
    path = "/alerts",
    operation_id = "list_alerts",
    tag = "alerts",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of alerts", body = AlertList),
        (status = 400, description = "A bad parameter (`invalid_query`, `invalid_device_id`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn list(
    State(state): State<AppState>,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<AlertList>, ApiError> {
    let limit = page_limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let device = q.device.as_deref().map(DeviceId::parse).transpose()?;
    let registry = state.registry.clone();
    let rows = blocking(move || {
        registry.alerts(&AlertQuery {
            status: q.status,
            open: q.open,
            device: device.as_ref(),
            rule: q.rule.as_deref(),
            after: q.after.as_deref(),
            limit: limit + 1,
        })
    })
    .await?;
    let (alerts, next) = page(rows, limit, |a| a.id.clone());
    Ok(Json(AlertList { alerts, next }))
}

/// Show an alert.
#[utoipa::path(
    get,
    path = "/alerts/{id}",
    operation_id = "get_alert",
    tag = "alerts",
    params(("id" = String, Path, description = "The alert's id (`a-` and 20 hex digits)")),
    responses(
        (status = 200, description = "The alert", body = Alert),
        (status = 400, description = "A path that is not UTF-8 once decoded (`invalid_path`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such alert (`alert_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn get_one(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
) -> Result<Json<Alert>, ApiError> {
    let registry = state.registry.clone();
    let key = id.clone();
    blocking(move || registry.alert(&key))
        .await?
        .map(Json)
        .ok_or(ApiError::AlertNotFound(id))
}

/// Acknowledge an alert.
///
/// The alert after; acknowledging twice is harmless, a cleared alert cannot be (409).
#[utoipa::path(
    post,
    path = "/alerts/{id}/acknowledge",
    operation_id = "acknowledge_alert",
    tag = "alerts",
    params(("id" = String, Path, description = "The alert's id (`a-` and 20 hex digits)")),
    responses(
        (status = 200, description = "The alert, acknowledged", body = Alert),
        (status = 400, description = "A path that is not UTF-8 once decoded (`invalid_path`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such alert (`alert_not_found`)", body = doc::ErrorBody),
        (status = 409, description = "The alert is cleared (`refused`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["operator"]))
)]
pub async fn acknowledge(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
) -> Result<Json<Alert>, ApiError> {
    let registry = state.registry.clone();
    let key = id.clone();
    let (before, after) = blocking(move || {
        let before = registry.alert(&key)?.map(|a| a.status);
        Ok::<_, tellus_core::RegistryError>((before, registry.acknowledge_alert(&key, now_ms())?))
    })
    .await?;
    let alert = after.ok_or(ApiError::AlertNotFound(id))?;
    if before == Some(AlertStatus::Active) {
        tracing::info!(alert = %alert.id, rule = %alert.rule, device_id = %alert.device, "alert acknowledged");
        tellus_rules::service::tell(&state.live, alert.clone());
    }
    Ok(Json(alert))
}
