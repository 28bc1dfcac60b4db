//! The two systems under load, each started as its own processes in a fresh directory:
//!
//! - **Tellus**: `tellus serve`, trusting the benchmark's CA as an external CA with
//!   `auto_register` (so each simulated device is registered on its first connection), its
//!   defaults otherwise (fsync per commit) except `mqtt.max_connections`;
//! - **the baseline**: Mosquitto with client certificates required and a topic ACL per
//!   device, and `baseline-consumer` writing every telemetry message into Tellus's embedded
//!   store with fsync per commit, acknowledging each to Mosquitto only once committed.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use std::io::{Read, Seek};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::pki::BenchCa;

/// Open connections each server may hold: the largest idle fleet and then some.
pub const MAX_CONNECTIONS: usize = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Tellus,
    Mosquitto,
}

impl System {
    /// Open files one device connection takes: Tellus has the socket and both ends of the
    /// connection's link into its routing core, in one process.
    pub fn files_per_connection(self) -> u64 {
        match self {
            System::Tellus => 3,
            System::Mosquitto => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            System::Tellus => "tellus",
            System::Mosquitto => "mosquitto",
        }
    }
}

/// Where the programs are.
#[derive(Debug, Clone)]
pub struct Programs {
    pub tellus: PathBuf,
    pub consumer: PathBuf,
    pub mosquitto: PathBuf,
}

pub struct Target {
    pub system: System,
    dir: PathBuf,
    pub mqtt_addr: SocketAddr,
    /// The broker: `tellus`, or `mosquitto`.
    server: Child,
    /// The baseline's consumer.
    consumer: Option<Child>,
    /// Tellus's API (with its admin token), or the consumer's.
    http: String,
    token: String,
    client: reqwest::Client,
    /// The CA that signed the server's certificate.
    pub server_ca_pem: String,
    programs: Programs,
}

/// A port free now, for a server that must come back on the same one after a restart.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))?)
}

impl Target {
    pub async fn start(
        system: System,
        dir: &Path,
        ca: &BenchCa,
        programs: &Programs,
    ) -> anyhow::Result<Target> {
        std::fs::create_dir_all(dir)?;
        let mqtt_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        match system {
            System::Tellus => Target::start_tellus(dir, mqtt_addr, ca, programs).await,
            System::Mosquitto => Target::start_mosquitto(dir, mqtt_addr, ca, programs).await,
        }
    }

    async fn start_tellus(
        dir: &Path,
        mqtt_addr: SocketAddr,
        ca: &BenchCa,
        programs: &Programs,
    ) -> anyhow::Result<Target> {
        std::fs::write(
            dir.join("bench.toml"),
            format!("[mqtt]\nmax_connections = {MAX_CONNECTIONS}\n"),
        )?;
        let (server, http) = spawn_tellus(dir, mqtt_addr, &programs.tellus).await?;
        let token = std::fs::read_to_string(dir.join("data/admin.token"))?
            .trim()
            .to_owned();
        let server_ca_pem = std::fs::read_to_string(dir.join("data/pki/ca.crt"))?;
        let target = Target {
            system: System::Tellus,
            dir: dir.to_owned(),
            mqtt_addr,
            server,
            consumer: None,
            http: format!("http://{http}"),
            token,
            client: reqwest::Client::new(),
            server_ca_pem,
            programs: programs.clone(),
        };
        let created = target
            .client
            .post(format!("{}/api/v1/pki/cas", target.http))
            .bearer_auth(&target.token)
            .json(&serde_json::json!({
                "pem": ca.pem, "auto_register": true, "tags": {"fleet": "bench"}
            }))
            .send()
            .await?;
        if !created.status().is_success() {
            bail!(
                "registering the benchmark CA: {} {}",
                created.status(),
                created.text().await.unwrap_or_default()
            );
        }
        Ok(target)
    }

