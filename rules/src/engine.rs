//! The engine: rules evaluated on inputs, and what they would do, as data.
//!
//! [`Engine`] does no I/O and keeps no clock: it is given each input with the time it counts
//! as now, and [`Engine::tick`] is called when [`Engine::next_deadline`] comes. It answers
//! with [`Firing`]s, each carrying the [`Effect`]s its rule's actions produced. The service
//! (`service.rs`) carries effects out; a dry run only collects them. Same code, so a dry run
//! shows exactly what the live rule would do.
//!
//! Per rule and device, the engine keeps where the condition stands:
//! - without `for`, every input for which the condition holds fires the actions;
//! - with `for`, the first input for which it holds starts a wait; an input for which it no
//!   longer holds ends it; when the wait has lasted `for`, the actions fire once, and not
//!   again until the condition has stopped holding and held again for `for`;
//! - an input for which it stops holding clears the rule's alert for the device (reason
//!   `condition`); an input the condition does not apply to (a key it reads is missing)
//!   changes nothing.
//!
//! Kept state is one entry per rule and device whose condition holds: bounded by rules
//! times devices, and dropped when the condition stops holding or the rule changes.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tellus_core::{
    rule::InputKind, telemetry::key_is_bad, Action, DeviceId, DeviceSelector, Rule, RuleInput,
    Severity, TimestampMs, Trigger, Value,
};

use crate::{
    expr::{cut, Expr, Outcome, Subject},
    function::{FunctionError, Limits},
    worker::Worker,
};

/// A command action's timeout when the rule names none.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The rule that did something: kept in every effect, for figures and for the record.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RuleRef {
    pub id: String,
    pub name: String,
    /// The version that fired.
    pub version: u64,
}

/// Where a command goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Device(DeviceId),
    Devices(DeviceSelector),
}

/// One thing a rule does: what the service carries out, and what a dry run reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Effect {
    Command {
        target: Target,
        name: String,
        params: serde_json::Value,
        /// In milliseconds.
        #[cfg_attr(feature = "openapi", schema(value_type = u64))]
        #[serde(with = "humantime_ms")]
        timeout: Duration,
    },
    Webhook {
        url: String,
        headers: BTreeMap<String, String>,
        /// In milliseconds.
        #[cfg_attr(feature = "openapi", schema(value_type = u64))]
        #[serde(with = "humantime_ms")]
        timeout: Duration,
        retries: u32,
        body: serde_json::Value,
    },
    Publish {
        topic: String,
        retain: bool,
        payload: serde_json::Value,
    },
    Metric {
        device: DeviceId,
        name: String,
        #[cfg_attr(feature = "openapi", schema(value_type = i64))]
        ts_ms: TimestampMs,
        #[cfg_attr(feature = "openapi", schema(value_type = tellus_core::telemetry::MetricValue))]
        value: Value,
    },
    RaiseAlert {
        device: DeviceId,
        severity: Severity,
        message: String,
        values: serde_json::Value,
    },
    /// Clear the open alert of `rule` (this rule's own, or another's) for the device.
    ClearAlert {
        rule: String,
        device: DeviceId,
        reason: String,
    },
}

mod humantime_ms {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

/// A rule firing (or clearing) for one device: the effects it produced, and the message
/// that made it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Firing {
    pub rule: RuleRef,
    pub device: DeviceId,
    /// The engine's now when it fired.
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub at_ms: TimestampMs,
    /// The message as the rule's actions saw it; `null` when none of them uses it (outside
    /// dry runs).
    pub message: serde_json::Value,
    pub effects: Vec<Effect>,
    /// Actions that failed while producing effects (a function's error, a metric's
    /// expression that failed): `"<kind>: <why>"`.
    pub errors: Vec<String>,
}

impl Firing {
    /// Hides what its webhook effects hold that only an admin may see (see
    /// [`tellus_core::RuleSpec::hide_secrets`]).
    pub fn hide_secrets(&mut self) {
        for effect in &mut self.effects {
            if let Effect::Webhook { url, headers, .. } = effect {
                tellus_core::rule::hide_webhook_secrets(url, headers);
            }
        }
    }
}

/// Counters of one rule, shared with the API. Kept while the rule exists; they start at
/// zero when the process starts.
#[derive(Debug, Default)]
pub struct RuleFigures {
    pub evaluations: AtomicU64,
    pub matches: AtomicU64,
    pub not_applicable: AtomicU64,
    pub condition_errors: AtomicU64,
    pub fired: AtomicU64,
    pub actions_succeeded: AtomicU64,
    pub actions_failed: AtomicU64,
    pub function_calls: AtomicU64,
    pub function_errors: AtomicU64,
    pub function_timeouts: AtomicU64,
    pub function_out_of_memory: AtomicU64,
    /// Evaluations timed (one in [`TIMED_EVERY`]) and the time they took, condition and
    /// actions (functions included) together, in nanoseconds.
    pub timed: AtomicU64,
    pub timed_ns: AtomicU64,
    /// The last [`RECENT_ERRORS`] failures, oldest first.
    recent_errors: Mutex<std::collections::VecDeque<LastError>>,
}

/// Failures kept per rule.
pub const RECENT_ERRORS: usize = 10;
/// One evaluation of a rule in this many is timed.
pub const TIMED_EVERY: u64 = 32;

/// The most recent failure of a rule, of any kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LastError {
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub at_ms: TimestampMs,
    /// Where: `condition`, `function`, `metric`, `webhook`, `command`, …
    pub kind: String,
    pub message: String,
}

impl RuleFigures {
    /// Records a failure (the counters are the caller's to move).
    pub fn fail(&self, at_ms: TimestampMs, kind: &str, message: String) {
        if let Ok(mut recent) = self.recent_errors.lock() {
            if recent.len() >= RECENT_ERRORS {
                recent.pop_front();
            }
            recent.push_back(LastError {
                at_ms,
                kind: kind.to_owned(),
                message: cut(message),
            });
        }
    }

    pub fn snapshot(&self) -> RuleFiguresSnapshot {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RuleFiguresSnapshot {
            evaluations: n(&self.evaluations),
            matches: n(&self.matches),
            not_applicable: n(&self.not_applicable),
            condition_errors: n(&self.condition_errors),
            fired: n(&self.fired),
            actions_succeeded: n(&self.actions_succeeded),
            actions_failed: n(&self.actions_failed),
            function_calls: n(&self.function_calls),
            function_errors: n(&self.function_errors),
            function_timeouts: n(&self.function_timeouts),
            function_out_of_memory: n(&self.function_out_of_memory),
            mean_eval_us: n(&self.timed_ns) as f64 / n(&self.timed).max(1) as f64 / 1_000.0,
            recent_errors: self
                .recent_errors
                .lock()
                .map(|r| r.iter().rev().cloned().collect())
                .unwrap_or_default(),
        }
    }
}

