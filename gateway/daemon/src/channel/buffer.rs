//! The thread that owns the edge's record buffer (`gateway_store::buffer`).
//!
//! Producers (ingest) and the channels' sync tasks talk to it through a queue.
//! Durability costs one disk sync per transaction, so the thread commits every
//! append queued while the previous sync ran in one transaction (group commit):
//! under load many records share a sync, and a lone record waits for no window.
//! After a commit, each channel that got records is signalled, so its sync task
//! sends them without polling.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use gateway_store::buffer::{
    Appended, Backlog, Batch, Buffer, BufferError, NewRecord, Receipt, Record, WhenFull,
};
use tokio::sync::{Notify, oneshot};
use tracing::error;

use crate::node::clock::now_ms;

/// Most jobs handled in one turn (one group commit).
const GROUP: usize = 1024;

type Reply<T> = oneshot::Sender<Result<T, String>>;

struct AppendJob {
    channel: String,
    records: Vec<NewRecord>,
    quota: u64,
    when_full: WhenFull,
    source: Option<String>,
    producer: Option<String>,
    reply: Reply<Appended>,
}

enum Job {
    Append(AppendJob),
    Read {
        channel: String,
        after: u64,
        limit: usize,
        max_bytes: u64,
        reply: Reply<Vec<Record>>,
    },
    Ack {
        channel: String,
        upto: u64,
        reply: Reply<u64>,
    },
    Expire {
        channel: String,
        cutoff_ms: i64,
        reply: Reply<u64>,
    },
    Backlog {
        channel: String,
        reply: Reply<Backlog>,
    },
    Compact {
        reply: Reply<u64>,
    },
    Delivered {
        channel: String,
        upto: u64,
        reply: Reply<()>,
    },
    Failed {
        channel: String,
        seq: u64,
        reason: String,
        reply: Reply<()>,
    },
    Spooled {
        channel: String,
        source: String,
        reply: Reply<Option<(u64, u64)>>,
    },
    ForgetSpooled {
        channel: String,
        present: std::collections::HashSet<String>,
        reply: Reply<u64>,
    },
    Receipts {
        channel: String,
        after: u64,
        limit: usize,
        reply: Reply<Vec<Receipt>>,
    },
}

/// The buffer thread; cheap to clone.
#[derive(Clone)]
pub struct BufferHandle {
    jobs: mpsc::Sender<Job>,
    signals: Arc<Signals>,
}

/// One wake-up per channel: set after records were committed to it.
#[derive(Default)]
struct Signals(Mutex<HashMap<String, Arc<Notify>>>);

impl Signals {
    fn get(&self, channel: &str) -> Arc<Notify> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(channel.to_owned())
            .or_default()
            .clone()
    }
}

/// The buffer could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The buffer could not be opened.
    #[error(transparent)]
    Buffer(#[from] BufferError),
    /// The thread could not be spawned.
    #[error("cannot start the buffer thread: {0}")]
    Thread(std::io::Error),
}

const GONE: &str = "the buffer thread stopped";

impl BufferHandle {
    /// Opens the buffer in `state_dir` and starts its thread.
    ///
    /// # Errors
    /// When the buffer cannot be opened.
    pub fn start(state_dir: &std::path::Path) -> Result<BufferHandle, StartError> {
        let buffer = Buffer::open(state_dir)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let signals = Arc::new(Signals::default());
        let sig = signals.clone();
        std::thread::Builder::new()
            .name("buffer".into())
            .spawn(move || run(buffer, &rx, &sig))
            .map_err(StartError::Thread)?;
        Ok(BufferHandle { jobs: tx, signals })
    }

