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

struct Broker {
    listener: Option<TcpListener>,
    acceptor: TlsAcceptor,
    port: u16,
    creds: Credentials,
}

impl Broker {
    async fn start(id: &str) -> Broker {
        let (issuer, ca_pem) = tellus_tests::certs::own_ca("review-ca");
        let creds = tellus_tests::certs::device(&issuer, id, &ca_pem);
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
            listener: Some(listener),
            acceptor: TlsAcceptor::from(Arc::new(config)),
            port,
            creds,
        }
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
    let device = Device::builder(broker.creds.clone(), "127.0.0.1", broker.port)
        .batching(Batching {
            max_readings: 16,
            max_bytes: 1 << 20,
            linger: Duration::ZERO,
        })
        .backoff(Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_millis(200),
        })
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
    let device = Device::builder(broker.creds.clone(), "127.0.0.1", broker.port)
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
    let device = Device::builder(broker.creds.clone(), "127.0.0.1", broker.port)
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
    let device = Device::builder(broker.creds.clone(), "127.0.0.1", broker.port)
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
    let device = Arc::new(
        Device::builder(broker.creds.clone(), "127.0.0.1", broker.port)
            .outbox(outbox)
            .start()
            .unwrap(),
    );
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
        Device::builder(broker.creds.clone(), "127.0.0.1", broker.port)
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
    let _device = Device::builder(broker.creds.clone(), "127.0.0.1", broker.port)
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
    let device = Device::builder(broker.creds.clone(), "127.0.0.1", broker.port)
        .backoff(Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_millis(200),
        })
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
