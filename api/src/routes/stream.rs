//! `GET /api/v1/stream`: what happens to devices as it happens, as server-sent events, for a
//! dashboard or `curl -N`.
//!
//! Each event is named by its type (`telemetry`: points just committed; `presence`: a
//! connection opened or ended; `command`: a command's status changed; `state`: desired or
//! reported state changed; `alert`: an alert was raised, acknowledged or cleared) and
//! carries the JSON of `tellus_core::LiveEvent`. Filters: `device=a,b` (those devices
//! only), `tag=key:value` (repeatable: devices with every tag given),
//! `type=telemetry,presence` (those types only). A client that falls more than
//! `tellus_core::live::LIVE_QUEUE` events behind misses the oldest and gets a `lagged` event
//! saying how many; a comment every 15 s keeps idle connections open. A stream ends within
//! 5 s of the revocation of the token it was opened with.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    convert::Infallible,
    sync::Arc,
    time::Duration,
};

use axum::{
    extract::State,
    response::sse::{Event, KeepAlive, Sse},
    Extension,
};
use futures::{Stream, StreamExt};
use tellus_core::{DeviceId, LiveEvent, Registry};
use tokio::sync::broadcast::error::RecvError;

use super::{blocking, telemetry::fleet::parse_tag};
use crate::{
    auth::{Caller, ADMIN_TOKEN_ID},
    extract, openapi as doc, ApiError, AppState,
};

/// How often a stream looks whether its token was revoked.
const RECHECK: Duration = Duration::from_secs(5);
/// Devices whose tags a stream remembers; past this it starts over.
const TAG_CACHE: usize = 10_000;
/// The most `tag` filters, and devices named, in one request.
const MAX_FILTERS: usize = 1_000;
const TYPES: [&str; 5] = ["telemetry", "presence", "command", "state", "alert"];

#[derive(Debug, Default)]
struct Filter {
    devices: Option<HashSet<DeviceId>>,
    tags: Vec<(String, String)>,
    types: Option<HashSet<String>>,
}

