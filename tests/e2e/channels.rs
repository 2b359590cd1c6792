//! Channels end to end, in-process on loopback: records posted to an edge reach
//! the hub's sink exactly once and in order, through a hub outage, a hub
//! restart and a lossy link made by a userspace UDP relay; consumers read them
//! with a cursor and acknowledge.

mod common;
mod net;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use net::*;
use tokio::net::UdpSocket;

const CHANNEL: &str = "\n[[channel]]\nname = \"readings\"\nzone = \"lab\"\nformats = [\"json\"]\nmax_record_bytes = \"4KiB\"\n";

fn edge_spec(hubs: Vec<SocketAddr>) -> EdgeSpec<'static> {
    EdgeSpec {
        extra: CHANNEL,
        ingest: true,
        ..EdgeSpec::new("edge-b", 2, 2, hubs)
    }
}

/// Posts records `from..=to` (bodies `{"n":N}`), alone or in NDJSON batches of
/// ten, and checks that the edge numbered them `from..=to`.
async fn post_range(ingest: SocketAddr, from: u64, to: u64) {
    let path = "/v1/channels/readings/records";
    let mut n = from;
    while n <= to {
        if n % 3 == 0 && n + 9 <= to {
            let body: String = (n..n + 10).map(|i| format!("{{\"n\":{i}}}\n")).collect();
            let (status, b) =
                http_post(ingest, path, Some("application/x-ndjson"), body.as_bytes()).await;
            assert_eq!(status, 200, "{b}");
            assert!(b.contains(&format!("\"seq\":{n}")), "{b}");
            n += 10;
        } else {
            let (status, b) = http_post(
                ingest,
                path,
                Some("application/json"),
                format!("{{\"n\":{n}}}").as_bytes(),
            )
            .await;
            assert_eq!(status, 200, "{b}");
            assert!(b.contains(&format!("\"seq\":{n}")), "{b}");
            n += 1;
        }
    }
}

/// Every record the hub's sink holds for edge-b/readings, read with the cursor
/// API in pages of 100: (seq, n from the body).
async fn sink_records(reader: &Reader) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let (status, body) = reader
            .get(
                "GET",
                &format!("/v1/channels/edge-b/readings/records?after={after}&limit=100"),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let records = v["records"].as_array().expect("records");
        if records.is_empty() {
            return out;
        }
        for r in records {
            let seq = r["seq"].as_u64().expect("seq");
            let body: serde_json::Value =
                serde_json::from_str(r["body"].as_str().expect("body")).expect("body json");
            out.push((seq, body["n"].as_u64().expect("n")));
        }
        after = v["next"].as_u64().expect("next");
    }
}

/// Waits until the sink's high-water mark for edge-b/readings reaches `n`.
async fn wait_sink_high(reader: &Reader, n: u64, limit: Duration) {
    poll(&format!("{n} records in the sink"), limit, || async {
        let high = sink_high(reader, "readings").await;
        if high >= n {
            Ok(())
        } else {
            Err(format!("high {high}"))
        }
    })
    .await;
}

/// The sink's high-water mark for edge-b's `channel` (0 before any record).
async fn sink_high(reader: &Reader, channel: &str) -> u64 {
    let (_, body) = reader.get("GET", "/v1/channels").await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["channels"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["channel"] == channel))
        .and_then(|c| c["high"].as_u64())
        .unwrap_or(0)
}

fn exactly(from: u64, to: u64) -> Vec<(u64, u64)> {
    (from..=to).map(|n| (n, n)).collect()
}

