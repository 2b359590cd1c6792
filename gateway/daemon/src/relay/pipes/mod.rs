//! Relays moved by a lane's own task (issue 21): each pipe joins one QUIC
//! stream of a [`Lane`] connection with one TCP socket, and the task that
//! drives the lane moves their bytes itself. No task per relay and no
//! hand-off to quinn's driver tasks: a request crosses one task per side.
//!
//! The same rules as [`super::splice`]: when one side ends its data (TCP EOF,
//! QUIC FIN) the other side is closed for writing and the other direction
//! goes on (half-close); when one side fails (a TCP error, a stream reset or
//! stop, the connection lost) the other is reset and the pipe ends at once.
//!
//! Scale: each TCP socket wakes the lane's task with a waker naming its pipe,
//! so a lane with thousands of relays drives only the pipes whose socket or
//! stream moved. Bytes in flight are bounded per pipe: at most
//! [`MAX_TO_TCP`] read from the stream and not yet taken by the TCP socket
//! (past it the stream is not read, and QUIC's flow control holds the peer),
//! and one TCP read not yet taken by the stream (past it the socket is not
//! read, and TCP's window holds the client).

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use bytes::{Buf, Bytes, BytesMut};
use quinn_proto::{
    Connection, ConnectionHandle, ReadError, StreamEvent, StreamId, VarInt, WriteError,
};
use tokio::net::TcpStream;

use super::listen::reset_tcp;
use super::splice::RESET_CODE;
use crate::tunnel::lane::{Lane, LaneEvent};

#[cfg(test)]
mod tests;

/// Room of one TCP read.
const READ: usize = 64 * 1024;
/// Smallest room a read is given before a new buffer is taken.
const MIN_READ: usize = 8 * 1024;
/// Bytes read from a stream and not yet written to its TCP socket, at most.
pub const MAX_TO_TCP: usize = 256 * 1024;
/// Slices in one vectored TCP write.
const SLICES: usize = 32;

/// The pipes whose socket woke them, and the lane task to wake.
#[derive(Default)]
struct Ready {
    keys: Mutex<Vec<usize>>,
    notify: tokio::sync::Notify,
}

/// A pipe's waker: names the pipe in the ready list and wakes the lane task.
struct PipeWaker {
    key: usize,
    ready: Arc<Ready>,
}

impl Wake for PipeWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if let Ok(mut keys) = self.ready.keys.lock() {
            keys.push(self.key);
        }
        self.ready.notify.notify_one();
    }
}

/// How a pipe ended, for its relay's audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// The connection of its stream.
    pub conn: ConnectionHandle,
    /// Its stream.
    pub stream: StreamId,
    /// Bytes moved (TCP to stream, stream to TCP).
    pub moved: [u64; 2],
    /// One side failed and the other was reset.
    pub reset: bool,
}

/// One relay: a stream and a TCP socket.
struct Pipe {
    conn: ConnectionHandle,
    stream: StreamId,
    tcp: TcpStream,
    waker: Waker,
    /// Read from the stream, not yet written to TCP.
    to_tcp: VecDeque<Bytes>,
    to_tcp_len: usize,
    /// The stream's data ended (FIN read).
    stream_done: bool,
    /// TCP was shut for writing after the stream's data.
    tcp_shut: bool,
    /// Read from TCP, not yet taken by the stream.
    to_quic: Bytes,
    buf: BytesMut,
    /// TCP's data ended (EOF read) and the stream was finished.
    tcp_done: bool,
    moved: [u64; 2],
}

/// A pipe's step ended it with a failure: reset the other side.
struct Failed;

impl Pipe {
    /// Moves what can move in both directions now; registers the waker
    /// for what must wait on the TCP socket.
    fn step(&mut self, conn: &mut Connection, cx: &mut Context<'_>) -> Result<(), Failed> {
        self.stream_to_tcp(conn, cx)?;
        self.tcp_to_stream(conn, cx)
    }

    fn finished(&self) -> bool {
        self.tcp_done && self.stream_done && self.tcp_shut
    }

    fn stream_to_tcp(&mut self, conn: &mut Connection, cx: &mut Context<'_>) -> Result<(), Failed> {
        loop {
            self.flush_tcp(cx)?;
            if self.to_tcp_len > 0 {
                return Ok(()); // the socket is full: woken when it drains
            }
            if self.stream_done {
                if !self.tcp_shut {
                    let _ = socket2::SockRef::from(&self.tcp).shutdown(std::net::Shutdown::Write);
                    self.tcp_shut = true;
                }
                return Ok(());
            }
            if !self.read_stream(conn)? {
                return Ok(()); // nothing more from the peer: woken by its next frame
            }
        }
    }

