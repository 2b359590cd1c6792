//! A lane's UDP socket: datagrams read in batches (`recvmmsg`, and GRO
//! where the kernel coalesces) straight into the lane, and a connection's
//! batches sent in one system call (GSO where the kernel offers it), on
//! quinn-udp, the socket layer quinn itself uses.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::time::Instant;

use bytes::BytesMut;
use quinn_udp::{BATCH_SIZE, RecvMeta, UdpSocketState};
use tokio::io::Interest;

use super::{Admit, Lane};

/// Room for one read: the largest datagram, or a GRO batch of them.
const READ_ROOM: usize = 64 * 1024;
/// Batched reads in one [`Socket::read_into`]: a flood cannot keep the lane
/// reading without ever sending or running its timers (what is left stays
/// ready for the next turn).
const READS_PER_TURN: usize = 16;

/// A lane's socket, registered with the runtime.
pub struct Socket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
}

impl Socket {
    /// Takes `socket` (made non-blocking here).
    ///
    /// # Errors
    /// When the runtime cannot register it or its options cannot be read.
    pub fn new(socket: std::net::UdpSocket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        Ok(Socket {
            io: tokio::net::UdpSocket::from_std(socket)?,
            state,
            bufs: (0..BATCH_SIZE).map(|_| vec![0; READ_ROOM]).collect(),
            meta: vec![RecvMeta::default(); BATCH_SIZE],
        })
    }

    /// The address it is bound to.
    ///
    /// # Errors
    /// As `getsockname`.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    /// Datagrams of one size the kernel sends in one call (1 without GSO):
    /// the lane's batch.
    pub fn batch(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Waits until a datagram may be read.
    ///
    /// # Errors
    /// When the runtime's registration fails.
    pub async fn readable(&self) -> io::Result<()> {
        self.io.readable().await
    }

    /// Reads the datagrams waiting into `lane`, at most [`READS_PER_TURN`]
    /// batches; the number read.
    ///
    /// # Errors
    /// A socket error other than "nothing waiting".
    pub fn read_into(
        &mut self,
        lane: &mut Lane,
        now: Instant,
        admit: &mut dyn FnMut(&quinn_proto::Incoming) -> Admit,
    ) -> io::Result<usize> {
        let mut total = 0;
        for _ in 0..READS_PER_TURN {
            let (io, state, bufs, meta) = (&self.io, &self.state, &mut self.bufs, &mut self.meta);
            let got = io.try_io(Interest::READABLE, || {
                let mut each = bufs.iter_mut();
                let mut slices: [IoSliceMut<'_>; BATCH_SIZE] = std::array::from_fn(|_| {
                    each.next()
                        .map_or_else(|| IoSliceMut::new(&mut []), |b| IoSliceMut::new(b))
                });
                state.recv(io.into(), &mut slices, meta)
            });
            let n = match got {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
                Err(e) => return Err(e),
            };
            for (m, buf) in self.meta.iter().zip(&self.bufs).take(n) {
                let stride = m.stride.max(1);
                for d in buf[..m.len].chunks(stride) {
                    lane.receive(now, m.addr, BytesMut::from(d), admit);
                    total += 1;
                }
            }
        }
        Ok(total)
    }

    /// Waits until the socket has room to send (after [`Socket::send`]
    /// found none).
    ///
    /// # Errors
    /// When the runtime's registration fails.
    pub async fn writable(&self) -> io::Result<()> {
        self.io.writable().await
    }

