//! The fleet's PKI: the certificate authority, the MQTT server's certificate, and device
//! certificates.
//!
//! Start at [`Pki::load_or_create`]: it loads the CA from `ca.crt` + `ca.key` in the data
//! directory, or creates it on first start. From there:
//!
//! - [`Pki::server_identity`] gives the MQTT listener its certificate chain, reissued by the CA
//!   whenever the wanted host names change;
//! - [`Pki::issue_device`] generates a key pair and certificate for a device, and
//!   [`Pki::sign_device_csr`] signs a key the device generated itself; both use one profile
//!   (subject CN = device id, clientAuth, random serial);
//! - [`Pki::gate_tls_config`] is the rustls configuration of the mTLS gate, which accepts only
//!   clients whose certificate chains to the fleet CA or a registered external one, and [`peer_identity`] turns such a
//!   verified certificate back into a [`DeviceId`];
//! - [`Pki::crl_pem`] signs the fleet's certificate revocation list from the [`Revoked`]
//!   entries the registry keeps.
//!
//! Private keys are written with mode 0600 and every file is replaced atomically (temp file,
//! fsync, rename), so a crash never leaves half a key. All crypto uses the `ring` provider.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PublicKeyData, RevokedCertParams, SanType, SerialNumber, SubjectPublicKeyInfo,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use tellus_core::DeviceId;
use time::OffsetDateTime;
use tracing::{info, warn};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

const CA_CN: &str = "Tellus fleet CA";
const SERVER_CN: &str = "Tellus MQTT broker";
const CA_VALIDITY: time::Duration = time::Duration::days(20 * 365);
const SERVER_VALIDITY: time::Duration = time::Duration::days(2 * 365);
/// A server certificate closer than this to expiry is reissued at start.
const SERVER_RENEW_BEFORE: time::Duration = time::Duration::days(30);
/// Device certificates may not outlive the CA that signs them.
const MAX_DEVICE_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// Only a bound against absurd values: CRLs are normally reissued within days.
const MAX_CRL_NEXT_UPDATE: Duration = Duration::from_secs(20 * 365 * 24 * 3600);

/// The fleet's certificate authority and the certificates Tellus issues.
#[derive(Debug)]
pub struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// The CA's subject key identifier, which a CRL's authority key identifier must repeat.
    ca_key_id: KeyIdMethod,
    device_validity: time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A stored CA or key file exists but cannot be used; Tellus does not overwrite it.
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    #[error("invalid certificate: {0}")]
    BadCertificate(String),
    #[error("server name {0:?} is neither an IP address nor a valid DNS name")]
    BadServerName(String),
    #[error("device certificate validity {0:?} must be between 1 second and 20 years")]
    BadValidity(Duration),
    #[error("CRL next update {0:?} must be between 1 second and 20 years away")]
    BadCrlNextUpdate(Duration),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// A certificate Tellus issued to a device.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    /// Only when Tellus generated the key; Tellus never stores it.
    pub key_pem: Option<String>,
    /// Lower-case hex of the serial number (always 16 bytes, 32 digits).
    pub serial_hex: String,
    /// Milliseconds since the Unix epoch.
    pub not_after_ms: i64,
}

/// One revoked certificate, as the registry records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Lower-case hex of the serial number, as [`IssuedCert::serial_hex`].
    pub serial_hex: String,
    /// When it was revoked, in milliseconds since the Unix epoch.
    pub revoked_at_ms: i64,
}

/// A subject alternative name of the server certificate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ServerName {
    Dns(String),
    Ip(IpAddr),
}

