//! Choosing how a series is answered: its raw points, or buckets of a step.
//!
//! A request names a `step`, or leaves it to [`auto_step`]: when the range holds more than
//! `max_points` raw points, the answer is aggregated with the smallest step that gives at
//! most `max_points` buckets, a multiple of the coarsest rollup resolution of the store
//! ([`tellus_ingest::TelemetryStore::resolutions`]) that still gives at least `max_points`
//! buckets, so that the store answers from that rollup: a year is answered from hourly
//! rollups, a day from minute ones. Without a resolution that fits, the step is a number of
//! milliseconds and the store aggregates raw points.
//!
//! A store keeps raw points for less time than its rollups (the embedded store: raw points
//! for 30 days, minute rollups for a year, hourly ones for ever), so a range that holds few
//! raw points may hold them only because the others expired. When the raw points fit,
//! [`rollup_steps`] gives the steps at which to ask the rollups whether they hold numbers
//! the raw points lack ([`numbers_inside`]); if they do, the answer comes from them.
//!
//! Buckets are aligned to multiples of their step since the Unix epoch; a range is widened
//! to whole buckets. Everything here is arithmetic, with no I/O.

use std::time::Duration;

use serde::de::{value::StrDeserializer, IntoDeserializer};
use serde::Deserialize;
use tellus_core::{TimestampMs, Value};
use tellus_ingest::{Agg, Bucket};

use crate::ApiError;

/// The widest step a request may name: 100 years of 365 days. With the query range inside
/// years 0000–9999 this keeps every bucket boundary far from `i64` overflow.
pub const MAX_STEP_MS: i64 = 100 * 365 * 86_400_000;

/// How one series is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// The raw points, each with its own timestamp and the type the device sent.
    Raw,
    /// One `agg` value per bucket of `step` ms that holds a number.
    Buckets { step: i64, agg: Agg },
}

/// Parses `step`: a plain number of milliseconds, or a humantime duration (`30s`, `1m`,
/// `1h`, `1d`). It must be a whole, positive number of milliseconds, at most
/// [`MAX_STEP_MS`].
pub fn parse_step(s: &str) -> Result<i64, ApiError> {
    let ms = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<u128>().unwrap_or(u128::MAX)
    } else {
        let d = crate::timestamps::duration("step", s, "30s, 1m, 1h, 1d or 60000 (ms)")?;
        if d.subsec_nanos() % 1_000_000 != 0 {
            return Err(ApiError::InvalidQuery(format!(
                "step: must be a whole number of milliseconds, found {s:?}"
            )));
        }
        d.as_millis()
    };
    if ms == 0 {
        return Err(ApiError::InvalidQuery("step must be more than 0".into()));
    }
    match i64::try_from(ms) {
        Ok(ms) if ms <= MAX_STEP_MS => Ok(ms),
        _ => Err(ApiError::InvalidQuery(format!(
            "step: at most {} days, found {s:?}",
            Duration::from_millis(MAX_STEP_MS as u64).as_secs() / 86_400
        ))),
    }
}

/// Parses `agg`, by the names [`Agg`] has on the wire.
pub fn parse_agg(s: &str) -> Result<Agg, ApiError> {
    let de: StrDeserializer<'_, serde::de::value::Error> = s.into_deserializer();
    Agg::deserialize(de).map_err(|_| {
        ApiError::InvalidQuery(format!(
            "agg: expected one of avg, min, max, sum, count, first, last \
             (or none, for raw points); found {s:?}"
        ))
    })
}

/// The start of the bucket of `step` that holds `ts`.
pub fn bucket_start(ts: TimestampMs, step: i64) -> TimestampMs {
    ts.div_euclid(step) * step
}

/// How many buckets of `step` cover `from..=to` once widened to whole buckets.
pub fn bucket_count(from: TimestampMs, to: TimestampMs, step: i64) -> i64 {
    to.div_euclid(step) - from.div_euclid(step) + 1
}

/// The number of buckets a request may ask for, as an `i64`, and at least 1.
fn max_buckets(max_points: usize) -> i64 {
    i64::try_from(max_points.max(1)).unwrap_or(i64::MAX)
}

/// The milliseconds in `from..=to`.
fn span(from: TimestampMs, to: TimestampMs) -> i64 {
    to.saturating_sub(from).saturating_add(1).max(1)
}

