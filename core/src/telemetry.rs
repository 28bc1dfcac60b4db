//! The telemetry model and the payload decoders, JSON and protobuf.
//!
//! A message decodes into [`Sample`]s: one metric, one timestamp, one typed [`Value`].
//! The protobuf form is `TelemetryBatch` (`proto/telemetry.proto`, types in [`proto`]) on
//! `telemetry/pb`; see [`decode_protobuf`]. The JSON forms (ARCHITECTURE.md):
//! - `{"temperature": 21.5, "door": "open"}`: values stamped with the server's receive time
//!   (each such object of a message with its own millisecond, from the caller's clock);
//! - `{"ts": 1732780800123, "values": {…}}`: values stamped with the device's time in ms;
//! - an array of either;
//! - nested objects flattened with dots: `{"env": {"t": 1}}` is metric `env.t`.
//!
//! Decoding is all or nothing: a message with one bad part is refused whole, with a
//! [`DecodeError`] that says which part, so it can be dead-lettered with its reason.

use std::collections::HashSet;

use prost::Message;
use serde_json::{Map, Value as Json};

use crate::TimestampMs;

/// The protobuf telemetry schema (`proto/telemetry.proto`, package `tellus.v1`), compiled by
/// prost.
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/tellus.v1.rs"));
}

/// The longest metric name accepted (after flattening).
pub const MAX_METRIC_LEN: usize = 255;

/// A metric value; the type a device sent is kept.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

/// The schema of a value in the HTTP API's description, named `MetricValue`: the type the
/// device sent (a boolean, a whole number, a number, a text), or `null` for an aggregate
/// that is no finite number (a sum that overflowed).
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Value {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::{schema::AnyOfBuilder, ObjectBuilder, Type};
        let of = |t: Type| ObjectBuilder::new().schema_type(t);
        AnyOfBuilder::new()
            .item(of(Type::Boolean))
            .item(
                of(Type::Integer).format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                    utoipa::openapi::KnownFormat::Int64,
                ))),
            )
            .item(of(Type::Number))
            .item(of(Type::String))
            .item(of(Type::Null))
            .description(Some(
                "A metric's value, of the type the device sent; null for an aggregate that is \
                 not a finite number",
            ))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Value {
    fn name() -> std::borrow::Cow<'static, str> {
        "MetricValue".into()
    }
}

/// [`Value`] under the name its schema has, for `#[schema(value_type = …)]`: utoipa takes
/// any type named `Value` for `serde_json::Value`.
#[cfg(feature = "openapi")]
pub type MetricValue = Value;

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<f32> for Value {
    fn from(v: f32) -> Self {
        Value::Float(v.into())
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Int(v.into())
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(v.into())
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}

/// One metric value at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub metric: String,
    pub ts_ms: TimestampMs,
    pub value: Value,
}

/// Why a payload is not valid telemetry. The text is stored beside the dead-lettered payload.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    #[error("expected a JSON object or an array of objects, found {0}")]
    NotAnObject(&'static str),
    #[error("message, or a part of it, has no metrics")]
    Empty,
    #[error("\"ts\" must be an integer number of milliseconds since the Unix epoch, found {0}")]
    BadTimestamp(String),
    #[error("an object with \"ts\" must carry its metrics in a \"values\" object")]
    TsWithoutValues,
    #[error("unexpected key {0:?} beside \"ts\" and \"values\"")]
    UnexpectedKey(String),
    #[error("metric {0:?} has a {1} value; values are numbers, booleans or strings")]
    BadValue(String, &'static str),
    #[error("metric name {0:?} is empty or longer than {MAX_METRIC_LEN} characters")]
    BadMetricName(String),
    #[error("payload is not a protobuf TelemetryBatch: {0}")]
    NotProtobuf(String),
    #[error("\"ts_ms\" of metric {0:?} is negative: {1}")]
    NegativeTimestamp(String, i64),
    #[error("metric {0:?} appears twice at {1} ms in one message")]
    Repeated(String, TimestampMs),
}

impl DecodeError {
    /// A short name of the error's kind, for counting rejections by reason.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::NotJson(_) => "not_json",
            DecodeError::NotAnObject(_) => "not_an_object",
            DecodeError::Empty => "empty",
            DecodeError::BadTimestamp(_) | DecodeError::NegativeTimestamp(..) => "bad_timestamp",
            DecodeError::TsWithoutValues | DecodeError::UnexpectedKey(_) => "bad_structure",
            DecodeError::BadValue(..) => "bad_value",
            DecodeError::BadMetricName(_) => "bad_metric_name",
            DecodeError::NotProtobuf(_) => "not_protobuf",
            DecodeError::Repeated(..) => "repeated_point",
        }
    }
}

fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "boolean",
        Json::Number(_) => "number",
        Json::String(_) => "string",
        Json::Array(_) => "array",
        Json::Object(_) => "object",
    }
}

/// Decodes a JSON telemetry payload. `server_time` is called once for each object that
/// carries no device time, and stamps its values.
pub fn decode_json(
    payload: &[u8],
    server_time: &mut dyn FnMut() -> TimestampMs,
) -> Result<Vec<Sample>, DecodeError> {
    let json: Json =
        serde_json::from_slice(payload).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let mut out = Vec::new();
    match json {
        Json::Object(obj) => decode_object(obj, server_time, &mut out)?,
        Json::Array(items) => {
            for item in items {
                match item {
                    Json::Object(obj) => decode_object(obj, server_time, &mut out)?,
                    other => return Err(DecodeError::NotAnObject(kind(&other))),
                }
            }
        }
        other => return Err(DecodeError::NotAnObject(kind(&other))),
    }
    if out.is_empty() {
        return Err(DecodeError::Empty);
    }
    Ok(out)
}

fn decode_object(
    mut obj: Map<String, Json>,
    server_time: &mut dyn FnMut() -> TimestampMs,
    out: &mut Vec<Sample>,
) -> Result<(), DecodeError> {
    if obj.is_empty() || matches!(obj.get("values"), Some(Json::Object(v)) if v.is_empty()) {
        return Err(DecodeError::Empty);
    }
    let has_values = matches!(obj.get("values"), Some(Json::Object(_)));
    if !has_values {
        if obj.contains_key("ts") {
            return Err(DecodeError::TsWithoutValues);
        }
        return flatten("", obj, server_time(), out);
    }
    let ts = match obj.remove("ts") {
        None => server_time(),
        Some(Json::Number(n)) => n
            .as_i64()
            .filter(|ts| *ts >= 0)
            .ok_or_else(|| DecodeError::BadTimestamp(n.to_string()))?,
        Some(other) => return Err(DecodeError::BadTimestamp(kind(&other).to_owned())),
    };
    let Some(Json::Object(values)) = obj.remove("values") else {
        unreachable!("checked above that values is an object")
    };
    if let Some(key) = obj.keys().next() {
        return Err(DecodeError::UnexpectedKey(key.clone()));
    }
    flatten("", values, ts, out)
}

fn flatten(
    prefix: &str,
    obj: Map<String, Json>,
    ts: TimestampMs,
    out: &mut Vec<Sample>,
) -> Result<(), DecodeError> {
    for (key, v) in obj {
        let metric = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        if key_is_bad(&metric) {
            return Err(DecodeError::BadMetricName(metric));
        }
        let value = match v {
            // A part with nothing in it is a bad part, not a silent no-op.
            Json::Object(inner) if inner.is_empty() => {
                return Err(DecodeError::BadValue(metric, "empty object"))
            }
            Json::Object(inner) => {
                flatten(&metric, inner, ts, out)?;
                continue;
            }
            Json::Bool(b) => Value::Bool(b),
            Json::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                // serde_json numbers are finite: this is an f64 unless it is a u64 > i64::MAX.
                None => Value::Float(n.as_f64().unwrap_or(f64::MAX)),
            },
            Json::String(s) => Value::Text(s),
            other => return Err(DecodeError::BadValue(metric, kind(&other))),
        };
        out.push(Sample {
            metric,
            ts_ms: ts,
            value,
        });
    }
    Ok(())
}

