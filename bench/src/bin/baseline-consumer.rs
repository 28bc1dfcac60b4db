//! The baseline the benchmark measures Tellus against: Mosquitto with a hand-written consumer
//! that subscribes to every device's telemetry and writes it into the same embedded store,
//! with the same durability. This is that consumer, written as a careful user would.
//!
//! It reuses Tellus's own ingest pipeline and SQLite store (fsync per commit), so that the
//! comparison isolates the broker architecture: devices → Mosquitto → one MQTT subscriber →
//! ingest, against devices → the gate → ingest.
//!
//! Why acknowledge only after the commit: Mosquitto forgets a QoS 1 message once the
//! subscriber's PUBACK arrives. Acking on receipt would lose every message in flight when
//! the consumer or its disk fails; acking after ingest has committed the message (or kept it
//! as a dead letter) makes the path from Mosquitto into the store at-least-once, the same
//! promise the gate makes to devices. The session is persistent (clean session off), so
//! what is unacknowledged when the connection drops is resent by Mosquitto on reconnect.
//!
//! Layout: one task, [`Consumer::run`], owns the MQTT connection. It polls rumqttc's event
//! loop while fewer than `--inflight` messages await their commit, hands telemetry to ingest,
//! waits for the commits in arrival order and writes the acknowledgements. A small HTTP
//! server answers `GET /latest/{device}` and `GET /stats`.
//!
//! stdout carries two lines for the benchmark: `listening http=IP:PORT` once the HTTP
//! listener is bound and Mosquitto has acknowledged the subscription, and on SIGTERM or
//! SIGINT the final stats as one JSON object. Logs go to stderr (`RUST_LOG`, default info).

use std::{
    collections::VecDeque,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context};
