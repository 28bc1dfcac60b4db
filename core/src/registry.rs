//! The device registry, as a trait: devices, their certificates, the changes the edge must
//! act on, and the audit trail of edge decisions.
//!
//! The embedded implementation (SQLite in the data directory) lives in `tellus-ingest`;
//! a shared database can stand in when several Tellus nodes serve one fleet. That is why
//! revocation travels through [`Registry::changes`]: whichever node (or CLI) writes it, every
//! gate reads it and closes the affected connections. Calls are synchronous and short
//! (indexed lookups); async callers run them on a blocking thread. Each device also has a
//! desired and a reported state ([`DeviceState`]), which patches change. Commands to devices
//! and the fleet jobs ([`crate::Job`]) that create them in bulk are kept here too, and so are
//! the rules ([`Rule`]) and the alerts they raise ([`Alert`]).

use std::collections::BTreeMap;

use crate::{
    rule::{Alert, AlertQuery, Raise, Rule, RuleSpec},
    ApiToken, Command, CommandStatus, DeviceId, DeviceState, Job, JobStatus, TimestampMs,
};

/// Whether a device may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    Enabled,
    /// Refused at the gate until enabled again; its certificates stay valid.
    Disabled,
}

impl DeviceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Enabled => "enabled",
            DeviceStatus::Disabled => "disabled",
        }
    }
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub created_at_ms: TimestampMs,
    pub status: DeviceStatus,
    pub tags: BTreeMap<String, String>,
    /// The device's current certificate: of those not revoked, the one valid longest.
    pub cert_serial: Option<String>,
    pub cert_not_after_ms: Option<TimestampMs>,
}

/// The issuer of the certificates Tellus's own fleet CA signs.
pub const FLEET_ISSUER: &str = "fleet";

/// A certificate the registry knows, issued to one device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertificateRecord {
    /// [`FLEET_ISSUER`], or the id of the external CA that signed it.
    pub issuer: String,
    /// Serial number in lower-case hex, unique per issuer.
    pub serial: String,
    pub device: DeviceId,
    pub issued_at_ms: TimestampMs,
    pub not_after_ms: TimestampMs,
    pub revoked_at_ms: Option<TimestampMs>,
}

/// A device to register, with its first certificate.
#[derive(Debug, Clone)]
pub struct NewDevice {
    pub id: DeviceId,
    pub created_at_ms: TimestampMs,
    pub tags: BTreeMap<String, String>,
    /// [`FLEET_ISSUER`] or an external CA's id.
    pub cert_issuer: String,
    pub cert_serial: String,
    pub cert_not_after_ms: TimestampMs,
}

/// An external certificate authority whose device certificates the gate trusts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CaRecord {
    /// The SHA-256 fingerprint of the CA certificate, in lower-case hex.
    pub id: String,
    pub pem: String,
    /// The CA's subject, as text, for people.
    pub subject: String,
    /// Whether a device presenting a valid certificate from this CA is registered on its
    /// first connection (just-in-time provisioning).
    pub auto_register: bool,
    /// Tags given to the devices registered that way.
    pub tags: BTreeMap<String, String>,
    pub created_at_ms: TimestampMs,
}

/// Which devices a listing returns.
#[derive(Debug, Clone, Default)]
pub struct DeviceQuery<'a> {
    /// Devices with an id after this one (paging).
    pub after: Option<&'a DeviceId>,
    pub limit: usize,
    /// Only devices whose current certificate ends before this time.
    pub expiring_before: Option<TimestampMs>,
    /// Only devices carrying every one of these tags, as (key, value): a key named twice
    /// with different values matches no device.
    pub tags: &'a [(String, String)],
}

/// Something the gate must act on: a live connection may no longer be allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Revoked {
        device: DeviceId,
        serial: String,
    },
    Disabled {
        device: DeviceId,
    },
    Deleted {
        device: DeviceId,
    },
    /// The set of trusted external CAs changed.
    TrustChanged,
    /// A change this version does not understand (written by a newer one); nothing to do.
    Unknown,
}

