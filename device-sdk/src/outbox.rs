//! The device's outbox: every reading and every message the device owes Tellus (command
//! results, state reports) is written here before it is sent, and removed only once Tellus
//! has acknowledged it, so nothing is lost while the device is offline or when its program
//! restarts.
//!
//! One SQLite database (WAL). Readings and messages keep the order they were written in
//! (`AUTOINCREMENT` sequence numbers are never reused). The outbox is bounded; see
//! [`OutboxConfig`] for what happens when it is full.

use std::path::PathBuf;

use rusqlite::{params, Connection, OptionalExtension};

use crate::reading::Reading;

/// What the outbox does with a new reading when it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenFull {
    /// Make room by dropping the oldest readings (counted in [`crate::Stats::dropped`]): a
    /// long outage loses its beginning, never the present.
    #[default]
    DropOldest,
    /// Refuse the new reading ([`crate::Error::OutboxFull`], counted in
    /// [`crate::Stats::refused`]) and keep the old ones.
    Refuse,
}

/// How hard the outbox holds on to what it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every write is on the storage medium (fsync) before `send` returns: nothing
    /// acknowledged to the program is lost to a crash or a power cut.
    #[default]
    PowerLoss,
    /// Every write has reached the operating system before `send` returns: nothing is lost
    /// when the program dies; a power cut may lose the last moments. Fewer flash writes.
    Process,
}

/// Where the outbox lives and how large it may grow.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// The database file; `None` keeps the outbox in memory (lost with the program: for
    /// simulations and tests).
    pub path: Option<PathBuf>,
    /// At most this many readings wait (default 100,000).
    pub max_readings: u64,
    /// At most this many bytes of readings wait (default 32 MiB).
    pub max_bytes: u64,
    /// At most this many command results and state reports wait (default 10,000; the oldest
    /// are dropped past it, and counted).
    pub max_messages: u64,
    pub when_full: WhenFull,
    pub durability: Durability,
}

impl OutboxConfig {
    /// An outbox in the file at `path` (created with its folder if missing).
    pub fn file(path: impl Into<PathBuf>) -> OutboxConfig {
        OutboxConfig {
            path: Some(path.into()),
            ..OutboxConfig::memory()
        }
    }

    /// An outbox in memory only.
    pub fn memory() -> OutboxConfig {
        OutboxConfig {
            path: None,
            max_readings: 100_000,
            max_bytes: 32 * 1024 * 1024,
            max_messages: 10_000,
            when_full: WhenFull::default(),
            durability: Durability::default(),
        }
    }
}

/// A reading waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stored {
    pub seq: i64,
    pub reading: Reading,
    pub bytes: usize,
}

/// A message waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Message {
    pub seq: i64,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What an append did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Appended {
    /// For each reading given, whether it was taken.
    pub taken: Vec<bool>,
    /// Old readings dropped to make room.
    pub dropped: u64,
    /// New readings refused for want of room.
    pub refused: u64,
}

/// How many command ids the outbox remembers, to act once on a command sent twice.
const HANDLED_KEPT: i64 = 1_024;

pub(crate) struct Outbox {
    conn: Connection,
    config: OutboxConfig,
    readings: u64,
    bytes: u64,
    messages: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("creating the outbox folder {0}: {1}")]
    Folder(PathBuf, std::io::Error),
    #[error("outbox entry {0} is unreadable: {1}")]
    Corrupt(i64, String),
}

