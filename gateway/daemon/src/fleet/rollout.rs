//! Rollouts of config templates in waves, the hub's side: the checks before a
//! rollout starts (every selected device's config rendered and checked as
//! `gatewayd check` does, the change classified for the starter's role) and
//! the controller every hub runs, which reads each active rollout, observes
//! its devices in the registry and acts on `gateway_core::rollout::decide`:
//! offers the next wave, pauses over `--max-failures`, finishes, rolls back.
//!
//! Hubs sharing a registry share the work without a leader: every change of a
//! rollout is a compare-and-swap of its document by revision, and the hub
//! that wins the swap starting a wave (or a rollback) pushes it, recording its
//! progress every [`PROGRESS_EVERY`] devices; another hub takes over pushes
//! left for [`TAKE_OVER_AFTER_MS`] (that hub died). A push is idempotent: a
//! device whose newest version already is the rendered text is not pushed
//! again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use gateway_core::config::{Config, Role};
use gateway_core::fleet::{self, AdminRole};
use gateway_core::rollout::{self, Decision, DeviceStatus, Member, Observed, Rollout, State};
use gateway_core::template;
use gateway_store::registry::{DeviceRow, Members, RegistryError, RolloutRow, RolloutUpdate};
use tracing::{info, warn};

use super::hub::Fleet;
use super::pushed_config;
use crate::node::clock::now_ms;

/// Progress of a wave's pushes is recorded this often (devices).
const PROGRESS_EVERY: usize = 200;
/// Pushes a hub started and has not recorded progress of for this long are
/// taken over by another hub.
pub const TAKE_OVER_AFTER_MS: i64 = 60_000;
/// Devices read per page when observing a rollout's devices.
const PAGE: usize = 5000;
/// Attempts at a compare-and-swap before giving up for this tick.
const SWAPS: usize = 20;

/// A rollout could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Not found.
    #[error("no rollout {0} on this hub")]
    Unknown(String),
    /// The stored document does not parse (written by a newer gatewayd?).
    #[error("rollout {0}: its stored document does not read: {1}")]
    Corrupt(String, String),
    /// The change does not apply in the rollout's state.
    #[error("{0}")]
    Refused(String),
}

/// The role a rollout's pushes need, by the change they make.
pub fn role_needed(change: fleet::Change) -> Vec<fleet::Action> {
    let mut out = Vec::new();
    if change.policy {
        out.push(fleet::Action::ConfigPushPolicy);
    }
    if change.other {
        out.push(fleet::Action::ConfigPushOther);
    }
    out
}

/// `file:line:column: message` for a template's mistake.
fn located(file: &str, e: &template::TemplateError) -> String {
    if e.line > 0 {
        format!("{file}:{}:{}: {}", e.line, e.column, e.message)
    } else {
        format!("{file}: {}", e.message)
    }
}

/// The name a rendered config's errors are located under.
pub fn rendered_name(template: &str, version: u64, device: &str) -> String {
    format!("template {template} v{version} for {device}")
}

/// Renders `text` (template `name` v`version`) for `device` and checks the
/// result as `gatewayd check` does: the text and the config it checked as,
/// or every error located in the template's lines and naming the device.
pub fn render_checked(
    (name, version, text): (&str, u64, &str),
    device: &str,
    vars: &BTreeMap<String, String>,
) -> Result<(String, Config), Vec<String>> {
    let file = rendered_name(name, version, device);
    let rendered = template::render_for_device(text, device, vars)
        .map_err(|es| es.iter().map(|e| located(&file, e)).collect::<Vec<_>>())?;
    let config = pushed_config::check_text(&rendered, &file)?;
    if config.node.id != device {
        return Err(vec![format!(
            "{file}: node.id renders as {:?}, not {device:?}; write id = \"{{{{ device }}}}\"",
            config.node.id
        )]);
    }
    if !matches!(config.role, Role::Edge(_)) {
        return Err(vec![format!(
            "{file}: renders as a hub's config; templates are for edges"
        )]);
    }
    Ok((rendered, config))
}

