//! The seed inputs in `seeds/<target>/`: how they are made, and a check that each still
//! reaches the path it is meant to open up for the fuzzer.
//!
//! `cargo test -- --ignored write_seeds` (in `fuzz/`) writes them again; the certificates
//! and TLS flights differ on every run (fresh keys and randomness), the rest is fixed.

use std::{fs, path::PathBuf, sync::Arc, time::Duration};

use bytes::BytesMut;
use rumqttc::mqttbytes::{
    v4::{
        ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PubAck, PubRel, Publish, Subscribe,
        SubscribeFilter, Unsubscribe,
    },
    Error as CodecError, QoS,
};
use rumqttc::v5::mqttbytes::{self as m5, v5};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    CertificateError, ClientConfig, ClientConnection, RootCertStore, ServerConfig,
    ServerConnection,
};
use tellus_broker::{
    gate::codec::{AckCode, CloseCode, Refused, Reply, Version},
    pki::Pki,
};
use tellus_core::DeviceId;

use crate::{
    gate::{device_stream, End, Session, DEVICE},
    tls::{fixture, handshake, Handshake},
};

fn dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target)
}

fn encode(packets: &[Packet]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for p in packets {
        p.write(&mut buf, usize::MAX).expect("seed packets encode");
    }
    buf.to_vec()
}

fn topic(rest: &str) -> String {
    format!("devices/{DEVICE}/{rest}")
}

