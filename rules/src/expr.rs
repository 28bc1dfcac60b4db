//! CEL expressions: a rule's condition and a derived metric's value, and the scope they are
//! evaluated in.
//!
//! The scope of every input has `device` (`device.id`, `device.tags`), `trigger` (its name)
//! and `at` (when Tellus learnt of it, epoch milliseconds); then, by trigger:
//!
//! | trigger | names |
//! |---|---|
//! | `telemetry` | `metrics` (name → value of one reading), `ts` (the reading's time, ms) |
//! | `state` | `state` (the whole reported document), `patch` (the change) |
//! | `presence` | `online` (bool), `reason` (why it went offline; `""` when online) |
//! | `event` | `event` (its name), `payload` (its JSON, or the text when it is not JSON) |
//!
//! A metric whose name has dots is reached with an index: `metrics["env.temp"]`.
//!
//! A condition that touches a key the input lacks (`metrics.temp` in a reading without
//! `temp`) is neither true nor false but *not applicable*: a humidity-only reading neither
//! raises nor clears a temperature rule's alert. `has(metrics.temp)` tests for it.

use std::{
    collections::BTreeMap,
    sync::{Arc, OnceLock},
};

use cel::{objects::Key, Context, Env, ExecutionError, Program};
use tellus_core::{rule::InputKind, RuleInput, Trigger, Value};

use crate::fast::{Fast, Reading};

/// The longest expression accepted, in bytes.
pub const MAX_EXPR_BYTES: usize = 4_096;
/// The deepest nesting of brackets accepted.
pub const MAX_NESTING: usize = 24;
/// The most operators accepted.
pub const MAX_OPERATORS: usize = 200;
/// The stack of a thread that compiles or evaluates expressions. CEL's parser and evaluator
/// recurse over the expression's tree, deeply in debug builds; [`MAX_NESTING`] and
/// [`MAX_OPERATORS`] bound the tree, and this stack has room for the deepest one allowed.
/// Only the pages touched are ever committed.
pub const STACK_BYTES: usize = 64 << 20;

/// Runs `f` on a thread with a stack of [`STACK_BYTES`]: where expressions are compiled or
/// evaluated outside the engine's own thread (validation and dry runs in the API).
pub fn with_stack<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        match std::thread::Builder::new()
            .name("rules-eval".into())
            .stack_size(STACK_BYTES)
            .spawn_scoped(scope, f)
        {
            Ok(handle) => match handle.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            },
            // No thread to be had (out of memory or thread limit): an error a caller sees.
            Err(e) => panic!("cannot start a thread to evaluate rules: {e}"),
        }
    })
}

/// Refuses expressions whose tree would be deeper than the evaluator's stack allows; counts
/// outside string literals.
fn check_shape(source: &str) -> Result<(), String> {
    let (mut depth, mut deepest, mut operators) = (0usize, 0usize, 0usize);
    let mut quote: Option<char> = None;
    let mut chars = source.chars().peekable();
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            match c {
                '\\' => {
                    chars.next();
                }
                c if c == q => quote = None,
                _ => {}
            }
            continue;
        }
        match c {
            '"' | '\'' => quote = Some(c),
            '(' | '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            '+' | '-' | '*' | '/' | '%' | '!' | '<' | '>' | '=' | '&' | '|' | '?' | ',' => {
                operators += 1
            }
            _ => {}
        }
    }
    if deepest > MAX_NESTING {
        return Err(format!(
            "expression nests brackets {deepest} deep; at most {MAX_NESTING} are allowed"
        ));
    }
    if operators > MAX_OPERATORS {
        return Err(format!(
            "expression has {operators} operators; at most {MAX_OPERATORS} are allowed"
        ));
    }
    Ok(())
}

/// The names each trigger puts in scope, beside `device`, `trigger` and `at`.
fn names(trigger: Trigger) -> &'static [&'static str] {
    match trigger {
        Trigger::Telemetry => &["metrics", "ts"],
        Trigger::State => &["state", "patch"],
        Trigger::Presence => &["online", "reason"],
        Trigger::Event => &["event", "payload"],
    }
}

const TRIGGERS: [Trigger; 4] = [
    Trigger::Telemetry,
    Trigger::State,
    Trigger::Presence,
    Trigger::Event,
];

/// The standard CEL environment, built once.
fn env() -> Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib())).clone()
}

