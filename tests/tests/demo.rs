//! `tellus demo`, end to end: the real binary on free ports, read as a person would read it
//! (the address and token it prints), checked through the API, stopped with Ctrl-C (SIGINT).

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc::Receiver,
    time::{Duration, Instant},
};

use serde_json::json;
use tellus_tests::{signal_and_wait, tellus_bin, Api};

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
    /// Its API, with the token it printed.
    api: Api,
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
        let printed = Printed {
            http: http.unwrap(),
            token: token.unwrap(),
            data: data.unwrap(),
        };
        let addr = printed
            .http
            .parse()
            .unwrap_or_else(|e| panic!("the dashboard's address {}: {e}", printed.http));
        Demo {
            child: Some(child),
            api: Api::new(addr, printed.token.clone()),
            printed,
            _stdout: lines,
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
    demo.api
        .get_until("/api/v1/presence", |p| {
            p["devices"] == 12 && p["online"].as_u64().is_some_and(|n| n >= 10)
        })
        .await;
    let fleet = demo
        .api
        .get_until("/api/v1/telemetry/latest?metric=temperature", |b| {
            b["devices"].as_array().is_some_and(|d| d.len() >= 10)
        })
        .await;
    for reading in fleet["devices"].as_array().unwrap() {
        let t = reading["value"].as_f64().unwrap();
        assert!((0.0..50.0).contains(&t), "{reading}");
    }
    let series = demo
        .api
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
    let (status, device) = demo.api.get("/api/v1/devices/demo-01").await;
    assert_eq!(status, 200, "{device}");
    assert_eq!(device["tags"]["site"], "berlin", "{device}");
    assert!(device["tags"]["model"].is_string(), "{device}");
    let state = demo
        .api
        .get_until("/api/v1/devices/demo-01/state", |s| {
            s["reported_version"] != 0
        })
        .await;
    assert_eq!(state["reported"]["interval_ms"], 1000, "{state}");
    let (status, rules) = demo.api.get("/api/v1/rules").await;
    assert_eq!(status, 200, "{rules}");
    assert_eq!(rules["rules"].as_array().unwrap().len(), 3, "{rules}");

    // A device answers a command.
    let (status, command) = demo
        .api
        .post(
            "/api/v1/devices/demo-01/commands?wait=20s",
            json!({"name": "ping", "params": {"hello": 1}}),
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
    demo.api
        .get_until("/api/v1/presence", |p| p["online"] == 1)
        .await;
    let status = demo.interrupt();
    assert!(status.success(), "{status}");
    assert!(data.join("registry.db").exists(), "{}", data.display());
    std::fs::remove_dir_all(&data).unwrap();
}
