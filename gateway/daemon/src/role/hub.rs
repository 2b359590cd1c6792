//! The hub role: wiring only. It binds the hub's sockets and composes the
//! capabilities: tunnels from edges ([`tunnel::accept`]), publish listeners and
//! transit ([`relay`]), the sink and the consumers' API ([`channel`]), and
//! central management ([`fleet`]), over the registry and sink engines it
//! opens (embedded SQLite). What an edge's tunnel carries is decided here, by
//! its first frame.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use gateway_core::config;
use gateway_core::wire::{Frame, Origin, RefuseCode};
use gateway_store::postgres::{Pg, PgRegistry, PgSink};
use gateway_store::registry::Registry;
use gateway_store::sink::Sink;
use gateway_store::sqlite::{Blocking, SqliteRegistry, SqliteSink, registry};
use tracing::info;

use super::{StartError, Tasks, bind_err, bind_fronts};
use crate::channel::consumer_api;
use crate::channel::consumers::Consumers;
use crate::channel::hub_sink::{self, SinkHandle};
use crate::fleet;
use crate::fleet::hub::Fleet;
use crate::node::Ctx;
use crate::node::sockets::Bindings;
use crate::relay;
use crate::relay::udp::flows::{Flows, read_datagrams};
use crate::relay::udp::front::{self, Front};
use crate::tunnel;
use crate::tunnel::accept::{self, BiStream, Control};
use crate::tunnel::devices::Devices;
use crate::tunnel::frame::refuse_unexpected;
use crate::tunnel::pki::Signer;
use crate::tunnel::{endpoint, tls};

/// A started hub, for reload and drain.
pub(super) struct Started {
    /// The QUIC endpoints edges connect to.
    pub endpoints: Vec<quinn::Endpoint>,
    /// The connected edges.
    pub devices: Arc<Devices>,
    /// Where the first endpoint is bound.
    pub quic_addr: Option<SocketAddr>,
    /// The operators' API address, with `[hub].ops`.
    pub ops_addr: Option<SocketAddr>,
    /// Where this hub's own alarms go into the registry.
    pub alarms: tokio::sync::mpsc::Sender<gateway_core::detect::Alarm>,
}

/// Where the hub keeps its state: the registry and the sink.
pub(super) struct Stores {
    registry: Arc<dyn Registry>,
    sink: Arc<dyn Sink>,
    /// The shared database, when the state lives in PostgreSQL.
    pg: Option<Pg>,
}

/// Opens the engines `[hub] store` names: SQLite files in the state
/// directory (or `[hub] registry` / `sink`), or PostgreSQL (migrated under a
/// lock, so hubs starting at once migrate once).
pub(super) async fn open_stores(h: &config::Hub, state_dir: &Path) -> Result<Stores, StartError> {
    if let Some(s) = &h.settings.postgres {
        let pg = Pg::open(s).await.map_err(StartError::Store)?;
        info!(database = %s.dbname, hosts = s.hosts.len(), pool = s.pool, "Hub state in PostgreSQL");
        return Ok(Stores {
            registry: Arc::new(PgRegistry::new(pg.clone())),
            sink: Arc::new(PgSink::new(pg.clone())),
            pg: Some(pg),
        });
    }
    let sink = match &h.settings.sink {
        Some(file) => SqliteSink::open_file(file),
        None => SqliteSink::open(state_dir),
    }
    .map_err(|e| StartError::Sink(e.into()))?;
    let registry = h
        .settings
        .registry
        .clone()
        .unwrap_or_else(|| state_dir.join(registry::FILE_NAME));
    let registry = Blocking::new(SqliteRegistry::open_file(&registry)?);
    Ok(Stores {
        registry: Arc::new(registry),
        sink: Arc::new(Blocking::new(sink)),
        pg: None,
    })
}

/// A hub's own certificate is not renewed over a tunnel as a box's is: its
/// expiry goes on `/metrics` (`gateway_cert_expiry_timestamp_seconds`) and
/// the log warns from 30 days before it (docs/operate.md, "The hub's own
/// certificate").
fn hub_cert_expiry(ctx: &Ctx, cert: &Path) {
    let Some((_, not_after_ms)) = std::fs::read_to_string(cert)
        .ok()
        .and_then(|pem| crate::tunnel::pki::validity(&pem))
    else {
        return;
    };
    ctx.metrics.cert_expiry(not_after_ms);
    let days = (not_after_ms - crate::node::clock::now_ms()).div_euclid(86_400_000);
    if days < 30 {
        tracing::warn!(
            cert = %cert.display(),
            days,
            "The hub's certificate expires in {days} days: issue a new one with gatewayd pki issue and restart the hub (docs/operate.md, \"The hub's own certificate\")"
        );
    }
}

