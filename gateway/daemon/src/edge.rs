//! The edge: keeps a tunnel to every hub, serves the hubs' requests for its
//! published services, and relays its access listeners through a hub.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_core::backoff::Backoff;
use gateway_core::config::{Access, Protocol};
use gateway_core::policy::{Crossing, Origin as PolicyOrigin};
use gateway_core::sniff::{MAX_SNIFF, Sniff, sniff};
use gateway_core::units::HostPort;
use gateway_core::wire::{self, Frame, Origin, RefuseCode};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::node::Ctx;
use crate::relay::{self, read_frame, write_frame};

/// Time allowed to connect to a legacy target.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The tunnels to the hubs, in order of preference.
///
/// Each hub gets several connections (lanes), so relays spread over more than
/// one QUIC connection driver and more than one core.
#[derive(Default)]
pub struct Hubs(
    Mutex<Vec<(usize, Option<quinn::Connection>)>>,
    std::sync::atomic::AtomicUsize,
    tokio::sync::Notify,
);

/// Tunnels kept to each hub: one per core, at most 4.
pub fn lanes() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

impl Hubs {
    /// `lanes` slots per hub; slot `i * lanes + lane` belongs to hub `i`.
    pub fn new(hubs: &[HostPort], lanes: usize) -> Arc<Self> {
        Arc::new(Hubs(
            Mutex::new((0..hubs.len() * lanes).map(|i| (i / lanes, None)).collect()),
            std::sync::atomic::AtomicUsize::new(0),
            tokio::sync::Notify::new(),
        ))
    }
    /// Empties the slots and sizes them for `hubs` hubs of `lanes` lanes (a new
    /// uplink); the old tunnel tasks have been told to stop.
    pub fn reset(&self, hubs: usize, lanes: usize) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            (0..hubs * lanes).map(|i| (i / lanes, None)).collect();
    }
    fn set(&self, i: usize, c: Option<quinn::Connection>) {
        let up = c.is_some();
        if let Some(slot) = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(i)
        {
            slot.1 = c;
        }
        if up {
            self.2.notify_waiters();
        }
    }
    /// A live tunnel of the first hub that has one, lanes taken in turn.
    pub fn any(&self) -> Option<quinn::Connection> {
        let v = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let live = |(_, c): &&(usize, Option<quinn::Connection>)| {
            c.as_ref().is_some_and(|c| c.close_reason().is_none())
        };
        let hub = v.iter().find(live)?.0;
        let lanes: Vec<&quinn::Connection> = v
            .iter()
            .filter(|s| s.0 == hub)
            .filter(live)
            .filter_map(|(_, c)| c.as_ref())
            .collect();
        let turn = self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lanes.get(turn % lanes.len()).map(|c| (*c).clone())
    }
    /// Completes when a tunnel comes up after this call.
    pub fn came_up(&self) -> tokio::sync::futures::Notified<'_> {
        self.2.notified()
    }
    /// Whether any tunnel is up.
    pub fn any_up(&self) -> bool {
        self.any().is_some()
    }
}

/// What one tunnel task keeps up.
pub struct TunnelSpec {
    /// The slots of every hub's lanes.
    pub hubs: Arc<Hubs>,
    /// This tunnel's slot.
    pub index: usize,
    /// The hub.
    pub hub: HostPort,
    /// The lane's QUIC endpoint.
    pub endpoint: quinn::Endpoint,
    /// The TLS client configuration (renewed certificates are swapped in).
    pub client: crate::tls::ClientHolder,
    /// Lane number; lane 0 carries the management session.
    pub lane: usize,
    /// Stops this tunnel (a new uplink, a reconnect command).
    pub stop: CancellationToken,
    /// The management state, on lane 0.
    pub fleet: Option<Arc<crate::fleet::edge::EdgeFleet>>,
}

