//! The updater's shell around `gateway_core::firmware::update`: it keeps the
//! state on the state disk, performs each action the state machine names,
//! and keeps the new state before the next one, so a power cut or a `kill
//! -9` at any point resumes where the disk says (the chunks marked are never
//! written again; the one being written is).

use std::path::{Path, PathBuf};

use gateway_core::firmware::boot::Entry;
use gateway_core::firmware::fetch::{Progress, Step};
use gateway_core::firmware::report::FirmwareStatus;
use gateway_core::firmware::update::{Action, Busy, Input, Outcome, State};
use gateway_core::firmware::{self, Installed, Manifest, PublicKey, Refused};
use serde::{Deserialize, Serialize};

use crate::esp::{Esp, Put, SlotName};
use crate::files::{self, FileError};
use crate::slot::{Slot, SlotError};
use crate::source::{BootFile, ChunkSource, Signed, SourceError};

/// The kept state's file in the state directory.
const KEPT: &str = "updater.json";
/// What the updater publishes for gatewayd (and the hub), beside it.
pub const STATUS: &str = "status.json";
/// The offer being installed, kept to check again after a restart.
const OFFER: &str = "offer.json";
const OFFER_SIG: &str = "offer.json.minisig";

/// The box, as the updater sees it.
#[derive(Debug, Clone)]
pub struct Device {
    /// The updater's own directory on the state disk.
    pub state_dir: PathBuf,
    /// The ESP's mount point.
    pub esp: PathBuf,
    /// The root slots' partitions, A and B.
    pub slots: [PathBuf; 2],
    /// The slot that booted.
    pub running: SlotName,
    /// The version that booted.
    pub version: String,
    /// The hardware model.
    pub hardware: String,
    /// The keys bundles are signed with (current and next).
    pub trusted: Vec<PublicKey>,
    /// The running image's own `security_version` (from its read-only
    /// root): the floor below which nothing installs, whatever the state
    /// disk says (a state file removed or replaced does not lower it).
    pub image_security_version: u64,
}

/// What the updater keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    /// Where the update is.
    pub state: State,
    /// The highest `security_version` this box has committed.
    pub security_version: u64,
    /// Versions that rolled back on this box, newest last (at most
    /// [`MAX_FAILED`]): not installed again unless asked to retry, so a
    /// bundle left on a stick or offered again cannot loop the box through
    /// its tries.
    #[serde(default)]
    pub failed: Vec<String>,
    /// The last offer refused (a bad signature, a downgrade, another
    /// hardware model): its version and why, for the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<(String, String)>,
    /// The rollout whose offer was refused: another rollout of the version
    /// is tried again (the refusal may have been one hub's bad answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_rollout: Option<String>,
    /// With a rollback report: the failed boot's last journal lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub journal: Vec<String>,
}

/// Rolled-back versions kept.
pub const MAX_FAILED: usize = 16;

