//! Pipes on real sockets: a hub's lane and an edge's lane on loopback UDP
//! sockets, both driven by one task as a relay's lanes are, with TCP clients
//! on the hub side and a TCP service on the edge side.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn_proto::{ConnectionHandle, Dir, StreamEvent, StreamId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::{MAX_TO_TCP, Pipes, READ};
use crate::tunnel::lane::{Admit, Lane, LaneEvent, Socket};
use crate::tunnel::tls;

/// One side of the relay: its lane, socket and pipes.
struct Side {
    lane: Lane,
    socket: Socket,
    pipes: Pipes,
    conn: Option<ConnectionHandle>,
}

impl Side {
    fn new(endpoint: quinn_proto::EndpointConfig, server: Option<quinn::ServerConfig>) -> Self {
        let socket =
            Socket::new(std::net::UdpSocket::bind("127.0.0.1:0").expect("bind")).expect("socket");
        let lane = Lane::new(Arc::new(endpoint), server, 4, socket.batch());
        Side {
            lane,
            socket,
            pipes: Pipes::new(64),
            conn: None,
        }
    }

    /// Reads, runs timers, hands events to the pipes; the rest returned.
    fn turn(&mut self, now: Instant) -> Vec<LaneEvent> {
        self.socket
            .read_into(&mut self.lane, now, &mut |_| Admit::Accept)
            .expect("read");
        self.lane.handle_timeouts(now);
        self.lane.poll_events();
        let mut rest = Vec::new();
        while let Some(e) = self.lane.event() {
            if let LaneEvent::Connected(h) = e {
                self.conn = Some(h);
            }
            if !self.pipes.on_event(&mut self.lane, &e) {
                rest.push(e);
            }
        }
        self.pipes.drive_woken(&mut self.lane);
        rest
    }

    fn transmit(&mut self, now: Instant) {
        let socket = &self.socket;
        self.lane.poll(now, &mut |t, d| socket.send(t, d));
    }
}

/// What a test asks of the running relay.
enum Ask {
    /// Close the edge's connection (as a revoked or stopping edge does).
    CloseEdge,
}

/// A running relay: TCP clients connect to `front`, the edge dials the
/// test's service; the most bytes ever held in the edge's pipes.
struct Relay {
    front: SocketAddr,
    ask: mpsc::UnboundedSender<Ask>,
    most_buffered: Arc<AtomicUsize>,
}

