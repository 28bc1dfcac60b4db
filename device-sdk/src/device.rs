//! A device's connection to Tellus: the outbox in front of it, commands and desired state
//! behind it.
//!
//! Four tasks, none of which ever waits on one that may wait on it:
//! - the **writer** takes readings and messages from the program ([`Device::send`],
//!   [`Device::report_state`], command results) and writes whatever has gathered to the
//!   outbox in one transaction; the program's call returns once it is written;
//! - the **network** task polls rumqttc's event loop, reconnects with backoff, and passes
//!   what happens on to the connection task through a bounded channel;
//! - the **connection** task publishes from the outbox (oldest first, in batches, at most
//!   `in_flight` unacknowledged) and removes what Tellus acknowledges; it publishes with
//!   `try_publish` only, so it never waits on the network task;
//! - the **dispatcher** runs command handlers (at most `command_concurrency` at once).
//!
//! Sessions are clean: what was in flight when a connection ended is simply sent again from
//! the outbox on the next one. Before the network task reconnects, the connection task has
//! stopped publishing into the old session (see [`Net::Down`]), so no publish crosses from
//! one session to the next.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use futures::future::BoxFuture;
use rumqttc::{AsyncClient, Event, EventLoop, MqttState, Outgoing, Packet, QoS};
use serde::Deserialize;
use serde_json::{json, Value as Json};
use tellus_core::{
    topic::{self, DeviceTopic},
    DeviceId,
};
use tokio::{
    sync::{mpsc, oneshot, watch, Notify, Semaphore},
    task::JoinHandle,
    time::Instant,
};

use crate::{
    backoff::{Attempts, Backoff},
    outbox::{Outbox, OutboxConfig, OutboxError, Stored},
    reading::{Format, Reading},
    rotation::{Renewal, Rotation},
    Credentials, Error,
};

/// The largest payload of a command result, state report or event a device sends, encoded
/// (Tellus keeps states of at most 64 KiB). With topics of bounded length (an event's name
/// is at most [`MAX_EVENT_NAME`] bytes), no such message in the outbox is too large to send.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The longest event name, in bytes.
pub const MAX_EVENT_NAME: usize = 256;

/// The largest batch a device sends: within Tellus's default `mqtt.max_packet_size`
/// (256 KiB), with room for the topic and the packet's header. A larger packet would end
/// the connection, every time it is sent.
const MAX_BATCH_BYTES: usize = 252 * 1024;

/// A command from Tellus, as its handler gets it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Command {
    /// The command id: a handler is called once per id, even when Tellus sends a command
    /// again after a lost acknowledgement.
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub params: Json,
    /// When Tellus gives up on it (ms since the Unix epoch).
    #[serde(default)]
    pub expires_at_ms: i64,
}

/// What a command handler answers: an output for `{"ok": true, "output": …}`, or an error
/// text for `{"ok": false, "output": …}`.
pub type CommandResult = Result<Json, String>;

/// The desired state Tellus holds for the device.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Desired {
    /// Bumped by every change; a device may see one version twice, never an older one after
    /// a newer.
    pub version: u64,
    pub state: Json,
    #[serde(default)]
    pub at_ms: i64,
}

type CommandHandler = Arc<dyn Fn(Command) -> BoxFuture<'static, CommandResult> + Send + Sync>;
type DesiredHandler = Arc<dyn Fn(Desired) -> BoxFuture<'static, ()> + Send + Sync>;

/// How readings are gathered into messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// At most this many readings in one message (default 100).
    pub max_readings: usize,
    /// At most this many bytes in one message (default 64 KiB, at most 252 KiB; a single
    /// larger reading still travels alone). Keep it below Tellus's `mqtt.max_packet_size`
    /// if that was lowered.
    pub max_bytes: usize,
    /// A message that is not full waits this long for more readings (default 100 ms; zero
    /// sends every reading at once).
    pub linger: Duration,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max_readings: 100,
            max_bytes: 64 * 1024,
            linger: Duration::from_millis(100),
        }
    }
}

/// The device's figures, from [`Device::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Readings written to the outbox.
    pub recorded: u64,
    /// Readings Tellus acknowledged (durable there) and removed from the outbox.
    pub acknowledged: u64,
    /// Readings dropped from a full outbox, oldest first (or unreadable on disk).
    pub dropped: u64,
    /// Readings refused because the outbox was full ([`crate::WhenFull::Refuse`]).
    pub refused: u64,
    /// Readings waiting in the outbox.
    pub waiting: u64,
    /// Command results, state reports and events waiting in the outbox.
    pub waiting_messages: u64,
    /// Such messages dropped from a full outbox.
    pub messages_dropped: u64,
    /// Telemetry messages published (a message carries a batch of readings).
    pub batches_sent: u64,
    /// Messages (batches of readings, results, reports) published and not yet acknowledged.
    pub in_flight: u64,
    /// Commands answered.
    pub commands_answered: u64,
    /// Connections Tellus accepted.
    pub connections: u64,
    pub connected: bool,
    /// The last thing that went wrong, if anything did.
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Counters {
    recorded: AtomicU64,
    acknowledged: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
    messages_dropped: AtomicU64,
    batches_sent: AtomicU64,
    in_flight: AtomicU64,
    commands_answered: AtomicU64,
    connections: AtomicU64,
    connected: AtomicBool,
}

