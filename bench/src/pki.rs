//! The benchmark's own PKI: one CA that signs every simulated device's certificate (and,
//! for Mosquitto, the server's and the consumer's). Tellus trusts it as an external CA with
//! `auto_register`, so the same certificates serve both systems.

use std::{path::Path, sync::Arc};

use anyhow::Context;
use rcgen::{CertificateParams, DnType, Issuer, KeyPair};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

pub struct BenchCa {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

/// A certificate and its key, in PEM.
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl BenchCa {
    pub fn new() -> anyhow::Result<BenchCa> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![])?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "tellus-bench devices");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key)?.pem();
        Ok(BenchCa {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// A client certificate with CN = `id`.
    pub fn client(&self, id: &str) -> anyhow::Result<Pair> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, id);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        Ok(Pair {
            cert_pem: params.signed_by(&key, &self.issuer)?.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self) -> anyhow::Result<Pair> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "tellus-bench broker");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        Ok(Pair {
            cert_pem: params.signed_by(&key, &self.issuer)?.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl Pair {
    /// Writes `<name>.crt` and `<name>.key` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> anyhow::Result<()> {
        std::fs::write(dir.join(format!("{name}.crt")), &self.cert_pem)?;
        std::fs::write(dir.join(format!("{name}.key")), &self.key_pem)?;
        Ok(())
    }

    /// A TLS client configuration presenting this certificate, trusting `server_ca_pem`.
    pub fn client_config(&self, server_ca_pem: &str) -> anyhow::Result<Arc<ClientConfig>> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(server_ca_pem.as_bytes()) {
            roots.add(cert.context("server CA")?)?;
        }
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("device certificate")?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).context("device key")?;
        let config = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok(Arc::new(config))
    }
}
