//! Devices: register one (`POST /devices`), list them (optionally only those whose certificate
//! expires soon), get one with its certificates, and the life cycle: revoke certificates,
//! disable and enable, delete.
//!
//! Registration goes through `tellus_broker::provision::create_device`, the same code the CLI
//! uses. Without a `csr_pem` Tellus generates the key pair and returns the private key once
//! (it keeps no copy); with one it signs the device's own key and the answer has no `key_pem`.
//!
//! The life-cycle endpoints only write the registry. The gate enforces them: it polls the
//! registry's changes and closes an affected live connection within a second, and refuses
//! a revoked certificate, a disabled or a deleted device at the next connect.

use axum::{
    extract::State,
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tellus_broker::provision::{self, Provisioned};
use tellus_core::{
    now_ms, CertificateRecord, DeviceId, DeviceQuery, DeviceRecord, DeviceStatus, Registry,
    RegistryError, TimestampMs,
};

use super::{
    blocking, page, page_limit, parse_count, set_once,
    telemetry::fleet::{parse_tag, MAX_TAGS as MAX_TAG_FILTERS},
};
use crate::{
    extract, openapi as doc,
    timestamps::{self, rfc3339},
    ApiError, AppState,
};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDevice {
    /// The new device's id (A-Z a-z 0-9 . _ -, at most 64 characters).
    #[schema(example = "sensor-01")]
    pub id: String,
    /// The device's own PKCS#10 request; when absent, Tellus generates the key.
    pub csr_pem: Option<String>,
}

/// A registered device's first certificate, and its key when Tellus generated it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedDevice {
    pub id: DeviceId,
    pub cert_pem: String,
    /// Only when Tellus generated the key (no `csr_pem`): shown this once, never kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_pem: Option<String>,
    /// The fleet CA, which the device trusts for the server's certificate.
    pub ca_pem: String,
    /// Lower-case hex.
    pub cert_serial: String,
    #[schema(format = DateTime)]
    pub cert_not_after: String,
}

/// A device as lists and lookups show it. `cert_serial` and `cert_not_after` describe its
/// current certificate (of those not revoked, the one valid longest); both are `null` when
/// every certificate of the device is revoked.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeviceView {
    pub id: DeviceId,
    #[schema(format = DateTime)]
    pub created_at: String,
    pub status: DeviceStatus,
    pub tags: BTreeMap<String, String>,
    pub cert_serial: Option<String>,
    #[schema(format = DateTime)]
    pub cert_not_after: Option<String>,
}

impl TryFrom<DeviceRecord> for DeviceView {
    type Error = ApiError;
    fn try_from(d: DeviceRecord) -> Result<Self, ApiError> {
        Ok(DeviceView {
            created_at: rfc3339(d.created_at_ms)?,
            cert_not_after: d.cert_not_after_ms.map(rfc3339).transpose()?,
            id: d.id,
            status: d.status,
            tags: d.tags,
            cert_serial: d.cert_serial,
        })
    }
}

/// One certificate of a device; `revoked_at` is `null` while it is not revoked. `issuer` is
/// `"fleet"` for Tellus's own CA, or the id of the external CA that signed it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CertificateView {
    pub issuer: String,
    pub serial: String,
    #[schema(format = DateTime)]
    pub issued_at: String,
    #[schema(format = DateTime)]
    pub not_after: String,
    #[schema(format = DateTime)]
    pub revoked_at: Option<String>,
}

impl TryFrom<CertificateRecord> for CertificateView {
    type Error = ApiError;
    fn try_from(c: CertificateRecord) -> Result<Self, ApiError> {
        Ok(CertificateView {
            issued_at: rfc3339(c.issued_at_ms)?,
            not_after: rfc3339(c.not_after_ms)?,
            revoked_at: c.revoked_at_ms.map(rfc3339).transpose()?,
            issuer: c.issuer,
            serial: c.serial,
        })
    }
}

/// One device with every certificate it was issued, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeviceDetail {
    #[serde(flatten)]
    pub device: DeviceView,
    pub certificates: Vec<CertificateView>,
}