/// Decodes a protobuf `TelemetryBatch`. Points with `ts_ms` 0 are stamped with one call of
/// `server_time` for the whole message, as one JSON object is; a metric may therefore appear
/// only once per timestamp in a message. All or nothing, like [`decode_json`].
pub fn decode_protobuf(
    payload: &[u8],
    server_time: &mut dyn FnMut() -> TimestampMs,
) -> Result<Vec<Sample>, DecodeError> {
    let batch = proto::TelemetryBatch::decode(payload)
        .map_err(|e| DecodeError::NotProtobuf(e.to_string()))?;
    if batch.points.is_empty() {
        return Err(DecodeError::Empty);
    }
    let mut now = None;
    let mut seen = HashSet::with_capacity(batch.points.len());
    let mut out = Vec::with_capacity(batch.points.len());
    for point in batch.points {
        use proto::point::Value as V;
        let metric = point.metric;
        if key_is_bad(&metric) {
            return Err(DecodeError::BadMetricName(metric));
        }
        let ts_ms = match point.ts_ms {
            0 => *now.get_or_insert_with(&mut *server_time),
            ts if ts < 0 => return Err(DecodeError::NegativeTimestamp(metric, ts)),
            ts => ts,
        };
        let value = match point.value {
            None => return Err(DecodeError::BadValue(metric, "missing")),
            Some(V::DoubleValue(f)) if !f.is_finite() => {
                return Err(DecodeError::BadValue(metric, "non-finite number"))
            }
            Some(V::DoubleValue(f)) => Value::Float(f),
            Some(V::IntValue(i)) => Value::Int(i),
            Some(V::BoolValue(b)) => Value::Bool(b),
            Some(V::StringValue(s)) => Value::Text(s),
        };
        if !seen.insert((metric.clone(), ts_ms)) {
            return Err(DecodeError::Repeated(metric, ts_ms));
        }
        out.push(Sample {
            metric,
            ts_ms,
            value,
        });
    }
    Ok(out)
}