/// The registry alone, for the offline commands (`gatewayd accounts`).
///
/// # Errors
/// When the engine cannot be opened.
pub async fn open_registry(
    h: &config::Hub,
    state_dir: &Path,
) -> Result<Arc<dyn Registry>, StartError> {
    if let Some(s) = &h.settings.postgres {
        let pg = Pg::open(s).await.map_err(StartError::Store)?;
        return Ok(Arc::new(PgRegistry::new(pg)));
    }
    let file = h
        .settings
        .registry
        .clone()
        .unwrap_or_else(|| state_dir.join(registry::FILE_NAME));
    Ok(Arc::new(Blocking::new(SqliteRegistry::open_file(&file)?)))
}

/// Binds and starts everything of hub `h`.
pub(super) fn start(
    ctx: &Arc<Ctx>,
    h: &config::Hub,
    stores: Stores,
    bindings: &mut Bindings,
    (state_dir, retention_days): (&Path, u32),
    tasks: &mut Tasks,
) -> Result<Started, StartError> {
    let server = tls::server(
        &h.settings.ca_cert.path,
        &h.settings.cert.path,
        &h.settings.key.path,
    )?;
    hub_cert_expiry(ctx, &h.settings.cert.path);
    let endpoints =
        endpoint::hub_endpoints(bindings.udp.take(), h.settings.listen, &server, state_dir)?;
    let quic_addr = endpoints.first().and_then(|e| e.local_addr().ok());
    let devices = Arc::new(Devices::default());
    let flows = Arc::new(Flows::default());
    let fronts = bind_fronts(&h.publishes, bindings, |p| (p.protocol, p.listen))?;
    for (p, socket) in fronts.udp {
        // UDP publishes change only with a restart (see reload).
        let front = Front::publish(&p, &devices, &flows);
        tokio::spawn(front::front(ctx.clone(), front, socket));
    }
    let Stores { registry, sink, pg } = stores;
    if let Some(pg) = pg {
        tokio::spawn(watch_store(ctx.clone(), pg));
    }
    let sink = SinkHandle::new(sink);
    tokio::spawn(hub_sink::maintain(
        sink.clone(),
        ctx.clone(),
        devices.clone(),
    ));
    let signer = Signer::load(&h.settings.ca_cert.path, &h.settings.ca_key.path)
        .map_err(|e| StartError::Fleet(format!("the CA that signs devices: {e}")))?;
    let consumers = Consumers::new(registry.clone(), sink.clone());
    let api = bindings
        .tcp(h.settings.api)
        .map_err(bind_err(h.settings.api))?;
    let api_tls = tls::client_cert_server(
        &h.settings.ca_cert.path,
        &h.settings.cert.path,
        &h.settings.key.path,
    )?;
    tasks.servers.push(tokio::spawn(consumer_api::serve(
        ctx.clone(),
        consumers.clone(),
        api,
        api_tls,
        tasks.admin_stop.clone(),
    )));
    tokio::spawn(hub_sink::expire_loop(
        sink.clone(),
        ctx.clone(),
        h.settings.sink_retention,
    ));
    let files = crate::fleet::hub::HubFiles {
        box_ca: crate::fleet::hub::box_ca_offer(&h.settings).map_err(StartError::Fleet)?,
        firmware_keys: crate::fleet::hub::firmware_keys(&h.settings).map_err(StartError::Fleet)?,
    };
    let fleet = Fleet::new(
        ctx.clone(),
        devices.clone(),
        registry,
        consumers,
        signer,
        &h.settings,
        files,
    );
    tokio::spawn(fleet.clone().prune_loop(retention_days));
    let (alarms, own_alarms) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(fleet.clone().keep_own_alarms(own_alarms));
    tokio::spawn(fleet.clone().follow_changes());
    tokio::spawn(crate::fleet::rollout::run(fleet.clone()));
    tasks
        .servers
        .push(tokio::spawn(fleet.clone().write_heartbeats()));
    tasks
        .servers
        .push(tokio::spawn(fleet.clone().write_audit()));
    let mut ops_addr = None;
    if let Some(ops) = h.settings.ops {
        let l = bindings.tcp(ops).map_err(bind_err(ops))?;
        ops_addr = l.local_addr().ok();
        let tls = tls::ops_server(&h.settings.cert.path, &h.settings.key.path)?;
        tasks.servers.push(tokio::spawn(fleet::ops_api::serve(
            fleet.clone(),
            l,
            tls,
            tasks.admin_stop.clone(),
        )));
    }
    let wiring = Arc::new(Wiring {
        ctx: ctx.clone(),
        devices: devices.clone(),
        sink,
        fleet,
        flows,
    });
    for e in &endpoints {
        tokio::spawn(accept::accept_edges(
            ctx.clone(),
            devices.clone(),
            e.clone(),
            wiring.clone(),
        ));
    }
    for (p, l) in fronts.tcp {
        let (ctx, devices) = (ctx.clone(), devices.clone());
        tasks.spawn_listener(p.listen, |stop| {
            relay::publish::publish_listener(ctx, devices, p.listen, l, stop)
        });
    }
    info!(node = %ctx.id, quic = ?quic_addr, endpoints = endpoints.len(), publishes = h.publishes.len(), "Hub started");
    Ok(Started {
        endpoints,
        devices,
        quic_addr,
        ops_addr,
        alarms,
    })
}