/// The edge's receipts for every record of `readings`, read in pages of 128
/// after checking that they come in sequence order: count by status.
async fn receipt_counts(ingest: SocketAddr) -> std::collections::BTreeMap<String, u64> {
    let mut counts = std::collections::BTreeMap::new();
    let mut after = 0;
    loop {
        let (status, body) = http_get(
            ingest,
            "GET",
            &format!("/v1/channels/readings/receipts?after={after}&limit=128"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let list = v["receipts"].as_array().expect("receipts");
        if list.is_empty() {
            return counts;
        }
        for r in list {
            let seq = r["seq"].as_u64().expect("seq");
            assert_eq!(seq, after + 1, "{body}");
            after = seq;
            *counts
                .entry(r["status"].as_str().expect("status").to_owned())
                .or_default() += 1;
        }
        assert_eq!(v["next"], after);
    }
}

/// `gatewayd channels --state-dir DIR --format json`, run as a user would.
fn channels_cli(dir: &std::path::Path) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatewayd"))
        .args(["channels", "--format", "json", "--state-dir"])
        .arg(dir)
        .output()
        .expect("run gatewayd channels");
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("json")
}

/// The edge's buffer, opened beside the running daemon (WAL readers do not block).
fn edge_backlog(edge: &EdgeNode) -> u64 {
    let b = gateway_store::buffer::Buffer::open(edge.state.path()).expect("open buffer");
    b.backlog("readings").expect("backlog").records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_posted_while_the_hub_is_down_arrive_once_in_order() {
    let pki = Pki::new();
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &[])).await;
    let (quic, api, state) = (hub.quic, hub.api, hub.state.clone());
    let reader = Reader::new(&pki, &hub, "reader", &["edge-b/readings"]);
    let edge = start_edge(&pki, edge_spec(vec![quic])).await;
    let ingest = edge.ingest.expect("ingest");
    wait_for("the tunnel", Duration::from_secs(10), || {
        edge.running.ready()
    })
    .await;
    post_range(ingest, 1, 40).await;
    wait_sink_high(&reader, 40, Duration::from_secs(10)).await;

    // The hub goes away; producers keep writing into the edge's buffer.
    hub.running.drain(Duration::from_millis(100)).await;
    drop(hub.running);
    wait_for("the edge to notice", Duration::from_secs(15), || {
        !edge.running.ready()
    })
    .await;
    post_range(ingest, 41, 300).await;
    assert_eq!(edge_backlog(&edge), 260);
    assert_eq!(
        receipt_counts(ingest).await,
        [("accepted", 260), ("delivered", 40)]
            .map(|(s, n)| (s.to_owned(), n))
            .into(),
    );
    let table = channels_cli(edge.state.path());
    assert_eq!(table["channels"][0]["backlog_records"], 260, "{table}");
    assert_eq!(table["channels"][0]["committed"], 300, "{table}");

    // Back on the same address and sink: the backlog drains, once, in order.
    let restart = |state: Arc<tempfile::TempDir>| HubSpec {
        quic: Some(quic),
        api: Some(api),
        state: Some(state),
        ..HubSpec::new("hub-01", 2, &[])
    };
    let hub = start_hub(&pki, restart(state.clone())).await;
    wait_sink_high(&reader, 300, Duration::from_secs(15)).await;
    assert_eq!(sink_records(&reader).await, exactly(1, 300));
    wait_for(
        "the edge to delete what was acknowledged",
        Duration::from_secs(10),
        || edge_backlog(&edge) == 0,
    )
    .await;
    // `gatewayd channels` reads a hub's SQLite sink (not PostgreSQL's).
    if !pg_mode() {
        let table = channels_cli(state.path());
        assert_eq!(table["channels"][0]["high"], 300, "{table}");
    }
    assert_eq!(
        receipt_counts(ingest).await,
        [("delivered".to_owned(), 300)].into()
    );
    // The edge's housekeeping refreshes the backlog gauges every second.
    let admin = edge.running.admin_addr;
    let want = [
        "gateway_channel_backlog_records{channel=\"readings\"} 0",
        "gateway_channel_committed_total{channel=\"readings\"} 300",
        "gateway_channel_last_acked_seq{channel=\"readings\"} 300",
        "gateway_channel_acked_records_total{channel=\"readings\"} 300",
        "gateway_channel_dropped_total{channel=\"readings\",reason=\"ttl\"} 0",
    ];
    poll("the channel metrics", Duration::from_secs(4), || async {
        let metrics = http_get(admin, "GET", "/metrics").await.1;
        match want.iter().find(|l| !metrics.contains(*l)) {
            None => Ok(()),
            Some(line) => Err(format!("{line} missing from\n{metrics}")),
        }
    })
    .await;

    // A consumer takes 1..=200; the sink keeps the rest and remembers the rest.
    let (status, body) = reader
        .get("POST", "/v1/channels/edge-b/readings/ack?cursor=200")
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"removed\":200"), "{body}");
    assert_eq!(sink_records(&reader).await, exactly(201, 300));

    // Another restart while records flow: nothing lost, nothing twice.
    let producer = tokio::spawn(post_range(ingest, 301, 500));
    hub.running.drain(Duration::from_millis(100)).await;
    drop(hub.running);
    let hub = start_hub(&pki, restart(state.clone())).await;
    producer.await.expect("producer");
    wait_sink_high(&reader, 500, Duration::from_secs(15)).await;
    assert_eq!(sink_records(&reader).await, exactly(201, 500));
    drop(hub);
}

