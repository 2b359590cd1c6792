//! When undelivered channel records expire: their TTL counted in wall time, or,
//! with `ttl_pauses_offline = true`, only in time some hub was reachable.

/// The acceptance time (Unix ms) before which a record has lived longer than
/// `ttl_ms`, not counting the `offline` intervals (`[start, end)`, Unix ms,
/// disjoint, in any order; the last may end at `now`) when `pause` is set.
pub fn cutoff(now_ms: i64, ttl_ms: i64, offline: &[(i64, i64)], pause: bool) -> i64 {
    if !pause {
        return now_ms.saturating_sub(ttl_ms);
    }
    // Walk back from now through the online stretches until they add up to
    // the TTL, skipping the offline intervals, latest first.
    let mut gaps: Vec<(i64, i64)> = offline
        .iter()
        .map(|&(s, e)| (s, e.min(now_ms)))
        .filter(|&(s, e)| s < e)
        .collect();
    gaps.sort_unstable_by_key(|g| std::cmp::Reverse(g.1));
    let (mut t, mut need) = (now_ms, ttl_ms);
    for (s, e) in gaps {
        let online = t - e;
        if online >= need {
            break;
        }
        need -= online.max(0);
        t = t.min(s);
    }
    t.saturating_sub(need)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wall_time_without_pause() {
        assert_eq!(cutoff(10_000, 3_000, &[(8_000, 9_000)], false), 7_000);
    }

    #[test]
    fn offline_time_does_not_count() {
        // One second offline inside the last three: the cutoff moves a second back.
        assert_eq!(cutoff(10_000, 3_000, &[(8_000, 9_000)], true), 6_000);
        // Offline right now, for two seconds.
        assert_eq!(cutoff(10_000, 3_000, &[(8_000, 10_000)], true), 5_000);
        // Moving back reaches an earlier interval, which counts too.
        assert_eq!(
            cutoff(10_000, 3_000, &[(8_000, 9_000), (5_500, 6_500)], true),
            5_000
        );
        // Offline long ago: no effect.
        assert_eq!(cutoff(10_000, 3_000, &[(1_000, 2_000)], true), 7_000);
    }

    proptest! {
        /// A record accepted at the cutoff has lived exactly `ttl` of online time.
        #[test]
        fn online_age_at_the_cutoff_is_the_ttl(
            ttl in 1i64..10_000,
            gaps in prop::collection::vec((0i64..10_000, 0i64..5_000), 0..6),
        ) {
            let now = 60_000;
            // Disjoint intervals: each starts after the previous one ended.
            let mut at = 0;
            let offline: Vec<(i64, i64)> = gaps.iter().map(|&(skip, len)| {
                let s = (at + skip).min(now);
                at = (s + len).min(now);
                (s, at)
            }).collect();
            let c = cutoff(now, ttl, &offline, true);
            // Online time in [c, now], counting overlapping intervals once.
            let online = (c..now).filter(|t| !offline.iter().any(|&(s, e)| (s..e).contains(t))).count() as i64;
            prop_assert!(online == ttl || c < 0, "cutoff {c}: online {online} of ttl {ttl}");
        }
    }
}
