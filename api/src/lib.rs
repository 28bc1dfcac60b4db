//! The Tellus HTTP API: what operators use to register devices and query telemetry.
//!
//! Start with [`serve`]: it runs [`router`] on a listener until a shutdown future resolves,
//! then lets requests in flight finish. Everything a handler needs arrives in [`AppState`];
//! there is no global state.
//!
//! The layout:
//! - [`routes`]: the `/api/v1` endpoints, one module per resource (`devices`, `telemetry`,
//!   `deadletters`, `pki`, `audit`, `stats`), the top-level `/metrics` (`routes::metrics`,
//!   the Prometheus text format) and probes (`routes::health`), and the helper that runs the
//!   blocking store, registry and PKI calls on tokio's blocking pool;
//! - [`auth`]: the bearer-token middleware in front of every `/api/v1` route but the CRL,
//!   and of `/metrics`, and the role ([`auth::Role`]: viewer, operator, admin) each route
//!   takes;
//! - [`error`]: [`ApiError`], the one place errors become HTTP responses. A 4xx answer is
//!   `{"error": {"code": "<stable_code>", "message": "<text>"}}`; a 5xx is logged and
//!   answered with code `internal` and a generic message;
//! - [`extract`]: `Json`, `OptionalJson`, `Query` and `Path` extractors whose rejections are
//!   [`ApiError`]s, so a malformed request gets the same error shape as everything else;
//! - [`openapi`]: the OpenAPI 3.1 description of every operation, generated from the
//!   handlers' `#[utoipa::path]` annotations and served at `GET /api/openapi.json`;
//! - [`timestamps`]: times on the wire (RFC 3339 out; RFC 3339 or epoch milliseconds in);
//! - [`base64`]: the encoder for dead-lettered payloads that are not UTF-8;
//! - [`dashboard`]: the operator dashboard's page and files (`api/dashboard/`), compiled in.
//!
//! The routes, all behind the bearer token except the CRL, which is signed public data that
//! other brokers in front of the fleet fetch without one, the dashboard's page and files, and
//! the description, and the probes a load balancer asks. Each `/api/v1` route's parameters,
//! bodies, answers and role are in the description (`GET /api/openapi.json`); this is the
//! overview:
//!
//! | route | what |
//! |---|---|
//! | `POST /api/v1/devices` | register `{"id"}` (returns cert, key, CA) or `{"id", "csr_pem"}` |
//! | `GET /api/v1/devices` | list, paged by `after`; `?expiring_within=30d`: only devices whose current certificate ends before then; `?tag=key:value` (repeatable): only devices with every tag given |
//! | `GET /api/v1/devices/{id}` | one device, with its certificates |
//! | `POST /api/v1/devices/{id}/revoke` | revoke `{"serial"}`, or every certificate (no body, or `{}`) |
//! | `POST /api/v1/devices/{id}/disable`, `…/enable` | refuse the device at the gate, or admit it again |
//! | `DELETE /api/v1/devices/{id}` | remove the device; its certificates stay on the CRL |
//! | `GET /api/v1/devices/{id}/telemetry` | one metric (`metric=`) or several (`metrics=a,b`), raw or in buckets (`step=1m&agg=max`, or planned within `max_points`), JSON pages or `format=csv` streamed |
//! | `GET /api/v1/devices/{id}/latest` | newest value of each metric of the device |
//! | `GET /api/v1/telemetry/latest` | newest value of one metric across the fleet, `?metric=&tag=key:value` |
//! | `GET /api/v1/deadletters`, `…/{id}` | refused payloads |
//! | `GET /api/v1/pki/crl.pem` | the fleet CA's CRL; **no token needed** (none is checked) |
//! | `POST /api/v1/pki/cas` | trust an external CA `{"pem", "auto_register", "tags"}`; with `auto_register` its devices are registered on first connection |
//! | `GET /api/v1/pki/cas`, `…/{id}` | the external CAs; one, with its PEM |
//! | `DELETE /api/v1/pki/cas/{id}` | stop trusting an external CA |
//! | `GET /api/v1/audit` | the gate's connection decisions, newest first |
//! | `POST`/`GET /api/v1/rules`, `GET`/`PUT`/`DELETE /api/v1/rules/{id}`, `…/enable`, `…/disable` | rules: CEL condition, `for`, actions |
//! | `POST /api/v1/rules/test` | a dry run of a rule over messages or stored telemetry |
//! | `GET /api/v1/alerts`, `…/{id}`, `POST …/{id}/acknowledge` | alerts rules raised |
//! | `GET /api/v1/stats` | ingest and gate counters |
//! | `POST`/`GET /api/v1/tokens`, `DELETE /api/v1/tokens/{id}` | API tokens with a role; the secret is shown once |
//! | `GET /api/v1/whoami` | the presented token's id, name and role |
//! | `GET /`, `GET /assets/{file}` | the operator dashboard ([`dashboard`]); **no token needed**: the page holds no data and signs in to the API itself |
//! | `GET /api/openapi.json` | the OpenAPI 3.1 description of every route above but the dashboard's; **no token needed** |
//! | `GET /metrics` | every counter, gauge and histogram in the Prometheus text format (0.0.4); any token (viewer) |
//! | `GET /healthz` | liveness: 200 `{"status": "ok"}` while the process serves HTTP; **no token** |
//! | `GET /readyz` | readiness: 200 while Tellus takes devices; 503 `{"status": "unready", "reasons"}` when the MQTT listener is down, the store or registry does not answer, or it is shutting down; **no token** |
//!
//! Which role each route takes is in [`routes::v1`]: reads (but of tokens) are for any
//! token, acting on devices, alerts and rules for operators, changing the fleet and its
//! tokens for admins. Below admin, webhook URLs (beyond the host), webhook header values and
//! QuestDB's error text are hidden.
//!
//! Device registration itself lives in `tellus_broker::provision`, shared with the CLI. The
//! life-cycle endpoints (revoke, disable, enable, delete) and the external CA endpoints only
//! write the registry; the gate enforces them by polling the registry's changes, whoever
//! wrote them (API or CLI).