use axum::{
    extract::{rejection::PathRejection, Path as UrlPath, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use bytes::Bytes;
use clap::Parser;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Packet, PubAck, PubRec,
    Publish, QoS, SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use serde::Serialize;
use tellus_core::{
    handoff::Pending, now_ms, topic::DeviceTopic, DeviceId, Durable, IngestError, IngestSender,
    Live, RuleFeed, TimestampMs, Value,
};
use tellus_ingest::{Ingest, IngestConfig, SqliteStore, StoreConfig, TelemetryStore};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{oneshot, watch},
};
use tracing::{debug, error, info, warn};
use tracing_subscriber::EnvFilter;

/// Every device's JSON telemetry.
const TELEMETRY_FILTER: &str = "devices/+/telemetry";
/// Largest MQTT packet accepted from Mosquitto: telemetry messages are small, and this is
/// what bounds the memory one message can take.
const MAX_INCOMING_PACKET: usize = 1 << 20;
/// The consumer only sends SUBSCRIBE, PUBACK, PINGREQ and DISCONNECT.
const MAX_OUTGOING_PACKET: usize = 64 << 10;
/// Wait before polling the event loop again after a connection error (it then reconnects).
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// Longest a write of acknowledgements may take before the connection is given up (what
/// rumqttc allows its own flushes by default).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the shutdown waits for open HTTP connections.
const HTTP_DRAIN_DEADLINE: Duration = Duration::from_secs(2);
/// Ingest hand-off: messages and payload bytes between submit and commit (as
/// `rules/benches/throughput.rs` sets it up).
const INGEST_QUEUE: usize = 10_000;
const INGEST_BYTES: usize = 64 << 20;

/// Mosquitto → Tellus's ingest pipeline and embedded store, acknowledging after commit.
#[derive(Debug, Parser)]
#[command(name = "baseline-consumer", version, about)]
struct Args {
    /// Mosquitto's address.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Mosquitto's TLS port.
    #[arg(long)]
    port: u16,
    /// CA certificate(s) (PEM) that Mosquitto's server certificate chains to.
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// This consumer's client certificate (PEM); Mosquitto takes its CN as the username.
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// MQTT client id: the persistent session Mosquitto keeps for this consumer.
    #[arg(long, default_value = "bench-consumer")]
    client_id: String,
    /// Where the store lives: DIR/telemetry.db.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Address of the HTTP server (`/latest/{device}`, `/stats`).
    #[arg(long, default_value = "127.0.0.1:0")]
    http_addr: SocketAddr,
    /// Messages that may await their commit at once; past that the consumer stops reading
    /// from Mosquitto.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    inflight: u32,
}

/// What the consumer has done, for `GET /stats` and the final line.
#[derive(Debug, Default)]
struct Stats {
    /// Every PUBLISH from Mosquitto, redeliveries included.
    received: AtomicU64,
    stored: AtomicU64,
    dead_lettered: AtomicU64,
    /// Not `devices/{valid id}/telemetry`: acknowledged without storing.
    ignored: AtomicU64,
    /// PUBACKs written to Mosquitto (a QoS 0 message has none).
    acked: AtomicU64,
    /// Commits that failed: not acknowledged, so Mosquitto resends them after a reconnect.
    failed: AtomicU64,
}

#[derive(Debug, Serialize)]
struct StatsSnapshot {
    received: u64,
    stored: u64,
    dead_lettered: u64,
    ignored: u64,
    acked: u64,
    failed: u64,
}

impl Stats {
    fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            received: get(&self.received),
            stored: get(&self.stored),
            dead_lettered: get(&self.dead_lettered),
            ignored: get(&self.ignored),
            acked: get(&self.acked),
            failed: get(&self.failed),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colours only for a person watching; the benchmark keeps the log as a file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    run(Args::parse()).await
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Ask for the signals first, so that one arriving during start-up is not the default
    // action (death without the final line).
    let (stop_tx, stop) = watch::channel(false);
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let signalled = stop_tx.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = int.recv() => info!("SIGINT: stopping"),
        }
        signalled.send_replace(true);
    });

    // Err only if a provider is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = tls_config(&args.ca, &args.cert, &args.key)?;

    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let db = args.data_dir.join("telemetry.db");
    let store: Arc<dyn TelemetryStore> = Arc::new(
        // Fsync per commit: the durability Tellus has by default.
        SqliteStore::open_with(&db, StoreConfig::default())
            .with_context(|| format!("opening the store {}", db.display()))?,
    );
    let (ingest_tx, ingest_rx) = IngestSender::channel(INGEST_QUEUE, INGEST_BYTES);
    let ingest = Ingest::spawn(
        ingest_rx,
        store.clone(),
        IngestConfig::default(),
        Live::default(),
        RuleFeed::none(),
    )
    .context("starting ingest")?;

    let stats = Arc::new(Stats::default());

    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("binding HTTP on {}", args.http_addr))?;
    let http_addr = listener.local_addr().context("HTTP address")?;
    let app = Router::new()
        .route("/latest/{device}", get(latest))
        .route("/stats", get(stats_json))
        .with_state(Http {
            store,
            stats: stats.clone(),
        });
    let mut http_stop = stop.clone();
    let http = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stopped(&mut http_stop).await })
            .await
        {
            error!(error = %e, "HTTP server failed");
        }
    });

    let mut options = MqttOptions::new(args.client_id.clone(), args.host.clone(), args.port);
    options
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )))
        .set_keep_alive(Duration::from_secs(30))
        // A persistent session: Mosquitto queues for the consumer while it reconnects, and
        // resends what it had not acknowledged.
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET);
    // The client's request queue carries only SUBSCRIBE (acknowledgements bypass it, see
    // `Consumer::write_acks`).
    let (client, eventloop) = AsyncClient::new(options, 8);

    let (subscribed_tx, subscribed) = oneshot::channel();
    let consumer = Consumer {
        eventloop,
        client,
        ingest: Some(ingest_tx),
        inflight: args.inflight as usize,
        stats: stats.clone(),
        stop: stop.clone(),
        subscribed: Some(subscribed_tx),
        generation: 0,
        waiting: VecDeque::new(),
        due: Vec::new(),
        reconnect: false,
        subscribe_due: false,
    };
    let stop_all = stop_tx.clone();
    let consumer = tokio::spawn(async move {
        let outcome = consumer.run().await;
        if let Err(e) = &outcome {
            error!(error = format!("{e:#}"), "consumer stopping");
            // Nothing left to serve: the rest of the process stops too.
            stop_all.send_replace(true);
        }
        outcome
    });

    let mut waiting = stop.clone();
    tokio::select! {
        ok = subscribed => if ok.is_ok() {
            info!(http = %http_addr, filter = TELEMETRY_FILTER, "subscribed; serving");
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening http={http_addr}").context("writing stdout")?;
            out.flush().context("writing stdout")?;
        },
        _ = stopped(&mut waiting) => {}
    }
    stopped(&mut waiting).await;

    // The consumer stops reading, drops its IngestSender (which lets ingest commit what it
    // holds and stop), acknowledges what ingest commits, and disconnects.
    let outcome = consumer.await.context("the MQTT task panicked")?;
    ingest.finished().await;
    if tokio::time::timeout(HTTP_DRAIN_DEADLINE, http)
        .await
        .is_err()
    {
        warn!("HTTP connections still open at shutdown; leaving them");
    }

    let line = serde_json::to_string(&stats.snapshot()).context("stats as JSON")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").context("writing stdout")?;
    out.flush().context("writing stdout")?;
    outcome
}