/// A rule's figures as the API shows them.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RuleFiguresSnapshot {
    pub evaluations: u64,
    pub matches: u64,
    pub not_applicable: u64,
    pub condition_errors: u64,
    pub fired: u64,
    pub actions_succeeded: u64,
    pub actions_failed: u64,
    pub function_calls: u64,
    pub function_errors: u64,
    pub function_timeouts: u64,
    pub function_out_of_memory: u64,
    /// What one evaluation of this rule takes on the engine's thread (condition and
    /// actions, functions included), in microseconds: the mean of one evaluation in
    /// [`TIMED_EVERY`].
    pub mean_eval_us: f64,
    /// The last failures of any kind (condition, function, webhook, command, …), newest
    /// first.
    pub recent_errors: Vec<LastError>,
}

/// Every rule's figures, and the engine's own.
#[derive(Debug, Default)]
pub struct Figures {
    rules: RwLock<HashMap<String, Arc<RuleFigures>>>,
    /// Inputs evaluated (with at least one rule of their trigger enabled).
    pub inputs: AtomicU64,
    /// Time spent on them, in nanoseconds: what rules add per message.
    pub busy_ns: AtomicU64,
    /// The longest one input took, in nanoseconds.
    pub max_ns: AtomicU64,
    /// Effects the service could not queue (its queue full): counted as failed actions too.
    pub effects_shed: AtomicU64,
}

