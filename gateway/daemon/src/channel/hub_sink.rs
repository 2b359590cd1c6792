//! The hub's half of channel sync: it commits each edge's batches to its sink
//! (the `gateway_store::sink::Sink` trait, whichever engine holds it) and
//! acknowledges them, and for channels delivered to
//! another department (`deliver_to = "DEVICE/CHANNEL"`) forwards them from the
//! sink to that edge and reports the deliveries back to the source.
//!
//! Forwarding runs one task per (source device, channel): it opens a stream to
//! the destination edge with `Deliver{from, channel}`, resumes after the mark
//! the destination answers, sends batches read from the sink one at a time,
//! and on each ack removes them from the sink (`consumed`) and tells the
//! source's sync stream (`SyncDelivered`). Records wait in the sink while the
//! destination is offline, and survive hub restarts there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway_core::backoff::Backoff;
use gateway_core::policy::Crossing;
use gateway_core::wire::{Batch, Frame, RefuseCode, SyncRecord};
use gateway_store::sink::{Committed, Sink, SinkBatch, StreamKey};
use tokio::sync::{Notify, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::node::Ctx;
use crate::node::clock::now_ms;
use crate::tunnel::devices::Devices;
use crate::tunnel::frame::{read_batch, read_frame, refuse, write_frame};

/// Records per forwarded batch.
const FORWARD_BATCH: usize = 1000;

/// A forwarding task's handles.
#[derive(Clone)]
struct Forwarder {
    /// Signalled after new records of the stream were committed.
    wake: Arc<Notify>,
    /// Highest sequence number the destination confirmed.
    delivered: watch::Receiver<u64>,
}

/// The hub's sink, shared by every sync stream and the consumers' API, and
/// the forwarding tasks of channels delivered to other edges.
#[derive(Clone)]
pub struct SinkHandle {
    sink: Arc<dyn Sink>,
    forwarders: Arc<Mutex<HashMap<(String, String), Forwarder>>>,
}

impl SinkHandle {
    /// Wraps an open sink.
    pub fn new(sink: Arc<dyn Sink>) -> Self {
        SinkHandle {
            sink,
            forwarders: Arc::default(),
        }
    }

    /// The sink's engine.
    pub fn store(&self) -> &dyn Sink {
        &*self.sink
    }

    /// The forwarder of (device, channel) to `dest` (`DEVICE/CHANNEL`),
    /// started on first use.
    fn forwarder(
        &self,
        ctx: &Arc<Ctx>,
        devices: &Arc<Devices>,
        device: &str,
        channel: &str,
        dest: &str,
    ) -> Forwarder {
        let mut map = self
            .forwarders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (device.to_owned(), channel.to_owned());
        if let Some(f) = map.get(&key) {
            return f.clone();
        }
        let (tx, rx) = watch::channel(0);
        let f = Forwarder {
            wake: Arc::new(Notify::new()),
            delivered: rx,
        };
        map.insert(key, f.clone());
        tokio::spawn(forward(
            ctx.clone(),
            devices.clone(),
            self.clone(),
            (device.to_owned(), channel.to_owned(), dest.to_owned()),
            f.wake.clone(),
            tx,
        ));
        f
    }

    /// Starts forwarding every stream with records waiting for another edge
    /// (after a hub restart).
    pub async fn resume_forwarding(&self, ctx: &Arc<Ctx>, devices: &Arc<Devices>) {
        match self.sink.streams().await {
            Ok(streams) => {
                for s in streams
                    .iter()
                    .filter(|s| s.deliver_to != "hub" && s.records > 0)
                {
                    self.forwarder(ctx, devices, &s.device, &s.channel, &s.deliver_to);
                }
            }
            Err(error) => warn!(%error, "Cannot read the sink to resume forwarding"),
        }
    }
}

/// Whether `device` may deliver to `deliver_to`: the hub's own sink, or another
/// edge the boundary policy lets it reach.
fn check_destination(ctx: &Ctx, device: &str, deliver_to: &str) -> Result<(), (String, String)> {
    if deliver_to == "hub" {
        return Ok(());
    }
    let Some((dest, _)) = deliver_to.split_once('/') else {
        return Err((
            "no-route".into(),
            format!("{deliver_to:?} is neither \"hub\" nor DEVICE/CHANNEL"),
        ));
    };
    let decision = ctx.policy().decide(
        &Crossing::Transit {
            from: device,
            to: dest,
        },
        ctx.today(),
    );
    if decision.is_allowed() {
        Ok(())
    } else {
        Err((decision.rule.as_str().to_owned(), decision.reason))
    }
}

/// Hub side of a sync stream opened by `device` (after its `SyncOpen`).
pub async fn serve_sync(
    ctx: Arc<Ctx>,
    sink: SinkHandle,
    devices: Arc<Devices>,
    device: String,
    (channel, deliver_to): (String, String),
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let span = info_span!("sync", %device, %channel);
    async move {
        if let Err((rule, message)) = check_destination(&ctx, &device, &deliver_to) {
            ctx.refuse("channel.refuse", &device, &channel, &rule, &message);
            let code = if rule == "no-route" {
                RefuseCode::NoRoute
            } else {
                RefuseCode::Policy
            };
            let rule = if rule == "no-route" {
                String::new()
            } else {
                rule
            };
            refuse(&mut send, code, &rule, message).await;
            return;
        }
        let high = match sink.store().high(StreamKey::new(&device, &channel)).await {
            Ok(h) => h,
            Err(error) => {
                warn!(%error, "Sink unavailable; refusing the sync stream");
                return;
            }
        };
        if write_frame(&mut send, &Frame::SyncReady { acked: high })
            .await
            .is_err()
        {
            return;
        }
        let mut forwarder = (deliver_to != "hub")
            .then(|| sink.forwarder(&ctx, &devices, &device, &channel, &deliver_to));
        let mut told = 0;
        let mut last = high;
        loop {
            // Deliveries confirmed since the last word to the source.
            if let Some(f) = &forwarder {
                let upto = *f.delivered.borrow();
                if upto > told {
                    let failures = sink
                        .store()
                        .failures(StreamKey::new(&device, &channel), told, upto)
                        .await
                        .unwrap_or_default();
                    for (seq, reason) in failures {
                        if write_frame(&mut send, &Frame::SyncFailed { seq, reason })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    told = upto;
                    if write_frame(&mut send, &Frame::SyncDelivered { upto })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            let delivered_changed = async {
                match forwarder.as_mut() {
                    Some(f) => {
                        if f.delivered.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let next = tokio::select! {
                r = read_batch(&mut recv) => r,
                () = delivered_changed => continue,
                // Unacknowledged batches are resent to whichever hub is up.
                () = ctx.draining.cancelled() => {
                    let _ = send.finish();
                    return;
                }
            };
            let records = match next {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(error) => {
                    debug!(%error, "Sync stream ended");
                    return;
                }
            };
            // Order: a batch starts above what this stream already sent.
            if records.first().is_some_and(|r| r.seq <= last) {
                warn!(last, "Edge sent records out of order; closing the stream");
                let _ = send.reset(quinn::VarInt::from_u32(u32::from(
                    RefuseCode::Protocol.number(),
                )));
                return;
            }
            if let Some(r) = records.last() {
                last = r.seq;
            }
            let n = records.len() as u64;
            let batch = SinkBatch {
                device: device.clone(),
                channel: channel.clone(),
                deliver_to: deliver_to.clone(),
                records,
                now_ms: now_ms(),
            };
            let committed: Committed = match sink.store().commit(vec![batch]).await {
                Ok(c) if c.len() == 1 => c[0],
                Ok(_) => {
                    warn!(
                        "Sink commit answered for another number of batches; the edge will resend"
                    );
                    let _ = send.reset(quinn::VarInt::from_u32(0));
                    return;
                }
                Err(error) => {
                    warn!(%error, "Sink commit failed; the edge will resend");
                    let _ = send.reset(quinn::VarInt::from_u32(0));
                    return;
                }
            };
            ctx.metrics
                .sink_committed(&device, &channel, committed.stored, committed.duplicates);
            if committed.duplicates > 0 {
                info!(
                    duplicates = committed.duplicates,
                    of = n,
                    "Duplicates ignored"
                );
            }
            if let Some(f) = &forwarder {
                f.wake.notify_one();
            }
            if write_frame(
                &mut send,
                &Frame::SyncAck {
                    upto: committed.upto,
                },
            )
            .await
            .is_err()
            {
                return;
            }
        }
    }
    .instrument(span)
    .await;
}

/// Forwards (device, channel)'s records from the sink to `dest` until draining.
async fn forward(
    ctx: Arc<Ctx>,
    devices: Arc<Devices>,
    sink: SinkHandle,
    (device, channel, dest): (String, String, String),
    wake: Arc<Notify>,
    delivered: watch::Sender<u64>,
) {
    let span = info_span!("forward", from = %format!("{device}/{channel}"), to = %dest);
    async move {
        let Some((dest_device, dest_channel)) = dest.split_once('/') else {
            return;
        };
        let mut backoff = Backoff::default();
        loop {
            let result = match devices.get(dest_device) {
                Some(conn) => {
                    forward_stream(
                        &ctx,
                        &sink,
                        &conn,
                        (&device, &channel, dest_channel),
                        &wake,
                        &delivered,
                    )
                    .await
                }
                None => Err(format!(
                    "{dest_device} is not connected; records wait in the sink"
                )),
            };
            if let Err(error) = result {
                if backoff.failures() < 3 || backoff.failures() % 30 == 0 {
                    info!(%error, "Forwarding paused");
                }
            }
            if !ctx.pause(backoff.next_delay(rand::random::<f64>())).await {
                return;
            }
        }
    }
    .instrument(span)
    .await;
}

async fn forward_stream(
    ctx: &Ctx,
    sink: &SinkHandle,
    conn: &quinn::Connection,
    (device, channel, dest_channel): (&str, &str, &str),
    wake: &Notify,
    delivered: &watch::Sender<u64>,
) -> Result<(), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(
        &mut send,
        &Frame::Deliver {
            from: format!("{device}/{channel}"),
            channel: dest_channel.to_owned(),
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut acked = match read_frame(&mut recv).await.map_err(|e| e.to_string())? {
        Frame::SyncReady { acked } => acked,
        Frame::Refuse { message, .. } => return Err(format!("destination refused: {message}")),
        other => return Err(format!("unexpected {other:?}")),
    };
    let mut out = Vec::new();
    let mut consumed = None;
    loop {
        if consumed != Some(acked) {
            // What the destination has leaves the sink; the source hears of it.
            sink.store()
                .consume(StreamKey::new(device, channel), acked)
                .await
                .map_err(|e| e.to_string())?;
            consumed = Some(acked);
            delivered.send_if_modified(|v| {
                let more = acked > *v;
                *v = (*v).max(acked);
                more
            });
        }
        let records = sink
            .store()
            .read(StreamKey::new(device, channel), acked, FORWARD_BATCH)
            .await
            .map_err(|e| e.to_string())?;
        if records.is_empty() {
            let woken = wake.notified();
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
                () = ctx.draining.cancelled() => return Ok(()),
            }
            continue;
        }
        let records: Vec<SyncRecord> = records.into_iter().map(SyncRecord::from).collect();
        out.clear();
        Batch::encode(&records, &mut out);
        tokio::io::AsyncWriteExt::write_all(&mut send, &out)
            .await
            .map_err(|e| e.to_string())?;
        // Refused records first (kept for the source's receipts), then the ack.
        acked = loop {
            match read_frame(&mut recv).await.map_err(|e| e.to_string())? {
                Frame::SyncFailed { seq, reason } => {
                    sink.store()
                        .failed(StreamKey::new(device, channel), seq, reason)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Frame::SyncAck { upto } => break upto,
                other => return Err(format!("unexpected {other:?}")),
            }
        };
    }
}

/// The sink's upkeep until draining: forwarding resumed for every stream with
/// records waiting for another edge (after a hub restart), then every 10 s the
/// pages of consumed records returned to the file system.
pub async fn maintain(sink: SinkHandle, ctx: Arc<Ctx>, devices: Arc<Devices>) {
    sink.resume_forwarding(&ctx, &devices).await;
    while ctx.pause(Duration::from_secs(10)).await {
        if let Err(error) = sink.store().maintain().await {
            warn!(%error, "Sink compaction failed");
        }
    }
}

/// How often retention looks for expired records: a quarter of the retention,
/// between 1 s and a minute.
fn expiry_period(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Drops records older than `retention` that not every consumer took
/// (`[hub].sink_retention`): counted per stream (`expired_unread`, in the
/// stream's status and the metrics) and audited, one record per stream and
/// sweep.
pub async fn expire_loop(sink: SinkHandle, ctx: Arc<Ctx>, retention: Duration) {
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX / 2);
    loop {
        match sink.store().expire(now_ms() - retention_ms).await {
            Ok(expired) => {
                for e in expired {
                    let (device, channel) = (&e.stream.device, &e.stream.channel);
                    warn!(%device, %channel, records = e.records, "Retention dropped records no consumer had taken");
                    ctx.metrics.sink_expired(device, channel, e.records);
                    ctx.audit.record(
                        &ctx.id,
                        &format!("{device}/{channel}"),
                        "sink.expire",
                        "drop",
                        "sink-retention",
                        format!(
                            "seq {}-{}, {} records, {} bytes older than {} s, unread",
                            e.first,
                            e.last,
                            e.records,
                            e.bytes,
                            retention.as_secs()
                        ),
                    );
                }
            }
            Err(error) => warn!(%error, "Sink retention failed; trying again"),
        }
        if !ctx.pause(expiry_period(retention)).await {
            return;
        }
    }
}
