//! The PKI endpoints: the fleet CA's certificate revocation list (`GET /pki/crl.pem`) and
//! the external CAs trusted beside the fleet CA ("bring your own CA": `/pki/cas`).
//!
//! The CRL is built on every request from the registry (what is revoked and not yet expired)
//! and signed by the fleet CA; nothing is cached. Tellus itself does not need the CRL (the
//! gate checks the registry); it is for relying parties other than the gate, such as other
//! brokers in front of the fleet. It is signed public data, so it is the one endpoint served
//! without the bearer token (see [`crate::auth`]).
//!
//! The CRL number is the time the CRL was generated, in milliseconds since the Unix epoch.
//! Two CRLs may differ without any registry change in between (an expired certificate drops
//! off), so a number derived from the registry could name two different lists; the clock
//! gives each generated CRL its own, growing number (short of two CRLs in one millisecond,
//! which then list the same thing anyway, or the clock being set back).
//!
//! An external CA is checked by `Pki::inspect_ca` (one CA certificate, valid now, not the
//! fleet CA) and written to the registry; the gate reads the registry's `TrustChanged` change
//! and rebuilds what it trusts. Only the certificate is kept: the registry stores it
//! re-encoded from its DER, so whatever else the submitted PEM held (a private key, say) is
//! dropped. The gate traces a device certificate to its CA by the certificate's issuer name,
//! so no two trusted CAs may share a subject name (`ca_subject_taken`). With `auto_register`,
//! a device presenting a valid certificate from the CA is registered on its first connection,
//! with the CA's `tags`.

use std::{collections::BTreeMap, time::Duration};

use axum::{
    extract::State,
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};
use tellus_broker::pki::{CaInfo, Pki, PkiError, Revoked};
use tellus_core::{now_ms, CaRecord, Registry};

use super::blocking;
use crate::{base64, extract, openapi as doc, timestamps::rfc3339, ApiError, AppState};

/// How long a relying party may use a CRL before fetching a new one.
pub const CRL_NEXT_UPDATE: Duration = Duration::from_secs(24 * 3600);

/// At most this many tags on a CA.
pub const MAX_TAGS: usize = 64;
/// A tag key is 1 to this many characters.
pub const MAX_TAG_KEY_CHARS: usize = 64;
/// A tag value is at most this many characters.
pub const MAX_TAG_VALUE_CHARS: usize = 256;

/// The fleet CA's certificate revocation list.
///
/// PEM, as `application/x-pem-file`, signed by the fleet CA and built on each request. No
/// token needed: it is signed public data, for other brokers in front of the fleet.
#[utoipa::path(
    get,
    path = "/pki/crl.pem",
    operation_id = "crl",
    tag = "pki",
    responses(
        (status = 200, description = "The CRL", content_type = "application/x-pem-file", body = String),
        (status = 500, response = doc::Internal),
    )
)]
pub async fn crl(State(state): State<AppState>) -> Result<Response, ApiError> {
    let (registry, pki) = (state.registry.clone(), state.pki.clone());
    let pem = blocking(move || {
        let now = now_ms();
        let revoked: Vec<Revoked> = registry
            .revoked(now)?
            .into_iter()
            .map(|c| Revoked {
                serial_hex: c.serial,
                // Always set for what `revoked` returns; if not, list it anyway.
                revoked_at_ms: c.revoked_at_ms.unwrap_or_default(),
            })
            .collect();
        // Before 1970 only with a broken clock; the CRL is still valid with number 0.
        let number = u64::try_from(now).unwrap_or(0);
        pki.crl_pem(&revoked, number, CRL_NEXT_UPDATE)
            .map_err(ApiError::internal)
    })
    .await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-pem-file"),
        )],
        pem,
    )
        .into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCa {
    /// The CA certificate, PEM.
    pub pem: String,
    /// Register a device on its first connection with a valid certificate from this CA.
    #[serde(default)]
    pub auto_register: bool,
    /// Tags for the devices registered that way (at most 64; keys 1 to 64 characters,
    /// values at most 256).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// An external CA as the list shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CaView {
    /// The SHA-256 fingerprint of the certificate, lower-case hex.
    pub id: String,
    pub subject: String,
    pub auto_register: bool,
    pub tags: BTreeMap<String, String>,
    #[schema(format = DateTime)]
    pub created_at: String,
}

impl TryFrom<&CaRecord> for CaView {
    type Error = ApiError;
    fn try_from(ca: &CaRecord) -> Result<Self, ApiError> {
        Ok(CaView {
            id: ca.id.clone(),
            subject: ca.subject.clone(),
            auto_register: ca.auto_register,
            tags: ca.tags.clone(),
            created_at: rfc3339(ca.created_at_ms)?,
        })
    }
}

