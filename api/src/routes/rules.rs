//! Rules: `POST /api/v1/rules` creates one, `GET /api/v1/rules` lists them,
//! `GET`/`PUT`/`DELETE /api/v1/rules/{id}` shows, replaces or deletes one,
//! `POST /api/v1/rules/{id}/enable` and `…/disable` switch it, and `POST /api/v1/rules/test`
//! runs one (saved or given) over given messages or a device's stored telemetry without
//! doing anything. Every change takes effect at once, without a restart.
//!
//! A rule is checked (its CEL compiled, its function compiled) before it is stored: a rule
//! that would not run is refused with `invalid_rule` and the reason. Each rule is shown with
//! its figures since it was last enabled or the process started (evaluations, matches, actions that succeeded and
//! failed, the last errors, the time it takes per message).

use std::collections::BTreeMap;

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    Extension, Json,
};
use serde::{Deserialize, Serialize};
use tellus_core::{
    now_ms, rule::new_rule_id, rule::InputKind, DeviceId, Rule, RuleInput, RuleSpec, TimestampMs,
    Trigger, Value,
};
use tellus_rules::{
    dry::{dry_run, DryRun, MAX_INPUTS},
    engine::{Compiled, RuleFiguresSnapshot},
    expr::with_stack,
};

use super::{blocking, page, page_limit, IdPage};
use crate::{
    auth::{Caller, Role},
    extract, openapi as doc, timestamps, ApiError, AppState,
};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1_000;

/// A rule and how it has done.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RuleView {
    #[serde(flatten)]
    pub rule: Rule,
    /// Since it was last enabled or the process started; `null` for a rule the engine has
    /// not loaded (disabled).
    pub figures: Option<RuleFiguresSnapshot>,
}

