//! The simulated devices: a lean MQTT 3.1.1 client over mTLS, one connection per device
//! certificate, that publishes telemetry at QoS 1 either open-loop at a scheduled rate or as
//! fast as its in-flight window allows, and records each PUBACK's latency in an HDR
//! histogram.
//!
//! Latency is measured from a message's *scheduled* send time, not from the moment it was
//! written: when the server (or the generator) stalls, the messages that should have gone
//! out meanwhile carry the stall in their latency instead of silently not being sent
//! (coordinated omission). The client is written on rumqttc's packet codec rather than on
//! its event loop so that the generator, which shares the machine with the server, spends
//! as little CPU per message as a device would: one encode and one TLS write per message
//! due.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::{
    v4::{Connect, Packet, Publish},
    Error as CodecError, QoS,
};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf},
    net::TcpStream,
    sync::{Notify, Semaphore},
};
use tokio_rustls::{client::TlsStream, TlsConnector};

pub type Tls = TlsStream<TcpStream>;

/// Largest packet the client reads (it only ever expects CONNACK, PUBACK and PINGRESP).
const MAX_PACKET: usize = 64 * 1024;
/// Longest a connection attempt (TCP, TLS, CONNECT/CONNACK) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The keep-alive every simulated device asks for; idle ones ping at half of it.
pub const KEEP_ALIVE_S: u16 = 60;

/// One simulated device: its id, topic and TLS identity.
pub struct Device {
    pub id: String,
    topic: String,
    tls: Arc<ClientConfig>,
}

impl Device {
    pub fn new(id: String, tls: Arc<ClientConfig>) -> Device {
        Device {
            topic: format!("devices/{id}/telemetry"),
            id,
            tls,
        }
    }

    /// Opens a session: TLS with the device's certificate, CONNECT, CONNACK. Returns the
    /// stream and whatever was read past the CONNACK.
    pub async fn connect(&self, addr: SocketAddr) -> anyhow::Result<(Tls, BytesMut)> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.connect_inner(addr))
            .await
            .with_context(|| format!("{}: no CONNACK within {CONNECT_TIMEOUT:?}", self.id))?
    }

    async fn connect_inner(&self, addr: SocketAddr) -> anyhow::Result<(Tls, BytesMut)> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        let mut tls = TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await?;
        let mut connect = Connect::new(self.id.as_str());
        connect.keep_alive = KEEP_ALIVE_S;
        connect.clean_session = true;
        let mut out = BytesMut::new();
        connect.write(&mut out)?;
        tls.write_all(&out).await?;
        tls.flush().await?;
        let mut input = BytesMut::with_capacity(4096);
        loop {
            match Packet::read(&mut input, MAX_PACKET) {
                Ok(Packet::ConnAck(ack)) => {
                    if ack.code != rumqttc::mqttbytes::v4::ConnectReturnCode::Success {
                        bail!("{}: CONNACK {:?}", self.id, ack.code);
                    }
                    return Ok((tls, input));
                }
                Ok(other) => bail!("{}: {other:?} before CONNACK", self.id),
                Err(CodecError::InsufficientBytes(_)) => {
                    if tls.read_buf(&mut input).await? == 0 {
                        bail!("{}: closed before CONNACK", self.id);
                    }
                }
                Err(e) => bail!("{}: bad CONNACK: {e}", self.id),
            }
        }
    }
}

/// Appends a QoS 1 PUBLISH of `payload` on `topic` with packet id `pkid`, encoded by
/// rumqttc's codec (the one the gate reads with).
pub fn encode_publish(out: &mut BytesMut, topic: &str, pkid: u16, payload: &[u8]) {
    let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
    publish.pkid = pkid;
    // Only a topic or payload past MQTT's limits fails to encode; both are ours and small.
    let _ = publish.write(out);
}

/// A telemetry message of three metrics, about 200 bytes of JSON, stamped `ts` (ms).
pub fn payload(out: &mut Vec<u8>, ts: i64, seq: u64) {
    use std::io::Write;
    out.clear();
    let _ = write!(
        out,
        r#"{{"ts":{ts},"values":{{"temperature_celsius":{:.2},"relative_humidity_percent":{:.1},"status":"running normally; firmware 2.4.1; line {}; last service 2026-11-01; shift B; cell 4; zone north"}}}}"#,
        18.0 + (seq % 1000) as f64 / 100.0,
        35.0 + (seq % 300) as f64 / 10.0,
        seq % 8,
    );
}

/// Wall-clock milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How a phase sends.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Every device sends `per_device` messages a second, on a fixed schedule.
    Rate { per_device: f64 },
    /// Every device keeps its window full: the server's maximum.
    Saturate,
}

