//! UDP relays: QUIC datagrams tagged with a flow id, never a reliable stream.
//!
//! A flow is opened with an `OpenUdp` frame on its own bidirectional stream,
//! which stays open as the flow's lifetime: when either side ends the stream, the
//! flow is gone. Datagrams carry `flow: u32` + payload. The edge that serves the
//! service expires a flow after its `idle_timeout` without a datagram either
//! way; the other side sees the stream end and forgets the client.
//!
//! A UDP "front" takes clients' datagrams on a socket, one flow per client
//! address: a hub's UDP `[[publish]]` (flows to the publishing edge) and an
//! edge's UDP `[[access]]` (flows to `DEVICE/SERVICE` through a hub, which joins
//! the two edges' flows in [`transit`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_core::config::{Access, Publish};
use gateway_core::policy::Crossing;
use gateway_core::wire::{Frame, Origin, decode_datagram, encode_datagram};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::audit_sink::now_ms;
use crate::edge::Hubs;
use crate::hub::Devices;
use crate::node::Ctx;
use crate::relay::{read_frame, write_frame};

/// Where a flow's datagrams from the tunnel go.
#[derive(Clone)]
pub enum Target {
    /// A UDP socket: to `peer` (a front's client), or connected (an edge's target).
    Socket {
        /// The socket.
        socket: Arc<UdpSocket>,
        /// The client's address; `None` when the socket is connected.
        peer: Option<SocketAddr>,
    },
    /// Another tunnel's flow (a hub joining two edges).
    Tunnel {
        /// The other connection.
        conn: quinn::Connection,
        /// The flow id on it.
        flow: u32,
        /// Datagrams it could not take.
        dropped: Arc<AtomicU64>,
    },
}

/// One side of a flow: where datagrams from the tunnel go.
pub struct Flow {
    /// Where they go.
    pub to: Target,
    /// Last datagram either way, Unix ms.
    pub last: Arc<AtomicI64>,
    /// Bytes that came in from the tunnel.
    pub from_tunnel: Arc<AtomicU64>,
}

/// Flows by (connection, flow id).
#[derive(Default)]
pub struct Flows(Mutex<HashMap<(usize, u32), Flow>>);

impl Flows {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, u32), Flow>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    /// Registers a flow.
    pub fn insert(&self, conn: usize, flow: u32, f: Flow) {
        self.lock().insert((conn, flow), f);
    }
    /// Forgets a flow.
    pub fn remove(&self, conn: usize, flow: u32) {
        self.lock().remove(&(conn, flow));
    }
}

/// Hands the connection's datagrams to their flows until it closes.
pub async fn read_datagrams(flows: Arc<Flows>, conn: quinn::Connection) {
    let id = conn.stable_id();
    while let Ok(d) = conn.read_datagram().await {
        let Ok((flow, payload)) = decode_datagram(&d) else {
            debug!("Malformed datagram dropped");
            continue;
        };
        let target = {
            let m = flows.lock();
            m.get(&(id, flow)).map(|f| {
                f.last.store(now_ms(), Ordering::Relaxed);
                f.from_tunnel
                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
                f.to.clone()
            })
        };
        // Unknown flows (just expired) are dropped: UDP may lose datagrams.
        let Some(target) = target else {
            continue;
        };
        // Neither send waits: a full socket or tunnel drops, as UDP may.
        match &target {
            Target::Socket {
                socket,
                peer: Some(p),
            } => {
                let _ = socket.try_send_to(payload, *p);
            }
            Target::Socket { socket, peer: None } => {
                let _ = socket.try_send(payload);
            }
            Target::Tunnel {
                conn,
                flow,
                dropped,
            } => send_dgram(conn, *flow, payload, dropped),
        }
    }
}

fn send_dgram(conn: &quinn::Connection, flow: u32, payload: &[u8], dropped: &AtomicU64) {
    if conn
        .send_datagram(Bytes::from(encode_datagram(flow, payload)))
        .is_err()
    {
        // Too large for the path, or the peer's buffer is full: UDP semantics.
        dropped.fetch_add(1, Ordering::Relaxed);
    }
}

static NEXT_FLOW: AtomicU32 = AtomicU32::new(1);

/// A UDP front: what it serves and where its flows go.
#[derive(Clone)]
pub struct Front {
    /// `DEVICE/SERVICE`, for logs, audit and metrics.
    pub object: String,
    /// The socket's address, for the policy.
    pub listen: SocketAddr,
    /// Where flows go.
    pub route: Route,
}

