//! The device service: what Tellus keeps of devices beyond their identity, from what the
//! gate sees of each one ([`DeviceEvent`]): commands, desired and reported state, presence.
//!
//! **Commands.** A command is created `queued`. It is sent (published at QoS 1 on
//! `devices/{id}/commands/{command_id}`) as soon as its device is connected and subscribed
//! to its command topic, at once if it is then, else when the gate reports the device's
//! subscription (after a reconnect, or a restart of Tellus: the registry keeps it). The
//! gate reports the device's PUBACK of that publish (`delivered`) and hands over the result
//! the device publishes (`succeeded` or `failed`), which is recorded before the device's
//! publish is acknowledged. A command sent but not delivered when the device goes away is
//! sent again on its next subscription; one whose timeout passes first ends `expired`. A
//! device may so receive a command more than once, and should act once per command id.
//! Every change of a command is broadcast ([`Devices::watch`]): the synchronous API call
//! waits on it, and so will the live stream.
//!
//! **State.** The desired state (a JSON object, changed by merge patches with a version) is
//! published retained on `devices/{id}/state/desired` when it changes, and again when the
//! device subscribes (the routing core forgets retained messages when Tellus stops); the
//! device's merge patches on `devices/{id}/state/reported` are recorded before they are
//! acknowledged, and one that is not a JSON object is refused with the reason.
//!
//! **Presence.** Every connection the gate admits and how it ended (the registry's
//! sessions, written in one transaction per batch of events), from which the API answers
//! whether a device is online, since when, and its connection history.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use tellus_core::{
    command::new_command_id,
    now_ms,
    state::{self, DeviceState},
    topic::DeviceTopic,
    Command, CommandResult, CommandStatus, DeviceId, InputKind, Live, LiveEvent, PresenceCounts,
    Registry, RegistryError, RuleFeed, RuleInput, Session, SessionEvent, TimestampMs, Trigger,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::routing::Publisher;

pub mod jobs;

/// What the gate tells the device service about devices. Connections are told apart by
/// their session number: a device's new connection may open before its old one has ended.
#[derive(Debug)]
pub enum DeviceEvent {
    /// A connection of the device was admitted.
    Online(Session),
    /// A connection of the device ended.
    Offline {
        device: DeviceId,
        session: u64,
        at_ms: TimestampMs,
        reason: String,
    },
    /// The routing core granted a subscription whose filter covers the device's commands
    /// (or kept one from the device's earlier session); `acked`: at QoS 1 or 2, so the device
    /// will acknowledge each command.
    SubscribedToCommands {
        device: DeviceId,
        session: u64,
        acked: bool,
    },
    /// The routing core granted a subscription whose filter covers the device's desired
    /// state (or kept one from the device's earlier session).
    SubscribedToDesired { device: DeviceId, session: u64 },
    /// The device reported state: a JSON merge patch of its reported state. `recorded` is
    /// answered once the registry has it (or with why it is not a valid report), and only
    /// then is the device's publish acknowledged.
    Reported {
        device: DeviceId,
        payload: Bytes,
        recorded: oneshot::Sender<Result<(), String>>,
    },
    /// The device was deleted from the registry.
    Deleted { device: DeviceId },
    /// The device acknowledged the publish of this command.
    Delivered { device: DeviceId, command: String },
    /// The device published a result for this command; `recorded` is answered once the
    /// registry has it, and only then is the device's publish acknowledged (if the registry
    /// fails, it is dropped, and the device sends the result again).
    Result {
        device: DeviceId,
        command: String,
        payload: Bytes,
        recorded: oneshot::Sender<Result<(), String>>,
    },
}

/// Events that may wait for the device service; past this, the gate's connection that
/// sends one waits (backpressure on that device only).
pub const EVENT_QUEUE: usize = 4_096;
/// Most events handled together (their connections recorded in one transaction).
const EVENT_BATCH: usize = 256;
/// Command changes a watcher may fall behind by; a slower one misses the oldest and is told
/// so (it reads the registry again).
const WATCH_QUEUE: usize = 4_096;
/// How often commands are checked for expiry.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// The message that carries a desired state to its device.
fn desired_message(s: &DeviceState) -> Vec<u8> {
    serde_json::json!({
        "version": s.desired_version,
        "state": s.desired,
        "at_ms": s.desired_at_ms,
    })
    .to_string()
    .into_bytes()
}

