//! The sink's PostgreSQL engine: the invariants of [`crate::sink`] across any
//! number of hubs.
//!
//! A commit is one transaction. Per batch it makes the stream's row if
//! missing, locks it (`SELECT high ... FOR UPDATE`: a second hub committing
//! the same stream waits here, then reads the first one's `high`), inserts the
//! records above `high` keyed by (device, channel, seq) with conflicts
//! ignored, and raises `high`. Only after `COMMIT` returns does the hub
//! acknowledge, so an acknowledged record is on the server's disk (with
//! `synchronous_commit` on, on the standby's too when one is synchronous).
//!
//! The inserts of a batch are pipelined: sent together on the connection,
//! answered in order, so a batch costs a few round trips, not one per record.

use deadpool_postgres::GenericClient;
use futures_util::future::try_join_all;
use tokio_postgres::types::ToSql;

use super::Pg;
use crate::error::{StoreError, StoreFuture};
use crate::sink::{Acked, Committed, Expired, Grant, Sink, SinkBatch, Stored, Stream, StreamKey};

/// The sink of hubs sharing one PostgreSQL database.
#[derive(Clone, Debug)]
pub struct PgSink {
    pg: Pg,
}

impl PgSink {
    /// The sink in `pg`'s database.
    pub fn new(pg: Pg) -> Self {
        PgSink { pg }
    }
}

type R<T> = Result<T, StoreError>;

fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The upsert of a stream's row, which also locks it and returns its `high`
/// (`ON CONFLICT DO UPDATE` reads the newest committed row, under READ
/// COMMITTED too): the statement a dialect without `ON CONFLICT` replaces
/// (with `MERGE`, or an insert ignoring the duplicate key and a `SELECT ...
/// FOR UPDATE`).
const LOCK_STREAM: &str =
    "INSERT INTO stream (device, channel, deliver_to, high, consumed, records, bytes, duplicates)
     VALUES ($1, $2, $3, 0, 0, 0, 0, 0)
     ON CONFLICT (device, channel) DO UPDATE SET deliver_to = EXCLUDED.deliver_to
     RETURNING id, high";

/// Records inserted by one statement at most.
const INSERT_ROWS: usize = 100;

/// The insert of `n` records of one stream: `$1` its number, `$2`
/// received, then (seq, time, format, body) per record.
fn insert_rows(n: usize) -> String {
    let mut q = String::from(
        "INSERT INTO record (stream, seq, time_ms, received_ms, format, body) VALUES ",
    );
    for i in 0..n {
        let p = 3 + 4 * i;
        if i > 0 {
            q.push_str(", ");
        }
        q.push_str(&format!(
            "($1, ${p}, ${}, $2, ${}, ${})",
            p + 1,
            p + 2,
            p + 3
        ));
    }
    q.push_str(" ON CONFLICT (stream, seq) DO NOTHING");
    q
}

