//! Telemetry: one device's series over a time range, raw or aggregated, as JSON pages or a
//! CSV stream; the newest value of each metric of a device; and the newest value of one
//! metric across the fleet ([`fleet`]).
//!
//! `GET /devices/{id}/telemetry` takes:
//! - `metric=a` (one series) or `metrics=a,b` (up to [`MAX_METRICS`], in one answer): one of
//!   the two, not both; names may not be empty or repeat (a metric whose name holds a comma
//!   can only be asked for with `metric=`);
//! - `from`, `to`: `from <= ts <= to`, each epoch milliseconds or RFC 3339; by default the
//!   last hour. Times outside years 0000–9999 are moved to the nearest end of that span;
//! - `step=1m` (humantime: `30s`, `1m`, `1h`, `1d`, or a number of ms; at most 100 years)
//!   and `agg=avg|min|max|sum|count|first|last` (default `avg`): one value per bucket of
//!   `step`, as `[bucket_start, value]`. Buckets are aligned to multiples of `step` since the
//!   Unix epoch, `from` and `to` widened to whole buckets; a bucket without a number is left
//!   out (text is not aggregated; booleans count as 0 and 1);
//! - without `step`, `max_points` (default 1000, at most 100 000): a range holding at most
//!   that many raw points is answered raw, a larger one aggregated by `agg` with the step
//!   [`plan::auto_step`] chooses (the smallest that gives at most `max_points` buckets, a
//!   multiple of the store's coarsest rollup that still gives that many, so the store
//!   answers from the rollup). The store keeps raw points for less time than rollups, so
//!   when the raw points fit but a rollup knows numbers they lack, the answer is that
//!   rollup's buckets (see [`plan`]): an old range is answered from what is left of it;
//! - `agg=none` instead: raw points whatever their number, paged by `limit` (neither `step`
//!   nor `max_points` with it);
//! - `limit` and `format=json|csv` (below).
//!
//! JSON: `metric=` is answered `{device, metric, points: [[ts, value]], next}`, with `step`
//! (ms) and `agg` added when the points are buckets. `metrics=` is answered
//! `{device, from, to, series: [{metric, points, next, step?, agg?}]}`, each series planned
//! on its own (a sparse one may come raw beside an aggregated one). A page holds at most
//! `limit` points per series (default 10 000); each series has its own `next`, the `from`
//! that continues it (the next bucket, for buckets), `null` once it is complete: continue a
//! series with `metric=<it>&from=<its next>`, with its `step` and `agg` if it has them (so
//! that the next page is cut into the same buckets, whatever its smaller range would plan).
//!
//! CSV ([`csv`]): `metric,ts,value` lines, streamed with no cap, series after series; `limit`
//! is refused. Without `step`, a CSV export is every raw point the store still keeps (an
//! export is not a chart: capping it at `max_points` would defeat it), unless `max_points`
//! asks for the planning above; with `step` (or `max_points`) it is the same buckets as the
//! JSON answer.

use std::collections::{BTreeMap, HashSet};

use axum::{
    extract::State,
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};
use tellus_core::{now_ms, telemetry::MetricValue, DeviceId, TimestampMs, Value};
use tellus_ingest::{Agg, StoreError, TelemetryStore};

use super::{blocking, page_limit};
use crate::{extract, openapi as doc, timestamps, ApiError, AppState};

pub mod csv;
pub mod fleet;
pub mod plan;
pub mod read;

use plan::Shape;

const DEFAULT_LIMIT: usize = 10_000;
const MAX_LIMIT: usize = 100_000;
const DEFAULT_SPAN_MS: TimestampMs = 3_600_000;
const DEFAULT_MAX_POINTS: usize = 1000;
const MAX_MAX_POINTS: usize = 100_000;
/// The most metrics one request may name.
pub const MAX_METRICS: usize = 32;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RangeQuery {
    /// One metric (not with `metrics`).
    #[param(example = "temperature")]
    pub metric: Option<String>,
    /// Comma-separated metric names, at most 32, none empty or twice (not with `metric`).
    #[param(example = "temperature,humidity")]
    pub metrics: Option<String>,
    /// From this time (epoch ms or RFC 3339); default `to` less an hour.
    pub from: Option<String>,
    /// Up to this time, included (epoch ms or RFC 3339); default now.
    pub to: Option<String>,
    /// Points per series per JSON page (default 10 000; more than 100 000 is taken as
    /// 100 000); not with `format=csv`.
    #[param(minimum = 1)]
    #[serde(default, deserialize_with = "extract::saturating::usize")]
    pub limit: Option<usize>,
    /// Buckets of this width: `30s`, `1m`, `1h`, `1d` or milliseconds, at most 100 years.
    #[param(example = "1m")]
    pub step: Option<String>,
    /// How a bucket becomes one value: avg (default), min, max, sum, count, first, last; or
    /// none for raw points however many (without `step` and `max_points`).
    #[param(pattern = "^(avg|min|max|sum|count|first|last|none)$")]
    pub agg: Option<String>,
    /// Without `step`: a range of more raw points than this (default 1000; more than
    /// 100 000 is taken as 100 000) is answered in buckets the API plans.
    #[param(minimum = 1)]
    #[serde(default, deserialize_with = "extract::saturating::usize")]
    pub max_points: Option<usize>,
    /// `json` (default) or `csv` (`metric,ts,value` lines, streamed whole).
    #[param(pattern = "^(json|csv)$")]
    pub format: Option<String>,
}