/// Answers a reported state that is not taken, and says so in the log: an MQTT 3.1.1 device
/// cannot be told in its PUBACK.
fn refuse_report(device: &DeviceId, recorded: oneshot::Sender<Result<(), String>>, why: String) {
    info!(device_id = %device, reason = %why, "reported state refused");
    let _ = recorded.send(Err(why));
}

/// Connection events kept for another try when recording them fails.
const UNRECORDED_MAX: usize = 100_000;
/// Commands read and sent at a time when a device subscribes.
const SEND_PAGE: usize = 100;
/// Most commands expired in one check.
const EXPIRE_BATCH: usize = 1_000;
/// Longest a command may wait for its device.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {0} not found")]
    UnknownDevice(DeviceId),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the registry's thread failed")]
    Blocking,
}

/// A connected device's current connection and what it listens to.
#[derive(Debug, Clone, Copy)]
struct Listener {
    session: u64,
    /// Subscribed to its commands: at QoS 1 or more (`Some(true)`), or 0.
    commands: Option<bool>,
    /// Subscribed to its desired state.
    desired: bool,
}

/// The device service. Cheap to share (`Arc`).
pub struct Devices {
    registry: Arc<dyn Registry>,
    publisher: Publisher,
    changes: broadcast::Sender<Command>,
    /// The current connection of each connected device, and, once it has subscribed to its
    /// command topic, whether at QoS 1 or more. Bounded by the devices connected.
    listening: Mutex<HashMap<DeviceId, Listener>>,
    /// Most bytes of a command message; a larger one could not pass the routing core.
    max_message: usize,
    /// Where connections, commands and state changes are told as they happen.
    live: Live,
    /// Where connections and reported state go for rules (waiting when the rules are busy).
    rules: RuleFeed,
    /// Connections opened and ended that a failed write left unrecorded, oldest first; at
    /// most [`UNRECORDED_MAX`].
    unrecorded: Mutex<Vec<SessionEvent>>,
    /// Held by a job's runner while it looks at its job and records commands, and by an
    /// abort while it marks the job: no command is created after a job is aborted.
    jobs_lock: tokio::sync::Mutex<()>,
    /// Jobs with a runner now: one runner a job.
    job_runners: Mutex<std::collections::HashSet<String>>,
    /// Commands that reached each status (in the order of [`CommandStatus::ALL`]) since the
    /// process started.
    reached: [AtomicU64; CommandStatus::ALL.len()],
}

impl Devices {
    /// The service, and the sender the gate reports to; [`Devices::run`] takes the events.
    /// `max_packet_size`: the largest packet the routing core and devices take.
    pub fn new(
        registry: Arc<dyn Registry>,
        publisher: Publisher,
        max_packet_size: usize,
        live: Live,
        rules: RuleFeed,
    ) -> (
        Arc<Devices>,
        mpsc::Sender<DeviceEvent>,
        mpsc::Receiver<DeviceEvent>,
    ) {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let devices = Arc::new(Devices {
            registry,
            publisher,
            changes: broadcast::channel(WATCH_QUEUE).0,
            listening: Mutex::default(),
            // Room for the fixed header, the topic and the packet id.
            max_message: max_packet_size.saturating_sub(256),
            live,
            rules,
            unrecorded: Mutex::default(),
            jobs_lock: tokio::sync::Mutex::default(),
            job_runners: Mutex::default(),
            reached: Default::default(),
        });
        (devices, tx, rx)
    }

    /// Counts the command's new status, and tells its watchers and the live feed. Called
    /// for every change of a command's status, and only then.
    fn changed(&self, command: Command) {
        if let Some(at) = CommandStatus::ALL.iter().position(|s| *s == command.status) {
            self.reached[at].fetch_add(1, Ordering::Relaxed);
        }
        self.live.send(LiveEvent::Command {
            device: command.device.clone(),
            command: Box::new(command.clone()),
        });
        let _ = self.changes.send(command);
    }

