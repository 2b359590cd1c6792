//! Bans: a source that tripped a detector is dropped for a while, longer each
//! time it comes back (fail2ban's `bantime.increment` in a simple form): a
//! source banned [`Escalation::repeat`] times within
//! [`Escalation::repeat_window_ms`] is banned for [`Escalation::repeat_ms`].
//! Pure: time comes in as Unix milliseconds; the table is capped. Sources are
//! keyed by [`super::source_key`] (an IPv6 address bans its /64).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

/// Sources banned (or remembered for escalation) at once. When full, entries
/// whose ban ended go first, then the eighth of the bans that end soonest.
pub const MAX_BANS: usize = 65_536;

/// How bans grow for a source that keeps coming back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Escalation {
    /// Bans within the window that make the next one long.
    pub repeat: u32,
    /// The window (24 h by default).
    pub repeat_window_ms: i64,
    /// The long ban (a week by default).
    pub repeat_ms: i64,
}

impl Default for Escalation {
    fn default() -> Self {
        Self {
            repeat: 3,
            repeat_window_ms: 24 * 3_600_000,
            repeat_ms: 7 * 24 * 3_600_000,
        }
    }
}

/// One source's bans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Banned until (Unix ms); in the past when the ban ended.
    pub until_ms: i64,
    /// When its bans within the escalation window began.
    pub history: VecDeque<i64>,
}

/// The ban table.
#[derive(Debug, Default)]
pub struct Bans {
    by_source: HashMap<IpAddr, Entry>,
    escalation: Escalation,
}

impl Bans {
    /// An empty table escalating as `escalation` says.
    pub fn new(escalation: Escalation) -> Self {
        Self {
            by_source: HashMap::new(),
            escalation,
        }
    }

    /// Bans `source` from `now_ms` for `base_ms`, or for the long ban when it
    /// is the `repeat`th within the window; a running longer ban is kept.
    /// Returns until when it is banned.
    pub fn ban(&mut self, source: IpAddr, now_ms: i64, base_ms: i64) -> i64 {
        let source = super::source_key(source);
        if !self.by_source.contains_key(&source) && self.by_source.len() >= MAX_BANS {
            self.make_room(now_ms);
        }
        let e = self.escalation;
        let entry = self.by_source.entry(source).or_insert(Entry {
            until_ms: i64::MIN,
            history: VecDeque::new(),
        });
        while entry
            .history
            .front()
            .is_some_and(|t| now_ms - t >= e.repeat_window_ms)
        {
            entry.history.pop_front();
        }
        entry.history.push_back(now_ms);
        while entry.history.len() > e.repeat as usize {
            entry.history.pop_front();
        }
        let long = entry.history.len() >= e.repeat as usize;
        let length = if long {
            e.repeat_ms.max(base_ms)
        } else {
            base_ms
        };
        entry.until_ms = entry.until_ms.max(now_ms.saturating_add(length));
        entry.until_ms
    }

    /// Until when `source` is banned, if it is at `now_ms`.
    pub fn banned_until(&self, source: IpAddr, now_ms: i64) -> Option<i64> {
        self.by_source
            .get(&super::source_key(source))
            .map(|e| e.until_ms)
            .filter(|u| *u > now_ms)
    }

    /// Lifts `source`'s ban (its history stays, for escalation). Whether it was banned.
    pub fn lift(&mut self, source: IpAddr, now_ms: i64) -> bool {
        match self.by_source.get_mut(&super::source_key(source)) {
            Some(e) if e.until_ms > now_ms => {
                e.until_ms = now_ms;
                true
            }
            _ => false,
        }
    }

    /// Sources banned at `now_ms`, with until when.
    pub fn active(&self, now_ms: i64) -> Vec<(IpAddr, i64)> {
        let mut v: Vec<_> = self
            .by_source
            .iter()
            .filter(|(_, e)| e.until_ms > now_ms)
            .map(|(s, e)| (*s, e.until_ms))
            .collect();
        v.sort_unstable();
        v
    }

    /// How many sources are banned at `now_ms`.
    pub fn active_count(&self, now_ms: i64) -> usize {
        self.by_source
            .values()
            .filter(|e| e.until_ms > now_ms)
            .count()
    }

    /// Every entry, for saving (bans survive a restart).
    pub fn entries(&self) -> impl Iterator<Item = (&IpAddr, &Entry)> {
        self.by_source.iter()
    }

    /// Puts back a saved entry (capped like a new ban).
    pub fn restore(&mut self, source: IpAddr, entry: Entry, now_ms: i64) {
        let source = super::source_key(source);
        if !self.by_source.contains_key(&source) && self.by_source.len() >= MAX_BANS {
            self.make_room(now_ms);
        }
        self.by_source.insert(source, entry);
    }