/// The coarsest of `resolutions` that gives at least `max_points` buckets over the range.
fn fitting(
    from: TimestampMs,
    to: TimestampMs,
    max_points: usize,
    resolutions: &[i64],
) -> Option<i64> {
    let max = max_buckets(max_points);
    resolutions
        .iter()
        .copied()
        .filter(|r| *r > 0)
        .filter(|r| span(from, to) / r >= max)
        .max()
}

/// The smallest multiple of `res` whose buckets over `from..=to`, widened to whole buckets,
/// number at most `max_points`: `res × ceil(range / res / max_points)`, one `res` more when
/// the range's ends fall so that widening it would add a bucket too many.
fn smallest_step(from: TimestampMs, to: TimestampMs, max_points: usize, res: i64) -> i64 {
    let max = max_buckets(max_points);
    let per_bucket = res.saturating_mul(max);
    let span = span(from, to);
    let mut k = (span / per_bucket + i64::from(span % per_bucket != 0)).max(1);
    let mut step = res.saturating_mul(k);
    while bucket_count(from, to, step) > max && step < i64::MAX / 2 {
        k += 1;
        step = res.saturating_mul(k);
    }
    step
}

/// The step for a range `from..=to` that holds more than `max_points` raw points: the
/// smallest multiple of the chosen resolution whose buckets over the range number at most
/// `max_points`. The resolution is the coarsest of `resolutions` (rollup widths) that gives
/// at least `max_points` buckets over the range, else 1 ms (the store aggregates raw
/// points).
pub fn auto_step(
    from: TimestampMs,
    to: TimestampMs,
    max_points: usize,
    resolutions: &[i64],
) -> i64 {
    let res = fitting(from, to, max_points, resolutions).unwrap_or(1);
    smallest_step(from, to, max_points, res)
}

/// When the range's raw points fit in `max_points`: the steps, finest first, at which to
/// ask the rollups whether they know numbers the raw points lack. One per rollup
/// resolution, of those at least as coarse as the one [`auto_step`] would choose (a finer
/// one would read more rows for the same buckets); none for a store without rollups.
pub fn rollup_steps(
    from: TimestampMs,
    to: TimestampMs,
    max_points: usize,
    resolutions: &[i64],
) -> Vec<i64> {
    let floor = fitting(from, to, max_points, resolutions).unwrap_or(1);
    let mut res: Vec<i64> = resolutions
        .iter()
        .copied()
        .filter(|r| *r >= floor)
        .collect();
    res.sort_unstable();
    res.dedup();
    res.into_iter()
        .map(|r| smallest_step(from, to, max_points, r))
        .collect()
}

