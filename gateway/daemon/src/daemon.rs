//! Starting, reloading and draining a node (edge or hub).
//!
//! Everything is loaded and bound before the node reports itself started; a
//! config that fails its checks never binds anything. Listeners can be handed in
//! pre-bound ([`Bindings`]), so tests bind port 0 and nothing races for ports.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway_core::config::{Config, Protocol, Role};
use gateway_core::policy::Policy;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, Readiness};
use crate::audit_sink::{AuditSink, AuditWriter};
use crate::edge::{self, Hubs};
use crate::hub::{self, Devices};
use crate::node::Ctx;
use crate::tls::{self, TlsError};

/// Sockets bound by the caller, used instead of binding the config's addresses.
#[derive(Default)]
pub struct Bindings {
    /// TCP listeners by the address the config names.
    pub tcp: HashMap<SocketAddr, std::net::TcpListener>,
    /// The hub's QUIC socket.
    pub udp: Option<std::net::UdpSocket>,
    /// UDP publish and access sockets by the address the config names.
    pub udp_listeners: HashMap<SocketAddr, std::net::UdpSocket>,
    /// The config in force as (managed version, text), for central management
    /// (`gatewayd run` fills it in; version 0 is the local file).
    pub config_source: Option<(u64, String)>,
}

/// Accept queue of every TCP listener: bursts of connections are queued, not reset
/// (std's default of 128 overflows when a thousand clients connect at once).
pub const BACKLOG: i32 = 4096;

