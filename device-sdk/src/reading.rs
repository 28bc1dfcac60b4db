//! Readings: typed metrics with an optional device time, and the two forms Tellus takes
//! them in (JSON and the protobuf `TelemetryBatch`).

use serde::{Deserialize, Serialize};
pub use tellus_core::telemetry::Value;
use tellus_core::{
    telemetry::{key_is_bad, proto, MAX_METRIC_LEN},
    TimestampMs,
};

/// The largest reading the SDK accepts, encoded: far below a packet's limit, so that a batch
/// always has room for at least one.
pub const MAX_READING_BYTES: usize = 64 * 1024;

/// When a reading was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Time {
    /// The device's clock, in milliseconds since the Unix epoch. A reading sent again (after
    /// a lost acknowledgement, or from the outbox after a restart) replaces itself in the
    /// store rather than adding a second point.
    Device(TimestampMs),
    /// Tellus's clock when the reading arrives. For devices without a clock: a reading sent
    /// again may then be stored twice, at two times.
    Server,
}

/// A set of metrics taken at one time.
///
/// ```
/// use tellus_device::Reading;
/// let reading = Reading::now()
///     .with("temperature", 21.5)
///     .with("door_open", false)
///     .with("firmware", "1.4.2")
///     .with("uptime_s", 86_400_i64);
/// assert_eq!(reading.metrics().len(), 4);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    time: Time,
    metrics: Vec<(String, Value)>,
}

/// Why a reading was not taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidReading {
    #[error("a reading needs at least one metric")]
    Empty,
    #[error("metric name {0:?} is empty, longer than {MAX_METRIC_LEN} bytes or has an empty part")]
    BadName(String),
    #[error("metric {0:?} appears twice in one reading")]
    Repeated(String),
    #[error("metric {0:?} is not a finite number")]
    NotFinite(String),
    #[error("a device time must be after the Unix epoch (ms > 0): {0}")]
    BadTime(TimestampMs),
    #[error("the reading is {0} bytes encoded; at most {MAX_READING_BYTES} are taken")]
    TooLarge(usize),
}

impl Reading {
    /// An empty reading stamped with the device's clock now.
    pub fn now() -> Reading {
        Reading::at(tellus_core::now_ms())
    }

    /// An empty reading taken at `ts_ms` (device time, ms since the Unix epoch).
    pub fn at(ts_ms: TimestampMs) -> Reading {
        Reading {
            time: Time::Device(ts_ms),
            metrics: Vec::new(),
        }
    }

    /// An empty reading that Tellus stamps when it arrives; see [`Time::Server`].
    pub fn server_time() -> Reading {
        Reading {
            time: Time::Server,
            metrics: Vec::new(),
        }
    }

    /// Adds a metric. Nested names use dots (`"env.temperature"`).
    pub fn with(mut self, metric: impl Into<String>, value: impl Into<Value>) -> Reading {
        self.metrics.push((metric.into(), value.into()));
        self
    }

    pub fn time(&self) -> Time {
        self.time
    }

    pub fn metrics(&self) -> &[(String, Value)] {
        &self.metrics
    }

    /// Checks what Tellus would refuse, so that one bad reading can never spoil a batch.
    pub fn validate(&self) -> Result<(), InvalidReading> {
        if self.metrics.is_empty() {
            return Err(InvalidReading::Empty);
        }
        if let Time::Device(ts) = self.time {
            // Protobuf's 0 means "no device time": refused in both forms alike.
            if ts <= 0 {
                return Err(InvalidReading::BadTime(ts));
            }
        }
        for (i, (name, value)) in self.metrics.iter().enumerate() {
            if key_is_bad(name) {
                return Err(InvalidReading::BadName(name.clone()));
            }
            if matches!(value, Value::Float(f) if !f.is_finite()) {
                return Err(InvalidReading::NotFinite(name.clone()));
            }
            if self.metrics[..i].iter().any(|(other, _)| other == name) {
                return Err(InvalidReading::Repeated(name.clone()));
            }
        }
        let size = self.size(Format::Json).max(self.size(Format::Protobuf));
        if size > MAX_READING_BYTES {
            return Err(InvalidReading::TooLarge(size));
        }
        Ok(())
    }

