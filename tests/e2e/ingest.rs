//! Ingest end to end: producers POST records to an edge's `[[ingest]]`
//! listener; each is checked at the boundary and answered with its sequence
//! number only once it is committed to the buffer on disk.

mod net;

use gateway_store::buffer::Buffer;
use net::*;

const CHANNEL: &str = r#"
[[channel]]
name = "readings"
zone = "lab"
formats = ["json"]
max_record_bytes = "1KiB"
max_bytes = "8KiB"
when_full = "reject"
"#;

async fn edge_with_ingest(pki: &Pki) -> EdgeNode {
    edge_with_channels(pki, CHANNEL).await
}

/// An edge with an `[[ingest]]` listener and the `[[channel]]` TOML `channels`,
/// and no hub: ingest works while the uplink is down.
async fn edge_with_channels(pki: &Pki, channels: &'static str) -> EdgeNode {
    let hub: std::net::SocketAddr = "127.0.0.1:9".parse().expect("addr");
    start_edge(
        pki,
        EdgeSpec {
            // These tests send refused requests by the dozen from loopback.
            extra: Box::leak(format!("{channels}{LOOPBACK_NEVER_BANNED}").into_boxed_str()),
            ingest: true,
            ..EdgeSpec::new("edge-b", 2, 2, vec![hub])
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_checked_committed_and_numbered() {
    let pki = Pki::new();
    let edge = edge_with_ingest(&pki).await;
    let at = edge.ingest.expect("ingest listener");
    let path = "/v1/channels/readings/records";

    let (s, b) = http_post(
        at,
        path,
        Some("application/json"),
        br#"{"meter": 1, "kwh": 3.5}"#,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert!(b.contains(r#""seq":1"#), "{b}");
    let (s, b) = http_post(
        at,
        path,
        Some("application/json; charset=utf-8"),
        br#"{"meter": 2}"#,
    )
    .await;
    assert_eq!((s, b.contains(r#""seq":2"#)), (200, true), "{b}");

    let (s, b) = http_post(at, path, Some("application/json"), b"{not json").await;
    assert_eq!(s, 422, "{b}");
    assert!(
        b.contains("R5.channel-content") && b.contains("not valid JSON"),
        "{b}"
    );
    let (s, b) = http_post(at, path, Some("application/xml"), b"<a/>").await;
    assert_eq!(s, 403, "{b}");
    assert!(
        b.contains("R5.channel-content") && b.contains("does not accept xml"),
        "{b}"
    );
    let big = format!(r#"{{"pad": "{}"}}"#, "x".repeat(2000));
    let (s, b) = http_post(at, path, Some("application/json"), big.as_bytes()).await;
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("max_record_bytes"), "{b}");
    let (s, _) = http_post(
        at,
        "/v1/channels/nope/records",
        Some("application/json"),
        b"{}",
    )
    .await;
    assert_eq!(s, 404);
    let (s, b) = http_post(at, path, None, b"{}").await;
    assert_eq!(s, 415, "{b}");

    // Fill the 8 KiB quota: 1 KiB-ish records until the channel refuses.
    let rec = format!(r#"{{"pad": "{}"}}"#, "y".repeat(900));
    let mut accepted = 2;
    let status = loop {
        let (s, b) = http_post(at, path, Some("application/json"), rec.as_bytes()).await;
        if s != 200 {
            assert!(b.contains("is full"), "{b}");
            break s;
        }
        accepted += 1;
        assert!(accepted < 20, "the quota never held");
    };
    assert_eq!(status, 507);

    // What was answered with a sequence number is on disk, in order.
    let mut buf = Buffer::open(edge.state.path()).expect("open buffer");
    let all = buf.read("readings", 0, 1000).expect("read");
    assert_eq!(
        all.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=accepted).collect::<Vec<u64>>()
    );
    assert_eq!(all[0].body, br#"{"meter": 1, "kwh": 3.5}"#);
    assert!(buf.backlog("readings").expect("backlog").bytes <= 8 * 1024);

    wait_for(
        "the refusals in the audit",
        std::time::Duration::from_secs(5),
        || {
            let lines = audit_lines(edge.state.path());
            lines
                .iter()
                .filter(|l| l.starts_with("channel.refuse") && l.contains("[R5.channel-content]"))
                .count()
                == 3
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_get_unique_contiguous_sequence_numbers() {
    let pki = Pki::new();
    let edge = edge_with_channels(&pki, "\n[[channel]]\nname = \"readings\"\nzone = \"lab\"\nformats = [\"json\"]\nmax_record_bytes = \"1KiB\"\n").await;
    let at = edge.ingest.expect("ingest");
    let mut tasks = Vec::new();
    for p in 0..16 {
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..25 {
                let body = format!(r#"{{"producer": {p}, "n": {i}}}"#);
                let (s, b) = http_post(
                    at,
                    "/v1/channels/readings/records",
                    Some("application/json"),
                    body.as_bytes(),
                )
                .await;
                assert_eq!(s, 200, "{b}");
                let v: serde_json::Value = serde_json::from_str(&b).expect("json");
                seqs.push(v["seq"].as_u64().expect("seq"));
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let seqs = t.await.expect("producer");
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one producer's records stay in order: {seqs:?}"
        );
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=400).collect::<Vec<u64>>());
    let mut buf = Buffer::open(edge.state.path()).expect("open");
    assert_eq!(buf.read("readings", 0, 1000).expect("read").len(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_committed_or_refused_as_a_whole() {
    let pki = Pki::new();
    let edge = edge_with_ingest(&pki).await;
    let at = edge.ingest.expect("ingest");
    let path = "/v1/channels/readings/records";
    let (s, b) = http_post(
        at,
        path,
        Some("application/x-ndjson"),
        b"{\"n\":1}\n{\"n\":2}\n\n{\"n\":3}\n",
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert!(b.contains(r#""seq":1"#) && b.contains(r#""last":3"#), "{b}");
    let (s, b) = http_post(
        at,
        path,
        Some("application/x-ndjson"),
        b"{\"n\":4}\n{broken\n{\"n\":6}\n",
    )
    .await;
    assert_eq!(s, 422, "{b}");
    assert!(b.contains("record 2 of the batch"), "{b}");
    let mut buf = Buffer::open(edge.state.path()).expect("open");
    let all = buf.read("readings", 0, 100).expect("read");
    assert_eq!(
        all.iter().map(|r| r.body.clone()).collect::<Vec<_>>(),
        vec![
            b"{\"n\":1}".to_vec(),
            b"{\"n\":2}".to_vec(),
            b"{\"n\":3}".to_vec()
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_past_their_ttl_expire_with_a_receipt_and_an_audit_record() {
    let pki = Pki::new();
    let edge = edge_with_channels(&pki, "\n[[channel]]\nname = \"readings\"\nzone = \"lab\"\nformats = [\"json\"]\nmax_record_bytes = \"1KiB\"\nttl = \"1s\"\n").await;
    let at = edge.ingest.expect("ingest");
    for n in 0..5 {
        let (s, b) = http_post(
            at,
            "/v1/channels/readings/records",
            Some("application/json"),
            format!("{{\"n\":{n}}}").as_bytes(),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    let receipts = || async {
        let (s, b) = http_get(at, "GET", "/v1/channels/readings/receipts").await;
        assert_eq!(s, 200, "{b}");
        serde_json::from_str::<serde_json::Value>(&b).expect("json")
    };
    assert_eq!(receipts().await["receipts"][4]["status"], "accepted");
    // No hub ever answers: after the 1 s TTL the housekeeping (every second)
    // removes them, and says so.
    let state = edge.state.path().to_owned();
    wait_for(
        "the expiry audit record",
        std::time::Duration::from_secs(10),
        || {
            // One housekeeping tick may expire some and the next the rest.
            audit_lines(&state)
                .iter()
                .filter(|l| l.starts_with("channel.expire"))
                .filter_map(|l| {
                    l.split(" records older")
                        .next()?
                        .rsplit(' ')
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .sum::<u64>()
                == 5
        },
    )
    .await;
    let v = receipts().await;
    let list = v["receipts"].as_array().expect("receipts");
    assert_eq!(list.len(), 5, "{v}");
    for r in list {
        assert_eq!(r["status"], "expired", "{v}");
        assert_eq!(r["reason"], "ttl", "{v}");
    }
    let (s, b) = http_get(at, "GET", "/v1/channels/nope/receipts").await;
    assert_eq!(s, 404, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_with_a_denied_keyword_are_refused_and_audited() {
    let pki = Pki::new();
    let edge = edge_with_channels(&pki, "\n[[channel]]\nname = \"readings\"\nzone = \"lab\"\nformats = [\"json\"]\nmax_record_bytes = \"1KiB\"\ndeny_keywords = [\"机密\", \"Secret\"]\n").await;
    let at = edge.ingest.expect("ingest");
    let path = "/v1/channels/readings/records";
    let post = |body: &'static str| http_post(at, path, Some("application/json"), body.as_bytes());
    let (s, b) = post(r#"{"note": "top SECRET plan"}"#).await;
    assert_eq!(s, 403, "{b}");
    assert!(
        b.contains("R5.channel-content") && b.contains("denied keyword"),
        "{b}"
    );
    let (s, b) = post(r#"{"note": "内部机密文件"}"#).await;
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("机密"), "{b}");
    let (s, b) = post(r#"{"note": "public"}"#).await;
    assert_eq!(s, 200, "{b}");
    let state = edge.state.path().to_owned();
    wait_for(
        "the refusals in the audit",
        std::time::Duration::from_secs(5),
        || {
            audit_lines(&state)
                .iter()
                .filter(|l| l.starts_with("channel.refuse") && l.contains("denied keyword"))
                .count()
                == 2
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_waits_while_no_hub_is_reachable_when_asked_to() {
    let pki = Pki::new();
    let edge = edge_with_channels(&pki, "\n[[channel]]\nname = \"readings\"\nzone = \"lab\"\nformats = [\"json\"]\nmax_record_bytes = \"1KiB\"\nttl = \"1s\"\nttl_pauses_offline = true\n").await;
    let at = edge.ingest.expect("ingest");
    for n in 0..3 {
        let (s, b) = http_post(
            at,
            "/v1/channels/readings/records",
            Some("application/json"),
            format!("{{\"n\":{n}}}").as_bytes(),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    // Wait until the housekeeping has seen the records at twice their TTL.
    let admin = edge.running.admin_addr;
    poll(
        "records seen at twice their TTL",
        std::time::Duration::from_secs(10),
        || async {
            let (_, m) = http_get(admin, "GET", "/metrics").await;
            let age: f64 = m
                .lines()
                .find_map(|l| {
                    l.strip_prefix(
                        "gateway_channel_oldest_record_age_seconds{channel=\"readings\"} ",
                    )
                })
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            if age >= 2.0 { Ok(()) } else { Err(m) }
        },
    )
    .await;
    let (s, b) = http_get(at, "GET", "/v1/channels/readings/receipts").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b.matches("\"accepted\"").count(),
        3,
        "never online, so never expired: {b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_makes_room_and_says_which_records_went() {
    let pki = Pki::new();
    let edge = edge_with_channels(&pki, "\n[[channel]]\nname = \"readings\"\nzone = \"lab\"\nformats = [\"json\"]\nmax_record_bytes = \"2KiB\"\nmax_bytes = \"4KiB\"\nwhen_full = \"drop_oldest\"\n").await;
    let at = edge.ingest.expect("ingest");
    let pad = "x".repeat(900);
    let mut dropped_any = false;
    for n in 1..=10 {
        let (s, b) = http_post(
            at,
            "/v1/channels/readings/records",
            Some("application/json"),
            format!("{{\"n\":{n},\"pad\":\"{pad}\"}}").as_bytes(),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        dropped_any |= !b.contains("\"dropped\":null");
    }
    assert!(dropped_any, "a 4 KiB quota cannot hold ten 1 KiB records");
    let (s, b) = http_get(at, "GET", "/v1/channels/readings/receipts").await;
    assert_eq!(s, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).expect("json");
    let list = v["receipts"].as_array().expect("receipts");
    assert_eq!(list.len(), 10, "{b}");
    assert_eq!(list[0]["status"], "dropped", "{b}");
    assert_eq!(list[0]["reason"], "quota", "{b}");
    assert_eq!(list[9]["status"], "accepted", "{b}");
    // A refused record counts as dropped for content on /metrics.
    let (s, _) = http_post(
        at,
        "/v1/channels/readings/records",
        Some("application/json"),
        b"{oops",
    )
    .await;
    assert_eq!(s, 422);
    let (_, m) = http_get(edge.running.admin_addr, "GET", "/metrics").await;
    assert!(
        m.contains("gateway_channel_dropped_total{channel=\"readings\",reason=\"content\"} 1"),
        "{m}"
    );
    let state = edge.state.path().to_owned();
    wait_for(
        "the drops in the audit",
        std::time::Duration::from_secs(5),
        || {
            audit_lines(&state)
                .iter()
                .any(|l| l.starts_with("channel.drop") && l.contains("quota"))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_bytes_are_taken_only_where_declared() {
    let pki = Pki::new();
    let edge = edge_with_channels(&pki, "\n[[channel]]\nname = \"images\"\nzone = \"lab\"\nformats = [\"raw\"]\nmax_record_bytes = \"1KiB\"\n\n[[channel]]\nname = \"readings\"\nzone = \"lab\"\nformats = [\"json\"]\nmax_record_bytes = \"1KiB\"\n").await;
    let at = edge.ingest.expect("ingest");
    let bytes = [0xffu8, 0x00, 0xd8, 0x01];
    let (s, b) = http_post(
        at,
        "/v1/channels/images/records",
        Some("application/octet-stream"),
        &bytes,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let mut buf = Buffer::open(edge.state.path()).expect("open");
    assert_eq!(buf.read("images", 0, 10).expect("read")[0].body, bytes);
    let (s, b) = http_post(
        at,
        "/v1/channels/readings/records",
        Some("application/octet-stream"),
        &bytes,
    )
    .await;
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("R5.channel-content"), "{b}");
}

/// Only producers inside the listener's zone are served; every accepted
/// request is audited with the producer's address, the sequence numbers and
/// the body's SHA-256; oversized, undeclared and slow bodies are refused and
/// audited; the media type is matched whatever its case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_serves_only_its_zone_and_audits_every_request() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let pki = Pki::new();
    let edge = edge_with_ingest(&pki).await;
    let at = edge.ingest.expect("ingest listener");
    let path = "/v1/channels/readings/records";
    // From the zone (127.0.2.200): accepted, and audited with its digest.
    let body = "{\"meter\": 1}\n{\"meter\": 2}\n";
    let (s, b) = http_post(
        at,
        path,
        Some("Application/X-NDJSON; charset=utf-8"),
        body.as_bytes(),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert!(
        b.contains("\"seq\":1") && b.contains("\"last\":2"),
        "a batch of two: {b}"
    );
    let digest: String = ring::digest::digest(&ring::digest::SHA256, body.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // From anywhere else (the extranet side, another department, no zone):
    // refused with R5.address, audited under the address, summarised.
    let post_from = |src: &'static str| async move {
        let s = tokio::net::TcpSocket::new_v4().expect("socket");
        s.bind(format!("{src}:0").parse().expect("addr"))
            .expect("bind");
        let mut c = s.connect(at).await.expect("connect");
        let req = format!(
            "POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        c.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        c.read_to_string(&mut out).await.expect("read");
        out
    };
    for src in ["127.0.0.1", "127.0.1.10", "127.9.9.9"] {
        for _ in 0..20 {
            let out = post_from(src).await;
            assert!(
                out.starts_with("HTTP/1.0 403") || out.starts_with("HTTP/1.1 403"),
                "{src}: {out}"
            );
            assert!(out.contains("R5.address"), "{out}");
        }
    }
    // A body larger than any record may be: 413; no Content-Type: 415.
    let huge = vec![b'x'; 3 << 20];
    let (s, _) = http_post(at, path, Some("application/json"), &huge).await;
    assert_eq!(s, 413);
    let (s, _) = http_post(at, path, Some("image/png"), b"{}").await;
    assert_eq!(s, 415);
    wait_for(
        "the audit records",
        std::time::Duration::from_secs(5),
        || {
            let audit = audit_lines(edge.state.path());
            audit.iter().any(|l| {
                l.contains(
                    "channel.accept 127.0.2.200 readings ok [] 1 request(s): seq 1-2, 2 records",
                )
            }) && audit
                .iter()
                .any(|l| l.contains("channel.refuse 127.9.9.9 ingest deny [R5.address]"))
                && audit.iter().any(|l| {
                    l.contains("channel.refuse 127.0.2.200 readings deny [size] body longer")
                })
                && audit.iter().any(|l| {
                    l.contains(
                    "channel.refuse 127.0.2.200 readings deny [format] declare the record's format",
                )
                })
        },
    )
    .await;
    let audit = audit_lines(edge.state.path());
    assert!(
        audit
            .iter()
            .any(|l| l.contains(&format!("sha256={digest}"))),
        "{audit:#?}"
    );
    // Sixty refused requests from three addresses: a few summarised records.
    let refused = audit.iter().filter(|l| l.contains("[R5.address]")).count();
    assert!((3..=6).contains(&refused), "{refused} records: {audit:#?}");
}

/// Denied keywords are caught in what a record says, not how it is spelled,
/// and formats are parsed for real (duplicate keys, deep nesting, XML with a
/// DTD, CSV with control bytes or ragged lines are refused, naming where).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_checks_read_what_the_data_says() {
    const CHECKED: &str = r#"
[[channel]]
name = "docs"
zone = "lab"
formats = ["json", "xml", "csv", "text"]
max_record_bytes = "64KiB"
deny_keywords = ["secret", "机密"]
"#;
    let pki = Pki::new();
    let edge = edge_with_channels(&pki, CHECKED).await;
    let at = edge.ingest.expect("ingest");
    let path = "/v1/channels/docs/records";
    let post = |ct: &'static str, body: String| async move {
        http_post(at, path, Some(ct), body.as_bytes()).await
    };
    for (ct, body) in [
        ("application/json", r#"{"a": "\u0073ecret"}"#.to_owned()),
        ("application/json", r#"{"\u673a\u5bc6": 1}"#.to_owned()),
        ("application/json", "[\"ｓｅｃｒｅｔ\"]".to_owned()),
        ("application/json", "[\"se\u{200B}cret\"]".to_owned()),
        ("application/json", "[\"机 密\"]".to_owned()),
        ("application/xml", "<a>&#115;ecret</a>".to_owned()),
        ("text/csv", "a,b\n1,SECRET\n".to_owned()),
        ("text/plain", "sec\u{00AD}ret".to_owned()),
    ] {
        let (s, b) = post(ct, body.clone()).await;
        assert_eq!(s, 403, "{ct} {body:?}: {b}");
        assert!(b.contains("denied keyword"), "{b}");
    }
    for (ct, body, why) in [
        (
            "application/json",
            r#"{"a": 1, "a": 2}"#.to_owned(),
            "duplicate key",
        ),
        (
            "application/json",
            r#"["\ud800"]"#.to_owned(),
            "not valid JSON",
        ),
        (
            "application/json",
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
            "deeper than 64",
        ),
        (
            "application/xml",
            "<not really xml at all ))) {{".to_owned(),
            "line 1",
        ),
        (
            "application/xml",
            "<!DOCTYPE a [<!ENTITY x SYSTEM \"file:///etc/passwd\">]><a>&x;</a>".to_owned(),
            "not well-formed",
        ),
        ("text/csv", "a,b\n1\u{1},2\n".to_owned(), "line 2, column 2"),
        ("text/csv", "a,b\n1,2,3\n".to_owned(), "3 fields"),
    ] {
        let (s, b) = post(ct, body.clone()).await;
        assert_eq!(s, 422, "{ct}: {b}");
        assert!(b.contains(why), "{why:?} not in {b}");
    }
    let (s, b) = post("application/json", r#"{"report": "public"}"#.to_owned()).await;
    assert_eq!(s, 200, "{b}");
}

/// `auth = "token"`: a producer proves itself with the token `gatewayd
/// producer add` gave it; its name is in the answer, the receipts and the
/// audit; no token, a wrong one, a removed one get 401 (audited under the
/// address, summarised); an unsafe tokens file refuses everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_names_each_producer() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("dir");
    let tokens = dir.path().join("producers.tokens");
    let gatewayd = env!("CARGO_BIN_EXE_gatewayd");
    for name in ["pension-app", "hr-app"] {
        let out = std::process::Command::new(gatewayd)
            .args(["producer", "add", name, "--tokens"])
            .arg(&tokens)
            .arg("--out")
            .arg(dir.path().join(format!("{name}.token")))
            .output()
            .expect("gatewayd producer add");
        assert!(out.status.success(), "{out:?}");
    }
    let token = |name: &str| {
        std::fs::read_to_string(dir.path().join(format!("{name}.token")))
            .expect("token")
            .trim()
            .to_owned()
    };
    let hub: std::net::SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let edge = start_edge(
        &pki,
        EdgeSpec {
            extra: CHANNEL,
            ingest: true,
            ingest_keys: format!("auth = \"token\"\ntokens = \"{}\"\n", tokens.display()),
            ..EdgeSpec::new("edge-b", 2, 2, vec![hub])
        },
    )
    .await;
    let at = edge.ingest.expect("ingest");
    let path = "/v1/channels/readings/records";
    let bearer = |t: String| format!("Authorization: Bearer {t}\r\n");
    let (s, b) = http_post_with(at, path, Some("application/json"), "", b"{}").await;
    assert_eq!(s, 401, "no token: {b}");
    let (s, b) = http_post_with(
        at,
        path,
        Some("application/json"),
        &bearer(format!("gwp1.pension-app.{}", "0".repeat(64))),
        b"{}",
    )
    .await;
    assert_eq!(s, 401, "a forged token: {b}");
    let (s, b) = http_post_with(
        at,
        path,
        Some("application/json"),
        &bearer(token("pension-app")),
        b"{\"a\": 1}",
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("\"producer\":\"pension-app\""), "{b}");
    let (s, _) = http_post_with(
        at,
        path,
        Some("application/json"),
        &bearer(token("hr-app")),
        b"{\"a\": 2}",
    )
    .await;
    assert_eq!(s, 200);
    // The receipts name each record's producer (and need a token too).
    let s = connect_from_zone(at).await;
    let (code, b) = http_exchange(
        s,
        "GET",
        "/v1/channels/readings/receipts",
        None,
        &bearer(token("hr-app")),
        b"",
    )
    .await;
    assert_eq!(code, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).expect("json");
    let names: Vec<&str> = v["receipts"]
        .as_array()
        .expect("receipts")
        .iter()
        .map(|r| r["producer"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(names, ["pension-app", "hr-app"]);
    let (code, _) = http_get(at, "GET", "/v1/channels/readings/receipts").await;
    assert_eq!(code, 401);
    // Removed: its token stops working once the daemon sees the file change.
    let out = std::process::Command::new(gatewayd)
        .args(["producer", "remove", "hr-app", "--tokens"])
        .arg(&tokens)
        .output()
        .expect("gatewayd producer remove");
    assert!(out.status.success(), "{out:?}");
    // The tokens file is re-read when it changes: wait for `producer` to
    // get `status`.
    let answered = |what: &'static str, producer: &'static str, status: u16| {
        let h = bearer(token(producer));
        poll(what, std::time::Duration::from_secs(5), move || {
            let h = h.clone();
            async move {
                let (s, b) = http_post_with(at, path, Some("application/json"), &h, b"{}").await;
                if s == status {
                    Ok(())
                } else {
                    Err(format!("{s} {b}"))
                }
            }
        })
    };
    answered("hr-app's token refused", "hr-app", 401).await;
    // A tokens file others may write: every producer refused, 503.
    std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .expect("chmod");
    answered("the unsafe file refused", "pension-app", 503).await;
    wait_for("the audit", std::time::Duration::from_secs(5), || {
        let audit = audit_lines(edge.state.path());
        audit.iter().any(|l| {
            l.starts_with(
                "channel.accept pension-app@127.0.2.200 readings ok [] 1 request(s): seq 1-1",
            )
        }) && audit
            .iter()
            .any(|l| l.starts_with("channel.accept hr-app@127.0.2.200 readings ok"))
            && audit.iter().any(|l| {
                l.starts_with("channel.refuse 127.0.2.200 ingest deny [producer-credential]")
                    && l.contains("no producer token")
            })
    })
    .await;
}

/// `auth = "mtls"`: HTTPS, producers named by their client certificates from
/// the configured CA; without one 401, with one from another CA no
/// handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_auth_names_producers_by_certificate() {
    let pki = Pki::new();
    let certs = pki.dir.path().join("ingest");
    // The listener's own certificate, for its address, and a producer's.
    gateway_daemon::tunnel::pki::issue(
        &pki.ca(),
        "edge-b-ingest",
        &["127.0.2.1".to_owned()],
        30,
        &certs,
    )
    .expect("issue");
    gateway_daemon::tunnel::pki::issue(&pki.ca(), "pension-app", &[], 30, &certs).expect("issue");
    let other = Pki::new();
    let (stranger, stranger_key) = other.issue("pension-app");
    let hub: std::net::SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let edge = start_edge(
        &pki,
        EdgeSpec {
            extra: CHANNEL,
            ingest: true,
            ingest_keys: format!(
                "auth = \"mtls\"\nclient_ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                pki.ca().join("ca.pem").display(),
                certs.join("edge-b-ingest.pem").display(),
                certs.join("edge-b-ingest.key").display(),
            ),
            ..EdgeSpec::new("edge-b", 2, 2, vec![hub])
        },
    )
    .await;
    let at = edge.ingest.expect("ingest");
    assert_eq!(
        at.ip().to_string(),
        "127.0.2.1",
        "the certificate's address"
    );
    let path = "/v1/channels/readings/records";
    let client = |identity: Option<(&std::path::Path, &std::path::Path)>| {
        Reader::with_files(&pki.ca().join("ca.pem"), at, "x", identity).tls()
    };
    let producer = client(Some((
        &certs.join("pension-app.pem"),
        &certs.join("pension-app.key"),
    )));
    let (s, b) = https_request(at, producer, "POST", path, Some("application/json"), b"{}")
        .await
        .expect("handshake");
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("\"producer\":\"pension-app\""), "{b}");
    let (s, b) = https_request(
        at,
        client(None),
        "POST",
        path,
        Some("application/json"),
        b"{}",
    )
    .await
    .expect("handshake without a certificate");
    assert_eq!(s, 401, "{b}");
    let foreign = client(Some((&stranger, &stranger_key)));
    assert!(
        https_request(at, foreign, "POST", path, Some("application/json"), b"{}")
            .await
            .is_none_or(|(s, _)| s != 200),
        "another CA's certificate is not a producer's"
    );
    // Plain HTTP to an HTTPS listener gets nowhere.
    let s = connect_from_zone(at).await;
    let mut s = s;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _ = s
        .write_all(b"POST /v1/channels/readings/records HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(!String::from_utf8_lossy(&out).contains("200 OK"));
    wait_for("the audit", std::time::Duration::from_secs(5), || {
        audit_lines(edge.state.path())
            .iter()
            .any(|l| l.starts_with("channel.accept pension-app@127.0.2.200 readings ok"))
    })
    .await;
}