fn connect() -> Packet {
    let mut c = Connect::new(DEVICE);
    c.keep_alive = 30;
    c.last_will = Some(LastWill::new(
        topic("events/offline"),
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    Packet::Connect(c)
}

fn publish(topic: &str, qos: QoS, pkid: u16, payload: &[u8]) -> Packet {
    let mut p = Publish::new(topic, qos, payload);
    p.pkid = pkid;
    Packet::Publish(p)
}

/// A session that touches every kind of packet the gate accepts.
fn session() -> Vec<u8> {
    let mut subscribe = Subscribe::new_many([
        SubscribeFilter::new(topic("commands/+"), QoS::AtLeastOnce),
        SubscribeFilter::new(topic("state/desired"), QoS::ExactlyOnce),
    ]);
    subscribe.pkid = 3;
    let mut unsubscribe = Unsubscribe::new(topic("commands/+"));
    unsubscribe.pkid = 4;
    encode(&[
        connect(),
        publish(
            &topic("telemetry"),
            QoS::AtLeastOnce,
            1,
            br#"{"temperature": 21.5}"#,
        ),
        publish(&topic("state/reported"), QoS::AtMostOnce, 0, b"{}"),
        publish(&topic("events/boot"), QoS::ExactlyOnce, 2, b"ok"),
        Packet::PubRel(PubRel::new(2)),
        Packet::Subscribe(subscribe),
        Packet::PubAck(PubAck::new(7)),
        Packet::Unsubscribe(unsubscribe),
        Packet::PingReq,
        Packet::Disconnect,
    ])
}

/// A CONNECT as MQTT 3.1 (`MQIsdp`, level 3) or MQTT 5 (level 5 and an empty property list).
fn connect_other_version(name: &[u8], level: u8) -> Vec<u8> {
    let mut body = vec![0, name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(&[level, 0b10, 0, 30]);
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(&[0, DEVICE.len() as u8]);
    body.extend_from_slice(DEVICE.as_bytes());
    let mut frame = vec![0x10, body.len() as u8];
    frame.extend(body);
    frame
}

type Expect = fn(&Session) -> bool;

/// The `packets` seeds: file name, content, and the end the gate must come to.
fn packet_seeds() -> Vec<(&'static str, Vec<u8>, Expect)> {
    let with = |read_size: u8, stream: Vec<u8>| [vec![read_size], stream].concat();
    let after_connect = |tail: Vec<u8>| with(0, [encode(&[connect()]), tail].concat());

    // A PUBLISH whose 4-byte topic is not UTF-8.
    let bad_utf8 = vec![0x30, 6, 0, 4, 0xff, 0xfe, 0xfd, 0xfc];
    let mut truncated = encode(&[connect()]);
    truncated.truncate(truncated.len() / 2);
    let mut wrong_id = Connect::new("dev-2");
    wrong_id.keep_alive = 30;
    let mut telemetry_will = Connect::new(DEVICE);
    telemetry_will.last_will = Some(LastWill::new(
        topic("telemetry"),
        "{}",
        QoS::AtMostOnce,
        false,
    ));
    let mut no_id = Connect::new("");
    no_id.keep_alive = 30;
    // MQTT 3.1.1 has no way to say retain is not available: the will is relayed unretained.
    let mut retained_will = Connect::new(DEVICE);
    retained_will.last_will = Some(LastWill::new(
        topic("events/offline"),
        "gone",
        QoS::AtLeastOnce,
        true,
    ));

    let seeds: Vec<(&'static str, Vec<u8>, Expect)> = vec![
        ("session.bin", with(0, session()), |s| {
            s.admitted && matches!(s.end, End::Disconnected { with_will: false }) && s.packets == 10
        }),
        ("session-bytewise.bin", with(1, session()), |s| {
            matches!(s.end, End::Disconnected { with_will: false }) && s.packets == 10
        }),
        ("session-by-7.bin", with(7, session()), |s| {
            matches!(s.end, End::Disconnected { with_will: false }) && s.packets == 10
        }),
        (
            "empty-client-id.bin",
            with(
                0,
                encode(&[
                    Packet::Connect(no_id),
                    publish(&topic("commands/c1/result"), QoS::AtLeastOnce, 9, b"done"),
                ]),
            ),
            |s| s.admitted && matches!(s.end, End::Closed),
        ),
        (
            "other-device-tree.bin",
            after_connect(encode(&[publish(
                "devices/dev-2/telemetry",
                QoS::AtLeastOnce,
                1,
                b"{}",
            )])),
            |s| matches!(s.end, End::Acl(_)),
        ),
        (
            "subscribe-everything.bin",
            after_connect(encode(&[Packet::Subscribe({
                let mut s = Subscribe::new(topic("#"), QoS::AtMostOnce);
                s.pkid = 1;
                s
            })])),
            |s| matches!(s.end, End::Acl(_)),
        ),
        (
            "bad-utf8-topic.bin",
            after_connect(bad_utf8),
            |s| matches!(&s.end, End::Malformed(why) if *why == CodecError::TopicNotUtf8.to_string()),
        ),
        (
            "lying-packet-length.bin",
            // A PUBLISH whose fixed header announces 300 KiB.
            after_connect(vec![0x30, 0x80, 0xc0, 0x12, 0, 1, b'x']),
            |s| matches!(s.end, End::TooLarge(..)),
        ),
        (
            "lying-topic-length.bin",
            // A PUBLISH of 12 bytes whose topic says it has 200.
            after_connect([vec![0x30, 12, 0, 200], b"devices/ab".to_vec()].concat()),
            |s| {
                let why = CodecError::BoundaryCrossed(200).to_string();
                matches!(&s.end, End::Malformed(w) if *w == why)
            },
        ),
        (
            "bad-remaining-length.bin",
            after_connect(vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01]),
            |s| {
                let why = CodecError::MalformedRemainingLength.to_string();
                matches!(&s.end, End::Malformed(w) if *w == why)
            },
        ),
        ("truncated-connect.bin", with(0, truncated), |s| {
            matches!(s.end, End::Truncated)
        }),
        (
            "mqtt31-connect.bin",
            with(0, connect_other_version(b"MQIsdp", 3)),
            |s| matches!(s.end, End::RefusedProtocol(3)),
        ),
        (
            "mqtt5-connect.bin",
            with(0, connect_other_version(b"MQTT", 5)),
            |s| s.admitted && s.version == Some(Version::V5) && matches!(s.end, End::Closed),
        ),
        (
            "not-connect.bin",
            with(0, encode(&[Packet::PingReq])),
            |s| matches!(s.end, End::NotConnect("PINGREQ")),
        ),
        (
            "wrong-client-id.bin",
            with(0, encode(&[Packet::Connect(wrong_id)])),
            |s| matches!(s.end, End::Refused(Refused::ClientIdNotValid, _)),
        ),
        (
            "telemetry-will.bin",
            with(0, encode(&[Packet::Connect(telemetry_will)])),
            |s| matches!(s.end, End::Refused(Refused::NotAuthorized, _)),
        ),
        (
            "retained-will.bin",
            with(
                0,
                encode(&[Packet::Connect(retained_will), Packet::Disconnect]),
            ),
            |s| s.admitted && matches!(s.end, End::Disconnected { with_will: false }),
        ),
        (
            "server-packet.bin",
            after_connect(encode(&[Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::Success,
                false,
            ))])),
            |s| matches!(&s.end, End::Protocol(_, why) if why.ends_with("CONNACK")),
        ),
    ];
    [seeds, mqtt5_seeds()].concat()
}

