//! Spool directories: `STATE_DIR/spool/CHANNEL/{in,done,failed}`.
//!
//! A legacy application writes a file anywhere on the same file system and
//! renames it into `in/` when it is complete (a rename is atomic, so a file in
//! `in/` is always whole; names starting with `.` are ignored, for tools that
//! write in place under a temporary name). The gateway picks it up within
//! [`SCAN_EVERY`], checks it at the boundary like an HTTP record, commits it to
//! the buffer and then moves it to `done/`; a refused file goes to `failed/`
//! with `NAME.reason` beside it. A file whose channel is full stays in `in/`
//! and is tried again.
//!
//! The format comes from the extension: `.json`, `.xml`, `.csv`, `.txt` one
//! record per file, `.ndjson` one JSON record per line (all or nothing).
//!
//! A producer's directory is hostile ground: each directory is opened once,
//! component by component, as a real directory owned by the daemon's user
//! (else that channel's spool is refused, logged and audited, and the rest of
//! the node runs); entries are read and moved only through those descriptors
//! ([`crate::os::dir`]), so a symlink, FIFO, device, directory, hard link or a
//! file larger than the limit is never followed or read: it goes to `failed/`
//! with a reason, audited once. A file that takes longer than
//! [`READ_TIMEOUT`] to read is skipped, so no entry stalls the others.
//!
//! Exactly once: the file's identity (name, size, modification time) is
//! committed in the same transaction as its records, so a file still in `in/`
//! after a crash between the commit and the move is moved on, not committed
//! twice.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gateway_core::config::{Channel, Format};
use gateway_store::buffer::NewRecord;
use tracing::{error, info, warn};

use super::buffer::BufferHandle;
use super::check::{buffer_when_full, check_records, scan_records, split_records};
use crate::detect::scan::{Scanner, Verdict};
use crate::node::Ctx;
use crate::node::guard::Report;
use crate::os::dir::{DirError, Kind, ReadRefusal, SafeDir};
use gateway_core::detect::Direction;

/// How often `in/` directories are scanned.
pub const SCAN_EVERY: Duration = Duration::from_millis(200);
/// The longest one spool file may take to read; past it the file is skipped
/// (and tried again later), so one stuck file never holds up the others.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Entries refused but impossible to move remembered, so each is audited once.
const MAX_REMEMBERED: usize = 10_000;
/// Largest NDJSON spool file, in records of the channel's limit.
const MAX_BATCH_RECORDS: u64 = 1000;

/// The spool directories of `channel` under `state_dir`.
pub fn dirs(state_dir: &Path, channel: &str) -> [PathBuf; 3] {
    let base = state_dir.join("spool").join(channel);
    [base.join("in"), base.join("done"), base.join("failed")]
}

/// A channel's spool directories, opened once (see [`crate::os::dir`]).
struct Opened {
    inbox: SafeDir,
    done: SafeDir,
    failed: SafeDir,
}

/// Opens `state_dir/spool/CHANNEL/{in,done,failed}` component by component,
/// each a real directory owned by the daemon's user.
fn open_dirs(state_dir: &Path, channel: &str) -> Result<Opened, DirError> {
    let state = SafeDir::open(state_dir)?;
    let base = state.open_child("spool")?.open_child(channel)?;
    Ok(Opened {
        inbox: base.open_child("in")?,
        done: base.open_child("done")?,
        failed: base.open_child("failed")?,
    })
}