/// How deeply loops (the comprehensions macros expand to) nest in their bodies. Each level
/// multiplies the work by the length of its list, so rules allow one level: the work is then
/// linear in the input's size and the expression's.
fn loop_depth(e: &cel::common::ast::IdedExpr) -> usize {
    use cel::common::ast::Expr as Ast;
    match &e.expr {
        Ast::Comprehension(c) => loop_depth(&c.iter_range).max(loop_depth(&c.accu_init)).max(
            1 + loop_depth(&c.loop_cond)
                .max(loop_depth(&c.loop_step))
                .max(loop_depth(&c.result)),
        ),
        Ast::Call(call) => call
            .target
            .iter()
            .map(|t| loop_depth(t))
            .chain(call.args.iter().map(loop_depth))
            .max()
            .unwrap_or(0),
        Ast::Select(s) => loop_depth(&s.operand),
        Ast::List(l) => l.elements.iter().map(loop_depth).max().unwrap_or(0),
        Ast::Map(m) => entries_depth(&m.entries),
        Ast::Struct(s) => entries_depth(&s.entries),
        _ => 0,
    }
}

fn entries_depth(entries: &[cel::common::ast::IdedEntryExpr]) -> usize {
    use cel::common::ast::EntryExpr;
    entries
        .iter()
        .map(|entry| match &entry.expr {
            EntryExpr::MapEntry(m) => loop_depth(&m.key).max(loop_depth(&m.value)),
            EntryExpr::StructField(f) => loop_depth(&f.value),
        })
        .max()
        .unwrap_or(0)
}

/// A compiled expression.
#[derive(Debug)]
pub struct Expr {
    program: Program,
    /// The fast form (telemetry expressions of the common shapes; [`crate::fast`]).
    fast: Option<Fast>,
}

/// What a condition said about one input.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    True,
    False,
    /// It reads a key the input does not have.
    NotApplicable,
    /// It failed (wrong types, division by zero, not a bool): the text says why.
    Error(String),
}

impl Expr {
    /// Compiles `source` for inputs of `trigger`. Refused: empty or too long source, syntax
    /// errors, and names that only another trigger has (`metrics` in a presence rule).
    pub fn compile(source: &str, trigger: Trigger) -> Result<Expr, String> {
        if source.trim().is_empty() {
            return Err("expression is empty".into());
        }
        if source.len() > MAX_EXPR_BYTES {
            return Err(format!(
                "expression is {} bytes long; at most {MAX_EXPR_BYTES} are allowed",
                source.len()
            ));
        }
        check_shape(source)?;
        let program = env()
            .compile(source)
            .map_err(|e| format!("not valid CEL: {e}"))?;
        if loop_depth(program.expression()) > 1 {
            return Err(
                "a macro (all, exists, exists_one, map, filter) inside another's body is not allowed: its cost would multiply"
                    .into(),
            );
        }
        let references = program.references();
        for other in TRIGGERS.into_iter().filter(|t| *t != trigger) {
            for name in names(other) {
                if references.has_variable(name) && !names(trigger).contains(name) {
                    return Err(format!(
                        "`{name}` is not in scope for a {} rule (it belongs to {} rules); in scope: device, trigger, at, {}",
                        trigger.as_str(),
                        other.as_str(),
                        names(trigger).join(", ")
                    ));
                }
            }
        }
        let fast = match trigger {
            Trigger::Telemetry => Fast::compile(program.expression()),
            _ => None,
        };
        Ok(Expr { program, fast })
    }

    /// The expression's tree.
    pub fn ast(&self) -> &cel::common::ast::IdedExpr {
        self.program.expression()
    }

    /// Evaluates a condition: the fast path where it answers, else the interpreter.
    pub fn test(&self, subject: &Subject<'_>) -> Outcome {
        if let (Some(fast), Some(reading)) = (&self.fast, subject.reading()) {
            match fast.test(&reading) {
                Some(true) => return Outcome::True,
                Some(false) => return Outcome::False,
                None => {}
            }
        }
        self.test_slow(subject.scope())
    }

    /// Evaluates a value (a derived metric): `Ok(None)` when it reads a key the input lacks.
    pub fn value(&self, subject: &Subject<'_>) -> Result<Option<Value>, String> {
        if let (Some(fast), Some(reading)) = (&self.fast, subject.reading()) {
            if let Some(v) = fast.value(&reading) {
                return Ok(Some(v));
            }
        }
        self.value_slow(subject.scope())
    }