/// One series of an answer. `points` are `[ts_ms, value]` pairs, or `[bucket_start_ms,
/// value]` when `step` and `agg` say the series is aggregated.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Series {
    pub metric: String,
    #[schema(value_type = Vec<(i64, MetricValue)>)]
    pub points: Vec<(TimestampMs, Value)>,
    /// The `from` that continues the series; `null` once it is complete.
    #[schema(value_type = Option<i64>)]
    pub next: Option<TimestampMs>,
    /// The buckets' width in ms, when aggregated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<i64>,
    /// How the buckets were summarised, when aggregated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agg: Option<Agg>,
}

/// The answer to `metric=`: `{device, metric, points, next}`, and `step`, `agg` when
/// aggregated.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RangeAnswer {
    pub device: DeviceId,
    #[serde(flatten)]
    pub series: Series,
}

/// The answer to `metrics=`: the range queried (ms) and one series per metric, in the
/// order asked.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SeriesAnswer {
    pub device: DeviceId,
    #[schema(value_type = i64)]
    pub from: TimestampMs,
    #[schema(value_type = i64)]
    pub to: TimestampMs,
    pub series: Vec<Series>,
}

/// A JSON answer: one series for `metric=`, a list for `metrics=`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum TelemetryAnswer {
    One(RangeAnswer),
    Many(SeriesAnswer),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Csv,
}

/// What a request asks of each series, before the store is consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    /// Buckets of this step.
    Step(i64),
    /// Raw if the range holds at most this many points, else buckets of [`plan::auto_step`].
    AtMost(usize),
    /// Every raw point, paged by `limit` (`agg=none`, and CSV exports without `step` or
    /// `max_points`).
    Raw,
}

/// A validated request.
#[derive(Debug)]
struct Request {
    metrics: Vec<String>,
    /// Asked with `metrics=`: answered with a list of series.
    many: bool,
    from: TimestampMs,
    to: TimestampMs,
    wanted: Wanted,
    agg: Agg,
    format: Format,
    /// Points per series per JSON page.
    limit: usize,
}

impl RangeQuery {
    fn validate(self, now: TimestampMs) -> Result<Request, ApiError> {
        let (metrics, many) = match (self.metric, self.metrics) {
            (Some(_), Some(_)) => {
                return Err(ApiError::InvalidQuery(
                    "give either metric (one) or metrics (a comma-separated list), not both".into(),
                ))
            }
            (None, None) => {
                return Err(ApiError::InvalidQuery(
                    "the metric parameter is required, e.g. ?metric=temperature \
                     (or ?metrics=temperature,humidity)"
                        .into(),
                ))
            }
            (Some(m), None) if m.is_empty() => {
                return Err(ApiError::InvalidQuery("metric must not be empty".into()))
            }
            (Some(m), None) => (vec![m], false),
            (None, Some(list)) => (metric_list(&list)?, true),
        };
        let to = match self.to.as_deref() {
            Some(s) => timestamps::parse("to", s)?,
            None => now,
        };
        let from = match self.from.as_deref() {
            Some(s) => timestamps::parse("from", s)?,
            None => to.saturating_sub(DEFAULT_SPAN_MS),
        };
        if from > to {
            return Err(ApiError::InvalidQuery(format!(
                "from ({from}) is after to ({to})"
            )));
        }
        let clamp = |t: TimestampMs| t.clamp(timestamps::MIN_MS, timestamps::MAX_MS);
        let (from, to) = (clamp(from), clamp(to));
        let format = match self.format.as_deref() {
            None | Some("json") => Format::Json,
            Some("csv") => Format::Csv,
            Some(other) => {
                return Err(ApiError::InvalidQuery(format!(
                    "format: expected json or csv, found {other:?}"
                )))
            }
        };
        let limit = match format {
            Format::Json => page_limit(self.limit, DEFAULT_LIMIT, MAX_LIMIT)?,
            Format::Csv if self.limit.is_some() => {
                return Err(ApiError::InvalidQuery(
                    "limit does not apply to format=csv, which streams the whole range".into(),
                ))
            }
            Format::Csv => usize::MAX,
        };
        let step = self.step.as_deref().map(plan::parse_step).transpose()?;
        // agg=none: raw points whatever their number, paged by limit.
        let raw = self.agg.as_deref() == Some("none");
        let agg = match self.agg.as_deref() {
            None | Some("none") => Agg::Avg,
            Some(agg) => plan::parse_agg(agg)?,
        };
        if self.max_points == Some(0) {
            return Err(ApiError::InvalidQuery(
                "max_points must be at least 1".into(),
            ));
        }
        let max_points = self.max_points.map(|n| n.min(MAX_MAX_POINTS));
        let wanted = match (step, max_points, format) {
            (Some(_), _, _) if raw => {
                return Err(ApiError::InvalidQuery(
                    "agg=none asks for raw points; it takes no step".into(),
                ))
            }
            (None, Some(_), _) if raw => {
                return Err(ApiError::InvalidQuery(
                    "agg=none asks for raw points; it takes no max_points".into(),
                ))
            }
            (Some(step), _, _) => Wanted::Step(step),
            (None, None, _) if raw => Wanted::Raw,
            (None, Some(n), _) => Wanted::AtMost(n),
            (None, None, Format::Json) => Wanted::AtMost(DEFAULT_MAX_POINTS),
            (None, None, Format::Csv) => Wanted::Raw,
        };
        Ok(Request {
            metrics,
            many,
            from,
            to,
            wanted,
            agg,
            format,
            limit,
        })
    }
}

