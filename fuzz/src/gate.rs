//! The gate's handling of what a device sends after the TLS handshake (the `packets` target).
//!
//! The gate's own code here: the reader (`FrameReader`, through
//! `tellus_broker::gate::fuzz_packets`), the size limit (`GateConfig::default()`), the ACL
//! (`topic::check_publish`, `topic::check_subscribe`) and the codec the gate re-encodes
//! with. The order of decisions is a model of `broker/src/gate/connection.rs` without its
//! sockets, registry,
//! ingest, PKI, rate limit or routing core: the first packet must be a CONNECT; the CONNECT is
//! admitted as `check_connect` does (the registry and serial checks pass: the device is
//! `DEVICE`); then every packet is handled as `Session::handle` does, until one ends the
//! connection.
//!
//! Properties checked for every input:
//! - the session ends with an [`End`] (a reason the gate logs), never a panic;
//! - every packet the reader returns re-encodes to bytes that parse back to the same packet
//!   (the gate forwards re-encoded packets, so a packet it cannot write would be lost);
//! - everything the gate forwards or answers encodes, within the size limit (except CONNECT,
//!   which carries the gate's credential instead of the device's login);
//! - a topic the ACL lets the device publish is a valid MQTT topic in its own tree whose
//!   parse gives back the same kind; a filter it lets the device subscribe is a valid filter
//!   in its own tree without `#`;
//! - no filter the device was granted matches any topic of the session that some device may
//!   publish (the isolation ARCHITECTURE.md promises: devices never hear each other, nor
//!   themselves);
//! - the device-side reader (`packet()`) and the routing-core-side one (`frame()`) cut the
//!   same bytes into the same frames.

use std::mem::discriminant;

use bytes::BytesMut;
use rumqttc::mqttbytes::{
    self, matches,
    v4::{Connect, Login, Packet, PubAck, PubComp, PubRec},
    valid_filter, valid_topic, Protocol, QoS,
};
use tellus_broker::gate::{fuzz_frames, fuzz_packets, FrameError, GateConfig};
use tellus_core::{
    topic::{self, AclDenied, DeviceTopic},
    DeviceId,
};

use crate::split_reads;

/// The device id the client certificate names, for every input.
pub const DEVICE: &str = "dev-1";

/// Why the gate ends the connection; each is logged (and counted) by the gate.
#[derive(Debug)]
pub enum End {
    /// The device closed the stream between packets.
    Closed,
    /// The device closed the stream inside a packet.
    Truncated,
    Malformed(mqttbytes::Error),
    TooLarge(usize, usize),
    /// CONNACK "unacceptable protocol version".
    RefusedProtocol,
    /// The first packet was this, not CONNECT.
    NotConnect(&'static str),
    /// CONNACK refusing the client id or the will.
    Refused(String),
    /// A packet a client may not send.
    Protocol(&'static str),
    Acl(AclDenied),
    Disconnected,
}

impl From<FrameError> for End {
    fn from(e: FrameError) -> End {
        match e {
            FrameError::Closed => End::Closed,
            FrameError::Truncated => End::Truncated,
            FrameError::Malformed(e) => End::Malformed(e),
            FrameError::TooLarge(n, max) => End::TooLarge(n, max),
            FrameError::Io(e) => unreachable!("the input socket never fails: {e}"),
        }
    }
}

/// What one session came to.
#[derive(Debug)]
pub struct Session {
    pub end: End,
    /// Packets read, including the one that ended the session.
    pub packets: usize,
    /// Whether the CONNECT was admitted.
    pub admitted: bool,
}

/// Runs one device session over a fuzz input (see [`split_reads`]) and checks the properties
/// in the module docs.
pub fn device_stream(input: &[u8]) -> Session {
    let (read_size, bytes) = split_reads(input);
    let max = GateConfig::default().max_packet_size;
    let (packets, stopped) = fuzz_packets(bytes, read_size, max);
    for p in &packets {
        round_trip(p);
    }
    readers_agree(bytes, read_size, max, &packets, &stopped);

    let mut gate = Model::new(max);
    let mut read = 0;
    let mut admitted = false;
    let mut session = packets.into_iter().inspect(|_| read += 1);
    let end = 'session: {
        let Some(first) = session.next() else {
            break 'session match stopped {
                FrameError::Malformed(
                    mqttbytes::Error::InvalidProtocol | mqttbytes::Error::InvalidProtocolLevel(_),
                ) => End::RefusedProtocol,
                e => e.into(),
            };
        };
        let Packet::Connect(connect) = first else {
            break 'session End::NotConnect(name(&first));
        };
        if let Err(end) = gate.admit(connect) {
            break 'session end;
        }
        admitted = true;
        for packet in session.by_ref() {
            if let Err(end) = gate.handle(packet) {
                break 'session end;
            }
        }
        stopped.into()
    };
    drop(session);
    gate.check_isolation();
    Session {
        end,
        packets: read,
        admitted,
    }
}

