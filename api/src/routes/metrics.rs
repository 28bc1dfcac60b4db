//! `GET /metrics`: Tellus's counters in the Prometheus text format (version 0.0.4), for a
//! Prometheus server (or anything that scrapes it) to collect.
//!
//! Nothing here counts anything: each scrape takes a snapshot of the figures the parts
//! already keep (the gate's [`GateStats`](tellus_broker::gate::GateStats), ingest's
//! [`IngestStats`](tellus_ingest::IngestStats), the rules engine's figures, the QuestDB
//! spool's, the device service's command statuses, the publisher's messages, and how full
//! each bounded queue is) and encodes it with `prometheus-client`, the Prometheus project's
//! own Rust client, through a collector ([`Scrape`]). Reading them is atomic loads and a few
//! short locks, so a scrape needs no blocking thread and never waits on the store.
//!
//! Every name starts with `tellus_`; counters end in `_total`, and units are in the names
//! (`_seconds`, `_bytes`). The families:
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `tellus_build_info` | gauge | `version` | 1, with the version running |
//! | `tellus_connections_open` | gauge | | device connections past their TLS handshake, open now |
//! | `tellus_connections_accepted_total` | counter | | TCP connections the gate accepted |
//! | `tellus_connections_admitted_total` | counter | | connections admitted (CONNACK accepted) |
//! | `tellus_connections_refused_total` | counter | `reason` | connections refused, by reason |
//! | `tellus_connections_closed_total` | counter | `reason` | admitted connections the gate closed: keep-alive expired, registry change, taken over |
//! | `tellus_connections_limited_total` | counter | | times the gate reached `mqtt.max_connections` |
//! | `tellus_rate_limited_total` | counter | | pauses of a connection over its message rate |
//! | `tellus_gate_rejections_total` | counter | `reason` | packets refused from admitted devices: ACL, protocol, size, payload format |
//! | `tellus_audit_dropped_total` | counter | | audit entries shed |
//! | `tellus_messages_in_total` | counter | `kind` | device publishes the ACL allowed: `telemetry`, `state`, `command_result`, `event`, `csr` |
//! | `tellus_messages_out_total` | counter | `kind` | messages Tellus published to devices: `command`, `desired_state`, `certificate`, `rule`, `other` |
//! | `tellus_ingest_messages_received_total` | counter | | telemetry messages ingest took |
//! | `tellus_ingest_messages_stored_total` | counter | | messages committed to the store |
//! | `tellus_ingest_points_stored_total` | counter | | points (one metric at one time) committed |
//! | `tellus_ingest_messages_deadlettered_total` | counter | `kind` | messages kept as dead letters, by kind of reason |
//! | `tellus_ingest_messages_failed_total` | counter | | messages whose commit failed (not acknowledged) |
//! | `tellus_ingest_commits_total` | counter | | transactions committed |
//! | `tellus_ingest_commit_duration_seconds` | histogram | | commit latency, start of transaction to durable end |
//! | `tellus_ingest_housekeeping_duration_seconds` | histogram | | how long each housekeeping step held the ingest thread |
//! | `tellus_queue_length`, `tellus_queue_capacity` | gauge | `queue` | items waiting in a bounded queue, and its bound: `ingest`, `rule_feed`, `audit`, `publisher` |
//! | `tellus_queue_bytes`, `tellus_queue_capacity_bytes` | gauge | `queue` | bytes held by a queue with a byte budget (`ingest`, `rule_feed`), and the budget |
//! | `tellus_questdb_spool_pending_points` | gauge | | with the QuestDB store: points waiting in the spool |
//! | `tellus_questdb_points_spooled_total`, `…_drained_total`, `…_refused_total`, `tellus_questdb_send_errors_total` | counter | | with the QuestDB store: the spool's counters |
//! | `tellus_rules_inputs_total` | counter | | inputs the rules engine evaluated |
//! | `tellus_rules_busy_seconds_total` | counter | | time the engine spent evaluating them |
//! | `tellus_rules_effects_shed_total` | counter | | effects shed (a full webhook queue) |
//! | `tellus_rule_evaluations_total`, `_matches_total`, `_not_applicable_total`, `_condition_errors_total`, `_fired_total`, `_actions_succeeded_total`, `_actions_failed_total`, `_function_calls_total`, `_function_errors_total`, `_function_timeouts_total`, `_function_out_of_memory_total` | counter | `rule` | per loaded rule (by id), since it was last enabled or the process started |
//! | `tellus_commands_total` | counter | `status` | commands that reached each status (`queued` … `cancelled`) |

