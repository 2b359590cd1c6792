//! A hub joins two edges' UDP flows, tunnel to tunnel: datagrams pass from one
//! QUIC connection to the other without touching a socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};

use gateway_core::wire::{Frame, Origin, RefuseCode};

use super::flows::{Flow, Flows, Opener, Target, flow_closed, next_flow};
use super::link::FlowSignal;
use crate::node::Ctx;
use crate::node::clock::now_ms;
use crate::relay::transit::decide_transit;
use crate::tunnel::devices::Devices;

/// A hub joins edge `from`'s UDP flow `flow_from` (opened on `conn_from` for
/// `DEVICE/SERVICE`) to a new flow on that device's tunnel, if the transit
/// policy allows it; datagrams pass from one tunnel to the other without
/// touching a socket, and either side ending its flow ends both.
pub async fn transit(
    (ctx, devices, flows): (Arc<Ctx>, Arc<Devices>, Arc<Flows>),
    from: String,
    (service, client, flow_from): (String, SocketAddr, u32),
    conn_from: quinn::Connection,
    signal: FlowSignal,
) {
    let subject = format!("{from}:{client}");
    let who = (subject.as_str(), service.as_str());
    let decision = match decide_transit(&ctx, &from, &service, &subject) {
        Ok(d) => d,
        Err((code, rule, message)) => return signal.refuse(code, &rule, message),
    };
    let Some((device, svc)) = service.split_once('/') else {
        return;
    };
    let Some(conn_to) = devices.get(device) else {
        let message = format!("device {device} is not connected to hub {}", ctx.id);
        ctx.refuse("relay.refuse", who.0, who.1, "no-route", &message);
        return signal.refuse(RefuseCode::NoRoute, "", message);
    };
    let flow_to = next_flow(Opener::Hub);
    let open = Frame::OpenUdp {
        service: svc.to_owned(),
        origin: Origin::Device(from.clone()),
        client,
        flow: flow_to,
    };
    let far = match flows.openers.open(&conn_to, open, flow_to).await {
        Ok(f) => f,
        Err(Frame::Refuse {
            code,
            rule,
            message,
        }) => {
            ctx.refuse("relay.refuse", who.0, who.1, &rule, &message);
            return signal.refuse(code, &rule, message);
        }
        Err(_) => return,
    };
    // Both ends' flows exist before the source hears it may send.
    let (last, dropped) = (
        Arc::new(AtomicI64::new(now_ms())),
        Arc::new(AtomicU64::new(0)),
    );
    let (forward, backward) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let joined = [
        (&conn_from, flow_from, &conn_to, flow_to, &forward),
        (&conn_to, flow_to, &conn_from, flow_from, &backward),
    ];
    for (at, flow, to, to_flow, count) in joined {
        flows.insert(
            at.stable_id(),
            flow,
            Flow {
                to: Target::Tunnel {
                    conn: to.clone(),
                    flow: to_flow,
                    dropped: dropped.clone(),
                },
                last: last.clone(),
                from_tunnel: count.clone(),
                // Checked by the edge that serves the service.
                check: None,
            },
        );
    }
    signal.opened();
    let started = ctx.relay_opened(
        &subject,
        &service,
        decision.rule.as_str(),
        format!("udp flow {flow_from} -> {device} flow {flow_to}"),
    );
    let how = tokio::select! {
        () = signal.ended() => "closed",
        () = far.ended() => "expired",
        () = ctx.kill.cancelled() => "cut",
    };
    flows.remove(conn_from.stable_id(), flow_from);
    flows.remove(conn_to.stable_id(), flow_to);
    drop((signal, far));
    let bytes = (forward.as_ref(), backward.as_ref());
    flow_closed(
        &ctx,
        (&subject, &service),
        bytes,
        (flow_from, &dropped),
        started,
        how,
    );
}
