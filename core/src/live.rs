//! The live feed: what happens to devices as it happens (committed telemetry, connections,
//! commands, state, alerts), for the API's server-sent event stream.
//!
//! A broadcast channel of [`LIVE_QUEUE`] events: senders never wait, and a listener that
//! falls further behind misses the oldest events and is told how many (so a dashboard knows
//! to reload), rather than holding memory for it.

use serde::Serialize;
use tokio::sync::broadcast;

use crate::{Command, DeviceId, Sample, TimestampMs, Value};

/// Events a listener may fall behind by before it misses the oldest.
pub const LIVE_QUEUE: usize = 8_192;

/// One thing that happened to a device.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LiveEvent {
    /// Points of one device, committed (acknowledged) in one batch.
    Telemetry {
        device: DeviceId,
        points: Vec<LivePoint>,
    },
    /// A device's connection opened or ended.
    Presence {
        device: DeviceId,
        online: bool,
        #[cfg_attr(feature = "openapi", schema(value_type = i64))]
        at_ms: TimestampMs,
        /// Why it ended (offline only).
        reason: Option<String>,
    },
    /// A command's status changed.
    Command {
        device: DeviceId,
        command: Box<Command>,
    },
    /// A device's desired or reported state changed; the versions after the change.
    State {
        device: DeviceId,
        desired_version: u64,
        reported_version: u64,
    },
    /// An alert was raised, acknowledged or cleared; the alert as it is after.
    Alert {
        device: DeviceId,
        alert: Box<crate::Alert>,
    },
}

impl LiveEvent {
    pub fn device(&self) -> &DeviceId {
        match self {
            LiveEvent::Telemetry { device, .. }
            | LiveEvent::Presence { device, .. }
            | LiveEvent::Command { device, .. }
            | LiveEvent::State { device, .. }
            | LiveEvent::Alert { device, .. } => device,
        }
    }

    /// The event's `type`, as it is named on the stream.
    pub fn kind(&self) -> &'static str {
        match self {
            LiveEvent::Telemetry { .. } => "telemetry",
            LiveEvent::Presence { .. } => "presence",
            LiveEvent::Command { .. } => "command",
            LiveEvent::State { .. } => "state",
            LiveEvent::Alert { .. } => "alert",
        }
    }
}

/// One point of a [`LiveEvent::Telemetry`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LivePoint {
    pub metric: String,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub ts: TimestampMs,
    #[cfg_attr(feature = "openapi", schema(value_type = crate::telemetry::MetricValue))]
    pub value: Value,
}

impl From<&Sample> for LivePoint {
    fn from(s: &Sample) -> LivePoint {
        LivePoint {
            metric: s.metric.clone(),
            ts: s.ts_ms,
            value: s.value.clone(),
        }
    }
}

/// The feed. Cheap to clone; every clone sends into the same channel.
#[derive(Debug, Clone)]
pub struct Live {
    tx: broadcast::Sender<LiveEvent>,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            tx: broadcast::channel(LIVE_QUEUE).0,
        }
    }
}

impl Live {
    /// Whether anyone listens: senders skip building events nobody reads.
    pub fn listened(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    pub fn send(&self, event: LiveEvent) {
        // No listener is not an error: the event is simply not kept.
        let _ = self.tx.send(event);
    }

    /// Every event from now on.
    pub fn listen(&self) -> broadcast::Receiver<LiveEvent> {
        self.tx.subscribe()
    }
}
