//! TLS and QUIC settings of the tunnel: mutual TLS 1.3 with the ring provider,
//! ALPN `gw/1`, and transport limits raised so one relay can fill the link.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{TransportConfig, VarInt};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::pki::{self, PkiError};

/// Keep-alive the edge sends on every tunnel (the hub only answers): a silent
/// peer is noticed within [`IDLE_TIMEOUT`] on both ends.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// A tunnel with no packet for this long is dead (failure detection under 10 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(8);

/// Largest UDP payload path MTU discovery tries. quinn sends up to 10
/// packets in one segmentation-offload `sendmsg`, which the kernel refuses
/// whole (EMSGSIZE, dropped without a word) above 65,507 bytes: with a 9,000
/// byte jumbo MTU every full batch would vanish, the losses would be taken for
/// an MTU black hole and the path would fall back to 1,200. 6,500 keeps a
/// batch under the limit and still uses most of a jumbo frame (and loopback).
pub const MTU_UPPER_BOUND: u16 = 6500;

/// Building a TLS configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key could not be read.
    #[error("{path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The key file's permissions are too open.
    #[error(transparent)]
    Key(#[from] PkiError),
    /// rustls refused the material.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// quinn refused the rustls configuration.
    #[error("QUIC crypto: {0}")]
    Quic(String),
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |message: String| TlsError::Read {
        path: path.display().to_string(),
        message,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| read(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| read(e.to_string()))?;
    if certs.is_empty() {
        return Err(read("no certificate in the file".into()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    pki::check_key_file(path)?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Relayed connections an edge's tunnels carry at once, over all its lanes.
pub const MAX_STREAMS: u32 = 8_192;

/// The tunnel's transport settings; `streams`: how many relays the peer may
/// open at once on one connection.
///
/// quinn keeps a slot for each stream a peer may open, and a slot once used
/// keeps its buffers for reuse until the connection closes (about 300 bytes
/// each): the limit bounds that memory too.
pub fn transport(streams: u32) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .unwrap_or(VarInt::from_u32(8_000).into()),
    ));
    // One stream per relayed connection: allow many at once.
    t.max_concurrent_bidi_streams(VarInt::from_u32(streams));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Windows sized for 10 Gbit/s at 10 ms round trip; larger ones only let a
    // fast sender buffer more in memory.
    t.stream_receive_window(VarInt::from_u32(4 << 20));
    t.receive_window(VarInt::from_u32(16 << 20));
    t.send_window(16 << 20);
    // Path MTU discovery up to jumbo frames (and loopback): fewer, larger packets
    // cost less CPU per byte. On a 1500-byte path the probes fail and it stays at
    // quinn's usual ~1452.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtu));
    t.datagram_receive_buffer_size(Some(1 << 20));
    t.datagram_send_buffer_size(1 << 20);
    t
}

/// No session resumption: no tickets are sent and none is kept. A resumption
/// attempt is checked on the very first (forgeable) Initial, so with it an
/// off-path attacker holding a ticket could make the hub fail a handshake
/// "about the peer's key" (decrypt_error) from any address it writes into
/// the packet; the detectors take such failures as proof of the address.
/// Edges reconnect rarely; a full handshake costs them a millisecond.
fn no_resumption(tls: &mut rustls::ServerConfig) {
    tls.send_tls13_tickets = 0;
    // The builder's ticketer never produces stateless tickets; without a
    // store, stateful ones cannot be resumed either.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
}

/// The hub's QUIC server configuration: accepts only client certificates from `ca`.
///
/// # Errors
/// When the files cannot be read or do not form a valid configuration.
pub fn server(ca: &Path, cert: &Path, key_path: &Path) -> Result<quinn::ServerConfig, TlsError> {
    // A certificate, when presented, must chain to `ca`. A connection without
    // one completes the handshake only to enroll (ALPN gw-enroll/1): the hub
    // closes any other such connection before reading a byte of it.
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .allow_unauthenticated()
        .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert)?, key(key_path)?)?;
    tls.alpn_protocols = vec![
        gateway_core::wire::ALPN.to_vec(),
        gateway_core::fleet::ENROLL_ALPN.to_vec(),
    ];
    no_resumption(&mut tls);
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // Only the edge sends keep-alives: its PING and the hub's ACK keep both
    // idle timers running, and a hub with 10,000 edges sends half the packets
    // (and spends half the cryptography) it would if both ends pinged.
    let mut t = transport(super::streams::INITIAL);
    t.keep_alive_interval(None);
    server.transport_config(Arc::new(t));
    Ok(server)
}

