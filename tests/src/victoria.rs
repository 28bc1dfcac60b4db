//! A real VictoriaMetrics for tests of line-protocol senders: the QuestDB store's smoke test
//! sends InfluxDB line protocol (ILP) to it, since QuestDB itself cannot be installed where
//! the tests run. Start with [`VictoriaMetrics::start`]; read back with
//! [`VictoriaMetrics::wait_points`].
//!
//! It is Debian's `victoria-metrics` (1.79.5), started per test in a temporary data directory
//! with its HTTP API and its TCP line-protocol listener on ephemeral loopback ports, and
//! killed when dropped. What it makes of a line (checked against 1.79.5, see the test below):
//!
//! - `m,tag=v f1=1.5,f2=3i` becomes one series per field, named `m_f1` and `m_f2`, labelled
//!   `tag="v"` (tags with an empty value are dropped; `/write?db=x` adds `db="x"`);
//! - every value is a float: `3i` and `3u` are 3, booleans are 1 or 0, a quoted string is
//!   parsed as a number if it is one and is 0 otherwise;
//! - without a `precision` parameter (and always over TCP) the timestamp's unit is guessed
//!   from its size (≥1e17 ns, ≥1e14 µs, ≥1e11 ms, else s) and stored in milliseconds; a
//!   missing timestamp means now;
//! - `/write` answers 204 even when it drops lines: a malformed line is only logged
//!   ("cannot unmarshal InfluxDB line"), and so is a point too far in the future ("too big
//!   timestamp", more than 2 days ahead), so a test that expects points must count them.
//!
//! VictoriaMetrics answers `GET /ping` with 204 but `GET /settings` with 400, so a questdb-rs
//! HTTP sender needs `protocol_version=1;` in its configuration string (it accepts only a 404
//! as "no settings here").

use std::{
    collections::BTreeMap,
    fs::File,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tempfile::TempDir;

/// The Debian package's server binary.
const BIN: &str = "victoria-metrics";

/// How long [`VictoriaMetrics::start`] waits for `/health` to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How often [`VictoriaMetrics::start`] picks new ports when one was taken meanwhile.
const START_ATTEMPTS: usize = 5;

/// How long [`VictoriaMetrics::wait_points`] polls. Flushed, points are readable within
/// tens of milliseconds of their arrival.
const WAIT_POINTS: Duration = Duration::from_secs(20);

/// How far past now an export reads.
const EXPORT_END_AHEAD: Duration = Duration::from_secs(3 * 24 * 3600);

/// How many lines of its log a failure message shows.
const LOG_TAIL_LINES: usize = 40;

/// A running `victoria-metrics`. Killed, and its data removed, when dropped.
pub struct VictoriaMetrics {
    child: Child,
    http_addr: SocketAddr,
    influx_tcp_addr: SocketAddr,
    /// Its stdout and stderr, in `dir`.
    log_path: PathBuf,
    http: reqwest::Client,
    /// Declared last so the directory is removed only after `Drop` has ended the process.
    _dir: TempDir,
}

/// One series read back from VictoriaMetrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// All labels, the metric name as `__name__` among them.
    pub labels: BTreeMap<String, String>,
    /// `(timestamp in milliseconds, value)`, oldest first.
    pub points: Vec<(i64, f64)>,
}

impl Series {
    /// The metric name (`__name__`).
    pub fn name(&self) -> &str {
        self.labels.get("__name__").map_or("", String::as_str)
    }

    /// Parses one line of `/api/v1/export`:
    /// `{"metric":{"__name__":..,..},"values":[..],"timestamps":[..]}`.
    fn from_export_line(line: &str) -> Result<Series, String> {
        let json: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let labels = json["metric"]
            .as_object()
            .ok_or("no \"metric\" object")?
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.clone(),
                    v.as_str().ok_or("a non-string label")?.to_owned(),
                ))
            })
            .collect::<Result<BTreeMap<_, _>, String>>()?;
        let values = json["values"]
            .as_array()
            .ok_or("no \"values\" array")?
            .iter()
            .map(|v| match v {
                Value::Number(n) => n.as_f64().ok_or("a value out of range"),
                // Non-finite values, should any come, are spelled out or null.
                Value::String(s) => s.parse().map_err(|_| "a non-numeric value"),
                Value::Null => Ok(f64::NAN),
                _ => Err("a value of another type"),
            })
            .collect::<Result<Vec<f64>, _>>()?;
        let timestamps = json["timestamps"]
            .as_array()
            .ok_or("no \"timestamps\" array")?
            .iter()
            .map(|t| t.as_i64().ok_or("a non-integer timestamp"))
            .collect::<Result<Vec<i64>, _>>()?;
        if values.len() != timestamps.len() {
            return Err("as many values as timestamps expected".into());
        }
        let mut points: Vec<(i64, f64)> = timestamps.into_iter().zip(values).collect();
        points.sort_by_key(|&(ts, _)| ts);
        Ok(Series { labels, points })
    }
}

