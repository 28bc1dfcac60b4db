//! The audit trail of edge decisions, written to the registry off the connection path.
//!
//! Connection tasks hand entries to a bounded channel and never wait: when the channel is
//! full (the registry is slower than a connection storm), the entry is shed and counted in
//! `audit_dropped` (policy: shed, counted; the edge is never slowed by its own bookkeeping).
//! One thread writes whatever is queued in one transaction.

use std::{sync::Arc, thread};

use tellus_core::{AuditEntry, Registry};
use tokio::sync::mpsc;
use tracing::warn;

use super::{bump, GateStats};

/// Most entries written in one transaction.
const BATCH: usize = 1_000;

/// Where connection tasks record their decisions. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<AuditEntry>,
    stats: Arc<GateStats>,
}

/// The writer thread; [`AuditWriter::finished`] waits until it has written everything it was
/// given, which is once every [`AuditLog`] is dropped.
pub struct AuditWriter {
    thread: thread::JoinHandle<()>,
}

impl AuditLog {
    /// Starts the writer with room for `capacity` queued entries; shed entries are counted
    /// in `stats.audit_dropped`.
    pub fn spawn(
        registry: Arc<dyn Registry>,
        capacity: usize,
        stats: Arc<GateStats>,
    ) -> std::io::Result<(AuditLog, AuditWriter)> {
        let (tx, mut rx) = mpsc::channel::<AuditEntry>(capacity.max(1));
        let thread = thread::Builder::new().name("audit".into()).spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            while let Some(first) = rx.blocking_recv() {
                batch.push(first);
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(e) => batch.push(e),
                        Err(_) => break,
                    }
                }
                if let Err(e) = registry.record_audit(&batch) {
                    warn!(error = %e, entries = batch.len(), "audit entries not recorded");
                }
                batch.clear();
            }
        })?;
        Ok((AuditLog { tx, stats }, AuditWriter { thread }))
    }

    /// Queues an entry, or sheds and counts it when the queue is full.
    pub fn record(&self, entry: AuditEntry) {
        if self.tx.try_send(entry).is_err() {
            bump(&self.stats.audit_dropped);
        }
    }
}

impl AuditWriter {
    pub async fn finished(self) {
        let thread = self.thread;
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(())) => {}
            _ => warn!("audit writer panicked"),
        }
    }
}
