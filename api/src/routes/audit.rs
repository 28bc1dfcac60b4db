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
use crate::{extract, timestamps::rfc3339, ApiError, AppState};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only the entries of this device.
    pub device: Option<String>,
    /// The `next` of the previous page: entries with a smaller id.
    pub before: Option<i64>,
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct AuditView {
    pub id: i64,
    pub at: String,
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

#[derive(Debug, Serialize)]
pub struct AuditList {
    pub entries: Vec<AuditView>,
    pub next: Option<i64>,
}

/// `GET /api/v1/audit?device=&before=&limit=`
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
