//! The hub's storage traits, as the daemon calls them. Every check takes a
//! `&dyn Sink` or `&dyn Registry`, so each engine runs the same suite: today
//! the embedded SQLite one (two handles on one file stand for two hubs).

use std::sync::Arc;

use gateway_core::fleet::AdminRole;
use gateway_core::wire::SyncRecord;
use gateway_store::error::StoreError;
use gateway_store::registry::{
    Enrollment, NewAccount, NewToken, Registry, RegistryError, SignCertificate,
};
use gateway_store::sink::{Sink, SinkBatch, StreamKey};
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
    let sign = || -> SignCertificate { Box::new(|| Ok(("CERT".to_owned(), 99))) };
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

#[tokio::test]
async fn the_sqlite_sink_keeps_the_sink_contract() {
    let (_dir, a, b) = two_hubs(|d| SqliteSink::open(d).expect("open"));
    sink_suite(&a, &b).await;
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
