//! Commands to devices: what one is, and the states it moves through.
//!
//! ```text
//! queued ──► sent ──► delivered ──► succeeded | failed
//!   │          │          │
//!   └──────────┴──────────┴──► expired (its timeout passed)
//!   └──────────┴──► cancelled (by an operator, before delivery)
//! ```
//!
//! `sent`: Tellus published it on `devices/{id}/commands/{command_id}`; `delivered`: the
//! device acknowledged that publish (PUBACK, so only over a QoS 1 subscription); the result
//! is what the device publishes on `…/commands/{command_id}/result`. A command that was sent
//! but not delivered is sent again when the device subscribes again (after a reconnect, or
//! a restart of Tellus), until it expires.
//!
//! A [`Job`] sends one command (the same name, params and timeout) to many devices, at a
//! rate and with at most so many of its commands not ended at once; each device's command
//! is an ordinary [`Command`] whose `job` names it.

use serde::{Deserialize, Serialize};

use crate::{DeviceId, TimestampMs};

/// Ordered as the states are listed, so that counts by status (a `BTreeMap`) read in the
/// order commands move through them; serialized as the lower-case name, also as a map key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum CommandStatus {
    Queued,
    Sent,
    Delivered,
    Succeeded,
    Failed,
    Expired,
    Cancelled,
}

impl CommandStatus {
    pub const ALL: [CommandStatus; 7] = [
        CommandStatus::Queued,
        CommandStatus::Sent,
        CommandStatus::Delivered,
        CommandStatus::Succeeded,
        CommandStatus::Failed,
        CommandStatus::Expired,
        CommandStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Queued => "queued",
            CommandStatus::Sent => "sent",
            CommandStatus::Delivered => "delivered",
            CommandStatus::Succeeded => "succeeded",
            CommandStatus::Failed => "failed",
            CommandStatus::Expired => "expired",
            CommandStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<CommandStatus> {
        CommandStatus::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Whether the command has ended: nothing moves it any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CommandStatus::Succeeded
                | CommandStatus::Failed
                | CommandStatus::Expired
                | CommandStatus::Cancelled
        )
    }

    /// The states a command may be in to move to `self`.
    pub fn from_states(self) -> &'static [CommandStatus] {
        use CommandStatus::*;
        match self {
            Queued => &[],
            // Sent again (a reconnect) keeps it `sent`.
            Sent => &[Queued, Sent],
            Delivered => &[Sent],
            // A result may overtake the PUBACK that makes a command delivered.
            Succeeded | Failed => &[Sent, Delivered],
            Expired => &[Queued, Sent, Delivered],
            Cancelled => &[Queued, Sent],
        }
    }
}

/// A command to one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Command {
    /// `c-` and 20 hex digits: a topic level of its own.
    pub id: String,
    pub device: DeviceId,
    pub name: String,
    /// Whatever JSON the operator gave; the device interprets it.
    pub params: serde_json::Value,
    pub status: CommandStatus,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub created_at_ms: TimestampMs,
    /// When it becomes `expired` unless it has ended before.
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub expires_at_ms: TimestampMs,
    /// When the status last changed.
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub updated_at_ms: TimestampMs,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<i64>))]
    pub sent_at_ms: Option<TimestampMs>,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<i64>))]
    pub delivered_at_ms: Option<TimestampMs>,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<i64>))]
    pub finished_at_ms: Option<TimestampMs>,
    /// The device's `output` (with a result), or why it failed or ended.
    pub output: Option<serde_json::Value>,
    /// The fleet job it belongs to, if any.
    pub job: Option<String>,
}

impl Command {
    /// What the device receives on `devices/{id}/commands/{command_id}`.
    pub fn message(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "params": self.params,
            "expires_at_ms": self.expires_at_ms,
        })
    }
}

/// A new command id: `c-` and 20 random hex digits.
pub fn new_command_id() -> String {
    let bytes: [u8; 10] = rand::random();
    format!("c-{}", hex::encode(bytes))
}