/// One phase of load on the connected devices.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub pace: Pace,
    /// Messages a device may have awaiting their PUBACK.
    pub window: usize,
    pub warm_up: Duration,
    pub steady: Duration,
    /// How long after the phase the devices wait for their last PUBACKs.
    pub drain: Duration,
}

/// What a phase measured, of one device or summed over the fleet.
#[derive(Debug)]
pub struct Outcome {
    /// Publish → PUBACK latency (µs) of the messages scheduled in the steady window.
    pub latency: Histogram<u64>,
    pub sent: u64,
    pub acked: u64,
    /// PUBACKs that arrived during the steady window.
    pub acked_in_steady: u64,
    /// Messages never acknowledged (connection lost, or not within the drain).
    pub unacked: u64,
    /// Devices whose connection failed during the phase.
    pub failed: u64,
}

impl Outcome {
    fn new() -> Outcome {
        Outcome {
            latency: histogram(),
            sent: 0,
            acked: 0,
            acked_in_steady: 0,
            unacked: 0,
            failed: 0,
        }
    }

    fn add(&mut self, other: &Outcome) {
        let _ = self.latency.add(&other.latency);
        self.sent += other.sent;
        self.acked += other.acked;
        self.acked_in_steady += other.acked_in_steady;
        self.unacked += other.unacked;
        self.failed += other.failed;
    }
}

