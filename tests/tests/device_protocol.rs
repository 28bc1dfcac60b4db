//! The device SDK against a scripted MQTT 3.1.1 peer over TLS, for what Tellus does only by
//! chance: a socket that stalls mid-write, a command sent twice or malformed, handlers that
//! panic or never end, an answer too large to send, an outbox smaller than a batch. Each
//! test was a defect once.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::BytesMut;
use rumqttc::mqttbytes::{
    self,
    v4::{ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode},
    QoS,
};
use serde_json::{json, Value};
use tellus_device::{Backoff, Batching, Credentials, Device, Reading};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{rustls, server::TlsStream, TlsAcceptor};

/// Reconnects within a fifth of a second, so that tests of reconnects are short.
const QUICK: Backoff = Backoff {
    min: Duration::from_millis(100),
    max: Duration::from_millis(200),
};

struct Broker {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    listener: Option<TcpListener>,
    acceptor: TlsAcceptor,
    port: u16,
    creds: Credentials,
}

impl Broker {
    async fn start(id: &str) -> Broker {
        let (issuer, ca_pem) = tellus_tests::certs::own_ca("scripted-peer-ca");
        // Past the middle of its life, so that a device with a rotation is due at once (the
        // peer asks for no client certificate, so its validity matters to nothing else).
        let now = time::OffsetDateTime::now_utc();
        let creds = tellus_tests::certs::device_with(&issuer, id, &ca_pem, |p| {
            p.not_before = now - time::Duration::hours(2);
            p.not_after = now + time::Duration::hours(1);
        });
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        Broker {
            issuer,
            listener: Some(listener),
            acceptor: TlsAcceptor::from(Arc::new(config)),
            port,
            creds,
        }
    }

    /// A device of this peer's, to be configured and started.
    fn device(&self) -> tellus_device::DeviceBuilder {
        Device::builder(self.creds.clone(), "127.0.0.1", self.port)
    }

    /// Accepts one connection and answers its CONNECT.
    async fn session(&self) -> Conn {
        let (tcp, _) = self.listener.as_ref().unwrap().accept().await.unwrap();
        let stream = self.acceptor.accept(tcp).await.unwrap();
        let mut c = Conn {
            stream,
            buf: BytesMut::new(),
        };
        match c.recv(Duration::from_secs(10)).await {
            Some(Packet::Connect(_)) => {}
            other => panic!("expected CONNECT, got {other:?}"),
        }
        c.send(&Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        )))
        .await;
        c
    }
}

struct Conn {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
}

