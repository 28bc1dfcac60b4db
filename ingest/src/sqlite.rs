//! What the embedded SQLite databases share: opening with the right pragmas and applying
//! schema migrations in order.
//!
//! Each database keeps its schema version in `PRAGMA user_version`; a migration is applied
//! once, in its own transaction, and never edited after it has shipped.

use std::{path::Path, time::Duration};

use rusqlite::Connection;

/// How long a connection waits for a lock held by another connection before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens `path` in WAL mode with `synchronous` (`FULL` or `NORMAL`) and applies `migrations`.
pub fn open(
    path: &Path,
    synchronous: &str,
    migrations: &[&str],
) -> Result<Connection, rusqlite::Error> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Switching a new file to WAL, and a migration's first write, can meet another process
    // doing the same; SQLite then answers "busy" at once rather than call the busy handler
    // (it would deadlock), so those steps are retried for a while.
    retry_busy(|| conn.pragma_update(None, "journal_mode", "WAL"))?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    retry_busy(|| migrate(&mut conn, migrations))?;
    Ok(conn)
}

/// Runs `f` again while it fails with "database is busy", for at most [`BUSY_TIMEOUT`].
fn retry_busy<T>(mut f: impl FnMut() -> Result<T, rusqlite::Error>) -> Result<T, rusqlite::Error> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mut wait = Duration::from_millis(1);
    loop {
        match f() {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Applies the migrations the database lacks, each in its own transaction. The version is
/// read inside the transaction that holds the write lock, so two processes opening a new
/// data directory at once apply each migration once.
fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<(), rusqlite::Error> {
    loop {
        let tx = write_transaction(conn)?;
        let current: usize = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let Some(sql) = migrations.get(current) else {
            return Ok(());
        };
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", current + 1)?;
        tx.commit()?;
    }
}

/// A transaction that takes the write lock at its start. Another process (the CLI beside a
/// running server) may write the same file: a transaction that read first and wrote later
/// would fail at once if the other wrote in between, where this one waits its turn.
pub fn write_transaction(
    conn: &mut Connection,
) -> Result<rusqlite::Transaction<'_>, rusqlite::Error> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
}
