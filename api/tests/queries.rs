//! Telemetry queries over real HTTP against a real SQLite store: aggregation by step, the
//! `max_points` planning, several metrics at once, CSV, paging of aggregated answers, and
//! the fleet view of one metric's latest values.
//!
//! Points are committed to the store directly (`store.commit`), and every expectation is
//! computed here from those raw points and the documented semantics (buckets aligned to
//! multiples of the step since the epoch, the range widened to whole buckets, buckets without
//! a number left out, text not aggregated, booleans as 0 and 1), never from the store's
//! insides: the store behind `buckets` may answer from rollups or from raw points.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::LazyLock,
    time::Instant,
};

use reqwest::StatusCode;
use serde_json::{json, Value as Json};
use tellus_core::{now_ms, DeviceId, NewDevice, Registry, Sample, Value, FLEET_ISSUER};
use tellus_ingest::{Batch, TelemetryStore};

use support::{error_code, id, Server};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;
/// 08:00 UTC two days ago: recent, so that no raw retention of the store (the embedded
/// store keeps raw points 30 days) can have taken the raw points the tests read back.
static T0: LazyLock<i64> = LazyLock::new(|| (now_ms() / DAY - 2) * DAY + 8 * HOUR);

fn sample(device: &str, metric: &str, ts_ms: i64, value: Value) -> (DeviceId, Sample) {
    (
        id(device),
        Sample {
            metric: metric.into(),
            ts_ms,
            value,
        },
    )
}

fn commit(s: &Server, samples: Vec<(DeviceId, Sample)>) {
    for chunk in samples.chunks(20_000) {
        s.store
            .commit(&Batch {
                samples: chunk.to_vec(),
                deadletters: vec![],
            })
            .unwrap();
    }
}

async fn register(s: &Server, device: &str) {
    let (status, body) = s.post("/api/v1/devices", json!({ "id": device })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// A number of the answer, for comparison with one computed here.
fn num(v: &Json) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// `[[ts, value]]` of an answer as (ts, number) pairs.
fn numbers(points: &Json) -> Vec<(i64, f64)> {
    points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_i64().unwrap(), num(&p[1])))
        .collect()
}

/// The numbers of time-ordered raw points by bucket of `step`, as documented: aligned to
/// multiples of the step since the epoch, text left out, booleans as 0 and 1.
fn by_bucket(points: &[(i64, Value)], step: i64) -> BTreeMap<i64, Vec<f64>> {
    let mut out: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    for (ts, v) in points {
        let n = match v {
            Value::Bool(b) => f64::from(u8::from(*b)),
            Value::Int(i) => *i as f64,
            Value::Float(f) => *f,
            Value::Text(_) => continue,
        };
        out.entry(ts.div_euclid(step) * step).or_default().push(n);
    }
    out
}

fn summarise(values: &[f64], agg: &str) -> f64 {
    match agg {
        "avg" => values.iter().sum::<f64>() / values.len() as f64,
        "min" => values.iter().copied().fold(f64::INFINITY, f64::min),
        "max" => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        "sum" => values.iter().sum(),
        "count" => values.len() as f64,
        "first" => values[0],
        "last" => values[values.len() - 1],
        other => panic!("no agg {other}"),
    }
}

/// The step the planner must choose, in the words of its specification: the coarsest
/// resolution giving at least `max` buckets over the range (else 1 ms), times
/// ceil(range / res / max), raised by whole resolutions until the range widened to whole
/// buckets holds at most `max` of them.
fn expected_step(from: i64, to: i64, max: i64, resolutions: &[i64]) -> i64 {
    let range = to - from + 1;
    let res = resolutions
        .iter()
        .copied()
        .find(|r| range / r >= max)
        .unwrap_or(1);
    let mut step = res * ((range + res * max - 1) / (res * max));
    while to.div_euclid(step) - from.div_euclid(step) + 1 > max {
        step += res;
    }
    step
}

