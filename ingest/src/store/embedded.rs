//! The embedded telemetry store: SQLite, laid out for time series.
//!
//! Layout of `telemetry.db`:
//! - `series`: the series dictionary, one row per (device, metric), keyed by a small integer;
//! - `head`: the newest points, appended in arrival order (a rowid table, so a commit writes
//!   a few pages whatever the number of series), mirrored in memory for queries;
//! - `raw_<day>`: one table per day of points, `(series, ts)` the primary key of a
//!   `WITHOUT ROWID` table, so a series' points are stored in time order and a point re-sent
//!   with the same timestamp replaces itself instead of becoming a duplicate;
//! - `m1_<n>`, `h1_<n>`: rollups of numeric values per series and minute (partitions of 30
//!   days) and per series and hour (partitions of 365 days): count, sum, min, max, first and
//!   last;
//! - `partitions`: the catalog of those tables, with the time each covers;
//! - `latest`: the newest point of every series;
//! - `deadletters`: payloads that were not valid telemetry, raw, with the reason.
//!
//! A commit (the ingest thread's group commit, one fsync) only appends to `head`. A merge,
//! at most `merge_interval` later or once `head` holds `merge_rows` points, moves the head
//! into its day tables in one transaction, sorted by series and time so that each series
//! touches its newest pages only, updates `latest`, and recomputes the rollup rows of every
//! minute (from the raw points) and hour (from the minute rows) it touched, so rollups
//! always equal what the raw points say, re-sent and late points included. Retention drops
//! whole partitions (a `DROP TABLE`, not row deletes) once they end before the retention of
//! their resolution; a point that arrives older than the raw retention goes into the
//! rollups only.
//!
//! Queries see every committed point: they read the partitions and add the head from
//! memory. A query holds the head's read lock from copying the head until its read
//! transaction has its snapshot, and a merge holds the write lock from its commit until the
//! head is cleared, so a query sees each point once, either in the head or in the
//! partitions; while a merge writes its transaction, queries go on.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    path::Path,
    sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::{Duration, Instant},
};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tellus_core::{DeviceId, TimestampMs, Value};

use super::{
    from_sql, numeric, to_sql, Batch, Bucket, DeadLetter, Durability, StoreError, TelemetryStore,
};
use crate::sqlite;

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// Migration 1 is the first layout (one `points` table); migration 2 moves its points into
/// the head, from which the first merge partitions them and builds their rollups.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE series (
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
    );",
    "CREATE TABLE head (
        seq     INTEGER PRIMARY KEY,
        series  INTEGER NOT NULL REFERENCES series(id),
        ts      INTEGER NOT NULL,
        kind    INTEGER NOT NULL,
        value
    );
    CREATE TABLE partitions (
        name        TEXT PRIMARY KEY,
        resolution  INTEGER NOT NULL,
        start_ms    INTEGER NOT NULL,
        end_ms      INTEGER NOT NULL
    );
    CREATE INDEX partitions_by_time ON partitions (resolution, start_ms);
    CREATE INDEX series_by_metric ON series (metric, device);
    INSERT INTO head (series, ts, kind, value)
        SELECT series, ts, kind, value FROM points ORDER BY ts;
    DROP TABLE points;",
];

/// A resolution of the store: raw points, or one of the rollups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Res {
    Raw = 0,
    Minute = 1,
    Hour = 2,
}

impl Res {
    fn prefix(self) -> &'static str {
        match self {
            Res::Raw => "raw",
            Res::Minute => "m1",
            Res::Hour => "h1",
        }
    }

    /// The width of a rollup row.
    fn bucket_ms(self) -> i64 {
        match self {
            Res::Raw => 1,
            Res::Minute => MINUTE,
            Res::Hour => HOUR,
        }
    }

    /// The time one partition table covers: a multiple of the bucket width.
    fn partition_ms(self) -> i64 {
        match self {
            Res::Raw => DAY,
            Res::Minute => 30 * DAY,
            Res::Hour => 365 * DAY,
        }
    }

    fn from_i64(n: i64) -> Option<Res> {
        match n {
            0 => Some(Res::Raw),
            1 => Some(Res::Minute),
            2 => Some(Res::Hour),
            _ => None,
        }
    }

    /// The partition holding `ts`: its table name and start.
    fn partition(self, ts: TimestampMs) -> Partition {
        let n = ts.div_euclid(self.partition_ms());
        Partition {
            res: self,
            start: n * self.partition_ms(),
            name: format!("{}_{}", self.prefix(), n).replace('-', "n"),
        }
    }

    fn create_sql(self, name: &str) -> String {
        match self {
            Res::Raw => format!(
                "CREATE TABLE IF NOT EXISTS {name} (
                    series INTEGER NOT NULL, ts INTEGER NOT NULL, kind INTEGER NOT NULL, value,
                    PRIMARY KEY (series, ts)
                ) WITHOUT ROWID"
            ),
            Res::Minute | Res::Hour => format!(
                "CREATE TABLE IF NOT EXISTS {name} (
                    series INTEGER NOT NULL, bucket INTEGER NOT NULL,
                    count INTEGER NOT NULL, sum REAL NOT NULL, min REAL NOT NULL,
                    max REAL NOT NULL, first_ts INTEGER NOT NULL, first REAL NOT NULL,
                    last_ts INTEGER NOT NULL, last REAL NOT NULL,
                    PRIMARY KEY (series, bucket)
                ) WITHOUT ROWID"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Partition {
    res: Res,
    start: TimestampMs,
    name: String,
}

impl Partition {
    fn end(&self) -> TimestampMs {
        self.start + self.res.partition_ms()
    }
}

/// How long each resolution is kept; `None`: forever. Coarser resolutions are kept at least
/// as long as finer ones (the configuration checks it): a rollup is computed from the finer
/// data while that is kept. A point that arrives older than the raw retention is added to
/// the rollups as it is, so a copy of it sent again counts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub raw: Option<Duration>,
    pub minute: Option<Duration>,
    pub hour: Option<Duration>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            raw: Some(Duration::from_secs(30 * 86_400)),
            minute: Some(Duration::from_secs(365 * 86_400)),
            hour: None,
        }
    }
}

impl Retention {
    fn of(&self, res: Res) -> Option<Duration> {
        match res {
            Res::Raw => self.raw,
            Res::Minute => self.minute,
            Res::Hour => self.hour,
        }
    }

    /// Whether data of `res` at `ts` is kept at `now`: its partition ends after the horizon.
    fn keeps(&self, res: Res, ts: TimestampMs, now: TimestampMs) -> bool {
        match self.of(res) {
            None => true,
            Some(keep) => {
                let keep = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
                let horizon = now.saturating_sub(keep);
                res.partition(ts).end() > horizon
            }
        }
    }
}

/// How the embedded store is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    pub durability: Durability,
    pub retention: Retention,
    /// Longest a point waits in the head before a merge moves it into its partition.
    pub merge_interval: Duration,
    /// Head size (points) that starts a merge at once.
    pub merge_rows: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            durability: Durability::Fsync,
            retention: Retention::default(),
            merge_interval: Duration::from_secs(1),
            merge_rows: 500_000,
        }
    }
}

