//! The endpoints, one module per resource. [`v1`] holds the `/api/v1` ones behind the bearer
//! token, each wrapped by [`guarded`] in the role its description names (every `GET` but of
//! `/tokens`, and the dry run, are for viewers; commands, desired state, acknowledging
//! alerts and enabling or disabling rules for operators; the rest for admins), [`public`] the
//! one served without it. Handlers are registered with `utoipa_axum`'s `routes!`, which takes
//! each one's method and path from its `#[utoipa::path]`: the description at
//! `GET /api/openapi.json` ([`crate::openapi`]) lists every route below, with its
//! parameters, answers and role; [`probes`] (no token) and
//! [`metrics_routes`] (viewers) are at the top level, beside `/api/v1`.
//!
//! | route | module | token |
//! |---|---|---|
//! | `POST /devices`, `GET /devices` (`?expiring_within=30d`, `tag=key:value`), `GET /devices/{id}` | [`devices`] | yes |
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
//! | `POST /tokens`, `GET /tokens`, `DELETE /tokens/{id}`, `GET /whoami` | [`tokens`] | yes |
//! | `GET /metrics` (top level: Prometheus text format) | [`metrics`] | yes |
//! | `GET /healthz`, `GET /readyz` (top level: liveness, readiness) | [`health`] | **no**: for load balancers |
//!
//! The operator dashboard (`/` and `/assets/…`) is not under `/api/v1`: see
//! [`crate::dashboard`].
//!
//! Store, registry and PKI calls block (SQLite, key generation, CRL signing), so handlers run
//! them through [`blocking`] on tokio's blocking pool. Lists page with a cursor: ask for
//! `limit` (too large a limit is lowered to the maximum, 0 is refused), and pass the answer's
//! `next` back to get the following page; `next` is `null` on the last page.

use axum::{
    http::{Method, Uri},
    middleware,
    routing::MethodRouter,
};
use serde::Deserialize;
use utoipa_axum::{
    router::{OpenApiRouter, UtoipaMethodRouter, UtoipaMethodRouterExt},
    routes,
};

use crate::{
    auth::{self, Role},
    ApiError, AppState,
};

pub mod alerts;
pub mod audit;
pub mod commands;
pub mod deadletters;
pub mod devices;
pub mod health;
pub mod jobs;
pub mod metrics;
pub mod pki;
pub mod presence;
pub mod rules;
pub mod state;
pub mod stats;
pub mod stream;
pub mod telemetry;
pub mod tokens;

/// The `/api/v1` routes served without the bearer token: only the fleet CA's CRL, which is
/// signed public data for relying parties (other brokers) that hold no admin token.
pub fn public() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(pki::crl))
}

/// The top-level probes, served without the bearer token: what a load balancer asks
/// (liveness and readiness), cheap and holding nothing secret.
pub fn probes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
}

/// `GET /metrics`, at the top level where scrapers look for it, for viewers, before
/// authentication is added (it is behind the bearer token: the figures name rules and show
/// the fleet's load).
pub fn metrics_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(guarded(routes!(metrics::get)))
}

/// The `/api/v1` routes behind the bearer token, before authentication and fallbacks are
/// added. Each `routes!` takes one handler, wrapped by [`guarded`] in the role its
/// `#[utoipa::path]` names; its method and path come from there too, so the description and
/// the routes are one list, and a route cannot exist undocumented or unguarded.
pub fn v1() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(guarded(routes!(devices::create)))
        .routes(guarded(routes!(devices::list)))
        .routes(guarded(routes!(devices::get_one)))
        .routes(guarded(routes!(devices::patch)))
        .routes(guarded(routes!(devices::delete)))
        .routes(guarded(routes!(devices::revoke)))
        .routes(guarded(routes!(devices::disable)))
        .routes(guarded(routes!(devices::enable)))
        .routes(guarded(routes!(commands::create)))
        .routes(guarded(routes!(commands::list)))
        .routes(guarded(routes!(commands::get_one)))
        .routes(guarded(routes!(commands::cancel)))
        .routes(guarded(routes!(state::get)))
        .routes(guarded(routes!(state::patch)))
        .routes(guarded(routes!(presence::get_one)))
        .routes(guarded(routes!(presence::connections)))
        .routes(guarded(routes!(presence::counts)))
        .routes(guarded(routes!(telemetry::range)))
        .routes(guarded(routes!(telemetry::latest)))
        .routes(guarded(routes!(telemetry::fleet::fleet_latest)))
        .routes(guarded(routes!(deadletters::list)))
        .routes(guarded(routes!(deadletters::get_one)))
        .routes(guarded(routes!(pki::create_ca)))
        .routes(guarded(routes!(pki::list_cas)))
        .routes(guarded(routes!(pki::get_ca)))
        .routes(guarded(routes!(pki::delete_ca)))
        .routes(guarded(routes!(audit::list)))
        .routes(guarded(routes!(jobs::create)))
        .routes(guarded(routes!(jobs::list)))
        .routes(guarded(routes!(jobs::get_one)))
        .routes(guarded(routes!(jobs::devices)))
        .routes(guarded(routes!(jobs::abort)))
        .routes(guarded(routes!(rules::create)))
        .routes(guarded(routes!(rules::list)))
        // A dry run changes nothing.
        .routes(guarded(routes!(rules::test)))
        .routes(guarded(routes!(rules::get_one)))
        .routes(guarded(routes!(rules::replace)))
        .routes(guarded(routes!(rules::delete)))
        .routes(guarded(routes!(rules::enable)))
        .routes(guarded(routes!(rules::disable)))
        .routes(guarded(routes!(alerts::list)))
        .routes(guarded(routes!(alerts::get_one)))
        .routes(guarded(routes!(alerts::acknowledge)))
        .routes(guarded(routes!(stats::get)))
        .routes(guarded(routes!(stream::stream)))
        .routes(guarded(routes!(tokens::create)))
        .routes(guarded(routes!(tokens::list)))
        .routes(guarded(routes!(tokens::delete)))
        .routes(guarded(routes!(tokens::whoami)))
}