#[tokio::test]
async fn buckets_of_a_step_hold_each_agg_of_the_raw_points() {
    let t0 = *T0;
    let s = Server::start().await;
    register(&s, "agg").await;
    let raw = vec![
        // Minute 0: 1.5, 4 and true (1) are numbers, "n/a" is not.
        (t0 + 5_000, Value::Float(1.5)),
        (t0 + 20_000, Value::Int(4)),
        (t0 + 40_000, Value::Text("n/a".into())),
        (t0 + 50_000, Value::Bool(true)),
        // Minute 1: -2 and 10.25, the last one in the bucket's last millisecond.
        (t0 + MINUTE, Value::Int(-2)),
        (t0 + 2 * MINUTE - 1, Value::Float(10.25)),
        // Minute 2: only text, so no bucket. Minute 3: nothing.
        (t0 + 2 * MINUTE + 30_000, Value::Text("x".into())),
        // Minute 4: false (0).
        (t0 + 4 * MINUTE + 1, Value::Bool(false)),
    ];
    commit(
        &s,
        raw.iter()
            .map(|(ts, v)| sample("agg", "t", *ts, v.clone()))
            .collect(),
    );
    let range = format!("from={t0}&to={}", t0 + 5 * MINUTE - 1);

    // Worked out by hand from the points above.
    let (m0, m1, m4) = (t0, t0 + MINUTE, t0 + 4 * MINUTE);
    let by_hand: [(&str, [f64; 3]); 7] = [
        ("avg", [6.5 / 3.0, 4.125, 0.0]),
        ("min", [1.0, -2.0, 0.0]),
        ("max", [4.0, 10.25, 0.0]),
        ("sum", [6.5, 8.25, 0.0]),
        ("count", [3.0, 2.0, 1.0]),
        ("first", [1.5, -2.0, 0.0]),
        ("last", [1.0, 10.25, 0.0]),
    ];
    let buckets = by_bucket(&raw, MINUTE);
    for (agg, values) in by_hand {
        let (status, body) = s
            .get(&format!(
                "/api/v1/devices/agg/telemetry?metric=t&{range}&step=1m&agg={agg}"
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{agg}: {body}");
        assert_eq!(body["device"], "agg");
        assert_eq!(body["metric"], "t");
        assert_eq!(body["step"], MINUTE, "{agg}");
        assert_eq!(body["agg"], agg);
        assert_eq!(body["next"], Json::Null);
        let got = numbers(&body["points"]);
        let starts: Vec<i64> = got.iter().map(|(ts, _)| *ts).collect();
        assert_eq!(starts, [m0, m1, m4], "{agg}");
        for ((ts, value), want) in got.iter().zip(values) {
            assert!(close(*value, want), "{agg} at {ts}: {value} != {want}");
            // The same, computed from the raw points by the documented rules.
            assert!(close(*value, summarise(&buckets[ts], agg)), "{agg} at {ts}");
        }
        if agg == "count" {
            assert!(body["points"][0][1].is_i64(), "a count is an integer");
        }
    }

    // agg defaults to avg, and says so; a step may be given in ms.
    let (_, by_name) = s
        .get(&format!(
            "/api/v1/devices/agg/telemetry?metric=t&{range}&step=1m"
        ))
        .await;
    let (_, by_ms) = s
        .get(&format!(
            "/api/v1/devices/agg/telemetry?metric=t&{range}&step=60000&agg=avg"
        ))
        .await;
    assert_eq!(by_name, by_ms);
    assert_eq!(by_name["agg"], "avg");

    // One bucket of an hour holds all six numbers.
    let (_, body) = s
        .get(&format!(
            "/api/v1/devices/agg/telemetry?metric=t&{range}&step=1h&agg=sum"
        ))
        .await;
    assert_eq!(body["step"], HOUR);
    assert_eq!(numbers(&body["points"]), [(t0, 14.75)]);

    // The range is widened to whole buckets: from and to inside minutes 0 and 1 still count
    // every point of both.
    let (_, body) = s
        .get(&format!(
            "/api/v1/devices/agg/telemetry?metric=t&from={}&to={}&step=1m&agg=count",
            t0 + 30_000,
            t0 + MINUTE + 1
        ))
        .await;
    assert_eq!(body["points"], json!([[m0, 3], [m1, 2]]));

    // A range of text only has no buckets; a metric that does not exist neither.
    let (_, body) = s
        .get(&format!(
            "/api/v1/devices/agg/telemetry?metric=t&from={}&to={}&step=1m",
            t0 + 2 * MINUTE,
            t0 + 4 * MINUTE - 1
        ))
        .await;
    assert_eq!(body["points"], json!([]));
    let (status, body) = s
        .get(&format!(
            "/api/v1/devices/agg/telemetry?metric=nothing&{range}&step=1m"
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["points"], json!([]));
    s.stop().await;
}

/// One point every 5 minutes for 400 days from a midnight, valued `index % 97`, ending at
/// the midnight before yesterday, so that the last days are recent.
static PLAN_START: LazyLock<i64> = LazyLock::new(|| (now_ms() / DAY - 401) * DAY);
const PLAN_EVERY: i64 = 5 * MINUTE;
const PLAN_POINTS: i64 = 400 * 288;

fn plan_value(ts: i64) -> Option<f64> {
    let plan_start = *PLAN_START;
    let offset = ts - plan_start;
    (offset >= 0 && offset % PLAN_EVERY == 0 && offset / PLAN_EVERY < PLAN_POINTS)
        .then_some(((offset / PLAN_EVERY) % 97) as f64)
}

#[tokio::test]
async fn without_a_step_max_points_chooses_raw_points_or_the_right_step() {
    let plan_start = *PLAN_START;
    let s = Server::start().await;
    register(&s, "plan").await;
    commit(
        &s,
        (0..PLAN_POINTS)
            .map(|i| sample("plan", "t", plan_start + i * PLAN_EVERY, Value::Int(i % 97)))
            .collect(),
    );
    // Through the partitions and rollups, as a running server would after its first
    // merge: points older than the raw retention are in the rollups only.
    s.store.merge(tellus_core::now_ms()).unwrap();
    let resolutions = s.store.resolutions().to_vec();
    let rollups = resolutions == [HOUR, MINUTE];
    let query = |from: i64, to: i64, extra: &str| {
        format!("/api/v1/devices/plan/telemetry?metric=t&from={from}&to={to}{extra}")
    };

    // The recent end of the data (the store may keep raw points for a short while only).
    let end = plan_start + 400 * DAY;

    // Two hours hold 24 points: raw, as they are, with no step.
    let two_hours = (end - 2 * HOUR, end - 1);
    let (status, body) = s.get(&query(two_hours.0, two_hours.1, "")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body.get("step"), None);
    assert_eq!(body.get("agg"), None);
    let points = body["points"].as_array().unwrap();
    assert_eq!(points.len(), 24);
    let second = end - 2 * HOUR + PLAN_EVERY;
    assert_eq!(
        points[1],
        json!([second, plan_value(second).unwrap() as i64])
    );
    assert!(points[1][1].is_i64(), "raw points keep their type");
    // Exactly max_points: still raw. One more than the range holds: buckets.
    let (_, body) = s
        .get(&query(two_hours.0, two_hours.1, "&max_points=24"))
        .await;
    assert_eq!(body.get("step"), None);
    assert_eq!(body["points"].as_array().unwrap().len(), 24);
    let (_, body) = s
        .get(&query(two_hours.0, two_hours.1, "&max_points=23"))
        .await;
    let step = expected_step(two_hours.0, two_hours.1, 23, &resolutions);
    assert_eq!(body["step"], step);
    if rollups {
        // 2 hours are too few hours for 23 buckets; 120 minutes are enough: 6 minutes.
        assert_eq!(step, 6 * MINUTE);
    }
    assert_eq!(body["agg"], "avg");
    assert!(body["points"].as_array().unwrap().len() <= 23);

    // A day of 288 points with max_points=100: from minute rollups, 15 minutes a bucket.
    let day = (end - DAY, end - 1);
    let (_, body) = s.get(&query(day.0, day.1, "&max_points=100&agg=max")).await;
    let step = expected_step(day.0, day.1, 100, &resolutions);
    if rollups {
        assert_eq!(step, 15 * MINUTE);
    }
    assert_eq!(body["step"], step);
    assert_eq!(body["agg"], "max");
    check_buckets(&body, step, "max", day);

    // A week of 2016 points, default max_points (1000): 11 minutes from minute rollups.
    let week = (end - 7 * DAY, end - 1);
    let (_, body) = s.get(&query(week.0, week.1, "")).await;
    let step = expected_step(week.0, week.1, 1000, &resolutions);
    if rollups {
        assert_eq!(step, 11 * MINUTE);
    }
    assert_eq!(body["step"], step);
    check_buckets(&body, step, "avg", week);

    // agg=none: the week's raw points whatever their number, paged by limit.
    let (_, body) = s.get(&query(week.0, week.1, "&agg=none")).await;
    assert_eq!(body.get("step"), None);
    assert_eq!(body["points"].as_array().unwrap().len(), 7 * 288);
    assert_eq!(body["next"], Json::Null);
    let (_, body) = s.get(&query(week.0, week.1, "&agg=none&limit=1500")).await;
    assert_eq!(body["points"].as_array().unwrap().len(), 1500);
    assert_eq!(body["next"], week.0 + 1499 * PLAN_EVERY + 1);

    // All 400 days, 115 200 points: from hourly rollups, 10 hours a bucket (9600 h / 1000).
    let all = (plan_start, end - 1);
    let (_, body) = s.get(&query(all.0, all.1, "&agg=count")).await;
    let step = expected_step(all.0, all.1, 1000, &resolutions);
    if rollups {
        assert_eq!(step, 10 * HOUR);
    }
    assert_eq!(body["step"], step);
    assert_eq!(body["next"], Json::Null);
    let counted: f64 = numbers(&body["points"]).iter().map(|(_, n)| n).sum();
    assert_eq!(counted as i64, PLAN_POINTS);
    check_buckets(&body, step, "count", all);
    let (_, body) = s.get(&query(all.0, all.1, "")).await;
    check_buckets(&body, step, "avg", all);

    // A range that starts and ends mid-bucket still gets at most max_points buckets.
    let odd = (end - 3 * DAY + 7 * MINUTE + 3, end - 11);
    let (_, body) = s.get(&query(odd.0, odd.1, "&max_points=50")).await;
    let step = expected_step(odd.0, odd.1, 50, &resolutions);
    assert_eq!(body["step"], step);
    assert!(body["points"].as_array().unwrap().len() <= 50);
    check_buckets(&body, step, "avg", odd);
    s.stop().await;
}

/// Checks every bucket of an answer against the synthetic points of the planning test: at
/// most one per step, aligned, and valued as `agg` of the points in it.
fn check_buckets(body: &Json, step: i64, agg: &str, (from, to): (i64, i64)) {
    let plan_start = *PLAN_START;
    let got = numbers(&body["points"]);
    assert!(!got.is_empty());
    let first = from.div_euclid(step) * step;
    let last = to.div_euclid(step) * step;
    for (start, value) in &got {
        assert_eq!(start.rem_euclid(step), 0, "bucket {start} is not aligned");
        assert!(
            (first..=last).contains(start),
            "bucket {start} out of range"
        );
        let first_point =
            start + (PLAN_EVERY - (start - plan_start).rem_euclid(PLAN_EVERY)) % PLAN_EVERY;
        let values: Vec<f64> = (first_point..start + step)
            .step_by(PLAN_EVERY as usize)
            .filter_map(plan_value)
            .collect();
        let want = summarise(&values, agg);
        assert!(close(*value, want), "{agg} at {start}: {value} != {want}");
    }
    let starts: BTreeSet<i64> = got.iter().map(|(ts, _)| *ts).collect();
    assert_eq!(starts.len(), got.len(), "buckets repeat");
}

#[tokio::test]
async fn several_metrics_come_in_one_answer_each_planned_on_its_own() {
    let t0 = *T0;
    let s = Server::start().await;
    register(&s, "multi").await;
    let mut samples: Vec<_> = (0..10)
        .map(|i| sample("multi", "a", t0 + i * 1000, Value::Int(i)))
        .collect();
    samples.extend((0..2000).map(|i| sample("multi", "b", t0 + i * MINUTE, Value::Float(0.5))));
    commit(&s, samples);
    let (from, to) = (t0, t0 + 2000 * MINUTE - 1);
    let resolutions = s.store.resolutions().to_vec();

    let (status, body) = s
        .get(&format!(
            "/api/v1/devices/multi/telemetry?metrics=a,b&from={from}&to={to}&max_points=100"
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["device"], "multi");
    assert_eq!(body["from"], from);
    assert_eq!(body["to"], to);
    let series = body["series"].as_array().unwrap();
    assert_eq!(series.len(), 2);
    // a: ten points, raw.
    assert_eq!(series[0]["metric"], "a");
    assert_eq!(series[0].get("step"), None);
    assert_eq!(series[0]["points"].as_array().unwrap().len(), 10);
    assert_eq!(series[0]["points"][9], json!([t0 + 9000, 9]));
    assert_eq!(series[0]["next"], Json::Null);
    // b: 2000 points, aggregated.
    assert_eq!(series[1]["metric"], "b");
    let step = expected_step(from, to, 100, &resolutions);
    assert_eq!(series[1]["step"], step);
    assert_eq!(series[1]["agg"], "avg");
    assert!(numbers(&series[1]["points"]).iter().all(|(_, v)| *v == 0.5));
    assert_eq!(series[1]["next"], Json::Null);

    // The order asked is the order answered; an unknown metric is an empty series; a step
    // applies to every series.
    let (_, body) = s
        .get(&format!(
            "/api/v1/devices/multi/telemetry?metrics=b,nothing,a&from={from}&to={to}&step=1h&agg=count"
        ))
        .await;
    let names: Vec<&str> = body["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["metric"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b", "nothing", "a"]);
    assert_eq!(body["series"][1]["points"], json!([]));
    assert_eq!(body["series"][2]["points"], json!([[t0, 10]]));
    assert_eq!(body["series"][2]["step"], HOUR);
    let counted: f64 = numbers(&body["series"][0]["points"])
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert_eq!(counted, 2000.0);

    // Each series has its own next: continue a with metric=a&from=<its next>.
    let (_, body) = s
        .get(&format!(
            "/api/v1/devices/multi/telemetry?metrics=a,b&from={from}&to={to}&max_points=100&limit=4"
        ))
        .await;
    let a = &body["series"][0];
    assert_eq!(a["points"].as_array().unwrap().len(), 4);
    assert_eq!(a["next"], t0 + 3001);
    let b = &body["series"][1];
    assert_eq!(b["points"].as_array().unwrap().len(), 4);
    assert!(b["next"].is_i64());
    let (_, rest) = s
        .get(&format!(
            "/api/v1/devices/multi/telemetry?metric=a&from={}&to={to}",
            a["next"]
        ))
        .await;
    assert_eq!(rest["points"].as_array().unwrap().len(), 6);
    assert_eq!(rest["points"][0], json!([t0 + 4000, 4]));
    s.stop().await;
}

/// Parses RFC 4180 CSV (CRLF line ends, quoted fields with doubled quotes) into records.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let (mut record, mut field) = (Vec::new(), String::new());
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') => {
                assert_eq!(chars.next(), Some('\n'), "CR without LF");
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => {
                assert_ne!(c, '\n', "a bare LF ends no record in RFC 4180");
                field.push(c);
            }
        }
    }
    assert!(
        !quoted && field.is_empty() && record.is_empty(),
        "CSV ends mid-record"
    );
    records
}