pub fn histogram() -> Histogram<u64> {
    // 1 µs to 10 minutes, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// A connected device between phases.
pub struct Session {
    device: Arc<Device>,
    stream: Tls,
    input: BytesMut,
    next_pkid: u16,
    /// Last device time used, so that every message of the device has its own.
    last_ts: i64,
    seq: u64,
    /// Messages [`Session::publish_one`] had acknowledged.
    acked: u64,
}

impl Session {
    pub async fn open(device: Arc<Device>, addr: SocketAddr) -> anyhow::Result<Session> {
        let (stream, input) = device.connect(addr).await?;
        Ok(Session {
            device,
            stream,
            input,
            next_pkid: 1,
            last_ts: 0,
            seq: 0,
            acked: 0,
        })
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Publishes one message now and returns when its PUBACK arrived.
    pub async fn publish_one(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        let pkid = self.take_pkid();
        let mut out = BytesMut::new();
        encode_publish(&mut out, &self.device.topic, pkid, payload);
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        loop {
            match Packet::read(&mut self.input, MAX_PACKET) {
                Ok(Packet::PubAck(ack)) if ack.pkid == pkid => {
                    self.acked += 1;
                    return Ok(());
                }
                Ok(Packet::PubAck(_) | Packet::PingResp) => {}
                Ok(other) => bail!("{}: unexpected {other:?}", self.device.id),
                Err(CodecError::InsufficientBytes(_)) => {
                    if self.stream.read_buf(&mut self.input).await? == 0 {
                        bail!("{}: connection closed", self.device.id);
                    }
                }
                Err(e) => bail!("{}: {e}", self.device.id),
            }
        }
    }

    fn take_pkid(&mut self) -> u16 {
        let pkid = self.next_pkid;
        self.next_pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
        pkid
    }

    fn next_ts(&mut self) -> i64 {
        self.last_ts = now_ms().max(self.last_ts + 1);
        self.last_ts
    }

    /// Runs one phase on this session, from `start` (the devices' schedules are offset by
    /// `offset` within a period, so the fleet's messages are spread evenly). Returns the
    /// session (None if its connection failed) and what it measured.
    pub async fn run(
        mut self,
        phase: Phase,
        start: Instant,
        offset: f64,
    ) -> (Option<Session>, Outcome) {
        let steady_start = start + phase.warm_up;
        let end = steady_start + phase.steady;
        let shared = Window {
            in_flight: Mutex::new(HashMap::with_capacity(phase.window)),
            slots: Semaphore::new(phase.window.max(1)),
            writer_done: AtomicBool::new(false),
            wake_reader: Notify::new(),
            sent: AtomicU64::new(0),
        };
        let (reader, writer) = tokio::io::split(self.stream);
        let input = std::mem::take(&mut self.input);
        let mut sender = Sender {
            topic: &self.device.topic,
            next_pkid: self.next_pkid,
            last_ts: self.last_ts,
            seq: self.seq,
            payload: Vec::with_capacity(256),
            out: BytesMut::with_capacity(4096),
        };
        let write = sender.send(writer, &shared, phase, start, end, offset);
        let read = receive(reader, input, &shared, steady_start, end, end + phase.drain);
        let (writer, (reader, input, mut outcome)) = tokio::join!(write, read);
        outcome.sent = shared.sent.load(Ordering::Relaxed);
        let unacked = shared.in_flight.lock().map_or(0, |m| m.len() as u64);
        outcome.unacked = unacked;
        self.next_pkid = sender.next_pkid;
        self.last_ts = sender.last_ts;
        self.seq = sender.seq;
        match (writer, reader) {
            (Some(writer), Some(reader)) if unacked == 0 => {
                self.stream = reader.unsplit(writer);
                self.input = input;
                (Some(self), outcome)
            }
            _ => {
                outcome.failed = 1;
                (None, outcome)
            }
        }
    }
}

/// The messages of one device awaiting their PUBACK.
struct Window {
    /// Packet id → scheduled send time (ns since the phase's start).
    in_flight: Mutex<HashMap<u16, Instant>>,
    slots: Semaphore,
    writer_done: AtomicBool,
    wake_reader: Notify,
    sent: AtomicU64,
}

struct Sender<'a> {
    topic: &'a str,
    next_pkid: u16,
    last_ts: i64,
    seq: u64,
    payload: Vec<u8>,
    out: BytesMut,
}

impl Sender<'_> {
    /// Writes the phase's messages; returns the write half unless the connection failed.
    async fn send(
        &mut self,
        mut writer: WriteHalf<Tls>,
        window: &Window,
        phase: Phase,
        start: Instant,
        end: Instant,
        offset: f64,
    ) -> Option<WriteHalf<Tls>> {
        let result = match phase.pace {
            Pace::Rate { per_device } => {
                let period = Duration::from_secs_f64(1.0 / per_device.max(1e-3));
                self.scheduled(
                    &mut writer,
                    window,
                    period,
                    start + period.mul_f64(offset),
                    end,
                )
                .await
            }
            Pace::Saturate => self.saturate(&mut writer, window, end).await,
        };
        window.writer_done.store(true, Ordering::Release);
        window.wake_reader.notify_one();
        result.ok().map(|()| writer)
    }

    async fn scheduled(
        &mut self,
        writer: &mut WriteHalf<Tls>,
        window: &Window,
        period: Duration,
        mut next: Instant,
        end: Instant,
    ) -> std::io::Result<()> {
        while next < end {
            tokio::time::sleep_until(next.into()).await;
            let now = Instant::now();
            // Everything due goes out in one write; a message waits for a free slot in the
            // window, and its latency counts from when it was due.
            while next <= now && next < end {
                match window.slots.try_acquire() {
                    Ok(permit) => permit.forget(),
                    Err(_) => {
                        self.flush(writer).await?;
                        match window.slots.acquire().await {
                            Ok(permit) => permit.forget(),
                            Err(_) => return Ok(()),
                        }
                    }
                }
                self.push(window, next);
                next += period;
            }
            self.flush(writer).await?;
        }
        Ok(())
    }

    async fn saturate(
        &mut self,
        writer: &mut WriteHalf<Tls>,
        window: &Window,
        end: Instant,
    ) -> std::io::Result<()> {
        loop {
            let permit = tokio::select! {
                permit = window.slots.acquire() => permit,
                _ = tokio::time::sleep_until(end.into()) => return Ok(()),
            };
            let Ok(permit) = permit else { return Ok(()) };
            permit.forget();
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            self.push(window, now);
            while let Ok(permit) = window.slots.try_acquire() {
                permit.forget();
                self.push(window, now);
            }
            self.flush(writer).await?;
        }
    }

    fn push(&mut self, window: &Window, due: Instant) {
        let pkid = self.next_pkid;
        self.next_pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
        self.last_ts = now_ms().max(self.last_ts + 1);
        self.seq += 1;
        payload(&mut self.payload, self.last_ts, self.seq);
        encode_publish(&mut self.out, self.topic, pkid, &self.payload);
        if let Ok(mut in_flight) = window.in_flight.lock() {
            in_flight.insert(pkid, due);
        }
        window.sent.fetch_add(1, Ordering::Relaxed);
    }

    async fn flush(&mut self, writer: &mut WriteHalf<Tls>) -> std::io::Result<()> {
        if !self.out.is_empty() {
            writer.write_all(&self.out).await?;
            writer.flush().await?;
            self.out.clear();
        }
        Ok(())
    }
}

