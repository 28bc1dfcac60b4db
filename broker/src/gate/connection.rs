//! One device connection, from TCP accept to close. See the [gate](super) for the outline.
//!
//! The gate answers every publish of the device itself, so that all of the device's
//! acknowledgements leave in the order its publishes arrived (MQTT 3.1.1, 4.6.0-2) and each
//! only once its message is safe:
//! - telemetry: once ingest has committed it (PUBACK, or PUBREC for QoS 2);
//! - anything else: once the routing core has taken it. The gate forwards device publishes
//!   to the routing core at QoS 1 at most and takes the routing core's PUBACKs out of its
//!   stream, so QoS 2 state lives only here: the gate answers PUBREC after the routing
//!   core's PUBACK, and PUBCOMP to the device's PUBREL.
//!
//! Device publishes are never retained by the routing core: a device can subscribe to no
//! topic another device publishes, so a retained device message could only cost memory.
//!
//! A device speaks MQTT 3.1.1 or 5 ([`codec`](super::codec)); its link to the routing core
//! uses the same version. Where 3.1.1 can only close the connection, an MQTT 5 device is
//! told why: a publish the ACL refuses is answered "not authorized" (QoS 1 and 2) and the
//! connection stays; telemetry kept as a dead letter is answered "payload format invalid"
//! with the reason; a refused subscription gets "not authorized" in its SUBACK; and every
//! close the gate decides carries a DISCONNECT reason code.

use std::{
    borrow::Cow,
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use futures::{
    future::{self, BoxFuture, Shared},
    stream::FuturesOrdered,
    FutureExt, StreamExt,
};
use rumqttc::mqttbytes::QoS;
use tellus_core::{
    now_ms,
    topic::{self, DeviceTopic},
    AuditDecision, AuditEntry, DeviceId, DeviceStatus, Durable, IngestError, InputKind, RuleInput,
    Trigger,
};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
    sync::{mpsc, oneshot},
    time::{sleep_until, timeout, Instant},
};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use super::trust::Issuer;
use super::{
    bump,
    codec::{
        self, AckCode, CloseCode, Connect, Grant, Inbound, Limits, Publish, Reasons, Refused,
        Reply, Subscribe, TopicAliases, Verdict, Version,
    },
    frames::{
        packet_type, FrameError, FrameReader, PINGRESP, PUBACK, PUBLISH, SUBACK, UNSUBSCRIBE,
    },
    rate::TokenBucket,
    sessions::{Membership, TAKEN_OVER},
    Gate,
};
use crate::{
    devices::DeviceEvent,
    pki::peer_identity,
    provision::{lookup_connecting, rotate_certificate, ProvisionError},
};

/// Keep-alive the gate asks of the routing core for its own link; the gate pings it.
const UPSTREAM_KEEP_ALIVE: Duration = Duration::from_secs(60);
/// Room for frames from the routing core waiting for the device's socket.
const FRAME_QUEUE: usize = 64;
/// How long a link that timed out waiting for its CONNACK is kept open for it.
const LATE_CONNACK: Duration = Duration::from_secs(60);
/// Topic aliases an MQTT 5 device may set (the gate resolves them).
const TOPIC_ALIAS_MAX: u16 = 64;

type DeviceReader = FrameReader<ReadHalf<TlsStream<TcpStream>>>;
type DeviceWriter = WriteHalf<TlsStream<TcpStream>>;

/// Why an acknowledgement can not be given.
#[derive(Debug, Clone, thiserror::Error)]
enum AckFailure {
    #[error("telemetry not durable: {0}")]
    NotDurable(IngestError),
    #[error("the routing core link closed before it acknowledged")]
    UpstreamLost,
}

/// Resolves when the message an acknowledgement answers is safe, with what the
/// acknowledgement says (MQTT 5). Shared, because a QoS 2 message is answered twice (PUBREC,
/// then PUBCOMP) and may be re-sent before PUBREL.
type Safe = Shared<BoxFuture<'static, Result<Verdict, AckFailure>>>;

/// Safe now, with `verdict`.
fn settled(verdict: Verdict) -> Safe {
    future::ready(Ok(verdict)).boxed().shared()
}

fn ready() -> Safe {
    settled(Verdict::default())
}

/// Whether a QoS 2 exchange ended with its PUBREC: answered with an error code (or not at
/// all), so the device will send no PUBREL for it.
fn released(safe: &Safe) -> bool {
    match safe.peek() {
        Some(Ok(verdict)) => verdict.code.is_failure(),
        Some(Err(_)) => true,
        None => false,
    }
}

/// An answer the writer sends, in order, once `safe` resolves.
struct PendingAck {
    reply: Reply,
    safe: Safe,
}

/// PUBACKs the device's publishes await from the routing core, by packet id, with the routing
/// core's reason code. The session adds an entry before it forwards a publish; the relay
/// completes it when the routing core's PUBACK arrives. Bounded by the device's window of
/// unacknowledged publishes.
type UpstreamAcks = Arc<Mutex<HashMap<u16, oneshot::Sender<AckCode>>>>;

/// Places of filters in a forwarded SUBSCRIBE: those covering the device's command topic,
/// and those covering its desired state.
type Covering = (Vec<usize>, Vec<usize>);

/// What the session and the relay share to tell the device service about the device
/// ([`DeviceEvent`]): the packet ids of SUBSCRIBEs covering its command topic, until their
/// SUBACK, and of command publishes sent to it, until its PUBACK. Each bounded by the packet
/// id space.
#[derive(Clone)]
struct DeviceWatch {
    device: DeviceId,
    /// This connection's number (the membership's).
    session: u64,
    version: Version,
    events: mpsc::Sender<DeviceEvent>,
    /// By packet id: the places, in the SUBSCRIBE the gate forwarded, of the filters that
    /// cover the device's command topic, and of those that cover its desired state.
    subscribes: Arc<Mutex<HashMap<u16, Covering>>>,
    delivering: Arc<Mutex<HashMap<u16, String>>>,
}

impl DeviceWatch {
    /// Tells the device service; waits while its queue is full (this device only).
    async fn tell(&self, event: DeviceEvent) {
        let _ = self.events.send(event).await;
    }

    /// Whether `filter` covers the device's command topic.
    fn covers_commands(&self, filter: &str) -> bool {
        let some_command = DeviceTopic::Command("c-0".into()).topic(&self.device);
        topic::filter_matches(filter, &some_command)
    }

    /// Whether `filter` covers the device's desired-state topic.
    fn covers_desired(&self, filter: &str) -> bool {
        topic::filter_matches(filter, &DeviceTopic::StateDesired.topic(&self.device))
    }

    /// The routing core serves a subscription (or kept one) covering these topics.
    async fn subscribed(&self, commands: Option<bool>, desired: bool) {
        let (device, session) = (self.device.clone(), self.session);
        if let Some(acked) = commands {
            self.tell(DeviceEvent::SubscribedToCommands {
                device: device.clone(),
                session,
                acked,
            })
            .await;
        }
        if desired {
            self.tell(DeviceEvent::SubscribedToDesired { device, session })
                .await;
        }
    }
}

