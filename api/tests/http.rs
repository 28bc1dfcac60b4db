//! The API over real HTTP: a real SQLite store and registry in a temp dir, a real PKI, the
//! server on 127.0.0.1:0, and reqwest as the client (the harness is in `support`). The
//! telemetry queries (aggregation, planning, CSV, the fleet view) are in `queries.rs`.

mod support;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value as Json};
use tellus_core::{
    now_ms, AuditDecision, AuditEntry, CertificateRecord, Change, Registry, Sample, Value,
    FLEET_ISSUER,
};
use tellus_ingest::{Batch, DeadLetter, TelemetryStore};

use support::{error_code, id, send, Server, TOKEN};

#[tokio::test]
async fn token_is_required() {
    let s = Server::start().await;
    let url = format!("{}/api/v1/devices", s.base);

    let resp = s.client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let body: Json = resp.json().await.unwrap();
    let (code, message) = error_code(&body);
    assert_eq!(code, "unauthorized");
    assert!(message.contains("bearer token is required"), "{message}");

    let (status, body) = send(s.client.get(&url).bearer_auth("wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body).0, "unauthorized");

    let (status, body) = send(s.client.get(&url).basic_auth("admin", Some(TOKEN))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body).0, "unauthorized");

    // Authentication comes before the body is looked at, and covers unknown v1 paths.
    let (status, _) = send(s.client.post(&url).json(&json!({"id": "x"}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = send(s.client.get(format!("{}/api/v1/nope", s.base))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, _) = s.get("/api/v1/devices").await;
    assert_eq!(status, StatusCode::OK);
    s.stop().await;
}

#[tokio::test]
async fn create_list_and_get_devices() {
    let s = Server::start().await;

    let (status, body) = s.post("/api/v1/devices", json!({"id": "sensor-01"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let cert_pem = body["cert_pem"].as_str().unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let cn = cert.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), "sensor-01");
    assert!(body["key_pem"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(body["ca_pem"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));
    let serial = body["cert_serial"].as_str().unwrap().to_owned();
    assert_eq!(serial, cert.raw_serial_as_string().replace(':', ""));
    let not_after = body["cert_not_after"].as_str().unwrap().to_owned();
    assert!(not_after.ends_with('Z'), "{not_after}");

    let (status, body) = s.post("/api/v1/devices", json!({"id": "sensor-01"})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_code(&body).0, "device_exists");

    let (status, body) = s.post("/api/v1/devices", json!({"id": "bad/id"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (code, message) = error_code(&body);
    assert_eq!(code, "invalid_device_id");
    assert!(message.contains("'/'"), "{message}");

    let (status, body) = s
        .post("/api/v1/devices", json!({"id": "x", "color": "red"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (code, message) = error_code(&body);
    assert_eq!(code, "invalid_body");
    assert!(message.contains("color"), "{message}");

    let (status, body) = send(
        s.req(Method::POST, "/api/v1/devices")
            .header("content-type", "application/json")
            .body("{\"id\": "),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body).0, "invalid_body");

    let (status, body) = send(s.req(Method::POST, "/api/v1/devices").body("{}")).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(error_code(&body).0, "unsupported_media_type");

    // A device's own key: the answer has no key_pem.
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let (status, body) = s
        .post("/api/v1/devices", json!({"id": "own-key", "csr_pem": csr}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(body.get("key_pem").is_none(), "{body}");
    assert!(body["cert_pem"].as_str().unwrap().contains("CERTIFICATE"));

    let (status, body) = s
        .post(
            "/api/v1/devices",
            json!({"id": "bad-csr", "csr_pem": "not a csr"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body).0, "invalid_csr");

    for n in 0..3 {
        let (status, _) = s
            .post("/api/v1/devices", json!({"id": format!("zz-{n}")}))
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }

    // Pages of two, in id order.
    let mut seen = Vec::new();
    let mut path = "/api/v1/devices?limit=2".to_owned();
    loop {
        let (status, body) = s.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let devices = body["devices"].as_array().unwrap();
        assert!(devices.len() <= 2);
        seen.extend(devices.iter().map(|d| d["id"].as_str().unwrap().to_owned()));
        match body["next"].as_str() {
            Some(next) => path = format!("/api/v1/devices?limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, ["own-key", "sensor-01", "zz-0", "zz-1", "zz-2"]);

    let (status, body) = s.get("/api/v1/devices/sensor-01").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["id"], "sensor-01");
    assert_eq!(body["cert_serial"], serial.as_str());
    assert_eq!(body["cert_not_after"], not_after.as_str());
    assert!(body["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(body["status"], "enabled");
    assert_eq!(body["tags"], json!({}));
    let certs = body["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0]["serial"], serial.as_str());
    assert_eq!(certs[0]["issuer"], FLEET_ISSUER);
    assert_eq!(certs[0]["not_after"], not_after.as_str());
    assert!(certs[0]["issued_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(certs[0]["revoked_at"], Json::Null);

    let (status, body) = s.get("/api/v1/devices/nobody").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body).0, "device_not_found");

    let (status, body) = s.get("/api/v1/devices/bad%2Fid").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body).0, "invalid_device_id");

    let (status, body) = s.get("/api/v1/devices?limit=many").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body).0, "invalid_query");

    s.stop().await;
}

#[tokio::test]
async fn telemetry_latest_deadletters_and_stats() {
    let s = Server::start().await;
    let (status, _) = s.post("/api/v1/devices", json!({"id": "sensor-01"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let d = id("sensor-01");
    let t0: i64 = 1_732_780_800_000; // 2024-11-28T08:00:00Z
    let sample = |metric: &str, ts_ms, value| {
        (
            d.clone(),
            Sample {
                metric: metric.into(),
                ts_ms,
                value,
            },
        )
    };
    s.store
        .commit(&Batch {
            samples: vec![
                sample("temperature", t0, Value::Float(21.5)),
                sample("temperature", t0 + 1000, Value::Int(22)),
                sample("temperature", t0 + 2000, Value::Text("hot".into())),
                sample("temperature", t0 + 3000, Value::Bool(true)),
                sample("door", t0 + 500, Value::Text("open".into())),
            ],
            deadletters: vec![
                DeadLetter {
                    id: 0,
                    received_at_ms: t0,
                    device: d.clone(),
                    topic: "devices/sensor-01/telemetry".into(),
                    reason: "payload is not valid JSON".into(),
                    payload: b"not json".to_vec(),
                    payload_size: 8,
                },
                DeadLetter {
                    id: 0,
                    received_at_ms: t0 + 1,
                    device: d.clone(),
                    topic: "devices/sensor-01/telemetry/pb".into(),
                    reason: "binary".into(),
                    payload: vec![0xff, 0xfe, 0x00],
                    payload_size: 3,
                },
            ],
        })
        .unwrap();

    // Epoch milliseconds.
    let (status, body) = s
        .get(&format!(
            "/api/v1/devices/sensor-01/telemetry?metric=temperature&from={t0}&to={}",
            t0 + 3000
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({
            "device": "sensor-01",
            "metric": "temperature",
            "points": [[t0, 21.5], [t0 + 1000, 22], [t0 + 2000, "hot"], [t0 + 3000, true]],
            "next": null,
        })
    );
    assert!(body["points"][1][1].is_i64());

    // RFC 3339, sent through reqwest's query encoding (the '+' of an offset must survive).
    let (status, body) = send(
        s.req(Method::GET, "/api/v1/devices/sensor-01/telemetry")
            .query(&[
                ("metric", "temperature"),
                ("from", "2024-11-28T09:00:01+01:00"),
                ("to", "2024-11-28T08:00:02Z"),
            ]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["points"], json!([[t0 + 1000, 22], [t0 + 2000, "hot"]]));

    // Paging: next is the from of the following page.
    let (status, body) = s
        .get(&format!(
            "/api/v1/devices/sensor-01/telemetry?metric=temperature&from={t0}&to={}&limit=3",
            t0 + 3000
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["points"].as_array().unwrap().len(), 3);
    let next = body["next"].as_i64().unwrap();
    let (_, body) = s
        .get(&format!(
            "/api/v1/devices/sensor-01/telemetry?metric=temperature&from={next}&to={}&limit=3",
            t0 + 3000
        ))
        .await;
    assert_eq!(body["points"], json!([[t0 + 3000, true]]));
    assert_eq!(body["next"], Json::Null);

    // Defaults: the last hour, which holds nothing here.
    let (status, body) = s
        .get("/api/v1/devices/sensor-01/telemetry?metric=temperature")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["points"], json!([]));

    for (query, code) in [
        ("from=1", "invalid_query"),
        ("metric=temperature&from=10&to=5", "invalid_query"),
        ("metric=temperature&from=yesterday", "invalid_query"),
        ("metric=temperature&limit=0", "invalid_query"),
    ] {
        let (status, body) = s
            .get(&format!("/api/v1/devices/sensor-01/telemetry?{query}"))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(error_code(&body).0, code, "{query}");
    }
    let (status, body) = s
        .get("/api/v1/devices/ghost/telemetry?metric=temperature")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body).0, "device_not_found");

    let (status, body) = s.get("/api/v1/devices/sensor-01/latest").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({
            "device": "sensor-01",
            "metrics": {
                "door": {"ts": t0 + 500, "value": "open"},
                "temperature": {"ts": t0 + 3000, "value": true},
            }
        })
    );
    let (status, _) = s.get("/api/v1/devices/ghost/latest").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, body) = s.get("/api/v1/deadletters").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let dl = body["deadletters"].as_array().unwrap();
    assert_eq!(dl.len(), 2);
    assert_eq!(dl[0]["reason"], "binary");
    assert_eq!(dl[0]["payload_base64"], "//4A");
    assert!(dl[0].get("payload").is_none());
    assert_eq!(dl[0]["payload_size"], 3);
    assert_eq!(dl[0]["payload_truncated"], false);
    assert_eq!(dl[0]["received_at"], "2024-11-28T08:00:00.001Z");
    assert_eq!(dl[0]["received_at_ms"], t0 + 1);
    assert_eq!(dl[1]["payload"], "not json");
    assert!(dl[1].get("payload_base64").is_none());
    assert_eq!(dl[1]["payload_size"], 8);
    assert_eq!(dl[1]["payload_truncated"], false);
    assert_eq!(dl[1]["device"], "sensor-01");
    assert_eq!(dl[1]["topic"], "devices/sensor-01/telemetry");
    assert_eq!(body["next"], Json::Null);

    let (_, page) = s.get("/api/v1/deadletters?limit=1").await;
    assert_eq!(page["deadletters"][0]["reason"], "binary");
    let before = page["next"].as_i64().unwrap();
    let (_, page) = s
        .get(&format!("/api/v1/deadletters?limit=1&before={before}"))
        .await;
    assert_eq!(
        page["deadletters"][0]["reason"],
        "payload is not valid JSON"
    );
    assert_eq!(page["next"], Json::Null);

    let (status, body) = s.get("/api/v1/stats").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["ingest"]["received"], 0);
    assert_eq!(body["ingest"]["commits"], 0);

    s.stop().await;
}

#[tokio::test]
async fn deadletter_lists_show_previews_and_one_shows_the_whole_payload() {
    let s = Server::start().await;
    let d = id("sensor-01");
    let dead = |reason: &str, payload: Vec<u8>| DeadLetter {
        id: 0,
        received_at_ms: 1_732_780_800_000,
        device: d.clone(),
        topic: "devices/sensor-01/telemetry".into(),
        reason: reason.into(),
        payload_size: payload.len(),
        payload,
    };
    // 2001 bytes of UTF-8 whose byte 1024 is the middle of an 'é'.
    let text = format!("a{}", "é".repeat(1000));
    // 3000 bytes that are not UTF-8.
    let binary: Vec<u8> = (0..3000u32).map(|i| (i % 256) as u8).collect();
    s.store
        .commit(&Batch {
            samples: vec![],
            deadletters: vec![
                dead("text", text.clone().into_bytes()),
                dead("binary", binary.clone()),
                dead("small", b"{\"t\": ".to_vec()),
            ],
        })
        .unwrap();

    let (status, body) = s.get("/api/v1/deadletters").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let dl = body["deadletters"].as_array().unwrap();
    let reasons: Vec<_> = dl.iter().map(|d| d["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["small", "binary", "text"]);

    assert_eq!(dl[0]["payload"], "{\"t\": ");
    assert_eq!(dl[0]["payload_size"], 6);
    assert_eq!(dl[0]["payload_truncated"], false);

    assert!(dl[1].get("payload").is_none(), "{}", dl[1]);
    assert_eq!(
        dl[1]["payload_base64"],
        tellus_api::base64::encode(&binary[..1024])
    );
    assert_eq!(dl[1]["payload_size"], 3000);
    assert_eq!(dl[1]["payload_truncated"], true);

    // Cut back to the character boundary before byte 1024.
    assert!(dl[2].get("payload_base64").is_none(), "{}", dl[2]);
    assert_eq!(dl[2]["payload"], text[..1023]);
    assert_eq!(dl[2]["payload_size"], 2001);
    assert_eq!(dl[2]["payload_truncated"], true);

    // One by one: the whole payload.
    let text_id = dl[2]["id"].as_i64().unwrap();
    let (status, one) = s.get(&format!("/api/v1/deadletters/{text_id}")).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["id"], text_id);
    assert_eq!(one["reason"], "text");
    assert_eq!(one["device"], "sensor-01");
    assert_eq!(one["topic"], "devices/sensor-01/telemetry");
    assert_eq!(one["received_at"], "2024-11-28T08:00:00Z");
    assert_eq!(one["payload"], text.as_str());
    assert!(one.get("payload_base64").is_none());
    assert_eq!(one["payload_size"], 2001);
    assert_eq!(one["payload_truncated"], false);

    let binary_id = dl[1]["id"].as_i64().unwrap();
    let (status, one) = s.get(&format!("/api/v1/deadletters/{binary_id}")).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["payload_base64"], tellus_api::base64::encode(&binary));
    assert!(one.get("payload").is_none());
    assert_eq!(one["payload_size"], 3000);
    assert_eq!(one["payload_truncated"], false);

    let (status, body) = s.get("/api/v1/deadletters/999999").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (code, message) = error_code(&body);
    assert_eq!(code, "deadletter_not_found");
    assert!(message.contains("999999"), "{message}");

    let (status, body) = s.get("/api/v1/deadletters/latest").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body).0, "invalid_path");

    s.stop().await;
}

#[tokio::test]
async fn unknown_routes_get_the_json_shape() {
    let s = Server::start().await;
    for path in ["/api/v1/nope", "/api/v2/devices", "/nope"] {
        let (status, body) = s.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(error_code(&body).0, "not_found", "{path}");
    }
    let (status, body) = send(s.req(Method::DELETE, "/api/v1/stats")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_code(&body).0, "method_not_allowed");
    s.stop().await;
}

#[tokio::test]
async fn probes_need_no_token_and_readiness_says_why_not() {
    let s = Server::start().await;
    let get = |path: &str| send(s.client.get(format!("{}{path}", s.base)));
    let (status, body) = get("/healthz").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
    // This server runs no gate: nothing accepts MQTT connections.
    let (status, body) = get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        json!({"status": "unready", "reasons": ["the MQTT listener is not accepting connections"]})
    );
    s.gate_stats
        .listening
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (status, body) = get("/readyz").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ready"})));
    // Once a stop begins, a load balancer is told to drain the node.
    s.health.stopping();
    let (status, body) = get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        json!({"status": "unready", "reasons": ["shutting down"]})
    );
    // Liveness does not change with it.
    assert_eq!(get("/healthz").await.0, StatusCode::OK);
    let (status, _) = send(s.client.post(format!("{}/healthz", s.base))).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    s.stop().await;
}

#[tokio::test]
async fn metrics_need_the_token_and_speak_prometheus_text() {
    let s = Server::start().await;
    let url = format!("{}/metrics", s.base);
    let (status, body) = send(s.client.get(&url)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body).0, "unauthorized");
    let (status, body) = send(s.client.get(&url).bearer_auth("wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body).0, "unauthorized");

    let (status, content_type, text) = s.get_text("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    for line in [
        "# TYPE tellus_connections_open gauge",
        "# TYPE tellus_ingest_commit_duration_seconds histogram",
        "tellus_ingest_commit_duration_seconds_count 0",
        "tellus_commands_total{status=\"succeeded\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
    }
    s.stop().await;
}

/// The ids of a device list.
fn ids(body: &Json) -> Vec<&str> {
    body["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect()
}

/// The `serial` of each certificate of a device, with its `revoked_at`.
fn certificates(body: &Json) -> Vec<(String, Json)> {
    body["certificates"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|c| {
            (
                c["serial"].as_str().unwrap().to_owned(),
                c["revoked_at"].clone(),
            )
        })
        .collect()
}

/// Fetches the CRL (without a token: it is public) and returns its number and revoked serials
/// (lower-case hex, sorted), checking that the fleet CA issued it and that its number is the
/// time it was generated, in ms.
async fn crl(s: &Server) -> (u64, Vec<String>) {
    let before = now_ms() as u64;
    let resp = s
        .client
        .get(format!("{}/api/v1/pki/crl.pem", s.base))
        .send()
        .await
        .unwrap();
    let after = now_ms() as u64;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/x-pem-file");
    let pem = resp.text().await.unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    assert_eq!(pem.label, "X509 CRL");
    let (_, crl) = x509_parser::parse_x509_crl(&pem.contents).unwrap();
    let (_, ca) = x509_parser::pem::parse_x509_pem(s.pki.ca_pem().as_bytes()).unwrap();
    assert_eq!(crl.issuer(), ca.parse_x509().unwrap().subject());
    let mut serials: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|r| r.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    serials.sort();
    let number: u64 = crl
        .crl_number()
        .expect("a CRL number")
        .to_string()
        .parse()
        .unwrap();
    assert!(
        (before..=after).contains(&number),
        "{before} <= {number} <= {after}"
    );
    (number, serials)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test]
async fn device_life_cycle_revoke_disable_delete_and_the_crl() {
    let s = Server::start().await;
    let mut serials = Vec::new();
    for d in ["dev-a", "dev-b"] {
        let (status, body) = s.post("/api/v1/devices", json!({"id": d})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        serials.push(body["cert_serial"].as_str().unwrap().to_owned());
    }
    let (a1, b1) = (serials[0].clone(), serials[1].clone());
    // A second certificate for dev-a (rotation), recorded directly in the registry.
    let rotated = s.pki.issue_device(&id("dev-a")).unwrap();
    s.registry
        .add_certificate(&CertificateRecord {
            issuer: FLEET_ISSUER.into(),
            serial: rotated.serial_hex.clone(),
            device: id("dev-a"),
            issued_at_ms: now_ms(),
            not_after_ms: rotated.not_after_ms,
            revoked_at_ms: None,
        })
        .unwrap();
    let a2 = rotated.serial_hex;

    let (status, body) = s.get("/api/v1/devices").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for d in body["devices"].as_array().unwrap() {
        assert_eq!(d["status"], "enabled", "{d}");
        assert_eq!(d["tags"], json!({}), "{d}");
        assert!(d["cert_serial"].is_string(), "{d}");
        assert!(d["cert_not_after"].as_str().unwrap().ends_with('Z'), "{d}");
    }

    // Certificates are valid for a year here.
    let (status, body) = s.get("/api/v1/devices?expiring_within=30d").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(ids(&body), Vec::<&str>::new());
    let (_, body) = s.get("/api/v1/devices?expiring_within=400days").await;
    assert_eq!(ids(&body), ["dev-a", "dev-b"]);
    let (_, body) = s
        .get("/api/v1/devices?expiring_within=400d&limit=1&after=dev-a")
        .await;
    assert_eq!(ids(&body), ["dev-b"]);
    for bad in ["soon", "30", ""] {
        let (status, body) = s
            .get(&format!("/api/v1/devices?expiring_within={bad}"))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(error_code(&body).0, "invalid_query", "{bad}");
    }

    // Nothing is revoked yet.
    let (number_before, listed) = crl(&s).await;
    assert_eq!(listed, Vec::<String>::new());

    // Revoke one serial (given in upper case): dev-a keeps the other.
    let (status, body) = s
        .post(
            "/api/v1/devices/dev-a/revoke",
            json!({"serial": a1.to_uppercase()}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["revoked"], json!([a1]));
    assert_eq!(body["device"]["id"], "dev-a");
    assert_eq!(body["device"]["cert_serial"], a2.as_str());
    let (_, body) = s.get("/api/v1/devices/dev-a").await;
    let certs = certificates(&body);
    assert_eq!(certs.len(), 2, "{body}");
    for (serial, revoked_at) in &certs {
        if *serial == a1 {
            assert!(revoked_at.as_str().unwrap().ends_with('Z'), "{body}");
        } else {
            assert_eq!(*serial, a2);
            assert_eq!(*revoked_at, Json::Null, "{body}");
        }
    }

    // A serial of another device, an unknown device, a bad serial, a body with no JSON type.
    let (status, body) = s
        .post("/api/v1/devices/dev-a/revoke", json!({"serial": b1}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body).0, "certificate_not_found");
    let (status, body) = s.post_empty("/api/v1/devices/ghost/revoke").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body).0, "device_not_found");
    let (status, body) = s
        .post("/api/v1/devices/dev-a/revoke", json!({"serial": "xyz"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body).0, "invalid_body");
    let (status, body) = s
        .post("/api/v1/devices/dev-a/revoke", json!({"serials": [a2]}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body).0, "invalid_body");
    let (status, body) = send(
        s.req(Method::POST, "/api/v1/devices/dev-a/revoke")
            .body(format!("{{\"serial\": \"{a2}\"}}")),
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(error_code(&body).0, "unsupported_media_type");

    // No body: every certificate still valid. The device then has no current certificate.
    let (status, body) = s.post_empty("/api/v1/devices/dev-a/revoke").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["revoked"], json!([a2]));
    assert_eq!(body["device"]["cert_serial"], Json::Null);
    assert_eq!(body["device"]["cert_not_after"], Json::Null);
    let (_, body) = s.get("/api/v1/devices/dev-a").await;
    assert!(
        certificates(&body).iter().all(|(_, at)| at.is_string()),
        "{body}"
    );
    // Again, with `{}`: nothing left to revoke.
    let (status, body) = s.post("/api/v1/devices/dev-a/revoke", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["revoked"], json!([]));
    // And with the JSON content type but an empty body.
    let (status, body) = send(
        s.req(Method::POST, "/api/v1/devices/dev-a/revoke")
            .header("content-type", "application/json"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["revoked"], json!([]));
    // A device without a current certificate is not "expiring".
    let (_, body) = s.get("/api/v1/devices?expiring_within=400d").await;
    assert_eq!(ids(&body), ["dev-b"]);

    let (number, listed) = crl(&s).await;
    assert_eq!(listed, sorted(vec![a1.clone(), a2.clone()]));
    assert!(number > number_before, "{number} > {number_before}");

    // Disable and enable.
    let (status, body) = s.post_empty("/api/v1/devices/dev-b/disable").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id"], "dev-b");
    assert_eq!(body["status"], "disabled");
    let (_, body) = s.get("/api/v1/devices/dev-b").await;
    assert_eq!(body["status"], "disabled");
    // A disabled device's certificate is not revoked.
    assert_eq!(body["cert_serial"], b1.as_str());
    let (status, body) = s.post_empty("/api/v1/devices/dev-b/enable").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "enabled");
    let (_, body) = s.get("/api/v1/devices/dev-b").await;
    assert_eq!(body["status"], "enabled");
    for action in ["disable", "enable"] {
        let (status, body) = s
            .post_empty(&format!("/api/v1/devices/ghost/{action}"))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{action}");
        assert_eq!(error_code(&body).0, "device_not_found", "{action}");
    }

    // Delete: gone, but its certificate stays on the CRL.
    let resp = s
        .req(Method::DELETE, "/api/v1/devices/dev-b")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(resp.bytes().await.unwrap().is_empty());
    let (status, body) = s.get("/api/v1/devices/dev-b").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body).0, "device_not_found");
    let (status, body) = send(s.req(Method::DELETE, "/api/v1/devices/dev-b")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body).0, "device_not_found");
    let (status, body) = s.post_empty("/api/v1/devices/dev-b/revoke").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body).0, "device_not_found");
    let (_, body) = s.get("/api/v1/devices").await;
    assert_eq!(ids(&body), ["dev-a"]);

    // Without registry changes in between, the next CRL still gets a new, higher number.
    let (again, listed) = crl(&s).await;
    assert_eq!(listed, sorted(vec![a1.clone(), a2.clone(), b1.clone()]));
    tokio::time::sleep(Duration::from_millis(2)).await;
    let (last, _) = crl(&s).await;
    assert!(last > again, "{last} > {again}");

    // The CRL is public (`crl` fetches it without a token), and a token, even a wrong one, is
    // ignored there rather than refused.
    for token in [TOKEN, "wrong"] {
        let resp = s
            .client
            .get(format!("{}/api/v1/pki/crl.pem", s.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{token}");
        assert!(resp.text().await.unwrap().contains("BEGIN X509 CRL"));
    }
    // Another method on it is refused, in the API's error shape, without asking for a token.
    let (status, body) = send(s.client.post(format!("{}/api/v1/pki/crl.pem", s.base))).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_code(&body).0, "method_not_allowed");
    // Its neighbours still need the token.
    for path in [
        "/api/v1/pki/cas",
        "/api/v1/pki/crl",
        "/api/v1/pki/crl.pem/x",
    ] {
        let (status, body) = send(s.client.get(format!("{}{path}", s.base))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(error_code(&body).0, "unauthorized", "{path}");
        let (status, _) = send(
            s.client
                .get(format!("{}{path}", s.base))
                .bearer_auth("wrong"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let (status, _) = s.get("/api/v1/pki/cas").await;
    assert_eq!(status, StatusCode::OK);
    s.stop().await;
}

#[tokio::test]
async fn audit_lists_entries_newest_first_by_device_and_in_pages() {
    let s = Server::start().await;
    let t0: i64 = 1_732_780_800_000; // 2024-11-28T08:00:00Z
    let entry = |n: i64, device: Option<&str>, decision, reason: &str| AuditEntry {
        id: 0,
        at_ms: t0 + n,
        peer: format!("192.0.2.1:{}", 40_000 + n),
        device: device.map(id),
        serial: device.map(|_| "4a0b".to_owned()),
        decision,
        reason: reason.into(),
    };
    s.registry
        .record_audit(&[
            entry(0, None, AuditDecision::Refused, "TLS handshake refused"),
            entry(1, Some("dev-a"), AuditDecision::Accepted, "connected"),
            entry(2, Some("ghost"), AuditDecision::Refused, "not registered"),
            entry(
                3,
                Some("dev-a"),
                AuditDecision::Closed,
                "certificate revoked",
            ),
        ])
        .unwrap();

    let (status, body) = s.get("/api/v1/audit").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let entries = body["entries"].as_array().unwrap();
    let reasons: Vec<_> = entries
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "certificate revoked",
            "not registered",
            "connected",
            "TLS handshake refused"
        ]
    );
    assert_eq!(body["next"], Json::Null);
    let newest = &entries[0];
    assert!(newest["id"].is_i64());
    assert_eq!(
        *newest,
        json!({
            "id": newest["id"],
            "at": "2024-11-28T08:00:00.003Z",
            "at_ms": t0 + 3,
            "peer": "192.0.2.1:40003",
            "device": "dev-a",
            "serial": "4a0b",
            "decision": "closed",
            "reason": "certificate revoked",
        })
    );
    assert_eq!(entries[3]["device"], Json::Null);
    assert_eq!(entries[3]["serial"], Json::Null);
    assert_eq!(entries[3]["decision"], "refused");
    assert_eq!(entries[2]["decision"], "accepted");

    // One device.
    let (status, body) = s.get("/api/v1/audit?device=dev-a").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let decisions: Vec<_> = body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["decision"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, ["closed", "accepted"]);
    // A device that was never registered has its entries too.
    let (_, body) = s.get("/api/v1/audit?device=ghost").await;
    assert_eq!(body["entries"].as_array().unwrap().len(), 1);

    // Pages of three: next is the `before` of the following page.
    let (_, page) = s.get("/api/v1/audit?limit=3").await;
    assert_eq!(page["entries"].as_array().unwrap().len(), 3);
    let before = page["next"].as_i64().unwrap();
    assert_eq!(Some(before), page["entries"][2]["id"].as_i64());
    let (_, page) = s
        .get(&format!("/api/v1/audit?limit=3&before={before}"))
        .await;
    assert_eq!(page["entries"][0]["reason"], "TLS handshake refused");
    assert_eq!(page["entries"].as_array().unwrap().len(), 1);
    assert_eq!(page["next"], Json::Null);

    for (query, code) in [
        ("limit=0", "invalid_query"),
        ("before=latest", "invalid_query"),
        ("colour=red", "invalid_query"),
        ("device=bad%2Fid", "invalid_device_id"),
    ] {
        let (status, body) = s.get(&format!("/api/v1/audit?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(error_code(&body).0, code, "{query}");
    }
    s.stop().await;
}

/// A self-signed certificate with subject `CN=<cn>, O=Acme` and a fresh key: a CA when `ca`.
fn self_signed(cn: &str, ca: bool) -> (rcgen::Certificate, rcgen::KeyPair) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Acme");
    if ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert, key)
}

/// How many `TrustChanged` the registry recorded after sequence number `after`.
fn trust_changes(s: &Server, after: i64) -> usize {
    s.registry
        .changes(after, 1000)
        .unwrap()
        .into_iter()
        .filter(|(_, c)| *c == Change::TrustChanged)
        .count()
}

#[tokio::test]
async fn external_cas_register_list_get_and_delete() {
    let s = Server::start().await;
    let (status, body) = s.get("/api/v1/pki/cas").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"cas": []}));

    // A CA, submitted with its private key in the same PEM: only the certificate is kept.
    let (acme, acme_key) = self_signed("Acme Devices CA", true);
    let acme_id = tellus_broker::pki::fingerprint(acme.der());
    let before = s.registry.last_change().unwrap();
    let resp = s
        .req(Method::POST, "/api/v1/pki/cas")
        .json(&json!({
            "pem": format!("{}{}", acme.pem(), acme_key.serialize_pem()),
            "auto_register": true,
            "tags": {"site": "lyon", "fleet": "acme"},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        resp.headers()["location"],
        format!("/api/v1/pki/cas/{acme_id}").as_str()
    );
    let created: Json = resp.json().await.unwrap();
    assert_eq!(created["id"], acme_id.as_str());
    let subject = created["subject"].as_str().unwrap();
    assert!(subject.contains("Acme Devices CA"), "{subject}");
    assert_eq!(created["auto_register"], true);
    assert_eq!(created["tags"], json!({"site": "lyon", "fleet": "acme"}));
    assert!(created["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(created.get("pem").is_none(), "{created}");
    assert_eq!(trust_changes(&s, before), 1);

    // One, with its PEM; a fingerprint as openssl prints it finds it too.
    let openssl_style = acme_id
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|b| std::str::from_utf8(b).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    for path in [
        format!("/api/v1/pki/cas/{acme_id}"),
        format!("/api/v1/pki/cas/{openssl_style}"),
    ] {
        let (status, one) = s.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {one}");
        let pem = one["pem"].as_str().unwrap();
        assert!(!pem.contains("PRIVATE KEY"), "{pem}");
        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        assert_eq!(parsed.contents, acme.der().as_ref());
        let mut without_pem = one.clone();
        without_pem.as_object_mut().unwrap().remove("pem");
        assert_eq!(without_pem, created);
    }

    // More than one CA at once; the defaults: no auto-registration, no tags.
    let (other, _) = self_signed("Other Vendor CA", true);
    let (status, body) = s.post("/api/v1/pki/cas", json!({"pem": other.pem()})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let other_id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(body["auto_register"], false);
    assert_eq!(body["tags"], json!({}));
    let (_, body) = s.get("/api/v1/pki/cas").await;
    let cas = body["cas"].as_array().unwrap();
    let listed: Vec<_> = cas.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [acme_id.as_str(), other_id.as_str()]);
    assert!(cas.iter().all(|c| c.get("pem").is_none()), "{body}");
    assert_eq!(cas[0], created);
    assert_eq!(trust_changes(&s, before), 2);

    // Refusals, none of which changes what is trusted.
    let (status, body) = s.post("/api/v1/pki/cas", json!({"pem": acme.pem()})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(error_code(&body).0, "ca_exists");
    let (impostor, _) = self_signed("Acme Devices CA", true);
    let (status, body) = s
        .post("/api/v1/pki/cas", json!({"pem": impostor.pem()}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (code, message) = error_code(&body);
    assert_eq!(code, "ca_subject_taken");
    assert!(message.contains(&acme_id), "{message}");
    let (leaf, _) = self_signed("sensor-01", false);
    let (fleet, garbage) = (s.pki.ca_pem().to_owned(), "not a certificate".to_owned());
    let two = format!("{}{}", acme.pem(), other.pem());
    for pem in [leaf.pem(), fleet, garbage, String::new(), two] {
        let (status, body) = s.post("/api/v1/pki/cas", json!({"pem": pem})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{pem}: {body}");
        let (code, message) = error_code(&body);
        assert_eq!(code, "invalid_ca", "{pem}");
        assert!(message.starts_with("invalid CA certificate: "), "{message}");
    }
    let many: serde_json::Map<String, Json> =
        (0..65).map(|n| (format!("k{n}"), json!("v"))).collect();
    for bad in [
        json!({"pem": acme.pem(), "colour": "red"}),
        json!({"auto_register": true}),
        json!({"pem": impostor.pem(), "auto_register": "yes"}),
        json!({"pem": impostor.pem(), "tags": {"": "v"}}),
        json!({"pem": impostor.pem(), "tags": {"k".repeat(65): "v"}}),
        json!({"pem": impostor.pem(), "tags": {"k": "v".repeat(257)}}),
        json!({"pem": impostor.pem(), "tags": many}),
        json!({"pem": impostor.pem(), "tags": {"k": 1}}),
    ] {
        let (status, body) = s.post("/api/v1/pki/cas", bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(error_code(&body).0, "invalid_body", "{bad}");
    }
    assert_eq!(s.registry.cas().unwrap().len(), 2);
    assert_eq!(trust_changes(&s, before), 2);

    // Delete.
    let mark = s.registry.last_change().unwrap();
    let resp = s
        .req(Method::DELETE, &format!("/api/v1/pki/cas/{acme_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(resp.bytes().await.unwrap().is_empty());
    assert_eq!(trust_changes(&s, mark), 1);
    for method in [Method::GET, Method::DELETE] {
        let (status, body) =
            send(s.req(method.clone(), &format!("/api/v1/pki/cas/{acme_id}"))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method}");
        let (code, message) = error_code(&body);
        assert_eq!(code, "ca_not_found", "{method}");
        assert!(message.contains(&acme_id), "{message}");
    }
    assert_eq!(trust_changes(&s, mark), 1);
    let (_, body) = s.get("/api/v1/pki/cas").await;
    assert_eq!(body["cas"].as_array().unwrap().len(), 1);
    assert_eq!(body["cas"][0]["id"], other_id.as_str());

    // With the first one gone, its subject is free again.
    let (status, body) = s
        .post("/api/v1/pki/cas", json!({"pem": impostor.pem()}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // Behind the token like everything else.
    let resp = s
        .client
        .get(format!("{}/api/v1/pki/cas", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    s.stop().await;
}

#[tokio::test]
async fn tags_are_set_and_removed_by_patch() {
    let s = Server::start().await;
    let (status, _) = s.post("/api/v1/devices", json!({"id": "tagged"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let patch = |body: Json| send(s.req(Method::PATCH, "/api/v1/devices/tagged").json(&body));

    let (status, body) = patch(json!({"tags": {"site": "berlin", "floor": "2"}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tags"], json!({"site": "berlin", "floor": "2"}));
    let (status, body) = patch(json!({"tags": {"floor": null, "site": "paris"}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tags"], json!({"site": "paris"}));
    let (_, body) = s.get("/api/v1/devices/tagged").await;
    assert_eq!(body["tags"], json!({"site": "paris"}));

    for bad in [
        json!({"tags": {"a:b": "c"}}),
        json!({"tags": {"": "c"}}),
        json!({"tags": {"k": "v".repeat(257)}}),
        json!({"name": "x"}),
    ] {
        let (status, body) = patch(bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad} -> {body}");
    }
    let many: serde_json::Map<String, Json> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    let (status, body) = patch(json!({ "tags": many })).await;
    assert_eq!(
        (status, error_code(&body).0),
        (StatusCode::BAD_REQUEST, "invalid_body")
    );
    let (status, body) = send(
        s.req(Method::PATCH, "/api/v1/devices/nobody")
            .json(&json!({"tags": {"a": "b"}})),
    )
    .await;
    assert_eq!(
        (status, error_code(&body).0),
        (StatusCode::NOT_FOUND, "device_not_found")
    );
}

#[tokio::test]
async fn the_device_list_filters_by_tags() {
    let s = Server::start().await;
    for (device, tags) in [
        ("t-a", json!({"site": "berlin", "floor": "1"})),
        ("t-b", json!({"site": "berlin", "floor": "2"})),
        ("t-c", json!({"site": "paris", "floor": "1"})),
        ("t-d", json!({})),
    ] {
        let (status, _) = s.post("/api/v1/devices", json!({ "id": device })).await;
        assert_eq!(status, StatusCode::CREATED);
        let path = format!("/api/v1/devices/{device}");
        let (status, body) = send(s.req(Method::PATCH, &path).json(&json!({ "tags": tags }))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let ids = |body: &Json| -> Vec<String> {
        body["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, body) = s.get("/api/v1/devices?tag=site:berlin").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(ids(&body), ["t-a", "t-b"]);
    let (_, body) = s.get("/api/v1/devices?tag=site:berlin&tag=floor:1").await;
    assert_eq!(ids(&body), ["t-a"]);
    let (_, body) = s.get("/api/v1/devices?tag=floor:1&limit=1").await;
    assert_eq!(
        (ids(&body), &body["next"]),
        (vec!["t-a".to_owned()], &json!("t-a"))
    );
    let (_, body) = s.get("/api/v1/devices?tag=floor:1&limit=1&after=t-a").await;
    assert_eq!(
        (ids(&body), &body["next"]),
        (vec!["t-c".to_owned()], &Json::Null)
    );
    let (_, body) = s.get("/api/v1/devices?tag=site:lyon").await;
    assert_eq!(ids(&body), Vec::<String>::new());
    let (_, body) = s.get("/api/v1/devices").await;
    assert_eq!(ids(&body), ["t-a", "t-b", "t-c", "t-d"]);
    for bad in ["tag=site", "tag=:x", "colour=red", "limit=1&limit=2"] {
        let (status, body) = s.get(&format!("/api/v1/devices?{bad}")).await;
        assert_eq!(
            (status, error_code(&body).0),
            (StatusCode::BAD_REQUEST, "invalid_query"),
            "{bad}"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn the_dashboard_is_served_beside_the_api_without_a_token() {
    let s = Server::start().await;
    let page = s.client.get(format!("{}/", s.base)).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .starts_with("default-src 'self'"));
    assert!(page.text().await.unwrap().contains("/assets/app.js"));
    // A wrong token on the page is ignored: it holds no data.
    let script = s.req(Method::GET, "/assets/app.js").bearer_auth("wrong");
    let script = script.send().await.unwrap();
    assert_eq!(script.status(), StatusCode::OK);
    assert_eq!(
        script.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    let (status, body) = send(s.client.get(format!("{}/assets/nope.js", s.base))).await;
    assert_eq!(
        (status, error_code(&body).0),
        (StatusCode::NOT_FOUND, "not_found")
    );
    // The API behind it still wants the token.
    let (status, _) = send(s.client.get(format!("{}/api/v1/devices", s.base))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    s.stop().await;
}