impl Outbox {
    pub fn open(config: OutboxConfig) -> Result<Outbox, OutboxError> {
        let conn = match &config.path {
            Some(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| OutboxError::Folder(dir.to_owned(), e))?;
                }
                Connection::open(path)?
            }
            None => Connection::open_in_memory()?,
        };
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let sync = match config.durability {
            Durability::PowerLoss => "FULL",
            Durability::Process => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS readings (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 body BLOB NOT NULL
             );
             CREATE TABLE IF NOT EXISTS messages (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 topic TEXT NOT NULL,
                 payload BLOB NOT NULL
             );
             CREATE TABLE IF NOT EXISTS handled (
                 n INTEGER PRIMARY KEY AUTOINCREMENT,
                 id TEXT NOT NULL UNIQUE,
                 result BLOB NOT NULL
             );",
        )?;
        let (readings, bytes): (i64, i64) = conn.query_row(
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM readings",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let messages: i64 = conn.query_row("SELECT count(*) FROM messages", [], |r| r.get(0))?;
        Ok(Outbox {
            conn,
            config,
            readings: readings as u64,
            bytes: bytes as u64,
            messages: messages as u64,
        })
    }

    /// Readings waiting, and their bytes.
    pub fn readings(&self) -> (u64, u64) {
        (self.readings, self.bytes)
    }

    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Writes `readings` (valid ones) in one transaction, making room as configured.
    pub fn append(&mut self, readings: &[Reading]) -> Result<Appended, OutboxError> {
        let bodies: Vec<Vec<u8>> = readings
            .iter()
            .map(|r| serde_json::to_vec(r).unwrap_or_default())
            .collect();
        let tx = self.conn.transaction()?;
        let mut done = Appended::default();
        let (mut count, mut bytes) = (self.readings, self.bytes);
        {
            let mut insert = tx.prepare_cached("INSERT INTO readings (body) VALUES (?1)")?;
            let mut oldest = tx.prepare_cached(
                "DELETE FROM readings WHERE seq = (SELECT min(seq) FROM readings)
                 RETURNING length(body)",
            )?;
            for body in &bodies {
                let size = body.len() as u64;
                if size > self.config.max_bytes {
                    // It could never fit: refused without emptying the outbox first.
                    done.refused += 1;
                    done.taken.push(false);
                    continue;
                }
                while count > 0
                    && (count + 1 > self.config.max_readings
                        || bytes + size > self.config.max_bytes)
                    && self.config.when_full == WhenFull::DropOldest
                {
                    let freed: Option<i64> = oldest.query_row([], |r| r.get(0)).optional()?;
                    let Some(freed) = freed else { break };
                    count -= 1;
                    bytes -= freed as u64;
                    done.dropped += 1;
                }
                if count + 1 > self.config.max_readings || bytes + size > self.config.max_bytes {
                    done.refused += 1;
                    done.taken.push(false);
                    continue;
                }
                insert.execute([body])?;
                count += 1;
                bytes += size;
                done.taken.push(true);
            }
        }
        tx.commit()?;
        (self.readings, self.bytes) = (count, bytes);
        Ok(done)
    }

    /// Up to `max` readings from sequence number `from` on, in order.
    pub fn next_readings(&self, from: i64, max: usize) -> Result<Vec<Stored>, OutboxError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, body FROM readings WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![from, max as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, body) = row?;
            let reading = serde_json::from_slice(&body)
                .map_err(|e| OutboxError::Corrupt(seq, e.to_string()))?;
            out.push(Stored {
                seq,
                reading,
                bytes: body.len(),
            });
        }
        Ok(out)
    }

    /// Removes the readings with sequence numbers in the given inclusive ranges.
    pub fn remove_readings(&mut self, ranges: &[(i64, i64)]) -> Result<u64, OutboxError> {
        let tx = self.conn.transaction()?;
        let (mut removed, mut freed) = (0u64, 0u64);
        {
            let mut stmt = tx.prepare_cached(
                "DELETE FROM readings WHERE seq BETWEEN ?1 AND ?2 RETURNING length(body)",
            )?;
            for (first, last) in ranges {
                let sizes = stmt.query_map([first, last], |r| r.get::<_, i64>(0))?;
                for size in sizes {
                    removed += 1;
                    freed += size? as u64;
                }
            }
        }
        tx.commit()?;
        self.readings -= removed.min(self.readings);
        self.bytes -= freed.min(self.bytes);
        Ok(removed)
    }

    /// Keeps a message to send; returns how many old ones were dropped to make room.
    pub fn push_message(&mut self, topic: &str, payload: &[u8]) -> Result<u64, OutboxError> {
        self.push(topic, payload, None)
    }

    /// Keeps a command's result to send and remembers it for command `id`, in one
    /// transaction: a crash cannot leave a sent result forgotten, or a remembered one unsent.
    pub fn push_result(
        &mut self,
        topic: &str,
        payload: &[u8],
        id: &str,
    ) -> Result<u64, OutboxError> {
        self.push(topic, payload, Some(id))
    }

    fn push(
        &mut self,
        topic: &str,
        payload: &[u8],
        command: Option<&str>,
    ) -> Result<u64, OutboxError> {
        let tx = self.conn.transaction()?;
        let mut dropped = 0;
        if self.messages >= self.config.max_messages {
            let over = (self.messages + 1 - self.config.max_messages) as i64;
            dropped = tx.execute(
                "DELETE FROM messages WHERE seq IN
                 (SELECT seq FROM messages ORDER BY seq LIMIT ?1)",
                [over],
            )? as u64;
        }
        tx.execute(
            "INSERT INTO messages (topic, payload) VALUES (?1, ?2)",
            params![topic, payload],
        )?;
        if let Some(id) = command {
            tx.execute(
                "INSERT INTO handled (id, result) VALUES (?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET result = excluded.result",
                params![id, payload],
            )?;
            tx.execute(
                "DELETE FROM handled WHERE n <= (SELECT max(n) FROM handled) - ?1",
                [HANDLED_KEPT],
            )?;
        }
        tx.commit()?;
        self.messages = self.messages + 1 - dropped;
        Ok(dropped)
    }

    /// Up to `max` messages from sequence number `from` on, in order.
    pub fn next_messages(&self, from: i64, max: usize) -> Result<Vec<Message>, OutboxError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, topic, payload FROM messages WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![from, max as i64], |r| {
            Ok(Message {
                seq: r.get(0)?,
                topic: r.get(1)?,
                payload: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn remove_message(&mut self, seq: i64) -> Result<(), OutboxError> {
        let n = self
            .conn
            .execute("DELETE FROM messages WHERE seq = ?1", [seq])?;
        self.messages -= (n as u64).min(self.messages);
        Ok(())
    }

    /// The result given to command `id`, if it was answered.
    pub fn handled(&self, id: &str) -> Result<Option<Vec<u8>>, OutboxError> {
        Ok(self
            .conn
            .prepare_cached("SELECT result FROM handled WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(n: i64) -> Reading {
        Reading::at(1_000 + n).with("n", n)
    }

    fn values(stored: &[Stored]) -> Vec<i64> {
        stored
            .iter()
            .map(|s| match s.reading.metrics()[0].1 {
                crate::Value::Int(n) => n,
                ref other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn readings_survive_reopening_in_order_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let config = OutboxConfig::file(dir.path().join("sub/outbox.db"));
        let mut outbox = Outbox::open(config.clone()).unwrap();
        let all: Vec<_> = (0..10).map(reading).collect();
        assert_eq!(outbox.append(&all).unwrap().taken, [true; 10]);
        let first = outbox.next_readings(0, 4).unwrap();
        assert_eq!(values(&first), [0, 1, 2, 3]);
        assert_eq!(first[0].reading, all[0]);
        assert_eq!(
            outbox
                .remove_readings(&[(first[0].seq, first[3].seq)])
                .unwrap(),
            4
        );
        drop(outbox);

        let mut outbox = Outbox::open(config).unwrap();
        assert_eq!(outbox.readings().0, 6);
        let rest = outbox.next_readings(0, 100).unwrap();
        assert_eq!(values(&rest), [4, 5, 6, 7, 8, 9]);
        // Sequence numbers are never reused: what comes later sorts later.
        let last = rest.last().unwrap().seq;
        outbox.remove_readings(&[(rest[0].seq, last)]).unwrap();
        outbox.append(&[reading(10)]).unwrap();
        let newer = outbox.next_readings(0, 100).unwrap();
        assert!(newer[0].seq > last);
        assert_eq!(outbox.readings(), (1, newer[0].bytes as u64));
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_or_refuses_the_new() {
        let mut config = OutboxConfig::memory();
        config.max_readings = 5;
        let mut outbox = Outbox::open(config.clone()).unwrap();
        let appended = outbox
            .append(&(0..8).map(reading).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(appended.taken, [true; 8]);
        assert_eq!((appended.dropped, appended.refused), (3, 0));
        assert_eq!(
            values(&outbox.next_readings(0, 100).unwrap()),
            [3, 4, 5, 6, 7]
        );

        config.when_full = WhenFull::Refuse;
        let mut outbox = Outbox::open(config).unwrap();
        let appended = outbox
            .append(&(0..8).map(reading).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(
            appended.taken,
            [true, true, true, true, true, false, false, false]
        );
        assert_eq!((appended.dropped, appended.refused), (0, 3));
        assert_eq!(
            values(&outbox.next_readings(0, 100).unwrap()),
            [0, 1, 2, 3, 4]
        );

        // The byte bound too.
        let mut config = OutboxConfig::memory();
        let one = serde_json::to_vec(&reading(0)).unwrap().len() as u64;
        config.max_bytes = 2 * one;
        let mut outbox = Outbox::open(config).unwrap();
        let appended = outbox
            .append(&(0..4).map(reading).collect::<Vec<_>>())
            .unwrap();
        assert_eq!((appended.taken.len(), appended.dropped), (4, 2));
        assert_eq!(outbox.readings(), (2, 2 * one));
        // One that could never fit is refused without dropping anything for it.
        let huge = Reading::at(5).with("n", "x".repeat(3 * one as usize));
        let appended = outbox.append(&[huge]).unwrap();
        assert_eq!((appended.taken, appended.dropped), (vec![false], 0));
        assert_eq!(outbox.readings(), (2, 2 * one));
    }

    #[test]
    fn messages_are_bounded_and_command_ids_remembered() {
        let mut config = OutboxConfig::memory();
        config.max_messages = 2;
        let mut outbox = Outbox::open(config).unwrap();
        for n in 0..3 {
            let dropped = outbox.push_message("t", &[n]).unwrap();
            assert_eq!(dropped, u64::from(n == 2));
        }
        let waiting = outbox.next_messages(0, 10).unwrap();
        assert_eq!(
            waiting.iter().map(|m| m.payload[0]).collect::<Vec<_>>(),
            [1, 2]
        );
        outbox.remove_message(waiting[0].seq).unwrap();
        assert_eq!(outbox.messages(), 1);

        assert_eq!(outbox.handled("c-1").unwrap(), None);
        outbox.push_result("r", b"first", "c-1").unwrap();
        outbox.push_result("r", b"done", "c-1").unwrap();
        assert_eq!(outbox.handled("c-1").unwrap(), Some(b"done".to_vec()));
        for n in 0..HANDLED_KEPT {
            outbox.push_result("r", b"", &format!("x-{n}")).unwrap();
        }
        assert_eq!(
            outbox.handled("c-1").unwrap(),
            None,
            "only the newest are kept"
        );
        assert!(outbox.handled("x-5").unwrap().is_some());
    }
}