impl Figures {
    /// The figures of a rule, created at zero when first asked for.
    pub fn rule(&self, id: &str) -> Arc<RuleFigures> {
        if let Some(f) = self.rules.read().ok().and_then(|r| r.get(id).cloned()) {
            return f;
        }
        match self.rules.write() {
            Ok(mut rules) => rules.entry(id.to_owned()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Keeps the figures of these rules only.
    pub fn retain(&self, ids: &BTreeSet<&str>) {
        if let Ok(mut rules) = self.rules.write() {
            rules.retain(|id, _| ids.contains(id.as_str()));
        }
    }

    pub fn get(&self, id: &str) -> Option<RuleFiguresSnapshot> {
        self.rules
            .read()
            .ok()
            .and_then(|r| r.get(id).map(|f| f.snapshot()))
    }

    /// Every loaded rule's figures, by rule id.
    pub fn all(&self) -> Vec<(String, RuleFiguresSnapshot)> {
        let mut all: Vec<_> = self
            .rules
            .read()
            .map(|r| r.iter().map(|(id, f)| (id.clone(), f.snapshot())).collect())
            .unwrap_or_default();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The engine's own figures.
    pub fn engine(&self) -> EngineFigures {
        let inputs = self.inputs.load(Ordering::Relaxed);
        EngineFigures {
            inputs,
            mean_us_per_input: self.busy_ns.load(Ordering::Relaxed) as f64
                / inputs.max(1) as f64
                / 1_000.0,
            max_us_per_input: self.max_ns.load(Ordering::Relaxed) as f64 / 1_000.0,
            effects_shed: self.effects_shed.load(Ordering::Relaxed),
        }
    }

    fn record_input(&self, took: Duration) {
        let ns = took.as_nanos().min(u64::MAX as u128) as u64;
        self.inputs.fetch_add(1, Ordering::Relaxed);
        self.busy_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }
}

/// The engine's figures as `GET /api/v1/stats` shows them (`rules`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EngineFigures {
    /// Inputs evaluated (with at least one enabled rule of their trigger).
    pub inputs: u64,
    /// The time rules add per input, on the engine's thread: mean and longest.
    pub mean_us_per_input: f64,
    pub max_us_per_input: f64,
    /// Effects shed (a full webhook queue).
    pub effects_shed: u64,
}

/// A device's tags, shared.
pub type Tags = Arc<BTreeMap<String, String>>;

/// Device tags, as the engine needs them for selectors and scopes. `None`: no such device
/// (deleted since): its inputs are not evaluated.
pub trait Directory {
    fn tags(&mut self, device: &DeviceId) -> Option<Tags>;
}

/// What a function may return (any key absent is nothing to do).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FunctionOutput {
    /// Derived metrics of the device, at the reading's time.
    metrics: BTreeMap<String, serde_json::Value>,
    commands: Vec<FunctionCommand>,
    /// Raise this rule's alert for the device.
    alert: Option<FunctionAlert>,
    /// Clear this rule's alert for the device.
    clear_alert: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FunctionCommand {
    name: String,
    #[serde(default)]
    params: serde_json::Value,
    /// Another device; default: the one that fired the rule.
    device: Option<DeviceId>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FunctionAlert {
    severity: Severity,
    message: Option<String>,
}

enum Step {
    Command {
        name: String,
        params: serde_json::Value,
        devices: Option<DeviceSelector>,
        timeout: Duration,
    },
    Webhook {
        url: String,
        headers: BTreeMap<String, String>,
        timeout: Duration,
        retries: u32,
    },
    Publish {
        topic: String,
        retain: bool,
    },
    Metric {
        name: String,
        value: Expr,
    },
    Alert {
        severity: Severity,
        message: Option<String>,
    },
    ClearAlert {
        rule: String,
    },
    Function(RefCell<Worker>),
}

/// The longest webhook timeout and most retries a rule may ask for.
pub const MAX_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(60);
pub const MAX_WEBHOOK_RETRIES: u32 = 10;
/// The longest a function may be given per call, and the most memory.
pub const MAX_FUNCTION_DEADLINE: Duration = Duration::from_secs(1);
pub const MAX_FUNCTION_MEMORY: usize = 256 << 20;
/// The most actions of one rule.
pub const MAX_ACTIONS: usize = 16;
/// The longest `for`.
pub const MAX_HOLD: Duration = Duration::from_secs(30 * 86_400);
/// The longest a command action's command may wait for its device.
pub const MAX_COMMAND_TIMEOUT: Duration = Duration::from_secs(30 * 86_400);
/// The largest command action's params, as JSON.
pub const MAX_PARAMS_BYTES: usize = 64 * 1024;

/// A rule ready to evaluate.
pub struct Compiled {
    rule: RuleRef,
    trigger: Trigger,
    devices: DeviceSelector,
    condition: Option<Expr>,
    hold: Option<Duration>,
    steps: Vec<Step>,
    /// Whether it raises alerts (an alert or function action): then an input for which its
    /// condition stops holding clears them.
    alerts: bool,
    /// Whether its actions use the message (webhooks, publishes, alerts, functions): it is
    /// built only then (or for a dry run, which shows it).
    needs_message: bool,
    figures: Arc<RuleFigures>,
    /// Id and version, to tell whether a reload changed it.
    version: u64,
}

impl Compiled {
    /// Checks and compiles a rule; the error says what is wrong, for whoever wrote it.
    pub fn new(rule: &Rule, figures: Arc<RuleFigures>) -> Result<Compiled, String> {
        let spec = &rule.spec;
        if spec.name.trim().is_empty() || spec.name.len() > 200 {
            return Err("name: 1 to 200 bytes, not only spaces".into());
        }
        if spec.actions.is_empty() {
            return Err("actions: a rule needs at least one".into());
        }
        if spec.actions.len() > MAX_ACTIONS {
            return Err(format!("actions: at most {MAX_ACTIONS}"));
        }
        if spec.hold.is_some_and(|h| h > MAX_HOLD) {
            return Err("for: at most 30 days".into());
        }
        let condition = match spec.condition.trim() {
            "" => None,
            source => {
                Some(Expr::compile(source, spec.trigger).map_err(|e| format!("condition: {e}"))?)
            }
        };
        let mut steps = Vec::with_capacity(spec.actions.len());
        for (i, action) in spec.actions.iter().enumerate() {
            let at = |e: String| format!("actions[{i}] ({}): {e}", action.kind());
            steps.push(Self::step(action, spec.trigger).map_err(at)?);
        }
        let alerts = steps
            .iter()
            .any(|s| matches!(s, Step::Alert { .. } | Step::Function(_)));
        let needs_message = steps.iter().any(|s| {
            matches!(
                s,
                Step::Alert { .. }
                    | Step::Function(_)
                    | Step::Webhook { .. }
                    | Step::Publish { .. }
            )
        });
        Ok(Compiled {
            rule: RuleRef {
                id: rule.id.clone(),
                name: spec.name.clone(),
                version: rule.version,
            },
            trigger: spec.trigger,
            devices: spec.devices.clone(),
            condition,
            hold: spec.hold.filter(|d| !d.is_zero()),
            steps,
            alerts,
            needs_message,
            figures,
            version: rule.version,
        })
    }

    fn step(action: &Action, trigger: Trigger) -> Result<Step, String> {
        Ok(match action {
            Action::Command {
                name,
                params,
                devices,
                timeout,
            } => {
                if name.is_empty() || name.len() > 128 {
                    return Err("name: 1 to 128 bytes".into());
                }
                if serde_json::to_vec(params).map_or(usize::MAX, |p| p.len()) > MAX_PARAMS_BYTES {
                    return Err(format!("params: at most {MAX_PARAMS_BYTES} bytes of JSON"));
                }
                if timeout.is_some_and(|t| t.is_zero() || t > MAX_COMMAND_TIMEOUT) {
                    return Err("timeout: more than 0 and at most 30 days".into());
                }
                if devices.as_ref().is_some_and(|d| d.is_empty()) {
                    return Err(
                        "devices: name ids or tags (leave it out for the device that fired)".into(),
                    );
                }
                if devices
                    .as_ref()
                    .is_some_and(|d| !d.ids.is_empty() && !d.tags.is_empty())
                {
                    return Err("devices: either ids or tags, not both".into());
                }
                Step::Command {
                    name: name.clone(),
                    params: params.clone(),
                    devices: devices.clone(),
                    timeout: timeout.unwrap_or(DEFAULT_COMMAND_TIMEOUT),
                }
            }
            Action::Webhook {
                url,
                headers,
                timeout,
                retries,
            } => {
                if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2048
                {
                    return Err("url: an http:// or https:// URL of at most 2048 bytes".into());
                }
                let timeout = timeout.unwrap_or(Duration::from_secs(5));
                if timeout.is_zero() || timeout > MAX_WEBHOOK_TIMEOUT {
                    return Err("timeout: more than 0 and at most 60s".into());
                }
                for (k, v) in headers {
                    if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err()
                        || reqwest::header::HeaderValue::from_str(v).is_err()
                    {
                        return Err(format!("headers: {k:?} is not a valid header"));
                    }
                }
                let retries = retries.unwrap_or(3);
                if retries > MAX_WEBHOOK_RETRIES {
                    return Err(format!("retries: at most {MAX_WEBHOOK_RETRIES}"));
                }
                Step::Webhook {
                    url: url.clone(),
                    headers: headers.clone(),
                    timeout,
                    retries,
                }
            }
            Action::Publish { topic, retain } => {
                check_publish_topic(topic)?;
                Step::Publish {
                    topic: topic.clone(),
                    retain: *retain,
                }
            }
            Action::Metric { name, value } => {
                if key_is_bad(name) {
                    return Err(format!("name {name:?} is not a metric name"));
                }
                Step::Metric {
                    name: name.clone(),
                    value: Expr::compile(value, trigger).map_err(|e| format!("value: {e}"))?,
                }
            }
            Action::Alert { severity, message } => Step::Alert {
                severity: *severity,
                message: message.clone(),
            },
            Action::ClearAlert { rule } => Step::ClearAlert { rule: rule.clone() },
            Action::Function {
                source,
                timeout,
                memory_limit_bytes,
            } => {
                let limits = Limits {
                    deadline: timeout.unwrap_or(crate::function::DEFAULT_DEADLINE),
                    memory_bytes: memory_limit_bytes
                        .unwrap_or(crate::function::DEFAULT_MEMORY_LIMIT),
                };
                if limits.deadline.is_zero() || limits.deadline > MAX_FUNCTION_DEADLINE {
                    return Err("timeout: more than 0 and at most 1s".into());
                }
                if limits.memory_bytes < (1 << 20) || limits.memory_bytes > MAX_FUNCTION_MEMORY {
                    return Err("memory_limit_bytes: from 1 MiB to 256 MiB".into());
                }
                Step::Function(RefCell::new(
                    Worker::start(source, limits).map_err(|e| e.to_string())?,
                ))
            }
        })
    }
}

/// Topics a publish action may use: under `rules/`, with `{device}` standing for the
/// device's id; no wildcards.
pub fn check_publish_topic(topic: &str) -> Result<(), String> {
    if !topic.starts_with("rules/")
        || topic.len() > 256
        || topic.contains(['+', '#', '\0'])
        || topic.split('/').any(str::is_empty)
    {
        return Err("topic: under rules/, at most 256 bytes, no wildcards or empty levels".into());
    }
    Ok(())
}

/// Where a rule's condition stands for one device.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Hold {
    /// Held since then; fires at `since + for`.
    Waiting { since: TimestampMs },
    /// Fired; fires no more until it stops holding (with `for`), and its alert is up.
    Firing,
}

/// The newest input for which a waiting rule's condition held: what it fires with.
struct Waiting {
    message: serde_json::Value,
    input: RuleInput,
    tags: Tags,
}

/// The rules, and where each stands per device.
pub struct Engine {
    rules: Vec<Compiled>,
    by_trigger: HashMap<Trigger, Vec<usize>>,
    /// Rule ids to their place in `rules`.
    index: HashMap<String, usize>,
    /// Per device, the rules whose condition holds for it (by place in `rules`). Keyed by
    /// device first, so that the common case (nothing holds) costs one lookup per input.
    holds: HashMap<DeviceId, HashMap<usize, Hold>>,
    /// The last message each waiting rule and device saw: what it fires with.
    waiting_messages: HashMap<(usize, DeviceId), Waiting>,
    /// When waits end: (deadline, rule, device).
    deadlines: BTreeSet<(TimestampMs, usize, DeviceId)>,
    figures: Arc<Figures>,
    /// Every match and condition error, when a dry run asks for them.
    trace: Option<Vec<Match>>,
}

/// One input a rule's condition held for (or failed on), as a dry run reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Match {
    pub rule: String,
    pub device: DeviceId,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub at_ms: TimestampMs,
    /// `match` or `error`.
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^(match|error)$"))]
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Keeps a match (or, with `error`, a condition's failure) when a dry run traces.
fn record(
    trace: &mut Option<Vec<Match>>,
    rule: &Compiled,
    device: &DeviceId,
    at_ms: TimestampMs,
    error: Option<&String>,
) {
    if let Some(trace) = trace {
        trace.push(Match {
            rule: rule.rule.id.clone(),
            device: device.clone(),
            at_ms,
            outcome: if error.is_some() { "error" } else { "match" },
            error: error.cloned(),
        });
    }
}

/// Adds one to a counter only the engine's thread writes: a load and a store, cheaper than
/// an atomic read-modify-write, and enough for readers that want a recent figure.
fn bump(counter: &AtomicU64) {
    counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

fn hold_of(
    holds: &HashMap<DeviceId, HashMap<usize, Hold>>,
    device: &DeviceId,
    i: usize,
) -> Option<Hold> {
    holds.get(device).and_then(|h| h.get(&i)).copied()
}

fn set_hold(
    holds: &mut HashMap<DeviceId, HashMap<usize, Hold>>,
    device: &DeviceId,
    i: usize,
    hold: Hold,
) {
    match holds.get_mut(device) {
        Some(h) => {
            h.insert(i, hold);
        }
        None => {
            holds.insert(device.clone(), HashMap::from([(i, hold)]));
        }
    }
}

fn take_hold(
    holds: &mut HashMap<DeviceId, HashMap<usize, Hold>>,
    device: &DeviceId,
    i: usize,
) -> Option<Hold> {
    let h = holds.get_mut(device)?;
    let taken = h.remove(&i);
    if h.is_empty() {
        holds.remove(device);
    }
    taken
}

fn deadline(since: TimestampMs, hold: Duration) -> TimestampMs {
    since.saturating_add(i64::try_from(hold.as_millis()).unwrap_or(i64::MAX))
}

impl Engine {
    pub fn new(figures: Arc<Figures>) -> Engine {
        Engine {
            rules: Vec::new(),
            by_trigger: HashMap::new(),
            index: HashMap::new(),
            holds: HashMap::new(),
            waiting_messages: HashMap::new(),
            deadlines: BTreeSet::new(),
            figures,
            trace: None,
        }
    }

    /// Keeps every match and condition error from now on, for [`Engine::take_trace`].
    pub fn keep_trace(&mut self) {
        self.trace = Some(Vec::new());
    }

    pub fn take_trace(&mut self) -> Vec<Match> {
        self.trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    pub fn figures(&self) -> &Arc<Figures> {
        &self.figures
    }

    /// Replaces the rules. A rule whose id and version are unchanged keeps where it stood;
    /// `firing` names (rule, device) pairs with an open alert (given at start, from the
    /// registry), which count as firing so that the condition's end clears them.
    pub fn load(&mut self, rules: Vec<Compiled>, firing: &[(String, DeviceId)]) {
        let old = self.versions();
        self.install(rules, &old, firing);
    }

    /// Like [`Engine::load`], from stored rules: a rule whose id and version are unchanged
    /// is kept as compiled (its functions' threads with it), the others are compiled by
    /// `compile` (`None`: left out).
    pub fn reload(
        &mut self,
        rules: &[Rule],
        mut compile: impl FnMut(&Rule) -> Option<Compiled>,
        firing: &[(String, DeviceId)],
    ) {
        let old = self.versions();
        let mut previous: Vec<Option<Compiled>> = std::mem::take(&mut self.rules)
            .into_iter()
            .map(Some)
            .collect();
        let compiled = rules
            .iter()
            .filter_map(|r| {
                match old.get(&(r.id.clone(), r.version)) {
                    Some(&i) => previous.get_mut(i).and_then(Option::take),
                    None => None,
                }
                .or_else(|| compile(r))
            })
            .collect();
        self.install(compiled, &old, firing);
    }

    /// Where each loaded rule (id and version) stands in `rules`.
    fn versions(&self) -> HashMap<(String, u64), usize> {
        self.rules
            .iter()
            .enumerate()
            .map(|(i, r)| ((r.rule.id.clone(), r.version), i))
            .collect()
    }

    fn install(
        &mut self,
        rules: Vec<Compiled>,
        old: &HashMap<(String, u64), usize>,
        firing: &[(String, DeviceId)],
    ) {
        let moved: HashMap<usize, usize> = rules
            .iter()
            .enumerate()
            .filter_map(|(new, r)| {
                old.get(&(r.rule.id.clone(), r.version))
                    .map(|&old| (old, new))
            })
            .collect();
        let holds = std::mem::take(&mut self.holds);
        self.holds = holds
            .into_iter()
            .filter_map(|(d, h)| {
                let h: HashMap<usize, Hold> = h
                    .into_iter()
                    .filter_map(|(i, hold)| moved.get(&i).map(|&n| (n, hold)))
                    .collect();
                (!h.is_empty()).then_some((d, h))
            })
            .collect();
        let waiting = std::mem::take(&mut self.waiting_messages);
        self.waiting_messages = waiting
            .into_iter()
            .filter_map(|((i, d), m)| moved.get(&i).map(|&n| ((n, d), m)))
            .collect();
        let deadlines = std::mem::take(&mut self.deadlines);
        self.deadlines = deadlines
            .into_iter()
            .filter_map(|(t, i, d)| moved.get(&i).map(|&n| (t, n, d)))
            .collect();
        self.by_trigger.clear();
        for (i, r) in rules.iter().enumerate() {
            self.by_trigger.entry(r.trigger).or_default().push(i);
        }
        self.index = rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.rule.id.clone(), i))
            .collect();
        for (rule, device) in firing {
            if let Some(&i) = self.index.get(rule.as_str()) {
                if hold_of(&self.holds, device, i).is_none() {
                    set_hold(&mut self.holds, device, i, Hold::Firing);
                }
            }
        }
        self.rules = rules;
    }

    /// Whether some rule wants inputs of this trigger.
    pub fn wants(&self, trigger: Trigger) -> bool {
        self.by_trigger.get(&trigger).is_some_and(|r| !r.is_empty())
    }

    pub fn rules(&self) -> usize {
        self.rules.len()
    }

    /// When [`Engine::tick`] must next be called, if a wait is under way.
    pub fn next_deadline(&self) -> Option<TimestampMs> {
        self.deadlines.first().map(|(t, _, _)| *t)
    }

    /// Evaluates every rule of the input's trigger that selects its device, with `now` as
    /// the time (the input's own `at_ms`, in the service and in dry runs).
    pub fn handle(
        &mut self,
        input: &RuleInput,
        now: TimestampMs,
        directory: &mut dyn Directory,
    ) -> Vec<Firing> {
        let trigger = input.kind.trigger();
        let Some(indices) = self.by_trigger.get(&trigger).filter(|r| !r.is_empty()) else {
            return Vec::new();
        };
        let Some(tags) = directory.tags(&input.device) else {
            return Vec::new();
        };
        let started = Instant::now();
        let subject = Subject::new(input, &tags);
        let device = &input.device;
        let mut message: Option<serde_json::Value> = None;
        let mut message = || {
            message
                .get_or_insert_with(|| message_json(input, &tags))
                .clone()
        };
        let mut out = Vec::new();
        let mut cleared_elsewhere = Vec::new();
        let tracing = self.trace.is_some();
        for &i in indices {
            let rule = &self.rules[i];
            if !rule.devices.matches(device, &tags) {
                continue;
            }
            let mut message = || {
                if rule.needs_message || tracing {
                    message()
                } else {
                    serde_json::Value::Null
                }
            };
            let figures = &rule.figures;
            // One evaluation in TIMED_EVERY is timed: two clock reads per evaluation of
            // every rule would cost more than most conditions.
            let timed = figures
                .evaluations
                .load(Ordering::Relaxed)
                .is_multiple_of(TIMED_EVERY)
                .then(Instant::now);
            bump(&figures.evaluations);
            let outcome = match &rule.condition {
                Some(c) => c.test(&subject),
                None => Outcome::True,
            };
            match outcome {
                Outcome::True => {
                    bump(&figures.matches);
                    record(&mut self.trace, rule, device, now, None);
                    match (rule.hold, hold_of(&self.holds, device, i)) {
                        (None, before) => {
                            set_hold(&mut self.holds, device, i, Hold::Firing);
                            let first = before != Some(Hold::Firing);
                            let firing = fire(rule, input, &subject, message(), now, first);
                            cleared_elsewhere.extend(cleared_by(&firing, i, &self.index));
                            out.push(firing);
                        }
                        (Some(hold), before @ (None | Some(Hold::Waiting { .. }))) => {
                            if before.is_none() {
                                set_hold(&mut self.holds, device, i, Hold::Waiting { since: now });
                                self.deadlines
                                    .insert((deadline(now, hold), i, device.clone()));
                            }
                            // It fires with the newest values for which it held.
                            self.waiting_messages.insert(
                                (i, device.clone()),
                                Waiting {
                                    message: message(),
                                    input: input.clone(),
                                    tags: tags.clone(),
                                },
                            );
                        }
                        (Some(_), Some(Hold::Firing)) => {}
                    }
                }
                Outcome::False => {
                    if let Some(hold) = take_hold(&mut self.holds, device, i) {
                        self.waiting_messages.remove(&(i, device.clone()));
                        if let (Hold::Waiting { since }, Some(h)) = (hold, rule.hold) {
                            self.deadlines
                                .remove(&(deadline(since, h), i, device.clone()));
                        }
                        if hold == Hold::Firing && rule.alerts {
                            out.push(Firing {
                                rule: rule.rule.clone(),
                                device: device.clone(),
                                at_ms: now,
                                message: message(),
                                effects: vec![Effect::ClearAlert {
                                    rule: rule.rule.id.clone(),
                                    device: device.clone(),
                                    reason: "condition".into(),
                                }],
                                errors: Vec::new(),
                            });
                        }
                    }
                }
                Outcome::NotApplicable => bump(&figures.not_applicable),
                Outcome::Error(e) => {
                    bump(&figures.condition_errors);
                    record(&mut self.trace, rule, device, now, Some(&e));
                    figures.fail(now, "condition", e);
                }
            }
            if let Some(started) = timed {
                bump(&figures.timed);
                let ns = started.elapsed().as_nanos().min(u64::MAX as u128) as u64;
                figures.timed_ns.store(
                    figures.timed_ns.load(Ordering::Relaxed).saturating_add(ns),
                    Ordering::Relaxed,
                );
            }
        }
        self.forget_cleared(device, cleared_elsewhere);
        self.figures.record_input(started.elapsed());
        out
    }

    /// Another rule cleared these rules' alerts for the device: they are no longer firing
    /// there, so they raise their alert again the next time their condition holds.
    fn forget_cleared(&mut self, device: &DeviceId, rules: Vec<usize>) {
        for i in rules {
            if hold_of(&self.holds, device, i) == Some(Hold::Firing) {
                take_hold(&mut self.holds, device, i);
            }
        }
    }

    /// Fires the waits that have lasted their `for` by `now`.
    pub fn tick(&mut self, now: TimestampMs) -> Vec<Firing> {
        let mut out = Vec::new();
        while let Some((deadline, i, device)) = self.deadlines.first().cloned() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(waiting) = self.waiting_messages.remove(&(i, device.clone())) else {
                continue;
            };
            if !matches!(hold_of(&self.holds, &device, i), Some(Hold::Waiting { .. })) {
                continue;
            }
            set_hold(&mut self.holds, &device, i, Hold::Firing);
            // The scope of the newest input for which the condition held.
            let subject = Subject::new(&waiting.input, &waiting.tags);
            let firing = fire(
                &self.rules[i],
                &waiting.input,
                &subject,
                waiting.message,
                deadline,
                true,
            );
            let cleared = cleared_by(&firing, i, &self.index);
            self.forget_cleared(&device, cleared);
            out.push(firing);
        }
        out
    }
}

/// The other rules whose alerts a firing clears.
fn cleared_by(firing: &Firing, own: usize, index: &HashMap<String, usize>) -> Vec<usize> {
    firing
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::ClearAlert { rule, .. } => index.get(rule).copied(),
            _ => None,
        })
        .filter(|&i| i != own)
        .collect()
}

/// Takes a rule's actions for one input; `first` when the rule was not firing for the
/// device before: only then are its alert raised (it stays up while the rule fires) and a
/// fleet command started (one job per firing, not one per reading).
fn fire(
    rule: &Compiled,
    input: &RuleInput,
    subject: &Subject<'_>,
    message: serde_json::Value,
    now: TimestampMs,
    first: bool,
) -> Firing {
    bump(&rule.figures.fired);
    let device = &input.device;
    let ts = match &input.kind {
        InputKind::Telemetry { ts_ms, .. } => *ts_ms,
        _ => input.at_ms,
    };
    let mut effects = Vec::new();
    let mut errors = Vec::new();
    let mut fail = |kind: &str, e: String| {
        rule.figures.actions_failed.fetch_add(1, Ordering::Relaxed);
        rule.figures.fail(now, kind, e.clone());
        errors.push(format!("{kind}: {e}"));
    };
    for step in &rule.steps {
        match step {
            Step::Command {
                name,
                params,
                devices,
                timeout,
            } => {
                let target = match devices {
                    Some(selector) if first => Target::Devices(selector.clone()),
                    Some(_) => continue,
                    None => Target::Device(device.clone()),
                };
                effects.push(Effect::Command {
                    target,
                    name: name.clone(),
                    params: params.clone(),
                    timeout: *timeout,
                })
            }
            Step::Webhook {
                url,
                headers,
                timeout,
                retries,
            } => effects.push(Effect::Webhook {
                url: url.clone(),
                headers: headers.clone(),
                timeout: *timeout,
                retries: *retries,
                body: serde_json::json!({
                    "rule": rule.rule,
                    "device": device,
                    "at_ms": now,
                    "message": message,
                }),
            }),
            Step::Publish { topic, retain } => effects.push(Effect::Publish {
                topic: topic.replace("{device}", device.as_str()),
                retain: *retain,
                payload: serde_json::json!({
                    "rule": rule.rule,
                    "device": device,
                    "at_ms": now,
                    "message": message,
                }),
            }),
            Step::Metric { name, value } => match value.value(subject) {
                Ok(Some(value)) => effects.push(Effect::Metric {
                    device: device.clone(),
                    name: name.clone(),
                    ts_ms: ts,
                    value,
                }),
                Ok(None) => {}
                Err(e) => fail("metric", e),
            },
            Step::Alert {
                severity,
                message: text,
            } => {
                if first {
                    effects.push(Effect::RaiseAlert {
                        device: device.clone(),
                        severity: *severity,
                        message: text.clone().unwrap_or_else(|| rule.rule.name.clone()),
                        values: message.clone(),
                    })
                }
            }
            Step::ClearAlert { rule: other } => effects.push(Effect::ClearAlert {
                rule: other.clone(),
                device: device.clone(),
                reason: "rule".into(),
            }),
            Step::Function(function) => {
                bump(&rule.figures.function_calls);
                let called = match function.try_borrow_mut() {
                    Ok(mut f) => f.call(&message),
                    Err(_) => Err(FunctionError::Exception("function is busy".into())),
                };
                match called {
                    Ok(output) => {
                        match function_effects(&rule.rule, device, ts, &message, output) {
                            Ok(mut more) => effects.append(&mut more),
                            Err(e) => {
                                bump(&rule.figures.function_errors);
                                fail("function", e)
                            }
                        }
                    }
                    Err(e) => {
                        bump(match e {
                            FunctionError::Timeout(_) | FunctionError::Busy => {
                                &rule.figures.function_timeouts
                            }
                            FunctionError::OutOfMemory(_) => &rule.figures.function_out_of_memory,
                            _ => &rule.figures.function_errors,
                        });
                        fail("function", e.to_string())
                    }
                }
            }
        }
    }
    Firing {
        rule: rule.rule.clone(),
        device: device.clone(),
        at_ms: now,
        message,
        effects,
        errors,
    }
}

/// The effects a function's answer asks for.
fn function_effects(
    rule: &RuleRef,
    device: &DeviceId,
    ts: TimestampMs,
    message: &serde_json::Value,
    output: serde_json::Value,
) -> Result<Vec<Effect>, String> {
    if output.is_null() {
        return Ok(Vec::new());
    }
    let output: FunctionOutput = serde_json::from_value(output)
        .map_err(|e| format!("the function returned an unusable answer: {e}"))?;
    let mut effects = Vec::new();
    for (name, value) in output.metrics {
        if key_is_bad(&name) {
            return Err(format!("metrics: {name:?} is not a metric name"));
        }
        let value = match value {
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(
                    n.as_f64()
                        .filter(|f| f.is_finite())
                        .ok_or_else(|| format!("metrics: {name} is not a finite number"))?,
                ),
            },
            serde_json::Value::String(s) => Value::Text(s),
            _ => return Err(format!("metrics: {name} must be a number, bool or string")),
        };
        effects.push(Effect::Metric {
            device: device.clone(),
            name,
            ts_ms: ts,
            value,
        });
    }
    for c in output.commands {
        if c.name.is_empty() || c.name.len() > 128 {
            return Err("commands: a name of 1 to 128 bytes".into());
        }
        effects.push(Effect::Command {
            target: Target::Device(c.device.unwrap_or_else(|| device.clone())),
            name: c.name,
            params: c.params,
            timeout: c.timeout.unwrap_or(DEFAULT_COMMAND_TIMEOUT),
        });
    }
    if let Some(alert) = output.alert {
        effects.push(Effect::RaiseAlert {
            device: device.clone(),
            severity: alert.severity,
            message: alert.message.unwrap_or_else(|| rule.name.clone()),
            values: message.clone(),
        });
    }
    if output.clear_alert {
        effects.push(Effect::ClearAlert {
            rule: rule.id.clone(),
            device: device.clone(),
            reason: "function".into(),
        });
    }
    Ok(effects)
}

