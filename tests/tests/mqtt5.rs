//! MQTT 5 at the gate, beside 3.1.1: real clients (rumqttc v5, `mosquitto_pub`/`mosquitto_sub`
//! with `-V mqttv5`) and a raw MQTT 5 device for what a client library never sends. Every
//! refusal comes with its reason code, and with a reason string where MQTT 5 allows one.

use rumqttc::v5::{
    mqttbytes::{
        v5::{
            ConnectProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter, Packet,
            PubAck, PubAckReason, Publish, PublishProperties, SubAck, Subscribe,
            SubscribeReasonCode,
        },
        QoS,
    },
    AsyncClient, Event, EventLoop,
};
use serde_json::{json, Value};
use tellus_device::Credentials;
use tellus_tests::{mqtt::WAIT, raw::RawDevice, require_tool, Tellus};

/// Connects with rumqttc v5 and returns the CONNACK.
async fn connect(
    options: rumqttc::v5::MqttOptions,
) -> (AsyncClient, EventLoop, rumqttc::v5::mqttbytes::v5::ConnAck) {
    let (client, mut events) = AsyncClient::new(options, 100);
    let ack = tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return ack,
                Ok(_) => {}
                Err(e) => panic!("connect failed: {e:?}"),
            }
        }
    })
    .await
    .expect("no CONNACK in time");
    (client, events, ack)
}

/// Polls until a packet `pick` accepts arrives; panics if the connection fails.
async fn next<T>(events: &mut EventLoop, mut pick: impl FnMut(Packet) -> Option<T>) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(p)) => {
                    if let Some(t) = pick(p) {
                        return t;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("connection failed: {e:?}"),
            }
        }
    })
    .await
    .expect("nothing in time")
}

async fn puback(events: &mut EventLoop) -> PubAck {
    next(events, |p| match p {
        Packet::PubAck(a) => Some(a),
        _ => None,
    })
    .await
}

