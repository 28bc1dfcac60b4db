//! What rules cost: acknowledged telemetry messages per second through the durable ingest
//! path, with no rules, with 100 enabled rules that only evaluate, and with 100 rules of
//! which 10 write a derived metric for every reading. BENCHMARKS.md has the method and the
//! figures.
//!
//! `cargo bench -p tellus-rules --bench throughput` (release). Environment: `ROUNDS`
//! (default 5), `MESSAGES` per run (default 300,000: long enough that every run holds about
//! as many of the store's merges). Each round runs the three cases in turn, each on a fresh
//! store, so that drift in the machine's speed falls on all three alike.

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use futures::{stream::FuturesUnordered, StreamExt};
use tellus_broker::{devices::Devices, routing::Publisher};
use tellus_core::{
    now_ms,
    rule::{RULE_FEED_BYTES, RULE_FEED_QUEUE},
    topic::DeviceTopic,
    DeviceId, IngestSender, Live, NewDevice, Registry, Rule, RuleFeed, RuleSpec,
};
use tellus_ingest::{
    Ingest, IngestConfig, SqliteRegistry, SqliteStore, StoreConfig, TelemetryStore,
};
use tellus_rules::service::{self, Outlets, RulesConfig};
use tokio_util::sync::CancellationToken;

const DEVICES: usize = 1_000;
/// Messages waiting for their acknowledgement at once, as many devices publishing would.
const IN_FLIGHT: usize = 2_000;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// 100 rules on telemetry: conditions over the reading's metrics and the device's tags, none
/// of which holds (they evaluate only), except that `deriving` of them always hold and write
/// a derived metric.
fn rules(deriving: usize) -> Vec<Rule> {
    (0..100)
        .map(|i| {
            let (condition, actions) = if i < deriving {
                (
                    "has(metrics.temp)".to_owned(),
                    serde_json::json!([{"type": "metric", "name": format!("derived_{i}"),
                                        "value": "metrics.temp * 1.8 + 32.0"}]),
                )
            } else {
                (
                    format!(
                        "metrics.temp > {} && metrics.humidity < 5.0 && device.tags.site == 'plant-{}'",
                        100 + i,
                        i % 7
                    ),
                    serde_json::json!([{"type": "alert", "severity": "warning"},
                                       {"type": "webhook", "url": "http://127.0.0.1:9/never"}]),
                )
            };
            let spec: RuleSpec = serde_json::from_value(serde_json::json!({
                "name": format!("rule {i}"), "trigger": "telemetry",
                "condition": condition, "actions": actions,
            }))
            .expect("rule");
            Rule {
                id: format!("r-bench-{i:03}"),
                spec,
                enabled: true,
                version: 1,
                created_at_ms: 0,
                updated_at_ms: 0,
            }
        })
        .collect()
}

/// One round: `messages` JSON messages of three metrics (about 200 bytes) from
/// [`DEVICES`] devices, [`IN_FLIGHT`] at a time; returns acknowledged messages per second.
async fn round(tx: &IngestSender, devices: &[DeviceId], messages: usize, round: usize) -> f64 {
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for i in 0..messages {
        if pending.len() >= IN_FLIGHT {
            pending.next().await;
        }
        let device = devices[i % devices.len()].clone();
        let payload = format!(
            r#"{{"ts": {}, "values": {{"temp": {:.2}, "humidity": {:.1}, "status": "running-normally-{}"}}}}"#,
            1_700_000_000_000i64 + (round * messages + i) as i64,
            20.0 + (i % 100) as f64 / 10.0,
            40.0 + (i % 50) as f64,
            i % 10
        );
        let ack = tx
            .submit(
                device,
                DeviceTopic::Telemetry,
                Bytes::from(payload),
                now_ms(),
                true,
            )
            .await
            .expect("ingest")
            .expect("an acknowledgement");
        pending.push(ack);
    }
    while pending.next().await.is_some() {}
    messages as f64 / started.elapsed().as_secs_f64()
}

