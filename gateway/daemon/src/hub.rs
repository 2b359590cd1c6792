//! The hub: accepts edges' tunnels, publishes their services on provincial
//! listeners, and carries gateway-to-gateway relays between edges.
//!
//! The hub takes each edge's device id from its verified certificate. A relay
//! is decided here (publish listeners) and again by the edge that owns the service.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_core::config::Publish;
use gateway_core::fleet;
use gateway_core::policy::Crossing;
use gateway_core::wire::{self, Frame, Origin, RefuseCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::fleet::hub::Fleet;
use crate::hub_sink::{self, SinkHandle};
use crate::node::Ctx;
use crate::relay::{self, read_frame, write_frame};
use crate::tls;

/// Connected edges by device id (several connections: lanes, and a new one
/// while it replaces an old one), and a turn counter for spreading relays.
#[derive(Default)]
pub struct Devices(
    Mutex<HashMap<String, Vec<Lane>>>,
    std::sync::atomic::AtomicUsize,
);

/// One connection of a device, and whether it is in doubt: the device has
/// connected again since, and this one has not yet answered a ping.
struct Lane {
    conn: quinn::Connection,
    doubt: bool,
}

impl Devices {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Lane>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a connection of `id`. Its other connections are put in doubt
    /// (relays avoid them) and returned, to be pinged: a device that connects
    /// again may have been restarted, and the old process's connections look
    /// alive to QUIC until their idle timeout.
    fn add(&self, id: &str, c: quinn::Connection) -> Vec<quinn::Connection> {
        let mut m = self.lock();
        let lanes = m.entry(id.to_owned()).or_default();
        let others = lanes
            .iter_mut()
            .map(|l| {
                l.doubt = true;
                l.conn.clone()
            })
            .collect();
        lanes.push(Lane {
            conn: c,
            doubt: false,
        });
        others
    }

    /// A connection in doubt answered: relays may use it again.
    fn trust(&self, id: &str, stable_id: usize) {
        if let Some(v) = self.lock().get_mut(id) {
            for l in v.iter_mut().filter(|l| l.conn.stable_id() == stable_id) {
                l.doubt = false;
            }
        }
    }

    fn remove(&self, id: &str, stable_id: usize) {
        let mut m = self.lock();
        if let Some(v) = m.get_mut(id) {
            v.retain(|l| l.conn.stable_id() != stable_id);
            if v.is_empty() {
                m.remove(id);
            }
        }
    }

    /// The ids of the devices connected now.
    pub fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Closes every connection of `id` with `code`; returns how many.
    pub fn close_all(&self, id: &str, code: u32, reason: &[u8]) -> usize {
        let lanes = self.lock().remove(id).unwrap_or_default();
        for l in &lanes {
            l.conn.close(quinn::VarInt::from_u32(code), reason);
        }
        lanes.len()
    }

    /// A live connection of `id`; an edge keeps several (lanes) to use more cores,
    /// and relays are spread over them in turn. Connections in doubt are used
    /// only when there is no other.
    pub fn get(&self, id: &str) -> Option<quinn::Connection> {
        let m = self.lock();
        let live: Vec<&Lane> = m
            .get(id)?
            .iter()
            .filter(|l| l.conn.close_reason().is_none())
            .collect();
        let trusted: Vec<&Lane> = live.iter().copied().filter(|l| !l.doubt).collect();
        let pool = if trusted.is_empty() { live } else { trusted };
        if pool.is_empty() {
            return None;
        }
        let turn = self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        pool.get(turn % pool.len()).map(|l| l.conn.clone())
    }
}

/// How long a connection in doubt has to answer a ping before it is closed.
const PING_WAIT: Duration = Duration::from_secs(5);

/// Pings each of `id`'s connections in doubt: one that answers is trusted
/// again, one that does not within [`PING_WAIT`] is closed (its process is
/// gone), which ends its relays' wait at once instead of at the idle timeout.
fn settle_doubts(devices: &Arc<Devices>, id: &str, conns: Vec<quinn::Connection>) {
    for c in conns {
        let (devices, id) = (devices.clone(), id.to_owned());
        tokio::spawn(async move {
            let ping = async {
                let Ok((mut send, mut recv)) = c.open_bi().await else {
                    return;
                };
                let _ = write_frame(&mut send, &Frame::Ping).await;
                // Any reaction proves a live process: the Ping back, or the
                // stream ended unanswered (an edge older than Ping cannot
                // read it). Only silence means the process is gone.
                let _ = read_frame(&mut recv).await;
            };
            let answered = tokio::time::timeout(PING_WAIT, ping).await.is_ok();
            if answered && c.close_reason().is_none() {
                devices.trust(&id, c.stable_id());
            } else {
                info!(device = %id, "A connection from before the device reconnected does not answer; closing it");
                c.close(
                    quinn::VarInt::from_u32(0),
                    b"no answer after the device reconnected",
                );
            }
        });
    }
}

/// Accepts edges until draining starts.
pub async fn accept_edges(
    ctx: Arc<Ctx>,
    devices: Arc<Devices>,
    sink: SinkHandle,
    endpoint: quinn::Endpoint,
    fleet: Arc<Fleet>,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            () = ctx.draining.cancelled() => return,
        };
        let Some(incoming) = incoming else { return };
        // Spawn before awaiting the handshake: a slow peer never stalls the loop.
        let (ctx, devices, sink, fleet) =
            (ctx.clone(), devices.clone(), sink.clone(), fleet.clone());
        let remote = incoming.remote_address();
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) if tls::alpn(&conn).as_deref() == Some(fleet::ENROLL_ALPN) => {
                    fleet.enroll(conn).await;
                }
                Ok(conn) => serve_edge(ctx, devices, sink, conn, fleet).await,
                Err(error) => info!(%remote, %error, "Tunnel handshake failed"),
            }
        });
    }
}