    /// Sends one transmit of the lane (a batch of `segment_size` datagrams
    /// when set); `false` when the socket has no room (the lane holds it and
    /// its owner waits for [`Socket::writable`], as quinn's driver does:
    /// dropping it would cost a loss and a congestion window). Another error
    /// drops the transmit, as a loss on the path would.
    pub fn send(&self, t: &quinn_proto::Transmit, data: &[u8]) -> bool {
        let tx = quinn_udp::Transmit {
            destination: t.destination,
            ecn: t
                .ecn
                .and_then(|e| quinn_udp::EcnCodepoint::from_bits(e as u8)),
            contents: data,
            segment_size: t.segment_size,
            src_ip: t.src_ip,
        };
        // Straight to the kernel: a socket the runtime has not yet seen
        // writable would otherwise hold its first datagrams for a turn.
        match self.state.send((&self.io).into(), &tx) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Clear the runtime's stale readiness, so that
                // `writable` waits for the kernel to free room.
                let _ = self.io.try_io(Interest::WRITABLE, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
                false
            }
            Err(e) => {
                tracing::debug!(error = %e, "A lane datagram could not be sent");
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::tunnel::lane::LaneEvent;
    use crate::tunnel::tls;

    fn bound() -> Socket {
        Socket::new(std::net::UdpSocket::bind("127.0.0.1:0").expect("bind")).expect("socket")
    }

    /// Both lanes on real loopback sockets, one task: a handshake and a
    /// stream's bytes there and back.
    #[tokio::test(flavor = "current_thread")]
    async fn two_lanes_on_loopback_sockets_connect_and_carry_a_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, client) = tls::test_pair(dir.path(), "hub.test");
        std::fs::create_dir_all(dir.path().join("hub")).expect("dir");
        let (mut hs, mut es) = (bound(), bound());
        let mut hub = Lane::new(
            Arc::new(tls::hub_endpoint_config(&dir.path().join("hub")).expect("endpoint")),
            Some(server),
            4,
            hs.batch(),
        );
        let mut edge = Lane::new(Arc::new(tls::edge_endpoint_config()), None, 4, es.batch());
        let to = hs.local_addr().expect("addr");
        let e = edge
            .connect(Instant::now(), client, to, "hub.test")
            .expect("connect");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (mut stream, mut written, mut at_hub, mut got) = (None, 0, None, Vec::new());
        let run = async {
            loop {
                let now = Instant::now();
                edge.poll(now, &mut |t, d| es.send(t, d));
                hub.poll(now, &mut |t, d| hs.send(t, d));
                let mut connected = false;
                while let Some(ev) = edge.event() {
                    connected |= matches!(ev, LaneEvent::Connected(_));
                    assert!(!matches!(ev, LaneEvent::Lost(..)), "{ev:?}");
                }
                while let Some(ev) = hub.event() {
                    if let LaneEvent::Connected(h) = ev {
                        at_hub = Some(h);
                    }
                }
                if connected {
                    stream = edge
                        .conn(e)
                        .and_then(|c| c.streams().open(quinn_proto::Dir::Bi));
                }
                if let (Some(id), Some(c)) = (stream, edge.conn(e)) {
                    if let Ok(n) = c.send_stream(id).write(&data[written..]) {
                        written += n;
                    }
                }
                if let (Some(h), Some(id)) = (at_hub, stream) {
                    if let Some(c) = hub.conn(h) {
                        let _ = c.streams().accept(quinn_proto::Dir::Bi);
                        if let Ok(mut chunks) = c.recv_stream(id).read(true) {
                            while let Ok(Some(ch)) = chunks.next(usize::MAX) {
                                got.extend_from_slice(&ch.bytes);
                            }
                            let _ = chunks.finalize();
                        }
                    }
                }
                if got.len() == data.len() {
                    return;
                }
                let wait = [edge.next_timeout(), hub.next_timeout()]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
                tokio::select! {
                    r = hs.readable() => r.expect("hub socket"),
                    r = es.readable() => r.expect("edge socket"),
                    r = hs.writable(), if hub.blocked() => r.expect("hub socket"),
                    r = es.writable(), if edge.blocked() => r.expect("edge socket"),
                    () = tokio::time::sleep_until(wait.into()) => {}
                }
                let now = Instant::now();
                hs.read_into(&mut hub, now, &mut |_| Admit::Accept)
                    .expect("read");
                es.read_into(&mut edge, now, &mut |_| Admit::Accept)
                    .expect("read");
                hub.handle_timeouts(now);
                edge.handle_timeouts(now);
            }
        };
        tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .expect("300 kB cross within 20 s");
        assert!(got == data, "the bytes arrive whole and in order");
    }
}
