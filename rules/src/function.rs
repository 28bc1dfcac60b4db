//! JavaScript rule functions, run in a QuickJS sandbox.
//!
//! An operator writes a function as JavaScript source that defines a global function
//! `handle(message)` (a `function` declaration, or a `var`/`let`/`const` binding holding a
//! function). [`Function::compile`] runs that source once in a fresh QuickJS runtime (through
//! `rquickjs`) and keeps the runtime; [`Function::call`] hands `handle` one JSON message and
//! returns what it returns, as JSON.
//!
//! # The sandbox
//!
//! - Each [`Function`] has its own QuickJS runtime and context: functions never share globals.
//! - The context has the ECMAScript built-ins (those of QuickJS's `JS_NewContext`: `Date`,
//!   `RegExp`, `JSON`, `Proxy`, `Map`/`Set`, typed arrays, `Promise`, `WeakRef`, `eval`) plus
//!   `atob`/`btoa`, `queueMicrotask` and `performance.now`, none of which reaches outside
//!   the sandbox. There is no module loader, no `std`/`os` module, no `require`, `fetch`,
//!   timers, console, file or network access: `import` statements do not compile and a dynamic
//!   `import()` rejects.
//! - The source runs as a strict-mode global script named `function.js` (so `this` is
//!   `undefined` in `handle` and assigning an undeclared name throws).
//! - The message is handed over as JSON (`JSON.parse` of `serde_json`'s serialisation), so
//!   `handle` gets plain objects, arrays, strings, numbers (as doubles: integers beyond 2^53
//!   lose precision), booleans and `null`.
//! - The result goes back through `JSON.stringify`: `undefined`, a function or a symbol
//!   returned at the top becomes [`serde_json::Value::Null`]; inside objects such members are
//!   left out, inside arrays they become `null`, and `NaN`/`Infinity` become `null`, as
//!   `JSON.stringify` does. A `BigInt`, a cyclic object, a string with a lone surrogate, JSON
//!   longer than [`MAX_OUTPUT_BYTES`] or nested deeper than 128 levels is an
//!   [`FunctionError::Output`] error.
//! - If `handle` returns a promise (an `async function handle`), the promise job queue is run
//!   until it settles, within the same deadline; a promise still pending when the queue is
//!   empty is an [`FunctionError::Output`] error. Jobs left queued by a call (for example a
//!   `.then` whose result nobody waits for) are run before the call returns.
//!
//! # Limits
//!
//! [`Limits`] gives each call a deadline and the runtime a memory limit:
//!
//! - **Deadline.** QuickJS's interrupt handler (polled by the interpreter every few thousand
//!   operations, inside long built-in loops and inside regular expression matching) compares
//!   the clock with a deadline set before each call, and before the top-level script runs in
//!   [`Function::compile`]. Past it, QuickJS throws an *uncatchable* error: `try`/`catch`
//!   and `finally` in the script cannot stop it. The deadline covers converting the input,
//!   the call, the promise jobs and converting the output.
//!
//!   The interrupt is cooperative, and a few built-ins loop in C without polling it or
//!   allocating, so neither limit stops them: a naive substring search such as
//!   `'a'.repeat(1e6).indexOf('a'.repeat(5e5) + 'b')` (minutes), or `reverse`, `join` or
//!   `copyWithin` on an array-like object or sparse array with a length near 2^32. Such a
//!   call overruns its deadline by as long as the built-in takes. Run functions on a thread
//!   of their own (not an async executor's worker) and watch for calls that do not return.
//! - **Memory.** `JS_SetMemoryLimit` caps everything the runtime allocates (the context's
//!   own built-ins take about 100 KiB of it); `0` means no limit. The QuickJS stack is
//!   capped at [`MAX_STACK_BYTES`], so deep recursion throws a `RangeError` instead of
//!   overflowing the native stack. The stack is measured from where the runtime was created,
//!   so call a [`Function`] at a stack depth similar to where it was compiled (it is not
//!   `Send`, so it always stays on its thread).
//! - **Source size.** At most [`MAX_SOURCE_BYTES`] of source.
//!
//! After a call fails with [`FunctionError::Timeout`] or [`FunctionError::OutOfMemory`], the
//! runtime is thrown away and the next call first rebuilds it from the source (under its own
//! deadline, so that call may take up to two deadlines). Anything a script keeps in globals
//! between calls is therefore lost then; scripts should not count on such state anyway.
//!
//! # Errors
//!
//! | What happened | [`FunctionError`] |
//! |---|---|
//! | syntax error, source too big, top-level code threw, no function `handle` | `Compile` |
//! | the deadline passed (in `compile` or in `call`) | `Timeout(deadline)` |
//! | the memory limit was hit and the script did not catch it | `OutOfMemory(limit)` |
//! | `handle` threw, or its promise rejected (including stack overflow) | `Exception` |
//! | the result is not JSON-serialisable or is too big | `Output` |
//!
//! QuickJS reports running out of memory as an ordinary `InternalError: out of memory`
//! exception (or, when it cannot even allocate that error, by throwing `null`). Both are
//! reported as `OutOfMemory`, even if a script throws such a value itself (which costs that
//! script nothing but a rebuilt runtime). A script that catches the out-of-memory error
//! and goes on is not stopped.
//!
//! Exception texts are `name: message` plus the first line of the stack when there is one,
//! e.g. `Error: boom (at handle (function.js:3:15))`; a thrown non-error is shown as a
//! string or as JSON. Texts are cut to [`MAX_MESSAGE_BYTES`].
//!
//! Nothing the script does makes this module panic.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rquickjs::context::EvalOptions;
use rquickjs::{Coerced, Context, Ctx, Object, Persistent, Runtime, Value};

