//! The rules service: the [`Engine`] on a thread of its own, fed through
//! [`tellus_core::RuleFeed`], and the tasks that carry its effects out.
//!
//! ```text
//!  ingest (after commit) ──┐                       ┌─▶ commands, jobs (device service)
//!  device service ─────────┼─▶ feed ─▶ engine ─▶ effects ─▶ alerts (registry, live feed)
//!  (state, presence)       │  16,384,  thread     1,024 ├─▶ derived metrics (store)
//!  gate (events) ──────────┘  64 MiB   (CEL, JS)  waits ├─▶ publish (routing core)
//!                             waits                     │
//!                                                       └─▶ webhooks: 1,024, shed when full,
//!                                                            16 at once, retried
//! ```
//!
//! Both queues in front of the executor make their senders wait when full, so a reading is
//! never dropped between the store and its rules' actions: a slow registry slows ingest,
//! which slows devices. Webhooks are the exception: an endpoint that is slow or down must not
//! hold telemetry back, so a full webhook queue sheds the call, counted as a failed action
//! with the reason. Derived metrics are written straight to the store (and the live feed),
//! not through ingest: they are not evaluated by rules, so no rule can feed itself.
//!
//! The engine reloads its rules when told ([`Rules::reload`], after each change through the
//! API, which waits for it) and whenever the registry's rule generation moves (a change by
//! another process), checked every two seconds. Each input is evaluated at its own `at_ms`
//! (when Tellus learnt of it), so time spent queued does not stretch a `for`.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tellus_broker::{
    devices::{
        jobs::{NewJob, Selector},
        Devices,
    },
    routing::Publisher,
};
use tellus_core::{
    now_ms, registry::Registry, Alert, DeviceId, Live, LiveEvent, Raise, RuleFeed, RuleInputs,
    Sample, Trigger,
};
use tellus_ingest::{store::Batch, TelemetryStore};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::engine::{
    Compiled, Directory, Effect, Engine, Figures, Firing, RuleFigures, Tags, Target,
};

/// Sizes and limits of the service.
#[derive(Debug, Clone)]
pub struct RulesConfig {
    /// Firings waiting for the executor before the engine waits.
    pub effects_queue: usize,
    /// Webhook calls waiting to be made before new ones are shed.
    pub webhook_queue: usize,
    /// Webhook calls made at once.
    pub webhook_concurrency: usize,
    /// How long a device's tags are trusted before they are read again.
    pub tags_ttl: Duration,
    /// Commands a rule's fleet command creates per second.
    pub job_rate: f64,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            effects_queue: 1_024,
            webhook_queue: 1_024,
            webhook_concurrency: 16,
            tags_ttl: Duration::from_secs(10),
            job_rate: 100.0,
        }
    }
}

/// Where effects go.
#[derive(Clone)]
pub struct Outlets {
    pub registry: Arc<dyn Registry>,
    pub devices: Arc<Devices>,
    pub publisher: Publisher,
    pub store: Arc<dyn TelemetryStore>,
    pub live: Live,
}

/// The handle the API holds. Cheap to clone.
#[derive(Clone)]
pub struct Rules {
    figures: Arc<Figures>,
    reload: Arc<Reload>,
    /// How many reload requests the engine has carried out.
    loaded: watch::Receiver<u64>,
}

/// Reload requests: a count, so that a caller can wait for its own to be carried out.
#[derive(Default)]
struct Reload {
    requested: AtomicU64,
    notify: Notify,
}

/// How long [`Rules::reload`] waits for the engine.
const RELOAD_WAIT: Duration = Duration::from_secs(5);

impl Rules {
    /// A handle to no engine: reloads go nowhere and figures stay at zero (for parts of
    /// Tellus run without one, such as the API's own tests).
    pub fn detached() -> Rules {
        Rules {
            figures: Arc::default(),
            reload: Arc::default(),
            loaded: watch::channel(0).1,
        }
    }

    /// Has the engine read its rules again, and waits until it has (at most 5 s, then it
    /// happens later): once this returns, a change made before it is in effect.
    pub async fn reload(&self) {
        let n = self.reload.requested.fetch_add(1, Ordering::AcqRel) + 1;
        self.reload.notify.notify_one();
        let mut loaded = self.loaded.clone();
        if tokio::time::timeout(RELOAD_WAIT, loaded.wait_for(|&done| done >= n))
            .await
            .is_err()
        {
            warn!("the rules engine did not reload within 5 s; the change applies when it does");
        }
    }

    pub fn figures(&self) -> &Arc<Figures> {
        &self.figures
    }
}

