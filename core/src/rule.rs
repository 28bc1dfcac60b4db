//! Rules and alerts as data: what an operator writes (`RuleSpec`), what the registry keeps
//! (`Rule`, `Alert`), with no evaluation here (that is the `rules` crate).
//!
//! A rule watches one kind of thing happening to devices ([`Trigger`]), for the devices its
//! [`DeviceSelector`] picks, tests a CEL condition, optionally waits until the condition has
//! held for a while (`for`), and then takes its [`Action`]s.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{DeviceId, TimestampMs};

/// What stands in for a secret a caller may not see.
pub const HIDDEN: &str = "(hidden)";

/// A webhook URL as a caller who may not see its secrets sees it: scheme, host and port.
/// The user information always is a secret, and a path or query often is (a chat service's
/// webhook URL is its own credential), so they are [`HIDDEN`].
pub fn hide_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return HIDDEN.into();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if end == rest.len() {
        format!("{scheme}://{host}")
    } else {
        format!("{scheme}://{host}/{HIDDEN}")
    }
}

/// Hides a webhook's URL beyond its host, and every value of its headers.
pub fn hide_webhook_secrets(url: &mut String, headers: &mut BTreeMap<String, String>) {
    *url = hide_url(url);
    headers.values_mut().for_each(|v| *v = HIDDEN.into());
}

/// What a rule reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// Each committed telemetry message: `metrics` in scope.
    Telemetry,
    /// Each change of reported state: `state` (the whole reported document) and `patch`.
    State,
    /// A device going online or offline: `online` and `reason`.
    Presence,
    /// A message a device publishes on `devices/{id}/events/{name}`: `event` and `payload`.
    Event,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Telemetry => "telemetry",
            Trigger::State => "state",
            Trigger::Presence => "presence",
            Trigger::Event => "event",
        }
    }
}

/// Which devices a rule (or a command action) concerns. Empty: every device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default, deny_unknown_fields)]
pub struct DeviceSelector {
    /// These devices only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<DeviceId>,
    /// Devices carrying every one of these tags.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

impl DeviceSelector {
    /// Whether a device with this id and these tags is selected: it must be named (when ids
    /// are given) and carry every tag (when tags are given).
    pub fn matches(&self, id: &DeviceId, tags: &BTreeMap<String, String>) -> bool {
        (self.ids.is_empty() || self.ids.contains(id))
            && self.tags.iter().all(|(k, v)| tags.get(k) == Some(v))
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.tags.is_empty()
    }
}

/// How serious an alert is.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    #[default]
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "info" => Some(Severity::Info),
            "warning" => Some(Severity::Warning),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

/// Something a rule does when it fires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Send a command: to the device that fired the rule, or to every device `devices`
    /// selects.
    Command {
        name: String,
        #[serde(default)]
        params: serde_json::Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        devices: Option<DeviceSelector>,
        #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "30s"))]
        #[serde(
            default,
            with = "humantime_serde",
            skip_serializing_if = "Option::is_none"
        )]
        timeout: Option<Duration>,
    },
    /// POST a JSON body (the rule, the device, the message) to a URL.
    Webhook {
        url: String,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
        /// Per attempt; default 5 s.
        #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "30s"))]
        #[serde(
            default,
            with = "humantime_serde",
            skip_serializing_if = "Option::is_none"
        )]
        timeout: Option<Duration>,
        /// Attempts after the first; default 3.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retries: Option<u32>,
    },
    /// Publish the rule's firing as JSON on an MQTT topic under `rules/`, for operator clients.
    Publish {
        topic: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        retain: bool,
    },
    /// Write a derived metric of the device back to the store: `value` is a CEL expression.
    Metric { name: String, value: String },
    /// Raise this rule's alert for the device (one open alert per rule and device); it is
    /// cleared when the condition stops holding.
    Alert {
        #[serde(default)]
        severity: Severity,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// Clear the open alert another rule (by id) raised for the device.
    ClearAlert { rule: String },
    /// Run a JavaScript function `handle(message)`; what it returns says what to do.
    Function {
        source: String,
        /// Per call; default 50 ms.
        #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "30s"))]
        #[serde(
            default,
            with = "humantime_serde",
            skip_serializing_if = "Option::is_none"
        )]
        timeout: Option<Duration>,
        /// The sandbox's heap; default 16 MiB.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory_limit_bytes: Option<usize>,
    },
}

impl RuleSpec {
    /// Hides what its actions hold that only an admin may see: webhook URLs beyond the host
    /// and header values (they carry credentials).
    pub fn hide_secrets(&mut self) {
        for action in &mut self.actions {
            if let Action::Webhook { url, headers, .. } = action {
                hide_webhook_secrets(url, headers);
            }
        }
    }
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Command { .. } => "command",
            Action::Webhook { .. } => "webhook",
            Action::Publish { .. } => "publish",
            Action::Metric { .. } => "metric",
            Action::Alert { .. } => "alert",
            Action::ClearAlert { .. } => "clear_alert",
            Action::Function { .. } => "function",
        }
    }
}

