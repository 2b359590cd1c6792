//! The updater's state machine on a simulated box: two slots, an ESP whose
//! entries systemd-boot counts down and `systemd-bless-boot` blesses, a state
//! disk, and power cuts before or after any action is done (before its new
//! state is kept). Whatever the cuts, the box boots only slots whose every
//! chunk is written, never loops, and reports each offer's outcome (at
//! least once).

use proptest::prelude::*;

use super::*;
use crate::firmware::boot::{TRIES, pick};
use crate::firmware::{FORMAT, Manifest};

const CHUNKS: usize = 5;

fn manifest(version: &str) -> Manifest {
    Manifest {
        format: FORMAT.into(),
        version: version.into(),
        security_version: 1,
        hardware: vec!["qemu-x86_64".into()],
        min_from_version: "0".into(),
        kernel_sha256: "0".repeat(64),
        initrd_sha256: "0".repeat(64),
        root_bytes: CHUNKS as u64 * crate::firmware::CHUNK_BYTES,
        chunks: vec!["0".repeat(64); CHUNKS],
    }
}

/// Where a cut falls in one step of the updater.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// No cut.
    None,
    /// Before the action is done.
    Before,
    /// After it is done, before its new state is kept.
    After,
}

/// A box: what each slot's chunks hold, the ESP's entries (each with the
/// slot it boots), what runs, and the kept state.
struct Box {
    slots: [Vec<Option<String>>; 2],
    entries: Vec<(Entry, usize)>,
    running: usize,
    version: String,
    kept: State,
    /// Versions whose health gate fails (their gatewayd cannot reach a hub).
    broken: Vec<String>,
    reports: Vec<Outcome>,
    boots: Vec<String>,
}

impl Box {
    /// A box running `v1` from slot 0, blessed.
    fn new(broken: &[&str]) -> Self {
        let mut e = Entry::new("1.0");
        e.bless();
        Box {
            slots: [vec![Some("1.0".into()); CHUNKS], vec![None; CHUNKS]],
            entries: vec![(e, 0)],
            running: 0,
            version: "1.0".into(),
            kept: State::Idle,
            broken: broken.iter().map(|s| (*s).to_owned()).collect(),
            reports: Vec::new(),
            boots: Vec::new(),
        }
    }

    fn inactive(&self) -> usize {
        1 - self.running
    }

    /// systemd-boot: the default entry, counted down if it is on trial.
    fn boot(&mut self) {
        let list: Vec<Entry> = self.entries.iter().map(|(e, _)| e.clone()).collect();
        let chosen = pick(&list).expect("the box has an entry to boot").clone();
        let (entry, slot) = self
            .entries
            .iter_mut()
            .find(|(e, _)| *e == chosen)
            .expect("the chosen entry");
        entry.attempt();
        let slot = *slot;
        assert!(
            self.slots[slot]
                .iter()
                .all(|c| c.as_deref() == Some(chosen.version.as_str())),
            "entry {} boots slot {slot}, which does not hold it whole: {:?}",
            chosen.version,
            self.slots[slot]
        );
        self.running = slot;
        self.version = chosen.version.clone();
        self.boots.push(chosen.version);
    }

    fn entry_list(&self) -> Vec<Entry> {
        self.entries.iter().map(|(e, _)| e.clone()).collect()
    }

    /// Runs the updater until it waits with nothing to do, offering each
    /// of `offers` when idle, with `cuts` consumed one per step.
    fn run(&mut self, mut offers: Vec<&str>, cuts: &mut dyn Iterator<Item = Cut>) {
        offers.reverse();
        let mut state = self.kept.clone().start(&self.version, &self.entry_list());
        for _ in 0..1000 {
            let cut = cuts.next().unwrap_or(Cut::None);
            if cut == Cut::Before {
                self.reboot(&mut state);
                continue;
            }
            let input = match state.next() {
                Action::Wait => {
                    // The hub offers again until the box takes it.
                    let Some(&v) = offers.last() else {
                        return;
                    };
                    state.may_start(false).expect("idle takes an offer");
                    Some(Input::Offer {
                        version: v.into(),
                        running: self.version.clone(),
                        security_version: 7,
                        progress: Progress::new(&manifest(v)),
                    })
                }
                Action::RemoveEntries { keep } => {
                    self.entries.retain(|(e, _)| e.version == keep);
                    Some(Input::EntriesRemoved)
                }
                Action::FillSlot => {
                    let State::Writing { target, progress } = &state else {
                        unreachable!("FillSlot comes only from Writing");
                    };
                    let i = (0..CHUNKS).find(|i| !progress.has(*i)).expect("a chunk");
                    let slot = self.inactive();
                    self.slots[slot][i] = Some(target.version.clone());
                    Some(Input::ChunkWritten(i))
                }
                Action::WriteEntry(e) => {
                    if !self.entries.iter().any(|(x, _)| x.version == e.version) {
                        let slot = self.inactive();
                        self.entries.push((e, slot));
                    }
                    Some(Input::EntryWritten)
                }
                Action::RebootInWindow => {
                    self.reboot(&mut state);
                    None
                }
                Action::AwaitGate => {
                    if self.broken.contains(&self.version) {
                        // The gate times out: the box reboots.
                        self.reboot(&mut state);
                        None
                    } else {
                        // systemd-bless-boot, then the updater sees it.
                        let v = self.version.clone();
                        for (e, _) in &mut self.entries {
                            if e.version == v {
                                e.bless();
                            }
                        }
                        Some(Input::Blessed)
                    }
                }
                Action::Report(o) => {
                    self.reports.push(o);
                    Some(Input::Reported)
                }
            };
            if let Some(input) = input {
                let next = state.clone().apply(input);
                if cut == Cut::After {
                    // Done, not kept.
                    self.reboot(&mut state);
                    continue;
                }
                if matches!(state, State::Idle) && !matches!(next, State::Idle) {
                    offers.pop();
                }
                state = next;
                self.kept = state.clone();
            }
        }
        panic!("the updater did not settle: {:?}", self.kept);
    }