/// The running service; [`Running::finished`] waits for it to stop, which it does once its
/// `stop` is cancelled (or every feed sender is gone), the inputs queued are evaluated and
/// the last effects carried out.
pub struct Running {
    engine: std::thread::JoinHandle<()>,
    executor: tokio::task::JoinHandle<()>,
}

impl Running {
    pub async fn finished(self) {
        let engine = self.engine;
        if !matches!(
            tokio::task::spawn_blocking(move || engine.join()).await,
            Ok(Ok(()))
        ) {
            error!("rules engine thread panicked");
        }
        if self.executor.await.is_err() {
            error!("rules executor panicked");
        }
    }
}

/// Starts the engine thread and the executor (on the current tokio runtime). `feed` is the
/// feed whose receiving end is `inputs`; the engine keeps only its switches. Once `stop` is
/// cancelled the feed closes, and the engine evaluates what it holds and stops.
pub fn start(
    config: RulesConfig,
    outlets: Outlets,
    feed: RuleFeed,
    inputs: RuleInputs,
    stop: CancellationToken,
) -> std::io::Result<(Rules, Running)> {
    let figures = Arc::new(Figures::default());
    let reload = Arc::new(Reload::default());
    let (loaded_tx, loaded) = watch::channel(0);
    let (effects_tx, effects_rx) = mpsc::channel(config.effects_queue.max(1));
    let engine = {
        let registry = outlets.registry.clone();
        let switches = feed.switches();
        let figures = figures.clone();
        let reload = reload.clone();
        let ttl = config.tags_ttl;
        let task = EngineTask {
            registry,
            switches,
            figures,
            reload,
            loaded: loaded_tx,
            inputs,
            effects: effects_tx,
            tags_ttl: ttl,
            stop,
        };
        std::thread::Builder::new()
            .name("rules".into())
            .stack_size(crate::expr::STACK_BYTES)
            .spawn(move || task.run())?
    };
    let executor = tokio::spawn(execute(config, outlets, figures.clone(), effects_rx));
    Ok((
        Rules {
            figures,
            reload,
            loaded,
        },
        Running { engine, executor },
    ))
}

/// How often the engine asks the registry whether rules changed elsewhere.
const GENERATION_POLL: Duration = Duration::from_secs(2);
/// Open alerts the engine reads at start (to clear them when their condition ends).
const OPEN_ALERTS_AT_START: usize = 100_000;

/// What the engine's thread owns.
struct EngineTask {
    registry: Arc<dyn Registry>,
    switches: RuleFeed,
    figures: Arc<Figures>,
    reload: Arc<Reload>,
    loaded: watch::Sender<u64>,
    inputs: RuleInputs,
    effects: mpsc::Sender<Firing>,
    tags_ttl: Duration,
    stop: CancellationToken,
}

impl EngineTask {
    fn run(self) {
        let EngineTask {
            registry,
            switches,
            figures,
            reload,
            loaded,
            mut inputs,
            effects,
            tags_ttl,
            stop,
        } = self;
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "rules engine cannot start: no rules are evaluated");
                return;
            }
        };
        let mut engine = Engine::new(figures.clone());
        let mut directory = TagCache {
            registry: registry.clone(),
            entries: HashMap::new(),
            ttl: tags_ttl,
        };
        runtime.block_on(async {
            // Open alerts count as firing at start only: later, the engine's own state is
            // newer than the registry's (a clear may still be on its way there).
            let firing: Vec<(String, DeviceId)> = match registry.open_alerts(OPEN_ALERTS_AT_START) {
                Ok(alerts) => alerts.into_iter().map(|a| (a.rule, a.device)).collect(),
                Err(e) => {
                    warn!(error = %e, "cannot read open alerts; they clear only when raised again");
                    Vec::new()
                }
            };
            let mut generation = load(&mut engine, &*registry, &switches, &figures, &firing);
            let mut poll = tokio::time::interval(GENERATION_POLL);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut closing = false;
            loop {
                let deadline = engine.next_deadline();
                let wait = async {
                    match deadline {
                        Some(t) => {
                            let ms = t.saturating_sub(now_ms()).max(0) as u64;
                            tokio::time::sleep(Duration::from_millis(ms)).await
                        }
                        None => std::future::pending().await,
                    }
                };
                let firings = tokio::select! {
                    biased;
                    _ = stop.cancelled(), if !closing => {
                        // What is queued is still evaluated; then `recv` ends the loop.
                        inputs.close();
                        closing = true;
                        continue;
                    }
                    _ = reload.notify.notified() => {
                        let asked = reload.requested.load(Ordering::Acquire);
                        generation = load(&mut engine, &*registry, &switches, &figures, &[]);
                        loaded.send_replace(asked);
                        continue;
                    }
                    _ = poll.tick() => {
                        match registry.rules_generation() {
                            Ok(g) if Some(g) != generation => {
                                generation =
                                    load(&mut engine, &*registry, &switches, &figures, &[]);
                            }
                            Ok(_) => {}
                            Err(e) => warn!(error = %e, "cannot read the rules' generation"),
                        }
                        continue;
                    }
                    _ = wait => engine.tick(now_ms()),
                    batch = inputs.recv() => match batch {
                        Some(batch) => {
                            let mut firings = Vec::new();
                            for input in &batch {
                                firings.extend(engine.handle(input, input.at_ms, &mut directory));
                            }
                            firings
                        }
                        None => break,
                    },
                };
                for firing in firings {
                    if effects.send(firing).await.is_err() {
                        return;
                    }
                }
            }
            info!("rules engine stopped: no more inputs");
        });
    }
}