/// The gate's decisions for one connection, with what it forwarded and granted.
struct Model {
    device: DeviceId,
    max: usize,
    /// Every topic or filter the device named.
    seen: Vec<String>,
    /// Filters the ACL granted.
    granted: Vec<String>,
}

impl Model {
    fn new(max: usize) -> Model {
        Model {
            device: DeviceId::parse(DEVICE).expect("DEVICE is a valid device id"),
            max,
            seen: Vec::new(),
            granted: Vec::new(),
        }
    }

    /// `connection::check_connect`, then `open_link`'s rewrite.
    fn admit(&mut self, mut connect: Connect) -> Result<(), End> {
        if connect.protocol != Protocol::V4 {
            return Err(End::RefusedProtocol);
        }
        if connect.client_id.is_empty() {
            connect.client_id = self.device.to_string();
        } else if connect.client_id != self.device.as_str() {
            return Err(End::Refused("client id is not the device id".into()));
        }
        if let Some(will) = &mut connect.last_will {
            match self.check_publish(&will.topic) {
                Ok(kind) if kind.is_telemetry() => {
                    return Err(End::Refused(
                        "will refused: a will cannot be telemetry".into(),
                    ))
                }
                Ok(DeviceTopic::CertsCsr) => {
                    return Err(End::Refused(
                        "will refused: a will cannot be a certificate request".into(),
                    ))
                }
                Ok(_) => {}
                Err(e) => return Err(End::Refused(format!("will refused: {e}"))),
            }
            will.retain = false;
            if will.qos == QoS::ExactlyOnce {
                will.qos = QoS::AtLeastOnce;
            }
        }
        // open_link: the gate's credential (a 32-byte secret in hex) and keep-alive.
        connect.login = Some(Login::new("tellus-gate", "ab".repeat(32)));
        connect.keep_alive = 60;
        self.send(&Packet::Connect(connect), usize::MAX);
        Ok(())
    }

