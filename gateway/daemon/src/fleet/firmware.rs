//! Firmware parts over the tunnel: a box's updater asks gatewayd's admin
//! listener for a part (`GET /firmware/VERSION/PART`), gatewayd asks a hub
//! on a stream of its own ([`Frame::FirmwareGet`]), and the hub sends it
//! from its store, paced (`[hub] firmware_rate` for every box together,
//! `firmware_rate_per_box` for one). Nothing here checks a part against the
//! manifest: the updater does, before it writes a byte of it, and the
//! manifest's signature with the keys its image trusts.
//!
//! Parts: `manifest`, `signature`, `parts` (`{"linux": N, "initrd": N}`, how
//! many parts the kernel and initrd have), `root/000012`, `linux/000000`,
//! `initrd/000003`. Only versions whose upload is complete are served.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use gateway_core::firmware::CHUNK_BYTES;
use gateway_core::rate::TokenBucket;
use gateway_core::wire::{Frame, RefuseCode};
use tokio::io::AsyncReadExt as _;
use tracing::debug;

use super::hub::Fleet;
use crate::tunnel::frame::{read_frame, write_frame};
use crate::tunnel::hubs::Hubs;

/// Parts a hub sends at once, to every box together.
pub const MAX_STREAMS: usize = 64;
/// Parts one box may fetch at once.
pub const MAX_STREAMS_PER_BOX: usize = 2;
/// How long the edge waits for a part from the hub.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Boxes whose pacing a hub keeps (those idle longest are forgotten first).
const MAX_PACED_BOXES: usize = 10_000;

/// Whether `part` names a part: `manifest`, `signature`, `parts`, or
/// `root|linux|initrd/` and six digits.
pub fn part_ok(part: &str) -> bool {
    if matches!(part, "manifest" | "signature" | "parts") {
        return true;
    }
    part.split_once('/').is_some_and(|(file, n)| {
        matches!(file, "root" | "linux" | "initrd")
            && n.len() == 6
            && n.bytes().all(|b| b.is_ascii_digit())
    })
}

/// Versions this hub has seen complete in its store, with their kernel's
/// and initrd's part counts: a part request then reads only the part, not
/// the version's row and manifest again. A complete version stays complete
/// (versions are never removed or changed), so nothing here goes stale.
#[derive(Default)]
pub struct Complete(Mutex<HashMap<String, [u64; 2]>>);

/// Complete versions a hub remembers (any further are read from the store
/// each time).
const MAX_COMPLETE: usize = 256;

impl Complete {
    /// `version`'s boot part counts if it is complete: remembered, or read
    /// from the store once.
    async fn get(&self, fleet: &Fleet, version: &str) -> Result<Option<[u64; 2]>, String> {
        if let Some(p) = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(version)
        {
            return Ok(Some(*p));
        }
        match fleet.registry().firmware(version.to_owned()).await {
            Ok(Some(f)) if f.row.complete => {
                let mut known = self.0.lock().unwrap_or_else(PoisonError::into_inner);
                if known.len() < MAX_COMPLETE {
                    known.insert(version.to_owned(), f.row.boot_parts);
                }
                Ok(Some(f.row.boot_parts))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The hub's pacing of firmware parts: a bucket for every box together,
/// one per box, and the streams open.
pub struct Pacer {
    global: Mutex<TokenBucket>,
    per_box_rate: u64,
    boxes: Mutex<HashMap<String, (TokenBucket, usize, Instant)>>,
    streams: Arc<tokio::sync::Semaphore>,
    origin: Instant,
}

/// A part being sent: holds its stream slots until dropped.
pub struct Sending<'a> {
    pacer: &'a Pacer,
    device: String,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        let mut boxes = self
            .pacer
            .boxes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = boxes.get_mut(&self.device) {
            b.1 = b.1.saturating_sub(1);
        }
    }
}

impl Pacer {
    /// Pacing at `rate` bytes per second in all, `per_box` for one box.
    pub fn new(rate: u64, per_box: u64) -> Self {
        Pacer {
            global: Mutex::new(TokenBucket::new(rate, 0)),
            per_box_rate: per_box,
            boxes: Mutex::default(),
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
            origin: Instant::now(),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A stream slot for `device`, or why not (too many at once).
    ///
    /// # Errors
    /// The refusal's text.
    pub fn start(&self, device: &str) -> Result<Sending<'_>, String> {
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            format!("the hub is sending {MAX_STREAMS} firmware parts already; try again")
        })?;
        let mut boxes = self.boxes.lock().unwrap_or_else(PoisonError::into_inner);
        if boxes.len() >= MAX_PACED_BOXES && !boxes.contains_key(device) {
            let oldest = boxes
                .iter()
                .filter(|(_, b)| b.1 == 0)
                .min_by_key(|(_, b)| b.2)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    boxes.remove(&k);
                }
                None => {
                    return Err("the hub is sending firmware to too many boxes; try again".into());
                }
            }
        }
        let now = self.now_ns();
        let b = boxes
            .entry(device.to_owned())
            .or_insert_with(|| (TokenBucket::new(self.per_box_rate, now), 0, Instant::now()));
        if b.1 >= MAX_STREAMS_PER_BOX {
            return Err(format!(
                "this box fetches {MAX_STREAMS_PER_BOX} firmware parts already; one at a time is enough"
            ));
        }
        b.1 += 1;
        b.2 = Instant::now();
        Ok(Sending {
            pacer: self,
            device: device.to_owned(),
            _permit: permit,
        })
    }

    /// How long to wait before sending `n` bytes to `device`.
    pub fn delay(&self, device: &str, n: u64) -> Duration {
        let now = self.now_ns();
        let global = self
            .global
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(n, now);
        let mut boxes = self.boxes.lock().unwrap_or_else(PoisonError::into_inner);
        let own = boxes
            .get_mut(device)
            .map_or(Duration::ZERO, |b| b.0.take(n, now));
        global.max(own)
    }
}

