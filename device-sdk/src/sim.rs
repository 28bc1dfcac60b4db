//! Simulated devices, for demos and load: each a real [`Device`] (its own certificate, its
//! own mTLS connection, an in-memory outbox, the SDK's batching and reconnects) driven by a
//! program of plausible readings. `fleet-sim` (`firmware-examples`) and `tellus demo` both
//! run them.
//!
//! Start one with [`SimDevice::start`] and a [`SimConfig`]. It then
//! - takes a reading every [`SimConfig::every`]: `temperature` (°C) swinging with the time of
//!   day (a sine peaking at 15:00 UTC, [`SimConfig::temperature_mean`] on average) plus
//!   noise, `humidity` (%) moving against it, and `battery` (%) draining slowly (and replaced
//!   when it runs out);
//! - answers the commands `ping` (`{"pong": <params>}`) and `set_interval` (`{"ms": …}`, 100
//!   to 3,600,000), and takes a desired `interval_ms` the same way;
//! - reports its state on each connection ([`SimConfig::state`] and `interval_ms`), and again
//!   whenever its interval changes;
//! - with [`SimConfig::outages`], goes offline now and then (its connection closed, no
//!   readings) and comes back.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tellus_device::{sim::{SimConfig, SimDevice}, Credentials};
//! let creds = Credentials::from_dir("certs", "sim-0001")?;
//! let sim = SimDevice::start(creds, "localhost", 8883, SimConfig::new(Duration::from_secs(1)))?;
//! // …
//! sim.stop().await;
//! # Ok(()) }
//! ```

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Map, Value as Json};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{Batching, Credentials, Device, Error, Reading, Stats};

/// The shortest and longest interval between readings a device takes.
pub const INTERVAL_MS: std::ops::RangeInclusive<u64> = 100..=3_600_000;

/// How a simulated device behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Time between readings, until a command or the desired state changes it.
    pub every: Duration,
    /// The day's mean temperature, °C; the day swings 4 °C either side of it.
    pub temperature_mean: f64,
    /// The battery's charge at start, %.
    pub battery: f64,
    /// How fast the battery drains, % an hour; at 5 % it is replaced (back to 100 %).
    pub battery_drain_per_hour: f64,
    /// What the device reports as its state on each connection (with `interval_ms`).
    pub state: Map<String, Json>,
    /// Outages: `None` keeps the device online.
    pub outages: Option<Outages>,
}

/// A device that goes offline now and then.
#[derive(Debug, Clone, Copy)]
pub struct Outages {
    /// The mean time online between outages (each is drawn at random around it, from half
    /// to one and a half times it).
    pub every: Duration,
    /// How long an outage lasts, at least and at most.
    pub lasting: (Duration, Duration),
}

impl SimConfig {
    /// A device reading every `every`, at a mean temperature of 18 to 24 °C and a battery of
    /// 60 to 100 %, drawn at random; no state beyond its interval, and no outages.
    pub fn new(every: Duration) -> SimConfig {
        SimConfig {
            every,
            temperature_mean: 18.0 + 6.0 * rand::random::<f64>(),
            battery: 60.0 + 40.0 * rand::random::<f64>(),
            battery_drain_per_hour: 2.0,
            state: Map::new(),
            outages: None,
        }
    }
}

/// What a simulated device has done.
#[derive(Debug, Clone, Default)]
pub struct SimStats {
    /// The device's figures while it is online (`None` during an outage); they start over
    /// after each outage.
    pub device: Option<Stats>,
    /// Connections made, over every outage.
    pub connections: u64,
    /// Commands answered.
    pub commands: u64,
    /// Outages so far.
    pub outages: u64,
}

/// What the driving task shares with the handle and the command handlers.
#[derive(Default)]
struct Shared {
    /// The device while online.
    current: Mutex<Option<Arc<Device>>>,
    /// Connections of the devices before the current one.
    earlier_connections: AtomicU64,
    commands: AtomicU64,
    outages: AtomicU64,
    /// Milliseconds between readings.
    interval_ms: AtomicU64,
}

