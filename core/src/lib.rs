//! The Tellus domain, shared by the server crates, the device SDK and the tests.
//!
//! Nothing in this crate opens a socket or a file. Start with:
//! - [`id`]: what a device id may look like ([`DeviceId`]);
//! - [`topic`]: the topic grammar of ARCHITECTURE.md and the per-device ACL the gate enforces;
//! - [`telemetry`]: the telemetry model ([`Value`], [`Sample`]) and the JSON payload decoder;
//! - [`handoff`]: the bounded channel through which the gate gives telemetry to ingest and
//!   learns when it is durable (so `broker` never depends on `ingest`);
//! - [`registry`]: the device registry as a trait, so that a shared database can replace the
//!   embedded one;
//! - [`rule`]: rules and alerts as data (what a rule watches, tests and does); the `rules`
//!   crate evaluates them;
//! - [`state`]: a device's desired and reported state ([`DeviceState`]), JSON Merge Patch and
//!   the delta a device has yet to act on;
//! - [`token`]: API tokens and their roles ([`Role`]: viewer, operator, admin);
//! - [`queue`]: [`QueueGauge`], how full a bounded queue is, read without holding it open.

pub mod command;
pub mod handoff;
pub mod id;
pub mod live;
pub mod queue;
pub mod registry;
pub mod rule;
pub mod serial;
pub mod state;
pub mod telemetry;
pub mod token;
pub mod topic;

pub use command::{Command, CommandResult, CommandStatus, Job, JobStatus};
pub use handoff::{Durable, IngestError, IngestRequest, IngestSender};
pub use id::{DeviceId, InvalidDeviceId};
pub use live::{Live, LiveEvent};
pub use queue::QueueGauge;
pub use registry::{
    AuditDecision, AuditEntry, CaRecord, CertificateRecord, Change, DeviceQuery, DeviceRecord,
    DeviceStatus, NewDevice, PresenceCounts, Registry, RegistryError, Session, SessionEvent,
    FLEET_ISSUER,
};
pub use rule::{
    Action, Alert, AlertQuery, AlertStatus, DeviceSelector, InputKind, Raise, Rule, RuleFeed,
    RuleInput, RuleInputs, RuleSpec, Severity, Trigger,
};
pub use state::DeviceState;
pub use telemetry::{DecodeError, Sample, Value};
pub use token::{ApiToken, Role};

/// Milliseconds since the Unix epoch, the one time unit of the data model.
pub type TimestampMs = i64;

/// The current wall-clock time in milliseconds since the Unix epoch.
///
/// Reading the clock is not I/O; it lives here so that every crate stamps time the same way.
pub fn now_ms() -> TimestampMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
