//! Presence, end to end: connections of real rumqttc devices as the API reports them.

use std::time::Duration;

use rumqttc::QoS;
use serde_json::{json, Value};
use tellus_tests::{mqtt::connect, Tellus};

const WAIT: Duration = Duration::from_secs(20);

/// Polls the device's presence until `done` holds; returns it then.
async fn presence_until(t: &Tellus, device: &str, done: impl Fn(&Value) -> bool) -> Value {
    t.get_until(&format!("/api/v1/devices/{device}/presence"), done)
        .await
}

async fn connections(t: &Tellus, device: &str) -> Vec<Value> {
    let (status, body) = t
        .get(&format!("/api/v1/devices/{device}/connections"))
        .await;
    assert_eq!(status, 200, "{body}");
    body["connections"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_connections_and_a_takeover() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("pr-1").await;
    t.create_device("pr-2").await;
    let never = presence_until(&t, "pr-2", |p| p["online"] == false).await;
    assert_eq!(never["last_seen_ms"], Value::Null, "{never}");

    let (client, mut events) = connect(t.mqtt_options(&creds)).await;
    let driver = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let online = presence_until(&t, "pr-1", |p| p["online"] == true).await;
    assert_eq!(online["protocol"], "3.1.1");
    assert!(online["connected_since_ms"].as_i64().is_some());
    assert!(online["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    let (status, counts) = t.get("/api/v1/presence").await;
    assert_eq!(status, 200);
    assert_eq!(counts, json!({"devices": 2, "online": 1}));

    // A second connection of the device takes over; the first is recorded as ended.
    let (client2, mut events2) = connect(t.mqtt_options(&creds)).await;
    let driver2 = tokio::spawn(async move { while events2.poll().await.is_ok() {} });
    let deadline = tokio::time::Instant::now() + WAIT;
    let history = loop {
        let history = connections(&t, "pr-1").await;
        if history.len() == 2 && history[1]["disconnected_at_ms"].is_i64() {
            break history;
        }
        assert!(tokio::time::Instant::now() < deadline, "{history:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(history[0]["disconnected_at_ms"], Value::Null);
    assert!(
        history[1]["reason"]
            .as_str()
            .unwrap()
            .contains("taken over"),
        "{history:?}"
    );
    let still = presence_until(&t, "pr-1", |p| p["online"] == true).await;
    assert!(still["last_disconnect_reason"]
        .as_str()
        .unwrap()
        .contains("taken over"));
    // Commands follow the current connection, not the one that ended.
    client2
        .subscribe("devices/pr-1/commands/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, command) = t
        .post("/api/v1/devices/pr-1/commands", json!({"name": "noop"}))
        .await;
    assert_eq!(status, 202, "{command}");
    let id = command["id"].as_str().unwrap();
    let path = format!("/api/v1/devices/pr-1/commands/{id}");
    t.get_until(&path, |c| c["status"] == "delivered").await;

    client2.disconnect().await.unwrap();
    let offline = presence_until(&t, "pr-1", |p| p["online"] == false).await;
    assert!(
        offline["last_disconnect_reason"]
            .as_str()
            .unwrap()
            .contains("DISCONNECT"),
        "{offline}"
    );
    assert_eq!(offline["last_seen_ms"], offline["last_disconnect_ms"]);
    drop((client, driver, driver2));
    let (status, body) = t.get("/api/v1/devices/nobody/presence").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("device_not_found"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_open_when_tellus_died_are_ended_at_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("pr-3").await;
    let (_client, mut events) = connect(t.mqtt_options(&creds)).await;
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    presence_until(&t, "pr-3", |p| p["online"] == true).await;
    let status = tokio::task::spawn_blocking(move || t.kill()).await.unwrap();
    assert!(!status.success());

    let t = Tellus::start_in(dir.path(), None);
    let offline = presence_until(&t, "pr-3", |p| p["online"] == false).await;
    assert_eq!(offline["last_disconnect_reason"], "Tellus stopped");
    let (_, counts) = t.get("/api/v1/presence").await;
    assert_eq!(counts["online"], 0, "{counts}");
}
