//! Exit codes (BSD sysexits), so systemd and scripts can tell failures apart.
//! `RestartPreventExitStatus=64` in the unit stops a restart loop on bad config.

/// Success.
pub const OK: u8 = 0;
/// A check found a problem (`audit verify`: the chain is broken).
pub const FAILED: u8 = 1;
/// EX_USAGE: bad command line.
pub const USAGE: u8 = 2;
/// EX_DATAERR: the configuration is invalid.
pub const CONFIG: u8 = 64;
/// EX_NOINPUT: an input file is missing or unreadable.
pub const NO_INPUT: u8 = 66;
/// EX_UNAVAILABLE: a service the node needs cannot be reached now (the hub's
/// PostgreSQL); systemd starts it again.
pub const UNAVAILABLE: u8 = 69;
/// EX_OSERR: a listener, socket or TLS setup failed.
pub const OS_ERR: u8 = 71;
/// EX_NOPERM: a private key is readable by group or others.
pub const NO_PERM: u8 = 77;
/// EX_SOFTWARE: an internal error.
pub const SOFTWARE: u8 = 70;