/// The metrics of `metrics=a,b`: at least one, at most [`MAX_METRICS`], none empty, none
/// twice.
fn metric_list(list: &str) -> Result<Vec<String>, ApiError> {
    let metrics: Vec<String> = list.split(',').map(str::to_owned).collect();
    if metrics.iter().any(String::is_empty) {
        return Err(ApiError::InvalidQuery(format!(
            "metrics: expected comma-separated metric names, none empty, found {list:?}"
        )));
    }
    if metrics.len() > MAX_METRICS {
        return Err(ApiError::InvalidQuery(format!(
            "metrics: at most {MAX_METRICS} metrics per request, found {}",
            metrics.len()
        )));
    }
    let mut seen = HashSet::new();
    if let Some(twice) = metrics.iter().find(|m| !seen.insert(m.as_str())) {
        return Err(ApiError::InvalidQuery(format!(
            "metrics: {twice:?} is named twice"
        )));
    }
    Ok(metrics)
}

/// How one series will be answered, and its raw points when planning already read them all.
fn plan_series(
    store: &dyn TelemetryStore,
    device: &DeviceId,
    metric: &str,
    r: &Request,
) -> Result<(Shape, Option<read::Points>), StoreError> {
    match r.wanted {
        Wanted::Step(step) => Ok((Shape::Buckets { step, agg: r.agg }, None)),
        Wanted::Raw => Ok((Shape::Raw, None)),
        Wanted::AtMost(max_points) => {
            // Reading at most max_points + 1 points tells whether the range holds more than
            // max_points as surely as counting them, at a bounded cost, and gives the answer
            // when it does not.
            let points = store.range(device, metric, r.from, r.to, max_points + 1)?;
            let resolutions = store.resolutions();
            if points.len() > max_points {
                let step = plan::auto_step(r.from, r.to, max_points, resolutions);
                return Ok((Shape::Buckets { step, agg: r.agg }, None));
            }
            // Few raw points may mean that the others expired while their rollups live on.
            for step in plan::rollup_steps(r.from, r.to, max_points, resolutions) {
                let buckets = store.buckets(device, metric, r.from, r.to, step)?;
                match plan::numbers_inside(&points, &buckets, step, (r.from, r.to)) {
                    (rolled, raw) if rolled > raw => {
                        return Ok((Shape::Buckets { step, agg: r.agg }, None))
                    }
                    // The raw points hold what this rollup knows: they are whole.
                    (rolled, raw) if rolled > 0 || raw > 0 => break,
                    // Nothing here at this width (a finer rollup may have expired too).
                    _ => continue,
                }
            }
            Ok((Shape::Raw, Some(points)))
        }
    }
}

