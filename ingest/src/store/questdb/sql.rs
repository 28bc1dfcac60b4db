//! Queries of the QuestDB store: the [`TelemetryStore`](crate::TelemetryStore) reads as
//! QuestDB SQL, sent to its HTTP endpoint (`GET /exec?query=…`), and its JSON answers read
//! back into points and buckets.
//!
//! Every value in the SQL text is a literal: timestamps are written as UTC ISO strings, so
//! QuestDB narrows a scan to the partitions of the range, and strings are quoted with their
//! quotes doubled (QuestDB's `/exec` has no bind variables).

use std::time::Duration;

use serde::Deserialize;
use tellus_core::{DeviceId, TimestampMs, Value};

use super::layout;
use crate::store::{Bucket, StoreError};

/// Most bytes of one answer read; a larger one is an error, not a partial answer.
const MAX_ANSWER_BYTES: u64 = 256 << 20;

/// QuestDB's SQL over HTTP.
pub(super) struct SqlClient {
    agent: ureq::Agent,
    exec_url: String,
    /// The `Authorization` header, from the same credentials as the line protocol.
    auth: Option<String>,
}

/// The JSON answer of `/exec` to a query.
#[derive(Debug, Deserialize)]
struct Answer {
    #[serde(default)]
    dataset: Vec<Vec<serde_json::Value>>,
}

/// The JSON answer of `/exec` to a failed query.
#[derive(Debug, Deserialize)]
struct Failure {
    error: String,
}

impl SqlClient {
    pub fn new(base_url: &str, auth: Option<String>, timeout: Duration) -> SqlClient {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        SqlClient {
            agent,
            exec_url: format!("{}/exec", base_url.trim_end_matches('/')),
            auth,
        }
    }

    /// Runs `sql`; the rows of its answer.
    pub fn exec(&self, sql: &str) -> Result<Vec<Vec<serde_json::Value>>, StoreError> {
        let mut request = self.agent.get(&self.exec_url).query("query", sql);
        if let Some(auth) = &self.auth {
            request = request.header("Authorization", auth);
        }
        let unavailable = |e: &dyn std::fmt::Display| StoreError::Unavailable(e.to_string());
        let response = request.call().map_err(|e| unavailable(&e))?;
        let status = response.status();
        let body = response
            .into_body()
            .into_with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_string()
            .map_err(|e| unavailable(&e))?;
        if !status.is_success() {
            let why = serde_json::from_str::<Failure>(&body)
                .map(|f| f.error)
                .unwrap_or_else(|_| body.chars().take(200).collect());
            let why = format!("QuestDB answered {status}: {why}");
            // A query QuestDB cannot run (a table missing, say) stays so: not "try again".
            return Err(if status.is_client_error() && status.as_u16() != 401 {
                StoreError::Query(why)
            } else {
                StoreError::Unavailable(why)
            });
        }
        let answer: Answer = serde_json::from_str(&body)
            .map_err(|e| unavailable(&format!("QuestDB's answer is not JSON rows: {e}")))?;
        Ok(answer.dataset)
    }
}