/// The message as actions see it: the scope, as JSON.
pub fn message_json(input: &RuleInput, tags: &BTreeMap<String, String>) -> serde_json::Value {
    let mut m = serde_json::json!({
        "device": {"id": input.device, "tags": tags},
        "trigger": input.kind.trigger().as_str(),
        "at": input.at_ms,
    });
    let fields = match &input.kind {
        InputKind::Telemetry { ts_ms, metrics } => serde_json::json!({
            "ts": ts_ms,
            "metrics": metrics.iter().map(|(k, v)| (k.clone(), value_json(v))).collect::<serde_json::Map<_, _>>(),
        }),
        InputKind::State { reported, patch } => {
            serde_json::json!({"state": reported, "patch": patch})
        }
        InputKind::Presence { online, reason } => {
            serde_json::json!({"online": online, "reason": reason.as_deref().unwrap_or("")})
        }
        InputKind::Event { name, payload } => {
            serde_json::json!({"event": name, "payload": payload})
        }
    };
    if let (Some(m), serde_json::Value::Object(f)) = (m.as_object_mut(), fields) {
        m.extend(f);
    }
    m
}

fn value_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Int(i) => serde_json::Value::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Value::Text(s) => serde_json::Value::String(s.clone()),
    }
}

#[cfg(test)]
mod tests {
    use tellus_core::RuleSpec;

