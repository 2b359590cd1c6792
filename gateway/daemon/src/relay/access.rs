//! An edge's `[[access]]` listener: a legacy client reaches another
//! department's service (`DEVICE/SERVICE`) through a hub tunnel. The edge
//! decides first (R0.allow-access, the zone's assessment), then the hub and
//! the edge that owns the service decide again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use gateway_core::config::Access;
use gateway_core::policy::Crossing;
use gateway_core::wire::{Frame, Origin};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::listen::{accept_loop, reset_tcp};
use super::splice::{BufSource, Spliced, splice};
use crate::node::Ctx;
use crate::node::guard::Report;
use crate::tunnel::frame::{read_frame, write_frame};
use crate::tunnel::hubs::Hubs;
use gateway_core::detect::{Direction, Signal};

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
    accept_loop(
        ctx,
        "Access",
        gateway_core::detect::Direction::Outbound,
        listen,
        listener,
        stop.clone(),
        move |tcp, peer| {
            let Some(access) = access_at(&c, listen) else {
                reset_tcp(&tcp);
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
    let target = format!("access {}", access.listen);
    let who = Report::tcp(peer, Direction::Outbound, &target);
    let decision = ctx.policy().decide(
        &Crossing::AccessOpen {
            listen: access.listen,
            client: peer.ip(),
        },
        ctx.today(),
    );
    let deny = |rule: &str, reason: String, tcp: &TcpStream| {
        ctx.refuse("relay.refuse", &subject, &object, rule, &reason);
        ctx.report_refusal(&who, u64::from(access.listen.port()), rule);
        reset_tcp(tcp);
    };
    if !decision.is_allowed() {
        deny(decision.rule.as_str(), decision.reason, &tcp);
        return;
    }
    let Some(conn) = hubs.any() else {
        deny("no-route", "no hub is connected".into(), &tcp);
        return;
    };
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        deny("no-route", "the tunnel closed".into(), &tcp);
        return;
    };
    let open = Frame::Open {
        service: object.clone(),
        origin: Origin::Local,
        client: peer,
    };
    if write_frame(&mut send, &open).await.is_err() {
        reset_tcp(&tcp);
        return;
    }
    match read_frame(&mut recv).await {
        Ok(Frame::Opened) => {}
        Ok(Frame::Refuse { rule, message, .. }) => {
            deny(&rule, message, &tcp);
            return;
        }
        other => {
            deny(
                "no-route",
                format!("no answer from the hub: {other:?}"),
                &tcp,
            );
            return;
        }
    }
    let _ = tcp.set_nodelay(true);
    let started = ctx.relay_opened(&subject, &object, decision.rule.as_str(), decision.reason);
    let live = [AtomicU64::new(0), AtomicU64::new(0)];
    let zone_stop = ctx.zone_token(&access.zone);
    let done = {
        let (tr, mut tw) = tcp.split();
        let mut tr = BufSource::new(tr);
        let mut qr = BufSource::new(&mut recv);
        tokio::select! {
            s = splice(&mut tr, &mut tw, &mut qr, &mut send, &live) => Some(s),
            () = stop.cancelled() => None,
            () = zone_stop.cancelled() => None,
            () = ctx.kill.cancelled() => None,
        }
    };
    if done.is_none_or(|s| s.reset) {
        reset_tcp(&tcp);
    }
    if done.is_some() && Spliced::moved(&live) == (0, 0) {
        // The client went away without a byte either way (a connect scan).
        ctx.report(&who, Signal::EmptyConnection);
    }
    ctx.relay_closed(
        &subject,
        &object,
        Spliced::moved(&live),
        started,
        Spliced::end(done),
        "",
    );
}
