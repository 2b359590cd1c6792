//! Rollouts of a config template in waves, the pure part: the waves' sizes,
//! the failure limit, what each device's reports mean for the rollout, and
//! what the hub should do next. The hub's controller (`fleet::rollout` in the
//! daemon) stores a [`Rollout`] in the registry, reads the devices' reports
//! and acts on [`decide`].
//!
//! - Waves are cumulative shares of the devices (`1%,10%,50%,100%`) or counts
//!   (`5,50,100%`), rounded up; every wave holds at least `min_wave` devices
//!   more than the one before (the last takes what is left), and a wave that
//!   would add nobody is dropped. The last must be `100%`.
//! - A device of a started wave is *applied* once it reported applying its
//!   version and then sent a heartbeat running it; *failed* when it refused
//!   it (or it could not be rendered or checked for it), *reverted* when its
//!   try window ran out without a hub, *silent* when it has done neither
//!   by the end of the soak (at least [`MIN_REPORT_MS`] after the offer), and
//!   *superseded* when another version was pushed to it since.
//! - A wave closes when none of its devices is pending and its soak has
//!   passed; the next one is then offered. Failures (failed, reverted, silent)
//!   are counted over every started wave; over the limit, the rollout pauses
//!   by itself and says why. Resuming counts only failures after it.

use serde::{Deserialize, Serialize};

use crate::firmware::report::FirmwareStatus;
use crate::firmware::update::Outcome;

/// A device that has not reported this long after its offer (or the soak,
/// if longer) is silent.
pub const MIN_REPORT_MS: u64 = 60_000;
/// At most this many waves.
pub const MAX_WAVES: usize = 20;
/// The longest waves or failure-limit text read.
const MAX_SPEC: usize = 200;

/// One step of `--waves`: a share in basis points (1% = 100) or a count, of
/// the devices reached by the end of that wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaveStep {
    /// `N%` (up to two decimals): basis points.
    Share(u32),
    /// `N` devices.
    Count(usize),
}

/// Parses a share `N%` (0 < N <= 100, at most two decimals) into basis points.
fn parse_share(s: &str) -> Option<u32> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty()
        || int.len() > 3
        || frac.len() > 2
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let i: u32 = int.parse().ok()?;
    let f: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<2}").parse().ok()?
    };
    let bp = i * 100 + f;
    (1..=10_000).contains(&bp).then_some(bp)
}

/// Parses `--waves`: comma-separated shares or counts, growing, the last
/// `100%`.
///
/// # Errors
/// What is wrong, with the item.
pub fn parse_waves(s: &str) -> Result<Vec<WaveStep>, String> {
    if s.len() > MAX_SPEC {
        return Err(format!("--waves: longer than {MAX_SPEC} characters"));
    }
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim) {
        let step = if let Some(p) = item.strip_suffix('%') {
            WaveStep::Share(parse_share(p).ok_or_else(|| {
                format!("--waves: {item:?} is not a share (a number from 0.01% to 100%)")
            })?)
        } else {
            match item.parse::<usize>() {
                Ok(n) if n > 0 && item.bytes().all(|b| b.is_ascii_digit()) => WaveStep::Count(n),
                _ => {
                    return Err(format!(
                        "--waves: {item:?} is neither a share (10%) nor a count of devices (5)"
                    ));
                }
            }
        };
        if let Some(prev) = out.last() {
            let grows = match (prev, &step) {
                (WaveStep::Share(a), WaveStep::Share(b)) => b > a,
                (WaveStep::Count(a), WaveStep::Count(b)) => b > a,
                _ => true,
            };
            if !grows {
                return Err(format!(
                    "--waves: {item:?} does not grow; each wave says how many devices have it by its end (1%,10%,50%,100%)"
                ));
            }
        }
        out.push(step);
    }
    if out.len() > MAX_WAVES {
        return Err(format!("--waves: more than {MAX_WAVES} waves"));
    }
    if out.last() != Some(&WaveStep::Share(10_000)) {
        return Err("--waves: the last wave must be 100% (every selected device)".into());
    }
    Ok(out)
}