impl VictoriaMetrics {
    /// Starts `victoria-metrics` in a temporary data directory, its HTTP API and its TCP
    /// line-protocol listener on ephemeral loopback ports, and waits until `/health` answers.
    /// Returns `None`, after a loud skip message, when the binary is not on PATH outside CI;
    /// in CI (`CI` set) a missing binary fails the test.
    ///
    /// Retention is 100 years, so points of any past time are kept (the default, one month,
    /// silently drops older ones).
    pub async fn start() -> Option<VictoriaMetrics> {
        if !crate::require_tool(BIN) {
            return None;
        }
        for _ in 0..START_ATTEMPTS {
            if let Some(vm) = Self::try_start().await {
                return Some(vm);
            }
        }
        panic!("{BIN}: its ports were taken {START_ATTEMPTS} times in a row");
    }

    /// One start on freshly picked ports; `None` when one of them was taken meanwhile.
    async fn try_start() -> Option<VictoriaMetrics> {
        let dir = tempfile::Builder::new()
            .prefix("tellus-victoria-")
            .tempdir()
            .expect("temporary directory");
        let log_path = dir.path().join("victoria-metrics.log");
        let log = File::create(&log_path).expect("create the victoria-metrics log");
        let (http_addr, influx_tcp_addr) = free_ports();
        let child = Command::new(BIN)
            .arg(format!(
                "-storageDataPath={}",
                dir.path().join("data").display()
            ))
            .arg("-retentionPeriod=100y")
            .arg(format!("-httpListenAddr={http_addr}"))
            .arg(format!("-influxListenAddr={influx_tcp_addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {BIN}: {e}"));
        // From here on, a panic drops `vm`, which ends the process.
        let mut vm = VictoriaMetrics {
            child,
            http_addr,
            influx_tcp_addr,
            log_path,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("HTTP client"),
            _dir: dir,
        };
        vm.wait_healthy().await.then_some(vm)
    }

    /// Waits for `/health`; false when the process ended because a port was taken.
    async fn wait_healthy(&mut self) -> bool {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll victoria-metrics") {
                let log = self.log();
                if log.contains("address already in use") {
                    eprintln!("{BIN}: a port was taken, retrying on others");
                    return false;
                }
                panic!(
                    "{BIN} ended ({status}) before it was healthy; its log ends:\n{}",
                    tail(&log)
                );
            }
            if let Ok(r) = self.http.get(self.url("/health")).send().await {
                if r.status().is_success() {
                    return true;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{BIN} was not healthy within {START_TIMEOUT:?}; its log ends:\n{}",
                tail(&self.log())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its HTTP API; line protocol over HTTP goes to `http://<this>/write`.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Its TCP line-protocol listener (it listens on UDP at the same address as well).
    pub fn influx_tcp_addr(&self) -> SocketAddr {
        self.influx_tcp_addr
    }

    /// Everything it has logged so far. `/write` answers 204 even when it drops lines, so
    /// this is where dropped lines show ("cannot unmarshal InfluxDB line", "warn occurred
    /// during rows addition").
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// Flushes what it has buffered, then reads every series matching `selector` (a series
    /// selector such as `{__name__=~"telemetry.*"}`), sorted by labels. (Unflushed, points
    /// take about ten seconds to become readable.) TCP lines get no answer to wait for, so
    /// a test that has just sent some should use [`Self::wait_points`].
    pub async fn export(&self, selector: &str) -> Vec<Series> {
        let flush = self
            .http
            .get(self.url("/internal/force_flush"))
            .send()
            .await;
        self.body_of(flush, "force_flush").await;
        // Without `end`, export stops at the current second, which hides points written
        // within it; VictoriaMetrics refuses points more than two days ahead anyway.
        let end = (tellus_core::now_ms() / 1_000 + EXPORT_END_AHEAD.as_secs() as i64).to_string();
        let export = self
            .http
            .get(self.url("/api/v1/export"))
            .query(&[("match[]", selector), ("end", end.as_str())])
            .send()
            .await;
        let body = self.body_of(export, "export").await;
        let mut series: Vec<Series> = body
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                Series::from_export_line(line)
                    .unwrap_or_else(|e| panic!("{BIN} export line {line:?}: {e}"))
            })
            .collect();
        series.sort_by(|a, b| a.labels.cmp(&b.labels));
        series
    }