/// A rustls client configuration trusting `ca` and presenting `cert` with `key`.
fn tls_config(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let read =
        |path: &Path| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(&read(ca)?) {
        let der = der.with_context(|| format!("parsing {}", ca.display()))?;
        roots
            .add(der)
            .with_context(|| format!("using {} as a CA", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("{} holds no certificate", ca.display());
    }
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate", cert.display());
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?)
        .with_context(|| format!("parsing {}", key.display()))?;
    rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key_der)
        .context("the client certificate and key do not make a TLS identity")
}

/// The device of a `devices/{id}/telemetry` topic with a valid id.
fn telemetry_device(topic: &str) -> Option<DeviceId> {
    let id = topic.strip_prefix("devices/")?.strip_suffix("/telemetry")?;
    DeviceId::parse(id).ok()
}

/// A message between receipt and acknowledgement.
struct Job {
    /// Kept for its packet id and QoS: the payload went to ingest.
    publish: Publish,
    /// The connection it came on.
    generation: u64,
    /// The commit to wait for; `None` for an ignored message, acknowledged as soon as
    /// those before it are.
    commit: Option<Pending>,
}

/// An acknowledgement to write once the connection is free for it.
struct Ack {
    pkid: u16,
    qos: QoS,
    generation: u64,
}

impl Ack {
    fn of(job: &Job) -> Ack {
        Ack {
            pkid: job.publish.pkid,
            qos: job.publish.qos,
            generation: job.generation,
        }
    }
}

/// The MQTT side: one task owns the connection, the messages awaiting commit and the
/// acknowledgements due.
struct Consumer {
    eventloop: EventLoop,
    client: AsyncClient,
    /// Dropped when stopping, so that ingest drains and stops.
    ingest: Option<IngestSender>,
    /// `--inflight`: most entries in `waiting`.
    inflight: usize,
    stats: Arc<Stats>,
    stop: watch::Receiver<bool>,
    /// Told at the first successful SUBACK.
    subscribed: Option<oneshot::Sender<()>>,
    /// Counts MQTT connections. Packet ids belong to a connection: after a reconnect,
    /// Mosquitto resends every unacknowledged message under its old id, so an ack left over
    /// from an earlier connection is dropped (the resent copy gets its own) rather than
    /// sent, where it could settle a different message that reused the id.
    generation: u64,
    /// In arrival order, which is ingest's commit order and MQTT's order for PUBACKs.
    waiting: VecDeque<Job>,
    /// Committed, acknowledgement not yet written; at most `inflight` plus the ignored.
    due: Vec<Ack>,
    /// A commit failed: the message was not acknowledged, and only a new connection makes
    /// Mosquitto send it again.
    reconnect: bool,
    subscribe_due: bool,
}

impl Consumer {
    /// Consumes until told to stop, then acknowledges what ingest still commits and
    /// disconnects. An error means the consumer cannot go on (ingest stopped, or Mosquitto
    /// refused the subscription).
    async fn run(mut self) -> anyhow::Result<()> {
        let outcome = self.consume().await;
        // Stop: read nothing more, let ingest finish what it holds, acknowledge it.
        self.ingest = None;
        loop {
            self.settle_ready();
            self.write_acks().await;
            match front_commit(&mut self.waiting).await {
                Some(outcome) => self.settle_front(outcome),
                None => break,
            }
        }
        self.disconnect().await;
        outcome
    }

    async fn consume(&mut self) -> anyhow::Result<()> {
        loop {
            self.settle_ready();
            self.write_acks().await;
            if self.reconnect {
                self.reconnect = false;
                warn!("reconnecting so that Mosquitto resends what was not committed");
                // Drops the socket without DISCONNECT: the session and its unacknowledged
                // messages stay with Mosquitto, which resends them on the next connection.
                self.eventloop.clean();
            }
            // try_: only polling drains the request queue, so waiting for room here would
            // never end; a full queue just means trying again after the next event.
            if self.subscribe_due
                && self
                    .client
                    .try_subscribe(TELEMETRY_FILTER, QoS::AtLeastOnce)
                    .is_ok()
            {
                self.subscribe_due = false;
            }
            // While `inflight` messages await their commit the event loop is not polled, the
            // socket is not read, and TCP holds Mosquitto back.
            let reading = self.waiting.len() < self.inflight;
            // Dropping a poll half-way is safe here: it is then waiting to read (buffered by
            // its codec), for a request, or for the keep-alive tick; its writes never wait,
            // since `write_acks` leaves the write buffer flushed.
            tokio::select! {
                biased;
                _ = stopped(&mut self.stop) => return Ok(()),
                outcome = front_commit(&mut self.waiting), if !self.waiting.is_empty() => {
                    if let Some(outcome) = outcome {
                        self.settle_front(outcome);
                    }
                }
                event = self.eventloop.poll(), if reading => self.event(event).await?,
            }
        }
    }

