//! The device SDK (`tellus-device`) against a real Tellus: readings in both forms, commands
//! and desired state; a device program that runs, is killed and restarts while Tellus is
//! down, and loses nothing; and a store that slows down under the device's feet.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tellus_device::{Batching, Credentials, Device, Format, OutboxConfig, Reading};
use tellus_tests::{raise_open_files, recent_base, workspace_bin, Tellus, EVENTUALLY};

/// Every raw point of `metric` of `device`, as (ts, value).
async fn points(tellus: &Tellus, device: &str, metric: &str) -> Vec<(i64, Value)> {
    let (status, body) = tellus
        .get(&format!(
            "/api/v1/devices/{device}/telemetry?metric={metric}&from=0&to={}&agg=none&limit=100000",
            tellus_core::now_ms() + 3_600_000
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["next"].is_null(), "one page holds them all: {body}");
    body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_i64().unwrap(), p[1].clone()))
        .collect()
}

/// Waits until `device` has `n` points of `metric` stored, and returns them.
async fn wait_for_points(
    tellus: &Tellus,
    device: &str,
    metric: &str,
    n: usize,
) -> Vec<(i64, Value)> {
    let deadline = Instant::now() + EVENTUALLY * 3;
    loop {
        let got = points(tellus, device, metric).await;
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_commands_and_desired_state_through_the_sdk() {
    let dir = tempfile::tempdir().unwrap();
    let tellus = Tellus::start_in(dir.path(), None);
    let port = tellus.mqtt_addr.port();
    let base = recent_base();

    // Credentials from PEM text: the id is the certificate's CN.
    let given = tellus.create_device("sdk-json").await;
    let creds = Credentials::from_pem(&given.cert_pem, &given.key_pem, &given.ca_pem).unwrap();
    assert_eq!(creds.id.as_str(), "sdk-json");

    let calls = Arc::new(AtomicU64::new(0));
    let seen = calls.clone();
    let device = Device::builder(creds, "127.0.0.1", port)
        .on_command("add", |cmd| async move {
            let a = cmd.params["a"]
                .as_i64()
                .ok_or("params.a must be an integer")?;
            let b = cmd.params["b"]
                .as_i64()
                .ok_or("params.b must be an integer")?;
            Ok(json!({ "sum": a + b }))
        })
        .on_command("explode", |_| async move { panic!("handler bug") })
        .on_desired(move |_| {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, Ordering::Relaxed);
            }
        })
        .start()
        .unwrap();
    // Typed values, with and without a device time; more than one batch.
    let readings: Vec<Reading> = (0..250)
        .map(|i| {
            Reading::at(base + i)
                .with("t", 20.5 + i as f64)
                .with("i", i)
                .with("on", i % 2 == 0)
                .with("mode", format!("m{i}"))
        })
        .collect();
    device.send_all(readings).await.unwrap();
    device
        .send(Reading::server_time().with("late", 1))
        .await
        .unwrap();
    tokio::time::timeout(EVENTUALLY, device.flush())
        .await
        .expect("the outbox empties");
    let stats = device.stats();
    assert_eq!(
        (stats.recorded, stats.acknowledged),
        (251, 251),
        "{stats:?}"
    );
    assert!(stats.batches_sent >= 3, "batches of 100: {stats:?}");
    let t = points(&tellus, "sdk-json", "t").await;
    assert_eq!(t.len(), 250);
    assert_eq!(t[3], (base + 3, json!(23.5)));
    assert_eq!(
        points(&tellus, "sdk-json", "i").await[7],
        (base + 7, json!(7))
    );
    assert_eq!(points(&tellus, "sdk-json", "on").await[1].1, json!(false));
    assert_eq!(points(&tellus, "sdk-json", "mode").await[9].1, json!("m9"));
    assert_eq!(points(&tellus, "sdk-json", "late").await.len(), 1);

    // Commands: a result, a handler's error, a panic and an unknown name, each answered.
    let cases = [
        (
            json!({"name": "add", "params": {"a": 2, "b": 40}}),
            "succeeded",
            json!({"sum": 42}),
        ),
        (
            json!({"name": "add", "params": {"a": "x"}}),
            "failed",
            json!("params.a must be an integer"),
        ),
        (
            json!({"name": "explode"}),
            "failed",
            json!("the command handler panicked"),
        ),
        (
            json!({"name": "reboot"}),
            "failed",
            json!("unknown command \"reboot\""),
        ),
    ];
    for (request, status, output) in cases {
        let (code, created) = tellus
            .post("/api/v1/devices/sdk-json/commands", request.clone())
            .await;
        assert_eq!(code, 202, "{created}");
        let id = created["id"].as_str().unwrap();
        let done = tellus
            .get_until(&format!("/api/v1/devices/sdk-json/commands/{id}"), |c| {
                c["status"] == "succeeded" || c["status"] == "failed"
            })
            .await;
        assert_eq!(done["status"], status, "{request}: {done}");
        assert_eq!(done["output"], output, "{request}: {done}");
    }

    // Desired state reaches the view and the handler; reported state reaches Tellus.
    let (code, body) = tellus
        .patch(
            "/api/v1/devices/sdk-json/state",
            json!({"desired": {"interval_s": 30}}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let mut desired = device.watch_desired();
    let got = tokio::time::timeout(
        EVENTUALLY,
        desired.wait_for(|d| d.as_ref().is_some_and(|d| d.state["interval_s"] == 30)),
    )
    .await
    .expect("the desired state arrives")
    .unwrap()
    .clone()
    .unwrap();
    assert_eq!(got.version, 1);
    device
        .report_state(json!({"interval_s": 30, "firmware": "1.0"}))
        .await
        .unwrap();
    tellus
        .get_until("/api/v1/devices/sdk-json/state", |s| {
            s["reported"]["interval_s"] == 30 && s["delta"] == json!({})
        })
        .await;
    let deadline = Instant::now() + EVENTUALLY;
    while calls.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the desired-state handler was not called"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(device.report_state(json!([1])).await.is_err());
    device.close().await;

    // Protobuf, from a second device.
    let creds = tellus.create_device("sdk-pb").await;
    let device = Device::builder(creds, "127.0.0.1", port)
        .format(Format::Protobuf)
        .start()
        .unwrap();
    for i in 0..20 {
        device
            .send(Reading::at(base + i).with("v", i).with("f", 0.5))
            .await
            .unwrap();
    }
    tokio::time::timeout(EVENTUALLY, device.flush())
        .await
        .expect("the outbox empties");
    assert_eq!(points(&tellus, "sdk-pb", "v").await.len(), 20);
    assert_eq!(points(&tellus, "sdk-pb", "f").await[0].1, json!(0.5));
    device.close().await;
}

/// A running `sensor` program whose stdout lines are read as they come.
struct Sensor {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Sensor {
    fn start(certs: &Path, outbox: &Path, port: u16, first: u64, count: u64) -> Sensor {
        let mut child = Command::new(workspace_bin("tellus-firmware-examples", "sensor"))
            .arg("--certs")
            .arg(certs)
            .args(["--id", "offline-01", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string(), "--every-ms", "20"])
            .args(["--first", &first.to_string(), "--count", &count.to_string()])
            .arg("--outbox")
            .arg(outbox)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start sensor");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Sensor { child, lines }
    }

    /// Reads "recorded n=N ts=T" lines until `n` have come; returns their numbers and
    /// device times.
    fn recorded(&self, n: usize) -> Vec<(u64, i64)> {
        let mut got = Vec::new();
        while got.len() < n {
            let line = self
                .lines
                .recv_timeout(EVENTUALLY)
                .expect("the sensor goes on recording");
            if let Some(rest) = line.strip_prefix("recorded n=") {
                let (n, ts) = rest.split_once(" ts=").expect("n=N ts=T");
                got.push((n.parse().unwrap(), ts.parse().unwrap()));
            }
        }
        got
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Sensor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_killed_and_restarted_while_tellus_is_down_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let certs = dir.path().join("certs");
    let outbox = dir.path().join("outbox.db");
    // Register the device, then stop Tellus.
    let tellus = Tellus::start_in(&data, None);
    tellus
        .create_device("offline-01")
        .await
        .write_to_dir(&certs)
        .unwrap();
    assert!(tellus.stop().success());
    // Where Tellus will listen once it is back.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    // The device runs with Tellus down, and is killed (no chance to tidy up)...
    let sensor = Sensor::start(&certs, &outbox, port, 0, 0);
    let mut recorded = sensor.recorded(40);
    sensor.kill();
    // ...and runs again, with readings of its own plus those its outbox kept.
    let sensor = Sensor::start(&certs, &outbox, port, 1_000, 40);
    recorded.extend(sensor.recorded(40));

    let tellus = Tellus::start_on(&data, None, &format!("127.0.0.1:{port}"));
    let stored = wait_for_points(&tellus, "offline-01", "n", recorded.len()).await;
    let mut times: BTreeMap<i64, usize> = BTreeMap::new();
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for (ts, v) in &stored {
        *times.entry(*ts).or_default() += 1;
        *counts.entry(v.as_u64().unwrap()).or_default() += 1;
    }
    for (n, ts) in &recorded {
        assert_eq!(
            counts.get(n),
            Some(&1),
            "reading {n} stored once: {stored:?}"
        );
        // At the time it was taken, though it was sent later (by another process).
        assert!(
            stored.contains(&(*ts, json!(n))),
            "reading {n} at {ts}: {stored:?}"
        );
    }
    // Nothing else twice either (a reading taken just before the kill may have been written
    // to the outbox without being printed: it is stored, once).
    assert!(counts.values().all(|c| *c == 1), "{counts:?}");
    assert!(times.values().all(|c| *c == 1), "{times:?}");
    assert!(stored.len() <= recorded.len() + 1, "{stored:?}");
    drop(sensor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowed_store_holds_the_device_back_without_loss_or_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let tellus = Tellus::start_in(dir.path(), None);
    let creds = tellus.create_device("pressed-01").await;
    let device = Device::builder(creds, "127.0.0.1", tellus.mqtt_addr.port())
        .batching(Batching {
            max_readings: 10,
            ..Batching::default()
        })
        .outbox(OutboxConfig::file(dir.path().join("pressed-outbox.db")))
        .start()
        .unwrap();
    tokio::time::timeout(EVENTUALLY, device.connected())
        .await
        .expect("connected");
    let base = recent_base();

    // The store is slowed: another writer holds its write lock for 3 s at a time (Tellus
    // waits for it up to 5 s per commit), three times over.
    let store = dir.path().join("telemetry.db");
    let slow = std::thread::spawn(move || {
        let mut conn = rusqlite::Connection::open(store).unwrap();
        for _ in 0..3 {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .unwrap();
            std::thread::sleep(Duration::from_secs(3));
            tx.commit().unwrap();
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    // Meanwhile the device goes on taking readings: the outbox takes them at once.
    let mut max_waiting = 0;
    for i in 0..2_000 {
        tokio::time::timeout(
            Duration::from_secs(10),
            device.send(Reading::at(base + i).with("seq", i)),
        )
        .await
        .expect("taking a reading never waits for Tellus")
        .unwrap();
        let stats = device.stats();
        max_waiting = max_waiting.max(stats.waiting);
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The pressure reached the device: readings piled up in its outbox.
    assert!(max_waiting > 100, "max waiting {max_waiting}");
    slow.join().unwrap();

    // When the pressure ends, everything arrives, once.
    tokio::time::timeout(EVENTUALLY * 3, device.flush())
        .await
        .expect("the outbox empties once the store is fast again");
    let stats = device.stats();
    assert_eq!((stats.dropped, stats.refused), (0, 0), "{stats:?}");
    assert_eq!(stats.acknowledged, 2_000, "{stats:?}");
    let stored = points(&tellus, "pressed-01", "seq").await;
    assert_eq!(stored.len(), 2_000);
    for (i, (ts, v)) in stored.iter().enumerate() {
        assert_eq!((*ts, v.as_i64()), (base + i as i64, Some(i as i64)));
    }
    device.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_sim_connects_and_reports_with_a_thousand_devices() {
    const DEVICES: usize = 1_000;
    // Tellus holds two sockets per device (the device's, and its link to the routing core).
    raise_open_files(8_192);
    let dir = tempfile::tempdir().unwrap();
    let tellus = Tellus::start_in(&dir.path().join("data"), None);
    let mut sim = Command::new(workspace_bin("tellus-firmware-examples", "fleet-sim"))
        .args(["--api", &format!("http://{}", tellus.http_addr)])
        .args(["--token", &tellus.token, "--host", "127.0.0.1"])
        .args(["--port", &tellus.mqtt_addr.port().to_string()])
        .args(["--devices", &DEVICES.to_string(), "--every-ms", "2000"])
        .arg("--certs")
        .arg(dir.path().join("certs"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start fleet-sim");
    let stdout = BufReader::new(sim.stdout.take().unwrap());
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            eprintln!("[fleet-sim] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).expect("every device connects");
        if line.starts_with(&format!("all {DEVICES} devices connected")) {
            break;
        }
    }
    // Every device's readings are in the store.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = tellus
            .get("/api/v1/telemetry/latest?metric=temperature")
            .await;
        assert_eq!(status, 200, "{body}");
        let reporting = body["devices"].as_array().unwrap().len();
        if reporting == DEVICES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{reporting} of {DEVICES} devices have reported"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // And they answer commands.
    let (status, command) = tellus
        .post(
            "/api/v1/devices/sim-0777/commands?wait=20s",
            json!({"name": "ping", "params": {"x": 1}}),
        )
        .await;
    assert_eq!(status, 200, "{command}");
    assert_eq!(command["status"], "succeeded", "{command}");
    assert_eq!(command["output"], json!({"pong": {"x": 1}}));
    let _ = sim.kill();
    let _ = sim.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_near_its_end_is_renewed_over_mqtt_and_used() {
    let dir = tempfile::tempdir().unwrap();
    // Certificates that live 30 minutes (Tellus dates them back an hour, for clocks that
    // lag): every one is within a day of its end and past half its life.
    let tellus = Tellus::start_in(
        &dir.path().join("data"),
        Some("[pki]\ndevice_cert_validity = \"30min\"\n"),
    );
    let (status, created) = tellus
        .post("/api/v1/devices", json!({"id": "rotor-01"}))
        .await;
    assert_eq!(status, 201, "{created}");
    let first_serial = created["cert_serial"].as_str().unwrap().to_owned();
    let certs = dir.path().join("certs");
    let creds = Credentials::from_pem(
        created["cert_pem"].as_str().unwrap(),
        created["key_pem"].as_str().unwrap(),
        created["ca_pem"].as_str().unwrap(),
    )
    .unwrap();
    creds.write_to_dir(&certs).unwrap();
    let device = Device::builder(
        Credentials::from_dir(&certs, "rotor-01").unwrap(),
        "127.0.0.1",
        tellus.mqtt_addr.port(),
    )
    .rotation(tellus_device::Rotation {
        renew_before: Duration::from_secs(86_400),
        save_to: Some(certs.clone()),
        ..Default::default()
    })
    .start()
    .unwrap();

    // It asks, gets a certificate for its new key, saves it and reconnects with it.
    let deadline = Instant::now() + EVENTUALLY;
    while device.stats().connections < 2 {
        assert!(
            Instant::now() < deadline,
            "no second connection: {:?}",
            device.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let saved = Credentials::from_dir(&certs, "rotor-01").unwrap();
    assert_ne!(saved.cert_pem, creds.cert_pem);
    assert_ne!(saved.key_pem, creds.key_pem);
    let record = tellus
        .get_until("/api/v1/devices/rotor-01", |d| {
            d["cert_serial"].as_str().is_some_and(|s| s != first_serial)
        })
        .await;
    let second_serial = record["cert_serial"].as_str().unwrap().to_owned();
    // The edge accepted the first connection with the first certificate, the second with
    // the renewed one.
    let audit = tellus
        .get_until("/api/v1/audit?device=rotor-01", |a| {
            a["entries"]
                .as_array()
                .is_some_and(|e| e.iter().filter(|e| e["decision"] == "accepted").count() >= 2)
        })
        .await;
    let mut accepted: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["decision"] == "accepted")
        .map(|e| e["serial"].as_str().unwrap())
        .collect();
    accepted.reverse(); // newest first in the audit
    assert_eq!(accepted, [first_serial.as_str(), second_serial.as_str()]);
    // The connection with the new certificate carries readings, and only one renewal was
    // asked for (the next is at least ten minutes away).
    tokio::time::timeout(EVENTUALLY, device.connected())
        .await
        .unwrap();
    device
        .send(Reading::at(recent_base()).with("after_rotation", 1))
        .await
        .unwrap();
    tokio::time::timeout(EVENTUALLY, device.flush())
        .await
        .expect("stored");
    assert_eq!(points(&tellus, "rotor-01", "after_rotation").await.len(), 1);
    assert_eq!(device.stats().connections, 2, "{:?}", device.stats());
    device.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_actuator_example_follows_commands_and_desired_state() {
    let dir = tempfile::tempdir().unwrap();
    let tellus = Tellus::start_in(&dir.path().join("data"), None);
    let certs = dir.path().join("certs");
    tellus
        .create_device("valve-01")
        .await
        .write_to_dir(&certs)
        .unwrap();
    let mut actuator = Command::new(workspace_bin("tellus-firmware-examples", "actuator"))
        .arg("--certs")
        .arg(&certs)
        .args(["--id", "valve-01", "--host", "127.0.0.1"])
        .args([
            "--port",
            &tellus.mqtt_addr.port().to_string(),
            "--every-ms",
            "200",
        ])
        .arg("--outbox")
        .arg(dir.path().join("valve-outbox.db"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start actuator");

    // A command moves the valve at once and answers with its state.
    let (status, open) = tellus
        .post(
            "/api/v1/devices/valve-01/commands?wait=20s",
            json!({"name": "open"}),
        )
        .await;
    assert_eq!(status, 200, "{open}");
    assert_eq!(open["status"], "succeeded", "{open}");
    assert_eq!(open["output"]["valve"], "open");
    // Desired state is applied and reported back, so the delta empties.
    let (status, body) = tellus
        .patch(
            "/api/v1/devices/valve-01/state",
            json!({"desired": {"valve": "closed", "flow_limit": 4.5}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let state = tellus
        .get_until("/api/v1/devices/valve-01/state", |s| {
            s["reported"]["valve"] == "closed" && s["delta"] == json!({})
        })
        .await;
    assert_eq!(state["reported"]["flow_limit"], 4.5);
    // Its readings follow the valve: once closed, no flow.
    let closed_at = tellus_core::now_ms();
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let open = points(&tellus, "valve-01", "open").await;
        let flow = points(&tellus, "valve-01", "flow_lpm").await;
        let after: Vec<_> = open.iter().filter(|(ts, _)| *ts > closed_at).collect();
        if let Some((ts, is_open)) = after.first() {
            assert_eq!(*is_open, json!(false), "{open:?}");
            let at = flow
                .iter()
                .find(|(t, _)| t == ts)
                .expect("flow beside open");
            assert_eq!(at.1, json!(0.0), "{flow:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reading after the valve closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = actuator.kill();
    let _ = actuator.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_in_flight_when_tellus_dies_are_sent_again_and_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let tellus = Tellus::start_in(dir.path(), None);
    let port = tellus.mqtt_addr.port();
    let creds = tellus.create_device("steady-01").await;
    let device = Arc::new(
        Device::builder(creds, "127.0.0.1", port)
            .batching(Batching {
                max_readings: 20,
                ..Batching::default()
            })
            .backoff(tellus_device::Backoff {
                min: Duration::from_millis(100),
                max: Duration::from_secs(1),
            })
            .start()
            .unwrap(),
    );
    const TOTAL: i64 = 3_000;
    let base = recent_base();
    let sender = {
        let device = device.clone();
        tokio::spawn(async move {
            for chunk in 0..3 {
                let readings = (chunk * 1_000..(chunk + 1) * 1_000)
                    .map(|i| Reading::at(base + i).with("i", i))
                    .collect();
                device.send_all(readings).await.unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    // Tellus dies (no goodbye) with readings on their way...
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let stats = device.stats();
        if stats.acknowledged >= 300 && stats.in_flight > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{stats:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tellus.kill();
    let at_kill = device.stats();
    // ...and comes back on the same port.
    let tellus = Tellus::start_on(dir.path(), None, &format!("127.0.0.1:{port}"));
    sender.await.unwrap();
    tokio::time::timeout(EVENTUALLY * 3, device.flush())
        .await
        .expect("the outbox empties");
    let stats = device.stats();
    assert!(stats.connections >= 2, "{stats:?}");
    assert!(
        at_kill.acknowledged < TOTAL as u64,
        "killed mid-stream: {at_kill:?}"
    );
    let stored = points(&tellus, "steady-01", "i").await;
    assert_eq!(stored.len(), TOTAL as usize, "{stats:?}");
    for (i, (ts, v)) in stored.iter().enumerate() {
        assert_eq!((*ts, v.as_i64()), (base + i as i64, Some(i as i64)));
    }
}