fn encode5(packets: &[v5::Packet]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for p in packets {
        p.write(&mut buf, None).expect("seed packets encode");
    }
    buf.to_vec()
}

fn connect5(properties: v5::ConnectProperties) -> v5::Packet {
    let will = v5::LastWill::new(
        topic("events/offline"),
        "gone",
        m5::QoS::AtLeastOnce,
        false,
        Some(v5::LastWillProperties {
            delay_interval: Some(5),
            payload_format_indicator: Some(1),
            message_expiry_interval: None,
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        }),
    );
    let connect = v5::Connect {
        keep_alive: 30,
        client_id: DEVICE.into(),
        clean_start: true,
        properties: Some(properties),
    };
    v5::Packet::Connect(connect, Some(will), None)
}

/// The CONNECT of the MQTT 5 seeds: limits, problem information, a user property, a will.
fn device_connect5() -> v5::Packet {
    let mut props = v5::ConnectProperties::new();
    props.session_expiry_interval = Some(0);
    props.receive_maximum = Some(16);
    props.max_packet_size = Some(64 * 1024);
    props.topic_alias_max = Some(8);
    props.request_problem_info = Some(1);
    props.user_properties = vec![("firmware".into(), "1.4.2".into())];
    connect5(props)
}

fn publish5(
    topic: &str,
    qos: m5::QoS,
    pkid: u16,
    payload: &[u8],
    properties: Option<v5::PublishProperties>,
) -> v5::Packet {
    let mut p = v5::Publish::new(topic, qos, payload.to_vec(), properties);
    p.pkid = pkid;
    v5::Packet::Publish(p)
}

/// An MQTT 5 session through every decision the gate makes beyond 3.1.1's: properties,
/// a topic alias set then used, a SUBSCRIBE with options and a refused filter, a publish
/// the ACL refuses at QoS 1 (answered, the session goes on), and a DISCONNECT with no
/// reason code (remaining length 0).
fn session5() -> Vec<u8> {
    let json = v5::PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    let request = v5::PublishProperties {
        topic_alias: Some(1),
        response_topic: Some(topic("state/desired")),
        correlation_data: Some(b"req-1".to_vec().into()),
        user_properties: vec![("boot".into(), "cold".into())],
        ..Default::default()
    };
    let alias = v5::PublishProperties {
        topic_alias: Some(1),
        ..Default::default()
    };
    let expiring = v5::PublishProperties {
        message_expiry_interval: Some(60),
        ..Default::default()
    };
    let mut subscribe = v5::Subscribe::new_many(
        [
            v5::Filter {
                path: topic("commands/+"),
                qos: m5::QoS::AtLeastOnce,
                nolocal: true,
                preserve_retain: false,
                retain_forward_rule: v5::RetainForwardRule::Never,
            },
            v5::Filter {
                path: topic("state/desired"),
                qos: m5::QoS::ExactlyOnce,
                nolocal: false,
                preserve_retain: true,
                retain_forward_rule: v5::RetainForwardRule::OnNewSubscribe,
            },
            v5::Filter::new("devices/dev-2/commands/+", m5::QoS::AtLeastOnce),
        ],
        Some(v5::SubscribeProperties {
            id: Some(7),
            user_properties: Vec::new(),
        }),
    );
    subscribe.pkid = 4;
    let mut unsubscribe = v5::Unsubscribe::new(topic("commands/+"), None);
    unsubscribe.pkid = 6;
    let packets = encode5(&[
        device_connect5(),
        publish5(
            &topic("telemetry"),
            m5::QoS::AtLeastOnce,
            1,
            br#"{"temperature": 21.5}"#,
            Some(json),
        ),
        publish5(
            &topic("events/boot"),
            m5::QoS::AtLeastOnce,
            2,
            b"ok",
            Some(request),
        ),
        publish5("", m5::QoS::AtMostOnce, 0, b"again", Some(alias)),
        publish5(
            &topic("state/reported"),
            m5::QoS::ExactlyOnce,
            3,
            b"{}",
            Some(expiring),
        ),
        v5::Packet::PubRel(v5::PubRel::new(3, None)),
        v5::Packet::Subscribe(subscribe),
        publish5(
            "devices/dev-2/state/reported",
            m5::QoS::AtLeastOnce,
            5,
            b"{}",
            None,
        ),
        v5::Packet::PubAck(v5::PubAck::new(9, None)),
        v5::Packet::Unsubscribe(unsubscribe),
        v5::Packet::PingReq(v5::PingReq),
    ]);
    // DISCONNECT with remaining length 0: normal disconnection, no reason code.
    [packets, vec![0xe0, 0]].concat()
}

