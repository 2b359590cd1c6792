//! The durable record buffer of an edge's data channels: `STATE_DIR/buffer.sqlite`.
//!
//! Invariants (checked by the model-based test in `tests/buffer_model.rs`):
//! - A record is acknowledged to its producer only after the transaction that
//!   holds it committed (WAL, `synchronous = FULL`): a record that got a sequence
//!   number survives a power cut.
//! - Per channel, sequence numbers start at 1 and grow by one per accepted record,
//!   across restarts, acks, expiry and drops; they are never reused.
//! - Records are read in sequence order; reading never removes anything. Only
//!   [`Buffer::ack`] (delivered), [`Buffer::expire`] (TTL) and a drop under
//!   `when_full = "drop_oldest"` remove records, always a prefix of the channel.
//! - A channel's accounted size ([`accounted`] per record) never exceeds its
//!   quota after an append, and the file's size on disk stays within the sum
//!   of the channels' accounted sizes plus a fixed allowance for the schema
//!   (16 KiB pages pack records of any size to within 1/8 of their bodies).
//! - Every body carries a CRC-32 checked on read; a record that fails it is moved
//!   to `quarantine` and counted, never returned and never a crash loop.
//!
//! Appends take a batch (group commit): one `BEGIN IMMEDIATE` transaction for many
//! producers' records, so durability costs one sync per batch, not per record.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// File name of the buffer inside the state directory.
pub const FILE_NAME: &str = "buffer.sqlite";

/// Bytes accounted per record on top of its body (row and index).
pub const RECORD_OVERHEAD: u64 = 64;

/// Database page size: with 4 KiB pages records of 2 KiB took 1.9 times their
/// size on disk (one per page); 16 KiB pages waste at most about 10 % for any
/// record size (measured 200 B to 20 KB).
pub const PAGE_SIZE: u32 = 16_384;

/// What a record with a body of `len` bytes counts against its channel's
/// quota: the body, an eighth for page packing, and [`RECORD_OVERHEAD`].
pub fn accounted(len: usize) -> u64 {
    let len = len as u64;
    len + len / 8 + RECORD_OVERHEAD
}

const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS channel (
    name     TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL,
    bytes    INTEGER NOT NULL,
    records  INTEGER NOT NULL,
    dropped  INTEGER NOT NULL,
    expired  INTEGER NOT NULL,
    corrupt  INTEGER NOT NULL,
    acked     INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0
) STRICT;
-- Records that left undelivered, as ranges: for receipts.
CREATE TABLE IF NOT EXISTS gap (
    channel  TEXT NOT NULL,
    first    INTEGER NOT NULL,
    last     INTEGER NOT NULL,
    reason   TEXT NOT NULL,
    time_ms  INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS gap_by_channel ON gap (channel, last);
-- Spool files committed, by identity (name, size, mtime): a file found again
-- in in/ after a crash is moved on, never committed twice.
CREATE TABLE IF NOT EXISTS spool_file (
    channel  TEXT NOT NULL,
    source   TEXT NOT NULL,
    first    INTEGER NOT NULL,
    last     INTEGER NOT NULL,
    PRIMARY KEY (channel, source)
) STRICT;
-- A rowid table: bodies of a kilobyte and more pack densely in its leaves,
-- where a WITHOUT ROWID table spent over four times their size on disk.
CREATE TABLE IF NOT EXISTS record (
    id       INTEGER PRIMARY KEY,
    channel  TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    time_ms  INTEGER NOT NULL,
    format   TEXT NOT NULL,
    body     BLOB NOT NULL,
    crc      INTEGER NOT NULL,
    UNIQUE (channel, seq)
) STRICT;
-- Who handed in which records, as ranges (authenticated producers only;
-- consecutive requests of one producer share a row): for receipts.
CREATE TABLE IF NOT EXISTS producer_range (
    channel  TEXT NOT NULL,
    first    INTEGER NOT NULL,
    last     INTEGER NOT NULL,
    producer TEXT NOT NULL,
    PRIMARY KEY (channel, first)
) STRICT;
CREATE TABLE IF NOT EXISTS quarantine (
    channel  TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    time_ms  INTEGER NOT NULL,
    format   TEXT NOT NULL,
    body     BLOB NOT NULL,
    crc      INTEGER NOT NULL
) STRICT;
";

/// A record handed in by a producer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    /// Declared format (`json`, `xml`, `csv`, `text`).
    pub format: String,
    /// The body, as received.
    pub body: Vec<u8>,
}

/// A record in the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its sequence number in the channel.
    pub seq: u64,
    /// When it was accepted, Unix ms.
    pub time_ms: i64,
    /// Declared format.
    pub format: String,
    /// The body.
    pub body: Vec<u8>,
}