/// Scans every channel's `in/` until draining.
pub async fn run(
    ctx: Arc<Ctx>,
    buffer: BufferHandle,
    state_dir: PathBuf,
    scanner: Option<Arc<dyn Scanner>>,
) {
    let mut tick = tokio::time::interval(SCAN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Each channel's directories, opened at start and again after a reload;
    // a channel whose directories are refused is skipped until then.
    let mut opened: HashMap<String, Option<Arc<Opened>>> = HashMap::new();
    let mut policy_seen: Option<Arc<gateway_core::policy::Policy>> = None;
    // Files already reported as waiting for room (reported once).
    let mut told: HashSet<OsString> = HashSet::new();
    // Refused entries that could not be moved (audited once).
    let mut stuck: HashSet<(String, OsString)> = HashSet::new();
    // The first scan forgets too (after a restart or an upgrade).
    let mut last_forget: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = ctx.draining.cancelled() => return,
        }
        let forget_due = last_forget.is_none_or(|t| t.elapsed() >= FORGET_EVERY);
        if forget_due {
            last_forget = Some(std::time::Instant::now());
        }
        let policy = ctx.policy();
        if !policy_seen
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(p, &policy))
        {
            policy_seen = Some(policy.clone());
            opened.clear();
        }
        let channels: Vec<Channel> = policy
            .config()
            .edge()
            .map(|e| e.channels.clone())
            .unwrap_or_default();
        for c in &channels {
            let dirs = opened
                .entry(c.name.clone())
                .or_insert_with(|| match open_dirs(&state_dir, &c.name) {
                    Ok(d) => Some(Arc::new(d)),
                    Err(e) => {
                        let reason = e.to_string();
                        error!(channel = %c.name, %reason, "Spool refused for this channel (the rest runs); fix the directory and reload");
                        ctx.audit.record(
                            &ctx.id,
                            &c.name,
                            "channel.spool",
                            "deny",
                            "",
                            gateway_core::refusals::peer_text(&reason),
                        );
                        None
                    }
                })
                .clone();
            let Some(dirs) = dirs else { continue };
            let files = waiting(&ctx, c, &dirs, &mut stuck);
            if forget_due {
                // A committed file's identity is kept while the file is in
                // in/ (the crash window) or done/ (moved back by hand, it is
                // still not committed twice); once removed from done/, it goes.
                let present = files
                    .iter()
                    .filter_map(|f| identity(&dirs.inbox, f))
                    .chain(
                        dirs.done
                            .entries()
                            .unwrap_or_default()
                            .iter()
                            .filter_map(|(n, _, _)| identity(&dirs.done, n)),
                    )
                    .collect();
                if let Err(error) = buffer.forget_spooled(&c.name, present).await {
                    warn!(channel = %c.name, %error, "Cannot forget removed spool files");
                }
            }
            for file in files {
                if ctx.draining.is_cancelled() {
                    return;
                }
                take(
                    &ctx,
                    (&buffer, scanner.as_deref()),
                    c,
                    &dirs,
                    &file,
                    &mut told,
                )
                .await;
            }
        }
    }
}

/// How often identities of spool files removed from `done/` are forgotten
/// (`done/` is listed then).
const FORGET_EVERY: Duration = Duration::from_secs(600);

/// Complete regular files in `in/`, oldest first. Anything else there (a
/// symlink, FIFO, device, socket, directory, a name with control characters)
/// is refused into `failed/` with a reason and audited once.
fn waiting(
    ctx: &Ctx,
    channel: &Channel,
    dirs: &Opened,
    stuck: &mut HashSet<(String, OsString)>,
) -> Vec<OsString> {
    let entries = match dirs.inbox.entries() {
        Ok(e) => e,
        Err(error) => {
            warn!(dir = %dirs.inbox.path().display(), %error, "Cannot list the spool directory");
            return Vec::new();
        }
    };
    let mut files: Vec<(i128, OsString)> = Vec::new();
    for (name, kind, mtime) in entries {
        if name.as_encoded_bytes().first() == Some(&b'.') {
            continue;
        }
        let text = name.to_string_lossy();
        let refusal = if text.chars().any(char::is_control) {
            Some("the file name holds control characters".to_owned())
        } else {
            match kind {
                Kind::File => None,
                Kind::Symlink => Some("a symbolic link: spool regular files only".into()),
                Kind::Directory => Some("a directory: spool regular files only".into()),
                Kind::Special => Some("a FIFO, socket or device: spool regular files only".into()),
            }
        };
        match refusal {
            None => files.push((mtime, name)),
            Some(reason) => refuse(ctx, channel, dirs, &name, &reason, stuck),
        }
    }
    files.sort();
    files.into_iter().map(|(_, n)| n).collect()
}

/// A spool file's identity: name, size and modification time.
fn identity(dir: &SafeDir, name: &OsStr) -> Option<String> {
    let (size, mtime) = dir.file_identity(name)?;
    Some(format!("{}:{size}:{mtime}", name.to_string_lossy()))
}

