//! The two MQTT versions the gate speaks with devices, 3.1.1 and 5, in the terms it acts on.
//!
//! A device's frames are decoded into [`Inbound`] packets by the version its CONNECT names;
//! what the gate writes itself (acknowledgements, CONNACK, DISCONNECT) is encoded for that
//! version. MQTT 5 lets a server say why: where 3.1.1 can only acknowledge or close, the gate
//! tells an MQTT 5 device what went wrong with a reason code and a reason string.
//!
//! The gate's link to the routing core uses the device's version, so the routing core's
//! frames reach the device unchanged, MQTT 5 properties included.

use std::{collections::HashMap, sync::Arc};

use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::{
    mqttbytes::{v4, QoS},
    v5::mqttbytes::{self as m5, v5},
};

use tellus_core::{
    topic::{self, DeviceTopic},
    DeviceId,
};

use super::audit::clip;

pub use v5::DisconnectReasonCode as CloseCode;

/// The MQTT version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5 (protocol level 5).
    V5,
}

impl Version {
    /// The version a CONNECT's protocol level names, if the gate speaks it.
    pub fn from_level(level: u8) -> Option<Version> {
        match level {
            4 => Some(Version::V4),
            5 => Some(Version::V5),
            _ => None,
        }
    }
}

/// A packet from a device, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Connect(Connect),
    Publish(Publish),
    PubRel(u16),
    Subscribe(Subscribe),
    PingReq,
    /// DISCONNECT; `with_will` if an MQTT 5 device asks for its will to be published
    /// (reason 0x04).
    Disconnect {
        with_will: bool,
    },
    /// PUBACK, PUBREC or PUBCOMP (the device answering a delivery) or UNSUBSCRIBE: the
    /// frame, checked, to be forwarded to the routing core as it is.
    Forward(Bytes),
    /// A packet a client may not send (or AUTH, which the gate does not offer); its name.
    NotFromClient(&'static str),
    /// A well-formed packet that breaks a rule of MQTT 5: the DISCONNECT code, and why.
    Violation(CloseCode, String),
}

impl Inbound {
    /// The packet's name, for logs and refusals.
    pub fn name(&self) -> &'static str {
        match self {
            Inbound::Connect(_) => "CONNECT",
            Inbound::Publish(_) => "PUBLISH",
            Inbound::PubRel(_) => "PUBREL",
            Inbound::Subscribe(_) => "SUBSCRIBE",
            Inbound::PingReq => "PINGREQ",
            Inbound::Disconnect { .. } => "DISCONNECT",
            Inbound::Violation(..) => "a packet that breaks MQTT 5",
            Inbound::Forward(frame) => match frame.first().map(|b| b >> 4) {
                Some(4) => "PUBACK",
                Some(5) => "PUBREC",
                Some(7) => "PUBCOMP",
                _ => "UNSUBSCRIBE",
            },
            Inbound::NotFromClient(name) => name,
        }
    }
}

/// Decodes one whole frame from a device that speaks `version`. The error says what is
/// wrong with it.
pub fn decode(version: Version, frame: BytesMut) -> Result<Inbound, String> {
    let kind = frame.first().map_or(0, |b| b >> 4);
    // Forwarded frames are copied before parsing consumes them; they are small.
    let raw = matches!(kind, 4 | 5 | 7 | 10).then(|| Bytes::copy_from_slice(&frame));
    match version {
        Version::V4 => decode_v4(frame, raw),
        Version::V5 => decode_v5(frame, raw),
    }
}

fn decode_v4(mut frame: BytesMut, raw: Option<Bytes>) -> Result<Inbound, String> {
    use v4::Packet as P;
    let packet = P::read(&mut frame, usize::MAX).map_err(|e| e.to_string())?;
    Ok(match packet {
        P::Connect(c) => Inbound::Connect(Connect::V4(c)),
        P::Publish(p) => Inbound::Publish(Publish {
            topic: p.topic,
            qos: p.qos,
            pkid: p.pkid,
            dup: p.dup,
            retain: p.retain,
            payload: p.payload,
            properties: None,
        }),
        P::PubRel(r) => Inbound::PubRel(r.pkid),
        P::Subscribe(s) => Inbound::Subscribe(Subscribe::V4(s)),
        P::PingReq => Inbound::PingReq,
        P::Disconnect => Inbound::Disconnect { with_will: false },
        P::PubAck(_) | P::PubRec(_) | P::PubComp(_) | P::Unsubscribe(_) => {
            Inbound::Forward(raw.unwrap_or_default())
        }
        P::ConnAck(_) => Inbound::NotFromClient("CONNACK"),
        P::SubAck(_) => Inbound::NotFromClient("SUBACK"),
        P::UnsubAck(_) => Inbound::NotFromClient("UNSUBACK"),
        P::PingResp => Inbound::NotFromClient("PINGRESP"),
    })
}

