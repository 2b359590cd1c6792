//! Filling the inactive root slot: which chunks it holds already, which can
//! be copied from the running slot (the same hash), which must come from the
//! hub. The progress is a bitmap the updater keeps on the state disk and
//! writes after each chunk is in the slot and synced, so a link loss or a
//! power cut costs at most the chunk being written: on restart the chunks
//! not marked are written again, and a marked one is never fetched twice.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Manifest;

/// What the updater keeps of one version being written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The version being written (a different offer starts afresh).
    pub version: String,
    /// One bit per chunk: in the slot, checked, synced.
    have: Vec<u64>,
    chunks: usize,
}

/// How to get one chunk into the inactive slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Copy chunk `from` of the running slot (the same bytes).
    CopyLocal {
        /// The chunk to write.
        chunk: usize,
        /// The running slot's chunk with its hash.
        from: usize,
    },
    /// Fetch it from the hub.
    Fetch(usize),
}

impl Progress {
    /// Nothing written yet for `m`.
    pub fn new(m: &Manifest) -> Self {
        let chunks = m.chunk_count();
        Progress {
            version: m.version.clone(),
            have: vec![0; chunks.div_ceil(64)],
            chunks,
        }
    }

    /// The kept progress if it is for `m`, else a fresh one (a kept bitmap
    /// of another version, or of another shape, is never trusted).
    pub fn resume(kept: Option<Progress>, m: &Manifest) -> Self {
        match kept {
            Some(p)
                if p.version == m.version
                    && p.chunks == m.chunk_count()
                    && p.have.len() == p.chunks.div_ceil(64) =>
            {
                p
            }
            _ => Progress::new(m),
        }
    }

