//! The embedded store, measured: commit throughput as a fleet sends, and the queries a
//! dashboard makes. Method and figures: BENCHMARKS.md.
//!
//! Ingest: `DEVICES` devices with one metric each, interleaved (each batch holds one point of
//! many series in turn, every series advancing a second per pass), batches of `BATCH` points,
//! one transaction with an fsync each, and the store's housekeeping (merging the head into
//! day partitions and rollups) run after every commit as the ingest thread runs it, so
//! merges are inside the timing. A warm-up creates the series; then `ROUNDS` timed runs of
//! `BATCHES` commits; points/s of each run and their median.
//!
//! Queries, each run `QUERY_RUNS` times, median and slowest reported:
//! - one day of a 1 Hz series (86,400 points) in 1-minute buckets;
//! - one year of a once-a-minute series (525,600 points) in 1,000 buckets at most (the step
//!   the API picks for `max_points=1000`: 9 hours, from the hourly rollups);
//! - the latest value of one metric across all `DEVICES` devices.
//!
//! Run: `cargo bench -p tellus-ingest --bench store` (a release build; `-- --quick` for a
//! short run that only shows it works).

use std::time::{Duration, Instant};

use tellus_core::{now_ms, DeviceId, Sample, Value};
use tellus_ingest::{Batch, Durability, Retention, SqliteStore, StoreConfig, TelemetryStore};

const DEVICES: usize = 10_000;
const BATCH: usize = 10_000;
const WARMUP: usize = 2;
const QUERY_RUNS: usize = 21;
const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // Rounds of a million points each: several merges per round, so that each measures
    // the steady mix of commits and merges.
    let (rounds, batches) = if quick { (1, 2) } else { (5, 100) };
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    // Raw points kept for ever, so that the year of the query benchmark is stored as a
    // device would send it (not only into the rollups, as a backfill older than the raw
    // retention would be).
    let config = StoreConfig {
        durability: Durability::Fsync,
        retention: Retention {
            raw: None,
            minute: None,
            hour: None,
        },
        ..StoreConfig::default()
    };
    let store = SqliteStore::open_with(&dir.path().join("bench.db"), config).expect("open");
    let devices: Vec<DeviceId> = (0..DEVICES)
        .map(|i| DeviceId::parse(&format!("dev-{i:05}")).expect("device id"))
        .collect();
    let commit = |batch: &Batch| {
        store.commit(batch).expect("commit");
        store.maintain(now_ms()).expect("housekeeping");
    };

    println!("ingest: {DEVICES} series interleaved, {BATCH} points per commit, fsync per commit");
    let base = now_ms() - HOUR;
    let mut n = 0usize;
    let mut next_batch = || {
        let mut batch = Batch::default();
        for _ in 0..BATCH {
            let series = n % DEVICES;
            let sample = Sample {
                metric: "temperature".to_owned(),
                ts_ms: base + (n / DEVICES) as i64 * 1000,
                value: Value::Float(20.0 + (n % 97) as f64 / 10.0),
            };
            batch.samples.push((devices[series].clone(), sample));
            n += 1;
        }
        batch
    };
    for _ in 0..WARMUP {
        commit(&next_batch());
    }
    let mut rates = Vec::new();
    for round in 0..rounds {
        let prepared: Vec<Batch> = (0..batches).map(|_| next_batch()).collect();
        let start = Instant::now();
        for batch in &prepared {
            commit(batch);
        }
        let secs = start.elapsed().as_secs_f64();
        let rate = (batches * BATCH) as f64 / secs;
        println!(
            "  round {round}: {} points in {secs:.3} s: {rate:.0} points/s",
            batches * BATCH
        );
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!("  median: {:.0} points/s", rates[rates.len() / 2]);

    // A day at 1 Hz and a year at one point a minute, ending now.
    let q = DeviceId::parse("query").expect("device id");
    let now = now_ms().div_euclid(MINUTE) * MINUTE;
    let (day_points, year_points) = if quick {
        (3_600, 10_000)
    } else {
        (86_400, 525_600)
    };
    let series = [
        ("day", now - day_points as i64 * 1000, 1000, day_points),
        (
            "year",
            now - year_points as i64 * MINUTE,
            MINUTE,
            year_points,
        ),
    ];
    for (metric, from, every, count) in series {
        for chunk in (0..count).collect::<Vec<_>>().chunks(BATCH) {
            let samples = chunk
                .iter()
                .map(|i| {
                    let sample = Sample {
                        metric: metric.to_owned(),
                        ts_ms: from + *i as i64 * every,
                        value: Value::Float((*i % 1000) as f64),
                    };
                    (q.clone(), sample)
                })
                .collect();
            commit(&Batch {
                samples,
                deadletters: vec![],
            });
        }
    }
    store.merge(now_ms()).expect("merge");

    println!("queries ({QUERY_RUNS} runs each):");
    let time = |what: &str, f: &dyn Fn() -> usize| {
        let mut took = Vec::new();
        let mut answer = 0;
        for _ in 0..QUERY_RUNS {
            let start = Instant::now();
            answer = f();
            took.push(start.elapsed());
        }
        took.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "  {what}: median {:.2} ms, slowest {:.2} ms ({answer} rows)",
            ms(took[took.len() / 2]),
            ms(took[took.len() - 1])
        );
    };
    let day_from = now - day_points as i64 * 1000;
    time("1 day at 1 s in 1-minute buckets", &|| {
        store
            .buckets(&q, "day", day_from, now, MINUTE)
            .expect("buckets")
            .len()
    });
    let year_from = now - year_points as i64 * MINUTE;
    let span = now - year_from;
    // What the API's planner picks for max_points=1000: whole hours, at most 1000 buckets.
    let step = HOUR * (span / HOUR / 1000 + 1);
    time(&format!("1 year in {} h buckets", step / HOUR), &|| {
        store
            .buckets(&q, "year", year_from, now, step)
            .expect("buckets")
            .len()
    });
    time(&format!("latest temperature of {DEVICES} devices"), &|| {
        store
            .latest_of_metric("temperature", None, DEVICES)
            .expect("latest")
            .len()
    });
}