fn decode_v5(mut frame: BytesMut, raw: Option<Bytes>) -> Result<Inbound, String> {
    use v5::Packet as P;
    match frame.first().map_or(0, |b| b >> 4) {
        // AUTH: the codec does not know it; the gate offers no extended authentication.
        15 => return Ok(Inbound::NotFromClient("AUTH")),
        // DISCONNECT with no reason code (a normal disconnection) or a reason code alone,
        // which rumqttc does not read.
        14 if frame.len() <= 3 => {
            return match (frame[0] & 0x0f, frame.get(2)) {
                (0, reason) => Ok(Inbound::Disconnect {
                    with_will: reason == Some(&WITH_WILL),
                }),
                _ => Err("DISCONNECT with reserved flags set".into()),
            };
        }
        _ => {}
    }
    let packet = P::read(&mut frame, None).map_err(|e| e.to_string())?;
    Ok(match packet {
        P::Connect(c, will, _login) => {
            if let Some(w) = &will {
                utf8(&w.topic, "will topic")?;
            }
            Inbound::Connect(Connect::V5(c, will))
        }
        // rumqttc 0.25 misreads a PUBLISH with several subscription identifiers (the
        // properties after them become payload), and a client may send none (MQTT 5,
        // 3.3.4-6): refused, so a misread publish is never forwarded.
        P::Publish(p)
            if p.properties
                .as_ref()
                .is_some_and(|props| !props.subscription_identifiers.is_empty()) =>
        {
            Inbound::Violation(
                CloseCode::ProtocolError,
                "a client may not send subscription identifiers in a PUBLISH".into(),
            )
        }
        // rumqttd drops a link whose SUBSCRIBE has identifier 0, which MQTT 5 forbids.
        P::Subscribe(s) if s.properties.as_ref().and_then(|p| p.id) == Some(0) => {
            Inbound::Violation(
                CloseCode::ProtocolError,
                "subscription identifier 0 is not allowed".into(),
            )
        }
        P::Publish(p) => Inbound::Publish(Publish {
            topic: utf8(&p.topic, "topic")?.to_owned(),
            qos: qos_from_v5(p.qos),
            pkid: p.pkid,
            dup: p.dup,
            retain: p.retain,
            payload: p.payload,
            properties: Some(p.properties.unwrap_or_default()),
        }),
        P::PubRel(r) => Inbound::PubRel(r.pkid),
        P::Subscribe(s) => Inbound::Subscribe(Subscribe::V5(s)),
        P::PingReq(_) => Inbound::PingReq,
        P::Disconnect(d) => Inbound::Disconnect {
            with_will: d.reason_code as u8 == WITH_WILL,
        },
        P::PubAck(_) | P::PubRec(_) | P::PubComp(_) | P::Unsubscribe(_) => {
            Inbound::Forward(raw.unwrap_or_default())
        }
        P::Auth(_) => Inbound::NotFromClient("AUTH"),
        P::ConnAck(_) => Inbound::NotFromClient("CONNACK"),
        P::SubAck(_) => Inbound::NotFromClient("SUBACK"),
        P::UnsubAck(_) => Inbound::NotFromClient("UNSUBACK"),
        P::PingResp(_) => Inbound::NotFromClient("PINGRESP"),
    })
}

/// The DISCONNECT reason "disconnect with will message".
const WITH_WILL: u8 = 0x04;

fn utf8<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str, String> {
    std::str::from_utf8(bytes).map_err(|_| format!("{what} is not UTF-8"))
}

