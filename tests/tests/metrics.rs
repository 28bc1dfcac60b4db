//! Operating Tellus, end to end: `GET /metrics` read by a Prometheus text-format parser
//! while a real device (the SDK, over mTLS) sends telemetry and answers a command, and a
//! stranger's certificate is refused; the probes; and JSON logs.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_parse::{LineInfo, Scrape, Value as Sample};
use serde_json::{json, Value};
use tellus_device::{Device, Reading};
use tellus_tests::{certs, tellus_bin, Tellus, EVENTUALLY};

/// Scrapes `/metrics` with the admin token and parses it as a scraper would, checking the
/// format strictly on the way: the content type, every line a comment or a sample, every
/// family with HELP and TYPE.
async fn scrape(t: &Tellus) -> Scrape {
    let response = reqwest::Client::new()
        .get(t.url("/metrics"))
        .bearer_auth(&t.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    let mut typed = Vec::new();
    for line in text.lines() {
        match LineInfo::parse(line) {
            LineInfo::Type { metric_name, .. } => typed.push(metric_name),
            LineInfo::Doc { .. } | LineInfo::Sample { .. } => {}
            other => panic!("not a line of the text format: {line:?} ({other:?})\n{text}"),
        }
    }
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    for name in typed {
        let base = name.strip_suffix("_bucket").unwrap_or(&name);
        assert!(
            scrape.docs.contains_key(base),
            "{base} has no HELP:\n{text}"
        );
        assert!(name.starts_with("tellus_"), "{name}");
    }
    scrape
}

/// The value of the sample `name` whose labels include `labels`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match &sample.value {
        Sample::Counter(v) | Sample::Gauge(v) | Sample::Untyped(v) => *v,
        other => panic!("{name} is not a number: {other:?}"),
    }
}

/// The buckets of histogram `name`: (upper bound in seconds, cumulative count).
fn buckets(scrape: &Scrape, name: &str) -> Vec<(f64, f64)> {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .unwrap_or_else(|| panic!("no histogram {name}"));
    match &sample.value {
        Sample::Histogram(b) => b.iter().map(|b| (b.less_than, b.count)).collect(),
        other => panic!("{name} is not a histogram: {other:?}"),
    }
}