/// A running simulated device; [`SimDevice::stop`] closes it.
pub struct SimDevice {
    id: tellus_core::DeviceId,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Where the device connects.
#[derive(Clone)]
struct Target {
    creds: Credentials,
    host: String,
    port: u16,
}

impl SimDevice {
    /// Connects a simulated device to Tellus at `host:port` as `creds` and starts its
    /// program. Must run inside a tokio runtime.
    pub fn start(
        creds: Credentials,
        host: impl Into<String>,
        port: u16,
        config: SimConfig,
    ) -> Result<SimDevice, Error> {
        let shared = Arc::new(Shared::default());
        shared.interval_ms.store(
            (config.every.as_millis() as u64).clamp(*INTERVAL_MS.start(), *INTERVAL_MS.end()),
            Ordering::Relaxed,
        );
        let target = Target {
            creds,
            host: host.into(),
            port,
        };
        let first = connect(&target, &shared)?;
        let (stop, stopped) = watch::channel(false);
        let id = target.creds.id.clone();
        let task = tokio::spawn(run(target, config, shared.clone(), first, stopped));
        Ok(SimDevice {
            id,
            shared,
            stop,
            task,
        })
    }

    pub fn id(&self) -> &tellus_core::DeviceId {
        &self.id
    }

    pub fn stats(&self) -> SimStats {
        let device = lock(&self.shared.current).as_ref().map(|d| d.stats());
        let earlier = self.shared.earlier_connections.load(Ordering::Relaxed);
        SimStats {
            connections: earlier + device.as_ref().map_or(0, |s| s.connections),
            device,
            commands: self.shared.commands.load(Ordering::Relaxed),
            outages: self.shared.outages.load(Ordering::Relaxed),
        }
    }

