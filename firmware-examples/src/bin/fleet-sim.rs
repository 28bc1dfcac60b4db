//! `fleet-sim`: many simulated devices in one process, for demos and load. Each is a real
//! device: its own certificate, its own mTLS connection, its own outbox (in memory), the
//! SDK's batching and reconnects.
//!
//! Devices are registered through the API the first time (`POST /api/v1/devices`) and their
//! credentials kept in `--certs`, so the next run reuses them.
//!
//! ```sh
//! cargo run --release -p tellus-firmware-examples --bin fleet-sim -- \
//!     --api http://127.0.0.1:8080 --token "$(cat data/admin.token)" --devices 1000
//! ```
//!
//! It prints a status line every few seconds and, with `--seconds`, a summary at the end.
//! Each device is a [`SimDevice`] of the SDK's `sim` module (the one `tellus demo` runs too):
//! readings of temperature (a daily swing), humidity and battery; the commands `ping` and
//! `set_interval` (`{"ms": …}`); a desired `interval_ms`; its state reported on each
//! connection.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Parser;
use futures::{stream, StreamExt, TryStreamExt};
use serde_json::json;
use tellus_device::{
    sim::{SimConfig, SimDevice},
    Credentials,
};

#[derive(Parser, Clone)]
struct Args {
    /// Tellus's HTTP API, to register the devices.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// An API token allowed to register devices [env: TELLUS_TOKEN].
    #[arg(long, env = "TELLUS_TOKEN")]
    token: String,
    /// Tellus's MQTT host and port.
    #[arg(long, default_value = "localhost")]
    host: String,
    #[arg(long, default_value_t = 8883)]
    port: u16,
    /// How many devices.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Device ids are this prefix and a number: sim-0000, sim-0001, …
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// Where the devices' credentials are kept between runs.
    #[arg(long, default_value = "fleet-sim-certs")]
    certs: PathBuf,
    /// Milliseconds between one device's readings.
    #[arg(long, default_value_t = 5_000)]
    every_ms: u64,
    /// New connections per second, so that a large fleet ramps up rather than all at once.
    #[arg(long, default_value_t = 200)]
    connect_rate: u32,
    /// Stop after this many seconds (0: run until Ctrl-C), and print a summary.
    #[arg(long, default_value_t = 0)]
    seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let started = Instant::now();
    let creds = provision(&args).await?;
    println!(
        "{} devices have credentials ({:.1} s)",
        creds.len(),
        started.elapsed().as_secs_f64()
    );

    let mut devices = Vec::with_capacity(creds.len());
    let mut pace = tokio::time::interval(Duration::from_secs_f64(
        1.0 / f64::from(args.connect_rate.max(1)),
    ));
    let mut state = serde_json::Map::new();
    state.insert("model".into(), json!("fleet-sim"));
    for creds in creds {
        pace.tick().await;
        let config = SimConfig {
            state: state.clone(),
            ..SimConfig::new(Duration::from_millis(args.every_ms.max(100)))
        };
        devices.push(SimDevice::start(
            creds,
            args.host.clone(),
            args.port,
            config,
        )?);
    }

    let stop = if args.seconds == 0 {
        None
    } else {
        Some(started + Duration::from_secs(args.seconds))
    };
    let mut all_connected = false;
    // Looked at every 100 ms (so that the time to connect them all is measured to that),
    // printed every 2 s.
    let mut look = tokio::time::interval(Duration::from_millis(100));
    for n in 0u64.. {
        tokio::select! {
            _ = look.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let line = Summary::of(&devices);
        if !all_connected && line.ever_connected == devices.len() {
            all_connected = true;
            println!(
                "all {} devices connected ({:.1} s)",
                devices.len(),
                started.elapsed().as_secs_f64()
            );
        }
        if n % 20 == 0 {
            println!("{line}");
        }
        if stop.is_some_and(|stop| Instant::now() >= stop) {
            break;
        }
    }
    let summary = Summary::of(&devices);
    for device in devices {
        device.stop().await;
    }
    println!("summary: {summary}");
    Ok(())
}

/// Loads each device's credentials from `--certs`, registering the missing devices.
async fn provision(args: &Args) -> anyhow::Result<Vec<Credentials>> {
    std::fs::create_dir_all(&args.certs)
        .with_context(|| format!("creating {}", args.certs.display()))?;
    let http = reqwest::Client::new();
    let ids: Vec<String> = (0..args.devices)
        .map(|i| format!("{}{i:04}", args.prefix))
        .collect();
    stream::iter(ids)
        .map(|id| {
            let http = http.clone();
            async move {
                if args.certs.join(format!("{id}.crt")).exists() {
                    return Credentials::from_dir(&args.certs, &id).map_err(anyhow::Error::from);
                }
                register(&http, args, &id).await
            }
        })
        .buffered(8)
        .try_collect()
        .await
}

async fn register(http: &reqwest::Client, args: &Args, id: &str) -> anyhow::Result<Credentials> {
    let response = http
        .post(format!("{}/api/v1/devices", args.api.trim_end_matches('/')))
        .bearer_auth(&args.token)
        .json(&json!({ "id": id }))
        .send()
        .await
        .with_context(|| format!("registering {id} at {}", args.api))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!(
            "registering {id}: {status}: {} (a device registered by an earlier run needs its \
             credentials in {}; use another --prefix or delete it)",
            body["error"]["message"]
                .as_str()
                .unwrap_or("no reason given"),
            args.certs.display()
        );
    }
    let field = |name: &str| body[name].as_str().map(str::to_owned);
    let (Some(cert), Some(key), Some(ca)) = (field("cert_pem"), field("key_pem"), field("ca_pem"))
    else {
        bail!("registering {id}: the answer lacks the credentials: {body}");
    };
    let creds = Credentials::from_pem(cert, key, ca)?;
    creds
        .write_to_dir(&args.certs)
        .with_context(|| format!("saving {id}'s credentials in {}", args.certs.display()))?;
    Ok(creds)
}

/// The fleet's figures, summed.
struct Summary {
    devices: usize,
    connected: usize,
    ever_connected: usize,
    recorded: u64,
    acknowledged: u64,
    waiting: u64,
    dropped: u64,
    commands: u64,
}

impl Summary {
    fn of(devices: &[SimDevice]) -> Summary {
        let mut s = Summary {
            devices: devices.len(),
            connected: 0,
            ever_connected: 0,
            recorded: 0,
            acknowledged: 0,
            waiting: 0,
            dropped: 0,
            commands: 0,
        };
        for device in devices {
            let sim = device.stats();
            s.ever_connected += usize::from(sim.connections > 0);
            s.commands += sim.commands;
            if let Some(stats) = sim.device {
                s.connected += usize::from(stats.connected);
                s.recorded += stats.recorded;
                s.acknowledged += stats.acknowledged;
                s.waiting += stats.waiting;
                s.dropped += stats.dropped;
            }
        }
        s
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "devices={} connected={} readings recorded={} acknowledged={} waiting={} dropped={} commands={}",
            self.devices,
            self.connected,
            self.recorded,
            self.acknowledged,
            self.waiting,
            self.dropped,
            self.commands
        )
    }
}
