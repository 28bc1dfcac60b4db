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
use rumqttc::mqttbytes::{
    self,
    v4::{
        ConnAck, Connect, ConnectReturnCode, Login, Packet, PubAck, PubComp, PubRec, Publish,
        Subscribe,
    },
    Protocol, QoS,
};
use tellus_core::{
    now_ms,
    topic::{self, DeviceTopic},
    AuditDecision, AuditEntry, DeviceId, DeviceStatus, IngestError,
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

use super::{audit::clip, trust::Issuer};
use super::{
    bump,
    frames::{encode, packet_type, FrameError, FrameReader, PINGRESP, PUBACK},
    rate::TokenBucket,
    sessions::Membership,
    Gate,
};
use crate::{
    pki::peer_identity,
    provision::{lookup_connecting, rotate_certificate, ProvisionError},
};

/// Keep-alive the gate asks of the routing core for its own link; the gate pings it.
const UPSTREAM_KEEP_ALIVE: Duration = Duration::from_secs(60);
/// Room for frames from the routing core waiting for the device's socket.
const FRAME_QUEUE: usize = 64;

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

/// Resolves when the message an acknowledgement answers is safe. Shared, because a QoS 2
/// message is answered twice (PUBREC, then PUBCOMP) and may be re-sent before PUBREL.
type Safe = Shared<BoxFuture<'static, Result<(), AckFailure>>>;

fn ready() -> Safe {
    future::ready(Ok(())).boxed().shared()
}

/// An acknowledgement the writer sends, in order, once `safe` resolves.
struct PendingAck {
    reply: Packet,
    safe: Safe,
}

/// PUBACKs the device's publishes await from the routing core, by packet id. The session
/// adds an entry before it forwards a publish; the relay completes it when the routing core's
/// PUBACK arrives. Bounded by the device's window of unacknowledged publishes.
type UpstreamAcks = Arc<Mutex<HashMap<u16, oneshot::Sender<()>>>>;

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
    #[error("protocol violation: {0}")]
    Protocol(String),
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

struct Session<'g> {
    gate: &'g Gate,
    device: DeviceId,
    reader: DeviceReader,
    upstream: OwnedWriteHalf,
    upstream_acks: UpstreamAcks,
    acks: mpsc::Sender<PendingAck>,
    /// QoS 2 publishes answered (or to be answered) with PUBREC and awaiting the device's
    /// PUBREL. At most one entry per packet id, so at most 65,535.
    qos2: HashMap<u16, Safe>,
    /// The certificate this connection presented (issuer, serial): what a CSR is checked
    /// against.
    peer_issuer: String,
    peer_serial: String,
    /// Whether a certificate rotation is under way: one at a time per connection.
    rotating: Arc<AtomicBool>,
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

        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            first = timeout(gate.config.connect_timeout, async {
                // MQTT 3.1.1 only: another version is refused before the 3.1.1 parser
                // misreads it (MQTT 5 properties would not parse at all).
                match reader.peek_connect_level().await? {
                    Some(level) if level != 4 => Err(FrameError::Malformed(
                        mqttbytes::Error::InvalidProtocolLevel(level),
                    )),
                    _ => reader.packet().await,
                }
            }) => first,
        };
        let connect = match first {
            Ok(Ok(Packet::Connect(c))) => c,
            Ok(Ok(other)) => {
                bump(&gate.stats.protocol_errors);
                let why = format!("first packet is {}, not CONNECT", packet_name(&other));
                info!(reason = %why, "connection refused");
                gate.audit(&peer, AuditDecision::Refused, why);
                return;
            }
            Ok(Err(FrameError::Malformed(
                mqttbytes::Error::InvalidProtocol | mqttbytes::Error::InvalidProtocolLevel(_),
            ))) => {
                let counter = &gate.stats.refused_protocol;
                let refusal = Refusal::new(
                    ConnectReturnCode::RefusedProtocolVersion,
                    counter,
                    "only MQTT 3.1.1 is accepted",
                );
                refuse(gate, &peer, &mut wr, refusal).await;
                return;
            }
            Ok(Err(e)) => {
                bump(&gate.stats.protocol_errors);
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
        // Who first (a revoked or unknown certificate is refused as such, whatever its
        // CONNECT says), then what the CONNECT asks for.
        if let Err(refusal) = verify(gate, &peer).await {
            return refuse(gate, &peer, &mut wr, refusal).await;
        }
        let connect = match check_connect(gate, &peer, connect) {
            Ok(c) => c,
            Err(refusal) => return refuse(gate, &peer, &mut wr, refusal).await,
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
        if let Err(refusal) = verify(gate, &peer).await {
            return refuse(gate, &peer, &mut wr, refusal).await;
        }
        let keep_alive = connect.keep_alive;
        let link = tokio::select! {
            _ = shutdown.cancelled() => return,
            link = link_upstream(gate, &peer, connect, &mut wr) => link,
        };
        let Some((upstream, upstream_reader)) = link else {
            return;
        };
        bump(&gate.stats.connected);
        info!(keep_alive, "device connected");
        gate.audit(&peer, AuditDecision::Accepted, "connected");

        let window = gate.config.max_inflight.max(1);
        let (frames, frames_rx) = mpsc::channel(FRAME_QUEUE);
        // The writer pulls acknowledgements as long as fewer than `window` are pending, so
        // this channel adds one more at most.
        let (acks, acks_rx) = mpsc::channel(1);
        let mut writer = tokio::spawn(
            write_to_device(wr, frames_rx, acks_rx, window, gate.config.write_timeout)
                .in_current_span(),
        );
        let upstream_acks = UpstreamAcks::default();
        let relay = tokio::spawn(
            relay_from_upstream(upstream_reader, frames, upstream_acks.clone()).in_current_span(),
        );

        let mut session = Session {
            gate,
            device: peer.device.clone(),
            reader,
            upstream,
            upstream_acks,
            acks,
            qos2: HashMap::new(),
            peer_issuer: peer.issuer.id.clone(),
            peer_serial: peer.serial.clone(),
            rotating: Arc::default(),
        };
        let (end, writer_done) = session
            .run(keep_alive, &shutdown, &mut writer, &mut membership)
            .await;
        match &end {
            End::AclDenied(_) | End::Protocol(_) => warn!(reason = %end, "connection closed"),
            _ => info!(reason = %end, "device disconnected"),
        }
        gate.audit(&peer, AuditDecision::Closed, end.to_string());
        // Without a DISCONNECT from the device, closing the link makes the routing core
        // publish the device's will, as MQTT requires.
        let Session {
            mut upstream,
            upstream_acks,
            acks,
            ..
        } = session;
        let _ = upstream.shutdown().await;
        relay.abort();
        let _ = relay.await;
        // The routing core will acknowledge nothing more: those publishes stay
        // unacknowledged, and the device sends them again when it reconnects.
        if let Ok(mut waiting) = upstream_acks.lock() {
            waiting.clear();
        }
        // Closing the channel lets the writer finish: it still writes the acknowledgement of
        // every publish that becomes safe, then closes the TLS session.
        drop(acks);
        if !writer_done {
            let _ = writer.await;
        }
    }

    /// Reads and handles the device's packets until the session ends. Returns why, and
    /// whether the writer has already finished.
    async fn run(
        &mut self,
        keep_alive: u16,
        shutdown: &CancellationToken,
        writer: &mut tokio::task::JoinHandle<()>,
        membership: &mut Membership<'_>,
    ) -> (End, bool) {
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
                _ = &mut *writer => return (End::WriterStopped, true),
                _ = ping.tick() => self.send_upstream(&Packet::PingReq).await,
                _ = sleep_until(paused_until.unwrap_or(deadline)), if paused_until.is_some() => {
                    paused_until = None;
                    Ok(())
                }
                packet = self.reader.packet(), if paused_until.is_none() => match packet {
                    Ok(p) => {
                        // Everything a device starts (not its answers to the gate) costs a token.
                        let counted = matches!(
                            p,
                            Packet::Publish(_)
                                | Packet::Subscribe(_)
                                | Packet::Unsubscribe(_)
                                | Packet::PingReq
                        );
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
                return (end, false);
            }
        }
    }

    async fn handle(&mut self, packet: Packet) -> Result<(), End> {
        match packet {
            Packet::Publish(p) => self.publish(p).await,
            Packet::PubRel(rel) => {
                // PUBCOMP once the message is safe; a PUBREL for a packet id this session does
                // not know (re-sent after a reconnect) is answered at once, as MQTT requires.
                let safe = self.qos2.remove(&rel.pkid).unwrap_or_else(ready);
                self.ack(Packet::PubComp(PubComp::new(rel.pkid)), safe)
                    .await
            }
            Packet::Subscribe(s) => self.subscribe(s).await,
            p @ (Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubComp(_)
            | Packet::Unsubscribe(_)) => self.forward(&p).await,
            Packet::PingReq => self.ack(Packet::PingResp, ready()).await,
            Packet::Disconnect => {
                self.forward(&Packet::Disconnect).await?;
                Err(End::DeviceDisconnected)
            }
            other => {
                bump(&self.gate.stats.protocol_errors);
                Err(End::Protocol(format!(
                    "a client may not send {}",
                    packet_name(&other)
                )))
            }
        }
    }

    async fn subscribe(&mut self, mut s: Subscribe) -> Result<(), End> {
        for f in &mut s.filters {
            if let Err(e) = topic::check_subscribe(&self.device, &f.path) {
                bump(&self.gate.stats.acl_denied);
                return Err(End::AclDenied(e));
            }
            // Messages to a device travel at QoS 1 at most, like everything the gate relays.
            if f.qos == QoS::ExactlyOnce {
                f.qos = QoS::AtLeastOnce;
            }
        }
        self.forward(&Packet::Subscribe(s)).await
    }

    async fn publish(&mut self, mut p: Publish) -> Result<(), End> {
        let kind = match topic::check_publish(&self.device, &p.topic) {
            Ok(kind) => kind,
            Err(e) => {
                bump(&self.gate.stats.acl_denied);
                return Err(End::AclDenied(e));
            }
        };
        if p.qos == QoS::ExactlyOnce {
            if let Some(safe) = self.qos2.get(&p.pkid) {
                // Re-sent before PUBREL: answer again once the first copy is safe; keep
                // nothing twice.
                let safe = safe.clone();
                return self.ack(Packet::PubRec(PubRec::new(p.pkid)), safe).await;
            }
        }
        let (pkid, qos) = (p.pkid, p.qos);
        let safe = if kind == DeviceTopic::CertsCsr {
            Some(self.rotate(p.payload).await?)
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
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(AckFailure::NotDurable(e)),
                        Err(_) => Err(AckFailure::NotDurable(IngestError::Closed)),
                    }
                }
                .boxed()
                .shared()
            })
        } else {
            p.retain = false;
            let taken = (qos != QoS::AtMostOnce).then(|| {
                p.qos = QoS::AtLeastOnce;
                let (tx, rx) = oneshot::channel();
                if let Ok(mut waiting) = self.upstream_acks.lock() {
                    waiting.insert(pkid, tx);
                }
                async move { rx.await.map_err(|_| AckFailure::UpstreamLost) }
                    .boxed()
                    .shared()
            });
            self.forward(&Packet::Publish(p)).await?;
            taken
        };
        match (qos, safe) {
            (QoS::AtLeastOnce, Some(safe)) => {
                self.ack(Packet::PubAck(PubAck::new(pkid)), safe).await
            }
            (QoS::ExactlyOnce, Some(safe)) => {
                self.qos2.insert(pkid, safe.clone());
                self.ack(Packet::PubRec(PubRec::new(pkid)), safe).await
            }
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
            let busy =
                serde_json::json!({ "error": "a certificate rotation is already under way" });
            self.gate
                .publisher
                .publish(topic, busy.to_string().into_bytes())
                .await
                .map_err(|_| End::UpstreamClosed)?;
            return Ok(ready());
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
        Ok(
            async move { work.await.unwrap_or(Err(AckFailure::UpstreamLost)) }
                .boxed()
                .shared(),
        )
    }

    /// Queues `reply` behind every earlier acknowledgement, to be sent once `safe` resolves.
    /// Waits while the device's window of pending acknowledgements is full, and so stops
    /// reading its socket.
    async fn ack(&mut self, reply: Packet, safe: Safe) -> Result<(), End> {
        self.acks
            .send(PendingAck { reply, safe })
            .await
            .map_err(|_| End::WriterStopped)
    }

    async fn forward(&mut self, packet: &Packet) -> Result<(), End> {
        bump(&self.gate.stats.forwarded);
        self.send_upstream(packet).await
    }

    async fn send_upstream(&mut self, packet: &Packet) -> Result<(), End> {
        self.upstream
            .write_all(&encode(packet))
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

/// Why a CONNECT is refused: the CONNACK code, the counter, and the reason logged and
/// audited.
struct Refusal<'g> {
    code: ConnectReturnCode,
    counter: &'g AtomicU64,
    why: Cow<'static, str>,
}