impl From<Record> for gateway_core::wire::SyncRecord {
    fn from(r: Record) -> Self {
        gateway_core::wire::SyncRecord {
            seq: r.seq,
            time_ms: r.time_ms,
            format: r.format,
            body: r.body,
        }
    }
}

/// What became of a record, for receipts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// In the buffer, not yet acknowledged by a hub.
    Accepted,
    /// Committed by a hub, not yet confirmed by its destination.
    DeliveredToHub,
    /// Confirmed by its destination.
    Delivered,
    /// Could not be delivered; why.
    Failed(String),
    /// Removed by the channel's TTL before delivery.
    Expired(String),
    /// Removed to make room (`when_full = "drop_oldest"`).
    Dropped(String),
}

impl Status {
    /// The status name in receipts.
    pub fn name(&self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::DeliveredToHub => "delivered_to_hub",
            Status::Delivered => "delivered",
            Status::Failed(_) => "failed",
            Status::Expired(_) => "expired",
            Status::Dropped(_) => "dropped",
        }
    }

    /// Why, for the statuses that have a reason.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Status::Failed(r) | Status::Expired(r) | Status::Dropped(r) => Some(r),
            _ => None,
        }
    }
}

/// A record's receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Its sequence number.
    pub seq: u64,
    /// What became of it.
    pub status: Status,
    /// The authenticated producer that handed it in, if one did.
    pub producer: Option<String>,
}

/// What a full channel does with new records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Refuse the batch.
    Reject,
    /// Remove the oldest records until the batch fits.
    DropOldest,
}

/// One producer's batch in a group commit.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// The channel.
    pub channel: &'a str,
    /// Its records.
    pub records: &'a [NewRecord],
    /// The channel's quota (accounted bytes).
    pub quota: u64,
    /// What to do when it does not fit.
    pub when_full: WhenFull,
    /// The spool file the records came from, remembered in the same
    /// transaction (see [`Buffer::spooled`]).
    pub source: Option<&'a str>,
    /// The authenticated producer that handed them in, kept for receipts.
    pub producer: Option<&'a str>,
}

/// Producer ranges kept per channel; older ones are forgotten (their
/// receipts then name no producer).
pub const MAX_PRODUCER_RANGES: u64 = 100_000;

/// The result of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Sequence numbers given, in batch order.
    pub first: u64,
    /// The last one given (equal to `first - 1` for an empty batch).
    pub last: u64,
    /// Records removed to make room (`drop_oldest`), as an inclusive range.
    pub dropped: Option<(u64, u64)>,
}

/// A channel's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backlog {
    /// Records waiting.
    pub records: u64,
    /// Their accounted size.
    pub bytes: u64,
    /// The next sequence number to be given.
    pub next_seq: u64,
    /// Oldest waiting record's time, Unix ms.
    pub oldest_ms: Option<i64>,
    /// Records removed by `drop_oldest`, ever.
    pub dropped: u64,
    /// Records removed by TTL, ever.
    pub expired: u64,
    /// Records quarantined for a bad CRC, ever.
    pub corrupt: u64,
}

/// A buffer operation failed; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// The batch does not fit the channel's quota (`when_full = "reject"`), or
    /// one record alone is larger than the quota.
    #[error("channel {channel} is full: {needed} bytes needed, {free} free of {quota}")]
    Full {
        /// The channel.
        channel: String,
        /// Accounted bytes the batch needs.
        needed: u64,
        /// Accounted bytes free.
        free: u64,
        /// The quota.
        quota: u64,
    },
    /// The database was written by a newer gatewayd.
    #[error("buffer schema {0} is newer than this gatewayd understands")]
    NewerSchema(i64),
    /// SQLite refused.
    #[error("buffer: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

