//! Relays end to end, with real hubs and edges in-process on loopback (port 0):
//! publish and access paths, big and many transfers, refusals and their audit,
//! foreign certificates, version mismatch, hub restart and hub failover, reload.

mod net;

use std::sync::atomic::Ordering;
use std::time::Duration;

use net::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1 << 20;

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_access_echo_reach_the_legacy_server() {
    let pki = Pki::new();
    let echo_b = echo("127.0.2.10").await;
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &["edge-b/echo"])).await;
    let edge_b = start_edge(
        &pki,
        EdgeSpec {
            services: vec![("echo", echo_b.addr, "\"extranet\", \"edge-a\"", None, None)],
            ..EdgeSpec::new("edge-b", 2, 2, vec![hub.quic])
        },
    )
    .await;
    let edge_a = start_edge(
        &pki,
        EdgeSpec {
            accesses: vec!["edge-b/echo"],
            ..EdgeSpec::new("edge-a", 1, 2, vec![hub.quic])
        },
    )
    .await;
    ready(&edge_a).await;
    ready(&edge_b).await;

    // Provincial client -> hub publish -> edge-b -> legacy echo.
    let back = round_trip(hub.publish[0], "127.0.0.1", b"hello via publish".to_vec())
        .await
        .expect("publish relay");
    assert_eq!(back, b"hello via publish");
    // Legacy client of edge-a -> access -> hub -> edge-b -> legacy echo.
    let back = round_trip(edge_a.access[0], "127.0.1.5", b"hello via access".to_vec())
        .await
        .expect("access relay");
    assert_eq!(back, b"hello via access");
    assert_eq!(
        echo_b.bytes.load(Ordering::SeqCst),
        33,
        "the legacy server saw both payloads"
    );
    assert_eq!(echo_b.conns.load(Ordering::SeqCst), 2);

    wait_for("edge-b's audit", Duration::from_secs(5), || {
        audit_lines(edge_b.state.path())
            .iter()
            .filter(|l| l.starts_with("relay.close"))
            .count()
            == 2
    })
    .await;
    let lines = audit_lines(edge_b.state.path());
    assert!(
        lines.iter().any(|l| l.contains("relay.open")
            && l.contains("[R0.allow-service]")
            && l.contains("edge-a:127.0.1.5")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("relay.close") && l.contains("bytes_up=17 bytes_down=17")),
        "{lines:#?}"
    );
    // The hub's audit writer commits on its own schedule: wait for it.
    wait_for(
        "the hub's audit of the transit",
        Duration::from_secs(5),
        || {
            audit_lines(hub.state.path())
                .iter()
                .any(|l| l.starts_with("relay.open") && l.contains("[R0.allow-transit]"))
        },
    )
    .await;
    let hub_lines = audit_lines(hub.state.path());
    assert!(
        hub_lines
            .iter()
            .any(|l| l.starts_with("relay.open") && l.contains("[R0.allow-publish]")),
        "{hub_lines:#?}"
    );

    let metrics = reqwest_metrics(&edge_b).await;
    assert!(
        metrics.contains("gateway_relays_total{service=\"echo\"} 2"),
        "{metrics}"
    );
}

async fn reqwest_metrics(edge: &EdgeNode) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(edge.running.admin_addr)
        .await
        .expect("admin");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_transfer_arrives_intact() {
    let pki = Pki::new();
    let echo_b = echo("127.0.2.10").await;
    let (hub, _edge) = hub_and_edge(
        &pki,
        2,
        ("echo", echo_b.addr, "\"extranet\"", None, None),
        None,
    )
    .await;
    let payload = pattern(100 * MIB, 7);
    let digest = ring_digest(&payload);
    let back = round_trip(hub.publish[0], "127.0.0.1", payload)
        .await
        .expect("relay");
    assert_eq!(back.len(), 100 * MIB);
    assert_eq!(
        ring_digest(&back),
        digest,
        "SHA-256 of what came back differs"
    );
    assert_eq!(echo_b.bytes.load(Ordering::SeqCst), 100 * MIB as u64);

    // The transfer ran on large packets: path MTU discovery reached its bound
    // on loopback and no batch of large packets was lost on the way (quinn
    // drops a segmentation-offload batch over 64 KiB whole, which reads as an
    // MTU black hole and sends the path back to 1200).
    let path = || {
        hub.running
            .ctx()
            .metrics
            .peers()
            .get("edge-b")
            .cloned()
            .unwrap_or_default()
    };
    wait_for(
        "a path sample at the largest MTU",
        Duration::from_secs(10),
        || path().mtu_bytes == gateway_daemon::tunnel::tls::MTU_UPPER_BOUND,
    )
    .await;
    assert_eq!(path().black_holes, 0, "{:?}", path());
}

