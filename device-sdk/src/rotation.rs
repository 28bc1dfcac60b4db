//! Certificate rotation: before the device's certificate expires, a new key is made on the
//! device, its CSR sent on `devices/{id}/certs/csr`, and the certificate Tellus answers with
//! on `devices/{id}/certs/issued` is checked, stored, and connected with.

use std::{
    collections::VecDeque,
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
    /// Renew once the certificate has less than this left (default 30 days), or less than
    /// half its lifetime, whichever comes later: a certificate issued for less than
    /// `renew_before` is not renewed the moment it arrives.
    pub renew_before: Duration,
    /// Write the new certificate, key and CA here, as `<id>.crt`, `<id>.key` and `ca.crt`
    /// (the form [`Credentials::from_dir`] reads), so that the next start uses them. `None`
    /// keeps them in memory only.
    pub save_to: Option<PathBuf>,
    /// At most one request this often, whatever its outcome (default 10 minutes; at least
    /// 1 s). A request unanswered for this long is made again; a late answer to it is
    /// still taken.
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

/// How many requests of one connection are remembered for their answers.
const KEYS_KEPT: usize = 3;

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
    /// The current certificate's validity, ms since the Unix epoch.
    not_before_ms: TimestampMs,
    not_after_ms: TimestampMs,
    /// The keys of the requests sent on this connection, newest last (at most
    /// [`KEYS_KEPT`]): a request given up may still be answered, and its certificate,
    /// already recorded by Tellus, is as good as the newest.
    pending: VecDeque<rcgen::KeyPair>,
    last_attempt: Option<Instant>,
}

impl Renewal {
    pub fn new(mut config: Rotation, cert_pem: &str) -> Result<Renewal, Error> {
        config.min_interval = config.min_interval.max(Duration::from_secs(1));
        let (not_before_ms, not_after_ms) = validity_ms(cert_pem)?;
        Ok(Renewal {
            config,
            not_before_ms,
            not_after_ms,
            pending: VecDeque::new(),
            last_attempt: None,
        })
    }

    /// Whether to ask for a certificate now.
    pub fn due(&mut self, now_ms: TimestampMs) -> bool {
        let recent = self
            .last_attempt
            .is_some_and(|t| t.elapsed() < self.config.min_interval);
        if recent {
            return false;
        }
        // Unanswered for a whole interval: ask again (the earlier keys stay, for a late
        // answer).
        let left = self.not_after_ms.saturating_sub(now_ms);
        let lifetime = self.not_after_ms.saturating_sub(self.not_before_ms);
        let before = i64::try_from(self.config.renew_before.as_millis()).unwrap_or(i64::MAX);
        left <= before.min(lifetime / 2)
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
        self.pending.push_back(key);
        if self.pending.len() > KEYS_KEPT {
            self.pending.pop_front();
        }
        Ok(csr)
    }

    /// The requests were lost with their connection (answers come on it only): ask again
    /// when next due.
    pub fn abandon(&mut self) {
        self.pending.clear();
    }