/// How often retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(60);
/// Most series ids the writer keeps in memory; past this the cache starts over.
const SERIES_CACHE_MAX: usize = 100_000;

/// A series' key in the id maps: (device, metric).
type SeriesKey = (DeviceId, String);

/// Points committed to `head` and not merged yet, by series; what queries add to the
/// partitions. Bounded by `merge_rows` plus one commit.
#[derive(Debug, Default)]
struct Head {
    series: HashMap<i64, HeadSeries>,
    /// Points in the head table (re-sent points count again: they are rows until merged).
    rows: usize,
    /// When the oldest point in the head was committed.
    since: Option<Instant>,
}

#[derive(Debug)]
struct HeadSeries {
    device: DeviceId,
    metric: String,
    /// The last value committed for each time (a re-sent point replaces the earlier one).
    points: BTreeMap<TimestampMs, Value>,
}

struct Writer {
    conn: Connection,
    /// Ids of series whose rows are committed (only ids a successful COMMIT made durable: an
    /// id from a transaction that rolled back could be handed to another series).
    series: HashMap<SeriesKey, i64>,
    /// Partition tables known to exist (committed).
    partitions: HashSet<String>,
    last_retention: Option<Instant>,
}

/// The embedded telemetry store. One writer connection (the ingest thread: commits, merges,
/// retention) and one reader connection (queries); WAL mode lets them run side by side.
pub struct SqliteStore {
    writer: Mutex<Writer>,
    reader: Mutex<Connection>,
    head: RwLock<Head>,
    config: StoreConfig,
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, StoreError> {
    m.lock().map_err(|_| StoreError::Poisoned)
}

fn read<T>(l: &RwLock<T>) -> Result<RwLockReadGuard<'_, T>, StoreError> {
    l.read().map_err(|_| StoreError::Poisoned)
}

fn write<T>(l: &RwLock<T>) -> Result<RwLockWriteGuard<'_, T>, StoreError> {
    l.write().map_err(|_| StoreError::Poisoned)
}

/// A running summary of numeric values, ordered by time (first and last by timestamp).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Acc {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    first_ts: TimestampMs,
    first: f64,
    last_ts: TimestampMs,
    last: f64,
}

impl Acc {
    fn of(ts: TimestampMs, v: f64) -> Acc {
        Acc {
            count: 1,
            sum: v,
            min: v,
            max: v,
            first_ts: ts,
            first: v,
            last_ts: ts,
            last: v,
        }
    }

    fn add(&mut self, o: &Acc) {
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        if o.first_ts < self.first_ts {
            (self.first_ts, self.first) = (o.first_ts, o.first);
        }
        if o.last_ts >= self.last_ts {
            (self.last_ts, self.last) = (o.last_ts, o.last);
        }
    }

    fn bucket(&self, start: TimestampMs) -> Bucket {
        Bucket {
            start,
            count: self.count,
            sum: self.sum,
            min: self.min,
            max: self.max,
            first: self.first,
            last: self.last,
        }
    }

    fn from_row(r: &rusqlite::Row<'_>, at: usize) -> Result<Acc, rusqlite::Error> {
        Ok(Acc {
            count: r.get::<_, i64>(at)? as u64,
            sum: r.get(at + 1)?,
            min: r.get(at + 2)?,
            max: r.get(at + 3)?,
            first_ts: r.get(at + 4)?,
            first: r.get(at + 5)?,
            last_ts: r.get(at + 6)?,
            last: r.get(at + 7)?,
        })
    }
}

/// Adds `more` to the summary `acc`, or starts it.
fn fold(acc: &mut Option<Acc>, more: &Acc) {
    match acc {
        Some(a) => a.add(more),
        None => *acc = Some(*more),
    }
}

/// Adds `acc` to the summary of bucket `start` in `into`.
fn add_to(into: &mut BTreeMap<TimestampMs, Acc>, start: TimestampMs, acc: &Acc) {
    into.entry(start).and_modify(|a| a.add(acc)).or_insert(*acc);
}

impl SqliteStore {
    /// Opens (or creates) the store at `path` with the default retention and merge policy.
    pub fn open(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        Self::open_with(
            path,
            StoreConfig {
                durability,
                ..StoreConfig::default()
            },
        )
    }

    pub fn open_with(path: &Path, config: StoreConfig) -> Result<Self, StoreError> {
        let sync = config.durability.synchronous();
        let conn = sqlite::open(path, sync, MIGRATIONS)?;
        // Each series has its newest pages hot during a merge.
        conn.pragma_update(None, "cache_size", -65_536)?;
        let reader = sqlite::open(path, sync, MIGRATIONS)?;
        let head = load_head(&conn)?;
        let partitions = conn
            .prepare("SELECT name FROM partitions")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(SqliteStore {
            writer: Mutex::new(Writer {
                conn,
                series: HashMap::new(),
                partitions,
                last_retention: None,
            }),
            reader: Mutex::new(reader),
            head: RwLock::new(head),
            config,
        })
    }

    /// Moves the head into its partitions and rollups now (the ingest thread does it on its
    /// own schedule through [`TelemetryStore::maintain`]).
    pub fn merge(&self, now: TimestampMs) -> Result<(), StoreError> {
        let mut w = lock(&self.writer)?;
        self.merge_locked(&mut w, now)
    }

    /// Drops the partitions past retention now.
    pub fn apply_retention(&self, now: TimestampMs) -> Result<usize, StoreError> {
        let mut w = lock(&self.writer)?;
        self.retention_locked(&mut w, now)
    }

    fn merge_locked(&self, w: &mut Writer, now: TimestampMs) -> Result<(), StoreError> {
        let Writer {
            conn, partitions, ..
        } = w;
        let mut created = Vec::new();
        let tx = sqlite::write_transaction(conn)?;
        {
            // Only the holder of the writer lock changes the head, so reading it is enough
            // while the transaction is written; queries go on meanwhile.
            let head = read(&self.head)?;
            if head.rows == 0 {
                return Ok(());
            }
            merge_head(
                &tx,
                &head,
                &self.config.retention,
                now,
                partitions,
                &mut created,
            )?;
        }
        tx.execute("DELETE FROM head", [])?;
        // Exclusive from the commit until the head is cleared: a query sees each point
        // once, in the head or in the partitions (see the module docs).
        let mut head = write(&self.head)?;
        tx.commit()?;
        partitions.extend(created);
        *head = Head::default();
        Ok(())
    }

