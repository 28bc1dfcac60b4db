//! The embedded device registry: `registry.db` (SQLite) in the data directory.
//!
//! - `devices`: id, status, tags (a JSON object, which listings filter with `json_each`);
//! - `certificates`: every certificate issued to a device, by issuer (the fleet CA or an
//!   external one) and serial, kept (revoked) after the device is deleted so that the CRL
//!   still lists it;
//! - `cas`: the external CAs the gate trusts beside the fleet CA;
//! - `changes`: a sequence of revocations, disables, deletions and trust changes, written in the same
//!   transaction as the change itself, which the gate polls to close affected connections;
//! - `audit`: the edge's decisions about connections, the newest [`AUDIT_KEEP`] kept;
//! - `commands`: commands to devices and the states they moved through (see
//!   [`tellus_core::CommandStatus`]), in the order they were created (`seq`). Deleting a device
//!   keeps its commands as history and cancels those not sent or delivered yet, so a device
//!   registered again under the same id is sent none of them (a delivered one expires).
//! - `sessions`: each connection of a device, from the gate's admission to its end (open while
//!   `disconnected_at` is null), the newest [`SESSIONS_KEEP`] kept besides those still open.
//!   Deleting a device keeps its sessions; presence counts only registered devices.
//! - `device_state`: each device's desired and reported state (JSON objects, see
//!   [`tellus_core::state`]) with their versions and times; a device without a row has both
//!   empty at version 0, and deleting a device deletes its row.
//! - `jobs`: fleet jobs (see [`tellus_core::Job`]), in the order they were recorded (`seq`);
//! - `job_devices`: the devices each job selected, in the order its commands are created
//!   (`seq`); kept after a device is deleted, which then is skipped. Each device's command is
//!   a row of `commands` with `job` set: a job device without one is yet to be sent it.
//! - `rules`: rules (see [`tellus_core::Rule`]), each with its spec as JSON; every insert,
//!   update and delete also adds one to the `rules_generation` row of `meta`, which the
//!   engine watches to reload them.
//! - `alerts`: the alerts rules raise, at most one open (not cleared) per rule and device,
//!   which a unique partial index guarantees. Cleared alerts stay as history, also after
//!   their rule or device is deleted; deleting either clears its open alerts.

use std::{collections::BTreeMap, path::Path, sync::Mutex};

use rusqlite::{params, Connection, OptionalExtension, Row};
use tellus_core::{
    rule::{new_alert_id, Raise},
    state, Alert, AlertQuery, AlertStatus, ApiToken, AuditDecision, AuditEntry, CaRecord,
    CertificateRecord, Change, Command, CommandStatus, DeviceId, DeviceQuery, DeviceRecord,
    DeviceState, DeviceStatus, Job, JobStatus, NewDevice, PresenceCounts, Registry, RegistryError,
    Role, Rule, RuleSpec, Session, SessionEvent, Severity, TimestampMs, FLEET_ISSUER,
};

use crate::sqlite;

const MIGRATIONS: &[&str] = &[
    "CREATE TABLE devices (
        id          TEXT PRIMARY KEY,
        created_at  INTEGER NOT NULL,
        status      TEXT NOT NULL DEFAULT 'enabled',
        tags        TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE certificates (
        issuer      TEXT NOT NULL,
        serial      TEXT NOT NULL,
        device      TEXT NOT NULL,
        issued_at   INTEGER NOT NULL,
        not_after   INTEGER NOT NULL,
        revoked_at  INTEGER,
        PRIMARY KEY (issuer, serial)
    );
    CREATE INDEX certificates_by_device ON certificates (device, not_after);
    CREATE INDEX certificates_revoked ON certificates (revoked_at) WHERE revoked_at IS NOT NULL;
    CREATE TABLE changes (
        seq     INTEGER PRIMARY KEY AUTOINCREMENT,
        at      INTEGER NOT NULL,
        device  TEXT,
        kind    TEXT NOT NULL,
        serial  TEXT
    );
    CREATE TABLE cas (
        id              TEXT PRIMARY KEY,
        pem             TEXT NOT NULL,
        subject         TEXT NOT NULL,
        auto_register   INTEGER NOT NULL,
        tags            TEXT NOT NULL,
        created_at      INTEGER NOT NULL
    );
    CREATE TABLE audit (
        id        INTEGER PRIMARY KEY,
        at        INTEGER NOT NULL,
        peer      TEXT NOT NULL,
        device    TEXT,
        serial    TEXT,
        decision  TEXT NOT NULL,
        reason    TEXT NOT NULL
    );
    CREATE INDEX audit_by_device ON audit (device, id);",
    // `seq` (the rowid, named so that VACUUM keeps it) orders commands as they were created,
    // also those created in the same millisecond. The partial index holds only the commands
    // not ended, which is what expiry scans; its condition must appear word for word in
    // the queries that are to use it.
    "CREATE TABLE commands (
        seq           INTEGER PRIMARY KEY,
        id            TEXT NOT NULL UNIQUE,
        device        TEXT NOT NULL,
        job           TEXT,
        name          TEXT NOT NULL,
        params        TEXT NOT NULL,
        status        TEXT NOT NULL,
        created_at    INTEGER NOT NULL,
        expires_at    INTEGER NOT NULL,
        updated_at    INTEGER NOT NULL,
        sent_at       INTEGER,
        delivered_at  INTEGER,
        finished_at   INTEGER,
        output        TEXT
    );
    CREATE INDEX commands_by_device ON commands (device, seq);
    CREATE INDEX commands_due ON commands (expires_at)
        WHERE status IN ('queued', 'sent', 'delivered');",
    // `id` (the rowid) orders sessions as they were recorded. The partial index holds only
    // the sessions still open, which closing and presence counting look up; as above, its
    // condition must appear word for word in those queries.
    "CREATE TABLE sessions (
        id               INTEGER PRIMARY KEY,
        device           TEXT NOT NULL,
        session          INTEGER NOT NULL,
        connected_at     INTEGER NOT NULL,
        peer             TEXT NOT NULL,
        protocol         TEXT NOT NULL,
        disconnected_at  INTEGER,
        reason           TEXT
    );
    CREATE INDEX sessions_by_device ON sessions (device, id);
    CREATE INDEX sessions_open ON sessions (device, session) WHERE disconnected_at IS NULL;",
    // A row is written at a device's first state patch; until then the device has the
    // empty state, which reading fills in.
    "CREATE TABLE device_state (
        device            TEXT PRIMARY KEY,
        desired           TEXT NOT NULL DEFAULT '{}',
        desired_version   INTEGER NOT NULL DEFAULT 0,
        desired_at        INTEGER,
        reported          TEXT NOT NULL DEFAULT '{}',
        reported_version  INTEGER NOT NULL DEFAULT 0,
        reported_at       INTEGER
    );",
    // Fleet jobs. `seq` (the rowid) orders jobs as they were recorded. A job's commands are
    // found by `job`: `commands_by_job` answers whether a device has its command yet,
    // `commands_by_job_seq` lists them in the order they were created. `job IS NOT NULL`
    // is implied by `job = ?`, so queries by job use these partial indexes.
    "CREATE TABLE jobs (
        seq          INTEGER PRIMARY KEY,
        id           TEXT NOT NULL UNIQUE,
        name         TEXT NOT NULL,
        params       TEXT NOT NULL,
        timeout_ms   INTEGER NOT NULL,
        rate         REAL NOT NULL,
        concurrency  INTEGER NOT NULL,
        status       TEXT NOT NULL,
        created_at   INTEGER NOT NULL,
        finished_at  INTEGER,
        total        INTEGER NOT NULL
    );
    CREATE TABLE job_devices (
        job     TEXT NOT NULL,
        seq     INTEGER NOT NULL,
        device  TEXT NOT NULL,
        PRIMARY KEY (job, seq)
    );
    CREATE INDEX commands_by_job ON commands (job, device) WHERE job IS NOT NULL;
    CREATE INDEX commands_by_job_seq ON commands (job, seq) WHERE job IS NOT NULL;",
    // Rules and their alerts. `meta` holds counters by name, here `rules_generation`. The
    // partial unique index `alerts_open` holds only the open alerts, one per rule and
    // device; as above, its condition must appear word for word in the queries that are to
    // use it. The other indexes serve the listings, newest first: all alerts, or those of
    // a device or a rule.
    "CREATE TABLE meta (
        key    TEXT PRIMARY KEY,
        value  INTEGER NOT NULL
    );
    INSERT INTO meta (key, value) VALUES ('rules_generation', 0);
    CREATE TABLE rules (
        id          TEXT PRIMARY KEY,
        spec        TEXT NOT NULL,
        enabled     INTEGER NOT NULL,
        version     INTEGER NOT NULL,
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL
    );
    CREATE TABLE alerts (
        id               TEXT PRIMARY KEY,
        rule             TEXT NOT NULL,
        device           TEXT NOT NULL,
        severity         TEXT NOT NULL,
        status           TEXT NOT NULL,
        message          TEXT NOT NULL,
        \"values\"         TEXT NOT NULL,
        raised_at        INTEGER NOT NULL,
        acknowledged_at  INTEGER,
        cleared_at       INTEGER,
        cleared_reason   TEXT
    );
    CREATE UNIQUE INDEX alerts_open ON alerts (rule, device) WHERE status != 'cleared';
    CREATE INDEX alerts_newest ON alerts (raised_at, id);
    CREATE INDEX alerts_by_device ON alerts (device, raised_at, id);
    CREATE INDEX alerts_by_rule ON alerts (rule, raised_at, id);",
    // API tokens: the SHA-256 of each secret, never the secret.
    "CREATE TABLE api_tokens (
        id             TEXT PRIMARY KEY,
        name           TEXT NOT NULL,
        role           TEXT NOT NULL,
        secret_sha256  TEXT NOT NULL,
        created_at     INTEGER NOT NULL
    );",
];

/// Audit entries kept; older ones are deleted as new ones arrive.
pub const AUDIT_KEEP: i64 = 1_000_000;
/// Sessions kept besides those still open; older ones are deleted as new ones arrive.
pub const SESSIONS_KEEP: i64 = 1_000_000;
/// Changes kept; the gate reads them within a second, so this is only a safety margin.
const CHANGES_KEEP: i64 = 100_000;

/// The registry in a SQLite file. One connection behind a mutex for devices, certificates,
/// CAs, changes and commands (short indexed lookups; writes are operator actions), and one
/// for what the gate records as it goes (the audit trail and the sessions), whose batched
/// writes must never queue the gate's lookups behind them.
pub struct SqliteRegistry {
    conn: Mutex<Connection>,
    history: Mutex<Connection>,
}

fn backend(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Backend(e.to_string())
}

impl SqliteRegistry {
    pub fn open(path: &Path) -> Result<Self, rusqlite::Error> {
        Ok(SqliteRegistry {
            conn: Mutex::new(sqlite::open(path, "FULL", MIGRATIONS)?),
            // Losing the last audit entries or session events in a power cut is acceptable
            // (sessions left open are closed at the next start); an fsync per batch is not
            // worth it.
            history: Mutex::new(sqlite::open(path, "NORMAL", MIGRATIONS)?),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, RegistryError> {
        Self::on(&self.conn, f)
    }

    /// Inserts a row that must be new, and what goes with it, in one write transaction:
    /// `insert` runs the row's `INSERT … ON CONFLICT (id) DO NOTHING` and returns how many
    /// rows it inserted, `then` writes the rest only if it did. A row already there is
    /// refused (`"<what> exists already"`), with nothing written.
    fn insert_new(
        &self,
        what: &str,
        insert: impl FnOnce(&rusqlite::Transaction) -> Result<usize, rusqlite::Error>,
        then: impl FnOnce(&rusqlite::Transaction) -> Result<(), rusqlite::Error>,
    ) -> Result<(), RegistryError> {
        let inserted = self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            if insert(&tx)? == 0 {
                return Ok(false);
            }
            then(&tx)?;
            tx.commit()?;
            Ok(true)
        })?;
        if inserted {
            Ok(())
        } else {
            Err(RegistryError::Refused(format!("{what} exists already")))
        }
    }

    fn on<T>(
        conn: &Mutex<Connection>,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, RegistryError> {
        let mut conn = conn.lock().map_err(|_| backend("registry lock poisoned"))?;
        f(&mut conn).map_err(backend)
    }
}

fn bad_column(i: usize, e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
}

fn device_id(row: &Row<'_>, i: usize) -> Result<DeviceId, rusqlite::Error> {
    let id: String = row.get(i)?;
    DeviceId::parse(&id).map_err(|e| bad_column(i, e))
}

/// A command's status column held something this version does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown command status {0:?}")]
struct UnknownCommandStatus(String);

const COMMAND_COLUMNS: &str = "id, device, job, name, params, status, created_at, expires_at,
    updated_at, sent_at, delivered_at, finished_at, output";

/// What a command that expired says, unless the device said something already.
const EXPIRED_OUTPUT: &str = r#"{"error":"expired before the device answered"}"#;

fn command_record(row: &Row<'_>) -> Result<Command, rusqlite::Error> {
    let params: String = row.get(4)?;
    let status: String = row.get(5)?;
    let output: Option<String> = row.get(12)?;
    Ok(Command {
        id: row.get(0)?,
        device: device_id(row, 1)?,
        job: row.get(2)?,
        name: row.get(3)?,
        params: serde_json::from_str(&params).map_err(|e| bad_column(4, e))?,
        status: CommandStatus::parse(&status)
            .ok_or_else(|| bad_column(5, UnknownCommandStatus(status)))?,
        created_at_ms: row.get(6)?,
        expires_at_ms: row.get(7)?,
        updated_at_ms: row.get(8)?,
        sent_at_ms: row.get(9)?,
        delivered_at_ms: row.get(10)?,
        finished_at_ms: row.get(11)?,
        output: output
            .map(|o| serde_json::from_str(&o).map_err(|e| bad_column(12, e)))
            .transpose()?,
    })
}

fn load_command(
    c: &Connection,
    device: &DeviceId,
    id: &str,
) -> Result<Option<Command>, rusqlite::Error> {
    c.prepare_cached(&format!(
        "SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ?1 AND device = ?2"
    ))?
    .query_row([id, device.as_str()], command_record)
    .optional()
}

/// A job's status column held something this version does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown job status {0:?}")]
struct UnknownJobStatus(String);

/// A job's column held a number out of its type's range.
#[derive(Debug, thiserror::Error)]
#[error("{0} out of range")]
struct OutOfRange(i64);

const JOB_COLUMNS: &str =
    "id, name, params, timeout_ms, rate, concurrency, status, created_at, finished_at, total";

fn job_record(row: &Row<'_>) -> Result<Job, rusqlite::Error> {
    fn number<T: TryFrom<i64>>(row: &Row<'_>, i: usize) -> Result<T, rusqlite::Error> {
        let n: i64 = row.get(i)?;
        T::try_from(n).map_err(|_| bad_column(i, OutOfRange(n)))
    }
    let params: String = row.get(2)?;
    let status: String = row.get(6)?;
    Ok(Job {
        id: row.get(0)?,
        name: row.get(1)?,
        params: serde_json::from_str(&params).map_err(|e| bad_column(2, e))?,
        timeout_ms: number(row, 3)?,
        rate: row.get(4)?,
        concurrency: number(row, 5)?,
        status: JobStatus::parse(&status).ok_or_else(|| bad_column(6, UnknownJobStatus(status)))?,
        created_at_ms: row.get(7)?,
        finished_at_ms: row.get(8)?,
        total: number(row, 9)?,
    })
}

fn load_job(c: &Connection, id: &str) -> Result<Option<Job>, rusqlite::Error> {
    c.prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))?
        .query_row([id], job_record)
        .optional()
}

