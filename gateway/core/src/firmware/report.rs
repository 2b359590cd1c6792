//! What a box says of its firmware: the updater publishes it in its state
//! directory (`status.json`), gatewayd reads it there (read-only) and sends
//! it to the hub in every heartbeat, and the hub's rollouts judge each box
//! by it. Everything in it is a peer's claim: [`FirmwareStatus::bound`]
//! keeps what a hub may store.

use serde::{Deserialize, Serialize};

use super::update::Outcome;

/// The longest version, phase or error text kept.
const MAX_TEXT: usize = 200;
/// Journal lines of a failed boot kept.
pub const MAX_JOURNAL: usize = 50;
/// The longest journal line kept.
const MAX_LINE: usize = 300;
/// Rolled-back versions kept.
const MAX_FAILED: usize = 16;

/// The box's firmware, as its updater last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareStatus {
    /// The version running.
    pub running: String,
    /// The version the other slot boots (a good entry on the ESP), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<String>,
    /// The updater's phase: `idle`, `clearing`, `writing`, `written`,
    /// `staged`, `trial`, `report`.
    pub phase: String,
    /// The version being installed, staged or tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Chunks of the target in the inactive slot, and of all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<(u64, u64)>,
    /// How the last update ended, until the hub acknowledges it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// The last offer the updater refused or could not finish: the version
    /// and why (a bad signature, a downgrade, another hardware model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<(String, String)>,
    /// Versions that rolled back on this box.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
    /// With a rollback: the failed boot's last journal lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub journal: Vec<String>,
    /// The boot the updater published this in (its boot id): the hub
    /// echoes it in its acknowledgement, so a trial boot's gate knows the
    /// acknowledgement answers this boot, with no clock involved.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub boot: String,
}

/// Control characters (an escape sequence for the operator's terminal, a
/// forged log line) become U+FFFD.
fn clean(s: &mut String) {
    if s.chars().any(char::is_control) {
        *s = s
            .chars()
            .map(|c| if c.is_control() { '\u{fffd}' } else { c })
            .collect();
    }
}

/// A version that does not read as one (dotted numbers) becomes `?`.
fn version(s: &mut String) {
    if super::version_numbers(s).is_none() {
        "?".clone_into(s);
    }
}

fn cut(s: &mut String, max: usize) {
    clean(s);
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

impl FirmwareStatus {
    /// Keeps only what a hub may store of a peer's claim: versions that
    /// read as versions (else `?`), texts of at most 200 bytes without
    /// control characters, at most [`MAX_JOURNAL`] journal lines of 300.
    pub fn bound(&mut self) {
        version(&mut self.running);
        for v in self.standby.iter_mut().chain(self.target.iter_mut()) {
            version(v);
        }
        if let Some((v, _)) = &mut self.error {
            version(v);
        }
        match &mut self.outcome {
            Some(Outcome::Committed { version: v, .. }) => version(v),
            Some(Outcome::RolledBack {
                version: v,
                running,
            }) => {
                version(v);
                version(running);
            }
            None => {}
        }
        self.failed.retain(|v| super::version_numbers(v).is_some());
        cut(&mut self.running, MAX_TEXT);
        cut(&mut self.boot, 64);
        cut(&mut self.phase, MAX_TEXT);
        for s in self.standby.iter_mut().chain(self.target.iter_mut()) {
            cut(s, MAX_TEXT);
        }
        if let Some((v, why)) = &mut self.error {
            cut(v, MAX_TEXT);
            cut(why, MAX_TEXT * 4);
        }
        match &mut self.outcome {
            Some(Outcome::Committed { version, .. }) => cut(version, MAX_TEXT),
            Some(Outcome::RolledBack { version, running }) => {
                cut(version, MAX_TEXT);
                cut(running, MAX_TEXT);
            }
            None => {}
        }
        self.failed.truncate(MAX_FAILED);
        for f in &mut self.failed {
            cut(f, MAX_TEXT);
        }
        let skip = self.journal.len().saturating_sub(MAX_JOURNAL);
        self.journal.drain(..skip);
        for l in &mut self.journal {
            cut(l, MAX_LINE);
        }
    }

    /// `2.0` committed, on trial, staged, being written...: one line for
    /// `devices list` and the audit.
    pub fn summary(&self) -> String {
        let mut s = self.running.clone();
        if let Some(t) = &self.target {
            match self.phase.as_str() {
                "trial" => s.push_str(" (on trial)"),
                "staged" => s.push_str(&format!(" ({t} staged)")),
                _ => match self.chunks {
                    Some((d, n)) => s.push_str(&format!(" ({t}: {d}/{n} chunks)")),
                    None => s.push_str(&format!(" ({t}: {})", self.phase)),
                },
            }
        }
        s
    }
}

/// gatewayd to the updater (`offer.json` in gatewayd's `firmware/`
/// directory, read-only to the updater): install this version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    /// The rollout that offers it.
    pub rollout: String,
    /// The version.
    pub version: String,
    /// `[update] window`, `HH:MM-HH:MM`, or `any`.
    pub window: String,
    /// `[update] trial`, seconds.
    pub trial_s: u64,
}

/// gatewayd to the updater (`ack.json` beside the offer): a hub recorded a
/// heartbeat in which the box ran `running`, and the outcome it carried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// The version the acknowledged heartbeat said runs.
    pub running: String,
    /// The outcome it carried, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// The boot the acknowledged status was published in (the updater's
    /// boot id, echoed by the hub): a trial boot's gate takes only its own
    /// boot's acknowledgement, with no clock involved.
    pub boot_id: String,
    /// The hub's answer arrived at (Unix ms, the box's clock: shown, never
    /// compared).
    pub at_ms: i64,
}