    fn retention_locked(&self, w: &mut Writer, now: TimestampMs) -> Result<usize, StoreError> {
        w.last_retention = Some(Instant::now());
        let tx = sqlite::write_transaction(&mut w.conn)?;
        let all: Vec<(String, i64, i64)> = tx
            .prepare("SELECT name, resolution, start_ms FROM partitions")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let mut dropped = Vec::new();
        for (name, res, start) in all {
            let Some(res) = Res::from_i64(res) else {
                continue;
            };
            if !self.config.retention.keeps(res, start, now) {
                tx.execute_batch(&format!("DROP TABLE IF EXISTS {name}"))?;
                tx.execute("DELETE FROM partitions WHERE name = ?1", [&name])?;
                dropped.push(name);
            }
        }
        tx.commit()?;
        for name in &dropped {
            w.partitions.remove(name);
        }
        if !dropped.is_empty() {
            tracing::info!(partitions = ?dropped, "retention dropped partitions");
        }
        Ok(dropped.len())
    }

    /// Runs `f` on a read snapshot, with what `copy` takes from the head at the same moment.
    fn snapshot<C, T>(
        &self,
        copy: impl FnOnce(&Head) -> C,
        f: impl FnOnce(&Transaction<'_>, C) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let mut conn = lock(&self.reader)?;
        let head = read(&self.head)?;
        let copied = copy(&head);
        let tx = conn.transaction()?;
        // The first read fixes the snapshot; only then may a merge go on.
        tx.query_row("SELECT count(*) FROM partitions", [], |r| {
            r.get::<_, i64>(0)
        })?;
        drop(head);
        let out = f(&tx, copied)?;
        tx.commit()?;
        Ok(out)
    }

    /// The id of series (`device`, `metric`), if it exists.
    fn series_id(&self, device: &DeviceId, metric: &str) -> Result<Option<i64>, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT id FROM series WHERE device = ?1 AND metric = ?2")?
                .query_row(params![device.as_str(), metric], |r| r.get(0))
                .optional()
        })
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let conn = lock(&self.reader)?;
        Ok(f(&conn)?)
    }
}

