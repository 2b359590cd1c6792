//! The edge's side of a tunnel: one task per (hub, lane) connects, says the
//! versioned hello, fills its slot in [`Hubs`] while up, and on loss reconnects
//! with capped, jittered backoff. What runs on the tunnel is the edge role's
//! business: it comes in through [`Handler`].

use std::future::Future;
use std::sync::Arc;

use tokio::task::JoinHandle;

use gateway_core::backoff::Backoff;
use gateway_core::units::HostPort;
use gateway_core::wire::{self, Frame};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::accept::{BiStream, Control};
use super::frame::{read_frame, write_frame};
use super::hubs::Hubs;
use super::tls::ClientHolder;
use crate::admin::metrics::PATH_SAMPLE;
use crate::node::Ctx;

/// What the edge does with a hub's tunnel: the role wires its capabilities in
/// (management session, served services, deliveries); the tunnel knows none
/// of them.
pub trait Handler: Send + Sync + 'static {
    /// The tunnel on `lane` is up: starts what serves its control stream (lane
    /// 0 carries the management session). The returned task is aborted when the
    /// tunnel goes down.
    fn up(&self, lane: usize, conn: &quinn::Connection, control: Control) -> JoinHandle<()>;
    /// A stream the hub opened (on `hub`, named for logs), after its first
    /// frame. Runs on the node's tracker, so draining waits for it.
    fn stream(
        &self,
        hub: &str,
        conn: quinn::Connection,
        first: Frame,
        stream: BiStream,
    ) -> impl Future<Output = ()> + Send;
}

/// What one tunnel task keeps up.
pub struct TunnelSpec {
    /// The slots of every hub's lanes.
    pub hubs: Arc<Hubs>,
    /// This tunnel's slot.
    pub index: usize,
    /// The hub.
    pub hub: HostPort,
    /// The lane's QUIC endpoint.
    pub endpoint: quinn::Endpoint,
    /// The TLS client configuration (renewed certificates are swapped in).
    pub client: ClientHolder,
    /// Lane number; lane 0 carries the management session.
    pub lane: usize,
    /// Stops this tunnel (a new uplink, a reconnect command).
    pub stop: CancellationToken,
}

