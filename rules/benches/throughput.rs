//! What rules cost: acknowledged telemetry messages per second through the durable ingest
//! path, with no rules, with 100 enabled rules that only evaluate, and with 100 rules of
//! which 10 write a derived metric for every reading. BENCHMARKS.md has the method and the
//! figures.
//!
//! `cargo bench -p tellus-rules --bench throughput` (release). Environment: `ROUNDS`
//! (default 5), `MESSAGES` per round (default 300,000: long enough that every round holds
//! about as many of the store's merges).

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

/// The rates of each round, and the engine's mean time per input (µs).
async fn run(deriving: Option<usize>, rounds: usize, messages: usize) -> (Vec<f64>, f64) {
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
    let mut rates = Vec::new();
    for r in 1..=rounds {
        rates.push(round(&tx, &devices, messages, r).await);
    }
    drop(tx);
    ingest.finished().await;
    stop.cancel();
    running.finished().await;
    (rates, rules.figures().engine().mean_us_per_input)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn show(name: &str, (rates, engine_us): &(Vec<f64>, f64)) {
    let each: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
    println!(
        "{name:<36} {} | median {:.0} msg/s | engine {engine_us:.1} µs/input",
        each.join(" "),
        median(rates)
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
        println!("{rounds} rounds of {messages} messages, {DEVICES} devices, fsync per commit");
        let none = run(None, rounds, messages).await;
        show("no rules", &none);
        let evaluate = run(Some(0), rounds, messages).await;
        show("100 rules, evaluating", &evaluate);
        let derive = run(Some(10), rounds, messages).await;
        show("100 rules, 10 writing a metric each", &derive);
        println!(
            "ratio to no rules: evaluating {:.3}, deriving {:.3}",
            median(&evaluate.0) / median(&none.0),
            median(&derive.0) / median(&none.0)
        );
    });
}