/// Keeps the tunnel of `spec` up until draining or its stop: connect, hello,
/// serve, and on loss reconnect with capped, jittered backoff.
pub async fn keep_tunnel(ctx: Arc<Ctx>, spec: TunnelSpec) {
    let TunnelSpec {
        hubs,
        index,
        hub,
        endpoint,
        client,
        lane,
        stop,
        fleet,
    } = spec;
    // Metrics and audit name each lane: host:port, host:port#1, ...
    let name = if lane == 0 {
        hub.to_string()
    } else {
        format!("{hub}#{lane}")
    };
    let span = info_span!("tunnel", hub = %name);
    async move {
        let mut backoff = Backoff::default();
        loop {
            if ctx.draining.is_cancelled() || stop.is_cancelled() {
                return;
            }
            let config = client
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let attempt = tokio::select! {
                r = connect(&hub, &endpoint, &config) => r,
                () = stop.cancelled() => return,
            };
            match attempt {
                Ok((conn, (send, recv))) => {
                    if stop.is_cancelled() {
                        conn.close(quinn::VarInt::from_u32(0), b"reconnecting");
                        return;
                    }
                    backoff.reset();
                    // Usable for relays before anyone is told it is up.
                    hubs.set(index, Some(conn.clone()));
                    ctx.metrics.peer(&name, true);
                    info!(rtt_ms = conn.rtt().as_millis() as u64, "Tunnel up");
                    ctx.audit.record(
                        &name,
                        "tunnel",
                        "tunnel.up",
                        "ok",
                        "",
                        format!("peer={}", conn.remote_address()),
                    );
                    // Lane 0 carries the management session; others keep their
                    // control stream open and idle.
                    let session = match &fleet {
                        Some(f) => tokio::spawn(crate::fleet::edge::session(
                            f.clone(),
                            ctx.clone(),
                            conn.clone(),
                            send,
                            recv,
                        )),
                        None => tokio::spawn(async move {
                            let _control = (send, recv);
                            std::future::pending::<()>().await;
                        }),
                    };
                    let stopped = tokio::select! {
                        () = serve_tunnel(&ctx, &conn, &name) => false,
                        () = stop.cancelled() => true,
                    };
                    session.abort();
                    if stopped {
                        conn.close(quinn::VarInt::from_u32(0), b"reconnecting");
                        ctx.metrics.peer(&name, false);
                        info!("Tunnel closed to reconnect");
                        ctx.audit.record(&name, "tunnel", "tunnel.down", "ok", "", "reconnect".into());
                        return;
                    }
                    hubs.set(index, None);
                    ctx.metrics.peer(&name, false);
                    let reason = conn
                        .close_reason()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| "draining".into());
                    if revoked(&conn) {
                        error!("The hub revoked this device: it is refused from now on; ask central operations");
                    } else {
                        warn!(%reason, "Tunnel down");
                    }
                    ctx.audit
                        .record(&name, "tunnel", "tunnel.down", "ok", "", reason);
                    if ctx.draining.is_cancelled() {
                        conn.close(quinn::VarInt::from_u32(0), b"shutdown");
                        return;
                    }
                }
                Err(error) => {
                    ctx.metrics.connect_failed(&name);
                    if backoff.failures() < 3 || backoff.failures() % 30 == 0 {
                        warn!(%error, failures = backoff.failures() + 1, "Tunnel connect failed");
                    } else {
                        debug!(%error, "Tunnel connect failed");
                    }
                }
            }
            let delay = backoff.next_delay(rand::random::<f64>());
            tokio::select! {
                go = ctx.pause(delay) => if !go { return },
                () = stop.cancelled() => return,
            }
        }
    }
    .instrument(span)
    .await;
}

fn revoked(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == quinn::VarInt::from_u32(gateway_core::fleet::CLOSE_REVOKED)
    )
}

/// Connecting a tunnel failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The hub's name did not resolve.
    #[error("cannot resolve {0}")]
    Resolve(String),
    /// QUIC or TLS failed.
    #[error("{0}")]
    Quic(String),
    /// The hub refused the hello.
    #[error("hub refused: {0}")]
    Refused(String),
}

/// The control stream, kept open for the life of the tunnel.
type Control = (quinn::SendStream, quinn::RecvStream);