/// Reads PUBACKs until the writer is done and nothing is in flight, or `deadline`.
async fn receive(
    mut reader: ReadHalf<Tls>,
    mut input: BytesMut,
    window: &Window,
    steady_start: Instant,
    steady_end: Instant,
    deadline: Instant,
) -> (Option<ReadHalf<Tls>>, BytesMut, Outcome) {
    let mut outcome = Outcome::new();
    loop {
        // Every complete packet in the buffer first.
        loop {
            match Packet::read(&mut input, MAX_PACKET) {
                Ok(Packet::PubAck(ack)) => {
                    let now = Instant::now();
                    let due = window
                        .in_flight
                        .lock()
                        .ok()
                        .and_then(|mut m| m.remove(&ack.pkid));
                    let Some(due) = due else {
                        // A PUBACK for nothing in flight: the server is broken.
                        return (None, input, outcome);
                    };
                    window.slots.add_permits(1);
                    outcome.acked += 1;
                    if now >= steady_start && now < steady_end {
                        outcome.acked_in_steady += 1;
                    }
                    if due >= steady_start && due < steady_end {
                        let us = now.saturating_duration_since(due).as_micros() as u64;
                        let _ = outcome.latency.record(us.max(1));
                    }
                }
                Ok(Packet::PingResp) => {}
                Ok(_) => return (None, input, outcome),
                Err(CodecError::InsufficientBytes(_)) => break,
                Err(_) => return (None, input, outcome),
            }
        }
        let idle = window.in_flight.lock().map_or(true, |m| m.is_empty());
        if idle && window.writer_done.load(Ordering::Acquire) {
            return (Some(reader), input, outcome);
        }
        tokio::select! {
            read = reader.read_buf(&mut input) => match read {
                Ok(0) | Err(_) => return (None, input, outcome),
                Ok(_) => {}
            },
            _ = window.wake_reader.notified() => {}
            _ = tokio::time::sleep_until(deadline.into()) => return (None, input, outcome),
        }
    }
}