impl Head {
    /// The head points of series `id` in `from..=to`.
    fn points(&self, id: i64, from: TimestampMs, to: TimestampMs) -> Vec<(TimestampMs, Value)> {
        self.series
            .get(&id)
            .map(|s| {
                s.points
                    .range(from..=to)
                    .map(|(t, v)| (*t, v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The newest head point of each series `keep` accepts, under the key it gives.
    fn newest<K>(&self, keep: impl Fn(&HeadSeries) -> Option<K>) -> Vec<(K, TimestampMs, Value)> {
        self.series
            .values()
            .filter_map(|s| {
                let key = keep(s)?;
                let (ts, v) = s.points.last_key_value()?;
                Some((key, *ts, v.clone()))
            })
            .collect()
    }
}

/// Reads the head table (what was committed but not merged when the process stopped) into
/// memory.
fn load_head(conn: &Connection) -> Result<Head, StoreError> {
    let mut head = Head::default();
    let mut stmt = conn.prepare(
        "SELECT h.series, s.device, s.metric, h.ts, h.kind, h.value
         FROM head h JOIN series s ON s.id = h.series ORDER BY h.seq",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let device: String = r.get(1)?;
        let device = DeviceId::parse(&device).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, e.into())
        })?;
        let value = from_sql(r.get(4)?, r.get(5)?);
        head.add(
            r.get(0)?,
            &device,
            &r.get::<_, String>(2)?,
            r.get(3)?,
            value,
        );
    }
    if head.rows > 0 {
        head.since = Some(Instant::now());
    }
    Ok(head)
}

impl Head {
    fn add(&mut self, series: i64, device: &DeviceId, metric: &str, ts: TimestampMs, v: Value) {
        self.series
            .entry(series)
            .or_insert_with(|| HeadSeries {
                device: device.clone(),
                metric: metric.to_owned(),
                points: BTreeMap::new(),
            })
            .points
            .insert(ts, v);
        self.rows += 1;
        self.since.get_or_insert_with(Instant::now);
    }
}

/// Creates partition `p` in this transaction unless it is known; new names go to `created`
/// (known once the transaction commits).
fn ensure(
    tx: &Transaction<'_>,
    p: &Partition,
    known: &HashSet<String>,
    created: &mut Vec<String>,
) -> Result<(), rusqlite::Error> {
    if known.contains(&p.name) || created.contains(&p.name) {
        return Ok(());
    }
    tx.execute_batch(&p.res.create_sql(&p.name))?;
    tx.execute(
        "INSERT OR IGNORE INTO partitions (name, resolution, start_ms, end_ms)
         VALUES (?1, ?2, ?3, ?4)",
        params![p.name, p.res as i64, p.start, p.end()],
    )?;
    created.push(p.name.clone());
    Ok(())
}

/// Writes the head into its partitions, `latest` and the rollups (see the module docs).
fn merge_head(
    tx: &Transaction<'_>,
    head: &Head,
    retention: &Retention,
    now: TimestampMs,
    known: &HashSet<String>,
    created: &mut Vec<String>,
) -> Result<(), rusqlite::Error> {
    // What the head brings to each (series, minute): the summary of its numbers and the
    // earliest time of any of its points. (series, bucket, acc) of points older than the raw
    // retention are added to the rollups as they are.
    let mut minutes: BTreeMap<(i64, TimestampMs), Fresh> = BTreeMap::new();
    let mut late: Vec<(i64, TimestampMs, f64)> = Vec::new();
    let mut ids: Vec<&i64> = head.series.keys().collect();
    ids.sort();
    for id in ids {
        let s = &head.series[id];
        for (&ts, value) in &s.points {
            if !retention.keeps(Res::Raw, ts, now) {
                if let Some(v) = numeric(value) {
                    late.push((*id, ts, v));
                }
                continue;
            }
            let p = Res::Raw.partition(ts);
            ensure(tx, &p, known, created)?;
            let (kind, v) = to_sql(value);
            tx.prepare_cached(&format!(
                "INSERT INTO {} (series, ts, kind, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (series, ts) DO UPDATE SET kind = excluded.kind, value = excluded.value",
                p.name
            ))?
            .execute(params![id, ts, kind, v])?;
            minutes
                .entry((*id, ts.div_euclid(MINUTE) * MINUTE))
                .or_insert_with(|| Fresh::at(ts))
                .add(ts, numeric(value));
        }
        if let Some((&ts, value)) = s.points.last_key_value() {
            let (kind, v) = to_sql(value);
            tx.prepare_cached(
                "INSERT INTO latest (series, ts, kind, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (series) DO UPDATE SET ts = excluded.ts, kind = excluded.kind,
                    value = excluded.value
                 WHERE excluded.ts >= latest.ts",
            )?
            .execute(params![id, ts, kind, v])?;
        }
    }

    let mut hours: BTreeMap<(i64, TimestampMs), Fresh> = BTreeMap::new();
    for (&(id, minute), fresh) in &minutes {
        // Minute rollups are kept at least as long as raw points (see `Retention`).
        if !retention.keeps(Res::Minute, minute, now) {
            continue;
        }
        let existing = rollup_row(tx, Res::Minute, id, minute, known, created)?;
        let acc = match fresh.appended_to(existing.as_ref()) {
            Some(acc) => acc,
            None => raw_summary(tx, id, minute, minute + MINUTE)?,
        };
        put_rollup(tx, Res::Minute, id, minute, acc.as_ref(), known, created)?;
        hours
            .entry((id, minute.div_euclid(HOUR) * HOUR))
            .or_insert_with(|| Fresh::at(fresh.earliest))
            .merge(fresh);
    }
    for (id, ts, v) in late {
        let acc = Acc::of(ts, v);
        if retention.keeps(Res::Minute, ts, now) {
            let minute = ts.div_euclid(MINUTE) * MINUTE;
            add_rollup(tx, Res::Minute, id, minute, &acc, known, created)?;
            // Not an append to the hour: summed again from its minutes.
            hours
                .entry((id, ts.div_euclid(HOUR) * HOUR))
                .or_insert_with(|| Fresh::at(ts))
                .redo = true;
        } else if retention.keeps(Res::Hour, ts, now) {
            add_rollup(
                tx,
                Res::Hour,
                id,
                ts.div_euclid(HOUR) * HOUR,
                &acc,
                known,
                created,
            )?;
        }
    }
    for ((id, hour), fresh) in hours {
        if !retention.keeps(Res::Hour, hour, now) {
            continue;
        }
        let existing = rollup_row(tx, Res::Hour, id, hour, known, created)?;
        let acc = match fresh.appended_to(existing.as_ref()) {
            Some(acc) => acc,
            None => minutes_summary(tx, id, hour, known, created)?,
        };
        put_rollup(tx, Res::Hour, id, hour, acc.as_ref(), known, created)?;
    }
    Ok(())
}

/// What a merge brings to one rollup bucket.
#[derive(Debug, Clone, Copy)]
struct Fresh {
    /// The summary of the new numbers, if any.
    acc: Option<Acc>,
    /// The earliest time of any new point, number or not.
    earliest: TimestampMs,
    /// Whether the bucket must be summed again from the finer data whatever the times.
    redo: bool,
}

impl Fresh {
    fn at(ts: TimestampMs) -> Fresh {
        Fresh {
            acc: None,
            earliest: ts,
            redo: false,
        }
    }

    fn add(&mut self, ts: TimestampMs, value: Option<f64>) {
        self.earliest = self.earliest.min(ts);
        if let Some(v) = value {
            let one = Acc::of(ts, v);
            fold(&mut self.acc, &one);
        }
    }

    fn merge(&mut self, other: &Fresh) {
        self.earliest = self.earliest.min(other.earliest);
        self.redo |= other.redo;
        if let Some(o) = &other.acc {
            fold(&mut self.acc, o);
        }
    }

    /// The bucket's new summary if the new points only come after everything the bucket
    /// summarised (so none replaced a number in it): `existing` plus the new numbers.
    /// `None` when the bucket must be summed again from the finer data.
    fn appended_to(&self, existing: Option<&Acc>) -> Option<Option<Acc>> {
        match (existing, &self.acc) {
            _ if self.redo => None,
            // Nothing summarised yet: no number of this bucket was merged before.
            (None, acc) => Some(*acc),
            (Some(e), _) if self.earliest <= e.last_ts => None,
            (Some(e), None) => Some(Some(*e)),
            (Some(e), Some(a)) => {
                let mut total = *e;
                total.add(a);
                Some(Some(total))
            }
        }
    }
}

/// The rollup row of (`id`, `bucket`), if any.
fn rollup_row(
    tx: &Transaction<'_>,
    res: Res,
    id: i64,
    bucket: TimestampMs,
    known: &HashSet<String>,
    created: &[String],
) -> Result<Option<Acc>, rusqlite::Error> {
    let p = res.partition(bucket);
    if !known.contains(&p.name) && !created.contains(&p.name) {
        return Ok(None);
    }
    tx.prepare_cached(&format!(
        "SELECT count, sum, min, max, first_ts, first, last_ts, last FROM {}
         WHERE series = ?1 AND bucket = ?2",
        p.name
    ))?
    .query_row(params![id, bucket], |r| Acc::from_row(r, 0))
    .optional()
}

/// The summary of series `id`'s raw numbers in `from..until`.
fn raw_summary(
    tx: &Transaction<'_>,
    id: i64,
    from: TimestampMs,
    until: TimestampMs,
) -> Result<Option<Acc>, rusqlite::Error> {
    let mut acc: Option<Acc> = None;
    each_point(tx, id, from, until - 1, &[], |ts, value| {
        if let Some(v) = numeric(value) {
            fold(&mut acc, &Acc::of(ts, v));
        }
    })?;
    Ok(acc)
}

/// Calls `f` with every point of series `id` in `from..=to`, in time order, without
/// collecting them: the raw points of the partitions, with the head points `fresh` (in
/// time order) in place of raw points of the same time.
fn each_point(
    tx: &Transaction<'_>,
    id: i64,
    from: TimestampMs,
    to: TimestampMs,
    fresh: &[(TimestampMs, Value)],
    mut f: impl FnMut(TimestampMs, &Value),
) -> Result<(), rusqlite::Error> {
    let mut head = fresh
        .iter()
        .filter(|(t, _)| (from..=to).contains(t))
        .peekable();
    for name in partitions_between(tx, Res::Raw, from, to)? {
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT ts, kind, value FROM {name} WHERE series = ?1 AND ts >= ?2 AND ts <= ?3
             ORDER BY ts"
        ))?;
        let mut rows = stmt.query(params![id, from, to])?;
        while let Some(r) = rows.next()? {
            let ts: i64 = r.get(0)?;
            while let Some((t, v)) = head.next_if(|(t, _)| *t < ts) {
                f(*t, v);
            }
            match head.next_if(|(t, _)| *t == ts) {
                // The head's point replaces this one.
                Some((t, v)) => f(*t, v),
                None => f(ts, &from_sql(r.get(1)?, r.get(2)?)),
            }
        }
    }
    for (t, v) in head {
        f(*t, v);
    }
    Ok(())
}

/// The summary of series `id`'s minute rollups in the hour starting at `hour`.
fn minutes_summary(
    tx: &Transaction<'_>,
    id: i64,
    hour: TimestampMs,
    known: &HashSet<String>,
    created: &[String],
) -> Result<Option<Acc>, rusqlite::Error> {
    let m1 = Res::Minute.partition(hour);
    let mut acc: Option<Acc> = None;
    if !known.contains(&m1.name) && !created.contains(&m1.name) {
        return Ok(None);
    }
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT count, sum, min, max, first_ts, first, last_ts, last FROM {}
         WHERE series = ?1 AND bucket >= ?2 AND bucket < ?3",
        m1.name
    ))?;
    let mut rows = stmt.query(params![id, hour, hour + HOUR])?;
    while let Some(r) = rows.next()? {
        let a = Acc::from_row(r, 0)?;
        fold(&mut acc, &a)
    }
    Ok(acc)
}

