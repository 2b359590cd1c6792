//! Behaviour baseline (GB/T 22239-2019 8.1.3.3 c), basic: per channel and
//! per service, hourly totals of three figures (records or connections,
//! bytes, and a third the caller chooses) over the last 14 days. When an hour
//! ends, it is compared with that history: a figure above 3 times its 95th
//! percentile over the hours it was active, or any activity at an hour of the day that had none on each of
//! the last 14 days, is an anomaly (a low-severity alarm). Nothing is judged
//! before there is a week of history (volume) or 14 days (hours).
//!
//! Pure: times come in as Unix ms; hours are counted in China Standard Time.

use std::collections::{HashMap, VecDeque};

/// Hours of history kept per series.
pub const HISTORY_HOURS: usize = 14 * 24;
/// Hours of history before volumes are judged.
pub const MIN_HOURS_FOR_VOLUME: usize = 7 * 24;
/// Series kept at once (channels and services).
pub const MAX_SERIES: usize = 4096;
/// Hours a figure must have been active before its volume is judged.
pub const MIN_ACTIVE_HOURS: usize = 24;
/// How far above its 95th percentile an hour's figure must be.
pub const FACTOR: u64 = 3;

const HOUR_MS: i64 = 3_600_000;
const CST_MS: i64 = 8 * HOUR_MS;

/// The hour (since the epoch, in China Standard Time) `at_ms` falls in.
pub fn hour_of(at_ms: i64) -> i64 {
    (at_ms + CST_MS).div_euclid(HOUR_MS)
}

/// One series' history: an entry per hour, oldest first, the last one open.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Series {
    /// The hour of the first entry.
    pub first_hour: i64,
    /// Totals per hour.
    pub hours: VecDeque<[u64; 3]>,
}

/// What an ended hour showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anomaly {
    /// Figure `figure` (0, 1 or 2) was `value`, above `FACTOR` times its 95th
    /// percentile `p95`.
    Volume {
        /// The series.
        key: String,
        /// The hour.
        hour: i64,
        /// Which figure.
        figure: usize,
        /// The hour's total.
        value: u64,
        /// Its 95th percentile over the history.
        p95: u64,
    },
    /// Activity at an hour of the day that had none on each of the last 14 days.
    UnusualHour {
        /// The series.
        key: String,
        /// The hour.
        hour: i64,
        /// The hour's totals.
        values: [u64; 3],
    },
}

/// Every series' history.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Baseline {
    /// By key (`service NAME`, `channel NAME`).
    pub series: HashMap<String, Series>,
}

/// The `p`th percentile (nearest rank) of `v`.
fn percentile(mut v: Vec<u64>, p: usize) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let rank = (p * v.len()).div_ceil(100).max(1);
    v[rank - 1]
}

impl Series {
    /// Judges the ended hour at `idx` (an index into `hours`) against the
    /// hours before it.
    fn judge(&self, key: &str, idx: usize) -> Vec<Anomaly> {
        let mut out = Vec::new();
        let value = self.hours[idx];
        let history: Vec<[u64; 3]> = self.hours.iter().take(idx).copied().collect();
        let hour = self.first_hour + idx as i64;
        if history.len() >= MIN_HOURS_FOR_VOLUME {
            for figure in 0..3 {
                // Of the hours it was active: a nightly batch is judged
                // against other nights' batches, not against the quiet day.
                let active: Vec<u64> = history
                    .iter()
                    .map(|h| h[figure])
                    .filter(|v| *v > 0)
                    .collect();
                if active.len() < MIN_ACTIVE_HOURS {
                    continue;
                }
                let p95 = percentile(active, 95);
                if value[figure] > FACTOR * p95.max(1) {
                    out.push(Anomaly::Volume {
                        key: key.to_owned(),
                        hour,
                        figure,
                        value: value[figure],
                        p95,
                    });
                }
            }
        }
        if history.len() >= HISTORY_HOURS - 1 && value.iter().any(|v| *v > 0) {
            // The same hour of the day on each of the previous 14 days.
            let quiet = (1..=14).all(|d| {
                idx.checked_sub(d * 24)
                    .and_then(|i| self.hours.get(i))
                    .is_some_and(|h| h.iter().all(|v| *v == 0))
            });
            let enough = idx >= 14 * 24;
            if quiet && enough {
                out.push(Anomaly::UnusualHour {
                    key: key.to_owned(),
                    hour,
                    values: value,
                });
            }
        }
        out
    }

