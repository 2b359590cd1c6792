//! A config pushed by the hub, on the edge: kept in `STATE_DIR/managed/`
//! (`config.toml` in force, `last-good.toml`, `state.json`), checked like a
//! local file, applied in try mode and confirmed once a hub tunnel comes back,
//! or reverted to the last good one ([`Applier`]). On start the daemon prefers
//! it to the `--config` file (the bootstrap), as long as it checks and keeps
//! the node id and state directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gateway_core::config::{Config, Role};
use gateway_core::fleet::{ConfigOutcome, Message};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::edge::EdgeFleet;
use crate::tunnel::pki::{self, PkiError};

#[derive(Debug, Default, Serialize, Deserialize)]
struct ManagedState {
    version: u64,
    last_good: u64,
    /// Set while a just-applied version waits for a hub connection.
    trying: bool,
}

fn managed_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("managed")
}

/// The managed config on disk, if any: (version, text, trying).
pub fn load_managed(state_dir: &Path) -> Option<(u64, String, bool)> {
    let dir = managed_dir(state_dir);
    let state: ManagedState =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).ok()?).ok()?;
    let text = std::fs::read_to_string(dir.join("config.toml")).ok()?;
    Some((state.version, text, state.trying))
}

fn last_good(state_dir: &Path) -> Option<(u64, String)> {
    let dir = managed_dir(state_dir);
    let state: ManagedState =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).ok()?).ok()?;
    let text = std::fs::read_to_string(dir.join("last-good.toml")).ok()?;
    Some((state.last_good, text))
}

fn save_managed(
    state_dir: &Path,
    (version, text): (u64, &str),
    (good_version, good_text): (u64, &str),
    trying: bool,
) -> Result<(), PkiError> {
    let dir = managed_dir(state_dir);
    std::fs::create_dir_all(&dir).map_err(|source| PkiError::Io {
        path: dir.clone(),
        source,
    })?;
    pki::write_replace(&dir.join("last-good.toml"), good_text, 0o600)?;
    pki::write_replace(&dir.join("config.toml"), text, 0o600)?;
    let state = ManagedState {
        version,
        last_good: good_version,
        trying,
    };
    pki::write_replace(
        &dir.join("state.json"),
        &serde_json::to_string(&state).unwrap_or_default(),
        0o600,
    )
}

/// Keeps a result for the hub on disk (`STATE_DIR/managed/report.json`), so
/// a revert or a restart's outcome survives the process: the next control
/// session sends it first.
pub fn save_report(state_dir: &Path, m: &Message) {
    let dir = managed_dir(state_dir);
    let saved = std::fs::create_dir_all(&dir)
        .map_err(|source| PkiError::Io {
            path: dir.clone(),
            source,
        })
        .and_then(|()| {
            pki::write_replace(
                &dir.join("report.json"),
                &serde_json::to_string(m).unwrap_or_default(),
                0o600,
            )
        });
    if let Err(e) = saved {
        error!(%e, "Cannot keep the config result for the hub on disk");
    }
}

/// The result kept by [`save_report`], if any (at most 1 MiB is read).
pub fn saved_report(state_dir: &Path) -> Option<Message> {
    use std::io::Read as _;
    let f = std::fs::File::open(managed_dir(state_dir).join("report.json")).ok()?;
    let mut text = String::new();
    f.take(1 << 20).read_to_string(&mut text).ok()?;
    match serde_json::from_str(&text) {
        Ok(m @ Message::ConfigResult { .. }) => Some(m),
        _ => None,
    }
}

/// The kept result has been sent.
pub fn forget_report(state_dir: &Path) {
    let _ = std::fs::remove_file(managed_dir(state_dir).join("report.json"));
}

/// Checks a config text the way `gatewayd check` does; the errors rendered
/// with their line and column under `name`.
pub fn check_text(text: &str, name: &str) -> Result<Config, Vec<String>> {
    let checked = gateway_core::check::load(text, crate::node::clock::today_local());
    match checked.config {
        Some(c) => Ok(c),
        None => Err(checked
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .map(|d| d.render(name))
            .collect()),
    }
}