/// Reads and compiles the enabled rules; returns the generation read (None if unreadable).
/// A rule that no longer compiles (written by a newer version, say) is left out and its
/// figures say why.
fn load(
    engine: &mut Engine,
    registry: &dyn Registry,
    switches: &RuleFeed,
    figures: &Figures,
    firing: &[(String, DeviceId)],
) -> Option<i64> {
    let generation = registry.rules_generation().ok();
    let rules = match registry.enabled_rules() {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot read rules; keeping the ones loaded");
            return None;
        }
    };
    // The figures of every enabled rule stay, those that do not compile with the reason.
    figures.retain(&rules.iter().map(|r| r.id.as_str()).collect());
    engine.reload(
        &rules,
        |rule| {
            let rule_figures = figures.rule(&rule.id);
            Compiled::new(rule, rule_figures.clone())
                .map_err(|e| {
                    warn!(rule = %rule.id, error = %e, "rule does not compile; not evaluated");
                    rule_figures.fail(now_ms(), "compile", e);
                })
                .ok()
        },
        firing,
    );
    for trigger in [
        Trigger::Telemetry,
        Trigger::State,
        Trigger::Presence,
        Trigger::Event,
    ] {
        switches.set_wanted(trigger, engine.wants(trigger));
    }
    info!(rules = engine.rules(), "rules loaded");
    generation
}

/// Device tags for the engine, read from the registry and kept for a while.
struct TagCache {
    registry: Arc<dyn Registry>,
    entries: HashMap<DeviceId, (Instant, Option<Tags>)>,
    ttl: Duration,
}

/// Devices whose tags are kept at most; past it the cache starts over.
const TAG_CACHE_MAX: usize = 100_000;

impl Directory for TagCache {
    fn tags(&mut self, device: &DeviceId) -> Option<Tags> {
        if let Some((at, tags)) = self.entries.get(device) {
            if at.elapsed() < self.ttl {
                return tags.clone();
            }
        }
        let tags = match self.registry.device(device) {
            Ok(found) => found.map(|d| Arc::new(d.tags)),
            Err(e) => {
                warn!(device_id = %device, error = %e, "cannot read the device's tags");
                // The tags known before, if any; else the input is not evaluated.
                return self.entries.get(device).and_then(|(_, t)| t.clone());
            }
        };
        if self.entries.len() >= TAG_CACHE_MAX {
            self.entries.clear();
        }
        self.entries
            .insert(device.clone(), (Instant::now(), tags.clone()));
        tags
    }
}

/// Firings taken at once: their derived metrics are committed together.
const EXECUTE_BATCH: usize = 1_024;