/// Keeps the tunnel of `spec` up until draining or its stop: connect, hello,
/// serve, and on loss reconnect with capped, jittered backoff.
pub async fn keep_tunnel<H: Handler>(ctx: Arc<Ctx>, spec: TunnelSpec, handler: Arc<H>) {
    let TunnelSpec {
        hubs,
        index,
        hub,
        endpoint,
        client,
        lane,
        stop,
    } = spec;
    // Metrics and audit name each lane: host:port, host:port#1, ...
    let name = if lane == 0 {
        hub.to_string()
    } else {
        format!("{hub}#{lane}")
    };
    let span = info_span!("tunnel", hub = %name);
    async move {
        let mut backoff = Backoff::default();
        loop {
            if ctx.draining.is_cancelled() || stop.is_cancelled() {
                return;
            }
            let config = client
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let attempt = tokio::select! {
                r = connect(&hub, &endpoint, &config) => r,
                () = stop.cancelled() => return,
            };
            match attempt {
                Ok((conn, (send, recv))) => {
                    if stop.is_cancelled() {
                        conn.close(quinn::VarInt::from_u32(0), b"reconnecting");
                        return;
                    }
                    backoff.reset();
                    // Usable for relays before anyone is told it is up.
                    hubs.set(index, Some(conn.clone()));
                    ctx.metrics.peer(&name, true);
                    info!(rtt_ms = conn.rtt().as_millis() as u64, "Tunnel up");
                    ctx.audit.record(
                        &name,
                        "tunnel",
                        "tunnel.up",
                        "ok",
                        "",
                        format!("peer={}", conn.remote_address()),
                    );
                    let session = handler.up(lane, &conn, (send, recv));
                    let stopped = tokio::select! {
                        () = serve_tunnel(&ctx, &conn, &name, &handler) => false,
                        () = stop.cancelled() => true,
                    };
                    session.abort();
                    if stopped {
                        conn.close(quinn::VarInt::from_u32(0), b"reconnecting");
                        ctx.metrics.peer(&name, false);
                        info!("Tunnel closed to reconnect");
                        ctx.audit.record(
                            &name,
                            "tunnel",
                            "tunnel.down",
                            "ok",
                            "",
                            "reconnect".into(),
                        );
                        return;
                    }
                    hubs.set(index, None);
                    ctx.metrics.peer(&name, false);
                    let reason = conn
                        .close_reason()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| "draining".into());
                    if revoked(&conn) {
                        error!(
                            retry_s = REVOKED_RETRY.as_secs(),
                            "The hub revoked this device. {REVOKED_FIX}"
                        );
                        ctx.audit
                            .record(&name, "tunnel", "tunnel.down", "ok", "", reason);
                        if !revoked_pause(&ctx, &stop).await {
                            return;
                        }
                        continue;
                    } else if let Some(why) = refusal(&conn) {
                        error!("Tunnel closed by the hub: {why}");
                    } else {
                        warn!(%reason, "Tunnel down");
                    }
                    ctx.audit
                        .record(&name, "tunnel", "tunnel.down", "ok", "", reason);
                    if ctx.draining.is_cancelled() {
                        conn.close(quinn::VarInt::from_u32(0), b"shutdown");
                        return;
                    }
                }
                Err(ConnectError::Busy) => {
                    // Refused for load: come back later, spread out.
                    ctx.metrics.connect_failed(&name);
                    debug!("The hub is busy (refused the handshake); retrying later");
                    let delay = gateway_core::backoff::busy_delay(rand::random::<f64>());
                    tokio::select! {
                        go = ctx.pause(delay) => if !go { return },
                        () = stop.cancelled() => return,
                    }
                    continue;
                }
                Err(ConnectError::Revoked) => {
                    ctx.metrics.connect_failed(&name);
                    error!(
                        retry_s = REVOKED_RETRY.as_secs(),
                        "The hub refused this device: it is revoked. {REVOKED_FIX}"
                    );
                    if !revoked_pause(&ctx, &stop).await {
                        return;
                    }
                    continue;
                }
                Err(error) => {
                    ctx.metrics.connect_failed(&name);
                    if backoff.failures() < 3 || backoff.failures() % 30 == 0 {
                        warn!(%error, failures = backoff.failures() + 1, "Tunnel connect failed");
                    } else {
                        debug!(%error, "Tunnel connect failed");
                    }
                }
            }
            let delay = backoff.next_delay(rand::random::<f64>());
            tokio::select! {
                go = ctx.pause(delay) => if !go { return },
                () = stop.cancelled() => return,
            }
        }
    }
    .instrument(span)
    .await;
}

/// Waits [`REVOKED_RETRY`] (jittered by up to a tenth); false when the
/// tunnel is to stop.
async fn revoked_pause(ctx: &Ctx, stop: &CancellationToken) -> bool {
    let delay = REVOKED_RETRY + REVOKED_RETRY.mul_f64(rand::random::<f64>() / 10.0);
    tokio::select! {
        go = ctx.pause(delay) => go,
        () = stop.cancelled() => false,
    }
}

fn revoked(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == quinn::VarInt::from_u32(gateway_core::fleet::CLOSE_REVOKED)
    )
}

/// Connecting a tunnel failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The hub's name did not resolve.
    #[error("cannot resolve {0}")]
    Resolve(String),
    /// QUIC or TLS failed.
    #[error("{0}")]
    Quic(String),
    /// The hub refused the handshake for load.
    #[error("the hub refused the handshake: it is busy")]
    Busy,
    /// The hub refused the hello.
    #[error("hub refused: {0}")]
    Refused(String),
    /// The hub closed the connection because this device is revoked.
    #[error("the hub refused this device: it is revoked")]
    Revoked,
}

/// How long a revoked box waits before it asks a hub again: an operator who
/// re-enrolls it restarts it anyway, and a box retrying every second fills
/// the hub's log and audit for nothing.
pub const REVOKED_RETRY: std::time::Duration = std::time::Duration::from_secs(600);