    /// Moves the open hour on to `hour`, closing (and judging) the hours in
    /// between; keeps [`HISTORY_HOURS`] of history besides the open one.
    fn advance(&mut self, key: &str, hour: i64, out: &mut Vec<Anomaly>) {
        if self.hours.is_empty() {
            self.first_hour = hour;
            self.hours.push_back([0; 3]);
            return;
        }
        let open = self.first_hour + self.hours.len() as i64 - 1;
        if hour <= open {
            return;
        }
        // The open hour ends now; the quiet hours after it end with it.
        out.extend(self.judge(key, self.hours.len() - 1));
        let gap = usize::try_from(hour - open)
            .unwrap_or(usize::MAX)
            .min(HISTORY_HOURS + 1);
        for _ in 0..gap {
            self.hours.push_back([0; 3]);
        }
        while self.hours.len() > HISTORY_HOURS + 1 {
            self.hours.pop_front();
        }
        self.first_hour = hour - self.hours.len() as i64 + 1;
    }
}

impl Baseline {
    /// Adds `values` to `key`'s hour of `at_ms`; the anomalies of the hours
    /// that ended.
    pub fn add(&mut self, key: &str, at_ms: i64, values: [u64; 3]) -> Vec<Anomaly> {
        if !self.series.contains_key(key) && self.series.len() >= MAX_SERIES {
            return Vec::new();
        }
        let hour = hour_of(at_ms);
        let mut out = Vec::new();
        let s = self.series.entry(key.to_owned()).or_default();
        s.advance(key, hour, &mut out);
        let open = s.first_hour + s.hours.len() as i64 - 1;
        if hour == open
            && let Some(last) = s.hours.back_mut()
        {
            for (t, v) in last.iter_mut().zip(values) {
                *t = t.saturating_add(v);
            }
        }
        out
    }

    /// Closes every series' hour that ended by `now_ms` (call now and then,
    /// so a series that went quiet is judged too).
    pub fn tick(&mut self, now_ms: i64) -> Vec<Anomaly> {
        let hour = hour_of(now_ms);
        let mut out = Vec::new();
        for (key, s) in &mut self.series {
            s.advance(key, hour, &mut out);
        }
        out
    }

    /// Holds a loaded history to the caps a running one keeps (a file is
    /// not trusted to have been written by this code).
    pub fn capped(mut self) -> Self {
        if self.series.len() > MAX_SERIES {
            let keep: Vec<String> = self.series.keys().take(MAX_SERIES).cloned().collect();
            self.series.retain(|k, _| keep.contains(k));
        }
        for s in self.series.values_mut() {
            while s.hours.len() > HISTORY_HOURS + 1 {
                s.hours.pop_front();
                s.first_hour += 1;
            }
        }
        self
    }

