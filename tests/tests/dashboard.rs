//! The operator dashboard in a real browser: headless Chromium driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`) against a real `tellus serve`, with a device
//! on the device SDK that reports a metric every 500 ms and answers commands.
//!
//! The test signs in with the admin token, finds the device in the fleet, opens it, waits
//! until its chart grows from live telemetry, checks that a shorter range shows what the API
//! has for it, sends a command through the form and waits until the page shows it
//! succeeded. A tag and the command's output hold markup, which the pages must show as text.
//! Screenshots of each step, and of the device page at a phone's size and a wide screen's,
//! are saved under `target/test-artifacts/dashboard/`, with chromedriver's log; when the
//! test fails, a screenshot and the page's source as they were then (`failure.png`,
//! `failure.html`).

use std::{
    net::TcpListener,
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use fantoccini::{elements::Element, Client, ClientBuilder, Locator};
use futures::FutureExt;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use tellus_device::{Device, Reading};
use tellus_tests::{require_tool, Tellus};

/// How long the test waits for anything the page should come to show.
const DEADLINE: Duration = Duration::from_secs(60);
const DEVICE: &str = "dash-01";
/// The readings of history: one every [`HISTORY_EVERY_MS`] from [`HISTORY_SPAN_MS`] ago, half
/// an hour, so that the last 15 minutes hold about half of them.
const HISTORY: u32 = 90;
const HISTORY_EVERY_MS: i64 = 20_000;
const HISTORY_SPAN_MS: i64 = 1_800_000;
/// A metric whose name holds a comma; it sorts after the others, so the device page's
/// default charts stay humidity and temperature.
const COMMA_METRIC: &str = "zone,1";
/// Markup in a tag and in a command's output: the pages must show it as text.
const MARKUP: &str = "<img src=x onerror=alert(1)>";
/// What a failure leaves in the artifacts.
const FAILURE_SHOT: &str = "failure.png";
const FAILURE_PAGE: &str = "failure.html";

/// The `i`th reading of the device: a temperature and a humidity.
fn reading(i: u32, at: Reading) -> Reading {
    at.with("temperature", 21.0 + (f64::from(i) / 8.0).sin() * 1.5)
        .with("humidity", 40 + i64::from(i % 7))
}

/// The device's live readings, one every 500 ms until stopped.
struct Reporter {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Reporter {
    fn start(device: Arc<Device>) -> Reporter {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut sent = 0;
            for i in HISTORY.. {
                if *stopped.borrow() || device.send(reading(i, Reading::now())).await.is_err() {
                    break;
                }
                sent += 1;
                tokio::select! {
                    _ = stopped.changed() => break,
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
            sent
        });
        Reporter { stop, task }
    }

    /// Stops it; returns how many readings it sent.
    async fn stop(self) -> u64 {
        let _ = self.stop.send(true);
        self.task.await.expect("the reporter")
    }
}

/// Saves a screenshot and the page's source, as they are; whatever cannot be saved is said.
async fn save_evidence(browser: &Client, dir: &Path) {
    match browser.screenshot().await {
        Ok(png) => {
            let path = dir.join(FAILURE_SHOT);
            match std::fs::write(&path, png) {
                Ok(()) => eprintln!("failure screenshot: {}", path.display()),
                Err(e) => eprintln!("cannot write {}: {e}", path.display()),
            }
        }
        Err(e) => eprintln!("no failure screenshot: {e}"),
    }
    match browser.source().await {
        Ok(html) => {
            let path = dir.join(FAILURE_PAGE);
            match std::fs::write(&path, html) {
                Ok(()) => eprintln!("failure page source: {}", path.display()),
                Err(e) => eprintln!("cannot write {}: {e}", path.display()),
            }
        }
        Err(e) => eprintln!("no failure page source: {e}"),
    }
}

/// A chromedriver process on an ephemeral port, killed when dropped.
struct Chromedriver {
    child: Child,
    port: u16,
}

impl Chromedriver {
    /// Starts chromedriver, logging to `chromedriver.log` in `dir`, and waits until it is
    /// ready.
    async fn start(dir: &Path) -> Chromedriver {
        // A port the system has just handed out and taken back: free unless another process
        // takes it in the moment before chromedriver binds it.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("an ephemeral port")
            .port();
        let log = dir.join("chromedriver.log");
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let mut driver = Chromedriver { child, port };
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
            if let Some(exit) = driver.child.try_wait().expect("chromedriver's status") {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = said.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                panic!(
                    "chromedriver exited ({exit}) before it was ready; its log, {}, {}",
                    log.display(),
                    if tail.is_empty() {
                        "is empty".to_owned()
                    } else {
                        format!("ends:\n{tail}")
                    }
                );
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver never became ready; see {}",
                log.display()
            );
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

/// What a chart says it shows: `data-points` in the window from `data-from`, planned for
/// `data-max-points`, in buckets of `data-step` (empty for raw points), and the note above
/// the charts.
#[derive(Debug)]
struct ChartState {
    points: u64,
    from: i64,
    max_points: u64,
    step: String,
    note: String,
}

/// The state of the chart of `metric`, read at one moment; `None` while it is not shown.
async fn chart_state(browser: &Client, metric: &str) -> Option<ChartState> {
    let read = browser
        .execute(
            "const chart = [...document.querySelectorAll('figure.chart')]
                 .find((c) => c.dataset.metric === arguments[0]);
             if (!chart) return null;
             const d = chart.dataset;
             return { points: d.points, from: d.from, maxPoints: d.maxPoints, step: d.step,
                      note: document.getElementById('chart-note')?.textContent ?? '' };",
            vec![json!(metric)],
        )
        .await
        .ok()?;
    let text = |key: &str| read[key].as_str().map(str::to_owned);
    Some(ChartState {
        points: text("points")?.parse().ok()?,
        from: text("from")?.parse().ok()?,
        max_points: text("maxPoints")?.parse().ok()?,
        step: text("step")?,
        note: text("note")?,
    })
}

/// Asserts that the page holds no element made from [`MARKUP`]: the only image is the
/// header's icon.
async fn assert_no_injected_markup(browser: &Client) {
    let images = browser
        .execute(
            "return [...document.images].map((i) => i.getAttribute('src'))",
            vec![],
        )
        .await
        .expect("the page's images");
    assert_eq!(images, json!(["/assets/icon.svg"]), "images on the page");
    let handlers = browser
        .execute(
            "return document.querySelectorAll('main [onerror], main img').length",
            vec![],
        )
        .await
        .expect("elements with handlers");
    assert_eq!(handlers, json!(0), "markup from the API became elements");
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

/// What the desired state's editor holds.
async fn desired_text(browser: &Client) -> String {
    let editor = wait_for(browser, "#desired").await;
    editor
        .prop("value")
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
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
    let shots = artifacts();
    for stale in [FAILURE_SHOT, FAILURE_PAGE] {
        let _ = std::fs::remove_file(shots.join(stale));
    }
    let dir = tempfile::tempdir().unwrap();
    let tellus = Tellus::start_in(dir.path(), None);
    let creds = tellus.create_device(DEVICE).await;
    let (status, body) = tellus
        .patch(
            &format!("/api/v1/devices/{DEVICE}"),
            json!({"tags": {"site": "lab", "floor": "2", "note": MARKUP}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // The device: half an hour of history, then a temperature every 500 ms, and a `reboot`
    // command it answers (with markup in its output).
    let device = Device::builder(creds, "127.0.0.1", tellus.mqtt_addr.port())
        .on_command("reboot", |cmd| async move {
            Ok(json!({"rebooted": true, "delay_s": cmd.params["delay_s"], "note": MARKUP}))
        })
        .start()
        .unwrap();
    let device = Arc::new(device);
    let now = tellus_core::now_ms();
    let history_from = now - HISTORY_SPAN_MS;
    let history = (0..HISTORY)
        .map(|i| {
            reading(
                i,
                Reading::at(history_from + i64::from(i) * HISTORY_EVERY_MS),
            )
        })
        .collect();
    device.send_all(history).await.unwrap();
    let reporter = Reporter::start(device.clone());
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

    let chromedriver = Chromedriver::start(&shots).await;
    let browser = chromedriver.browser().await;
    eprintln!("dashboard screenshots go to {}", shots.display());
    let walk = Walk {
        browser: &browser,
        tellus: &tellus,
        device: &device,
        shots: &shots,
        rule: &rule,
        history_from,
    };
    // On any failure, what the browser showed is kept before the failure goes on.
    if let Err(panic) = AssertUnwindSafe(walk.run(reporter)).catch_unwind().await {
        save_evidence(&browser, &shots).await;
        let _ = browser.close().await;
        std::panic::resume_unwind(panic);
    }
    browser.close().await.unwrap();
    println!("dashboard screenshots: {}", shots.display());
}

/// What the test walks through in the browser, with what it needs.
struct Walk<'a> {
    browser: &'a Client,
    tellus: &'a Tellus,
    device: &'a Device,
    shots: &'a Path,
    rule: &'a str,
    /// The time of the first reading of the history.
    history_from: i64,
}

impl Walk<'_> {
    async fn run(self, reporter: Reporter) {
        let Walk {
            browser,
            tellus,
            device,
            shots,
            rule,
            history_from,
        } = self;
        browser.set_window_size(1280, 900).await.unwrap();

        // Sign in: a wrong token is refused with a message, the admin token is accepted.
        browser.goto(&tellus.url("/")).await.unwrap();
        sign_in(browser, "not-a-token").await;
        let refused = wait_for(browser, "form.signin .notice.error:not([hidden])").await;
        assert_eq!(refused.text().await.unwrap(), "That token is not valid.");
        sign_in(browser, &tellus.token).await;

        // The fleet: the device, online, with its tags; the one holding markup shows it as
        // text.
        let row = format!("#devices tr[data-device=\"{DEVICE}\"]");
        wait_for(browser, &format!("{row} .badge.ok")).await;
        let text = browser
            .find(Locator::Css(&row))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.contains("site:lab"), "{text}");
        assert!(text.contains(&format!("note:{MARKUP}")), "{text}");
        assert_no_injected_markup(browser).await;
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
        screenshot(browser, shots, "fleet").await;

        // A link with a malformed escape leads to the fleet, not to a blank page.
        browser
            .goto(&tellus.url("/#/devices/%E0%A4%A"))
            .await
            .unwrap();
        until(
            "the fleet instead of a malformed link",
            async || browser.execute("return location.hash", vec![]).await.ok(),
            |hash| hash.as_ref().is_some_and(|h| h == "#/"),
        )
        .await;
        wait_for(browser, &format!("{row} .badge.ok")).await;

        // A tag filter that the device does not match leaves it out.
        browser
            .goto(&tellus.url("/#/?tag=site:elsewhere"))
            .await
            .unwrap();
        wait_for(browser, "#devices td.empty").await;
        browser.goto(&tellus.url("/#/?q=dash")).await.unwrap();

        // The device page: its tags as text, and its chart, over the last hour (all the
        // history), growing from the live stream.
        click(browser, &format!("{row} a")).await;
        wait_for(browser, ".live-state[data-state=\"live\"]").await;
        let headline = wait_for(browser, ".device-meta a.chip[href*=\"note\"]").await;
        assert_eq!(headline.text().await.unwrap(), format!("note:{MARKUP}"));
        assert_no_injected_markup(browser).await;
        let first = until(
            "the temperature chart",
            async || chart_points(browser, "temperature").await,
            |n| *n >= u64::from(HISTORY),
        )
        .await;
        until(
            "live points on the chart",
            async || chart_points(browser, "temperature").await,
            |n| *n >= first + 3,
        )
        .await;

        // The range picker. With the device quiet and everything it sent stored, no live
        // point can come: the chart over the last 15 minutes holds exactly what the API has
        // in the window the chart says it shows, which is less than all that was sent.
        let sent = u64::from(HISTORY) + reporter.stop().await;
        let all = format!(
            "/api/v1/devices/{DEVICE}/telemetry?metric=temperature&agg=none&from={history_from}"
        );
        tellus
            .get_until(&all, |b| {
                b["points"].as_array().map_or(0, Vec::len) as u64 == sent
            })
            .await;
        click(browser, "label[for=\"range-15m\"]").await;
        let shown = until(
            "the chart over the last 15 minutes",
            async || chart_state(browser, "temperature").await,
            |c| {
                c.as_ref()
                    .is_some_and(|c| c.note.starts_with("Last 15 min;"))
            },
        )
        .await
        .unwrap();
        let (status, answer) = tellus
            .get(&format!(
                "/api/v1/devices/{DEVICE}/telemetry?metric=temperature&from={}&to={}&max_points={}",
                shown.from,
                tellus_core::now_ms(),
                shown.max_points
            ))
            .await;
        assert_eq!(status, 200, "{answer}");
        assert!(answer.get("step").is_none(), "raw points: {answer}");
        assert_eq!(shown.step, "", "the chart holds raw points: {shown:?}");
        let in_window = answer["points"].as_array().unwrap().len() as u64;
        assert_eq!(shown.points, in_window, "{shown:?}");
        assert!(
            in_window >= 30 && in_window < sent,
            "15 minutes hold some of the {sent} readings, not {in_window}"
        );
        screenshot(browser, shots, "device").await;

        // A metric whose name holds a comma (which `metrics=` would split) is charted too.
        device
            .send(Reading::now().with(COMMA_METRIC, 7.5))
            .await
            .unwrap();
        click(browser, &format!("label[for=\"metric-{COMMA_METRIC}\"]")).await;
        until(
            "the chart of a metric with a comma",
            async || chart_points(browser, COMMA_METRIC).await,
            |n| *n >= 1,
        )
        .await;

        // A command through the form, followed until the device has answered.
        fill(browser, "#command-name", "reboot").await;
        fill(browser, "#command-params", r#"{"delay_s": 3}"#).await;
        fill(browser, "#command-timeout", "30s").await;
        click(browser, "#command-send").await;
        let done = wait_for(
            browser,
            "#command-history tr[data-name=\"reboot\"][data-status=\"succeeded\"]",
        )
        .await;
        let text = done.text().await.unwrap();
        assert!(text.contains("\"rebooted\":true"), "{text}");
        assert!(text.contains(MARKUP), "{text}");
        assert_no_injected_markup(browser).await;
        screenshot(browser, shots, "command").await;

        // The desired state: an edit that someone else's change overtakes is not saved over
        // it. The text being edited stays, the page says the state changed, saving is
        // refused with the API's reason, and discarding the edit shows the other change.
        let state = format!("/api/v1/devices/{DEVICE}/state");
        fill(browser, "#desired", r#"{"mode": "eco"}"#).await;
        let (status, body) = tellus
            .patch(&state, json!({"desired": {"mode": "boost"}}))
            .await;
        assert_eq!(status, 200, "{body}");
        let stale = wait_for(browser, "#desired-stale:not([hidden])").await;
        let said = stale.text().await.unwrap();
        assert!(said.contains("changed since you started editing"), "{said}");
        assert_eq!(desired_text(browser).await, r#"{"mode": "eco"}"#);
        click(browser, "#desired-save").await;
        let refused = wait_for(browser, "#state-panel .notice.error:not([hidden])").await;
        let said = refused.text().await.unwrap();
        assert!(said.contains("version"), "{said}");
        let (_, now) = tellus.get(&state).await;
        assert_eq!(now["desired"], json!({"mode": "boost"}), "{now}");
        screenshot(browser, shots, "state-conflict").await;
        click(browser, "#desired-reload").await;
        until(
            "the other change in the editor",
            async || desired_text(browser).await,
            |text| text.contains("boost"),
        )
        .await;
        // An edit from the current state is saved.
        fill(browser, "#desired", r#"{"mode": "eco"}"#).await;
        click(browser, "#desired-save").await;
        tellus
            .get_until(&state, |b| b["desired"] == json!({"mode": "eco"}))
            .await;
        until(
            "the saved state in the editor",
            async || desired_text(browser).await,
            |text| text.contains("eco") && !text.contains("boost"),
        )
        .await;

        // Alerts: the rule's, acknowledged from the page.
        browser.goto(&tellus.url("/#/alerts")).await.unwrap();
        click(browser, "#open-alerts tr[data-status=\"active\"] button").await;
        wait_for(browser, "#open-alerts tr[data-status=\"acknowledged\"]").await;
        screenshot(browser, shots, "alerts").await;

        // Rules: a dry run of the rule over the device's last hour.
        browser.goto(&tellus.url("/#/rules")).await.unwrap();
        let card = format!("article.rule[data-rule-id=\"{rule}\"]");
        click(browser, &format!("{card} details summary")).await;
        fill(browser, &format!("#dry-device-{rule}"), DEVICE).await;
        click(browser, &format!("{card} form.dry-run button[type=submit]")).await;
        let summary = wait_for(browser, &format!("{card} .dry-summary"))
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
        assert!(firings >= u64::from(HISTORY), "{summary}");
        screenshot(browser, shots, "rules").await;

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
            async || chart_width(browser).await,
            |w| *w > 0.0 && *w < 390.0,
        )
        .await;
        screenshot(browser, shots, "device-phone").await;
        browser.set_window_size(1600, 1000).await.unwrap();
        until(
            "the chart redrawn for a wide screen",
            async || chart_width(browser).await,
            |w| *w > 600.0,
        )
        .await;
        screenshot(browser, shots, "device-wide").await;
        browser.goto(&tellus.url("/#/")).await.unwrap();
        wait_for(browser, &format!("{row} .badge.ok")).await;
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
        screenshot(browser, shots, "fleet-phone").await;

        // A viewer sees the page but cannot command.
        let (status, viewer) = tellus
            .post(
                "/api/v1/tokens",
                json!({"name": "night shift", "role": "viewer"}),
            )
            .await;
        assert_eq!(status, 201, "{viewer}");
        browser.set_window_size(1280, 900).await.unwrap();
        click(browser, "#signout").await;
        sign_in(browser, viewer["token"].as_str().unwrap()).await;
        wait_for(browser, "#identity[data-role=\"viewer\"]").await;
        browser
            .goto(&tellus.url(&format!("/#/devices/{DEVICE}")))
            .await
            .unwrap();
        wait_for(browser, "#command-readonly").await;
        let send = wait_for(browser, "#command-send").await;
        assert!(
            !send.is_enabled().await.unwrap(),
            "a viewer's form is disabled"
        );
    }
}
