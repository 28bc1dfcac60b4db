//! The telemetry model and the JSON payload decoder.
//!
//! A message decodes into [`Sample`]s: one metric, one timestamp, one typed [`Value`].
//! The JSON forms (ARCHITECTURE.md):
//! - `{"temperature": 21.5, "door": "open"}`: values stamped with the server's receive time
//!   (each such object of a message with its own millisecond, from the caller's clock);
//! - `{"ts": 1732780800123, "values": {…}}`: values stamped with the device's time in ms;
//! - an array of either;
//! - nested objects flattened with dots: `{"env": {"t": 1}}` is metric `env.t`.
//!
//! Decoding is all or nothing: a message with one bad part is refused whole, with a
//! [`DecodeError`] that says which part, so it can be dead-lettered with its reason.

use serde_json::{Map, Value as Json};

use crate::TimestampMs;

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

fn key_is_bad(metric: &str) -> bool {
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
}