/// The waves' cumulative ends over `total` devices: wave `k` offers devices
/// `ends[k-1]..ends[k]`. Every wave adds at least `min_wave` (at least one)
/// devices, the last takes the rest, empty waves are dropped.
pub fn plan(total: usize, steps: &[WaveStep], min_wave: usize) -> Vec<usize> {
    let min_wave = min_wave.max(1);
    let mut ends: Vec<usize> = Vec::new();
    for step in steps {
        let target = match *step {
            WaveStep::Share(bp) => (total * bp as usize).div_ceil(10_000),
            WaveStep::Count(n) => n,
        };
        let prev = ends.last().copied().unwrap_or(0);
        let end = target.max(prev.saturating_add(min_wave)).min(total);
        if end > prev {
            ends.push(end);
        }
    }
    if total > 0 && ends.last() != Some(&total) {
        ends.push(total);
    }
    ends
}

/// `--max-failures`: a share of the rollout's devices, or a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureLimit {
    /// Basis points of the devices (rounded down).
    Share(u32),
    /// Devices.
    Count(usize),
}

impl FailureLimit {
    /// Parses `2%` or `3` (`0`: the first failure pauses).
    ///
    /// # Errors
    /// What is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.len() > MAX_SPEC {
            return Err(format!("--max-failures: longer than {MAX_SPEC} characters"));
        }
        if let Some(p) = s.strip_suffix('%') {
            if p == "0" {
                return Ok(FailureLimit::Count(0));
            }
            return parse_share(p).map(FailureLimit::Share).ok_or_else(|| {
                format!("--max-failures: {s:?} is not a share (0% to 100%, 2% for instance)")
            });
        }
        match s.parse::<usize>() {
            Ok(n) if s.bytes().all(|b| b.is_ascii_digit()) => Ok(FailureLimit::Count(n)),
            _ => Err(format!(
                "--max-failures: {s:?} is neither a share (2%) nor a count of devices (3)"
            )),
        }
    }

    /// How many of `total` devices may fail before the rollout pauses.
    pub fn allowed(self, total: usize) -> usize {
        match self {
            FailureLimit::Share(bp) => total * bp as usize / 10_000,
            FailureLimit::Count(n) => n,
        }
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Offering waves.
    Running,
    /// Stopped by an operator or by too many failures: no new wave starts.
    Paused,
    /// Every wave closed.
    Done,
    /// Stopped for good; devices keep what they have.
    Aborted,
    /// The devices are being offered their previous versions.
    RollingBack,
    /// Rolled back.
    RolledBack,
}

impl State {
    /// Its name, as the API shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Done => "done",
            State::Aborted => "aborted",
            State::RollingBack => "rolling-back",
            State::RolledBack => "rolled-back",
        }
    }

    /// Whether its devices belong to it (no other rollout may take them).
    pub fn holds_devices(self) -> bool {
        matches!(self, State::Running | State::Paused | State::RollingBack)
    }
}

/// One device of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its id.
    pub device: String,
    /// Its wave (0-based).
    pub wave: usize,
    /// The version pushed to it by this rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed: Option<u64>,
    /// When it was offered that version (Unix ms): its report is due from
    /// then (a large wave is offered over some seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offered_ms: Option<i64>,
    /// The version it had before (the one a rollback offers again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<u64>,
    /// Its config already equalled the rendered one: nothing was pushed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
    /// Why nothing could be pushed to it (rendering or checking failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The version a rollback pushed to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<u64>,
    /// Why a rollback left it as it is (a newer push, no earlier version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_error: Option<String>,
}

impl Member {
    /// A rollback has yet to offer it its previous version.
    pub fn rollback_due(&self) -> bool {
        self.pushed.is_some() && self.rollback.is_none() && self.rollback_error.is_none()
    }
}