fn session5_expected(s: &Session) -> bool {
    let boot = topic("events/boot");
    s.admitted
        && s.version == Some(Version::V5)
        && matches!(s.end, End::Disconnected { with_will: false })
        && s.packets == 12
        && s.forwarded == [boot.clone(), boot, topic("state/reported")]
        && s.granted == [topic("commands/+"), topic("state/desired")]
        && s.replies
            .contains(&(Reply::PubAck(5), AckCode::NotAuthorized))
        && s.replies.contains(&(Reply::PubComp(3), AckCode::Success))
}

/// The MQTT 5 seeds.
fn mqtt5_seeds() -> Vec<(&'static str, Vec<u8>, Expect)> {
    let with = |read_size: u8, stream: Vec<u8>| [vec![read_size], stream].concat();
    let after_connect = |tail: Vec<u8>| with(0, [encode5(&[device_connect5()]), tail].concat());
    // AUTH (type 15), "continue authentication" with an authentication method.
    let method = b"SCRAM-SHA-1";
    let mut auth = vec![0x18, 3 + method.len() as u8, 0x15, 0, method.len() as u8];
    auth.extend_from_slice(method);
    let auth = [vec![0xf0, auth.len() as u8], auth].concat();
    let mut scram = v5::ConnectProperties::new();
    scram.authentication_method = Some("SCRAM-SHA-256".into());
    scram.authentication_data = Some(b"n,,n=dev-1,r=nonce".to_vec().into());
    let text = v5::PublishProperties {
        payload_format_indicator: Some(1),
        ..Default::default()
    };
    let unknown_alias = v5::PublishProperties {
        topic_alias: Some(9),
        ..Default::default()
    };
    let mut retained = v5::Publish::new(
        topic("events/boot"),
        m5::QoS::AtLeastOnce,
        b"ok".to_vec(),
        None,
    );
    (retained.pkid, retained.retain) = (1, true);
    // A device whose packets may be no larger than 100 bytes gets no reason strings; the
    // DISCONNECT that closes it must still be well formed.
    let mut tiny = v5::ConnectProperties::new();
    tiny.max_packet_size = Some(100);
    let alias = |i: u16| v5::PublishProperties {
        topic_alias: Some(i),
        ..Default::default()
    };
    let mut subscription_id = v5::Publish::new(
        topic("events/boot"),
        m5::QoS::AtLeastOnce,
        b"ok".to_vec(),
        Some(v5::PublishProperties {
            subscription_identifiers: vec![1],
            ..Default::default()
        }),
    );
    subscription_id.pkid = 1;
    let mut id_zero = v5::Subscribe::new(
        v5::Filter::new(topic("commands/+"), m5::QoS::AtLeastOnce),
        Some(v5::SubscribeProperties {
            id: Some(0),
            user_properties: Vec::new(),
        }),
    );
    id_zero.pkid = 1;

    vec![
        ("mqtt5-session.bin", with(0, session5()), session5_expected),
        (
            "mqtt5-session-by-3.bin",
            with(3, session5()),
            session5_expected,
        ),
        ("mqtt5-auth.bin", after_connect(auth), |s| {
            matches!(&s.end, End::Protocol(CloseCode::ProtocolError, why) if why.ends_with("AUTH"))
                && matches!(
                    s.replies.last(),
                    Some((Reply::Disconnect(CloseCode::ProtocolError, _), _))
                )
        }),
        (
            "mqtt5-auth-method.bin",
            with(0, encode5(&[connect5(scram)])),
            |s| matches!(s.end, End::Refused(Refused::BadAuthenticationMethod, _)),
        ),
        (
            "mqtt5-retain.bin",
            after_connect(encode5(&[v5::Packet::Publish(retained)])),
            |s| matches!(s.end, End::Protocol(CloseCode::RetainNotSupported, _)),
        ),
        (
            "mqtt5-payload-not-utf8.bin",
            after_connect(encode5(&[publish5(
                &topic("state/reported"),
                m5::QoS::AtLeastOnce,
                1,
                &[0xff, 0xfe],
                Some(text),
            )])),
            |s| {
                s.admitted
                    && matches!(s.end, End::Closed)
                    && s.replies == [(Reply::PubAck(1), AckCode::PayloadFormatInvalid)]
            },
        ),
        (
            "mqtt5-small-max-packet-size.bin",
            with(
                0,
                [
                    encode5(&[connect5(tiny)]),
                    encode5(&[publish5(
                        "devices/other/telemetry",
                        m5::QoS::AtMostOnce,
                        0,
                        b"{}",
                        None,
                    )]),
                ]
                .concat(),
            ),
            |s| {
                matches!(s.end, End::Acl(_))
                    && matches!(
                        s.replies.last(),
                        Some((Reply::Disconnect(CloseCode::NotAuthorized, _), _))
                    )
            },
        ),
        (
            "mqtt5-unknown-topic-alias.bin",
            after_connect(encode5(&[publish5(
                "",
                m5::QoS::AtLeastOnce,
                1,
                b"{}",
                Some(unknown_alias),
            )])),
            |s| matches!(s.end, End::Protocol(CloseCode::ProtocolError, _)),
        ),
        (
            // DISCONNECT with reason 0x04 alone (remaining length 1): the device asks for its
            // will, so the gate forwards no DISCONNECT.
            "mqtt5-disconnect-with-will.bin",
            after_connect(vec![0xe0, 1, 0x04]),
            |s| {
                s.admitted
                    && s.packets == 2
                    && matches!(s.end, End::Disconnected { with_will: true })
                    && s.replies.is_empty()
            },
        ),
        (
            "mqtt5-disconnect-normal-reason.bin",
            after_connect(vec![0xe0, 1, 0x00]),
            |s| matches!(s.end, End::Disconnected { with_will: false }),
        ),
        ("mqtt5-qos2-dead-letter-again.bin", qos2_again(), |s| {
            s.admitted
                && matches!(s.end, End::Closed)
                && s.forwarded == [topic("events/boot")]
                && s.replies
                    == [
                        (Reply::PubRec(5), AckCode::PayloadFormatInvalid),
                        (Reply::PubRec(5), AckCode::Success),
                        (Reply::PubComp(5), AckCode::Success),
                        (Reply::PubRec(6), AckCode::Success),
                        (Reply::PubRec(6), AckCode::Success),
                        (Reply::PubComp(6), AckCode::Success),
                        (Reply::PubRec(7), AckCode::PayloadFormatInvalid),
                        (Reply::PubComp(7), AckCode::PayloadFormatInvalid),
                    ]
        }),
        ("mqtt5-qos2-window.bin", qos2_window(), |s| {
            s.forwarded.len() == 256
                && matches!(s.end, End::Protocol(CloseCode::ReceiveMaximumExceeded, _))
                && matches!(
                    s.replies.last(),
                    Some((Reply::Disconnect(CloseCode::ReceiveMaximumExceeded, _), _))
                )
        }),
        (
            "mqtt5-retained-will.bin",
            with(0, encode5(&[retained_will5()])),
            |s| !s.admitted && matches!(s.end, End::Refused(Refused::RetainNotSupported, _)),
        ),
        ("mqtt5-shared-subscribe.bin", shared_subscribe(), |s| {
            use tellus_broker::gate::codec::Grant;
            let refused = vec![Grant::SharedNotSupported, Grant::NotAuthorized];
            matches!(s.end, End::Closed)
                && s.granted == [topic("commands/+")]
                && s.replies == [(Reply::SubAck(2, refused), AckCode::NotAuthorized)]
        }),
        (
            "mqtt5-alias-refused-topic.bin",
            after_connect(encode5(&[
                publish5(
                    &topic("events/boot"),
                    m5::QoS::AtLeastOnce,
                    1,
                    b"a",
                    Some(alias(2)),
                ),
                // Refused: alias 2 keeps events/boot, alias 3 is not set.
                publish5(
                    "devices/dev-2/events/boot",
                    m5::QoS::AtLeastOnce,
                    2,
                    b"b",
                    Some(alias(2)),
                ),
                publish5(
                    "devices/dev-2/events/boot",
                    m5::QoS::AtLeastOnce,
                    3,
                    b"c",
                    Some(alias(3)),
                ),
                publish5("", m5::QoS::AtLeastOnce, 4, b"d", Some(alias(2))),
                publish5("", m5::QoS::AtLeastOnce, 5, b"e", Some(alias(3))),
            ])),
            |s| {
                let boot = topic("events/boot");
                s.forwarded == [boot.clone(), boot]
                    && s.replies[..4]
                        == [
                            (Reply::PubAck(1), AckCode::Success),
                            (Reply::PubAck(2), AckCode::NotAuthorized),
                            (Reply::PubAck(3), AckCode::NotAuthorized),
                            (Reply::PubAck(4), AckCode::Success),
                        ]
                    && matches!(&s.end, End::Protocol(CloseCode::ProtocolError, why)
                        if why.ends_with("topic alias 3 was never set"))
            },
        ),
        (
            "mqtt5-publish-subscription-id.bin",
            after_connect(encode5(&[v5::Packet::Publish(subscription_id)])),
            |s| {
                s.forwarded.is_empty()
                    && matches!(&s.end, End::Protocol(CloseCode::ProtocolError, why)
                        if why.contains("subscription identifiers"))
            },
        ),
        (
            "mqtt5-subscription-id-0.bin",
            after_connect(encode5(&[v5::Packet::Subscribe(id_zero)])),
            |s| {
                s.granted.is_empty()
                    && matches!(&s.end, End::Protocol(CloseCode::ProtocolError, why)
                        if why.contains("identifier 0"))
            },
        ),
    ]
}