    /// Writes what the stream gave to the TCP socket until it would block.
    fn flush_tcp(&mut self, cx: &mut Context<'_>) -> Result<(), Failed> {
        while self.to_tcp_len > 0 {
            match self.tcp.poll_write_ready(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Err(_)) => return Err(Failed),
                Poll::Ready(Ok(())) => {}
            }
            let mut slices = [IoSlice::new(&[]); SLICES];
            let n = self
                .to_tcp
                .iter()
                .take(SLICES)
                .zip(&mut slices)
                .fold(0, |n, (b, s)| {
                    *s = IoSlice::new(b);
                    n + 1
                });
            match self.tcp.try_write_vectored(&slices[..n]) {
                Ok(mut wrote) => {
                    self.to_tcp_len -= wrote;
                    self.moved[1] += wrote as u64;
                    while wrote > 0 {
                        let Some(front) = self.to_tcp.front_mut() else {
                            break;
                        };
                        let take = wrote.min(front.len());
                        front.advance(take);
                        wrote -= take;
                        if front.is_empty() {
                            self.to_tcp.pop_front();
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(Failed),
            }
        }
        Ok(())
    }

    /// Takes what the stream has (up to [`MAX_TO_TCP`] waiting); whether
    /// anything came or the data ended.
    fn read_stream(&mut self, conn: &mut Connection) -> Result<bool, Failed> {
        let mut recv = conn.recv_stream(self.stream);
        let Ok(mut chunks) = recv.read(true) else {
            return Err(Failed); // the stream is gone: stopped or reset earlier
        };
        let mut got = false;
        let result = loop {
            let room = MAX_TO_TCP - self.to_tcp_len;
            if room == 0 {
                break Ok(());
            }
            match chunks.next(room) {
                Ok(Some(chunk)) => {
                    self.to_tcp_len += chunk.bytes.len();
                    self.to_tcp.push_back(chunk.bytes);
                    got = true;
                }
                Ok(None) => {
                    self.stream_done = true;
                    got = true;
                    break Ok(());
                }
                Err(ReadError::Blocked) => break Ok(()),
                Err(ReadError::Reset(_)) => break Err(Failed),
            }
        };
        let _ = chunks.finalize();
        result.map(|()| got)
    }

    fn tcp_to_stream(&mut self, conn: &mut Connection, cx: &mut Context<'_>) -> Result<(), Failed> {
        loop {
            if !self.to_quic.is_empty() {
                match conn
                    .send_stream(self.stream)
                    .write_chunks(std::slice::from_mut(&mut self.to_quic))
                {
                    Ok(w) => self.moved[0] += w.bytes as u64,
                    Err(WriteError::Blocked) => {}
                    Err(WriteError::Stopped(_) | WriteError::ClosedStream) => return Err(Failed),
                }
                if !self.to_quic.is_empty() {
                    return Ok(()); // the stream is full: woken by Writable
                }
            }
            if self.tcp_done {
                return Ok(());
            }
            match self.tcp.poll_read_ready(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Err(_)) => return Err(Failed),
                Poll::Ready(Ok(())) => {}
            }
            if self.buf.capacity() - self.buf.len() < MIN_READ {
                self.buf.reserve(READ);
            }
            match self.tcp.try_read_buf(&mut self.buf) {
                Ok(0) => {
                    self.tcp_done = true;
                    if conn.send_stream(self.stream).finish().is_err() {
                        return Err(Failed);
                    }
                    return Ok(());
                }
                Ok(_) => self.to_quic = self.buf.split().freeze(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(Failed),
            }
        }
    }

    /// Ends a failed pipe: the stream reset and stopped, TCP reset at drop.
    fn fail(&self, conn: Option<&mut Connection>) {
        if let Some(conn) = conn {
            let code = VarInt::from_u32(RESET_CODE);
            let _ = conn.send_stream(self.stream).reset(code);
            let _ = conn.recv_stream(self.stream).stop(code);
        }
        reset_tcp(&self.tcp);
    }
}

/// A lane's pipes.
pub struct Pipes {
    slots: Vec<Option<Pipe>>,
    free: Vec<usize>,
    by_stream: HashMap<(ConnectionHandle, StreamId), usize>,
    ready: Arc<Ready>,
    max: usize,
    ended: Vec<Ended>,
    woken: Vec<usize>,
}

/// The lane holds as many pipes as it may; the TCP socket is handed back.
#[derive(Debug)]
pub struct Full(pub TcpStream);

impl Pipes {
    /// At most `max` pipes at once.
    pub fn new(max: usize) -> Self {
        Pipes {
            slots: Vec::new(),
            free: Vec::new(),
            by_stream: HashMap::new(),
            ready: Arc::new(Ready::default()),
            max,
            ended: Vec::new(),
            woken: Vec::new(),
        }
    }

    /// Pipes open.
    pub fn len(&self) -> usize {
        self.by_stream.len()
    }

    /// No pipe is open.
    pub fn is_empty(&self) -> bool {
        self.by_stream.is_empty()
    }

    /// Joins `stream` of `conn` with `tcp` and moves what can move at once.
    /// `first` is what was read from the stream already (after a relay's
    /// opening frames), written to TCP first.
    ///
    /// # Errors
    /// When the lane holds [`Pipes::new`]'s `max` pipes.
    pub fn attach(
        &mut self,
        lane: &mut Lane,
        conn: ConnectionHandle,
        stream: StreamId,
        tcp: TcpStream,
        first: Bytes,
    ) -> Result<(), Full> {
        if self.by_stream.len() >= self.max {
            return Err(Full(tcp));
        }
        let _ = tcp.set_nodelay(true);
        let key = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let waker = Waker::from(Arc::new(PipeWaker {
            key,
            ready: self.ready.clone(),
        }));
        let to_tcp_len = first.len();
        self.slots[key] = Some(Pipe {
            conn,
            stream,
            tcp,
            waker,
            to_tcp: (!first.is_empty()).then_some(first).into_iter().collect(),
            to_tcp_len,
            stream_done: false,
            tcp_shut: false,
            to_quic: Bytes::new(),
            buf: BytesMut::new(),
            tcp_done: false,
            moved: [0, 0],
        });
        self.by_stream.insert((conn, stream), key);
        self.drive(lane, key);
        Ok(())
    }

    /// Acts on a lane event that concerns a pipe (its stream readable,
    /// writable or stopped, its connection lost); whether it did.
    pub fn on_event(&mut self, lane: &mut Lane, event: &LaneEvent) -> bool {
        match event {
            LaneEvent::Stream(h, StreamEvent::Readable { id } | StreamEvent::Writable { id }) => {
                let Some(&key) = self.by_stream.get(&(*h, *id)) else {
                    return false;
                };
                self.drive(lane, key);
                true
            }
            LaneEvent::Stream(h, StreamEvent::Stopped { id, .. }) => {
                let Some(&key) = self.by_stream.get(&(*h, *id)) else {
                    return false;
                };
                self.end(lane, key, true);
                true
            }
            LaneEvent::Lost(h, _) => self.lost(lane, *h),
            _ => false,
        }
    }

    /// Ends every pipe of connection `h` with a reset: it was lost, or the
    /// owner closed it (quinn-proto reports no loss for a local close).
    /// Whether there was any.
    pub fn lost(&mut self, lane: &mut Lane, h: ConnectionHandle) -> bool {
        let keys: Vec<usize> = self
            .by_stream
            .iter()
            .filter(|((c, _), _)| *c == h)
            .map(|(_, k)| *k)
            .collect();
        for key in &keys {
            self.end(lane, *key, true);
        }
        !keys.is_empty()
    }

    /// Bytes held in all pipes (read from one side, not yet taken by the other).
    pub fn buffered(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .map(|p| p.to_tcp_len + p.to_quic.len())
            .sum()
    }

    /// Waits until a pipe's TCP socket is ready (cancel-safe).
    pub async fn woken(&self) {
        self.ready.notify.notified().await;
    }

    /// Drives every pipe whose TCP socket woke it.
    pub fn drive_woken(&mut self, lane: &mut Lane) {
        let mut woken = std::mem::take(&mut self.woken);
        if let Ok(mut keys) = self.ready.keys.lock() {
            woken.extend(keys.drain(..));
        }
        woken.sort_unstable();
        woken.dedup();
        for &key in &woken {
            self.drive(lane, key);
        }
        woken.clear();
        self.woken = woken;
    }

    /// The pipes that ended since the last call.
    pub fn ended(&mut self) -> impl Iterator<Item = Ended> + '_ {
        self.ended.drain(..)
    }

    fn drive(&mut self, lane: &mut Lane, key: usize) {
        let Some(Some(pipe)) = self.slots.get_mut(key) else {
            return; // a stale wake of a pipe gone
        };
        let Some(conn) = lane.conn(pipe.conn) else {
            self.end(lane, key, true);
            return;
        };
        let waker = pipe.waker.clone();
        let mut cx = Context::from_waker(&waker);
        match pipe.step(conn, &mut cx) {
            Ok(()) if pipe.finished() => self.end(lane, key, false),
            Ok(()) => {}
            Err(Failed) => self.end(lane, key, true),
        }
    }

    fn end(&mut self, lane: &mut Lane, key: usize, reset: bool) {
        let Some(pipe) = self.slots.get_mut(key).and_then(Option::take) else {
            return;
        };
        if reset {
            pipe.fail(lane.conn(pipe.conn));
        }
        self.by_stream.remove(&(pipe.conn, pipe.stream));
        self.free.push(key);
        self.ended.push(Ended {
            conn: pipe.conn,
            stream: pipe.stream,
            moved: pipe.moved,
            reset,
        });
    }
}
