//! The sink's SQLite engine: `STATE_DIR/sink.sqlite` (or `[hub].sink`).
//!
//! A batch commits in one `BEGIN IMMEDIATE` transaction (WAL, `synchronous =
//! FULL`), `high` read and raised inside it, so several hub processes may share
//! one file and de-duplication holds across them.

use std::path::Path;
use std::time::Duration;

use gateway_core::wire::SyncRecord;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::sink::{Acked, Committed, Expired, Grant, SinkBatch, Stored, Stream, StreamKey};

/// File name of the sink inside the state directory.
pub const FILE_NAME: &str = "sink.sqlite";

/// 2: consumers' cursors (grants) and `stream.expired_unread`.
const SCHEMA_VERSION: i64 = 2;

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
    expired_unread INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (device, channel)
) STRICT;
-- A consumer granted a stream, and how far it acknowledged: the grant is the
-- cursor, so granting, acknowledging and removing change in one transaction.
CREATE TABLE IF NOT EXISTS cursor (
    device     TEXT NOT NULL,
    channel    TEXT NOT NULL,
    consumer   TEXT NOT NULL,
    acked      INTEGER NOT NULL,
    granted_ms INTEGER NOT NULL,
    PRIMARY KEY (device, channel, consumer)
) STRICT;
CREATE INDEX IF NOT EXISTS cursor_by_consumer ON cursor (consumer);
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
CREATE INDEX IF NOT EXISTS record_by_received ON record (received_ms);
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
        // Sinks made before retention counted what expired unread.
        let has_expired: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('stream') WHERE name = 'expired_unread')",
            [],
            |r| r.get(0),
        )?;
        if !has_expired {
            conn.execute_batch(
                "ALTER TABLE stream ADD COLUMN expired_unread INTEGER NOT NULL DEFAULT 0",
            )?;
        }
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
            "SELECT device, channel, deliver_to, high, consumed, records, bytes, duplicates, expired_unread FROM stream ORDER BY device, channel",
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
                expired_unread: u64_of(r.get(8)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Grants `consumer` the stream (device, channel): a cursor at 0, so it
    /// reads every record still in the sink. Whether the grant is new.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn grant(
        &mut self,
        device: &str,
        channel: &str,
        consumer: &str,
        now_ms: i64,
    ) -> Result<bool, SinkError> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO cursor (device, channel, consumer, acked, granted_ms) VALUES (?1, ?2, ?3, 0, ?4)",
            params![device, channel, consumer, now_ms],
        )?;
        Ok(n == 1)
    }

    /// Withdraws `consumer`'s grant of (device, channel), with its cursor; the
    /// records every remaining consumer has acknowledged go. `None` when there
    /// was no grant, else how many records went.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn revoke_grant(
        &mut self,
        device: &str,
        channel: &str,
        consumer: &str,
    ) -> Result<Option<u64>, SinkError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "DELETE FROM cursor WHERE device = ?1 AND channel = ?2 AND consumer = ?3",
            params![device, channel, consumer],
        )?;
        if n == 0 {
            return Ok(None);
        }
        let removed = free_acked(&tx, device, channel)?;
        tx.commit()?;
        Ok(Some(removed))
    }

    /// Withdraws every grant of `consumer` (it was revoked); returns how many
    /// grants there were.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn drop_consumer(&mut self, consumer: &str) -> Result<u64, SinkError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let streams: Vec<(String, String)> = {
            let mut st = tx.prepare("SELECT device, channel FROM cursor WHERE consumer = ?1")?;
            let rows = st.query_map([consumer], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        tx.execute("DELETE FROM cursor WHERE consumer = ?1", [consumer])?;
        for (device, channel) in &streams {
            free_acked(&tx, device, channel)?;
        }
        tx.commit()?;
        Ok(streams.len() as u64)
    }

    /// The grants, of one consumer or of all, by consumer, device, channel.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn grants(&self, consumer: Option<&str>) -> Result<Vec<Grant>, SinkError> {
        let mut st = self.conn.prepare_cached(
            "SELECT consumer, device, channel, acked FROM cursor WHERE ?1 IS NULL OR consumer = ?1 ORDER BY consumer, device, channel",
        )?;
        let rows = st.query_map([consumer], |r| {
            Ok(Grant {
                consumer: r.get(0)?,
                stream: StreamKey {
                    device: r.get(1)?,
                    channel: r.get(2)?,
                },
                acked: u64_of(r.get(3)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// `consumer`'s cursor on (device, channel); `None` without a grant.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn cursor(
        &self,
        device: &str,
        channel: &str,
        consumer: &str,
    ) -> Result<Option<u64>, SinkError> {
        let acked: Option<i64> = self
            .conn
            .query_row(
                "SELECT acked FROM cursor WHERE device = ?1 AND channel = ?2 AND consumer = ?3",
                params![device, channel, consumer],
                |r| r.get(0),
            )
            .optional()?;
        Ok(acked.map(u64_of))
    }

    /// `consumer` has every record of (device, channel) up to `upto`: its
    /// cursor moves there (never back), and the records every consumer granted
    /// the stream has acknowledged go. Refused beyond the stream's `high`.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn ack(
        &mut self,
        device: &str,
        channel: &str,
        consumer: &str,
        upto: u64,
    ) -> Result<Acked, SinkError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let acked: Option<i64> = tx
            .query_row(
                "SELECT acked FROM cursor WHERE device = ?1 AND channel = ?2 AND consumer = ?3",
                params![device, channel, consumer],
                |r| r.get(0),
            )
            .optional()?;
        let Some(acked) = acked.map(u64_of) else {
            return Ok(Acked::NotGranted);
        };
        let high: Option<i64> = tx
            .query_row(
                "SELECT high FROM stream WHERE device = ?1 AND channel = ?2",
                params![device, channel],
                |r| r.get(0),
            )
            .optional()?;
        let high = high.map_or(0, u64_of);
        if upto > high {
            return Ok(Acked::Beyond { high });
        }
        let cursor = acked.max(upto);
        tx.execute(
            "UPDATE cursor SET acked = ?4 WHERE device = ?1 AND channel = ?2 AND consumer = ?3",
            params![device, channel, consumer, i64_of(cursor)],
        )?;
        let removed = free_acked(&tx, device, channel)?;
        tx.commit()?;
        Ok(Acked::Moved { cursor, removed })
    }

    /// Removes records committed before `before_ms` that are still waiting
    /// (retention): counted per stream in `expired_unread`. One [`Expired`]
    /// per stream that lost records.
    ///
    /// # Errors
    /// When SQLite fails; nothing is removed then.
    pub fn expire(&mut self, before_ms: i64) -> Result<Vec<Expired>, SinkError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let expired: Vec<Expired> = {
            let mut st = tx.prepare(
                "SELECT device, channel, COUNT(*), SUM(length(body)), MIN(seq), MAX(seq) FROM record WHERE received_ms < ?1 GROUP BY device, channel ORDER BY device, channel",
            )?;
            let rows = st.query_map([before_ms], |r| {
                Ok(Expired {
                    stream: StreamKey {
                        device: r.get(0)?,
                        channel: r.get(1)?,
                    },
                    records: u64_of(r.get(2)?),
                    bytes: u64_of(r.get::<_, Option<i64>>(3)?.unwrap_or(0)),
                    first: u64_of(r.get(4)?),
                    last: u64_of(r.get(5)?),
                })
            })?;
            rows.collect::<Result<_, _>>()?
        };
        tx.execute("DELETE FROM record WHERE received_ms < ?1", [before_ms])?;
        for e in &expired {
            tx.execute(
                "UPDATE stream SET records = max(0, records - ?3), bytes = max(0, bytes - ?4), expired_unread = expired_unread + ?3 WHERE device = ?1 AND channel = ?2",
                params![
                    e.stream.device,
                    e.stream.channel,
                    i64_of(e.records),
                    i64_of(e.bytes)
                ],
            )?;
        }
        tx.commit()?;
        Ok(expired)
    }
}