impl Conn {
    async fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, usize::MAX).unwrap();
        let _ = self.stream.write_all(&out).await;
        let _ = self.stream.flush().await;
    }

    /// The next packet; None on close or after `wait`.
    async fn recv(&mut self, wait: Duration) -> Option<Packet> {
        tokio::time::timeout(wait, async {
            loop {
                match Packet::read(&mut self.buf, usize::MAX) {
                    Ok(p) => return Some(p),
                    Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("{e}"),
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Grants every filter of a SUBSCRIBE at QoS 1.
    async fn grant(&mut self, subscribe: &rumqttc::mqttbytes::v4::Subscribe) {
        let codes = subscribe
            .filters
            .iter()
            .map(|_| SubscribeReasonCode::Success(QoS::AtLeastOnce))
            .collect();
        self.send(&Packet::SubAck(SubAck::new(subscribe.pkid, codes)))
            .await;
    }

    /// Reads until SUBSCRIBE, answers it.
    async fn subscribed(&mut self) {
        loop {
            match self.recv(Duration::from_secs(10)).await {
                Some(Packet::Subscribe(s)) => return self.grant(&s).await,
                Some(_) => {}
                None => panic!("no SUBSCRIBE"),
            }
        }
    }

    async fn command(&mut self, device: &str, id: &str, pkid: u16, body: Value) {
        let mut p = Publish::new(
            format!("devices/{device}/commands/{id}"),
            QoS::AtLeastOnce,
            serde_json::to_vec(&body).unwrap(),
        );
        p.pkid = pkid;
        self.send(&Packet::Publish(p)).await;
    }

    async fn desired(&mut self, device: &str, pkid: u16, body: Value) {
        let mut p = Publish::new(
            format!("devices/{device}/state/desired"),
            QoS::AtLeastOnce,
            serde_json::to_vec(&body).unwrap(),
        );
        p.pkid = pkid;
        self.send(&Packet::Publish(p)).await;
    }
}

/// The numbers `n` in a JSON telemetry payload.
fn numbers(payload: &[u8]) -> Vec<i64> {
    let v: Value = serde_json::from_slice(payload).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["values"]["n"].as_i64().unwrap())
        .collect()
}

/// A flush that times out leaves rumqttc's `Outgoing::Publish` event of the old session in
/// its queue. Were it taken for the first publish of the next session, every PUBACK would
/// remove the readings of the publish after the acknowledged one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_of_a_stalled_session_leave_the_outbox_only_by_their_own_puback() {
    let broker = Broker::start("dev-1").await;
    // Enough in flight at once (64 batches of 4 readings of 60 KB: 15 MB) to fill the
    // socket's buffers, so that rumqttc's flush times out.
    let device = broker
        .device()
        .batching(Batching {
            max_readings: 16,
            max_bytes: 1 << 20,
            linger: Duration::ZERO,
        })
        .in_flight(64)
        .backoff(QUICK)
        .start()
        .unwrap();
    let pad = "x".repeat(60_000);
    let total = 256;
    let readings: Vec<Reading> = (0..total)
        .map(|i| {
            Reading::at(1_000 + i)
                .with("n", i)
                .with("pad", pad.as_str())
        })
        .collect();
    device.send_all(readings).await.unwrap();

    // Session 1: accepted, then never read again: rumqttc's flush times out (5 s).
    let s1 = broker.session().await;
    let t0 = Instant::now();
    while device.stats().connections == 0 || device.is_connected() {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{:?}",
            device.stats()
        );
    }
    eprintln!("session 1 ended: {:?}", device.stats().last_error);

    // Session 2: read publishes; acknowledge only the first one.
    let mut s2 = broker.session().await;
    drop(s1);
    let mut acked: BTreeSet<i64> = BTreeSet::new();
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match s2.recv(Duration::from_millis(500)).await {
            // Only the first publish is acknowledged.
            Some(Packet::Publish(p)) if p.topic.ends_with("/telemetry") && first.is_none() => {
                first = Some(numbers(&p.payload));
                s2.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
            }
            Some(Packet::Subscribe(s)) => s2.grant(&s).await,
            Some(_) => {}
            None if first.is_some() => break,
            None => {}
        }
    }
    let first = first.expect("a publish in session 2");
    acked.extend(&first);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = device.stats();
    eprintln!(
        "session 2: acked one publish ({}..={}); device says acknowledged={} waiting={}",
        first[0],
        first[first.len() - 1],
        stats.acknowledged,
        stats.waiting
    );
    drop(s2);

    // Session 3: acknowledge everything, in order, until the outbox is empty.
    let mut s3 = broker.session().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while device.stats().waiting > 0 && Instant::now() < deadline {
        match s3.recv(Duration::from_millis(500)).await {
            Some(Packet::Publish(p)) => {
                if p.topic.ends_with("/telemetry") {
                    acked.extend(numbers(&p.payload));
                }
                s3.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
            }
            Some(Packet::Subscribe(s)) => s3.grant(&s).await,
            _ => {}
        }
    }
    let stats = device.stats();
    let missing: Vec<i64> = (0..total).filter(|n| !acked.contains(n)).collect();
    eprintln!("end: {stats:?}");
    assert!(
        missing.is_empty(),
        "readings removed from the outbox without any PUBACK for them: {missing:?}"
    );
}