    /// A condition, by the interpreter.
    pub(crate) fn test_slow(&self, scope: &Scope) -> Outcome {
        match self.program.execute(&scope.context) {
            Ok(cel::Value::Bool(true)) => Outcome::True,
            Ok(cel::Value::Bool(false)) => Outcome::False,
            Ok(other) => {
                Outcome::Error(format!("condition gave {}, not a bool", type_name(&other)))
            }
            Err(ExecutionError::NoSuchKey(_)) => Outcome::NotApplicable,
            Err(e) => Outcome::Error(cut(e.to_string())),
        }
    }

    /// A value, by the interpreter.
    pub(crate) fn value_slow(&self, scope: &Scope) -> Result<Option<Value>, String> {
        match self.program.execute(&scope.context) {
            Ok(cel::Value::Bool(b)) => Ok(Some(Value::Bool(b))),
            Ok(cel::Value::Int(i)) => Ok(Some(Value::Int(i))),
            Ok(cel::Value::UInt(u)) => i64::try_from(u)
                .map(|i| Some(Value::Int(i)))
                .map_err(|_| format!("{u} does not fit a 64-bit signed integer")),
            Ok(cel::Value::Float(f)) if f.is_finite() => Ok(Some(Value::Float(f))),
            Ok(cel::Value::Float(f)) => Err(format!("{f} is not a finite number")),
            Ok(cel::Value::String(s)) => Ok(Some(Value::Text(s.to_string()))),
            Ok(other) => Err(format!(
                "value is {}, not a number, bool or string",
                type_name(&other)
            )),
            Err(ExecutionError::NoSuchKey(_)) => Ok(None),
            Err(e) => Err(cut(e.to_string())),
        }
    }
}

fn type_name(v: &cel::Value) -> &'static str {
    match v {
        cel::Value::List(_) => "a list",
        cel::Value::Map(_) => "a map",
        cel::Value::Int(_) | cel::Value::UInt(_) => "an int",
        cel::Value::Float(_) => "a double",
        cel::Value::String(_) => "a string",
        cel::Value::Bytes(_) => "bytes",
        cel::Value::Bool(_) => "a bool",
        cel::Value::Null => "null",
        _ => "a value of another type",
    }
}

/// Error texts are kept and shown per rule: 256 bytes at most.
pub(crate) fn cut(mut s: String) -> String {
    if s.len() > 256 {
        let mut end = 256;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// One input and its device's tags, as every rule evaluated on it sees them: read directly
/// by the fast path, and put into a CEL scope (once, when first needed) for the
/// interpreter.
pub struct Subject<'a> {
    input: &'a RuleInput,
    tags: &'a BTreeMap<String, String>,
    scope: std::cell::OnceCell<Scope>,
}

impl<'a> Subject<'a> {
    pub fn new(input: &'a RuleInput, tags: &'a BTreeMap<String, String>) -> Subject<'a> {
        Subject {
            input,
            tags,
            scope: std::cell::OnceCell::new(),
        }
    }

    fn reading(&self) -> Option<Reading<'a>> {
        matches!(self.input.kind, InputKind::Telemetry { .. }).then_some(Reading {
            input: self.input,
            tags: self.tags,
        })
    }

    fn scope(&self) -> &Scope {
        self.scope.get_or_init(|| Scope::new(self.input, self.tags))
    }
}

/// The names one input puts in scope for the CEL interpreter.
pub struct Scope {
    context: Context<'static, 'static>,
}

impl Scope {
    pub fn new(input: &RuleInput, tags: &BTreeMap<String, String>) -> Scope {
        let mut context = Context::with_env(env());
        let device = map([
            ("id", cel::Value::from(input.device.as_str())),
            (
                "tags",
                map(tags
                    .iter()
                    .map(|(k, v)| (k.as_str(), cel::Value::from(v.as_str())))),
            ),
        ]);
        context.add_variable_from_value("device", device);
        context.add_variable_from_value("trigger", input.kind.trigger().as_str());
        context.add_variable_from_value("at", input.at_ms);
        match &input.kind {
            InputKind::Telemetry { ts_ms, metrics } => {
                context.add_variable_from_value(
                    "metrics",
                    map(metrics.iter().map(|(k, v)| (k.as_str(), value(v)))),
                );
                context.add_variable_from_value("ts", *ts_ms);
            }
            InputKind::State { reported, patch } => {
                context.add_variable_from_value("state", json(reported));
                context.add_variable_from_value("patch", json(patch));
            }
            InputKind::Presence { online, reason } => {
                context.add_variable_from_value("online", *online);
                context.add_variable_from_value("reason", reason.as_deref().unwrap_or(""));
            }
            InputKind::Event { name, payload } => {
                context.add_variable_from_value("event", name.as_str());
                context.add_variable_from_value("payload", json(payload));
            }
        }
        Scope { context }
    }
}

