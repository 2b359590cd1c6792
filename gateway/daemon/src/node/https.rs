//! The hub's HTTPS listeners (operators' API, consumers' API): TLS handshakes
//! in their own tasks with a time limit, completed connections handed to axum,
//! and connections that can be closed from outside (a revoked consumer's).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::info;

/// The longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Given a completed handshake, the token that closes the connection when
/// cancelled.
pub type Admit = Arc<dyn Fn(&rustls::ServerConnection) -> CancellationToken + Send + Sync>;

/// A TLS connection that ends (reads and writes fail) once its token is
/// cancelled, so hyper drops it at once even while it waits for a request.
pub struct Conn {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Conn {
    /// The client's certificate, verified by the listener's TLS settings.
    pub fn peer_certificate(&self) -> Option<rustls_pki_types::CertificateDer<'static>> {
        let certs = self.tls.get_ref().1.peer_certificates()?;
        certs.first().map(|c| c.clone().into_owned())
    }

    fn is_closed(&mut self, cx: &mut Context<'_>) -> bool {
        self.closed.as_mut().poll(cx).is_ready()
    }
}

fn aborted() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "closed: the peer's identity was revoked",
    )
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.is_closed(cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.is_closed(cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// Completed TLS connections, handed to axum. Handshakes run in their own
/// tasks ([`HANDSHAKE_TIMEOUT`] each), so a slow or silent client never holds
/// up the others.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(Conn, SocketAddr)>,
    local: SocketAddr,
}

/// The accepting task of a [`TlsListener`]: it owns the socket, which is
/// closed once this task ends. Await it after the server stops, so a drained
/// node has released its port.
pub type Acceptor = tokio::task::JoinHandle<()>;

impl TlsListener {
    /// Accepts on `tcp` until `stop`; `what` names the listener in the log.
    /// `admit` gives each connection its closing token (none: never closed
    /// from outside).
    pub fn spawn(
        tcp: TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        stop: CancellationToken,
        what: &'static str,
        admit: Option<Admit>,
    ) -> (Self, Acceptor) {
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let local = tcp
            .local_addr()
            .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
        let accepting = tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = tcp.accept() => a,
                    () = stop.cancelled() => return,
                };
                let (stream, addr) = match accepted {
                    Ok(a) => a,
                    Err(error) => {
                        super::sockets::accept_failed(&error).await;
                        continue;
                    }
                };
                let (acceptor, tx, admit) = (acceptor.clone(), tx.clone(), admit.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let token = admit.map_or_else(CancellationToken::new, |admit| {
                                admit(tls.get_ref().1)
                            });
                            let conn = Conn {
                                tls,
                                closed: Box::pin(token.cancelled_owned()),
                            };
                            let _ = tx.send((conn, addr)).await;
                        }
                        Ok(Err(error)) => info!(%addr, %error, "{what}: TLS handshake failed"),
                        Err(_) => info!(%addr, "{what}: TLS handshake timed out"),
                    }
                });
            }
        });
        (TlsListener { ready, local }, accepting)
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The acceptor stopped (shutdown): wait for axum to notice.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
