//! A function on a thread of its own, watched from outside.
//!
//! QuickJS's deadline is an interrupt the interpreter polls; a few built-ins loop in C
//! without polling it (see [`crate::function`]) and can run for minutes. The engine must not
//! wait for them: it evaluates every rule of the fleet on one thread, and ingest waits for
//! the engine. So each function action's [`Function`] lives on a thread of its own, and a
//! call waits at most twice the deadline (a call after a timeout first rebuilds the
//! runtime, under its own deadline) plus [`GRACE`]. A call that overruns that is given up
//! as a timeout; the thread finishes it on its own, and until it has, calls are refused at
//! once ([`FunctionError::Busy`]), so one stuck call never costs the engine more than one
//! wait, and never more than one thread per function action.

use std::{
    sync::mpsc::{self, RecvTimeoutError, TryRecvError},
    time::Duration,
};

use crate::function::{Function, FunctionError, Limits};

/// What a call may take beyond twice its deadline before it is given up.
pub const GRACE: Duration = Duration::from_millis(100);

/// The stack of a function's thread: room for QuickJS's own limit
/// ([`crate::function::MAX_STACK_BYTES`]) and the calls around it.
const STACK_BYTES: usize = 4 << 20;

type Answer = Result<serde_json::Value, FunctionError>;

/// A compiled function on its own thread.
pub struct Worker {
    calls: mpsc::SyncSender<serde_json::Value>,
    answers: mpsc::Receiver<Answer>,
    limits: Limits,
    /// A call was given up and its answer has not come yet.
    overrunning: bool,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("limits", &self.limits)
            .field("overrunning", &self.overrunning)
            .finish()
    }
}

impl Worker {
    /// Compiles `source` on a new thread; the error says why it does not compile (or that
    /// no thread could be had).
    pub fn start(source: &str, limits: Limits) -> Result<Worker, FunctionError> {
        let (calls, requests) = mpsc::sync_channel::<serde_json::Value>(1);
        let (answer, answers) = mpsc::sync_channel::<Answer>(1);
        let (compiled_tx, compiled) = mpsc::sync_channel::<Result<(), FunctionError>>(1);
        let source = source.to_owned();
        std::thread::Builder::new()
            .name("rules-function".into())
            .stack_size(STACK_BYTES)
            .spawn(move || {
                let mut function = match Function::compile(&source, limits) {
                    Ok(f) => {
                        let _ = compiled_tx.send(Ok(()));
                        f
                    }
                    Err(e) => {
                        let _ = compiled_tx.send(Err(e));
                        return;
                    }
                };
                // Ends when the worker is dropped (its sender with it).
                while let Ok(input) = requests.recv() {
                    if answer.send(function.call(&input)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| FunctionError::Compile(format!("no thread for the function: {e}")))?;
        // Top-level code can be stuck in such a built-in too: compiling waits as long as a
        // call does.
        match compiled.recv_timeout(limits.deadline * 2 + GRACE) {
            Ok(Ok(())) => Ok(Worker {
                calls,
                answers,
                limits,
                overrunning: false,
            }),
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Timeout) => Err(FunctionError::Compile(format!(
                "its top-level code ran past the deadline of {:?}",
                limits.deadline
            ))),
            Err(RecvTimeoutError::Disconnected) => {
                Err(FunctionError::Compile("the function's thread ended".into()))
            }
        }
    }

    /// Calls `handle(input)`, waiting at most twice the deadline and [`GRACE`].
    pub fn call(&mut self, input: &serde_json::Value) -> Answer {
        if self.overrunning {
            match self.answers.try_recv() {
                // The call given up has ended at last; its answer is old news.
                Ok(_) => self.overrunning = false,
                Err(TryRecvError::Empty) => return Err(FunctionError::Busy),
                Err(TryRecvError::Disconnected) => return Err(ended()),
            }
        }
        if self.calls.send(input.clone()).is_err() {
            return Err(ended());
        }
        match self.answers.recv_timeout(self.limits.deadline * 2 + GRACE) {
            Ok(answer) => answer,
            Err(RecvTimeoutError::Timeout) => {
                self.overrunning = true;
                Err(FunctionError::Timeout(self.limits.deadline))
            }
            Err(RecvTimeoutError::Disconnected) => Err(ended()),
        }
    }
}

fn ended() -> FunctionError {
    FunctionError::Exception("the function's thread ended".into())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_call_stuck_in_a_builtin_is_given_up_and_the_function_recovers() {
        let limits = Limits {
            deadline: Duration::from_millis(50),
            ..Limits::default()
        };
        // A naive substring search in C that polls no interrupt: it overruns the deadline.
        let mut w = Worker::start(
            "function handle(m) {
                if (m.stuck) return 'a'.repeat(m.n).indexOf('a'.repeat(m.n / 2) + 'b');
                return m.x * 2;
            }",
            limits,
        )
        .unwrap();
        assert_eq!(
            w.call(&serde_json::json!({"x": 4})),
            Ok(serde_json::json!(8))
        );
        let started = Instant::now();
        // Seconds in a debug build, a large fraction of one in release: far past 200 ms.
        let stuck = w.call(&serde_json::json!({"stuck": true, "n": 60_000}));
        assert_eq!(stuck, Err(FunctionError::Timeout(limits.deadline)));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // While the stuck call runs on, calls are refused at once.
        let started = Instant::now();
        assert_eq!(
            w.call(&serde_json::json!({"x": 1})),
            Err(FunctionError::Busy)
        );
        assert!(started.elapsed() < Duration::from_millis(500));
        // Once it has ended, the function answers again.
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            match w.call(&serde_json::json!({"x": 21})) {
                Err(FunctionError::Busy) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                answer => {
                    assert_eq!(answer, Ok(serde_json::json!(42)));
                    break;
                }
            }
        }
    }

    #[test]
    fn compile_errors_come_back_from_the_thread_and_stuck_top_level_code_is_one() {
        assert!(matches!(
            Worker::start("function nope() {}", Limits::default()),
            Err(FunctionError::Compile(_))
        ));
        let started = Instant::now();
        let stuck = Worker::start(
            "var x = 'a'.repeat(60000).indexOf('a'.repeat(30000) + 'b'); function handle(m) {}",
            Limits::default(),
        );
        let Err(FunctionError::Compile(why)) = stuck else {
            panic!("{stuck:?}")
        };
        assert!(why.contains("deadline"), "{why}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
