//! Audit records and their hash chain (DESIGN.md rule 6).
//!
//! Each record carries the hash of the record before it; its own hash is SHA-256
//! over a domain tag and a canonical encoding of every field, its sequence number
//! and the previous hash included. Changing a field changes the hash; deleting or
//! reordering records breaks the link to the previous hash or the sequence. The
//! first record links to [`GENESIS`], or, after retention pruning, to the hash of
//! the last pruned record (the anchor).
//!
//! Canonical encoding (version 1), all integers big-endian:
//! `"gw-audit-v1\0" | seq u64 | time_ms i64 | prev_hash [32] | then for device,
//! subject, object, event, outcome, rule, detail: len u32 | UTF-8 bytes`.

use serde::{Deserialize, Serialize};

pub mod collect;

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// The previous hash of the very first record.
pub const GENESIS: Hash = [0; 32];

const DOMAIN: &[u8] = b"gw-audit-v1\0";

/// What happened, before it is chained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unix time in milliseconds.
    pub time_ms: i64,
    /// The device that recorded it.
    pub device: String,
    /// Who acted: a client address, a device id, an operator.
    pub subject: String,
    /// What was acted on: a service, a channel, a listener.
    pub object: String,
    /// The kind of event (`relay.open`, `relay.refuse`, `channel.record`, `config.load`…).
    pub event: String,
    /// `allow`, `deny`, `ok` or `error`.
    pub outcome: String,
    /// The boundary rule that decided, or empty.
    pub rule: String,
    /// Free detail: bytes, duration, reason.
    pub detail: String,
}

/// An event in the chain. Its JSON form (every field, hashes in hex) is what
/// `gatewayd audit show` prints, what edges ship to the hub and what exports hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the chain, from 1, without gaps.
    pub seq: u64,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
    /// Hash of the record before (or the anchor, or [`GENESIS`]).
    #[serde(serialize_with = "hex", deserialize_with = "unhex")]
    pub prev_hash: Hash,
    /// This record's hash.
    #[serde(serialize_with = "hex", deserialize_with = "unhex")]
    pub hash: Hash,
}

fn hex<S: serde::Serializer>(h: &Hash, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&to_hex(h))
}

fn unhex<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
    let s = String::deserialize(d)?;
    from_hex(&s).ok_or_else(|| serde::de::Error::custom("a hash is 64 hex digits"))
}

/// A hash from 64 hex digits.
pub fn from_hex(s: &str) -> Option<Hash> {
    if s.len() != 64 {
        return None;
    }
    crate::hex::decode(s)?.try_into().ok()
}

/// Lowercase hex of a hash.
pub fn to_hex(h: &Hash) -> String {
    crate::hex::encode(h)
}

/// The canonical encoding of a record's content.
pub fn encode(seq: u64, event: &Event, prev_hash: &Hash) -> Vec<u8> {
    let fields = [
        &event.device,
        &event.subject,
        &event.object,
        &event.event,
        &event.outcome,
        &event.rule,
        &event.detail,
    ];
    let mut out =
        Vec::with_capacity(DOMAIN.len() + 48 + fields.iter().map(|f| 4 + f.len()).sum::<usize>());
    out.extend_from_slice(DOMAIN);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&event.time_ms.to_be_bytes());
    out.extend_from_slice(prev_hash);
    for f in fields {
        // Fields longer than 4 GiB cannot be audited; truncating the length would
        // make two records share an encoding, so saturate instead (and the hash differs).
        let len = u32::try_from(f.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(f.as_bytes());
    }
    out
}

/// The hash of a record with this content.
pub fn hash(seq: u64, event: &Event, prev_hash: &Hash) -> Hash {
    let digest = ring::digest::digest(&ring::digest::SHA256, &encode(seq, event, prev_hash));
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

impl Record {
    /// Chains `event` after a record with sequence `seq - 1` and hash `prev_hash`.
    pub fn chain(seq: u64, event: Event, prev_hash: Hash) -> Self {
        let hash = hash(seq, &event, &prev_hash);
        Self {
            seq,
            event,
            prev_hash,
            hash,
        }
    }
}

/// Why a chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Break {
    /// A record's stored hash does not match its content: a field was edited.
    #[error("record {seq}: its content does not match its hash (a field was changed)")]
    Altered {
        /// The record.
        seq: u64,
    },
    /// The sequence skips: records were deleted.
    #[error("record {expected}: missing, the chain jumps to record {found} (records were deleted)")]
    Gap {
        /// The sequence number the chain needed.
        expected: u64,
        /// The one found.
        found: u64,
    },
    /// A record does not link to the one before: records were reordered, replaced or deleted.
    #[error(
        "record {seq}: it does not link to the record before it (records were deleted, reordered or replaced)"
    )]
    Unlinked {
        /// The record.
        seq: u64,
    },
    /// The chain ends before its recorded head: the newest records were deleted.
    #[error(
        "record {expected}: missing; the chain's head says it ends at record {head} (the newest records were deleted)"
    )]
    Truncated {
        /// The first missing record.
        expected: u64,
        /// Where the head says the chain ends.
        head: u64,
    },
}

