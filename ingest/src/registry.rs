//! The embedded device registry: `registry.db` (SQLite) in the data directory.

use std::{path::Path, sync::Mutex};

use rusqlite::{params, Connection, OptionalExtension};
use tellus_core::{DeviceId, DeviceRecord, Registry, RegistryError};

use crate::sqlite;

const MIGRATIONS: &[&str] = &["CREATE TABLE devices (
        id              TEXT PRIMARY KEY,
        created_at      INTEGER NOT NULL,
        cert_serial     TEXT NOT NULL,
        cert_not_after  INTEGER NOT NULL
    );"];

/// The registry in a SQLite file. One connection behind a mutex: registry calls are short
/// indexed lookups, and writes are rare.
pub struct SqliteRegistry {
    conn: Mutex<Connection>,
}

fn backend(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Backend(e.to_string())
}

impl SqliteRegistry {
    pub fn open(path: &Path) -> Result<Self, rusqlite::Error> {
        Ok(SqliteRegistry {
            conn: Mutex::new(sqlite::open(path, "FULL", MIGRATIONS)?),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, RegistryError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| backend("registry lock poisoned"))?;
        f(&conn).map_err(backend)
    }
}

fn record(row: &rusqlite::Row<'_>) -> Result<DeviceRecord, rusqlite::Error> {
    let id: String = row.get(0)?;
    Ok(DeviceRecord {
        id: DeviceId::parse(&id).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
        })?,
        created_at_ms: row.get(1)?,
        cert_serial: row.get(2)?,
        cert_not_after_ms: row.get(3)?,
    })
}

const COLUMNS: &str = "id, created_at, cert_serial, cert_not_after";

impl Registry for SqliteRegistry {
    fn insert_device(&self, d: &DeviceRecord) -> Result<(), RegistryError> {
        let inserted = self.with(|c| {
            c.execute(
                "INSERT INTO devices (id, created_at, cert_serial, cert_not_after)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (id) DO NOTHING",
                params![
                    d.id.as_str(),
                    d.created_at_ms,
                    d.cert_serial,
                    d.cert_not_after_ms
                ],
            )
        })?;
        if inserted == 0 {
            return Err(RegistryError::AlreadyExists(d.id.clone()));
        }
        Ok(())
    }

    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, RegistryError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM devices WHERE id = ?1"),
                [id.as_str()],
                record,
            )
            .optional()
        })
    }

    fn devices(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM devices WHERE id > ?1 ORDER BY id LIMIT ?2"
            ))?;
            let after = after.map(DeviceId::as_str).unwrap_or("");
            let rows = stmt.query_map(params![after, limit as i64], record)?;
            rows.collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: &str) -> DeviceRecord {
        DeviceRecord {
            id: DeviceId::parse(id).unwrap(),
            created_at_ms: 1,
            cert_serial: "0a".into(),
            cert_not_after_ms: 2,
        }
    }

    #[test]
    fn insert_get_list_and_refuse_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.db");
        let reg = SqliteRegistry::open(&path).unwrap();
        for id in ["b", "a", "c"] {
            reg.insert_device(&dev(id)).unwrap();
        }
        assert!(matches!(
            reg.insert_device(&dev("a")),
            Err(RegistryError::AlreadyExists(_))
        ));
        assert_eq!(reg.device(&dev("a").id).unwrap(), Some(dev("a")));
        assert_eq!(reg.device(&DeviceId::parse("z").unwrap()).unwrap(), None);
        let ids =
            |v: Vec<DeviceRecord>| v.into_iter().map(|d| d.id.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(reg.devices(None, 10).unwrap()), ["a", "b", "c"]);
        assert_eq!(ids(reg.devices(Some(&dev("a").id), 1).unwrap()), ["b"]);
        drop(reg);
        // Reopening keeps the data and does not re-run migrations.
        let reg = SqliteRegistry::open(&path).unwrap();
        assert_eq!(reg.devices(None, 10).unwrap().len(), 3);
    }
}