/// `s` as an SQL string literal.
pub(super) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `ms` as a UTC timestamp literal, clamped to years 0001..=9999.
pub(super) fn at(ms: TimestampMs) -> String {
    const MIN: TimestampMs = -62_135_596_800_000; // 0001-01-01
    const MAX: TimestampMs = 253_402_300_799_999; // 9999-12-31T23:59:59.999
    let ms = ms.clamp(MIN, MAX);
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "'{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z'",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// A `SAMPLE BY` width: the largest unit that divides `step` ms.
pub(super) fn sample_by(step: i64) -> String {
    const UNITS: [(i64, char); 4] = [
        (86_400_000, 'd'),
        (3_600_000, 'h'),
        (60_000, 'm'),
        (1_000, 's'),
    ];
    UNITS
        .iter()
        .find(|(ms, _)| step % ms == 0)
        .map(|(ms, unit)| format!("{}{unit}", step / ms))
        .unwrap_or_else(|| format!("{step}T"))
}

/// The columns a point is read from, in this order: kind, value, int_value, text_value.
const VALUE_COLUMNS: &str = "kind, value, int_value, text_value";

pub(super) fn range_sql(
    table: &str,
    device: &DeviceId,
    metric: &str,
    from: TimestampMs,
    to: TimestampMs,
    limit: usize,
) -> String {
    format!(
        "SELECT ts, {VALUE_COLUMNS} FROM \"{table}\" \
         WHERE device = {} AND metric = {} AND ts >= {} AND ts <= {} \
         ORDER BY ts LIMIT {limit}",
        quote(device.as_str()),
        quote(metric),
        at(from),
        at(to),
    )
}

/// Buckets of `step` ms aligned to the epoch: `FROM` is a multiple of the step, and
/// `SAMPLE BY … FROM` aligns the buckets to it. Text values are left out.
pub(super) fn buckets_sql(
    table: &str,
    device: &DeviceId,
    metric: &str,
    from: TimestampMs,
    to: TimestampMs,
    step: i64,
) -> String {
    let step = step.max(1);
    let start = from.div_euclid(step) * step;
    let end = to.div_euclid(step).saturating_add(1).saturating_mul(step);
    format!(
        "SELECT ts, count(value), sum(value), min(value), max(value), first(value), last(value) \
         FROM \"{table}\" \
         WHERE device = {} AND metric = {} AND kind != 'text' AND ts >= {} AND ts < {} \
         SAMPLE BY {} FROM {} TO {}",
        quote(device.as_str()),
        quote(metric),
        at(start),
        at(end),
        sample_by(step),
        at(start),
        at(end),
    )
}

pub(super) fn latest_sql(table: &str, device: &DeviceId) -> String {
    format!(
        "SELECT metric, ts, {VALUE_COLUMNS} FROM \"{table}\" WHERE device = {} \
         LATEST ON ts PARTITION BY metric",
        quote(device.as_str())
    )
}

pub(super) fn latest_of_metric_sql(table: &str, metric: &str) -> String {
    format!(
        "SELECT device, ts, {VALUE_COLUMNS} FROM \"{table}\" WHERE metric = {} \
         LATEST ON ts PARTITION BY device",
        quote(metric)
    )
}

fn bad(what: &str, row: &[serde_json::Value]) -> StoreError {
    StoreError::Unavailable(format!("QuestDB answered an unexpected {what} in {row:?}"))
}

/// A timestamp as QuestDB's JSON writes it (`2024-01-02T03:04:05.678901Z`), in ms.
pub(super) fn timestamp(v: &serde_json::Value) -> Option<TimestampMs> {
    let text = v.as_str()?;
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).ok()
}

/// A point from `kind, value, int_value, text_value`.
fn value(row: &[serde_json::Value]) -> Option<Value> {
    let [kind, number, int, text] = row else {
        return None;
    };
    Some(match layout::Kind::parse(kind.as_str()?)? {
        layout::Kind::Bool => Value::Bool(number.as_f64()? != 0.0),
        layout::Kind::Int => Value::Int(int.as_i64()?),
        layout::Kind::Float => Value::Float(number.as_f64()?),
        layout::Kind::Text => Value::Text(text.as_str()?.to_owned()),
    })
}

/// Rows of `ts, kind, value, int_value, text_value`.
pub(super) fn points(
    rows: Vec<Vec<serde_json::Value>>,
) -> Result<Vec<(TimestampMs, Value)>, StoreError> {
    rows.iter()
        .map(|row| match row.split_first() {
            Some((ts, rest)) => Ok((
                timestamp(ts).ok_or_else(|| bad("timestamp", row))?,
                value(rest).ok_or_else(|| bad("value", row))?,
            )),
            None => Err(bad("row", row)),
        })
        .collect()
}

/// Rows of `key, ts, kind, value, int_value, text_value`.
pub(super) fn keyed_points(
    rows: Vec<Vec<serde_json::Value>>,
) -> Result<Vec<(String, TimestampMs, Value)>, StoreError> {
    rows.iter()
        .map(|row| match row.split_first() {
            Some((key, rest)) => {
                let key = key.as_str().ok_or_else(|| bad("key", row))?.to_owned();
                let (ts, value) = match rest.split_first() {
                    Some((ts, rest)) => (
                        timestamp(ts).ok_or_else(|| bad("timestamp", row))?,
                        value(rest).ok_or_else(|| bad("value", row))?,
                    ),
                    None => return Err(bad("row", row)),
                };
                Ok((key, ts, value))
            }
            None => Err(bad("row", row)),
        })
        .collect()
}