/// Asks the hub's PostgreSQL every 2 s whether it answers, for `/readyz` and
/// `gateway_store_up`; says in the log when it goes away and comes back.
async fn watch_store(ctx: Arc<Ctx>, pg: Pg) {
    loop {
        let answered = tokio::time::timeout(std::time::Duration::from_secs(5), pg.ping()).await;
        let down = match answered {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("no answer within 5 s".to_owned()),
        };
        match (&down, ctx.metrics.store_down()) {
            (Some(why), None) => {
                tracing::error!(%why, "The hub's PostgreSQL is unavailable: channel batches are not acknowledged (edges keep them), operators' writes answer 503; relays continue")
            }
            (None, Some(_)) => info!("The hub's PostgreSQL answers again"),
            _ => {}
        }
        ctx.metrics.set_store("postgres", down);
        if !ctx.pause(std::time::Duration::from_secs(2)).await {
            return;
        }
    }
}

/// What runs on an edge's tunnel at this hub.
struct Wiring {
    ctx: Arc<Ctx>,
    devices: Arc<Devices>,
    sink: SinkHandle,
    fleet: Arc<Fleet>,
    flows: Arc<Flows>,
}

impl tunnel::accept::Handler for Wiring {
    async fn enroll(&self, conn: quinn::Connection) {
        self.fleet.clone().enroll(conn).await;
    }

    async fn admit(
        &self,
        device: &str,
        serial: &str,
        remote: std::net::SocketAddr,
    ) -> Result<(), tunnel::accept::Refusal> {
        self.fleet.admit(device, serial, remote).await
    }

    fn up(
        &self,
        device: &str,
        conn: &quinn::Connection,
        (send, recv): Control,
    ) -> tokio::task::JoinHandle<()> {
        let control = tokio::spawn(self.fleet.clone().session(device.to_owned(), send, recv));
        tokio::spawn(read_datagrams(self.flows.clone(), conn.clone()));
        control
    }

    /// A relay through this hub, or a channel's sync.
    async fn stream(
        &self,
        device: &str,
        conn: quinn::Connection,
        first: Frame,
        (mut send, recv): BiStream,
    ) {
        let (ctx, devices, from) = (self.ctx.clone(), self.devices.clone(), device.to_owned());
        match first {
            Frame::Open {
                service,
                origin: Origin::Local,
                client,
            } => relay::transit::transit(ctx, devices, from, service, client, send, recv).await,
            Frame::UdpFlows => {
                let flows = self.flows.clone();
                // The stream lives as long as the connection; it holds up no drain
                // (its flows are tracked and cut).
                tokio::spawn(relay::udp::link::serve(
                    send,
                    recv,
                    move |request, signal| {
                        let relay::udp::link::FlowRequest {
                            service,
                            origin,
                            client,
                            flow,
                        } = request;
                        if origin != Origin::Local {
                            let message = "an edge opens UDP flows only for its own access".into();
                            return signal.refuse(RefuseCode::Protocol, "", message);
                        }
                        let args = (ctx.clone(), devices.clone(), flows.clone());
                        let (from, conn) = (from.clone(), conn.clone());
                        ctx.tracker.clone().spawn(relay::udp::transit::transit(
                            args,
                            from,
                            (service, client, flow),
                            conn,
                            signal,
                        ));
                    },
                ));
            }
            Frame::SyncOpen {
                channel,
                deliver_to,
            } => {
                let sink = self.sink.clone();
                hub_sink::serve_sync(ctx, sink, devices, from, (channel, deliver_to), send, recv)
                    .await;
            }
            Frame::FirmwareGet { version, part } => {
                crate::fleet::firmware::serve(&self.fleet, &from, (version, part), send).await;
            }
            other => {
                refuse_unexpected(&mut send, &other).await;
            }
        }
    }
}
