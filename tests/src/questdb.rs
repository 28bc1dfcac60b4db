//! A stand-in for QuestDB's HTTP endpoint, for contract tests of Tellus's QuestDB store.
//!
//! [`FakeQuestDb::start`] serves, on `127.0.0.1:0`, the parts of QuestDB's HTTP API that
//! the `questdb-rs` ILP/HTTP sender and the store use:
//!
//! - `GET /settings`: what a QuestDB 9 answers, offering line protocol versions 1 and 2, so
//!   a sender told `protocol_version=auto` (the default) picks 2;
//! - `POST /write` (and its InfluxDB-compatible alias `/api/v2/write`): the body is parsed
//!   by [`parse_ilp`], this module's own line protocol parser, and is kept whole or not at
//!   all; bad data gets QuestDB's `400` JSON error, good data `204`;
//! - `GET /exec?query=...`: SQL text is recorded; answers are canned ([`FakeQuestDb::answer_sql`]),
//!   DDL gets `{"ddl":"OK"}`;
//! - `GET /ping`: `204`, as QuestDB answers ILP/HTTP health checks.
//!
//! A test steers the answers ([`FakeQuestDb::script`], [`FakeQuestDb::reject_rows`]) and reads
//! back what arrived ([`FakeQuestDb::rows`], [`FakeQuestDb::writes`], [`FakeQuestDb::sql`]).
//!
//! ## The line protocol as parsed here
//!
//! One row a line: `table[,symbol=value...] [field=value[,field=value...]] [timestamp]`,
//! lines ended by an unescaped `\n` (or `\r`), blank lines skipped. Outside quoted strings a
//! backslash makes the next byte literal (`\ `, `\,`, `\=`, `\\`, and a backslash-newline).
//! Field values: floats (`1`, `-1.5`, `2e-3`, `NaN`, `Infinity`, `-Infinity`), integers
//! (`42i`), booleans (`t`, `f`, `true`, `false` in any case), quoted strings (`"..."`, where
//! a backslash makes the next byte literal, so `\"`, `\\` and backslash-newline; an
//! unescaped newline is an error, as in QuestDB), timestamps with a unit suffix (`t` micros,
//! `n` nanos, `m` millis), and, from protocol version 2 on, binary doubles: `name==`, the
//! type byte 16, then the 8 bytes of a little-endian IEEE 754 double. The designated
//! timestamp at the end of a line is in the request's `precision` (nanoseconds unless told
//! otherwise; `questdb-rs` always sends `precision=n`) or carries a `n`/`t`/`m` suffix
//! (which `questdb-rs` writes from version 2 on). Table and column names are checked against
//! QuestDB's rules (forbidden characters, 127 bytes at most), as QuestDB rejects them.
//!
//! Line numbers in errors count rows, not blank lines, as QuestDB's do.
//!
//! Stricter than QuestDB, as `questdb-rs` never sends them: an empty field value (`a=`,
//! a NULL to QuestDB) is refused, and so are binary values other than doubles (arrays,
//! type 14, and decimals, type 23, which protocol versions 2 and 3 can carry).

use std::{
    collections::{hash_map::RandomState, HashMap, VecDeque},
    fmt,
    hash::BuildHasher,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{DefaultBodyLimit, Query, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::oneshot};

/// How long [`FakeQuestDb::wait_rows`] waits.
const WAIT: Duration = Duration::from_secs(20);

/// The largest `/write` body accepted: above `questdb-rs`'s default `max_buf_size` (100 MiB).
const MAX_BODY: usize = 128 * 1024 * 1024;

/// QuestDB's default `cairo.max.file.name.length`: the longest table or column name, in bytes.
const MAX_NAME_LEN: usize = 127;

/// The binary format type byte of a double (protocol version 2).
const BINARY_DOUBLE: u8 = 16;

/// A fake QuestDB HTTP server. Serves until dropped.
pub struct FakeQuestDb {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Dropping or firing it shuts the server down (gracefully: open keep-alive connections
    /// of the sender's pool are closed too).
    stop: Option<oneshot::Sender<()>>,
}

/// What a scripted `/write` request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Parse and keep the data, as if nothing was scripted (a parse error still gets a 400).
    Accept,
    /// 400 with QuestDB's JSON error body for line 1; nothing kept.
    Invalid,
    /// 401 with a short text body; nothing kept.
    Unauthorized,
    /// 503; nothing kept. `questdb-rs` retries it.
    Unavailable,
}

/// One `/write` request as it arrived and how it was answered.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteLog {
    /// The HTTP status it was answered.
    pub status: u16,
    /// Its number of rows; 0 if the body did not parse.
    pub rows: usize,
    /// The request path: `/write` or `/api/v2/write`.
    pub path: String,
    /// Its query parameters, in order (`questdb-rs` sends `precision=n`).
    pub params: Vec<(String, String)>,
    /// Its `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The body, as sent.
    pub body: Bytes,
}

/// One line protocol row.
#[derive(Debug, Clone, PartialEq)]
pub struct IlpRow {
    pub table: String,
    pub symbols: Vec<(String, String)>,
    pub fields: Vec<(String, IlpValue)>,
    /// The designated timestamp in nanoseconds, if the line carried one.
    pub timestamp_ns: Option<i64>,
}

/// A field value.
#[derive(Debug, Clone, PartialEq)]
pub enum IlpValue {
    Float(f64),
    Int(i64),
    Bool(bool),
    Str(String),
    /// A timestamp field; one sent in nanoseconds is floored to microseconds.
    Timestamp {
        micros: i64,
    },
}

impl IlpRow {
    /// The value of symbol `name`.
    pub fn symbol(&self, name: &str) -> Option<&str> {
        self.symbols
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of field `name`.
    pub fn field(&self, name: &str) -> Option<&IlpValue> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

/// Why a body did not parse: the 1-based number of the row (blank lines not counted) and
/// a reason worded as QuestDB words it where it has a wording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IlpError {
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for IlpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error in line {}: {}", self.line, self.reason)
    }
}

impl std::error::Error for IlpError {}

type RowPredicate = dyn Fn(&IlpRow) -> bool + Send + Sync;