/// A handler that panics, in its future or before returning it, is answered as failed (and
/// its command id does not stay "running").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_panicking_before_its_future_is_answered_as_failed() {
    let broker = Broker::start("dev-2").await;
    let device = broker
        .device()
        .on_command("boom", |cmd| {
            if cmd.params["sync"] == true {
                panic!("panics while building its future");
            }
            async move { Err::<Value, String>("never".into()) }
        })
        .on_command("boom_async", |_| async move {
            panic!("panics in its future");
        })
        .start()
        .unwrap();
    let mut s = broker.session().await;
    s.subscribed().await;
    s.command(
        "dev-2",
        "c-async",
        1,
        json!({"id": "c-async", "name": "boom_async", "params": {}}),
    )
    .await;
    s.command(
        "dev-2",
        "c-sync",
        2,
        json!({"id": "c-sync", "name": "boom", "params": {"sync": true}}),
    )
    .await;
    let mut results = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(Packet::Publish(p)) = s.recv(Duration::from_millis(200)).await {
            if p.topic.ends_with("/result") {
                results.push((p.topic.clone(), p.payload.clone()));
                s.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
            }
        }
    }
    // The same command again (a resend after a lost PUBACK): the same answer again.
    s.command(
        "dev-2",
        "c-sync",
        3,
        json!({"id": "c-sync", "name": "boom", "params": {"sync": true}}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Some(Packet::Publish(p)) = s.recv(Duration::from_millis(200)).await {
            if p.topic.ends_with("/result") {
                results.push((p.topic.clone(), p.payload.clone()));
                s.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
            }
        }
    }
    let failed = json!({"ok": false, "output": "the command handler panicked"});
    for (id, times) in [("c-async", 1), ("c-sync", 2)] {
        let answers: Vec<Value> = results
            .iter()
            .filter(|(topic, _)| topic.contains(&format!("/{id}/")))
            .map(|(_, body)| serde_json::from_slice(body).unwrap())
            .collect();
        assert_eq!(answers, vec![failed.clone(); times], "{id}: {results:?}");
    }
    drop(device);
}

/// A panic in the desired-state handler does not end desired-state handling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_desired_handler_does_not_stop_later_calls() {
    let broker = Broker::start("dev-3").await;
    let calls = Arc::new(AtomicU64::new(0));
    let seen = calls.clone();
    let device = broker
        .device()
        .on_desired(move |d| {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, Ordering::Relaxed);
                if d.state["bad"] == true {
                    panic!("handler bug");
                }
            }
        })
        .start()
        .unwrap();
    let mut s = broker.session().await;
    s.subscribed().await;
    s.desired(
        "dev-3",
        1,
        json!({"version": 1, "state": {"bad": true}, "at_ms": 1}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.desired(
        "dev-3",
        2,
        json!({"version": 2, "state": {"bad": false}, "at_ms": 2}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    eprintln!(
        "desired now {:?}, handler calls {}",
        device.desired().map(|d| d.version),
        calls.load(Ordering::Relaxed)
    );
    assert_eq!(calls.load(Ordering::Relaxed), 2, "version 2 never handled");
}

/// close() waits neither for running command handlers nor for those queued behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_does_not_wait_for_long_command_handlers() {
    let broker = Broker::start("dev-5").await;
    let device = broker
        .device()
        .command_concurrency(1)
        .on_command("slow", |_| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(json!(null))
        })
        .start()
        .unwrap();
    let mut s = broker.session().await;
    s.subscribed().await;
    for (i, id) in ["a", "b"].into_iter().enumerate() {
        s.command("dev-5", id, i as u16 + 1, json!({"id": id, "name": "slow"}))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), device.close()).await;
    assert!(closed.is_ok(), "close() still waiting after 10 s");
}

