//! The telemetry store: the [`TelemetryStore`] trait and the embedded SQLite implementation.
//!
//! Layout of `telemetry.db`:
//! - `series`: the series dictionary, one row per (device, metric), keyed by a small integer;
//! - `points`: `(series, ts)` is the primary key of a `WITHOUT ROWID` table, so a series' points
//!   are stored in time order and a point re-sent with the same timestamp replaces itself
//!   instead of becoming a duplicate;
//! - `latest`: the newest point of every series, kept up to date by each commit;
//! - `deadletters`: payloads that were not valid telemetry, raw, with the reason.
//!
//! `points.series` and `latest.series` are foreign keys to `series(id)`, so a point can never
//! be stored under an id that no committed series has.
//!
//! The writer caches series ids, but only ids that a successful COMMIT made durable: ids looked
//! up or created inside a transaction live in a map of that batch and reach the cache after
//! `COMMIT` returned Ok (see [`SqliteStore::commit`]). A batch that fails, at any statement or
//! at `COMMIT` itself, leaves neither rows nor cached ids behind.
//!
//! A value keeps its type: `kind` says whether the stored SQLite value is a bool, an integer,
//! a float or text.

use std::{collections::HashMap, path::Path, sync::Mutex};

use rusqlite::{params, Connection, OptionalExtension};
use tellus_core::{DeviceId, Sample, TimestampMs, Value};

use crate::sqlite;

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
    fn synchronous(self) -> &'static str {
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
    /// Points of one series with `from <= ts <= to`, in time order, at most `limit`.
    fn range(
        &self,
        device: &DeviceId,
        metric: &str,
        from: TimestampMs,
        to: TimestampMs,
        limit: usize,
    ) -> Result<Vec<(TimestampMs, Value)>, StoreError>;
    /// The newest point of every metric of a device: (metric, ts, value), by metric name.
    fn latest(&self, device: &DeviceId) -> Result<Vec<(String, TimestampMs, Value)>, StoreError>;
    /// Dead letters, newest first, with an id below `before` when given, at most `limit`.
    /// Each `payload` is only the first [`DEADLETTER_PREVIEW_BYTES`] bytes (a page of whole
    /// payloads could be hundreds of megabytes); `payload_size` is the whole length.
    fn deadletters(&self, before: Option<i64>, limit: usize)
        -> Result<Vec<DeadLetter>, StoreError>;
    /// One dead letter with its whole payload, or `None` if no dead letter has this id.
    fn deadletter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError>;
}

const MIGRATIONS: &[&str] = &["CREATE TABLE series (
        id      INTEGER PRIMARY KEY,
        device  TEXT NOT NULL,
        metric  TEXT NOT NULL,
        UNIQUE (device, metric)
    );
    CREATE TABLE points (
        series  INTEGER NOT NULL REFERENCES series(id),
        ts      INTEGER NOT NULL,
        kind    INTEGER NOT NULL,
        value,
        PRIMARY KEY (series, ts)
    ) WITHOUT ROWID;
    CREATE TABLE latest (
        series  INTEGER PRIMARY KEY REFERENCES series(id),
        ts      INTEGER NOT NULL,
        kind    INTEGER NOT NULL,
        value
    );
    CREATE TABLE deadletters (
        id          INTEGER PRIMARY KEY,
        received_at INTEGER NOT NULL,
        device      TEXT NOT NULL,
        topic       TEXT NOT NULL,
        reason      TEXT NOT NULL,
        payload     BLOB NOT NULL
    );"];

/// Most series ids the writer keeps in memory; past this the cache starts over.
const SERIES_CACHE_MAX: usize = 100_000;

const KIND_BOOL: i64 = 0;
const KIND_INT: i64 = 1;
const KIND_FLOAT: i64 = 2;
const KIND_TEXT: i64 = 3;

fn to_sql(v: &Value) -> (i64, rusqlite::types::Value) {
    use rusqlite::types::Value as Sql;
    match v {
        Value::Bool(b) => (KIND_BOOL, Sql::Integer(*b as i64)),
        Value::Int(i) => (KIND_INT, Sql::Integer(*i)),
        Value::Float(f) => (KIND_FLOAT, Sql::Real(*f)),
        Value::Text(s) => (KIND_TEXT, Sql::Text(s.clone())),
    }
}