/// A rollout, as the registry stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Its id.
    pub id: String,
    /// The template and the version of it rolled out.
    pub template: String,
    /// That version.
    pub template_version: u64,
    /// The selector that chose the devices (as given, normalised).
    pub selector: String,
    /// `--waves` as given.
    pub waves_spec: String,
    /// The waves' cumulative ends ([`plan`]).
    pub waves: Vec<usize>,
    /// `--max-failures` as given, and the devices it allows.
    pub max_failures_spec: String,
    /// Failures allowed.
    pub max_failures: usize,
    /// `--soak`, milliseconds.
    pub soak_ms: u64,
    /// Who started it.
    pub by: String,
    /// That account's role (`system`, `security`): what the rollout's pushes
    /// may change.
    pub by_role: String,
    /// Started with `--restart`: its versions may change keys a box applies
    /// only by restarting itself.
    #[serde(default)]
    pub restart: bool,
    /// When (Unix ms).
    pub created_ms: i64,
    /// Where it is.
    pub state: State,
    /// Why it is where it is (a pause's cause, who aborted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When each started wave was offered (Unix ms); its length is the number
    /// of started waves.
    pub wave_started_ms: Vec<i64>,
    /// Failures already counted when it was last resumed.
    #[serde(default)]
    pub failure_base: usize,
    /// A hub offering a wave now, and since when (Unix ms): another hub takes
    /// the work over when that is old.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushing: Option<(String, i64)>,
    /// When the rollback was started (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_started_ms: Option<i64>,
    /// The devices, in wave order.
    pub devices: Vec<Member>,
    /// A rollout of a firmware version (then `template` is empty): what
    /// each device's firmware status says decides, not its config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<FirmwareRollout>,
}

/// What a firmware rollout installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareRollout {
    /// The version (in the hubs' firmware store).
    pub version: String,
    /// The boxes' trial time (`[update] trial`), milliseconds: a box not
    /// heard from for twice this since its offer is silent.
    pub trial_ms: u64,
}

/// What the hub knows of a device, for its status in a rollout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// The newest version pushed to it.
    pub desired: Option<u64>,
    /// The version it reported in force.
    pub applied: Option<u64>,
    /// Its last config result (the registry's JSON: `outcome`, `offered`,
    /// `tried`, `errors`, `reason`).
    pub result: Option<String>,
    /// The last heartbeat (Unix ms) and the config version it reported.
    pub heartbeat: Option<(i64, u64)>,
    /// When the result was recorded (Unix ms).
    pub result_ms: Option<i64>,
    /// The last heartbeat said its config is on trial (not yet proven to
    /// reach a hub): not applied yet.
    pub trying: bool,
    /// The firmware status of its last heartbeat.
    pub firmware: Option<FirmwareStatus>,
}

/// A device's status in a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceStatus {
    /// Its wave has not started.
    Waiting,
    /// Offered, no verdict yet.
    Pending,
    /// Running its version, and heard from since.
    Applied,
    /// Refused, or nothing could be made for it: why.
    Failed(String),
    /// Went back through try mode: why.
    Reverted(String),
    /// Not heard from by the end of the soak.
    Silent,
    /// Another version was pushed to it since.
    Superseded,
}

impl DeviceStatus {
    /// Its name, as the API shows it.
    pub fn as_str(&self) -> &'static str {
        match self {
            DeviceStatus::Waiting => "waiting",
            DeviceStatus::Pending => "pending",
            DeviceStatus::Applied => "applied",
            DeviceStatus::Failed(_) => "failed",
            DeviceStatus::Reverted(_) => "reverted",
            DeviceStatus::Silent => "silent",
            DeviceStatus::Superseded => "superseded",
        }
    }

    /// Counts against `--max-failures`.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            DeviceStatus::Failed(_) | DeviceStatus::Reverted(_) | DeviceStatus::Silent
        )
    }

    /// No verdict yet.
    pub fn is_open(&self) -> bool {
        matches!(self, DeviceStatus::Waiting | DeviceStatus::Pending)
    }

    /// The detail (a failure's or a revert's cause).
    pub fn detail(&self) -> Option<&str> {
        match self {
            DeviceStatus::Failed(s) | DeviceStatus::Reverted(s) => Some(s),
            _ => None,
        }
    }
}

