//! A hub's connected edges: every live connection of each device (its lanes,
//! and a new one while it replaces an old one), keyed by the device id from
//! its verified certificate.
//!
//! Invariant: a connection is listed from its "Edge connected" until it
//! closes; after the device connects again its older connections are in
//! doubt (used only when there is no other) until a ping settles them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gateway_core::wire::Frame;
use tracing::info;

use super::frame::{read_frame, write_frame};

/// Connected edges by device id (several connections: lanes, and a new one
/// while it replaces an old one), and a turn counter for spreading relays.
#[derive(Default)]
pub struct Devices {
    lanes: Mutex<HashMap<String, Vec<Lane>>>,
    /// Turn counter spreading relays over a device's lanes.
    turn: AtomicUsize,
}

/// One connection of a device, and whether it is in doubt: the device has
/// connected again since, and this one has not yet answered a ping.
struct Lane {
    conn: quinn::Connection,
    doubt: bool,
    /// The serial of the certificate it presented.
    serial: String,
}

impl Devices {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Lane>>> {
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a connection of `id`. Its other connections are put in doubt
    /// (relays avoid them) and returned, to be pinged: a device that connects
    /// again may have been restarted, and the old process's connections look
    /// alive to QUIC until their idle timeout.
    pub(super) fn add(
        &self,
        id: &str,
        c: quinn::Connection,
        serial: &str,
    ) -> Vec<quinn::Connection> {
        let mut m = self.lock();
        let lanes = m.entry(id.to_owned()).or_default();
        let others = lanes
            .iter_mut()
            .map(|l| {
                l.doubt = true;
                l.conn.clone()
            })
            .collect();
        lanes.push(Lane {
            conn: c,
            doubt: false,
            serial: serial.to_owned(),
        });
        others
    }

    /// A connection in doubt answered: relays may use it again.
    pub(super) fn trust(&self, id: &str, stable_id: usize) {
        if let Some(v) = self.lock().get_mut(id) {
            for l in v.iter_mut().filter(|l| l.conn.stable_id() == stable_id) {
                l.doubt = false;
            }
        }
    }

    pub(super) fn remove(&self, id: &str, stable_id: usize) {
        let mut m = self.lock();
        if let Some(v) = m.get_mut(id) {
            v.retain(|l| l.conn.stable_id() != stable_id);
            if v.is_empty() {
                m.remove(id);
            }
        }
    }

    /// The ids of the devices connected now.
    pub fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// The certificate serials `id`'s live connections presented.
    pub fn serials(&self, id: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .get(id)
            .map(|lanes| lanes.iter().map(|l| l.serial.clone()).collect())
            .unwrap_or_default();
        v.sort();
        v.dedup();
        v
    }

    /// Closes `id`'s connections whose certificate is not one of `keep`;
    /// returns how many.
    pub fn close_except(&self, id: &str, keep: &[String], code: u32, reason: &[u8]) -> usize {
        let mut m = self.lock();
        let Some(lanes) = m.get_mut(id) else {
            return 0;
        };
        let (gone, kept): (Vec<Lane>, Vec<Lane>) =
            lanes.drain(..).partition(|l| !keep.contains(&l.serial));
        *lanes = kept;
        if lanes.is_empty() {
            m.remove(id);
        }
        for l in &gone {
            l.conn.close(quinn::VarInt::from_u32(code), reason);
        }
        gone.len()
    }

    /// Closes every connection of `id` with `code`; returns how many.
    pub fn close_all(&self, id: &str, code: u32, reason: &[u8]) -> usize {
        let lanes = self.lock().remove(id).unwrap_or_default();
        for l in &lanes {
            l.conn.close(quinn::VarInt::from_u32(code), reason);
        }
        lanes.len()
    }

    /// A live connection of `id`; an edge keeps several (lanes) to use more cores,
    /// and relays are spread over them in turn. Connections in doubt are used
    /// only when there is no other.
    pub fn get(&self, id: &str) -> Option<quinn::Connection> {
        let m = self.lock();
        let live: Vec<&Lane> = m
            .get(id)?
            .iter()
            .filter(|l| l.conn.close_reason().is_none())
            .collect();
        let trusted: Vec<&Lane> = live.iter().copied().filter(|l| !l.doubt).collect();
        let pool = if trusted.is_empty() { live } else { trusted };
        if pool.is_empty() {
            return None;
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        pool.get(turn % pool.len()).map(|l| l.conn.clone())
    }
}

/// How long a connection in doubt has to answer a ping before it is closed.
const PING_WAIT: Duration = Duration::from_secs(5);

/// Pings each of `id`'s connections in doubt: one that answers is trusted
/// again, one that does not within [`PING_WAIT`] is closed (its process is
/// gone), which ends its relays' wait at once instead of at the idle timeout.
pub(super) fn settle_doubts(devices: &Arc<Devices>, id: &str, conns: Vec<quinn::Connection>) {
    for c in conns {
        let (devices, id) = (devices.clone(), id.to_owned());
        tokio::spawn(async move {
            let ping = async {
                let Ok((mut send, mut recv)) = c.open_bi().await else {
                    return;
                };
                let _ = write_frame(&mut send, &Frame::Ping).await;
                // Any reaction proves a live process: the Ping back, or the
                // stream ended unanswered (an edge older than Ping cannot
                // read it). Only silence means the process is gone.
                let _ = read_frame(&mut recv).await;
            };
            let answered = tokio::time::timeout(PING_WAIT, ping).await.is_ok();
            if answered && c.close_reason().is_none() {
                devices.trust(&id, c.stable_id());
            } else {
                info!(device = %id, "A connection from before the device reconnected does not answer; closing it");
                c.close(
                    quinn::VarInt::from_u32(0),
                    b"no answer after the device reconnected",
                );
            }
        });
    }
}
