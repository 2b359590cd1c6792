//! The node's audit writer: events go through a channel to one thread that
//! appends them to the SQLite chain in batches (one transaction per batch), so a
//! relay never waits on a disk sync.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;

use gateway_core::audit::Event;
use gateway_store::audit::{AuditLog, OpenError};

use super::clock::now_ms;

/// Largest batch written in one transaction.
const BATCH: usize = 1024;
/// How long the writer gathers events after the first of a batch, while they
/// keep coming: under load a commit (a disk sync) per this long at most, not
/// one per event, so the audit does not take the disk from the records it
/// describes ...
const LINGER: std::time::Duration = std::time::Duration::from_millis(20);
/// ... as long as the next event comes within this, or the last commit was
/// less than [`LINGER`] ago (a lone event is written within this).
const GAP: std::time::Duration = std::time::Duration::from_millis(2);

/// Records kept in memory after they are written, for the hub's shipper.
const RECENT: usize = 8192;

/// A handle for writing audit events; cheap to clone.
#[derive(Clone)]
pub struct AuditSink {
    /// To the writer thread; `None` for a chain kept in memory only.
    tx: Option<mpsc::Sender<Event>>,
    /// The in-memory chain's head (sequence number, hash).
    head: Option<Arc<std::sync::Mutex<(u64, gateway_core::audit::Hash)>>>,
    device: Arc<str>,
    /// The newest records written (at most [`RECENT`]), in order: the
    /// shipper reads them here instead of back from the file. This writer is
    /// the chain's only appender, so a record here is the one in the file.
    recent: Arc<std::sync::Mutex<std::collections::VecDeque<gateway_core::audit::Record>>>,
}

/// The writer thread; join it after every [`AuditSink`] is dropped to flush.
pub struct AuditWriter(std::thread::JoinHandle<()>);

impl AuditWriter {
    /// Waits until every queued event is written.
    pub fn flush_and_stop(self) {
        let _ = self.0.join();
    }
}

impl AuditSink {
    /// Opens `STATE_DIR/audit.sqlite` and starts the writer.
    ///
    /// # Errors
    /// When the database cannot be opened.
    pub fn start(state_dir: &Path, device: &str) -> Result<(AuditSink, AuditWriter), OpenError> {
        let mut log = AuditLog::open(state_dir)?;
        let (tx, rx) = mpsc::channel::<Event>();
        let recent = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let kept = recent.clone();
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                // When the last commit was less than LINGER ago, events are
                // coming steadily: sleep to LINGER after it and take what came
                // (a commit per LINGER at most, however they are spaced, and
                // no wake-up per event: a sleeping writer is not woken by a
                // send); after a quiet while, a lone event is written within
                // GAP.
                let mut last_commit = std::time::Instant::now() - LINGER;
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    let busy = last_commit.elapsed() < LINGER;
                    let until = if busy {
                        last_commit + LINGER
                    } else {
                        std::time::Instant::now() + GAP
                    };
                    std::thread::sleep(until.saturating_duration_since(std::time::Instant::now()));
                    batch.extend(rx.try_iter().take(BATCH - 1));
                    let n = batch.len();
                    match log.append(batch) {
                        Ok(written) => {
                            let mut k = kept
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            k.extend(written);
                            let over = k.len().saturating_sub(RECENT);
                            k.drain(..over);
                        }
                        Err(error) => tracing::error!(%error, lost = n, "Audit write failed"),
                    }
                    last_commit = std::time::Instant::now();
                }
            })
            .map_err(|e| OpenError::Missing(format!("cannot start the audit writer: {e}")))?;
        Ok((
            AuditSink {
                tx: Some(tx),
                head: None,
                device: device.into(),
                recent,
            },
            AuditWriter(handle),
        ))
    }

    /// A chain kept in memory only (the newest [`RECENT`] records), written
    /// by the caller's thread: for the fleet simulator, whose thousands of
    /// edges are not worth a file and a thread each. Its records are chained
    /// exactly as the file's.
    pub fn in_memory(device: &str) -> AuditSink {
        AuditSink {
            tx: None,
            head: Some(Arc::new(std::sync::Mutex::new((
                0,
                gateway_core::audit::GENESIS,
            )))),
            device: device.into(),
            recent: Arc::default(),
        }
    }

    /// Up to `limit` records from sequence number `from`, when memory still
    /// holds `from` (or it is past the newest written: then none); `None`
    /// when only the file has them.
    pub fn recent(&self, from: u64, limit: usize) -> Option<Vec<gateway_core::audit::Record>> {
        let k = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slice(&k, from, limit)
    }

    /// Records an event now.
    pub fn record(
        &self,
        subject: &str,
        object: &str,
        event: &str,
        outcome: &str,
        rule: &str,
        detail: String,
    ) {
        let e = Event {
            time_ms: now_ms(),
            device: self.device.to_string(),
            subject: subject.to_owned(),
            object: object.to_owned(),
            event: event.to_owned(),
            outcome: outcome.to_owned(),
            rule: rule.to_owned(),
            detail,
        };
        if let Some(head) = &self.head {
            let mut h = head
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let r = gateway_core::audit::Record::chain(h.0 + 1, e, h.1);
            *h = (r.seq, r.hash);
            let mut k = self
                .recent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            k.push_back(r);
            let over = k.len().saturating_sub(RECENT);
            k.drain(..over);
            return;
        }
        if self.tx.as_ref().is_none_or(|tx| tx.send(e).is_err()) {
            tracing::error!("Audit writer is gone; event lost");
        }
    }
}

/// The records of `kept` (consecutive, oldest first) from sequence number
/// `from`, at most `limit`: `None` when `from` is older than the first kept.
fn slice(
    kept: &std::collections::VecDeque<gateway_core::audit::Record>,
    from: u64,
    limit: usize,
) -> Option<Vec<gateway_core::audit::Record>> {
    let (first, last) = (kept.front()?.seq, kept.back()?.seq);
    if from < first {
        return None;
    }
    if from > last {
        return Some(Vec::new());
    }
    let skip = usize::try_from(from - first).unwrap_or(usize::MAX);
    Some(kept.iter().skip(skip).take(limit).cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_records_are_read_from_memory_as_the_file_has_them() {
        let dir = tempfile::tempdir().expect("dir");
        let (sink, writer) = AuditSink::start(dir.path(), "edge-a").expect("start");
        assert_eq!(
            sink.recent(1, 10),
            None,
            "nothing written yet: the file decides"
        );
        for i in 0..5 {
            sink.record("s", "o", "e", "ok", "", format!("n={i}"));
        }
        // Every sink gone, the writer writes what is queued and ends.
        let kept = sink.recent.clone();
        drop(sink);
        writer.flush_and_stop();
        let kept = kept.lock().expect("kept");
        let file = AuditLog::open_existing(dir.path()).expect("open");
        let on_disk = file.records(1, 10).expect("records");
        assert_eq!(on_disk.len(), 5);
        assert_eq!(slice(&kept, 1, 10), Some(on_disk.clone()));
        assert_eq!(slice(&kept, 3, 2), Some(on_disk[2..4].to_vec()));
        assert_eq!(
            slice(&kept, 6, 10),
            Some(Vec::new()),
            "past the newest: none yet"
        );
        assert_eq!(slice(&kept, 0, 10), None, "older than memory: the file");
    }
}
