//! Counters: `GET /api/v1/stats` is `{"ingest": {received, stored, samples, deadlettered,
//! failed, commits}, "gate": {accepted, connected, active, refusals by reason, …}}`.
//! Reading them is a few atomic loads, so no blocking thread is needed.

use axum::{extract::State, Json};
use serde::Serialize;
use tellus_broker::gate::GateStatsSnapshot;
use tellus_ingest::IngestStatsSnapshot;

use crate::AppState;

#[derive(Debug, Serialize)]
pub struct Stats {
    pub ingest: IngestStatsSnapshot,
    pub gate: GateStatsSnapshot,
}

pub async fn get(State(state): State<AppState>) -> Json<Stats> {
    Json(Stats {
        ingest: state.ingest_stats.snapshot(),
        gate: state.gate_stats.snapshot(),
    })
}
