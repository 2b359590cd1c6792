//! Central management (DESIGN.md "Control"): enrollment, certificate renewal,
//! revocation, desired-state config, heartbeats, remote commands and audit
//! collection, over each tunnel's control stream; and the operators' HTTPS API
//! that `gatewayctl` talks to.
//!
//! - [`hub`]: the hub's side: the registry, enrollment, control sessions.
//! - [`edge`]: the edge's side: its control session, enrollment, managed config.
//! - [`ops`]: the operators' API on the hub (`[hub].ops`), with roles.
//! - [`client`]: `gatewayctl`'s client of that API.
//! - [`logring`]: recent log lines and the last error, for heartbeats and diagnostics.
//!
//! The pure parts (messages, roles, the policy-section diff, renewal timing, the
//! audit export check) are in `gateway_core::fleet`; the registry is
//! `gateway_store::fleet`.

pub mod client;
pub mod edge;
pub mod hub;
pub mod logring;
pub mod ops;

use gateway_core::fleet::{self, DecodeError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reading a message failed.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// The stream failed or ended.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a message.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Reads one length-prefixed JSON message.
///
/// # Errors
/// When the stream ends or the message is malformed or too large.
pub async fn read_msg<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<T, MessageError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).await?;
    let n = fleet::body_len(prefix)?;
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).await?;
    Ok(fleet::decode(&body)?)
}

/// Writes one message.
///
/// # Errors
/// When the stream fails.
pub async fn write_msg<T: Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    m: &T,
) -> std::io::Result<()> {
    w.write_all(&fleet::encode(m)).await
}

/// Unix ms.
pub fn now_ms() -> i64 {
    crate::audit_sink::now_ms()
}

/// A fresh token or credential of `kind` for `owner`: 32 random bytes.
pub fn new_secret(kind: &'static str, owner: String) -> fleet::Secret {
    fleet::Secret {
        kind,
        owner,
        secret: rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    }
}
