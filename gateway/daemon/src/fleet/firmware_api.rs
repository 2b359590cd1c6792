//! The hub's firmware store, for `gatewayctl firmware`: a version is
//! uploaded as its signed manifest, then its parts (the root image's 1 MiB
//! chunks, the kernel and the initrd in 1 MiB parts). The hub checks the
//! signature against `[hub].firmware_keys` before it stores anything, each
//! root chunk against the manifest's hash before it stores it, and the
//! kernel and initrd whole once their last part is in. The store is the
//! registry's, so every hub on it serves what any of them received.
//!
//! | route | action |
//! |---|---|
//! | `POST /v1/firmware` `{"manifest", "signature", "linux_bytes", "initrd_bytes"}` | firmware upload (system) |
//! | `PUT /v1/firmware/{version}/parts/{root\|linux\|initrd}/{n}` (the bytes) | firmware upload (system) |
//! | `GET /v1/firmware` | devices read (system, security) |
//!
//! The audit records an upload begun or resumed, completed, and every
//! refusal (a bad signature, a part that does not match); not each part.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{post, put};
use gateway_core::firmware::{self, CHUNK_BYTES, Manifest, PublicKey};
use gateway_core::fleet::Action;
use gateway_store::registry::{FirmwarePart, FirmwareRow, NewFirmware, RegistryError};
use serde::Deserialize;
use serde_json::json;
use tracing::info;

use super::hub::Fleet;
use super::ops_api::{
    Answer, ApiError, Caller, audit_ok, authorize, internal, parse_json, refuse_for,
};
use crate::node::clock::now_ms;

/// The largest kernel or initrd a hub stores (256 parts of 1 MiB).
pub const MAX_BOOT_BYTES: u64 = 256 * CHUNK_BYTES;

const EVENT: &str = "firmware.upload";

/// The routes.
pub fn routes() -> Router<Arc<Fleet>> {
    Router::new()
        .route("/v1/firmware", post(upload).get(list))
        .route("/v1/firmware/{version}/parts/{file}/{n}", put(part))
}

/// The three files of a version, as parts are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum File {
    Root,
    Linux,
    Initrd,
}

impl File {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "root" => Some(File::Root),
            "linux" => Some(File::Linux),
            "initrd" => Some(File::Initrd),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            File::Root => "root",
            File::Linux => "linux",
            File::Initrd => "initrd",
        }
    }
}

fn part_name(file: File, n: u64) -> String {
    format!("{}/{n:06}", file.name())
}

/// Every part a version is to have, in upload order.
fn expected(chunks: usize, boot_parts: [u64; 2]) -> Vec<String> {
    let root = (0..chunks as u64).map(|n| part_name(File::Root, n));
    let linux = (0..boot_parts[0]).map(|n| part_name(File::Linux, n));
    let initrd = (0..boot_parts[1]).map(|n| part_name(File::Initrd, n));
    root.chain(linux).chain(initrd).collect()
}

/// A refusal of an upload: audited (`admin.firmware.upload`, deny, rule
/// `firmware`) and answered with `status`.
fn refuse(fleet: &Fleet, by: &str, object: &str, status: StatusCode, message: String) -> ApiError {
    refuse_for(fleet, (by, object, EVENT), "firmware", status, message)
}

fn row_json(r: &FirmwareRow) -> serde_json::Value {
    json!({
        "version": r.version,
        "security_version": r.security_version,
        "parts": r.parts,
        "stored": r.stored,
        "complete": r.complete,
        "by": r.by,
        "at_ms": r.at_ms,
    })
}

/// `POST /v1/firmware`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadReq {
    /// `manifest.json`'s text, as signed.
    manifest: String,
    /// `manifest.json.minisig`'s text.
    signature: String,
    /// The kernel's length.
    linux_bytes: u64,
    /// The initrd's length.
    initrd_bytes: u64,
}

fn boot_parts(file: File, bytes: u64) -> Result<u64, String> {
    if bytes == 0 || bytes > MAX_BOOT_BYTES {
        return Err(format!(
            "{}_bytes: {bytes}; a {} is 1 to {MAX_BOOT_BYTES} bytes",
            file.name(),
            if file == File::Linux {
                "kernel"
            } else {
                "initrd"
            }
        ));
    }
    Ok(bytes.div_ceil(CHUNK_BYTES))
}

