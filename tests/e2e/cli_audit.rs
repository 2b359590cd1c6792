//! `gatewayd audit verify|show` on a real SQLite file, tampered with through
//! SQLite the way someone with the file would.

mod common;

use common::{code, gatewayd, text};
use gateway_core::audit::Event;
use gateway_store::audit::{AuditLog, FILE_NAME};

fn event(i: i64) -> Event {
    Event {
        time_ms: 1_780_000_000_000 + i * 1000,
        device: "jl-gat-0001".into(),
        subject: format!("59.72.3.{i}"),
        object: "pension-query".into(),
        event: "relay.open".into(),
        outcome: "allow".into(),
        rule: "R0.allow-service".into(),
        detail: format!("bytes_up={} bytes_down={}", i * 10, i * 100),
    }
}

fn state_dir(n: i64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = AuditLog::open(dir.path()).expect("open");
    log.append((1..=n).map(event)).expect("append");
    dir
}

fn tamper(dir: &std::path::Path, sql: &str) {
    let c = rusqlite::Connection::open(dir.join(FILE_NAME)).expect("open");
    c.execute_batch(
        "DROP TRIGGER IF EXISTS audit_no_update; DROP TRIGGER IF EXISTS audit_no_delete;",
    )
    .expect("drop triggers");
    c.execute_batch(sql).expect("tamper");
}

fn verify(dir: &std::path::Path) -> (i32, String, String) {
    let out = gatewayd(&[
        "audit",
        "verify",
        "--state-dir",
        dir.to_str().expect("path"),
    ]);
    let (o, e) = text(&out);
    (code(&out), o, e)
}

#[test]
fn intact_chain_exits_0_with_the_count() {
    let dir = state_dir(12);
    let (c, out, err) = verify(dir.path());
    assert_eq!(c, 0, "{err}");
    assert!(out.contains("audit chain intact: 12 records"), "{out}");
}

#[test]
fn each_kind_of_tampering_is_named() {
    let cases = [
        (
            "UPDATE audit SET detail = 'bytes_up=0' WHERE seq = 3",
            "record 3:",
        ),
        ("DELETE FROM audit WHERE seq = 5", "record 5:"),
        ("DELETE FROM audit WHERE seq = 8", "record 8:"),
        (
            "UPDATE audit SET seq = -1 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 4; UPDATE audit SET seq = 4 WHERE seq = -1;",
            "record 2:",
        ),
    ];
    for (sql, expected) in cases {
        let dir = state_dir(8);
        tamper(dir.path(), sql);
        let (c, _, err) = verify(dir.path());
        assert_eq!(c, 1, "{sql}: {err}");
        assert!(
            err.contains("audit chain BROKEN") && err.contains(expected),
            "{sql}: {err}"
        );
    }
}

#[test]
fn verify_json_names_the_broken_record() {
    let dir = state_dir(6);
    tamper(
        dir.path(),
        "UPDATE audit SET outcome = 'deny' WHERE seq = 4",
    );
    let out = gatewayd(&[
        "audit",
        "verify",
        "--state-dir",
        dir.path().to_str().expect("path"),
        "--format",
        "json",
    ]);
    assert_eq!(code(&out), 1);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(r["intact"], false);
    assert_eq!(r["broken_at"], 4);
}

#[test]
fn show_lists_records() {
    let dir = state_dir(3);
    let path = dir.path().to_str().expect("path");
    let out = gatewayd(&["audit", "show", "--state-dir", path, "--format", "json"]);
    assert_eq!(code(&out), 0);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let records = r.as_array().expect("array");
    assert_eq!(records.len(), 3);
    assert_eq!(records[2]["seq"], 3);
    assert_eq!(records[2]["subject"], "59.72.3.3");
    assert_eq!(records[1]["hash"], records[2]["prev_hash"]);

    let out = gatewayd(&["audit", "show", "--state-dir", path, "--from", "2"]);
    let (stdout, _) = text(&out);
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(
        stdout.contains("relay.open 59.72.3.2 -> pension-query allow [R0.allow-service]"),
        "{stdout}"
    );
}

#[test]
fn missing_database_exits_66() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, _, err) = verify(dir.path());
    assert_eq!(c, 66, "{err}");
    assert!(err.contains("no audit database"), "{err}");
}