#[tokio::test]
async fn csv_streams_raw_and_aggregated_points_with_no_cap() {
    let t0 = *T0;
    let s = Server::start().await;
    register(&s, "csv").await;
    // 10 000 points, more than one chunk of the stream, one a second.
    let n = 10_000;
    let t_value = |i: i64| {
        if i % 2 == 0 {
            Value::Int(i)
        } else {
            Value::Float(i as f64 + 0.25)
        }
    };
    let mut samples: Vec<_> = (0..n)
        .map(|i| sample("csv", "t", t0 + i * 1000, t_value(i)))
        .collect();
    let texts = ["open", "a, b", "say \"hi\"", "two\r\nlines", "", "true"];
    samples.extend(
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| sample("csv", "door", t0 + i as i64, Value::Text((*t).into()))),
    );
    samples.push(sample("csv", "on", t0, Value::Bool(true)));
    commit(&s, samples);
    let range = format!("from={t0}&to={}", t0 + n * 1000 - 1);

    // Raw: every point, past the JSON default of max_points, in time order.
    let (status, content_type, text) = s
        .get_text(&format!(
            "/api/v1/devices/csv/telemetry?metric=t&{range}&format=csv"
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.starts_with("text/csv"), "{content_type}");
    let records = parse_csv(&text);
    assert_eq!(records[0], ["metric", "ts", "value"]);
    assert_eq!(records.len() as i64, n + 1);
    for (i, r) in records[1..].iter().enumerate() {
        let i = i as i64;
        assert_eq!(r[0], "t");
        assert_eq!(r[1], (t0 + i * 1000).to_string());
        match t_value(i) {
            Value::Int(v) => assert_eq!(r[2], v.to_string()),
            Value::Float(v) => assert_eq!(r[2].parse::<f64>().unwrap(), v),
            _ => unreachable!(),
        }
    }

    // Several metrics one after another; text comes back exactly as sent.
    let (_, _, text) = s
        .get_text(&format!(
            "/api/v1/devices/csv/telemetry?metrics=door,on&{range}&format=csv"
        ))
        .await;
    let records = parse_csv(&text);
    let want: Vec<Vec<String>> =
        std::iter::once(vec!["metric".into(), "ts".into(), "value".into()])
            .chain(
                texts.iter().enumerate().map(|(i, t)| {
                    vec!["door".into(), (t0 + i as i64).to_string(), (*t).to_owned()]
                }),
            )
            .chain(std::iter::once(vec![
                "on".into(),
                t0.to_string(),
                "true".into(),
            ]))
            .collect();
    assert_eq!(records, want);

    // Aggregated: the same buckets as the JSON answer.
    for extra in [
        "&step=1m&agg=sum",
        "&step=30s&agg=last",
        "&max_points=100&agg=min",
    ] {
        let (_, json_body) = s
            .get(&format!(
                "/api/v1/devices/csv/telemetry?metric=t&{range}{extra}&limit=100000"
            ))
            .await;
        assert!(json_body["step"].is_i64(), "{extra}: {json_body}");
        let (status, _, text) = s
            .get_text(&format!(
                "/api/v1/devices/csv/telemetry?metric=t&{range}{extra}&format=csv"
            ))
            .await;
        assert_eq!(status, StatusCode::OK);
        let from_csv: Vec<(i64, f64)> = parse_csv(&text)[1..]
            .iter()
            .map(|r| {
                assert_eq!(r[0], "t");
                (r[1].parse().unwrap(), r[2].parse().unwrap())
            })
            .collect();
        assert_eq!(from_csv, numbers(&json_body["points"]), "{extra}");
    }
    // One minute by hand: seconds 0..59 of t sum to the evens plus the odds + 0.25 each.
    let (_, _, text) = s
        .get_text(&format!(
            "/api/v1/devices/csv/telemetry?metric=t&{range}&step=1m&agg=sum&format=csv"
        ))
        .await;
    let first = &parse_csv(&text)[1];
    assert_eq!(first[1], t0.to_string());
    assert_eq!(
        first[2].parse::<f64>().unwrap(),
        (0..60).sum::<i64>() as f64 + 30.0 * 0.25
    );

    // Errors before the stream starts keep their status and JSON shape.
    let (status, body) = s
        .get(&format!(
            "/api/v1/devices/csv/telemetry?metric=t&{range}&format=csv&limit=5"
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body).0, "invalid_query");
    let (status, body) = s
        .get("/api/v1/devices/ghost/telemetry?metric=t&format=csv")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body).0, "device_not_found");
    s.stop().await;
}