/// What the tasks share.
struct Shared {
    id: DeviceId,
    outbox: Mutex<Outbox>,
    counters: Counters,
    last_error: Mutex<Option<String>>,
    /// New things to send are in the outbox.
    wake: Notify,
    /// (readings, messages) in the outbox, for [`Device::flush`].
    waiting: watch::Sender<(u64, u64)>,
    connected: watch::Sender<bool>,
    /// Commands being handled now, so that a copy arriving meanwhile is not run again.
    running: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn error(&self, what: impl std::fmt::Display) {
        tracing::warn!(device = %self.id, "{what}");
        *lock(&self.last_error) = Some(what.to_string());
    }

    fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn publish_waiting(&self, outbox: &Outbox) {
        let waiting = (outbox.readings().0, outbox.messages());
        self.waiting
            .send_if_modified(|w| std::mem::replace(w, waiting) != waiting);
    }

    /// Runs `f` on the outbox on a blocking thread.
    async fn outbox<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Outbox) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        let shared = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut outbox = lock(&shared.outbox);
            let out = f(&mut outbox);
            shared.publish_waiting(&outbox);
            out
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// Whether command `id` is new, and now marked running. A copy of one running is
    /// ignored; a copy of one answered before (the answer may have been lost) is answered
    /// again with the same result.
    async fn take_on(self: &Arc<Self>, id: &str) -> bool {
        if !lock(&self.running).insert(id.to_owned()) {
            return false;
        }
        let seen = {
            let id = id.to_owned();
            self.outbox(move |o| o.handled(&id)).await
        };
        match seen {
            Ok(Some(result)) => {
                self.store_result(id.to_owned(), result, false).await;
                false
            }
            Ok(None) => true,
            Err(e) => {
                self.error(format_args!("outbox: {e}"));
                true
            }
        }
    }

    /// Keeps a command's result to send, and remembers it for a copy of the command. A
    /// result too large to send is replaced by a failure saying so.
    async fn store_result(self: &Arc<Self>, command_id: String, body: Vec<u8>, fresh: bool) {
        let topic = DeviceTopic::CommandResult(command_id.clone()).topic(&self.id);
        let body = if body.len() > MAX_MESSAGE_BYTES {
            let why = format!(
                "the result is {} bytes; a device sends at most {MAX_MESSAGE_BYTES}",
                body.len()
            );
            serde_json::to_vec(&json!({ "ok": false, "output": why })).unwrap_or_default()
        } else {
            body
        };
        let id = command_id.clone();
        let stored = self
            .outbox(move |o| o.push_result(&topic, &body, &id))
            .await;
        match stored {
            Ok(dropped) => {
                Shared::count(&self.counters.messages_dropped, dropped);
                Shared::count(&self.counters.commands_answered, u64::from(fresh));
                self.wake.notify_one();
            }
            Err(e) => self.error(format_args!("keeping the result of {command_id}: {e}")),
        }
        lock(&self.running).remove(&command_id);
    }
}

/// Sets up a [`Device`]; from [`Device::builder`].
pub struct DeviceBuilder {
    creds: Credentials,
    host: String,
    port: u16,
    outbox: OutboxConfig,
    format: Format,
    batching: Batching,
    backoff: Backoff,
    keep_alive: Duration,
    in_flight: usize,
    command_concurrency: usize,
    commands: HashMap<String, CommandHandler>,
    on_desired: Option<DesiredHandler>,
    rotation: Option<Rotation>,
}

impl DeviceBuilder {
    /// Renews the certificate before it expires (see [`Rotation`]); off unless set.
    pub fn rotation(mut self, rotation: Rotation) -> Self {
        self.rotation = Some(rotation);
        self
    }

    /// Where readings wait until Tellus has them; in memory unless set (see
    /// [`OutboxConfig::file`]).
    pub fn outbox(mut self, config: OutboxConfig) -> Self {
        self.outbox = config;
        self
    }