impl Pki {
    /// Loads the fleet CA from `dir/ca.crt` + `dir/ca.key`, or creates it on first start.
    ///
    /// The CA is ECDSA P-256, valid 20 years (backdated a day for clock skew), with path length
    /// constraint 0: Tellus signs device and server certificates directly and never an
    /// intermediate, so nothing it signs can act as a CA even if the profile were wrong.
    ///
    /// If only `ca.key` exists (a crash between writing the key and the certificate, or a
    /// deleted certificate), the CA certificate is recreated from that key: certificates
    /// already issued still chain to it. If only `ca.crt` exists, this is an error.
    pub fn load_or_create(dir: &Path, device_validity: Duration) -> Result<Pki, PkiError> {
        if device_validity.is_zero() || device_validity > MAX_DEVICE_VALIDITY {
            return Err(PkiError::BadValidity(device_validity));
        }
        let device_validity = time::Duration::try_from(device_validity)
            .map_err(|_| PkiError::BadValidity(device_validity))?;
        create_dir(dir)?;
        let (crt_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        let key_pem = match read_optional(&key_path)? {
            Some(pem) => pem,
            None => {
                if crt_path.exists() {
                    return Err(PkiError::BadFile {
                        path: key_path,
                        reason: "the CA certificate exists but its key is missing; restore the \
                                 key, or remove ca.crt to create a new CA (all devices will \
                                 need new certificates)"
                            .into(),
                    });
                }
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
                // Another process starting on the same fresh directory may win; then its key
                // is the CA's.
                if write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)
                    .map_err(|e| io_err(&key_path, e))?
                {
                    info!(path = %key_path.display(), "created the fleet CA key");
                }
                fs::read_to_string(&key_path).map_err(|e| io_err(&key_path, e))?
            }
        };
        let bad_key = |reason: String| PkiError::BadFile {
            path: key_path.clone(),
            reason,
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad_key(format!("not a key: {e}")))?;

        let ca_pem = match read_optional(&crt_path)? {
            Some(pem) => pem,
            None => {
                let pem = ca_params().self_signed(&key)?.pem();
                if write_new(&crt_path, pem.as_bytes(), 0o644).map_err(|e| io_err(&crt_path, e))? {
                    info!(path = %crt_path.display(), "created the fleet CA certificate");
                }
                fs::read_to_string(&crt_path).map_err(|e| io_err(&crt_path, e))?
            }
        };
        let bad_crt = |reason: String| PkiError::BadFile {
            path: crt_path.clone(),
            reason,
        };
        let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| bad_crt(format!("not a PEM certificate: {e}")))?;
        let (_, ca) = X509Certificate::from_der(&ca_der)
            .map_err(|e| bad_crt(format!("malformed certificate: {e}")))?;
        if ca.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad_crt(format!(
                "does not match the key in {}",
                key_path.display()
            )));
        }
        // As rcgen's Issuer reads it: the certificate's SKI, else a SHA-256 of the key.
        let ca_key_id = ca
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => {
                    Some(KeyIdMethod::PreSpecified(id.0.to_vec()))
                }
                _ => None,
            })
            .unwrap_or(KeyIdMethod::Sha256);
        let issuer = Issuer::from_ca_cert_der(&ca_der, key)?;
        Ok(Pki {
            ca_pem,
            ca_der,
            issuer,
            ca_key_id,
            device_validity,
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// The MQTT listener's certificate chain (`[server, CA]`) and key.
    ///
    /// Loaded from `dir/server.crt` + `dir/server.key`, or issued by the CA when they are
    /// missing, unreadable, not signed by this CA, within 30 days of expiry, or name a
    /// different set of hosts than: "localhost", 127.0.0.1, ::1, this host's name (when it is
    /// a valid DNS name) and `extra_names` (an IP address if it parses as one, else a DNS name).
    pub fn server_identity(
        &self,
        dir: &Path,
        extra_names: &[String],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
        let wanted = wanted_server_names(extra_names)?;
        let (crt_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
        let stored = match (read_optional(&crt_path)?, read_optional(&key_path)?) {
            (Some(crt), Some(key)) => match self.check_server_cert(&crt, &key, &wanted) {
                Ok(identity) => Some(identity),
                Err(reason) => {
                    info!(reason, "issuing a new server certificate");
                    None
                }
            },
            _ => None,
        };
        let (cert, key) = match stored {
            Some(identity) => identity,
            None => {
                create_dir(dir)?;
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
                let cert = server_params(&wanted).signed_by(&key, &self.issuer)?;
                write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)
                    .map_err(|e| io_err(&key_path, e))?;
                write_atomic(&crt_path, cert.pem().as_bytes(), 0o644)
                    .map_err(|e| io_err(&crt_path, e))?;
                let key = PrivatePkcs8KeyDer::from(key.serialize_der());
                (cert.der().clone(), key.into())
            }
        };
        Ok((vec![cert, self.ca_der.clone()], key))
    }

    /// The stored server identity if it can be reused, else why not.
    fn check_server_cert(
        &self,
        crt_pem: &str,
        key_pem: &str,
        wanted: &BTreeSet<ServerName>,
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), String> {
        let der = CertificateDer::from_pem_slice(crt_pem.as_bytes())
            .map_err(|e| format!("server.crt is not a PEM certificate: {e}"))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("server.key: {e}"))?;
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| format!("server.crt: {e}"))?;
        let (_, ca) = X509Certificate::from_der(&self.ca_der).map_err(|e| e.to_string())?;
        cert.verify_signature(Some(ca.public_key()))
            .map_err(|_| "server.crt is not signed by the fleet CA".to_string())?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err("server.key does not match server.crt".into());
        }
        let renew_at = OffsetDateTime::now_utc() + SERVER_RENEW_BEFORE;
        if cert.validity().not_after.timestamp() < renew_at.unix_timestamp() {
            return Err("server.crt expires soon".into());
        }
        if cert_server_names(&cert).as_ref() != Some(wanted) {
            return Err("the wanted server names changed".into());
        }
        let key = PrivatePkcs8KeyDer::from(key.serialize_der());
        Ok((der, key.into()))
    }

    /// Issues a new key pair and certificate for `id`. The key is returned, never stored.
    pub fn issue_device(&self, id: &DeviceId) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut issued = self.sign_device_key(id, &key)?;
        issued.key_pem = Some(key.serialize_pem());
        Ok(issued)
    }

    /// Signs a device's own CSR (PEM). Only the CSR's public key is used: the subject is
    /// CN = `id` and the extensions are Tellus's device profile, whatever the CSR asked for.
    pub fn sign_device_csr(&self, id: &DeviceId, csr_pem: &str) -> Result<IssuedCert, PkiError> {
        let der =
            CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|_| {
                PkiError::BadCsr(
                    "expected a PEM block \"-----BEGIN CERTIFICATE REQUEST-----\"".into(),
                )
            })?;
        self.sign_device_csr_der(id, &der)
    }

    fn sign_device_csr_der(&self, id: &DeviceId, der: &[u8]) -> Result<IssuedCert, PkiError> {
        // Parsed with x509-parser rather than rcgen's CertificateSigningRequestParams, which
        // rejects CSRs carrying extensions it does not know; we ignore them all anyway.
        let (_, csr) = X509CertificationRequest::from_der(der)
            .map_err(|e| PkiError::BadCsr(format!("malformed PKCS#10 request: {e}")))?;
        csr.verify_signature().map_err(|_| {
            PkiError::BadCsr("the request's signature does not verify with its own key".into())
        })?;
        let key = SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
            .map_err(|_| {
                PkiError::BadCsr("unsupported key type; use ECDSA P-256/P-384 or Ed25519".into())
            })?;
        self.sign_device_key(id, &key)
    }

    /// The device certificate profile, shared by both ways of getting one.
    fn sign_device_key(
        &self,
        id: &DeviceId,
        key: &impl PublicKeyData,
    ) -> Result<IssuedCert, PkiError> {
        let now = now_seconds();
        let not_after = now + self.device_validity;
        let serial = random_serial();
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(id.as_str());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = now - time::Duration::HOUR;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(key, &self.issuer)?;
        let serial_hex = hex::encode(serial);
        info!(device_id = %id, serial = %serial_hex, "issued a device certificate");
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: None,
            serial_hex,
            not_after_ms: not_after.unix_timestamp().saturating_mul(1000),
        })
    }

    /// The fleet CA's certificate revocation list in PEM ("X509 CRL"), listing `revoked`.
    ///
    /// thisUpdate is now and nextUpdate `next_update` later (1 second to 20 years); `number`
    /// is the CRL number, which the caller must increase with every list it publishes (a count
    /// of revocations or a timestamp will do). Entries carry their revocation time in whole
    /// seconds and no reason code: Tellus records that a certificate was revoked, not why. A
    /// serial that is not hex, or a revocation time before 1970, is
    /// [`PkiError::BadCertificate`].
    pub fn crl_pem(
        &self,
        revoked: &[Revoked],
        number: u64,
        next_update: Duration,
    ) -> Result<String, PkiError> {
        if next_update.is_zero() || next_update > MAX_CRL_NEXT_UPDATE {
            return Err(PkiError::BadCrlNextUpdate(next_update));
        }
        let after = time::Duration::try_from(next_update)
            .map_err(|_| PkiError::BadCrlNextUpdate(next_update))?;
        let this_update = now_seconds();
        let next_update = this_update + after;
        let params = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(revoked_cert_params)
                .collect::<Result<_, _>>()?,
            key_identifier_method: self.ca_key_id.clone(),
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }

    /// The gate's rustls configuration: TLS 1.2 and 1.3 with the ring provider, presenting
    /// `chain`/`key`, and requiring a client certificate that chains to the fleet CA or to one of `external_cas`.
    pub fn gate_tls_config(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        external_cas: &[CertificateDer<'static>],
    ) -> Result<ServerConfig, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        for ca in external_cas {
            roots.add(ca.clone())?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()?;
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        Ok(config)
    }
}