/// Register a device.
///
/// `{"id"}`: Tellus generates the key pair and answers with it once (it keeps no copy);
/// `{"id", "csr_pem"}`: Tellus signs the device's own key. 201 with the certificate, 409 if
/// the id is taken.
#[utoipa::path(
    post,
    path = "/devices",
    operation_id = "create_device",
    tag = "devices",
    request_body = CreateDevice,
    responses(
        (status = 201, description = "Registered: its certificate, and its key unless a CSR was given", body = CreatedDevice,
            headers(("Location" = String, description = "The device's URL"))),
        (status = 400, description = "Not a valid device id (`invalid_device_id`), CSR (`invalid_csr`) or body (`invalid_body`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 409, description = "The id is taken (`device_exists`), or registration is refused (`refused`)", body = doc::ErrorBody),
        (status = 413, response = doc::PayloadTooLarge),
        (status = 415, response = doc::UnsupportedMediaType),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["admin"]))
)]
pub async fn create(
    State(state): State<AppState>,
    extract::Json(body): extract::Json<CreateDevice>,
) -> Result<Response, ApiError> {
    let (pki, registry) = (state.pki.clone(), state.registry.clone());
    let Provisioned { device, cert } = blocking(move || {
        provision::create_device(&pki, registry.as_ref(), &body.id, body.csr_pem.as_deref())
    })
    .await?;
    let location = HeaderValue::from_str(&format!("/api/v1/devices/{}", device.id))
        .map_err(ApiError::internal)?;
    let created = CreatedDevice {
        cert_not_after: rfc3339(cert.not_after_ms)?,
        id: device.id,
        cert_pem: cert.cert_pem,
        key_pem: cert.key_pem,
        ca_pem: state.pki.ca_pem().to_owned(),
        cert_serial: cert.serial_hex,
    };
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(created),
    )
        .into_response())
}

/// The parameters of `GET /devices`, read from the query string by hand because `tag`
/// repeats.
#[derive(Debug, Default, PartialEq)]
pub struct ListQuery {
    pub limit: Option<usize>,
    /// The `next` of the previous page: list devices whose id sorts after this one.
    pub after: Option<String>,
    /// Only devices whose current certificate ends before now + this (`30d`, `12h`,
    /// `90days`; see `humantime`). Devices with no current certificate are left out.
    pub expiring_within: Option<String>,
    /// `tag=key:value`, repeatable: only devices carrying every tag given.
    pub tags: Vec<(String, String)>,
}

