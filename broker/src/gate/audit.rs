//! The audit trail of edge decisions, written to the registry off the connection path.
//!
//! Connection tasks hand entries to a bounded channel and never wait: when the channel is
//! full (the registry is slower than a connection storm), the entry is shed and counted in
//! `audit_dropped` (policy: shed, counted; the edge is never slowed by its own bookkeeping).
//! One thread writes whatever is queued, in transactions of up to 1,000 entries.
//!
//! Input cannot make the trail large or wash it out: a reason is cut at [`MAX_REASON`]
//! bytes, and refusals of connections that never named a device (anyone can open a socket)
//! pass at most [`ANONYMOUS_PER_SECOND`] a second after a burst of 200; the rest are shed and counted like above,
//! while the gate's counters still count every one of them.

use std::{
    sync::{Arc, Mutex},
    thread,
};

use tellus_core::{AuditEntry, Registry};
use tokio::sync::mpsc;
use tracing::warn;

use super::{bump, rate::TokenBucket, GateStats};

/// Longest reason kept, in bytes.
pub const MAX_REASON: usize = 256;
/// Audit entries a second for connections that never named a device.
pub const ANONYMOUS_PER_SECOND: u32 = 20;
/// How many of those may come at once.
const ANONYMOUS_BURST: u32 = 200;

/// Most entries written in one transaction.
const BATCH: usize = 1_000;

/// Where connection tasks record their decisions. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<AuditEntry>,
    stats: Arc<GateStats>,
    anonymous: Arc<Mutex<TokenBucket>>,
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
        let anonymous = TokenBucket::new(ANONYMOUS_PER_SECOND, ANONYMOUS_BURST);
        let log = AuditLog {
            tx,
            stats,
            anonymous: Arc::new(Mutex::new(anonymous)),
        };
        Ok((log, AuditWriter { thread }))
    }

    /// How many entries wait for the writer, of at most the capacity given at start.
    pub fn gauge(&self) -> tellus_core::QueueGauge {
        tellus_core::QueueGauge::of(&self.tx)
    }

    /// Queues an entry, or sheds and counts it when the queue is full (or, for a connection
    /// that named no device, when those come faster than [`ANONYMOUS_PER_SECOND`]).
    pub fn record(&self, mut entry: AuditEntry) {
        if entry.device.is_none() {
            let over = match self.anonymous.lock() {
                Ok(mut bucket) => bucket.take().is_some(),
                Err(_) => false,
            };
            if over {
                bump(&self.stats.audit_dropped);
                return;
            }
        }
        if entry.reason.len() > MAX_REASON {
            entry.reason = clip(&entry.reason, MAX_REASON);
        }
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

/// `text` cut to at most `max` bytes at a character boundary, with "…" when cut.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_cuts_at_a_character_boundary() {
        assert_eq!(clip("short", 10), "short");
        let cut = clip(&"é".repeat(300), MAX_REASON);
        assert!(cut.len() <= MAX_REASON && cut.ends_with('…'), "{cut}");
    }
}
