//! The edge role: wiring only. It binds the edge's sockets and composes the
//! capabilities: tunnels to the hubs ([`tunnel::dial`]), access listeners and
//! served services ([`relay`]), ingest, buffer, sync and deliveries
//! ([`channel`]), and its management session ([`fleet`]). What a hub's stream
//! carries is decided here, by its first frame.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use gateway_core::config;
use gateway_core::units::HostPort;
use gateway_core::wire::Frame;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{StartError, Tasks, bind_err, bind_fronts};
use crate::channel::buffer::BufferHandle;
use crate::channel::delivery::{self, InboxHandle};
use crate::channel::{edge_sync, ingest, spool};
use crate::detect::scan::{Clamd, Scanner};
use crate::fleet::edge::{self as managed, EdgeFleet, Request};
use crate::node::sockets::Bindings;
use crate::node::{self, Ctx};
use crate::relay;
use crate::relay::service::OpenRequest;
use crate::relay::udp::flows::{Flows, read_datagrams};
use crate::relay::udp::front::{self, Front};
use crate::tunnel;
use crate::tunnel::accept::{BiStream, Control};
use crate::tunnel::dial::{TunnelSpec, keep_tunnel};
use crate::tunnel::frame::refuse_unexpected;
use crate::tunnel::hubs::{Hubs, lanes};
use crate::tunnel::tls::{self, ClientHolder, TlsError};
use crate::tunnel::{endpoint, pki};

/// An edge's tunnels: the hubs' slots, the lanes' endpoints, the TLS client
/// configuration, what runs on them, and the token that stops this generation
/// of tunnel tasks.
pub(super) struct Tunnels {
    /// The hubs' slots.
    pub hubs: Arc<Hubs>,
    endpoints: Vec<quinn::Endpoint>,
    /// The TLS client configuration (a renewal or a new uplink swaps it).
    pub client: ClientHolder,
    stop: Mutex<CancellationToken>,
    wiring: Arc<Wiring>,
}

/// Binds and starts everything of edge `e`; returns the lanes' endpoints and
/// the tunnels.
pub(super) fn start(
    ctx: &Arc<Ctx>,
    e: &config::Edge,
    bindings: &mut Bindings,
    state_dir: &Path,
    requests: tokio::sync::mpsc::Sender<Request>,
    tasks: &mut Tasks,
) -> Result<(Vec<quinn::Endpoint>, Arc<Tunnels>), StartError> {
    // A renewal a crash interrupted is finished before the pair is read.
    let recovered =
        pki::recover_pair(&e.uplink.key.path, &e.uplink.cert.path).map_err(TlsError::Key)?;
    if let Some(what) = recovered {
        tracing::warn!(key = %e.uplink.key.path.display(), "{what}");
    }
    // Hubs are checked against a CA bundle a hub delivered (a rotation) if
    // there is one, else against `[uplink].ca`.
    let trust = managed::trust_path(state_dir, &e.uplink.ca.path);
    let client: ClientHolder = Arc::new(RwLock::new(tls::client(
        &trust,
        &e.uplink.cert.path,
        &e.uplink.key.path,
    )?));
    let lanes = lanes();
    let hubs = Hubs::new(&e.uplink.hubs, lanes);
    let fleet = EdgeFleet::new(
        ctx.policy().config(),
        client.clone(),
        bindings.config_source.take().unwrap_or_default(),
        requests,
    );
    if let Some(f) = &fleet {
        ctx.metrics.config_version(f.applied().0);
        tokio::spawn(managed::watch_cert(f.clone(), ctx.clone()));
    }
    let fronts = bind_fronts(&e.accesses, bindings, |a| (a.protocol, a.listen))?;
    let mut ingest_bound = Vec::new();
    for i in &e.ingests {
        ingest_bound.push((
            i.clone(),
            bindings.tcp(i.listen).map_err(bind_err(i.listen))?,
        ));
    }
    // The malware scanner (`[scan]`): a change needs a restart.
    let scanner: Option<Arc<dyn Scanner>> = ctx.policy().config().scan.as_ref().map(|s| {
        let clamd = Arc::new(Clamd::new(s));
        tokio::spawn(
            clamd
                .clone()
                .watch(ctx.metrics.clone(), ctx.draining.clone()),
        );
        clamd as Arc<dyn Scanner>
    });
    let mut inbox = None;
    if !e.channels.is_empty() || !ingest_bound.is_empty() {
        let writer =
            BufferHandle::start(state_dir).map_err(|e| StartError::Buffer(e.to_string()))?;
        for (ingest, l) in ingest_bound {
            tokio::spawn(ingest::serve(
                ctx.clone(),
                ingest,
                l,
                writer.clone(),
                scanner.clone(),
            ));
        }
        let opened = gateway_store::inbox::Inbox::open(state_dir)
            .map_err(|e| StartError::Buffer(format!("inbox: {e}")))?;
        inbox = Some(InboxHandle::new(
            opened,
            state_dir.to_owned(),
            scanner.clone(),
        ));
        tokio::spawn(spool::run(
            ctx.clone(),
            writer.clone(),
            state_dir.to_owned(),
            scanner.clone(),
        ));
        tokio::spawn(edge_sync::supervise(ctx.clone(), hubs.clone(), writer));
    }
    tokio::spawn(node::watch_assessments(ctx.clone()));
    // Each lane has its own UDP socket and endpoint driver.
    let endpoints = endpoint::edge_endpoints(lanes)?;
    let flows = Arc::new(Flows::default());
    let tunnels = Arc::new(Tunnels {
        hubs: hubs.clone(),
        endpoints: endpoints.clone(),
        client,
        stop: Mutex::new(CancellationToken::new()),
        wiring: Arc::new(Wiring {
            ctx: ctx.clone(),
            flows: flows.clone(),
            fleet,
            inbox,
        }),
    });
    tunnels.spawn(ctx, &e.uplink.hubs);
    for (a, l) in fronts.tcp {
        let (ctx, hubs) = (ctx.clone(), hubs.clone());
        tasks.spawn_listener(a.listen, |stop| {
            relay::access::access_listener(ctx, hubs, a.listen, l, stop)
        });
    }
    for (a, socket) in fronts.udp {
        // UDP accesses change only with a restart (see reload).
        let front = Front::access(&a, &hubs, &flows);
        tokio::spawn(front::front(ctx.clone(), front, socket));
    }
    info!(node = %ctx.id, hubs = e.uplink.hubs.len(), services = e.services.len(), accesses = e.accesses.len(), "Edge started");
    Ok((endpoints, tunnels))
}

