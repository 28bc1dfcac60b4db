//! Counters: `GET /api/v1/stats` is `{"ingest": {received, stored, samples, deadlettered,
//! failed, commits, rejected by kind, commit_latency, housekeeping_latency}, "gate":
//! {accepted, connected, active, refusals by reason, …}}`, and with the QuestDB store
//! `"spool": {spooled, drained, pending, refused, send_errors, last_error,
//! last_delivery_ms}`; `"rules"` has the rules engine's
//! inputs and the time rules add per input. Reading them is a few atomic loads
//! (and one lock), so no blocking thread is needed. The spool's `last_error` is QuestDB's
//! own text, which may name hosts and credentials: only admins see it, others `(hidden)`.

use axum::{extract::State, Extension, Json};
use serde::Serialize;
use tellus_broker::gate::GateStatsSnapshot;
use tellus_ingest::{IngestStatsSnapshot, SpoolStats};

use tellus_core::rule::HIDDEN;

use crate::{
    auth::{Caller, Role},
    openapi as doc, AppState,
};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Stats {
    pub ingest: IngestStatsSnapshot,
    pub gate: GateStatsSnapshot,
    /// With the QuestDB store: points spooled, drained to QuestDB, pending and refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool: Option<SpoolStats>,
    /// The rules engine: inputs evaluated and the time rules add per input.
    pub rules: tellus_rules::engine::EngineFigures,
}

/// Show the counters.
///
/// Ingest (messages, commits, latencies), the gate (connections and refusals by reason), the
/// rules engine, and with the QuestDB store the spool.
#[utoipa::path(
    get,
    path = "/stats",
    operation_id = "stats",
    tag = "stats",
    responses(
        (status = 200, description = "The counters", body = Stats),
        doc::Guarded,
    ),
    security(("token" = ["viewer"]))
)]
pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Json<Stats> {
    let mut spool = state.store.spool();
    // The backend's own error text may name hosts and credentials: for admins only.
    if let Some(spool) = spool.as_mut().filter(|_| caller.role < Role::Admin) {
        spool.last_error = spool.last_error.as_ref().map(|_| HIDDEN.to_owned());
    }
    Json(Stats {
        ingest: state.ingest_stats.snapshot(),
        gate: state.gate_stats.snapshot(),
        spool,
        rules: state.rules.figures().engine(),
    })
}