fn format_of(name: &OsStr) -> Option<(Format, bool)> {
    match Path::new(name)
        .extension()?
        .to_str()?
        .to_ascii_lowercase()
        .as_str()
    {
        "json" => Some((Format::Json, false)),
        "ndjson" | "jsonl" => Some((Format::Json, true)),
        "xml" => Some((Format::Xml, false)),
        "csv" => Some((Format::Csv, false)),
        "txt" | "text" => Some((Format::Text, false)),
        "bin" => Some((Format::Raw, false)),
        _ => None,
    }
}

/// Writes `path` so that it appears whole: a hidden temporary file beside it,
/// renamed into place.
pub fn write_whole(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

/// The subject of a spool file in the audit: the producer's file name,
/// escaped and capped.
fn subject_of(dirs: &Opened, name: &OsStr) -> String {
    format!(
        "spool:{}",
        gateway_core::refusals::peer_text(&dirs.inbox.path().join(name).display().to_string())
    )
}

/// Moves a refused entry to `failed/` with `NAME.reason`, audited; an entry
/// that cannot be moved stays and is audited once.
fn refuse(
    ctx: &Ctx,
    channel: &Channel,
    dirs: &Opened,
    name: &OsStr,
    reason: &str,
    stuck: &mut HashSet<(String, OsString)>,
) {
    let subject = subject_of(dirs, name);
    match dirs.inbox.move_to(name, &dirs.failed) {
        Ok(to) => {
            let mut why = to.clone();
            why.push(".reason");
            if let Err(error) = dirs
                .failed
                .write_new(&why, format!("{reason}\n").as_bytes())
            {
                warn!(file = %to.to_string_lossy(), %error, "Cannot write the .reason file");
            }
            warn!(channel = %channel.name, file = %name.to_string_lossy(), %reason, "Spool entry refused, moved to failed/");
            ctx.refuse("channel.refuse", &subject, &channel.name, "spool", reason);
        }
        Err(error) => {
            if stuck.len() < MAX_REMEMBERED && stuck.insert((channel.name.clone(), name.to_owned()))
            {
                warn!(channel = %channel.name, file = %name.to_string_lossy(), %reason, %error, "Spool entry refused and left in in/ (it cannot be moved)");
                ctx.refuse(
                    "channel.refuse",
                    &subject,
                    &channel.name,
                    "spool",
                    &format!("{reason}; left in in/: {error}"),
                );
            }
        }
    }
}

/// Moves a refused file to `failed/` with its `.reason` beside it.
fn to_failed(dirs: &Opened, name: &str, file: &OsStr, reason: &str) {
    match dirs.inbox.move_to(file, &dirs.failed) {
        Ok(to) => {
            let mut why = to;
            why.push(".reason");
            let _ = dirs
                .failed
                .write_new(&why, format!("{reason}\n").as_bytes());
            warn!(channel = %name, file = %file.to_string_lossy(), %reason, "Spool file refused");
        }
        Err(error) => {
            warn!(file = %file.to_string_lossy(), %error, "Cannot move a refused spool file")
        }
    }
}

async fn take(
    ctx: &Ctx,
    (buffer, scanner): (&BufferHandle, Option<&dyn Scanner>),
    channel: &Channel,
    dirs: &Arc<Opened>,
    file: &OsStr,
    told: &mut HashSet<OsString>,
) {
    let name = &channel.name;
    let mut never = HashSet::new();
    let Some(source) = identity(&dirs.inbox, file) else {
        return;
    };
    // Committed before a crash, still here: move it on.
    if let Ok(Some((first, last))) = buffer.spooled(name, &source).await {
        if dirs.inbox.move_to(file, &dirs.done).is_ok() {
            info!(channel = %name, file = %file.to_string_lossy(), first, last, "Spool file was committed before a restart; moved to done/");
        }
        return;
    }
    let Some((format, batch)) = format_of(file) else {
        refuse(
            ctx,
            channel,
            dirs,
            file,
            "unknown format: name the file .json, .ndjson, .xml, .csv, .txt or .bin",
            &mut never,
        );
        return;
    };
    // Never read more than a record (or a batch of them) may be.
    let record_limit = channel
        .max_record_bytes
        .map_or(channel.max_bytes.0, |m| m.0);
    let limit = if batch {
        record_limit
            .saturating_add(1)
            .saturating_mul(MAX_BATCH_RECORDS)
            .min(channel.max_bytes.0)
    } else {
        record_limit
    };
    let read = {
        let (dirs, file) = (dirs.clone(), file.to_owned());
        tokio::time::timeout(
            READ_TIMEOUT,
            tokio::task::spawn_blocking(move || dirs.inbox.read_entry(&file, limit)),
        )
        .await
    };
    let body = match read {
        Ok(Ok(Ok(f))) => f.bytes,
        Ok(Ok(Err(ReadRefusal::Gone))) => return,
        Ok(Ok(Err(ReadRefusal::Io(error)))) => {
            warn!(file = %file.to_string_lossy(), %error, "Cannot read a spool file; will retry");
            return;
        }
        Ok(Ok(Err(refusal))) => {
            let reason = match refusal {
                ReadRefusal::TooLarge(_) => format!(
                    "larger than {limit} bytes, the most this channel takes in one file (max_record_bytes)"
                ),
                other => other.to_string(),
            };
            refuse(ctx, channel, dirs, file, &reason, &mut never);
            return;
        }
        Ok(Err(error)) => {
            warn!(file = %file.to_string_lossy(), %error, "Spool read failed; will retry");
            return;
        }
        Err(_) => {
            warn!(file = %file.to_string_lossy(), "A spool file took more than {} s to read; skipped, tried again later", READ_TIMEOUT.as_secs());
            return;
        }
    };
    let items = split_records(&body, batch);
    if items.is_empty() {
        refuse(
            ctx,
            channel,
            dirs,
            file,
            "the file holds no record",
            &mut never,
        );
        return;
    }
    // The file name is the producer's: escaped and capped before it is audited.
    let subject = subject_of(dirs, file);
    if let Err(r) = check_records(ctx, &subject, name, format, &items, batch) {
        // check_records audited the refusal.
        to_failed(dirs, name, file, &format!("[{}] {}", r.rule, r.reason));
        return;
    }
    // A spool file has no address behind it: alarmed about, never banned.
    let target = format!("spool channel {name}");
    let who = Report::no_address(Direction::Outbound, &target);
    let scanned = match scan_records(ctx, scanner, (&subject, name), &items, &who).await {
        Ok(v) => v,
        Err(r) if matches!(r.verdict, Verdict::Unavailable(_)) => {
            // Not the file's fault: it waits in in/ for the scanner.
            if told.insert(file.to_owned()) {
                warn!(channel = %name, file = %file.to_string_lossy(), reason = %r.reason, "Spool file waits in in/ until the malware scanner answers");
            }
            return;
        }
        Err(r) => {
            // scan_records audited the refusal.
            let rule = if matches!(r.verdict, Verdict::Found(_)) {
                "[D6.malware] "
            } else {
                ""
            };
            to_failed(dirs, name, file, &format!("{rule}{}", r.reason));
            return;
        }
    };
    let records: Vec<NewRecord> = items
        .iter()
        .map(|b| NewRecord {
            format: format.as_str().to_owned(),
            body: b.to_vec(),
        })
        .collect();
    let count = records.len();
    match buffer
        .append_from(
            name,
            records,
            channel.max_bytes.0,
            buffer_when_full(channel.when_full),
            Some(source),
        )
        .await
    {
        Ok(a) => {
            if let Some((from, to)) = a.dropped {
                ctx.audit.record(
                    &subject,
                    name,
                    "channel.drop",
                    "ok",
                    "",
                    format!("quota: dropped records {from}..={to}"),
                );
            }
            ctx.audit.record(
                &subject,
                name,
                "channel.accept",
                "ok",
                "",
                format!(
                    "seq {}-{}, {count} records, {} bytes, sha256={}{}",
                    a.first,
                    a.last,
                    body.len(),
                    super::ingest::sha256_hex(&body),
                    scanned
                        .as_ref()
                        .map(|v| format!(", scanned clean by {v}"))
                        .unwrap_or_default()
                ),
            );
            told.remove(file);
            match dirs.inbox.move_to(file, &dirs.done) {
                Ok(to) => {
                    info!(channel = %name, file = %to.to_string_lossy(), first = a.first, last = a.last, "Spool file committed")
                }
                Err(error) => {
                    warn!(file = %file.to_string_lossy(), %error, "Committed, but cannot move to done/ (it will not be committed again)")
                }
            }
        }
        // Full: the file waits in in/ for room.
        Err(reason) => {
            if told.insert(file.to_owned()) {
                warn!(channel = %name, file = %file.to_string_lossy(), %reason, "Spool file waits in in/ until it can be committed");
            }
        }
    }
}