/// One JSON page of one series.
fn series_page(
    store: &dyn TelemetryStore,
    device: &DeviceId,
    metric: String,
    r: &Request,
) -> Result<Series, StoreError> {
    let range = (r.from, r.to);
    let (shape, prefetched) = plan_series(store, device, &metric, r)?;
    let (points, next) = match (shape, prefetched) {
        (Shape::Raw, Some(points)) => read::cut(points, r.limit),
        (Shape::Raw, None) => read::raw_page(store, device, &metric, range, r.limit)?,
        (Shape::Buckets { step, agg }, _) => {
            read::bucket_page(store, device, &metric, range, (step, agg), r.limit)?
        }
    };
    let (step, agg) = match shape {
        Shape::Raw => (None, None),
        Shape::Buckets { step, agg } => (Some(step), Some(agg)),
    };
    Ok(Series {
        metric,
        points,
        next,
        step,
        agg,
    })
}

/// Read a device's telemetry.
///
/// One metric (`metric=`) or several (`metrics=a,b`) over `from`..`to`, raw or in buckets
/// (`step=1m&agg=max`, or planned within `max_points`), as JSON pages (each series with its
/// own `next`) or `format=csv` streamed whole.
#[utoipa::path(
    get,
    path = "/devices/{id}/telemetry",
    operation_id = "read_telemetry",
    tag = "telemetry",
    params(("id" = DeviceId, Path, description = "The device's id"), RangeQuery),
    responses(
        (status = 200, description = "The series: JSON, or CSV with `format=csv`", content(
            (TelemetryAnswer = "application/json"),
            (String = "text/csv"),
        )),
        (status = 400, description = "Not a valid device id (`invalid_device_id`) or parameter (`invalid_query`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such device (`device_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
        (status = 503, response = doc::StoreUnavailable),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn range(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
    extract::Query(q): extract::Query<RangeQuery>,
) -> Result<Response, ApiError> {
    let device = DeviceId::parse(&id)?;
    let r = q.validate(now_ms())?;
    let (registry, store) = (state.registry.clone(), state.store.clone());
    match r.format {
        Format::Json => {
            let (device, r, mut series) = blocking(move || {
                if registry.device(&device)?.is_none() {
                    return Err(ApiError::DeviceNotFound(device));
                }
                let series = r
                    .metrics
                    .iter()
                    .map(|m| series_page(store.as_ref(), &device, m.clone(), &r))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((device, r, series))
            })
            .await?;
            let answer = if r.many {
                let (from, to) = (r.from, r.to);
                TelemetryAnswer::Many(SeriesAnswer {
                    device,
                    from,
                    to,
                    series,
                })
            } else {
                let series = series
                    .pop()
                    .ok_or_else(|| ApiError::internal("no series"))?;
                TelemetryAnswer::One(RangeAnswer { device, series })
            };
            Ok(Json(answer).into_response())
        }
        Format::Csv => {
            let planner = store.clone();
            let (device, r, series) = blocking(move || {
                if registry.device(&device)?.is_none() {
                    return Err(ApiError::DeviceNotFound(device));
                }
                let mut series = Vec::with_capacity(r.metrics.len());
                for metric in &r.metrics {
                    let (shape, prefetched) = plan_series(planner.as_ref(), &device, metric, &r)?;
                    series.push(csv::Series {
                        metric: metric.clone(),
                        shape,
                        prefetched,
                    });
                }
                Ok((device, r, series))
            })
            .await?;
            Ok(csv::response(store, device, series, (r.from, r.to)))
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LatestPoint {
    #[schema(value_type = i64)]
    pub ts: TimestampMs,
    #[schema(value_type = MetricValue)]
    pub value: Value,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LatestAnswer {
    pub device: DeviceId,
    pub metrics: BTreeMap<String, LatestPoint>,
}

/// Read a device's newest values.
///
/// The newest point of every metric of the device.
#[utoipa::path(
    get,
    path = "/devices/{id}/latest",
    operation_id = "latest_telemetry",
    tag = "telemetry",
    params(("id" = DeviceId, Path, description = "The device's id")),
    responses(
        (status = 200, description = "Each metric's newest point", body = LatestAnswer),
        (status = 400, description = "Not a valid device id (`invalid_device_id`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such device (`device_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
        (status = 503, response = doc::StoreUnavailable),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn latest(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
) -> Result<Json<LatestAnswer>, ApiError> {
    let device = DeviceId::parse(&id)?;
    let (registry, store) = (state.registry.clone(), state.store.clone());
    let (device, rows) = blocking(move || {
        if registry.device(&device)?.is_none() {
            return Err(ApiError::DeviceNotFound(device));
        }
        let rows = store.latest(&device)?;
        Ok((device, rows))
    })
    .await?;
    let metrics = rows
        .into_iter()
        .map(|(metric, ts, value)| (metric, LatestPoint { ts, value }))
        .collect();
    Ok(Json(LatestAnswer { device, metrics }))
}