use std::{future::Future, sync::Arc};

use axum::Router;
use tower_http::trace::TraceLayer;

pub mod auth;
pub mod base64;
pub mod dashboard;
pub mod error;
pub mod extract;
pub mod openapi;
pub mod routes;
pub mod timestamps;

pub use error::ApiError;

/// What the handlers share. Cheap to clone: every field is an `Arc`.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<dyn tellus_core::Registry>,
    pub store: Arc<dyn tellus_ingest::TelemetryStore>,
    pub pki: Arc<tellus_broker::pki::Pki>,
    pub ingest_stats: Arc<tellus_ingest::IngestStats>,
    pub gate_stats: Arc<tellus_broker::gate::GateStats>,
    pub devices: Arc<tellus_broker::devices::Devices>,
    /// What happens to devices as it happens: `GET /api/v1/stream`.
    pub live: tellus_core::Live,
    /// The rules engine: told to reload when rules change; its figures.
    pub rules: tellus_rules::service::Rules,
    /// The data directory's admin token, an admin beside the tokens in the registry. An
    /// empty token admits no one by it.
    pub admin_token: Arc<str>,
    /// Readiness beyond the parts' own state: whether the process is shutting down.
    pub health: routes::health::Health,
    /// The bounded queues and the publisher's counters, for `GET /metrics`.
    pub metrics: routes::metrics::Sources,
}

/// The whole API: `/api/v1/…` behind the bearer token (unknown paths under it included),
/// except [`routes::public`] (the CRL), which is merged in after the token layer so that the
/// layer does not wrap it; the [`dashboard`] at `/` and `/assets/…`, which needs no token;
/// the API's description at [`openapi::PATH`], also without a token, built from the same
/// registrations and serialised here, once; `/metrics` behind the token; the probes
/// (`/healthz`, `/readyz`) without it; and a JSON 404 for anything else.
pub fn router(state: AppState) -> Router {
    let authenticate = || axum::middleware::from_fn_with_state(state.clone(), auth::authenticate);
    let (v1, v1_doc) = routes::v1().split_for_parts();
    let (public, public_doc) = routes::public().split_for_parts();
    let (described, own_doc) = openapi::router().split_for_parts();
    let (probes, probes_doc) = routes::probes().split_for_parts();
    let (metrics, metrics_doc) = routes::metrics_routes().split_for_parts();
    let description = openapi::Description::new(&openapi::assemble(
        v1_doc,
        public_doc,
        [own_doc, probes_doc, metrics_doc],
    ));
    let authenticated = v1
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(authenticate());
    let v1 = public
        .method_not_allowed_fallback(routes::method_not_allowed)
        .merge(authenticated);
    Router::new()
        .nest("/api/v1", v1)
        .merge(dashboard::router())
        .merge(
            described
                .method_not_allowed_fallback(routes::method_not_allowed)
                .with_state(description),
        )
        .merge(metrics.route_layer(authenticate()))
        .merge(probes)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` resolves, then waits for the requests in
/// flight to finish (the caller bounds that wait with its own deadline).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
