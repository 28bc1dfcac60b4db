//! Configuration: a TOML file (optional), then environment variables and flags on top.
//!
//! Every field has a default, so an empty file (or none) is a valid configuration, and
//! unknown keys are errors, so a typo never silently falls back to a default. Durations are
//! written like `"10s"` or `"365days"`. [`DEFAULT_TOML`] is the commented default file that
//! `tellus config` prints; a test keeps it equal to [`Config::default`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use tellus_ingest::{Durability, IngestConfig, QuestDbConfig, Retention, StoreConfig};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where Tellus keeps its CA, registry, telemetry and admin token.
    pub data_dir: PathBuf,
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub pki: PkiConfig,
    pub ingest: IngestSection,
    pub store: StoreSection,
    pub log: LogConfig,
    /// Longest a graceful stop waits for connections to close and ingest to commit.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    pub listen: SocketAddr,
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub max_packet_size: usize,
    pub max_connections: usize,
    pub max_inflight: usize,
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    pub max_messages_per_second: u32,
    pub message_burst: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PkiConfig {
    /// Extra DNS names or IP addresses for the server certificate.
    pub server_names: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub device_cert_validity: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestSection {
    pub queue_capacity: usize,
    pub queue_bytes: usize,
    pub max_batch: usize,
    pub durability: Durability,
}

/// The telemetry store: which one, and its settings. The embedded store's are how long each
/// resolution is kept, and how soon new points are merged into their partitions and rollups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    pub backend: Backend,
    pub retention_raw: Keep,
    pub retention_minute: Keep,
    pub retention_hour: Keep,
    #[serde(with = "humantime_serde")]
    pub merge_interval: Duration,
    pub merge_rows: usize,
    pub questdb: QuestDbSection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Embedded,
    Questdb,
}

/// The QuestDB store ([`QuestDbConfig`] says what each setting does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuestDbSection {
    pub ilp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sql_url: Option<String>,
    pub table: String,
    pub create_table: bool,
    pub spool_capacity: u64,
    pub batch_points: usize,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for QuestDbSection {
    fn default() -> Self {
        let q = QuestDbConfig::default();
        QuestDbSection {
            ilp: q.ilp,
            sql_url: q.sql_url,
            table: q.table,
            create_table: q.create_table,
            spool_capacity: q.spool_capacity,
            batch_points: q.batch_points,
            request_timeout: q.request_timeout,
        }
    }
}

/// How long data is kept: a duration, or `"forever"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Keep(pub Option<Duration>);

impl TryFrom<String> for Keep {
    type Error = String;

    fn try_from(s: String) -> Result<Keep, String> {
        match s.as_str() {
            "forever" => Ok(Keep(None)),
            d => humantime::parse_duration(d)
                .map(|d| Keep(Some(d)))
                .map_err(|e| format!("{d:?} is neither a duration nor \"forever\": {e}")),
        }
    }
}

impl From<Keep> for String {
    fn from(k: Keep) -> String {
        match k.0 {
            None => "forever".into(),
            Some(d) => humantime::format_duration(d).to_string(),
        }
    }
}