/// Where a front's flows go.
#[derive(Clone)]
pub enum Route {
    /// A hub's `[[publish]]`: the tunnel of the edge that publishes `service`.
    Publish {
        /// The hub's connected devices.
        devices: Arc<Devices>,
        /// The publishing device.
        device: String,
        /// Its service.
        service: String,
    },
    /// An edge's `[[access]]`: any hub tunnel, asking for `DEVICE/SERVICE`.
    Access {
        /// The edge's hub tunnels.
        hubs: Arc<Hubs>,
        /// The access's legacy zone (its assessment ending cuts the flows).
        zone: String,
    },
}

impl Front {
    /// A hub's UDP `[[publish]]`.
    pub fn publish(p: &Publish, devices: &Arc<Devices>) -> Self {
        Self {
            object: format!("{}/{}", p.device, p.service),
            listen: p.listen,
            route: Route::Publish {
                devices: devices.clone(),
                device: p.device.clone(),
                service: p.service.clone(),
            },
        }
    }

    /// An edge's UDP `[[access]]`.
    pub fn access(a: &Access, hubs: &Arc<Hubs>) -> Self {
        Self {
            object: format!("{}/{}", a.device, a.service),
            listen: a.listen,
            route: Route::Access {
                hubs: hubs.clone(),
                zone: a.zone.clone(),
            },
        }
    }

    fn crossing(&self, client: std::net::IpAddr) -> Crossing<'static> {
        match self.route {
            Route::Publish { .. } => Crossing::PublishOpen {
                listen: self.listen,
                client,
            },
            Route::Access { .. } => Crossing::AccessOpen {
                listen: self.listen,
                client,
            },
        }
    }

    fn conn(&self) -> Result<quinn::Connection, String> {
        match &self.route {
            Route::Publish {
                devices, device, ..
            } => devices
                .get(device)
                .ok_or_else(|| format!("device {device} is not connected")),
            Route::Access { hubs, .. } => hubs.any().ok_or_else(|| "no hub is connected".into()),
        }
    }

    fn open(&self, client: SocketAddr, flow: u32) -> Frame {
        let (service, origin) = match &self.route {
            Route::Publish { service, .. } => (service.clone(), Origin::Provincial),
            Route::Access { .. } => (self.object.clone(), Origin::Local),
        };
        Frame::OpenUdp {
            service,
            origin,
            client,
            flow,
        }
    }

    fn zone_stop(&self, ctx: &Ctx) -> Option<CancellationToken> {
        match &self.route {
            Route::Publish { .. } => None,
            Route::Access { zone, .. } => Some(ctx.zone_token(zone)),
        }
    }
}

/// Serves one UDP front socket until draining (it lives as long as the
/// process: a reload cannot change it): each new client address is decided by
/// the policy and gets its own flow.
pub async fn front(ctx: Arc<Ctx>, front: Front, socket: Arc<UdpSocket>) {
    info!(listen = %front.listen, service = %front.object, "UDP listening");
    let mut clients: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let refused = Arc::new(Refused::default());
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, client) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(error) => {
                    debug!(%error, "UDP receive failed");
                    continue;
                }
            },
            () = ctx.draining.cancelled() => break,
        };
        if let Some(tx) = clients.get(&client).filter(|tx| !tx.is_closed()) {
            // A full queue drops the datagram, as UDP may.
            let _ = tx.try_send(buf[..n].to_vec());
            continue;
        }
        // A refused client's datagrams are dropped unaudited for a while: one
        // record per refusal, not one per datagram.
        if refused.holds(client) {
            continue;
        }
        let decision = ctx
            .policy()
            .decide(&front.crossing(client.ip()), ctx.today());
        if !decision.is_allowed() {
            ctx.refuse(
                "relay.refuse",
                &client.to_string(),
                &front.object,
                decision.rule.as_str(),
                &decision.reason,
            );
            refused.hold(client);
            continue;
        }
        clients.retain(|_, tx| !tx.is_closed());
        let (tx, rx) = mpsc::channel(256);
        let _ = tx.try_send(buf[..n].to_vec());
        clients.insert(client, tx);
        let (ctx, front, socket, refused) =
            (ctx.clone(), front.clone(), socket.clone(), refused.clone());
        let allowed = (decision.rule.as_str().to_owned(), decision.reason);
        ctx.tracker.clone().spawn(async move {
            client_flow(ctx, front, socket, client, allowed, rx, &refused).await
        });
    }
    info!(listen = %front.listen, "UDP stopped");
}

/// How long a refused client's datagrams are dropped before it is decided again.
pub const REFUSED_HOLD: Duration = Duration::from_secs(10);

/// Clients of a front refused lately, until when.
#[derive(Default)]
struct Refused(Mutex<HashMap<SocketAddr, Instant>>);

impl Refused {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Instant>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn hold(&self, client: SocketAddr) {
        let now = Instant::now();
        let mut m = self.lock();
        m.retain(|_, until| *until > now);
        m.insert(client, now + REFUSED_HOLD);
    }