    /// What it adds to a message of `format`: a batch's size is
    /// [`Format::empty_size`] plus the sizes of its readings (at most; exactly for protobuf).
    pub(crate) fn size(&self, format: Format) -> usize {
        let alone = format.encode(std::slice::from_ref(self)).len();
        match format {
            // `[` + item + `]` alone; an item and its comma in a batch.
            Format::Json => alone - 1,
            // A batch's points are its readings' points, one after another.
            Format::Protobuf => alone,
        }
    }

    /// The series keys (metric, time) this reading writes: two readings that share one must
    /// not travel in one message, which Tellus would refuse whole.
    pub(crate) fn keys(&self) -> impl Iterator<Item = (&str, Time)> {
        self.metrics.iter().map(|(m, _)| (m.as_str(), self.time))
    }
}

/// How telemetry travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// `devices/{id}/telemetry`: an array of `{"ts", "values"}` objects.
    #[default]
    Json,
    /// `devices/{id}/telemetry/pb`: a `TelemetryBatch` (`proto/telemetry.proto`).
    Protobuf,
}

impl Format {
    pub(crate) fn topic(self) -> tellus_core::topic::DeviceTopic {
        match self {
            Format::Json => tellus_core::topic::DeviceTopic::Telemetry,
            Format::Protobuf => tellus_core::topic::DeviceTopic::TelemetryPb,
        }
    }

    /// The size of a message of no readings (see [`Reading::size`]).
    pub(crate) fn empty_size(self) -> usize {
        match self {
            Format::Json => 2,
            Format::Protobuf => 0,
        }
    }

    /// Encodes a batch of valid readings as one message.
    pub fn encode(self, readings: &[Reading]) -> Vec<u8> {
        match self {
            Format::Json => encode_json(readings),
            Format::Protobuf => encode_protobuf(readings),
        }
    }
}

fn encode_json(readings: &[Reading]) -> Vec<u8> {
    let items: Vec<serde_json::Value> = readings
        .iter()
        .map(|r| {
            let values: serde_json::Map<String, serde_json::Value> = r
                .metrics
                .iter()
                .map(|(name, value)| {
                    let v = match value {
                        Value::Bool(b) => serde_json::Value::Bool(*b),
                        Value::Int(i) => serde_json::Value::from(*i),
                        // Validated finite; a float that happens to be whole keeps its ".0",
                        // so it stays a float in the store.
                        Value::Float(f) => serde_json::Value::from(*f),
                        Value::Text(s) => serde_json::Value::String(s.clone()),
                    };
                    (name.clone(), v)
                })
                .collect();
            match r.time {
                Time::Device(ts) => serde_json::json!({ "ts": ts, "values": values }),
                Time::Server => serde_json::json!({ "values": values }),
            }
        })
        .collect();
    serde_json::to_vec(&items).unwrap_or_default()
}