/// What the server has seen and been told; one lock, so that a request's answer and its
/// records are decided together.
#[derive(Default)]
struct Book {
    rows: Vec<IlpRow>,
    writes: Vec<WriteLog>,
    script: VecDeque<Answer>,
    /// The answer to every request the script does not answer, while set.
    outage: Option<Answer>,
    rejects: Vec<Arc<RowPredicate>>,
    sql: Vec<String>,
    sql_answers: Vec<(String, Value)>,
}

struct Shared {
    book: Mutex<Book>,
    /// QuestDB's error ids are a per-process random prefix and a counter: `<12 hex>-<n>`.
    error_prefix: String,
    errors: AtomicU64,
}

impl Shared {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_error_id(&self) -> String {
        let n = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{}-{n}", self.error_prefix)
    }
}

impl FakeQuestDb {
    /// Listens on 127.0.0.1:0; serves until dropped.
    pub async fn start() -> FakeQuestDb {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake QuestDB");
        let addr = listener.local_addr().expect("fake QuestDB address");
        let random = RandomState::new().hash_one(addr);
        let shared = Arc::new(Shared {
            book: Mutex::new(Book::default()),
            error_prefix: format!("{:012x}", random & 0xffff_ffff_ffff),
            errors: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/settings", get(settings))
            .route("/write", post(write))
            .route("/api/v2/write", post(write))
            .route("/exec", get(exec))
            .route("/ping", get(ping))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                eprintln!("[fake questdb] server error: {e}");
            }
        });
        FakeQuestDb {
            addr,
            shared,
            stop: Some(stop),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A `questdb-rs` configuration string for this server: `http::addr=127.0.0.1:PORT;`.
    pub fn ilp_conf(&self) -> String {
        format!("http::addr={};", self.addr)
    }

    /// `http://127.0.0.1:PORT`
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every row of every accepted `/write` request, in arrival order.
    pub fn rows(&self) -> Vec<IlpRow> {
        self.shared.book().rows.clone()
    }

    /// Every `/write` request, with the status it was answered and its row count.
    pub fn writes(&self) -> Vec<WriteLog> {
        self.shared.book().writes.clone()
    }

    /// The next `/write` requests get these answers, one each, in order; then back to
    /// accepting. Adds to what is still scripted.
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.shared.book().script.extend(answers);
    }

    /// While `Some`, every `/write` the script does not answer gets this answer, and with
    /// [`Answer::Unavailable`] every `/exec` a 503 too: QuestDB down until `None`.
    pub fn outage(&self, answer: Option<Answer>) {
        self.shared.book().outage = answer;
    }

    /// Any `/write` request with a row matching `pred` is rejected as QuestDB rejects bad
    /// data: 400, JSON body naming the first matching row's line, nothing of the request
    /// kept. Predicates add up: a row matching any of them is rejected.
    pub fn reject_rows(&self, pred: impl Fn(&IlpRow) -> bool + Send + Sync + 'static) {
        self.shared.book().rejects.push(Arc::new(pred));
    }

    /// Every SQL text received on `GET /exec?query=...`, in order.
    pub fn sql(&self) -> Vec<String> {
        self.shared.book().sql.clone()
    }

    /// Answers `/exec` queries whose text contains `needle` with `body` (status 200); the
    /// latest registration whose needle matches wins. Other queries get QuestDB's DDL
    /// answer, `{"ddl":"OK"}`.
    pub fn answer_sql(&self, needle: &str, body: Value) {
        self.shared
            .book()
            .sql_answers
            .push((needle.to_owned(), body));
    }