/// The 3.1.1 codec's QoS of an MQTT 5 one (the gate's own type).
pub fn qos_from_v5(q: m5::QoS) -> QoS {
    match q {
        m5::QoS::AtMostOnce => QoS::AtMostOnce,
        m5::QoS::AtLeastOnce => QoS::AtLeastOnce,
        m5::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// The MQTT 5 codec's QoS of the gate's.
pub fn qos_to_v5(q: QoS) -> m5::QoS {
    match q {
        QoS::AtMostOnce => m5::QoS::AtMostOnce,
        QoS::AtLeastOnce => m5::QoS::AtLeastOnce,
        QoS::ExactlyOnce => m5::QoS::ExactlyOnce,
    }
}

/// At most QoS 1: what the gate relays travels at QoS 1 at most (QoS 2 state lives in the
/// gate alone).
fn cap(q: QoS) -> QoS {
    match q {
        QoS::ExactlyOnce => QoS::AtLeastOnce,
        q => q,
    }
}

/// A device's CONNECT.
#[derive(Debug, Clone, PartialEq)]
pub enum Connect {
    V4(v4::Connect),
    V5(v5::Connect, Option<v5::LastWill>),
}

impl Connect {
    pub fn version(&self) -> Version {
        match self {
            Connect::V4(_) => Version::V4,
            Connect::V5(..) => Version::V5,
        }
    }

    pub fn client_id(&self) -> &str {
        match self {
            Connect::V4(c) => &c.client_id,
            Connect::V5(c, _) => &c.client_id,
        }
    }

    pub fn set_client_id(&mut self, id: String) {
        match self {
            Connect::V4(c) => c.client_id = id,
            Connect::V5(c, _) => c.client_id = id,
        }
    }

    pub fn keep_alive(&self) -> u16 {
        match self {
            Connect::V4(c) => c.keep_alive,
            Connect::V5(c, _) => c.keep_alive,
        }
    }

    /// The will's topic, if the CONNECT has a will (checked to be UTF-8 when decoded).
    pub fn will_topic(&self) -> Option<&str> {
        match self {
            Connect::V4(c) => c.last_will.as_ref().map(|w| w.topic.as_str()),
            Connect::V5(_, w) => w
                .as_ref()
                .map(|w| std::str::from_utf8(&w.topic).unwrap_or_default()),
        }
    }

    /// Whether the will asks to be retained.
    pub fn will_retained(&self) -> bool {
        match self {
            Connect::V4(c) => c.last_will.as_ref().is_some_and(|w| w.retain),
            Connect::V5(_, w) => w.as_ref().is_some_and(|w| w.retain),
        }
    }

    /// Makes the will what the gate relays: not retained, QoS 1 at most.
    pub fn tame_will(&mut self) {
        match self {
            Connect::V4(c) => {
                if let Some(w) = &mut c.last_will {
                    w.retain = false;
                    w.qos = cap(w.qos);
                }
            }
            Connect::V5(_, Some(w)) => {
                w.retain = false;
                if w.qos == m5::QoS::ExactlyOnce {
                    w.qos = m5::QoS::AtLeastOnce;
                }
            }
            Connect::V5(_, None) => {}
        }
    }

    /// Where the device may be sent reason strings: MQTT 5 sends them on CONNACK and
    /// DISCONNECT, and on acknowledgements unless the device turns "request problem
    /// information" off; none to a device whose maximum packet size could not hold one.
    pub fn reasons(&self) -> Reasons {
        let Connect::V5(c, _) = self else {
            return Reasons::None;
        };
        let props = c.properties.as_ref();
        let room = props.and_then(|p| p.max_packet_size).unwrap_or(u32::MAX);
        if (room as usize) < REASON_ROOM {
            Reasons::None
        } else if props.and_then(|p| p.request_problem_info) == Some(0) {
            Reasons::OnClose
        } else {
            Reasons::All
        }
    }

    /// The MQTT 5 extended authentication method the device asks for, if any.
    pub fn auth_method(&self) -> Option<&str> {
        match self {
            Connect::V4(_) => None,
            Connect::V5(c, _) => c
                .properties
                .as_ref()
                .and_then(|p| p.authentication_method.as_deref()),
        }
    }

    /// What the CONNECT itself must say for `device` (the registry has been asked already):
    /// its client id is the device id (an empty one becomes it, returned as the id the gate
    /// assigned), no extended authentication, no retained will in MQTT 5 (retain is not
    /// available), and a will the ACL allows that is neither telemetry nor a certificate
    /// request (a will travels through the routing core, where neither would be handled).
    /// Returns the CONNECT to forward, its will made what the gate relays, or why not.
    pub fn admit(
        mut self,
        device: &DeviceId,
    ) -> Result<(Connect, Option<String>), (Refused, String)> {
        let mut assigned = None;
        if self.client_id().is_empty() {
            self.set_client_id(device.to_string());
            assigned = Some(device.to_string());
        } else if self.client_id() != device.as_str() {
            let why = format!(
                "client id {:?} is not the device id",
                clip(self.client_id(), 64)
            );
            return Err((Refused::ClientIdNotValid, why));
        }
        if let Some(method) = self.auth_method() {
            let why = format!(
                "authentication method {:?} is not offered; the client certificate is the identity",
                clip(method, 64)
            );
            return Err((Refused::BadAuthenticationMethod, why));
        }
        if self.version() == Version::V5 && self.will_retained() {
            let why = "retained messages are not available, and so no retained will";
            return Err((Refused::RetainNotSupported, why.into()));
        }
        if let Some(will) = self.will_topic() {
            let verdict = match topic::check_publish(device, will) {
                Ok(kind) if kind.is_telemetry() => Err("a will cannot be telemetry".to_owned()),
                Ok(DeviceTopic::CertsCsr) => {
                    Err("a will cannot be a certificate request".to_owned())
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(why) = verdict {
                return Err((Refused::NotAuthorized, format!("will refused: {why}")));
            }
            self.tame_will();
        }
        Ok((self, assigned))
    }

    /// The CONNECT the gate sends the routing core for the device: with the gate's login and
    /// keep-alive instead of the device's.
    pub fn upstream(self, username: &str, password: &str, keep_alive: u16) -> Bytes {
        match self {
            Connect::V4(mut c) => {
                c.login = Some(v4::Login::new(username, password));
                c.keep_alive = keep_alive;
                encode_v4(&v4::Packet::Connect(c))
            }
            Connect::V5(mut c, will) => {
                c.keep_alive = keep_alive;
                // The routing core would alias topics per subscription, not per topic, and a
                // publish the gate relays must name its topic (commands are followed by it).
                if let Some(props) = c.properties.as_mut() {
                    props.topic_alias_max = None;
                }
                let login = v5::Login::new(username, password);
                encode_v5(&v5::Packet::Connect(c, will, Some(login)))
            }
        }
    }
}

/// A device's PUBLISH.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub topic: String,
    pub qos: QoS,
    pub pkid: u16,
    pub dup: bool,
    pub retain: bool,
    pub payload: Bytes,
    /// MQTT 5 properties; `None` for MQTT 3.1.1.
    pub properties: Option<v5::PublishProperties>,
}

impl Publish {
    /// Whether the payload breaks the promise of its MQTT 5 payload format indicator (1:
    /// UTF-8 text).
    pub fn breaks_payload_format(&self) -> bool {
        let text = self
            .properties
            .as_ref()
            .and_then(|p| p.payload_format_indicator)
            == Some(1);
        text && std::str::from_utf8(&self.payload).is_err()
    }

    /// The frame the gate forwards to the routing core: not retained, QoS 1 at most, with its
    /// topic in full (no alias).
    pub fn upstream(&self) -> Bytes {
        let (qos, retain, dup) = (cap(self.qos), false, self.dup);
        match &self.properties {
            None => {
                let mut p = v4::Publish::from_bytes(&self.topic, qos, self.payload.clone());
                (p.pkid, p.retain, p.dup) = (self.pkid, retain, dup);
                encode_v4(&v4::Packet::Publish(p))
            }
            Some(props) => {
                let mut props = props.clone();
                props.topic_alias = None;
                let empty = props == v5::PublishProperties::default();
                let mut p = v5::Publish::new(
                    self.topic.clone(),
                    qos_to_v5(qos),
                    self.payload.clone(),
                    (!empty).then_some(props),
                );
                (p.pkid, p.retain, p.dup) = (self.pkid, retain, dup);
                encode_v5(&v5::Packet::Publish(p))
            }
        }
    }
}

/// The topic aliases an MQTT 5 device has set on this connection (MQTT 5, 3.3.2.3.4). The
/// gate resolves them itself: it must know every publish's topic to check it. Bounded: at
/// most `max` topics, each only once the ACL allowed it and at most [`ALIAS_TOPIC_MAX`]
/// bytes long (a longer one is used for its publish but not kept).
#[derive(Debug)]
pub struct TopicAliases {
    max: u16,
    topics: HashMap<u16, String>,
}

/// The longest topic a topic alias is kept for.
pub const ALIAS_TOPIC_MAX: usize = 1024;

impl TopicAliases {
    /// Accepts aliases 1..=`max` (0: none).
    pub fn new(max: u16) -> Self {
        TopicAliases {
            max,
            topics: HashMap::new(),
        }
    }

    /// Gives `p` its full topic, looking up an alias that comes alone. Returns the alias that
    /// `p` sets for its topic, for [`Self::keep`] once the topic is allowed.
    pub fn resolve(&self, p: &mut Publish) -> Result<Option<u16>, (CloseCode, String)> {
        let alias = p
            .properties
            .as_mut()
            .and_then(|props| props.topic_alias.take());
        match alias {
            None if p.topic.is_empty() && p.properties.is_some() => Err((
                CloseCode::ProtocolError,
                "PUBLISH with neither a topic nor a topic alias".into(),
            )),
            None => Ok(None),
            Some(a) if a == 0 || a > self.max => Err((
                CloseCode::TopicAliasInvalid,
                format!("topic alias {a} is outside 1..={}", self.max),
            )),
            Some(a) if p.topic.is_empty() => match self.topics.get(&a) {
                Some(topic) => {
                    p.topic = topic.clone();
                    Ok(None)
                }
                None => Err((
                    CloseCode::ProtocolError,
                    format!("topic alias {a} was never set"),
                )),
            },
            Some(a) => Ok(Some(a)),
        }
    }

    /// Keeps `topic` (allowed by the ACL) under `alias`.
    pub fn keep(&mut self, alias: u16, topic: &str) {
        if topic.len() <= ALIAS_TOPIC_MAX {
            self.topics.insert(alias, topic.to_owned());
        } else {
            self.topics.remove(&alias);
        }
    }
}

/// A device's SUBSCRIBE.
#[derive(Debug, Clone, PartialEq)]
pub enum Subscribe {
    V4(v4::Subscribe),
    V5(v5::Subscribe),
}

impl Subscribe {
    pub fn pkid(&self) -> u16 {
        match self {
            Subscribe::V4(s) => s.pkid,
            Subscribe::V5(s) => s.pkid,
        }
    }

    /// The topic filters, in order.
    pub fn filters(&self) -> Vec<&str> {
        match self {
            Subscribe::V4(s) => s.filters.iter().map(|f| f.path.as_str()).collect(),
            Subscribe::V5(s) => s.filters.iter().map(|f| f.path.as_str()).collect(),
        }
    }

    /// The frame the gate forwards to the routing core: the filters `keep` allows (by
    /// position), each at QoS 1 at most.
    pub fn upstream(&self, keep: &[bool]) -> Bytes {
        let kept = |i: usize| keep.get(i).copied().unwrap_or(false);
        match self {
            Subscribe::V4(s) => {
                let mut s = s.clone();
                s.filters = (s.filters.into_iter().enumerate())
                    .filter(|(i, _)| kept(*i))
                    .map(|(_, mut f)| {
                        f.qos = cap(f.qos);
                        f
                    })
                    .collect();
                encode_v4(&v4::Packet::Subscribe(s))
            }
            Subscribe::V5(s) => {
                let mut s = s.clone();
                s.filters = (s.filters.into_iter().enumerate())
                    .filter(|(i, _)| kept(*i))
                    .map(|(_, mut f)| {
                        if f.qos == m5::QoS::ExactlyOnce {
                            f.qos = m5::QoS::AtLeastOnce;
                        }
                        f
                    })
                    .collect();
                encode_v5(&v5::Packet::Subscribe(s))
            }
        }
    }
}

/// How an acknowledgement answers beyond "received"; MQTT 5 only (3.1.1 acknowledgements
/// carry no reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckCode {
    #[default]
    Success,
    /// 0x10: taken, but no one subscribes to the topic.
    NoMatchingSubscribers,
    /// 0x80
    UnspecifiedError,
    /// 0x87
    NotAuthorized,
    /// 0x97
    QuotaExceeded,
    /// 0x99: kept aside, not stored, because the payload is not what it says it is.
    PayloadFormatInvalid,
}

impl AckCode {
    /// Whether the code says the message was not taken (0x80 and above).
    pub fn is_failure(self) -> bool {
        !matches!(self, AckCode::Success | AckCode::NoMatchingSubscribers)
    }

    /// The code a PUBACK or PUBREC reason byte stands for.
    pub fn from_reason(byte: u8) -> AckCode {
        match byte {
            0x00 => AckCode::Success,
            0x10 => AckCode::NoMatchingSubscribers,
            0x87 => AckCode::NotAuthorized,
            0x97 => AckCode::QuotaExceeded,
            0x99 => AckCode::PayloadFormatInvalid,
            _ => AckCode::UnspecifiedError,
        }
    }
}

/// The reason code of an acknowledgement and, for the device to read, why.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    pub code: AckCode,
    pub why: Option<Arc<str>>,
}

impl Verdict {
    pub fn new(code: AckCode, why: impl Into<Arc<str>>) -> Self {
        Verdict {
            code,
            why: Some(why.into()),
        }
    }
}

/// What a SUBACK grants a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    Granted(QoS),
    NotAuthorized,
    /// A `$share/…` filter (MQTT 5 only).
    SharedNotSupported,
}