/// Scrapes until `done` holds (each scrape checked), for at most [`EVENTUALLY`].
async fn scrape_until(t: &Tellus, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let s = scrape(t).await;
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never so: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get_public(t: &Tellus, path: &str) -> (u16, Value) {
    let r = reqwest::get(t.url(path)).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_device_a_command_and_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);

    // The probes need no token; readiness comes once the gate accepts.
    assert_eq!(
        get_public(&t, "/healthz").await,
        (200, json!({"status": "ok"}))
    );
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let (status, body) = get_public(&t, "/readyz").await;
        if status == 200 {
            assert_eq!(body, json!({"status": "ready"}));
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The metrics need a token; a viewer's will do.
    let (status, body) = get_public(&t, "/metrics").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, viewer) = t
        .post(
            "/api/v1/tokens",
            json!({"name": "prometheus", "role": "viewer"}),
        )
        .await;
    assert_eq!(status, 201, "{viewer}");
    let scraped = reqwest::Client::new()
        .get(t.url("/metrics"))
        .bearer_auth(viewer["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(scraped.status(), 200);

    let before = scrape(&t).await;
    assert_eq!(value(&before, "tellus_connections_open", &[]), 0.0);
    assert_eq!(
        value(&before, "tellus_queue_capacity", &[("queue", "ingest")]),
        4096.0
    );

    // A device sends readings and answers a command.
    let creds = t.create_device("metered-01").await;
    let device = Device::builder(creds, "127.0.0.1", t.mqtt_addr.port())
        .on_command(
            "ping",
            |cmd| async move { Ok(json!({ "pong": cmd.params })) },
        )
        .start()
        .unwrap();
    tokio::time::timeout(EVENTUALLY, device.connected())
        .await
        .expect("the device connects");
    for i in 0..5 {
        device
            .send(
                Reading::now()
                    .with("temperature", 20.0 + i as f64)
                    .with("rssi", -60),
            )
            .await
            .unwrap();
    }
    tokio::time::timeout(EVENTUALLY, device.flush())
        .await
        .expect("the readings are stored");
    let (status, command) = t
        .post(
            "/api/v1/devices/metered-01/commands?wait=20s",
            json!({"name": "ping", "params": {"n": 1}}),
        )
        .await;
    assert_eq!(status, 200, "{command}");
    assert_eq!(command["status"], "succeeded", "{command}");

    let after = scrape_until(&t, "the command counted as succeeded", |s| {
        value(s, "tellus_commands_total", &[("status", "succeeded")]) >= 1.0
    })
    .await;
    let moved = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    assert_eq!(value(&after, "tellus_connections_open", &[]), 1.0);
    assert!(moved("tellus_connections_accepted_total", &[]) >= 1.0);
    assert!(moved("tellus_connections_admitted_total", &[]) >= 1.0);
    assert!(moved("tellus_messages_in_total", &[("kind", "telemetry")]) >= 1.0);
    assert_eq!(
        moved("tellus_messages_in_total", &[("kind", "command_result")]),
        1.0
    );
    assert!(moved("tellus_ingest_messages_received_total", &[]) >= 1.0);
    assert!(moved("tellus_ingest_messages_stored_total", &[]) >= 1.0);
    // Five readings of two metrics each, each its own time.
    assert_eq!(moved("tellus_ingest_points_stored_total", &[]), 10.0);
    assert!(moved("tellus_ingest_commits_total", &[]) >= 1.0);
    assert!(moved("tellus_ingest_commit_duration_seconds_count", &[]) >= 1.0);
    assert!(value(&after, "tellus_ingest_commit_duration_seconds_sum", &[]) > 0.0);
    assert_eq!(
        moved("tellus_messages_out_total", &[("kind", "command")]),
        1.0
    );
    for status in ["queued", "sent", "delivered", "succeeded"] {
        assert_eq!(
            moved("tellus_commands_total", &[("status", status)]),
            1.0,
            "{status}"
        );
    }
    assert_eq!(moved("tellus_commands_total", &[("status", "failed")]), 0.0);
    // The histogram is cumulative, in seconds, and ends with +Inf at the count.
    let commit = buckets(&after, "tellus_ingest_commit_duration_seconds");
    assert!(
        commit
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "{commit:?}"
    );
    assert_eq!(commit.first().map(|b| b.0), Some(0.001), "{commit:?}");
    let last = commit.last().copied().unwrap();
    assert!(last.0.is_infinite(), "{commit:?}");
    assert_eq!(
        last.1,
        value(&after, "tellus_ingest_commit_duration_seconds_count", &[])
    );

    // A certificate from a CA Tellus does not trust is refused in the handshake.
    let (stranger, _) = certs::own_ca("Stranger CA");
    let forged = certs::device(
        &stranger,
        "metered-01",
        &t.create_device("other").await.ca_pem,
    );
    let (_client, mut events) = rumqttc::AsyncClient::new(t.mqtt_options(&forged), 10);
    tellus_tests::mqtt::expect_refused(&mut events).await;
    let refused = scrape_until(&t, "the handshake refusal counted", |s| {
        value(
            s,
            "tellus_connections_refused_total",
            &[("reason", "handshake_failed")],
        ) > value(
            &before,
            "tellus_connections_refused_total",
            &[("reason", "handshake_failed")],
        )
    })
    .await;
    assert_eq!(value(&refused, "tellus_connections_open", &[]), 1.0);

    device.close().await;
    let (status, _) = get_public(&t, "/readyz").await;
    assert_eq!(status, 200);
    assert!(t.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tellus.toml");
    std::fs::write(&config, "[log]\nformat = \"json\"\n").unwrap();
    let mut child = Command::new(tellus_bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .args(["--mqtt-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "info,rumqttd=off,rustls=error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tellus");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let (http_tx, http_rx) = std::sync::mpsc::channel::<SocketAddr>();
    let reader = {
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("[tellus] {line}");
                if let Ok(entry) = serde_json::from_str::<Value>(&line) {
                    let fields = &entry["fields"];
                    if fields["message"] == "listening" && fields["listener"] == "http" {
                        if let Some(addr) = fields["addr"].as_str().and_then(|a| a.parse().ok()) {
                            let _ = http_tx.send(addr);
                        }
                    }
                }
                lines.lock().unwrap().push(line);
            }
        })
    };
    let http = http_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("a JSON line saying where HTTP listens");
    let r = reqwest::get(format!("http://{http}/healthz"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    reader.join().unwrap();
    let lines = lines.lock().unwrap();
    assert!(lines.len() >= 3, "{lines:?}");
    for line in lines.iter() {
        let entry: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line:?}"));
        assert!(entry["timestamp"].is_string(), "{line}");
        assert!(entry["level"].is_string(), "{line}");
        assert!(entry["fields"]["message"].is_string(), "{line}");
    }
    assert!(
        lines.iter().any(|l| l.contains("\"message\":\"stopped\"")),
        "{lines:?}"
    );
}
