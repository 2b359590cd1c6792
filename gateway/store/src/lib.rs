//! Storage of the gateway.
//!
//! The edge's stores are SQLite files of its own state directory:
//! - [`audit`]: the append-only, hash-chained audit log (DESIGN.md rule 6);
//!   hubs keep theirs the same way.
//! - [`buffer`]: the durable record buffer of data channels.
//! - [`inbox`]: what a destination edge delivered from other departments.
//!
//! The hub's state is behind traits, so hubs can share a networked engine:
//! - [`registry`]: [`registry::Registry`], operators, tokens, devices,
//!   configs, collected audit.
//! - [`sink`]: [`sink::Sink`], where the hub commits synced channel records,
//!   exactly once, and consumers read them.
//! - [`sqlite`]: the embedded engine of both (the default).
//! - [`postgres`]: the networked engine of both, for hubs in several places.
//! - [`error`]: what a failure means: retry later, or refused.
//!
//! SQLite databases are opened in WAL mode with `synchronous = FULL`: a record
//! that a call reported as written survives a power cut.
#![forbid(unsafe_code)]

pub mod audit;
pub mod buffer;
mod device_query;
pub mod error;
pub mod inbox;
pub mod postgres;
pub mod registry;
pub mod sink;
pub mod sqlite;
