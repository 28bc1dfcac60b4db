//! Desired and reported device state, end to end: the API, a real `tellus serve` and
//! rumqttc devices.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{json, Value};
use tellus_device::Credentials;
use tellus_tests::{mqtt::connect, Tellus};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

async fn patch(t: &Tellus, device: &str, body: Value) -> (u16, Value) {
    t.patch(&format!("/api/v1/devices/{device}/state"), body)
        .await
}

/// A device subscribed to its desired state; what it receives goes to the channel, and
/// every QoS 1 publish it makes is acknowledged before the next.
async fn device(t: &Tellus, creds: &Credentials) -> (AsyncClient, mpsc::UnboundedReceiver<Value>) {
    let mut options = t.mqtt_options(creds);
    // Room for the large states some tests send.
    options.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut events) = connect(options).await;
    client
        .subscribe(
            format!("devices/{}/state/desired", creds.id),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let _ = tx.send(serde_json::from_slice(&p.payload).unwrap_or(Value::Null));
            }
        }
    });
    (client, rx)
}

/// The next desired state the device receives with `version`, skipping older ones (a
/// retained copy and a resend may both arrive).
async fn desired(rx: &mut mpsc::UnboundedReceiver<Value>, version: u64) -> Value {
    tokio::time::timeout(WAIT, async {
        loop {
            let m = rx.recv().await.expect("device task ended");
            if m["version"] == version {
                return m;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("desired state version {version} never arrived"))
}

async fn state_until(t: &Tellus, device: &str, done: impl Fn(&Value) -> bool) -> Value {
    t.get_until(&format!("/api/v1/devices/{device}/state"), done)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_reaches_a_late_device_and_the_delta_empties_when_it_reports() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("st-1").await;

    // Set before the device ever connects, and kept across a restart.
    let (status, s) = patch(
        &t,
        "st-1",
        json!({"desired": {"led": "on", "net": {"interval_s": 10}}}),
    )
    .await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["desired_version"], 1);
    assert_eq!(s["delta"], json!({"led": "on", "net": {"interval_s": 10}}));
    assert!(t.stop().success());
    let t = Tellus::start_in(dir.path(), None);

    let (client, mut rx) = device(&t, &creds).await;
    let first = desired(&mut rx, 1).await;
    assert_eq!(
        first["state"],
        json!({"led": "on", "net": {"interval_s": 10}})
    );

    // A stale version is refused and changes nothing.
    let (status, body) = patch(&t, "st-1", json!({"desired": {"led": "off"}, "version": 0})).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("refused")),
        "{body}"
    );
    // `null` removes a key; the device hears the new version live.
    let (status, s) = patch(
        &t,
        "st-1",
        json!({"desired": {"net": {"interval_s": null, "mode": "lte"}}, "version": 1}),
    )
    .await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["desired"], json!({"led": "on", "net": {"mode": "lte"}}));
    let second = desired(&mut rx, 2).await;
    assert_eq!(second["state"], s["desired"]);

    // The device reports part, then the rest: the delta shrinks, then empties.
    let report = |body: Value| {
        let client = client.clone();
        async move {
            client
                .publish(
                    "devices/st-1/state/reported",
                    QoS::AtLeastOnce,
                    false,
                    body.to_string(),
                )
                .await
                .unwrap();
        }
    };
    report(json!({"led": "on", "uptime_s": 5})).await;
    let partial = state_until(&t, "st-1", |s| s["reported_version"] == 1).await;
    assert_eq!(partial["delta"], json!({"net": {"mode": "lte"}}));
    report(json!({"net": {"mode": "lte"}})).await;
    let done = state_until(&t, "st-1", |s| s["reported_version"] == 2).await;
    assert_eq!(done["delta"], json!({}));
    assert_eq!(
        done["reported"],
        json!({"led": "on", "uptime_s": 5, "net": {"mode": "lte"}})
    );
    // A report that is not a JSON object is refused and changes nothing.
    client
        .publish("devices/st-1/state/reported", QoS::AtLeastOnce, false, "on")
        .await
        .unwrap();
    report(json!({"uptime_s": 6})).await;
    let after = state_until(&t, "st-1", |s| s["reported"]["uptime_s"] == 6).await;
    assert_eq!(after["reported_version"], 3, "{after}");

    let (status, body) = patch(&t, "st-1", json!({"desired": [1, 2]})).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid_body")),
        "{body}"
    );
    let (status, _) = t.get("/api/v1/devices/nobody/state").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_state_is_refused_and_a_deleted_devices_state_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("st-2").await;

    // A desired state that would pass 64 KiB is a bad request, not a conflict.
    let (status, _) = patch(&t, "st-2", json!({"desired": {"a": "x".repeat(40_000)}})).await;
    assert_eq!(status, 200);
    let (status, body) = patch(&t, "st-2", json!({"desired": {"b": "y".repeat(40_000)}})).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid_body")),
        "{body}"
    );

    // A report that would make the reported state too large is refused, and the
    // connection goes on: the next report is taken.
    let (client, mut rx) = device(&t, &creds).await;
    desired(&mut rx, 1).await;
    for body in [
        json!({"a": "x".repeat(40_000)}),
        json!({"b": "y".repeat(40_000)}),
    ] {
        client
            .publish(
                "devices/st-2/state/reported",
                QoS::AtLeastOnce,
                false,
                body.to_string(),
            )
            .await
            .unwrap();
    }
    client
        .publish(
            "devices/st-2/state/reported",
            QoS::AtLeastOnce,
            false,
            json!({"ok": true}).to_string(),
        )
        .await
        .unwrap();
    let s = state_until(&t, "st-2", |s| s["reported"]["ok"] == true).await;
    assert_eq!(
        s["reported_version"], 2,
        "the oversized report was not taken"
    );
    let (_, connections) = t.get("/api/v1/devices/st-2/connections").await;
    assert_eq!(connections["connections"].as_array().unwrap().len(), 1);
    drop((client, rx));

    // Deleted and registered again: the old desired state is not sent to the new device.
    let (status, _) = t.delete("/api/v1/devices/st-2").await;
    assert_eq!(status, 204);
    let creds = t.create_device("st-2").await;
    let (_client, mut rx) = device(&t, &creds).await;
    let (status, s) = patch(&t, "st-2", json!({"desired": {"fresh": 1}})).await;
    assert_eq!((status, &s["desired_version"]), (200, &json!(1)));
    let got = desired(&mut rx, 1).await;
    assert_eq!(got["state"], json!({"fresh": 1}), "the old state came back");
}