async fn serve_edge(
    ctx: Arc<Ctx>,
    devices: Arc<Devices>,
    sink: SinkHandle,
    conn: quinn::Connection,
    fleet: Arc<Fleet>,
) {
    let remote = conn.remote_address();
    let Some(device) = tls::peer_id(&conn) else {
        warn!(%remote, "Refusing tunnel: the certificate names no device");
        conn.close(
            quinn::VarInt::from_u32(u32::from(RefuseCode::Protocol.number())),
            b"certificate names no device",
        );
        return;
    };
    if fleet.is_revoked(&device).await {
        warn!(%device, %remote, "Refusing tunnel: the device is revoked");
        ctx.audit.record(
            &device,
            "tunnel",
            "tunnel.refuse",
            "deny",
            "",
            format!("revoked device; peer={remote}"),
        );
        conn.close(
            quinn::VarInt::from_u32(fleet::CLOSE_REVOKED),
            b"this device is revoked",
        );
        return;
    }
    let span = info_span!("tunnel", %device, peer = %remote);
    async move {
        // The control stream: versioned hello.
        let (mut send, mut recv) =
            match tokio::time::timeout(relay::HANDSHAKE_TIMEOUT, conn.accept_bi()).await {
                Ok(Ok(s)) => s,
                _ => {
                    info!("Edge opened no control stream");
                    return;
                }
            };
        match read_frame(&mut recv).await {
            Ok(Frame::Hello { version }) if version == wire::VERSION => {}
            Ok(Frame::Hello { version }) => {
                let message = format!(
                    "protocol version mismatch: hub {} speaks {}, edge {device} speaks {version}",
                    ctx.id,
                    wire::VERSION
                );
                warn!(
                    edge_version = version,
                    hub_version = wire::VERSION,
                    "Refusing tunnel: {message}"
                );
                ctx.audit.record(
                    &device,
                    "tunnel",
                    "tunnel.refuse",
                    "deny",
                    "",
                    message.clone(),
                );
                let _ = write_frame(
                    &mut send,
                    &Frame::Refuse {
                        code: RefuseCode::Version,
                        rule: String::new(),
                        message,
                    },
                )
                .await;
                let _ = send.finish();
                let _ = tokio::time::timeout(relay::HANDSHAKE_TIMEOUT, conn.closed()).await;
                return;
            }
            other => {
                warn!(?other, "Refusing tunnel: no hello");
                conn.close(
                    quinn::VarInt::from_u32(u32::from(RefuseCode::Protocol.number())),
                    b"expected hello",
                );
                return;
            }
        }
        if write_frame(
            &mut send,
            &Frame::Welcome {
                version: wire::VERSION,
                hub: ctx.id.clone(),
            },
        )
        .await
        .is_err()
        {
            return;
        }
        // Usable for relays before anyone is told it is connected.
        let doubtful = devices.add(&device, conn.clone());
        settle_doubts(&devices, &device, doubtful);
        info!("Edge connected");
        ctx.audit.record(
            &device,
            "tunnel",
            "tunnel.up",
            "ok",
            "",
            format!("peer={remote}"),
        );
        // The control stream goes on as the device's management session.
        let control = tokio::spawn(fleet.clone().session(device.clone(), send, recv));
        tokio::spawn(crate::udp::read_datagrams(ctx.flows.clone(), conn.clone()));
        ctx.metrics.peer(&device, true);
        let mut sample = tokio::time::interval(crate::metrics::PATH_SAMPLE);
        let mut path = conn.stats().path;
        loop {
            let stream = tokio::select! {
                s = conn.accept_bi() => s,
                _ = sample.tick() => {
                    path = ctx.metrics.sample_path(&device, &conn, &path);
                    continue;
                }
                () = ctx.draining.cancelled() => break,
            };
            let Ok((send, recv)) = stream else { break };
            let (ctx, devices, sink, from) = (
                ctx.clone(),
                devices.clone(),
                sink.clone(),
                (device.clone(), conn.clone()),
            );
            ctx.tracker
                .clone()
                .spawn(async move { edge_stream(ctx, devices, sink, from, send, recv).await });
        }
        devices.remove(&device, conn.stable_id());
        ctx.metrics.peer(&device, devices.get(&device).is_some());
        let reason = conn
            .close_reason()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "draining".into());
        info!(%reason, "Edge disconnected");
        ctx.audit
            .record(&device, "tunnel", "tunnel.down", "ok", "", reason);
        control.abort();
    }
    .instrument(span)
    .await;
}