/// A node started in a try window could not start with the tried version:
/// the last good one is put back on disk, with the revert reported, for the
/// next start (under systemd, at once). Returns whether it was put back.
pub fn revert_on_disk(state_dir: &Path, why: &str) -> bool {
    let Some((tried, _, true)) = load_managed(state_dir) else {
        return false;
    };
    let Some((good, text)) = last_good(state_dir) else {
        return false;
    };
    if save_managed(state_dir, (good, &text), (good, &text), false).is_err() {
        return false;
    }
    save_report(
        state_dir,
        &Message::ConfigResult {
            offered: tried,
            applied: good,
            outcome: ConfigOutcome::Reverted {
                tried,
                reason: format!("the box could not start with version {tried}: {why}"),
            },
        },
    );
    error!(
        tried,
        back_to = good,
        "The tried config did not start; the last good one runs at the next start"
    );
    true
}

/// The main loop's half of config pushes: apply, watch the try window, revert.
pub struct Applier {
    /// Until when a just-applied version may wait for a hub; the version.
    trying: Option<(Instant, u64)>,
    window: Duration,
    /// A version (pushed, or the last good one a revert goes back to) was
    /// stored to be run by restarting: what needs it.
    restart: Option<&'static str>,
}

impl Applier {
    /// An applier; `resume_trying` when the node started in a try window.
    pub fn new(window: Duration, resume_trying: Option<u64>) -> Self {
        Applier {
            trying: resume_trying.map(|v| (Instant::now() + window, v)),
            window,
            restart: None,
        }
    }