    /// Waits until at least `n` rows were accepted and returns them all; panics after a few
    /// seconds, showing what did arrive.
    pub async fn wait_rows(&self, n: usize) -> Vec<IlpRow> {
        let deadline = Instant::now() + WAIT;
        loop {
            let rows = self.rows();
            if rows.len() >= n {
                return rows;
            }
            if Instant::now() >= deadline {
                let writes: Vec<(u16, usize)> =
                    self.writes().iter().map(|w| (w.status, w.rows)).collect();
                panic!(
                    "fake QuestDB: waited {WAIT:?} for {n} rows but has {}; \
                     writes (status, rows): {writes:?}; rows: {rows:#?}",
                    rows.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for FakeQuestDb {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP handlers

/// `GET /settings`, shaped as QuestDB 9 answers it. `questdb-rs` reads
/// `config."line.proto.support.versions"` (picking the highest it knows) and
/// `config."cairo.max.file.name.length"`.
async fn settings() -> Response {
    let body = json!({
        "config": {
            "release.type": "OSS",
            "release.version": "9.0.0",
            "http.settings.readonly": false,
            "line.proto.support.versions": [1, 2],
            "ilp.proto.transports": ["tcp", "http"],
            "posthog.enabled": false,
            "posthog.api.key": null,
            "cairo.max.file.name.length": MAX_NAME_LEN,
        },
        "preferences.version": 0,
        "preferences": {},
    });
    json_response(StatusCode::OK, &body)
}

async fn ping() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// What one `/write` request turned out to be, before the lock is taken.
enum Verdict {
    Rows(Vec<IlpRow>),
    /// A 400 for bad data: the line and the reason.
    Bad(usize, String),
    /// A 400 for a bad request (not about a line): QuestDB's `code` and message.
    BadRequest(&'static str, String),
}

async fn write(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let precision = params
        .iter()
        .rev()
        .find(|(k, _)| k == "precision")
        .map(|(_, v)| v.as_str());
    let verdict = match precision_unit_ns(precision) {
        None => Verdict::BadRequest("not supported", "unsupported precision".to_owned()),
        Some(unit_ns) => match parse_ilp_scaled(&body, unit_ns) {
            Ok(rows) => Verdict::Rows(rows),
            Err(e) => Verdict::Bad(e.line, e.reason),
        },
    };
    let row_count = match &verdict {
        Verdict::Rows(rows) => rows.len(),
        _ => 0,
    };
    // Predicates are the test's code: run them outside the lock, so one may call back.
    let rejects = shared.book().rejects.clone();
    let verdict = match verdict {
        Verdict::Rows(rows) => match rows.iter().position(|r| rejects.iter().any(|p| p(r))) {
            Some(i) => Verdict::Bad(
                i + 1,
                format!(
                    "table: {}; rejected by the test (FakeQuestDb::reject_rows)",
                    rows[i].table
                ),
            ),
            None => Verdict::Rows(rows),
        },
        other => other,
    };

    let mut book = shared.book();
    let answer = book
        .script
        .pop_front()
        .or(book.outage)
        .unwrap_or(Answer::Accept);
    let response = match (answer, verdict) {
        (Answer::Accept, Verdict::Rows(rows)) => {
            book.rows.extend(rows);
            StatusCode::NO_CONTENT.into_response()
        }
        (Answer::Accept, Verdict::Bad(line, reason)) => {
            line_error(&shared.next_error_id(), line, &reason)
        }
        (Answer::Accept, Verdict::BadRequest(code, message)) => {
            let body = json!({"code": code, "message": message, "errorId": shared.next_error_id()});
            json_response(StatusCode::BAD_REQUEST, &body)
        }
        (Answer::Invalid, _) => line_error(
            &shared.next_error_id(),
            1,
            "scripted rejection (FakeQuestDb::script)",
        ),
        (Answer::Unauthorized, _) => (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/plain")],
            "Unauthorized",
        )
            .into_response(),
        (Answer::Unavailable, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain")],
            "Service Unavailable",
        )
            .into_response(),
    };
    book.writes.push(WriteLog {
        status: response.status().as_u16(),
        rows: row_count,
        path: uri.path().to_owned(),
        params,
        authorization: headers
            .get(header::AUTHORIZATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        body,
    });
    response
}

async fn exec(
    State(shared): State<Arc<Shared>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let Some(query) = params.get("query").filter(|q| !q.trim().is_empty()) else {
        let body = json!({"query": "", "error": "empty query", "position": 0});
        return json_response(StatusCode::BAD_REQUEST, &body);
    };
    let mut book = shared.book();
    book.sql.push(query.clone());
    if book.outage == Some(Answer::Unavailable) {
        return (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable").into_response();
    }
    let canned = book
        .sql_answers
        .iter()
        .rev()
        .find(|(needle, _)| query.contains(needle.as_str()))
        .map(|(_, body)| body.clone());
    drop(book);
    json_response(
        StatusCode::OK,
        &canned.unwrap_or_else(|| json!({"ddl": "OK"})),
    )
}

/// QuestDB's answer to data it cannot take: `code` "invalid", the line in the message and
/// as `line`, and an error id. `questdb-rs` parses it only if the content type is exactly
/// `application/json`.
fn line_error(error_id: &str, line: usize, reason: &str) -> Response {
    let body = json!({
        "code": "invalid",
        "message": format!(
            "failed to parse line protocol:errors encountered on line(s):\nerror in line {line}: {reason}"
        ),
        "line": line,
        "errorId": error_id,
    });
    json_response(StatusCode::BAD_REQUEST, &body)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Nanoseconds per unit of an unsuffixed designated timestamp, for QuestDB's `precision`
/// parameter; `None` for a value QuestDB refuses.
fn precision_unit_ns(precision: Option<&str>) -> Option<i64> {
    match precision {
        None | Some("n") | Some("ns") => Some(1),
        Some("u") | Some("us") => Some(1_000),
        Some("ms") => Some(1_000_000),
        Some("s") => Some(1_000_000_000),
        Some("m") => Some(60_000_000_000),
        Some("h") => Some(3_600_000_000_000),
        Some(_) => None,
    }
}

// ---------------------------------------------------------------------------------------
// The line protocol parser

/// Parses a line protocol body (protocol version 1 or 2); unsuffixed designated timestamps
/// are nanoseconds.
pub fn parse_ilp(body: &[u8]) -> Result<Vec<IlpRow>, IlpError> {
    parse_ilp_scaled(body, 1)
}

/// [`parse_ilp`] with unsuffixed designated timestamps in units of `unit_ns` nanoseconds.
fn parse_ilp_scaled(body: &[u8], unit_ns: i64) -> Result<Vec<IlpRow>, IlpError> {
    let mut parser = Parser {
        buf: body,
        pos: 0,
        unit_ns,
    };
    let mut rows = Vec::new();
    let mut line = 0;
    while let Some(b) = parser.peek() {
        if is_eol(b) {
            parser.pos += 1;
            continue;
        }
        line += 1;
        let row = parser.row().map_err(|reason| IlpError { line, reason })?;
        rows.push(row);
    }
    Ok(rows)
}

/// What ended an unquoted token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Comma,
    Space,
    Equals,
    /// An unescaped `\n` or `\r`, or the end of the body.
    Eol,
}

struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
    unit_ns: i64,
}

fn is_eol(b: u8) -> bool {
    b == b'\n' || b == b'\r'
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Some(b)
    }

    /// An unquoted token with its escapes resolved, and what ended it (consumed).
    fn token(&mut self) -> Result<(Vec<u8>, Stop), String> {
        let mut out = Vec::new();
        loop {
            let Some(b) = self.next() else {
                return Ok((out, Stop::Eol));
            };
            let stop = match b {
                b',' => Stop::Comma,
                b' ' => Stop::Space,
                b'=' => Stop::Equals,
                b'\n' | b'\r' => Stop::Eol,
                b'\\' => {
                    let escaped = self
                        .next()
                        .ok_or_else(|| "the body ends with a lone backslash".to_owned())?;
                    out.push(escaped);
                    continue;
                }
                _ => {
                    out.push(b);
                    continue;
                }
            };
            return Ok((out, stop));
        }
    }

    fn row(&mut self) -> Result<IlpRow, String> {
        let (table, stop) = self.token()?;
        let table = table_name(table)?;
        let mut row = IlpRow {
            table,
            symbols: Vec::new(),
            fields: Vec::new(),
            timestamp_ns: None,
        };
        match stop {
            Stop::Eol => return Err("No fields were provided".to_owned()),
            Stop::Equals => {
                return Err(format!(
                    "table: {}; unexpected '=' after the table name",
                    row.table
                ))
            }
            Stop::Comma => {
                if self.symbols(&mut row)? == Stop::Eol {
                    return Ok(row);
                }
            }
            Stop::Space => {}
        }

        // Fields, or (after symbols) the timestamp alone.
        let (first, stop) = self.token()?;
        match stop {
            Stop::Equals => {
                self.fields(&mut row, first)?;
                Ok(row)
            }
            Stop::Eol if row.symbols.is_empty() && first.is_empty() => {
                Err("No fields were provided".to_owned())
            }
            Stop::Eol if row.symbols.is_empty() => Err(format!(
                "Could not parse entire line. Field value is missing: {}",
                lossy(&first)
            )),
            Stop::Eol => {
                row.timestamp_ns = self.designated_timestamp(&first)?;
                Ok(row)
            }
            Stop::Space if first.is_empty() => Err(format!(
                "table: {}; unexpected second space after the symbols",
                row.table
            )),
            Stop::Space | Stop::Comma => Err(format!(
                "Could not parse entire line. Field value is missing: {}",
                lossy(&first)
            )),
        }
    }

    /// The symbols after the table name's comma; returns what ended the last one.
    fn symbols(&mut self, row: &mut IlpRow) -> Result<Stop, String> {
        loop {
            let (key, stop) = self.token()?;
            if stop != Stop::Equals {
                return Err(format!(
                    "Could not parse entire line. Symbol value is missing: {}",
                    lossy(&key)
                ));
            }
            let key = column_name(key, &row.table)?;
            let (value, stop) = self.token()?;
            let value = String::from_utf8(value).map_err(|e| {
                format!(
                    "Could not parse entire line, tag value is invalid. Tag: {key}; value: {} (not UTF-8)",
                    lossy(e.as_bytes())
                )
            })?;
            if stop == Stop::Equals {
                return Err(format!(
                    "Could not parse entire line, tag value is invalid. Tag: {key}; value: {value}= (unescaped '=')"
                ));
            }
            row.symbols.push((key, value));
            if stop != Stop::Comma {
                return Ok(stop);
            }
        }
    }

    /// The fields, the first one's name already read (with its `=`), then the timestamp.
    fn fields(&mut self, row: &mut IlpRow, first_key: Vec<u8>) -> Result<(), String> {
        let mut key = first_key;
        loop {
            let name = column_name(key, &row.table)?;
            let (value, stop) = self.field_value(&name)?;
            if stop == Stop::Equals {
                return Err(invalid_field(&name, "="));
            }
            row.fields.push((name, value));
            match stop {
                Stop::Comma => {
                    let (next, stop) = self.token()?;
                    if stop != Stop::Equals {
                        return Err(format!(
                            "Could not parse entire line. Field value is missing: {}",
                            lossy(&next)
                        ));
                    }
                    key = next;
                }
                Stop::Space => {
                    let (ts, stop) = self.token()?;
                    if stop != Stop::Eol {
                        return Err(format!(
                            "Could not parse timestamp: {} (followed by more than the end of the line)",
                            lossy(&ts)
                        ));
                    }
                    row.timestamp_ns = self.designated_timestamp(&ts)?;
                    return Ok(());
                }
                // (`=` was refused above.)
                Stop::Eol | Stop::Equals => return Ok(()),
            }
        }
    }

    fn field_value(&mut self, name: &str) -> Result<(IlpValue, Stop), String> {
        match self.peek() {
            Some(b'"') => {
                self.pos += 1;
                let s = self.quoted(name)?;
                let stop = self.after_value(name)?;
                Ok((IlpValue::Str(s), stop))
            }
            Some(b'=') => {
                self.pos += 1;
                let v = self.binary(name)?;
                let stop = self.after_value(name)?;
                Ok((v, stop))
            }
            _ => {
                let (raw, stop) = self.token()?;
                if stop == Stop::Equals {
                    return Err(invalid_field(name, &format!("{}=", lossy(&raw))));
                }
                Ok((text_value(name, &raw)?, stop))
            }
        }
    }

    /// A quoted string's contents, the opening quote consumed, up to and with the closing one.
    fn quoted(&mut self, name: &str) -> Result<String, String> {
        let mut out = Vec::new();
        loop {
            match self.next() {
                None | Some(b'\n') => {
                    return Err(invalid_field(
                        name,
                        &format!("\"{} (no closing quote on the line)", lossy(&out)),
                    ))
                }
                Some(b'\\') => match self.next() {
                    Some(b) => out.push(b),
                    None => {
                        return Err(invalid_field(
                            name,
                            &format!("\"{}\\ (no closing quote)", lossy(&out)),
                        ))
                    }
                },
                Some(b'"') => break,
                Some(b) => out.push(b),
            }
        }
        String::from_utf8(out)
            .map_err(|e| invalid_field(name, &format!("\"{}\" (not UTF-8)", lossy(e.as_bytes()))))
    }

    /// A binary value (protocol version 2), `name==` consumed.
    fn binary(&mut self, name: &str) -> Result<IlpValue, String> {
        let Some(kind) = self.next() else {
            return Err(invalid_field(name, "== (no binary type byte)"));
        };
        if kind != BINARY_DOUBLE {
            return Err(format!(
                "table field {name}: binary format type {kind} is not supported by this fake \
                 (only {BINARY_DOUBLE}, a double)"
            ));
        }
        let bytes: [u8; 8] = self
            .buf
            .get(self.pos..self.pos + 8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                invalid_field(
                    name,
                    &format!(
                        "a binary double cut short ({} of 8 bytes)",
                        self.buf.len() - self.pos
                    ),
                )
            })?;
        self.pos += 8;
        Ok(IlpValue::Float(f64::from_le_bytes(bytes)))
    }

    /// The separator after a quoted or binary value.
    fn after_value(&mut self, name: &str) -> Result<Stop, String> {
        match self.next() {
            Some(b',') => Ok(Stop::Comma),
            Some(b' ') => Ok(Stop::Space),
            None | Some(b'\n' | b'\r') => Ok(Stop::Eol),
            Some(b) => Err(format!(
                "Could not parse entire line, field value is invalid. Field: {name}; \
                 value followed by {:?} instead of ',', ' ' or the end of the line",
                b as char
            )),
        }
    }

    /// The designated timestamp in nanoseconds; an empty token is none.
    fn designated_timestamp(&self, raw: &[u8]) -> Result<Option<i64>, String> {
        if raw.is_empty() {
            return Ok(None);
        }
        let bad = || format!("Could not parse timestamp: {}", lossy(raw));
        let (digits, unit_ns) = match raw[raw.len() - 1] {
            b'n' => (&raw[..raw.len() - 1], 1),
            b't' => (&raw[..raw.len() - 1], 1_000),
            b'm' => (&raw[..raw.len() - 1], 1_000_000),
            _ => (raw, self.unit_ns),
        };
        let n = integer(digits).ok_or_else(bad)?;
        n.checked_mul(unit_ns).map(Some).ok_or_else(bad)
    }
}

fn lossy(b: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(b)
}

fn invalid_field(name: &str, value: &str) -> String {
    format!("Could not parse entire line, field value is invalid. Field: {name}; value: {value}")
}

/// An unquoted field value: bool, integer, timestamp or float.
fn text_value(name: &str, raw: &[u8]) -> Result<IlpValue, String> {
    let invalid = || invalid_field(name, &lossy(raw));
    let Some((&last, head)) = raw.split_last() else {
        return Err(format!(
            "Could not parse entire line. Field value is missing: {name}"
        ));
    };
    let text = std::str::from_utf8(raw).map_err(|_| invalid())?;
    if text.eq_ignore_ascii_case("t") || text.eq_ignore_ascii_case("true") {
        return Ok(IlpValue::Bool(true));
    }
    if text.eq_ignore_ascii_case("f") || text.eq_ignore_ascii_case("false") {
        return Ok(IlpValue::Bool(false));
    }
    let value = match last {
        b'i' => integer(head).map(IlpValue::Int),
        b't' => integer(head).map(|micros| IlpValue::Timestamp { micros }),
        b'n' => integer(head).map(|nanos| IlpValue::Timestamp {
            micros: nanos.div_euclid(1_000),
        }),
        b'm' => integer(head)
            .and_then(|millis| millis.checked_mul(1_000))
            .map(|micros| IlpValue::Timestamp { micros }),
        _ => float(text).map(IlpValue::Float),
    };
    value.ok_or_else(invalid)
}

/// `-?[0-9]+` as an i64.
fn integer(raw: &[u8]) -> Option<i64> {
    let digits = raw.strip_prefix(b"-").unwrap_or(raw);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(raw).ok()?.parse().ok()
}

/// A decimal float (`[+-]digits[.digits][e[+-]digits]`, at least one mantissa digit) or
/// `NaN`, `Infinity`, `-Infinity`, as Java and `questdb-rs` print them.
fn float(text: &str) -> Option<f64> {
    match text {
        "NaN" => return Some(f64::NAN),
        "Infinity" | "+Infinity" => return Some(f64::INFINITY),
        "-Infinity" => return Some(f64::NEG_INFINITY),
        _ => {}
    }
    let b = text.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'-' | b'+')));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    let mut mantissa = digits(&mut i);
    if b.get(i) == Some(&b'.') {
        i += 1;
        mantissa += digits(&mut i);
    }
    if mantissa == 0 {
        return None;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return None;
        }
    }
    if i != b.len() {
        return None;
    }
    text.parse().ok()
}

/// A table name, checked as QuestDB checks it.
fn table_name(raw: Vec<u8>) -> Result<String, String> {
    let name = String::from_utf8(raw)
        .map_err(|e| format!("invalid table name: {} (not UTF-8)", lossy(e.as_bytes())))?;
    let bad_dots = name.starts_with('.') || name.ends_with('.') || name.contains("..");
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || bad_dots
        || name.chars().any(|c| forbidden_in_name(c) && c != '.')
    {
        return Err(format!("table: {name}; invalid table name"));
    }
    Ok(name)
}

/// A symbol or field name, checked as QuestDB checks column names.
fn column_name(raw: Vec<u8>, table: &str) -> Result<String, String> {
    let name = String::from_utf8(raw).map_err(|e| {
        format!(
            "table: {table}; invalid column name: {} (not UTF-8)",
            lossy(e.as_bytes())
        )
    })?;
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name.chars().any(|c| forbidden_in_name(c) || c == '-')
    {
        return Err(format!("table: {table}; invalid column name: {name}"));
    }
    Ok(name)
}

/// Characters QuestDB refuses in table and column names, but for `.`, which tables take
/// where it is not first, last or doubled. Column names refuse `-` too.
fn forbidden_in_name(c: char) -> bool {
    "?.,'\"\\/:)(+*%~".contains(c) || c <= '\u{f}' || c == '\u{7f}' || c == '\u{feff}'
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::questdb::ingress::{
        Buffer, ColumnName, ProtocolVersion, Sender, TimestampMicros, TimestampNanos,
    };

    fn row(table: &str) -> IlpRow {
        IlpRow {
            table: table.to_owned(),
            symbols: vec![],
            fields: vec![],
            timestamp_ns: None,
        }
    }

    fn sym(mut r: IlpRow, k: &str, v: &str) -> IlpRow {
        r.symbols.push((k.to_owned(), v.to_owned()));
        r
    }

    fn fld(mut r: IlpRow, k: &str, v: IlpValue) -> IlpRow {
        r.fields.push((k.to_owned(), v));
        r
    }

    fn at(mut r: IlpRow, ns: i64) -> IlpRow {
        r.timestamp_ns = Some(ns);
        r
    }

    fn one(body: &[u8]) -> IlpRow {
        let rows = parse_ilp(body).unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        rows.into_iter().next().unwrap()
    }

    fn err(body: &[u8]) -> IlpError {
        parse_ilp(body).expect_err("should not parse")
    }

    #[test]
    fn a_plain_line_with_every_text_value_kind() {
        let r = one(
            b"readings,device=d1,unit=C temp=21.5,count=-3i,ok=t,note=\"hi there\",\
              seen=1700000000000000t 1700000000000000000\n",
        );
        let want = at(
            fld(
                fld(
                    fld(
                        fld(
                            fld(
                                sym(sym(row("readings"), "device", "d1"), "unit", "C"),
                                "temp",
                                IlpValue::Float(21.5),
                            ),
                            "count",
                            IlpValue::Int(-3),
                        ),
                        "ok",
                        IlpValue::Bool(true),
                    ),
                    "note",
                    IlpValue::Str("hi there".into()),
                ),
                "seen",
                IlpValue::Timestamp {
                    micros: 1_700_000_000_000_000,
                },
            ),
            1_700_000_000_000_000_000,
        );
        assert_eq!(r, want);
        assert_eq!(r.symbol("unit"), Some("C"));
        assert_eq!(r.field("count"), Some(&IlpValue::Int(-3)));
        assert_eq!(r.field("nope"), None);
    }

    #[test]
    fn escapes_in_names_symbols_and_strings() {
        let r =
            one(b"my\\ table,k\\=ey=a\\,b\\ c\\=d\\\\e\\\nf s=\"q\\\"uote\\\\slash\\\nnl, =\" 5\n");
        assert_eq!(r.table, "my table");
        assert_eq!(r.symbols, vec![("k=ey".into(), "a,b c=d\\e\nf".into())]);
        assert_eq!(
            r.fields,
            vec![("s".into(), IlpValue::Str("q\"uote\\slash\nnl, =".into()))]
        );
        assert_eq!(r.timestamp_ns, Some(5));
    }

    #[test]
    fn booleans_in_all_their_spellings() {
        let r = one(b"t a=t,b=T,c=true,d=True,e=TRUE,f=f,g=F,h=false,i=False,j=FALSE\n");
        let got: Vec<bool> = r
            .fields
            .iter()
            .map(|(_, v)| match v {
                IlpValue::Bool(b) => *b,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [true, true, true, true, true, false, false, false, false, false]
        );
    }

    #[test]
    fn floats_integers_and_timestamp_fields() {
        let r = one(
            b"t a=1,b=-1.5,c=1e300,d=1.5E-7,e=.5,f=NaN,g=Infinity,h=-Infinity,\
              i=9223372036854775807i,j=-9223372036854775808i,k=5t,l=1999n,m=-1n,n=3m\n",
        );
        let f = |n: &str| match r.field(n) {
            Some(IlpValue::Float(x)) => *x,
            other => panic!("{n}: {other:?}"),
        };
        assert_eq!(f("a"), 1.0);
        assert_eq!(f("b"), -1.5);
        assert_eq!(f("c"), 1e300);
        assert_eq!(f("d"), 1.5e-7);
        assert_eq!(f("e"), 0.5);
        assert!(f("f").is_nan());
        assert_eq!(f("g"), f64::INFINITY);
        assert_eq!(f("h"), f64::NEG_INFINITY);
        assert_eq!(r.field("i"), Some(&IlpValue::Int(i64::MAX)));
        assert_eq!(r.field("j"), Some(&IlpValue::Int(i64::MIN)));
        assert_eq!(r.field("k"), Some(&IlpValue::Timestamp { micros: 5 }));
        assert_eq!(r.field("l"), Some(&IlpValue::Timestamp { micros: 1 }));
        assert_eq!(r.field("m"), Some(&IlpValue::Timestamp { micros: -1 }));
        assert_eq!(r.field("n"), Some(&IlpValue::Timestamp { micros: 3000 }));
    }

    #[test]
    fn designated_timestamps_with_and_without_units() {
        assert_eq!(one(b"t a=1\n").timestamp_ns, None);
        assert_eq!(one(b"t a=1 \n").timestamp_ns, None);
        assert_eq!(one(b"t a=1 123\n").timestamp_ns, Some(123));
        assert_eq!(one(b"t a=1 123n\n").timestamp_ns, Some(123));
        assert_eq!(one(b"t a=1 123t\n").timestamp_ns, Some(123_000));
        assert_eq!(one(b"t a=1 123m\n").timestamp_ns, Some(123_000_000));
        let rows = parse_ilp_scaled(b"t a=1 7\nt a=1 7n\n", 1_000).unwrap();
        assert_eq!(rows[0].timestamp_ns, Some(7_000));
        assert_eq!(rows[1].timestamp_ns, Some(7));
    }

    #[test]
    fn binary_doubles_of_protocol_version_2_are_binary_safe() {
        // Bytes that mean something in text: newline, comma, space, quote, '=', backslash.
        let bits = [b'\n', b',', b' ', b'"', b'=', b'\\', 0x01, 0x40];
        let value = f64::from_le_bytes(bits);
        let mut body = b"t,s=x a==".to_vec();
        body.push(16);
        body.extend_from_slice(&bits);
        body.extend_from_slice(b",b==\x10");
        body.extend_from_slice(&(-2.5f64).to_le_bytes());
        body.extend_from_slice(b" 42t\nt c==\x10");
        body.extend_from_slice(&f64::NAN.to_le_bytes());
        body.push(b'\n');
        let rows = parse_ilp(&body).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].symbol("s"), Some("x"));
        match rows[0].field("a") {
            Some(IlpValue::Float(x)) => assert_eq!(x.to_bits(), value.to_bits()),
            other => panic!("{other:?}"),
        }
        assert_eq!(rows[0].field("b"), Some(&IlpValue::Float(-2.5)));
        assert_eq!(rows[0].timestamp_ns, Some(42_000));
        assert!(matches!(rows[1].field("c"), Some(IlpValue::Float(x)) if x.is_nan()));
    }

    #[test]
    fn symbols_only_rows_blank_lines_crlf_and_a_missing_last_newline() {
        let rows = parse_ilp(b"\n\nt,a=b\r\n\nt,a=c 99\nt,a=\nu x=1").unwrap();
        assert_eq!(
            rows,
            vec![
                sym(row("t"), "a", "b"),
                at(sym(row("t"), "a", "c"), 99),
                sym(row("t"), "a", ""),
                fld(row("u"), "x", IlpValue::Float(1.0)),
            ]
        );
        assert_eq!(parse_ilp(b"").unwrap(), vec![]);
        assert_eq!(parse_ilp(b"\n\r\n").unwrap(), vec![]);
    }

    #[test]
    fn errors_carry_the_row_number_and_a_reason() {
        let cases: &[(&[u8], usize, &str)] = &[
            (b"t\n", 1, "No fields were provided"),
            (b"t \n", 1, "No fields were provided"),
            (b"t 123\n", 1, "Field value is missing: 123"),
            (b"t a=1\n\nt b\n", 2, "Field value is missing: b"),
            (b"t a=1,b\n", 1, "Field value is missing: b"),
            (b"t a=\n", 1, "Field value is missing: a"),
            (b"t,s a=1\n", 1, "Symbol value is missing: s"),
            (b"t,s=a=b x=1\n", 1, "tag value is invalid"),
            (b"t a=12x\n", 1, "Field: a; value: 12x"),
            (b"t a=1.2.3\n", 1, "Field: a; value: 1.2.3"),
            (b"t a=1.5i\n", 1, "Field: a; value: 1.5i"),
            (b"t a=9223372036854775808i\n", 1, "Field: a"),
            (b"t a=nan\n", 1, "Field: a"),
            (b"t a=\"open\n", 1, "no closing quote"),
            (b"t a=\"x\"y\n", 1, "instead of ','"),
            (b"t a=1 12x\n", 1, "Could not parse timestamp: 12x"),
            (b"t a=1 1 2\n", 1, "Could not parse timestamp: 1"),
            (
                b"t a=1 99999999999999999m\n",
                1,
                "Could not parse timestamp",
            ),
            (b"t a==\x0e\x01", 1, "binary format type 14"),
            (b"t a==\x10\x01\x02", 1, "cut short"),
            (b"t,a-b=x c=1\n", 1, "invalid column name: a-b"),
            (b"t a.b=1\n", 1, "invalid column name: a.b"),
            (b"t?x a=1\n", 1, "invalid table name"),
            (b".t a=1\n", 1, "invalid table name"),
            (b"t a=1\nt a=\xff\n", 2, "Field: a"),
            (b"t a=1\\", 1, "lone backslash"),
        ];
        for (body, line, reason) in cases {
            let e = err(body);
            assert_eq!(e.line, *line, "{:?}: {e}", lossy(body));
            assert!(
                e.reason.contains(reason),
                "{:?}: {e} should contain {reason:?}",
                lossy(body)
            );
        }
        assert_eq!(
            err(b"t\n").to_string(),
            "error in line 1: No fields were provided"
        );
        let long = format!("t {}=1\n", "c".repeat(128));
        assert!(err(long.as_bytes()).reason.contains("invalid column name"));
        assert!(parse_ilp(format!("t {}=1\n", "c".repeat(127)).as_bytes()).is_ok());
    }

    // -----------------------------------------------------------------------------------
    // The server, driven by the real questdb-rs sender

    /// Runs `f` with a sender built from `conf` on a blocking thread.
    async fn with_sender<T: Send + 'static>(
        conf: String,
        f: impl FnOnce(&mut Sender) -> T + Send + 'static,
    ) -> T {
        tokio::task::spawn_blocking(move || {
            let mut sender = Sender::from_conf(conf).unwrap();
            f(&mut sender)
        })
        .await
        .unwrap()
    }

