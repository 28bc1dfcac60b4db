//! The Tellus device library: a device that never loses a reading.
//!
//! - [`Credentials`]: the device's certificate, key and the fleet CA, from files or PEM
//!   text; the device id (and MQTT client id) is the certificate's common name.
//! - [`Device`]: connects over mTLS (rumqttc, MQTT 3.1.1, QoS 1), reconnects with exponential
//!   backoff and jitter, and sends [`Reading`]s in batches, as JSON or protobuf ([`Format`]).
//!   Every reading is written to an outbox first and removed only once Tellus has
//!   acknowledged it, which Tellus does only once the reading is durable there. Give it a
//!   file ([`OutboxConfig::file`]) to survive a restart of the program; the default outbox
//!   is in memory. Readings carry the device's time, so one sent twice (after a lost
//!   acknowledgement, or a restart) is stored once.
//! - Commands go to handlers registered by name ([`DeviceBuilder::on_command`]); their
//!   results (or failures) are published for Tellus, and an unknown command is answered with
//!   a failure that names it. The desired state is kept ([`Device::desired`]) and handed to
//!   [`DeviceBuilder::on_desired`] when it changes; [`Device::report_state`] reports.
//! - Before the certificate expires, [`Rotation`] renews it: a new key made on the device, a
//!   CSR to Tellus, the certificate checked, stored and connected with.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tellus_device::{Credentials, Device, OutboxConfig, Reading};
//! let creds = Credentials::from_dir("certs", "sensor-01")?;
//! let device = Device::builder(creds, "localhost", 8883)
//!     .outbox(OutboxConfig::file("outbox.db"))
//!     .start()?;
//! device.send(Reading::now().with("temperature", 21.5)).await?;
//! device.close().await;
//! # Ok(()) }
//! ```
//!
//! For rumqttc directly, [`mqtt_options`] gives the options of such a connection. [`sim`]
//! runs simulated devices on all this, for demos and load.

mod backoff;
mod device;
mod outbox;
mod reading;
mod rotation;
pub mod sim;

pub use backoff::Backoff;
pub use device::{
    Batching, Command, CommandResult, Desired, Device, DeviceBuilder, Stats, MAX_EVENT_NAME,
    MAX_MESSAGE_BYTES,
};
pub use outbox::{Durability, OutboxConfig, OutboxError, WhenFull};
pub use reading::{Format, InvalidReading, Reading, Time, Value, MAX_READING_BYTES};
pub use rotation::Rotation;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tellus_core::{topic::DeviceTopic, DeviceId};

/// A device's identity: its id, certificate and key, and the CA that signed the server.
#[derive(Clone)]
pub struct Credentials {
    pub id: DeviceId,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid device id: {0}")]
    Id(#[from] tellus_core::InvalidDeviceId),
    #[error("the device certificate has no usable common name: {0}")]
    NoCommonName(String),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{what} is not valid PEM: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("opening the outbox: {0}")]
    OpenOutbox(#[from] OutboxError),
    #[error("invalid reading: {0}")]
    Invalid(#[from] InvalidReading),
    #[error("the outbox is full: {0} reading(s) refused")]
    OutboxFull(usize),
    #[error("the outbox could not be written: {0}")]
    Outbox(String),
    #[error("a state report must be a JSON object")]
    NotAnObject,
    #[error("the message is {0} bytes; a device sends at most {max}", max = device::MAX_MESSAGE_BYTES)]
    MessageTooLarge(usize),
    #[error("event name {0:?} is not allowed: {1}")]
    BadEventName(String, String),
    #[error("the device is closed")]
    Closed,
    #[error("certificate rotation: {0}")]
    Rotation(String),
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })
}

impl Credentials {
    /// Reads `<id>.crt`, `<id>.key` and `ca.crt` from `dir`, as `tellus device create` writes
    /// them (and [`Rotation::save_to`] replaces them; a replacement that a crash interrupted
    /// is completed or discarded first).
    pub fn from_dir(dir: impl AsRef<Path>, id: &str) -> Result<Credentials, Error> {
        let dir = dir.as_ref();
        rotation::finish_interrupted(dir, id).map_err(|source| Error::Read {
            path: dir.display().to_string(),
            source,
        })?;
        let creds = Credentials::from_files(
            dir.join(format!("{id}.crt")),
            dir.join(format!("{id}.key")),
            dir.join("ca.crt"),
        )?;
        if creds.id.as_str() != id {
            return Err(Error::NoCommonName(format!(
                "{id}.crt is issued to {:?}, not {id:?}",
                creds.id.as_str()
            )));
        }
        Ok(creds)
    }