/// A stream an edge opened: a relay through this hub, or a channel's sync.
async fn edge_stream(
    ctx: Arc<Ctx>,
    devices: Arc<Devices>,
    sink: SinkHandle,
    (from, conn): (String, quinn::Connection),
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    match read_frame(&mut recv).await {
        Ok(Frame::Open {
            service,
            origin: Origin::Local,
            client,
        }) => transit(ctx, devices, from, service, client, send, recv).await,
        Ok(Frame::OpenUdp {
            service,
            origin: Origin::Local,
            client,
            flow,
        }) => {
            let subject = format!("{from}:{client}");
            if let Some(decision) = allow_transit(&ctx, &from, &service, &subject, &mut send).await
            {
                let rule = decision.rule.as_str().to_owned();
                crate::udp::transit(
                    ctx,
                    devices,
                    from,
                    (service, client, flow),
                    conn,
                    rule,
                    send,
                    recv,
                )
                .await;
            }
        }
        Ok(Frame::SyncOpen {
            channel,
            deliver_to,
        }) => {
            hub_sink::serve_sync(ctx, sink, devices, from, (channel, deliver_to), send, recv).await;
        }
        Ok(other) => {
            let _ = write_frame(
                &mut send,
                &Frame::Refuse {
                    code: RefuseCode::Protocol,
                    rule: String::new(),
                    message: format!("unexpected frame {other:?}"),
                },
            )
            .await;
        }
        Err(error) => debug!(%error, "Bad stream from edge"),
    }
}

