//! The telemetry store: the [`TelemetryStore`] trait, what it answers with, the embedded
//! implementation ([`SqliteStore`], in `store/embedded.rs`, where its layout is described)
//! and the QuestDB one ([`QuestDbStore`], in `store/questdb.rs`).
//!
//! A value keeps its type: `kind` says whether the stored SQLite value is a bool, an integer,
//! a float or text. Aggregates ([`Bucket`]) summarise numbers, and booleans as 0 and 1.

use std::time::Duration;

use tellus_core::{DeviceId, Sample, TimestampMs, Value};

mod embedded;
mod questdb;

pub use self::questdb::{QuestDbConfig, QuestDbStore, SpoolStats};
pub use embedded::{Retention, SqliteStore, StoreConfig};

/// How hard a commit works to survive a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync on every commit: an acknowledged message survives power loss.
    #[default]
    Fsync,
    /// Leave flushing to the OS: an acknowledged message survives the process being killed,
    /// but the last moments before a power loss may be lost. Faster on slow disks.
    Os,
}

impl Durability {
    pub(crate) fn synchronous(self) -> &'static str {
        match self {
            Durability::Fsync => "FULL",
            Durability::Os => "NORMAL",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store lock poisoned")]
    Poisoned,
    /// New points wait for a merge that keeps failing (a full disk, say): commits are
    /// refused, and so not acknowledged, until it succeeds, so memory stays bounded.
    #[error("{0} points wait for a merge into the store; refusing more until it succeeds")]
    Backlog(usize),
    /// The store's backend (QuestDB) could not be reached, or answered that it cannot now.
    #[error("{0}")]
    Unavailable(String),
    /// The store's backend (QuestDB) refused a query.
    #[error("{0}")]
    Query(String),
    #[error("store configuration: {0}")]
    Config(String),
}

/// A payload that was not valid telemetry, kept raw with its reason.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeadLetter {
    /// Assigned by the store; 0 before it is committed.
    pub id: i64,
    pub received_at_ms: TimestampMs,
    pub device: DeviceId,
    pub topic: String,
    pub reason: String,
    /// The raw payload; from [`TelemetryStore::deadletters`], only its first
    /// [`DEADLETTER_PREVIEW_BYTES`].
    #[serde(skip)]
    pub payload: Vec<u8>,
    /// Length of the whole payload in bytes, even when `payload` holds only a preview.
    pub payload_size: usize,
}

/// How many leading bytes of each payload [`TelemetryStore::deadletters`] returns.
pub const DEADLETTER_PREVIEW_BYTES: usize = 1024;

/// The summary of one metric's values in one time bucket. Numbers are aggregated, and
/// booleans as 0 and 1; text values are not (a bucket of text only has no summary).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Bucket {
    /// The bucket's start: a multiple of its width since the Unix epoch.
    pub start: TimestampMs,
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// The value with the earliest timestamp in the bucket.
    pub first: f64,
    /// The value with the latest timestamp in the bucket.
    pub last: f64,
}

/// How a bucket is summarised into one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Agg {
    Avg,
    Min,
    Max,
    Sum,
    Count,
    First,
    Last,
}

impl Bucket {
    /// A bucket holding one value at `ts`.
    pub fn of(start: TimestampMs, value: f64) -> Bucket {
        Bucket {
            start,
            count: 1,
            sum: value,
            min: value,
            max: value,
            first: value,
            last: value,
        }
    }

    /// Adds `later`, whose values all come after this bucket's (same start).
    #[cfg(test)]
    fn merge(&mut self, later: &Bucket) {
        self.count += later.count;
        self.sum += later.sum;
        self.min = self.min.min(later.min);
        self.max = self.max.max(later.max);
        self.last = later.last;
    }

    /// The bucket summarised by `agg`: a count is an integer, the rest are numbers.
    pub fn get(&self, agg: Agg) -> Value {
        match agg {
            Agg::Avg => Value::Float(self.sum / self.count.max(1) as f64),
            Agg::Min => Value::Float(self.min),
            Agg::Max => Value::Float(self.max),
            Agg::Sum => Value::Float(self.sum),
            Agg::Count => Value::Int(i64::try_from(self.count).unwrap_or(i64::MAX)),
            Agg::First => Value::Float(self.first),
            Agg::Last => Value::Float(self.last),
        }
    }
}

/// The number a value counts as in a [`Bucket`], if any.
pub fn numeric(value: &Value) -> Option<f64> {
    match value {
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        Value::Text(_) => None,
    }
}