use std::fmt::Write as _;

use axum::{
    extract::State,
    http::header::CONTENT_TYPE,
    response::{IntoResponse, Response},
};
use prometheus_client::{
    collector::Collector,
    encoding::{prometheus_text, DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::{Registry, Unit},
};
use tellus_broker::{
    gate::GateStatsSnapshot,
    routing::{OutKind, PublisherStats},
};
use tellus_core::{CommandStatus, QueueGauge};
use tellus_ingest::{
    pipeline::{HistogramSnapshot, IngestStatsSnapshot},
    SpoolStats,
};
use tellus_rules::engine::{EngineFigures, RuleFiguresSnapshot};

use crate::{openapi as doc, ApiError, AppState};

/// What the metrics read besides what the rest of the API already holds: the bounded queues
/// (through gauges that never keep a queue open) and the publisher's counters. The default
/// is a Tellus without them (the API's own tests): empty queues, nothing published.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// The gate's hand-off to ingest (messages and payload bytes).
    pub ingest_queue: QueueGauge,
    /// The rule feed (hand-overs and bytes).
    pub rule_feed: QueueGauge,
    /// Audit entries waiting for their writer.
    pub audit_queue: QueueGauge,
    /// Messages waiting for the publisher's link into the routing core.
    pub publisher_queue: QueueGauge,
    /// Messages published to devices, by kind.
    pub published: std::sync::Arc<PublisherStats>,
}