/// An outbox smaller than a batch, full, with readings more often than the linger: the
/// oldest unsent reading is dropped by each new one, which must not start the linger over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_smaller_than_a_batch_still_sends() {
    let broker = Broker::start("dev-7").await;
    let mut outbox = tellus_device::OutboxConfig::memory();
    outbox.max_readings = 5;
    let device = Arc::new(broker.device().outbox(outbox).start().unwrap());
    let d = device.clone();
    let sender = tokio::spawn(async move {
        for i in 0..200 {
            d.send(Reading::at(1_000 + i).with("n", i)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    });
    // Offline for a moment: the outbox fills.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut s = broker.session().await;
    s.subscribed().await;
    let mut telemetry = 0;
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        if let Some(Packet::Publish(p)) = s.recv(Duration::from_millis(200)).await {
            telemetry += 1;
            s.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
        }
    }
    sender.abort();
    eprintln!(
        "telemetry publishes in 4 s: {telemetry}; {:?}",
        device.stats()
    );
    assert!(telemetry > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_second_keep_alive_is_raised_rather_than_a_panic() {
    let broker = Broker::start("dev-8").await;
    let started = std::panic::AssertUnwindSafe(|| {
        broker
            .device()
            .keep_alive(Duration::from_millis(500))
            .start()
            .map(|_| ())
    });
    let outcome = std::panic::catch_unwind(started);
    assert!(
        outcome.is_ok(),
        "start() panicked instead of returning an error"
    );
}

/// Once per id; the stored answer again for a repeat; malformed payloads answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_run_once_per_id_and_malformed_ones_are_answered() {
    let broker = Broker::start("dev-9").await;
    let calls = Arc::new(AtomicU64::new(0));
    let seen = calls.clone();
    let _device = broker
        .device()
        .on_command("go", move |_| {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(json!("done"))
            }
        })
        .start()
        .unwrap();
    let mut s = broker.session().await;
    s.subscribed().await;
    let go = json!({"id": "c1", "name": "go"});
    s.command("dev-9", "c1", 1, go.clone()).await;
    s.command("dev-9", "c1", 2, go.clone()).await; // while running
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.command("dev-9", "c1", 3, go).await; // after the answer
    let mut bad = Publish::new(
        "devices/dev-9/commands/c2",
        QoS::AtLeastOnce,
        b"{not json".to_vec(),
    );
    bad.pkid = 4;
    s.send(&Packet::Publish(bad)).await;
    s.command("dev-9", "c3", 5, json!({"id": "other", "name": "go"}))
        .await;
    s.command(
        "dev-9",
        "c4",
        6,
        json!({"id": "c4", "name": "go", "params": 1, "expires_at_ms": "x"}),
    )
    .await;
    let mut results = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Some(Packet::Publish(p)) = s.recv(Duration::from_millis(200)).await {
            results.push((
                p.topic.clone(),
                String::from_utf8_lossy(&p.payload).into_owned(),
            ));
            s.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
        }
    }
    for r in &results {
        eprintln!("{r:?}");
    }
    assert_eq!(calls.load(Ordering::Relaxed), 1, "run once: {results:?}");
    let answers = |id: &str| -> Vec<Value> {
        results
            .iter()
            .filter(|(topic, _)| *topic == format!("devices/dev-9/commands/{id}/result"))
            .map(|(_, body)| serde_json::from_str(body).unwrap())
            .collect()
    };
    // Answered once it ran, and the same again for the copy that came after.
    let done = json!({"ok": true, "output": "done"});
    assert_eq!(answers("c1"), [done.clone(), done]);
    for (id, why) in [
        ("c2", "unreadable command"),
        ("c3", "does not match its topic"),
        ("c4", "unreadable command"),
    ] {
        let got = answers(id);
        assert_eq!(got.len(), 1, "{id}: {results:?}");
        assert_eq!(got[0]["ok"], false);
        assert!(
            got[0]["output"].as_str().unwrap().contains(why),
            "{id}: {got:?}"
        );
    }
}

/// A command result larger than a device may send is answered as a failure saying so:
/// kept as it was, it could never be published, every connection would end on it, and,
/// sent before readings, it would hold every reading back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_command_result_is_a_failure_and_holds_nothing_back() {
    let broker = Broker::start("dev-10").await;
    let device = broker
        .device()
        .backoff(QUICK)
        .on_command("logs", |_| async move { Ok(json!("l".repeat(400_000))) })
        .start()
        .unwrap();
    let mut s = broker.session().await;
    s.subscribed().await;
    s.command("dev-10", "c1", 1, json!({"id": "c1", "name": "logs"}))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    device.send(Reading::at(1_000).with("n", 1)).await.unwrap();
    let (mut sessions, mut telemetry, mut answer) = (1, 0, None);
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        match s.recv(Duration::from_millis(300)).await {
            Some(Packet::Publish(p)) => {
                if p.topic.ends_with("/telemetry") {
                    telemetry += 1;
                }
                if p.topic.ends_with("/c1/result") {
                    answer = Some(serde_json::from_slice::<Value>(&p.payload).unwrap());
                }
                s.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
            }
            Some(Packet::Subscribe(x)) => s.grant(&x).await,
            Some(_) => {}
            None if device.is_connected() => {}
            None => {
                s = tokio::time::timeout(Duration::from_secs(2), broker.session())
                    .await
                    .expect("reconnect");
                sessions += 1;
            }
        }
    }
    eprintln!(
        "sessions {sessions}, telemetry publishes {telemetry}, last error {:?}",
        device.stats().last_error
    );
    assert!(telemetry > 0, "the reading never left");
    assert_eq!(sessions, 1, "a connection ended");
    let answer = answer.expect("the command was answered");
    assert_eq!(answer["ok"], false);
    assert!(
        answer["output"]
            .as_str()
            .unwrap()
            .contains("the result is 400023 bytes; a device sends at most 65536"),
        "{answer}"
    );
}

