//! The QuestDB store, for fleets that outgrow the embedded one: points go to QuestDB over
//! the line protocol (`questdb-rs`, HTTP by default), queries go to QuestDB's SQL endpoint.
//!
//! A commit does not wait for QuestDB. It appends the batch to a local spool (SQLite, fsync
//! per commit by default, `spool.rs`) and is acknowledged once the spool has it; a drainer
//! thread sends the spool's oldest points to QuestDB in commit order and deletes them only
//! when QuestDB has confirmed them (an HTTP 2xx). While QuestDB is unreachable, slow or
//! refusing the credentials, points wait on disk and the drainer retries with backoff; when
//! it answers again, the spool drains in order. A batch sent again because its answer was
//! lost does not duplicate: the table's deduplication keys are (ts, device, metric).
//!
//! A batch QuestDB refuses as bad data (HTTP 400, `"code": "invalid"`) is split in halves
//! and each sent again, down to the single points it refuses; those become dead letters
//! (reason: QuestDB's message; payload: the point as Tellus JSON telemetry), so one bad
//! point neither blocks the spool nor takes its neighbours with it.
//!
//! The spool is bounded (`spool_capacity` points); when it is full, commits are refused,
//! so devices are not acknowledged and keep their messages until it drains.
//!
//! Queries read QuestDB only (`sql.rs`): a point is queryable once drained, normally well
//! under a second after its commit; `pending` in the stats counts those still waiting.
//! Dead letters stay in the local spool database.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use questdb::{
    ingress::{Sender, SenderBuilder},
    ErrorCode,
};
use tellus_core::{DeviceId, TimestampMs, Value};
use tracing::{info, warn};

use super::{Batch, Bucket, DeadLetter, Durability, StoreError, TelemetryStore};

mod layout;
mod spool;
mod sql;

use spool::{Spool, Spooled};

/// Where and how the QuestDB store sends and asks.
#[derive(Debug, Clone)]
pub struct QuestDbConfig {
    /// The line-protocol sender, as a `questdb-rs` configuration string, e.g.
    /// `http::addr=localhost:9000;` (transport, address, credentials, TLS, protocol version).
    pub ilp: String,
    /// QuestDB's HTTP endpoint for SQL (`/exec`); by default the address of `ilp` when it
    /// sends over HTTP(S). Credentials are those of `ilp` (`username`/`password` or `token`).
    pub sql_url: Option<String>,
    /// The table points go to.
    pub table: String,
    /// Whether Tellus creates the table (with its deduplication keys) before the first send.
    pub create_table: bool,
    /// Most points the spool holds; beyond, commits are refused.
    pub spool_capacity: u64,
    /// Most points in one request to QuestDB.
    pub batch_points: usize,
    /// How the spool commits: fsync per commit by default.
    pub durability: Durability,
    /// How long one request to QuestDB may take.
    pub request_timeout: Duration,
}

