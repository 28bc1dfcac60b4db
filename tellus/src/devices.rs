//! `tellus device …`: manage devices directly in a data directory, without the HTTP API.
//!
//! Each function opens the data directory's [`Fleet`] (CA and registry), does one thing and
//! returns the line the CLI prints. A running `tellus serve` on the same data directory
//! needs no signal: the registry's change log is how its gate learns of a revocation, a
//! disable or a deletion, and it closes the affected connection within a second. An unknown
//! device or serial is an error.
//!
//! Only `create` may create the data directory (and the fleet CA); the others refuse a data
//! directory without a registry, so that a mistyped `--data-dir` is not answered with "no such
//! device" from a fresh, empty one.

use std::path::Path;

use anyhow::{bail, Context};
use tellus_broker::pki::write_atomic;
use tellus_core::{now_ms, DeviceId, DeviceStatus, RegistryError};

use crate::{
    config::Config,
    server::{DataDir, Fleet},
};

/// Registers a device and writes `<id>.crt`, `<id>.key` and `ca.crt` into `out`.
pub fn create(config: &Config, id: &str, out: &Path) -> anyhow::Result<String> {
    let fleet = Fleet::open(&DataDir::of(config), config)?;
    let created =
        tellus_broker::provision::create_device(&fleet.pki, fleet.registry.as_ref(), id, None)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let id = created.device.id.as_str();
    let write = |name: String, contents: &str, mode: u32| {
        let path = out.join(name);
        write_atomic(&path, contents.as_bytes(), mode)
            .with_context(|| format!("writing {}", path.display()))
    };
    write(format!("{id}.crt"), &created.cert.cert_pem, 0o644)?;
    if let Some(key) = &created.cert.key_pem {
        write(format!("{id}.key"), key, 0o600)?;
    }
    write("ca.crt".into(), fleet.pki.ca_pem(), 0o644)?;
    Ok(format!(
        "Device {id} registered; certificate serial {}, valid until {} ms. Files in {}",
        created.cert.serial_hex,
        created.cert.not_after_ms,
        out.display()
    ))
}

/// Revokes one certificate of the device (`serial`, in hex: any case, colons allowed; see
/// [`tellus_core::serial::normalize`]), or all of them.
pub fn revoke(config: &Config, id: &str, serial: Option<&str>) -> anyhow::Result<String> {
    let (fleet, id) = open_existing(config, id)?;
    let serial = serial
        .map(tellus_core::serial::normalize)
        .transpose()
        .context("--serial")?;
    let revoked = match fleet.registry.revoke(&id, serial.as_deref(), now_ms()) {
        Ok(Some(revoked)) => revoked,
        Ok(None) => bail!("no device {id} in {}", config.data_dir.display()),
        Err(RegistryError::UnknownCertificate(serial)) => {
            bail!("certificate {serial} is not one of device {id}'s")
        }
        Err(e) => return Err(e).context("revoking"),
    };
    Ok(match (serial, revoked.as_slice()) {
        (Some(serial), []) => format!("Certificate {serial} of device {id} was already revoked"),
        (None, []) => format!("Device {id} has no certificate left to revoke"),
        (_, revoked) => format!(
            "Revoked {} of device {id}; a running server closes its connection within a second",
            match revoked {
                [one] => format!("certificate {one}"),
                many => format!("{} certificates ({})", many.len(), many.join(", ")),
            }
        ),
    })
}

/// Disables or enables a device.
pub fn set_status(config: &Config, id: &str, status: DeviceStatus) -> anyhow::Result<String> {
    let (fleet, id) = open_existing(config, id)?;
    let unknown = || anyhow::anyhow!("no device {id} in {}", config.data_dir.display());
    let before = fleet.registry.device(&id)?.ok_or_else(unknown)?.status;
    fleet
        .registry
        .set_status(&id, status, now_ms())?
        .ok_or_else(unknown)?;
    Ok(match (before == status, status) {
        (true, _) => format!("Device {id} was already {}", status.as_str()),
        (false, DeviceStatus::Disabled) => format!(
            "Device {id} disabled; a running server closes its connection within a second and \
             refuses it until `tellus device enable {id}`"
        ),
        (false, DeviceStatus::Enabled) => format!("Device {id} enabled"),
    })
}

