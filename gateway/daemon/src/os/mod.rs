//! What the daemon asks of the operating system: the service manager's
//! readiness and watchdog protocol ([`notify`]), dropping root ([`privilege`]),
//! exit codes systemd and scripts can tell apart ([`exit`]), files that
//! only the daemon's user can read, whatever the umask it was started with,
//! and directories producers write into, used only through their descriptor
//! ([`dir`]).

pub mod dir;
pub mod exit;
pub mod notify;
pub mod privilege;

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// From now on, every file and directory this process creates is owner-only
/// (umask 0077): databases, their journals, keys, spool and delivery files.
/// The unit sets the same `UMask=`; this holds outside it too.
pub fn private_files() {
    use nix::sys::stat::{Mode, umask};
    umask(Mode::S_IRWXG | Mode::S_IRWXO);
}

/// Creates `dir` (and its parents) owner-only (0700) if it does not exist.
///
/// # Errors
/// When it cannot be created.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// The mode of `dir` when it exists and group or others may read, write or
/// enter it.
pub fn open_to_others(dir: &Path) -> Option<u32> {
    let mode = std::fs::metadata(dir).ok()?.permissions().mode() & 0o7777;
    (mode & 0o077 != 0).then_some(mode)
}
