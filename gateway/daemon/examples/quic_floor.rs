//! The latency floor of the tunnel's transport on this machine: 64-byte
//! round trips between two processes over one quinn stream (with the tunnel's
//! transport and endpoint settings) and, for comparison, over one TCP
//! connection. Run by `tests/bench/quic_floor.sh`, which prints the table.
//!
//! ```text
//! quic_floor quic-server ADDR CERT_OUT     serve echo over QUIC, write the certificate
//! quic_floor quic-client ADDR CERT N       N round trips; prints "p50 p99" in µs
//! quic_floor proto-server ADDR CERT_OUT    the same, quinn-proto driven by one task
//! quic_floor proto-client ADDR CERT N
//! quic_floor tcp-server ADDR
//! quic_floor tcp-client ADDR N
//! quic_floor relay-hub ADDR LISTEN CERT_OUT  a lane relay's hub: TCP clients on LISTEN
//! quic_floor relay-edge ADDR CERT TARGET     ... and its edge, dialling TARGET per stream
//! ```
//!
//! The `relay` pair is a whole relay path on lanes (`relay::pipes`: each
//! side's lane task moves the bytes between its QUIC streams and TCP
//! sockets itself), for `tests/bench/pgbench.sh` and `tests/bench/relay.sh`
//! to measure beside gatewayd and rathole. It carries only what a relay's
//! data path carries: no opening frames, policy or audit (so it serves
//! protocols whose client speaks first, as PostgreSQL's and HTTP's do),
//! with a self-signed hub certificate and no client certificate.
//!
//! The `proto` pair runs the tunnel's lane driver (`tunnel::lane`: quinn's
//! protocol core, quinn-proto, driven from a single task per process with
//! quinn-udp's batched socket, without quinn's endpoint and connection driver
//! tasks): what a relay on the lane can reach at best.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use gateway_daemon::relay::listen::reset_tcp;
use gateway_daemon::relay::pipes::{Full, Pipes};
use gateway_daemon::tunnel::lane::{Admit, Lane, LaneEvent, Socket};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ALPN: &[u8] = b"quic-floor";
const MESSAGE: usize = 64;
const WARM_UP: usize = 100;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    // A lane is one task on a thread of its own: the proto pair runs on a
    // current-thread runtime (no wake-ups handed between worker threads);
    // quinn's and TCP's on the usual multi-thread one.
    let args: Vec<String> = std::env::args().collect();
    let mut rt = if args
        .get(1)
        .is_some_and(|m| m.starts_with("proto") || m.starts_with("relay"))
    {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    rt.enable_all().build()?.block_on(run(args))
}

async fn run(args: Vec<String>) -> Result<(), Error> {
    let usage = "usage: quic_floor quic-server|proto-server ADDR CERT_OUT | quic-client|proto-client ADDR CERT N | tcp-server ADDR | tcp-client ADDR N | relay-hub ADDR LISTEN CERT_OUT | relay-edge ADDR CERT TARGET";
    let arg = |i: usize| args.get(i).map(String::as_str).ok_or(usage);
    let addr: SocketAddr = arg(2)?.parse()?;
    match arg(1)? {
        "quic-server" => quic_server(addr, arg(3)?).await,
        "quic-client" => quic_client(addr, arg(3)?, arg(4)?.parse()?).await,
        "proto-server" => proto_server(addr, arg(3)?).await,
        "proto-client" => proto_client(addr, arg(3)?, arg(4)?.parse()?).await,
        "relay-hub" => relay_hub(addr, arg(3)?.parse()?, arg(4)?).await,
        "relay-edge" => relay_edge(addr, arg(4)?.parse()?, arg(3)?).await,
        "tcp-server" => tcp_server(addr).await,
        "tcp-client" => tcp_client(addr, arg(3)?.parse()?).await,
        _ => Err(usage.into()),
    }
}

fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, Error> {
    let socket = std::net::UdpSocket::bind(addr)?;
    gateway_daemon::node::sockets::size_udp_buffers(&socket);
    Ok(quinn::Endpoint::new(
        gateway_daemon::tunnel::tls::edge_endpoint_config(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?)
}

/// A server configuration with a fresh self-signed certificate, written to `cert_out`.
fn server_config(cert_out: &str) -> Result<quinn::ServerConfig, Error> {
    let key = rcgen::generate_simple_self_signed(vec!["quic-floor".into()])?;
    std::fs::write(cert_out, key.cert.der())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(
            vec![key.cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into()),
        )?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(gateway_daemon::tunnel::tls::transport(
        gateway_daemon::tunnel::tls::MAX_STREAMS,
    )));
    Ok(server)
}

/// A client configuration trusting the certificate in `cert`.
fn client_config(cert: &str) -> Result<quinn::ClientConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(std::fs::read(cert)?))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(gateway_daemon::tunnel::tls::transport(
        gateway_daemon::tunnel::tls::MAX_STREAMS,
    )));
    Ok(client)
}

async fn quic_server(addr: SocketAddr, cert_out: &str) -> Result<(), Error> {
    let endpoint = endpoint(addr, Some(server_config(cert_out)?))?;
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(Some(n)) = recv.read(&mut buf).await {
                        if send.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }
    Ok(())
}

