//! The service manager protocol (`sd_notify(3)`): one datagram per state change
//! to `$NOTIFY_SOCKET`. Without that variable (not under systemd, or not
//! `Type=notify`) every call does nothing.
//!
//! gatewayd sends `READY=1` once its listeners are bound and the first hub
//! connection attempts have started, `STATUS=` lines with the current state,
//! `WATCHDOG=1` from its main loop at half the `WatchdogSec` interval (a stuck
//! loop stops the pings and systemd restarts it), and `STOPPING=1` when it
//! starts draining.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends `state` (e.g. `"READY=1"`, several lines allowed) if a service manager
/// listens; errors are ignored, as the protocol intends.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        }
        None => SocketAddr::from_pathname(&path),
    };
    if let Ok(addr) = addr {
        let _ = sock.send_to_addr(state.as_bytes(), &addr);
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, if the watchdog
/// is on for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
