//! The EFI system partition as the updater sees it: each version's kernel
//! and initrd under `EFI/gw/VERSION/`, and its boot entry
//! `loader/entries/gw-VERSION+3.conf`, which systemd-boot counts down and
//! `systemd-bless-boot` blesses (`gateway_core::firmware::boot`). Entries of
//! other names are not the updater's and are left alone.

use std::path::{Path, PathBuf};

use gateway_core::firmware::Manifest;
use gateway_core::firmware::boot::Entry;

use crate::files::{self, FileError};

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
        let mut out: Vec<Entry> = read
            .filter_map(Result::ok)
            .filter_map(|e| Entry::parse(e.file_name().to_str()?))
            .collect();
        out.sort_by_key(Entry::file_name);
        Ok(out)
    }

    /// Removes every entry of the updater's, and every version's boot
    /// files, but `keep`'s.
    ///
    /// # Errors
    /// When one cannot be removed.
    pub fn remove_except(&self, keep: &str) -> Result<(), FileError> {
        let dir = self.entries_dir();
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
                let path = gw.join(v);
                std::fs::remove_dir_all(&path).map_err(|source| FileError::Io { path, source })?;
            }
        }
        files::sync_dir(&gw)
    }

    /// Puts `version`'s kernel and initrd in place (each already checked
    /// against its manifest).
    ///
    /// # Errors
    /// An OS error.
    pub fn put_boot_files(
        &self,
        version: &str,
        linux: &[u8],
        initrd: &[u8],
    ) -> Result<(), FileError> {
        let dir = self.root.join("EFI/gw").join(version);
        files::ensure_dir(&dir)?;
        files::replace(&dir, "linux", linux)?;
        files::replace(&dir, "initrd", initrd)
    }

    /// Whether `version`'s kernel and initrd are in place and match `m`.
    pub fn boot_files_ok(&self, m: &Manifest) -> bool {
        let dir = self.root.join("EFI/gw").join(&m.version);
        let ok = |name: &str, want: &str| {
            files::read_limited(&dir.join(name), MAX_BOOT_FILE)
                .ok()
                .flatten()
                .is_some_and(|b| crate::sha256_hex(&b) == want)
        };
        ok("linux", &m.kernel_sha256) && ok("initrd", &m.initrd_sha256)
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
        files::replace(
            &self.entries_dir(),
            &entry.file_name(),
            entry_text(&entry.version, slot, hardware).as_bytes(),
        )?;
        Ok(true)
    }
}
