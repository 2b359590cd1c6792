//! The hub's storage traits, as the daemon calls them. Every check takes a
//! `&dyn Sink` or `&dyn Registry`, so each engine runs the same suite: the
//! embedded SQLite one (two handles on one file stand for two hubs) and
//! PostgreSQL (two engines on one database of a throwaway cluster; skipped,
//! saying why, where `postgresql-15` is not installed).

use std::sync::Arc;

use gateway_core::fleet::AdminRole;
use gateway_core::wire::SyncRecord;
use gateway_store::error::StoreError;
use std::time::Duration;

use gateway_store::registry::{
    Admission, ConfigPush, Enrollment, FirmwarePart, NewAccount, NewConsumer, NewFirmware,
    NewToken, Registry, RegistryError, Renewal, SignCertificate,
};
use gateway_store::sink::{Acked, Sink, SinkBatch, StreamKey};
use gateway_store::sqlite::{Blocking, SqliteRegistry, SqliteSink};

fn batch(device: &str, channel: &str, seqs: &[u64]) -> SinkBatch {
    SinkBatch {
        device: device.into(),
        channel: channel.into(),
        deliver_to: "hub".into(),
        records: seqs
            .iter()
            .map(|&seq| SyncRecord {
                seq,
                time_ms: seq as i64,
                format: "json".into(),
                body: format!("{{\"n\":{seq}}}").into_bytes(),
            })
            .collect(),
        now_ms: 1,
    }
}

async fn seqs(s: &dyn Sink, device: &str, channel: &str, after: u64) -> Vec<u64> {
    let got = s
        .read(StreamKey::new(device, channel), after, 100)
        .await
        .expect("read");
    got.iter().map(|r| r.seq).collect()
}

/// Exactly once across two hubs on one engine, several streams in one commit,
/// consumed records still seen, refused records kept for receipts.
async fn sink_suite(a: &dyn Sink, b: &dyn Sink) {
    let c = a
        .commit(vec![batch("d", "c", &[1, 2]), batch("e", "c", &[1])])
        .await
        .expect("commit");
    assert_eq!(
        c.iter().map(|c| (c.upto, c.stored)).collect::<Vec<_>>(),
        [(2, 2), (1, 1)]
    );
    // The other hub resends what the first already holds, and one more.
    let c = b
        .commit(vec![batch("d", "c", &[1, 2, 3])])
        .await
        .expect("commit");
    assert_eq!((c[0].upto, c[0].stored, c[0].duplicates), (3, 1, 2));
    assert_eq!(a.high(StreamKey::new("d", "c")).await.expect("high"), 3);
    assert_eq!(seqs(a, "d", "c", 0).await, [1, 2, 3]);
    // Two batches of one stream in one commit: the second sees the first.
    let c = a
        .commit(vec![batch("d", "c", &[3, 4]), batch("d", "c", &[4, 5])])
        .await
        .expect("commit");
    assert_eq!(
        c.iter().map(|c| (c.upto, c.stored)).collect::<Vec<_>>(),
        [(4, 1), (5, 1)]
    );
    // A consumer takes up to 2: gone, and still counted as seen.
    assert_eq!(
        b.consume(StreamKey::new("d", "c"), 2)
            .await
            .expect("consume"),
        2
    );
    assert_eq!(seqs(a, "d", "c", 0).await, [3, 4, 5]);
    let c = a
        .commit(vec![batch("d", "c", &[1, 2])])
        .await
        .expect("commit");
    assert_eq!((c[0].upto, c[0].stored), (5, 0));
    let streams = a.streams().await.expect("streams");
    let d = streams.iter().find(|s| s.device == "d").expect("stream d");
    assert_eq!((d.high, d.consumed, d.records), (5, 2, 3));
    // A destination's refusal, kept for the source's receipts.
    a.failed(StreamKey::new("d", "c"), 4, "not XML".into())
        .await
        .expect("failed");
    assert_eq!(
        b.failures(StreamKey::new("d", "c"), 3, 5)
            .await
            .expect("failures"),
        [(4, "not XML".to_owned())]
    );
    assert!(
        b.failures(StreamKey::new("d", "c"), 4, 5)
            .await
            .expect("failures")
            .is_empty()
    );
    a.maintain().await.expect("maintain");
    // A batch larger than one insert statement holds, and one resent from its
    // middle by the other hub.
    let big: Vec<u64> = (1..=250).collect();
    let c = a
        .commit(vec![batch("big", "c", &big[..180])])
        .await
        .expect("commit");
    assert_eq!((c[0].upto, c[0].stored), (180, 180));
    let c = b
        .commit(vec![batch("big", "c", &big[120..])])
        .await
        .expect("commit");
    assert_eq!((c[0].upto, c[0].stored, c[0].duplicates), (250, 70, 60));
    let got = b
        .read(StreamKey::new("big", "c"), 0, 1000)
        .await
        .expect("read");
    assert_eq!(got.len(), 250);
    assert!(
        got.iter()
            .zip(1u64..)
            .all(|(r, i)| r.seq == i && r.body == format!("{{\"n\":{i}}}").into_bytes())
    );
    let s = b.streams().await.expect("streams");
    let big = s.iter().find(|s| s.device == "big").expect("stream");
    let bytes: u64 = got.iter().map(|r| r.body.len() as u64).sum();
    assert_eq!((big.records, big.bytes, big.duplicates), (250, bytes, 60));
}

/// Consumers' own cursors across two hubs: each granted consumer reads every
/// record, a record goes once all have acknowledged it, acknowledgements past
/// `high` are refused, a stream nobody is granted keeps its records until
/// retention, and retention counts what expired unread.
async fn consumers_suite(a: &dyn Sink, b: &dyn Sink) {
    let k = || StreamKey::new("d", "c");
    a.commit(vec![batch("d", "c", &[1, 2, 3, 4])])
        .await
        .expect("commit");
    assert!(a.grant(k(), "x".into(), 5).await.expect("grant"));
    assert!(!b.grant(k(), "x".into(), 6).await.expect("grant again"));
    assert!(b.grant(k(), "y".into(), 6).await.expect("grant y"));
    assert_eq!(a.cursor(k(), "x".into()).await.expect("cursor"), Some(0));
    assert_eq!(a.cursor(k(), "z".into()).await.expect("cursor"), None);
    // Beyond what exists: refused with the high-water mark, nothing moves.
    assert_eq!(
        a.ack(k(), "x".into(), 999_999).await.expect("ack"),
        Acked::Beyond { high: 4 }
    );
    assert_eq!(
        a.ack(k(), "z".into(), 1).await.expect("ack"),
        Acked::NotGranted
    );
    // x takes everything: y has not, so nothing goes.
    assert_eq!(
        a.ack(k(), "x".into(), 4).await.expect("ack"),
        Acked::Moved {
            cursor: 4,
            removed: 0
        }
    );
    assert_eq!(seqs(b, "d", "c", 0).await, [1, 2, 3, 4]);
    // A cursor never moves back.
    assert_eq!(
        a.ack(k(), "x".into(), 1).await.expect("ack"),
        Acked::Moved {
            cursor: 4,
            removed: 0
        }
    );
    // y takes two: those two go.
    assert_eq!(
        b.ack(k(), "y".into(), 2).await.expect("ack"),
        Acked::Moved {
            cursor: 2,
            removed: 2
        }
    );
    assert_eq!(seqs(a, "d", "c", 0).await, [3, 4]);
    // Withdrawing y's grant frees what x alone had.
    assert_eq!(
        a.revoke_grant(k(), "y".into()).await.expect("revoke"),
        Some(2)
    );
    assert_eq!(a.revoke_grant(k(), "y".into()).await.expect("again"), None);
    assert!(seqs(a, "d", "c", 0).await.is_empty());
    let grants = b.grants(None).await.expect("grants");
    assert_eq!(grants.len(), 1);
    assert_eq!((grants[0].consumer.as_str(), grants[0].acked), ("x", 4));
    // A stream nobody is granted keeps its records, until retention.
    let mut late = batch("e", "c", &[1, 2]);
    late.now_ms = 100;
    a.commit(vec![late]).await.expect("commit e");
    let mut later = batch("e", "c", &[3]);
    later.now_ms = 200;
    a.commit(vec![later]).await.expect("commit e");
    assert_eq!(seqs(a, "e", "c", 0).await, [1, 2, 3]);
    let expired = b.expire(150).await.expect("expire");
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(
        (expired[0].stream.device.as_str(), expired[0].records),
        ("e", 2)
    );
    assert_eq!((expired[0].first, expired[0].last), (1, 2));
    assert_eq!(seqs(a, "e", "c", 0).await, [3]);
    let streams = a.streams().await.expect("streams");
    let e = streams.iter().find(|s| s.device == "e").expect("stream e");
    assert_eq!((e.records, e.expired_unread, e.high), (1, 2, 3));
    // A revoked consumer's grants all go.
    a.grant(StreamKey::new("e", "c"), "x".into(), 7)
        .await
        .expect("grant");
    assert_eq!(b.drop_consumer("x".into()).await.expect("drop"), 2);
    assert!(a.grants(Some("x".into())).await.expect("grants").is_empty());
}