/// The numbers `buckets` of `step` count, and those the raw `points` hold, both only in the
/// buckets that lie wholly inside `from..=to` (a bucket at either end also holds time
/// outside the range, which the raw points were not read for).
pub fn numbers_inside(
    points: &[(TimestampMs, Value)],
    buckets: &[Bucket],
    step: i64,
    (from, to): (TimestampMs, TimestampMs),
) -> (u64, u64) {
    let inside = |start: TimestampMs| start >= from && start.saturating_add(step - 1) <= to;
    let rolled = buckets
        .iter()
        .filter(|b| inside(b.start))
        .map(|b| b.count)
        .sum();
    let raw = points
        .iter()
        .filter(|(ts, v)| !matches!(v, Value::Text(_)) && inside(bucket_start(*ts, step)))
        .count() as u64;
    (rolled, raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000;
    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 86_400_000;

    #[test]
    fn steps_are_milliseconds_or_humantime() {
        assert_eq!(parse_step("1m").unwrap(), MINUTE);
        assert_eq!(parse_step("30s").unwrap(), 30_000);
        assert_eq!(parse_step("1h").unwrap(), HOUR);
        assert_eq!(parse_step("1d").unwrap(), DAY);
        assert_eq!(parse_step("250ms").unwrap(), 250);
        assert_eq!(parse_step("60000").unwrap(), MINUTE);
        for bad in [
            "",
            "0",
            "0s",
            "-1m",
            "1.5",
            "fortnight",
            "1500us",
            "101years",
            "99999999999999999",
        ] {
            assert!(
                matches!(parse_step(bad), Err(ApiError::InvalidQuery(_))),
                "{bad}"
            );
        }
        assert_eq!(parse_step(&MAX_STEP_MS.to_string()).unwrap(), MAX_STEP_MS);
    }

    #[test]
    fn aggs_have_their_wire_names() {
        assert_eq!(parse_agg("avg").unwrap(), Agg::Avg);
        assert_eq!(parse_agg("last").unwrap(), Agg::Last);
        for bad in ["", "AVG", "median", "avg "] {
            assert!(parse_agg(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn buckets_are_aligned_to_the_epoch() {
        assert_eq!(bucket_start(59_999, MINUTE), 0);
        assert_eq!(bucket_start(60_000, MINUTE), MINUTE);
        assert_eq!(bucket_start(-1, MINUTE), -MINUTE);
        assert_eq!(bucket_count(0, MINUTE - 1, MINUTE), 1);
        assert_eq!(bucket_count(30_000, 90_000, MINUTE), 2);
    }

    #[test]
    fn the_coarsest_rollup_that_still_gives_enough_buckets_is_chosen() {
        let rollups = [HOUR, MINUTE];
        // A year: from hourly rollups, 9 h per bucket (8760 / 1000 rounded up).
        let year = 365 * DAY;
        assert_eq!(auto_step(0, year - 1, 1000, &rollups), 9 * HOUR);
        // A day has 24 hours, too few: from minute rollups, 2 minutes per bucket.
        assert_eq!(auto_step(0, DAY - 1, 1000, &rollups), 2 * MINUTE);
        // Exactly max_points hours: one hour per bucket.
        assert_eq!(auto_step(0, 1000 * HOUR - 1, 1000, &rollups), HOUR);
        // Ten minutes hold too few minutes for 1000 points: raw, 600 ms per bucket.
        assert_eq!(auto_step(0, 10 * MINUTE - 1, 1000, &rollups), 600);
        // A store without rollups: always raw.
        assert_eq!(auto_step(0, DAY - 1, 1000, &[]), 86_400);
    }

    #[test]
    fn rollups_are_asked_at_their_own_steps_finest_first() {
        let rollups = [HOUR, MINUTE];
        // Ten hours: 600 minutes give fewer than 1000 buckets, so both rollups are asked,
        // each at its own width.
        assert_eq!(
            rollup_steps(0, 10 * HOUR - 1, 1000, &rollups),
            [MINUTE, HOUR]
        );
        // A year: auto_step would use hours, and so does the check.
        assert_eq!(rollup_steps(0, 365 * DAY - 1, 1000, &rollups), [9 * HOUR]);
        // A week: minutes at auto_step's step, then hours.
        assert_eq!(
            rollup_steps(0, 7 * DAY - 1, 1000, &rollups),
            [11 * MINUTE, HOUR]
        );
        assert!(rollup_steps(0, DAY, 1000, &[]).is_empty());
    }

    #[test]
    fn only_buckets_wholly_inside_the_range_are_compared() {
        let bucket = |start, count| Bucket {
            count,
            ..Bucket::of(start, 1.0)
        };
        let points = vec![
            (MINUTE + 5, Value::Int(1)),
            (MINUTE + 6, Value::Text("x".into())),
            (2 * MINUTE + 1, Value::Bool(true)),
        ];
        // The range starts mid-minute 0 and ends mid-minute 3: minutes 1 and 2 are inside.
        let range = (30_000, 3 * MINUTE + 30_000);
        let buckets = [
            bucket(0, 7),
            bucket(MINUTE, 1),
            bucket(2 * MINUTE, 1),
            bucket(3 * MINUTE, 9),
        ];
        assert_eq!(numbers_inside(&points, &buckets, MINUTE, range), (2, 2));
        // Rollups that know a number the raw points lack.
        let buckets = [bucket(MINUTE, 1), bucket(2 * MINUTE, 4)];
        assert_eq!(numbers_inside(&points, &buckets, MINUTE, range), (5, 2));
        assert_eq!(numbers_inside(&[], &buckets, MINUTE, range), (5, 0));
    }

    #[test]
    fn widening_to_whole_buckets_never_gives_more_than_max_points() {
        let rollups = [HOUR, MINUTE];
        for (from, to, max) in [
            (30 * MINUTE, 30 * MINUTE + 1000 * HOUR - 1, 1000),
            (1, DAY, 1000),
            (12_345, 12_345 + 7 * DAY, 500),
            (-DAY - 17, DAY + 17, 10),
            (0, 5, 3),
        ] {
            let step = auto_step(from, to, max, &rollups);
            assert!(
                bucket_count(from, to, step) <= max as i64,
                "{from}..{to} by {step}"
            );
            // And the next smaller multiple of the resolution would give too many.
            let res = [HOUR, MINUTE]
                .into_iter()
                .find(|r| (to - from + 1) / r >= max as i64)
                .unwrap_or(1);
            if step > res {
                assert!(bucket_count(from, to, step - res) > max as i64);
            }
        }
    }
}