/// Sets the rollup row of (`id`, `bucket`) to `acc`, or removes it when `None` (no number
/// left in the bucket).
fn put_rollup(
    tx: &Transaction<'_>,
    res: Res,
    id: i64,
    bucket: TimestampMs,
    acc: Option<&Acc>,
    known: &HashSet<String>,
    created: &mut Vec<String>,
) -> Result<(), rusqlite::Error> {
    let p = res.partition(bucket);
    let Some(a) = acc else {
        if known.contains(&p.name) || created.contains(&p.name) {
            tx.prepare_cached(&format!(
                "DELETE FROM {} WHERE series = ?1 AND bucket = ?2",
                p.name
            ))?
            .execute(params![id, bucket])?;
        }
        return Ok(());
    };
    ensure(tx, &p, known, created)?;
    tx.prepare_cached(&format!(
        "INSERT OR REPLACE INTO {} (series, bucket, count, sum, min, max, first_ts, first,
            last_ts, last) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        p.name
    ))?
    .execute(params![
        id,
        bucket,
        a.count as i64,
        a.sum,
        a.min,
        a.max,
        a.first_ts,
        a.first,
        a.last_ts,
        a.last
    ])?;
    Ok(())
}

/// Adds `acc` to the rollup row of (`id`, `bucket`).
fn add_rollup(
    tx: &Transaction<'_>,
    res: Res,
    id: i64,
    bucket: TimestampMs,
    acc: &Acc,
    known: &HashSet<String>,
    created: &mut Vec<String>,
) -> Result<(), rusqlite::Error> {
    let existing = rollup_row(tx, res, id, bucket, known, created)?;
    let mut total = *acc;
    if let Some(e) = existing {
        total.add(&e);
    }
    put_rollup(tx, res, id, bucket, Some(&total), known, created)
}

/// The partitions of `res` that overlap `from..=to`, oldest first.
fn partitions_between(
    tx: &Transaction<'_>,
    res: Res,
    from: TimestampMs,
    to: TimestampMs,
) -> Result<Vec<String>, rusqlite::Error> {
    let mut stmt = tx.prepare_cached(
        "SELECT name FROM partitions WHERE resolution = ?1 AND end_ms > ?2 AND start_ms <= ?3
         ORDER BY start_ms",
    )?;
    let rows = stmt.query_map(params![res as i64, from, to], |r| r.get(0))?;
    rows.collect()
}

/// Raw points of series `id` in `from..=to` from the partitions, in time order, at most
/// `limit`.
fn raw_points(
    tx: &Transaction<'_>,
    id: i64,
    from: TimestampMs,
    to: TimestampMs,
    limit: usize,
) -> Result<Vec<(TimestampMs, Value)>, rusqlite::Error> {
    let mut out = Vec::new();
    for name in partitions_between(tx, Res::Raw, from, to)? {
        if out.len() >= limit {
            break;
        }
        let left = i64::try_from(limit - out.len()).unwrap_or(i64::MAX);
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT ts, kind, value FROM {name} WHERE series = ?1 AND ts >= ?2 AND ts <= ?3
             ORDER BY ts LIMIT ?4"
        ))?;
        let rows = stmt.query_map(params![id, from, to, left], |r| {
            Ok((r.get(0)?, from_sql(r.get(1)?, r.get(2)?)))
        })?;
        for row in rows {
            out.push(row?);
        }
    }
    Ok(out)
}

/// Whether series `id` has a merged raw point at `ts`.
fn raw_has(tx: &Transaction<'_>, id: i64, ts: TimestampMs) -> Result<bool, rusqlite::Error> {
    let p = Res::Raw.partition(ts);
    let exists: Option<i64> = tx
        .prepare_cached("SELECT 1 FROM partitions WHERE name = ?1")?
        .query_row([&p.name], |r| r.get(0))
        .optional()?;
    if exists.is_none() {
        return Ok(false);
    }
    Ok(tx
        .prepare_cached(&format!(
            "SELECT 1 FROM {} WHERE series = ?1 AND ts = ?2",
            p.name
        ))?
        .query_row(params![id, ts], |r| r.get::<_, i64>(0))
        .optional()?
        .is_some())
}

/// Merges two time-ordered lists of points; on the same time, `newer` wins.
fn merge_points(
    older: Vec<(TimestampMs, Value)>,
    newer: impl IntoIterator<Item = (TimestampMs, Value)>,
    limit: usize,
) -> Vec<(TimestampMs, Value)> {
    let mut out = Vec::with_capacity(older.len().min(limit));
    let mut a = older.into_iter().peekable();
    let mut b = newer.into_iter().peekable();
    while out.len() < limit {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x.0 < y.0 => a.next(),
            (Some(x), Some(y)) if x.0 == y.0 => {
                a.next();
                b.next()
            }
            (Some(_), Some(_)) | (None, Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, None) => None,
        };
        match next {
            Some(p) => out.push(p),
            None => break,
        }
    }
    out
}

impl TelemetryStore for SqliteStore {
    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut w = lock(&self.writer)?;
        let waiting = read(&self.head)?.rows;
        if waiting >= self.config.merge_rows.max(1).saturating_mul(2) {
            return Err(StoreError::Backlog(waiting));
        }
        let Writer { conn, series, .. } = &mut *w;
        // Series ids of this transaction; they reach `series` only once COMMIT succeeded.
        let mut resolved = HashMap::new();
        let mut ids = Vec::with_capacity(batch.samples.len());
        let tx = sqlite::write_transaction(conn)?;
        let result = (|| {
            for (device, s) in &batch.samples {
                let id = series_id(&tx, series, &mut resolved, device, &s.metric)?;
                let (kind, value) = to_sql(&s.value);
                tx.prepare_cached(
                    "INSERT INTO head (series, ts, kind, value) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![id, s.ts_ms, kind, value])?;
                ids.push(id);
            }
            super::insert_deadletters(&tx, &batch.deadletters)?;
            Ok::<_, rusqlite::Error>(())
        })();
        // On any error, dropping `tx` rolls back (also when COMMIT itself failed and left the
        // transaction open) and `resolved` is dropped with the ids of the rolled-back rows.
        result?;
        tx.commit()?;
        if series.len() + resolved.len() > SERIES_CACHE_MAX {
            series.clear();
        }
        series.extend(resolved);
        let mut head = write(&self.head)?;
        for ((device, s), id) in batch.samples.iter().zip(ids) {
            head.add(id, device, &s.metric, s.ts_ms, s.value.clone());
        }
        Ok(())
    }

    fn maintain(&self, now: TimestampMs) -> Result<Option<Duration>, StoreError> {
        let mut w = lock(&self.writer)?;
        let (rows, since) = {
            let head = read(&self.head)?;
            (head.rows, head.since)
        };
        let merge_due = since.map(|s| s.elapsed() >= self.config.merge_interval);
        let merged = if rows >= self.config.merge_rows.max(1) || merge_due == Some(true) {
            self.merge_locked(&mut w, now)
        } else {
            Ok(())
        };
        // Retention frees room whether or not the merge went through.
        let retention_due = w
            .last_retention
            .is_none_or(|t| t.elapsed() >= RETENTION_EVERY);
        if retention_due {
            self.retention_locked(&mut w, now)?;
        }
        merged?;
        let head_since = read(&self.head)?.since;
        let next_merge = head_since.map(|s| self.config.merge_interval.saturating_sub(s.elapsed()));
        let next_retention = w
            .last_retention
            .map(|t| RETENTION_EVERY.saturating_sub(t.elapsed()))
            .unwrap_or_default();
        Ok(Some(
            next_merge.map_or(next_retention, |m| m.min(next_retention)),
        ))
    }