impl<'g> Refusal<'g> {
    fn new(
        code: ConnectReturnCode,
        counter: &'g AtomicU64,
        why: impl Into<Cow<'static, str>>,
    ) -> Self {
        Refusal {
            code,
            counter,
            why: why.into(),
        }
    }
}

/// Answers CONNECT with a refusal: counted, logged, audited.
async fn refuse(gate: &Gate, peer: &Peer, wr: &mut DeviceWriter, refusal: Refusal<'_>) {
    bump(refusal.counter);
    info!(code = ?refusal.code, reason = %refusal.why, "connection refused");
    gate.audit(peer, AuditDecision::Refused, refusal.why);
    let ack = Packet::ConnAck(ConnAck {
        session_present: false,
        code: refusal.code,
    });
    let _ = timeout(gate.config.write_timeout, write_now(wr, &ack)).await;
}

/// Checks what the CONNECT itself says: protocol, client id and will.
fn check_connect<'g>(
    gate: &'g Gate,
    peer: &Peer,
    mut connect: Connect,
) -> Result<Connect, Refusal<'g>> {
    use ConnectReturnCode::*;
    let stats = &gate.stats;
    if connect.protocol != Protocol::V4 {
        let why = "only MQTT 3.1.1 is accepted";
        return Err(Refusal::new(
            RefusedProtocolVersion,
            &stats.refused_protocol,
            why,
        ));
    }
    if connect.client_id.is_empty() {
        connect.client_id = peer.device.to_string();
    } else if connect.client_id != peer.device.as_str() {
        let why = format!(
            "client id {:?} is not the device id",
            clip(&connect.client_id, 64)
        );
        return Err(Refusal::new(BadClientId, &stats.refused_client_id, why));
    }
    if let Some(will) = &mut connect.last_will {
        let verdict = match topic::check_publish(&peer.device, &will.topic) {
            Ok(kind) if kind.is_telemetry() => Err("a will cannot be telemetry".to_owned()),
            Ok(DeviceTopic::CertsCsr) => Err("a will cannot be a certificate request".to_owned()),
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(why) = verdict {
            let why = format!("will refused: {why}");
            return Err(Refusal::new(NotAuthorized, &stats.acl_denied, why));
        }
        will.retain = false;
        if will.qos == QoS::ExactlyOnce {
            will.qos = QoS::AtLeastOnce;
        }
    }
    Ok(connect)
}