/// The transit policy for edge `from` asking for `service` (`DEVICE/SERVICE`):
/// the decision when allowed, else `None` after refusing on `send` (audited).
async fn allow_transit(
    ctx: &Ctx,
    from: &str,
    service: &str,
    subject: &str,
    send: &mut quinn::SendStream,
) -> Option<gateway_core::policy::Decision> {
    let refusal = match service.split_once('/') {
        None => Err((
            RefuseCode::NoRoute,
            String::new(),
            format!("{service:?} is not DEVICE/SERVICE"),
        )),
        Some((device, _)) => {
            let decision = ctx
                .policy()
                .decide(&Crossing::Transit { from, to: device }, ctx.today());
            if decision.is_allowed() {
                Ok(decision)
            } else {
                ctx.refuse(
                    "relay.refuse",
                    subject,
                    service,
                    decision.rule.as_str(),
                    &decision.reason,
                );
                Err((
                    RefuseCode::Policy,
                    decision.rule.as_str().to_owned(),
                    decision.reason,
                ))
            }
        }
    };
    match refusal {
        Ok(d) => Some(d),
        Err((code, rule, message)) => {
            relay::refuse(send, code, &rule, message).await;
            None
        }
    }
}

/// Transit, second step: opens a stream on `device`'s tunnel, sends `open`
/// and reads the device's answer (a `Refuse` when it gives none); returns the
/// tunnel, the stream and the answer. `None` when
/// the device is not there, after refusing on the source's `send` (audited as
/// `subject` asking for `service`).
pub async fn ask_device(
    ctx: &Ctx,
    devices: &Devices,
    device: &str,
    open: &Frame,
    (subject, service): (&str, &str),
    send: &mut quinn::SendStream,
) -> Option<(
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
    Frame,
)> {
    let opened = match devices.get(device) {
        Some(target) => target
            .open_bi()
            .await
            .map(|(s, r)| (target, s, r))
            .map_err(|_| format!("device {device} went away")),
        None => Err(format!(
            "device {device} is not connected to hub {}",
            ctx.id
        )),
    };
    let (target, mut tsend, mut trecv) = match opened {
        Ok(s) => s,
        Err(message) => {
            ctx.refuse("relay.refuse", subject, service, "no-route", &message);
            relay::refuse(send, RefuseCode::NoRoute, "", message).await;
            return None;
        }
    };
    write_frame(&mut tsend, open).await.ok()?;
    let answer = match read_frame(&mut trecv).await {
        Ok(f) => f,
        Err(error) => Frame::Refuse {
            code: RefuseCode::Unreachable,
            rule: String::new(),
            message: format!("device {device} did not answer: {error}"),
        },
    };
    Some((target, tsend, trecv, answer))
}

/// Transit, last step: passes the device's answer to the source; a refusal is
/// audited and ends the source's stream. Whether the relay is open.
pub async fn answer_source(
    ctx: &Ctx,
    answer: &Frame,
    (subject, service): (&str, &str),
    send: &mut quinn::SendStream,
) -> bool {
    let _ = write_frame(send, answer).await;
    match answer {
        Frame::Opened => true,
        Frame::Refuse { rule, message, .. } => {
            ctx.refuse("relay.refuse", subject, service, rule, message);
            let _ = send.finish();
            false
        }
        _ => false,
    }
}