/// `routes`, for callers with at least `role`.
pub fn with_role(role: Role, routes: MethodRouter<AppState>) -> MethodRouter<AppState> {
    routes.route_layer(middleware::from_fn(move |request, next| {
        auth::require(role, request, next)
    }))
}

/// `routes` (one handler, as `routes!` gives it), for callers with the role its description
/// names in its `security` (`security(("token" = ["operator"]))`): the description and the
/// check cannot disagree. A handler whose description names no role, or several, is a
/// mistake in this crate: building the router panics, at start-up and in every test.
pub fn guarded(routes: UtoipaMethodRouter<AppState>) -> UtoipaMethodRouter<AppState> {
    let role = described_role(&routes.1).unwrap_or_else(|why| {
        panic!(
            "a route behind the token: {why}: {:?}",
            routes.1.paths.keys()
        )
    });
    routes.map(|r| with_role(role, r))
}

/// The one role the one operation of `paths` names.
fn described_role(paths: &utoipa::openapi::path::Paths) -> Result<Role, String> {
    let paths = serde_json::to_value(paths).map_err(|e| e.to_string())?;
    let roles: Vec<_> = paths
        .as_object()
        .into_iter()
        .flat_map(|paths| paths.values())
        .filter_map(serde_json::Value::as_object)
        .flat_map(|operations| operations.values())
        .map(|operation| operation["security"][0]["token"].clone())
        .collect();
    match roles.as_slice() {
        [serde_json::Value::Array(named)] => match named.as_slice() {
            [role] => role
                .as_str()
                .and_then(Role::parse)
                .ok_or_else(|| format!("{role} is no role")),
            _ => Err(format!("its description names {} roles", named.len())),
        },
        [_] => Err("its description names no role".into()),
        _ => Err(format!("{} operations, not one", roles.len())),
    }
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

/// A page of a list in id order (rules, tokens): its size, and where it starts.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct IdPage {
    /// Items per page (default 100; more than 1000 is taken as 1000).
    #[param(minimum = 1)]
    #[serde(default, deserialize_with = "crate::extract::saturating::usize")]
    pub limit: Option<usize>,
    /// The `next` of the previous page: items whose id sorts after this one.
    pub after: Option<String>,
}

/// The page size to use: `requested` or `default`, at most `max`; 0 is refused.
pub fn page_limit(requested: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    match requested {
        None => Ok(default),
        Some(0) => Err(ApiError::InvalidQuery("limit must be at least 1".into())),
        Some(n) => Ok(n.min(max)),
    }
}

/// Sets a query parameter read by hand from the query string; a parameter given twice is
/// refused.
pub fn set_once(slot: &mut Option<String>, key: &str, value: String) -> Result<(), ApiError> {
    if slot.replace(value).is_some() {
        return Err(ApiError::InvalidQuery(format!("{key} is given twice")));
    }
    Ok(())
}

/// Parses a whole number given as the query parameter `key`; one too large for `usize` is
/// `usize::MAX` (a limit is lowered to its maximum however large it is).
pub fn parse_count(key: &str) -> impl Fn(&str) -> Result<usize, ApiError> + '_ {
    move |value| {
        crate::extract::saturating::parse_usize(value).ok_or_else(|| {
            ApiError::InvalidQuery(format!("{key}: expected a whole number, found {value:?}"))
        })
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
    fn the_role_comes_from_the_description() {
        let role = |routes: UtoipaMethodRouter<AppState>| described_role(&routes.1);
        assert_eq!(role(routes!(tokens::whoami)), Ok(Role::Viewer));
        assert_eq!(role(routes!(jobs::create)), Ok(Role::Operator));
        assert_eq!(role(routes!(tokens::create)), Ok(Role::Admin));
        // The CRL is public: it names none, and cannot be guarded by mistake.
        assert!(role(routes!(pki::crl)).is_err());
        // Every route behind the token names one.
        let _ = v1();
        let _ = metrics_routes();
    }

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
