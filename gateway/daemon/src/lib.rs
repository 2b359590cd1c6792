//! The gateway daemon's shell: command line, and (in later issues) the tunnel
//! driver, relays, ingest and admin APIs. All decisions live in `gateway-core`;
//! this crate does the I/O around them.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod audit_sink;
pub mod buffer;
pub mod cli;
pub mod daemon;
pub mod delivery;
pub mod edge;
pub mod exit;
pub mod fleet;
pub mod hub;
pub mod hub_sink;
pub mod ingest;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod pki;
pub mod privilege;
pub mod relay;
pub mod spool;
pub mod sync;
pub mod tls;
pub mod udp;
