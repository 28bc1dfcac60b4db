//! The embedded store, measured: commit throughput as a fleet sends, and the queries a
//! dashboard makes. Method and figures: BENCHMARKS.md.
//!
//! Ingest: `DEVICES` devices with one metric each, interleaved (each batch holds one point of
//! many series in turn, every series advancing a second per pass), batches of `BATCH` points,
//! one transaction with an fsync each, and the store's housekeeping (merging the head into
//! day partitions and rollups) run after every commit as the ingest thread runs it, so
//! merges are inside the timing. A warm-up creates the series; then `ROUNDS` timed runs of
//! `BATCHES` commits; points/s of each run and their median, and how long the housekeeping
//! calls held the thread (p99 and longest: while one runs, nothing is committed).
//!
//! Steady load: what the ingest thread sees behind the gate at a fleet's steady rate, not
//! saturated. `STEADY_DEVICES` devices send `STEADY_RATE` messages/s in all, three metrics
//! each, on a schedule; a loop run as `pipeline::Worker::run` runs takes what has arrived
//! (at most `MAX_BATCH` messages), commits it, then runs the housekeeping, and runs the
//! housekeeping alone when it is due and nothing waits. Reported: the time from each
//! message's scheduled arrival to the end of its commit (what a device waits for its
//! PUBACK, less the network), p50, p99 and longest, and the housekeeping pauses.
//!
//! Queries, each run `QUERY_RUNS` times, median and slowest reported:
//! - one day of a 1 Hz series (86,400 points) in 1-minute buckets;
//! - one year of a once-a-minute series (525,600 points) in 1,000 buckets at most (the step
//!   the API picks for `max_points=1000`: 9 hours, from the hourly rollups);
//! - the latest value of one metric across all `DEVICES` devices.
//!
//! Run: `cargo bench -p tellus-ingest --bench store` (a release build; `-- --quick` for a
//! short run that only shows it works).

use std::{
    cell::RefCell,
    time::{Duration, Instant},
};

use tellus_core::{now_ms, DeviceId, Sample, Value};
use tellus_ingest::{Batch, Durability, Retention, SqliteStore, StoreConfig, TelemetryStore};

const DEVICES: usize = 10_000;
const BATCH: usize = 10_000;
const WARMUP: usize = 2;
const QUERY_RUNS: usize = 21;
const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
/// The steady load: 1,000 devices, 24,000 messages/s of three metrics (72,000 points/s on
/// 3,000 series), the load under which a merge of the whole head held PUBACKs for 300 ms.
const STEADY_DEVICES: usize = 1_000;
const STEADY_RATE: f64 = 24_000.0;
/// Most messages the ingest thread commits at once (`ingest.max_batch`'s default).
const MAX_BATCH: usize = 1_024;

/// The `p`-th percentile (0..=100) of `sorted`, in ms.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 * p / 100.0).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at].as_secs_f64() * 1000.0
}

/// One line on housekeeping pauses: how many, p99, longest, and their total.
fn pauses_line(mut pauses: Vec<Duration>) -> String {
    pauses.sort();
    let total: Duration = pauses.iter().sum();
    format!(
        "{} calls, p99 {:.1} ms, longest {:.1} ms, {:.2} s in all",
        pauses.len(),
        percentile(&pauses, 99.0),
        percentile(&pauses, 100.0),
        total.as_secs_f64()
    )
}

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
    let pauses = RefCell::new(Vec::new());
    let commit = |batch: &Batch| {
        store.commit(batch).expect("commit");
        let start = Instant::now();
        store.maintain(now_ms()).expect("housekeeping");
        pauses.borrow_mut().push(start.elapsed());
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
    pauses.borrow_mut().clear();
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
    let all = rates.len() as f64 / rates.iter().map(|r| 1.0 / r).sum::<f64>();
    rates.sort_by(f64::total_cmp);
    println!("  median: {:.0} points/s", rates[rates.len() / 2]);
    // Merging can be put off from one round to the next; all rounds together cannot.
    println!("  all rounds: {all:.0} points/s");
    println!("  housekeeping: {}", pauses_line(pauses.take()));

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

    steady(quick);
}

/// The steady load (see the module docs).
fn steady(quick: bool) {
    let (warmup, measured) = if quick { (0.5, 1.0) } else { (3.0, 15.0) };
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let config = StoreConfig {
        durability: Durability::Fsync,
        ..StoreConfig::default()
    };
    let store = SqliteStore::open_with(&dir.path().join("steady.db"), config).expect("open");
    let devices: Vec<DeviceId> = (0..STEADY_DEVICES)
        .map(|i| DeviceId::parse(&format!("dev-{i:05}")).expect("device id"))
        .collect();
    println!(
        "steady load: {STEADY_DEVICES} devices, {STEADY_RATE:.0} messages/s of 3 metrics, \
         {measured:.0} s measured after {warmup:.0} s"
    );
    let total = ((warmup + measured) * STEADY_RATE) as usize;
    // Message `i` arrives `i / STEADY_RATE` s after the start; its device is `i % devices`.
    let due = |i: usize| Duration::from_secs_f64(i as f64 / STEADY_RATE);
    let measured_from = Duration::from_secs_f64(warmup);
    let start = Instant::now();
    let start_ms = now_ms();
    let (mut acks, mut pauses) = (Vec::new(), Vec::new());
    let mut next = 0;
    let mut housekeeping_at = Some(start);
    while next < total {
        let now = start.elapsed();
        let arrived = ((now.as_secs_f64() * STEADY_RATE) as usize + 1).min(total);
        if arrived > next {
            let take = (arrived - next).min(MAX_BATCH);
            let mut batch = Batch::default();
            for i in next..next + take {
                let device = &devices[i % STEADY_DEVICES];
                let ts_ms = start_ms + due(i).as_millis() as i64;
                let values = [
                    ("temp", Value::Float(20.0 + (i % 97) as f64 / 10.0)),
                    ("humidity", Value::Float(40.0 + (i % 31) as f64)),
                    ("on", Value::Bool(i % 2 == 0)),
                ];
                for (metric, value) in values {
                    let sample = Sample {
                        metric: metric.to_owned(),
                        ts_ms,
                        value,
                    };
                    batch.samples.push((device.clone(), sample));
                }
            }
            store.commit(&batch).expect("commit");
            let done = start.elapsed();
            acks.extend(
                (next..next + take)
                    .filter(|i| due(*i) >= measured_from)
                    .map(|i| done.saturating_sub(due(i))),
            );
            next += take;
        } else if housekeeping_at.is_none_or(|at| at > Instant::now()) {
            // Nothing waits and housekeeping is not due: sleep until either.
            let until = start + due(next);
            let until = housekeeping_at.map_or(until, |at| at.min(until));
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
            continue;
        }
        // After every commit, and whenever it is due, as the ingest thread runs it.
        let began = Instant::now();
        let wait = store.maintain(now_ms()).expect("housekeeping");
        if began.duration_since(start) >= measured_from {
            pauses.push(began.elapsed());
        }
        housekeeping_at = wait.map(|w| Instant::now() + w);
    }
    let secs = start.elapsed().as_secs_f64();
    acks.sort();
    println!(
        "  {:.0} messages/s kept; arrival to commit: p50 {:.1} ms, p99 {:.1} ms, \
         p99.9 {:.1} ms, longest {:.1} ms",
        total as f64 / secs,
        percentile(&acks, 50.0),
        percentile(&acks, 99.0),
        percentile(&acks, 99.9),
        percentile(&acks, 100.0)
    );
    println!("  housekeeping: {}", pauses_line(pauses));
}
