//! `gateway-updater follow`: one pass over what gatewayd handed over
//! (`[update] handoff`, read-only here), run by `gateway-updater-follow.service`
//! whenever gatewayd writes there (its path unit) and every few minutes
//! (its timer, for the maintenance window):
//!
//! 1. an acknowledgement of the update's outcome: the report is done;
//! 2. an offer of a version this box has not taken or refused: fetched from
//!    the hub through gatewayd, chunk by chunk, resuming where it stopped;
//!    a refusal (a bad signature, a downgrade, another hardware model) is
//!    kept for the hub, which then stops offering it;
//! 3. a staged version whose offer's window is open now, and no config try
//!    running: the box reboots into it.
//!
//! The window is China Standard Time (UTC+8, as every time the product
//! shows), so a box whose time zone is unset still reboots at 02:00 in the
//! county office.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use gateway_core::firmware::report::{self, Ack, Offer, Window};
use gateway_core::firmware::update::{Outcome, State};

use crate::files;
use crate::hub::{self, FetchError, Listeners};
use crate::install::{UpdateError, Updater};

/// What one pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Followed {
    /// Nothing to do.
    Nothing,
    /// The hub has the outcome; the report is cleared.
    Reported(Outcome),
    /// Staged; waiting for the window (`HH:MM-HH:MM`).
    Staged(String, String),
    /// Rebooting into the version.
    Rebooting(String),
    /// The version is refused on this box, and why (kept for the hub).
    Refused(String, String),
    /// Not now, and why.
    Busy(String),
    /// The update of the version was withdrawn (its rollout aborted) before
    /// the box booted it.
    Withdrawn(String),
}