    fn range(
        &self,
        device: &DeviceId,
        metric: &str,
        from: TimestampMs,
        to: TimestampMs,
        limit: usize,
    ) -> Result<Vec<(TimestampMs, Value)>, StoreError> {
        let Some(id) = self.series_id(device, metric)? else {
            return Ok(Vec::new());
        };
        self.snapshot(
            |head| head.points(id, from, to),
            |tx, fresh| {
                let raw = raw_points(tx, id, from, to, limit)?;
                Ok(merge_points(raw, fresh, limit))
            },
        )
    }

    fn buckets(
        &self,
        device: &DeviceId,
        metric: &str,
        from: TimestampMs,
        to: TimestampMs,
        step: i64,
    ) -> Result<Vec<Bucket>, StoreError> {
        let step = step.max(1);
        let Some(id) = self.series_id(device, metric)? else {
            return Ok(Vec::new());
        };
        let (from, to) = (
            from.div_euclid(step) * step,
            to.div_euclid(step) * step + (step - 1),
        );
        let res = [Res::Hour, Res::Minute]
            .into_iter()
            .find(|r| step % r.bucket_ms() == 0)
            .unwrap_or(Res::Raw);
        self.snapshot(
            |head| head.points(id, from, to),
            |tx, fresh| {
                let mut out: BTreeMap<TimestampMs, Acc> = BTreeMap::new();
                let add = |out: &mut BTreeMap<TimestampMs, Acc>, ts: TimestampMs, v: &Value| {
                    if let Some(v) = numeric(v) {
                        add_to(out, ts.div_euclid(step) * step, &Acc::of(ts, v));
                    }
                };
                if res == Res::Raw {
                    each_point(tx, id, from, to, &fresh, |ts, v| add(&mut out, ts, v))?;
                    return Ok(out.iter().map(|(s, a)| a.bucket(*s)).collect());
                }
                // The head is not in the rollups yet. A rollup row in which a head point
                // replaces a merged one is stale: it is summed again from its raw points
                // (whose day is kept, as the replaced point is there) and the head.
                let width = res.bucket_ms();
                let mut stale = BTreeSet::new();
                for (ts, _) in &fresh {
                    if raw_has(tx, id, *ts)? {
                        stale.insert(ts.div_euclid(width) * width);
                    }
                }
                for name in partitions_between(tx, res, from, to)? {
                    let mut stmt = tx.prepare_cached(&format!(
                        "SELECT bucket, count, sum, min, max, first_ts, first, last_ts, last
                         FROM {name} WHERE series = ?1 AND bucket >= ?2 AND bucket <= ?3"
                    ))?;
                    let mut rows = stmt.query(params![id, from, to])?;
                    while let Some(r) = rows.next()? {
                        let bucket: i64 = r.get(0)?;
                        if !stale.contains(&bucket) {
                            add_to(
                                &mut out,
                                bucket.div_euclid(step) * step,
                                &Acc::from_row(r, 1)?,
                            );
                        }
                    }
                }
                for (ts, v) in &fresh {
                    if !stale.contains(&(ts.div_euclid(width) * width)) {
                        add(&mut out, *ts, v);
                    }
                }
                for row in stale {
                    each_point(tx, id, row, row + width - 1, &fresh, |ts, v| {
                        add(&mut out, ts, v)
                    })?;
                }
                Ok(out.iter().map(|(s, a)| a.bucket(*s)).collect())
            },
        )
    }

    fn resolutions(&self) -> &[i64] {
        &[HOUR, MINUTE]
    }

    fn latest(&self, device: &DeviceId) -> Result<Vec<(String, TimestampMs, Value)>, StoreError> {
        self.snapshot(
            |head| head.newest(|s| (s.device == *device).then(|| s.metric.clone())),
            |tx, head| {
                let mut out: BTreeMap<String, (TimestampMs, Value)> = BTreeMap::new();
                let mut stmt = tx.prepare_cached(
                    "SELECT s.metric, l.ts, l.kind, l.value FROM latest l
                 JOIN series s ON s.id = l.series WHERE s.device = ?1",
                )?;
                let rows = stmt.query_map([device.as_str()], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get(1)?,
                        from_sql(r.get(2)?, r.get(3)?),
                    ))
                })?;
                for row in rows {
                    let (metric, ts, value) = row?;
                    out.insert(metric, (ts, value));
                }
                newest_of_head(&mut out, head);
                Ok(out.into_iter().map(|(m, (t, v))| (m, t, v)).collect())
            },
        )
    }

    fn latest_of_metric(
        &self,
        metric: &str,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<(DeviceId, TimestampMs, Value)>, StoreError> {
        let after_id = after.map_or("", DeviceId::as_str);
        self.snapshot(
            |head| {
                head.newest(|s| {
                    (s.metric == metric && s.device.as_str() > after_id).then(|| s.device.clone())
                })
            },
            |tx, head| {
                let mut out: BTreeMap<DeviceId, (TimestampMs, Value)> = BTreeMap::new();
                let mut stmt = tx.prepare_cached(
                    "SELECT s.device, l.ts, l.kind, l.value FROM series s
                     JOIN latest l ON l.series = s.id
                     WHERE s.metric = ?1 AND s.device > ?2 ORDER BY s.device LIMIT ?3",
                )?;
                let page = i64::try_from(limit).unwrap_or(i64::MAX);
                let mut rows = stmt.query(params![metric, after_id, page])?;
                while let Some(r) = rows.next()? {
                    let device: String = r.get(0)?;
                    let device = DeviceId::parse(&device).map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            0,
                            rusqlite::types::Type::Text,
                            e.into(),
                        )
                    })?;
                    out.insert(device, (r.get(1)?, from_sql(r.get(2)?, r.get(3)?)));
                }
                // The head may name devices the page did not reach: whatever is past `limit`
                // in the union is left for the next page.
                newest_of_head(&mut out, head);
                Ok(out
                    .into_iter()
                    .take(limit)
                    .map(|(d, (t, v))| (d, t, v))
                    .collect())
            },
        )
    }

    fn deadletters(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.read(|c| super::list_deadletters(c, before, limit))
    }

    fn deadletter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        self.read(|c| super::one_deadletter(c, id))
    }
}

/// Puts the newest head point of each key into `out` where it is newer.
fn newest_of_head<K: Ord>(
    out: &mut BTreeMap<K, (TimestampMs, Value)>,
    head: Vec<(K, TimestampMs, Value)>,
) {
    for (key, ts, value) in head {
        match out.get(&key) {
            Some((known, _)) if *known > ts => {}
            _ => {
                out.insert(key, (ts, value));
            }
        }
    }
}

