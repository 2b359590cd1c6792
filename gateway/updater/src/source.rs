//! Where an update's bytes come from, to the updater: the signed manifest
//! of an offer, and its chunks and boot files from a bundle on disk or from
//! the hub. Nothing from a source is trusted: the manifest's signature is
//! checked, and every chunk and boot file against the manifest.

/// A bundle's signed manifest, as read (not yet checked).
pub struct Signed {
    /// `manifest.json`'s bytes.
    pub manifest: Vec<u8>,
    /// `manifest.json.minisig`'s text.
    pub signature: String,
}

/// A kernel or an initrd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootFile {
    /// The kernel.
    Linux,
    /// The initrd.
    Initrd,
}

impl BootFile {
    /// Its file name in a bundle and on the ESP.
    pub fn name(self) -> &'static str {
        match self {
            BootFile::Linux => "linux",
            BootFile::Initrd => "initrd",
        }
    }
}

/// A chunk or boot file could not be had (the link dropped, the bundle is
/// short); the update resumes when it can be.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// Where the bytes of a version come from: a bundle on disk, or the hub.
pub trait ChunkSource {
    /// Chunk `i` of the root image.
    ///
    /// # Errors
    /// When it cannot be had now.
    fn chunk(&mut self, i: usize) -> Result<Vec<u8>, SourceError>;
    /// The kernel or the initrd, as a stream (it is hashed as it is
    /// written to the ESP, and put in place only if it matches).
    ///
    /// # Errors
    /// When it cannot be had now.
    fn boot_file(&mut self, file: BootFile) -> Result<Box<dyn std::io::Read + '_>, SourceError>;
}
