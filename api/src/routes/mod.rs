//! The `/api/v1` endpoints, one module per resource. [`v1`] holds those behind the bearer
//! token, [`public`] the one served without it:
//!
//! | route | module | token |
//! |---|---|---|
//! | `POST /devices`, `GET /devices` (`?expiring_within=30d`), `GET /devices/{id}` | [`devices`] | yes |
//! | `POST /devices/{id}/revoke`, `/disable`, `/enable`; `PATCH /devices/{id}` (tags); `DELETE /devices/{id}` | [`devices`] | yes |
//! | `POST /devices/{id}/commands` (`?wait=10s`), `GET /devices/{id}/commands`, `GET`/`DELETE /devices/{id}/commands/{command}` | [`commands`] | yes |
//! | `GET /devices/{id}/presence`, `GET /devices/{id}/connections`, `GET /presence` | [`presence`] | yes |
//! | `GET /devices/{id}/state`, `PATCH /devices/{id}/state` | [`state`] | yes |
//! | `GET /devices/{id}/telemetry` (`metric=` or `metrics=a,b`; `step=`, `agg=`, `max_points=`, `format=csv`) | [`telemetry`] | yes |
//! | `GET /devices/{id}/latest` | [`telemetry`] | yes |
//! | `GET /telemetry/latest?metric=&tag=key:value` (the fleet view) | [`telemetry::fleet`] | yes |
//! | `GET /deadletters`, `GET /deadletters/{id}` | [`deadletters`] | yes |
//! | `GET /pki/crl.pem` | [`pki`] | **no**: signed public data, for other brokers |
//! | `POST /pki/cas`, `GET /pki/cas`, `GET /pki/cas/{id}`, `DELETE /pki/cas/{id}` | [`pki`] | yes |
//! | `GET /audit` | [`audit`] | yes |
//! | `POST /commands`, `GET /commands`, `GET /commands/{job}`, `GET /commands/{job}/devices`, `POST /commands/{job}/abort` | [`jobs`] | yes |
//! | `POST /rules`, `GET /rules`, `GET`/`PUT`/`DELETE /rules/{id}`, `POST /rules/{id}/enable`, `/disable` | [`rules`] | yes |
//! | `POST /rules/test` (a dry run over messages or stored telemetry) | [`rules`] | yes |
//! | `GET /alerts` (`status=`, `open=true`, `device=`, `rule=`), `GET /alerts/{id}`, `POST /alerts/{id}/acknowledge` | [`alerts`] | yes |
//! | `GET /stats` | [`stats`] | yes |
//! | `GET /stream` (`device=a,b`, `tag=key:value`, `type=telemetry,presence,command,state,alert`) | [`stream`] | yes |
//!
//! Store, registry and PKI calls block (SQLite, key generation, CRL signing), so handlers run
//! them through [`blocking`] on tokio's blocking pool. Lists page with a cursor: ask for
//! `limit` (too large a limit is lowered to the maximum, 0 is refused), and pass the answer's
//! `next` back to get the following page; `next` is `null` on the last page.

use axum::{
    http::{Method, Uri},
    routing::{get, post},
    Router,
};

use crate::{ApiError, AppState};

pub mod alerts;
pub mod audit;
pub mod commands;
pub mod deadletters;
pub mod devices;
pub mod jobs;
pub mod pki;
pub mod presence;
pub mod rules;
pub mod state;
pub mod stats;
pub mod stream;
pub mod telemetry;

/// The `/api/v1` routes served without the bearer token: only the fleet CA's CRL, which is
/// signed public data for relying parties (other brokers) that hold no admin token.
pub fn public() -> Router<AppState> {
    Router::new().route("/pki/crl.pem", get(pki::crl))
}

