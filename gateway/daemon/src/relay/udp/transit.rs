//! A hub joins two edges' UDP flows, tunnel to tunnel: datagrams pass from one
//! QUIC connection to the other without touching a socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};

use gateway_core::wire::{Frame, Origin};

use super::flows::{Flow, Flows, Target, flow_closed, next_flow};
use crate::node::Ctx;
use crate::node::clock::now_ms;
use crate::relay::transit::{answer_source, ask_device};
use crate::tunnel::devices::Devices;

/// A hub joins edge `from`'s UDP flow `flow_from` (opened on `conn_from` for
/// `DEVICE/SERVICE`) to a new flow on that device's tunnel, after the transit
/// policy allowed it; datagrams pass from one tunnel to the other without
/// touching a socket, and either side ending its stream ends both.
#[allow(clippy::too_many_arguments)]
pub async fn transit(
    ctx: Arc<Ctx>,
    devices: Arc<Devices>,
    flows: Arc<Flows>,
    from: String,
    (service, client, flow_from): (String, SocketAddr, u32),
    conn_from: quinn::Connection,
    rule: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let subject = format!("{from}:{client}");
    let Some((device, svc)) = service.split_once('/') else {
        return;
    };
    let flow_to = next_flow();
    let open = Frame::OpenUdp {
        service: svc.to_owned(),
        origin: Origin::Device(from.clone()),
        client,
        flow: flow_to,
    };
    let who = (subject.as_str(), service.as_str());
    let Some((conn_to, mut tsend, mut trecv, answer)) =
        ask_device(&ctx, &devices, device, &open, who, &mut send).await
    else {
        return;
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
    if matches!(answer, Frame::Opened) {
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
                },
            );
        }
    }
    if !answer_source(&ctx, &answer, who, &mut send).await {
        return;
    }
    let started = ctx.relay_opened(
        &subject,
        &service,
        &rule,
        format!("udp flow {flow_from} -> {device} flow {flow_to}"),
    );
    let (mut end, mut tend) = ([0u8; 1], [0u8; 1]);
    let how = tokio::select! {
        _ = recv.read(&mut end) => "closed",
        _ = trecv.read(&mut tend) => "expired",
        () = ctx.kill.cancelled() => "cut",
    };
    flows.remove(conn_from.stable_id(), flow_from);
    flows.remove(conn_to.stable_id(), flow_to);
    let _ = send.finish();
    let _ = tsend.finish();
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