impl Grant {
    /// How a filter the ACL refused is answered in an MQTT 5 SUBACK.
    pub fn refused(filter: &str) -> Grant {
        match filter.starts_with("$share/") {
            true => Grant::SharedNotSupported,
            false => Grant::NotAuthorized,
        }
    }
}

/// An answer the gate writes to the device.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    PubAck(u16),
    PubRec(u16),
    PubComp(u16),
    PingResp,
    SubAck(u16, Vec<Grant>),
    /// MQTT 5 only; a 3.1.1 server closes without a word.
    Disconnect(CloseCode, String),
}

/// Encodes `reply` for a device that speaks `version`; `None` if that version has no such
/// packet. A reason string goes where `reasons` allows.
pub fn encode_reply(
    version: Version,
    reply: &Reply,
    verdict: &Verdict,
    reasons: Reasons,
) -> Option<Bytes> {
    match version {
        Version::V4 => {
            use v4::Packet as P;
            let packet = match reply {
                Reply::PubAck(id) => P::PubAck(v4::PubAck::new(*id)),
                Reply::PubRec(id) => P::PubRec(v4::PubRec::new(*id)),
                Reply::PubComp(id) => P::PubComp(v4::PubComp::new(*id)),
                Reply::PingResp => P::PingResp,
                Reply::SubAck(id, grants) => {
                    let codes = grants.iter().map(|g| match g {
                        Grant::Granted(q) => v4::SubscribeReasonCode::Success(*q),
                        Grant::NotAuthorized | Grant::SharedNotSupported => {
                            v4::SubscribeReasonCode::Failure
                        }
                    });
                    P::SubAck(v4::SubAck::new(*id, codes.collect()))
                }
                Reply::Disconnect(..) => return None,
            };
            Some(encode_v4(&packet))
        }
        Version::V5 => {
            use v5::Packet as P;
            let why = verdict
                .why
                .as_deref()
                .filter(|_| reasons.on_acks())
                .map(|w| clip(w, REASON_MAX));
            let packet = match reply {
                Reply::PubAck(id) => P::PubAck(v5::PubAck {
                    pkid: *id,
                    reason: puback_reason(verdict.code),
                    properties: why.map(|reason_string| v5::PubAckProperties {
                        reason_string: Some(reason_string),
                        user_properties: Vec::new(),
                    }),
                }),
                Reply::PubRec(id) => P::PubRec(v5::PubRec {
                    pkid: *id,
                    reason: pubrec_reason(verdict.code),
                    properties: why.map(|reason_string| v5::PubRecProperties {
                        reason_string: Some(reason_string),
                        user_properties: Vec::new(),
                    }),
                }),
                Reply::PubComp(id) => P::PubComp(v5::PubComp::new(*id, None)),
                Reply::PingResp => P::PingResp(v5::PingResp),
                Reply::SubAck(id, grants) => {
                    let codes = grants.iter().map(|g| match g {
                        Grant::Granted(q) => v5::SubscribeReasonCode::Success(qos_to_v5(*q)),
                        Grant::NotAuthorized => v5::SubscribeReasonCode::NotAuthorized,
                        Grant::SharedNotSupported => {
                            v5::SubscribeReasonCode::SharedSubscriptionsNotSupported
                        }
                    });
                    P::SubAck(v5::SubAck {
                        pkid: *id,
                        return_codes: codes.collect(),
                        properties: why.map(|reason_string| v5::SubAckProperties {
                            reason_string: Some(reason_string),
                            user_properties: Vec::new(),
                        }),
                    })
                }
                Reply::Disconnect(code, why) => {
                    let why = reasons.on_close().then(|| clip(why, REASON_MAX));
                    return Some(encode_disconnect(*code, why.as_deref()));
                }
            };
            Some(encode_v5(&packet))
        }
    }
}

