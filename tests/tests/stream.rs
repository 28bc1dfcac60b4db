//! The live event stream, end to end: a server-sent event client (reqwest, and `curl -N`)
//! sees presence changes and committed telemetry of the devices it asked for.

use std::time::Duration;

use serde_json::{json, Value};
use tellus_tests::{
    mqtt::{connect, publish_acked},
    recent_base, require_tool, Tellus,
};

const WAIT: Duration = Duration::from_secs(20);

/// A server-sent event stream read with reqwest.
struct Sse {
    response: reqwest::Response,
    buffer: String,
}

impl Sse {
    async fn open(t: &Tellus, query: &str) -> Sse {
        let response = reqwest::Client::new()
            .get(t.url(&format!("/api/v1/stream?{query}")))
            .bearer_auth(&t.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Sse {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (name and JSON data), skipping keep-alive comments.
    async fn next(&mut self) -> (String, Value) {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let field = |name: &str| {
                        block
                            .lines()
                            .find_map(|l| l.strip_prefix(name))
                            .map(str::to_owned)
                    };
                    if let (Some(event), Some(data)) = (field("event:"), field("data:")) {
                        let data = serde_json::from_str(data.trim()).unwrap();
                        return (event.trim().to_owned(), data);
                    }
                    continue;
                }
                let chunk = self.response.chunk().await.unwrap().expect("stream ended");
                self.buffer.push_str(&String::from_utf8_lossy(&chunk));
            }
        })
        .await
        .expect("no event in time")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_delivers_presence_and_telemetry_of_the_devices_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let watched = t.create_device("sse-1").await;
    let other = t.create_device("sse-2").await;
    // Tags select devices too.
    let (status, _) = t
        .patch("/api/v1/devices/sse-1", json!({"tags": {"site": "berlin"}}))
        .await;
    assert_eq!(status, 200);
    let mut all = Sse::open(&t, "type=presence,telemetry").await;
    let mut one = Sse::open(&t, "tag=site:berlin&type=telemetry").await;

    // Another device's events come first: the filtered stream must skip them.
    let (client2, mut events2) = connect(t.mqtt_options(&other)).await;
    let base = recent_base();
    let body = json!({"ts": base, "values": {"t": 1}}).to_string();
    publish_acked(&client2, &mut events2, &other.telemetry_topic(), &body).await;

    let (client, mut events) = connect(t.mqtt_options(&watched)).await;
    let body = json!({"ts": base + 1, "values": {"t": 21.5, "door": "open"}}).to_string();
    publish_acked(&client, &mut events, &watched.telemetry_topic(), &body).await;

    let (event, data) = one.next().await;
    assert_eq!(event, "telemetry");
    assert_eq!(
        data,
        json!({"type": "telemetry", "device": "sse-1", "points": [
            {"metric": "door", "ts": base + 1, "value": "open"},
            {"metric": "t", "ts": base + 1, "value": 21.5},
        ]})
    );

    // The unfiltered stream saw both connections and both commits, in order.
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (event, data) = all.next().await;
        seen.push((event, data["device"].as_str().unwrap().to_owned()));
    }
    let expected = [
        ("presence", "sse-2"),
        ("telemetry", "sse-2"),
        ("presence", "sse-1"),
        ("telemetry", "sse-1"),
    ]
    .map(|(e, d)| (e.to_owned(), d.to_owned()));
    assert_eq!(seen, expected);

    // A disconnect is a presence change with its reason.
    client2.disconnect().await.unwrap();
    let _ = events2.poll().await;
    let (event, data) = all.next().await;
    assert_eq!(
        (event.as_str(), &data["online"]),
        ("presence", &json!(false))
    );
    assert_eq!(data["device"], "sse-2");
    assert!(data["reason"].as_str().unwrap().contains("DISCONNECT"));

    let (status, body) = t.get("/api/v1/stream?type=weather").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid_query"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_follows_the_stream() {
    if !require_tool("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("sse-3").await;
    let mut curl = tokio::process::Command::new("curl")
        .args(["-N", "-s", "--max-time", "20", "-H"])
        .arg(format!("Authorization: Bearer {}", t.token))
        .arg(t.url("/api/v1/stream?device=sse-3&type=telemetry"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = curl.stdout.take().unwrap();
    // The stream is open once curl has its headers; give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (client, mut events) = connect(t.mqtt_options(&creds)).await;
    let body = json!({"ts": recent_base(), "values": {"rpm": 900}}).to_string();
    publish_acked(&client, &mut events, &creds.telemetry_topic(), &body).await;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let line = tokio::time::timeout(WAIT, async {
        loop {
            let line = lines.next_line().await.unwrap().expect("curl ended");
            if line.starts_with("data:") {
                return line;
            }
        }
    })
    .await
    .expect("curl saw no event");
    let data: Value = serde_json::from_str(line.trim_start_matches("data:").trim()).unwrap();
    assert_eq!(data["points"][0]["value"], 900);
}
