//! The spool: committed points waiting to reach QuestDB, on local disk (SQLite), in commit
//! order, and the dead letters of the QuestDB store.
//!
//! A commit appends to `spool` and is acknowledged once SQLite has it (fsync by default),
//! whether or not QuestDB is reachable; the drainer reads the oldest rows, sends them, and
//! deletes them only once QuestDB has confirmed them.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use rusqlite::{params, Connection};
use tellus_core::{DeviceId, TimestampMs, Value};

use crate::{
    sqlite,
    store::{
        from_sql, insert_deadletters, list_deadletters, one_deadletter, to_sql, Batch, DeadLetter,
        Durability, StoreError,
    },
};

const MIGRATIONS: &[&str] = &["CREATE TABLE spool (
        seq     INTEGER PRIMARY KEY,
        device  TEXT NOT NULL,
        metric  TEXT NOT NULL,
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

/// One spooled point.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Spooled {
    pub seq: i64,
    pub device: String,
    pub metric: String,
    pub ts: TimestampMs,
    pub value: Value,
}

pub(super) struct Spool {
    conn: Mutex<Connection>,
    /// Points in the spool.
    pending: AtomicU64,
    /// Most points the spool holds; commits beyond are refused.
    capacity: u64,
}

impl Spool {
    pub fn open(path: &Path, durability: Durability, capacity: u64) -> Result<Spool, StoreError> {
        let mut conn = sqlite::open(path, durability.synchronous(), MIGRATIONS)?;
        // One process at a time: two drainers of one spool would send its points twice.
        // The lock is taken by the first write and kept until the connection closes.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        sqlite::write_transaction(&mut conn)?.commit()?;
        let pending: i64 = conn.query_row("SELECT count(*) FROM spool", [], |r| r.get(0))?;
        Ok(Spool {
            conn: Mutex::new(conn),
            pending: AtomicU64::new(u64::try_from(pending).unwrap_or(0)),
            capacity,
        })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }

    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Appends the batch's points and dead letters in one transaction, or refuses the whole
    /// batch when the spool is full (QuestDB has been away long enough to fill it).
    pub fn append(&self, batch: &Batch) -> Result<(), StoreError> {
        let pending = self.pending();
        if pending.saturating_add(batch.samples.len() as u64) > self.capacity
            && !batch.samples.is_empty()
        {
            return Err(StoreError::Backlog(
                usize::try_from(pending).unwrap_or(usize::MAX),
            ));
        }
        let mut conn = self.conn()?;
        let tx = sqlite::write_transaction(&mut conn)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO spool (device, metric, ts, kind, value) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (device, s) in &batch.samples {
                let (kind, value) = to_sql(&s.value);
                insert.execute(params![device.as_str(), s.metric, s.ts_ms, kind, value])?;
            }
        }
        insert_deadletters(&tx, &batch.deadletters)?;
        tx.commit()?;
        self.pending
            .fetch_add(batch.samples.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The oldest points in commit order: at most `limit`, and no more once they add up
    /// to `max_bytes` (text values can be large).
    pub fn oldest(&self, limit: usize, max_bytes: usize) -> Result<Vec<Spooled>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(
            "SELECT seq, device, metric, ts, kind, value FROM spool ORDER BY seq LIMIT ?1",
        )?;
        let mut rows = stmt.query([i64::try_from(limit).unwrap_or(i64::MAX)])?;
        let (mut out, mut bytes) = (Vec::new(), 0);
        while bytes < max_bytes {
            let Some(r) = rows.next()? else { break };
            let p = Spooled {
                seq: r.get(0)?,
                device: r.get(1)?,
                metric: r.get(2)?,
                ts: r.get(3)?,
                value: from_sql(r.get(4)?, r.get(5)?),
            };
            let text = match &p.value {
                Value::Text(t) => t.len(),
                _ => 0,
            };
            bytes += p.device.len() + p.metric.len() + text + 64;
            out.push(p);
        }
        Ok(out)
    }

    /// Deletes the points QuestDB has confirmed (`delivered`: their seqs), and dead-letters
    /// the `refused` ones with their reason, in one transaction.
    pub fn settle(
        &self,
        delivered: &[i64],
        refused: &[(Spooled, String)],
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let tx = sqlite::write_transaction(&mut conn)?;
        let mut deleted = 0u64;
        {
            let mut delete = tx.prepare_cached("DELETE FROM spool WHERE seq = ?1")?;
            for seq in delivered.iter().chain(refused.iter().map(|(p, _)| &p.seq)) {
                deleted += delete.execute([seq])? as u64;
            }
        }
        let dead: Vec<DeadLetter> = refused
            .iter()
            .filter_map(|(p, why)| refused_point(p, why, now))
            .collect();
        insert_deadletters(&tx, &dead)?;
        tx.commit()?;
        // What was deleted, not what was asked: the count never goes below zero.
        let _ = self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(deleted))
            });
        Ok(())
    }

    pub fn deadletters(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(list_deadletters(&*self.conn()?, before, limit)?)
    }

    pub fn deadletter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        Ok(one_deadletter(&*self.conn()?, id)?)
    }
}

/// A point QuestDB refused, as a dead letter whose payload is the point in Tellus's JSON
/// telemetry form, so it can be read, and sent again once the cause is fixed.
fn refused_point(p: &Spooled, why: &str, now: TimestampMs) -> Option<DeadLetter> {
    // Device ids in the spool were valid when committed.
    let device = DeviceId::parse(&p.device).ok()?;
    let value = match &p.value {
        Value::Bool(b) => serde_json::Value::from(*b),
        Value::Int(i) => serde_json::Value::from(*i),
        Value::Float(f) => serde_json::Value::from(*f),
        Value::Text(s) => serde_json::Value::from(s.as_str()),
    };
    let payload =
        serde_json::json!({ "ts": p.ts, "values": { p.metric.as_str(): value } }).to_string();
    Some(DeadLetter {
        id: 0,
        received_at_ms: now,
        topic: tellus_core::topic::DeviceTopic::Telemetry.topic(&device),
        device,
        reason: format!("refused by QuestDB: {why}"),
        payload_size: payload.len(),
        payload: payload.into_bytes(),
    })
}
