//! The gate: Tellus's only network door for devices.
//!
//! [`run`] accepts TCP connections and gives each one its own task ([`connection`]), so a
//! slow or idle socket can never hold up another device. That task
//! 1. runs the TLS handshake under a deadline, requiring a client certificate from the fleet
//!    CA or a registered external CA ([`trust`]), and takes the device id from its CN;
//! 2. reads CONNECT under a deadline, checks that the device is registered and enabled and
//!    the certificate recorded and not revoked, that the client id is the device id (an
//!    empty one becomes it) and that the will topic is allowed;
//! 3. opens a link to the routing core with the gate's secret credential, relays CONNACK;
//! 4. checks every packet the device sends against its ACL. Telemetry goes to ingest and is
//!    acknowledged only once durable; a CSR on `certs/csr` is answered by the gate itself;
//!    everything else goes to the routing core.
//!
//! One writer task per connection owns the device's socket for writing and interleaves whole
//! frames from the routing core with the gate's own acknowledgements, so a PUBACK never lands
//! inside another frame. The gate acknowledges every device publish itself, in the order the
//! publishes arrived, each once its message is safe (see [`connection`]).

pub mod audit;
#[doc(hidden)]
pub mod codec;
mod connection;
mod frames;
#[doc(hidden)]
pub use frames::{fuzz_frames, fuzz_packets, FrameError};
mod rate;
pub mod sessions;
pub mod trust;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use tellus_core::{Change, DeviceId, IngestSender, Registry};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use self::{
    audit::AuditLog,
    sessions::Sessions,
    trust::{ServerIdentity, Trust},
};
use crate::{
    devices::DeviceEvent,
    pki::Pki,
    routing::{Publisher, RoutingCore},
};

/// How often the gate reads the registry's changes (revocations, disables, deletions).
pub const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// Limits of the gate.
#[derive(Debug, Clone)]
pub struct GateConfig {
    /// Longest a TLS handshake may take from the TCP accept.
    pub handshake_timeout: Duration,
    /// Longest from the end of the handshake to a complete CONNECT.
    pub connect_timeout: Duration,
    /// Largest MQTT packet accepted from a device, in bytes.
    pub max_packet_size: usize,
    /// Most simultaneous device connections; further ones wait in the accept backlog.
    pub max_connections: usize,
    /// Most acknowledgements of one connection waiting for their message to be safe
    /// (telemetry committed, anything else taken by the routing core); past this the gate
    /// stops reading that socket.
    pub max_inflight: usize,
    /// Longest one write to a device may take; a device that stops reading is closed.
    pub write_timeout: Duration,
    /// Sustained rate of packets a connection may start (PUBLISH, SUBSCRIBE, UNSUBSCRIBE,
    /// PINGREQ) per second (0: unlimited). Over it the gate stops reading that socket until
    /// the device is back within its rate: slowed, not cut off.
    pub max_messages_per_second: u32,
    /// Publishes a connection may send at once above its rate (the token bucket's size).
    pub message_burst: u32,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            max_packet_size: 256 * 1024,
            max_connections: 10_000,
            max_inflight: 256,
            write_timeout: Duration::from_secs(10),
            max_messages_per_second: 1000,
            message_burst: 1000,
        }
    }
}

/// What the gate has seen; every refusal is counted by reason.
#[derive(Debug, Default)]
pub struct GateStats {
    /// Whether the gate takes connections: set once its accept loop runs, cleared when it
    /// stops accepting (at shutdown). Readiness (`GET /readyz`) reads it.
    pub listening: AtomicBool,
    pub accepted: AtomicU64,
    pub connected: AtomicU64,
    pub active: AtomicU64,
    pub handshake_failed: AtomicU64,
    pub handshake_timeout: AtomicU64,
    pub connect_timeout: AtomicU64,
    pub refused_unknown_device: AtomicU64,
    pub refused_client_id: AtomicU64,
    pub keep_alive_expired: AtomicU64,
    pub packet_too_large: AtomicU64,
    pub connections_limited: AtomicU64,
    pub rate_limited: AtomicU64,
    pub audit_dropped: AtomicU64,
    pub closed_by_registry: AtomicU64,
    pub taken_over: AtomicU64,
    pub refused_disabled: AtomicU64,
    pub refused_revoked: AtomicU64,
    pub refused_unavailable: AtomicU64,
    pub refused_certificate: AtomicU64,
    pub refused_protocol: AtomicU64,
    pub acl_denied: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub telemetry_received: AtomicU64,
    /// Other publishes of devices the ACL allowed, by topic: reported state, command
    /// results, events, certificate requests.
    pub state_reports: AtomicU64,
    pub command_results: AtomicU64,
    pub events: AtomicU64,
    pub csrs: AtomicU64,
    pub forwarded: AtomicU64,
    /// MQTT 5 publishes whose payload is not what their payload format indicator says.
    pub payload_invalid: AtomicU64,
}

