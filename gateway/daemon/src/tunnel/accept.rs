//! The hub's side of a tunnel: accept an edge's QUIC connection, take its
//! device id from the verified certificate (never from what it says), refuse a
//! revoked device, answer the versioned hello, and list the connection in
//! [`Devices`] until it closes. What runs on the tunnel is the hub role's
//! business: it comes in through [`Handler`].

use std::future::Future;
use std::sync::Arc;

use tokio::task::JoinHandle;

use gateway_core::fleet;
use gateway_core::wire::{self, Frame, RefuseCode};
use tracing::{Instrument, debug, info, info_span, warn};

use super::devices::{Devices, settle_doubts};
use super::frame::{HANDSHAKE_TIMEOUT, read_frame, write_frame};
use super::tls;
use crate::admin::metrics::PATH_SAMPLE;
use crate::node::Ctx;
use crate::node::guard::Report;
use gateway_core::detect::{Direction, Signal};

/// A bidirectional stream of a tunnel: its sending and receiving halves.
pub type BiStream = (quinn::SendStream, quinn::RecvStream);

/// A tunnel's control stream, open for the tunnel's life.
pub type Control = BiStream;

/// What the hub does with an edge's tunnel: the role wires its capabilities
/// in (enrollment and management, relays, channel sync); the tunnel knows none
/// of them.
pub trait Handler: Send + Sync + 'static {
    /// Serves an enrollment connection (ALPN `gw-enroll/1`, no client certificate).
    fn enroll(&self, conn: quinn::Connection) -> impl Future<Output = ()> + Send;
    /// Whether `device` may open a tunnel with the certificate `serial`
    /// (one live certificate per device), asked before its hello.
    fn admit(
        &self,
        device: &str,
        serial: &str,
        remote: std::net::SocketAddr,
    ) -> impl Future<Output = Result<(), Refusal>> + Send;
    /// The device's tunnel is up (hello answered): starts what serves it. The
    /// returned task (its management session on `control`) is aborted when the
    /// tunnel goes down.
    fn up(&self, device: &str, conn: &quinn::Connection, control: Control) -> JoinHandle<()>;
    /// A stream the edge opened, after its first frame. Runs on the node's
    /// tracker, so draining waits for it.
    fn stream(
        &self,
        device: &str,
        conn: quinn::Connection,
        first: Frame,
        stream: BiStream,
    ) -> impl Future<Output = ()> + Send;
}

/// Why a device's tunnel is refused before its hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The device is revoked.
    Revoked,
    /// The certificate is not the device's latest (re-enrolled, or renewed
    /// and handed over).
    Superseded,
}

/// Sources whose handshakes in progress are counted at once (past it, a new
/// source is not counted until one finishes).
const MAX_HANDSHAKING: usize = 16_384;

/// Handshakes from proven addresses the hub carries at once; past it a new
/// one is refused as past [`HANDSHAKES_PER_SLICE`] is. On loopback a
/// handshake takes milliseconds, so 500 a second keep a few dozen in
/// progress; many more means the hub (or the host) is falling behind, and
/// starting yet more would only make every one of them slower until they all
/// time out and are retried.
pub const MAX_IN_FLIGHT: usize = 256;

/// Handshakes from addresses not proven yet the hub carries at once. Past
/// it, a new one is sent a QUIC Retry (stateless: no handshake state, no
/// signature) and counts against [`MAX_IN_FLIGHT`] when it comes back with
/// the token, its address proven. So Initials from forged addresses, which
/// never come back, hold at most this many slots and cannot keep real boxes
/// out; a real box pays one round trip more, and only under load.
pub const UNPROVEN_IN_FLIGHT: usize = 64;

/// What the accept loop does with one incoming handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Start the handshake.
    Start,
    /// Ask the peer to prove its address first.
    Retry,
    /// CONNECTION_REFUSED: the box comes back after its busy backoff.
    Refuse,
}