/// Checks the registry: the device exists and is enabled, and the certificate presented is
/// one recorded for it and not revoked.
async fn verify<'g>(gate: &'g Gate, peer: &Peer) -> Result<(), Refusal<'g>> {
    use ConnectReturnCode::*;
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
                ServiceUnavailable,
                &stats.refused_unavailable,
                "registry unavailable",
            ));
        }
        Err(_) => {
            return Err(Refusal::new(
                ServiceUnavailable,
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
                    NotAuthorized,
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
            NotAuthorized,
            &stats.refused_disabled,
            "the device is disabled",
        ));
    }
    Ok(())
}

/// Opens the device's link to the routing core and relays its CONNACK to the device.
async fn link_upstream(
    gate: &Gate,
    peer: &Peer,
    connect: Connect,
    wr: &mut DeviceWriter,
) -> Option<(OwnedWriteHalf, FrameReader<OwnedReadHalf>)> {
    let (up, up_reader, ack) = match open_link(gate, connect).await {
        Ok(link) => link,
        Err(why) => {
            warn!(reason = why, "no link to the routing core");
            let counter = &gate.stats.refused_unavailable;
            let refusal = Refusal::new(ConnectReturnCode::ServiceUnavailable, counter, why);
            refuse(gate, peer, wr, refusal).await;
            return None;
        }
    };
    let accepted = ack.code == ConnectReturnCode::Success;
    let sent = timeout(
        gate.config.write_timeout,
        write_now(wr, &Packet::ConnAck(ack)),
    )
    .await;
    if !matches!(sent, Ok(Ok(()))) || !accepted {
        return None;
    }
    Some((up, up_reader))
}

