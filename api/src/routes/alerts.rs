//! Alerts that rules raised: `GET /api/v1/alerts` lists them newest first (filters `status`,
//! `open=true`, `device`, `rule`), `GET /api/v1/alerts/{id}` shows one, and
//! `POST /api/v1/alerts/{id}/acknowledge` marks an active one seen. An alert lives
//! active → acknowledged → cleared (or active → cleared); it is cleared by its rule when the
//! condition stops holding, or when its rule is disabled or deleted, or its device deleted.

use axum::{extract::State, Json};
use serde::{Deserialize, Serialize};
use tellus_core::{now_ms, Alert, AlertQuery, AlertStatus, DeviceId};

use super::{blocking, page, page_limit};
use crate::{extract, ApiError, AppState};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub status: Option<AlertStatus>,
    /// Only active and acknowledged ones.
    #[serde(default)]
    pub open: bool,
    pub device: Option<String>,
    pub rule: Option<String>,
    pub limit: Option<usize>,
    /// The `next` of the previous page.
    pub after: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct AlertList {
    pub alerts: Vec<Alert>,
    pub next: Option<String>,
}

/// `GET /api/v1/alerts?status=&open=&device=&rule=&limit=&after=`.
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

/// `GET /api/v1/alerts/{id}`.
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

/// `POST /api/v1/alerts/{id}/acknowledge`: the alert after; acknowledging twice is harmless,
/// a cleared alert cannot be (409).
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
