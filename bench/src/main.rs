//! `tellus-bench`: Tellus and the baseline (Mosquitto with a consumer writing the same
//! store) under the same load, one after the other on this machine, and a results table.
//! BENCHMARKS.md describes the method; `bench/run` is the one command.
//!
//! For each system and run, on a fresh data directory:
//! 1. **throughput**: `--devices` devices connect (mTLS, each its own certificate) and keep
//!    `--window` messages in flight each: the acknowledged and the durable (committed)
//!    messages per second in the steady window are the system's maximum;
//! 2. **latency**: the same devices send open-loop at half that maximum; publish → PUBACK
//!    latency from each message's scheduled time, and publish → queryable from a probe
//!    device whose readings are looked for through the query API;
//! 3. both report the servers' CPU time per 10,000 durable messages.
//!
//! Then, once per system: resident memory per idle connection at each `--idle` level, and
//! the time for an idle fleet (the same size for every system) to be back online after the
//! broker restarts.

mod load;
mod pki;
mod procfs;
mod targets;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use load::{Device, Holders, Pace, Phase, Session};
use targets::{Programs, System, Target};

/// The baseline consumer's client id and certificate CN.
pub const CONSUMER_ID: &str = "bench-consumer";
/// Open files a server keeps for other things than device connections.
const OPEN_FILES_SPARE: u64 = 1_500;
/// The device whose readings probe publish → queryable.
const PROBE_ID: &str = "bench-probe";

#[derive(Parser, Debug)]
#[command(
    name = "tellus-bench",
    about = "Tellus and Mosquitto side by side under one load"
)]
struct Args {
    /// Where results.md and results.json go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Keep the servers' data and logs here (default: a temporary directory, removed).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// A few seconds of everything with a handful of devices: checks the harness works.
    #[arg(long)]
    smoke: bool,
    /// Which systems: tellus, mosquitto.
    #[arg(long, value_delimiter = ',', default_value = "tellus,mosquitto")]
    systems: Vec<String>,
    /// Throughput and latency runs per system (interleaved); medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Devices publishing in the throughput and latency phases.
    #[arg(long, default_value_t = 1_000)]
    devices: usize,
    /// Messages each device may have awaiting their PUBACK at the maximum rate.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Seconds of warm-up before each steady window.
    #[arg(long, default_value_t = 5.0)]
    warm_up: f64,
    /// Seconds of each steady window.
    #[arg(long, default_value_t = 20.0)]
    steady: f64,
    /// Idle connection counts at which memory is measured. Each system then restarts under
    /// the largest of them that every system's open-file limit allows.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    idle: Vec<usize>,
    /// Skip the idle memory and reconnect-storm measurements.
    #[arg(long)]
    no_idle: bool,
    #[arg(long, env = "TELLUS_BIN")]
    tellus_bin: Option<PathBuf>,
    #[arg(long)]
    consumer_bin: Option<PathBuf>,
    #[arg(long, default_value = "mosquitto")]
    mosquitto_bin: PathBuf,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Default)]
