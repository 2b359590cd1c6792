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

/// A handle for writing audit events; cheap to clone.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<Event>,
    device: Arc<str>,
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
                    if let Err(error) = log.append(batch) {
                        tracing::error!(%error, lost = n, "Audit write failed");
                    }
                    last_commit = std::time::Instant::now();
                }
            })
            .map_err(|e| OpenError::Missing(format!("cannot start the audit writer: {e}")))?;
        Ok((
            AuditSink {
                tx,
                device: device.into(),
            },
            AuditWriter(handle),
        ))
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
        if self.tx.send(e).is_err() {
            tracing::error!("Audit writer is gone; event lost");
        }
    }
}
