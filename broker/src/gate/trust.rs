//! What the gate trusts: the fleet CA and the external CAs registered beside it.
//!
//! [`Trust`] holds the TLS acceptor (whose client verifier knows every trusted CA) and, for
//! each CA, the issuer name its device certificates carry, so that a verified certificate
//! can be traced to its CA: its serial is unique only per CA, and an external CA may
//! register its devices on their first connection. The gate swaps in a new `Trust` when the
//! registry says the set of CAs changed.

use std::{collections::BTreeMap, sync::Arc};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tellus_core::{CaRecord, FLEET_ISSUER};
use tokio_rustls::TlsAcceptor;
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use crate::pki::{Pki, PkiError};

/// A CA whose device certificates the gate accepts.
#[derive(Debug, Clone)]
pub struct Issuer {
    /// [`FLEET_ISSUER`] or the external CA's id.
    pub id: String,
    /// The CA's subject, DER-encoded, as its certificates name their issuer.
    dn: Vec<u8>,
    /// Tags for devices registered on their first connection; `None` if the CA does not
    /// register devices.
    pub auto_register: Option<BTreeMap<String, String>>,
}

/// The gate's trust at one moment.
pub struct Trust {
    pub acceptor: TlsAcceptor,
    issuers: Vec<Issuer>,
}

/// The server's own certificate chain and key, kept to rebuild the TLS configuration.
pub struct ServerIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Trust {
    /// Trust in the fleet CA and in `cas`. A CA that does not parse (it was checked when it
    /// was registered) is left out.
    pub fn build(pki: &Pki, server: &ServerIdentity, cas: &[CaRecord]) -> Result<Trust, PkiError> {
        let mut issuers = vec![Issuer {
            id: FLEET_ISSUER.to_owned(),
            dn: subject_dn(pki.ca_der()).unwrap_or_default(),
            auto_register: None,
        }];
        let mut roots = Vec::new();
        for ca in cas {
            let Ok(info) = pki.inspect_ca(&ca.pem) else {
                tracing::warn!(ca = %ca.id, "a registered CA no longer parses; not trusted");
                continue;
            };
            issuers.push(Issuer {
                id: ca.id.clone(),
                dn: info.subject_dn,
                auto_register: ca.auto_register.then(|| ca.tags.clone()),
            });
            roots.push(info.der);
        }
        let config = pki.gate_tls_config(server.chain.clone(), server.key.clone_key(), &roots)?;
        Ok(Trust {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            issuers,
        })
    }

    /// The trusted CA whose subject is `issuer_dn`.
    pub fn issuer(&self, issuer_dn: &[u8]) -> Option<&Issuer> {
        self.issuers.iter().find(|i| i.dn == issuer_dn)
    }
}

fn subject_dn(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(cert.subject().as_raw().to_vec())
}
