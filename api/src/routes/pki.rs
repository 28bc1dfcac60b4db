//! The fleet CA's certificate revocation list: `GET /pki/crl.pem`.
//!
//! Built on every request from the registry (what is revoked and not yet expired) and signed
//! by the fleet CA; nothing is cached. The CRL number is the registry's newest change
//! sequence number, which only grows, so a CRL issued after a revocation always has a higher
//! number than one issued before it. Tellus itself does not need the CRL (the gate checks the
//! registry); it is for relying parties other than the gate.

use std::time::Duration;

use axum::{
    extract::State,
    http::{header, HeaderValue},
    response::{IntoResponse, Response},
};
use tellus_broker::pki::Revoked;
use tellus_core::now_ms;

use super::blocking;
use crate::{ApiError, AppState};

/// How long a relying party may use a CRL before fetching a new one.
pub const CRL_NEXT_UPDATE: Duration = Duration::from_secs(24 * 3600);

/// `GET /api/v1/pki/crl.pem`: the CRL in PEM, as `application/x-pem-file`.
pub async fn crl(State(state): State<AppState>) -> Result<Response, ApiError> {
    let (registry, pki) = (state.registry.clone(), state.pki.clone());
    let pem = blocking(move || {
        let revoked: Vec<Revoked> = registry
            .revoked(now_ms())?
            .into_iter()
            .map(|c| Revoked {
                serial_hex: c.serial,
                // Always set for what `revoked` returns; if not, list it anyway.
                revoked_at_ms: c.revoked_at_ms.unwrap_or_default(),
            })
            .collect();
        let number = u64::try_from(registry.last_change()?).unwrap_or(0);
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
