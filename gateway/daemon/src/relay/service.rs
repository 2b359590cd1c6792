//! The edge's side of a relay: a hub asks to open one of this edge's
//! `[[service]]`s for a provincial client or another department's gateway. The
//! edge decides again with its own policy (the hub decided first), holds the
//! service to its `max_connections` and `bandwidth`, connects to the legacy
//! target, checks the application protocol at level 3 and up, and splices.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use gateway_core::config::Protocol;
use gateway_core::policy::{Crossing, Origin as PolicyOrigin};
use gateway_core::sniff::Sniff;
use gateway_core::wire::{Frame, Origin, RefuseCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{Instrument, info_span, warn};

use super::app_protocol::{Requests, Responses, sniff_stream};
use super::listen::reset_tcp;
use super::splice::{BufSource, Either, RESET_CODE, Spliced, splice_limited};
use super::udp::flows::{Flows, edge_flow};
use super::udp::link::{FlowRequest, FlowSignal};
use crate::node::Ctx;
use crate::tunnel::frame::{refuse, write_frame};

/// Time allowed to connect to a legacy target.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a hub asked to open: an `Open` or `OpenUdp` frame.
pub struct OpenRequest {
    /// The service's name on this edge.
    pub service: String,
    /// Who asks: a provincial client or another department's gateway.
    pub origin: Origin,
    /// The client's address, as the hub saw it.
    pub client: SocketAddr,
}

/// A relay the edge's policy let in, and the service it opens.
struct Admitted {
    decision: gateway_core::policy::Decision,
    svc: gateway_core::config::Service,
}

/// Who asks, for the policy and the audit; a local origin is refused (a hub
/// cannot claim one).
fn asker<'a>(
    origin: &'a Origin,
    client: SocketAddr,
    hub: &str,
) -> Option<(PolicyOrigin<'a>, String)> {
    match origin {
        Origin::Provincial => Some((
            PolicyOrigin::Provincial {
                client: client.ip(),
            },
            format!("{client} via {hub}"),
        )),
        Origin::Device(d) => Some((PolicyOrigin::Device(d), format!("{d}:{client} via {hub}"))),
        Origin::Local => None,
    }
}

/// The edge decides again: the policy, the service's protocol and its
/// `max_connections`. A refusal is audited and returned for the hub.
fn admit(
    ctx: &Ctx,
    (service, subject): (&str, &str),
    origin: PolicyOrigin<'_>,
    wanted: Protocol,
) -> Result<Admitted, super::Refusal> {
    let policy = ctx.policy();
    let decision = policy.decide(&Crossing::ServiceOpen { service, origin }, ctx.today());
    if !decision.is_allowed() {
        return Err(super::denied(ctx, (subject, service), decision));
    }
    let Some(svc) = policy
        .config()
        .edge()
        .and_then(|e| e.services.iter().find(|s| s.name == service))
        .cloned()
    else {
        return Err((
            RefuseCode::NoRoute,
            String::new(),
            format!("no service {service:?}"),
        ));
    };
    if svc.protocol != wanted {
        let reason = format!("service {service:?} is {:?}, not {wanted:?}", svc.protocol);
        ctx.refuse("relay.refuse", subject, service, "protocol", &reason);
        return Err((RefuseCode::Protocol, String::new(), reason));
    }
    let max = svc
        .max_connections
        .map_or(gateway_core::config::DEFAULT_MAX_CONNECTIONS, |m| m.get());
    if ctx.metrics.active(service) >= i64::from(max) {
        let reason = format!("service {service:?} is at its max_connections ({max})");
        ctx.refuse("relay.refuse", subject, service, "max-connections", &reason);
        return Err((RefuseCode::Limit, String::new(), reason));
    }
    Ok(Admitted { decision, svc })
}

/// A hub (`hub`, named for logs) asks to open a UDP flow to one of this
/// edge's services, on its flow signalling stream.
pub async fn serve_flow(
    ctx: Arc<Ctx>,
    flows: Arc<Flows>,
    hub: &str,
    conn: quinn::Connection,
    request: FlowRequest,
    signal: FlowSignal,
) {
    let FlowRequest {
        service,
        origin,
        client,
        flow,
    } = request;
    let Some((porigin, subject)) = asker(&origin, client, hub) else {
        let message = "a hub cannot open a local origin".to_owned();
        return signal.refuse(RefuseCode::Protocol, "", message);
    };
    match admit(&ctx, (&service, &subject), porigin, Protocol::Udp) {
        Ok(Admitted { svc, .. }) => {
            let check = crate::relay::udp::protocol::FlowCheck::of(&ctx, &svc, &subject, flow);
            edge_flow(
                ctx,
                flows,
                (conn, flow, signal),
                (service, subject),
                (svc.target, svc.idle_timeout),
                check,
            )
            .await;
        }
        Err((code, rule, message)) => signal.refuse(code, &rule, message),
    }
}

