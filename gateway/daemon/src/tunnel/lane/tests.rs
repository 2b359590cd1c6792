//! An edge's lane and a hub's lane over a simulated network, in virtual
//! time: the tunnel's own certificates, TLS and transport settings, with
//! loss, a 1,500-byte path, a silent peer and a restarted hub. No socket and
//! no clock: every run is the same run.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{ConnectionError, ConnectionHandle, Dir, StreamEvent, StreamId};
use rand::{Rng as _, SeedableRng as _};

use super::{Admit, Lane, LaneEvent};
use crate::tunnel::tls;

const EDGE: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)),
    40000,
);
const HUB: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)),
    4433,
);
/// The largest UDP payload a 1,500-byte IPv4 path carries.
const PATH_PAYLOAD: usize = 1472;

/// A datagram in flight: when it lands, where, from where.
type InFlight = Reverse<(Instant, u64, SocketAddr, SocketAddr, Vec<u8>)>;

/// The network between the two lanes, and the clock.
struct Net {
    now: Instant,
    flight: BinaryHeap<InFlight>,
    seq: u64,
    /// One-way delay.
    delay: Duration,
    /// Share of datagrams lost, each way.
    loss: f64,
    /// The largest payload that crosses (larger ones are dropped, as a
    /// router does with DF set).
    mtu: usize,
    rng: rand::rngs::StdRng,
    /// Datagrams sent and lost.
    sent: u64,
    lost: u64,
    too_big: u64,
    /// QUIC v1 Retry packets sent (long header, type 3).
    retries: u64,
}

impl Net {
    fn new(loss: f64) -> Self {
        Net {
            now: Instant::now(),
            flight: BinaryHeap::new(),
            seq: 0,
            delay: Duration::from_millis(5),
            loss,
            mtu: PATH_PAYLOAD,
            rng: rand::rngs::StdRng::seed_from_u64(21),
            sent: 0,
            lost: 0,
            too_big: 0,
            retries: 0,
        }
    }

    fn send(&mut self, from: SocketAddr, t: &quinn_proto::Transmit, data: &[u8]) {
        let size = t.segment_size.unwrap_or(data.len()).max(1);
        for d in data.chunks(size) {
            self.sent += 1;
            self.retries += u64::from(d.first().is_some_and(|b| b & 0xf0 == 0xf0));
            let too_big = d.len() > self.mtu;
            self.too_big += u64::from(too_big);
            if too_big || self.rng.random_bool(self.loss) {
                self.lost += 1;
                continue;
            }
            self.seq += 1;
            let at = self.now + self.delay;
            self.flight
                .push(Reverse((at, self.seq, t.destination, from, d.to_vec())));
        }
    }
}

/// The two lanes and their network.
struct World {
    net: Net,
    edge: Lane,
    hub: Lane,
    /// Events seen, by side.
    edge_events: Vec<LaneEvent>,
    hub_events: Vec<LaneEvent>,
    admit: Admit,
    _dir: tempfile::TempDir,
    client: quinn_proto::ClientConfig,
    hub_state: std::path::PathBuf,
    server: quinn_proto::ServerConfig,
}

