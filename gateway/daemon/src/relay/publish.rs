//! A hub's `[[publish]]` listener: a provincial client reaches a department's
//! published service through the tunnel of the edge that owns it. The hub
//! decides first (R0.allow-publish, R5.address), then the edge decides again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use gateway_core::config::Publish;
use gateway_core::policy::Crossing;
use gateway_core::wire::{Frame, Origin};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::listen::{accept_loop, reset_tcp};
use super::splice::{BufSource, Spliced, splice};
use crate::node::Ctx;
use crate::node::guard::Report;
use crate::tunnel::devices::Devices;
use crate::tunnel::frame::{read_frame, write_frame};
use gateway_core::detect::{Direction, Signal};

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
    accept_loop(
        ctx,
        "Publish",
        gateway_core::detect::Direction::Inbound,
        listen,
        listener,
        stop.clone(),
        move |tcp, peer| {
            let Some(publish) = publish_at(&c, listen) else {
                reset_tcp(&tcp);
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
    let target = format!("publish {}", publish.listen);
    let who = Report::tcp(peer, Direction::Inbound, &target);
    let port = u64::from(publish.listen.port());
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
        ctx.report_refusal(&who, port, decision.rule.as_str());
        reset_tcp(&tcp);
        return;
    }
    let Some(conn) = devices.get(&publish.device) else {
        let reason = format!("device {} is not connected", publish.device);
        ctx.refuse("relay.refuse", &subject, &object, "no-route", &reason);
        reset_tcp(&tcp);
        return;
    };
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        reset_tcp(&tcp);
        return;
    };
    let open = Frame::Open {
        service: publish.service.clone(),
        origin: Origin::Provincial,
        client: peer,
    };
    if write_frame(&mut send, &open).await.is_err() {
        reset_tcp(&tcp);
        return;
    }
    match read_frame(&mut recv).await {
        Ok(Frame::Opened) => {}
        Ok(Frame::Refuse { rule, message, .. }) => {
            ctx.refuse("relay.refuse", &subject, &object, &rule, &message);
            ctx.report_refusal(&who, port, &rule);
            reset_tcp(&tcp);
            return;
        }
        other => {
            info!(?other, "Edge gave no answer");
            reset_tcp(&tcp);
            return;
        }
    }
    let _ = tcp.set_nodelay(true);
    let started = ctx.relay_opened(&subject, &object, decision.rule.as_str(), decision.reason);
    let live = [AtomicU64::new(0), AtomicU64::new(0)];
    let done = {
        let (tr, mut tw) = tcp.split();
        let mut tr = BufSource::new(tr);
        let mut qr = BufSource::new(&mut recv);
        tokio::select! {
            s = splice(&mut tr, &mut tw, &mut qr, &mut send, &live) => Some(s),
            () = stop.cancelled() => None,
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