/// Who a verified client certificate says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject CN, which must be a valid [`DeviceId`].
    pub device: DeviceId,
    /// The certificate's serial number in lower-case hex, as [`IssuedCert::serial_hex`].
    pub serial_hex: String,
    /// The issuer's distinguished name, DER-encoded: which CA signed it.
    pub issuer_dn: Vec<u8>,
    /// End of the certificate's validity, in ms since the Unix epoch.
    pub not_after_ms: i64,
}

/// The identity a verified client certificate names: its subject CN (exactly one, a valid
/// [`DeviceId`]), its serial number and its issuer.
pub fn peer_identity(der: &[u8]) -> Result<PeerIdentity, PkiError> {
    let bad = PkiError::BadCertificate;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| bad(format!("malformed: {e}")))?;
    let mut cns = cert.subject().iter_common_name();
    let (Some(cn), None) = (cns.next(), cns.next()) else {
        return Err(bad("the subject must have exactly one CN".into()));
    };
    let cn = cn
        .as_str()
        .map_err(|_| bad("the subject CN is not a text string".into()))?;
    let device =
        DeviceId::parse(cn).map_err(|e| bad(format!("CN {cn:?} is not a device id: {e}")))?;
    Ok(PeerIdentity {
        device,
        serial_hex: hex::encode(cert.raw_serial()),
        issuer_dn: cert.issuer().as_raw().to_vec(),
        not_after_ms: cert.validity().not_after.timestamp().saturating_mul(1000),
    })
}

