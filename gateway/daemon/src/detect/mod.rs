//! Intrusion detection's shell (GB/T 22239-2019 8.1.3.3): the listeners report
//! to the node's guard (`node::guard`), which bans at once; this audits each
//! alarm (8.1.3.5), counts it, logs it, and keeps the ban table on disk so
//! bans survive a restart.
//!
//! - [`bans_file`]: the saved ban table (`STATE_DIR/bans.json`).
//! - [`behaviour`]: the behaviour baseline, sampled from the node's counters.
//! - [`forward`]: alarms to the SOC (syslog over TLS, a webhook), following
//!   the audit chain.
//! - [`scan`]: malware scanning of what crosses a channel (clamd).
//! - [`nflog`]: scans of ports nothing listens on, from the packets the
//!   nftables baseline drops.

pub mod bans_file;
pub mod behaviour;
pub mod forward;
pub mod nflog;
pub mod scan;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gateway_core::detect::Alarm;
use tokio::sync::mpsc;
use tracing::{error, warn};

use crate::node::Ctx;
use crate::node::clock::now_ms;

/// How often de-duplicated alarms are flushed and the ban table saved.
const TICK: Duration = Duration::from_secs(1);
/// How often the behaviour baseline samples the node's counters.
const SAMPLE: Duration = Duration::from_secs(60);

/// Starts reading the packets the nftables baseline drops on `opened` (the
/// socket `gatewayd run` bound before giving up its privileges; none: it is
/// opened now), when this node may (root or CAP_NET_ADMIN, nfnetlink_log,
/// the group free); says once why not otherwise.
pub fn watch_dropped(ctx: &Arc<Ctx>, opened: Option<Result<std::os::fd::OwnedFd, String>>) {
    if !ctx.policy().config().detect.enabled {
        return;
    }
    match opened.unwrap_or_else(nflog::open) {
        Ok(fd) => nflog::spawn(ctx.clone(), fd),
        Err(why) => {
            tracing::info!(%why, "Scans of ports nothing listens on are not watched (needs root and the nftables baseline's NFLOG group)")
        }
    }
}

/// Puts back the bans saved in `state_dir` (before any listener starts).
pub fn restore(ctx: &Ctx, state_dir: &Path) {
    match bans_file::load(state_dir) {
        Ok(saved) => {
            let n = saved.len();
            ctx.guard.restore(saved);
            let active = ctx.guard.tick(&ctx.metrics);
            if n > 0 {
                warn!(
                    sources = n,
                    active, "Bans restored from the state directory"
                );
            }
        }
        Err(e) => error!(
            error = %e,
            "The saved bans cannot be read; starting without them (the file is left as it is)"
        ),
    }
}

/// Audits and counts alarms, hands each to `taps` (a hub's registry), wakes
/// the SOC forwarders (`wake`: they read the alarm back from the audit
/// chain), and saves the ban table, until draining. A tap that is full
/// misses the alarm (it is in the audit chain all the same).
pub async fn run(
    ctx: Arc<Ctx>,
    state_dir: std::path::PathBuf,
    taps: Vec<mpsc::Sender<Alarm>>,
    wake: Vec<Arc<tokio::sync::Notify>>,
) {
    let Some(mut alarms) = ctx.guard.alarms() else {
        return;
    };
    let mut tick = tokio::time::interval(TICK);
    let mut sampler = behaviour::Sampler::load(&state_dir);
    let mut sample = tokio::time::interval(SAMPLE);
    let mut hour = gateway_core::detect::baseline::hour_of(now_ms());
    loop {
        tokio::select! {
            Some(a) = alarms.recv() => {
                raise(&ctx, &a);
                for w in &wake {
                    w.notify_one();
                }
                for t in &taps {
                    if t.try_send(a.clone()).is_err() {
                        ctx.metrics.alarm_lost();
                    }
                }
            }
            _ = tick.tick() => {
                ctx.guard.tick(&ctx.metrics);
                save(&ctx, &state_dir);
            }
            _ = sample.tick() => {
                let now = now_ms();
                for a in sampler.step(&ctx.metrics, now) {
                    ctx.guard.raise(|node, id| Alarm::behaviour(node, id, &a, now), &ctx.metrics);
                }
                let h = gateway_core::detect::baseline::hour_of(now);
                if h != hour {
                    hour = h;
                    if let Err(e) = sampler.save(&state_dir) {
                        warn!(error = %e, "Cannot save the behaviour baseline");
                    }
                }
            }
            () = ctx.draining.cancelled() => break,
        }
    }
    while let Ok(a) = alarms.try_recv() {
        raise(&ctx, &a);
        for t in &taps {
            let _ = t.try_send(a.clone());
        }
    }
    save(&ctx, &state_dir);
    if let Err(e) = sampler.save(&state_dir) {
        warn!(error = %e, "Cannot save the behaviour baseline");
    }
}

fn save(ctx: &Ctx, state_dir: &Path) {
    if let Some(table) = ctx.guard.take_changed()
        && let Err(e) = bans_file::save(state_dir, &table)
    {
        error!(error = %e, "Cannot save the ban table; bans in force stay, but would not survive a restart");
    }
}

/// One alarm: audited (the record's detail is the alarm in JSON), counted, logged.
fn raise(ctx: &Ctx, a: &Alarm) {
    ctx.metrics.alarm(&a.attack, &a.severity);
    warn!(
        id = %a.id,
        rule = %a.rule,
        severity = %a.severity,
        attack = %a.attack,
        direction = %a.direction,
        source = %a.source,
        port = a.port,
        target = %a.target,
        action = %a.action,
        count = a.count,
        "Intrusion alarm"
    );
    let detail = serde_json::to_string(a).unwrap_or_default();
    ctx.audit.record(
        &a.source,
        &a.target,
        "detect.alarm",
        "alarm",
        &a.rule,
        detail,
    );
}