const REVOKED_FIX: &str = "Its tunnels stay down; to bring the box back, the security administrator makes a token with `gatewayctl token create --device ID --replace` and the box is enrolled again with it (`gatewayd enroll`). Asking again in 10 minutes";

async fn connect(
    hub: &HostPort,
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
) -> Result<(quinn::Connection, Control), ConnectError> {
    let target = format!("{}:{}", hub.host, hub.port);
    let addr = tokio::net::lookup_host(&target)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ConnectError::Resolve(target.clone()))?;
    let conn = endpoint
        .connect_with(client.clone(), addr, &hub.host)
        .map_err(|e| ConnectError::Quic(e.to_string()))?
        .await
        .map_err(|e| match e {
            quinn::ConnectionError::ConnectionClosed(c)
                if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                ConnectError::Busy
            }
            e => ConnectError::Quic(e.to_string()),
        })?;
    let refused = |e: String| {
        if revoked(&conn) {
            return ConnectError::Revoked;
        }
        refusal(&conn).map_or(ConnectError::Quic(e), ConnectError::Refused)
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| refused(e.to_string()))?;
    write_frame(
        &mut send,
        &Frame::Hello {
            version: wire::VERSION,
        },
    )
    .await
    .map_err(|e| refused(e.to_string()))?;
    match read_frame(&mut recv).await {
        Ok(Frame::Welcome {
            version,
            hub: hub_id,
        }) => {
            debug!(version, hub = %hub_id, "Welcome");
            Ok((conn, (send, recv)))
        }
        Ok(Frame::Refuse { message, .. }) => Err(ConnectError::Refused(message)),
        Ok(other) => Err(ConnectError::Refused(format!(
            "unexpected answer {other:?}"
        ))),
        Err(e) => Err(refused(e.to_string())),
    }
}

/// What the hub's close of a connection before its welcome means, when it
/// is a refusal of this device.
fn refusal(conn: &quinn::Connection) -> Option<String> {
    let Some(quinn::ConnectionError::ApplicationClosed(c)) = conn.close_reason() else {
        return None;
    };
    if c.error_code == quinn::VarInt::from_u32(gateway_core::fleet::CLOSE_REVOKED) {
        Some("this device is revoked; ask central operations".into())
    } else if c.error_code == quinn::VarInt::from_u32(gateway_core::fleet::CLOSE_SUPERSEDED) {
        Some("this box's certificate is no longer the device's (the device was re-enrolled elsewhere, or renewed): enroll this box again with gatewayd enroll, or ask central operations".into())
    } else {
        None
    }
}

async fn serve_tunnel<H: Handler>(
    ctx: &Arc<Ctx>,
    conn: &quinn::Connection,
    hub: &str,
    handler: &Arc<H>,
) {
    let mut sample = tokio::time::interval(PATH_SAMPLE);
    let mut path = conn.stats().path;
    let mut budget = super::streams::Budget::new(conn, super::tls::edge_lane_streams());
    loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let (handler, hub, conn) = (handler.clone(), hub.to_owned(), conn.clone());
                    let open = budget.opened();
                    ctx.tracker.spawn(async move {
                        let _open = open;
                        first_frame(&*handler, &hub, conn, send, recv).await
                    });
                }
                Err(_) => return,
            },
            _ = sample.tick() => path = ctx.metrics.sample_path(hub, conn, &path),
            () = ctx.draining.cancelled() => return,
        }
    }
}

/// Reads the first frame of a stream the hub opened: a ping is answered here
/// (the hub checks that this process is alive), anything else goes to the role.
async fn first_frame<H: Handler>(
    handler: &H,
    hub: &str,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    match read_frame(&mut recv).await {
        Ok(Frame::Ping) => {
            let _ = write_frame(&mut send, &Frame::Ping).await;
            let _ = send.finish();
        }
        Ok(first) => handler.stream(hub, conn, first, (send, recv)).await,
        Err(error) => debug!(%error, "Bad stream from hub"),
    }
}
