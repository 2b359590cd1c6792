//! Sockets of a running node: listeners handed in pre-bound ([`Bindings`], so
//! tests bind port 0 and nothing races for ports) or bound here with the
//! backlog and buffer sizes a boundary box needs, and the pause after a failed
//! accept.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

/// Sockets bound by the caller, used instead of binding the config's addresses.
#[derive(Default)]
pub struct Bindings {
    /// TCP listeners by the address the config names.
    pub tcp: HashMap<SocketAddr, std::net::TcpListener>,
    /// The hub's QUIC socket.
    pub udp: Option<std::net::UdpSocket>,
    /// UDP publish and access sockets by the address the config names.
    pub udp_listeners: HashMap<SocketAddr, std::net::UdpSocket>,
    /// The config in force as (managed version, text), for central management
    /// (`gatewayd run` fills it in; version 0 is the local file).
    pub config_source: Option<(u64, String)>,
    /// Scan detection's NFLOG socket, opened before privileges were given
    /// up (`gatewayd run`), or why it could not be; none: opened at start.
    pub nflog: Option<Result<std::os::fd::OwnedFd, String>>,
}

/// Accept queue of every TCP listener: bursts of connections are queued, not reset
/// (std's default of 128 overflows when a thousand clients connect at once).
pub const BACKLOG: i32 = 4096;

/// Binds a TCP listener with [`BACKLOG`] and `SO_REUSEADDR`.
///
/// # Errors
/// When the address cannot be bound.
pub fn listen_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = bound(
        addr,
        socket2::Type::STREAM,
        socket2::Socket::set_reuse_address,
    )?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// A socket of `kind` with `reuse` set, bound to `addr`.
fn bound(
    addr: SocketAddr,
    kind: socket2::Type,
    reuse: fn(&socket2::Socket, bool) -> std::io::Result<()>,
) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), kind, None)?;
    reuse(&s, true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// Binds a UDP socket that other sockets of this process may bind too
/// (`SO_REUSEPORT`): the kernel spreads peers over them by address hash, so each
/// has its own QUIC endpoint driver and the hub's receive path uses every core.
///
/// # Errors
/// When the address cannot be bound.
pub fn bind_udp_shared(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    Ok(bound(addr, socket2::Type::DGRAM, socket2::Socket::set_reuse_port)?.into())
}

/// Socket buffer asked for on each tunnel UDP socket, each way.
pub const UDP_BUFFER: usize = 4 << 20;

/// Gives a tunnel UDP socket [`UDP_BUFFER`] each way. Linux's default (208 KiB)
/// overflows under a burst of large QUIC packets: the datagrams are dropped,
/// QUIC takes the loss for congestion and slows down, and path MTU discovery
/// can take it for an MTU black hole. The kernel caps the size at
/// `net.core.rmem_max` / `wmem_max`; a capped size is logged with the fix.
pub fn size_udp_buffers(socket: &std::net::UdpSocket) {
    let s = socket2::SockRef::from(socket);
    let _ = s.set_recv_buffer_size(UDP_BUFFER);
    let _ = s.set_send_buffer_size(UDP_BUFFER);
    // Linux reports twice the size asked for (bookkeeping included).
    let got = s
        .recv_buffer_size()
        .unwrap_or(0)
        .min(s.send_buffer_size().unwrap_or(0))
        / 2;
    static ONCE: std::sync::Once = std::sync::Once::new();
    if got < UDP_BUFFER {
        ONCE.call_once(|| tracing::warn!(
            wanted = UDP_BUFFER,
            got,
            "UDP socket buffers capped by the kernel; bursts may be dropped. \
             Raise them with `sysctl -w net.core.rmem_max={UDP_BUFFER} net.core.wmem_max={UDP_BUFFER}` \
             (the package's /usr/lib/sysctl.d/90-gatewayd.conf does at boot)"
        ));
    }
}

impl Bindings {
    /// The UDP socket for a publish or access on `addr`: handed in, or bound.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub fn udp(&mut self, addr: SocketAddr) -> std::io::Result<Arc<tokio::net::UdpSocket>> {
        let std = match self.udp_listeners.remove(&addr) {
            Some(s) => s,
            None => std::net::UdpSocket::bind(addr)?,
        };
        std.set_nonblocking(true)?;
        Ok(Arc::new(tokio::net::UdpSocket::from_std(std)?))
    }

    /// The TCP listener on `addr`: handed in, or bound.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub fn tcp(&mut self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        let l = match self.tcp.remove(&addr) {
            Some(l) => l,
            None => listen_tcp(addr)?,
        };
        l.set_nonblocking(true)?;
        TcpListener::from_std(l)
    }
}

/// After a failed TCP accept (most often: too many open files), logs it and
/// pauses, so an accept loop does not spin while the condition lasts.
pub async fn accept_failed(error: &std::io::Error) {
    tracing::warn!(%error, "Accept failed");
    tokio::time::sleep(Duration::from_millis(20)).await;
}