/// Why the updater stopped.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The offer is not installed.
    #[error("offer refused: {0}")]
    Refused(#[from] Refused),
    /// The offer is not taken now.
    #[error("offer not taken now: {0}")]
    Busy(#[from] Busy),
    /// The offer is the version running.
    #[error("version {0} is running already")]
    Running(String),
    /// The offer does not sort above the version running: systemd-boot
    /// boots the highest version, so it would never boot (and a box told to
    /// reboot into it would loop).
    #[error(
        "version {0} is not newer than {1}, which runs: systemd-boot boots the highest version, so {0} would never boot; build the old code again under a version above {1}"
    )]
    NotNewer(String, String),
    /// The offer rolled back on this box before.
    #[error("version {0} rolled back on this box before: offer it with --retry to try it again")]
    FailedBefore(String),
    /// A file of the state disk or the ESP.
    #[error(transparent)]
    File(#[from] FileError),
    /// A slot.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// The kept state does not read.
    #[error(
        "{path}: {reason} (the updater does not guess: move it aside to start over; the next offer writes the slot again, and the running image's security_version still holds)"
    )]
    Kept {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A chunk or boot file could not be had; the update resumes later.
    #[error("fetching: {0}")]
    Source(#[from] SourceError),
    /// A chunk or boot file that does not match the signed manifest: it is
    /// not written.
    #[error("{what} does not match its signed hash: not written")]
    Corrupt {
        /// Which.
        what: String,
    },
    /// A state that needs the offer's manifest, and the kept one is gone.
    #[error("the offer's manifest is not kept any more: offer it again")]
    NoOffer,
    /// Whether a configuration try runs cannot be told.
    #[error("{path}: {reason}: not updating while it is unknown whether a configuration try runs")]
    ConfigState {
        /// gatewayd's managed state.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// What the updater waits for after [`Updater::run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waiting {
    /// An offer: nothing is under way.
    Offer,
    /// The maintenance window (or an order) to reboot into the new version.
    Reboot,
    /// The health gate of the new version on trial.
    Gate,
    /// The hub to acknowledge `Outcome`.
    Report(Outcome),
}

/// Progress of a long step, for the log and the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Chunk `chunk` is in the slot (copied from the running slot when
    /// `local`); `done` of `total`.
    Chunk {
        /// The chunk.
        chunk: usize,
        /// Copied, not fetched.
        local: bool,
        /// Chunks in the slot.
        done: usize,
        /// Chunks in all.
        total: usize,
    },
    /// The inactive slot's old entries are gone.
    Cleared,
    /// The slot was read back before its entry is written and `bad` chunks
    /// did not match: they are written again.
    Rechecked {
        /// Chunks that did not match.
        bad: usize,
    },
    /// The boot entry is written.
    Staged(String),
}

/// The updater of one box.
pub struct Updater {
    device: Device,
    esp: Esp,
    kept: Kept,
    _lock: files::Lock,
}

impl Updater {
    /// Opens the box's updater: reads the kept state and reconciles it with
    /// what booted (the version, the ESP's entries), and keeps the result.
    ///
    /// # Errors
    /// The state directory, the ESP, or a kept state that does not read.
    pub fn open(device: Device) -> Result<Self, UpdateError> {
        files::ensure_dir(&device.state_dir)?;
        files::real_dir(&device.state_dir)?;
        let lock = files::lock(&device.state_dir)?;
        let esp = Esp::open(&device.esp)?;
        let path = device.state_dir.join(KEPT);
        let kept = match files::read_limited(&path, 1 << 20)? {
            None => Kept {
                state: State::Idle,
                security_version: 0,
                failed: Vec::new(),
                refused: None,
                refused_rollout: None,
                journal: Vec::new(),
            },
            Some(b) => serde_json::from_slice(&b).map_err(|e| UpdateError::Kept {
                path: path.clone(),
                reason: e.to_string(),
            })?,
        };
        let mut u = Updater {
            device,
            esp,
            kept,
            _lock: lock,
        };
        let entries = u.esp.entries()?;
        u.kept.state = u.kept.state.clone().start(&u.device.version, &entries);
        u.keep()?;
        Ok(u)
    }

    /// The version running.
    pub fn running_version(&self) -> &str {
        &self.device.version
    }

    /// As [`Updater::open`], waiting up to `wait` for another run of the
    /// updater to let go of the state (the boot's `status` and a `follow`
    /// the path unit started may meet).
    ///
    /// # Errors
    /// As [`Updater::open`]; still locked after `wait`.
    pub fn open_waiting(device: Device, wait: std::time::Duration) -> Result<Self, UpdateError> {
        let start = std::time::Instant::now();
        loop {
            match Updater::open(device.clone()) {
                Err(UpdateError::File(FileError::Locked { .. })) if start.elapsed() < wait => {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                r => return r,
            }
        }
    }

    /// What is kept now.
    pub fn kept(&self) -> &Kept {
        &self.kept
    }

    /// The security version below which nothing installs: the highest
    /// committed here, or the running image's own if higher.
    pub fn floor(&self) -> u64 {
        self.kept
            .security_version
            .max(self.device.image_security_version)
    }

    /// The boot entry of the version running, if the ESP has one.
    ///
    /// # Errors
    /// When the ESP cannot be read.
    pub fn running_entry(&self) -> Result<Option<Entry>, UpdateError> {
        Ok(self
            .esp
            .entries()?
            .into_iter()
            .find(|e| e.version == self.device.version))
    }

    /// The slot an update writes.
    pub fn inactive(&self) -> SlotName {
        self.device.running.other()
    }

    fn keep(&mut self) -> Result<(), UpdateError> {
        if let State::Report {
            outcome: Outcome::Committed {
                security_version, ..
            },
        } = &self.kept.state
        {
            self.kept.security_version = self.kept.security_version.max(*security_version);
        }
        if let State::Report {
            outcome: Outcome::RolledBack { version, .. },
        } = &self.kept.state
            && !self.kept.failed.contains(version)
        {
            self.kept.failed.push(version.clone());
            let over = self.kept.failed.len().saturating_sub(MAX_FAILED);
            self.kept.failed.drain(..over);
        }
        let text = serde_json::to_vec(&self.kept).map_err(|e| UpdateError::Kept {
            path: self.device.state_dir.join(KEPT),
            reason: e.to_string(),
        })?;
        files::replace(&self.device.state_dir, KEPT, &text)?;
        self.publish()
    }

    /// What the box's firmware is, for gatewayd's heartbeats.
    ///
    /// # Errors
    /// When the ESP cannot be read.
    pub fn status(&self) -> Result<FirmwareStatus, UpdateError> {
        let running = self.device.version.clone();
        let standby = self
            .esp
            .entries()?
            .into_iter()
            .filter(|e| e.version != running && !e.is_bad())
            .filter(|e| {
                self.kept
                    .state
                    .target()
                    .is_none_or(|t| t.version != e.version)
            })
            .map(|e| e.version)
            .max_by(|a, b| firmware::version_numbers(a).cmp(&firmware::version_numbers(b)));
        let (phase, chunks) = match &self.kept.state {
            State::Idle => ("idle", None),
            State::Clearing { progress, .. } => ("clearing", Some(progress)),
            State::Writing { progress, .. } => ("writing", Some(progress)),
            State::Written { .. } => ("written", None),
            State::Staged { .. } => ("staged", None),
            State::Trial { .. } => ("trial", None),
            State::Report { .. } => ("report", None),
        };
        let outcome = match &self.kept.state {
            State::Report { outcome } => Some(outcome.clone()),
            _ => None,
        };
        let rolled_back = matches!(outcome, Some(Outcome::RolledBack { .. }));
        let mut s = FirmwareStatus {
            running,
            standby,
            phase: phase.to_owned(),
            target: self.kept.state.target().map(|t| t.version.clone()),
            chunks: chunks.map(|p| (p.done() as u64, p.total() as u64)),
            outcome,
            error: self.kept.refused.clone(),
            failed: self.kept.failed.clone(),
            journal: if rolled_back {
                self.kept.journal.clone()
            } else {
                Vec::new()
            },
            boot: crate::boot_id(),
        };
        s.bound();
        Ok(s)
    }

    /// Writes [`STATUS`], readable by gatewayd (0644, its directory 0755:
    /// versions and progress, nothing secret).
    fn publish(&self) -> Result<(), UpdateError> {
        use std::os::unix::fs::PermissionsExt as _;
        let status = self.status()?;
        let text = serde_json::to_vec(&status).unwrap_or_default();
        let dir = &self.device.state_dir;
        files::replace_public(dir, STATUS, &text)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(|e| {
            FileError::Io {
                path: dir.clone(),
                source: e,
            }
        })?;
        Ok(())
    }

    /// Drops the update of `version` if the box has not booted it yet: its
    /// entries off the ESP first, then the state (a cut between leaves a
    /// staged state without its entry, which writes nothing bootable: the
    /// next pass withdraws it again). Whether it dropped it.
    ///
    /// # Errors
    /// The ESP's or the disk's.
    pub fn withdraw(&mut self, version: &str) -> Result<bool, UpdateError> {
        let before_boot = matches!(
            self.kept.state,
            State::Clearing { .. }
                | State::Writing { .. }
                | State::Written { .. }
                | State::Staged { .. }
        );
        if !before_boot
            || self
                .kept
                .state
                .target()
                .is_none_or(|t| t.version != version)
        {
            return Ok(false);
        }
        self.esp.remove_except(&self.device.version)?;
        self.apply(Input::Withdrawn)?;
        Ok(true)
    }

    /// Records that rollout `rollout`'s offer of `version` was refused, and
    /// why.
    ///
    /// # Errors
    /// A disk error.
    pub fn refused(
        &mut self,
        (version, rollout): (&str, &str),
        why: &str,
    ) -> Result<(), UpdateError> {
        self.kept.refused = Some((version.to_owned(), why.to_owned()));
        self.kept.refused_rollout = Some(rollout.to_owned());
        self.keep()
    }

    /// Keeps the failed boot's journal lines with a rollback report (once).
    ///
    /// # Errors
    /// A disk error.
    pub fn keep_journal(&mut self, lines: Vec<String>) -> Result<(), UpdateError> {
        self.kept.journal = lines;
        self.keep()
    }

    fn apply(&mut self, input: Input) -> Result<(), UpdateError> {
        self.kept.state = self.kept.state.clone().apply(input);
        self.keep()
    }

    /// Takes an offer: checks its signature and whether this box may
    /// install it, keeps it, and starts (or, for the version being
    /// written, goes on). `config_trying`: a configuration try is running;
    /// `retry`: install a version that rolled back here before.
    ///
    /// # Errors
    /// A bad signature, a refusal, a busy updater, a disk error.
    pub fn offer(
        &mut self,
        signed: &Signed,
        config_trying: bool,
        retry: bool,
    ) -> Result<Manifest, UpdateError> {
        let m = self.check(signed)?;
        if self.kept.failed.contains(&m.version) {
            if !retry {
                return Err(UpdateError::FailedBefore(m.version));
            }
            self.kept.failed.retain(|v| *v != m.version);
        }
        self.kept.state.may_start(config_trying)?;
        let same = self
            .kept
            .state
            .target()
            .is_some_and(|t| t.version == m.version);
        // The kept offer is written again when it is for another version
        // or no longer reads (a removed offer file is no dead end).
        if !same || self.offered().is_err() {
            files::replace(&self.device.state_dir, OFFER, &signed.manifest)?;
            files::replace(
                &self.device.state_dir,
                OFFER_SIG,
                signed.signature.as_bytes(),
            )?;
        }
        self.apply(Input::Offer {
            version: m.version.clone(),
            running: self.device.version.clone(),
            security_version: m.security_version,
            progress: Progress::new(&m),
        })?;
        Ok(m)
    }

    /// Whether this box may install a bundle: its signature (a trusted
    /// key; never a clock), its hardware, no downgrade past the security
    /// version committed, not the version running.
    ///
    /// # Errors
    /// As [`UpdateError::Refused`] and [`UpdateError::Running`] say.
    pub fn check(&self, signed: &Signed) -> Result<Manifest, UpdateError> {
        let m = firmware::verify(&signed.manifest, &signed.signature, &self.device.trusted)?;
        m.may_install(&Installed {
            version: self.device.version.clone(),
            security_version: self.floor(),
            hardware: self.device.hardware.clone(),
        })?;
        if m.version == self.device.version {
            return Err(UpdateError::Running(m.version));
        }
        if firmware::version_numbers(&m.version) <= firmware::version_numbers(&self.device.version)
        {
            return Err(UpdateError::NotNewer(
                m.version,
                self.device.version.clone(),
            ));
        }
        Ok(m)
    }

    /// The kept offer's manifest, checked again.
    fn offered(&self) -> Result<Manifest, UpdateError> {
        let dir = &self.device.state_dir;
        let manifest = files::read_limited(&dir.join(OFFER), firmware::MAX_MANIFEST_BYTES as u64)?
            .ok_or(UpdateError::NoOffer)?;
        let sig = files::read_limited(&dir.join(OFFER_SIG), 4096)?.ok_or(UpdateError::NoOffer)?;
        let m = firmware::verify(
            &manifest,
            &String::from_utf8_lossy(&sig),
            &self.device.trusted,
        )?;
        match self.kept.state.target() {
            Some(t) if t.version == m.version => Ok(m),
            _ => Err(UpdateError::NoOffer),
        }
    }

    /// Performs actions until one needs the outside world.
    ///
    /// # Errors
    /// A source that fails (the update resumes from the disk), a corrupt
    /// chunk, a disk error.
    pub fn run(
        &mut self,
        source: &mut dyn ChunkSource,
        on: &mut dyn FnMut(&Event),
    ) -> Result<Waiting, UpdateError> {
        loop {
            match self.kept.state.next() {
                Action::Wait => return Ok(Waiting::Offer),
                Action::RebootInWindow => return Ok(Waiting::Reboot),
                Action::AwaitGate => return Ok(Waiting::Gate),
                Action::Report(o) => return Ok(Waiting::Report(o)),
                Action::RemoveEntries { keep } => {
                    self.esp.remove_except(&keep)?;
                    on(&Event::Cleared);
                    self.apply(Input::EntriesRemoved)?;
                }
                Action::FillSlot => self.fill(source, on)?,
                Action::WriteEntry(entry) => {
                    // The slot read back and checked whole before an entry
                    // can boot it: a kept bitmap is never trusted alone.
                    let m = self.offered()?;
                    let held = self.read_back(&m)?;
                    if !held.complete() {
                        on(&Event::Rechecked {
                            bad: m.chunk_count() - held.done(),
                        });
                        self.apply(Input::Checked(held))?;
                        continue;
                    }
                    self.write_entry(source, &m, &entry)?;
                    on(&Event::Staged(entry.version.clone()));
                    self.apply(Input::EntryWritten)?;
                }
            }
        }
    }

    fn fill(
        &mut self,
        source: &mut dyn ChunkSource,
        on: &mut dyn FnMut(&Event),
    ) -> Result<(), UpdateError> {
        let m = self.offered()?;
        let slot = Slot::open_write(&self.device.slots[self.inactive().index()], m.root_bytes)?;
        // What the running slot holds: the chunks the new image shares with
        // it are copied, not fetched (checked against the new manifest all
        // the same).
        let running = Slot::open_read(&self.device.slots[self.device.running.index()]).ok();
        let hashes = match &running {
            Some(r) => r.chunk_hashes(m.chunk_count())?,
            None => Vec::new(),
        };
        // A kept bitmap of another shape or version is not trusted: it
        // starts afresh (and one with every chunk settles at once).
        let State::Writing { progress, .. } = &self.kept.state else {
            return Ok(());
        };
        let resumed = Progress::resume(Some(progress.clone()), &m);
        if resumed != *progress || resumed.complete() {
            self.apply(Input::Checked(resumed))?;
        }
        let plan = match &self.kept.state {
            State::Writing { progress, .. } => progress.plan(&m, &hashes),
            _ => return Ok(()),
        };
        let total = m.chunk_count();
        for step in plan {
            let (chunk, local) = match step {
                Step::CopyLocal { chunk, from } => {
                    let len = m.chunk_len(chunk).unwrap_or(0);
                    let copied = running
                        .as_ref()
                        .and_then(|r| r.read_chunk(from, len).ok().flatten())
                        .filter(|b| m.chunk_ok(chunk, b));
                    (chunk, copied)
                }
                Step::Fetch(chunk) => (chunk, None),
            };
            let is_local = local.is_some();
            let bytes = match local {
                Some(b) => b,
                None => {
                    let b = source.chunk(chunk)?;
                    if !m.chunk_ok(chunk, &b) {
                        return Err(UpdateError::Corrupt {
                            what: format!("chunk {chunk} of {}", m.version),
                        });
                    }
                    b
                }
            };
            slot.write_chunk(chunk, &bytes)?;
            self.apply(Input::ChunkWritten(chunk))?;
            let done = match &self.kept.state {
                State::Writing { progress, .. } => progress.done(),
                _ => total,
            };
            on(&Event::Chunk {
                chunk,
                local: is_local,
                done,
                total,
            });
        }
        Ok(())
    }

    /// Reads the inactive slot back: the chunks that match `m`.
    fn read_back(&self, m: &Manifest) -> Result<Progress, UpdateError> {
        let slot = Slot::open_read(&self.device.slots[self.inactive().index()])?;
        let mut held = Progress::new(m);
        for i in 0..m.chunk_count() {
            let len = m.chunk_len(i).unwrap_or(0);
            if slot.read_chunk(i, len)?.is_some_and(|b| m.chunk_ok(i, &b)) {
                held.mark(i);
            }
        }
        Ok(held)
    }

    fn write_entry(
        &mut self,
        source: &mut dyn ChunkSource,
        m: &Manifest,
        entry: &Entry,
    ) -> Result<(), UpdateError> {
        // The kernel is checked (and put in place) before the initrd is
        // read; each is hashed as it streams to the ESP.
        for (file, want) in [
            (BootFile::Linux, &m.kernel_sha256),
            (BootFile::Initrd, &m.initrd_sha256),
        ] {
            if self.esp.boot_file_ok(&m.version, file, want) {
                continue;
            }
            let mut from = source.boot_file(file)?;
            let what = || format!("the {} of {}", file.name(), m.version);
            match self.esp.put_boot_file(&m.version, file, &mut from, want)? {
                Put::Written => {}
                Put::Mismatch | Put::TooLarge => {
                    return Err(UpdateError::Corrupt { what: what() });
                }
                Put::Unreadable(e) => {
                    return Err(UpdateError::Source(SourceError(format!("{}: {e}", what()))));
                }
            }
        }
        self.esp
            .write_entry_once(entry, self.inactive(), &self.device.hardware)?;
        Ok(())
    }

    /// The hub has the report.
    ///
    /// # Errors
    /// A disk error.
    pub fn reported(&mut self) -> Result<(), UpdateError> {
        self.kept.journal.clear();
        self.apply(Input::Reported)
    }
}

/// Whether gatewayd's configuration try is running (its managed state in
/// `gatewayd_state`, read-only to the updater). No file: none runs. A file
/// that cannot be read or parsed fails closed: the updater does not start.
///
/// # Errors
/// [`UpdateError::ConfigState`].
pub fn config_trying(gatewayd_state: &Path) -> Result<bool, UpdateError> {
    #[derive(Deserialize)]
    struct Managed {
        #[serde(default)]
        trying: bool,
    }
    let path = gatewayd_state.join("managed/state.json");
    let fail = |reason: String| UpdateError::ConfigState {
        path: path.clone(),
        reason,
    };
    match files::read_limited(&path, 64 << 10) {
        Ok(None) => Ok(false),
        Ok(Some(b)) => serde_json::from_slice::<Managed>(&b)
            .map(|m| m.trying)
            .map_err(|e| fail(e.to_string())),
        Err(e) => Err(fail(e.to_string())),
    }
}
