//! Ingest: telemetry from the gate to durable storage, the embedded stores, and the QuestDB
//! store.
//!
//! Start with [`pipeline`]: one thread drains the gate's hand-off channel, decodes each
//! message, commits a whole batch in one transaction (one fsync for many messages) and only
//! then completes the gate's handles, so a PUBACK always means "committed" (on disk with
//! `durability = "fsync"`, the default).
//!
//! - [`store`]: the [`TelemetryStore`] trait (append a batch, range query, latest values,
//!   dead letters), its embedded SQLite implementation, and the QuestDB one (a local spool
//!   drained to QuestDB over the line protocol, queries in QuestDB SQL);
//! - [`registry`]: the embedded SQLite implementation of `tellus_core::Registry`;
//! - [`sqlite`]: what the SQLite databases share (opening, pragmas, schema migrations).

pub mod pipeline;
pub mod registry;
pub mod sqlite;
pub mod store;

pub use pipeline::{Ingest, IngestConfig, IngestStats, IngestStatsSnapshot};
pub use registry::SqliteRegistry;
pub use store::{
    Agg, Batch, Bucket, DeadLetter, Durability, QuestDbConfig, QuestDbStore, Retention, SpoolStats,
    SqliteStore, StoreConfig, StoreError, TelemetryStore,
};