    async fn ask<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, String> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(job(reply)).map_err(|_| GONE.to_owned())?;
        answer.await.map_err(|_| GONE.to_owned())?
    }

    /// Commits `records` durably; answers after the commit.
    ///
    /// # Errors
    /// The buffer's refusal (a full channel) or failure, as text.
    pub async fn append(
        &self,
        channel: &str,
        records: Vec<NewRecord>,
        quota: u64,
        when_full: WhenFull,
    ) -> Result<Appended, String> {
        self.append_by(channel, records, quota, when_full, None)
            .await
    }

    /// As [`BufferHandle::append`], remembering the authenticated producer
    /// for the receipts.
    ///
    /// # Errors
    /// As [`BufferHandle::append`].
    pub async fn append_by(
        &self,
        channel: &str,
        records: Vec<NewRecord>,
        quota: u64,
        when_full: WhenFull,
        producer: Option<String>,
    ) -> Result<Appended, String> {
        self.submit(channel, records, quota, when_full, None, producer)
            .await
    }

    /// As [`BufferHandle::append`], remembering in the same transaction that
    /// the records came from spool file `source` (see [`BufferHandle::spooled`]).
    ///
    /// # Errors
    /// As [`BufferHandle::append`].
    pub async fn append_from(
        &self,
        channel: &str,
        records: Vec<NewRecord>,
        quota: u64,
        when_full: WhenFull,
        source: Option<String>,
    ) -> Result<Appended, String> {
        self.submit(channel, records, quota, when_full, source, None)
            .await
    }

    /// Hands an append to the buffer thread and waits for its answer.
    async fn submit(
        &self,
        channel: &str,
        records: Vec<NewRecord>,
        quota: u64,
        when_full: WhenFull,
        source: Option<String>,
        producer: Option<String>,
    ) -> Result<Appended, String> {
        let channel = channel.to_owned();
        self.ask(|reply| {
            Job::Append(AppendJob {
                channel,
                records,
                quota,
                when_full,
                source,
                producer,
                reply,
            })
        })
        .await
    }

    /// The sequence numbers given to spool file `source`, if it was committed.
    ///
    /// # Errors
    /// When SQLite fails.
    pub async fn spooled(&self, channel: &str, source: &str) -> Result<Option<(u64, u64)>, String> {
        let (channel, source) = (channel.to_owned(), source.to_owned());
        self.ask(|reply| Job::Spooled {
            channel,
            source,
            reply,
        })
        .await
    }

    /// Forgets spool files of `channel` no longer in `in/` (see
    /// `gateway_store::buffer::Buffer::forget_spooled`).
    ///
    /// # Errors
    /// When the buffer thread is gone or SQLite fails.
    pub async fn forget_spooled(
        &self,
        channel: &str,
        present: std::collections::HashSet<String>,
    ) -> Result<u64, String> {
        let channel = channel.to_owned();
        self.ask(|reply| Job::ForgetSpooled {
            channel,
            present,
            reply,
        })
        .await
    }

    /// Records after `after`, at most `limit` of them and about `max_bytes` of
    /// bodies (always at least one).
    ///
    /// # Errors
    /// When SQLite fails.
    pub async fn read(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Vec<Record>, String> {
        let channel = channel.to_owned();
        self.ask(|reply| Job::Read {
            channel,
            after,
            limit,
            max_bytes,
            reply,
        })
        .await
    }

    /// Removes every record up to `upto` (delivered); returns how many.
    ///
    /// # Errors
    /// When SQLite fails.
    pub async fn ack(&self, channel: &str, upto: u64) -> Result<u64, String> {
        let channel = channel.to_owned();
        self.ask(|reply| Job::Ack {
            channel,
            upto,
            reply,
        })
        .await
    }

    /// Removes records accepted before `cutoff_ms`; returns how many.
    ///
    /// # Errors
    /// When SQLite fails.
    pub async fn expire(&self, channel: &str, cutoff_ms: i64) -> Result<u64, String> {
        let channel = channel.to_owned();
        self.ask(|reply| Job::Expire {
            channel,
            cutoff_ms,
            reply,
        })
        .await
    }

    /// The channel's backlog and counters.
    ///
    /// # Errors
    /// When SQLite fails.
    pub async fn backlog(&self, channel: &str) -> Result<Backlog, String> {
        let channel = channel.to_owned();
        self.ask(|reply| Job::Backlog { channel, reply }).await
    }

    /// The destination confirmed records up to `upto`.
    ///
    /// # Errors
    /// When SQLite fails.
    pub async fn delivered(&self, channel: &str, upto: u64) -> Result<(), String> {
        let channel = channel.to_owned();
        self.ask(|reply| Job::Delivered {
            channel,
            upto,
            reply,
        })
        .await
    }

    /// The destination refused record `seq`.
    ///
    /// # Errors
    /// When SQLite fails.
    pub async fn failed(&self, channel: &str, seq: u64, reason: String) -> Result<(), String> {
        let channel = channel.to_owned();
        self.ask(|reply| Job::Failed {
            channel,
            seq,
            reason,
            reply,
        })
        .await
    }

    /// Receipts of records after `after`, at most `limit`.
    ///
    /// # Errors
    /// When SQLite fails.
    pub async fn receipts(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Receipt>, String> {
        let channel = channel.to_owned();
        self.ask(|reply| Job::Receipts {
            channel,
            after,
            limit,
            reply,
        })
        .await
    }

    /// Checkpoints the WAL and returns free pages to the file system, so the
    /// file shrinks after a backlog drained.
    ///
    /// # Errors
    /// When SQLite fails.
    pub async fn compact(&self) -> Result<(), String> {
        // In steps of 16 MiB, so producers' commits get in between.
        while self.ask(|reply| Job::Compact { reply }).await? > 0 {}
        Ok(())
    }

    /// Signalled after records were committed to `channel`. The signal is kept
    /// until awaited, so none is lost between a read and the wait.
    pub fn committed(&self, channel: &str) -> Arc<Notify> {
        self.signals.get(channel)
    }
}

fn run(mut buffer: Buffer, rx: &mpsc::Receiver<Job>, signals: &Signals) {
    while let Ok(first) = rx.recv() {
        let mut appends = Vec::new();
        let mut others = Vec::new();
        for job in std::iter::once(first).chain(rx.try_iter().take(GROUP - 1)) {
            match job {
                Job::Append(a) => appends.push(a),
                other => others.push(other),
            }
        }
        if !appends.is_empty() {
            commit(&mut buffer, appends, signals);
        }
        for job in others {
            let e = |e: BufferError| e.to_string();
            match job {
                Job::Read {
                    channel,
                    after,
                    limit,
                    max_bytes,
                    reply,
                } => {
                    let _ = reply.send(
                        buffer
                            .read_upto(&channel, after, limit, max_bytes)
                            .map_err(e),
                    );
                }
                Job::Ack {
                    channel,
                    upto,
                    reply,
                } => {
                    let _ = reply.send(buffer.ack(&channel, upto).map_err(e));
                }
                Job::Expire {
                    channel,
                    cutoff_ms,
                    reply,
                } => {
                    let _ = reply.send(buffer.expire(&channel, cutoff_ms).map_err(e));
                }
                Job::Backlog { channel, reply } => {
                    let _ = reply.send(buffer.backlog(&channel).map_err(e));
                }
                Job::Delivered {
                    channel,
                    upto,
                    reply,
                } => {
                    let _ = reply.send(buffer.delivered(&channel, upto).map_err(e));
                }
                Job::Failed {
                    channel,
                    seq,
                    reason,
                    reply,
                } => {
                    let _ = reply.send(buffer.failed(&channel, seq, &reason, now_ms()).map_err(e));
                }
                Job::Spooled {
                    channel,
                    source,
                    reply,
                } => {
                    let _ = reply.send(buffer.spooled(&channel, &source).map_err(e));
                }
                Job::ForgetSpooled {
                    channel,
                    present,
                    reply,
                } => {
                    let _ = reply.send(buffer.forget_spooled(&channel, &present).map_err(e));
                }
                Job::Receipts {
                    channel,
                    after,
                    limit,
                    reply,
                } => {
                    let _ = reply.send(buffer.receipts(&channel, after, limit).map_err(e));
                }
                Job::Compact { reply } => {
                    let _ = reply.send(buffer.compact_step(4096).map_err(e));
                }
                Job::Append(_) => {}
            }
        }
    }
}

fn commit(buffer: &mut Buffer, jobs: Vec<AppendJob>, signals: &Signals) {
    let batches: Vec<Batch<'_>> = jobs
        .iter()
        .map(|j| Batch {
            channel: &j.channel,
            records: &j.records,
            quota: j.quota,
            when_full: j.when_full,
            source: j.source.as_deref(),
            producer: j.producer.as_deref(),
        })
        .collect();
    let results = buffer.append_group(&batches, now_ms());
    drop(batches);
    match results {
        Ok(results) => {
            let mut touched: Vec<&str> = Vec::new();
            for (j, r) in jobs.iter().zip(&results) {
                if r.is_ok() && !touched.contains(&j.channel.as_str()) {
                    touched.push(&j.channel);
                }
            }
            for channel in touched {
                signals.get(channel).notify_one();
            }
            for (j, r) in jobs.into_iter().zip(results) {
                let _ = j.reply.send(r.map_err(|e| e.to_string()));
            }
        }
        Err(e) => {
            error!(error = %e, jobs = jobs.len(), "Buffer commit failed; producers are told to retry");
            for j in jobs {
                let _ = j.reply.send(Err(format!("commit failed: {e}")));
            }
        }
    }
}