    /// Takes Tellus's answer: the new credentials, checked (issued to this device, for a key
    /// sent) and saved where configured. Neither a refusal nor a certificate for another
    /// key touches the requests waiting: a refusal may answer an earlier one.
    pub fn finish(&mut self, current: &Credentials, payload: &[u8]) -> Result<Credentials, Error> {
        if self.pending.is_empty() {
            return Err(Error::Rotation("an answer to no request".into()));
        }
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
        let public = public_key(&cert_pem)?;
        let Some(key) = self.pending.iter().find(|k| k.public_key_raw() == public) else {
            return Err(Error::Rotation(
                "the certificate is not for a key sent".into(),
            ));
        };
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
        // Usable as a whole before it replaces anything.
        creds.tls_config()?;
        if let Some(dir) = &self.config.save_to {
            save(dir, &creds).map_err(|e| Error::Rotation(format!("saving: {e}")))?;
        }
        (self.not_before_ms, self.not_after_ms) = validity_ms(&creds.cert_pem)?;
        self.pending.clear();
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

fn validity_ms(pem: &str) -> Result<(TimestampMs, TimestampMs), Error> {
    parse(pem, |c| {
        let v = c.validity();
        (
            v.not_before.timestamp().saturating_mul(1000),
            v.not_after.timestamp().saturating_mul(1000),
        )
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
/// the old ones (`.next`, the key readable by its owner only), then renamed, key first.
/// [`finish_interrupted`] completes (or discards) what a crash interrupted. A changed CA is
/// written first (`ca.crt`, through a rename).
fn save(dir: &Path, creds: &Credentials) -> std::io::Result<()> {
    let (cert, key) = files(dir, &creds.id);
    let ca = dir.join("ca.crt");
    if std::fs::read_to_string(&ca).ok().as_deref() != Some(creds.ca_pem.as_str()) {
        write_synced(&next_path(&ca), creds.ca_pem.as_bytes(), false)?;
        std::fs::rename(next_path(&ca), &ca)?;
    }
    write_synced(&next_path(&key), creds.key_pem.as_bytes(), true)?;
    write_synced(&next_path(&cert), creds.cert_pem.as_bytes(), false)?;
    sync_dir(dir);
    std::fs::rename(next_path(&key), &key)?;
    std::fs::rename(next_path(&cert), &cert)?;
    sync_dir(dir);
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn files(dir: &Path, id: &DeviceId) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{}.crt", id.as_str())),
        dir.join(format!("{}.key", id.as_str())),
    )
}

fn write_synced(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    // A fresh file: one left over would keep its old permissions.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = options.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Completes a save that a crash interrupted, or discards it. A new certificate is taken
/// only if it is whole and belongs to the key it would be used with (the new key, or the
/// key already renamed into place); anything else of the save is deleted, leaving the old
/// pair.
pub(crate) fn finish_interrupted(dir: &Path, id: &str) -> std::io::Result<()> {
    let cert = dir.join(format!("{id}.crt"));
    let key = dir.join(format!("{id}.key"));
    let (cert_next, key_next) = (next_path(&cert), next_path(&key));
    if !cert_next.exists() {
        if key_next.exists() {
            std::fs::remove_file(&key_next)?;
        }
        return Ok(());
    }
    let key_to_use = if key_next.exists() { &key_next } else { &key };
    let matches = std::fs::read_to_string(&cert_next)
        .ok()
        .zip(std::fs::read_to_string(key_to_use).ok())
        .is_some_and(|(c, k)| pair_matches(&c, &k));
    if matches {
        if key_next.exists() {
            std::fs::rename(&key_next, &key)?;
        }
        std::fs::rename(&cert_next, &cert)?;
    } else {
        std::fs::remove_file(&cert_next)?;
        if key_next.exists() {
            std::fs::remove_file(&key_next)?;
        }
    }
    Ok(())
}

/// Whether the certificate in `cert_pem` is for the key in `key_pem`.
fn pair_matches(cert_pem: &str, key_pem: &str) -> bool {
    let Ok(key) = rcgen::KeyPair::from_pem(key_pem) else {
        return false;
    };
    public_key(cert_pem).is_ok_and(|k| k == key.public_key_raw())
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
        let key = renewal.pending.back().unwrap();
        let other = self_signed("d2", key);
        let answer = serde_json::json!({ "cert_pem": other }).to_string();
        let err = renewal.finish(&current, answer.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("issued to \"d2\""), "{err}");

        renewal.start().unwrap();
        let wrong_key = self_signed("d1", &rcgen::KeyPair::generate().unwrap());
        let answer = serde_json::json!({ "cert_pem": wrong_key }).to_string();
        let err = renewal.finish(&current, answer.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("not for a key sent"), "{err}");

        // A refusal (perhaps of an earlier request) leaves the requests waiting.
        let err = renewal
            .finish(&current, br#"{"error": "too many"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("too many"), "{err}");

        // A late answer to a request given up is as good as one to the newest.
        let earlier = renewal.pending.back().unwrap();
        let late = self_signed("d1", earlier);
        renewal.start().unwrap();
        let answer = serde_json::json!({ "cert_pem": late }).to_string();
        let renewed = renewal.finish(&current, answer.as_bytes()).unwrap();
        assert_eq!(renewed.cert_pem, late);
        assert_eq!(renewed.ca_pem, current.ca_pem);
        assert!(
            renewal.finish(&current, b"{}").is_err(),
            "no request waits once one is answered"
        );
        renewal.start().unwrap();
        renewal.abandon();
        assert!(
            renewal.finish(&current, b"{}").is_err(),
            "lost with its connection"
        );
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

    #[test]
    fn a_torn_certificate_is_not_promoted_over_a_good_pair() {
        let dir = tempfile::tempdir().unwrap();
        let old = creds("d1");
        let new = creds("d1");
        old.write_to_dir(dir.path()).unwrap();
        let (cert, key) = files(dir.path(), &old.id);
        // save() crashed inside write_synced(cert.next): key.next whole, cert.next created
        // but not yet written.
        std::fs::write(next_path(&key), &new.key_pem).unwrap();
        std::fs::write(next_path(&cert), b"").unwrap();
        let loaded = Credentials::from_dir(dir.path(), "d1");
        assert!(
            loaded.is_ok(),
            "the device can no longer start: {:?}",
            loaded.err()
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_saved_key_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let old = creds("d1");
        old.write_to_dir(dir.path()).unwrap();
        let (_, key) = files(dir.path(), &old.id);
        let before = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        save(dir.path(), &creds("d1")).unwrap();
        let after = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!((before, after), (0o600, 0o600));
    }
}