/// One external CA with its certificate.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CaDetail {
    #[serde(flatten)]
    pub ca: CaView,
    pub pem: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CaList {
    pub cas: Vec<CaView>,
}

/// Trust an external CA.
///
/// 201 with the CA (without its PEM) and its `Location`. 400
/// `invalid_ca` if the PEM is not one CA certificate valid now (or is the fleet CA), 400
/// `invalid_body` for bad tags, 409 `ca_exists` if it is registered already, 409
/// `ca_subject_taken` if another registered CA has the same subject name.
#[utoipa::path(
    post,
    path = "/pki/cas",
    operation_id = "create_ca",
    tag = "pki",
    request_body = CreateCa,
    responses(
        (status = 201, description = "The CA, trusted", body = CaView,
            headers(("Location" = String, description = "The CA's URL"))),
        (status = 400, description = "Not one CA certificate valid now (`invalid_ca`), or bad tags (`invalid_body`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 409, description = "Registered already (`ca_exists`), or another CA has its subject (`ca_subject_taken`)", body = doc::ErrorBody),
        (status = 413, response = doc::PayloadTooLarge),
        (status = 415, response = doc::UnsupportedMediaType),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["admin"]))
)]
pub async fn create_ca(
    State(state): State<AppState>,
    extract::Json(body): extract::Json<CreateCa>,
) -> Result<Response, ApiError> {
    check_tags(&body.tags)?;
    let (pki, registry) = (state.pki.clone(), state.registry.clone());
    let record = blocking(move || register_ca(&pki, registry.as_ref(), body)).await?;
    let location = HeaderValue::from_str(&format!("/api/v1/pki/cas/{}", record.id))
        .map_err(ApiError::internal)?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(CaView::try_from(&record)?),
    )
        .into_response())
}

/// Checks and records the CA. The subject check runs again once the CA is recorded, because
/// two requests (or two Tellus nodes sharing the registry) may register CAs with one subject
/// at once: a newcomer that finds a rival takes itself back out, so at worst both are refused
/// and neither stays.
fn register_ca(pki: &Pki, registry: &dyn Registry, body: CreateCa) -> Result<CaRecord, ApiError> {
    let info = pki.inspect_ca(&body.pem).map_err(|e| match e {
        PkiError::BadCertificate(why) => ApiError::InvalidCa(why),
        e => ApiError::internal(e),
    })?;
    if let Some(rival) = same_subject(pki, registry, &info)? {
        return Err(subject_taken(&info, rival));
    }
    let record = CaRecord {
        pem: pem_certificate(&info.der),
        id: info.id.clone(),
        subject: info.subject.clone(),
        auto_register: body.auto_register,
        tags: body.tags,
        created_at_ms: now_ms(),
    };
    registry.add_ca(&record)?;
    if let Some(rival) = same_subject(pki, registry, &info)? {
        registry.delete_ca(&record.id, now_ms())?;
        return Err(subject_taken(&info, rival));
    }
    tracing::info!(
        ca = %record.id,
        subject = %record.subject,
        auto_register = record.auto_register,
        "external CA registered"
    );
    Ok(record)
}

/// A registered CA other than `info` itself with the same subject name. A registered CA that
/// no longer passes `inspect_ca` (it expired, say) is not trusted by the gate, so it does not
/// count.
fn same_subject(
    pki: &Pki,
    registry: &dyn Registry,
    info: &CaInfo,
) -> Result<Option<CaRecord>, ApiError> {
    Ok(registry.cas()?.into_iter().find(|ca| {
        ca.id != info.id
            && pki
                .inspect_ca(&ca.pem)
                .is_ok_and(|other| other.subject_dn == info.subject_dn)
    }))
}

fn subject_taken(info: &CaInfo, rival: CaRecord) -> ApiError {
    ApiError::CaSubjectTaken {
        subject: info.subject.clone(),
        id: rival.id,
    }
}

