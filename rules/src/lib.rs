//! Rules: what Tellus does when a device reports something.
//!
//! Start with [`engine`]: rules evaluated on inputs, answering with what they would do, as
//! data ([`engine::Firing`], [`engine::Effect`]); no I/O and no clock. Around it:
//! - [`expr`]: CEL conditions and values, and the scope an input puts them in; [`fast`]:
//!   the common telemetry shapes compiled to a tree that reads the reading directly;
//! - [`function`]: JavaScript functions in a QuickJS sandbox, with a deadline and a memory
//!   limit per call; [`worker`]: each on a thread of its own, watched from outside;
//! - [`service`]: the engine on its own thread, fed by `tellus_core::RuleFeed`, and the
//!   executor that carries effects out (commands, webhooks, publishes, metrics, alerts);
//! - [`dry`]: the engine over given inputs, effects collected and nothing done.

pub mod dry;
pub mod engine;
pub mod expr;
pub mod fast;
pub mod function;
pub mod service;
pub mod worker;
