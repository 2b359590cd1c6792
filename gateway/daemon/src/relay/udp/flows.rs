//! The flow table: every UDP flow of this node by (connection, flow id), where
//! its datagrams from the tunnel go; flow ids; and the edge's side of a flow,
//! which owns its expiry: a socket connected to the target, closed after
//! `idle_timeout` without a datagram either way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_core::wire::{RefuseCode, decode_datagram, encode_datagram};
use tokio::net::UdpSocket;
use tracing::debug;

use super::link::FlowSignal;
use crate::node::Ctx;
use crate::node::clock::now_ms;

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
    /// The level-3 check of each datagram (an `rtp` or `mpegts` service).
    pub check: Option<Arc<super::protocol::FlowCheck>>,
}

/// Flows by (connection, flow id), and the streams that signal the flows this
/// node opens.
#[derive(Default)]
pub struct Flows {
    by_id: Mutex<HashMap<(usize, u32), Flow>>,
    /// Where this node opens flows, one signalling stream per connection.
    pub openers: super::link::Openers,
}

impl Flows {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, u32), Flow>> {
        self.by_id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    /// Registers a flow.
    pub fn insert(&self, conn: usize, flow: u32, f: Flow) {
        self.lock().insert((conn, flow), f);
    }
    /// Forgets a flow (and the table's room once a flood has passed).
    pub fn remove(&self, conn: usize, flow: u32) {
        let mut m = self.lock();
        m.remove(&(conn, flow));
        gateway_core::table::shrink(&mut m);
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
                (f.to.clone(), f.check.clone())
            })
        };
        // Unknown flows (just expired) are dropped: UDP may lose datagrams.
        let Some((target, check)) = target else {
            continue;
        };
        if check.is_some_and(|c| !c.pass(payload, true)) {
            continue;
        }
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

pub(super) fn send_dgram(conn: &quinn::Connection, flow: u32, payload: &[u8], dropped: &AtomicU64) {
    if conn
        .send_datagram(Bytes::from(encode_datagram(flow, payload)))
        .is_err()
    {
        // Too large for the path, or the peer's buffer is full: UDP semantics.
        dropped.fetch_add(1, Ordering::Relaxed);
    }
}

static NEXT_FLOW: AtomicU32 = AtomicU32::new(1);

/// Who opens a flow: both ends of a connection open flows, and a datagram
/// names its flow by id alone, so the two never choose the same id.
#[derive(Clone, Copy)]
pub enum Opener {
    /// An edge (ids below 2^31).
    Edge,
    /// A hub (ids with the top bit set).
    Hub,
}

/// A fresh flow id (unique in this process, and in its opener's half).
pub(super) fn next_flow(by: Opener) -> u32 {
    let n = NEXT_FLOW.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
    match by {
        Opener::Edge => n,
        Opener::Hub => n | 0x8000_0000,
    }
}

/// Edge side of a flow, after the policy allowed it: a socket connected to the
/// target, datagrams both ways, expiry after `idle`.
pub async fn edge_flow(
    ctx: Arc<Ctx>,
    flows: Arc<Flows>,
    (conn, flow, signal): (quinn::Connection, u32, FlowSignal),
    (service, subject): (String, String),
    (target, idle): (SocketAddr, Duration),
    check: Option<Arc<super::protocol::FlowCheck>>,
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
            signal.refuse(RefuseCode::Unreachable, "", reason.clone());
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
            check: check.clone(),
        },
    );
    signal.opened();
    let started = ctx.relay_opened(
        &subject,
        &service,
        "R0.allow-service",
        format!("udp flow {flow}"),
    );
    let stop = ctx.service_token(&service);
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(50)));
    let how = loop {
        tokio::select! {
            r = socket.readable() => if r.is_ok() {
                relay_ready(&socket, (&conn, flow, check.as_deref()), &last, (&down, &dropped));
            },
            () = wait_closed(check.as_deref()) => break "protocol",
            _ = tick.tick() => {
                let quiet = now_ms() - last.load(Ordering::Relaxed);
                if quiet >= i64::try_from(idle.as_millis()).unwrap_or(i64::MAX) {
                    break "idle";
                }
            }
            () = signal.ended() => break "closed",
            () = stop.cancelled() => break "cut",
        }
    };
    flows.remove(conn.stable_id(), flow);
    drop(signal);
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

/// Until the flow's check closes it (never without a check).
async fn wait_closed(check: Option<&super::protocol::FlowCheck>) {
    match check {
        Some(c) => c.closed.notified().await,
        None => std::future::pending().await,
    }
}

/// Most datagrams relayed per wake-up of one flow (then others get a turn).
const DRAIN: usize = 64;

/// Relays what the target sent to a readable flow socket. The buffer is on
/// the stack, so an idle flow holds none: a buffer per flow was what kept an
/// edge's memory after a flood. It is no bigger than a tunnel datagram can
/// be: a datagram that fills it is too large to relay and is dropped
/// (counted), never sent truncated.
fn relay_ready(
    socket: &UdpSocket,
    (conn, flow, check): (&quinn::Connection, u32, Option<&super::protocol::FlowCheck>),
    last: &AtomicI64,
    (down, dropped): (&AtomicU64, &AtomicU64),
) {
    let mut buf = [0u8; crate::tunnel::tls::MTU_UPPER_BOUND as usize + 1];
    for _ in 0..DRAIN {
        let Ok(n) = socket.try_recv(&mut buf) else {
            // WouldBlock (readiness cleared) or an ICMP error: wait again.
            return;
        };
        last.store(now_ms(), Ordering::Relaxed);
        if n == buf.len() {
            dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        down.fetch_add(n as u64, Ordering::Relaxed);
        if check.is_some_and(|c| !c.pass(&buf[..n], false)) {
            continue;
        }
        send_dgram(conn, flow, &buf[..n], dropped);
    }
}

/// Audits and counts a flow's end: bytes (up, down), the flow and its drops.
pub(super) fn flow_closed(
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
