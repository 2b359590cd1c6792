//! Firmware update bundles: the signed manifest a box checks before it
//! writes a byte of a new root image, and the rules that decide whether it
//! may install it.
//!
//! A bundle is `manifest.json` (version, a monotonic `security_version`, the
//! hardware it is for, the oldest version it updates from, the kernel's and
//! initrd's SHA-256, one SHA-256 per 1 MiB chunk of the root image),
//! `manifest.json.minisig` (ed25519 in minisign's format, so Debian's
//! `minisign -V` checks it too) and the chunks. A box trusts two public keys
//! (the current one and the next, so the signing key can rotate). A
//! signature never expires: nothing here reads a clock, and a box whose clock
//! is wrong still updates. A manifest below the box's recorded
//! `security_version` is refused, whatever its signature.

pub mod boot;
pub mod fetch;
pub mod minisign;
pub mod report;
pub mod update;

use serde::{Deserialize, Serialize};

pub use minisign::{PublicKey, Signature};

/// The largest manifest a box reads (1 MiB of chunk hashes is a root image
/// of about 15 GiB).
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;
/// The size of every chunk but the last.
pub const CHUNK_BYTES: u64 = 1 << 20;
/// The manifest format this code reads.
pub const FORMAT: &str = "gw-firmware-1";

/// What a bundle says it is, once its signature has been checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The version it installs (dotted numbers, `1.4.2`).
    pub version: String,
    /// Raised by every release that fixes a security flaw: a box never
    /// installs one below the highest it has run.
    pub security_version: u64,
    /// The hardware models it runs on (`qemu-x86_64`, `g2`).
    pub hardware: Vec<String>,
    /// The oldest version it may update (older ones need an intermediate).
    pub min_from_version: String,
    /// SHA-256 of the kernel, hex.
    pub kernel_sha256: String,
    /// SHA-256 of the initrd, hex.
    pub initrd_sha256: String,
    /// The root image's length in bytes.
    pub root_bytes: u64,
    /// SHA-256 of each [`CHUNK_BYTES`] chunk of the root image, hex, in order.
    pub chunks: Vec<String>,
}

/// What the box runs and has run, for [`Manifest::may_install`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The running version.
    pub version: String,
    /// The highest `security_version` the box has committed.
    pub security_version: u64,
    /// The box's hardware model.
    pub hardware: String,
}

/// Why a bundle is not installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The signature file does not parse, or no trusted key made it, or it
    /// does not match.
    #[error("signature: {0}")]
    Signature(#[from] minisign::Error),
    /// The manifest is not one this box reads.
    #[error("manifest: {0}")]
    Manifest(String),
    /// Signed, but for other hardware.
    #[error("version {version} is for {hardware:?}, not this box's {box_model}")]
    Hardware {
        /// The bundle's version.
        version: String,
        /// What it is for.
        hardware: Vec<String>,
        /// This box.
        box_model: String,
    },
    /// A downgrade below what the box has run.
    #[error(
        "version {version} has security_version {got}, below this box's {recorded}: a downgrade past a security fix is refused"
    )]
    Downgrade {
        /// The bundle's version.
        version: String,
        /// Its security version.
        got: u64,
        /// The box's.
        recorded: u64,
    },
    /// The running version is too old to update to this one directly.
    #[error(
        "version {version} updates from {min_from} on; this box runs {running}: install an intermediate version first"
    )]
    TooOld {
        /// The bundle's version.
        version: String,
        /// Its `min_from_version`.
        min_from: String,
        /// What the box runs.
        running: String,
    },
}

/// Checks a manifest's signature against the trusted keys (either), then
/// reads it. Never reads a clock.
///
/// # Errors
/// The signature or the manifest, as [`Refused`] says.
pub fn verify(
    manifest: &[u8],
    signature: &str,
    trusted: &[PublicKey],
) -> Result<Manifest, Refused> {
    if manifest.len() > MAX_MANIFEST_BYTES {
        return Err(Refused::Manifest(format!(
            "{} bytes; a manifest is at most {MAX_MANIFEST_BYTES}",
            manifest.len()
        )));
    }
    let sig = Signature::parse(signature)?;
    sig.verify(manifest, trusted)?;
    let m: Manifest =
        serde_json::from_slice(manifest).map_err(|e| Refused::Manifest(e.to_string()))?;
    m.checked()?;
    Ok(m)
}

