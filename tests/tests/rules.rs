//! Rules, end to end: a real `tellus serve`, devices on rumqttc, a webhook receiver on
//! 127.0.0.1, the HTTP API.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{json, Value};
use tellus_device::Credentials;
use tellus_tests::{mqtt::connect, recent_base, webhook::Webhook, Tellus};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

/// A device on rumqttc: publishes telemetry and waits for each PUBACK, and answers every
/// command it receives with success (each command also goes to `commands`).
struct Device {
    id: String,
    client: AsyncClient,
    acks: mpsc::UnboundedReceiver<()>,
    commands: mpsc::UnboundedReceiver<Value>,
}

impl Device {
    async fn connect(t: &Tellus, creds: &Credentials) -> Device {
        let (client, mut events) = connect(t.mqtt_options(creds)).await;
        client
            .subscribe(format!("devices/{}/commands/+", creds.id), QoS::AtLeastOnce)
            .await
            .unwrap();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let (command_tx, commands) = mpsc::unbounded_channel();
        let answer = client.clone();
        tokio::spawn(async move {
            while let Ok(event) = events.poll().await {
                match event {
                    Event::Incoming(Packet::PubAck(_)) => {
                        let _ = ack_tx.send(());
                    }
                    Event::Incoming(Packet::Publish(p)) => {
                        let command: Value = serde_json::from_slice(&p.payload).unwrap();
                        let result = json!({"ok": true}).to_string();
                        answer
                            .publish(
                                format!("{}/result", p.topic),
                                QoS::AtLeastOnce,
                                false,
                                result,
                            )
                            .await
                            .unwrap();
                        let _ = command_tx.send(command);
                    }
                    _ => {}
                }
            }
        });
        // The subscription reaches the routing core before any command does.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Device {
            id: creds.id.to_string(),
            client,
            acks,
            commands,
        }
    }

    /// Publishes telemetry at QoS 1 and waits for its PUBACK (acknowledged: committed).
    async fn send(&mut self, payload: Value) {
        self.client
            .publish(
                format!("devices/{}/telemetry", self.id),
                QoS::AtLeastOnce,
                false,
                payload.to_string(),
            )
            .await
            .unwrap();
        tokio::time::timeout(WAIT, self.acks.recv())
            .await
            .expect("no PUBACK in time")
            .expect("device task ended");
    }

    async fn command(&mut self) -> Value {
        tokio::time::timeout(WAIT, self.commands.recv())
            .await
            .expect("no command reached the device")
            .expect("device task ended")
    }
}

/// Publishes at QoS 1 (the device's event loop runs elsewhere).
async fn publish(client: &AsyncClient, topic: &str, payload: &str) {
    client
        .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
        .await
        .unwrap();
}

async fn create_rule(t: &Tellus, rule: Value) -> Value {
    let (status, body) = t.post("/api/v1/rules", rule).await;
    assert_eq!(status, 201, "{body}");
    body
}

