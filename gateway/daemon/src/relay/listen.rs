//! Accepting TCP clients on `[[publish]]` and `[[access]]` listeners, and
//! refusing one with a reset.

use std::future::Future;
use std::time::Duration;

use crate::node::PeerAttempt;
use crate::node::guard::Report;
use crate::node::limit::Slots;
use crate::node::sockets::accept_failed;

/// Connections a publish or access listener keeps open at once from one
/// client address.
pub const PER_SOURCE: usize = 64;
/// ... and in all (each service has its own `max_connections` too).
pub const MAX_OPEN: usize = 16_384;

/// Resets a TCP connection (RST instead of FIN) as it is dropped.
#[allow(deprecated)] // a zero linger never blocks: the kernel sends RST at close
pub fn reset_tcp(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_linger(Some(Duration::ZERO));
}

/// Accepts TCP connections on a `[[publish]]` or `[[access]]` listener until
/// `stop` or draining. For each one `open` looks up what the listener serves in
/// the policy in force (so a reload takes effect at once) and returns the name
/// for logs and the relay to run, or `None` after refusing the connection itself.
/// Relays are spawned on the node's tracker, so draining waits for them.
/// At most [`PER_SOURCE`] connections from one client address (and
/// [`MAX_OPEN`] in all) are open at once; one over is reset and audited under
/// its address, summarised. A banned source is reset before anything else;
/// every connection is reported to the detectors (floods).
pub async fn accept_loop<F, R>(
    ctx: std::sync::Arc<crate::node::Ctx>,
    what: &'static str,
    direction: gateway_core::detect::Direction,
    listen: std::net::SocketAddr,
    listener: tokio::net::TcpListener,
    stop: tokio_util::sync::CancellationToken,
    mut open: F,
) where
    F: FnMut(tokio::net::TcpStream, std::net::SocketAddr) -> Option<(String, R)>,
    R: Future<Output = ()> + Send + 'static,
{
    use tracing::Instrument as _;
    tracing::info!(%listen, "{what} listening");
    let slots = Slots::new(MAX_OPEN, PER_SOURCE);
    let target = format!("{} {listen}", what.to_lowercase());
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => break,
            () = ctx.draining.cancelled() => break,
        };
        match accepted {
            Ok((tcp, peer)) => {
                if ctx.banned(peer.ip()) {
                    reset_tcp(&tcp);
                    continue;
                }
                ctx.report(
                    &Report::tcp(peer, direction, &target),
                    gateway_core::detect::Signal::Connection,
                );
                let slot = match slots.take(peer.ip()) {
                    Ok(s) => s,
                    Err(reason) => {
                        reset_tcp(&tcp);
                        ctx.refuse_peer(
                            peer,
                            true,
                            PeerAttempt::ConnectionCap,
                            &format!("{what} {listen}: {reason}"),
                            "",
                        );
                        continue;
                    }
                };
                if let Some((object, relay)) = open(tcp, peer) {
                    let span = tracing::info_span!("relay", service = %object, %peer);
                    ctx.tracker.spawn(
                        async move {
                            let _slot = slot;
                            relay.await;
                        }
                        .instrument(span),
                    );
                }
            }
            Err(error) => accept_failed(&error).await,
        }
    }
    tracing::info!(%listen, "{what} stopped");
}