async fn execute(
    config: RulesConfig,
    outlets: Outlets,
    figures: Arc<Figures>,
    mut firings: mpsc::Receiver<Firing>,
) {
    let (webhooks, webhook_rx) = mpsc::channel(config.webhook_queue.max(1));
    let calls = tokio::spawn(call_webhooks(config.webhook_concurrency.max(1), webhook_rx));
    let client = reqwest::Client::builder().build();
    let client = match client {
        Ok(c) => Some(c),
        Err(e) => {
            error!(error = %e, "no HTTP client: webhooks will fail");
            None
        }
    };
    let mut batch = Vec::with_capacity(EXECUTE_BATCH);
    while firings.recv_many(&mut batch, EXECUTE_BATCH).await > 0 {
        commit_metrics(&outlets, &figures, &batch).await;
        for firing in batch.drain(..) {
            let rule = figures.rule(&firing.rule.id);
            for effect in firing.effects {
                let done = match effect {
                    Effect::Metric { .. } => continue,
                    Effect::Webhook {
                        url,
                        headers,
                        timeout,
                        retries,
                        body,
                    } => {
                        let Some(client) = client.clone() else {
                            rule.actions_failed.fetch_add(1, Ordering::Relaxed);
                            rule.fail(now_ms(), "webhook", "no HTTP client".into());
                            continue;
                        };
                        let call = WebhookCall {
                            client,
                            rule: rule.clone(),
                            url,
                            headers,
                            timeout,
                            retries,
                            body,
                        };
                        if let Err(e) = webhooks.try_send(call) {
                            figures.effects_shed.fetch_add(1, Ordering::Relaxed);
                            let why = match e {
                                mpsc::error::TrySendError::Full(_) => {
                                    "webhook queue full; call dropped"
                                }
                                mpsc::error::TrySendError::Closed(_) => "webhooks stopped",
                            };
                            Err(("webhook", why.to_owned()))
                        } else {
                            // Counted when the call ends.
                            continue;
                        }
                    }
                    Effect::Command {
                        target,
                        name,
                        params,
                        timeout,
                    } => command(&outlets, &config, target, name, params, timeout)
                        .await
                        .map_err(|e| ("command", e)),
                    Effect::Publish {
                        topic,
                        retain,
                        payload,
                    } => {
                        let payload = serde_json::to_vec(&payload).unwrap_or_default();
                        let sent = if retain {
                            outlets.publisher.publish_retained(topic, payload).await
                        } else {
                            outlets.publisher.publish(topic, payload).await
                        };
                        sent.map_err(|e| ("publish", e.to_string()))
                    }
                    Effect::RaiseAlert {
                        device,
                        severity,
                        message,
                        values,
                    } => {
                        let registry = outlets.registry.clone();
                        let (id, version) = (firing.rule.id.clone(), firing.rule.version);
                        let at = firing.at_ms;
                        match blocking(move || {
                            registry.raise_alert(
                                &Raise {
                                    rule: &id,
                                    version: Some(version),
                                    device: &device,
                                    severity,
                                    message: &message,
                                    values: &values,
                                },
                                at,
                            )
                        })
                        .await
                        {
                            Ok((alert, true)) => {
                                info!(rule = %alert.rule, device_id = %alert.device, alert = %alert.id, "alert raised");
                                tell(&outlets.live, alert);
                                Ok(())
                            }
                            Ok((_, false)) => Ok(()),
                            Err(e) => Err(("alert", e)),
                        }
                    }
                    Effect::ClearAlert {
                        rule: whose,
                        device,
                        reason,
                    } => {
                        let registry = outlets.registry.clone();
                        let at = firing.at_ms;
                        match blocking(move || registry.clear_alert(&whose, &device, &reason, at))
                            .await
                        {
                            Ok(Some(alert)) => {
                                info!(rule = %alert.rule, device_id = %alert.device, alert = %alert.id, "alert cleared");
                                tell(&outlets.live, alert);
                                Ok(())
                            }
                            Ok(None) => Ok(()),
                            Err(e) => Err(("alert", e)),
                        }
                    }
                };
                count(&rule, done);
            }
        }
    }
    // Webhook calls still queued or retrying get a short grace, then are given up.
    drop(webhooks);
    let abort = calls.abort_handle();
    if tokio::time::timeout(WEBHOOK_GRACE, calls).await.is_err() {
        abort.abort();
        warn!("webhook calls still under way at shutdown were given up");
    }
}

/// How long webhook calls may go on once the engine has stopped.
const WEBHOOK_GRACE: Duration = Duration::from_secs(2);

fn count(rule: &RuleFigures, done: Result<(), (&str, String)>) {
    match done {
        Ok(()) => {
            rule.actions_succeeded.fetch_add(1, Ordering::Relaxed);
        }
        Err((kind, e)) => {
            rule.actions_failed.fetch_add(1, Ordering::Relaxed);
            rule.fail(now_ms(), kind, e);
        }
    }
}

/// Tells the live feed that an alert changed.
pub fn tell(live: &Live, alert: Alert) {
    live.send(LiveEvent::Alert {
        device: alert.device.clone(),
        alert: Box::new(alert),
    });
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, tellus_core::RegistryError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the registry call panicked".into()),
    }
}

