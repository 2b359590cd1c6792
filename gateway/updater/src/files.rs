//! Files the updater reads and writes: never through a link, read within a
//! bound, replaced atomically (a temporary file synced, renamed over, the
//! directory synced), so a power cut leaves the old file or the new one.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// `O_NOFOLLOW`: a link in place of the last component fails the open.
pub(crate) const O_NOFOLLOW: i32 = 0o400_000;
/// `O_NONBLOCK`: a FIFO in place of a file opens at once (and is then
/// refused as not a regular file) instead of hanging the updater.
pub(crate) const O_NONBLOCK: i32 = 0o4000;

/// Clears `O_NONBLOCK` once a file is open and known to be what it should.
pub(crate) fn blocking(file: &File) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(file, FcntlArg::F_GETFL)?);
    fcntl(file, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(())
}

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
    /// Not what it should be (a link, a FIFO, a device; a file where a
    /// directory should be).
    #[error("{path}: a link or another kind of file than the updater's own")]
    NotRegular {
        /// The file.
        path: PathBuf,
    },
    /// Another `gateway-updater` runs.
    #[error("{path}: another gateway-updater is running; try again once it ends")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Opens the regular file `path` for reading without following a link
/// (and without waiting on a FIFO put in its place).
///
/// # Errors
/// When it cannot be opened or is not a regular file.
pub fn open_read(path: &Path) -> Result<File, FileError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(O_NOFOLLOW | O_NONBLOCK)
        .open(path)
        .map_err(io(path))?;
    if !file.metadata().map_err(io(path))?.is_file() {
        return Err(FileError::NotRegular {
            path: path.to_owned(),
        });
    }
    blocking(&file).map_err(io(path))?;
    Ok(file)
}

/// Refuses a link (or anything but a directory) at `dir`: the updater's
/// directories on the ESP and the state disk are real ones (vfat has no
/// links; one there was put by somebody else).
///
/// # Errors
/// A link, a non-directory, an OS error.
pub fn real_dir(dir: &Path) -> Result<(), FileError> {
    let meta = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    if meta.is_dir() {
        Ok(())
    } else {
        Err(FileError::NotRegular {
            path: dir.to_owned(),
        })
    }
}

/// An exclusive lock on `dir/lock`, held while the value lives: one
/// updater at a time writes a slot and its state.
pub struct Lock {
    _held: nix::fcntl::Flock<File>,
}

/// Takes the lock of `dir`.
///
/// # Errors
/// Another updater holds it ([`FileError::Locked`]), or an OS error.
pub fn lock(dir: &Path) -> Result<Lock, FileError> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(O_NOFOLLOW | O_NONBLOCK)
        .open(&path)
        .map_err(io(&path))?;
    if !file.metadata().map_err(io(&path))?.is_file() {
        return Err(FileError::NotRegular { path });
    }
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Lock { _held: l }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(FileError::Locked { path }),
        Err((_, e)) => Err(FileError::Io {
            path,
            source: e.into(),
        }),
    }
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
    replace_mode(dir, name, bytes, 0o600)
}

/// As [`replace`], but the file is readable by everyone (0644, whatever the
/// umask): what the updater publishes for gatewayd.
///
/// # Errors
/// An OS error.
pub fn replace_public(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), FileError> {
    replace_mode(dir, name, bytes, 0o644)
}

fn replace_mode(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(O_NOFOLLOW)
        .open(&tmp)
        .map_err(io(&tmp))?;
    // Whatever the umask.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
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