/// Starts both lanes and the relay's loop on the current task's runtime.
async fn relay(dir: &std::path::Path, target: SocketAddr) -> Relay {
    let (server, client) = tls::test_pair(dir, "hub.test");
    std::fs::create_dir_all(dir.join("hub")).expect("dir");
    let mut hub = Side::new(
        tls::hub_endpoint_config(&dir.join("hub")).expect("endpoint"),
        Some(server),
    );
    let mut edge = Side::new(tls::edge_endpoint_config(), None);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("listen");
    let front = listener.local_addr().expect("addr");
    let to = hub.socket.local_addr().expect("addr");
    let e = edge
        .lane
        .connect(Instant::now(), client, to, "hub.test")
        .expect("connect");
    let (ask, mut asks) = mpsc::unbounded_channel();
    let most_buffered = Arc::new(AtomicUsize::new(0));
    let most = most_buffered.clone();
    let (dialled_tx, mut dialled) = mpsc::unbounded_channel::<(StreamId, TcpStream)>();
    tokio::spawn(async move {
        loop {
            let now = Instant::now();
            hub.transmit(now);
            edge.transmit(now);
            let wait = [hub.lane.next_timeout(), edge.lane.next_timeout()]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or_else(|| now + Duration::from_secs(1));
            let (mut accepted, mut dial, mut asked) = (None, None, None);
            tokio::select! {
                r = hub.socket.readable() => r.expect("hub socket"),
                r = edge.socket.readable() => r.expect("edge socket"),
                r = hub.socket.writable(), if hub.lane.blocked() => r.expect("hub socket"),
                r = edge.socket.writable(), if edge.lane.blocked() => r.expect("edge socket"),
                () = hub.pipes.woken() => {}
                () = edge.pipes.woken() => {}
                r = listener.accept() => accepted = Some(r.expect("accept").0),
                d = dialled.recv() => dial = d,
                a = asks.recv() => asked = a,
                () = tokio::time::sleep_until(wait.into()) => {}
            }
            let now = Instant::now();
            hub.turn(now);
            for ev in edge.turn(now) {
                if let LaneEvent::Stream(_, StreamEvent::Opened { .. }) = ev {
                    let conn = edge.lane.conn(e).expect("edge connection");
                    while let Some(id) = conn.streams().accept(Dir::Bi) {
                        let tx = dialled_tx.clone();
                        tokio::spawn(async move {
                            let tcp = TcpStream::connect(target).await.expect("dial");
                            let _ = tx.send((id, tcp));
                        });
                    }
                }
            }
            if let Some(tcp) = accepted {
                // Before the tunnel is up a client is reset (it asks again).
                let opened = hub
                    .conn
                    .and_then(|h| Some((h, hub.lane.conn(h)?.streams().open(Dir::Bi)?)));
                match opened {
                    Some((h, id)) => hub
                        .pipes
                        .attach(&mut hub.lane, h, id, tcp, Bytes::new())
                        .expect("room"),
                    None => crate::relay::listen::reset_tcp(&tcp),
                }
            }
            if let Some((id, tcp)) = dial {
                edge.pipes
                    .attach(&mut edge.lane, e, id, tcp, Bytes::new())
                    .expect("room");
            }
            if let Some(Ask::CloseEdge) = asked {
                if let Some(c) = edge.lane.conn(e) {
                    c.close(now, quinn_proto::VarInt::from_u32(0), Bytes::new());
                }
                edge.pipes.lost(&mut edge.lane, e);
            }
            for _ in hub.pipes.ended() {}
            for _ in edge.pipes.ended() {}
            most.fetch_max(edge.pipes.buffered(), Ordering::Relaxed);
        }
    });
    Relay {
        front,
        ask,
        most_buffered,
    }
}

/// A client connected through the relay once the edge is up.
async fn client(relay: &Relay) -> TcpStream {
    // The hub opens a stream only on a connected tunnel: wait for it by
    // asking until a connection is carried (the first may come too early).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut tcp = TcpStream::connect(relay.front).await.expect("connect");
        tcp.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        match tokio::time::timeout(Duration::from_secs(2), tcp.read_exact(&mut got)).await {
            Ok(Ok(_)) if &got == b"ping" => return tcp,
            _ => assert!(Instant::now() < deadline, "the relay never carried a ping"),
        }
    }
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// A service that answers "ping" with "ping", then does what `then` does.
async fn service<F, Fut>(then: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("listen");
    let addr = listener.local_addr().expect("addr");
    let then = Arc::new(then);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let then = then.clone();
            tokio::spawn(async move {
                let mut ping = [0u8; 4];
                if tcp.read_exact(&mut ping).await.is_ok() && tcp.write_all(&ping).await.is_ok() {
                    then(tcp).await;
                }
            });
        }
    });
    addr
}

fn within<F: std::future::Future>(secs: u64, f: F) -> tokio::time::Timeout<F> {
    tokio::time::timeout(Duration::from_secs(secs), f)
}