/// One decision of the edge about a connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    /// Assigned by the registry; 0 before it is recorded.
    pub id: i64,
    pub at_ms: TimestampMs,
    pub peer: String,
    /// Unknown when the connection failed before a certificate named a device.
    pub device: Option<DeviceId>,
    pub serial: Option<String>,
    pub decision: AuditDecision,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum AuditDecision {
    /// The connection was accepted.
    Accepted,
    /// The connection was refused before it was accepted.
    Refused,
    /// An accepted connection ended.
    Closed,
}

impl AuditDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditDecision::Accepted => "accepted",
            AuditDecision::Refused => "refused",
            AuditDecision::Closed => "closed",
        }
    }
}

/// One connection of a device, from the gate's admission to its end.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Session {
    /// Assigned by the registry; 0 before it is recorded.
    pub id: i64,
    pub device: DeviceId,
    /// The gate's number for the connection, unique within one run of Tellus.
    pub session: u64,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub connected_at_ms: TimestampMs,
    /// The device's address, `ip:port`.
    pub peer: String,
    /// `3.1.1` or `5`.
    pub protocol: String,
    /// `None` while the connection lasts.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<i64>))]
    pub disconnected_at_ms: Option<TimestampMs>,
    /// Why it ended (the gate's words), when it has.
    pub reason: Option<String>,
}

/// What the gate reports of connections, recorded in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// A connection was admitted (`id` and the end are unset).
    Opened(Session),
    /// The connection `session` of `device` ended.
    Closed {
        device: DeviceId,
        session: u64,
        at_ms: TimestampMs,
        reason: String,
    },
}

/// How many devices are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PresenceCounts {
    /// Registered devices.
    pub devices: u64,
    /// Registered devices with a connection now.
    pub online: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("device {0} already exists")]
    AlreadyExists(DeviceId),
    #[error("certificate {0} is not one of this device's")]
    UnknownCertificate(String),
    #[error("CA {0} is registered already")]
    CaExists(String),
    /// The registry's state does not allow what was asked; the text says why.
    #[error("{0}")]
    Refused(String),
    /// A change expected another version of what it changes than the current one (which
    /// another writer made in between); nothing changed.
    #[error("the current version is {current}, not the one expected")]
    VersionConflict { current: u64 },
    #[error("registry backend failed: {0}")]
    Backend(String),
}

