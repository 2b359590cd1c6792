//! Delivery to another department: the destination edge's half of
//! `deliver_to = "DEVICE/CHANNEL"`.
//!
//! The hub opens a stream with `Deliver{from, channel}` and sends the source's
//! records as batches. This edge checks each record at its own boundary (the
//! policy's channel rules and the declared format), writes it as one file into
//! `STATE_DIR/spool/CHANNEL/out/` and only then acknowledges; a record refused
//! here goes to `failed/` with `NAME.reason` and is audited. Files are named
//! `SOURCE-DEVICE.SOURCE-CHANNEL.SEQ.EXT` (SEQ zero-padded to 20 digits, so
//! names sort in order) and appear by rename, whole.
//!
//! Exactly once: see `gateway_store::inbox` (staged files, a durable mark per
//! source, recovery of pending renames at the start of every stream).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gateway_core::config::Format;
use gateway_core::wire::{Frame, RefuseCode, SyncRecord};
use gateway_store::inbox::Inbox;
use tracing::{Instrument, debug, info, info_span, warn};

use super::check::{check_records, scan_records};
use crate::detect::scan::{Scanner, Verdict};
use crate::node::Ctx;
use crate::node::guard::Report;
use crate::os::dir::SafeDir;
use crate::tunnel::frame::{read_batch, refuse, write_frame};
use gateway_core::detect::Direction;

/// The inbox, shared by delivery streams and used from blocking threads, and
/// the state directory whose spool the deliveries are written to.
#[derive(Clone)]
pub struct InboxHandle {
    inbox: Arc<Mutex<Inbox>>,
    state_dir: PathBuf,
    scanner: Option<Arc<dyn Scanner>>,
}

impl InboxHandle {
    /// Wraps an open inbox of `state_dir`.
    pub fn new(inbox: Inbox, state_dir: PathBuf, scanner: Option<Arc<dyn Scanner>>) -> Self {
        InboxHandle {
            inbox: Arc::new(Mutex::new(inbox)),
            state_dir,
            scanner,
        }
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Inbox) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let inbox = self.inbox.clone();
        tokio::task::spawn_blocking(move || {
            f(&mut inbox
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner))
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// `spool/CHANNEL/{.staging, out, failed}` under `state_dir`.
pub fn dirs(state_dir: &Path, channel: &str) -> [PathBuf; 3] {
    let base = state_dir.join("spool").join(channel);
    [base.join(".staging"), base.join("out"), base.join("failed")]
}

fn extension(format: &str) -> &'static str {
    match format {
        "json" => "json",
        "xml" => "xml",
        "csv" => "csv",
        "raw" => "bin",
        _ => "txt",
    }
}

fn format_of(name: &str) -> Option<Format> {
    match name {
        "json" => Some(Format::Json),
        "xml" => Some(Format::Xml),
        "csv" => Some(Format::Csv),
        "text" => Some(Format::Text),
        "raw" => Some(Format::Raw),
        _ => None,
    }
}

/// A channel's delivery directories, opened once through their descriptors
/// (`crate::os::dir`): `out/` is the destination application's, so nothing
/// there is followed; a symlink planted under a coming name is replaced,
/// never written through.
pub struct Opened {
    staging: SafeDir,
    out: SafeDir,
    failed: SafeDir,
}

/// Opens `state_dir/spool/CHANNEL/{.staging, out, failed}` component by
/// component, each a real directory owned by the daemon's user.
fn open_dirs(state_dir: &Path, channel: &str) -> Result<Opened, String> {
    let open = || -> Result<Opened, crate::os::dir::DirError> {
        let base = SafeDir::open(state_dir)?
            .open_child("spool")?
            .open_child(channel)?;
        Ok(Opened {
            staging: base.open_child(".staging")?,
            out: base.open_child("out")?,
            failed: base.open_child("failed")?,
        })
    };
    open().map_err(|e| e.to_string())
}

fn os(name: &str) -> &OsStr {
    OsStr::new(name)
}

/// Finishes what a crash interrupted: pending files are renamed into `out/`,
/// staged files that were never committed are removed.
fn recover(inbox: &mut Inbox, channel: &str, d: &Opened) -> Result<(), String> {
    let pending = inbox.pending(channel).map_err(|e| e.to_string())?;
    for name in &pending {
        match d.staging.rename_over(os(name), &d.out, os(name)) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(format!("{}/{name}: {e}", d.staging.path().display())),
        }
    }
    d.out.sync().map_err(|e| e.to_string())?;
    inbox
        .published(channel, &pending)
        .map_err(|e| e.to_string())?;
    for (name, _, _) in d.staging.entries().unwrap_or_default() {
        let _ = d.staging.remove(&name);
    }
    Ok(())
}