struct Percentiles {
    count: u64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// One phase as the servers and the devices saw it.
#[derive(Debug, Clone, Serialize, Default)]
struct PhaseResult {
    /// Open-loop rate asked for (all devices), or 0 at saturation.
    target_rate: f64,
    acked_per_s: f64,
    durable_per_s: f64,
    latency: Percentiles,
    cpu_s_per_10k: f64,
    unacked: u64,
    failed_devices: u64,
    /// Every PUBACK of the phase, warm-up and drain included.
    acked_total: u64,
}

#[derive(Debug, Clone, Serialize, Default)]
struct Run {
    system: &'static str,
    ramp_s: f64,
    max: PhaseResult,
    half: PhaseResult,
    queryable: Percentiles,
    probes_missed: u64,
    /// Acknowledged to a device but not in the store at the end.
    acked_not_stored: i64,
}

#[derive(Debug, Clone, Serialize, Default)]
struct Footprint {
    system: &'static str,
    /// (connections, open-file limit) when the levels asked for exceed what the limit allows.
    capped: Option<(usize, u64)>,
    rss_before_mib: f64,
    /// (idle connections, RSS MiB, KiB per connection, seconds to connect them all)
    idle: Vec<(usize, f64, f64, f64)>,
    storm_devices: usize,
    /// Stop (SIGTERM) to exit.
    storm_stop_s: f64,
    /// Listening again → every device online.
    storm_online_after_listen_s: f64,
    /// Stop signal → every device online.
    storm_online_after_stop_s: f64,
    storm_failed_attempts: u64,
    /// Failed attempts during the restart, by what went wrong.
    storm_failures: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
struct Results {
    machine: String,
    date: String,
    args: String,
    runs: Vec<Run>,
    footprints: Vec<Footprint>,
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.runs = 1;
        args.devices = args.devices.min(10);
        args.warm_up = 0.5;
        args.steady = 1.5;
        args.idle = vec![20];
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    raise_open_files(
        3 * args
            .idle
            .iter()
            .max()
            .copied()
            .unwrap_or(0)
            .max(args.devices)
            + 2_000,
    )?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

/// Raises this process's open-file limits, which the servers inherit, to `want` (the hard
/// limit too if allowed), or as far as the hard limit goes: Tellus takes three files per
/// connection (the socket and both ends of its link into the routing core), Mosquitto one.
fn raise_open_files(want: usize) -> anyhow::Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let want = want as u64;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= want {
        return Ok(());
    }
    if setrlimit(Resource::RLIMIT_NOFILE, want, want.max(hard)).is_err() {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        eprintln!(
            "the open-file limit is {hard} (hard), below the {want} this run would use: \
             idle connections are measured up to what it allows (raise it with ulimit -Hn)"
        );
    }
    Ok(())
}

/// A program next to this one (cargo puts a workspace's binaries in one directory).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("no directory")?.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first (bench/run does: cargo build --release -p tellus -p tellus-bench)",
            path.display()
        );
    }
    Ok(path)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let systems: Vec<System> = args
        .systems
        .iter()
        .map(|s| match s.as_str() {
            "tellus" => Ok(System::Tellus),
            "mosquitto" => Ok(System::Mosquitto),
            other => bail!("unknown system {other:?}: tellus or mosquitto"),
        })
        .collect::<anyhow::Result<_>>()?;
    let programs = Programs {
        tellus: match &args.tellus_bin {
            Some(p) => p.clone(),
            None => sibling("tellus")?,
        },
        consumer: match &args.consumer_bin {
            Some(p) => p.clone(),
            None if systems.contains(&System::Mosquitto) => sibling("baseline-consumer")?,
            None => PathBuf::new(),
        },
        mosquitto: args.mosquitto_bin.clone(),
    };
    let temp = tempfile::tempdir()?;
    let work = args.work_dir.clone().unwrap_or_else(|| temp.path().into());
    std::fs::create_dir_all(&work)?;

    let ca = pki::BenchCa::new()?;
    let fleet_size = args.devices.max(if args.no_idle {
        0
    } else {
        args.idle.iter().copied().max().unwrap_or(0)
    });
    eprintln!("making {fleet_size} device certificates");
    let pairs: Vec<pki::Pair> = (0..fleet_size)
        .map(|i| ca.client(&device_id(i)))
        .collect::<anyhow::Result<_>>()?;
    let probe_pair = ca.client(PROBE_ID)?;

    let mut runs = Vec::new();
    for round in 0..args.runs {
        for &system in &systems {
            let dir = work.join(format!("{}-run{round}", system.name()));
            eprintln!("== {} run {} ==", system.name(), round + 1);
            let run = throughput_run(system, &dir, &args, &ca, &programs, &pairs, &probe_pair)
                .await
                .with_context(|| format!("{} run {}", system.name(), round + 1))?;
            eprintln!("{run:#?}");
            runs.push(run);
        }
    }
    let mut footprints = Vec::new();
    if !args.no_idle && !args.idle.is_empty() {
        // Every system restarts under the same fleet: the largest idle level all can hold.
        let storm = systems
            .iter()
            .map(|&s| idle_cap(s))
            .chain(args.idle.iter().max().copied())
            .min()
            .unwrap_or(0);
        for &system in &systems {
            let dir = work.join(format!("{}-idle", system.name()));
            eprintln!("== {} idle connections and restart ==", system.name());
            let footprint = footprint_run(system, &dir, &args, storm, &ca, &programs, &pairs)
                .await
                .with_context(|| format!("{} idle connections", system.name()))?;
            eprintln!("{footprint:#?}");
            footprints.push(footprint);
        }
    }
    let results = Results {
        machine: machine(),
        date: time_now(),
        args: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        runs,
        footprints,
    };
    std::fs::create_dir_all(&args.out)?;
    let table = report(&results, &systems);
    std::fs::write(args.out.join("results.md"), &table)?;
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    println!("{table}");
    // Tellus acknowledges only what it stored: anything else is a defect, not a figure.
    for run in &results.runs {
        if run.system == "tellus" && run.acked_not_stored != 0 {
            bail!(
                "Tellus acknowledged {} messages it did not store",
                run.acked_not_stored
            );
        }
    }
    Ok(())
}

