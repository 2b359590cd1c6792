//! Directories that producers write into (spool `in/`), opened once and used
//! only through their descriptor: nothing a producer swaps in (a symlink, a
//! FIFO, a device, a directory in place of the directory) is followed or read.
//!
//! - [`SafeDir::open_child`] opens one path component with `O_DIRECTORY |
//!   O_NOFOLLOW` relative to a directory already open, creating it (0700) when
//!   missing, and refuses it unless it is a real directory owned by this
//!   process's user.
//! - [`SafeDir::read_entry`] takes a regular file by name: checked with
//!   `fstatat(AT_SYMLINK_NOFOLLOW)` before it is opened, opened with
//!   `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`, checked again with `fstat` on the
//!   descriptor (the same inode, a regular file, one link, a size within the
//!   limit), read from that descriptor, never more than the limit plus one
//!   byte, and checked once more afterwards (it did not grow).
//! - [`SafeDir::move_to`] renames between two open directories without
//!   replacing anything (`renameat2(RENAME_NOREPLACE)`): whatever the entry is,
//!   the rename moves the entry itself, never what a link points to.

use std::ffi::{OsStr, OsString};
use std::io::Read as _;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, RenameFlags};
use nix::sys::stat::{FileStat, Mode, SFlag};

/// A directory could not be opened as a safe one.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// A symlink where a directory must be.
    #[error(
        "{0} is a symbolic link, not a directory; replace it with a directory owned by the gateway's user"
    )]
    Symlink(PathBuf),
    /// Something else than a directory.
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    /// Owned by another user.
    #[error("{path} belongs to uid {owner}, not to the gateway's user (uid {me}); run: chown {me} {path}", path = .path.display())]
    NotOwned {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's user.
        me: u32,
    },
    /// The system refused.
    #[error("{0}: {1}")]
    Io(PathBuf, Errno),
}

/// What kind of entry a directory holds, as `lstat` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A directory.
    Directory,
    /// A FIFO, socket or device.
    Special,
}

/// Why a file was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadRefusal {
    /// It is not a regular file (a symlink, FIFO, device, socket, directory).
    NotRegular(&'static str),
    /// It has several hard links (it may be a file from elsewhere).
    Links(u64),
    /// Larger than the limit.
    TooLarge(u64),
    /// It changed while it was read.
    Changed,
    /// It is gone (taken or removed meanwhile).
    Gone,
    /// The system refused.
    Io(String),
}

impl std::fmt::Display for ReadRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadRefusal::NotRegular(what) => write!(f, "not a regular file but a {what}"),
            ReadRefusal::Links(n) => write!(
                f,
                "the file has {n} hard links; spool only files of their own"
            ),
            ReadRefusal::TooLarge(limit) => write!(f, "larger than {limit} bytes"),
            ReadRefusal::Changed => write!(f, "the file changed while it was read"),
            ReadRefusal::Gone => write!(f, "the file disappeared"),
            ReadRefusal::Io(e) => write!(f, "{e}"),
        }
    }
}

/// A file read from a [`SafeDir`]: its bytes and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadFile {
    /// The contents.
    pub bytes: Vec<u8>,
    /// Size when opened.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i128,
}

/// A directory opened once, used only through its descriptor.
#[derive(Debug)]
pub struct SafeDir {
    fd: OwnedFd,
    path: PathBuf,
}

fn kind_of(st: &FileStat) -> Kind {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => Kind::File,
        SFlag::S_IFLNK => Kind::Symlink,
        SFlag::S_IFDIR => Kind::Directory,
        _ => Kind::Special,
    }
}

fn kind_name(k: Kind, st: &FileStat) -> &'static str {
    match k {
        Kind::File => "regular file",
        Kind::Symlink => "symbolic link",
        Kind::Directory => "directory",
        Kind::Special => match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFIFO => "FIFO",
            SFlag::S_IFSOCK => "socket",
            SFlag::S_IFCHR => "character device",
            SFlag::S_IFBLK => "block device",
            _ => "special file",
        },
    }
}

