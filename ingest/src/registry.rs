//! The embedded device registry: `registry.db` (SQLite) in the data directory.
//!
//! - `devices`: id, status, tags (a JSON object, which listings filter with `json_each`);
//! - `certificates`: every certificate issued to a device, by issuer (the fleet CA or an
//!   external one) and serial, kept (revoked) after the device is deleted so that the CRL
//!   still lists it;
//! - `cas`: the external CAs the gate trusts beside the fleet CA;
//! - `changes`: a sequence of revocations, disables, deletions and trust changes, written in the same
//!   transaction as the change itself, which the gate polls to close affected connections;
//! - `audit`: the edge's decisions about connections, the newest [`AUDIT_KEEP`] kept.

use std::{path::Path, sync::Mutex};

use rusqlite::{params, Connection, OptionalExtension, Row};
use tellus_core::{
    AuditDecision, AuditEntry, CaRecord, CertificateRecord, Change, DeviceId, DeviceQuery,
    DeviceRecord, DeviceStatus, NewDevice, Registry, RegistryError, TimestampMs, FLEET_ISSUER,
};

use crate::sqlite;

const MIGRATIONS: &[&str] = &["CREATE TABLE devices (
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
    CREATE INDEX audit_by_device ON audit (device, id);"];

/// Audit entries kept; older ones are deleted as new ones arrive.
pub const AUDIT_KEEP: i64 = 1_000_000;
/// Changes kept; the gate reads them within a second, so this is only a safety margin.
const CHANGES_KEEP: i64 = 100_000;

/// The registry in a SQLite file. One connection behind a mutex for devices, certificates,
/// CAs and changes (short indexed lookups; writes are operator actions), and one for the
/// audit trail, whose batched writes must never queue the gate's lookups behind them.
pub struct SqliteRegistry {
    conn: Mutex<Connection>,
    audit: Mutex<Connection>,
}

fn backend(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Backend(e.to_string())
}

impl SqliteRegistry {
    pub fn open(path: &Path) -> Result<Self, rusqlite::Error> {
        Ok(SqliteRegistry {
            conn: Mutex::new(sqlite::open(path, "FULL", MIGRATIONS)?),
            // Losing the last audit entries in a power cut is acceptable; an fsync per batch
            // is not worth it.
            audit: Mutex::new(sqlite::open(path, "NORMAL", MIGRATIONS)?),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, RegistryError> {
        Self::on(&self.conn, f)
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
            tx.execute("DELETE FROM devices WHERE id = ?1", [id.as_str()])?;
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
        Self::on(&self.audit, |c| {
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

    fn audit(
        &self,
        device: Option<&DeviceId>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, RegistryError> {
        Self::on(&self.audit, |c| {
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
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

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
}
