//! A tunnel lane driven by one task, the sans-IO core (issue 21).
//!
//! A [`Lane`] owns one QUIC endpoint and its connections, as quinn-proto's
//! state machines with no driver task of their own: the task that owns the
//! lane's UDP socket (and the TCP sockets its relays serve) hands it the
//! datagrams it read and the time, touches the connections' streams, and
//! sends what [`Lane::poll`] hands back. So a relayed request crosses one
//! task on each side, instead of quinn's endpoint driver, connection driver
//! and the relay's task.
//!
//! Nothing here reads a clock or a socket: [`tests`] runs an edge's and a
//! hub's lane over a simulated network in virtual time, with loss, a
//! 1,500-byte path and a hub that restarts, on the tunnel's own TLS and
//! transport settings.
//!
//! Scale: a hub lane may hold thousands of connections, so the lane never
//! scans them all: it polls only the connections that received a datagram,
//! were touched or whose timer fell due since the last poll, and keeps the
//! timers in a heap.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use quinn_proto::{
    ClientConfig, Connection, ConnectionError, ConnectionHandle, DatagramEvent, Endpoint,
    EndpointConfig, Incoming, ServerConfig, StreamEvent, Transmit,
};

mod socket;
#[cfg(test)]
mod tests;

/// Stateless answers (resets, refusals, retries) kept until the next poll;
/// past it a flood of unknown packets gets no more answers.
const MAX_ANSWERS: usize = 1024;
/// Stale timer entries allowed beyond one per connection before the heap is
/// rebuilt from the current deadlines.
const STALE_TIMERS: usize = 1024;
/// Datagrams in one segmented send at most (as quinn's driver: larger
/// batches cost memory and, with jumbo packets, pass the 64 KiB a UDP send
/// carries, which the kernel refuses).
const MAX_SEGMENTS: usize = 10;

pub use socket::Socket;

/// What the lane does with a handshake a peer starts (the shell's admission
/// decides, as the hub's accept loop does with quinn today).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go on with the handshake.
    Accept,
    /// Answer with a stateless Retry first (the address is not proven).
    Retry,
    /// Refuse it at once (CONNECTION_REFUSED, no cryptography).
    Refuse,
    /// Drop it without an answer.
    Ignore,
}

/// What happened on a lane's connections, in order.
#[derive(Debug)]
pub enum LaneEvent {
    /// A handshake completed (either side).
    Connected(ConnectionHandle),
    /// A stream opened, became readable or writable, finished or stopped.
    Stream(ConnectionHandle, StreamEvent),
    /// Datagrams are waiting to be read.
    Datagrams(ConnectionHandle),
    /// The connection is lost (closed by either end, timed out, reset); its
    /// state goes once it has drained.
    Lost(ConnectionHandle, ConnectionError),
}

/// A connection could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    /// quinn-proto refused the parameters.
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn_proto::ConnectError),
    /// The lane holds as many connections as it may.
    #[error("the lane holds {0} connections already")]
    Full(usize),
}

/// One QUIC endpoint and its connections, driven by its owner.
pub struct Lane {
    endpoint: Endpoint,
    server: Option<Arc<ServerConfig>>,
    conns: HashMap<ConnectionHandle, Connection>,
    max_conns: usize,
    /// Connections to poll at the next [`Lane::poll`].
    dirty: HashSet<ConnectionHandle>,
    /// Each connection's timer, and the heap that orders them (an entry
    /// whose time is not the connection's current one is stale).
    deadlines: HashMap<ConnectionHandle, Instant>,
    timers: BinaryHeap<Reverse<(Instant, ConnectionHandle)>>,
    events: VecDeque<LaneEvent>,
    /// Stateless answers of the endpoint (resets, refusals, retries).
    answers: VecDeque<(Transmit, Vec<u8>)>,
    /// Datagrams a connection may hand over at once (GSO batches).
    batch: usize,
    buf: Vec<u8>,
    /// A transmit the socket had no room for, sent first at the next poll.
    held: Option<(Transmit, Vec<u8>)>,
    /// The handles polled, kept between polls (no allocation per poll).
    polling: Vec<ConnectionHandle>,
}