/// A userspace UDP relay between edge and hub: forwards both ways, dropping
/// everything (mode 100) or one datagram in `mode` percent.
struct LossyLink {
    addr: SocketAddr,
    drop_percent: Arc<AtomicU8>,
    dropped: Arc<AtomicU64>,
    /// Edge to hub, bytes per second (0: as fast as it comes).
    rate: Arc<AtomicU64>,
}

async fn lossy_link(hub: SocketAddr) -> LossyLink {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let addr = front.local_addr().expect("addr");
    let drop_percent = Arc::new(AtomicU8::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let rate = Arc::new(AtomicU64::new(0));
    let (pct, cnt, bps) = (drop_percent.clone(), dropped.clone(), rate.clone());
    tokio::spawn(async move {
        // One upstream socket per edge socket (the edge has a socket per lane).
        let mut upstream: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = vec![0u8; 65_536];
        let lose = move |seed: &mut u64, pct: &AtomicU8| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed % 100) < u64::from(pct.load(Ordering::SeqCst))
        };
        // A queue drained at the link's rate: each datagram leaves when the
        // previous ones have.
        let mut free_at = tokio::time::Instant::now();
        while let Ok((n, from)) = front.recv_from(&mut buf).await {
            if let Some(ns) = (n as u64 * 1_000_000_000).checked_div(bps.load(Ordering::SeqCst)) {
                free_at = free_at.max(tokio::time::Instant::now()) + Duration::from_nanos(ns);
                tokio::time::sleep_until(free_at).await;
            }
            let up = match upstream.get(&from) {
                Some(u) => u.clone(),
                None => {
                    let u = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
                    u.connect(hub).await.expect("connect");
                    let (u2, front2, pct2, cnt2) =
                        (u.clone(), front.clone(), pct.clone(), cnt.clone());
                    tokio::spawn(async move {
                        let mut seed = 0x2545_f491_4f6c_dd1du64;
                        let mut b = vec![0u8; 65_536];
                        while let Ok(n) = u2.recv(&mut b).await {
                            if lose(&mut seed, &pct2) {
                                cnt2.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            let _ = front2.send_to(&b[..n], from).await;
                        }
                    });
                    upstream.insert(from, u.clone());
                    u
                }
            };
            if lose(&mut seed, &pct) {
                cnt.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let _ = up.send(&buf[..n]).await;
        }
    });
    LossyLink {
        addr,
        drop_percent,
        dropped,
        rate,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_and_then_ten_percent_loss_lose_and_duplicate_nothing() {
    let pki = Pki::new();
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &[])).await;
    let reader = Reader::new(&pki, &hub, "reader", &["edge-b/readings"]);
    let link = lossy_link(hub.quic).await;
    let edge = start_edge(&pki, edge_spec(vec![link.addr])).await;
    let ingest = edge.ingest.expect("ingest");
    wait_for("the tunnel", Duration::from_secs(10), || {
        edge.running.ready()
    })
    .await;
    let producer = tokio::spawn(post_range(ingest, 1, 300));

    // Outage: everything dropped until the edge declares the tunnel dead.
    link.drop_percent.store(100, Ordering::SeqCst);
    wait_for(
        "the edge to declare the tunnel dead",
        Duration::from_secs(20),
        || !edge.running.ready(),
    )
    .await;
    producer.await.expect("producer");
    // Then a bad link: one datagram in ten lost, each way.
    link.drop_percent.store(10, Ordering::SeqCst);
    post_range(ingest, 301, 600).await;
    wait_sink_high(&reader, 600, Duration::from_secs(60)).await;
    assert_eq!(sink_records(&reader).await, exactly(1, 600));
    assert!(link.dropped.load(Ordering::Relaxed) > 0);
    println!(
        "{} datagrams dropped by the relay",
        link.dropped.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_files_are_committed_once_and_moved_or_refused_with_a_reason() {
    let pki = Pki::new();
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &[])).await;
    let reader = Reader::new(&pki, &hub, "reader", &["edge-b/readings"]);
    let edge = start_edge(&pki, edge_spec(vec![hub.quic])).await;
    let spool = edge.state.path().join("spool/readings");
    let (inbox, done, failed) = (spool.join("in"), spool.join("done"), spool.join("failed"));
    wait_for("the spool directories", Duration::from_secs(5), || {
        inbox.is_dir()
    })
    .await;
    // Written beside in/, then renamed in: only complete files are ever seen.
    let put = |name: &str, body: &str| {
        let tmp = spool.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, body).expect("write");
        std::fs::rename(&tmp, inbox.join(name)).expect("rename in");
    };
    std::fs::write(inbox.join(".still-writing.json"), "{\"n\":").expect("write partial");
    put("a.json", "{\"n\":1}");
    put("b.ndjson", "{\"n\":2}\n{\"n\":3}\n\n{\"n\":4}\n");
    put("c.json", "{\"n\":");
    put("d.dat", "\u{1}\u{2}");
    wait_for("the good files in done/", Duration::from_secs(10), || {
        done.join("a.json").exists() && done.join("b.ndjson").exists()
    })
    .await;
    wait_for("the bad files in failed/", Duration::from_secs(10), || {
        failed.join("c.json.reason").exists() && failed.join("d.dat.reason").exists()
    })
    .await;
    let why = std::fs::read_to_string(failed.join("c.json.reason")).expect("reason");
    assert!(
        why.contains("R5.channel-content") && why.contains("not valid JSON"),
        "{why}"
    );
    let why = std::fs::read_to_string(failed.join("d.dat.reason")).expect("reason");
    assert!(why.contains("unknown format"), "{why}");
    assert!(
        inbox.join(".still-writing.json").exists(),
        "a hidden file is left alone"
    );
    wait_sink_high(&reader, 4, Duration::from_secs(10)).await;
    assert_eq!(sink_records(&reader).await, exactly(1, 4));

    // The crash window: a committed file found in in/ again (same name, size
    // and time, as after a crash before the move) is moved on, not committed.
    std::fs::rename(done.join("a.json"), inbox.join("a.json")).expect("back to in/");
    wait_for(
        "the recommitted-looking file to move on",
        Duration::from_secs(10),
        || !inbox.join("a.json").exists(),
    )
    .await;
    put("e.json", "{\"n\":5}");
    wait_sink_high(&reader, 5, Duration::from_secs(10)).await;
    assert_eq!(sink_records(&reader).await, exactly(1, 5));
    let lines = audit_lines(edge.state.path());
    assert!(
        lines.iter().any(|l| l.starts_with("channel.refuse")
            && l.contains("spool:")
            && l.contains("[R5.channel-content]")),
        "{lines:#?}"
    );

    // Identities live as long as their files: after a restart (its first scan
    // forgets), a file still in done/ and put back is not committed twice, one
    // removed from done/ and dropped again (same name, size and time) is new.
    let a_time = std::fs::metadata(done.join("a.json"))
        .and_then(|m| m.modified())
        .expect("mtime");
    std::fs::remove_file(done.join("a.json")).expect("remove a");
    edge.running.drain(Duration::from_millis(100)).await;
    let state = edge.state.clone();
    drop(edge);
    let _edge = start_edge(
        &pki,
        EdgeSpec {
            state: Some(state),
            ..edge_spec(vec![hub.quic])
        },
    )
    .await;
    // A new file moved on proves the first scan (which forgets first) ran.
    put("f.json", "{\"n\":6}");
    wait_sink_high(&reader, 6, Duration::from_secs(10)).await;
    std::fs::rename(done.join("b.ndjson"), inbox.join("b.ndjson")).expect("b back");
    let tmp = spool.join(".a.json.tmp");
    std::fs::write(&tmp, "{\"n\":1}").expect("write");
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .and_then(|f| f.set_modified(a_time))
        .expect("mtime");
    std::fs::rename(&tmp, inbox.join("a.json")).expect("a again");
    wait_sink_high(&reader, 7, Duration::from_secs(10)).await;
    wait_for("b.ndjson moved on again", Duration::from_secs(10), || {
        done.join("b.ndjson").exists() && !inbox.join("b.ndjson").exists()
    })
    .await;
    // b's records once (2-4), a's record again as a new one (7, body n=1).
    let mut want = exactly(1, 6);
    want.push((7, 1));
    assert_eq!(sink_records(&reader).await, want);
}

