//! Rule R5.app-protocol on a running relay: at boundary level 3 and up, the
//! first bytes a client sends must be the service's declared application
//! protocol (`gateway_core::sniff` decides; this reads them off the stream,
//! bounded in size and time).

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
