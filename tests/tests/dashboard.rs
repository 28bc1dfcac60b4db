//! The operator dashboard in a real browser: headless Chromium driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`) against a real `tellus serve`, with a device
//! on the device SDK that reports a metric every 500 ms and answers commands.
//!
//! The test signs in with the admin token, finds the device in the fleet, opens it, waits
//! until its chart grows from live telemetry, sends a command through the form and waits
//! until the page shows it succeeded. Screenshots of each step, and of the device page at a
//! phone's size and a wide screen's, are saved under `target/test-artifacts/dashboard/`.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use fantoccini::{elements::Element, Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use tellus_device::{Device, Reading};
use tellus_tests::{require_tool, Tellus};

/// How long the test waits for anything the page should come to show.
const DEADLINE: Duration = Duration::from_secs(60);
const DEVICE: &str = "dash-01";

/// A chromedriver process on an ephemeral port, killed when dropped.
struct Chromedriver {
    child: Child,
    port: u16,
}

impl Chromedriver {
    async fn start() -> Chromedriver {
        // A port the system has just handed out and taken back: free unless another process
        // takes it in the moment before chromedriver binds it.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("an ephemeral port")
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let driver = Chromedriver { child, port };
        let status = format!("http://127.0.0.1:{port}/status");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(r) = http.get(&status).send().await {
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                if body["value"]["ready"] == true {
                    return driver;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn browser(&self) -> Client {
        let chromium = which("chromium");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new",
                    // Tests may run as root, where Chromium's sandbox cannot start.
                    "--no-sandbox",
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    "--window-size=1280,900",
                ],
            }),
        );
        ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a WebDriver session with headless Chromium")
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(tool: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .expect("sh");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `target/test-artifacts/dashboard/`, beside this build's profile directories.
fn artifacts() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the target directory")
        .to_owned();
    let dir = target.join("test-artifacts").join("dashboard");
    std::fs::create_dir_all(&dir).expect("create the screenshot directory");
    dir
}

async fn screenshot(browser: &Client, dir: &std::path::Path, name: &str) {
    let png = browser.screenshot().await.expect("a screenshot");
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, png).expect("write the screenshot");
    eprintln!("screenshot: {}", path.display());
}

async fn wait_for(browser: &Client, css: &str) -> Element {
    browser
        .wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("the page never showed {css}: {e}"))
}

