//! The updater's state machine: what it does next, from what it kept on the
//! state disk and what it sees when it starts (the version running, the
//! boot entries on the ESP).
//!
//! The shell performs one [`Action`] at a time and persists the state
//! [`State::apply`] returns before it starts the next, so a power cut or a
//! reboot at any point leaves the last persisted state and an action that
//! may or may not have happened. Every action is therefore safe to do twice,
//! and [`State::start`] reconciles the kept state with what booted:
//!
//! - the inactive slot's old boot entries are removed before its first byte
//!   is written, and the new entry is written after its last chunk is
//!   checked, so no entry ever boots a slot that is being written;
//! - an entry already on the ESP is never written again (rewriting
//!   `gw-V+3.conf` over a renamed `gw-V+1-2.conf` would give back the tries
//!   power cuts used up, and a box could loop);
//! - whatever booted decides: the new version with its entry blessed is
//!   committed, the old version with the new entry out of tries is a
//!   rollback, and either is reported until the hub acknowledges it.

use serde::{Deserialize, Serialize};

use super::boot::Entry;
use super::fetch::Progress;

/// The version being installed and the one it replaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The version being installed (into the inactive slot).
    pub version: String,
    /// The version that ran when it was offered (the active slot).
    pub from: String,
    /// Its manifest's `security_version`, recorded once it is committed (a
    /// downgrade below it is refused from then on).
    pub security_version: u64,
}

/// How an update ended, for the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// The new version passed its health gate and is the default.
    Committed {
        /// The version now running.
        version: String,
        /// Its `security_version`, now the box's.
        security_version: u64,
    },
    /// The new version used up its tries; the box is back on `running`.
    RolledBack {
        /// The version that failed.
        version: String,
        /// The version running again.
        running: String,
    },
}

/// What the updater keeps on the state disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum State {
    /// Nothing under way.
    Idle,
    /// Removing the inactive slot's old boot entries.
    Clearing {
        /// The update.
        target: Target,
        /// A fresh bitmap for its chunks.
        progress: Progress,
    },
    /// Filling the inactive slot.
    Writing {
        /// The update.
        target: Target,
        /// The chunks in the slot, checked and synced.
        progress: Progress,
    },
    /// Every chunk is in; the boot entry is next.
    Written {
        /// The update.
        target: Target,
    },
    /// The boot entry is written: reboot in the maintenance window.
    Staged {
        /// The update.
        target: Target,
    },
    /// Running the new version on trial: the health gate decides.
    Trial {
        /// The update.
        target: Target,
    },
    /// Ended; reported until the hub acknowledges.
    Report {
        /// How.
        outcome: Outcome,
    },
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing: wait for an offer.
    Wait,
    /// Remove every `gw-*` boot entry but the running version's.
    RemoveEntries {
        /// The running version, whose entry stays.
        keep: String,
    },
    /// Write the chunks still missing (fetched or copied, each checked and
    /// synced before it is marked).
    FillSlot,
    /// Write the new version's entry, unless one for it is on the ESP.
    WriteEntry(Entry),
    /// Reboot once the maintenance window opens (or when told).
    RebootInWindow,
    /// Wait for the health gate (then [`Input::Blessed`]); reboot if it
    /// fails or times out.
    AwaitGate,
    /// Tell the hub.
    Report(Outcome),
}

/// What happened since the last action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The hub offered a version whose manifest checked (signature and
    /// [`super::Manifest::may_install`]); `running` is what runs now.
    Offer {
        /// The version offered.
        version: String,
        /// The running version.
        running: String,
        /// Its manifest's `security_version`.
        security_version: u64,
        /// A fresh bitmap for its chunks.
        progress: Progress,
    },
    /// The old entries are gone.
    EntriesRemoved,
    /// Chunk `i` is in the slot, checked and synced.
    ChunkWritten(usize),
    /// The inactive slot was read back and checked against the offer's
    /// manifest: it holds the chunks `Progress` marks (a kept bitmap is
    /// never trusted over the slot itself). Back to writing the rest.
    Checked(Progress),
    /// The boot entry is on the ESP.
    EntryWritten,
    /// The new version's entry is blessed (its health gate passed and
    /// `systemd-bless-boot` ran).
    Blessed,
    /// The hub has the report.
    Reported,
    /// The offer was withdrawn (its rollout aborted) before the box booted
    /// it, and the version's entry is off the ESP: nothing is under way.
    Withdrawn,
}

/// An offer the updater does not take now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    /// A configuration try is running: its rollback must not meet a reboot.
    #[error("a configuration try is running; offer the update again after it ends")]
    ConfigTry,
    /// Another version is staged or on trial.
    #[error("version {0} is staged or on trial; offer again once it is reported")]
    Updating(String),
    /// The last update's outcome is not reported yet.
    #[error("the last update's outcome is not reported yet")]
    Unreported,
}