/// Every counter, gauge and histogram, in the Prometheus text format.
///
/// Names are prefixed `tellus_`; the module's table lists them. Scrape it with a viewer
/// token (`authorization: {credentials: …}` in Prometheus's scrape config).
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "health",
    responses(
        (status = 200, description = "The figures, in the Prometheus text format 0.0.4",
            body = String, content_type = "text/plain; version=0.0.4; charset=utf-8"),
        doc::Guarded,
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn get(State(state): State<AppState>) -> Result<Response, ApiError> {
    let scrape = Scrape::take(&state);
    let mut registry = Registry::with_prefix("tellus");
    registry.register_collector(Box::new(scrape));
    let mut body = String::with_capacity(16 * 1024);
    prometheus_text::encode(&mut body, &registry).map_err(ApiError::internal)?;
    Ok(([(CONTENT_TYPE, prometheus_text::CONTENT_TYPE)], body).into_response())
}

/// One queue as a scrape saw it.
#[derive(Debug)]
struct QueueReading {
    name: &'static str,
    len: usize,
    capacity: usize,
    bytes: Option<(usize, usize)>,
}

impl QueueReading {
    fn of(name: &'static str, gauge: &QueueGauge) -> QueueReading {
        QueueReading {
            name,
            len: gauge.len(),
            capacity: gauge.capacity(),
            bytes: gauge.bytes(),
        }
    }
}

/// Everything one scrape shows, copied at once; the collector encodes it.
#[derive(Debug)]
pub struct Scrape {
    gate: GateStatsSnapshot,
    ingest: IngestStatsSnapshot,
    spool: Option<SpoolStats>,
    engine: EngineFigures,
    rules: Vec<(String, RuleFiguresSnapshot)>,
    commands: Vec<(CommandStatus, u64)>,
    published: Vec<(OutKind, u64)>,
    queues: Vec<QueueReading>,
}

impl Scrape {
    fn take(state: &AppState) -> Scrape {
        let sources = &state.metrics;
        Scrape {
            gate: state.gate_stats.snapshot(),
            ingest: state.ingest_stats.snapshot(),
            spool: state.store.spool(),
            engine: state.rules.figures().engine(),
            rules: state.rules.figures().all(),
            commands: state.devices.commands_reached(),
            published: OutKind::ALL
                .iter()
                .map(|k| (*k, sources.published.published(*k)))
                .collect(),
            queues: vec![
                QueueReading::of("ingest", &sources.ingest_queue),
                QueueReading::of("rule_feed", &sources.rule_feed),
                QueueReading::of("audit", &sources.audit_queue),
                QueueReading::of("publisher", &sources.publisher_queue),
            ],
        }
    }
}

type Encoded = Result<(), std::fmt::Error>;

/// A metric without labels.
fn one(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric: impl EncodeMetric,
) -> Encoded {
    let m = e.encode_descriptor(name, help, unit, metric.metric_type())?;
    metric.encode(m)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Encoded {
    one(e, name, help, None, ConstCounter::new(value))
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Encoded {
    one(e, name, help, None, gauge_of(value))
}

fn gauge_of(value: impl TryInto<i64>) -> ConstGauge<i64> {
    ConstGauge::new(value.try_into().unwrap_or(i64::MAX))
}

/// A family: one series per label value (`label` names the label).
fn family<'a, M: EncodeMetric>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric_type: MetricType,
    label: &'static str,
    series: impl IntoIterator<Item = (&'a str, M)>,
) -> Encoded {
    let mut m = e.encode_descriptor(name, help, unit, metric_type)?;
    for (value, metric) in series {
        labelled(&mut m, [(label, value)], metric)?;
    }
    Ok(())
}

fn labelled(
    m: &mut MetricEncoder,
    labels: impl EncodeLabelSet,
    metric: impl EncodeMetric,
) -> Encoded {
    metric.encode(m.encode_family(&labels)?)
}

fn counters<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    series: impl IntoIterator<Item = (&'a str, u64)>,
) -> Encoded {
    let series = series.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
    family(e, name, help, None, MetricType::Counter, label, series)
}

/// A latency histogram kept in milliseconds (cumulative buckets), in seconds.
fn histogram(e: &mut DescriptorEncoder, name: &str, help: &str, h: &HistogramSnapshot) -> Encoded {
    let mut m = e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    // The encoder takes each bucket's own count and sums them; the snapshot's are already
    // cumulative. The last bucket (no bound) is +Inf, which the encoder writes from `count`.
    let mut below = 0;
    let buckets: Vec<(f64, u64)> = h
        .buckets
        .iter()
        .filter_map(|b| {
            let le = b.le_ms? as f64 / 1_000.0;
            let own = b.count.saturating_sub(below);
            below = b.count;
            Some((le, own))
        })
        .collect();
    m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        h.sum_ms / 1_000.0,
        h.count,
        &buckets,
        None,
    )
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Encoded {
        let e = &mut e;
        {
            let mut m = e.encode_descriptor(
                "build",
                "The version of Tellus running (always 1).",
                None,
                MetricType::Info,
            )?;
            m.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;
        }
        self.connections(e)?;
        self.messages(e)?;
        self.ingest(e)?;
        self.queues(e)?;
        self.spool(e)?;
        self.rules(e)?;
        counters(
            e,
            "commands",
            "Commands that reached each status since the process started (a command counts \
             once in every status it passes through).",
            "status",
            self.commands.iter().map(|(s, n)| (s.as_str(), *n)),
        )
    }
}

impl Scrape {
    fn connections(&self, e: &mut DescriptorEncoder) -> Encoded {
        let g = &self.gate;
        gauge(
            e,
            "connections_open",
            "Device connections past their TLS handshake, open now.",
            g.active,
        )?;
        counter(
            e,
            "connections_accepted",
            "TCP connections the gate accepted on the MQTT listener.",
            g.accepted,
        )?;
        counter(
            e,
            "connections_admitted",
            "Device connections admitted (CONNACK accepted).",
            g.connected,
        )?;
        counters(
            e,
            "connections_refused",
            "Device connections refused, by reason.",
            "reason",
            [
                ("handshake_failed", g.handshake_failed),
                ("handshake_timeout", g.handshake_timeout),
                ("connect_timeout", g.connect_timeout),
                ("unknown_device", g.refused_unknown_device),
                ("client_id", g.refused_client_id),
                ("disabled", g.refused_disabled),
                ("revoked", g.refused_revoked),
                ("certificate", g.refused_certificate),
                ("protocol", g.refused_protocol),
                ("unavailable", g.refused_unavailable),
            ],
        )?;
        counters(
            e,
            "connections_closed",
            "Admitted device connections the gate closed, by reason.",
            "reason",
            [
                ("keep_alive_expired", g.keep_alive_expired),
                ("registry", g.closed_by_registry),
                ("taken_over", g.taken_over),
            ],
        )?;
        counter(
            e,
            "connections_limited",
            "Times the gate reached mqtt.max_connections (further connections wait).",
            g.connections_limited,
        )?;
        counter(
            e,
            "rate_limited",
            "Pauses of a device connection over its message rate (it is slowed, nothing is \
             dropped).",
            g.rate_limited,
        )?;
        counters(
            e,
            "gate_rejections",
            "Packets the gate refused from devices, by reason.",
            "reason",
            [
                ("acl_denied", g.acl_denied),
                ("protocol_error", g.protocol_errors),
                ("packet_too_large", g.packet_too_large),
                ("payload_invalid", g.payload_invalid),
            ],
        )?;
        counter(
            e,
            "audit_dropped",
            "Audit entries shed (a full queue, or refusals of unnamed connections over their rate).",
            g.audit_dropped,
        )
    }

    fn messages(&self, e: &mut DescriptorEncoder) -> Encoded {
        let g = &self.gate;
        counters(
            e,
            "messages_in",
            "Publishes from devices that the topic ACL allowed, by kind.",
            "kind",
            [
                ("telemetry", g.telemetry_received),
                ("state", g.state_reports),
                ("command_result", g.command_results),
                ("event", g.events),
                ("csr", g.csrs),
            ],
        )?;
        counters(
            e,
            "messages_out",
            "Messages Tellus published to devices through the routing core, by kind.",
            "kind",
            self.published.iter().map(|(k, n)| (k.as_str(), *n)),
        )
    }

    fn ingest(&self, e: &mut DescriptorEncoder) -> Encoded {
        let i = &self.ingest;
        counter(
            e,
            "ingest_messages_received",
            "Telemetry messages ingest took from the gate.",
            i.received,
        )?;
        counter(
            e,
            "ingest_messages_stored",
            "Telemetry messages committed to the store.",
            i.stored,
        )?;
        counter(
            e,
            "ingest_points_stored",
            "Points (one metric of a device at one time) committed to the store.",
            i.samples,
        )?;
        counters(
            e,
            "ingest_messages_deadlettered",
            "Telemetry messages kept as dead letters, by kind of reason.",
            "kind",
            i.rejected.iter().map(|(k, n)| (*k, *n)),
        )?;
        counter(
            e,
            "ingest_messages_failed",
            "Telemetry messages whose commit failed (not acknowledged).",
            i.failed,
        )?;
        counter(
            e,
            "ingest_commits",
            "Transactions ingest committed.",
            i.commits,
        )?;
        histogram(
            e,
            "ingest_commit_duration",
            "How long commits took, from the start of the transaction to its durable end.",
            &i.commit_latency,
        )?;
        histogram(
            e,
            "ingest_housekeeping_duration",
            "How long each housekeeping step held the ingest thread.",
            &i.housekeeping_latency,
        )
    }

    fn queues(&self, e: &mut DescriptorEncoder) -> Encoded {
        let q = &self.queues;
        family(
            e,
            "queue_length",
            "Items waiting in a bounded queue.",
            None,
            MetricType::Gauge,
            "queue",
            q.iter().map(|r| (r.name, gauge_of(r.len))),
        )?;
        family(
            e,
            "queue_capacity",
            "Most items a bounded queue holds.",
            None,
            MetricType::Gauge,
            "queue",
            q.iter().map(|r| (r.name, gauge_of(r.capacity))),
        )?;
        let budgets: Vec<_> = q
            .iter()
            .filter_map(|r| r.bytes.map(|b| (r.name, b)))
            .collect();
        family(
            e,
            "queue",
            "Bytes held by a queue with a byte budget.",
            Some(&Unit::Bytes),
            MetricType::Gauge,
            "queue",
            budgets
                .iter()
                .map(|(name, (used, _))| (*name, gauge_of(*used))),
        )?;
        family(
            e,
            "queue_capacity",
            "The byte budget of a queue.",
            Some(&Unit::Bytes),
            MetricType::Gauge,
            "queue",
            budgets
                .iter()
                .map(|(name, (_, max))| (*name, gauge_of(*max))),
        )
    }

    fn spool(&self, e: &mut DescriptorEncoder) -> Encoded {
        let Some(s) = &self.spool else {
            return Ok(());
        };
        gauge(
            e,
            "questdb_spool_pending_points",
            "Points waiting in the local spool for QuestDB.",
            s.pending,
        )?;
        counter(
            e,
            "questdb_points_spooled",
            "Points committed into the spool.",
            s.spooled,
        )?;
        counter(
            e,
            "questdb_points_drained",
            "Points QuestDB confirmed.",
            s.drained,
        )?;
        counter(
            e,
            "questdb_points_refused",
            "Points QuestDB refused as bad data (now dead letters).",
            s.refused,
        )?;
        counter(
            e,
            "questdb_send_errors",
            "Failed attempts to reach QuestDB (the points stayed in the spool).",
            s.send_errors,
        )
    }

    fn rules(&self, e: &mut DescriptorEncoder) -> Encoded {
        let engine = &self.engine;
        counter(
            e,
            "rules_inputs",
            "Inputs the rules engine evaluated (with an enabled rule of their trigger).",
            engine.inputs,
        )?;
        let busy = engine.mean_us_per_input * engine.inputs as f64 / 1_000_000.0;
        one(
            e,
            "rules_busy",
            "Time the rules engine spent evaluating inputs.",
            Some(&Unit::Seconds),
            ConstCounter::new(busy),
        )?;
        counter(
            e,
            "rules_effects_shed",
            "Rule effects shed (a full webhook queue); each also counts as a failed action.",
            engine.effects_shed,
        )?;
        type Field = fn(&RuleFiguresSnapshot) -> u64;
        let per_rule: [(&str, &str, Field); 11] = [
            ("rule_evaluations", "Evaluations of a rule.", |f| {
                f.evaluations
            }),
            ("rule_matches", "Evaluations whose condition held.", |f| {
                f.matches
            }),
            (
                "rule_not_applicable",
                "Evaluations whose condition read a key the input lacks.",
                |f| f.not_applicable,
            ),
            (
                "rule_condition_errors",
                "Evaluations whose condition failed.",
                |f| f.condition_errors,
            ),
            ("rule_fired", "Times a rule fired its actions.", |f| f.fired),
            (
                "rule_actions_succeeded",
                "Actions of a rule carried out.",
                |f| f.actions_succeeded,
            ),
            (
                "rule_actions_failed",
                "Actions of a rule that failed.",
                |f| f.actions_failed,
            ),
            (
                "rule_function_calls",
                "Calls of a rule's JavaScript functions.",
                |f| f.function_calls,
            ),
            (
                "rule_function_errors",
                "Calls of a rule's functions that failed.",
                |f| f.function_errors,
            ),
            (
                "rule_function_timeouts",
                "Calls of a rule's functions past their deadline.",
                |f| f.function_timeouts,
            ),
            (
                "rule_function_out_of_memory",
                "Calls of a rule's functions past their memory limit.",
                |f| f.function_out_of_memory,
            ),
        ];
        for (name, help, field) in per_rule {
            let mut help = help.to_owned();
            let _ = write!(
                help,
                " Per loaded rule, by id, since it was last enabled or the process started."
            );
            counters(
                e,
                name,
                &help,
                "rule",
                self.rules.iter().map(|(id, f)| (id.as_str(), field(f))),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tellus_ingest::pipeline::LatencyBucket;

    use super::*;

    fn encode(scrape: Scrape) -> String {
        let mut registry = Registry::with_prefix("tellus");
        registry.register_collector(Box::new(scrape));
        let mut out = String::new();
        prometheus_text::encode(&mut out, &registry).unwrap();
        out
    }

    fn empty() -> Scrape {
        Scrape {
            gate: tellus_broker::gate::GateStats::default().snapshot(),
            ingest: tellus_ingest::IngestStats::default().snapshot(),
            spool: None,
            engine: tellus_rules::engine::Figures::default().engine(),
            rules: Vec::new(),
            commands: vec![(CommandStatus::Queued, 3)],
            published: vec![(OutKind::Command, 2)],
            queues: vec![QueueReading {
                name: "ingest",
                len: 5,
                capacity: 4096,
                bytes: Some((100, 1000)),
            }],
        }
    }

    #[test]
    fn names_types_and_units() {
        let text = encode(empty());
        for line in [
            "# TYPE tellus_connections_open gauge",
            "# TYPE tellus_connections_refused_total counter",
            "tellus_connections_refused_total{reason=\"revoked\"} 0",
            "tellus_commands_total{status=\"queued\"} 3",
            "tellus_messages_out_total{kind=\"command\"} 2",
            "tellus_queue_length{queue=\"ingest\"} 5",
            "tellus_queue_bytes{queue=\"ingest\"} 100",
            "tellus_queue_capacity_bytes{queue=\"ingest\"} 1000",
            "# TYPE tellus_ingest_commit_duration_seconds histogram",
            "tellus_build_info{version=\"",
        ] {
            assert!(text.lines().any(|l| l.starts_with(line)), "{line}\n{text}");
        }
        // No spool without the QuestDB store.
        assert!(!text.contains("questdb"), "{text}");
    }

    #[test]
    fn histograms_are_cumulative_in_seconds() {
        let mut scrape = empty();
        // 2 commits under 1 ms, 1 under 5 ms, 1 beyond the last bound.
        scrape.ingest.commit_latency = HistogramSnapshot {
            buckets: [(Some(1), 2), (Some(5), 3), (None, 4)]
                .into_iter()
                .map(|(le_ms, count)| LatencyBucket { le_ms, count })
                .collect(),
            count: 4,
            sum_ms: 6500.0,
        };
        let text = encode(scrape);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("tellus_ingest_commit_duration_seconds"))
            .collect();
        assert_eq!(
            lines,
            [
                "tellus_ingest_commit_duration_seconds_bucket{le=\"0.001\"} 2",
                "tellus_ingest_commit_duration_seconds_bucket{le=\"0.005\"} 3",
                "tellus_ingest_commit_duration_seconds_bucket{le=\"+Inf\"} 4",
                "tellus_ingest_commit_duration_seconds_sum 6.5",
                "tellus_ingest_commit_duration_seconds_count 4",
            ],
            "{text}"
        );
    }
}
