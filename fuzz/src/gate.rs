//! The gate's handling of what a device sends after the TLS handshake (the `packets` target),
//! in MQTT 3.1.1 and MQTT 5.
//!
//! The gate's own code here: the reader (`FrameReader`, through
//! `tellus_broker::gate::fuzz_packets`, which also tells the version the CONNECT names), the
//! size limit (`GateConfig::default()`), the codec (`gate::codec`: decoding into [`Inbound`],
//! topic aliases, and every encoder the gate writes with), and the ACL
//! (`topic::check_publish`, `topic::check_subscribe`). The order of decisions is a model of
//! `broker/src/gate/connection.rs` without its sockets, registry, ingest, PKI, rate limit or
//! routing core: the first packet must be a CONNECT in a version the gate speaks; the CONNECT
//! is admitted by the gate's own `Connect::admit` (the registry and serial checks pass: the
//! device is [`DEVICE`]); then every packet is handled as `Session::handle`,
//! `publish` and `subscribe` do, until one ends the connection; an MQTT 5 device is then
//! told why in a DISCONNECT, as the gate tells it (after every acknowledgement queued).
//!
//! Every acknowledgement is modelled as settled at once: a forwarded publish as the routing
//! core taking it ("success"), telemetry as ingest deciding it (stored, or dead-lettered and
//! answered "payload format invalid"), a CSR as the rotation succeeding. The gate answers a
//! QoS 2 publish whose packet id awaits PUBREL again (DUP or not) with what its PUBREC said,
//! unless that PUBREC carried a failure code (`AckCode::is_failure`), which ended the
//! exchange: then it is a new message. At most `max_inflight` QoS 2 messages await PUBREL;
//! when that many do, the ended exchanges are dropped, and if none was, the session ends with
//! "receive maximum exceeded". (In the gate an acknowledgement that is not settled yet counts
//! as awaiting PUBREL; a message that can not be made safe, which ends the session with
//! "unspecified error", has no counterpart here.)
//!
//! Properties checked for every input:
//! - the session ends with an [`End`] (a reason the gate logs), never a panic; the
//!   [`Session`] tells what the gate forwarded, answered and granted on the way;
//! - what the gate forwards to the routing core encodes, and decodes again with
//!   `codec::decode` in the device's version (the link to the routing core speaks it), to
//!   what the gate meant to send: a PUBLISH with the same topic (aliases resolved), payload,
//!   packet id, DUP and properties (less the topic alias), at QoS 1 at most and not retained;
//!   a SUBSCRIBE with the filters the ACL allowed, their options and the properties as the
//!   device sent them, at QoS 1 at most; the CONNECT with the gate's login and keep-alive;
//!   the DISCONNECT the gate writes itself (`e0 00`, a normal disconnection, which makes the
//!   routing core drop the will). This is checked for every PUBLISH, SUBSCRIBE and CONNECT
//!   the reader returns, whatever the ACL says, so that the encoders meet every property the
//!   decoder lets through. Each frame forwarded fits the routing core's size limit (the
//!   gate's plus 64 KiB, room for the topic a resolved alias adds), except the CONNECT, which
//!   carries the gate's login instead of the device's. PUBACK, PUBREC, PUBCOMP and
//!   UNSUBSCRIBE are forwarded as the bytes read (which `readers_agree` covers); PUBREL and
//!   PINGREQ are answered by the gate; a DISCONNECT is forwarded as `e0 00`, except one with
//!   MQTT 5 reason 0x04 (the device asks for its will), for which the gate forwards nothing
//!   and closes the link, so that the routing core publishes the will. Byte-exact
//!   re-encoding never was the promise (rumqttc normalises, for example, a property length
//!   that understates its properties). A well-formed packet that breaks a rule of MQTT 5
//!   (subscription identifiers in a client's PUBLISH, 3.3.4-6, which rumqttc 0.25 also
//!   misreads when there are two or more; subscription identifier 0 in a SUBSCRIBE, which
//!   rumqttd drops the link for) is decoded as [`Inbound::Violation`] and never forwarded:
//!   the session ends with its DISCONNECT code;
//! - everything the gate answers (CONNACK, PUBACK, PUBREC, PUBCOMP, SUBACK, PINGRESP, and
//!   an MQTT 5 DISCONNECT, which the gate encodes by hand) encodes and parses back with
//!   rumqttc's v4 or v5 `Packet::read` to the answer meant: packet id, reason code
//!   (telemetry is answered as ingest would: "payload format invalid" for what
//!   `decode_json` or `decode_protobuf` refuses), and a reason string, at most 256 bytes cut
//!   from the reason, only where `Connect::reasons` allows it (an MQTT 5 device with room for
//!   it: on acknowledgements unless it turned problem information off, always in a refusing
//!   CONNACK and in DISCONNECT); an MQTT 5 SUBACK answers a refused `$share/…` filter
//!   "shared subscriptions not supported" and any other refused filter "not authorized",
//!   also where a partly refused SUBACK (`codec::merge_suback`) puts them back in the places
//!   of the refused filters;
//! - a topic the ACL lets the device publish is a valid MQTT topic in its own tree whose
//!   parse gives back the same kind; a filter it lets the device subscribe is a valid filter
//!   in its own tree without `#`;
//! - a topic alias stands only for a topic the ACL allowed (one set with a refused topic is
//!   not kept; using it later is "never set" if it was not set before), of at most
//!   `codec::ALIAS_TOPIC_MAX` bytes: the model keeps its own table and the gate's
//!   `TopicAliases` must resolve as it does;
//! - no filter the device was granted matches any topic of the session that some device may
//!   publish (the isolation ARCHITECTURE.md promises: devices never hear each other, nor
//!   themselves);
//! - the device-side reader (`packet()`) and the routing-core-side one (`frame()`) cut the
//!   same bytes into the same frames: each packet `packet()` returns is what `codec::decode`
//!   makes of the frame `frame()` cut at the same place, and they stop for the same reason.

use std::{collections::HashMap, fmt, mem::discriminant};