/// The status of a device offered `version` at `offered_ms`, from what the
/// hub observed, at `now_ms`, with a soak of `soak_ms`.
pub fn status_of(
    version: u64,
    offered_ms: i64,
    obs: &Observed,
    soak_ms: u64,
    now_ms: i64,
) -> DeviceStatus {
    if obs.desired.is_some_and(|d| d > version) {
        return DeviceStatus::Superseded;
    }
    let result: serde_json::Value = obs
        .result
        .as_deref()
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or(serde_json::Value::Null);
    match result["outcome"].as_str() {
        Some("reverted") if result["tried"].as_u64() == Some(version) => {
            return DeviceStatus::Reverted(
                result["reason"]
                    .as_str()
                    .unwrap_or("reverted by try mode")
                    .to_owned(),
            );
        }
        // A refusal of the version it runs already (a second hub's offer of
        // it) is not a failure.
        Some("refused")
            if result["offered"].as_u64() == Some(version)
                && obs.applied.is_none_or(|a| a < version) =>
        {
            let errors: Vec<&str> = result["errors"]
                .as_array()
                .map(|a| a.iter().filter_map(|e| e.as_str()).collect())
                .unwrap_or_default();
            return DeviceStatus::Failed(format!("refused: {}", errors.join("; ")));
        }
        _ => {}
    }
    let deadline = offered_ms
        .saturating_add(i64::try_from(soak_ms.max(MIN_REPORT_MS)).unwrap_or(i64::MAX / 4));
    let running = obs.applied.is_some_and(|a| a >= version);
    // Heard from after it took the version: a heartbeat that says so.
    let heard = !obs.trying
        && obs
            .heartbeat
            .is_some_and(|(at, v)| v >= version && obs.result_ms.is_none_or(|r| at >= r));
    if running && heard {
        DeviceStatus::Applied
    } else if now_ms > deadline {
        DeviceStatus::Silent
    } else {
        DeviceStatus::Pending
    }
}

/// The status of a device offered firmware `fw` at `offered_ms`, from its
/// last heartbeat, at `now_ms`: applied once it runs the version past its
/// trial, reverted when it rolled back from it, failed when its updater
/// refused it, silent when not heard from for twice the trial time.
pub fn firmware_status(
    fw: &FirmwareRollout,
    offered_ms: i64,
    obs: &Observed,
    now_ms: i64,
) -> DeviceStatus {
    let f = obs.firmware.as_ref();
    let heard = obs.heartbeat.map(|h| h.0).filter(|&at| at >= offered_ms);
    if let Some(f) = f {
        let v = fw.version.as_str();
        if let Some(Outcome::RolledBack { running, .. }) = f
            .outcome
            .as_ref()
            .filter(|o| matches!(o, Outcome::RolledBack { version, .. } if version == v))
        {
            let last = f
                .journal
                .last()
                .map(|l| format!("; last journal line: {l}"));
            return DeviceStatus::Reverted(format!(
                "{v} used up its boot tries; back on {running}{}",
                last.unwrap_or_default()
            ));
        }
        if f.failed.iter().any(|x| x == v) && f.running != v {
            return DeviceStatus::Reverted(format!(
                "{v} rolled back on this box; back on {} (the hub's audit has the failed boot's journal)",
                f.running
            ));
        }
        if let Some((ev, why)) = &f.error
            && ev == v
        {
            return DeviceStatus::Failed(format!("updater: {why}"));
        }
        if f.running == v && f.phase != "trial" && heard.is_some() {
            return DeviceStatus::Applied;
        }
    }
    let last = heard.unwrap_or(offered_ms).max(offered_ms);
    let allowed = i64::try_from(fw.trial_ms.saturating_mul(2)).unwrap_or(i64::MAX / 4);
    if now_ms.saturating_sub(last) > allowed {
        DeviceStatus::Silent
    } else {
        DeviceStatus::Pending
    }
}