fn enrollment(digest: &str, device: &str, now_ms: i64) -> Enrollment {
    Enrollment {
        digest: digest.into(),
        device: device.into(),
        now_ms,
    }
}

/// Accounts hold one role; a token is redeemed once, only for its device,
/// committed with the certificate or not at all; revocation is seen by both hubs.
async fn registry_suite(a: &dyn Registry, b: &dyn Registry) {
    let account = |name: &str, role| NewAccount {
        name: name.into(),
        role,
        digest: format!("digest-{name}"),
        now_ms: 1,
    };
    a.add_account(account("alice", AdminRole::System))
        .await
        .expect("add");
    assert!(matches!(
        b.add_account(account("alice", AdminRole::Audit)).await,
        Err(RegistryError::AccountExists(_))
    ));
    assert_eq!(
        b.account("digest-alice".into()).await.expect("account"),
        Some(("alice".into(), AdminRole::System))
    );
    a.create_token(NewToken {
        device: "e1".into(),
        digest: "t1".into(),
        expires_ms: 1_000,
        by: "alice".into(),
        now_ms: 0,
        replaces: false,
    })
    .await
    .expect("token");
    let sign = || -> SignCertificate { Box::new(|| Ok(("CERT".to_owned(), 99, "0a".to_owned()))) };
    // A signing failure commits nothing: the token still works after.
    let failed = b
        .enroll(
            enrollment("t1", "e1", 10),
            Box::new(|| Err(RegistryError::Refused("no CA".into()))),
        )
        .await;
    assert!(matches!(failed, Err(RegistryError::Refused(_))));
    assert!(matches!(
        b.enroll(enrollment("t1", "e2", 10), sign()).await,
        Err(RegistryError::Token(_))
    ));
    assert_eq!(
        b.enroll(enrollment("t1", "e1", 10), sign())
            .await
            .expect("enroll"),
        "CERT"
    );
    assert!(matches!(
        a.enroll(enrollment("t1", "e1", 11), sign()).await,
        Err(RegistryError::Token(_))
    ));
    assert!(
        a.revoke("e1".into(), "alice".into(), 20)
            .await
            .expect("revoke")
    );
    assert!(b.is_revoked("e1".into()).await.expect("revoked"));
    assert_eq!(
        b.revoked_among(vec!["e1".into(), "e9".into()])
            .await
            .expect("among"),
        ["e1"]
    );
}

/// Two handles on one engine in a fresh directory: two hubs sharing it.
fn two_hubs<T: Send + 'static>(
    open: impl Fn(&std::path::Path) -> T,
) -> (tempfile::TempDir, Blocking<T>, Blocking<T>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (open(dir.path()), open(dir.path()));
    (dir, Blocking::new(a), Blocking::new(b))
}

fn firmware(version: &str, manifest: &str, parts: u64) -> NewFirmware {
    NewFirmware {
        version: version.into(),
        security_version: 3,
        manifest: manifest.into(),
        signature: format!("signature of {manifest}"),
        parts,
        boot_parts: [1, 1],
        by: "sysadmin".into(),
        now_ms: 1_000,
    }
}

/// An upload begun at one hub resumes at another; a version is stored with
/// one manifest only; every hub serves the parts any of them received.
async fn firmware_suite(a: &dyn Registry, b: &dyn Registry) {
    let row = a.put_firmware(firmware("2.0", "m2", 3)).await.expect("put");
    assert_eq!(
        (row.version.as_str(), row.parts, row.stored, row.complete),
        ("2.0", 3, 0, false)
    );
    assert_eq!(
        (row.security_version, row.boot_parts, row.by.as_str()),
        (3, [1, 1], "sysadmin")
    );
    let part = |name: &str, bytes: &[u8]| FirmwarePart {
        version: "2.0".into(),
        name: name.into(),
        bytes: bytes.to_vec(),
    };
    a.put_firmware_part(part("root/000000", b"first"))
        .await
        .expect("part");
    // The same upload again, at the other hub: where it stands.
    let again = b
        .put_firmware(firmware("2.0", "m2", 3))
        .await
        .expect("resume");
    assert_eq!((again.stored, again.at_ms), (1, 1_000));
    let mut other_kernel = firmware("2.0", "m2", 3);
    other_kernel.boot_parts = [2, 0];
    for other in [
        firmware("2.0", "another", 3),
        firmware("2.0", "m2", 4),
        other_kernel,
    ] {
        match b.put_firmware(other).await {
            Err(RegistryError::Refused(m)) => assert!(m.contains("2.0"), "{m}"),
            other => panic!("another manifest under 2.0 was not refused: {other:?}"),
        }
    }
    b.put_firmware_part(part("root/000000", b"again"))
        .await
        .expect("over");
    b.put_firmware_part(part("linux/000000", &[0, 255, 7]))
        .await
        .expect("binary");
    assert_eq!(
        a.firmware_parts("2.0".into()).await.expect("parts"),
        ["linux/000000", "root/000000"]
    );
    assert_eq!(
        a.firmware_part("2.0".into(), "root/000000".into())
            .await
            .expect("read"),
        Some(b"again".to_vec())
    );
    assert_eq!(
        a.firmware_part("2.0".into(), "linux/000000".into())
            .await
            .expect("read"),
        Some(vec![0, 255, 7])
    );
    assert_eq!(
        a.firmware_part("2.0".into(), "initrd/000000".into())
            .await
            .expect("read"),
        None
    );
    assert!(
        a.firmware_parts("9.9".into())
            .await
            .expect("none")
            .is_empty()
    );
    let mut later = firmware("3.0", "m3", 1);
    later.now_ms = 2_000;
    b.put_firmware(later).await.expect("3.0");
    b.firmware_complete("2.0".into()).await.expect("complete");
    let list = a.firmwares().await.expect("list");
    let shown: Vec<_> = list
        .iter()
        .map(|r| (r.version.as_str(), r.stored, r.complete))
        .collect();
    assert_eq!(shown, [("3.0", 0, false), ("2.0", 2, true)]);
    let got = a
        .firmware("2.0".into())
        .await
        .expect("2.0")
        .expect("stored");
    assert_eq!(
        (got.manifest.as_str(), got.signature.as_str()),
        ("m2", "signature of m2")
    );
    assert_eq!((got.row.stored, got.row.complete), (2, true));
    assert_eq!(a.firmware("9.9".into()).await.expect("none"), None);
}

