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
//! - `head_merged`: while a merge cycle is under way, the series it has merged and up to
//!   which head row;
//! - `deadletters`: payloads that were not valid telemetry, raw, with the reason.
//!
//! A commit (the ingest thread's group commit, one fsync) only appends to `head`. A merge
//! moves the head into its day tables, sorted by series and time so that each series
//! touches its newest pages only, updates `latest`, and recomputes the rollup rows of every
//! minute (from the raw points) and hour (from the minute rows) it touched, so rollups
//! always equal what the raw points say, re-sent and late points included. Retention drops
//! whole partitions (a `DROP TABLE`, not row deletes) once they end before the retention of
//! their resolution; a point that arrives older than the raw retention goes into the
//! rollups only.
//!
//! A merge runs in chunks, so that commits (and so PUBACKs) never wait for a whole one. A
//! merge *cycle* starts at most `merge_interval` after a commit or once `head` holds
//! `merge_rows` points, and fixes a watermark: the newest head rowid (`seq`) committed. It
//! then merges chunks of whole series, in id order (`CHUNK_POINTS` points or
//! `CHUNK_SERIES` series at most, see there), one transaction each, the ingest thread
//! committing between them: each chunk merges its series' head points with rowids up to
//! the watermark and records in `head_merged` that those series are merged up to it. Points
//! committed meanwhile have larger rowids and wait for the next cycle, also when they
//! replace a point of the cycle (the same series and time sent again: then the newer value
//! is the one kept, and merged next time). Once every series is merged, the head rows up
//! to the watermark leave the table, a slice of the rowid range a step, and `head_merged`
//! with the last slice. Steps keep their size at a steady rate, and grow when commits come
//! so fast that the head would fill up before the cycle is through (`SqliteStore::pace`).
//!
//! A crash loses nothing and counts nothing twice: a chunk's points and its `head_merged`
//! rows are committed together, and at the next start the head is read back without the
//! rows `head_merged` says are merged, then the cycle goes on with the series left. (Merging
//! a point twice would do no harm either: raw points are keyed by series and time, `latest`
//! moves only forward, and a rollup bucket that gains a point it summarised is summed
//! again. Skipping keeps every point in one place, the head or the partitions.)
//!
//! Queries see every committed point: they read the partitions and add the head from
//! memory. A query holds the head's read lock from copying the head until its read
//! transaction has its snapshot, and a merge chunk holds the write lock from its commit
//! until its points are gone from the in-memory head, so a query sees each point once,
//! either in the head or in the partitions; while a chunk writes its transaction, queries
//! go on. A series is merged whole in one chunk, so its rollups always agree with its raw
//! points.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
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
/// the head, from which the first merge partitions them and builds their rollups; migration
/// 3 adds `head_merged`, the progress of a merge in chunks.
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
    "CREATE TABLE head_merged (
        series  INTEGER PRIMARY KEY REFERENCES series(id),
        upto    INTEGER NOT NULL
    );",
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
    /// Head size (points) that starts a merge at once; merge steps grow when commits would
    /// otherwise fill the head to it again before the merge is through.
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
/// A merge chunk takes whole series, in id order, until it holds `CHUNK_POINTS` points or
/// `CHUNK_SERIES` series, whichever comes first (a series with more points than that goes
/// alone). While a chunk is written nothing is committed, so these bound how long a device
/// waits for its PUBACK behind a merge. Measured with the store bench's steady load (3,000
/// series at 72,000 points/s, BENCHMARKS.md), where a chunk is 256 series of 24 points and
/// takes about 10 ms: the p99 from a message's arrival to its commit is 15 ms; with 4,096
/// points and 128 series it was 9 ms, with 16,384 and 512 28 ms, with 32,768 and 1,024
/// 68 ms, at the same saturated throughput or lower. Each chunk is a transaction with an
/// fsync of its own, which costs more on slower disks than on the bench's, so the smaller
/// size was not taken: this one keeps the p99 at a third of the 50 ms goal. The cap on
/// series bounds chunks of many series with few points each, where the work per series
/// (`latest`, rollup rows, `head_merged`) is most of it.
const CHUNK_POINTS: usize = 8_192;
const CHUNK_SERIES: usize = 256;

/// Most head rows one step deletes at the end of a merge cycle: the cycle's rows leave the
/// head table in slices, since deleting 72,000 rows at once took 15 to 20 ms (the longest
/// step of a cycle at the steady load); a slice of this size takes 3 to 4 ms (9 ms at most
/// seen).
const DELETE_SLICE: usize = 32_768;

/// How much one merge step takes on: a chunk's points and series, or the head rows deleted
/// (`CHUNK_POINTS`, `CHUNK_SERIES`, `DELETE_SLICE`; tests make them small). A step may take
/// on more when commits come faster than steps at this size would merge them (see
/// `SqliteStore::pace`).
#[derive(Debug, Clone, Copy)]
struct StepBudget {
    points: usize,
    series: usize,
    head_rows: usize,
}

impl StepBudget {
    /// This budget `by` times over (`by` at least 1).
    fn scaled(self, by: f64) -> StepBudget {
        // Float to integer casts saturate.
        let times = |n: usize| (n as f64 * by.max(1.0)) as usize;
        StepBudget {
            points: times(self.points),
            series: times(self.series),
            head_rows: times(self.head_rows),
        }
    }
}

