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

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
};

use tellus_core::{
    handoff::IngestReceiver, telemetry, topic::DeviceTopic, DeviceId, Durable, IngestError,
    IngestRequest, TimestampMs,
};
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
}

/// A copy of [`IngestStats`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IngestStatsSnapshot {
    pub received: u64,
    pub stored: u64,
    pub samples: u64,
    pub deadlettered: u64,
    pub failed: u64,
    pub commits: u64,
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
    pub fn spawn(
        rx: IngestReceiver,
        store: Arc<dyn TelemetryStore>,
        config: IngestConfig,
    ) -> std::io::Result<Ingest> {
        let stats = Arc::new(IngestStats::default());
        let worker = Worker {
            store,
            stats: stats.clone(),
            max_batch: config.max_batch.max(1),
            last_server_ts: HashMap::new(),
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

struct Worker {
    store: Arc<dyn TelemetryStore>,
    stats: Arc<IngestStats>,
    max_batch: usize,
    /// The last server timestamp given to each device's values, so that two messages (or two
    /// objects of one message) that carry no device time never share a millisecond and
    /// overwrite each other.
    /// Bounded by the number of devices that publish.
    last_server_ts: HashMap<DeviceId, TimestampMs>,
}

impl Worker {
    fn run(mut self, mut rx: IngestReceiver) {
        let mut requests = Vec::with_capacity(self.max_batch);
        while let Some(first) = rx.blocking_recv() {
            requests.push(first);
            while requests.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(r) => requests.push(r),
                    Err(_) => break,
                }
            }
            self.commit(&mut requests);
        }
        debug!("ingest channel closed and drained");
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
        let committed = self.store.commit(&batch);
        drop(budget);
        match committed {
            Ok(()) => {
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .samples
                    .fetch_add(batch.samples.len() as u64, Ordering::Relaxed);
                let dead = batch.deadletters.len() as u64;
                self.stats.deadlettered.fetch_add(dead, Ordering::Relaxed);
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
                let err = IngestError::Storage(e.to_string());
                for (done, _) in outcomes {
                    if let Some(done) = done {
                        let _ = done.send(Err(err.clone()));
                    }
                }
            }
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
            DeviceTopic::Telemetry => {
                telemetry::decode_json(&req.payload, &mut server_time).map_err(|e| e.to_string())
            }
            DeviceTopic::TelemetryPb => telemetry::decode_protobuf(&req.payload, &mut server_time)
                .map_err(|e| e.to_string()),
            // The gate hands over telemetry topics only.
            ref other => Err(format!(
                "{} is not a telemetry topic",
                other.topic(&req.device)
            )),
        };
        match decoded {
            Ok(samples) => {
                batch
                    .samples
                    .extend(samples.into_iter().map(|s| (req.device.clone(), s)));
                Durable::Stored
            }
            Err(reason) => {
                debug!(device_id = %req.device, %reason, "telemetry dead-lettered");
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
    use crate::store::{Durability, SqliteStore};

    #[tokio::test]
    async fn acknowledged_means_queryable_and_bad_payloads_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn TelemetryStore> =
            Arc::new(SqliteStore::open(&dir.path().join("t.db"), Durability::Fsync).unwrap());
        let (tx, rx) = IngestSender::channel(8, 1 << 20);
        let ingest = Ingest::spawn(rx, store.clone(), IngestConfig::default()).unwrap();
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
        assert_eq!(a.await.unwrap(), Ok(Durable::Stored));
        assert_eq!(b.await.unwrap(), Ok(Durable::Stored));
        assert!(matches!(c.await.unwrap(), Ok(Durable::DeadLettered(_))));
        assert_eq!(pb.await.unwrap(), Ok(Durable::Stored));
        match bad_pb.await.unwrap() {
            Ok(Durable::DeadLettered(why)) => assert!(why.contains("protobuf"), "{why}"),
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
        assert_eq!(dead[0].payload, b"\xff");
        assert_eq!(dead[1].payload, b"not json");
        drop(tx);
        let stats = ingest.stats();
        ingest.finished().await;
        let s = stats.snapshot();
        assert_eq!(
            (s.received, s.stored, s.deadlettered, s.failed),
            (5, 3, 2, 0)
        );
    }
}
