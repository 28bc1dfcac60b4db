//! The ingest pipeline: from the gate's hand-off channel to a committed batch.
//!
//! One OS thread (SQLite calls block) runs [`Ingest`]: it waits for a message, then takes
//! whatever else is already queued, up to `max_batch`, decodes it, and commits the whole
//! batch in one transaction. While a commit runs, new messages queue up in the bounded
//! channel, so the batch size follows the load: one fsync serves many messages (group
//! commit), and an idle system commits a lone message at once.
//!
//! Only after the commit returns are the gate's completion handles resolved; a failed commit
//! resolves them with an error and the gate does not acknowledge. Every message is counted:
//! received, stored, dead-lettered, or failed.
//!
//! Between commits the same thread runs the store's housekeeping, which keeps each call
//! short (the embedded store merges a chunk at a time) and says when to call again: at once
//! while it has more to do, and then messages that wait are committed first.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Instant,
};

use tellus_core::{
    handoff::IngestReceiver,
    live::{LiveEvent, LivePoint},
    telemetry,
    topic::DeviceTopic,
    DeviceId, Durable, IngestError, IngestRequest, InputKind, Live, RuleFeed, RuleInput,
    TimestampMs, Trigger,
};
use tokio::sync::mpsc::error::TryRecvError;
use tracing::{debug, error};

use crate::store::{Batch, DeadLetter, TelemetryStore};

/// Tuning of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Capacity of the channel from the gate; when full, the gate stops reading sockets.
    pub queue_capacity: usize,
    /// Most messages committed in one transaction.
    pub max_batch: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            queue_capacity: 4096,
            max_batch: 1024,
        }
    }
}

/// Counters of everything ingest has seen. Each message ends in exactly one of `stored`,
/// `deadlettered` or `failed`.
#[derive(Debug, Default)]
pub struct IngestStats {
    received: AtomicU64,
    stored: AtomicU64,
    samples: AtomicU64,
    deadlettered: AtomicU64,
    failed: AtomicU64,
    commits: AtomicU64,
    /// Dead-lettered messages by the kind of their reason.
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// How long commits take, from the start of the transaction to its durable end.
    commit_latency: Histogram,
    /// How long each housekeeping call held the ingest thread (nothing is committed
    /// meanwhile, so this is what it adds to the wait for a PUBACK).
    housekeeping_latency: Histogram,
}

/// Upper bounds, in ms, of the latency histograms' buckets (commits and housekeeping; a
/// last one holds the rest).
pub const COMMIT_LATENCY_BOUNDS_MS: [u64; 12] =
    [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];

/// Counts of durations by bucket, with their sum.
#[derive(Debug, Default)]
struct Histogram {
    counts: [AtomicU64; COMMIT_LATENCY_BOUNDS_MS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    fn record(&self, took: std::time::Duration) {
        let ms = took.as_millis() as u64;
        let at = COMMIT_LATENCY_BOUNDS_MS
            .iter()
            .position(|bound| ms < *bound)
            .unwrap_or(COMMIT_LATENCY_BOUNDS_MS.len());
        self.counts[at].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let buckets = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                cumulative += c.load(Ordering::Relaxed);
                LatencyBucket {
                    le_ms: COMMIT_LATENCY_BOUNDS_MS.get(i).copied(),
                    count: cumulative,
                }
            })
            .collect();
        HistogramSnapshot {
            buckets,
            count: cumulative,
            sum_ms: self.sum_us.load(Ordering::Relaxed) as f64 / 1000.0,
        }
    }
}

/// A histogram at one moment, cumulative like Prometheus's: each bucket counts the
/// durations below its bound (`null`: all of them).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistogramSnapshot {
    pub buckets: Vec<LatencyBucket>,
    pub count: u64,
    pub sum_ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LatencyBucket {
    pub le_ms: Option<u64>,
    pub count: u64,
}

/// A copy of [`IngestStats`] at one moment.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IngestStatsSnapshot {
    pub received: u64,
    pub stored: u64,
    pub samples: u64,
    pub deadlettered: u64,
    pub failed: u64,
    pub commits: u64,
    pub rejected: BTreeMap<&'static str, u64>,
    pub commit_latency: HistogramSnapshot,
    pub housekeeping_latency: HistogramSnapshot,
}