    fn state_changed(&self, device: &DeviceId, state: &DeviceState) {
        self.live.send(LiveEvent::State {
            device: device.clone(),
            desired_version: state.desired_version,
            reported_version: state.reported_version,
        });
    }

    /// How many commands reached each status since the process started (a command counts
    /// once in each status it passes through).
    pub fn commands_reached(&self) -> Vec<(CommandStatus, u64)> {
        CommandStatus::ALL
            .iter()
            .zip(&self.reached)
            .map(|(status, n)| (*status, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Every change of a command from now on.
    pub fn watch(&self) -> broadcast::Receiver<Command> {
        self.changes.subscribe()
    }

    /// Handles the gate's events and expires commands until `stop`.
    pub async fn run(
        self: Arc<Self>,
        mut events: mpsc::Receiver<DeviceEvent>,
        stop: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(EVENT_BATCH);
        let mut expire = tokio::time::interval(EXPIRE_EVERY);
        expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut links = self.publisher.links();
        links.borrow_and_update();
        let mut links_open = true;
        self.resume_jobs().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    // What the gate reported before it stopped (connections ending) is
                    // still recorded; the queue is bounded, so this ends.
                    while let Ok(event) = events.try_recv() {
                        batch.push(event);
                    }
                    self.record_presence(&batch).await;
                    for event in batch.drain(..) {
                        self.handle(event).await;
                    }
                    return;
                }
                _ = expire.tick() => self.expire().await,
                changed = links.changed(), if links_open => match changed {
                    Ok(()) => self.resend_all().await,
                    Err(_) => links_open = false,
                },
                n = events.recv_many(&mut batch, EVENT_BATCH) => {
                    if n == 0 {
                        return;
                    }
                    self.record_presence(&batch).await;
                    for event in batch.drain(..) {
                        self.handle(event).await;
                    }
                }
            }
        }
    }

    /// Records the connections that opened and ended, in one transaction for the batch.
    async fn record_presence(&self, events: &[DeviceEvent]) {
        // Those a failed write left, first, so that opens and ends stay in order.
        let mut sessions = self
            .unrecorded
            .lock()
            .map(|mut u| std::mem::take(&mut *u))
            .unwrap_or_default();
        sessions.extend(events.iter().filter_map(|e| match e {
            DeviceEvent::Online(s) => Some(SessionEvent::Opened(s.clone())),
            DeviceEvent::Offline {
                device,
                session,
                at_ms,
                reason,
            } => Some(SessionEvent::Closed {
                device: device.clone(),
                session: *session,
                at_ms: *at_ms,
                reason: reason.clone(),
            }),
            _ => None,
        }));
        if sessions.is_empty() {
            return;
        }
        let kept = sessions.clone();
        if let Err(e) = self.blocking(move |r| r.record_sessions(&sessions)).await {
            // Tried again with the next batch; past the bound, the oldest are dropped and
            // the history has a gap (commands are unaffected).
            warn!(error = %e, waiting = kept.len(), "could not record connections; retrying with the next");
            if let Ok(mut u) = self.unrecorded.lock() {
                let over = kept.len().saturating_sub(UNRECORDED_MAX);
                u.extend(kept.into_iter().skip(over));
            }
        }
    }