/// What the hub observed of a device, for its rollout status.
pub fn observed(row: Option<&DeviceRow>) -> Observed {
    let Some(row) = row else {
        return Observed::default();
    };
    let status: Option<(i64, serde_json::Value)> = row
        .status
        .as_ref()
        .map(|(at, json)| (*at, serde_json::from_str(json).unwrap_or_default()));
    let heartbeat = status
        .as_ref()
        .map(|(at, v)| (*at, v["config_version"].as_u64().unwrap_or(0)));
    let trying = status
        .as_ref()
        .is_some_and(|(_, v)| v["config_trying"].as_bool() == Some(true));
    let firmware = status
        .as_ref()
        .and_then(|(_, v)| serde_json::from_value(v.get("firmware")?.clone()).ok());
    Observed {
        desired: row.desired,
        applied: row.applied.as_ref().map(|a| a.0),
        result: row.applied.as_ref().map(|a| a.1.clone()),
        heartbeat,
        result_ms: row.applied.as_ref().map(|a| a.2),
        trying,
        firmware,
    }
}

/// Every device row, by id (read in pages).
pub async fn all_rows(fleet: &Fleet) -> Result<HashMap<String, DeviceRow>, RegistryError> {
    let mut out = HashMap::new();
    let mut after = None;
    loop {
        let page = fleet
            .registry()
            .devices_page(after.take(), PAGE, Default::default())
            .await?;
        let full = page.rows.len() == PAGE;
        after = page.rows.last().map(|r| r.id.clone());
        out.extend(page.rows.into_iter().map(|r| (r.id.clone(), r)));
        if !full {
            return Ok(out);
        }
    }
}

/// Each member's status now.
pub fn statuses(r: &Rollout, rows: &HashMap<String, DeviceRow>, now: i64) -> Vec<DeviceStatus> {
    r.devices
        .iter()
        .map(|m| rollout::member_status(r, m, &observed(rows.get(&m.device)), now))
        .collect()
}

fn parse(row: &RolloutRow) -> Result<Rollout, RolloutError> {
    serde_json::from_str(&row.json)
        .map_err(|e| RolloutError::Corrupt(row.id.clone(), e.to_string()))
}

/// Reads rollout `id` and applies `change` to it until the swap wins: the
/// document after, or `None` when `change` declined (returned `Ok(None)`).
pub async fn update(
    fleet: &Fleet,
    id: &str,
    mut change: impl FnMut(&mut Rollout) -> Result<Option<Members>, RolloutError>,
) -> Result<Option<Rollout>, RolloutError> {
    for _ in 0..SWAPS {
        let row = fleet
            .registry()
            .rollout(id.to_owned())
            .await?
            .ok_or_else(|| RolloutError::Unknown(id.to_owned()))?;
        let mut doc = parse(&row)?;
        let Some(members) = change(&mut doc)? else {
            return Ok(None);
        };
        let swapped = fleet
            .registry()
            .update_rollout(RolloutUpdate {
                id: id.to_owned(),
                rev: row.rev,
                json: serde_json::to_string(&doc).unwrap_or_default(),
                active: doc.state.holds_devices(),
                members,
                now_ms: now_ms(),
            })
            .await?;
        if swapped {
            fleet.wake_rollouts();
            return Ok(Some(doc));
        }
    }
    Err(RolloutError::Refused(format!(
        "rollout {id} kept changing under this hub; try again"
    )))
}

/// What pushing one member did.
#[derive(Debug, Clone)]
enum Pushed {
    /// Pushed: its version, the one before, when (Unix ms).
    Version(u64, Option<u64>, i64),
    Unchanged,
    Error(String),
    Rollback(u64, i64),
    RollbackError(String),
    /// Offered firmware, when (Unix ms).
    Offered(i64),
}

fn merge(doc: &mut Rollout, done: &HashMap<String, Pushed>) {
    for m in &mut doc.devices {
        match done.get(&m.device) {
            Some(Pushed::Version(v, prev, at)) => {
                m.pushed = Some(*v);
                m.previous = *prev;
                m.offered_ms = Some(*at);
            }
            Some(Pushed::Unchanged) => m.unchanged = true,
            Some(Pushed::Error(e)) => m.error = Some(e.clone()),
            Some(Pushed::Rollback(v, at)) => {
                m.rollback = Some(*v);
                m.offered_ms = Some(*at);
            }
            Some(Pushed::RollbackError(e)) => {
                m.rollback_error = Some(e.clone());
            }
            Some(Pushed::Offered(at)) => m.offered_ms = Some(*at),
            None => {}
        }
    }
}

