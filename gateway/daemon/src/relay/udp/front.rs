//! UDP fronts: a socket that takes clients' datagrams, one flow per client
//! address, each decided by the policy when it first appears: a hub's UDP
//! `[[publish]]` (flows to the publishing edge) and an edge's UDP `[[access]]`
//! (flows to `DEVICE/SERVICE` through a hub). A refused client is held off for
//! [`REFUSED_HOLD`]: one audit record per refusal, not one per datagram.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_core::config::{Access, Publish};
use gateway_core::policy::Crossing;
use gateway_core::table::{evict_oldest, shrink};
use gateway_core::wire::{Frame, Origin};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::flows::{Flow, Flows, Opener, Target, flow_closed, next_flow, send_dgram};
use crate::node::Ctx;
use crate::node::clock::now_ms;
use crate::node::guard::Report;
use crate::tunnel::devices::Devices;
use crate::tunnel::hubs::Hubs;
use gateway_core::detect::{Direction, Signal};

/// A UDP front: what it serves and where its flows go.
#[derive(Clone)]
pub struct Front {
    /// `DEVICE/SERVICE`, for logs, audit and metrics.
    pub object: String,
    /// The socket's address, for the policy.
    pub listen: SocketAddr,
    /// Where flows go.
    pub route: Route,
    /// The node's flow table.
    pub flows: Arc<Flows>,
    /// The listener, as alarms name it.
    pub target: Arc<str>,
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
    pub fn publish(p: &Publish, devices: &Arc<Devices>, flows: &Arc<Flows>) -> Self {
        Self {
            object: format!("{}/{}", p.device, p.service),
            listen: p.listen,
            target: Arc::from(format!("publish {} udp", p.listen)),
            route: Route::Publish {
                devices: devices.clone(),
                device: p.device.clone(),
                service: p.service.clone(),
            },
            flows: flows.clone(),
        }
    }

