//! How full a bounded queue is, read from outside it: [`QueueGauge`], for `GET /metrics`.
//!
//! A gauge holds only a weak handle on a channel's sending side, never a sender: ingest,
//! the audit writer and the rules engine stop once their last sender is gone, and a gauge
//! held by the HTTP API must not keep them running. A queue whose senders are all gone reads
//! as empty.

use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};

/// The depth of one bounded queue (in items, and for queues with a byte budget, in bytes)
/// and its capacity. Cheap to clone; reading it takes no lock.
#[derive(Clone)]
pub struct QueueGauge {
    items: Arc<dyn Fn() -> usize + Send + Sync>,
    capacity: usize,
    bytes: Option<Budget>,
}

/// A byte budget: a semaphore whose permits are the bytes not taken.
#[derive(Clone)]
struct Budget {
    permits: Arc<Semaphore>,
    max: usize,
}

impl std::fmt::Debug for QueueGauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueGauge")
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl Default for QueueGauge {
    /// A queue that is not there: always empty, capacity 0.
    fn default() -> Self {
        QueueGauge {
            items: Arc::new(|| 0),
            capacity: 0,
            bytes: None,
        }
    }
}

impl QueueGauge {
    /// The gauge of the channel `tx` sends on.
    pub fn of<T: Send + 'static>(tx: &mpsc::Sender<T>) -> QueueGauge {
        let weak = tx.downgrade();
        QueueGauge {
            items: Arc::new(move || {
                // Held only for this reading: if the last real sender goes meanwhile, this
                // one's drop closes the channel instead.
                weak.upgrade()
                    .map_or(0, |tx| tx.max_capacity().saturating_sub(tx.capacity()))
            }),
            capacity: tx.max_capacity(),
            bytes: None,
        }
    }

    /// With a byte budget of `max` bytes, whose free bytes are `permits`' permits.
    pub fn with_bytes(mut self, permits: Arc<Semaphore>, max: usize) -> QueueGauge {
        self.bytes = Some(Budget { permits, max });
        self
    }

    /// Items waiting now.
    pub fn len(&self) -> usize {
        (self.items)()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Most items that may wait.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of the budget taken now and the whole budget, for a queue that has one.
    pub fn bytes(&self) -> Option<(usize, usize)> {
        self.bytes.as_ref().map(|b| {
            let free = b.permits.available_permits().min(b.max);
            (b.max - free, b.max)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_depth_without_keeping_the_channel_open() {
        let (tx, mut rx) = mpsc::channel::<u8>(4);
        let budget = Arc::new(Semaphore::new(100));
        let gauge = QueueGauge::of(&tx).with_bytes(budget.clone(), 100);
        assert_eq!((gauge.len(), gauge.capacity()), (0, 4));
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        budget.try_acquire_many(30).unwrap().forget();
        assert_eq!(gauge.len(), 2);
        assert_eq!(gauge.bytes(), Some((30, 100)));
        drop(tx);
        // The gauge held no sender: the receiver sees the end after the queued items.
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(rx.try_recv(), Ok(2));
        assert_eq!(
            rx.try_recv(),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)
        );
        assert_eq!(gauge.len(), 0);
        assert_eq!(QueueGauge::default().bytes(), None);
    }
}
