//! Every HTTP listener has limits (a hub and an edge on loopback): request
//! headers within 10 s, so slowloris and silent connections end; at most 64
//! connections per source address, the one over closed at once and audited
//! once, not per connection.

mod net;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use net::*;

/// Connects from where a client of `addr` would (the zone for ingest).
fn connect(addr: SocketAddr) -> TcpStream {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    if let Some(src) = source_for(addr) {
        sock.bind(&SocketAddr::new(src, 0).into()).expect("bind");
    }
    sock.connect(&addr.into()).expect("connect");
    sock.into()
}

/// Sends `GET /` one byte a second; returns how long the server kept it.
fn slowloris(addr: SocketAddr) -> Duration {
    let mut s = connect(addr);
    s.set_read_timeout(Some(Duration::from_millis(1000)))
        .expect("timeout");
    let started = Instant::now();
    let mut buf = [0u8; 512];
    for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
        .iter()
        .cycle()
    {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => break, // an answer (408) ends it too
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
        assert!(started.elapsed() < Duration::from_secs(40), "never closed");
    }
    started.elapsed()
}

/// Opens a connection and sends nothing; returns how long the server kept it.
fn silent(addr: SocketAddr) -> Duration {
    let mut s = connect(addr);
    s.set_read_timeout(Some(Duration::from_secs(40)))
        .expect("timeout");
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let _ = s.read(&mut buf);
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_clients_are_cut_and_one_address_gets_64_connections() {
    let pki = Pki::new();
    let hub = start_hub(&pki, HubSpec::new("hub-01", 2, &[])).await;
    let edge = start_edge(
        &pki,
        EdgeSpec {
            extra: "\n[[channel]]\nname = \"readings\"\nzone = \"lab\"\nformats = [\"json\"]\nmax_record_bytes = \"4KiB\"\n",
            ingest: true,
            ..EdgeSpec::new("edge-b", 2, 2, vec![hub.quic])
        },
    )
    .await;
    let targets = [
        ("ingest", edge.ingest.expect("ingest")),
        ("edge admin", edge.running.admin_addr),
        ("hub API (TLS)", hub.api),
        ("hub admin", hub.running.admin_addr),
    ];
    // Slowloris and silent connections on every listener at once.
    let mut probes = Vec::new();
    for (what, addr) in targets {
        for _ in 0..5 {
            probes.push((
                what,
                "slowloris",
                std::thread::spawn(move || slowloris(addr)),
            ));
            probes.push((what, "silent", std::thread::spawn(move || silent(addr))));
        }
    }
    let mut worst = Duration::ZERO;
    for (what, kind, p) in probes {
        let held = p.join().expect("probe");
        assert!(
            held <= Duration::from_secs(16),
            "{what}: a {kind} connection held {held:?}"
        );
        worst = worst.max(held);
    }
    println!("the longest a slow or silent connection was held: {worst:?}");

    // 64 connections from one address; the 65th and after are closed at once.
    let admin = edge.running.admin_addr;
    let held: Vec<TcpStream> = (0..64).map(|_| connect(admin)).collect();
    // The server accepts in the order the kernel queued them: these first.
    let mut refused = 0;
    for _ in 0..10 {
        let mut s = connect(admin);
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut buf = [0u8; 8];
        if matches!(s.read(&mut buf), Ok(0) | Err(_)) {
            refused += 1;
        }
    }
    assert!(refused >= 9, "{refused} of 10 over the cap were closed");
    wait_for(
        "the cap refusal in the audit",
        Duration::from_secs(5),
        || {
            audit_lines(edge.state.path()).iter().any(|l| {
                l.starts_with("listener.refuse 127.0.0.1 listener deny")
                    && l.contains("64 connections")
            })
        },
    )
    .await;
    let records = audit_lines(edge.state.path())
        .iter()
        .filter(|l| l.starts_with("listener.refuse"))
        .count();
    assert!(records <= 2, "{records} audit records for 10 refusals");
    drop(held);
}
