//! The Tellus device library.
//!
//! A device proves who it is with the certificate Tellus issued to it (or signed from its
//! CSR): [`Credentials`] holds that certificate, its key and the fleet CA, and
//! [`mqtt_options`] turns them into rumqttc options for an mTLS connection whose client id
//! is the device id, as the gate requires. Topic names come from [`tellus_core::topic`].
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tellus_device::{mqtt_options, Credentials};
//! let creds = Credentials::from_dir("certs", "sensor-01")?;
//! let options = mqtt_options(&creds, "localhost", 8883)?;
//! let (client, mut events) = rumqttc::AsyncClient::new(options, 10);
//! client
//!     .publish(creds.telemetry_topic(), rumqttc::QoS::AtLeastOnce, false, r#"{"t": 21.5}"#)
//!     .await?;
//! loop {
//!     if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = events.poll().await? {
//!         break; // durable in Tellus
//!     }
//! }
//! # Ok(()) }
//! ```

use std::{path::Path, sync::Arc};

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
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{what} is not valid PEM: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

impl Credentials {
    /// Reads `<id>.crt`, `<id>.key` and `ca.crt` from `dir`, as `tellus device create` writes
    /// them.
    pub fn from_dir(dir: impl AsRef<Path>, id: &str) -> Result<Credentials, Error> {
        let dir = dir.as_ref();
        let read = |name: String| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| Error::Read {
                path: path.display().to_string(),
                source,
            })
        };
        Ok(Credentials {
            id: DeviceId::parse(id)?,
            cert_pem: read(format!("{id}.crt"))?,
            key_pem: read(format!("{id}.key"))?,
            ca_pem: read("ca.crt".into())?,
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
