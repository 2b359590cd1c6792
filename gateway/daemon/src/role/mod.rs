//! A running node: [`start`] loads and binds everything of the role its
//! config names (edge or hub) before the node reports itself started, then
//! [`Running`] reloads, drains and stops it. A config that fails its checks
//! never binds anything. Listeners can be handed in pre-bound
//! ([`Bindings`]), so tests bind port 0 and nothing races for ports.
//!
//! The roles are wiring on top of the capabilities: [`edge`] and [`hub`]
//! compose tunnel, relay, channel and fleet; nothing below imports a role.

pub mod edge;
pub mod hub;

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
use crate::fleet::edge::{EdgeFleet, Request};
use crate::node::Ctx;
use crate::node::audit::{AuditSink, AuditWriter};
pub use crate::node::sockets::Bindings;
use crate::node::sockets::listen_tcp;
use crate::relay::access::access_listener;
use crate::relay::publish::publish_listener;
use crate::tunnel::devices::Devices;
use crate::tunnel::endpoint::EndpointError;
use crate::tunnel::tls::{self, TlsError};
pub use hub::open_registry;

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
    Sink(gateway_store::error::StoreError),
    /// The hub's PostgreSQL could not be reached, set up or migrated.
    #[error("hub store: {0}")]
    Store(gateway_store::postgres::OpenError),
    /// The hub's fleet registry could not be opened.
    #[error("central management: {0}")]
    Registry(#[from] gateway_store::registry::RegistryError),
    /// The hub's CA could not be loaded.
    #[error("central management: {0}")]
    Fleet(String),
    /// An alarm forwarding target's TLS material or token cannot be read.
    #[error("{0}")]
    Alarms(String),
    /// The state directory could not be created.
    #[error("state_dir {path}: {source}")]
    StateDir {
        /// The directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl From<EndpointError> for StartError {
    fn from(e: EndpointError) -> Self {
        match e {
            EndpointError::Tls(e) => StartError::Tls(e),
            EndpointError::Bind { addr, source } => StartError::Bind { addr, source },
        }
    }
}

fn bind_err(addr: SocketAddr) -> impl FnOnce(std::io::Error) -> StartError {
    move |source| StartError::Bind { addr, source }
}

/// The bound sockets of a role's `[[publish]]` or `[[access]]` entries.
struct Fronts<T> {
    /// TCP listeners, with their entries.
    tcp: Vec<(T, TcpListener)>,
    /// UDP sockets, with their entries.
    udp: Vec<(T, Arc<tokio::net::UdpSocket>)>,
}

/// Binds (or takes from `bindings`) the socket of every entry; `at` says an
/// entry's protocol and address.
fn bind_fronts<T: Clone>(
    entries: &[T],
    bindings: &mut Bindings,
    at: impl Fn(&T) -> (Protocol, SocketAddr),
) -> Result<Fronts<T>, StartError> {
    let mut fronts = Fronts {
        tcp: Vec::new(),
        udp: Vec::new(),
    };
    for e in entries {
        let (protocol, listen) = at(e);
        match protocol {
            Protocol::Tcp => {
                let l = bindings.tcp(listen).map_err(bind_err(listen))?;
                fronts.tcp.push((e.clone(), l));
            }
            Protocol::Udp => {
                let s = bindings.udp(listen).map_err(bind_err(listen))?;
                fronts.udp.push((e.clone(), s));
            }
        }
    }
    Ok(fronts)
}

/// What a node started that reload and drain need.
struct Tasks {
    /// The stop token of each relay listener, by its address.
    listeners: HashMap<SocketAddr, CancellationToken>,
    /// The admin and API servers; drain waits for their listeners to close.
    servers: Vec<tokio::task::JoinHandle<()>>,
    /// Stops those servers.
    admin_stop: CancellationToken,
}

impl Tasks {
    /// Starts the relay listener on `listen` that `run` makes of its stop
    /// token; the token is kept, so a reload that removes the listener stops it.
    fn spawn_listener<F>(&mut self, listen: SocketAddr, run: impl FnOnce(CancellationToken) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        self.listeners.insert(listen, stop.clone());
        tokio::spawn(run(stop));
    }
}

/// A running node.
pub struct Running {
    ctx: Arc<Ctx>,
    endpoints: Vec<quinn::Endpoint>,
    role: RoleState,
    tasks: Mutex<Tasks>,
    writer: Mutex<Option<AuditWriter>>,
    /// Where the admin listener is bound.
    pub admin_addr: SocketAddr,
    /// The hub's QUIC address (hubs only).
    pub quic_addr: Option<SocketAddr>,
    /// The operators' HTTPS API address (hubs with `[hub].ops`).
    pub ops_addr: Option<SocketAddr>,
    fleet_requests: Mutex<Option<tokio::sync::mpsc::Receiver<Request>>>,
}

enum RoleState {
    Edge(Arc<edge::Tunnels>),
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

/// Starts a node for a checked `config`. Must run inside a tokio runtime.
///
/// # Errors
/// When TLS material, the audit database or a listener cannot be set up; then
/// nothing is left running.
pub async fn start(config: Config, mut bindings: Bindings) -> Result<Running, StartError> {
    crate::os::private_files();
    crate::os::private_dir(&config.node.state_dir).map_err(|source| StartError::StateDir {
        path: config.node.state_dir.display().to_string(),
        source,
    })?;
    if let Some(mode) = crate::os::open_to_others(&config.node.state_dir) {
        warn!(
            state_dir = %config.node.state_dir.display(),
            mode = format!("{mode:04o}"),
            "The state directory is open to other users; chmod 700 it (databases, keys and spool files live there)"
        );
    }
    // A hub's store before any socket: a hub that cannot reach its database
    // says so and holds no port.
    let mut stores = match &config.role {
        Role::Hub(h) => Some(hub::open_stores(h, &config.node.state_dir).await?),
        Role::Edge(_) => None,
    };
    let alarm_config = config.alarms.clone();
    let forwarders =
        crate::detect::forward::forwarders(&alarm_config).map_err(StartError::Alarms)?;
    let (audit, writer) = AuditSink::start(&config.node.state_dir, &config.node.id)?;
    let admin_listener = bindings
        .tcp(config.admin.listen)
        .map_err(bind_err(config.admin.listen))?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(bind_err(config.admin.listen))?;
    let id = config.node.id.clone();
    let role = config.role.clone();
    let state_dir = config.node.state_dir.clone();
    let retention_days = config.audit.retention_days;
    let (fleet_tx, fleet_rx) = tokio::sync::mpsc::channel(4);
    let ctx = Ctx::new(id.clone(), Policy::new(config), audit);
    crate::detect::restore(&ctx, &state_dir);
    crate::detect::watch_dropped(&ctx, bindings.nflog.take());
    let mut tasks = Tasks {
        listeners: HashMap::new(),
        servers: Vec::new(),
        admin_stop: CancellationToken::new(),
    };
    let mut taps = Vec::new();
    let (endpoints, state, quic_addr, ops_addr, readiness) = match &role {
        Role::Hub(h) => {
            let stores = stores
                .take()
                .ok_or(StartError::Fleet("the hub's store".into()))?;
            let started = hub::start(
                &ctx,
                h,
                stores,
                &mut bindings,
                (&state_dir, retention_days),
                &mut tasks,
            )?;
            taps.push(started.alarms);
            (
                started.endpoints,
                RoleState::Hub(started.devices),
                started.quic_addr,
                started.ops_addr,
                Readiness::Hub,
            )
        }
        Role::Edge(e) => {
            let (endpoints, tunnels) =
                edge::start(&ctx, e, &mut bindings, &state_dir, fleet_tx, &mut tasks)?;
            (
                endpoints,
                RoleState::Edge(tunnels),
                None,
                None,
                Readiness::Edge,
            )
        }
    };
    tokio::spawn(crate::node::watch_refusals(ctx.clone()));
    let mut wake = Vec::new();
    for f in forwarders {
        let w = Arc::new(tokio::sync::Notify::new());
        wake.push(w.clone());
        tokio::spawn(crate::detect::forward::run(
            ctx.clone(),
            state_dir.clone(),
            f,
            (alarm_config.min_severity, alarm_config.down_after),
            w,
        ));
    }
    tokio::spawn(crate::detect::run(
        ctx.clone(),
        state_dir.clone(),
        taps,
        wake,
    ));
    let admin_listener = crate::node::http::Listener {
        tcp: admin_listener,
        security: crate::node::http::Security::Plain,
        what: "Admin",
        limits: ctx.http_limits(),
    };
    tasks.servers.push(tokio::spawn(crate::node::http::serve(
        Some(ctx.clone()),
        admin_listener,
        match &state {
            RoleState::Edge(tunnels) => admin::router(ctx.metrics.clone(), readiness)
                .merge(crate::fleet::firmware::edge_routes(tunnels.hubs.clone())),
            RoleState::Hub(_) => admin::router(ctx.metrics.clone(), readiness),
        },
        |addr, _| addr,
        tasks.admin_stop.clone(),
    )));
    ctx.audit
        .record(&id, "node", "node.start", "ok", "", String::new());
    Ok(Running {
        ctx,
        endpoints,
        role: state,
        tasks: Mutex::new(tasks),
        writer: Mutex::new(Some(writer)),
        admin_addr,
        quic_addr,
        ops_addr,
        fleet_requests: Mutex::new(Some(fleet_rx)),
    })
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
        if let Some(what) = gateway_core::config::restart::restart_needed(old.config(), &config) {
            return Err(ReloadError::NeedsRestart(what));
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
        let mut tasks = self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Bind every new listener first, so that a failure changes nothing.
        let mut fresh = Vec::new();
        for addr in wanted.iter().filter(|a| !tasks.listeners.contains_key(a)) {
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
                let trust =
                    crate::fleet::edge::trust_path(&config.node.state_dir, &after.uplink.ca.path);
                let client = tls::client(&trust, &after.uplink.cert.path, &after.uplink.key.path)
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
            // Renewals and a delivered bundle use the files now in force.
            if let (Some(f), Role::Edge(e)) = (tunnels.fleet(), &self.ctx.policy().config().role) {
                f.set_uplink(
                    e.uplink.ca.path.clone(),
                    e.uplink.cert.path.clone(),
                    e.uplink.key.path.clone(),
                );
            }
            info!(
                hubs = hubs.len(),
                "Uplink changed: reconnecting every tunnel"
            );
            tunnels.restart(&self.ctx, &hubs);
        }
        tasks.listeners.retain(|addr, stop| {
            let keep = wanted.contains(addr);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for (addr, listener) in fresh {
            let ctx = self.ctx.clone();
            match &self.role {
                RoleState::Hub(devices) => {
                    let devices = devices.clone();
                    tasks.spawn_listener(addr, |stop| {
                        publish_listener(ctx, devices, addr, listener, stop)
                    });
                }
                RoleState::Edge(tunnels) => {
                    let hubs = tunnels.hubs.clone();
                    tasks.spawn_listener(addr, |stop| {
                        access_listener(ctx, hubs, addr, listener, stop)
                    });
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
    pub fn edge_fleet(&self) -> Option<Arc<EdgeFleet>> {
        match &self.role {
            RoleState::Edge(t) => t.fleet(),
            RoleState::Hub(_) => None,
        }
    }

    /// What the edge's control sessions ask of the main loop (taken once).
    pub fn take_fleet_requests(&self) -> Option<tokio::sync::mpsc::Receiver<Request>> {
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
        let servers = {
            let mut tasks = self
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            tasks.admin_stop.cancel();
            std::mem::take(&mut tasks.servers)
        };
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
        // Every audit handle goes first (the role's wiring holds the context
        // too): the writer stops once the last one is dropped.
        drop(self);
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