/// MQTT 5 SUBSCRIBEs the gate forwarded without the filters it refused, by packet id: where
/// the refused filters stood, and why, so that the relay can put them back into the routing
/// core's SUBACK. At most one entry per packet id.
type RefusedFilters = Arc<Mutex<HashMap<u16, (Vec<(usize, Grant)>, String)>>>;

/// Serves one accepted TCP connection to its end. Never panics on input; every refusal is
/// logged with its reason and counted.
pub async fn serve(gate: &Gate, tcp: TcpStream, peer: SocketAddr, shutdown: CancellationToken) {
    let _ = tcp.set_nodelay(true);
    let handshake = tokio::select! {
        _ = shutdown.cancelled() => return,
        hs = timeout(gate.config.handshake_timeout, gate.trust().acceptor.clone().accept(tcp)) => hs,
    };
    let refused = |counter: &AtomicU64, why: String| {
        bump(counter);
        info!(%peer, reason = %why, "connection refused");
        gate.audit.record(AuditEntry {
            id: 0,
            at_ms: now_ms(),
            peer: peer.to_string(),
            device: None,
            serial: None,
            decision: AuditDecision::Refused,
            reason: why,
        });
    };
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            return refused(
                &gate.stats.handshake_failed,
                format!("TLS handshake refused: {e}"),
            );
        }
        Err(_) => {
            let why = format!(
                "TLS handshake took longer than {:?}",
                gate.config.handshake_timeout
            );
            return refused(&gate.stats.handshake_timeout, why);
        }
    };
    let identity = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        Some(cert) => peer_identity(cert),
        None => return refused(&gate.stats.handshake_failed, "no client certificate".into()),
    };
    let identity = match identity {
        Ok(id) => id,
        Err(e) => {
            let why = format!("client certificate names no device: {e}");
            return refused(&gate.stats.handshake_failed, why);
        }
    };
    // The verifier accepted the chain, so one of the trusted CAs issued it; which one is
    // told by the issuer name (a CA removed since the handshake began is no longer found).
    let Some(issuer) = gate.trust().issuer(&identity.issuer_dn).cloned() else {
        let why = "the certificate's issuer is no longer trusted".to_owned();
        return refused(&gate.stats.handshake_failed, why);
    };
    let span = info_span!("device", device_id = %identity.device, %peer);
    let peer = Peer {
        addr: peer,
        device: identity.device,
        serial: identity.serial_hex,
        not_after_ms: identity.not_after_ms,
        issuer,
    };
    gate.stats.active.fetch_add(1, Ordering::Relaxed);
    Session::start(gate, peer, tls, shutdown)
        .instrument(span)
        .await;
    gate.stats.active.fetch_sub(1, Ordering::Relaxed);
}

/// Why a session ended, for the log.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("device sent DISCONNECT")]
    DeviceDisconnected,
    #[error("device connection ended: {0}")]
    DeviceGone(FrameError),
    #[error("no packet within one and a half keep-alive periods")]
    KeepAliveExpired,
    #[error("ACL violation: {0}")]
    AclDenied(topic::AclDenied),
    #[error("protocol violation: {1}")]
    Protocol(CloseCode, String),
    #[error("ingest stopped")]
    IngestStopped,
    #[error("routing core closed the link")]
    UpstreamClosed,
    #[error("the device is not reading, or a message could not be made safe")]
    WriterStopped,
    #[error("server shutting down")]
    Shutdown,
    #[error("closed by the gate: {0}")]
    ClosedByGate(String),
}

impl End {
    /// What an MQTT 5 device is told in DISCONNECT; `None` where the device left or can no
    /// longer be written to.
    fn close_code(&self) -> Option<CloseCode> {
        Some(match self {
            End::DeviceDisconnected | End::WriterStopped => return None,
            End::DeviceGone(FrameError::Malformed(_)) => CloseCode::MalformedPacket,
            End::DeviceGone(FrameError::TooLarge(..)) => CloseCode::PacketTooLarge,
            End::DeviceGone(_) => return None,
            End::KeepAliveExpired => CloseCode::KeepAliveTimeout,
            End::AclDenied(_) => CloseCode::NotAuthorized,
            End::Protocol(code, _) => *code,
            End::IngestStopped | End::Shutdown => CloseCode::ServerShuttingDown,
            End::UpstreamClosed => CloseCode::UnspecifiedError,
            End::ClosedByGate(why) if why == TAKEN_OVER => CloseCode::SessionTakenOver,
            End::ClosedByGate(_) => CloseCode::AdministrativeAction,
        })
    }
}

struct Session<'g> {
    gate: &'g Gate,
    device: DeviceId,
    version: Version,
    reader: DeviceReader,
    upstream: OwnedWriteHalf,
    upstream_acks: UpstreamAcks,
    refused_filters: RefusedFilters,
    commands: DeviceWatch,
    acks: mpsc::Sender<PendingAck>,
    /// QoS 2 publishes answered (or to be answered) with PUBREC and awaiting the device's
    /// PUBREL. At most one entry per packet id, so at most 65,535.
    qos2: HashMap<u16, Safe>,
    aliases: TopicAliases,
    /// The certificate this connection presented (issuer, serial): what a CSR is checked
    /// against.
    peer_issuer: String,
    peer_serial: String,
    /// Whether a certificate rotation is under way: one at a time per connection.
    rotating: Arc<AtomicBool>,
    /// An operator client (tag `tellus.role: operator` when it connected): it may also
    /// subscribe to what rules publish, under `rules/`.
    operator: bool,
}