fn size(body_len: usize) -> u64 {
    accounted(body_len)
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The durable buffer.
#[derive(Debug)]
pub struct Buffer {
    conn: Connection,
}

impl Buffer {
    /// Opens (or creates) `STATE_DIR/buffer.sqlite`.
    ///
    /// # Errors
    /// When SQLite cannot open or initialise it, or its schema is newer.
    pub fn open(state_dir: &Path) -> Result<Self, BufferError> {
        let conn = Connection::open(state_dir.join(FILE_NAME))?;
        // Another process (`gatewayd channels`) may hold the lock for a moment.
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // auto_vacuum and page_size take effect only before the first table exists.
        conn.pragma_update(None, "page_size", PAGE_SIZE)?;
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(BufferError::NewerSchema(version));
        }
        if version == 1 {
            conn.execute_batch(
                "ALTER TABLE channel ADD COLUMN acked INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE channel ADD COLUMN delivered INTEGER NOT NULL DEFAULT 0;",
            )?;
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Self { conn })
    }

    fn ensure_channel(
        tx: &rusqlite::Transaction<'_>,
        channel: &str,
    ) -> Result<(), rusqlite::Error> {
        // Cached: every append runs these (a statement parsed per request
        // cost several per cent of ingest).
        tx.prepare_cached(
            "INSERT OR IGNORE INTO channel (name, next_seq, bytes, records, dropped, expired, corrupt) VALUES (?1, 1, 0, 0, 0, 0, 0)",
        )?
        .execute([channel])?;
        Ok(())
    }

    /// Appends a batch to `channel` in one durable transaction, at `now_ms`.
    /// With `DropOldest`, the oldest records are removed (and counted) until the
    /// batch fits.
    ///
    /// # Errors
    /// [`BufferError::Full`] when the batch does not fit (or cannot fit at all);
    /// then nothing is appended.
    pub fn append(
        &mut self,
        channel: &str,
        records: &[NewRecord],
        quota: u64,
        when_full: WhenFull,
        now_ms: i64,
    ) -> Result<Appended, BufferError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let appended = Self::append_in(&tx, channel, records, quota, when_full, now_ms)?;
        tx.commit()?;
        Ok(appended)
    }

    /// Group commit: appends several producers' batches in one durable
    /// transaction. A batch that does not fit gets its own
    /// [`BufferError::Full`] and changes nothing; the others are committed.
    ///
    /// # Errors
    /// When SQLite fails; then nothing of the group is appended.
    pub fn append_group(
        &mut self,
        batches: &[Batch<'_>],
        now_ms: i64,
    ) -> Result<Vec<Result<Appended, BufferError>>, BufferError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut out = Vec::with_capacity(batches.len());
        for b in batches {
            match Self::append_in(&tx, b.channel, b.records, b.quota, b.when_full, now_ms) {
                Err(e @ BufferError::Full { .. }) => out.push(Err(e)),
                Err(e) => return Err(e),
                Ok(a) => {
                    if let Some(source) = b.source {
                        tx.prepare_cached(
                            "INSERT OR REPLACE INTO spool_file VALUES (?1, ?2, ?3, ?4)",
                        )?
                        .execute(params![
                            b.channel,
                            source,
                            i64_of(a.first),
                            i64_of(a.last)
                        ])?;
                    }
                    if let Some(producer) = b.producer {
                        Self::produced(&tx, b.channel, producer, a.first, a.last)?;
                    }
                    out.push(Ok(a));
                }
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Records `first..=last` of `channel` came from `producer`: extends
    /// the channel's last range when it is the same producer's and adjoins,
    /// else adds one (forgetting the oldest past [`MAX_PRODUCER_RANGES`]).
    fn produced(
        tx: &rusqlite::Transaction<'_>,
        channel: &str,
        producer: &str,
        first: u64,
        last: u64,
    ) -> Result<(), rusqlite::Error> {
        let latest: Option<(i64, i64, String)> = tx
            .prepare_cached(
                "SELECT first, last, producer FROM producer_range WHERE channel = ?1 ORDER BY first DESC LIMIT 1",
            )?
            .query_row([channel], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        match latest {
            Some((f, l, p)) if p == producer && u64_of(l) + 1 == first => {
                tx.prepare_cached(
                    "UPDATE producer_range SET last = ?3 WHERE channel = ?1 AND first = ?2",
                )?
                .execute(params![channel, f, i64_of(last)])?;
            }
            _ => {
                tx.execute(
                    "INSERT OR REPLACE INTO producer_range VALUES (?1, ?2, ?3, ?4)",
                    params![channel, i64_of(first), i64_of(last), producer],
                )?;
                tx.execute(
                    "DELETE FROM producer_range WHERE channel = ?1 AND first < (SELECT first FROM producer_range WHERE channel = ?1 ORDER BY first DESC LIMIT 1 OFFSET ?2)",
                    params![channel, i64_of(MAX_PRODUCER_RANGES - 1)],
                )?;
            }
        }
        Ok(())
    }

    fn append_in(
        tx: &rusqlite::Transaction<'_>,
        channel: &str,
        records: &[NewRecord],
        quota: u64,
        when_full: WhenFull,
        now_ms: i64,
    ) -> Result<Appended, BufferError> {
        Self::ensure_channel(tx, channel)?;
        let (next_seq, bytes): (i64, i64) = tx
            .prepare_cached("SELECT next_seq, bytes FROM channel WHERE name = ?1")?
            .query_row([channel], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let (next_seq, mut bytes) = (u64_of(next_seq), u64_of(bytes));
        let needed: u64 = records.iter().map(|r| size(r.body.len())).sum();
        let full = |bytes: u64| BufferError::Full {
            channel: channel.to_owned(),
            needed,
            free: quota.saturating_sub(bytes),
            quota,
        };
        if needed > quota {
            return Err(full(0));
        }
        let mut dropped = None;
        if bytes + needed > quota {
            if when_full == WhenFull::Reject {
                return Err(full(bytes));
            }
            // Remove the oldest records until the batch fits.
            let mut freed_to = None;
            {
                let mut stmt = tx.prepare(
                    "SELECT seq, length(body) FROM record WHERE channel = ?1 ORDER BY seq",
                )?;
                let mut rows = stmt.query([channel])?;
                while bytes + needed > quota {
                    let Some(row) = rows.next()? else { break };
                    let (seq, len): (i64, i64) = (row.get(0)?, row.get(1)?);
                    bytes -= size(u64_of(len) as usize).min(bytes);
                    freed_to = Some(u64_of(seq));
                }
            }
            if let Some(to) = freed_to {
                let from: i64 = tx.query_row(
                    "SELECT MIN(seq) FROM record WHERE channel = ?1",
                    [channel],
                    |r| r.get(0),
                )?;
                let n = tx.execute(
                    "DELETE FROM record WHERE channel = ?1 AND seq <= ?2",
                    params![channel, i64_of(to)],
                )?;
                tx.execute(
                    "UPDATE channel SET records = records - ?2, dropped = dropped + ?2, bytes = ?3 WHERE name = ?1",
                    params![channel, n as i64, i64_of(bytes)],
                )?;
                tx.execute(
                    "INSERT INTO gap VALUES (?1, ?2, ?3, 'dropped: quota', ?4)",
                    params![channel, from, i64_of(to), now_ms],
                )?;
                dropped = Some((u64_of(from), to));
            }
        }
        {
            let mut insert = tx.prepare_cached("INSERT INTO record (channel, seq, time_ms, format, body, crc) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
            for (i, r) in records.iter().enumerate() {
                let crc = crc32fast::hash(&r.body);
                insert.execute(params![
                    channel,
                    i64_of(next_seq + i as u64),
                    now_ms,
                    r.format,
                    r.body,
                    i64::from(crc)
                ])?;
            }
        }
        let n = records.len() as u64;
        tx.prepare_cached(
            "UPDATE channel SET next_seq = ?2, bytes = ?3, records = records + ?4 WHERE name = ?1",
        )?
        .execute(params![
            channel,
            i64_of(next_seq + n),
            i64_of(bytes + needed),
            i64_of(n)
        ])?;
        Ok(Appended {
            first: next_seq,
            last: next_seq + n - 1,
            dropped,
        })
    }

    /// Up to `limit` records of `channel` after sequence `after`, in order. A
    /// record whose CRC fails is quarantined (and counted) and skipped.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn read(
        &mut self,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Record>, BufferError> {
        self.read_upto(channel, after, limit, u64::MAX)
    }

    /// As [`Buffer::read`], stopping once the bodies read reach `max_bytes`
    /// (at least one record is returned when there is one).
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn read_upto(
        &mut self,
        channel: &str,
        after: u64,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Vec<Record>, BufferError> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let mut corrupt = Vec::new();
        {
            let mut stmt = self.conn.prepare_cached("SELECT seq, time_ms, format, body, crc FROM record WHERE channel = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")?;
            let mut rows = stmt.query(params![channel, i64_of(after), i64_of(limit as u64)])?;
            while let Some(row) = rows.next()? {
                let seq = u64_of(row.get(0)?);
                let body: Vec<u8> = row.get(3)?;
                let crc: i64 = row.get(4)?;
                if i64::from(crc32fast::hash(&body)) != crc {
                    corrupt.push(seq);
                    continue;
                }
                bytes += body.len() as u64;
                out.push(Record {
                    seq,
                    time_ms: row.get(1)?,
                    format: row.get(2)?,
                    body,
                });
                if bytes >= max_bytes {
                    break;
                }
            }
        }
        if !corrupt.is_empty() {
            self.quarantine(channel, &corrupt)?;
        }
        Ok(out)
    }

    fn quarantine(&mut self, channel: &str, seqs: &[u64]) -> Result<(), BufferError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for seq in seqs {
            let len: Option<i64> = tx
                .query_row(
                    "SELECT length(body) FROM record WHERE channel = ?1 AND seq = ?2",
                    params![channel, i64_of(*seq)],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(len) = len else { continue };
            tx.execute(
                "INSERT INTO quarantine SELECT channel, seq, time_ms, format, body, crc FROM record WHERE channel = ?1 AND seq = ?2",
                params![channel, i64_of(*seq)],
            )?;
            tx.execute(
                "DELETE FROM record WHERE channel = ?1 AND seq = ?2",
                params![channel, i64_of(*seq)],
            )?;
            tx.execute(
                "UPDATE channel SET records = records - 1, corrupt = corrupt + 1, bytes = max(0, bytes - ?2) WHERE name = ?1",
                params![channel, i64_of(size(u64_of(len) as usize))],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Removes every record of `channel` up to and including `seq` (delivered).
    /// Returns how many were removed. Acking what is already gone is a no-op.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn ack(&mut self, channel: &str, seq: u64) -> Result<u64, BufferError> {
        self.conn.execute(
            "UPDATE channel SET acked = max(acked, ?2) WHERE name = ?1",
            params![channel, i64_of(seq)],
        )?;
        self.remove_prefix(channel, i64_of(seq), None)
    }

    /// The destination confirmed every record up to `seq` (for `deliver_to =
    /// "hub"` that is the hub's ack); receipts report them delivered.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn delivered(&mut self, channel: &str, seq: u64) -> Result<(), BufferError> {
        self.conn.execute(
            "UPDATE channel SET delivered = max(delivered, ?2) WHERE name = ?1",
            params![channel, i64_of(seq)],
        )?;
        Ok(())
    }

    /// The destination refused record `seq`: its receipt says failed, why.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn failed(
        &mut self,
        channel: &str,
        seq: u64,
        reason: &str,
        now_ms: i64,
    ) -> Result<(), BufferError> {
        let seq = i64_of(seq);
        let known: bool = self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM gap WHERE channel = ?1 AND first = ?2 AND last = ?2)",
            params![channel, seq],
            |r| r.get(0),
        )?;
        if !known {
            self.conn.execute(
                "INSERT INTO gap VALUES (?1, ?2, ?2, ?3, ?4)",
                params![channel, seq, format!("failed: {reason}"), now_ms],
            )?;
        }
        Ok(())
    }

    /// The fate of records `after + 1 ..` (at most `limit`), in sequence order.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn receipts(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Receipt>, BufferError> {
        let Some((next_seq, acked, delivered)) = self
            .conn
            .query_row(
                "SELECT next_seq, acked, delivered FROM channel WHERE name = ?1",
                [channel],
                |r| Ok((u64_of(r.get(0)?), u64_of(r.get(1)?), u64_of(r.get(2)?))),
            )
            .optional()?
        else {
            return Ok(Vec::new());
        };
        let end = next_seq.min(after.saturating_add(limit as u64).saturating_add(1));
        if after + 1 >= end {
            return Ok(Vec::new());
        }
        let (lo, hi) = (i64_of(after + 1), i64_of(end - 1));
        let mut gaps: Vec<(u64, u64, String)> = Vec::new();
        {
            let mut stmt = self.conn.prepare_cached(
                "SELECT first, last, reason FROM gap WHERE channel = ?1 AND last >= ?2 AND first <= ?3 ORDER BY first",
            )?;
            let rows = stmt.query_map(params![channel, lo, hi], |r| {
                Ok((u64_of(r.get(0)?), u64_of(r.get(1)?), r.get(2)?))
            })?;
            for g in rows {
                gaps.push(g?);
            }
        }
        let seqs_in = |table: &str| -> Result<std::collections::HashSet<u64>, BufferError> {
            let mut stmt = self.conn.prepare_cached(&format!(
                "SELECT seq FROM {table} WHERE channel = ?1 AND seq BETWEEN ?2 AND ?3"
            ))?;
            let rows = stmt.query_map(params![channel, lo, hi], |r| r.get::<_, i64>(0))?;
            let mut set = std::collections::HashSet::new();
            for r in rows {
                set.insert(u64_of(r?));
            }
            Ok(set)
        };
        let corrupt = seqs_in("quarantine")?;
        let waiting = seqs_in("record")?;
        let mut producers: Vec<(u64, u64, String)> = Vec::new();
        {
            let mut stmt = self.conn.prepare_cached(
                "SELECT first, last, producer FROM producer_range WHERE channel = ?1 AND last >= ?2 AND first <= ?3 ORDER BY first",
            )?;
            let rows = stmt.query_map(params![channel, lo, hi], |r| {
                Ok((u64_of(r.get(0)?), u64_of(r.get(1)?), r.get(2)?))
            })?;
            for p in rows {
                producers.push(p?);
            }
        }
        Ok((after + 1..end)
            .map(|seq| {
                let status = if corrupt.contains(&seq) {
                    Status::Failed("corrupt in the buffer (CRC mismatch), quarantined".into())
                } else if let Some((_, _, reason)) =
                    gaps.iter().find(|(f, l, _)| (*f..=*l).contains(&seq))
                {
                    match reason.split_once(": ") {
                        Some(("expired", why)) => Status::Expired(why.to_owned()),
                        Some(("failed", why)) => Status::Failed(why.to_owned()),
                        Some((_, why)) => Status::Dropped(why.to_owned()),
                        None => Status::Dropped(reason.clone()),
                    }
                } else if waiting.contains(&seq) {
                    Status::Accepted
                } else if seq <= delivered {
                    Status::Delivered
                } else if seq <= acked {
                    Status::DeliveredToHub
                } else {
                    Status::Accepted
                };
                let producer = producers
                    .iter()
                    .find(|(f, l, _)| (*f..=*l).contains(&seq))
                    .map(|(_, _, p)| p.clone());
                Receipt {
                    seq,
                    status,
                    producer,
                }
            })
            .collect())
    }

    /// Removes the records of `channel` accepted before `cutoff_ms` (TTL), as a
    /// prefix: the first younger record stops it. Returns how many were removed.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn expire(&mut self, channel: &str, cutoff_ms: i64) -> Result<u64, BufferError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let first_young: Option<i64> = tx.query_row(
            "SELECT MIN(seq) FROM record WHERE channel = ?1 AND time_ms >= ?2",
            params![channel, cutoff_ms],
            |r| r.get(0),
        )?;
        drop(tx);
        let bound = match first_young {
            Some(y) => y - 1,
            None => i64::MAX,
        };
        self.remove_prefix(channel, bound, Some(("expired", "expired: ttl", cutoff_ms)))
    }

    /// Removes the channel's records up to `bound` in one transaction; `gone`
    /// (counter column, gap reason, time) marks them as removed undelivered.
    fn remove_prefix(
        &mut self,
        channel: &str,
        bound: i64,
        gone: Option<(&str, &str, i64)>,
    ) -> Result<u64, BufferError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (n, body, first, last): (i64, Option<i64>, Option<i64>, Option<i64>) = tx.query_row(
            "SELECT COUNT(*), SUM(length(body) + length(body) / 8), MIN(seq), MAX(seq) FROM record WHERE channel = ?1 AND seq <= ?2",
            params![channel, bound],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        if n == 0 {
            return Ok(0);
        }
        tx.execute(
            "DELETE FROM record WHERE channel = ?1 AND seq <= ?2",
            params![channel, bound],
        )?;
        let freed = u64_of(body.unwrap_or(0)) + RECORD_OVERHEAD * u64_of(n);
        let extra = gone
            .map(|(c, _, _)| format!(", {c} = {c} + ?3"))
            .unwrap_or_default();
        tx.execute(
            &format!("UPDATE channel SET records = records - ?3, bytes = max(0, bytes - ?2){extra} WHERE name = ?1"),
            params![channel, i64_of(freed), n],
        )?;
        if let Some((_, reason, time_ms)) = gone {
            tx.execute(
                "INSERT INTO gap VALUES (?1, ?2, ?3, ?4, ?5)",
                params![channel, first, last, reason, time_ms],
            )?;
        }
        tx.commit()?;
        Ok(u64_of(n))
    }

    /// The sequence numbers given to spool file `source`, if it was committed.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn spooled(&self, channel: &str, source: &str) -> Result<Option<(u64, u64)>, BufferError> {
        Ok(self
            .conn
            .query_row(
                "SELECT first, last FROM spool_file WHERE channel = ?1 AND source = ?2",
                params![channel, source],
                |r| Ok((u64_of(r.get(0)?), u64_of(r.get(1)?))),
            )
            .optional()?)
    }

    /// Forgets the spool files of `channel` that are no longer waiting in
    /// `in/` (`present` holds the identities of those that are): a committed
    /// file's identity is kept only until it has been moved on, so the table
    /// does not grow with every file ever spooled. Returns how many it forgot.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn forget_spooled(
        &mut self,
        channel: &str,
        present: &std::collections::HashSet<String>,
    ) -> Result<u64, BufferError> {
        let known: Vec<String> = {
            let mut st = self
                .conn
                .prepare_cached("SELECT source FROM spool_file WHERE channel = ?1")?;
            st.query_map([channel], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        let gone: Vec<&String> = known.iter().filter(|s| !present.contains(*s)).collect();
        if gone.is_empty() {
            return Ok(0);
        }
        let tx = self.conn.transaction()?;
        for s in &gone {
            tx.execute(
                "DELETE FROM spool_file WHERE channel = ?1 AND source = ?2",
                params![channel, s],
            )?;
        }
        tx.commit()?;
        Ok(gone.len() as u64)
    }

    /// Every channel that ever had a record, by name.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn channels(&self) -> Result<Vec<String>, BufferError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name FROM channel ORDER BY name")?;
        let names = stmt.query_map([], |r| r.get(0))?;
        Ok(names.collect::<Result<_, _>>()?)
    }

    /// The state of `channel` (all zero, next sequence 1, when unknown).
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn backlog(&self, channel: &str) -> Result<Backlog, BufferError> {
        let row = self
            .conn
            .query_row(
                "SELECT next_seq, bytes, records, dropped, expired, corrupt FROM channel WHERE name = ?1",
                [channel],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?, r.get::<_, i64>(4)?, r.get::<_, i64>(5)?)),
            )
            .optional()?;
        let Some((next_seq, bytes, records, dropped, expired, corrupt)) = row else {
            return Ok(Backlog {
                next_seq: 1,
                ..Backlog::default()
            });
        };
        let oldest_ms: Option<i64> = self
            .conn
            .query_row(
                "SELECT time_ms FROM record WHERE channel = ?1 ORDER BY seq LIMIT 1",
                [channel],
                |r| r.get(0),
            )
            .optional()?;
        Ok(Backlog {
            records: u64_of(records),
            bytes: u64_of(bytes),
            next_seq: u64_of(next_seq),
            oldest_ms,
            dropped: u64_of(dropped),
            expired: u64_of(expired),
            corrupt: u64_of(corrupt),
        })
    }

    /// Checkpoints the WAL and returns free pages to the file system (after a
    /// backlog drained), so the file shrinks.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn compact(&mut self) -> Result<(), BufferError> {
        while self.compact_step(u32::MAX)? > 0 {}
        Ok(())
    }

    /// One bounded step of [`Buffer::compact`]: frees up to `pages` free pages
    /// (4 KiB each), checkpointing when none are left, and returns how many
    /// remain, so a caller can let other work in between steps.
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn compact_step(&mut self, pages: u32) -> Result<u64, BufferError> {
        // incremental_vacuum frees one page per step of the statement: step it
        // to the end. Freed pages leave the file at the next checkpoint.
        {
            let mut vacuum = self
                .conn
                .prepare(&format!("PRAGMA incremental_vacuum({pages})"))?;
            let mut rows = vacuum.query([])?;
            while rows.next()?.is_some() {}
        }
        let left: i64 = self
            .conn
            .pragma_query_value(None, "freelist_count", |r| r.get(0))?;
        if left == 0 {
            self.conn
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        }
        Ok(u64_of(left))
    }
}