#[tokio::test]
async fn the_sqlite_registry_stores_firmware_for_every_hub() {
    let (_dir, a, b) = two_hubs(|d| SqliteRegistry::open(d).expect("open"));
    firmware_suite(&a, &b).await;
}

#[tokio::test]
async fn the_sqlite_sink_keeps_the_sink_contract() {
    let (_dir, a, b) = two_hubs(|d| SqliteSink::open(d).expect("open"));
    sink_suite(&a, &b).await;
}

#[tokio::test]
async fn the_sqlite_sink_keeps_each_consumers_cursor() {
    let (_dir, a, b) = two_hubs(|d| SqliteSink::open(d).expect("open"));
    consumers_suite(&a, &b).await;
}

#[tokio::test]
async fn the_sqlite_registry_keeps_consumers_names_and_serials() {
    let (_dir, a, b) = two_hubs(|d| SqliteRegistry::open(d).expect("open"));
    consumer_names_suite(&a, &b).await;
}

async fn consumer_names_suite(a: &dyn Registry, b: &dyn Registry) {
    let new = |name: &str, serial: &str| NewConsumer {
        name: name.into(),
        serial: serial.into(),
        not_after_ms: 10,
        by: "ops".into(),
        now_ms: 1,
    };
    a.add_consumer(new("reports", "01")).await.expect("add");
    match b.add_consumer(new("reports", "02")).await {
        Err(RegistryError::ConsumerExists(n)) => assert_eq!(n, "reports"),
        other => panic!("a second consumer of one name: {other:?}"),
    }
    let row = b
        .consumer("reports".into())
        .await
        .expect("get")
        .expect("row");
    assert_eq!((row.serial.as_str(), row.revoked_ms), ("01", None));
    assert_eq!(
        a.revoke_consumer("reports".into(), "sec".into(), 5)
            .await
            .expect("revoke"),
        Some(true)
    );
    assert_eq!(
        a.revoke_consumer("reports".into(), "sec".into(), 6)
            .await
            .expect("revoke"),
        Some(false)
    );
    assert_eq!(
        a.revoke_consumer("nobody".into(), "sec".into(), 6)
            .await
            .expect("revoke"),
        None
    );
    // A revoked name is not reused: its old certificate must stay refused.
    assert!(b.add_consumer(new("reports", "03")).await.is_err());
    let all = a.consumers().await.expect("list");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].revoked_ms, Some(5));
}

/// One live certificate per device, across two hubs: the latest issued is
/// the one; renewal hands over until the new one is first used (or the
/// handover ends); re-enrollment hands over nothing; a device the hub did not
/// enroll keeps the first certificate seen.
async fn certificates_suite(a: &dyn Registry, b: &dyn Registry) {
    a.create_token(NewToken {
        device: "e1".into(),
        digest: "t1".into(),
        expires_ms: 1_000_000,
        by: "sam".into(),
        now_ms: 1,
        replaces: false,
    })
    .await
    .expect("token");
    let signed = |serial: &'static str| -> SignCertificate {
        Box::new(move || Ok(("CERT".to_owned(), 10_000_000, serial.to_owned())))
    };
    a.enroll(enrollment("t1", "e1", 10), signed("0a"))
        .await
        .expect("enroll");
    fn at<'a>(
        r: &'a dyn Registry,
        serial: &str,
        now: i64,
    ) -> gateway_store::registry::RegistryFuture<'a, Admission> {
        r.admit("e1".into(), serial.into(), now)
    }
    assert_eq!(at(b, "0a", 20).await.expect("admit"), Admission::Current);
    assert_eq!(
        at(b, "ff", 20).await.expect("admit"),
        Admission::Superseded {
            current: "0a".into()
        }
    );
    let renew = |serial: &str, now_ms: i64| Renewal {
        device: "e1".into(),
        serial: serial.into(),
        not_after_ms: 10_000_000,
        now_ms,
        handover_ms: 100,
    };
    // Renewed: the old one still opens tunnels until the new one is used.
    a.renewed(renew("0c", 1_000)).await.expect("renew");
    assert_eq!(
        at(b, "0a", 1_050).await.expect("admit"),
        Admission::Handover {
            current: "0c".into()
        }
    );
    assert_eq!(at(a, "0c", 1_060).await.expect("admit"), Admission::Current);
    assert!(matches!(
        at(b, "0a", 1_070).await.expect("admit"),
        Admission::Superseded { .. }
    ));
    // A renewal whose answer was lost: the box still holds 0c, and 0c stays
    // the one handed over from when it renews again.
    a.renewed(renew("0d", 2_000)).await.expect("renew");
    a.renewed(renew("0e", 2_010)).await.expect("renew again");
    assert!(matches!(
        at(b, "0c", 2_020).await.expect("admit"),
        Admission::Handover { .. }
    ));
    assert!(matches!(
        at(b, "0d", 2_020).await.expect("admit"),
        Admission::Superseded { .. }
    ));
    // ... and not past the handover.
    assert!(matches!(
        at(b, "0c", 2_200).await.expect("admit"),
        Admission::Superseded { .. }
    ));
    assert_eq!(
        b.live_serials(vec!["e1".into(), "e9".into()])
            .await
            .expect("live"),
        [("e1".to_owned(), vec!["0e".to_owned(), "0c".to_owned()])]
    );
    // Re-enrollment: the new certificate is the only one, at once.
    a.create_token(NewToken {
        device: "e1".into(),
        digest: "t2".into(),
        expires_ms: 1_000_000,
        by: "sue".into(),
        now_ms: 3_000,
        replaces: true,
    })
    .await
    .expect("token");
    a.enroll(enrollment("t2", "e1", 3_000), signed("0f"))
        .await
        .expect("re-enroll");
    for old in ["0e", "0c"] {
        assert!(matches!(
            at(b, old, 3_001).await.expect("admit"),
            Admission::Superseded { .. }
        ));
    }
    assert_eq!(
        b.live_serials(vec!["e1".into()]).await.expect("live"),
        [("e1".to_owned(), vec!["0f".to_owned()])]
    );
    // A device with an offline certificate: the first seen is the one.
    let off = |serial: &str| b.admit("off-1".into(), serial.into(), 5);
    assert_eq!(off("aa").await.expect("admit"), Admission::FirstSeen);
    assert!(matches!(
        off("bb").await.expect("admit"),
        Admission::Superseded { .. }
    ));
    assert_eq!(off("aa").await.expect("admit"), Admission::Current);
    a.revoke("off-1".into(), "sue".into(), 6)
        .await
        .expect("revoke");
    assert_eq!(off("aa").await.expect("admit"), Admission::Revoked);
}