    /// JSON (the default) or protobuf.
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// How readings are gathered (`max_readings` is kept within 1..=10,000, `max_bytes`
    /// within 1 KiB..=252 KiB).
    pub fn batching(mut self, batching: Batching) -> Self {
        self.batching = Batching {
            max_readings: batching.max_readings.clamp(1, 10_000),
            max_bytes: batching.max_bytes.clamp(1024, MAX_BATCH_BYTES),
            ..batching
        };
        self
    }

    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The MQTT keep-alive (default 30 s; at least 1 s).
    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive.max(Duration::from_secs(1));
        self
    }

    /// At most this many messages wait for Tellus's acknowledgement at once (default 16).
    pub fn in_flight(mut self, n: usize) -> Self {
        self.in_flight = n.clamp(1, 1_000);
        self
    }

    /// At most this many command handlers run at once (default 4); more commands wait (up
    /// to 64, then they are answered with a failure saying the device is busy).
    pub fn command_concurrency(mut self, n: usize) -> Self {
        self.command_concurrency = n.max(1);
        self
    }

    /// Handles the commands named `name`. The result is published for Tellus; a command
    /// without a handler is answered with a failure naming it.
    pub fn on_command<F, Fut>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Command) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = CommandResult> + Send + 'static,
    {
        let handler: CommandHandler = Arc::new(move |c| Box::pin(handler(c)));
        self.commands.insert(name.into(), handler);
        self
    }

    /// Called with the desired state whenever a newer version arrives, the first one after
    /// the start included (Tellus sends the current one on every connection; a version
    /// already seen is not handed over again). Calls do not overlap; if several changes
    /// arrive during one call, the next call gets the newest. A panicking call is logged and
    /// does not stop later ones.
    pub fn on_desired<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(Desired) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.on_desired = Some(Arc::new(move |d| Box::pin(handler(d))));
        self
    }

    /// Opens the outbox and starts connecting. Must be called within a Tokio runtime.
    pub fn start(self) -> Result<Device, Error> {
        let mut options = crate::mqtt_options(&self.creds, &self.host, self.port)?;
        options
            .set_keep_alive(self.keep_alive)
            .set_clean_session(true)
            // Room for a command or desired state of any size Tellus sends.
            .set_max_packet_size(
                1024 * 1024,
                self.batching
                    .max_bytes
                    .max(crate::MAX_READING_BYTES)
                    .max(MAX_MESSAGE_BYTES)
                    + 4096,
            )
            // rumqttc's packet ids cycle below this: more than the window, so that no id is
            // reused while its message waits.
            .set_inflight((self.in_flight + 2) as u16);
        let (client, eventloop) = AsyncClient::new(options, self.in_flight + 16);
        let renewal = self
            .rotation
            .map(|r| Renewal::new(r, &self.creds.cert_pem))
            .transpose()?;

        let outbox = Outbox::open(self.outbox.clone())?;
        let waiting = (outbox.readings().0, outbox.messages());
        let shared = Arc::new(Shared {
            id: self.creds.id.clone(),
            outbox: Mutex::new(outbox),
            counters: Counters::default(),
            last_error: Mutex::new(None),
            wake: Notify::new(),
            waiting: watch::Sender::new(waiting),
            connected: watch::Sender::new(false),
            running: Mutex::new(HashSet::new()),
        });
        let (stop, _) = watch::channel(false);
        let (writes_tx, writes_rx) = mpsc::channel(64);
        let (net_tx, net_rx) = mpsc::channel(256);
        let (dispatch_tx, dispatch_rx) = mpsc::channel(64);
        let (desired_tx, desired_rx) = watch::channel(None);

        let mut tasks = vec![
            tokio::spawn(writer(shared.clone(), writes_rx, stop.subscribe())),
            tokio::spawn(dispatcher(
                shared.clone(),
                dispatch_rx,
                Arc::new(Semaphore::new(self.command_concurrency)),
                stop.subscribe(),
            )),
        ];
        if let Some(handler) = self.on_desired {
            tasks.push(tokio::spawn(desired_calls(
                desired_rx.clone(),
                handler,
                stop.subscribe(),
            )));
        }
        let (renewed_tx, renewed_rx) = mpsc::channel(1);
        let network = tokio::spawn(network(
            eventloop,
            net_tx,
            renewed_rx,
            self.backoff,
            shared.clone(),
        ));
        let connection = Connection {
            shared: shared.clone(),
            client,
            format: self.format,
            batching: self.batching,
            window: self.in_flight,
            commands: self.commands,
            dispatch: dispatch_tx,
            desired: desired_tx,
            connected: false,
            next_reading: 0,
            next_message: 0,
            unassigned: VecDeque::new(),
            in_flight: HashMap::new(),
            lingering: None,
            creds: self.creds,
            renewal,
            renewal_check: None,
            renewed: renewed_tx,
        };
        tasks.push(tokio::spawn(connection.run(
            net_rx,
            network,
            stop.subscribe(),
        )));
        Ok(Device {
            shared,
            writes: writes_tx,
            desired: desired_rx,
            stop,
            tasks: Mutex::new(tasks),
        })
    }
}