/// Connects to the routing core as the device, with the gate's credential, and returns the
/// link with the routing core's CONNACK.
async fn open_link(
    gate: &Gate,
    mut connect: Connect,
) -> Result<(OwnedWriteHalf, FrameReader<OwnedReadHalf>, ConnAck), &'static str> {
    let stream = TcpStream::connect(gate.routing.addr)
        .await
        .map_err(|_| "routing core unreachable")?;
    let _ = stream.set_nodelay(true);
    let (rd, mut up) = stream.into_split();
    let mut up_reader = FrameReader::new(rd, gate.config.max_packet_size.saturating_mul(2));
    let cred = &gate.routing.credential;
    connect.login = Some(Login::new(cred.username.clone(), cred.password.clone()));
    connect.keep_alive = UPSTREAM_KEEP_ALIVE.as_secs() as u16;
    let connack = async {
        up.write_all(&encode(&Packet::Connect(connect)))
            .await
            .ok()?;
        match up_reader.packet().await {
            Ok(Packet::ConnAck(ack)) => Some(ack),
            _ => None,
        }
    };
    match timeout(gate.config.connect_timeout, connack).await {
        Ok(Some(ack)) => Ok((up, up_reader, ack)),
        _ => Err("routing core did not acknowledge the link"),
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

async fn write_now<W: AsyncWrite + Unpin>(wr: &mut W, packet: &Packet) -> std::io::Result<()> {
    wr.write_all(&encode(packet)).await?;
    wr.flush().await
}

/// Copies frames from the routing core to the writer. The routing core's PUBACKs answer
/// the device's publishes and complete the gate's pending acknowledgements instead; the
/// PINGRESPs answer the gate's own pings.
async fn relay_from_upstream(
    mut upstream: FrameReader<OwnedReadHalf>,
    frames: mpsc::Sender<Bytes>,
    acks: UpstreamAcks,
) {
    loop {
        let frame = match upstream.frame().await {
            Ok(frame) => frame,
            Err(e) => {
                debug!(error = %e, "routing core link closed");
                return;
            }
        };
        match packet_type(&frame) {
            PINGRESP => {}
            PUBACK => {
                // PUBACK: fixed header (2 bytes), then the packet id.
                let &[_, _, hi, lo, ..] = frame.as_ref() else {
                    continue;
                };
                let pkid = u16::from_be_bytes([hi, lo]);
                let waiting = acks.lock().ok().and_then(|mut w| w.remove(&pkid));
                if let Some(done) = waiting {
                    let _ = done.send(());
                }
            }
            _ => {
                if frames.send(frame).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The one task that writes to the device. Acknowledgements go out in the order they were
/// queued, each once its message is safe; frames from the routing core go out as they
/// come. At most `window` acknowledgements are pending at once, and every write must finish
/// within `write_timeout`, so a device that stops reading is closed instead of holding
/// buffers. When a message can not be made safe, the writer stops taking new
/// acknowledgements, still writes the pending ones that become safe, then ends, which ends the session.
async fn write_to_device(
    mut wr: DeviceWriter,
    mut frames: mpsc::Receiver<Bytes>,
    mut acks: mpsc::Receiver<PendingAck>,
    window: usize,
    write_timeout: Duration,
) {
    let mut pending = FuturesOrdered::new();
    let (mut frames_open, mut acks_open) = (true, true);
    loop {
        if !acks_open && !frames_open && pending.is_empty() {
            break;
        }
        let frame = tokio::select! {
            biased;
            Some((reply, safe)) = pending.next(), if !pending.is_empty() => match safe {
                Ok(()) => encode(&reply),
                Err(e) => {
                    warn!(error = %e, "closing; the device will send unacknowledged messages again");
                    acks_open = false;
                    frames_open = false;
                    continue;
                }
            },
            ack = acks.recv(), if acks_open && pending.len() < window => {
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
        let written = timeout(write_timeout, async {
            wr.write_all(&frame).await?;
            wr.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "device socket closed");
                return;
            }
            Err(_) => {
                info!(timeout = ?write_timeout, "device stopped reading; closing");
                return;
            }
        }
    }
    let _ = timeout(write_timeout, wr.shutdown()).await;
}