/// Writes the derived metrics of these firings in one commit, and tells the live feed.
async fn commit_metrics(outlets: &Outlets, figures: &Figures, firings: &[Firing]) {
    let mut samples = Vec::new();
    let mut by_rule: HashMap<&str, u64> = HashMap::new();
    for firing in firings {
        for effect in &firing.effects {
            if let Effect::Metric {
                device,
                name,
                ts_ms,
                value,
            } = effect
            {
                samples.push((
                    device.clone(),
                    Sample {
                        metric: name.clone(),
                        ts_ms: *ts_ms,
                        value: value.clone(),
                    },
                ));
                *by_rule.entry(firing.rule.id.as_str()).or_default() += 1;
            }
        }
    }
    if samples.is_empty() {
        return;
    }
    let store = outlets.store.clone();
    let batch = Batch {
        samples,
        deadletters: Vec::new(),
    };
    let (batch, committed) = match tokio::task::spawn_blocking(move || {
        let r = store.commit(&batch).map_err(|e| e.to_string());
        (batch, r)
    })
    .await
    {
        Ok(done) => done,
        Err(_) => {
            error!("derived metrics commit panicked");
            return;
        }
    };
    for (rule, n) in by_rule {
        let f = figures.rule(rule);
        match &committed {
            Ok(()) => f.actions_succeeded.fetch_add(n, Ordering::Relaxed),
            Err(e) => {
                f.fail(now_ms(), "metric", e.clone());
                f.actions_failed.fetch_add(n, Ordering::Relaxed)
            }
        };
    }
    match committed {
        Ok(()) => {
            if outlets.live.listened() {
                for (device, sample) in &batch.samples {
                    outlets.live.send(LiveEvent::Telemetry {
                        device: device.clone(),
                        points: vec![sample.into()],
                    });
                }
            }
        }
        Err(e) => warn!(error = %e, points = batch.samples.len(), "derived metrics not stored"),
    }
}

async fn command(
    outlets: &Outlets,
    config: &RulesConfig,
    target: Target,
    name: String,
    params: serde_json::Value,
    timeout: Duration,
) -> Result<(), String> {
    match target {
        Target::Device(device) => outlets
            .devices
            .create(&device, &name, params, timeout)
            .await
            .map(|c| debug!(device_id = %device, command = %c.id, "rule sent a command")),
        Target::Devices(selector) => {
            let selector = if !selector.ids.is_empty() {
                Selector::Ids(selector.ids)
            } else {
                Selector::Tags(selector.tags.into_iter().collect())
            };
            outlets
                .devices
                .start_job(NewJob {
                    name,
                    params,
                    timeout,
                    selector,
                    rate: config.job_rate,
                    concurrency: 100,
                })
                .await
                .map(|j| debug!(job = %j.id, "rule started a job"))
        }
    }
    .map_err(|e| e.to_string())
}

struct WebhookCall {
    client: reqwest::Client,
    rule: Arc<RuleFigures>,
    url: String,
    headers: BTreeMap<String, String>,
    timeout: Duration,
    retries: u32,
    body: serde_json::Value,
}

async fn call_webhooks(concurrency: usize, mut calls: mpsc::Receiver<WebhookCall>) {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut running = tokio::task::JoinSet::new();
    while let Some(call) = calls.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        running.spawn(async move {
            deliver(call).await;
            drop(slot);
        });
        // Reap finished calls so the set stays as small as the semaphore.
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}

/// The first wait before a retry; each further one doubles, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

async fn deliver(call: WebhookCall) {
    let mut backoff = FIRST_BACKOFF;
    for attempt in 0..=call.retries {
        let mut request = call
            .client
            .post(&call.url)
            .timeout(call.timeout)
            .json(&call.body);
        for (k, v) in &call.headers {
            request = request.header(k, v);
        }
        let why = match request.send().await {
            Ok(r) if r.status().is_success() => {
                call.rule.actions_succeeded.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(r) => format!("{} answered {}", call.url, r.status()),
            Err(e) => format!("{}: {}", call.url, error_chain(&e)),
        };
        let last = attempt == call.retries;
        call.rule.fail(
            now_ms(),
            "webhook",
            format!(
                "attempt {} of {}: {why}{}",
                attempt + 1,
                call.retries + 1,
                if last { "; giving up" } else { "" }
            ),
        );
        if last {
            break;
        }
        // Jitter: up to a quarter more, so that many failing calls do not retry in step.
        let jitter = backoff.mul_f64(rand::random::<f64>() * 0.25);
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    call.rule.actions_failed.fetch_add(1, Ordering::Relaxed);
}

/// The error and its causes, `: `-joined (reqwest's own text hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
