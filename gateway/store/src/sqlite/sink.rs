//! The sink's SQLite engine: `STATE_DIR/sink.sqlite` (or `[hub].sink`).
//!
//! A batch commits in one `BEGIN IMMEDIATE` transaction (WAL, `synchronous =
//! FULL`), `high` read and raised inside it, so several hub processes may share
//! one file and de-duplication holds across them.

use std::path::Path;
use std::time::Duration;

use gateway_core::wire::SyncRecord;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::sink::{Committed, SinkBatch, Stored, Stream};

/// File name of the sink inside the state directory.
pub const FILE_NAME: &str = "sink.sqlite";

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS stream (
    device     TEXT NOT NULL,
    channel    TEXT NOT NULL,
    deliver_to TEXT NOT NULL,
    high       INTEGER NOT NULL,
    consumed   INTEGER NOT NULL,
    records    INTEGER NOT NULL,
    bytes      INTEGER NOT NULL,
    duplicates INTEGER NOT NULL,
    PRIMARY KEY (device, channel)
) STRICT;
-- Records the destination edge refused, kept for the source's receipts.
CREATE TABLE IF NOT EXISTS failure (
    device  TEXT NOT NULL,
    channel TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    reason  TEXT NOT NULL,
    PRIMARY KEY (device, channel, seq)
) STRICT;
CREATE TABLE IF NOT EXISTS record (
    id          INTEGER PRIMARY KEY,
    device      TEXT NOT NULL,
    channel     TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    time_ms     INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    format      TEXT NOT NULL,
    body        BLOB NOT NULL,
    UNIQUE (device, channel, seq)
) STRICT;
";

/// A sink operation failed; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The database was written by a newer gatewayd.
    #[error("sink schema {0} is newer than this gatewayd understands")]
    NewerSchema(i64),
    /// SQLite refused.
    #[error("sink: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The sink in one SQLite file.
#[derive(Debug)]
pub struct SqliteSink {
    conn: Connection,
}

impl SqliteSink {
    /// Opens (or creates) `STATE_DIR/sink.sqlite`.
    ///
    /// # Errors
    /// When SQLite cannot open or initialise it, or its schema is newer.
    pub fn open(state_dir: &Path) -> Result<Self, SinkError> {
        Self::open_file(&state_dir.join(FILE_NAME))
    }