/// Whether `metric` is not a metric name: empty, too long, or with an empty `.`-separated part.
pub fn key_is_bad(metric: &str) -> bool {
    metric.is_empty() || metric.len() > MAX_METRIC_LEN || metric.split('.').any(str::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000;

    fn s(metric: &str, ts_ms: i64, value: Value) -> Sample {
        Sample {
            metric: metric.into(),
            ts_ms,
            value,
        }
    }

    fn decode(p: &str) -> Result<Vec<Sample>, DecodeError> {
        let mut next = NOW;
        let mut v = decode_json(p.as_bytes(), &mut || {
            next += 1;
            next - 1
        })?;
        v.sort_by(|a, b| (a.ts_ms, &a.metric).cmp(&(b.ts_ms, &b.metric)));
        Ok(v)
    }

    #[test]
    fn server_time_form_keeps_types() {
        assert_eq!(
            decode(r#"{"temperature": 21.5, "door": "open", "count": 3, "on": true}"#).unwrap(),
            vec![
                s("count", NOW, Value::Int(3)),
                s("door", NOW, Value::Text("open".into())),
                s("on", NOW, Value::Bool(true)),
                s("temperature", NOW, Value::Float(21.5)),
            ]
        );
    }

    #[test]
    fn device_time_form_and_arrays_and_nesting() {
        assert_eq!(
            decode(r#"[{"ts": 5, "values": {"env": {"t": 1, "h": {"x": 2.5}}}}, {"a": false}]"#)
                .unwrap(),
            vec![
                s("env.h.x", 5, Value::Float(2.5)),
                s("env.t", 5, Value::Int(1)),
                s("a", NOW, Value::Bool(false)),
            ]
        );
        assert_eq!(
            decode(r#"{"values": {"a": 1}}"#).unwrap(),
            vec![s("a", NOW, Value::Int(1))]
        );
        // Each server-stamped object gets its own millisecond: nothing overwrites itself.
        assert_eq!(
            decode(r#"[{"a": 1}, {"a": 2}]"#).unwrap(),
            vec![s("a", NOW, Value::Int(1)), s("a", NOW + 1, Value::Int(2))]
        );
    }

    #[test]
    fn refusals_say_why() {
        assert!(matches!(decode("{"), Err(DecodeError::NotJson(_))));
        assert_eq!(decode("3"), Err(DecodeError::NotAnObject("number")));
        assert_eq!(decode("[1]"), Err(DecodeError::NotAnObject("number")));
        assert_eq!(decode("{}"), Err(DecodeError::Empty));
        assert_eq!(decode("[]"), Err(DecodeError::Empty));
        assert_eq!(decode(r#"[{}, {"a": 1}]"#), Err(DecodeError::Empty));
        assert_eq!(
            decode(r#"[{"values": {}}, {"a": 1}]"#),
            Err(DecodeError::Empty)
        );
        assert_eq!(
            decode(r#"{"a": null}"#),
            Err(DecodeError::BadValue("a".into(), "null"))
        );
        assert_eq!(
            decode(r#"{"a": [1]}"#),
            Err(DecodeError::BadValue("a".into(), "array"))
        );
        assert_eq!(
            decode(r#"{"ts": 1, "a": 1}"#),
            Err(DecodeError::TsWithoutValues)
        );
        assert_eq!(
            decode(r#"{"ts": -1, "values": {"a": 1}}"#),
            Err(DecodeError::BadTimestamp("-1".into()))
        );
        assert_eq!(
            decode(r#"{"ts": 1.5, "values": {"a": 1}}"#),
            Err(DecodeError::BadTimestamp("1.5".into()))
        );
        assert_eq!(
            decode(r#"{"ts": 1, "values": {"a": 1}, "b": 2}"#),
            Err(DecodeError::UnexpectedKey("b".into()))
        );
        assert_eq!(
            decode(r#"{"": 1}"#),
            Err(DecodeError::BadMetricName("".into()))
        );
        // All or nothing: one empty part spoils the message.
        assert_eq!(
            decode(r#"[{"va": {"env": {}}}, {"a": false}]"#),
            Err(DecodeError::BadValue("va.env".into(), "empty object"))
        );
    }

    fn point(metric: &str, ts_ms: i64, value: Option<proto::point::Value>) -> proto::Point {
        proto::Point {
            metric: metric.into(),
            ts_ms,
            value,
        }
    }

    fn decode_pb(points: Vec<proto::Point>) -> Result<Vec<Sample>, DecodeError> {
        let bytes = proto::TelemetryBatch { points }.encode_to_vec();
        let mut calls = 0;
        let out = decode_protobuf(&bytes, &mut || {
            calls += 1;
            NOW + calls
        });
        assert!(calls <= 1, "server time is taken once per message");
        out
    }

    #[test]
    fn protobuf_batches_keep_types_and_stamp_points_without_a_time_once() {
        use proto::point::Value as V;
        let out = decode_pb(vec![
            point("env.t", 0, Some(V::DoubleValue(21.5))),
            point("count", 0, Some(V::IntValue(-3))),
            point("door", 5, Some(V::BoolValue(true))),
            point("fw", 5, Some(V::StringValue("1.2".into()))),
            point("env.t", 6, Some(V::DoubleValue(22.0))),
        ]);
        assert_eq!(
            out.unwrap(),
            vec![
                s("env.t", NOW + 1, Value::Float(21.5)),
                s("count", NOW + 1, Value::Int(-3)),
                s("door", 5, Value::Bool(true)),
                s("fw", 5, Value::Text("1.2".into())),
                s("env.t", 6, Value::Float(22.0)),
            ]
        );
    }

    #[test]
    fn bad_protobuf_is_refused_whole_with_a_reason() {
        use proto::point::Value as V;
        assert!(matches!(
            decode_protobuf(b"\xff\xff\xff", &mut || NOW),
            Err(DecodeError::NotProtobuf(_))
        ));
        // JSON on the protobuf topic is not silently read as an empty batch.
        assert!(decode_protobuf(br#"{"t": 1}"#, &mut || NOW).is_err());
        assert_eq!(decode_pb(vec![]), Err(DecodeError::Empty));
        let ok = point("ok", 1, Some(V::IntValue(1)));
        let cases = [
            (
                point("a", 1, None),
                DecodeError::BadValue("a".into(), "missing"),
            ),
            (
                point("a", 1, Some(V::DoubleValue(f64::NAN))),
                DecodeError::BadValue("a".into(), "non-finite number"),
            ),
            (
                point("a", -1, Some(V::IntValue(1))),
                DecodeError::NegativeTimestamp("a".into(), -1),
            ),
            (
                point("a..b", 1, Some(V::IntValue(1))),
                DecodeError::BadMetricName("a..b".into()),
            ),
            (ok.clone(), DecodeError::Repeated("ok".into(), 1)),
        ];
        for (bad, why) in cases {
            assert_eq!(decode_pb(vec![ok.clone(), bad]), Err(why));
        }
    }
}
