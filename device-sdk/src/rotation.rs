//! Certificate rotation: before the device's certificate expires, a new key is made on the
//! device, its CSR sent on `devices/{id}/certs/csr`, and the certificate Tellus answers with
//! on `devices/{id}/certs/issued` is checked, stored, and connected with.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rustls_pki_types::{pem::PemObject, CertificateDer};
use serde::Deserialize;
use tellus_core::{DeviceId, TimestampMs};
use tokio::time::Instant;

use crate::{Credentials, Error};

/// When and where to renew the device's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// Renew once the certificate has less than this left (default 30 days).
    pub renew_before: Duration,
    /// Write the new certificate and key here, as `<id>.crt` and `<id>.key` (the form
    /// [`Credentials::from_dir`] reads), so that the next start uses them. `None` keeps them
    /// in memory only.
    pub save_to: Option<PathBuf>,
    /// At most one request this often, whatever its outcome (default 10 minutes).
    pub min_interval: Duration,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            renew_before: Duration::from_secs(30 * 86_400),
            save_to: None,
            min_interval: Duration::from_secs(600),
        }
    }
}

/// Tellus's answer on `certs/issued`.
#[derive(Deserialize)]
struct Issued {
    cert_pem: Option<String>,
    ca_pem: Option<String>,
    error: Option<String>,
}

/// Where a device is in renewing its certificate.
pub(crate) struct Renewal {
    config: Rotation,
    not_after_ms: TimestampMs,
    /// The key of the request sent, waiting for its certificate.
    pending: Option<rcgen::KeyPair>,
    last_attempt: Option<Instant>,
}

impl Renewal {
    pub fn new(config: Rotation, cert_pem: &str) -> Result<Renewal, Error> {
        Ok(Renewal {
            config,
            not_after_ms: not_after_ms(cert_pem)?,
            pending: None,
            last_attempt: None,
        })
    }

    /// Whether to ask for a certificate now.
    pub fn due(&self, now_ms: TimestampMs) -> bool {
        let left = self.not_after_ms.saturating_sub(now_ms);
        self.pending.is_none()
            && left <= self.config.renew_before.as_millis() as i64
            && self
                .last_attempt
                .is_none_or(|t| t.elapsed() >= self.config.min_interval)
    }

    /// When to look again.
    pub fn next_check(&self) -> Instant {
        Instant::now() + self.config.min_interval.min(Duration::from_secs(3_600))
    }

    /// A new key, and the CSR to send for it.
    pub fn start(&mut self) -> Result<String, Error> {
        self.last_attempt = Some(Instant::now());
        let key = rcgen::KeyPair::generate().map_err(|e| Error::Rotation(e.to_string()))?;
        // Tellus puts the device id in the certificate, whatever the request asks.
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .and_then(|params| params.serialize_request(&key))
            .and_then(|csr| csr.pem())
            .map_err(|e| Error::Rotation(e.to_string()))?;
        self.pending = Some(key);
        Ok(csr)
    }

    /// The request was lost with its connection: ask again when next due.
    pub fn abandon(&mut self) {
        self.pending = None;
    }

    /// Takes Tellus's answer: the new credentials, checked (issued to this device, for the
    /// key sent) and saved where configured.
    pub fn finish(&mut self, current: &Credentials, payload: &[u8]) -> Result<Credentials, Error> {
        let Some(key) = self.pending.take() else {
            return Err(Error::Rotation("an answer to no request".into()));
        };
        let issued: Issued = serde_json::from_slice(payload)
            .map_err(|e| Error::Rotation(format!("unreadable answer: {e}")))?;
        if let Some(error) = issued.error {
            return Err(Error::Rotation(format!(
                "Tellus refused the request: {error}"
            )));
        }
        let cert_pem = issued
            .cert_pem
            .ok_or_else(|| Error::Rotation("the answer has no certificate".into()))?;
        let creds = Credentials::from_pem(
            cert_pem,
            key.serialize_pem(),
            issued.ca_pem.unwrap_or_else(|| current.ca_pem.clone()),
        )?;
        if creds.id != current.id {
            return Err(Error::Rotation(format!(
                "the certificate is issued to {:?}",
                creds.id.as_str()
            )));
        }
        if public_key(&creds.cert_pem)? != key.public_key_raw() {
            return Err(Error::Rotation(
                "the certificate is not for the key sent".into(),
            ));
        }
        // Usable as a whole before it replaces anything.
        creds.tls_config()?;
        if let Some(dir) = &self.config.save_to {
            save(dir, &creds).map_err(|e| Error::Rotation(format!("saving: {e}")))?;
        }
        self.not_after_ms = not_after_ms(&creds.cert_pem)?;
        Ok(creds)
    }
}

fn parse<T>(
    pem: &str,
    f: impl FnOnce(&x509_parser::certificate::X509Certificate<'_>) -> T,
) -> Result<T, Error> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::Pem {
        what: "the device certificate",
        reason: e.to_string(),
    })?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| Error::Rotation(e.to_string()))?;
    Ok(f(&cert))
}

fn not_after_ms(pem: &str) -> Result<TimestampMs, Error> {
    parse(pem, |c| {
        c.validity().not_after.timestamp().saturating_mul(1000)
    })
}