fn device_id(i: usize) -> String {
    format!("dev-{i:05}")
}

fn devices_for(pairs: &[pki::Pair], n: usize, server_ca: &str) -> anyhow::Result<Vec<Arc<Device>>> {
    pairs[..n]
        .iter()
        .enumerate()
        .map(|(i, pair)| {
            Ok(Arc::new(Device::new(
                device_id(i),
                pair.client_config(server_ca)?,
            )))
        })
        .collect()
}

/// Samples the servers' CPU time and stored count at the start and the end of a phase's
/// steady window.
async fn sample_window(
    target: &Target,
    start: Instant,
    end: Instant,
) -> anyhow::Result<(f64, u64, f64)> {
    let pids = target.pids();
    tokio::time::sleep_until(start.into()).await;
    let (cpu0, stored0) = (
        procfs::sum(&pids, procfs::cpu_seconds)?,
        target.stored().await?,
    );
    let t0 = Instant::now();
    tokio::time::sleep_until(end.into()).await;
    let (cpu1, stored1) = (
        procfs::sum(&pids, procfs::cpu_seconds)?,
        target.stored().await?,
    );
    Ok((
        cpu1 - cpu0,
        stored1.saturating_sub(stored0),
        t0.elapsed().as_secs_f64(),
    ))
}

async fn measured_phase(
    target: &Target,
    sessions: Vec<Session>,
    phase: Phase,
    target_rate: f64,
) -> anyhow::Result<(Vec<Session>, PhaseResult)> {
    // A moment for every device's task to be spawned before its first message is due.
    let start = Instant::now() + Duration::from_millis(100);
    let steady = (start + phase.warm_up, start + phase.warm_up + phase.steady);
    let (phase_out, window) = tokio::join!(
        load::run_phase(sessions, phase, start),
        sample_window(target, steady.0, steady.1)
    );
    let (sessions, outcome) = phase_out;
    let (cpu, stored, secs) = window?;
    let result = PhaseResult {
        target_rate,
        acked_per_s: outcome.acked_in_steady as f64 / phase.steady.as_secs_f64(),
        durable_per_s: stored as f64 / secs,
        latency: Percentiles::of(&outcome.latency),
        cpu_s_per_10k: if stored > 0 {
            cpu / (stored as f64 / 10_000.0)
        } else {
            0.0
        },
        unacked: outcome.unacked,
        failed_devices: outcome.failed,
        acked_total: outcome.acked,
    };
    Ok((sessions, result))
}