    /// Forgets sources whose ban ended and whose history is older than the
    /// escalation window.
    pub fn forget_ended(&mut self, now_ms: i64) {
        let window = self.escalation.repeat_window_ms;
        self.by_source.retain(|_, e| {
            e.until_ms > now_ms || e.history.back().is_some_and(|t| now_ms - t < window)
        });
        crate::table::shrink(&mut self.by_source);
    }

    /// Sources in the table.
    pub fn len(&self) -> usize {
        self.by_source.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.by_source.is_empty()
    }

    fn make_room(&mut self, now_ms: i64) {
        self.by_source.retain(|_, e| e.until_ms > now_ms);
        if self.by_source.len() >= MAX_BANS {
            crate::table::evict_oldest(&mut self.by_source, |e| e.until_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIN: i64 = 60_000;
    const H: i64 = 60 * MIN;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn the_third_ban_in_a_day_lasts_a_week() {
        let mut b = Bans::new(Escalation::default());
        assert_eq!(b.ban(ip(1), 0, 10 * MIN), 10 * MIN);
        assert_eq!(b.banned_until(ip(1), 5 * MIN), Some(10 * MIN));
        assert_eq!(b.banned_until(ip(1), 10 * MIN), None, "ended");
        assert_eq!(b.ban(ip(1), H, 10 * MIN), H + 10 * MIN);
        assert_eq!(b.ban(ip(1), 2 * H, 10 * MIN), 2 * H + 7 * 24 * H);
        // Bans a day apart never escalate.
        let mut slow = Bans::new(Escalation::default());
        for day in 0..10 {
            let t = day * 25 * H;
            assert_eq!(slow.ban(ip(2), t, 10 * MIN), t + 10 * MIN);
        }
    }

    #[test]
    fn a_lifted_ban_drops_at_once_and_ended_ones_are_forgotten_after_a_day() {
        let mut b = Bans::new(Escalation::default());
        b.ban(ip(1), 0, 4 * H);
        assert!(b.lift(ip(1), MIN));
        assert_eq!(b.banned_until(ip(1), MIN), None);
        assert!(!b.lift(ip(1), MIN), "not banned any more");
        b.forget_ended(2 * H);
        assert_eq!(b.len(), 1, "its history is kept for escalation");
        b.forget_ended(25 * H);
        assert!(b.is_empty());
    }

    #[test]
    fn a_full_table_gives_up_the_eighth_of_bans_that_end_first() {
        let mut b = Bans::new(Escalation::default());
        let addr = |i: u32| IpAddr::from((i + 1).to_be_bytes());
        for i in 0..MAX_BANS as u32 {
            b.ban(addr(i), 0, H + i64::from(i));
        }
        b.ban(ip(200), 0, 2 * H);
        let eighth = MAX_BANS / 8;
        assert_eq!(b.len(), MAX_BANS - eighth + 1);
        let kept = |i: u32| b.banned_until(addr(i), 0).is_some();
        assert!(
            (0..eighth as u32).all(|i| !kept(i)),
            "the soonest ending went"
        );
        assert!(
            (eighth as u32..MAX_BANS as u32).all(kept),
            "the others stay"
        );
        assert!(b.banned_until(ip(200), 0).is_some());
    }

    proptest! {
        /// Against a model that keeps every ban: a source is banned exactly
        /// while some ban of it runs, and the long ban follows three within a
        /// day.
        #[test]
        fn bans_follow_the_model(ops in prop::collection::vec((0u8..4, 0i64..(8 * H), 0u8..3), 1..60)) {
            let mut b = Bans::new(Escalation::default());
            let mut starts: Vec<Vec<i64>> = vec![Vec::new(); 4];
            let mut until = [i64::MIN; 4];
            let mut now = 0;
            for (who, gap, what) in ops {
                now += gap;
                let w = who as usize;
                match what {
                    0 | 1 => {
                        starts[w].push(now);
                        let recent = starts[w].iter().filter(|t| now - **t < 24 * H).count();
                        let len = if recent >= 3 { 7 * 24 * H } else { 10 * MIN };
                        until[w] = until[w].max(now + len);
                        prop_assert_eq!(b.ban(ip(who), now, 10 * MIN), until[w]);
                    }
                    _ => {
                        let was = until[w] > now;
                        if was { until[w] = now; }
                        prop_assert_eq!(b.lift(ip(who), now), was);
                    }
                }
                for s in 0..4u8 {
                    let expect = (until[s as usize] > now).then_some(until[s as usize]);
                    prop_assert_eq!(b.banned_until(ip(s), now), expect);
                }
            }
        }
    }
}