// Certificate rotation, close and sizes.

fn far_rotation(min_interval: Duration) -> tellus_device::Rotation {
    tellus_device::Rotation {
        // The scripted peer's certificates end within the hour: due at once.
        renew_before: Duration::from_secs(86_400),
        save_to: None,
        min_interval,
    }
}

impl Broker {
    /// Signs a CSR for `id` with the peer's CA; the answer Tellus would give.
    fn issue(&self, id: &str, csr_pem: &str) -> String {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        csr.params.distinguished_name = rcgen::DistinguishedName::new();
        csr.params
            .distinguished_name
            .push(rcgen::DnType::CommonName, id);
        let cert = csr.signed_by(&self.issuer).unwrap().pem();
        json!({ "cert_pem": cert }).to_string()
    }
}

async fn publish_to(c: &mut Conn, topic: String, pkid: u16, payload: Vec<u8>) {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, payload);
    p.pkid = pkid;
    c.send(&Packet::Publish(p)).await;
}

/// A certificate request is a publish that is not in the outbox: it must still take its
/// place in the packet-id queue, or the oldest batch of readings would leave the outbox on
/// the request's PUBACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_request_takes_its_own_packet_id() {
    let broker = Broker::start("rev-1").await;
    let device = broker
        .device()
        .rotation(far_rotation(Duration::from_secs(3600)))
        .batching(Batching {
            max_readings: 1,
            max_bytes: 1 << 20,
            linger: Duration::ZERO,
        })
        .backoff(QUICK)
        .start()
        .unwrap();
    let readings: Vec<Reading> = (0..5)
        .map(|i| Reading::at(1_000 + i).with("n", i))
        .collect();
    device.send_all(readings).await.unwrap();

    let mut s1 = broker.session().await;
    let mut seen1 = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match s1.recv(Duration::from_millis(200)).await {
            Some(Packet::Subscribe(s)) => s1.grant(&s).await,
            Some(Packet::Publish(p)) if p.topic.ends_with("/certs/csr") => {
                // Acknowledged at once; no answer.
                s1.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
            }
            Some(Packet::Publish(p)) if p.topic.ends_with("/telemetry") => {
                seen1.extend(numbers(&p.payload)); // never acknowledged
            }
            _ => {}
        }
    }
    let stats = device.stats();
    eprintln!("session 1: readings published {seen1:?}; device: {stats:?}");
    drop(s1);

    let mut s2 = broker.session().await;
    let mut acked = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && (device.stats().waiting > 0 || acked.is_empty()) {
        match s2.recv(Duration::from_millis(200)).await {
            Some(Packet::Subscribe(s)) => s2.grant(&s).await,
            Some(Packet::Publish(p)) => {
                if p.topic.ends_with("/telemetry") {
                    acked.extend(numbers(&p.payload));
                }
                s2.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
            }
            _ => {}
        }
    }
    eprintln!("session 2 acked {acked:?}; {:?}", device.stats());
    assert_eq!(
        stats.acknowledged, 0,
        "readings counted acknowledged without a PUBACK"
    );
    let missing: Vec<i64> = (0..5).filter(|n| !acked.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "never acknowledged, yet gone: {missing:?}"
    );
}