impl<'g> Session<'g> {
    async fn start(
        gate: &'g Gate,
        peer: Peer,
        tls: TlsStream<TcpStream>,
        shutdown: CancellationToken,
    ) {
        let (rd, mut wr) = tokio::io::split(tls);
        let mut reader = FrameReader::new(rd, gate.config.max_packet_size);

        // The CONNECT names the version; every later packet is read in it.
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            first = timeout(gate.config.connect_timeout, async {
                match reader.version().await? {
                    Ok(version) => reader.packet(version).await.map(Ok),
                    Err(level) => Ok(Err(level)),
                }
            }) => first,
        };
        let connect = match first {
            Ok(Ok(Ok(Inbound::Connect(c)))) => c,
            Ok(Ok(Ok(other))) => {
                bump(&gate.stats.protocol_errors);
                let why = format!("first packet is {}, not CONNECT", other.name());
                info!(reason = %why, "connection refused");
                gate.audit(&peer, AuditDecision::Refused, why);
                return;
            }
            Ok(Ok(Err(level))) => {
                let counter = &gate.stats.refused_protocol;
                let why =
                    format!("MQTT protocol level {level} is not spoken here; use 4 (3.1.1) or 5");
                let refusal = Refusal::new(Refused::UnsupportedProtocolVersion, counter, why);
                refuse(gate, &peer, (Version::V4, Reasons::None), &mut wr, refusal).await;
                return;
            }
            Ok(Err(e)) => {
                match e {
                    FrameError::TooLarge(..) => bump(&gate.stats.packet_too_large),
                    _ => bump(&gate.stats.protocol_errors),
                }
                let why = format!("could not read CONNECT: {e}");
                info!(reason = %why, "connection refused");
                gate.audit(&peer, AuditDecision::Refused, why);
                return;
            }
            Err(_) => {
                bump(&gate.stats.connect_timeout);
                let why = format!("no CONNECT within {:?}", gate.config.connect_timeout);
                info!(reason = %why, "connection refused");
                gate.audit(&peer, AuditDecision::Refused, why);
                return;
            }
        };
        let version = connect.version();
        let to = (version, connect.reasons());
        // Who first (a revoked or unknown certificate is refused as such, whatever its
        // CONNECT says), then what the CONNECT asks for.
        if let Err(refusal) = verify(gate, &peer).await {
            return refuse(gate, &peer, to, &mut wr, refusal).await;
        }
        let (connect, assigned) = match check_connect(gate, &peer, connect) {
            Ok(c) => c,
            Err(refusal) => return refuse(gate, &peer, to, &mut wr, refusal).await,
        };
        // Take the device's place first, then look again: a revocation that the registry
        // watcher handled before this session was registered is caught here, and one after
        // the second look reaches this session through the watcher.
        let config = &gate.config;
        let (mut membership, took_over) = gate.sessions.open(&peer.device, &peer.serial, || {
            TokenBucket::new(config.max_messages_per_second, config.message_burst)
        });
        if took_over {
            bump(&gate.stats.taken_over);
        }
        let operator = match verify(gate, &peer).await {
            Ok(operator) => operator,
            Err(refusal) => return refuse(gate, &peer, to, &mut wr, refusal).await,
        };
        // An operator's session in the routing core is not the same device's session as a
        // non-operator: subscriptions to `rules/…` kept there must not outlive the role.
        let mut connect = connect;
        if operator {
            connect.set_client_id(format!("{}:{}", peer.device, topic::OPERATOR_ROLE));
        }
        let keep_alive = connect.keep_alive();
        let reasons = connect.reasons();
        let limits = Limits {
            receive_maximum: u16::try_from(config.max_inflight).unwrap_or(u16::MAX),
            maximum_packet_size: u32::try_from(config.max_packet_size).unwrap_or(u32::MAX),
            topic_alias_maximum: TOPIC_ALIAS_MAX,
            assigned_client_id: assigned,
        };
        let link = tokio::select! {
            _ = shutdown.cancelled() => return,
            link = link_upstream(gate, &peer, connect, &limits, &mut wr) => link,
        };
        let Some((upstream, upstream_reader, session_present)) = link else {
            return;
        };
        bump(&gate.stats.connected);
        info!(keep_alive, ?version, "device connected");
        gate.audit(&peer, AuditDecision::Accepted, "connected");

        let window = gate.config.max_inflight.max(1);
        let (frames, frames_rx) = mpsc::channel(FRAME_QUEUE);
        // The writer pulls acknowledgements as long as fewer than `window` are pending, so
        // this channel adds one more at most.
        let (acks, acks_rx) = mpsc::channel(1);
        let out = Output {
            version,
            reasons,
            window,
            write_timeout: gate.config.write_timeout,
        };
        let (close, close_rx) = oneshot::channel();
        let mut writer =
            tokio::spawn(write_to_device(wr, frames_rx, acks_rx, close_rx, out).in_current_span());
        let upstream_acks = UpstreamAcks::default();
        let refused_filters = RefusedFilters::default();
        let commands = DeviceWatch {
            device: peer.device.clone(),
            session: membership.id(),
            version,
            events: gate.device_events.clone(),
            subscribes: Arc::default(),
            delivering: Arc::default(),
        };
        commands
            .tell(DeviceEvent::Online(tellus_core::Session {
                id: 0,
                device: peer.device.clone(),
                session: membership.id(),
                connected_at_ms: now_ms(),
                peer: peer.addr.to_string(),
                protocol: match version {
                    Version::V4 => "3.1.1",
                    Version::V5 => "5",
                }
                .to_owned(),
                disconnected_at_ms: None,
                reason: None,
            }))
            .await;
        if session_present {
            // The routing core kept the device's subscriptions: it will send no SUBSCRIBE.
            commands.subscribed(Some(true), true).await;
        }
        let mut relay = tokio::spawn(
            relay_from_upstream(
                upstream_reader,
                frames,
                upstream_acks.clone(),
                refused_filters.clone(),
                reasons,
                commands.clone(),
            )
            .in_current_span(),
        );