/// Rows of `ts, count, sum, min, max, first, last`; rows without a count are left out.
pub(super) fn buckets(rows: Vec<Vec<serde_json::Value>>) -> Result<Vec<Bucket>, StoreError> {
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let [ts, count, sum, min, max, first, last] = row.as_slice() else {
            return Err(bad("row", row));
        };
        let start = timestamp(ts).ok_or_else(|| bad("timestamp", row))?;
        let count = count.as_u64().ok_or_else(|| bad("count", row))?;
        if count == 0 {
            continue;
        }
        let number = |v: &serde_json::Value| v.as_f64().ok_or_else(|| bad("number", row));
        out.push(Bucket {
            start,
            count,
            sum: number(sum)?,
            min: number(min)?,
            max: number(max)?,
            first: number(first)?,
            last: number(last)?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn literals_are_quoted_and_times_are_utc() {
        assert_eq!(quote("it's"), "'it''s'");
        assert_eq!(at(0), "'1970-01-01T00:00:00.000Z'");
        assert_eq!(at(1_700_000_000_123), "'2023-11-14T22:13:20.123Z'");
        assert_eq!(at(i64::MAX), "'9999-12-31T23:59:59.999Z'");
        assert_eq!(at(i64::MIN), "'0001-01-01T00:00:00.000Z'");
        assert_eq!(
            timestamp(&json!("2023-11-14T22:13:20.123456Z")),
            Some(1_700_000_000_123)
        );
        assert_eq!(timestamp(&json!(5)), None);
    }

    #[test]
    fn steps_use_the_largest_unit_that_divides_them() {
        assert_eq!(sample_by(60_000), "1m");
        assert_eq!(sample_by(86_400_000 * 7), "7d");
        assert_eq!(sample_by(90_000), "90s");
        assert_eq!(sample_by(1_500), "1500T");
        assert_eq!(sample_by(7_200_000), "2h");
    }

    #[test]
    fn bucket_queries_align_to_the_step_from_the_epoch() {
        let d = DeviceId::parse("d1").unwrap();
        let sql = buckets_sql("telemetry", &d, "t", 90_000, 150_000, 60_000);
        assert!(
            sql.ends_with(
                "SAMPLE BY 1m FROM '1970-01-01T00:01:00.000Z' TO '1970-01-01T00:03:00.000Z'"
            ),
            "{sql}"
        );
        assert!(sql.contains("device = 'd1' AND metric = 't' AND kind != 'text'"));
    }

    #[test]
    fn answers_become_typed_points_and_buckets() {
        let rows = vec![
            vec![
                json!("1970-01-01T00:00:01.000000Z"),
                json!("float"),
                json!(1.5),
                json!(null),
                json!(null),
            ],
            vec![
                json!("1970-01-01T00:00:02.000000Z"),
                json!("int"),
                json!(7.0),
                json!(7),
                json!(null),
            ],
            vec![
                json!("1970-01-01T00:00:03.000000Z"),
                json!("bool"),
                json!(1.0),
                json!(null),
                json!(null),
            ],
            vec![
                json!("1970-01-01T00:00:04.000000Z"),
                json!("text"),
                json!(null),
                json!(null),
                json!("open"),
            ],
        ];
        assert_eq!(
            points(rows).unwrap(),
            vec![
                (1_000, Value::Float(1.5)),
                (2_000, Value::Int(7)),
                (3_000, Value::Bool(true)),
                (4_000, Value::Text("open".into())),
            ]
        );
        // A value of a kind it does not know is an error, not a guess.
        let odd = vec![vec![
            json!("1970-01-01T00:00:01Z"),
            json!("blob"),
            json!(1.0),
            json!(null),
            json!(null),
        ]];
        assert!(points(odd).is_err());
        let rows = vec![vec![
            json!("1970-01-01T00:01:00.000000Z"),
            json!(2),
            json!(3.0),
            json!(1.0),
            json!(2.0),
            json!(1.0),
            json!(2.0),
        ]];
        assert_eq!(
            buckets(rows).unwrap(),
            vec![Bucket {
                start: 60_000,
                count: 2,
                sum: 3.0,
                min: 1.0,
                max: 2.0,
                first: 1.0,
                last: 2.0
            }]
        );
    }
}
