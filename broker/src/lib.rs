//! The network edge of Tellus: PKI, the mTLS gate, and the embedded routing core.
//!
//! - [`pki`]: the fleet CA (created on first start), the server certificate, device
//!   certificates issued by Tellus or signed from a device's own CSR;
//! - [`provision`]: registering a device (used by the HTTP API and the CLI);
//! - [`routing`]: the embedded rumqttd, on loopback, reachable only with the gate's secret;
//! - [`gate`]: the mTLS front door: handshake, CONNECT checks, per-device ACL, durable
//!   telemetry acknowledgements, and relaying everything else to the routing core;
//! - [`devices`]: what Tellus keeps of devices beyond their identity, from what the gate
//!   reports: commands, desired and reported state, presence.
pub mod devices;
pub mod gate;
pub mod pki;
pub mod provision;
pub mod routing;