/// Binds a TCP listener with [`BACKLOG`] and `SO_REUSEADDR`.
///
/// # Errors
/// When the address cannot be bound.
pub fn listen_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// Binds a UDP socket that other sockets of this process may bind too
/// (`SO_REUSEPORT`): the kernel spreads peers over them by address hash, so each
/// has its own QUIC endpoint driver and the hub's receive path uses every core.
///
/// # Errors
/// When the address cannot be bound.
pub fn bind_udp_shared(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Socket buffer asked for on each tunnel UDP socket, each way.
pub const UDP_BUFFER: usize = 4 << 20;

/// Gives a tunnel UDP socket [`UDP_BUFFER`] each way. Linux's default (208 KiB)
/// overflows under a burst of large QUIC packets: the datagrams are dropped,
/// QUIC takes the loss for congestion and slows down, and path MTU discovery
/// can take it for an MTU black hole. The kernel caps the size at
/// `net.core.rmem_max` / `wmem_max`; a capped size is logged with the fix.
pub fn size_udp_buffers(socket: &std::net::UdpSocket) {
    let s = socket2::SockRef::from(socket);
    let _ = s.set_recv_buffer_size(UDP_BUFFER);
    let _ = s.set_send_buffer_size(UDP_BUFFER);
    // Linux reports twice the size asked for (bookkeeping included).
    let got = s
        .recv_buffer_size()
        .unwrap_or(0)
        .min(s.send_buffer_size().unwrap_or(0))
        / 2;
    static ONCE: std::sync::Once = std::sync::Once::new();
    if got < UDP_BUFFER {
        ONCE.call_once(|| tracing::warn!(
            wanted = UDP_BUFFER,
            got,
            "UDP socket buffers capped by the kernel; bursts may be dropped. \
             Raise them with `sysctl -w net.core.rmem_max={UDP_BUFFER} net.core.wmem_max={UDP_BUFFER}` \
             (the package's /usr/lib/sysctl.d/90-gatewayd.conf does at boot)"
        ));
    }
}

impl Bindings {
    /// The UDP socket for a publish or access on `addr`: handed in, or bound.
    fn udp(&mut self, addr: SocketAddr) -> Result<Arc<tokio::net::UdpSocket>, StartError> {
        let std = match self.udp_listeners.remove(&addr) {
            Some(s) => s,
            None => std::net::UdpSocket::bind(addr).map_err(bind_err(addr))?,
        };
        std.set_nonblocking(true).map_err(bind_err(addr))?;
        let socket = tokio::net::UdpSocket::from_std(std).map_err(bind_err(addr))?;
        Ok(Arc::new(socket))
    }

    fn tcp(&mut self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        let l = match self.tcp.remove(&addr) {
            Some(l) => l,
            None => listen_tcp(addr)?,
        };
        l.set_nonblocking(true)?;
        TcpListener::from_std(l)
    }
}

/// Starting failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS material is missing, unreadable or too open.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The audit database could not be opened.
    #[error("{0}")]
    Audit(#[from] gateway_store::audit::OpenError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The record buffer could not be opened.
    #[error("record buffer: {0}")]
    Buffer(String),
    /// The hub's sink could not be opened.
    #[error("sink: {0}")]
    Sink(#[from] gateway_store::sink::SinkError),
    /// The hub's fleet registry or CA could not be opened.
    #[error("central management: {0}")]
    Fleet(String),
    /// The state directory could not be created.
    #[error("state_dir {path}: {source}")]
    StateDir {
        /// The directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running node.
pub struct Running {
    ctx: Arc<Ctx>,
    endpoints: Vec<quinn::Endpoint>,
    listeners: Mutex<HashMap<SocketAddr, CancellationToken>>,
    role: RoleState,
    admin_stop: CancellationToken,
    /// The admin and hub API servers; drain waits for their listeners to close.
    servers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    writer: Mutex<Option<AuditWriter>>,
    /// Where the admin listener and the hub's QUIC socket are bound.
    pub admin_addr: SocketAddr,
    /// The hub's QUIC address (hubs only).
    pub quic_addr: Option<SocketAddr>,
    /// The operators' HTTPS API address (hubs with `[hub].ops`).
    pub ops_addr: Option<SocketAddr>,
    fleet_requests: Mutex<Option<tokio::sync::mpsc::Receiver<crate::fleet::edge::Request>>>,
}

/// An edge's tunnels: the hubs' slots, the lanes' endpoints, the TLS client
/// configuration, and the token that stops this generation of tunnel tasks.
struct Tunnels {
    hubs: Arc<Hubs>,
    endpoints: Vec<quinn::Endpoint>,
    client: crate::tls::ClientHolder,
    stop: Mutex<CancellationToken>,
    fleet: Option<Arc<crate::fleet::edge::EdgeFleet>>,
}

enum RoleState {
    Edge(Arc<Tunnels>),
    Hub(Arc<Devices>),
}

impl Running {
    /// The shared state (metrics, audit) of the node.
    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    /// Whether an edge has at least one hub tunnel up (hubs: always).
    pub fn ready(&self) -> bool {
        match &self.role {
            RoleState::Edge(t) => t.hubs.any_up(),
            RoleState::Hub(_) => true,
        }
    }
}

fn bind_err(addr: SocketAddr) -> impl FnOnce(std::io::Error) -> StartError {
    move |source| StartError::Bind { addr, source }
}

/// Starts a node for a checked `config`. Must run inside a tokio runtime.
///
/// # Errors
/// When TLS material, the audit database or a listener cannot be set up; then
/// nothing is left running.
pub async fn start(config: Config, mut bindings: Bindings) -> Result<Running, StartError> {
    std::fs::create_dir_all(&config.node.state_dir).map_err(|source| StartError::StateDir {
        path: config.node.state_dir.display().to_string(),
        source,
    })?;
    let (audit, writer) = AuditSink::start(&config.node.state_dir, &config.node.id)?;
    let admin_listener = bindings
        .tcp(config.admin.listen)
        .map_err(bind_err(config.admin.listen))?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(bind_err(config.admin.listen))?;
    let id = config.node.id.clone();
    let role = config.role.clone();
    let config_state_dir = config.node.state_dir.clone();
    let retention_days = config.audit.retention_days;
    let mut ops_addr = None;
    let (fleet_tx, fleet_rx) = tokio::sync::mpsc::channel(4);
    let config_source = bindings.config_source.take();
    let ctx = Ctx::new(id.clone(), Policy::new(config), audit);
    let admin_stop = CancellationToken::new();
    let mut servers = Vec::new();
    let runtime = Arc::new(quinn::TokioRuntime);
    let mut listeners = HashMap::new();
    let (endpoints, state, quic_addr, readiness) = match role {
        Role::Hub(h) => {
            let server = tls::server(
                &h.settings.ca_cert.path,
                &h.settings.cert.path,
                &h.settings.key.path,
            )?;
            let first = match bindings.udp.take() {
                Some(s) => s,
                None => bind_udp_shared(h.settings.listen).map_err(bind_err(h.settings.listen))?,
            };
            let bound_at = first.local_addr().map_err(bind_err(h.settings.listen))?;
            size_udp_buffers(&first);
            let mut sockets = vec![first];
            // One endpoint per core on the same port; a socket bound without
            // SO_REUSEPORT (handed in by a caller) stays alone.
            for _ in 1..edge::lanes() {
                match bind_udp_shared(bound_at) {
                    Ok(s) => {
                        size_udp_buffers(&s);
                        sockets.push(s);
                    }
                    Err(_) => break,
                }
            }
            let endpoint_config = tls::hub_endpoint_config(&config_state_dir)?;
            let mut endpoints = Vec::new();
            for socket in sockets {
                endpoints.push(
                    quinn::Endpoint::new(
                        endpoint_config.clone(),
                        Some(server.clone()),
                        socket,
                        runtime.clone(),
                    )
                    .map_err(bind_err(h.settings.listen))?,
                );
            }
            let endpoint = endpoints[0].clone();
            let quic_addr = endpoint.local_addr().ok();
            let devices = Arc::new(Devices::default());
            let mut bound = Vec::new();
            let mut udp_bound = Vec::new();
            for p in &h.publishes {
                match p.protocol {
                    Protocol::Tcp => bound.push((
                        p.clone(),
                        bindings.tcp(p.listen).map_err(bind_err(p.listen))?,
                    )),
                    Protocol::Udp => udp_bound.push((p.clone(), bindings.udp(p.listen)?)),
                }
            }
            for (p, socket) in udp_bound {
                // UDP publishes change only with a restart (see reload).
                let front = crate::udp::Front::publish(&p, &devices);
                tokio::spawn(crate::udp::front(ctx.clone(), front, socket));
            }
            let sink = crate::hub_sink::SinkHandle::new(match &h.settings.sink {
                Some(file) => gateway_store::sink::Sink::open_file(file)?,
                None => gateway_store::sink::Sink::open(&config_state_dir)?,
            });
            let api = bindings
                .tcp(h.settings.api)
                .map_err(bind_err(h.settings.api))?;
            servers.push(tokio::spawn(crate::api::serve(
                api,
                sink.clone(),
                admin_stop.clone(),
            )));
            {
                let (sink, ctx, devices) = (sink.clone(), ctx.clone(), devices.clone());
                tokio::spawn(async move {
                    sink.resume_forwarding(&ctx, &devices).await;
                    // Consumed records' pages go back to the file system.
                    while ctx.pause(std::time::Duration::from_secs(10)).await {
                        if let Err(error) = sink.with(|s| s.compact()).await {
                            tracing::warn!(%error, "Sink compaction failed");
                        }
                    }
                });
            }
            let signer =
                crate::pki::Signer::load(&h.settings.ca_cert.path, &h.settings.ca_key.path)
                    .map_err(|e| StartError::Fleet(format!("the CA that signs devices: {e}")))?;
            let registry = h
                .settings
                .registry
                .clone()
                .unwrap_or_else(|| config_state_dir.join(gateway_store::fleet::FILE_NAME));
            let fleet = crate::fleet::hub::Fleet::open(
                ctx.clone(),
                devices.clone(),
                &registry,
                signer,
                h.settings.cert_lifetime,
                (&h.settings.cert.path, &h.settings.key.path),
            )
            .map_err(|e| StartError::Fleet(e.to_string()))?;
            tokio::spawn(fleet.clone().prune_loop(retention_days));
            tokio::spawn(fleet.clone().revocation_sweep());
            if let Some(ops) = h.settings.ops {
                let l = bindings.tcp(ops).map_err(bind_err(ops))?;
                ops_addr = l.local_addr().ok();
                let tls = tls::ops_server(&h.settings.cert.path, &h.settings.key.path)?;
                servers.push(tokio::spawn(crate::fleet::ops::serve(
                    fleet.clone(),
                    l,
                    tls,
                    admin_stop.clone(),
                )));
            }
            for e in &endpoints {
                tokio::spawn(hub::accept_edges(
                    ctx.clone(),
                    devices.clone(),
                    sink.clone(),
                    e.clone(),
                    fleet.clone(),
                ));
            }
            for (p, l) in bound {
                let stop = CancellationToken::new();
                listeners.insert(p.listen, stop.clone());
                tokio::spawn(hub::publish_listener(
                    ctx.clone(),
                    devices.clone(),
                    p.listen,
                    l,
                    stop,
                ));
            }
            info!(node = %id, quic = ?quic_addr, endpoints = endpoints.len(), publishes = h.publishes.len(), "Hub started");
            let _ = endpoint;
            (
                endpoints,
                RoleState::Hub(devices),
                quic_addr,
                Readiness::Hub,
            )
        }
        Role::Edge(e) => {
            // A renewal a crash interrupted is finished before the pair is read.
            let recovered = crate::pki::recover_pair(&e.uplink.key.path, &e.uplink.cert.path)
                .map_err(tls::TlsError::Key)?;
            if let Some(what) = recovered {
                tracing::warn!(key = %e.uplink.key.path.display(), "{what}");
            }
            let client: crate::tls::ClientHolder = Arc::new(std::sync::RwLock::new(tls::client(
                &e.uplink.ca.path,
                &e.uplink.cert.path,
                &e.uplink.key.path,
            )?));
            let lanes = edge::lanes();
            let hubs = Hubs::new(&e.uplink.hubs, lanes);
            let fleet = crate::fleet::edge::EdgeFleet::new(
                ctx.policy().config(),
                client.clone(),
                config_source.unwrap_or_default(),
                fleet_tx,
            );
            if let Some(f) = &fleet {
                ctx.metrics.config_version(f.applied().0);
                tokio::spawn(crate::fleet::edge::watch_cert(f.clone(), ctx.clone()));
            }
            let mut bound = Vec::new();
            let mut udp_bound = Vec::new();
            for a in &e.accesses {
                match a.protocol {
                    Protocol::Tcp => bound.push((
                        a.clone(),
                        bindings.tcp(a.listen).map_err(bind_err(a.listen))?,
                    )),
                    Protocol::Udp => udp_bound.push((a.clone(), bindings.udp(a.listen)?)),
                }
            }
            let mut ingest_bound = Vec::new();
            for i in &e.ingests {
                ingest_bound.push((
                    i.zone.clone(),
                    bindings.tcp(i.listen).map_err(bind_err(i.listen))?,
                ));
            }
            if !e.channels.is_empty() || !ingest_bound.is_empty() {
                let writer = crate::buffer::BufferHandle::start(&config_state_dir)
                    .map_err(|e| StartError::Buffer(e.to_string()))?;
                for (zone, l) in ingest_bound {
                    tokio::spawn(crate::ingest::serve(ctx.clone(), zone, l, writer.clone()));
                }
                let inbox = gateway_store::inbox::Inbox::open(&config_state_dir)
                    .map_err(|e| StartError::Buffer(format!("inbox: {e}")))?;
                let _ = ctx.inbox.set((
                    crate::delivery::InboxHandle::new(inbox),
                    config_state_dir.clone(),
                ));
                tokio::spawn(crate::spool::run(
                    ctx.clone(),
                    writer.clone(),
                    config_state_dir.clone(),
                ));
                tokio::spawn(crate::sync::supervise(ctx.clone(), hubs.clone(), writer));
            }
            tokio::spawn(edge::watch_assessments(ctx.clone()));
            // Each lane has its own UDP socket and endpoint driver.
            let any: SocketAddr = ([0, 0, 0, 0], 0).into();
            let mut endpoints = Vec::new();
            for _ in 0..lanes {
                let socket = std::net::UdpSocket::bind(any).map_err(bind_err(any))?;
                size_udp_buffers(&socket);
                endpoints.push(
                    quinn::Endpoint::new(
                        crate::tls::edge_endpoint_config(),
                        None,
                        socket,
                        runtime.clone(),
                    )
                    .map_err(bind_err(any))?,
                );
            }
            let tunnels = Arc::new(Tunnels {
                hubs: hubs.clone(),
                endpoints: endpoints.clone(),
                client,
                stop: Mutex::new(CancellationToken::new()),
                fleet,
            });
            tunnels.spawn(&ctx, &e.uplink.hubs);
            for (a, l) in bound {
                let stop = CancellationToken::new();
                listeners.insert(a.listen, stop.clone());
                tokio::spawn(edge::access_listener(
                    ctx.clone(),
                    hubs.clone(),
                    a.listen,
                    l,
                    stop,
                ));
            }
            for (a, socket) in udp_bound {
                // UDP accesses change only with a restart (see reload).
                let front = crate::udp::Front::access(&a, &hubs);
                tokio::spawn(crate::udp::front(ctx.clone(), front, socket));
            }
            info!(node = %id, hubs = e.uplink.hubs.len(), services = e.services.len(), accesses = e.accesses.len(), "Edge started");
            (endpoints, RoleState::Edge(tunnels), None, Readiness::Edge)
        }
    };
    servers.push(tokio::spawn(admin::serve(
        admin_listener,
        ctx.metrics.clone(),
        readiness,
        admin_stop.clone(),
    )));
    ctx.audit
        .record(&id, "node", "node.start", "ok", "", String::new());
    Ok(Running {
        ctx,
        endpoints,
        listeners: Mutex::new(listeners),
        role: state,
        admin_stop,
        servers: Mutex::new(servers),
        writer: Mutex::new(Some(writer)),
        admin_addr,
        quic_addr,
        ops_addr,
        fleet_requests: Mutex::new(Some(fleet_rx)),
    })
}

impl Tunnels {
    /// Starts a tunnel task per hub and lane, under a fresh stop token.
    fn spawn(&self, ctx: &Arc<Ctx>, hubs: &[gateway_core::units::HostPort]) {
        let stop = CancellationToken::new();
        *self
            .stop
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = stop.clone();
        let lanes = self.endpoints.len();
        self.hubs.reset(hubs.len(), lanes);
        for (i, h) in hubs.iter().enumerate() {
            for (lane, endpoint) in self.endpoints.iter().enumerate() {
                tokio::spawn(edge::keep_tunnel(
                    ctx.clone(),
                    edge::TunnelSpec {
                        hubs: self.hubs.clone(),
                        index: i * lanes + lane,
                        hub: h.clone(),
                        endpoint: endpoint.clone(),
                        client: self.client.clone(),
                        lane,
                        stop: stop.clone(),
                        fleet: if lane == 0 { self.fleet.clone() } else { None },
                    },
                ));
            }
        }
    }

    /// Closes every tunnel and opens them again (to `hubs`).
    fn restart(&self, ctx: &Arc<Ctx>, hubs: &[gateway_core::units::HostPort]) {
        self.stop
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .cancel();
        self.spawn(ctx, hubs);
    }
}

/// Reloading kept the old configuration.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The role or node id changed: that needs a restart.
    #[error("{0} cannot change on reload; restart gatewayd")]
    NeedsRestart(&'static str),
    /// The new uplink's TLS material cannot be loaded.
    #[error("uplink: {0}")]
    Uplink(String),
    /// A new listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The UDP publishes or accesses of a role: (listen, device, service, zone).
fn udp_fronts(role: &Role) -> Vec<(SocketAddr, &str, &str, &str)> {
    let all: Vec<_> = match role {
        Role::Hub(h) => h
            .publishes
            .iter()
            .map(|p| (p.protocol, (p.listen, &*p.device, &*p.service, &*p.zone)))
            .collect(),
        Role::Edge(e) => e
            .accesses
            .iter()
            .map(|a| (a.protocol, (a.listen, &*a.device, &*a.service, &*a.zone)))
            .collect(),
    };
    all.into_iter()
        .filter(|(protocol, _)| *protocol == Protocol::Udp)
        .map(|(_, front)| front)
        .collect()
}

impl Running {
    /// Puts a new checked config in force: the policy is swapped, listeners of
    /// removed publishes or accesses stop (with their relays), new ones start,
    /// and everything unchanged stays up. Uplink and hub settings need a restart.
    ///
    /// # Errors
    /// When the change needs a restart or a new listener cannot be bound; the old
    /// configuration then stays in force.
    pub fn reload(&self, config: Config) -> Result<(), ReloadError> {
        let old = self.ctx.policy();
        if old.config().node.id != config.node.id {
            return Err(ReloadError::NeedsRestart("node.id"));
        }
        let wanted: Vec<SocketAddr> = match (&self.role, &config.role) {
            (RoleState::Hub(_), Role::Hub(h)) => h
                .publishes
                .iter()
                .filter(|p| p.protocol == Protocol::Tcp)
                .map(|p| p.listen)
                .collect(),
            (RoleState::Edge(_), Role::Edge(e)) => e
                .accesses
                .iter()
                .filter(|a| a.protocol == Protocol::Tcp)
                .map(|a| a.listen)
                .collect(),
            _ => return Err(ReloadError::NeedsRestart("node.role")),
        };
        // UDP fronts are bound once at start: a change would be half applied.
        if udp_fronts(&old.config().role) != udp_fronts(&config.role) {
            return Err(ReloadError::NeedsRestart("a UDP [[publish]] or [[access]]"));
        }
        // Listeners bound once at start: a change would be silently ignored.
        let before = old.config();
        if before.admin.listen != config.admin.listen {
            return Err(ReloadError::NeedsRestart("admin.listen"));
        }
        if before.node.user != config.node.user {
            return Err(ReloadError::NeedsRestart("node.user"));
        }
        if before.node.state_dir != config.node.state_dir {
            return Err(ReloadError::NeedsRestart("node.state_dir"));
        }
        if let (Role::Edge(b), Role::Edge(a)) = (&before.role, &config.role) {
            let listens = |e: &gateway_core::config::Edge| -> Vec<(String, SocketAddr)> {
                e.ingests
                    .iter()
                    .map(|i| (i.zone.clone(), i.listen))
                    .collect()
            };
            if listens(b) != listens(a) {
                return Err(ReloadError::NeedsRestart("[[ingest]]"));
            }
        }
        let mut listeners = self
            .listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Bind every new listener first, so that a failure changes nothing.
        let mut fresh = Vec::new();
        for addr in wanted.iter().filter(|a| !listeners.contains_key(a)) {
            let bound = listen_tcp(*addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(TcpListener::from_std)
                .map_err(|source| ReloadError::Bind {
                    addr: *addr,
                    source,
                })?;
            fresh.push((*addr, bound));
        }
        // A changed uplink: new TLS material first (a failure changes nothing),
        // then every tunnel is closed and opened to the new hubs.
        let uplink_change = match (&self.role, &old.config().role, &config.role) {
            (RoleState::Edge(t), Role::Edge(before), Role::Edge(after))
                if uplink_differs(&before.uplink, &after.uplink) =>
            {
                let client = tls::client(
                    &after.uplink.ca.path,
                    &after.uplink.cert.path,
                    &after.uplink.key.path,
                )
                .map_err(|e| ReloadError::Uplink(e.to_string()))?;
                Some((t.clone(), client, after.uplink.hubs.clone()))
            }
            _ => None,
        };
        // Listeners look their publish or access up in the policy at each accept,
        // so a changed entry on an unchanged address takes effect with the policy.
        self.ctx.set_policy(Policy::new(config));
        if let Some((tunnels, client, hubs)) = uplink_change {
            *tunnels
                .client
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = client;
            info!(
                hubs = hubs.len(),
                "Uplink changed: reconnecting every tunnel"
            );
            tunnels.restart(&self.ctx, &hubs);
        }
        listeners.retain(|addr, stop| {
            let keep = wanted.contains(addr);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for (addr, listener) in fresh {
            let stop = CancellationToken::new();
            listeners.insert(addr, stop.clone());
            match &self.role {
                RoleState::Hub(devices) => {
                    tokio::spawn(hub::publish_listener(
                        self.ctx.clone(),
                        devices.clone(),
                        addr,
                        listener,
                        stop,
                    ));
                }
                RoleState::Edge(tunnels) => {
                    tokio::spawn(edge::access_listener(
                        self.ctx.clone(),
                        tunnels.hubs.clone(),
                        addr,
                        listener,
                        stop,
                    ));
                }
            }
        }
        self.ctx.audit.record(
            &self.ctx.id,
            "config",
            "config.reload",
            "ok",
            "",
            String::new(),
        );
        info!("Configuration reloaded");
        self.ctx.recheck_assessments();
        Ok(())
    }

    /// Closes every hub tunnel and opens it again (an edge's `reconnect` command).
    pub fn reconnect(&self) {
        if let RoleState::Edge(t) = &self.role {
            if let Role::Edge(e) = &self.ctx.policy().config().role {
                t.restart(&self.ctx, &e.uplink.hubs);
            }
        }
    }

    /// Whether an edge has a hub tunnel up now.
    pub fn hub_reachable(&self) -> bool {
        self.ready()
    }

    /// Completes when a hub tunnel comes up (never on a hub).
    pub async fn hub_came_up(&self) {
        match &self.role {
            RoleState::Edge(t) => t.hubs.came_up().await,
            RoleState::Hub(_) => std::future::pending().await,
        }
    }

    /// The edge's central management state.
    pub fn edge_fleet(&self) -> Option<Arc<crate::fleet::edge::EdgeFleet>> {
        match &self.role {
            RoleState::Edge(t) => t.fleet.clone(),
            RoleState::Hub(_) => None,
        }
    }

    /// What the edge's control sessions ask of the main loop (taken once).
    pub fn take_fleet_requests(
        &self,
    ) -> Option<tokio::sync::mpsc::Receiver<crate::fleet::edge::Request>> {
        self.fleet_requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Drains: stop accepting, let relays finish for up to `grace`, then cut
    /// them, close the QUIC endpoint cleanly and flush the audit.
    pub async fn drain(&self, grace: Duration) {
        info!(grace_s = grace.as_secs(), "Draining");
        self.ctx.draining.cancel();
        // Listeners stop on `draining`; their stop tokens would also cut the
        // relays they accepted, which must get the grace period.
        self.ctx.tracker.close();
        if tokio::time::timeout(grace, self.ctx.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                open = self.ctx.tracker.len(),
                "Grace period over; cutting the remaining relays"
            );
            self.ctx.kill.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), self.ctx.tracker.wait()).await;
        }
        self.ctx
            .audit
            .record(&self.ctx.id, "node", "node.stop", "ok", "", String::new());
        for e in &self.endpoints {
            e.close(quinn::VarInt::from_u32(0), b"shutdown");
        }
        for e in &self.endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(2), e.wait_idle()).await;
        }
        self.admin_stop.cancel();
        let servers = std::mem::take(
            &mut *self
                .servers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for s in servers {
            let _ = tokio::time::timeout(Duration::from_secs(2), s).await;
        }
    }

    /// Waits for every audit event to be written (after [`Running::drain`]).
    pub fn flush_audit(self) {
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(self.ctx);
        if let Some(w) = writer {
            w.flush_and_stop();
        }
    }
}

fn uplink_differs(a: &gateway_core::config::Uplink, b: &gateway_core::config::Uplink) -> bool {
    a.hubs != b.hubs
        || a.ca.path != b.ca.path
        || a.cert.path != b.cert.path
        || a.key.path != b.key.path
}
