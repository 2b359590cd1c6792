//! In-process nodes on loopback for the relay tests: a private CA, hubs and edges
//! started with pre-bound port-0 sockets, and a legacy echo server that counts
//! what reaches it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use gateway_core::check;
use gateway_core::config;
use gateway_daemon::node::sockets;
use gateway_daemon::role::{self, Bindings, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Waits for `cond` up to `limit`. The one place the tests poll: for state that
/// has no event to wait on (readiness, audit rows written by another thread).
pub async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    poll(what, limit, || {
        let met = cond();
        async move { if met { Ok(()) } else { Err(String::new()) } }
    })
    .await;
}

/// Asks `probe` until it answers `Ok(value)`, up to `limit`, for state only
/// reachable by asking (an HTTP API, `/metrics`); `Err(last)` says what it saw,
/// for the failure message. The one polling loop of the in-process tests;
/// `process::poll_blocking` is its blocking twin.
pub async fn poll<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) => assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; last seen:\n{last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A private CA and certificates in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        gateway_daemon::tunnel::pki::init(&dir.path().join("ca"), "test CA").expect("ca");
        Pki { dir }
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca")
    }
    /// Issues `id` (with 127.0.0.1 as an extra name, for hubs); returns (cert, key).
    pub fn issue(&self, id: &str) -> (PathBuf, PathBuf) {
        let out = self.dir.path().join("certs");
        if !out.join(format!("{id}.pem")).exists() {
            gateway_daemon::tunnel::pki::issue(&self.ca(), id, &["127.0.0.1".to_owned()], 30, &out)
                .expect("issue");
        }
        (out.join(format!("{id}.pem")), out.join(format!("{id}.key")))
    }
}

fn bind_tcp(ip: &str) -> (SocketAddr, std::net::TcpListener) {
    let l = sockets::listen_tcp(format!("{ip}:0").parse().expect("addr")).expect("bind");
    (l.local_addr().expect("addr"), l)
}

/// Publishes a hub makes: (DEVICE/SERVICE).
pub struct HubSpec<'a> {
    pub id: &'a str,
    pub level: u8,
    pub publishes: &'a [&'a str],
    /// Reuse this QUIC address (hub restart).
    pub quic: Option<SocketAddr>,
    /// Reuse these publish addresses, by index.
    pub publish_addrs: Vec<SocketAddr>,
    /// Reuse this state directory (the sink survives a restart).
    pub state: Option<Arc<tempfile::TempDir>>,
    /// Reuse this API address.
    pub api: Option<SocketAddr>,
    /// `[hub].sink`: a sink file shared with other hubs.
    pub sink: Option<PathBuf>,
    /// `[hub] store = "postgres"`: this database of this cluster.
    pub postgres: Option<(&'a gateway_store::postgres::cluster::Cluster, &'a str)>,
    /// More `[hub]` settings, TOML lines.
    pub hub_extra: &'a str,
    /// Appended to the config (top-level sections such as `[detect]`).
    pub extra: &'a str,
}

impl<'a> HubSpec<'a> {
    /// A hub on fresh port-0 sockets.
    pub fn new(id: &'a str, level: u8, publishes: &'a [&'a str]) -> Self {
        HubSpec {
            id,
            level,
            publishes,
            quic: None,
            publish_addrs: vec![],
            state: None,
            api: None,
            sink: None,
            postgres: None,
            hub_extra: "",
            extra: "",
        }
    }
}

/// A `[detect]` section for tests that are not about detection
/// (tests/e2e/detect.rs is) but act as an attacker would from loopback:
/// alarmed about, never banned.
pub const LOOPBACK_NEVER_BANNED: &str = "\n[detect]\nnever_ban = [\"127.0.0.0/8\"]\n";

/// A TCP connection from `from` to `to`, then closed once the server has
/// answered or reset it (a policy refusal and a ban both reset).
pub fn knock(from: &str, to: SocketAddr) {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let src: std::net::IpAddr = from.parse().expect("ip");
    sock.bind(&SocketAddr::new(src, 0).into()).expect("bind");
    let _ = sock.connect_timeout(&to.into(), Duration::from_secs(2));
    let s: std::net::TcpStream = sock.into();
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 1];
    let _ = std::io::Read::read(&mut &s, &mut buf);
}

/// Waits for an edge's tunnel to be up.
pub async fn ready(edge: &EdgeNode) {
    wait_for("the edge's tunnel", Duration::from_secs(10), || {
        edge.running.ready()
    })
    .await;
}