/// An edge's QUIC client configuration: trusts only `ca` and presents `cert`.
///
/// # Errors
/// When the files cannot be read or do not form a valid configuration.
pub fn client(ca: &Path, cert: &Path, key_path: &Path) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(certs(cert)?, key(key_path)?)?;
    tls.alpn_protocols = vec![gateway_core::wire::ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport(super::streams::INITIAL)));
    Ok(client)
}

/// The most streams a hub may open at once on one of an edge's tunnels: an
/// edge's lanes share its relays, each takes its part of them.
pub fn edge_lane_streams() -> u32 {
    let lanes = u32::try_from(super::hubs::lanes()).unwrap_or(1).max(1);
    MAX_STREAMS / lanes
}

/// The TLS client configuration the tunnels use; swapped when the device
/// certificate is renewed.
pub type ClientHolder = Arc<std::sync::RwLock<quinn::ClientConfig>>;

/// An enrolling box's QUIC client configuration: trusts only `ca`, presents
/// no certificate (it has none yet), ALPN `gw-enroll/1`.
///
/// # Errors
/// When the CA file cannot be read.
pub fn enroll_client(ca: &Path) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
    tls.alpn_protocols = vec![gateway_core::fleet::ENROLL_ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// The operators' HTTPS API: the hub's certificate, no client certificate
/// (operators authenticate with a credential), TLS 1.3.
///
/// # Errors
/// When the files cannot be read.
pub fn ops_server(cert: &Path, key_path: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs(cert)?, key(key_path)?)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// TLS ended at the gateway for a `postgres` service's clients
/// (`pg_tls = "terminate"`): `cert`, TLS 1.2 or 1.3 (libpq offers both), no
/// client certificate (the login is the server's).
///
/// # Errors
/// When the files cannot be read or do not match.
pub fn pg_server(cert: &Path, key_path: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs(cert)?, key(key_path)?)?;
    no_resumption(&mut tls);
    Ok(Arc::new(tls))
}

/// An HTTPS listener that knows its clients by certificate (the consumers'
/// API, an ingest with `auth = "mtls"`): `cert`, TLS 1.3, and a client
/// certificate from `ca` when one is presented. A request without one is
/// answered 401 by the listener (not refused in the handshake, so the client
/// learns why); whose certificate it is, is the listener's check.
///
/// # Errors
/// When the files cannot be read.
pub fn client_cert_server(
    ca: &Path,
    cert: &Path,
    key_path: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .allow_unauthenticated()
        .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert)?, key(key_path)?)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// `gatewayctl`'s TLS client: trusts only `ca`.
///
/// # Errors
/// When the CA file cannot be read.
pub fn ops_client(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// A TLS client of the SOC's alarm collectors (syslog over TLS, a webhook):
/// trusts only `ca`, presents `client` (certificate, key) when given, speaks
/// TLS 1.2 or 1.3 (collectors are often older than this box), offers `alpn`.
///
/// # Errors
/// When the files cannot be read.
pub fn soc_client(
    ca: &Path,
    client: Option<(&Path, &Path)>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots(ca)?);
    let mut tls = match client {
        Some((cert, key_path)) => builder.with_client_auth_cert(certs(cert)?, key(key_path)?)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(tls))
}

