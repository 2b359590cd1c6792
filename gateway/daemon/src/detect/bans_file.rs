//! The ban table on disk, `STATE_DIR/bans.json`: written whole (a new file,
//! synced, renamed over the old), read through the state directory's
//! descriptor without following links, at most [`MAX_BYTES`].

use std::ffi::OsStr;
use std::net::IpAddr;
use std::path::Path;

use gateway_core::detect::bans::{Entry, MAX_BANS};
use serde::{Deserialize, Serialize};

use crate::os::dir::{ReadRefusal, SafeDir};

const NAME: &str = "bans.json";
const FORMAT: &str = "gw-bans/1";
/// Largest file read: the table at its cap with room to spare.
pub const MAX_BYTES: u64 = 32 << 20;

#[derive(Serialize, Deserialize)]
struct File {
    format: String,
    bans: Vec<Saved>,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    source: IpAddr,
    until_ms: i64,
    history: Vec<i64>,
}

/// Why the saved bans were not read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The state directory cannot be opened.
    #[error("{0}")]
    Dir(String),
    /// The file was refused (a link, too large, unreadable).
    #[error("{NAME}: {0}")]
    Refused(String),
    /// It is not a ban table.
    #[error("{NAME}: not a ban table ({0})")]
    Malformed(String),
}

/// The saved table; empty when there is none.
///
/// # Errors
/// [`LoadError`] when a file is there but cannot be used.
pub fn load(state_dir: &Path) -> Result<Vec<(IpAddr, Entry)>, LoadError> {
    let dir = SafeDir::open(state_dir).map_err(|e| LoadError::Dir(e.to_string()))?;
    let file = match dir.read_entry(OsStr::new(NAME), MAX_BYTES) {
        Ok(f) => f,
        Err(ReadRefusal::Gone) => return Ok(Vec::new()),
        Err(e) => return Err(LoadError::Refused(e.to_string())),
    };
    let parsed: File =
        serde_json::from_slice(&file.bytes).map_err(|e| LoadError::Malformed(e.to_string()))?;
    if parsed.format != FORMAT {
        return Err(LoadError::Malformed(format!(
            "format {:?}, expected {FORMAT:?}",
            parsed.format
        )));
    }
    Ok(parsed
        .bans
        .into_iter()
        .take(MAX_BANS)
        .map(|s| {
            (
                s.source,
                Entry {
                    until_ms: s.until_ms,
                    history: s.history.into_iter().take(64).collect(),
                },
            )
        })
        .collect())
}

/// Saves `table` whole.
///
/// # Errors
/// When the file cannot be written.
pub fn save(state_dir: &Path, table: &[(IpAddr, Entry)]) -> std::io::Result<()> {
    let file = File {
        format: FORMAT.to_owned(),
        bans: table
            .iter()
            .map(|(ip, e)| Saved {
                source: *ip,
                until_ms: e.until_ms,
                history: e.history.iter().copied().collect(),
            })
            .collect(),
    };
    let bytes = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
    let dir = SafeDir::open(state_dir).map_err(std::io::Error::other)?;
    dir.write_replace(OsStr::new(NAME), &bytes)?;
    dir.sync().map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_table_reads_back_and_a_link_or_junk_is_refused() {
        let dir = tempfile::tempdir().expect("test file");
        assert!(
            load(dir.path()).expect("test file").is_empty(),
            "no file: no bans"
        );
        let e = Entry {
            until_ms: 42,
            history: [1, 2].into(),
        };
        save(
            dir.path(),
            &[("192.0.2.1".parse().expect("an address"), e.clone())],
        )
        .expect("test file");
        let back = load(dir.path()).expect("test file");
        assert_eq!(back, vec![("192.0.2.1".parse().expect("an address"), e)]);
        std::fs::write(dir.path().join("other"), b"{}").expect("test file");
        std::fs::remove_file(dir.path().join(NAME)).expect("test file");
        std::os::unix::fs::symlink(dir.path().join("other"), dir.path().join(NAME))
            .expect("test file");
        assert!(matches!(load(dir.path()), Err(LoadError::Refused(_))));
        std::fs::remove_file(dir.path().join(NAME)).expect("test file");
        std::fs::write(dir.path().join(NAME), b"{\"format\":\"x\",\"bans\":[]}")
            .expect("test file");
        assert!(matches!(load(dir.path()), Err(LoadError::Malformed(_))));
    }
}
