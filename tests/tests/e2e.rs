//! End to end: a real `tellus serve`, devices over mTLS with rumqttc and mosquitto_pub, the
//! operator over HTTP.

use std::{
    collections::{BTreeSet, HashMap},
    os::unix::fs::PermissionsExt,
    sync::Arc,
    time::Duration,
};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use serde_json::{json, Value};
use tellus_device::Credentials;
use tellus_tests::{
    certs,
    mqtt::{connect, expect_refused, publish_acked},
    require_tool, Tellus,
};

/// Connects with `options` and asserts that the gate refuses the CONNECT with `code`.
async fn refused_with(options: MqttOptions, code: ConnectReturnCode) {
    let (_c, mut events) = AsyncClient::new(options, 10);
    let err = expect_refused(&mut events).await;
    assert!(
        matches!(&err, ConnectionError::ConnectionRefused(c) if *c == code),
        "expected {code:?}, got {err:?}"
    );
}

fn options_with_client_id(t: &Tellus, creds: &Credentials, client_id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", t.mqtt_addr.port());
    o.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(
        creds.tls_config().unwrap(),
    ))));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_telemetry_is_queryable_as_soon_as_it_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    assert!(
        t.log().contains("Admin API token"),
        "printed on first start"
    );
    let mode = std::fs::metadata(dir.path().join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin.token must be private");
    let creds = t.create_device("sensor-01").await;
    let (client, mut events) = connect(t.mqtt_options(&creds)).await;
    let topic = creds.telemetry_topic();

    publish_acked(
        &client,
        &mut events,
        &topic,
        r#"{"temperature": 21.5, "door": "open"}"#,
    )
    .await;
    let (status, latest) = t.get("/api/v1/devices/sensor-01/latest").await;
    assert_eq!(status, 200, "{latest}");
    assert_eq!(latest["metrics"]["temperature"]["value"], json!(21.5));
    assert_eq!(latest["metrics"]["door"]["value"], json!("open"));

    // Device time, arrays, nesting, and every value type.
    let base = 1_700_000_000_000i64;
    publish_acked(
        &client,
        &mut events,
        &topic,
        &json!([
            {"ts": base, "values": {"temperature": 20, "env": {"ok": true}}},
            {"ts": base + 1000, "values": {"temperature": 20.25, "mode": "eco"}}
        ])
        .to_string(),
    )
    .await;
    let (status, body) = t
        .get(&format!(
            "/api/v1/devices/sensor-01/telemetry?metric=temperature&from={}&to={}",
            base,
            base + 1000
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["device"], "sensor-01");
    assert_eq!(body["metric"], "temperature");
    assert_eq!(body["points"], json!([[base, 20], [base + 1000, 20.25]]));
    let (_, body) = t
        .get(&format!(
            "/api/v1/devices/sensor-01/telemetry?metric=env.ok&from=2023-11-14T22:13:20Z&to={}",
            base + 1
        ))
        .await;
    assert_eq!(body["points"], json!([[base, true]]), "{body}");

    let (status, devices) = t.get("/api/v1/devices").await;
    assert_eq!(status, 200);
    assert_eq!(devices["devices"][0]["id"], "sensor-01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_with_files_from_device_create() {
    if !require_tool("mosquitto_pub") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(&dir.path().join("data"), None);
    let certs = dir.path().join("certs");
    let out = std::process::Command::new(tellus_tests::tellus_bin())
        .args(["device", "create", "door-7", "--out"])
        .arg(&certs)
        .arg("--data-dir")
        .arg(&t.data_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for f in ["door-7.crt", "door-7.key", "ca.crt"] {
        assert!(certs.join(f).exists(), "{f} missing");
    }
    let out = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &t.mqtt_addr.port().to_string()])
        .arg("--cafile")
        .arg(certs.join("ca.crt"))
        .arg("--cert")
        .arg(certs.join("door-7.crt"))
        .arg("--key")
        .arg(certs.join("door-7.key"))
        .args(["-i", "door-7", "-q", "1", "-t", "devices/door-7/telemetry"])
        .args([
            "-m",
            &json!({"ts": *BASE, "values": {"open": true, "battery": 87}}).to_string(),
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "mosquitto_pub failed: {out:?}");
    let (status, latest) = t.get("/api/v1/devices/door-7/latest").await;
    assert_eq!(status, 200);
    assert_eq!(
        latest["metrics"],
        json!({
            "battery": {"ts": *BASE, "value": 87},
            "open": {"ts": *BASE, "value": true},
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let victim = t.create_device("victim").await;
    let mallory = t.create_device("mallory").await;
    let nothing_for_victim = || async {
        let (status, body) = t.get("/api/v1/devices/victim/latest").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["metrics"], json!({}), "victim got data: {body}");
    };

    // A certificate for "victim" from another CA.
    let (foreign_ca, _) = certs::own_ca("Foreign CA");
    let forged = certs::device(&foreign_ca, "victim", &victim.ca_pem);
    let (_c, mut events) = AsyncClient::new(t.mqtt_options(&forged), 10);
    let err = expect_refused(&mut events).await;
    // The gate answers the handshake with TLS alert "unknown CA".
    assert!(format!("{err:?}").contains("UnknownCA"), "{err:?}");

    // A valid certificate from the fleet CA for a device that is not registered.
    let (fleet_ca, ca_pem) = certs::fleet_ca(&t.data_dir);
    let ghost = certs::device(&fleet_ca, "ghost", &ca_pem);
    refused_with(t.mqtt_options(&ghost), ConnectReturnCode::NotAuthorized).await;

    // A certificate from the fleet CA for a registered device, but not the one registered
    // for it (say, issued from a stale copy of the data directory).
    let stale = certs::device(&fleet_ca, "victim", &ca_pem);
    refused_with(t.mqtt_options(&stale), ConnectReturnCode::NotAuthorized).await;

    // A client id that is not the certificate's device id.
    refused_with(
        options_with_client_id(&t, &mallory, "victim"),
        ConnectReturnCode::BadClientId,
    )
    .await;

    // A publish to another device's telemetry closes the connection unacknowledged.
    let (client, mut events) = connect(t.mqtt_options(&mallory)).await;
    client
        .publish(
            victim.telemetry_topic(),
            QoS::AtLeastOnce,
            false,
            r#"{"t": 1}"#,
        )
        .await
        .unwrap();
    expect_refused(&mut events).await;
    t.wait_for_log_line(&[
        "device_id=mallory",
        "ACL violation: topic \"devices/victim/telemetry\" is outside the device's own tree",
    ])
    .await;

    // A subscription outside the device's own tree closes the connection, no SUBACK.
    let (client, mut events) = connect(t.mqtt_options(&mallory)).await;
    client
        .subscribe("devices/victim/commands/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    expect_refused(&mut events).await;
    nothing_for_victim().await;

    // Invalid JSON is acknowledged, kept raw with its reason, and counted.
    let (client, mut events) = connect(t.mqtt_options(&mallory)).await;
    publish_acked(
        &client,
        &mut events,
        &mallory.telemetry_topic(),
        "{not json",
    )
    .await;
    let (status, body) = t.get("/api/v1/deadletters").await;
    assert_eq!(status, 200, "{body}");
    let dead = &body["deadletters"][0];
    assert_eq!(dead["device"], "mallory");
    assert_eq!(dead["topic"], "devices/mallory/telemetry");
    assert_eq!(dead["payload"], "{not json");
    assert!(
        dead["reason"].as_str().unwrap().contains("not valid JSON"),
        "{dead}"
    );
    let (_, stats) = t.get("/api/v1/stats").await;
    assert_eq!(stats["ingest"]["deadlettered"], 1, "{stats}");
    // Every refusal above was counted by its reason.
    let gate = &stats["gate"];
    assert_eq!(gate["handshake_failed"], 1, "{stats}");
    assert_eq!(gate["refused_unknown_device"], 1, "{stats}");
    assert_eq!(gate["refused_certificate"], 1, "{stats}");
    assert_eq!(gate["refused_client_id"], 1, "{stats}");
    assert_eq!(gate["acl_denied"], 2, "{stats}");
    let (_, latest) = t.get("/api/v1/devices/mallory/latest").await;
    assert_eq!(latest["metrics"], json!({}));
    nothing_for_victim().await;

    // The API without a token, and with a wrong one.
    let http = reqwest::Client::new();
    for auth in [None, Some("Bearer wrong-token")] {
        let mut req = http.get(t.url("/api/v1/devices"));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_socket_does_not_delay_other_devices() {
    let dir = tempfile::tempdir().unwrap();
    // The idle socket must outlive the whole test.
    let t = Tellus::start_in(dir.path(), Some("[mqtt]\nhandshake_timeout = \"120s\"\n"));
    let creds = t.create_device("punctual").await;
    let _idle = tokio::net::TcpStream::connect(t.mqtt_addr).await.unwrap();
    let _half = {
        // A second one that sends half a ClientHello and stops.
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(t.mqtt_addr).await.unwrap();
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
        s
    };
    let (client, mut events) = connect(t.mqtt_options(&creds)).await;
    publish_acked(
        &client,
        &mut events,
        &creds.telemetry_topic(),
        r#"{"t": 1}"#,
    )
    .await;
}

/// How a test ends Tellus while a device publishes at full speed.
#[derive(Clone, Copy, PartialEq)]
enum Interrupt {
    /// SIGTERM: a graceful stop.
    Stop,
    /// SIGKILL: the process dies at once.
    Kill,
}

static BASE: std::sync::LazyLock<i64> = std::sync::LazyLock::new(tellus_tests::recent_base);
const MAX: i64 = 200_000;
/// Devices publishing at once.
const DEVICES: usize = 4;
/// Acknowledged messages (all devices together) after which Tellus is interrupted.
const INTERRUPT_AFTER: usize = 4_000;

fn busy(n: usize) -> String {
    format!("busy-{n}")
}

/// Starts Tellus, has `DEVICES` devices publish QoS 1 telemetry at once without pause
/// (message k of a device carries device time BASE + k and value k), interrupts Tellus once
/// `INTERRUPT_AFTER` messages are acknowledged, and returns what each device saw
/// acknowledged and how the process ended.
async fn acknowledged_before(
    interrupt: Interrupt,
    dir: &std::path::Path,
) -> (Vec<BTreeSet<i64>>, std::process::ExitStatus) {
    let t = Tellus::start_in(dir, None);
    let acked_total = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (reached, mut reached_rx) = tokio::sync::mpsc::channel::<()>(DEVICES);
    let mut devices = Vec::new();
    for n in 0..DEVICES {
        let creds = t.create_device(&busy(n)).await;
        let mut options = t.mqtt_options(&creds);
        // More in flight than the gate's window (256), so the gate also stops reading.
        options.set_inflight(1000);
        let (client, events) = connect(options).await;
        let topic = creds.telemetry_topic();
        let publisher = tokio::spawn(async move {
            for k in 0..MAX {
                let body = json!({"ts": *BASE + k, "values": {"seq": k}}).to_string();
                if client
                    .publish(&topic, QoS::AtLeastOnce, false, body)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let listener = tokio::spawn(acknowledged(events, acked_total.clone(), reached.clone()));
        devices.push((publisher, listener));
    }
    drop(reached);
    // Interrupt while messages of every device are in flight.
    reached_rx.recv().await.expect("load reached the interrupt");
    let status = tokio::task::spawn_blocking(move || match interrupt {
        Interrupt::Stop => t.stop(),
        Interrupt::Kill => t.kill(),
    })
    .await
    .unwrap();
    let mut acked = Vec::new();
    for (publisher, listener) in devices {
        let seen = tokio::time::timeout(Duration::from_secs(120), listener)
            .await
            .expect("the connection did not end")
            .unwrap();
        publisher.abort();
        acked.push(seen);
    }
    let total: usize = acked.iter().map(BTreeSet::len).sum();
    eprintln!("{total} acknowledged before the process ended");
    (acked, status)
}

/// Follows one device's connection until it ends; returns the messages acknowledged.
/// Outgoing publishes leave in the order they were queued, so the n-th outgoing publish is
/// message n; a PUBACK for its packet id means message n is durable.
async fn acknowledged(
    mut events: rumqttc::EventLoop,
    total: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    reached: tokio::sync::mpsc::Sender<()>,
) -> BTreeSet<i64> {
    let mut sent: i64 = 0;
    let mut by_pkid: HashMap<u16, i64> = HashMap::new();
    let mut acked = BTreeSet::new();
    loop {
        match events.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                by_pkid.insert(pkid, sent);
                sent += 1;
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let k = by_pkid
                    .remove(&ack.pkid)
                    .expect("PUBACK for a known packet");
                acked.insert(k);
                let n = total.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if n == INTERRUPT_AFTER {
                    let _ = reached.try_send(());
                }
            }
            Ok(_) => {}
            Err(_) => return acked,
        }
    }
}

/// Restarts Tellus on `dir` and returns every stored value of the test metric, by device.
async fn stored_after_restart(dir: &std::path::Path) -> (Tellus, Vec<BTreeSet<i64>>) {
    let t = Tellus::start_in(dir, None);
    let mut all = Vec::new();
    for n in 0..DEVICES {
        let mut stored = BTreeSet::new();
        let mut from = *BASE;
        loop {
            let (status, body) = t
                .get(&format!(
                    "/api/v1/devices/{}/telemetry?metric=seq&agg=none&from={from}&to={}&limit=100000",
                    busy(n),
                    *BASE + MAX
                ))
                .await;
            assert_eq!(status, 200, "{body}");
            for p in body["points"].as_array().unwrap() {
                let (ts, v) = (p[0].as_i64().unwrap(), p[1].as_i64().unwrap());
                assert_eq!(ts - *BASE, v, "point stored at the wrong time");
                stored.insert(v);
            }
            match body["next"].as_i64() {
                Some(next) => from = next,
                None => break,
            }
        }
        all.push(stored);
    }
    (t, all)
}

fn assert_none_lost(acked: &[BTreeSet<i64>], stored: &[BTreeSet<i64>]) {
    let total: usize = acked.iter().map(BTreeSet::len).sum();
    assert!(total >= INTERRUPT_AFTER, "only {total} acknowledged");
    for (n, (acked, stored)) in acked.iter().zip(stored).enumerate() {
        assert!(!acked.is_empty(), "{} had nothing acknowledged", busy(n));
        let lost: Vec<_> = acked.difference(stored).take(10).collect();
        assert!(
            lost.is_empty(),
            "{}: {} acknowledged messages lost, first {lost:?}",
            busy(n),
            acked.difference(stored).count()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_under_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (acked, status) = acknowledged_before(Interrupt::Stop, dir.path()).await;
    assert!(status.success(), "tellus exited with {status:?}");

    // Everything acknowledged is there after a restart, which reuses the CA and the token.
    let ca_before = std::fs::read(dir.path().join("pki/ca.crt")).unwrap();
    let token_before = std::fs::read(dir.path().join("admin.token")).unwrap();
    let (t, stored) = stored_after_restart(dir.path()).await;
    assert_none_lost(&acked, &stored);
    assert_eq!(
        std::fs::read(dir.path().join("pki/ca.crt")).unwrap(),
        ca_before
    );
    assert_eq!(
        std::fs::read(dir.path().join("admin.token")).unwrap(),
        token_before
    );
    assert!(
        !t.log().contains("Admin API token"),
        "the token is printed only on the start that creates it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (acked, status) = acknowledged_before(Interrupt::Kill, dir.path()).await;
    assert!(!status.success(), "SIGKILL should end the process abruptly");
    let (_t, stored) = stored_after_restart(dir.path()).await;
    assert_none_lost(&acked, &stored);
}