    async fn handle(&self, event: DeviceEvent) {
        match event {
            DeviceEvent::Online(s) => {
                if let Ok(mut l) = self.listening.lock() {
                    let listener = Listener {
                        session: s.session,
                        commands: None,
                        desired: false,
                    };
                    l.insert(s.device.clone(), listener);
                }
                if self.rules.wants(Trigger::Presence) {
                    self.rules
                        .send(RuleInput {
                            device: s.device.clone(),
                            at_ms: now_ms(),
                            kind: InputKind::Presence {
                                online: true,
                                reason: None,
                            },
                        })
                        .await;
                }
                self.live.send(LiveEvent::Presence {
                    device: s.device,
                    online: true,
                    at_ms: s.connected_at_ms,
                    reason: None,
                });
            }
            DeviceEvent::Offline {
                device,
                session,
                at_ms,
                reason,
            } => {
                // Only the device's current connection: a newer one may have opened.
                let current = self.listening.lock().is_ok_and(|mut l| {
                    let current = l.get(&device).is_some_and(|l| l.session == session);
                    if current {
                        l.remove(&device);
                    }
                    current
                });
                if current {
                    if self.rules.wants(Trigger::Presence) {
                        self.rules
                            .send(RuleInput {
                                device: device.clone(),
                                at_ms: now_ms(),
                                kind: InputKind::Presence {
                                    online: false,
                                    reason: Some(reason.clone()),
                                },
                            })
                            .await;
                    }
                    self.live.send(LiveEvent::Presence {
                        device,
                        online: false,
                        at_ms,
                        reason: Some(reason),
                    });
                }
            }
            DeviceEvent::SubscribedToCommands {
                device,
                session,
                acked,
            } => {
                let current = self
                    .listening
                    .lock()
                    .is_ok_and(|mut l| match l.get_mut(&device) {
                        Some(l) if l.session == session => {
                            l.commands = Some(acked);
                            true
                        }
                        _ => false,
                    });
                if current {
                    self.send_waiting(&device, acked).await;
                }
            }
            DeviceEvent::SubscribedToDesired { device, session } => {
                let current = self
                    .listening
                    .lock()
                    .is_ok_and(|mut l| match l.get_mut(&device) {
                        Some(l) if l.session == session => {
                            l.desired = true;
                            true
                        }
                        _ => false,
                    });
                if current {
                    self.send_desired(&device).await;
                }
            }
            DeviceEvent::Reported {
                device,
                payload,
                recorded,
            } => {
                let patch = serde_json::from_slice::<serde_json::Value>(&payload)
                    .map_err(|e| format!("reported state is not JSON: {e}"))
                    .and_then(|patch| state::check_patch(&patch).map(|()| patch));
                let patch = match patch {
                    Ok(patch) => patch,
                    Err(why) => return refuse_report(&device, recorded, why),
                };
                let d = device.clone();
                let change = self.rules.wants(Trigger::State).then(|| patch.clone());
                match self
                    .blocking(move |r| r.patch_reported(&d, &patch, now_ms()))
                    .await
                {
                    Ok(state) => {
                        let _ = recorded.send(Ok(()));
                        if let Some(state) = state {
                            self.state_changed(&device, &state);
                            if let Some(patch) = change {
                                self.rules
                                    .send(RuleInput {
                                        device: device.clone(),
                                        at_ms: now_ms(),
                                        kind: InputKind::State {
                                            reported: state.reported.clone(),
                                            patch,
                                        },
                                    })
                                    .await;
                            }
                        }
                    }
                    // Sending it again would not change that (the state would grow too
                    // large): refused, not left unacknowledged.
                    Err(DeviceError::Registry(RegistryError::Refused(why))) => {
                        refuse_report(&device, recorded, why)
                    }
                    // Not acknowledged: the device sends it again.
                    Err(e) => {
                        warn!(device_id = %device, error = %e, "could not record reported state")
                    }
                }
            }
            DeviceEvent::Deleted { device } => self.forget(&device).await,
            DeviceEvent::Delivered { device, command } => {
                let _ = self
                    .advance(&device, &command, CommandStatus::Delivered, None)
                    .await;
            }
            DeviceEvent::Result {
                device,
                command,
                payload,
                recorded,
            } => {
                let (to, output) = match CommandResult::parse(&payload) {
                    Ok(r) if r.ok => (CommandStatus::Succeeded, r.output),
                    Ok(r) => (CommandStatus::Failed, r.output),
                    Err(why) => (CommandStatus::Failed, serde_json::json!({ "error": why })),
                };
                // Acknowledged only once recorded: else the device's publish fails and it
                // sends the result again.
                if self
                    .advance(&device, &command, to, Some(output))
                    .await
                    .is_ok()
                {
                    let _ = recorded.send(Ok(()));
                }
            }
        }
    }