/// Read-only access to a buffer another process owns (`gatewayd channels`):
/// never takes a write lock, so it neither waits for nor blocks the daemon.
#[derive(Debug)]
pub struct BufferReader(Buffer);

impl BufferReader {
    /// Opens `STATE_DIR/buffer.sqlite` read-only.
    ///
    /// # Errors
    /// When it does not exist or SQLite cannot open it.
    pub fn open(state_dir: &Path) -> Result<Self, BufferError> {
        let conn = Connection::open_with_flags(
            state_dir.join(FILE_NAME),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(BufferReader(Buffer { conn }))
    }

    /// See [`Buffer::channels`].
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn channels(&self) -> Result<Vec<String>, BufferError> {
        self.0.channels()
    }

    /// See [`Buffer::backlog`].
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn backlog(&self, channel: &str) -> Result<Backlog, BufferError> {
        self.0.backlog(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: usize) -> NewRecord {
        NewRecord {
            format: "json".into(),
            body: vec![b'x'; n],
        }
    }

    #[test]
    fn a_group_commit_refuses_only_the_batch_that_does_not_fit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Buffer::open(dir.path()).expect("open");
        let (small, big) = ([rec(10)], [rec(800)]);
        let batches = [
            Batch {
                channel: "a",
                records: &small,
                quota: 1_000,
                when_full: WhenFull::Reject,
                source: None,
                producer: None,
            },
            Batch {
                channel: "a",
                records: &big,
                quota: 1_000,
                when_full: WhenFull::Reject,
                source: None,
                producer: None,
            },
            Batch {
                channel: "b",
                records: &big,
                quota: 1_000,
                when_full: WhenFull::Reject,
                source: None,
                producer: None,
            },
        ];
        let r = b.append_group(&batches, 1).expect("group");
        assert!(matches!(
            r[0],
            Ok(Appended {
                first: 1,
                last: 1,
                dropped: None
            })
        ));
        assert!(matches!(r[1], Err(BufferError::Full { .. })), "{:?}", r[1]);
        assert!(matches!(r[2], Ok(Appended { first: 1, .. })));
        assert_eq!(b.backlog("a").expect("a").records, 1);
        assert_eq!(b.backlog("b").expect("b").records, 1);
        // Sequence numbers survive a reopen.
        drop(b);
        let mut b = Buffer::open(dir.path()).expect("reopen");
        assert_eq!(
            b.append("a", &small, 1_000, WhenFull::Reject, 2)
                .expect("append")
                .first,
            2
        );
    }

    #[test]
    fn receipts_name_the_producer_of_each_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Buffer::open(dir.path()).expect("open");
        let two = [rec(10), rec(10)];
        for producer in [
            Some("pension-app"),
            Some("pension-app"),
            Some("hr-app"),
            None,
        ] {
            let batch = [Batch {
                channel: "c",
                records: &two,
                quota: 1_000_000,
                when_full: WhenFull::Reject,
                source: None,
                producer,
            }];
            assert!(b.append_group(&batch, 1).expect("group")[0].is_ok());
        }
        let names: Vec<Option<String>> = b
            .receipts("c", 0, 100)
            .expect("receipts")
            .into_iter()
            .map(|r| r.producer)
            .collect();
        let p = |n: &str| Some(n.to_owned());
        assert_eq!(
            names,
            [
                p("pension-app"),
                p("pension-app"),
                p("pension-app"),
                p("pension-app"),
                p("hr-app"),
                p("hr-app"),
                None,
                None
            ]
        );
        // Adjoining requests of one producer share a row.
        let rows: i64 = b
            .conn
            .query_row("SELECT COUNT(*) FROM producer_range", [], |r| r.get(0))
            .expect("count");
        assert_eq!(rows, 2);
    }