    async fn start_mosquitto(
        dir: &Path,
        mqtt_addr: SocketAddr,
        ca: &BenchCa,
        programs: &Programs,
    ) -> anyhow::Result<Target> {
        std::fs::write(dir.join("ca.crt"), &ca.pem)?;
        ca.server()?.write(dir, "server")?;
        ca.client(crate::CONSUMER_ID)?.write(dir, "consumer")?;
        std::fs::write(
            dir.join("acl"),
            format!(
                "user {}\ntopic read devices/+/telemetry\n\npattern readwrite devices/%u/#\n",
                crate::CONSUMER_ID
            ),
        )?;
        let d = dir.display();
        // As a user would tune it for a consumer that acknowledges after its commit: room
        // for many messages in flight to it and a deep queue, rather than the defaults (20
        // and 1,000), under which Mosquitto drops messages for a consumer that falls behind.
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\n\
                 cafile {d}/ca.crt\ncertfile {d}/server.crt\nkeyfile {d}/server.key\n\
                 require_certificate true\nuse_identity_as_username true\n\
                 allow_anonymous false\nacl_file {d}/acl\n\
                 persistence false\nset_tcp_nodelay true\nmax_connections -1\n\
                 max_inflight_messages 2000\nmax_queued_messages 1000000\n\
                 user root\nlog_dest file {d}/mosquitto.log\n",
                port = mqtt_addr.port()
            ),
        )?;
        let server = spawn_mosquitto(dir, mqtt_addr, &programs.mosquitto).await?;
        let mut consumer = Command::new(&programs.consumer)
            .args(["--port", &mqtt_addr.port().to_string()])
            .arg("--ca")
            .arg(dir.join("ca.crt"))
            .arg("--cert")
            .arg(dir.join("consumer.crt"))
            .arg("--key")
            .arg(dir.join("consumer.key"))
            .args(["--client-id", crate::CONSUMER_ID])
            .arg("--data-dir")
            .arg(dir.join("consumer"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file(dir, "consumer.log")?)
            .spawn()
            .with_context(|| format!("starting {}", programs.consumer.display()))?;
        let stdout = consumer.stdout.take().context("consumer stdout")?;
        let http = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut lines = std::io::BufReader::new(stdout).lines();
            let line = lines.next()?.ok()?;
            // Keep draining, so the consumer never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            line.strip_prefix("listening http=").map(str::to_owned)
        })
        .await?
        .context("the consumer did not start (see consumer.log)")?;
        Ok(Target {
            system: System::Mosquitto,
            dir: dir.to_owned(),
            mqtt_addr,
            server,
            consumer: Some(consumer),
            http: format!("http://{http}"),
            token: String::new(),
            client: reqwest::Client::new(),
            server_ca_pem: ca.pem.clone(),
            programs: programs.clone(),
        })
    }

    /// The processes that make up the system (for CPU time and memory).
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(self.server.id())
            .chain(self.consumer.as_ref().map(Child::id))
            .collect()
    }

    /// The broker's process alone.
    pub fn server_pid(&self) -> u32 {
        self.server.id()
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let mut request = self.client.get(format!("{}{path}", self.http));
        if !self.token.is_empty() {
            request = request.bearer_auth(&self.token);
        }
        let response = request.send().await?;
        if !response.status().is_success() {
            bail!("GET {path}: {}", response.status());
        }
        Ok(response.json().await?)
    }

    /// Telemetry messages committed to the store so far.
    pub async fn stored(&self) -> anyhow::Result<u64> {
        let stats = match self.system {
            System::Tellus => self.get("/api/v1/stats").await?["ingest"].clone(),
            System::Mosquitto => self.get("/stats").await?,
        };
        stats["stored"].as_u64().context("no stored count")
    }

    /// The device time of `device`'s newest point of `metric`, as a query answers it.
    pub async fn latest_ts(&self, device: &str, metric: &str) -> anyhow::Result<Option<i64>> {
        match self.system {
            System::Tellus => {
                let answer = self
                    .get(&format!("/api/v1/devices/{device}/latest"))
                    .await?;
                Ok(answer["metrics"][metric]["ts"].as_i64())
            }
            System::Mosquitto => {
                let answer = self.get(&format!("/latest/{device}")).await?;
                Ok(answer.as_array().and_then(|points| {
                    points
                        .iter()
                        .find(|p| p["metric"] == metric)
                        .and_then(|p| p["ts"].as_i64())
                }))
            }
        }
    }

    /// Stops the broker gracefully (SIGTERM) and starts it again on the same port and data.
    /// Returns when it stopped and when it was listening again.
    pub async fn restart(&mut self) -> anyhow::Result<(Instant, Instant)> {
        terminate(&mut self.server, Duration::from_secs(60)).await?;
        let stopped = Instant::now();
        self.server = match self.system {
            System::Tellus => {
                spawn_tellus(&self.dir, self.mqtt_addr, &self.programs.tellus)
                    .await?
                    .0
            }
            System::Mosquitto => {
                spawn_mosquitto(&self.dir, self.mqtt_addr, &self.programs.mosquitto).await?
            }
        };
        Ok((stopped, Instant::now()))
    }

    /// Stops everything (the consumer after the broker, once it has committed what it has).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        terminate(&mut self.server, Duration::from_secs(60)).await?;
        if let Some(mut consumer) = self.consumer.take() {
            terminate(&mut consumer, Duration::from_secs(60)).await?;
        }
        Ok(())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        for child in std::iter::once(&mut self.server).chain(self.consumer.as_mut()) {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// SIGTERM, then waits up to `grace` for the process to exit (SIGKILL after that).
async fn terminate(child: &mut Child, grace: Duration) -> anyhow::Result<()> {
    use nix::{sys::signal, unistd::Pid};
    if child.try_wait()?.is_some() {
        bail!("process {} had already exited", child.id());
    }
    let _ = signal::kill(Pid::from_raw(child.id() as i32), signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = child.kill();
    child.wait()?;
    bail!("process {} did not stop within {grace:?}", child.id())
}

/// Starts `tellus serve` in `dir/data` and waits for its listeners; returns the process
/// and the HTTP address.
async fn spawn_tellus(
    dir: &Path,
    mqtt_addr: SocketAddr,
    bin: &Path,
) -> anyhow::Result<(Child, SocketAddr)> {
    let log_path = dir.join("tellus.log");
    // Only what this process writes is looked at: the file holds earlier runs' lines too.
    let output = log_file(dir, "tellus.log")?;
    let mut log = std::fs::File::open(&log_path)?;
    log.seek(std::io::SeekFrom::End(0))?;
    let mut child = Command::new(bin)
        .arg("serve")
        .arg("--config")
        .arg(dir.join("bench.toml"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--mqtt-addr", &mqtt_addr.to_string()])
        .args(["--http-addr", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(output.try_clone()?)
        .stderr(output)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut mqtt, mut http) = (false, None);
    let mut unread = Vec::new();
    while !mqtt || http.is_none() {
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            bail!("tellus did not start (see {})", log_path.display());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        // What was written since the last look; a line cut in two is read whole next time.
        log.read_to_end(&mut unread)?;
        let Some(end) = unread.iter().rposition(|&b| b == b'\n') else {
            continue;
        };
        let lines: Vec<u8> = unread.drain(..=end).collect();
        for line in String::from_utf8_lossy(&lines).lines() {
            if line.contains("listener=\"mqtt\"") {
                mqtt = true;
            }
            if line.contains("listener=\"http\"") {
                http = line
                    .split(" addr=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|addr| addr.parse().ok());
            }
        }
    }
    Ok((child, http.context("no HTTP address")?))
}

/// Starts Mosquitto with `dir/mosquitto.conf` and waits until it accepts connections.
async fn spawn_mosquitto(dir: &Path, mqtt_addr: SocketAddr, bin: &Path) -> anyhow::Result<Child> {
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .stdin(Stdio::null())
        .stdout(log_file(dir, "mosquitto.out")?)
        .stderr(log_file(dir, "mosquitto.out")?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(mqtt_addr).await.is_ok() {
            return Ok(child);
        }
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            bail!(
                "mosquitto did not start (see {})",
                dir.join("mosquitto.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