    /// Two rows with every kind of value the store sends; the first one's designated
    /// timestamp in nanoseconds or microseconds.
    fn fill(buf: &mut Buffer, nanos_at: bool) {
        buf.table("readings")
            .unwrap()
            .symbol("device", "d 1,=x")
            .unwrap()
            .symbol("metric", "temp")
            .unwrap()
            .column_f64("value", 21.5)
            .unwrap()
            .column_i64("seq", -7)
            .unwrap()
            .column_bool("ok", true)
            .unwrap()
            .column_str("note", "say \"hi\"\\\nbye")
            .unwrap()
            .column_ts("seen", TimestampMicros::new(1_700_000_000_123_456))
            .unwrap();
        if nanos_at {
            buf.at(TimestampNanos::new(1_700_000_000_123_456_789))
                .unwrap();
        } else {
            buf.at(TimestampMicros::new(1_700_000_000_123_456)).unwrap();
        }
        buf.table("readings")
            .unwrap()
            .symbol("device", "d2")
            .unwrap()
            .column_f64("value", 1e-300)
            .unwrap()
            .column_bool("ok", false)
            .unwrap()
            .at(TimestampNanos::new(5))
            .unwrap();
    }

    fn expected(nanos_at: bool) -> Vec<IlpRow> {
        let first = sym(sym(row("readings"), "device", "d 1,=x"), "metric", "temp");
        let first = fld(first, "value", IlpValue::Float(21.5));
        let first = fld(first, "seq", IlpValue::Int(-7));
        let first = fld(first, "ok", IlpValue::Bool(true));
        let first = fld(first, "note", IlpValue::Str("say \"hi\"\\\nbye".into()));
        let first = fld(
            first,
            "seen",
            IlpValue::Timestamp {
                micros: 1_700_000_000_123_456,
            },
        );
        let first = at(
            first,
            if nanos_at {
                1_700_000_000_123_456_789
            } else {
                1_700_000_000_123_456_000
            },
        );
        let second = fld(
            sym(row("readings"), "device", "d2"),
            "value",
            IlpValue::Float(1e-300),
        );
        let second = at(fld(second, "ok", IlpValue::Bool(false)), 5);
        vec![first, second]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn questdb_rs_rows_arrive_as_sent_in_every_protocol_version() {
        for (version, want) in [
            ("1", ProtocolVersion::V1),
            ("2", ProtocolVersion::V2),
            ("auto", ProtocolVersion::V2),
        ] {
            for nanos_at in [true, false] {
                let db = FakeQuestDb::start().await;
                let conf = format!("{}protocol_version={version};", db.ilp_conf());
                let got = with_sender(conf, move |sender| {
                    let mut buf = sender.new_buffer();
                    fill(&mut buf, nanos_at);
                    sender.flush(&mut buf).unwrap();
                    sender.protocol_version()
                })
                .await;
                assert_eq!(got, want, "protocol_version={version}");
                assert_eq!(db.rows(), expected(nanos_at), "protocol_version={version}");
                let writes = db.writes();
                assert_eq!(writes.len(), 1);
                let w = &writes[0];
                assert_eq!((w.status, w.rows), (204, 2));
                assert_eq!(w.path, "/write");
                assert_eq!(w.params, vec![("precision".into(), "n".into())]);
                assert_eq!(w.authorization, None);
                let binary = w.body.windows(3).any(|b| b == b"==\x10");
                assert_eq!(binary, want == ProtocolVersion::V2, "{:?}", w.body);
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_503_is_retried_and_the_data_kept_once() {
        let db = FakeQuestDb::start().await;
        db.script([Answer::Unavailable, Answer::Accept]);
        with_sender(db.ilp_conf(), |sender| {
            let mut buf = sender.new_buffer();
            fill(&mut buf, true);
            sender.flush(&mut buf).unwrap();
        })
        .await;
        let statuses: Vec<(u16, usize)> = db.writes().iter().map(|w| (w.status, w.rows)).collect();
        assert_eq!(statuses, [(503, 2), (204, 2)]);
        assert_eq!(db.wait_rows(2).await, expected(true));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalid_and_unauthorized_answers_fail_the_flush() {
        let db = FakeQuestDb::start().await;
        db.script([Answer::Invalid, Answer::Unauthorized]);
        let (invalid, unauthorized, third) = with_sender(db.ilp_conf(), |sender| {
            let mut buf = sender.new_buffer();
            fill(&mut buf, true);
            let invalid = sender.flush_and_keep(&buf).unwrap_err();
            let unauthorized = sender.flush_and_keep(&buf).unwrap_err();
            let third = sender.flush(&mut buf);
            (invalid, unauthorized, third)
        })
        .await;
        assert_eq!(invalid.code(), ::questdb::ErrorCode::ServerFlushError);
        assert!(
            invalid.msg().contains("errors encountered on line(s)")
                && invalid.msg().contains("code: invalid, line: 1"),
            "{}",
            invalid.msg()
        );
        assert_eq!(unauthorized.code(), ::questdb::ErrorCode::AuthError);
        assert!(
            unauthorized.msg().contains("[code: 401]"),
            "{}",
            unauthorized.msg()
        );
        third.unwrap();
        let statuses: Vec<u16> = db.writes().iter().map(|w| w.status).collect();
        assert_eq!(statuses, [400, 401, 204]);
        assert_eq!(db.rows(), expected(true));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_data_is_refused_whole_with_questdbs_json_error() {
        let db = FakeQuestDb::start().await;
        db.reject_rows(|r| r.symbol("device") == Some("d2"));
        let (rejected, bad_name) = with_sender(db.ilp_conf(), |sender| {
            let mut buf = sender.new_buffer();
            fill(&mut buf, true);
            let rejected = sender.flush(&mut buf).unwrap_err();
            // A name the client does not check but QuestDB refuses.
            buf.table("readings")
                .unwrap()
                .column_f64(ColumnName::new_unchecked("bad-name"), 1.0)
                .unwrap()
                .at_now()
                .unwrap();
            let bad_name = sender.flush(&mut buf).unwrap_err();
            (rejected, bad_name)
        })
        .await;
        assert_eq!(rejected.code(), ::questdb::ErrorCode::ServerFlushError);
        assert!(rejected.msg().contains("line: 2"), "{}", rejected.msg());
        assert!(
            bad_name.msg().contains("invalid column name: bad-name"),
            "{}",
            bad_name.msg()
        );
        assert!(db.rows().is_empty());
        let statuses: Vec<(u16, usize)> = db.writes().iter().map(|w| (w.status, w.rows)).collect();
        assert_eq!(statuses, [(400, 2), (400, 0)]);

        // The raw answer, as a client without questdb-rs sees it.
        let r = reqwest::Client::new()
            .post(format!("{}/api/v2/write?precision=u", db.http_url()))
            .body("t a=1 1\nt b=\n")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["content-type"], "application/json");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "invalid");
        assert_eq!(body["line"], 2);
        assert_eq!(
            body["message"],
            "failed to parse line protocol:errors encountered on line(s):\n\
             error in line 2: Could not parse entire line. Field value is missing: b"
        );
        assert!(body["errorId"].as_str().unwrap().ends_with("-3"), "{body}");
        let r = reqwest::Client::new()
            .post(format!("{}/api/v2/write?precision=u", db.http_url()))
            .body("t a=1 1\n")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        assert_eq!(
            db.rows(),
            vec![at(fld(row("t"), "a", IlpValue::Float(1.0)), 1_000)]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn settings_and_sql() {
        let db = FakeQuestDb::start().await;
        let http = reqwest::Client::new();
        let settings: Value = http
            .get(format!("{}/settings", db.http_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            settings["config"]["line.proto.support.versions"],
            json!([1, 2])
        );
        assert_eq!(settings["config"]["cairo.max.file.name.length"], 127);

        db.answer_sql(
            "count()",
            json!({"columns": [{"name": "count", "type": "LONG"}], "dataset": [[3]], "count": 1}),
        );
        let exec = |q: &'static str| {
            let http = http.clone();
            let url = format!("{}/exec", db.http_url());
            async move {
                let r = http.get(url).query(&[("query", q)]).send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            }
        };
        let (status, body) =
            exec("CREATE TABLE IF NOT EXISTS t (ts TIMESTAMP) timestamp(ts)").await;
        assert_eq!((status, body), (200, json!({"ddl": "OK"})));
        let (status, body) = exec("SELECT count() FROM t WHERE a = 'x&y'").await;
        assert_eq!(status, 200);
        assert_eq!(body["dataset"], json!([[3]]));
        assert_eq!(
            db.sql(),
            [
                "CREATE TABLE IF NOT EXISTS t (ts TIMESTAMP) timestamp(ts)",
                "SELECT count() FROM t WHERE a = 'x&y'"
            ]
        );
    }
}