impl Default for QuestDbConfig {
    fn default() -> Self {
        QuestDbConfig {
            ilp: "http::addr=localhost:9000;".into(),
            sql_url: None,
            table: "telemetry".into(),
            create_table: true,
            spool_capacity: 50_000_000,
            batch_points: 10_000,
            durability: Durability::Fsync,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// The spool's counters since the start, and what waits now.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SpoolStats {
    /// Points committed into the spool.
    pub spooled: u64,
    /// Points QuestDB confirmed.
    pub drained: u64,
    /// Points waiting in the spool (also those from before the start).
    pub pending: u64,
    /// Points QuestDB refused as bad data, now dead letters.
    pub refused: u64,
    /// Failed attempts to reach QuestDB (the points stayed in the spool).
    pub send_errors: u64,
    /// The last failure, while QuestDB has not answered since.
    pub last_error: Option<String>,
    /// When QuestDB last confirmed points (ms since the epoch).
    #[cfg_attr(feature = "openapi", schema(value_type = Option<i64>))]
    pub last_delivery_ms: Option<TimestampMs>,
}

/// How long the drainer waits before retrying after a failure: doubling from the first to
/// the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(30));
/// Most bytes of one request, whatever `batch_points` says: large text values would
/// otherwise make a request larger than the sender or QuestDB takes.
const MAX_REQUEST_BYTES: usize = 8 << 20;
/// Refused points after which a round stops and blames the table instead.
const REFUSALS_PER_ROUND: usize = 100;
/// How often a QuestDB that stays unreachable is logged again.
const LOG_AGAIN: Duration = Duration::from_secs(60);
/// The widths the API plans charts with. QuestDB computes any step from raw points; these
/// are the steps that keep the number of buckets in a chart's range.
const RESOLUTIONS: &[i64] = &[86_400_000, 3_600_000, 60_000, 1_000];

pub struct QuestDbStore {
    inner: Arc<Inner>,
    drainer: Option<thread::JoinHandle<()>>,
}

struct Inner {
    spool: Spool,
    config: QuestDbConfig,
    sql: Option<sql::SqlClient>,
    spooled: AtomicU64,
    drained: AtomicU64,
    refused: AtomicU64,
    send_errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    last_delivery_ms: AtomicI64,
    /// Set by a commit, taken by the drainer.
    work: (Mutex<bool>, Condvar),
    stop: AtomicBool,
}

impl QuestDbStore {
    /// Opens (or creates) the spool at `spool_path` and starts the drainer. Checks the
    /// configuration; does not wait for QuestDB, which may be down.
    pub fn open(spool_path: &Path, config: QuestDbConfig) -> Result<QuestDbStore, StoreError> {
        let invalid = |why: String| StoreError::Config(why);
        if !layout::valid_table_name(&config.table) {
            return Err(invalid(format!(
                "table {:?}: use letters, digits and _ (not first), at most 127",
                config.table
            )));
        }
        // Checks the whole string as the sender will read it.
        SenderBuilder::from_conf(&config.ilp).map_err(|e| invalid(format!("ilp: {}", e.msg())))?;
        let conf = questdb_confstr::parse_conf_str(&config.ilp)
            .map_err(|e| invalid(format!("ilp: {e}")))?;
        if config.request_timeout.is_zero() {
            return Err(invalid("request_timeout must be more than 0".into()));
        }
        let http = matches!(conf.service(), "http" | "https");
        if !http {
            warn!(
                "the line protocol over TCP confirms nothing: points count as delivered once \
                 written to the socket, and those QuestDB drops are lost; use http"
            );
        }
        let sql_url = config.sql_url.clone().or_else(|| {
            let addr = conf.get("addr").filter(|_| http)?;
            // questdb-rs's default port, which the address may leave out.
            let has_port = addr
                .rsplit_once(':')
                .is_some_and(|(_, port)| port.parse::<u16>().is_ok());
            let port = if has_port { "" } else { ":9000" };
            Some(format!("{}://{addr}{port}", conf.service()))
        });
        // Over TCP, `token` is the private key of its authentication: never sent anywhere.
        let auth = match (
            conf.get("username"),
            conf.get("password"),
            conf.get("token"),
        ) {
            _ if !http => None,
            (_, _, Some(token)) => Some(format!("Bearer {token}")),
            (Some(user), Some(password), None) => Some(format!(
                "Basic {}",
                base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    format!("{user}:{password}")
                )
            )),
            _ => None,
        };
        let sql = sql_url.map(|url| sql::SqlClient::new(&url, auth, config.request_timeout));
        if config.create_table && sql.is_none() {
            return Err(invalid(
                "create_table needs QuestDB's HTTP endpoint: set sql_url, or send over http".into(),
            ));
        }
        let spool = Spool::open(spool_path, config.durability, config.spool_capacity)?;
        if spool.pending() > 0 {
            info!(
                points = spool.pending(),
                "points from before the start wait for QuestDB"
            );
        }
        let inner = Arc::new(Inner {
            spool,
            config,
            sql,
            spooled: AtomicU64::new(0),
            drained: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
            last_delivery_ms: AtomicI64::new(0),
            work: (Mutex::new(true), Condvar::new()),
            stop: AtomicBool::new(false),
        });
        let drainer = inner.clone();
        let drainer = thread::Builder::new()
            .name("questdb-drain".into())
            .spawn(move || drainer.drain())
            .map_err(|e| invalid(format!("starting the drainer: {e}")))?;
        Ok(QuestDbStore {
            inner,
            drainer: Some(drainer),
        })
    }

    fn sql(&self) -> Result<&sql::SqlClient, StoreError> {
        self.inner.sql.as_ref().ok_or_else(|| {
            StoreError::Unavailable("no SQL endpoint of QuestDB is configured (sql_url)".into())
        })
    }
}

impl Drop for QuestDbStore {
    /// Stops the drainer and waits for it: at most the request in flight
    /// (`request_timeout`). What it has not sent stays in the spool for the next start.
    fn drop(&mut self) {
        {
            // Under the lock, so the drainer cannot miss it between its check and its wait.
            let _work = self.inner.work.0.lock();
            self.inner.stop.store(true, Ordering::Relaxed);
        }
        self.inner.work.1.notify_all();
        if let Some(drainer) = self.drainer.take() {
            if drainer.join().is_err() {
                tracing::error!("the QuestDB drainer panicked");
            }
        }
    }
}

/// Why an attempt did not go through. The points stay in the spool and are sent again.
enum Failed {
    /// QuestDB could not be reached or did not confirm.
    Unavailable(String),
    /// QuestDB refused point after point: more likely its table than the points (dropped,
    /// or created by someone else with other columns). The table is created again before
    /// the next attempt, and nothing is dead-lettered meanwhile.
    RefusesAll(String),
}

impl Inner {
    fn drain(self: Arc<Self>) {
        let mut sender: Option<Sender> = None;
        let mut table_ready = !self.config.create_table;
        let mut backoff = BACKOFF.0;
        let mut failing_since: Option<Instant> = None;
        let mut logged: Option<Instant> = None;
        while !self.stop.load(Ordering::Relaxed) {
            let attempt = if !table_ready {
                self.create_table().map(|()| table_ready = true)
            } else {
                match self
                    .spool
                    .oldest(self.config.batch_points.max(1), MAX_REQUEST_BYTES)
                {
                    Ok(points) if points.is_empty() => {
                        self.wait(Duration::from_secs(1), true);
                        continue;
                    }
                    Ok(points) => self.deliver(&mut sender, &points),
                    Err(e) => Err(Failed::Unavailable(format!("reading the spool: {e}"))),
                }
            };
            match attempt {
                Ok(()) => {
                    if failing_since.take().is_some() {
                        info!(
                            pending = self.spool.pending(),
                            "QuestDB answers again; the spool drains"
                        );
                    }
                    logged = None;
                    backoff = BACKOFF.0;
                    if let Ok(mut last) = self.last_error.lock() {
                        *last = None;
                    }
                }
                Err(Failed::Unavailable(why) | Failed::RefusesAll(why)) => {
                    // A new connection next time: the old one may be broken. And the table
                    // again: it may be what QuestDB refuses.
                    sender = None;
                    table_ready = !self.config.create_table;
                    self.send_errors.fetch_add(1, Ordering::Relaxed);
                    failing_since.get_or_insert_with(Instant::now);
                    if logged.is_none_or(|t| t.elapsed() >= LOG_AGAIN) {
                        warn!(
                            error = %why,
                            pending = self.spool.pending(),
                            "QuestDB did not take points; they wait in the spool"
                        );
                        logged = Some(Instant::now());
                    }
                    if let Ok(mut last) = self.last_error.lock() {
                        *last = Some(why);
                    }
                    // Only a stop ends a backoff early; new points wait for its end.
                    self.wait(backoff, false);
                    backoff = (backoff * 2).min(BACKOFF.1);
                }
            }
        }
    }