    /// Stops the program and closes the device's connection (with a DISCONNECT).
    pub async fn stop(self) {
        self.stop.send_replace(true);
        if self.task.await.is_err() {
            warn!(device_id = %self.id, "a simulated device's task failed");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts a device with the simulated commands and desired-state handler.
fn connect(target: &Target, shared: &Arc<Shared>) -> Result<Arc<Device>, Error> {
    let (pinged, set) = (shared.clone(), shared.clone());
    let desired = shared.clone();
    let device = Device::builder(target.creds.clone(), target.host.clone(), target.port)
        .batching(Batching {
            // Readings are a second or more apart: waiting for a second one would only
            // delay them.
            linger: Duration::ZERO,
            ..Batching::default()
        })
        .on_command("ping", move |cmd| {
            pinged.commands.fetch_add(1, Ordering::Relaxed);
            async move { Ok(json!({ "pong": cmd.params })) }
        })
        .on_command("set_interval", move |cmd| {
            set.commands.fetch_add(1, Ordering::Relaxed);
            let set = set.clone();
            async move {
                let ms = cmd.params["ms"]
                    .as_u64()
                    .filter(|ms| INTERVAL_MS.contains(ms))
                    .ok_or("params.ms must be a number of milliseconds from 100 to 3600000")?;
                set.interval_ms.store(ms, Ordering::Relaxed);
                Ok(json!({ "interval_ms": ms }))
            }
        })
        .on_desired(move |wanted| {
            let desired = desired.clone();
            async move {
                if let Some(ms) = wanted.state["interval_ms"].as_u64() {
                    let ms = ms.clamp(*INTERVAL_MS.start(), *INTERVAL_MS.end());
                    desired.interval_ms.store(ms, Ordering::Relaxed);
                }
            }
        })
        .start()?;
    let device = Arc::new(device);
    *lock(&shared.current) = Some(device.clone());
    Ok(device)
}

/// Closes the device; what it had not sent is dropped with its in-memory outbox.
async fn disconnect(device: Arc<Device>, shared: &Shared) {
    lock(&shared.current).take();
    shared
        .earlier_connections
        .fetch_add(device.stats().connections, Ordering::Relaxed);
    // A stats reader may hold it for a moment; dropped, it stops all the same.
    if let Ok(device) = Arc::try_unwrap(device) {
        device.close().await;
    }
}

/// The weather and the battery, as the device measures them.
struct Sensors {
    temperature_mean: f64,
    battery: f64,
    drain_per_hour: f64,
    last: Instant,
}

impl Sensors {
    fn read(&mut self) -> Reading {
        let now = Instant::now();
        let hours = now.duration_since(self.last).as_secs_f64() / 3_600.0;
        self.last = now;
        let (temperature, humidity, battery) = self.sample(tellus_core::now_ms(), hours);
        Reading::now()
            .with("temperature", round2(temperature))
            .with("humidity", round2(humidity))
            .with("battery", round2(battery))
    }

    /// Temperature, humidity and battery at `now_ms`, `hours` after the last sample.
    fn sample(&mut self, now_ms: i64, hours: f64) -> (f64, f64, f64) {
        self.battery -= self.drain_per_hour * hours;
        if self.battery <= 5.0 {
            self.battery = 100.0;
        }
        let day = now_ms.rem_euclid(86_400_000) as f64 / 86_400_000.0;
        // Coolest at 03:00, warmest at 15:00 (UTC).
        let phase = (day - 9.0 / 24.0) * std::f64::consts::TAU;
        let temperature = self.temperature_mean + 4.0 * phase.sin() + noise(0.3);
        let humidity =
            (55.0 - 2.0 * (temperature - self.temperature_mean) + noise(1.0)).clamp(5.0, 95.0);
        (temperature, humidity, self.battery)
    }
}

/// Roughly normal noise of standard deviation `sd` (the sum of three uniform draws).
fn noise(sd: f64) -> f64 {
    let sum: f64 = (0..3).map(|_| rand::random::<f64>() - 0.5).sum();
    sum * 2.0 * sd
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Returns once `stop` says so (or its handle is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The device's program: online with readings until an outage, offline for a while, again;
/// until told to stop.
async fn run(
    target: Target,
    config: SimConfig,
    shared: Arc<Shared>,
    first: Arc<Device>,
    mut stop: watch::Receiver<bool>,
) {
    let id = target.creds.id.clone();
    let mut sensors = Sensors {
        temperature_mean: config.temperature_mean,
        battery: config.battery.clamp(0.0, 100.0),
        drain_per_hour: config.battery_drain_per_hour,
        last: Instant::now(),
    };
    let mut device = first;
    // The fleet's readings spread over the interval.
    let first_wait = rand::random::<f64>() * shared.interval_ms.load(Ordering::Relaxed) as f64;
    let mut next = tokio::time::Instant::now() + Duration::from_millis(first_wait as u64);
    loop {
        let offline_at = config.outages.map(|o| {
            let online = o.every.mul_f64(0.5 + rand::random::<f64>());
            tokio::time::Instant::now() + online
        });
        let mut reported = None;
        loop {
            let interval = shared.interval_ms.load(Ordering::Relaxed);
            if reported != Some(interval) {
                reported = Some(interval);
                let mut state = config.state.clone();
                state.insert("interval_ms".into(), interval.into());
                if device.report_state(Json::Object(state)).await.is_err() {
                    break;
                }
            }
            let outage = async {
                match offline_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stopped(&mut stop) => {
                    disconnect(device, &shared).await;
                    return;
                }
                _ = outage => break,
                _ = tokio::time::sleep_until(next) => {}
            }
            next += Duration::from_millis(shared.interval_ms.load(Ordering::Relaxed));
            // Behind (a slow machine): the next reading is due from now, not in a burst.
            next = next.max(tokio::time::Instant::now());
            if device.send(sensors.read()).await.is_err() {
                break;
            }
        }
        let Some(outages) = config.outages else {
            // Only a closed device ends the loop without an outage: nothing more to do.
            stopped(&mut stop).await;
            disconnect(device, &shared).await;
            return;
        };
        disconnect(device, &shared).await;
        shared.outages.fetch_add(1, Ordering::Relaxed);
        let (shortest, longest) = outages.lasting;
        let lasting = shortest + (longest.saturating_sub(shortest)).mul_f64(rand::random());
        info!(device_id = %id, seconds = lasting.as_secs(), "simulated outage: offline");
        device = loop {
            tokio::select! {
                _ = stopped(&mut stop) => return,
                _ = tokio::time::sleep(lasting) => {}
            }
            match connect(&target, &shared) {
                Ok(device) => break device,
                Err(e) => {
                    warn!(device_id = %id, error = %e, "a simulated device could not start again")
                }
            }
        };
        info!(device_id = %id, "simulated outage over: online again");
        next = tokio::time::Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_day_swings_humidity_follows_and_the_battery_drains() {
        let mut sensors = Sensors {
            temperature_mean: 20.0,
            battery: 6.0,
            drain_per_hour: 2.0,
            last: Instant::now(),
        };
        let hour = |h: i64| 1_800_000_000_000 / 86_400_000 * 86_400_000 + h * 3_600_000;
        let (warm, dry, battery) = sensors.sample(hour(15), 0.25);
        assert!((22.5..=25.5).contains(&warm), "{warm}");
        assert!(dry < 55.0, "{dry}");
        assert!((battery - 5.5).abs() < 1e-9, "{battery}");
        let (cool, damp, _) = sensors.sample(hour(3), 0.0);
        assert!((14.5..=17.5).contains(&cool), "{cool}");
        assert!(damp > 55.0, "{damp}");
        // Run down, and replaced.
        let (_, _, battery) = sensors.sample(hour(4), 1.0);
        assert_eq!(battery, 100.0);
    }
}