use bytes::{Bytes, BytesMut};
use rumqttc::{
    mqttbytes::{v4, valid_filter, valid_topic, QoS},
    v5::mqttbytes::{self as m5, v5},
};
use tellus_broker::gate::{
    codec::{
        self, qos_from_v5, qos_to_v5, AckCode, CloseCode, Connect, Grant, Inbound, Limits, Publish,
        Reasons, Refused, Reply, Subscribe, TopicAliases, Verdict, Version, ALIAS_TOPIC_MAX,
    },
    fuzz_frames, fuzz_packets, FrameError, GateConfig,
};
use tellus_core::{
    telemetry,
    topic::{self, AclDenied, DeviceTopic},
    DeviceId,
};

use crate::split_reads;

/// The device id the client certificate names, for every input.
pub const DEVICE: &str = "dev-1";

/// The gate's login on the routing core: `routing::GATE_USER` and a 32-byte secret in hex.
const GATE_USER: &str = "tellus-gate";
/// The keep-alive the gate asks of the routing core (`connection::UPSTREAM_KEEP_ALIVE`).
const UPSTREAM_KEEP_ALIVE: u16 = 60;
/// Topic aliases an MQTT 5 device may set (`connection::TOPIC_ALIAS_MAX`).
const TOPIC_ALIAS_MAX: u16 = 64;
/// Longest reason string the gate sends (`codec::REASON_MAX`).
const REASON_MAX: usize = 256;

/// Why the gate ends the connection; each is logged (and counted) by the gate.
#[derive(Debug)]
pub enum End {
    /// The device closed the stream between packets.
    Closed,
    /// The device closed the stream inside a packet.
    Truncated,
    Malformed(String),
    TooLarge(usize, usize),
    /// CONNACK "unacceptable protocol version": the CONNECT named this protocol level.
    RefusedProtocol(u8),
    /// The first packet was this, not CONNECT.
    NotConnect(&'static str),
    /// CONNACK refusing the CONNECT (client id, authentication method or will), and why.
    Refused(Refused, String),
    /// A protocol violation after CONNECT: the MQTT 5 reason code the gate closes with, and
    /// why.
    Protocol(CloseCode, String),
    Acl(AclDenied),
    /// The device sent DISCONNECT; `with_will` if it asked for its will (MQTT 5 reason
    /// 0x04), and so the gate forwarded none.
    Disconnected {
        with_will: bool,
    },
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

/// The reason the gate logs and tells an MQTT 5 device (`connection::End`'s wording).
impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Closed => write!(f, "device connection ended: connection closed"),
            End::Truncated => write!(
                f,
                "device connection ended: connection closed in the middle of a packet"
            ),
            End::Malformed(why) => write!(f, "device connection ended: malformed packet: {why}"),
            End::TooLarge(n, max) => write!(
                f,
                "device connection ended: packet of {n} bytes is larger than the limit of {max}"
            ),
            End::RefusedProtocol(level) => write!(
                f,
                "MQTT protocol level {level} is not spoken here; use 4 (3.1.1) or 5"
            ),
            End::NotConnect(name) => write!(f, "first packet is {name}, not CONNECT"),
            End::Refused(_, why) => f.write_str(why),
            End::Protocol(_, why) => write!(f, "protocol violation: {why}"),
            End::Acl(e) => write!(f, "ACL violation: {e}"),
            End::Disconnected { .. } => write!(f, "device sent DISCONNECT"),
        }
    }
}

