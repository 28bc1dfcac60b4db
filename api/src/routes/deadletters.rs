//! Dead letters: messages that reached ingest but were not valid telemetry, newest first.
//!
//! The raw payload comes back as `payload` (a string) when it is UTF-8, otherwise as
//! `payload_base64`; exactly one of the two is present.

use axum::{extract::State, Json};
use serde::{Deserialize, Serialize};
use tellus_core::{DeviceId, TimestampMs};
use tellus_ingest::DeadLetter;

use super::{blocking, page_limit, split_page};
use crate::{base64, extract, timestamps::rfc3339, ApiError, AppState};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub limit: Option<usize>,
    /// The `next` of the previous page: dead letters with a smaller id.
    pub before: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct DeadLetterView {
    pub id: i64,
    pub received_at: String,
    pub received_at_ms: TimestampMs,
    pub device: DeviceId,
    pub topic: String,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
}

impl TryFrom<DeadLetter> for DeadLetterView {
    type Error = ApiError;
    fn try_from(d: DeadLetter) -> Result<Self, ApiError> {
        let (payload, payload_base64) = match String::from_utf8(d.payload) {
            Ok(text) => (Some(text), None),
            Err(e) => (None, Some(base64::encode(e.as_bytes()))),
        };
        Ok(DeadLetterView {
            id: d.id,
            received_at: rfc3339(d.received_at_ms)?,
            received_at_ms: d.received_at_ms,
            device: d.device,
            topic: d.topic,
            reason: d.reason,
            payload,
            payload_base64,
        })
    }
}

#[derive(Debug, Serialize)]
pub struct DeadLetterList {
    pub deadletters: Vec<DeadLetterView>,
    pub next: Option<i64>,
}

/// `GET /api/v1/deadletters?limit=&before=`
pub async fn list(
    State(state): State<AppState>,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<DeadLetterList>, ApiError> {
    let limit = page_limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let store = state.store.clone();
    let rows = blocking(move || store.deadletters(q.before, limit + 1)).await?;
    let (page, more) = split_page(rows, limit);
    let next = if more {
        page.last().map(|d| d.id)
    } else {
        None
    };
    let deadletters = page
        .into_iter()
        .map(DeadLetterView::try_from)
        .collect::<Result<_, _>>()?;
    Ok(Json(DeadLetterList { deadletters, next }))
}