    /// Waits until a commit brings points (when `for_points`), a stop, or `timeout`.
    fn wait(&self, timeout: Duration, for_points: bool) {
        let (lock, cvar) = &self.work;
        let Ok(mut work) = lock.lock() else { return };
        let deadline = Instant::now() + timeout;
        loop {
            if self.stop.load(Ordering::Relaxed) || (for_points && *work) {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match cvar.wait_timeout(work, left) {
                Ok((w, _)) => work = w,
                Err(_) => return,
            }
        }
        if for_points {
            *work = false;
        }
    }

    fn create_table(&self) -> Result<(), Failed> {
        let Some(sql) = &self.sql else { return Ok(()) };
        sql.exec(&layout::create_table_sql(&self.config.table))
            .map(|_| info!(table = %self.config.table, "QuestDB table ready"))
            .map_err(|e| Failed::Unavailable(format!("creating the table: {e}")))
    }

    fn connect(&self) -> Result<Sender, questdb::Error> {
        let mut builder = SenderBuilder::from_conf(&self.config.ilp)?;
        let conf = questdb_confstr::parse_conf_str(&self.config.ilp).ok();
        let http = conf
            .as_ref()
            .is_some_and(|c| matches!(c.service(), "http" | "https"));
        let unset = |key: &str| conf.as_ref().is_some_and(|c| c.get(key).is_none());
        // The drainer retries itself, spool first: one attempt per request.
        if http && unset("retry_timeout") {
            builder = builder.retry_timeout(Duration::ZERO)?;
        }
        if http && unset("request_timeout") {
            builder = builder.request_timeout(self.config.request_timeout)?;
        }
        builder.build()
    }

    /// Sends `points` (consecutive, oldest first), and settles in the spool what QuestDB
    /// confirmed or refused, also when a later part could not be sent.
    fn deliver(&self, sender: &mut Option<Sender>, points: &[Spooled]) -> Result<(), Failed> {
        let mut round = Round::default();
        let all: Vec<&Spooled> = points.iter().collect();
        let sent = self.send(sender, &all, &mut round);
        if matches!(sent, Err(Failed::RefusesAll(_))) {
            round.refused.clear();
        }
        let Round {
            delivered, refused, ..
        } = round;
        if !delivered.is_empty() || !refused.is_empty() {
            self.spool
                .settle(&delivered, &refused, tellus_core::now_ms())
                .map_err(|e| Failed::Unavailable(format!("settling the spool: {e}")))?;
            self.drained
                .fetch_add(delivered.len() as u64, Ordering::Relaxed);
            self.refused
                .fetch_add(refused.len() as u64, Ordering::Relaxed);
            if !delivered.is_empty() {
                self.last_delivery_ms
                    .store(tellus_core::now_ms(), Ordering::Relaxed);
            }
            for (p, why) in &refused {
                warn!(device_id = %p.device, metric = %p.metric, ts = p.ts, reason = %why,
                    "QuestDB refused a point; dead-lettered");
            }
        }
        sent
    }

    /// Sends `points` in one request, or as many as fit in [`MAX_REQUEST_BYTES`] (the rest
    /// wait for the next round). When QuestDB refuses a request as bad data, the line it
    /// names is refused and the points around it are sent again; without a line, or when
    /// the request is too large, each half is sent again, down to single points.
    fn send(
        &self,
        sender: &mut Option<Sender>,
        points: &[&Spooled],
        round: &mut Round,
    ) -> Result<(), Failed> {
        if round.refused.len() >= REFUSALS_PER_ROUND {
            return Err(Failed::RefusesAll(format!(
                "QuestDB refused {} points in a row; last: {}",
                round.refused.len(),
                round.refused.last().map_or("", |(_, why)| why.as_str())
            )));
        }
        let unavailable = |e: questdb::Error| Failed::Unavailable(e.msg().to_owned());
        let s = match sender {
            Some(s) => s,
            None => sender.insert(self.connect().map_err(unavailable)?),
        };
        let mut buf = s.new_buffer();
        let mut rows = Vec::with_capacity(points.len());
        for &p in points {
            if buf.len() >= MAX_REQUEST_BYTES {
                break;
            }
            match layout::write_row(&mut buf, &self.config.table, p) {
                Ok(()) => rows.push(p),
                Err(why) => round.refused.push((p.clone(), why)),
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        let refusal = match s.flush(&mut buf) {
            Ok(()) => {
                round.delivered.extend(rows.iter().map(|p| p.seq));
                return Ok(());
            }
            Err(e) => match refusal(&e) {
                Some(refusal) => (refusal, e.msg().to_owned()),
                None => return Err(unavailable(e)),
            },
        };
        match refusal {
            (Refusal::Line(n), why) if (1..=rows.len()).contains(&n) => {
                self.send(sender, &rows[..n - 1], round)?;
                round.refused.push((rows[n - 1].clone(), why));
                self.send(sender, &rows[n..], round)
            }
            (_, why) if rows.len() == 1 => {
                round.refused.push((rows[0].clone(), why));
                Ok(())
            }
            _ => {
                let (first, second) = rows.split_at(rows.len() / 2);
                self.send(sender, first, round)?;
                self.send(sender, second, round)
            }
        }
    }

    fn stats(&self) -> SpoolStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let last = self.last_delivery_ms.load(Ordering::Relaxed);
        SpoolStats {
            spooled: get(&self.spooled),
            drained: get(&self.drained),
            pending: self.spool.pending(),
            refused: get(&self.refused),
            send_errors: get(&self.send_errors),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
            last_delivery_ms: (last != 0).then_some(last),
        }
    }
}

/// What one round of [`Inner::send`] settled, in order.
#[derive(Default)]
struct Round {
    delivered: Vec<i64>,
    refused: Vec<(Spooled, String)>,
}

/// Why QuestDB (or the sender) will not take a request as it is, whatever the retries.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// Bad data (HTTP 400, `"code": "invalid"`) at this line (1-based), when QuestDB says.
    Line(usize),
    /// Bad data, line unknown.
    Data,
    /// The request is too large for the sender's buffer or for the server (413).
    TooLarge,
}

fn refusal(e: &questdb::Error) -> Option<Refusal> {
    let msg = e.msg();
    match e.code() {
        ErrorCode::InvalidApiCall if msg.contains("exceeds maximum") => Some(Refusal::TooLarge),
        ErrorCode::ServerFlushError if msg.contains("code: invalid") => Some(
            msg.rsplit_once("line: ")
                .and_then(|(_, rest)| rest.trim_end_matches(']').parse().ok())
                .map_or(Refusal::Data, Refusal::Line),
        ),
        ErrorCode::ServerFlushError if msg.contains("413") || msg.contains("too large") => {
            Some(Refusal::TooLarge)
        }
        _ => None,
    }
}

impl TelemetryStore for QuestDbStore {
    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        self.inner.spool.append(batch)?;
        self.inner
            .spooled
            .fetch_add(batch.samples.len() as u64, Ordering::Relaxed);
        if !batch.samples.is_empty() {
            let (lock, cvar) = &self.inner.work;
            if let Ok(mut work) = lock.lock() {
                *work = true;
                cvar.notify_one();
            }
        }
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
        let table = &self.inner.config.table;
        sql::points(
            self.sql()?
                .exec(&sql::range_sql(table, device, metric, from, to, limit))?,
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
        let table = &self.inner.config.table;
        sql::buckets(
            self.sql()?
                .exec(&sql::buckets_sql(table, device, metric, from, to, step))?,
        )
    }