/// gatewayd to the updater (`withdraw.json` beside the offer): the rollout
/// that offered `version` was aborted; drop it unless it has booted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Withdraw {
    /// The version.
    pub version: String,
}

impl Ack {
    /// Whether an acknowledgement a hub sent reads as one: versions that
    /// are versions, a boot id of at most 64 hex digits and dashes (else
    /// it is not written for the updater: one hub's garbage must not stall
    /// every pass of it).
    pub fn well_formed(running: &str, outcome: Option<&Outcome>, boot: &str) -> bool {
        let v = |s: &str| super::version_numbers(s).is_some();
        v(running)
            && boot.len() <= 64
            && boot.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
            && match outcome {
                Some(Outcome::Committed { version, .. }) => v(version),
                Some(Outcome::RolledBack { version, running }) => v(version) && v(running),
                None => true,
            }
    }
}

/// The largest offer, acknowledgement or status file read.
pub const MAX_FILE: u64 = 256 << 10;

/// A maintenance window, `HH:MM-HH:MM` local time (it may span midnight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Its start, minutes after midnight.
    pub from: u16,
    /// Its end (exclusive).
    pub to: u16,
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.from / 60,
            self.from % 60,
            self.to / 60,
            self.to % 60
        )
    }
}

impl Window {
    /// Parses `02:00-05:00`.
    ///
    /// # Errors
    /// What is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        let hint = "a window is HH:MM-HH:MM, local time (02:00-05:00)";
        let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?}: {hint}"))?;
        let minutes = |t: &str| -> Option<u16> {
            let (h, m) = t.trim().split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let (Some(from), Some(to)) = (minutes(a), minutes(b)) else {
            return Err(format!("{s:?}: {hint}"));
        };
        if from == to {
            return Err(format!("{s:?}: the window is empty; {hint}"));
        }
        Ok(Window { from, to })
    }

    /// Whether `minute` (after local midnight) is inside.
    pub fn contains(self, minute: u16) -> bool {
        if self.from < self.to {
            (self.from..self.to).contains(&minute)
        } else {
            minute >= self.from || minute < self.to
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_span_midnight() {
        let w = Window::parse("02:00-05:00").expect("window");
        assert_eq!(w.to_string(), "02:00-05:00");
        assert!(w.contains(120) && w.contains(299) && !w.contains(300) && !w.contains(119));
        let n = Window::parse("23:30-01:00").expect("window");
        assert!(n.contains(23 * 60 + 45) && n.contains(30) && !n.contains(60) && !n.contains(600));
        for bad in [
            "",
            "2:00-5:00",
            "02:00",
            "24:00-01:00",
            "02:60-03:00",
            "03:00-03:00",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_peers_claim_is_bounded() {
        let mut hostile = FirmwareStatus {
            running: "1.0\u{1b}[2J".into(),
            phase: "idle\r\nforged".into(),
            journal: vec!["a\u{1b}]0;x\u{7}b".into()],
            failed: vec!["2.0".into(), "../x".into()],
            ..Default::default()
        };
        hostile.bound();
        assert_eq!(hostile.running, "?");
        assert!(!hostile.phase.contains('\n') && !hostile.journal[0].contains('\u{1b}'));
        assert_eq!(hostile.failed, ["2.0"]);
        let mut s = FirmwareStatus {
            running: "1".repeat(500),
            phase: "idle".into(),
            failed: vec!["1.0".into(); 100],
            journal: (0..200)
                .map(|i| format!("{i} {}", "x".repeat(1000)))
                .collect(),
            ..Default::default()
        };
        s.bound();
        assert!(s.running.len() <= 200 && s.running.is_char_boundary(s.running.len()));
        assert_eq!(s.failed.len(), 16);
        assert_eq!(s.journal.len(), MAX_JOURNAL);
        assert!(s.journal[0].starts_with("150 ") && s.journal[0].len() == 300);
    }

    #[test]
    fn a_hubs_acknowledgement_must_read_as_one() {
        let boot = "b068c2b4-93d8-421b-8df7-0d3aa4ceb007";
        assert!(Ack::well_formed("2.0", None, boot));
        assert!(Ack::well_formed("2.0", None, ""));
        assert!(!Ack::well_formed("2.0\n", None, boot));
        assert!(!Ack::well_formed("2.0", None, &"a".repeat(65)));
        assert!(!Ack::well_formed("2.0", None, "../x"));
        let back = Outcome::RolledBack {
            version: "x".repeat(300),
            running: "2.0".into(),
        };
        assert!(!Ack::well_formed("2.0", Some(&back), boot));
    }

    #[test]
    fn summaries() {
        let mut s = FirmwareStatus {
            running: "1.0".into(),
            phase: "writing".into(),
            target: Some("2.0".into()),
            chunks: Some((3, 12)),
            ..Default::default()
        };
        assert_eq!(s.summary(), "1.0 (2.0: 3/12 chunks)");
        s.phase = "staged".into();
        assert_eq!(s.summary(), "1.0 (2.0 staged)");
        s.phase = "trial".into();
        s.running = "2.0".into();
        assert_eq!(s.summary(), "2.0 (on trial)");
    }
}