/// QoS 2 telemetry that ingest dead-letters (PUBREC "payload format invalid", which ends
/// the exchange), then the same packet id without DUP: a new message, stored. Then a QoS 2
/// publish sent twice before PUBREL, the second without DUP: answered again, forwarded once.
/// Last, a PUBREL for a dead-lettered message: a PUBCOMP all the same.
fn qos2_again() -> Vec<u8> {
    let telemetry = topic("telemetry");
    let boot = topic("events/boot");
    let packets = encode5(&[
        device_connect5(),
        publish5(&telemetry, m5::QoS::ExactlyOnce, 5, b"not telemetry", None),
        publish5(
            &telemetry,
            m5::QoS::ExactlyOnce,
            5,
            br#"{"temperature": 21.5}"#,
            None,
        ),
        v5::Packet::PubRel(v5::PubRel::new(5, None)),
        publish5(&boot, m5::QoS::ExactlyOnce, 6, b"ok", None),
        publish5(&boot, m5::QoS::ExactlyOnce, 6, b"ok", None),
        v5::Packet::PubRel(v5::PubRel::new(6, None)),
        publish5(&telemetry, m5::QoS::ExactlyOnce, 7, b"{", None),
        v5::Packet::PubRel(v5::PubRel::new(7, None)),
    ]);
    [vec![0], packets].concat()
}