async fn upload(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Answer {
    let (by, _) = authorize(
        &fleet,
        &caller,
        Action::FirmwareUpload,
        EVENT,
        "upload firmware",
        "firmware",
    )
    .await?;
    let req: UploadReq = parse_json(&body)?;
    let keys: &[PublicKey] = fleet.firmware_keys();
    if keys.is_empty() {
        return Err(refuse(
            &fleet,
            &by,
            "firmware",
            StatusCode::CONFLICT,
            "this hub trusts no firmware signing key: set [hub] firmware_keys to the minisign public keys bundles are signed with, and restart it".into(),
        ));
    }
    let m = firmware::verify(req.manifest.as_bytes(), &req.signature, keys).map_err(|e| {
        refuse(
            &fleet,
            &by,
            "firmware",
            StatusCode::BAD_REQUEST,
            format!("the bundle is refused: {e}"),
        )
    })?;
    let linux = boot_parts(File::Linux, req.linux_bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let initrd = boot_parts(File::Initrd, req.initrd_bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let want = expected(m.chunk_count(), [linux, initrd]);
    let new = NewFirmware {
        version: m.version.clone(),
        security_version: m.security_version,
        manifest: req.manifest,
        signature: req.signature,
        parts: want.len() as u64,
        boot_parts: [linux, initrd],
        by: by.clone(),
        now_ms: now_ms(),
    };
    let row = match fleet.registry().put_firmware(new).await {
        Ok(row) => row,
        Err(RegistryError::Refused(message)) => {
            return Err(refuse(
                &fleet,
                &by,
                &m.version,
                StatusCode::CONFLICT,
                message,
            ));
        }
        Err(e) => return Err(internal(e)),
    };
    let have = fleet
        .registry()
        .firmware_parts(m.version.clone())
        .await
        .map_err(internal)?;
    let have: std::collections::HashSet<String> = have.into_iter().collect();
    let mut missing: Vec<String> = want.into_iter().filter(|p| !have.contains(p)).collect();
    if missing.is_empty() && !row.complete {
        // Every part is in, but the kernel or initrd did not hash to the
        // manifest's when the last came: they are asked for again.
        missing = expected(0, row.boot_parts);
    }
    let how = if row.stored == 0 { "begun" } else { "resumed" };
    info!(version = %m.version, how, missing = missing.len(), "Firmware upload");
    audit_ok(
        &fleet,
        &by,
        EVENT,
        &m.version,
        format!(
            "{how}: security_version {}, {} of {} parts stored",
            m.security_version, row.stored, row.parts
        ),
    );
    let mut out = row_json(&row);
    out["missing"] = json!(missing);
    Ok(axum::Json(out).into_response())
}

/// Whether `bytes` is part `n` of a kernel or initrd of `parts` parts: every
/// part but the last is a whole chunk (the whole file is hashed at the end).
fn boot_part_ok(n: u64, parts: u64, bytes: &[u8]) -> Result<(), String> {
    let len = bytes.len() as u64;
    if n >= parts {
        return Err(format!("it has {parts} parts, numbered from 0"));
    }
    if n + 1 < parts && len != CHUNK_BYTES {
        return Err(format!(
            "{len} bytes; every part but the last is {CHUNK_BYTES}"
        ));
    }
    if len == 0 || len > CHUNK_BYTES {
        return Err(format!("{len} bytes; the last part is 1 to {CHUNK_BYTES}"));
    }
    Ok(())
}

async fn part(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Path((version, file, n)): Path<(String, String, u64)>,
    body: axum::body::Bytes,
) -> Answer {
    let (by, _) = authorize(
        &fleet,
        &caller,
        Action::FirmwareUpload,
        EVENT,
        "upload firmware",
        &version,
    )
    .await?;
    if firmware::version_numbers(&version).is_none() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "version: dotted numbers, as a manifest's (1.4.2)".into(),
        ));
    }
    let Some(file) = File::parse(&file) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "a part is of root, linux or initrd".into(),
        ));
    };
    let Some(stored) = fleet
        .registry()
        .firmware(version.clone())
        .await
        .map_err(internal)?
    else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no firmware {version} on this hub: upload its manifest first (gatewayctl firmware upload BUNDLE)"
            ),
        ));
    };
    if stored.row.complete {
        return Ok(axum::Json(row_json(&stored.row)).into_response());
    }
    // Checked when it was stored; read again, never trusted further than that.
    let m: Manifest = serde_json::from_str(&stored.manifest).map_err(internal)?;
    let name = part_name(file, n);
    let checked = match file {
        File::Root => usize::try_from(n)
            .ok()
            .filter(|&i| m.chunk_ok(i, &body))
            .map(|_| ())
            .ok_or_else(|| "its length or SHA-256 is not the manifest's".to_owned()),
        File::Linux => boot_part_ok(n, stored.row.boot_parts[0], &body),
        File::Initrd => boot_part_ok(n, stored.row.boot_parts[1], &body),
    };
    if let Err(why) = checked {
        return Err(refuse(
            &fleet,
            &by,
            &version,
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("firmware {version}, part {name}: {why}"),
        ));
    }
    fleet
        .registry()
        .put_firmware_part(FirmwarePart {
            version: version.clone(),
            name,
            bytes: body.to_vec(),
        })
        .await
        .map_err(internal)?;
    let have = fleet
        .registry()
        .firmware_parts(version.clone())
        .await
        .map_err(internal)?;
    let want = expected(m.chunk_count(), stored.row.boot_parts);
    let have: std::collections::HashSet<String> = have.into_iter().collect();
    let complete = want.iter().all(|w| have.contains(w));
    if complete {
        for (file, sha) in [
            (File::Linux, &m.kernel_sha256),
            (File::Initrd, &m.initrd_sha256),
        ] {
            let k = usize::from(file == File::Initrd);
            let got = whole_sha256(&fleet, &version, file, stored.row.boot_parts[k]).await?;
            if got != *sha {
                return Err(refuse(
                    &fleet,
                    &by,
                    &version,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "firmware {version}: its {} parts hash to {got}, not the manifest's {sha}; upload them again",
                        file.name()
                    ),
                ));
            }
        }
        fleet
            .registry()
            .firmware_complete(version.clone())
            .await
            .map_err(internal)?;
        info!(%version, "Firmware upload complete");
        audit_ok(
            &fleet,
            &by,
            EVENT,
            &version,
            format!(
                "completed: {} parts, security_version {}",
                want.len(),
                m.security_version
            ),
        );
    }
    let mut row = stored.row;
    row.stored = have.len() as u64;
    row.complete = complete;
    Ok(axum::Json(row_json(&row)).into_response())
}