impl ListQuery {
    fn parse(pairs: Vec<(String, String)>) -> Result<ListQuery, ApiError> {
        let (mut limit, mut q) = (None, ListQuery::default());
        for (key, value) in pairs {
            match key.as_str() {
                "limit" => set_once(&mut limit, "limit", value)?,
                "after" => set_once(&mut q.after, "after", value)?,
                "expiring_within" => set_once(&mut q.expiring_within, "expiring_within", value)?,
                "tag" => q.tags.push(parse_tag(&value)?),
                other => {
                    return Err(ApiError::InvalidQuery(format!(
                        "unknown parameter {other:?}; expected limit, after, expiring_within or tag"
                    )))
                }
            }
        }
        if q.tags.len() > MAX_TAG_FILTERS {
            return Err(ApiError::InvalidQuery(format!(
                "at most {MAX_TAG_FILTERS} tag filters per request, found {}",
                q.tags.len()
            )));
        }
        q.limit = limit.as_deref().map(parse_count("limit")).transpose()?;
        Ok(q)
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeviceList {
    pub devices: Vec<DeviceView>,
    pub next: Option<DeviceId>,
}

/// List devices.
///
/// In id order, paged by `after`; `expiring_within` keeps only those whose current
/// certificate ends within that span, `tag` those carrying every tag given.
#[utoipa::path(
    get,
    path = "/devices",
    operation_id = "list_devices",
    tag = "devices",
    params(
        ("limit" = Option<usize>, Query, description = "Devices per page (default 100; more than 1000 is taken as 1000)", minimum = 1),
        ("after" = Option<DeviceId>, Query, description = "The `next` of the previous page: devices whose id sorts after this one"),
        ("expiring_within" = Option<String>, Query, description = "Only devices whose current certificate ends before now + this (`30d`, `12h`, `90days`); devices with no current certificate are left out", example = "30d"),
        ("tag" = Option<Vec<super::telemetry::fleet::TagFilter>>, Query, description = "Only devices carrying every tag given, as `key:value` (repeats; at most 32; the key ends at the first `:`)", example = json!(["site:lab"]), max_items = 32),
    ),
    responses(
        (status = 200, description = "A page of devices", body = DeviceList),
        (status = 400, description = "A bad parameter (`invalid_query`, `invalid_device_id`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn list(
    State(state): State<AppState>,
    extract::Query(pairs): extract::Query<Vec<(String, String)>>,
) -> Result<Json<DeviceList>, ApiError> {
    let q = ListQuery::parse(pairs)?;
    let limit = page_limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = q.after.as_deref().map(DeviceId::parse).transpose()?;
    let expiring_before = q
        .expiring_within
        .as_deref()
        .map(|within| expiring_before(now_ms(), within))
        .transpose()?;
    let registry = state.registry.clone();
    let rows = blocking(move || {
        registry.devices(&DeviceQuery {
            after: after.as_ref(),
            limit: limit + 1,
            expiring_before,
            tags: &q.tags,
        })
    })
    .await?;
    let (page, next) = page(rows, limit, |d| d.id.clone());
    let devices = page
        .into_iter()
        .map(DeviceView::try_from)
        .collect::<Result<_, _>>()?;
    Ok(Json(DeviceList { devices, next }))
}

/// `now` + the humantime duration `within`, in ms (saturating: a huge span lists every device
/// with a certificate).
fn expiring_before(now: TimestampMs, within: &str) -> Result<TimestampMs, ApiError> {
    let span = timestamps::duration("expiring_within", within, "30d or 12h")?;
    let span = TimestampMs::try_from(span.as_millis()).unwrap_or(TimestampMs::MAX);
    Ok(now.saturating_add(span))
}

/// Show a device.
///
/// With every certificate it was issued, newest first; 404 `device_not_found`.
#[utoipa::path(
    get,
    path = "/devices/{id}",
    operation_id = "get_device",
    tag = "devices",
    params(("id" = DeviceId, Path, description = "The device's id")),
    responses(
        (status = 200, description = "The device and its certificates", body = DeviceDetail),
        (status = 400, description = "Not a valid device id (`invalid_device_id`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such device (`device_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn get_one(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
) -> Result<Json<DeviceDetail>, ApiError> {
    let id = DeviceId::parse(&id)?;
    detail(&state, id, |registry, id| registry.device(id)).await
}

/// Most tags a device carries, and the longest key and value.
const MAX_TAGS: usize = 64;
const MAX_TAG_KEY: usize = 64;
const MAX_TAG_VALUE: usize = 256;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchDevice {
    /// Tags to set, or (`null`) to remove; the others stay. A key is 1 to 64 bytes without
    /// `:`, a value at most 256 bytes; a device carries at most 64 tags.
    pub tags: BTreeMap<String, Option<String>>,
}

/// Set or remove a device's tags.
///
/// `{"tags": {"site": "berlin", "old": null}}` sets and removes tags (fleet commands and
/// streams select devices by them); 200 with the device.
#[utoipa::path(
    patch,
    path = "/devices/{id}",
    operation_id = "patch_device",
    tag = "devices",
    params(("id" = DeviceId, Path, description = "The device's id")),
    request_body = PatchDevice,
    responses(
        (status = 200, description = "The device after the change", body = DeviceDetail),
        (status = 400, description = "Not a valid device id (`invalid_device_id`), or bad tags (`invalid_body`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such device (`device_not_found`)", body = doc::ErrorBody),
        (status = 413, response = doc::PayloadTooLarge),
        (status = 415, response = doc::UnsupportedMediaType),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["admin"]))
)]
pub async fn patch(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
    extract::Json(body): extract::Json<PatchDevice>,
) -> Result<Json<DeviceDetail>, ApiError> {
    let id = DeviceId::parse(&id)?;
    for (key, value) in &body.tags {
        if key.is_empty() || key.len() > MAX_TAG_KEY || key.contains(':') {
            return Err(ApiError::InvalidBody(format!(
                "tag key {key:?}: 1 to {MAX_TAG_KEY} bytes, without ':'"
            )));
        }
        if value.as_ref().is_some_and(|v| v.len() > MAX_TAG_VALUE) {
            return Err(ApiError::InvalidBody(format!(
                "tag {key:?}: a value is at most {MAX_TAG_VALUE} bytes"
            )));
        }
    }
    let changes = body.tags;
    let updated = detail(&state, id, move |registry, id| {
        let Some(device) = registry.device(id)? else {
            return Ok(None);
        };
        let after = changes
            .iter()
            .filter(|(k, v)| v.is_some() && !device.tags.contains_key(*k))
            .count()
            + device.tags.len();
        if after > MAX_TAGS {
            return Err(RegistryError::Refused(format!(
                "a device carries at most {MAX_TAGS} tags"
            )));
        }
        registry.set_tags(id, &changes)
    })
    .await;
    match updated {
        Err(ApiError::Refused(why)) => Err(ApiError::InvalidBody(why)),
        other => other,
    }
}

/// One device with its certificates, as `lookup` (run on a blocking thread) leaves it.
async fn detail(
    state: &AppState,
    id: DeviceId,
    lookup: impl FnOnce(&dyn Registry, &DeviceId) -> Result<Option<DeviceRecord>, RegistryError>
        + Send
        + 'static,
) -> Result<Json<DeviceDetail>, ApiError> {
    let registry = state.registry.clone();
    let (record, certificates) = blocking(move || {
        let Some(record) = lookup(registry.as_ref(), &id)? else {
            return Err(ApiError::DeviceNotFound(id));
        };
        let certificates = registry.certificates(&id)?;
        Ok((record, certificates))
    })
    .await?;
    Ok(Json(DeviceDetail {
        device: record.try_into()?,
        certificates: certificates
            .into_iter()
            .map(CertificateView::try_from)
            .collect::<Result<_, _>>()?,
    }))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    /// The certificate to revoke, in hex (any case, colons allowed; see
    /// [`tellus_core::serial::normalize`]); absent: all of them.
    pub serial: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RevokeAnswer {
    pub device: DeviceView,
    /// The serials this request revoked (not those revoked before).
    pub revoked: Vec<String>,
}

/// Revoke a device's certificates.
///
/// `{"serial": "<hex>"}` revokes one; no body, `{}` or `null` every certificate of the device.
/// 404 `device_not_found`, or
/// `certificate_not_found` if the serial is not one of this device's. Only the registry is
/// written: the gate reads the registry's changes and closes a connection that used a revoked
/// certificate, and the CRL lists it.
#[utoipa::path(
    post,
    path = "/devices/{id}/revoke",
    operation_id = "revoke_device",
    tag = "devices",
    params(("id" = DeviceId, Path, description = "The device's id")),
    request_body(content = Option<RevokeBody>, description = "Which certificate; none: all of them"),
    responses(
        (status = 200, description = "The device, and the serials this request revoked", body = RevokeAnswer),
        (status = 400, description = "Not a valid device id (`invalid_device_id`) or serial (`invalid_body`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such device (`device_not_found`), or the serial is not one of its certificates (`certificate_not_found`)", body = doc::ErrorBody),
        (status = 413, response = doc::PayloadTooLarge),
        (status = 415, response = doc::UnsupportedMediaType),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["admin"]))
)]
pub async fn revoke(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
    extract::OptionalJson(body): extract::OptionalJson<RevokeBody>,
) -> Result<Json<RevokeAnswer>, ApiError> {
    let id = DeviceId::parse(&id)?;
    let serial = body
        .unwrap_or_default()
        .serial
        .map(|s| tellus_core::serial::normalize(&s))
        .transpose()
        .map_err(|e| ApiError::InvalidBody(format!("serial: {e}")))?;
    let registry = state.registry.clone();
    let (record, revoked) = blocking(move || {
        let Some(revoked) = registry.revoke(&id, serial.as_deref(), now_ms())? else {
            return Err(ApiError::DeviceNotFound(id));
        };
        match registry.device(&id)? {
            Some(record) => Ok((record, revoked)),
            // Deleted in the meantime.
            None => Err(ApiError::DeviceNotFound(id)),
        }
    })
    .await?;
    Ok(Json(RevokeAnswer {
        device: record.try_into()?,
        revoked,
    }))
}

