//! Model-based test of the audit log: random appends, prunes and reopens against
//! a plain in-memory model. After every step the chain verifies and holds exactly
//! the records the model holds.

use gateway_core::audit::Event;
use gateway_store::audit::AuditLog;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Append events with these time offsets (may go backwards: clocks do).
    Append(Vec<i64>),
    /// Prune records older than `now - age`.
    Prune(i64),
    /// Close and reopen the database.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(-5i64..50, 1..8).prop_map(Op::Append),
        2 => (0i64..200).prop_map(Op::Prune),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    /// (seq, time_ms) of the records present.
    records: Vec<(u64, i64)>,
    next_seq: u64,
    pruned: u64,
    clock: i64,
}

fn event(time_ms: i64, seq: u64) -> Event {
    Event {
        time_ms,
        device: "jl-gat-0001".into(),
        subject: format!("client-{seq}"),
        object: "svc".into(),
        event: "relay.open".into(),
        outcome: "allow".into(),
        rule: "R0.allow-service".into(),
        detail: String::new(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn audit_log_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = AuditLog::open(dir.path()).expect("open");
        let mut m = Model { next_seq: 1, clock: 1_000, ..Model::default() };
        for op in ops {
            match op {
                Op::Append(steps) => {
                    let mut events = Vec::new();
                    for s in steps {
                        m.clock += s;
                        events.push(event(m.clock, m.next_seq));
                        m.records.push((m.next_seq, m.clock));
                        m.next_seq += 1;
                    }
                    log.append(events).expect("append");
                }
                Op::Prune(age) => {
                    let cutoff = m.clock - age;
                    // The longest prefix of records older than the cutoff.
                    let n = m.records.iter().take_while(|(_, t)| *t < cutoff).count();
                    m.records.drain(..n);
                    m.pruned += n as u64;
                    prop_assert_eq!(log.prune_before(cutoff).expect("prune"), n as u64);
                }
                Op::Reopen => {
                    drop(log);
                    log = AuditLog::open(dir.path()).expect("reopen");
                }
            }
            let v = log.verify().expect("chain verifies");
            prop_assert_eq!(v.count, m.records.len() as u64);
            prop_assert_eq!(v.pruned, m.pruned);
            prop_assert_eq!(v.head_seq, m.next_seq - 1);
            let got: Vec<(u64, i64)> = log.records(0, usize::MAX).expect("read").iter().map(|r| (r.seq, r.event.time_ms)).collect();
            prop_assert_eq!(&got, &m.records);
        }
    }
}