impl World {
    fn new(loss: f64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, client) = tls::test_pair(dir.path(), "hub.test");
        let hub_state = dir.path().join("hub");
        std::fs::create_dir_all(&hub_state).expect("state dir");
        let hub = Lane::new(
            Arc::new(tls::hub_endpoint_config(&hub_state).expect("endpoint")),
            Some(server.clone()),
            16,
            1,
        );
        let edge = Lane::new(Arc::new(tls::edge_endpoint_config()), None, 16, 1);
        World {
            net: Net::new(loss),
            edge,
            hub,
            edge_events: Vec::new(),
            hub_events: Vec::new(),
            admit: Admit::Accept,
            _dir: dir,
            client,
            hub_state,
            server,
        }
    }

    /// The hub process starts again: a new lane, the same reset key.
    fn restart_hub(&mut self) {
        self.hub = Lane::new(
            Arc::new(tls::hub_endpoint_config(&self.hub_state).expect("endpoint")),
            Some(self.server.clone()),
            16,
            1,
        );
        self.hub_events.clear();
    }

    fn connect(&mut self) -> ConnectionHandle {
        let now = self.net.now;
        self.edge
            .connect(now, self.client.clone(), HUB, "hub.test")
            .expect("connect")
    }

    /// Polls both lanes, then moves the clock to the next datagram or
    /// timer and handles it. False when nothing is left to happen.
    fn turn(&mut self) -> bool {
        let now = self.net.now;
        let net = &mut self.net;
        self.edge.poll(now, &mut |t, d| {
            net.send(EDGE, t, d);
            true
        });
        self.hub.poll(now, &mut |t, d| {
            net.send(HUB, t, d);
            true
        });
        while let Some(e) = self.edge.event() {
            self.edge_events.push(e);
        }
        while let Some(e) = self.hub.event() {
            self.hub_events.push(e);
        }
        let next_datagram = self.net.flight.peek().map(|Reverse((t, ..))| *t);
        let next = [
            next_datagram,
            self.edge.next_timeout(),
            self.hub.next_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(next) = next else { return false };
        self.net.now = self.net.now.max(next);
        let now = self.net.now;
        while let Some(Reverse((t, ..))) = self.net.flight.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((_, _, to, from, data))) = self.net.flight.pop() else {
                break;
            };
            let admit = self.admit;
            let lane = if to == HUB {
                &mut self.hub
            } else {
                &mut self.edge
            };
            lane.receive(now, from, BytesMut::from(&data[..]), &mut |_| admit);
        }
        self.edge.handle_timeouts(now);
        self.hub.handle_timeouts(now);
        true
    }

    /// Turns until `done` holds, at most `limit` of virtual time.
    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&mut World) -> bool) -> bool {
        let end = self.net.now + limit;
        while self.net.now <= end {
            if done(self) {
                return true;
            }
            if !self.turn() {
                return done(self);
            }
        }
        false
    }

    fn connected(events: &[LaneEvent]) -> Option<ConnectionHandle> {
        events.iter().find_map(|e| match e {
            LaneEvent::Connected(h) => Some(*h),
            _ => None,
        })
    }

    fn lost(events: &[LaneEvent]) -> Option<&ConnectionError> {
        events.iter().find_map(|e| match e {
            LaneEvent::Lost(_, r) => Some(r),
            _ => None,
        })
    }

    /// Connects and returns (edge's handle, hub's handle).
    fn up(&mut self) -> (ConnectionHandle, ConnectionHandle) {
        let e = self.connect();
        assert!(
            self.run_until(Duration::from_secs(10), |w| {
                Self::connected(&w.edge_events).is_some()
                    && Self::connected(&w.hub_events).is_some()
            }),
            "the handshake completes"
        );
        (e, Self::connected(&self.hub_events).expect("hub side"))
    }
}

/// Everything readable on `id`, appended to `out`; true when the stream
/// finished.
fn read_all(lane: &mut Lane, h: ConnectionHandle, id: StreamId, out: &mut Vec<u8>) -> bool {
    let Some(conn) = lane.conn(h) else {
        return false;
    };
    let mut stream = conn.recv_stream(id);
    let Ok(mut chunks) = stream.read(true) else {
        return false;
    };
    let mut fin = false;
    loop {
        match chunks.next(usize::MAX) {
            Ok(Some(c)) => out.extend_from_slice(&c.bytes),
            Ok(None) => {
                fin = true;
                break;
            }
            Err(_) => break,
        }
    }
    let _ = chunks.finalize();
    fin
}