impl SafeDir {
    /// Opens `path`, a directory the gateway owns (its state directory).
    ///
    /// # Errors
    /// When it is not a real directory owned by this process's user.
    pub fn open(path: &Path) -> Result<Self, DirError> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            if path.is_symlink() {
                DirError::Symlink(path.to_owned())
            } else {
                open_error(path, e)
            }
        })?;
        Self::checked(fd, path.to_owned())
    }

    /// Opens the directory `name` inside this one, creating it (mode 0700)
    /// when missing.
    ///
    /// # Errors
    /// When it is not a real directory owned by this process's user.
    pub fn open_child(&self, name: &str) -> Result<Self, DirError> {
        let path = self.path.join(name);
        match nix::sys::stat::mkdirat(self.fd.as_fd(), name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(DirError::Io(path, e)),
        }
        let fd = nix::fcntl::openat(
            self.fd.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            // O_DIRECTORY | O_NOFOLLOW on a symlink says ENOTDIR: tell them apart.
            let link = self
                .lstat(OsStr::new(name))
                .is_ok_and(|st| kind_of(&st) == Kind::Symlink);
            if link {
                DirError::Symlink(path.clone())
            } else {
                open_error(&path, e)
            }
        })?;
        Self::checked(fd, path)
    }

    fn checked(fd: OwnedFd, path: PathBuf) -> Result<Self, DirError> {
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| DirError::Io(path.clone(), e))?;
        if kind_of(&st) != Kind::Directory {
            return Err(DirError::NotADirectory(path));
        }
        let me = nix::unistd::geteuid().as_raw();
        if st.st_uid != me {
            return Err(DirError::NotOwned {
                path,
                owner: st.st_uid,
                me,
            });
        }
        Ok(SafeDir { fd, path })
    }

    /// Where it was opened (for messages; never used to reach it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its entries (not `.` and `..`), by name, with their kind as `lstat`
    /// sees it and their modification time (ns).
    ///
    /// # Errors
    /// When the directory cannot be read.
    pub fn entries(&self) -> Result<Vec<(OsString, Kind, i128)>, Errno> {
        let mut dir = nix::dir::Dir::openat(
            self.fd.as_fd(),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let mut out = Vec::new();
        for e in dir.iter() {
            let e = e?;
            let name = OsStr::from_bytes(e.file_name().to_bytes()).to_owned();
            if name == "." || name == ".." {
                continue;
            }
            match self.lstat(&name) {
                Ok(st) => out.push((name, kind_of(&st), mtime_ns(&st))),
                // Gone between the listing and the look.
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn lstat(&self, name: &OsStr) -> Result<FileStat, Errno> {
        nix::sys::stat::fstatat(
            self.fd.as_fd(),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
    }

    /// Reads the regular file `name`: at most `limit` bytes (see the module
    /// doc for the checks).
    ///
    /// # Errors
    /// [`ReadRefusal`] saying why it was not read.
    pub fn read_entry(&self, name: &OsStr, limit: u64) -> Result<ReadFile, ReadRefusal> {
        let io = |e: Errno| match e {
            Errno::ENOENT => ReadRefusal::Gone,
            Errno::ELOOP => ReadRefusal::NotRegular("symbolic link"),
            e => ReadRefusal::Io(e.desc().to_owned()),
        };
        let before = self.lstat(name).map_err(io)?;
        let kind = kind_of(&before);
        if kind != Kind::File {
            return Err(ReadRefusal::NotRegular(kind_name(kind, &before)));
        }
        let fd = nix::fcntl::openat(
            self.fd.as_fd(),
            name,
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io)?;
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(io)?;
        let kind = kind_of(&st);
        if kind != Kind::File || st.st_ino != before.st_ino || st.st_dev != before.st_dev {
            // Swapped between the look and the open.
            return Err(ReadRefusal::NotRegular(kind_name(kind, &st)));
        }
        if st.st_nlink != 1 {
            return Err(ReadRefusal::Links(st.st_nlink as u64));
        }
        let size = u64::try_from(st.st_size).unwrap_or(0);
        if size > limit {
            return Err(ReadRefusal::TooLarge(limit));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        let file = std::fs::File::from(fd);
        (&file)
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| ReadRefusal::Io(e.to_string()))?;
        if bytes.len() as u64 > limit {
            return Err(ReadRefusal::TooLarge(limit));
        }
        let after = nix::sys::stat::fstat(file.as_fd()).map_err(io)?;
        if bytes.len() as u64 != size
            || u64::try_from(after.st_size).unwrap_or(0) != size
            || mtime_ns(&after) != mtime_ns(&st)
        {
            return Err(ReadRefusal::Changed);
        }
        Ok(ReadFile {
            bytes,
            size,
            mtime_ns: mtime_ns(&st),
        })
    }

    /// Moves the entry `name` into `to`, keeping its name unless taken (then
    /// `NAME.N`); never replaces an entry there. Returns the new name.
    ///
    /// # Errors
    /// When the rename fails.
    pub fn move_to(&self, name: &OsStr, to: &SafeDir) -> Result<OsString, Errno> {
        let mut target = name.to_owned();
        for n in 1..1000 {
            match nix::fcntl::renameat2(
                self.fd.as_fd(),
                name,
                to.fd.as_fd(),
                target.as_os_str(),
                RenameFlags::RENAME_NOREPLACE,
            ) {
                Ok(()) => return Ok(target),
                Err(Errno::EEXIST) => {
                    let mut next = name.to_owned();
                    next.push(format!(".{n}"));
                    target = next;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Errno::EEXIST)
    }

    /// Writes a new file `name` here (mode 0600), refusing to replace or
    /// follow anything, and syncs it.
    ///
    /// # Errors
    /// When it exists or cannot be written.
    pub fn write_new(&self, name: &OsStr, contents: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        let fd = nix::fcntl::openat(
            self.fd.as_fd(),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        let mut f = std::fs::File::from(fd);
        f.write_all(contents)?;
        f.sync_all()
    }

    /// Renames the entry `name` to `to_name` in `to`, replacing what is there
    /// (a link there is replaced, never followed).
    ///
    /// # Errors
    /// When the rename fails.
    pub fn rename_over(&self, name: &OsStr, to: &SafeDir, to_name: &OsStr) -> Result<(), Errno> {
        nix::fcntl::renameat(self.fd.as_fd(), name, to.fd.as_fd(), to_name)
    }

    /// Writes `name` here so that it appears whole: a new hidden file (mode
    /// 0600, never following or replacing anything), synced, renamed over
    /// `name`.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn write_replace(&self, name: &OsStr, contents: &[u8]) -> std::io::Result<()> {
        let mut tmp = OsString::from(format!(".tmp.{:016x}.", rand::random::<u64>()));
        tmp.push(name);
        self.write_new(&tmp, contents)?;
        self.rename_over(&tmp, self, name)
            .map_err(std::io::Error::from)
    }

    /// Removes the entry `name` (not a directory).
    ///
    /// # Errors
    /// When it cannot be removed.
    pub fn remove(&self, name: &OsStr) -> Result<(), Errno> {
        nix::unistd::unlinkat(
            self.fd.as_fd(),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
    }

    /// Makes what was renamed in or out of the directory durable.
    ///
    /// # Errors
    /// When the sync fails.
    pub fn sync(&self) -> Result<(), Errno> {
        nix::unistd::fsync(self.fd.as_fd())
    }

    /// The identity of the regular file `name` (size, mtime), as `lstat`
    /// sees it; `None` if it is not one.
    pub fn file_identity(&self, name: &OsStr) -> Option<(u64, i128)> {
        let st = self.lstat(name).ok()?;
        (kind_of(&st) == Kind::File)
            .then(|| (u64::try_from(st.st_size).unwrap_or(0), mtime_ns(&st)))
    }
}

fn mtime_ns(st: &FileStat) -> i128 {
    i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec)
}

fn open_error(path: &Path, e: Errno) -> DirError {
    match e {
        Errno::ELOOP => DirError::Symlink(path.to_owned()),
        Errno::ENOTDIR => DirError::NotADirectory(path.to_owned()),
        e => DirError::Io(path.to_owned(), e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, SafeDir) {
        let t = tempfile::tempdir().expect("tempdir");
        let d = SafeDir::open(t.path()).expect("open");
        (t, d)
    }

    #[test]
    fn a_symlink_or_file_in_place_of_a_directory_is_refused() {
        let (t, d) = setup();
        std::os::unix::fs::symlink("/etc", t.path().join("in")).expect("symlink");
        assert!(matches!(d.open_child("in"), Err(DirError::Symlink(_))));
        std::fs::write(t.path().join("f"), b"x").expect("file");
        assert!(matches!(d.open_child("f"), Err(DirError::NotADirectory(_))));
        let made = d.open_child("new").expect("made");
        let mode = std::fs::metadata(made.path()).expect("meta");
        assert!(mode.is_dir());
    }

    #[test]
    fn only_regular_files_of_one_link_within_the_limit_are_read() {
        let (t, d) = setup();
        let p = |n: &str| t.path().join(n);
        std::fs::write(p("ok.json"), b"{}").expect("write");
        std::fs::write(p("secret"), b"key").expect("write");
        std::os::unix::fs::symlink(p("secret"), p("link.json")).expect("symlink");
        std::fs::hard_link(p("secret"), p("hard.json")).expect("hard link");
        nix::unistd::mkfifo(&p("fifo.json"), Mode::from_bits_truncate(0o600)).expect("fifo");
        std::fs::write(p("big.json"), vec![b'x'; 100]).expect("write");
        let read = |n: &str, limit| d.read_entry(OsStr::new(n), limit);
        assert_eq!(read("ok.json", 10).expect("read").bytes, b"{}");
        assert_eq!(
            read("link.json", 10),
            Err(ReadRefusal::NotRegular("symbolic link"))
        );
        assert_eq!(read("fifo.json", 10), Err(ReadRefusal::NotRegular("FIFO")));
        assert_eq!(read("hard.json", 10), Err(ReadRefusal::Links(2)));
        assert_eq!(read("big.json", 99), Err(ReadRefusal::TooLarge(99)));
        assert_eq!(read("gone.json", 99), Err(ReadRefusal::Gone));
        let kinds: std::collections::BTreeMap<String, Kind> = d
            .entries()
            .expect("entries")
            .into_iter()
            .map(|(n, k, _)| (n.to_string_lossy().into_owned(), k))
            .collect();
        assert_eq!(kinds["link.json"], Kind::Symlink);
        assert_eq!(kinds["fifo.json"], Kind::Special);
        assert_eq!(kinds["ok.json"], Kind::File);
    }

    #[test]
    fn a_move_takes_the_entry_itself_and_never_replaces() {
        let (t, d) = setup();
        let failed = d.open_child("failed").expect("failed");
        std::fs::write(t.path().join("secret"), b"key").expect("write");
        std::os::unix::fs::symlink(t.path().join("secret"), t.path().join("a")).expect("link");
        std::fs::write(failed.path().join("a"), b"taken").expect("write");
        let to = d.move_to(OsStr::new("a"), &failed).expect("move");
        assert_eq!(to, "a.1");
        // The link moved, not what it points to.
        assert!(
            std::fs::symlink_metadata(failed.path().join("a.1"))
                .expect("meta")
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            std::fs::read(t.path().join("secret")).expect("secret"),
            b"key"
        );
        assert_eq!(
            std::fs::read(failed.path().join("a")).expect("kept"),
            b"taken"
        );
        failed
            .write_new(OsStr::new("a.1.reason"), b"why\n")
            .expect("reason");
        assert!(
            failed
                .write_new(OsStr::new("a.1.reason"), b"again")
                .is_err()
        );
    }

    /// A file swapped for a symlink (and back) 2,000 times as fast as a
    /// thread can, while it is read: the link's target is never what is read.
    #[test]
    fn a_file_swapped_for_a_link_while_read_never_yields_the_target() {
        let (t, d) = setup();
        let secret = t.path().join("secret");
        std::fs::write(&secret, b"SECRET").expect("secret");
        let name = t.path().join("r.json");
        let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let swapper = {
            let (secret, name, dir, done) = (
                secret.clone(),
                name.clone(),
                t.path().to_owned(),
                done.clone(),
            );
            std::thread::spawn(move || {
                let mut n = 0u64;
                while n < 2000 {
                    let (tmp, link) = (dir.join(".tmp"), dir.join(".link"));
                    std::fs::write(&tmp, b"mine").expect("write");
                    std::fs::rename(&tmp, &name).expect("file in");
                    let _ = std::fs::remove_file(&link);
                    std::os::unix::fs::symlink(&secret, &link).expect("link");
                    std::fs::rename(&link, &name).expect("link in");
                    n += 1;
                    done.store(n, std::sync::atomic::Ordering::Relaxed);
                }
                n
            })
        };
        let (mut files, mut refused) = (0, 0);
        while done.load(std::sync::atomic::Ordering::Relaxed) < 2000 {
            match d.read_entry(OsStr::new("r.json"), 100) {
                Ok(f) => {
                    assert_eq!(f.bytes, b"mine");
                    files += 1;
                }
                Err(_) => refused += 1,
            }
        }
        let swaps = swapper.join().expect("swapper");
        println!("{files} reads of the file, {refused} refused, over {swaps} swaps");
    }
}
