//! `gatewayctl firmware`: uploading a bundle (as `image/build.sh` writes it)
//! to the hub's firmware store, listing what the store holds, and rolling a
//! version out in waves (watched, paused and aborted as every rollout, with
//! `gatewayctl rollout`).

use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Subcommand;
use gateway_core::firmware::{CHUNK_BYTES, MAX_MANIFEST_BYTES, Manifest};
use gateway_daemon::fleet::ops_client::OpsClient;
use serde_json::{Value, json};

use super::{BAD_DATA, Format, REFUSED, USAGE, ago, call, json as parse, read_bounded};

#[derive(Debug, Subcommand)]
pub enum FirmwareCommand {
    /// Upload a bundle (manifest.json, its .minisig, linux, initrd and
    /// chunks/): the hub checks the signature against [hub] firmware_keys,
    /// each chunk against the manifest, and the kernel and initrd whole; an
    /// upload cut short resumes when run again (system administrator).
    Upload {
        /// The bundle's directory.
        bundle: PathBuf,
    },
    /// The versions in the hub's store, newest first.
    List {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Offer a version to the boxes a selector picks, in waves: a box counts
    /// once it runs the version past its trial; a rollback, a refusal by its
    /// updater or a box silent for twice the trial time is a failure, and
    /// the rollout pauses by itself past --max-failures (system
    /// administrator). `gatewayctl rollout status ID` shows it.
    Rollout {
        /// The version (as firmware list shows it; complete in the store).
        version: String,
        /// Which boxes (as devices list --selector; revoked ones never).
        #[arg(long, short = 'l', default_value = "")]
        selector: String,
        /// Cumulative shares or counts of the boxes reached by the end of
        /// each wave; the last must be 100%.
        #[arg(long, default_value = "1%,10%,50%,100%")]
        waves: String,
        /// Every wave holds at least this many boxes.
        #[arg(long, default_value_t = 1)]
        min_wave: usize,
        /// Failures allowed before the rollout pauses by itself: a share
        /// (2%) or a count (3).
        #[arg(long, default_value = "0")]
        max_failures: String,
        /// The boxes' `[update] trial`: a box not heard from for twice this
        /// since its offer is silent.
        #[arg(long, default_value = "15m")]
        trial: String,
        /// At least this long between waves (none by default: a wave ends
        /// when each of its boxes has its verdict).
        #[arg(long)]
        soak: Option<String>,
        /// Check only; start nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

pub async fn firmware(client: &OpsClient, command: FirmwareCommand) -> Result<(), u8> {
    match command {
        FirmwareCommand::Upload { bundle } => upload(client, &bundle).await,
        FirmwareCommand::Rollout {
            version,
            selector,
            waves,
            min_wave,
            max_failures,
            trial,
            soak,
            dry_run,
        } => {
            let body = json!({
                "firmware": version, "selector": selector, "waves": waves,
                "min_wave": min_wave, "max_failures": max_failures, "trial": trial,
                "soak": soak, "dry_run": dry_run,
            })
            .to_string();
            super::province::start(client, &body, dry_run, |v, sizes| {
                format!(
                    "firmware {version} for {} box(es) in {} wave(s) of {} ({} failure(s) allowed, trial {} s)",
                    v["devices"],
                    sizes.len(),
                    sizes.join(", "),
                    v["max_failures"],
                    v["trial_ms"].as_u64().unwrap_or(0) / 1000,
                )
            })
            .await
        }
        FirmwareCommand::List { format } => {
            let (_, b) = call(client, "GET", "/v1/firmware", None).await?;
            let v = parse(&b);
            match format {
                Format::Json => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
                }
                Format::Text => {
                    println!(
                        "{:<12} {:>8} {:>13} {:<10} {:<16} uploaded",
                        "version", "security", "parts", "state", "by"
                    );
                    for r in v["firmware"].as_array().into_iter().flatten() {
                        let state = if r["complete"].as_bool() == Some(true) {
                            "complete"
                        } else {
                            "partial"
                        };
                        println!(
                            "{:<12} {:>8} {:>13} {:<10} {:<16} {}",
                            r["version"].as_str().unwrap_or(""),
                            r["security_version"],
                            format!("{}/{}", r["stored"], r["parts"]),
                            state,
                            r["by"].as_str().unwrap_or(""),
                            ago(&r["at_ms"]),
                        );
                    }
                }
            }
            Ok(())
        }
    }
}

fn open(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(f)
}

/// Reads at most one chunk of `path` from `offset`.
fn read_part(path: &Path, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut f = open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut out = Vec::new();
    f.take(CHUNK_BYTES + 1).read_to_end(&mut out)?;
    if out.len() as u64 > CHUNK_BYTES {
        out.truncate(CHUNK_BYTES as usize);
    }
    Ok(out)
}

/// The bytes of a part the hub named (`root/000012`, `linux/000000`).
fn part_bytes(bundle: &Path, name: &str) -> Result<Vec<u8>, String> {
    let (file, n) = name
        .split_once('/')
        .and_then(|(f, n)| Some((f, n.parse::<u64>().ok()?)))
        .ok_or_else(|| format!("the hub asked for {name:?}, not a part's name"))?;
    let (path, offset) = match file {
        "root" => (bundle.join("chunks").join(format!("{n:06}")), 0),
        "linux" | "initrd" => (
            bundle.join(file),
            n.checked_mul(CHUNK_BYTES).ok_or("part number too large")?,
        ),
        _ => return Err(format!("the hub asked for {name:?}, not a part's name")),
    };
    read_part(&path, offset).map_err(|e| format!("{}: {e}", path.display()))
}

fn length(path: &Path) -> Result<u64, String> {
    open(path)
        .and_then(|f| f.metadata())
        .map(|m| m.len())
        .map_err(|e| format!("{}: {e}", path.display()))
}

async fn upload(client: &OpsClient, bundle: &Path) -> Result<(), u8> {
    let usage = |e: String| {
        eprintln!("error: {e}");
        eprintln!(
            "  hint: give the directory image/build.sh wrote (manifest.json, manifest.json.minisig, linux, initrd, chunks/)"
        );
        USAGE
    };
    let manifest = read_bounded(&bundle.join("manifest.json"), MAX_MANIFEST_BYTES as u64)
        .map_err(|e| usage(format!("{}: {e}", bundle.join("manifest.json").display())))?;
    let sig_path = bundle.join("manifest.json.minisig");
    let signature =
        read_bounded(&sig_path, 4096).map_err(|e| usage(format!("{}: {e}", sig_path.display())))?;
    let m: Manifest = serde_json::from_str(&manifest).map_err(|e| {
        eprintln!("error: {}: {e}", bundle.join("manifest.json").display());
        BAD_DATA
    })?;
    let linux_bytes = length(&bundle.join("linux")).map_err(usage)?;
    let initrd_bytes = length(&bundle.join("initrd")).map_err(usage)?;
    let body = json!({
        "manifest": manifest,
        "signature": signature,
        "linux_bytes": linux_bytes,
        "initrd_bytes": initrd_bytes,
    });
    let (_, b) = call(
        client,
        "POST",
        "/v1/firmware",
        Some(("application/json", body.to_string().as_bytes())),
    )
    .await?;
    let v = parse(&b);
    let parts = v["parts"].as_u64().unwrap_or(0);
    let missing: Vec<String> = v["missing"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    let version = &m.version;
    eprintln!(
        "firmware {version}: signature accepted; {} of {parts} parts to send",
        missing.len()
    );
    let mut last = v;
    let mut shown = Instant::now();
    for (i, name) in missing.iter().enumerate() {
        let bytes = part_bytes(bundle, name).map_err(|e| {
            eprintln!("error: {e}");
            BAD_DATA
        })?;
        let (_, b) = call(
            client,
            "PUT",
            &format!("/v1/firmware/{version}/parts/{name}"),
            Some(("application/octet-stream", &bytes)),
        )
        .await
        .inspect_err(|_| {
            eprintln!(
                "  the upload stopped at {name}; what the hub stored is kept: run the same command again to resume"
            );
        })?;
        last = parse(&b);
        if shown.elapsed() >= Duration::from_secs(2) || i + 1 == missing.len() {
            eprintln!(
                "firmware {version}: {} of {parts} parts stored",
                last["stored"]
            );
            shown = Instant::now();
        }
    }
    if last["complete"].as_bool() != Some(true) {
        eprintln!(
            "error: firmware {version}: the hub holds {} of {parts} parts and does not call it complete; run the same command again",
            last["stored"]
        );
        return Err(REFUSED);
    }
    println!(
        "firmware {version} (security_version {}) is complete on the hub: {parts} parts",
        m.security_version
    );
    Ok(())
}