impl State {
    /// The action to perform now.
    pub fn next(&self) -> Action {
        match self {
            State::Idle => Action::Wait,
            State::Clearing { target, .. } => Action::RemoveEntries {
                keep: target.from.clone(),
            },
            State::Writing { .. } => Action::FillSlot,
            State::Written { target } => Action::WriteEntry(Entry::new(&target.version)),
            State::Staged { .. } => Action::RebootInWindow,
            State::Trial { .. } => Action::AwaitGate,
            State::Report { outcome } => Action::Report(outcome.clone()),
        }
    }

    /// Whether an offer may start now (`config_trying`: a configuration try
    /// is running).
    ///
    /// # Errors
    /// As [`Busy`] says.
    pub fn may_start(&self, config_trying: bool) -> Result<(), Busy> {
        if config_trying {
            return Err(Busy::ConfigTry);
        }
        match self {
            State::Staged { target } | State::Trial { target } => {
                Err(Busy::Updating(target.version.clone()))
            }
            State::Report { .. } => Err(Busy::Unreported),
            _ => Ok(()),
        }
    }

    /// The state after `input`. An input that does not fit the state (a
    /// late chunk of an abandoned offer) leaves it as it is.
    #[must_use]
    pub fn apply(self, input: Input) -> State {
        match (self, input) {
            // The version being written offered again: go on where it is.
            (
                s @ (State::Clearing { .. } | State::Writing { .. } | State::Written { .. }),
                Input::Offer { version, .. },
            ) if s.target().is_some_and(|t| t.version == version) => s,
            // A new offer (another version starts afresh: its old entries
            // are cleared again before the slot is touched).
            (
                State::Idle
                | State::Clearing { .. }
                | State::Writing { .. }
                | State::Written { .. },
                Input::Offer {
                    version,
                    running,
                    security_version,
                    progress,
                },
            ) => State::Clearing {
                target: Target {
                    version,
                    from: running,
                    security_version,
                },
                progress,
            },
            (State::Clearing { target, progress }, Input::EntriesRemoved) => {
                State::Writing { target, progress }.settled()
            }
            (
                State::Writing {
                    target,
                    mut progress,
                },
                Input::ChunkWritten(i),
            ) => {
                progress.mark(i);
                State::Writing { target, progress }.settled()
            }
            (
                State::Writing { target, .. } | State::Written { target },
                Input::Checked(progress),
            ) if progress.version == target.version => {
                State::Writing { target, progress }.settled()
            }
            (State::Written { target }, Input::EntryWritten) => State::Staged { target },
            (State::Trial { target }, Input::Blessed) => State::Report {
                outcome: target.committed(),
            },
            (State::Report { .. }, Input::Reported) => State::Idle,
            (
                State::Clearing { .. }
                | State::Writing { .. }
                | State::Written { .. }
                | State::Staged { .. },
                Input::Withdrawn,
            ) => State::Idle,
            (s, _) => s,
        }
    }

    /// A slot with every chunk in is written.
    fn settled(self) -> State {
        match self {
            State::Writing { target, progress } if progress.complete() => State::Written { target },
            s => s,
        }
    }

    /// The update under way, if any.
    pub fn target(&self) -> Option<&Target> {
        match self {
            State::Clearing { target, .. }
            | State::Writing { target, .. }
            | State::Written { target }
            | State::Staged { target }
            | State::Trial { target } => Some(target),
            State::Idle | State::Report { .. } => None,
        }
    }

    /// Reconciles the kept state with what booted: `running` is the version
    /// running now, `entries` the boot entries on the ESP. Called at every
    /// start of the updater (each boot, each restart).
    #[must_use]
    pub fn start(self, running: &str, entries: &[Entry]) -> State {
        let entry = |v: &str| entries.iter().find(|e| e.version == v);
        match self {
            State::Written { target } if entry(&target.version).is_some() => {
                // The entry was written before a cut kept the state.
                State::Staged { target }.start(running, entries)
            }
            State::Staged { target } | State::Trial { target } => {
                match (running == target.version, entry(&target.version)) {
                    (true, Some(e)) if e.left.is_none() => State::Report {
                        outcome: target.committed(),
                    },
                    (true, _) => State::Trial { target },
                    (false, Some(e)) if !e.is_bad() => State::Staged { target },
                    (false, Some(_)) => State::Report {
                        outcome: Outcome::RolledBack {
                            version: target.version,
                            running: running.to_owned(),
                        },
                    },
                    // The entry is gone (the cut came while it was being
                    // written): write it again.
                    (false, None) => State::Written { target },
                }
            }
            s => s,
        }
    }
}

impl Target {
    fn committed(self) -> Outcome {
        Outcome::Committed {
            version: self.version,
            security_version: self.security_version,
        }
    }
}

#[cfg(test)]
mod tests;
