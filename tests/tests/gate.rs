//! The gate at the protocol level, with a raw MQTT 3.1.1 client: acknowledgement order and
//! QoS 2, protocol refusals, wills, deadlines, and devices that stop reading. MQTT 5 is in
//! `mqtt5.rs`.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::{
    v4::{
        ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PubAck, PubComp, PubRec, PubRel,
        Publish,
    },
    QoS,
};
use serde_json::json;
use tellus_tests::{raw::RawDevice, Tellus};

fn publish(topic: &str, qos: QoS, pkid: u16, payload: &str) -> Packet {
    let mut p = Publish::new(topic, qos, payload.as_bytes().to_vec());
    p.pkid = pkid;
    Packet::Publish(p)
}

fn refused(code: ConnectReturnCode) -> Option<Packet> {
    Some(Packet::ConnAck(ConnAck {
        session_present: false,
        code,
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_leave_in_order_and_qos2_is_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("qos").await;
    let mut d = RawDevice::connected(&t, &creds, 30).await;
    let telemetry = "devices/qos/telemetry";

    // Telemetry (acknowledged after an fsync) before a state report (acknowledged by the
    // routing core at once): the answers still come in the order of the publishes.
    d.send(&publish(telemetry, QoS::AtLeastOnce, 1, r#"{"a": 1}"#))
        .await;
    d.send(&publish(
        "devices/qos/state/reported",
        QoS::AtLeastOnce,
        2,
        r#"{"fw": "1.0"}"#,
    ))
    .await;
    // QoS 2 telemetry, re-sent before PUBREL, then released; then a PUBREL nobody expects.
    d.send(&publish(telemetry, QoS::ExactlyOnce, 3, r#"{"b": 2}"#))
        .await;
    let Packet::Publish(mut again) = publish(telemetry, QoS::ExactlyOnce, 3, r#"{"b": 2}"#) else {
        unreachable!()
    };
    again.dup = true;
    d.send(&Packet::Publish(again)).await;
    d.send(&Packet::PubRel(PubRel::new(3))).await;
    d.send(&Packet::PubRel(PubRel::new(9))).await;
    // A QoS 2 event goes to the routing core and is answered by the gate as well.
    d.send(&publish(
        "devices/qos/events/boot",
        QoS::ExactlyOnce,
        4,
        "{}",
    ))
    .await;
    d.send(&Packet::PubRel(PubRel::new(4))).await;
    d.send(&Packet::PingReq).await;

    let mut answers = Vec::new();
    for _ in 0..9 {
        answers.push(d.recv().await.expect("connection closed"));
    }
    assert_eq!(
        answers,
        vec![
            Packet::PubAck(PubAck::new(1)),
            Packet::PubAck(PubAck::new(2)),
            Packet::PubRec(PubRec::new(3)),
            Packet::PubRec(PubRec::new(3)),
            Packet::PubComp(PubComp::new(3)),
            Packet::PubComp(PubComp::new(9)),
            Packet::PubRec(PubRec::new(4)),
            Packet::PubComp(PubComp::new(4)),
            Packet::PingResp,
        ]
    );
    // The re-sent QoS 2 publish was not stored twice.
    let (_, stats) = t.get("/api/v1/stats").await;
    assert_eq!(stats["ingest"]["received"], 2, "{stats}");
    let (_, latest) = t.get("/api/v1/devices/qos/latest").await;
    assert_eq!(latest["metrics"]["b"]["value"], json!(2), "{latest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_protocol_versions_and_bad_wills_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let creds = t.create_device("proto").await;

    // A protocol level no MQTT version has (6).
    let mut d = RawDevice::tls(&t, &creds).await;
    let mut v6 = Vec::from(&b"\x10\x00\x00\x04MQTT\x06\x02\x00\x3c\x00\x05proto"[..]);
    v6[1] = (v6.len() - 2) as u8;
    d.send_bytes(&v6).await;
    assert_eq!(
        d.recv().await,
        refused(ConnectReturnCode::RefusedProtocolVersion)
    );
    d.expect_closed(|_| false).await;

    // MQTT 3.1 (protocol name MQIsdp, level 3).
    let mut d = RawDevice::tls(&t, &creds).await;
    let mut v31 = Vec::from(&b"\x10\x00\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x05proto"[..]);
    v31[1] = (v31.len() - 2) as u8;
    d.send_bytes(&v31).await;
    assert_eq!(
        d.recv().await,
        refused(ConnectReturnCode::RefusedProtocolVersion)
    );

    // A will on another device's topic, and a will on telemetry (which would never be
    // stored: a will goes through the routing core).
    for topic in ["devices/other/events/gone", "devices/proto/telemetry"] {
        let mut d = RawDevice::tls(&t, &creds).await;
        let mut connect = Connect::new("proto");
        connect.last_will = Some(LastWill::new(topic, "bye", QoS::AtLeastOnce, false));
        d.send(&Packet::Connect(connect)).await;
        assert_eq!(d.recv().await, refused(ConnectReturnCode::NotAuthorized));
        d.expect_closed(|_| false).await;
    }
    // An allowed will is fine.
    let mut d = RawDevice::tls(&t, &creds).await;
    let mut connect = Connect::new("proto");
    connect.last_will = Some(LastWill::new(
        "devices/proto/events/gone",
        "bye",
        QoS::AtLeastOnce,
        true,
    ));
    d.send(&Packet::Connect(connect)).await;
    assert_eq!(d.recv().await, refused(ConnectReturnCode::Success));

    let (_, stats) = t.get("/api/v1/stats").await;
    assert_eq!(stats["gate"]["refused_protocol"], 2, "{stats}");
    assert_eq!(stats["gate"]["acl_denied"], 2, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_devices_are_closed_at_their_deadlines() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), Some("[mqtt]\nconnect_timeout = \"1s\"\n"));
    let creds = t.create_device("quiet").await;

    // A handshake and then no CONNECT.
    let mut d = RawDevice::tls(&t, &creds).await;
    d.expect_closed(|_| false).await;

    // Connected with a keep-alive of 1 s, then silent: closed after 1.5 s.
    let mut d = RawDevice::connected(&t, &creds, 1).await;
    d.expect_closed(|_| false).await;

    t.wait_for_log_line(&[
        "device_id=quiet",
        "no packet within one and a half keep-alive",
    ])
    .await;
    let (_, stats) = t.get("/api/v1/stats").await;
    assert_eq!(stats["gate"]["connect_timeout"], 1, "{stats}");
    assert_eq!(stats["gate"]["keep_alive_expired"], 1, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_reading_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    // Unlimited rate: this is about the write deadline, not about slowing the device down.
    let t = Tellus::start_in(
        dir.path(),
        Some("[mqtt]\nwrite_timeout = \"1s\"\nmax_messages_per_second = 0\n"),
    );
    let creds = t.create_device("deaf").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(t.mqtt_addr).await.unwrap();
    let mut d = RawDevice::tls_over(tcp, &creds).await;
    d.send(&Packet::Connect(Connect::new("deaf"))).await;

    // Ask for answers without ever reading them, until the gate gives up on the device.
    let pings = Bytes::from([0xc0, 0x00].repeat(4096));
    let flooded = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if d.try_send_bytes(&pings).await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(flooded.is_ok(), "the gate kept a device that does not read");
    t.wait_for_log_line(&["device_id=deaf", "device stopped reading"])
        .await;

    // Other devices are unaffected.
    let other = t.create_device("fine").await;
    let mut d = RawDevice::connected(&t, &other, 30).await;
    d.send(&Packet::PingReq).await;
    assert_eq!(d.recv().await, Some(Packet::PingResp));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_packet_closes_the_connection_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), Some("[mqtt]\nmax_packet_size = 1024\n"));
    let creds = t.create_device("big").await;
    let mut d = RawDevice::connected(&t, &creds, 30).await;
    let body = json!({ "blob": "x".repeat(2000) }).to_string();
    d.send(&publish(
        "devices/big/telemetry",
        QoS::AtLeastOnce,
        1,
        &body,
    ))
    .await;
    d.expect_closed(|_| false).await;
    let (_, stats) = t.get("/api/v1/stats").await;
    assert_eq!(stats["gate"]["packet_too_large"], 1, "{stats}");
    assert_eq!(stats["ingest"]["received"], 0, "{stats}");
    t.wait_for_log_line(&["device_id=big", "larger than the limit of 1024"])
        .await;
}