/// A hub (`hub`, named for logs) asks to open a TCP relay to one of this
/// edge's services.
pub async fn serve(
    ctx: Arc<Ctx>,
    hub: &str,
    open: OpenRequest,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let OpenRequest {
        service,
        origin,
        client,
    } = open;
    let Some((porigin, subject)) = asker(&origin, client, hub) else {
        let message = "a hub cannot open a local origin".to_owned();
        return refuse(&mut send, RefuseCode::Protocol, "", message).await;
    };
    let span = info_span!("relay", %service, peer = %subject);
    async move {
        let Admitted { decision, svc } =
            match admit(&ctx, (&service, &subject), porigin, Protocol::Tcp) {
                Ok(a) => a,
                Err((code, rule, message)) => {
                    return refuse(&mut send, code, &rule, message).await;
                }
            };
        let connected =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(svc.target)).await {
                Ok(Ok(t)) => Ok(t),
                Ok(Err(error)) => Err(format!("cannot connect to {}: {error}", svc.target)),
                Err(_) => Err(format!("connecting to {} timed out", svc.target)),
            };
        let mut target = match connected {
            Ok(t) => t,
            Err(reason) => {
                warn!(%reason, "Target unreachable");
                ctx.audit.record(
                    &subject,
                    &service,
                    "relay.error",
                    "error",
                    "",
                    reason.clone(),
                );
                return refuse(&mut send, RefuseCode::Unreachable, "", reason).await;
            }
        };
        let _ = target.set_nodelay(true);
        if write_frame(&mut send, &Frame::Opened).await.is_err() {
            return;
        }
        // Rule R5.app-protocol: at boundary level 3 and up, check the first
        // bytes, then follow the whole stream both ways; a service with
        // `http_allow` is followed at any level (rule R5.http-allow).
        let mut first = Vec::new();
        let mut inspector = None;
        let exchange = std::sync::Arc::new(super::app_protocol::Exchange::default());
        let level3 = decision.level.is_some_and(|l| l.get() >= 3);
        if super::postgres::followed(&svc, level3) {
            let rule = decision.rule.as_str();
            let who = super::postgres::Who {
                subject: &subject,
                service: &service,
                rule,
                reason: decision.reason,
            };
            return super::postgres::relay(&ctx, &svc, who, (send, recv), target).await;
        }
        if let Some(app) = svc
            .app_protocol
            .filter(|_| level3 || !svc.http_allow.is_empty())
        {
            // The first bytes must start like the protocol, and pass only
            // once their request head (or ClientHello) is whole.
            let mut i = gateway_core::sniff::Inspector::requests(
                app,
                std::sync::Arc::new(gateway_core::sniff::Rules {
                    allow_upgrade: svc.allow_upgrade,
                    sni: svc.sni.clone(),
                    http_allow: svc.http_allow.clone(),
                }),
            );
            let checked = match sniff_stream(&mut recv, app, &mut first).await {
                Sniff::Match => i
                    .feed(&first)
                    .map_err(|v| format!("not {app:?} at byte {}: {}", v.offset, v.reason)),
                verdict => Err(format!("first bytes are not {app:?} ({verdict:?})")),
            };
            exchange.after_requests(&mut i);
            match checked {
                Ok(released) if released.is_empty() && i.forbidden().is_some() => {
                    // The first request is refused: the gateway answers it and
                    // the server sees nothing.
                    if let Some(f) = i.forbidden() {
                        refuse_request(&ctx, &subject, &service, f);
                        let _ = send.write_all(&f.response()).await;
                    }
                    let _ = send.finish();
                    let _ = recv.stop(quinn::VarInt::from_u32(0));
                    return;
                }
                Ok(released) => first = released,
                Err(reason) => {
                    ctx.refuse(
                        "relay.refuse",
                        &subject,
                        &service,
                        "R5.app-protocol",
                        &reason,
                    );
                    let code = quinn::VarInt::from_u32(u32::from(RefuseCode::Policy.number()));
                    let _ = send.reset(code);
                    let _ = recv.stop(code);
                    reset_tcp(&target);
                    return;
                }
            }
            inspector = Some((app, i));
        }
        if !first.is_empty() && target.write_all(&first).await.is_err() {
            let _ = send.reset(quinn::VarInt::from_u32(RESET_CODE));
            return;
        }
        let started = ctx.relay_opened(&subject, &service, decision.rule.as_str(), decision.reason);
        let live = [AtomicU64::new(first.len() as u64), AtomicU64::new(0)];
        let done = {
            let (tr, mut tw) = target.split();
            let tr = BufSource::new(tr);
            let qr = BufSource::new(&mut recv);
            // Followed both ways when inspected (responses for `http` only).
            let (mut qr, mut tr) = match inspector {
                None => (Either::A(qr), Either::A(tr)),
                Some((app, i)) => (
                    Either::B(Requests::new(qr, i, app, exchange.clone())),
                    if app == gateway_core::config::AppProtocol::Http {
                        Either::B(Responses::new(tr, exchange.clone()))
                    } else {
                        Either::A(tr)
                    },
                ),
            };
            spliced(&ctx, &svc, (&mut qr, &mut send), (&mut tr, &mut tw), &live).await
        };
        if done.is_none_or(|s| s.reset) {
            reset_tcp(&target);
            if done.is_none() {
                let _ = send.reset(quinn::VarInt::from_u32(RESET_CODE));
            }
        }
        if let Some(reason) = exchange.broke() {
            ctx.refuse(
                "relay.refuse",
                &subject,
                &service,
                "R5.app-protocol",
                &format!("{reason} (relay cut)"),
            );
        }
        if let Some(f) = exchange.forbidden() {
            refuse_request(&ctx, &subject, &service, &f);
        }
        ctx.relay_closed(
            &subject,
            &service,
            Spliced::moved(&live),
            started,
            Spliced::end(done),
            "",
        );
    }
    .instrument(span)
    .await;
}