/// A consumer's TLS client of the consumers' API: trusts only `ca`, presents
/// `cert`.
///
/// # Errors
/// When the files cannot be read.
pub fn consumer_client(
    ca: &Path,
    cert: &Path,
    key_path: &Path,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(certs(cert)?, key(key_path)?)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// The ALPN protocol a connection agreed on.
pub fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The node id of a connection's peer: the first DNS name of its verified
/// certificate. Never what the peer says about itself.
pub fn peer_id(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let leaf = chain.first()?;
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    // A node id is a name without dots: a consumer's certificate
    // (`NAME.consumer`) names no node.
    let id = cert.valid_dns_names().next()?;
    gateway_core::units::check_name("node", id).ok()?;
    Some(id.to_owned())
}

/// The serial (hex) of a connection's verified peer certificate.
pub fn peer_serial(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    pki::serial_of(chain.first()?)
}

/// File in the state directory holding the hub's stateless-reset key.
pub const RESET_KEY_FILE: &str = "quic-reset.key";

/// The hub's QUIC endpoint settings, with a stateless-reset key kept in
/// `STATE_DIR/quic-reset.key` (64 random bytes, mode 0600, made on first start).
/// A hub restarted after a crash answers packets of its old connections with a
/// stateless reset the edges recognise, so they reconnect at once instead of
/// waiting out the idle timeout; all the hub's endpoints share the key.
///
/// # Errors
/// When the key file cannot be read or created.
pub fn hub_endpoint_config(state_dir: &Path) -> Result<quinn::EndpointConfig, TlsError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = state_dir.join(RESET_KEY_FILE);
    let err = |e: std::io::Error| TlsError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let key = match std::fs::read(&path) {
        Ok(k) if k.len() == 64 => k,
        Ok(_) => {
            return Err(TlsError::Read {
                path: path.display().to_string(),
                message: "not a 64-byte key; delete it to have a new one made".into(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut k = vec![0u8; 64];
            rand::fill(&mut k[..]);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(err)?;
            f.write_all(&k).map_err(err)?;
            f.sync_all().map_err(err)?;
            k
        }
        Err(e) => return Err(err(e)),
    };
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &key,
    )));
    // quinn's default connection ids carry a check keyed per process, so a
    // restarted hub would drop its old connections' packets as invalid instead
    // of resetting them: take random ids that any of our processes answers.
    config.cid_generator(|| Box::new(RandomCids));
    allow_jumbo(&mut config);
    Ok(config)
}

/// An edge's QUIC endpoint settings.
pub fn edge_endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    allow_jumbo(&mut config);
    config
}

/// Accept packets as large as path MTU discovery may probe. The size is the
/// `max_udp_payload_size` transport parameter: the peer's discovery never
/// goes above it, and quinn's default (1472) would stop every path at the
/// Ethernet MTU however large the path's really is.
fn allow_jumbo(config: &mut quinn::EndpointConfig) {
    config
        .max_udp_payload_size(MTU_UPPER_BOUND)
        .expect("MTU_UPPER_BOUND is at least 1200");
}

/// 8-byte random connection ids; every unknown one is answered with a
/// stateless reset (rate-limited by quinn, never larger than what came in).
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&rand::random::<[u8; 8]>())
    }
    fn cid_len(&self) -> usize {
        8
    }
    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// A CA in `dir` and the tunnel's server and client configurations for a
/// hub `hub-01` (named `hub_name`) and an edge `edge-01` it issued: for the
/// tests of what runs on a tunnel.
#[cfg(test)]
pub fn test_pair(dir: &Path, hub_name: &str) -> (quinn::ServerConfig, quinn::ClientConfig) {
    use super::pki;
    let (ca, certs) = (dir.join("ca"), dir.join("certs"));
    pki::init(&ca, "test CA").expect("ca");
    pki::issue(&ca, "hub-01", &[hub_name.to_owned()], 1, &certs).expect("hub cert");
    pki::issue(&ca, "edge-01", &[], 1, &certs).expect("edge cert");
    let file = |n: &str| certs.join(n);
    let server =
        server(&ca.join("ca.pem"), &file("hub-01.pem"), &file("hub-01.key")).expect("server");
    let client = client(
        &ca.join("ca.pem"),
        &file("edge-01.pem"),
        &file("edge-01.key"),
    )
    .expect("client");
    (server, client)
}