        let mut session = Session {
            gate,
            device: peer.device.clone(),
            version,
            reader,
            upstream,
            upstream_acks,
            refused_filters,
            commands,
            acks,
            qos2: HashMap::new(),
            aliases: TopicAliases::new(TOPIC_ALIAS_MAX),
            peer_issuer: peer.issuer.id.clone(),
            peer_serial: peer.serial.clone(),
            rotating: Arc::default(),
            operator,
        };
        let (end, writer_done, relay_done) = session
            .run(
                keep_alive,
                &shutdown,
                &mut writer,
                &mut relay,
                &mut membership,
            )
            .await;
        match &end {
            End::AclDenied(_) | End::Protocol(..) => warn!(reason = %end, "connection closed"),
            _ => info!(reason = %end, "device disconnected"),
        }
        gate.audit(&peer, AuditDecision::Closed, end.to_string());
        // Without a DISCONNECT from the device, closing the link makes the routing core
        // publish the device's will, as MQTT requires.
        let Session {
            mut upstream,
            upstream_acks,
            acks,
            commands,
            ..
        } = session;
        commands
            .tell(DeviceEvent::Offline {
                device: peer.device.clone(),
                session: commands.session,
                at_ms: now_ms(),
                reason: end.to_string(),
            })
            .await;
        let _ = upstream.shutdown().await;
        // A relay that ended the session has been awaited already.
        if !relay_done {
            relay.abort();
            let _ = relay.await;
        }
        // The routing core will acknowledge nothing more: those publishes stay
        // unacknowledged, and the device sends them again when it reconnects.
        if let Ok(mut waiting) = upstream_acks.lock() {
            waiting.clear();
        }
        // An MQTT 5 device is told why, after the acknowledgements already queued.
        if let Some(code) = end.close_code() {
            let _ = close.send(Reply::Disconnect(code, end.to_string()));
        }
        // Closing the channel lets the writer finish: it still writes the acknowledgement of
        // every publish that becomes safe, then closes the TLS session.
        drop(acks);
        if !writer_done {
            let _ = writer.await;
        }
    }

    /// Reads and handles the device's packets until the session ends. Returns why, whether
    /// the writer has already finished, and whether the relay has (both awaited here).
    async fn run(
        &mut self,
        keep_alive: u16,
        shutdown: &CancellationToken,
        writer: &mut tokio::task::JoinHandle<()>,
        relay: &mut tokio::task::JoinHandle<()>,
        membership: &mut Membership<'_>,
    ) -> (End, bool, bool) {
        // MQTT: the server closes a connection silent for one and a half keep-alives.
        let grace = (keep_alive > 0).then(|| Duration::from_millis(keep_alive as u64 * 1500));
        let far = Duration::from_secs(86_400 * 365);
        let mut deadline = Instant::now() + grace.unwrap_or(far);
        let mut ping = tokio::time::interval(UPSTREAM_KEEP_ALIVE / 2);
        ping.reset();
        let bucket = membership.bucket.clone();
        // While the device is over its rate, its socket is not read until then.
        let mut paused_until: Option<Instant> = None;
        loop {
            let step = tokio::select! {
                _ = shutdown.cancelled() => Err(End::Shutdown),
                reason = membership.closed() => Err(End::ClosedByGate(reason)),
                _ = sleep_until(deadline) => Err(End::KeepAliveExpired),
                _ = &mut *writer => return (End::WriterStopped, true, false),
                // The routing core drops a device's old link when its new one connects: the
                // gate's own reason (taken over) is the one the device is told.
                _ = &mut *relay => {
                    let end = membership.closed_now().map_or(End::UpstreamClosed, End::ClosedByGate);
                    return (end, false, true);
                }
                _ = ping.tick() => self.send_upstream(&codec::pingreq()).await,
                _ = sleep_until(paused_until.unwrap_or(deadline)), if paused_until.is_some() => {
                    paused_until = None;
                    Ok(())
                }
                packet = self.reader.packet(self.version), if paused_until.is_none() => match packet {
                    Ok(p) => {
                        // Everything a device starts (not its answers to the gate) costs a
                        // token; an UNSUBSCRIBE is forwarded as it is.
                        let counted = match &p {
                            Inbound::Publish(_) | Inbound::Subscribe(_) | Inbound::PingReq => true,
                            Inbound::Forward(frame) => packet_type(frame) == UNSUBSCRIBE,
                            _ => false,
                        };
                        // Handling may wait (ingest or the device's window is full); a close
                        // from the gate or a shutdown must not wait behind it.
                        let step = tokio::select! {
                            step = self.handle(p) => step,
                            reason = membership.closed() => Err(End::ClosedByGate(reason)),
                            _ = shutdown.cancelled() => Err(End::Shutdown),
                        };
                        let now = Instant::now();
                        deadline = now + grace.unwrap_or(far);
                        let over = counted
                            .then(|| bucket.lock().map(|mut b| b.take()).unwrap_or(None))
                            .flatten();
                        if let Some(wait) = over {
                            bump(&self.gate.stats.rate_limited);
                            paused_until = Some(now + wait);
                            // The device is busy, not silent: its keep-alive starts after.
                            deadline += wait;
                        }
                        step
                    }
                    Err(e) => Err(End::DeviceGone(e)),
                },
            };
            if let Err(end) = step {
                let stats = &self.gate.stats;
                match &end {
                    End::DeviceGone(FrameError::Malformed(_)) => bump(&stats.protocol_errors),
                    End::DeviceGone(FrameError::TooLarge(..)) => bump(&stats.packet_too_large),
                    End::KeepAliveExpired => bump(&stats.keep_alive_expired),
                    _ => {}
                }
                return (end, false, false);
            }
        }
    }

    async fn handle(&mut self, packet: Inbound) -> Result<(), End> {
        match packet {
            Inbound::Publish(p) => self.publish(p).await,
            Inbound::PubRel(pkid) => {
                // PUBCOMP once the message is safe; a PUBREL for a packet id this session does
                // not know (re-sent after a reconnect) is answered at once, as MQTT requires.
                let safe = self.qos2.remove(&pkid).unwrap_or_else(ready);
                self.ack(Reply::PubComp(pkid), safe).await
            }
            Inbound::Subscribe(s) => self.subscribe(s).await,
            Inbound::Forward(frame) => {
                if packet_type(&frame) == PUBACK {
                    self.delivered(&frame).await;
                }
                self.forward(&frame).await
            }
            Inbound::PingReq => self.ack(Reply::PingResp, ready()).await,
            Inbound::Disconnect { with_will } => {
                // The routing core drops the will on any DISCONNECT, so a device that asks
                // for its will (MQTT 5) gets it by the link closing without one.
                if !with_will {
                    self.forward(&[0xe0, 0x00]).await?;
                }
                Err(End::DeviceDisconnected)
            }
            Inbound::Violation(code, why) => Err(self.protocol(code, why)),
            Inbound::Connect(_) => Err(self.protocol(CloseCode::ProtocolError, "a second CONNECT")),
            Inbound::NotFromClient(name) => Err(self.protocol(
                CloseCode::ProtocolError,
                format!("a client may not send {name}"),
            )),
        }
    }

    /// Counts a protocol violation; the session ends with it.
    fn protocol(&self, code: CloseCode, why: impl Into<String>) -> End {
        bump(&self.gate.stats.protocol_errors);
        End::Protocol(code, why.into())
    }

    /// Forwards the filters the ACL allows. MQTT 3.1.1: a refused filter closes the
    /// connection. MQTT 5: a refused filter is answered "not authorized" (or "shared
    /// subscriptions not supported") in the SUBACK and the others are subscribed.
    async fn subscribe(&mut self, s: Subscribe) -> Result<(), End> {
        let filters = s.filters();
        let mut refused = Vec::new();
        let mut why = String::new();
        for (at, filter) in filters.iter().enumerate() {
            if let Err(e) = topic::check_subscribe_as(&self.device, self.operator, filter) {
                bump(&self.gate.stats.acl_denied);
                if self.version == Version::V4 {
                    return Err(End::AclDenied(e));
                }
                info!(reason = %e, "subscription refused");
                if why.is_empty() {
                    why = e.to_string();
                }
                refused.push((at, Grant::refused(filter)));
            }
        }
        let count = filters.len();
        // Places in the forwarded SUBSCRIBE, which leaves the refused filters out.
        let forwarded: Vec<&str> = filters
            .iter()
            .enumerate()
            .filter(|(at, _)| !refused.iter().any(|(r, _)| r == at))
            .map(|(_, f)| *f)
            .collect();
        let places = |covers: &dyn Fn(&str) -> bool| -> Vec<usize> {
            (0..forwarded.len())
                .filter(|i| covers(forwarded[*i]))
                .collect()
        };
        let commands = places(&|f| self.commands.covers_commands(f));
        let desired = places(&|f| self.commands.covers_desired(f));
        if !commands.is_empty() || !desired.is_empty() {
            if let Ok(mut subs) = self.commands.subscribes.lock() {
                subs.insert(s.pkid(), (commands, desired));
            }
        }
        if refused.is_empty() {
            return self.forward(&s.upstream(&vec![true; count])).await;
        }
        if refused.len() == count {
            let grants = refused.into_iter().map(|(_, g)| g).collect();
            let verdict = Verdict::new(AckCode::NotAuthorized, why);
            return self
                .ack(Reply::SubAck(s.pkid(), grants), settled(verdict))
                .await;
        }
        let keep: Vec<bool> = (0..count)
            .map(|i| !refused.iter().any(|(at, _)| *at == i))
            .collect();
        if let Ok(mut waiting) = self.refused_filters.lock() {
            waiting.insert(s.pkid(), (refused, why));
        }
        self.forward(&s.upstream(&keep)).await
    }

    async fn publish(&mut self, mut p: Publish) -> Result<(), End> {
        let new_alias = match self.aliases.resolve(&mut p) {
            Ok(alias) => alias,
            Err((code, why)) => return Err(self.protocol(code, why)),
        };
        let v5 = self.version == Version::V5;
        if v5 && p.retain {
            // The CONNACK said retained messages are not available.
            return Err(self.protocol(
                CloseCode::RetainNotSupported,
                "retained messages are not available to devices",
            ));
        }
        let (pkid, qos) = (p.pkid, p.qos);
        let reply = match qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => Some(Reply::PubAck(pkid)),
            QoS::ExactlyOnce => Some(Reply::PubRec(pkid)),
        };
        let kind = match topic::check_publish(&self.device, &p.topic) {
            Ok(kind) => {
                // Only an allowed topic is kept under its alias.
                if let Some(alias) = new_alias {
                    self.aliases.keep(alias, &p.topic);
                }
                kind
            }
            Err(e) => {
                bump(&self.gate.stats.acl_denied);
                return match (v5, reply) {
                    // MQTT 5 answers "not authorized" and keeps the connection.
                    (true, Some(reply)) => {
                        info!(reason = %e, "publish refused");
                        let verdict = Verdict::new(AckCode::NotAuthorized, e.to_string());
                        self.ack(reply, settled(verdict)).await
                    }
                    _ => Err(End::AclDenied(e)),
                };
            }
        };
        if qos == QoS::ExactlyOnce {
            match self
                .qos2
                .get(&pkid)
                .map(|safe| (safe.clone(), released(safe)))
            {
                // Sent again before PUBREL (DUP or not, MQTT 4.3.3): answered again once the
                // first copy is safe; nothing is kept twice.
                Some((safe, false)) => return self.ack(Reply::PubRec(pkid), safe).await,
                // Its PUBREC carried an error code, which ended that exchange: a new message.
                Some((_, true)) => {
                    self.qos2.remove(&pkid);
                }
                None => {}
            }
            if self.qos2.len() >= self.gate.config.max_inflight.max(1) {
                self.qos2.retain(|_, safe| !released(safe));
            }
            if self.qos2.len() >= self.gate.config.max_inflight.max(1) {
                return Err(self.protocol(
                    CloseCode::ReceiveMaximumExceeded,
                    format!(
                        "more than {} QoS 2 messages await PUBREL",
                        self.gate.config.max_inflight.max(1)
                    ),
                ));
            }
        }
        // Telemetry is counted where it is handed to ingest.
        match &kind {
            DeviceTopic::StateReported => bump(&self.gate.stats.state_reports),
            DeviceTopic::CommandResult(_) => bump(&self.gate.stats.command_results),
            DeviceTopic::Event(_) => bump(&self.gate.stats.events),
            DeviceTopic::CertsCsr => bump(&self.gate.stats.csrs),
            _ => {}
        }
        let safe = if kind == DeviceTopic::CertsCsr {
            Some(self.rotate(p.payload).await?)
        } else if kind == DeviceTopic::StateReported {
            let (device, payload) = (self.device.clone(), p.payload);
            Some(
                self.hand_over(|recorded| DeviceEvent::Reported {
                    device,
                    payload,
                    recorded,
                })
                .await,
            )
        } else if let DeviceTopic::CommandResult(command) = kind {
            let (device, payload) = (self.device.clone(), p.payload);
            Some(
                self.hand_over(|recorded| DeviceEvent::Result {
                    device,
                    command,
                    payload,
                    recorded,
                })
                .await,
            )
        } else if kind.is_telemetry() {
            bump(&self.gate.stats.telemetry_received);
            let pending = self
                .gate
                .ingest
                .submit(
                    self.device.clone(),
                    kind,
                    p.payload,
                    now_ms(),
                    qos != QoS::AtMostOnce,
                )
                .await
                .map_err(|_| End::IngestStopped)?;
            pending.map(|durable| {
                async move {
                    match durable.await {
                        Ok(Ok(Durable::Stored)) => Ok(Verdict::default()),
                        Ok(Ok(Durable::DeadLettered(why))) => Ok(Verdict::new(
                            AckCode::PayloadFormatInvalid,
                            format!("not valid telemetry, kept as a dead letter: {why}"),
                        )),
                        Ok(Err(e)) => Err(AckFailure::NotDurable(e)),
                        Err(_) => Err(AckFailure::NotDurable(IngestError::Closed)),
                    }
                }
                .boxed()
                .shared()
            })
        } else if p.breaks_payload_format() {
            // Said to be UTF-8 text and is not: refused, not forwarded (MQTT 5).
            bump(&self.gate.stats.payload_invalid);
            let why = "the payload format indicator says UTF-8, and the payload is not";
            info!(reason = why, "publish refused");
            match reply {
                Some(reply) => {
                    let verdict = Verdict::new(AckCode::PayloadFormatInvalid, why);
                    return self.ack(reply, settled(verdict)).await;
                }
                None => return Err(End::Protocol(CloseCode::PayloadFormatInvalid, why.into())),
            }
        } else {
            let taken = (qos != QoS::AtMostOnce).then(|| {
                let (tx, rx) = oneshot::channel();
                if let Ok(mut waiting) = self.upstream_acks.lock() {
                    waiting.insert(pkid, tx);
                }
                async move {
                    let code = rx.await.map_err(|_| AckFailure::UpstreamLost)?;
                    Ok(Verdict { code, why: None })
                }
                .boxed()
                .shared()
            });
            if let DeviceTopic::Event(name) = &kind {
                if self.gate.rules.wants(Trigger::Event) {
                    // JSON as JSON; anything else as text (lossy where it is not UTF-8).
                    let payload = serde_json::from_slice(&p.payload).unwrap_or_else(|_| {
                        serde_json::Value::String(String::from_utf8_lossy(&p.payload).into_owned())
                    });
                    self.gate
                        .rules
                        .send(RuleInput {
                            device: self.device.clone(),
                            at_ms: now_ms(),
                            kind: InputKind::Event {
                                name: name.clone(),
                                payload,
                            },
                        })
                        .await;
                }
            }
            self.forward(&p.upstream()).await?;
            taken
        };
        match (reply, safe) {
            (Some(reply @ Reply::PubRec(_)), Some(safe)) => {
                self.qos2.insert(pkid, safe.clone());
                self.ack(reply, safe).await
            }
            (Some(reply), Some(safe)) => self.ack(reply, safe).await,
            _ => Ok(()),
        }
    }

    /// Answers a CSR on `certs/csr`: signs it, records the certificate, and publishes the
    /// outcome on `certs/issued` as JSON, `{"serial", "not_after_ms", "cert_pem", "ca_pem"}`
    /// or `{"error"}`. Runs on its own (whatever the QoS); safe once the answer is queued on the `Publisher`.
    async fn rotate(&mut self, csr: Bytes) -> Result<Safe, End> {
        if self.rotating.swap(true, Ordering::AcqRel) {
            // One at a time: a device that repeats its CSR before the answer gets told so.
            let topic = DeviceTopic::CertsIssued.topic(&self.device);
            let why = "a certificate rotation is already under way";
            let busy = serde_json::json!({ "error": why });
            self.gate
                .publisher
                .publish(topic, busy.to_string().into_bytes())
                .await
                .map_err(|_| End::UpstreamClosed)?;
            return Ok(settled(Verdict::new(AckCode::QuotaExceeded, why)));
        }
        let gate = self.gate;
        let (pki, registry) = (gate.pki.clone(), gate.registry.clone());
        let publisher = gate.publisher.clone();
        let device = self.device.clone();
        let (issuer, serial) = (self.peer_issuer.clone(), self.peer_serial.clone());
        let issued_topic = DeviceTopic::CertsIssued.topic(&device);
        let rotating = self.rotating.clone();
        let work = tokio::spawn(
            async move {
                // However this task ends, the next CSR may start another rotation.
                struct Done(Arc<AtomicBool>);
                impl Drop for Done {
                    fn drop(&mut self) {
                        self.0.store(false, Ordering::Release);
                    }
                }
                let _done = Done(rotating);
                let id = device.clone();
                let signed = tokio::task::spawn_blocking(move || {
                    let csr = std::str::from_utf8(&csr)
                        .map_err(|_| "the CSR must be PEM text".to_owned())?;
                    let presented = (issuer.as_str(), serial.as_str());
                    match rotate_certificate(&pki, registry.as_ref(), &id, presented, csr) {
                        Ok(cert) => Ok((cert, pki.ca_pem().to_owned())),
                        Err(e @ (ProvisionError::BadCsr(_) | ProvisionError::Refused(_))) => {
                            Err(e.to_string())
                        }
                        Err(e) => {
                            warn!(error = %e, "certificate rotation failed");
                            Err("internal error; try again later".to_owned())
                        }
                    }
                })
                .await
                .unwrap_or_else(|_| Err("internal error".to_owned()));
                let answer = match signed {
                    Ok((cert, ca_pem)) => {
                        info!(serial = %cert.serial_hex, "certificate rotated");
                        serde_json::json!({
                            "serial": cert.serial_hex,
                            "not_after_ms": cert.not_after_ms,
                            "cert_pem": cert.cert_pem,
                            "ca_pem": ca_pem,
                        })
                    }
                    Err(why) => {
                        info!(reason = %why, "certificate rotation refused");
                        serde_json::json!({ "error": why })
                    }
                };
                publisher
                    .publish(issued_topic, answer.to_string().into_bytes())
                    .await
                    .map_err(|_| AckFailure::UpstreamLost)
            }
            .in_current_span(),
        );
        Ok(async move {
            work.await
                .unwrap_or(Err(AckFailure::UpstreamLost))
                .map(|()| Verdict::default())
        }
        .boxed()
        .shared())
    }

    /// Queues `reply` behind every earlier acknowledgement, to be sent once `safe` resolves.
    /// Waits while the device's window of pending acknowledgements is full, and so stops
    /// reading its socket.
    /// Hands a publish to the device service, which records it (not routed on): safe once
    /// the service answers, with its reason ("payload format invalid") if it refused it.
    async fn hand_over(
        &self,
        event: impl FnOnce(oneshot::Sender<Result<(), String>>) -> DeviceEvent,
    ) -> Safe {
        let (recorded, done) = oneshot::channel();
        self.commands.tell(event(recorded)).await;
        async move {
            match done.await.map_err(|_| AckFailure::UpstreamLost)? {
                Ok(()) => Ok(Verdict::default()),
                Err(why) => Ok(Verdict::new(AckCode::PayloadFormatInvalid, why)),
            }
        }
        .boxed()
        .shared()
    }

    /// The device acknowledged a publish from the routing core: if it was a command, the
    /// device service hears it was delivered.
    async fn delivered(&self, puback: &[u8]) {
        let Some((pkid, code)) = codec::read_puback(puback) else {
            return;
        };
        let command = self
            .commands
            .delivering
            .lock()
            .ok()
            .and_then(|mut d| d.remove(&pkid));
        // An MQTT 5 device may refuse the message in its PUBACK: then it stays `sent`, and
        // is sent again on the device's next subscription.
        if let Some(command) = command.filter(|_| !code.is_failure()) {
            let device = self.device.clone();
            self.commands
                .tell(DeviceEvent::Delivered { device, command })
                .await;
        }
    }

    async fn ack(&mut self, reply: Reply, safe: Safe) -> Result<(), End> {
        self.acks
            .send(PendingAck { reply, safe })
            .await
            .map_err(|_| End::WriterStopped)
    }

    async fn forward(&mut self, frame: &[u8]) -> Result<(), End> {
        bump(&self.gate.stats.forwarded);
        self.send_upstream(frame).await
    }

    async fn send_upstream(&mut self, frame: &[u8]) -> Result<(), End> {
        self.upstream
            .write_all(frame)
            .await
            .map_err(|_| End::UpstreamClosed)
    }
}