/// Splices an opened relay of `svc`: client side `(qr, qw)`, server side
/// `(tr, tw)`, each direction held to the service's bandwidth, until it
/// ends (`Some`), or is cut (`None`) by a reload, its zone's expiry, or
/// `idle_timeout` without a byte either way.
pub(super) async fn spliced<R1, W1, R2, W2>(
    ctx: &Ctx,
    svc: &gateway_core::config::Service,
    (qr, qw): (&mut R1, &mut W1),
    (tr, tw): (&mut R2, &mut W2),
    live: &[AtomicU64; 2],
) -> Option<Spliced>
where
    R1: super::splice::Source,
    W1: super::splice::Sink,
    R2: super::splice::Source,
    W2: super::splice::Sink,
{
    let stop = ctx.service_token(&svc.name);
    let zone_stop = ctx.zone_token(&svc.zone);
    let limits = ctx.limiter(&svc.name, svc.bandwidth);
    let spliced = splice_limited(qr, qw, tr, tw, live, limits.as_deref());
    tokio::select! {
        s = spliced => Some(s),
        () = stop.cancelled() => None,
        () = zone_stop.cancelled() => None,
        () = idle(live, svc.idle_timeout) => {
            tracing::info!(idle_s = svc.idle_timeout.as_secs(), "Relay idle; closed");
            None
        }
    }
}

/// Audits a request `http_allow` refused (rule R5.http-allow): its method
/// and path, answered 403.
fn refuse_request(ctx: &Ctx, subject: &str, service: &str, f: &gateway_core::sniff::Forbidden) {
    ctx.refuse(
        "relay.refuse",
        subject,
        service,
        "R5.http-allow",
        &format!("{} {}: {} (answered 403)", f.method, f.path, f.reason),
    );
}

/// Resolves once no byte has crossed either way (`live`) for `limit`.
async fn idle(live: &[AtomicU64; 2], limit: std::time::Duration) {
    use std::sync::atomic::Ordering;
    let total = || live[0].load(Ordering::Relaxed) + live[1].load(Ordering::Relaxed);
    let step = (limit / 4).max(std::time::Duration::from_millis(100));
    let (mut seen, mut since) = (total(), tokio::time::Instant::now());
    loop {
        tokio::time::sleep(step).await;
        let now = total();
        if now != seen {
            (seen, since) = (now, tokio::time::Instant::now());
        } else if since.elapsed() >= limit {
            return;
        }
    }
}
