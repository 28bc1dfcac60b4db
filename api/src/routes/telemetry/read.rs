//! Reading one series from the store a bounded piece at a time, for JSON pages and for the
//! CSV stream alike. These calls block; callers run them on the blocking pool.
//!
//! Raw points are read `limit` at a time from a cursor just after the last point read
//! (timestamps are unique within a series). Buckets are read in windows of a fixed number of
//! bucket widths, so that however sparse or dense the series, one call returns at most that
//! many buckets: a window of buckets that holds no number returns none.

use tellus_core::{DeviceId, TimestampMs, Value};
use tellus_ingest::{Agg, StoreError, TelemetryStore};

use super::plan::bucket_start;

/// At most this many bucket windows are read for one JSON page; a page of a sparse series
/// may hold fewer than `limit` buckets, and then `next` says where to go on.
const MAX_WINDOWS_PER_PAGE: usize = 16;

/// `[ts, value]` points: raw, or `[bucket_start, value]`.
pub type Points = Vec<(TimestampMs, Value)>;

/// One page of a series: its points and the `from` of the next page, if the range goes on.
pub type Page = (Points, Option<TimestampMs>);

/// Raw points of `from..=to`, at most `limit`; `next` is just after the last one.
pub fn raw_page(
    store: &dyn TelemetryStore,
    device: &DeviceId,
    metric: &str,
    (from, to): (TimestampMs, TimestampMs),
    limit: usize,
) -> Result<Page, StoreError> {
    let points = store.range(device, metric, from, to, limit.saturating_add(1))?;
    Ok(cut(points, limit))
}

/// The first `limit` of `points` (time-ordered raw points), and the cursor after them when
/// more follow.
pub fn cut(mut points: Points, limit: usize) -> Page {
    let more = points.len() > limit;
    points.truncate(limit);
    let next = if more {
        points.last().map(|(ts, _)| ts.saturating_add(1))
    } else {
        None
    };
    (points, next)
}

/// Buckets of `step` over `from..=to` (widened to whole buckets), summarised by `agg`: at
/// most `limit` of them, and the start of the bucket to go on from when the range goes on.
/// Windows of `limit + 1` buckets are read until the page is full, the range ends, or
/// [`MAX_WINDOWS_PER_PAGE`] windows were read, so at most `2 × (limit + 1)` buckets are held.
pub fn bucket_page(
    store: &dyn TelemetryStore,
    device: &DeviceId,
    metric: &str,
    (from, to): (TimestampMs, TimestampMs),
    (step, agg): (i64, Agg),
    limit: usize,
) -> Result<Page, StoreError> {
    let window = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
    let mut cursor = bucket_start(from, step);
    let mut buckets = Vec::new();
    for _ in 0..MAX_WINDOWS_PER_PAGE {
        let end = window_end(cursor, step, window, to);
        buckets.extend(store.buckets(device, metric, cursor, end, step)?);
        if buckets.len() > limit {
            buckets.truncate(limit);
            let next = buckets.last().map(|b| b.start.saturating_add(step));
            return Ok((points(&buckets, agg), next));
        }
        if end >= to {
            return Ok((points(&buckets, agg), None));
        }
        cursor = end + 1;
    }
    Ok((points(&buckets, agg), Some(cursor)))
}

/// The last millisecond of a window of `widths` buckets of `step` starting at `cursor` (a
/// bucket start), or `to` if that comes first.
pub fn window_end(cursor: TimestampMs, step: i64, widths: i64, to: TimestampMs) -> TimestampMs {
    cursor
        .saturating_add(step.saturating_mul(widths))
        .saturating_sub(1)
        .min(to)
}

/// Buckets as `[start, value]` points.
pub fn points(buckets: &[tellus_ingest::Bucket], agg: Agg) -> Points {
    buckets.iter().map(|b| (b.start, b.get(agg))).collect()
}