    /// Moves a command on (if its status allows), and tells watchers when it moved.
    async fn advance(
        &self,
        device: &DeviceId,
        id: &str,
        to: CommandStatus,
        output: Option<serde_json::Value>,
    ) -> Result<Option<(Command, bool)>, ()> {
        let moved = {
            let (device, id) = (device.clone(), id.to_owned());
            self.blocking(move |r| r.move_command(&device, &id, to, now_ms(), output.as_ref()))
                .await
        };
        match moved {
            Ok(Some((command, changed))) => {
                if changed {
                    debug!(device_id = %device, command = %id, status = to.as_str(), "command moved");
                    self.changed(command.clone());
                }
                Ok(Some((command, changed)))
            }
            Ok(None) => {
                debug!(device_id = %device, command = %id, "no such command");
                Ok(None)
            }
            Err(e) => {
                warn!(device_id = %device, command = %id, error = %e, "could not record a command's status");
                Err(())
            }
        }
    }

    /// Sends the device's waiting commands, oldest first, a page at a time.
    async fn send_waiting(&self, device: &DeviceId, acked: bool) {
        let mut after: Option<String> = None;
        loop {
            let page = {
                let (device, after) = (device.clone(), after.clone());
                self.blocking(move |r| {
                    r.commands_to_send(&device, now_ms(), after.as_deref(), SEND_PAGE)
                })
                .await
            };
            let page = match page {
                Ok(page) => page,
                Err(e) => {
                    warn!(device_id = %device, error = %e, "could not read the device's commands");
                    return;
                }
            };
            let full = page.len() == SEND_PAGE;
            after = page.last().map(|c| c.id.clone());
            for command in page {
                self.send(command, acked).await;
            }
            if !full {
                return;
            }
        }
    }

    /// Marks the command sent, then publishes it to its device: a PUBACK or result racing
    /// the publish finds it sent. Over a QoS 0 subscription (`acked` false) no PUBACK will
    /// come, so it counts as delivered once published.
    async fn send(&self, command: Command, acked: bool) {
        let (device, id) = (&command.device, &command.id);
        if !matches!(
            self.advance(device, id, CommandStatus::Sent, None).await,
            Ok(Some((_, true)))
        ) {
            return;
        }
        let topic = DeviceTopic::Command(id.clone()).topic(device);
        let message = command.message().to_string().into_bytes();
        if self.publisher.publish(topic, message).await.is_err() {
            // Shutting down: it stays sent, and goes out again when the device next
            // subscribes, after the restart.
            return;
        }
        if !acked {
            let _ = self
                .advance(device, id, CommandStatus::Delivered, None)
                .await;
        }
    }

    /// Sends again what every listening device has waiting: after the publisher's link to
    /// the routing core came back, publishes queued on the lost one may be gone.
    async fn resend_all(&self) {
        let listening: Vec<(DeviceId, Listener)> = self
            .listening
            .lock()
            .map(|l| l.iter().map(|(d, l)| (d.clone(), *l)).collect())
            .unwrap_or_default();
        for (device, listener) in listening {
            if let Some(acked) = listener.commands {
                self.send_waiting(&device, acked).await;
            }
            if listener.desired {
                self.send_desired(&device).await;
            }
        }
    }

    async fn expire(&self) {
        match self
            .blocking(|r| r.expire_commands(now_ms(), EXPIRE_BATCH))
            .await
        {
            Ok(expired) => {
                for command in expired {
                    info!(device_id = %command.device, command = %command.id, "command expired");
                    self.changed(command);
                }
            }
            Err(e) => warn!(error = %e, "could not expire commands"),
        }
    }

    /// Creates a command for `device` and sends it at once if the device is listening.
    pub async fn create(
        &self,
        device: &DeviceId,
        name: &str,
        params: serde_json::Value,
        timeout: Duration,
    ) -> Result<Command, DeviceError> {
        self.check_command(name, &params, timeout)?;
        let command = self.record(device, name, params, timeout, None).await?;
        self.send_if_listening(&command).await;
        Ok(self.get(device, &command.id).await?.unwrap_or(command))
    }