    async fn event(&mut self, event: Result<Event, ConnectionError>) -> anyhow::Result<()> {
        match event {
            Ok(Event::Incoming(Incoming::Publish(publish))) => self.received(publish).await?,
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                self.generation += 1;
                info!(
                    session_present = ack.session_present,
                    "connected to Mosquitto"
                );
                // Also with a session present: the SUBACK is what says we are serving (and a
                // broker restarted without persistence has forgotten the session).
                self.subscribe_due = true;
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|code| matches!(code, SubscribeReasonCode::Failure))
                {
                    bail!(
                        "Mosquitto refused the subscription to {TELEMETRY_FILTER} (check its ACL)"
                    );
                }
                info!(filter = TELEMETRY_FILTER, "subscribed");
                if let Some(tx) = self.subscribed.take() {
                    let _ = tx.send(());
                }
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "MQTT connection failed; reconnecting in {RECONNECT_DELAY:?}");
                tokio::select! {
                    biased;
                    _ = stopped(&mut self.stop) => {}
                    _ = tokio::time::sleep(RECONNECT_DELAY) => {}
                }
            }
        }
        Ok(())
    }

    /// One PUBLISH from Mosquitto: telemetry goes to ingest exactly as the gate hands it
    /// over, and its acknowledgement waits for the commit.
    async fn received(&mut self, mut publish: Publish) -> anyhow::Result<()> {
        bump(&self.stats.received);
        let commit = match (telemetry_device(&publish.topic), &self.ingest) {
            (Some(device), Some(ingest)) => {
                // Ingest owns the payload from here; the job keeps only what the ack needs.
                let payload = std::mem::replace(&mut publish.payload, Bytes::new());
                // Waits while ingest's queue is full: backpressure, as in the gate.
                let pending = ingest
                    .submit(device, DeviceTopic::Telemetry, payload, now_ms(), true)
                    .await
                    .context("ingest stopped")?
                    .context("ingest gave no completion handle")?;
                Some(pending)
            }
            (Some(_), None) => bail!("a message arrived after ingest was closed"),
            (None, _) => {
                bump(&self.stats.ignored);
                debug!(topic = %publish.topic.escape_debug(), "not device telemetry; acknowledged, not stored");
                None
            }
        };
        self.waiting.push_back(Job {
            publish,
            generation: self.generation,
            commit,
        });
        Ok(())
    }

    /// Moves every message at the front whose outcome is already known (ignored, or
    /// committed) to the acknowledgements due: one write for a whole ingest batch.
    fn settle_ready(&mut self) {
        while let Some(job) = self.waiting.front_mut() {
            let outcome = match &mut job.commit {
                None => None,
                Some(pending) => match pending.try_recv() {
                    Ok(outcome) => Some(Some(outcome)),
                    Err(oneshot::error::TryRecvError::Closed) => Some(None),
                    Err(oneshot::error::TryRecvError::Empty) => return,
                },
            };
            match outcome {
                Some(outcome) => self.settle_front(outcome),
                None => {
                    if let Some(job) = self.waiting.pop_front() {
                        self.due.push(Ack::of(&job));
                    }
                }
            }
        }
    }

    /// Records the outcome of the oldest commit (`None`: ingest dropped it unanswered).
    fn settle_front(&mut self, outcome: Option<Result<Durable, IngestError>>) {
        let Some(job) = self.waiting.pop_front() else {
            return;
        };
        let topic = job.publish.topic.escape_debug();
        match outcome {
            Some(Ok(Durable::Stored)) => bump(&self.stats.stored),
            Some(Ok(Durable::DeadLettered(why))) => {
                bump(&self.stats.dead_lettered);
                debug!(topic = %topic, reason = %why, "kept as a dead letter");
            }
            Some(Err(e)) => {
                bump(&self.stats.failed);
                error!(topic = %topic, error = %e, "commit failed; not acknowledged");
                self.reconnect = true;
                return;
            }
            None => {
                bump(&self.stats.failed);
                error!(topic = %topic, "ingest dropped the message; not acknowledged");
                self.reconnect = true;
                return;
            }
        }
        self.due.push(Ack::of(&job));
    }

    /// Writes the acknowledgements due, in order, with one flush.
    ///
    /// Straight onto the connection rather than through `AsyncClient::ack`: the event loop
    /// takes one queued request per turn while one network read brings up to ten
    /// PUBLISHes, so under load the PUBACKs fell ever further behind (20,000 stored, 1,800
    /// acknowledged), and Mosquitto 2.0 kept sending regardless. rumqttc's state keeps
    /// nothing for a PUBACK or PUBREC it sends (only an event for the caller), so writing
    /// the packet between polls is what its own request path does, batched.
    async fn write_acks(&mut self) {
        if self.due.is_empty() {
            return;
        }
        let Some(network) = self.eventloop.network.as_mut() else {
            // The connection they belong to is gone; Mosquitto resends those messages.
            self.due.clear();
            return;
        };
        let generation = self.generation;
        let due = &mut self.due;
        let written = tokio::time::timeout(WRITE_TIMEOUT, async {
            let mut written = 0;
            for ack in due.drain(..) {
                if ack.generation != generation {
                    debug!(
                        pkid = ack.pkid,
                        "ack from an earlier connection dropped; Mosquitto resends the message"
                    );
                    continue;
                }
                let packet = match ack.qos {
                    QoS::AtMostOnce => continue,
                    QoS::AtLeastOnce => Packet::PubAck(PubAck::new(ack.pkid)),
                    // Not with a QoS 1 subscription; answered the way rumqttc would.
                    QoS::ExactlyOnce => Packet::PubRec(PubRec::new(ack.pkid)),
                };
                network.write(packet).await?;
                written += 1;
            }
            network.flush().await.map(|()| written)
        })
        .await;
        match written {
            Ok(Ok(written)) => {
                self.stats.acked.fetch_add(written, Ordering::Relaxed);
                return;
            }
            Ok(Err(e)) => warn!(error = %e, "writing acknowledgements failed; reconnecting"),
            Err(_) => warn!(
                "Mosquitto did not take the acknowledgements in {WRITE_TIMEOUT:?}; reconnecting"
            ),
        }
        // What was not written is resent by Mosquitto on the next connection.
        self.due.clear();
        self.eventloop.clean();
    }

    /// Ends the session's connection politely, so that Mosquitto does not wait for the
    /// keep-alive; the session itself stays for the next run.
    async fn disconnect(&mut self) {
        let Some(network) = self.eventloop.network.as_mut() else {
            return;
        };
        let sent = async {
            network.write(Packet::Disconnect).await?;
            network.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, sent).await {
            Ok(Ok(())) => info!("disconnected from Mosquitto"),
            Ok(Err(e)) => warn!(error = %e, "DISCONNECT failed"),
            Err(_) => warn!("DISCONNECT timed out"),
        }
        self.eventloop.clean();
    }
}

