//! The hub's sink of channel records, behind a trait the daemon calls;
//! [`crate::sqlite::SqliteSink`] is the embedded engine.
//!
//! Invariants every engine keeps (checked by `tests/hub_store.rs` and end to
//! end in `tests/e2e/channels.rs`):
//! - A record is keyed by (device, channel, seq). Per (device, channel) the sink
//!   keeps `high`, the highest sequence number ever committed; a record at or
//!   below `high` is a duplicate and is not stored again, even after a consumer
//!   took it away. Edges send in sequence order, so this is exactly-once.
//! - [`Sink::commit`] stores batches durably and only then reports each one's
//!   `upto`, which the hub acknowledges to the edge: an acknowledged record
//!   survives a power cut.
//! - Several hubs may share one engine: `high` is read and raised inside the
//!   writing transaction, so de-duplication holds across them.
//! - A consumer reads a stream only with a grant, which is its cursor. Each
//!   consumer's acknowledgement moves only its own cursor, never back and never
//!   beyond `high`; a record is removed once every consumer granted its stream
//!   has acknowledged it (a stream nobody is granted keeps its records), or
//!   by retention ([`Sink::expire`], counted as `expired_unread`). `high` stays.
//! - A stream delivered to another edge is removed as that edge confirms it
//!   ([`Sink::consume`]).

//!
//! Cancel safety: a dropped [`Sink::commit`] may still have committed. That is
//! safe: the edge resends whatever was not acknowledged and `high` drops the
//! duplicates.

use gateway_core::wire::SyncRecord;

use crate::error::StoreFuture;

/// A record in the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its sequence number in the source channel.
    pub seq: u64,
    /// When the edge accepted it, Unix ms.
    pub time_ms: i64,
    /// When the hub committed it, Unix ms.
    pub received_ms: i64,
    /// Declared format.
    pub format: String,
    /// The body.
    pub body: Vec<u8>,
}

impl From<Stored> for SyncRecord {
    fn from(r: Stored) -> Self {
        SyncRecord {
            seq: r.seq,
            time_ms: r.time_ms,
            format: r.format,
            body: r.body,
        }
    }
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Every record up to here is in the sink (the ack to send).
    pub upto: u64,
    /// Records stored by this commit.
    pub stored: u64,
    /// Records that were already there.
    pub duplicates: u64,
}

/// One (device, channel) stream's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    /// Source device.
    pub device: String,
    /// Source channel.
    pub channel: String,
    /// Declared destination.
    pub deliver_to: String,
    /// Highest sequence number committed.
    pub high: u64,
    /// Highest sequence number a consumer acknowledged.
    pub consumed: u64,
    /// Records waiting for a consumer.
    pub records: u64,
    /// Their body bytes.
    pub bytes: u64,
    /// Duplicates received and not stored, ever.
    pub duplicates: u64,
    /// Records removed by retention before every consumer had them, ever.
    pub expired_unread: u64,
}

/// A consumer's grant of a stream, with its cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The consumer.
    pub consumer: String,
    /// The stream it may read.
    pub stream: StreamKey,
    /// It acknowledged every record up to here.
    pub acked: u64,
}

/// What a consumer's acknowledgement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// Its cursor is at `cursor`; `removed` records left the sink.
    Moved {
        /// The consumer's cursor now.
        cursor: u64,
        /// Records every consumer of the stream now has, removed.
        removed: u64,
    },
    /// Refused: nothing up to there exists; the stream's `high`.
    Beyond {
        /// The highest sequence number committed.
        high: u64,
    },
    /// Refused: the consumer is not granted the stream.
    NotGranted,
}

/// Records of one stream removed by retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// The stream.
    pub stream: StreamKey,
    /// How many.
    pub records: u64,
    /// Their body bytes.
    pub bytes: u64,
    /// The lowest sequence number removed.
    pub first: u64,
    /// The highest.
    pub last: u64,
}

/// One stream's batch to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkBatch {
    /// Source device (from its verified certificate).
    pub device: String,
    /// Source channel.
    pub channel: String,
    /// Declared destination: `hub` or `DEVICE/CHANNEL`.
    pub deliver_to: String,
    /// The records, in sequence order.
    pub records: Vec<SyncRecord>,
    /// When the hub received them, Unix ms.
    pub now_ms: i64,
}

/// A stream of the sink: records of one source (device, channel).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamKey {
    /// Source device (from its verified certificate).
    pub device: String,
    /// Source channel.
    pub channel: String,
}

impl StreamKey {
    /// The stream of (`device`, `channel`).
    pub fn new(device: &str, channel: &str) -> Self {
        StreamKey {
            device: device.to_owned(),
            channel: channel.to_owned(),
        }
    }
}

/// The hub's sink. Arguments are owned, so an engine can move them to its own
/// thread or connection.
pub trait Sink: Send + Sync {
    /// The highest sequence number committed for `stream`; 0 if none.
    fn high(&self, stream: StreamKey) -> StoreFuture<'_, u64>;
    /// Commits `batches` in order (one transaction where the engine has them):
    /// each batch's records above its stream's `high` are stored durably before
    /// this returns. One [`Committed`] per batch; on an error nothing is stored.
    fn commit(&self, batches: Vec<SinkBatch>) -> StoreFuture<'_, Vec<Committed>>;
    /// Up to `limit` records of `stream` after `after`, in sequence order.
    fn read(&self, stream: StreamKey, after: u64, limit: usize) -> StoreFuture<'_, Vec<Stored>>;
    /// The destination edge took every record of `stream` up to `upto`: they
    /// are removed. Returns how many.
    fn consume(&self, stream: StreamKey, upto: u64) -> StoreFuture<'_, u64>;
    /// The destination refused record `seq` of `stream`, for `reason`.
    fn failed(&self, stream: StreamKey, seq: u64, reason: String) -> StoreFuture<'_, ()>;
    /// Refused records of `stream` in `(after, upto]`, in order.
    fn failures(
        &self,
        stream: StreamKey,
        after: u64,
        upto: u64,
    ) -> StoreFuture<'_, Vec<(u64, String)>>;
    /// Every stream's state, by device and channel.
    fn streams(&self) -> StoreFuture<'_, Vec<Stream>>;
    /// Grants `consumer` the stream, its cursor at 0; whether it is new.
    fn grant(&self, stream: StreamKey, consumer: String, now_ms: i64) -> StoreFuture<'_, bool>;
    /// Withdraws a grant and its cursor; `None` when there was none, else how
    /// many records that freed.
    fn revoke_grant(&self, stream: StreamKey, consumer: String) -> StoreFuture<'_, Option<u64>>;
    /// Withdraws every grant of `consumer`; returns how many.
    fn drop_consumer(&self, consumer: String) -> StoreFuture<'_, u64>;
    /// The grants of `consumer`, or of everyone.
    fn grants(&self, consumer: Option<String>) -> StoreFuture<'_, Vec<Grant>>;
    /// `consumer`'s cursor on `stream`; `None` without a grant.
    fn cursor(&self, stream: StreamKey, consumer: String) -> StoreFuture<'_, Option<u64>>;
    /// `consumer` has every record of `stream` up to `upto` (see [`Acked`]).
    fn ack(&self, stream: StreamKey, consumer: String, upto: u64) -> StoreFuture<'_, Acked>;
    /// Removes records committed before `before_ms` (retention).
    fn expire(&self, before_ms: i64) -> StoreFuture<'_, Vec<Expired>>;
    /// Upkeep between bursts (the embedded engine returns consumed records'
    /// pages to the file system); an engine that needs none does nothing.
    fn maintain(&self) -> StoreFuture<'_, ()>;
}