/// The certificate a connection presented: who the gate is talking to.
struct Peer {
    addr: SocketAddr,
    device: DeviceId,
    serial: String,
    not_after_ms: i64,
    issuer: Issuer,
}

impl Gate {
    fn audit(&self, peer: &Peer, decision: AuditDecision, reason: impl Into<String>) {
        self.audit.record(AuditEntry {
            id: 0,
            at_ms: now_ms(),
            peer: peer.addr.to_string(),
            device: Some(peer.device.clone()),
            serial: Some(peer.serial.clone()),
            decision,
            reason: reason.into(),
        });
    }
}

/// Why a CONNECT is refused: the CONNACK code, the counter, and the reason logged, audited
/// and (MQTT 5) told to the device.
struct Refusal<'g> {
    code: Refused,
    counter: &'g AtomicU64,
    why: Cow<'static, str>,
}

impl<'g> Refusal<'g> {
    fn new(code: Refused, counter: &'g AtomicU64, why: impl Into<Cow<'static, str>>) -> Self {
        Refusal {
            code,
            counter,
            why: why.into(),
        }
    }
}

/// Answers CONNECT with a refusal: counted, logged, audited.
async fn refuse(
    gate: &Gate,
    peer: &Peer,
    (version, reasons): (Version, Reasons),
    wr: &mut DeviceWriter,
    refusal: Refusal<'_>,
) {
    bump(refusal.counter);
    info!(code = ?refusal.code, reason = %refusal.why, "connection refused");
    let ack = codec::connack_refused(version, reasons, refusal.code, &refusal.why);
    gate.audit(peer, AuditDecision::Refused, refusal.why);
    let _ = timeout(gate.config.write_timeout, write_now(wr, &ack)).await;
}

