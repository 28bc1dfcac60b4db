//! Rules: what Tellus does when a device reports something.
//!
//! - [`expr`]: CEL conditions and values, and the scope an input puts them in;
//! - [`function`]: JavaScript functions in a QuickJS sandbox, with a deadline and a memory
//!   limit per call.

pub mod dry;
pub mod engine;
pub mod expr;
pub mod fast;
pub mod function;
pub mod service;