#[allow(clippy::too_many_arguments)]
async fn throughput_run(
    system: System,
    dir: &Path,
    args: &Args,
    ca: &pki::BenchCa,
    programs: &Programs,
    pairs: &[pki::Pair],
    probe_pair: &pki::Pair,
) -> anyhow::Result<Run> {
    let target = Target::start(system, dir, ca, programs).await?;
    let devices = devices_for(pairs, args.devices, &target.server_ca_pem)?;
    let probe_device = Arc::new(Device::new(
        PROBE_ID.to_owned(),
        probe_pair.client_config(&target.server_ca_pem)?,
    ));
    let ramp_started = Instant::now();
    let sessions = load::ramp(&devices, target.mqtt_addr, 64).await?;
    let ramp_s = ramp_started.elapsed().as_secs_f64();
    let mut probe = Session::open(probe_device, target.mqtt_addr).await?;

    let (warm_up, steady) = (
        Duration::from_secs_f64(args.warm_up),
        Duration::from_secs_f64(args.steady),
    );
    let drain = Duration::from_secs(30);
    let saturate = Phase {
        pace: Pace::Saturate,
        window: args.window,
        warm_up,
        steady,
        drain,
    };
    let (sessions, max) = measured_phase(&target, sessions, saturate, 0.0).await?;
    // The baseline's consumer may still be writing what Mosquitto acknowledged: the next
    // phase starts once the store has caught up, as it would on a system at rest.
    settled_count(&target).await?;

    let half_rate = (max.durable_per_s / 2.0).max(1.0);
    let half = Phase {
        pace: Pace::Rate {
            per_device: half_rate / args.devices.max(1) as f64,
        },
        window: 256,
        warm_up,
        steady,
        drain,
    };
    let probe_start = Instant::now() + Duration::from_millis(100) + warm_up;
    let probe_end = probe_start + steady;
    let latest = || target.latest_ts(PROBE_ID, "probe");
    let (half_out, (queryable, probes_missed)) =
        tokio::join!(measured_phase(&target, sessions, half, half_rate), async {
            tokio::time::sleep_until(probe_start.into()).await;
            load::probe(&mut probe, latest, Duration::from_millis(100), probe_end).await
        });
    let (sessions, half) = half_out?;
    drop(sessions);

    // Everything acknowledged must be in the store; the baseline's consumer may still be
    // catching up, so wait for the count to settle.
    let acked = probe.acked() + max.acked_total + half.acked_total;
    let stored = settled_count(&target).await?;
    target.stop().await?;
    Ok(Run {
        system: system.name(),
        ramp_s,
        max,
        half,
        queryable: Percentiles::of(&queryable),
        probes_missed,
        acked_not_stored: acked as i64 - stored as i64,
    })
}

/// The stored count once it stopped changing for two seconds (at most two minutes).
async fn settled_count(target: &Target) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = target.stored().await?;
    let mut since = Instant::now();
    while Instant::now() < deadline && since.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = target.stored().await?;
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    Ok(last)
}

/// The open-file limit the servers inherit.
fn open_files() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft)
}

/// How many connections `system` can hold under the open-file limit.
fn idle_cap(system: System) -> usize {
    (open_files().saturating_sub(OPEN_FILES_SPARE) / system.files_per_connection()) as usize
}

