//! Frames on QUIC streams (`gateway_core::wire`): one length-prefixed frame at
//! a time, every wait for the peer's opening frames bounded by
//! [`HANDSHAKE_TIMEOUT`]; and channel batches, which come when they come.

use std::time::Duration;

use gateway_core::wire::{Batch, DecodeError, Frame, RefuseCode, SyncRecord};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Time allowed for the opening frames of a stream.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended early.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a frame.
    #[error("{0}")]
    Decode(#[from] DecodeError),
    /// The peer took too long.
    #[error("timed out waiting for the peer")]
    Timeout,
}

/// Reads one frame.
///
/// # Errors
/// When the stream fails, ends, times out or carries a malformed frame.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, FrameError> {
    let go = async {
        let mut prefix = [0u8; 4];
        r.read_exact(&mut prefix).await?;
        let n = Frame::body_len(prefix)?;
        let mut body = vec![0u8; n];
        r.read_exact(&mut body).await?;
        Ok(Frame::decode_body(&body)?)
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, go)
        .await
        .map_err(|_| FrameError::Timeout)?
}

/// Writes one frame.
///
/// # Errors
/// When the stream fails.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> std::io::Result<()> {
    w.write_all(&f.to_bytes()).await
}

/// Refuses on `send`: a `Refuse` frame, then the end of the stream.
pub async fn refuse(
    send: &mut quinn::SendStream,
    code: gateway_core::wire::RefuseCode,
    rule: &str,
    message: String,
) {
    let rule = rule.to_owned();
    let _ = write_frame(
        send,
        &Frame::Refuse {
            code,
            rule,
            message,
        },
    )
    .await;
    let _ = send.finish();
}

/// Answers a stream whose first frame this side does not serve: a protocol
/// refusal naming it.
pub async fn refuse_unexpected(send: &mut quinn::SendStream, frame: &Frame) {
    let _ = write_frame(
        send,
        &Frame::Refuse {
            code: RefuseCode::Protocol,
            rule: String::new(),
            message: format!("unexpected frame {frame:?}"),
        },
    )
    .await;
}

/// One frame, waiting as long as it takes (acks come when batches commit).
pub async fn read_untimed<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, String> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).await.map_err(|e| e.to_string())?;
    let n = Frame::body_len(prefix).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    Frame::decode_body(&body).map_err(|e| e.to_string())
}

/// The next batch, or `None` at a clean end of the stream.
pub async fn read_batch(recv: &mut quinn::RecvStream) -> Result<Option<Vec<SyncRecord>>, String> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let n = Batch::body_len(prefix).map_err(|e: DecodeError| e.to_string())?;
    let mut body = vec![0u8; n];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Batch::decode_body(&body)
        .map(Some)
        .map_err(|e| e.to_string())
}