    fn resolutions(&self) -> &[i64] {
        RESOLUTIONS
    }

    fn latest(&self, device: &DeviceId) -> Result<Vec<(String, TimestampMs, Value)>, StoreError> {
        let rows = self
            .sql()?
            .exec(&sql::latest_sql(&self.inner.config.table, device))?;
        let mut latest = sql::keyed_points(rows)?;
        latest.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(latest)
    }

    fn latest_of_metric(
        &self,
        metric: &str,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<(DeviceId, TimestampMs, Value)>, StoreError> {
        let rows = self
            .sql()?
            .exec(&sql::latest_of_metric_sql(&self.inner.config.table, metric))?;
        // One row per device: paged here, since QuestDB cannot order symbols as text.
        let mut latest: Vec<(DeviceId, TimestampMs, Value)> = sql::keyed_points(rows)?
            .into_iter()
            .filter_map(|(d, ts, v)| Some((DeviceId::parse(&d).ok()?, ts, v)))
            .filter(|(d, _, _)| after.is_none_or(|a| d > a))
            .collect();
        latest.sort_by(|a, b| a.0.cmp(&b.0));
        latest.truncate(limit);
        Ok(latest)
    }

    fn deadletters(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.inner.spool.deadletters(before, limit)
    }

    fn deadletter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        self.inner.spool.deadletter(id)
    }

    fn spool(&self) -> Option<SpoolStats> {
        Some(self.inner.stats())
    }
}
