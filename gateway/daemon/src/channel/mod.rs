//! Channels: records a legacy application hands to the edge, kept in a
//! durable buffer and synced exactly once, in order, to the hub's sink, and
//! from there to consumers or another department's edge (DESIGN.md "Data
//! paths"). A record's way, module by module:
//!
//! - in at the edge: [`ingest`] (HTTP) and [`spool`] (directories), both
//!   checked at the boundary by [`check`], committed by [`buffer`]; an
//!   ingest with `auth` knows its [`producers`] by token or certificate;
//! - out of the edge: [`edge_sync`], one stream per channel, batches and acks;
//! - in at the hub: [`hub_sink`] commits each batch and acknowledges it, and
//!   forwards records meant for another department;
//! - out of the hub: [`consumer_api`] (each of the [`consumers`] granted a
//!   stream reads it with its own cursor, over HTTPS with its certificate) or
//!   [`delivery`] (the destination edge writes them to its spool).

pub mod buffer;
pub mod check;
pub mod consumer_api;
pub mod consumers;
pub mod delivery;
pub mod edge_sync;
pub mod hub_sink;
pub mod ingest;
pub mod producers;
pub mod spool;