impl Tunnels {
    /// Starts a tunnel task per hub and lane, under a fresh stop token.
    pub fn spawn(&self, ctx: &Arc<Ctx>, hubs: &[HostPort]) {
        let stop = CancellationToken::new();
        *self.stop.lock().unwrap_or_else(PoisonError::into_inner) = stop.clone();
        let lanes = self.endpoints.len();
        self.hubs.reset(hubs.len(), lanes);
        for (i, h) in hubs.iter().enumerate() {
            for (lane, endpoint) in self.endpoints.iter().enumerate() {
                tokio::spawn(keep_tunnel(
                    ctx.clone(),
                    TunnelSpec {
                        hubs: self.hubs.clone(),
                        index: i * lanes + lane,
                        hub: h.clone(),
                        endpoint: endpoint.clone(),
                        client: self.client.clone(),
                        lane,
                        stop: stop.clone(),
                    },
                    self.wiring.clone(),
                ));
            }
        }
    }

    /// Closes every tunnel and opens them again (to `hubs`).
    pub fn restart(&self, ctx: &Arc<Ctx>, hubs: &[HostPort]) {
        self.stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cancel();
        self.spawn(ctx, hubs);
    }

    /// The edge's central management state.
    pub fn fleet(&self) -> Option<Arc<EdgeFleet>> {
        self.wiring.fleet.clone()
    }
}

/// What runs on a hub's tunnel at this edge.
struct Wiring {
    ctx: Arc<Ctx>,
    flows: Arc<Flows>,
    /// The management state; its session runs on lane 0.
    fleet: Option<Arc<EdgeFleet>>,
    /// Where records from other departments are delivered (an edge with channels).
    inbox: Option<InboxHandle>,
}

impl tunnel::dial::Handler for Wiring {
    fn up(
        &self,
        lane: usize,
        conn: &quinn::Connection,
        (send, recv): Control,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(read_datagrams(self.flows.clone(), conn.clone()));
        // Lane 0 carries the management session; others keep their control
        // stream open and idle.
        match self.fleet.as_ref().filter(|_| lane == 0) {
            Some(f) => tokio::spawn(managed::session(
                f.clone(),
                self.ctx.clone(),
                conn.clone(),
                send,
                recv,
            )),
            None => tokio::spawn(async move {
                let _control = (send, recv);
                std::future::pending::<()>().await;
            }),
        }
    }

    /// A delivery from another department, or one of this edge's services.
    async fn stream(
        &self,
        hub: &str,
        conn: quinn::Connection,
        first: Frame,
        (mut send, recv): BiStream,
    ) {
        let ctx = self.ctx.clone();
        let open = match first {
            Frame::Deliver { from, channel } => {
                delivery::serve(ctx, self.inbox.clone(), from, channel, send, recv).await;
                return;
            }
            Frame::Open {
                service,
                origin,
                client,
            } => OpenRequest {
                service,
                origin,
                client,
            },
            Frame::UdpFlows => {
                let (flows, hub, at) = (self.flows.clone(), hub.to_owned(), conn.clone());
                // The stream lives as long as the connection; it holds up no drain
                // (its flows are tracked and cut).
                tokio::spawn(relay::udp::link::serve(
                    send,
                    recv,
                    move |request, signal| {
                        let (ctx, flows, hub, conn) =
                            (ctx.clone(), flows.clone(), hub.clone(), at.clone());
                        ctx.tracker.clone().spawn(async move {
                            relay::service::serve_flow(ctx, flows, &hub, conn, request, signal)
                                .await;
                        });
                    },
                ));
                return;
            }
            other => {
                refuse_unexpected(&mut send, &other).await;
                return;
            }
        };
        relay::service::serve(ctx, hub, open, send, recv).await;
    }
}