impl Break {
    /// The sequence number of the first broken record.
    pub fn seq(&self) -> u64 {
        match *self {
            Break::Altered { seq } | Break::Unlinked { seq } => seq,
            Break::Gap { expected, .. } | Break::Truncated { expected, .. } => expected,
        }
    }
}

/// Checks records one at a time, in stored order.
#[derive(Debug, Clone)]
pub struct Verifier {
    next_seq: u64,
    prev: Hash,
    count: u64,
}

impl Verifier {
    /// Starts after the anchor: the last pruned record (`seq`, `hash`), or `(0, GENESIS)`.
    pub fn new(anchor_seq: u64, anchor_hash: Hash) -> Self {
        Self {
            next_seq: anchor_seq + 1,
            prev: anchor_hash,
            count: 0,
        }
    }

    /// Checks the next record.
    ///
    /// # Errors
    /// The first break found.
    pub fn push(&mut self, r: &Record) -> Result<(), Break> {
        if r.seq != self.next_seq {
            return Err(if r.seq > self.next_seq {
                Break::Gap {
                    expected: self.next_seq,
                    found: r.seq,
                }
            } else {
                Break::Unlinked { seq: r.seq }
            });
        }
        if hash(r.seq, &r.event, &r.prev_hash) != r.hash {
            return Err(Break::Altered { seq: r.seq });
        }
        if r.prev_hash != self.prev {
            return Err(Break::Unlinked { seq: r.seq });
        }
        self.prev = r.hash;
        self.next_seq += 1;
        self.count += 1;
        Ok(())
    }

    /// Checks that the chain reached its recorded head (`head_seq`, `head_hash`).
    ///
    /// # Errors
    /// When records after the last one seen are missing, or the head does not match.
    pub fn finish(&self, head_seq: u64, head_hash: &Hash) -> Result<u64, Break> {
        let last = self.next_seq - 1;
        if last < head_seq {
            return Err(Break::Truncated {
                expected: self.next_seq,
                head: head_seq,
            });
        }
        if last > head_seq || self.prev != *head_hash {
            return Err(Break::Unlinked { seq: last });
        }
        Ok(self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ev(i: i64) -> Event {
        Event {
            time_ms: 1_700_000_000_000 + i,
            device: "jl-gat-0001".into(),
            subject: format!("10.20.0.{i}"),
            object: "pension-query".into(),
            event: "relay.open".into(),
            outcome: "allow".into(),
            rule: "R0.allow-service".into(),
            detail: String::new(),
        }
    }

    fn chain(n: u64) -> Vec<Record> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let r = Record::chain(seq, ev(seq as i64), prev);
                prev = r.hash;
                r
            })
            .collect()
    }

    fn verify(records: &[Record]) -> Result<u64, Break> {
        let mut v = Verifier::new(0, GENESIS);
        for r in records {
            v.push(r)?;
        }
        let head = chain(records.len() as u64)
            .last()
            .map_or((0, GENESIS), |r| (r.seq, r.hash));
        v.finish(head.0, &head.1)
    }

    #[test]
    fn intact_chain_verifies() {
        assert_eq!(verify(&chain(5)), Ok(5));
        assert_eq!(verify(&[]), Ok(0));
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        let mut a = ev(1);
        let mut b = ev(1);
        a.subject = "ab".into();
        a.object = "c".into();
        b.subject = "a".into();
        b.object = "bc".into();
        assert_ne!(hash(1, &a, &GENESIS), hash(1, &b, &GENESIS));
    }

    #[test]
    fn detects_edit_delete_swap() {
        let mut edited = chain(5);
        edited[2].event.outcome = "deny".into();
        assert_eq!(verify(&edited), Err(Break::Altered { seq: 3 }));

        let mut deleted = chain(5);
        deleted.remove(1);
        assert_eq!(
            verify(&deleted),
            Err(Break::Gap {
                expected: 2,
                found: 3
            })
        );

        let mut swapped = chain(5);
        swapped.swap(1, 2);
        assert_eq!(verify(&swapped).map_err(|b| b.seq()), Err(2));
    }

    proptest! {
        #[test]
        fn any_single_field_edit_is_detected(n in 1u64..20, at in 0usize..20, field in 0usize..8, text in "[a-z]{0,8}") {
            let mut c = chain(n);
            let at = at % c.len();
            let e = &mut c[at].event;
            let target = match field {
                0 => &mut e.device, 1 => &mut e.subject, 2 => &mut e.object, 3 => &mut e.event,
                4 => &mut e.outcome, 5 => &mut e.rule, 6 => &mut e.detail,
                _ => { e.time_ms += 1; &mut e.detail }
            };
            if field == 7 || *target != text {
                if field != 7 { *target = text; }
                prop_assert_eq!(verify(&c), Err(Break::Altered { seq: at as u64 + 1 }));
            }
        }
    }
}
