//! A root slot: a partition (or, in tests, a file standing in for one)
//! written chunk by chunk at its offset, each write synced before the chunk
//! is marked, and read back by chunk.

use std::fs::{File, OpenOptions};
use std::io::{Seek as _, SeekFrom};
use std::os::unix::fs::{FileExt as _, FileTypeExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use gateway_core::firmware::CHUNK_BYTES;

// A slot is named by its partition's own device node (or the link the
// updater resolves itself), never reached through a link, and a FIFO put
// in its place is refused instead of waited on.
use crate::files::{O_NOFOLLOW, O_NONBLOCK, blocking};

/// A slot could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The OS refused.
    #[error("slot {path}: {source}")]
    Io {
        /// The partition.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Neither a block device nor a regular file.
    #[error("slot {path}: not a block device or a regular file")]
    Kind {
        /// The path.
        path: PathBuf,
    },
    /// Too small for the image.
    #[error("slot {path}: {len} bytes, the image needs {need}")]
    TooSmall {
        /// The partition.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The image's.
        need: u64,
    },
}

/// An open slot.
pub struct Slot {
    file: File,
    path: PathBuf,
    len: u64,
}

fn offset(i: usize) -> u64 {
    CHUNK_BYTES * i as u64
}

impl Slot {
    /// Opens the slot at `path` for writing an image of `need` bytes.
    ///
    /// # Errors
    /// A link, another kind of file, one smaller than `need`, an OS error.
    pub fn open_write(path: &Path, need: u64) -> Result<Self, SlotError> {
        let slot = Self::open(path, true)?;
        if slot.len < need {
            return Err(SlotError::TooSmall {
                path: path.to_owned(),
                len: slot.len,
                need,
            });
        }
        Ok(slot)
    }

    /// Opens the slot at `path` for reading.
    ///
    /// # Errors
    /// A link, another kind of file, an OS error.
    pub fn open_read(path: &Path) -> Result<Self, SlotError> {
        Self::open(path, false)
    }

    fn open(path: &Path, write: bool) -> Result<Self, SlotError> {
        let io = |source| SlotError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(O_NOFOLLOW | O_NONBLOCK)
            .open(path)
            .map_err(io)?;
        let kind = file.metadata().map_err(io)?.file_type();
        if !kind.is_block_device() && !kind.is_file() {
            return Err(SlotError::Kind {
                path: path.to_owned(),
            });
        }
        blocking(&file).map_err(io)?;
        // A block device's size is where a seek to its end lands.
        let len = file.seek(SeekFrom::End(0)).map_err(io)?;
        Ok(Slot {
            file,
            path: path.to_owned(),
            len,
        })
    }

    /// The slot's size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes chunk `i` and syncs it to the disk.
    ///
    /// # Errors
    /// An OS error.
    pub fn write_chunk(&self, i: usize, bytes: &[u8]) -> Result<(), SlotError> {
        let io = |source| SlotError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all_at(bytes, offset(i)).map_err(io)?;
        self.file.sync_data().map_err(io)
    }

    /// Reads `len` bytes of chunk `i`; `None` past the slot's end.
    ///
    /// # Errors
    /// An OS error.
    pub fn read_chunk(&self, i: usize, len: u64) -> Result<Option<Vec<u8>>, SlotError> {
        if offset(i).saturating_add(len) > self.len {
            return Ok(None);
        }
        let mut buf = vec![0; usize::try_from(len).unwrap_or(0)];
        self.file
            .read_exact_at(&mut buf, offset(i))
            .map_err(|source| SlotError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(Some(buf))
    }

    /// The SHA-256 (hex) of each whole chunk of the slot, the first `max`
    /// at most: what the running slot holds, so the chunks a new image
    /// shares with it are copied instead of fetched.
    ///
    /// # Errors
    /// An OS error.
    pub fn chunk_hashes(&self, max: usize) -> Result<Vec<String>, SlotError> {
        let whole = usize::try_from(self.len / CHUNK_BYTES).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        for i in 0..whole.min(max) {
            let Some(bytes) = self.read_chunk(i, CHUNK_BYTES)? else {
                break;
            };
            out.push(gateway_core::hex::encode(
                ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref(),
            ));
        }
        Ok(out)
    }
}