/// A rule as an operator writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub trigger: Trigger,
    #[serde(default, skip_serializing_if = "DeviceSelector::is_empty")]
    pub devices: DeviceSelector,
    /// CEL; empty: always true.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub condition: String,
    /// How long the condition must hold before the rule fires.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "1m"))]
    #[serde(
        default,
        rename = "for",
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub hold: Option<Duration>,
    pub actions: Vec<Action>,
}

/// A stored rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Rule {
    /// `r-` and 20 hex digits ([`new_rule_id`]).
    pub id: String,
    #[serde(flatten)]
    pub spec: RuleSpec,
    pub enabled: bool,
    /// Starts at 1; each change adds one.
    pub version: u64,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub created_at_ms: TimestampMs,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub updated_at_ms: TimestampMs,
}

/// A new rule id: `r-` and 20 random hex digits.
pub fn new_rule_id() -> String {
    let bytes: [u8; 10] = rand::random();
    format!("r-{}", hex::encode(bytes))
}

/// Where an alert is in its life: active → acknowledged → cleared (or active → cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AlertStatus {
    Active,
    Acknowledged,
    Cleared,
}

impl AlertStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertStatus::Active => "active",
            AlertStatus::Acknowledged => "acknowledged",
            AlertStatus::Cleared => "cleared",
        }
    }

    pub fn parse(s: &str) -> Option<AlertStatus> {
        match s {
            "active" => Some(AlertStatus::Active),
            "acknowledged" => Some(AlertStatus::Acknowledged),
            "cleared" => Some(AlertStatus::Cleared),
            _ => None,
        }
    }

    /// Not cleared: the one alert of its rule and device that may be raised again.
    pub fn is_open(self) -> bool {
        self != AlertStatus::Cleared
    }
}

/// An alert a rule raised for a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Alert {
    /// `a-` and 20 hex digits.
    pub id: String,
    pub rule: String,
    pub device: DeviceId,
    pub severity: Severity,
    pub status: AlertStatus,
    pub message: String,
    /// What raised it: the message's values (e.g. `{"metrics": {"temp": 81.5}}`).
    pub values: serde_json::Value,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub raised_at_ms: TimestampMs,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<i64>))]
    pub acknowledged_at_ms: Option<TimestampMs>,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<i64>))]
    pub cleared_at_ms: Option<TimestampMs>,
    /// Why it was cleared: `condition` (stopped holding), `rule` (another rule cleared it),
    /// `rule_deleted`, `rule_disabled` or `function`.
    pub cleared_reason: Option<String>,
}

/// What raises an alert: the rule (and, when known, the version of it that fired), the
/// device, and what the alert says.
#[derive(Debug, Clone, Copy)]
pub struct Raise<'a> {
    pub rule: &'a str,
    pub version: Option<u64>,
    pub device: &'a DeviceId,
    pub severity: Severity,
    pub message: &'a str,
    pub values: &'a serde_json::Value,
}

/// A new alert id: `a-` and 20 random hex digits.
pub fn new_alert_id() -> String {
    let bytes: [u8; 10] = rand::random();
    format!("a-{}", hex::encode(bytes))
}

/// Which alerts to list.
#[derive(Debug, Clone, Default)]
pub struct AlertQuery<'a> {
    pub status: Option<AlertStatus>,
    /// Only open ones (active or acknowledged); `status` wins when both are given.
    pub open: bool,
    pub device: Option<&'a DeviceId>,
    pub rule: Option<&'a str>,
    /// Paging: alerts after this id in the list's order (newest first).
    pub after: Option<&'a str>,
    pub limit: usize,
}

/// Something that happened to a device, as rules see it.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleInput {
    pub device: DeviceId,
    /// When Tellus learnt of it (server clock): what `for` durations are measured in.
    pub at_ms: TimestampMs,
    pub kind: InputKind,
}

/// What happened, by [`Trigger`].
#[derive(Debug, Clone, PartialEq)]
pub enum InputKind {
    /// The metrics of one reading: what one device reported for one timestamp, committed.
    Telemetry {
        ts_ms: TimestampMs,
        metrics: Vec<(String, crate::Value)>,
    },
    /// Reported state changed: the whole document after the change, and the change.
    State {
        reported: serde_json::Value,
        patch: serde_json::Value,
    },
    /// The device's connection opened or ended.
    Presence {
        online: bool,
        reason: Option<String>,
    },
    /// The device published on `events/{name}`; the payload as JSON, or as a JSON string
    /// when it is not JSON.
    Event {
        name: String,
        payload: serde_json::Value,
    },
}