/// The rule's figures once `done` holds for them.
async fn figures_until(t: &Tellus, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    t.get_until(&format!("/api/v1/rules/{id}"), |r| done(&r["figures"]))
        .await["figures"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_calls_a_webhook_commands_the_device_writes_a_metric_and_raises_an_alert() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("oven-1").await;
    let (status, body) = t
        .patch("/api/v1/devices/oven-1", json!({"tags": {"site": "lab"}}))
        .await;
    assert_eq!(status, 200, "{body}");
    // The first call fails: the rule must try again.
    let hook = Webhook::start(1).await;
    let rule = create_rule(
        &t,
        json!({
            "name": "too hot",
            "trigger": "telemetry",
            "devices": {"tags": {"site": "lab"}},
            "condition": "metrics.temp > 30",
            "actions": [
                {"type": "webhook", "url": hook.url(), "headers": {"x-token": "s3cret"}, "retries": 3},
                {"type": "command", "name": "fan", "params": {"speed": 2}},
                {"type": "metric", "name": "temp_f", "value": "metrics.temp * 1.8 + 32.0"},
                {"type": "alert", "severity": "critical", "message": "the oven is too hot"}
            ]
        }),
    )
    .await;
    let id = rule["id"].as_str().unwrap().to_owned();
    assert_eq!(rule["enabled"], true);
    assert_eq!(rule["version"], 1);

    let mut device = Device::connect(&t, &creds).await;
    // Not hot, then a reading the condition does not apply to, then hot.
    device.send(json!({"temp": 20.0})).await;
    device.send(json!({"humidity": 40})).await;
    device.send(json!({"temp": 35.0})).await;

    // The command reached the device.
    let command = device.command().await;
    assert_eq!(command["name"], "fan");
    assert_eq!(command["params"], json!({"speed": 2}));

    // The webhook: answered 500, then tried again and answered 200, with the same body.
    let calls = hook.wait_for(2).await;
    assert_eq!(
        calls.iter().map(|c| c.answered).collect::<Vec<_>>(),
        [500, 200]
    );
    assert_eq!(calls[0].body, calls[1].body);
    let body = &calls[1].body;
    assert_eq!(calls[1].headers["x-token"], "s3cret");
    assert_eq!(
        body["rule"],
        json!({"id": id, "name": "too hot", "version": 1})
    );
    assert_eq!(body["device"], "oven-1");
    assert_eq!(body["message"]["metrics"], json!({"temp": 35.0}));
    assert_eq!(body["message"]["device"]["tags"], json!({"site": "lab"}));
    assert_eq!(body["message"]["trigger"], "telemetry");

    // The derived metric is stored, at the reading's time.
    let latest = t
        .get_until("/api/v1/devices/oven-1/latest", |l| {
            l["metrics"]["temp_f"]["value"] == 95.0
        })
        .await;
    assert_eq!(
        latest["metrics"]["temp_f"]["ts"],
        latest["metrics"]["temp"]["ts"]
    );

    // The alert is up, with the values that raised it.
    let alerts = t
        .get_until("/api/v1/alerts?open=true", |a| {
            a["alerts"].as_array().unwrap().len() == 1
        })
        .await;
    let alert = &alerts["alerts"][0];
    assert_eq!(alert["rule"], id);
    assert_eq!(alert["device"], "oven-1");
    assert_eq!(alert["severity"], "critical");
    assert_eq!(alert["status"], "active");
    assert_eq!(alert["message"], "the oven is too hot");
    assert_eq!(alert["values"]["metrics"]["temp"], 35.0);
    let alert_id = alert["id"].as_str().unwrap().to_owned();
    let (status, acked) = t
        .post(&format!("/api/v1/alerts/{alert_id}/acknowledge"), json!({}))
        .await;
    assert_eq!(status, 200, "{acked}");
    assert_eq!(acked["status"], "acknowledged");

    // Still hot: the actions run again, but the alert stays the one alert.
    device.send(json!({"temp": 36.0})).await;
    assert_eq!(device.command().await["name"], "fan");
    // Cool: the alert clears.
    device.send(json!({"temp": 25.0})).await;
    let cleared = t
        .get_until(&format!("/api/v1/alerts/{alert_id}"), |a| {
            a["status"] == "cleared"
        })
        .await;
    assert_eq!(cleared["cleared_reason"], "condition");
    assert!(cleared["acknowledged_at_ms"].is_i64());
    let (_, all) = t.get(&format!("/api/v1/alerts?rule={id}")).await;
    assert_eq!(all["alerts"].as_array().unwrap().len(), 1, "{all}");
    // A cleared alert cannot be acknowledged.
    let (status, body) = t
        .post(&format!("/api/v1/alerts/{alert_id}/acknowledge"), json!({}))
        .await;
    assert_eq!(status, 409, "{body}");

    // The rule's figures: five readings, two hot, one without temp; the webhook's failed
    // attempt is on record.
    let figures = figures_until(&t, &id, |f| {
        f["evaluations"] == 5 && f["actions_succeeded"].as_u64() >= Some(8)
    })
    .await;
    assert_eq!(figures["matches"], 2, "{figures}");
    assert_eq!(figures["not_applicable"], 1, "{figures}");
    assert_eq!(figures["fired"], 2, "{figures}");
    assert!(figures["mean_eval_us"].as_f64().unwrap() > 0.0, "{figures}");
    let errors = figures["recent_errors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e["kind"] == "webhook" && e["message"].as_str().unwrap().contains("500")),
        "{figures}"
    );
    hook.wait_for(3).await;
    let (_, stats) = t.get("/api/v1/stats").await;
    assert!(stats["rules"]["inputs"].as_u64() >= Some(5), "{stats}");
    assert!(stats["rules"]["mean_us_per_input"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_are_stopped_at_their_deadline_and_memory_limit_and_tellus_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("fn-1").await;
    let rule = create_rule(
        &t,
        json!({
            "name": "doubler",
            "trigger": "telemetry",
            "actions": [{"type": "function", "source": r#"
                function handle(m) {
                    if (m.metrics.mode === 1) { while (true) {} }
                    if (m.metrics.mode === 2) { const a = []; while (true) a.push(new Array(100000).fill(m)); }
                    if (m.metrics.mode === 3) throw new Error("mode 3 is not a mode");
                    return { metrics: { double: m.metrics.x * 2 } };
                }"#}]
        }),
    )
    .await;
    let id = rule["id"].as_str().unwrap().to_owned();
    let mut device = Device::connect(&t, &creds).await;
    device.send(json!({"mode": 1, "x": 1})).await;
    device.send(json!({"mode": 2, "x": 2})).await;
    device.send(json!({"mode": 3, "x": 3})).await;
    device.send(json!({"mode": 0, "x": 21})).await;
    let figures = figures_until(&t, &id, |f| f["function_calls"] == 4).await;
    assert_eq!(figures["function_timeouts"], 1, "{figures}");
    assert_eq!(figures["function_out_of_memory"], 1, "{figures}");
    assert_eq!(figures["function_errors"], 1, "{figures}");
    let errors: Vec<String> = figures["recent_errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("mode 3 is not a mode")),
        "{errors:?}"
    );
    assert!(errors.iter().any(|e| e.contains("deadline")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("memory")), "{errors:?}");
    // The last reading went through the same sandbox, after both were stopped.
    t.get_until("/api/v1/devices/fn-1/latest", |l| {
        l["metrics"]["double"]["value"] == 42
    })
    .await;
    // And Tellus goes on taking telemetry.
    device.send(json!({"mode": 0, "x": 50})).await;
    t.get_until("/api/v1/devices/fn-1/latest", |l| {
        l["metrics"]["double"]["value"] == 100
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_with_for_waits_then_clears_and_shows_on_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("tank-1").await;
    let rule = create_rule(
        &t,
        json!({
            "name": "low level", "trigger": "telemetry", "condition": "metrics.level < 10",
            "for": "1s", "actions": [{"type": "alert", "severity": "warning"}]
        }),
    )
    .await;
    let id = rule["id"].as_str().unwrap().to_owned();
    let mut stream = reqwest::Client::new()
        .get(t.url("/api/v1/stream?type=alert"))
        .bearer_auth(&t.token)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut device = Device::connect(&t, &creds).await;
    let before = tellus_core::now_ms();
    device.send(json!({"level": 5})).await;
    let alerts = t
        .get_until(&format!("/api/v1/alerts?rule={id}"), |a| {
            a["alerts"].as_array().unwrap().len() == 1
        })
        .await;
    let alert = alerts["alerts"][0].clone();
    // Raised only once the condition had held for the whole second.
    assert!(
        alert["raised_at_ms"].as_i64().unwrap() >= before + 1_000,
        "{alert} raised before {}",
        before + 1_000
    );
    device.send(json!({"level": 50})).await;
    t.get_until(
        &format!("/api/v1/alerts/{}", alert["id"].as_str().unwrap()),
        |a| a["status"] == "cleared",
    )
    .await;
    // Both changes were on the stream.
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(seen.contains("\"status\":\"active\"") && seen.contains("\"status\":\"cleared\"")) {
        let chunk = tokio::time::timeout_at(deadline, stream.chunk())
            .await
            .expect("no alert events on the stream")
            .unwrap()
            .expect("stream ended");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("event: alert"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_over_stored_data_reports_matches_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("pump-1").await;
    let hook = Webhook::start(0).await;
    let mut device = Device::connect(&t, &creds).await;
    // Ten readings a second apart: hot from the third to the eighth.
    let base = recent_base();
    for i in 0..10 {
        let pressure = if (2..8).contains(&i) { 9.5 } else { 3.0 };
        device
            .send(
                json!({"ts": base + i * 1_000, "values": {"pressure": pressure, "rpm": 1000 + i}}),
            )
            .await;
    }
    let rule = json!({
        "name": "pressure", "trigger": "telemetry", "condition": "metrics.pressure > 8.0",
        "for": "3s",
        "actions": [
            {"type": "alert"},
            {"type": "webhook", "url": hook.url()},
            {"type": "command", "name": "stop"},
            {"type": "metric", "name": "pressure_rpm", "value": "metrics.pressure / double(metrics.rpm)"}
        ]
    });
    let (status, run) = t
        .post(
            "/api/v1/rules/test",
            json!({"rule": rule, "device": "pump-1", "from": base, "to": base + 20_000}),
        )
        .await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["evaluated"], 10, "{run}");
    let matches: Vec<i64> = run["matches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["at_ms"].as_i64().unwrap())
        .collect();
    assert_eq!(
        matches,
        (2..8).map(|i| base + i * 1_000).collect::<Vec<_>>()
    );
    // Held from +2 s; fires at +5 s, with the newest values before then (+4 s's reading);
    // cleared at +8 s.
    let firings = run["firings"].as_array().unwrap();
    assert_eq!(firings.len(), 2, "{run}");
    assert_eq!(firings[0]["at_ms"], base + 5_000);
    let effects: Vec<&str> = firings[0]["effects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(effects, ["raise_alert", "webhook", "command", "metric"]);
    let derived = firings[0]["effects"][3]["value"].as_f64().unwrap();
    assert!((derived - 9.5 / 1004.0).abs() < 1e-12, "{derived}");
    assert_eq!(firings[1]["at_ms"], base + 8_000);
    assert_eq!(firings[1]["effects"][0]["type"], "clear_alert");

    // Given messages instead, for another trigger.
    let (status, run) = t
        .post(
            "/api/v1/rules/test",
            json!({
                "rule": {"name": "offline", "trigger": "presence",
                         "condition": "!online && device.tags.site == 'x'",
                         "actions": [{"type": "alert"}]},
                "messages": [
                    {"device": "pump-1", "online": false, "reason": "keep alive", "tags": {"site": "x"}},
                    {"device": "pump-1", "online": true, "tags": {"site": "x"}},
                    {"device": "other", "online": false}
                ]
            }),
        )
        .await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["evaluated"], 3, "{run}");
    assert_eq!(run["firings"].as_array().unwrap().len(), 2, "{run}");

    // A rule that would not run is refused with the reason.
    let (status, body) = t
        .post(
            "/api/v1/rules/test",
            json!({"rule": {"name": "x", "trigger": "telemetry", "condition": "metrics.a >",
                            "actions": [{"type": "alert"}]},
                   "messages": []}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_rule");

    // Nothing happened: no alert, no webhook call, no command, no derived metric, no rule.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, alerts) = t.get("/api/v1/alerts").await;
    assert_eq!(alerts["alerts"], json!([]));
    assert!(hook.calls().is_empty());
    let (_, commands) = t.get("/api/v1/devices/pump-1/commands").await;
    assert_eq!(commands["commands"], json!([]), "{commands}");
    let (_, latest) = t.get("/api/v1/devices/pump-1/latest").await;
    assert!(latest["metrics"].get("pressure_rpm").is_none(), "{latest}");
    let (_, rules) = t.get("/api/v1/rules").await;
    assert_eq!(rules["rules"], json!([]));
    assert!(device.commands.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_changed_enabled_and_deleted_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("door-1").await;
    // Refused with the reason: each part of a rule is checked before it is stored.
    for (bad, why) in [
        (
            json!({"name": "x", "trigger": "telemetry", "actions": []}),
            "at least one",
        ),
        (
            json!({"name": "x", "trigger": "presence", "condition": "metrics.t > 1",
                   "actions": [{"type": "alert"}]}),
            "not in scope",
        ),
        (
            json!({"name": "x", "trigger": "telemetry",
                   "actions": [{"type": "function", "source": "function handle( {"}]}),
            "actions[0] (function)",
        ),
        (
            json!({"name": "x", "trigger": "telemetry",
                   "actions": [{"type": "webhook", "url": "file:///etc/passwd"}]}),
            "url",
        ),
    ] {
        let (status, body) = t.post("/api/v1/rules", bad).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "invalid_rule", "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(why),
            "{body}"
        );
    }
    let (status, body) = t
        .post(
            "/api/v1/rules",
            json!({"name": "x", "trigger": "sometimes", "actions": []}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );

    // An event rule and a state rule, on a running Tellus.
    let event_rule = create_rule(
        &t,
        json!({"name": "door open", "trigger": "event", "condition": "event == 'door' && payload.open",
               "actions": [{"type": "alert", "severity": "info"}]}),
    )
    .await;
    let event_id = event_rule["id"].as_str().unwrap().to_owned();
    let state_rule = create_rule(
        &t,
        json!({"name": "old firmware", "trigger": "state", "condition": "state.fw != '2.0'",
               "actions": [{"type": "alert"}]}),
    )
    .await;
    let state_id = state_rule["id"].as_str().unwrap().to_owned();
    let (client, mut events) = connect(t.mqtt_options(&creds)).await;
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    publish(&client, "devices/door-1/events/door", r#"{"open": true}"#).await;
    publish(&client, "devices/door-1/state/reported", r#"{"fw": "1.0"}"#).await;
    t.get_until("/api/v1/alerts?open=true", |a| {
        a["alerts"].as_array().unwrap().len() == 2
    })
    .await;

    // Disabled: its alert is cleared with it, and it is evaluated no more.
    let (status, disabled) = t
        .post(&format!("/api/v1/rules/{event_id}/disable"), json!({}))
        .await;
    assert_eq!(status, 200, "{disabled}");
    assert_eq!(
        (disabled["enabled"].as_bool(), disabled["version"].as_u64()),
        (Some(false), Some(2))
    );
    assert_eq!(disabled["figures"], Value::Null, "{disabled}");
    let (_, alerts) = t.get(&format!("/api/v1/alerts?rule={event_id}")).await;
    assert_eq!(alerts["alerts"][0]["cleared_reason"], "rule_disabled");
    // Disabling again changes nothing.
    let (_, again) = t
        .post(&format!("/api/v1/rules/{event_id}/disable"), json!({}))
        .await;
    assert_eq!(again["version"], 2);

    // Changed: the rule starts over (its alert cleared), and the new condition applies to
    // the next report, since a change is in effect once the API has answered.
    let (status, body) = t
        .put(
            &format!("/api/v1/rules/{state_id}"),
            json!({"name": "old firmware", "trigger": "state", "condition": "state.fw != '1.0'",
                   "actions": [{"type": "alert"}], "version": 1}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 2);
    let (_, alerts) = t.get(&format!("/api/v1/alerts?rule={state_id}")).await;
    assert_eq!(
        alerts["alerts"][0]["cleared_reason"], "rule_changed",
        "{alerts}"
    );
    // A change based on an old version is refused.
    let (status, body) = t
        .put(
            &format!("/api/v1/rules/{state_id}"),
            json!({"name": "y", "trigger": "state", "actions": [{"type": "alert"}], "version": 1}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    publish(&client, "devices/door-1/state/reported", r#"{"fw": "2.0"}"#).await;
    let alerts = t
        .get_until(&format!("/api/v1/alerts?rule={state_id}&open=true"), |a| {
            a["alerts"].as_array().unwrap().len() == 1
        })
        .await;
    assert_eq!(alerts["alerts"][0]["values"]["state"]["fw"], "2.0");
    // The event rule, disabled, sees events no more; another one, enabled, does (and once
    // its alert is up, the event has been evaluated).
    let witness = create_rule(
        &t,
        json!({"name": "any door event", "trigger": "event", "condition": "event == 'door'",
               "actions": [{"type": "alert"}]}),
    )
    .await;
    publish(&client, "devices/door-1/events/door", r#"{"open": true}"#).await;
    t.get_until(
        &format!(
            "/api/v1/alerts?rule={}&open=true",
            witness["id"].as_str().unwrap()
        ),
        |a| a["alerts"].as_array().unwrap().len() == 1,
    )
    .await;
    let (_, alerts) = t
        .get(&format!("/api/v1/alerts?rule={event_id}&open=true"))
        .await;
    assert_eq!(alerts["alerts"], json!([]));
    let (status, _) = t
        .delete(&format!(
            "/api/v1/rules/{}",
            witness["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, 204);

    // Deleted: gone, 404 after.
    let (status, _) = t.delete(&format!("/api/v1/rules/{state_id}")).await;
    assert_eq!(status, 204);
    let (status, body) = t.get(&format!("/api/v1/rules/{state_id}")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("rule_not_found"))
    );
    let (_, list) = t.get("/api/v1/rules").await;
    let ids: Vec<&str> = list["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [event_id.as_str()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_client_receives_what_rules_publish() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let sensor = t.create_device("sensor-9").await;
    let ops = t.create_device("console-1").await;
    let (status, body) = t
        .patch(
            "/api/v1/devices/console-1",
            json!({"tags": {"tellus.role": "operator"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    create_rule(
        &t,
        json!({"name": "leak", "trigger": "telemetry", "condition": "metrics.water > 0",
               "actions": [{"type": "publish", "topic": "rules/leaks/{device}"}]}),
    )
    .await;
    // A device that is not an operator may not subscribe there (MQTT 3.1.1: closed).
    let (plain, mut plain_events) = connect(t.mqtt_options(&sensor)).await;
    plain.subscribe("rules/#", QoS::AtLeastOnce).await.unwrap();
    tellus_tests::mqtt::expect_refused(&mut plain_events).await;

    let (console, mut console_events) = connect(t.mqtt_options(&ops)).await;
    console
        .subscribe("rules/leaks/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, mut received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = console_events.poll().await {
            match event {
                Event::Incoming(Packet::SubAck(ack)) => {
                    let _ = tx.send((String::from("suback"), format!("{:?}", ack.return_codes)));
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send((
                        p.topic.clone(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                    ));
                }
                _ => {}
            }
        }
    });
    let (kind, codes) = tokio::time::timeout(WAIT, received.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kind, "suback");
    assert!(codes.contains("Success"), "{codes}");
    let mut device = Device::connect(&t, &sensor).await;
    device.send(json!({"water": 3})).await;
    let (topic, payload) = tokio::time::timeout(WAIT, received.recv())
        .await
        .expect("nothing published to the operator")
        .unwrap();
    assert_eq!(topic, "rules/leaks/sensor-9");
    let payload: Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(payload["device"], "sensor-9");
    assert_eq!(payload["rule"]["name"], "leak");
    assert_eq!(payload["message"]["metrics"]["water"], 3);
}