pub struct HubNode {
    pub running: Running,
    pub quic: SocketAddr,
    pub publish: Vec<SocketAddr>,
    /// The consumers' API (`[hub].api`).
    pub api: SocketAddr,
    pub state: Arc<tempfile::TempDir>,
    pub config_text: String,
}

/// Withdraws `consumer`'s grant of `device`/`channel` at the hub whose state
/// is in `state` (or its PostgreSQL database, in [`pg_mode`]), as an operator
/// would; how many records that freed.
pub fn revoke_grant(state: &Path, device: &str, channel: &str, consumer: &str) -> Option<u64> {
    if !pg_mode() {
        let mut sink = gateway_store::sqlite::SqliteSink::open(state).expect("sink");
        return sink
            .revoke_grant(device, channel, consumer)
            .expect("revoke");
    }
    use gateway_store::sink::{Sink as _, StreamKey};
    let (cluster, db, _) = pg_for(state);
    let store = cluster.store(&db, 1);
    let (d, c, who) = (device.to_owned(), channel.to_owned(), consumer.to_owned());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let pg = gateway_store::postgres::Pg::open(&store)
                .await
                .expect("PostgreSQL");
            gateway_store::postgres::PgSink::new(pg)
                .revoke_grant(StreamKey::new(&d, &c), who)
                .await
                .expect("revoke")
        })
    })
    .join()
    .expect("revoked")
}

/// Whether every hub of these tests keeps its state in PostgreSQL
/// (`GW_HUB_STORE=postgres`: the hub suites run again on the networked
/// engine, one throwaway cluster per test process, a database per hub or per
/// shared file).
pub fn pg_mode() -> bool {
    std::env::var("GW_HUB_STORE").is_ok_and(|v| v == "postgres")
}

/// In [`pg_mode`], the shared cluster and the database standing for `key`
/// (a state directory or a shared file), and whether it was made now.
pub fn pg_for(
    key: &Path,
) -> (
    &'static gateway_store::postgres::cluster::Cluster,
    String,
    bool,
) {
    let c = gateway_store::postgres::cluster::shared()
        .expect("GW_HUB_STORE=postgres needs postgresql-15");
    let (db, fresh) = c
        .database_for(&key.display().to_string())
        .expect("database");
    (c, db, fresh)
}

/// `[hub] store = "postgres"` and its section, for database `db` of
/// `cluster` (over its Unix socket), added to a hub's config `text`.
pub fn on_postgres(
    text: &str,
    cluster: &gateway_store::postgres::cluster::Cluster,
    db: &str,
) -> String {
    let text = text.replacen("[hub]\n", "[hub]\nstore = \"postgres\"\n", 1);
    format!(
        "{text}\n[hub.postgres]\nconnect = \"host={} port={} dbname={db} user=postgres sslmode=disable\"\npool = 4\n",
        cluster.socket_dir().display(),
        cluster.port
    )
}

pub fn hub_toml(
    pki: &Pki,
    spec: &HubSpec<'_>,
    quic: SocketAddr,
    publish: &[SocketAddr],
    (admin, api): (SocketAddr, SocketAddr),
    state: &Path,
) -> String {
    let (cert, key) = (
        pki.dir.path().join(format!("certs/{}.pem", spec.id)),
        pki.dir.path().join(format!("certs/{}.key", spec.id)),
    );
    let mut s = format!(
        "[node]\nid = \"{id}\"\nrole = \"hub\"\nstate_dir = \"{state}\"\n\n[hub]\nlisten = \"{quic}\"\napi = \"{api}\"\nca_cert = \"{ca}/ca.pem\"\nca_key = \"{ca}/ca.key\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n[[zone]]\nname = \"extranet\"\nkind = \"extranet\"\nlevel = {level}\nnetworks = [\"127.0.0.0/24\"]\n\n[admin]\nlisten = \"{admin}\"\n",
        id = spec.id,
        state = state.display(),
        ca = pki.ca().display(),
        cert = cert.display(),
        key = key.display(),
        level = spec.level,
    );
    if !spec.hub_extra.is_empty() {
        s = s.replacen("[hub]\n", &format!("[hub]\n{}\n", spec.hub_extra), 1);
    }
    if pg_mode() && spec.postgres.is_none() {
        // Hubs that would share a sink file share a database.
        let (cluster, db, _) = pg_for(spec.sink.as_deref().unwrap_or(state));
        s = on_postgres(&s, cluster, &db);
    } else if let Some(sink) = &spec.sink {
        s = s.replacen(
            "\n\n[[zone]]",
            &format!("\nsink = \"{}\"\n\n[[zone]]", sink.display()),
            1,
        );
    }
    if let Some((cluster, db)) = spec.postgres {
        s = on_postgres(&s, cluster, db);
    }
    // A publish written "udp:DEVICE/SERVICE" is a UDP publish.
    for (svc, addr) in spec.publishes.iter().zip(publish) {
        let (svc, proto) = match svc.strip_prefix("udp:") {
            Some(s) => (s, "udp"),
            None => (*svc, "tcp"),
        };
        s += &format!(
            "\n[[publish]]\nservice = \"{svc}\"\nzone = \"extranet\"\nlisten = \"{addr}\"\nprotocol = \"{proto}\"\n"
        );
    }
    s + spec.extra
}

