//! `GET /api/v1/telemetry/latest?metric=temperature&tag=site:berlin`: the newest value of one
//! metric for every registered device that has it, optionally only devices carrying every
//! `tag=key:value` given (the parameter repeats; the key ends at the first `:`).
//!
//! Answer: `{metric, devices: [{device, ts, value}], next}`, in device id order, paged by
//! `limit` (default 10 000, enough for a whole fleet of that size in one page; at most
//! 100 000) and `after` (the previous page's `next`). A device deleted from the registry is
//! not listed, even though its telemetry stays in the store.
//!
//! The store's newest values of the metric and the registry's devices (filtered by tag in
//! the registry's query) are both read in id order, in pages of [`STORE_CHUNK`] and
//! [`REGISTRY_CHUNK`] devices, and merged: a page costs a few calls and memory in proportion
//! to its size, not to the fleet's.

use axum::{extract::State, Json};
use serde::Serialize;
use tellus_core::{telemetry::MetricValue, DeviceId, DeviceQuery, TimestampMs, Value};

use crate::{
    extract, openapi as doc,
    routes::{blocking, page_limit, parse_count, set_once, split_page},
    ApiError, AppState,
};

const DEFAULT_LIMIT: usize = 10_000;
const MAX_LIMIT: usize = 100_000;
/// The most `tag` filters one request may give.
pub const MAX_TAGS: usize = 32;
/// Devices read from the registry per call while merging.
const REGISTRY_CHUNK: usize = 2_000;
/// Newest values read from the store per call while merging.
const STORE_CHUNK: usize = 10_000;

/// The store's newest values of one metric, in device order, read a page at a time.
struct StoreValues<'a> {
    store: &'a dyn tellus_ingest::TelemetryStore,
    metric: &'a str,
    /// Read so far and not taken.
    page: std::collections::VecDeque<(DeviceId, TimestampMs, Value)>,
    /// Where the next page starts; `None` once the store has no more.
    next: Option<Option<DeviceId>>,
    size: usize,
}