/// An MQTT 5 DISCONNECT with `code` and, if given, a reason string. Written here, not by
/// rumqttc: rumqttc 0.25 writes one with no properties a byte longer than its remaining
/// length says, and one whose properties are empty as a bare two-byte DISCONNECT.
fn encode_disconnect(code: CloseCode, why: Option<&str>) -> Bytes {
    let mut properties = BytesMut::new();
    if let Some(why) = why {
        let why = &why.as_bytes()[..why.len().min(u16::MAX as usize)];
        properties.put_u8(0x1f); // reason string
        properties.put_u16(why.len() as u16);
        properties.put_slice(why);
    }
    let mut body = BytesMut::new();
    body.put_u8(code as u8);
    put_variable_int(&mut body, properties.len());
    body.put_slice(&properties);
    let mut frame = BytesMut::with_capacity(body.len() + 5);
    frame.put_u8(0xe0);
    put_variable_int(&mut frame, body.len());
    frame.put_slice(&body);
    frame.freeze()
}

/// MQTT's variable byte integer (remaining lengths, property lengths); `n` is below 2^28.
fn put_variable_int(buf: &mut BytesMut, mut n: usize) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            buf.put_u8(byte);
            return;
        }
        buf.put_u8(byte | 0x80);
    }
}

/// Longest reason string the gate sends, in bytes.
const REASON_MAX: usize = 256;
/// Smallest maximum packet size of a device that is sent reason strings: room for the
/// longest reason string in any packet the gate writes.
const REASON_ROOM: usize = 1024;