/// 1 MiB up, the client half-closes, the service reads to the end and sends
/// 1 MiB back, then closes: both ends see each other's end of data and
/// every byte arrives in order.
#[tokio::test(flavor = "current_thread")]
async fn a_megabyte_each_way_with_half_close_propagated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = service(|mut tcp| async move {
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).await.expect("read to end");
        assert!(got == data(1 << 20), "the service got the client's bytes");
        tcp.write_all(&data(1 << 20)).await.expect("write back");
    })
    .await;
    let relay = relay(dir.path(), target).await;
    let mut tcp = client(&relay).await;
    within(30, async {
        tcp.write_all(&data(1 << 20)).await.expect("write");
        tcp.shutdown().await.expect("half-close");
        let mut back = Vec::new();
        tcp.read_to_end(&mut back)
            .await
            .expect("read to the service's end");
        assert!(back == data(1 << 20), "the client got the service's bytes");
    })
    .await
    .expect("done within 30 s");
}

/// A service that resets its connection (when the client asks): the
/// client sees a reset, not an orderly end.
#[tokio::test(flavor = "current_thread")]
async fn a_reset_on_one_side_resets_the_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = service(|mut tcp| async move {
        let mut go = [0u8; 1];
        let _ = tcp.read_exact(&mut go).await;
        crate::relay::listen::reset_tcp(&tcp);
        drop(tcp);
    })
    .await;
    let relay = relay(dir.path(), target).await;
    let mut tcp = client(&relay).await;
    tcp.write_all(b"x").await.expect("write");
    let mut buf = [0u8; 16];
    let got = within(10, tcp.read(&mut buf)).await.expect("an answer");
    assert_eq!(
        got.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the client is reset"
    );
}

/// The tunnel goes down under a relay: the client is reset.
#[tokio::test(flavor = "current_thread")]
async fn a_lost_tunnel_resets_its_relays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = service(|mut tcp| async move {
        let mut sink = Vec::new();
        let _ = tcp.read_to_end(&mut sink).await;
    })
    .await;
    let relay = relay(dir.path(), target).await;
    let mut tcp = client(&relay).await;
    relay.ask.send(Ask::CloseEdge).expect("relay running");
    let mut buf = [0u8; 16];
    let got = within(20, tcp.read(&mut buf)).await.expect("an answer");
    assert_eq!(
        got.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the client is reset when the tunnel closes"
    );
}

/// A service that does not read: the client's writes stall (the pipes,
/// QUIC's windows and TCP's hold it) while the edge's pipe holds at most
/// its bound; once the service reads, everything arrives.
#[tokio::test(flavor = "current_thread")]
async fn a_slow_service_holds_the_client_back_within_the_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let (count_tx, mut count_rx) = mpsc::unbounded_channel();
    let target = service(move |mut tcp| {
        let (mut go, count) = (go_rx.clone(), count_tx.clone());
        async move {
            let _ = go.wait_for(|g| *g).await;
            let mut n = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(k @ 1..) = tcp.read(&mut buf).await {
                n += k;
            }
            let _ = count.send(n);
        }
    })
    .await;
    let relay = relay(dir.path(), target).await;
    let mut tcp = client(&relay).await;
    let chunk = vec![7u8; 64 * 1024];
    let mut sent = 0usize;
    // Write until a write waits a second: the whole path is full.
    while within(1, tcp.write_all(&chunk)).await.is_ok() {
        sent += chunk.len();
        assert!(
            sent < 256 << 20,
            "256 MiB went into a service that reads nothing"
        );
    }
    let most = relay.most_buffered.load(Ordering::Relaxed);
    assert!(
        most <= MAX_TO_TCP + READ,
        "the edge's pipe held {most} bytes, more than its bound"
    );
    go_tx.send(true).expect("service");
    // The stalled write finishes once the service reads (its bytes count).
    within(30, tcp.write_all(&chunk))
        .await
        .expect("unblocked")
        .expect("write");
    sent += chunk.len();
    tcp.shutdown().await.expect("close");
    let got = within(30, count_rx.recv())
        .await
        .expect("counted")
        .expect("count");
    // The stalled write had put part of its chunk in before it waited.
    assert!(
        got >= sent && got <= sent + chunk.len(),
        "the service got {got} of {sent} bytes"
    );
}