/// Pushes `device` its config from the template: the version, unchanged
/// when it already has that text, or why not.
async fn push_one(
    fleet: &Fleet,
    doc: &Job,
    template: &str,
    device: &str,
    vars: &BTreeMap<String, String>,
) -> Result<Pushed, RegistryError> {
    let (text, config) = match render_checked(
        (&doc.template, doc.template_version, template),
        device,
        vars,
    ) {
        Ok(t) => t,
        Err(errors) => return Ok(Pushed::Error(errors.join("; "))),
    };
    let reg = fleet.registry();
    let base = match reg.desired(device.to_owned()).await? {
        Some(d) => Some(d),
        None => reg.applied(device.to_owned()).await?,
    };
    let Some((base_version, base_text)) = base else {
        return Ok(Pushed::Error(
            "the hub has not seen this device's config yet (it reports it when it connects)".into(),
        ));
    };
    if base_text == text {
        return Ok(Pushed::Unchanged);
    }
    let change = fleet::classify_change(&base_text, &text);
    if !change.policy && !change.other {
        return Ok(Pushed::Unchanged);
    }
    let restart = gateway_core::config::restart::restart_needed_over(&base_text, &config);
    if let (Some(what), false) = (restart, doc.restart) {
        return Ok(Pushed::Error(format!(
            "its change now touches {what}, which takes a restart of the box, and the rollout was not started with --restart"
        )));
    }
    let role = AdminRole::parse(&doc.by_role);
    for action in role_needed(change) {
        if !role.is_some_and(|r| fleet::allowed(r, action)) {
            return Ok(Pushed::Error(format!(
                "its change now touches {} sections, which the {} who started the rollout may not change",
                if action == fleet::Action::ConfigPushPolicy {
                    "policy"
                } else {
                    "non-policy"
                },
                doc.by_role
            )));
        }
    }
    let version = fleet
        .push(device, text, &format!("{} (rollout {})", doc.by, doc.id))
        .await?;
    Ok(Pushed::Version(version, Some(base_version), now_ms()))
}

/// What a push needs of its rollout (shared by the pushes running at once).
struct Job {
    id: String,
    template: String,
    template_version: u64,
    by: String,
    by_role: String,
    restart: bool,
}

/// Pushes made at once (each a few statements of the registry).
const CONCURRENT_PUSHES: usize = 16;

/// Offers `device` the version it had before the rollout.
async fn roll_back_one(fleet: &Fleet, doc: &Job, m: &Member) -> Result<Pushed, RegistryError> {
    let reg = fleet.registry();
    let Some(pushed) = m.pushed else {
        return Ok(Pushed::RollbackError("nothing was pushed".into()));
    };
    let desired = reg.desired(m.device.clone()).await?.map(|d| d.0);
    if desired.is_some_and(|d| d > pushed) {
        return Ok(Pushed::RollbackError(format!(
            "version {} was pushed to it after the rollout's {pushed}: left as it is",
            desired.unwrap_or(0)
        )));
    }
    let Some(prev) = m.previous else {
        return Ok(Pushed::RollbackError("no earlier version is known".into()));
    };
    let Some(text) = reg.config_version(m.device.clone(), prev).await? else {
        return Ok(Pushed::RollbackError(format!(
            "version {prev} is no longer stored"
        )));
    };
    let version = fleet
        .push(
            &m.device,
            text,
            &format!("{} (rollback of {})", doc.by, doc.id),
        )
        .await?;
    Ok(Pushed::Rollback(version, now_ms()))
}