impl Default for StoreSection {
    fn default() -> Self {
        let store = StoreConfig::default();
        StoreSection {
            backend: Backend::default(),
            retention_raw: Keep(store.retention.raw),
            retention_minute: Keep(store.retention.minute),
            retention_hour: Keep(store.retention.hour),
            merge_interval: store.merge_interval,
            merge_rows: store.merge_rows,
            questdb: QuestDbSection::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter; `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./tellus-data"),
            mqtt: MqttConfig::default(),
            http: HttpConfig::default(),
            pki: PkiConfig::default(),
            ingest: IngestSection::default(),
            store: StoreSection::default(),
            log: LogConfig::default(),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        let gate = tellus_broker::gate::GateConfig::default();
        MqttConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8883)),
            handshake_timeout: gate.handshake_timeout,
            connect_timeout: gate.connect_timeout,
            max_packet_size: gate.max_packet_size,
            max_connections: gate.max_connections,
            max_inflight: gate.max_inflight,
            write_timeout: gate.write_timeout,
            max_messages_per_second: gate.max_messages_per_second,
            message_burst: gate.message_burst,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }
}

impl Default for PkiConfig {
    fn default() -> Self {
        PkiConfig {
            server_names: Vec::new(),
            device_cert_validity: Duration::from_secs(365 * 86_400),
        }
    }
}

impl Default for IngestSection {
    fn default() -> Self {
        let ingest = IngestConfig::default();
        IngestSection {
            queue_capacity: ingest.queue_capacity,
            queue_bytes: 64 * 1024 * 1024,
            max_batch: ingest.max_batch,
            durability: Durability::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            filter: "info,rumqttd=off,rustls=error".into(),
        }
    }
}

impl Config {
    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn gate(&self) -> tellus_broker::gate::GateConfig {
        tellus_broker::gate::GateConfig {
            handshake_timeout: self.mqtt.handshake_timeout,
            connect_timeout: self.mqtt.connect_timeout,
            max_packet_size: self.mqtt.max_packet_size,
            max_connections: self.mqtt.max_connections,
            max_inflight: self.mqtt.max_inflight,
            write_timeout: self.mqtt.write_timeout,
            max_messages_per_second: self.mqtt.max_messages_per_second,
            message_burst: self.mqtt.message_burst,
        }
    }

    /// The telemetry store's settings; an error if a coarser resolution would be kept for
    /// less time than a finer one (rollups are computed from the finer data while it is
    /// kept).
    pub fn store(&self) -> Result<StoreConfig, String> {
        let s = &self.store;
        let longer = |a: Keep, b: Keep| match (a.0, b.0) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(a), Some(b)) => a <= b,
        };
        if !longer(s.retention_raw, s.retention_minute)
            || !longer(s.retention_minute, s.retention_hour)
        {
            return Err(
                "[store] retention_raw <= retention_minute <= retention_hour must hold".into(),
            );
        }
        Ok(StoreConfig {
            durability: self.ingest.durability,
            retention: Retention {
                raw: s.retention_raw.0,
                minute: s.retention_minute.0,
                hour: s.retention_hour.0,
            },
            merge_interval: s.merge_interval,
            merge_rows: s.merge_rows.max(1),
        })
    }

    /// The QuestDB store's settings (used when `[store] backend = "questdb"`).
    pub fn questdb(&self) -> QuestDbConfig {
        let q = &self.store.questdb;
        QuestDbConfig {
            ilp: q.ilp.clone(),
            sql_url: q.sql_url.clone(),
            table: q.table.clone(),
            create_table: q.create_table,
            spool_capacity: q.spool_capacity,
            batch_points: q.batch_points.max(1),
            durability: self.ingest.durability,
            request_timeout: q.request_timeout,
        }
    }

    pub fn ingest(&self) -> IngestConfig {
        IngestConfig {
            queue_capacity: self.ingest.queue_capacity,
            max_batch: self.ingest.max_batch,
        }
    }
}

/// The default configuration, with what each setting means.
pub const DEFAULT_TOML: &str = r#"# Tellus configuration. Every setting is optional; shown here are the defaults.
# Flags and environment variables (TELLUS_DATA_DIR, TELLUS_MQTT_ADDR, TELLUS_HTTP_ADDR)
# override the file.

# Where Tellus keeps its fleet CA, device registry, telemetry and admin token.
data_dir = "./tellus-data"

# Longest a graceful stop (SIGINT/SIGTERM) waits for devices to be acknowledged and for
# ingest to commit what it holds.
shutdown_timeout = "30s"

[mqtt]
# Where devices connect with MQTT over TLS and their client certificate.
listen = "0.0.0.0:8883"
# Longest a TLS handshake may take, from the TCP accept on.
handshake_timeout = "10s"
# Longest from the end of the handshake to a complete CONNECT packet.
connect_timeout = "10s"
# Largest MQTT packet a device may send, in bytes; a larger one closes the connection.
max_packet_size = 262144
# Most simultaneous device connections; more wait in the listen backlog. Each takes three
# open files; Tellus raises its soft limit to the hard one and warns if that is too low.
max_connections = 10000
# Most acknowledgements of one connection waiting for their message to be safe (telemetry
# committed, anything else taken by the routing core); past this the gate stops reading
# that device's socket until ingest catches up.
max_inflight = 256
# Longest one write to a device may take; a device that stops reading is disconnected.
write_timeout = "10s"
# Sustained rate of packets a device connection starts (PUBLISH, SUBSCRIBE, UNSUBSCRIBE,
# PINGREQ) per second (0: unlimited). Over it the gate stops reading that device's socket
# until it is back within its rate: the device is slowed, not disconnected, and nothing is
# dropped. Each pause is counted (rate_limited).
max_messages_per_second = 1000
# Packets a device may send in one burst (the token bucket's size).
message_burst = 1000

[http]
# The HTTP API. Keep it on loopback unless a TLS-terminating proxy fronts it.
listen = "127.0.0.1:8080"

[pki]
# Extra DNS names or IP addresses for the server certificate, beside localhost,
# 127.0.0.1, ::1 and this host's name.
server_names = []
# Validity of device certificates that Tellus issues.
device_cert_validity = "365days"

[ingest]
# queue_capacity: messages waiting for ingest (besides the batch being committed);
# queue_bytes: payload bytes from the gate to the end of their commit (at most 4 GiB).
# When either is reached, the gate stops reading device sockets (backpressure); nothing is
# dropped.
queue_capacity = 4096
queue_bytes = 67108864
# Most messages committed in one transaction.
max_batch = 1024
# "fsync": every commit is flushed to disk before devices are acknowledged (survives power
# loss). "os": the OS flushes later (survives a crash of Tellus, not of the machine).
durability = "fsync"

[store]
# Where telemetry is stored: "embedded" (this machine, the settings below) or "questdb"
# (the [store.questdb] settings; see the README's QuestDB section).
backend = "embedded"
# How long each resolution of telemetry is kept: raw points, 1-minute and 1-hour rollups
# (min, max, sum, count, first, last). A duration, or "forever"; each at least as long as
# the finer one. Data is stored in time partitions (a day of raw points, 30 days of minutes,
# 365 days of hours) and a partition is dropped whole once all of it is past its retention.
retention_raw = "30days"
retention_minute = "365days"
retention_hour = "forever"
# New points are first appended to a small head, which is merged into the partitions and
# rollups at least this often, or as soon as it holds merge_rows points.
merge_interval = "1s"
merge_rows = 500000

[store.questdb]
# The line-protocol sender as a questdb-rs configuration string: transport (http, https,
# tcp, tcps), address, credentials (username/password or token), protocol_version.
ilp = "http::addr=localhost:9000;"
# QuestDB's HTTP endpoint for queries and for creating the table; by default the address
# of ilp when it is http or https. Credentials are those of ilp.
# sql_url = "http://localhost:9000"
table = "telemetry"
# Create the table, with its deduplication keys, before the first send.
create_table = true
# Acknowledged points wait in a local spool (in the data directory, durable as [ingest]
# durability says) until QuestDB confirms them. When it holds spool_capacity points,
# commits are refused, so devices keep their messages and send them again.
spool_capacity = 50000000
# Most points in one request to QuestDB, and how long a request may take.
batch_points = 10000
request_timeout = "10s"

[log]
# "text" (for people; coloured on a terminal) or "json": one JSON object a line on stderr,
# for log shippers, with "timestamp", "level", "target", "fields" (the message and the
# event's own fields, such as device_id and reason) and, inside a device's connection,
# "span" and "spans" (device_id, peer).
format = "text"
# A tracing filter; the RUST_LOG environment variable overrides it. rumqttd, the routing
# core behind the gate, is silent by default: the gate logs every connection event itself.
filter = "info,rumqttd=off,rustls=error"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_is_a_duration_or_forever_and_coarser_is_kept_longer() {
        let c = Config::from_toml(
            "[store]\nretention_raw = \"7days\"\nretention_minute = \"forever\"\n",
        )
        .unwrap();
        let store = c.store().unwrap();
        assert_eq!(store.retention.raw, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!((store.retention.minute, store.retention.hour), (None, None));
        assert!(Config::from_toml("[store]\nretention_raw = \"soon\"\n").is_err());
        let shorter = Config::from_toml("[store]\nretention_raw = \"400days\"\n").unwrap();
        assert!(shorter.store().unwrap_err().contains("retention_raw"));
    }

    #[test]
    fn the_printed_default_is_the_default() {
        assert_eq!(Config::from_toml(DEFAULT_TOML).unwrap(), Config::default());
    }

    #[test]
    fn empty_file_is_default_and_typos_are_errors() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
        let err = Config::from_toml("[mqtt]\nlisten_addr = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
        let c = Config::from_toml("shutdown_timeout = \"5s\"\n[ingest]\ndurability = \"os\"\n")
            .unwrap();
        assert_eq!(c.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(c.ingest.durability, Durability::Os);
    }
}
