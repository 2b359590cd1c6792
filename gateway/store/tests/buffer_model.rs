//! Model-based test of the record buffer: random appends (with quotas, both
//! full behaviours), reads, acks, expiry, corruption, restarts and crashes in
//! the middle of a commit against a plain
//! in-memory model. After every step the buffer holds exactly what the model
//! holds, in order, with the same sequence numbers and counters, and every
//! record ever numbered has the receipt the model expects.

use std::collections::{BTreeMap, VecDeque};

use gateway_store::buffer::{Buffer, BufferError, NewRecord, WhenFull, accounted};
use proptest::prelude::*;

const CHANNELS: [&str; 2] = ["reports", "readings"];
const QUOTA: u64 = 2_000;

#[derive(Debug, Clone)]
enum Op {
    Append {
        ch: usize,
        sizes: Vec<usize>,
        drop_oldest: bool,
    },
    Read {
        ch: usize,
        after_skip: usize,
        limit: usize,
    },
    Ack {
        ch: usize,
        count: usize,
    },
    Expire {
        ch: usize,
        age: i64,
    },
    Tick(i64),
    Corrupt {
        ch: usize,
        nth: usize,
    },
    Restart,
    /// The process dies in the middle of a commit: a transaction that wrote
    /// records and advanced the sequence is never committed.
    Crash {
        ch: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..2usize, prop::collection::vec(0usize..400, 0..5), any::<bool>()).prop_map(|(ch, sizes, drop_oldest)| Op::Append { ch, sizes, drop_oldest }),
        3 => (0..2usize, 0usize..4, 1usize..6).prop_map(|(ch, after_skip, limit)| Op::Read { ch, after_skip, limit }),
        2 => (0..2usize, 0usize..4).prop_map(|(ch, count)| Op::Ack { ch, count }),
        1 => (0..2usize, 0i64..50).prop_map(|(ch, age)| Op::Expire { ch, age }),
        2 => (1i64..20).prop_map(Op::Tick),
        1 => (0..2usize, 0usize..3).prop_map(|(ch, nth)| Op::Corrupt { ch, nth }),
        1 => Just(Op::Restart),
        1 => (0..2usize).prop_map(|ch| Op::Crash { ch }),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct M {
    seq: u64,
    time: i64,
    body: Vec<u8>,
}

#[derive(Debug, Default)]
struct Model {
    next: BTreeMap<usize, u64>,
    recs: BTreeMap<usize, VecDeque<M>>,
    dropped: BTreeMap<usize, u64>,
    expired: BTreeMap<usize, u64>,
    corrupt: BTreeMap<usize, u64>,
    /// Every record's receipt status, by channel and sequence number.
    status: BTreeMap<(usize, u64), &'static str>,
}

impl Model {
    fn bytes(&self, ch: usize) -> u64 {
        self.recs
            .get(&ch)
            .map_or(0, |q| q.iter().map(|m| accounted(m.body.len())).sum())
    }
}

fn body(seq: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seq as usize * 31 + i) as u8).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn buffer_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut buf = Buffer::open(dir.path()).expect("open");
        let mut m = Model::default();
        let mut now = 1_000i64;
        for op in ops {
            match op {
                Op::Append { ch, sizes, drop_oldest } => {
                    let next = *m.next.get(&ch).unwrap_or(&1);
                    let recs: Vec<NewRecord> = sizes.iter().enumerate().map(|(i, n)| NewRecord { format: "json".into(), body: body(next + i as u64, *n) }).collect();
                    let needed: u64 = sizes.iter().map(|n| accounted(*n)).sum();
                    let when = if drop_oldest { WhenFull::DropOldest } else { WhenFull::Reject };
                    let got = buf.append(CHANNELS[ch], &recs, QUOTA, when, now);
                    let fits = m.bytes(ch) + needed <= QUOTA;
                    if needed > QUOTA || (!fits && !drop_oldest) {
                        prop_assert!(matches!(got, Err(BufferError::Full { .. })), "{got:?}");
                        continue;
                    }
                    let got = got.expect("append");
                    let q = m.recs.entry(ch).or_default();
                    let mut dropped = None;
                    while q.iter().map(|r| accounted(r.body.len())).sum::<u64>() + needed > QUOTA {
                        let r = q.pop_front().expect("something to drop");
                        m.status.insert((ch, r.seq), "dropped");
                        dropped = Some((dropped.map_or(r.seq, |(f, _)| f), r.seq));
                        *m.dropped.entry(ch).or_default() += 1;
                    }
                    prop_assert_eq!(got.dropped, dropped);
                    prop_assert_eq!(got.first, next);
                    for (i, r) in recs.into_iter().enumerate() {
                        q.push_back(M { seq: next + i as u64, time: now, body: r.body });
                        m.status.insert((ch, next + i as u64), "accepted");
                    }
                    m.next.insert(ch, next + sizes.len() as u64);
                }
                Op::Read { ch, after_skip, limit } => {
                    let q = m.recs.get(&ch).cloned().unwrap_or_default();
                    let after = q.get(after_skip).map_or(0, |r| r.seq);
                    let got = buf.read(CHANNELS[ch], after, limit).expect("read");
                    let want: Vec<&M> = q.iter().filter(|r| r.seq > after).take(limit).collect();
                    prop_assert_eq!(got.len(), want.len());
                    for (g, w) in got.iter().zip(want) {
                        prop_assert_eq!((g.seq, g.time_ms, &g.body), (w.seq, w.time, &w.body));
                    }
                }
                Op::Ack { ch, count } => {
                    let q = m.recs.entry(ch).or_default();
                    let Some(upto) = q.get(count).map(|r| r.seq) else { continue };
                    let before = q.len();
                    for r in q.iter().filter(|r| r.seq <= upto) {
                        m.status.insert((ch, r.seq), "delivered_to_hub");
                    }
                    q.retain(|r| r.seq > upto);
                    prop_assert_eq!(buf.ack(CHANNELS[ch], upto).expect("ack"), (before - q.len()) as u64);
                }
                Op::Expire { ch, age } => {
                    let cutoff = now - age;
                    let q = m.recs.entry(ch).or_default();
                    let n = q.iter().take_while(|r| r.time < cutoff).count();
                    for r in q.drain(..n) {
                        m.status.insert((ch, r.seq), "expired");
                    }
                    *m.expired.entry(ch).or_default() += n as u64;
                    prop_assert_eq!(buf.expire(CHANNELS[ch], cutoff).expect("expire"), n as u64);
                }
                Op::Tick(d) => now += d,
                Op::Corrupt { ch, nth } => {
                    let q = m.recs.entry(ch).or_default();
                    let Some(idx) = (nth < q.len()).then_some(nth) else { continue };
                    let seq = q[idx].seq;
                    if q[idx].body.is_empty() {
                        continue;
                    }
                    // Flip a byte behind SQLite's back, as a bad disk would.
                    let raw = rusqlite::Connection::open(dir.path().join(gateway_store::buffer::FILE_NAME)).expect("raw");
                    raw.execute("UPDATE record SET body = zeroblob(length(body)) WHERE channel = ?1 AND seq = ?2", rusqlite::params![CHANNELS[ch], seq as i64]).expect("corrupt");
                    drop(raw);
                    if q[idx].body.iter().all(|b| *b == 0) {
                        continue; // zeroing changed nothing
                    }
                    q.remove(idx);
                    m.status.insert((ch, seq), "failed");
                    *m.corrupt.entry(ch).or_default() += 1;
                    // The next read that reaches it quarantines it.
                    let _ = buf.read(CHANNELS[ch], seq - 1, 1).expect("read past corruption");
                }
                Op::Restart => {
                    drop(buf);
                    buf = Buffer::open(dir.path()).expect("reopen");
                }
                Op::Crash { ch } => {
                    drop(buf);
                    {
                        let mut raw = rusqlite::Connection::open(dir.path().join(gateway_store::buffer::FILE_NAME)).expect("raw");
                        let tx = raw.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).expect("begin");
                        let next = *m.next.get(&ch).unwrap_or(&1) as i64;
                        tx.execute("INSERT OR IGNORE INTO channel (name, next_seq, bytes, records, dropped, expired, corrupt) VALUES (?1, 1, 0, 0, 0, 0, 0)", [CHANNELS[ch]]).expect("channel");
                        tx.execute("INSERT INTO record (channel, seq, time_ms, format, body, crc) VALUES (?1, ?2, 0, 'json', x'00', 0)", rusqlite::params![CHANNELS[ch], next]).expect("insert");
                        tx.execute("UPDATE channel SET next_seq = next_seq + 1, records = records + 1 WHERE name = ?1", [CHANNELS[ch]]).expect("advance");
                        // Dropped without commit: what a crash leaves.
                        drop(tx);
                    }
                    buf = Buffer::open(dir.path()).expect("reopen after crash");
                }
            }
            for (ch, name) in CHANNELS.iter().enumerate() {
                let b = buf.backlog(name).expect("backlog");
                let q = m.recs.get(&ch).cloned().unwrap_or_default();
                prop_assert_eq!(b.records, q.len() as u64, "records of {}", name);
                prop_assert_eq!(b.bytes, m.bytes(ch), "bytes of {}", name);
                prop_assert!(b.bytes <= QUOTA);
                prop_assert_eq!(b.next_seq, *m.next.get(&ch).unwrap_or(&1));
                prop_assert_eq!(b.oldest_ms, q.front().map(|r| r.time));
                prop_assert_eq!(b.dropped, *m.dropped.get(&ch).unwrap_or(&0));
                prop_assert_eq!(b.expired, *m.expired.get(&ch).unwrap_or(&0));
                prop_assert_eq!(b.corrupt, *m.corrupt.get(&ch).unwrap_or(&0));
                // Receipts: every record ever numbered, with its fate.
                let got: Vec<(u64, &str)> = buf.receipts(name, 0, 10_000).expect("receipts").iter().map(|r| (r.seq, r.status.name())).collect();
                let want: Vec<(u64, &str)> = m.status.range((ch, 0)..(ch + 1, 0)).map(|((_, s), st)| (*s, *st)).collect();
                prop_assert_eq!(got, want, "receipts of {}", name);
            }
        }
        // Whatever is left reads back intact and in order.
        for (ch, name) in CHANNELS.iter().enumerate() {
            let all = buf.read(name, 0, usize::MAX / 2).expect("read all");
            let want: Vec<u64> = m.recs.get(&ch).map(|q| q.iter().map(|r| r.seq).collect()).unwrap_or_default();
            prop_assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), want);
        }
        buf.compact().expect("compact");
    }
}