    fn reboot(&mut self, state: &mut State) {
        self.boot();
        *state = self.kept.clone().start(&self.version, &self.entry_list());
        self.kept = state.clone();
    }
}

#[test]
fn a_good_version_commits_and_a_broken_one_rolls_back_after_its_tries() {
    let mut b = Box::new(&["3.0"]);
    b.run(vec!["2.0", "3.0"], &mut std::iter::empty());
    assert_eq!(
        b.reports,
        vec![
            Outcome::Committed {
                version: "2.0".into(),
                security_version: 7
            },
            Outcome::RolledBack {
                version: "3.0".into(),
                running: "2.0".into()
            },
        ]
    );
    assert_eq!(b.version, "2.0");
    assert_eq!(b.kept, State::Idle);
    // 2.0 once, 3.0 three times, then 2.0 by itself.
    assert_eq!(b.boots, ["2.0", "3.0", "3.0", "3.0", "2.0"]);
    assert_eq!(
        b.boots.iter().filter(|v| *v == "3.0").count(),
        TRIES as usize
    );
    // 1.0 was on the slot 3.0 took: its entry is gone, 2.0's is blessed.
    let names: Vec<String> = b.entries.iter().map(|(e, _)| e.file_name()).collect();
    assert_eq!(names, ["gw-2.0.conf", "gw-3.0+0-3.conf"]);
}

#[test]
fn an_entry_on_the_esp_is_never_written_again() {
    // A cut after the entry is written and before that is kept, then a
    // trial boot used a try, then a cut: the entry keeps its count.
    let mut b = Box::new(&["2.0"]);
    let cuts = [Cut::None; 7]
        .into_iter()
        .chain([Cut::After]) // after WriteEntry: Written kept, entry on the ESP
        .collect::<Vec<_>>();
    b.run(vec!["2.0"], &mut cuts.into_iter());
    assert_eq!(
        b.boots.iter().filter(|v| *v == "2.0").count(),
        TRIES as usize
    );
    assert!(matches!(
        b.reports.as_slice(),
        [Outcome::RolledBack { version, running }] if version == "2.0" && running == "1.0"
    ));
}

#[test]
fn a_withdrawn_offer_ends_before_its_trial_only() {
    let target = Target {
        version: "2.0".into(),
        from: "1.0".into(),
        security_version: 1,
    };
    for s in [
        State::Written {
            target: target.clone(),
        },
        State::Staged {
            target: target.clone(),
        },
    ] {
        assert_eq!(s.apply(Input::Withdrawn), State::Idle);
    }
    let trial = State::Trial { target };
    assert_eq!(
        trial.clone().apply(Input::Withdrawn),
        trial,
        "booted: the gate decides"
    );
}

#[test]
fn another_offer_while_writing_starts_afresh_and_the_same_one_goes_on() {
    let mut progress = Progress::new(&manifest("2.0"));
    progress.mark(0);
    let offer = |v: &str, p: Progress| Input::Offer {
        version: v.into(),
        running: "1.0".into(),
        security_version: 1,
        progress: p,
    };
    let writing = State::Writing {
        target: Target {
            version: "2.0".into(),
            from: "1.0".into(),
            security_version: 1,
        },
        progress: progress.clone(),
    };
    let same = writing
        .clone()
        .apply(offer("2.0", Progress::new(&manifest("2.0"))));
    assert_eq!(same, writing, "the chunks written are kept");
    let other = writing.apply(offer("2.1", Progress::new(&manifest("2.1"))));
    assert!(matches!(other, State::Clearing { ref target, .. } if target.version == "2.1"));
    assert_eq!(other.next(), Action::RemoveEntries { keep: "1.0".into() });
}