/// The SHA-256 fingerprint of a certificate, lower-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// What Tellus keeps of an external CA certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaInfo {
    /// SHA-256 fingerprint of the certificate, lower-case hex.
    pub id: String,
    /// The subject, as text.
    pub subject: String,
    /// The subject, DER-encoded: what the certificates it signs name as their issuer.
    pub subject_dn: Vec<u8>,
    pub der: CertificateDer<'static>,
}

impl Pki {
    /// Checks that `pem` is one CA certificate (basic constraints CA:TRUE) that is valid now
    /// and is not the fleet CA, and returns what the gate needs of it.
    pub fn inspect_ca(&self, pem: &str) -> Result<CaInfo, PkiError> {
        let bad = |why: &str| PkiError::BadCertificate(why.to_owned());
        let mut certs = CertificateDer::pem_slice_iter(pem.as_bytes());
        let der = match (certs.next(), certs.next()) {
            (Some(Ok(der)), None) => der,
            _ => return Err(bad("expected exactly one PEM certificate")),
        };
        let (_, cert) =
            X509Certificate::from_der(&der).map_err(|e| bad(&format!("malformed: {e}")))?;
        if !cert.is_ca() {
            return Err(bad(
                "the certificate is not a CA (basic constraints CA:TRUE)",
            ));
        }
        if !cert.validity().is_valid() {
            return Err(bad("the certificate is not valid now"));
        }
        let (_, fleet) =
            X509Certificate::from_der(&self.ca_der).map_err(|e| bad(&format!("fleet CA: {e}")))?;
        if cert.subject().as_raw() == fleet.subject().as_raw() {
            return Err(bad("the certificate has the fleet CA's subject"));
        }
        Ok(CaInfo {
            id: fingerprint(&der),
            subject: cert.subject().to_string(),
            subject_dn: cert.subject().as_raw().to_vec(),
            der: der.clone().into_owned(),
        })
    }
}

fn revoked_cert_params(revoked: &Revoked) -> Result<RevokedCertParams, PkiError> {
    let bad = |what: &str| {
        PkiError::BadCertificate(format!("revoked serial {:?}: {what}", revoked.serial_hex))
    };
    let serial = hex::decode(&revoked.serial_hex).map_err(|_| bad("not hex"))?;
    if serial.is_empty() {
        return Err(bad("empty"));
    }
    let seconds = revoked.revoked_at_ms.div_euclid(1000);
    let revocation_time = OffsetDateTime::from_unix_timestamp(seconds)
        .ok()
        .filter(|_| seconds >= 0)
        .ok_or_else(|| bad("revocation time out of range"))?;
    Ok(RevokedCertParams {
        serial_number: SerialNumber::from(serial),
        revocation_time,
        reason_code: None,
        invalidity_date: None,
    })
}

fn ca_params() -> CertificateParams {
    let now = now_seconds();
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(CA_CN);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    params.not_before = now - time::Duration::DAY;
    params.not_after = now + CA_VALIDITY;
    params
}

fn server_params(names: &BTreeSet<ServerName>) -> CertificateParams {
    let now = now_seconds();
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(SERVER_CN);
    params.subject_alt_names = names
        .iter()
        .filter_map(|name| match name {
            ServerName::Ip(ip) => Some(SanType::IpAddress(*ip)),
            // Every name was validated by wanted_server_names, so this never drops one.
            ServerName::Dns(dns) => dns.clone().try_into().ok().map(SanType::DnsName),
        })
        .collect();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    params.not_before = now - time::Duration::HOUR;
    params.not_after = now + SERVER_VALIDITY;
    params.use_authority_key_identifier_extension = true;
    params
}

