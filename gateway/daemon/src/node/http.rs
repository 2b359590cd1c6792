//! The node's HTTP listeners (ingest, admin, the hub's consumers' and
//! operators' APIs), served connection by connection with limits on each:
//!
//! - at most [`Limits::max_connections`] connections per listener and
//!   [`Limits::per_source`] per source address; one over is closed at once,
//!   counted and audited under its address (summarised per 10 s);
//! - a TLS handshake within [`HANDSHAKE_TIMEOUT`], request headers within
//!   [`Limits::header_timeout`], and no connection silent for
//!   [`Limits::idle_timeout`] (slowloris and idle floods end);
//! - bodies are read by the handlers that take them, capped and with a rate
//!   floor ([`read_body`]);
//! - connections that can be closed from outside (a revoked consumer's).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, info};

use gateway_core::detect::{Direction, Signal};

use super::guard::Report;
use super::limit::Slots;
use super::{Ctx, PeerAttempt};

/// What a failed TLS handshake tells the detectors: a certificate from a CA
/// this node does not trust is an alarm at once, anything else a failure.
pub fn handshake_signal(error: &std::io::Error) -> Signal {
    let unknown_ca = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .is_some_and(foreign_ca);
    if unknown_ca {
        Signal::ForeignCertificate
    } else {
        Signal::HandshakeFailed
    }
}

/// Whether a TLS error says the peer's certificate is foreign: from a CA
/// this node does not know, claiming its CA without its signature, or one no
/// CA of ours could have issued (a CA certificate as a client's, a malformed
/// one). Expired, not yet valid and revoked certificates are failures.
pub fn foreign_ca(e: &rustls::Error) -> bool {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => !matches!(
            c,
            C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. }
                | C::Revoked
        ),
        _ => false,
    }
}

/// The largest request body of the APIs (a config push, a certificate request).
pub const MAX_BODY: usize = 1 << 20;

/// The longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A body may take this long whatever its size ...
pub const BODY_GRACE: Duration = Duration::from_secs(10);
/// ... and must arrive at least this fast (bytes per second) after that.
pub const MIN_BODY_RATE: u64 = 1024;

/// Limits of one HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections open at once from one address.
    pub per_source: usize,
    /// Request headers must arrive within this.
    pub header_timeout: Duration,
    /// A connection that sends and receives nothing this long is closed.
    pub idle_timeout: Duration,
    /// Request bodies are read before the handler runs, at most this long and
    /// with the rate floor; `None`: the handlers read them ([`read_body`]).
    pub max_body: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            per_source: 64,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_body: Some(MAX_BODY),
        }
    }
}

/// Given a completed TLS handshake, the token that closes the connection
/// when cancelled.
pub type Admit = Arc<dyn Fn(&rustls::ServerConnection) -> CancellationToken + Send + Sync>;

/// What a listener serves: plain TCP, or TLS (with an optional closing token
/// per connection).
pub enum Security {
    /// Plain HTTP (ingest on a legacy network, admin on loopback).
    Plain,
    /// HTTPS.
    Tls(tokio_rustls::TlsAcceptor, Option<Admit>),
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// A connection that ends (reads and writes fail) once its token is
/// cancelled or it has been silent for the idle timeout, so hyper drops it
/// even while it waits for a request.
struct Conn {
    io: Io,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    idle: Pin<Box<tokio::time::Sleep>>,
    idle_for: Duration,
}

impl Conn {
    /// An error if the connection must end now.
    fn ended(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        if self.closed.as_mut().poll(cx).is_ready() {
            return Some(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "closed: the peer's identity was revoked",
            ));
        }
        if self.idle.as_mut().poll(cx).is_ready() {
            return Some(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "closed: idle",
            ));
        }
        None
    }

    fn progressed(&mut self) {
        let at = tokio::time::Instant::now() + self.idle_for;
        self.idle.as_mut().reset(at);
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.ended(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let r = match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.progressed();
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.ended(cx) {
            return Poll::Ready(Err(e));
        }
        let r = match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, data),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        };
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.progressed();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One HTTP listener to serve.
pub struct Listener {
    /// The bound socket.
    pub tcp: TcpListener,
    /// Plain or TLS.
    pub security: Security,
    /// Its name in the log and in refusals.
    pub what: &'static str,
    /// Its limits.
    pub limits: Limits,
}