pub fn load(text: &str) -> config::Config {
    let checked = check::load(text, gateway_daemon::node::clock::today_local());
    let errors: Vec<String> = checked
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| d.render("test"))
        .collect();
    checked
        .config
        .unwrap_or_else(|| panic!("config refused: {errors:#?}\n{text}"))
}

pub async fn start_hub(pki: &Pki, spec: HubSpec<'_>) -> HubNode {
    pki.issue(spec.id);
    let want = spec
        .quic
        .unwrap_or_else(|| "127.0.0.1:0".parse().expect("addr"));
    // A restarted hub binds its old address again (SO_REUSEPORT, as the daemon does).
    let udp = sockets::bind_udp_shared(want).expect("udp");
    let quic = udp.local_addr().expect("addr");
    let mut bindings = Bindings {
        udp: Some(udp),
        ..Bindings::default()
    };
    let mut publish = Vec::new();
    for i in 0..spec.publishes.len() {
        if spec.publishes[i].starts_with("udp:") {
            let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp publish");
            let addr = u.local_addr().expect("addr");
            bindings.udp_listeners.insert(addr, u);
            publish.push(addr);
            continue;
        }
        let (addr, l) = match spec.publish_addrs.get(i) {
            Some(a) => (*a, sockets::listen_tcp(*a).expect("rebind publish")),
            None => bind_tcp("127.0.0.1"),
        };
        bindings.tcp.insert(addr, l);
        publish.push(addr);
    }
    let (admin, l) = bind_tcp("127.0.0.1");
    bindings.tcp.insert(admin, l);
    let (api, l) = match spec.api {
        Some(a) => (a, sockets::listen_tcp(a).expect("rebind api")),
        None => bind_tcp("127.0.0.1"),
    };
    bindings.tcp.insert(api, l);
    let state = spec
        .state
        .clone()
        .unwrap_or_else(|| Arc::new(tempfile::tempdir().expect("state")));
    let text = hub_toml(pki, &spec, quic, &publish, (admin, api), state.path());
    let running = role::start(load(&text), bindings)
        .await
        .expect("hub starts");
    HubNode {
        running,
        quic,
        publish,
        api,
        state,
        config_text: text,
    }
}

/// A service of a test edge: (name, target, allow list as TOML, app_protocol, max_connections).
pub type ServiceSpec<'a> = (&'a str, SocketAddr, &'a str, Option<&'a str>, Option<u32>);

/// An edge: legacy zone 127.0.N.0/24, extranet 127.0.0.0/24.
pub struct EdgeSpec<'a> {
    pub id: &'a str,
    pub net: u8,
    pub level: u8,
    pub hubs: Vec<SocketAddr>,
    pub services: Vec<ServiceSpec<'a>>,
    /// DEVICE/SERVICE reached through access listeners.
    pub accesses: Vec<&'a str>,
    /// Use another CA's certificate (must be issued already).
    pub cert: Option<(PathBuf, PathBuf, PathBuf)>,
    /// `bandwidth` of every service.
    pub bandwidth: Option<&'a str>,
    /// TOML appended as is (channels).
    pub extra: &'a str,
    /// TOML keys added to every service table (`http_allow = [...]`).
    pub service_keys: &'a str,
    /// Bind an `[[ingest]]` listener in the legacy zone.
    pub ingest: bool,
    /// TOML keys added to the `[[ingest]]` table (`auth = ...`).
    pub ingest_keys: String,
    /// Reuse this state directory (a restart).
    pub state: Option<Arc<tempfile::TempDir>>,
}

impl<'a> EdgeSpec<'a> {
    /// An edge with no services, accesses or caps, and its own certificate.
    pub fn new(id: &'a str, net: u8, level: u8, hubs: Vec<SocketAddr>) -> Self {
        EdgeSpec {
            id,
            net,
            level,
            hubs,
            services: vec![],
            accesses: vec![],
            cert: None,
            bandwidth: None,
            extra: "",
            service_keys: "",
            ingest: false,
            ingest_keys: String::new(),
            state: None,
        }
    }
}

