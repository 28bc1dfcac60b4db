//! The live connections, one per device, and how the gate closes them from outside.
//!
//! A session registers here once its device is admitted. A second connection of the same
//! device takes over: the first is closed, as MQTT requires for a repeated client id, and
//! the new one inherits its message-rate bucket, so reconnecting buys a device no burst. The
//! registry watcher ([`super::watch_registry`]) closes sessions whose device was disabled or
//! deleted, or whose certificate was revoked, within one poll interval.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use tellus_core::DeviceId;
use tokio::sync::watch;

use super::rate::TokenBucket;

/// Why a session is closed when another connection of its device takes over.
pub const TAKEN_OVER: &str = "taken over by a new connection";

/// A device's message-rate bucket, shared by the sessions that follow one another.
pub type SharedBucket = std::sync::Arc<Mutex<TokenBucket>>;

/// Every live session, by device.
#[derive(Debug, Default)]
pub struct Sessions {
    live: Mutex<HashMap<DeviceId, Live>>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct Live {
    id: u64,
    serial: String,
    close: watch::Sender<Option<String>>,
    bucket: SharedBucket,
}

/// A session's membership; leaving the map when dropped.
#[derive(Debug)]
pub struct Membership<'s> {
    sessions: &'s Sessions,
    device: DeviceId,
    id: u64,
    closed: watch::Receiver<Option<String>>,
    /// The device's message-rate bucket: the previous session's on a takeover.
    pub bucket: SharedBucket,
}

impl Sessions {
    /// Registers a session of `device` using the certificate `serial`, closing the one it
    /// had (which returns `true` as the second value) and taking over its rate bucket, or
    /// starting with `new_bucket()` when there was none.
    pub fn open(
        &self,
        device: &DeviceId,
        serial: &str,
        new_bucket: impl FnOnce() -> TokenBucket,
    ) -> (Membership<'_>, bool) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = watch::channel(None);
        let mut live = self.lock();
        let bucket = match live.get(device) {
            Some(previous) => previous.bucket.clone(),
            None => SharedBucket::new(Mutex::new(new_bucket())),
        };
        let previous = live.insert(
            device.clone(),
            Live {
                id,
                serial: serial.to_owned(),
                close,
                bucket: bucket.clone(),
            },
        );
        drop(live);
        let took_over = previous.is_some_and(|p| {
            p.close.send_replace(Some(TAKEN_OVER.into()));
            true
        });
        let membership = Membership {
            sessions: self,
            device: device.clone(),
            id,
            closed,
            bucket,
        };
        (membership, took_over)
    }

    /// Closes the session of `device`, if any, saying why.
    pub fn close(&self, device: &DeviceId, reason: &str) -> bool {
        self.close_if(device, reason, |_| true)
    }

    /// Closes the session of `device` if it uses the certificate `serial`.
    pub fn close_serial(&self, device: &DeviceId, serial: &str, reason: &str) -> bool {
        self.close_if(device, reason, |live| live.serial == serial)
    }

    /// Closes the session of `device` unless it uses one of the certificates `serials`.
    pub fn close_unless_serial(&self, device: &DeviceId, serials: &[String], reason: &str) -> bool {
        self.close_if(device, reason, |live| !serials.contains(&live.serial))
    }

    /// Tells the session of `device` to close if `pred` holds; `true` if this closed it (a
    /// session already told to close is not closed twice).
    fn close_if(&self, device: &DeviceId, reason: &str, pred: impl Fn(&Live) -> bool) -> bool {
        match self.lock().get(device) {
            Some(live) if pred(live) => live.close.send_if_modified(|current| {
                let first = current.is_none();
                if first {
                    *current = Some(reason.to_owned());
                }
                first
            }),
            _ => false,
        }
    }

    /// Devices connected right now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_connected(&self, device: &DeviceId) -> bool {
        self.lock().contains_key(device)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Live>> {
        // A panic while holding this lock leaves the map consistent (every operation is a
        // single insert, remove or read), so a poisoned lock is still usable.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Membership<'_> {
    /// The session's number, unique within this run of Tellus.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The reason the gate wants this session closed, if it does already.
    pub fn closed_now(&self) -> Option<String> {
        self.closed.borrow().clone()
    }

    /// Resolves with the reason once the gate wants this session closed.
    pub async fn closed(&mut self) -> String {
        let reason = match self.closed.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            Err(_) => None,
        };
        match reason {
            Some(reason) => reason,
            // The sender is dropped only once a newer session replaced this one in the map,
            // after telling it so; "never" is the right answer if that ever changes.
            None => std::future::pending().await,
        }
    }
}

impl Drop for Membership<'_> {
    fn drop(&mut self) {
        let mut live = self.sessions.lock();
        if live.get(&self.device).is_some_and(|l| l.id == self.id) {
            live.remove(&self.device);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    async fn reason(m: &mut Membership<'_>) -> Option<String> {
        tokio::time::timeout(Duration::from_millis(50), m.closed())
            .await
            .ok()
    }

    #[tokio::test]
    async fn a_second_connection_takes_over_and_closes_reach_the_right_session() {
        let s = Sessions::default();
        let bucket = || TokenBucket::new(10, 1);
        let (mut first, took_over) = s.open(&id("a"), "01", bucket);
        assert!(!took_over);
        // The first session spends its burst; the one that takes over inherits the debt.
        assert_eq!(first.bucket.lock().unwrap().take(), None);
        let (mut second, took_over) = s.open(&id("a"), "02", bucket);
        assert!(took_over);
        assert!(second.bucket.lock().unwrap().take().is_some());
        assert_eq!(
            reason(&mut first).await.as_deref(),
            Some("taken over by a new connection")
        );
        // The first leaving does not remove the second.
        drop(first);
        assert!(s.is_connected(&id("a")));
        // A revoked serial closes only the session that uses it.
        assert!(!s.close_serial(&id("a"), "01", "revoked"));
        assert_eq!(reason(&mut second).await, None);
        assert!(s.close_serial(&id("a"), "02", "revoked"));
        assert!(!s.close(&id("a"), "deleted"), "closed once");
        assert_eq!(reason(&mut second).await.as_deref(), Some("revoked"));
        drop(second);
        assert!(s.is_empty());

        // A deletion spares a session on a certificate the device holds now (it was
        // registered again), and closes one on any other.
        let (mut third, _) = s.open(&id("a"), "03", bucket);
        let valid = ["03".to_owned()];
        assert!(!s.close_unless_serial(&id("a"), &valid, "device deleted"));
        assert_eq!(reason(&mut third).await, None);
        assert!(s.close_unless_serial(&id("a"), &[], "device deleted"));
        assert_eq!(reason(&mut third).await.as_deref(), Some("device deleted"));
        assert!(!s.close(&id("a"), "disabled"));
    }
}