/// How long one call (or the top-level script, when compiling) may run by default.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(50);
/// How much memory a function's runtime may allocate by default, built-ins included.
pub const DEFAULT_MEMORY_LIMIT: usize = 16 * 1024 * 1024;
/// Largest JSON a call may return.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;
/// Largest source [`Function::compile`] accepts.
pub const MAX_SOURCE_BYTES: usize = 64 * 1024;
/// How much native stack the QuickJS interpreter may use (QuickJS's own default).
pub const MAX_STACK_BYTES: usize = 256 * 1024;
/// Longest text an error carries; longer texts are cut (at a character boundary).
pub const MAX_MESSAGE_BYTES: usize = 512;

/// The name the source runs under, as seen in stack traces.
const FILE_NAME: &str = "function.js";

/// Looks `handle` up after the source ran; unlike reading `globalThis.handle`, this also
/// finds `let`/`const` bindings.
const FIND_HANDLE: &str = "typeof handle === 'function' ? handle : undefined";

/// What one function may use.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long one call, or the top-level script when compiling, may run.
    pub deadline: Duration,
    /// How many bytes the runtime may allocate, its built-ins included; `0` means no limit.
    pub memory_bytes: usize,
}

impl Default for Limits {
    /// [`DEFAULT_DEADLINE`] and [`DEFAULT_MEMORY_LIMIT`].
    fn default() -> Self {
        Limits {
            deadline: DEFAULT_DEADLINE,
            memory_bytes: DEFAULT_MEMORY_LIMIT,
        }
    }
}

/// Why compiling or calling a function failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FunctionError {
    /// The source has a syntax error, is bigger than [`MAX_SOURCE_BYTES`], threw while its
    /// top-level code ran, or defines no function named `handle`.
    #[error("function does not compile: {0}")]
    Compile(String),
    /// The script ran past its deadline (given here) and was interrupted.
    #[error("function ran past its deadline of {0:?}")]
    Timeout(Duration),
    /// The script hit the memory limit (given here, in bytes).
    #[error("function ran out of memory (limit {0} bytes)")]
    OutOfMemory(usize),
    /// `handle` threw (or its promise rejected): the error's text, cut to
    /// [`MAX_MESSAGE_BYTES`].
    #[error("function threw: {0}")]
    Exception(String),
    /// `handle` returned something that is not JSON-serialisable, or whose JSON is longer
    /// than [`MAX_OUTPUT_BYTES`].
    #[error("function returned an unusable result: {0}")]
    Output(String),
    /// A call given up for overrunning its deadline (in a built-in that polls no
    /// interrupt) is still running on the function's thread; the function is not called
    /// until it ends ([`crate::worker`]).
    #[error("function is still busy with a call that overran its deadline")]
    Busy,
}

/// A compiled JavaScript function: a QuickJS runtime in which the source has run, and its
/// `handle`.
///
/// Not `Send`: a `Function` stays on the thread that compiled it.
pub struct Function {
    source: String,
    limits: Limits,
    /// `None` after a timeout or out-of-memory error, until the next call rebuilds it.
    sandbox: Option<Sandbox>,
}

impl fmt::Debug for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Function")
            .field("source_bytes", &self.source.len())
            .field("limits", &self.limits)
            .field("live", &self.sandbox.is_some())
            .finish()
    }
}

impl Function {
    /// Compiles `source`, which must define a global function `handle(message)`.
    ///
    /// The source's top-level code runs now, under `limits`; so do promise jobs it queues.
    pub fn compile(source: &str, limits: Limits) -> Result<Function, FunctionError> {
        if source.len() > MAX_SOURCE_BYTES {
            return Err(FunctionError::Compile(format!(
                "source is {} bytes, more than the {MAX_SOURCE_BYTES} allowed",
                source.len()
            )));
        }
        let sandbox = Sandbox::new(source, limits)?;
        Ok(Function {
            source: source.to_owned(),
            limits,
            sandbox: Some(sandbox),
        })
    }

    /// Calls `handle(input)` and returns its result as JSON (`undefined` → `Value::Null`).
    ///
    /// After a [`FunctionError::Timeout`] or [`FunctionError::OutOfMemory`] the runtime is
    /// dropped, and the next call rebuilds it from the source first; if that fails, the call
    /// returns the rebuild's error (which may then be [`FunctionError::Compile`], if the
    /// top-level code threw this time).
    pub fn call(&mut self, input: &serde_json::Value) -> Result<serde_json::Value, FunctionError> {
        let input = serde_json::to_string(input)
            .map_err(|e| FunctionError::Exception(cut(format!("input is not JSON: {e}"))))?;
        let sandbox = match &mut self.sandbox {
            Some(sandbox) => sandbox,
            empty => empty.insert(Sandbox::new(&self.source, self.limits)?),
        };
        let result = sandbox.call(&input, self.limits);
        if matches!(
            result,
            Err(FunctionError::Timeout(_) | FunctionError::OutOfMemory(_))
        ) {
            self.sandbox = None;
        }
        result
    }
}

