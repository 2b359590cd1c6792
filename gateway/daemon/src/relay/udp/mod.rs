//! UDP relays: QUIC datagrams tagged with a flow id, never a reliable stream.
//!
//! A flow is opened with an `OpenUdp` frame on the opener's one signalling
//! stream of that connection ([`link`]), answered there, and ended there by
//! either side with `FlowEnd`. Datagrams carry `flow: u32` + payload. The edge
//! that serves the service expires a flow after its `idle_timeout` without a
//! datagram either way; the other side hears the end and forgets the client.
//!
//! A UDP "front" takes clients' datagrams on a socket, one flow per client
//! address: a hub's UDP `[[publish]]` (flows to the publishing edge) and an
//! edge's UDP `[[access]]` (flows to `DEVICE/SERVICE` through a hub, which joins
//! the two edges' flows in [`transit`]).
//!
//! - [`link`]: the signalling streams, and each side's hold on a flow.
//! - [`flows`]: the flow table, datagram routing, and the edge's side of a flow
//!   (a socket to the target, idle expiry).
//! - [`front`]: sockets that take clients' datagrams (publish, access).
//! - [`transit`]: a hub joining two edges' flows.
//! - [`protocol`]: the level-3 check of an `rtp` or `mpegts` service's datagrams.

pub mod flows;
pub mod front;
pub mod link;
pub mod protocol;
pub mod transit;
