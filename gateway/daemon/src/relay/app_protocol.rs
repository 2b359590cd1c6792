//! Rule R5.app-protocol on a running relay: at boundary level 3 and up, the
//! first bytes a client sends must be the service's declared application
//! protocol (`gateway_core::sniff` decides; this reads them off the stream,
//! bounded in size and time), and then the whole client stream is followed
//! by an [`Inspected`] source: every HTTP request head checked before its
//! bytes pass, a TLS stream's whole ClientHello. A violation ends the relay
//! (both sides reset) and is kept for the audit.

use gateway_core::sniff::{MAX_SNIFF, Sniff, sniff};

use crate::tunnel::frame::HANDSHAKE_TIMEOUT;

/// Reads the first bytes of `recv` into `buf` until `sniff` can tell whether
/// they are `app`; a stream that ends or stalls past [`HANDSHAKE_TIMEOUT`] is a
/// mismatch.
pub async fn sniff_stream(
    recv: &mut quinn::RecvStream,
    app: gateway_core::config::AppProtocol,
    buf: &mut Vec<u8>,
) -> Sniff {
    let deadline = tokio::time::sleep(HANDSHAKE_TIMEOUT);
    tokio::pin!(deadline);
    let mut chunk = [0u8; MAX_SNIFF];
    loop {
        match sniff(app, buf) {
            Sniff::NeedMore => {}
            verdict => return verdict,
        }
        let want = MAX_SNIFF.saturating_sub(buf.len()).max(1);
        tokio::select! {
            r = recv.read(&mut chunk[..want]) => match r {
                Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
                _ => return Sniff::Mismatch,
            },
            () = &mut deadline => return Sniff::Mismatch,
        }
    }
}

/// A client stream followed by a [`gateway_core::sniff::Inspector`]: only
/// checked bytes come out; a violation ends the stream with an error, and is
/// kept in `violation` for the relay's audit record.
pub struct Inspected<S> {
    inner: S,
    inspector: gateway_core::sniff::Inspector,
    /// The violation that ended the stream, if one did.
    pub violation: std::sync::Arc<std::sync::Mutex<Option<gateway_core::sniff::Violation>>>,
}

impl<S> Inspected<S> {
    /// Follows `inner` with `inspector` (already fed the first bytes).
    pub fn new(inner: S, inspector: gateway_core::sniff::Inspector) -> Self {
        Inspected {
            inner,
            inspector,
            violation: std::sync::Arc::default(),
        }
    }
}

impl<S: super::splice::Source> super::splice::Source for Inspected<S> {
    async fn next(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        loop {
            let Some(chunk) = self.inner.next().await? else {
                return Ok(None);
            };
            match self.inspector.feed(&chunk) {
                Ok(out) if out.is_empty() => {}
                Ok(out) => return Ok(Some(out.into())),
                Err(v) => {
                    let message = format!("at byte {}: {}", v.offset, v.reason);
                    *self
                        .violation
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(v);
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        message,
                    ));
                }
            }
        }
    }
}
