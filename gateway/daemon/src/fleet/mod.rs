//! Central management (DESIGN.md "Control"): enrollment, certificate renewal,
//! revocation, desired-state config, heartbeats, remote commands and audit
//! collection, over each tunnel's control stream; and the operators' HTTPS API
//! that `gatewayctl` talks to.
//!
//! - [`hub`]: the hub's side: the registry, enrollment, control sessions.
//! - [`edge`]: the edge's side: its control session (heartbeats, commands,
//!   renewal, audit shipping).
//! - [`enroll`]: the edge's enrollment with a token.
//! - [`pushed_config`]: a pushed config on the edge: kept, tried, applied or
//!   reverted.
//! - [`ops_api`]: the operators' API on the hub (`[hub].ops`); each request's
//!   role is checked there.
//! - [`ops_client`]: `gatewayctl`'s client of that API.
//! - [`logring`]: recent log lines and the last error, for heartbeats and diagnostics.
//! - [`rollout`]: config templates rolled out in waves: the checks before a
//!   rollout starts and the controller every hub runs.
//! - [`rollout_api`]: the operators' routes of templates, variables and
//!   rollouts.
//! - [`firmware`]: firmware parts over the tunnel: the hub sends them from
//!   its store, paced; the edge's admin listener fetches them for its updater.
//! - [`firmware_api`]: the operators' routes of the hub's firmware store
//!   (uploads checked against `[hub].firmware_keys`).
//! - [`firmware_offers`]: firmware rollouts at the hub's end: offers with
//!   heartbeats, acknowledgements for the box's health gate, each step
//!   audited.
//! - [`firmware_box`]: firmware at the box's end: offers handed to the
//!   updater, its status read for heartbeats, the hub's acknowledgements
//!   kept for its health gate.
//!
//! The pure parts (messages, roles, the policy-section diff, renewal timing, the
//! audit export check) are in `gateway_core::fleet`; the registry is
//! the `gateway_store::registry::Registry` trait.

pub mod edge;
pub mod enroll;
pub mod firmware;
pub mod firmware_api;
pub mod firmware_box;
pub mod firmware_offers;
pub mod hub;
pub mod logring;
pub mod ops_api;
pub mod ops_client;
pub mod pushed_config;
pub mod rollout;
pub mod rollout_api;

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
    read_msg_max(r, fleet::MAX_MESSAGE).await
}

/// Reads one length-prefixed JSON message of at most `max` bytes: a larger
/// one is refused from its prefix, before a byte of it is read.
///
/// # Errors
/// When the stream ends or the message is malformed or too large.
pub async fn read_msg_max<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<T, MessageError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).await?;
    let n = fleet::body_len(prefix)?;
    if n > max {
        return Err(MessageError::Decode(DecodeError::TooLarge(n)));
    }
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

/// A fresh token or credential of `kind` for `owner`: 32 random bytes.
pub fn new_secret(kind: &'static str, owner: String) -> fleet::Secret {
    fleet::Secret {
        kind,
        owner,
        secret: gateway_core::hex::encode(&rand::random::<[u8; 32]>()),
    }
}

/// Checks an export's signature: the hub certificate in its header chains to
/// the CA in `ca_pem` (at the time of the export) and signed the header.
/// Returns the signing hub's id.
///
/// # Errors
/// What does not hold.
pub fn verify_export_signature(
    header: &fleet::ExportHeader,
    ca_pem: &[u8],
) -> Result<String, String> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, UnixTime};
    let (Some(signer), Some(cert_pem), Some(sig)) =
        (&header.signed_by, &header.hub_cert_pem, &header.signature)
    else {
        return Err("the export is not signed".into());
    };
    // An ECDSA signature is at most 72 bytes; the header is a peer's text.
    if sig.len() > 256 {
        return Err("the signature is too long".into());
    }
    let sig = gateway_core::hex::decode(sig).ok_or("the signature is not hex")?;
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| format!("the hub certificate in the header: {e}"))?;
    let anchors: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(ca_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the CA file: {e}"))?;
    let anchors: Vec<_> = anchors
        .iter()
        .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
        .collect();
    let ee =
        webpki::EndEntityCert::try_from(&cert).map_err(|e| format!("the hub certificate: {e}"))?;
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_millis(
        u64::try_from(header.exported_ms).unwrap_or(0),
    ));
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &[],
        at,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map_err(|e| format!("the hub certificate does not chain to the CA: {e}"))?;
    if !ee.valid_dns_names().any(|n| n == signer) {
        return Err(format!("the certificate in the header is not {signer}'s"));
    }
    ee.verify_signature(
        webpki::ring::ECDSA_P256_SHA256,
        &fleet::signed_message(header),
        &sig,
    )
    .map_err(|_| {
        "the signature does not match the header: the export was changed after the hub signed it"
            .to_owned()
    })?;
    Ok(signer.clone())
}
