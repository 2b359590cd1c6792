//! The EFI system partition as the updater sees it: each version's kernel
//! and initrd under `EFI/gw/VERSION/`, and its boot entry
//! `loader/entries/gw-VERSION+3.conf`, which systemd-boot counts down and
//! `systemd-bless-boot` blesses (`gateway_core::firmware::boot`). Entries of
//! other names are not the updater's and are left alone.

use std::fs::FileType;
use std::io::{Read, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use gateway_core::firmware::boot::Entry;

use crate::files::{self, FileError};
use crate::source::BootFile;

/// What [`Esp::put_boot_file`] did.
#[derive(Debug)]
pub enum Put {
    /// In place, its hash the manifest's.
    Written,
    /// Its hash is not the manifest's: not put in place.
    Mismatch,
    /// Longer than [`MAX_BOOT_FILE`]: not put in place.
    TooLarge,
    /// The source failed midway (the update resumes later).
    Unreadable(std::io::Error),
}

/// Removes `path` whatever it is (`kind`, as listed: a link is removed, not
/// followed).
fn remove_any(path: &Path, kind: FileType) -> Result<(), FileError> {
    let done = if kind.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    done.map_err(|source| FileError::Io {
        path: path.to_owned(),
        source,
    })
}

/// The ESP, mounted at a directory.
pub struct Esp {
    root: PathBuf,
}

/// Which root slot an entry boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotName {
    /// `gw-root-a`.
    A,
    /// `gw-root-b`.
    B,
}

impl SlotName {
    /// The slot's letter, as in its partition label and `gw.slot=`.
    pub fn letter(self) -> char {
        match self {
            SlotName::A => 'a',
            SlotName::B => 'b',
        }
    }

    /// The other slot.
    pub fn other(self) -> SlotName {
        match self {
            SlotName::A => SlotName::B,
            SlotName::B => SlotName::A,
        }
    }

    /// Index 0 for A, 1 for B.
    pub fn index(self) -> usize {
        match self {
            SlotName::A => 0,
            SlotName::B => 1,
        }
    }
}

/// The boot entry's text for `version` on `slot`, for `hardware` (the
/// updater reads the slot, version and model back from the command line).
pub fn entry_text(version: &str, slot: SlotName, hardware: &str) -> String {
    let s = slot.letter();
    format!(
        "title Gateway {version}\n\
         version {version}\n\
         linux /EFI/gw/{version}/linux\n\
         initrd /EFI/gw/{version}/initrd\n\
         options root=PARTLABEL=gw-root-{s} ro gw.slot={s} gw.version={version} gw.hardware={hardware} console=ttyS0 panic=10\n"
    )
}

/// The largest kernel or initrd the updater copies.
pub const MAX_BOOT_FILE: u64 = 256 << 20;

impl Esp {
    /// The ESP mounted at `root` (its `loader/entries` and `EFI/gw` are
    /// made when missing).
    ///
    /// # Errors
    /// When they cannot be made.
    pub fn open(root: &Path) -> Result<Self, FileError> {
        files::ensure_dir(&root.join("loader/entries"))?;
        files::ensure_dir(&root.join("EFI/gw"))?;
        for dir in ["loader", "loader/entries", "EFI", "EFI/gw"] {
            files::real_dir(&root.join(dir))?;
        }
        Ok(Esp {
            root: root.to_owned(),
        })
    }

    fn entries_dir(&self) -> PathBuf {
        self.root.join("loader/entries")
    }