/// Pure: whether a handshake from an address `validated` (or not, and then
/// whether it `may_retry`) starts, with `(unproven, proven)` in flight.
fn admit(validated: bool, may_retry: bool, (unproven, proven): (usize, usize)) -> Admit {
    match (validated, may_retry) {
        (true, _) if proven < MAX_IN_FLIGHT => Admit::Start,
        (true, _) => Admit::Refuse,
        (false, _) if unproven < UNPROVEN_IN_FLIGHT => Admit::Start,
        (false, true) => Admit::Retry,
        (false, false) => Admit::Refuse,
    }
}

/// Handshakes in progress per source address, and in all: (unproven,
/// proven) addresses.
#[derive(Default)]
struct Handshaking(
    std::sync::Mutex<(
        std::collections::HashMap<std::net::IpAddr, u32>,
        (usize, usize),
    )>,
);

impl Handshaking {
    fn start(&self, ip: std::net::IpAddr, validated: bool) -> u32 {
        let mut g = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (m, (unproven, proven)) = &mut *g;
        *if validated { proven } else { unproven } += 1;
        if !m.contains_key(&ip) && m.len() >= MAX_HANDSHAKING {
            return 0;
        }
        let n = m.entry(ip).or_default();
        *n += 1;
        *n
    }

    fn end(&self, ip: std::net::IpAddr, validated: bool) {
        let mut g = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (m, (unproven, proven)) = &mut *g;
        let count = if validated { proven } else { unproven };
        *count = count.saturating_sub(1);
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }

    /// Handshakes in progress from every source: (unproven, proven).
    fn in_flight(&self) -> (usize, usize) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
    }
}

/// What a failed QUIC handshake tells the detectors, and whether the peer's
/// address is proven. Only an alert about the client's certificate proves
/// it: the certificate comes in a Handshake packet, which the peer could only
/// send having received ours (RFC 9000 8.1). Any other alert (no shared ALPN,
/// a malformed ClientHello) can come from the very first, forgeable Initial,
/// and a timeout proves nothing. A certificate from a CA this hub does not
/// know, one that claims this hub's CA without its signature, or one no CA
/// could have issued is foreign; an expired or revoked one is a failure.
fn handshake_failure(error: &quinn::ConnectionError) -> (Signal, bool) {
    // TLS alerts (RFC 8446 6.2) about the peer's certificate.
    const FOREIGN: [u8; 5] = [42, 43, 46, 48, 51]; // bad, unsupported, unknown, unknown_ca, decrypt_error
    const FAILED: [u8; 3] = [44, 45, 116]; // revoked, expired, certificate_required
    let quinn::ConnectionError::TransportError(t) = error else {
        return (Signal::HandshakeFailed, false);
    };
    let alert = u64::from(t.code)
        .checked_sub(0x100)
        .and_then(|a| u8::try_from(a).ok());
    match alert {
        Some(a) if FOREIGN.contains(&a) => (Signal::ForeignCertificate, true),
        Some(a) if FAILED.contains(&a) => (Signal::HandshakeFailed, true),
        _ => (Signal::HandshakeFailed, false),
    }
}

/// Handshakes the hub starts per [`HANDSHAKE_SLICE`]; more are refused at
/// once (a CONNECTION_REFUSED costs no cryptography) and the edge retries
/// after its jittered backoff. 50 per 100 ms: 10,000 edges reconnect within
/// about 20 s of a hub restart, and the handshakes' signatures take at most
/// a core's share the hub can spare.
pub const HANDSHAKES_PER_SLICE: u32 = 50;
/// The window [`HANDSHAKES_PER_SLICE`] counts over.
pub const HANDSHAKE_SLICE: std::time::Duration = std::time::Duration::from_millis(100);

/// Counts handshakes started per slice of time; pure over the clock given.
#[derive(Debug)]
struct HandshakeRate {
    since: std::time::Instant,
    started: u32,
}

impl HandshakeRate {
    /// Whether one more handshake may start at `now`.
    fn admit(&mut self, now: std::time::Instant) -> bool {
        if now.duration_since(self.since) >= HANDSHAKE_SLICE {
            self.since = now;
            self.started = 0;
        }
        if self.started >= HANDSHAKES_PER_SLICE {
            return false;
        }
        self.started += 1;
        true
    }
}