/// Sends `data` from the edge on a new stream, the hub echoes it back, and
/// the edge reads it to the end: the bytes and the virtual time it took.
fn echo(
    w: &mut World,
    (e, h): (ConnectionHandle, ConnectionHandle),
    data: &[u8],
) -> (Vec<u8>, Duration) {
    let start = w.net.now;
    let id = w
        .edge
        .conn(e)
        .expect("edge conn")
        .streams()
        .open(Dir::Bi)
        .expect("a stream");
    let mut written = 0;
    let mut finished = false;
    let mut at_hub: Option<StreamId> = None;
    let mut hub_got = Vec::new();
    let mut hub_written = 0;
    let mut hub_finished = false;
    let mut back = Vec::new();
    let done = w.run_until(Duration::from_secs(120), |w| {
        // The edge writes what the stream takes, then finishes it.
        if let Some(conn) = w.edge.conn(e) {
            let mut s = conn.send_stream(id);
            if written < data.len() {
                if let Ok(n) = s.write(&data[written..]) {
                    written += n;
                }
            }
            if written == data.len() && !finished {
                finished = s.finish().is_ok();
            }
        }
        // The hub accepts it, reads it all, writes it back.
        if at_hub.is_none() {
            at_hub = w.hub.conn(h).and_then(|c| c.streams().accept(Dir::Bi));
        }
        if let Some(hid) = at_hub {
            let fin = read_all(&mut w.hub, h, hid, &mut hub_got);
            if let Some(conn) = w.hub.conn(h) {
                let mut s = conn.send_stream(hid);
                if hub_written < hub_got.len() {
                    if let Ok(n) = s.write(&hub_got[hub_written..]) {
                        hub_written += n;
                    }
                }
                if fin && hub_written == hub_got.len() && !hub_finished {
                    hub_finished = s.finish().is_ok();
                }
            }
        }
        read_all(&mut w.edge, e, id, &mut back)
    });
    assert!(done, "the echo of {} bytes ends within 120 s", data.len());
    (back, w.net.now - start)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn a_tunnel_handshake_with_mutual_tls_completes_and_a_stream_echoes() {
    let mut w = World::new(0.0);
    let pair = w.up();
    let peer = w
        .hub
        .conn(pair.1)
        .and_then(|c| c.crypto_session().peer_identity())
        .and_then(|any| {
            any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .expect("the edge presented a certificate");
    assert_eq!(peer.len(), 1, "one certificate, the edge's");
    let data = pattern(200_000);
    let (back, took) = echo(&mut w, pair, &data);
    assert!(back == data, "the echo is the bytes sent");
    assert!(
        took < Duration::from_secs(2),
        "200 kB at 5 ms each way took {took:?}"
    );
    // Path MTU discovery probed above the 1,500-byte path (those probes
    // were dropped, as a router drops them) and stayed within it.
    let mtu = w.edge.conn(pair.0).expect("edge").stats().path.current_mtu;
    assert!((1200..=1472).contains(&usize::from(mtu)), "path MTU {mtu}");
    assert_eq!(
        w.net.lost, w.net.too_big,
        "no loss but the oversized probes"
    );
}

#[test]
fn streams_arrive_whole_through_ten_percent_loss() {
    let mut w = World::new(0.10);
    let pair = w.up();
    let data = pattern(1 << 20);
    let (back, took) = echo(&mut w, pair, &data);
    assert!(back == data, "1 MiB arrives whole and in order, both ways");
    assert!(
        w.net.lost > 50,
        "the network did lose datagrams: {}",
        w.net.lost
    );
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

#[test]
fn keep_alives_hold_an_idle_tunnel_and_a_silent_peer_is_noticed_within_the_idle_timeout() {
    let mut w = World::new(0.0);
    w.up();
    // A minute with nothing to send: the edge's keep-alives hold it.
    let quiet = w.run_until(Duration::from_secs(60), |_| false);
    assert!(!quiet);
    assert!(
        World::lost(&w.edge_events).is_none(),
        "idle, not lost: {:?}",
        World::lost(&w.edge_events)
    );
    assert!(
        World::lost(&w.hub_events).is_none(),
        "idle, not lost at the hub"
    );
    // The path goes dark: both ends give up within the idle timeout.
    w.net.loss = 1.0;
    let dark = w.net.now;
    assert!(
        w.run_until(tls::IDLE_TIMEOUT + Duration::from_secs(1), |w| {
            World::lost(&w.edge_events).is_some() && World::lost(&w.hub_events).is_some()
        })
    );
    assert!(matches!(
        World::lost(&w.edge_events),
        Some(ConnectionError::TimedOut)
    ));
    assert!(w.net.now - dark <= tls::IDLE_TIMEOUT + Duration::from_secs(1));
    // And their state goes.
    assert!(w.run_until(Duration::from_secs(30), |w| w.edge.is_empty()
        && w.hub.is_empty()));
}

#[test]
fn a_restarted_hub_resets_the_old_tunnel_at_once() {
    let mut w = World::new(0.0);
    let (e, _) = w.up();
    w.restart_hub();
    let at = w.net.now;
    // The edge's next packet (its keep-alive) meets a hub that does not
    // know the connection: the stateless reset ends it, no idle wait.
    let _ = w.edge.conn(e).map(|c| c.ping());
    assert!(w.run_until(Duration::from_secs(5), |w| {
        World::lost(&w.edge_events).is_some()
    }));
    assert!(
        matches!(World::lost(&w.edge_events), Some(ConnectionError::Reset)),
        "{:?}",
        World::lost(&w.edge_events)
    );
    assert!(w.net.now - at < tls::IDLE_TIMEOUT);
}

#[test]
fn a_full_lane_refuses_and_retry_proves_the_address_first() {
    let mut w = World::new(0.0);
    w.admit = Admit::Retry;
    w.up();
    assert_eq!(
        w.net.retries, 1,
        "the handshake was retried once, then accepted"
    );
    let mut small = Lane::new(
        Arc::new(tls::hub_endpoint_config(&w.hub_state).expect("endpoint")),
        Some(w.server.clone()),
        0,
        1,
    );
    std::mem::swap(&mut w.hub, &mut small);
    let second = w.connect();
    let lost = |w: &World| {
        w.edge_events.iter().find_map(|e| match e {
            LaneEvent::Lost(h, r) if *h == second => Some(r.clone()),
            _ => None,
        })
    };
    assert!(w.run_until(Duration::from_secs(5), |w| lost(w).is_some()));
    assert!(
        matches!(lost(&w), Some(ConnectionError::ConnectionClosed(c)) if c.error_code == quinn_proto::TransportErrorCode::CONNECTION_REFUSED),
        "{:?}",
        lost(&w)
    );
    assert!(w.hub.is_empty(), "a refusal keeps no state");
}

#[test]
fn datagrams_cross_both_ways() {
    let mut w = World::new(0.0);
    let (e, h) = w.up();
    let sent = Bytes::from_static(b"a UDP flow's datagram");
    w.edge
        .conn(e)
        .expect("edge")
        .datagrams()
        .send(sent.clone(), true)
        .expect("send");
    let mut got = None;
    assert!(w.run_until(Duration::from_secs(2), |w| {
        if got.is_none() {
            got = w.hub.conn(h).and_then(|c| c.datagrams().recv());
        }
        got.is_some()
    }));
    assert_eq!(got, Some(sent));
    w.turn();
    assert!(
        w.hub_events
            .iter()
            .any(|e| matches!(e, LaneEvent::Datagrams(_)))
    );
}

#[test]
fn stream_events_say_when_a_peer_opens_one() {
    let mut w = World::new(0.0);
    let (e, _) = w.up();
    let id = w
        .edge
        .conn(e)
        .expect("edge")
        .streams()
        .open(Dir::Bi)
        .expect("stream");
    let _ = w
        .edge
        .conn(e)
        .expect("edge")
        .send_stream(id)
        .write(b"hello");
    assert!(
        w.run_until(Duration::from_secs(2), |w| w.hub_events.iter().any(
            |e| matches!(
                e,
                LaneEvent::Stream(_, StreamEvent::Opened { dir: Dir::Bi })
            )
        ))
    );
}

#[test]
fn stateless_answers_are_bounded_between_polls() {
    let mut w = World::new(0.0);
    let now = w.net.now;
    // However many a flood of unknown packets would earn (quinn-proto
    // answers resets only to some), at most MAX_ANSWERS wait for a poll.
    for _ in 0..(super::MAX_ANSWERS * 3) {
        let t = quinn_proto::Transmit {
            destination: EDGE,
            ecn: None,
            size: 40,
            segment_size: None,
            src_ip: None,
        };
        w.hub.answer(t, vec![0; 40]);
    }
    let mut sent = 0;
    w.hub.poll(now, &mut |_, _| {
        sent += 1;
        true
    });
    assert_eq!(sent, super::MAX_ANSWERS);
}

#[test]
fn stale_timer_entries_are_bounded() {
    let mut w = World::new(0.0);
    w.up();
    // Entries of deadlines that moved (here: of a handle the lane does not
    // hold) pile up only to the bound, then the heap is made again.
    let later = w.net.now + Duration::from_secs(3600);
    for i in 0..(super::STALE_TIMERS * 4) {
        w.hub.timers.push(Reverse((
            later + Duration::from_millis(i as u64),
            ConnectionHandle(usize::MAX),
        )));
    }
    let now = w.net.now;
    w.hub.poll(now, &mut |_, _| true);
    assert!(
        w.hub.timers.len() <= w.hub.deadlines.len() + super::STALE_TIMERS,
        "{} timer entries for {} deadlines",
        w.hub.timers.len(),
        w.hub.deadlines.len()
    );
    // The tunnel's own timers still run: keep-alives hold it for a while.
    w.run_until(Duration::from_secs(10), |_| false);
    assert!(World::lost(&w.edge_events).is_none());
}

#[test]
fn a_full_socket_holds_the_transmit_and_batches_stay_within_a_udp_send() {
    // A socket offering 64 segments gets batches of at most 10: 64 jumbo
    // datagrams pass the 64 KiB one UDP send carries (the kernel refuses
    // it, and the lane lost every batch on loopback).
    let lane = Lane::new(Arc::new(tls::edge_endpoint_config()), None, 4, 64);
    assert_eq!(lane.batch, super::MAX_SEGMENTS);
    let mut w = World::new(0.0);
    let (h, _) = w.up();
    // A megabyte written: the lane has many datagrams to send.
    let id = w
        .edge
        .conn(h)
        .and_then(|c| c.streams().open(Dir::Bi))
        .expect("stream");
    let data = vec![5u8; 1 << 20];
    let _ = w.edge.conn(h).expect("conn").send_stream(id).write(&data);
    let now = w.net.now;
    // The socket takes one send, then has no room: the second is held,
    // nothing more is asked of it, and it is the first sent next time.
    let mut offered = Vec::new();
    w.edge.poll(now, &mut |t, d| {
        offered.push((t.size, d.to_vec()));
        offered.len() < 2
    });
    assert_eq!(offered.len(), 2, "sending stops at the full socket");
    assert!(w.edge.blocked());
    let mut next = Vec::new();
    w.edge.poll(now, &mut |t, d| {
        next.push((t.size, d.to_vec()));
        true
    });
    assert_eq!(next.first(), offered.get(1), "the held transmit goes first");
    assert!(next.len() > 1, "and the connection goes on sending");
    assert!(!w.edge.blocked());
}
