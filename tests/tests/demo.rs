//! `tellus demo`, end to end: the real binary on free ports, read as a person would read it
//! (the address and token it prints), checked through the API, stopped with Ctrl-C (SIGINT).

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc::Receiver,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tellus_tests::{signal_and_wait, tellus_bin, EVENTUALLY};

/// What the demo printed for people.
struct Printed {
    http: String,
    token: String,
    data: PathBuf,
}

/// A running `tellus demo`; killed when dropped.
struct Demo {
    child: Option<Child>,
    printed: Printed,
    http: reqwest::Client,
    _stdout: Receiver<String>,
}

impl Demo {
    fn start(args: &[&str]) -> Demo {
        let mut child = Command::new(tellus_bin())
            .arg("demo")
            .args(["--http-addr", "127.0.0.1:0", "--mqtt-addr", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "warn,rumqttd=off,rustls=error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start tellus demo");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                eprintln!("[demo] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut http, mut token, mut data) = (None, None, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        while http.is_none() || token.is_none() || data.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .expect("the demo prints its address, token and data directory");
            let field = |name: &str| {
                line.trim()
                    .strip_prefix(name)
                    .map(|rest| rest.trim().to_owned())
            };
            if let Some(url) = field("dashboard:") {
                let addr = url
                    .strip_prefix("http://")
                    .and_then(|a| a.strip_suffix('/'))
                    .unwrap_or_else(|| panic!("a dashboard URL: {url}"));
                http = Some(addr.to_owned());
            }
            if let Some(t) = field("token:") {
                token = Some(t);
            }
            if let Some(d) = field("data:") {
                data = Some(PathBuf::from(d));
            }
        }
        Demo {
            child: Some(child),
            printed: Printed {
                http: http.unwrap(),
                token: token.unwrap(),
                data: data.unwrap(),
            },
            http: reqwest::Client::new(),
            _stdout: lines,
        }
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("http://{}{path}", self.printed.http))
            .bearer_auth(&self.printed.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let r = request.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::GET, path, None).await
    }

    /// GETs `path` until `done` holds, for at most [`EVENTUALLY`].
    async fn get_until(&self, path: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            let (status, body) = self.get(path).await;
            assert_eq!(status, 200, "GET {path}: {body}");
            if done(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "GET {path} never got there: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGINT (Ctrl-C) and waits for the exit.
    fn interrupt(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        signal_and_wait(&mut child, nix::sys::signal::Signal::SIGINT)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_a_fleet_answers_and_cleans_up() {
    let demo = Demo::start(&[]);
    let data = demo.printed.data.clone();
    assert!(data.join("registry.db").exists(), "{}", data.display());
    // The printed dashboard address serves the dashboard.
    let page = reqwest::get(format!("http://{}/", demo.printed.http))
        .await
        .unwrap();
    assert_eq!(page.status(), 200);

    // The simulated fleet connects (two of the twelve drop off now and then) and reports.
    demo.get_until("/api/v1/presence", |p| {
        p["devices"] == 12 && p["online"].as_u64().is_some_and(|n| n >= 10)
    })
    .await;
    let fleet = demo
        .get_until("/api/v1/telemetry/latest?metric=temperature", |b| {
            b["devices"].as_array().is_some_and(|d| d.len() >= 10)
        })
        .await;
    for reading in fleet["devices"].as_array().unwrap() {
        let t = reading["value"].as_f64().unwrap();
        assert!((0.0..50.0).contains(&t), "{reading}");
    }
    let series = demo
        .get_until(
            "/api/v1/devices/demo-01/telemetry?metrics=temperature,humidity,battery",
            |b| {
                b["series"].as_array().is_some_and(|s| {
                    s.iter()
                        .all(|s| !s["points"].as_array().unwrap().is_empty())
                })
            },
        )
        .await;
    assert_eq!(series["series"].as_array().unwrap().len(), 3, "{series}");
    // Tagged, with state reported, and rules to show.
    let (status, device) = demo.get("/api/v1/devices/demo-01").await;
    assert_eq!(status, 200, "{device}");
    assert_eq!(device["tags"]["site"], "berlin", "{device}");
    assert!(device["tags"]["model"].is_string(), "{device}");
    let state = demo
        .get_until("/api/v1/devices/demo-01/state", |s| {
            s["reported_version"] != 0
        })
        .await;
    assert_eq!(state["reported"]["interval_ms"], 1000, "{state}");
    let (status, rules) = demo.get("/api/v1/rules").await;
    assert_eq!(status, 200, "{rules}");
    assert_eq!(rules["rules"].as_array().unwrap().len(), 3, "{rules}");

    // A device answers a command.
    let (status, command) = demo
        .request(
            reqwest::Method::POST,
            "/api/v1/devices/demo-01/commands?wait=20s",
            Some(json!({"name": "ping", "params": {"hello": 1}})),
        )
        .await;
    assert_eq!(status, 200, "{command}");
    assert_eq!(command["status"], "succeeded", "{command}");
    assert_eq!(command["output"], json!({"pong": {"hello": 1}}));

    // Ctrl-C: the devices, then Tellus, stop; the data directory goes.
    let status = demo.interrupt();
    assert!(status.success(), "{status}");
    assert!(!data.exists(), "{} is still there", data.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_keeps_the_data_directory() {
    let demo = Demo::start(&["--devices", "1", "--keep"]);
    let data = demo.printed.data.clone();
    demo.get_until("/api/v1/presence", |p| p["online"] == 1)
        .await;
    let status = demo.interrupt();
    assert!(status.success(), "{status}");
    assert!(data.join("registry.db").exists(), "{}", data.display());
    std::fs::remove_dir_all(&data).unwrap();
}