/// QoS 2 publishes that never see PUBREL, up to the gate's window (`max_inflight`, 256):
/// 255 forwarded and one dead-lettered. The next is taken once the dead-lettered one is
/// swept; the one after that finds the window full.
fn qos2_window() -> Vec<u8> {
    let event = topic("events/e");
    let mut packets = vec![device_connect5()];
    packets.extend((1..=255).map(|id| publish5(&event, m5::QoS::ExactlyOnce, id, b"x", None)));
    packets.push(publish5(
        &topic("telemetry"),
        m5::QoS::ExactlyOnce,
        256,
        b"x",
        None,
    ));
    packets.push(publish5(&event, m5::QoS::ExactlyOnce, 257, b"x", None));
    packets.push(publish5(&event, m5::QoS::ExactlyOnce, 258, b"x", None));
    [vec![0], encode5(&packets)].concat()
}

/// An MQTT 5 CONNECT whose will asks to be retained, on a topic a will may not have either:
/// refused for the retain first.
fn retained_will5() -> v5::Packet {
    let will = v5::LastWill::new(topic("telemetry"), "{}", m5::QoS::AtMostOnce, true, None);
    let connect = v5::Connect {
        keep_alive: 30,
        client_id: DEVICE.into(),
        clean_start: true,
        properties: None,
    };
    v5::Packet::Connect(connect, Some(will), None)
}

