//! The hub's queue of collected audit records not yet stored: batches from
//! many boxes' control sessions, written to the store together once a second
//! (in transactions of many devices each), kept for the next write when the store
//! cannot take them, bounded per device and in all.
//!
//! The queue never judges a chain: the store does, against what it holds. It
//! only drops a record it holds already under the same number with the same
//! hash (a box resending after a reconnect); any other record under a number
//! it holds goes on, so the store sees it and calls the break.

use std::collections::{HashMap, HashSet};

use super::{Hash, Record};

/// Records waiting for the store, per device.
#[derive(Debug)]
pub struct Collected {
    pending: HashMap<String, Queue>,
    /// The newest record of each device's batch being written now.
    writing: HashMap<String, u64>,
    total: usize,
    per_device: usize,
    all: usize,
}

/// What became of a batch handed to [`Collected::add`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Added {
    /// Records queued (new ones; resent copies are not counted).
    pub queued: usize,
    /// The first record not queued because the queue is full: the box is to
    /// send again from it.
    pub refused_from: Option<u64>,
}

impl Collected {
    /// A queue of at most `per_device` records for one device and `all` in all.
    pub fn new(per_device: usize, all: usize) -> Self {
        Collected {
            pending: HashMap::new(),
            writing: HashMap::new(),
            total: 0,
            per_device,
            all,
        }
    }

    /// Records queued in all.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Queues a batch of `device`, as far as the bounds allow.
    pub fn add(&mut self, device: &str, records: Vec<Record>) -> Added {
        let room_device = self
            .per_device
            .saturating_sub(self.pending.get(device).map_or(0, |q| q.records.len()));
        let room = room_device.min(self.all.saturating_sub(self.total));
        let mut refused_from = None;
        let mut queued = 0;
        let q = self.pending.entry(device.to_owned()).or_default();
        for r in records {
            if q.holds(&r) {
                continue;
            }
            if queued == room {
                refused_from = Some(r.seq);
                break;
            }
            q.push(r);
            queued += 1;
        }
        if q.records.is_empty() {
            self.pending.remove(device);
        }
        self.total += queued;
        Added {
            queued,
            refused_from,
        }
    }

    /// The record `device` should send next as far as this queue knows (what
    /// it holds or is writing), if it holds any.
    pub fn next_after(&self, device: &str) -> Option<u64> {
        let queued = self.pending.get(device).and_then(|q| q.newest);
        let writing = self.writing.get(device).copied();
        queued.max(writing).map(|s| s + 1)
    }

    /// Everything queued, a batch per device, for one write; remembered as
    /// being written until [`Collected::written`] or [`Collected::put_back`].
    pub fn take(&mut self) -> Vec<(String, Vec<Record>)> {
        self.total = 0;
        let mut batches = Vec::with_capacity(self.pending.len());
        self.writing.clear();
        for (device, q) in self.pending.drain() {
            if let Some(newest) = q.newest {
                self.writing.insert(device.clone(), newest);
            }
            batches.push((device, q.records));
        }
        batches
    }

    /// The write of the taken batches is done.
    pub fn written(&mut self) {
        self.writing.clear();
    }

    /// The write failed: the batches go back in front of what came since
    /// (copies of the same records taken once).
    pub fn put_back(&mut self, batches: Vec<(String, Vec<Record>)>) {
        self.writing.clear();
        for (device, records) in batches {
            let mut q = Queue::default();
            for r in records {
                q.push(r);
            }
            if let Some(since) = self.pending.remove(&device) {
                self.total -= since.records.len();
                for r in since.records {
                    if !q.holds(&r) {
                        q.push(r);
                    }
                }
            }
            self.total += q.records.len();
            if !q.records.is_empty() {
                self.pending.insert(device, q);
            }
        }
    }
}

/// One device's records waiting, with an index of what it holds, so a check
/// costs the same whatever order a (possibly hostile) box sends records in.
#[derive(Debug, Default)]
struct Queue {
    records: Vec<Record>,
    held: HashSet<(u64, Hash)>,
    newest: Option<u64>,
}

impl Queue {
    /// Whether this queue holds `r` already: the same number with the same
    /// hash.
    fn holds(&self, r: &Record) -> bool {
        self.held.contains(&(r.seq, r.hash))
    }