/// Summarises time-ordered points into buckets of `step` ms aligned to the epoch: what the
/// store's buckets must equal, written independently of its rollups.
#[cfg(test)]
pub fn bucketize(points: impl IntoIterator<Item = (TimestampMs, Value)>, step: i64) -> Vec<Bucket> {
    let step = step.max(1);
    let mut out: Vec<Bucket> = Vec::new();
    for (ts, value) in points {
        let Some(v) = numeric(&value) else { continue };
        let start = ts.div_euclid(step) * step;
        match out.last_mut() {
            Some(b) if b.start == start => b.merge(&Bucket::of(start, v)),
            _ => out.push(Bucket::of(start, v)),
        }
    }
    out
}

/// What one commit writes, atomically.
#[derive(Debug, Default)]
pub struct Batch {
    pub samples: Vec<(DeviceId, Sample)>,
    pub deadletters: Vec<DeadLetter>,
}

/// Where telemetry lives. Implementations are shared between the ingest thread (commits) and
/// the API (queries); calls block, so async callers run them on a blocking thread.
pub trait TelemetryStore: Send + Sync + 'static {
    /// Writes the whole batch durably, or nothing.
    fn commit(&self, batch: &Batch) -> Result<(), StoreError>;
    /// Housekeeping the ingest thread runs between commits (for the embedded store: merging
    /// recent points into their partitions and rollups, and retention). Returns how long
    /// until it should run again, `None` if only after the next commit. Each call should be
    /// short, as nothing is committed meanwhile: with more to do, a store does a step and
    /// returns `Some(Duration::ZERO)`, and the ingest thread commits what waits before the
    /// next call.
    fn maintain(&self, now: TimestampMs) -> Result<Option<Duration>, StoreError> {
        let _ = now;
        Ok(None)
    }
    /// Points of one series with `from <= ts <= to`, in time order, at most `limit`.
    fn range(
        &self,
        device: &DeviceId,
        metric: &str,
        from: TimestampMs,
        to: TimestampMs,
        limit: usize,
    ) -> Result<Vec<(TimestampMs, Value)>, StoreError>;
    /// One series summarised in buckets of `step` ms aligned to the Unix epoch, in time
    /// order, covering `from..=to` widened to whole buckets; buckets without a number are
    /// left out. The store answers from its coarsest resolution that divides `step`.
    fn buckets(
        &self,
        device: &DeviceId,
        metric: &str,
        from: TimestampMs,
        to: TimestampMs,
        step: i64,
    ) -> Result<Vec<Bucket>, StoreError>;
    /// The widths (ms) of the store's rollups, coarsest first: steps that are a multiple of
    /// one are answered from it.
    fn resolutions(&self) -> &[i64];
    /// The newest point of every metric of a device: (metric, ts, value), by metric name.
    fn latest(&self, device: &DeviceId) -> Result<Vec<(String, TimestampMs, Value)>, StoreError>;
    /// The newest point of `metric` of the devices that have it: (device, ts, value), by
    /// device, those after `after` only, at most `limit`.
    fn latest_of_metric(
        &self,
        metric: &str,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<(DeviceId, TimestampMs, Value)>, StoreError>;
    /// Dead letters, newest first, with an id below `before` when given, at most `limit`.
    /// Each `payload` is only the first [`DEADLETTER_PREVIEW_BYTES`] bytes (a page of whole
    /// payloads could be hundreds of megabytes); `payload_size` is the whole length.
    fn deadletters(&self, before: Option<i64>, limit: usize)
        -> Result<Vec<DeadLetter>, StoreError>;
    /// One dead letter with its whole payload, or `None` if no dead letter has this id.
    fn deadletter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError>;
    /// The spool's counters, for a store that forwards points elsewhere (QuestDB).
    fn spool(&self) -> Option<SpoolStats> {
        None
    }
    /// Whether the store answers (for readiness): by default, a read of the newest dead
    /// letter, which every store keeps in the local database its commits write (the QuestDB
    /// store's spool), so it says whether commits can be taken, not whether a remote
    /// backend is up.
    fn check(&self) -> Result<(), StoreError> {
        self.deadletters(None, 1).map(|_| ())
    }
}

const KIND_BOOL: i64 = 0;
const KIND_INT: i64 = 1;
const KIND_FLOAT: i64 = 2;
const KIND_TEXT: i64 = 3;

pub(crate) fn to_sql(v: &Value) -> (i64, rusqlite::types::Value) {
    use rusqlite::types::Value as Sql;
    match v {
        Value::Bool(b) => (KIND_BOOL, Sql::Integer(*b as i64)),
        Value::Int(i) => (KIND_INT, Sql::Integer(*i)),
        Value::Float(f) => (KIND_FLOAT, Sql::Real(*f)),
        Value::Text(s) => (KIND_TEXT, Sql::Text(s.clone())),
    }
}

