//! A destination edge's record of what it delivered: `STATE_DIR/inbox.sqlite`.
//!
//! Records from another department arrive in batches per source
//! (`DEVICE/CHANNEL`). Each record is written as a file in a staging directory,
//! then [`Inbox::commit`] raises the source's high-water mark and lists the
//! staged files as pending, in one durable transaction; then the files are
//! renamed into the delivery directory and [`Inbox::published`] clears the list.
//!
//! Invariants: a record at or below `high` is never written again (a resent
//! batch is skipped); a pending file is renamed into place after any crash
//! ([`Inbox::pending`] at start); a staged file that is not pending was never
//! committed and is thrown away (its batch will come again). So each record
//! lands in the delivery directory exactly once.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// File name of the inbox inside the state directory.
pub const FILE_NAME: &str = "inbox.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS source (
    source  TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    high    INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS pending (
    channel TEXT NOT NULL,
    name    TEXT NOT NULL,
    PRIMARY KEY (channel, name)
) STRICT;
";

/// The destination's delivery log.
#[derive(Debug)]
pub struct Inbox {
    conn: Connection,
}

fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl Inbox {
    /// Opens (or creates) `STATE_DIR/inbox.sqlite`.
    ///
    /// # Errors
    /// When SQLite cannot open or initialise it.
    pub fn open(state_dir: &Path) -> Result<Self, rusqlite::Error> {
        let conn = Connection::open(state_dir.join(FILE_NAME))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn })
    }

    /// Highest sequence number of `source` delivered; 0 if none.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn high(&self, source: &str) -> Result<u64, rusqlite::Error> {
        Ok(self
            .conn
            .query_row("SELECT high FROM source WHERE source = ?1", [source], |r| {
                r.get(0)
            })
            .optional()?
            .map_or(0, u64_of))
    }

    /// Raises `source`'s mark to `high` and lists `names` (staged files of
    /// `channel`) as pending, durably.
    ///
    /// # Errors
    /// When SQLite fails; nothing changed then.
    pub fn commit(
        &mut self,
        source: &str,
        channel: &str,
        high: u64,
        names: &[String],
    ) -> Result<(), rusqlite::Error> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO source VALUES (?1, ?2, ?3) ON CONFLICT (source) DO UPDATE SET high = max(high, ?3)",
            params![source, channel, i64::try_from(high).unwrap_or(i64::MAX)],
        )?;
        for n in names {
            tx.execute(
                "INSERT OR IGNORE INTO pending VALUES (?1, ?2)",
                params![channel, n],
            )?;
        }
        tx.commit()
    }

    /// Staged files of `channel` committed but not yet renamed into place.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn pending(&self, channel: &str) -> Result<Vec<String>, rusqlite::Error> {
        let mut stmt = self
            .conn
            .prepare("SELECT name FROM pending WHERE channel = ?1 ORDER BY name")?;
        let names = stmt.query_map([channel], |r| r.get(0))?;
        names.collect()
    }

    /// The files were renamed into place.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn published(&mut self, channel: &str, names: &[String]) -> Result<(), rusqlite::Error> {
        let tx = self.conn.transaction()?;
        for n in names {
            tx.execute(
                "DELETE FROM pending WHERE channel = ?1 AND name = ?2",
                params![channel, n],
            )?;
        }
        tx.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_a_reopen_and_pending_lists_clear() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut i = Inbox::open(dir.path()).expect("open");
        assert_eq!(i.high("a/x").expect("high"), 0);
        let names = vec!["a.x.1.json".to_owned(), "a.x.2.json".to_owned()];
        i.commit("a/x", "in", 2, &names).expect("commit");
        i.commit("a/x", "in", 1, &[])
            .expect("a lower mark never lowers it");
        drop(i);
        let mut i = Inbox::open(dir.path()).expect("reopen");
        assert_eq!(i.high("a/x").expect("high"), 2);
        assert_eq!(i.pending("in").expect("pending"), names);
        i.published("in", &names).expect("published");
        assert!(i.pending("in").expect("pending").is_empty());
    }
}
