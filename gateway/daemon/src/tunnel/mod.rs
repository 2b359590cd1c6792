//! Tunnels: the QUIC connections between edges and hubs, with mutual TLS, and
//! the streams' framing. Every relay, channel sync and management session runs
//! on a tunnel; the tunnel knows none of them: the roles hand in a `Handler`.
//!
//! - [`tls`]: TLS and QUIC settings; [`pki`]: the offline CA and certificates.
//! - [`endpoint`]: the QUIC endpoints, one per core (lanes).
//! - [`dial`]: the edge's side: connect, hello, keep up with backoff.
//! - [`accept`]: the hub's side: accept, identify, hello.
//! - [`hubs`]: an edge's live tunnels; [`devices`]: a hub's connected edges.
//! - [`lane`]: a lane's endpoint and connections driven by one task (sans IO).
//! - [`frame`]: frame and batch I/O on a stream, with timeouts.
//! - [`streams`]: how many streams a peer may open, grown as it uses them.

pub mod accept;
pub mod devices;
pub mod dial;
pub mod endpoint;
pub mod frame;
pub mod hubs;
pub mod lane;
pub mod pki;
pub mod streams;
pub mod tls;