pub(crate) fn from_sql(kind: i64, v: rusqlite::types::Value) -> Value {
    use rusqlite::types::Value as Sql;
    match (kind, v) {
        (KIND_BOOL, Sql::Integer(i)) => Value::Bool(i != 0),
        (_, Sql::Integer(i)) => Value::Int(i),
        (_, Sql::Real(f)) => Value::Float(f),
        (_, Sql::Text(s)) => Value::Text(s),
        (_, Sql::Blob(b)) => Value::Text(String::from_utf8_lossy(&b).into_owned()),
        (_, Sql::Null) => Value::Text(String::new()),
    }
}

/// Writes dead letters into a `deadletters` table (id, received_at, device, topic, reason,
/// payload), in the caller's transaction.
pub(crate) fn insert_deadletters(
    tx: &rusqlite::Transaction<'_>,
    deadletters: &[DeadLetter],
) -> Result<(), rusqlite::Error> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO deadletters (received_at, device, topic, reason, payload)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for d in deadletters {
        stmt.execute(rusqlite::params![
            d.received_at_ms,
            d.device.as_str(),
            d.topic,
            d.reason,
            d.payload
        ])?;
    }
    Ok(())
}

/// [`TelemetryStore::deadletters`] from a `deadletters` table.
pub(crate) fn list_deadletters(
    conn: &rusqlite::Connection,
    before: Option<i64>,
    limit: usize,
) -> Result<Vec<DeadLetter>, rusqlite::Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, received_at, device, topic, reason, substr(payload, 1, ?3), length(payload)
         FROM deadletters WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(
        rusqlite::params![
            before.unwrap_or(i64::MAX),
            i64::try_from(limit).unwrap_or(i64::MAX),
            DEADLETTER_PREVIEW_BYTES as i64
        ],
        deadletter_row,
    )?;
    rows.collect()
}

/// [`TelemetryStore::deadletter`] from a `deadletters` table.
pub(crate) fn one_deadletter(
    conn: &rusqlite::Connection,
    id: i64,
) -> Result<Option<DeadLetter>, rusqlite::Error> {
    use rusqlite::OptionalExtension;
    conn.prepare_cached(
        "SELECT id, received_at, device, topic, reason, payload, length(payload)
         FROM deadletters WHERE id = ?1",
    )?
    .query_row([id], deadletter_row)
    .optional()
}