fn wanted_server_names(extra: &[String]) -> Result<BTreeSet<ServerName>, PkiError> {
    let mut names = BTreeSet::from([
        ServerName::Dns("localhost".into()),
        ServerName::Ip(IpAddr::from([127, 0, 0, 1])),
        ServerName::Ip(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])),
    ]);
    match hostname::get().ok().and_then(|h| h.into_string().ok()) {
        Some(host) => match parse_server_name(&host) {
            Some(name @ ServerName::Dns(_)) => {
                names.insert(name);
            }
            _ => warn!(
                host,
                "the host name is not a valid DNS name; leaving it out"
            ),
        },
        None => warn!("cannot read the host name; leaving it out of the server certificate"),
    }
    for name in extra {
        let parsed =
            parse_server_name(name).ok_or_else(|| PkiError::BadServerName(name.clone()))?;
        names.insert(parsed);
    }
    Ok(names)
}

fn parse_server_name(name: &str) -> Option<ServerName> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Some(ServerName::Ip(ip));
    }
    let dns = rustls_pki_types::DnsName::try_from(name).ok()?;
    Some(ServerName::Dns(dns.as_ref().to_ascii_lowercase()))
}

/// The certificate's DNS and IP names, or None if it has names of any other kind.
fn cert_server_names(cert: &X509Certificate<'_>) -> Option<BTreeSet<ServerName>> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return None;
    };
    san.value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::DNSName(dns) => Some(ServerName::Dns(dns.to_ascii_lowercase())),
            GeneralName::IPAddress(b) => match <[u8; 4]>::try_from(*b) {
                Ok(v4) => Some(ServerName::Ip(IpAddr::from(v4))),
                Err(_) => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|v6| ServerName::Ip(v6.into())),
            },
            _ => None,
        })
        .collect()
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// 16 random bytes, first bit cleared so the DER integer is positive and second bit set so
/// it is always exactly 16 bytes long (126 random bits).
fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut serial);
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial
}

/// Now, truncated to whole seconds as X.509 stores it, so recorded times match the cert.
fn now_seconds() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now - time::Duration::nanoseconds(i64::from(now.nanosecond()))
}

fn io_err(path: &Path, source: io::Error) -> PkiError {
    PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates `dir` and its parents if missing, readable only by us (an existing one is left as is).
fn create_dir(dir: &Path) -> Result<(), PkiError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| io_err(dir, source))
}

fn read_optional(path: &Path) -> Result<Option<String>, PkiError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, e)),
    }
}

/// A name part no other writer uses at the same time: this process's id and a counter.
fn unique_suffix() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