async fn connect(
    hub: &HostPort,
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
) -> Result<(quinn::Connection, Control), ConnectError> {
    let target = format!("{}:{}", hub.host, hub.port);
    let addr = tokio::net::lookup_host(&target)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ConnectError::Resolve(target.clone()))?;
    let conn = endpoint
        .connect_with(client.clone(), addr, &hub.host)
        .map_err(|e| ConnectError::Quic(e.to_string()))?
        .await
        .map_err(|e| ConnectError::Quic(e.to_string()))?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| ConnectError::Quic(e.to_string()))?;
    write_frame(
        &mut send,
        &Frame::Hello {
            version: wire::VERSION,
        },
    )
    .await
    .map_err(|e| ConnectError::Quic(e.to_string()))?;
    match read_frame(&mut recv).await {
        Ok(Frame::Welcome {
            version,
            hub: hub_id,
        }) => {
            debug!(version, hub = %hub_id, "Welcome");
            Ok((conn, (send, recv)))
        }
        Ok(Frame::Refuse { message, .. }) => Err(ConnectError::Refused(message)),
        Ok(other) => Err(ConnectError::Refused(format!(
            "unexpected answer {other:?}"
        ))),
        Err(e) => Err(ConnectError::Quic(e.to_string())),
    }
}

async fn serve_tunnel(ctx: &Arc<Ctx>, conn: &quinn::Connection, hub: &str) {
    tokio::spawn(crate::udp::read_datagrams(ctx.flows.clone(), conn.clone()));
    let mut sample = tokio::time::interval(crate::metrics::PATH_SAMPLE);
    let mut path = conn.stats().path;
    loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let (ctx2, hub) = (ctx.clone(), hub.to_owned());
                    let conn = conn.clone();
                    ctx.tracker.spawn(async move { serve_open(ctx2, hub, conn, send, recv).await });
                }
                Err(_) => return,
            },
            _ = sample.tick() => path = ctx.metrics.sample_path(hub, conn, &path),
            () = ctx.draining.cancelled() => return,
        }
    }
}

