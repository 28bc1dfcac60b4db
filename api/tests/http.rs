//! The API over real HTTP: a real SQLite store and registry in a temp dir, a real PKI, the
//! server on 127.0.0.1:0, and reqwest as the client.

use std::{sync::Arc, time::Duration};

use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value as Json};
use tellus_api::AppState;
use tellus_broker::pki::Pki;
use tellus_core::{DeviceId, Sample, Value};
use tellus_ingest::{
    Batch, DeadLetter, Durability, IngestStats, SqliteRegistry, SqliteStore, TelemetryStore,
};
use tokio::sync::oneshot;

const TOKEN: &str = "test-admin-token";

struct Server {
    base: String,
    client: Client,
    store: Arc<SqliteStore>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(SqliteStore::open(&dir.path().join("telemetry.db"), Durability::Os).unwrap());
        let registry = Arc::new(SqliteRegistry::open(&dir.path().join("registry.db")).unwrap());
        let pki =
            Pki::load_or_create(&dir.path().join("pki"), Duration::from_secs(365 * 86400)).unwrap();
        let state = AppState {
            registry,
            store: store.clone(),
            pki: Arc::new(pki),
            ingest_stats: Arc::new(IngestStats::default()),
            gate_stats: Arc::new(tellus_broker::gate::GateStats::default()),
            admin_token: TOKEN.into(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(tellus_api::serve(listener, state, async {
            let _ = stopped.await;
        }));
        Server {
            base,
            client: Client::new(),
            store,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
    }

    async fn get(&self, path: &str) -> (StatusCode, Json) {
        send(self.req(Method::GET, path)).await
    }

    async fn post(&self, path: &str, body: Json) -> (StatusCode, Json) {
        send(self.req(Method::POST, path).json(&body)).await
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Json) {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let body = resp.text().await.unwrap();
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{status}: body is not JSON ({e}): {body:?}"));
    (status, json)
}

/// Asserts the API's error shape and returns the message.
fn error_code(body: &Json) -> (&str, &str) {
    let err = &body["error"];
    let code = err["code"].as_str().unwrap_or_else(|| panic!("{body}"));
    let message = err["message"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(!message.is_empty());
    (code, message)
}

fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

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
    for path in ["/api/v1/nope", "/api/v2/devices", "/"] {
        let (status, body) = s.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(error_code(&body).0, "not_found", "{path}");
    }
    let (status, body) = send(s.req(Method::DELETE, "/api/v1/stats")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_code(&body).0, "method_not_allowed");
    s.stop().await;
}
