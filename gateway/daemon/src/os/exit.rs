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
/// EX_TEMPFAIL: `run` stopped to put in force a pushed config that changes
/// keys a reload cannot (`config push --restart`), or to go back from one;
/// the unit starts it again at once and the next start runs that version.
pub const RESTART: u8 = 75;
/// EX_OSERR: a listener, socket or TLS setup failed.
pub const OS_ERR: u8 = 71;
/// EX_NOPERM: a private key is readable by group or others.
pub const NO_PERM: u8 = 77;
/// EX_SOFTWARE: an internal error.
pub const SOFTWARE: u8 = 70;

/// Every code a `gatewayd` command exits with, and what it means to the
/// operator: docs/deploy.md's table is tested against this one.
pub const TABLE: &[(u8, &str)] = &[
    (OK, "success; `run`: a clean drain after SIGTERM"),
    (
        FAILED,
        "a check found a problem (`audit verify`: the chain is broken)",
    ),
    (USAGE, "bad command line"),
    (
        CONFIG,
        "the configuration is invalid: fix it (the unit does not restart)",
    ),
    (
        NO_INPUT,
        "a file is missing or unreadable (`run` before `enroll`: no device certificate yet)",
    ),
    (
        UNAVAILABLE,
        "a service the node needs cannot be reached now (the hub's PostgreSQL): the unit starts it again",
    ),
    (SOFTWARE, "an internal error: report it with the log"),
    (
        OS_ERR,
        "a listener cannot bind, or a socket or TLS setup failed",
    ),
    (
        RESTART,
        "`run` stopped to apply a config pushed with `--restart` (or to go back from one): the unit starts it again, and the next start runs that version",
    ),
    (
        NO_PERM,
        "a private key is readable by group or others: `chmod 600` it (the unit does not restart)",
    ),
];