    /// An edge's UDP `[[access]]`.
    pub fn access(a: &Access, hubs: &Arc<Hubs>, flows: &Arc<Flows>) -> Self {
        Self {
            object: format!("{}/{}", a.device, a.service),
            listen: a.listen,
            target: Arc::from(format!("access {} udp", a.listen)),
            route: Route::Access {
                hubs: hubs.clone(),
                zone: a.zone.clone(),
            },
            flows: flows.clone(),
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

    fn opener(&self) -> Opener {
        match self.route {
            Route::Publish { .. } => Opener::Hub,
            Route::Access { .. } => Opener::Edge,
        }
    }

    /// What the detectors hear about `client` (a datagram's source address
    /// can be forged: never proven, so never banned on its own).
    fn report(&self, client: SocketAddr) -> Report<'_> {
        let direction = match self.route {
            Route::Publish { .. } => Direction::Inbound,
            Route::Access { .. } => Direction::Outbound,
        };
        Report {
            peer: client,
            verified: false,
            direction,
            target: &self.target,
            device: None,
        }
    }

    fn zone_stop(&self, ctx: &Ctx) -> Option<CancellationToken> {
        match &self.route {
            Route::Publish { .. } => None,
            Route::Access { zone, .. } => Some(ctx.zone_token(zone)),
        }
    }
}

/// Flows one UDP front keeps at once.
pub const MAX_FLOWS: usize = 4096;
/// Flows one UDP front keeps at once for one client address (each source
/// port is a flow).
pub const FLOWS_PER_SOURCE: usize = 256;
/// Datagrams queued for one flow; more are dropped, as UDP may.
const FLOW_QUEUE: usize = 32;

/// Serves one UDP front socket until draining (it lives as long as the
/// process: a reload cannot change it): each new client address is decided by
/// the policy and gets its own flow, up to [`MAX_FLOWS`] in all and
/// [`FLOWS_PER_SOURCE`] per address; a new one over a cap is refused and held
/// off like a policy refusal (one record per address per 10 s).
pub async fn front(ctx: Arc<Ctx>, front: Front, socket: Arc<UdpSocket>) {
    info!(listen = %front.listen, service = %front.object, "UDP listening");
    let mut clients: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut per_ip: HashMap<std::net::IpAddr, usize> = HashMap::new();
    let refused = Arc::new(Refused::default());
    let mut buf = vec![0u8; 65_536];
    // Ended flows are forgotten every second (and before a cap is applied),
    // so that their queues are freed once a flood has passed.
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (n, client) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(error) => {
                    debug!(%error, "UDP receive failed");
                    continue;
                }
            },
            _ = sweep.tick() => {
                forget_ended(&mut clients, &mut per_ip);
                refused.forget_ended();
                let n = refused.take_suppressed();
                if n > 0 {
                    warn!(listen = %front.listen, refused = n, "UDP refusals over the audit budget (summarised)");
                    ctx.audit.record(
                        "udp-sources",
                        &front.object,
                        "relay.refuse",
                        "deny",
                        "",
                        format!("{n} more datagram flows refused in the last second, not audited one by one (a datagram's source can be forged; at most {AUDIT_PER_SECOND} records a second)"),
                    );
                }
                continue;
            }
            () = ctx.draining.cancelled() => break,
        };
        if ctx.banned(client.ip()) {
            continue;
        }
        if let Some(tx) = clients.get(&client).filter(|tx| !tx.is_closed()) {
            ctx.report(
                &front.report(client),
                Signal::Datagram {
                    flow: u32::from(client.port()),
                },
            );
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
            if refused.may_audit() {
                ctx.refuse(
                    "relay.refuse",
                    &client.to_string(),
                    &front.object,
                    decision.rule.as_str(),
                    &decision.reason,
                );
            } else {
                ctx.metrics.refused(&front.object, decision.rule.as_str());
            }
            let port = u64::from(front.listen.port());
            ctx.report_refusal(&front.report(client), port, decision.rule.as_str());
            refused.hold(client);
            continue;
        }
        ctx.report(&front.report(client), Signal::Connection);
        if clients.len() >= MAX_FLOWS || per_ip.get(&client.ip()) >= Some(&FLOWS_PER_SOURCE) {
            forget_ended(&mut clients, &mut per_ip);
        }
        let mine = per_ip.get(&client.ip()).copied().unwrap_or(0);
        if clients.len() >= MAX_FLOWS || mine >= FLOWS_PER_SOURCE {
            let reason = if mine >= FLOWS_PER_SOURCE {
                format!(
                    "{FLOWS_PER_SOURCE} UDP flows open from {}, the most one address may have",
                    client.ip()
                )
            } else {
                format!("{MAX_FLOWS} UDP flows open, the most this listener keeps")
            };
            ctx.refuse_peer(
                client,
                false,
                crate::node::PeerAttempt::ConnectionCap,
                &reason,
                "",
            );
            refused.hold(client);
            continue;
        }
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        let _ = tx.try_send(buf[..n].to_vec());
        // An ended flow of the same client gives its place to the new one.
        if clients.insert(client, tx).is_none() {
            *per_ip.entry(client.ip()).or_insert(0) += 1;
        }
        let (ctx, front, socket, refused) =
            (ctx.clone(), front.clone(), socket.clone(), refused.clone());
        let allowed = (decision.rule.as_str().to_owned(), decision.reason);
        ctx.tracker.clone().spawn(async move {
            client_flow(ctx, front, socket, client, allowed, rx, &refused).await
        });
    }
    info!(listen = %front.listen, "UDP stopped");
}

/// Forgets the flows that ended (their queues with them) and gives back the
/// tables' room once a flood has passed.
fn forget_ended(
    clients: &mut HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    per_ip: &mut HashMap<std::net::IpAddr, usize>,
) {
    clients.retain(|addr, tx| {
        let open = !tx.is_closed();
        if !open {
            if let Some(n) = per_ip.get_mut(&addr.ip()) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_ip.remove(&addr.ip());
                }
            }
        }
        open
    });
    shrink(clients);
    shrink(per_ip);
}

/// How long a refused client's datagrams are dropped before it is decided again.
pub const REFUSED_HOLD: Duration = Duration::from_secs(10);

/// Refused clients a front holds off at once.
const MAX_HELD: usize = 4096;

/// Refusal records a front writes at most in a burst, and then per second:
/// a datagram's source can be forged, so beyond this the refusals are
/// counted into one summary record per second, not audited one by one.
const AUDIT_BURST: f64 = 100.0;
/// See [`AUDIT_BURST`].
const AUDIT_PER_SECOND: f64 = 10.0;

/// The front's budget of refusal records.
struct Budget {
    tokens: f64,
    at: Instant,
    suppressed: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            tokens: AUDIT_BURST,
            at: Instant::now(),
            suppressed: 0,
        }
    }
}

/// Clients of a front refused lately, until when.
#[derive(Default)]
struct Refused {
    until: Mutex<HashMap<SocketAddr, Instant>>,
    budget: Mutex<Budget>,
}