    /// The updater's boot entries, as their names say.
    ///
    /// # Errors
    /// When the directory cannot be read.
    pub fn entries(&self) -> Result<Vec<Entry>, FileError> {
        let dir = self.entries_dir();
        let read = std::fs::read_dir(&dir).map_err(|source| FileError::Io {
            path: dir.clone(),
            source,
        })?;
        // Only regular files are entries (systemd-boot reads no other): a
        // directory or a link named like one is not counted, and is
        // removed when the slot is cleared.
        let mut out: Vec<Entry> = read
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| Entry::parse(e.file_name().to_str()?))
            .collect();
        out.sort_by_key(Entry::file_name);
        Ok(out)
    }

    /// Removes what is not a regular file but is named like one of the
    /// updater's entries (`gw-*.conf`).
    fn remove_strays(&self) -> Result<(), FileError> {
        let dir = self.entries_dir();
        let read = std::fs::read_dir(&dir).map_err(|source| FileError::Io {
            path: dir.clone(),
            source,
        })?;
        for e in read.filter_map(Result::ok) {
            let name = e.file_name();
            let ours = name
                .to_str()
                .is_some_and(|n| n.starts_with("gw-") && n.ends_with(".conf"));
            let Ok(kind) = e.file_type() else { continue };
            if ours && !kind.is_file() {
                remove_any(&dir.join(&name), kind)?;
            }
        }
        Ok(())
    }

    /// Removes every entry of the updater's, and every version's boot
    /// files, but `keep`'s.
    ///
    /// # Errors
    /// When one cannot be removed.
    pub fn remove_except(&self, keep: &str) -> Result<(), FileError> {
        let dir = self.entries_dir();
        self.remove_strays()?;
        for e in self.entries()? {
            if e.version != keep {
                let path = dir.join(e.file_name());
                std::fs::remove_file(&path).map_err(|source| FileError::Io { path, source })?;
            }
        }
        files::sync_dir(&dir)?;
        let gw = self.root.join("EFI/gw");
        let listed = std::fs::read_dir(&gw).map_err(|source| FileError::Io {
            path: gw.clone(),
            source,
        })?;
        for d in listed.filter_map(Result::ok) {
            let name = d.file_name();
            let Some(v) = name.to_str() else { continue };
            if v != keep && gateway_core::firmware::version_numbers(v).is_some() {
                let kind = d.file_type().map_err(|source| FileError::Io {
                    path: gw.join(v),
                    source,
                })?;
                remove_any(&gw.join(v), kind)?;
            }
        }
        files::sync_dir(&gw)
    }

    /// `EFI/gw/VERSION`, a real directory (a link or file there, which no
    /// updater made, is removed first).
    fn version_dir(&self, version: &str) -> Result<PathBuf, FileError> {
        let dir = self.root.join("EFI/gw").join(version);
        if let Ok(meta) = std::fs::symlink_metadata(&dir)
            && !meta.is_dir()
        {
            remove_any(&dir, meta.file_type())?;
        }
        files::ensure_dir(&dir)?;
        files::real_dir(&dir)?;
        Ok(dir)
    }

    /// Streams `version`'s kernel or initrd from `from` into its place,
    /// hashing as it goes: it replaces the file only when its SHA-256 is
    /// `want` (the manifest's), so no unchecked byte is ever booted and no
    /// more than one 1 MiB buffer is held.
    ///
    /// # Errors
    /// An OS error on the ESP.
    pub fn put_boot_file(
        &self,
        version: &str,
        file: BootFile,
        from: &mut dyn Read,
        want: &str,
    ) -> Result<Put, FileError> {
        let dir = self.version_dir(version)?;
        let name = file.name();
        let tmp = dir.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| FileError::Io { path, source }
        };
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(files::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        let verdict = loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break Some(Put::Unreadable(e)),
            };
            len += n as u64;
            if len > MAX_BOOT_FILE {
                break Some(Put::TooLarge);
            }
            ctx.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io(&tmp))?;
        };
        let verdict = verdict.or_else(|| {
            (gateway_core::hex::encode(ctx.finish().as_ref()) != want).then_some(Put::Mismatch)
        });
        if let Some(refused) = verdict {
            drop(out);
            let _ = std::fs::remove_file(&tmp);
            return Ok(refused);
        }
        out.sync_all().map_err(io(&tmp))?;
        drop(out);
        let path = dir.join(name);
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        files::sync_dir(&dir)?;
        Ok(Put::Written)
    }

    /// Whether `version`'s kernel or initrd is in place with SHA-256 `want`
    /// (hashed as it is read, 1 MiB at a time).
    pub fn boot_file_ok(&self, version: &str, file: BootFile, want: &str) -> bool {
        let dir = self.root.join("EFI/gw").join(version);
        if files::real_dir(&dir).is_err() {
            return false;
        }
        let Ok(f) = files::open_read(&dir.join(file.name())) else {
            return false;
        };
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut r = f.take(MAX_BOOT_FILE + 1);
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => ctx.update(&buf[..n]),
                Err(_) => return false,
            }
        }
        gateway_core::hex::encode(ctx.finish().as_ref()) == want
    }

    /// Writes `entry` booting `slot`, unless an entry for its version is
    /// there already (in whatever state of its count: writing it again
    /// would give back tries that boots used up). Whether it wrote one.
    ///
    /// # Errors
    /// An OS error.
    pub fn write_entry_once(
        &self,
        entry: &Entry,
        slot: SlotName,
        hardware: &str,
    ) -> Result<bool, FileError> {
        if self.entries()?.iter().any(|e| e.version == entry.version) {
            return Ok(false);
        }
        self.remove_strays()?;
        files::replace(
            &self.entries_dir(),
            &entry.file_name(),
            entry_text(&entry.version, slot, hardware).as_bytes(),
        )?;
        Ok(true)
    }
}
