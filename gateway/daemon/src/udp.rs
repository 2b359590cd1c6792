//! UDP relays: QUIC datagrams tagged with a flow id, never a reliable stream.
//!
//! A flow is opened with an `OpenUdp` frame on its own bidirectional stream,
//! which stays open as the flow's lifetime: when either side ends the stream, the
//! flow is gone. Datagrams carry `flow: u32` + payload. The edge expires a flow
//! after the service's `idle_timeout` without a datagram either way; the hub
//! then sees the stream end and forgets the client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_core::config::Publish;
use gateway_core::policy::Crossing;
use gateway_core::wire::{Frame, Origin, decode_datagram, encode_datagram};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::audit_sink::now_ms;
use crate::hub::Devices;
use crate::node::Ctx;
use crate::relay::{read_frame, write_frame};

/// One side of a flow: where datagrams from the tunnel go.
pub struct Flow {
    /// The socket to the client (hub) or the target (edge, connected).
    pub socket: Arc<UdpSocket>,
    /// Hub: the client's address; edge: `None` (the socket is connected).
    pub peer: Option<SocketAddr>,
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
                (f.socket.clone(), f.peer)
            })
        };
        // Unknown flows (just expired) are dropped: UDP may lose datagrams.
        if let Some((socket, peer)) = target {
            let _ = match peer {
                Some(p) => socket.try_send_to(payload, p),
                None => socket.try_send(payload),
            };
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

/// Serves one UDP `[[publish]]` socket until `stop` (or draining).
pub async fn publish_listener(
    ctx: Arc<Ctx>,
    devices: Arc<Devices>,
    flows: Arc<Flows>,
    publish: Publish,
    socket: Arc<UdpSocket>,
    stop: CancellationToken,
) {
    let object = format!("{}/{}", publish.device, publish.service);
    info!(listen = %publish.listen, service = %object, "UDP publish listening");
    let mut clients: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
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
            () = stop.cancelled() => break,
            () = ctx.draining.cancelled() => break,
        };
        clients.retain(|_, tx| !tx.is_closed());
        if let Some(tx) = clients.get(&client) {
            let _ = tx.try_send(buf[..n].to_vec());
            continue;
        }
        let decision = ctx.policy().decide(
            &Crossing::PublishOpen {
                listen: publish.listen,
                client: client.ip(),
            },
            ctx.today(),
        );
        if !decision.is_allowed() {
            ctx.refuse(
                "relay.refuse",
                &client.to_string(),
                &object,
                decision.rule.as_str(),
                &decision.reason,
            );
            continue;
        }
        let (tx, rx) = mpsc::channel(256);
        let _ = tx.try_send(buf[..n].to_vec());
        clients.insert(client, tx);
        let (ctx, devices, flows, publish, socket, object) = (
            ctx.clone(),
            devices.clone(),
            flows.clone(),
            publish.clone(),
            socket.clone(),
            object.clone(),
        );
        ctx.tracker.clone().spawn(async move {
            hub_flow(ctx, devices, flows, publish, object, socket, client, rx).await
        });
    }
}

#[allow(clippy::too_many_arguments)]
async fn hub_flow(
    ctx: Arc<Ctx>,
    devices: Arc<Devices>,
    flows: Arc<Flows>,
    publish: Publish,
    object: String,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    mut rx: mpsc::Receiver<Vec<u8>>,
) {
    let subject = client.to_string();
    let Some(conn) = devices.get(&publish.device) else {
        ctx.refuse(
            "relay.refuse",
            &subject,
            &object,
            "no-route",
            &format!("device {} is not connected", publish.device),
        );
        return;
    };
    let flow = NEXT_FLOW.fetch_add(1, Ordering::Relaxed);
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        return;
    };
    let open = Frame::OpenUdp {
        service: publish.service.clone(),
        origin: Origin::Provincial,
        client,
        flow,
    };
    if write_frame(&mut send, &open).await.is_err() {
        return;
    }
    match read_frame(&mut recv).await {
        Ok(Frame::Opened) => {}
        Ok(Frame::Refuse { rule, message, .. }) => {
            ctx.refuse("relay.refuse", &subject, &object, &rule, &message);
            return;
        }
        other => {
            warn!(?other, "Edge gave no answer to a UDP flow");
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
    flows.insert(
        conn.stable_id(),
        flow,
        Flow {
            socket,
            peer: Some(client),
            last: last.clone(),
            from_tunnel: from_tunnel.clone(),
        },
    );
    ctx.audit.record(
        &subject,
        &object,
        "relay.open",
        "allow",
        "R0.allow-publish",
        format!("udp flow {flow}"),
    );
    ctx.metrics.opened(&object);
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
            // The edge ends the stream when the flow expires.
            _ = recv.read(&mut end) => break "expired",
            () = ctx.kill.cancelled() => break "cut",
        }
    };
    flows.remove(conn.stable_id(), flow);
    let _ = send.finish();
    let detail = format!(
        "udp flow {flow} dropped={} ",
        dropped.load(Ordering::Relaxed)
    );
    ctx.relay_closed(
        &subject,
        &object,
        (
            up.load(Ordering::Relaxed),
            from_tunnel.load(Ordering::Relaxed),
        ),
        started,
        how,
        &detail,
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
            socket: socket.clone(),
            peer: None,
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
    let detail = format!(
        "udp flow {flow} dropped={} ",
        dropped.load(Ordering::Relaxed)
    );
    ctx.relay_closed(
        &subject,
        &service,
        (
            from_tunnel.load(Ordering::Relaxed),
            down.load(Ordering::Relaxed),
        ),
        started,
        how,
        &detail,
    );
}