    fn holds(&self, client: SocketAddr) -> bool {
        self.lock()
            .get(&client)
            .is_some_and(|until| *until > Instant::now())
    }
}

/// One client's flow through a front, until the far side ends it (idle
/// expiry), the zone's assessment ends, or the node is killed.
async fn client_flow(
    ctx: Arc<Ctx>,
    front: Front,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    (rule, reason): (String, String),
    mut rx: mpsc::Receiver<Vec<u8>>,
    refused: &Refused,
) {
    let (subject, object) = (client.to_string(), front.object.clone());
    let conn = match front.conn() {
        Ok(c) => c,
        Err(why) => {
            ctx.refuse("relay.refuse", &subject, &object, "no-route", &why);
            refused.hold(client);
            return;
        }
    };
    let flow = NEXT_FLOW.fetch_add(1, Ordering::Relaxed);
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        return;
    };
    if write_frame(&mut send, &front.open(client, flow))
        .await
        .is_err()
    {
        return;
    }
    match read_frame(&mut recv).await {
        Ok(Frame::Opened) => {}
        Ok(Frame::Refuse { rule, message, .. }) => {
            ctx.refuse("relay.refuse", &subject, &object, &rule, &message);
            refused.hold(client);
            return;
        }
        other => {
            warn!(?other, "No answer to a UDP flow");
            return;
        }
    }
    let started = Instant::now();
    let (last, from_tunnel, up, dropped) = (
        Arc::new(AtomicI64::new(now_ms())),
        Arc::new(AtomicU64::new(0)),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    ctx.flows.insert(
        conn.stable_id(),
        flow,
        Flow {
            to: Target::Socket {
                socket,
                peer: Some(client),
            },
            last: last.clone(),
            from_tunnel: from_tunnel.clone(),
        },
    );
    ctx.audit.record(
        &subject,
        &object,
        "relay.open",
        "allow",
        &rule,
        format!("udp flow {flow}: {reason}"),
    );
    ctx.metrics.opened(&object);
    let zone_stop = front.zone_stop(&ctx);
    let zone_ended = async {
        match &zone_stop {
            Some(t) => t.cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(zone_ended);
    let mut end = [0u8; 1];
    let how = loop {
        tokio::select! {
            p = rx.recv() => match p {
                Some(p) => {
                    up.fetch_add(p.len() as u64, Ordering::Relaxed);
                    last.store(now_ms(), Ordering::Relaxed);
                    send_dgram(&conn, flow, &p, &dropped);
                }
                None => break "closed",
            },
            // The far side ends the stream when the flow expires.
            _ = recv.read(&mut end) => break "expired",
            () = &mut zone_ended => break "cut",
            () = ctx.kill.cancelled() => break "cut",
        }
    };
    ctx.flows.remove(conn.stable_id(), flow);
    let _ = send.finish();
    let bytes = (&up, from_tunnel.as_ref());
    flow_closed(
        &ctx,
        (&subject, &object),
        bytes,
        (flow, &dropped),
        started,
        how,
    );
}

/// A hub joins edge `from`'s UDP flow `flow_from` (opened on `conn_from` for
/// `DEVICE/SERVICE`) to a new flow on that device's tunnel, after the transit
/// policy allowed it; datagrams pass from one tunnel to the other without
/// touching a socket, and either side ending its stream ends both.
#[allow(clippy::too_many_arguments)]
pub async fn transit(
    ctx: Arc<Ctx>,
    devices: Arc<Devices>,
    from: String,
    (service, client, flow_from): (String, SocketAddr, u32),
    conn_from: quinn::Connection,
    rule: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let subject = format!("{from}:{client}");
    let Some((device, svc)) = service.split_once('/') else {
        return;
    };
    let flow_to = NEXT_FLOW.fetch_add(1, Ordering::Relaxed);
    let open = Frame::OpenUdp {
        service: svc.to_owned(),
        origin: Origin::Device(from.clone()),
        client,
        flow: flow_to,
    };
    let who = (subject.as_str(), service.as_str());
    let Some((conn_to, mut tsend, mut trecv, answer)) =
        crate::hub::ask_device(&ctx, &devices, device, &open, who, &mut send).await
    else {
        return;
    };
    // Both ends' flows exist before the source hears it may send.
    let (last, dropped) = (
        Arc::new(AtomicI64::new(now_ms())),
        Arc::new(AtomicU64::new(0)),
    );
    let (forward, backward) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let joined = [
        (&conn_from, flow_from, &conn_to, flow_to, &forward),
        (&conn_to, flow_to, &conn_from, flow_from, &backward),
    ];
    if matches!(answer, Frame::Opened) {
        for (at, flow, to, to_flow, count) in joined {
            ctx.flows.insert(
                at.stable_id(),
                flow,
                Flow {
                    to: Target::Tunnel {
                        conn: to.clone(),
                        flow: to_flow,
                        dropped: dropped.clone(),
                    },
                    last: last.clone(),
                    from_tunnel: count.clone(),
                },
            );
        }
    }
    if !crate::hub::answer_source(&ctx, &answer, who, &mut send).await {
        return;
    }
    let started = Instant::now();
    ctx.audit.record(
        &subject,
        &service,
        "relay.open",
        "allow",
        &rule,
        format!("udp flow {flow_from} -> {device} flow {flow_to}"),
    );
    ctx.metrics.opened(&service);
    let (mut end, mut tend) = ([0u8; 1], [0u8; 1]);
    let how = tokio::select! {
        _ = recv.read(&mut end) => "closed",
        _ = trecv.read(&mut tend) => "expired",
        () = ctx.kill.cancelled() => "cut",
    };
    ctx.flows.remove(conn_from.stable_id(), flow_from);
    ctx.flows.remove(conn_to.stable_id(), flow_to);
    let _ = send.finish();
    let _ = tsend.finish();
    let bytes = (forward.as_ref(), backward.as_ref());
    flow_closed(
        &ctx,
        (&subject, &service),
        bytes,
        (flow_from, &dropped),
        started,
        how,
    );
}

/// Edge side of a flow, after the policy allowed it: a socket connected to the
/// target, datagrams both ways, expiry after `idle`.
#[allow(clippy::too_many_arguments)]
pub async fn edge_flow(
    ctx: Arc<Ctx>,
    flows: Arc<Flows>,
    conn: quinn::Connection,
    flow: u32,
    service: String,
    subject: String,
    target: SocketAddr,
    idle: Duration,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let bind: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = match UdpSocket::bind(bind).await {
        Ok(s) if s.connect(target).await.is_ok() => Arc::new(s),
        _ => {
            let reason = format!("cannot reach {target}");
            let _ = write_frame(
                &mut send,
                &Frame::Refuse {
                    code: gateway_core::wire::RefuseCode::Unreachable,
                    rule: String::new(),
                    message: reason.clone(),
                },
            )
            .await;
            ctx.audit
                .record(&subject, &service, "relay.error", "error", "", reason);
            return;
        }
    };
    let (last, from_tunnel, down, dropped) = (
        Arc::new(AtomicI64::new(now_ms())),
        Arc::new(AtomicU64::new(0)),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    flows.insert(
        conn.stable_id(),
        flow,
        Flow {
            to: Target::Socket {
                socket: socket.clone(),
                peer: None,
            },
            last: last.clone(),
            from_tunnel: from_tunnel.clone(),
        },
    );
    if write_frame(&mut send, &Frame::Opened).await.is_err() {
        flows.remove(conn.stable_id(), flow);
        return;
    }
    let started = Instant::now();
    ctx.audit.record(
        &subject,
        &service,
        "relay.open",
        "allow",
        "R0.allow-service",
        format!("udp flow {flow}"),
    );
    ctx.metrics.opened(&service);
    let stop = ctx.service_token(&service);
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(50)));
    let mut buf = vec![0u8; 65_536];
    let mut end = [0u8; 1];
    let how = loop {
        tokio::select! {
            r = socket.recv(&mut buf) => if let Ok(n) = r {
                down.fetch_add(n as u64, Ordering::Relaxed);
                last.store(now_ms(), Ordering::Relaxed);
                send_dgram(&conn, flow, &buf[..n], &dropped);
            },
            _ = tick.tick() => {
                let quiet = now_ms() - last.load(Ordering::Relaxed);
                if quiet >= i64::try_from(idle.as_millis()).unwrap_or(i64::MAX) {
                    break "idle";
                }
            }
            _ = recv.read(&mut end) => break "closed",
            () = stop.cancelled() => break "cut",
        }
    };
    flows.remove(conn.stable_id(), flow);
    let _ = send.finish();
    let bytes = (from_tunnel.as_ref(), &down);
    flow_closed(
        &ctx,
        (&subject, &service),
        bytes,
        (flow, &dropped),
        started,
        how,
    );
}

/// Audits and counts a flow's end: bytes (up, down), the flow and its drops.
fn flow_closed(
    ctx: &Ctx,
    (subject, object): (&str, &str),
    (up, down): (&AtomicU64, &AtomicU64),
    (flow, dropped): (u32, &AtomicU64),
    started: Instant,
    how: &str,
) {
    let bytes = (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed));
    let detail = format!(
        "udp flow {flow} dropped={} ",
        dropped.load(Ordering::Relaxed)
    );
    ctx.relay_closed(subject, object, bytes, started, how, &detail);
}
