//! The hub's consumers' API against a real hub and edge on loopback: HTTPS
//! with consumers' certificates, grants, each consumer's own cursor, refusals
//! that name what is missing, every read and ack audited, retention.

mod net;

use std::net::SocketAddr;
use std::time::Duration;

use net::*;
use serde_json::Value;

const CHANNELS: &str = "\n[[channel]]\nname = \"readings\"\nzone = \"lab\"\nformats = [\"json\"]\nmax_record_bytes = \"4KiB\"\n\n[[channel]]\nname = \"secrets\"\nzone = \"lab\"\nformats = [\"json\"]\nmax_record_bytes = \"4KiB\"\n";

async fn post(ingest: SocketAddr, channel: &str, from: u64, to: u64) {
    let body: String = (from..=to).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    let (status, b) = http_post(
        ingest,
        &format!("/v1/channels/{channel}/records"),
        Some("application/x-ndjson"),
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{b}");
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The sequence numbers a read returns.
fn seqs(body: &str) -> Vec<u64> {
    json(body)["records"]
        .as_array()
        .unwrap_or_else(|| panic!("records in {body}"))
        .iter()
        .map(|r| r["seq"].as_u64().expect("seq"))
        .collect()
}

async fn wait_high(reader: &Reader, stream: &str, n: u64) {
    poll(
        &format!("{stream} at {n}"),
        Duration::from_secs(15),
        || async {
            let (_, body) = reader.get("GET", "/v1/channels").await;
            let v = json(&body);
            let high = v["channels"]
                .as_array()
                .and_then(|a| {
                    a.iter().find(|c| {
                        format!(
                            "{}/{}",
                            c["device"].as_str().unwrap_or(""),
                            c["channel"].as_str().unwrap_or("")
                        ) == stream
                    })
                })
                .and_then(|c| c["high"].as_u64())
                .unwrap_or(0);
            if high >= n { Ok(()) } else { Err(body) }
        },
    )
    .await;
}

async fn hub_and_edge(pki: &Pki, hub_extra: &'static str) -> (HubNode, EdgeNode) {
    let hub = start_hub(
        pki,
        HubSpec {
            hub_extra,
            // Certificate-less floods from loopback are summarised here, not banned.
            extra: LOOPBACK_NEVER_BANNED,
            ..HubSpec::new("hub-01", 2, &[])
        },
    )
    .await;
    let edge = start_edge(
        pki,
        EdgeSpec {
            extra: CHANNELS,
            ingest: true,
            ..EdgeSpec::new("edge-b", 2, 2, vec![hub.quic])
        },
    )
    .await;
    wait_for("the tunnel", Duration::from_secs(10), || {
        edge.running.ready()
    })
    .await;
    (hub, edge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_consumer_reads_only_its_grants_with_its_own_cursor() {
    let pki = Pki::new();
    let (hub, edge) = hub_and_edge(&pki, "").await;
    let ingest = edge.ingest.expect("ingest");
    let x = Reader::new(&pki, &hub, "central-x", &["edge-b/readings"]);
    let y = Reader::new(&pki, &hub, "central-y", &["edge-b/readings"]);
    let z = Reader::new(&pki, &hub, "central-z", &[]);
    post(ingest, "readings", 1, 10).await;
    post(ingest, "secrets", 1, 3).await;
    wait_high(&x, "edge-b/readings", 10).await;

    // Who is not a consumer is told so, with what is missing.
    let ca = pki.ca().join("ca.pem");
    let anonymous = Reader::with_files(&ca, hub.api, "anonymous", None);
    let (status, body) = anonymous.get("GET", "/v1/channels").await;
    assert_eq!(status, 401, "{body}");
    assert!(json(&body)["missing"].is_string(), "{body}");
    let (cert, key) = pki.issue("edge-b");
    let device = Reader::with_files(&ca, hub.api, "edge-b", Some((&cert, &key)));
    let (status, body) = device
        .get("GET", "/v1/channels/edge-b/readings/records")
        .await;
    assert_eq!(
        status, 401,
        "a device certificate is not a consumer's: {body}"
    );
    assert!(body.contains("not a consumer"), "{body}");

    // A consumer lists and reads only what it was granted.
    let (_, body) = x.get("GET", "/v1/channels").await;
    let listed = json(&body)["channels"]
        .as_array()
        .expect("channels")
        .clone();
    assert_eq!(listed.len(), 1, "{body}");
    assert_eq!(listed[0]["channel"], "readings");
    let (status, body) = x.get("GET", "/v1/channels/edge-b/secrets/records").await;
    assert_eq!(status, 403, "{body}");
    let v = json(&body);
    assert!(
        v["missing"].as_str().expect("missing").contains("grant"),
        "{body}"
    );
    assert_eq!(v["rule"], "consumer-grant");
    let (status, _) = z.get("GET", "/v1/channels/edge-b/readings/records").await;
    assert_eq!(status, 403);
    let (_, body) = z.get("GET", "/v1/channels").await;
    assert_eq!(json(&body)["channels"], serde_json::json!([]), "{body}");

    // Two consumers of one stream each read every record.
    let (_, body) = x.get("GET", "/v1/channels/edge-b/readings/records").await;
    assert_eq!(seqs(&body), (1..=10).collect::<Vec<_>>());
    let (_, body) = y
        .get("GET", "/v1/channels/edge-b/readings/records?limit=4")
        .await;
    assert_eq!(seqs(&body), [1, 2, 3, 4]);
    assert_eq!(json(&body)["next"], 4);

    // An ack past what exists is refused with the high-water mark.
    let (status, body) = x
        .get("POST", "/v1/channels/edge-b/readings/ack?cursor=999999")
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(json(&body)["high"], 10, "{body}");
    // x takes all: nothing leaves, y has not had them.
    let (status, body) = x
        .get("POST", "/v1/channels/edge-b/readings/ack?cursor=10")
        .await;
    assert_eq!(
        (status, json(&body)["removed"].clone()),
        (200, 0.into()),
        "{body}"
    );
    let (_, body) = y.get("GET", "/v1/channels/edge-b/readings/records").await;
    assert_eq!(
        seqs(&body),
        (1..=10).collect::<Vec<_>>(),
        "y's records stay"
    );
    // x's own reads start after its cursor.
    let (_, body) = x.get("GET", "/v1/channels/edge-b/readings/records").await;
    assert!(seqs(&body).is_empty(), "{body}");
    // y takes four: those four go.
    let (_, body) = y
        .get("POST", "/v1/channels/edge-b/readings/ack?cursor=4")
        .await;
    assert_eq!(json(&body)["removed"], 4, "{body}");

    // Bad paths and queries: 400 naming the part, never a panic or a read.
    for (path, field) in [
        ("/v1/channels/edge-b/readings/records?after=abc", "after"),
        (
            "/v1/channels/edge-b/readings/records?after=1&after=2",
            "after",
        ),
        ("/v1/channels/edge-b/readings/records?secret=1", "secret"),
        ("/v1/channels/Edge-B/readings/records", "device"),
        ("/v1/channels/edge-b/readings/ack?cursor=-1", "cursor"),
        ("/v1/channels/edge-b/readings/ack", "cursor"),
    ] {
        let method = if path.contains("/ack") { "POST" } else { "GET" };
        let (status, body) = y.get(method, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(json(&body)["field"], field, "{path}: {body}");
    }
    for path in [
        "/v1/channels/edge-b/readings/records/../../secrets/records",
        "/v1/channels/edge-b%2Fsecrets/x/records",
        "/v1/channels/%00/readings/records",
    ] {
        let (status, body) = y.get("GET", path).await;
        assert!(matches!(status, 400 | 404), "{path}: {status} {body}");
    }

    // A grant withdrawn while the consumer reads: refused from the next request,
    // and what x alone had taken leaves the sink.
    assert_eq!(
        revoke_grant(hub.state.path(), "edge-b", "readings", "central-y"),
        Some(6)
    );
    let (status, _) = y.get("GET", "/v1/channels/edge-b/readings/records").await;
    assert_eq!(status, 403);
    let (_, body) = x.get("GET", "/v1/channels").await;
    assert_eq!(json(&body)["channels"][0]["records"], 0, "{body}");

    // Every read and ack is in the hub's audit: one record per request.
    let audit = audit_lines(hub.state.path());
    let find = |needle: &str| audit.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(
        find("consumer.read central-x edge-b/readings ok [] seq 1-10, 10 records"),
        1,
        "{audit:#?}"
    );
    assert_eq!(
        find("consumer.read central-y edge-b/readings ok [] seq 1-4, 4 records"),
        1
    );
    assert_eq!(
        find("consumer.ack central-x edge-b/readings deny [consumer-ack-beyond-high]"),
        1
    );
    assert_eq!(
        find("consumer.read central-x edge-b/secrets deny [consumer-grant]"),
        1
    );
    assert!(find("consumer.ack central-y edge-b/readings ok [] cursor 4") == 1);
    // Refusals of certificate-less requests name the address, not a consumer.
    assert!(
        audit
            .iter()
            .any(|l| l.starts_with("consumer.auth 127.0.0.1 consumers-api deny")),
        "{audit:#?}"
    );

    // Cursors survive a restart.
    let (quic, api, state) = (hub.quic, hub.api, hub.state.clone());
    hub.running.drain(Duration::from_millis(100)).await;
    drop(hub);
    let _hub = start_hub(
        &pki,
        HubSpec {
            quic: Some(quic),
            api: Some(api),
            state: Some(state),
            ..HubSpec::new("hub-01", 2, &[])
        },
    )
    .await;
    let (_, body) = poll("the API back", Duration::from_secs(10), || async {
        match x.request("GET", "/v1/channels") {
            Some((200, b)) => Ok(((), b)),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(json(&body)["channels"][0]["cursor"], 10, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_records_expire_after_the_retention_counted_and_audited() {
    let pki = Pki::new();
    let (hub, edge) = hub_and_edge(&pki, "sink_retention = \"2s\"").await;
    let ingest = edge.ingest.expect("ingest");
    let x = Reader::new(&pki, &hub, "central-x", &["edge-b/readings"]);
    post(ingest, "readings", 1, 5).await;
    wait_high(&x, "edge-b/readings", 5).await;
    let (_, body) = poll("the records to expire", Duration::from_secs(15), || async {
        let (_, body) = x.get("GET", "/v1/channels").await;
        if json(&body)["channels"][0]["expired_unread"] == 5 {
            Ok(((), body))
        } else {
            Err(body)
        }
    })
    .await;
    assert_eq!(json(&body)["channels"][0]["records"], 0, "{body}");
    let (_, body) = x.get("GET", "/v1/channels/edge-b/readings/records").await;
    assert!(seqs(&body).is_empty(), "{body}");
    wait_for("the expiry in the audit", Duration::from_secs(5), || {
        audit_lines(hub.state.path()).iter().any(|l| {
            l.starts_with(
                "sink.expire hub-01 edge-b/readings drop [sink-retention] seq 1-5, 5 records",
            )
        })
    })
    .await;
    let metrics = http_get(hub.running.admin_addr, "GET", "/metrics").await.1;
    assert!(
        metrics.contains(
            "gateway_sink_records_total{device=\"edge-b\",channel=\"readings\",result=\"expired_unread\"} 5"
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_less_requests_are_summarised_not_recorded_one_by_one() {
    let pki = Pki::new();
    let (hub, _edge) = hub_and_edge(&pki, "").await;
    let anonymous = Reader::with_files(&pki.ca().join("ca.pem"), hub.api, "anonymous", None);
    let before = audit_lines(hub.state.path()).len();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let a = anonymous.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    assert_eq!(a.request("GET", "/v1/channels").map(|r| r.0), Some(401));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let grown: Vec<String> = audit_lines(hub.state.path())
        .into_iter()
        .skip(before)
        .filter(|l| l.starts_with("consumer.auth"))
        .collect();
    assert!(
        (1..=2).contains(&grown.len()),
        "400 refusals in a few seconds: {grown:#?}"
    );
}

/// Two hubs on one PostgreSQL: records synced through the first are read
/// through the second; a consumer's ack at one moves its cursor at the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_reads_and_acks_through_either_hub_on_one_postgres() {
    use gateway_store::postgres::cluster::{self, Cluster};
    if let Some(why) = cluster::missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let pg = Cluster::start(false).expect("PostgreSQL");
    pg.create_database("hubs").expect("database");
    let pki = Pki::new();
    let on = |id| HubSpec {
        postgres: Some((&pg, "hubs")),
        extra: LOOPBACK_NEVER_BANNED,
        ..HubSpec::new(id, 2, &[])
    };
    let a = start_hub(&pki, on("hub-01")).await;
    let b = start_hub(&pki, on("hub-02")).await;
    let edge = start_edge(
        &pki,
        EdgeSpec {
            extra: CHANNELS,
            ingest: true,
            ..EdgeSpec::new("edge-b", 2, 2, vec![a.quic])
        },
    )
    .await;
    ready(&edge).await;
    let store = *load(&a.config_text)
        .hub()
        .expect("hub")
        .settings
        .postgres
        .clone()
        .expect("postgres");
    let xa = Reader::for_postgres(&pki, &store, a.api, "central-x", &["edge-b/readings"]);
    let dir = pki.dir.path().join("consumers");
    let xb = Reader::with_files(
        &pki.ca().join("ca.pem"),
        b.api,
        "central-x",
        Some((&dir.join("central-x.pem"), &dir.join("central-x.key"))),
    );
    post(edge.ingest.expect("ingest"), "readings", 1, 10).await;
    // Synced through hub-01, seen through hub-02.
    wait_high(&xb, "edge-b/readings", 10).await;
    let (status, body) = xa
        .get("POST", "/v1/channels/edge-b/readings/ack?cursor=6")
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = xb.get("GET", "/v1/channels/edge-b/readings/records").await;
    assert_eq!(
        seqs(&body),
        [7, 8, 9, 10],
        "hub-02 reads after the ack at hub-01"
    );
    let (status, body) = xb
        .get("POST", "/v1/channels/edge-b/readings/ack?cursor=10")
        .await;
    assert_eq!(
        (status, json(&body)["removed"].clone()),
        (200, 4.into()),
        "{body}"
    );
    let (_, body) = xa.get("GET", "/v1/channels/edge-b/readings/records").await;
    assert!(seqs(&body).is_empty(), "{body}");
}