/// A gateway-to-gateway relay: edge `from` asks for `DEVICE/SERVICE`.
async fn transit(
    ctx: Arc<Ctx>,
    devices: Arc<Devices>,
    from: String,
    service: String,
    client: SocketAddr,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let subject = format!("{from}:{client}");
    let Some(decision) = allow_transit(&ctx, &from, &service, &subject, &mut send).await else {
        return;
    };
    let Some((device, svc)) = service.split_once('/') else {
        return;
    };
    let open = Frame::Open {
        service: svc.to_owned(),
        origin: Origin::Device(from.clone()),
        client,
    };
    let who = (subject.as_str(), service.as_str());
    let Some((_, mut tsend, mut trecv, answer)) =
        ask_device(&ctx, &devices, device, &open, who, &mut send).await
    else {
        return;
    };
    if !answer_source(&ctx, &answer, who, &mut send).await {
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
    let live = [AtomicU64::new(0), AtomicU64::new(0)];
    let kill = ctx.kill.clone();
    let (mut src_a, mut src_b) = (
        relay::BufSource::new(&mut recv),
        relay::BufSource::new(&mut trecv),
    );
    let done = tokio::select! {
        s = relay::splice(&mut src_a, &mut send, &mut src_b, &mut tsend, &live) => Some(s),
        () = kill.cancelled() => None,
    };
    ctx.relay_closed(
        &subject,
        &service,
        relay::Spliced::moved(&live),
        started,
        relay::Spliced::end(done),
        "",
    );
}

/// The `[[publish]]` on `listen` in the policy in force.
fn publish_at(ctx: &Ctx, listen: SocketAddr) -> Option<Publish> {
    ctx.policy()
        .config()
        .hub()?
        .publishes
        .iter()
        .find(|p| p.listen == listen)
        .cloned()
}

/// Serves one `[[publish]]` listener until `stop` (or draining). The publish is
/// looked up at each accept, so a reload that changes it takes effect at once.
pub async fn publish_listener(
    ctx: Arc<Ctx>,
    devices: Arc<Devices>,
    listen: SocketAddr,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let c = ctx.clone();
    relay::accept_loop(
        ctx,
        "Publish",
        listen,
        listener,
        stop.clone(),
        move |tcp, peer| {
            let Some(publish) = publish_at(&c, listen) else {
                relay::reset_tcp(&tcp);
                return None;
            };
            let object = format!("{}/{}", publish.device, publish.service);
            let relay = publish_relay(
                c.clone(),
                devices.clone(),
                publish,
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

async fn publish_relay(
    ctx: Arc<Ctx>,
    devices: Arc<Devices>,
    publish: Publish,
    object: String,
    mut tcp: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let subject = peer.to_string();
    let decision = ctx.policy().decide(
        &Crossing::PublishOpen {
            listen: publish.listen,
            client: peer.ip(),
        },
        ctx.today(),
    );
    if !decision.is_allowed() {
        ctx.refuse(
            "relay.refuse",
            &subject,
            &object,
            decision.rule.as_str(),
            &decision.reason,
        );
        relay::reset_tcp(&tcp);
        return;
    }
    let Some(conn) = devices.get(&publish.device) else {
        let reason = format!("device {} is not connected", publish.device);
        ctx.refuse("relay.refuse", &subject, &object, "no-route", &reason);
        relay::reset_tcp(&tcp);
        return;
    };
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        relay::reset_tcp(&tcp);
        return;
    };
    let open = Frame::Open {
        service: publish.service.clone(),
        origin: Origin::Provincial,
        client: peer,
    };
    if write_frame(&mut send, &open).await.is_err() {
        relay::reset_tcp(&tcp);
        return;
    }
    match read_frame(&mut recv).await {
        Ok(Frame::Opened) => {}
        Ok(Frame::Refuse { rule, message, .. }) => {
            ctx.refuse("relay.refuse", &subject, &object, &rule, &message);
            relay::reset_tcp(&tcp);
            return;
        }
        other => {
            info!(?other, "Edge gave no answer");
            relay::reset_tcp(&tcp);
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
    let done = {
        let (tr, mut tw) = tcp.split();
        let mut tr = relay::BufSource::new(tr);
        let mut qr = relay::BufSource::new(&mut recv);
        tokio::select! {
            s = relay::splice(&mut tr, &mut tw, &mut qr, &mut send, &live) => Some(s),
            () = stop.cancelled() => None,
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
