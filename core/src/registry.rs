//! The device registry, as a trait.
//!
//! The embedded implementation (SQLite in the data directory) lives in `tellus-ingest`;
//! a shared database can stand in when several Tellus nodes serve one fleet. Calls are
//! synchronous and short (indexed lookups); async callers on a hot path should keep them off
//! the reactor where that matters.

use crate::{DeviceId, TimestampMs};

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub created_at_ms: TimestampMs,
    /// Serial number of the certificate issued at registration, in lower-case hex.
    pub cert_serial: String,
    /// End of that certificate's validity.
    pub cert_not_after_ms: TimestampMs,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("device {0} already exists")]
    AlreadyExists(DeviceId),
    #[error("registry backend failed: {0}")]
    Backend(String),
}

/// Where devices are known.
pub trait Registry: Send + Sync + 'static {
    /// Adds a device; [`RegistryError::AlreadyExists`] if the id is taken.
    fn insert_device(&self, device: &DeviceRecord) -> Result<(), RegistryError>;
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, RegistryError>;
    /// Devices in id order, starting after `after`, at most `limit`.
    fn devices(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<DeviceRecord>, RegistryError>;
}