/// The id of series (`device`, `metric`), creating the row if needed. `resolved` holds the
/// ids this transaction has looked up or created so far and is searched first; new ids go
/// there, never into `committed`.
fn series_id(
    tx: &Transaction<'_>,
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

#[cfg(test)]
mod tests {
    use tellus_core::Sample;

    use super::*;
    use crate::store::bucketize;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    fn batch(points: &[(&DeviceId, &str, TimestampMs, Value)]) -> Batch {
        Batch {
            samples: points
                .iter()
                .map(|(d, m, ts, v)| {
                    (
                        (*d).clone(),
                        Sample {
                            metric: (*m).into(),
                            ts_ms: *ts,
                            value: v.clone(),
                        },
                    )
                })
                .collect(),
            deadletters: vec![],
        }
    }

    /// A store that merges only when told to (or once `merge_rows` points wait), keeping raw
    /// points and minute rollups `raw` and `minute` days (`None`: forever), hours forever.
    fn config(raw: Option<u64>, minute: Option<u64>, merge_rows: usize) -> StoreConfig {
        let days = |n: u64| Duration::from_secs(n * 86_400);
        StoreConfig {
            durability: Durability::Os,
            retention: Retention {
                raw: raw.map(days),
                minute: minute.map(days),
                hour: None,
            },
            merge_interval: Duration::from_secs(3600),
            merge_rows,
        }
    }

    fn store_keeping_all(dir: &Path) -> SqliteStore {
        SqliteStore::open_with(&dir.join("t.db"), config(None, None, usize::MAX)).unwrap()
    }

    /// A small deterministic generator, so that a failure can be replayed.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 11) % n
        }
    }

    /// Buckets must be what the raw points say: same count, min, max, first and last, and
    /// the same sum up to float rounding.
    fn assert_same(store: &SqliteStore, d: &DeviceId, metric: &str, from: i64, to: i64) {
        let raw = store
            .range(d, metric, i64::MIN, i64::MAX, usize::MAX)
            .unwrap();
        for step in [1_000, MINUTE, 7 * MINUTE, HOUR, DAY, 30 * DAY] {
            let (lo, hi) = (
                from.div_euclid(step) * step,
                to.div_euclid(step) * step + step - 1,
            );
            let want = bucketize(
                raw.iter().filter(|(t, _)| (lo..=hi).contains(t)).cloned(),
                step,
            );
            let got = store.buckets(d, metric, from, to, step).unwrap();
            assert_eq!(got.len(), want.len(), "{metric} step {step}");
            for (g, w) in got.iter().zip(&want) {
                let key = |b: &Bucket| (b.start, b.count, b.min, b.max, b.first, b.last);
                assert_eq!(key(g), key(w), "{metric} step {step}");
                assert!(
                    (g.sum - w.sum).abs() <= 1e-6 * w.sum.abs().max(1.0),
                    "{g:?} {w:?}"
                );
            }
        }
    }

    #[test]
    fn rollups_equal_aggregates_of_the_raw_points_before_and_after_merges() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_keeping_all(dir.path());
        let (a, b) = (id("a"), id("b"));
        let base = 1_700_000_000_000i64;
        let span = 90 * DAY;
        let mut rng = Lcg(7);
        let mut sent: Vec<(TimestampMs, i64)> = Vec::new();
        for round in 0..6 {
            let mut points = Vec::new();
            for _ in 0..400 {
                let ts = base + rng.next(span as u64) as i64;
                let v = rng.next(1000) as i64 - 500;
                sent.push((ts, v));
                points.push((&a, "t", ts, Value::Int(v)));
                points.push((&b, "t", ts, Value::Float(v as f64 / 4.0)));
                points.push((&a, "on", ts, Value::Bool(v > 0)));
                points.push((&a, "t", ts + 1, Value::Text("note".into())));
            }
            // Re-sent points, some with another value (the last one sent wins).
            for _ in 0..50 {
                let (ts, v) = sent[rng.next(sent.len() as u64) as usize];
                points.push((&a, "t", ts, Value::Int(v + round)));
            }
            store.commit(&batch(&points)).unwrap();
            // Queries agree with the raw points while part of the data is in the head.
            if round % 2 == 1 {
                assert_same(&store, &a, "t", base, base + span);
                store.merge(base + span).unwrap();
            }
        }
        for (d, m) in [(&a, "t"), (&b, "t"), (&a, "on")] {
            assert_same(&store, d, m, base, base + span);
            assert_same(&store, d, m, base + 3 * DAY + 1234, base + 40 * DAY - 77);
        }
        store.merge(base + span).unwrap();
        for (d, m) in [(&a, "t"), (&b, "t"), (&a, "on")] {
            assert_same(&store, d, m, base, base + span);
        }
        // Text is kept raw but never aggregated.
        assert!(store
            .buckets(&a, "nothing", base, base + span, HOUR)
            .unwrap()
            .is_empty());
        // A raw partition per day with points, and the rollups of both resolutions.
        let names: Vec<String> = store
            .read(|c| {
                c.prepare("SELECT name FROM partitions")?
                    .query_map([], |r| r.get(0))?
                    .collect()
            })
            .unwrap();
        assert!(
            names.iter().filter(|n| n.starts_with("raw_")).count() > 80,
            "{names:?}"
        );
        assert!(names.iter().any(|n| n.starts_with("m1_")));
        assert!(names.iter().any(|n| n.starts_with("h1_")));
    }

    #[test]
    fn retention_drops_whole_partitions_and_late_points_reach_the_rollups() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(Some(2), Some(60), usize::MAX);
        let store = SqliteStore::open_with(&dir.path().join("t.db"), config).unwrap();
        let d = id("d");
        let now = 400 * DAY + 12 * HOUR;
        let points: Vec<_> = (0..10)
            .map(|day| (&d, "t", now - day * DAY, Value::Int(day)))
            .collect();
        store.commit(&batch(&points)).unwrap();
        store.merge(now).unwrap();
        store.apply_retention(now).unwrap();
        // Raw: only the partitions that end after now - 2 days (today, yesterday and the day
        // before, as a partition is dropped whole).
        let raw: Vec<i64> = store
            .range(&d, "t", 0, now, 100)
            .unwrap()
            .into_iter()
            .map(|(t, _)| (now - t) / DAY)
            .collect();
        assert_eq!(raw, vec![2, 1, 0]);
        // The rollups still have every day.
        let days = store.buckets(&d, "t", 0, now, DAY).unwrap();
        assert_eq!(days.iter().map(|b| b.count).sum::<u64>(), 10);
        // A late point, older than the raw retention: into the rollups only.
        store
            .commit(&batch(&[(&d, "t", now - 20 * DAY, Value::Int(100))]))
            .unwrap();
        store.merge(now).unwrap();
        assert_eq!(store.range(&d, "t", 0, now - 5 * DAY, 100).unwrap(), vec![]);
        let old = store
            .buckets(&d, "t", now - 20 * DAY, now - 20 * DAY, HOUR)
            .unwrap();
        assert_eq!((old.len(), old[0].sum), (1, 100.0));
        let minute = store
            .buckets(&d, "t", now - 20 * DAY, now - 20 * DAY, MINUTE)
            .unwrap();
        assert_eq!((minute.len(), minute[0].count), (1, 1));
        // Past the minute retention, only hours are left.
        store.apply_retention(now + 100 * DAY).unwrap();
        assert!(store.buckets(&d, "t", 0, now, MINUTE).unwrap().is_empty());
        assert_eq!(store.buckets(&d, "t", 0, now, DAY).unwrap().len(), 11);
    }

    #[test]
    fn a_database_of_the_first_layout_is_moved_into_partitions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.execute_batch(
                "INSERT INTO series (id, device, metric) VALUES (1, 'd', 't');
                 INSERT INTO points VALUES (1, 60000, 1, 5), (1, 120000, 1, 7);
                 INSERT INTO latest VALUES (1, 120000, 1, 7);
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let store = store_keeping_all(dir.path());
        let d = id("d");
        let want = vec![(60_000, Value::Int(5)), (120_000, Value::Int(7))];
        assert_eq!(store.range(&d, "t", 0, i64::MAX, 10).unwrap(), want);
        store.merge(0).unwrap();
        assert_eq!(store.range(&d, "t", 0, i64::MAX, 10).unwrap(), want);
        let hour = store.buckets(&d, "t", 0, HOUR, HOUR).unwrap();
        assert_eq!((hour[0].count, hour[0].sum), (2, 12.0));
    }

    #[test]
    fn housekeeping_merges_when_the_head_is_full_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let config = config(Some(30), Some(365), 3);
        let d = id("d");
        let now = tellus_core::now_ms();
        {
            let store = SqliteStore::open_with(&path, config).unwrap();
            let points: Vec<_> = (0..2).map(|i| (&d, "t", now + i, Value::Int(i))).collect();
            store.commit(&batch(&points)).unwrap();
            store.maintain(now).unwrap();
            assert_eq!(read(&store.head).unwrap().rows, 2, "not full yet");
        }
        // Reopened: the head is read back, then merged once full.
        let store = SqliteStore::open_with(&path, config).unwrap();
        assert_eq!(read(&store.head).unwrap().rows, 2);
        store
            .commit(&batch(&[(&d, "t", now + 5, Value::Int(5))]))
            .unwrap();
        store.maintain(now).unwrap();
        assert_eq!(read(&store.head).unwrap().rows, 0);
        assert_eq!(store.range(&d, "t", 0, i64::MAX, 100).unwrap().len(), 3);
        assert_eq!(
            store.latest(&d).unwrap(),
            vec![("t".into(), now + 5, Value::Int(5))]
        );
        assert_eq!(
            store.latest_of_metric("t", None, 10).unwrap(),
            vec![(d.clone(), now + 5, Value::Int(5))]
        );
    }

    #[test]
    fn a_point_sent_again_after_retention_does_not_hide_rolled_up_history() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(Some(2), None, usize::MAX);
        let store = SqliteStore::open_with(&dir.path().join("t.db"), config).unwrap();
        let d = id("d");
        let now = 400 * DAY + 12 * HOUR;
        let points: Vec<_> = (0..10)
            .map(|day| (&d, "t", now - day * DAY, Value::Int(1)))
            .collect();
        store.commit(&batch(&points)).unwrap();
        store.merge(now).unwrap();
        store.apply_retention(now).unwrap();
        let total = |store: &SqliteStore| {
            let b = store.buckets(&d, "t", 0, now, 30 * DAY).unwrap();
            (
                b.iter().map(|b| b.count).sum::<u64>(),
                b.iter().map(|b| b.sum).sum::<f64>(),
            )
        };
        assert_eq!(total(&store), (10, 10.0));
        // The newest point again, with another value: it replaces the first in place.
        store
            .commit(&batch(&[(&d, "t", now, Value::Int(5))]))
            .unwrap();
        assert_eq!(total(&store), (10, 14.0), "while the point is in the head");
        assert_eq!(store.range(&d, "t", 0, now, 100).unwrap().len(), 3);
        store.merge(now).unwrap();
        assert_eq!(total(&store), (10, 14.0), "once merged");
    }

    #[test]
    fn commits_are_refused_while_merges_fail_and_resume_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let config = config(Some(30), Some(365), 2);
        let store = SqliteStore::open_with(&path, config).unwrap();
        // A merge writes `latest`; while `broken` has a row, that fails.
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE broken (x); INSERT INTO broken VALUES (1);
                 CREATE TRIGGER fail BEFORE INSERT ON latest WHEN EXISTS (SELECT 1 FROM broken)
                 BEGIN SELECT RAISE(ABORT, 'disk full, say'); END;",
            )
            .unwrap();
        let d = id("d");
        let now = tellus_core::now_ms();
        let one = |ts| batch(&[(&d, "t", ts, Value::Int(1))]);
        store.commit(&one(now)).unwrap();
        store.commit(&one(now + 1)).unwrap();
        assert!(store.maintain(now).is_err());
        store.commit(&one(now + 2)).unwrap();
        store.commit(&one(now + 3)).unwrap();
        assert!(matches!(
            store.commit(&one(now + 4)),
            Err(StoreError::Backlog(4))
        ));
        // Everything committed is still queryable, and nothing is lost once merges work.
        assert_eq!(store.range(&d, "t", 0, now + 10, 100).unwrap().len(), 4);
        Connection::open(&path)
            .unwrap()
            .execute_batch("DELETE FROM broken")
            .unwrap();
        store.maintain(now).unwrap();
        store.commit(&one(now + 4)).unwrap();
        assert_eq!(store.range(&d, "t", 0, now + 10, 100).unwrap().len(), 5);
        assert_eq!(read(&store.head).unwrap().rows, 1);
    }

    #[test]
    fn the_latest_of_a_metric_pages_by_device_across_partitions_and_head() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_keeping_all(dir.path());
        let (a, b, c) = (id("a"), id("b"), id("c"));
        let now = tellus_core::now_ms();
        store
            .commit(&batch(&[
                (&a, "t", now, Value::Int(1)),
                (&c, "t", now, Value::Int(3)),
            ]))
            .unwrap();
        store.merge(now).unwrap();
        // b is in the head only; a has a newer value there.
        store
            .commit(&batch(&[
                (&b, "t", now, Value::Int(2)),
                (&a, "t", now + 1, Value::Int(9)),
            ]))
            .unwrap();
        let mut pages = Vec::new();
        let mut after = None;
        loop {
            let page = store.latest_of_metric("t", after.as_ref(), 1).unwrap();
            let Some((last, ..)) = page.last().cloned() else {
                break;
            };
            pages.push(page);
            after = Some(last);
        }
        assert_eq!(
            pages,
            vec![
                vec![(a.clone(), now + 1, Value::Int(9))],
                vec![(b.clone(), now, Value::Int(2))],
                vec![(c.clone(), now, Value::Int(3))],
            ]
        );
        assert_eq!(store.latest_of_metric("t", None, 10).unwrap().len(), 3);
    }
}