async fn quic_client(addr: SocketAddr, cert: &str, n: usize) -> Result<(), Error> {
    let endpoint = endpoint(([127, 0, 0, 1], 0).into(), None)?;
    let conn = endpoint
        .connect_with(client_config(cert)?, addr, "quic-floor")?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    round_trips(&mut recv, &mut send, n).await
}

/// One process's lane (the tunnel's one-task driver, `tunnel::lane`), its
/// one connection and, for the relay pair, its pipes; driven by the
/// caller's task.
struct Proto {
    lane: Lane,
    socket: Socket,
    conn: Option<quinn_proto::ConnectionHandle>,
    pipes: Pipes,
}

impl Proto {
    fn new(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> Result<Self, Error> {
        let socket = std::net::UdpSocket::bind(addr)?;
        gateway_daemon::node::sockets::size_udp_buffers(&socket);
        let socket = Socket::new(socket)?;
        let lane = Lane::new(
            Arc::new(gateway_daemon::tunnel::tls::edge_endpoint_config()),
            server,
            16,
            socket.batch(),
        );
        Ok(Self {
            lane,
            socket,
            conn: None,
            pipes: Pipes::new(MAX_PIPES),
        })
    }

    fn conn(&mut self) -> Result<&mut quinn_proto::Connection, Error> {
        let h = self.conn.ok_or("no connection")?;
        Ok(self.lane.conn(h).ok_or("connection gone")?)
    }

    /// Waits for datagrams, the lane's timer, a pipe's TCP socket or
    /// `other`; handles the datagrams and timers, then every event, first
    /// by the pipes; returns `other`'s output and the events the pipes did
    /// not take. Nothing is sent until [`Proto::transmit`]: an answer
    /// written meanwhile leaves with the acknowledgement, in one packet.
    async fn turn<T>(
        &mut self,
        other: impl std::future::Future<Output = T>,
    ) -> Result<(Option<T>, Vec<LaneEvent>), Error> {
        let deadline = self.lane.next_timeout();
        let mut got = None;
        tokio::select! {
            r = self.socket.readable() => r?,
            r = self.socket.writable(), if self.lane.blocked() => r?,
            () = self.pipes.woken() => {}
            t = other => got = Some(t),
            () = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        let now = Instant::now();
        self.socket
            .read_into(&mut self.lane, now, &mut |_| Admit::Accept)?;
        self.lane.handle_timeouts(now);
        self.lane.poll_events();
        let mut events = Vec::new();
        while let Some(e) = self.lane.event() {
            // The newest connection is the one served (a client's run
            // ends without closing; the next one connects anew).
            match &e {
                LaneEvent::Connected(h) => self.conn = Some(*h),
                LaneEvent::Lost(h, _) if self.conn == Some(*h) => self.conn = None,
                _ => {}
            }
            if !self.pipes.on_event(&mut self.lane, &e) {
                events.push(e);
            }
        }
        self.pipes.drive_woken(&mut self.lane);
        for _ in self.pipes.ended() {}
        Ok((got, events))
    }

    /// Sends whatever the lane has to send.
    fn transmit(&mut self) {
        let socket = &self.socket;
        self.lane
            .poll(Instant::now(), &mut |t, data| socket.send(t, data));
    }

    /// Everything readable on `id`, appended to `out`.
    fn read(&mut self, id: quinn_proto::StreamId, out: &mut Vec<u8>) -> Result<(), Error> {
        let mut stream = self.conn()?.recv_stream(id);
        let mut chunks = stream.read(true)?;
        while let Ok(Some(chunk)) = chunks.next(usize::MAX) {
            out.extend_from_slice(&chunk.bytes);
        }
        let _ = chunks.finalize();
        Ok(())
    }
}

async fn proto_server(addr: SocketAddr, cert_out: &str) -> Result<(), Error> {
    let mut node = Proto::new(addr, Some(server_config(cert_out)?))?;
    let mut stream = None;
    let mut data = Vec::new();
    loop {
        let events = node.turn(std::future::pending::<()>()).await?.1;
        if events.iter().any(|e| matches!(e, LaneEvent::Connected(_))) {
            stream = None;
        }
        if node.conn.is_some() {
            if let Some(id) = node.conn()?.streams().accept(quinn_proto::Dir::Bi) {
                stream = Some(id);
            }
            if let Some(id) = stream {
                data.clear();
                node.read(id, &mut data)?;
                if !data.is_empty() {
                    node.conn()?.send_stream(id).write(&data)?;
                }
            }
        }
        node.transmit();
    }
}

async fn proto_client(addr: SocketAddr, cert: &str, n: usize) -> Result<(), Error> {
    let mut node = Proto::new(([127, 0, 0, 1], 0).into(), None)?;
    let h = node
        .lane
        .connect(Instant::now(), client_config(cert)?, addr, "quic-floor")?;
    node.transmit();
    'connecting: loop {
        node.transmit();
        for e in node.turn(std::future::pending::<()>()).await?.1 {
            match e {
                LaneEvent::Connected(_) => break 'connecting,
                LaneEvent::Lost(_, reason) => return Err(reason.into()),
                _ => {}
            }
        }
    }
    node.conn = Some(h);
    let id = node
        .conn()?
        .streams()
        .open(quinn_proto::Dir::Bi)
        .ok_or("no stream")?;
    let mut samples = Vec::with_capacity(n);
    let mut got = Vec::new();
    for i in 0..n + WARM_UP {
        let t = Instant::now();
        node.conn()?.send_stream(id).write(&[b'x'; MESSAGE])?;
        node.transmit();
        got.clear();
        while got.len() < MESSAGE {
            for e in node.turn(std::future::pending::<()>()).await?.1 {
                if let LaneEvent::Lost(_, reason) = e {
                    return Err(reason.into());
                }
            }
            node.read(id, &mut got)?;
            node.transmit();
        }
        if i >= WARM_UP {
            samples.push(t.elapsed().as_micros());
        }
    }
    report(samples)
}

/// Pipes a lane relay holds at once.
const MAX_PIPES: usize = 16_384;
/// How long the lane relay's edge waits for its target to accept.
const DIAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A lane relay's hub: each TCP client on `listen` is a new stream to the
/// edge connected last, joined with it by the lane's task.
async fn relay_hub(addr: SocketAddr, listen: SocketAddr, cert_out: &str) -> Result<(), Error> {
    let mut node = Proto::new(addr, Some(server_config(cert_out)?))?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (accepted, _) = node.turn(listener.accept()).await?;
        if let Some(r) = accepted {
            let (tcp, _) = r?;
            let opened = node
                .conn
                .and_then(|h| Some((h, node.lane.conn(h)?.streams().open(quinn_proto::Dir::Bi)?)));
            match opened {
                Some((h, id)) => {
                    if let Err(Full(tcp)) =
                        node.pipes.attach(&mut node.lane, h, id, tcp, Bytes::new())
                    {
                        reset_tcp(&tcp);
                    }
                }
                None => reset_tcp(&tcp),
            }
        }
        node.transmit();
    }
}