impl InputKind {
    pub fn trigger(&self) -> Trigger {
        match self {
            InputKind::Telemetry { .. } => Trigger::Telemetry,
            InputKind::State { .. } => Trigger::State,
            InputKind::Presence { .. } => Trigger::Presence,
            InputKind::Event { .. } => Trigger::Event,
        }
    }
}

impl RuleInput {
    /// About how many bytes the input holds: what it costs in the feed's byte budget.
    pub fn size(&self) -> usize {
        64 + match &self.kind {
            InputKind::Telemetry { metrics, .. } => metrics
                .iter()
                .map(|(k, v)| {
                    32 + k.len()
                        + match v {
                            crate::Value::Text(s) => s.len(),
                            _ => 8,
                        }
                })
                .sum(),
            InputKind::State { reported, patch } => json_size(reported) + json_size(patch),
            InputKind::Presence { reason, .. } => reason.as_ref().map_or(0, String::len),
            InputKind::Event { name, payload } => name.len() + json_size(payload),
        }
    }
}

/// About how many bytes a JSON value holds in memory.
fn json_size(v: &serde_json::Value) -> usize {
    32 + match v {
        serde_json::Value::String(s) => s.len(),
        serde_json::Value::Array(items) => items.iter().map(json_size).sum(),
        serde_json::Value::Object(o) => o.iter().map(|(k, v)| k.len() + json_size(v)).sum(),
        _ => 0,
    }
}

/// Inputs waiting for the rules engine before whoever sends waits.
pub const RULE_FEED_QUEUE: usize = 16_384;
/// Bytes of inputs waiting for the rules engine before whoever sends waits (event payloads
/// and state documents can be large).
pub const RULE_FEED_BYTES: usize = 64 << 20;

/// The way into the rules engine: a bounded channel, in inputs and in bytes, whose senders
/// wait when it is full (backpressure: ingest acknowledges telemetry only once its readings
/// are handed over, so a reading is never dropped between the store and the rules), and a
/// switch per trigger that the engine sets while some enabled rule wants that trigger, so
/// that senders build nothing nobody evaluates.
#[derive(Debug, Clone)]
pub struct RuleFeed {
    tx: Option<tokio::sync::mpsc::Sender<(Vec<RuleInput>, u32)>>,
    bytes: std::sync::Arc<tokio::sync::Semaphore>,
    /// The most bytes one hand-over is charged: the whole budget (a larger input waits for an
    /// empty queue, and then goes).
    max_charge: u32,
    wanted: std::sync::Arc<[std::sync::atomic::AtomicBool; 4]>,
}

/// The engine's end of a [`RuleFeed`].
#[derive(Debug)]
pub struct RuleInputs {
    rx: tokio::sync::mpsc::Receiver<(Vec<RuleInput>, u32)>,
    bytes: std::sync::Arc<tokio::sync::Semaphore>,
}

impl RuleInputs {
    /// The next inputs handed over together (a commit's readings, say); `None` once every
    /// sender is gone (or the feed was closed) and the queue is empty.
    pub async fn recv(&mut self) -> Option<Vec<RuleInput>> {
        let (inputs, charge) = self.rx.recv().await?;
        self.bytes.add_permits(charge as usize);
        Some(inputs)
    }

    /// The next inputs if some wait.
    pub fn try_recv(&mut self) -> Option<Vec<RuleInput>> {
        let (inputs, charge) = self.rx.try_recv().ok()?;
        self.bytes.add_permits(charge as usize);
        Some(inputs)
    }

    /// Refuses new inputs; those queued can still be received.
    pub fn close(&mut self) {
        self.rx.close();
        // Senders waiting for bytes give up too.
        self.bytes.close();
    }
}

impl Drop for RuleInputs {
    /// An engine gone (stopped or failed) must not leave senders waiting for bytes that
    /// queued inputs will never give back.
    fn drop(&mut self) {
        self.bytes.close();
    }
}