/// Disable a device.
///
/// The gate refuses the device (and closes its connection) until it is enabled again; its
/// certificates stay valid.
#[utoipa::path(
    post,
    path = "/devices/{id}/disable",
    operation_id = "disable_device",
    tag = "devices",
    params(("id" = DeviceId, Path, description = "The device's id")),
    responses(
        (status = 200, description = "The device, disabled", body = DeviceView),
        (status = 400, description = "Not a valid device id (`invalid_device_id`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such device (`device_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["admin"]))
)]
pub async fn disable(
    state: State<AppState>,
    id: extract::Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    set_status(state, id, DeviceStatus::Disabled).await
}

/// Enable a device again.
#[utoipa::path(
    post,
    path = "/devices/{id}/enable",
    operation_id = "enable_device",
    tag = "devices",
    params(("id" = DeviceId, Path, description = "The device's id")),
    responses(
        (status = 200, description = "The device, enabled", body = DeviceView),
        (status = 400, description = "Not a valid device id (`invalid_device_id`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such device (`device_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["admin"]))
)]
pub async fn enable(
    state: State<AppState>,
    id: extract::Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    set_status(state, id, DeviceStatus::Enabled).await
}

async fn set_status(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
    status: DeviceStatus,
) -> Result<Json<DeviceView>, ApiError> {
    let id = DeviceId::parse(&id)?;
    let registry = state.registry.clone();
    let record = blocking(move || match registry.set_status(&id, status, now_ms())? {
        Some(record) => Ok(record),
        None => Err(ApiError::DeviceNotFound(id)),
    })
    .await?;
    Ok(Json(record.try_into()?))
}