/// The deadline the interrupt handler checks, shared between it and the [`Sandbox`].
///
/// Atomics rather than `Cell`s keep it usable should rquickjs's `parallel` feature (which
/// wants a `Send` interrupt handler) ever be switched on.
struct Clock {
    epoch: Instant,
    /// Nanoseconds since `epoch`; [`Clock::DISARMED`] when no call is running.
    deadline: AtomicU64,
    /// Whether the handler interrupted the script since the clock was last armed.
    fired: AtomicBool,
}

impl Clock {
    const DISARMED: u64 = u64::MAX;

    fn new() -> Clock {
        Clock {
            epoch: Instant::now(),
            deadline: AtomicU64::new(Self::DISARMED),
            fired: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(Self::DISARMED - 1)
    }

    /// Lets the script run for `budget` from now.
    fn arm(&self, budget: Duration) {
        let budget = u64::try_from(budget.as_nanos()).unwrap_or(Self::DISARMED);
        let deadline = self.now().saturating_add(budget).min(Self::DISARMED - 1);
        self.fired.store(false, Ordering::Relaxed);
        self.deadline.store(deadline, Ordering::Relaxed);
    }

    fn disarm(&self) {
        self.deadline.store(Self::DISARMED, Ordering::Relaxed);
    }

    /// The interrupt handler: whether to stop the script (and remember having done so).
    fn expired(&self) -> bool {
        let deadline = self.deadline.load(Ordering::Relaxed);
        if deadline != Self::DISARMED && self.now() >= deadline {
            self.fired.store(true, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::Relaxed)
    }
}

/// A live runtime with the source evaluated in it.
struct Sandbox {
    // Field order is drop order: `handle` holds a JS value and must be freed before the
    // context (which owns the runtime) goes.
    handle: Persistent<rquickjs::Function<'static>>,
    context: Context,
    clock: Arc<Clock>,
}

/// Which step failed, to choose the error variant for a thrown exception.
#[derive(Clone, Copy)]
enum Stage {
    Compile,
    Call,
    Output,
}

impl Stage {
    fn error(self, text: String) -> FunctionError {
        let text = cut(text);
        match self {
            Stage::Compile => FunctionError::Compile(text),
            Stage::Call => FunctionError::Exception(text),
            Stage::Output => FunctionError::Output(text),
        }
    }
}

/// A failure taken off the context as soon as it happened, before any more JS runs.
enum Failure<'js> {
    Thrown(Value<'js>),
    Other(rquickjs::Error),
}

impl<'js> Failure<'js> {
    fn take(ctx: &Ctx<'js>, error: rquickjs::Error) -> Failure<'js> {
        match error {
            rquickjs::Error::Exception => Failure::Thrown(ctx.catch()),
            other => Failure::Other(other),
        }
    }
}

/// What a thrown value amounts to.
enum Thrown {
    OutOfMemory,
    Text(String),
}

impl Sandbox {
    fn new(source: &str, limits: Limits) -> Result<Sandbox, FunctionError> {
        let oom = FunctionError::OutOfMemory(limits.memory_bytes);
        // Both fail only when an allocation fails.
        let runtime = Runtime::new().map_err(|_| oom.clone())?;
        runtime.set_memory_limit(limits.memory_bytes);
        runtime.set_max_stack_size(MAX_STACK_BYTES);
        let clock = Arc::new(Clock::new());
        let handler_clock = Arc::clone(&clock);
        runtime.set_interrupt_handler(Some(Box::new(move || handler_clock.expired())));
        let context = Context::full(&runtime).map_err(|_| oom)?;

        let handle = context.with(|ctx| {
            clock.arm(limits.deadline);
            let handle = Self::evaluate(&ctx, source, &clock, limits);
            clock.disarm();
            handle
        })?;
        Ok(Sandbox {
            handle,
            context,
            clock,
        })
    }

    /// Runs the source's top-level code and finds `handle`.
    fn evaluate(
        ctx: &Ctx<'_>,
        source: &str,
        clock: &Clock,
        limits: Limits,
    ) -> Result<Persistent<rquickjs::Function<'static>>, FunctionError> {
        let fail = |error| {
            resolve(
                ctx,
                Failure::take(ctx, error),
                Stage::Compile,
                clock,
                limits,
            )
        };
        let mut options = EvalOptions::default();
        options.filename = Some(FILE_NAME.to_owned());
        ctx.eval_with_options::<(), _>(source, options)
            .map_err(fail)?;
        let found: Value = ctx.eval(FIND_HANDLE).map_err(fail)?;
        drain_jobs(ctx, clock);
        if clock.fired() {
            return Err(FunctionError::Timeout(limits.deadline));
        }
        let handle = found.into_function().ok_or_else(|| {
            FunctionError::Compile("the source defines no function named `handle`".into())
        })?;
        Ok(Persistent::save(ctx, handle))
    }

    fn call(&self, input: &str, limits: Limits) -> Result<serde_json::Value, FunctionError> {
        self.context.with(|ctx| {
            self.clock.arm(limits.deadline);
            let result = self.run(&ctx, input, limits);
            self.clock.disarm();
            result
        })
    }

    fn run(
        &self,
        ctx: &Ctx<'_>,
        input: &str,
        limits: Limits,
    ) -> Result<serde_json::Value, FunctionError> {
        let clock = &*self.clock;
        let fail = |failure, stage| resolve(ctx, failure, stage, clock, limits);

        let handle = self
            .handle
            .clone()
            .restore(ctx)
            .map_err(|e| fail(Failure::Other(e), Stage::Call))?;
        let message = ctx
            .json_parse(input)
            .map_err(|e| fail(Failure::take(ctx, e), Stage::Call))?;
        let returned = handle
            .call::<_, Value>((message,))
            .map_err(|e| Failure::take(ctx, e));
        drain_jobs(ctx, clock);
        if clock.fired() {
            return Err(FunctionError::Timeout(limits.deadline));
        }
        let mut value = returned.map_err(|failure| fail(failure, Stage::Call))?;

        if let Some(promise) = value.as_promise() {
            value = match promise.result::<Value>() {
                Some(Ok(settled)) => settled,
                Some(Err(e)) => return Err(fail(Failure::take(ctx, e), Stage::Call)),
                None => {
                    return Err(FunctionError::Output(
                        "handle returned a promise that never settled".into(),
                    ))
                }
            };
        }

        let json = match ctx.json_stringify(value) {
            Ok(Some(json)) => json,
            Ok(None) => return Ok(serde_json::Value::Null),
            Err(e) => return Err(fail(Failure::take(ctx, e), Stage::Output)),
        };
        let json = json.to_string().map_err(|e| match e {
            // `JS_ToCStringLen` could not allocate the copy: the JSON is huge.
            rquickjs::Error::Unknown => FunctionError::Output(format!(
                "the result's JSON is longer than {MAX_OUTPUT_BYTES} bytes"
            )),
            other => fail(Failure::Other(other), Stage::Output),
        })?;
        if json.len() > MAX_OUTPUT_BYTES {
            return Err(FunctionError::Output(format!(
                "the result's JSON is {} bytes, more than the {MAX_OUTPUT_BYTES} allowed",
                json.len()
            )));
        }
        serde_json::from_str(&json)
            .map_err(|e| FunctionError::Output(cut(format!("the result's JSON: {e}"))))
    }
}

/// Runs queued promise jobs until none is left or the deadline passes. A job's own failure
/// is dropped (rquickjs clears it); an interrupt shows in `clock.fired()`.
fn drain_jobs(ctx: &Ctx<'_>, clock: &Clock) {
    while !clock.expired() && ctx.execute_pending_job() {}
}

/// Turns a failure into the error to report.
fn resolve<'js>(
    ctx: &Ctx<'js>,
    failure: Failure<'js>,
    stage: Stage,
    clock: &Clock,
    limits: Limits,
) -> FunctionError {
    let timeout = FunctionError::Timeout(limits.deadline);
    let oom = FunctionError::OutOfMemory(limits.memory_bytes);
    if clock.fired() {
        return timeout;
    }
    let error = match failure {
        Failure::Thrown(value) => match describe(ctx, &value) {
            Thrown::OutOfMemory => oom,
            Thrown::Text(text) => stage.error(text),
        },
        Failure::Other(rquickjs::Error::Allocation) => oom,
        Failure::Other(other) => stage.error(other.to_string()),
    };
    // Describing a thrown object may run its getters, which may have been interrupted.
    if clock.fired() {
        timeout
    } else {
        error
    }
}

/// Reads a thrown value. May run script code (getters, `toString`, `toJSON`), still under
/// the deadline; whatever that throws is dropped.
fn describe<'js>(ctx: &Ctx<'js>, value: &Value<'js>) -> Thrown {
    if value.is_null() {
        // What QuickJS throws when it cannot allocate the error object itself.
        return Thrown::OutOfMemory;
    }
    if let Some(text) = value.as_string() {
        match text.to_string() {
            Ok(text) => return Thrown::Text(text),
            // `JS_ToCStringLen` failed: no memory for the copy.
            Err(rquickjs::Error::Unknown) => return Thrown::OutOfMemory,
            // Not UTF-8 (a lone surrogate): JSON below escapes it.
            Err(_) => {}
        }
    }
    if value.is_error() {
        if let Some(error) = value.as_object() {
            return describe_error(ctx, error);
        }
    }
    match ctx.json_stringify(value.clone()) {
        Ok(Some(json)) => match json.to_string() {
            Ok(json) => Thrown::Text(json),
            Err(_) => Thrown::Text(format!("a {}", value.type_name())),
        },
        Ok(None) => Thrown::Text(value.type_name().to_owned()),
        Err(_) => {
            ctx.catch();
            Thrown::Text(format!("a {}", value.type_name()))
        }
    }
}