    /// What a stored version needs a restart for, if the node is to restart
    /// now to run it (under systemd: exit with [`crate::os::exit::RESTART`]).
    pub fn restart(&self) -> Option<&'static str> {
        self.restart
    }

    /// When the try window ends, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.trying.map(|t| t.0)
    }

    /// Applies an offered config with `reload`; returns the result to send.
    pub fn apply(
        &mut self,
        fleet: &EdgeFleet,
        current: &Config,
        version: u64,
        text: &str,
        reload: impl FnOnce(Config) -> Result<(), String>,
    ) -> Message {
        let (applied, applied_text) = fleet.applied();
        let refuse = |errors: Vec<String>| {
            warn!(
                version,
                ?errors,
                "Pushed config refused; the config in force stays"
            );
            Message::ConfigResult {
                offered: version,
                applied,
                outcome: ConfigOutcome::Refused { errors },
            }
        };
        // The same offer again (a box connected to two hubs hears a push
        // from each): it runs it already.
        if version == applied && text == applied_text {
            return Message::ConfigResult {
                offered: version,
                applied,
                outcome: ConfigOutcome::Applied,
            };
        }
        if version <= applied {
            return refuse(vec![format!(
                "version {version} is not newer than version {applied} in force"
            )]);
        }
        let config = match check_text(text, &format!("pushed config v{version}")) {
            Ok(c) => c,
            Err(errors) => return refuse(errors),
        };
        if config.node.id != current.node.id {
            return refuse(vec![format!(
                "node.id is {} but this box is {}",
                config.node.id, current.node.id
            )]);
        }
        if config.node.state_dir != current.node.state_dir {
            return refuse(vec![
                "node.state_dir cannot change by a push (the managed config lives there)".into(),
            ]);
        }
        let window = match &config.role {
            Role::Edge(e) => Some(e.uplink.config_try),
            Role::Hub(_) => None,
        };
        if let Err(e) = save_managed(
            &current.node.state_dir,
            (version, text),
            (applied, &applied_text),
            true,
        ) {
            return refuse(vec![format!("cannot store it: {e}")]);
        }
        if let Some(what) = gateway_core::config::restart::restart_needed(current, &config) {
            // Stored on trial to run at the next start: the hub offers such
            // a version only when its push said --restart.
            let result = Message::ConfigResult {
                offered: version,
                applied: version,
                outcome: ConfigOutcome::Applied,
            };
            save_report(&current.node.state_dir, &result);
            self.restart = Some(what);
            warn!(
                version,
                needs = what,
                "Pushed config changes {what}: restarting to apply it (it is tried as any push)"
            );
            return result;
        }
        // What the box runs is said before the reload: an uplink change opens
        // new tunnels at once, and their sessions report it at their start.
        fleet.set_applied(version, text.to_owned());
        if !fleet.set_trying(true) {
            fleet.set_applied(applied, applied_text.clone());
            return refuse(vec![
                "this box cannot mark the try for its firmware updater ([update] handoff is not writable): it would not be safe from a reboot; fix the handoff directory".into(),
            ]);
        }
        if let Err(e) = reload(config) {
            // Put the files and the state back as they were.
            fleet.set_applied(applied, applied_text.clone());
            fleet.set_trying(self.trying.is_some());
            let _ = save_managed(
                &current.node.state_dir,
                (applied, &applied_text),
                (applied, &applied_text),
                false,
            );
            return refuse(vec![e]);
        }
        // The new config's own try window applies to it.
        if let Some(w) = window {
            self.window = w;
        }
        self.trying = Some((Instant::now() + self.window, version));
        info!(
            version,
            try_s = self.window.as_secs(),
            "Pushed config applied; it is kept once a hub is reachable with it"
        );
        Message::ConfigResult {
            offered: version,
            applied: version,
            outcome: ConfigOutcome::Applied,
        }
    }

    /// A hub is reachable: the version being tried is good.
    pub fn confirm(&mut self, fleet: &EdgeFleet, state_dir: &Path) {
        if let Some((_, v)) = self.trying.take() {
            let (version, text) = fleet.applied();
            if version == v {
                fleet.set_trying(false);
                let _ = save_managed(state_dir, (version, &text), (version, &text), false);
                info!(
                    version,
                    "Pushed config confirmed: a hub is reachable with it"
                );
            }
        }
    }

    /// The try window ended without a hub: go back to the last good config.
    pub fn revert(
        &mut self,
        fleet: &EdgeFleet,
        current: &Config,
        reload: impl FnOnce(Config) -> Result<(), String>,
    ) {
        let state_dir = current.node.state_dir.as_path();
        let Some((_, tried)) = self.trying.take() else {
            return;
        };
        fleet.set_trying(false);
        let Some((good, text)) = last_good(state_dir) else {
            error!(tried, "No last good config to revert to");
            return;
        };
        let reason = format!(
            "no hub was reachable within {} s of applying version {tried}",
            self.window.as_secs()
        );
        error!(
            tried,
            back_to = good,
            "{reason}: reverting to the last good config"
        );
        let config = match check_text(&text, "last good config") {
            Ok(c) => c,
            Err(e) => {
                error!(errors = %e.join("; "), "Reverting failed: the last good config does not check; the tried config stays in force");
                return;
            }
        };
        // Said before the reload: the tunnels it opens report at their start
        // what the box runs, and the revert goes first.
        let report = Message::ConfigResult {
            offered: tried,
            applied: good,
            outcome: ConfigOutcome::Reverted { tried, reason },
        };
        if let Some(what) = gateway_core::config::restart::restart_needed(current, &config) {
            // The way back needs a restart too: the next start runs it.
            if save_managed(state_dir, (good, &text), (good, &text), false).is_ok() {
                save_report(state_dir, &report);
                self.restart = Some(what);
                error!(
                    back_to = good,
                    needs = what,
                    "Restarting to run the last good config"
                );
            } else {
                error!(
                    "Reverting failed: cannot store the last good config; the tried config stays in force"
                );
            }
            return;
        }
        let tried_state = fleet.applied();
        fleet.set_applied(good, text.clone());
        let before = fleet.replace_report(Some(report.clone()));
        match reload(config) {
            Ok(()) => {
                let _ = save_managed(state_dir, (good, &text), (good, &text), false);
                save_report(state_dir, &report);
            }
            Err(e) => {
                fleet.set_applied(tried_state.0, tried_state.1);
                fleet.replace_report(before);
                error!(%e, "Reverting failed; the tried config stays in force");
            }
        }
    }
}
