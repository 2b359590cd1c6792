//! Files the updater reads and writes: never through a link, read within a
//! bound, replaced atomically (a temporary file synced, renamed over, the
//! directory synced), so a power cut leaves the old file or the new one.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// `O_NOFOLLOW`: a link in place of the last component fails the open.
const O_NOFOLLOW: i32 = 0o400_000;

/// A file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The OS refused.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Longer than the updater reads.
    #[error("{path}: more than {limit} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The bound.
        limit: u64,
    },
    /// Not a regular file (a link, a device, a directory).
    #[error("{path}: not a regular file")]
    NotRegular {
        /// The file.
        path: PathBuf,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Opens `path` for reading without following a link.
///
/// # Errors
/// When it cannot be opened.
pub fn open_read(path: &Path) -> Result<File, FileError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(O_NOFOLLOW)
        .open(path)
        .map_err(io(path))
}

/// Reads the regular file `path` whole, at most `limit` bytes; `Ok(None)`
/// when there is none.
///
/// # Errors
/// A link, a non-regular file, one over `limit`, or an OS error.
pub fn read_limited(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, FileError> {
    let file = match open_read(path) {
        Ok(f) => f,
        Err(FileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata().map_err(io(path))?;
    if !meta.is_file() {
        return Err(FileError::NotRegular {
            path: path.to_owned(),
        });
    }
    if meta.len() > limit {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    if bytes.len() as u64 > limit {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(Some(bytes))
}

/// Replaces `dir/name` with `bytes`: a temporary file written and synced,
/// renamed over, the directory synced.
///
/// # Errors
/// An OS error (the old file, if any, is left as it was).
pub fn replace(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), FileError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(O_NOFOLLOW)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(dir)
}

/// Syncs a directory (a rename or removal in it is on the disk).
///
/// # Errors
/// An OS error.
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Creates `dir` (0700) and its parents if missing.
///
/// # Errors
/// An OS error.
pub fn ensure_dir(dir: &Path) -> Result<(), FileError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

use std::os::unix::fs::DirBuilderExt as _;