impl Lane {
    /// A lane with `endpoint`'s settings (its stateless-reset key), serving
    /// handshakes with `server` if given, holding at most `max_conns`
    /// connections; connections hand over up to `batch` datagrams of one
    /// size at once (1 without segmentation offload).
    pub fn new(
        endpoint: Arc<EndpointConfig>,
        server: Option<ServerConfig>,
        max_conns: usize,
        batch: usize,
    ) -> Self {
        let server = server.map(Arc::new);
        Lane {
            endpoint: Endpoint::new(endpoint, server.clone(), true, None),
            server,
            conns: HashMap::new(),
            max_conns,
            dirty: HashSet::new(),
            deadlines: HashMap::new(),
            timers: BinaryHeap::new(),
            events: VecDeque::new(),
            answers: VecDeque::new(),
            batch: batch.clamp(1, MAX_SEGMENTS),
            buf: Vec::new(),
            held: None,
            polling: Vec::new(),
        }
    }

    /// Starts a handshake with `to` (TLS name `name`).
    ///
    /// # Errors
    /// When the lane is full or quinn-proto refuses the parameters.
    pub fn connect(
        &mut self,
        now: Instant,
        config: ClientConfig,
        to: SocketAddr,
        name: &str,
    ) -> Result<ConnectionHandle, LaneError> {
        if self.conns.len() >= self.max_conns {
            return Err(LaneError::Full(self.max_conns));
        }
        let (h, conn) = self.endpoint.connect(now, config, to, name)?;
        self.conns.insert(h, conn);
        self.dirty.insert(h);
        Ok(h)
    }

