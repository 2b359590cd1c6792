//! Boot entries with systemd's automatic boot assessment: each installed
//! version has `gw-VERSION+3.conf` on the ESP. systemd-boot renames an entry
//! with tries left to `+LEFT-1-DONE+1` before it boots it,
//! `systemd-bless-boot` drops the counter once `boot-complete.target` is
//! reached (the health gate passed), and an entry with no tries left is bad:
//! sorted after every other one, so the version before it boots by itself.
//! This module names entries, reads them back and picks the one that boots,
//! as systemd-boot does for the entries the updater writes.

use super::version_numbers;

/// Tries a new version gets before it counts as bad.
pub const TRIES: u32 = 3;

/// One boot entry, as its file name says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The version it boots.
    pub version: String,
    /// Tries left; `None` once blessed (a good entry).
    pub left: Option<u32>,
    /// Tries used.
    pub done: u32,
}

impl Entry {
    /// The entry the updater writes for a new version (last, after every
    /// chunk is written and checked).
    pub fn new(version: &str) -> Self {
        Entry {
            version: version.to_owned(),
            left: Some(TRIES),
            done: 0,
        }
    }

    /// Its file name under `loader/entries/`.
    pub fn file_name(&self) -> String {
        match (self.left, self.done) {
            (None, _) => format!("gw-{}.conf", self.version),
            (Some(l), 0) => format!("gw-{}+{l}.conf", self.version),
            (Some(l), d) => format!("gw-{}+{l}-{d}.conf", self.version),
        }
    }

    /// An entry file name this updater wrote (or systemd-boot renamed);
    /// `None` for any other name.
    pub fn parse(name: &str) -> Option<Self> {
        let stem = name.strip_prefix("gw-")?.strip_suffix(".conf")?;
        let (version, counter) = match stem.split_once('+') {
            Some((v, c)) => (v, Some(c)),
            None => (stem, None),
        };
        version_numbers(version)?;
        let (left, done) = match counter {
            None => (None, 0),
            Some(c) => {
                let (l, d) = match c.split_once('-') {
                    Some((l, d)) => (l, d.parse().ok()?),
                    None => (c, 0),
                };
                (Some(l.parse().ok()?), done_ok(d)?)
            }
        };
        Some(Entry {
            version: version.to_owned(),
            left,
            done,
        })
    }

    /// No tries left and never blessed.
    pub fn is_bad(&self) -> bool {
        self.left == Some(0)
    }

    /// What systemd-boot does before it boots an entry with a counter.
    pub fn attempt(&mut self) {
        if let Some(l) = self.left {
            self.left = Some(l.saturating_sub(1));
            self.done += 1;
        }
    }

    /// What `systemd-bless-boot` does once the boot is good.
    pub fn bless(&mut self) {
        self.left = None;
        self.done = 0;
    }
}

fn done_ok(d: u32) -> Option<u32> {
    (d <= 1000).then_some(d)
}

/// The entry systemd-boot boots by default: good and still-trying entries
/// before bad ones, then the newest version.
pub fn pick(entries: &[Entry]) -> Option<&Entry> {
    entries.iter().max_by(|a, b| {
        (!a.is_bad(), version_numbers(&a.version)).cmp(&(!b.is_bad(), version_numbers(&b.version)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back_as_written_and_other_names_are_not_ours() {
        for e in [
            Entry::new("2.0.1"),
            Entry {
                version: "2.0.1".into(),
                left: Some(1),
                done: 2,
            },
            Entry {
                version: "1.9".into(),
                left: None,
                done: 0,
            },
        ] {
            assert_eq!(
                Entry::parse(&e.file_name()),
                Some(e.clone()),
                "{}",
                e.file_name()
            );
        }
        assert_eq!(Entry::new("2.0").file_name(), "gw-2.0+3.conf");
        for bad in [
            "debian.conf",
            "gw-.conf",
            "gw-2.x+3.conf",
            "gw-2.0+a.conf",
            "gw-2.0+1-x.conf",
            "gw-2.0+3",
        ] {
            assert_eq!(Entry::parse(bad), None, "{bad}");
        }
    }

    /// A blessed 1.0 and `version` just installed.
    fn installed_then(version: &str) -> Vec<Entry> {
        vec![
            Entry {
                version: "1.0".into(),
                left: None,
                done: 0,
            },
            Entry::new(version),
        ]
    }

    /// Boots the default entry; `good` says whether the health gate passes.
    fn boot(entries: &mut [Entry], good: impl Fn(&str) -> bool) -> String {
        let version = pick(entries).expect("an entry").version.clone();
        let e = entries
            .iter_mut()
            .find(|e| e.version == version)
            .expect("entry");
        e.attempt();
        if good(&version) {
            e.bless();
        }
        version
    }

    #[test]
    fn a_version_that_never_passes_its_gate_gives_way_to_the_one_before_after_three_tries() {
        let mut entries = installed_then("2.0");
        let booted: Vec<String> = (0..5).map(|_| boot(&mut entries, |v| v != "2.0")).collect();
        assert_eq!(booted, ["2.0", "2.0", "2.0", "1.0", "1.0"]);
        assert!(entries[1].is_bad());
        assert_eq!(entries[1].file_name(), "gw-2.0+0-3.conf");
        // A good one is blessed at its first boot and stays the default.
        let mut entries = installed_then("2.0");
        let booted: Vec<String> = (0..3).map(|_| boot(&mut entries, |_| true)).collect();
        assert_eq!(booted, ["2.0", "2.0", "2.0"]);
        assert_eq!(entries[1].file_name(), "gw-2.0.conf");
        // A power cut during a trial boot uses a try up, no more: two cuts,
        // then a good boot, and the new version is kept.
        let mut entries = installed_then("2.0");
        boot(&mut entries, |_| false);
        boot(&mut entries, |_| false);
        assert_eq!(boot(&mut entries, |_| true), "2.0");
        assert_eq!(pick(&entries).map(|e| e.version.as_str()), Some("2.0"));
    }

    #[test]
    fn versions_compare_as_numbers() {
        let entries = vec![Entry::new("1.9"), Entry::new("1.10")];
        assert_eq!(pick(&entries).map(|e| e.version.as_str()), Some("1.10"));
    }
}
