//! What the daemon asks of the operating system: the service manager's
//! readiness and watchdog protocol ([`notify`]), dropping root ([`privilege`]),
//! and exit codes systemd and scripts can tell apart ([`exit`]).

pub mod exit;
pub mod notify;
pub mod privilege;