#[tokio::test]
async fn the_sqlite_registry_keeps_one_live_certificate_per_device() {
    let (_dir, a, b) = two_hubs(|d| SqliteRegistry::open(d).expect("open"));
    certificates_suite(&a, &b).await;
}

#[tokio::test]
async fn the_sqlite_registry_keeps_the_registry_contract() {
    let (_dir, a, b) = two_hubs(|d| SqliteRegistry::open(d).expect("open"));
    registry_suite(&a, &b).await;
}

#[tokio::test]
async fn a_read_only_sink_refuses_writes_rather_than_asking_for_a_retry() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(SqliteSink::open(dir.path()).expect("create"));
    let file = dir.path().join(gateway_store::sqlite::sink::FILE_NAME);
    let s: Arc<dyn Sink> = Arc::new(Blocking::new(
        SqliteSink::open_read_only(&file).expect("open read-only"),
    ));
    match s.commit(vec![batch("d", "c", &[1])]).await {
        Err(e @ StoreError::Refused(_)) => assert!(!e.retry_later()),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Reading still works.
    assert_eq!(s.high(StreamKey::new("d", "c")).await.expect("high"), 0);
}

fn alarm(id: &str, at_ms: i64) -> gateway_core::detect::Alarm {
    gateway_core::detect::Alarm {
        id: id.into(),
        node: "e1".into(),
        rule: "D2.scan".into(),
        severity: "high".into(),
        attack: "scan".into(),
        direction: "inbound".into(),
        source: "192.0.2.1".into(),
        port: 40_000,
        device: None,
        target: "publish 10.0.0.1:443".into(),
        time: gateway_core::units::rfc3339_cst(at_ms),
        at_ms,
        action: "ban".into(),
        banned_until: None,
        count: 15,
        window_ms: 75_000,
        signature: None,
    }
}

/// Alarms from several devices, seen by either hub: each kept once, newest
/// first, filtered by device, time and acknowledgement; acknowledged once;
/// pruned with the collected audit.
async fn alarms_suite(a: &dyn Registry, b: &dyn Registry) {
    use gateway_store::registry::AlarmQuery;
    let all = |limit| AlarmQuery {
        limit,
        ..AlarmQuery::default()
    };
    assert_eq!(
        a.add_alarms("e1".into(), vec![alarm("x1", 10), alarm("x2", 20)])
            .await
            .expect("add"),
        2
    );
    // The other hub collects the same records again, and one more.
    assert_eq!(
        b.add_alarms("e1".into(), vec![alarm("x2", 20), alarm("x3", 30)])
            .await
            .expect("add"),
        1
    );
    b.add_alarms("e2".into(), vec![alarm("y1", 25)])
        .await
        .expect("add");
    let ids = |rows: Vec<gateway_store::registry::AlarmRow>| -> Vec<String> {
        rows.into_iter().map(|r| r.alarm.id).collect()
    };
    assert_eq!(
        ids(a.alarms(all(10)).await.expect("list")),
        ["x3", "y1", "x2", "x1"]
    );
    assert_eq!(ids(a.alarms(all(2)).await.expect("list")), ["x3", "y1"]);
    let e2 = AlarmQuery {
        device: Some("e2".into()),
        ..all(10)
    };
    assert_eq!(ids(b.alarms(e2).await.expect("list")), ["y1"]);
    let since = AlarmQuery {
        since_ms: Some(20),
        ..all(10)
    };
    assert_eq!(
        ids(a.alarms(since).await.expect("list")),
        ["x3", "y1", "x2"]
    );
    assert_eq!(
        a.ack_alarm("x3".into(), "wang".into(), 40)
            .await
            .expect("ack"),
        Some(true)
    );
    assert_eq!(
        b.ack_alarm("x3".into(), "li".into(), 41)
            .await
            .expect("ack"),
        Some(false),
        "acknowledged once"
    );
    assert_eq!(
        b.ack_alarm("nope".into(), "li".into(), 41)
            .await
            .expect("ack"),
        None
    );
    let open = AlarmQuery {
        unacked: true,
        ..all(10)
    };
    assert_eq!(ids(b.alarms(open).await.expect("list")), ["y1", "x2", "x1"]);
    let rows = a.alarms(all(1)).await.expect("list");
    assert_eq!(rows[0].acked, Some(("wang".into(), 40)));
    assert_eq!(rows[0].device, "e1");
    a.prune_audit(21).await.expect("prune");
    assert_eq!(ids(b.alarms(all(10)).await.expect("list")), ["x3", "y1"]);
}

#[tokio::test]
async fn the_sqlite_registry_keeps_alarms_once_each() {
    let (_dir, a, b) = two_hubs(|d| SqliteRegistry::open(d).expect("open"));
    alarms_suite(&a, &b).await;
}

/// A chain of `n` records of `device`.
fn audit_chain(device: &str, n: u64) -> Vec<gateway_core::audit::Record> {
    use gateway_core::audit::{Event, GENESIS, Record};
    let mut prev = GENESIS;
    (1..=n)
        .map(|i| {
            let r = Record::chain(
                i,
                Event {
                    time_ms: i as i64 * 1000,
                    device: device.into(),
                    subject: "s".into(),
                    object: "o".into(),
                    event: "relay.open".into(),
                    outcome: "allow".into(),
                    rule: String::new(),
                    detail: String::new(),
                },
                prev,
            );
            prev = r.hash;
            r
        })
        .collect()
}

