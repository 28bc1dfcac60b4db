//! What the outbox costs a device program: readings per second that `Device::send` takes,
//! with the outbox in memory, in a file written through to the OS (`Durability::Process`),
//! and in a file synced per write (`Durability::PowerLoss`, the default); one sender
//! awaiting each reading, and 32 senders at once (the writer commits what has gathered in
//! one transaction). Tellus is not running: every reading stays in the outbox, which is what
//! an offline device does. BENCHMARKS.md has the method and the figures.
//!
//! `cargo bench -p tellus-device --bench outbox` (release). Environment: `ROUNDS` (default
//! 5), `READINGS` per run (default 4,000).

use std::{sync::Arc, time::Instant};

use futures::future::join_all;
use tellus_device::{Credentials, Device, Durability, OutboxConfig, Reading};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Credentials of a self-signed device "bench": enough to start a device that never
/// connects.
fn credentials() -> Credentials {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bench");
    let cert = params.self_signed(&key).expect("certificate").pem();
    Credentials::from_pem(cert.clone(), key.serialize_pem(), cert).expect("credentials")
}

#[derive(Clone, Copy, Debug)]
enum Outbox {
    Memory,
    Process,
    PowerLoss,
}

/// Readings per second that `senders` tasks get `send` to take, `readings` in all.
async fn run(outbox: Outbox, senders: usize, readings: usize, dir: &std::path::Path) -> f64 {
    let config = match outbox {
        Outbox::Memory => OutboxConfig::memory(),
        Outbox::Process | Outbox::PowerLoss => {
            let mut c = OutboxConfig::file(dir.join(format!("{outbox:?}-{senders}.db")));
            c.durability = if matches!(outbox, Outbox::Process) {
                Durability::Process
            } else {
                Durability::PowerLoss
            };
            c
        }
    };
    // A port nothing listens on: the device stays offline.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let device = Arc::new(
        Device::builder(credentials(), "127.0.0.1", port)
            .outbox(config)
            .start()
            .expect("device"),
    );
    let base = tellus_core::now_ms();
    let per_sender = readings / senders;
    let started = Instant::now();
    join_all((0..senders).map(|s| {
        let device = device.clone();
        async move {
            for i in 0..per_sender {
                let n = (s * per_sender + i) as i64;
                let reading = Reading::at(base + n)
                    .with("temperature", 21.5)
                    .with("humidity", 40.25)
                    .with("status", "ok");
                device.send(reading).await.expect("send");
            }
        }
    }))
    .await;
    let rate = (per_sender * senders) as f64 / started.elapsed().as_secs_f64();
    assert_eq!(
        device.stats().recorded,
        (per_sender * senders) as u64,
        "every reading taken"
    );
    if let Ok(device) = Arc::try_unwrap(device) {
        device.close().await;
    }
    rate
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let rounds = env("ROUNDS", 5);
    let readings = env("READINGS", 4_000);
    let cases: Vec<(Outbox, usize)> = [Outbox::Memory, Outbox::Process, Outbox::PowerLoss]
        .into_iter()
        .flat_map(|o| [(o, 1), (o, 32)])
        .collect();
    let mut rates = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        // Each round runs every case in turn, on fresh files, so that drift in the
        // machine's speed falls on all alike.
        let dir = tempfile::tempdir().expect("temporary folder");
        for (i, (outbox, senders)) in cases.iter().enumerate() {
            let rate = run(*outbox, *senders, readings, dir.path()).await;
            eprintln!("round {round}: {outbox:?}, {senders} sender(s): {rate:.0} readings/s");
            rates[i].push(rate);
        }
    }
    println!("| outbox | senders | readings/s per run | median |");
    println!("|---|---|---|---|");
    for ((outbox, senders), mut r) in cases.into_iter().zip(rates) {
        let runs: Vec<String> = r.iter().map(|x| format!("{x:.0}")).collect();
        println!(
            "| {outbox:?} | {senders} | {} | **{:.0}** |",
            runs.join(" "),
            median(&mut r)
        );
    }
}
