//! The test harness the API's HTTP tests share: a real SQLite store and registry in a temp
//! dir, a real PKI, the server on 127.0.0.1:0, and reqwest as the client.
//!
//! Each test file uses a part of it.
#![allow(dead_code)]

use std::{sync::Arc, time::Duration};

use reqwest::{Client, Method, StatusCode};
use serde_json::Value as Json;
use tellus_api::AppState;
use tellus_broker::pki::Pki;
use tellus_core::DeviceId;
use tellus_ingest::{Durability, IngestStats, SqliteRegistry, SqliteStore};
use tokio::sync::oneshot;

pub const TOKEN: &str = "test-admin-token";

pub struct Server {
    pub base: String,
    pub client: Client,
    pub store: Arc<SqliteStore>,
    pub registry: Arc<SqliteRegistry>,
    pub pki: Arc<Pki>,
    /// Readiness: what the server's `/readyz` reads besides the store.
    pub health: tellus_api::routes::health::Health,
    pub gate_stats: Arc<tellus_broker::gate::GateStats>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    pub async fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(SqliteStore::open(&dir.path().join("telemetry.db"), Durability::Os).unwrap());
        let registry = Arc::new(SqliteRegistry::open(&dir.path().join("registry.db")).unwrap());
        let pki = Arc::new(
            Pki::load_or_create(&dir.path().join("pki"), Duration::from_secs(365 * 86400)).unwrap(),
        );
        let (devices, _, _) = tellus_broker::devices::Devices::new(
            registry.clone(),
            tellus_broker::routing::Publisher::detached(),
            256 * 1024,
            tellus_core::Live::default(),
            tellus_core::RuleFeed::none(),
        );
        let health = tellus_api::routes::health::Health::default();
        let gate_stats = Arc::new(tellus_broker::gate::GateStats::default());
        let state = AppState {
            devices,
            live: tellus_core::Live::default(),
            rules: tellus_rules::service::Rules::detached(),
            registry: registry.clone(),
            store: store.clone(),
            pki: pki.clone(),
            ingest_stats: Arc::new(IngestStats::default()),
            gate_stats: gate_stats.clone(),
            admin_token: TOKEN.into(),
            health: health.clone(),
            metrics: Default::default(),
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
            registry,
            pki,
            health,
            gate_stats,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    pub fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Json) {
        send(self.req(Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: Json) -> (StatusCode, Json) {
        send(self.req(Method::POST, path).json(&body)).await
    }

    /// A POST without a body.
    pub async fn post_empty(&self, path: &str) -> (StatusCode, Json) {
        send(self.req(Method::POST, path)).await
    }

    /// A GET whose answer is not JSON: status, content type and body.
    pub async fn get_text(&self, path: &str) -> (StatusCode, String, String) {
        let resp = self.req(Method::GET, path).send().await.unwrap();
        let status = resp.status();
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, content_type, resp.text().await.unwrap())
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

pub async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Json) {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let body = resp.text().await.unwrap();
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{status}: body is not JSON ({e}): {body:?}"));
    (status, json)
}

/// Asserts the API's error shape and returns the message.
pub fn error_code(body: &Json) -> (&str, &str) {
    let err = &body["error"];
    let code = err["code"].as_str().unwrap_or_else(|| panic!("{body}"));
    let message = err["message"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(!message.is_empty());
    (code, message)
}

pub fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}
