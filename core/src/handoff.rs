//! The hand-off from the gate to ingest: a bounded channel of publishes with completion
//! handles.
//!
//! The gate calls [`IngestSender::submit`] for every telemetry publish. The hand-off is
//! bounded twice: in messages (the channel's capacity) and in payload bytes (a budget each
//! message holds until ingest has committed it). When either is exhausted `submit` waits,
//! the gate stops reading that device's socket, and TCP pushes back on the device (policy:
//! block, never shed). For QoS 1 and 2 the gate gets a [`Pending`] that resolves once ingest
//! has committed the message to disk (or kept it in the dead-letter table); only then does
//! the gate acknowledge it.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::{topic::DeviceTopic, DeviceId, TimestampMs};

/// One telemetry publish on its way to the store.
#[derive(Debug)]
pub struct IngestRequest {
    pub device: DeviceId,
    /// [`DeviceTopic::Telemetry`] or [`DeviceTopic::TelemetryPb`].
    pub topic: DeviceTopic,
    pub payload: Bytes,
    /// When the gate read the publish; stamps values that carry no device time.
    pub received_at_ms: TimestampMs,
    /// Completed by ingest once the message is durable; `None` for QoS 0.
    pub done: Option<oneshot::Sender<Result<Durable, IngestError>>>,
    /// This message's share of the byte budget; ingest keeps it until the commit.
    pub budget: OwnedSemaphorePermit,
}

/// What became of a durable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durable {
    /// Decoded and committed to the telemetry store.
    Stored,
    /// Not valid telemetry: committed, raw, to the dead-letter table with this reason.
    DeadLettered(String),
}

/// Why ingest could not make a message durable; the gate must not acknowledge it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    #[error("ingest is shutting down")]
    Closed,
    #[error("the store failed to commit: {0}")]
    Storage(String),
}

/// Resolves once ingest has made a message durable.
pub type Pending = oneshot::Receiver<Result<Durable, IngestError>>;

/// The gate's end of the hand-off. Cheap to clone: one per connection.
#[derive(Debug, Clone)]
pub struct IngestSender {
    tx: mpsc::Sender<IngestRequest>,
    bytes: Arc<Semaphore>,
    max_bytes: u32,
}

/// Ingest's end of the hand-off.
pub type IngestReceiver = mpsc::Receiver<IngestRequest>;

impl IngestSender {
    /// A hand-off holding at most `capacity` messages and `max_bytes` of payload between
    /// the gate and the end of ingest's commit. A payload larger than `max_bytes` waits until
    /// it has the whole budget to itself.
    pub fn channel(capacity: usize, max_bytes: usize) -> (IngestSender, IngestReceiver) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let max_bytes = u32::try_from(max_bytes).unwrap_or(u32::MAX).max(1);
        let bytes = Arc::new(Semaphore::new(max_bytes as usize));
        (
            IngestSender {
                tx,
                bytes,
                max_bytes,
            },
            rx,
        )
    }

    /// How full the hand-off is: messages queued for ingest, and the bytes of payload taken
    /// from the budget (queued, and in the batch being committed).
    pub fn gauge(&self) -> crate::QueueGauge {
        crate::QueueGauge::of(&self.tx).with_bytes(self.bytes.clone(), self.max_bytes as usize)
    }

    /// Hands a publish to ingest, waiting while the channel is full. With `want_ack`, the
    /// returned [`Pending`] resolves once the message is durable.
    pub async fn submit(
        &self,
        device: DeviceId,
        topic: DeviceTopic,
        payload: Bytes,
        received_at_ms: TimestampMs,
        want_ack: bool,
    ) -> Result<Option<Pending>, IngestError> {
        let cost = u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .min(self.max_bytes);
        let budget = self
            .bytes
            .clone()
            .acquire_many_owned(cost)
            .await
            .map_err(|_| IngestError::Closed)?;
        let (done, pending) = if want_ack {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        self.tx
            .send(IngestRequest {
                device,
                topic,
                payload,
                received_at_ms,
                done,
                budget,
            })
            .await
            .map_err(|_| IngestError::Closed)?;
        Ok(pending)
    }
}
