//! An update bundle on disk, as `image/build.sh` writes it:
//!
//! ```text
//! BUNDLE/manifest.json           what it is (gateway_core::firmware::Manifest)
//! BUNDLE/manifest.json.minisig   its ed25519 signature, minisign's format
//! BUNDLE/linux, BUNDLE/initrd    the kernel and initrd
//! BUNDLE/chunks/000000 ...       the root image in 1 MiB chunks
//! ```
//!
//! Only the manifest is trusted, once its signature checks; every chunk and
//! boot file is checked against it before it is written anywhere.

use std::path::{Path, PathBuf};

use gateway_core::firmware::minisign::MAX_SIGNATURE_TEXT;
use gateway_core::firmware::{CHUNK_BYTES, MAX_MANIFEST_BYTES, PublicKey};

use crate::files::{self, FileError};
use crate::source::{BootFile, ChunkSource, Signed, SourceError};

/// A bundle could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A file of it.
    #[error(transparent)]
    File(#[from] FileError),
    /// A file it must have.
    #[error("{0}: missing (is this a bundle made by image/build.sh?)")]
    Missing(PathBuf),
    /// A key file.
    #[error("key {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn need(path: PathBuf, limit: u64) -> Result<Vec<u8>, BundleError> {
    files::read_limited(&path, limit)?.ok_or(BundleError::Missing(path))
}

/// Reads a bundle's manifest and signature.
///
/// # Errors
/// A missing or oversized file.
pub fn read_signed(dir: &Path) -> Result<Signed, BundleError> {
    let manifest = need(dir.join("manifest.json"), MAX_MANIFEST_BYTES as u64)?;
    let sig_path = dir.join("manifest.json.minisig");
    let signature =
        String::from_utf8(need(sig_path.clone(), MAX_SIGNATURE_TEXT as u64)?).map_err(|_| {
            BundleError::Key {
                path: sig_path,
                reason: "not UTF-8".into(),
            }
        })?;
    Ok(Signed {
        manifest,
        signature,
    })
}

/// Reads minisign public key files (the current key and the next).
///
/// # Errors
/// A file that cannot be read or is not a minisign public key.
pub fn read_keys(paths: &[PathBuf]) -> Result<Vec<PublicKey>, BundleError> {
    paths
        .iter()
        .map(|p| {
            let bytes = need(p.clone(), 4096)?;
            let text = String::from_utf8_lossy(&bytes);
            PublicKey::parse(&text).map_err(|e| BundleError::Key {
                path: p.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// A bundle directory as a source of chunks.
pub struct BundleSource {
    dir: PathBuf,
}

impl BundleSource {
    /// The bundle at `dir`.
    pub fn new(dir: &Path) -> Self {
        BundleSource {
            dir: dir.to_owned(),
        }
    }
}

fn source_error(e: BundleError) -> SourceError {
    SourceError(e.to_string())
}

impl ChunkSource for BundleSource {
    fn chunk(&mut self, i: usize) -> Result<Vec<u8>, SourceError> {
        need(self.dir.join("chunks").join(format!("{i:06}")), CHUNK_BYTES).map_err(source_error)
    }

    fn boot_file(&mut self, file: BootFile) -> Result<Box<dyn std::io::Read + '_>, SourceError> {
        let path = self.dir.join(file.name());
        match files::open_read(&path) {
            Ok(f) => Ok(Box::new(f)),
            Err(FileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Err(source_error(BundleError::Missing(path)))
            }
            Err(e) => Err(source_error(e.into())),
        }
    }
}