    /// Writes `<id>.crt`, `<id>.key` (readable by the owner only) and `ca.crt` into `dir`,
    /// created if missing: the files [`Credentials::from_dir`] reads. The certificate is
    /// written last, so a folder with it holds all three. Returns their paths: (certificate,
    /// key, CA).
    pub fn write_to_dir(
        &self,
        dir: impl AsRef<Path>,
    ) -> std::io::Result<(PathBuf, PathBuf, PathBuf)> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        let id = self.id.as_str();
        let (cert, key, ca) = (
            dir.join(format!("{id}.crt")),
            dir.join(format!("{id}.key")),
            dir.join("ca.crt"),
        );
        std::fs::write(&ca, &self.ca_pem)?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        std::io::Write::write_all(&mut options.open(&key)?, self.key_pem.as_bytes())?;
        std::fs::write(&cert, &self.cert_pem)?;
        Ok((cert, key, ca))
    }

    /// Reads the device certificate, its key and the fleet CA from three PEM files.
    pub fn from_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
        ca: impl AsRef<Path>,
    ) -> Result<Credentials, Error> {
        Credentials::from_pem(
            read(cert.as_ref())?,
            read(key.as_ref())?,
            read(ca.as_ref())?,
        )
    }

    /// Takes the device certificate, its key and the fleet CA as PEM text (for firmware that
    /// keeps them in a secure element or its configuration). The device id is the
    /// certificate's common name, as Tellus reads it.
    pub fn from_pem(
        cert_pem: impl Into<String>,
        key_pem: impl Into<String>,
        ca_pem: impl Into<String>,
    ) -> Result<Credentials, Error> {
        let cert_pem = cert_pem.into();
        let cn = common_name(&cert_pem)?;
        Ok(Credentials {
            id: DeviceId::parse(&cn)?,
            cert_pem,
            key_pem: key_pem.into(),
            ca_pem: ca_pem.into(),
        })
    }

    /// Where this device publishes JSON telemetry.
    pub fn telemetry_topic(&self) -> String {
        DeviceTopic::Telemetry.topic(&self.id)
    }

    /// A rustls client configuration presenting this device's certificate and trusting only
    /// the fleet CA.
    pub fn tls_config(&self) -> Result<rustls::ClientConfig, Error> {
        let pem_err = |what| {
            move |e: rustls_pki_types::pem::Error| Error::Pem {
                what,
                reason: e.to_string(),
            }
        };
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(ca.map_err(pem_err("the CA certificate"))?)?;
        }
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err("the device certificate"))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(pem_err("the device key"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?)
    }
}

/// The common name of the first certificate in `pem`.
fn common_name(pem: &str) -> Result<String, Error> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::Pem {
        what: "the device certificate",
        reason: e.to_string(),
    })?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| Error::NoCommonName(e.to_string()))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or_else(|| Error::NoCommonName("the subject has no CN".into()))?;
    cn.as_str()
        .map(str::to_owned)
        .map_err(|e| Error::NoCommonName(e.to_string()))
}

/// Options for an MQTT 3.1.1 connection over TLS to Tellus at `host:port`, with the device
/// id as client id and a clean session.
pub fn mqtt_options(creds: &Credentials, host: &str, port: u16) -> Result<MqttOptions, Error> {
    let mut options = MqttOptions::new(creds.id.as_str(), host, port);
    options.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(
        creds.tls_config()?,
    ))));
    options.set_keep_alive(std::time::Duration::from_secs(30));
    Ok(options)
}

/// Like [`mqtt_options`], for MQTT 5: the gate then answers with reason codes (a refused
/// publish is told "not authorized", telemetry kept as a dead letter "payload format
/// invalid") instead of closing or acknowledging blindly.
pub fn mqtt5_options(
    creds: &Credentials,
    host: &str,
    port: u16,
) -> Result<rumqttc::v5::MqttOptions, Error> {
    let mut options = rumqttc::v5::MqttOptions::new(creds.id.as_str(), host, port);
    options.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(
        creds.tls_config()?,
    ))));
    options.set_keep_alive(std::time::Duration::from_secs(30));
    Ok(options)
}
