//! The `tellus` binary's library half: configuration and the wiring of one server process.
//!
//! - [`config`]: the TOML configuration, its defaults, and the commented default file that
//!   `tellus config` prints;
//! - [`server`]: [`server::run`] opens the data directory, starts the routing core, ingest,
//!   the gate and the HTTP API, and shuts them down in order when told to;
//! - [`devices`] and [`tokens`]: `tellus device …` and `tellus token …`, which work on a
//!   data directory directly;
//! - [`demo`]: `tellus demo`, Tellus on a temporary data directory with a simulated fleet
//!   running in the same process.

pub mod config;
pub mod demo;
pub mod devices;
pub mod server;
pub mod tokens;