    /// Refuses a command that could not be sent as asked.
    fn check_command(
        &self,
        name: &str,
        params: &serde_json::Value,
        timeout: Duration,
    ) -> Result<(), DeviceError> {
        if name.is_empty() || name.len() > 128 {
            return Err(DeviceError::Invalid(
                "a command's name is 1 to 128 bytes".into(),
            ));
        }
        let size = serde_json::to_vec(params).map_or(usize::MAX, |p| p.len()) + name.len();
        if size > self.max_message {
            return Err(DeviceError::Invalid(format!(
                "the command is {size} bytes; at most {} fit in a message to a device",
                self.max_message
            )));
        }
        if timeout.is_zero() || timeout > MAX_TIMEOUT {
            return Err(DeviceError::Invalid(format!(
                "timeout must be more than 0 and at most {} days",
                MAX_TIMEOUT.as_secs() / 86_400
            )));
        }
        Ok(())
    }

    /// Sends a new command at once if its device listens; else it waits, queued.
    async fn send_if_listening(&self, command: &Command) {
        let listening = self
            .listening
            .lock()
            .ok()
            .and_then(|l| l.get(&command.device).and_then(|l| l.commands));
        if let Some(acked) = listening {
            self.send(command.clone(), acked).await;
        }
    }

    /// Records a new command, queued, and tells its watchers.
    async fn record(
        &self,
        device: &DeviceId,
        name: &str,
        params: serde_json::Value,
        timeout: Duration,
        job: Option<String>,
    ) -> Result<Command, DeviceError> {
        let now = now_ms();
        let command = Command {
            id: new_command_id(),
            device: device.clone(),
            name: name.to_owned(),
            params,
            status: CommandStatus::Queued,
            created_at_ms: now,
            expires_at_ms: now.saturating_add(timeout.as_millis() as TimestampMs),
            updated_at_ms: now,
            sent_at_ms: None,
            delivered_at_ms: None,
            finished_at_ms: None,
            output: None,
            job,
        };
        {
            let (device, command) = (device.clone(), command.clone());
            self.blocking(move |r| {
                if r.device(&device)?.is_none() {
                    return Ok(Err(DeviceError::UnknownDevice(device)));
                }
                r.insert_command(&command).map(Ok)
            })
            .await??;
        }
        self.changed(command.clone());
        Ok(command)
    }

    pub async fn get(&self, device: &DeviceId, id: &str) -> Result<Option<Command>, DeviceError> {
        let (device, id) = (device.clone(), id.to_owned());
        self.blocking(move |r| r.command(&device, &id)).await
    }

    pub async fn list(
        &self,
        device: &DeviceId,
        before: Option<String>,
        limit: usize,
    ) -> Result<Vec<Command>, DeviceError> {
        let device = device.clone();
        self.blocking(move |r| r.commands(&device, before.as_deref(), limit))
            .await
    }

    /// Cancels a command not yet delivered. `None` if there is no such command; else the
    /// command as it is now and whether it was cancelled.
    pub async fn cancel(
        &self,
        device: &DeviceId,
        id: &str,
    ) -> Result<Option<(Command, bool)>, DeviceError> {
        let output = serde_json::json!({ "error": "cancelled by an operator" });
        let (d, i) = (device.clone(), id.to_owned());
        let moved = self
            .blocking(move |r| {
                r.move_command(&d, &i, CommandStatus::Cancelled, now_ms(), Some(&output))
            })
            .await?;
        if let Some((command, true)) = &moved {
            self.changed(command.clone());
        }
        Ok(moved)
    }