/// Serves `router` on `listener` until `stop`, then lets each connection
/// finish its request (5 s at most) and returns once the socket is closed.
/// Each request carries `ConnectInfo(info(address, client certificate))`.
/// Refusals over a cap are audited through `ctx` (when given).
pub async fn serve<T, F>(
    ctx: Option<Arc<Ctx>>,
    listener: Listener,
    router: Router,
    info: F,
    stop: CancellationToken,
) where
    T: Clone + Send + Sync + 'static,
    F: Fn(SocketAddr, Option<rustls_pki_types::CertificateDer<'static>>) -> T
        + Send
        + Sync
        + 'static,
{
    let Listener {
        tcp,
        security,
        what,
        limits,
    } = listener;
    let security = Arc::new(security);
    let info = Arc::new(info);
    let router = match limits.max_body {
        Some(max) => router.layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                bounded(req, next, max)
            },
        )),
        None => router,
    };
    let slots = Slots::new(limits.max_connections, limits.per_source);
    let tracker = tokio_util::task::TaskTracker::new();
    // Ingest is the legacy side's; every other HTTP listener the provincial side's.
    let direction = if what == "Ingest" {
        Direction::Outbound
    } else {
        Direction::Inbound
    };
    let target: Arc<str> = Arc::from(format!(
        "{} {}",
        what.to_lowercase(),
        tcp.local_addr().map(|a| a.to_string()).unwrap_or_default()
    ));
    loop {
        let accepted = tokio::select! {
            a = tcp.accept() => a,
            () = stop.cancelled() => break,
        };
        let (stream, addr) = match accepted {
            Ok(a) => a,
            Err(error) => {
                super::sockets::accept_failed(&error).await;
                continue;
            }
        };
        if let Some(ctx) = &ctx {
            if ctx.banned(addr.ip()) {
                drop(stream);
                continue;
            }
            ctx.report(&Report::tcp(addr, direction, &target), Signal::Connection);
        }
        let slot = match slots.take(addr.ip()) {
            Ok(s) => s,
            Err(reason) => {
                drop(stream);
                if let Some(ctx) = &ctx {
                    ctx.refuse_peer(
                        addr,
                        true,
                        PeerAttempt::ConnectionCap,
                        &format!("{what}: {reason}"),
                        "",
                    );
                }
                continue;
            }
        };
        let (security, info, router, stop) =
            (security.clone(), info.clone(), router.clone(), stop.clone());
        let (ctx, target) = (ctx.clone(), target.clone());
        tracker.spawn(async move {
            let _slot = slot;
            let (io, cert, token) = match &*security {
                Security::Plain => (Io::Plain(stream), None, CancellationToken::new()),
                Security::Tls(acceptor, admit) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let conn = tls.get_ref().1;
                            let cert = conn
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| c.clone().into_owned());
                            let token = admit
                                .as_ref()
                                .map_or_else(CancellationToken::new, |admit| admit(conn));
                            (Io::Tls(Box::new(tls)), cert, token)
                        }
                        Ok(Err(error)) => {
                            info!(%addr, %error, "{what}: TLS handshake failed");
                            if let Some(ctx) = &ctx {
                                ctx.report(
                                    &Report::tcp(addr, direction, &target),
                                    handshake_signal(&error),
                                );
                            }
                            return;
                        }
                        Err(_) => {
                            info!(%addr, "{what}: TLS handshake timed out");
                            if let Some(ctx) = &ctx {
                                ctx.report(
                                    &Report::tcp(addr, direction, &target),
                                    Signal::HandshakeFailed,
                                );
                            }
                            return;
                        }
                    }
                }
            };
            let conn = Conn {
                io,
                closed: Box::pin(token.cancelled_owned()),
                idle: Box::pin(tokio::time::sleep(limits.idle_timeout)),
                idle_for: limits.idle_timeout,
            };
            let app = router.layer(axum::Extension(ConnectInfo(info(addr, cert))));
            let service = hyper_util::service::TowerToHyperService::new(app);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            let served = builder.serve_connection(hyper_util::rt::TokioIo::new(conn), service);
            tokio::pin!(served);
            let ended = tokio::select! {
                r = served.as_mut() => r,
                () = stop.cancelled() => {
                    served.as_mut().graceful_shutdown();
                    tokio::time::timeout(Duration::from_secs(5), served.as_mut())
                        .await
                        .unwrap_or(Ok(()))
                }
            };
            if let Err(error) = ended {
                debug!(%addr, %error, "{what}: connection ended");
            }
        });
    }
    drop(tcp);
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
}

/// Reads a request's body (capped, with the rate floor) before the handler.
async fn bounded(
    req: axum::extract::Request,
    next: axum::middleware::Next,
    max: usize,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let (parts, body) = req.into_parts();
    let refuse = |status: axum::http::StatusCode, error: String| {
        (status, axum::Json(serde_json::json!({ "error": error }))).into_response()
    };
    match read_body(body, max).await {
        Ok(bytes) => {
            next.run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(BodyError::TooLarge(limit)) => refuse(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            format!("body longer than {limit} bytes"),
        ),
        Err(BodyError::TooSlow(got)) => refuse(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            format!(
                "body too slow: {got} bytes, under {MIN_BODY_RATE} bytes/s after {} s",
                BODY_GRACE.as_secs()
            ),
        ),
        Err(BodyError::Failed(e)) => refuse(axum::http::StatusCode::BAD_REQUEST, e),
    }
}

/// Why a body was not read.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Longer than the limit.
    TooLarge(usize),
    /// Slower than [`MIN_BODY_RATE`] after [`BODY_GRACE`]: what had come.
    TooSlow(u64),
    /// The connection failed.
    Failed(String),
}

/// Reads `body` frame by frame: at most `limit` bytes, and after
/// [`BODY_GRACE`] at least [`MIN_BODY_RATE`] bytes per second on average.
///
/// # Errors
/// [`BodyError`] saying why.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, BodyError> {
    use http_body_util::BodyExt as _;
    let started = tokio::time::Instant::now();
    let mut body = body;
    let mut out = Vec::new();
    loop {
        // The latest moment the next byte may come and keep the average rate.
        let due = started
            + BODY_GRACE
            + Duration::from_millis((out.len() as u64 + 1) * 1000 / MIN_BODY_RATE);
        let frame = match tokio::time::timeout_at(due, body.frame()).await {
            Err(_) => return Err(BodyError::TooSlow(out.len() as u64)),
            Ok(None) => return Ok(out.into()),
            Ok(Some(Err(e))) => return Err(BodyError::Failed(e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(BodyError::TooLarge(limit));
            }
            out.extend_from_slice(&data);
        }
    }
}
