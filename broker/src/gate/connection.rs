//! One device connection, from TCP accept to close. See the [gate](super) for the outline.

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use bytes::Bytes;
use futures::{stream::FuturesOrdered, StreamExt};
use rumqttc::mqttbytes::{
    v4::{ConnAck, Connect, ConnectReturnCode, Login, Packet, PubAck, PubComp, PubRec, Publish},
    Protocol, QoS,
};
use tellus_core::{
    handoff::Pending,
    now_ms,
    topic::{self, DeviceTopic},
    DeviceId,
};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf},
    net::TcpStream,
    sync::mpsc,
    time::{sleep_until, timeout, Instant},
};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use super::{
    bump,
    frames::{encode, packet_type, FrameError, FrameReader, PINGRESP},
    Gate,
};
use crate::pki::device_id_from_cert;

/// Keep-alive the gate asks of the routing core for its own link; the gate pings it.
const UPSTREAM_KEEP_ALIVE: Duration = Duration::from_secs(60);
/// Room for frames waiting for the device's socket (routing core frames, PINGRESP, …).
const FRAME_QUEUE: usize = 64;

type DeviceReader = FrameReader<ReadHalf<TlsStream<TcpStream>>>;
type DeviceWriter = WriteHalf<TlsStream<TcpStream>>;

/// Serves one accepted TCP connection to its end. Never panics on input; every refusal is
/// logged with its reason and counted.
pub async fn serve(gate: &Gate, tcp: TcpStream, peer: SocketAddr, shutdown: CancellationToken) {
    let _ = tcp.set_nodelay(true);
    let tls = match timeout(gate.config.handshake_timeout, gate.tls.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            bump(&gate.stats.handshake_failed);
            info!(%peer, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            bump(&gate.stats.handshake_timeout);
            info!(%peer, timeout = ?gate.config.handshake_timeout, "TLS handshake timed out");
            return;
        }
    };
    let device = match tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| device_id_from_cert(c))
    {
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            bump(&gate.stats.handshake_failed);
            info!(%peer, error = %e, "client certificate names no device");
            return;
        }
        None => {
            bump(&gate.stats.handshake_failed);
            info!(%peer, "no client certificate");
            return;
        }
    };
    let span = info_span!("device", device_id = %device, %peer);
    bump(&gate.stats.active);
    Session::start(gate, device, tls, shutdown)
        .instrument(span)
        .await;
    gate.stats
        .active
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

/// An acknowledgement the writer sends once ingest has made the publish durable.
struct PendingAck {
    pkid: u16,
    qos: QoS,
    durable: Pending,
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
    #[error("routing core closed the link")]
    UpstreamClosed,
    #[error("could not write to the device")]
    WriterFailed,
    #[error("server shutting down")]
    Shutdown,
}

struct Session<'g> {
    gate: &'g Gate,
    device: DeviceId,
    reader: DeviceReader,
    upstream: tokio::net::tcp::OwnedWriteHalf,
    frames: mpsc::Sender<Bytes>,
    acks: mpsc::Sender<PendingAck>,
    /// QoS 2 telemetry the gate has answered with PUBREC and whose PUBREL it must answer
    /// itself rather than forward. Bounded by the device's in-flight window (packet ids).
    qos2_awaiting_rel: HashSet<u16>,
}