async fn refuse(send: &mut quinn::SendStream, code: RefuseCode, message: String) {
    let _ = write_frame(
        send,
        &Frame::Refuse {
            code,
            rule: String::new(),
            message,
        },
    )
    .await;
    let _ = send.finish();
}

/// The hub's side: sends `part` of `version` to `device` on `send`.
pub async fn serve(
    fleet: &Fleet,
    device: &str,
    (version, part): (String, String),
    mut send: quinn::SendStream,
) {
    if gateway_core::firmware::version_numbers(&version).is_none() || !part_ok(&part) {
        let message = format!("no firmware part {version:?} {part:?}: not a version and part");
        return refuse(&mut send, RefuseCode::Protocol, message).await;
    }
    let pacer = fleet.firmware_pacer();
    let sending = match pacer.start(device) {
        Ok(s) => s,
        Err(message) => return refuse(&mut send, RefuseCode::Limit, message).await,
    };
    let boot_parts = match fleet.firmware_complete().get(fleet, &version).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            let message = format!("no complete firmware {version} on this hub");
            return refuse(&mut send, RefuseCode::NoRoute, message).await;
        }
        Err(e) => {
            let message = format!("the hub's store: {e}");
            return refuse(&mut send, RefuseCode::Unreachable, message).await;
        }
    };
    let bytes = match part.as_str() {
        "manifest" | "signature" => match fleet.registry().firmware(version.clone()).await {
            Ok(Some(f)) if part == "manifest" => f.manifest.into_bytes(),
            Ok(Some(f)) => f.signature.into_bytes(),
            Ok(None) => {
                let message = format!("no complete firmware {version} on this hub");
                return refuse(&mut send, RefuseCode::NoRoute, message).await;
            }
            Err(e) => {
                let message = format!("the hub's store: {e}");
                return refuse(&mut send, RefuseCode::Unreachable, message).await;
            }
        },
        "parts" => serde_json::json!({ "linux": boot_parts[0], "initrd": boot_parts[1] })
            .to_string()
            .into_bytes(),
        _ => match fleet
            .registry()
            .firmware_part(version.clone(), part.clone())
            .await
        {
            Ok(Some(b)) => b,
            Ok(None) => {
                let message = format!("firmware {version} has no part {part}");
                return refuse(&mut send, RefuseCode::NoRoute, message).await;
            }
            Err(e) => {
                let message = format!("the hub's store: {e}");
                return refuse(&mut send, RefuseCode::Unreachable, message).await;
            }
        },
    };
    let wait = pacer.delay(device, bytes.len() as u64);
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    if write_frame(&mut send, &Frame::Opened).await.is_ok() && send.write_all(&bytes).await.is_ok()
    {
        let _ = send.finish();
        debug!(%version, %part, bytes = bytes.len(), "Firmware part sent");
    }
    drop(sending);
}