/// Which packets to a device may carry a reason string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reasons {
    /// MQTT 3.1.1, or an MQTT 5 device with a small maximum packet size.
    None,
    /// CONNACK and DISCONNECT only: the device turned problem information off.
    OnClose,
    All,
}

impl Reasons {
    /// On PUBACK, PUBREC and SUBACK.
    pub fn on_acks(self) -> bool {
        self == Reasons::All
    }

    /// On CONNACK and DISCONNECT.
    pub fn on_close(self) -> bool {
        self != Reasons::None
    }
}

fn puback_reason(code: AckCode) -> v5::PubAckReason {
    use v5::PubAckReason as R;
    match code {
        AckCode::Success => R::Success,
        AckCode::NoMatchingSubscribers => R::NoMatchingSubscribers,
        AckCode::UnspecifiedError => R::UnspecifiedError,
        AckCode::NotAuthorized => R::NotAuthorized,
        AckCode::QuotaExceeded => R::QuotaExceeded,
        AckCode::PayloadFormatInvalid => R::PayloadFormatInvalid,
    }
}

fn pubrec_reason(code: AckCode) -> v5::PubRecReason {
    use v5::PubRecReason as R;
    match code {
        AckCode::Success => R::Success,
        AckCode::NoMatchingSubscribers => R::NoMatchingSubscribers,
        AckCode::UnspecifiedError => R::UnspecifiedError,
        AckCode::NotAuthorized => R::NotAuthorized,
        AckCode::QuotaExceeded => R::QuotaExceeded,
        AckCode::PayloadFormatInvalid => R::PayloadFormatInvalid,
    }
}

