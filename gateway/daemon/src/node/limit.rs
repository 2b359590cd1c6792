//! Bandwidth caps shared by every relay of a service (and by a channel's
//! sync): a token bucket from `gateway_core::rate` on the monotonic clock;
//! and caps on connections open at once, in all and per source address
//! ([`Slots`]), for listeners.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Connections open at once on one listener, in all and per source address.
#[derive(Clone)]
pub struct Slots {
    counts: Arc<Mutex<Counts>>,
    max: usize,
    per_source: usize,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// One connection's place; given back when dropped.
pub struct Slot {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

impl Slots {
    /// At most `max` at once, `per_source` of them from one address.
    pub fn new(max: usize, per_source: usize) -> Self {
        Slots {
            counts: Arc::default(),
            max,
            per_source,
        }
    }

    /// A place for a connection from `ip`.
    ///
    /// # Errors
    /// Which cap it is over, for the refusal.
    pub fn take(&self, ip: IpAddr) -> Result<Slot, String> {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= self.max {
            return Err(format!(
                "{} connections open, the most this listener takes",
                self.max
            ));
        }
        let mine = c.by_source.get(&ip).copied().unwrap_or(0);
        if mine >= self.per_source {
            return Err(format!(
                "{} connections open from this address, the most one address may have",
                self.per_source
            ));
        }
        c.total += 1;
        *c.by_source.entry(ip).or_insert(0) += 1;
        Ok(Slot {
            counts: self.counts.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_source.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.by_source.remove(&self.ip);
            }
        }
    }
}

/// A shared bandwidth cap (one per service and direction).
pub struct Limiter {
    bucket: std::sync::Mutex<gateway_core::rate::TokenBucket>,
    origin: std::time::Instant,
    /// The cap, bytes per second.
    pub rate: u64,
}

impl Limiter {
    /// A cap of `rate` bytes per second.
    pub fn new(rate: u64) -> Self {
        Self {
            bucket: std::sync::Mutex::new(gateway_core::rate::TokenBucket::new(rate, 0)),
            origin: std::time::Instant::now(),
            rate,
        }
    }

    /// Waits until `n` bytes fit the cap.
    pub async fn take(&self, n: usize) {
        let now = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let wait = self
            .bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(n as u64, now);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}