/// Pushes what is left of the current wave (or of the rollback) of rollout
/// `id`, recording progress; the lease is this hub's until it ends.
async fn push_work(fleet: &Arc<Fleet>, id: &str) -> Result<(), RolloutError> {
    let me = fleet.ctx().id.clone();
    let row = fleet
        .registry()
        .rollout(id.to_owned())
        .await?
        .ok_or_else(|| RolloutError::Unknown(id.to_owned()))?;
    let doc = parse(&row)?;
    if doc.firmware.is_some() {
        return offer_firmware(fleet, doc).await;
    }
    let rolling_back = doc.state == State::RollingBack;
    let wave = doc.wave_started_ms.len().saturating_sub(1);
    let todo: Vec<Member> = doc
        .devices
        .iter()
        .filter(|m| {
            if rolling_back {
                m.pushed.is_some() && m.rollback.is_none() && m.rollback_error.is_none()
            } else {
                m.wave == wave && m.pushed.is_none() && !m.unchanged && m.error.is_none()
            }
        })
        .cloned()
        .collect();
    let template = if rolling_back {
        String::new()
    } else {
        fleet
            .registry()
            .template(doc.template.clone(), Some(doc.template_version))
            .await?
            .map(|t| t.text)
            .ok_or_else(|| {
                RolloutError::Refused(format!(
                    "template {} v{} is gone",
                    doc.template, doc.template_version
                ))
            })?
    };
    let mut vars: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    if !rolling_back {
        let ids: Vec<String> = todo.iter().map(|m| m.device.clone()).collect();
        for (d, k, v) in fleet.registry().vars(ids).await? {
            vars.entry(d).or_default().insert(k, v);
        }
    }
    let job = Arc::new(Job {
        id: doc.id.clone(),
        template: doc.template.clone(),
        template_version: doc.template_version,
        by: doc.by.clone(),
        by_role: doc.by_role.clone(),
        restart: doc.restart,
    });
    let template: Arc<str> = Arc::from(template);
    let mut done: HashMap<String, Pushed> = HashMap::new();
    let mut running = tokio::task::JoinSet::new();
    let mut next = todo.iter();
    let mut recorded = 0;
    loop {
        while running.len() < CONCURRENT_PUSHES {
            let Some(m) = next.next() else { break };
            let (fleet, job, template, m) =
                (fleet.clone(), job.clone(), template.clone(), m.clone());
            let v = vars.remove(&m.device).unwrap_or_default();
            running.spawn(async move {
                let outcome = if rolling_back {
                    roll_back_one(&fleet, &job, &m).await
                } else {
                    push_one(&fleet, &job, &template, &m.device, &v).await
                };
                (m.device, outcome)
            });
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        let (device, outcome) =
            joined.map_err(|e| RolloutError::Refused(format!("a push failed: {e}")))?;
        done.insert(device, outcome?);
        let last = running.is_empty() && next.len() == 0;
        if done.len() - recorded >= PROGRESS_EVERY || last {
            recorded = done.len();
            let me = me.clone();
            update(fleet, id, |d| {
                merge(d, &done);
                d.pushing = if last {
                    None
                } else {
                    Some((me.clone(), now_ms()))
                };
                Ok(Some(Members::Keep))
            })
            .await?;
        }
    }
    if todo.is_empty() {
        update(fleet, id, |d| {
            d.pushing = None;
            Ok(Some(Members::Keep))
        })
        .await?;
    }
    let n = done.len();
    let failed = done
        .values()
        .filter(|p| matches!(p, Pushed::Error(_) | Pushed::RollbackError(_)))
        .count();
    info!(
        rollout = id,
        wave = wave + 1,
        devices = n,
        not_pushed = failed,
        rollback = rolling_back,
        "Rollout: offered"
    );
    Ok(())
}

/// Offers the current wave of firmware rollout `doc`: each box is marked
/// offered (the hubs then offer it with its heartbeats, see
/// [`super::firmware_offers`]), unchanged when it runs the version already,
/// or failed when it reports no updater.
async fn offer_firmware(fleet: &Arc<Fleet>, doc: Rollout) -> Result<(), RolloutError> {
    let Some(fw) = doc.firmware.clone() else {
        return Ok(());
    };
    let wave = doc.wave_started_ms.len().saturating_sub(1);
    let rows = all_rows(fleet).await?;
    let now = now_ms();
    let done: HashMap<String, Pushed> = doc
        .devices
        .iter()
        .filter(|m| m.wave == wave && m.offered_ms.is_none() && !m.unchanged && m.error.is_none())
        .map(|m| {
            let row = rows.get(&m.device);
            let heard = row.is_some_and(|r| r.status.is_some());
            let p = match observed(row).firmware {
                Some(f) if f.running == fw.version && f.phase != "trial" => Pushed::Unchanged,
                Some(_) => Pushed::Offered(now),
                // Never heard from: offered (it is silent if it stays so).
                None if !heard => Pushed::Offered(now),
                None => Pushed::Error(
                    "the box reports no firmware updater (it does not run the appliance image, or its updater has not published its status yet)".into(),
                ),
            };
            (m.device.clone(), p)
        })
        .collect();
    let n = done.len();
    update(fleet, &doc.id, |d| {
        merge(d, &done);
        d.pushing = None;
        Ok(Some(Members::Keep))
    })
    .await?;
    info!(rollout = %doc.id, wave = wave + 1, devices = n, firmware = %fw.version, "Rollout: firmware offered");
    Ok(())
}

/// The offers of the active firmware rollouts: each device offered and
/// still pending, with its rollout and version.
fn firmware_offers(
    active: &[RolloutRow],
    rows: &HashMap<String, DeviceRow>,
    now: i64,
) -> HashMap<String, (String, String)> {
    let mut out = HashMap::new();
    for row in active {
        let Ok(doc) = parse(row) else { continue };
        let Some(fw) = &doc.firmware else { continue };
        if !matches!(doc.state, State::Running | State::Paused) {
            continue;
        }
        for (m, s) in doc.devices.iter().zip(statuses(&doc, rows, now)) {
            if m.offered_ms.is_some() && s == DeviceStatus::Pending {
                out.insert(m.device.clone(), (doc.id.clone(), fw.version.clone()));
            }
        }
    }
    out
}

/// Aborted firmware rollouts are withdrawn from their boxes this long.
const WITHDRAW_FOR_MS: i64 = 30 * 24 * 3600 * 1000;

/// The versions aborted firmware rollouts (of the last 30 days) offered,
/// by device, the newest rollout's for a device offered by several.
fn firmware_withdrawn(all: &[RolloutRow], now: i64) -> HashMap<String, String> {
    let mut out = HashMap::new();
    // Newest first, as the registry lists them.
    for row in all {
        let Ok(doc) = parse(row) else { continue };
        let Some(fw) = &doc.firmware else { continue };
        if doc.state != State::Aborted || now - doc.created_ms > WITHDRAW_FOR_MS {
            continue;
        }
        for m in doc.devices.iter().filter(|m| m.offered_ms.is_some()) {
            out.entry(m.device.clone())
                .or_insert_with(|| fw.version.clone());
        }
    }
    out
}

/// One look at rollout `row`: acts on what `decide` says.
async fn step(
    fleet: &Arc<Fleet>,
    row: &RolloutRow,
    rows: &HashMap<String, DeviceRow>,
) -> Result<(), RolloutError> {
    let doc = parse(row)?;
    let now = now_ms();
    let me = fleet.ctx().id.clone();
    // Pushes another hub left behind.
    if let Some((hub, since)) = &doc.pushing {
        if now - since > TAKE_OVER_AFTER_MS || *hub == me {
            let took = update(fleet, &doc.id, |d| {
                if d.pushing != doc.pushing {
                    return Ok(None);
                }
                d.pushing = Some((me.clone(), now_ms()));
                Ok(Some(Members::Keep))
            })
            .await?;
            if took.is_some() {
                warn!(rollout = %doc.id, from = %hub, "Rollout: taking over pushes left unfinished");
                return push_work(fleet, &doc.id).await;
            }
        }
        return Ok(());
    }
    let st = statuses(&doc, rows, now);
    let audit = |event: &str, outcome: &str, detail: String| {
        fleet
            .ctx()
            .audit
            .record(&doc.by, &doc.id, event, outcome, "", detail);
    };
    match rollout::decide(&doc, &st, now) {
        Decision::Wait => {
            // A rollback whose pushes have not been made yet.
            let unpushed = doc.state == State::RollingBack
                && doc.devices.iter().any(|m| {
                    m.pushed.is_some() && m.rollback.is_none() && m.rollback_error.is_none()
                });
            if unpushed {
                let claimed = update(fleet, &doc.id, |d| {
                    if d.pushing.is_some() {
                        return Ok(None);
                    }
                    d.pushing = Some((me.clone(), now_ms()));
                    Ok(Some(Members::Keep))
                })
                .await?;
                if claimed.is_some() {
                    push_work(fleet, &doc.id).await?;
                }
            }
        }
        Decision::StartWave(k) => {
            let claimed = update(fleet, &doc.id, |d| {
                if d.state != State::Running || d.wave_started_ms.len() != k || d.pushing.is_some()
                {
                    return Ok(None);
                }
                d.wave_started_ms.push(now_ms());
                d.pushing = Some((me.clone(), now_ms()));
                Ok(Some(Members::Keep))
            })
            .await?;
            if let Some(d) = claimed {
                let size = d.devices.iter().filter(|m| m.wave == k).count();
                info!(rollout = %d.id, wave = k + 1, of = d.waves.len(), devices = size, "Rollout: wave started");
                let what = match &d.firmware {
                    Some(fw) => format!("firmware {}", fw.version),
                    None => format!("{} v{}", d.template, d.template_version),
                };
                audit(
                    "rollout.wave",
                    "ok",
                    format!(
                        "wave {} of {}: {size} device(s) offered {what} (by hub {me})",
                        k + 1,
                        d.waves.len(),
                    ),
                );
                push_work(fleet, &d.id).await?;
            }
        }
        Decision::Pause(reason) => {
            let paused = update(fleet, &doc.id, |d| {
                if d.state != State::Running {
                    return Ok(None);
                }
                d.state = State::Paused;
                d.reason = Some(reason.clone());
                Ok(Some(Members::Keep))
            })
            .await?;
            if paused.is_some() {
                warn!(rollout = %doc.id, %reason, "Rollout paused by itself");
                audit(
                    "rollout.pause",
                    "error",
                    format!("paused by itself: {reason}"),
                );
            }
        }
        Decision::Finish | Decision::FinishRollback => {
            let (from, to) = if doc.state == State::RollingBack {
                (State::RollingBack, State::RolledBack)
            } else {
                (State::Running, State::Done)
            };
            let counts = summary(&st);
            let finished = update(fleet, &doc.id, |d| {
                if d.state != from {
                    return Ok(None);
                }
                d.state = to;
                d.reason = Some(counts.clone());
                Ok(Some(Members::Release))
            })
            .await?;
            if finished.is_some() {
                info!(rollout = %doc.id, state = to.as_str(), %counts, "Rollout finished");
                audit(&format!("rollout.{}", to.as_str()), "ok", counts);
            }
        }
    }
    Ok(())
}

/// `applied=9 failed=1 ...`: the statuses counted.
pub fn summary(st: &[DeviceStatus]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for s in st {
        *counts.entry(s.as_str()).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The controller: every 2 s (or when a rollout changes at any hub), each
/// active rollout is looked at, until draining.
pub async fn run(fleet: Arc<Fleet>) {
    let wake = fleet.rollouts_wake();
    let mut tick: u64 = 0;
    loop {
        let woken = tokio::select! {
            () = wake.notified() => true,
            go = fleet.ctx().pause(Duration::from_secs(2)) => if go { false } else { return },
        };
        if fleet.ctx().draining.is_cancelled() {
            return;
        }
        tick += 1;
        // Aborted firmware rollouts: read when a rollout changed, else
        // every 30 s (they are not among the active ones).
        if woken || tick % 15 == 1 {
            match fleet.registry().rollouts(false).await {
                Ok(all) => fleet
                    .firmware_offers()
                    .set_withdrawn(firmware_withdrawn(&all, now_ms())),
                Err(e) => warn!(%e, "Rollouts: cannot read the registry"),
            }
        }
        let active = match fleet.registry().rollouts(true).await {
            Ok(a) => a,
            Err(e) => {
                warn!(%e, "Rollouts: cannot read the registry");
                continue;
            }
        };
        if active.is_empty() {
            fleet.firmware_offers().set(HashMap::new());
            continue;
        }
        let rows = match all_rows(&fleet).await {
            Ok(r) => r,
            Err(e) => {
                warn!(%e, "Rollouts: cannot read the devices");
                continue;
            }
        };
        for row in &active {
            if let Err(e) = step(&fleet, row, &rows).await {
                warn!(rollout = %row.id, %e, "Rollout step failed; trying again");
            }
        }
        // The offers as the registry had them before this tick's steps: a
        // wave just offered is offered from the next tick (2 s) on.
        fleet
            .firmware_offers()
            .set(firmware_offers(&active, &rows, now_ms()));
    }
}