/// Where devices are known.
pub trait Registry: Send + Sync + 'static {
    /// Adds a device and its first certificate; [`RegistryError::AlreadyExists`] if the id
    /// is taken.
    fn insert_device(&self, device: &NewDevice) -> Result<DeviceRecord, RegistryError>;
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, RegistryError>;
    /// Devices in id order, as `query` says.
    fn devices(&self, query: &DeviceQuery<'_>) -> Result<Vec<DeviceRecord>, RegistryError>;
    /// Every certificate of a device, newest first.
    fn certificates(&self, id: &DeviceId) -> Result<Vec<CertificateRecord>, RegistryError>;
    fn certificate(
        &self,
        issuer: &str,
        serial: &str,
    ) -> Result<Option<CertificateRecord>, RegistryError>;
    /// Records another certificate of an existing device.
    fn add_certificate(&self, cert: &CertificateRecord) -> Result<(), RegistryError>;
    /// Records a certificate issued to rotate the device's certificate `presented` (issuer,
    /// serial), checking in the same transaction that the device is enabled, that
    /// `presented` is its own and not revoked, and that fewer than `max_valid` of its
    /// certificates are valid; [`RegistryError::Refused`] says which did not hold.
    fn add_rotated_certificate(
        &self,
        presented: (&str, &str),
        cert: &CertificateRecord,
        max_valid: usize,
    ) -> Result<(), RegistryError>;
    /// Enables or disables a device; `None` if there is no such device.
    fn set_status(
        &self,
        id: &DeviceId,
        status: DeviceStatus,
        at: TimestampMs,
    ) -> Result<Option<DeviceRecord>, RegistryError>;
    /// Revokes one certificate of the device, or all of them; returns the serials newly
    /// revoked, or `None` if there is no such device.
    fn revoke(
        &self,
        id: &DeviceId,
        serial: Option<&str>,
        at: TimestampMs,
    ) -> Result<Option<Vec<String>>, RegistryError>;
    /// Changes a device's tags: each key to its value, or removed where the value is `None`;
    /// the others stay. `None` if there is no such device.
    fn set_tags(
        &self,
        id: &DeviceId,
        changes: &BTreeMap<String, Option<String>>,
    ) -> Result<Option<DeviceRecord>, RegistryError>;
    /// Removes a device; its certificates stay on record, revoked. `false` if there was none.
    fn delete_device(&self, id: &DeviceId, at: TimestampMs) -> Result<bool, RegistryError>;
    /// Revoked certificates of the fleet CA that have not expired by `now`: what its CRL
    /// must list.
    fn revoked(&self, now: TimestampMs) -> Result<Vec<CertificateRecord>, RegistryError>;
    /// Changes recorded after sequence number `after`, oldest first, at most `limit`.
    fn changes(&self, after: i64, limit: usize) -> Result<Vec<(i64, Change)>, RegistryError>;
    /// The sequence number of the newest change (0 if none).
    fn last_change(&self) -> Result<i64, RegistryError>;
    fn record_audit(&self, entries: &[AuditEntry]) -> Result<(), RegistryError>;
    /// Trusts another CA; [`RegistryError::CaExists`] if it is trusted already.
    fn add_ca(&self, ca: &CaRecord) -> Result<(), RegistryError>;
    fn cas(&self) -> Result<Vec<CaRecord>, RegistryError>;
    /// Stops trusting a CA; `false` if it was not trusted.
    fn delete_ca(&self, id: &str, at: TimestampMs) -> Result<bool, RegistryError>;
    /// Records a new command (status `queued`).
    fn insert_command(&self, command: &Command) -> Result<(), RegistryError>;
    /// One command of a device; `None` if the device has no command with this id.
    fn command(&self, device: &DeviceId, id: &str) -> Result<Option<Command>, RegistryError>;
    /// Commands of a device, newest first, created before the one with id `before` (when
    /// given), at most `limit`.
    fn commands(
        &self,
        device: &DeviceId,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Command>, RegistryError>;
    /// Moves command `id` of `device` to `to` at `at`, if its status is one of
    /// `to.from_states()` and it has not expired by `at` (for any `to` but `expired`);
    /// sets the matching `…_at_ms` and, when given, `output`. Returns the command as it is
    /// now, changed or not; `None` if there is no such command.
    fn move_command(
        &self,
        device: &DeviceId,
        id: &str,
        to: CommandStatus,
        at: TimestampMs,
        output: Option<&serde_json::Value>,
    ) -> Result<Option<(Command, bool)>, RegistryError>;
    /// Commands of `device` waiting to be sent (`queued`, or `sent` and not delivered) that
    /// have not expired by `now`, oldest first: those created after the command `after`
    /// (when given), at most `limit`.
    fn commands_to_send(
        &self,
        device: &DeviceId,
        now: TimestampMs,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Command>, RegistryError>;
    /// Moves every command not ended whose `expires_at_ms` is at or before `now` to
    /// `expired`, at most `limit`; returns them as they are now.
    fn expire_commands(
        &self,
        now: TimestampMs,
        limit: usize,
    ) -> Result<Vec<Command>, RegistryError>;
    /// Records a new fleet job and the devices it selected, in the order given (the order
    /// its commands are created in), in one transaction: all of it or nothing.
    /// [`RegistryError::Refused`] if a job with its id exists already. The devices need not
    /// exist; those that do not when their turn comes are skipped.
    fn insert_job(&self, job: &Job, devices: &[DeviceId]) -> Result<(), RegistryError>;
    /// One job; `None` if there is no such job.
    fn job(&self, id: &str) -> Result<Option<Job>, RegistryError>;
    /// Jobs, newest first (the order they were recorded in), with status `status` when
    /// given, recorded before the job with id `before` (when given; none if there is no such
    /// job), at most `limit`.
    fn jobs(
        &self,
        status: Option<JobStatus>,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Job>, RegistryError>;
    /// The job's devices that have no command of this job yet, in the order the job
    /// recorded them, at most `limit`; devices deleted since are left out. Empty if there is
    /// no such job.
    fn job_devices_without_command(
        &self,
        job: &str,
        limit: usize,
    ) -> Result<Vec<DeviceId>, RegistryError>;
    /// How many of the job's commands are in each status; statuses no command is in are
    /// absent.
    fn job_counts(&self, job: &str) -> Result<BTreeMap<CommandStatus, u64>, RegistryError>;
    /// How many of the job's commands have not ended (`queued`, `sent` or `delivered`).
    fn job_open_commands(&self, job: &str) -> Result<u64, RegistryError>;
    /// The job's commands, oldest first (the order they were created in), with status
    /// `status` when given, created after the command with id `after` (when given; none if
    /// it is not one of the job's commands), at most `limit`.
    fn job_commands(
        &self,
        job: &str,
        status: Option<CommandStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Command>, RegistryError>;
    /// Moves a `running` job to `status` (`completed` or `aborted`) and sets its
    /// `finished_at_ms` to `at`. A job not running, or a `status` of `running`, leaves it
    /// unchanged. Returns the job as it is now; `None` if there is no such job.
    fn finish_job(
        &self,
        job: &str,
        status: JobStatus,
        at: TimestampMs,
    ) -> Result<Option<Job>, RegistryError>;
    /// Records connections opening and ending, in order, in one transaction. A `Closed`
    /// without its open connection on record is ignored.
    fn record_sessions(&self, events: &[SessionEvent]) -> Result<(), RegistryError>;
    /// Ends every connection still open on record (at a start, those of the run before),
    /// at `at` with `reason`; returns how many.
    fn close_open_sessions(&self, at: TimestampMs, reason: &str) -> Result<usize, RegistryError>;
    /// A device's connections, newest first, with an id below `before`, at most `limit`.
    fn sessions(
        &self,
        device: &DeviceId,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Session>, RegistryError>;
    /// How many registered devices there are, and how many of them are connected.
    fn presence_counts(&self) -> Result<PresenceCounts, RegistryError>;
    /// Audit entries, newest first, for one device or all, with an id below `before`.
    fn audit(
        &self,
        device: Option<&DeviceId>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, RegistryError>;
    /// The desired and reported state of a device: [`DeviceState::empty`] if it has none
    /// yet, `None` if there is no such device. Deleting a device deletes its state.
    fn device_state(&self, device: &DeviceId) -> Result<Option<DeviceState>, RegistryError>;
    /// Applies `patch` to the device's desired state as a JSON Merge Patch
    /// ([`crate::state::merge`]) in one write transaction, adds 1 to `desired_version`,
    /// sets `desired_at_ms` to `at`, and returns the state as it is now; `None` if there is
    /// no such device. [`RegistryError::Refused`], with nothing changed, if `patch` fails
    /// [`crate::state::check_patch`], if `expected_version` is given and is not the current
    /// desired version ("desired state is at version N, not M"), or if the patched state
    /// would fail [`crate::state::check_state`].
    fn patch_desired(
        &self,
        device: &DeviceId,
        patch: &serde_json::Value,
        expected_version: Option<u64>,
        at: TimestampMs,
    ) -> Result<Option<DeviceState>, RegistryError>;
    /// As [`Registry::patch_desired`] without a version to expect, on the reported state
    /// (`reported`, `reported_version`, `reported_at_ms`).
    fn patch_reported(
        &self,
        device: &DeviceId,
        patch: &serde_json::Value,
        at: TimestampMs,
    ) -> Result<Option<DeviceState>, RegistryError>;
    /// Records a new rule, with the id, times and version (which must be 1) it comes with.
    /// [`RegistryError::Refused`] if a rule with its id exists already.
    fn insert_rule(&self, rule: &Rule) -> Result<(), RegistryError>;
    /// One rule; `None` if there is no such rule.
    fn rule(&self, id: &str) -> Result<Option<Rule>, RegistryError>;
    /// Rules in id order, with an id after `after` (when given), at most `limit`.
    fn rules(&self, after: Option<&str>, limit: usize) -> Result<Vec<Rule>, RegistryError>;
    /// Every enabled rule, in id order: what the engine loads (there are at most a few
    /// thousand).
    fn enabled_rules(&self) -> Result<Vec<Rule>, RegistryError>;
    /// Replaces the rule's spec and/or whether it is enabled (those given), adds 1 to its
    /// version and sets `updated_at_ms` to `at`; with neither given it is left unchanged.
    /// Returns the rule as it is now; `None` if there is no such rule.
    /// [`RegistryError::VersionConflict`], with nothing changed, if `expected_version` is
    /// given and is not the rule's version. Disabling a rule leaves its alerts open: the
    /// caller clears them ([`Registry::clear_rule_alerts`], reason `rule_disabled`).
    fn update_rule(
        &self,
        id: &str,
        spec: Option<&RuleSpec>,
        enabled: Option<bool>,
        expected_version: Option<u64>,
        at: TimestampMs,
    ) -> Result<Option<Rule>, RegistryError>;
    /// Deletes a rule and clears its open alerts at `at` (reason `rule_deleted`), in one
    /// transaction; returns the alerts it cleared (newest first), or `None` if there is no
    /// such rule.
    fn delete_rule(&self, id: &str, at: TimestampMs) -> Result<Option<Vec<Alert>>, RegistryError>;
    /// A number that grows with every rule inserted, updated or deleted (by any writer of
    /// the registry): the engine reloads its rules when it moves.
    fn rules_generation(&self) -> Result<i64, RegistryError>;
    /// Raises the alert of `raise.rule` for `raise.device`. If one is open (active or
    /// acknowledged), only its `message` and `values` are replaced, and it is returned with
    /// `false`; otherwise a new active alert (a new id, raised at `at`) is recorded and
    /// returned with `true`. [`RegistryError::Refused`] if there is no such rule, the rule is
    /// disabled, the rule is no longer at `raise.version` (when given: the version whose
    /// firing raises it), or there is no such device: nothing would ever clear that alert.
    fn raise_alert(
        &self,
        raise: &Raise<'_>,
        at: TimestampMs,
    ) -> Result<(Alert, bool), RegistryError>;
    /// Clears the open alert of `rule` for `device` at `at` with `reason`, and returns it as
    /// it is now; `None` if none is open.
    fn clear_alert(
        &self,
        rule: &str,
        device: &DeviceId,
        reason: &str,
        at: TimestampMs,
    ) -> Result<Option<Alert>, RegistryError>;
    /// Clears every open alert of a rule (when it is disabled, say) at `at` with `reason`;
    /// returns them as they are now, newest first.
    fn clear_rule_alerts(
        &self,
        rule: &str,
        reason: &str,
        at: TimestampMs,
    ) -> Result<Vec<Alert>, RegistryError>;
    /// Acknowledges an active alert at `at`; an acknowledged one stays as it is. Returns the
    /// alert as it is now; `None` if there is no such alert. [`RegistryError::Refused`] if
    /// it is cleared.
    fn acknowledge_alert(&self, id: &str, at: TimestampMs) -> Result<Option<Alert>, RegistryError>;
    /// One alert; `None` if there is no such alert.
    fn alert(&self, id: &str) -> Result<Option<Alert>, RegistryError>;
    /// Alerts, newest first (by `raised_at_ms`, then id, both descending), as `query` says:
    /// those after the alert `query.after` in that order (when given; none if there is no
    /// such alert), at most `query.limit`.
    fn alerts(&self, query: &AlertQuery<'_>) -> Result<Vec<Alert>, RegistryError>;
    /// Open alerts (active or acknowledged), by rule and then device, at most `limit`: which
    /// rules fire for which devices, as the engine learns at its start.
    fn open_alerts(&self, limit: usize) -> Result<Vec<Alert>, RegistryError>;

    /// Records a new API token; an id already taken is refused.
    fn insert_api_token(&self, token: &ApiToken) -> Result<(), RegistryError>;
    fn api_token(&self, id: &str) -> Result<Option<ApiToken>, RegistryError>;
    /// Tokens by id, after `after`.
    fn api_tokens(&self, after: Option<&str>, limit: usize)
        -> Result<Vec<ApiToken>, RegistryError>;
    /// Removes a token; `false` if there was none. It is refused from the next request on.
    fn delete_api_token(&self, id: &str) -> Result<bool, RegistryError>;
}