impl<'g> Session<'g> {
    async fn start(
        gate: &'g Gate,
        device: DeviceId,
        tls: TlsStream<TcpStream>,
        shutdown: CancellationToken,
    ) {
        let (rd, mut wr) = tokio::io::split(tls);
        let mut reader = FrameReader::new(rd, gate.config.max_packet_size);

        let connect = match timeout(gate.config.connect_timeout, reader.packet()).await {
            Ok(Ok(Packet::Connect(c))) => c,
            Ok(Ok(other)) => {
                bump(&gate.stats.protocol_errors);
                info!(packet = ?packet_name(&other), "first packet is not CONNECT");
                return;
            }
            Ok(Err(e)) => {
                bump(&gate.stats.protocol_errors);
                info!(error = %e, "could not read CONNECT");
                return;
            }
            Err(_) => {
                bump(&gate.stats.connect_timeout);
                info!(timeout = ?gate.config.connect_timeout, "no CONNECT in time");
                return;
            }
        };
        let Some(connect) = Self::admit(gate, &device, connect, &mut wr).await else {
            return;
        };
        let keep_alive = connect.keep_alive;
        let (upstream, upstream_reader) = match Self::link_upstream(gate, connect, &mut wr).await {
            Some(link) => link,
            None => return,
        };
        bump(&gate.stats.connected);
        info!(keep_alive, "device connected");

        let (frames, frames_rx) = mpsc::channel(FRAME_QUEUE);
        let (acks, acks_rx) = mpsc::channel(gate.config.max_inflight.max(1));
        let writer = tokio::spawn(
            write_to_device(wr, frames_rx, acks_rx, gate.config.max_inflight.max(1))
                .in_current_span(),
        );
        let relay =
            tokio::spawn(relay_from_upstream(upstream_reader, frames.clone()).in_current_span());

        let mut session = Session {
            gate,
            device,
            reader,
            upstream,
            frames,
            acks,
            qos2_awaiting_rel: HashSet::new(),
        };
        let end = session.run(keep_alive, &shutdown, writer, relay).await;
        match &end {
            End::AclDenied(_) | End::Protocol(_) => warn!(reason = %end, "connection closed"),
            _ => info!(reason = %end, "device disconnected"),
        }
    }

    /// Checks the CONNECT of `device`; answers refusals with a CONNACK and returns `None`.
    async fn admit(
        gate: &Gate,
        device: &DeviceId,
        mut connect: Connect,
        wr: &mut DeviceWriter,
    ) -> Option<Connect> {
        let refuse = |code| {
            Packet::ConnAck(ConnAck {
                session_present: false,
                code,
            })
        };
        if connect.protocol != Protocol::V4 {
            bump(&gate.stats.refused_protocol);
            info!(protocol = ?connect.protocol, "only MQTT 3.1.1 is accepted");
            let _ = write_now(wr, &refuse(ConnectReturnCode::RefusedProtocolVersion)).await;
            return None;
        }
        let registry = gate.registry.clone();
        let id = device.clone();
        let known = match tokio::task::spawn_blocking(move || registry.device(&id)).await {
            Ok(Ok(found)) => found.is_some(),
            Ok(Err(e)) => {
                warn!(error = %e, "registry lookup failed; refusing for now");
                let _ = write_now(wr, &refuse(ConnectReturnCode::ServiceUnavailable)).await;
                return None;
            }
            Err(_) => return None,
        };
        if !known {
            bump(&gate.stats.refused_unknown_device);
            info!("certificate is valid but the device is not registered");
            let _ = write_now(wr, &refuse(ConnectReturnCode::NotAuthorized)).await;
            return None;
        }
        if connect.client_id.is_empty() {
            connect.client_id = device.to_string();
        } else if connect.client_id != device.as_str() {
            bump(&gate.stats.refused_client_id);
            info!(client_id = %connect.client_id, "client id differs from the certificate's device id");
            let _ = write_now(wr, &refuse(ConnectReturnCode::BadClientId)).await;
            return None;
        }
        if let Some(will) = &connect.last_will {
            if let Err(e) = topic::check_publish(device, &will.topic) {
                bump(&gate.stats.acl_denied);
                warn!(reason = %e, "will topic refused");
                let _ = write_now(wr, &refuse(ConnectReturnCode::NotAuthorized)).await;
                return None;
            }
        }
        Some(connect)
    }