/// The status of one member of `r`.
pub fn member_status(r: &Rollout, m: &Member, obs: &Observed, now_ms: i64) -> DeviceStatus {
    if let (None, Some(at)) = (&r.firmware, r.rollback_started_ms) {
        if let Some(v) = m.rollback {
            // Its offer time is the rollback's push once made.
            return status_of(
                v,
                m.offered_ms.unwrap_or(at).max(at),
                obs,
                r.soak_ms,
                now_ms,
            );
        }
        if let Some(e) = &m.rollback_error {
            return DeviceStatus::Failed(format!("not rolled back: {e}"));
        }
        if m.rollback_due() {
            return DeviceStatus::Pending;
        }
    }
    let Some(&offered) = r.wave_started_ms.get(m.wave) else {
        return DeviceStatus::Waiting;
    };
    if let Some(e) = &m.error {
        return DeviceStatus::Failed(e.clone());
    }
    if m.unchanged {
        return DeviceStatus::Applied;
    }
    let offered = m.offered_ms.unwrap_or(offered);
    match (&r.firmware, m.pushed) {
        (Some(fw), _) => firmware_status(fw, offered, obs, now_ms),
        (None, Some(v)) => status_of(v, offered, obs, r.soak_ms, now_ms),
        (None, None) => DeviceStatus::Pending,
    }
}

/// What the hub should do with a rollout now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing yet.
    Wait,
    /// Offer wave `k` (0-based).
    StartWave(usize),
    /// Too many failures: pause, saying why.
    Pause(String),
    /// Every wave closed.
    Finish,
    /// Every rolled-back device has a verdict.
    FinishRollback,
}

/// The next step of `r`, given each member's status (same order as
/// `r.devices`).
pub fn decide(r: &Rollout, statuses: &[DeviceStatus], now_ms: i64) -> Decision {
    match r.state {
        State::Running => {}
        State::RollingBack => {
            let open = r.pushing.is_some()
                || r.devices
                    .iter()
                    .zip(statuses)
                    .any(|(m, s)| m.rollback_due() || (m.rollback.is_some() && s.is_open()));
            return if open {
                Decision::Wait
            } else {
                Decision::FinishRollback
            };
        }
        _ => return Decision::Wait,
    }
    let failed: Vec<&str> = r
        .devices
        .iter()
        .zip(statuses)
        .filter(|(_, s)| s.is_failure())
        .map(|(m, _)| m.device.as_str())
        .collect();
    if failed.len() > r.failure_base.saturating_add(r.max_failures) {
        let shown: Vec<&str> = failed.iter().take(5).copied().collect();
        let more = failed.len() - shown.len();
        return Decision::Pause(format!(
            "{} device(s) failed ({}{}), more than --max-failures {} allows ({} of {}{})",
            failed.len(),
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            },
            r.max_failures_spec,
            r.max_failures,
            r.devices.len(),
            if r.failure_base > 0 {
                format!(", after the {} counted when resumed", r.failure_base)
            } else {
                String::new()
            },
        ));
    }
    let Some(k) = r.wave_started_ms.len().checked_sub(1) else {
        return Decision::StartWave(0);
    };
    if r.pushing.is_some() {
        return Decision::Wait;
    }
    let open = r
        .devices
        .iter()
        .zip(statuses)
        .any(|(m, s)| m.wave == k && s.is_open());
    let soaked = now_ms
        >= r.wave_started_ms[k].saturating_add(i64::try_from(r.soak_ms).unwrap_or(i64::MAX / 4));
    if open || !soaked {
        Decision::Wait
    } else if k + 1 < r.waves.len() {
        Decision::StartWave(k + 1)
    } else {
        Decision::Finish
    }
}

/// The failures among `statuses`.
pub fn failures(statuses: &[DeviceStatus]) -> usize {
    statuses.iter().filter(|s| s.is_failure()).count()
}

/// Members `devices` (in order) split into waves by `ends`.
pub fn members(devices: Vec<String>, ends: &[usize]) -> Vec<Member> {
    devices
        .into_iter()
        .enumerate()
        .map(|(i, device)| Member {
            device,
            wave: ends.iter().position(|&e| i < e).unwrap_or(ends.len()),
            pushed: None,
            offered_ms: None,
            previous: None,
            unchanged: false,
            error: None,
            rollback: None,
            rollback_error: None,
        })
        .collect()
}

/// Checks a rollout id: `r-` and up to 40 lower-case letters, digits and `-`.
pub fn valid_id(id: &str) -> bool {
    id.len() <= 42
        && id.starts_with("r-")
        && id[2..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests;