fn reason_string(ack: &PubAck) -> String {
    ack.properties
        .as_ref()
        .and_then(|p| p.reason_string.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_v5_gets_reason_codes_instead_of_a_closed_connection() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("five").await;
    t.create_device("other").await;
    let (client, mut events, ack) = connect(t.mqtt5_options(&creds)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let props = ack.properties.expect("CONNACK properties");
    assert_eq!(props.receive_max, Some(256), "{props:?}");
    assert_eq!(props.max_packet_size, Some(256 * 1024), "{props:?}");
    assert_eq!(props.topic_alias_max, Some(64), "{props:?}");
    assert_eq!(props.retain_available, Some(0), "{props:?}");

    // Telemetry with properties is stored and acknowledged as such.
    let props = PublishProperties {
        content_type: Some("application/json".into()),
        user_properties: vec![("fw".into(), "1.2.0".into())],
        ..Default::default()
    };
    client
        .publish_with_properties(
            "devices/five/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"ts": 1732780800000, "values": {"t": 21.5}}"#,
            props,
        )
        .await
        .unwrap();
    let ack = puback(&mut events).await;
    assert_eq!(ack.reason, PubAckReason::Success, "{ack:?}");
    let (_, latest) = t.get("/api/v1/devices/five/latest").await;
    assert_eq!(latest["metrics"]["t"]["value"], json!(21.5), "{latest}");

    // Telemetry that is not valid is kept as a dead letter, and the device is told so.
    client
        .publish(
            "devices/five/telemetry",
            QoS::AtLeastOnce,
            false,
            "not json",
        )
        .await
        .unwrap();
    let ack = puback(&mut events).await;
    assert_eq!(ack.reason, PubAckReason::PayloadFormatInvalid, "{ack:?}");
    assert!(reason_string(&ack).contains("dead letter"), "{ack:?}");
    let (_, dead) = t.get("/api/v1/deadletters").await;
    assert_eq!(
        dead["deadletters"].as_array().map(Vec::len),
        Some(1),
        "{dead}"
    );

    // Another device's topic: "not authorized", and the connection stays.
    client
        .publish("devices/other/telemetry", QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    let ack = puback(&mut events).await;
    assert_eq!(ack.reason, PubAckReason::NotAuthorized, "{ack:?}");
    assert!(reason_string(&ack).contains("other"), "{ack:?}");

    // An event, taken by the routing core.
    client
        .publish("devices/five/events/boot", QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    let ack = puback(&mut events).await;
    assert_eq!(ack.reason, PubAckReason::Success, "{ack:?}");

    // A SUBSCRIBE with allowed and refused filters: the allowed ones are granted, the
    // refused ones told why, each in its place.
    client
        .subscribe_many([
            Filter::new("devices/five/commands/+", QoS::ExactlyOnce),
            Filter::new("devices/other/commands/+", QoS::AtLeastOnce),
            Filter::new("devices/five/state/desired", QoS::AtMostOnce),
            Filter::new("$share/g/devices/five/commands/+", QoS::AtLeastOnce),
        ])
        .await
        .unwrap();
    let suback = next(&mut events, |p| match p {
        Packet::SubAck(a) => Some(a),
        _ => None,
    })
    .await;
    assert_eq!(
        suback.return_codes,
        vec![
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::Success(QoS::AtMostOnce),
            SubscribeReasonCode::SharedSubscriptionsNotSupported,
        ],
        "{suback:?}"
    );

    // The certificate rotation answer travels from the routing core to an MQTT 5 link.
    client
        .subscribe("devices/five/certs/issued", QoS::AtLeastOnce)
        .await
        .unwrap();
    next(&mut events, |p| {
        matches!(p, Packet::SubAck(_)).then_some(())
    })
    .await;
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(vec![])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    client
        .publish("devices/five/certs/csr", QoS::AtLeastOnce, false, csr)
        .await
        .unwrap();
    let issued: Value = next(&mut events, |p| match p {
        Packet::Publish(p) => Some(serde_json::from_slice(&p.payload).unwrap()),
        _ => None,
    })
    .await;
    let rotated = Credentials {
        cert_pem: issued["cert_pem"]
            .as_str()
            .expect("a certificate")
            .to_owned(),
        key_pem: key.serialize_pem(),
        ..creds.clone()
    };
    // The rotated certificate connects (taking over the first connection) and goes on.
    let (client, mut events, ack) = connect(t.mqtt5_options(&rotated)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);

    // Still connected: a last telemetry publish goes through.
    client
        .publish(
            "devices/five/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"t": 22}"#,
        )
        .await
        .unwrap();
    assert_eq!(puback(&mut events).await.reason, PubAckReason::Success);
    let (_, stats) = t.get("/api/v1/stats").await;
    assert_eq!(stats["gate"]["acl_denied"], 3, "{stats}");
    assert_eq!(stats["gate"]["connected"], 2, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_mqtt5_device_is_told_why_it_is_refused_or_closed() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("raw5").await;
    let reason = |props: Option<rumqttc::v5::mqttbytes::v5::ConnAckProperties>| {
        props.and_then(|p| p.reason_string).unwrap_or_default()
    };

    // A client id that is not the device id.
    let (_, ack) = RawDevice::connect5(&t, &creds, "someone-else", None).await;
    assert_eq!(ack.code, ConnectReturnCode::ClientIdentifierNotValid);
    assert!(reason(ack.properties).contains("someone-else"));

    // Extended authentication: the certificate is the identity.
    let props = ConnectProperties {
        authentication_method: Some("SCRAM-SHA-1".into()),
        ..ConnectProperties::new()
    };
    let (_, ack) = RawDevice::connect5(&t, &creds, "raw5", Some(props)).await;
    assert_eq!(ack.code, ConnectReturnCode::BadAuthenticationMethod);

    // An empty client id is given the device id, and told so.
    let (mut d, ack) = RawDevice::connect5(&t, &creds, "", None).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let assigned = ack.properties.and_then(|p| p.assigned_client_identifier);
    assert_eq!(assigned.as_deref(), Some("raw5"));

    // A topic alias is set with a topic, then used alone; both publishes are stored.
    let aliased = |topic: &str, pkid: u16, value: u32| {
        let props = PublishProperties {
            topic_alias: Some(7),
            ..Default::default()
        };
        let mut p = Publish::new(
            topic,
            QoS::AtLeastOnce,
            format!(r#"{{"alias": {value}}}"#),
            Some(props),
        );
        p.pkid = pkid;
        Packet::Publish(p)
    };
    d.send5(&aliased("devices/raw5/telemetry", 1, 1)).await;
    d.send5(&aliased("", 2, 2)).await;
    for pkid in [1, 2] {
        match d.recv5().await {
            Some(Packet::PubAck(a)) => {
                assert_eq!((a.pkid, a.reason), (pkid, PubAckReason::Success), "{a:?}")
            }
            other => panic!("expected PUBACK {pkid}, got {other:?}"),
        }
    }
    let (_, latest) = t.get("/api/v1/devices/raw5/latest").await;
    assert_eq!(latest["metrics"]["alias"]["value"], json!(2), "{latest}");

    // A SUBSCRIBE whose every filter is refused is answered by the gate alone.
    let subscribe = Subscribe::new_many(
        [Filter::new("devices/+/commands/+", QoS::AtLeastOnce)],
        None,
    );
    let mut subscribe = subscribe;
    subscribe.pkid = 3;
    d.send5(&Packet::Subscribe(subscribe)).await;
    match d.recv5().await {
        Some(Packet::SubAck(SubAck {
            pkid, return_codes, ..
        })) => assert_eq!(
            (pkid, return_codes),
            (3, vec![SubscribeReasonCode::NotAuthorized])
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }

    // QoS 2 telemetry kept as a dead letter: PUBREC says so, which ends that exchange, and
    // the packet id is free at once (without DUP); a copy sent again before PUBREL, DUP or
    // not, is answered again and stored once.
    let qos2 = |pkid: u16, payload: &str| {
        let mut p = Publish::new(
            "devices/raw5/telemetry",
            QoS::ExactlyOnce,
            payload.to_owned(),
            None,
        );
        p.pkid = pkid;
        Packet::Publish(p)
    };
    // The device may reuse the packet id only once it has the failing PUBREC.
    d.send5(&qos2(5, "not json")).await;
    let mut answers = vec![d.recv5().await.expect("an answer")];
    d.send5(&qos2(5, r#"{"q2": 1}"#)).await;
    d.send5(&qos2(5, r#"{"q2": 1}"#)).await;
    d.send5(&Packet::PubRel(rumqttc::v5::mqttbytes::v5::PubRel::new(
        5, None,
    )))
    .await;
    for _ in 0..3 {
        answers.push(d.recv5().await.expect("an answer"));
    }
    let codes: Vec<String> = answers
        .iter()
        .map(|p| match p {
            Packet::PubRec(r) => format!("PUBREC {} {:?}", r.pkid, r.reason),
            Packet::PubComp(c) => format!("PUBCOMP {} {:?}", c.pkid, c.reason),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        codes,
        [
            "PUBREC 5 PayloadFormatInvalid",
            "PUBREC 5 Success",
            "PUBREC 5 Success",
            "PUBCOMP 5 Success"
        ]
    );
    let (_, stats) = t.get("/api/v1/stats").await;
    assert_eq!(stats["ingest"]["received"], 4, "{stats}");

    // Alias 0 is no alias.
    d.send5(&aliased("devices/raw5/telemetry", 6, 6).clone_with_alias(0))
        .await;
    expect_disconnect(&mut d, DisconnectReasonCode::TopicAliasInvalid, "alias 0").await;
    let (mut d, _) = RawDevice::connect5(&t, &creds, "raw5", None).await;

    // An alias never set: a protocol error, said in DISCONNECT.
    d.send5(&aliased("", 4, 4).clone_with_alias(9)).await;
    expect_disconnect(&mut d, DisconnectReasonCode::ProtocolError, "alias 9").await;

    // A retained will is refused at CONNECT: retained messages are not available.
    let mut w = RawDevice::tls(&t, &creds).await;
    let connect = rumqttc::v5::mqttbytes::v5::Connect {
        keep_alive: 30,
        client_id: "raw5".into(),
        clean_start: true,
        properties: None,
    };
    let will = rumqttc::v5::mqttbytes::v5::LastWill::new(
        "devices/raw5/events/gone",
        "bye",
        QoS::AtLeastOnce,
        true,
        None,
    );
    w.send5(&Packet::Connect(connect, Some(will), None)).await;
    match w.recv5().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::RetainNotSupported),
        other => panic!("expected CONNACK, got {other:?}"),
    }

    // Retained messages are not available (the CONNACK said so).
    let (mut d, _) = RawDevice::connect5(&t, &creds, "raw5", None).await;
    let mut p = Publish::new("devices/raw5/events/x", QoS::AtMostOnce, "{}", None);
    p.retain = true;
    d.send5(&Packet::Publish(p)).await;
    expect_disconnect(&mut d, DisconnectReasonCode::RetainNotSupported, "retain").await;

    // A QoS 0 publish on another device's topic can not be answered: the connection is
    // closed, with the reason.
    let (mut d, _) = RawDevice::connect5(&t, &creds, "raw5", None).await;
    let p = Publish::new("devices/x/telemetry", QoS::AtMostOnce, "{}", None);
    d.send5(&Packet::Publish(p)).await;
    expect_disconnect(&mut d, DisconnectReasonCode::NotAuthorized, "devices/x").await;

    // A packet over the limit.
    let (mut d, _) = RawDevice::connect5(&t, &creds, "raw5", None).await;
    let big = Publish::new(
        "devices/raw5/telemetry",
        QoS::AtMostOnce,
        vec![b' '; 300 * 1024],
        None,
    );
    // The gate answers as soon as it has read the fixed header, and may close before the
    // rest has been written: only the first bytes need to arrive.
    let mut frame = bytes::BytesMut::new();
    Packet::Publish(big).write(&mut frame, None).unwrap();
    let _ = d.try_send_bytes(&frame).await;
    expect_disconnect(&mut d, DisconnectReasonCode::PacketTooLarge, "larger").await;

    // A second connection takes over the first, which is told so.
    let (mut first, _) = RawDevice::connect5(&t, &creds, "raw5", None).await;
    let (mut second, _) = RawDevice::connect5(&t, &creds, "raw5", None).await;
    expect_disconnect(
        &mut first,
        DisconnectReasonCode::SessionTakenOver,
        "taken over",
    )
    .await;

    // Revoked: the live connection is closed by administrative action, and a new one is
    // refused as banned.
    let (status, _) = t.post("/api/v1/devices/raw5/revoke", json!({})).await;
    assert_eq!(status, 200);
    expect_disconnect(
        &mut second,
        DisconnectReasonCode::AdministrativeAction,
        "revoked",
    )
    .await;
    let (_, ack) = RawDevice::connect5(&t, &creds, "raw5", None).await;
    assert_eq!(ack.code, ConnectReturnCode::Banned);
    assert!(reason(ack.properties).contains("revoked"));

    // DISCONNECT in its short forms, without a reason code or with one alone (here "with
    // will"), ends a session quietly.
    let creds = t.create_device("short").await;
    for short in [&[0xe0, 0x00][..], &[0xe0, 0x01, 0x04]] {
        let (mut d, _) = RawDevice::connect5(&t, &creds, "short", None).await;
        d.send_bytes(short).await;
        assert_eq!(d.recv5().await, None);
    }
    // The audit trail is written behind the connections: wait for both ends.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, audit) = t.get("/api/v1/audit?device=short").await;
        let quiet = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["reason"] == "device sent DISCONNECT")
            .count();
        if quiet == 2 {
            break;
        }
        assert!(
            quiet < 2 && tokio::time::Instant::now() < deadline,
            "{audit}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

trait WithAlias {
    fn clone_with_alias(&self, alias: u16) -> Packet;
}

impl WithAlias for Packet {
    fn clone_with_alias(&self, alias: u16) -> Packet {
        let Packet::Publish(p) = self else {
            return self.clone();
        };
        let mut p = p.clone();
        p.properties = Some(PublishProperties {
            topic_alias: Some(alias),
            ..Default::default()
        });
        Packet::Publish(p)
    }
}

/// Reads until a DISCONNECT with `code` whose reason string contains `why`, then the close.
async fn expect_disconnect(d: &mut RawDevice, code: DisconnectReasonCode, why: &str) {
    match d.recv5().await {
        Some(Packet::Disconnect(Disconnect {
            reason_code,
            properties,
        })) => {
            let reason = properties.and_then(|p| p.reason_string).unwrap_or_default();
            assert_eq!(reason_code, code, "{reason}");
            assert!(reason.contains(why), "{reason:?} does not say {why:?}");
        }
        other => panic!("expected DISCONNECT {code:?}, got {other:?}"),
    }
    assert_eq!(d.recv5().await, None, "the connection stays open");
}

/// The files `tellus device create --out` writes, for the mosquitto clients.
fn device_files(t: &Tellus, dir: &std::path::Path, id: &str) -> Vec<String> {
    let out = std::process::Command::new(tellus_tests::tellus_bin())
        .args(["device", "create", id, "--out"])
        .arg(dir)
        .arg("--data-dir")
        .arg(&t.data_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let file = |name: String| dir.join(name).to_string_lossy().into_owned();
    vec![
        "-h".into(),
        "127.0.0.1".into(),
        "-p".into(),
        t.mqtt_addr.port().to_string(),
        "--cafile".into(),
        file("ca.crt".into()),
        "--cert".into(),
        file(format!("{id}.crt")),
        "--key".into(),
        file(format!("{id}.key")),
        "-i".into(),
        id.into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_speak_both_versions() {
    if !require_tool("mosquitto_pub") || !require_tool("mosquitto_sub") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(&dir.path().join("data"), None);
    let certs = dir.path().join("certs");
    let common = device_files(&t, &certs, "mosq");

    // Telemetry in both versions, QoS 1 and 2.
    for (version, qos, value) in [("mqttv311", "1", 1), ("mqttv5", "1", 2), ("mqttv5", "2", 3)] {
        let out = tokio::process::Command::new("mosquitto_pub")
            .args(&common)
            .args(["-V", version, "-q", qos, "-t", "devices/mosq/telemetry"])
            .args(["-m", &format!(r#"{{"n": {value}}}"#)])
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "mosquitto_pub -V {version}: {out:?}");
        let (_, latest) = t.get("/api/v1/devices/mosq/latest").await;
        assert_eq!(latest["metrics"]["n"]["value"], json!(value), "{latest}");
    }

    // A publish the ACL refuses: mosquitto_pub reports the reason code.
    let out = tokio::process::Command::new("mosquitto_pub")
        .args(&common)
        .args([
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "devices/else/telemetry",
            "-m",
            "{}",
        ])
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(said.contains("Not authorized"), "{out:?}");

    // mosquitto_sub: a filter in another device's tree is refused in the SUBACK, and one in
    // its own tree is granted (mosquitto_sub then waits until -W and ends with 27).
    for (filter, granted) in [
        ("devices/else/commands/+", false),
        ("devices/mosq/commands/+", true),
    ] {
        let out = tokio::process::Command::new("mosquitto_sub")
            .args(&common)
            .args(["-V", "mqttv5", "-q", "1", "-W", "2", "-t", filter])
            .output()
            .await
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(!said.contains("denied"), granted, "{filter}: {out:?}");
        assert_eq!(out.status.code() == Some(27), granted, "{filter}: {out:?}");
    }
    let (_, stats) = t.get("/api/v1/stats").await;
    assert_eq!(stats["gate"]["acl_denied"], 2, "{stats}");
}