/// Accepts edges until draining starts. A banned source's Initial is dropped
/// before any handshake work; past [`HANDSHAKES_PER_SLICE`] handshakes (or
/// [`MAX_IN_FLIGHT`] at once) are refused until the next slice (or until
/// some finish); handshakes in progress and failures are
/// reported to the detectors.
pub async fn accept_edges<H: Handler>(
    ctx: Arc<Ctx>,
    devices: Arc<Devices>,
    endpoint: quinn::Endpoint,
    handler: Arc<H>,
) {
    let handshaking = Arc::new(Handshaking::default());
    let target: Arc<str> = Arc::from(format!(
        "quic {}",
        endpoint
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    ));
    let mut rate = HandshakeRate {
        since: std::time::Instant::now(),
        started: 0,
    };
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            () = ctx.draining.cancelled() => return,
        };
        let Some(incoming) = incoming else { return };
        let remote = incoming.remote_address();
        if ctx.banned(remote.ip()) {
            incoming.ignore();
            continue;
        }
        let validated = incoming.remote_address_validated();
        match admit(validated, incoming.may_retry(), handshaking.in_flight()) {
            Admit::Retry => {
                // Stateless; a peer that cannot be reached at its address
                // never comes back.
                let _ = incoming.retry();
                continue;
            }
            Admit::Start if rate.admit(std::time::Instant::now()) => {}
            Admit::Start | Admit::Refuse => {
                ctx.metrics.handshake_deferred();
                incoming.refuse();
                continue;
            }
        }
        let report = |verified| Report {
            peer: remote,
            verified,
            direction: Direction::Inbound,
            target: &target,
            device: None,
        };
        let in_progress = handshaking.start(remote.ip(), validated);
        ctx.report(&report(validated), Signal::Handshakes { in_progress });
        // Spawn before awaiting the handshake: a slow peer never stalls the loop.
        let (ctx, devices, handler) = (ctx.clone(), devices.clone(), handler.clone());
        let (handshaking, target) = (handshaking.clone(), target.clone());
        tokio::spawn(async move {
            let done = incoming.await;
            handshaking.end(remote.ip(), validated);
            match done {
                Ok(conn) if tls::alpn(&conn).as_deref() == Some(fleet::ENROLL_ALPN) => {
                    handler.enroll(conn).await;
                }
                Ok(conn) => serve_edge(ctx, devices, conn, handler).await,
                Err(error) => {
                    info!(%remote, %error, "Tunnel handshake failed");
                    let (signal, verified) = handshake_failure(&error);
                    let report = Report {
                        peer: remote,
                        verified: verified || validated,
                        direction: Direction::Inbound,
                        target: &target,
                        device: None,
                    };
                    ctx.report(&report, signal);
                }
            }
        });
    }
}

