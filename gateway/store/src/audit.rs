//! The audit chain in SQLite: `STATE_DIR/audit.sqlite`.
//!
//! Invariants:
//! - `audit.seq` runs from `anchor_seq + 1` to `head_seq` without gaps; each record's
//!   `prev_hash` is the hash of the record before it (or `anchor_hash`).
//! - `audit_meta` holds the anchor (the last pruned record's seq and hash) and the
//!   head (the last appended), updated in the same transaction as the records, so
//!   deleting the newest records is detected too.
//! - Triggers refuse `UPDATE` of records and `DELETE` above the anchor, so only
//!   [`AuditLog::prune_before`] removes records, and only after moving the anchor.
//!
//! What this does not stop: someone with write access to the file who drops the
//! triggers and rewrites every hash from the edit onward. Shipping the chain to the
//! hub (a later issue) is what makes that visible.

use std::path::Path;

use gateway_core::audit::{Break, Event, Hash, Record, Verifier};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

/// File name of the audit database inside the state directory.
pub const FILE_NAME: &str = "audit.sqlite";

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit (
    seq       INTEGER PRIMARY KEY,
    time_ms   INTEGER NOT NULL,
    device    TEXT NOT NULL,
    subject   TEXT NOT NULL,
    object    TEXT NOT NULL,
    event     TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    rule      TEXT NOT NULL,
    detail    TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash      BLOB NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS audit_time ON audit(time_ms);
CREATE TABLE IF NOT EXISTS audit_meta (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    anchor_seq  INTEGER NOT NULL,
    anchor_hash BLOB NOT NULL,
    head_seq    INTEGER NOT NULL,
    head_hash   BLOB NOT NULL,
    pruned      INTEGER NOT NULL
) STRICT;
INSERT OR IGNORE INTO audit_meta VALUES (1, 0, zeroblob(32), 0, zeroblob(32), 0);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
WHEN OLD.seq > (SELECT anchor_seq FROM audit_meta WHERE id = 1)
BEGIN SELECT RAISE(ABORT, 'audit records are removed only by retention pruning'); END;
";

/// Opening or creating the audit database failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// There is no audit database at the path (and it was not to be created).
    #[error("no audit database at {0}")]
    Missing(String),
    /// The database was written by a newer gatewayd.
    #[error(
        "audit database schema {found} is newer than this gatewayd understands ({SCHEMA_VERSION})"
    )]
    NewerSchema {
        /// The version found.
        found: i64,
    },
    /// SQLite refused.
    #[error("audit database: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// Writing to the audit chain failed; nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// SQLite refused.
    #[error("audit write failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// Verification could not finish, or found the chain broken.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The chain is broken at a record.
    #[error("{0}")]
    Broken(#[from] Break),
    /// A record cannot even be read as a record (a column's type or size was changed).
    #[error("record {seq}: unreadable ({what}); the record was altered")]
    Unreadable {
        /// The record.
        seq: i64,
        /// What is wrong with it.
        what: String,
    },
    /// The bookkeeping row is missing or malformed.
    #[error("the chain's anchor and head (table audit_meta) are missing or altered")]
    Meta,
    /// SQLite refused.
    #[error("audit database: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// An intact chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// Records present.
    pub count: u64,
    /// Records removed by retention pruning (the chain starts after them).
    pub pruned: u64,
    /// Sequence number of the newest record (0 when empty).
    pub head_seq: u64,
}

/// The audit log of one device.
#[derive(Debug)]
pub struct AuditLog {
    conn: Connection,
}

struct Meta {
    anchor_seq: u64,
    anchor_hash: Hash,
    head_seq: u64,
    head_hash: Hash,
    pruned: u64,
}

impl AuditLog {
    /// Opens `STATE_DIR/audit.sqlite`, creating it if needed.
    ///
    /// # Errors
    /// When SQLite cannot open or initialise the file, or its schema is newer.
    pub fn open(state_dir: &Path) -> Result<Self, OpenError> {
        let conn = Connection::open(state_dir.join(FILE_NAME))?;
        Self::init(conn)
    }

    /// Opens an existing `STATE_DIR/audit.sqlite` without creating anything.
    ///
    /// # Errors
    /// [`OpenError::Missing`] when there is no database there.
    pub fn open_existing(state_dir: &Path) -> Result<Self, OpenError> {
        let path = state_dir.join(FILE_NAME);
        if !path.is_file() {
            return Err(OpenError::Missing(path.display().to_string()));
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(OpenError::NewerSchema { found: version });
        }
        Ok(Self { conn })
    }

