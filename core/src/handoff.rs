//! The hand-off from the gate to ingest: a bounded channel of publishes with completion
//! handles.
//!
//! The gate calls [`IngestSender::submit`] for every telemetry publish. The channel is
//! bounded; when it is full `submit` waits, the gate stops reading that device's socket, and
//! TCP pushes back on the device (policy: block, never shed). For QoS 1 the gate gets a
//! [`Pending`] that resolves once ingest has committed the message to disk (or kept it in the
//! dead-letter table); only then does the gate write the PUBACK.

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

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
}

/// What became of a durable message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durable {
    /// Decoded and committed to the telemetry store.
    Stored { samples: usize },
    /// Not valid telemetry: committed, raw, to the dead-letter table with its reason.
    DeadLettered,
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
}

/// Ingest's end of the hand-off.
pub type IngestReceiver = mpsc::Receiver<IngestRequest>;

impl IngestSender {
    /// A hand-off holding at most `capacity` messages in flight between gate and ingest.
    pub fn channel(capacity: usize) -> (IngestSender, IngestReceiver) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (IngestSender { tx }, rx)
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
            })
            .await
            .map_err(|_| IngestError::Closed)?;
        Ok(pending)
    }

    /// Messages waiting in the channel right now.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}