    /// `Session::handle`, `publish` and `subscribe`.
    fn handle(&mut self, packet: Packet) -> Result<(), End> {
        match packet {
            Packet::Publish(mut p) => {
                let kind = self.check_publish(&p.topic).map_err(End::Acl)?;
                let (pkid, qos) = (p.pkid, p.qos);
                // A CSR goes to the PKI (the `csr` target) and telemetry to ingest (the
                // `telemetry` target), as the payload; everything else is forwarded, never
                // retained, at QoS 1 at most.
                if kind != DeviceTopic::CertsCsr && !kind.is_telemetry() {
                    p.retain = false;
                    if qos != QoS::AtMostOnce {
                        p.qos = QoS::AtLeastOnce;
                    }
                    self.forward(&Packet::Publish(p));
                }
                match qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => self.forward(&Packet::PubAck(PubAck::new(pkid))),
                    QoS::ExactlyOnce => self.forward(&Packet::PubRec(PubRec::new(pkid))),
                }
                Ok(())
            }
            Packet::PubRel(rel) => {
                self.forward(&Packet::PubComp(PubComp::new(rel.pkid)));
                Ok(())
            }
            Packet::Subscribe(mut s) => {
                for f in &mut s.filters {
                    self.check_subscribe(&f.path).map_err(End::Acl)?;
                    if f.qos == QoS::ExactlyOnce {
                        f.qos = QoS::AtLeastOnce;
                    }
                }
                self.forward(&Packet::Subscribe(s));
                Ok(())
            }
            p @ (Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubComp(_)
            | Packet::Unsubscribe(_)) => {
                if let Packet::Unsubscribe(u) = &p {
                    self.seen.extend(u.topics.iter().cloned());
                }
                self.forward(&p);
                Ok(())
            }
            Packet::PingReq => {
                self.forward(&Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect => {
                self.forward(&Packet::Disconnect);
                Err(End::Disconnected)
            }
            other => Err(End::Protocol(name(&other))),
        }
    }

    fn check_publish(&mut self, topic: &str) -> Result<DeviceTopic, AclDenied> {
        self.seen.push(topic.to_owned());
        let verdict = topic::check_publish(&self.device, topic);
        if let Ok(kind) = &verdict {
            assert!(valid_topic(topic), "allowed publish on {topic:?}");
            assert_eq!(
                topic::parse(topic),
                Some((self.device.clone(), kind.clone())),
                "allowed publish on {topic:?} does not parse back"
            );
            assert_eq!(kind.topic(&self.device), topic);
        }
        verdict
    }

    fn check_subscribe(&mut self, filter: &str) -> Result<(), AclDenied> {
        self.seen.push(filter.to_owned());
        let verdict = topic::check_subscribe(&self.device, filter);
        if verdict.is_ok() {
            let tree = format!("{}/{}/", topic::ROOT, self.device);
            assert!(
                valid_filter(filter) && filter.starts_with(&tree) && !filter.contains('#'),
                "allowed subscription to {filter:?}"
            );
            self.granted.push(filter.to_owned());
        }
        verdict
    }

    /// Forwarding to the routing core and answering the device go through the same encoder.
    fn forward(&mut self, packet: &Packet) {
        self.send(packet, self.max);
    }

    /// What `frames::encode` does: write with no limit of its own; it logs and sends nothing
    /// if that fails.
    fn send(&mut self, packet: &Packet, limit: usize) {
        let mut buf = BytesMut::new();
        if let Err(e) = packet.write(&mut buf, usize::MAX) {
            panic!("the gate could not encode {packet:?}: {e}");
        }
        match Packet::read(&mut buf, limit) {
            Ok(again) => assert_eq!(&again, packet, "what the gate sends does not parse back"),
            Err(e) => panic!("the gate sends {packet:?}, which does not parse back: {e}"),
        }
        assert!(
            buf.is_empty(),
            "the gate sends trailing bytes after {packet:?}"
        );
    }

    fn check_isolation(&self) {
        for filter in &self.granted {
            for t in &self.seen {
                if !matches(t, filter) {
                    continue;
                }
                if let Some((owner, kind)) = topic::parse(t) {
                    assert!(
                        owner == self.device && !kind.device_may_publish(),
                        "granted filter {filter:?} matches {t:?}, which {owner} may publish"
                    );
                }
            }
        }
    }
}

/// A packet the reader returned encodes to bytes that parse back to it.
fn round_trip(packet: &Packet) {
    let mut buf = BytesMut::new();
    let n = packet
        .write(&mut buf, usize::MAX)
        .unwrap_or_else(|e| panic!("{packet:?} was read but does not encode: {e}"));
    assert_eq!(n, buf.len(), "write() miscounted {packet:?}");
    assert_eq!(n, packet.size(), "size() is wrong for {packet:?}");
    match Packet::read(&mut buf, usize::MAX) {
        Ok(again) => assert_eq!(&again, packet, "re-encoding changed the packet"),
        Err(e) => panic!("{packet:?} re-encoded does not parse: {e}"),
    }
    assert!(buf.is_empty(), "re-encoded {packet:?} has trailing bytes");
}

/// The device side's reader (`packet()`) and the routing-core side's (`frame()`) cut the same
/// bytes into the same frames, and agree on which are acceptable.
fn readers_agree(
    bytes: &[u8],
    read_size: usize,
    max: usize,
    packets: &[Packet],
    stopped: &FrameError,
) {
    let (frames, frames_stopped) = fuzz_frames(bytes, read_size, max);
    let parsed = |frame: &[u8]| Packet::read(&mut BytesMut::from(frame), max);
    for (i, p) in packets.iter().enumerate() {
        match frames.get(i).map(|f| parsed(f)) {
            Some(Ok(again)) => assert_eq!(&again, p, "frame() and packet() disagree at {i}"),
            other => panic!("packet() read {p:?}, frame() gave {other:?}"),
        }
    }
    match frames.get(packets.len()) {
        // The fixed header was fine, the rest was not: frame() does not look inside.
        Some(f) => {
            assert!(
                matches!(stopped, FrameError::Malformed(_)),
                "packet() stopped with {stopped:?} at {f:?}"
            );
            assert!(parsed(f).is_err(), "packet() refused {f:?}");
        }
        None => assert_eq!(
            discriminant(stopped),
            discriminant(&frames_stopped),
            "packet() stopped with {stopped:?}, frame() with {frames_stopped:?}"
        ),
    }
}

fn name(p: &Packet) -> &'static str {
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