/// Why the gate refuses a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    UnsupportedProtocolVersion,
    ClientIdNotValid,
    NotAuthorized,
    /// Revoked or disabled: MQTT 5 says "banned".
    Banned,
    BadAuthenticationMethod,
    ServerUnavailable,
    /// A will asking to be retained (MQTT 5 only: CONNACK says retain is not available).
    RetainNotSupported,
}

/// What an accepted MQTT 5 device is told about the gate's limits in CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most QoS 1 and 2 publishes the device may have unacknowledged.
    pub receive_maximum: u16,
    pub maximum_packet_size: u32,
    pub topic_alias_maximum: u16,
    /// The client id the gate gave a device that sent an empty one.
    pub assigned_client_id: Option<String>,
}

/// CONNACK accepting the device.
pub fn connack_accepted(version: Version, session_present: bool, limits: &Limits) -> Bytes {
    match version {
        Version::V4 => encode_v4(&v4::Packet::ConnAck(v4::ConnAck::new(
            v4::ConnectReturnCode::Success,
            session_present,
        ))),
        Version::V5 => {
            let mut props = no_connack_properties();
            props.receive_max = Some(limits.receive_maximum.max(1));
            props.max_packet_size = Some(limits.maximum_packet_size);
            props.topic_alias_max = Some(limits.topic_alias_maximum);
            props.assigned_client_identifier = limits.assigned_client_id.clone();
            // Device messages are never retained (see the gate), and no device may share a
            // subscription with another.
            props.retain_available = Some(0);
            props.shared_subscription_available = Some(0);
            encode_v5(&v5::Packet::ConnAck(v5::ConnAck {
                session_present,
                code: v5::ConnectReturnCode::Success,
                properties: Some(props),
            }))
        }
    }
}

/// CONNACK refusing the device, saying why where `reasons` allows.
pub fn connack_refused(version: Version, reasons: Reasons, refused: Refused, why: &str) -> Bytes {
    match version {
        Version::V4 => {
            use v4::ConnectReturnCode as C;
            let code = match refused {
                Refused::UnsupportedProtocolVersion => C::RefusedProtocolVersion,
                Refused::ClientIdNotValid => C::BadClientId,
                Refused::NotAuthorized
                | Refused::Banned
                | Refused::BadAuthenticationMethod
                | Refused::RetainNotSupported => C::NotAuthorized,
                Refused::ServerUnavailable => C::ServiceUnavailable,
            };
            encode_v4(&v4::Packet::ConnAck(v4::ConnAck::new(code, false)))
        }
        Version::V5 => {
            use v5::ConnectReturnCode as C;
            let code = match refused {
                Refused::UnsupportedProtocolVersion => C::UnsupportedProtocolVersion,
                Refused::ClientIdNotValid => C::ClientIdentifierNotValid,
                Refused::NotAuthorized => C::NotAuthorized,
                Refused::Banned => C::Banned,
                Refused::BadAuthenticationMethod => C::BadAuthenticationMethod,
                Refused::ServerUnavailable => C::ServerUnavailable,
                Refused::RetainNotSupported => C::RetainNotSupported,
            };
            let mut props = no_connack_properties();
            props.reason_string = reasons.on_close().then(|| clip(why, REASON_MAX));
            encode_v5(&v5::Packet::ConnAck(v5::ConnAck {
                session_present: false,
                code,
                properties: Some(props),
            }))
        }
    }
}

fn no_connack_properties() -> v5::ConnAckProperties {
    v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}

/// The routing core's CONNACK: whether it accepted the link, and whether it had a session.
pub fn read_connack(version: Version, mut frame: BytesMut) -> Option<(bool, bool)> {
    match version {
        Version::V4 => match v4::Packet::read(&mut frame, usize::MAX) {
            Ok(v4::Packet::ConnAck(a)) => {
                Some((a.code == v4::ConnectReturnCode::Success, a.session_present))
            }
            _ => None,
        },
        Version::V5 => match v5::Packet::read(&mut frame, None) {
            Ok(v5::Packet::ConnAck(a)) => {
                Some((a.code == v5::ConnectReturnCode::Success, a.session_present))
            }
            _ => None,
        },
    }
}

