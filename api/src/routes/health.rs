//! `GET /healthz` and `GET /readyz`: what a load balancer or an orchestrator asks, without a
//! token.
//!
//! - `/healthz` (liveness) answers 200 `{"status": "ok"}` whenever the process serves HTTP:
//!   it looks at nothing else, so a busy store never gets a live process restarted.
//! - `/readyz` (readiness) answers 200 `{"status": "ready"}` while Tellus takes devices: the
//!   gate accepts MQTT connections, the telemetry store and the registry answer, and it is
//!   not shutting down. Otherwise 503 `{"status": "unready", "reasons": [...]}`; from the
//!   moment a stop begins (SIGTERM) it answers 503, so a load balancer drains the node
//!   while it finishes what it holds.
//!
//! Both are cheap. The store check is one small read of each database on the blocking pool,
//! bounded by [`CHECK_TIMEOUT`]; at most one runs at a time. A probe that finds one still
//! running answers with the last check's result if that ended within the last 5 s (probes
//! from several balancers often come at once), else unready at once rather than pile
//! threads up behind a slow store. A 503 here is a status report, not a failed request, so it does not go
//! through [`crate::ApiError`]; the causes of failed checks are logged, not sent.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use axum::{extract::State, http::StatusCode, Json};
use serde::Serialize;
use tracing::warn;

use crate::AppState;

/// Longest `/readyz` waits for the store and the registry.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a finished check answers for probes that come while the next one runs.
const RECENT: Duration = Duration::from_secs(5);

pub const SHUTTING_DOWN: &str = "shutting down";
pub const NOT_LISTENING: &str = "the MQTT listener is not accepting connections";
pub const STORE_DOWN: &str = "the telemetry store does not answer";
pub const REGISTRY_DOWN: &str = "the registry does not answer";
pub const CHECK_SLOW: &str = "the store and registry did not answer in time";

/// What readiness knows beyond the parts' own state. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Health {
    stopping: Arc<AtomicBool>,
    /// Set while a store check runs on the blocking pool (it may outlive its probe).
    checking: Arc<AtomicBool>,
    /// The last check that ended: when, and the reasons it found. A probe that arrives while
    /// a check runs answers with it (probes from several balancers come at once).
    last: Arc<Mutex<Option<Checked>>>,
}

/// A check that ended: when, and the reasons it found.
type Checked = (Instant, Vec<&'static str>);

impl Health {
    /// Marks the process as shutting down: `/readyz` answers 503 from now on.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}

/// What `/healthz` answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Liveness {
    /// Always `ok`.
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// What `/readyz` answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready` or `unready`.
    #[schema(example = "ready")]
    pub status: &'static str,
    /// Why it is not ready; absent when it is.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<&'static str>,
}

/// Liveness: whether the process serves HTTP.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "health",
    responses((status = 200, description = "The process serves HTTP", body = Liveness))
)]
pub async fn healthz() -> Json<Liveness> {
    Json(Liveness { status: "ok" })
}

/// Readiness: whether Tellus takes devices now.
///
/// Not ready while the MQTT listener is down, the store or the registry does not answer
/// within a second, or from the moment it begins to shut down.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready; `reasons` says why", body = Readiness),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let mut reasons = Vec::new();
    if state.health.is_stopping() {
        reasons.push(SHUTTING_DOWN);
    }
    if !state.gate_stats.listening.load(Ordering::Relaxed) {
        reasons.push(NOT_LISTENING);
    }
    reasons.extend(check_stores(&state).await);
    if reasons.is_empty() {
        let ready = Readiness {
            status: "ready",
            reasons,
        };
        (StatusCode::OK, Json(ready))
    } else {
        let unready = Readiness {
            status: "unready",
            reasons,
        };
        (StatusCode::SERVICE_UNAVAILABLE, Json(unready))
    }
}

/// Clears the health's `checking` flag when the check ends, however it ends.
struct Checking(Arc<AtomicBool>);

impl Drop for Checking {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Whether the telemetry store and the registry answer, within [`CHECK_TIMEOUT`]: the
/// reasons they do not.
async fn check_stores(state: &AppState) -> Vec<&'static str> {
    let flag = state.health.checking.clone();
    if flag
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        // Another probe's check runs: its predecessor's answer stands while it is recent.
        let last = state.health.last.lock().ok().and_then(|l| l.clone());
        return match last {
            Some((at, reasons)) if at.elapsed() < RECENT => reasons,
            _ => vec![CHECK_SLOW],
        };
    }
    let checking = Checking(flag);
    let last = state.health.last.clone();
    let (store, registry) = (state.store.clone(), state.registry.clone());
    let check = tokio::task::spawn_blocking(move || {
        let _checking = checking;
        let mut reasons = Vec::new();
        if let Err(e) = store.check() {
            warn!(error = %e, "readiness: the telemetry store does not answer");
            reasons.push(STORE_DOWN);
        }
        if let Err(e) = registry.last_change() {
            warn!(error = %e, "readiness: the registry does not answer");
            reasons.push(REGISTRY_DOWN);
        }
        reasons
    });
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(Ok(reasons)) => {
            if let Ok(mut last) = last.lock() {
                *last = Some((Instant::now(), reasons.clone()));
            }
            reasons
        }
        Ok(Err(e)) => {
            warn!(error = %e, "readiness: the store check failed");
            vec![CHECK_SLOW]
        }
        Err(_) => {
            warn!(timeout = ?CHECK_TIMEOUT, "readiness: the store check did not end in time");
            vec![CHECK_SLOW]
        }
    }
}