pub struct EdgeNode {
    pub running: Running,
    pub access: Vec<SocketAddr>,
    pub ingest: Option<SocketAddr>,
    pub state: Arc<tempfile::TempDir>,
}

pub fn edge_toml(
    pki: &Pki,
    spec: &EdgeSpec<'_>,
    access: &[SocketAddr],
    admin: SocketAddr,
    state: &Path,
) -> String {
    let (ca, cert, key) = match &spec.cert {
        Some((ca, c, k)) => (ca.clone(), c.clone(), k.clone()),
        None => (
            pki.ca().join("ca.pem"),
            pki.dir.path().join(format!("certs/{}.pem", spec.id)),
            pki.dir.path().join(format!("certs/{}.key", spec.id)),
        ),
    };
    let hubs: Vec<String> = spec.hubs.iter().map(|h| format!("\"{h}\"")).collect();
    let mut s = format!(
        "[node]\nid = \"{id}\"\nrole = \"edge\"\nstate_dir = \"{state}\"\n\n[[zone]]\nname = \"lab\"\nkind = \"legacy\"\nclassified = false\nlevel = {level}\nnetworks = [\"127.0.{net}.0/24\"]\nassessment = {{ id = \"T-1\", valid_until = 2099-12-31 }}\n\n[[zone]]\nname = \"extranet\"\nkind = \"extranet\"\nlevel = {level}\nnetworks = [\"127.0.0.0/24\"]\n\n[uplink]\nhubs = [{hubs}]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n[admin]\nlisten = \"{admin}\"\n",
        id = spec.id,
        state = state.display(),
        level = spec.level,
        net = spec.net,
        hubs = hubs.join(", "),
        ca = ca.display(),
        cert = cert.display(),
        key = key.display(),
    );
    for (name, target, allow, app, max) in &spec.services {
        s += &format!(
            "\n[[service]]\nname = \"{name}\"\nzone = \"lab\"\ntarget = \"{target}\"\nallow = [{allow}]\n"
        );
        if let Some(a) = app {
            s += &format!("app_protocol = \"{a}\"\n");
        }
        s += spec.service_keys;
        // A service named "udp-..." is UDP, with flows expiring after 1 s idle.
        if name.starts_with("udp-") {
            s += "protocol = \"udp\"\nidle_timeout = \"1s\"\n";
        }
        if let Some(m) = max {
            s += &format!("max_connections = {m}\n");
        }
        if let Some(b) = spec.bandwidth {
            s += &format!("bandwidth = \"{b}\"\n");
        }
    }
    // An access written "udp:DEVICE/SERVICE" is a UDP access.
    for (svc, addr) in spec.accesses.iter().zip(access) {
        let (svc, proto) = match svc.strip_prefix("udp:") {
            Some(svc) => (svc, "udp"),
            None => (*svc, "tcp"),
        };
        s += &format!(
            "\n[[access]]\nlisten = \"{addr}\"\nzone = \"lab\"\nservice = \"{svc}\"\nprotocol = \"{proto}\"\n"
        );
    }
    s
}

pub async fn start_edge(pki: &Pki, spec: EdgeSpec<'_>) -> EdgeNode {
    if spec.cert.is_none() {
        pki.issue(spec.id);
    }
    let mut bindings = Bindings::default();
    let mut access = Vec::new();
    for a in &spec.accesses {
        if a.starts_with("udp:") {
            let u =
                std::net::UdpSocket::bind(format!("127.0.{}.1:0", spec.net)).expect("udp access");
            let addr = u.local_addr().expect("addr");
            bindings.udp_listeners.insert(addr, u);
            access.push(addr);
            continue;
        }
        let (addr, l) = bind_tcp(&format!("127.0.{}.1", spec.net));
        bindings.tcp.insert(addr, l);
        access.push(addr);
    }
    let (admin, l) = bind_tcp("127.0.0.1");
    bindings.tcp.insert(admin, l);
    let state = spec
        .state
        .clone()
        .unwrap_or_else(|| Arc::new(tempfile::tempdir().expect("state")));
    let mut text = edge_toml(pki, &spec, &access, admin, state.path());
    let mut ingest = None;
    if spec.ingest {
        let (addr, l) = bind_tcp(&format!("127.0.{}.1", spec.net));
        bindings.tcp.insert(addr, l);
        text += &format!(
            "\n[[ingest]]\nzone = \"lab\"\nlisten = \"{addr}\"\n{}",
            spec.ingest_keys
        );
        ingest = Some(addr);
    }
    text += spec.extra;
    let running = role::start(load(&text), bindings)
        .await
        .expect("edge starts");
    EdgeNode {
        running,
        access,
        ingest,
        state,
    }
}

