//! The gateway daemon: `gatewayd` (edge or hub) and `gatewayctl`, the I/O shell
//! around the decisions of `gateway-core` and the storage of `gateway-store`.
//!
//! Rooms by capability, arrows pointing down (`tests/tools/module-cycles`
//! checks that no two rooms import each other in a circle):
//!
//! - roles: [`role`] (start, reload, drain; [`role::edge`] and [`role::hub`]
//!   wire the capabilities together) and [`cli`] (the commands).
//! - capabilities: [`relay`] (TCP and UDP relays), [`channel`] (ingest,
//!   buffer, sync, sink, delivery, the consumers' API), [`fleet`] (enrollment,
//!   config, heartbeats, commands, audit collection, the operators' API),
//!   [`detect`] (intrusion alarms audited, bans kept on disk; the detectors
//!   themselves are the node's guard, which every listener reports to).
//! - [`tunnel`]: QUIC and TLS between edges and hubs, and stream framing.
//! - node services: [`node`] (shared context, audit writer, clock, sockets,
//!   bandwidth caps), [`admin`] (metrics, health, readiness), [`os`]
//!   (sd_notify, privilege drop, exit codes).
#![forbid(unsafe_code)]

pub mod admin;
pub mod channel;
pub mod cli;
pub mod detect;
pub mod fleet;
pub mod node;
pub mod os;
pub mod relay;
pub mod role;
pub mod tunnel;