/// Creates `path` with `contents` and `mode` unless it exists; `false` if it did. The file
/// appears whole or not at all (a fully written temp file is hard-linked into place, which
/// fails if the name is taken), so processes racing to create it agree on one content.
pub fn write_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<bool> {
    match put_in_place(path, contents, mode, |tmp, path| fs::hard_link(tmp, path)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes `contents` to `path` through a temp file created with `mode` in the same directory,
/// fsynced and renamed over `path`: readers see the old file or the whole new one, and a
/// secret is never readable by others, not even for an instant. Used for every key,
/// certificate and token Tellus writes.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    put_in_place(path, contents, mode, |tmp, path| fs::rename(tmp, path))
}

/// Writes `contents` to a temp file beside `path`, created with `mode` under a name that is
/// this writer's alone (`create_new` refuses a file planted under it), fsyncs it, puts it in
/// place with `place`, removes what is left of the temp file, and makes the directory
/// entry durable.
fn put_in_place(
    path: &Path,
    contents: &[u8],
    mode: u32,
    place: impl FnOnce(&Path, &Path) -> io::Result<()>,
) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", unique_suffix()));
    let placed = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()
        })
        .and_then(|()| place(&tmp, path));
    // Gone after a rename; the second name after a hard link; the wreck after a failure.
    let _ = fs::remove_file(&tmp);
    placed?;
    // Make the new name itself durable; failing that is not worth failing the write for.
    if let Err(e) = fs::File::open(dir).and_then(|d| d.sync_all()) {
        warn!(dir = %dir.display(), error = %e, "cannot fsync the directory");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::CertificateRevocationListDer;
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};
    use x509_parser::num_bigint::BigUint;
    use x509_parser::revocation_list::CertificateRevocationList;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn pki(dir: &Path) -> Pki {
        Pki::load_or_create(dir, 90 * DAY).unwrap()
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    fn der_of(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn processes_creating_the_ca_at_once_agree_on_one() {
        let dir = tempfile::tempdir().unwrap();
        let starts: Vec<_> = (0..8)
            .map(|_| {
                let dir = dir.path().to_owned();
                std::thread::spawn(move || {
                    Pki::load_or_create(&dir, Duration::from_secs(86_400))
                        .map(|p| p.ca_pem().to_owned())
                })
            })
            .collect();
        let pems: Vec<String> = starts
            .into_iter()
            .map(|s| s.join().unwrap().unwrap())
            .collect();
        assert!(pems.iter().all(|p| *p == pems[0]));
        let reloaded = Pki::load_or_create(dir.path(), Duration::from_secs(86_400)).unwrap();
        assert_eq!(reloaded.ca_pem(), pems[0]);
    }

    #[test]
    fn creates_the_ca_once_and_reloads_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = pki(dir.path());
        let again = pki(dir.path());
        assert_eq!(first.ca_der(), again.ca_der());
        assert_eq!(first.ca_pem(), again.ca_pem());
        let mode = fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let (_, ca) = X509Certificate::from_der(first.ca_der()).unwrap();
        assert!(ca.is_ca());
        let bc = ca.basic_constraints().unwrap().unwrap().value;
        assert_eq!(bc.path_len_constraint, Some(0));
        assert_eq!(
            ca.subject().iter_common_name().next().unwrap().as_str(),
            Ok(CA_CN)
        );
    }

    #[test]
    fn a_lost_ca_cert_is_rebuilt_from_its_key_but_a_lost_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let first = pki(dir.path());
        let device = first.issue_device(&id("dev-1")).unwrap();

        fs::remove_file(dir.path().join("ca.crt")).unwrap();
        let rebuilt = pki(dir.path());
        // Certificates issued before still chain to the rebuilt CA.
        let old_der = der_of(&device.cert_pem);
        let (_, old) = X509Certificate::from_der(&old_der).unwrap();
        let (_, ca) = X509Certificate::from_der(rebuilt.ca_der()).unwrap();
        old.verify_signature(Some(ca.public_key())).unwrap();

        fs::remove_file(dir.path().join("ca.key")).unwrap();
        let err = Pki::load_or_create(dir.path(), DAY).unwrap_err();
        assert!(matches!(err, PkiError::BadFile { .. }), "{err}");
    }

    #[test]
    fn refuses_an_absurd_device_validity() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [Duration::ZERO, Duration::MAX] {
            let err = Pki::load_or_create(dir.path(), bad).unwrap_err();
            assert!(matches!(err, PkiError::BadValidity(_)));
        }
    }

    fn subject_dn_of(der: &[u8]) -> Vec<u8> {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        cert.subject().as_raw().to_vec()
    }

    #[test]
    fn issues_a_device_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let issued = pki.issue_device(&id("sensor-01")).unwrap();
        assert!(issued.key_pem.as_deref().unwrap().contains("PRIVATE KEY"));

        let der = der_of(&issued.cert_pem);
        assert_eq!(
            peer_identity(&der).unwrap(),
            PeerIdentity {
                device: id("sensor-01"),
                serial_hex: issued.serial_hex.clone(),
                issuer_dn: subject_dn_of(pki.ca_der()),
                not_after_ms: issued.not_after_ms,
            }
        );
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(hex::encode(cert.raw_serial()), issued.serial_hex);
        assert_eq!(issued.serial_hex.len(), 32);
        assert_eq!(
            cert.validity().not_after.timestamp() * 1000,
            issued.not_after_ms
        );
        let expected = (OffsetDateTime::now_utc() + time::Duration::days(90)).unix_timestamp();
        assert!((cert.validity().not_after.timestamp() - expected).abs() < 5);
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(cert.key_usage().unwrap().unwrap().value.digital_signature());
        assert_eq!(
            cert.subject().iter().count(),
            1,
            "the subject is only the CN"
        );

        let other = pki.issue_device(&id("sensor-01")).unwrap();
        assert_ne!(other.serial_hex, issued.serial_hex);
    }

    #[test]
    fn signs_a_csr_with_the_id_as_subject_whatever_it_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        params.distinguished_name = common_name("someone-else");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();

        let issued = pki.sign_device_csr(&id("dev-7"), &csr).unwrap();
        assert!(issued.key_pem.is_none());
        let der = der_of(&issued.cert_pem);
        assert_eq!(peer_identity(&der).unwrap().device, id("dev-7"));
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(!cert.is_ca());
        assert!(cert.subject_alternative_name().unwrap().is_none());
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
    }

    #[test]
    fn refuses_bad_csrs() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let garbage =
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
        for bad in ["", "hello", garbage] {
            let err = pki.sign_device_csr(&id("d"), bad).unwrap_err();
            assert!(matches!(err, PkiError::BadCsr(_)), "{err}");
        }

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let mut tampered = csr.der().to_vec();
        let last = tampered.len() - 1;
        tampered[last] ^= 0x01;
        match pki.sign_device_csr_der(&id("d"), &tampered) {
            Err(PkiError::BadCsr(msg)) => assert!(msg.contains("signature"), "{msg}"),
            other => panic!("expected BadCsr, got {other:?}"),
        }
    }

    #[test]
    fn peer_identity_refuses_what_is_not_a_device_cert() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let bad = |der: &[u8]| matches!(peer_identity(der), Err(PkiError::BadCertificate(_)));
        assert!(bad(b"not der"));
        // The CA's CN has spaces: not a device id.
        assert!(bad(pki.ca_der()));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        assert!(bad(params.self_signed(&key).unwrap().der()));
        params.distinguished_name.push(DnType::CommonName, "a");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "o");
        assert!(!bad(params.self_signed(&key).unwrap().der()));
    }

    #[test]
    fn server_identity_is_reused_until_the_names_change() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let server_dir = dir.path().join("server");
        let (chain, _) = pki.server_identity(&server_dir, &[]).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(&chain[1], pki.ca_der());
        let mode = fs::metadata(server_dir.join("server.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let (again, _) = pki.server_identity(&server_dir, &[]).unwrap();
        assert_eq!(again[0], chain[0]);

        let extra = ["MQTT.example.com".to_string(), "10.0.0.5".to_string()];
        let (renamed, _) = pki.server_identity(&server_dir, &extra).unwrap();
        assert_ne!(renamed[0], chain[0]);
        let (_, cert) = X509Certificate::from_der(&renamed[0]).unwrap();
        let names = cert_server_names(&cert).unwrap();
        assert!(names.contains(&ServerName::Dns("mqtt.example.com".into())));
        assert!(names.contains(&ServerName::Ip(IpAddr::from([10, 0, 0, 5]))));
        assert!(names.contains(&ServerName::Dns("localhost".into())));
        assert!(names.contains(&ServerName::Ip("::1".parse().unwrap())));
        let (same, _) = pki.server_identity(&server_dir, &extra).unwrap();
        assert_eq!(same[0], renamed[0]);

        let err = pki
            .server_identity(&server_dir, &["not a name".into()])
            .unwrap_err();
        assert!(matches!(err, PkiError::BadServerName(_)));
    }

    #[test]
    fn server_identity_from_another_ca_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let (theirs, _) = pki(other_dir.path())
            .server_identity(other_dir.path(), &[])
            .unwrap();
        for file in ["server.crt", "server.key"] {
            fs::copy(other_dir.path().join(file), dir.path().join(file)).unwrap();
        }
        let (ours, _) = pki(dir.path()).server_identity(dir.path(), &[]).unwrap();
        assert_ne!(ours[0], theirs[0]);
    }

    /// Parses `pem` as a CRL, checks that the fleet CA signed it, and returns its DER.
    fn checked_crl(pki: &Pki, pem: &str) -> CertificateRevocationListDer<'static> {
        let der = CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (rest, crl) = CertificateRevocationList::from_der(&der).unwrap();
        assert!(rest.is_empty());
        let (_, ca) = X509Certificate::from_der(pki.ca_der()).unwrap();
        crl.verify_signature(ca.public_key()).unwrap();
        assert_eq!(crl.issuer(), ca.subject());
        let ski = ca
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0),
                _ => None,
            });
        let aki = crl
            .extensions()
            .iter()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref(),
                _ => None,
            });
        assert_eq!(aki.map(|id| id.0), ski);
        der
    }

    #[test]
    fn the_crl_lists_revoked_serials_and_is_signed_by_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let devices: Vec<_> = ["d1", "d2", "d3"]
            .into_iter()
            .map(|d| pki.issue_device(&id(d)).unwrap())
            .collect();
        let now_ms = OffsetDateTime::now_utc().unix_timestamp() * 1000;
        let revoked: Vec<_> = devices[..2]
            .iter()
            .enumerate()
            .map(|(i, issued)| Revoked {
                serial_hex: issued.serial_hex.clone(),
                revoked_at_ms: now_ms - 60_000 * i as i64 + 999,
            })
            .collect();
        let number = u64::MAX - 1; // the high bit set: must still be encoded as positive
        let pem = pki.crl_pem(&revoked, number, 7 * DAY).unwrap();
        assert!(pem.starts_with("-----BEGIN X509 CRL-----"));

        let der = checked_crl(&pki, &pem);
        let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
        assert_eq!(crl.crl_number(), Some(&BigUint::from(number)));
        let next = crl.next_update().unwrap().timestamp();
        assert_eq!(next - crl.last_update().timestamp(), 7 * 24 * 3600);
        let listed: Vec<_> = crl
            .iter_revoked_certificates()
            .map(|entry| {
                assert!(entry.reason_code().is_none());
                Revoked {
                    serial_hex: hex::encode(entry.raw_serial()),
                    revoked_at_ms: entry.revocation_date.timestamp() * 1000 + 999,
                }
            })
            .collect();
        assert_eq!(listed, revoked);

        // The mTLS gate's verifier (webpki) accepts this CRL and refuses exactly the revoked.
        let mut roots = RootCertStore::empty();
        roots.add(pki.ca_der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .with_crls([der])
            .build()
            .unwrap();
        let now = rustls_pki_types::UnixTime::now();
        for (i, issued) in devices.iter().enumerate() {
            let result = verifier.verify_client_cert(&der_of(&issued.cert_pem), &[], now);
            match result {
                Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)) => {
                    assert!(i < 2, "device {i} is not revoked")
                }
                Ok(_) => assert_eq!(i, 2, "device {i} is revoked"),
                Err(e) => panic!("device {i}: {e}"),
            }
        }

        // An extra check when OpenSSL is installed.
        fs::write(dir.path().join("crl.pem"), &pem).unwrap();
        let openssl = std::process::Command::new("openssl")
            .args([
                "crl", "-in", "crl.pem", "-CAfile", "ca.crt", "-noout", "-text",
            ])
            .current_dir(dir.path())
            .output();
        if let Ok(out) = openssl {
            let text = String::from_utf8_lossy(&out.stdout);
            let status = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{status}");
            assert!(status.contains("verify OK"), "{status}");
            for entry in &revoked {
                assert!(text.contains(&entry.serial_hex.to_uppercase()), "{text}");
            }
        }
    }

    #[test]
    fn an_empty_crl_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let pem = pki.crl_pem(&[], 0, DAY).unwrap();
        let der = checked_crl(&pki, &pem);
        let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
        assert_eq!(crl.iter_revoked_certificates().count(), 0);
        assert_eq!(crl.crl_number(), Some(&BigUint::from(0u8)));
    }

    #[test]
    fn crl_refuses_bad_entries_and_next_updates() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let entry = |serial: &str, at: i64| Revoked {
            serial_hex: serial.into(),
            revoked_at_ms: at,
        };
        for bad in [
            entry("xyz", 0),
            entry("", 0),
            entry("0a", -1),
            entry("0a", i64::MAX),
        ] {
            let err = pki.crl_pem(&[bad], 1, DAY).unwrap_err();
            assert!(matches!(err, PkiError::BadCertificate(_)), "{err}");
        }
        for bad in [Duration::ZERO, Duration::MAX] {
            let err = pki.crl_pem(&[], 1, bad).unwrap_err();
            assert!(matches!(err, PkiError::BadCrlNextUpdate(_)), "{err}");
        }
    }

    /// Runs a TLS handshake over an in-memory pipe and says whether the gate accepted the
    /// client, and which device it saw.
    async fn handshake(
        pki: &Pki,
        dir: &Path,
        client_cert: Option<&IssuedCert>,
    ) -> Option<DeviceId> {
        let (chain, key) = pki.server_identity(dir, &[]).unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(pki.gate_tls_config(chain, key, &[]).unwrap()));

        let mut roots = RootCertStore::empty();
        roots.add(pki.ca_der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let client = match client_cert {
            Some(issued) => {
                let key =
                    PrivateKeyDer::from_pem_slice(issued.key_pem.as_ref().unwrap().as_bytes());
                builder
                    .with_client_auth_cert(vec![der_of(&issued.cert_pem)], key.unwrap())
                    .unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        let connector = TlsConnector::from(Arc::new(client));

        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = async move {
            let mut tls = acceptor.accept(server_io).await.ok()?;
            let peer = tls.get_ref().1.peer_certificates()?.first()?.clone();
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.ok()?;
            tls.write_all(b"pong").await.ok()?;
            peer_identity(&peer).ok().map(|p| p.device)
        };
        let client = async move {
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, client_io).await.ok()?;
            tls.write_all(b"ping").await.ok()?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.ok()?;
            Some(buf)
        };
        let (seen, answer) = tokio::join!(server, client);
        assert_eq!(seen.is_some(), answer == Some(*b"pong"));
        seen
    }

    #[tokio::test]
    async fn the_gate_accepts_only_devices_of_this_fleet() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let ours = pki.issue_device(&id("sensor-01")).unwrap();
        assert_eq!(
            handshake(&pki, dir.path(), Some(&ours)).await,
            Some(id("sensor-01"))
        );

        let other_dir = tempfile::tempdir().unwrap();
        let stranger = Pki::load_or_create(other_dir.path(), DAY)
            .unwrap()
            .issue_device(&id("sensor-01"))
            .unwrap();
        assert_eq!(handshake(&pki, dir.path(), Some(&stranger)).await, None);
        assert_eq!(handshake(&pki, dir.path(), None).await, None);
    }
}