/// A minimal HTTP/1.0 POST; returns the status code and the body.
pub async fn http_post(
    addr: SocketAddr,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    http_request(addr, "POST", path, content_type, body).await
}

async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let s = connect_from_zone(addr).await;
    http_exchange(s, method, path, content_type, "", body).await
}

/// A POST from inside the zone with extra header lines (`"Authorization: ...\r\n"`).
pub async fn http_post_with(
    addr: SocketAddr,
    path: &str,
    content_type: Option<&str>,
    headers: &str,
    body: &[u8],
) -> (u16, String) {
    let s = connect_from_zone(addr).await;
    http_exchange(s, "POST", path, content_type, headers, body).await
}

/// The same over HTTPS with `tls` (the server named by its address); `None`
/// when the handshake fails.
pub async fn https_request(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Option<(u16, String)> {
    let s = connect_from_zone(addr).await;
    let server = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(server, s)
        .await
        .ok()?;
    try_http_exchange(tls, method, path, content_type, "", body)
        .await
        .ok()
}

/// One HTTP/1.0 request on `s`; returns the status code and the body.
pub async fn http_exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: S,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    headers: &str,
    body: &[u8],
) -> (u16, String) {
    try_http_exchange(s, method, path, content_type, headers, body)
        .await
        .expect("an answer")
}

/// [`http_exchange`], or why no answer came (a TLS alert, a close).
pub async fn try_http_exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    headers: &str,
    body: &[u8],
) -> Result<(u16, String), String> {
    let ct = content_type
        .map(|c| format!("Content-Type: {c}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: x\r\n{ct}{headers}Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    // A server may answer (413) and close before the whole body is sent.
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out).await {
        if out.is_empty() {
            return Err(format!("read: {e}"));
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Where a test client connects from to reach `addr`: a listener on a test
/// edge's legacy network (127.0.N.x, N > 0) is reached from 127.0.N.200,
/// inside that zone, as a producer on that network would; anything else from
/// the kernel's choice.
pub fn source_for(addr: SocketAddr) -> Option<std::net::IpAddr> {
    match addr.ip() {
        std::net::IpAddr::V4(v4) if v4.octets()[0] == 127 && v4.octets()[2] != 0 => {
            let o = v4.octets();
            Some(std::net::Ipv4Addr::new(127, o[1], o[2], 200).into())
        }
        _ => None,
    }
}

/// A TCP connection to `addr` from [`source_for`] it.
pub async fn connect_from_zone(addr: SocketAddr) -> TcpStream {
    let Some(src) = source_for(addr) else {
        return TcpStream::connect(addr).await.expect("connect");
    };
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::new(src, 0)).expect("bind the source");
    s.connect(addr).await.expect("connect")
}

/// A minimal HTTP/1.0 request without a body; returns the status code and the body.
pub async fn http_get(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    http_request(addr, method, path, None, b"").await
}

/// A legacy TCP echo server on `ip`, counting the bytes and connections it sees.
pub struct Echo {
    pub addr: SocketAddr,
    pub bytes: Arc<AtomicU64>,
    pub conns: Arc<AtomicUsize>,
}

pub async fn echo(ip: &str) -> Echo {
    let std = sockets::listen_tcp(format!("{ip}:0").parse().expect("addr")).expect("bind echo");
    std.set_nonblocking(true).expect("nonblocking");
    let l = TcpListener::from_std(std).expect("echo listener");
    let addr = l.local_addr().expect("addr");
    let bytes = Arc::new(AtomicU64::new(0));
    let conns = Arc::new(AtomicUsize::new(0));
    let (b, c) = (bytes.clone(), conns.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let b = b.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            b.fetch_add(n as u64, Ordering::SeqCst);
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Echo { addr, bytes, conns }
}

/// A legacy web server (hyper, HTTP/1.1 with keep-alive): answers every
/// request `200` with "METHOD PATH" as its body, and records the requests it
/// saw and the bytes that reached it.
pub struct WebServer {
    pub addr: SocketAddr,
    pub bytes: Arc<AtomicU64>,
    pub seen: Arc<std::sync::Mutex<Vec<String>>>,
}

impl WebServer {
    /// The requests seen so far, as "METHOD PATH".
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// A TCP stream that counts the bytes read from it.
struct Counted {
    inner: TcpStream,
    bytes: Arc<AtomicU64>,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.bytes.fetch_add(n as u64, Ordering::SeqCst);
        r
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Starts a [`WebServer`] on `ip`, port 0.
pub async fn web_server(ip: &str) -> WebServer {
    let std = sockets::listen_tcp(format!("{ip}:0").parse().expect("addr")).expect("bind web");
    std.set_nonblocking(true).expect("nonblocking");
    let l = TcpListener::from_std(std).expect("web listener");
    let addr = l.local_addr().expect("addr");
    let bytes = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (b, s) = (bytes.clone(), seen.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let io = hyper_util::rt::TokioIo::new(Counted {
                inner: tcp,
                bytes: b.clone(),
            });
            let s = s.clone();
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let line = format!("{} {}", req.method(), req.uri());
                    if let Ok(mut seen) = s.lock() {
                        seen.push(line.clone());
                    }
                    async move {
                        // Read the body whole before answering.
                        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(line)),
                        ))
                    }
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .half_close(true)
                    .serve_connection(io, service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    WebServer { addr, bytes, seen }
}

/// Sends `payload` on a new connection to `to` (from `from_ip`), closes for
/// writing, and returns everything read back until EOF (or the error).
pub async fn round_trip(
    to: SocketAddr,
    from_ip: &str,
    payload: Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(format!("{from_ip}:0").parse().expect("addr"))?;
    let s: TcpStream = sock.connect(to).await?;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await?;
        w.shutdown().await
    });
    let mut back = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut back)).await;
    let _ = writer.await;
    match read {
        Ok(Ok(_)) => Ok(back),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no EOF within 60 s",
        )),
    }
}