/// The `/api/v1` routes behind the bearer token, before authentication and fallbacks are
/// added.
pub fn v1() -> Router<AppState> {
    Router::new()
        .route("/devices", post(devices::create).get(devices::list))
        .route(
            "/devices/{id}",
            get(devices::get_one)
                .patch(devices::patch)
                .delete(devices::delete),
        )
        .route("/devices/{id}/revoke", post(devices::revoke))
        .route("/devices/{id}/disable", post(devices::disable))
        .route("/devices/{id}/enable", post(devices::enable))
        .route(
            "/devices/{id}/commands",
            post(commands::create).get(commands::list),
        )
        .route(
            "/devices/{id}/commands/{command}",
            get(commands::get_one).delete(commands::cancel),
        )
        .route("/devices/{id}/state", get(state::get).patch(state::patch))
        .route("/devices/{id}/presence", get(presence::get_one))
        .route("/devices/{id}/connections", get(presence::connections))
        .route("/presence", get(presence::counts))
        .route("/devices/{id}/telemetry", get(telemetry::range))
        .route("/devices/{id}/latest", get(telemetry::latest))
        .route("/telemetry/latest", get(telemetry::fleet::fleet_latest))
        .route("/deadletters", get(deadletters::list))
        .route("/deadletters/{id}", get(deadletters::get_one))
        .route("/pki/cas", post(pki::create_ca).get(pki::list_cas))
        .route("/pki/cas/{id}", get(pki::get_ca).delete(pki::delete_ca))
        .route("/audit", get(audit::list))
        .route("/commands", post(jobs::create).get(jobs::list))
        .route("/commands/{job}", get(jobs::get_one))
        .route("/commands/{job}/devices", get(jobs::devices))
        .route("/commands/{job}/abort", post(jobs::abort))
        .route("/rules", post(rules::create).get(rules::list))
        .route("/rules/test", post(rules::test))
        .route(
            "/rules/{id}",
            get(rules::get_one)
                .put(rules::replace)
                .delete(rules::delete),
        )
        .route("/rules/{id}/enable", post(rules::enable))
        .route("/rules/{id}/disable", post(rules::disable))
        .route("/alerts", get(alerts::list))
        .route("/alerts/{id}", get(alerts::get_one))
        .route("/alerts/{id}/acknowledge", post(alerts::acknowledge))
        .route("/stats", get(stats::get))
        .route("/stream", get(stream::stream))
}

/// Runs a blocking call on tokio's blocking pool. A panic in it becomes a 500.
pub async fn blocking<T, E>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    E: Into<ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await?.map_err(Into::into)
}

/// The page size to use: `requested` or `default`, at most `max`; 0 is refused.
pub fn page_limit(requested: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    match requested {
        None => Ok(default),
        Some(0) => Err(ApiError::InvalidQuery("limit must be at least 1".into())),
        Some(n) => Ok(n.min(max)),
    }
}

/// Splits a result fetched with `limit + 1` rows into the page and whether more follow.
pub fn split_page<T>(mut rows: Vec<T>, limit: usize) -> (Vec<T>, bool) {
    let more = rows.len() > limit;
    rows.truncate(limit);
    (rows, more)
}

/// A page of a result fetched with `limit + 1` rows, and the cursor of the next page (the
/// `key` of the page's last row), `None` on the last page.
pub fn page<T, K>(rows: Vec<T>, limit: usize, key: impl Fn(&T) -> K) -> (Vec<T>, Option<K>) {
    let (page, more) = split_page(rows, limit);
    let next = if more { page.last().map(key) } else { None };
    (page, next)
}

/// Fallback for paths that name no endpoint.
pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_owned())
}

/// Fallback for a known path with a method it does not take.
pub async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages() {
        assert_eq!(page_limit(None, 100, 1000).unwrap(), 100);
        assert_eq!(page_limit(Some(5000), 100, 1000).unwrap(), 1000);
        assert!(page_limit(Some(0), 100, 1000).is_err());
        assert_eq!(split_page(vec![1, 2, 3], 2), (vec![1, 2], true));
        assert_eq!(split_page(vec![1, 2], 2), (vec![1, 2], false));
        assert_eq!(page(vec![1, 2, 3], 2, |n| n * 10), (vec![1, 2], Some(20)));
        assert_eq!(page(vec![1, 2], 2, |n| n * 10), (vec![1, 2], None));
    }
}