async fn commit_in(tx: &deadpool_postgres::Transaction<'_>, b: &SinkBatch) -> R<Committed> {
    // Made if missing, and locked either way: a second hub committing this
    // stream waits here, then reads the first one's `high`.
    let lock = tx.prepare_cached(LOCK_STREAM).await?;
    let row = tx
        .query_one(&lock, &[&b.device, &b.channel, &b.deliver_to])
        .await?;
    let (stream, high): (i64, i64) = (row.get(0), row.get(1));
    let high = u64_of(high);
    let fresh: Vec<_> = b.records.iter().filter(|r| r.seq > high).collect();
    let seqs: Vec<i64> = fresh.iter().map(|r| i64_of(r.seq)).collect();
    // Rows of up to INSERT_ROWS per statement (one statement prepared per
    // size), the statements pipelined.
    let mut statements = Vec::new();
    for chunk in fresh.chunks(INSERT_ROWS) {
        statements.push(tx.prepare_cached(&insert_rows(chunk.len())).await?);
    }
    let inserted = try_join_all(
        fresh
            .chunks(INSERT_ROWS)
            .zip(seqs.chunks(INSERT_ROWS))
            .zip(&statements)
            .map(|((rows, seqs), st)| {
                let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(2 + 4 * rows.len());
                params.extend([&stream as &(dyn ToSql + Sync), &b.now_ms]);
                for (r, seq) in rows.iter().zip(seqs) {
                    params.extend([seq as &(dyn ToSql + Sync), &r.time_ms, &r.format, &r.body]);
                }
                tx.execute_raw(st, params)
            }),
    )
    .await?;
    let stored: u64 = inserted.iter().sum();
    let bytes: u64 = if stored == fresh.len() as u64 {
        fresh.iter().map(|r| r.body.len() as u64).sum()
    } else {
        // Some were there already (cannot happen while `high` is kept in
        // this transaction; counted from the table if it does).
        let first = seqs.first().copied().unwrap_or(0);
        let row = tx
            .query_one(
                "SELECT COALESCE(sum(octet_length(body)), 0)::BIGINT FROM record
                 WHERE stream = $1 AND seq >= $2 AND received_ms = $3",
                &[&stream, &first, &b.now_ms],
            )
            .await?;
        u64_of(row.get(0))
    };
    let upto = fresh.iter().map(|r| r.seq).max().unwrap_or(high).max(high);
    let duplicates = b.records.len() as u64 - stored;
    let raise = tx
        .prepare_cached(
            "UPDATE stream SET high = $3, records = records + $4, bytes = bytes + $5,
                 duplicates = duplicates + $6, deliver_to = $7
             WHERE device = $1 AND channel = $2",
        )
        .await?;
    tx.execute(
        &raise,
        &[
            &b.device,
            &b.channel,
            &i64_of(upto),
            &i64_of(stored),
            &i64_of(bytes),
            &i64_of(duplicates),
            &b.deliver_to,
        ],
    )
    .await?;
    Ok(Committed {
        upto,
        stored,
        duplicates,
    })
}

/// Removes the records every consumer granted the stream has acknowledged.
async fn free_acked(c: &impl GenericClient, device: &str, channel: &str) -> R<u64> {
    let low: Option<i64> = c
        .query_one(
            "SELECT MIN(acked) FROM cursor WHERE device = $1 AND channel = $2",
            &[&device, &channel],
        )
        .await?
        .get(0);
    let Some(low) = low else {
        return Ok(0);
    };
    remove_upto(c, device, channel, low).await
}

/// Removes the records of a stream up to `upto` and counts them as consumed.
async fn remove_upto(c: &impl GenericClient, device: &str, channel: &str, upto: i64) -> R<u64> {
    let gone = c
        .query_one(
            "WITH gone AS (
                 DELETE FROM record WHERE stream = (SELECT id FROM stream WHERE device = $1 AND channel = $2) AND seq <= $3
                 RETURNING octet_length(body) AS n
             ) SELECT COUNT(*), COALESCE(SUM(n), 0)::BIGINT FROM gone",
            &[&device, &channel, &upto],
        )
        .await?;
    let (n, bytes): (i64, i64) = (gone.get(0), gone.get(1));
    c.execute(
        "UPDATE stream SET consumed = GREATEST(consumed, $3), records = GREATEST(0, records - $4),
             bytes = GREATEST(0, bytes - $5)
         WHERE device = $1 AND channel = $2",
        &[&device, &channel, &upto, &n, &bytes],
    )
    .await?;
    Ok(u64_of(n))
}