/// What went wrong fetching a part, as the updater is told.
fn answer(status: StatusCode, message: String) -> Response {
    (status, format!("{message}\n")).into_response()
}

/// The edge's side: the admin listener's route for the updater.
pub fn edge_routes(hubs: Arc<Hubs>) -> Router {
    Router::new()
        .route("/firmware/{version}/{*part}", get(fetch))
        .with_state(hubs)
}

async fn fetch(
    State(hubs): State<Arc<Hubs>>,
    Path((version, part)): Path<(String, String)>,
) -> Response {
    if gateway_core::firmware::version_numbers(&version).is_none() || !part_ok(&part) {
        return answer(
            StatusCode::BAD_REQUEST,
            "GET /firmware/VERSION/PART: PART is manifest, signature, parts or root|linux|initrd/NNNNNN".into(),
        );
    }
    let Some(conn) = hubs.any() else {
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "no hub tunnel is up".into(),
        );
    };
    let go = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(&mut send, &Frame::FirmwareGet { version, part })
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        match read_frame(&mut recv).await.map_err(|e| e.to_string())? {
            Frame::Opened => {
                let mut bytes = Vec::new();
                (&mut recv)
                    .take(CHUNK_BYTES + 1)
                    .read_to_end(&mut bytes)
                    .await
                    .map_err(|e| e.to_string())?;
                if bytes.len() as u64 > CHUNK_BYTES {
                    return Err(format!("the hub sent more than {CHUNK_BYTES} bytes"));
                }
                Ok(Ok(bytes))
            }
            Frame::Refuse { code, message, .. } => Ok(Err((code, message))),
            other => Err(format!("the hub answered {other:?}")),
        }
    };
    match tokio::time::timeout(FETCH_TIMEOUT, go).await {
        Ok(Ok(Ok(bytes))) => (StatusCode::OK, bytes).into_response(),
        Ok(Ok(Err((RefuseCode::NoRoute, m)))) => answer(StatusCode::NOT_FOUND, m),
        Ok(Ok(Err((RefuseCode::Limit, m)))) => answer(StatusCode::TOO_MANY_REQUESTS, m),
        Ok(Ok(Err((_, m)))) => answer(StatusCode::BAD_GATEWAY, format!("the hub refused: {m}")),
        Ok(Err(e)) => answer(StatusCode::BAD_GATEWAY, format!("the hub tunnel: {e}")),
        Err(_) => answer(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no part from the hub within {} s", FETCH_TIMEOUT.as_secs()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_named_one_way() {
        for ok in [
            "manifest",
            "signature",
            "parts",
            "root/000012",
            "initrd/000000",
        ] {
            assert!(part_ok(ok), "{ok}");
        }
        for bad in [
            "",
            "root/12",
            "root/00001x",
            "boot/000000",
            "../manifest",
            "root/0000001",
        ] {
            assert!(!part_ok(bad), "{bad}");
        }
    }

    #[test]
    fn one_box_fetches_at_most_two_parts_at_once() {
        let p = Pacer::new(1_000_000, 1_000_000);
        let a = p.start("edge-a").expect("first");
        let _b = p.start("edge-a").expect("second");
        assert!(p.start("edge-a").is_err());
        assert!(p.start("edge-b").is_ok(), "another box is not held up");
        drop(a);
        assert!(
            p.start("edge-a").is_ok(),
            "a slot comes back when a part is sent"
        );
    }

    #[test]
    fn a_box_is_paced_at_its_own_rate() {
        let p = Pacer::new(100_000_000, 1_000_000);
        let _s = p.start("edge-a").expect("start");
        // The burst (100 ms of the rate, at least 64 KiB) goes at once; a
        // chunk past it waits about a second at 1 MB/s.
        assert_eq!(p.delay("edge-a", 65_536), Duration::ZERO);
        let wait = p.delay("edge-a", 1_000_000);
        assert!(
            wait > Duration::from_millis(900) && wait < Duration::from_millis(1100),
            "{wait:?}"
        );
    }
}