/// Resolves once the process is told to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which happens only as the process ends.
    let _ = stop.wait_for(|s| *s).await;
}

/// The outcome of the oldest commit once it is known; `None` at once if there is no commit
/// at the front (nothing waiting, or an ignored message, which `settle_ready` takes).
async fn front_commit(waiting: &mut VecDeque<Job>) -> Option<Option<Result<Durable, IngestError>>> {
    let pending = waiting.front_mut()?.commit.as_mut()?;
    Some(pending.await.ok())
}

#[derive(Clone)]
struct Http {
    store: Arc<dyn TelemetryStore>,
    stats: Arc<Stats>,
}

#[derive(Serialize)]
struct Point {
    metric: String,
    ts: TimestampMs,
    value: Value,
}

fn http_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// `GET /latest/{device}`: the newest point of each of the device's metrics.
async fn latest(
    State(http): State<Http>,
    device: Result<UrlPath<String>, PathRejection>,
) -> Response {
    let device = match device.map(|UrlPath(d)| DeviceId::parse(&d)) {
        Ok(Ok(device)) => device,
        Ok(Err(e)) => return http_error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(_) => return http_error(StatusCode::BAD_REQUEST, "bad device id in the path"),
    };
    // SQLite blocks: off the async workers.
    let store = http.store.clone();
    match tokio::task::spawn_blocking(move || store.latest(&device)).await {
        Ok(Ok(rows)) => Json(
            rows.into_iter()
                .map(|(metric, ts, value)| Point { metric, ts, value })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Ok(Err(e)) => {
            error!(error = %e, "latest: store query failed");
            http_error(StatusCode::INTERNAL_SERVER_ERROR, "store error")
        }
        Err(e) => {
            error!(error = %e, "latest: store query task failed");
            http_error(StatusCode::INTERNAL_SERVER_ERROR, "store error")
        }
    }
}

/// `GET /stats`: the counters.
async fn stats_json(State(http): State<Http>) -> Json<StatsSnapshot> {
    Json(http.stats.snapshot())
}