/// close() does not wait for a desired-state handler that does not return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_does_not_wait_for_a_long_desired_handler() {
    let broker = Broker::start("rev-2").await;
    let device = broker
        .device()
        .on_desired(|_| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        })
        .start()
        .unwrap();
    let mut s = broker.session().await;
    s.subscribed().await;
    s.desired("rev-2", 1, json!({"version": 1, "state": {}, "at_ms": 1}))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), device.close()).await;
    assert!(closed.is_ok(), "close() still waiting after 10 s");
}

/// Commands that arrive as close() begins are acknowledged (delivered) by rumqttc: each is
/// run or answered as not run, now or from the outbox at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_arriving_at_close_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start("rev-3").await;
    let outbox = dir.path().join("o.db");
    let build = || {
        broker
            .device()
            .outbox(tellus_device::OutboxConfig::file(&outbox))
            .on_command("go", |_| async move { Ok(json!("done")) })
    };
    let device = build().start().unwrap();
    let mut s = broker.session().await;
    s.subscribed().await;
    for i in 1..=40u16 {
        let id = format!("c{i}");
        s.command("rev-3", &id, i, json!({"id": id, "name": "go"}))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let closing = tokio::spawn(device.close());
    let mut acked = BTreeSet::new();
    let mut answered = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match s.recv(Duration::from_millis(200)).await {
            Some(Packet::PubAck(a)) => {
                acked.insert(a.pkid);
            }
            Some(Packet::Publish(p)) if p.topic.contains("/result") => {
                answered.insert(p.topic.split('/').nth(3).unwrap().to_owned());
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
            _ => {}
        }
    }
    closing.await.unwrap();
    // The next start of the program: whatever was kept is sent now.
    let device = build().start().unwrap();
    let mut s = broker.session().await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match s.recv(Duration::from_millis(200)).await {
            Some(Packet::Subscribe(x)) => s.grant(&x).await,
            Some(Packet::Publish(p)) => {
                if p.topic.contains("/result") {
                    answered.insert(p.topic.split('/').nth(3).unwrap().to_owned());
                }
                s.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
            }
            _ => {}
        }
    }
    device.close().await;
    let lost: Vec<u16> = acked
        .iter()
        .copied()
        .filter(|i| !answered.contains(&format!("c{i}")))
        .collect();
    eprintln!(
        "PUBACKed {}, answered {}, lost {lost:?}",
        acked.len(),
        answered.len()
    );
    assert!(lost.is_empty(), "delivered but never answered: {lost:?}");
}

/// An event whose name or payload is too long is refused at the call: in the outbox it could
/// never be sent, every connection would end on it, and readings would wait behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_large_with_its_name_is_refused_at_the_call() {
    let broker = Broker::start("rev-4").await;
    let device = broker.device().backoff(QUICK).start().unwrap();
    let refused = device
        .event(&"e".repeat(10_000), json!("x".repeat(60_000)))
        .await;
    assert!(
        matches!(refused, Err(tellus_device::Error::BadEventName(..))),
        "{refused:?}"
    );
    let refused = device
        .event("large", json!("x".repeat(tellus_device::MAX_MESSAGE_BYTES)))
        .await;
    assert!(
        matches!(refused, Err(tellus_device::Error::MessageTooLarge(_))),
        "{refused:?}"
    );
    device.send(Reading::at(1_000).with("n", 1)).await.unwrap();
    let (mut sessions, mut telemetry) = (1, 0);
    let mut s = broker.session().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match s.recv(Duration::from_millis(300)).await {
            Some(Packet::Publish(p)) => {
                if p.topic.ends_with("/telemetry") {
                    telemetry += 1;
                }
                s.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
            }
            Some(Packet::Subscribe(x)) => s.grant(&x).await,
            Some(_) => {}
            None if device.is_connected() => {}
            None => {
                match tokio::time::timeout(Duration::from_secs(2), broker.session()).await {
                    Ok(n) => s = n,
                    Err(_) => break,
                }
                sessions += 1;
            }
        }
    }
    eprintln!(
        "sessions {sessions}, telemetry {telemetry}, last error {:?}",
        device.stats().last_error
    );
    assert!(telemetry > 0, "the reading never left");
    assert_eq!(sessions, 1, "connections ended");
}

