//! Firmware rollouts at the box's end of the hub: which version each box is
//! offered (from the active firmware rollouts, refreshed by the rollout
//! controller of every hub), and what the hub answers a heartbeat that
//! carries the box's firmware status:
//!
//! - an offer ([`Message::FirmwareOffer`]) with each heartbeat until the
//!   status shows the box took it (fetching, staged, running it) or
//!   refused it, so an offer lost with a connection is made again;
//! - an acknowledgement ([`Message::FirmwareAck`]) of a heartbeat from a
//!   trial boot (the box's health gate waits for it) or one carrying an
//!   update's outcome (the box's updater then forgets the outcome);
//! - an audit record of each step the box reports (`firmware.step`) and of
//!   each outcome (`firmware.outcome`, with a rollback's journal lines).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use gateway_core::firmware::report::FirmwareStatus;
use gateway_core::firmware::update::Outcome;
use gateway_core::fleet::Message;

/// Boxes whose last firmware step a hub remembers (the rest are audited
/// again at their next heartbeat: a repeated record, never a lost one).
const MAX_SEEN: usize = 100_000;
/// The same acknowledgement is sent again at most this often (a lost one
/// is made good; a box that sends heartbeats in a loop gets no more).
const ACK_AGAIN_MS: i64 = 30_000;

/// An audit record to write: event, outcome, detail.
pub type Record = (&'static str, &'static str, String);

/// The offers, and the last step each box reported.
#[derive(Default)]
pub struct Offers {
    /// Device → (rollout, version).
    offers: Mutex<HashMap<String, (String, String)>>,
    /// Device → a version its aborted rollout offered.
    withdrawn: Mutex<HashMap<String, String>>,
    /// Device → its last reported step, as audited, and when it was last
    /// acknowledged (Unix ms).
    seen: Mutex<HashMap<String, (String, i64)>>,
}

/// Whether the box's status shows it took (or refused) `version`.
fn taken(f: &FirmwareStatus, version: &str) -> bool {
    f.running == version
        || f.target.as_deref() == Some(version)
        || f.error.as_ref().is_some_and(|(v, _)| v == version)
        || f.failed.iter().any(|v| v == version)
        || match &f.outcome {
            Some(
                Outcome::Committed { version: v, .. } | Outcome::RolledBack { version: v, .. },
            ) => v == version,
            None => false,
        }
}

/// The step a status shows, as audited.
fn step(f: &FirmwareStatus) -> String {
    let mut s = format!("phase={} running={}", f.phase, f.running);
    if let Some(t) = &f.target {
        s.push_str(&format!(" target={t}"));
    }
    if let Some(sb) = &f.standby {
        s.push_str(&format!(" standby={sb}"));
    }
    if let Some((v, why)) = &f.error {
        s.push_str(&format!(" refused={v}: {why}"));
    }
    match &f.outcome {
        Some(Outcome::Committed { version, .. }) => {
            s.push_str(&format!(" outcome=committed {version}"))
        }
        Some(Outcome::RolledBack { version, .. }) => {
            s.push_str(&format!(" outcome=rolled-back {version}"));
        }
        None => {}
    }
    s
}

impl Offers {
    /// Replaces the offers (device → rollout, version).
    pub fn set(&self, offers: HashMap<String, (String, String)>) {
        *self.offers.lock().unwrap_or_else(PoisonError::into_inner) = offers;
    }

    /// Replaces the withdrawals (device → version of an aborted rollout).
    pub fn set_withdrawn(&self, w: HashMap<String, String>) {
        *self
            .withdrawn
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = w;
    }

    /// The offer to `device`, if any.
    pub fn get(&self, device: &str) -> Option<(String, String)> {
        self.offers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(device)
            .cloned()
    }