impl End {
    /// What the gate tells an MQTT 5 device in DISCONNECT when the session ends so
    /// (`connection::End::close_code`); `None` where the device left.
    fn close_code(&self) -> Option<CloseCode> {
        match self {
            End::Malformed(_) => Some(CloseCode::MalformedPacket),
            End::TooLarge(..) => Some(CloseCode::PacketTooLarge),
            End::Acl(_) => Some(CloseCode::NotAuthorized),
            End::Protocol(code, _) => Some(*code),
            _ => None,
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
    /// The version the connection speaks, if the gate speaks the one its CONNECT names.
    pub version: Option<Version>,
    /// What the gate answered after CONNACK, in order, with the reason code of each.
    pub replies: Vec<(Reply, AckCode)>,
    /// The topic of every PUBLISH forwarded to the routing core, in order.
    pub forwarded: Vec<String>,
    /// The filters forwarded to the routing core.
    pub granted: Vec<String>,
}

/// Runs one device session over a fuzz input (see [`split_reads`]) and checks the properties
/// in the module docs.
pub fn device_stream(input: &[u8]) -> Session {
    let (read_size, bytes) = split_reads(input);
    let max = GateConfig::default().max_packet_size;
    let (version, packets, stopped) = fuzz_packets(bytes, read_size, max);
    readers_agree(bytes, read_size, max, version, &packets, &stopped);
    let version = match version {
        Ok(version) => version,
        Err(level) => {
            // Answered in 3.1.1, the one version every client can read a CONNACK of.
            let end = End::RefusedProtocol(level);
            connack_refused(
                Version::V4,
                Reasons::None,
                Refused::UnsupportedProtocolVersion,
                &end.to_string(),
            );
            return Session {
                end,
                packets: 0,
                admitted: false,
                version: None,
                replies: Vec::new(),
                forwarded: Vec::new(),
                granted: Vec::new(),
            };
        }
    };
    for p in &packets {
        round_trip(version, p);
    }

    let mut gate = Model::new(version, max);
    let mut read = 0;
    let mut admitted = false;
    let mut session = packets.into_iter().inspect(|_| read += 1);
    let end = 'session: {
        let Some(first) = session.next() else {
            break 'session stopped.into();
        };
        let Inbound::Connect(connect) = first else {
            break 'session End::NotConnect(first.name());
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
    if admitted {
        gate.close(&end);
    }
    gate.check_isolation();
    Session {
        end,
        packets: read,
        admitted,
        version: Some(version),
        replies: gate.replies,
        forwarded: gate.forwarded,
        granted: gate.granted,
    }
}

/// The gate's decisions for one connection, with what it forwarded, answered and granted.
struct Model {
    device: DeviceId,
    version: Version,
    max: usize,
    /// Where an MQTT 5 device takes reason strings.
    reasons: Reasons,
    aliases: TopicAliases,
    /// QoS 2 publishes answered with PUBREC and awaiting PUBREL: what PUBREC said. (One
    /// whose PUBREC said a failure ended there; it stays until its packet id comes again or
    /// the map is full.)
    qos2: HashMap<u16, Verdict>,
    /// The most QoS 2 publishes that may await PUBREL (`GateConfig::max_inflight`).
    qos2_max: usize,
    /// The topic aliases as the model keeps them, to check `aliases` against.
    alias_topics: HashMap<u16, String>,
    /// Every topic or filter the device named.
    seen: Vec<String>,
    /// Filters the ACL granted.
    granted: Vec<String>,
    forwarded: Vec<String>,
    replies: Vec<(Reply, AckCode)>,
}

impl Model {
    fn new(version: Version, max: usize) -> Model {
        Model {
            device: DeviceId::parse(DEVICE).expect("DEVICE is a valid device id"),
            version,
            max,
            reasons: Reasons::None,
            aliases: TopicAliases::new(TOPIC_ALIAS_MAX),
            qos2: HashMap::new(),
            qos2_max: GateConfig::default().max_inflight.max(1),
            alias_topics: HashMap::new(),
            seen: Vec::new(),
            granted: Vec::new(),
            forwarded: Vec::new(),
            replies: Vec::new(),
        }
    }

    /// `connection::check_connect` (`Connect::admit`), then CONNACK and `open_link`'s CONNECT.
    fn admit(&mut self, connect: Connect) -> Result<(), End> {
        assert_eq!(
            connect.version(),
            self.version,
            "CONNECT read in another version"
        );
        // A refusing CONNACK already carries a reason where the CONNECT allows it.
        self.reasons = connect.reasons();
        let will = connect.will_topic().map(str::to_owned);
        let (connect, assigned) = match connect.admit(&self.device) {
            Ok(admitted) => admitted,
            Err((code, why)) => return Err(self.refuse(code, why)),
        };
        if let Some(will) = will {
            // What the ACL let through as a will obeys the ACL's own properties.
            let _ = self.check_publish(&will);
            let tame = match &connect {
                Connect::V4(c) => c.last_will.as_ref().map(|w| (w.retain, w.qos)),
                Connect::V5(_, w) => w.as_ref().map(|w| (w.retain, qos_from_v5(w.qos))),
            };
            assert!(
                matches!(tame, Some((false, QoS::AtMostOnce | QoS::AtLeastOnce))),
                "the will relayed is {tame:?}"
            );
        }
        let config = GateConfig::default();
        let limits = Limits {
            receive_maximum: u16::try_from(config.max_inflight).unwrap_or(u16::MAX),
            maximum_packet_size: u32::try_from(config.max_packet_size).unwrap_or(u32::MAX),
            topic_alias_maximum: TOPIC_ALIAS_MAX,
            assigned_client_id: assigned,
        };
        connack_accepted(self.version, &limits);
        upstream_connect(self.version, connect);
        Ok(())
    }

    /// A CONNACK refusing the CONNECT, and the end it comes to.
    fn refuse(&self, code: Refused, why: String) -> End {
        connack_refused(self.version, self.reasons, code, &why);
        End::Refused(code, why)
    }

    /// `Session::handle`.
    fn handle(&mut self, packet: Inbound) -> Result<(), End> {
        match packet {
            Inbound::Publish(p) => self.publish(p),
            Inbound::PubRel(pkid) => {
                let verdict = self.qos2.remove(&pkid).unwrap_or_default();
                self.reply(Reply::PubComp(pkid), verdict);
                Ok(())
            }
            Inbound::Subscribe(s) => self.subscribe(s),
            Inbound::Forward(frame) => {
                let kind = frame.first().map(|b| b >> 4);
                assert!(
                    matches!(kind, Some(4 | 5 | 7 | 10)),
                    "forwarded as it is: {frame:?}"
                );
                if kind == Some(10) {
                    let filters = unsubscribed(self.version, &frame);
                    self.seen.extend(filters);
                }
                Ok(())
            }
            Inbound::PingReq => {
                self.reply(Reply::PingResp, Verdict::default());
                Ok(())
            }
            Inbound::Disconnect { with_will } => {
                assert!(
                    !with_will || self.version == Version::V5,
                    "an MQTT 3.1.1 DISCONNECT asks for the will"
                );
                // The routing core drops the will on any DISCONNECT: one asking for the will
                // is not forwarded, the link just closes.
                if !with_will {
                    forwarded_disconnect(self.version);
                }
                Err(End::Disconnected { with_will })
            }
            Inbound::Violation(code, why) => {
                assert_eq!(self.version, Version::V5, "{why}: not a rule of MQTT 3.1.1");
                Err(End::Protocol(code, why))
            }
            Inbound::Connect(_) => Err(End::Protocol(
                CloseCode::ProtocolError,
                "a second CONNECT".into(),
            )),
            Inbound::NotFromClient(name) => Err(End::Protocol(
                CloseCode::ProtocolError,
                format!("a client may not send {name}"),
            )),
        }
    }

    /// `Session::publish`. A CSR goes to the PKI (the `csr` target) and telemetry to ingest
    /// (the `telemetry` target), as the payload; everything else is forwarded.
    fn publish(&mut self, mut p: Publish) -> Result<(), End> {
        let meant = self.resolution(&p);
        let new_alias = match (self.aliases.resolve(&mut p), meant) {
            (Ok(alias), Ok((topic, set))) => {
                assert_eq!((&p.topic, alias), (&topic, set), "topic alias resolved");
                alias
            }
            (Err((code, why)), Err(meant)) => {
                assert_eq!(code, meant, "topic alias refused: {why}");
                return Err(End::Protocol(code, why));
            }
            (got, meant) => panic!("topic aliases gave {got:?}, the model {meant:?}"),
        };
        let alias = p.properties.as_ref().and_then(|props| props.topic_alias);
        assert_eq!(alias, None, "a resolved publish keeps its topic alias");
        let v5 = self.version == Version::V5;
        if v5 && p.retain {
            return Err(End::Protocol(
                CloseCode::RetainNotSupported,
                "retained messages are not available to devices".into(),
            ));
        }
        let (pkid, qos) = (p.pkid, p.qos);
        let reply = match qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => Some(Reply::PubAck(pkid)),
            QoS::ExactlyOnce => Some(Reply::PubRec(pkid)),
        };
        let kind = match self.check_publish(&p.topic) {
            Ok(kind) => {
                // Only an allowed topic is kept under its alias.
                if let Some(alias) = new_alias {
                    self.keep_alias(alias, &p.topic);
                }
                kind
            }
            Err(e) => {
                return match (v5, reply) {
                    // MQTT 5 answers "not authorized" and keeps the connection.
                    (true, Some(reply)) => {
                        self.reply(reply, Verdict::new(AckCode::NotAuthorized, e.to_string()));
                        Ok(())
                    }
                    _ => Err(End::Acl(e)),
                };
            }
        };
        if qos == QoS::ExactlyOnce {
            match self.qos2.get(&pkid).cloned() {
                // Sent again before PUBREL, DUP or not: answered again, kept once.
                Some(verdict) if !verdict.code.is_failure() => {
                    self.reply(Reply::PubRec(pkid), verdict);
                    return Ok(());
                }
                // Its PUBREC said a failure, which ended that exchange: a new message.
                Some(_) => {
                    self.qos2.remove(&pkid);
                }
                None => {}
            }
            if self.qos2.len() >= self.qos2_max {
                self.qos2.retain(|_, verdict| !verdict.code.is_failure());
            }
            if self.qos2.len() >= self.qos2_max {
                return Err(End::Protocol(
                    CloseCode::ReceiveMaximumExceeded,
                    format!("more than {} QoS 2 messages await PUBREL", self.qos2_max),
                ));
            }
        }
        let verdict = if kind == DeviceTopic::CertsCsr {
            Verdict::default()
        } else if kind.is_telemetry() {
            self.ingest(&kind, &p.payload)
        } else if p.breaks_payload_format() {
            let why = "the payload format indicator says UTF-8, and the payload is not";
            return match reply {
                Some(reply) => {
                    self.reply(reply, Verdict::new(AckCode::PayloadFormatInvalid, why));
                    Ok(())
                }
                None => Err(End::Protocol(CloseCode::PayloadFormatInvalid, why.into())),
            };
        } else {
            self.forward_publish(&p);
            Verdict::default()
        };
        match reply {
            Some(reply @ Reply::PubRec(_)) => {
                self.qos2.insert(pkid, verdict.clone());
                self.reply(reply, verdict);
            }
            Some(reply) => self.reply(reply, verdict),
            None => {}
        }
        Ok(())
    }

    /// What `TopicAliases::resolve` must make of `p` by the model's table of aliases: its
    /// topic and the alias it sets, or the code the session ends with.
    fn resolution(&self, p: &Publish) -> Result<(String, Option<u16>), CloseCode> {
        let alias = p.properties.as_ref().and_then(|props| props.topic_alias);
        match alias {
            None if p.topic.is_empty() && p.properties.is_some() => Err(CloseCode::ProtocolError),
            None => Ok((p.topic.clone(), None)),
            Some(a) if a == 0 || a > TOPIC_ALIAS_MAX => Err(CloseCode::TopicAliasInvalid),
            Some(a) if p.topic.is_empty() => match self.alias_topics.get(&a) {
                Some(topic) => Ok((topic.clone(), None)),
                None => Err(CloseCode::ProtocolError),
            },
            Some(a) => Ok((p.topic.clone(), Some(a))),
        }
    }

    /// `TopicAliases::keep` of a topic the ACL allowed, in the gate's table and the model's:
    /// kept if it is at most `ALIAS_TOPIC_MAX` bytes, else the alias is forgotten.
    fn keep_alias(&mut self, alias: u16, topic: &str) {
        assert!(
            topic::check_publish(&self.device, topic).is_ok(),
            "alias {alias} kept for {topic:?}, which the ACL refuses"
        );
        self.aliases.keep(alias, topic);
        if topic.len() <= ALIAS_TOPIC_MAX {
            self.alias_topics.insert(alias, topic.to_owned());
        } else {
            self.alias_topics.remove(&alias);
        }
    }

    /// What ingest makes of a telemetry payload (`pipeline::decode`), as the gate answers it:
    /// stored, or kept as a dead letter and answered "payload format invalid".
    fn ingest(&self, kind: &DeviceTopic, payload: &[u8]) -> Verdict {
        let mut now = || 1_700_000_000_000;
        let decoded = match kind {
            DeviceTopic::Telemetry => telemetry::decode_json(payload, &mut now),
            DeviceTopic::TelemetryPb => telemetry::decode_protobuf(payload, &mut now),
            other => unreachable!("{other:?} is not telemetry"),
        };
        match decoded {
            Ok(_) => Verdict::default(),
            Err(why) => Verdict::new(
                AckCode::PayloadFormatInvalid,
                format!("not valid telemetry, kept as a dead letter: {why}"),
            ),
        }
    }

    /// `Session::subscribe`: MQTT 3.1.1 closes on a refused filter; MQTT 5 forwards the
    /// others and answers the refused ones in the SUBACK: "shared subscriptions not
    /// supported" for a `$share/…` filter, "not authorized" for any other.
    fn subscribe(&mut self, s: Subscribe) -> Result<(), End> {
        let filters: Vec<String> = s.filters().into_iter().map(str::to_owned).collect();
        let mut refused = Vec::new();
        let mut why = String::new();
        for (at, filter) in filters.iter().enumerate() {
            if let Err(e) = self.check_subscribe(filter) {
                if self.version == Version::V4 {
                    return Err(End::Acl(e));
                }
                if why.is_empty() {
                    why = e.to_string();
                }
                refused.push((at, Grant::refused(filter)));
            }
        }
        if refused.len() == filters.len() {
            let grants = refused.into_iter().map(|(_, grant)| grant).collect();
            let verdict = Verdict::new(AckCode::NotAuthorized, why);
            self.reply(Reply::SubAck(s.pkid(), grants), verdict);
            return Ok(());
        }
        let keep: Vec<bool> = (0..filters.len())
            .map(|i| !refused.iter().any(|(at, _)| *at == i))
            .collect();
        let frame = upstream_subscribe(self.version, &s, &keep);
        self.fits(&frame);
        for (filter, _) in filters.iter().zip(&keep).filter(|(_, kept)| **kept) {
            self.granted.push(filter.clone());
        }
        if !refused.is_empty() {
            self.merged_suback(&s, &refused, &why);
        }
        Ok(())
    }

    /// The routing core's MQTT 5 SUBACK for the filters forwarded, with the refused ones put
    /// back by the relay (`codec::merge_suback`), reads as the device's whole SUBACK.
    fn merged_suback(&self, s: &Subscribe, refused: &[(usize, Grant)], why: &str) {
        let Subscribe::V5(s) = s else {
            unreachable!("MQTT 3.1.1 closes on a refused filter")
        };
        let granted = |f: &v5::Filter| v5::SubscribeReasonCode::Success(cap_v5(f.qos));
        let refusal = |i: usize| refused.iter().find(|(at, _)| *at == i).map(|(_, g)| *g);
        let core = v5::SubAck {
            pkid: s.pkid,
            return_codes: (s.filters.iter().enumerate())
                .filter(|(i, _)| refusal(*i).is_none())
                .map(|(_, f)| granted(f))
                .collect(),
            properties: None,
        };
        let merged = codec::merge_suback(
            encode_v5(&v5::Packet::SubAck(core)),
            refused,
            why,
            self.reasons,
        );
        let ack = match read_v5(&merged) {
            v5::Packet::SubAck(ack) => ack,
            other => panic!("merge_suback made {other:?}"),
        };
        let expected: Vec<_> = (s.filters.iter().enumerate())
            .map(|(i, f)| match refusal(i) {
                Some(Grant::SharedNotSupported) => {
                    v5::SubscribeReasonCode::SharedSubscriptionsNotSupported
                }
                Some(_) => v5::SubscribeReasonCode::NotAuthorized,
                None => granted(f),
            })
            .collect();
        assert_eq!(ack.pkid, s.pkid, "merged SUBACK answers another packet");
        assert_eq!(
            ack.return_codes, expected,
            "merged SUBACK misplaces its codes"
        );
        let said = ack.properties.and_then(|p| p.reason_string);
        check_reason(
            said.as_deref(),
            Some(why).filter(|_| self.reasons.on_acks()),
        );
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
        }
        verdict
    }

    /// `Publish::upstream` of a publish the gate forwards, alias resolved.
    fn forward_publish(&mut self, p: &Publish) {
        let frame = upstream_publish(self.version, p);
        self.fits(&frame);
        self.forwarded.push(p.topic.clone());
    }

    /// A frame the routing core takes: no larger than its limit (the gate's, and room for
    /// the topic a resolved alias adds).
    fn fits(&self, frame: &[u8]) {
        let remaining = remaining_length(frame);
        let limit = self.max + 65_536;
        assert!(
            remaining <= limit,
            "the gate forwards a packet of {remaining} bytes, the routing core takes {limit}"
        );
    }

    /// The writer's `encode_reply`, parsed back as the device would.
    fn reply(&mut self, reply: Reply, verdict: Verdict) {
        let frame = codec::encode_reply(self.version, &reply, &verdict, self.reasons)
            .unwrap_or_else(|| panic!("{:?} has no {reply:?}", self.version));
        assert!(!frame.is_empty(), "the gate could not encode {reply:?}");
        match self.version {
            Version::V4 => check_reply_v4(&reply, &frame),
            Version::V5 => check_reply_v5(&reply, &verdict, self.reasons, &frame),
        }
        self.replies.push((reply, verdict.code));
    }

    /// The end of an admitted session: an MQTT 5 device is told why the gate closes.
    fn close(&mut self, end: &End) {
        if let (Version::V5, Some(code)) = (self.version, end.close_code()) {
            self.reply(Reply::Disconnect(code, end.to_string()), Verdict::default());
        }
    }

    fn check_isolation(&self) {
        for filter in &self.granted {
            for t in &self.seen {
                if !filter_matches(t, filter) {
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

/// The DISCONNECT the gate forwards for the device's, `e0 00`: a normal disconnection in
/// either version, which makes the routing core drop the will. (rumqttc 0.25 can not read an
/// MQTT 5 DISCONNECT of remaining length 0, which `codec::decode` and rumqttd read.)
fn forwarded_disconnect(version: Version) {
    let frame = [0xe0, 0x00];
    match codec::decode(version, BytesMut::from(&frame[..])) {
        Ok(Inbound::Disconnect { with_will: false }) => {}
        other => panic!("the DISCONNECT forwarded decodes to {other:?}"),
    }
    if version == Version::V4 {
        assert_eq!(read_v4(&frame), v4::Packet::Disconnect);
    }
}

/// Whether `filter` matches `topic` as MQTT defines it: `+` is any one level, a last `#` any
/// number of levels, even none; a topic starting with `$` matches no wildcard at its start.
/// (rumqttc's `matches` slices the topic's first byte, and panics on one that starts with a
/// multi-byte character.)
fn filter_matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match levels.next() {
            Some(level) if f == "+" || f == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// What the gate forwards for every PUBLISH, SUBSCRIBE and CONNECT the reader returns
/// decodes again to what it meant to send.
fn round_trip(version: Version, packet: &Inbound) {
    match packet {
        Inbound::Publish(p) => {
            upstream_publish(version, p);
        }
        Inbound::Subscribe(s) => {
            upstream_subscribe(version, s, &vec![true; s.filters().len()]);
        }
        Inbound::Connect(c) => upstream_connect(version, c.clone()),
        _ => {}
    }
}

/// `p.upstream()`, checked: it decodes to `p` at QoS 1 at most, not retained, without a
/// topic alias.
fn upstream_publish(version: Version, p: &Publish) -> Bytes {
    let frame = p.upstream();
    let mut meant = p.clone();
    meant.qos = cap(p.qos);
    meant.retain = false;
    if let Some(props) = &mut meant.properties {
        props.topic_alias = None;
    }
    match codec::decode(version, BytesMut::from(&frame[..])) {
        Ok(Inbound::Publish(again)) => assert_eq!(again, meant, "forwarded PUBLISH changed"),
        other => panic!("{p:?} is forwarded as {frame:?}, which decodes to {other:?}"),
    }
    frame
}

/// `s.upstream(keep)`, checked: it decodes to the filters kept, at QoS 1 at most, with
/// everything else as the device sent it.
fn upstream_subscribe(version: Version, s: &Subscribe, keep: &[bool]) -> Bytes {
    let frame = s.upstream(keep);
    let kept = |i: usize| keep.get(i).copied().unwrap_or(false);
    let meant = match s.clone() {
        Subscribe::V4(mut s) => {
            s.filters = (s.filters.into_iter().enumerate())
                .filter(|(i, _)| kept(*i))
                .map(|(_, mut f)| {
                    f.qos = cap(f.qos);
                    f
                })
                .collect();
            Subscribe::V4(s)
        }
        Subscribe::V5(mut s) => {
            s.filters = (s.filters.into_iter().enumerate())
                .filter(|(i, _)| kept(*i))
                .map(|(_, mut f)| {
                    f.qos = cap_v5(f.qos);
                    f
                })
                .collect();
            Subscribe::V5(s)
        }
    };
    match codec::decode(version, BytesMut::from(&frame[..])) {
        Ok(Inbound::Subscribe(again)) => assert_eq!(again, meant, "forwarded SUBSCRIBE changed"),
        other => panic!("{s:?} is forwarded as {frame:?}, which decodes to {other:?}"),
    }
    frame
}

/// `connect.upstream(..)`, checked: it decodes to the same CONNECT with the gate's
/// keep-alive and credential (MQTT 3.1.1 decodes the login; for MQTT 5 rumqttc reads it).
fn upstream_connect(version: Version, connect: Connect) {
    let password = "ab".repeat(32);
    let frame = connect
        .clone()
        .upstream(GATE_USER, &password, UPSTREAM_KEEP_ALIVE);
    let meant = match connect {
        Connect::V4(mut c) => {
            c.login = Some(v4::Login::new(GATE_USER, password.as_str()));
            c.keep_alive = UPSTREAM_KEEP_ALIVE;
            Connect::V4(c)
        }
        Connect::V5(mut c, will) => {
            c.keep_alive = UPSTREAM_KEEP_ALIVE;
            // The routing core would alias topics per subscription: no aliases upstream.
            if let Some(props) = c.properties.as_mut() {
                props.topic_alias_max = None;
            }
            Connect::V5(c, will)
        }
    };
    match codec::decode(version, BytesMut::from(&frame[..])) {
        Ok(Inbound::Connect(again)) => assert_eq!(again, meant, "forwarded CONNECT changed"),
        other => panic!("the CONNECT forwarded, {frame:?}, decodes to {other:?}"),
    }
    if version == Version::V5 {
        match read_v5(&frame) {
            v5::Packet::Connect(_, _, Some(login)) => assert_eq!(
                (login.username.as_str(), login.password.as_str()),
                (GATE_USER, password.as_str()),
                "the CONNECT forwarded has another login"
            ),
            other => panic!("the CONNECT forwarded reads as {other:?}"),
        }
    }
}

/// The CONNACK accepting the device reads back with the limits it announces.
fn connack_accepted(version: Version, limits: &Limits) {
    let frame = codec::connack_accepted(version, false, limits);
    match version {
        Version::V4 => match read_v4(&frame) {
            v4::Packet::ConnAck(a) => assert_eq!(
                (a.code, a.session_present),
                (v4::ConnectReturnCode::Success, false)
            ),
            other => panic!("CONNACK reads as {other:?}"),
        },
        Version::V5 => {
            let ack = match read_v5(&frame) {
                v5::Packet::ConnAck(a) => a,
                other => panic!("CONNACK reads as {other:?}"),
            };
            assert_eq!(ack.code, v5::ConnectReturnCode::Success);
            let p = ack.properties.expect("an MQTT 5 CONNACK tells the limits");
            assert_eq!(p.assigned_client_identifier, limits.assigned_client_id);
            assert_eq!(p.topic_alias_max, Some(limits.topic_alias_maximum));
            assert_eq!(p.max_packet_size, Some(limits.maximum_packet_size));
            assert!(p.receive_max.is_some_and(|n| n > 0), "{p:?}");
            assert_eq!(
                (p.retain_available, p.shared_subscription_available),
                (Some(0), Some(0))
            );
        }
    }
}

/// A CONNACK refusing the device reads back with its code and (MQTT 5) why.
fn connack_refused(version: Version, reasons: Reasons, refused: Refused, why: &str) {
    let frame = codec::connack_refused(version, reasons, refused, why);
    // The return code (3.1.1, 3.2.2.3) or reason code (5, 3.2.2.2) the specifications give
    // each refusal, written out here rather than taken from the gate.
    let code: u8 = match (version, refused) {
        (Version::V4, Refused::UnsupportedProtocolVersion) => 0x01,
        (Version::V4, Refused::ClientIdNotValid) => 0x02,
        (Version::V4, Refused::ServerUnavailable) => 0x03,
        (Version::V4, _) => 0x05,
        (Version::V5, Refused::UnsupportedProtocolVersion) => 0x84,
        (Version::V5, Refused::ClientIdNotValid) => 0x85,
        (Version::V5, Refused::NotAuthorized) => 0x87,
        (Version::V5, Refused::ServerUnavailable) => 0x88,
        (Version::V5, Refused::Banned) => 0x8a,
        (Version::V5, Refused::BadAuthenticationMethod) => 0x8c,
        (Version::V5, Refused::RetainNotSupported) => 0x9a,
    };
    // CONNACK: after the fixed header, the session-present flag, then the code.
    assert_eq!(frame.first(), Some(&0x20), "{refused:?}");
    assert_eq!(body(&frame).get(..2), Some(&[0, code][..]), "{refused:?}");
    match version {
        Version::V4 => match read_v4(&frame) {
            v4::Packet::ConnAck(a) => assert!(!a.session_present),
            other => panic!("CONNACK reads as {other:?}"),
        },
        Version::V5 => {
            let ack = match read_v5(&frame) {
                v5::Packet::ConnAck(a) => a,
                other => panic!("CONNACK reads as {other:?}"),
            };
            assert!(!ack.session_present);
            let said = ack.properties.and_then(|p| p.reason_string);
            check_reason(said.as_deref(), Some(why).filter(|_| reasons.on_close()));
        }
    }
}

fn check_reply_v4(reply: &Reply, frame: &[u8]) {
    use v4::Packet as P;
    let packet = read_v4(frame);
    let ok = match (reply, &packet) {
        (Reply::PubAck(id), P::PubAck(a)) => a.pkid == *id,
        (Reply::PubRec(id), P::PubRec(a)) => a.pkid == *id,
        (Reply::PubComp(id), P::PubComp(a)) => a.pkid == *id,
        (Reply::PingResp, P::PingResp) => true,
        (Reply::SubAck(id, grants), P::SubAck(a)) => {
            let codes = grants.iter().map(|g| match g {
                Grant::Granted(q) => v4::SubscribeReasonCode::Success(*q),
                Grant::NotAuthorized | Grant::SharedNotSupported => {
                    v4::SubscribeReasonCode::Failure
                }
            });
            a.pkid == *id && a.return_codes == codes.collect::<Vec<_>>()
        }
        _ => false,
    };
    assert!(ok, "{reply:?} reads back as {packet:?}");
}

fn check_reply_v5(reply: &Reply, verdict: &Verdict, reasons: Reasons, frame: &[u8]) {
    use v5::Packet as P;
    let packet = read_v5(frame);
    let why = verdict.why.as_deref().filter(|_| reasons.on_acks());
    let (ok, said) = match (reply, &packet) {
        (Reply::PubAck(id), P::PubAck(a)) => (
            a.pkid == *id && reason_byte(frame) == spec_code(verdict.code),
            a.properties.as_ref().and_then(|p| p.reason_string.clone()),
        ),
        (Reply::PubRec(id), P::PubRec(a)) => (
            a.pkid == *id && reason_byte(frame) == spec_code(verdict.code),
            a.properties.as_ref().and_then(|p| p.reason_string.clone()),
        ),
        (Reply::PubComp(id), P::PubComp(a)) => (
            a.pkid == *id && a.reason == v5::PubCompReason::Success,
            None,
        ),
        (Reply::PingResp, P::PingResp(_)) => (true, None),
        (Reply::SubAck(id, grants), P::SubAck(a)) => {
            let codes = grants.iter().map(|g| match g {
                Grant::Granted(q) => v5::SubscribeReasonCode::Success(qos_to_v5(*q)),
                Grant::NotAuthorized => v5::SubscribeReasonCode::NotAuthorized,
                Grant::SharedNotSupported => {
                    v5::SubscribeReasonCode::SharedSubscriptionsNotSupported
                }
            });
            (
                a.pkid == *id && a.return_codes == codes.collect::<Vec<_>>(),
                a.properties.as_ref().and_then(|p| p.reason_string.clone()),
            )
        }
        (Reply::Disconnect(code, why), P::Disconnect(d)) => {
            // The reason goes with a DISCONNECT whatever the device asked for, if it fits.
            let said = d.properties.as_ref().and_then(|p| p.reason_string.clone());
            check_reason(
                said.as_deref(),
                Some(why.as_str()).filter(|_| reasons.on_close()),
            );
            (d.reason_code == *code, None)
        }
        _ => (false, None),
    };
    assert!(ok, "{reply:?} with {verdict:?} reads back as {packet:?}");
    // PUBCOMP and PINGRESP carry no reason (a PUBCOMP answers "success" whatever the PUBREC
    // said: a PUBREL for an exchange whose PUBREC said a failure still gets one).
    if matches!(
        reply,
        Reply::PubAck(_) | Reply::PubRec(_) | Reply::SubAck(..)
    ) {
        check_reason(said.as_deref(), why);
    }
}

/// A reason string sent is the reason meant, cut to at most 256 bytes (ending in "…" then).
fn check_reason(said: Option<&str>, meant: Option<&str>) {
    match (said, meant) {
        (None, None) => {}
        (Some(said), Some(meant)) => {
            assert!(said.len() <= REASON_MAX, "a reason of {} bytes", said.len());
            let cut = said.strip_suffix('…').filter(|_| said != meant);
            assert!(
                said == meant || cut.is_some_and(|cut| meant.starts_with(cut)),
                "reason {said:?} for {meant:?}"
            );
        }
        (said, meant) => panic!("reason {said:?} where {meant:?} was meant"),
    }
}

/// The reason code MQTT 5 gives each acknowledgement code (section 3.4.2.1), written out
/// here rather than taken from the gate, so that the check does not repeat what it checks.
fn spec_code(code: AckCode) -> u8 {
    match code {
        AckCode::Success => 0x00,
        AckCode::NoMatchingSubscribers => 0x10,
        AckCode::UnspecifiedError => 0x80,
        AckCode::NotAuthorized => 0x87,
        AckCode::QuotaExceeded => 0x97,
        AckCode::PayloadFormatInvalid => 0x99,
    }
}

/// The reason byte of a PUBACK or PUBREC frame: after the fixed header and the packet id;
/// absent means success.
fn reason_byte(frame: &[u8]) -> u8 {
    body(frame).get(2).copied().unwrap_or(0)
}

/// What follows a frame's fixed header (type byte, then the remaining length in one to four
/// bytes, each but the last with its high bit set).
fn body(frame: &[u8]) -> &[u8] {
    let length_bytes = frame.iter().skip(1).take_while(|b| *b & 0x80 != 0).count() + 1;
    frame.get(1 + length_bytes..).unwrap_or_default()
}

/// The filters of an UNSUBSCRIBE frame the reader accepted.
fn unsubscribed(version: Version, frame: &[u8]) -> Vec<String> {
    match version {
        Version::V4 => match read_v4(frame) {
            v4::Packet::Unsubscribe(u) => u.topics,
            other => panic!("UNSUBSCRIBE reads as {other:?}"),
        },
        Version::V5 => match read_v5(frame) {
            v5::Packet::Unsubscribe(u) => u.filters,
            other => panic!("UNSUBSCRIBE reads as {other:?}"),
        },
    }
}

/// One whole MQTT 3.1.1 packet the gate wrote (or accepted), parsed.
fn read_v4(frame: &[u8]) -> v4::Packet {
    let mut buf = BytesMut::from(frame);
    let packet = v4::Packet::read(&mut buf, usize::MAX)
        .unwrap_or_else(|e| panic!("{frame:?} does not parse as MQTT 3.1.1: {e}"));
    assert!(buf.is_empty(), "trailing bytes after {packet:?}");
    packet
}

/// One whole MQTT 5 packet the gate wrote (or accepted), parsed.
fn read_v5(frame: &[u8]) -> v5::Packet {
    let mut buf = BytesMut::from(frame);
    let packet = v5::Packet::read(&mut buf, None)
        .unwrap_or_else(|e| panic!("{frame:?} does not parse as MQTT 5: {e}"));
    assert!(buf.is_empty(), "trailing bytes after {packet:?}");
    packet
}

fn encode_v5(packet: &v5::Packet) -> Bytes {
    let mut buf = BytesMut::new();
    packet
        .write(&mut buf, None)
        .unwrap_or_else(|e| panic!("{packet:?} does not encode: {e}"));
    buf.freeze()
}

/// The remaining length of a whole frame (what follows its fixed header).
fn remaining_length(frame: &[u8]) -> usize {
    let header = rumqttc::mqttbytes::check(frame.iter(), usize::MAX)
        .unwrap_or_else(|e| panic!("{frame:?} is no whole frame: {e}"));
    assert_eq!(
        header.frame_length(),
        frame.len(),
        "{frame:?} is no one frame"
    );
    // The type byte, then one to four length bytes, each but the last with its high bit set.
    let length_bytes = frame[1..].iter().take_while(|b| *b & 0x80 != 0).count() + 1;
    frame.len() - 1 - length_bytes
}

fn cap(q: QoS) -> QoS {
    match q {
        QoS::ExactlyOnce => QoS::AtLeastOnce,
        q => q,
    }
}

fn cap_v5(q: m5::QoS) -> m5::QoS {
    match q {
        m5::QoS::ExactlyOnce => m5::QoS::AtLeastOnce,
        q => q,
    }
}

/// The device side's reader (`packet()`) and the routing-core side's (`frame()`) cut the same
/// bytes into the same frames, and agree on which are acceptable: each packet is
/// `codec::decode` of the frame at its place.
fn readers_agree(
    bytes: &[u8],
    read_size: usize,
    max: usize,
    version: Result<Version, u8>,
    packets: &[Inbound],
    stopped: &FrameError,
) {
    let (frames, frames_stopped) = fuzz_frames(bytes, read_size, max);
    let version = match version {
        Ok(version) => version,
        Err(level) => {
            // Named by a whole CONNECT frame, which is refused before it is parsed.
            assert!(packets.is_empty(), "packets after refusing level {level}");
            let first = frames
                .first()
                .expect("a refused level comes in a whole frame");
            assert_eq!(first[0] >> 4, 1, "level {level} named by {first:?}");
            assert!(Version::from_level(level).is_none());
            return;
        }
    };
    let decoded = |frame: &Bytes| codec::decode(version, BytesMut::from(&frame[..]));
    for (i, p) in packets.iter().enumerate() {
        match frames.get(i).map(decoded) {
            Some(Ok(again)) => assert_eq!(&again, p, "frame() and packet() disagree at {i}"),
            other => panic!("packet() read {p:?}, frame() gave {other:?}"),
        }
    }
    match frames.get(packets.len()) {
        // The fixed header was fine, the rest was not: frame() does not look inside.
        Some(f) => match (stopped, decoded(f)) {
            (FrameError::Malformed(why), Err(again)) => assert_eq!(why, &again),
            (stopped, again) => panic!("packet() stopped with {stopped:?} at {f:?}: {again:?}"),
        },
        None => assert_eq!(
            discriminant(stopped),
            discriminant(&frames_stopped),
            "packet() stopped with {stopped:?}, frame() with {frames_stopped:?}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::filter_matches;

    #[test]
    fn filters_match_as_mqtt_says() {
        for (topic, filter, expected) in [
            ("a/b/c", "a/b/c", true),
            ("a/b/c", "a/+/c", true),
            ("a/b/c", "a/#", true),
            ("a", "a/#", true),
            ("a/b", "a/+/c", false),
            ("a/b/c/d", "a/+/c", false),
            ("a//c", "a/+/c", true),
            ("$SYS/x", "#", false),
            ("$SYS/x", "$SYS/#", true),
            ("…ices/dev-1", "+/dev-1", true),
        ] {
            assert_eq!(filter_matches(topic, filter), expected, "{topic} {filter}");
        }
    }
}
