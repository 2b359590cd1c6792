//! Leaky buckets, the shape of CrowdSec's scenarios (`capacity`,
//! `leakspeed`; fail2ban's `maxretry` within `findtime` is close to it): each
//! event pours one in, they leak out evenly, and a bucket that reaches its
//! capacity overflows (the detector trips). Pure: time comes in as
//! milliseconds.

use std::collections::VecDeque;

/// How a bucket fills and empties: `capacity` events leak out evenly over
/// `window_ms` (one every `window_ms / capacity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Events that make it overflow.
    pub capacity: u32,
    /// The time a full bucket takes to empty.
    pub window_ms: i64,
}

impl Shape {
    /// `capacity` events within `window_ms`.
    pub fn per(capacity: u32, window_ms: i64) -> Self {
        Self {
            capacity: capacity.max(1),
            window_ms: window_ms.max(1),
        }
    }

    /// One event leaks out every this many milliseconds (at least one).
    pub fn leak_ms(&self) -> i64 {
        (self.window_ms / i64::from(self.capacity.max(1))).max(1)
    }
}

/// A bucket that counts events. Kept exactly: each event pours in
/// `window_ms` units and each millisecond lets out `capacity` units, so rates
/// above one event a millisecond leak as smoothly as slow ones.
#[derive(Debug, Clone, Default)]
pub struct Leaky {
    fill: i128,
    /// When the last leak was accounted.
    since_ms: i64,
}

impl Leaky {
    /// Leaks what time let out since the last call.
    fn leak(&mut self, shape: Shape, now_ms: i64) {
        if now_ms > self.since_ms {
            let out = i128::from(now_ms - self.since_ms) * i128::from(shape.capacity);
            self.fill = (self.fill - out).max(0);
        }
        self.since_ms = self.since_ms.max(now_ms);
    }

    /// Pours one event in; the level after it, in events (rounded up): the
    /// detector trips when it reaches the capacity.
    pub fn pour(&mut self, shape: Shape, now_ms: i64) -> u32 {
        self.leak(shape, now_ms);
        let w = i128::from(shape.window_ms.max(1));
        self.fill = (self.fill + w).min(w * i128::from(u32::MAX));
        u32::try_from((self.fill + w - 1) / w).unwrap_or(u32::MAX)
    }

    /// Whether it has emptied by `now_ms` (it may be forgotten).
    pub fn is_empty_at(&self, shape: Shape, now_ms: i64) -> bool {
        let mut b = self.clone();
        b.leak(shape, now_ms);
        b.fill == 0
    }

    /// Empties it (after it overflowed and the detector acted).
    pub fn reset(&mut self, now_ms: i64) {
        self.fill = 0;
        self.since_ms = now_ms;
    }
}

/// A bucket that counts distinct things (ports, services): the same one
/// again adds nothing; the oldest is forgotten every `leak_ms`. Holds at most
/// its capacity.
#[derive(Debug, Clone, Default)]
pub struct Distinct {
    seen: VecDeque<u64>,
    since_ms: i64,
}

impl Distinct {
    fn leak(&mut self, shape: Shape, now_ms: i64) {
        if self.seen.is_empty() || now_ms < self.since_ms {
            self.since_ms = now_ms;
            return;
        }
        let gone =
            usize::try_from((now_ms - self.since_ms) / shape.leak_ms()).unwrap_or(usize::MAX);
        let n = gone.min(self.seen.len());
        self.seen.drain(..n);
        self.since_ms = if self.seen.is_empty() {
            now_ms
        } else {
            self.since_ms + i64::try_from(gone).unwrap_or(i64::MAX / 2) * shape.leak_ms()
        };
    }

    /// Pours `item` in; how many distinct items it holds after, and whether
    /// `item` was new to it.
    pub fn pour(&mut self, shape: Shape, item: u64, now_ms: i64) -> (u32, bool) {
        self.leak(shape, now_ms);
        let new = !self.seen.contains(&item);
        if new {
            if self.seen.len() >= shape.capacity as usize {
                self.seen.pop_front();
            }
            self.seen.push_back(item);
        }
        (u32::try_from(self.seen.len()).unwrap_or(u32::MAX), new)
    }

    /// Whether it has emptied by `now_ms`.
    pub fn is_empty_at(&self, shape: Shape, now_ms: i64) -> bool {
        let mut b = self.clone();
        b.leak(shape, now_ms);
        b.seen.is_empty()
    }

    /// Empties it.
    pub fn reset(&mut self, now_ms: i64) {
        self.seen.clear();
        self.since_ms = now_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ten_in_a_few_seconds_overflow_and_one_every_six_seconds_does_not() {
        let s = Shape::per(10, 60_000);
        let mut b = Leaky::default();
        for i in 0..9 {
            assert!(b.pour(s, i * 300) < 10);
        }
        assert_eq!(b.pour(s, 2_700), 10);
        // Spread over more than the window, they never reach it.
        let mut slow = Leaky::default();
        let top = (0..100).map(|i| slow.pour(s, i * 6_000)).max();
        assert_eq!(top, Some(1));
    }

    #[test]
    fn a_distinct_bucket_counts_each_target_once_and_forgets_the_oldest() {
        let s = Shape::per(15, 75_000);
        let mut d = Distinct::default();
        for _ in 0..100 {
            assert_eq!(d.pour(s, 7, 0).0, 1, "one port probed many times");
        }
        for port in 0..14 {
            d.pour(s, 1_000 + port, 10);
        }
        assert_eq!(d.pour(s, 2_000, 20), (15, true), "fifteen distinct");
        // 12 s later two have leaked out.
        assert_eq!(d.pour(s, 2_000, 12_020), (13, false));
        assert!(d.is_empty_at(s, 12_020 + 15 * 5_000));
    }

    proptest! {
        /// The level never exceeds the events poured, nor what a bucket that
        /// never leaked would hold; and an idle bucket empties.
        #[test]
        fn a_bucket_holds_no_more_than_was_poured(
            cap in 1u32..50,
            window in 1i64..100_000,
            gaps in prop::collection::vec(0i64..10_000, 1..200),
        ) {
            let s = Shape::per(cap, window);
            let mut b = Leaky::default();
            let mut now = 0;
            for (i, g) in gaps.iter().enumerate() {
                now += g;
                let level = b.pour(s, now);
                prop_assert!(level as usize <= i + 1);
                prop_assert!(level >= 1);
            }
            prop_assert!(b.is_empty_at(s, now + s.window_ms * (gaps.len() as i64 + 1)));
        }

        #[test]
        fn a_distinct_bucket_never_holds_more_than_its_capacity(
            cap in 1u32..30,
            items in prop::collection::vec((0u64..40, 0i64..3_000), 1..300),
        ) {
            let s = Shape::per(cap, 5_000 * i64::from(cap));
            let mut d = Distinct::default();
            let mut now = 0;
            for (item, gap) in items {
                now += gap;
                let (n, _) = d.pour(s, item, now);
                prop_assert!(n >= 1 && n <= cap);
            }
        }
    }
}