    /// What the hub sends `device` for a heartbeat carrying `f` (already
    /// bounded) at `now_ms`, and what it audits: each step and outcome once,
    /// the same acknowledgement at most every [`ACK_AGAIN_MS`].
    pub fn heard(
        &self,
        device: &str,
        f: &FirmwareStatus,
        now_ms: i64,
    ) -> (Vec<Message>, Vec<Record>) {
        let mut replies = Vec::new();
        let mut records = Vec::new();
        let now = step(f);
        let (changed, ack_due) = {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if seen.len() >= MAX_SEEN && !seen.contains_key(device) {
                seen.clear();
            }
            let entry = seen
                .entry(device.to_owned())
                .or_insert((String::new(), i64::MIN));
            let changed = entry.0 != now;
            let ack_due = changed || now_ms.saturating_sub(entry.1) >= ACK_AGAIN_MS;
            entry.0 = now.clone();
            if ack_due && (f.outcome.is_some() || f.phase == "trial") {
                entry.1 = now_ms;
            }
            (changed, ack_due)
        };
        if changed {
            let outcome = if f.error.is_some() { "error" } else { "ok" };
            records.push(("firmware.step", outcome, now));
        }
        if let Some(o) = f.outcome.as_ref().filter(|_| changed) {
            records.push(match o {
                Outcome::Committed {
                    version,
                    security_version,
                } => (
                    "firmware.outcome",
                    "ok",
                    format!("committed {version} (security_version {security_version})"),
                ),
                Outcome::RolledBack { version, running } => (
                    "firmware.outcome",
                    "error",
                    format!(
                        "rolled back: {version} used up its boot tries, back on {running}; the failed boot's journal: {}",
                        if f.journal.is_empty() {
                            "(none kept)".to_owned()
                        } else {
                            f.journal.join(" | ")
                        }
                    ),
                ),
            });
        }
        if ack_due && (f.outcome.is_some() || f.phase == "trial") {
            replies.push(Message::FirmwareAck {
                running: f.running.clone(),
                outcome: f.outcome.clone(),
                boot: f.boot.clone(),
            });
        }
        let offer = self.get(device);
        if let Some((rollout, version)) = offer.clone()
            && !taken(f, &version)
            && f.outcome.is_none()
        {
            replies.push(Message::FirmwareOffer { rollout, version });
        }
        // An aborted rollout's version the box is writing or has staged,
        // and no rollout offers it now: withdrawn.
        let withdrawn = self
            .withdrawn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(device)
            .cloned();
        if let Some(v) = withdrawn
            && offer.is_none_or(|(_, o)| o != v)
            && f.target.as_deref() == Some(v.as_str())
            && matches!(
                f.phase.as_str(),
                "clearing" | "writing" | "written" | "staged"
            )
        {
            replies.push(Message::FirmwareWithdraw { version: v });
        }
        (replies, records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(running: &str, phase: &str, target: Option<&str>) -> FirmwareStatus {
        FirmwareStatus {
            running: running.into(),
            phase: phase.into(),
            target: target.map(str::to_owned),
            ..FirmwareStatus::default()
        }
    }

    #[test]
    fn offered_until_taken_acked_on_trial_and_outcome_steps_audited_once() {
        let o = Offers::default();
        o.set(HashMap::from([(
            "a".to_owned(),
            ("r-1".to_owned(), "2.0".to_owned()),
        )]));
        let idle = status("1.0", "idle", None);
        let (m, r) = o.heard("a", &idle, 0);
        assert_eq!(
            m,
            [Message::FirmwareOffer {
                rollout: "r-1".into(),
                version: "2.0".into()
            }]
        );
        assert_eq!(r.len(), 1);
        // The same step again: offered again, not audited again.
        let (m, r) = o.heard("a", &idle, 1);
        assert_eq!(m.len(), 1);
        assert!(r.is_empty());
        // Taken: no offer; each new step audited.
        let (m, r) = o.heard("a", &status("1.0", "writing", Some("2.0")), 2);
        assert!(m.is_empty());
        assert_eq!(r[0].0, "firmware.step");
        let trial = status("2.0", "trial", Some("2.0"));
        let (m, _) = o.heard("a", &trial, 3);
        // The same trial heartbeat again: acknowledged again only after 30 s.
        assert!(o.heard("a", &trial, 4).0.is_empty());
        assert_eq!(o.heard("a", &trial, 30_004).0.len(), 1);
        assert_eq!(
            m,
            [Message::FirmwareAck {
                running: "2.0".into(),
                outcome: None,
                boot: String::new(),
            }]
        );
        let mut back = status("1.0", "report", None);
        back.outcome = Some(Outcome::RolledBack {
            version: "2.0".into(),
            running: "1.0".into(),
        });
        back.journal = vec!["no hub".into()];
        let (m0, r0) = o.heard("a", &back, 40_000);
        let (_, again) = o.heard("a", &back, 40_001);
        assert!(again.is_empty(), "its outcome is audited once: {again:?}");
        let (m, r) = (m0, r0);
        assert!(matches!(
            &m[..],
            [Message::FirmwareAck {
                outcome: Some(_),
                ..
            }]
        ));
        assert!(r.iter().any(|(e, out, d)| *e == "firmware.outcome"
            && *out == "error"
            && d.contains("no hub")));
        // Refused by the updater: not offered again.
        let mut refused = status("1.0", "idle", None);
        refused.error = Some(("2.0".into(), "bad signature".into()));
        let (m, r) = o.heard("a", &refused, 50_000);
        assert!(m.is_empty());
        assert_eq!(r[0].1, "error");
        // Staged from a rollout since aborted: withdrawn, until it is not.
        o.set(HashMap::new());
        o.set_withdrawn(HashMap::from([("a".to_owned(), "2.0".to_owned())]));
        let staged = status("1.0", "staged", Some("2.0"));
        assert_eq!(
            o.heard("a", &staged, 60_000).0,
            [Message::FirmwareWithdraw {
                version: "2.0".into()
            }]
        );
        assert!(
            o.heard("a", &status("1.0", "idle", None), 60_001)
                .0
                .is_empty()
        );
        assert!(
            o.heard("a", &status("2.0", "trial", Some("2.0")), 60_002)
                .0
                .iter()
                .all(|m| !matches!(m, Message::FirmwareWithdraw { .. })),
            "booted: the gate decides"
        );
        // Another box has no offer.
        assert!(o.heard("b", &idle, 0).0.is_empty());
    }
}
