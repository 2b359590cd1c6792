//! SQLite storage of the gateway.
//!
//! - [`audit`]: the append-only, hash-chained audit log (DESIGN.md rule 6).
//! - [`buffer`]: the durable record buffer of data channels (edge).
//! - [`fleet`]: the hub's registry: operators, tokens, devices, configs, collected audit.
//! - [`inbox`]: what a destination edge delivered from other departments.
//! - [`sink`]: where the hub commits synced channel records, exactly once.
//!
//! Databases are opened in WAL mode with `synchronous = FULL`: a record that a
//! call reported as written survives a power cut.
#![forbid(unsafe_code)]

pub mod audit;
pub mod buffer;
pub mod fleet;
pub mod inbox;
pub mod sink;