/// Connects every device, `concurrency` at a time (a device is tried three times). Returns
/// the sessions, in the order of `devices`.
pub async fn ramp(
    devices: &[Arc<Device>],
    addr: SocketAddr,
    concurrency: usize,
) -> anyhow::Result<Vec<Session>> {
    use futures::StreamExt;
    let sessions = futures::stream::iter(devices.iter().cloned())
        .map(|device| async move {
            let mut last = None;
            for _ in 0..3 {
                match Session::open(device.clone(), addr).await {
                    Ok(session) => return Ok(session),
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt")))
        })
        .buffered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    sessions.into_iter().collect()
}

/// Runs `phase` on every session at once from `start`; returns the sessions still
/// connected and the fleet's outcome.
pub async fn run_phase(
    sessions: Vec<Session>,
    phase: Phase,
    start: Instant,
) -> (Vec<Session>, Outcome) {
    let n = sessions.len().max(1);
    let tasks: Vec<_> = sessions
        .into_iter()
        .enumerate()
        .map(|(i, s)| tokio::spawn(s.run(phase, start, i as f64 / n as f64)))
        .collect();
    let mut outcome = Outcome::new();
    let mut kept = Vec::with_capacity(n);
    for task in tasks {
        let Ok((session, device)) = task.await else {
            outcome.failed += 1;
            continue;
        };
        kept.extend(session);
        outcome.add(&device);
    }
    (kept, outcome)
}

/// Publish → queryable: every `every` until `until`, `session` publishes a reading of
/// metric `probe` with its own device time, and `latest` (the newest `probe` time the
/// server answers a query with) is asked every millisecond until it shows that reading.
/// Returns the latencies (µs) and how many probes never showed up within 10 s.
pub async fn probe<F, Fut>(
    session: &mut Session,
    latest: F,
    every: Duration,
    until: Instant,
) -> (Histogram<u64>, u64)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<i64>>>,
{
    let mut latency = histogram();
    let mut missed = 0;
    let mut body = Vec::new();
    while Instant::now() + every < until {
        let next = Instant::now() + every;
        let ts = session.next_ts();
        session.seq += 1;
        body.clear();
        body.extend_from_slice(
            format!(r#"{{"ts":{ts},"values":{{"probe":{}}}}}"#, session.seq).as_bytes(),
        );
        let sent = Instant::now();
        let publish = session.publish_one(&body);
        let seen = async {
            let give_up = sent + Duration::from_secs(10);
            while Instant::now() < give_up {
                if matches!(latest().await, Ok(Some(t)) if t >= ts) {
                    return Some(sent.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            None
        };
        let (published, seen) = tokio::join!(publish, seen);
        match (published, seen) {
            (Ok(()), Some(took)) => {
                let _ = latency.record((took.as_micros() as u64).max(1));
            }
            _ => missed += 1,
        }
        tokio::time::sleep_until(next.into()).await;
    }
    (latency, missed)
}

/// Devices that stay connected and idle, reconnecting as the device SDK does when their
/// connection drops (backoff from 0.5 s doubling to 30 s, each delay drawn from its upper
/// half; starting over after a connection that lasted 10 s).
#[derive(Default)]
pub struct Holders {
    pub online: AtomicU64,
    pub connects: AtomicU64,
    pub failures: AtomicU64,
    /// Failed attempts by what went wrong (the error's first words).
    failure_kinds: Mutex<std::collections::BTreeMap<String, u64>>,
    last_online: Mutex<Option<Instant>>,
}

impl Holders {
    /// Failed attempts by kind.
    pub fn failure_kinds(&self) -> std::collections::BTreeMap<String, u64> {
        self.failure_kinds
            .lock()
            .map(|k| k.clone())
            .unwrap_or_default()
    }

    fn failed(&self, e: &anyhow::Error) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        // The root cause without the device's id, which the outer context names.
        let kind: String = e.root_cause().to_string().chars().take(60).collect();
        let kind = kind.split(": ").last().unwrap_or_default().to_owned();
        if let Ok(mut kinds) = self.failure_kinds.lock() {
            *kinds.entry(kind).or_insert(0) += 1;
        }
    }

    /// When a device last came online.
    pub fn last_online(&self) -> Option<Instant> {
        self.last_online.lock().ok().and_then(|t| *t)
    }

    /// Keeps `device` online until `stop`; its first attempt waits for a permit of `first`.
    pub async fn hold(
        self: Arc<Self>,
        device: Arc<Device>,
        addr: SocketAddr,
        first: Arc<Semaphore>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut permit = first.acquire_owned().await.ok();
        let mut failures = 0u32;
        while !stop.is_cancelled() {
            let attempt = tokio::select! {
                attempt = device.connect(addr) => attempt,
                _ = stop.cancelled() => return,
            };
            drop(permit.take());
            let (mut stream, mut input) = match attempt {
                Ok(connected) => connected,
                Err(e) => {
                    self.failed(&e);
                    failures += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(failures)) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            };
            let since = Instant::now();
            self.connects.fetch_add(1, Ordering::Relaxed);
            self.online.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut last) = self.last_online.lock() {
                *last = Some(since);
            }
            let ping = Duration::from_secs(u64::from(KEEP_ALIVE_S) / 2);
            let stopped = loop {
                tokio::select! {
                    read = stream.read_buf(&mut input) => match read {
                        Ok(n) if n > 0 => input.clear(),
                        _ => break false,
                    },
                    _ = tokio::time::sleep(ping) => {
                        if stream.write_all(&[0xC0, 0x00]).await.is_err() {
                            break false;
                        }
                    }
                    _ = stop.cancelled() => break true,
                }
            };
            self.online.fetch_sub(1, Ordering::SeqCst);
            if stopped {
                let _ = stream.write_all(&[0xE0, 0x00]).await;
                let _ = stream.shutdown().await;
                return;
            }
            // Dropped by the server: try again after the first backoff step, or a later
            // one if the connection did not last.
            failures = if since.elapsed() >= Duration::from_secs(10) {
                0
            } else {
                failures
            };
            failures += 1;
            tokio::select! {
                _ = tokio::time::sleep(backoff(failures)) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// The wait before the next attempt after `failures` failed ones (at least 1): 0.5 s doubling
/// up to 30 s, drawn from the upper half.
fn backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(500)
        .saturating_mul(1 << (failures.clamp(1, 7) - 1))
        .min(Duration::from_secs(30));
    base.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_a_publish_of_about_200_bytes_with_three_metrics() {
        let mut body = Vec::new();
        payload(&mut body, 1_764_000_000_123, 7);
        assert!((180..=220).contains(&body.len()), "{} bytes", body.len());
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["ts"], 1_764_000_000_123i64);
        assert_eq!(json["values"].as_object().unwrap().len(), 3);

        let mut out = BytesMut::new();
        encode_publish(&mut out, "devices/dev-00007/telemetry", 513, &body);
        match Packet::read(&mut out, MAX_PACKET).unwrap() {
            Packet::Publish(p) => {
                assert_eq!(p.pkid, 513);
                assert_eq!(p.qos, QoS::AtLeastOnce);
                assert_eq!(p.topic, "devices/dev-00007/telemetry");
                assert_eq!(&p.payload[..], &body[..]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backoff_doubles_from_half_a_second_to_thirty_within_the_upper_half() {
        for (failures, base) in [(1, 0.5), (2, 1.0), (3, 2.0), (7, 30.0), (40, 30.0)] {
            let d = backoff(failures).as_secs_f64();
            assert!(d >= base / 2.0 && d <= base, "{failures}: {d}");
        }
    }
}