/// Follows `next` from `from` to the end of the range and returns every point.
async fn all_pages(s: &Server, path: &str, from: i64, pages: &mut Vec<Json>) -> Vec<Json> {
    let mut points = Vec::new();
    let mut from = Some(from);
    while let Some(f) = from {
        let (status, body) = s.get(&format!("{path}&from={f}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        points.extend(body["points"].as_array().unwrap().iter().cloned());
        from = body["next"].as_i64();
        pages.push(body);
        assert!(pages.len() < 1000, "paging does not end");
    }
    points
}

#[tokio::test]
async fn aggregated_answers_page_from_the_next_bucket() {
    let t0 = *T0;
    let s = Server::start().await;
    register(&s, "pages").await;
    // Numbers in minutes 0, 1, 3, 4 and 6 (two in minute 3); minutes 2 and 5 are empty.
    let minutes = [0, 1, 3, 3, 4, 6];
    commit(
        &s,
        minutes
            .iter()
            .enumerate()
            .map(|(i, m)| {
                sample(
                    "pages",
                    "t",
                    t0 + m * MINUTE + i as i64,
                    Value::Int(i as i64),
                )
            })
            .collect(),
    );
    let to = t0 + 7 * MINUTE - 1;
    let base = format!("/api/v1/devices/pages/telemetry?metric=t&to={to}&step=1m&agg=count");

    let (_, whole) = s.get(&format!("{base}&from={t0}")).await;
    assert_eq!(
        whole["points"],
        json!([
            [t0, 1],
            [t0 + MINUTE, 1],
            [t0 + 3 * MINUTE, 2],
            [t0 + 4 * MINUTE, 1],
            [t0 + 6 * MINUTE, 1]
        ])
    );
    assert_eq!(whole["next"], Json::Null);

    let mut pages = Vec::new();
    let paged = all_pages(&s, &format!("{base}&limit=2"), t0, &mut pages).await;
    assert_eq!(Json::from(paged), whole["points"]);
    // The first page ends with minute 1; the next starts at the bucket after it.
    assert_eq!(pages[0]["points"].as_array().unwrap().len(), 2);
    assert_eq!(pages[0]["next"], t0 + 2 * MINUTE);
    assert!(pages
        .iter()
        .all(|p| p["points"].as_array().unwrap().len() <= 2 && p["step"] == MINUTE));

    // A page that starts mid-bucket widens to the whole bucket.
    let (_, body) = s
        .get(&format!("{base}&from={}&limit=1", t0 + 3 * MINUTE + 30_000))
        .await;
    assert_eq!(body["points"], json!([[t0 + 3 * MINUTE, 2]]));
    assert_eq!(body["next"], t0 + 4 * MINUTE);

    // A planned answer pages too, with the step it says passed on.
    register(&s, "dense").await;
    commit(
        &s,
        (0..3000)
            .map(|i| sample("dense", "t", t0 + i * 1000, Value::Int(i)))
            .collect(),
    );
    let dense_to = t0 + 3000 * 1000 - 1;
    let (_, first) = s
        .get(&format!(
            "/api/v1/devices/dense/telemetry?metric=t&from={t0}&to={dense_to}&max_points=100&agg=sum"
        ))
        .await;
    let step = first["step"].as_i64().unwrap();
    let mut pages = Vec::new();
    let paged = all_pages(
        &s,
        &format!(
            "/api/v1/devices/dense/telemetry?metric=t&to={dense_to}&step={step}&agg=sum&limit=7"
        ),
        t0,
        &mut pages,
    )
    .await;
    assert_eq!(Json::from(paged), first["points"]);
    assert!(pages.len() > 2);
    s.stop().await;
}

fn new_device(device: &str, tags: &[(&str, &str)]) -> NewDevice {
    NewDevice {
        id: id(device),
        created_at_ms: 1,
        tags: tags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        cert_issuer: FLEET_ISSUER.into(),
        // Unique per device, as serials must be.
        cert_serial: device.bytes().map(|b| format!("{b:02x}")).collect(),
        cert_not_after_ms: i64::MAX,
    }
}

fn devices(body: &Json) -> Vec<(String, i64, Json)> {
    body["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|d| {
            (
                d["device"].as_str().unwrap().to_owned(),
                d["ts"].as_i64().unwrap(),
                d["value"].clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn fleet_latest_filters_by_tags_and_pages_by_device() {
    let t0 = *T0;
    let s = Server::start().await;
    let fleet: [(&str, &[(&str, &str)]); 6] = [
        ("d-01", &[("site", "berlin"), ("floor", "2")]),
        ("d-02", &[("site", "berlin"), ("floor", "3")]),
        ("d-03", &[("site", "paris"), ("floor", "2")]),
        ("d-04", &[("site", "berlin")]),
        ("d-05", &[]),
        ("d-06", &[("site", "berlin"), ("floor", "2")]),
    ];
    for (device, tags) in fleet {
        s.registry.insert_device(&new_device(device, tags)).unwrap();
    }
    let mut samples = Vec::new();
    for (i, device) in ["d-01", "d-02", "d-03", "d-04", "d-05"].iter().enumerate() {
        let i = i as i64;
        // An older and a newer point: the newer one is the latest.
        samples.push(sample(device, "temperature", t0 + i, Value::Int(-1)));
        samples.push(sample(
            device,
            "temperature",
            t0 + 1000 + i,
            Value::Float(20.0 + i as f64),
        ));
    }
    samples.push(sample("d-06", "humidity", t0, Value::Int(40)));
    // Telemetry of a device the registry does not know is not the fleet's.
    samples.push(sample("stranger", "temperature", t0, Value::Int(99)));
    commit(&s, samples);

    let (status, body) = s.get("/api/v1/telemetry/latest?metric=temperature").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["metric"], "temperature");
    assert_eq!(body["next"], Json::Null);
    assert_eq!(
        devices(&body),
        [
            ("d-01".to_owned(), t0 + 1000, json!(20.0)),
            ("d-02".to_owned(), t0 + 1001, json!(21.0)),
            ("d-03".to_owned(), t0 + 1002, json!(22.0)),
            ("d-04".to_owned(), t0 + 1003, json!(23.0)),
            ("d-05".to_owned(), t0 + 1004, json!(24.0)),
        ]
    );
    let names = |body: &Json| -> Vec<String> { devices(body).into_iter().map(|d| d.0).collect() };

    let (_, body) = s
        .get("/api/v1/telemetry/latest?metric=temperature&tag=site:berlin")
        .await;
    assert_eq!(names(&body), ["d-01", "d-02", "d-04"]);
    let (_, body) = s
        .get("/api/v1/telemetry/latest?metric=temperature&tag=site:berlin&tag=floor:2")
        .await;
    assert_eq!(names(&body), ["d-01"]);
    let (_, body) = s
        .get("/api/v1/telemetry/latest?metric=humidity&tag=site:berlin&tag=floor:2")
        .await;
    assert_eq!(devices(&body), [("d-06".to_owned(), t0, json!(40))]);
    for query in [
        "metric=temperature&tag=site:nowhere",
        "metric=temperature&tag=site:berlin&tag=site:paris",
        "metric=pressure",
    ] {
        let (status, body) = s.get(&format!("/api/v1/telemetry/latest?{query}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["devices"], json!([]), "{query}");
        assert_eq!(body["next"], Json::Null);
    }

    // Pages of two, by device id.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/api/v1/telemetry/latest?metric=temperature&limit=2&after={a}"),
            None => "/api/v1/telemetry/latest?metric=temperature&limit=2".to_owned(),
        };
        let (_, body) = s.get(&path).await;
        let page = names(&body);
        assert!(page.len() <= 2);
        seen.extend(page);
        match body["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ["d-01", "d-02", "d-03", "d-04", "d-05"]);
    let (_, body) = s
        .get("/api/v1/telemetry/latest?metric=temperature&tag=site:berlin&limit=2")
        .await;
    assert_eq!(names(&body), ["d-01", "d-02"]);
    assert_eq!(body["next"], "d-02");
    let (_, body) = s
        .get("/api/v1/telemetry/latest?metric=temperature&tag=site:berlin&limit=2&after=d-02")
        .await;
    assert_eq!(names(&body), ["d-04"]);
    assert_eq!(body["next"], Json::Null);

    // A newer point moves the latest; a deleted device leaves the fleet.
    commit(
        &s,
        vec![sample(
            "d-03",
            "temperature",
            t0 + 5000,
            Value::Text("n/a".into()),
        )],
    );
    let (status, _) = s
        .req(reqwest::Method::DELETE, "/api/v1/devices/d-02")
        .send()
        .await
        .map(|r| (r.status(), ()))
        .unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, body) = s.get("/api/v1/telemetry/latest?metric=temperature").await;
    assert_eq!(names(&body), ["d-01", "d-03", "d-04", "d-05"]);
    assert_eq!(
        devices(&body)[1],
        ("d-03".to_owned(), t0 + 5000, json!("n/a"))
    );

    for (query, code) in [
        ("", "invalid_query"),
        ("metric=", "invalid_query"),
        ("metric=t&metric=u", "invalid_query"),
        ("metric=t&tag=site", "invalid_query"),
        ("metric=t&tag=:berlin", "invalid_query"),
        ("metric=t&limit=0", "invalid_query"),
        ("metric=t&limit=-1", "invalid_query"),
        ("metric=t&site=berlin", "invalid_query"),
        ("metric=t&after=a/b", "invalid_device_id"),
    ] {
        let (status, body) = s.get(&format!("/api/v1/telemetry/latest?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(error_code(&body).0, code, "{query}");
    }
    s.stop().await;
}

#[tokio::test]
async fn fleet_latest_answers_ten_thousand_devices_in_one_page() {
    let t0 = *T0;
    let s = Server::start().await;
    let n = 10_000;
    let name = |i: usize| format!("dev-{i:05}");
    let started = Instant::now();
    for i in 0..n {
        let site = if i % 2 == 0 { "berlin" } else { "paris" };
        s.registry
            .insert_device(&new_device(&name(i), &[("site", site)]))
            .unwrap();
    }
    eprintln!("registered {n} devices in {:?}", started.elapsed());
    commit(
        &s,
        (0..n)
            .map(|i| sample(&name(i), "temperature", t0 + i as i64, Value::Int(i as i64)))
            .collect(),
    );

    let started = Instant::now();
    let (status, body) = s.get("/api/v1/telemetry/latest?metric=temperature").await;
    let all = started.elapsed();
    assert_eq!(status, StatusCode::OK);
    let listed = devices(&body);
    assert_eq!(listed.len(), n);
    assert_eq!(body["next"], Json::Null);
    assert_eq!(
        listed[n - 1],
        (name(n - 1), t0 + n as i64 - 1, json!(n - 1))
    );

    let started = Instant::now();
    let (_, body) = s
        .get("/api/v1/telemetry/latest?metric=temperature&tag=site:paris")
        .await;
    let tagged = started.elapsed();
    let listed = devices(&body);
    assert_eq!(listed.len(), n / 2);
    assert!(listed.iter().all(|(d, _, v)| {
        let i: usize = d[4..].parse().unwrap();
        i % 2 == 1 && *v == json!(i)
    }));
    eprintln!("fleet view of {n} devices: {all:?}; of half of them by tag: {tagged:?}");
    // Generous bounds, for a debug build on a busy machine; one call per device would be
    // far slower than this.
    assert!(all.as_secs() < 10 && tagged.as_secs() < 10);
    s.stop().await;
}

#[tokio::test]
async fn bad_telemetry_queries_are_400_with_the_reason() {
    let s = Server::start().await;
    register(&s, "d1").await;
    let too_many: Vec<String> = (0..33).map(|i| format!("m{i}")).collect();
    let too_many = format!("metrics={}", too_many.join(","));
    let just_enough: Vec<String> = (0..32).map(|i| format!("m{i}")).collect();
    let just_enough = format!("metrics={}", just_enough.join(","));
    for (query, mentions) in [
        ("", "metric"),
        ("metric=t&metrics=t,u", "not both"),
        ("metric=", "empty"),
        ("metrics=", "none empty"),
        ("metrics=a,,b", "none empty"),
        ("metrics=a,", "none empty"),
        ("metrics=a,b,a", "twice"),
        (too_many.as_str(), "at most 32"),
        ("metric=t&step=fortnight", "step"),
        ("metric=t&step=0", "step"),
        ("metric=t&step=0s", "step"),
        ("metric=t&step=-1m", "step"),
        ("metric=t&step=1.5", "step"),
        ("metric=t&step=1500us", "step"),
        ("metric=t&step=1000years", "step"),
        ("metric=t&step=", "step"),
        ("metric=t&step=1m&agg=median", "agg"),
        ("metric=t&agg=AVG", "agg"),
        ("metric=t&agg=none&step=1m", "no step"),
        ("metric=t&agg=none&max_points=10", "no max_points"),
        ("metric=t&max_points=0", "max_points"),
        ("metric=t&max_points=-5", "max_points"),
        ("metric=t&limit=0", "limit"),
        ("metric=t&format=xml", "format"),
        ("metric=t&format=csv&limit=10", "limit"),
        ("metric=t&from=10&to=5", "after"),
        ("metric=t&from=yesterday", "from"),
        ("metric=t&colour=red", "colour"),
    ] {
        let (status, body) = s
            .get(&format!("/api/v1/devices/d1/telemetry?{query}"))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        let (code, message) = error_code(&body);
        assert_eq!(code, "invalid_query", "{query}");
        assert!(message.contains(mentions), "{query}: {message}");
    }
    let (status, body) = s
        .get(&format!("/api/v1/devices/d1/telemetry?{just_enough}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["series"].as_array().unwrap().len(), 32);
    // Times past year 9999 are taken as its end rather than overflowing anything.
    let (status, body) = s
        .get(&format!(
            "/api/v1/devices/d1/telemetry?metric=t&from=0&to={}&step=1d",
            i64::MAX
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["points"], json!([]));
    let (status, body) = s
        .get(&format!(
            "/api/v1/devices/d1/telemetry?metrics=t&from={}&to={}",
            i64::MIN,
            i64::MAX
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["from"], -62_167_219_200_000_i64);
    assert_eq!(body["to"], 253_402_300_799_999_i64);
    s.stop().await;
}
