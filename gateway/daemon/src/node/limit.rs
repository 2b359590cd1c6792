//! Bandwidth caps shared by every relay of a service (and by a channel's
//! sync): a token bucket from `gateway_core::rate` on the monotonic clock.

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