/// A lane relay's edge: connects to the hub at `addr`; each stream the hub
/// opens is joined with a new TCP connection to `target` once it connects
/// (dialled on a task of its own; the stream waits unread meanwhile).
async fn relay_edge(addr: SocketAddr, target: SocketAddr, cert: &str) -> Result<(), Error> {
    let any: SocketAddr = ([0, 0, 0, 0], 0).into();
    let mut node = Proto::new(any, None)?;
    let h = node
        .lane
        .connect(Instant::now(), client_config(cert)?, addr, "quic-floor")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    loop {
        node.transmit();
        let (dialled, events) = node.turn(rx.recv()).await?;
        for e in events {
            match e {
                LaneEvent::Lost(_, reason) => return Err(reason.into()),
                LaneEvent::Stream(_, quinn_proto::StreamEvent::Opened { .. }) => {
                    let conn = node.lane.conn(h).ok_or("connection gone")?;
                    while let Some(id) = conn.streams().accept(quinn_proto::Dir::Bi) {
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            // A target that never answers fails the stream,
                            // not a task left waiting.
                            let dialled = tokio::time::timeout(
                                DIAL_TIMEOUT,
                                tokio::net::TcpStream::connect(target),
                            )
                            .await
                            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
                            let _ = tx.send((id, dialled));
                        });
                    }
                }
                _ => {}
            }
        }
        if let Some(Some((id, dialled))) = dialled {
            match dialled {
                Ok(tcp) => {
                    if let Err(Full(tcp)) =
                        node.pipes.attach(&mut node.lane, h, id, tcp, Bytes::new())
                    {
                        reset_tcp(&tcp);
                    }
                }
                Err(_) => {
                    if let Some(conn) = node.lane.conn(h) {
                        let code = quinn_proto::VarInt::from_u32(1);
                        let _ = conn.send_stream(id).reset(code);
                        let _ = conn.recv_stream(id).stop(code);
                    }
                }
            }
        }
    }
}

async fn tcp_server(addr: SocketAddr) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (mut tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                if tcp.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn tcp_client(addr: SocketAddr, n: usize) -> Result<(), Error> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (mut r, mut w) = tcp.split();
    round_trips(&mut r, &mut w, n).await
}

/// `n` timed round trips of one message after a warm-up; prints "p50 p99" in µs.
async fn round_trips<R, W>(r: &mut R, w: &mut W, n: usize) -> Result<(), Error>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut samples = Vec::with_capacity(n);
    let mut buf = [0u8; MESSAGE];
    for i in 0..n + WARM_UP {
        let t = Instant::now();
        w.write_all(&[b'x'; MESSAGE]).await?;
        r.read_exact(&mut buf).await?;
        if i >= WARM_UP {
            samples.push(t.elapsed().as_micros());
        }
    }
    report(samples)
}

fn report(mut samples: Vec<u128>) -> Result<(), Error> {
    samples.sort_unstable();
    let at = |q: usize| {
        samples
            .get(samples.len() * q / 100)
            .copied()
            .ok_or("no samples")
    };
    println!("{} {}", at(50)?, at(99)?);
    Ok(())
}