/// Checks what the CONNECT itself says ([`Connect::admit`]); a refusal is counted with
/// the kind of rule it broke.
fn check_connect<'g>(
    gate: &'g Gate,
    peer: &Peer,
    connect: Connect,
) -> Result<(Connect, Option<String>), Refusal<'g>> {
    connect.admit(&peer.device).map_err(|(code, why)| {
        let stats = &gate.stats;
        let counter = match code {
            Refused::ClientIdNotValid => &stats.refused_client_id,
            // The will: refused by the ACL.
            Refused::NotAuthorized => &stats.acl_denied,
            _ => &stats.refused_protocol,
        };
        Refusal::new(code, counter, why)
    })
}

/// Checks the registry: the device exists and is enabled, and the certificate presented is
/// one recorded for it and not revoked.
/// Whether the device may connect; `Ok(true)` for an operator client (tag
/// `tellus.role: operator`), which may also subscribe to what rules publish.
async fn verify<'g>(gate: &'g Gate, peer: &Peer) -> Result<bool, Refusal<'g>> {
    use Refused::*;
    let stats = &gate.stats;
    let registry = gate.registry.clone();
    let (device, serial) = (peer.device.clone(), peer.serial.clone());
    let (issuer, not_after) = (peer.issuer.clone(), peer.not_after_ms);
    let lookup = tokio::task::spawn_blocking(move || {
        let tags = issuer.auto_register.as_ref();
        lookup_connecting(
            registry.as_ref(),
            &device,
            &issuer.id,
            &serial,
            not_after,
            tags,
        )
    })
    .await;
    let (record, cert) = match lookup {
        Ok(Ok(known)) => {
            if known.registered {
                info!(ca = %peer.issuer.id, "registered on first connection");
                gate.audit(
                    peer,
                    AuditDecision::Accepted,
                    "registered on first connection",
                );
            }
            (known.device, known.certificate)
        }
        Ok(Err(e)) => {
            warn!(error = %e, "registry lookup failed; refusing for now");
            return Err(Refusal::new(
                ServerUnavailable,
                &stats.refused_unavailable,
                "registry unavailable",
            ));
        }
        Err(_) => {
            return Err(Refusal::new(
                ServerUnavailable,
                &stats.refused_unavailable,
                "registry lookup failed",
            ));
        }
    };
    let Some(record) = record else {
        return Err(Refusal::new(
            NotAuthorized,
            &stats.refused_unknown_device,
            "the device is not registered",
        ));
    };
    match cert {
        Some(cert) if cert.device == peer.device => {
            if cert.revoked_at_ms.is_some() {
                return Err(Refusal::new(
                    Banned,
                    &stats.refused_revoked,
                    "the certificate is revoked",
                ));
            }
        }
        _ => {
            let why = "the certificate is not one registered for this device";
            return Err(Refusal::new(NotAuthorized, &stats.refused_certificate, why));
        }
    }
    if record.status == DeviceStatus::Disabled {
        return Err(Refusal::new(
            Banned,
            &stats.refused_disabled,
            "the device is disabled",
        ));
    }
    Ok(record.tags.get(topic::ROLE_TAG).map(String::as_str) == Some(topic::OPERATOR_ROLE))
}

