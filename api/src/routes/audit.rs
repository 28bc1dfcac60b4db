//! The audit trail of the edge: `GET /audit?device=&before=&limit=`, newest first.
//!
//! The gate records every connection it accepts, refuses or closes, with the peer address,
//! the device and certificate serial when a certificate named them (`null` when the
//! connection failed earlier), the decision (`accepted`, `refused`, `closed`) and the reason.
//! Entries of devices that were never registered, or have been deleted, are listed too.

use axum::{extract::State, Json};
use serde::{Deserialize, Serialize};
use tellus_core::{AuditDecision, AuditEntry, DeviceId, TimestampMs};

use super::{blocking, page, page_limit};
use crate::{extract, openapi as doc, timestamps::rfc3339, ApiError, AppState};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only the entries of this device.
    #[param(value_type = Option<DeviceId>)]
    pub device: Option<String>,
    /// The `next` of the previous page: entries with a smaller id.
    pub before: Option<i64>,
    /// Entries per page (default 100; more than 1000 is taken as 1000).
    #[param(minimum = 1)]
    #[serde(default, deserialize_with = "extract::saturating::usize")]
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditView {
    pub id: i64,
    #[schema(format = DateTime)]
    pub at: String,
    #[schema(value_type = i64)]
    pub at_ms: TimestampMs,
    pub peer: String,
    pub device: Option<DeviceId>,
    pub serial: Option<String>,
    pub decision: AuditDecision,
    pub reason: String,
}

impl TryFrom<AuditEntry> for AuditView {
    type Error = ApiError;
    fn try_from(e: AuditEntry) -> Result<Self, ApiError> {
        Ok(AuditView {
            id: e.id,
            at: rfc3339(e.at_ms)?,
            at_ms: e.at_ms,
            peer: e.peer,
            device: e.device,
            serial: e.serial,
            decision: e.decision,
            reason: e.reason,
        })
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditList {
    pub entries: Vec<AuditView>,
    pub next: Option<i64>,
}

/// List the edge's decisions.
///
/// Every connection the gate accepted, refused or closed, newest first, paged by `before`.
#[utoipa::path(
    get,
    path = "/audit",
    operation_id = "list_audit",
    tag = "audit",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of audit entries", body = AuditList),
        (status = 400, description = "A bad parameter (`invalid_query`, `invalid_device_id`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn list(
    State(state): State<AppState>,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<AuditList>, ApiError> {
    let limit = page_limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let device = q.device.as_deref().map(DeviceId::parse).transpose()?;
    let registry = state.registry.clone();
    let rows = blocking(move || registry.audit(device.as_ref(), q.before, limit + 1)).await?;
    let (page, next) = page(rows, limit, |e| e.id);
    let entries = page
        .into_iter()
        .map(AuditView::try_from)
        .collect::<Result<_, _>>()?;
    Ok(Json(AuditList { entries, next }))
}
