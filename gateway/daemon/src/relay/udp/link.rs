//! The signalling of a tunnel connection's UDP flows: every flow one side
//! opens on a connection is asked for, answered and ended on one stream that
//! side opened (first frame `UdpFlows`), never on a stream of its own. A QUIC
//! peer keeps receive state for every stream it lets the other side have open,
//! and keeps it after they close: with a stream per flow, a flood of client
//! ports left thousands of those behind on both ends.
//!
//! Each side of a flow holds a [`FlowSignal`]: it resolves when the far side
//! ends the flow (or the stream or connection goes), and dropping it tells
//! the far side the flow is gone. The opener's side comes from
//! [`Openers::open`]; the other side's from [`serve`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use gateway_core::wire::{Frame, Origin, RefuseCode};
use tokio::sync::{OnceCell, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::tunnel::frame::{HANDSHAKE_TIMEOUT, read_frame, read_untimed, write_frame};

/// Flows one signalling stream carries at once; an `OpenUdp` beyond it is
/// refused (the fronts' own caps are lower: this bounds a hostile peer).
pub const MAX_LINK_FLOWS: usize = 16_384;

/// Frames queued for the stream. Each flow queues at most two (its open or
/// answer, and its end), so a full queue means the peer stopped reading: the
/// stream is then given up and its flows end.
const QUEUE: usize = 2 * MAX_LINK_FLOWS;

/// One signalling stream, either side: what to write, and its flows.
struct Line {
    out: mpsc::Sender<Frame>,
    flows: Mutex<HashMap<u32, Slot>>,
    /// The stream or its connection is gone: every flow on it has ended.
    gone: CancellationToken,
}

/// A flow on a line.
struct Slot {
    /// The opener's wait for the answer.
    answer: Option<oneshot::Sender<Frame>>,
    /// The far side ended the flow.
    ended: CancellationToken,
}

impl Line {
    fn new() -> (Arc<Self>, mpsc::Receiver<Frame>) {
        let (out, rx) = mpsc::channel(QUEUE);
        let line = Self {
            out,
            flows: Mutex::new(HashMap::new()),
            gone: CancellationToken::new(),
        };
        (Arc::new(line), rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Slot>> {
        self.flows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a frame; a peer that stopped reading loses the stream.
    fn send(&self, f: Frame) {
        if self.out.try_send(f).is_err() {
            self.gone.cancel();
        }
    }

    /// The far side ended `flow`.
    fn far_end(&self, flow: u32) {
        let slot = {
            let mut m = self.lock();
            let slot = m.remove(&flow);
            gateway_core::table::shrink(&mut m);
            slot
        };
        if let Some(slot) = slot {
            slot.ended.cancel();
        }
    }

    /// The stream is gone: every flow on it ends.
    fn close(&self) {
        self.gone.cancel();
        let slots: Vec<Slot> = self.lock().drain().map(|(_, s)| s).collect();
        for s in slots {
            s.ended.cancel();
        }
    }
}

/// Writes the line's frames until it is gone.
async fn write_loop(mut send: quinn::SendStream, mut rx: mpsc::Receiver<Frame>, line: Arc<Line>) {
    loop {
        let f = tokio::select! {
            f = rx.recv() => f,
            () = line.gone.cancelled() => None,
        };
        let Some(f) = f else { break };
        if write_frame(&mut send, &f).await.is_err() {
            break;
        }
    }
    line.close();
    let _ = send.finish();
}

/// Reads a line's frames until the stream ends or the peer breaks the
/// protocol; then every flow on it ends. `FlowEnd` is handled here, any other
/// frame by `each`, which gives back a frame this side does not take.
async fn read_loop(
    line: &Line,
    mut recv: quinn::RecvStream,
    mut each: impl FnMut(Frame) -> Option<Frame>,
) {
    loop {
        let f = tokio::select! {
            f = read_untimed(&mut recv) => f,
            () = line.gone.cancelled() => break,
        };
        match f {
            Ok(Frame::FlowEnd { flow }) => line.far_end(flow),
            Ok(f) => {
                if let Some(other) = each(f) {
                    debug!(?other, "Unexpected frame on a UDP flow stream; closed");
                    break;
                }
            }
            Err(error) => {
                debug!(%error, "UDP flow stream ended");
                break;
            }
        }
    }
    line.close();
}

/// One side's hold on a flow: resolves when the far side ends it, and ends it
/// for the far side when dropped.
pub struct FlowSignal {
    line: Arc<Line>,
    flow: u32,
    ended: CancellationToken,
    /// Nothing to tell the far side on drop (it was refused).
    quiet: AtomicBool,
}

impl FlowSignal {
    /// Resolves once the far side ended the flow, or the stream went.
    pub async fn ended(&self) {
        tokio::select! {
            () = self.ended.cancelled() => {}
            () = self.line.gone.cancelled() => {}
        }
    }

    /// The flow's acceptor: the flow is open.
    pub fn opened(&self) {
        self.line.send(Frame::FlowOpened { flow: self.flow });
    }

    /// The flow's acceptor: the flow is refused (and nothing else is said).
    pub fn refuse(self, code: RefuseCode, rule: &str, message: String) {
        self.quiet.store(true, Ordering::Relaxed);
        self.line.send(Frame::FlowRefused {
            flow: self.flow,
            code,
            rule: rule.to_owned(),
            message,
        });
    }
}

impl Drop for FlowSignal {
    fn drop(&mut self) {
        let mine = {
            let mut m = self.line.lock();
            let mine = m.remove(&self.flow).is_some();
            gateway_core::table::shrink(&mut m);
            mine
        };
        if mine && !self.quiet.load(Ordering::Relaxed) && !self.line.gone.is_cancelled() {
            self.line.send(Frame::FlowEnd { flow: self.flow });
        }
    }
}

/// What an `OpenUdp` asked for.
pub struct FlowRequest {
    /// As in the frame.
    pub service: String,
    /// Who asks.
    pub origin: Origin,
    /// The client's address.
    pub client: SocketAddr,
    /// The flow id its opener chose.
    pub flow: u32,
}

/// Serves a `UdpFlows` stream the peer opened (its first frame read): each
/// `OpenUdp` goes to `open` with the flow's signal, which must answer it
/// ([`FlowSignal::opened`] or [`FlowSignal::refuse`]). Returns when the stream
/// or the connection ends; every flow on it then ends.
pub async fn serve(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    open: impl Fn(FlowRequest, FlowSignal),
) {
    if write_frame(&mut send, &Frame::Opened).await.is_err() {
        return;
    }
    let (line, rx) = Line::new();
    tokio::spawn(write_loop(send, rx, line.clone()));
    read_loop(&line, recv, |f| {
        let Frame::OpenUdp {
            service,
            origin,
            client,
            flow,
        } = f
        else {
            return Some(f);
        };
        let ended = CancellationToken::new();
        let refusal = {
            let mut m = line.lock();
            if m.contains_key(&flow) {
                Some((RefuseCode::Protocol, format!("flow {flow} is already open")))
            } else if m.len() >= MAX_LINK_FLOWS {
                Some((
                    RefuseCode::Limit,
                    format!("{MAX_LINK_FLOWS} UDP flows open on this tunnel"),
                ))
            } else {
                m.insert(
                    flow,
                    Slot {
                        answer: None,
                        ended: ended.clone(),
                    },
                );
                None
            }
        };
        if let Some((code, message)) = refusal {
            line.send(Frame::FlowRefused {
                flow,
                code,
                rule: String::new(),
                message,
            });
            return None;
        }
        let signal = FlowSignal {
            line: line.clone(),
            flow,
            ended,
            quiet: AtomicBool::new(false),
        };
        let request = FlowRequest {
            service,
            origin,
            client,
            flow,
        };
        open(request, signal);
        None
    })
    .await;
}

/// Signalling streams by connection; a cell is filled once the stream is open.
type ByConn = Mutex<HashMap<usize, Arc<OnceCell<Arc<Line>>>>>;

/// The signalling streams this node opened, one per connection, started by
/// the first flow it opens there.
#[derive(Default)]
pub struct Openers {
    by_conn: Arc<ByConn>,
}

/// A refusal, as the flow's far side (or this side, for a tunnel that failed) gave it.
pub fn refusal(code: RefuseCode, message: String) -> Frame {
    Frame::Refuse {
        code,
        rule: String::new(),
        message,
    }
}

impl Openers {
    /// Opens `flow` on `conn` with `open` (an `OpenUdp` frame carrying that
    /// flow id) and waits for the answer (at most the handshake timeout).
    ///
    /// # Errors
    /// The refusal, as a `Refuse` frame: the far side's, or this side's when
    /// the tunnel failed or did not answer.
    pub async fn open(
        &self,
        conn: &quinn::Connection,
        open: Frame,
        flow: u32,
    ) -> Result<FlowSignal, Frame> {
        let line = self.line(conn).await.map_err(|message| {
            refusal(
                RefuseCode::Unreachable,
                format!("cannot signal UDP flows on the tunnel: {message}"),
            )
        })?;
        let (tx, rx) = oneshot::channel();
        let ended = CancellationToken::new();
        {
            let mut m = line.lock();
            if m.contains_key(&flow) {
                return Err(refusal(
                    RefuseCode::Protocol,
                    format!("flow {flow} is already open"),
                ));
            }
            if m.len() >= MAX_LINK_FLOWS {
                return Err(refusal(
                    RefuseCode::Limit,
                    format!("{MAX_LINK_FLOWS} UDP flows open on this tunnel"),
                ));
            }
            m.insert(
                flow,
                Slot {
                    answer: Some(tx),
                    ended: ended.clone(),
                },
            );
        }
        let signal = FlowSignal {
            line: line.clone(),
            flow,
            ended,
            quiet: AtomicBool::new(false),
        };
        line.send(open);
        let answer = tokio::select! {
            a = tokio::time::timeout(HANDSHAKE_TIMEOUT, rx) => match a {
                Ok(Ok(a)) => a,
                Ok(Err(_)) => refusal(RefuseCode::Unreachable, "the tunnel went".into()),
                Err(_) => refusal(RefuseCode::Unreachable, "the far side did not answer".into()),
            },
            () = line.gone.cancelled() => refusal(RefuseCode::Unreachable, "the tunnel went".into()),
        };
        match answer {
            Frame::Opened => Ok(signal),
            refused => {
                // A flow the far side refused is gone there already; one that
                // was not answered is ended, in case it opens later.
                let answered = matches!(refused, Frame::Refuse { code, .. } if code != RefuseCode::Unreachable);
                signal.quiet.store(answered, Ordering::Relaxed);
                Err(refused)
            }
        }
    }

    /// The connection's signalling stream, opened if it is not (or went).
    async fn line(&self, conn: &quinn::Connection) -> Result<Arc<Line>, String> {
        let id = conn.stable_id();
        for _ in 0..2 {
            let cell = self.lock().entry(id).or_default().clone();
            let line = cell
                .get_or_try_init(|| start(conn.clone(), self.by_conn.clone()))
                .await?
                .clone();
            if !line.gone.is_cancelled() {
                return Ok(line);
            }
            // It went: forget it (unless another flow already replaced it).
            let mut m = self.lock();
            if m.get(&id).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                m.remove(&id);
            }
        }
        Err("the stream keeps closing".into())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Arc<OnceCell<Arc<Line>>>>> {
        lock_map(&self.by_conn)
    }
}

fn lock_map(m: &ByConn) -> std::sync::MutexGuard<'_, HashMap<usize, Arc<OnceCell<Arc<Line>>>>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Opens a signalling stream on `conn`; it is forgotten from `by_conn` when it
/// goes.
async fn start(conn: quinn::Connection, by_conn: Arc<ByConn>) -> Result<Arc<Line>, String> {
    let (mut send, mut recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.open_bi())
        .await
        .map_err(|_| "no stream credit from the far side".to_owned())?
        .map_err(|e| e.to_string())?;
    write_frame(&mut send, &Frame::UdpFlows)
        .await
        .map_err(|e| e.to_string())?;
    match read_frame(&mut recv).await {
        Ok(Frame::Opened) => {}
        Ok(Frame::Refuse { message, .. }) => {
            return Err(format!(
                "the far side refused (an older build that opens a stream per flow?): {message}"
            ));
        }
        Ok(other) => return Err(format!("unexpected answer {other:?}")),
        Err(e) => return Err(e.to_string()),
    }
    let (line, rx) = Line::new();
    tokio::spawn(write_loop(send, rx, line.clone()));
    let reader = line.clone();
    let id = conn.stable_id();
    tokio::spawn(async move {
        read_loop(&reader, recv, |f| {
            match f {
                Frame::FlowOpened { flow } => {
                    let answer = reader.lock().get_mut(&flow).and_then(|s| s.answer.take());
                    if let Some(a) = answer {
                        let _ = a.send(Frame::Opened);
                    }
                }
                Frame::FlowRefused {
                    flow,
                    code,
                    rule,
                    message,
                } => {
                    let slot = reader.lock().remove(&flow);
                    if let Some(a) = slot.and_then(|mut s| s.answer.take()) {
                        let _ = a.send(Frame::Refuse {
                            code,
                            rule,
                            message,
                        });
                    }
                }
                other => return Some(other),
            }
            None
        })
        .await;
        let mut m = lock_map(&by_conn);
        if m.get(&id)
            .and_then(|c| c.get())
            .is_some_and(|l| Arc::ptr_eq(l, &reader))
        {
            m.remove(&id);
        }
    });
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::tls;
    use std::sync::atomic::AtomicUsize;

    /// A real QUIC connection on loopback: (the dialer's side, the
    /// listener's side, the listener's endpoint).
    async fn pair() -> (quinn::Connection, quinn::Connection, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, client) = tls::test_pair(dir.path(), "127.0.0.1");
        let listener =
            quinn::Endpoint::server(server, ([127, 0, 0, 1], 0).into()).expect("listener");
        let mut dialer = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).expect("dialer");
        dialer.set_default_client_config(client);
        let to = listener.local_addr().expect("addr");
        let (dialed, accepted) = tokio::join!(
            async { dialer.connect(to, "127.0.0.1").expect("connect").await },
            async { listener.accept().await.expect("incoming").await },
        );
        (dialed.expect("dialed"), accepted.expect("accepted"), dir)
    }

    fn open_frame(flow: u32) -> Frame {
        Frame::OpenUdp {
            service: "echo".into(),
            origin: Origin::Provincial,
            client: ([127, 0, 0, 9], 4000).into(),
            flow,
        }
    }

    /// The far side: serves every `UdpFlows` stream, opening even flows and
    /// refusing odd ones; hands the open flows' signals to `kept`; counts the
    /// streams it was asked to accept.
    fn far_side(
        conn: quinn::Connection,
    ) -> (Arc<AtomicUsize>, mpsc::UnboundedReceiver<FlowSignal>) {
        let streams = Arc::new(AtomicUsize::new(0));
        let (kept, rx) = mpsc::unbounded_channel();
        let counted = streams.clone();
        tokio::spawn(async move {
            while let Ok((send, mut recv)) = conn.accept_bi().await {
                counted.fetch_add(1, Ordering::SeqCst);
                assert_eq!(read_frame(&mut recv).await.ok(), Some(Frame::UdpFlows));
                let kept = kept.clone();
                tokio::spawn(serve(send, recv, move |r, signal| {
                    if r.flow % 2 == 0 {
                        signal.opened();
                        let _ = kept.send(signal);
                    } else {
                        signal.refuse(RefuseCode::Policy, "R1.test", format!("odd {}", r.flow));
                    }
                }));
            }
        });
        (streams, rx)
    }

    #[tokio::test]
    async fn many_flows_share_one_stream_and_each_end_reaches_the_other_side() {
        let (dialed, accepted, _dir) = pair().await;
        let (streams, mut kept) = far_side(accepted);
        let openers = Openers::default();
        let mut open = Vec::new();
        for flow in 0..400u32 {
            match openers.open(&dialed, open_frame(flow), flow).await {
                Ok(s) => open.push(s),
                Err(Frame::Refuse {
                    code,
                    rule,
                    message,
                }) => {
                    assert_eq!((code, rule.as_str()), (RefuseCode::Policy, "R1.test"));
                    assert_eq!(message, format!("odd {flow}"));
                }
                Err(other) => panic!("{other:?}"),
            }
        }
        assert_eq!(open.len(), 200, "the even flows opened, the odd refused");
        assert_eq!(streams.load(Ordering::SeqCst), 1, "400 flows, one stream");
        let mut far: Vec<FlowSignal> = Vec::new();
        for _ in 0..200 {
            far.push(kept.recv().await.expect("a kept flow"));
        }
        // The far side ends flow 0: only this side's flow 0 hears it.
        drop(far.remove(0));
        let first = open.remove(0);
        tokio::time::timeout(HANDSHAKE_TIMEOUT, first.ended())
            .await
            .expect("the far side's end arrives");
        for s in &open {
            assert!(!s.ended.is_cancelled(), "flow {} ended too", s.flow);
        }
        // This side ends flow 2: the far side's flow 2 hears it.
        drop(open.remove(0));
        let far2 = far.remove(0);
        assert_eq!(far2.flow, 2);
        tokio::time::timeout(HANDSHAKE_TIMEOUT, far2.ended())
            .await
            .expect("this side's end arrives");
        // An id already open on the stream is refused, the open one kept.
        match openers.open(&dialed, open_frame(4), 4).await {
            Err(Frame::Refuse { code, .. }) => assert_eq!(code, RefuseCode::Protocol),
            other => panic!("a second flow 4: {:?}", other.map(|s| s.flow)),
        }
        assert!(!far[0].ended.is_cancelled() && far[0].flow == 4);
        // The connection goes: every flow on both sides ends.
        dialed.close(0u32.into(), b"bye");
        for s in open.iter().chain(far.iter()) {
            tokio::time::timeout(HANDSHAKE_TIMEOUT, s.ended())
                .await
                .expect("the connection's end ends the flow");
        }
    }
}