impl StoreValues<'_> {
    /// The next value not taken, reading a page when needed.
    fn peek(&mut self) -> Result<Option<&(DeviceId, TimestampMs, Value)>, ApiError> {
        if self.page.is_empty() {
            if let Some(after) = self.next.take() {
                let page = self
                    .store
                    .latest_of_metric(self.metric, after.as_ref(), self.size)?;
                if page.len() == self.size {
                    self.next = Some(page.last().map(|(d, ..)| d.clone()));
                }
                self.page = page.into();
            }
        }
        Ok(self.page.front())
    }

    /// Takes the next value if `take` accepts it.
    fn next_if(
        &mut self,
        take: impl Fn(&DeviceId) -> bool,
    ) -> Result<Option<(DeviceId, TimestampMs, Value)>, ApiError> {
        match self.peek()? {
            Some((d, ..)) if take(d) => Ok(self.page.pop_front()),
            _ => Ok(None),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeviceValue {
    pub device: DeviceId,
    #[schema(value_type = i64)]
    pub ts: TimestampMs,
    #[schema(value_type = MetricValue)]
    pub value: Value,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FleetAnswer {
    pub metric: String,
    pub devices: Vec<DeviceValue>,
    /// The `after` of the next page; `null` on the last.
    pub next: Option<DeviceId>,
}

/// The parameters, read from the query string by hand because `tag` repeats.
#[derive(Debug, Default)]
struct FleetQuery {
    metric: String,
    tags: Vec<(String, String)>,
    limit: usize,
    after: Option<DeviceId>,
}

/// The schema of a `tag=key:value` filter: a key of at least one character, then `:`.
pub struct TagFilter;

impl utoipa::PartialSchema for TagFilter {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .pattern(Some("^[^:]+:"))
            .description(Some("`key:value`: the key ends at the first `:`"))
            .examples(["site:berlin"])
            .into()
    }
}

impl utoipa::ToSchema for TagFilter {}

/// A `tag=key:value` filter: the key ends at the first `:`.
pub(crate) fn parse_tag(value: &str) -> Result<(String, String), ApiError> {
    match value.split_once(':').filter(|(k, _)| !k.is_empty()) {
        Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
        None => Err(ApiError::InvalidQuery(format!(
            "tag: expected key:value such as site:berlin, found {value:?}"
        ))),
    }
}

fn parse(pairs: Vec<(String, String)>) -> Result<FleetQuery, ApiError> {
    let (mut metric, mut limit, mut after) = (None, None, None);
    let mut tags = Vec::new();
    for (key, value) in pairs {
        match key.as_str() {
            "metric" => set_once(&mut metric, "metric", value)?,
            "limit" => set_once(&mut limit, "limit", value)?,
            "after" => set_once(&mut after, "after", value)?,
            "tag" => tags.push(parse_tag(&value)?),
            other => {
                return Err(ApiError::InvalidQuery(format!(
                    "unknown parameter {other:?}; expected metric, tag, limit or after"
                )))
            }
        }
    }
    if tags.len() > MAX_TAGS {
        return Err(ApiError::InvalidQuery(format!(
            "at most {MAX_TAGS} tag filters per request, found {}",
            tags.len()
        )));
    }
    let metric = match metric {
        Some(m) if !m.is_empty() => m,
        Some(_) => return Err(ApiError::InvalidQuery("metric must not be empty".into())),
        None => {
            return Err(ApiError::InvalidQuery(
                "the metric parameter is required, e.g. ?metric=temperature".into(),
            ))
        }
    };
    let limit = limit.as_deref().map(parse_count("limit")).transpose()?;
    Ok(FleetQuery {
        metric,
        tags,
        limit: page_limit(limit, DEFAULT_LIMIT, MAX_LIMIT)?,
        after: after.as_deref().map(DeviceId::parse).transpose()?,
    })
}

/// Read one metric's newest value across the fleet.
///
/// For every registered device that has it (with every `tag` given), in device id order,
/// paged by `after`.
#[utoipa::path(
    get,
    path = "/telemetry/latest",
    operation_id = "fleet_latest",
    tag = "telemetry",
    params(
        ("metric" = String, Query, description = "The metric", example = "temperature", min_length = 1),
        ("tag" = Option<Vec<TagFilter>>, Query, description = "Only devices with every tag given, as `key:value` (repeats; at most 32; the key ends at the first `:`)", example = json!(["site:berlin"]), max_items = 32),
        ("limit" = Option<usize>, Query, description = "Devices per page (default 10 000; more than 100 000 is taken as 100 000)", minimum = 1),
        ("after" = Option<DeviceId>, Query, description = "The `next` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of the fleet's newest values", body = FleetAnswer),
        (status = 400, description = "A bad parameter (`invalid_query`, `invalid_device_id`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 500, response = doc::Internal),
        (status = 503, response = doc::StoreUnavailable),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn fleet_latest(
    State(state): State<AppState>,
    extract::Query(pairs): extract::Query<Vec<(String, String)>>,
) -> Result<Json<FleetAnswer>, ApiError> {
    let q = parse(pairs)?;
    let (registry, store) = (state.registry.clone(), state.store.clone());
    blocking(move || {
        let mut values = StoreValues {
            store: store.as_ref(),
            metric: &q.metric,
            page: Default::default(),
            next: Some(q.after.clone()),
            size: (q.limit + 1).min(STORE_CHUNK),
        };

        // Merge with the registry's devices (those with the tags), both in id order, until
        // one more than a page is found or either list ends.
        let mut found = Vec::new();
        let mut cursor = q.after.clone();
        while values.peek()?.is_some() && found.len() <= q.limit {
            let chunk = registry.devices(&DeviceQuery {
                after: cursor.as_ref(),
                limit: REGISTRY_CHUNK,
                tags: &q.tags,
                ..Default::default()
            })?;
            let last_chunk = chunk.len() < REGISTRY_CHUNK;
            for record in chunk {
                while values.next_if(|d| *d < record.id)?.is_some() {}
                if let Some((device, ts, value)) = values.next_if(|d| *d == record.id)? {
                    found.push(DeviceValue { device, ts, value });
                    if found.len() > q.limit {
                        break;
                    }
                }
                cursor = Some(record.id);
            }
            if last_chunk {
                break;
            }
        }
        let (devices, more) = split_page(found, q.limit);
        let next = if more {
            devices.last().map(|d| d.device.clone())
        } else {
            None
        };
        Ok::<_, ApiError>(FleetAnswer {
            metric: q.metric,
            devices,
            next,
        })
    })
    .await
    .map(Json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn tags_repeat_and_split_at_the_first_colon() {
        let q = parse(pairs(&[
            ("metric", "t"),
            ("tag", "site:berlin"),
            ("tag", "url:http://x"),
            ("tag", "empty:"),
        ]))
        .unwrap();
        assert_eq!(q.metric, "t");
        assert_eq!(
            q.tags,
            [
                ("site".to_owned(), "berlin".to_owned()),
                ("url".to_owned(), "http://x".to_owned()),
                ("empty".to_owned(), String::new()),
            ]
        );
        assert_eq!(q.limit, DEFAULT_LIMIT);
        assert_eq!(q.after, None);
    }

    #[test]
    fn bad_parameters_are_invalid_queries() {
        for bad in [
            &[][..],
            &[("metric", "")],
            &[("metric", "t"), ("metric", "u")],
            &[("metric", "t"), ("tag", "site")],
            &[("metric", "t"), ("tag", ":berlin")],
            &[("metric", "t"), ("limit", "0")],
            &[("metric", "t"), ("limit", "many")],
            &[("metric", "t"), ("color", "red")],
        ] {
            assert!(
                matches!(parse(pairs(bad)), Err(ApiError::InvalidQuery(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse(pairs(&[("metric", "t"), ("after", "a/b")])),
            Err(ApiError::InvalidDeviceId(_))
        ));
        let many: Vec<(&str, &str)> = std::iter::once(("metric", "t"))
            .chain(std::iter::repeat_n(("tag", "a:b"), MAX_TAGS + 1))
            .collect();
        assert!(parse(pairs(&many)).is_err());
    }
}
