//! Fleet commands, end to end: a job over 100 simulated devices (real rumqttc connections)
//! at a rate, and an aborted job that sends nothing more.

use std::{collections::BTreeMap, time::Duration};

use rumqttc::{Event, Packet, QoS};
use serde_json::{json, Value};
use tellus_tests::{mqtt::connect, Tellus};
use tokio::sync::mpsc;

/// A device that answers every command `{"ok": true}` and reports each id it receives.
async fn device(t: &Tellus, id: &str, received: mpsc::UnboundedSender<(String, String)>) {
    let creds = t.create_device(id).await;
    let (client, mut events) = connect(t.mqtt_options(&creds)).await;
    client
        .subscribe(format!("devices/{id}/commands/+"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let id = id.to_owned();
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let command: Value = serde_json::from_slice(&p.payload).unwrap();
                let result = json!({"ok": true, "output": command["name"]}).to_string();
                let topic = format!("{}/result", p.topic);
                let _ = client.publish(topic, QoS::AtLeastOnce, false, result).await;
                let _ = received.send((id.clone(), command["id"].as_str().unwrap().to_owned()));
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_a_hundred_devices_completes_at_its_rate() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut ids = Vec::new();
    for n in 0..100 {
        let id = format!("fleet-{n:03}");
        device(&t, &id, tx.clone()).await;
        let (status, _) = t
            .patch(
                &format!("/api/v1/devices/{id}"),
                json!({"tags": {"site": "berlin"}}),
            )
            .await;
        assert_eq!(status, 200);
        ids.push(id);
    }
    // One device more, elsewhere: not selected.
    device(&t, "elsewhere", tx.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (status, job) = t
        .post(
            "/api/v1/commands",
            json!({"name": "update", "params": {"v": 2}, "selector": {"tags": {"site": "berlin"}},
                   "rate": 40, "concurrency": 10}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(
        (job["total"].as_u64(), job["status"].as_str()),
        (Some(100), Some("running"))
    );
    let id = job["id"].as_str().unwrap().to_owned();
    let done = t
        .get_until(&format!("/api/v1/commands/{id}"), |j| {
            j["status"] == "completed"
        })
        .await;
    assert_eq!(done["counts"], json!({"succeeded": 100}), "{done}");
    assert_eq!(done["pending"], 0);

    // Every selected device got the command once; the other none.
    let mut got = BTreeMap::new();
    while let Ok((device, command)) = rx.try_recv() {
        *got.entry(device).or_insert(0) += 1;
        assert!(!command.is_empty());
    }
    assert_eq!(got.len(), 100, "{got:?}");
    assert!(got.values().all(|n| *n == 1), "{got:?}");
    assert!(!got.contains_key("elsewhere"));

    // The rate held: in no second were more commands created than a second's worth (40),
    // what the bucket holds (4), and a margin for the time recording takes on a busy machine.
    let mut created = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/api/v1/commands/{id}/devices?limit=30&after={a}"),
            None => format!("/api/v1/commands/{id}/devices?limit=30"),
        };
        let (status, page) = t.get(&path).await;
        assert_eq!(status, 200, "{page}");
        for d in page["devices"].as_array().unwrap() {
            let (_, command) = t
                .get(&format!(
                    "/api/v1/devices/{}/commands/{}",
                    d["device"].as_str().unwrap(),
                    d["command"].as_str().unwrap()
                ))
                .await;
            created.push(command["created_at_ms"].as_i64().unwrap());
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
    }
    assert_eq!(created.len(), 100);
    created.sort();
    for (i, at) in created.iter().enumerate() {
        let within = created[i..].iter().take_while(|c| **c < at + 1_000).count();
        assert!(
            within <= 48,
            "{within} commands created within a second from {at}"
        );
    }
    let (status, list) = t.get("/api/v1/commands?status=completed").await;
    assert_eq!(status, 200);
    assert_eq!(list["jobs"][0]["id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_job_sends_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let mut ids = Vec::new();
    let mut first = None;
    for n in 0..30 {
        let id = format!("off-{n:02}");
        let creds = t.create_device(&id).await;
        first.get_or_insert(creds);
        ids.push(id);
    }
    // The devices are offline: commands wait, so at most `concurrency` are created.
    let (status, job) = t
        .post(
            "/api/v1/commands",
            json!({"name": "reboot", "selector": {"ids": ids}, "rate": 100, "concurrency": 5}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/commands/{id}");
    let waiting = t.get_until(&path, |j| j["counts"]["queued"] == 5).await;
    assert_eq!(waiting["pending"], 25);

    let (status, aborted) = t
        .post(&format!("/api/v1/commands/{id}/abort"), json!({}))
        .await;
    assert_eq!(status, 200, "{aborted}");
    assert_eq!(aborted["status"], "aborted");
    assert_eq!(aborted["counts"], json!({"cancelled": 5}));
    // Nothing more is created, and a device that connects now receives nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, after) = t.get(&path).await;
    assert_eq!(
        (&after["counts"], &after["pending"]),
        (&json!({"cancelled": 5}), &json!(25))
    );
    let (client, mut events) = connect(t.mqtt_options(&first.unwrap())).await;
    client
        .subscribe("devices/off-00/commands/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(1_000), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => return p,
                Ok(_) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
    })
    .await;
    assert!(
        quiet.is_err(),
        "an aborted job's command arrived: {quiet:?}"
    );

    let (status, body) = t
        .post(
            "/api/v1/commands",
            json!({"name": "x", "selector": {"ids": ["nobody"]}}),
        )
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("device_not_found"))
    );
    let (status, body) = t
        .post(
            "/api/v1/commands",
            json!({"name": "x", "selector": {"ids": ["off-00"], "tags": {"a": "b"}}}),
        )
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid_body"))
    );
    let (status, _) = t.get("/api/v1/commands/j-nope").await;
    assert_eq!(status, 404);
}