/// Audit records of a node's state directory, as text lines.
pub fn audit_lines(state: &Path) -> Vec<String> {
    let log = gateway_store::audit::AuditLog::open_existing(state).expect("audit db");
    log.verify().expect("audit chain intact");
    log.records(0, usize::MAX)
        .expect("records")
        .into_iter()
        .map(|r| {
            format!(
                "{} {} {} {} [{}] {}",
                r.event.event,
                r.event.subject,
                r.event.object,
                r.event.outcome,
                r.event.rule,
                r.event.detail
            )
        })
        .collect()
}

/// A legacy UDP echo server on `ip`, counting the datagrams it sees.
pub async fn udp_echo(ip: &str) -> (SocketAddr, Arc<AtomicUsize>) {
    let s = tokio::net::UdpSocket::bind((ip, 0))
        .await
        .expect("bind udp echo");
    let addr = s.local_addr().expect("addr");
    let seen = Arc::new(AtomicUsize::new(0));
    let c = seen.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            c.fetch_add(1, Ordering::SeqCst);
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    (addr, seen)
}

/// The usual pair: hub `hub-01` publishing `edge-b/NAME`, and edge `edge-b`
/// (legacy 127.0.2.0/24) serving NAME at `target` to the extranet, tunnel up.
pub async fn hub_and_edge(
    pki: &Pki,
    level: u8,
    service: ServiceSpec<'_>,
    bandwidth: Option<&str>,
) -> (HubNode, EdgeNode) {
    let publish = format!("edge-b/{}", service.0);
    let publish = if service.0.starts_with("udp-") {
        format!("udp:{publish}")
    } else {
        publish
    };
    let publishes = [publish.as_str()];
    let hub = start_hub(pki, HubSpec::new("hub-01", level, &publishes)).await;
    let edge = start_edge(
        pki,
        EdgeSpec {
            services: vec![service],
            bandwidth,
            ..EdgeSpec::new("edge-b", 2, level, vec![hub.quic])
        },
    )
    .await;
    wait_for("the edge's tunnel", Duration::from_secs(10), || {
        edge.running.ready()
    })
    .await;
    (hub, edge)
}

/// A consumer of a hub's sink, as an application holds one: a certificate the
/// hub's CA issued it (`NAME.consumer`), recorded in the hub's registry and
/// granted streams in its sink, as `gatewayctl consumer create` and `grant`
/// do (here straight into the hub's files, which the hub shares).
#[derive(Clone)]
pub struct Reader {
    pub api: SocketAddr,
    pub name: String,
    tls: Arc<rustls::ClientConfig>,
}

impl Reader {
    /// Consumer `name` of the in-process hub `hub`, granted `streams`
    /// (DEVICE/CHANNEL).
    pub fn new(pki: &Pki, hub: &HubNode, name: &str, streams: &[&str]) -> Reader {
        Reader::for_hub(pki, hub.state.path(), None, hub.api, name, streams)
    }

