//! A hub carries one department's gateway to another's service
//! (gateway to gateway): edge `from` asks for `DEVICE/SERVICE`, the hub decides
//! the transit (R0.allow-transit and the boundary rules), asks the device, and
//! splices the two tunnels' streams. The steps are shared with UDP transit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use gateway_core::policy::Crossing;
use gateway_core::wire::{Frame, Origin, RefuseCode};

use super::splice::{BufSource, Spliced, splice};
use crate::node::Ctx;
use crate::tunnel::devices::Devices;
use crate::tunnel::frame::{read_frame, refuse, write_frame};

/// The transit policy for edge `from` asking for `service` (`DEVICE/SERVICE`):
/// the decision when allowed, else the refusal (audited).
pub fn decide_transit(
    ctx: &Ctx,
    from: &str,
    service: &str,
    subject: &str,
) -> Result<gateway_core::policy::Decision, super::Refusal> {
    let Some((device, _)) = service.split_once('/') else {
        return Err((
            RefuseCode::NoRoute,
            String::new(),
            format!("{service:?} is not DEVICE/SERVICE"),
        ));
    };
    let decision = ctx
        .policy()
        .decide(&Crossing::Transit { from, to: device }, ctx.today());
    if decision.is_allowed() {
        return Ok(decision);
    }
    Err(super::denied(ctx, (subject, service), decision))
}

/// [`decide_transit`], refusing on `send` when it refuses.
async fn allow_transit(
    ctx: &Ctx,
    from: &str,
    service: &str,
    subject: &str,
    send: &mut quinn::SendStream,
) -> Option<gateway_core::policy::Decision> {
    match decide_transit(ctx, from, service, subject) {
        Ok(d) => Some(d),
        Err((code, rule, message)) => {
            refuse(send, code, &rule, message).await;
            None
        }
    }
}

/// Transit, second step: opens a stream on `device`'s tunnel, sends `open`
/// and reads the device's answer (a `Refuse` when it gives none); returns the
/// tunnel, the stream and the answer. `None` when
/// the device is not there, after refusing on the source's `send` (audited as
/// `subject` asking for `service`).
async fn ask_device(
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
            refuse(send, RefuseCode::NoRoute, "", message).await;
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
async fn answer_source(
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
pub async fn transit(
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
    let started = ctx.relay_opened(&subject, &service, decision.rule.as_str(), decision.reason);
    let live = [AtomicU64::new(0), AtomicU64::new(0)];
    let kill = ctx.kill.clone();
    let (mut src_a, mut src_b) = (BufSource::new(&mut recv), BufSource::new(&mut trecv));
    let done = tokio::select! {
        s = splice(&mut src_a, &mut send, &mut src_b, &mut tsend, &live) => Some(s),
        () = kill.cancelled() => None,
    };
    ctx.relay_closed(
        &subject,
        &service,
        Spliced::moved(&live),
        started,
        Spliced::end(done),
        "",
    );
}