/// A device connected (or connecting) to Tellus.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tellus_device::{Credentials, Device, OutboxConfig, Reading};
/// let creds = Credentials::from_dir("certs", "pump-07")?;
/// let device = Device::builder(creds, "tellus.local", 8883)
///     .outbox(OutboxConfig::file("/var/lib/pump/outbox.db"))
///     .on_command("set_speed", |cmd| async move {
///         let rpm = cmd.params["rpm"].as_u64().ok_or("params.rpm must be a number")?;
///         Ok(serde_json::json!({ "rpm": rpm }))
///     })
///     .on_desired(|desired| async move {
///         println!("asked for {} (version {})", desired.state, desired.version);
///     })
///     .start()?;
/// // Returns once the reading is in the outbox; it reaches Tellus when it can.
/// device.send(Reading::now().with("flow_lpm", 12.5).with("running", true)).await?;
/// device.report_state(serde_json::json!({ "firmware": "2.1.0" })).await?;
/// device.close().await;
/// # Ok(()) }
/// ```
pub struct Device {
    shared: Arc<Shared>,
    writes: mpsc::Sender<Write>,
    desired: watch::Receiver<Option<Desired>>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Device {
    /// Starts setting up a device that connects to Tellus at `host:port` as `creds`.
    pub fn builder(creds: Credentials, host: impl Into<String>, port: u16) -> DeviceBuilder {
        DeviceBuilder {
            creds,
            host: host.into(),
            port,
            outbox: OutboxConfig::memory(),
            format: Format::default(),
            batching: Batching::default(),
            backoff: Backoff::default(),
            keep_alive: Duration::from_secs(30),
            in_flight: 16,
            command_concurrency: 4,
            commands: HashMap::new(),
            on_desired: None,
            rotation: None,
        }
    }

    pub fn id(&self) -> &DeviceId {
        &self.shared.id
    }

    /// Takes a reading: returns once it is in the outbox, whether or not Tellus is reachable.
    /// An invalid reading is refused here, so it can never spoil a batch.
    pub async fn send(&self, reading: Reading) -> Result<(), Error> {
        self.send_all(vec![reading]).await
    }

    /// Takes several readings at once (one outbox write).
    pub async fn send_all(&self, readings: Vec<Reading>) -> Result<(), Error> {
        for reading in &readings {
            reading.validate()?;
        }
        if readings.is_empty() {
            return Ok(());
        }
        self.write(|done| Write::Readings(readings, done)).await
    }

    /// Reports state: a JSON object merged into the device's reported state (a merge patch:
    /// `null` removes a key). Kept in the outbox like readings.
    pub async fn report_state(&self, patch: Json) -> Result<(), Error> {
        if !patch.is_object() {
            return Err(Error::NotAnObject);
        }
        let topic = DeviceTopic::StateReported.topic(&self.shared.id);
        self.message(topic, patch).await
    }

    /// Publishes an event on `devices/{id}/events/{name}`, through the outbox.
    /// The name is one topic level of at most [`MAX_EVENT_NAME`] bytes; the payload at most
    /// [`MAX_MESSAGE_BYTES`] encoded.
    pub async fn event(&self, name: &str, payload: Json) -> Result<(), Error> {
        if name.len() > MAX_EVENT_NAME {
            let why = format!("longer than {MAX_EVENT_NAME} bytes");
            return Err(Error::BadEventName(name.chars().take(64).collect(), why));
        }
        let topic = DeviceTopic::Event(name.to_owned()).topic(&self.shared.id);
        topic::check_publish(&self.shared.id, &topic)
            .map_err(|e| Error::BadEventName(name.to_owned(), e.to_string()))?;
        self.message(topic, payload).await
    }

    async fn message(&self, topic: String, payload: Json) -> Result<(), Error> {
        let payload = serde_json::to_vec(&payload).unwrap_or_default();
        if payload.len() > MAX_MESSAGE_BYTES {
            return Err(Error::MessageTooLarge(payload.len()));
        }
        self.write(|done| Write::Message(topic, payload, done))
            .await
    }

    async fn write(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), Error>>) -> Write,
    ) -> Result<(), Error> {
        let (done, answer) = oneshot::channel();
        self.writes
            .send(make(done))
            .await
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// The newest desired state seen, if any.
    pub fn desired(&self) -> Option<Desired> {
        self.desired.borrow().clone()
    }

    /// A receiver that sees every change of the desired state.
    pub fn watch_desired(&self) -> watch::Receiver<Option<Desired>> {
        self.desired.clone()
    }

    pub fn is_connected(&self) -> bool {
        self.shared.counters.connected.load(Ordering::Relaxed)
    }

    /// Waits until Tellus has accepted a connection.
    pub async fn connected(&self) {
        let mut rx = self.shared.connected.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Waits until the outbox is empty: everything sent so far is in Tellus. Bound it with a
    /// timeout; while Tellus is unreachable it does not return.
    pub async fn flush(&self) {
        let mut rx = self.shared.waiting.subscribe();
        let _ = rx
            .wait_for(|&(readings, messages)| readings == 0 && messages == 0)
            .await;
    }

    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (waiting, waiting_messages) = *self.shared.waiting.borrow();
        Stats {
            recorded: get(&c.recorded),
            acknowledged: get(&c.acknowledged),
            dropped: get(&c.dropped),
            refused: get(&c.refused),
            waiting,
            waiting_messages,
            messages_dropped: get(&c.messages_dropped),
            batches_sent: get(&c.batches_sent),
            in_flight: get(&c.in_flight),
            commands_answered: get(&c.commands_answered),
            connections: get(&c.connections),
            connected: c.connected.load(Ordering::Relaxed),
            last_error: lock(&self.shared.last_error).clone(),
        }
    }

    /// Stops: what is written stays in the outbox for the next start; the connection ends
    /// with a DISCONNECT.
    pub async fn close(self) {
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        for task in tasks {
            let _ = task.await;
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// What the program hands the writer.
enum Write {
    Readings(Vec<Reading>, oneshot::Sender<Result<(), Error>>),
    Message(String, Vec<u8>, oneshot::Sender<Result<(), Error>>),
}

/// Returns once `stop` says so (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Writes what has gathered in one go (the readings in one transaction), then answers each
/// caller.
async fn writer(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Write>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let first = tokio::select! {
            biased;
            Some(first) = rx.recv() => first,
            _ = stopped(&mut stop) => {
                // Take what was already handed over, then refuse more.
                rx.close();
                match rx.recv().await {
                    Some(w) => w,
                    None => return,
                }
            }
            else => return,
        };
        let mut writes = vec![first];
        while writes.len() < 256 {
            match rx.try_recv() {
                Ok(w) => writes.push(w),
                Err(_) => break,
            }
        }
        write_all(&shared, writes).await;
    }
}

async fn write_all(shared: &Arc<Shared>, writes: Vec<Write>) {
    let mut readings = Vec::new();
    let mut messages = Vec::new();
    let mut answers = Vec::new();
    for w in writes {
        match w {
            Write::Readings(r, done) => {
                answers.push((done, readings.len(), r.len()));
                readings.extend(r);
            }
            Write::Message(topic, payload, done) => messages.push((topic, payload, done)),
        }
    }
    let (messages, message_answers): (Vec<_>, Vec<_>) = messages
        .into_iter()
        .map(|(topic, payload, done)| ((topic, payload), done))
        .unzip();
    let outcome = shared
        .outbox(move |o| {
            let appended = o.append(&readings)?;
            let mut dropped = 0;
            for (topic, payload) in messages {
                dropped += o.push_message(&topic, &payload)?;
            }
            Ok((appended, dropped))
        })
        .await;
    match outcome {
        Ok((appended, messages_dropped)) => {
            let c = &shared.counters;
            Shared::count(
                &c.recorded,
                appended.taken.iter().filter(|t| **t).count() as u64,
            );
            Shared::count(&c.dropped, appended.dropped);
            Shared::count(&c.messages_dropped, messages_dropped);
            for (done, from, n) in answers {
                let refused = appended.taken[from..from + n]
                    .iter()
                    .filter(|t| !**t)
                    .count();
                Shared::count(&c.refused, refused as u64);
                let _ = done.send(if refused == 0 {
                    Ok(())
                } else {
                    Err(Error::OutboxFull(refused))
                });
            }
            for done in message_answers {
                let _ = done.send(Ok(()));
            }
            shared.wake.notify_one();
        }
        Err(e) => {
            let text = e.to_string();
            shared.error(format_args!("writing the outbox: {text}"));
            // Readings and messages are written one after another: some may be in the
            // outbox although this says otherwise. Sent twice, a reading replaces itself.
            for (done, _, _) in answers {
                let _ = done.send(Err(Error::Outbox(text.clone())));
            }
            for done in message_answers {
                let _ = done.send(Err(Error::Outbox(text.clone())));
            }
        }
    }
}

/// Runs command handlers, each to its end, at most `limit` at once. On stop, commands not
/// yet started are answered with a failure; running handlers are left to finish on their
/// own (their results go to the outbox, for the next start).
async fn dispatcher(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<(Command, CommandHandler)>,
    limit: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let next = tokio::select! {
            biased;
            _ = stopped(&mut stop) => None,
            next = rx.recv() => next,
        };
        let Some((command, handler)) = next else {
            break;
        };
        let permit = tokio::select! {
            biased;
            _ = stopped(&mut stop) => {
                not_run(&shared, command.id).await;
                break;
            }
            permit = limit.clone().acquire_owned() => permit,
        };
        let Ok(permit) = permit else { break };
        let shared = shared.clone();
        tokio::spawn(async move {
            let id = command.id.clone();
            // The handler is called inside a task of its own, so that a panic, in the
            // handler or in its future, becomes a failed command.
            let outcome = tokio::spawn(async move { handler(command).await }).await;
            let body = match outcome {
                Ok(Ok(output)) => json!({ "ok": true, "output": output }),
                Ok(Err(error)) => json!({ "ok": false, "output": error }),
                Err(_) => json!({ "ok": false, "output": "the command handler panicked" }),
            };
            shared
                .store_result(id, serde_json::to_vec(&body).unwrap_or_default(), true)
                .await;
            drop(permit);
        });
    }
    rx.close();
    while let Some((command, _)) = rx.recv().await {
        not_run(&shared, command.id).await;
    }
}

/// Answers a command that was taken but will not run: the device is stopping.
async fn not_run(shared: &Arc<Shared>, id: String) {
    let body = json!({ "ok": false, "output": "the device stopped before running it" });
    shared
        .store_result(id, serde_json::to_vec(&body).unwrap_or_default(), true)
        .await;
}

/// Calls the desired-state handler with each newest desired state, one call at a time.
/// On stop it ends without waiting for a call under way.
async fn desired_calls(
    mut rx: watch::Receiver<Option<Desired>>,
    handler: DesiredHandler,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            biased;
            _ = stopped(&mut stop) => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
        let desired = rx.borrow_and_update().clone();
        if let Some(desired) = desired {
            let version = desired.version;
            let handler = handler.clone();
            // A task of its own: a panic in one call must not end the later ones.
            let call = tokio::spawn(async move { handler(desired).await });
            tokio::select! {
                biased;
                _ = stopped(&mut stop) => return,
                outcome = call => if outcome.is_err() {
                    tracing::warn!(version, "the desired-state handler panicked");
                },
            }
        }
    }
}