impl Default for StepBudget {
    fn default() -> Self {
        StepBudget {
            points: CHUNK_POINTS,
            series: CHUNK_SERIES,
            head_rows: DELETE_SLICE,
        }
    }
}

/// Most series ids the writer keeps in memory; past this the cache starts over.
const SERIES_CACHE_MAX: usize = 100_000;

/// A series' key in the id maps: (device, metric).
type SeriesKey = (DeviceId, String);

/// Points committed to `head` and not merged yet, by series; what queries add to the
/// partitions. Bounded by twice `merge_rows` (the backlog guard in `commit`).
#[derive(Debug, Default)]
struct Head {
    series: HashMap<i64, HeadSeries>,
    /// Rows of the head table not merged yet (re-sent points count again: they are rows
    /// until merged).
    rows: usize,
    /// When the oldest point that no merge cycle has taken yet was committed.
    since: Option<Instant>,
    /// The rowid (`seq`) of the newest head row: the largest in the table, as SQLite gives
    /// a new row the largest rowid plus one.
    last_seq: i64,
}

#[derive(Debug)]
struct HeadSeries {
    device: DeviceId,
    metric: String,
    /// The last value committed for each time, with its head rowid (a re-sent point
    /// replaces the earlier one, so this is the newest rowid of that time).
    points: BTreeMap<TimestampMs, (i64, Value)>,
    /// Rowids of head rows whose point a later commit replaced: still rows of the table,
    /// counted in `rows`, until the merge cycle that covers them is through this series.
    replaced: Vec<i64>,
}

/// A merge under way: the head rows up to a watermark, moved into the partitions in chunks
/// of whole series (see the module docs).
#[derive(Debug)]
struct Cycle {
    /// The watermark: this cycle merges the head rows with `seq <= upto`; rows committed
    /// after it started have larger rowids and wait for the next cycle.
    upto: i64,
    /// The series still to merge, in id order.
    left: VecDeque<i64>,
    /// About how many points are still to merge and how many head rows to delete: what
    /// the steps left have to do (see `SqliteStore::pace`).
    points: usize,
    rows: usize,
    /// `Head::since` when the cycle started, put back if it is given up.
    since: Option<Instant>,
}