/// Polls `read` until `done` holds for what it returns; panics with the last value after
/// [`DEADLINE`].
async fn until<T: std::fmt::Debug>(
    what: &str,
    mut read: impl AsyncFnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let value = read().await;
        if done(&value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never got there, last {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The `data-points` of the chart of `metric`, 0 while it is not shown.
async fn chart_points(browser: &Client, metric: &str) -> u64 {
    let css = format!("figure.chart[data-metric=\"{metric}\"]");
    match browser.find(Locator::Css(&css)).await {
        Ok(chart) => chart
            .attr("data-points")
            .await
            .ok()
            .flatten()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// The width the temperature chart was last drawn at (its SVG's `viewBox`), 0 if none.
async fn chart_width(browser: &Client) -> f64 {
    let css = "figure.chart[data-metric=\"temperature\"] svg";
    let Ok(svg) = browser.find(Locator::Css(css)).await else {
        return 0.0;
    };
    let view_box = svg.attr("viewBox").await.ok().flatten().unwrap_or_default();
    view_box
        .split_whitespace()
        .nth(2)
        .and_then(|w| w.parse().ok())
        .unwrap_or(0.0)
}

/// Waits for the element `css` and clicks it.
async fn click(browser: &Client, css: &str) {
    wait_for(browser, css)
        .await
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

/// Types `token` into the sign-in form and sends it.
async fn sign_in(browser: &Client, token: &str) {
    fill(browser, "#token", token).await;
    click(browser, "form.signin button[type=submit]").await;
}

async fn fill(browser: &Client, css: &str, text: &str) {
    let field = wait_for(browser, css).await;
    field.clear().await.expect("clear the field");
    field.send_keys(text).await.expect("type into the field");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_a_device_live_and_commands_it() {
    if !(require_tool("chromium") && require_tool("chromedriver")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tellus = Tellus::start_in(dir.path(), None);
    let creds = tellus.create_device(DEVICE).await;
    let (status, body) = tellus
        .patch(
            &format!("/api/v1/devices/{DEVICE}"),
            json!({"tags": {"site": "lab", "floor": "2"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // The device: a quarter of an hour of history, then a temperature every 500 ms, and a
    // `reboot` command it answers.
    let device = Device::builder(creds, "127.0.0.1", tellus.mqtt_addr.port())
        .on_command("reboot", |cmd| async move {
            Ok(json!({"rebooted": true, "delay_s": cmd.params["delay_s"]}))
        })
        .start()
        .unwrap();
    let device = Arc::new(device);
    let reading = |i: u32, at: Reading| {
        at.with("temperature", 21.0 + (f64::from(i) / 8.0).sin() * 1.5)
            .with("humidity", 40 + i64::from(i % 7))
    };
    let now = tellus_core::now_ms();
    let history = (0..90u32)
        .map(|i| reading(i, Reading::at(now - 810_000 + i64::from(i) * 9_000)))
        .collect();
    device.send_all(history).await.unwrap();
    let reporter = {
        let device = device.clone();
        tokio::spawn(async move {
            for i in 90u32.. {
                if device.send(reading(i, Reading::now())).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    tellus
        .get_until(&format!("/api/v1/devices/{DEVICE}/latest"), |b| {
            b["metrics"]["temperature"].is_object()
        })
        .await;
    // A rule whose alert stays up (every humidity reported is at least 40).
    let (status, rule) = tellus
        .post(
            "/api/v1/rules",
            json!({"name": "humid", "trigger": "telemetry", "condition": "metrics.humidity >= 40",
                   "actions": [{"type": "alert", "severity": "warning"}]}),
        )
        .await;
    assert_eq!(status, 201, "{rule}");
    let rule = rule["id"].as_str().unwrap().to_owned();

    let chromedriver = Chromedriver::start().await;
    let browser = chromedriver.browser().await;
    let shots = artifacts();
    eprintln!("dashboard screenshots go to {}", shots.display());
    browser.set_window_size(1280, 900).await.unwrap();

    // Sign in: a wrong token is refused with a message, the admin token is accepted.
    browser.goto(&tellus.url("/")).await.unwrap();
    sign_in(&browser, "not-a-token").await;
    let refused = wait_for(&browser, "form.signin .notice.error:not([hidden])").await;
    assert_eq!(refused.text().await.unwrap(), "That token is not valid.");
    sign_in(&browser, &tellus.token).await;

    // The fleet: the device, online, with its tags.
    let row = format!("#devices tr[data-device=\"{DEVICE}\"]");
    wait_for(&browser, &format!("{row} .badge.ok")).await;
    let text = browser
        .find(Locator::Css(&row))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("site:lab"), "{text}");
    let counts = until(
        "the fleet's counts",
        async || {
            let online = browser.find(Locator::Css("#count-online")).await;
            match online {
                Ok(e) => e.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            }
        },
        |n| n == "1",
    )
    .await;
    assert_eq!(counts, "1");
    screenshot(&browser, &shots, "fleet").await;

    // A tag filter that the device does not match leaves it out.
    browser
        .goto(&tellus.url("/#/?tag=site:elsewhere"))
        .await
        .unwrap();
    wait_for(&browser, "#devices td.empty").await;
    browser.goto(&tellus.url("/#/?q=dash")).await.unwrap();

    // The device page: its chart, over the last 15 minutes, grows from the live stream.
    click(&browser, &format!("{row} a")).await;
    wait_for(&browser, ".live-state[data-state=\"live\"]").await;
    click(&browser, "label[for=\"range-15m\"]").await;
    let first = until(
        "the temperature chart",
        async || chart_points(&browser, "temperature").await,
        |n| *n >= 80,
    )
    .await;
    until(
        "live points on the chart",
        async || chart_points(&browser, "temperature").await,
        |n| *n >= first + 3,
    )
    .await;
    screenshot(&browser, &shots, "device").await;

    // A command through the form, followed until the device has answered.
    fill(&browser, "#command-name", "reboot").await;
    fill(&browser, "#command-params", r#"{"delay_s": 3}"#).await;
    fill(&browser, "#command-timeout", "30s").await;
    click(&browser, "#command-send").await;
    let done = wait_for(
        &browser,
        "#command-history tr[data-name=\"reboot\"][data-status=\"succeeded\"]",
    )
    .await;
    let text = done.text().await.unwrap();
    assert!(text.contains("\"rebooted\":true"), "{text}");
    screenshot(&browser, &shots, "command").await;

    // Alerts: the rule's, acknowledged from the page.
    browser.goto(&tellus.url("/#/alerts")).await.unwrap();
    click(&browser, "#open-alerts tr[data-status=\"active\"] button").await;
    wait_for(&browser, "#open-alerts tr[data-status=\"acknowledged\"]").await;
    screenshot(&browser, &shots, "alerts").await;

    // Rules: a dry run of the rule over the device's last hour.
    browser.goto(&tellus.url("/#/rules")).await.unwrap();
    let card = format!("article.rule[data-rule-id=\"{rule}\"]");
    click(&browser, &format!("{card} details summary")).await;
    fill(&browser, &format!("#dry-device-{rule}"), DEVICE).await;
    click(
        &browser,
        &format!("{card} form.dry-run button[type=submit]"),
    )
    .await;
    let summary = wait_for(&browser, &format!("{card} .dry-summary"))
        .await
        .text()
        .await
        .unwrap();
    // Every stored reading holds the condition, and each fires (the alert once).
    let firings: u64 = summary
        .split(", ")
        .nth(1)
        .and_then(|f| f.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no firings in {summary:?}"));
    assert!(firings >= 90, "{summary}");
    screenshot(&browser, &shots, "rules").await;

    // The same device page on a phone and on a wide screen, from its top.
    browser
        .goto(&tellus.url(&format!("/#/devices/{DEVICE}")))
        .await
        .unwrap();
    browser
        .execute("window.scrollTo(0, 0)", vec![])
        .await
        .unwrap();
    browser.set_window_size(390, 844).await.unwrap();
    until(
        "the chart redrawn for a phone",
        async || chart_width(&browser).await,
        |w| *w > 0.0 && *w < 390.0,
    )
    .await;
    screenshot(&browser, &shots, "device-phone").await;
    browser.set_window_size(1600, 1000).await.unwrap();
    until(
        "the chart redrawn for a wide screen",
        async || chart_width(&browser).await,
        |w| *w > 600.0,
    )
    .await;
    screenshot(&browser, &shots, "device-wide").await;
    browser.goto(&tellus.url("/#/")).await.unwrap();
    wait_for(&browser, &format!("{row} .badge.ok")).await;
    browser.set_window_size(390, 844).await.unwrap();
    until(
        "the fleet laid out for a phone",
        async || {
            browser
                .execute("return window.innerWidth", vec![])
                .await
                .ok()
        },
        |w| {
            w.as_ref()
                .and_then(|w| w.as_f64())
                .is_some_and(|w| w < 400.0)
        },
    )
    .await;
    screenshot(&browser, &shots, "fleet-phone").await;

    // A viewer sees the page but cannot command.
    let (status, viewer) = tellus
        .post(
            "/api/v1/tokens",
            json!({"name": "night shift", "role": "viewer"}),
        )
        .await;
    assert_eq!(status, 201, "{viewer}");
    browser.set_window_size(1280, 900).await.unwrap();
    click(&browser, "#signout").await;
    sign_in(&browser, viewer["token"].as_str().unwrap()).await;
    wait_for(&browser, "#identity[data-role=\"viewer\"]").await;
    browser
        .goto(&tellus.url(&format!("/#/devices/{DEVICE}")))
        .await
        .unwrap();
    wait_for(&browser, "#command-readonly").await;
    let send = wait_for(&browser, "#command-send").await;
    assert!(
        !send.is_enabled().await.unwrap(),
        "a viewer's form is disabled"
    );

    browser.close().await.unwrap();
    reporter.abort();
    println!("dashboard screenshots: {}", shots.display());
}