impl IngestStats {
    pub fn snapshot(&self) -> IngestStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IngestStatsSnapshot {
            received: get(&self.received),
            stored: get(&self.stored),
            samples: get(&self.samples),
            deadlettered: get(&self.deadlettered),
            failed: get(&self.failed),
            commits: get(&self.commits),
            rejected: self.rejected.lock().map(|r| r.clone()).unwrap_or_default(),
            commit_latency: self.commit_latency.snapshot(),
            housekeeping_latency: self.housekeeping_latency.snapshot(),
        }
    }

    fn reject(&self, kind: &'static str) {
        if let Ok(mut r) = self.rejected.lock() {
            *r.entry(kind).or_insert(0) += 1;
        }
    }
}

/// The running pipeline. It stops once every `IngestSender` is dropped and the channel is
/// drained; [`Ingest::finished`] waits for that.
pub struct Ingest {
    stats: Arc<IngestStats>,
    thread: thread::JoinHandle<()>,
}

impl Ingest {
    /// Runs the pipeline; every committed batch's points also go to `live`, and its
    /// readings to `rules` (before they are acknowledged).
    pub fn spawn(
        rx: IngestReceiver,
        store: Arc<dyn TelemetryStore>,
        config: IngestConfig,
        live: Live,
        rules: RuleFeed,
    ) -> std::io::Result<Ingest> {
        let stats = Arc::new(IngestStats::default());
        let worker = Worker {
            store,
            stats: stats.clone(),
            max_batch: config.max_batch.max(1),
            last_server_ts: HashMap::new(),
            rejected: Vec::new(),
            live,
            rules,
        };
        let thread = thread::Builder::new()
            .name("ingest".into())
            .spawn(move || worker.run(rx))?;
        Ok(Ingest { stats, thread })
    }

    pub fn stats(&self) -> Arc<IngestStats> {
        self.stats.clone()
    }

    /// Waits until the pipeline has committed everything it was given and stopped.
    pub async fn finished(self) {
        let thread = self.thread;
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => error!("ingest thread panicked"),
        }
    }
}

type Completion = tokio::sync::oneshot::Sender<Result<Durable, IngestError>>;

/// How far ahead of the server's clock a device may stamp a point; a message with a point
/// further ahead is dead-lettered.
pub const MAX_AHEAD_MS: TimestampMs = 86_400_000;

struct Worker {
    store: Arc<dyn TelemetryStore>,
    stats: Arc<IngestStats>,
    max_batch: usize,
    /// The last server timestamp given to each device's values, so that two messages (or two
    /// objects of one message) that carry no device time never share a millisecond and
    /// overwrite each other.
    /// Bounded by the number of devices that publish.
    last_server_ts: HashMap<DeviceId, TimestampMs>,
    /// The kinds of the dead letters of the batch being committed, counted once it is.
    rejected: Vec<&'static str>,
    live: Live,
    /// Where committed readings go for rules; it makes this thread wait when full, and the
    /// readings' messages are acknowledged only after.
    rules: RuleFeed,
}

impl Worker {
    fn run(mut self, mut rx: IngestReceiver) {
        // A runtime of this thread's own, only to wait for the channel or the store's next
        // housekeeping, whichever comes first; every store call blocks this thread.
        let timer = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(
                |e| error!(error = %e, "ingest has no timer; housekeeping runs after commits only"),
            )
            .ok();
        let mut requests = Vec::with_capacity(self.max_batch);
        let mut next_housekeeping = self.housekeeping();
        loop {
            let first = match (&timer, next_housekeeping) {
                // More housekeeping at once (a merge under way): a message that waits goes
                // first, else the next step; once the store says to wait, this thread waits.
                (_, Some(wait)) if wait.is_zero() => match rx.try_recv() {
                    Ok(r) => Some(Some(r)),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => Some(None),
                },
                (Some(timer), Some(wait)) => {
                    timer.block_on(async { tokio::time::timeout(wait, rx.recv()).await.ok() })
                }
                _ => Some(rx.blocking_recv()),
            };
            match first {
                // Time for housekeeping.
                None => {}
                // Closed and drained. What is left in the head (or of a merge under way) is
                // merged at the next start.
                Some(None) => break,
                Some(Some(first)) => {
                    requests.push(first);
                    while requests.len() < self.max_batch {
                        match rx.try_recv() {
                            Ok(r) => requests.push(r),
                            Err(_) => break,
                        }
                    }
                    self.commit(&mut requests);
                }
            }
            next_housekeeping = self.housekeeping();
        }
        debug!("ingest channel closed and drained");
    }