/// Where a fleet job is: sending (`running`), done, or stopped by an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Commands are still to be created, or some of them have not ended.
    Running,
    /// Every selected device was sent its command (or was deleted meanwhile) and every
    /// command ended.
    Completed,
    /// Stopped before that: no more commands are created.
    Aborted,
}

impl JobStatus {
    pub const ALL: [JobStatus; 3] = [JobStatus::Running, JobStatus::Completed, JobStatus::Aborted];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|j| j.as_str() == s)
    }

    /// Whether the job has ended: it creates no more commands.
    pub fn is_final(self) -> bool {
        self != JobStatus::Running
    }
}

/// A fleet job: one command sent to many devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Job {
    /// `j-` and 20 hex digits ([`new_job_id`]).
    pub id: String,
    /// The name, params and timeout of each device's command.
    pub name: String,
    pub params: serde_json::Value,
    pub timeout_ms: u64,
    /// Commands created per second, at most.
    pub rate: f64,
    /// The most commands of the job not ended at once.
    pub concurrency: u32,
    pub status: JobStatus,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub created_at_ms: TimestampMs,
    /// When it completed or was aborted.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<i64>))]
    pub finished_at_ms: Option<TimestampMs>,
    /// How many devices were selected.
    pub total: u64,
}

/// A new job id: `j-` and 20 random hex digits.
pub fn new_job_id() -> String {
    let bytes: [u8; 10] = rand::random();
    format!("j-{}", hex::encode(bytes))
}

/// What a device's result says: `{"ok": true|false, "output": …}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CommandResult {
    pub ok: bool,
    #[serde(default)]
    pub output: serde_json::Value,
}

impl CommandResult {
    /// The result in `payload`, or why it is not one.
    pub fn parse(payload: &[u8]) -> Result<CommandResult, String> {
        serde_json::from_slice(payload)
            .map_err(|e| format!("the result is not {{\"ok\": bool, \"output\": …}}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_and_only_move_forward() {
        for s in CommandStatus::ALL {
            assert_eq!(CommandStatus::parse(s.as_str()), Some(s));
            for from in s.from_states() {
                assert!(!from.is_final(), "{s:?} from {from:?}");
            }
        }
        assert!(CommandStatus::Cancelled
            .from_states()
            .iter()
            .all(|s| *s != CommandStatus::Delivered));
    }

    #[test]
    fn ids_are_distinct_topic_levels() {
        let a = new_command_id();
        let b = new_command_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 22);
        assert!(a[2..].bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn job_statuses_round_trip_and_job_ids_are_distinct() {
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
            assert_eq!(s.is_final(), s != JobStatus::Running);
        }
        assert_eq!(JobStatus::parse("paused"), None);
        let a = new_job_id();
        assert_ne!(a, new_job_id());
        assert_eq!(a.len(), 22);
        assert!(a.starts_with("j-"));
        assert!(a[2..].bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn counts_by_status_serialize_as_an_object_in_state_order() {
        let counts = std::collections::BTreeMap::from([
            (CommandStatus::Succeeded, 2u64),
            (CommandStatus::Queued, 3),
            (CommandStatus::Sent, 1),
        ]);
        assert_eq!(
            serde_json::to_string(&counts).unwrap(),
            r#"{"queued":3,"sent":1,"succeeded":2}"#
        );
        let back: std::collections::BTreeMap<CommandStatus, u64> =
            serde_json::from_str(r#"{"queued":3,"sent":1,"succeeded":2}"#).unwrap();
        assert_eq!(back, counts);
    }

    #[test]
    fn results_are_parsed_or_refused_with_a_reason() {
        assert_eq!(
            CommandResult::parse(br#"{"ok": true, "output": {"uptime": 3}}"#).unwrap(),
            CommandResult {
                ok: true,
                output: serde_json::json!({"uptime": 3})
            }
        );
        assert!(!CommandResult::parse(br#"{"ok": false}"#).unwrap().ok);
        assert!(CommandResult::parse(b"done").is_err());
    }
}
