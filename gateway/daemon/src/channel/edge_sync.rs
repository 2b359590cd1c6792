//! Channel sync: each edge channel streams its buffered records to a hub, which
//! commits them to its sink and acknowledges; the edge deletes only what was
//! acknowledged.
//!
//! One QUIC stream per channel (see `docs/protocol.md`, "Sync streams"):
//! `SyncOpen` -> `SyncReady { acked }` (what the sink already holds), then record
//! batches one way and `SyncAck { upto }` the other. Order holds because a
//! channel has one stream at a time and the hub commits batches in the order
//! they arrive; exactly-once holds because the sink ignores any sequence number
//! at or below the highest it committed for (device, channel), so a batch
//! resent after a lost ack or a crash is stored once.
//!
//! Batches are sized by the link: a batch that was full and acknowledged
//! within [`FAST_ACK`] doubles the next one (a backlog drains at link speed),
//! one acknowledged after [`SLOW_ACK`] halves it; up to [`WINDOW`] batches are in
//! flight.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_core::backoff::Backoff;
use gateway_core::config::{Channel, Destination};
use gateway_core::wire::{Batch, Frame, SyncRecord};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, error, info_span, warn};

use super::buffer::BufferHandle;
use crate::node::Ctx;
use crate::node::clock::now_ms;
use crate::node::limit::Limiter;
use crate::tunnel::frame::{read_frame, read_untimed, write_frame};
use crate::tunnel::hubs::Hubs;

/// The channels with batches in flight now, and their priorities: a channel
/// is starved only while a more urgent one is sending.
#[derive(Default)]
pub struct Sending(std::sync::Mutex<HashMap<String, u8>>);

impl Sending {
    fn set(&self, channel: &str, priority: u8, busy: bool) {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if busy {
            m.insert(channel.to_owned(), priority);
        } else {
            m.remove(channel);
        }
    }

    fn more_urgent_than(&self, priority: u8) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .any(|p| *p < priority)
    }
}

/// Batches in flight on one channel's stream.
pub const WINDOW: usize = 4;
/// Most records in a batch.
pub const MAX_RECORDS: usize = 4096;
/// Most body bytes in a batch (a single larger record still goes alone).
pub const MAX_BYTES: u64 = 4 * 1024 * 1024;
/// An ack this fast after a full batch doubles the batch size.
pub const FAST_ACK: Duration = Duration::from_millis(250);
/// An ack this slow halves it.
pub const SLOW_ACK: Duration = Duration::from_secs(2);
/// A batch unacknowledged this long is resent on a stream above all
/// priorities: the bound on how long a less urgent channel waits behind more
/// urgent ones (plus the time to send that batch).
pub const STARVE_AFTER: Duration = Duration::from_secs(2);
/// Stream priority of a lifted channel (channels use 0..=9).
const BOOSTED: i32 = 100;
/// Batch size a stream starts with.
const FIRST_BATCH: usize = 64;

/// Why a sync stream ended.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// No tunnel is up.
    #[error("no hub is connected")]
    NoHub,
    /// The stream failed.
    #[error("stream: {0}")]
    Stream(String),
    /// The hub refused the channel.
    #[error("hub refused the channel ({rule}): {message}")]
    Refused {
        /// Boundary rule or code.
        rule: String,
        /// Why.
        message: String,
    },
    /// The buffer failed.
    #[error("buffer: {0}")]
    Buffer(String),
    /// The node is draining.
    #[error("draining")]
    Draining,
    /// A batch waited longer than [`STARVE_AFTER`] behind more urgent channels.
    #[error("starved by more urgent channels")]
    Starved,
}

fn stream_err(e: impl std::fmt::Display) -> SyncError {
    SyncError::Stream(e.to_string())
}