fn map<'a>(entries: impl IntoIterator<Item = (&'a str, cel::Value)>) -> cel::Value {
    let map: std::collections::HashMap<Key, cel::Value> = entries
        .into_iter()
        .map(|(k, v)| (Key::from(k), v))
        .collect();
    cel::Value::from(map)
}

fn value(v: &Value) -> cel::Value {
    match v {
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Int(i) => cel::Value::Int(*i),
        Value::Float(f) => cel::Value::Float(*f),
        Value::Text(s) => cel::Value::from(s.as_str()),
    }
}

/// JSON as CEL: objects become maps, integers ints (doubles beyond i64), the rest as named.
pub(crate) fn json(v: &serde_json::Value) -> cel::Value {
    match v {
        serde_json::Value::Null => cel::Value::Null,
        serde_json::Value::Bool(b) => cel::Value::Bool(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => cel::Value::Int(i),
            (None, Some(u)) => cel::Value::UInt(u),
            _ => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => cel::Value::from(s.as_str()),
        serde_json::Value::Array(items) => {
            cel::Value::List(Arc::new(items.iter().map(json).collect()))
        }
        serde_json::Value::Object(o) => map(o.iter().map(|(k, v)| (k.as_str(), json(v)))),
    }
}

#[cfg(test)]
mod tests {
    use tellus_core::DeviceId;

    use super::*;

    fn reading(metrics: &[(&str, Value)]) -> RuleInput {
        RuleInput {
            device: DeviceId::parse("d-1").unwrap(),
            at_ms: 1_000,
            kind: InputKind::Telemetry {
                ts_ms: 900,
                metrics: metrics
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
            },
        }
    }

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn test(source: &str, input: &RuleInput) -> Outcome {
        let tags = tags(&[("site", "berlin")]);
        let subject = Subject::new(input, &tags);
        Expr::compile(source, input.kind.trigger())
            .unwrap()
            .test(&subject)
    }

    #[test]
    fn conditions_see_metrics_device_and_times() {
        let r = reading(&[
            ("temp", Value::Float(81.5)),
            ("count", Value::Int(3)),
            ("door", Value::Bool(true)),
            ("mode", Value::Text("eco".into())),
            ("env.hum", Value::Float(40.0)),
        ]);
        for source in [
            "metrics.temp > 80.0",
            "metrics.temp > 80 && metrics.count > 2.5",
            "metrics.count == 3",
            "metrics.door",
            "metrics.mode == 'eco'",
            "metrics['env.hum'] < 50.0",
            "device.id == 'd-1' && device.tags.site == 'berlin'",
            "ts == 900 && at == 1000 && trigger == 'telemetry'",
            "has(metrics.temp) && !has(metrics.pressure)",
            "metrics.mode.matches('^e.o$')",
        ] {
            assert_eq!(test(source, &r), Outcome::True, "{source}");
        }
        assert_eq!(test("metrics.temp < 80.0", &r), Outcome::False);
    }

    #[test]
    fn a_missing_key_is_not_applicable_and_bad_types_are_errors() {
        let r = reading(&[("hum", Value::Float(40.0))]);
        assert_eq!(test("metrics.temp > 80.0", &r), Outcome::NotApplicable);
        assert_eq!(test("device.tags.floor == '3'", &r), Outcome::NotApplicable);
        let Outcome::Error(e) = test("metrics.hum > 'x'", &r) else {
            panic!("comparing a double with a string must fail");
        };
        assert!(!e.is_empty());
        let Outcome::Error(e) = test("metrics.hum", &r) else {
            panic!("a non-bool condition must fail");
        };
        assert!(e.contains("not a bool"), "{e}");
        assert!(matches!(test("1 / 0 == 1", &r), Outcome::Error(_)));
    }

    #[test]
    fn compiling_refuses_bad_source_and_names_of_other_triggers() {
        with_stack(|| {
            for bad in ["", "   ", "metrics.temp >", "((((", &"1 + ".repeat(2_000)] {
                assert!(Expr::compile(bad, Trigger::Telemetry).is_err(), "{bad:?}");
            }
            let e = Expr::compile("metrics.temp > 1.0", Trigger::Presence).unwrap_err();
            assert!(e.contains("`metrics` is not in scope"), "{e}");
            let e = Expr::compile(
                &format!("{}true{}", "(".repeat(25), ")".repeat(25)),
                Trigger::Telemetry,
            )
            .unwrap_err();
            assert!(e.contains("nests brackets 25 deep"), "{e}");
            let e = Expr::compile(&format!("1{} == 0", " + 1".repeat(200)), Trigger::Telemetry)
                .unwrap_err();
            assert!(e.contains("operators"), "{e}");
            // Brackets and operators inside string literals are text.
            let quoted = format!(
                "metrics.mode == '{}' || metrics.mode == \"{}\"",
                "((+".repeat(100),
                "[-\\\"".repeat(100)
            );
            assert!(Expr::compile(&quoted, Trigger::Telemetry).is_ok());
            assert!(Expr::compile("!online && reason == 'keep_alive'", Trigger::Presence).is_ok());
        });
    }

    /// The deepest and longest trees the shape check lets through compile and evaluate on
    /// the evaluator's stack (in a debug build, where frames are largest).
    #[test]
    fn the_largest_allowed_expressions_fit_the_stack() {
        let r = reading(&[("temp", Value::Float(1.0))]);
        let shapes = [
            format!("{}true{}", "(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING)),
            format!(
                "size({}1{}) == 1",
                "[".repeat(MAX_NESTING - 1),
                "]".repeat(MAX_NESTING - 1)
            ),
            format!(
                "{}1{} == 1",
                "{1: ".repeat(MAX_NESTING),
                "}".repeat(MAX_NESTING)
            ),
            format!("1{} > 0", " + 1".repeat(MAX_OPERATORS - 1)),
            format!("true{}", " && true".repeat(MAX_OPERATORS / 2)),
            format!("{}true", "!".repeat(MAX_OPERATORS - 1)).replacen('!', "", 1),
            format!("metrics.temp{} > 0.0", " * 1.0".repeat(MAX_OPERATORS - 1)),
        ];
        with_stack(move || {
            for source in shapes {
                let expr = Expr::compile(&source, Trigger::Telemetry)
                    .unwrap_or_else(|e| panic!("{source}: {e}"));
                // The interpreter, and the fast path where it answers.
                let tags = BTreeMap::new();
                let scope = Scope::new(&r, &tags);
                let slow = expr.test_slow(&scope);
                assert!(!matches!(slow, Outcome::NotApplicable), "{source}");
                assert_eq!(expr.test(&Subject::new(&r, &tags)), slow, "{source}");
            }
        });
    }

    #[test]
    fn state_presence_and_event_scopes() {
        let device = DeviceId::parse("d-1").unwrap();
        let state = RuleInput {
            device: device.clone(),
            at_ms: 5,
            kind: InputKind::State {
                reported: serde_json::json!({"fw": "1.2", "led": {"on": true}, "n": 7}),
                patch: serde_json::json!({"led": {"on": true}}),
            },
        };
        assert_eq!(
            test("state.led.on && has(patch.led) && state.n == 7", &state),
            Outcome::True
        );
        let presence = RuleInput {
            device: device.clone(),
            at_ms: 5,
            kind: InputKind::Presence {
                online: false,
                reason: Some("keep_alive_timeout".into()),
            },
        };
        assert_eq!(
            test("!online && reason.startsWith('keep')", &presence),
            Outcome::True
        );
        let event = RuleInput {
            device,
            at_ms: 5,
            kind: InputKind::Event {
                name: "door".into(),
                payload: serde_json::json!({"open": true, "ids": [1, 2]}),
            },
        };
        assert_eq!(
            test(
                "event == 'door' && payload.open && size(payload.ids) == 2",
                &event
            ),
            Outcome::True
        );
    }

    #[test]
    fn values_for_derived_metrics() {
        let r = reading(&[("temp", Value::Float(20.0)), ("n", Value::Int(2))]);
        let tags = BTreeMap::new();
        let subject = Subject::new(&r, &tags);
        let v = |s: &str| {
            Expr::compile(s, Trigger::Telemetry)
                .unwrap()
                .value(&subject)
        };
        assert_eq!(v("metrics.temp * 1.8 + 32.0"), Ok(Some(Value::Float(68.0))));
        assert_eq!(v("metrics.n * 2"), Ok(Some(Value::Int(4))));
        assert_eq!(v("metrics.n > 1"), Ok(Some(Value::Bool(true))));
        assert_eq!(
            v("'x' + string(metrics.n)"),
            Ok(Some(Value::Text("x2".into())))
        );
        assert_eq!(v("metrics.missing * 2.0"), Ok(None));
        assert!(v("[1, 2]").is_err());
        assert!(v("metrics.temp / 0.0").is_err());
    }
}