/// A hub asks to open one of this edge's services.
async fn serve_open(
    ctx: Arc<Ctx>,
    hub: String,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let refuse = |code, rule: &str, message: String| Frame::Refuse {
        code,
        rule: rule.to_owned(),
        message,
    };
    let (service, origin, client, udp_flow) = match read_frame(&mut recv).await {
        Ok(Frame::Deliver { from, channel }) => {
            let (inbox, state_dir) = match ctx.inbox.get() {
                Some((i, d)) => (Some(i.clone()), d.clone()),
                None => (None, std::path::PathBuf::new()),
            };
            crate::delivery::serve(ctx, inbox, state_dir, from, channel, send, recv).await;
            return;
        }
        Ok(Frame::Ping) => {
            let _ = write_frame(&mut send, &Frame::Ping).await;
            let _ = send.finish();
            return;
        }
        Ok(Frame::Open {
            service,
            origin,
            client,
        }) => (service, origin, client, None),
        Ok(Frame::OpenUdp {
            service,
            origin,
            client,
            flow,
        }) => (service, origin, client, Some(flow)),
        Ok(other) => {
            let _ = write_frame(
                &mut send,
                &refuse(
                    RefuseCode::Protocol,
                    "",
                    format!("unexpected frame {other:?}"),
                ),
            )
            .await;
            return;
        }
        Err(error) => {
            debug!(%error, "Bad stream from hub");
            return;
        }
    };
    let (porigin, subject) = match &origin {
        Origin::Provincial => (
            PolicyOrigin::Provincial {
                client: client.ip(),
            },
            format!("{client} via {hub}"),
        ),
        Origin::Device(d) => (PolicyOrigin::Device(d), format!("{d}:{client} via {hub}")),
        Origin::Local => {
            let _ = write_frame(
                &mut send,
                &refuse(
                    RefuseCode::Protocol,
                    "",
                    "a hub cannot open a local origin".into(),
                ),
            )
            .await;
            return;
        }
    };
    let span = info_span!("relay", %service, peer = %subject);
    async move {
        let policy = ctx.policy();
        let decision = policy.decide(
            &Crossing::ServiceOpen {
                service: &service,
                origin: porigin,
            },
            ctx.today(),
        );
        if !decision.is_allowed() {
            ctx.refuse("relay.refuse", &subject, &service, decision.rule.as_str(), &decision.reason);
            let _ = write_frame(
                &mut send,
                &refuse(RefuseCode::Policy, decision.rule.as_str(), decision.reason),
            )
            .await;
            let _ = send.finish();
            return;
        }
        let Some(svc) = policy
            .config()
            .edge()
            .and_then(|e| e.services.iter().find(|s| s.name == service))
            .cloned()
        else {
            return;
        };
        let wanted = if udp_flow.is_some() { Protocol::Udp } else { Protocol::Tcp };
        if svc.protocol != wanted {
            let reason = format!("service {service:?} is {:?}, not {wanted:?}", svc.protocol);
            ctx.refuse("relay.refuse", &subject, &service, "", &reason);
            let _ = write_frame(&mut send, &refuse(RefuseCode::Protocol, "", reason)).await;
            let _ = send.finish();
            return;
        }
        if let Some(max) = svc.max_connections {
            if ctx.metrics.active(&service) >= i64::from(max.get()) {
                let reason = format!("service {service:?} is at its max_connections ({max})");
                ctx.refuse("relay.refuse", &subject, &service, "max-connections", &reason);
                let _ = write_frame(&mut send, &refuse(RefuseCode::Limit, "", reason)).await;
                let _ = send.finish();
                return;
            }
        }
        if let Some(flow) = udp_flow {
            crate::udp::edge_flow(
                ctx.clone(),
                ctx.flows.clone(),
                conn,
                flow,
                service.clone(),
                subject,
                svc.target,
                svc.idle_timeout,
                send,
                recv,
            )
            .await;
            return;
        }
        let connected = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(svc.target)).await {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(error)) => Err(format!("cannot connect to {}: {error}", svc.target)),
            Err(_) => Err(format!("connecting to {} timed out", svc.target)),
        };
        let mut target = match connected {
            Ok(t) => t,
            Err(reason) => {
                warn!(%reason, "Target unreachable");
                ctx.audit.record(&subject, &service, "relay.error", "error", "", reason.clone());
                let _ = write_frame(&mut send, &refuse(RefuseCode::Unreachable, "", reason)).await;
                let _ = send.finish();
                return;
            }
        };
        let _ = target.set_nodelay(true);
        if write_frame(&mut send, &Frame::Opened).await.is_err() {
            return;
        }
        // Rule R5.app-protocol: at boundary level 3 and up, check the first bytes.
        let mut first = Vec::new();
        if let (Some(app), Some(level)) = (svc.app_protocol, decision.level) {
            if level.get() >= 3 {
                match sniff_stream(&mut recv, app, &mut first).await {
                    Sniff::Match => {}
                    verdict => {
                        let reason = format!("first bytes are not {app:?} ({verdict:?})");
                        ctx.refuse("relay.refuse", &subject, &service, "R5.app-protocol", &reason);
                        let _ = send.reset(quinn::VarInt::from_u32(u32::from(RefuseCode::Policy.number())));
                        let _ = recv.stop(quinn::VarInt::from_u32(u32::from(RefuseCode::Policy.number())));
                        relay::reset_tcp(&target);
                        return;
                    }
                }
            }
        }
        if !first.is_empty() && target.write_all(&first).await.is_err() {
            let _ = send.reset(quinn::VarInt::from_u32(relay::RESET_CODE));
            return;
        }
        let started = Instant::now();
        ctx.audit.record(
            &subject,
            &service,
            "relay.open",
            "allow",
            decision.rule.as_str(),
            decision.reason,
        );
        ctx.metrics.opened(&service);
        let live = [AtomicU64::new(first.len() as u64), AtomicU64::new(0)];
        let stop = ctx.service_token(&service);
        let zone_stop = ctx.zone_token(&svc.zone);
        let limits = ctx.limiter(&service, svc.bandwidth);
        let done = {
            let (tr, mut tw) = target.split();
            let mut tr = relay::BufSource::new(tr);
            let mut qr = relay::BufSource::new(&mut recv);
            tokio::select! {
                s = relay::splice_limited(&mut qr, &mut send, &mut tr, &mut tw, &live, limits.as_deref()) => Some(s),
                () = stop.cancelled() => None,
                () = zone_stop.cancelled() => None,
            }
        };
        if done.is_none_or(|s| s.reset) {
            relay::reset_tcp(&target);
            if done.is_none() {
                let _ = send.reset(quinn::VarInt::from_u32(relay::RESET_CODE));
            }
        }
        ctx.relay_closed(&subject, &service, relay::Spliced::moved(&live), started, relay::Spliced::end(done), "");
    }
    .instrument(span)
    .await;
}