struct Writer {
    conn: Connection,
    /// Ids of series whose rows are committed (only ids a successful COMMIT made durable: an
    /// id from a transaction that rolled back could be handed to another series).
    series: HashMap<SeriesKey, i64>,
    /// Partition tables known to exist (committed).
    partitions: HashSet<String>,
    last_retention: Option<Instant>,
    /// The merge cycle under way, if any.
    cycle: Option<Cycle>,
    budget: StepBudget,
    /// Points committed since the last housekeeping call: how fast the head fills while
    /// merge steps run (see `SqliteStore::pace`).
    committed: usize,
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
        // A cycle the process stopped in is taken up where it was: the series it merged are
        // in `head_merged` (and were skipped by `load_head`), the others are still to merge.
        let interrupted: Option<i64> =
            conn.query_row("SELECT max(upto) FROM head_merged", [], |r| r.get(0))?;
        let cycle = match interrupted {
            Some(upto) => {
                let mut left: Vec<i64> = head
                    .series
                    .iter()
                    .filter(|(_, s)| s.oldest_seq().is_some_and(|seq| seq <= upto))
                    .map(|(id, _)| *id)
                    .collect();
                left.sort_unstable();
                let points = left
                    .iter()
                    .filter_map(|id| head.series.get(id))
                    .map(|s| s.points_upto(upto))
                    .sum();
                let rows: i64 =
                    conn.query_row("SELECT count(*) FROM head WHERE seq <= ?1", [upto], |r| {
                        r.get(0)
                    })?;
                Some(Cycle {
                    upto,
                    left: left.into(),
                    points,
                    rows: usize::try_from(rows).unwrap_or(0),
                    since: head.since,
                })
            }
            None => None,
        };
        Ok(SqliteStore {
            writer: Mutex::new(Writer {
                conn,
                series: HashMap::new(),
                partitions,
                last_retention: None,
                cycle,
                budget: StepBudget::default(),
                committed: 0,
            }),
            reader: Mutex::new(reader),
            head: RwLock::new(head),
            config,
        })
    }

    /// Moves the whole head into its partitions and rollups now: the cycle under way, if
    /// any, to its end, then a cycle of the points committed after it started (the ingest
    /// thread merges on its own schedule, a chunk at a time, through
    /// [`TelemetryStore::maintain`]).
    pub fn merge(&self, now: TimestampMs) -> Result<(), StoreError> {
        let mut w = lock(&self.writer)?;
        let under_way = w.cycle.is_some();
        while self.merge_step(&mut w, now, 0)? {}
        if under_way {
            while self.merge_step(&mut w, now, 0)? {}
        }
        Ok(())
    }

    /// Drops the partitions past retention now.
    pub fn apply_retention(&self, now: TimestampMs) -> Result<usize, StoreError> {
        let mut w = lock(&self.writer)?;
        self.retention_locked(&mut w, now)
    }

    /// One step of merging: starts a cycle if none is under way (and the head holds
    /// anything), then merges the cycle's next chunk, or deletes the cycle's rows from
    /// `head` once every series of it is merged. Returns whether the cycle has steps left.
    ///
    /// `arrived`: the points committed since the last step (see `pace`).
    ///
    /// A step that fails gives the cycle up: what its chunks merged stays merged (and out
    /// of the in-memory head), and the next cycle, with a later watermark, takes the rest.
    fn merge_step(
        &self,
        w: &mut Writer,
        now: TimestampMs,
        arrived: usize,
    ) -> Result<bool, StoreError> {
        if w.cycle.is_none() && !self.start_cycle(w)? {
            return Ok(false);
        }
        let in_memory = read(&self.head)?.rows;
        let budget = match &w.cycle {
            Some(c) => w.budget.scaled(self.pace(c, w.budget, in_memory, arrived)),
            None => w.budget,
        };
        let stepped = match w.cycle.as_ref().map(|c| c.left.is_empty()) {
            Some(false) => self.merge_chunk(w, now, budget).map(|()| true),
            Some(true) | None => self.finish_cycle(w, budget).map(|over| !over),
        };
        if stepped.is_err() {
            if let Some(cycle) = w.cycle.take() {
                let mut head = write(&self.head)?;
                head.since = earliest(head.since, cycle.since);
            }
        }
        stepped
    }

    /// Starts a merge cycle of everything committed so far; `false` if the head is empty.
    fn start_cycle(&self, w: &mut Writer) -> Result<bool, StoreError> {
        let mut head = write(&self.head)?;
        if head.rows == 0 {
            head.since = None;
            return Ok(false);
        }
        // Every point in memory was committed by now, so its rowid is at most `last_seq`.
        let mut left: Vec<i64> = head.series.keys().copied().collect();
        left.sort_unstable();
        w.cycle = Some(Cycle {
            upto: head.last_seq,
            left: left.into(),
            points: head.series.values().map(|s| s.points.len()).sum(),
            rows: head.rows,
            since: head.since.take(),
        });
        Ok(true)
    }

    /// How many times its usual size the next step of `cycle` must be. A cycle should be
    /// over before the points committed meanwhile fill the head to `merge_rows` (where the
    /// next cycle starts at once): cycles then stay large, and a large cycle merges more
    /// points of each series at once, which writes fewer pages per point (a series'
    /// newest pages are written once per cycle whatever it brings). So if the steps left,
    /// at their usual size, would let more points arrive (`arrived` a step, as since the
    /// last step) than the head has room for, each takes on proportionally more. At a
    /// steady rate the head fills far slower than that and steps keep their size; under a
    /// load the store can barely take, steps grow, which bounds the head and keeps merging
    /// ahead of commits.
    fn pace(&self, cycle: &Cycle, budget: StepBudget, in_memory: usize, arrived: usize) -> f64 {
        let after = in_memory.saturating_sub(cycle.points);
        let room = self.config.merge_rows.max(1).saturating_sub(after).max(1);
        let chunks = (cycle.points.div_ceil(budget.points.max(1)))
            .max(cycle.left.len().div_ceil(budget.series.max(1)));
        let slices = cycle.rows.div_ceil(budget.head_rows.max(1));
        (chunks + slices) as f64 * arrived as f64 / room as f64
    }

    /// Merges the cycle's next chunk of series, in one transaction, then drops its points
    /// from the in-memory head.
    fn merge_chunk(
        &self,
        w: &mut Writer,
        now: TimestampMs,
        budget: StepBudget,
    ) -> Result<(), StoreError> {
        let Writer {
            conn,
            partitions,
            cycle,
            ..
        } = w;
        let Some(cycle) = cycle.as_mut() else {
            return Ok(());
        };
        let upto = cycle.upto;
        let mut created = Vec::new();
        let tx = sqlite::write_transaction(conn)?;
        let chunk = {
            // Only the holder of the writer lock changes the head, so reading it is enough
            // while the transaction is written; queries go on meanwhile.
            let head = read(&self.head)?;
            let chunk = next_chunk(&head, &cycle.left, upto, budget);
            merge_head(
                &tx,
                &head,
                &chunk,
                upto,
                &self.config.retention,
                now,
                partitions,
                &mut created,
            )?;
            chunk
        };
        for id in &chunk {
            tx.prepare_cached(
                "INSERT INTO head_merged (series, upto) VALUES (?1, ?2)
                 ON CONFLICT (series) DO UPDATE SET upto = excluded.upto",
            )?
            .execute(params![id, upto])?;
        }
        // Exclusive from the commit until the head is changed: a query sees each point
        // once, in the head or in the partitions (see the module docs).
        let mut head = write(&self.head)?;
        tx.commit()?;
        partitions.extend(created);
        let before = head.rows;
        for id in &chunk {
            head.merged(*id, upto);
        }
        cycle.points = cycle.points.saturating_sub(before - head.rows);
        cycle.left.drain(..chunk.len());
        Ok(())
    }

    /// Ends the cycle, once every series of it is merged: its rows leave the head table,
    /// at most `DELETE_SLICE` a step (the oldest first, a range of the rowid), and with the
    /// last of them its progress records. Returns whether the cycle is over.
    fn finish_cycle(&self, w: &mut Writer, budget: StepBudget) -> Result<bool, StoreError> {
        let Some(upto) = w.cycle.as_ref().map(|c| c.upto) else {
            return Ok(true);
        };
        // Nothing refers to head rows, so deleting them cannot break a reference; with
        // enforcement on, SQLite looks each deleted row's series up all the same, which
        // doubles the cost of the delete (measured).
        w.conn.pragma_update(None, "foreign_keys", false)?;
        let slice = i64::try_from(budget.head_rows.max(1)).unwrap_or(i64::MAX);
        let deleted = delete_head_slice(&mut w.conn, upto, slice);
        w.conn.pragma_update(None, "foreign_keys", true)?;
        let (deleted, over) = deleted?;
        match &mut w.cycle {
            Some(_) if over => w.cycle = None,
            Some(c) => c.rows = c.rows.saturating_sub(deleted),
            None => {}
        }
        Ok(over)
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
                    .map(|(t, (_, v))| (*t, v.clone()))
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
                let (ts, (_, v)) = s.points.last_key_value()?;
                Some((key, *ts, v.clone()))
            })
            .collect()
    }
}

