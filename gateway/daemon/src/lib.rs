//! The gateway daemon's shell: command line, and (in later issues) the tunnel
//! driver, relays, ingest and admin APIs. All decisions live in `gateway-core`;
//! this crate does the I/O around them.
#![forbid(unsafe_code)]

pub mod cli;
pub mod exit;