/// A stored value of a closed set (a status, a severity) this version does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown {0} {1:?}")]
struct UnknownValue(&'static str, String);

const RULE_COLUMNS: &str = "id, spec, enabled, version, created_at, updated_at";

fn rule_record(row: &Row<'_>) -> Result<Rule, rusqlite::Error> {
    let spec: String = row.get(1)?;
    let version: i64 = row.get(3)?;
    Ok(Rule {
        id: row.get(0)?,
        spec: serde_json::from_str(&spec).map_err(|e| bad_column(1, e))?,
        enabled: row.get(2)?,
        version: u64::try_from(version).map_err(|_| bad_column(3, OutOfRange(version)))?,
        created_at_ms: row.get(4)?,
        updated_at_ms: row.get(5)?,
    })
}

const TOKEN_COLUMNS: &str = "id, name, role, secret_sha256, created_at";

/// A token's role column held something this version does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown role {0:?}")]
struct UnknownRole(String);

fn token_record(row: &Row<'_>) -> Result<ApiToken, rusqlite::Error> {
    let role: String = row.get(2)?;
    Ok(ApiToken {
        id: row.get(0)?,
        name: row.get(1)?,
        role: Role::parse(&role).ok_or_else(|| bad_column(2, UnknownRole(role)))?,
        secret_sha256: row.get(3)?,
        created_at_ms: row.get(4)?,
    })
}

fn load_rule(c: &Connection, id: &str) -> Result<Option<Rule>, rusqlite::Error> {
    c.prepare_cached(&format!("SELECT {RULE_COLUMNS} FROM rules WHERE id = ?1"))?
        .query_row([id], rule_record)
        .optional()
}

/// Adds one to the rules generation; in the transaction that changes a rule.
fn bump_rules_generation(c: &Connection) -> Result<(), rusqlite::Error> {
    c.prepare_cached("UPDATE meta SET value = value + 1 WHERE key = 'rules_generation'")?
        .execute([])?;
    Ok(())
}

const ALERT_COLUMNS: &str = "id, rule, device, severity, status, message, \"values\", raised_at,
    acknowledged_at, cleared_at, cleared_reason";

fn alert_record(row: &Row<'_>) -> Result<Alert, rusqlite::Error> {
    let severity: String = row.get(3)?;
    let status: String = row.get(4)?;
    let values: String = row.get(6)?;
    Ok(Alert {
        id: row.get(0)?,
        rule: row.get(1)?,
        device: device_id(row, 2)?,
        severity: Severity::parse(&severity)
            .ok_or_else(|| bad_column(3, UnknownValue("alert severity", severity)))?,
        status: AlertStatus::parse(&status)
            .ok_or_else(|| bad_column(4, UnknownValue("alert status", status)))?,
        message: row.get(5)?,
        values: serde_json::from_str(&values).map_err(|e| bad_column(6, e))?,
        raised_at_ms: row.get(7)?,
        acknowledged_at_ms: row.get(8)?,
        cleared_at_ms: row.get(9)?,
        cleared_reason: row.get(10)?,
    })
}

fn load_alert(c: &Connection, id: &str) -> Result<Option<Alert>, rusqlite::Error> {
    c.prepare_cached(&format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = ?1"))?
        .query_row([id], alert_record)
        .optional()
}

/// Alerts newest first, the order of the listings (`RETURNING` yields rows in no promised
/// order).
fn newest_first(alerts: &mut [Alert]) {
    alerts.sort_by(|a, b| (b.raised_at_ms, &b.id).cmp(&(a.raised_at_ms, &a.id)));
}

/// Whose open alerts to clear.
#[derive(Clone, Copy)]
enum AlertsOf<'a> {
    Rule(&'a str),
    Device(&'a DeviceId),
}

/// Clears the open alerts of a rule or of a device at `at` with `reason`; returns them as
/// they are now, newest first.
fn clear_alerts_of(
    c: &Connection,
    of: AlertsOf<'_>,
    reason: &str,
    at: TimestampMs,
) -> Result<Vec<Alert>, rusqlite::Error> {
    // One statement for each, so that each can use its index (`alerts_by_rule`,
    // `alerts_by_device`).
    let (column, key) = match of {
        AlertsOf::Rule(rule) => ("rule", rule),
        AlertsOf::Device(device) => ("device", device.as_str()),
    };
    let mut cleared = c
        .prepare_cached(&format!(
            "UPDATE alerts SET status = 'cleared', cleared_at = ?2, cleared_reason = ?3
             WHERE {column} = ?1 AND status != 'cleared'
             RETURNING {ALERT_COLUMNS}"
        ))?
        .query_map(params![key, at, reason], alert_record)?
        .collect::<Result<Vec<_>, _>>()?;
    newest_first(&mut cleared);
    Ok(cleared)
}

/// The statement listing alerts as `q` says (see [`Registry::alerts`]), with the parameters
/// status, device, rule, the cursor's `raised_at` and id, and the limit. Each filter is
/// written out only when given, so that the planner can pick the index that serves it (by
/// device, by rule, or all newest first); a filter not given still names its parameter,
/// which is then null.
fn alerts_sql(q: &AlertQuery<'_>) -> String {
    let when = |given: bool, filter: &'static str, unset: &'static str| {
        if given {
            filter
        } else {
            unset
        }
    };
    format!(
        "SELECT {ALERT_COLUMNS} FROM alerts
         WHERE {} AND {} AND {} AND {} AND {}
         ORDER BY raised_at DESC, id DESC LIMIT ?6",
        when(q.status.is_some(), "status = ?1", "?1 IS NULL"),
        // `status` wins over `open`; `alerts_open`'s condition word for word.
        when(q.open && q.status.is_none(), "status != 'cleared'", "1"),
        when(q.device.is_some(), "device = ?2", "?2 IS NULL"),
        when(q.rule.is_some(), "rule = ?3", "?3 IS NULL"),
        when(
            q.after.is_some(),
            "(raised_at, id) < (?4, ?5)",
            "raised_at <= ?4 AND ?5 IS NULL"
        ),
    )
}

/// The statement listing open alerts, with the limit: `alerts_open`'s condition word for
/// word, and its order, so that nothing is sorted.
fn open_alerts_sql() -> String {
    format!(
        "SELECT {ALERT_COLUMNS} FROM alerts WHERE status != 'cleared'
         ORDER BY rule, device LIMIT ?1"
    )
}

/// Devices with their current certificate (of those not revoked, the one valid longest).
const DEVICE_SELECT: &str = "SELECT d.id, d.created_at, d.status, d.tags, c.serial, c.not_after
    FROM devices d
    LEFT JOIN certificates c ON c.rowid = (
        SELECT rowid FROM certificates
        WHERE device = d.id AND revoked_at IS NULL
        ORDER BY not_after DESC LIMIT 1)";

fn device_record(row: &Row<'_>) -> Result<DeviceRecord, rusqlite::Error> {
    let status: String = row.get(2)?;
    let tags: String = row.get(3)?;
    Ok(DeviceRecord {
        id: device_id(row, 0)?,
        created_at_ms: row.get(1)?,
        status: match status.as_str() {
            "disabled" => DeviceStatus::Disabled,
            _ => DeviceStatus::Enabled,
        },
        tags: serde_json::from_str(&tags).map_err(|e| bad_column(3, e))?,
        cert_serial: row.get(4)?,
        cert_not_after_ms: row.get(5)?,
    })
}

const CERT_COLUMNS: &str = "serial, device, issued_at, not_after, revoked_at, issuer";

fn certificate_record(row: &Row<'_>) -> Result<CertificateRecord, rusqlite::Error> {
    Ok(CertificateRecord {
        serial: row.get(0)?,
        device: device_id(row, 1)?,
        issued_at_ms: row.get(2)?,
        not_after_ms: row.get(3)?,
        revoked_at_ms: row.get(4)?,
        issuer: row.get(5)?,
    })
}

/// Where a page starts: `unset` without a cursor, else the `seq` of the row the cursor (an
/// id) names, which `sql` selects with `params` of the id; `None` if it names none.
fn cursor<'a, P: rusqlite::Params>(
    c: &Connection,
    id: Option<&'a str>,
    unset: i64,
    sql: &str,
    params: impl FnOnce(&'a str) -> P,
) -> Result<Option<i64>, rusqlite::Error> {
    match id {
        None => Ok(Some(unset)),
        Some(id) => c
            .prepare_cached(sql)?
            .query_row(params(id), |r| r.get(0))
            .optional(),
    }
}

fn load_device(c: &Connection, id: &DeviceId) -> Result<Option<DeviceRecord>, rusqlite::Error> {
    c.query_row(
        &format!("{DEVICE_SELECT} WHERE d.id = ?1"),
        [id.as_str()],
        device_record,
    )
    .optional()
}

fn exists(c: &Connection, id: &DeviceId) -> Result<bool, rusqlite::Error> {
    c.query_row("SELECT 1 FROM devices WHERE id = ?1", [id.as_str()], |_| {
        Ok(())
    })
    .optional()
    .map(|found| found.is_some())
}

fn insert_certificate(c: &Connection, cert: &CertificateRecord) -> Result<(), rusqlite::Error> {
    c.prepare_cached(
        "INSERT INTO certificates (issuer, serial, device, issued_at, not_after, revoked_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        cert.issuer,
        cert.serial,
        cert.device.as_str(),
        cert.issued_at_ms,
        cert.not_after_ms,
        cert.revoked_at_ms
    ])?;
    Ok(())
}

fn record_change(
    c: &Connection,
    at: TimestampMs,
    device: Option<&DeviceId>,
    kind: &str,
    serial: Option<&str>,
) -> Result<(), rusqlite::Error> {
    c.prepare_cached("INSERT INTO changes (at, device, kind, serial) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![at, device.map(DeviceId::as_str), kind, serial])?;
    c.prepare_cached("DELETE FROM changes WHERE seq <= ?1")?
        .execute([c.last_insert_rowid() - CHANGES_KEEP])?;
    Ok(())
}

/// Revokes the device's certificates not yet revoked (or just `serial`), recording each as
/// a change; returns the serials revoked.
fn revoke_in(
    c: &Connection,
    id: &DeviceId,
    serial: Option<&str>,
    at: TimestampMs,
) -> Result<Vec<String>, rusqlite::Error> {
    let serials: Vec<String> = c
        .prepare_cached(
            "UPDATE certificates SET revoked_at = ?2
             WHERE device = ?1 AND revoked_at IS NULL AND (?3 IS NULL OR serial = ?3)
             RETURNING serial",
        )?
        .query_map(params![id.as_str(), at, serial], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for s in &serials {
        record_change(c, at, Some(id), "revoked", Some(s))?;
    }
    Ok(serials)
}

const SESSION_COLUMNS: &str =
    "id, device, session, connected_at, peer, protocol, disconnected_at, reason";

fn session_record(row: &Row<'_>) -> Result<Session, rusqlite::Error> {
    Ok(Session {
        id: row.get(0)?,
        device: device_id(row, 1)?,
        session: row.get(2)?,
        connected_at_ms: row.get(3)?,
        peer: row.get(4)?,
        protocol: row.get(5)?,
        disconnected_at_ms: row.get(6)?,
        reason: row.get(7)?,
    })
}

/// A device state column held JSON that is not an object.
#[derive(Debug, thiserror::Error)]
#[error("device state is not a JSON object")]
struct StateNotAnObject;

fn state_side(row: &Row<'_>, i: usize) -> Result<serde_json::Value, rusqlite::Error> {
    let text: String = row.get(i)?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad_column(i, e))?;
    if !value.is_object() {
        return Err(bad_column(i, StateNotAnObject));
    }
    Ok(value)
}

/// The state of a registered device, `None` if there is no such device; a device without a
/// `device_state` row has the empty state.
fn load_state(c: &Connection, id: &DeviceId) -> Result<Option<DeviceState>, rusqlite::Error> {
    c.prepare_cached(
        "SELECT coalesce(s.desired, '{}'), coalesce(s.desired_version, 0), s.desired_at,
                coalesce(s.reported, '{}'), coalesce(s.reported_version, 0), s.reported_at
         FROM devices d LEFT JOIN device_state s ON s.device = d.id
         WHERE d.id = ?1",
    )?
    .query_row([id.as_str()], |r| {
        Ok(DeviceState {
            desired: state_side(r, 0)?,
            desired_version: r.get(1)?,
            desired_at_ms: r.get(2)?,
            reported: state_side(r, 3)?,
            reported_version: r.get(4)?,
            reported_at_ms: r.get(5)?,
        })
    })
    .optional()
}

/// Which side of a device state a patch changes.
#[derive(Clone, Copy)]
enum StateSide {
    Desired,
    Reported,
}

/// Deletes the ended sessions older than the newest `keep`; sessions still open stay
/// however old they are, so that presence never loses a connection. Returns how many went.
fn trim_sessions(c: &Connection, keep: i64) -> Result<usize, rusqlite::Error> {
    c.prepare_cached(
        "DELETE FROM sessions
         WHERE id <= (SELECT max(id) FROM sessions) - ?1 AND disconnected_at IS NOT NULL",
    )?
    .execute([keep])
}

impl SqliteRegistry {
    /// Applies `patch` to one side of a device's state in one write transaction (see
    /// [`Registry::patch_desired`]).
    fn patch_state(
        &self,
        device: &DeviceId,
        side: StateSide,
        patch: &serde_json::Value,
        expected_version: Option<u64>,
        at: TimestampMs,
    ) -> Result<Option<DeviceState>, RegistryError> {
        state::check_patch(patch).map_err(RegistryError::Refused)?;
        let outcome = self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            let Some(mut now) = load_state(&tx, device)? else {
                return Ok(None);
            };
            let (doc, version, changed_at) = match side {
                StateSide::Desired => (
                    &mut now.desired,
                    &mut now.desired_version,
                    &mut now.desired_at_ms,
                ),
                StateSide::Reported => (
                    &mut now.reported,
                    &mut now.reported_version,
                    &mut now.reported_at_ms,
                ),
            };
            if let Some(expected) = expected_version.filter(|e| e != version) {
                return Ok(Some(Err(format!(
                    "desired state is at version {version}, not {expected}"
                ))));
            }
            state::merge(doc, patch);
            if let Err(why) = state::check_state(doc) {
                return Ok(Some(Err(why)));
            }
            *version += 1;
            *changed_at = Some(at);
            let json = |v: &serde_json::Value| {
                serde_json::to_string(v)
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
            };
            tx.prepare_cached(
                "INSERT INTO device_state (device, desired, desired_version, desired_at,
                     reported, reported_version, reported_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (device) DO UPDATE SET
                     desired = excluded.desired, desired_version = excluded.desired_version,
                     desired_at = excluded.desired_at, reported = excluded.reported,
                     reported_version = excluded.reported_version,
                     reported_at = excluded.reported_at",
            )?
            .execute(params![
                device.as_str(),
                json(&now.desired)?,
                now.desired_version,
                now.desired_at_ms,
                json(&now.reported)?,
                now.reported_version,
                now.reported_at_ms
            ])?;
            tx.commit()?;
            Ok(Some(Ok(now)))
        })?;
        match outcome {
            None => Ok(None),
            Some(Ok(now)) => Ok(Some(now)),
            Some(Err(why)) => Err(RegistryError::Refused(why)),
        }
    }
}

impl Registry for SqliteRegistry {
    fn insert_device(&self, d: &NewDevice) -> Result<DeviceRecord, RegistryError> {
        let tags = serde_json::to_string(&d.tags).map_err(backend)?;
        let inserted = self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            let inserted = tx.execute(
                "INSERT INTO devices (id, created_at, tags) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO NOTHING",
                params![d.id.as_str(), d.created_at_ms, tags],
            )?;
            if inserted == 0 {
                return Ok(None);
            }
            tx.execute(
                "INSERT INTO certificates (issuer, serial, device, issued_at, not_after)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    d.cert_issuer,
                    d.cert_serial,
                    d.id.as_str(),
                    d.created_at_ms,
                    d.cert_not_after_ms
                ],
            )?;
            let record = load_device(&tx, &d.id)?;
            tx.commit()?;
            Ok(record)
        })?;
        inserted.ok_or_else(|| RegistryError::AlreadyExists(d.id.clone()))
    }

    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, RegistryError> {
        self.with(|c| load_device(c, id))
    }

    fn devices(&self, q: &DeviceQuery<'_>) -> Result<Vec<DeviceRecord>, RegistryError> {
        // The wanted tags travel as one JSON array of [key, value] pairs, so that one
        // statement serves any number of them: no wanted pair may be missing from the
        // device's tags.
        let tags = serde_json::to_string(q.tags).map_err(backend)?;
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "{DEVICE_SELECT}
                 WHERE d.id > ?1 AND (?3 IS NULL OR c.not_after < ?3)
                   AND NOT EXISTS (
                       SELECT 1 FROM json_each(?4) want
                       WHERE NOT EXISTS (
                           SELECT 1 FROM json_each(d.tags) have
                           WHERE have.key = want.value ->> 0
                             AND have.value = want.value ->> 1))
                 ORDER BY d.id LIMIT ?2"
            ))?;
            let after = q.after.map(DeviceId::as_str).unwrap_or("");
            let rows = stmt.query_map(
                params![after, limit, q.expiring_before, tags],
                device_record,
            )?;
            rows.collect()
        })
    }

    fn certificates(&self, id: &DeviceId) -> Result<Vec<CertificateRecord>, RegistryError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {CERT_COLUMNS} FROM certificates WHERE device = ?1
                 ORDER BY issued_at DESC, not_after DESC"
            ))?;
            let rows = stmt.query_map([id.as_str()], certificate_record)?;
            rows.collect()
        })
    }

    fn certificate(
        &self,
        issuer: &str,
        serial: &str,
    ) -> Result<Option<CertificateRecord>, RegistryError> {
        self.with(|c| {
            c.query_row(
                &format!(
                    "SELECT {CERT_COLUMNS} FROM certificates WHERE issuer = ?1 AND serial = ?2"
                ),
                [issuer, serial],
                certificate_record,
            )
            .optional()
        })
    }

    fn add_certificate(&self, cert: &CertificateRecord) -> Result<(), RegistryError> {
        let added = self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            if !exists(&tx, &cert.device)? {
                return Ok(false);
            }
            insert_certificate(&tx, cert)?;
            tx.commit()?;
            Ok(true)
        })?;
        if !added {
            return Err(RegistryError::Refused(format!(
                "no device {} to add a certificate to",
                cert.device
            )));
        }
        Ok(())
    }

    fn add_rotated_certificate(
        &self,
        (issuer, serial): (&str, &str),
        cert: &CertificateRecord,
        max_valid: usize,
    ) -> Result<(), RegistryError> {
        let refusal = self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            let device = load_device(&tx, &cert.device)?;
            let presented: Option<(String, Option<i64>)> = tx
                .query_row(
                    "SELECT device, revoked_at FROM certificates WHERE issuer = ?1 AND serial = ?2",
                    [issuer, serial],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let valid: i64 = tx.query_row(
                "SELECT count(*) FROM certificates
                 WHERE device = ?1 AND revoked_at IS NULL AND not_after > ?2",
                params![cert.device.as_str(), cert.issued_at_ms],
                |r| r.get(0),
            )?;
            let refusal = match (device, presented) {
                (None, _) => Some("the device is not registered".to_owned()),
                (Some(d), _) if d.status == DeviceStatus::Disabled => {
                    Some("the device is disabled".to_owned())
                }
                (_, Some((owner, None))) if owner == cert.device.as_str() => {
                    (valid as usize >= max_valid).then(|| {
                        format!("the device has {max_valid} valid certificates already; revoke one first")
                    })
                }
                _ => Some("the certificate this request came with is revoked".to_owned()),
            };
            if refusal.is_none() {
                insert_certificate(&tx, cert)?;
                tx.commit()?;
            }
            Ok(refusal)
        })?;
        match refusal {
            None => Ok(()),
            Some(why) => Err(RegistryError::Refused(why)),
        }
    }

    fn set_status(
        &self,
        id: &DeviceId,
        status: DeviceStatus,
        at: TimestampMs,
    ) -> Result<Option<DeviceRecord>, RegistryError> {
        self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            let changed = tx.execute(
                "UPDATE devices SET status = ?2 WHERE id = ?1 AND status != ?2",
                params![id.as_str(), status.as_str()],
            )?;
            if changed > 0 && status == DeviceStatus::Disabled {
                record_change(&tx, at, Some(id), "disabled", None)?;
            }
            let record = load_device(&tx, id)?;
            tx.commit()?;
            Ok(record)
        })
    }

    fn set_tags(
        &self,
        id: &DeviceId,
        changes: &std::collections::BTreeMap<String, Option<String>>,
    ) -> Result<Option<DeviceRecord>, RegistryError> {
        self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            let Some(mut device) = load_device(&tx, id)? else {
                return Ok(None);
            };
            for (key, value) in changes {
                match value {
                    Some(v) => device.tags.insert(key.clone(), v.clone()),
                    None => device.tags.remove(key),
                };
            }
            let tags = serde_json::to_string(&device.tags)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))?;
            tx.execute(
                "UPDATE devices SET tags = ?2 WHERE id = ?1",
                params![id.as_str(), tags],
            )?;
            tx.commit()?;
            Ok(Some(device))
        })
    }

    fn revoke(
        &self,
        id: &DeviceId,
        serial: Option<&str>,
        at: TimestampMs,
    ) -> Result<Option<Vec<String>>, RegistryError> {
        let outcome = self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            if !exists(&tx, id)? {
                return Ok(None);
            }
            if let Some(serial) = serial {
                let owned: Option<()> = tx
                    .query_row(
                        "SELECT 1 FROM certificates WHERE device = ?1 AND serial = ?2 LIMIT 1",
                        [id.as_str(), serial],
                        |_| Ok(()),
                    )
                    .optional()?;
                if owned.is_none() {
                    return Ok(Some(Err(serial.to_owned())));
                }
            }
            let revoked = revoke_in(&tx, id, serial, at)?;
            tx.commit()?;
            Ok(Some(Ok(revoked)))
        })?;
        match outcome {
            None => Ok(None),
            Some(Ok(revoked)) => Ok(Some(revoked)),
            Some(Err(serial)) => Err(RegistryError::UnknownCertificate(serial)),
        }
    }

    fn delete_device(&self, id: &DeviceId, at: TimestampMs) -> Result<bool, RegistryError> {
        self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            if !exists(&tx, id)? {
                return Ok(false);
            }
            revoke_in(&tx, id, None, at)?;
            // Its commands end with it: a device registered again under the id starts
            // with none waiting.
            tx.execute(
                "UPDATE commands SET status = 'cancelled', updated_at = ?2, finished_at = ?2,
                     output = coalesce(output, '{\"error\":\"the device was deleted\"}')
                 WHERE device = ?1 AND status IN ('queued', 'sent')",
                params![id.as_str(), at],
            )?;
            // Its sessions stay as history, also one still open: the gate closes that
            // connection on the change below and records its end.
            tx.execute("DELETE FROM devices WHERE id = ?1", [id.as_str()])?;
            // Its state goes: a device registered again under the id starts empty.
            tx.execute("DELETE FROM device_state WHERE device = ?1", [id.as_str()])?;
            // Its open alerts are cleared, and stay as history with the cleared ones: a
            // device registered again under the id starts with none open.
            clear_alerts_of(&tx, AlertsOf::Device(id), "device_deleted", at)?;
            record_change(&tx, at, Some(id), "deleted", None)?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn revoked(&self, now: TimestampMs) -> Result<Vec<CertificateRecord>, RegistryError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {CERT_COLUMNS} FROM certificates
                 WHERE issuer = ?2 AND revoked_at IS NOT NULL AND not_after > ?1
                 ORDER BY revoked_at"
            ))?;
            let rows = stmt.query_map(params![now, FLEET_ISSUER], certificate_record)?;
            rows.collect()
        })
    }

    fn changes(&self, after: i64, limit: usize) -> Result<Vec<(i64, Change)>, RegistryError> {
        let rows: Vec<(i64, Option<String>, String, Option<String>)> = self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, device, kind, serial FROM changes WHERE seq > ?1
                 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after, limit as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?;
            rows.collect()
        })?;
        // A row this version does not understand is skipped (and logged), never retried
        // forever: the sequence number still moves past it.
        Ok(rows
            .into_iter()
            .map(|(seq, device, kind, serial)| {
                let device = device.as_deref().map(DeviceId::parse);
                let change = match (kind.as_str(), device, serial) {
                    ("trust", _, _) => Change::TrustChanged,
                    ("revoked", Some(Ok(device)), Some(serial)) => {
                        Change::Revoked { device, serial }
                    }
                    ("disabled", Some(Ok(device)), _) => Change::Disabled { device },
                    ("deleted", Some(Ok(device)), _) => Change::Deleted { device },
                    (kind, ..) => {
                        tracing::warn!(
                            seq,
                            kind,
                            "skipping a registry change this version does not understand"
                        );
                        Change::Unknown
                    }
                };
                (seq, change)
            })
            .collect())
    }

    fn last_change(&self) -> Result<i64, RegistryError> {
        self.with(|c| {
            c.query_row("SELECT coalesce(max(seq), 0) FROM changes", [], |r| {
                r.get(0)
            })
        })
    }

    fn record_audit(&self, entries: &[AuditEntry]) -> Result<(), RegistryError> {
        Self::on(&self.history, |c| {
            let tx = sqlite::write_transaction(c)?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO audit (at, peer, device, serial, decision, reason)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                for e in entries {
                    insert.execute(params![
                        e.at_ms,
                        e.peer,
                        e.device.as_ref().map(DeviceId::as_str),
                        e.serial,
                        e.decision.as_str(),
                        e.reason
                    ])?;
                }
            }
            let last = tx.last_insert_rowid();
            tx.execute("DELETE FROM audit WHERE id <= ?1", [last - AUDIT_KEEP])?;
            tx.commit()
        })
    }

    fn add_ca(&self, ca: &CaRecord) -> Result<(), RegistryError> {
        let tags = serde_json::to_string(&ca.tags).map_err(backend)?;
        let added = self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            let added = tx.execute(
                "INSERT INTO cas (id, pem, subject, auto_register, tags, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO NOTHING",
                params![
                    ca.id,
                    ca.pem,
                    ca.subject,
                    ca.auto_register,
                    tags,
                    ca.created_at_ms
                ],
            )?;
            if added > 0 {
                record_change(&tx, ca.created_at_ms, None, "trust", None)?;
            }
            tx.commit()?;
            Ok(added > 0)
        })?;
        if !added {
            return Err(RegistryError::CaExists(ca.id.clone()));
        }
        Ok(())
    }

    fn cas(&self) -> Result<Vec<CaRecord>, RegistryError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, pem, subject, auto_register, tags, created_at FROM cas ORDER BY created_at",
            )?;
            let rows = stmt.query_map([], |r| {
                let tags: String = r.get(4)?;
                Ok(CaRecord {
                    id: r.get(0)?,
                    pem: r.get(1)?,
                    subject: r.get(2)?,
                    auto_register: r.get(3)?,
                    tags: serde_json::from_str(&tags).map_err(|e| bad_column(4, e))?,
                    created_at_ms: r.get(5)?,
                })
            })?;
            rows.collect()
        })
    }

    fn delete_ca(&self, id: &str, at: TimestampMs) -> Result<bool, RegistryError> {
        self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            let deleted = tx.execute("DELETE FROM cas WHERE id = ?1", [id])?;
            if deleted > 0 {
                record_change(&tx, at, None, "trust", None)?;
            }
            tx.commit()?;
            Ok(deleted > 0)
        })
    }

    fn insert_command(&self, cmd: &Command) -> Result<(), RegistryError> {
        if cmd.status != CommandStatus::Queued {
            return Err(RegistryError::Refused(format!(
                "a new command must be queued, not {}",
                cmd.status.as_str()
            )));
        }
        let params_json = serde_json::to_string(&cmd.params).map_err(backend)?;
        let output = cmd
            .output
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(backend)?;
        let refusal = self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            if !exists(&tx, &cmd.device)? {
                return Ok(Some(format!(
                    "no device {} to send a command to",
                    cmd.device
                )));
            }
            let inserted = tx.execute(
                &format!(
                    "INSERT INTO commands ({COMMAND_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                     ON CONFLICT (id) DO NOTHING"
                ),
                params![
                    cmd.id,
                    cmd.device.as_str(),
                    cmd.job,
                    cmd.name,
                    params_json,
                    cmd.status.as_str(),
                    cmd.created_at_ms,
                    cmd.expires_at_ms,
                    cmd.updated_at_ms,
                    cmd.sent_at_ms,
                    cmd.delivered_at_ms,
                    cmd.finished_at_ms,
                    output
                ],
            )?;
            if inserted == 0 {
                return Ok(Some(format!("command {} exists already", cmd.id)));
            }
            tx.commit()?;
            Ok(None)
        })?;
        match refusal {
            None => Ok(()),
            Some(why) => Err(RegistryError::Refused(why)),
        }
    }

    fn command(&self, device: &DeviceId, id: &str) -> Result<Option<Command>, RegistryError> {
        self.with(|c| load_command(c, device, id))
    }

    fn commands(
        &self,
        device: &DeviceId,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Command>, RegistryError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(|c| {
            let sql = "SELECT seq FROM commands WHERE id = ?1 AND device = ?2";
            // Not one of this device's commands: nothing comes before it.
            let Some(before) = cursor(c, before, i64::MAX, sql, |id| [id, device.as_str()])? else {
                return Ok(Vec::new());
            };
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {COMMAND_COLUMNS} FROM commands
                 WHERE device = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3"
            ))?;
            let rows = stmt.query_map(params![device.as_str(), before, limit], command_record)?;
            rows.collect()
        })
    }

    fn move_command(
        &self,
        device: &DeviceId,
        id: &str,
        to: CommandStatus,
        at: TimestampMs,
        output: Option<&serde_json::Value>,
    ) -> Result<Option<(Command, bool)>, RegistryError> {
        let output = output
            .map(serde_json::to_string)
            .transpose()
            .map_err(backend)?;
        self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            let Some(now) = load_command(&tx, device, id)? else {
                return Ok(None);
            };
            let allowed = to.from_states().contains(&now.status)
                && (to == CommandStatus::Expired || now.expires_at_ms > at);
            if !allowed {
                return Ok(Some((now, false)));
            }
            let (mut sent_at, mut delivered_at, mut finished_at) =
                (now.sent_at_ms, now.delivered_at_ms, now.finished_at_ms);
            match to {
                // Sent again after a reconnect: when it was sent last.
                CommandStatus::Sent => sent_at = Some(at),
                CommandStatus::Delivered => delivered_at = Some(at),
                _ if to.is_final() => finished_at = Some(at),
                _ => {}
            }
            let moved = tx
                .prepare_cached(&format!(
                    "UPDATE commands SET status = ?3, updated_at = ?4, sent_at = ?5,
                         delivered_at = ?6, finished_at = ?7, output = coalesce(?8, output)
                     WHERE id = ?1 AND device = ?2
                     RETURNING {COMMAND_COLUMNS}"
                ))?
                .query_row(
                    params![
                        id,
                        device.as_str(),
                        to.as_str(),
                        at,
                        sent_at,
                        delivered_at,
                        finished_at,
                        output
                    ],
                    command_record,
                )?;
            tx.commit()?;
            Ok(Some((moved, true)))
        })
    }

    fn commands_to_send(
        &self,
        device: &DeviceId,
        now: TimestampMs,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Command>, RegistryError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {COMMAND_COLUMNS} FROM commands
                 WHERE device = ?1 AND status IN ('queued', 'sent') AND expires_at > ?2
                   AND seq > coalesce((SELECT seq FROM commands WHERE id = ?3 AND device = ?1), 0)
                 ORDER BY seq LIMIT ?4"
            ))?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows =
                stmt.query_map(params![device.as_str(), now, after, limit], command_record)?;
            rows.collect()
        })
    }

    fn expire_commands(
        &self,
        now: TimestampMs,
        limit: usize,
    ) -> Result<Vec<Command>, RegistryError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut expired = self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            // The inner condition is the partial index's, word for word, so that only
            // commands not ended are scanned.
            let expired = tx
                .prepare_cached(&format!(
                    "UPDATE commands SET status = 'expired', updated_at = ?1, finished_at = ?1,
                         output = coalesce(output, ?3)
                     WHERE seq IN (
                         SELECT seq FROM commands
                         WHERE status IN ('queued', 'sent', 'delivered') AND expires_at <= ?1
                         ORDER BY expires_at LIMIT ?2)
                     RETURNING {COMMAND_COLUMNS}, seq"
                ))?
                .query_map(params![now, limit, EXPIRED_OUTPUT], |r| {
                    Ok((r.get::<_, i64>(13)?, command_record(r)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            tx.commit()?;
            Ok(expired)
        })?;
        // RETURNING yields rows in no promised order.
        expired.sort_by_key(|(seq, _)| *seq);
        Ok(expired.into_iter().map(|(_, c)| c).collect())
    }

    fn insert_job(&self, job: &Job, devices: &[DeviceId]) -> Result<(), RegistryError> {
        if job.status != JobStatus::Running {
            return Err(RegistryError::Refused(format!(
                "a new job must be running, not {}",
                job.status.as_str()
            )));
        }
        if usize::try_from(job.total).ok() != Some(devices.len()) {
            return Err(RegistryError::Refused(format!(
                "job {} counts {} devices but {} were given",
                job.id,
                job.total,
                devices.len()
            )));
        }
        let mut seen = std::collections::HashSet::with_capacity(devices.len());
        if let Some(twice) = devices.iter().find(|d| !seen.insert(*d)) {
            return Err(RegistryError::Refused(format!(
                "device {twice} is named twice in job {}",
                job.id
            )));
        }
        let out_of_range = |what: &str, n: u64| {
            i64::try_from(n)
                .map_err(|_| RegistryError::Refused(format!("{what} {n} is out of range")))
        };
        let timeout_ms = out_of_range("timeout", job.timeout_ms)?;
        let total = out_of_range("total", job.total)?;
        let params_json = serde_json::to_string(&job.params).map_err(backend)?;
        self.insert_new(
            &format!("job {}", job.id),
            |tx| {
                tx.execute(
                    &format!(
                        "INSERT INTO jobs ({JOB_COLUMNS})
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                         ON CONFLICT (id) DO NOTHING"
                    ),
                    params![
                        job.id,
                        job.name,
                        params_json,
                        timeout_ms,
                        job.rate,
                        job.concurrency,
                        job.status.as_str(),
                        job.created_at_ms,
                        job.finished_at_ms,
                        total
                    ],
                )
            },
            |tx| {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO job_devices (job, seq, device) VALUES (?1, ?2, ?3)",
                )?;
                for (seq, device) in (0i64..).zip(devices) {
                    stmt.execute(params![job.id, seq, device.as_str()])?;
                }
                Ok(())
            },
        )
    }

    fn job(&self, id: &str) -> Result<Option<Job>, RegistryError> {
        self.with(|c| load_job(c, id))
    }

    fn jobs(
        &self,
        status: Option<JobStatus>,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Job>, RegistryError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(|c| {
            // No such job: nothing comes before it.
            let sql = "SELECT seq FROM jobs WHERE id = ?1";
            let Some(before) = cursor(c, before, i64::MAX, sql, |id| [id])? else {
                return Ok(Vec::new());
            };
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs
                 WHERE (?1 IS NULL OR status = ?1) AND seq < ?2
                 ORDER BY seq DESC LIMIT ?3"
            ))?;
            let rows = stmt.query_map(
                params![status.map(JobStatus::as_str), before, limit],
                job_record,
            )?;
            rows.collect()
        })
    }

    fn job_devices_without_command(
        &self,
        job: &str,
        limit: usize,
    ) -> Result<Vec<DeviceId>, RegistryError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT jd.device FROM job_devices jd
                 JOIN devices d ON d.id = jd.device
                 WHERE jd.job = ?1
                   AND NOT EXISTS (
                       SELECT 1 FROM commands c WHERE c.job = ?1 AND c.device = jd.device)
                 ORDER BY jd.seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![job, limit], |r| device_id(r, 0))?;
            rows.collect()
        })
    }

    fn job_counts(&self, job: &str) -> Result<BTreeMap<CommandStatus, u64>, RegistryError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT status, count(*) FROM commands WHERE job = ?1 GROUP BY status",
            )?;
            let rows = stmt.query_map([job], |r| {
                let status: String = r.get(0)?;
                let status = CommandStatus::parse(&status)
                    .ok_or_else(|| bad_column(0, UnknownCommandStatus(status)))?;
                let n: i64 = r.get(1)?;
                let n = u64::try_from(n).map_err(|_| bad_column(1, OutOfRange(n)))?;
                Ok((status, n))
            })?;
            rows.collect()
        })
    }

    fn job_open_commands(&self, job: &str) -> Result<u64, RegistryError> {
        self.with(|c| {
            let n: i64 = c
                .prepare_cached(
                    "SELECT count(*) FROM commands
                     WHERE job = ?1 AND status IN ('queued', 'sent', 'delivered')",
                )?
                .query_row([job], |r| r.get(0))?;
            u64::try_from(n).map_err(|_| bad_column(0, OutOfRange(n)))
        })
    }

    fn job_commands(
        &self,
        job: &str,
        status: Option<CommandStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Command>, RegistryError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(|c| {
            let sql = "SELECT seq FROM commands WHERE id = ?1 AND job = ?2";
            // Not one of this job's commands: nothing comes after it.
            let Some(after) = cursor(c, after, 0, sql, |id| [id, job])? else {
                return Ok(Vec::new());
            };
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {COMMAND_COLUMNS} FROM commands
                 WHERE job = ?1 AND (?2 IS NULL OR status = ?2) AND seq > ?3
                 ORDER BY seq LIMIT ?4"
            ))?;
            let rows = stmt.query_map(
                params![job, status.map(CommandStatus::as_str), after, limit],
                command_record,
            )?;
            rows.collect()
        })
    }

    fn finish_job(
        &self,
        job: &str,
        status: JobStatus,
        at: TimestampMs,
    ) -> Result<Option<Job>, RegistryError> {
        self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            if status != JobStatus::Running {
                tx.prepare_cached(
                    "UPDATE jobs SET status = ?2, finished_at = ?3
                     WHERE id = ?1 AND status = 'running'",
                )?
                .execute(params![job, status.as_str(), at])?;
            }
            let now = load_job(&tx, job)?;
            tx.commit()?;
            Ok(now)
        })
    }

    fn record_sessions(&self, events: &[SessionEvent]) -> Result<(), RegistryError> {
        Self::on(&self.history, |c| {
            let tx = sqlite::write_transaction(c)?;
            let mut opened = false;
            {
                let mut open = tx.prepare_cached(
                    "INSERT INTO sessions (device, session, connected_at, peer, protocol)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                // The condition of the partial index, word for word; a `Closed` whose
                // session is not open on record matches no row.
                let mut close = tx.prepare_cached(
                    "UPDATE sessions SET disconnected_at = ?3, reason = ?4
                     WHERE device = ?1 AND session = ?2 AND disconnected_at IS NULL",
                )?;
                for event in events {
                    match event {
                        SessionEvent::Opened(s) => {
                            open.execute(params![
                                s.device.as_str(),
                                s.session,
                                s.connected_at_ms,
                                s.peer,
                                s.protocol
                            ])?;
                            opened = true;
                        }
                        SessionEvent::Closed {
                            device,
                            session,
                            at_ms,
                            reason,
                        } => {
                            close.execute(params![device.as_str(), session, at_ms, reason])?;
                        }
                    }
                }
            }
            if opened {
                trim_sessions(&tx, SESSIONS_KEEP)?;
            }
            tx.commit()
        })
    }

    fn close_open_sessions(&self, at: TimestampMs, reason: &str) -> Result<usize, RegistryError> {
        Self::on(&self.history, |c| {
            let tx = sqlite::write_transaction(c)?;
            let closed = tx.execute(
                "UPDATE sessions SET disconnected_at = ?1, reason = ?2
                 WHERE disconnected_at IS NULL",
                params![at, reason],
            )?;
            tx.commit()?;
            Ok(closed)
        })
    }

    fn sessions(
        &self,
        device: &DeviceId,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Session>, RegistryError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Self::on(&self.history, |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions
                 WHERE device = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3"
            ))?;
            let rows = stmt.query_map(
                params![device.as_str(), before.unwrap_or(i64::MAX), limit],
                session_record,
            )?;
            rows.collect()
        })
    }

    fn presence_counts(&self) -> Result<PresenceCounts, RegistryError> {
        Self::on(&self.history, |c| {
            // Online counts from the open sessions (few: one per live connection, through
            // the partial index) those of devices still registered, each device once.
            c.prepare_cached(
                "SELECT (SELECT count(*) FROM devices),
                        (SELECT count(DISTINCT s.device) FROM sessions s
                         JOIN devices d ON d.id = s.device
                         WHERE s.disconnected_at IS NULL)",
            )?
            .query_row([], |r| {
                Ok(PresenceCounts {
                    devices: r.get(0)?,
                    online: r.get(1)?,
                })
            })
        })
    }

    fn audit(
        &self,
        device: Option<&DeviceId>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, RegistryError> {
        Self::on(&self.history, |c| {
            // Two statements, so that each can use its index.
            let by_device = "SELECT id, at, peer, device, serial, decision, reason FROM audit
                 WHERE device = ?2 AND id < ?1 ORDER BY id DESC LIMIT ?3";
            let all = "SELECT id, at, peer, device, serial, decision, reason FROM audit
                 WHERE id < ?1 AND ?2 IS NULL ORDER BY id DESC LIMIT ?3";
            let mut stmt = c.prepare_cached(if device.is_some() { by_device } else { all })?;
            let rows = stmt.query_map(
                params![
                    before.unwrap_or(i64::MAX),
                    device.map(DeviceId::as_str),
                    limit as i64
                ],
                |r| {
                    let device: Option<String> = r.get(3)?;
                    let decision: String = r.get(5)?;
                    Ok(AuditEntry {
                        id: r.get(0)?,
                        at_ms: r.get(1)?,
                        peer: r.get(2)?,
                        device: device
                            .map(|d| DeviceId::parse(&d).map_err(|e| bad_column(3, e)))
                            .transpose()?,
                        serial: r.get(4)?,
                        decision: match decision.as_str() {
                            "accepted" => AuditDecision::Accepted,
                            "closed" => AuditDecision::Closed,
                            _ => AuditDecision::Refused,
                        },
                        reason: r.get(6)?,
                    })
                },
            )?;
            rows.collect()
        })
    }

    fn device_state(&self, device: &DeviceId) -> Result<Option<DeviceState>, RegistryError> {
        self.with(|c| load_state(c, device))
    }

    fn patch_desired(
        &self,
        device: &DeviceId,
        patch: &serde_json::Value,
        expected_version: Option<u64>,
        at: TimestampMs,
    ) -> Result<Option<DeviceState>, RegistryError> {
        self.patch_state(device, StateSide::Desired, patch, expected_version, at)
    }

    fn patch_reported(
        &self,
        device: &DeviceId,
        patch: &serde_json::Value,
        at: TimestampMs,
    ) -> Result<Option<DeviceState>, RegistryError> {
        self.patch_state(device, StateSide::Reported, patch, None, at)
    }

    fn insert_rule(&self, rule: &Rule) -> Result<(), RegistryError> {
        if rule.version != 1 {
            return Err(RegistryError::Refused(format!(
                "a new rule must be at version 1, not {}",
                rule.version
            )));
        }
        let spec = serde_json::to_string(&rule.spec).map_err(backend)?;
        self.insert_new(
            &format!("rule {}", rule.id),
            |tx| {
                tx.execute(
                    &format!(
                        "INSERT INTO rules ({RULE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT (id) DO NOTHING"
                    ),
                    params![
                        rule.id,
                        spec,
                        rule.enabled,
                        1i64,
                        rule.created_at_ms,
                        rule.updated_at_ms
                    ],
                )
            },
            |tx| bump_rules_generation(tx),
        )
    }

    fn rule(&self, id: &str) -> Result<Option<Rule>, RegistryError> {
        self.with(|c| load_rule(c, id))
    }

    fn rules(&self, after: Option<&str>, limit: usize) -> Result<Vec<Rule>, RegistryError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {RULE_COLUMNS} FROM rules WHERE id > ?1 ORDER BY id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![after.unwrap_or(""), limit], rule_record)?;
            rows.collect()
        })
    }

    fn enabled_rules(&self) -> Result<Vec<Rule>, RegistryError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {RULE_COLUMNS} FROM rules WHERE enabled ORDER BY id"
            ))?;
            let rows = stmt.query_map([], rule_record)?;
            rows.collect()
        })
    }

    fn update_rule(
        &self,
        id: &str,
        spec: Option<&RuleSpec>,
        enabled: Option<bool>,
        expected_version: Option<u64>,
        at: TimestampMs,
    ) -> Result<Option<Rule>, RegistryError> {
        let spec_json = spec
            .map(serde_json::to_string)
            .transpose()
            .map_err(backend)?;
        let outcome = self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            let Some(mut rule) = load_rule(&tx, id)? else {
                return Ok(None);
            };
            if expected_version.is_some_and(|e| e != rule.version) {
                return Ok(Some(Err(rule.version)));
            }
            if spec.is_none() && enabled.is_none() {
                return Ok(Some(Ok(rule)));
            }
            if let Some(spec) = spec {
                rule.spec = spec.clone();
            }
            if let Some(enabled) = enabled {
                rule.enabled = enabled;
            }
            rule.version += 1;
            rule.updated_at_ms = at;
            let version = i64::try_from(rule.version)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            tx.prepare_cached(
                "UPDATE rules SET spec = coalesce(?2, spec), enabled = ?3, version = ?4,
                     updated_at = ?5
                 WHERE id = ?1",
            )?
            .execute(params![id, spec_json, rule.enabled, version, at])?;
            bump_rules_generation(&tx)?;
            tx.commit()?;
            Ok(Some(Ok(rule)))
        })?;
        match outcome {
            None => Ok(None),
            Some(Ok(rule)) => Ok(Some(rule)),
            Some(Err(current)) => Err(RegistryError::VersionConflict { current }),
        }
    }

    fn delete_rule(&self, id: &str, at: TimestampMs) -> Result<Option<Vec<Alert>>, RegistryError> {
        self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            if tx.execute("DELETE FROM rules WHERE id = ?1", [id])? == 0 {
                return Ok(None);
            }
            let cleared = clear_alerts_of(&tx, AlertsOf::Rule(id), "rule_deleted", at)?;
            bump_rules_generation(&tx)?;
            tx.commit()?;
            Ok(Some(cleared))
        })
    }

    fn rules_generation(&self) -> Result<i64, RegistryError> {
        self.with(|c| {
            c.prepare_cached("SELECT value FROM meta WHERE key = 'rules_generation'")?
                .query_row([], |r| r.get(0))
        })
    }

    fn raise_alert(
        &self,
        raise: &Raise<'_>,
        at: TimestampMs,
    ) -> Result<(Alert, bool), RegistryError> {
        let Raise {
            rule,
            version,
            device,
            severity,
            message,
            values,
        } = *raise;
        let values_json = serde_json::to_string(values).map_err(backend)?;
        let outcome = self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            // An open alert is updated in place; the condition is `alerts_open`'s.
            let open = tx
                .prepare_cached(&format!(
                    "UPDATE alerts SET message = ?3, \"values\" = ?4
                     WHERE rule = ?1 AND device = ?2 AND status != 'cleared'
                     RETURNING {ALERT_COLUMNS}"
                ))?
                .query_row(
                    params![rule, device.as_str(), message, values_json],
                    alert_record,
                )
                .optional()?;
            if let Some(open) = open {
                tx.commit()?;
                return Ok(Ok((open, false)));
            }
            // A new one only for a rule that is there and enabled, and a device that is
            // registered: deleting or disabling either clears its alerts, and an alert
            // raised after that would never be cleared.
            // Nor for a version of the rule that is no longer current: changing a rule
            // clears its alerts, and the old version's firings may still be on their way.
            let stored: Option<(bool, i64)> = tx
                .prepare_cached("SELECT enabled, version FROM rules WHERE id = ?1")?
                .query_row([rule], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let refusal = match stored {
                None => Some(format!("no rule {rule} to raise an alert for")),
                Some((false, _)) => Some(format!("rule {rule} is disabled")),
                Some((true, current))
                    if version.is_some_and(|v| i64::try_from(v).ok() != Some(current)) =>
                {
                    Some(format!(
                        "rule {rule} changed (it is at version {current}) since this alert was raised"
                    ))
                }
                Some((true, _)) if !exists(&tx, device)? => {
                    Some(format!("no device {device} to raise an alert for"))
                }
                Some(_) => None,
            };
            if let Some(why) = refusal {
                return Ok(Err(why));
            }
            let alert = Alert {
                id: new_alert_id(),
                rule: rule.to_owned(),
                device: device.clone(),
                severity,
                status: AlertStatus::Active,
                message: message.to_owned(),
                values: values.clone(),
                raised_at_ms: at,
                acknowledged_at_ms: None,
                cleared_at_ms: None,
                cleared_reason: None,
            };
            tx.prepare_cached(&format!(
                "INSERT INTO alerts ({ALERT_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL, NULL, NULL)"
            ))?
            .execute(params![
                alert.id,
                alert.rule,
                alert.device.as_str(),
                alert.severity.as_str(),
                alert.status.as_str(),
                alert.message,
                values_json,
                alert.raised_at_ms
            ])?;
            tx.commit()?;
            Ok(Ok((alert, true)))
        })?;
        outcome.map_err(RegistryError::Refused)
    }

    fn clear_alert(
        &self,
        rule: &str,
        device: &DeviceId,
        reason: &str,
        at: TimestampMs,
    ) -> Result<Option<Alert>, RegistryError> {
        self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            let cleared = tx
                .prepare_cached(&format!(
                    "UPDATE alerts SET status = 'cleared', cleared_at = ?3, cleared_reason = ?4
                     WHERE rule = ?1 AND device = ?2 AND status != 'cleared'
                     RETURNING {ALERT_COLUMNS}"
                ))?
                .query_row(params![rule, device.as_str(), at, reason], alert_record)
                .optional()?;
            tx.commit()?;
            Ok(cleared)
        })
    }

    fn clear_rule_alerts(
        &self,
        rule: &str,
        reason: &str,
        at: TimestampMs,
    ) -> Result<Vec<Alert>, RegistryError> {
        self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            let cleared = clear_alerts_of(&tx, AlertsOf::Rule(rule), reason, at)?;
            tx.commit()?;
            Ok(cleared)
        })
    }

    fn acknowledge_alert(&self, id: &str, at: TimestampMs) -> Result<Option<Alert>, RegistryError> {
        let outcome = self.with(|c| {
            let tx = sqlite::write_transaction(c)?;
            let Some(alert) = load_alert(&tx, id)? else {
                return Ok(None);
            };
            let now = match alert.status {
                AlertStatus::Cleared => return Ok(Some(Err(alert))),
                AlertStatus::Acknowledged => alert,
                AlertStatus::Active => tx
                    .prepare_cached(&format!(
                        "UPDATE alerts SET status = 'acknowledged', acknowledged_at = ?2
                         WHERE id = ?1
                         RETURNING {ALERT_COLUMNS}"
                    ))?
                    .query_row(params![id, at], alert_record)?,
            };
            tx.commit()?;
            Ok(Some(Ok(now)))
        })?;
        match outcome {
            None => Ok(None),
            Some(Ok(alert)) => Ok(Some(alert)),
            Some(Err(cleared)) => Err(RegistryError::Refused(format!(
                "alert {} is cleared{}; only an open alert can be acknowledged",
                cleared.id,
                cleared
                    .cleared_reason
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ))),
        }
    }

    fn alert(&self, id: &str) -> Result<Option<Alert>, RegistryError> {
        self.with(|c| load_alert(c, id))
    }

    fn alerts(&self, q: &AlertQuery<'_>) -> Result<Vec<Alert>, RegistryError> {
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        self.with(|c| {
            // No such alert: nothing comes after it.
            let sql = "SELECT raised_at FROM alerts WHERE id = ?1";
            let Some(raised_at) = cursor(c, q.after, i64::MAX, sql, |id| [id])? else {
                return Ok(Vec::new());
            };
            let mut stmt = c.prepare_cached(&alerts_sql(q))?;
            let rows = stmt.query_map(
                params![
                    q.status.map(AlertStatus::as_str),
                    q.device.map(DeviceId::as_str),
                    q.rule,
                    raised_at,
                    q.after,
                    limit
                ],
                alert_record,
            )?;
            rows.collect()
        })
    }

    fn open_alerts(&self, limit: usize) -> Result<Vec<Alert>, RegistryError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(|c| {
            let mut stmt = c.prepare_cached(&open_alerts_sql())?;
            let rows = stmt.query_map([limit], alert_record)?;
            rows.collect()
        })
    }

    fn insert_api_token(&self, token: &ApiToken) -> Result<(), RegistryError> {
        self.insert_new(
            &format!("token {}", token.id),
            |tx| {
                tx.execute(
                    &format!(
                        "INSERT INTO api_tokens ({TOKEN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (id) DO NOTHING"
                    ),
                    params![
                        token.id,
                        token.name,
                        token.role.as_str(),
                        token.secret_sha256,
                        token.created_at_ms
                    ],
                )
            },
            |_| Ok(()),
        )
    }

    fn api_token(&self, id: &str) -> Result<Option<ApiToken>, RegistryError> {
        self.with(|c| {
            c.prepare_cached(&format!(
                "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE id = ?1"
            ))?
            .query_row([id], token_record)
            .optional()
        })
    }

    fn api_tokens(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ApiToken>, RegistryError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE id > ?1 ORDER BY id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![after.unwrap_or(""), limit], token_record)?;
            rows.collect()
        })
    }

    fn delete_api_token(&self, id: &str) -> Result<bool, RegistryError> {
        self.with(|c| Ok(c.execute("DELETE FROM api_tokens WHERE id = ?1", [id])? > 0))
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use tellus_core::{Action, DeviceSelector, Trigger};

    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    fn new(device: &str, serial: &str, not_after: i64) -> NewDevice {
        NewDevice {
            id: id(device),
            created_at_ms: 1,
            tags: BTreeMap::from([("site".to_owned(), "berlin".to_owned())]),
            cert_issuer: FLEET_ISSUER.into(),
            cert_serial: serial.into(),
            cert_not_after_ms: not_after,
        }
    }

    fn open() -> (tempfile::TempDir, SqliteRegistry) {
        let dir = tempfile::tempdir().unwrap();
        let reg = SqliteRegistry::open(&dir.path().join("registry.db")).unwrap();
        (dir, reg)
    }

    fn ids(v: Vec<DeviceRecord>) -> Vec<String> {
        v.into_iter().map(|d| d.id.to_string()).collect()
    }

    fn query(limit: usize) -> DeviceQuery<'static> {
        DeviceQuery {
            limit,
            ..Default::default()
        }
    }

    #[test]
    fn insert_get_list_and_refuse_duplicates() {
        let (dir, reg) = open();
        for (d, s) in [("b", "0b"), ("a", "0a"), ("c", "0c")] {
            reg.insert_device(&new(d, s, 100)).unwrap();
        }
        assert!(matches!(
            reg.insert_device(&new("a", "ff", 100)),
            Err(RegistryError::AlreadyExists(_))
        ));
        let a = reg.device(&id("a")).unwrap().unwrap();
        assert_eq!(a.status, DeviceStatus::Enabled);
        assert_eq!(a.cert_serial.as_deref(), Some("0a"));
        assert_eq!(a.cert_not_after_ms, Some(100));
        assert_eq!(a.tags["site"], "berlin");
        assert_eq!(reg.device(&id("z")).unwrap(), None);
        assert_eq!(ids(reg.devices(&query(10)).unwrap()), ["a", "b", "c"]);
        let after = id("a");
        let page = DeviceQuery {
            after: Some(&after),
            limit: 1,
            ..Default::default()
        };
        assert_eq!(ids(reg.devices(&page).unwrap()), ["b"]);
        drop(reg);
        // Reopening keeps the data and does not re-run migrations.
        let reg = SqliteRegistry::open(&dir.path().join("registry.db")).unwrap();
        assert_eq!(reg.devices(&query(10)).unwrap().len(), 3);
    }

    #[test]
    fn devices_filter_by_every_tag_given() {
        let (_dir, reg) = open();
        let tagged = |device: &str, tags: &[(&str, &str)]| NewDevice {
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..new(device, &format!("0{device}"), 100)
        };
        reg.insert_device(&tagged("a", &[("site", "berlin"), ("kind", "meter")]))
            .unwrap();
        reg.insert_device(&tagged("b", &[("site", "berlin")]))
            .unwrap();
        reg.insert_device(&tagged("c", &[("site", "paris"), ("kind", "meter")]))
            .unwrap();
        reg.insert_device(&tagged("d", &[])).unwrap();
        // Keys and values that would need quoting in a JSON path or in SQL.
        reg.insert_device(&tagged("e", &[("a.b \"c'", "x:y\\z"), ("site", "berlin")]))
            .unwrap();
        let with = |tags: &[(&str, &str)], after: Option<&DeviceId>, limit| {
            let tags: Vec<(String, String)> = tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            ids(reg
                .devices(&DeviceQuery {
                    after,
                    limit,
                    tags: &tags,
                    ..Default::default()
                })
                .unwrap())
        };
        assert_eq!(with(&[], None, 10), ["a", "b", "c", "d", "e"]);
        assert_eq!(with(&[("site", "berlin")], None, 10), ["a", "b", "e"]);
        assert_eq!(
            with(&[("site", "berlin"), ("kind", "meter")], None, 10),
            ["a"]
        );
        assert_eq!(with(&[("kind", "meter")], None, 10), ["a", "c"]);
        // Every tag must match: one key with two values matches nothing.
        assert!(with(&[("site", "berlin"), ("site", "paris")], None, 10).is_empty());
        assert!(with(&[("site", "Berlin")], None, 10).is_empty());
        assert!(with(&[("nope", "")], None, 10).is_empty());
        assert_eq!(with(&[("a.b \"c'", "x:y\\z")], None, 10), ["e"]);
        // Paging applies after the filter.
        assert_eq!(with(&[("site", "berlin")], None, 2), ["a", "b"]);
        assert_eq!(with(&[("site", "berlin")], Some(&id("b")), 2), ["e"]);
    }

    #[test]
    fn rotation_revocation_and_expiry() {
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.insert_device(&new("b", "02", 500)).unwrap();
        reg.add_certificate(&CertificateRecord {
            issuer: FLEET_ISSUER.into(),
            serial: "03".into(),
            device: id("a"),
            issued_at_ms: 2,
            not_after_ms: 1_000,
            revoked_at_ms: None,
        })
        .unwrap();
        // The current certificate is the one valid longest.
        assert_eq!(
            reg.device(&id("a"))
                .unwrap()
                .unwrap()
                .cert_serial
                .as_deref(),
            Some("03")
        );
        let expiring = |before| {
            ids(reg
                .devices(&DeviceQuery {
                    limit: 10,
                    expiring_before: Some(before),
                    ..Default::default()
                })
                .unwrap())
        };
        assert_eq!(expiring(600), ["b"]);
        assert_eq!(expiring(2_000), ["a", "b"]);

        // Revoking one certificate keeps the other.
        assert!(matches!(
            reg.revoke(&id("a"), Some("02"), 10),
            Err(RegistryError::UnknownCertificate(_))
        ));
        assert_eq!(
            reg.revoke(&id("a"), Some("03"), 10).unwrap(),
            Some(vec!["03".to_owned()])
        );
        assert_eq!(
            reg.device(&id("a"))
                .unwrap()
                .unwrap()
                .cert_serial
                .as_deref(),
            Some("01")
        );
        assert_eq!(reg.revoke(&id("zz"), None, 10).unwrap(), None);
        assert_eq!(
            reg.revoke(&id("a"), None, 11).unwrap(),
            Some(vec!["01".to_owned()])
        );
        assert_eq!(
            reg.certificate(FLEET_ISSUER, "01")
                .unwrap()
                .unwrap()
                .revoked_at_ms,
            Some(11)
        );
        assert_eq!(reg.certificate("other-ca", "01").unwrap(), None);
        // The CRL lists what is revoked and not yet expired.
        let crl = |now| {
            reg.revoked(now)
                .unwrap()
                .into_iter()
                .map(|c| c.serial)
                .collect::<Vec<_>>()
        };
        assert_eq!(crl(50), ["03", "01"]);
        assert_eq!(crl(200), ["03"]);
    }

    #[test]
    fn changes_tell_the_gate_what_to_close() {
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.insert_device(&new("b", "02", 100)).unwrap();
        assert_eq!(reg.last_change().unwrap(), 0);
        let disabled = reg
            .set_status(&id("a"), DeviceStatus::Disabled, 5)
            .unwrap()
            .unwrap();
        assert_eq!(disabled.status, DeviceStatus::Disabled);
        // Disabling twice records one change; enabling records none.
        reg.set_status(&id("a"), DeviceStatus::Disabled, 6).unwrap();
        reg.set_status(&id("a"), DeviceStatus::Enabled, 7).unwrap();
        assert!(reg.delete_device(&id("b"), 8).unwrap());
        assert!(!reg.delete_device(&id("b"), 9).unwrap());
        assert_eq!(reg.device(&id("b")).unwrap(), None);
        let changes: Vec<Change> = reg
            .changes(0, 10)
            .unwrap()
            .into_iter()
            .map(|(_, c)| c)
            .collect();
        assert_eq!(
            changes,
            vec![
                Change::Disabled { device: id("a") },
                Change::Revoked {
                    device: id("b"),
                    serial: "02".into()
                },
                Change::Deleted { device: id("b") },
            ]
        );
        let last = reg.last_change().unwrap();
        assert_eq!(reg.changes(last, 10).unwrap(), vec![]);
        // A deleted device's certificate stays on the CRL.
        assert_eq!(reg.revoked(0).unwrap()[0].serial, "02");
    }

    #[test]
    fn external_cas_are_trusted_changes_and_their_serials_are_their_own() {
        let (_dir, reg) = open();
        let ca = CaRecord {
            id: "ab".into(),
            pem: "PEM".into(),
            subject: "CN=Other".into(),
            auto_register: true,
            tags: BTreeMap::from([("vendor".to_owned(), "acme".to_owned())]),
            created_at_ms: 3,
        };
        reg.add_ca(&ca).unwrap();
        assert!(matches!(reg.add_ca(&ca), Err(RegistryError::CaExists(_))));
        assert_eq!(reg.cas().unwrap(), vec![ca]);
        // The same serial from two issuers is two certificates.
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.insert_device(&NewDevice {
            cert_issuer: "ab".into(),
            ..new("b", "01", 100)
        })
        .unwrap();
        assert_eq!(
            reg.certificate("ab", "01").unwrap().unwrap().device,
            id("b")
        );
        // Only the fleet CA's revocations belong on its CRL.
        reg.revoke(&id("b"), None, 5).unwrap();
        assert!(reg.revoked(0).unwrap().is_empty());
        assert!(reg.delete_ca("ab", 6).unwrap());
        assert!(!reg.delete_ca("ab", 7).unwrap());
        let trust = reg
            .changes(0, 10)
            .unwrap()
            .into_iter()
            .filter(|(_, c)| *c == Change::TrustChanged)
            .count();
        assert_eq!(trust, 2);
    }

    #[test]
    fn a_rotated_certificate_is_recorded_only_when_everything_still_holds() {
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 1_000)).unwrap();
        let rotated = |serial: &str| CertificateRecord {
            issuer: FLEET_ISSUER.into(),
            serial: serial.into(),
            device: id("a"),
            issued_at_ms: 10,
            not_after_ms: 1_000,
            revoked_at_ms: None,
        };
        let refused = |r: Result<(), RegistryError>| match r {
            Err(RegistryError::Refused(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        };
        reg.add_rotated_certificate((FLEET_ISSUER, "01"), &rotated("02"), 3)
            .unwrap();
        // At the limit of valid certificates.
        reg.add_rotated_certificate((FLEET_ISSUER, "02"), &rotated("03"), 3)
            .unwrap();
        assert!(
            refused(reg.add_rotated_certificate((FLEET_ISSUER, "01"), &rotated("04"), 3))
                .contains("valid certificates already")
        );
        // With a revoked certificate, or one of another device, or for a disabled device.
        reg.revoke(&id("a"), Some("03"), 11).unwrap();
        assert!(
            refused(reg.add_rotated_certificate((FLEET_ISSUER, "03"), &rotated("05"), 3))
                .contains("revoked")
        );
        reg.insert_device(&new("b", "0b", 1_000)).unwrap();
        assert!(
            refused(reg.add_rotated_certificate((FLEET_ISSUER, "0b"), &rotated("06"), 3))
                .contains("revoked")
        );
        reg.set_status(&id("a"), DeviceStatus::Disabled, 12)
            .unwrap();
        assert!(
            refused(reg.add_rotated_certificate((FLEET_ISSUER, "01"), &rotated("07"), 3))
                .contains("disabled")
        );
        assert_eq!(reg.certificates(&id("a")).unwrap().len(), 3);
    }

    #[test]
    fn processes_opening_a_new_registry_at_once_migrate_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.db");
        let openers: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || SqliteRegistry::open(&path).map(|_| ()))
            })
            .collect();
        for o in openers {
            o.join().unwrap().unwrap();
        }
    }

    #[test]
    fn audit_is_kept_per_device_newest_first() {
        let (_dir, reg) = open();
        let entry = |device: Option<&str>, decision, reason: &str| AuditEntry {
            id: 0,
            at_ms: 1,
            peer: "127.0.0.1:5".into(),
            device: device.map(id),
            serial: device.map(|_| "01".to_owned()),
            decision,
            reason: reason.into(),
        };
        reg.record_audit(&[
            entry(None, AuditDecision::Refused, "TLS handshake refused"),
            entry(Some("a"), AuditDecision::Accepted, "connected"),
            entry(Some("b"), AuditDecision::Refused, "not registered"),
            entry(Some("a"), AuditDecision::Closed, "revoked"),
        ])
        .unwrap();
        let a = reg.audit(Some(&id("a")), None, 10).unwrap();
        assert_eq!(
            a.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(),
            ["revoked", "connected"]
        );
        assert_eq!(a[0].decision, AuditDecision::Closed);
        let all = reg.audit(None, None, 10).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[3].device, None);
        assert_eq!(reg.audit(None, Some(all[1].id), 10).unwrap().len(), 2);
    }

    /// A queued command `name` for `device`, created at 1, expiring at `expires`.
    fn cmd(device: &str, name: &str, expires: i64) -> Command {
        Command {
            id: tellus_core::command::new_command_id(),
            device: id(device),
            name: name.into(),
            params: serde_json::json!({"name": name, "n": [1, 2]}),
            status: CommandStatus::Queued,
            created_at_ms: 1,
            expires_at_ms: expires,
            updated_at_ms: 1,
            sent_at_ms: None,
            delivered_at_ms: None,
            finished_at_ms: None,
            output: None,
            job: None,
        }
    }

    fn names(v: Vec<Command>) -> Vec<String> {
        v.into_iter().map(|c| c.name).collect()
    }

    /// Moves a command and returns whether it changed, checking that the status is then `to`
    /// exactly when it did.
    fn move_to(reg: &SqliteRegistry, c: &Command, to: CommandStatus, at: i64) -> bool {
        let (now, changed) = reg
            .move_command(&c.device, &c.id, to, at, None)
            .unwrap()
            .unwrap();
        if changed {
            assert_eq!(now.status, to);
            assert_eq!(now.updated_at_ms, at);
        }
        changed
    }

    #[test]
    fn commands_are_recorded_and_listed_newest_first() {
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.insert_device(&new("b", "02", 100)).unwrap();
        // All created in the same millisecond: the order they were recorded in decides.
        let a: Vec<Command> = ["one", "two", "three"]
            .into_iter()
            .map(|n| Command {
                job: Some("job-1".into()),
                ..cmd("a", n, 1_000)
            })
            .collect();
        for c in &a {
            reg.insert_command(c).unwrap();
        }
        let b = cmd("b", "other", 1_000);
        reg.insert_command(&b).unwrap();

        assert_eq!(
            reg.command(&id("a"), &a[1].id).unwrap().as_ref(),
            Some(&a[1])
        );
        // A command is found only under its own device.
        assert_eq!(reg.command(&id("b"), &a[1].id).unwrap(), None);
        assert_eq!(reg.command(&id("a"), "c-nope").unwrap(), None);

        let list =
            |before: Option<&str>, limit| names(reg.commands(&id("a"), before, limit).unwrap());
        assert_eq!(list(None, 10), ["three", "two", "one"]);
        assert_eq!(list(None, 2), ["three", "two"]);
        assert_eq!(list(Some(&a[2].id), 10), ["two", "one"]);
        assert_eq!(list(Some(&a[1].id), 1), ["one"]);
        assert!(list(Some(&a[0].id), 10).is_empty());
        // `before` must name one of this device's commands.
        assert!(list(Some(&b.id), 10).is_empty());
        assert!(list(Some("c-nope"), 10).is_empty());
        assert_eq!(names(reg.commands(&id("b"), None, 10).unwrap()), ["other"]);
        assert!(reg.commands(&id("zz"), None, 10).unwrap().is_empty());

        let refused = |r: Result<(), RegistryError>| match r {
            Err(RegistryError::Refused(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert!(refused(reg.insert_command(&a[0])).contains("exists already"));
        assert!(refused(reg.insert_command(&cmd("zz", "x", 1_000))).contains("no device zz"));
        let sent = Command {
            status: CommandStatus::Sent,
            ..cmd("a", "x", 1_000)
        };
        assert!(refused(reg.insert_command(&sent)).contains("must be queued"));
        assert_eq!(reg.commands(&id("a"), None, 10).unwrap().len(), 3);
    }

    #[test]
    fn commands_move_only_along_the_allowed_transitions() {
        use CommandStatus::*;
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        // How to bring a new command to each status.
        let path = |s: CommandStatus| -> &'static [CommandStatus] {
            match s {
                Queued => &[],
                Sent => &[Sent],
                Delivered => &[Sent, Delivered],
                Succeeded => &[Sent, Succeeded],
                Failed => &[Sent, Delivered, Failed],
                Expired => &[Expired],
                Cancelled => &[Cancelled],
            }
        };
        for from in CommandStatus::ALL {
            for to in CommandStatus::ALL {
                let c = cmd("a", &format!("{from:?} to {to:?}"), 1_000);
                reg.insert_command(&c).unwrap();
                for (at, step) in path(from).iter().enumerate() {
                    assert!(move_to(&reg, &c, *step, 10 + at as i64), "{step:?}");
                }
                let before = reg.command(&c.device, &c.id).unwrap().unwrap();
                assert_eq!(before.status, from);
                let allowed = to.from_states().contains(&from);
                assert_eq!(move_to(&reg, &c, to, 20), allowed, "{from:?} to {to:?}");
                let after = reg.command(&c.device, &c.id).unwrap().unwrap();
                if !allowed {
                    assert_eq!(after, before, "{from:?} to {to:?}");
                }
            }
        }

        // The cases that matter most, spelled out.
        let c = cmd("a", "named", 1_000);
        reg.insert_command(&c).unwrap();
        assert!(!move_to(&reg, &c, Delivered, 2));
        assert!(move_to(&reg, &c, Sent, 3));
        assert!(move_to(&reg, &c, Delivered, 4));
        assert!(!move_to(&reg, &c, Cancelled, 5));
        assert!(!move_to(&reg, &c, Queued, 5));
        let c = cmd("a", "overtaken", 1_000);
        reg.insert_command(&c).unwrap();
        assert!(move_to(&reg, &c, Sent, 3));
        assert!(move_to(&reg, &c, Succeeded, 4));
        assert!(!move_to(&reg, &c, Delivered, 5));
    }

    #[test]
    fn moves_set_their_time_and_output() {
        use CommandStatus::*;
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        let c = cmd("a", "reboot", 1_000);
        reg.insert_command(&c).unwrap();
        let at = |to, at, output: Option<serde_json::Value>| {
            reg.move_command(&c.device, &c.id, to, at, output.as_ref())
                .unwrap()
                .unwrap()
        };
        let (sent, changed) = at(Sent, 5, None);
        assert!(changed);
        assert_eq!(sent.sent_at_ms, Some(5));
        // Sent again after a reconnect.
        let (sent, changed) = at(Sent, 6, None);
        assert!(changed);
        assert_eq!((sent.sent_at_ms, sent.updated_at_ms), (Some(6), 6));
        let (delivered, _) = at(Delivered, 7, Some(serde_json::json!({"progress": 0.5})));
        assert_eq!(delivered.delivered_at_ms, Some(7));
        assert_eq!(delivered.output, Some(serde_json::json!({"progress": 0.5})));
        // A move without output keeps the one there is.
        let (done, changed) = at(Failed, 8, None);
        assert!(changed);
        assert_eq!(done.output, Some(serde_json::json!({"progress": 0.5})));
        let (done, changed) = at(Succeeded, 9, Some(serde_json::json!({"uptime": 3})));
        assert!(!changed);
        assert_eq!(done.status, Failed);
        assert_eq!(done.output, Some(serde_json::json!({"progress": 0.5})));
        assert_eq!(
            (
                done.sent_at_ms,
                done.delivered_at_ms,
                done.finished_at_ms,
                done.updated_at_ms
            ),
            (Some(6), Some(7), Some(8), 8)
        );
        assert_eq!(done.created_at_ms, 1);
        assert_eq!(done.params, c.params);
        assert_eq!(reg.command(&c.device, &c.id).unwrap(), Some(done));
    }

    #[test]
    fn an_expired_command_moves_only_to_expired() {
        use CommandStatus::*;
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.insert_device(&new("b", "02", 100)).unwrap();
        let c = cmd("a", "reboot", 100);
        reg.insert_command(&c).unwrap();
        assert!(move_to(&reg, &c, Sent, 99));
        // At `expires_at_ms` it has expired.
        assert!(!move_to(&reg, &c, Sent, 100));
        assert!(!move_to(&reg, &c, Delivered, 100));
        assert!(!move_to(&reg, &c, Succeeded, 150));
        assert!(!move_to(&reg, &c, Cancelled, 150));
        assert!(move_to(&reg, &c, Expired, 150));
        let now = reg.command(&c.device, &c.id).unwrap().unwrap();
        assert_eq!(now.finished_at_ms, Some(150));
        // An unknown command, or one of another device, is none.
        assert_eq!(
            reg.move_command(&id("b"), &c.id, Cancelled, 1, None)
                .unwrap(),
            None
        );
        assert_eq!(
            reg.move_command(&id("a"), "c-nope", Cancelled, 1, None)
                .unwrap(),
            None
        );
    }

    #[test]
    fn commands_to_send_are_those_waiting_oldest_first() {
        use CommandStatus::*;
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.insert_device(&new("b", "02", 100)).unwrap();
        let made = |name: &str, expires, path: &[CommandStatus]| {
            let c = cmd("a", name, expires);
            reg.insert_command(&c).unwrap();
            for step in path {
                assert!(move_to(&reg, &c, *step, 2));
            }
        };
        made("sent", 1_000, &[Sent]);
        made("delivered", 1_000, &[Sent, Delivered]);
        made("queued", 1_000, &[]);
        made("succeeded", 1_000, &[Sent, Succeeded]);
        made("cancelled", 1_000, &[Cancelled]);
        made("expired", 1_000, &[Expired]);
        made("due", 50, &[]);
        made("sent due", 50, &[Sent]);
        reg.insert_command(&cmd("b", "b's", 1_000)).unwrap();
        let to_send = |now| names(reg.commands_to_send(&id("a"), now, None, 100).unwrap());
        assert_eq!(to_send(10), ["sent", "queued", "due", "sent due"]);
        assert_eq!(to_send(50), ["sent", "queued"]);
        assert!(to_send(1_000).is_empty());
        assert_eq!(
            names(reg.commands_to_send(&id("b"), 10, None, 100).unwrap()),
            ["b's"]
        );
        // Paged: after a command, at most `limit`.
        let first = reg.commands_to_send(&id("a"), 10, None, 2).unwrap();
        assert_eq!(names(first.clone()), ["sent", "queued"]);
        let rest = reg
            .commands_to_send(&id("a"), 10, Some(&first[1].id), 2)
            .unwrap();
        assert_eq!(names(rest), ["due", "sent due"]);
    }

    #[test]
    fn expiry_ends_only_commands_due_and_not_ended() {
        use CommandStatus::*;
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.insert_device(&new("b", "02", 100)).unwrap();
        let made = |device: &str, name: &str, expires, path: &[CommandStatus]| {
            let c = cmd(device, name, expires);
            reg.insert_command(&c).unwrap();
            for step in path {
                assert!(move_to(&reg, &c, *step, 2));
            }
            c
        };
        made("a", "queued", 50, &[]);
        made("b", "sent", 40, &[Sent]);
        let delivered = made("a", "delivered", 60, &[Sent]);
        assert!(reg
            .move_command(
                &delivered.device,
                &delivered.id,
                Delivered,
                3,
                Some(&serde_json::json!({"progress": 1})),
            )
            .unwrap()
            .is_some_and(|(_, changed)| changed));
        let later = made("a", "later", 500, &[]);
        let ended: Vec<Command> = [
            ("succeeded", &[Sent, Succeeded][..]),
            ("failed", &[Sent, Failed]),
            ("cancelled", &[Cancelled]),
        ]
        .into_iter()
        .map(|(name, path)| made("a", name, 10, path))
        .collect();
        let ended: Vec<Command> = ended
            .iter()
            .map(|c| reg.command(&c.device, &c.id).unwrap().unwrap())
            .collect();

        // At most `limit`, the longest due first.
        let first = reg.expire_commands(100, 2).unwrap();
        assert_eq!(names(first.clone()), ["queued", "sent"]);
        let rest = reg.expire_commands(100, 10).unwrap();
        assert_eq!(names(rest.clone()), ["delivered"]);
        assert!(reg.expire_commands(100, 10).unwrap().is_empty());
        for c in first.iter().chain(&rest) {
            assert_eq!(c.status, Expired);
            assert_eq!((c.finished_at_ms, c.updated_at_ms), (Some(100), 100));
            assert_eq!(reg.command(&c.device, &c.id).unwrap().as_ref(), Some(c));
        }
        assert_eq!(
            first[0].output,
            Some(serde_json::json!({"error": "expired before the device answered"}))
        );
        // What the device said is kept.
        assert_eq!(rest[0].output, Some(serde_json::json!({"progress": 1})));
        assert_eq!(rest[0].delivered_at_ms, Some(3));
        // Those not due and those ended are left as they were.
        assert_eq!(
            reg.command(&later.device, &later.id)
                .unwrap()
                .unwrap()
                .status,
            Queued
        );
        for c in ended {
            assert_eq!(reg.command(&c.device, &c.id).unwrap(), Some(c));
        }
        assert_eq!(names(reg.expire_commands(500, 10).unwrap()), ["later"]);
    }

    #[test]
    fn commands_survive_reopening_and_bad_rows_are_errors() {
        let (dir, reg) = open();
        let path = dir.path().join("registry.db");
        reg.insert_device(&new("a", "01", 100)).unwrap();
        let c = cmd("a", "reboot", 1_000);
        reg.insert_command(&c).unwrap();
        let (sent, _) = reg
            .move_command(&c.device, &c.id, CommandStatus::Sent, 5, None)
            .unwrap()
            .unwrap();
        reg.insert_command(&cmd("a", "later", 1_000)).unwrap();
        drop(reg);
        let reg = SqliteRegistry::open(&path).unwrap();
        assert_eq!(reg.command(&c.device, &c.id).unwrap(), Some(sent));
        assert_eq!(
            names(reg.commands(&id("a"), None, 10).unwrap()),
            ["later", "reboot"]
        );

        // A status or JSON this version cannot read is an error, not a panic.
        let raw = Connection::open(&path).unwrap();
        raw.execute(
            "UPDATE commands SET status = 'paused' WHERE id = ?1",
            [&c.id],
        )
        .unwrap();
        assert!(matches!(
            reg.command(&c.device, &c.id),
            Err(RegistryError::Backend(_))
        ));
        assert!(matches!(
            reg.commands(&id("a"), None, 10),
            Err(RegistryError::Backend(_))
        ));
        raw.execute(
            "UPDATE commands SET status = 'queued', output = '{not json' WHERE id = ?1",
            [&c.id],
        )
        .unwrap();
        assert!(matches!(
            reg.commands_to_send(&id("a"), 10, None, 100),
            Err(RegistryError::Backend(_))
        ));
    }

    /// Connection `n` of `device`, admitted at `at`.
    fn session(device: &str, n: u64, at: i64) -> Session {
        Session {
            id: 0,
            device: id(device),
            session: n,
            connected_at_ms: at,
            peer: format!("127.0.0.1:{}", 40_000 + n),
            protocol: "5".into(),
            disconnected_at_ms: None,
            reason: None,
        }
    }

    fn opened(device: &str, n: u64, at: i64) -> SessionEvent {
        SessionEvent::Opened(session(device, n, at))
    }

    fn closed(device: &str, n: u64, at: i64, reason: &str) -> SessionEvent {
        SessionEvent::Closed {
            device: id(device),
            session: n,
            at_ms: at,
            reason: reason.into(),
        }
    }

    /// A device's sessions, newest first, as (session, end, reason).
    fn ends(reg: &SqliteRegistry, device: &str) -> Vec<(u64, Option<i64>, Option<String>)> {
        reg.sessions(&id(device), None, 100)
            .unwrap()
            .into_iter()
            .map(|s| (s.session, s.disconnected_at_ms, s.reason))
            .collect()
    }

    #[test]
    fn sessions_open_and_close_in_order() {
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.record_sessions(&[opened("a", 1, 10)]).unwrap();
        let open = reg.sessions(&id("a"), None, 10).unwrap();
        assert_eq!(open.len(), 1);
        assert!(open[0].id > 0);
        assert_eq!(
            open[0],
            Session {
                id: open[0].id,
                ..session("a", 1, 10)
            }
        );
        reg.record_sessions(&[closed("a", 1, 20, "client disconnected")])
            .unwrap();
        let ended = reg.sessions(&id("a"), None, 10).unwrap();
        assert_eq!(
            ended,
            vec![Session {
                id: open[0].id,
                disconnected_at_ms: Some(20),
                reason: Some("client disconnected".into()),
                ..session("a", 1, 10)
            }]
        );
        // Opened and closed in one batch: the events apply in order.
        reg.record_sessions(&[opened("a", 2, 30), closed("a", 2, 31, "keep-alive timeout")])
            .unwrap();
        assert_eq!(
            ends(&reg, "a"),
            [
                (2, Some(31), Some("keep-alive timeout".into())),
                (1, Some(20), Some("client disconnected".into()))
            ]
        );
        // No events is nothing to do.
        reg.record_sessions(&[]).unwrap();
        assert_eq!(reg.sessions(&id("a"), None, 10).unwrap().len(), 2);
    }

    #[test]
    fn a_closed_without_its_open_session_is_ignored() {
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.insert_device(&new("b", "02", 100)).unwrap();
        reg.record_sessions(&[opened("a", 1, 10), opened("b", 2, 10)])
            .unwrap();
        reg.record_sessions(&[
            // Unknown session, a session of another device, a device with none at all.
            closed("a", 9, 20, "nope"),
            closed("a", 2, 20, "nope"),
            closed("zz", 1, 20, "nope"),
            closed("a", 1, 30, "client disconnected"),
            // Ended already: the first end stays.
            closed("a", 1, 40, "again"),
        ])
        .unwrap();
        assert_eq!(
            ends(&reg, "a"),
            [(1, Some(30), Some("client disconnected".into()))]
        );
        assert_eq!(ends(&reg, "b"), [(2, None, None)]);
        assert!(reg.sessions(&id("zz"), None, 10).unwrap().is_empty());
    }

    #[test]
    fn a_takeover_records_both_sessions_and_closes_each_alone() {
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.record_sessions(&[opened("a", 1, 10)]).unwrap();
        // The device connects again before the gate has ended its first connection.
        reg.record_sessions(&[opened("a", 2, 20)]).unwrap();
        assert_eq!(ends(&reg, "a"), [(2, None, None), (1, None, None)]);
        assert_eq!(reg.presence_counts().unwrap().online, 1);
        reg.record_sessions(&[closed("a", 1, 21, "taken over")])
            .unwrap();
        assert_eq!(
            ends(&reg, "a"),
            [(2, None, None), (1, Some(21), Some("taken over".into()))]
        );
        assert_eq!(reg.presence_counts().unwrap().online, 1);
        reg.record_sessions(&[closed("a", 2, 30, "client disconnected")])
            .unwrap();
        assert_eq!(
            ends(&reg, "a"),
            [
                (2, Some(30), Some("client disconnected".into())),
                (1, Some(21), Some("taken over".into()))
            ]
        );
        assert_eq!(reg.presence_counts().unwrap().online, 0);
    }

    #[test]
    fn session_history_pages_newest_first() {
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.insert_device(&new("b", "02", 100)).unwrap();
        for n in 1..=5 {
            reg.record_sessions(&[opened("a", n, n as i64), opened("b", 100 + n, n as i64)])
                .unwrap();
        }
        let page = |before, limit| {
            reg.sessions(&id("a"), before, limit)
                .unwrap()
                .into_iter()
                .map(|s| (s.id, s.session))
                .collect::<Vec<_>>()
        };
        let all = page(None, 10);
        assert_eq!(
            all.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
            [5, 4, 3, 2, 1]
        );
        let first = page(None, 2);
        assert_eq!(first, all[..2]);
        let second = page(Some(first[1].0), 2);
        assert_eq!(second, all[2..4]);
        assert_eq!(page(Some(second[1].0), 2), all[4..]);
        assert!(page(Some(all[4].0), 10).is_empty());
        assert!(page(None, 0).is_empty());
        // Another device's sessions are not in the way.
        assert!(reg
            .sessions(&id("b"), None, 10)
            .unwrap()
            .iter()
            .all(|s| s.device == id("b") && s.session > 100));
    }

    #[test]
    fn closing_open_sessions_ends_only_those_open() {
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.insert_device(&new("b", "02", 100)).unwrap();
        reg.record_sessions(&[
            opened("a", 1, 10),
            closed("a", 1, 11, "client disconnected"),
            opened("a", 2, 12),
            opened("b", 3, 13),
        ])
        .unwrap();
        assert_eq!(reg.close_open_sessions(50, "tellus restarted").unwrap(), 2);
        assert_eq!(
            ends(&reg, "a"),
            [
                (2, Some(50), Some("tellus restarted".into())),
                (1, Some(11), Some("client disconnected".into()))
            ]
        );
        assert_eq!(
            ends(&reg, "b"),
            [(3, Some(50), Some("tellus restarted".into()))]
        );
        assert_eq!(reg.presence_counts().unwrap().online, 0);
        assert_eq!(reg.close_open_sessions(60, "again").unwrap(), 0);
        // A session number of the run before may come again; only the new one is open.
        reg.record_sessions(&[opened("a", 2, 70)]).unwrap();
        reg.record_sessions(&[closed("a", 2, 80, "client disconnected")])
            .unwrap();
        assert_eq!(
            ends(&reg, "a")[..2],
            [
                (2, Some(80), Some("client disconnected".into())),
                (2, Some(50), Some("tellus restarted".into()))
            ]
        );
    }

    #[test]
    fn presence_counts_registered_devices_once_each() {
        let (_dir, reg) = open();
        let counts = |devices, online| PresenceCounts { devices, online };
        assert_eq!(reg.presence_counts().unwrap(), counts(0, 0));
        for (d, s) in [("a", "01"), ("b", "02"), ("c", "03"), ("d", "04")] {
            reg.insert_device(&new(d, s, 100)).unwrap();
        }
        reg.record_sessions(&[
            // Two open sessions of one device count once.
            opened("a", 1, 10),
            opened("a", 2, 11),
            opened("b", 3, 12),
            opened("c", 4, 13),
            closed("c", 4, 14, "client disconnected"),
            // A session of a device not registered does not count.
            opened("zz", 5, 15),
        ])
        .unwrap();
        assert_eq!(reg.presence_counts().unwrap(), counts(4, 2));
        // A deleted device's open session stays on record until the gate ends it, but the
        // device no longer counts.
        assert!(reg.delete_device(&id("b"), 20).unwrap());
        assert_eq!(ends(&reg, "b"), [(3, None, None)]);
        assert_eq!(reg.presence_counts().unwrap(), counts(3, 1));
        reg.record_sessions(&[closed("b", 3, 21, "deleted")])
            .unwrap();
        assert_eq!(ends(&reg, "b"), [(3, Some(21), Some("deleted".into()))]);
        assert_eq!(reg.presence_counts().unwrap(), counts(3, 1));
    }

    #[test]
    fn trimming_sessions_keeps_those_still_open() {
        let (dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        let events: Vec<SessionEvent> = (1..=6).map(|n| opened("a", n, n as i64)).collect();
        reg.record_sessions(&events).unwrap();
        let ended: Vec<SessionEvent> = [2, 3, 5, 6]
            .into_iter()
            .map(|n| closed("a", n, 10, "client disconnected"))
            .collect();
        reg.record_sessions(&ended).unwrap();
        let kept = |reg: &SqliteRegistry| {
            reg.sessions(&id("a"), None, 100)
                .unwrap()
                .into_iter()
                .map(|s| s.session)
                .collect::<Vec<_>>()
        };
        // Far below the limit, recording deletes nothing.
        assert_eq!(kept(&reg), [6, 5, 4, 3, 2, 1]);
        let trim = |keep| SqliteRegistry::on(&reg.history, |c| trim_sessions(c, keep)).unwrap();
        // Beyond the newest two, the ended sessions go; open ones stay however old.
        assert_eq!(trim(2), 2);
        assert_eq!(kept(&reg), [6, 5, 4, 1]);
        assert_eq!(trim(0), 2);
        assert_eq!(kept(&reg), [4, 1]);
        assert_eq!(trim(0), 0);
        assert_eq!(reg.presence_counts().unwrap().online, 1);
        // What is kept survives reopening.
        drop(reg);
        let reg = SqliteRegistry::open(&dir.path().join("registry.db")).unwrap();
        assert_eq!(kept(&reg), [4, 1]);
    }

    fn refused<T: std::fmt::Debug>(r: Result<T, RegistryError>) -> String {
        match r {
            Err(RegistryError::Refused(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_device_without_state_has_the_empty_state_and_an_unknown_device_none() {
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        assert_eq!(
            reg.device_state(&id("a")).unwrap(),
            Some(DeviceState::empty())
        );
        assert_eq!(reg.device_state(&id("zz")).unwrap(), None);
        // Patching an unknown device is `None` too, and writes nothing.
        let patch = serde_json::json!({"led": "on"});
        assert_eq!(reg.patch_desired(&id("zz"), &patch, None, 5).unwrap(), None);
        assert_eq!(
            reg.patch_desired(&id("zz"), &patch, Some(0), 5).unwrap(),
            None
        );
        assert_eq!(reg.patch_reported(&id("zz"), &patch, 5).unwrap(), None);
        let rows: i64 = reg
            .with(|c| c.query_row("SELECT count(*) FROM device_state", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(rows, 0);
    }

    #[test]
    fn desired_patches_merge_and_bump_the_version() {
        use serde_json::json;
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.insert_device(&new("b", "02", 100)).unwrap();
        let first = reg
            .patch_desired(
                &id("a"),
                &json!({"led": "on", "net": {"mode": "lte"}}),
                None,
                5,
            )
            .unwrap()
            .unwrap();
        assert_eq!(
            first,
            DeviceState {
                desired: json!({"led": "on", "net": {"mode": "lte"}}),
                desired_version: 1,
                desired_at_ms: Some(5),
                ..DeviceState::empty()
            }
        );
        // Expecting the version it is at; `null` removes a member, objects merge.
        let second = reg
            .patch_desired(
                &id("a"),
                &json!({"led": null, "net": {"interval_s": 10}}),
                Some(1),
                6,
            )
            .unwrap()
            .unwrap();
        assert_eq!(
            second.desired,
            json!({"net": {"mode": "lte", "interval_s": 10}})
        );
        assert_eq!((second.desired_version, second.desired_at_ms), (2, Some(6)));
        // An empty patch still counts as a change.
        let third = reg
            .patch_desired(&id("a"), &json!({}), None, 7)
            .unwrap()
            .unwrap();
        assert_eq!(third.desired, second.desired);
        assert_eq!((third.desired_version, third.desired_at_ms), (3, Some(7)));
        assert_eq!(third.reported, json!({}));
        assert_eq!(reg.device_state(&id("a")).unwrap(), Some(third));
        // Another device's state is its own.
        assert_eq!(
            reg.device_state(&id("b")).unwrap(),
            Some(DeviceState::empty())
        );
    }

    #[test]
    fn a_desired_patch_at_another_version_is_refused_and_changes_nothing() {
        use serde_json::json;
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        // A device with no state is at version 0.
        assert!(
            refused(reg.patch_desired(&id("a"), &json!({"led": "on"}), Some(1), 5))
                .contains("desired state is at version 0, not 1")
        );
        assert_eq!(
            reg.device_state(&id("a")).unwrap(),
            Some(DeviceState::empty())
        );
        let now = reg
            .patch_desired(&id("a"), &json!({"led": "on"}), Some(0), 5)
            .unwrap()
            .unwrap();
        reg.patch_reported(&id("a"), &json!({"led": "off"}), 6)
            .unwrap();
        let before = reg.device_state(&id("a")).unwrap();
        assert_eq!(
            refused(reg.patch_desired(&id("a"), &json!({"led": "blink"}), Some(0), 7)),
            "desired state is at version 1, not 0"
        );
        assert_eq!(
            refused(reg.patch_desired(&id("a"), &json!({"led": "blink"}), Some(2), 7)),
            "desired state is at version 1, not 2"
        );
        assert_eq!(reg.device_state(&id("a")).unwrap(), before);
        assert_eq!(before.unwrap().desired, now.desired);
    }

    #[test]
    fn reported_patches_merge_apart_from_desired() {
        use serde_json::json;
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.patch_desired(&id("a"), &json!({"led": "on"}), None, 5)
            .unwrap();
        let reported = reg
            .patch_reported(&id("a"), &json!({"led": "off", "fw": {"v": "1.0"}}), 6)
            .unwrap()
            .unwrap();
        assert_eq!(reported.reported_version, 1);
        assert_eq!(reported.desired, json!({"led": "on"}));
        let reported = reg
            .patch_reported(&id("a"), &json!({"led": "on", "fw": {"slot": 2}}), 7)
            .unwrap()
            .unwrap();
        assert_eq!(
            reported,
            DeviceState {
                desired: json!({"led": "on"}),
                desired_version: 1,
                desired_at_ms: Some(5),
                reported: json!({"led": "on", "fw": {"v": "1.0", "slot": 2}}),
                reported_version: 2,
                reported_at_ms: Some(7),
            }
        );
        assert_eq!(
            tellus_core::state::delta(&reported.desired, &reported.reported),
            json!({})
        );
        assert_eq!(reg.device_state(&id("a")).unwrap(), Some(reported));
    }

    #[test]
    fn patches_that_fail_the_checks_are_refused_and_change_nothing() {
        use serde_json::json;
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.patch_desired(&id("a"), &json!({"led": "on"}), None, 5)
            .unwrap();
        let before = reg.device_state(&id("a")).unwrap();
        // Not an object (it would replace the state with something not an object).
        assert!(refused(reg.patch_desired(&id("a"), &json!(["x"]), None, 6))
            .contains("must be a JSON object"));
        assert!(refused(reg.patch_reported(&id("a"), &json!(null), 6))
            .contains("must be a JSON object"));
        // Too large at once, or grown too large by patches each small enough.
        let half = "x".repeat(state::MAX_BYTES / 2);
        assert!(
            refused(reg.patch_reported(&id("a"), &json!({"a": half, "b": half}), 6))
                .contains("larger than 64 KiB")
        );
        reg.patch_reported(&id("a"), &json!({ "a": half }), 6)
            .unwrap();
        assert!(
            refused(reg.patch_reported(&id("a"), &json!({ "b": half }), 7))
                .starts_with("the patched state is larger")
        );
        let after = reg.device_state(&id("a")).unwrap().unwrap();
        assert_eq!(after.desired, before.unwrap().desired);
        assert_eq!((after.reported_version, after.reported_at_ms), (1, Some(6)));
        // The same goes for an unknown device: the patch is checked first.
        assert!(refused(reg.patch_desired(&id("zz"), &json!(1), None, 6))
            .contains("must be a JSON object"));
    }

    #[test]
    fn deleting_a_device_deletes_its_state() {
        use serde_json::json;
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.insert_device(&new("b", "02", 100)).unwrap();
        for d in ["a", "b"] {
            reg.patch_desired(&id(d), &json!({"led": "on"}), None, 5)
                .unwrap();
            reg.patch_reported(&id(d), &json!({"led": "off"}), 6)
                .unwrap();
        }
        assert!(reg.delete_device(&id("a"), 7).unwrap());
        assert_eq!(reg.device_state(&id("a")).unwrap(), None);
        // Registered again under the same id, it starts with the empty state.
        reg.insert_device(&new("a", "03", 100)).unwrap();
        assert_eq!(
            reg.device_state(&id("a")).unwrap(),
            Some(DeviceState::empty())
        );
        assert_eq!(
            reg.device_state(&id("b")).unwrap().unwrap().desired_version,
            1
        );
    }

    #[test]
    fn device_state_survives_reopening_and_bad_rows_are_errors() {
        use serde_json::json;
        let (dir, reg) = open();
        let path = dir.path().join("registry.db");
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.patch_desired(&id("a"), &json!({"led": "on", "n": [1, 2.5]}), None, 5)
            .unwrap();
        let state = reg
            .patch_reported(&id("a"), &json!({"led": "off"}), 6)
            .unwrap()
            .unwrap();
        drop(reg);
        let reg = SqliteRegistry::open(&path).unwrap();
        assert_eq!(reg.device_state(&id("a")).unwrap(), Some(state.clone()));
        let next = reg
            .patch_desired(&id("a"), &json!({"led": "blink"}), Some(1), 7)
            .unwrap()
            .unwrap();
        assert_eq!(next.desired_version, 2);
        assert_eq!(next.reported, state.reported);

        // JSON this version cannot read, or that is not an object, is an error, not a panic.
        let raw = Connection::open(&path).unwrap();
        for bad in ["{not json", "[1]"] {
            raw.execute(
                "UPDATE device_state SET reported = ?1 WHERE device = 'a'",
                [bad],
            )
            .unwrap();
            assert!(matches!(
                reg.device_state(&id("a")),
                Err(RegistryError::Backend(_))
            ));
            assert!(matches!(
                reg.patch_reported(&id("a"), &json!({}), 8),
                Err(RegistryError::Backend(_))
            ));
        }
    }

    /// A running job of `devices`, sending `reboot`, recorded at `at`.
    fn job_of(devices: &[DeviceId], at: i64) -> Job {
        Job {
            id: tellus_core::command::new_job_id(),
            name: "reboot".into(),
            params: serde_json::json!({"delay_s": 5}),
            timeout_ms: 60_000,
            rate: 2.5,
            concurrency: 10,
            status: JobStatus::Running,
            created_at_ms: at,
            finished_at_ms: None,
            total: devices.len() as u64,
        }
    }

    /// The job's command for `device`, as the job runner creates it.
    fn job_cmd(job: &Job, device: &str) -> Command {
        Command {
            job: Some(job.id.clone()),
            ..cmd(device, device, 1_000)
        }
    }

    fn devs(v: Vec<DeviceId>) -> Vec<String> {
        v.into_iter().map(|d| d.to_string()).collect()
    }

    fn job_ids(v: Vec<Job>) -> Vec<String> {
        v.into_iter().map(|j| j.id).collect()
    }

    #[test]
    fn jobs_are_recorded_got_and_listed_newest_first() {
        let (_dir, reg) = open();
        let devices = [id("c"), id("a"), id("b")];
        let first = job_of(&devices, 10);
        let second = job_of(&devices[..1], 20);
        let third = job_of(&[], 30);
        for j in [&first, &second, &third] {
            let selected = &devices[..j.total as usize];
            reg.insert_job(j, selected).unwrap();
        }
        assert_eq!(reg.job(&first.id).unwrap(), Some(first.clone()));
        assert_eq!(reg.job("j-none").unwrap(), None);
        assert_eq!(
            job_ids(reg.jobs(None, None, 10).unwrap()),
            [third.id.as_str(), second.id.as_str(), first.id.as_str()]
        );
        assert_eq!(
            job_ids(reg.jobs(None, Some(&third.id), 1).unwrap()),
            [second.id.as_str()]
        );
        assert!(reg.jobs(None, Some("j-none"), 10).unwrap().is_empty());

        reg.finish_job(&second.id, JobStatus::Completed, 40)
            .unwrap();
        assert_eq!(
            job_ids(reg.jobs(Some(JobStatus::Running), None, 10).unwrap()),
            [third.id.as_str(), first.id.as_str()]
        );
        assert_eq!(
            job_ids(reg.jobs(Some(JobStatus::Completed), None, 10).unwrap()),
            [second.id.as_str()]
        );
        assert!(reg
            .jobs(Some(JobStatus::Aborted), None, 10)
            .unwrap()
            .is_empty());

        // A duplicate id, a job not running, a wrong total or a device named twice is
        // refused, and nothing of it is recorded.
        assert!(refused(reg.insert_job(&first, &devices)).contains("exists already"));
        let aborted = Job {
            status: JobStatus::Aborted,
            ..job_of(&devices, 50)
        };
        assert!(refused(reg.insert_job(&aborted, &devices)).contains("must be running"));
        let short = job_of(&devices, 50);
        assert!(refused(reg.insert_job(&short, &devices[..2])).contains("counts 3 devices"));
        let twice = [id("a"), id("a")];
        assert!(refused(reg.insert_job(&job_of(&twice, 50), &twice)).contains("named twice"));
        assert_eq!(reg.jobs(None, None, 10).unwrap().len(), 3);
    }

    #[test]
    fn job_devices_without_command_shrink_as_commands_are_created() {
        let (_dir, reg) = open();
        for (d, s) in [("a", "01"), ("b", "02"), ("c", "03"), ("d", "04")] {
            reg.insert_device(&new(d, s, 100)).unwrap();
        }
        let selected = [id("c"), id("a"), id("d"), id("b")];
        let job = job_of(&selected, 10);
        reg.insert_job(&job, &selected).unwrap();
        let other = job_of(&selected, 10);
        reg.insert_job(&other, &selected).unwrap();
        let without = |limit| devs(reg.job_devices_without_command(&job.id, limit).unwrap());
        assert_eq!(without(10), ["c", "a", "d", "b"]);
        assert_eq!(without(2), ["c", "a"]);

        reg.insert_command(&job_cmd(&job, "c")).unwrap();
        // A command of no job, or of another job, does not count.
        reg.insert_command(&cmd("a", "manual", 1_000)).unwrap();
        reg.insert_command(&job_cmd(&other, "a")).unwrap();
        assert_eq!(without(2), ["a", "d"]);
        // An ended command still counts: the device was sent its command.
        let a = job_cmd(&job, "a");
        reg.insert_command(&a).unwrap();
        assert!(move_to(&reg, &a, CommandStatus::Cancelled, 5));
        assert_eq!(without(10), ["d", "b"]);

        // A device deleted since is skipped, also after it was sent its command.
        assert!(reg.delete_device(&id("d"), 6).unwrap());
        assert!(reg.delete_device(&id("c"), 6).unwrap());
        assert_eq!(without(10), ["b"]);
        reg.insert_command(&job_cmd(&job, "b")).unwrap();
        assert!(without(10).is_empty());
        assert!(reg
            .job_devices_without_command("j-none", 10)
            .unwrap()
            .is_empty());
        assert_eq!(
            devs(reg.job_devices_without_command(&other.id, 10).unwrap()),
            ["b"]
        );
    }

    #[test]
    fn job_counts_and_open_commands_follow_the_moves() {
        let (_dir, reg) = open();
        for (d, s) in [("a", "01"), ("b", "02"), ("c", "03"), ("d", "04")] {
            reg.insert_device(&new(d, s, 100)).unwrap();
        }
        let selected = [id("a"), id("b"), id("c"), id("d")];
        let job = job_of(&selected, 10);
        reg.insert_job(&job, &selected).unwrap();
        assert!(reg.job_counts(&job.id).unwrap().is_empty());
        assert_eq!(reg.job_open_commands(&job.id).unwrap(), 0);

        let cmds: Vec<Command> = ["a", "b", "c", "d"]
            .into_iter()
            .map(|d| job_cmd(&job, d))
            .collect();
        for c in &cmds {
            reg.insert_command(c).unwrap();
        }
        // Not the job's: counted nowhere.
        reg.insert_command(&cmd("a", "manual", 1_000)).unwrap();
        assert_eq!(
            reg.job_counts(&job.id).unwrap(),
            BTreeMap::from([(CommandStatus::Queued, 4)])
        );
        assert_eq!(reg.job_open_commands(&job.id).unwrap(), 4);

        assert!(move_to(&reg, &cmds[0], CommandStatus::Sent, 2));
        assert!(move_to(&reg, &cmds[1], CommandStatus::Sent, 2));
        assert!(move_to(&reg, &cmds[1], CommandStatus::Delivered, 3));
        assert!(move_to(&reg, &cmds[2], CommandStatus::Sent, 2));
        assert!(move_to(&reg, &cmds[2], CommandStatus::Succeeded, 3));
        assert!(move_to(&reg, &cmds[3], CommandStatus::Cancelled, 3));
        assert_eq!(
            reg.job_counts(&job.id).unwrap(),
            BTreeMap::from([
                (CommandStatus::Sent, 1),
                (CommandStatus::Delivered, 1),
                (CommandStatus::Succeeded, 1),
                (CommandStatus::Cancelled, 1),
            ])
        );
        assert_eq!(reg.job_open_commands(&job.id).unwrap(), 2);

        assert!(move_to(&reg, &cmds[0], CommandStatus::Failed, 4));
        assert_eq!(reg.expire_commands(1_000, 10).unwrap().len(), 2);
        assert_eq!(
            reg.job_counts(&job.id).unwrap(),
            BTreeMap::from([
                (CommandStatus::Succeeded, 1),
                (CommandStatus::Failed, 1),
                (CommandStatus::Expired, 1),
                (CommandStatus::Cancelled, 1),
            ])
        );
        assert_eq!(reg.job_open_commands(&job.id).unwrap(), 0);
        assert!(reg.job_counts("j-none").unwrap().is_empty());
    }

    #[test]
    fn job_commands_page_oldest_first_and_filter_by_status() {
        let (_dir, reg) = open();
        for (d, s) in [("a", "01"), ("b", "02"), ("c", "03"), ("d", "04")] {
            reg.insert_device(&new(d, s, 100)).unwrap();
        }
        let selected = [id("a"), id("b"), id("c"), id("d")];
        let job = job_of(&selected, 10);
        reg.insert_job(&job, &selected).unwrap();
        let other = job_of(&selected[..1], 10);
        reg.insert_job(&other, &selected[..1]).unwrap();
        // Created in the order d, b, a, c: that order, not the devices', decides.
        let cmds: Vec<Command> = ["d", "b", "a", "c"]
            .into_iter()
            .map(|d| job_cmd(&job, d))
            .collect();
        for c in &cmds {
            reg.insert_command(c).unwrap();
        }
        let not_ours = job_cmd(&other, "a");
        reg.insert_command(&not_ours).unwrap();
        assert!(move_to(&reg, &cmds[1], CommandStatus::Sent, 2));
        assert!(move_to(&reg, &cmds[3], CommandStatus::Sent, 2));

        let page = |status, after: Option<&str>, limit| {
            names(reg.job_commands(&job.id, status, after, limit).unwrap())
        };
        assert_eq!(page(None, None, 10), ["d", "b", "a", "c"]);
        assert_eq!(page(None, None, 2), ["d", "b"]);
        assert_eq!(page(None, Some(&cmds[1].id), 2), ["a", "c"]);
        assert!(page(None, Some(&cmds[3].id), 2).is_empty());
        assert_eq!(page(Some(CommandStatus::Sent), None, 10), ["b", "c"]);
        assert_eq!(page(Some(CommandStatus::Queued), None, 10), ["d", "a"]);
        assert_eq!(
            page(Some(CommandStatus::Queued), Some(&cmds[0].id), 10),
            ["a"]
        );
        assert!(page(Some(CommandStatus::Failed), None, 10).is_empty());
        // `after` must name one of this job's commands.
        assert!(page(None, Some(&not_ours.id), 10).is_empty());
        assert!(page(None, Some("c-none"), 10).is_empty());
        // The rows are whole commands.
        assert_eq!(
            reg.job_commands(&job.id, None, None, 1).unwrap(),
            [cmds[0].clone()]
        );
    }

    #[test]
    fn a_job_finishes_only_from_running() {
        let (_dir, reg) = open();
        let done = job_of(&[], 10);
        let stopped = job_of(&[], 10);
        reg.insert_job(&done, &[]).unwrap();
        reg.insert_job(&stopped, &[]).unwrap();

        // To `running`: nothing changes.
        assert_eq!(
            reg.finish_job(&done.id, JobStatus::Running, 20).unwrap(),
            Some(done.clone())
        );
        let completed = reg
            .finish_job(&done.id, JobStatus::Completed, 20)
            .unwrap()
            .unwrap();
        assert_eq!(completed.status, JobStatus::Completed);
        assert_eq!(completed.finished_at_ms, Some(20));
        // An ended job stays as it ended.
        assert_eq!(
            reg.finish_job(&done.id, JobStatus::Aborted, 30).unwrap(),
            Some(completed.clone())
        );
        assert_eq!(
            reg.finish_job(&done.id, JobStatus::Completed, 30).unwrap(),
            Some(completed)
        );

        let aborted = reg
            .finish_job(&stopped.id, JobStatus::Aborted, 25)
            .unwrap()
            .unwrap();
        assert_eq!(
            (aborted.status, aborted.finished_at_ms),
            (JobStatus::Aborted, Some(25))
        );
        assert_eq!(reg.job(&stopped.id).unwrap(), Some(aborted));
        assert_eq!(
            reg.finish_job("j-none", JobStatus::Aborted, 25).unwrap(),
            None
        );
    }

    #[test]
    fn jobs_survive_reopening_and_bad_rows_are_errors() {
        let (dir, reg) = open();
        let path = dir.path().join("registry.db");
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.insert_device(&new("b", "02", 100)).unwrap();
        let selected = [id("b"), id("a")];
        let job = job_of(&selected, 10);
        reg.insert_job(&job, &selected).unwrap();
        let b = job_cmd(&job, "b");
        reg.insert_command(&b).unwrap();
        drop(reg);

        let reg = SqliteRegistry::open(&path).unwrap();
        assert_eq!(reg.job(&job.id).unwrap(), Some(job.clone()));
        assert_eq!(
            devs(reg.job_devices_without_command(&job.id, 10).unwrap()),
            ["a"]
        );
        assert_eq!(
            reg.job_commands(&job.id, None, None, 10).unwrap(),
            std::slice::from_ref(&b)
        );
        assert_eq!(
            reg.job_counts(&job.id).unwrap(),
            BTreeMap::from([(CommandStatus::Queued, 1)])
        );

        // A status, JSON or number this version cannot read is an error, not a panic.
        let raw = Connection::open(&path).unwrap();
        for bad in [
            "UPDATE jobs SET status = 'paused' WHERE id = ?1",
            "UPDATE jobs SET params = '{not json' WHERE id = ?1",
            "UPDATE jobs SET concurrency = -1 WHERE id = ?1",
            "UPDATE jobs SET total = -1 WHERE id = ?1",
        ] {
            raw.execute(
                "UPDATE jobs SET status = 'running', params = '{}', concurrency = 1, total = 2
                 WHERE id = ?1",
                [&job.id],
            )
            .unwrap();
            assert!(reg.job(&job.id).unwrap().is_some());
            raw.execute(bad, [&job.id]).unwrap();
            assert!(
                matches!(reg.job(&job.id), Err(RegistryError::Backend(_))),
                "{bad}"
            );
            assert!(
                matches!(reg.jobs(None, None, 10), Err(RegistryError::Backend(_))),
                "{bad}"
            );
        }
        raw.execute(
            "UPDATE commands SET status = 'paused' WHERE id = ?1",
            [&b.id],
        )
        .unwrap();
        assert!(matches!(
            reg.job_counts(&job.id),
            Err(RegistryError::Backend(_))
        ));
    }

    #[test]
    fn queries_by_job_use_the_job_indexes() {
        let (dir, _reg) = open();
        let raw = Connection::open(dir.path().join("registry.db")).unwrap();
        let plan = |sql: &str| -> String {
            let mut stmt = raw.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            rows.join("; ")
        };
        let exists = plan("SELECT 1 FROM commands c WHERE c.job = 'j' AND c.device = 'd'");
        assert!(exists.contains("commands_by_job "), "{exists}");
        let listing = plan("SELECT id FROM commands WHERE job = 'j' AND seq > 0 ORDER BY seq");
        assert!(listing.contains("commands_by_job_seq"), "{listing}");
        assert!(!listing.contains("TEMP B-TREE"), "{listing}");
    }

    fn spec_of(name: &str) -> RuleSpec {
        RuleSpec {
            name: name.to_owned(),
            description: "too hot for too long".into(),
            trigger: Trigger::Telemetry,
            devices: DeviceSelector {
                ids: vec![id("a"), id("b")],
                tags: BTreeMap::from([("site".to_owned(), "berlin".to_owned())]),
            },
            condition: "metrics.temp > 80.0".into(),
            hold: Some(Duration::from_secs(90)),
            actions: vec![
                Action::Alert {
                    severity: Severity::Critical,
                    message: Some("hot".into()),
                },
                Action::Command {
                    name: "cool".into(),
                    params: serde_json::json!({"to": 20}),
                    devices: None,
                    timeout: Some(Duration::from_millis(1_500)),
                },
            ],
        }
    }

    /// A new rule with id `r-{name}`, created at 10.
    fn rule_of(name: &str, enabled: bool) -> Rule {
        Rule {
            id: format!("r-{name}"),
            spec: spec_of(name),
            enabled,
            version: 1,
            created_at_ms: 10,
            updated_at_ms: 10,
        }
    }

    fn rule_ids(v: Vec<Rule>) -> Vec<String> {
        v.into_iter().map(|r| r.id).collect()
    }

    #[test]
    fn api_tokens_are_recorded_listed_and_deleted() {
        let (_dir, reg) = open();
        let token = |id: &str, role| ApiToken {
            id: id.into(),
            name: format!("name of {id}"),
            role,
            secret_sha256: "ab".repeat(32),
            created_at_ms: 1_000,
        };
        reg.insert_api_token(&token("t2", Role::Viewer)).unwrap();
        reg.insert_api_token(&token("t1", Role::Operator)).unwrap();
        let why = refused(reg.insert_api_token(&token("t1", Role::Admin)));
        assert!(why.contains("token t1 exists already"), "{why}");
        assert_eq!(
            reg.api_token("t1").unwrap(),
            Some(token("t1", Role::Operator))
        );
        assert_eq!(reg.api_token("t3").unwrap(), None);
        let ids = |v: Vec<ApiToken>| v.into_iter().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(ids(reg.api_tokens(None, 10).unwrap()), ["t1", "t2"]);
        assert_eq!(ids(reg.api_tokens(Some("t1"), 10).unwrap()), ["t2"]);
        assert!(reg.delete_api_token("t1").unwrap());
        assert!(!reg.delete_api_token("t1").unwrap());
        assert_eq!(reg.api_token("t1").unwrap(), None);
        assert_eq!(ids(reg.api_tokens(None, 10).unwrap()), ["t2"]);
    }

    #[test]
    fn rules_are_recorded_got_and_listed_by_id() {
        let (dir, reg) = open();
        for (name, enabled) in [("b", true), ("a", false), ("c", true)] {
            reg.insert_rule(&rule_of(name, enabled)).unwrap();
        }
        let why = refused(reg.insert_rule(&rule_of("a", true)));
        assert!(why.contains("r-a exists already"), "{why}");
        let why = refused(reg.insert_rule(&Rule {
            version: 2,
            ..rule_of("d", true)
        }));
        assert!(why.contains("version 1"), "{why}");
        assert_eq!(reg.rule("r-d").unwrap(), None);

        // The whole spec comes back, and the refused insert changed nothing.
        assert_eq!(reg.rule("r-a").unwrap(), Some(rule_of("a", false)));
        assert_eq!(reg.rule("r-none").unwrap(), None);
        assert_eq!(
            rule_ids(reg.rules(None, 10).unwrap()),
            ["r-a", "r-b", "r-c"]
        );
        assert_eq!(rule_ids(reg.rules(None, 2).unwrap()), ["r-a", "r-b"]);
        assert_eq!(rule_ids(reg.rules(Some("r-a"), 1).unwrap()), ["r-b"]);
        assert_eq!(rule_ids(reg.rules(Some("r-b"), 10).unwrap()), ["r-c"]);
        assert!(reg.rules(Some("r-c"), 10).unwrap().is_empty());
        // A cursor need not name a rule: ids after it.
        assert_eq!(rule_ids(reg.rules(Some("r-bb"), 10).unwrap()), ["r-c"]);
        assert!(reg.rules(None, 0).unwrap().is_empty());
        assert_eq!(rule_ids(reg.enabled_rules().unwrap()), ["r-b", "r-c"]);

        // The spec is stored as the operator's JSON, without the rule's own fields; the rule
        // as JSON has the spec's fields flattened into it and reads back the same.
        let raw = Connection::open(dir.path().join("registry.db")).unwrap();
        let stored: String = raw
            .query_row("SELECT spec FROM rules WHERE id = 'r-a'", [], |r| r.get(0))
            .unwrap();
        let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
        assert_eq!(stored, serde_json::to_value(spec_of("a")).unwrap());
        assert_eq!(stored["for"], "1m 30s");
        assert!(stored.get("id").is_none() && stored.get("version").is_none());
        let rule = reg.rule("r-a").unwrap().unwrap();
        let json = serde_json::to_value(&rule).unwrap();
        assert!(json.get("spec").is_none(), "{json}");
        assert_eq!(json["id"], "r-a");
        assert_eq!(json["name"], "a");
        assert_eq!(json["trigger"], "telemetry");
        assert_eq!(json["for"], "1m 30s");
        assert_eq!(json["enabled"], false);
        assert_eq!(json["version"], 1);
        assert_eq!(serde_json::from_value::<Rule>(json).unwrap(), rule);
    }

    #[test]
    fn rule_updates_add_one_to_the_version_and_check_the_expected_one() {
        let (_dir, reg) = open();
        reg.insert_rule(&rule_of("a", true)).unwrap();
        let disabled = reg
            .update_rule("r-a", None, Some(false), None, 20)
            .unwrap()
            .unwrap();
        assert_eq!(
            (disabled.enabled, disabled.version, disabled.updated_at_ms),
            (false, 2, 20)
        );
        assert_eq!(disabled.spec, spec_of("a"));
        assert_eq!(disabled.created_at_ms, 10);
        assert_eq!(reg.rule("r-a").unwrap().as_ref(), Some(&disabled));
        assert!(reg.enabled_rules().unwrap().is_empty());

        let other = RuleSpec {
            condition: String::new(),
            hold: None,
            actions: vec![Action::Publish {
                topic: "rules/hot".into(),
                retain: true,
            }],
            ..spec_of("renamed")
        };
        let respecced = reg
            .update_rule("r-a", Some(&other), None, Some(2), 30)
            .unwrap()
            .unwrap();
        assert_eq!(
            (&respecced.spec, respecced.enabled, respecced.version),
            (&other, false, 3)
        );
        assert_eq!(reg.rule("r-a").unwrap().as_ref(), Some(&respecced));

        // Another version than expected: nothing changes.
        assert!(matches!(
            reg.update_rule("r-a", Some(&spec_of("x")), Some(true), Some(2), 40),
            Err(RegistryError::VersionConflict { current: 3 })
        ));
        assert_eq!(reg.rule("r-a").unwrap().as_ref(), Some(&respecced));

        let both = reg
            .update_rule("r-a", Some(&spec_of("a")), Some(true), Some(3), 50)
            .unwrap()
            .unwrap();
        assert_eq!(
            both,
            Rule {
                version: 4,
                updated_at_ms: 50,
                ..rule_of("a", true)
            }
        );
        // Nothing to change: the rule as it is, its version unmoved (but still checked).
        assert_eq!(
            reg.update_rule("r-a", None, None, None, 60).unwrap(),
            Some(both.clone())
        );
        assert!(matches!(
            reg.update_rule("r-a", None, None, Some(1), 60),
            Err(RegistryError::VersionConflict { current: 4 })
        ));
        assert_eq!(
            reg.update_rule("r-none", None, Some(true), None, 60)
                .unwrap(),
            None
        );
        assert_eq!(
            reg.update_rule("r-none", None, Some(true), Some(1), 60)
                .unwrap(),
            None
        );
    }

    #[test]
    fn the_rules_generation_moves_on_each_rule_change_only() {
        let (_dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        let generation = || reg.rules_generation().unwrap();
        let mut last = generation();
        let mut moved = |expected: bool, what: &str| {
            let now = generation();
            assert_eq!(now > last, expected, "{what}: {last} -> {now}");
            assert!(now >= last, "{what}");
            last = now;
        };
        reg.insert_rule(&rule_of("a", true)).unwrap();
        moved(true, "insert");
        reg.insert_rule(&rule_of("a", true)).unwrap_err();
        moved(false, "refused insert");
        reg.update_rule("r-a", None, Some(false), None, 20).unwrap();
        moved(true, "disable");
        reg.update_rule("r-a", Some(&spec_of("b")), None, None, 20)
            .unwrap();
        moved(true, "new spec");
        reg.update_rule("r-a", None, Some(true), Some(1), 20)
            .unwrap_err();
        moved(false, "version conflict");
        reg.update_rule("r-a", None, None, None, 20).unwrap();
        moved(false, "nothing to change");
        reg.update_rule("r-none", None, Some(true), None, 20)
            .unwrap();
        moved(false, "no such rule");
        reg.update_rule("r-a", None, Some(true), None, 20).unwrap();
        moved(true, "enable");
        let (alert, _) = reg
            .raise_alert(
                &Raise {
                    rule: "r-a",
                    version: None,
                    device: &id("a"),
                    severity: Severity::Info,
                    message: "",
                    values: &serde_json::json!({}),
                },
                30,
            )
            .unwrap();
        reg.acknowledge_alert(&alert.id, 31).unwrap();
        reg.clear_rule_alerts("r-a", "condition", 32).unwrap();
        moved(false, "alerts");
        reg.delete_rule("r-none", 40).unwrap();
        moved(false, "delete of no rule");
        reg.delete_rule("r-a", 40).unwrap();
        moved(true, "delete");
        // Reinserting a deleted rule moves it again: it never comes back to a value seen.
        reg.insert_rule(&rule_of("a", true)).unwrap();
        moved(true, "insert again");
    }

    /// Raises the alert of `rule` for `device` at `at`, with `{"n": at}` as its values.
    fn raise(reg: &SqliteRegistry, rule: &str, device: &str, at: i64) -> (Alert, bool) {
        reg.raise_alert(
            &Raise {
                rule,
                version: None,
                device: &id(device),
                severity: Severity::Warning,
                message: &format!("raised at {at}"),
                values: &serde_json::json!({ "n": at }),
            },
            at,
        )
        .unwrap()
    }

    /// A registry with devices `a` and `b` and the enabled rules `r-1` and `r-2`.
    fn alerting() -> (tempfile::TempDir, SqliteRegistry) {
        let (dir, reg) = open();
        reg.insert_device(&new("a", "01", 100)).unwrap();
        reg.insert_device(&new("b", "02", 100)).unwrap();
        reg.insert_rule(&rule_of("1", true)).unwrap();
        reg.insert_rule(&rule_of("2", true)).unwrap();
        (dir, reg)
    }

    #[test]
    fn deleting_a_rule_clears_its_open_alerts_in_the_same_transaction() {
        let (_dir, reg) = alerting();
        let (old, _) = raise(&reg, "r-1", "a", 10);
        reg.clear_alert("r-1", &id("a"), "condition", 11).unwrap();
        let (active, _) = raise(&reg, "r-1", "a", 12);
        let (acked, _) = raise(&reg, "r-1", "b", 13);
        reg.acknowledge_alert(&acked.id, 14).unwrap();
        let (other, _) = raise(&reg, "r-2", "a", 15);

        let cleared = reg.delete_rule("r-1", 20).unwrap().unwrap();
        let ids: Vec<&str> = cleared.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, [acked.id.as_str(), active.id.as_str()]);
        for a in &cleared {
            assert_eq!(a.status, AlertStatus::Cleared);
            assert_eq!(a.cleared_at_ms, Some(20));
            assert_eq!(a.cleared_reason.as_deref(), Some("rule_deleted"));
            assert_eq!(reg.alert(&a.id).unwrap().as_ref(), Some(a));
        }
        assert_eq!(reg.rule("r-1").unwrap(), None);
        // An alert cleared before keeps its reason; another rule's alert stays open.
        let old = reg.alert(&old.id).unwrap().unwrap();
        assert_eq!(old.cleared_reason.as_deref(), Some("condition"));
        assert_eq!(reg.alert(&other.id).unwrap(), Some(other));
        assert_eq!(reg.delete_rule("r-1", 30).unwrap(), None);
        // The deleted rule's alerts stay as history.
        let rule = AlertQuery {
            rule: Some("r-1"),
            limit: 10,
            ..Default::default()
        };
        assert_eq!(reg.alerts(&rule).unwrap().len(), 3);
        // No alert can be raised for it any more.
        let why = refused(reg.raise_alert(
            &Raise {
                rule: "r-1",
                version: None,
                device: &id("a"),
                severity: Severity::Info,
                message: "",
                values: &serde_json::json!({}),
            },
            40,
        ));
        assert!(why.contains("no rule r-1"), "{why}");
        // A rule deleted with no alert open clears none.
        assert_eq!(reg.delete_rule("r-2", 50).unwrap().unwrap().len(), 1);
        reg.insert_rule(&rule_of("3", true)).unwrap();
        assert_eq!(reg.delete_rule("r-3", 50).unwrap(), Some(vec![]));
    }

    #[test]
    fn an_alert_is_raised_once_acknowledged_cleared_and_raised_anew() {
        let (_dir, reg) = alerting();
        let a = id("a");
        let (first, created) = reg
            .raise_alert(
                &Raise {
                    rule: "r-1",
                    version: None,
                    device: &a,
                    severity: Severity::Critical,
                    message: "temp 81.5",
                    values: &serde_json::json!({"metrics": {"temp": 81.5}}),
                },
                10,
            )
            .unwrap();
        assert!(created);
        assert!(first.id.starts_with("a-"), "{}", first.id);
        assert_eq!(
            first,
            Alert {
                id: first.id.clone(),
                rule: "r-1".into(),
                device: a.clone(),
                severity: Severity::Critical,
                status: AlertStatus::Active,
                message: "temp 81.5".into(),
                values: serde_json::json!({"metrics": {"temp": 81.5}}),
                raised_at_ms: 10,
                acknowledged_at_ms: None,
                cleared_at_ms: None,
                cleared_reason: None,
            }
        );
        assert_eq!(reg.alert(&first.id).unwrap().as_ref(), Some(&first));

        // Raised again while open: the same alert, with the new message and values only.
        let (again, created) = reg
            .raise_alert(
                &Raise {
                    rule: "r-1",
                    version: None,
                    device: &a,
                    severity: Severity::Info,
                    message: "temp 83",
                    values: &serde_json::json!({"metrics": {"temp": 83}}),
                },
                20,
            )
            .unwrap();
        assert!(!created);
        let updated = Alert {
            message: "temp 83".into(),
            values: serde_json::json!({"metrics": {"temp": 83}}),
            ..first.clone()
        };
        assert_eq!(again, updated);
        assert_eq!(reg.alert(&first.id).unwrap().as_ref(), Some(&updated));

        let acked = reg.acknowledge_alert(&first.id, 30).unwrap().unwrap();
        assert_eq!(
            (acked.status, acked.acknowledged_at_ms),
            (AlertStatus::Acknowledged, Some(30))
        );
        // Acknowledging again changes nothing.
        assert_eq!(
            reg.acknowledge_alert(&first.id, 35).unwrap().as_ref(),
            Some(&acked)
        );
        // An acknowledged alert is still the open one.
        let (still, created) = raise(&reg, "r-1", "a", 40);
        assert!(!created);
        assert_eq!(
            (still.id.as_str(), still.status),
            (first.id.as_str(), AlertStatus::Acknowledged)
        );

        let cleared = reg
            .clear_alert("r-1", &a, "condition", 50)
            .unwrap()
            .unwrap();
        assert_eq!(cleared.id, first.id);
        assert_eq!(cleared.acknowledged_at_ms, Some(30));
        assert_eq!(
            ending(&cleared),
            (AlertStatus::Cleared, Some(50), Some("condition"))
        );
        assert_eq!(reg.alert(&first.id).unwrap().as_ref(), Some(&cleared));
        assert_eq!(reg.clear_alert("r-1", &a, "condition", 55).unwrap(), None);
        let why = refused(reg.acknowledge_alert(&first.id, 60));
        assert!(why.contains(&first.id) && why.contains("cleared"), "{why}");
        assert_eq!(reg.alert(&first.id).unwrap().as_ref(), Some(&cleared));

        // Raised after it was cleared: a new alert.
        let (second, created) = raise(&reg, "r-1", "a", 70);
        assert!(created);
        assert_ne!(second.id, first.id);
        assert_eq!(
            (second.status, second.raised_at_ms),
            (AlertStatus::Active, 70)
        );
        assert_eq!(reg.alert(&first.id).unwrap().as_ref(), Some(&cleared));

        assert_eq!(reg.acknowledge_alert("a-none", 80).unwrap(), None);
        assert_eq!(reg.alert("a-none").unwrap(), None);
        assert_eq!(reg.clear_alert("r-2", &a, "condition", 80).unwrap(), None);
    }

    #[test]
    fn an_alert_is_raised_only_for_an_enabled_rule_and_a_registered_device() {
        let (_dir, reg) = alerting();
        let raise_for = |rule: &str, device: &str| {
            reg.raise_alert(
                &Raise {
                    rule,
                    version: None,
                    device: &id(device),
                    severity: Severity::Info,
                    message: "",
                    values: &serde_json::json!({}),
                },
                10,
            )
        };
        let why = refused(raise_for("r-none", "a"));
        assert!(why.contains("no rule r-none"), "{why}");
        let why = refused(raise_for("r-1", "zz"));
        assert!(why.contains("no device zz"), "{why}");
        // A firing of a version that is no longer current raises nothing; the current one
        // does.
        let rule = reg.rule("r-1").unwrap().unwrap();
        reg.update_rule("r-1", Some(&rule.spec), None, None, 4)
            .unwrap();
        let at = |version| {
            reg.raise_alert(
                &Raise {
                    rule: "r-1",
                    version: Some(version),
                    device: &id("a"),
                    severity: Severity::Info,
                    message: "",
                    values: &serde_json::json!({}),
                },
                4,
            )
        };
        let why = refused(at(rule.version));
        assert!(why.contains("changed (it is at version 2)"), "{why}");
        let (current, _) = at(rule.version + 1).unwrap();
        reg.clear_alert("r-1", &id("a"), "condition", 4).unwrap();
        assert_eq!(current.rule, "r-1");
        reg.update_rule("r-2", None, Some(false), None, 5).unwrap();
        let why = refused(raise_for("r-2", "a"));
        assert!(why.contains("r-2 is disabled"), "{why}");
        assert!(reg.open_alerts(10).unwrap().is_empty());
        // Disabling leaves an open alert open (the caller clears it), and it can be raised
        // again meanwhile.
        let (open, _) = raise_for("r-1", "a").unwrap();
        reg.update_rule("r-1", None, Some(false), None, 20).unwrap();
        let (again, created) = raise_for("r-1", "a").unwrap();
        assert_eq!((again.id, created), (open.id, false));
        assert_eq!(
            reg.clear_rule_alerts("r-1", "rule_disabled", 30)
                .unwrap()
                .len(),
            1
        );
    }

    /// How an alert ended: (status, when cleared, why).
    fn ending(a: &Alert) -> (AlertStatus, Option<TimestampMs>, Option<&str>) {
        (a.status, a.cleared_at_ms, a.cleared_reason.as_deref())
    }

    fn alert_ids(v: &[Alert]) -> Vec<&str> {
        v.iter().map(|a| a.id.as_str()).collect()
    }

    #[test]
    fn alerts_are_listed_newest_first_filtered_and_paged() {
        let (_dir, reg) = alerting();
        // Oldest to newest: r-1/a cleared, r-1/b acknowledged, r-2/a active, r-2/b active,
        // r-1/a active; the last two raised in the same millisecond.
        let (c1a_old, _) = raise(&reg, "r-1", "a", 10);
        reg.clear_alert("r-1", &id("a"), "condition", 11).unwrap();
        let (c1b, _) = raise(&reg, "r-1", "b", 20);
        reg.acknowledge_alert(&c1b.id, 21).unwrap();
        let (c2a, _) = raise(&reg, "r-2", "a", 30);
        let (c2b, _) = raise(&reg, "r-2", "b", 40);
        let (c1a, _) = raise(&reg, "r-1", "a", 40);
        let (same_first, same_second) = if c2b.id > c1a.id {
            (&c2b, &c1a)
        } else {
            (&c1a, &c2b)
        };
        let list = |q: AlertQuery<'_>| -> Vec<String> {
            let limit = if q.limit == 0 { 100 } else { q.limit };
            reg.alerts(&AlertQuery { limit, ..q })
                .unwrap()
                .into_iter()
                .map(|a| a.id)
                .collect()
        };
        let all = list(AlertQuery::default());
        assert_eq!(
            all,
            [
                same_first.id.as_str(),
                same_second.id.as_str(),
                &c2a.id,
                &c1b.id,
                &c1a_old.id
            ]
        );

        // Filters.
        let (a, b) = (id("a"), id("b"));
        let with_status = |status| {
            list(AlertQuery {
                status: Some(status),
                ..Default::default()
            })
        };
        assert_eq!(with_status(AlertStatus::Cleared), [c1a_old.id.as_str()]);
        assert_eq!(with_status(AlertStatus::Acknowledged), [c1b.id.as_str()]);
        assert_eq!(
            with_status(AlertStatus::Active),
            [same_first.id.as_str(), &same_second.id, &c2a.id]
        );
        let open = list(AlertQuery {
            open: true,
            ..Default::default()
        });
        assert_eq!(open, all[..4]);
        // `status` wins over `open`.
        assert_eq!(
            list(AlertQuery {
                open: true,
                status: Some(AlertStatus::Cleared),
                ..Default::default()
            }),
            [c1a_old.id.as_str()]
        );
        assert_eq!(
            list(AlertQuery {
                device: Some(&a),
                ..Default::default()
            }),
            [c1a.id.as_str(), &c2a.id, &c1a_old.id]
        );
        assert_eq!(
            list(AlertQuery {
                rule: Some("r-1"),
                ..Default::default()
            }),
            [c1a.id.as_str(), &c1b.id, &c1a_old.id]
        );
        assert_eq!(
            list(AlertQuery {
                rule: Some("r-1"),
                device: Some(&a),
                open: true,
                ..Default::default()
            }),
            [c1a.id.as_str()]
        );
        assert_eq!(
            list(AlertQuery {
                rule: Some("r-2"),
                device: Some(&b),
                status: Some(AlertStatus::Acknowledged),
                ..Default::default()
            }),
            Vec::<String>::new()
        );
        assert!(list(AlertQuery {
            rule: Some("r-none"),
            ..Default::default()
        })
        .is_empty());

        // Paging, also across the two raised in the same millisecond.
        let mut paged = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = list(AlertQuery {
                after: after.as_deref(),
                limit: 2,
                ..Default::default()
            });
            assert!(page.len() <= 2);
            if page.is_empty() {
                break;
            }
            after = page.last().cloned();
            paged.extend(page);
        }
        assert_eq!(paged, all);
        for (i, cursor) in all.iter().enumerate() {
            assert_eq!(
                list(AlertQuery {
                    after: Some(cursor),
                    ..Default::default()
                }),
                all[i + 1..],
                "after {cursor}"
            );
        }
        // Paging applies after the filters; the cursor need not pass them (`c2b` is `b`'s,
        // raised in the same millisecond as `c1a`: ties go by id, descending).
        assert_eq!(
            list(AlertQuery {
                device: Some(&a),
                after: Some(&c1a.id),
                limit: 1,
                ..Default::default()
            }),
            [c2a.id.as_str()]
        );
        assert_eq!(
            list(AlertQuery {
                device: Some(&a),
                after: Some(&c2b.id),
                ..Default::default()
            }),
            if c2b.id > c1a.id {
                vec![c1a.id.as_str(), &c2a.id, &c1a_old.id]
            } else {
                vec![c2a.id.as_str(), &c1a_old.id]
            }
        );
        // No such alert: nothing after it.
        assert!(list(AlertQuery {
            after: Some("a-none"),
            ..Default::default()
        })
        .is_empty());
        assert!(reg
            .alerts(&AlertQuery {
                limit: 0,
                ..Default::default()
            })
            .unwrap()
            .is_empty());
    }

    #[test]
    fn clearing_a_rules_alerts_clears_only_its_open_ones() {
        let (_dir, reg) = alerting();
        let (old, _) = raise(&reg, "r-1", "a", 10);
        reg.clear_alert("r-1", &id("a"), "condition", 11).unwrap();
        let (a1, _) = raise(&reg, "r-1", "a", 20);
        let (b1, _) = raise(&reg, "r-1", "b", 30);
        reg.acknowledge_alert(&b1.id, 31).unwrap();
        let (a2, _) = raise(&reg, "r-2", "a", 40);
        assert_eq!(
            alert_ids(&reg.open_alerts(10).unwrap()),
            [a1.id.as_str(), &b1.id, &a2.id]
        );
        assert_eq!(
            alert_ids(&reg.open_alerts(2).unwrap()),
            [a1.id.as_str(), &b1.id]
        );

        let cleared = reg.clear_rule_alerts("r-1", "rule_disabled", 50).unwrap();
        assert_eq!(alert_ids(&cleared), [b1.id.as_str(), &a1.id]);
        for a in &cleared {
            assert_eq!(
                ending(a),
                (AlertStatus::Cleared, Some(50), Some("rule_disabled"))
            );
        }
        assert_eq!(reg.alert(&old.id).unwrap().unwrap().cleared_at_ms, Some(11));
        assert_eq!(alert_ids(&reg.open_alerts(10).unwrap()), [a2.id.as_str()]);
        assert!(reg
            .clear_rule_alerts("r-1", "rule_disabled", 60)
            .unwrap()
            .is_empty());
        assert!(reg
            .clear_rule_alerts("r-none", "rule_disabled", 60)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn deleting_a_device_clears_its_open_alerts_and_keeps_them() {
        let (_dir, reg) = alerting();
        let (old, _) = raise(&reg, "r-1", "a", 10);
        reg.clear_alert("r-1", &id("a"), "condition", 11).unwrap();
        let (a1, _) = raise(&reg, "r-1", "a", 20);
        let (a2, _) = raise(&reg, "r-2", "a", 30);
        reg.acknowledge_alert(&a2.id, 31).unwrap();
        let (b1, _) = raise(&reg, "r-1", "b", 40);

        assert!(reg.delete_device(&id("a"), 50).unwrap());
        for alert in [&a1, &a2] {
            let now = reg.alert(&alert.id).unwrap().unwrap();
            assert_eq!(
                ending(&now),
                (AlertStatus::Cleared, Some(50), Some("device_deleted"))
            );
        }
        assert_eq!(
            reg.alert(&old.id)
                .unwrap()
                .unwrap()
                .cleared_reason
                .as_deref(),
            Some("condition")
        );
        assert_eq!(alert_ids(&reg.open_alerts(10).unwrap()), [b1.id.as_str()]);
        let a = id("a");
        let history = reg
            .alerts(&AlertQuery {
                device: Some(&a),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(alert_ids(&history), [a2.id.as_str(), &a1.id, &old.id]);

        // None can be raised while it is gone; registered again, it starts with none open.
        let why = refused(reg.raise_alert(
            &Raise {
                rule: "r-1",
                version: None,
                device: &a,
                severity: Severity::Info,
                message: "",
                values: &serde_json::json!({}),
            },
            60,
        ));
        assert!(why.contains("no device a"), "{why}");
        reg.insert_device(&new("a", "05", 100)).unwrap();
        let (again, created) = raise(&reg, "r-1", "a", 70);
        assert!(created);
        assert!(![&old.id, &a1.id, &a2.id].contains(&&again.id));
    }

    #[test]
    fn one_alert_of_a_rule_and_device_is_open_at_most() {
        let (dir, reg) = alerting();
        let (open, _) = raise(&reg, "r-1", "a", 10);
        let raw = Connection::open(dir.path().join("registry.db")).unwrap();
        let insert = |id: &str, status: &str| {
            raw.execute(
                "INSERT INTO alerts (id, rule, device, severity, status, message, \"values\",
                     raised_at)
                 VALUES (?1, 'r-1', 'a', 'info', ?2, '', '{}', 20)",
                [id, status],
            )
        };
        insert("a-second", "active").unwrap_err();
        insert("a-second", "acknowledged").unwrap_err();
        insert("a-second", "cleared").unwrap();
        insert("a-third", "cleared").unwrap();
        assert_eq!(alert_ids(&reg.open_alerts(10).unwrap()), [open.id.as_str()]);
    }

    #[test]
    fn rules_and_alerts_survive_reopening_and_bad_rows_are_errors() {
        let (dir, reg) = alerting();
        let path = dir.path().join("registry.db");
        let r1 = reg
            .update_rule("r-1", None, Some(true), None, 20)
            .unwrap()
            .unwrap();
        let (acked, _) = raise(&reg, "r-1", "a", 30);
        let acked = reg.acknowledge_alert(&acked.id, 31).unwrap().unwrap();
        let (active, _) = raise(&reg, "r-2", "b", 40);
        let cleared = reg
            .clear_alert("r-2", &id("b"), "function", 41)
            .unwrap()
            .unwrap();
        let (active2, _) = raise(&reg, "r-2", "b", 50);
        let generation = reg.rules_generation().unwrap();
        drop(reg);

        let reg = SqliteRegistry::open(&path).unwrap();
        assert_eq!(reg.rule("r-1").unwrap().as_ref(), Some(&r1));
        assert_eq!(
            reg.rules(None, 10).unwrap(),
            [r1.clone(), rule_of("2", true)]
        );
        assert_eq!(reg.rules_generation().unwrap(), generation);
        assert_eq!(reg.alert(&acked.id).unwrap().as_ref(), Some(&acked));
        assert_eq!(reg.alert(&active.id).unwrap().as_ref(), Some(&cleared));
        assert_eq!(
            reg.open_alerts(10).unwrap(),
            [acked.clone(), active2.clone()]
        );
        assert_eq!(
            reg.alerts(&AlertQuery {
                limit: 10,
                ..Default::default()
            })
            .unwrap(),
            [active2.clone(), cleared, acked.clone()]
        );
        // The open alert is still the one raised again.
        let (again, created) = raise(&reg, "r-1", "a", 60);
        assert_eq!((again.id.as_str(), created), (acked.id.as_str(), false));

        // A spec, number, status, severity or JSON this version cannot read is an error, not
        // a panic.
        let raw = Connection::open(&path).unwrap();
        let good_spec = serde_json::to_string(&r1.spec).unwrap();
        for bad in [
            "UPDATE rules SET spec = '{not json' WHERE id = ?1",
            "UPDATE rules SET spec = '{\"name\": \"x\"}' WHERE id = ?1",
            "UPDATE rules SET spec = json_set(spec, '$.colour', 'red') WHERE id = ?1",
            "UPDATE rules SET version = -1 WHERE id = ?1",
        ] {
            raw.execute(
                "UPDATE rules SET spec = ?2, version = 2 WHERE id = ?1",
                [&r1.id, &good_spec],
            )
            .unwrap();
            assert!(reg.rule(&r1.id).unwrap().is_some());
            raw.execute(bad, [&r1.id]).unwrap();
            for result in [
                reg.rule(&r1.id).map(|_| ()),
                reg.rules(None, 10).map(|_| ()),
                reg.enabled_rules().map(|_| ()),
                reg.update_rule(&r1.id, None, Some(true), None, 70)
                    .map(|_| ()),
            ] {
                assert!(matches!(result, Err(RegistryError::Backend(_))), "{bad}");
            }
        }
        for bad in [
            "UPDATE alerts SET status = 'snoozed' WHERE id = ?1",
            "UPDATE alerts SET severity = 'fatal' WHERE id = ?1",
            "UPDATE alerts SET \"values\" = '{not json' WHERE id = ?1",
            "UPDATE alerts SET device = 'not a/device' WHERE id = ?1",
        ] {
            raw.execute(
                "UPDATE alerts SET status = 'active', severity = 'info', \"values\" = '{}',
                     device = 'b'
                 WHERE id = ?1",
                [&active2.id],
            )
            .unwrap();
            assert!(reg.alert(&active2.id).unwrap().is_some());
            raw.execute(bad, [&active2.id]).unwrap();
            for result in [
                reg.alert(&active2.id).map(|_| ()),
                reg.alerts(&AlertQuery {
                    limit: 10,
                    ..Default::default()
                })
                .map(|_| ()),
                reg.open_alerts(10).map(|_| ()),
                reg.acknowledge_alert(&active2.id, 70).map(|_| ()),
            ] {
                assert!(matches!(result, Err(RegistryError::Backend(_))), "{bad}");
            }
        }
    }

    #[test]
    fn queries_of_alerts_use_their_indexes() {
        let (dir, _reg) = open();
        let raw = Connection::open(dir.path().join("registry.db")).unwrap();
        let plan = |sql: &str, params: &[&dyn rusqlite::ToSql]| -> String {
            let mut stmt = raw.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let rows = stmt
                .query_map(params, |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            rows.join("; ")
        };
        let listing = |q: AlertQuery<'_>| {
            plan(
                &alerts_sql(&q),
                rusqlite::params![
                    q.status.map(AlertStatus::as_str),
                    q.device.map(DeviceId::as_str),
                    q.rule,
                    5,
                    q.after,
                    10
                ],
            )
        };
        let d = id("d");
        let cases = [
            (AlertQuery::default(), "alerts_newest"),
            (
                AlertQuery {
                    after: Some("a-x"),
                    status: Some(AlertStatus::Active),
                    ..Default::default()
                },
                "alerts_newest",
            ),
            (
                AlertQuery {
                    device: Some(&d),
                    after: Some("a-x"),
                    ..Default::default()
                },
                "alerts_by_device",
            ),
            (
                AlertQuery {
                    rule: Some("r"),
                    open: true,
                    ..Default::default()
                },
                "alerts_by_rule",
            ),
        ];
        for (q, index) in cases {
            let p = listing(q);
            assert!(p.contains(index), "{p}");
            assert!(!p.contains("TEMP B-TREE"), "{p}");
        }
        let open = plan(&open_alerts_sql(), rusqlite::params![10]);
        assert!(open.contains("alerts_open"), "{open}");
        assert!(!open.contains("TEMP B-TREE"), "{open}");
        let one = plan(
            "UPDATE alerts SET message = '' WHERE rule = ?1 AND device = ?2 AND status != 'cleared'",
            rusqlite::params!["r", "d"],
        );
        assert!(one.contains("alerts_open"), "{one}");
    }
}