/// A SUBSCRIBE partly refused (a `$share/` filter and another device's), then one wholly
/// refused (a `$share/` filter and a `#`).
fn shared_subscribe() -> Vec<u8> {
    let filter = |path: String| v5::Filter::new(path, m5::QoS::AtLeastOnce);
    let mut partly = v5::Subscribe::new_many(
        [
            filter(format!("$share/g/{}", topic("commands/+"))),
            filter(topic("commands/+")),
            filter("devices/dev-2/state/desired".into()),
        ],
        None,
    );
    partly.pkid = 1;
    let mut wholly = v5::Subscribe::new_many(
        [
            filter(format!("$share/g/{}", topic("state/desired"))),
            filter(topic("#")),
        ],
        None,
    );
    wholly.pkid = 2;
    let packets = encode5(&[
        device_connect5(),
        v5::Packet::Subscribe(partly),
        v5::Packet::Subscribe(wholly),
    ]);
    [vec![0], packets].concat()
}

fn telemetry_seeds() -> Vec<(&'static str, &'static [u8])> {
    vec![
        (
            "server-time.json",
            br#"{"temperature": 21.5, "door": "open", "count": 3, "on": true}"#,
        ),
        (
            "device-time.json",
            br#"{"ts": 1732780800123, "values": {"temperature": 21.5}}"#,
        ),
        (
            "array-nested.json",
            br#"[{"ts": 5, "values": {"env": {"t": 1, "h": {"x": 2.5}}}}, {"a": false}]"#,
        ),
        (
            "big-numbers.json",
            br#"{"u": 18446744073709551615, "f": -1.5e300, "i": -9223372036854775808}"#,
        ),
    ]
}

/// The PEM certificates, key and CA of a device of the fuzz CA.
struct DeviceCredentials {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn device_credentials(pki: &Pki) -> DeviceCredentials {
    let id = DeviceId::parse(DEVICE).unwrap();
    let issued = pki
        .issue_device(&id)
        .expect("the fuzz CA issues a device certificate");
    let cert = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
    let key_pem = issued.key_pem.expect("Tellus generated the key");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    DeviceCredentials {
        chain: vec![cert],
        key,
    }
}

/// What a device (rustls, with a certificate from `pki`) sends during a whole handshake with
/// the gate's TLS configuration `server`, at the given protocol version.
fn client_flight(
    pki: &Pki,
    server: Arc<ServerConfig>,
    version: &'static rustls::SupportedProtocolVersion,
) -> Vec<u8> {
    let creds = device_credentials(pki);
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca_der().clone()).unwrap();
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(creds.chain, creds.key)
            .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut client = ClientConnection::new(Arc::new(config), name).unwrap();
    let mut server = ServerConnection::new(server).unwrap();
    let mut sent = Vec::new();
    for _ in 0..10 {
        let mut flight = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut flight).unwrap();
        }
        sent.extend_from_slice(&flight);
        let mut rd = &flight[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
            server
                .process_new_packets()
                .expect("the gate accepts the device");
        }
        let mut back = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut back).unwrap();
        }
        let mut rd = &back[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client
                .process_new_packets()
                .expect("the device accepts the gate");
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return sent;
        }
    }
    panic!("the handshake did not finish");
}