#[test]
fn a_slot_read_back_decides_what_is_written_not_the_kept_bitmap() {
    let m = manifest("2.0");
    let target = Target {
        version: "2.0".into(),
        from: "1.0".into(),
        security_version: 1,
    };
    // Every chunk checked in the slot: a Writing state settles (it would
    // otherwise wait for a chunk that is never written).
    let mut all = Progress::new(&m);
    (0..CHUNKS).for_each(|i| all.mark(i));
    let writing = State::Writing {
        target: target.clone(),
        progress: Progress::new(&m),
    };
    assert_eq!(
        writing.apply(Input::Checked(all)),
        State::Written {
            target: target.clone()
        }
    );
    // A written slot whose read-back finds chunk 3 wrong goes back to
    // writing it; the entry is not written meanwhile.
    let mut some = Progress::new(&m);
    (0..CHUNKS).filter(|i| *i != 3).for_each(|i| some.mark(i));
    let back = State::Written {
        target: target.clone(),
    }
    .apply(Input::Checked(some));
    assert!(
        matches!(back, State::Writing { ref progress, .. } if !progress.has(3) && progress.done() == CHUNKS - 1)
    );
    assert_eq!(back.next(), Action::FillSlot);
    // A check of another version's slot changes nothing.
    let other = Progress::new(&manifest("2.1"));
    let written = State::Written { target };
    assert_eq!(written.clone().apply(Input::Checked(other)), written);
}

#[test]
fn no_offer_is_taken_during_a_config_try_a_trial_or_before_a_report() {
    let target = Target {
        version: "2.0".into(),
        from: "1.0".into(),
        security_version: 1,
    };
    assert_eq!(State::Idle.may_start(true), Err(Busy::ConfigTry));
    assert_eq!(
        State::Trial {
            target: target.clone()
        }
        .may_start(false),
        Err(Busy::Updating("2.0".into()))
    );
    assert_eq!(
        State::Report {
            outcome: target.committed()
        }
        .may_start(false),
        Err(Busy::Unreported)
    );
    assert_eq!(State::Idle.may_start(false), Ok(()));
}

#[test]
fn the_kept_state_reads_back_as_written() {
    let s = State::Writing {
        target: Target {
            version: "2.0".into(),
            from: "1.0".into(),
            security_version: 3,
        },
        progress: Progress::new(&manifest("2.0")),
    };
    let text = serde_json::to_string(&s).expect("json");
    assert_eq!(serde_json::from_str::<State>(&text).expect("back"), s);
}

fn cut() -> impl Strategy<Value = Cut> {
    prop_oneof![
        6 => Just(Cut::None),
        1 => Just(Cut::Before),
        1 => Just(Cut::After),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Power cuts anywhere: the box boots only whole slots (checked at every
    /// boot), each offer is reported once with what really happened, and
    /// the box ends on a version it can boot, idle.
    #[test]
    fn power_cuts_at_any_step_never_boot_a_partial_slot_or_lose_a_report(
        cuts in proptest::collection::vec(cut(), 0..120),
        broken in any::<bool>(),
    ) {
        let mut b = Box::new(if broken { &["3.0"] } else { &[] });
        b.run(vec!["2.0", "3.0"], &mut cuts.into_iter());
        prop_assert_eq!(&b.kept, &State::Idle);
        // At least once: a cut after the hub has a report and before that
        // is kept sends it again (the hub keeps one per box and version).
        b.reports.dedup();
        prop_assert_eq!(b.reports.len(), 2, "one report per offer: {:?}", b.reports);
        // The last outcome is on the ESP (an earlier one's entries may be
        // gone: the next update clears the slot they were on).
        if let Some(o) = b.reports.last() {
            match o {
                Outcome::Committed { version, .. } => {
                    let e = b.entries.iter().find(|(e, _)| &e.version == version);
                    prop_assert!(e.is_some_and(|(e, _)| e.left.is_none()), "{version} blessed");
                }
                Outcome::RolledBack { version, running } => {
                    let e = b.entries.iter().find(|(e, _)| &e.version == version);
                    prop_assert!(e.is_some_and(|(e, _)| e.is_bad()), "{version} out of tries");
                    prop_assert_ne!(version, running);
                }
            }
        }
        // What the box runs is what the last report says it runs.
        let last = match b.reports.last() {
            Some(Outcome::Committed { version, .. }) => version.clone(),
            Some(Outcome::RolledBack { running, .. }) => running.clone(),
            None => unreachable!(),
        };
        prop_assert_eq!(&b.version, &last);
        if broken {
            // A broken 3.0 is never tried more often than its tries.
            prop_assert!(
                b.boots.iter().filter(|v| *v == "3.0").count() <= TRIES as usize,
                "boots {:?}",
                b.boots
            );
            let three_committed = b
                .reports
                .iter()
                .any(|o| matches!(o, Outcome::Committed { version, .. } if version == "3.0"));
            prop_assert!(!three_committed);
        }
    }
}