    /// Runs the store's housekeeping if it is due; returns when to run it next.
    fn housekeeping(&self) -> Option<std::time::Duration> {
        let started = Instant::now();
        let done = self.store.maintain(tellus_core::now_ms());
        self.stats.housekeeping_latency.record(started.elapsed());
        match done {
            Ok(next) => next,
            Err(e) => {
                // Nothing acknowledged is at risk (it is committed); retried soon.
                error!(error = %e, "store housekeeping failed; retrying in a second");
                Some(std::time::Duration::from_secs(1))
            }
        }
    }

    fn commit(&mut self, requests: &mut Vec<IngestRequest>) {
        let n = requests.len() as u64;
        self.stats.received.fetch_add(n, Ordering::Relaxed);
        let mut batch = Batch::default();
        let mut outcomes: Vec<(Option<Completion>, Durable)> = Vec::with_capacity(requests.len());
        // Payload bytes stay counted against the hand-off's budget until the commit is over,
        // so the batch in memory is bounded by that budget too.
        let mut budget = Vec::with_capacity(requests.len());
        for req in requests.drain(..) {
            let outcome = self.decode(&req, &mut batch);
            outcomes.push((req.done, outcome));
            budget.push(req.budget);
        }
        let started = Instant::now();
        let committed = self.store.commit(&batch);
        self.stats.commit_latency.record(started.elapsed());
        drop(budget);
        match committed {
            Ok(()) => {
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .samples
                    .fetch_add(batch.samples.len() as u64, Ordering::Relaxed);
                for kind in self.rejected.drain(..) {
                    self.stats.reject(kind);
                }
                let dead = batch.deadletters.len() as u64;
                self.stats.deadlettered.fetch_add(dead, Ordering::Relaxed);
                self.tell_live(&batch);
                self.tell_rules(&batch);
                self.stats.stored.fetch_add(n - dead, Ordering::Relaxed);
                for (done, outcome) in outcomes {
                    if let Some(done) = done {
                        // The gate may have gone (device disconnected): nothing to tell then.
                        let _ = done.send(Ok(outcome));
                    }
                }
            }
            Err(e) => {
                error!(error = %e, messages = n, "commit failed; messages not acknowledged");
                self.stats.failed.fetch_add(n, Ordering::Relaxed);
                self.rejected.clear();
                let err = IngestError::Storage(e.to_string());
                for (done, _) in outcomes {
                    if let Some(done) = done {
                        let _ = done.send(Err(err.clone()));
                    }
                }
            }
        }
    }

    /// Hands the committed readings to the rules, all in one hand-over: one input per device
    /// and timestamp (the metrics of one reading), in commit order.
    fn tell_rules(&self, batch: &Batch) {
        if !self.rules.wants(Trigger::Telemetry) {
            return;
        }
        let now = tellus_core::now_ms();
        let mut inputs: Vec<RuleInput> = Vec::new();
        for (device, sample) in &batch.samples {
            if let Some(RuleInput {
                device: d,
                kind: InputKind::Telemetry { ts_ms, metrics },
                ..
            }) = inputs.last_mut()
            {
                if d == device && *ts_ms == sample.ts_ms {
                    metrics.push((sample.metric.clone(), sample.value.clone()));
                    continue;
                }
            }
            inputs.push(RuleInput {
                device: device.clone(),
                at_ms: now,
                kind: InputKind::Telemetry {
                    ts_ms: sample.ts_ms,
                    metrics: vec![(sample.metric.clone(), sample.value.clone())],
                },
            });
        }
        self.rules.blocking_send(inputs);
    }