/// A `min_interval` of zero does not make the device ask again after each refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_min_interval_does_not_ask_in_a_loop() {
    let broker = Broker::start("rev-5").await;
    let _device = broker
        .device()
        .rotation(far_rotation(Duration::ZERO))
        .start()
        .unwrap();
    let mut s = broker.session().await;
    let mut csrs = 0;
    let mut pkid = 1;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match s.recv(Duration::from_millis(200)).await {
            Some(Packet::Subscribe(x)) => s.grant(&x).await,
            Some(Packet::Publish(p)) if p.topic.ends_with("/certs/csr") => {
                csrs += 1;
                s.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
                let busy = json!({"error": "the device has 5 valid certificates"});
                publish_to(
                    &mut s,
                    "devices/rev-5/certs/issued".into(),
                    pkid,
                    busy.to_string().into_bytes(),
                )
                .await;
                pkid = pkid % 1000 + 1;
            }
            _ => {}
        }
    }
    eprintln!("CSRs in 2 s: {csrs}");
    // At most one a second (the floor of `min_interval`); a loop made 24.
    assert!(csrs <= 3, "{csrs} CSRs in 2 s");
}

/// A stale answer (to a request of an earlier connection) does not take the pending key:
/// the right answer that follows is still taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_answer_does_not_discard_the_pending_request() {
    let broker = Broker::start("rev-6").await;
    let device = broker
        .device()
        .rotation(far_rotation(Duration::from_millis(500)))
        .backoff(QUICK)
        .start()
        .unwrap();
    async fn next_csr(s: &mut Conn) -> String {
        loop {
            match s.recv(Duration::from_secs(5)).await {
                Some(Packet::Subscribe(x)) => s.grant(&x).await,
                Some(Packet::Publish(p)) if p.topic.ends_with("/certs/csr") => {
                    s.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
                    return String::from_utf8(p.payload.to_vec()).unwrap();
                }
                Some(_) => {}
                None => panic!("no CSR"),
            }
        }
    }
    let mut s1 = broker.session().await;
    let csr1 = next_csr(&mut s1).await;
    drop(s1); // the answer to csr1 is still on its way
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut s2 = broker.session().await;
    let csr2 = next_csr(&mut s2).await;
    assert_ne!(csr1, csr2);
    let topic = "devices/rev-6/certs/issued".to_string();
    publish_to(
        &mut s2,
        topic.clone(),
        1,
        broker.issue("rev-6", &csr1).into_bytes(),
    )
    .await;
    publish_to(&mut s2, topic, 2, broker.issue("rev-6", &csr2).into_bytes()).await;
    // A renewed certificate makes the device reconnect at once.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut reconnected = false;
    while Instant::now() < deadline {
        if s2.recv(Duration::from_millis(200)).await.is_none() && !device.is_connected() {
            reconnected = true;
            break;
        }
    }
    eprintln!(
        "reconnected {reconnected}; last error {:?}",
        device.stats().last_error
    );
    assert!(
        reconnected,
        "the certificate issued for the pending key was thrown away"
    );
}

/// A request that gets no answer is made again after `min_interval`, though the connection
/// lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_request_is_made_again() {
    let broker = Broker::start("rev-7").await;
    let _device = broker
        .device()
        .rotation(far_rotation(Duration::from_millis(300)))
        .keep_alive(Duration::from_secs(1))
        .start()
        .unwrap();
    let mut s = broker.session().await;
    let mut csrs = 0;
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        match s.recv(Duration::from_millis(200)).await {
            Some(Packet::Subscribe(x)) => s.grant(&x).await,
            Some(Packet::PingReq) => s.send(&Packet::PingResp).await,
            Some(Packet::Publish(p)) if p.topic.ends_with("/certs/csr") => {
                csrs += 1; // acknowledged; the answer is lost
                s.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
            }
            _ => {}
        }
    }
    eprintln!("CSRs in 4 s with min_interval 300 ms and no answer: {csrs}");
    assert!(csrs > 1, "asked once, then never again on this connection");
}