/// Delete a device.
///
/// 204. Its certificates stay on record, revoked, so the CRL keeps listing them until they
/// expire; its telemetry stays in the store.
#[utoipa::path(
    delete,
    path = "/devices/{id}",
    operation_id = "delete_device",
    tag = "devices",
    params(("id" = DeviceId, Path, description = "The device's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Not a valid device id (`invalid_device_id`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such device (`device_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["admin"]))
)]
pub async fn delete(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = DeviceId::parse(&id)?;
    let registry = state.registry.clone();
    let device = id.clone();
    let deleted = blocking(move || {
        if registry.delete_device(&id, now_ms())? {
            Ok(StatusCode::NO_CONTENT)
        } else {
            Err(ApiError::DeviceNotFound(id))
        }
    })
    .await?;
    // What the routing core keeps for it goes too.
    state.devices.forget(&device).await;
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_list_takes_repeated_tags_and_refuses_the_rest() {
        let q = ListQuery::parse(pairs(&[
            ("tag", "site:berlin"),
            ("limit", "5"),
            ("tag", "url:http://x"),
            ("after", "d-1"),
        ]))
        .unwrap();
        assert_eq!(
            q,
            ListQuery {
                limit: Some(5),
                after: Some("d-1".into()),
                expiring_within: None,
                tags: vec![
                    ("site".into(), "berlin".into()),
                    ("url".into(), "http://x".into())
                ],
            }
        );
        assert_eq!(ListQuery::parse(Vec::new()).unwrap(), ListQuery::default());
        let many: Vec<_> = (0..=MAX_TAG_FILTERS).map(|_| ("tag", "a:b")).collect();
        for bad in [
            pairs(&[("tag", "nocolon")]),
            pairs(&[("tag", ":v")]),
            pairs(&[("limit", "ten")]),
            pairs(&[("after", "a"), ("after", "b")]),
            pairs(&[("colour", "red")]),
            pairs(&many),
        ] {
            assert!(
                matches!(
                    ListQuery::parse(bad.clone()),
                    Err(ApiError::InvalidQuery(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn expiring_within_takes_humantime_durations() {
        assert_eq!(
            expiring_before(1_000, "30d").unwrap(),
            1_000 + 30 * 86_400_000
        );
        assert_eq!(expiring_before(0, "12h").unwrap(), 12 * 3_600_000);
        assert_eq!(expiring_before(0, "90days").unwrap(), 90 * 86_400_000);
        assert_eq!(expiring_before(5, "1000000000years").unwrap(), i64::MAX);
        for bad in ["", "soon", "30", "-1d"] {
            assert!(
                matches!(expiring_before(0, bad), Err(ApiError::InvalidQuery(_))),
                "{bad}"
            );
        }
    }
}