    /// Opens (or creates) a sink file, possibly shared with other hubs.
    ///
    /// # Errors
    /// As [`SqliteSink::open`].
    pub fn open_file(path: &Path) -> Result<Self, SinkError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(SinkError::NewerSchema(version));
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Self { conn })
    }

    /// Opens an existing sink read-only (`gatewayd channels`), never taking a
    /// write lock.
    ///
    /// # Errors
    /// When it does not exist or SQLite cannot open it.
    pub fn open_read_only(path: &Path) -> Result<Self, SinkError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(Self { conn })
    }

    /// The highest sequence number committed for (device, channel); 0 if none.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn high(&self, device: &str, channel: &str) -> Result<u64, SinkError> {
        let high: Option<i64> = self
            .conn
            .query_row(
                "SELECT high FROM stream WHERE device = ?1 AND channel = ?2",
                params![device, channel],
                |r| r.get(0),
            )
            .optional()?;
        Ok(high.map_or(0, u64_of))
    }

    /// Stores the records above `high` in one durable transaction.
    ///
    /// # Errors
    /// When SQLite fails; nothing is stored then.
    pub fn commit(
        &mut self,
        device: &str,
        channel: &str,
        deliver_to: &str,
        records: &[SyncRecord],
        now_ms: i64,
    ) -> Result<Committed, SinkError> {
        let batch = SinkBatch {
            device: device.to_owned(),
            channel: channel.to_owned(),
            deliver_to: deliver_to.to_owned(),
            records: records.to_vec(),
            now_ms,
        };
        let committed = self.commit_batches(std::slice::from_ref(&batch))?;
        Ok(committed[0])
    }

    /// Stores every batch's records above its stream's `high`, all in one
    /// durable transaction, in order; one [`Committed`] per batch.
    ///
    /// # Errors
    /// When SQLite fails; nothing is stored then.
    pub fn commit_batches(&mut self, batches: &[SinkBatch]) -> Result<Vec<Committed>, SinkError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let committed = batches
            .iter()
            .map(|b| commit_in(&tx, b))
            .collect::<Result<Vec<_>, _>>()?;
        tx.commit()?;
        Ok(committed)
    }

    /// Up to `limit` records after `after`, in sequence order.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn read(
        &self,
        device: &str,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Stored>, SinkError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, time_ms, received_ms, format, body FROM record WHERE device = ?1 AND channel = ?2 AND seq > ?3 ORDER BY seq LIMIT ?4",
        )?;
        let rows = stmt.query_map(
            params![device, channel, i64_of(after), i64_of(limit as u64)],
            |r| {
                Ok(Stored {
                    seq: u64_of(r.get(0)?),
                    time_ms: r.get(1)?,
                    received_ms: r.get(2)?,
                    format: r.get(3)?,
                    body: r.get(4)?,
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A consumer took every record up to `upto`: they are removed. Returns how
    /// many.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn consume(&mut self, device: &str, channel: &str, upto: u64) -> Result<u64, SinkError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (n, bytes): (i64, Option<i64>) = tx.query_row(
            "SELECT COUNT(*), SUM(length(body)) FROM record WHERE device = ?1 AND channel = ?2 AND seq <= ?3",
            params![device, channel, i64_of(upto)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        tx.execute(
            "DELETE FROM record WHERE device = ?1 AND channel = ?2 AND seq <= ?3",
            params![device, channel, i64_of(upto)],
        )?;
        tx.execute(
            "UPDATE stream SET consumed = max(consumed, ?3), records = records - ?4, bytes = max(0, bytes - ?5) WHERE device = ?1 AND channel = ?2",
            params![device, channel, i64_of(upto), n, bytes.unwrap_or(0)],
        )?;
        tx.commit()?;
        Ok(u64_of(n))
    }

    /// The destination refused record `seq` of (device, channel).
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn failed(
        &mut self,
        device: &str,
        channel: &str,
        seq: u64,
        reason: &str,
    ) -> Result<(), SinkError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO failure VALUES (?1, ?2, ?3, ?4)",
            params![device, channel, i64_of(seq), reason],
        )?;
        Ok(())
    }

    /// Refused records of (device, channel) in `(after, upto]`, in order.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn failures(
        &self,
        device: &str,
        channel: &str,
        after: u64,
        upto: u64,
    ) -> Result<Vec<(u64, String)>, SinkError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, reason FROM failure WHERE device = ?1 AND channel = ?2 AND seq > ?3 AND seq <= ?4 ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![device, channel, i64_of(after), i64_of(upto)], |r| {
            Ok((u64_of(r.get(0)?), r.get(1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Returns the pages of consumed records to the file system (incremental
    /// vacuum, then a WAL checkpoint), so the file shrinks as consumers keep up.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn compact(&mut self) -> Result<(), SinkError> {
        {
            let mut vacuum = self.conn.prepare("PRAGMA incremental_vacuum")?;
            let mut rows = vacuum.query([])?;
            while rows.next()?.is_some() {}
        }
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        Ok(())
    }

    /// Every stream's state, by device and channel.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn streams(&self) -> Result<Vec<Stream>, SinkError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT device, channel, deliver_to, high, consumed, records, bytes, duplicates FROM stream ORDER BY device, channel",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Stream {
                device: r.get(0)?,
                channel: r.get(1)?,
                deliver_to: r.get(2)?,
                high: u64_of(r.get(3)?),
                consumed: u64_of(r.get(4)?),
                records: u64_of(r.get(5)?),
                bytes: u64_of(r.get(6)?),
                duplicates: u64_of(r.get(7)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// One batch inside a writing transaction: the records above `high` stored,
/// the stream's counters and `high` raised.
fn commit_in(tx: &rusqlite::Transaction<'_>, batch: &SinkBatch) -> Result<Committed, SinkError> {
    let SinkBatch {
        device,
        channel,
        deliver_to,
        records,
        now_ms,
    } = batch;
    tx.execute(
        "INSERT OR IGNORE INTO stream VALUES (?1, ?2, ?3, 0, 0, 0, 0, 0)",
        params![device, channel, deliver_to],
    )?;
    let high: i64 = tx.query_row(
        "SELECT high FROM stream WHERE device = ?1 AND channel = ?2",
        params![device, channel],
        |r| r.get(0),
    )?;
    let high = u64_of(high);
    let (mut stored, mut bytes, mut upto) = (0u64, 0u64, high);
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO record (device, channel, seq, time_ms, received_ms, format, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for r in records.iter().filter(|r| r.seq > high) {
            insert.execute(params![
                device,
                channel,
                i64_of(r.seq),
                r.time_ms,
                now_ms,
                r.format,
                r.body
            ])?;
            stored += 1;
            bytes += r.body.len() as u64;
            upto = upto.max(r.seq);
        }
    }
    let duplicates = records.len() as u64 - stored;
    tx.execute(
        "UPDATE stream SET high = ?3, records = records + ?4, bytes = bytes + ?5, duplicates = duplicates + ?6, deliver_to = ?7 WHERE device = ?1 AND channel = ?2",
        params![
            device,
            channel,
            i64_of(upto),
            i64_of(stored),
            i64_of(bytes),
            i64_of(duplicates),
            deliver_to
        ],
    )?;

    Ok(Committed {
        upto,
        stored,
        duplicates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(seqs: &[u64]) -> Vec<SyncRecord> {
        seqs.iter()
            .map(|&seq| SyncRecord {
                seq,
                time_ms: seq as i64,
                format: "json".into(),
                body: format!("{{\"n\":{seq}}}").into_bytes(),
            })
            .collect()
    }

    fn seqs(v: &[Stored]) -> Vec<u64> {
        v.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn a_record_delivered_twice_is_stored_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = SqliteSink::open(dir.path()).expect("open");
        let c = s
            .commit("d", "c", "hub", &recs(&[1, 2, 3]), 0)
            .expect("commit");
        assert_eq!((c.upto, c.stored, c.duplicates), (3, 3, 0));
        let c = s
            .commit("d", "c", "hub", &recs(&[2, 3, 4]), 0)
            .expect("commit");
        assert_eq!((c.upto, c.stored, c.duplicates), (4, 1, 2));
        assert_eq!(seqs(&s.read("d", "c", 0, 100).expect("read")), [1, 2, 3, 4]);
        // Another device's channel of the same name is another stream.
        let c = s.commit("e", "c", "hub", &recs(&[1]), 0).expect("commit");
        assert_eq!(c.stored, 1);
    }

    #[test]
    fn consumed_records_go_and_still_count_as_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = SqliteSink::open(dir.path()).expect("open");
        s.commit("d", "c", "hub", &recs(&[1, 2, 3]), 0)
            .expect("commit");
        assert_eq!(s.consume("d", "c", 2).expect("consume"), 2);
        assert_eq!(seqs(&s.read("d", "c", 0, 100).expect("read")), [3]);
        let c = s
            .commit("d", "c", "hub", &recs(&[1, 2]), 0)
            .expect("commit");
        assert_eq!((c.upto, c.stored), (3, 0));
        let st = &s.streams().expect("streams")[0];
        assert_eq!(
            (st.high, st.consumed, st.records, st.duplicates),
            (3, 2, 1, 2)
        );
    }

    #[test]
    fn two_hubs_sharing_one_sink_store_each_record_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = SqliteSink::open(dir.path()).expect("open a");
        let mut b = SqliteSink::open(dir.path()).expect("open b");
        a.commit("d", "c", "hub", &recs(&[1, 2]), 0).expect("a");
        let c = b.commit("d", "c", "hub", &recs(&[1, 2, 3]), 0).expect("b");
        assert_eq!((c.upto, c.stored, c.duplicates), (3, 1, 2));
        assert_eq!(a.high("d", "c").expect("high"), 3);
        assert_eq!(seqs(&a.read("d", "c", 0, 100).expect("read")), [1, 2, 3]);
    }
}