    /// Consumer `name` of the hub with state directory `state` (and sink file
    /// `sink`, when shared) serving its API on `api`.
    pub fn for_hub(
        pki: &Pki,
        state: &Path,
        sink: Option<&Path>,
        api: SocketAddr,
        name: &str,
        streams: &[&str],
    ) -> Reader {
        let out = pki.dir.path().join("consumers");
        Reader::for_dirs(&pki.ca(), &out, (state, sink), api, name, streams)
    }

    /// As [`Reader::for_hub`], with the CA in `ca` (`ca.pem`, `ca.key`) and
    /// the consumer's key and certificate written to `out`.
    pub fn for_dirs(
        ca: &Path,
        out: &Path,
        (state, sink): (&Path, Option<&Path>),
        api: SocketAddr,
        name: &str,
        streams: &[&str],
    ) -> Reader {
        use gateway_daemon::tunnel::pki as p;
        use gateway_store::sqlite::{SqliteRegistry, SqliteSink};
        if pg_mode() {
            let (cluster, db, _) = pg_for(sink.unwrap_or(state));
            return Reader::for_postgres_dirs(ca, out, &cluster.store(&db, 2), api, name, streams);
        }
        let (cert, key) = (
            out.join(format!("{name}.pem")),
            out.join(format!("{name}.key")),
        );
        if !cert.exists() {
            std::fs::create_dir_all(out).expect("consumers dir");
            let signer = p::Signer::load(&ca.join("ca.pem"), &ca.join("ca.key")).expect("ca");
            let (key_pem, csr) = p::new_consumer_request(name).expect("csr");
            let now = gateway_daemon::node::clock::now_ms();
            let (pem, not_after_ms, serial) =
                signer.sign_consumer(&csr, name, now, 30).expect("sign");
            SqliteRegistry::open(state)
                .expect("registry")
                .add_consumer(&gateway_store::registry::NewConsumer {
                    name: name.into(),
                    serial,
                    not_after_ms,
                    by: "test".into(),
                    now_ms: now,
                })
                .expect("add consumer");
            p::write_new(&key, &key_pem, 0o600).expect("key");
            p::write_new(&cert, &pem, 0o600).expect("cert");
        }
        let mut s = match sink {
            Some(f) => SqliteSink::open_file(f),
            None => SqliteSink::open(state),
        }
        .expect("sink");
        for stream in streams {
            let (d, c) = stream.split_once('/').expect("DEVICE/CHANNEL");
            s.grant(d, c, name, 0).expect("grant");
        }
        Reader::with_files(&ca.join("ca.pem"), api, name, Some((&cert, &key)))
    }

    /// Consumer `name` of hubs keeping their state in the PostgreSQL
    /// database `store`, granted `streams`; the consumer is recorded and
    /// granted through the store's traits (on a thread of its own, so callers
    /// inside a runtime may call it).
    pub fn for_postgres(
        pki: &Pki,
        store: &config::PgStore,
        api: SocketAddr,
        name: &str,
        streams: &[&str],
    ) -> Reader {
        let out = pki.dir.path().join("consumers");
        Reader::for_postgres_dirs(&pki.ca(), &out, store, api, name, streams)
    }

