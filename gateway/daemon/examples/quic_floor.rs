//! The latency floor of the tunnel's transport on this machine: 64-byte
//! round trips between two processes over one quinn stream (with the tunnel's
//! transport and endpoint settings) and, for comparison, over one TCP
//! connection. Run by `tests/bench/quic_floor.sh`, which prints the table.
//!
//! ```text
//! quic_floor quic-server ADDR CERT_OUT     serve echo over QUIC, write the certificate
//! quic_floor quic-client ADDR CERT N       N round trips; prints "p50 p99" in µs
//! quic_floor tcp-server ADDR
//! quic_floor tcp-client ADDR N
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ALPN: &[u8] = b"quic-floor";
const MESSAGE: usize = 64;
const WARM_UP: usize = 100;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: quic_floor quic-server ADDR CERT_OUT | quic-client ADDR CERT N | tcp-server ADDR | tcp-client ADDR N";
    let arg = |i: usize| args.get(i).map(String::as_str).ok_or(usage);
    let addr: SocketAddr = arg(2)?.parse()?;
    match arg(1)? {
        "quic-server" => quic_server(addr, arg(3)?).await,
        "quic-client" => quic_client(addr, arg(3)?, arg(4)?.parse()?).await,
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
    gateway_daemon::daemon::size_udp_buffers(&socket);
    Ok(quinn::Endpoint::new(
        gateway_daemon::tls::edge_endpoint_config(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?)
}

async fn quic_server(addr: SocketAddr, cert_out: &str) -> Result<(), Error> {
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
    server.transport_config(Arc::new(gateway_daemon::tls::transport()));
    let endpoint = endpoint(addr, Some(server))?;
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
    client.transport_config(Arc::new(gateway_daemon::tls::transport()));
    let endpoint = endpoint(([127, 0, 0, 1], 0).into(), None)?;
    let conn = endpoint.connect_with(client, addr, "quic-floor")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    round_trips(&mut recv, &mut send, n).await
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
