//! Reconnect backoff: capped, jittered exponential. Pure: the caller supplies the
//! randomness, so tests are deterministic.

use std::time::Duration;

/// First delay.
pub const BASE: Duration = Duration::from_millis(100);
/// Largest delay: a hub that comes back is reached again within this (plus the handshake).
pub const CAP: Duration = Duration::from_secs(2);

/// A hub that refused a handshake for load (a reconnect storm after its
/// restart) is tried again between these two, uniformly: thousands of edges
/// refused at once come back spread over eight seconds instead of all within
/// [`CAP`].
pub const BUSY_MIN: Duration = Duration::from_secs(2);
/// See [`BUSY_MIN`].
pub const BUSY_MAX: Duration = Duration::from_secs(10);

/// The delay after a refusal for load; `jitter` in `[0, 1)`.
pub fn busy_delay(jitter: f64) -> Duration {
    BUSY_MIN + (BUSY_MAX - BUSY_MIN).mul_f64(jitter.clamp(0.0, 1.0))
}

/// Backoff state for one hub (or one retried job: [`Backoff::between`]).
#[derive(Debug, Clone)]
pub struct Backoff {
    failures: u32,
    base: Duration,
    cap: Duration,
}

impl Default for Backoff {
    /// From [`BASE`] to [`CAP`]: reconnecting to a hub.
    fn default() -> Self {
        Backoff::between(BASE, CAP)
    }
}

impl Backoff {
    /// Doubling from `base` up to `cap` (a firmware fetch retried over a
    /// link that drops: 1 s to 30 s).
    pub fn between(base: Duration, cap: Duration) -> Self {
        Backoff {
            failures: 0,
            base,
            cap: cap.max(base),
        }
    }

    /// The delay before the next attempt, after one more failure. `jitter` in
    /// `[0, 1)` spreads the delay over its upper half ("equal jitter").
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.failures.min(16));
        self.failures = self.failures.saturating_add(1);
        let d = exp.min(self.cap);
        d / 2 + d.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
    }

    /// A connection succeeded: start again from [`BASE`].
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps_with_jitter_inside_bounds() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay(0.999)).collect();
        assert!(delays[0] < Duration::from_millis(101));
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert!(delays.iter().all(|d| *d <= CAP));
        let mut b = Backoff::default();
        for _ in 0..20 {
            let d = b.next_delay(0.0);
            assert!(d >= BASE / 2 && d <= CAP / 2 + Duration::from_millis(1));
        }
        b.reset();
        assert_eq!(b.failures(), 0);
        assert!(b.next_delay(0.0) <= BASE);
    }

    #[test]
    fn a_job_backs_off_between_its_own_bounds() {
        let mut b = Backoff::between(Duration::from_secs(1), Duration::from_secs(30));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay(0.999)).collect();
        assert!(d[0] >= Duration::from_millis(500) && d[0] < Duration::from_secs(1));
        assert!(d[1] > Duration::from_secs(1) && d[1] < Duration::from_secs(2));
        assert!(d.iter().all(|d| *d < Duration::from_secs(30)));
        assert!(d[7] > Duration::from_secs(29));
        b.reset();
        assert!(b.next_delay(0.0) == Duration::from_millis(500));
    }

    #[test]
    fn a_busy_hub_is_retried_spread_over_its_window() {
        assert_eq!(busy_delay(0.0), BUSY_MIN);
        assert!(busy_delay(0.999) < BUSY_MAX);
        assert!(busy_delay(0.5) > BUSY_MIN + Duration::from_secs(3));
    }
}
