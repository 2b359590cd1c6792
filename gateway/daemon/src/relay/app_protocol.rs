//! Rule R5.app-protocol on a running relay: at boundary level 3 and up, the
//! first bytes a client sends must be the service's declared application
//! protocol (`gateway_core::sniff` decides; this reads them off the stream,
//! bounded in size and time), and then the whole client stream is followed
//! by a [`Requests`] source: every HTTP request head checked before its
//! bytes pass, a TLS stream's whole ClientHello; an HTTP server's answers
//! are followed by a [`Responses`] source. A violation either way ends the
//! relay (both sides reset) and is kept for the audit; a request the
//! service's `http_allow` refuses is answered 403 by the gateway in its turn.

use gateway_core::config::AppProtocol;
use gateway_core::sniff::{Asked, Forbidden, Inspector, MAX_SNIFF, Sniff, Violation, sniff};

use crate::tunnel::frame::HANDSHAKE_TIMEOUT;

/// Reads the first bytes of `recv` into `buf` until `sniff` can tell whether
/// they are `app`; a stream that ends or stalls past [`HANDSHAKE_TIMEOUT`] is a
/// mismatch.
pub async fn sniff_stream(
    recv: &mut quinn::RecvStream,
    app: AppProtocol,
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

/// What the two inspectors of one HTTP connection share: the requests let
/// through (for reading their responses), the request `http_allow` refused
/// (answered once every earlier request is), and how the connection broke.
#[derive(Default)]
pub struct Exchange {
    asked: std::sync::Mutex<std::collections::VecDeque<Asked>>,
    forbidden: std::sync::Mutex<Option<Forbidden>>,
    broke: std::sync::Mutex<Option<String>>,
    /// Wakes the response side when a request is refused.
    refused: tokio::sync::Notify,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Exchange {
    /// Hands the requests `i` checked to the response side, and a refused
    /// request to the gateway's answer.
    pub fn after_requests(&self, i: &mut Inspector) {
        let asked = i.take_asked();
        if !asked.is_empty() {
            lock(&self.asked).extend(asked);
        }
        if let Some(f) = i.forbidden() {
            let mut slot = lock(&self.forbidden);
            if slot.is_none() {
                *slot = Some(f.clone());
                self.refused.notify_one();
            }
        }
    }

    /// The request `http_allow` refused, if one was.
    pub fn forbidden(&self) -> Option<Forbidden> {
        lock(&self.forbidden).clone()
    }

    /// Why the connection was cut (a protocol violation either way), if it was.
    pub fn broke(&self) -> Option<String> {
        lock(&self.broke).clone()
    }

    fn violated(&self, side: &str, v: &Violation) -> std::io::Error {
        let message = format!("{side} at byte {}: {}", v.offset, v.reason);
        lock(&self.broke).get_or_insert_with(|| message.clone());
        std::io::Error::new(std::io::ErrorKind::InvalidData, message)
    }
}

/// A client stream followed by a [`gateway_core::sniff::Inspector`]: only
/// checked bytes come out; a violation ends the stream with an error (kept
/// in the [`Exchange`] for the relay's audit record), a request `http_allow`
/// refuses ends it cleanly before that request.
pub struct Requests<S> {
    inner: S,
    inspector: Inspector,
    exchange: std::sync::Arc<Exchange>,
    app: AppProtocol,
}

impl<S> Requests<S> {
    /// Follows `inner` with `inspector` (already fed the first bytes).
    pub fn new(
        inner: S,
        inspector: Inspector,
        app: AppProtocol,
        exchange: std::sync::Arc<Exchange>,
    ) -> Self {
        Requests {
            inner,
            inspector,
            exchange,
            app,
        }
    }
}

impl<S: super::splice::Source> super::splice::Source for Requests<S> {
    async fn next(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        loop {
            if self.inspector.forbidden().is_some() {
                return Ok(None);
            }
            let Some(chunk) = self.inner.next().await? else {
                return Ok(None);
            };
            let fed = self.inspector.feed(&chunk);
            self.exchange.after_requests(&mut self.inspector);
            match fed {
                Ok(out) if out.is_empty() => {}
                Ok(out) => return Ok(Some(out.into())),
                Err(v) => {
                    let side = format!("the client's stream is not {:?}", self.app);
                    return Err(self.exchange.violated(&side, &v));
                }
            }
        }
    }
}

/// A legacy HTTP server's responses followed by an [`Inspector`]: each must
/// answer a request the client's side let through. Once a refused request's
/// turn comes (every earlier one answered), the gateway's 403 is sent in its
/// place and the stream ends.
pub struct Responses<S> {
    inner: S,
    inspector: Inspector,
    exchange: std::sync::Arc<Exchange>,
    answered: bool,
}

impl<S> Responses<S> {
    /// Follows `inner`, a server's responses to the requests in `exchange`.
    pub fn new(inner: S, exchange: std::sync::Arc<Exchange>) -> Self {
        Responses {
            inner,
            inspector: Inspector::responses(),
            exchange,
            answered: false,
        }
    }

    /// The requests let through since the last look, now awaited.
    fn expect(&mut self) -> std::io::Result<()> {
        let asked = std::mem::take(&mut *lock(&self.exchange.asked));
        for a in asked {
            if let Err(v) = self.inspector.expect(a) {
                return Err(self.exchange.violated("the server's responses", &v));
            }
        }
        Ok(())
    }

    /// The gateway's answer to a refused request, once it is its turn.
    fn refusal(&mut self) -> Option<bytes::Bytes> {
        if self.answered || !self.inspector.answered() {
            return None;
        }
        let f = self.exchange.forbidden()?;
        self.answered = true;
        Some(f.response().into())
    }
}

impl<S: super::splice::Source> super::splice::Source for Responses<S> {
    async fn next(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        loop {
            self.expect()?;
            if self.answered {
                return Ok(None);
            }
            if let Some(answer) = self.refusal() {
                return Ok(Some(answer));
            }
            let next = tokio::select! {
                r = self.inner.next() => r?,
                () = self.exchange.refused.notified() => continue,
            };
            let Some(chunk) = next else {
                // The server closed: a refused request still gets its answer
                // if every earlier one was answered whole.
                return Ok(self.refusal());
            };
            self.expect()?;
            match self.inspector.feed(&chunk) {
                Ok(out) if out.is_empty() => {}
                Ok(out) => return Ok(Some(out.into())),
                Err(v) => return Err(self.exchange.violated("the server's responses", &v)),
            }
        }
    }
}