/// Opens the device's link to the routing core and answers the device's CONNECT.
async fn link_upstream(
    gate: &Gate,
    peer: &Peer,
    connect: Connect,
    limits: &Limits,
    wr: &mut DeviceWriter,
) -> Option<(OwnedWriteHalf, FrameReader<OwnedReadHalf>, bool)> {
    let version = connect.version();
    let to = (version, connect.reasons());
    let (up, up_reader, session_present) = match open_link(gate, connect).await {
        Ok(link) => link,
        Err(why) => {
            warn!(reason = why, "no link to the routing core");
            let counter = &gate.stats.refused_unavailable;
            let refusal = Refusal::new(Refused::ServerUnavailable, counter, why);
            refuse(gate, peer, to, wr, refusal).await;
            return None;
        }
    };
    let ack = codec::connack_accepted(version, session_present, limits);
    let sent = timeout(gate.config.write_timeout, write_now(wr, &ack)).await;
    if !matches!(sent, Ok(Ok(()))) {
        return None;
    }
    Some((up, up_reader, session_present))
}

/// Connects to the routing core as the device, in the device's version and with the gate's
/// credential, and returns the link and whether the routing core had a session for it.
async fn open_link(
    gate: &Gate,
    connect: Connect,
) -> Result<(OwnedWriteHalf, FrameReader<OwnedReadHalf>, bool), &'static str> {
    let version = connect.version();
    let addr = match version {
        Version::V4 => gate.routing.addr,
        Version::V5 => gate.routing.addr_v5,
    };
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|_| "routing core unreachable")?;
    let _ = stream.set_nodelay(true);
    let (rd, mut up) = stream.into_split();
    let mut up_reader = FrameReader::new(rd, gate.config.max_packet_size.saturating_mul(2));
    let cred = &gate.routing.credential;
    let keep_alive = UPSTREAM_KEEP_ALIVE.as_secs() as u16;
    let connect = connect.upstream(&cred.username, &cred.password, keep_alive);
    up.write_all(&connect)
        .await
        .map_err(|_| "routing core closed the link")?;
    let mut connack = Box::pin(async move {
        let answer = codec::read_connack(version, up_reader.frame_mut().await.ok()?);
        Some((answer?, up_reader))
    });
    match timeout(gate.config.connect_timeout, &mut connack).await {
        Ok(Some(((true, session_present), up_reader))) => Ok((up, up_reader, session_present)),
        Ok(Some(((false, _), _))) => Err("routing core refused the link"),
        Ok(None) => Err("routing core did not acknowledge the link"),
        Err(_) => {
            // Closing a link before the routing core has written its CONNACK leaves
            // rumqttd 0.20 with a stale will handler that makes the device's next link panic
            // its listener: let the CONNACK arrive first, within bounds (in time, and in
            // how many such links wait at once), then leave without a will.
            if let Ok(permit) = LATE_LINKS.try_acquire() {
                tokio::spawn(async move {
                    if let Ok(Some(_)) = timeout(LATE_CONNACK, connack).await {
                        let _ = timeout(LATE_CONNACK, up.write_all(&[0xe0, 0x00])).await;
                    }
                    drop(permit);
                });
            }
            Err("routing core did not acknowledge the link in time")
        }
    }
}