/// The rule as `caller` may see it: webhook URLs beyond the host and header values are
/// hidden from all but admins.
fn view(state: &AppState, mut rule: Rule, caller: &Caller) -> RuleView {
    if caller.role < Role::Admin {
        rule.spec.hide_secrets();
    }
    RuleView {
        figures: state.rules.figures().get(&rule.id),
        rule,
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleBody {
    #[serde(flatten)]
    pub spec: RuleSpec,
    /// Default true.
    pub enabled: Option<bool>,
    /// For `PUT`: refuse the change unless the rule is at this version.
    pub version: Option<u64>,
}

/// Compiles the rule as the engine would; the error is for whoever wrote it.
async fn check(rule: Rule) -> Result<Rule, ApiError> {
    let checked = tokio::task::spawn_blocking(move || {
        with_stack(move || Compiled::new(&rule, Default::default()).map(|_| rule))
    })
    .await?;
    checked.map_err(ApiError::InvalidRule)
}

/// Create a rule.
///
/// Checked first (its CEL and functions compiled): a rule that would not run is refused
/// with `invalid_rule` and why. 201 with the rule; it runs at once unless `enabled` is false.
#[utoipa::path(
    post,
    path = "/rules",
    operation_id = "create_rule",
    tag = "rules",
    request_body = RuleBody,
    responses(
        (status = 201, description = "The rule", body = RuleView),
        (status = 400, description = "A rule that would not run (`invalid_rule`), or a bad body (`invalid_body`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 409, description = "The registry refused it (`refused`)", body = doc::ErrorBody),
        (status = 413, response = doc::PayloadTooLarge),
        (status = 415, response = doc::UnsupportedMediaType),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["admin"]))
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    extract::Json(body): extract::Json<RuleBody>,
) -> Result<Response, ApiError> {
    let now = now_ms();
    let rule = check(Rule {
        id: new_rule_id(),
        spec: body.spec,
        enabled: body.enabled.unwrap_or(true),
        version: 1,
        created_at_ms: now,
        updated_at_ms: now,
    })
    .await?;
    let registry = state.registry.clone();
    let stored = rule.clone();
    blocking(move || registry.insert_rule(&stored)).await?;
    tracing::info!(rule = %rule.id, name = %rule.spec.name, "rule created");
    state.rules.reload().await;
    Ok((StatusCode::CREATED, Json(view(&state, rule, &caller))).into_response())
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RuleList {
    pub rules: Vec<RuleView>,
    pub next: Option<String>,
}

/// List rules.
///
/// By id, paged by `after`, each with its figures.
#[utoipa::path(
    get,
    path = "/rules",
    operation_id = "list_rules",
    tag = "rules",
    params(IdPage),
    responses(
        (status = 200, description = "A page of rules", body = RuleList),
        (status = 400, description = "A bad parameter (`invalid_query`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    extract::Query(q): extract::Query<IdPage>,
) -> Result<Json<RuleList>, ApiError> {
    let limit = page_limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let registry = state.registry.clone();
    let rows = blocking(move || registry.rules(q.after.as_deref(), limit + 1)).await?;
    let (rules, next) = page(rows, limit, |r| r.id.clone());
    Ok(Json(RuleList {
        rules: rules
            .into_iter()
            .map(|r| view(&state, r, &caller))
            .collect(),
        next,
    }))
}

async fn find(state: &AppState, id: String) -> Result<Rule, ApiError> {
    let registry = state.registry.clone();
    let key = id.clone();
    blocking(move || registry.rule(&key))
        .await?
        .ok_or(ApiError::RuleNotFound(id))
}

/// Show a rule.
///
/// With its figures since it was last enabled or the process started: evaluations, matches, actions that failed,
/// the last errors.
#[utoipa::path(
    get,
    path = "/rules/{id}",
    operation_id = "get_rule",
    tag = "rules",
    params(("id" = String, Path, description = "The rule's id (`r-` and 20 hex digits)")),
    responses(
        (status = 200, description = "The rule", body = RuleView),
        (status = 400, description = "A path that is not UTF-8 once decoded (`invalid_path`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such rule (`rule_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn get_one(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    extract::Path(id): extract::Path<String>,
) -> Result<Json<RuleView>, ApiError> {
    let rule = find(&state, id).await?;
    Ok(Json(view(&state, rule, &caller)))
}

/// Replace a rule.
///
/// The rule (and `enabled`, when given); with `version`, only if the rule is still at that
/// version (409 otherwise). A changed rule starts over:
/// its open alerts are cleared (`rule_changed`), and raised again if its new condition
/// holds. The same rule again changes nothing.
#[utoipa::path(
    put,
    path = "/rules/{id}",
    operation_id = "replace_rule",
    tag = "rules",
    params(("id" = String, Path, description = "The rule's id (`r-` and 20 hex digits)")),
    request_body = RuleBody,
    responses(
        (status = 200, description = "The rule after", body = RuleView),
        (status = 400, description = "A rule that would not run (`invalid_rule`), or a bad body or path (`invalid_body`, `invalid_path`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such rule (`rule_not_found`)", body = doc::ErrorBody),
        (status = 409, description = "The rule is no longer at `version` (`refused`)", body = doc::ErrorBody),
        (status = 413, response = doc::PayloadTooLarge),
        (status = 415, response = doc::UnsupportedMediaType),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["admin"]))
)]
pub async fn replace(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    extract::Path(id): extract::Path<String>,
    extract::Json(body): extract::Json<RuleBody>,
) -> Result<Json<RuleView>, ApiError> {
    let current = find(&state, id.clone()).await?;
    if body.version.is_some_and(|v| v != current.version) {
        return Err(tellus_core::RegistryError::VersionConflict {
            current: current.version,
        }
        .into());
    }
    let enabled = body.enabled.filter(|&e| e != current.enabled);
    if body.spec == current.spec && enabled.is_none() {
        return Ok(Json(view(&state, current, &caller)));
    }
    let changed = body.spec != current.spec;
    let will_run = enabled.unwrap_or(current.enabled);
    // Checked whenever it is to run: a new spec, or a stored one being enabled (a rule
    // stored by an older version may no longer compile).
    let checked = if changed || will_run {
        Some(
            check(Rule {
                spec: body.spec,
                ..current
            })
            .await?
            .spec,
        )
    } else {
        None
    };
    update(
        &state,
        id,
        checked.filter(|_| changed),
        enabled,
        body.version,
        &caller,
    )
    .await
}

/// Changes the rule; a changed spec or a disabled rule clears its open alerts (their
/// condition may no longer be evaluated, so nothing else would).
async fn update(
    state: &AppState,
    id: String,
    spec: Option<RuleSpec>,
    enabled: Option<bool>,
    version: Option<u64>,
    caller: &Caller,
) -> Result<Json<RuleView>, ApiError> {
    let registry = state.registry.clone();
    let key = id.clone();
    let now = now_ms();
    let changed = spec.is_some();
    let (rule, cleared) = blocking(move || {
        let Some(rule) = registry.update_rule(&key, spec.as_ref(), enabled, version, now)? else {
            return Ok((None, Vec::new()));
        };
        let cleared = if !rule.enabled {
            registry.clear_rule_alerts(&key, "rule_disabled", now)?
        } else if changed {
            registry.clear_rule_alerts(&key, "rule_changed", now)?
        } else {
            Vec::new()
        };
        Ok::<_, tellus_core::RegistryError>((Some(rule), cleared))
    })
    .await?;
    let rule = rule.ok_or(ApiError::RuleNotFound(id))?;
    for alert in cleared {
        tellus_rules::service::tell(&state.live, alert);
    }
    tracing::info!(rule = %rule.id, version = rule.version, enabled = rule.enabled, "rule changed");
    state.rules.reload().await;
    Ok(Json(view(state, rule, caller)))
}

/// Enable a rule.
///
/// An enabled rule is left as it is; a stored rule that no longer compiles is refused
/// (`invalid_rule`).
#[utoipa::path(
    post,
    path = "/rules/{id}/enable",
    operation_id = "enable_rule",
    tag = "rules",
    params(("id" = String, Path, description = "The rule's id (`r-` and 20 hex digits)")),
    responses(
        (status = 200, description = "The rule, enabled", body = RuleView),
        (status = 400, description = "The rule no longer compiles (`invalid_rule`), or a bad path (`invalid_path`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such rule (`rule_not_found`)", body = doc::ErrorBody),
        (status = 409, description = "The registry refused it (`refused`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["operator"]))
)]
pub async fn enable(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    extract::Path(id): extract::Path<String>,
) -> Result<Json<RuleView>, ApiError> {
    let rule = find(&state, id.clone()).await?;
    if rule.enabled {
        return Ok(Json(view(&state, rule, &caller)));
    }
    // A rule stored by an older version may no longer compile: it is not enabled then.
    check(rule).await?;
    update(&state, id, None, Some(true), None, &caller).await
}

/// Disable a rule.
///
/// Its open alerts are cleared (`rule_disabled`); a disabled rule is left as it is.
#[utoipa::path(
    post,
    path = "/rules/{id}/disable",
    operation_id = "disable_rule",
    tag = "rules",
    params(("id" = String, Path, description = "The rule's id (`r-` and 20 hex digits)")),
    responses(
        (status = 200, description = "The rule, disabled", body = RuleView),
        (status = 400, description = "A path that is not UTF-8 once decoded (`invalid_path`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such rule (`rule_not_found`)", body = doc::ErrorBody),
        (status = 409, description = "The registry refused it (`refused`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["operator"]))
)]
pub async fn disable(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    extract::Path(id): extract::Path<String>,
) -> Result<Json<RuleView>, ApiError> {
    let rule = find(&state, id.clone()).await?;
    if !rule.enabled {
        return Ok(Json(view(&state, rule, &caller)));
    }
    update(&state, id, None, Some(false), None, &caller).await
}

/// Delete a rule.
///
/// 204; its open alerts are cleared (`rule_deleted`).
#[utoipa::path(
    delete,
    path = "/rules/{id}",
    operation_id = "delete_rule",
    tag = "rules",
    params(("id" = String, Path, description = "The rule's id (`r-` and 20 hex digits)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "A path that is not UTF-8 once decoded (`invalid_path`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such rule (`rule_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["admin"]))
)]
pub async fn delete(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
) -> Result<StatusCode, ApiError> {
    let registry = state.registry.clone();
    let key = id.clone();
    let cleared = blocking(move || registry.delete_rule(&key, now_ms()))
        .await?
        .ok_or(ApiError::RuleNotFound(id.clone()))?;
    for alert in cleared {
        tellus_rules::service::tell(&state.live, alert);
    }
    tracing::info!(rule = %id, "rule deleted");
    state.rules.reload().await;
    Ok(StatusCode::NO_CONTENT)
}

/// One message of a dry run; which fields it needs depends on the rule's trigger:
/// `metrics` (telemetry), `state` and `patch` (state), `online` and `reason` (presence),
/// `event` and `payload` (event).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestMessage {
    #[schema(value_type = DeviceId)]
    pub device: String,
    /// When it happens (RFC 3339 or epoch ms); default: now, one millisecond apart.
    #[schema(value_type = Option<Time>)]
    pub at: Option<serde_json::Value>,
    /// The device's tags; default: its registered ones.
    pub tags: Option<BTreeMap<String, String>>,
    #[schema(value_type = Option<BTreeMap<String, InputValue>>)]
    pub metrics: Option<BTreeMap<String, Value>>,
    pub state: Option<serde_json::Value>,
    pub patch: Option<serde_json::Value>,
    pub online: Option<bool>,
    pub reason: Option<String>,
    pub event: Option<String>,
    pub payload: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestBody {
    /// A saved rule, by id …
    pub rule_id: Option<String>,
    /// … or one given here.
    pub rule: Option<RuleSpec>,
    /// Messages to run it over …
    pub messages: Option<Vec<TestMessage>>,
    /// … or a device's stored telemetry from `from` to `to` (telemetry rules).
    #[schema(value_type = Option<DeviceId>)]
    pub device: Option<String>,
    #[schema(value_type = Option<Time>)]
    pub from: Option<serde_json::Value>,
    #[schema(value_type = Option<Time>)]
    pub to: Option<serde_json::Value>,
}

/// The schema of a time in a dry run's body: milliseconds since the Unix epoch, or RFC 3339.
struct Time;

impl utoipa::PartialSchema for Time {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::{
            schema::AnyOfBuilder, KnownFormat, ObjectBuilder, SchemaFormat, Type,
        };
        AnyOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64))),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
            )
            .description(Some(
                "Milliseconds since the Unix epoch, or an RFC 3339 time",
            ))
            .into()
    }
}

impl utoipa::ToSchema for Time {}

/// The schema of a metric's value in a dry run's message: what a device may send.
struct InputValue;

impl utoipa::PartialSchema for InputValue {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::{schema::AnyOfBuilder, ObjectBuilder, Type};
        let of = |t: Type| ObjectBuilder::new().schema_type(t);
        AnyOfBuilder::new()
            .item(of(Type::Boolean))
            .item(of(Type::Integer))
            .item(of(Type::Number))
            .item(of(Type::String))
            .description(Some("A boolean, a number or a text"))
            .into()
    }
}

impl utoipa::ToSchema for InputValue {}

/// Try a rule.
///
/// A saved rule (`rule_id`) or one given (`rule`), over given `messages` or a device's stored
/// telemetry (`device`, `from`, `to`): every match and every action it would have taken.
/// Nothing is done.
#[utoipa::path(
    post,
    path = "/rules/test",
    operation_id = "test_rule",
    tag = "rules",
    request_body = TestBody,
    responses(
        (status = 200, description = "What the rule would have done", body = DryRun),
        (status = 400, description = "A bad body (`invalid_body`, `invalid_device_id`, `invalid_query` for a bad time), or a rule that would not run (`invalid_rule`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No rule `rule_id` (`rule_not_found`)", body = doc::ErrorBody),
        (status = 413, response = doc::PayloadTooLarge),
        (status = 415, response = doc::UnsupportedMediaType),
        (status = 500, response = doc::Internal),
        (status = 503, response = doc::StoreUnavailable),
    ),
    security(("token" = ["viewer"]))
)]
pub async fn test(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    extract::Json(body): extract::Json<TestBody>,
) -> Result<Json<DryRun>, ApiError> {
    let rule = match (body.rule_id, body.rule) {
        (Some(id), None) => find(&state, id).await?,
        (None, Some(spec)) => Rule {
            id: "dry-run".into(),
            spec,
            enabled: true,
            version: 1,
            created_at_ms: 0,
            updated_at_ms: 0,
        },
        _ => {
            return Err(ApiError::InvalidBody(
                "give either \"rule_id\" or \"rule\"".into(),
            ))
        }
    };
    let trigger = rule.spec.trigger;
    let mut truncated = false;
    let (inputs, mut tags, end) = match (body.messages, body.device) {
        (Some(messages), None) => {
            if body.from.is_some() || body.to.is_some() {
                return Err(ApiError::InvalidBody(
                    "\"from\" and \"to\" go with \"device\", not with \"messages\"".into(),
                ));
            }
            let (inputs, tags) = messages_to_inputs(trigger, messages)?;
            (inputs, tags, None)
        }
        (None, Some(device)) => {
            let device = DeviceId::parse(&device)?;
            if trigger != Trigger::Telemetry {
                return Err(ApiError::InvalidBody(
                    "a run over stored data needs a telemetry rule".into(),
                ));
            }
            let (from, to) = match (&body.from, &body.to) {
                (Some(f), Some(t)) => (time("from", f)?, time("to", t)?),
                _ => {
                    return Err(ApiError::InvalidBody(
                        "a run over stored data needs \"from\" and \"to\"".into(),
                    ))
                }
            };
            if from > to {
                return Err(ApiError::InvalidBody("\"from\" is after \"to\"".into()));
            }
            let (inputs, cut) = stored_inputs(&state, device, from, to).await?;
            truncated = cut;
            (inputs, BTreeMap::new(), Some(to))
        }
        _ => {
            return Err(ApiError::InvalidBody(
                "give either \"messages\" or \"device\" with \"from\" and \"to\"".into(),
            ))
        }
    };
    // Registered tags for the devices whose message gave none.
    let wanted: Vec<DeviceId> = inputs
        .iter()
        .map(|i| i.device.clone())
        .filter(|d| !tags.contains_key(d))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let registry = state.registry.clone();
    let registered = blocking(move || {
        let mut found = BTreeMap::new();
        for device in wanted {
            if let Some(record) = registry.device(&device)? {
                found.insert(device, record.tags);
            }
        }
        Ok::<_, tellus_core::RegistryError>(found)
    })
    .await?;
    tags.extend(registered);
    let mut run = tokio::task::spawn_blocking(move || dry_run(&rule, inputs, tags, end))
        .await?
        .map_err(ApiError::InvalidRule)?;
    run.truncated |= truncated;
    if caller.role < Role::Admin {
        run.firings.iter_mut().for_each(|f| f.hide_secrets());
    }
    Ok(Json(run))
}

fn time(name: &str, v: &serde_json::Value) -> Result<TimestampMs, ApiError> {
    match v {
        serde_json::Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| ApiError::InvalidBody(format!("{name}: epoch milliseconds"))),
        serde_json::Value::String(s) => timestamps::parse(name, s),
        _ => Err(ApiError::InvalidBody(format!(
            "{name}: RFC 3339 or epoch milliseconds"
        ))),
    }
}

type Tags = BTreeMap<DeviceId, BTreeMap<String, String>>;

fn messages_to_inputs(
    trigger: Trigger,
    messages: Vec<TestMessage>,
) -> Result<(Vec<RuleInput>, Tags), ApiError> {
    if messages.len() > MAX_INPUTS {
        return Err(ApiError::InvalidBody(format!(
            "at most {MAX_INPUTS} messages"
        )));
    }
    let now = now_ms();
    let mut tags = BTreeMap::new();
    let mut inputs = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let bad = |what: &str| ApiError::InvalidBody(format!("messages[{i}]: {what}"));
        let device = DeviceId::parse(&m.device)?;
        let at_ms = match &m.at {
            Some(at) => time(&format!("messages[{i}].at"), at)?,
            None => now + i as i64,
        };
        let kind = match trigger {
            Trigger::Telemetry => InputKind::Telemetry {
                ts_ms: at_ms,
                metrics: m
                    .metrics
                    .ok_or_else(|| bad("a telemetry rule needs \"metrics\""))?
                    .into_iter()
                    .collect(),
            },
            Trigger::State => {
                let reported = m.state.ok_or_else(|| bad("a state rule needs \"state\""))?;
                InputKind::State {
                    patch: m.patch.unwrap_or_else(|| reported.clone()),
                    reported,
                }
            }
            Trigger::Presence => InputKind::Presence {
                online: m
                    .online
                    .ok_or_else(|| bad("a presence rule needs \"online\""))?,
                reason: m.reason,
            },
            Trigger::Event => InputKind::Event {
                name: m
                    .event
                    .ok_or_else(|| bad("an event rule needs \"event\""))?,
                payload: m.payload.unwrap_or(serde_json::Value::Null),
            },
        };
        if let Some(t) = m.tags {
            tags.insert(device.clone(), t);
        }
        inputs.push(RuleInput {
            device,
            at_ms,
            kind,
        });
    }
    Ok((inputs, tags))
}

/// The device's stored readings from `from` to `to`: its points grouped by timestamp, at
/// most [`MAX_INPUTS`] points in all, and whether some were left out for that.
async fn stored_inputs(
    state: &AppState,
    device: DeviceId,
    from: TimestampMs,
    to: TimestampMs,
) -> Result<(Vec<RuleInput>, bool), ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let mut readings: BTreeMap<TimestampMs, Vec<(String, Value)>> = BTreeMap::new();
        let mut room = MAX_INPUTS;
        let mut cut = false;
        for (metric, _, _) in store.latest(&device)? {
            // One more than there is room for tells whether the series goes on.
            let mut points = store.range(&device, &metric, from, to, room + 1)?;
            if points.len() > room {
                points.truncate(room);
                cut = true;
            }
            room -= points.len();
            for (ts, value) in points {
                readings
                    .entry(ts)
                    .or_default()
                    .push((metric.clone(), value));
            }
        }
        let inputs = readings
            .into_iter()
            .map(|(ts, metrics)| RuleInput {
                device: device.clone(),
                at_ms: ts,
                kind: InputKind::Telemetry { ts_ms: ts, metrics },
            })
            .collect();
        Ok::<_, tellus_ingest::StoreError>((inputs, cut))
    })
    .await
}