fn parse(pairs: Vec<(String, String)>) -> Result<Filter, ApiError> {
    let mut filter = Filter::default();
    let list = |value: &str| {
        value
            .split(',')
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    for (key, value) in pairs {
        match key.as_str() {
            "device" => {
                let devices = filter.devices.get_or_insert_with(HashSet::new);
                for id in list(&value) {
                    devices.insert(DeviceId::parse(&id)?);
                }
            }
            "tag" => filter.tags.push(parse_tag(&value)?),
            "type" => {
                let types = filter.types.get_or_insert_with(HashSet::new);
                for t in list(&value) {
                    if !TYPES.contains(&t.as_str()) {
                        return Err(ApiError::InvalidQuery(format!(
                            "type: {t:?} is not one of {}",
                            TYPES.join(", ")
                        )));
                    }
                    types.insert(t);
                }
            }
            other => {
                return Err(ApiError::InvalidQuery(format!(
                    "unknown parameter {other:?}; expected device, tag or type"
                )))
            }
        }
    }
    let named = filter.devices.as_ref().map_or(0, HashSet::len);
    if filter.tags.len() > MAX_FILTERS || named > MAX_FILTERS {
        return Err(ApiError::InvalidQuery(format!(
            "at most {MAX_FILTERS} devices and {MAX_FILTERS} tags per stream"
        )));
    }
    Ok(filter)
}

/// What one stream has learnt of devices' tags.
struct Tags {
    state: AppState,
    matches: HashMap<DeviceId, bool>,
}

impl Tags {
    /// Whether `device` has every tag of `wanted` (an unknown device has none).
    async fn of(&mut self, device: &DeviceId, wanted: &[(String, String)]) -> bool {
        if wanted.is_empty() {
            return true;
        }
        if let Some(m) = self.matches.get(device) {
            return *m;
        }
        let registry = self.state.registry.clone();
        let id = device.clone();
        let tags: BTreeMap<String, String> = blocking(move || registry.device(&id))
            .await
            .ok()
            .flatten()
            .map(|d| d.tags)
            .unwrap_or_default();
        let m = wanted.iter().all(|(k, v)| tags.get(k) == Some(v));
        if self.matches.len() >= TAG_CACHE {
            self.matches.clear();
        }
        self.matches.insert(device.clone(), m);
        m
    }
}

/// Follow what happens to devices.
///
/// Server-sent events, named by type (`telemetry`, `presence`, `command`, `state`, `alert`),
/// each carrying a `LiveEvent` as JSON; `lagged` says how many a slow client missed. The
/// stream does not end; a comment every 15 s keeps it open.
#[utoipa::path(
    get,
    path = "/stream",
    operation_id = "stream",
    tag = "stream",
    params(
        ("device" = Option<String>, Query, description = "Only these devices: comma-separated ids (may repeat)", example = "sensor-01,sensor-02"),
        ("tag" = Option<Vec<super::telemetry::fleet::TagFilter>>, Query, description = "Only devices with every tag given, as `key:value` (repeats)", example = json!(["site:berlin"])),
        ("type" = Option<String>, Query, description = "Only these types, comma-separated: telemetry, presence, command, state, alert (may repeat)", example = "telemetry,presence"),
    ),
    responses(
        (status = 200, description = "The events, as they happen", content_type = "text/event-stream", body = String),
        (status = 400, description = "A bad filter (`invalid_query`, `invalid_device_id`)", body = doc::ErrorBody),
        doc::Guarded,
    ),
    security(("token" = ["viewer"]))
)]
pub async fn stream(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    extract::Query(pairs): extract::Query<Vec<(String, String)>>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let filter = parse(pairs)?;
    let events = state.live.listen();
    let revoked = revoked(state.registry.clone(), caller);
    let tags = Tags {
        state,
        matches: HashMap::new(),
    };
    let stream = futures::stream::unfold(
        (events, tags, filter),
        |(mut events, mut tags, filter)| async move {
            loop {
                let event = match events.recv().await {
                    Ok(e) => e,
                    Err(RecvError::Lagged(missed)) => {
                        let lagged = Event::default()
                            .event("lagged")
                            .data(serde_json::json!({ "missed": missed }).to_string());
                        return Some((Ok(lagged), (events, tags, filter)));
                    }
                    Err(RecvError::Closed) => return None,
                };
                if !wanted(&event, &filter, &mut tags).await {
                    continue;
                }
                let data = serde_json::to_string(&event).unwrap_or_default();
                let sse = Event::default().event(event.kind()).data(data);
                return Some((Ok(sse), (events, tags, filter)));
            }
        },
    );
    // A stream outlives the check of the token it was opened with: it ends once that token
    // is revoked.
    let stream = stream.take_until(Box::pin(revoked));
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Resolves once `caller`'s token is no longer in the registry, looked at every
/// [`RECHECK`]; never for the data directory's admin token, which is not in it.
async fn revoked(registry: Arc<dyn Registry>, caller: Caller) {
    if caller.token_id == ADMIN_TOKEN_ID {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(RECHECK).await;
        let (registry, id) = (registry.clone(), caller.token_id.clone());
        // A registry that cannot answer now does not end the stream; the next look may.
        if let Ok(Ok(None)) = tokio::task::spawn_blocking(move || registry.api_token(&id)).await {
            return;
        }
    }
}

async fn wanted(event: &LiveEvent, filter: &Filter, tags: &mut Tags) -> bool {
    filter
        .types
        .as_ref()
        .is_none_or(|t| t.contains(event.kind()))
        && filter
            .devices
            .as_ref()
            .is_none_or(|d| d.contains(event.device()))
        && tags.of(event.device(), &filter.tags).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn filters_are_read_and_refused_with_reasons() {
        let f = parse(pairs(&[
            ("device", "a,b"),
            ("tag", "site:berlin"),
            ("type", "telemetry,presence"),
        ]))
        .unwrap();
        assert_eq!(f.devices.unwrap().len(), 2);
        assert_eq!(f.tags, [("site".to_owned(), "berlin".to_owned())]);
        assert_eq!(f.types.unwrap().len(), 2);
        assert!(parse(Vec::new()).unwrap().devices.is_none());
        for bad in [
            ("type", "weather"),
            ("tag", "nocolon"),
            ("colour", "red"),
            ("device", "a/b"),
        ] {
            assert!(parse(pairs(&[bad])).is_err(), "{bad:?}");
        }
    }
}