impl PgSink {
    async fn commit(&self, batches: Vec<SinkBatch>) -> R<Vec<Committed>> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        let mut out = Vec::with_capacity(batches.len());
        for b in &batches {
            out.push(commit_in(&tx, b).await?);
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn read(&self, k: StreamKey, after: u64, limit: usize) -> R<Vec<Stored>> {
        let c = self.pg.client().await?;
        let st = c
            .prepare_cached(
                "SELECT seq, time_ms, received_ms, format, body FROM record
                 WHERE stream = (SELECT id FROM stream WHERE device = $1 AND channel = $2)
                   AND seq > $3 ORDER BY seq LIMIT $4",
            )
            .await?;
        let rows = c
            .query(
                &st,
                &[&k.device, &k.channel, &i64_of(after), &i64_of(limit as u64)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Stored {
                seq: u64_of(r.get(0)),
                time_ms: r.get(1),
                received_ms: r.get(2),
                format: r.get(3),
                body: r.get(4),
            })
            .collect())
    }

    async fn consume(&self, k: StreamKey, upto: u64) -> R<u64> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        let n = remove_upto(&tx, &k.device, &k.channel, i64_of(upto)).await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn streams(&self) -> R<Vec<Stream>> {
        let c = self.pg.client().await?;
        let rows = c
            .query(
                "SELECT device, channel, deliver_to, high, consumed, records, bytes, duplicates, expired_unread
                 FROM stream ORDER BY device, channel",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Stream {
                device: r.get(0),
                channel: r.get(1),
                deliver_to: r.get(2),
                high: u64_of(r.get(3)),
                consumed: u64_of(r.get(4)),
                records: u64_of(r.get(5)),
                bytes: u64_of(r.get(6)),
                duplicates: u64_of(r.get(7)),
                expired_unread: u64_of(r.get(8)),
            })
            .collect())
    }

    async fn revoke_grant(&self, k: StreamKey, consumer: String) -> R<Option<u64>> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        let n = tx
            .execute(
                "DELETE FROM cursor WHERE device = $1 AND channel = $2 AND consumer = $3",
                &[&k.device, &k.channel, &consumer],
            )
            .await?;
        if n == 0 {
            return Ok(None);
        }
        let removed = free_acked(&tx, &k.device, &k.channel).await?;
        tx.commit().await?;
        Ok(Some(removed))
    }

    async fn drop_consumer(&self, consumer: String) -> R<u64> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        let streams: Vec<(String, String)> = tx
            .query(
                "DELETE FROM cursor WHERE consumer = $1 RETURNING device, channel",
                &[&consumer],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for (device, channel) in &streams {
            free_acked(&tx, device, channel).await?;
        }
        tx.commit().await?;
        Ok(streams.len() as u64)
    }

    async fn grants(&self, consumer: Option<String>) -> R<Vec<Grant>> {
        let c = self.pg.client().await?;
        let rows = c
            .query(
                "SELECT consumer, device, channel, acked FROM cursor
                 WHERE $1::TEXT IS NULL OR consumer = $1 ORDER BY consumer, device, channel",
                &[&consumer],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Grant {
                consumer: r.get(0),
                stream: StreamKey {
                    device: r.get(1),
                    channel: r.get(2),
                },
                acked: u64_of(r.get(3)),
            })
            .collect())
    }

    async fn ack(&self, k: StreamKey, consumer: String, upto: u64) -> R<Acked> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        let acked = tx
            .query_opt(
                "SELECT acked FROM cursor WHERE device = $1 AND channel = $2 AND consumer = $3 FOR UPDATE",
                &[&k.device, &k.channel, &consumer],
            )
            .await?;
        let Some(acked) = acked.map(|r| u64_of(r.get(0))) else {
            return Ok(Acked::NotGranted);
        };
        let high = tx
            .query_opt(
                "SELECT high FROM stream WHERE device = $1 AND channel = $2",
                &[&k.device, &k.channel],
            )
            .await?
            .map_or(0, |r| u64_of(r.get(0)));
        if upto > high {
            return Ok(Acked::Beyond { high });
        }
        let cursor = acked.max(upto);
        tx.execute(
            "UPDATE cursor SET acked = $4 WHERE device = $1 AND channel = $2 AND consumer = $3",
            &[&k.device, &k.channel, &consumer, &i64_of(cursor)],
        )
        .await?;
        let removed = free_acked(&tx, &k.device, &k.channel).await?;
        tx.commit().await?;
        Ok(Acked::Moved { cursor, removed })
    }

    async fn expire(&self, before_ms: i64) -> R<Vec<Expired>> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        let rows = tx
            .query(
                "WITH gone AS (
                     DELETE FROM record WHERE received_ms < $1
                     RETURNING stream, seq, octet_length(body) AS n
                 ) SELECT s.device, s.channel, COUNT(*), COALESCE(SUM(n), 0)::BIGINT, MIN(seq), MAX(seq)
                   FROM gone JOIN stream s ON s.id = gone.stream
                   GROUP BY s.device, s.channel ORDER BY s.device, s.channel",
                &[&before_ms],
            )
            .await?;
        let expired: Vec<Expired> = rows
            .iter()
            .map(|r| Expired {
                stream: StreamKey {
                    device: r.get(0),
                    channel: r.get(1),
                },
                records: u64_of(r.get(2)),
                bytes: u64_of(r.get(3)),
                first: u64_of(r.get(4)),
                last: u64_of(r.get(5)),
            })
            .collect();
        for e in &expired {
            tx.execute(
                "UPDATE stream SET records = GREATEST(0, records - $3), bytes = GREATEST(0, bytes - $4),
                     expired_unread = expired_unread + $3
                 WHERE device = $1 AND channel = $2",
                &[
                    &e.stream.device,
                    &e.stream.channel,
                    &i64_of(e.records),
                    &i64_of(e.bytes),
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(expired)
    }
}

impl Sink for PgSink {
    fn high(&self, k: StreamKey) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let c = self.pg.client().await?;
            Ok(c.query_opt(
                "SELECT high FROM stream WHERE device = $1 AND channel = $2",
                &[&k.device, &k.channel],
            )
            .await?
            .map_or(0, |r| u64_of(r.get(0))))
        })
    }

    fn commit(&self, batches: Vec<SinkBatch>) -> StoreFuture<'_, Vec<Committed>> {
        Box::pin(self.commit(batches))
    }

    fn read(&self, k: StreamKey, after: u64, limit: usize) -> StoreFuture<'_, Vec<Stored>> {
        Box::pin(self.read(k, after, limit))
    }

    fn consume(&self, k: StreamKey, upto: u64) -> StoreFuture<'_, u64> {
        Box::pin(self.consume(k, upto))
    }

    fn failed(&self, k: StreamKey, seq: u64, reason: String) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let c = self.pg.client().await?;
            c.execute(
                "INSERT INTO failure (device, channel, seq, reason) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (device, channel, seq) DO UPDATE SET reason = $4",
                &[&k.device, &k.channel, &i64_of(seq), &reason],
            )
            .await?;
            Ok(())
        })
    }

    fn failures(&self, k: StreamKey, after: u64, upto: u64) -> StoreFuture<'_, Vec<(u64, String)>> {
        Box::pin(async move {
            let c = self.pg.client().await?;
            let rows = c
                .query(
                    "SELECT seq, reason FROM failure WHERE device = $1 AND channel = $2 AND seq > $3 AND seq <= $4 ORDER BY seq",
                    &[&k.device, &k.channel, &i64_of(after), &i64_of(upto)],
                )
                .await?;
            Ok(rows.iter().map(|r| (u64_of(r.get(0)), r.get(1))).collect())
        })
    }

    fn streams(&self) -> StoreFuture<'_, Vec<Stream>> {
        Box::pin(self.streams())
    }

    fn grant(&self, k: StreamKey, consumer: String, now_ms: i64) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let c = self.pg.client().await?;
            let n = c
                .execute(
                    "INSERT INTO cursor (device, channel, consumer, acked, granted_ms) VALUES ($1, $2, $3, 0, $4)
                     ON CONFLICT (device, channel, consumer) DO NOTHING",
                    &[&k.device, &k.channel, &consumer, &now_ms],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn revoke_grant(&self, k: StreamKey, consumer: String) -> StoreFuture<'_, Option<u64>> {
        Box::pin(self.revoke_grant(k, consumer))
    }

    fn drop_consumer(&self, consumer: String) -> StoreFuture<'_, u64> {
        Box::pin(self.drop_consumer(consumer))
    }

    fn grants(&self, consumer: Option<String>) -> StoreFuture<'_, Vec<Grant>> {
        Box::pin(self.grants(consumer))
    }

    fn cursor(&self, k: StreamKey, consumer: String) -> StoreFuture<'_, Option<u64>> {
        Box::pin(async move {
            let c = self.pg.client().await?;
            Ok(c.query_opt(
                "SELECT acked FROM cursor WHERE device = $1 AND channel = $2 AND consumer = $3",
                &[&k.device, &k.channel, &consumer],
            )
            .await?
            .map(|r| u64_of(r.get(0))))
        })
    }

    fn ack(&self, k: StreamKey, consumer: String, upto: u64) -> StoreFuture<'_, Acked> {
        Box::pin(self.ack(k, consumer, upto))
    }

    fn expire(&self, before_ms: i64) -> StoreFuture<'_, Vec<Expired>> {
        Box::pin(self.expire(before_ms))
    }

    fn maintain(&self) -> StoreFuture<'_, ()> {
        // Autovacuum returns dead rows' space; nothing to do here.
        Box::pin(async { Ok(()) })
    }
}