    fn init(conn: Connection) -> Result<Self, OpenError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // The chain is appended to and read in order: a small page cache
        // (256 KiB, not SQLite's 2 MiB) serves both, and is what a burst of
        // records leaves in memory.
        conn.pragma_update(None, "cache_size", -256)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(OpenError::NewerSchema { found: version });
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Self { conn })
    }

    fn meta(conn: &Connection) -> Result<Option<Meta>, rusqlite::Error> {
        conn.query_row(
            "SELECT anchor_seq, anchor_hash, head_seq, head_hash, pruned FROM audit_meta WHERE id = 1",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            },
        )
        .optional()
        .map(|row| {
            let (a, ah, h, hh, p) = row?;
            Some(Meta {
                anchor_seq: u64::try_from(a).ok()?,
                anchor_hash: ah.try_into().ok()?,
                head_seq: u64::try_from(h).ok()?,
                head_hash: hh.try_into().ok()?,
                pruned: u64::try_from(p).ok()?,
            })
        })
    }

    /// Appends `events` to the chain in one durable transaction, returning the records.
    ///
    /// # Errors
    /// When SQLite refuses; then nothing was appended.
    pub fn append(
        &mut self,
        events: impl IntoIterator<Item = Event>,
    ) -> Result<Vec<Record>, WriteError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let meta = Self::meta(&tx)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
        let (mut seq, mut prev) = (meta.head_seq, meta.head_hash);
        let mut out = Vec::new();
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO audit (seq, time_ms, device, subject, object, event, outcome, rule, detail, prev_hash, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?;
            for event in events {
                seq += 1;
                let r = Record::chain(seq, event, prev);
                let e = &r.event;
                insert.execute(params![
                    seq_i64(r.seq),
                    e.time_ms,
                    e.device,
                    e.subject,
                    e.object,
                    e.event,
                    e.outcome,
                    e.rule,
                    e.detail,
                    &r.prev_hash[..],
                    &r.hash[..]
                ])?;
                prev = r.hash;
                out.push(r);
            }
        }
        tx.prepare_cached("UPDATE audit_meta SET head_seq = ?1, head_hash = ?2 WHERE id = 1")?
            .execute(params![seq_i64(seq), &prev[..]])?;
        tx.commit()?;
        Ok(out)
    }

    /// Removes records older than `cutoff_ms` (Unix ms), keeping the chain
    /// verifiable: the last removed record becomes the anchor. Returns how many
    /// were removed.
    ///
    /// # Errors
    /// When SQLite refuses; then nothing was removed.
    pub fn prune_before(&mut self, cutoff_ms: i64) -> Result<u64, WriteError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Records are pruned as a prefix of the chain: stop at the first record
        // that is still young, even if an older timestamp follows it.
        let first_young: Option<i64> = tx.query_row(
            "SELECT MIN(seq) FROM audit WHERE time_ms >= ?1",
            [cutoff_ms],
            |r| r.get(0),
        )?;
        let last: Option<(i64, Vec<u8>)> = match first_young {
            Some(y) => tx
                .query_row(
                    "SELECT seq, hash FROM audit WHERE seq < ?1 ORDER BY seq DESC LIMIT 1",
                    [y],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?,
            None => tx
                .query_row(
                    "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?,
        };
        let Some((anchor_seq, anchor_hash)) = last else {
            return Ok(0);
        };
        let n = tx.query_row(
            "SELECT COUNT(*) FROM audit WHERE seq <= ?1",
            [anchor_seq],
            |r| r.get::<_, i64>(0),
        )?;
        tx.execute(
            "UPDATE audit_meta SET anchor_seq = ?1, anchor_hash = ?2, pruned = pruned + ?3 WHERE id = 1",
            params![anchor_seq, anchor_hash, n],
        )?;
        tx.execute("DELETE FROM audit WHERE seq <= ?1", [anchor_seq])?;
        tx.commit()?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Walks the whole chain from the anchor to the head.
    ///
    /// # Errors
    /// [`VerifyError::Broken`] naming the first broken record, or a read failure.
    pub fn verify(&self) -> Result<Verified, VerifyError> {
        // One read transaction: the head and the records come from one snapshot,
        // even while the daemon appends.
        let tx = self.conn.unchecked_transaction()?;
        let meta = Self::meta(&tx)?.ok_or(VerifyError::Meta)?;
        let mut verifier = Verifier::new(meta.anchor_seq, meta.anchor_hash);
        let mut stmt = tx.prepare(
            "SELECT seq, time_ms, device, subject, object, event, outcome, rule, detail, prev_hash, hash FROM audit ORDER BY seq",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let record = read_record(row)?;
            verifier.push(&record)?;
        }
        let count = verifier.finish(meta.head_seq, &meta.head_hash)?;
        drop(rows);
        drop(stmt);
        tx.finish()?;
        Ok(Verified {
            count,
            pruned: meta.pruned,
            head_seq: meta.head_seq,
        })
    }

    /// Up to `limit` records starting at sequence `from`, oldest first.
    ///
    /// # Errors
    /// When a record cannot be read.
    pub fn records(&self, from: u64, limit: usize) -> Result<Vec<Record>, VerifyError> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, time_ms, device, subject, object, event, outcome, rule, detail, prev_hash, hash
             FROM audit WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = stmt.query(params![
            seq_i64(from),
            i64::try_from(limit).unwrap_or(i64::MAX)
        ])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(read_record(row)?);
        }
        Ok(out)
    }

    /// Up to `limit` records of kind `event` after sequence number `after`,
    /// in order, and the last sequence number looked at (`after` when the
    /// chain has nothing newer): a reader follows one kind of event through
    /// the chain without reading every record into memory.
    ///
    /// # Errors
    /// When the database cannot be read.
    pub fn events_after(
        &self,
        event: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<Record>, u64), VerifyError> {
        // The head first: a record committed meanwhile is after it, never skipped.
        let head: i64 =
            self.conn
                .query_row("SELECT COALESCE(MAX(seq), 0) FROM audit", [], |r| r.get(0))?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, time_ms, device, subject, object, event, outcome, rule, detail, prev_hash, hash
             FROM audit WHERE seq > ?1 AND seq <= ?2 AND event = ?3 ORDER BY seq LIMIT ?4",
        )?;
        let mut rows = stmt.query(params![
            seq_i64(after),
            head,
            event,
            i64::try_from(limit).unwrap_or(i64::MAX)
        ])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(read_record(row)?);
        }
        let seen = match out.last() {
            Some(r) if out.len() >= limit => r.seq,
            _ => u64::try_from(head).unwrap_or(0).max(after),
        };
        Ok((out, seen))
    }
}