/// Keeps `channel` syncing until draining: through whichever hub is up,
/// restarting from the first unacknowledged record after any failure.
pub async fn run_channel(
    ctx: Arc<Ctx>,
    hubs: Arc<Hubs>,
    buffer: BufferHandle,
    channel: Channel,
    sending: Arc<Sending>,
) {
    let span = info_span!("sync", channel = %channel.name);
    async move {
        let mut backoff = Backoff::default();
        let mut lift = false;
        loop {
            let up = hubs.came_up();
            let result = match hubs.any() {
                Some(conn) => {
                    let r = sync_stream(&ctx, &conn, &buffer, &channel, lift, &sending).await;
                    sending.set(&channel.name, channel.priority, false);
                    r
                }
                None => Err(SyncError::NoHub),
            };
            lift = false;
            match result {
                Err(SyncError::Draining) => return,
                Err(SyncError::Starved) => {
                    // Again at once, on a new stream above every priority.
                    lift = true;
                    continue;
                }
                Err(SyncError::NoHub) => {
                    // Wait for a tunnel; the timeout only guards a missed signal.
                    tokio::select! {
                        () = up => {}
                        () = tokio::time::sleep(Duration::from_secs(2)) => {}
                        () = ctx.draining.cancelled() => return,
                    }
                    continue;
                }
                Err(error) => {
                    if backoff.failures() < 3 || backoff.failures() % 30 == 0 {
                        warn!(%error, "Channel sync interrupted; resuming from the last acknowledged record");
                    } else {
                        debug!(%error, "Channel sync interrupted");
                    }
                }
                Ok(()) => backoff.reset(),
            }
            if !ctx.pause(backoff.next_delay(rand::random::<f64>())).await {
                return;
            }
        }
    }
    .instrument(span)
    .await;
}

/// Runs the edge's channels until draining: one sync task per configured
/// channel (started, stopped and restarted as reloads change the channels), and
/// every second TTL expiry, the backlog metrics, and compaction once a backlog
/// drained.
pub async fn supervise(ctx: Arc<Ctx>, hubs: Arc<Hubs>, buffer: BufferHandle) {
    let mut tasks: HashMap<String, (String, AbortOnDrop)> = HashMap::new();
    let sending = Arc::new(Sending::default());
    let mut had_backlog: HashMap<String, bool> = HashMap::new();
    // When no hub was reachable, for `ttl_pauses_offline`.
    let mut offline: Vec<(i64, i64)> = Vec::new();
    let mut offline_since: Option<i64> = None;
    let mut ticks: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = ctx.draining.cancelled() => return,
        }
        let policy = ctx.policy();
        let channels: Vec<Channel> = policy
            .config()
            .edge()
            .map(|e| e.channels.clone())
            .unwrap_or_default();
        tasks.retain(|name, _| channels.iter().any(|c| &c.name == name));
        let mut drained = false;
        let now = now_ms();
        match (hubs.any_up(), offline_since) {
            (false, None) => offline_since = Some(now),
            (true, Some(since)) => {
                offline.push((since, now));
                if offline.len() > 10_000 {
                    offline.remove(0);
                }
                offline_since = None;
            }
            _ => {}
        }
        let mut gaps = offline.clone();
        gaps.extend(offline_since.map(|s| (s, now)));
        for c in &channels {
            let shape = format!("{}|{}", c.deliver_to, c.priority);
            if tasks.get(&c.name).is_none_or(|(s, _)| *s != shape) {
                let task = tokio::spawn(run_channel(
                    ctx.clone(),
                    hubs.clone(),
                    buffer.clone(),
                    c.clone(),
                    sending.clone(),
                ));
                tasks.insert(c.name.clone(), (shape, AbortOnDrop(task)));
            }
            let ttl_ms = i64::try_from(c.ttl.as_millis()).unwrap_or(i64::MAX);
            let cutoff = gateway_core::expiry::cutoff(now, ttl_ms, &gaps, c.ttl_pauses_offline);
            match buffer.expire(&c.name, cutoff).await {
                Ok(0) => {}
                Ok(n) => {
                    warn!(channel = %c.name, records = n, ttl = ?c.ttl, "Records expired undelivered");
                    ctx.audit.record(
                        &c.name,
                        &c.name,
                        "channel.expire",
                        "ok",
                        "R6.retention",
                        format!("{n} records older than the channel's ttl removed undelivered"),
                    );
                }
                Err(error) => warn!(channel = %c.name, %error, "TTL expiry failed"),
            }
            if let Ok(b) = buffer.backlog(&c.name).await {
                let seen = ctx.metrics.channel(&c.name).dropped_corrupt;
                if b.corrupt > seen && had_backlog.contains_key(&c.name) {
                    error!(channel = %c.name, records = b.corrupt - seen, "Corrupt records quarantined (CRC mismatch); they will not be delivered");
                    ctx.audit.record(
                        &c.name,
                        &c.name,
                        "channel.corrupt",
                        "error",
                        "",
                        format!(
                            "{} records failed their CRC and were quarantined",
                            b.corrupt - seen
                        ),
                    );
                }
                ctx.metrics.channel_backlog(&c.name, &b, now);
                let before = had_backlog
                    .insert(c.name.clone(), b.records > 0)
                    .unwrap_or(false);
                drained |= before && b.records == 0;
            }
        }
        // After a drain, and every minute in case a reader kept the last
        // checkpoint from finishing.
        ticks += 1;
        if drained || ticks % 60 == 0 {
            if let Err(error) = buffer.compact().await {
                warn!(%error, "Buffer compaction failed");
            }
        }
    }
}