/// Reads the head table (what was committed but not merged when the process stopped) into
/// memory, leaving out the rows an interrupted merge cycle already merged (`head_merged`),
/// so that no point is both in memory and in the partitions.
fn load_head(conn: &Connection) -> Result<Head, StoreError> {
    let mut head = Head::default();
    let mut stmt = conn.prepare(
        "SELECT h.seq, h.series, s.device, s.metric, h.ts, h.kind, h.value
         FROM head h JOIN series s ON s.id = h.series
         WHERE NOT EXISTS (
            SELECT 1 FROM head_merged m WHERE m.series = h.series AND m.upto >= h.seq
         )
         ORDER BY h.seq",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let device: String = r.get(2)?;
        let device = DeviceId::parse(&device).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, e.into())
        })?;
        let value = from_sql(r.get(5)?, r.get(6)?);
        head.add(
            r.get(1)?,
            &device,
            &r.get::<_, String>(3)?,
            r.get(4)?,
            r.get(0)?,
            value,
        );
    }
    // Rows merged but not yet deleted are still the table's: new rowids come after them.
    head.last_seq = conn.query_row("SELECT coalesce(max(seq), 0) FROM head", [], |r| r.get(0))?;
    if head.rows > 0 {
        head.since = Some(Instant::now());
    }
    Ok(head)
}

impl Head {
    /// Adds a committed point, head row `seq`.
    fn add(
        &mut self,
        series: i64,
        device: &DeviceId,
        metric: &str,
        ts: TimestampMs,
        seq: i64,
        v: Value,
    ) {
        let s = self.series.entry(series).or_insert_with(|| HeadSeries {
            device: device.clone(),
            metric: metric.to_owned(),
            points: BTreeMap::new(),
            replaced: Vec::new(),
        });
        if let Some((old, _)) = s.points.insert(ts, (seq, v)) {
            s.replaced.push(old);
        }
        self.rows += 1;
        self.last_seq = self.last_seq.max(seq);
        self.since.get_or_insert_with(Instant::now);
    }

    /// Forgets what a merge chunk moved of series `id`: its points and replaced rows with
    /// rowids up to `upto`. Points committed after the cycle started stay.
    fn merged(&mut self, id: i64, upto: i64) {
        let Some(s) = self.series.get_mut(&id) else {
            return;
        };
        let before = s.points.len() + s.replaced.len();
        s.points.retain(|_, (seq, _)| *seq > upto);
        s.replaced.retain(|seq| *seq > upto);
        let after = s.points.len() + s.replaced.len();
        self.rows = self.rows.saturating_sub(before - after);
        if after == 0 {
            self.series.remove(&id);
        }
    }
}

impl HeadSeries {
    /// The smallest rowid of this series' head rows.
    fn oldest_seq(&self) -> Option<i64> {
        let points = self.points.values().map(|(seq, _)| *seq);
        points.chain(self.replaced.iter().copied()).min()
    }

    /// How many of this series' points a cycle up to `upto` merges.
    fn points_upto(&self, upto: i64) -> usize {
        self.points.values().filter(|(seq, _)| *seq <= upto).count()
    }
}

/// The series of the next chunk: the first of `left` (in id order), as many as `budget`
/// allows, and at least one.
fn next_chunk(head: &Head, left: &VecDeque<i64>, upto: i64, budget: StepBudget) -> Vec<i64> {
    let mut chunk = Vec::new();
    let mut points: usize = 0;
    for id in left {
        let n = head.series.get(id).map_or(0, |s| s.points_upto(upto));
        let full = points.saturating_add(n) > budget.points || chunk.len() >= budget.series;
        if !chunk.is_empty() && full {
            break;
        }
        chunk.push(*id);
        points += n;
    }
    chunk
}