fn seq_i64(seq: u64) -> i64 {
    // Sequence numbers start at 1 and grow by one per record: i64 is never exceeded.
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn read_record(row: &rusqlite::Row<'_>) -> Result<Record, VerifyError> {
    let seq: i64 = row.get(0)?;
    let bad = |what: &str| VerifyError::Unreadable {
        seq,
        what: what.to_owned(),
    };
    let text = |i: usize, name: &str| {
        row.get::<_, String>(i)
            .map_err(|_| bad(&format!("{name} is not text")))
    };
    let hash = |i: usize, name: &str| -> Result<Hash, VerifyError> {
        let v: Vec<u8> = row
            .get(i)
            .map_err(|_| bad(&format!("{name} is not a blob")))?;
        v.try_into()
            .map_err(|_| bad(&format!("{name} is not 32 bytes")))
    };
    Ok(Record {
        seq: u64::try_from(seq).map_err(|_| bad("negative sequence"))?,
        event: Event {
            time_ms: row.get(1).map_err(|_| bad("time_ms is not an integer"))?,
            device: text(2, "device")?,
            subject: text(3, "subject")?,
            object: text(4, "object")?,
            event: text(5, "event")?,
            outcome: text(6, "outcome")?,
            rule: text(7, "rule")?,
            detail: text(8, "detail")?,
        },
        prev_hash: hash(9, "prev_hash")?,
        hash: hash(10, "hash")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: i64) -> Event {
        Event {
            time_ms: 1_000 * i,
            device: "jl-gat-0001".into(),
            subject: format!("10.20.0.{i}"),
            object: "pension-query".into(),
            event: "relay.open".into(),
            outcome: "allow".into(),
            rule: "R0.allow-service".into(),
            detail: format!("bytes_up={i}"),
        }
    }

    fn log_with(n: i64) -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = AuditLog::open(dir.path()).expect("open");
        log.append((1..=n).map(ev)).expect("append");
        (dir, log)
    }

    /// Tampering is done the way an intruder with the file would: through SQLite,
    /// after dropping the triggers that refuse it.
    fn tamper(dir: &Path, sql: &str) {
        let c = Connection::open(dir.join(FILE_NAME)).expect("open raw");
        c.execute_batch("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;")
            .expect("drop triggers");
        c.execute_batch(sql).expect("tamper");
    }

    fn broken_at(dir: &Path) -> u64 {
        let log = AuditLog::open_existing(dir).expect("reopen");
        match log.verify() {
            Err(VerifyError::Broken(b)) => b.seq(),
            Err(VerifyError::Unreadable { seq, .. }) => u64::try_from(seq).expect("seq"),
            other => panic!("tampering not detected: {other:?}"),
        }
    }

    #[test]
    fn intact_chain_verifies_across_reopen() {
        let (dir, log) = log_with(10);
        assert_eq!(log.verify().expect("verify").count, 10);
        drop(log);
        let mut log = AuditLog::open(dir.path()).expect("reopen");
        log.append([ev(11)]).expect("append");
        let v = log.verify().expect("verify");
        assert_eq!((v.count, v.head_seq), (11, 11));
    }

    #[test]
    fn triggers_refuse_edits_and_deletes() {
        let (dir, _log) = log_with(3);
        let c = Connection::open(dir.path().join(FILE_NAME)).expect("open raw");
        assert!(
            c.execute("UPDATE audit SET outcome = 'deny' WHERE seq = 2", [])
                .is_err()
        );
        assert!(c.execute("DELETE FROM audit WHERE seq = 2", []).is_err());
    }

    #[test]
    fn detects_an_edited_field() {
        let (dir, _log) = log_with(10);
        tamper(
            dir.path(),
            "UPDATE audit SET outcome = 'deny' WHERE seq = 4",
        );
        assert_eq!(broken_at(dir.path()), 4);
    }

    #[test]
    fn detects_an_edited_time() {
        let (dir, _log) = log_with(10);
        tamper(
            dir.path(),
            "UPDATE audit SET time_ms = time_ms + 1 WHERE seq = 7",
        );
        assert_eq!(broken_at(dir.path()), 7);
    }

    #[test]
    fn detects_a_deleted_row() {
        let (dir, _log) = log_with(10);
        tamper(dir.path(), "DELETE FROM audit WHERE seq = 5");
        assert_eq!(broken_at(dir.path()), 5);
    }

    #[test]
    fn detects_a_deleted_newest_row() {
        let (dir, _log) = log_with(10);
        tamper(dir.path(), "DELETE FROM audit WHERE seq = 10");
        assert_eq!(broken_at(dir.path()), 10);
    }

    #[test]
    fn detects_two_swapped_rows() {
        let (dir, _log) = log_with(10);
        // Swap the contents of records 3 and 6, keeping each row's seq.
        tamper(
            dir.path(),
            "UPDATE audit SET seq = -3 WHERE seq = 3;
             UPDATE audit SET seq = 3 WHERE seq = 6;
             UPDATE audit SET seq = 6 WHERE seq = -3;",
        );
        assert_eq!(broken_at(dir.path()), 3);
    }

    #[test]
    fn detects_a_rehashed_edit_that_breaks_the_link() {
        let (dir, _log) = log_with(5);
        // The intruder edits record 2 and recomputes its own hash, but not the next record's link.
        let log = AuditLog::open_existing(dir.path()).expect("open");
        let mut r = log.records(2, 1).expect("read").remove(0);
        r.event.outcome = "deny".into();
        let h = gateway_core::audit::hash(r.seq, &r.event, &r.prev_hash);
        drop(log);
        let c = Connection::open(dir.path().join(FILE_NAME)).expect("open raw");
        c.execute_batch("DROP TRIGGER audit_no_update;")
            .expect("drop");
        c.execute(
            "UPDATE audit SET outcome = 'deny', hash = ?1 WHERE seq = 2",
            [&h[..]],
        )
        .expect("update");
        assert_eq!(broken_at(dir.path()), 3);
    }

    #[test]
    fn detects_a_wrong_type() {
        let (dir, _log) = log_with(3);
        tamper(dir.path(), "UPDATE audit SET hash = x'00' WHERE seq = 2");
        assert_eq!(broken_at(dir.path()), 2);
    }

    #[test]
    fn pruning_keeps_the_chain_verifiable() {
        let (dir, mut log) = log_with(10);
        assert_eq!(log.prune_before(5_000).expect("prune"), 4);
        let v = log.verify().expect("verify after prune");
        assert_eq!((v.count, v.pruned, v.head_seq), (6, 4, 10));
        assert_eq!(log.records(0, 100).expect("read")[0].seq, 5);
        log.append([ev(11)]).expect("append");
        assert_eq!(log.verify().expect("verify").count, 7);
        // Deleting the first kept record is still detected.
        drop(log);
        tamper(dir.path(), "DELETE FROM audit WHERE seq = 5");
        assert_eq!(broken_at(dir.path()), 5);
    }

    #[test]
    fn pruning_everything_then_appending() {
        let (_dir, mut log) = log_with(3);
        assert_eq!(log.prune_before(i64::MAX).expect("prune"), 3);
        assert_eq!(log.verify().expect("verify").count, 0);
        log.append([ev(4)]).expect("append");
        let v = log.verify().expect("verify");
        assert_eq!((v.count, v.head_seq), (1, 4));
        assert_eq!(log.prune_before(0).expect("nothing old"), 0);
    }
}
