//! An edge's tunnels to its hubs: one slot per (hub, lane), filled while that
//! tunnel is up. Relays and channel syncs take a live tunnel of the first hub
//! that has one (the uplink lists hubs in order of preference), lanes in turn.
//!
//! Invariant: slot `i * lanes + lane` belongs to hub `i`; a slot holds a
//! connection only between its tunnel's "up" and "down".

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use gateway_core::units::HostPort;
use tokio::sync::Notify;

/// Tunnels kept to each hub: one per core, at most 4.
pub fn lanes() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// One tunnel's place: which hub it goes to, and its connection while up.
struct Slot {
    hub: usize,
    conn: Option<quinn::Connection>,
}

impl Slot {
    fn live(&self) -> Option<&quinn::Connection> {
        self.conn.as_ref().filter(|c| c.close_reason().is_none())
    }
}

fn slots(hubs: usize, lanes: usize) -> Vec<Slot> {
    (0..hubs * lanes)
        .map(|i| Slot {
            hub: i / lanes,
            conn: None,
        })
        .collect()
}

/// The tunnels to the hubs, in order of preference.
///
/// Each hub gets several connections (lanes), so relays spread over more than
/// one QUIC connection driver and more than one core.
#[derive(Default)]
pub struct Hubs {
    slots: Mutex<Vec<Slot>>,
    /// Turn counter spreading relays over a hub's lanes.
    turn: AtomicUsize,
    /// Woken when a tunnel comes up.
    up: Notify,
}

impl Hubs {
    /// `lanes` slots per hub; slot `i * lanes + lane` belongs to hub `i`.
    pub fn new(hubs: &[HostPort], lanes: usize) -> Arc<Self> {
        Arc::new(Hubs {
            slots: Mutex::new(slots(hubs.len(), lanes)),
            turn: AtomicUsize::new(0),
            up: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Empties the slots and sizes them for `hubs` hubs of `lanes` lanes (a new
    /// uplink); the old tunnel tasks have been told to stop.
    pub fn reset(&self, hubs: usize, lanes: usize) {
        *self.lock() = slots(hubs, lanes);
    }

    /// Fills (or empties) slot `i`.
    pub fn set(&self, i: usize, c: Option<quinn::Connection>) {
        let up = c.is_some();
        if let Some(slot) = self.lock().get_mut(i) {
            slot.conn = c;
        }
        if up {
            self.up.notify_waiters();
        }
    }

    /// A live tunnel of the first hub that has one, lanes taken in turn.
    pub fn any(&self) -> Option<quinn::Connection> {
        let v = self.lock();
        let hub = v.iter().find(|s| s.live().is_some())?.hub;
        let lanes: Vec<&quinn::Connection> = v
            .iter()
            .filter(|s| s.hub == hub)
            .filter_map(Slot::live)
            .collect();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        lanes.get(turn % lanes.len()).map(|c| (*c).clone())
    }

    /// Completes when a tunnel comes up after this call.
    pub fn came_up(&self) -> tokio::sync::futures::Notified<'_> {
        self.up.notified()
    }

    /// Whether hub `i`'s tunnels (any lane) are up.
    pub fn up(&self, i: usize) -> bool {
        self.lock().iter().any(|s| s.hub == i && s.live().is_some())
    }

    /// Whether any tunnel is up.
    pub fn any_up(&self) -> bool {
        self.any().is_some()
    }
}
