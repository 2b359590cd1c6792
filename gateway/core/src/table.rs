//! Capped tables keyed by what peers send (addresses, ports, flows): room
//! given back after a flood, and room made in a full table without a pass
//! over it for every new key.

use std::collections::HashMap;
use std::hash::Hash;

/// Gives back a table's room once most of it is empty (after a flood).
pub fn shrink<K: Hash + Eq, V>(m: &mut HashMap<K, V>) {
    if m.capacity() > 4 * m.len() + 64 {
        m.shrink_to_fit();
    }
}

/// Makes room in a full table: forgets the eighth of its entries whose `age`
/// is lowest (at least one), in one pass, so that a flood of new keys costs a
/// pass per eighth of the table, not a pass each.
pub fn evict_oldest<K: Hash + Eq, V, A: Ord + Copy>(m: &mut HashMap<K, V>, age: impl Fn(&V) -> A) {
    let mut ages: Vec<A> = m.values().map(&age).collect();
    if ages.is_empty() {
        return;
    }
    let n = (ages.len() / 8).max(1);
    let (_, cut, _) = ages.select_nth_unstable(n - 1);
    let cut = *cut;
    // Everything below the cut goes (fewer than n), then ties at the cut
    // until n have gone.
    let before = m.len();
    m.retain(|_, v| age(v) >= cut);
    let mut budget = n - (before - m.len());
    m.retain(|_, v| {
        if budget > 0 && age(v) == cut {
            budget -= 1;
            false
        } else {
            true
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// An eighth goes (at least one), and none that stays is younger
        /// than one that went.
        #[test]
        fn the_oldest_eighth_goes(ages in prop::collection::vec(0i64..50, 1..300)) {
            let mut m: HashMap<usize, i64> = ages.iter().copied().enumerate().collect();
            evict_oldest(&mut m, |a| *a);
            let gone: Vec<i64> = (0..ages.len()).filter(|k| !m.contains_key(k)).map(|k| ages[k]).collect();
            prop_assert_eq!(gone.len(), (ages.len() / 8).max(1));
            let oldest_kept = m.values().min().copied().unwrap_or(i64::MAX);
            prop_assert!(gone.iter().all(|g| *g <= oldest_kept));
        }
    }
}
