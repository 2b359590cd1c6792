//! The failed boot's journal, for a rollback report: its last warnings,
//! read from the journal the image keeps on the state disk.
//!
//! The read-only root makes a new machine id at each boot, and journalctl
//! then reads only the current one's files (and refuses `--boot` with
//! `--merge`): so the directory is read as a directory (`--directory`), the
//! failed boot is the newest one listed that is not this boot, and it is
//! named by its id.

use std::process::{Command, Stdio};

/// Where the image keeps the journal.
pub const DIR: &str = "/var/log/journal";
/// Lines kept.
pub const LINES: usize = 50;

/// The newest boot of `journalctl --list-boots` output that is not
/// `current` (a boot id, with or without dashes).
pub fn previous_boot<'a>(list_boots: &'a str, current: &str) -> Option<&'a str> {
    let current = current.replace('-', "");
    list_boots
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .rfind(|id| *id != current)
}

fn journalctl(dir: &str, args: &[&str]) -> Option<String> {
    let out = Command::new("journalctl")
        .arg(format!("--directory={dir}"))
        .args(args)
        .args(["--no-pager", "--quiet"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last [`LINES`] warnings (and worse) of the boot before this one in
/// `dir`; none when the journal is not kept or has no such boot.
pub fn failed_boot(dir: &str, current_boot: &str) -> Vec<String> {
    let Some(boots) = journalctl(dir, &["--list-boots"]) else {
        return Vec::new();
    };
    let Some(prev) = previous_boot(&boots, current_boot) else {
        return Vec::new();
    };
    journalctl(
        dir,
        &[
            &format!("--boot={prev}"),
            &format!("--lines={LINES}"),
            "--priority=warning",
            "--output=short-iso",
        ],
    )
    .map(|t| t.lines().map(str::to_owned).collect())
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_boot_is_the_newest_that_is_not_this_one() {
        let list = "IDX BOOT ID                          FIRST ENTRY                 LAST ENTRY
 -2 107901a128d74d4cbec93025c2182fd3 Fri 2026-12-04 21:35:38 UTC Fri 2026-12-04 21:37:34 UTC
 -1 3f9a691a949c440da49ac1553d8a13a6 Fri 2026-12-04 21:38:16 UTC Fri 2026-12-04 21:40:11 UTC
  0 b068c2b493d8421b8df70d3aa4ceb007 Fri 2026-12-04 21:41:10 UTC Fri 2026-12-04 21:42:55 UTC
";
        // This boot's journal not flushed yet: the newest listed is the failed one.
        assert_eq!(
            previous_boot(list, "44508a2e-5aff-4b48-8a4e-a2375156f6d7"),
            Some("b068c2b493d8421b8df70d3aa4ceb007")
        );
        // Flushed: the one before it.
        assert_eq!(
            previous_boot(list, "b068c2b4-93d8-421b-8df7-0d3aa4ceb007"),
            Some("3f9a691a949c440da49ac1553d8a13a6")
        );
        assert_eq!(previous_boot("No journal files were found.\n", "x"), None);
    }
}
