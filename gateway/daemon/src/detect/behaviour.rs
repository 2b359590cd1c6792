//! The behaviour baseline's shell (8.1.3.3 c, basic): every minute the node's
//! running totals per service and channel are sampled, their increases fed
//! to `gateway_core::detect::baseline`, and its anomalies raised as
//! low-severity alarms. The history is kept in `STATE_DIR/baseline.json`
//! (written whole when an hour ends), so a restart does not forget it.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;

use gateway_core::detect::baseline::{Anomaly, Baseline};

use crate::admin::metrics::Metrics;
use crate::os::dir::{ReadRefusal, SafeDir};

const NAME: &str = "baseline.json";
/// Largest file read.
const MAX_BYTES: u64 = 64 << 20;

/// The baseline and the totals it last saw.
#[derive(Default)]
pub struct Sampler {
    /// The history.
    pub baseline: Baseline,
    last: HashMap<String, [u64; 3]>,
}

impl Sampler {
    /// A sampler with the history saved in `state_dir` (none if missing or
    /// unreadable: the baseline starts again).
    pub fn load(state_dir: &Path) -> Self {
        let baseline = SafeDir::open(state_dir)
            .ok()
            .and_then(|d| match d.read_entry(OsStr::new(NAME), MAX_BYTES) {
                Ok(f) => serde_json::from_slice::<Baseline>(&f.bytes).ok().map(Baseline::capped),
                Err(ReadRefusal::Gone) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "The behaviour baseline was not read; it starts again");
                    None
                }
            })
            .unwrap_or_default();
        Self {
            baseline,
            last: HashMap::new(),
        }
    }

    /// Saves the history in `state_dir`.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(&self.baseline).map_err(std::io::Error::other)?;
        SafeDir::open(state_dir)
            .map_err(std::io::Error::other)?
            .write_replace(OsStr::new(NAME), &bytes)
    }

    /// Feeds what the totals grew by since the last step (the first step only
    /// takes them as they are); the anomalies of the hours that ended.
    pub fn step(&mut self, metrics: &Metrics, now_ms: i64) -> Vec<Anomaly> {
        let mut out = Vec::new();
        let totals = metrics.volumes();
        for (key, now) in &totals {
            let grew = match self.last.get(key) {
                // A counter that went back (a restart of its owner) counts from zero.
                Some(before) => std::array::from_fn(|i| {
                    if now[i] >= before[i] {
                        now[i] - before[i]
                    } else {
                        now[i]
                    }
                }),
                None => [0; 3],
            };
            out.extend(self.baseline.add(key, now_ms, grew));
        }
        self.last = totals.into_iter().collect();
        out.extend(self.baseline.tick(now_ms));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increases_of_the_node_counters_go_into_the_hourly_history() {
        let m = Metrics::default();
        let mut s = Sampler::default();
        let t0 = 1_800_000_000_000;
        m.opened("web");
        m.refused("web", "R5.address");
        assert!(s.step(&m, t0).is_empty());
        for _ in 0..3 {
            m.opened("web");
        }
        m.closed("web", 100, 200);
        s.step(&m, t0 + 60_000);
        let series = &s.baseline.series["service web"];
        assert_eq!(series.hours.back(), Some(&[3, 300, 0]), "only what grew");
        // An hour later the hour is closed and a new one open.
        s.step(&m, t0 + 3_600_000);
        assert!(s.baseline.series["service web"].hours.len() >= 2);
        let dir = tempfile::tempdir().expect("dir");
        s.save(dir.path()).expect("save");
        let back = Sampler::load(dir.path());
        assert_eq!(back.baseline, s.baseline);
    }
}