    /// Sends the committed points to the live feed, one event per device in the batch.
    fn tell_live(&self, batch: &Batch) {
        if !self.live.listened() {
            return;
        }
        // In the order devices first appear in the batch.
        let mut at: HashMap<&DeviceId, usize> = HashMap::new();
        let mut by_device: Vec<(&DeviceId, Vec<LivePoint>)> = Vec::new();
        for (device, sample) in &batch.samples {
            let i = *at.entry(device).or_insert_with(|| {
                by_device.push((device, Vec::new()));
                by_device.len() - 1
            });
            by_device[i].1.push(sample.into());
        }
        for (device, points) in by_device {
            self.live.send(LiveEvent::Telemetry {
                device: device.clone(),
                points,
            });
        }
    }

    /// Adds the message's samples, or the message as a dead letter, to `batch`.
    fn decode(&mut self, req: &IngestRequest, batch: &mut Batch) -> Durable {
        let last = self.last_server_ts.entry(req.device.clone()).or_insert(0);
        let mut server_time = || {
            *last = req.received_at_ms.max(*last + 1);
            *last
        };
        let decoded = match req.topic {
            DeviceTopic::Telemetry => telemetry::decode_json(&req.payload, &mut server_time)
                .map_err(|e| (e.kind(), e.to_string())),
            DeviceTopic::TelemetryPb => telemetry::decode_protobuf(&req.payload, &mut server_time)
                .map_err(|e| (e.kind(), e.to_string())),
            // The gate hands over telemetry topics only.
            ref other => Err((
                "not_telemetry",
                format!("{} is not a telemetry topic", other.topic(&req.device)),
            )),
        };
        // A device clock far ahead would stamp points no retention reaches for years.
        let decoded = decoded.and_then(|samples| {
            let limit = req.received_at_ms.saturating_add(MAX_AHEAD_MS);
            match samples.iter().find(|s| s.ts_ms > limit) {
                Some(s) => Err((
                    "too_far_ahead",
                    format!(
                        "metric {:?} is stamped {} ms, more than a day ahead of the server's clock",
                        s.metric, s.ts_ms
                    ),
                )),
                None => Ok(samples),
            }
        });
        match decoded {
            Ok(samples) => {
                batch
                    .samples
                    .extend(samples.into_iter().map(|s| (req.device.clone(), s)));
                Durable::Stored
            }
            Err((kind, reason)) => {
                debug!(device_id = %req.device, %reason, "telemetry dead-lettered");
                self.rejected.push(kind);
                batch.deadletters.push(DeadLetter {
                    id: 0,
                    received_at_ms: req.received_at_ms,
                    device: req.device.clone(),
                    topic: req.topic.topic(&req.device),
                    reason: reason.clone(),
                    payload: req.payload.to_vec(),
                    payload_size: req.payload.len(),
                });
                Durable::DeadLettered(reason)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tellus_core::{IngestSender, Value};

    use super::*;
    use crate::store::{Bucket, Durability, SqliteStore, StoreError};

    #[tokio::test]
    async fn acknowledged_means_queryable_and_bad_payloads_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn TelemetryStore> =
            Arc::new(SqliteStore::open(&dir.path().join("t.db"), Durability::Fsync).unwrap());
        let (tx, rx) = IngestSender::channel(8, 1 << 20);
        let live = tellus_core::Live::default();
        let mut feed = live.listen();
        let (rules, mut readings) = RuleFeed::channel(1_024, 1 << 20);
        rules.set_wanted(Trigger::Telemetry, true);
        let ingest =
            Ingest::spawn(rx, store.clone(), IngestConfig::default(), live, rules).unwrap();
        let d = DeviceId::parse("d1").unwrap();
        let submit = |topic: DeviceTopic, payload: Vec<u8>| {
            tx.submit(d.clone(), topic, Bytes::from(payload), 1_000, true)
        };
        let json = |payload: &str| submit(DeviceTopic::Telemetry, payload.as_bytes().to_vec());
        // Same receive time: each message gets the next millisecond, not an overwrite, in
        // either format.
        let a = json(r#"{"t": 1}"#).await.unwrap().unwrap();
        let b = json(r#"{"t": 2}"#).await.unwrap().unwrap();
        let c = json("not json").await.unwrap().unwrap();
        use tellus_core::telemetry::proto::{point::Value as Pb, Point, TelemetryBatch};
        let batch = TelemetryBatch {
            points: vec![Point {
                metric: "t".into(),
                ts_ms: 0,
                value: Some(Pb::DoubleValue(2.5)),
            }],
        };
        let pb = submit(
            DeviceTopic::TelemetryPb,
            prost::Message::encode_to_vec(&batch),
        );
        let pb = pb.await.unwrap().unwrap();
        let bad_pb = submit(DeviceTopic::TelemetryPb, b"\xff".to_vec());
        let bad_pb = bad_pb.await.unwrap().unwrap();
        let ahead = json(r#"{"ts": 86401001, "values": {"t": 9}}"#);
        let ahead = ahead.await.unwrap().unwrap();
        assert_eq!(a.await.unwrap(), Ok(Durable::Stored));
        assert_eq!(b.await.unwrap(), Ok(Durable::Stored));
        assert!(matches!(c.await.unwrap(), Ok(Durable::DeadLettered(_))));
        assert_eq!(pb.await.unwrap(), Ok(Durable::Stored));
        match bad_pb.await.unwrap() {
            Ok(Durable::DeadLettered(why)) => assert!(why.contains("protobuf"), "{why}"),
            other => panic!("{other:?}"),
        }
        match ahead.await.unwrap() {
            Ok(Durable::DeadLettered(why)) => assert!(why.contains("ahead"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            store.range(&d, "t", 0, 10_000, 10).unwrap(),
            vec![
                (1_000, Value::Int(1)),
                (1_001, Value::Int(2)),
                (1_002, Value::Float(2.5))
            ]
        );
        let dead = store.deadletters(None, 10).unwrap();
        assert_eq!(dead[1].payload, b"\xff");
        // Each committed message reached the live feed, in commit order.
        let mut live = Vec::new();
        while let Ok(LiveEvent::Telemetry { device, points }) = feed.try_recv() {
            assert_eq!(device, d);
            live.extend(points.into_iter().map(|p| (p.ts, p.value)));
        }
        assert_eq!(
            live,
            [
                (1_000, Value::Int(1)),
                (1_001, Value::Int(2)),
                (1_002, Value::Float(2.5))
            ]
        );
        // And to the rules, one reading each, before they were acknowledged.
        let mut readings_seen = Vec::new();
        while let Some(inputs) = readings.try_recv() {
            for input in inputs {
                let InputKind::Telemetry { ts_ms, metrics } = input.kind else {
                    panic!("{input:?}")
                };
                readings_seen.push((ts_ms, metrics));
            }
        }
        assert_eq!(
            readings_seen,
            [
                (1_000, vec![("t".to_string(), Value::Int(1))]),
                (1_001, vec![("t".to_string(), Value::Int(2))]),
                (1_002, vec![("t".to_string(), Value::Float(2.5))])
            ]
        );
        assert_eq!(dead[2].payload, b"not json");
        drop(tx);
        let stats = ingest.stats();
        ingest.finished().await;
        let s = stats.snapshot();
        assert_eq!(
            (s.received, s.stored, s.deadlettered, s.failed),
            (6, 3, 3, 0)
        );
        let rejected: Vec<_> = s.rejected.into_iter().collect();
        assert_eq!(
            rejected,
            [("not_json", 1), ("not_protobuf", 1), ("too_far_ahead", 1)]
        );
        // Every commit was timed, each in one bucket (the counts are cumulative).
        assert_eq!(s.commit_latency.count, s.commits);
        let counts: Vec<u64> = s.commit_latency.buckets.iter().map(|b| b.count).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
        assert!(s.commit_latency.sum_ms > 0.0);
        // And so was every housekeeping call, at least the one after each commit.
        assert!(s.housekeeping_latency.count >= s.commits);
    }

    /// A store whose housekeeping has `STEPS` steps to do after the first commit, each
    /// taking `STEP`, and that records the order of the calls.
    #[derive(Default)]
    struct Steps {
        calls: Mutex<Vec<&'static str>>,
        left: AtomicU64,
    }

    const STEPS: u64 = 5;
    const STEP: std::time::Duration = std::time::Duration::from_millis(50);

    impl Steps {
        fn calls(&self) -> Vec<&'static str> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl TelemetryStore for Steps {
        fn commit(&self, _: &Batch) -> Result<(), StoreError> {
            let mut calls = self.calls.lock().unwrap();
            if !calls.contains(&"commit") {
                self.left.store(STEPS, Ordering::Relaxed);
            }
            calls.push("commit");
            Ok(())
        }

        fn maintain(&self, _: TimestampMs) -> Result<Option<std::time::Duration>, StoreError> {
            self.calls.lock().unwrap().push("maintain");
            if self.left.load(Ordering::Relaxed) == 0 {
                return Ok(Some(std::time::Duration::from_secs(3600)));
            }
            self.left.fetch_sub(1, Ordering::Relaxed);
            thread::sleep(STEP);
            Ok(Some(std::time::Duration::ZERO))
        }

        fn range(
            &self,
            _: &DeviceId,
            _: &str,
            _: TimestampMs,
            _: TimestampMs,
            _: usize,
        ) -> Result<Vec<(TimestampMs, Value)>, StoreError> {
            Ok(vec![])
        }

        fn buckets(
            &self,
            _: &DeviceId,
            _: &str,
            _: TimestampMs,
            _: TimestampMs,
            _: i64,
        ) -> Result<Vec<Bucket>, StoreError> {
            Ok(vec![])
        }

        fn resolutions(&self) -> &[i64] {
            &[]
        }

        fn latest(&self, _: &DeviceId) -> Result<Vec<(String, TimestampMs, Value)>, StoreError> {
            Ok(vec![])
        }

        fn latest_of_metric(
            &self,
            _: &str,
            _: Option<&DeviceId>,
            _: usize,
        ) -> Result<Vec<(DeviceId, TimestampMs, Value)>, StoreError> {
            Ok(vec![])
        }

        fn deadletters(&self, _: Option<i64>, _: usize) -> Result<Vec<DeadLetter>, StoreError> {
            Ok(vec![])
        }

        fn deadletter(&self, _: i64) -> Result<Option<DeadLetter>, StoreError> {
            Ok(None)
        }
    }

    #[tokio::test]
    async fn housekeeping_with_more_to_do_lets_waiting_messages_go_first_then_rests() {
        let store = Arc::new(Steps::default());
        let (tx, rx) = IngestSender::channel(8, 1 << 20);
        let (rules, _readings) = RuleFeed::channel(16, 1 << 20);
        let ingest = Ingest::spawn(
            rx,
            store.clone(),
            IngestConfig::default(),
            tellus_core::Live::default(),
            rules,
        )
        .unwrap();
        let d = DeviceId::parse("d1").unwrap();
        let submit = || {
            let payload = Bytes::from_static(br#"{"t": 1}"#);
            tx.submit(d.clone(), DeviceTopic::Telemetry, payload, 1_000, true)
        };
        let first = submit().await.unwrap().unwrap();
        assert_eq!(first.await.unwrap(), Ok(Durable::Stored));
        // The first commit started housekeeping of several steps; this message arrives
        // during the first and is committed right after it, not after all of them.
        let second = submit().await.unwrap().unwrap();
        assert_eq!(second.await.unwrap(), Ok(Durable::Stored));
        // Once the store says to wait, the thread waits: no more calls.
        tokio::time::sleep(STEP * (STEPS as u32 + 4)).await;
        let calls = store.calls();
        assert_eq!(
            calls,
            [
                "maintain", "commit", "maintain", "commit", "maintain", "maintain", "maintain",
                "maintain", "maintain"
            ]
        );
        drop(tx);
        let stats = ingest.stats();
        ingest.finished().await;
        let s = stats.snapshot();
        // Every call was timed, the steps at their length.
        assert_eq!(s.housekeeping_latency.count, 7);
        assert!(s.housekeeping_latency.sum_ms >= (STEP * STEPS as u32).as_millis() as f64);
    }
}