    fn push(&mut self, r: Record) {
        self.held.insert((r.seq, r.hash));
        self.newest = self.newest.max(Some(r.seq));
        self.records.push(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Event, GENESIS};
    use proptest::prelude::*;

    fn chain(device: &str, n: u64) -> Vec<Record> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let event = Event {
                    time_ms: seq as i64,
                    device: device.into(),
                    subject: String::new(),
                    object: String::new(),
                    event: "relay.open".into(),
                    outcome: "allow".into(),
                    rule: String::new(),
                    detail: String::new(),
                };
                let r = Record::chain(seq, event, prev);
                prev = r.hash;
                r
            })
            .collect()
    }

    fn seqs(q: &[(String, Vec<Record>)], device: &str) -> Vec<u64> {
        q.iter()
            .filter(|(d, _)| d == device)
            .flat_map(|(_, r)| r.iter().map(|r| r.seq))
            .collect()
    }

    #[test]
    fn resent_records_are_taken_once_and_other_ones_under_a_held_number_go_on() {
        let c = chain("e1", 10);
        let mut q = Collected::new(100, 1000);
        assert_eq!(q.add("e1", c[..5].to_vec()).queued, 5);
        // A reconnect resends from 3.
        assert_eq!(q.add("e1", c[2..8].to_vec()).queued, 3);
        assert_eq!(q.next_after("e1"), Some(9));
        let mut forged = c[8].clone();
        forged.seq = 4;
        assert_eq!(q.add("e1", vec![forged]).queued, 1);
        let taken = q.take();
        assert_eq!(seqs(&taken, "e1"), [1, 2, 3, 4, 5, 6, 7, 8, 4]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_failed_write_goes_back_in_front_of_what_came_since() {
        let c = chain("e1", 10);
        let mut q = Collected::new(100, 1000);
        q.add("e1", c[..4].to_vec());
        q.add("e2", chain("e2", 2));
        let taken = q.take();
        // While writing, the queue still knows where e1 stands.
        assert_eq!(q.next_after("e1"), Some(5));
        q.add("e1", c[2..6].to_vec());
        q.put_back(taken);
        let again = q.take();
        assert_eq!(seqs(&again, "e1"), [1, 2, 3, 4, 5, 6]);
        assert_eq!(seqs(&again, "e2"), [1, 2]);
        q.written();
        assert_eq!(q.next_after("e1"), None);
    }

    #[test]
    fn a_full_queue_says_from_where_to_send_again() {
        let c = chain("e1", 10);
        let mut q = Collected::new(4, 6);
        let a = q.add("e1", c[..6].to_vec());
        assert_eq!((a.queued, a.refused_from), (4, Some(5)));
        let b = q.add("e2", chain("e2", 5));
        assert_eq!((b.queued, b.refused_from), (2, Some(3)));
        let full = q.add("e3", chain("e3", 1));
        assert_eq!((full.queued, full.refused_from), (0, Some(1)));
        assert_eq!(q.len(), 6);
        // Resent copies of queued records are not refused.
        assert_eq!(q.add("e1", c[..4].to_vec()).refused_from, None);
        q.take();
        assert_eq!(q.add("e1", c[4..].to_vec()).queued, 4);
    }

    #[test]
    fn records_sent_newest_first_are_each_checked_once() {
        // A box sending its numbers falling made the old backward scan
        // quadratic; every record is still queued, none dropped.
        let mut c = chain("e1", 5_000);
        c.reverse();
        let mut q = Collected::new(5_000, 5_000);
        assert_eq!(q.add("e1", c.clone()).queued, 5_000);
        assert_eq!(q.add("e1", c).queued, 0);
        assert_eq!(q.next_after("e1"), Some(5_001));
        let taken = q.take();
        assert_eq!(seqs(&taken, "e1").first(), Some(&5_000));
    }

    proptest! {
        /// Whatever the mix of resends, failed writes and bounds: what is
        /// written is every record of the chain, each once, in order, and a
        /// record refused is one the box is told to send again.
        #[test]
        fn the_store_sees_the_chain_whole(
            steps in proptest::collection::vec((0u64..40, 1usize..12, any::<bool>()), 1..60)
        ) {
            let c = chain("e1", 60);
            let mut q = Collected::new(20, 20);
            let mut stored: Vec<u64> = Vec::new();
            // The box's cursor: what it sends next.
            let mut cursor = 1u64;
            for (back, n, fail) in steps {
                // Sometimes the box resends from earlier (a reconnect).
                let from = cursor.saturating_sub(back % 3).max(1);
                let to = (from + n as u64).min(61);
                let batch: Vec<Record> = c[(from - 1) as usize..(to - 1) as usize].to_vec();
                let added = q.add("e1", batch);
                cursor = added.refused_from.unwrap_or(to).max(1);
                let taken = q.take();
                if fail {
                    q.put_back(taken);
                } else {
                    for (_, rs) in taken {
                        for r in rs {
                            let next = stored.last().map_or(1, |s| s + 1);
                            if r.seq == next {
                                stored.push(r.seq);
                            } else {
                                prop_assert!(r.seq < next, "a gap: {} after {:?}", r.seq, stored.last());
                            }
                        }
                    }
                    q.written();
                }
            }
            prop_assert!(stored.windows(2).all(|w| w[1] == w[0] + 1));
        }
    }
}