#[allow(clippy::too_many_arguments)]
async fn footprint_run(
    system: System,
    dir: &Path,
    args: &Args,
    storm: usize,
    ca: &pki::BenchCa,
    programs: &Programs,
    pairs: &[pki::Pair],
) -> anyhow::Result<Footprint> {
    let mut target = Target::start(system, dir, ca, programs).await?;
    // A server holds at most as many connections as its open files allow; a level above
    // that is measured at the limit instead, and the table says so.
    let open_files = open_files();
    let cap = idle_cap(system);
    let mut levels: Vec<usize> = args.idle.iter().map(|&l| l.min(cap)).collect();
    levels.sort_unstable();
    levels.dedup();
    let largest = levels.last().copied().unwrap_or(0);
    let capped = args
        .idle
        .iter()
        .any(|&l| l > cap)
        .then_some((cap, open_files));
    let devices = devices_for(pairs, largest, &target.server_ca_pem)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let server = target.server_pid();
    let rss0 = procfs::rss_bytes(server)? as f64;
    let holders = Arc::new(Holders::default());
    let stop = CancellationToken::new();
    // One token per device, so that the restart can be made under fewer of them.
    let mut stops = Vec::with_capacity(largest);
    let mut idle = Vec::new();
    let mut started = 0;
    let first = Arc::new(Semaphore::new(64));
    for &level in &levels {
        let t0 = Instant::now();
        for device in &devices[started..level] {
            let own = stop.child_token();
            stops.push(own.clone());
            tokio::spawn(holders.clone().hold(
                device.clone(),
                target.mqtt_addr,
                first.clone(),
                own,
            ));
        }
        started = level;
        wait_online(&holders, level, Duration::from_secs(300)).await?;
        let took = t0.elapsed().as_secs_f64();
        // Let allocations settle (handshake buffers freed, registry writes done).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss = procfs::rss_bytes(server)? as f64;
        idle.push((
            level,
            rss / (1 << 20) as f64,
            (rss - rss0) / 1024.0 / level as f64,
            took,
        ));
    }
    // The reconnect storm: the broker restarts under `storm` idle devices.
    let storm = storm.min(largest);
    for own in stops.iter().skip(storm) {
        own.cancel();
    }
    while holders.online.load(Ordering::SeqCst) > storm as u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failures_before = holders.failures.load(Ordering::Relaxed);
    let kinds_before = holders.failure_kinds();
    let kill = Instant::now();
    let (stopped, listening) = target.restart().await?;
    wait_online(&holders, storm, Duration::from_secs(300)).await?;
    let online = holders.last_online().unwrap_or_else(Instant::now);
    let footprint = Footprint {
        system: system.name(),
        capped,
        rss_before_mib: rss0 / (1 << 20) as f64,
        idle,
        storm_devices: storm,
        storm_stop_s: stopped.duration_since(kill).as_secs_f64(),
        storm_online_after_listen_s: online.saturating_duration_since(listening).as_secs_f64(),
        storm_online_after_stop_s: online.saturating_duration_since(kill).as_secs_f64(),
        storm_failed_attempts: holders.failures.load(Ordering::Relaxed) - failures_before,
        storm_failures: holders
            .failure_kinds()
            .into_iter()
            .map(|(kind, n)| {
                (
                    kind.clone(),
                    n - kinds_before.get(&kind).copied().unwrap_or(0),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect(),
    };
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
    target.stop().await?;
    Ok(footprint)
}

async fn wait_online(holders: &Holders, n: usize, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while holders.online.load(Ordering::SeqCst) < n as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} devices online after {limit:?}",
                holders.online.load(Ordering::SeqCst)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0.0, |kb| kb as f64 / (1 << 20) as f64);
    format!("{cores} cores ({cpu}), {mem:.0} GiB")
}

fn time_now() -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC");
    time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_else(|_| "unknown".into())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(results: &Results, systems: &[System]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# tellus-bench results\n");
    let _ = writeln!(out, "- machine: {}", results.machine);
    let _ = writeln!(out, "- date: {}", results.date);
    let _ = writeln!(out, "- arguments: `{}`\n", results.args);
    let of = |system: System| -> Vec<&Run> {
        results
            .runs
            .iter()
            .filter(|r| r.system == system.name())
            .collect()
    };
    let med =
        |system: System, f: &dyn Fn(&Run) -> f64| median(of(system).iter().map(|r| f(r)).collect());
    type Row<'a> = (&'a str, &'a dyn Fn(&Run) -> f64);
    let rows: Vec<Row> = vec![
        ("durable messages/s, saturated", &|r| r.max.durable_per_s),
        ("PUBACKs/s, saturated", &|r| r.max.acked_per_s),
        ("publish→PUBACK p50 ms, saturated", &|r| r.max.latency.p50),
        ("publish→PUBACK p99 ms, saturated", &|r| r.max.latency.p99),
        ("open-loop rate at half the maximum, msg/s", &|r| {
            r.half.target_rate
        }),
        ("durable messages/s at half", &|r| r.half.durable_per_s),
        ("publish→PUBACK p50 ms at half", &|r| r.half.latency.p50),
        ("publish→PUBACK p99 ms at half", &|r| r.half.latency.p99),
        ("publish→PUBACK p99.9 ms at half", &|r| {
            r.half.latency.p999
        }),
        ("publish→queryable p50 ms", &|r| r.queryable.p50),
        ("publish→queryable p99 ms", &|r| r.queryable.p99),
        ("server CPU s per 10,000 messages, saturated", &|r| {
            r.max.cpu_s_per_10k
        }),
        ("server CPU s per 10,000 messages at half", &|r| {
            r.half.cpu_s_per_10k
        }),
        ("first connection of all devices, s", &|r| r.ramp_s),
        ("acknowledged but not stored", &|r| {
            r.acked_not_stored as f64
        }),
    ];
    let _ = write!(
        out,
        "## Throughput and latency (median of {} runs)\n\n| measure |",
        results.runs.len() / systems.len().max(1)
    );
    for s in systems {
        let _ = write!(out, " {} |", label(*s));
    }
    let ratio = systems.len() == 2;
    if ratio {
        let _ = write!(out, " Tellus / baseline |");
    }
    let _ = write!(out, "\n|---|");
    for _ in systems {
        let _ = write!(out, "---|");
    }
    if ratio {
        let _ = write!(out, "---|");
    }
    out.push('\n');
    for (name, f) in &rows {
        let _ = write!(out, "| {name} |");
        let values: Vec<f64> = systems.iter().map(|s| med(*s, *f)).collect();
        for v in &values {
            let _ = write!(out, " {} |", num(*v));
        }
        if ratio {
            let _ = write!(
                out,
                " {} |",
                if values[1] != 0.0 {
                    format!("{:.2}", values[0] / values[1])
                } else {
                    "—".into()
                }
            );
        }
        out.push('\n');
    }
    let _ = writeln!(out, "\n### Every run\n\n| system | durable/s saturated | PUBACKs/s saturated | half rate | p50 / p99 / p99.9 ms at half | queryable p50 / p99 ms | unacked | failed devices |\n|---|---|---|---|---|---|---|---|");
    for r in &results.runs {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} / {} / {} | {} / {} | {} | {} |",
            r.system,
            num(r.max.durable_per_s),
            num(r.max.acked_per_s),
            num(r.half.target_rate),
            num(r.half.latency.p50),
            num(r.half.latency.p99),
            num(r.half.latency.p999),
            num(r.queryable.p50),
            num(r.queryable.p99),
            r.max.unacked + r.half.unacked,
            r.max.failed_devices + r.half.failed_devices,
        );
    }
    if !results.footprints.is_empty() {
        let _ = writeln!(out, "\n## Idle connections and restart\n\n| system | RSS before | idle connections: RSS, KiB per connection, seconds to connect | restart: stop s | back online after listening s | after stop signal s | failed attempts during the restart |\n|---|---|---|---|---|---|---|");
        for f in &results.footprints {
            let idle: Vec<String> = f
                .idle
                .iter()
                .map(|(n, rss, per, took)| format!("{n}: {rss:.0} MiB, {per:.1} KiB, {took:.1} s"))
                .collect();
            let capped = f.capped.map_or(String::new(), |(n, files)| {
                format!(" (at most {n}: the open-file limit is {files})")
            });
            let _ = writeln!(
                out,
                "| {}{capped} | {:.0} MiB | {} | {:.2} | {:.2} ({} devices) | {:.2} | {} |",
                f.system,
                f.rss_before_mib,
                idle.join("; "),
                f.storm_stop_s,
                f.storm_online_after_listen_s,
                f.storm_devices,
                f.storm_online_after_stop_s,
                f.storm_failures
                    .iter()
                    .map(|(kind, n)| format!("{n} {kind}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            );
        }
    }
    out
}

fn label(system: System) -> &'static str {
    match system {
        System::Tellus => "Tellus",
        System::Mosquitto => "Mosquitto + consumer",
    }
}

fn num(v: f64) -> String {
    if v.is_nan() {
        "—".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}