fn public_key(pem: &str) -> Result<Vec<u8>, Error> {
    parse(pem, |c| c.public_key().subject_public_key.data.to_vec())
}

fn next_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".next");
    name.into()
}

/// Writes new credentials over `<id>.crt` and `<id>.key` in `dir` so that no crash leaves a
/// key and a certificate that do not belong together: both are first written whole beside
/// the old ones (`.next`), then renamed, key first. [`finish_interrupted`] completes (or
/// discards) what a crash interrupted.
fn save(dir: &Path, creds: &Credentials) -> std::io::Result<()> {
    let (cert, key) = files(dir, &creds.id);
    write_synced(&next_path(&key), creds.key_pem.as_bytes())?;
    write_synced(&next_path(&cert), creds.cert_pem.as_bytes())?;
    std::fs::rename(next_path(&key), &key)?;
    std::fs::rename(next_path(&cert), &cert)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn files(dir: &Path, id: &DeviceId) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{}.crt", id.as_str())),
        dir.join(format!("{}.key", id.as_str())),
    )
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Completes a save that a crash interrupted: with the new certificate written, the rename
/// is finished; with only the new key written, it is discarded.
pub(crate) fn finish_interrupted(dir: &Path, id: &str) -> std::io::Result<()> {
    let cert = dir.join(format!("{id}.crt"));
    let key = dir.join(format!("{id}.key"));
    let (cert_next, key_next) = (next_path(&cert), next_path(&key));
    if cert_next.exists() {
        if key_next.exists() {
            std::fs::rename(&key_next, &key)?;
        }
        std::fs::rename(&cert_next, &cert)?;
    } else if key_next.exists() {
        std::fs::remove_file(&key_next)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(cn: &str, key: &rcgen::KeyPair) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.self_signed(key).unwrap().pem()
    }

    fn creds(cn: &str) -> Credentials {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = self_signed(cn, &key);
        Credentials::from_pem(cert.clone(), key.serialize_pem(), cert).unwrap()
    }

    #[test]
    fn an_answer_is_taken_only_for_this_device_and_the_key_sent() {
        let current = creds("d1");
        let mut renewal = Renewal::new(Rotation::default(), &current.cert_pem).unwrap();
        // rcgen's default validity ends in 4096: far from due.
        assert!(!renewal.due(tellus_core::now_ms()));
        assert!(renewal.due(renewal.not_after_ms - 1_000));

        renewal.start().unwrap();
        let key = renewal.pending.as_ref().unwrap();
        let other = self_signed("d2", key);
        let answer = serde_json::json!({ "cert_pem": other }).to_string();
        let err = renewal.finish(&current, answer.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("issued to \"d2\""), "{err}");

        renewal.start().unwrap();
        let wrong_key = self_signed("d1", &rcgen::KeyPair::generate().unwrap());
        let answer = serde_json::json!({ "cert_pem": wrong_key }).to_string();
        let err = renewal.finish(&current, answer.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("not for the key sent"), "{err}");

        renewal.start().unwrap();
        let err = renewal
            .finish(&current, br#"{"error": "too many"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("too many"), "{err}");
        assert!(
            renewal.finish(&current, b"{}").is_err(),
            "no request pending"
        );

        renewal.start().unwrap();
        let good = self_signed("d1", renewal.pending.as_ref().unwrap());
        let answer = serde_json::json!({ "cert_pem": good }).to_string();
        let renewed = renewal.finish(&current, answer.as_bytes()).unwrap();
        assert_eq!(renewed.cert_pem, good);
        assert_eq!(renewed.ca_pem, current.ca_pem);
    }

    #[test]
    fn a_save_interrupted_by_a_crash_is_completed_or_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let old = creds("d1");
        let new = creds("d1");
        let (cert, key) = files(dir.path(), &old.id);
        let read = || {
            (
                std::fs::read_to_string(&cert).unwrap(),
                std::fs::read_to_string(&key).unwrap(),
            )
        };
        let write_old = || {
            std::fs::write(&cert, &old.cert_pem).unwrap();
            std::fs::write(&key, &old.key_pem).unwrap();
        };
        // Only the new key was written: discarded.
        write_old();
        std::fs::write(next_path(&key), &new.key_pem).unwrap();
        finish_interrupted(dir.path(), "d1").unwrap();
        assert_eq!(read(), (old.cert_pem.clone(), old.key_pem.clone()));
        assert!(!next_path(&key).exists());
        // Both written, neither renamed; or the key renamed already: completed.
        for key_renamed in [false, true] {
            write_old();
            std::fs::write(next_path(&cert), &new.cert_pem).unwrap();
            if key_renamed {
                std::fs::write(&key, &new.key_pem).unwrap();
            } else {
                std::fs::write(next_path(&key), &new.key_pem).unwrap();
            }
            finish_interrupted(dir.path(), "d1").unwrap();
            assert_eq!(read(), (new.cert_pem.clone(), new.key_pem.clone()));
        }
        // A whole save.
        write_old();
        save(dir.path(), &new).unwrap();
        assert_eq!(read(), (new.cert_pem.clone(), new.key_pem.clone()));
        finish_interrupted(dir.path(), "d1").unwrap();
        assert_eq!(read(), (new.cert_pem, new.key_pem));
    }
}
