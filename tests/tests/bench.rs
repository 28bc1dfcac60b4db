//! The end-to-end benchmark's smoke version: `tellus-bench --smoke` runs every phase for a
//! few seconds with a handful of devices, against a real Tellus and a real Mosquitto with the
//! baseline consumer, so the harness keeps working. It checks what the run saw, never how
//! fast (speed is measured by `bench/run`, not asserted in tests).

use std::process::Command;

use serde_json::Value;
use tellus_tests::{require_tool, tellus_bin, workspace_bin};

#[test]
fn the_benchmark_runs_every_phase_against_tellus_and_mosquitto() {
    if !require_tool("mosquitto") {
        return;
    }
    let bench = workspace_bin("tellus-bench", "tellus-bench");
    let consumer = workspace_bin("tellus-bench", "baseline-consumer");
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(&bench)
        .arg("--smoke")
        .arg("--out")
        .arg(out.path())
        .arg("--tellus-bin")
        .arg(tellus_bin())
        .arg("--consumer-bin")
        .arg(&consumer)
        .status()
        .expect("run tellus-bench");
    assert!(status.success(), "tellus-bench --smoke failed: {status}");

    let table = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    assert!(
        table.contains("| durable messages/s, saturated |"),
        "{table}"
    );
    assert!(table.contains("Tellus / baseline"), "{table}");
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap())
            .unwrap();
    let runs = results["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "one run per system: {results:#}");
    for run in runs {
        let system = run["system"].as_str().unwrap();
        for phase in ["max", "half"] {
            let p = &run[phase];
            assert!(
                p["durable_per_s"].as_f64().unwrap() > 0.0,
                "{system} {phase}: {p}"
            );
            assert!(
                p["acked_per_s"].as_f64().unwrap() > 0.0,
                "{system} {phase}: {p}"
            );
            assert!(
                p["latency"]["count"].as_u64().unwrap() > 0,
                "{system} {phase}: {p}"
            );
            assert!(
                p["cpu_s_per_10k"].as_f64().unwrap() > 0.0,
                "{system} {phase}: {p}"
            );
            assert_eq!(p["unacked"], 0, "{system} {phase}: {p}");
            assert_eq!(p["failed_devices"], 0, "{system} {phase}: {p}");
        }
        assert!(
            run["queryable"]["count"].as_u64().unwrap() > 0,
            "{system}: {run}"
        );
        assert_eq!(run["probes_missed"], 0, "{system}: {run}");
        // Nothing was lost on either side at this small load.
        assert_eq!(run["acked_not_stored"], 0, "{system}: {run}");
    }
    let footprints = results["footprints"].as_array().unwrap();
    assert_eq!(footprints.len(), 2, "{results:#}");
    for f in footprints {
        assert_eq!(f["idle"][0][0], 20, "{f}");
        assert_eq!(f["storm_devices"], 20, "{f}");
        assert!(
            f["storm_online_after_stop_s"].as_f64().unwrap() > 0.0,
            "{f}"
        );
    }
}
