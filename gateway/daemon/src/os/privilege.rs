//! Dropping root: started as root outside systemd (which starts us as the
//! `gatewayd` user itself), the daemon binds its listeners, then becomes
//! `[node].user` for good. Its state directory is handed to that user first,
//! since databases and spool files are created there later.

use std::path::Path;

use nix::unistd::{Gid, Uid, User, chown, setgid, setgroups, setuid};

/// Gives up CAP_NET_ADMIN for good, once the NFLOG socket is bound (the
/// systemd unit grants it for that alone): from every set, so no later
/// `exec` or compromise can use it. Nothing to do where it was not held.
pub fn drop_net_admin() {
    use caps::{CapSet, Capability};
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        let _ = caps::drop(None, set, Capability::CAP_NET_ADMIN);
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    Uid::effective().is_root()
}

/// Becomes `user` (its uid, its primary group, no supplementary groups), after
/// giving it `state_dir`. Leaves no way back: a later `setuid(0)` must fail.
///
/// # Errors
/// When the user does not exist or a step is refused; the caller must not
/// carry on as root then.
pub fn drop_to(user: &str, state_dir: &Path) -> Result<(), String> {
    let u = User::from_name(user)
        .map_err(|e| format!("cannot look up user {user:?}: {e}"))?
        .ok_or_else(|| format!("node.user: there is no user {user:?} on this system"))?;
    chown_tree(state_dir, u.uid, u.gid)?;
    setgroups(&[u.gid]).map_err(|e| format!("setgroups: {e}"))?;
    setgid(u.gid).map_err(|e| format!("setgid({}): {e}", u.gid))?;
    setuid(u.uid).map_err(|e| format!("setuid({}): {e}", u.uid))?;
    if setuid(Uid::from_raw(0)).is_ok() {
        return Err("root could be regained after dropping it".into());
    }
    Ok(())
}

fn chown_tree(path: &Path, uid: Uid, gid: Gid) -> Result<(), String> {
    chown(path, Some(uid), Some(gid)).map_err(|e| format!("chown {}: {e}", path.display()))?;
    if path.is_dir() && !path.is_symlink() {
        let entries = std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for e in entries.flatten() {
            chown_tree(&e.path(), uid, gid)?;
        }
    }
    Ok(())
}