/// A copy of [`GateStats`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GateStatsSnapshot {
    pub listening: bool,
    pub accepted: u64,
    pub connected: u64,
    pub active: u64,
    pub handshake_failed: u64,
    pub handshake_timeout: u64,
    pub connect_timeout: u64,
    pub refused_unknown_device: u64,
    pub refused_client_id: u64,
    pub keep_alive_expired: u64,
    pub packet_too_large: u64,
    pub connections_limited: u64,
    pub rate_limited: u64,
    pub audit_dropped: u64,
    pub closed_by_registry: u64,
    pub taken_over: u64,
    pub refused_disabled: u64,
    pub refused_revoked: u64,
    pub refused_unavailable: u64,
    pub refused_certificate: u64,
    pub refused_protocol: u64,
    pub acl_denied: u64,
    pub protocol_errors: u64,
    pub telemetry_received: u64,
    pub state_reports: u64,
    pub command_results: u64,
    pub events: u64,
    pub csrs: u64,
    pub forwarded: u64,
    /// MQTT 5 publishes whose payload is not what their payload format indicator says.
    pub payload_invalid: u64,
}

impl GateStats {
    pub fn snapshot(&self) -> GateStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        GateStatsSnapshot {
            listening: self.listening.load(Ordering::Relaxed),
            accepted: get(&self.accepted),
            connected: get(&self.connected),
            active: get(&self.active),
            handshake_failed: get(&self.handshake_failed),
            handshake_timeout: get(&self.handshake_timeout),
            connect_timeout: get(&self.connect_timeout),
            refused_unknown_device: get(&self.refused_unknown_device),
            refused_client_id: get(&self.refused_client_id),
            keep_alive_expired: get(&self.keep_alive_expired),
            packet_too_large: get(&self.packet_too_large),
            connections_limited: get(&self.connections_limited),
            rate_limited: get(&self.rate_limited),
            audit_dropped: get(&self.audit_dropped),
            closed_by_registry: get(&self.closed_by_registry),
            taken_over: get(&self.taken_over),
            refused_disabled: get(&self.refused_disabled),
            refused_revoked: get(&self.refused_revoked),
            refused_unavailable: get(&self.refused_unavailable),
            refused_certificate: get(&self.refused_certificate),
            refused_protocol: get(&self.refused_protocol),
            acl_denied: get(&self.acl_denied),
            protocol_errors: get(&self.protocol_errors),
            telemetry_received: get(&self.telemetry_received),
            state_reports: get(&self.state_reports),
            command_results: get(&self.command_results),
            events: get(&self.events),
            csrs: get(&self.csrs),
            forwarded: get(&self.forwarded),
            payload_invalid: get(&self.payload_invalid),
        }
    }
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Everything a connection task needs, shared by all of them.
pub struct Gate {
    /// Swapped whole when the set of trusted CAs changes; connections take the current one.
    pub trust: RwLock<Arc<Trust>>,
    /// To rebuild the trust.
    pub server_identity: ServerIdentity,
    pub registry: Arc<dyn Registry>,
    pub ingest: IngestSender,
    pub routing: RoutingCore,
    pub config: GateConfig,
    pub stats: Arc<GateStats>,
    pub sessions: Arc<Sessions>,
    pub audit: AuditLog,
    /// Signs the CSRs devices send to rotate their certificates.
    pub pki: Arc<Pki>,
    /// Tellus's own link into the routing core, for the certificates it issues.
    pub publisher: Publisher,
    /// What the device service hears of devices: subscriptions, deliveries, results.
    pub device_events: tokio::sync::mpsc::Sender<DeviceEvent>,
    /// Where device events (`events/{name}`) go for rules, besides the routing core.
    pub rules: tellus_core::RuleFeed,
}

/// Says the gate accepts connections while it lives: dropped on any way out of the accept
/// loop (a panic included), readiness then says it does not.
struct Listening(Arc<Gate>);

impl Listening {
    fn set(gate: Arc<Gate>) -> Listening {
        gate.stats.listening.store(true, Ordering::Relaxed);
        Listening(gate)
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.stats.listening.store(false, Ordering::Relaxed);
    }
}