/// Files in a directory, sorted by name.
fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Receipts of `readings`-like channel `name` on an edge: statuses in order.
async fn receipt_statuses(ingest: SocketAddr, name: &str) -> Vec<String> {
    let (status, body) = http_get(
        ingest,
        "GET",
        &format!("/v1/channels/{name}/receipts?limit=10000"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["receipts"]
        .as_array()
        .expect("receipts")
        .iter()
        .map(|r| r["status"].as_str().expect("status").to_owned())
        .collect()
}

/// Polls the receipts of channel `name` until `done` holds (or 10 s pass).
async fn wait_receipts(
    ingest: SocketAddr,
    name: &str,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    poll("the receipts", Duration::from_secs(10), || async {
        let statuses = receipt_statuses(ingest, name).await;
        if done(&statuses) {
            Ok(statuses)
        } else {
            Err(format!("{statuses:?}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_delivers_to_another_departments_spool_once_with_receipts_back() {
    let pki = Pki::new();
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &[])).await;
    let source = "\n[[channel]]\nname = \"reports\"\nzone = \"lab\"\nformats = [\"json\", \"xml\"]\nmax_record_bytes = \"4KiB\"\ndeliver_to = \"edge-c/inbox\"\n";
    let dest = "\n[[channel]]\nname = \"inbox\"\nzone = \"lab\"\nformats = [\"json\"]\nmax_record_bytes = \"4KiB\"\n";
    let c_spec = |state| EdgeSpec {
        extra: dest,
        state,
        ..EdgeSpec::new("edge-c", 3, 2, vec![hub.quic])
    };
    let edge_c = start_edge(&pki, c_spec(None)).await;
    let c_state = edge_c.state.clone();
    let edge_a = start_edge(
        &pki,
        EdgeSpec {
            extra: source,
            ingest: true,
            ..EdgeSpec::new("edge-a", 2, 2, vec![hub.quic])
        },
    )
    .await;
    let ingest = edge_a.ingest.expect("ingest");
    let post = |n: u64, ct: &'static str, body: String| async move {
        let (s, b) = http_post(
            ingest,
            "/v1/channels/reports/records",
            Some(ct),
            body.as_bytes(),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        assert!(b.contains(&format!("\"seq\":{n}")), "{b}");
    };
    for n in 1..=40 {
        post(n, "application/json", format!("{{\"n\":{n}}}")).await;
    }
    // edge-c takes json only: an xml record is refused at its boundary.
    post(41, "application/xml", "<n>41</n>".into()).await;
    let out = c_state.path().join("spool/inbox/out");
    let failed = c_state.path().join("spool/inbox/failed");
    wait_for("40 files in edge-c's out/", Duration::from_secs(15), || {
        files_in(&out).len() == 40
    })
    .await;
    let names = files_in(&out);
    assert_eq!(names[0], "edge-a.reports.00000000000000000001.json");
    assert_eq!(names[39], "edge-a.reports.00000000000000000040.json");
    for (i, name) in names.iter().enumerate() {
        let body = std::fs::read_to_string(out.join(name)).expect("read");
        assert_eq!(body, format!("{{\"n\":{}}}", i + 1));
    }
    wait_for(
        "the refused record in failed/",
        Duration::from_secs(10),
        || {
            failed
                .join("edge-a.reports.00000000000000000041.xml.reason")
                .exists()
        },
    )
    .await;
    let why =
        std::fs::read_to_string(failed.join("edge-a.reports.00000000000000000041.xml.reason"))
            .expect("reason");
    assert!(why.contains("R5.channel-content"), "{why}");
    // Receipts: 40 delivered, and the refused one failed, with edge-c's reason.
    let want = |n: usize| -> Vec<String> {
        (1..=n)
            .map(|i| if i == 41 { "failed" } else { "delivered" }.to_owned())
            .collect()
    };
    let statuses = wait_receipts(ingest, "reports", |s| s == want(41).as_slice()).await;
    assert_eq!(statuses, want(41));
    let (_, b) = http_get(
        ingest,
        "GET",
        "/v1/channels/reports/receipts?after=40&limit=1",
    )
    .await;
    assert!(b.contains("R5.channel-content"), "{b}");

    // The destination goes offline: records wait in the hub's sink, and the
    // source's receipts say so; back online, each arrives once.
    edge_c.running.drain(Duration::from_millis(100)).await;
    drop(edge_c);
    for n in 42..=60 {
        post(n, "application/json", format!("{{\"n\":{n}}}")).await;
    }
    let statuses = wait_receipts(ingest, "reports", |s| {
        s[41..].iter().all(|s| s == "delivered_to_hub")
    })
    .await;
    assert!(
        statuses[41..].iter().all(|s| s == "delivered_to_hub"),
        "{statuses:?}"
    );
    let edge_c = start_edge(&pki, c_spec(Some(c_state.clone()))).await;
    wait_for("59 files in edge-c's out/", Duration::from_secs(15), || {
        files_in(&out).len() == 59
    })
    .await;
    let names = files_in(&out);
    assert_eq!(names[58], "edge-a.reports.00000000000000000060.json");
    let statuses = wait_receipts(ingest, "reports", |s| s == want(60).as_slice()).await;
    assert_eq!(statuses, want(60));
    assert!(files_in(&c_state.path().join("spool/inbox/.staging")).is_empty());
    drop(edge_c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_hubs_sharing_a_sink_a_channel_syncs_through_whichever_is_up() {
    let pki = Pki::new();
    let shared = tempfile::tempdir().expect("shared sink dir");
    let sink = shared.path().join("sink.sqlite");
    let spec = |id| HubSpec {
        sink: Some(sink.clone()),
        ..HubSpec::new(id, 2, &[])
    };
    let hub_a = start_hub(&pki, spec("hub-01")).await;
    let hub_b = start_hub(&pki, spec("hub-02")).await;
    let grant = |hub: &HubNode, name| {
        Reader::for_hub(
            &pki,
            hub.state.path(),
            Some(&sink),
            hub.api,
            name,
            &["edge-b/readings"],
        )
    };
    let (reader_a, reader_b) = (grant(&hub_a, "reader-a"), grant(&hub_b, "reader-b"));
    let edge = start_edge(&pki, edge_spec(vec![hub_a.quic, hub_b.quic])).await;
    let ingest = edge.ingest.expect("ingest");
    wait_for("the tunnels", Duration::from_secs(10), || {
        edge.running.ready()
    })
    .await;
    post_range(ingest, 1, 100).await;
    wait_sink_high(&reader_a, 100, Duration::from_secs(10)).await;
    // The first hub goes away while producers write: the channel continues
    // through the second, and what the first had committed is not stored again.
    let producer = tokio::spawn(post_range(ingest, 101, 400));
    hub_a.running.drain(Duration::from_millis(100)).await;
    drop(hub_a);
    producer.await.expect("producer");
    wait_sink_high(&reader_b, 400, Duration::from_secs(15)).await;
    assert_eq!(sink_records(&reader_b).await, exactly(1, 400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_less_urgent_channel_is_not_starved_by_a_more_urgent_backlog() {
    let pki = Pki::new();
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &[])).await;
    let reader = Reader::new(&pki, &hub, "reader", &["edge-b/bulk", "edge-b/urgent"]);
    let link = lossy_link(hub.quic).await;
    let channels = "\n[[channel]]\nname = \"urgent\"\nzone = \"lab\"\npriority = 0\nformats = [\"json\"]\nmax_record_bytes = \"8KiB\"\n\n[[channel]]\nname = \"bulk\"\nzone = \"lab\"\npriority = 9\nformats = [\"json\"]\nmax_record_bytes = \"8KiB\"\n";
    let edge = start_edge(
        &pki,
        EdgeSpec {
            extra: channels,
            ingest: true,
            ..EdgeSpec::new("edge-b", 2, 2, vec![link.addr])
        },
    )
    .await;
    let ingest = edge.ingest.expect("ingest");
    wait_for("the tunnel", Duration::from_secs(10), || {
        edge.running.ready()
    })
    .await;
    // A 2 MB/s link and a 24 MB backlog of urgent records: 12 s of sending.
    link.rate.store(2_000_000, Ordering::SeqCst);
    let pad = "x".repeat(4000);
    for b in 0..60u64 {
        let body: String = (0..100)
            .map(|i| format!("{{\"n\":{},\"pad\":\"{pad}\"}}\n", b * 100 + i))
            .collect();
        let (s, r) = http_post(
            ingest,
            "/v1/channels/urgent/records",
            Some("application/x-ndjson"),
            body.as_bytes(),
        )
        .await;
        assert_eq!(s, 200, "{r}");
    }
    let (s, r) = http_post(
        ingest,
        "/v1/channels/bulk/records",
        Some("application/json"),
        b"{\"n\":1}",
    )
    .await;
    assert_eq!(s, 200, "{r}");
    // The bulk record reaches the sink while the urgent backlog is still
    // draining: its batch was lifted after STARVE_AFTER, not queued behind
    // all 6,000 urgent records.
    poll(
        "the bulk record at the hub",
        Duration::from_secs(60),
        || async {
            if sink_high(&reader, "bulk").await >= 1 {
                Ok(())
            } else {
                Err("not yet".into())
            }
        },
    )
    .await;
    let urgent = sink_high(&reader, "urgent").await;
    println!("bulk arrived with {urgent} of 6000 urgent records synced");
    assert!(urgent > 0, "urgent records go first");
    assert!(
        urgent < 6000,
        "the bulk record waited for the whole urgent backlog"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_is_quarantined_audited_and_skipped_not_a_crash_loop() {
    let pki = Pki::new();
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &[])).await;
    let (quic, api) = (hub.quic, hub.api);
    hub.running.drain(Duration::from_millis(100)).await;
    drop(hub);
    let edge = start_edge(&pki, edge_spec(vec![quic])).await;
    let ingest = edge.ingest.expect("ingest");
    post_range(ingest, 1, 20).await;
    // A bad disk flips record 7 behind the daemon's back.
    let raw = rusqlite::Connection::open(edge.state.path().join(gateway_store::buffer::FILE_NAME))
        .expect("raw");
    raw.busy_timeout(Duration::from_secs(5)).expect("busy");
    raw.execute(
        "UPDATE record SET body = CAST('{\"n\":70}' AS BLOB) WHERE channel = 'readings' AND seq = 7",
        [],
    )
    .expect("corrupt");
    drop(raw);
    let hub = start_hub(
        &pki,
        HubSpec {
            quic: Some(quic),
            api: Some(api),
            ..HubSpec::new("hub-01", 2, &[])
        },
    )
    .await;
    let reader = Reader::new(&pki, &hub, "reader", &["edge-b/readings"]);
    wait_sink_high(&reader, 20, Duration::from_secs(15)).await;
    let want: Vec<(u64, u64)> = (1..=20).filter(|n| *n != 7).map(|n| (n, n)).collect();
    assert_eq!(sink_records(&reader).await, want);
    let (_, b) = http_get(
        ingest,
        "GET",
        "/v1/channels/readings/receipts?after=6&limit=1",
    )
    .await;
    assert!(b.contains("\"failed\"") && b.contains("corrupt"), "{b}");
    let state = edge.state.path().to_owned();
    wait_for(
        "the quarantine in the audit",
        Duration::from_secs(10),
        || {
            audit_lines(&state)
                .iter()
                .any(|l| l.starts_with("channel.corrupt"))
        },
    )
    .await;
    drop(hub);
}

/// The spool reads only what producers put there: symlinks swapped in while
/// the edge scans (2,000 swaps), FIFOs, hard links, huge files and names with
/// control characters go to failed/ with a reason, audited, and nothing from
/// outside the spool reaches the sink; a FIFO stalls nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_takes_only_regular_files_of_its_own() {
    let pki = Pki::new();
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &[])).await;
    let reader = Reader::new(&pki, &hub, "reader", &["edge-b/readings"]);
    let edge = start_edge(&pki, edge_spec(vec![hub.quic])).await;
    let spool = edge.state.path().join("spool/readings");
    let (inbox, failed) = (spool.join("in"), spool.join("failed"));
    wait_for("the spool directories", Duration::from_secs(5), || {
        inbox.is_dir()
    })
    .await;
    let victim = tempfile::tempdir().expect("victim");
    let secret = victim.path().join("secret.json");
    std::fs::write(&secret, "{\"n\":999999}").expect("secret");
    let fifo = inbox.join("pipe.json");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("fifo");
    std::fs::hard_link(&secret, inbox.join("hard.json")).expect("hard link");
    let huge = std::fs::File::create(inbox.join("huge.json")).expect("huge");
    huge.set_len(200 << 20).expect("200 MB, sparse");
    std::fs::write(inbox.join("bad\nname.json"), "{\"n\":1}").expect("control name");
    // A producer whose files are swapped for a link to the secret as the edge
    // scans: a regular file renamed in, then a symlink renamed over it.
    let swaps = {
        let (inbox, spool, secret) = (inbox.clone(), spool.clone(), secret.clone());
        tokio::task::spawn_blocking(move || {
            for n in 0..2000u64 {
                let (tmp, link) = (spool.join(".tmp"), spool.join(".link"));
                std::fs::write(&tmp, format!("{{\"n\":{n}}}")).expect("write");
                let name = inbox.join(format!("r-{n:05}.json"));
                std::fs::rename(&tmp, &name).expect("rename in");
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(&secret, &link).expect("symlink");
                // Gone already (taken) or still there: either way, swap.
                let _ = std::fs::rename(&link, &name);
            }
        })
    };
    swaps.await.expect("swaps");
    wait_for("in/ to empty", Duration::from_secs(60), || {
        std::fs::read_dir(&inbox).map(|d| d.count()).unwrap_or(1) == 0
    })
    .await;
    // Nothing from outside the spool reached the sink.
    let (_, body) = reader.get("GET", "/v1/channels").await;
    let high =
        serde_json::from_str::<serde_json::Value>(&body).expect("json")["channels"][0]["high"]
            .as_u64()
            .unwrap_or(0);
    let records = sink_records(&reader).await;
    assert_eq!(
        records.len() as u64,
        high,
        "every committed record is in the sink"
    );
    assert!(
        records.iter().all(|(_, n)| *n != 999_999),
        "the secret outside the spool was delivered"
    );
    assert_eq!(
        std::fs::read_to_string(&secret).expect("secret"),
        "{\"n\":999999}"
    );
    for (name, why) in [
        ("pipe.json", "FIFO"),
        ("hard.json", "hard links"),
        ("huge.json", "larger than"),
        ("bad\nname.json", "control characters"),
    ] {
        let reason = std::fs::read_to_string(failed.join(format!("{name}.reason")))
            .unwrap_or_else(|e| panic!("{name}.reason: {e}"));
        assert!(reason.contains(why), "{name}: {reason}");
    }
    let swapped = std::fs::read_dir(&failed)
        .expect("failed/")
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("r-") && !n.ends_with(".reason")
        })
        .count();
    // The audit writer commits in batches: wait for the refusals to land.
    let refusals = || {
        audit_lines(edge.state.path())
            .iter()
            .filter(|l| l.starts_with("channel.refuse spool:"))
            .count()
    };
    wait_for("every refusal audited", Duration::from_secs(10), || {
        refusals() >= 4 + swapped
    })
    .await;
    let audit = audit_lines(edge.state.path());

    assert!(
        audit.iter().any(|l| l.contains("bad\\nname.json")),
        "the control character is escaped in the audit"
    );
    println!("{swapped} of 2000 swaps were caught as symlinks; {high} records committed");
}

/// A spool directory replaced by a symlink is refused for that channel (with
/// an audit record); the files it points to stay where they are, and the
/// node runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_directory_that_is_a_symlink_is_refused() {
    let pki = Pki::new();
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &[])).await;
    let state = Arc::new(tempfile::tempdir().expect("state"));
    let victim = tempfile::tempdir().expect("victim");
    std::fs::write(victim.path().join("config.json"), "{\"n\":1}").expect("victim file");
    std::fs::create_dir_all(state.path().join("spool/readings")).expect("spool");
    std::os::unix::fs::symlink(victim.path(), state.path().join("spool/readings/in"))
        .expect("symlink in/");
    let edge = start_edge(
        &pki,
        EdgeSpec {
            state: Some(state.clone()),
            ..edge_spec(vec![hub.quic])
        },
    )
    .await;
    wait_for("the refusal in the audit", Duration::from_secs(10), || {
        audit_lines(edge.state.path()).iter().any(|l| {
            l.starts_with("channel.spool edge-b readings deny") && l.contains("symbolic link")
        })
    })
    .await;
    assert!(
        victim.path().join("config.json").exists(),
        "a file outside the spool was taken"
    );
    // Ingest still works.
    let (s, b) = http_post(
        edge.ingest.expect("ingest"),
        "/v1/channels/readings/records",
        Some("application/json"),
        b"{\"n\":1}",
    )
    .await;
    assert_eq!(s, 200, "{b}");
}