impl RuleFeed {
    /// A feed of at most `capacity` hand-overs and about `bytes` bytes, and the receiving
    /// end the engine reads.
    pub fn channel(capacity: usize, bytes: usize) -> (RuleFeed, RuleInputs) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        let max_charge =
            u32::try_from(bytes.clamp(1, tokio::sync::Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        let bytes = std::sync::Arc::new(tokio::sync::Semaphore::new(max_charge as usize));
        (
            RuleFeed {
                tx: Some(tx),
                bytes: bytes.clone(),
                max_charge,
                wanted: Default::default(),
            },
            RuleInputs { rx, bytes },
        )
    }

    /// A feed that goes nowhere (no rules engine).
    pub fn none() -> RuleFeed {
        RuleFeed {
            tx: None,
            bytes: std::sync::Arc::new(tokio::sync::Semaphore::new(0)),
            max_charge: 0,
            wanted: Default::default(),
        }
    }

    /// The switches alone, without a sender: for the engine, which must not keep its own
    /// feed open (the feed closes, and the engine stops, when the last sender is gone).
    pub fn switches(&self) -> RuleFeed {
        RuleFeed {
            tx: None,
            bytes: self.bytes.clone(),
            max_charge: 0,
            wanted: self.wanted.clone(),
        }
    }

    /// How full the feed is: hand-overs queued for the engine, and their bytes. A feed that
    /// goes nowhere, and the switches alone, read as empty.
    pub fn gauge(&self) -> crate::QueueGauge {
        match &self.tx {
            Some(tx) => {
                crate::QueueGauge::of(tx).with_bytes(self.bytes.clone(), self.max_charge as usize)
            }
            None => crate::QueueGauge::default(),
        }
    }

    fn slot(trigger: Trigger) -> usize {
        match trigger {
            Trigger::Telemetry => 0,
            Trigger::State => 1,
            Trigger::Presence => 2,
            Trigger::Event => 3,
        }
    }

    /// Whether some enabled rule wants inputs of this trigger.
    pub fn wants(&self, trigger: Trigger) -> bool {
        self.wanted[Self::slot(trigger)].load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Set by the engine whenever its rules change.
    pub fn set_wanted(&self, trigger: Trigger, wanted: bool) {
        self.wanted[Self::slot(trigger)].store(wanted, std::sync::atomic::Ordering::Relaxed);
    }

    fn charge(&self, inputs: &[RuleInput]) -> u32 {
        u32::try_from(inputs.iter().map(RuleInput::size).sum::<usize>())
            .unwrap_or(u32::MAX)
            .min(self.max_charge)
    }

    /// Hands an input over, waiting while the queue is full; from async code.
    pub async fn send(&self, input: RuleInput) {
        let Some(tx) = &self.tx else { return };
        let inputs = vec![input];
        let charge = self.charge(&inputs);
        // Closed (the engine is stopping): nothing left to evaluate.
        let Ok(permit) = self.bytes.acquire_many(charge).await else {
            return;
        };
        // The bytes go back with the permit if this is given up before the send is done
        // (a session closing while it waits); once sent, the receiver gives them back.
        if tx.send((inputs, charge)).await.is_ok() {
            permit.forget();
        }
    }

    /// Hands inputs over together (one wake-up of the engine for all), waiting while the
    /// queue is full; from a thread outside tokio.
    pub fn blocking_send(&self, inputs: Vec<RuleInput>) {
        let Some(tx) = &self.tx else { return };
        if inputs.is_empty() {
            return;
        }
        let charge = self.charge(&inputs);
        let Ok(permit) = futures::executor::block_on(self.bytes.acquire_many(charge)) else {
            return;
        };
        if tx.blocking_send((inputs, charge)).is_ok() {
            permit.forget();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn hidden_urls_keep_only_scheme_and_host() {
        assert_eq!(
            hide_url("https://hooks.example.com/services/T0/B0/secret"),
            "https://hooks.example.com/(hidden)"
        );
        assert_eq!(
            hide_url("https://user:pw@example.com:8443?key=s"),
            "https://example.com:8443/(hidden)"
        );
        assert_eq!(hide_url("http://example.com"), "http://example.com");
        assert_eq!(hide_url("not a url"), HIDDEN);
        assert_eq!(hide_url("https://ex.com/pfad/ü"), "https://ex.com/(hidden)");
    }

    fn event(bytes: usize) -> RuleInput {
        RuleInput {
            device: DeviceId::parse("d").unwrap(),
            at_ms: 0,
            kind: InputKind::Event {
                name: "e".into(),
                payload: serde_json::Value::String("x".repeat(bytes)),
            },
        }
    }

    #[test]
    fn bytes_come_back_from_a_send_given_up_and_a_gone_engine_frees_its_senders() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let (feed, mut inputs) = RuleFeed::channel(1, 10_000);
        runtime.block_on(async {
            feed.send(event(100)).await;
            // The channel is full: this send waits, holding its bytes, and is given up.
            let given_up =
                tokio::time::timeout(Duration::from_millis(50), feed.send(event(5_000))).await;
            assert!(given_up.is_err());
            assert!(inputs.try_recv().is_some());
            // Its bytes came back: nearly the whole budget can be sent.
            tokio::time::timeout(Duration::from_secs(5), feed.send(event(9_000)))
                .await
                .expect("the given-up send kept its bytes");
        });
        // The engine is gone with an input still queued: a sender that needs more bytes
        // than are free returns instead of waiting for ever.
        drop(inputs);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            feed.blocking_send(vec![event(9_500)]);
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(5))
            .expect("blocking_send waited for an engine that is gone");
    }
}