fn ring_digest(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_relays() {
    let pki = Pki::new();
    let echo_b = echo("127.0.2.10").await;
    let (hub, edge) = hub_and_edge(
        &pki,
        2,
        ("echo", echo_b.addr, "\"extranet\"", None, None),
        None,
    )
    .await;
    let publish = hub.publish[0];
    let mut tasks = Vec::new();
    for i in 0..1000u32 {
        tasks.push(tokio::spawn(async move {
            let payload = pattern(1024, i as u8);
            // Twenty provincial clients (one address may hold 64 at once).
            let from = format!("127.0.0.{}", 100 + i % 20);
            let back = round_trip(publish, &from, payload.clone()).await;
            (back.map(|b| b == payload), i)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (r, i) = t.await.expect("task");
        match r {
            Ok(true) => ok += 1,
            Ok(false) => panic!("connection {i}: echo differs"),
            Err(e) => {
                let trouble = |lines: Vec<String>| {
                    lines
                        .into_iter()
                        .filter(|l| !l.starts_with("relay.open") && !l.contains("end=closed"))
                        .collect::<Vec<_>>()
                };
                panic!(
                    "connection {i}: {e}\nhub: {:#?}\nedge: {:#?}",
                    trouble(audit_lines(hub.state.path())),
                    trouble(audit_lines(edge.state.path()))
                );
            }
        }
    }
    assert_eq!(ok, 1000);
    assert_eq!(echo_b.conns.load(Ordering::SeqCst), 1000);
    assert_eq!(echo_b.bytes.load(Ordering::SeqCst), 1000 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_crossing_is_refused_and_audited() {
    let pki = Pki::new();
    let echo_b = echo("127.0.2.10").await;
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &["edge-b/echo"])).await;
    // The service allows only another department's gateway, not provincial clients.
    let edge = start_edge(
        &pki,
        EdgeSpec {
            services: vec![("echo", echo_b.addr, "\"edge-z\"", None, None)],
            ..EdgeSpec::new("edge-b", 2, 2, vec![hub.quic])
        },
    )
    .await;
    ready(&edge).await;
    let r = round_trip(hub.publish[0], "127.0.0.1", b"let me in".to_vec()).await;
    assert!(
        r.as_ref().map_or(true, Vec::is_empty),
        "a refused client gets no data: {r:?}"
    );
    assert_eq!(
        echo_b.conns.load(Ordering::SeqCst),
        0,
        "nothing reached the legacy network"
    );
    wait_for(
        "the refusal in the edge's audit",
        Duration::from_secs(5),
        || {
            audit_lines(edge.state.path()).iter().any(|l| {
                l.starts_with("relay.refuse")
                    && l.contains("[R0.default-deny]")
                    && l.contains("zone \"extranet\" is not allowed")
            })
        },
    )
    .await;
    wait_for(
        "the refusal in the hub's audit",
        Duration::from_secs(5),
        || {
            audit_lines(hub.state.path())
                .iter()
                .any(|l| l.starts_with("relay.refuse") && l.contains("[R0.default-deny]"))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn level_3_checks_the_application_protocol() {
    let pki = Pki::new();
    let echo_b = web_server("127.0.2.10").await;
    let (hub, edge) = hub_and_edge(
        &pki,
        3,
        ("web", echo_b.addr, "\"extranet\"", Some("http"), None),
        None,
    )
    .await;
    let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    let answer = round_trip(hub.publish[0], "127.0.0.1", http.clone())
        .await
        .expect("http passes");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200 OK") && answer.ends_with("GET /"),
        "{answer}"
    );
    let ssh = round_trip(
        hub.publish[0],
        "127.0.0.1",
        b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(),
    )
    .await;
    assert!(ssh.as_ref().map_or(true, Vec::is_empty), "{ssh:?}");
    assert_eq!(
        echo_b.bytes.load(Ordering::SeqCst),
        http.len() as u64,
        "the SSH bytes never reached the server"
    );
    wait_for(
        "the R5.app-protocol refusal",
        Duration::from_secs(5),
        || {
            audit_lines(edge.state.path())
                .iter()
                .any(|l| l.starts_with("relay.refuse") && l.contains("[R5.app-protocol]"))
        },
    )
    .await;
    // The whole connection is followed: a valid request then an SSH banner
    // on the same connection, and binary after a method, never reach the
    // server past what was valid.
    let before = echo_b.bytes.load(Ordering::SeqCst);
    let mut smuggle = http.clone();
    smuggle.extend(b"SSH-2.0-OpenSSH_9.2\r\n\x00\x01raw bytes");
    let _ = round_trip(hub.publish[0], "127.0.0.1", smuggle).await;
    let mut binary = b"GET ".to_vec();
    binary.extend([0xffu8; 256]);
    let _ = round_trip(hub.publish[0], "127.0.0.1", binary).await;
    let mut both =
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    both.extend(b"0\r\n\r\n");
    let _ = round_trip(hub.publish[0], "127.0.0.1", both).await;
    wait_for(
        "the cut relays in the audit",
        Duration::from_secs(5),
        || {
            audit_lines(edge.state.path())
                .iter()
                .filter(|l| l.starts_with("relay.refuse") && l.contains("[R5.app-protocol]"))
                .count()
                >= 4
        },
    )
    .await;
    let reached = echo_b.bytes.load(Ordering::SeqCst) - before;
    assert!(
        reached <= http.len() as u64,
        "{reached} bytes reached the server: at most the valid request may"
    );
    let audit = audit_lines(edge.state.path());
    assert!(
        audit
            .iter()
            .any(|l| l.contains("at byte 27: not an HTTP request line")),
        "the offset of the smuggled banner: {audit:#?}"
    );
}

/// Opens a connection to `to` from `from_ip`, sends `payload` (keeping the
/// write side open) and reads until the relay closes it.
async fn exchange(to: std::net::SocketAddr, from_ip: &str, payload: &[u8]) -> String {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{from_ip}:0").parse().expect("addr"))
        .expect("bind");
    let mut s = sock.connect(to).await.expect("connect");
    s.write_all(payload).await.expect("send");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("the relay answers and closes");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn level_3_follows_responses_and_answers_what_http_allow_refuses() {
    let pki = Pki::new();
    let web = web_server("127.0.2.10").await;
    // A server that answers anything with an SSH banner.
    let rogue = tokio::net::TcpListener::bind("127.0.2.11:0")
        .await
        .expect("bind");
    let rogue_addr = rogue.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = rogue.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\x00\x01").await;
                let _ = s.read(&mut buf).await;
            });
        }
    });
    let hub = start_hub(
        &pki,
        HubSpec::new("hub-01", 3, &["edge-b/web", "edge-b/rogue"]),
    )
    .await;
    let edge = start_edge(
        &pki,
        EdgeSpec {
            services: vec![
                ("web", web.addr, "\"extranet\"", Some("http"), None),
                ("rogue", rogue_addr, "\"extranet\"", Some("http"), None),
            ],
            service_keys: "http_allow = [{ methods = [\"GET\", \"HEAD\"], paths = [\"/reports/\"] }, { methods = [\"POST\"], paths = [\"/forms/submit\"] }]\n",
            ..EdgeSpec::new("edge-b", 2, 3, vec![hub.quic])
        },
    )
    .await;
    wait_for("the edge's tunnel", Duration::from_secs(10), || {
        edge.running.ready()
    })
    .await;
    let (web_pub, rogue_pub) = (hub.publish[0], hub.publish[1]);
    // Allowed requests pass, pipelined on one connection.
    let got = exchange(
        web_pub,
        "127.0.0.1",
        b"GET /reports/q3?x=1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /forms/submit HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    .await;
    assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 2, "{got}");
    // A refused request in the middle: the one before it is answered by the
    // server, the gateway answers it 403 and nothing after it passes.
    let got = exchange(
        web_pub,
        "127.0.0.1",
        b"GET /reports/a HTTP/1.1\r\nHost: x\r\n\r\nGET /reports/%2e%2e/admin HTTP/1.1\r\nHost: x\r\n\r\nGET /reports/b HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let (ok, refused) = got.split_once("HTTP/1.1 403 Forbidden").expect("a 403");
    assert!(
        ok.starts_with("HTTP/1.1 200 OK") && ok.ends_with("GET /reports/a"),
        "{got}"
    );
    assert!(refused.contains("GET /admin"), "{got}");
    // Refused as the first request: the server sees nothing of it.
    let got = exchange(
        web_pub,
        "127.0.0.1",
        b"DELETE /reports/1 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 403 Forbidden"), "{got}");
    let seen = web.seen();
    assert_eq!(
        seen,
        [
            "GET /reports/q3?x=1",
            "POST /forms/submit",
            "GET /reports/a"
        ],
        "only allowed requests reach the server"
    );
    // A server answering with something that is not HTTP: the relay is cut
    // before its bytes reach the client.
    let got = exchange(
        rogue_pub,
        "127.0.0.1",
        b"GET /reports/x HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(!got.contains("SSH"), "{got:?}");
    wait_for("the refusals in the audit", Duration::from_secs(5), || {
        let audit = audit_lines(edge.state.path());
        let allow = audit
            .iter()
            .filter(|l| l.starts_with("relay.refuse") && l.contains("[R5.http-allow]"))
            .count();
        allow == 2
            && audit
                .iter()
                .any(|l| l.contains("GET /admin") && l.contains("[R5.http-allow]"))
            && audit
                .iter()
                .any(|l| l.contains("DELETE /reports/1") && l.contains("[R5.http-allow]"))
            && audit.iter().any(|l| {
                l.contains("[R5.app-protocol]")
                    && l.contains("the server's responses at byte 0: not an HTTP response line")
            })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_the_extra_one_and_keeps_the_others() {
    let pki = Pki::new();
    let echo_b = echo("127.0.2.10").await;
    let (hub, edge) = hub_and_edge(
        &pki,
        2,
        ("echo", echo_b.addr, "\"extranet\"", None, Some(2)),
        None,
    )
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(hub.publish[0])
            .await
            .expect("connect");
        s.write_all(b"ping").await.expect("write");
        let mut b = [0u8; 4];
        s.read_exact(&mut b)
            .await
            .expect("echo while under the limit");
        held.push(s);
    }
    let third = round_trip(hub.publish[0], "127.0.0.1", b"third".to_vec()).await;
    assert!(third.as_ref().map_or(true, Vec::is_empty), "{third:?}");
    for s in &mut held {
        s.write_all(b"pong")
            .await
            .expect("existing relays untouched");
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.expect("echo");
        assert_eq!(&b, b"pong");
    }
    wait_for("the limit refusal", Duration::from_secs(5), || {
        audit_lines(edge.state.path())
            .iter()
            .any(|l| l.starts_with("relay.refuse") && l.contains("max_connections"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let rogue = Pki::new();
    let (cert, key) = rogue.issue("edge-b");
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &[])).await;
    // The rogue edge trusts the real CA for the hub but presents a certificate of its own CA.
    let edge = start_edge(
        &pki,
        EdgeSpec {
            cert: Some((pki.ca().join("ca.pem"), cert, key)),
            ..EdgeSpec::new("edge-b", 2, 2, vec![hub.quic])
        },
    )
    .await;
    // Wait for the hub to have turned the edge away twice, then check no tunnel came up.
    wait_for("refused handshakes", Duration::from_secs(10), || {
        edge.running.ctx().metrics.connect_failures() >= 2
    })
    .await;
    assert!(
        !edge.running.ready(),
        "a foreign certificate must not bring a tunnel up"
    );
    assert!(!hub.running.ctx().metrics.any_peer_up());
    // And an edge that trusts another CA does not accept the real hub.
    let edge2 = start_edge(
        &pki,
        EdgeSpec {
            cert: Some((
                rogue.ca().join("ca.pem"),
                pki.issue("edge-c").0,
                pki.dir.path().join("certs/edge-c.key"),
            )),
            ..EdgeSpec::new("edge-c", 3, 2, vec![hub.quic])
        },
    )
    .await;
    wait_for("rejected hub certificates", Duration::from_secs(10), || {
        edge2.running.ctx().metrics.connect_failures() >= 2
    })
    .await;
    assert!(!edge2.running.ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_mismatch_is_refused_naming_both_versions() {
    use gateway_core::wire::{Frame, RefuseCode};
    let pki = Pki::new();
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &[])).await;
    let (cert, key) = pki.issue("edge-v");
    let client = gateway_daemon::tunnel::tls::client(&pki.ca().join("ca.pem"), &cert, &key)
        .expect("client config");
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let conn = endpoint
        .connect_with(client, hub.quic, "127.0.0.1")
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    gateway_daemon::tunnel::frame::write_frame(&mut send, &Frame::Hello { version: 99 })
        .await
        .expect("hello");
    match gateway_daemon::tunnel::frame::read_frame(&mut recv)
        .await
        .expect("answer")
    {
        Frame::Refuse {
            code: RefuseCode::Version,
            message,
            ..
        } => {
            assert!(
                message.contains("speaks 1") && message.contains("speaks 99"),
                "{message}"
            );
        }
        other => panic!("expected a version refusal, got {other:?}"),
    }
}

/// When a device connects again the hub pings its older connections. An edge
/// older than the Ping frame cannot read it and ends the stream unanswered:
/// that is a live process, and its connection must stay up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_ends_the_ping_unanswered_is_kept() {
    use gateway_core::wire::{Frame, VERSION};
    use gateway_daemon::tunnel::frame::{read_frame, write_frame};
    let pki = Pki::new();
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &[])).await;
    let (cert, key) = pki.issue("edge-old");
    let client = gateway_daemon::tunnel::tls::client(&pki.ca().join("ca.pem"), &cert, &key)
        .expect("client config");
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    // An old edge: hello, then every stream the hub opens is read and ended.
    let (pinged_tx, mut pinged) = tokio::sync::mpsc::unbounded_channel();
    let mut conns = Vec::new();
    for _ in 0..2 {
        let conn = endpoint
            .connect_with(client.clone(), hub.quic, "127.0.0.1")
            .expect("connect")
            .await
            .expect("handshake");
        let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
        write_frame(&mut send, &Frame::Hello { version: VERSION })
            .await
            .expect("hello");
        let welcome = read_frame(&mut recv).await.expect("welcome");
        assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
        let (c, tx) = (conn.clone(), pinged_tx.clone());
        tokio::spawn(async move {
            let _control = (send, recv);
            while let Ok((mut s, mut r)) = c.accept_bi().await {
                let mut first = [0u8; 5];
                let _ = tokio::io::AsyncReadExt::read_exact(&mut r, &mut first).await;
                let _ = s.finish();
                let _ = tx.send(first[4]);
            }
        });
        conns.push(conn);
    }
    // The second connection put the first in doubt: the hub pinged it.
    let tag = tokio::time::timeout(Duration::from_secs(5), pinged.recv())
        .await
        .expect("a ping within 5 s")
        .expect("tag");
    assert_eq!(tag, 0x13, "the Ping frame");
    assert!(
        tokio::time::timeout(Duration::from_secs(1), conns[0].closed())
            .await
            .is_err(),
        "the hub closed a connection that ended its ping unanswered: {:?}",
        conns[0].close_reason()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_returns_after_a_hub_restart() {
    let pki = Pki::new();
    let echo_b = echo("127.0.2.10").await;
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &["edge-b/echo"])).await;
    let edge = start_edge(
        &pki,
        EdgeSpec {
            id: "edge-b",
            net: 2,
            level: 2,
            hubs: vec![hub.quic],
            services: vec![("echo", echo_b.addr, "\"extranet\"", None, None)],
            ..EdgeSpec::new("edge-b", 2, 2, vec![hub.quic])
        },
    )
    .await;
    ready(&edge).await;
    let (quic, publish) = (hub.quic, hub.publish.clone());
    hub.running.drain(Duration::from_millis(100)).await;
    drop(hub.running);
    wait_for("the edge to notice", Duration::from_secs(10), || {
        !edge.running.ready()
    })
    .await;
    let hub2 = start_hub(
        &pki,
        HubSpec {
            id: "hub-01",
            level: 2,
            publishes: &["edge-b/echo"],
            quic: Some(quic),
            publish_addrs: publish,
            ..HubSpec::new("hub-01", 2, &["edge-b/echo"])
        },
    )
    .await;
    let t0 = tokio::time::Instant::now();
    wait_for("the tunnel to return", Duration::from_secs(10), || {
        edge.running.ready()
    })
    .await;
    println!(
        "tunnel back {} ms after the hub restarted",
        t0.elapsed().as_millis()
    );
    let back = round_trip(hub2.publish[0], "127.0.0.1", b"back again".to_vec())
        .await
        .expect("relay after restart");
    assert_eq!(back, b"back again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_keeps_working_while_one_of_two_hubs_is_down() {
    let pki = Pki::new();
    let echo_b = echo("127.0.2.10").await;
    let hub1 = start_hub(&pki, HubSpec::new("hub-01", 2, &["edge-b/echo"])).await;
    let hub2 = start_hub(&pki, HubSpec::new("hub-02", 2, &["edge-b/echo"])).await;
    let edge = start_edge(
        &pki,
        EdgeSpec {
            services: vec![("echo", echo_b.addr, "\"extranet\"", None, None)],
            ..EdgeSpec::new("edge-b", 2, 2, vec![hub1.quic, hub2.quic])
        },
    )
    .await;
    wait_for("both tunnels", Duration::from_secs(10), || {
        hub1.running.ctx().metrics.any_peer_up() && hub2.running.ctx().metrics.any_peer_up()
    })
    .await;
    hub1.running.drain(Duration::from_millis(100)).await;
    drop(hub1);
    let back = round_trip(hub2.publish[0], "127.0.0.1", b"via the second hub".to_vec())
        .await
        .expect("relay through hub2");
    assert_eq!(back, b"via the second hub");
    assert!(edge.running.ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_a_publish_and_keeps_other_relays() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let echo_b = echo("127.0.2.10").await;
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &["edge-b/echo"])).await;
    let edge = start_edge(
        &pki,
        EdgeSpec {
            services: vec![
                ("echo", echo_b.addr, "\"extranet\"", None, None),
                ("echo2", echo_b.addr, "\"extranet\"", None, None),
            ],
            ..EdgeSpec::new("edge-b", 2, 2, vec![hub.quic])
        },
    )
    .await;
    ready(&edge).await;
    // A relay that stays open across the reloads.
    let mut long = tokio::net::TcpStream::connect(hub.publish[0])
        .await
        .expect("connect");
    long.write_all(b"one").await.expect("write");
    let mut b = [0u8; 3];
    long.read_exact(&mut b).await.expect("echo");

    // Add a publish for echo2 on a new address.
    let extra = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
    let extra_addr = extra.local_addr().expect("addr");
    drop(extra);
    let text = format!(
        "{}\n[[publish]]\nservice = \"edge-b/echo2\"\nzone = \"extranet\"\nlisten = \"{extra_addr}\"\n",
        hub.config_text
    );
    hub.running.reload(load(&text)).expect("reload adds");
    assert_eq!(
        round_trip(extra_addr, "127.0.0.1", b"new".to_vec())
            .await
            .expect("new publish"),
        b"new"
    );

    // Remove it again.
    hub.running
        .reload(load(&hub.config_text))
        .expect("reload removes");
    wait_for(
        "the removed listener to close",
        Duration::from_secs(5),
        || std::net::TcpStream::connect(extra_addr).is_err(),
    )
    .await;

    long.write_all(b"two").await.expect("write");
    long.read_exact(&mut b)
        .await
        .expect("the unrelated relay survived both reloads");
    assert_eq!(&b, b"two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_assessment_cuts_running_relays_and_refuses_new_ones() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let echo_b = echo("127.0.2.10").await;
    let (hub, edge) = hub_and_edge(
        &pki,
        2,
        ("echo", echo_b.addr, "\"extranet\"", None, None),
        None,
    )
    .await;
    let mut long = tokio::net::TcpStream::connect(hub.publish[0])
        .await
        .expect("connect");
    long.write_all(b"ping").await.expect("write");
    let mut b = [0u8; 4];
    long.read_exact(&mut b).await.expect("echo before expiry");

    // The test assessments end on 2099-12-31: move the edge's calendar past it.
    let ctx = edge.running.ctx();
    let end: gateway_core::units::Date = "2099-12-31".parse().expect("date");
    ctx.set_clock_offset_days(ctx.today().days_until(end) + 1);
    assert_eq!(ctx.recheck_assessments(), vec!["lab".to_owned()]);
    assert!(ctx.recheck_assessments().is_empty(), "reported once");

    let mut rest = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(5), long.read_to_end(&mut rest))
        .await
        .expect("the running relay ends");
    assert!(cut.is_err() || rest.is_empty(), "{cut:?} {rest:?}");
    let new = round_trip(hub.publish[0], "127.0.0.1", b"after expiry".to_vec()).await;
    assert!(new.as_ref().map_or(true, Vec::is_empty), "{new:?}");
    wait_for("the expiry in the audit", Duration::from_secs(5), || {
        let lines = audit_lines(edge.state.path());
        lines
            .iter()
            .any(|l| l.starts_with("zone.stop") && l.contains("[R3.assessment-expired]"))
            && lines
                .iter()
                .any(|l| l.starts_with("relay.refuse") && l.contains("[R3.assessment-expired]"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_capped_service_still_delivers_intact() {
    let pki = Pki::new();
    let echo_b = echo("127.0.2.10").await;
    let (hub, _edge) = hub_and_edge(
        &pki,
        2,
        ("echo", echo_b.addr, "\"extranet\"", None, None),
        Some("200Mbit"),
    )
    .await;
    let payload = pattern(8 * MIB, 3);
    let back = round_trip(hub.publish[0], "127.0.0.1", payload.clone())
        .await
        .expect("relay");
    assert!(back == payload, "capped relay corrupted the data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_echo_through_datagrams_with_idle_expiry() {
    let pki = Pki::new();
    let (echo_addr, seen) = udp_echo("127.0.2.10").await;
    let (hub, edge) = hub_and_edge(
        &pki,
        2,
        ("udp-echo", echo_addr, "\"extranet\"", None, None),
        None,
    )
    .await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("client");
    let mut buf = [0u8; 2048];
    for i in 0..20u8 {
        let msg = [b'd', i, 0xAB, 0xCD];
        client.send_to(&msg, hub.publish[0]).await.expect("send");
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("an echo within 5 s")
            .expect("recv");
        assert_eq!((&buf[..n], from), (&msg[..], hub.publish[0]));
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        20,
        "every datagram reached the legacy server once"
    );
    // One flow, expired after 1 s without traffic, audited on both sides.
    wait_for("the idle expiry", Duration::from_secs(10), || {
        audit_lines(edge.state.path()).iter().any(|l| {
            l.starts_with("relay.close") && l.contains("udp flow") && l.contains("end=idle")
        }) && audit_lines(hub.state.path())
            .iter()
            .any(|l| l.starts_with("relay.close") && l.contains("end=expired"))
    })
    .await;
    let opens = audit_lines(edge.state.path())
        .iter()
        .filter(|l| l.starts_with("relay.open"))
        .count();
    assert_eq!(opens, 1, "twenty datagrams from one client are one flow");
    // A reload may not add, drop or move a UDP publish (its socket is bound
    // once): refused with the reason, the running one kept.
    let moved = hub.config_text.replace(
        &format!("listen = \"{}\"", hub.publish[0]),
        "listen = \"127.0.0.1:1\"",
    );
    assert_ne!(moved, hub.config_text);
    let refused = hub
        .running
        .reload(load(&moved))
        .expect_err("a moved UDP publish");
    assert!(refused.to_string().contains("UDP [[publish]]"), "{refused}");
    // After expiry a new datagram opens a new flow.
    client
        .send_to(b"again", hub.publish[0])
        .await
        .expect("send");
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
        .await
        .expect("echo after expiry")
        .expect("recv");
    assert_eq!(&buf[..n], b"again");
}

/// Legacy client of edge-a -> UDP access -> hub -> edge-b -> legacy UDP echo:
/// datagrams pass the hub from one tunnel to the other; edge-b's idle expiry
/// ends the flow at the hub and at edge-a too; every side audits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_echo_through_an_access_gateway_to_gateway() {
    let pki = Pki::new();
    let (echo_addr, seen) = udp_echo("127.0.2.10").await;
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &[])).await;
    let edge_b = start_edge(
        &pki,
        EdgeSpec {
            services: vec![("udp-echo", echo_addr, "\"edge-a\"", None, None)],
            ..EdgeSpec::new("edge-b", 2, 2, vec![hub.quic])
        },
    )
    .await;
    let edge_a = start_edge(
        &pki,
        EdgeSpec {
            accesses: vec!["udp:edge-b/udp-echo"],
            ..EdgeSpec::new("edge-a", 1, 2, vec![hub.quic])
        },
    )
    .await;
    ready(&edge_a).await;
    ready(&edge_b).await;
    let access = edge_a.access[0];
    let client = tokio::net::UdpSocket::bind("127.0.1.5:0")
        .await
        .expect("client");
    let mut buf = [0u8; 2048];
    for i in 0..20u8 {
        let msg = [b'a', i, 0xAB, 0xCD];
        client.send_to(&msg, access).await.expect("send");
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("an echo within 5 s")
            .expect("recv");
        assert_eq!((&buf[..n], from), (&msg[..], access));
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        20,
        "each datagram reached the server once"
    );
    // edge-b expires the flow after 1 s idle; the hub and edge-a follow.
    let closed = |lines: Vec<String>, end: &str| {
        lines
            .iter()
            .any(|l| l.starts_with("relay.close") && l.contains("udp flow") && l.contains(end))
    };
    wait_for(
        "the idle expiry on every side",
        Duration::from_secs(10),
        || {
            closed(audit_lines(edge_b.state.path()), "end=idle")
                && closed(audit_lines(hub.state.path()), "end=expired")
                && closed(audit_lines(edge_a.state.path()), "end=expired")
        },
    )
    .await;
    let hub_lines = audit_lines(hub.state.path());
    assert!(
        hub_lines.iter().any(|l| l.starts_with("relay.open")
            && l.contains("edge-a:127.0.1.5")
            && l.contains("[R0.allow-transit]")),
        "{hub_lines:#?}"
    );
    assert!(
        hub_lines
            .iter()
            .any(|l| l.starts_with("relay.close") && l.contains("bytes_up=80 bytes_down=80")),
        "{hub_lines:#?}"
    );
    let b_lines = audit_lines(edge_b.state.path());
    assert!(
        b_lines.iter().any(|l| l.starts_with("relay.open")
            && l.contains("[R0.allow-service]")
            && l.contains("edge-a:127.0.1.5")),
        "{b_lines:#?}"
    );
    // After expiry a new datagram opens a new flow end to end.
    client.send_to(b"again", access).await.expect("send");
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
        .await
        .expect("echo after expiry")
        .expect("recv");
    assert_eq!(&buf[..n], b"again");
    // A client outside the access's zone is refused at edge-a, with the rule,
    // once: its next datagrams are dropped without an audit record each.
    let outsider = tokio::net::UdpSocket::bind("127.0.0.9:0")
        .await
        .expect("outsider");
    for _ in 0..50 {
        outsider.send_to(b"let me in", access).await.expect("send");
    }
    // A datagram from inside the zone after the 50, to know they were all read.
    client.send_to(b"marker", access).await.expect("send");
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
        .await
        .expect("echo of the marker")
        .expect("recv");
    assert_eq!(&buf[..n], b"marker");
    let refusals = || {
        audit_lines(edge_a.state.path())
            .iter()
            .filter(|l| l.starts_with("relay.refuse") && l.contains("127.0.0.9"))
            .count()
    };
    wait_for(
        "the refusal in edge-a's audit",
        Duration::from_secs(5),
        || refusals() > 0,
    )
    .await;
    assert_eq!(refusals(), 1, "one audit record for 50 refused datagrams");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), outsider.recv_from(&mut buf))
            .await
            .is_err(),
        "no answer to a refused client"
    );
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("admin");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_tunnel_and_healthz_answers() {
    let pki = Pki::new();
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &[])).await;
    let edge = start_edge(
        &pki,
        EdgeSpec {
            ..EdgeSpec::new("edge-b", 2, 2, vec![hub.quic])
        },
    )
    .await;
    ready(&edge).await;
    let admin = edge.running.admin_addr;
    assert!(
        http_get(admin, "/healthz")
            .await
            .starts_with("HTTP/1.0 200")
    );
    let up = http_get(admin, "/readyz").await;
    assert!(
        up.starts_with("HTTP/1.0 200") && up.contains("a hub tunnel is up"),
        "{up}"
    );
    hub.running.drain(Duration::from_millis(50)).await;
    wait_for(
        "the edge to notice the hub is gone",
        Duration::from_secs(10),
        || !edge.running.ready(),
    )
    .await;
    let down = http_get(admin, "/readyz").await;
    assert!(down.starts_with("HTTP/1.0 503"), "{down}");
    let metrics = http_get(admin, "/metrics").await;
    assert!(
        metrics.contains("gateway_tunnel_up{peer=") && metrics.contains("} 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_by_the_legacy_server_reaches_the_client_as_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    // A legacy server that reads one request and answers with a TCP reset.
    let rst = tokio::net::TcpListener::bind("127.0.2.10:0")
        .await
        .expect("bind");
    let rst_addr = rst.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = rst.accept().await {
            let mut b = [0u8; 4];
            let _ = s.read_exact(&mut b).await;
            #[allow(deprecated)] // zero linger: close with RST
            let _ = s.set_linger(Some(Duration::ZERO));
            drop(s);
        }
    });
    let (hub, edge) =
        hub_and_edge(&pki, 2, ("rst", rst_addr, "\"extranet\"", None, None), None).await;
    let mut c = tokio::net::TcpStream::connect(hub.publish[0])
        .await
        .expect("connect");
    c.write_all(b"ping").await.expect("write");
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out))
        .await
        .expect("the relay ends");
    let e = r.expect_err("a reset, not a clean end of stream");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    wait_for("the reset in the audit", Duration::from_secs(5), || {
        audit_lines(edge.state.path())
            .iter()
            .any(|l| l.starts_with("relay.close") && l.contains("end=reset"))
    })
    .await;
}

/// One client address gets at most 64 TCP connections through a publish and
/// 256 UDP flows; the ones over are refused, audited once per address and
/// 10 s, never per connection or datagram; the others keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_64_connections_and_256_udp_flows() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let pki = Pki::new();
    let tcp_echo = echo("127.0.2.10").await;
    let (hub, edge) = hub_and_edge(
        &pki,
        2,
        ("echo", tcp_echo.addr, "\"extranet\"", None, None),
        None,
    )
    .await;
    let mut held = Vec::new();
    for i in 0..64u32 {
        let mut s = tokio::net::TcpStream::connect(hub.publish[0])
            .await
            .expect("connect");
        let msg = i.to_be_bytes();
        s.write_all(&msg).await.expect("write");
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.expect("echo");
        assert_eq!(back, msg);
        held.push(s);
    }
    let mut refused = 0;
    for _ in 0..20 {
        // Reset at once: the connect itself, or the first read, says so.
        let Ok(mut s) = tokio::net::TcpStream::connect(hub.publish[0]).await else {
            refused += 1;
            continue;
        };
        let _ = s.write_all(b"over").await;
        let mut back = [0u8; 4];
        let got = tokio::time::timeout(Duration::from_secs(5), s.read(&mut back)).await;
        if matches!(got, Ok(Ok(0)) | Ok(Err(_))) {
            refused += 1;
        }
    }
    assert_eq!(
        refused, 20,
        "the connections over 64 from one address are refused"
    );
    // The 64 still echo.
    for s in held.iter_mut().take(3) {
        s.write_all(b"ping").await.expect("write");
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.expect("still echoes");
    }
    wait_for(
        "the cap refusal in the hub's audit",
        Duration::from_secs(5),
        || {
            audit_lines(hub.state.path()).iter().any(|l| {
                l.starts_with("listener.refuse 127.0.0.1 listener deny")
                    && l.contains("64 connections")
            })
        },
    )
    .await;
    let records = audit_lines(hub.state.path())
        .iter()
        .filter(|l| l.starts_with("listener.refuse"))
        .count();
    assert!(records <= 2, "{records} records for 20 refusals");
    drop((held, edge));

    // UDP: 300 source ports of one address through a UDP publish.
    let pki = Pki::new();
    let (echo_addr, seen) = udp_echo("127.0.2.10").await;
    let (hub, edge) = hub_and_edge(
        &pki,
        2,
        ("udp-echo", echo_addr, "\"extranet\"", None, None),
        None,
    )
    .await;
    let mut sockets = Vec::new();
    for _ in 0..300 {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        s.send_to(b"hi", hub.publish[0]).await.expect("send");
        sockets.push(s);
    }
    poll(
        "256 flows at the legacy server",
        Duration::from_secs(10),
        || async {
            // Loopback may drop a datagram of a burst, as UDP may.
            let n = seen.load(Ordering::SeqCst);
            if n >= 250 {
                Ok(())
            } else {
                Err(format!(
                    "{n} datagrams; hub: {:#?}",
                    audit_lines(hub.state.path())
                        .into_iter()
                        .filter(|l| !l.starts_with("relay.open"))
                        .collect::<Vec<_>>()
                ))
            }
        },
    )
    .await;
    let opens = || {
        audit_lines(edge.state.path())
            .iter()
            .filter(|l| l.starts_with("relay.open"))
            .count()
    };
    wait_for("the flows opened", Duration::from_secs(5), || {
        opens() >= 256
    })
    .await;
    assert_eq!(opens(), 256, "one address keeps 256 flows");
    let refusals = || {
        audit_lines(hub.state.path())
            .iter()
            .filter(|l| l.starts_with("listener.refuse") && l.contains("UDP flows"))
            .count()
    };
    // The refusals are written by the audit writer, maybe after the opens.
    wait_for("the cap's refusal record", Duration::from_secs(5), || {
        refusals() >= 1
    })
    .await;
    let refusals = refusals();
    assert!(
        (1..=2).contains(&refusals),
        "{refusals} records for 44 refused flows"
    );
}
