//! The edge under abuse and with other clients: idle and slow-loris sockets, a device that
//! floods, and a device written with another MQTT library (Python paho-mqtt,
//! `tests/python/paho_device.py`).
//!
//! Nothing here asserts on elapsed time: latencies and rates are measured and printed, and a
//! test fails only when something does not happen within a generous wait.

use std::{
    path::Path,
    process::{Command, Output},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rumqttc::{Event, Packet, QoS};
use serde_json::{json, Value};
use tellus_device::Credentials;
use tellus_tests::{
    mqtt::{connect, publish_acked, WAIT},
    raise_open_files, Tellus,
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

/// Device time of the first test message.
static BASE: std::sync::LazyLock<i64> = std::sync::LazyLock::new(tellus_tests::recent_base);

/// The gate's counters.
async fn gate_stats(t: &Tellus) -> Value {
    let (status, stats) = t.get("/api/v1/stats").await;
    assert_eq!(status, 200, "{stats}");
    stats["gate"].clone()
}

/// Polls the gate's counters until `ready` holds, for at most [`WAIT`].
async fn wait_for_stats(t: &Tellus, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let gate = gate_stats(t).await;
        if ready(&gate) {
            return gate;
        }
        assert!(Instant::now() < deadline, "{what} never happened: {gate}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every point of `metric` of `device` between device times BASE and BASE + 1,000,000.
async fn points(t: &Tellus, device: &str, metric: &str) -> Vec<Value> {
    let (status, body) = t
        .get(&format!(
            "/api/v1/devices/{device}/telemetry?metric={metric}&agg=none&from={}&to={}&limit=1000",
            *BASE,
            *BASE + 1_000_000
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["next"].is_null(), "more than one page: {body}");
    body["points"].as_array().unwrap().clone()
}

/// Whether the server still holds `socket` open: nothing to read, and no end of stream.
fn still_open(socket: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(socket.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// The start of a TLS ClientHello: a handshake record header announcing 512 bytes, then
/// the handshake header and the client version. A slow-loris client sends some of it and
/// then nothing, or one byte at a time.
const CLIENT_HELLO_START: [u8; 11] = [
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_loris_sockets_do_not_delay_a_device() {
    const IDLE: usize = 500;
    const SILENT_LORIS: usize = 3;
    // 500 sockets on each side, plus Tellus's own files and the other tests of this binary.
    raise_open_files(4096);
    let dir = tempfile::tempdir().unwrap();
    // Long enough that no idle socket is closed by its deadline during the test.
    let t = Tellus::start_in(dir.path(), Some("[mqtt]\nhandshake_timeout = \"120s\"\n"));
    let creds = t.create_device("punctual").await;

    // For comparison: the device's connect with nothing else on the port.
    let since = Instant::now();
    let first = connect(t.mqtt_options(&creds)).await;
    let quiet_connect = since.elapsed();
    drop(first);

    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(t.mqtt_addr).await.unwrap());
    }
    let mut loris = Vec::new();
    for _ in 0..SILENT_LORIS {
        let mut s = TcpStream::connect(t.mqtt_addr).await.unwrap();
        s.write_all(&CLIENT_HELLO_START[..7]).await.unwrap();
        loris.push(s);
    }
    // One that dribbles a byte every 500 ms for as long as the test runs.
    let dribbled = Arc::new(AtomicUsize::new(0));
    let dribbler = {
        let mut s = TcpStream::connect(t.mqtt_addr).await.unwrap();
        let dribbled = dribbled.clone();
        tokio::spawn(async move {
            let bytes = CLIENT_HELLO_START.into_iter().chain(std::iter::repeat(0));
            for byte in bytes {
                if s.write_all(&[byte]).await.is_err() {
                    return;
                }
                dribbled.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    // The dribbler is under way, and the gate has taken every socket off the listen backlog
    // and is in their handshakes, so the device below really competes with them.
    let deadline = Instant::now() + WAIT;
    while dribbled.load(Ordering::Relaxed) < 4 {
        assert!(Instant::now() < deadline, "the dribbler could not write");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expected = 1 + IDLE as u64 + SILENT_LORIS as u64 + 1;
    wait_for_stats(&t, "accepting the idle sockets", |g| {
        g["accepted"].as_u64() >= Some(expected)
    })
    .await;

    let since = Instant::now();
    let (client, mut events) = connect(t.mqtt_options(&creds)).await;
    let busy_connect = since.elapsed();
    let since = Instant::now();
    publish_acked(
        &client,
        &mut events,
        &creds.telemetry_topic(),
        &json!({"ts": *BASE, "values": {"t": 1}}).to_string(),
    )
    .await;
    let busy_publish = since.elapsed();
    eprintln!(
        "connect with the port to itself: {quiet_connect:?}; beside {IDLE} idle and {} \
         slow-loris sockets: connect {busy_connect:?}, QoS 1 publish to PUBACK {busy_publish:?}",
        SILENT_LORIS + 1
    );
    assert_eq!(points(&t, "punctual", "t").await, vec![json!([*BASE, 1])]);

    // The sockets were held open all along: none was closed by a deadline or a limit.
    assert!(
        idle.iter().chain(&loris).all(still_open),
        "the gate closed idle or slow-loris sockets during the test"
    );
    assert!(
        !dribbler.is_finished(),
        "the gate closed the dribbling socket"
    );
    dribbler.abort();
    eprintln!(
        "the dribbler sent {} bytes meanwhile",
        dribbled.load(Ordering::Relaxed)
    );
    let gate = gate_stats(&t).await;
    assert_eq!(gate["handshake_timeout"], 0, "{gate}");
    assert_eq!(gate["connections_limited"], 0, "{gate}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_flood_slows_only_the_flooding_device() {
    const FLOOD: usize = 400;
    const CALM: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(
        dir.path(),
        Some("[mqtt]\nmax_messages_per_second = 50\nmessage_burst = 50\n"),
    );
    let flooder = t.create_device("flood-a").await;
    let calm = t.create_device("calm-b").await;

    let mut options = t.mqtt_options(&flooder);
    options.set_inflight(100);
    let (client_a, mut events_a) = connect(options).await;
    let (client_b, mut events_b) = connect(t.mqtt_options(&calm)).await;

    // Device A: 400 QoS 1 publishes as fast as rumqttc sends them, each with its device
    // time, until every one is acknowledged. Any error means A was cut off.
    let acked_a = Arc::new(AtomicUsize::new(0));
    let flood = {
        let acked = acked_a.clone();
        let topic = flooder.telemetry_topic();
        tokio::spawn(async move {
            let publisher = tokio::spawn(async move {
                for k in 0..FLOOD as i64 {
                    let body = json!({"ts": *BASE + k, "values": {"seq": k}}).to_string();
                    client_a
                        .publish(&topic, QoS::AtLeastOnce, false, body)
                        .await
                        .unwrap();
                }
                client_a
            });
            let since = Instant::now();
            while acked.load(Ordering::Relaxed) < FLOOD {
                let n = acked.load(Ordering::Relaxed);
                match tokio::time::timeout(WAIT, events_a.poll()).await {
                    Err(_) => panic!("device A: nothing happened for {WAIT:?} after {n} PUBACKs"),
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                        panic!("device A reconnected after {n} PUBACKs")
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("device A was disconnected after {n} PUBACKs: {e:?}"),
                }
            }
            let took = since.elapsed();
            (publisher.await.unwrap(), events_a, took)
        })
    };

    // Device B starts once the gate is holding A back, and publishes one message at a time.
    wait_for_stats(&t, "rate limiting device A", |g| {
        g["rate_limited"].as_u64() > Some(0)
    })
    .await;
    let acked_a_when_b_started = acked_a.load(Ordering::Relaxed);
    let since = Instant::now();
    let mut slowest_b = Duration::ZERO;
    for k in 0..CALM as i64 {
        let one = Instant::now();
        publish_acked(
            &client_b,
            &mut events_b,
            &calm.telemetry_topic(),
            &json!({"ts": *BASE + k, "values": {"n": k}}).to_string(),
        )
        .await;
        slowest_b = slowest_b.max(one.elapsed());
    }
    let took_b = since.elapsed();
    let acked_a_when_b_ended = acked_a.load(Ordering::Relaxed);

    let (client_a, mut events_a, took_a) = flood.await.unwrap();
    eprintln!(
        "device A (flooding, 50/s allowed, burst 50): {FLOOD} acknowledged in {took_a:?}, \
         {:.1} msg/s",
        FLOOD as f64 / took_a.as_secs_f64()
    );
    eprintln!(
        "device B (one at a time): {CALM} acknowledged in {took_b:?}, {:.1} msg/s, slowest \
         round trip {slowest_b:?}; meanwhile A went from {acked_a_when_b_started} to \
         {acked_a_when_b_ended} acknowledged",
        CALM as f64 / took_b.as_secs_f64()
    );

    // A is still connected on the same session: one more publish is acknowledged.
    publish_acked(
        &client_a,
        &mut events_a,
        &flooder.telemetry_topic(),
        &json!({"ts": *BASE, "values": {"after": true}}).to_string(),
    )
    .await;

    // Nothing was dropped: every message of both devices is stored, at its device time.
    let stored_a = points(&t, "flood-a", "seq").await;
    let expected_a: Vec<Value> = (0..FLOOD as i64).map(|k| json!([*BASE + k, k])).collect();
    assert_eq!(
        stored_a.len(),
        FLOOD,
        "device A: {} of {FLOOD} stored",
        stored_a.len()
    );
    assert_eq!(stored_a, expected_a);
    let stored_b = points(&t, "calm-b", "n").await;
    let expected_b: Vec<Value> = (0..CALM as i64).map(|k| json!([*BASE + k, k])).collect();
    assert_eq!(stored_b, expected_b);

    let gate = gate_stats(&t).await;
    eprintln!("gate rate_limited = {}", gate["rate_limited"]);
    assert!(gate["rate_limited"].as_u64() > Some(0), "{gate}");
    // One connect each: A was never cut off and reconnected.
    assert_eq!(gate["connected"], 2, "{gate}");
    let (_, stats) = t.get("/api/v1/stats").await;
    assert_eq!(
        stats["ingest"]["received"],
        FLOOD + CALM + 1,
        "every message reached ingest: {stats}"
    );
}

/// Whether `python3` can import `module` (see [`tellus_tests::require`]).
fn require_python_module(module: &str, install: &str) -> bool {
    let mut probe = Command::new("python3");
    probe.args(["-c", &format!("import {module}")]);
    tellus_tests::require(&format!("python3 can import {module}"), probe, install)
}

/// Runs `tests/python/paho_device.py` as `creds`, publishing `message` to its telemetry.
async fn paho_publish(
    t: &Tellus,
    dir: &Path,
    creds: &Credentials,
    message: &str,
    qos: u8,
    protocol: &str,
) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/paho_device.py");
    let (cert, key, ca) = creds.write_to_dir(dir).unwrap();
    let run = tokio::process::Command::new("python3")
        .arg(script)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &t.mqtt_addr.port().to_string(),
        ])
        .arg("--cafile")
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args([
            "--id",
            creds.id.as_str(),
            "--topic",
            &creds.telemetry_topic(),
        ])
        .args(["--message", message, "--qos", &qos.to_string()])
        .args(["--protocol", protocol])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(3 * WAIT, run)
        .await
        .expect("paho_device.py did not end")
        .unwrap();
    eprintln!(
        "paho_device.py {}: exit {:?}\n{}{}",
        creds.id.as_str(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paho_mqtt_device_publishes_and_an_unregistered_one_is_refused() {
    if !require_python_module("paho.mqtt.client", "python3 -m pip install paho-mqtt") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(&dir.path().join("data"), None);
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();

    // A registered device, at QoS 1 and at QoS 2, in MQTT 3.1.1 and 5.
    let creds = t.create_device("paho-01").await;
    let runs = [
        (1, "3.1.1", 48.5),
        (2, "3.1.1", 49.0),
        (1, "5", 49.5),
        (2, "5", 50.0),
    ];
    for (i, (qos, protocol, humidity)) in runs.into_iter().enumerate() {
        let values =
            json!({"ts": *BASE + i as i64, "values": {"humidity": humidity, "lib": "paho"}});
        let out = paho_publish(&t, &certs, &creds, &values.to_string(), qos, protocol).await;
        assert!(
            out.status.success(),
            "paho_device.py failed at QoS {qos} over MQTT {protocol}: {out:?}"
        );
    }
    assert_eq!(
        points(&t, "paho-01", "humidity").await,
        vec![
            json!([*BASE, 48.5]),
            json!([*BASE + 1, 49.0]),
            json!([*BASE + 2, 49.5]),
            json!([*BASE + 3, 50.0])
        ]
    );
    let (_, latest) = t.get("/api/v1/devices/paho-01/latest").await;
    assert_eq!(latest["metrics"]["lib"]["value"], "paho", "{latest}");

    // A certificate from the fleet CA for a device that is not registered: the script
    // reports the broker's refusal and fails.
    let (fleet_ca, ca_pem) = tellus_tests::certs::fleet_ca(&t.data_dir);
    let ghost = tellus_tests::certs::device(&fleet_ca, "ghost", &ca_pem);
    for protocol in ["3.1.1", "5"] {
        let out = paho_publish(&t, &certs, &ghost, r#"{"t": 1}"#, 1, protocol).await;
        assert_eq!(out.status.code(), Some(3), "expected a refusal: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(
            stderr.contains("connection refused") && stderr.contains("not authori"),
            "the failure over MQTT {protocol} does not say why: {stderr}"
        );
    }

    let gate = gate_stats(&t).await;
    assert_eq!(gate["refused_unknown_device"], 2, "{gate}");
    let (_, stats) = t.get("/api/v1/stats").await;
    assert_eq!(stats["ingest"]["received"], 4, "{stats}");
}