/// A dead letter from a row of `id, received_at, device, topic, reason, payload (or a prefix
/// of it), length(payload)`.
fn deadletter_row(r: &rusqlite::Row<'_>) -> Result<DeadLetter, rusqlite::Error> {
    let device: String = r.get(2)?;
    let payload_size: i64 = r.get(6)?;
    Ok(DeadLetter {
        id: r.get(0)?,
        received_at_ms: r.get(1)?,
        device: DeviceId::parse(&device).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, e.into())
        })?,
        topic: r.get(3)?,
        reason: r.get(4)?,
        payload: r.get(5)?,
        payload_size: usize::try_from(payload_size).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Integer, e.into())
        })?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    fn sample(metric: &str, ts_ms: i64, value: Value) -> Sample {
        Sample {
            metric: metric.into(),
            ts_ms,
            value,
        }
    }

    #[test]
    fn values_keep_their_type_and_resends_do_not_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), Durability::Fsync).unwrap();
        let d = id("d1");
        let batch = Batch {
            samples: vec![
                (d.clone(), sample("t", 10, Value::Float(1.5))),
                (d.clone(), sample("t", 20, Value::Int(2))),
                (d.clone(), sample("on", 10, Value::Bool(true))),
                (d.clone(), sample("door", 5, Value::Text("open".into()))),
                (id("d2"), sample("t", 10, Value::Int(9))),
            ],
            deadletters: vec![],
        };
        store.commit(&batch).unwrap();
        store.commit(&batch).unwrap();
        assert_eq!(
            store.range(&d, "t", 0, 100, 10).unwrap(),
            vec![(10, Value::Float(1.5)), (20, Value::Int(2))]
        );
        assert_eq!(
            store.range(&d, "t", 0, 100, 1).unwrap(),
            vec![(10, Value::Float(1.5))]
        );
        assert_eq!(
            store.range(&d, "t", 11, 100, 10).unwrap(),
            vec![(20, Value::Int(2))]
        );
        assert_eq!(
            store.latest(&d).unwrap(),
            vec![
                ("door".into(), 5, Value::Text("open".into())),
                ("on".into(), 10, Value::Bool(true)),
                ("t".into(), 20, Value::Int(2)),
            ]
        );
        // An older point does not replace the latest one.
        store
            .commit(&Batch {
                samples: vec![(d.clone(), sample("t", 15, Value::Int(7)))],
                deadletters: vec![],
            })
            .unwrap();
        assert_eq!(
            store.latest(&d).unwrap()[2],
            ("t".into(), 20, Value::Int(2))
        );
    }

    #[test]
    fn deadletters_are_kept_raw_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), Durability::Os).unwrap();
        let dl = |n: u8| DeadLetter {
            id: 0,
            received_at_ms: n as i64,
            device: id("d1"),
            topic: "devices/d1/telemetry".into(),
            reason: format!("bad {n}"),
            payload: vec![n, 0xff],
            payload_size: 2,
        };
        store
            .commit(&Batch {
                samples: vec![],
                deadletters: vec![dl(1), dl(2), dl(3)],
            })
            .unwrap();
        let all = store.deadletters(None, 10).unwrap();
        assert_eq!(
            all.iter().map(|d| d.reason.as_str()).collect::<Vec<_>>(),
            ["bad 3", "bad 2", "bad 1"]
        );
        assert_eq!(all[0].payload, vec![3, 0xff]);
        let older = store.deadletters(Some(all[0].id), 1).unwrap();
        assert_eq!(older[0].reason, "bad 2");
    }

    #[test]
    fn deadletter_lists_carry_a_preview_and_one_has_the_whole_payload() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), Durability::Os).unwrap();
        let big: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        store
            .commit(&Batch {
                samples: vec![],
                deadletters: vec![DeadLetter {
                    id: 0,
                    received_at_ms: 1,
                    device: id("d1"),
                    topic: "devices/d1/telemetry".into(),
                    reason: "too odd".into(),
                    payload: big.clone(),
                    payload_size: big.len(),
                }],
            })
            .unwrap();
        let listed = store.deadletters(None, 10).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].payload, big[..DEADLETTER_PREVIEW_BYTES]);
        assert_eq!(listed[0].payload_size, 3000);

        let one = store.deadletter(listed[0].id).unwrap().unwrap();
        assert_eq!(one.payload, big);
        assert_eq!(one.payload_size, 3000);
        assert_eq!(one.reason, "too odd");
        assert_eq!(store.deadletter(listed[0].id + 1).unwrap(), None);
    }

    /// A batch whose COMMIT fails must leave nothing behind, in the database or in the
    /// writer's series cache: later batches get fresh, committed series ids.
    #[test]
    fn a_failed_commit_leaks_no_series_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path, Durability::Os).unwrap();
        // Creating series 'poison' inserts a row that breaks a deferred foreign key, so every
        // statement of that batch succeeds and only its COMMIT fails.
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE guard (x INTEGER REFERENCES series(id) DEFERRABLE INITIALLY DEFERRED);
                 CREATE TRIGGER poison AFTER INSERT ON series WHEN NEW.metric = 'poison'
                 BEGIN INSERT INTO guard VALUES (-1); END;",
            )
            .unwrap();
        let (d1, d2) = (id("d1"), id("d2"));

        let err = store
            .commit(&Batch {
                samples: vec![
                    (d1.clone(), sample("ok", 1, Value::Int(1))),
                    (d1.clone(), sample("poison", 1, Value::Int(1))),
                    (d2.clone(), sample("a", 1, Value::Int(1))),
                ],
                deadletters: vec![],
            })
            .unwrap_err();
        assert!(err.to_string().contains("FOREIGN KEY"), "{err}");
        assert_eq!(store.range(&d1, "ok", 0, 100, 10).unwrap(), vec![]);
        assert_eq!(store.latest(&d1).unwrap(), vec![]);

        store
            .commit(&Batch {
                samples: vec![(d1.clone(), sample("ok", 10, Value::Int(10)))],
                deadletters: vec![],
            })
            .unwrap();
        // Two new series, and the same new series named twice in one batch.
        store
            .commit(&Batch {
                samples: vec![
                    (d2.clone(), sample("a", 20, Value::Int(20))),
                    (d2.clone(), sample("b", 21, Value::Int(21))),
                    (d2.clone(), sample("a", 22, Value::Int(22))),
                ],
                deadletters: vec![],
            })
            .unwrap();

        assert_eq!(
            store.range(&d1, "ok", 0, 100, 10).unwrap(),
            vec![(10, Value::Int(10))]
        );
        assert_eq!(
            store.range(&d2, "a", 0, 100, 10).unwrap(),
            vec![(20, Value::Int(20)), (22, Value::Int(22))]
        );
        assert_eq!(
            store.range(&d2, "b", 0, 100, 10).unwrap(),
            vec![(21, Value::Int(21))]
        );
        assert_eq!(
            store.latest(&d1).unwrap(),
            vec![("ok".into(), 10, Value::Int(10))]
        );
        assert_eq!(
            store.latest(&d2).unwrap(),
            vec![
                ("a".into(), 22, Value::Int(22)),
                ("b".into(), 21, Value::Int(21))
            ]
        );
    }
}
