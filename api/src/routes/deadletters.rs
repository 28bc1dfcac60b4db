//! Dead letters: messages that reached ingest but were not valid telemetry, newest first.
//!
//! A list (`GET /deadletters`) shows a preview of each payload, so that a page stays small
//! however large the payloads are: its first [`PREVIEW_BYTES`] bytes. One dead letter
//! (`GET /deadletters/{id}`) has the whole payload.
//!
//! Either way the payload comes back as `payload` (a string) when it is UTF-8, otherwise as
//! `payload_base64`; exactly one of the two is present. A UTF-8 preview ends at a character
//! boundary, so it may hold a few bytes less than [`PREVIEW_BYTES`]. `payload_size` is the
//! size of the whole payload in bytes, and `payload_truncated` says whether what was sent is
//! shorter than that.

use axum::{extract::State, Json};
use serde::{Deserialize, Serialize};
use tellus_core::{DeviceId, TimestampMs};
use tellus_ingest::{store::DEADLETTER_PREVIEW_BYTES, DeadLetter};

use super::{blocking, page, page_limit};
use crate::{base64, extract, openapi as doc, timestamps::rfc3339, ApiError, AppState};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// Most payload bytes a list shows per dead letter.
pub const PREVIEW_BYTES: usize = DEADLETTER_PREVIEW_BYTES;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Dead letters per page (default 100; more than 1000 is taken as 1000).
    #[param(minimum = 1)]
    #[serde(default, deserialize_with = "extract::saturating::usize")]
    pub limit: Option<usize>,
    /// The `next` of the previous page: dead letters with a smaller id.
    pub before: Option<i64>,
}

/// A refused payload: `payload` when it is UTF-8, else `payload_base64`; exactly one of the
/// two is present.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetterView {
    pub id: i64,
    #[schema(format = DateTime)]
    pub received_at: String,
    #[schema(value_type = i64)]
    pub received_at_ms: TimestampMs,
    pub device: DeviceId,
    pub topic: String,
    pub reason: String,
    /// Size of the whole payload in bytes.
    pub payload_size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// Whether `payload` / `payload_base64` hold less than the whole payload.
    pub payload_truncated: bool,
}

impl DeadLetterView {
    /// The view of `d` with at most the first `max_bytes` of its payload.
    fn new(d: DeadLetter, max_bytes: usize) -> Result<Self, ApiError> {
        let (payload, payload_base64, shown) = encode_prefix(&d.payload, max_bytes, d.payload_size);
        Ok(DeadLetterView {
            id: d.id,
            received_at: rfc3339(d.received_at_ms)?,
            received_at_ms: d.received_at_ms,
            device: d.device,
            topic: d.topic,
            reason: d.reason,
            payload_size: d.payload_size,
            payload,
            payload_base64,
            payload_truncated: shown < d.payload_size,
        })
    }
}

/// The first `max_bytes` of `payload` (which may itself be only a prefix of a payload of
/// `size` bytes) as `(text, base64, bytes shown)`: text when that prefix is UTF-8, cut back to
/// a character boundary when the cut split a character; base64 otherwise.
fn encode_prefix(
    payload: &[u8],
    max_bytes: usize,
    size: usize,
) -> (Option<String>, Option<String>, usize) {
    let prefix = &payload[..payload.len().min(max_bytes)];
    let text = match std::str::from_utf8(prefix) {
        Ok(text) => Some(text),
        // The prefix ends inside a character that the rest of the payload completes: cut there.
        Err(e) if e.error_len().is_none() && prefix.len() < size => {
            std::str::from_utf8(&prefix[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    };
    match text {
        Some(text) => (Some(text.to_owned()), None, text.len()),
        None => (None, Some(base64::encode(prefix)), prefix.len()),
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetterList {
    pub deadletters: Vec<DeadLetterView>,
    pub next: Option<i64>,
}

/// List dead letters.
///
/// Newest first, paged by `before`, each with a preview of its payload (its first KiB).
#[utoipa::path(
    get,
    path = "/deadletters",
    operation_id = "list_deadletters",
    tag = "deadletters",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of dead letters", body = DeadLetterList),
        (status = 400, description = "A bad parameter (`invalid_query`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 500, response = doc::Internal),
        (status = 503, response = doc::StoreUnavailable),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn list(
    State(state): State<AppState>,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<DeadLetterList>, ApiError> {
    let limit = page_limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let store = state.store.clone();
    let rows = blocking(move || store.deadletters(q.before, limit + 1)).await?;
    let (page, next) = page(rows, limit, |d| d.id);
    let deadletters = page
        .into_iter()
        .map(|d| DeadLetterView::new(d, PREVIEW_BYTES))
        .collect::<Result<_, _>>()?;
    Ok(Json(DeadLetterList { deadletters, next }))
}

/// Show a dead letter.
///
/// With its whole payload; 404 `deadletter_not_found`.
#[utoipa::path(
    get,
    path = "/deadletters/{id}",
    operation_id = "get_deadletter",
    tag = "deadletters",
    params(("id" = i64, Path, description = "The dead letter's id")),
    responses(
        (status = 200, description = "The dead letter, whole", body = DeadLetterView),
        (status = 400, description = "Not a whole number (`invalid_path`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such dead letter (`deadletter_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
        (status = 503, response = doc::StoreUnavailable),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn get_one(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<i64>,
) -> Result<Json<DeadLetterView>, ApiError> {
    let store = state.store.clone();
    let d = blocking(move || match store.deadletter(id)? {
        Some(d) => Ok(d),
        None => Err(ApiError::DeadLetterNotFound(id)),
    })
    .await?;
    let whole = d.payload.len();
    Ok(Json(DeadLetterView::new(d, whole)?))
}

#[cfg(test)]
mod tests {
    use super::encode_prefix;

    fn text(s: &str) -> (Option<String>, Option<String>, usize) {
        (Some(s.to_owned()), None, s.len())
    }

    #[test]
    fn previews_cut_text_at_a_character_boundary() {
        // Whole and short enough.
        assert_eq!(encode_prefix(b"abc", 4, 3), text("abc"));
        assert_eq!(encode_prefix(b"", 4, 0), text(""));
        // "é" is two bytes; a cut after its first byte goes back before it.
        assert_eq!(encode_prefix("aé".as_bytes(), 2, 3), text("a"));
        assert_eq!(encode_prefix("aé".as_bytes(), 3, 3), text("aé"));
        // The store already cut the payload: it is longer than what we were given.
        assert_eq!(encode_prefix(&"aé".as_bytes()[..2], 2, 3), text("a"));
    }

    #[test]
    fn previews_of_binary_are_base64() {
        assert_eq!(
            encode_prefix(&[0xff, 0xfe, 0x00, 0x01], 3, 4),
            (None, Some("//4A".into()), 3)
        );
        // A whole payload that ends inside a character is not UTF-8.
        assert_eq!(
            encode_prefix(&[b'a', 0xc3], 2, 2),
            (None, Some("YcM=".into()), 2)
        );
    }
}