    /// Whether chunk `i` is in the slot.
    pub fn has(&self, i: usize) -> bool {
        i < self.chunks
            && self
                .have
                .get(i / 64)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Chunk `i` is in the slot, checked and synced.
    pub fn mark(&mut self, i: usize) {
        if i < self.chunks
            && let Some(w) = self.have.get_mut(i / 64)
        {
            *w |= 1 << (i % 64);
        }
    }

    /// Chunks in all.
    pub fn total(&self) -> usize {
        self.chunks
    }

    /// Chunks in the slot.
    pub fn done(&self) -> usize {
        (0..self.chunks).filter(|i| self.has(*i)).count()
    }

    /// Every chunk is in the slot: the boot entry may be written.
    pub fn complete(&self) -> bool {
        self.done() == self.chunks
    }

    /// The chunks still to write, in order, each copied from the running
    /// slot when it holds the same hash (`running`: its chunk hashes).
    pub fn plan(&self, m: &Manifest, running: &[String]) -> Vec<Step> {
        let mut local: HashMap<&str, usize> = HashMap::new();
        for (i, h) in running.iter().enumerate() {
            local.entry(h.as_str()).or_insert(i);
        }
        (0..m.chunk_count())
            .filter(|i| !self.has(*i))
            .map(|i| match local.get(m.chunks[i].as_str()) {
                Some(&from) => Step::CopyLocal { chunk: i, from },
                None => Step::Fetch(i),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CHUNK_BYTES, FORMAT};
    use super::*;
    use proptest::prelude::*;

    fn sha(b: &[u8]) -> String {
        crate::hex::encode(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
    }

    /// An image of `n` small chunks (the size does not matter to the plan).
    fn image(tag: u8, n: usize, same_as_running: &[usize]) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let t = if same_as_running.contains(&i) { 0 } else { tag };
                vec![t, i as u8, 7]
            })
            .collect()
    }

    fn manifest(chunks: &[Vec<u8>]) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: "2.0".into(),
            security_version: 1,
            hardware: vec!["g2".into()],
            min_from_version: "1.0".into(),
            kernel_sha256: sha(b"k"),
            initrd_sha256: sha(b"i"),
            root_bytes: chunks.len() as u64 * CHUNK_BYTES,
            chunks: chunks.iter().map(|c| sha(c)).collect(),
        }
    }

    #[test]
    fn chunks_the_running_slot_holds_are_copied_and_the_rest_fetched() {
        let running = image(0, 4, &[]);
        let new = image(9, 4, &[1, 3]);
        let m = manifest(&new);
        let hashes: Vec<String> = running.iter().map(|c| sha(c)).collect();
        let mut p = Progress::new(&m);
        assert_eq!(
            p.plan(&m, &hashes),
            vec![
                Step::Fetch(0),
                Step::CopyLocal { chunk: 1, from: 1 },
                Step::Fetch(2),
                Step::CopyLocal { chunk: 3, from: 3 }
            ]
        );
        p.mark(0);
        p.mark(3);
        assert_eq!(
            p.plan(&m, &hashes),
            vec![Step::CopyLocal { chunk: 1, from: 1 }, Step::Fetch(2)]
        );
        assert!(!p.complete());
        // A kept bitmap of another version is not trusted.
        let other = Manifest {
            version: "2.1".into(),
            ..m.clone()
        };
        assert_eq!(Progress::resume(Some(p.clone()), &other).done(), 0);
        assert_eq!(Progress::resume(Some(p), &m).done(), 2);
    }

    proptest! {
        /// The updater writes chunks into a slot (a vector standing in for
        /// the partition), saving the bitmap after each; the power goes at
        /// random points (a chunk half written, the bitmap not saved), and
        /// the link drops chunks. After every restart it resumes from the
        /// saved bitmap; in the end the slot holds exactly the new image and
        /// no chunk marked done was fetched again.
        #[test]
        fn power_cuts_and_link_losses_cost_at_most_the_chunk_in_flight(
            n in 1usize..40,
            same in proptest::collection::vec(any::<bool>(), 40),
            cuts in proptest::collection::vec(0usize..60, 0..8),
            drops in proptest::collection::vec(proptest::bool::weighted(0.2), 200),
        ) {
            let running = image(0, n, &[]);
            let same: Vec<usize> = (0..n).filter(|i| same[*i]).collect();
            let new = image(5, n, &same);
            let m = manifest(&new);
            let hashes: Vec<String> = running.iter().map(|c| sha(c)).collect();
            let mut slot: Vec<Vec<u8>> = vec![vec![0xee]; n];
            let mut saved: Option<Progress> = None;
            let mut fetched_after_done = 0;
            let mut step_no = 0usize;
            let mut drops = drops.into_iter().cycle();
            let mut cuts = cuts.clone();
            cuts.sort_unstable();
            let mut boots = 0;
            loop {
                boots += 1;
                prop_assert!(boots < 10_000, "no progress");
                let mut p = Progress::resume(saved.clone(), &m);
                let plan = p.plan(&m, &hashes);
                if plan.is_empty() {
                    break;
                }
                for s in plan {
                    step_no += 1;
                    let (chunk, bytes) = match s {
                        Step::CopyLocal { chunk, from } => (chunk, running[from].clone()),
                        Step::Fetch(chunk) => {
                            if saved.as_ref().is_some_and(|k| k.has(chunk)) {
                                fetched_after_done += 1;
                            }
                            if drops.next().unwrap_or(false) {
                                // The link dropped: this session ends, the
                                // next one resumes.
                                break;
                            }
                            (chunk, new[chunk].clone())
                        }
                    };
                    if cuts.first() == Some(&step_no) {
                        cuts.remove(0);
                        slot[chunk] = vec![0xba]; // half written
                        break;
                    }
                    prop_assert!(m.chunks[chunk] == sha(&bytes), "checked before it is written");
                    slot[chunk] = bytes;
                    p.mark(chunk);
                    saved = Some(p.clone());
                }
            }
            prop_assert_eq!(fetched_after_done, 0);
            prop_assert_eq!(&slot, &new);
            prop_assert!(Progress::resume(saved, &m).complete());
        }
    }
}