/// A version's dotted numbers (`1.4.2` -> [1, 4, 2]); `None` when it is not
/// one: only `[0-9]+(.[0-9]+)*`, no leading zeros and no sign, so one
/// version has one spelling (`1.02` and `+1.2` are not `1.2`'s other names
/// on the ESP or in a manifest).
pub fn version_numbers(v: &str) -> Option<Vec<u64>> {
    if v.is_empty() || v.len() > 64 {
        return None;
    }
    v.split('.')
        .map(|p| {
            let digits = !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
            let canonical = p == "0" || !p.starts_with('0');
            if digits && canonical {
                p.parse().ok()
            } else {
                None
            }
        })
        .collect()
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Manifest {
    /// The fields hold together: format, versions, hashes, one hash per
    /// chunk of `root_bytes`.
    fn checked(&self) -> Result<(), Refused> {
        let bad = |m: String| Err(Refused::Manifest(m));
        if self.format != FORMAT {
            return bad(format!("format {:?}, this box reads {FORMAT}", self.format));
        }
        for (k, v) in [
            ("version", &self.version),
            ("min_from_version", &self.min_from_version),
        ] {
            if version_numbers(v).is_none() {
                return bad(format!("{k} {v:?} is not dotted numbers"));
            }
        }
        for (k, v) in [
            ("kernel_sha256", &self.kernel_sha256),
            ("initrd_sha256", &self.initrd_sha256),
        ] {
            if !is_sha256_hex(v) {
                return bad(format!("{k} is not 64 lower-case hex digits"));
            }
        }
        if self.hardware.is_empty() {
            return bad("hardware names no model".into());
        }
        let want = self.root_bytes.div_ceil(CHUNK_BYTES);
        if self.root_bytes == 0 || u64::try_from(self.chunks.len()).ok() != Some(want) {
            return bad(format!(
                "{} chunk hashes for a root image of {} bytes ({want} expected)",
                self.chunks.len(),
                self.root_bytes
            ));
        }
        if let Some(i) = self.chunks.iter().position(|c| !is_sha256_hex(c)) {
            return bad(format!("chunk {i}: not 64 lower-case hex digits"));
        }
        Ok(())
    }

    /// Whether a box running `installed` may install this version.
    ///
    /// # Errors
    /// Other hardware, a downgrade below the recorded security version, or
    /// a running version older than `min_from_version`.
    pub fn may_install(&self, installed: &Installed) -> Result<(), Refused> {
        if !self.hardware.contains(&installed.hardware) {
            return Err(Refused::Hardware {
                version: self.version.clone(),
                hardware: self.hardware.clone(),
                box_model: installed.hardware.clone(),
            });
        }
        if self.security_version < installed.security_version {
            return Err(Refused::Downgrade {
                version: self.version.clone(),
                got: self.security_version,
                recorded: installed.security_version,
            });
        }
        let older = match (
            version_numbers(&installed.version),
            version_numbers(&self.min_from_version),
        ) {
            (Some(running), Some(min)) => running < min,
            // A box that cannot say what it runs updates only from a bundle
            // that asks nothing of it.
            (None, Some(min)) => min.iter().any(|n| *n > 0),
            _ => true,
        };
        if older {
            return Err(Refused::TooOld {
                version: self.version.clone(),
                min_from: self.min_from_version.clone(),
                running: installed.version.clone(),
            });
        }
        Ok(())
    }

    /// How many chunks the root image has.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// The length of chunk `i` (the last may be short); `None` past the end.
    pub fn chunk_len(&self, i: usize) -> Option<u64> {
        let start = CHUNK_BYTES.checked_mul(u64::try_from(i).ok()?)?;
        (start < self.root_bytes).then(|| (self.root_bytes - start).min(CHUNK_BYTES))
    }

    /// Whether `bytes` is chunk `i` of this image: its length and its hash.
    pub fn chunk_ok(&self, i: usize, bytes: &[u8]) -> bool {
        let (Some(len), Some(want)) = (self.chunk_len(i), self.chunks.get(i)) else {
            return false;
        };
        u64::try_from(bytes.len()).ok() == Some(len)
            && crate::hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
                == *want
    }
}

#[cfg(test)]
mod tests;
