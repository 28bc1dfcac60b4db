//! Certificates the tests make themselves: the fleet CA read from a running Tellus's data
//! directory, CAs of a user's own, and device certificates signed by either.

use std::path::Path;

use rcgen::{CertificateParams, Issuer, KeyPair};
use tellus_device::Credentials;

/// The fleet CA of the Tellus whose data directory is `data_dir`: (issuer, CA PEM).
pub fn fleet_ca(data_dir: &Path) -> (Issuer<'static, KeyPair>, String) {
    let read = |name| std::fs::read_to_string(data_dir.join("pki").join(name)).unwrap();
    let pem = read("ca.crt");
    let key = KeyPair::from_pem(&read("ca.key")).unwrap();
    (Issuer::from_ca_cert_pem(&pem, key).unwrap(), pem)
}

/// A CA of the user's own, named `name`: (issuer, CA PEM).
pub fn own_ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let pem = params.self_signed(&key).unwrap().pem();
    (Issuer::new(params, key), pem)
}

/// Credentials of device `id` with a certificate from `issuer`, trusting the server through
/// `server_ca_pem`.
pub fn device(issuer: &Issuer<'_, KeyPair>, id: &str, server_ca_pem: &str) -> Credentials {
    device_with(issuer, id, server_ca_pem, |_| {})
}

/// Like [`device`], with the certificate's parameters changed by `edit` (validity, say).
pub fn device_with(
    issuer: &Issuer<'_, KeyPair>,
    id: &str,
    server_ca_pem: &str,
    edit: impl FnOnce(&mut CertificateParams),
) -> Credentials {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, id);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    edit(&mut params);
    Credentials {
        id: id.parse().unwrap(),
        cert_pem: params.signed_by(&key, issuer).unwrap().pem(),
        key_pem: key.serialize_pem(),
        ca_pem: server_ca_pem.to_owned(),
    }
}