    /// Opens the device's link to the routing core and relays its CONNACK to the device.
    async fn link_upstream(
        gate: &Gate,
        mut connect: Connect,
        wr: &mut DeviceWriter,
    ) -> Option<(
        tokio::net::tcp::OwnedWriteHalf,
        FrameReader<tokio::net::tcp::OwnedReadHalf>,
    )> {
        let unavailable = Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReturnCode::ServiceUnavailable,
        });
        let stream = match TcpStream::connect(gate.routing.addr).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "routing core unreachable");
                let _ = write_now(wr, &unavailable).await;
                return None;
            }
        };
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
        let ack = match timeout(gate.config.connect_timeout, connack).await {
            Ok(Some(ack)) => ack,
            _ => {
                warn!("routing core did not acknowledge the link");
                let _ = write_now(wr, &unavailable).await;
                return None;
            }
        };
        let accepted = ack.code == ConnectReturnCode::Success;
        if write_now(wr, &Packet::ConnAck(ack)).await.is_err() || !accepted {
            return None;
        }
        Some((up, up_reader))
    }

    async fn run(
        &mut self,
        keep_alive: u16,
        shutdown: &CancellationToken,
        mut writer: tokio::task::JoinHandle<()>,
        mut relay: tokio::task::JoinHandle<()>,
    ) -> End {
        // MQTT: the server closes a connection silent for one and a half keep-alives.
        let grace = (keep_alive > 0).then(|| Duration::from_millis(keep_alive as u64 * 1500));
        let far = Duration::from_secs(86_400 * 365);
        let mut deadline = Instant::now() + grace.unwrap_or(far);
        let mut ping = tokio::time::interval(UPSTREAM_KEEP_ALIVE / 2);
        ping.reset();
        let end = loop {
            let step = tokio::select! {
                _ = shutdown.cancelled() => Err(End::Shutdown),
                _ = sleep_until(deadline) => Err(End::KeepAliveExpired),
                _ = &mut writer => Err(End::WriterFailed),
                _ = &mut relay => Err(End::UpstreamClosed),
                _ = ping.tick() => self.send_upstream(&Packet::PingReq).await,
                packet = self.reader.packet() => match packet {
                    Ok(p) => {
                        deadline = Instant::now() + grace.unwrap_or(far);
                        self.handle(p).await
                    }
                    Err(e) => Err(End::DeviceGone(e)),
                },
            };
            if let Err(end) = step {
                break end;
            }
        };
        if let End::DeviceGone(FrameError::Malformed(_) | FrameError::TooLarge(..)) = &end {
            bump(&self.gate.stats.protocol_errors);
        }
        // Without a DISCONNECT from the device, closing the link makes the routing core
        // publish the device's will, as MQTT requires.
        let _ = self.upstream.shutdown().await;
        relay.abort();
        // Dropping our senders lets the writer finish: it still writes the acknowledgement of
        // every publish ingest commits, then closes the TLS session.
        let Session { frames, acks, .. } = self;
        drop(std::mem::replace(frames, mpsc::channel(1).0));
        drop(std::mem::replace(acks, mpsc::channel(1).0));
        let _ = writer.await;
        end
    }

    async fn handle(&mut self, packet: Packet) -> Result<(), End> {
        match packet {
            Packet::Publish(p) => self.publish(p).await,
            Packet::Subscribe(s) => {
                for f in &s.filters {
                    if let Err(e) = topic::check_subscribe(&self.device, &f.path) {
                        bump(&self.gate.stats.acl_denied);
                        return Err(End::AclDenied(e));
                    }
                }
                self.forward(&Packet::Subscribe(s)).await
            }
            Packet::PubRel(rel) if self.qos2_awaiting_rel.remove(&rel.pkid) => {
                self.send_device(encode(&Packet::PubComp(PubComp::new(rel.pkid))))
                    .await
            }
            p @ (Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubRel(_)
            | Packet::PubComp(_)
            | Packet::Unsubscribe(_)) => self.forward(&p).await,
            Packet::PingReq => self.send_device(encode(&Packet::PingResp)).await,
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

    async fn publish(&mut self, p: Publish) -> Result<(), End> {
        let kind = match topic::check_publish(&self.device, &p.topic) {
            Ok(kind) => kind,
            Err(e) => {
                bump(&self.gate.stats.acl_denied);
                return Err(End::AclDenied(e));
            }
        };
        if !kind.is_telemetry() {
            return self.forward(&Packet::Publish(p)).await;
        }
        bump(&self.gate.stats.telemetry_received);
        self.telemetry(kind, p).await
    }

    /// Hands telemetry to ingest. While the hand-off channel or this connection's window of
    /// unacknowledged publishes is full, this waits, and so the device's socket is not read.
    async fn telemetry(&mut self, kind: DeviceTopic, p: Publish) -> Result<(), End> {
        if p.qos == QoS::ExactlyOnce && self.qos2_awaiting_rel.contains(&p.pkid) {
            // A re-sent QoS 2 publish we already committed: answer again, store nothing.
            return self
                .send_device(encode(&Packet::PubRec(PubRec::new(p.pkid))))
                .await;
        }
        let want_ack = p.qos != QoS::AtMostOnce;
        let pending = self
            .gate
            .ingest
            .submit(self.device.clone(), kind, p.payload, now_ms(), want_ack)
            .await
            .map_err(|e| End::Protocol(format!("ingest unavailable: {e}")))?;
        if let Some(durable) = pending {
            if p.qos == QoS::ExactlyOnce {
                self.qos2_awaiting_rel.insert(p.pkid);
            }
            self.acks
                .send(PendingAck {
                    pkid: p.pkid,
                    qos: p.qos,
                    durable,
                })
                .await
                .map_err(|_| End::WriterFailed)?;
        }
        Ok(())
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

    async fn send_device(&mut self, frame: Bytes) -> Result<(), End> {
        self.frames.send(frame).await.map_err(|_| End::WriterFailed)
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

/// Copies frames from the routing core to the writer, keeping the PINGRESPs that answer the
/// gate's own pings.
async fn relay_from_upstream(
    mut upstream: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    frames: mpsc::Sender<Bytes>,
) {
    loop {
        match upstream.frame().await {
            Ok(frame) if packet_type(&frame) == PINGRESP => continue,
            Ok(frame) => {
                if frames.send(frame).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                debug!(error = %e, "routing core link closed");
                return;
            }
        }
    }
}

/// The one task that writes to the device. Acknowledgements go out in the order the
/// publishes arrived (MQTT requires it), each once ingest has made its publish durable;
/// frames from the routing core go out as they come. At most `window` acknowledgements are
/// awaited at once. Ends when both inputs are closed and drained, or the device is gone.
async fn write_to_device(
    mut wr: DeviceWriter,
    mut frames: mpsc::Receiver<Bytes>,
    mut acks: mpsc::Receiver<PendingAck>,
    window: usize,
) {
    let mut inflight = FuturesOrdered::new();
    let (mut frames_open, mut acks_open) = (true, true);
    loop {
        if !frames_open && !acks_open && inflight.is_empty() {
            break;
        }
        let frame = tokio::select! {
            biased;
            Some((pkid, qos, result)) = inflight.next(), if !inflight.is_empty() => {
                match result {
                    Ok(Ok(_)) => match qos {
                        QoS::ExactlyOnce => encode(&Packet::PubRec(PubRec::new(pkid))),
                        _ => encode(&Packet::PubAck(PubAck::new(pkid))),
                    },
                    Ok(Err(e)) => {
                        warn!(error = %e, pkid, "telemetry not durable; closing without acknowledgement");
                        break;
                    }
                    Err(_) => {
                        warn!(pkid, "ingest stopped before committing; closing without acknowledgement");
                        break;
                    }
                }
            }
            ack = acks.recv(), if acks_open && inflight.len() < window => {
                match ack {
                    Some(PendingAck { pkid, qos, durable }) => {
                        inflight.push_back(async move { (pkid, qos, durable.await) });
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
        if wr.write_all(&frame).await.is_err() || wr.flush().await.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}