fn from_sql(kind: i64, v: rusqlite::types::Value) -> Value {
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

/// A series' key in the id maps: (device, metric).
type SeriesKey = (DeviceId, String);

struct Writer {
    conn: Connection,
    /// Ids of series whose rows are committed. Only [`SqliteStore::commit`] adds to it, and only
    /// after `COMMIT` succeeded: an id from a transaction that rolled back would point at a row
    /// that does not exist, and SQLite would later hand the same id to another series.
    series: HashMap<SeriesKey, i64>,
}

impl Writer {
    /// The id of series (`device`, `metric`), creating the row if needed. `resolved` holds the
    /// ids this transaction has looked up or created so far and is searched first; new ids go
    /// there, never into `committed`.
    fn series_id(
        tx: &rusqlite::Transaction<'_>,
        committed: &HashMap<SeriesKey, i64>,
        resolved: &mut HashMap<SeriesKey, i64>,
        device: &DeviceId,
        metric: &str,
    ) -> Result<i64, rusqlite::Error> {
        let key = (device.clone(), metric.to_owned());
        if let Some(id) = resolved.get(&key).or_else(|| committed.get(&key)) {
            return Ok(*id);
        }
        let existing = tx
            .prepare_cached("SELECT id FROM series WHERE device = ?1 AND metric = ?2")?
            .query_row(params![device.as_str(), metric], |r| r.get(0))
            .optional()?;
        let id = match existing {
            Some(id) => id,
            None => {
                tx.prepare_cached("INSERT INTO series (device, metric) VALUES (?1, ?2)")?
                    .execute(params![device.as_str(), metric])?;
                tx.last_insert_rowid()
            }
        };
        resolved.insert(key, id);
        Ok(id)
    }

    /// Adds the ids of a committed transaction to the cache, starting over when it is full.
    fn remember(&mut self, resolved: HashMap<SeriesKey, i64>) {
        if self.series.len() + resolved.len() > SERIES_CACHE_MAX {
            self.series.clear();
        }
        self.series.extend(resolved);
    }
}

/// The embedded telemetry store. One writer connection (the ingest thread) and one reader
/// connection (queries); WAL mode lets them run side by side.
pub struct SqliteStore {
    writer: Mutex<Writer>,
    reader: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        let conn = sqlite::open(path, durability.synchronous(), MIGRATIONS)?;
        let reader = sqlite::open(path, durability.synchronous(), MIGRATIONS)?;
        Ok(SqliteStore {
            writer: Mutex::new(Writer {
                conn,
                series: HashMap::new(),
            }),
            reader: Mutex::new(reader),
        })
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(f(&conn)?)
    }
}

impl TelemetryStore for SqliteStore {
    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut w = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let Writer { conn, series } = &mut *w;
        // Series ids of this transaction; they reach `series` only once COMMIT succeeded.
        let mut resolved = HashMap::new();
        let tx = conn.transaction()?;
        let result = (|| {
            for (device, s) in &batch.samples {
                let id = Writer::series_id(&tx, series, &mut resolved, device, &s.metric)?;
                let (kind, value) = to_sql(&s.value);
                tx.prepare_cached(
                    "INSERT INTO points (series, ts, kind, value) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (series, ts) DO UPDATE SET kind = excluded.kind, value = excluded.value",
                )?
                .execute(params![id, s.ts_ms, kind, value])?;
                tx.prepare_cached(
                    "INSERT INTO latest (series, ts, kind, value) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (series) DO UPDATE SET ts = excluded.ts, kind = excluded.kind,
                        value = excluded.value
                     WHERE excluded.ts >= latest.ts",
                )?
                .execute(params![id, s.ts_ms, kind, value])?;
            }
            for d in &batch.deadletters {
                tx.prepare_cached(
                    "INSERT INTO deadletters (received_at, device, topic, reason, payload)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    d.received_at_ms,
                    d.device.as_str(),
                    d.topic,
                    d.reason,
                    d.payload
                ])?;
            }
            Ok::<_, rusqlite::Error>(())
        })();
        // On any error, dropping `tx` rolls back (also when COMMIT itself failed and left the
        // transaction open) and `resolved` is dropped with the ids of the rolled-back rows.
        result?;
        tx.commit()?;
        w.remember(resolved);
        Ok(())
    }

    fn range(
        &self,
        device: &DeviceId,
        metric: &str,
        from: TimestampMs,
        to: TimestampMs,
        limit: usize,
    ) -> Result<Vec<(TimestampMs, Value)>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT p.ts, p.kind, p.value FROM points p
                 JOIN series s ON s.id = p.series
                 WHERE s.device = ?1 AND s.metric = ?2 AND p.ts >= ?3 AND p.ts <= ?4
                 ORDER BY p.ts LIMIT ?5",
            )?;
            let rows = stmt.query_map(
                params![device.as_str(), metric, from, to, limit as i64],
                |r| Ok((r.get(0)?, from_sql(r.get(1)?, r.get(2)?))),
            )?;
            rows.collect()
        })
    }

    fn latest(&self, device: &DeviceId) -> Result<Vec<(String, TimestampMs, Value)>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT s.metric, l.ts, l.kind, l.value FROM latest l
                 JOIN series s ON s.id = l.series
                 WHERE s.device = ?1 ORDER BY s.metric",
            )?;
            let rows = stmt.query_map([device.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, from_sql(r.get(2)?, r.get(3)?)))
            })?;
            rows.collect()
        })
    }

    fn deadletters(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, received_at, device, topic, reason, substr(payload, 1, ?3),
                        length(payload)
                 FROM deadletters WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(
                params![
                    before.unwrap_or(i64::MAX),
                    limit as i64,
                    DEADLETTER_PREVIEW_BYTES as i64
                ],
                deadletter_row,
            )?;
            rows.collect()
        })
    }

    fn deadletter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT id, received_at, device, topic, reason, payload, length(payload)
                 FROM deadletters WHERE id = ?1",
            )?
            .query_row([id], deadletter_row)
            .optional()
        })
    }
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
        Connection::open(&path)
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
