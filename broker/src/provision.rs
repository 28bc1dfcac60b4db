//! Device registration, the one place a device comes into being, and certificate rotation,
//! the one place a device gets another certificate.
//!
//! The HTTP API (`POST /api/v1/devices`) and the `tellus device create` CLI both call
//! [`create_device`]. It validates the id, makes sure the id is free, gets a certificate from
//! the [`Pki`] (a fresh key pair, or the device's own CSR signed) and records the device with
//! the certificate's serial and expiry in the [`Registry`].
//!
//! The calls block (key generation, registry writes): async callers run this on a blocking
//! thread. Two creates of the same id may race past the "is it free" check; the registry's
//! insert is the arbiter and the loser gets [`ProvisionError::AlreadyExists`] (its freshly
//! issued certificate is never recorded, and the gate accepts only recorded certificates).

use tellus_core::{
    now_ms, CertificateRecord, DeviceId, DeviceRecord, InvalidDeviceId, NewDevice, Registry,
    RegistryError, FLEET_ISSUER,
};

use crate::pki::{IssuedCert, Pki, PkiError};

/// Why a device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    InvalidId(#[from] InvalidDeviceId),
    #[error("device {0} already exists")]
    AlreadyExists(DeviceId),
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    #[error("issuing the device certificate failed: {0}")]
    Pki(#[source] PkiError),
    #[error("device registry: {0}")]
    Registry(#[source] RegistryError),
    /// The registry's state does not allow it (the device is disabled, has too many valid
    /// certificates, …); the text says why.
    #[error("{0}")]
    Refused(String),
}

/// Most certificates of one device that may be valid (not revoked, not expired) at once, so
/// that a device repeating its CSR cannot grow the registry without end.
pub const MAX_VALID_CERTIFICATES: usize = 5;

impl From<PkiError> for ProvisionError {
    fn from(e: PkiError) -> Self {
        match e {
            PkiError::BadCsr(reason) => ProvisionError::BadCsr(reason),
            other => ProvisionError::Pki(other),
        }
    }
}

impl From<RegistryError> for ProvisionError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::AlreadyExists(id) => ProvisionError::AlreadyExists(id),
            RegistryError::Refused(why) => ProvisionError::Refused(why),
            other => ProvisionError::Registry(other),
        }
    }
}

/// A newly registered device and its certificate (with its private key when Tellus made it:
/// hand it to the device now, it is not kept anywhere).
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub device: DeviceRecord,
    pub cert: IssuedCert,
}

/// Validates the id, issues a cert (or signs the CSR when given), records the device (cert
/// serial, not_after, created_at = now_ms()) in the registry. Checks the id is free before
/// signing.
pub fn create_device(
    pki: &Pki,
    registry: &dyn Registry,
    id: &str,
    csr_pem: Option<&str>,
) -> Result<Provisioned, ProvisionError> {
    let id = DeviceId::parse(id)?;
    if registry.device(&id)?.is_some() {
        return Err(ProvisionError::AlreadyExists(id));
    }
    let cert = match csr_pem {
        Some(csr) => pki.sign_device_csr(&id, csr)?,
        None => pki.issue_device(&id)?,
    };
    // Another create of the same id may have won since the check above: the insert decides.
    let device = registry.insert_device(&NewDevice {
        id,
        created_at_ms: now_ms(),
        tags: Default::default(),
        cert_issuer: FLEET_ISSUER.to_owned(),
        cert_serial: cert.serial_hex.clone(),
        cert_not_after_ms: cert.not_after_ms,
    })?;
    Ok(Provisioned { device, cert })
}

/// Signs a CSR a connected device sent to rotate its certificate, which it presented as
/// `presented` (issuer, serial), and records the new certificate beside the old ones, which
/// stay valid until they expire or are revoked. The registry records it only if, at that
/// moment, the device is enabled, `presented` is its own and not revoked, and fewer than
/// [`MAX_VALID_CERTIFICATES`] of its certificates are valid; a revocation or a burst of
/// CSRs racing with this cannot get past that.
pub fn rotate_certificate(
    pki: &Pki,
    registry: &dyn Registry,
    id: &DeviceId,
    presented: (&str, &str),
    csr_pem: &str,
) -> Result<IssuedCert, ProvisionError> {
    let cert = pki.sign_device_csr(id, csr_pem)?;
    registry.add_rotated_certificate(
        presented,
        &CertificateRecord {
            issuer: FLEET_ISSUER.to_owned(),
            serial: cert.serial_hex.clone(),
            device: id.clone(),
            issued_at_ms: now_ms(),
            not_after_ms: cert.not_after_ms,
            revoked_at_ms: None,
        },
        MAX_VALID_CERTIFICATES,
    )?;
    Ok(cert)
}

/// What the registry knows of a connecting certificate, after registering it where its CA
/// allows that.
#[derive(Debug)]
pub struct Known {
    pub device: Option<DeviceRecord>,
    pub certificate: Option<CertificateRecord>,
    /// Registered just now, on this first connection.
    pub registered: bool,
}