/// What the network task reports.
enum Net {
    Connected,
    /// The connection ended (or an attempt failed). The network task reconnects only once
    /// the connection task has answered: after that answer nothing more is published into
    /// the old session.
    Down(String, oneshot::Sender<()>),
    /// rumqttc gave the oldest publish handed to it this packet id.
    Sent(u16),
    Acked(u16),
    Publish(String, bytes::Bytes),
}

async fn network(
    mut eventloop: EventLoop,
    net: mpsc::Sender<Net>,
    mut renewed: mpsc::Receiver<rumqttc::Transport>,
    backoff: Backoff,
    shared: Arc<Shared>,
) {
    let mut attempts = Attempts::new(backoff);
    // When the current connection was accepted: the backoff starts over only once a
    // connection has lasted, so that one that Tellus keeps closing is not retried at once.
    let mut accepted: Option<Instant> = None;
    loop {
        let polled = tokio::select! {
            biased;
            Some(transport) = renewed.recv() => {
                // A renewed certificate: end this connection and make the next with it.
                eventloop.mqtt_options.set_transport(transport);
                Err(None)
            }
            event = eventloop.poll() => event.map_err(|e| Some(e.to_string())),
        };
        let report = match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                accepted = Some(Instant::now());
                Net::Connected
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => Net::Acked(ack.pkid),
            Ok(Event::Incoming(Packet::Publish(p))) => Net::Publish(p.topic, p.payload),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Net::Sent(pkid),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => continue,
            Err(error) => {
                let lasted = accepted.take().map(|at| at.elapsed());
                if lasted.is_some_and(|d| d >= STABLE_CONNECTION) {
                    attempts.reset();
                }
                let reason = match &error {
                    Some(e) => {
                        attempts.note_failure();
                        e.clone()
                    }
                    None => "reconnecting with the renewed certificate".to_owned(),
                };
                let (answered, answer) = oneshot::channel();
                if net.send(Net::Down(reason, answered)).await.is_err() {
                    return;
                }
                let _ = answer.await;
                // Nothing of the old session may reach the next: requests still queued,
                // and events rumqttc queued before a failed write (a stale
                // `Outgoing::Publish` would give a new publish an old packet id).
                eventloop.clean();
                eventloop.pending.clear();
                eventloop.state = MqttState::new(eventloop.mqtt_options.inflight(), false);
                let delay = if error.is_some() {
                    attempts.delay()
                } else {
                    Duration::ZERO
                };
                tracing::debug!(device = %shared.id, ?delay, "reconnecting");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        if net.send(report).await.is_err() {
            return;
        }
    }
}

/// A connection that lasts this long starts the backoff over when it ends.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// What a publish in flight carries.
#[derive(Debug, Clone, Copy)]
enum Sent {
    Readings {
        first: i64,
        last: i64,
    },
    Message(i64),
    /// Not from the outbox (a CSR): its packet id is taken, its PUBACK changes nothing.
    Control,
}

struct Connection {
    shared: Arc<Shared>,
    client: AsyncClient,
    format: Format,
    batching: Batching,
    window: usize,
    commands: HashMap<String, CommandHandler>,
    dispatch: mpsc::Sender<(Command, CommandHandler)>,
    desired: watch::Sender<Option<Desired>>,
    connected: bool,
    /// The outbox sequence numbers to send next in this session.
    next_reading: i64,
    next_message: i64,
    /// Publishes handed to rumqttc that have no packet id yet, oldest first.
    unassigned: VecDeque<Sent>,
    /// Publishes awaiting their PUBACK, by packet id (a queue per id, so that an id reused
    /// right after its PUBACK can never be confused with its previous use).
    in_flight: HashMap<u16, VecDeque<Sent>>,
    /// Since when a batch that is not full has waited for more readings (whatever its first
    /// reading: a full outbox dropping its oldest must not start the wait over).
    lingering: Option<Instant>,
    creds: Credentials,
    renewal: Option<Renewal>,
    /// When to see whether the certificate is due for renewal.
    renewal_check: Option<Instant>,
    /// Hands a renewed certificate's transport to the network task.
    renewed: mpsc::Sender<rumqttc::Transport>,
}

impl Connection {
    async fn run(
        mut self,
        mut net: mpsc::Receiver<Net>,
        network: JoinHandle<()>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            // Only while there is room to send what lingers: otherwise the deadline, once
            // past, would wake this loop at once, over and over.
            let linger_until = self
                .lingering
                .filter(|_| self.connected && self.waiting_acks() < self.window)
                .map(|since| since + self.batching.linger);
            tokio::select! {
                biased;
                _ = stopped(&mut stop) => break,
                event = net.recv() => match event {
                    Some(event) => self.on_net(event).await,
                    None => break,
                },
                _ = self.shared.wake.notified() => {}
                _ = tokio::time::sleep_until(linger_until.unwrap_or_else(Instant::now)),
                    if linger_until.is_some() => {}
                _ = tokio::time::sleep_until(self.renewal_check.unwrap_or_else(Instant::now)),
                    if self.connected && self.renewal_check.is_some() => self.renew_if_due(),
            }
            if self.connected {
                self.pump().await;
            }
            let waiting = self.waiting_acks() as u64;
            self.shared
                .counters
                .in_flight
                .store(waiting, Ordering::Relaxed);
        }
        // A DISCONNECT tells Tellus this was meant; the network task ends once it is out.
        // Commands that arrived meanwhile were acknowledged by rumqttc: they are answered,
        // so that none ends up delivered and never answered.
        let disconnecting = self.connected && self.client.try_disconnect().is_ok();
        let drain = async {
            loop {
                let event = if disconnecting {
                    net.recv().await
                } else {
                    net.try_recv().ok()
                };
                match event {
                    None => break,
                    Some(Net::Down(_, answered)) => {
                        let _ = answered.send(());
                        break;
                    }
                    Some(Net::Publish(topic, _)) => self.stopped_before(&topic).await,
                    Some(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        network.abort();
        self.set_connected(false);
    }

    /// Answers a command that arrived while the device was stopping: with its stored result
    /// if it was answered before (a copy), else as not run.
    async fn stopped_before(&self, topic_name: &str) {
        let Some((device, DeviceTopic::Command(id))) = topic::parse(topic_name) else {
            return;
        };
        if device == self.shared.id && self.shared.take_on(&id).await {
            not_run(&self.shared, id).await;
        }
    }

    fn set_connected(&mut self, connected: bool) {
        self.connected = connected;
        self.shared
            .counters
            .connected
            .store(connected, Ordering::Relaxed);
        self.shared.connected.send_replace(connected);
    }

    async fn on_net(&mut self, event: Net) {
        match event {
            Net::Connected => {
                Shared::count(&self.shared.counters.connections, 1);
                self.set_connected(true);
                tracing::info!(device = %self.shared.id, "connected");
                // A clean session: subscribe again, and send everything waiting from the
                // start.
                let id = &self.shared.id;
                let mut filters = vec![
                    DeviceTopic::Command("+".into()).topic(id),
                    DeviceTopic::StateDesired.topic(id),
                ];
                if self.renewal.is_some() {
                    filters.push(DeviceTopic::CertsIssued.topic(id));
                }
                let subscribe = self.client.try_subscribe_many(
                    filters
                        .into_iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce)),
                );
                if let Err(e) = subscribe {
                    self.shared.error(format_args!("subscribing: {e}"));
                }
                self.next_reading = 0;
                self.next_message = 0;
                self.lingering = None;
                self.renew_if_due();
            }
            Net::Down(error, answered) => {
                // Loud once when a connection ends; quiet for each failed attempt after.
                if self.connected {
                    tracing::warn!(device = %self.shared.id, %error, "disconnected");
                } else {
                    tracing::debug!(device = %self.shared.id, %error, "connecting failed");
                }
                *lock(&self.shared.last_error) = Some(format!("connection: {error}"));
                self.set_connected(false);
                self.unassigned.clear();
                self.in_flight.clear();
                self.lingering = None;
                if let Some(renewal) = &mut self.renewal {
                    renewal.abandon();
                }
                let _ = answered.send(());
            }
            Net::Sent(pkid) => {
                if let Some(sent) = self.unassigned.pop_front() {
                    self.in_flight.entry(pkid).or_default().push_back(sent);
                }
            }
            Net::Acked(pkid) => {
                let sent = self.in_flight.get_mut(&pkid).and_then(VecDeque::pop_front);
                if self.in_flight.get(&pkid).is_some_and(VecDeque::is_empty) {
                    self.in_flight.remove(&pkid);
                }
                match sent {
                    Some(Sent::Readings { first, last }) => {
                        // Counted before the outbox says it has fewer waiting.
                        let shared = self.shared.clone();
                        let removed = self
                            .shared
                            .outbox(move |o| {
                                let n = o.remove_readings(&[(first, last)])?;
                                Shared::count(&shared.counters.acknowledged, n);
                                Ok(())
                            })
                            .await;
                        if let Err(e) = removed {
                            self.shared.error(format_args!("outbox: {e}"));
                        }
                    }
                    Some(Sent::Message(seq)) => {
                        if let Err(e) = self.shared.outbox(move |o| o.remove_message(seq)).await {
                            self.shared.error(format_args!("outbox: {e}"));
                        }
                    }
                    Some(Sent::Control) | None => {}
                }
            }
            Net::Publish(topic, payload) => self.on_publish(&topic, &payload).await,
        }
    }

    fn waiting_acks(&self) -> usize {
        self.unassigned.len() + self.in_flight.values().map(VecDeque::len).sum::<usize>()
    }

    /// Publishes from the outbox while the window has room: messages first, then readings.
    async fn pump(&mut self) {
        while self.waiting_acks() < self.window {
            // The outbox's counts spare a blocking query (after every PUBACK, say) when
            // there is nothing of a kind to send.
            let (readings, messages) = *self.shared.waiting.borrow();
            let from = self.next_message;
            let found = if messages == 0 {
                Ok(Vec::new())
            } else {
                self.shared.outbox(move |o| o.next_messages(from, 1)).await
            };
            match found {
                Ok(messages) => {
                    if let Some(m) = messages.into_iter().next() {
                        if self
                            .client
                            .try_publish(m.topic, QoS::AtLeastOnce, false, m.payload)
                            .is_err()
                        {
                            return;
                        }
                        self.next_message = m.seq + 1;
                        self.unassigned.push_back(Sent::Message(m.seq));
                        continue;
                    }
                }
                Err(e) => {
                    self.shared.error(format_args!("outbox: {e}"));
                    return;
                }
            }
            if readings == 0 {
                self.lingering = None;
                return;
            }
            let (from, max) = (self.next_reading, self.batching.max_readings.max(1));
            let stored = match self
                .shared
                .outbox(move |o| o.next_readings(from, max))
                .await
            {
                Ok(stored) => stored,
                Err(OutboxError::Corrupt(seq, why)) => {
                    // One unreadable entry must not hold up the rest: drop it, counted.
                    self.shared.error(format_args!(
                        "dropping unreadable outbox entry {seq}: {why}"
                    ));
                    match self
                        .shared
                        .outbox(move |o| o.remove_readings(&[(seq, seq)]))
                        .await
                    {
                        Ok(_) => Shared::count(&self.shared.counters.dropped, 1),
                        Err(e) => return self.shared.error(format_args!("outbox: {e}")),
                    }
                    continue;
                }
                Err(e) => {
                    self.shared.error(format_args!("outbox: {e}"));
                    return;
                }
            };
            if stored.is_empty() {
                self.lingering = None;
                return;
            }
            let take = batch_len(&stored, self.format, self.batching.max_bytes);
            let full = take < stored.len() || take >= self.batching.max_readings;
            let first = stored[0].seq;
            if !full && !self.batching.linger.is_zero() {
                match self.lingering {
                    Some(since) if since.elapsed() >= self.batching.linger => {}
                    Some(_) => return,
                    None => {
                        self.lingering = Some(Instant::now());
                        return;
                    }
                }
            }
            let batch: Vec<Reading> = stored[..take].iter().map(|s| s.reading.clone()).collect();
            let last = stored[take - 1].seq;
            let topic = self.format.topic().topic(&self.shared.id);
            let payload = self.format.encode(&batch);
            if self
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, payload)
                .is_err()
            {
                return;
            }
            Shared::count(&self.shared.counters.batches_sent, 1);
            self.lingering = None;
            self.next_reading = last + 1;
            self.unassigned.push_back(Sent::Readings { first, last });
        }
    }

    async fn on_publish(&mut self, topic_name: &str, payload: &[u8]) {
        match topic::parse(topic_name) {
            Some((device, DeviceTopic::Command(id))) if device == self.shared.id => {
                self.on_command(id, payload).await
            }
            Some((device, DeviceTopic::StateDesired)) if device == self.shared.id => {
                // An empty retained message clears the desired state of a deleted device; a
                // device registered again under the id starts its versions over.
                if payload.is_empty() {
                    self.desired.send_if_modified(|d| d.take().is_some());
                    return;
                }
                match serde_json::from_slice::<Desired>(payload) {
                    Ok(desired) => {
                        self.desired.send_if_modified(|current| {
                            let newer =
                                current.as_ref().is_none_or(|c| desired.version > c.version);
                            if newer {
                                *current = Some(desired);
                            }
                            newer
                        });
                    }
                    Err(e) => self
                        .shared
                        .error(format_args!("unreadable desired state: {e}")),
                }
            }
            Some((device, DeviceTopic::CertsIssued)) if device == self.shared.id => {
                self.on_issued(payload).await
            }
            _ => tracing::debug!(device = %self.shared.id, topic = topic_name, "ignored publish"),
        }
    }

    /// Sends a CSR if the certificate is due for renewal, and plans the next look.
    fn renew_if_due(&mut self) {
        let Some(renewal) = &mut self.renewal else {
            return;
        };
        self.renewal_check = Some(renewal.next_check());
        if !renewal.due(tellus_core::now_ms()) {
            return;
        }
        let csr = match renewal.start() {
            Ok(csr) => csr,
            Err(e) => return self.shared.error(e),
        };
        let topic = DeviceTopic::CertsCsr.topic(&self.shared.id);
        match self.client.try_publish(topic, QoS::AtLeastOnce, false, csr) {
            Ok(()) => {
                // Every publish handed to rumqttc takes its place in the packet-id queue.
                self.unassigned.push_back(Sent::Control);
                tracing::info!(device = %self.shared.id, "asked for a renewed certificate");
            }
            Err(e) => {
                renewal.abandon();
                self.shared.error(format_args!("sending the CSR: {e}"));
            }
        }
    }

    /// Takes the renewed certificate and reconnects with it.
    async fn on_issued(&mut self, payload: &[u8]) {
        let Some(renewal) = &mut self.renewal else {
            return;
        };
        let creds = match renewal.finish(&self.creds, payload) {
            Ok(creds) => creds,
            Err(e) => return self.shared.error(e),
        };
        let transport = match creds.tls_config() {
            Ok(tls) => rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(Arc::new(tls))),
            Err(e) => {
                return self
                    .shared
                    .error(format_args!("the renewed certificate: {e}"))
            }
        };
        tracing::info!(device = %self.shared.id, "certificate renewed; reconnecting with it");
        self.creds = creds;
        // The network task may be busy handing over events; it takes this on its next turn.
        let _ = self.renewed.try_send(transport);
    }

    async fn on_command(&mut self, id: String, payload: &[u8]) {
        if !self.shared.take_on(&id).await {
            return;
        }
        let failed = |why: String| serde_json::to_vec(&json!({ "ok": false, "output": why }));
        let command = match serde_json::from_slice::<Command>(payload) {
            Ok(c) if c.id == id => c,
            Ok(c) => {
                let why = format!("command id {:?} does not match its topic", c.id);
                let body = failed(why).unwrap_or_default();
                return self.shared.store_result(id, body, true).await;
            }
            Err(e) => {
                let body = failed(format!("unreadable command: {e}")).unwrap_or_default();
                return self.shared.store_result(id, body, true).await;
            }
        };
        let Some(handler) = self.commands.get(&command.name).cloned() else {
            let why = format!("unknown command {:?}", command.name);
            return self
                .shared
                .store_result(id, failed(why).unwrap_or_default(), true)
                .await;
        };
        if self.dispatch.try_send((command, handler)).is_err() {
            let why = "the device is busy: too many commands waiting".to_owned();
            self.shared
                .store_result(id, failed(why).unwrap_or_default(), true)
                .await;
        }
    }
}