    /// Forgets series not in `keys` (a channel or service removed).
    pub fn retain(&mut self, keys: &[String]) {
        self.series.retain(|k, _| keys.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = HOUR_MS;

    /// 14 days of office hours: 100 records 08:00-18:00 CST, nothing at night.
    fn office_fortnight(b: &mut Baseline) -> i64 {
        let start = 20_000 * 24 * H - CST_MS; // midnight CST
        for h in 0..(14 * 24) {
            let at = start + h * H + 60_000;
            let of_day = h % 24;
            let v = if (8..18).contains(&of_day) {
                [100, 10_000, 5]
            } else {
                [0; 3]
            };
            assert!(b.add("channel docs", at, v).is_empty(), "hour {h}");
        }
        start + 14 * 24 * H
    }

    #[test]
    fn a_normal_day_after_a_fortnight_raises_nothing() {
        let mut b = Baseline::default();
        let day15 = office_fortnight(&mut b);
        for h in 0..24 {
            let v = if (8..18).contains(&h) {
                [120, 11_000, 6]
            } else {
                [0; 3]
            };
            let out = b.add("channel docs", day15 + h * H + 60_000, v);
            assert!(out.is_empty(), "hour {h}: {out:?}");
        }
    }

    #[test]
    fn three_times_the_95th_percentile_and_a_night_hour_are_anomalies() {
        let mut b = Baseline::default();
        let day15 = office_fortnight(&mut b);
        // 10:00: 400 records, 4x the usual.
        b.add("channel docs", day15 + 10 * H + 60_000, [400, 10_000, 5]);
        let out = b.add("channel docs", day15 + 11 * H + 60_000, [100, 10_000, 5]);
        assert!(
            matches!(
                &out[..],
                [Anomaly::Volume {
                    figure: 0,
                    value: 400,
                    p95: 100,
                    ..
                }]
            ),
            "{out:?}"
        );
        // 03:00 the next night: never active at that hour for 14 days.
        let night = day15 + 24 * H + 3 * H + 60_000;
        b.add("channel docs", night, [1, 10, 1]);
        let out = b.tick(night + H);
        assert!(
            out.iter().any(|a| matches!(
                a,
                Anomaly::UnusualHour {
                    values: [1, 10, 1],
                    ..
                }
            )),
            "{out:?}"
        );
    }

    #[test]
    fn a_nightly_batch_is_judged_against_other_nights() {
        let mut b = Baseline::default();
        let start = 20_000 * 24 * H - CST_MS;
        let mut raised = Vec::new();
        for day in 0..15 {
            let n = if day == 14 { 5_000 } else { 1_000 };
            raised.extend(b.add(
                "channel nightly",
                start + day * 24 * H + 2 * H,
                [n, n * 100, 1],
            ));
            raised.extend(b.tick(start + day * 24 * H + 3 * H));
        }
        // Until the 15th night, nothing; only fourteen active hours, so not
        // yet judged by volume (24 needed), nor an unusual hour.
        assert!(raised.is_empty(), "{raised:?}");
    }

    #[test]
    fn nothing_is_judged_without_history_and_the_table_is_capped() {
        let mut b = Baseline::default();
        let out = b.add("service web", 0, [1_000_000, 1, 1]);
        assert!(out.is_empty());
        assert!(
            b.add("service web", 2 * H, [1, 1, 1]).is_empty(),
            "no week of history yet"
        );
        for i in 0..MAX_SERIES + 10 {
            b.add(&format!("service s{i}"), 0, [1, 1, 1]);
        }
        assert_eq!(b.series.len(), MAX_SERIES);
        // A long silence keeps at most the history window.
        b.add("service web", 100 * 24 * H, [1, 1, 1]);
        assert_eq!(b.series["service web"].hours.len(), HISTORY_HOURS + 1);
        // A loaded history is held to the same caps.
        let mut loaded = b.clone();
        loaded.series.insert(
            "service s-extra".into(),
            Series {
                first_hour: 0,
                hours: std::iter::repeat_n([1, 1, 1], 5 * HISTORY_HOURS).collect(),
            },
        );
        let loaded = loaded.capped();
        assert_eq!(loaded.series.len(), MAX_SERIES);
        assert!(
            loaded
                .series
                .values()
                .all(|s| s.hours.len() <= HISTORY_HOURS + 1)
        );
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        assert_eq!(percentile((1..=100).collect(), 95), 95);
        assert_eq!(percentile(vec![0; 10], 95), 0);
        assert_eq!(percentile(vec![], 95), 0);
    }
}