fn encode_protobuf(readings: &[Reading]) -> Vec<u8> {
    use prost::Message;
    use proto::point::Value as V;
    let points = readings
        .iter()
        .flat_map(|r| {
            let ts_ms = match r.time {
                Time::Device(ts) => ts,
                Time::Server => 0,
            };
            r.metrics.iter().map(move |(name, value)| proto::Point {
                metric: name.clone(),
                ts_ms,
                value: Some(match value {
                    Value::Bool(b) => V::BoolValue(*b),
                    Value::Int(i) => V::IntValue(*i),
                    Value::Float(f) => V::DoubleValue(*f),
                    Value::Text(s) => V::StringValue(s.clone()),
                }),
            })
        })
        .collect();
    proto::TelemetryBatch { points }.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tellus_core::telemetry::{decode_json, decode_protobuf, Value as Stored};

    fn sample_readings() -> Vec<Reading> {
        vec![
            Reading::at(1_000)
                .with("t", 21.0)
                .with("n", 7_i64)
                .with("ok", true)
                .with("fw", "1.2"),
            Reading::at(2_000).with("env.t", -3.25),
            Reading::server_time().with("t", 22.5),
        ]
    }

    #[test]
    fn both_forms_decode_to_the_same_typed_points() {
        for format in [Format::Json, Format::Protobuf] {
            let bytes = format.encode(&sample_readings());
            let mut server = || 9_999;
            let mut got = match format {
                Format::Json => decode_json(&bytes, &mut server).unwrap(),
                Format::Protobuf => decode_protobuf(&bytes, &mut server).unwrap(),
            };
            got.sort_by(|a, b| (a.ts_ms, &a.metric).cmp(&(b.ts_ms, &b.metric)));
            let got: Vec<_> = got
                .into_iter()
                .map(|s| (s.metric, s.ts_ms, s.value))
                .collect();
            assert_eq!(
                got,
                vec![
                    ("fw".into(), 1_000, Stored::Text("1.2".into())),
                    ("n".into(), 1_000, Stored::Int(7)),
                    ("ok".into(), 1_000, Stored::Bool(true)),
                    // A whole float stays a float.
                    ("t".into(), 1_000, Stored::Float(21.0)),
                    ("env.t".into(), 2_000, Stored::Float(-3.25)),
                    ("t".into(), 9_999, Stored::Float(22.5)),
                ],
                "{format:?}"
            );
        }
    }

    #[test]
    fn a_batch_is_as_large_as_its_readings_say() {
        let readings = sample_readings();
        for format in [Format::Json, Format::Protobuf] {
            for n in 1..=readings.len() {
                let sum: usize = readings[..n].iter().map(|r| r.size(format)).sum();
                let actual = format.encode(&readings[..n]).len();
                assert!(actual <= format.empty_size() + sum, "{format:?} {n}");
                if format == Format::Protobuf {
                    assert_eq!(actual, sum);
                }
            }
        }
    }

    #[test]
    fn what_tellus_would_refuse_is_refused_here() {
        let cases = [
            (Reading::now(), InvalidReading::Empty),
            (
                Reading::now().with("", 1),
                InvalidReading::BadName(String::new()),
            ),
            (
                Reading::now().with("a..b", 1),
                InvalidReading::BadName("a..b".into()),
            ),
            (
                Reading::now().with("a", 1).with("a", 2),
                InvalidReading::Repeated("a".into()),
            ),
            (
                Reading::now().with("a", f64::NAN),
                InvalidReading::NotFinite("a".into()),
            ),
            (Reading::at(-1).with("a", 1), InvalidReading::BadTime(-1)),
            (Reading::at(0).with("a", 1), InvalidReading::BadTime(0)),
        ];
        for (reading, want) in cases {
            assert_eq!(reading.validate(), Err(want));
        }
        let big = Reading::now().with("a", "x".repeat(MAX_READING_BYTES));
        assert!(matches!(big.validate(), Err(InvalidReading::TooLarge(_))));
        // Many booleans are larger in protobuf (a time per point) than in JSON: the larger
        // form counts.
        let mut wide = Reading::now();
        for i in 0..3_300 {
            wide = wide.with(format!("flag_{i}"), true);
        }
        let (json, pb) = (wide.size(Format::Json), wide.size(Format::Protobuf));
        assert!(
            json < MAX_READING_BYTES && pb > MAX_READING_BYTES,
            "{json} {pb}"
        );
        assert!(matches!(wide.validate(), Err(InvalidReading::TooLarge(_))));
        assert_eq!(Reading::now().with("a", 1).validate(), Ok(()));
    }
}
