//! Telemetry of one device: a metric over a time range, and the newest value of each metric.
//!
//! Values keep the type the device sent (number, boolean or string). A range is
//! `from <= ts <= to`, both given as epoch milliseconds or RFC 3339; by default the last hour.
//! Points come in time order; when a page is full, `next` is the `from` of the next page.

use std::collections::BTreeMap;

use axum::{extract::State, Json};
use serde::{Deserialize, Serialize};
use tellus_core::{now_ms, DeviceId, TimestampMs, Value};

use super::{blocking, page_limit, split_page};
use crate::{extract, timestamps, ApiError, AppState};

const DEFAULT_LIMIT: usize = 10_000;
const MAX_LIMIT: usize = 100_000;
const DEFAULT_SPAN_MS: TimestampMs = 3_600_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeQuery {
    pub metric: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct RangeAnswer {
    pub device: DeviceId,
    pub metric: String,
    /// `[ts_ms, value]` pairs.
    pub points: Vec<(TimestampMs, Value)>,
    pub next: Option<TimestampMs>,
}

/// `GET /api/v1/devices/{id}/telemetry?metric=&from=&to=&limit=`
pub async fn range(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
    extract::Query(q): extract::Query<RangeQuery>,
) -> Result<Json<RangeAnswer>, ApiError> {
    let device = DeviceId::parse(&id)?;
    let metric = match q.metric {
        Some(m) if !m.is_empty() => m,
        Some(_) => return Err(ApiError::InvalidQuery("metric must not be empty".into())),
        None => {
            return Err(ApiError::InvalidQuery(
                "the metric parameter is required, e.g. ?metric=temperature".into(),
            ))
        }
    };
    let to = match q.to.as_deref() {
        Some(s) => timestamps::parse("to", s)?,
        None => now_ms(),
    };
    let from = match q.from.as_deref() {
        Some(s) => timestamps::parse("from", s)?,
        None => to.saturating_sub(DEFAULT_SPAN_MS),
    };
    if from > to {
        return Err(ApiError::InvalidQuery(format!(
            "from ({from}) is after to ({to})"
        )));
    }
    let limit = page_limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;

    let (registry, store) = (state.registry.clone(), state.store.clone());
    let (device, metric, rows) = blocking(move || {
        if registry.device(&device)?.is_none() {
            return Err(ApiError::DeviceNotFound(device));
        }
        let rows = store.range(&device, &metric, from, to, limit + 1)?;
        Ok((device, metric, rows))
    })
    .await?;
    let (points, more) = split_page(rows, limit);
    // Timestamps are unique within a series, so the next page starts just after this one.
    let next = if more {
        points.last().map(|(ts, _)| ts.saturating_add(1))
    } else {
        None
    };
    Ok(Json(RangeAnswer {
        device,
        metric,
        points,
        next,
    }))
}

#[derive(Debug, Serialize)]
pub struct LatestPoint {
    pub ts: TimestampMs,
    pub value: Value,
}

#[derive(Debug, Serialize)]
pub struct LatestAnswer {
    pub device: DeviceId,
    pub metrics: BTreeMap<String, LatestPoint>,
}

/// `GET /api/v1/devices/{id}/latest`: the newest point of every metric of the device.
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