    #[test]
    fn spool_identities_are_kept_only_while_the_file_waits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Buffer::open(dir.path()).expect("open");
        let one = [rec(10)];
        for source in ["a.json:10:1", "b.json:10:2"] {
            let batch = [Batch {
                channel: "c",
                records: &one,
                quota: 1_000_000,
                when_full: WhenFull::Reject,
                source: Some(source),
                producer: None,
            }];
            assert!(b.append_group(&batch, 1).expect("group")[0].is_ok());
        }
        let waiting: std::collections::HashSet<String> = ["a.json:10:1".to_owned()].into();
        assert_eq!(b.forget_spooled("c", &waiting).expect("forget"), 1);
        assert_eq!(b.spooled("c", "a.json:10:1").expect("q"), Some((1, 1)));
        assert_eq!(b.spooled("c", "b.json:10:2").expect("q"), None);
        assert_eq!(b.forget_spooled("c", &waiting).expect("again"), 0);
        assert_eq!(b.forget_spooled("c", &Default::default()).expect("all"), 1);
    }
}

#[cfg(test)]
mod compaction {
    use super::*;

    #[test]
    fn a_full_quota_holds_on_disk_for_any_record_size() {
        const QUOTA: u64 = 4 << 20;
        // The schema's pages: each table and index has at least one.
        const ALLOWANCE: u64 = 16 * PAGE_SIZE as u64;
        for len in [200, 1024, 2100, 5000, 20_000, 70_000] {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut b = Buffer::open(dir.path()).expect("open");
            let rec = [NewRecord {
                format: "raw".into(),
                body: (0..len).map(|i| (i * 7 % 251) as u8).collect(),
            }];
            let mut n = 0;
            while b.append("c", &rec, QUOTA, WhenFull::Reject, 0).is_ok() {
                n += 1;
            }
            b.compact().expect("checkpoint");
            let disk = std::fs::metadata(dir.path().join(FILE_NAME))
                .expect("meta")
                .len();
            assert!(
                disk <= QUOTA + ALLOWANCE,
                "{n} records of {len} bytes: {disk} bytes on disk for a quota of {QUOTA}"
            );
        }
    }

    #[test]
    fn the_file_shrinks_after_a_backlog_drains() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Buffer::open(dir.path()).expect("open");
        let recs: Vec<NewRecord> = (0..1000)
            .map(|_| NewRecord {
                format: "json".into(),
                body: vec![b'x'; 1024],
            })
            .collect();
        for _ in 0..20 {
            b.append("c", &recs, u64::MAX, WhenFull::Reject, 0)
                .expect("append");
        }
        b.compact().expect("checkpoint");
        let size = || {
            std::fs::metadata(dir.path().join(FILE_NAME))
                .expect("meta")
                .len()
        };
        let full = size();
        assert!(full > 20_000_000, "{full}");
        b.ack("c", 20_000).expect("ack");
        b.compact().expect("compact");
        assert!(size() < full / 10, "{} of {full} bytes left", size());
    }
}