/// The packet id and reason of a PUBACK frame from the routing core (3.1.1 or 5: the packet
/// id comes first either way, then, in MQTT 5, the reason byte if any).
pub fn read_puback(frame: &[u8]) -> Option<(u16, AckCode)> {
    match body(frame)? {
        [hi, lo] => Some((u16::from_be_bytes([*hi, *lo]), AckCode::Success)),
        [hi, lo, reason, ..] => Some((
            u16::from_be_bytes([*hi, *lo]),
            AckCode::from_reason(*reason),
        )),
        _ => None,
    }
}

/// The topic and packet id (QoS 1 and 2 only) of a PUBLISH frame from the routing core,
/// read from its fixed place at the start of the frame (the same in 3.1.1 and 5).
pub fn read_publish_head(frame: &[u8]) -> Option<(&str, Option<u16>)> {
    let qos = (frame.first()? >> 1) & 0b11;
    let body = body(frame)?;
    let len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let topic = std::str::from_utf8(body.get(2..2 + len)?).ok()?;
    let pkid = match qos {
        0 => None,
        _ => Some(u16::from_be_bytes([
            *body.get(2 + len)?,
            *body.get(3 + len)?,
        ])),
    };
    Some((topic, pkid))
}

/// The packet id of a SUBACK frame from the routing core.
pub fn suback_pkid(frame: &[u8]) -> Option<u16> {
    match body(frame)? {
        [hi, lo, ..] => Some(u16::from_be_bytes([*hi, *lo])),
        _ => None,
    }
}

/// The return codes of a SUBACK frame from the routing core, one per filter, in order:
/// the granted QoS (0 to 2), or a failure (0x80 and above).
pub fn suback_codes(frame: &[u8], version: Version) -> Option<&[u8]> {
    let rest = body(frame)?.get(2..)?;
    match version {
        Version::V4 => Some(rest),
        Version::V5 => {
            // The properties' length, a variable byte integer, then the properties.
            let (mut len, mut at) = (0usize, 0usize);
            loop {
                let b = *rest.get(at)?;
                len |= usize::from(b & 0x7f) << (7 * at);
                at += 1;
                if b & 0x80 == 0 || at == 4 {
                    break;
                }
            }
            rest.get(at + len..)
        }
    }
}

/// The routing core's MQTT 5 SUBACK for the filters the gate forwarded, with the refusals
/// put back in the places of the filters the gate refused (`refused`: their positions in
/// the device's SUBSCRIBE, in order), and why.
pub fn merge_suback(
    frame: Bytes,
    refused: &[(usize, Grant)],
    why: &str,
    reasons: Reasons,
) -> Bytes {
    let Ok(v5::Packet::SubAck(mut ack)) = v5::Packet::read(&mut BytesMut::from(&frame[..]), None)
    else {
        return frame;
    };
    for &(at, grant) in refused {
        let code = match grant {
            Grant::SharedNotSupported => v5::SubscribeReasonCode::SharedSubscriptionsNotSupported,
            Grant::NotAuthorized | Grant::Granted(_) => v5::SubscribeReasonCode::NotAuthorized,
        };
        let at = at.min(ack.return_codes.len());
        ack.return_codes.insert(at, code);
    }
    if reasons.on_acks() {
        ack.properties = Some(v5::SubAckProperties {
            reason_string: Some(clip(why, REASON_MAX)),
            user_properties: Vec::new(),
        });
    }
    encode_v5(&v5::Packet::SubAck(ack))
}

/// What follows a frame's fixed header.
fn body(frame: &[u8]) -> Option<&[u8]> {
    let length_bytes = frame
        .get(1..)?
        .iter()
        .take_while(|b| *b & 0x80 != 0)
        .count()
        + 1;
    frame.get(1 + length_bytes..)
}

/// The PINGREQ the gate sends on its own link (the same bytes in both versions).
pub fn pingreq() -> Bytes {
    encode_v4(&v4::Packet::PingReq)
}

fn encode_v4(packet: &v4::Packet) -> Bytes {
    let mut buf = BytesMut::with_capacity(packet.size() + 5);
    // What the gate writes was read within the size limit or built by the gate; the limit
    // here is only the codec's own ceiling.
    match packet.write(&mut buf, usize::MAX) {
        Ok(_) => buf.freeze(),
        Err(e) => encode_failed(e, packet),
    }
}

fn encode_v5(packet: &v5::Packet) -> Bytes {
    let mut buf = BytesMut::with_capacity(packet.size() + 5);
    match packet.write(&mut buf, None) {
        Ok(_) => buf.freeze(),
        Err(e) => encode_failed(e, packet),
    }
}

fn encode_failed(e: impl std::fmt::Display, packet: &impl std::fmt::Debug) -> Bytes {
    tracing::error!(error = %e, ?packet, "could not encode packet");
    Bytes::new()
}