/// Labels set at one hub are read at the other; removal, replacement, the cap.
async fn labels_suite(a: &dyn Registry, b: &dyn Registry) {
    use gateway_store::registry::LabelChange;
    let set = |d: &str, set: &[(&str, &str)], remove: &[&str]| LabelChange {
        device: d.into(),
        set: set
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        remove: remove.iter().map(|k| (*k).into()).collect(),
    };
    let now = a
        .set_labels(set("e1", &[("city", "changchun"), ("ring", "canary")], &[]))
        .await
        .expect("label");
    assert_eq!(now.len(), 2);
    b.set_labels(set("e2", &[("city", "jilin")], &[]))
        .await
        .expect("label");
    let now = b
        .set_labels(set("e1", &[("ring", "main")], &["city"]))
        .await
        .expect("relabel");
    assert_eq!(now, [("ring".to_owned(), "main".to_owned())]);
    assert_eq!(
        a.labels().await.expect("labels"),
        [
            ("e1".to_owned(), "ring".to_owned(), "main".to_owned()),
            ("e2".to_owned(), "city".to_owned(), "jilin".to_owned()),
        ]
    );
    let many: Vec<(String, String)> = (0..40).map(|i| (format!("k{i}"), "v".into())).collect();
    let too_many = LabelChange {
        device: "e3".into(),
        set: many,
        remove: vec![],
    };
    match a.set_labels(too_many).await {
        Err(RegistryError::Refused(m)) => assert!(m.contains("at most"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        a.labels().await.expect("labels").len(),
        2,
        "nothing of e3 stored"
    );
}

/// Coalesced audit writes: several devices' batches in one transaction, from
/// two hubs collecting the same boxes. Overlaps of the same records are
/// taken once; one device's break stores nothing of its batch and leaves the
/// others' alone; a record that differs from the one collected is a break.
async fn collected_audit_suite(a: &dyn Registry, b: &dyn Registry) {
    let (c1, c2, c3) = (
        audit_chain("e1", 8),
        audit_chain("e2", 4),
        audit_chain("e3", 4),
    );
    let mut gap = c3.clone();
    gap.remove(1);
    let done = a
        .append_audits(vec![
            ("e1".into(), c1[..5].to_vec()),
            ("e2".into(), c2.clone()),
            ("e3".into(), gap),
        ])
        .await
        .expect("write");
    assert_eq!(done[..2], [Ok(5), Ok(4)]);
    assert!(
        done[2]
            .as_ref()
            .is_err_and(|p| p.contains("record 2: missing")),
        "{done:?}"
    );
    // The other hub got e1 from 3 (a box connected to both): the overlap is
    // taken once; e3 stays marked broken.
    let done = b
        .append_audits(vec![
            ("e3".into(), c3.clone()),
            ("e1".into(), c1[2..].to_vec()),
        ])
        .await
        .expect("write");
    assert!(
        done[0]
            .as_ref()
            .is_err_and(|p| p.contains("already marked broken")),
        "{done:?}"
    );
    assert_eq!(done[1], Ok(3));
    assert_eq!(a.audit_next("e1".into()).await.expect("next"), 9);
    assert_eq!(b.audit_next("e2".into()).await.expect("next"), 5);
    // Another record under a collected record's number is a break.
    let mut edited = c2[2..].to_vec();
    edited[0].hash[0] ^= 1;
    let done = a
        .append_audits(vec![("e2".into(), edited)])
        .await
        .expect("write");
    assert!(
        done[0].as_ref().is_err_and(|p| p.contains("differs")),
        "{done:?}"
    );
    assert_eq!(
        a.append_audits(vec![]).await.expect("nothing to write"),
        Vec::<Result<usize, String>>::new()
    );
}

/// A box connecting: what it runs is recorded, its last result kept while it
/// speaks of that version, and the newest push answered, at either hub.
async fn connected_suite(a: &dyn Registry, b: &dyn Registry) {
    use gateway_store::registry::{AppliedReport, ConfigConnected};
    let connected = |version: u64, text: &str, now_ms: i64| ConfigConnected {
        device: "e9".into(),
        version,
        text: text.into(),
        now_ms,
    };
    let seen = a
        .config_connected(connected(0, "own", 1))
        .await
        .expect("first");
    assert_eq!((seen.before, seen.desired), (None, None));
    let v = b
        .push_config(ConfigPush {
            device: "e9".into(),
            text: "pushed".into(),
            by: "ops".into(),
            now_ms: 2,
        })
        .await
        .expect("push");
    let reverted = format!("{{\"offered\":{v},\"outcome\":\"reverted\"}}");
    a.set_applied(AppliedReport {
        device: "e9".into(),
        version: 0,
        text: None,
        result: reverted.clone(),
        now_ms: 3,
    })
    .await
    .expect("result");
    let seen = b
        .config_connected(connected(0, "own", 4))
        .await
        .expect("again");
    assert_eq!(seen.before, Some((0, reverted.clone())));
    assert_eq!(seen.desired, Some((v, "pushed".to_owned())));
    let row = a.device("e9".into()).await.expect("row").expect("known");
    assert_eq!(row.applied.map(|x| (x.0, x.1)), Some((0, reverted)), "kept");
    // Running the pushed version now: the revert no longer speaks of it.
    b.config_connected(connected(v, "pushed", 5))
        .await
        .expect("on v");
    let row = a.device("e9".into()).await.expect("row").expect("known");
    let applied = row.applied.expect("applied");
    assert_eq!(
        (applied.0, applied.1.as_str()),
        (v, "{\"outcome\":\"connected\"}")
    );
    assert_eq!(
        a.applied("e9".into()).await.expect("text"),
        Some((v, "pushed".to_owned()))
    );
}

#[tokio::test]
async fn the_sqlite_registry_records_a_box_connecting() {
    let (_dir, a, b) = two_hubs(|d| SqliteRegistry::open(d).expect("open"));
    connected_suite(&a, &b).await;
}

#[tokio::test]
async fn the_sqlite_registry_collects_audit_coalesced() {
    let (_dir, a, b) = two_hubs(|d| SqliteRegistry::open(d).expect("open"));
    collected_audit_suite(&a, &b).await;
}

#[tokio::test]
async fn the_sqlite_registry_keeps_labels() {
    let (_dir, a, b) = two_hubs(|d| SqliteRegistry::open(d).expect("open"));
    labels_suite(&a, &b).await;
}

/// Hubs sharing the registry learn of each other's changes from the log.
async fn changes_suite(a: &dyn Registry, b: &dyn Registry) {
    use gateway_store::registry::ChangeKind;
    let from = b.change_head().await.expect("head");
    a.revoke("e1".into(), "ops".into(), 5)
        .await
        .expect("revoke");
    a.push_config(ConfigPush {
        device: "e2".into(),
        text: "x".into(),
        by: "ops".into(),
        now_ms: 6,
    })
    .await
    .expect("push");
    // A second revocation of a revoked device changes nothing.
    a.revoke("e1".into(), "ops".into(), 7).await.expect("again");
    let seen = b.changes(from, 100).await.expect("changes");
    let kinds: Vec<_> = seen.iter().map(|c| (c.kind, c.subject.as_str())).collect();
    assert_eq!(
        kinds,
        [(ChangeKind::Revoked, "e1"), (ChangeKind::Config, "e2")]
    );
    assert!(seen.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(b.change_head().await.expect("head"), seen[1].id);
    assert_eq!(b.changes(seen[1].id, 100).await.expect("none"), []);
    assert_eq!(b.changes(from, 1).await.expect("one").len(), 1);
    // Pruned with the collected audit's retention.
    a.prune_audit(6).await.expect("prune");
    let left = b.changes(from, 100).await.expect("changes");
    assert_eq!(left.len(), 1, "the push at 6 stays: {left:?}");
}

#[tokio::test]
async fn the_sqlite_registry_logs_changes_for_other_hubs() {
    let (_dir, a, b) = two_hubs(|d| SqliteRegistry::open(d).expect("open"));
    changes_suite(&a, &b).await;
    assert!(b.wake().is_none(), "SQLite is polled");
}

/// Templates, variables, rollouts and pages of the device table, written at
/// one hub and read at the other.
async fn province_suite(a: &dyn Registry, b: &dyn Registry) {
    use gateway_store::registry::{
        AppliedReport, Members, NewRollout, NewTemplate, RolloutUpdate, VarsChange,
    };
    // Template versions grow per name.
    let t = |name: &str, text: &str| NewTemplate {
        name: name.into(),
        text: text.into(),
        by: "wang".into(),
        now_ms: 1,
    };
    assert_eq!(a.put_template(t("county", "v1")).await.expect("put"), 1);
    assert_eq!(b.put_template(t("county", "v2")).await.expect("put"), 2);
    assert_eq!(a.put_template(t("city", "c1")).await.expect("put"), 1);
    let newest = b
        .template("county".into(), None)
        .await
        .expect("get")
        .expect("some");
    assert_eq!(
        (newest.version, newest.text.as_str(), newest.by.as_str()),
        (2, "v2", "wang")
    );
    let first = a
        .template("county".into(), Some(1))
        .await
        .expect("get")
        .expect("v1");
    assert_eq!(first.text, "v1");
    assert!(
        a.template("county".into(), Some(3))
            .await
            .expect("get")
            .is_none()
    );
    assert!(
        a.template("nope".into(), None)
            .await
            .expect("get")
            .is_none()
    );
    let all: Vec<(String, u64)> = b
        .templates()
        .await
        .expect("list")
        .into_iter()
        .map(|t| (t.name, t.version))
        .collect();
    assert_eq!(all, [("city".to_owned(), 1), ("county".to_owned(), 2)]);

    // Variables: set, remove, replace, refused names.
    let vars = |d: &str, set: &[(&str, &str)], remove: &[&str], replace: bool| VarsChange {
        device: d.into(),
        set: set
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        remove: remove.iter().map(|k| (*k).into()).collect(),
        replace,
    };
    a.set_vars(vars(
        "e1",
        &[("hub", "10.0.0.1:4433"), ("zone_net", "10.1.0.0/16")],
        &[],
        false,
    ))
    .await
    .expect("vars");
    let after = b
        .set_vars(vars(
            "e1",
            &[("hub", "10.0.0.2:4433")],
            &["zone_net"],
            false,
        ))
        .await
        .expect("vars");
    assert_eq!(after, [("hub".to_owned(), "10.0.0.2:4433".to_owned())]);
    b.set_vars(vars("e2", &[("a", "1"), ("b", "2")], &[], false))
        .await
        .expect("vars");
    let replaced = a
        .set_vars(vars("e2", &[("c", "3")], &[], true))
        .await
        .expect("replace");
    assert_eq!(replaced, [("c".to_owned(), "3".to_owned())]);
    for bad in [
        vars("e3", &[("Bad", "1")], &[], false),
        vars("e3", &[("device", "x")], &[], false),
    ] {
        assert!(matches!(
            a.set_vars(bad).await,
            Err(RegistryError::Refused(_))
        ));
    }
    assert_eq!(a.vars(vec!["e1".into()]).await.expect("vars").len(), 1);
    assert_eq!(
        b.vars(vec![]).await.expect("vars").len(),
        2,
        "nothing of e3"
    );

    // A device is in at most one active rollout.
    let new = |id: &str, devices: &[&str]| NewRollout {
        id: id.into(),
        json: format!("{{\"id\":\"{id}\"}}"),
        devices: devices.iter().map(|d| (*d).into()).collect(),
        now_ms: 10,
    };
    a.create_rollout(new("r-1", &["e1", "e2"]))
        .await
        .expect("create");
    match b.create_rollout(new("r-2", &["e3", "e2"])).await {
        Err(RegistryError::InRollout { device, rollout }) => {
            assert_eq!((device.as_str(), rollout.as_str()), ("e2", "r-1"));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        b.rollout("r-2".into()).await.expect("get").is_none(),
        "nothing of r-2 stored"
    );
    // Compare and swap: the second writer at the same revision loses.
    let row = b.rollout("r-1".into()).await.expect("get").expect("r-1");
    assert_eq!((row.rev, row.active), (1, true));
    let upd = |rev: u64, json: &str, active: bool, members: Members| RolloutUpdate {
        id: "r-1".into(),
        rev,
        json: json.into(),
        active,
        members,
        now_ms: 11,
    };
    assert!(
        a.update_rollout(upd(1, "{\"v\":2}", true, Members::Keep))
            .await
            .expect("cas")
    );
    assert!(
        !b.update_rollout(upd(1, "{\"v\":3}", true, Members::Keep))
            .await
            .expect("cas")
    );
    let row = b.rollout("r-1".into()).await.expect("get").expect("r-1");
    assert_eq!((row.rev, row.json.as_str()), (2, "{\"v\":2}"));
    // Finished: the devices are free for another rollout.
    assert!(
        b.update_rollout(upd(2, "{}", false, Members::Release))
            .await
            .expect("done")
    );
    a.create_rollout(new("r-2", &["e2"]))
        .await
        .expect("e2 is free");
    let active: Vec<String> = b
        .rollouts(true)
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(active, ["r-2"]);
    assert_eq!(b.rollouts(false).await.expect("list").len(), 2);
    // Claiming them again (a rollback of the finished one) is refused for a
    // device another rollout holds, and changes nothing then.
    let claim = upd(
        3,
        "{\"rolling\":1}",
        true,
        Members::Claim(vec!["e1".into(), "e2".into()]),
    );
    assert!(matches!(
        a.update_rollout(claim).await,
        Err(RegistryError::InRollout { .. })
    ));
    let row = a.rollout("r-1".into()).await.expect("get").expect("r-1");
    assert_eq!((row.rev, row.active), (3, false));

    // The box's own file is kept as version 0 at its first push.
    a.set_applied(AppliedReport {
        device: "e7".into(),
        version: 0,
        text: Some("own".into()),
        result: "{}".into(),
        now_ms: 20,
    })
    .await
    .expect("state");
    let v = b
        .push_config(ConfigPush {
            device: "e7".into(),
            text: "pushed".into(),
            by: "wang".into(),
            now_ms: 21,
        })
        .await
        .expect("push");
    assert_eq!(v, 1);
    assert_eq!(
        a.config_version("e7".into(), 0)
            .await
            .expect("v0")
            .as_deref(),
        Some("own")
    );
    assert_eq!(
        a.desired("e7".into()).await.expect("desired").map(|d| d.0),
        Some(1)
    );

    // Pages of the device table, in id order, with their labels.
    for i in 0..25 {
        b.heartbeat(format!("p{i:02}"), 30, "{}".into())
            .await
            .expect("beat");
    }
    a.set_labels(gateway_store::registry::LabelChange {
        device: "p03".into(),
        set: vec![("city".into(), "jilin".into())],
        remove: vec![],
    })
    .await
    .expect("label");
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = b
            .devices_page(after.clone(), 10, Default::default())
            .await
            .expect("page");
        if page.rows.is_empty() {
            break;
        }
        assert!(page.rows.len() <= 10);
        if page.rows.iter().any(|r| r.id == "p03") {
            assert_eq!(
                page.labels,
                [("p03".to_owned(), "city".to_owned(), "jilin".to_owned())]
            );
        }
        after = page.rows.last().map(|r| r.id.clone());
        seen.extend(page.rows);
    }
    let ids: Vec<&str> = seen.iter().map(|r| r.id.as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(ids, sorted, "in order, each once");
    // The page and the one-by-one read agree on every device.
    let whole = a.devices().await.expect("devices");
    assert_eq!(seen, whole);
}

/// Every page of `filter`, `limit` at a time.
async fn filtered(
    r: &dyn Registry,
    filter: &gateway_core::selector::Stored,
    limit: usize,
) -> Vec<(gateway_store::registry::DeviceRow, Vec<(String, String)>)> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = r
            .devices_page(after.take(), limit, filter.clone())
            .await
            .expect("page");
        let full = page.rows.len() == limit;
        after = page.rows.last().map(|r| r.id.clone());
        for row in page.rows {
            let labels = page
                .labels
                .iter()
                .filter(|l| l.0 == row.id)
                .map(|l| (l.1.clone(), l.2.clone()))
                .collect();
            out.push((row, labels));
        }
        if !full {
            return out;
        }
    }
}

/// A page filtered in the registry holds exactly the devices the same
/// filter admits in memory over the whole table, in order, on both hubs.
async fn device_filter_suite(a: &dyn Registry, b: &dyn Registry) {
    use gateway_core::selector::Selector;
    let now = 1_000_000_000_000i64;
    for i in 0..30 {
        let d = format!("d{i:02}");
        if i % 2 == 0 {
            a.heartbeats(vec![gateway_store::registry::Heartbeat {
                device: d.clone(),
                now_ms: now,
                json: "{}".into(),
                not_after_ms: Some(now + i64::try_from(i).expect("small") * 10 * 3_600_000),
            }])
            .await
            .expect("beat");
        } else if i % 3 == 0 {
            b.revoke(d.clone(), "alice".into(), now)
                .await
                .expect("revoke");
        } else {
            let v = b
                .push_config(ConfigPush {
                    device: d.clone(),
                    text: "x".into(),
                    by: "wang".into(),
                    now_ms: now,
                })
                .await
                .expect("push");
            if i % 5 == 1 {
                a.set_applied(gateway_store::registry::AppliedReport {
                    device: d.clone(),
                    version: v,
                    text: None,
                    result: "{}".into(),
                    now_ms: now,
                })
                .await
                .expect("applied");
            }
        }
        if i % 7 == 0 {
            a.revoke(d.clone(), "alice".into(), now)
                .await
                .expect("revoke");
        }
        let mut set = Vec::new();
        if i % 4 != 0 {
            set.push(("city".to_owned(), ["cc", "jl", "sp"][i % 3].to_owned()));
        }
        if i % 5 == 0 {
            set.push(("ring".to_owned(), "canary".to_owned()));
        }
        a.set_labels(gateway_store::registry::LabelChange {
            device: d,
            set,
            remove: vec![],
        })
        .await
        .expect("label");
    }
    let whole = filtered(b, &Default::default(), 7).await;
    assert_eq!(whole.len(), 30);
    let mut narrowed = 0;
    for text in [
        "",
        "state=revoked",
        "state=online",
        "state=never-seen",
        "state!=revoked,city=jl",
        "state in (revoked,offline)",
        "state=online,state=revoked",
        "city in (cc,sp),!ring",
        "city notin (cc),ring",
        "city!=jl",
        "!city",
        "cert-expires<72h",
        "cert-expires>100h,cert-expires<200h,city",
        "config=drift,ring=canary",
        "config=drift",
        "config=in-sync,state!=revoked",
    ] {
        let stored = Selector::parse(text).expect(text).stored(now);
        let want: Vec<&str> = whole
            .iter()
            .filter(|(row, labels)| {
                let labels = labels.iter().cloned().collect();
                let drift = row
                    .desired
                    .is_some_and(|d| row.applied.as_ref().is_none_or(|a| a.0 < d));
                stored.admits(
                    &labels,
                    (row.revoked_ms.is_some(), row.status.is_some(), drift),
                    row.not_after_ms,
                )
            })
            .map(|(row, _)| row.id.as_str())
            .collect();
        narrowed += usize::from(!want.is_empty() && want.len() < whole.len());
        for (r, limit) in [(a, 3), (b, 100)] {
            let got = filtered(r, &stored, limit).await;
            let ids: Vec<&str> = got.iter().map(|(row, _)| row.id.as_str()).collect();
            assert_eq!(ids, want, "{text:?}, {limit} a page");
            for (row, labels) in &got {
                let same = whole.iter().find(|(w, _)| w.id == row.id).expect("known");
                assert_eq!((&same.0, &same.1), (row, labels), "{text:?}");
            }
        }
    }
    assert!(
        narrowed >= 10,
        "the devices exercise the filters: {narrowed}"
    );
}

#[tokio::test]
async fn the_sqlite_registry_filters_device_pages_as_selectors_do() {
    let (_dir, a, b) = two_hubs(|d| SqliteRegistry::open(d).expect("open"));
    device_filter_suite(&a, &b).await;
}

#[tokio::test]
async fn the_sqlite_registry_keeps_templates_variables_and_rollouts() {
    let (_dir, a, b) = two_hubs(|d| SqliteRegistry::open(d).expect("open"));
    province_suite(&a, &b).await;
}

mod postgres {
    //! The same suites on PostgreSQL 15.

    use super::*;
    use gateway_store::postgres::cluster::{self, Cluster};
    use gateway_store::postgres::{Pg, PgRegistry, PgSink};

    /// Two hubs on one database of a throwaway cluster, or `None` (skipped,
    /// saying why).
    async fn two() -> Option<(Cluster, Pg, Pg)> {
        if let Some(why) = cluster::missing() {
            eprintln!("skipped: {why}");
            return None;
        }
        // Durable: a stopped server must keep what it committed.
        let c = Cluster::start(true).expect("cluster");
        let (a, b) = on(&c, "hub").await;
        Some((c, a, b))
    }

    /// Two hubs on a new database `db` of `c`.
    async fn on(c: &Cluster, db: &str) -> (Pg, Pg) {
        c.create_database(db).expect("database");
        let a = Pg::open(&c.store(db, 4)).await.expect("open a");
        let b = Pg::open(&c.store(db, 4)).await.expect("open b");
        (a, b)
    }

    #[tokio::test]
    async fn the_postgres_sink_keeps_the_sink_contract() {
        let Some((_c, a, b)) = two().await else {
            return;
        };
        sink_suite(&PgSink::new(a), &PgSink::new(b)).await;
    }

    #[tokio::test]
    async fn the_postgres_sink_keeps_each_consumers_cursor() {
        let Some((_c, a, b)) = two().await else {
            return;
        };
        consumers_suite(&PgSink::new(a), &PgSink::new(b)).await;
    }

    #[tokio::test]
    async fn the_postgres_registry_keeps_the_registry_contract() {
        let Some((c, a, b)) = two().await else {
            return;
        };
        registry_suite(&PgRegistry::new(a), &PgRegistry::new(b)).await;
        let (a, b) = on(&c, "names").await;
        consumer_names_suite(&PgRegistry::new(a), &PgRegistry::new(b)).await;
        let (a, b) = on(&c, "certs").await;
        certificates_suite(&PgRegistry::new(a), &PgRegistry::new(b)).await;
        let (a, b) = on(&c, "alarms").await;
        alarms_suite(&PgRegistry::new(a), &PgRegistry::new(b)).await;
        let (a, b) = on(&c, "labels").await;
        labels_suite(&PgRegistry::new(a), &PgRegistry::new(b)).await;
        let (a, b) = on(&c, "province").await;
        province_suite(&PgRegistry::new(a), &PgRegistry::new(b)).await;
        let (a, b) = on(&c, "filter").await;
        device_filter_suite(&PgRegistry::new(a), &PgRegistry::new(b)).await;
        let (a, b) = on(&c, "collect").await;
        collected_audit_suite(&PgRegistry::new(a), &PgRegistry::new(b)).await;
        let (a, b) = on(&c, "connect").await;
        connected_suite(&PgRegistry::new(a), &PgRegistry::new(b)).await;
        let (a, b) = on(&c, "firmware").await;
        firmware_suite(&PgRegistry::new(a), &PgRegistry::new(b)).await;
    }

    #[tokio::test]
    async fn the_postgres_registry_logs_changes_and_wakes_the_other_hubs() {
        let Some((_c, a, b)) = two().await else {
            return;
        };
        let wake = PgRegistry::new(b.clone()).wake().expect("a waker");
        let (a, b) = (PgRegistry::new(a), PgRegistry::new(b));
        // The listener connected (it wakes once when it does).
        tokio::time::timeout(Duration::from_secs(20), wake.notified())
            .await
            .expect("the listener is up");
        let from = b.change_head().await.expect("head");
        a.revoke("e9".into(), "ops".into(), 1)
            .await
            .expect("revoke");
        tokio::time::timeout(Duration::from_secs(5), wake.notified())
            .await
            .expect("woken by NOTIFY within 5 s");
        let seen = b.changes(from, 10).await.expect("changes");
        assert_eq!(seen.len(), 1);
        changes_suite(&a, &b).await;
    }

    /// A populated single hub (SQLite) copied into PostgreSQL reads back the
    /// same through the traits; a second import into it is refused.
    #[tokio::test]
    async fn a_sqlite_hub_is_imported_whole_and_verified() {
        let Some((c, pg, _)) = two().await else {
            return;
        };
        let dir = tempfile::tempdir().expect("dir");
        let sink = Blocking::new(SqliteSink::open(dir.path()).expect("sink"));
        let reg = Blocking::new(SqliteRegistry::open(dir.path()).expect("registry"));
        sink.commit(vec![batch("d", "c", &[1, 2, 3]), batch("e", "c", &[1])])
            .await
            .expect("commit");
        sink.grant(StreamKey::new("d", "c"), "reports".into(), 1)
            .await
            .expect("grant");
        sink.ack(StreamKey::new("d", "c"), "reports".into(), 1)
            .await
            .expect("ack");
        sink.failed(StreamKey::new("e", "c"), 1, "refused".into())
            .await
            .expect("failed");
        reg.add_account(NewAccount {
            name: "sam".into(),
            role: AdminRole::System,
            digest: "d1".into(),
            now_ms: 1,
        })
        .await
        .expect("account");
        reg.push_config(ConfigPush {
            device: "e1".into(),
            text: "x".into(),
            by: "sam".into(),
            now_ms: 2,
        })
        .await
        .expect("push");
        reg.revoke("e2".into(), "sam".into(), 3)
            .await
            .expect("revoke");
        let chain = audit_chain("e1", 5);
        let mut forged = audit_chain("e3", 3);
        forged[1].event.detail = "edited".into();
        let stored = reg
            .append_audits(vec![("e1".into(), chain.clone()), ("e3".into(), forged)])
            .await
            .expect("sql");
        assert_eq!(stored[0], Ok(5));
        assert!(stored[1].is_err(), "{stored:?}");
        drop((sink, reg));
        let (fleet, sinkf) = (
            dir.path().join(gateway_store::sqlite::registry::FILE_NAME),
            dir.path().join(gateway_store::sqlite::sink::FILE_NAME),
        );
        let done = gateway_store::postgres::import::from_sqlite(&pg, &fleet, &sinkf, |_, _| {})
            .await
            .expect("import");
        assert_eq!(done.chains, (1, 1), "e1 verified, e3 marked broken");
        let rows: std::collections::HashMap<_, _> = done.tables.iter().cloned().collect();
        assert_eq!(
            (rows["record"], rows["edge_audit"], rows["account"]),
            (2 + 1, 5, 1)
        );
        let (r, s) = (PgRegistry::new(pg.clone()), PgSink::new(pg.clone()));
        assert_eq!(
            seqs(&s, "d", "c", 0).await,
            [2, 3],
            "record 1 was acked by the only consumer"
        );
        assert_eq!(s.high(StreamKey::new("d", "c")).await.expect("high"), 3);
        assert_eq!(
            s.cursor(StreamKey::new("d", "c"), "reports".into())
                .await
                .expect("cursor"),
            Some(1)
        );
        assert_eq!(
            s.failures(StreamKey::new("e", "c"), 0, 9)
                .await
                .expect("failures"),
            [(1, "refused".to_owned())]
        );
        assert!(r.is_revoked("e2".into()).await.expect("revoked"));
        assert_eq!(
            r.desired("e1".into()).await.expect("desired"),
            Some((1, "x".into()))
        );
        assert_eq!(r.audit_next("e1".into()).await.expect("next"), 6);
        let export = r
            .audit_export("e1".into(), 0)
            .await
            .expect("export")
            .expect("some");
        assert_eq!((export.continuous, export.records), (true, chain));
        assert_eq!(
            r.account("d1".into()).await.expect("account"),
            Some(("sam".into(), AdminRole::System))
        );
        // The database is taken now: a second import is refused, and leaves it.
        match gateway_store::postgres::import::from_sqlite(&pg, &fleet, &sinkf, |_, _| {}).await {
            Err(e) => assert!(e.to_string().contains("not empty"), "{e}"),
            Ok(_) => panic!("imported twice"),
        }
        assert_eq!(
            c.sql("hub", "SELECT count(*) FROM record").expect("sql"),
            "3"
        );
    }

    #[tokio::test]
    async fn hubs_starting_at_once_migrate_once() {
        if let Some(why) = cluster::missing() {
            eprintln!("skipped: {why}");
            return;
        }
        let c = Cluster::start(false).expect("cluster");
        c.create_database("hub").expect("database");
        let store = c.store("hub", 2);
        let opened = futures_util::future::join_all((0..4).map(|_| Pg::open(&store))).await;
        assert!(opened.iter().all(Result::is_ok), "{opened:?}");
        let rows = c
            .sql("hub", "SELECT count(*) FROM schema_migration")
            .expect("sql");
        assert_eq!(
            rows,
            gateway_store::postgres::schema::MIGRATIONS
                .len()
                .to_string()
        );
        // A schema newer than this gatewayd is refused, not touched.
        c.sql(
            "hub",
            "INSERT INTO schema_migration (version, description) VALUES (999, 'future')",
        )
        .expect("sql");
        match Pg::open(&store).await {
            Err(e) => assert!(e.to_string().contains("newer"), "{e}"),
            Ok(_) => panic!("a newer schema was accepted"),
        }
    }

    #[tokio::test]
    async fn a_stopped_server_is_unavailable_and_nothing_is_half_committed() {
        let Some((c, a, _b)) = two().await else {
            return;
        };
        let pg = a.clone();
        let s = PgSink::new(a);
        s.commit(vec![batch("d", "c", &[1, 2])])
            .await
            .expect("commit");
        c.stop_immediate();
        // The first callers find the connection lost, then that no new one can
        // be made; from then on callers are answered at once, backing off.
        let mut errors = Vec::new();
        for _ in 0..3 {
            match s.commit(vec![batch("d", "c", &[3, 4])]).await {
                Err(e) => {
                    assert!(e.retry_later(), "{e}");
                    errors.push(e.to_string());
                }
                Ok(c) => panic!("committed with the server down: {c:?}"),
            }
        }
        assert!(errors[2].contains("next attempt"), "{errors:?}");
        // pg_ctl -w returns once the server accepts connections; the ping
        // tries at once and ends the backoff.
        c.start_again().expect("restart");
        pg.ping()
            .await
            .expect("the server answers after its restart");
        // The resend is stored once, after what was committed before the crash.
        let c = s
            .commit(vec![batch("d", "c", &[1, 2, 3, 4])])
            .await
            .expect("committed after the restart");
        assert_eq!((c[0].upto, c[0].stored, c[0].duplicates), (4, 2, 2));
        assert_eq!(seqs(&s, "d", "c", 0).await, [1, 2, 3, 4]);
    }
}