    /// Handles one datagram read from `from`; `admit` decides on a new
    /// handshake (a full lane refuses without asking).
    pub fn receive(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: BytesMut,
        admit: &mut dyn FnMut(&Incoming) -> Admit,
    ) {
        let mut buf = Vec::new();
        match self.endpoint.handle(now, from, None, None, data, &mut buf) {
            Some(DatagramEvent::ConnectionEvent(h, event)) => {
                if let Some(conn) = self.conns.get_mut(&h) {
                    conn.handle_event(event);
                    self.dirty.insert(h);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                let choice = if self.conns.len() >= self.max_conns {
                    Admit::Refuse
                } else {
                    admit(&incoming)
                };
                self.admit(now, incoming, choice, buf);
            }
            Some(DatagramEvent::Response(t)) => self.answer(t, buf),
            None => {}
        }
    }

    fn answer(&mut self, t: Transmit, buf: Vec<u8>) {
        if self.answers.len() < MAX_ANSWERS {
            self.answers.push_back((t, buf));
        }
    }

    fn admit(&mut self, now: Instant, incoming: Incoming, choice: Admit, mut buf: Vec<u8>) {
        match choice {
            Admit::Accept => {
                match self
                    .endpoint
                    .accept(incoming, now, &mut buf, self.server.clone())
                {
                    Ok((h, conn)) => {
                        self.conns.insert(h, conn);
                        self.dirty.insert(h);
                    }
                    Err(e) => {
                        if let Some(t) = e.response {
                            self.answer(t, buf);
                        }
                    }
                }
            }
            Admit::Retry => match self.endpoint.retry(incoming, &mut buf) {
                Ok(t) => self.answer(t, buf),
                // Already retried once: a second Retry is not allowed.
                Err(e) => self.admit(now, e.into_incoming(), Admit::Accept, buf),
            },
            Admit::Refuse => {
                let t = self.endpoint.refuse(incoming, &mut buf);
                self.answer(t, buf);
            }
            Admit::Ignore => self.endpoint.ignore(incoming),
        }
    }

    /// The earliest timer of any connection.
    pub fn next_timeout(&mut self) -> Option<Instant> {
        while let Some(Reverse((t, h))) = self.timers.peek().copied() {
            if self.deadlines.get(&h) == Some(&t) {
                return Some(t);
            }
            self.timers.pop();
        }
        None
    }

    /// Runs the timers due at `now` (loss detection, keep-alives, idle
    /// timeouts, path MTU probes).
    pub fn handle_timeouts(&mut self, now: Instant) {
        while let Some(Reverse((t, h))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            if self.deadlines.get(&h) != Some(&t) {
                continue;
            }
            self.deadlines.remove(&h);
            if let Some(conn) = self.conns.get_mut(&h) {
                conn.handle_timeout(now);
                self.dirty.insert(h);
            }
        }
    }

    /// A connection, for its streams and datagrams; it is polled at the next
    /// [`Lane::poll`] (whatever was written goes out then).
    pub fn conn(&mut self, h: ConnectionHandle) -> Option<&mut Connection> {
        let conn = self.conns.get_mut(&h)?;
        self.dirty.insert(h);
        Some(conn)
    }

    /// Connections held (handshaking, open or draining).
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// No connection is held.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The next event, in order.
    pub fn event(&mut self) -> Option<LaneEvent> {
        self.events.pop_front()
    }

    /// Queues the events of every connection that changed, sending nothing:
    /// for an owner that acts on what arrived before [`Lane::poll`], so that
    /// an answer leaves in the same packet as the acknowledgement.
    pub fn poll_events(&mut self) {
        let mut polling = std::mem::take(&mut self.polling);
        polling.clear();
        polling.extend(self.dirty.iter().copied());
        for &h in &polling {
            self.events_of(h);
        }
        self.polling = polling;
    }

    fn events_of(&mut self, h: ConnectionHandle) {
        let Some(conn) = self.conns.get_mut(&h) else {
            return;
        };
        while let Some(e) = conn.poll_endpoint_events() {
            if let Some(back) = self.endpoint.handle_event(h, e) {
                conn.handle_event(back);
            }
        }
        while let Some(e) = conn.poll() {
            use quinn_proto::Event;
            match e {
                Event::Connected => self.events.push_back(LaneEvent::Connected(h)),
                Event::ConnectionLost { reason } => {
                    self.events.push_back(LaneEvent::Lost(h, reason));
                }
                Event::Stream(s) => self.events.push_back(LaneEvent::Stream(h, s)),
                Event::DatagramReceived => self.events.push_back(LaneEvent::Datagrams(h)),
                Event::HandshakeDataReady | Event::DatagramsUnblocked => {}
            }
        }
    }

    /// Whether a transmit waits for room in the socket: the owner polls
    /// again once the socket is writable.
    pub fn blocked(&self) -> bool {
        self.held.is_some()
    }

    /// Polls every connection that changed: its events queued, its
    /// datagrams handed to `send` (with the bytes; a `segment_size` means a
    /// batch of datagrams of that size), its timer rearmed; drained
    /// connections go. `send` says `false` when the socket has no room: the
    /// transmit is held and sending stops until the next poll (after the
    /// socket is writable, see [`Lane::blocked`]); the connections not yet
    /// polled stay marked.
    pub fn poll(&mut self, now: Instant, send: &mut dyn FnMut(&Transmit, &[u8]) -> bool) {
        if let Some((t, data)) = self.held.take() {
            if !send(&t, &data[..t.size]) {
                self.held = Some((t, data));
                return;
            }
        }
        while let Some((t, data)) = self.answers.pop_front() {
            // A stateless answer the socket has no room for is dropped.
            send(&t, &data[..t.size]);
        }
        let mut polling = std::mem::take(&mut self.polling);
        polling.clear();
        polling.extend(self.dirty.drain());
        for (i, &h) in polling.iter().enumerate() {
            if self.held.is_some() {
                // The socket is full: the rest wait for the next poll.
                self.dirty.extend(polling[i..].iter().copied());
                break;
            }
            self.events_of(h);
            let Some(conn) = self.conns.get_mut(&h) else {
                continue;
            };
            loop {
                self.buf.clear();
                let Some(t) = conn.poll_transmit(now, self.batch, &mut self.buf) else {
                    break;
                };
                if !send(&t, &self.buf[..t.size]) {
                    self.held = Some((t, std::mem::take(&mut self.buf)));
                    // Polled again next time: it may have more to send.
                    self.dirty.insert(h);
                    break;
                }
            }
            // Sending may have produced endpoint events (a retired id).
            while let Some(e) = conn.poll_endpoint_events() {
                if let Some(back) = self.endpoint.handle_event(h, e) {
                    conn.handle_event(back);
                }
            }
            if conn.is_drained() {
                self.conns.remove(&h);
                self.deadlines.remove(&h);
                continue;
            }
            match conn.poll_timeout() {
                Some(t) => {
                    if self.deadlines.insert(h, t) != Some(t) {
                        self.timers.push(Reverse((t, h)));
                    }
                }
                None => {
                    self.deadlines.remove(&h);
                }
            }
        }
        self.polling = polling;
        // A deadline that moves leaves its old entry behind until it comes
        // up; past a bound the heap is made again from the deadlines.
        if self.timers.len() > self.deadlines.len() + STALE_TIMERS {
            self.timers = self
                .deadlines
                .iter()
                .map(|(h, t)| Reverse((*t, *h)))
                .collect();
        }
    }
}