impl Refused {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Instant>> {
        self.until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds `client` off for [`REFUSED_HOLD`]. The table is capped at
    /// [`MAX_HELD`]: when full, ended holds are forgotten, then the eighth of
    /// holds that end first (spoofed source addresses cannot grow it without
    /// bound, nor cost a pass over it each).
    fn hold(&self, client: SocketAddr) {
        self.hold_at(client, Instant::now());
    }

    fn hold_at(&self, client: SocketAddr, now: Instant) {
        let mut m = self.lock();
        if m.len() >= MAX_HELD && !m.contains_key(&client) {
            m.retain(|_, until| *until > now);
            if m.len() >= MAX_HELD {
                evict_oldest(&mut m, |until| *until);
            }
        }
        m.insert(client, now + REFUSED_HOLD);
    }

    /// Forgets the holds that ended, and the table's room after a flood.
    fn forget_ended(&self) {
        let now = Instant::now();
        let mut m = self.lock();
        m.retain(|_, until| *until > now);
        shrink(&mut m);
    }

    /// Whether a refusal may be audited now; if not it is counted for the
    /// next summary.
    fn may_audit(&self) -> bool {
        let mut b = self
            .budget
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        b.tokens =
            (b.tokens + now.duration_since(b.at).as_secs_f64() * AUDIT_PER_SECOND).min(AUDIT_BURST);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            b.suppressed += 1;
            false
        }
    }

    /// Refusals counted but not audited since the last call.
    fn take_suppressed(&self) -> u64 {
        std::mem::take(
            &mut self
                .budget
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .suppressed,
        )
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
            if refused.may_audit() {
                ctx.refuse("relay.refuse", &subject, &object, "no-route", &why);
            } else {
                ctx.metrics.refused(&object, "no-route");
            }
            refused.hold(client);
            return;
        }
    };
    let flow = next_flow(front.opener());
    let signal = match front
        .flows
        .openers
        .open(&conn, front.open(client, flow), flow)
        .await
    {
        Ok(s) => s,
        Err(Frame::Refuse { rule, message, .. }) => {
            ctx.refuse("relay.refuse", &subject, &object, &rule, &message);
            let port = u64::from(front.listen.port());
            ctx.report_refusal(&front.report(client), port, &rule);
            refused.hold(client);
            return;
        }
        Err(other) => {
            warn!(?other, "No answer to a UDP flow");
            return;
        }
    };
    let (last, from_tunnel, up, dropped) = (
        Arc::new(AtomicI64::new(now_ms())),
        Arc::new(AtomicU64::new(0)),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    front.flows.insert(
        conn.stable_id(),
        flow,
        Flow {
            to: Target::Socket {
                socket,
                peer: Some(client),
            },
            last: last.clone(),
            from_tunnel: from_tunnel.clone(),
            // Checked by the edge that serves the service.
            check: None,
        },
    );
    let started = ctx.relay_opened(
        &subject,
        &object,
        &rule,
        format!("udp flow {flow}: {reason}"),
    );
    let zone_stop = front.zone_stop(&ctx);
    let zone_ended = async {
        match &zone_stop {
            Some(t) => t.cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(zone_ended);
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
            // The far side ends the flow when it expires.
            () = signal.ended() => break "expired",
            () = &mut zone_ended => break "cut",
            () = ctx.kill.cancelled() => break "cut",
        }
    };
    front.flows.remove(conn.stable_id(), flow);
    drop(signal);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hold_off_table_is_capped_and_forgets_the_oldest_holds() {
        let r = Refused::default();
        let addr = |i: usize| SocketAddr::from((std::net::Ipv6Addr::from(i as u128), 9));
        let start = Instant::now();
        for i in 0..MAX_HELD + 10 {
            r.hold_at(addr(i), start + Duration::from_micros(i as u64));
        }
        // Full at MAX_HELD: the eighth held longest went, then ten came.
        let eighth = MAX_HELD / 8;
        assert_eq!(r.lock().len(), MAX_HELD - eighth + 10);
        assert!(r.holds(addr(MAX_HELD + 9)), "the newest is held");
        assert!((0..eighth).all(|i| !r.holds(addr(i))), "the oldest went");
        assert!((eighth..MAX_HELD + 10).all(|i| r.holds(addr(i))));
        // Holding one already held does not evict another.
        r.hold_at(addr(MAX_HELD + 9), start + Duration::from_millis(100));
        assert_eq!(r.lock().len(), MAX_HELD - eighth + 10);
    }
}