/// Reads a handoff file within [`report::MAX_FILE`], not through a link.
fn read<T: serde::de::DeserializeOwned>(handoff: &Path, name: &str) -> Result<Option<T>, String> {
    let path = handoff.join(name);
    match files::read_limited(&path, report::MAX_FILE) {
        Ok(None) => Ok(None),
        Ok(Some(b)) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether gatewayd marks a config try in `handoff` (fails closed: a
/// marker that cannot be told is a try).
///
/// # Errors
/// [`UpdateError::ConfigState`] when the handoff cannot be read.
pub fn config_trying(handoff: &Path) -> Result<bool, UpdateError> {
    let path = handoff.join("config-try");
    match std::fs::symlink_metadata(&path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(UpdateError::ConfigState {
            path,
            reason: e.to_string(),
        }),
    }
}

/// The acknowledgement in `handoff`, if it is this boot's.
///
/// # Errors
/// When it does not read.
pub fn ack(handoff: &Path, boot_id: &str) -> Result<Option<Ack>, String> {
    Ok(read::<Ack>(handoff, "ack.json")?.filter(|a| !boot_id.is_empty() && a.boot_id == boot_id))
}

/// The offer in `handoff`, if any.
///
/// # Errors
/// When it does not read.
pub fn offer(handoff: &Path) -> Result<Option<Offer>, String> {
    read(handoff, "offer.json")
}

/// The minute of the day in China Standard Time at Unix time `ms`.
pub fn cst_minute(ms: i64) -> u16 {
    u16::try_from((ms.div_euclid(60_000) + 8 * 60).rem_euclid(24 * 60)).unwrap_or(0)
}

/// What the pass needs of the box beyond the updater.
pub struct Env<'a> {
    /// gatewayd's handoff directory.
    pub handoff: &'a Path,
    /// gatewayd's admin listener.
    pub admin: SocketAddr,
    /// Stop fetching after this long.
    pub give_up: Duration,
    /// This boot's id.
    pub boot_id: &'a str,
    /// The minute of the day now (China Standard Time).
    pub minute: u16,
    /// Reboots the box.
    pub reboot: &'a mut dyn FnMut() -> Result<(), String>,
}

/// One pass (see the module's text).
///
/// # Errors
/// A handoff file or the kept state that does not read, a disk error, or
/// a fetch that gave up (what is written stays for the next pass).
pub fn follow(
    updater: &mut Updater,
    b: Env<'_>,
    listeners: Listeners<'_>,
) -> Result<Followed, String> {
    let trying = || config_trying(b.handoff);
    // 1. The outcome acknowledged.
    if let State::Report { outcome } = updater.kept().state.clone() {
        let acked = ack(b.handoff, b.boot_id)?.and_then(|a| a.outcome);
        if acked.as_ref() == Some(&outcome) {
            updater.reported().map_err(|e| e.to_string())?;
            return Ok(Followed::Reported(outcome));
        }
        return Ok(Followed::Busy(
            "the last update's outcome waits for the hub's acknowledgement".into(),
        ));
    }
    // An aborted rollout's version, not booted yet: dropped.
    if let Some(w) = read::<report::Withdraw>(b.handoff, "withdraw.json")?
        && updater.withdraw(&w.version).map_err(|e| e.to_string())?
    {
        return Ok(Followed::Withdrawn(w.version));
    }
    let offer: Option<Offer> = read(b.handoff, "offer.json")?;
    let Some(offer) = offer else {
        return Ok(Followed::Nothing);
    };
    let kept = updater.kept().clone();
    let target = kept.state.target().map(|t| t.version.clone());
    let staged = matches!(kept.state, State::Staged { .. } | State::Trial { .. });
    // 2. An offer not taken yet (or being written).
    let taken = updater.running_version() == offer.version
        || kept.failed.contains(&offer.version)
        || (kept
            .refused
            .as_ref()
            .is_some_and(|(v, _)| *v == offer.version)
            && kept.refused_rollout.as_deref() == Some(offer.rollout.as_str()))
        || (staged && target.as_deref() == Some(offer.version.as_str()));
    if !taken {
        if staged {
            return Ok(Followed::Busy(format!(
                "{} is staged or on trial; {} waits until it is reported",
                target.unwrap_or_default(),
                offer.version
            )));
        }
        match hub::fetch(
            updater,
            &trying,
            (&offer.version, b.admin),
            (false, b.give_up),
            listeners,
        ) {
            Ok(_) => {}
            Err(FetchError::Refused(why)) => {
                updater
                    .refused((&offer.version, &offer.rollout), &why)
                    .map_err(|e| e.to_string())?;
                return Ok(Followed::Refused(offer.version, why));
            }
            Err(FetchError::Busy(why)) => return Ok(Followed::Busy(why)),
            Err(FetchError::Stopped(why)) => return Err(why),
        }
    }
    // 3. Staged: reboot inside the window.
    let State::Staged { target } = updater.kept().state.clone() else {
        return Ok(Followed::Nothing);
    };
    if target.version != offer.version {
        return Ok(Followed::Nothing);
    }
    let open =
        offer.window == "any" || Window::parse(&offer.window).is_ok_and(|w| w.contains(b.minute));
    if !open {
        return Ok(Followed::Staged(target.version, offer.window));
    }
    if trying().map_err(|e| e.to_string())? {
        return Ok(Followed::Busy(
            "a config try runs: the reboot waits for it to end".into(),
        ));
    }
    (b.reboot)()?;
    Ok(Followed::Rebooting(target.version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn china_standard_time_minutes() {
        // 2026-12-01T18:30:00Z is 02:30 in Beijing.
        let ms = 1_796_149_800_000;
        assert_eq!(cst_minute(ms), 2 * 60 + 30);
        assert_eq!(cst_minute(0), 8 * 60);
        assert_eq!(cst_minute(-60_000), 8 * 60 - 1);
    }

    #[test]
    fn a_marker_is_a_try_and_an_unreadable_one_fails_closed() {
        let d = tempfile::tempdir().expect("dir");
        assert!(!config_trying(d.path()).expect("none"));
        std::fs::write(d.path().join("config-try"), b"x").expect("write");
        assert!(config_trying(d.path()).expect("marked"));
        let file = d.path().join("not-a-dir");
        std::fs::write(&file, b"x").expect("write");
        assert!(
            config_trying(&file).is_err(),
            "a handoff that is a file cannot be told"
        );
    }

    #[test]
    fn only_this_boots_ack_counts() {
        let d = tempfile::tempdir().expect("dir");
        std::fs::write(
            d.path().join("ack.json"),
            br#"{"running":"2.0","boot_id":"b1","at_ms":1}"#,
        )
        .expect("write");
        assert_eq!(
            ack(d.path(), "b1").expect("ack").map(|a| a.running),
            Some("2.0".into())
        );
        assert_eq!(ack(d.path(), "b2").expect("ack"), None);
        assert_eq!(ack(d.path(), "").expect("ack"), None);
    }
}
