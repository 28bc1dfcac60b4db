//! Commands to one device, end to end: a real `tellus serve`, devices on rumqttc and on
//! `mosquitto_sub`/`mosquitto_pub`, the HTTP API.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde_json::{json, Value};
use tellus_device::Credentials;
use tellus_tests::{mqtt::connect, require_tool, Tellus};
use tokio::sync::mpsc;

/// How long a test waits for a command to reach a status.
const WAIT: Duration = Duration::from_secs(20);

/// What the simulated device does with a command it receives.
#[derive(Clone, Copy)]
enum Answer {
    /// Publishes `{"ok": true, "output": {"did": <name>}}`.
    Succeed,
    /// Publishes a result that is not JSON.
    Garbage,
    /// Says nothing.
    Silent,
}

/// A device on rumqttc that subscribes to its commands (QoS 1) and answers each as told;
/// every command message it receives goes to the returned channel.
async fn device(
    t: &Tellus,
    creds: &Credentials,
    answer: Answer,
) -> (AsyncClient, mpsc::UnboundedReceiver<Value>) {
    let (client, events) = connect(t.mqtt_options(creds)).await;
    client
        .subscribe(format!("devices/{}/commands/+", creds.id), QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(follow(client.clone(), events, answer, tx));
    (client, rx)
}

async fn follow(
    client: AsyncClient,
    mut events: EventLoop,
    answer: Answer,
    received: mpsc::UnboundedSender<Value>,
) {
    while let Ok(event) = events.poll().await {
        let Event::Incoming(Packet::Publish(p)) = event else {
            continue;
        };
        let command: Value = serde_json::from_slice(&p.payload).unwrap();
        let result = match answer {
            Answer::Succeed => json!({"ok": true, "output": {"did": command["name"]}})
                .to_string()
                .into_bytes(),
            Answer::Garbage => b"done!".to_vec(),
            Answer::Silent => Vec::new(),
        };
        if !result.is_empty() {
            let topic = format!("{}/result", p.topic);
            client
                .publish(topic, QoS::AtLeastOnce, false, result)
                .await
                .unwrap();
        }
        let _ = received.send(command);
    }
}

async fn post_command(t: &Tellus, device: &str, body: Value) -> Value {
    let (status, command) = t
        .post(&format!("/api/v1/devices/{device}/commands"), body)
        .await;
    assert_eq!(status, 202, "{command}");
    command
}

/// Polls the command until its status is `status`; returns it then.
async fn until_status(t: &Tellus, device: &str, id: &str, status: &str) -> Value {
    let path = format!("/api/v1/devices/{device}/commands/{id}");
    t.get_until(&path, |c| c["status"] == status).await
}

async fn received(rx: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no command reached the device")
        .expect("device task ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_to_an_online_device_goes_through_every_status() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("cmd-1").await;
    // Silent first, so each status can be seen on its own.
    let (client, mut rx) = device(&t, &creds, Answer::Silent).await;
    // The subscription reaches the routing core before the command does.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let command = post_command(
        &t,
        "cmd-1",
        json!({"name": "reboot", "params": {"delay_s": 5}, "timeout": "1m"}),
    )
    .await;
    let id = command["id"].as_str().unwrap().to_owned();
    let message = received(&mut rx).await;
    assert_eq!(
        message,
        json!({"id": id, "name": "reboot", "params": {"delay_s": 5},
               "expires_at_ms": command["expires_at_ms"]})
    );
    let delivered = until_status(&t, "cmd-1", &id, "delivered").await;
    let at = |step: &str| delivered[step].as_i64().unwrap_or_else(|| panic!("{step}"));
    assert!(at("created_at_ms") <= at("sent_at_ms") && at("sent_at_ms") <= at("delivered_at_ms"));
    // A delivered command can no longer be cancelled.
    let (status, body) = t
        .delete(&format!("/api/v1/devices/cmd-1/commands/{id}"))
        .await;
    assert_eq!(status, 409, "{body}");

    let result = json!({"ok": true, "output": {"uptime_s": 12}}).to_string();
    client
        .publish(
            format!("devices/cmd-1/commands/{id}/result"),
            QoS::AtLeastOnce,
            false,
            result,
        )
        .await
        .unwrap();
    let done = until_status(&t, "cmd-1", &id, "succeeded").await;
    assert_eq!(done["output"], json!({"uptime_s": 12}));
    assert!(done["finished_at_ms"].as_i64().is_some());

    let (status, list) = t.get("/api/v1/devices/cmd-1/commands").await;
    assert_eq!(status, 200);
    assert_eq!(list["commands"][0]["id"], id.as_str());
    let (status, body) = t.get("/api/v1/devices/cmd-1/commands/c-nope").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("command_not_found"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_call_returns_the_devices_output() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("cmd-2").await;
    let (_client, _rx) = device(&t, &creds, Answer::Succeed).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, command) = t
        .post(
            "/api/v1/devices/cmd-2/commands?wait=10s",
            json!({"name": "ping"}),
        )
        .await;
    assert_eq!(status, 200, "{command}");
    assert_eq!(command["status"], "succeeded");
    assert_eq!(command["output"], json!({"did": "ping"}));

    // A result that is not one fails the command, with the reason.
    let creds = t.create_device("cmd-3").await;
    let (_client, _rx) = device(&t, &creds, Answer::Garbage).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, command) = t
        .post(
            "/api/v1/devices/cmd-3/commands?wait=10s",
            json!({"name": "ping"}),
        )
        .await;
    assert_eq!(status, 200, "{command}");
    assert_eq!(command["status"], "failed");
    assert!(command["output"]["error"]
        .as_str()
        .unwrap()
        .contains("not {\"ok\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_gets_its_commands_on_reconnect_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("cmd-4").await;
    let first = post_command(&t, "cmd-4", json!({"name": "first"})).await;
    assert_eq!(first["status"], "queued");
    let cancelled = post_command(&t, "cmd-4", json!({"name": "cancelled"})).await;
    let (status, body) = t
        .delete(&format!(
            "/api/v1/devices/cmd-4/commands/{}",
            cancelled["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!((status, &body["status"]), (200, &json!("cancelled")));

    // Tellus restarts before the device ever connects.
    assert!(t.stop().success());
    let t = Tellus::start_in(dir.path(), None);
    let second = post_command(&t, "cmd-4", json!({"name": "second"})).await;
    let (_client, mut rx) = device(&t, &creds, Answer::Succeed).await;
    let names = [received(&mut rx).await, received(&mut rx).await]
        .map(|m| m["name"].as_str().unwrap().to_owned());
    assert_eq!(
        names,
        ["first", "second"],
        "queued commands go out in order"
    );
    for c in [&first, &second] {
        until_status(&t, "cmd-4", c["id"].as_str().unwrap(), "succeeded").await;
    }
    // The cancelled one never went out.
    assert!(tokio::time::timeout(Duration::from_millis(500), rx.recv())
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_command_expires() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("cmd-5").await;
    let (client, mut rx) = device(&t, &creds, Answer::Silent).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let command = post_command(&t, "cmd-5", json!({"name": "slow", "timeout": "2s"})).await;
    received(&mut rx).await;
    let id = command["id"].as_str().unwrap();
    let expired = until_status(&t, "cmd-5", id, "expired").await;
    assert!(expired["output"]["error"].as_str().is_some(), "{expired}");
    // Nothing moves an ended command: a late result is taken and ignored.
    client
        .publish(
            format!("devices/cmd-5/commands/{id}/result"),
            QoS::AtLeastOnce,
            false,
            json!({"ok": true}).to_string(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, still) = t.get(&format!("/api/v1/devices/cmd-5/commands/{id}")).await;
    assert_eq!(still["status"], "expired", "{still}");
    let (status, body) = t
        .post(
            "/api/v1/devices/cmd-5/commands",
            json!({"name": "x", "timeout": "0s"}),
        )
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid_body"))
    );
    let (status, body) = t
        .post("/api/v1/devices/nobody/commands", json!({"name": "x"}))
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("device_not_found"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_receive_and_answer_a_command() {
    if !require_tool("mosquitto_sub") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(&dir.path().join("data"), None);
    let creds = t.create_device("cmd-6").await;
    let files = dir.path().join("certs");
    std::fs::create_dir_all(&files).unwrap();
    for (name, pem) in [
        ("ca.crt", &creds.ca_pem),
        ("d.crt", &creds.cert_pem),
        ("d.key", &creds.key_pem),
    ] {
        std::fs::write(files.join(name), pem).unwrap();
    }
    let port = t.mqtt_addr.port().to_string();
    let tls = |cmd: &mut tokio::process::Command| {
        cmd.args(["-h", "127.0.0.1", "-p", &port])
            .arg("--cafile")
            .arg(files.join("ca.crt"))
            .arg("--cert")
            .arg(files.join("d.crt"))
            .arg("--key")
            .arg(files.join("d.key"))
            .args(["-i", "cmd-6", "-q", "1"]);
    };
    // The command waits, queued, until mosquitto_sub subscribes.
    let command = post_command(&t, "cmd-6", json!({"name": "blink"})).await;
    let id = command["id"].as_str().unwrap().to_owned();
    let mut sub = tokio::process::Command::new("mosquitto_sub");
    tls(&mut sub);
    sub.args(["-t", "devices/cmd-6/commands/+", "-C", "1", "-W", "20"]);
    let out = sub.output().await.unwrap();
    assert!(out.status.success(), "mosquitto_sub failed: {out:?}");
    let message: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&message["id"], &message["name"]),
        (&json!(id), &json!("blink"))
    );
    until_status(&t, "cmd-6", &id, "delivered").await;

    let mut publish = tokio::process::Command::new("mosquitto_pub");
    tls(&mut publish);
    publish
        .args(["-t", &format!("devices/cmd-6/commands/{id}/result")])
        .args(["-m", r#"{"ok": false, "output": "no LED"}"#]);
    let out = publish.output().await.unwrap();
    assert!(out.status.success(), "mosquitto_pub failed: {out:?}");
    let failed = until_status(&t, "cmd-6", &id, "failed").await;
    assert_eq!(failed["output"], "no LED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_persistent_sessions_mqtt5_aliases_and_qos0_subscriptions() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);

    // A persistent session: subscribed once, then reconnected without subscribing again.
    let creds = t.create_device("cmd-7").await;
    let mut options = t.mqtt_options(&creds);
    options.set_clean_session(false);
    {
        let (client, mut events) = connect(options.clone()).await;
        client
            .subscribe("devices/cmd-7/commands/+", QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = events.poll().await {
                break;
            }
        }
        client.disconnect().await.unwrap();
        let _ = events.poll().await;
    }
    let (client, events) = connect(options).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(follow(client.clone(), events, Answer::Succeed, tx));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, command) = t
        .post(
            "/api/v1/devices/cmd-7/commands?wait=10s",
            json!({"name": "kept"}),
        )
        .await;
    assert_eq!(
        (status, &command["status"]),
        (200, &json!("succeeded")),
        "{command}"
    );
    received(&mut rx).await;

    // MQTT 5 with topic aliases allowed: every command still names its topic, so each is
    // followed to delivered.
    let creds = t.create_device("cmd-8").await;
    let mut options = t.mqtt5_options(&creds);
    options.set_topic_alias_max(Some(10));
    let (client, mut events) = rumqttc::v5::AsyncClient::new(options, 100);
    client
        .subscribe(
            "devices/cmd-8/commands/+",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let (tx, mut topics) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(p)) =
                event
            {
                let _ = tx.send(String::from_utf8_lossy(&p.topic).into_owned());
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ids = Vec::new();
    for name in ["a", "b", "c"] {
        let c = post_command(&t, "cmd-8", json!({"name": name})).await;
        ids.push(c["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        let topic = tokio::time::timeout(WAIT, topics.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(topic, format!("devices/cmd-8/commands/{id}"));
        until_status(&t, "cmd-8", id, "delivered").await;
    }

    // A QoS 0 subscription acknowledges nothing: a command counts as delivered once sent.
    let creds = t.create_device("cmd-9").await;
    let (client, events) = connect(t.mqtt_options(&creds)).await;
    client
        .subscribe("devices/cmd-9/commands/+", QoS::AtMostOnce)
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(follow(client.clone(), events, Answer::Silent, tx));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = post_command(&t, "cmd-9", json!({"name": "q0"})).await;
    received(&mut rx).await;
    until_status(&t, "cmd-9", c["id"].as_str().unwrap(), "delivered").await;

    // A command too large for a message to a device is refused, not sent.
    let big = "x".repeat(300 * 1024);
    let (status, body) = t
        .post(
            "/api/v1/devices/cmd-9/commands",
            json!({"name": "big", "params": {"blob": big}}),
        )
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid_body")),
        "{body}"
    );
}