/// Rotation requests whose subject names another device: the issued certificate must name
/// `DEVICE` all the same.
fn csr_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let request = |alg: &'static rcgen::SignatureAlgorithm| {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "dev-2");
        params.serialize_request(&key).unwrap()
    };
    let p256 = request(&rcgen::PKCS_ECDSA_P256_SHA256);
    let ed25519 = request(&rcgen::PKCS_ED25519);
    vec![
        ("p256.pem", [&[0], p256.pem().unwrap().as_bytes()].concat()),
        ("p256.der", [&[1], &p256.der()[..]].concat()),
        ("ed25519.der", [&[1], &ed25519.der()[..]].concat()),
    ]
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = dir(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

#[test]
#[ignore = "writes seeds/; run on purpose"]
fn write_seeds() {
    for (name, bytes, _) in packet_seeds() {
        write("packets", name, &bytes);
    }
    for (name, bytes) in telemetry_seeds() {
        write("telemetry", name, bytes);
    }
    for (name, bytes) in csr_seeds() {
        write("csr", name, &bytes);
    }
    let (pki, config) = (&fixture().pki, fixture().config.clone());
    let device = device_credentials(pki);
    write("certificate", "device.der", &device.chain[0]);
    write("certificate", "fleet-ca.der", pki.ca_der());
    let tls12 = client_flight(pki, config.clone(), &rustls::version::TLS12);
    let tls13 = client_flight(pki, config, &rustls::version::TLS13);
    write(
        "tls",
        "tls12-device-flight.bin",
        &[&[0], &tls12[..]].concat(),
    );
    write(
        "tls",
        "tls12-device-flight-by-5.bin",
        &[&[5], &tls12[..]].concat(),
    );
    write(
        "tls",
        "tls13-device-flight.bin",
        &[&[0], &tls13[..]].concat(),
    );
}

fn read(target: &str, name: &str) -> Vec<u8> {
    let path = dir(target).join(name);
    fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn packet_seeds_are_current_and_reach_their_ends() {
    for (name, bytes, expect) in packet_seeds() {
        assert_eq!(read("packets", name), bytes, "{name} is stale: write_seeds");
        let session = device_stream(&bytes);
        assert!(expect(&session), "{name}: {session:?}");
    }
}

#[test]
fn telemetry_and_certificate_seeds_are_accepted() {
    for (name, bytes) in telemetry_seeds() {
        assert_eq!(
            read("telemetry", name),
            bytes,
            "{name} is stale: write_seeds"
        );
        let mut now = || 0;
        tellus_core::telemetry::decode_json(bytes, &mut now)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        crate::telemetry(bytes);
    }
    let identity = tellus_broker::pki::peer_identity(&read("certificate", "device.der"))
        .expect("the device seed names a device");
    assert_eq!(identity.device.as_str(), DEVICE);
}

#[test]
fn csr_seeds_get_a_certificate_for_the_device() {
    for (name, _) in csr_seeds() {
        assert!(crate::csr(&read("csr", name)), "{name} was refused");
    }
}

/// The bytes of a TLS 1.2 client flight before its CertificateVerify record (handshake type
/// 15), whose signature covers the server's random and so fails on any replay.
fn before_certificate_verify(flight: &[u8]) -> &[u8] {
    let mut at = 0;
    while let Some(header) = flight.get(at..at + 5) {
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if header[0] == 22 && flight.get(at + 5) == Some(&15) {
            return &flight[..at];
        }
        at += 5 + len;
    }
    panic!("no CertificateVerify record in the flight");
}

/// Replayed against a fresh server, a recorded TLS 1.2 flight gets past the client
/// certificate (it chains to the fuzz CA) and the key exchange, and fails only at
/// CertificateVerify. A TLS 1.3 flight fails once encryption starts.
#[test]
fn tls_seeds_reach_past_the_client_certificate() {
    for name in ["tls12-device-flight.bin", "tls12-device-flight-by-5.bin"] {
        let seed = read("tls", name);
        match handshake(&seed) {
            Handshake::Failed(rustls::Error::InvalidCertificate(
                CertificateError::BadSignature,
            )) => {}
            other => panic!("{name}: {other:?}"),
        }
        let accepted = [&seed[..1], before_certificate_verify(&seed[1..])].concat();
        match handshake(&accepted) {
            Handshake::Ended { handshaking: true } => {}
            other => panic!("{name} up to CertificateVerify: {other:?}"),
        }
    }
    assert!(matches!(
        handshake(&read("tls", "tls13-device-flight.bin")),
        Handshake::Failed(_)
    ));

    // The control: the same flight from a device of another CA fails at its certificate.
    let dir = tempfile::tempdir().unwrap();
    let other = Pki::load_or_create(dir.path(), Duration::from_secs(3600)).unwrap();
    let (chain, key) = other.server_identity(dir.path(), &[]).unwrap();
    let config = Arc::new(other.gate_tls_config(chain, key, &[]).unwrap());
    let flight = client_flight(&other, config, &rustls::version::TLS12);
    match handshake(&[&[0], before_certificate_verify(&flight)].concat()) {
        Handshake::Failed(rustls::Error::InvalidCertificate(_)) => {}
        other => panic!("a device of another CA: {other:?}"),
    }
}