async fn sniff_stream(
    recv: &mut quinn::RecvStream,
    app: gateway_core::config::AppProtocol,
    buf: &mut Vec<u8>,
) -> Sniff {
    let deadline = tokio::time::sleep(relay::HANDSHAKE_TIMEOUT);
    tokio::pin!(deadline);
    let mut chunk = [0u8; MAX_SNIFF];
    loop {
        match sniff(app, buf) {
            Sniff::NeedMore => {}
            verdict => return verdict,
        }
        let want = MAX_SNIFF.saturating_sub(buf.len()).max(1);
        tokio::select! {
            r = recv.read(&mut chunk[..want]) => match r {
                Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
                _ => return Sniff::Mismatch,
            },
            () = &mut deadline => return Sniff::Mismatch,
        }
    }
}

fn access_at(ctx: &Ctx, listen: SocketAddr) -> Option<Access> {
    ctx.policy()
        .config()
        .edge()?
        .accesses
        .iter()
        .find(|a| a.listen == listen)
        .cloned()
}

/// Serves one `[[access]]` listener until `stop` (or draining). The access is
/// looked up at each accept, so a reload that changes it takes effect at once.
pub async fn access_listener(
    ctx: Arc<Ctx>,
    hubs: Arc<Hubs>,
    listen: SocketAddr,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let c = ctx.clone();
    relay::accept_loop(
        ctx,
        "Access",
        listen,
        listener,
        stop.clone(),
        move |tcp, peer| {
            let Some(access) = access_at(&c, listen) else {
                relay::reset_tcp(&tcp);
                return None;
            };
            let object = format!("{}/{}", access.device, access.service);
            let relay = access_relay(
                c.clone(),
                hubs.clone(),
                access,
                object.clone(),
                tcp,
                peer,
                stop.clone(),
            );
            Some((object, relay))
        },
    )
    .await;
}

async fn access_relay(
    ctx: Arc<Ctx>,
    hubs: Arc<Hubs>,
    access: Access,
    object: String,
    mut tcp: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let subject = peer.to_string();
    let decision = ctx.policy().decide(
        &Crossing::AccessOpen {
            listen: access.listen,
            client: peer.ip(),
        },
        ctx.today(),
    );
    let deny = |rule: &str, reason: String, tcp: &TcpStream| {
        ctx.refuse("relay.refuse", &subject, &object, rule, &reason);
        relay::reset_tcp(tcp);
    };
    if !decision.is_allowed() {
        deny(decision.rule.as_str(), decision.reason, &tcp);
        return;
    }
    let Some(conn) = hubs.any() else {
        deny("", "no hub is connected".into(), &tcp);
        return;
    };
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        deny("", "the tunnel closed".into(), &tcp);
        return;
    };
    let open = Frame::Open {
        service: object.clone(),
        origin: Origin::Local,
        client: peer,
    };
    if write_frame(&mut send, &open).await.is_err() {
        relay::reset_tcp(&tcp);
        return;
    }
    match read_frame(&mut recv).await {
        Ok(Frame::Opened) => {}
        Ok(Frame::Refuse { rule, message, .. }) => {
            deny(&rule, message, &tcp);
            return;
        }
        other => {
            deny("", format!("no answer from the hub: {other:?}"), &tcp);
            return;
        }
    }
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    ctx.audit.record(
        &subject,
        &object,
        "relay.open",
        "allow",
        decision.rule.as_str(),
        decision.reason,
    );
    ctx.metrics.opened(&object);
    let live = [AtomicU64::new(0), AtomicU64::new(0)];
    let zone_stop = ctx.zone_token(&access.zone);
    let done = {
        let (tr, mut tw) = tcp.split();
        let mut tr = relay::BufSource::new(tr);
        let mut qr = relay::BufSource::new(&mut recv);
        tokio::select! {
            s = relay::splice(&mut tr, &mut tw, &mut qr, &mut send, &live) => Some(s),
            () = stop.cancelled() => None,
            () = zone_stop.cancelled() => None,
            () = ctx.kill.cancelled() => None,
        }
    };
    if done.is_none_or(|s| s.reset) {
        relay::reset_tcp(&tcp);
    }
    ctx.relay_closed(
        &subject,
        &object,
        relay::Spliced::moved(&live),
        started,
        relay::Spliced::end(done),
        "",
    );
}

/// Re-checks assessments every minute until draining (rule R3 on running relays).
pub async fn watch_assessments(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                ctx.recheck_assessments();
            }
            () = ctx.draining.cancelled() => return,
        }
    }
}