fn describe_error<'js>(ctx: &Ctx<'js>, error: &Object<'js>) -> Thrown {
    let read = |key: &str| match error.get::<_, Option<Coerced<String>>>(key) {
        Ok(text) => text.map(|t| t.0),
        Err(_) => {
            ctx.catch();
            None
        }
    };
    let message = read("message").unwrap_or_default();
    if message.starts_with("out of memory") {
        return Thrown::OutOfMemory;
    }
    let mut text = match read("name") {
        Some(name) if !name.is_empty() && !message.is_empty() => format!("{name}: {message}"),
        Some(name) if message.is_empty() => name,
        _ => message,
    };
    let at = read("stack").and_then(|stack| {
        stack
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty())
            .map(str::to_owned)
    });
    if let Some(at) = at {
        text = if text.is_empty() {
            at
        } else {
            format!("{text} ({at})")
        };
    }
    if text.is_empty() {
        text = "an error without a message".into();
    }
    Thrown::Text(text)
}

/// Cuts `text` to at most [`MAX_MESSAGE_BYTES`], at a character boundary, marking the cut.
fn cut(mut text: String) -> String {
    const MARK: &str = "...";
    if text.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES - MARK.len();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(MARK);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compile(source: &str) -> Function {
        Function::compile(source, Limits::default()).expect("compiles")
    }

    /// Generous deadline, for tests that must reach the memory limit before the deadline
    /// even in an unoptimised build.
    fn slow_limits() -> Limits {
        Limits {
            deadline: Duration::from_secs(5),
            ..Limits::default()
        }
    }

    fn compile_error(source: &str) -> String {
        match Function::compile(source, Limits::default()) {
            Err(FunctionError::Compile(text)) => text,
            Err(other) => panic!("expected a compile error, got {other:?}"),
            Ok(_) => panic!("expected a compile error, it compiled"),
        }
    }

    #[test]
    fn syntax_error_is_a_compile_error() {
        let text = compile_error("function handle(m) { return (1 + ; }");
        assert!(text.contains("SyntaxError"), "{text}");
        assert!(text.contains("function.js"), "{text}");
    }

    #[test]
    fn source_too_big_or_with_nul_is_a_compile_error() {
        let big = format!(
            "function handle(m) {{ return 1 }}\n//{}",
            "x".repeat(MAX_SOURCE_BYTES)
        );
        assert!(compile_error(&big).contains("bytes"));
        compile_error("function handle(m) { return 1 }\0");
    }

    #[test]
    fn missing_handle_is_a_compile_error() {
        assert!(compile_error("function other(m) { return 1 }").contains("handle"));
        assert!(compile_error("var handle = 5").contains("handle"));
        assert!(compile_error("").contains("handle"));
    }

    #[test]
    fn top_level_throw_is_a_compile_error() {
        let text = compile_error("throw new TypeError('not today'); function handle() {}");
        assert!(text.contains("TypeError: not today"), "{text}");
    }

    #[test]
    fn handle_may_be_a_lexical_binding() {
        let mut f = compile("const handle = (m) => ({ twice: m.x * 2 });");
        assert_eq!(f.call(&json!({"x": 21})).unwrap(), json!({"twice": 42}));
        let mut f = compile("let handle = function (m) { return m.s + '!' };");
        assert_eq!(f.call(&json!({"s": "hi"})).unwrap(), json!("hi!"));
    }

    #[test]
    fn happy_path_with_nested_output() {
        let mut f = compile(
            r#"
            const OFFSET = 273.15;
            function handle(message) {
                const r = message.readings;
                return {
                    device: message.device,
                    kelvin: r.map((c) => c + OFFSET),
                    stats: { n: r.length, max: Math.max(...r), ok: true, none: null },
                    text: `${message.device} → ${r.length}`,
                };
            }
            "#,
        );
        let out = f
            .call(&json!({"device": "sensor-é", "readings": [20, 21.5, -3]}))
            .unwrap();
        assert_eq!(
            out,
            json!({
                "device": "sensor-é",
                "kelvin": [293.15, 294.65, 270.15],
                "stats": {"n": 3, "max": 21.5, "ok": true, "none": null},
                "text": "sensor-é → 3",
            })
        );
    }

    #[test]
    fn special_results() {
        let mut f = compile(
            r#"function handle(m) {
                switch (m.kind) {
                    case 'undefined': return undefined;
                    case 'function': return function () {};
                    case 'symbol': return Symbol('s');
                    case 'nan': return { a: NaN, b: Infinity, c: [undefined, () => 1], d: undefined };
                    case 'date': return new Date(0);
                }
            }"#,
        );
        let mut call = |kind: &str| f.call(&json!({ "kind": kind }));
        assert_eq!(call("undefined").unwrap(), json!(null));
        assert_eq!(call("function").unwrap(), json!(null));
        assert_eq!(call("symbol").unwrap(), json!(null));
        assert_eq!(
            call("nan").unwrap(),
            json!({"a": null, "b": null, "c": [null, null]})
        );
        assert_eq!(call("date").unwrap(), json!("1970-01-01T00:00:00.000Z"));
    }

    #[test]
    fn unserialisable_results_are_output_errors() {
        // Building the 100 000-deep array takes a while in an unoptimised build.
        let mut f = Function::compile(
            r#"function handle(m) {
                if (m.kind === 'bigint') return 10n;
                if (m.kind === 'cycle') { const o = {}; o.self = o; return o; }
                if (m.kind === 'tojson') return { toJSON() { throw new Error('no json') } };
                if (m.kind === 'deep') { let o = 0; for (let i = 0; i < 100000; i++) o = [o]; return o; }
                if (m.kind === 'lone-surrogate') return 'a\ud800';
                if (m.kind === 'deepish') { let o = 0; for (let i = 0; i < 200; i++) o = [o]; return o; }
            }"#,
            slow_limits(),
        )
        .unwrap();
        for kind in [
            "bigint",
            "cycle",
            "tojson",
            "deep",
            "deepish",
            "lone-surrogate",
        ] {
            match f.call(&json!({ "kind": kind })) {
                Err(FunctionError::Output(text)) => assert!(text.len() <= MAX_MESSAGE_BYTES),
                other => panic!("{kind}: expected an output error, got {other:?}"),
            }
        }
        assert_eq!(f.call(&json!({})).unwrap(), json!(null));
    }

    #[test]
    fn output_too_large() {
        let mut f = compile(
            r#"function handle(m) {
                return m.array ? new Array(20000).fill('abcd') : 'x'.repeat(m.n);
            }"#,
        );
        let ok = f.call(&json!({"n": MAX_OUTPUT_BYTES - 2})).unwrap();
        assert_eq!(ok.as_str().map(str::len), Some(MAX_OUTPUT_BYTES - 2));
        for input in [json!({"n": MAX_OUTPUT_BYTES}), json!({"array": true})] {
            match f.call(&input) {
                Err(FunctionError::Output(text)) => assert!(text.contains("bytes"), "{text}"),
                other => panic!("expected an output error, got {other:?}"),
            }
        }
        // A result that only the memory limit stops.
        let mut f = Function::compile(
            "function handle(m) { return 'x'.repeat(12 * 1024 * 1024) }",
            slow_limits(),
        )
        .unwrap();
        assert!(matches!(
            f.call(&json!(null)),
            Err(FunctionError::Output(_) | FunctionError::OutOfMemory(_))
        ));
    }

    #[test]
    fn exception_message() {
        let mut f = compile(
            r#"function handle(m) {
                if (m.kind === 'error') throw new Error('boom: ' + m.why);
                if (m.kind === 'type') return m.missing.field;
                if (m.kind === 'string') throw 'plain string';
                if (m.kind === 'object') throw { code: 7 };
                if (m.kind === 'long') throw new Error('x'.repeat(5000));
                if (m.kind === 'long-multibyte') throw 'é'.repeat(5000);
                if (m.kind === 'undefined') throw undefined;
                if (m.kind === 'lone-surrogate') throw '\ud800';
                if (m.kind === 'getter') {
                    const e = new Error('ignored');
                    Object.defineProperty(e, 'message', { get() { throw new Error('nested') } });
                    throw e;
                }
            }"#,
        );
        let mut threw = |kind: &str| match f.call(&json!({"kind": kind, "why": "valve"})) {
            Err(FunctionError::Exception(text)) => text,
            other => panic!("{kind}: expected an exception, got {other:?}"),
        };
        let text = threw("error");
        assert!(text.starts_with("Error: boom: valve"), "{text}");
        assert!(
            text.contains("handle") && text.contains("function.js:2"),
            "{text}"
        );
        let text = threw("type");
        assert!(text.starts_with("TypeError"), "{text}");
        assert_eq!(threw("string"), "plain string");
        assert_eq!(threw("object"), r#"{"code":7}"#);
        assert_eq!(threw("undefined"), "undefined");
        assert_eq!(threw("lone-surrogate"), r#""\ud800""#);
        for kind in ["long", "long-multibyte"] {
            let text = threw(kind);
            assert!(text.len() <= MAX_MESSAGE_BYTES, "{}", text.len());
            assert!(text.ends_with("..."));
        }
        let text = threw("getter");
        assert!(text.starts_with("Error"), "{text}");
        // The function still works.
        assert_eq!(f.call(&json!({})).unwrap(), json!(null));
    }

    #[test]
    fn timeout() {
        let mut f = compile("function handle(m) { while (true) {} }");
        let start = Instant::now();
        assert_eq!(
            f.call(&json!({})),
            Err(FunctionError::Timeout(DEFAULT_DEADLINE))
        );
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn timeout_cannot_be_caught() {
        let mut f = compile(
            r#"function handle(m) {
                for (;;) {
                    try {
                        try { while (true) {} } finally { while (true) {} }
                    } catch (e) {
                        globalThis.caught = String(e);
                    }
                }
            }"#,
        );
        let start = Instant::now();
        assert_eq!(
            f.call(&json!({})),
            Err(FunctionError::Timeout(DEFAULT_DEADLINE))
        );
        assert!(start.elapsed() < Duration::from_secs(2));

        let mut f = compile(
            "function handle(m) { try { while (true) {} } catch (e) { return 'caught ' + e } }",
        );
        assert_eq!(
            f.call(&json!({})),
            Err(FunctionError::Timeout(DEFAULT_DEADLINE))
        );
    }

    #[test]
    fn timeout_in_builtins_promises_and_top_level() {
        let sources = [
            // Catastrophic backtracking in the regular expression engine.
            "function handle(m) { return /^(a+)+$/.test('a'.repeat(40) + '!') }",
            // A long loop inside a built-in, over an array-like object.
            "function handle(m) { return Array.prototype.indexOf.call({ length: 2 ** 53 - 1 }, 1) }",
            // A promise job that spins.
            "async function handle(m) { await null; while (true) {} }",
            // Promise jobs that never end.
            "function handle(m) { const f = () => Promise.resolve().then(f); f(); return 1 }",
        ];
        for source in sources {
            let mut f = compile(source);
            let start = Instant::now();
            assert_eq!(
                f.call(&json!({})),
                Err(FunctionError::Timeout(DEFAULT_DEADLINE)),
                "{source}"
            );
            assert!(start.elapsed() < Duration::from_secs(2), "{source}");
        }
        let start = Instant::now();
        for source in [
            "while (true) {} function handle(m) {}",
            "Promise.resolve().then(() => { while (true) {} }); function handle(m) {}",
        ] {
            assert_eq!(
                Function::compile(source, Limits::default()).map(|_| ()),
                Err(FunctionError::Timeout(DEFAULT_DEADLINE)),
                "{source}"
            );
        }
        assert!(start.elapsed() < Duration::from_secs(4));
    }

    #[test]
    fn out_of_memory() {
        let mut f = Function::compile(
            "function handle(m) { let a = []; while (true) a.push(new Array(1e5).fill(1)) }",
            slow_limits(),
        )
        .unwrap();
        assert_eq!(
            f.call(&json!({})),
            Err(FunctionError::OutOfMemory(DEFAULT_MEMORY_LIMIT))
        );
        // Many small objects, kept in a global: the memory stays used until the runtime
        // is rebuilt.
        let mut f = Function::compile(
            r#"function handle(m) {
                if (m.hog) { globalThis.kept = []; while (true) kept.push({ n: kept.length }) }
                return 'fine';
            }"#,
            slow_limits(),
        )
        .unwrap();
        assert_eq!(
            f.call(&json!({"hog": true})),
            Err(FunctionError::OutOfMemory(DEFAULT_MEMORY_LIMIT))
        );
        assert_eq!(f.call(&json!({})).unwrap(), json!("fine"));
        // QuickJS throws `null` when it cannot even allocate the error; so `throw null` reads
        // as running out of memory (documented).
        let mut f = compile("function handle(m) { throw null }");
        assert_eq!(
            f.call(&json!({})),
            Err(FunctionError::OutOfMemory(DEFAULT_MEMORY_LIMIT))
        );
        // A tiny limit: the runtime cannot even be set up.
        let tiny = Limits {
            memory_bytes: 16 * 1024,
            ..Limits::default()
        };
        assert_eq!(
            Function::compile("function handle(m) {}", tiny).map(|_| ()),
            Err(FunctionError::OutOfMemory(16 * 1024))
        );
    }

    #[test]
    fn recovers_after_timeout() {
        let mut f =
            compile("var calls = 0; function handle(m) { calls++; if (m.spin) while (true) {}; return m.x * 2 }");
        assert_eq!(f.call(&json!({"x": 1})).unwrap(), json!(2));
        assert_eq!(
            f.call(&json!({"spin": true, "x": 1})),
            Err(FunctionError::Timeout(DEFAULT_DEADLINE))
        );
        assert_eq!(f.call(&json!({"x": 21})).unwrap(), json!(42));
        assert_eq!(f.call(&json!({"x": 5})).unwrap(), json!(10));
    }

    #[test]
    fn recovers_after_out_of_memory() {
        let mut f = Function::compile(
            r#"function handle(m) {
                if (m.hog) { let a = []; while (true) a.push(new Array(1e5).fill(1)) }
                return m.x * 2;
            }"#,
            slow_limits(),
        )
        .unwrap();
        for _ in 0..3 {
            assert_eq!(
                f.call(&json!({"hog": true})),
                Err(FunctionError::OutOfMemory(DEFAULT_MEMORY_LIMIT))
            );
            assert_eq!(f.call(&json!({"x": 21})).unwrap(), json!(42));
        }
    }

    #[test]
    fn no_modules_or_host_objects() {
        let mut f = compile(
            r#"function handle(m) {
                return [
                    'require', 'fetch', 'std', 'os', 'process', 'setTimeout', 'setInterval',
                    'XMLHttpRequest', 'WebSocket', 'console', 'print', 'scriptArgs', 'Deno', 'Bun',
                ].filter((name) => typeof globalThis[name] !== 'undefined');
            }"#,
        );
        assert_eq!(f.call(&json!({})).unwrap(), json!([]));

        let mut f = compile(
            r#"async function handle(m) {
                try { await import(m.name); return 'imported'; }
                catch (e) { return 'blocked: ' + e; }
            }"#,
        );
        for name in [
            "os",
            "std",
            "./function.js",
            "/etc/passwd",
            "https://example.com/x.js",
        ] {
            let out = f.call(&json!({ "name": name })).unwrap();
            assert!(
                out.as_str().is_some_and(|s| s.starts_with("blocked")),
                "{name}: {out}"
            );
        }
        // Not awaited, the rejected promise is an exception.
        let mut f = compile("function handle(m) { return import('os') }");
        assert!(matches!(
            f.call(&json!({})),
            Err(FunctionError::Exception(_))
        ));
        // Static imports do not compile: the source is a script, not a module.
        compile_error("import * as os from 'os'; function handle(m) {}");
        let text = compile_error("const os = require('os'); function handle(m) {}");
        assert!(text.contains("require"), "{text}");
    }

    #[test]
    fn deep_recursion_is_an_error() {
        let mut f = compile(
            r#"function deeper(n) { return deeper(n + 1) + 1 }
            function handle(m) {
                if (m.caught) { try { deeper(0) } catch (e) { return 'caught ' + e.name } }
                return deeper(0);
            }"#,
        );
        match f.call(&json!({})) {
            Err(FunctionError::Exception(text)) => assert!(text.contains("RangeError"), "{text}"),
            other => panic!("expected an exception, got {other:?}"),
        }
        assert_eq!(
            f.call(&json!({"caught": true})).unwrap(),
            json!("caught RangeError")
        );
        // Deep JSON is refused, not a crash.
        let mut f = compile("function handle(m) { return JSON.parse('['.repeat(1e6)) }");
        assert!(matches!(
            f.call(&json!({})),
            Err(FunctionError::Exception(_))
        ));
    }

    #[test]
    fn async_handle() {
        let mut f = compile(
            r#"async function handle(m) {
                const x = await Promise.resolve(m.x);
                if (x < 0) throw new RangeError('negative');
                return { x: x + 1 };
            }"#,
        );
        assert_eq!(f.call(&json!({"x": 1})).unwrap(), json!({"x": 2}));
        match f.call(&json!({"x": -1})) {
            Err(FunctionError::Exception(text)) => {
                assert!(text.starts_with("RangeError: negative"), "{text}")
            }
            other => panic!("expected an exception, got {other:?}"),
        }
        let mut f = compile("function handle(m) { return new Promise(() => {}) }");
        assert!(matches!(f.call(&json!({})), Err(FunctionError::Output(_))));
    }

    #[test]
    fn input_round_trips() {
        let mut f = compile("function handle(m) { return m }");
        let input = json!({
            "s": "quote \" backslash \\ nul \u{0} emoji 🛰 newline \n",
            "n": [0, -1, 1.5, 1e300, 9007199254740991u64],
            "b": [true, false, null],
            "o": {"": {"nested": [[[]]]}},
        });
        assert_eq!(f.call(&input).unwrap(), input);
        assert_eq!(f.call(&json!(null)).unwrap(), json!(null));
        assert_eq!(f.call(&json!("text")).unwrap(), json!("text"));
    }

    #[test]
    fn many_calls_still_work() {
        let mut f = compile(
            r#"let seen = 0;
            function handle(m) { seen++; return { i: m.i, seen, tag: 'x'.repeat(m.i % 100) } }"#,
        );
        for i in 0..10_000u32 {
            let out = f.call(&json!({ "i": i })).unwrap();
            assert_eq!(out["i"], json!(i));
        }
        assert_eq!(f.call(&json!({"i": 1})).unwrap()["seen"], json!(10_001));
    }

    #[test]
    fn errors_display() {
        assert_eq!(
            FunctionError::Timeout(Duration::from_millis(50)).to_string(),
            "function ran past its deadline of 50ms"
        );
        assert!(FunctionError::OutOfMemory(1024)
            .to_string()
            .contains("1024"));
        let cut = cut("é".repeat(1000));
        assert!(cut.len() <= MAX_MESSAGE_BYTES && cut.ends_with("..."));
    }

    /// Rough timings: `cargo test -p tellus-rules function::tests::timings -- --nocapture`.
    #[test]
    fn timings() {
        const SOURCE: &str = r#"
            function handle(m) {
                return { device: m.device, celsius: (m.raw - 2731) / 10, alarm: m.raw > 3000 };
            }"#;
        let rounds = 50u32;
        let start = Instant::now();
        for _ in 0..rounds {
            compile(SOURCE);
        }
        let compile_time = start.elapsed() / rounds;

        let mut f = compile(SOURCE);
        let input = json!({"device": "t-1", "raw": 2950});
        let calls = 5_000u32;
        let start = Instant::now();
        for _ in 0..calls {
            f.call(&input).unwrap();
        }
        let call_time = start.elapsed() / calls;

        let mut f = compile("function handle(m) { if (m.spin) while (true) {}; return 1 }");
        let start = Instant::now();
        let _ = f.call(&json!({"spin": true}));
        let timeout_time = start.elapsed();
        let start = Instant::now();
        f.call(&json!({})).unwrap();
        let rebuild_time = start.elapsed();
        println!(
            "compile (runtime + context + script): {compile_time:?}; trivial call: {call_time:?}; \
             timed-out call: {timeout_time:?}; first call after it (rebuild): {rebuild_time:?}"
        );
    }
}