/// Writes one batch: refused records to `failed/`, the others staged, the mark
/// raised with them pending, then renamed into `out/`. Returns the new mark.
fn publish(
    inbox: &mut Inbox,
    source: &str,
    channel: &str,
    d: &Opened,
    accepted: Vec<(SyncRecord, String)>,
    refused: Vec<(SyncRecord, String, String)>,
    upto: u64,
) -> Result<u64, String> {
    let io = |dir: &SafeDir| {
        let p = dir.path().display().to_string();
        move |e: std::io::Error| format!("{p}: {e}")
    };
    for (r, name, reason) in &refused {
        d.failed
            .write_replace(os(name), &r.body)
            .map_err(io(&d.failed))?;
        d.failed
            .write_replace(
                os(&format!("{name}.reason")),
                format!("{reason}\n").as_bytes(),
            )
            .map_err(io(&d.failed))?;
    }
    let mut names = Vec::with_capacity(accepted.len());
    for (r, name) in &accepted {
        // A leftover of a crash under this name is replaced.
        let _ = d.staging.remove(os(name));
        d.staging
            .write_new(os(name), &r.body)
            .map_err(io(&d.staging))?;
        names.push(name.clone());
    }
    inbox
        .commit(source, channel, upto, &names)
        .map_err(|e| e.to_string())?;
    for name in &names {
        d.staging
            .rename_over(os(name), &d.out, os(name))
            .map_err(|e| format!("{}: {e}", d.out.path().display()))?;
    }
    d.out
        .sync()
        .map_err(|e| format!("{}: {e}", d.out.path().display()))?;
    inbox
        .published(channel, &names)
        .map_err(|e| e.to_string())?;
    Ok(upto)
}

/// Serves a delivery stream the hub opened (after its `Deliver` frame).
pub async fn serve(
    ctx: Arc<Ctx>,
    inbox: Option<InboxHandle>,
    from: String,
    channel: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let span = info_span!("deliver", %from, %channel);
    async move {
        let known = ctx
            .policy()
            .config()
            .edge()
            .is_some_and(|e| e.channels.iter().any(|c| c.name == channel));
        let Some(inbox) = inbox.filter(|_| known) else {
            let message = format!("no channel {channel:?} on {} to deliver {from} to", ctx.id);
            ctx.refuse("channel.refuse", &from, &channel, "no-route", &message);
            refuse(&mut send, RefuseCode::NoRoute, "", message).await;
            return;
        };
        let (ch, state, src) = (channel.clone(), inbox.state_dir.clone(), from.clone());
        let opened = match inbox
            .with(move |i| {
                let d = open_dirs(&state, &ch)?;
                recover(i, &ch, &d)?;
                let high = i.high(&src).map_err(|e| e.to_string())?;
                Ok((Arc::new(d), high))
            })
            .await
        {
            Ok(h) => h,
            Err(error) => {
                warn!(%error, "Cannot deliver: the inbox or spool directory failed");
                let _ = send.reset(quinn::VarInt::from_u32(0));
                return;
            }
        };
        let (dirs, high) = opened;
        if write_frame(&mut send, &Frame::SyncReady { acked: high })
            .await
            .is_err()
        {
            return;
        }
        let mut high = high;
        let prefix = from.replace('/', ".");
        let subject = format!("deliver:{from}");
        loop {
            let next = tokio::select! {
                r = read_batch(&mut recv) => r,
                () = ctx.draining.cancelled() => return,
            };
            let records = match next {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(error) => {
                    debug!(%error, "Delivery stream ended");
                    return;
                }
            };
            let Some(upto) = records.last().map(|r| r.seq) else {
                continue;
            };
            let (mut accepted, mut refused) = (Vec::new(), Vec::new());
            let target = format!("delivery channel {channel}");
            // The sending department is known only as the hub names it: never
            // proven here, so alarmed about, not banned.
            let who = Report::no_address(Direction::Inbound, &target);
            for r in records.into_iter().filter(|r| r.seq > high) {
                let name = format!("{prefix}.{:020}.{}", r.seq, extension(&r.format));
                let mut verdict = match format_of(&r.format) {
                    Some(f) => check_records(&ctx, &subject, &channel, f, &[&r.body[..]], false)
                        .map_err(|x| format!("[{}] {}", x.rule, x.reason)),
                    None => Err(format!("unknown format {:?}", r.format)),
                };
                if verdict.is_ok() {
                    let scanned = scan_records(
                        &ctx,
                        inbox.scanner.as_deref(),
                        (&subject, &channel),
                        &[&r.body[..]],
                        &who,
                    )
                    .await;
                    match scanned {
                        Ok(_) => {}
                        Err(x) if matches!(x.verdict, Verdict::Unavailable(_)) => {
                            // Not the record's fault: the hub resends it later.
                            warn!(reason = %x.reason, "Delivery paused: the malware scanner did not answer");
                            let _ = send.reset(quinn::VarInt::from_u32(0));
                            return;
                        }
                        Err(x) => {
                            verdict = Err(match x.verdict {
                                Verdict::Found(_) => format!("[D6.malware] {}", x.reason),
                                _ => x.reason,
                            });
                        }
                    }
                }
                match verdict {
                    Ok(()) => accepted.push((r, name)),
                    Err(reason) => refused.push((r, name, reason)),
                }
            }
            let n = (accepted.len(), refused.len());
            let failures: Vec<(u64, String)> = refused
                .iter()
                .map(|(r, _, why)| (r.seq, why.clone()))
                .collect();
            let (src, ch, d) = (from.clone(), channel.clone(), dirs.clone());
            match inbox
                .with(move |i| publish(i, &src, &ch, &d, accepted, refused, upto))
                .await
            {
                Ok(h) => high = high.max(h),
                Err(error) => {
                    warn!(%error, "Delivery failed; the hub will resend");
                    let _ = send.reset(quinn::VarInt::from_u32(0));
                    return;
                }
            }
            info!(
                delivered = n.0,
                refused = n.1,
                upto,
                "Records delivered to out/"
            );
            for (seq, reason) in failures {
                if write_frame(&mut send, &Frame::SyncFailed { seq, reason })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if write_frame(&mut send, &Frame::SyncAck { upto })
                .await
                .is_err()
            {
                return;
            }
        }
    }
    .instrument(span)
    .await;
}
