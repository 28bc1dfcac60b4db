//! Devices: register one (`POST /devices`), list them, get one.
//!
//! Registration goes through `tellus_broker::provision::create_device`, the same code the CLI
//! uses. Without a `csr_pem` Tellus generates the key pair and returns the private key once
//! (it keeps no copy); with one it signs the device's own key and the answer has no `key_pem`.

use axum::{
    extract::State,
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};
use tellus_broker::provision::{self, Provisioned};
use tellus_core::{DeviceId, DeviceRecord};

use super::{blocking, page_limit, split_page};
use crate::{extract, timestamps::rfc3339, ApiError, AppState};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDevice {
    pub id: String,
    /// The device's own PKCS#10 request; when absent, Tellus generates the key.
    pub csr_pem: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CreatedDevice {
    pub id: DeviceId,
    pub cert_pem: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_pem: Option<String>,
    pub ca_pem: String,
    pub cert_serial: String,
    pub cert_not_after: String,
}

/// A device as lists and lookups show it.
#[derive(Debug, Serialize)]
pub struct DeviceView {
    pub id: DeviceId,
    pub created_at: String,
    pub cert_serial: String,
    pub cert_not_after: String,
}

impl TryFrom<DeviceRecord> for DeviceView {
    type Error = ApiError;
    fn try_from(d: DeviceRecord) -> Result<Self, ApiError> {
        Ok(DeviceView {
            created_at: rfc3339(d.created_at_ms)?,
            cert_not_after: rfc3339(d.cert_not_after_ms)?,
            id: d.id,
            cert_serial: d.cert_serial,
        })
    }
}

/// `POST /api/v1/devices`: 201 with the certificate (and key), 409 if the id is taken.
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub limit: Option<usize>,
    /// The `next` of the previous page: list devices whose id sorts after this one.
    pub after: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DeviceList {
    pub devices: Vec<DeviceView>,
    pub next: Option<DeviceId>,
}

/// `GET /api/v1/devices?limit=&after=`: devices in id order.
pub async fn list(
    State(state): State<AppState>,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<DeviceList>, ApiError> {
    let limit = page_limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = q.after.as_deref().map(DeviceId::parse).transpose()?;
    let registry = state.registry.clone();
    let rows = blocking(move || registry.devices(after.as_ref(), limit + 1)).await?;
    let (page, more) = split_page(rows, limit);
    let next = if more {
        page.last().map(|d| d.id.clone())
    } else {
        None
    };
    let devices = page
        .into_iter()
        .map(DeviceView::try_from)
        .collect::<Result<_, _>>()?;
    Ok(Json(DeviceList { devices, next }))
}

/// `GET /api/v1/devices/{id}`: one device, or 404 `device_not_found`.
pub async fn get_one(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    let id = DeviceId::parse(&id)?;
    let record = find(&state, id).await?;
    Ok(Json(record.try_into()?))
}

/// The registered device `id`, or [`ApiError::DeviceNotFound`].
pub(crate) async fn find(state: &AppState, id: DeviceId) -> Result<DeviceRecord, ApiError> {
    let registry = state.registry.clone();
    blocking(move || match registry.device(&id)? {
        Some(d) => Ok(d),
        None => Err(ApiError::DeviceNotFound(id)),
    })
    .await
}