    /// As [`Reader::for_postgres`], with the CA in `ca` and the consumer's
    /// files written to `out`.
    pub fn for_postgres_dirs(
        ca: &Path,
        out: &Path,
        store: &config::PgStore,
        api: SocketAddr,
        name: &str,
        streams: &[&str],
    ) -> Reader {
        use gateway_daemon::tunnel::pki as p;
        use gateway_store::registry::Registry as _;
        use gateway_store::sink::{Sink as _, StreamKey};
        let (out, ca) = (out.to_owned(), ca.to_owned());
        let (cert, key) = (
            out.join(format!("{name}.pem")),
            out.join(format!("{name}.key")),
        );
        let (store, owned_name) = (store.clone(), name.to_owned());
        let streams: Vec<String> = streams.iter().map(|s| (*s).to_owned()).collect();
        let (c2, k2, ca2) = (cert.clone(), key.clone(), ca.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let pg = gateway_store::postgres::Pg::open(&store)
                    .await
                    .expect("PostgreSQL");
                if !c2.exists() {
                    std::fs::create_dir_all(&out).expect("consumers dir");
                    let signer =
                        p::Signer::load(&ca2.join("ca.pem"), &ca2.join("ca.key")).expect("ca");
                    let (key_pem, csr) = p::new_consumer_request(&owned_name).expect("csr");
                    let now = gateway_daemon::node::clock::now_ms();
                    let (pem, not_after_ms, serial) = signer
                        .sign_consumer(&csr, &owned_name, now, 30)
                        .expect("sign");
                    gateway_store::postgres::PgRegistry::new(pg.clone())
                        .add_consumer(gateway_store::registry::NewConsumer {
                            name: owned_name.clone(),
                            serial,
                            not_after_ms,
                            by: "test".into(),
                            now_ms: now,
                        })
                        .await
                        .expect("add consumer");
                    p::write_new(&k2, &key_pem, 0o600).expect("key");
                    p::write_new(&c2, &pem, 0o600).expect("cert");
                }
                let sink = gateway_store::postgres::PgSink::new(pg);
                for stream in &streams {
                    let (d, c) = stream.split_once('/').expect("DEVICE/CHANNEL");
                    sink.grant(StreamKey::new(d, c), owned_name.clone(), 0)
                        .await
                        .expect("grant");
                }
            });
        })
        .join()
        .expect("consumer made");
        Reader::with_files(&ca.join("ca.pem"), api, name, Some((&cert, &key)))
    }

    /// A client of `api` trusting `ca_pem`, presenting `identity` (cert,
    /// key), or none.
    pub fn with_files(
        ca_pem: &Path,
        api: SocketAddr,
        name: &str,
        identity: Option<(&Path, &Path)>,
    ) -> Reader {
        use rustls_pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_file_iter(ca_pem).expect("ca") {
            roots.add(c.expect("ca cert")).expect("root");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_root_certificates(roots);
        let tls = match identity {
            Some((cert, key)) => {
                let chain = rustls_pki_types::CertificateDer::pem_file_iter(cert)
                    .expect("cert")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("cert");
                let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).expect("key");
                builder.with_client_auth_cert(chain, key).expect("identity")
            }
            None => builder.with_no_client_auth(),
        };
        Reader {
            api,
            name: name.into(),
            tls: Arc::new(tls),
        }
    }

    /// Its TLS client configuration.
    pub fn tls(&self) -> Arc<rustls::ClientConfig> {
        self.tls.clone()
    }

    /// One HTTPS request (blocking); `None` when the API does not answer.
    pub fn request(&self, method: &str, path: &str) -> Option<(u16, String)> {
        use std::io::{Read as _, Write as _};
        let tcp = std::net::TcpStream::connect_timeout(&self.api, Duration::from_secs(2)).ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let server = rustls_pki_types::ServerName::IpAddress(self.api.ip().into());
        let conn = rustls::ClientConnection::new(self.tls.clone(), server).ok()?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(head.as_bytes()).ok()?;
        let mut out = Vec::new();
        // A close without close_notify after a whole answer is still an answer.
        if s.read_to_end(&mut out).is_err() && out.is_empty() {
            return None;
        }
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            unchunk(body)
        } else {
            body.to_owned()
        };
        Some((status, body))
    }

    /// A connection kept open between requests (blocking).
    pub fn keep_alive(&self) -> Option<Open> {
        let tcp = std::net::TcpStream::connect_timeout(&self.api, Duration::from_secs(2)).ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let server = rustls_pki_types::ServerName::IpAddress(self.api.ip().into());
        let conn = rustls::ClientConnection::new(self.tls.clone(), server).ok()?;
        Some(Open {
            s: rustls::StreamOwned::new(conn, tcp),
        })
    }

    /// [`Reader::request`] from async code; panics when the API does not answer.
    pub async fn get(&self, method: &str, path: &str) -> (u16, String) {
        let (me, method, path) = (self.clone(), method.to_owned(), path.to_owned());
        tokio::task::spawn_blocking(move || me.request(&method, &path))
            .await
            .expect("request thread")
            .unwrap_or_else(|| panic!("the hub API at {} does not answer", self.api))
    }
}

/// An HTTPS connection to a hub API kept open between requests.
pub struct Open {
    s: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
}

impl Open {
    /// One GET on the open connection; the answer must carry Content-Length.
    pub fn get(&mut self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read as _, Write as _};
        let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        self.s.write_all(head.as_bytes()).ok()?;
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if self.s.read(&mut byte).ok()? == 0 {
                return None;
            }
            buf.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        let status = head.split(' ').nth(1)?.parse().ok()?;
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))?
            .trim()
            .parse()
            .ok()?;
        let mut body = vec![0u8; len];
        self.s.read_exact(&mut body).ok()?;
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Whether the hub closes the connection within `limit` (nothing read
    /// from it but its end).
    pub fn wait_closed(&mut self, limit: Duration) -> bool {
        use std::io::Read as _;
        self.s.sock.set_read_timeout(Some(limit)).ok();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 256];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return false;
                }
                Err(_) => return started.elapsed() <= limit,
            }
        }
    }
}

/// The body of a chunked HTTP/1.1 answer.
fn unchunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