/// One measured run of `messages` on a fresh store: its rate, and the engine's mean time
/// per input (µs).
async fn run(deriving: Option<usize>, messages: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry: Arc<dyn Registry> =
        Arc::new(SqliteRegistry::open(&dir.path().join("registry.db")).expect("registry"));
    let store: Arc<dyn TelemetryStore> = Arc::new(
        SqliteStore::open_with(
            &dir.path().join("telemetry.db"),
            // Fsync per commit, the default.
            StoreConfig::default(),
        )
        .expect("store"),
    );
    let devices: Vec<DeviceId> = (0..DEVICES)
        .map(|i| DeviceId::parse(&format!("dev-{i:04}")).expect("id"))
        .collect();
    for (i, d) in devices.iter().enumerate() {
        registry
            .insert_device(&NewDevice {
                id: d.clone(),
                tags: [("site".to_owned(), format!("plant-{}", i % 7))].into(),
                created_at_ms: 0,
                cert_issuer: tellus_core::FLEET_ISSUER.to_owned(),
                cert_serial: format!("{i:04x}"),
                cert_not_after_ms: i64::MAX,
            })
            .expect("device");
    }
    if let Some(deriving) = deriving {
        for rule in rules(deriving) {
            registry.insert_rule(&rule).expect("rule");
        }
    }
    let live = Live::default();
    let (feed, inputs) = RuleFeed::channel(RULE_FEED_QUEUE, RULE_FEED_BYTES);
    let (tx, rx) = IngestSender::channel(10_000, 64 << 20);
    let ingest = Ingest::spawn(
        rx,
        store.clone(),
        IngestConfig::default(),
        live.clone(),
        feed.clone(),
    )
    .expect("ingest");
    let (devices_service, _, _) = Devices::new(
        registry.clone(),
        Publisher::detached(),
        256 << 10,
        live.clone(),
        RuleFeed::none(),
    );
    let stop = CancellationToken::new();
    let (rules, running) = service::start(
        RulesConfig::default(),
        Outlets {
            registry: registry.clone(),
            devices: devices_service,
            publisher: Publisher::detached(),
            store: store.clone(),
            live,
        },
        feed,
        inputs,
        stop.clone(),
    )
    .expect("rules");
    // The engine has loaded the rules once it has opened their figures.
    if deriving.is_some() {
        while rules.figures().get("r-bench-099").is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    // Warm-up: creates every series.
    round(&tx, &devices, devices.len() * 2, 0).await;
    let rate = round(&tx, &devices, messages, 1).await;
    drop(tx);
    ingest.finished().await;
    stop.cancel();
    running.finished().await;
    (rate, rules.figures().engine().mean_us_per_input)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn show(name: &str, runs: &[(f64, f64)]) {
    let rates: Vec<f64> = runs.iter().map(|r| r.0).collect();
    let each: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
    let engine = median(&runs.iter().map(|r| r.1).collect::<Vec<_>>());
    println!(
        "{name:<36} {} | median {:.0} msg/s | engine {engine:.1} µs/input",
        each.join(" "),
        median(&rates)
    );
}

fn main() {
    let rounds = env("ROUNDS", 5);
    let messages = env("MESSAGES", 300_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        println!(
            "{rounds} rounds of the three cases in turn, {messages} messages each, {DEVICES} devices, fsync per commit"
        );
        let cases = [None, Some(0), Some(10)];
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); cases.len()];
        for _ in 0..rounds {
            for (case, deriving) in cases.iter().enumerate() {
                runs[case].push(run(*deriving, messages).await);
            }
        }
        show("no rules", &runs[0]);
        show("100 rules, evaluating", &runs[1]);
        show("100 rules, 10 writing a metric each", &runs[2]);
        let rate = |case: usize| median(&runs[case].iter().map(|r| r.0).collect::<Vec<_>>());
        // Each round's cases ran back to back: their ratios are paired.
        let paired = |case: usize| {
            median(
                &runs[case]
                    .iter()
                    .zip(&runs[0])
                    .map(|(r, none)| r.0 / none.0)
                    .collect::<Vec<_>>(),
            )
        };
        println!(
            "ratio of medians to no rules: evaluating {:.3}, deriving {:.3}; median of paired ratios: evaluating {:.3}, deriving {:.3}",
            rate(1) / rate(0),
            rate(2) / rate(0),
            paired(1),
            paired(2)
        );
    });
}
