//! The QUIC endpoints of a node. A hub listens with one endpoint per core on
//! the same port (`SO_REUSEPORT`: the kernel spreads edges over them, each
//! with its own driver); an edge dials each hub once per lane, each lane on its
//! own socket and endpoint driver.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use super::hubs::lanes;
use super::tls::{self, TlsError};
use crate::node::sockets::{bind_udp_shared, size_udp_buffers};

/// Setting up an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The hub's stateless-reset key could not be kept.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A UDP socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

fn bind_err(addr: SocketAddr) -> impl Fn(std::io::Error) -> EndpointError {
    move |source| EndpointError::Bind { addr, source }
}

/// The hub's endpoints on `listen`: on `first` when a caller handed a socket
/// in (a socket bound without `SO_REUSEPORT` stays alone), else on a socket
/// bound here, and one more per core on the same port.
///
/// # Errors
/// When a socket cannot be bound or the endpoint's key cannot be kept.
pub fn hub_endpoints(
    first: Option<std::net::UdpSocket>,
    listen: SocketAddr,
    server: &quinn::ServerConfig,
    state_dir: &Path,
) -> Result<Vec<quinn::Endpoint>, EndpointError> {
    let first = match first {
        Some(s) => s,
        None => bind_udp_shared(listen).map_err(bind_err(listen))?,
    };
    let bound_at = first.local_addr().map_err(bind_err(listen))?;
    size_udp_buffers(&first);
    let mut sockets = vec![first];
    for _ in 1..lanes() {
        match bind_udp_shared(bound_at) {
            Ok(s) => {
                size_udp_buffers(&s);
                sockets.push(s);
            }
            Err(_) => break,
        }
    }
    let endpoint_config = tls::hub_endpoint_config(state_dir)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    sockets
        .into_iter()
        .map(|socket| {
            quinn::Endpoint::new(
                endpoint_config.clone(),
                Some(server.clone()),
                socket,
                runtime.clone(),
            )
            .map_err(bind_err(listen))
        })
        .collect()
}

/// An edge's `lanes` client endpoints, each on its own UDP socket.
///
/// # Errors
/// When a socket cannot be bound.
pub fn edge_endpoints(lanes: usize) -> Result<Vec<quinn::Endpoint>, EndpointError> {
    let any: SocketAddr = ([0, 0, 0, 0], 0).into();
    let runtime = Arc::new(quinn::TokioRuntime);
    (0..lanes)
        .map(|_| {
            let socket = std::net::UdpSocket::bind(any).map_err(bind_err(any))?;
            size_udp_buffers(&socket);
            quinn::Endpoint::new(tls::edge_endpoint_config(), None, socket, runtime.clone())
                .map_err(bind_err(any))
        })
        .collect()
}