async fn serve_edge<H: Handler>(
    ctx: Arc<Ctx>,
    devices: Arc<Devices>,
    conn: quinn::Connection,
    handler: Arc<H>,
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
    let serial = tls::peer_serial(&conn).unwrap_or_default();
    match handler.admit(&device, &serial, remote).await {
        Ok(()) => ctx.guard.learn(remote.ip(), &device),
        Err(Refusal::Revoked) => {
            // Summarised per address: a revoked box retrying is one record
            // and one log line per window, not one per attempt.
            ctx.refuse_peer(
                remote,
                true,
                crate::node::PeerAttempt::RevokedDevice,
                &format!("device {device} is revoked"),
                "",
            );
            conn.close(
                quinn::VarInt::from_u32(fleet::CLOSE_REVOKED),
                b"this device is revoked",
            );
            return;
        }
        Err(Refusal::Superseded) => {
            // Audited (summarised per address) by the handler.
            conn.close(
                quinn::VarInt::from_u32(fleet::CLOSE_SUPERSEDED),
                b"this certificate is no longer the device's: it was re-enrolled or renewed",
            );
            return;
        }
    }
    let span = info_span!("tunnel", %device, peer = %remote);
    async move {
        // The control stream: versioned hello.
        let (mut send, mut recv) =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await {
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
                audit_refusal(&ctx, &device, message.clone());
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
                let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.closed()).await;
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
        let doubtful = devices.add(&device, conn.clone(), &serial);
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
        let control = handler.up(&device, &conn, (send, recv));
        ctx.metrics.peer(&device, true);
        let mut sample = tokio::time::interval(PATH_SAMPLE);
        let mut path = conn.stats().path;
        let mut budget = super::streams::Budget::new(&conn, tls::MAX_STREAMS);
        loop {
            let stream = tokio::select! {
                s = conn.accept_bi() => s,
                _ = sample.tick() => {
                    path = ctx.metrics.sample_path(&device, &conn, &path);
                    continue;
                }
                () = ctx.draining.cancelled() => break,
            };
            let Ok((send, mut recv)) = stream else { break };
            let (handler, device, conn) = (handler.clone(), device.clone(), conn.clone());
            let open = budget.opened();
            ctx.tracker.spawn(async move {
                let _open = open;
                match read_frame(&mut recv).await {
                    Ok(first) => handler.stream(&device, conn, first, (send, recv)).await,
                    Err(error) => debug!(%error, "Bad stream from edge"),
                }
            });
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

/// Audits a tunnel of `device` refused before its hello was answered.
fn audit_refusal(ctx: &Ctx, device: &str, detail: String) {
    ctx.audit
        .record(device, "tunnel", "tunnel.refuse", "deny", "", detail);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_are_started_at_a_bounded_rate() {
        let t0 = std::time::Instant::now();
        let mut r = HandshakeRate {
            since: t0,
            started: 0,
        };
        let first: usize = (0..200).filter(|_| r.admit(t0)).count();
        assert_eq!(first, HANDSHAKES_PER_SLICE as usize);
        let later = t0 + HANDSHAKE_SLICE;
        assert!(r.admit(later), "a new slice admits again");
        let n = 1 + (0..200).filter(|_| r.admit(later)).count();
        assert_eq!(n, HANDSHAKES_PER_SLICE as usize);
    }

    #[test]
    fn handshakes_in_flight_are_counted_over_every_source() {
        let h = Handshaking::default();
        let a: std::net::IpAddr = [192, 0, 2, 1].into();
        let b: std::net::IpAddr = [192, 0, 2, 2].into();
        assert_eq!(
            (h.start(a, false), h.start(a, true), h.start(b, true)),
            (1, 2, 1)
        );
        assert_eq!(h.in_flight(), (1, 2));
        h.end(a, true);
        h.end(b, true);
        assert_eq!(h.in_flight(), (1, 0));
        h.end(a, false);
        h.end(a, false); // a stray end never wraps the count
        assert_eq!(h.in_flight(), (0, 0));
        assert_eq!(
            h.start(b, false),
            1,
            "a source's count starts again from one"
        );
    }

    #[test]
    fn forged_initials_cannot_fill_the_slots_of_real_boxes() {
        // Unproven Initials start until their share is taken, then are asked
        // to prove their address; one that cannot be asked again is refused.
        assert_eq!(admit(false, true, (0, 0)), Admit::Start);
        assert_eq!(admit(false, true, (UNPROVEN_IN_FLIGHT, 0)), Admit::Retry);
        assert_eq!(admit(false, false, (UNPROVEN_IN_FLIGHT, 0)), Admit::Refuse);
        // A proven address starts while its own share has room, however
        // many unproven ones are in flight.
        assert_eq!(admit(true, false, (UNPROVEN_IN_FLIGHT, 0)), Admit::Start);
        assert_eq!(admit(true, false, (0, MAX_IN_FLIGHT - 1)), Admit::Start);
        assert_eq!(admit(true, false, (0, MAX_IN_FLIGHT)), Admit::Refuse);
        assert_eq!(
            admit(true, true, (UNPROVEN_IN_FLIGHT, MAX_IN_FLIGHT)),
            Admit::Refuse
        );
    }
}
