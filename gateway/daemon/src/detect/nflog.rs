//! Scans of ports nothing listens on: the nftables baseline logs each new
//! connection it drops to NFLOG group [`GROUP`] (`gatewayd nftables`); this
//! reads them from the kernel (nfnetlink_log) and reports each to the
//! detectors as a refusal of that port. A dropped packet's source is
//! unproven, so such a scan alarms (D2.scan) and never bans.
//!
//! The socket is opened at start, while the daemon may still be root (binding
//! the group needs CAP_NET_ADMIN); without it (not root, no nfnetlink_log,
//! the group taken by another process) the daemon says so once and goes on.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use gateway_core::detect::nflog::{self, Dropped, GROUP};
use gateway_core::detect::{Direction, Signal};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, sockopt,
};
use tracing::{info, warn};

use crate::node::Ctx;
use crate::node::guard::Report;

/// Opens the NFLOG socket bound to [`GROUP`].
///
/// # Errors
/// Why it could not be (the daemon goes on without it).
pub fn open() -> Result<OwnedFd, String> {
    let fd = nix::sys::socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(|e| format!("netlink socket: {e}"))?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(|e| format!("netlink bind: {e}"))?;
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(1, 0),
    )
    .map_err(|e| format!("receive timeout: {e}"))?;
    let mut buf = [0u8; 256];
    for m in nflog::setup_messages() {
        send(fd.as_raw_fd(), &m, MsgFlags::empty()).map_err(|e| format!("NFLOG setup: {e}"))?;
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
            .map_err(|e| format!("NFLOG setup answer: {e}"))?;
        nflog::ack(&buf[..n]).map_err(|errno| {
            format!(
                "NFLOG group {GROUP}: {} (another process may hold it)",
                nix::errno::Errno::from_raw(errno)
            )
        })?;
    }
    Ok(fd)
}

/// Reads dropped packets until draining, on a thread of its own.
pub fn spawn(ctx: Arc<Ctx>, fd: OwnedFd) {
    let spawned = std::thread::Builder::new()
        .name("nflog".into())
        .spawn(move || {
            info!(group = GROUP, "Watching the packets the nftables baseline drops (scans of closed ports)");
            let mut buf = vec![0u8; 64 << 10];
            while !ctx.draining.is_cancelled() {
                match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                    Ok(n) => {
                        for d in nflog::parse(&buf[..n]) {
                            report(&ctx, d);
                        }
                    }
                    Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                    // The kernel dropped messages for a full buffer: go on.
                    Err(nix::errno::Errno::ENOBUFS) => {}
                    Err(e) => {
                        warn!(error = %e, "NFLOG socket failed; scans of closed ports are no longer seen");
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "Cannot start the NFLOG reader");
    }
}

fn report(ctx: &Ctx, d: Dropped) {
    // From a legacy zone's networks: the legacy side; else the provincial.
    let legacy = ctx.policy().config().zones.iter().any(|z| {
        z.kind == gateway_core::config::ZoneKind::Legacy
            && z.networks.iter().any(|n| n.contains(d.source))
    });
    let proto = if d.protocol == 6 { "tcp" } else { "udp" };
    let target = format!("dropped {proto}/{}", d.port);
    let r = Report {
        peer: std::net::SocketAddr::new(d.source, d.source_port),
        verified: false,
        direction: if legacy {
            Direction::Outbound
        } else {
            Direction::Inbound
        },
        target: &target,
        device: None,
    };
    let target = (u64::from(d.protocol) << 16) | u64::from(d.port);
    ctx.report(&r, Signal::Refused { target });
}
