//! Firmware at the box's end of the control stream. gatewayd never writes a
//! root slot or the ESP: the updater does, under its own unit. Between the
//! two are three small files, readable by both (each is a claim about
//! public versions, never a secret):
//!
//! - `[update] handoff`/`offer.json` (gatewayd writes): the version a hub's
//!   rollout offers, with `[update] window` and `trial`; the updater's path
//!   unit starts `gateway-updater follow` when it changes;
//! - `[update] handoff`/`ack.json` (gatewayd writes): a hub recorded a
//!   heartbeat in which the box ran a version (a trial boot's health gate
//!   waits for that) and the outcome it carried (the updater then forgets
//!   it);
//! - `[update] updater_state`/`status.json` (the updater writes, gatewayd
//!   reads): what the box runs, has standing by and is doing, sent with
//!   every heartbeat and at once when it changes.
//!
//! Every file is read without following links and within
//! [`report::MAX_FILE`]; what the updater wrote is bounded again before it
//! is sent.

use std::io::Read as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use gateway_core::firmware::report::{self, Ack, FirmwareStatus, Offer};
use gateway_core::firmware::update::Outcome;

/// Reads `path` whole, within [`report::MAX_FILE`], not through a link:
/// `None` when it is absent, unreadable or too large.
fn read_bounded(path: &Path) -> Option<Vec<u8>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
        .open(path)
        .ok()?;
    let meta = f.metadata().ok()?;
    if !meta.is_file() || meta.len() > report::MAX_FILE {
        return None;
    }
    let mut out = Vec::new();
    f.take(report::MAX_FILE + 1).read_to_end(&mut out).ok()?;
    (out.len() as u64 <= report::MAX_FILE).then_some(out)
}

/// The updater's published status, bounded; `None` off the appliance image
/// (no updater) or when it does not read.
pub fn status(updater_state: &Path) -> Option<FirmwareStatus> {
    let bytes = read_bounded(&updater_state.join("status.json"))?;
    let mut s: FirmwareStatus = serde_json::from_slice(&bytes).ok()?;
    s.bound();
    Some(s)
}