/// Links that timed out waiting for their CONNACK and wait on for it in the background.
static LATE_LINKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(256);

async fn write_now<W: AsyncWrite + Unpin>(wr: &mut W, frame: &[u8]) -> std::io::Result<()> {
    wr.write_all(frame).await?;
    wr.flush().await
}

/// Copies frames from the routing core to the writer. The routing core's PUBACKs answer
/// the device's publishes and complete the gate's pending acknowledgements instead; the
/// PINGRESPs answer the gate's own pings; a SUBACK for an MQTT 5 SUBSCRIBE the gate forwarded
/// without its refused filters gets them back, as "not authorized".
async fn relay_from_upstream(
    mut upstream: FrameReader<OwnedReadHalf>,
    frames: mpsc::Sender<Bytes>,
    acks: UpstreamAcks,
    refused_filters: RefusedFilters,
    reasons: Reasons,
    watch: DeviceWatch,
) {
    loop {
        let mut frame = match upstream.frame().await {
            Ok(frame) => frame,
            Err(e) => {
                debug!(error = %e, "routing core link closed");
                return;
            }
        };
        match packet_type(&frame) {
            PINGRESP => continue,
            PUBACK => {
                if let Some((pkid, code)) = codec::read_puback(&frame) {
                    let waiting = acks.lock().ok().and_then(|mut w| w.remove(&pkid));
                    if let Some(done) = waiting {
                        let _ = done.send(code);
                    }
                }
                continue;
            }
            SUBACK => {
                let pkid = codec::suback_pkid(&frame);
                let (commands, desired) = pkid
                    .and_then(|pkid| watch.subscribes.lock().ok()?.remove(&pkid))
                    .unwrap_or_default();
                // The best QoS the routing core granted the covering filters (QoS 1 or 2:
                // the device will acknowledge each command); none granted, nothing to tell.
                let codes = codec::suback_codes(&frame, watch.version).unwrap_or_default();
                let granted = |places: &[usize]| {
                    places
                        .iter()
                        .filter_map(|at| codes.get(*at).copied())
                        .filter(|code| *code < 0x80)
                        .max()
                };
                let commands = granted(&commands).map(|qos| qos > 0);
                let desired = granted(&desired).is_some();
                watch.subscribed(commands, desired).await;
                let refused = pkid.and_then(|pkid| {
                    refused_filters
                        .lock()
                        .ok()
                        .and_then(|mut r| r.remove(&pkid))
                });
                if let Some((at, why)) = refused {
                    frame = codec::merge_suback(frame, &at, &why, reasons);
                }
            }
            PUBLISH => {
                // A command on its way to the device: its PUBACK will say it was delivered.
                let command = codec::read_publish_head(&frame).and_then(|(t, pkid)| {
                    match (topic::parse(t), pkid) {
                        (Some((d, DeviceTopic::Command(c))), Some(pkid)) if d == watch.device => {
                            Some((pkid, c))
                        }
                        _ => None,
                    }
                });
                if let Some((pkid, command)) = command {
                    if let Ok(mut d) = watch.delivering.lock() {
                        d.insert(pkid, command);
                    }
                }
            }
            _ => {}
        }
        if frames.send(frame).await.is_err() {
            return;
        }
    }
}

/// How the writer speaks to the device.
struct Output {
    version: Version,
    reasons: Reasons,
    /// Most acknowledgements pending at once.
    window: usize,
    /// Longest one write may take.
    write_timeout: Duration,
}

/// The one task that writes to the device. Acknowledgements go out in the order they were
/// queued, each once its message is safe; frames from the routing core go out as they
/// come. At most `window` acknowledgements are pending at once, and every write must finish
/// within `write_timeout`, so a device that stops reading is closed instead of holding
/// buffers. When a message can not be made safe, the writer stops taking new
/// acknowledgements, still writes the pending ones that become safe, then ends, which ends
/// the session. Last, an MQTT 5 device gets a DISCONNECT saying why: the one the session
/// sends on `close`, or the writer's own when a message could not be made safe.
async fn write_to_device(
    mut wr: DeviceWriter,
    mut frames: mpsc::Receiver<Bytes>,
    mut acks: mpsc::Receiver<PendingAck>,
    mut close: oneshot::Receiver<Reply>,
    out: Output,
) {
    let mut pending = FuturesOrdered::new();
    let (mut frames_open, mut acks_open) = (true, true);
    let mut failed = false;
    loop {
        if !acks_open && !frames_open && pending.is_empty() {
            break;
        }
        let frame = tokio::select! {
            biased;
            Some((reply, safe)) = pending.next(), if !pending.is_empty() => match safe {
                Ok(verdict) => {
                    match codec::encode_reply(out.version, &reply, &verdict, out.reasons) {
                        Some(frame) => frame,
                        None => continue,
                    }
                }
                Err(e) => {
                    let e: AckFailure = e;
                    warn!(error = %e, "closing; the device will send unacknowledged messages again");
                    failed = true;
                    acks_open = false;
                    frames_open = false;
                    continue;
                }
            },
            ack = acks.recv(), if acks_open && pending.len() < out.window => {
                match ack {
                    Some(PendingAck { reply, safe }) => {
                        pending.push_back(safe.map(move |r| (reply, r)));
                    }
                    None => acks_open = false,
                }
                continue;
            }
            frame = frames.recv(), if frames_open => match frame {
                Some(f) => f,
                None => {
                    frames_open = false;
                    continue;
                }
            },
        };
        if !write(&mut wr, &frame, out.write_timeout).await {
            return;
        }
    }
    // The session has ended (its senders are gone), so its DISCONNECT, if any, is there.
    // Why a message could not be made safe is logged above, not told the device.
    let last = match (close.try_recv(), failed) {
        (Ok(reply), _) => Some(reply),
        (Err(_), true) => Some(Reply::Disconnect(
            CloseCode::UnspecifiedError,
            "a message could not be stored; send unacknowledged messages again".into(),
        )),
        (Err(_), false) => None,
    };
    let verdict = Verdict::default();
    if let Some(frame) =
        last.and_then(|r| codec::encode_reply(out.version, &r, &verdict, out.reasons))
    {
        if !write(&mut wr, &frame, out.write_timeout).await {
            return;
        }
    }
    let _ = timeout(out.write_timeout, wr.shutdown()).await;
}

/// Writes one frame to the device within `limit`; `false` if the device is gone or stopped
/// reading.
async fn write(wr: &mut DeviceWriter, frame: &[u8], limit: Duration) -> bool {
    match timeout(limit, write_now(wr, frame)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            debug!(error = %e, "device socket closed");
            false
        }
        Err(_) => {
            info!(timeout = ?limit, "device stopped reading; closing");
            false
        }
    }
}
