//! A token bucket for per-service bandwidth caps. Pure: time comes in as a
//! parameter (nanoseconds from any fixed origin).

/// Bytes per second and a burst allowance.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last_ns: u64,
}

impl TokenBucket {
    /// A full bucket refilling at `bytes_per_sec`, holding up to 100 ms of traffic
    /// (at least 64 KiB, so one copy buffer always fits).
    pub fn new(bytes_per_sec: u64, now_ns: u64) -> Self {
        let rate = bytes_per_sec.max(1) as f64;
        let burst = (rate / 10.0).max(65_536.0);
        Self {
            rate,
            burst,
            tokens: burst,
            last_ns: now_ns,
        }
    }

    /// Takes `n` bytes at `now_ns`; returns how long the caller must wait before
    /// sending them (zero when the bucket had enough). The debt is kept, so
    /// concurrent users share the rate.
    pub fn take(&mut self, n: u64, now_ns: u64) -> std::time::Duration {
        let elapsed = now_ns.saturating_sub(self.last_ns) as f64 / 1e9;
        self.last_ns = self.last_ns.max(now_ns);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_run_rate_is_the_cap() {
        // 1 MB/s; send 64 KiB chunks as fast as allowed for 10 virtual seconds.
        let mut b = TokenBucket::new(1_000_000, 0);
        let mut now = 0u64;
        let mut sent = 0u64;
        while now < 10_000_000_000 {
            let wait = b.take(65_536, now);
            now += wait.as_nanos() as u64;
            sent += 65_536;
        }
        let rate = sent as f64 / 10.0;
        assert!(
            (rate - 1_000_000.0).abs() / 1_000_000.0 < 0.02,
            "rate {rate}"
        );
    }

    #[test]
    fn idle_time_refills_only_up_to_the_burst() {
        let mut b = TokenBucket::new(1_000_000, 0);
        assert_eq!(b.take(100_000, 0), std::time::Duration::ZERO);
        // After an hour idle, the burst (100 ms) is free, the rest waits.
        let hour = 3_600_000_000_000;
        assert_eq!(b.take(100_000, hour), std::time::Duration::ZERO);
        assert!(b.take(100_000, hour) >= std::time::Duration::from_millis(99));
    }
}
