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
//! Exactly once: the file's identity (name, size, modification time) is
//! committed in the same transaction as its records, so a file still in `in/`
//! after a crash between the commit and the move is moved on, not committed
//! twice.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gateway_core::config::{Channel, Format};
use gateway_store::buffer::NewRecord;
use tracing::{info, warn};

use super::buffer::BufferHandle;
use super::check::{buffer_when_full, check_records, split_records};
use crate::node::Ctx;

/// How often `in/` directories are scanned.
pub const SCAN_EVERY: Duration = Duration::from_millis(200);

/// The spool directories of `channel` under `state_dir`.
pub fn dirs(state_dir: &Path, channel: &str) -> [PathBuf; 3] {
    let base = state_dir.join("spool").join(channel);
    [base.join("in"), base.join("done"), base.join("failed")]
}

/// Scans every channel's `in/` until draining.
pub async fn run(ctx: Arc<Ctx>, buffer: BufferHandle, state_dir: PathBuf) {
    let mut tick = tokio::time::interval(SCAN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut made: Vec<String> = Vec::new();
    // Files already reported as waiting for room (reported once).
    let mut told: HashSet<PathBuf> = HashSet::new();
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
        let channels: Vec<Channel> = ctx
            .policy()
            .config()
            .edge()
            .map(|e| e.channels.clone())
            .unwrap_or_default();
        for c in &channels {
            let [inbox, done, failed] = dirs(&state_dir, &c.name);
            if !made.contains(&c.name) {
                for d in [&inbox, &done, &failed] {
                    if let Err(error) = std::fs::create_dir_all(d) {
                        warn!(dir = %d.display(), %error, "Cannot create the spool directory");
                    }
                }
                made.push(c.name.clone());
            }
            let files = waiting(&inbox);
            if forget_due {
                // A committed file's identity is kept while the file is in
                // in/ (the crash window) or done/ (moved back by hand, it is
                // still not committed twice); once removed from done/, it goes.
                let present = files
                    .iter()
                    .chain(all_files(&done).iter())
                    .filter_map(|f| identity(f))
                    .collect();
                if let Err(error) = buffer.forget_spooled(&c.name, present).await {
                    warn!(channel = %c.name, %error, "Cannot forget removed spool files");
                }
            }
            for file in files {
                if ctx.draining.is_cancelled() {
                    return;
                }
                take(&ctx, &buffer, c, &file, [&done, &failed], &mut told).await;
            }
        }
    }
}

/// How often identities of spool files removed from `done/` are forgotten
/// (`done/` is listed then).
const FORGET_EVERY: Duration = Duration::from_secs(600);

/// Every file in `dir`.
fn all_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Complete files in `in/`, oldest first.
fn waiting(inbox: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(inbox) else {
        return Vec::new();
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            m.is_file()
                .then(|| (m.modified().unwrap_or(std::time::UNIX_EPOCH), e.path()))
        })
        .collect();
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}

/// A spool file's identity: name, size and modification time.
fn identity(file: &Path) -> Option<String> {
    let meta = std::fs::metadata(file).ok()?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Some(format!(
        "{}:{}:{mtime}",
        file.file_name().unwrap_or_default().to_string_lossy(),
        meta.len()
    ))
}

fn format_of(path: &Path) -> Option<(Format, bool)> {
    match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "json" => Some((Format::Json, false)),
        "ndjson" | "jsonl" => Some((Format::Json, true)),
        "xml" => Some((Format::Xml, false)),
        "csv" => Some((Format::Csv, false)),
        "txt" | "text" => Some((Format::Text, false)),
        "bin" => Some((Format::Raw, false)),
        _ => None,
    }
}

/// Moves `file` into `dir`, keeping its name unless taken (then NAME.N).
fn move_into(file: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    let name = file.file_name().unwrap_or_default();
    let mut to = dir.join(name);
    let mut n = 1;
    while to.exists() {
        to = dir.join(format!("{}.{n}", name.to_string_lossy()));
        n += 1;
    }
    std::fs::rename(file, &to)?;
    Ok(to)
}

/// Writes `path` so that it appears whole: a hidden temporary file beside it,
/// renamed into place.
pub fn write_whole(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

fn fail(file: &Path, failed: &Path, reason: &str) {
    match move_into(file, failed) {
        Ok(to) => {
            let mut why = to.clone().into_os_string();
            why.push(".reason");
            if let Err(error) =
                write_whole(std::path::Path::new(&why), format!("{reason}\n").as_bytes())
            {
                warn!(file = %to.display(), %error, "Cannot write the .reason file");
            }
            warn!(file = %to.display(), %reason, "Spool file refused");
        }
        Err(error) => warn!(file = %file.display(), %error, "Cannot move a refused spool file"),
    }
}

async fn take(
    ctx: &Ctx,
    buffer: &BufferHandle,
    channel: &Channel,
    file: &Path,
    [done, failed]: [&Path; 2],
    told: &mut HashSet<PathBuf>,
) {
    let name = &channel.name;
    let Some(source) = identity(file) else {
        return;
    };
    // Committed before a crash, still here: move it on.
    if let Ok(Some((first, last))) = buffer.spooled(name, &source).await {
        if move_into(file, done).is_ok() {
            info!(channel = %name, file = %file.display(), first, last, "Spool file was committed before a restart; moved to done/");
        }
        return;
    }
    let Some((format, batch)) = format_of(file) else {
        fail(
            file,
            failed,
            "unknown format: name the file .json, .ndjson, .xml, .csv or .txt",
        );
        return;
    };
    let body = match std::fs::read(file) {
        Ok(b) => b,
        Err(error) => {
            warn!(file = %file.display(), %error, "Cannot read a spool file; will retry");
            return;
        }
    };
    let items = split_records(&body, batch);
    if items.is_empty() {
        fail(file, failed, "the file holds no record");
        return;
    }
    // The file name is the producer's: escaped and capped before it is audited.
    let subject = format!(
        "spool:{}",
        gateway_core::refusals::peer_text(&file.display().to_string())
    );
    if let Err(r) = check_records(ctx, &subject, name, format, &items, batch) {
        fail(file, failed, &format!("[{}] {}", r.rule, r.reason));
        return;
    }
    let records: Vec<NewRecord> = items
        .iter()
        .map(|b| NewRecord {
            format: format.as_str().to_owned(),
            body: b.to_vec(),
        })
        .collect();
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
            told.remove(file);
            match move_into(file, done) {
                Ok(to) => {
                    info!(channel = %name, file = %to.display(), first = a.first, last = a.last, "Spool file committed")
                }
                Err(error) => {
                    warn!(file = %file.display(), %error, "Committed, but cannot move to done/ (it will not be committed again)")
                }
            }
        }
        // Full: the file waits in in/ for room.
        Err(reason) => {
            if told.insert(file.to_owned()) {
                warn!(channel = %name, file = %file.display(), %reason, "Spool file waits in in/ until it can be committed");
            }
        }
    }
}