    use super::*;

    struct Fleet(HashMap<DeviceId, Tags>);

    impl Directory for Fleet {
        fn tags(&mut self, device: &DeviceId) -> Option<Tags> {
            self.0.get(device).cloned()
        }
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    fn fleet() -> Fleet {
        let mut f = HashMap::new();
        f.insert(
            id("d1"),
            Arc::new([("site".to_string(), "a".to_string())].into()),
        );
        f.insert(
            id("d2"),
            Arc::new([("site".to_string(), "b".to_string())].into()),
        );
        Fleet(f)
    }

    fn rule(id: &str, spec: serde_json::Value) -> Rule {
        Rule {
            id: id.into(),
            spec: serde_json::from_value::<RuleSpec>(spec).unwrap(),
            enabled: true,
            version: 1,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn engine(rules: &[Rule]) -> Engine {
        let figures = Arc::new(Figures::default());
        let mut e = Engine::new(figures.clone());
        let compiled = rules
            .iter()
            .map(|r| Compiled::new(r, figures.rule(&r.id)).unwrap())
            .collect();
        e.load(compiled, &[]);
        e
    }

    fn temp(device: &str, at: TimestampMs, t: f64) -> RuleInput {
        RuleInput {
            device: id(device),
            at_ms: at,
            kind: InputKind::Telemetry {
                ts_ms: at,
                metrics: vec![("temp".into(), Value::Float(t))],
            },
        }
    }

    fn kinds(firings: &[Firing]) -> Vec<&'static str> {
        firings
            .iter()
            .flat_map(|f| f.effects.iter())
            .map(|e| match e {
                Effect::Command { .. } => "command",
                Effect::Webhook { .. } => "webhook",
                Effect::Publish { .. } => "publish",
                Effect::Metric { .. } => "metric",
                Effect::RaiseAlert { .. } => "raise",
                Effect::ClearAlert { .. } => "clear",
            })
            .collect()
    }

    fn hot() -> Rule {
        rule(
            "r-hot",
            serde_json::json!({
                "name": "hot", "trigger": "telemetry", "condition": "metrics.temp > 30.0",
                "devices": {"tags": {"site": "a"}},
                "actions": [
                    {"type": "alert", "severity": "critical"},
                    {"type": "command", "name": "fan", "params": {"on": true}},
                    {"type": "metric", "name": "temp_f", "value": "metrics.temp * 1.8 + 32.0"}
                ]
            }),
        )
    }

    #[test]
    fn without_for_every_match_fires_and_the_end_clears_the_alert() {
        let mut e = engine(&[hot()]);
        let mut f = fleet();
        let fired = e.handle(&temp("d1", 1, 35.0), 1, &mut f);
        assert_eq!(kinds(&fired), ["raise", "command", "metric"]);
        let Effect::Metric { value, ts_ms, .. } = &fired[0].effects[2] else {
            panic!()
        };
        assert_eq!((value, *ts_ms), (&Value::Float(95.0), 1));
        let Effect::RaiseAlert {
            severity,
            values,
            message,
            ..
        } = &fired[0].effects[0]
        else {
            panic!()
        };
        assert_eq!(*severity, Severity::Critical);
        assert_eq!(message, "hot");
        assert_eq!(values["metrics"]["temp"], 35.0);
        assert_eq!(values["device"]["tags"]["site"], "a");
        // Again: fires again, but the alert is up already.
        assert_eq!(
            kinds(&e.handle(&temp("d1", 2, 36.0), 2, &mut f)),
            ["command", "metric"]
        );
        // Another site: not selected. An unknown device: not evaluated.
        assert!(e.handle(&temp("d2", 3, 99.0), 3, &mut f).is_empty());
        assert!(e.handle(&temp("ghost", 3, 99.0), 3, &mut f).is_empty());
        // A reading without temp changes nothing.
        let hum = RuleInput {
            device: id("d1"),
            at_ms: 4,
            kind: InputKind::Telemetry {
                ts_ms: 4,
                metrics: vec![("hum".into(), Value::Float(1.0))],
            },
        };
        assert!(e.handle(&hum, 4, &mut f).is_empty());
        // Cool: the alert clears, once.
        assert_eq!(kinds(&e.handle(&temp("d1", 5, 20.0), 5, &mut f)), ["clear"]);
        assert!(e.handle(&temp("d1", 6, 20.0), 6, &mut f).is_empty());
        let figures = e.figures().get("r-hot").unwrap();
        assert_eq!(
            (
                figures.evaluations,
                figures.matches,
                figures.not_applicable,
                figures.fired
            ),
            (5, 2, 1, 2)
        );
    }

    #[test]
    fn with_for_it_fires_once_the_condition_held_long_enough() {
        let mut r = hot();
        r.spec.hold = Some(Duration::from_secs(5));
        let mut e = engine(&[r]);
        let mut f = fleet();
        assert!(e.handle(&temp("d1", 0, 35.0), 0, &mut f).is_empty());
        assert_eq!(e.next_deadline(), Some(5_000));
        assert!(e.tick(4_999).is_empty());
        assert!(e.handle(&temp("d1", 3_000, 40.0), 3_000, &mut f).is_empty());
        let fired = e.tick(5_000);
        assert_eq!(kinds(&fired), ["raise", "command", "metric"]);
        // It fires with the newest values.
        assert_eq!(fired[0].message["metrics"]["temp"], 40.0);
        assert_eq!(fired[0].at_ms, 5_000);
        assert_eq!(e.next_deadline(), None);
        // Still holding: nothing more.
        assert!(e.handle(&temp("d1", 6_000, 41.0), 6_000, &mut f).is_empty());
        assert!(e.tick(100_000).is_empty());
        // Stops holding: cleared.
        assert_eq!(
            kinds(&e.handle(&temp("d1", 7_000, 20.0), 7_000, &mut f)),
            ["clear"]
        );
        // Holds again, but not for long enough: nothing, and the wait is gone.
        assert!(e.handle(&temp("d1", 8_000, 35.0), 8_000, &mut f).is_empty());
        assert!(e.handle(&temp("d1", 9_000, 20.0), 9_000, &mut f).is_empty());
        assert_eq!(e.next_deadline(), None);
        assert!(e.tick(20_000).is_empty());
    }

    #[test]
    fn reloading_keeps_unchanged_rules_where_they_stood() {
        let mut r = hot();
        r.spec.hold = Some(Duration::from_secs(5));
        let figures = Arc::new(Figures::default());
        let mut e = Engine::new(figures.clone());
        let load = |e: &mut Engine, rules: &[Rule], firing: &[(String, DeviceId)]| {
            let compiled = rules
                .iter()
                .map(|r| Compiled::new(r, figures.rule(&r.id)).unwrap())
                .collect();
            e.load(compiled, firing);
        };
        let other = rule(
            "r-other",
            serde_json::json!({"name": "o", "trigger": "presence", "actions": [{"type": "alert"}]}),
        );
        load(&mut e, &[r.clone()], &[]);
        let mut f = fleet();
        e.handle(&temp("d1", 0, 35.0), 0, &mut f);
        // Another rule added in front: the wait survives.
        load(&mut e, &[other.clone(), r.clone()], &[]);
        assert_eq!(kinds(&e.tick(5_000)), ["raise", "command", "metric"]);
        // The rule changed: it starts over.
        e.handle(&temp("d1", 6_000, 20.0), 6_000, &mut f);
        e.handle(&temp("d1", 7_000, 35.0), 7_000, &mut f);
        let mut changed = r.clone();
        changed.version = 2;
        load(&mut e, &[changed.clone()], &[]);
        assert!(e.tick(20_000).is_empty());
        // An open alert from before a restart counts as firing: the end of the condition
        // clears it.
        let mut e = Engine::new(figures.clone());
        load(&mut e, &[changed], &[("r-hot".into(), id("d1"))]);
        assert_eq!(kinds(&e.handle(&temp("d1", 1, 20.0), 1, &mut f)), ["clear"]);
        assert!(!e.wants(Trigger::State));
        assert!(e.wants(Trigger::Telemetry));
    }

    #[test]
    fn a_fleet_command_starts_once_per_firing_and_another_rules_clear_resets_its_alert() {
        let fleet_rule = rule(
            "r-fleet",
            serde_json::json!({"name": "f", "trigger": "telemetry", "condition": "metrics.temp > 30.0",
                "actions": [{"type": "command", "name": "shed", "devices": {"tags": {"site": "b"}}},
                            {"type": "command", "name": "fan"}]}),
        );
        let clearer = rule(
            "r-clear",
            serde_json::json!({"name": "c", "trigger": "telemetry", "condition": "has(metrics.reset)",
                "actions": [{"type": "clear_alert", "rule": "r-hot"}]}),
        );
        let mut e = engine(&[fleet_rule, hot(), clearer]);
        let mut f = fleet();
        let fired = e.handle(&temp("d1", 1, 35.0), 1, &mut f);
        let commands = |fired: &[Firing]| -> Vec<String> {
            fired
                .iter()
                .flat_map(|f| &f.effects)
                .filter_map(|e| match e {
                    Effect::Command { name, target, .. } => Some(format!(
                        "{name}@{}",
                        match target {
                            Target::Device(d) => d.to_string(),
                            Target::Devices(_) => "fleet".into(),
                        }
                    )),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(commands(&fired), ["shed@fleet", "fan@d1", "fan@d1"]);
        // Still hot: the device's own command again, not another fleet job.
        let fired = e.handle(&temp("d1", 2, 36.0), 2, &mut f);
        assert_eq!(commands(&fired), ["fan@d1", "fan@d1"]);
        assert!(!kinds(&fired).contains(&"raise"));
        // Another rule clears r-hot's alert (on a reading r-hot does not apply to): r-hot
        // raises it again the next time it holds.
        let reset = RuleInput {
            device: id("d1"),
            at_ms: 3,
            kind: InputKind::Telemetry {
                ts_ms: 3,
                metrics: vec![("reset".into(), Value::Bool(true))],
            },
        };
        let fired = e.handle(&reset, 3, &mut f);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].rule.id, "r-clear");
        assert_eq!(kinds(&fired), ["clear"]);
        let fired = e.handle(&temp("d1", 4, 35.0), 4, &mut f);
        assert_eq!(kinds(&fired).iter().filter(|k| **k == "raise").count(), 1);
    }

    #[test]
    fn reloading_compiles_only_the_rules_that_changed() {
        let figures = Arc::new(Figures::default());
        let mut e = Engine::new(figures.clone());
        let mut compiled = Vec::new();
        let mut compile = |r: &Rule| {
            compiled.push(r.id.clone());
            Compiled::new(r, figures.rule(&r.id)).ok()
        };
        let (a, mut b) = (hot(), hot());
        b.id = "r-other".into();
        e.reload(&[a.clone(), b.clone()], &mut compile, &[]);
        e.reload(&[a.clone(), b.clone()], &mut compile, &[]);
        b.version = 2;
        e.reload(&[b.clone(), a.clone()], &mut compile, &[]);
        assert_eq!(compiled, ["r-hot", "r-other", "r-other"]);
        assert_eq!(e.rules(), 2);
        assert_eq!(
            kinds(&e.handle(&temp("d1", 1, 35.0), 1, &mut fleet())).len(),
            6
        );
    }

    #[test]
    fn errors_are_counted_with_the_last_text() {
        let r = rule(
            "r-bad",
            serde_json::json!({"name": "b", "trigger": "telemetry", "condition": "metrics.temp > 'x'",
                "actions": [{"type": "alert"}]}),
        );
        let m = rule(
            "r-metric",
            serde_json::json!({"name": "m", "trigger": "telemetry",
                "actions": [{"type": "metric", "name": "x", "value": "metrics.temp / 0.0"}]}),
        );
        let mut e = engine(&[r, m]);
        let fired = e.handle(&temp("d1", 7, 35.0), 7, &mut fleet());
        assert_eq!(fired.len(), 1);
        assert!(fired[0].effects.is_empty());
        assert!(
            fired[0].errors[0].starts_with("metric: "),
            "{:?}",
            fired[0].errors
        );
        let bad = e.figures().get("r-bad").unwrap();
        assert_eq!(bad.condition_errors, 1);
        let last = &bad.recent_errors[0];
        assert_eq!((last.at_ms, last.kind.as_str()), (7, "condition"));
        let m = e.figures().get("r-metric").unwrap();
        assert_eq!(
            (m.actions_failed, m.recent_errors[0].kind.as_str()),
            (1, "metric")
        );
    }

    #[test]
    fn compiling_says_what_is_wrong() {
        let bad = |spec: serde_json::Value| {
            Compiled::new(&rule("r", spec), Arc::default())
                .err()
                .unwrap()
        };
        let e = bad(serde_json::json!({"name": "x", "trigger": "telemetry", "actions": []}));
        assert!(e.contains("at least one"), "{e}");
        let e = bad(
            serde_json::json!({"name": "x", "trigger": "telemetry", "condition": "metrics.",
            "actions": [{"type": "alert"}]}),
        );
        assert!(e.starts_with("condition: "), "{e}");
        let e = bad(serde_json::json!({"name": "x", "trigger": "telemetry",
            "actions": [{"type": "alert"}, {"type": "webhook", "url": "ftp://x"}]}));
        assert!(e.starts_with("actions[1] (webhook): url"), "{e}");
        let e = bad(serde_json::json!({"name": "x", "trigger": "telemetry",
            "actions": [{"type": "publish", "topic": "devices/x/commands/y"}]}));
        assert!(e.contains("under rules/"), "{e}");
        let e = bad(serde_json::json!({"name": "x", "trigger": "telemetry",
            "actions": [{"type": "function", "source": "function nope() {}"}]}));
        assert!(e.starts_with("actions[0] (function): "), "{e}");
        let e = bad(serde_json::json!({"name": "x", "trigger": "telemetry",
            "actions": [{"type": "metric", "name": "a..b", "value": "1"}]}));
        assert!(e.contains("not a metric name"), "{e}");
    }

    #[test]
    fn a_function_says_what_to_do() {
        let r = rule(
            "r-fn",
            serde_json::json!({"name": "fn", "trigger": "telemetry", "actions": [{"type": "function", "source": r#"
                function handle(m) {
                    if (m.metrics.temp > 50) throw new Error("way too hot");
                    if (m.metrics.temp > 30) return {
                        metrics: {temp_k: m.metrics.temp + 273.15, hot: true},
                        commands: [{name: "fan", params: {speed: 2}}, {name: "log", device: "d2"}],
                        alert: {severity: "info", message: "warm " + m.device.id},
                    };
                    if (m.metrics.temp < 0) return {nonsense: 1};
                    return {clear_alert: true};
                }"#}]}),
        );
        let mut e = engine(&[r]);
        let mut f = fleet();
        let fired = e.handle(&temp("d1", 10, 35.0), 10, &mut f);
        assert_eq!(
            kinds(&fired),
            ["metric", "metric", "command", "command", "raise"]
        );
        assert!(fired[0].effects.contains(&Effect::Metric {
            device: id("d1"),
            name: "temp_k".into(),
            ts_ms: 10,
            value: Value::Float(35.0 + 273.15),
        }));
        assert!(fired[0].effects.contains(&Effect::Command {
            target: Target::Device(id("d2")),
            name: "log".into(),
            params: serde_json::Value::Null,
            timeout: DEFAULT_COMMAND_TIMEOUT,
        }));
        assert!(fired[0].effects.contains(&Effect::RaiseAlert {
            device: id("d1"),
            severity: Severity::Info,
            message: "warm d1".into(),
            values: fired[0].message.clone(),
        }));
        assert_eq!(
            kinds(&e.handle(&temp("d1", 11, 20.0), 11, &mut f)),
            ["clear"]
        );
        let fired = e.handle(&temp("d1", 12, 60.0), 12, &mut f);
        assert!(
            fired[0].errors[0].contains("way too hot"),
            "{:?}",
            fired[0].errors
        );
        let fired = e.handle(&temp("d1", 13, -5.0), 13, &mut f);
        assert!(
            fired[0].errors[0].contains("nonsense"),
            "{:?}",
            fired[0].errors
        );
        let figures = e.figures().get("r-fn").unwrap();
        assert_eq!((figures.function_calls, figures.function_errors), (4, 2));
    }
}