    /// Waits until command `id` of `device` has ended or `wait` has passed, and returns it
    /// as it is then. `changes` must have been taken (with [`Devices::watch`]) before the
    /// command was created, so that no change is missed.
    pub async fn wait(
        &self,
        device: &DeviceId,
        id: &str,
        mut changes: broadcast::Receiver<Command>,
        wait: Duration,
    ) -> Result<Option<Command>, DeviceError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.get(device, id).await? {
                Some(c) if c.status.is_final() => return Ok(Some(c)),
                None => return Ok(None),
                Some(_) => {}
            }
            // Until a change of this command, a lag (then the registry is read again), or
            // the deadline.
            let changed = tokio::time::timeout_at(deadline, async {
                loop {
                    match changes.recv().await {
                        Ok(c) if c.id == id => return,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                    }
                }
            })
            .await;
            if changed.is_err() {
                return self.get(device, id).await;
            }
        }
    }

    /// Publishes the device's desired state, retained, on `devices/{id}/state/desired`:
    /// `{"version", "state", "at_ms"}`; nothing while it has none.
    async fn send_desired(&self, device: &DeviceId) {
        let d = device.clone();
        let message = match self.blocking(move |r| r.device_state(&d)).await {
            Ok(Some(s)) if s.desired_version > 0 => desired_message(&s),
            Ok(_) => return,
            Err(e) => {
                warn!(device_id = %device, error = %e, "could not read the desired state");
                return;
            }
        };
        if message.len() > self.max_message {
            warn!(device_id = %device, bytes = message.len(), "the desired state is too large to send");
            return;
        }
        let topic = DeviceTopic::StateDesired.topic(device);
        // Shutting down if it fails: the device gets it when it next subscribes.
        let _ = self.publisher.publish_retained(topic, message).await;
    }

    /// Clears what the routing core keeps for a device that was deleted (an empty retained
    /// message removes the retained one). The gate calls it for every deletion it sees in
    /// the registry; the API also at once, so that a device registered again right away
    /// under the id finds nothing.
    pub async fn forget(&self, device: &DeviceId) {
        let topic = DeviceTopic::StateDesired.topic(device);
        let _ = self.publisher.publish_retained(topic, Vec::new()).await;
    }

    /// The device's desired and reported state; `None` if there is no such device.
    pub async fn state(&self, device: &DeviceId) -> Result<Option<DeviceState>, DeviceError> {
        let device = device.clone();
        self.blocking(move |r| r.device_state(&device)).await
    }

    /// Merges `patch` into the device's desired state (if its version is still
    /// `expected_version`, when given) and publishes the result to the device.
    pub async fn patch_desired(
        &self,
        device: &DeviceId,
        patch: serde_json::Value,
        expected_version: Option<u64>,
    ) -> Result<DeviceState, DeviceError> {
        state::check_patch(&patch).map_err(DeviceError::Invalid)?;
        // What the state would become, checked here so that too large is a bad request,
        // not a conflict (the registry checks again, in its transaction).
        let mut merged = match self.state(device).await? {
            Some(s) => s,
            None => return Err(DeviceError::UnknownDevice(device.clone())),
        };
        state::merge(&mut merged.desired, &patch);
        merged.desired_version += 1;
        state::check_state(&merged.desired).map_err(DeviceError::Invalid)?;
        if desired_message(&merged).len() > self.max_message {
            return Err(DeviceError::Invalid(format!(
                "the desired state would not fit in a message to the device ({} bytes)",
                self.max_message
            )));
        }
        let d = device.clone();
        let patched = self
            .blocking(move |r| r.patch_desired(&d, &patch, expected_version, now_ms()))
            .await?
            .ok_or_else(|| DeviceError::UnknownDevice(device.clone()))?;
        self.state_changed(device, &patched);
        self.send_desired(device).await;
        Ok(patched)
    }

    /// A device's connections, newest first.
    pub async fn sessions(
        &self,
        device: &DeviceId,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Session>, DeviceError> {
        let device = device.clone();
        self.blocking(move |r| r.sessions(&device, before, limit))
            .await
    }

    pub async fn presence_counts(&self) -> Result<PresenceCounts, DeviceError> {
        self.blocking(|r| r.presence_counts()).await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Registry) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, DeviceError> {
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || f(registry.as_ref()))
            .await
            .map_err(|_| DeviceError::Blocking)?
            .map_err(DeviceError::from)
    }
}