/// A batch sent and not yet acknowledged.
struct InFlight {
    last: u64,
    full: bool,
    sent: Instant,
}

async fn sync_stream(
    ctx: &Ctx,
    conn: &quinn::Connection,
    buffer: &BufferHandle,
    channel: &Channel,
    lift: bool,
    sending: &Sending,
) -> Result<(), SyncError> {
    let name = channel.name.as_str();
    let (mut send, mut recv) = conn.open_bi().await.map_err(stream_err)?;
    // Urgent channels (priority 0) are sent before less urgent ones when the
    // link is the bottleneck. quinn applies a new priority only when it next
    // sends from a stream, which a starved stream never does: so a batch
    // waiting longer than STARVE_AFTER ends the stream, and the channel resends
    // on a new one opened above every priority (`lift`), back to its own
    // priority once its first batch is through.
    let priority = 9 - i32::from(channel.priority);
    let _ = send.set_priority(if lift { BOOSTED } else { priority });
    let mut boosted = lift;
    write_frame(
        &mut send,
        &Frame::SyncOpen {
            channel: name.to_owned(),
            deliver_to: channel.deliver_to.to_string(),
        },
    )
    .await
    .map_err(stream_err)?;
    let acked = match read_frame(&mut recv).await.map_err(stream_err)? {
        Frame::SyncReady { acked } => acked,
        Frame::Refuse {
            code,
            rule,
            message,
        } => {
            return Err(SyncError::Refused {
                rule: if rule.is_empty() {
                    format!("{code:?}")
                } else {
                    rule
                },
                message,
            });
        }
        other => return Err(stream_err(format!("unexpected {other:?}"))),
    };
    // The sink already holds everything up to `acked` (an ack that was lost).
    let to_hub = channel.deliver_to == Destination::Hub;
    let mut done = acked;
    let n = buffer.ack(name, done).await.map_err(SyncError::Buffer)?;
    if to_hub {
        buffer
            .delivered(name, done)
            .await
            .map_err(SyncError::Buffer)?;
    }
    ctx.metrics.channel_acked(name, done, n);
    debug!(acked, "Sync stream open");
    let (ack_tx, mut acks) = mpsc::channel::<Result<Frame, String>>(64);
    let reader = tokio::spawn(async move {
        loop {
            let r = read_untimed(&mut recv).await;
            let ok = |f: &Frame| {
                matches!(
                    f,
                    Frame::SyncAck { .. } | Frame::SyncDelivered { .. } | Frame::SyncFailed { .. }
                )
            };
            let stop = !r.as_ref().is_ok_and(ok);
            let msg = match r {
                Ok(f) if ok(&f) => Ok(f),
                Ok(other) => Err(format!("unexpected {other:?}")),
                Err(e) => Err(e),
            };
            if ack_tx.send(msg).await.is_err() || stop {
                return;
            }
        }
    });
    let _reader = AbortOnDrop(reader);
    let committed = buffer.committed(name);
    let mut sent = done;
    let mut inflight: VecDeque<InFlight> = VecDeque::new();
    let mut size = FIRST_BATCH;
    let mut out = Vec::new();
    // A capped channel sends batches of at most a quarter second of its rate.
    let limiter = channel.bandwidth.map(Limiter::new);
    let max_bytes = channel
        .bandwidth
        .map_or(MAX_BYTES, |r| (r / 4).clamp(1, MAX_BYTES));
    loop {
        // Fill the window.
        while inflight.len() < WINDOW {
            let records = buffer
                .read(name, sent, size, max_bytes)
                .await
                .map_err(SyncError::Buffer)?;
            let Some(last) = records.last().map(|r| r.seq) else {
                break;
            };
            let full = records.len() >= size;
            let records: Vec<SyncRecord> = records.into_iter().map(SyncRecord::from).collect();
            out.clear();
            Batch::encode(&records, &mut out);
            if let Some(l) = &limiter {
                l.take(out.len()).await;
            }
            send.write_all(&out).await.map_err(stream_err)?;
            ctx.metrics
                .channel_sent(name, records.len() as u64, out.len() as u64);
            sent = last;
            inflight.push_back(InFlight {
                last,
                full,
                sent: Instant::now(),
            });
        }
        sending.set(name, channel.priority, !inflight.is_empty());
        let wake = committed.notified();
        let oldest = inflight.front().map(|b| b.sent);
        let starving = async {
            match oldest {
                Some(t) if !boosted => tokio::time::sleep_until((t + STARVE_AFTER).into()).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            () = starving, if sending.more_urgent_than(channel.priority) => {
                debug!(priority = channel.priority, "Batch starved by more urgent channels; resending it lifted");
                let _ = send.reset(quinn::VarInt::from_u32(0));
                return Err(SyncError::Starved);
            }
            ack = acks.recv() => {
                let upto = match ack {
                    Some(Ok(Frame::SyncAck { upto })) => upto,
                    Some(Ok(Frame::SyncFailed { seq, reason })) => {
                        // The destination refused it: the receipt says why.
                        warn!(seq, %reason, "The destination refused a record");
                        buffer.failed(name, seq, reason).await.map_err(SyncError::Buffer)?;
                        continue;
                    }
                    Some(Ok(Frame::SyncDelivered { upto })) => {
                        // The destination edge confirmed: receipts say delivered.
                        buffer.delivered(name, upto.min(done)).await.map_err(SyncError::Buffer)?;
                        continue;
                    }
                    Some(Ok(other)) => return Err(stream_err(format!("unexpected {other:?}"))),
                    Some(Err(e)) => return Err(SyncError::Stream(e)),
                    None => return Err(stream_err("ack reader ended")),
                };
                if upto <= done || upto > sent {
                    return Err(stream_err(format!("ack {upto} outside the window {done}..={sent}")));
                }
                let n = buffer.ack(name, upto).await.map_err(SyncError::Buffer)?;
                if to_hub {
                    // The hub's sink is the destination: committed is delivered.
                    buffer.delivered(name, upto).await.map_err(SyncError::Buffer)?;
                }
                done = upto;
                ctx.metrics.channel_acked(name, done, n);
                while inflight.front().is_some_and(|b| b.last <= upto) {
                    let Some(b) = inflight.pop_front() else { break };
                    let took = b.sent.elapsed();
                    if b.full && took < FAST_ACK {
                        size = (size * 2).min(MAX_RECORDS);
                    } else if took > SLOW_ACK {
                        size = (size / 2).max(1);
                    }
                }
                if boosted {
                    let _ = send.set_priority(priority);
                    boosted = false;
                }
            }
            () = wake, if inflight.len() < WINDOW => {}
            () = ctx.draining.cancelled() => {
                let _ = send.finish();
                return Err(SyncError::Draining);
            }
        }
    }
}

/// Aborts a task when dropped (the ack reader outlives no stream).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