/// Deletes the oldest head rows up to `upto`, about `slice` of them, and the merge's
/// progress records with the last; returns how many it deleted and whether none is left.
/// Safe to stop after any slice: the rows left are still skipped at the next start, as
/// `head_merged` says they are merged.
fn delete_head_slice(
    conn: &mut Connection,
    upto: i64,
    slice: i64,
) -> Result<(usize, bool), rusqlite::Error> {
    let tx = sqlite::write_transaction(conn)?;
    let oldest: Option<i64> = tx.query_row("SELECT min(seq) FROM head", [], |r| r.get(0))?;
    // Rowids are dense (a row gets the largest plus one), so a slice of rowids is about
    // as many rows.
    let to = oldest.map_or(upto, |o| upto.min(o.saturating_add(slice - 1)));
    let deleted = tx.execute("DELETE FROM head WHERE seq <= ?1", [to])?;
    let over = to >= upto;
    if over {
        tx.execute("DELETE FROM head_merged", [])?;
    }
    tx.commit()?;
    Ok((deleted, over))
}

/// The earlier of two instants, either of which may be missing.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
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

/// Writes the head points of series `ids` with rowids up to `upto` into their partitions,
/// `latest` and the rollups (see the module docs).
#[allow(clippy::too_many_arguments)]
fn merge_head(
    tx: &Transaction<'_>,
    head: &Head,
    ids: &[i64],
    upto: i64,
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
    for id in ids {
        let Some(s) = head.series.get(id) else {
            continue;
        };
        // The newest point this cycle merges; a newer one committed since stays in the head.
        let mut newest = None;
        for (&ts, (seq, value)) in &s.points {
            if *seq > upto {
                continue;
            }
            newest = Some((ts, value));
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
        if let Some((ts, value)) = newest {
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
        let Writer {
            conn,
            series,
            committed,
            ..
        } = &mut *w;
        // Series ids of this transaction; they reach `series` only once COMMIT succeeded.
        let mut resolved = HashMap::new();
        // (series, head rowid) of each sample: a merge cycle takes the rows up to its
        // watermark.
        let mut rows = Vec::with_capacity(batch.samples.len());
        let tx = sqlite::write_transaction(conn)?;
        let result = (|| {
            for (device, s) in &batch.samples {
                let id = series_id(&tx, series, &mut resolved, device, &s.metric)?;
                let (kind, value) = to_sql(&s.value);
                let seq = tx
                    .prepare_cached(
                        "INSERT INTO head (series, ts, kind, value) VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .insert(params![id, s.ts_ms, kind, value])?;
                rows.push((id, seq));
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
        *committed = committed.saturating_add(batch.samples.len());
        let mut head = write(&self.head)?;
        for ((device, s), (id, seq)) in batch.samples.iter().zip(rows) {
            head.add(id, device, &s.metric, s.ts_ms, seq, s.value.clone());
        }
        Ok(())
    }

    /// One step at most: a merge cycle's chunk, or its end (and retention when due), so
    /// that the ingest thread commits between the steps; `Some(Duration::ZERO)` while the
    /// cycle has steps left.
    fn maintain(&self, now: TimestampMs) -> Result<Option<Duration>, StoreError> {
        let mut w = lock(&self.writer)?;
        let (rows, since) = {
            let head = read(&self.head)?;
            (head.rows, head.since)
        };
        // The ingest thread calls this after every commit: what arrived since the last call
        // is what arrives while a step runs.
        let arrived = std::mem::take(&mut w.committed);
        let merge_due = w.cycle.is_some()
            || rows >= self.config.merge_rows.max(1)
            || since.is_some_and(|s| s.elapsed() >= self.config.merge_interval);
        let merged = if merge_due {
            self.merge_step(&mut w, now, arrived)
        } else {
            Ok(false)
        };
        // Retention frees room whether or not the merge went through.
        let retention_due = w
            .last_retention
            .is_none_or(|t| t.elapsed() >= RETENTION_EVERY);
        if retention_due {
            self.retention_locked(&mut w, now)?;
        }
        if merged? {
            return Ok(Some(Duration::ZERO));
        }
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

    /// Makes merge steps take on at most `points` points and `series` series a chunk, and
    /// delete `head_rows` head rows a step.
    fn budget(store: &SqliteStore, points: usize, series: usize, head_rows: usize) {
        lock(&store.writer).unwrap().budget = StepBudget {
            points,
            series,
            head_rows,
        };
    }

    /// Runs one merge step (starting a cycle if none is under way); whether more follow.
    fn step(store: &SqliteStore, now: TimestampMs) -> bool {
        let mut w = lock(&store.writer).unwrap();
        store.merge_step(&mut w, now, 0).unwrap()
    }

    /// The series of the cycle under way still to merge, and its watermark.
    fn cycle(store: &SqliteStore) -> Option<(usize, i64)> {
        let w = lock(&store.writer).unwrap();
        w.cycle.as_ref().map(|c| (c.left.len(), c.upto))
    }

    fn count(store: &SqliteStore, sql: &str) -> i64 {
        store.read(|c| c.query_row(sql, [], |r| r.get(0))).unwrap()
    }

    /// Every row of every partition table and of `latest`, by table, in key order.
    fn dump(store: &SqliteStore) -> Vec<(String, Vec<Vec<rusqlite::types::Value>>)> {
        store
            .read(|c| {
                let mut names: Vec<String> = c
                    .prepare("SELECT name FROM partitions ORDER BY name")?
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                names.push("latest".into());
                names
                    .into_iter()
                    .map(|name| {
                        let mut stmt = c.prepare(&format!("SELECT * FROM {name} ORDER BY 1, 2"))?;
                        let width = stmt.column_count();
                        let rows = stmt
                            .query_map([], |r| (0..width).map(|i| r.get(i)).collect())?
                            .collect::<Result<_, _>>()?;
                        Ok((name, rows))
                    })
                    .collect()
            })
            .unwrap()
    }

    /// What a store must answer: the last value sent for each series and time.
    type Expected = BTreeMap<(String, String), BTreeMap<TimestampMs, Value>>;

    /// `n` random points on `devices` × (`t`, `on`, `note`) within `span` ms of `base`,
    /// about one in ten a time sent before again with another value; also recorded in
    /// `expected`.
    fn random_points(
        rng: &mut Lcg,
        devices: &[DeviceId],
        base: TimestampMs,
        span: i64,
        n: usize,
        expected: &mut Expected,
    ) -> Batch {
        let mut points = Vec::new();
        for _ in 0..n {
            let d = &devices[rng.next(devices.len() as u64) as usize];
            let (metric, v) = match rng.next(6) {
                0 => ("on", Value::Bool(rng.next(2) == 0)),
                1 => ("note", Value::Text(format!("n{}", rng.next(100)))),
                2 => ("t", Value::Float(rng.next(1000) as f64 / 8.0)),
                _ => ("t", Value::Int(rng.next(1000) as i64 - 500)),
            };
            let key = (d.as_str().to_owned(), metric.to_owned());
            let sent = expected.get(&key).filter(|_| rng.next(10) == 0);
            let ts = match sent.and_then(|s| s.keys().nth(rng.next(s.len() as u64) as usize)) {
                Some(ts) => *ts,
                None => base + rng.next(span as u64) as i64,
            };
            expected.entry(key).or_default().insert(ts, v.clone());
            points.push((d.clone(), metric, ts, v));
        }
        batch(
            &points
                .iter()
                .map(|(d, m, ts, v)| (d, *m, *ts, v.clone()))
                .collect::<Vec<_>>(),
        )
    }

    /// Queries answer what was sent: every point once, latest values, and buckets that
    /// agree with the raw points.
    fn assert_answers(store: &SqliteStore, expected: &Expected) {
        for ((device, metric), points) in expected {
            let d = id(device);
            let want: Vec<_> = points.iter().map(|(t, v)| (*t, v.clone())).collect();
            let got = store
                .range(&d, metric, i64::MIN, i64::MAX, usize::MAX)
                .unwrap();
            assert_eq!(got, want, "{device} {metric}");
            let numbers = points.values().filter(|v| numeric(v).is_some()).count() as u64;
            for step in [MINUTE, HOUR] {
                let buckets = store
                    .buckets(&d, metric, i64::MIN / 4, i64::MAX / 4, step)
                    .unwrap();
                let counted: u64 = buckets.iter().map(|b| b.count).sum();
                assert_eq!(counted, numbers, "{device} {metric} step {step}");
            }
            let latest = store.latest(&d).unwrap();
            let newest = points.last_key_value().map(|(t, v)| (*t, v.clone()));
            let found = latest
                .iter()
                .find(|(m, ..)| m == metric)
                .map(|(_, t, v)| (*t, v.clone()));
            assert_eq!(found, newest, "{device} {metric}");
        }
    }

    #[test]
    fn a_merge_in_chunks_writes_what_one_merge_writes() {
        let (one, many) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (one, many) = (
            store_keeping_all(one.path()),
            store_keeping_all(many.path()),
        );
        budget(&one, usize::MAX, usize::MAX, usize::MAX);
        budget(&many, 40, 3, 50);
        let devices: Vec<DeviceId> = (0..8).map(|i| id(&format!("d{i}"))).collect();
        let base = 1_700_000_000_000i64;
        let mut rng = Lcg(11);
        let mut expected = Expected::new();
        for round in 0..4 {
            // Over three days, so that chunks meet several partitions; later rounds replace
            // and precede merged points, so that rollups are summed again.
            let points = random_points(&mut rng, &devices, base, 3 * DAY, 600, &mut expected);
            one.commit(&points).unwrap();
            many.commit(&points).unwrap();
            one.merge(base).unwrap();
            let mut steps = 1;
            while step(&many, base) {
                steps += 1;
            }
            // 24 series in chunks of 3 at most, and about 600 rows deleted 50 at a time.
            assert!(steps >= 8 + 600 / 50, "round {round}: {steps} steps");
            assert_eq!(dump(&many), dump(&one), "round {round}");
            for store in [&one, &many] {
                assert_eq!(count(store, "SELECT count(*) FROM head"), 0);
                assert_eq!(count(store, "SELECT count(*) FROM head_merged"), 0);
                assert_eq!(read(&store.head).unwrap().rows, 0);
            }
        }
        assert_answers(&many, &expected);
        assert_same(&many, &devices[0], "t", base, base + 3 * DAY);
    }

    #[test]
    fn points_committed_during_a_cycle_wait_for_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_keeping_all(dir.path());
        budget(&store, 1, 1, usize::MAX);
        let (a, b, c, d) = (id("a"), id("b"), id("c"), id("d"));
        let minute = 1_700_000_040_000i64;
        store
            .commit(&batch(&[
                (&a, "t", minute, Value::Int(1)),
                (&b, "t", minute, Value::Int(1)),
                (&c, "t", minute, Value::Int(1)),
                (&a, "t", minute + 1, Value::Int(2)),
            ]))
            .unwrap();
        // The first chunk: series a.
        assert!(step(&store, minute));
        let (left, upto) = cycle(&store).unwrap();
        assert_eq!((left, upto), (2, 4));
        // A point of a merged series, one that replaces a point of a series not merged
        // yet, one more of that series, and a new series.
        store
            .commit(&batch(&[
                (&a, "t", minute + 2, Value::Int(3)),
                (&b, "t", minute, Value::Int(10)),
                (&c, "t", minute + 5, Value::Int(5)),
                (&d, "t", minute, Value::Int(7)),
            ]))
            .unwrap();
        while step(&store, minute) {}
        // Only the points committed before the cycle started were merged, and b's was
        // replaced before its turn: nothing of b is in the partitions.
        let raw = |store: &SqliteStore| -> Vec<(i64, i64, i64)> {
            let name = Res::Raw.partition(minute).name;
            store
                .read(|c| {
                    c.prepare(&format!(
                        "SELECT series, ts, value FROM {name} ORDER BY 1, 2"
                    ))?
                    .query_map([], |r| {
                        Ok((r.get(0)?, r.get::<_, i64>(1)? - minute, r.get(2)?))
                    })?
                    .collect()
                })
                .unwrap()
        };
        assert_eq!(raw(&store), vec![(1, 0, 1), (1, 1, 2), (3, 0, 1)]);
        assert_eq!(count(&store, "SELECT count(*) FROM head"), 4);
        assert_eq!(count(&store, "SELECT min(seq) FROM head"), 5);
        assert_eq!(count(&store, "SELECT count(*) FROM head_merged"), 0);
        assert_eq!(read(&store.head).unwrap().rows, 4);
        assert_eq!(count(&store, "SELECT count(*) FROM latest"), 2);
        let all = |d: &DeviceId| store.range(d, "t", 0, i64::MAX, 10).unwrap();
        let rel = |points: Vec<(i64, Value)>| -> Vec<(i64, Value)> {
            points.into_iter().map(|(t, v)| (t - minute, v)).collect()
        };
        let want_a = vec![(0, Value::Int(1)), (1, Value::Int(2)), (2, Value::Int(3))];
        let want_c = vec![(0, Value::Int(1)), (5, Value::Int(5))];
        assert_eq!(rel(all(&a)), want_a);
        assert_eq!(rel(all(&b)), vec![(0, Value::Int(10))]);
        assert_eq!(rel(all(&c)), want_c);
        // The next cycle merges them.
        assert!(step(&store, minute));
        assert_eq!(
            cycle(&store).map(|(left, upto)| (left + 1, upto)),
            Some((4, 8))
        );
        while step(&store, minute) {}
        assert_eq!(
            raw(&store),
            vec![
                (1, 0, 1),
                (1, 1, 2),
                (1, 2, 3),
                (2, 0, 10),
                (3, 0, 1),
                (3, 5, 5),
                (4, 0, 7)
            ]
        );
        assert_eq!(count(&store, "SELECT count(*) FROM head"), 0);
        assert_eq!(read(&store.head).unwrap().rows, 0);
        assert_eq!(rel(all(&a)), want_a);
        assert_eq!(rel(all(&c)), want_c);
        for (dev, count, sum) in [(&a, 3, 6.0), (&b, 1, 10.0), (&c, 2, 6.0), (&d, 1, 7.0)] {
            let minutes = store.buckets(dev, "t", 0, i64::MAX / 4, MINUTE).unwrap();
            assert_eq!(
                (minutes.len(), minutes[0].count, minutes[0].sum),
                (1, count, sum)
            );
            let hours = store.buckets(dev, "t", 0, i64::MAX / 4, HOUR).unwrap();
            assert_eq!((hours[0].count, hours[0].sum), (count, sum));
        }
        assert_eq!(
            store.latest(&c).unwrap(),
            vec![("t".into(), minute + 5, Value::Int(5))]
        );
    }

    #[test]
    fn a_store_reopened_in_the_middle_of_a_cycle_loses_and_doubles_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let devices: Vec<DeviceId> = (0..6).map(|i| id(&format!("d{i}"))).collect();
        // Within one day, and in few minutes, so that rollup rows hold many points.
        let base = 1_700_000_000_000i64;
        let mut rng = Lcg(5);
        let mut expected = Expected::new();
        let (upto, merged) = {
            let store = store_keeping_all(dir.path());
            for _ in 0..3 {
                let points =
                    random_points(&mut rng, &devices, base, 5 * MINUTE, 200, &mut expected);
                store.commit(&points).unwrap();
            }
            budget(&store, 100, 2, 100);
            assert!(step(&store, base));
            assert!(step(&store, base));
            let (left, upto) = cycle(&store).unwrap();
            assert!(left > 0, "still series to merge");
            let merged = expected.len() - left;
            // Committed after the cycle started: new points, and points sent again.
            let points = random_points(&mut rng, &devices, base, 5 * MINUTE, 200, &mut expected);
            store.commit(&points).unwrap();
            assert_answers(&store, &expected);
            (upto, merged)
        };
        // Reopened: the merged series' rows are not read back into the head, and the cycle
        // goes on where it was.
        let store = store_keeping_all(dir.path());
        assert!(merged >= 2, "{merged}");
        assert_eq!(
            count(&store, "SELECT count(*) FROM head_merged"),
            merged as i64
        );
        assert_eq!(cycle(&store).map(|(_, u)| u), Some(upto));
        let unmerged = count(
            &store,
            "SELECT count(*) FROM head h WHERE NOT EXISTS
             (SELECT 1 FROM head_merged m WHERE m.series = h.series AND m.upto >= h.seq)",
        );
        assert_eq!(read(&store.head).unwrap().rows as i64, unmerged);
        assert_answers(&store, &expected);
        // Stopped again once every series is merged, while the rows are deleted.
        budget(&store, 100, 2, 100);
        while cycle(&store).is_some_and(|(left, _)| left > 0) {
            assert!(step(&store, base));
        }
        assert!(step(&store, base), "more rows than one slice");
        let rows_left = count(&store, "SELECT count(*) FROM head");
        drop(store);
        let store = store_keeping_all(dir.path());
        assert_eq!(cycle(&store), Some((0, upto)));
        assert_eq!(count(&store, "SELECT count(*) FROM head"), rows_left);
        assert_answers(&store, &expected);
        // Then all is merged, each point once.
        store.merge(base).unwrap();
        assert_eq!(count(&store, "SELECT count(*) FROM head"), 0);
        assert_eq!(count(&store, "SELECT count(*) FROM head_merged"), 0);
        assert_answers(&store, &expected);
        let points: usize = expected.values().map(BTreeMap::len).sum();
        let name = Res::Raw.partition(base).name;
        assert_eq!(
            count(&store, &format!("SELECT count(*) FROM {name}")),
            points as i64
        );
        let numbers = expected
            .values()
            .flat_map(|p| p.values())
            .filter(|v| numeric(v).is_some())
            .count();
        let name = Res::Minute.partition(base).name;
        let summed = count(&store, &format!("SELECT sum(count) FROM {name}"));
        assert_eq!(summed, numbers as i64);
        for d in &devices {
            assert_same(&store, d, "t", base, base + 5 * MINUTE);
        }
    }

    #[test]
    fn queries_during_a_cycle_see_every_point_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_keeping_all(dir.path());
        budget(&store, 25, 2, 40);
        let devices: Vec<DeviceId> = (0..5).map(|i| id(&format!("d{i}"))).collect();
        let base = 1_700_000_000_000i64;
        let mut rng = Lcg(3);
        let mut expected = Expected::new();
        for round in 0..3 {
            let points = random_points(&mut rng, &devices, base, 2 * HOUR, 300, &mut expected);
            store.commit(&points).unwrap();
            // Queries on another thread while the steps are written, with nothing committed
            // meanwhile; and between steps, with commits.
            let stop = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|s| {
                let reader = s.spawn(|| {
                    let mut checks = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) || checks == 0 {
                        assert_answers(&store, &expected);
                        checks += 1;
                    }
                    checks
                });
                while step(&store, base) {}
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                assert!(reader.join().unwrap() > 0);
            });
            let points = random_points(&mut rng, &devices, base, 2 * HOUR, 100, &mut expected);
            store.commit(&points).unwrap();
            let mut steps = 0;
            loop {
                let more = step(&store, base);
                steps += 1;
                assert_answers(&store, &expected);
                if steps % 3 == 0 {
                    let points =
                        random_points(&mut rng, &devices, base, 2 * HOUR, 20, &mut expected);
                    store.commit(&points).unwrap();
                    assert_answers(&store, &expected);
                }
                if !more {
                    break;
                }
            }
            assert!(steps > 3, "round {round}: {steps} steps");
        }
        store.merge(base).unwrap();
        assert_answers(&store, &expected);
    }

    #[test]
    fn merge_steps_grow_to_stay_ahead_of_fast_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open_with(&dir.path().join("t.db"), config(None, None, 1_000)).unwrap();
        // At their usual size, steps would merge 10 points (or 2 series) or delete 10 rows
        // while a commit brings 200: the head would grow into the backlog guard (2,000),
        // and commits would be refused.
        budget(&store, 10, 2, 10);
        let devices: Vec<DeviceId> = (0..20).map(|i| id(&format!("d{i}"))).collect();
        let base = 1_700_000_000_000i64;
        let mut rng = Lcg(9);
        let mut expected = Expected::new();
        let mut most = 0;
        for _ in 0..100 {
            let points = random_points(&mut rng, &devices, base, HOUR, 200, &mut expected);
            store.commit(&points).unwrap();
            store.maintain(base).unwrap();
            most = most.max(read(&store.head).unwrap().rows);
        }
        assert!(most < 1_600, "the head held {most} points");
        store.merge(base).unwrap();
        assert_answers(&store, &expected);
    }
}