    /// Polls [`Self::export`] until the series matching `selector` hold `n` points or more
    /// in all, or 20 s have passed; returns what it read last either way.
    pub async fn wait_points(&self, selector: &str, n: usize) -> Vec<Series> {
        let deadline = Instant::now() + WAIT_POINTS;
        loop {
            let series = self.export(selector).await;
            let seen: usize = series.iter().map(|s| s.points.len()).sum();
            if seen >= n || Instant::now() >= deadline {
                return series;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http_addr, path)
    }

    /// The body of a successful answer; anything else fails the test with the log's tail.
    async fn body_of(&self, sent: reqwest::Result<reqwest::Response>, what: &str) -> String {
        let response = sent
            .unwrap_or_else(|e| panic!("{BIN} {what}: {e}; its log ends:\n{}", tail(&self.log())));
        let status = response.status();
        let body = response.text().await.unwrap_or_else(|e| {
            panic!(
                "{BIN} {what}: body: {e}; its log ends:\n{}",
                tail(&self.log())
            )
        });
        assert!(
            status.is_success(),
            "{BIN} {what}: {status} {body}; its log ends:\n{}",
            tail(&self.log())
        );
        body
    }
}

impl Drop for VictoriaMetrics {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two distinct free loopback ports, for the HTTP API and the line-protocol listener.
/// VictoriaMetrics cannot bind port 0 and report what it got, so they are picked here and
/// released; another process may take one meanwhile, which `start` notices and retries.
fn free_ports() -> (SocketAddr, SocketAddr) {
    let bind = || TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    // Both held at once, so they differ.
    let (a, b) = (bind(), bind());
    (
        a.local_addr().expect("local address"),
        b.local_addr().expect("local address"),
    )
}

/// The last lines of a log.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use tokio::{io::AsyncWriteExt, net::TcpStream};

    use super::*;

    fn find<'a>(series: &'a [Series], name: &str, device: &str) -> &'a Series {
        series
            .iter()
            .find(|s| {
                s.name() == name && s.labels.get("device").map(String::as_str) == Some(device)
            })
            .unwrap_or_else(|| panic!("no {name}{{device={device:?}}} in {series:#?}"))
    }

    #[tokio::test]
    async fn line_protocol_over_http_and_tcp_reads_back_in_milliseconds() {
        let Some(vm) = VictoriaMetrics::start().await else {
            return;
        };
        let base = crate::recent_base();

        // HTTP: one line in nanoseconds, one in microseconds with every kind of field.
        let http_lines = format!(
            "telemetry,device=d1,metric=temp value=21.5 {}\n\
             telemetry,device=d1,metric=temp value=22.25,int_value=3i,text_value=\"x\",ok=t {}\n",
            base * 1_000_000,
            (base + 1_000) * 1_000,
        );
        let response = reqwest::Client::new()
            .post(format!("http://{}/write", vm.http_addr()))
            .body(http_lines)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 204);

        // TCP: one line in nanoseconds, one in milliseconds.
        let tcp_lines = format!(
            "telemetry,device=d2,metric=temp value=1 {}\n\
             telemetry,device=d2,metric=temp value=2 {}\n",
            (base + 2_000) * 1_000_000,
            base + 3_000,
        );
        let mut tcp = TcpStream::connect(vm.influx_tcp_addr()).await.unwrap();
        tcp.write_all(tcp_lines.as_bytes()).await.unwrap();
        tcp.shutdown().await.unwrap();
        drop(tcp);

        // d1: two `value` points and one each of the other fields; d2: two `value` points.
        let series = vm.wait_points(r#"{__name__=~"telemetry.*"}"#, 7).await;
        let seen: usize = series.iter().map(|s| s.points.len()).sum();
        assert_eq!(seen, 7, "{series:#?}\nlog:\n{}", tail(&vm.log()));

        let d1 = find(&series, "telemetry_value", "d1");
        assert_eq!(d1.points, [(base, 21.5), (base + 1_000, 22.25)]);
        assert_eq!(d1.labels.get("metric").map(String::as_str), Some("temp"));
        assert_eq!(d1.labels.len(), 3, "{:?}", d1.labels);
        assert_eq!(
            find(&series, "telemetry_int_value", "d1").points,
            [(base + 1_000, 3.0)]
        );
        // Booleans become 1 or 0; a string that is not a number becomes 0.
        assert_eq!(
            find(&series, "telemetry_ok", "d1").points,
            [(base + 1_000, 1.0)]
        );
        assert_eq!(
            find(&series, "telemetry_text_value", "d1").points,
            [(base + 1_000, 0.0)]
        );
        assert_eq!(
            find(&series, "telemetry_value", "d2").points,
            [(base + 2_000, 1.0), (base + 3_000, 2.0)]
        );
    }
}