/// Replaces `dir/name` with `bytes` (written, synced, renamed over), the
/// directory made if missing; 0644 whatever the umask (the updater reads
/// it under its own unit).
fn replace(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Marks (or clears) `config-try` in the handoff: a config try runs, and
/// the updater starts nothing meanwhile. Written before the try's reload,
/// removed after it ends; a box that cannot tell, starts nothing (the
/// updater fails closed on a marker it cannot read).
///
/// # Errors
/// The disk's.
pub fn mark_config_try(handoff: &Path, trying: bool) -> std::io::Result<()> {
    let path = handoff.join(CONFIG_TRY);
    if !handoff.is_dir() {
        // No updater on this box (not the appliance image): nobody to tell.
        return Ok(());
    }
    if trying {
        replace(handoff, CONFIG_TRY, b"a config try runs\n")
    } else {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The marker of a running config try, in the handoff.
pub const CONFIG_TRY: &str = "config-try";

/// The offer written for the updater now, if any.
pub fn current_offer(handoff: &Path) -> Option<Offer> {
    serde_json::from_slice(&read_bounded(&handoff.join("offer.json"))?).ok()
}

/// Hands `offer` to the updater, unless it is the one there already:
/// whether it wrote it.
///
/// # Errors
/// The disk's.
pub fn write_offer(handoff: &Path, offer: &Offer) -> std::io::Result<bool> {
    if current_offer(handoff).as_ref() == Some(offer) {
        return Ok(false);
    }
    // Offered again by a later rollout: no longer withdrawn.
    if current_withdraw(handoff).is_some_and(|w| w.version == offer.version) {
        std::fs::remove_file(handoff.join("withdraw.json"))?;
    }
    let bytes = serde_json::to_vec_pretty(offer).unwrap_or_default();
    replace(handoff, "offer.json", &bytes)?;
    Ok(true)
}

/// The withdrawal written for the updater, if any.
pub fn current_withdraw(handoff: &Path) -> Option<gateway_core::firmware::report::Withdraw> {
    serde_json::from_slice(&read_bounded(&handoff.join("withdraw.json"))?).ok()
}

/// Hands a withdrawal of `version` to the updater (unless written already)
/// and removes an offer of it: whether it wrote it.
///
/// # Errors
/// The disk's.
pub fn write_withdraw(handoff: &Path, version: &str) -> std::io::Result<bool> {
    if current_offer(handoff).is_some_and(|o| o.version == version) {
        std::fs::remove_file(handoff.join("offer.json"))?;
    }
    if current_withdraw(handoff).is_some_and(|w| w.version == version) {
        return Ok(false);
    }
    let w = gateway_core::firmware::report::Withdraw {
        version: version.to_owned(),
    };
    replace(
        handoff,
        "withdraw.json",
        &serde_json::to_vec(&w).unwrap_or_default(),
    )?;
    Ok(true)
}

/// Records a hub's acknowledgement for the updater (`boot`: the boot id
/// the acknowledged status carried), unless it says what the one there
/// says already (the path unit then has nothing new to follow).
///
/// # Errors
/// The disk's.
pub fn write_ack(
    handoff: &Path,
    (running, outcome, boot): (&str, Option<Outcome>, &str),
    at_ms: i64,
) -> std::io::Result<()> {
    if let Some(a) = current_ack(handoff)
        && a.running == running
        && a.outcome == outcome
        && a.boot_id == boot
    {
        return Ok(());
    }
    let ack = Ack {
        running: running.to_owned(),
        outcome,
        boot_id: boot.to_owned(),
        at_ms,
    };
    let bytes = serde_json::to_vec_pretty(&ack).unwrap_or_default();
    replace(handoff, "ack.json", &bytes)
}

/// The acknowledgement written last, if any.
pub fn current_ack(handoff: &Path) -> Option<Ack> {
    serde_json::from_slice(&read_bounded(&handoff.join("ack.json"))?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_are_written_once_and_links_are_not_followed() {
        let d = tempfile::tempdir().expect("dir");
        let offer = Offer {
            rollout: "r-1".into(),
            version: "2.0".into(),
            window: "any".into(),
            trial_s: 900,
        };
        assert!(write_offer(d.path(), &offer).expect("write"));
        assert!(!write_offer(d.path(), &offer).expect("again"));
        assert_eq!(current_offer(d.path()), Some(offer.clone()));
        assert!(write_withdraw(d.path(), "2.0").expect("withdraw"));
        assert!(!write_withdraw(d.path(), "2.0").expect("again"));
        assert_eq!(current_offer(d.path()), None, "the offer is gone");
        assert!(write_offer(d.path(), &offer).expect("offered again"));
        assert_eq!(current_withdraw(d.path()), None, "no longer withdrawn");
        write_ack(d.path(), ("2.0", None, "b1"), 5).expect("ack");
        write_ack(d.path(), ("2.0", None, "b1"), 9).expect("same");
        assert_eq!(
            current_ack(d.path()).map(|a| a.at_ms),
            Some(5),
            "not written again"
        );
        assert_eq!(current_ack(d.path()).map(|a| a.running), Some("2.0".into()));

        let up = tempfile::tempdir().expect("dir");
        assert_eq!(status(up.path()), None);
        let real = up.path().join("real.json");
        std::fs::write(&real, br#"{"running":"1.0","phase":"idle"}"#).expect("write");
        std::os::unix::fs::symlink(&real, up.path().join("status.json")).expect("link");
        assert_eq!(status(up.path()), None, "a link is not followed");
        std::fs::remove_file(up.path().join("status.json")).expect("rm");
        std::fs::rename(&real, up.path().join("status.json")).expect("mv");
        assert_eq!(status(up.path()).map(|s| s.running), Some("1.0".into()));
        std::fs::write(up.path().join("status.json"), vec![b' '; 300 << 10]).expect("big");
        assert_eq!(status(up.path()), None, "too large");
    }
}