/// Inside a writing transaction: removes the records of (device, channel) that
/// every consumer granted it has acknowledged. A stream nobody is granted keeps
/// its records (until retention). Returns how many went.
fn free_acked(
    tx: &rusqlite::Transaction<'_>,
    device: &str,
    channel: &str,
) -> Result<u64, SinkError> {
    let low: Option<i64> = tx.query_row(
        "SELECT MIN(acked) FROM cursor WHERE device = ?1 AND channel = ?2",
        params![device, channel],
        |r| r.get(0),
    )?;
    let Some(low) = low else {
        return Ok(0);
    };
    let (n, bytes): (i64, Option<i64>) = tx.query_row(
        "SELECT COUNT(*), SUM(length(body)) FROM record WHERE device = ?1 AND channel = ?2 AND seq <= ?3",
        params![device, channel, low],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if n > 0 {
        tx.execute(
            "DELETE FROM record WHERE device = ?1 AND channel = ?2 AND seq <= ?3",
            params![device, channel, low],
        )?;
    }
    tx.execute(
        "UPDATE stream SET consumed = max(consumed, ?3), records = max(0, records - ?4), bytes = max(0, bytes - ?5) WHERE device = ?1 AND channel = ?2",
        params![device, channel, low, n, bytes.unwrap_or(0)],
    )?;
    Ok(u64_of(n))
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
        "INSERT OR IGNORE INTO stream (device, channel, deliver_to, high, consumed, records, bytes, duplicates) VALUES (?1, ?2, ?3, 0, 0, 0, 0, 0)",
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

    /// One step against the sink and the model.
    #[derive(Debug, Clone)]
    enum Op {
        Commit(u64),
        Grant(usize),
        Revoke(usize),
        Ack(usize, u64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (1u64..4).prop_map(Op::Commit),
            (0usize..3).prop_map(Op::Grant),
            (0usize..3).prop_map(Op::Revoke),
            ((0usize..3), (0u64..14)).prop_map(|(c, u)| Op::Ack(c, u)),
        ]
    }

    proptest::proptest! {
        /// Against a model: records stay while some granted consumer has not
        /// acknowledged them (all of them with no grant), acknowledgements
        /// past `high` are refused, cursors never move back.
        #[test]
        fn cursors_and_removal_follow_the_model(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut s = SqliteSink::open(dir.path()).expect("open");
            let names = ["a", "b", "c"];
            let (mut high, mut cursors) = (0u64, std::collections::BTreeMap::<usize, u64>::new());
            let mut removed_upto = 0u64;
            for op in ops {
                match op {
                    Op::Commit(n) => {
                        let seqs: Vec<u64> = (high + 1..=high + n).collect();
                        s.commit("d", "c", "hub", &recs(&seqs), 0).expect("commit");
                        high += n;
                    }
                    Op::Grant(c) => {
                        let new = s.grant("d", "c", names[c], 0).expect("grant");
                        proptest::prop_assert_eq!(new, !cursors.contains_key(&c));
                        cursors.entry(c).or_insert(0);
                    }
                    Op::Revoke(c) => {
                        let got = s.revoke_grant("d", "c", names[c]).expect("revoke");
                        proptest::prop_assert_eq!(got.is_some(), cursors.remove(&c).is_some());
                    }
                    Op::Ack(c, upto) => {
                        let got = s.ack("d", "c", names[c], upto).expect("ack");
                        let want = match cursors.get_mut(&c) {
                            None => Acked::NotGranted,
                            Some(_) if upto > high => Acked::Beyond { high },
                            Some(cur) => {
                                *cur = (*cur).max(upto);
                                let cursor = *cur;
                                let low = cursors.values().copied().min().unwrap_or(0);
                                let removed = low.saturating_sub(removed_upto);
                                Acked::Moved { cursor, removed }
                            }
                        };
                        proptest::prop_assert_eq!(got, want);
                    }
                }
                if let Some(low) = cursors.values().copied().min() {
                    removed_upto = removed_upto.max(low);
                }
                let kept: Vec<u64> = (removed_upto + 1..=high).collect();
                proptest::prop_assert_eq!(seqs(&s.read("d", "c", 0, 1000).expect("read")), kept);
            }
        }
    }
}