/// Deletes a device; its certificates stay on record, revoked, so the CRL still lists them.
pub fn delete(config: &Config, id: &str) -> anyhow::Result<String> {
    let (fleet, id) = open_existing(config, id)?;
    if !fleet.registry.delete_device(&id, now_ms())? {
        bail!("no device {id} in {}", config.data_dir.display());
    }
    Ok(format!(
        "Device {id} deleted; its certificates stay revoked on the CRL, and a running server \
         closes its connection within a second"
    ))
}

/// The fleet of a data directory that has a registry already, and the parsed device id.
fn open_existing(config: &Config, id: &str) -> anyhow::Result<(Fleet, DeviceId)> {
    let id = DeviceId::parse(id).with_context(|| format!("device id {id:?}"))?;
    Ok((Fleet::open(&DataDir::existing(config)?, config)?, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        (dir, config)
    }

    /// Creates `id` and returns its certificate serial.
    fn created(dir: &Path, config: &Config, id: &str) -> String {
        create(config, id, &dir.join("out")).unwrap();
        let fleet = Fleet::open(&DataDir::of(config), config).unwrap();
        let id = DeviceId::parse(id).unwrap();
        let device = fleet.registry.device(&id).unwrap().unwrap();
        device.cert_serial.unwrap()
    }

    fn err(r: anyhow::Result<String>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn commands_refuse_a_data_directory_without_a_registry() {
        let (_dir, config) = setup();
        let e = err(revoke(&config, "d1", None));
        assert!(e.contains("has no registry"), "{e}");
        assert!(!config.data_dir.exists(), "nothing was created");
    }

    #[test]
    fn revoke_one_or_all_and_refuse_unknowns() {
        let (dir, config) = setup();
        let serial = created(dir.path(), &config, "d1");
        let other = created(dir.path(), &config, "d2");
        assert!(dir.path().join("out/d1.crt").exists());

        let e = err(revoke(&config, "d1", Some(&other)));
        assert!(e.contains("is not one of device d1's"), "{e}");
        let e = err(revoke(&config, "ghost", None));
        assert!(e.contains("no device ghost"), "{e}");
        let e = err(revoke(&config, "d1", Some("xyz")));
        assert!(e.contains("--serial"), "{e}");
        let e = err(revoke(&config, "bad/id", None));
        assert!(e.contains("device id"), "{e}");

        let line = revoke(&config, "d1", Some(&serial.to_uppercase())).unwrap();
        assert!(line.contains(&format!("certificate {serial}")), "{line}");
        let line = revoke(&config, "d1", Some(&serial)).unwrap();
        assert!(line.contains("already revoked"), "{line}");
        let line = revoke(&config, "d1", None).unwrap();
        assert!(line.contains("no certificate left"), "{line}");
        let line = revoke(&config, "d2", None).unwrap();
        assert!(line.contains(&other), "{line}");
    }

    #[test]
    fn disable_enable_and_delete() {
        let (dir, config) = setup();
        let serial = created(dir.path(), &config, "d1");
        let line = set_status(&config, "d1", DeviceStatus::Disabled).unwrap();
        assert!(line.starts_with("Device d1 disabled"), "{line}");
        let line = set_status(&config, "d1", DeviceStatus::Disabled).unwrap();
        assert_eq!(line, "Device d1 was already disabled");
        let line = set_status(&config, "d1", DeviceStatus::Enabled).unwrap();
        assert_eq!(line, "Device d1 enabled");
        let e = err(set_status(&config, "ghost", DeviceStatus::Enabled));
        assert!(e.contains("no device ghost"), "{e}");

        let line = delete(&config, "d1").unwrap();
        assert!(line.starts_with("Device d1 deleted"), "{line}");
        let e = err(delete(&config, "d1"));
        assert!(e.contains("no device d1"), "{e}");
        // Its certificate stays on record, revoked.
        let fleet = Fleet::open(&DataDir::of(&config), &config).unwrap();
        let revoked = fleet.registry.revoked(now_ms()).unwrap();
        assert_eq!(revoked[0].serial, serial);
    }
}