/// How many of `stored` (at least one) go into the next message of `format`: within
/// `max_bytes`, and never two readings that write the same series at the same time (Tellus
/// refuses such a message whole).
fn batch_len(stored: &[Stored], format: Format, max_bytes: usize) -> usize {
    let mut keys = HashSet::new();
    let mut bytes = format.empty_size();
    for (i, s) in stored.iter().enumerate() {
        let size = s.reading.size(format);
        let repeats = s.reading.keys().any(|k| keys.contains(&k));
        if i > 0 && (bytes + size > max_bytes || repeats) {
            return i;
        }
        keys.extend(s.reading.keys());
        bytes += size;
    }
    stored.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(seq: i64, reading: Reading) -> Stored {
        Stored {
            seq,
            bytes: 0,
            reading,
        }
    }

    #[test]
    fn a_batch_ends_before_a_repeated_series_or_the_byte_limit() {
        let a = stored(1, Reading::at(5).with("t", 1.0).with("h", 2.0));
        let b = stored(2, Reading::at(6).with("t", 1.0));
        let c = stored(3, Reading::at(5).with("h", 3.0));
        let json = Format::Json;
        assert_eq!(
            batch_len(&[a.clone(), b.clone(), c.clone()], json, 1 << 20),
            2
        );
        // The same metric at another time, or another metric at the same time, is fine.
        let d = stored(4, Reading::at(5).with("p", 3.0));
        assert_eq!(batch_len(&[a.clone(), b.clone(), d], json, 1 << 20), 3);
        // Server-stamped readings share one time per message.
        let s1 = stored(5, Reading::server_time().with("t", 1.0));
        let s2 = stored(6, Reading::server_time().with("t", 2.0));
        assert_eq!(batch_len(&[s1, s2], json, 1 << 20), 1);
        // Bytes, measured in the form sent: one reading always goes, however large.
        for format in [Format::Json, Format::Protobuf] {
            let both = format.encode(&[a.reading.clone(), b.reading.clone()]).len();
            assert_eq!(batch_len(&[a.clone(), b.clone()], format, 1), 1);
            assert_eq!(batch_len(&[a.clone(), b.clone()], format, both - 2), 1);
            let fits = format.empty_size() + a.reading.size(format) + b.reading.size(format);
            assert!(fits >= both);
            assert_eq!(batch_len(&[a.clone(), b.clone()], format, fits), 2);
        }
    }
}
