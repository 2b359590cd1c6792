//! Moving bytes: the splice of two byte streams with half-close and reset
//! propagated.
//!
//! A splice runs both directions at once. When one direction reaches EOF its
//! sink is closed for writing (TCP `shutdown(Write)` or QUIC `finish`) and the
//! other direction goes on: half-close propagates. When one direction fails (a
//! TCP reset, a QUIC stream reset) its sink is reset and the splice ends at
//! once, telling the caller to reset the TCP side too: resets propagate.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::node::limit::Limiter;

/// QUIC error code for a stream reset that mirrors a TCP reset.
pub const RESET_CODE: u32 = 1;
/// Read buffer per direction.
const BUF: usize = 64 * 1024;
/// Smallest room a read is given before a new buffer is taken.
const MIN_READ: usize = 8 * 1024;

/// The reading half of a relayed byte stream, chunk by chunk (zero-copy from QUIC).
pub trait Source: Send {
    /// The next chunk; `None` at the end of the stream.
    fn next(&mut self) -> impl Future<Output = std::io::Result<Option<Bytes>>> + Send;
}

/// Any byte stream read in large chunks into a reused buffer. A QUIC stream
/// read this way coalesces its frames, so the TCP side gets one write per read,
/// not one per QUIC frame; a TCP stream read this way hands QUIC its chunk
/// without another copy.
pub struct BufSource<R> {
    inner: R,
    buf: BytesMut,
}

impl<R> BufSource<R> {
    /// Wraps a reader.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
        }
    }
}

impl<R: AsyncRead + Unpin + Send> Source for BufSource<R> {
    async fn next(&mut self) -> std::io::Result<Option<Bytes>> {
        // Reuse the rest of the buffer while it has room: reserving a full
        // buffer per read would allocate one per small message.
        if self.buf.capacity() < MIN_READ {
            self.buf.reserve(BUF);
        }
        let n = self.inner.read_buf(&mut self.buf).await?;
        Ok((n > 0).then(|| self.buf.split().freeze()))
    }
}

/// One of two sources, chosen per relay (a followed stream or a plain one).
pub enum Either<A, B> {
    /// The first kind.
    A(A),
    /// The second kind.
    B(B),
}

impl<A: Source, B: Source> Source for Either<A, B> {
    async fn next(&mut self) -> std::io::Result<Option<Bytes>> {
        match self {
            Either::A(a) => a.next().await,
            Either::B(b) => b.next().await,
        }
    }
}

/// The writing half of a relayed byte stream.
pub trait Sink: Send {
    /// Writes a chunk.
    fn put(&mut self, chunk: Bytes) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Closes for writing: the peer reads EOF.
    fn end(&mut self) -> impl Future<Output = ()> + Send;
    /// Aborts: the peer sees a reset.
    fn abort(&mut self);
}

impl Sink for quinn::SendStream {
    async fn put(&mut self, chunk: Bytes) -> std::io::Result<()> {
        self.write_chunk(chunk).await.map_err(Into::into)
    }
    async fn end(&mut self) {
        let _ = self.finish();
    }
    fn abort(&mut self) {
        let _ = self.reset(quinn::VarInt::from_u32(RESET_CODE));
    }
}

impl Sink for tokio::net::tcp::WriteHalf<'_> {
    async fn put(&mut self, chunk: Bytes) -> std::io::Result<()> {
        self.write_all(&chunk).await
    }
    async fn end(&mut self) {
        let _ = self.shutdown().await;
    }
    // A TCP reset needs the whole socket: the caller does it (see `Spliced::reset`).
    fn abort(&mut self) {}
}

/// What a splice moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes from the first reader to the second sink.
    pub forward: u64,
    /// Bytes from the second reader to the first sink.
    pub backward: u64,
    /// One side was reset: reset the other TCP side too.
    pub reset: bool,
}

async fn pump<R: Source, W: Sink>(
    r: &mut R,
    w: &mut W,
    count: &AtomicU64,
    limit: Option<&Limiter>,
) -> std::io::Result<()> {
    loop {
        let Some(chunk) = r.next().await? else {
            w.end().await;
            return Ok(());
        };
        let n = chunk.len();
        if let Some(l) = limit {
            l.take(n).await;
        }
        w.put(chunk).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Splices `(r1, w1)` with `(r2, w2)`: `r1 -> w2` forward, `r2 -> w1` backward.
/// `live` counts bytes as they move (forward, backward), for metrics and audit.
pub async fn splice<R1, W1, R2, W2>(
    r1: &mut R1,
    w1: &mut W1,
    r2: &mut R2,
    w2: &mut W2,
    live: &[AtomicU64; 2],
) -> Spliced
where
    R1: Source,
    W1: Sink,
    R2: Source,
    W2: Sink,
{
    splice_limited(r1, w1, r2, w2, live, None).await
}

/// [`splice`] with an optional bandwidth cap per direction (forward, backward).
pub async fn splice_limited<R1, W1, R2, W2>(
    r1: &mut R1,
    w1: &mut W1,
    r2: &mut R2,
    w2: &mut W2,
    live: &[AtomicU64; 2],
    limits: Option<&[Limiter; 2]>,
) -> Spliced
where
    R1: Source,
    W1: Sink,
    R2: Source,
    W2: Sink,
{
    let reset = {
        let fwd = async {
            let r = pump(r1, w2, &live[0], limits.map(|l| &l[0])).await;
            if r.is_err() {
                w2.abort();
            }
            r
        };
        let bwd = async {
            let r = pump(r2, w1, &live[1], limits.map(|l| &l[1])).await;
            if r.is_err() {
                w1.abort();
            }
            r
        };
        tokio::pin!(fwd, bwd);
        tokio::select! {
            r = &mut fwd => match r {
                Ok(()) => bwd.await.is_err(),
                Err(_) => true,
            },
            r = &mut bwd => match r {
                Ok(()) => fwd.await.is_err(),
                Err(_) => true,
            },
        }
    };
    Spliced {
        forward: live[0].load(Ordering::Relaxed),
        backward: live[1].load(Ordering::Relaxed),
        reset,
    }
}

impl Spliced {
    /// Bytes moved (forward, backward) so far, from the live counters.
    pub fn moved(live: &[AtomicU64; 2]) -> (u64, u64) {
        (
            live[0].load(Ordering::Relaxed),
            live[1].load(Ordering::Relaxed),
        )
    }

    /// How a relay ended, for its audit record: `closed`, `reset`, or `cut`
    /// (stopped by reload, expiry or shutdown).
    pub fn end(done: Option<Spliced>) -> &'static str {
        match done {
            Some(s) if s.reset => "reset",
            Some(_) => "closed",
            None => "cut",
        }
    }
}
