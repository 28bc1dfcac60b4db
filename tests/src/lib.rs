//! The end-to-end harness: starts a real `tellus serve` process in a temporary data
//! directory on ephemeral ports, and gives tests the HTTP API, device credentials and the
//! server's log.
//!
//! The binary is `target/<profile>/tellus`, built on first use ([`tellus_bin`]);
//! `TELLUS_BIN` overrides it.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub mod certs;
pub mod mqtt;
pub mod questdb;
pub mod raw;
pub mod victoria;
pub mod webhook;

use serde_json::{json, Value};
use tellus_device::Credentials;

/// How long [`Tellus::get_until`] waits for what it waits for.
pub const EVENTUALLY: Duration = Duration::from_secs(20);

/// How long a test waits for Tellus to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The `tellus` binary under test: `TELLUS_BIN`, or the one in this build's target
/// directory, which is brought up to date once per test process (`cargo test` builds only
/// the test targets of the tests crate, not other packages' binaries).
pub fn tellus_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("TELLUS_BIN") {
        return bin.into();
    }
    workspace_bin("tellus", "tellus")
}

/// The binary `bin` of the workspace's package `package`, in this build's target directory,
/// brought up to date once per test process.
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = built.iter().find(|(name, _)| name == bin) {
        return path.clone();
    }
    // Test executables live in target/<profile>/deps; the binaries in target/<profile>.
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile> directory")
        .to_owned();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args(["build", "--quiet", "-p", package, "--bin", bin])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"));
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build");
    assert!(
        status.success(),
        "cargo build -p {package} --bin {bin} failed"
    );
    let path = profile_dir.join(bin);
    assert!(path.exists(), "{} was not built", path.display());
    built.push((bin.to_owned(), path.clone()));
    path
}

/// A running `tellus serve`. Killed when dropped; [`Tellus::stop`] stops it gracefully.
pub struct Tellus {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub mqtt_addr: SocketAddr,
    pub http_addr: SocketAddr,
    log: Arc<Mutex<String>>,
    /// The HTTP API, with the admin token ([`Api::token`]).
    api: Api,
}

impl Tellus {
    /// Starts Tellus in `data_dir` with an optional TOML configuration.
    pub fn start_in(data_dir: &Path, config_toml: Option<&str>) -> Tellus {
        Tellus::start_on(data_dir, config_toml, "127.0.0.1:0")
    }

    /// Like [`Tellus::start_in`], with MQTT on `mqtt_addr` (for devices that were told where
    /// Tellus would be before it started).
    pub fn start_on(data_dir: &Path, config_toml: Option<&str>, mqtt_addr: &str) -> Tellus {
        let mut cmd = Command::new(tellus_bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--mqtt-addr", mqtt_addr, "--http-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "info,rumqttd=off,rustls=error")
            .stdin(Stdio::null());
        // One pipe for stdout and stderr keeps the process's own order of lines: by the time
        // the listener lines are read, everything printed before them has been read too.
        let (output, writer) = std::io::pipe().expect("pipe");
        cmd.stdout(writer.try_clone().expect("pipe")).stderr(writer);
        if let Some(toml) = config_toml {
            std::fs::create_dir_all(data_dir).unwrap();
            let path = data_dir.join("test-config.toml");
            std::fs::write(&path, toml).unwrap();
            cmd.arg("--config").arg(path);
        }
        let child = cmd.spawn().expect("start tellus");
        // Drop the parent's copies of the write end (held by `cmd`) so the reader sees EOF.
        drop(cmd);
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(output).lines().map_while(Result::ok) {
                    eprintln!("[tellus] {line}");
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                    let _ = tx.send(line);
                }
            });
        }
        let (mut mqtt, mut http) = (None, None);
        let deadline = Instant::now() + START_TIMEOUT;
        while mqtt.is_none() || http.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("tellus did not start listening in time"));
            if let Some(addr) = listener_addr(&line, "mqtt") {
                mqtt = Some(addr);
            }
            if let Some(addr) = listener_addr(&line, "http") {
                http = Some(addr);
            }
        }
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .expect("admin.token")
            .trim()
            .to_owned();
        Tellus {
            child: Some(child),
            data_dir: data_dir.to_owned(),
            mqtt_addr: mqtt.unwrap(),
            http_addr: http.unwrap(),
            log,
            api: Api::new(http.unwrap(), token),
        }
    }

    /// Everything Tellus has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until one line of the log contains every one of `needles`.
    pub async fn wait_for_log_line(&self, needles: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self
            .log()
            .lines()
            .any(|line| needles.iter().all(|n| line.contains(n)))
        {
            assert!(
                Instant::now() < deadline,
                "no log line contained all of {needles:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Options for a device connection to this Tellus.
    pub fn mqtt_options(&self, creds: &Credentials) -> rumqttc::MqttOptions {
        tellus_device::mqtt_options(creds, "127.0.0.1", self.mqtt_addr.port()).unwrap()
    }

    /// Options for an MQTT 5 device connection to this Tellus.
    pub fn mqtt5_options(&self, creds: &Credentials) -> rumqttc::v5::MqttOptions {
        tellus_device::mqtt5_options(creds, "127.0.0.1", self.mqtt_addr.port()).unwrap()
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn stop(self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM)
    }

    /// Sends SIGKILL and waits for the process to die.
    pub fn kill(self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGKILL)
    }

    fn signal(mut self, signal: nix::sys::signal::Signal) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        signal_and_wait(&mut child, signal)
    }
}