/// A certificate as PEM: base64 of the DER in lines of 64 characters.
fn pem_certificate(der: &[u8]) -> String {
    let b64 = base64::encode(der);
    let mut pem = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Base64 is ASCII, so any chunk of it is UTF-8.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

fn check_tags(tags: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if tags.len() > MAX_TAGS {
        return Err(ApiError::InvalidBody(format!(
            "tags: at most {MAX_TAGS} tags, found {}",
            tags.len()
        )));
    }
    for (key, value) in tags {
        if !(1..=MAX_TAG_KEY_CHARS).contains(&key.chars().count()) {
            return Err(ApiError::InvalidBody(format!(
                "tags: a key must be 1 to {MAX_TAG_KEY_CHARS} characters, found {key:?}"
            )));
        }
        if value.chars().count() > MAX_TAG_VALUE_CHARS {
            return Err(ApiError::InvalidBody(format!(
                "tags: the value of {key:?} is longer than {MAX_TAG_VALUE_CHARS} characters"
            )));
        }
    }
    Ok(())
}

/// A CA id as the registry writes it: lower-case hex without separators, so a fingerprint
/// copied from `openssl x509 -fingerprint -sha256` (upper case, colons) finds its CA.
fn normalize_id(id: &str) -> String {
    id.trim().replace(':', "").to_ascii_lowercase()
}

/// List the external CAs.
///
/// Every one, oldest first, without PEMs.
#[utoipa::path(
    get,
    path = "/pki/cas",
    operation_id = "list_cas",
    tag = "pki",
    responses(
        (status = 200, description = "The external CAs", body = CaList),
        doc::Guarded,
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn list_cas(State(state): State<AppState>) -> Result<Json<CaList>, ApiError> {
    let registry = state.registry.clone();
    let cas = blocking(move || registry.cas()).await?;
    let cas = cas.iter().map(CaView::try_from).collect::<Result<_, _>>()?;
    Ok(Json(CaList { cas }))
}

/// Show an external CA.
///
/// With its PEM; 404 `ca_not_found`.
#[utoipa::path(
    get,
    path = "/pki/cas/{id}",
    operation_id = "get_ca",
    tag = "pki",
    params(("id" = String, Path, description = "The CA's SHA-256 fingerprint in hex (any case, colons allowed)")),
    responses(
        (status = 200, description = "The CA", body = CaDetail),
        (status = 400, description = "A path that is not UTF-8 once decoded (`invalid_path`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such CA (`ca_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn get_ca(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
) -> Result<Json<CaDetail>, ApiError> {
    let wanted = normalize_id(&id);
    let registry = state.registry.clone();
    let ca = blocking(move || registry.cas()).await?;
    let Some(ca) = ca.into_iter().find(|ca| ca.id == wanted) else {
        return Err(ApiError::CaNotFound(id));
    };
    Ok(Json(CaDetail {
        ca: CaView::try_from(&ca)?,
        pem: ca.pem,
    }))
}

/// Stop trusting an external CA.
///
/// 204, or 404 `ca_not_found`. The gate stops trusting the CA when it reads the change;
/// devices it registered stay registered (delete or disable them as any other).
#[utoipa::path(
    delete,
    path = "/pki/cas/{id}",
    operation_id = "delete_ca",
    tag = "pki",
    params(("id" = String, Path, description = "The CA's SHA-256 fingerprint in hex (any case, colons allowed)")),
    responses(
        (status = 204, description = "No longer trusted"),
        (status = 400, description = "A path that is not UTF-8 once decoded (`invalid_path`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such CA (`ca_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["admin"]))
)]
pub async fn delete_ca(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
) -> Result<StatusCode, ApiError> {
    let wanted = normalize_id(&id);
    let registry = state.registry.clone();
    let deleted = blocking(move || registry.delete_ca(&wanted, now_ms())).await?;
    if !deleted {
        return Err(ApiError::CaNotFound(id));
    }
    tracing::info!(ca = %normalize_id(&id), "external CA deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_bounded() {
        let tags = |pairs: &[(String, String)]| pairs.iter().cloned().collect();
        assert!(check_tags(&BTreeMap::new()).is_ok());
        let ok = tags(&[("k".repeat(64), "é".repeat(256))]);
        assert!(check_tags(&ok).is_ok());
        let many: BTreeMap<_, _> = (0..=MAX_TAGS)
            .map(|n| (n.to_string(), String::new()))
            .collect();
        for bad in [
            tags(&[(String::new(), "v".into())]),
            tags(&[("k".repeat(65), "v".into())]),
            tags(&[("k".into(), "v".repeat(257))]),
            many,
        ] {
            assert!(matches!(check_tags(&bad), Err(ApiError::InvalidBody(_))));
        }
    }

    #[test]
    fn ids_are_normalized_to_lower_case_hex() {
        assert_eq!(normalize_id(" AB:cd:01 "), "abcd01");
    }

    #[test]
    fn pem_lines_are_64_characters() {
        let der = [7; 100];
        let pem = pem_certificate(&der);
        let lines: Vec<_> = pem.lines().collect();
        assert_eq!(lines.first(), Some(&"-----BEGIN CERTIFICATE-----"));
        assert_eq!(lines.last(), Some(&"-----END CERTIFICATE-----"));
        let body = &lines[1..lines.len() - 1];
        assert_eq!(
            body.iter().map(|l| l.len()).collect::<Vec<_>>(),
            [64, 64, 8]
        );
        assert_eq!(body.concat(), base64::encode(&der));
    }
}