/// Accepts device connections on `listener` until `shutdown` is cancelled, then lets every
/// connection finish: each stops reading, writes the acknowledgements of what ingest has
/// committed, and closes. Returns when the last connection task has ended; the gate (and so
/// its `IngestSender`) is dropped then, which lets ingest drain and stop.
pub async fn run(listener: TcpListener, gate: Gate, shutdown: CancellationToken) {
    let gate = Arc::new(gate);
    let slots = Arc::new(Semaphore::new(gate.config.max_connections.max(1)));
    let tasks = TaskTracker::new();
    // Where the watcher starts reading, taken before the first connection is accepted so
    // that no change made after it is missed.
    let Some(since) = last_change(&gate, &shutdown).await else {
        return;
    };
    let watcher = tokio::spawn(watch_registry(gate.clone(), since, shutdown.clone()));
    let listening = Listening::set(gate.clone());
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // At the limit: further connections wait in the listen backlog.
                bump(&gate.stats.connections_limited);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                }
            }
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        bump(&gate.stats.accepted);
        let gate = gate.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            connection::serve(&gate, tcp, peer, shutdown).await;
            drop(permit);
        });
    }
    drop(listening);
    drop(listener);
    tasks.close();
    info!(
        connections = tasks.len(),
        "gate stopped accepting; closing connections"
    );
    tasks.wait().await;
    let _ = watcher.await;
}

/// The registry's newest change, retried until it can be read (or the gate is stopped).
async fn last_change(gate: &Arc<Gate>, shutdown: &CancellationToken) -> Option<i64> {
    let mut wait = Duration::from_millis(100);
    loop {
        let registry = gate.registry.clone();
        match tokio::task::spawn_blocking(move || registry.last_change()).await {
            Ok(Ok(seq)) => return Some(seq),
            Ok(Err(e)) => warn!(error = %e, "cannot read the registry's change log yet; retrying"),
            Err(_) => warn!("reading the registry's change log failed; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// Closes the sessions that the registry's changes no longer allow, polling every
/// [`WATCH_INTERVAL`]. Reading changes rather than being called by the API means a change
/// made anywhere (the API, the CLI, another node on a shared registry) reaches this gate.
async fn watch_registry(gate: Arc<Gate>, mut last: i64, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let registry = gate.registry.clone();
        let changes = match tokio::task::spawn_blocking(move || registry.changes(last, 1_000)).await
        {
            Ok(Ok(changes)) => changes,
            Ok(Err(e)) => {
                warn!(error = %e, "reading the registry's change log failed");
                continue;
            }
            Err(_) => continue,
        };
        for (seq, change) in changes {
            last = seq;
            let closed = match &change {
                Change::TrustChanged => {
                    reload_trust(&gate).await;
                    false
                }
                Change::Unknown => false,
                Change::Revoked { device, serial } => {
                    gate.sessions
                        .close_serial(device, serial, "certificate revoked")
                }
                Change::Disabled { device } => gate.sessions.close(device, "device disabled"),
                Change::Deleted { device } => {
                    // What the routing core keeps for it (its desired state) goes too,
                    // whether the API or the command line deleted it.
                    let deleted = DeviceEvent::Deleted {
                        device: device.clone(),
                    };
                    let _ = gate.device_events.send(deleted).await;
                    // The device may have been registered again since, and be connected
                    // with its new certificate: only a session on another is closed.
                    let valid = valid_serials(&gate, device).await;
                    gate.sessions
                        .close_unless_serial(device, &valid, "device deleted")
                }
            };
            if closed {
                bump(&gate.stats.closed_by_registry);
            }
            debug!(?change, closed, "registry change");
        }
    }
}

/// The serials of the certificates `device` holds now and has not had revoked: none if it
/// is not registered (or the registry cannot say).
async fn valid_serials(gate: &Arc<Gate>, device: &DeviceId) -> Vec<String> {
    let registry = gate.registry.clone();
    let id = device.clone();
    match tokio::task::spawn_blocking(move || registry.certificates(&id)).await {
        Ok(Ok(certs)) => certs
            .into_iter()
            .filter(|c| c.revoked_at_ms.is_none())
            .map(|c| c.serial)
            .collect(),
        Ok(Err(e)) => {
            warn!(error = %e, device_id = %device, "cannot read a deleted device's certificates");
            Vec::new()
        }
        Err(_) => Vec::new(),
    }
}

impl Gate {
    /// The trust in force now.
    pub fn trust(&self) -> Arc<Trust> {
        match self.trust.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// Rebuilds the gate's trust from the registry's CAs; new connections use it at once, live
/// ones keep the trust they were accepted under.
async fn reload_trust(gate: &Arc<Gate>) {
    let g = gate.clone();
    let rebuilt = tokio::task::spawn_blocking(move || {
        let cas = g.registry.cas().map_err(|e| e.to_string())?;
        Trust::build(&g.pki, &g.server_identity, &cas).map_err(|e| e.to_string())
    })
    .await;
    match rebuilt {
        Ok(Ok(trust)) => {
            let mut current = match gate.trust.write() {
                Ok(t) => t,
                Err(poisoned) => poisoned.into_inner(),
            };
            *current = Arc::new(trust);
            info!("trusted CAs changed; new connections use them");
        }
        Ok(Err(e)) => warn!(error = %e, "could not rebuild the gate's trust; keeping the old one"),
        Err(_) => warn!("rebuilding the gate's trust failed"),
    }
}
