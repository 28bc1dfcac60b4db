//! The firmware examples against a real Tellus: the C device (`firmware-examples/c`, built
//! here by `make -C firmware-examples/c`, with gcc and libmosquitto-dev) and the Python one (`firmware-examples/python`, which
//! needs paho-mqtt). Each sends five readings with its own timestamps, which must be stored
//! exactly once each, then answers a `ping` and refuses an unknown command.

use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Instant,
};

use serde_json::{json, Value};
use tellus_tests::{Tellus, EVENTUALLY};

/// Readings each example is asked to send.
const READINGS: usize = 5;

/// A device program running as a child process, killed when dropped. Its output is copied to
/// this test's stderr as it comes, and kept.
struct Running {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Running {
    fn start(label: &str, mut command: Command) -> Running {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label}: {e}"));
        let output = Arc::new(Mutex::new(String::new()));
        let stdout = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        for stream in [stdout, stderr].into_iter().flatten() {
            let (label, output) = (label.to_owned(), output.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("[{label}] {line}");
                    let mut output = output.lock().unwrap();
                    output.push_str(&line);
                    output.push('\n');
                }
            });
        }
        Running { child, output }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits until the program has printed a line containing `needle`.
    async fn wait_for_line(&self, needle: &str) {
        let deadline = Instant::now() + EVENTUALLY;
        while !self.output().lines().any(|line| line.contains(needle)) {
            assert!(
                Instant::now() < deadline,
                "the device never printed {needle:?}; its output:\n{}",
                self.output()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `(ts, value)` points of a telemetry answer to `metric=` (numbers only).
fn points(body: &Value) -> Vec<(i64, f64)> {
    let Some(points) = body["points"].as_array() else {
        panic!("not a telemetry answer: {body}");
    };
    points
        .iter()
        .map(|point| match (point[0].as_i64(), point[1].as_f64()) {
            (Some(ts), Some(value)) => (ts, value),
            _ => panic!("not a [ts, number] point: {point} in {body}"),
        })
        .collect()
}

/// Sends `{"name", "params"}` to `id` and waits for it to end; returns the command.
async fn command(t: &Tellus, id: &str, name: &str, params: Value) -> Value {
    let (status, body) = t
        .post(
            &format!("/api/v1/devices/{id}/commands?wait=20s"),
            json!({"name": name, "params": params}),
        )
        .await;
    assert_eq!(status, 200, "command {name} did not end: {body}");
    body
}

/// Runs the example `program` (its command line so far: the flags are added here) as device
/// `id` against a fresh Tellus, and checks what it stores and how it answers commands.
async fn check_example(label: &str, mut program: Command, id: &str) {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(&dir.path().join("data"), None);
    let creds = t.create_device(id).await;
    let (cert, key, ca) = creds.write_to_dir(dir.path().join("certs")).unwrap();

    let started_ms = tellus_core::now_ms();
    program
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &t.mqtt_addr.port().to_string(),
        ])
        .arg("--cafile")
        .arg(&ca)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(["--id", id, "--every", "0.2"])
        .args(["--count", &READINGS.to_string()]);
    let device = Running::start(label, program);

    // The five readings are stored, at the device's own times, in order, with the pretend
    // sensor's values (20.0 + 0.5 n for reading n).
    let path = format!("/api/v1/devices/{id}/telemetry?metric=temperature");
    let body = t
        .get_until(&path, |body| points(body).len() >= READINGS)
        .await;
    let stored = points(&body);
    let now_ms = tellus_core::now_ms();
    assert_eq!(stored.len(), READINGS, "{body}");
    let times: Vec<i64> = stored.iter().map(|(ts, _)| *ts).collect();
    assert!(
        times.windows(2).all(|w| w[0] < w[1]),
        "device times not increasing: {times:?}"
    );
    assert!(
        times[0] >= started_ms && times[READINGS - 1] <= now_ms,
        "device times {times:?} outside the run [{started_ms}, {now_ms}]"
    );
    let values: Vec<f64> = stored.iter().map(|(_, value)| *value).collect();
    assert_eq!(values, vec![20.5, 21.0, 21.5, 22.0, 22.5], "{body}");
    // Every reading is acknowledged, and the device says so.
    device
        .wait_for_line(&format!("reading {READINGS} acknowledged"))
        .await;

    // A ping is answered with its params echoed.
    let ping = command(&t, id, "ping", json!({"n": 1})).await;
    assert_eq!(ping["status"], "succeeded", "{ping}");
    assert_eq!(ping["output"], json!({"pong": {"n": 1}}), "{ping}");

    // Any other command is refused by the device, which says why.
    let other = command(&t, id, "reboot", json!({})).await;
    assert_eq!(other["status"], "failed", "{other}");
    assert_eq!(other["output"], "unknown command \"reboot\"", "{other}");
    device
        .wait_for_line(&format!(
            "command {} (reboot) answered",
            other["id"].as_str().unwrap_or_default()
        ))
        .await;

    // Still exactly five readings of each metric: the device stopped after --count, and
    // sent none twice.
    for metric in ["temperature", "uptime_s"] {
        let (status, body) = t
            .get(&format!("/api/v1/devices/{id}/telemetry?metric={metric}"))
            .await;
        assert_eq!(status, 200, "{body}");
        let stored: Vec<i64> = points(&body).iter().map(|(ts, _)| *ts).collect();
        assert_eq!(stored, times, "{metric}: {body}");
    }
    drop(device);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_c_example_sends_readings_and_answers_commands() {
    let mut probe = Command::new("sh");
    probe.args([
        "-c",
        "command -v gcc && command -v make && test -f /usr/include/mosquitto.h",
    ]);
    if !tellus_tests::require(
        "gcc, make and libmosquitto's headers are installed",
        probe,
        "apt-get install gcc make libmosquitto-dev",
    ) {
        return;
    }
    // Built here, with the same Makefile a firmware developer uses.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-examples/c");
    let built = Command::new("make")
        .arg("-C")
        .arg(&dir)
        .status()
        .expect("run make");
    assert!(built.success(), "make -C firmware-examples/c failed");
    check_example(
        "tellus-device-c",
        Command::new(dir.join("tellus-device-c")),
        "c-01",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_sends_readings_and_answers_commands() {
    let mut probe = Command::new("python3");
    probe.args(["-c", "import paho.mqtt.client"]);
    if !tellus_tests::require(
        "python3 can import paho.mqtt.client",
        probe,
        "python3 -m pip install paho-mqtt",
    ) {
        return;
    }
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-examples/python/device.py");
    let mut program = Command::new("python3");
    program.arg(script);
    check_example("device.py", program, "py-01").await;
}