/// Sends `signal` to `child` and waits (at most a minute) for it to end.
pub fn signal_and_wait(child: &mut Child, signal: nix::sys::signal::Signal) -> ExitStatus {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the process did not end after {signal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Tellus's HTTP API at `addr`, with a token: what tests ask it through. A [`Tellus`]
/// derefs to its own.
pub struct Api {
    pub addr: SocketAddr,
    /// The admin token.
    pub token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(addr: SocketAddr, token: String) -> Api {
        Api {
            addr,
            token,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// GET with the admin token; returns the status and the JSON body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::GET, path, None).await
    }

    /// A request with the admin token (and a JSON body, if given); the status and the JSON
    /// body of the answer (`null` if it has none).
    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.request_as(&self.token, method, path, body).await
    }

    /// A request with `token` (and a JSON body, if given); the status and the JSON body of
    /// the answer (`null` if it has none).
    pub async fn request_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, self.url(path)).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let r = request.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POST JSON with the admin token; returns the status and the JSON body.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    /// PUT JSON with the admin token; returns the status and the JSON body.
    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::PUT, path, Some(body)).await
    }

    /// PATCH JSON with the admin token; returns the status and the JSON body.
    pub async fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::PATCH, path, Some(body)).await
    }

    /// GETs `path` (expecting 200) until `done` holds for the JSON body, for at most
    /// [`EVENTUALLY`]; returns that body, or panics with the last one.
    pub async fn get_until(&self, path: &str, done: impl Fn(&Value) -> bool) -> Value {
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
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// DELETE with the admin token; returns the status and the JSON body.
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::DELETE, path, None).await
    }

    /// Registers a device through the API and returns its credentials.
    pub async fn create_device(&self, id: &str) -> Credentials {
        let (status, body) = self.post("/api/v1/devices", json!({ "id": id })).await;
        assert_eq!(status, 201, "{body}");
        Credentials {
            id: id.parse().unwrap(),
            cert_pem: body["cert_pem"].as_str().unwrap().to_owned(),
            key_pem: body["key_pem"].as_str().unwrap().to_owned(),
            ca_pem: body["ca_pem"].as_str().unwrap().to_owned(),
        }
    }
}

impl std::ops::Deref for Tellus {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Drop for Tellus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Parses `listener="NAME" addr=IP:PORT` from a log line.
fn listener_addr(line: &str, name: &str) -> Option<SocketAddr> {
    if !line.contains(&format!("listener=\"{name}\"")) {
        return None;
    }
    let rest = &line[line.find(" addr=")? + 6..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Whether an external tool is on PATH. Without it, a test may skip only outside CI, and
/// says so loudly; in CI (`CI` set) a missing tool fails the test.
pub fn require_tool(tool: &str) -> bool {
    let mut probe = Command::new("sh");
    probe.args(["-c", &format!("command -v {tool}")]);
    require(
        &format!("{tool} is installed"),
        probe,
        &format!("install {tool}"),
    )
}

/// Whether `probe` succeeds, for something a test needs (`what`, which `hint` says how to
/// get). Without it, a test may skip only outside CI, and says so loudly; in CI (`CI` set)
/// it fails the test.
pub fn require(what: &str, mut probe: Command, hint: &str) -> bool {
    let found = probe
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "required in CI but not so: {what} ({hint})"
        );
        // Straight to the process's stderr: the test harness captures `eprintln!`, and a
        // skip must show even when the test passes.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr().lock(),
            "\n*** SKIPPED: not so: {what} ({hint}) ***\n"
        );
    }
    found
}

/// Raises this process's soft limit of open files to `want` (at most the hard limit); a
/// `tellus` started afterwards inherits it.
pub fn raise_open_files(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard).unwrap();
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        soft >= want,
        "open-file limit is {soft} (hard {hard}); this test needs {want}"
    );
}

/// A device time for test data: an hour ago, to the minute, the same for the whole test
/// process. Data must be recent to be kept raw: the store keeps raw points for 30 days (by
/// their time), and older ones only in its rollups.
pub fn recent_base() -> i64 {
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| {
        let now = tellus_core::now_ms();
        (now - 3_600_000).div_euclid(60_000) * 60_000
    })
}