/// Looks up a connecting device and its certificate (by issuer and serial). When the
/// certificate's CA registers devices on first connection (`auto_register` holds its tags),
/// an unknown device is registered with those tags, and an unknown certificate of a device
/// whose certificates all come from that same CA is recorded; a CA can never take over a
/// device that another CA vouches for.
pub fn lookup_connecting(
    registry: &dyn Registry,
    id: &DeviceId,
    issuer: &str,
    serial: &str,
    not_after_ms: i64,
    auto_register: Option<&std::collections::BTreeMap<String, String>>,
) -> Result<Known, RegistryError> {
    let device = registry.device(id)?;
    let certificate = registry.certificate(issuer, serial)?;
    let Some(tags) = auto_register else {
        return Ok(Known {
            device,
            certificate,
            registered: false,
        });
    };
    let now = now_ms();
    let record = CertificateRecord {
        issuer: issuer.to_owned(),
        serial: serial.to_owned(),
        device: id.clone(),
        issued_at_ms: now,
        not_after_ms,
        revoked_at_ms: None,
    };
    match (&device, &certificate) {
        (None, _) => {
            let device = registry.insert_device(&NewDevice {
                id: id.clone(),
                created_at_ms: now,
                tags: tags.clone(),
                cert_issuer: issuer.to_owned(),
                cert_serial: serial.to_owned(),
                cert_not_after_ms: not_after_ms,
            })?;
            Ok(Known {
                device: Some(device),
                certificate: Some(record),
                registered: true,
            })
        }
        (Some(_), None)
            if registry
                .certificates(id)?
                .iter()
                .all(|c| c.issuer == issuer) =>
        {
            registry.add_certificate(&record)?;
            Ok(Known {
                device,
                certificate: Some(record),
                registered: true,
            })
        }
        _ => Ok(Known {
            device,
            certificate,
            registered: false,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tellus_core::DeviceQuery;
    use tellus_ingest::SqliteRegistry;

    use super::*;

    fn setup() -> (tempfile::TempDir, Pki, SqliteRegistry) {
        let dir = tempfile::tempdir().unwrap();
        let pki =
            Pki::load_or_create(&dir.path().join("pki"), Duration::from_secs(86_400)).unwrap();
        let reg = SqliteRegistry::open(&dir.path().join("registry.db")).unwrap();
        (dir, pki, reg)
    }

    #[test]
    fn creates_records_and_refuses_duplicates() {
        let (_dir, pki, reg) = setup();
        let before = now_ms();
        let p = create_device(&pki, &reg, "sensor-01", None).unwrap();
        assert_eq!(p.device.id.as_str(), "sensor-01");
        assert_eq!(p.device.cert_serial.as_ref(), Some(&p.cert.serial_hex));
        assert_eq!(p.device.cert_not_after_ms, Some(p.cert.not_after_ms));
        assert!(p.device.created_at_ms >= before);
        assert!(p.cert.key_pem.is_some());
        let id = DeviceId::parse("sensor-01").unwrap();
        assert_eq!(reg.device(&id).unwrap(), Some(p.device));
        assert!(matches!(
            create_device(&pki, &reg, "sensor-01", None),
            Err(ProvisionError::AlreadyExists(d)) if d == id
        ));
    }

    #[test]
    fn rotation_adds_a_certificate_and_is_bounded() {
        let (_dir, pki, reg) = setup();
        let id = DeviceId::parse("rot").unwrap();
        let csr = || {
            let key = rcgen::KeyPair::generate().unwrap();
            rcgen::CertificateParams::new(vec![])
                .unwrap()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap()
        };
        let rotate = |presented| rotate_certificate(&pki, &reg, &id, presented, &csr());
        let refused = |presented| matches!(rotate(presented), Err(ProvisionError::Refused(_)));
        assert!(refused((FLEET_ISSUER, "00")));
        let first = create_device(&pki, &reg, "rot", None).unwrap();
        let presented = (FLEET_ISSUER, first.cert.serial_hex.as_str());
        for _ in 1..MAX_VALID_CERTIFICATES {
            let next = rotate(presented).unwrap();
            assert_ne!(next.serial_hex, first.cert.serial_hex);
            assert!(next.key_pem.is_none());
        }
        assert_eq!(reg.certificates(&id).unwrap().len(), MAX_VALID_CERTIFICATES);
        assert!(refused(presented));
        // Once the presenting certificate is revoked it can mint no more.
        reg.revoke(&id, Some(&first.cert.serial_hex), now_ms())
            .unwrap();
        assert!(refused(presented));
    }

    #[test]
    fn a_lost_race_is_already_exists() {
        // The insert is the arbiter: its refusal becomes the same error as the check's.
        let id = DeviceId::parse("d1").unwrap();
        assert!(matches!(
            ProvisionError::from(RegistryError::AlreadyExists(id)),
            ProvisionError::AlreadyExists(_)
        ));
    }

    #[test]
    fn bad_input_is_refused_before_anything_is_recorded() {
        let (_dir, pki, reg) = setup();
        assert!(matches!(
            create_device(&pki, &reg, "bad/id", None),
            Err(ProvisionError::InvalidId(InvalidDeviceId::BadChar('/')))
        ));
        assert!(matches!(
            create_device(&pki, &reg, "d1", Some("not a csr")),
            Err(ProvisionError::BadCsr(_))
        ));
        let all = DeviceQuery {
            limit: 10,
            ..Default::default()
        };
        assert!(reg.devices(&all).unwrap().is_empty());
    }
}
