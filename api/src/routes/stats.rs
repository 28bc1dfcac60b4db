//! Counters: `GET /api/v1/stats` is `{"ingest": {received, stored, samples, deadlettered,
//! failed, commits}}`. Reading them is a few atomic loads, so no blocking thread is needed.

use axum::{extract::State, Json};
use serde::Serialize;
use tellus_ingest::IngestStatsSnapshot;

use crate::AppState;

#[derive(Debug, Serialize)]
pub struct Stats {
    pub ingest: IngestStatsSnapshot,
}

pub async fn get(State(state): State<AppState>) -> Json<Stats> {
    Json(Stats {
        ingest: state.ingest_stats.snapshot(),
    })
}