/// The SHA-256 of a kernel or initrd, read part by part from the store.
async fn whole_sha256(
    fleet: &Fleet,
    version: &str,
    file: File,
    parts: u64,
) -> Result<String, ApiError> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for n in 0..parts {
        let bytes = fleet
            .registry()
            .firmware_part(version.to_owned(), part_name(file, n))
            .await
            .map_err(internal)?
            .unwrap_or_default();
        ctx.update(&bytes);
    }
    Ok(gateway_core::hex::encode(ctx.finish().as_ref()))
}

async fn list(State(fleet): State<Arc<Fleet>>, caller: Caller) -> Answer {
    let (by, _) = authorize(
        &fleet,
        &caller,
        Action::DevicesRead,
        "firmware.list",
        "list firmware",
        "firmware",
    )
    .await?;
    let rows = fleet.registry().firmwares().await.map_err(internal)?;
    audit_ok(
        &fleet,
        &by,
        "firmware.list",
        "firmware",
        format!("{} versions", rows.len()),
    );
    let rows: Vec<_> = rows.iter().map(row_json).collect();
    Ok(axum::Json(json!({ "firmware": rows })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_named_in_upload_order() {
        assert_eq!(
            expected(2, [1, 2]),
            [
                "root/000000",
                "root/000001",
                "linux/000000",
                "initrd/000000",
                "initrd/000001"
            ]
        );
    }

    #[test]
    fn a_boot_part_is_a_whole_chunk_but_the_last() {
        let whole = vec![0u8; CHUNK_BYTES as usize];
        assert!(boot_part_ok(0, 2, &whole).is_ok());
        assert!(boot_part_ok(1, 2, b"tail").is_ok());
        assert!(boot_part_ok(0, 2, b"short").is_err());
        assert!(boot_part_ok(2, 2, b"past the end").is_err());
        assert!(boot_part_ok(1, 2, b"").is_err());
        assert_eq!(boot_parts(File::Linux, 1), Ok(1));
        assert_eq!(boot_parts(File::Linux, CHUNK_BYTES + 1), Ok(2));
        assert!(boot_parts(File::Initrd, 0).is_err());
        assert!(boot_parts(File::Initrd, MAX_BOOT_BYTES + 1).is_err());
    }
}
