//! The tunnel's wire protocol (version 1): frames on QUIC streams and datagrams.
//! Pure encoding and decoding; see `docs/protocol.md` for the prose.
//!
//! Every QUIC bidirectional stream starts with one frame from the side that
//! opened it and one answer frame; after an [`Frame::Opened`] answer the stream
//! carries the relayed bytes. A frame is `len: u32` (big-endian, of what follows)
//! then `type: u8` and the fields. Strings are `len: u16` + UTF-8; addresses are
//! `family: u8 (4|6)`, the address bytes, then `port: u16`.
//!
//! Decoders never trust a length: a frame above [`MAX_FRAME`] or a field that
//! runs past its frame is an error, never a panic or an allocation of that size.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Protocol version spoken by this build.
pub const VERSION: u16 = 1;

/// ALPN of the tunnel.
pub const ALPN: &[u8] = b"gw/1";

/// Largest frame body accepted.
pub const MAX_FRAME: usize = 16 * 1024;

/// Why a stream was refused (`Refuse.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseCode {
    /// 1: the peers speak different protocol versions.
    Version,
    /// 2: the boundary policy denied the crossing (`rule` names the rule).
    Policy,
    /// 3: no such service, or its device is not connected.
    NoRoute,
    /// 4: the target did not accept the connection.
    Unreachable,
    /// 5: a per-service limit was reached (`max_connections`).
    Limit,
    /// 6: the peer sent something this protocol does not allow.
    Protocol,
    /// 7: the node is shutting down.
    ShuttingDown,
    /// A number this version does not know (a newer peer's), kept as sent.
    Other(u16),
}

impl RefuseCode {
    /// The code for a number; unknown numbers are kept as [`RefuseCode::Other`].
    pub fn from_u16(n: u16) -> Self {
        match n {
            1 => Self::Version,
            2 => Self::Policy,
            3 => Self::NoRoute,
            4 => Self::Unreachable,
            5 => Self::Limit,
            6 => Self::Protocol,
            7 => Self::ShuttingDown,
            n => Self::Other(n),
        }
    }

    /// The code's number on the wire (also used as a QUIC error code).
    pub fn number(self) -> u16 {
        match self {
            Self::Version => 1,
            Self::Policy => 2,
            Self::NoRoute => 3,
            Self::Unreachable => 4,
            Self::Limit => 5,
            Self::Protocol => 6,
            Self::ShuttingDown => 7,
            Self::Other(n) => n,
        }
    }
}

/// Who asks for a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A client of a hub's publish listener (provincial network).
    Provincial,
    /// A legacy client of another edge's access listener; the hub fills in the
    /// device id from that edge's certificate.
    Device(String),
    /// A legacy client of this edge's access listener (edge to hub only).
    Local,
}

/// A frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Edge to hub, first frame of the control stream.
    Hello {
        /// The edge's protocol version.
        version: u16,
    },
    /// Hub to edge: the handshake succeeded.
    Welcome {
        /// The hub's protocol version.
        version: u16,
        /// The hub's node id.
        hub: String,
    },
    /// Open a TCP relay to `service`.
    Open {
        /// Edge to hub: `DEVICE/SERVICE`; hub to edge: the service's name.
        service: String,
        /// Who asks.
        origin: Origin,
        /// The client's address, for policy and audit.
        client: SocketAddr,
    },
    /// Open a UDP flow to `service`; datagrams then carry `flow`.
    OpenUdp {
        /// As in [`Frame::Open`].
        service: String,
        /// Who asks.
        origin: Origin,
        /// The client's address.
        client: SocketAddr,
        /// The flow id chosen by the opener, unique on its connection.
        flow: u32,
    },
    /// The relay is open: relayed bytes follow.
    Opened,
    /// First frame of a stream that carries the UDP flows its opener opens on
    /// this connection (answered [`Frame::Opened`]): then [`Frame::OpenUdp`] and
    /// [`Frame::FlowEnd`] one way, [`Frame::FlowOpened`], [`Frame::FlowRefused`]
    /// and [`Frame::FlowEnd`] the other, any number of flows interleaved. One
    /// stream for every flow, not a stream each: a peer keeps state for each
    /// stream it lets the other open.
    UdpFlows,
    /// On a [`Frame::UdpFlows`] stream: the flow is open; its datagrams follow.
    FlowOpened {
        /// The flow id its opener chose.
        flow: u32,
    },
    /// On a [`Frame::UdpFlows`] stream: the flow is refused.
    FlowRefused {
        /// The flow id its opener chose.
        flow: u32,
        /// As in [`Frame::Refuse`].
        code: RefuseCode,
        /// As in [`Frame::Refuse`].
        rule: String,
        /// As in [`Frame::Refuse`].
        message: String,
    },
    /// On a [`Frame::UdpFlows`] stream, either way: the flow is gone (expired,
    /// cut, or its client went away); the other side forgets it.
    FlowEnd {
        /// The flow id its opener chose.
        flow: u32,
    },
    /// Hub to edge, on a stream of its own: are you there? Answered with a
    /// `Ping` (an edge older than this frame ends the stream unanswered,
    /// which proves it alive just as well).
    Ping,
    /// Edge to hub: this stream carries `channel`'s records (see [`Batch`]).
    SyncOpen {
        /// The channel's name on the edge.
        channel: String,
        /// Its destination: `hub` or `DEVICE/CHANNEL`.
        deliver_to: String,
    },
    /// Hub to edge: the sink holds every record of the channel up to `acked`;
    /// send from there.
    SyncReady {
        /// Highest sequence number already committed (0: none).
        acked: u64,
    },
    /// Hub to edge: every record up to `upto` is committed to the sink.
    SyncAck {
        /// Highest committed sequence number.
        upto: u64,
    },
    /// Hub to the destination edge of a channel, first frame of a delivery
    /// stream: records of `from` follow as batches, for local `channel`; the
    /// edge answers [`Frame::SyncReady`] and acks each batch it delivered.
    Deliver {
        /// The source: `DEVICE/CHANNEL`.
        from: String,
        /// The destination channel on this edge.
        channel: String,
    },
    /// Hub to a source edge, on its sync stream: the destination confirmed every
    /// record up to `upto`.
    SyncDelivered {
        /// Highest sequence number delivered.
        upto: u64,
    },
    /// A record could not be delivered: destination edge to hub on a delivery
    /// stream (before the batch's [`Frame::SyncAck`]), and hub to the source
    /// edge on its sync stream (before the [`Frame::SyncDelivered`] that covers it).
    SyncFailed {
        /// The record's sequence number in the source channel.
        seq: u64,
        /// Why (rule and reason).
        reason: String,
    },
    /// Edge to hub, on a stream of its own: one part of a firmware version in
    /// the hub's store (`manifest`, `signature`, `parts`, `root/000012`,
    /// `linux/000000`, `initrd/000003`). Answered [`Frame::Opened`] and the
    /// part's bytes (at most 1 MiB) to the end of the stream, or
    /// [`Frame::Refuse`].
    FirmwareGet {
        /// The version.
        version: String,
        /// The part.
        part: String,
    },
    /// Refused; the stream ends.
    Refuse {
        /// Why.
        code: RefuseCode,
        /// The boundary rule, for [`RefuseCode::Policy`]; else empty.
        rule: String,
        /// For the log and the operator.
        message: String,
    },
}

/// Decoding failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// More bytes are needed (a stream reader keeps reading).
    #[error("incomplete frame")]
    Incomplete,
    /// The frame announces more than [`MAX_FRAME`] bytes.
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    /// Unknown frame type.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// A field is malformed.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

mod tag {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const REFUSE: u8 = 0x03;
    pub const OPEN: u8 = 0x10;
    pub const OPENED: u8 = 0x11;
    pub const OPEN_UDP: u8 = 0x12;
    pub const PING: u8 = 0x13;
    pub const UDP_FLOWS: u8 = 0x14;
    pub const FLOW_OPENED: u8 = 0x15;
    pub const FLOW_REFUSED: u8 = 0x16;
    pub const FLOW_END: u8 = 0x17;
    pub const SYNC_OPEN: u8 = 0x20;
    pub const SYNC_READY: u8 = 0x21;
    pub const SYNC_ACK: u8 = 0x22;
    pub const DELIVER: u8 = 0x23;
    pub const SYNC_DELIVERED: u8 = 0x24;
    pub const SYNC_FAILED: u8 = 0x25;
    pub const FIRMWARE_GET: u8 = 0x30;
}

impl Frame {
    /// Appends the encoded frame (length prefix included) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        match self {
            Frame::Hello { version } => {
                out.push(tag::HELLO);
                out.extend_from_slice(&version.to_be_bytes());
            }
            Frame::Welcome { version, hub } => {
                out.push(tag::WELCOME);
                out.extend_from_slice(&version.to_be_bytes());
                put_str(out, hub);
            }
            Frame::Open {
                service,
                origin,
                client,
            } => {
                out.push(tag::OPEN);
                put_str(out, service);
                put_origin(out, origin);
                put_addr(out, client);
            }
            Frame::OpenUdp {
                service,
                origin,
                client,
                flow,
            } => {
                out.push(tag::OPEN_UDP);
                put_str(out, service);
                put_origin(out, origin);
                put_addr(out, client);
                out.extend_from_slice(&flow.to_be_bytes());
            }
            Frame::Opened => out.push(tag::OPENED),
            Frame::Ping => out.push(tag::PING),
            Frame::UdpFlows => out.push(tag::UDP_FLOWS),
            Frame::FlowOpened { flow } => {
                out.push(tag::FLOW_OPENED);
                out.extend_from_slice(&flow.to_be_bytes());
            }
            Frame::FlowRefused {
                flow,
                code,
                rule,
                message,
            } => {
                out.push(tag::FLOW_REFUSED);
                out.extend_from_slice(&flow.to_be_bytes());
                out.extend_from_slice(&code.number().to_be_bytes());
                put_str(out, rule);
                put_str(out, message);
            }
            Frame::FlowEnd { flow } => {
                out.push(tag::FLOW_END);
                out.extend_from_slice(&flow.to_be_bytes());
            }
            Frame::SyncOpen {
                channel,
                deliver_to,
            } => {
                out.push(tag::SYNC_OPEN);
                put_str(out, channel);
                put_str(out, deliver_to);
            }
            Frame::SyncReady { acked } => {
                out.push(tag::SYNC_READY);
                out.extend_from_slice(&acked.to_be_bytes());
            }
            Frame::SyncAck { upto } => {
                out.push(tag::SYNC_ACK);
                out.extend_from_slice(&upto.to_be_bytes());
            }
            Frame::Deliver { from, channel } => {
                out.push(tag::DELIVER);
                put_str(out, from);
                put_str(out, channel);
            }
            Frame::FirmwareGet { version, part } => {
                out.push(tag::FIRMWARE_GET);
                put_str(out, version);
                put_str(out, part);
            }
            Frame::SyncDelivered { upto } => {
                out.push(tag::SYNC_DELIVERED);
                out.extend_from_slice(&upto.to_be_bytes());
            }
            Frame::SyncFailed { seq, reason } => {
                out.push(tag::SYNC_FAILED);
                out.extend_from_slice(&seq.to_be_bytes());
                put_str(out, reason);
            }
            Frame::Refuse {
                code,
                rule,
                message,
            } => {
                out.push(tag::REFUSE);
                out.extend_from_slice(&code.number().to_be_bytes());
                put_str(out, rule);
                put_str(out, message);
            }
        }
        let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// The encoded frame.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// The body length announced by a 4-byte prefix.
    ///
    /// # Errors
    /// [`DecodeError::TooLarge`] above [`MAX_FRAME`].
    pub fn body_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
        let n = u32::from_be_bytes(prefix) as usize;
        if n > MAX_FRAME {
            return Err(DecodeError::TooLarge(n));
        }
        if n == 0 {
            return Err(DecodeError::Malformed("empty frame"));
        }
        Ok(n)
    }

    /// Decodes one frame from the front of `buf`; returns it and the bytes used.
    ///
    /// # Errors
    /// [`DecodeError::Incomplete`] when `buf` holds less than a frame; other
    /// variants when the bytes are not a valid frame.
    pub fn decode(buf: &[u8]) -> Result<(Frame, usize), DecodeError> {
        let prefix: [u8; 4] = buf
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(DecodeError::Incomplete)?;
        let n = Self::body_len(prefix)?;
        let body = buf.get(4..4 + n).ok_or(DecodeError::Incomplete)?;
        Ok((Self::decode_body(body)?, 4 + n))
    }

    /// Decodes a frame body (what follows the length prefix).
    ///
    /// # Errors
    /// When the body is not exactly one valid frame.
    pub fn decode_body(body: &[u8]) -> Result<Frame, DecodeError> {
        let mut r = Reader { buf: body };
        let frame = match r.u8()? {
            tag::HELLO => Frame::Hello { version: r.u16()? },
            tag::WELCOME => Frame::Welcome {
                version: r.u16()?,
                hub: r.str()?,
            },
            tag::OPEN => Frame::Open {
                service: r.str()?,
                origin: r.origin()?,
                client: r.addr()?,
            },
            tag::OPEN_UDP => Frame::OpenUdp {
                service: r.str()?,
                origin: r.origin()?,
                client: r.addr()?,
                flow: r.u32()?,
            },
            tag::OPENED => Frame::Opened,
            tag::PING => Frame::Ping,
            tag::UDP_FLOWS => Frame::UdpFlows,
            tag::FLOW_OPENED => Frame::FlowOpened { flow: r.u32()? },
            tag::FLOW_REFUSED => Frame::FlowRefused {
                flow: r.u32()?,
                code: RefuseCode::from_u16(r.u16()?),
                rule: r.str()?,
                message: r.str()?,
            },
            tag::FLOW_END => Frame::FlowEnd { flow: r.u32()? },
            tag::SYNC_OPEN => Frame::SyncOpen {
                channel: r.str()?,
                deliver_to: r.str()?,
            },
            tag::SYNC_READY => Frame::SyncReady { acked: r.u64()? },
            tag::SYNC_ACK => Frame::SyncAck { upto: r.u64()? },
            tag::DELIVER => Frame::Deliver {
                from: r.str()?,
                channel: r.str()?,
            },
            tag::SYNC_DELIVERED => Frame::SyncDelivered { upto: r.u64()? },
            tag::FIRMWARE_GET => Frame::FirmwareGet {
                version: r.str()?,
                part: r.str()?,
            },
            tag::SYNC_FAILED => Frame::SyncFailed {
                seq: r.u64()?,
                reason: r.str()?,
            },
            tag::REFUSE => Frame::Refuse {
                code: RefuseCode::from_u16(r.u16()?),
                rule: r.str()?,
                message: r.str()?,
            },
            t => return Err(DecodeError::UnknownType(t)),
        };
        if !r.buf.is_empty() {
            return Err(DecodeError::Malformed("trailing bytes"));
        }
        Ok(frame)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Strings are bounded by MAX_FRAME; truncate at a char boundary rather than
    // write a length that lies.
    let mut end = s.len().min(MAX_FRAME / 2);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let len = end as u16;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

fn put_origin(out: &mut Vec<u8>, o: &Origin) {
    match o {
        Origin::Provincial => out.push(1),
        Origin::Device(d) => {
            out.push(2);
            put_str(out, d);
        }
        Origin::Local => out.push(3),
    }
}

fn put_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Malformed("field runs past the frame"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b: [u8; 8] = self
            .take(8)?
            .try_into()
            .map_err(|_| DecodeError::Malformed("u64"))?;
        Ok(u64::from_be_bytes(b))
    }
    fn str(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Malformed("string is not UTF-8"))
    }
    fn origin(&mut self) -> Result<Origin, DecodeError> {
        match self.u8()? {
            1 => Ok(Origin::Provincial),
            2 => Ok(Origin::Device(self.str()?)),
            3 => Ok(Origin::Local),
            _ => Err(DecodeError::Malformed("unknown origin")),
        }
    }
    fn addr(&mut self) -> Result<SocketAddr, DecodeError> {
        let ip = match self.u8()? {
            4 => {
                let b: [u8; 4] = self
                    .take(4)?
                    .try_into()
                    .map_err(|_| DecodeError::Malformed("ipv4"))?;
                IpAddr::V4(Ipv4Addr::from(b))
            }
            6 => {
                let b: [u8; 16] = self
                    .take(16)?
                    .try_into()
                    .map_err(|_| DecodeError::Malformed("ipv6"))?;
                IpAddr::V6(Ipv6Addr::from(b))
            }
            _ => return Err(DecodeError::Malformed("unknown address family")),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }
}

/// A UDP datagram in the tunnel: `flow: u32` then the payload.
///
/// # Errors
/// When the datagram is shorter than its flow id.
pub fn decode_datagram(d: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    let head: [u8; 4] = d
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(DecodeError::Malformed("datagram shorter than its flow id"))?;
    Ok((u32::from_be_bytes(head), &d[4..]))
}

/// Encodes a tunnel datagram.
pub fn encode_datagram(flow: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + payload.len());
    v.extend_from_slice(&flow.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Largest record batch on a sync stream (prefix excluded). A record larger than
/// this cannot be synced; `max_record_bytes` is checked against it.
pub const MAX_BATCH: usize = 64 * 1024 * 1024;

/// One record on a sync stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRecord {
    /// Its sequence number in the channel (strictly increasing in a batch).
    pub seq: u64,
    /// When the edge accepted it, Unix ms.
    pub time_ms: i64,
    /// Declared format.
    pub format: String,
    /// The body.
    pub body: Vec<u8>,
}

/// A batch of records, edge to hub on a sync stream after [`Frame::SyncReady`]:
/// `len: u32` (of what follows), `count: u32`, then per record `seq: u64`,
/// `time_ms: i64`, `format` (string), `body_len: u32` and the body. Sequence
/// numbers rise strictly within a batch and from one batch to the next.
pub struct Batch;

impl Batch {
    /// Appends the encoded batch (length prefix included) to `out`.
    pub fn encode(records: &[SyncRecord], out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(
            &u32::try_from(records.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        for r in records {
            out.extend_from_slice(&r.seq.to_be_bytes());
            out.extend_from_slice(&r.time_ms.to_be_bytes());
            put_str(out, &r.format);
            out.extend_from_slice(
                &u32::try_from(r.body.len())
                    .unwrap_or(u32::MAX)
                    .to_be_bytes(),
            );
            out.extend_from_slice(&r.body);
        }
        let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// The body length announced by a 4-byte prefix.
    ///
    /// # Errors
    /// [`DecodeError::TooLarge`] above [`MAX_BATCH`].
    pub fn body_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
        let n = u32::from_be_bytes(prefix) as usize;
        if n > MAX_BATCH {
            return Err(DecodeError::TooLarge(n));
        }
        Ok(n)
    }

    /// Decodes a batch body (what follows the length prefix).
    ///
    /// # Errors
    /// When the body is not exactly one valid batch, or its sequence numbers do
    /// not rise strictly.
    pub fn decode_body(body: &[u8]) -> Result<Vec<SyncRecord>, DecodeError> {
        let mut r = Reader { buf: body };
        let count = r.u32()? as usize;
        // Each record takes at least 22 bytes: never allocate for a lying count.
        if count > body.len() / 22 {
            return Err(DecodeError::Malformed("record count exceeds the batch"));
        }
        let mut out: Vec<SyncRecord> = Vec::with_capacity(count);
        for _ in 0..count {
            let seq = r.u64()?;
            let time_ms = i64::from_be_bytes(r.u64()?.to_be_bytes());
            let format = r.str()?;
            let n = r.u32()? as usize;
            let body = r.take(n)?.to_vec();
            if out.last().is_some_and(|p| p.seq >= seq) {
                return Err(DecodeError::Malformed("sequence numbers do not rise"));
            }
            out.push(SyncRecord {
                seq,
                time_ms,
                format,
                body,
            });
        }
        if !r.buf.is_empty() {
            return Err(DecodeError::Malformed("trailing bytes"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn origin() -> impl Strategy<Value = Origin> {
        prop_oneof![
            Just(Origin::Provincial),
            Just(Origin::Local),
            "[a-z0-9-]{1,20}".prop_map(Origin::Device)
        ]
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
        ]
    }

    fn frame() -> impl Strategy<Value = Frame> {
        // Every number: the known ones read as their names, others as Other.
        let code = any::<u16>().prop_map(RefuseCode::from_u16);
        prop_oneof![
            any::<u16>().prop_map(|version| Frame::Hello { version }),
            (any::<u16>(), ".{0,30}").prop_map(|(version, hub)| Frame::Welcome { version, hub }),
            (".{0,40}", origin(), addr()).prop_map(|(service, origin, client)| Frame::Open {
                service,
                origin,
                client
            }),
            (".{0,40}", origin(), addr(), any::<u32>()).prop_map(
                |(service, origin, client, flow)| Frame::OpenUdp {
                    service,
                    origin,
                    client,
                    flow
                }
            ),
            Just(Frame::Opened),
            Just(Frame::Ping),
            Just(Frame::UdpFlows),
            any::<u32>().prop_map(|flow| Frame::FlowOpened { flow }),
            (
                any::<u32>(),
                any::<u16>().prop_map(RefuseCode::from_u16),
                ".{0,20}",
                ".{0,100}"
            )
                .prop_map(|(flow, code, rule, message)| Frame::FlowRefused {
                    flow,
                    code,
                    rule,
                    message
                }),
            any::<u32>().prop_map(|flow| Frame::FlowEnd { flow }),
            (".{0,30}", ".{0,40}").prop_map(|(channel, deliver_to)| Frame::SyncOpen {
                channel,
                deliver_to
            }),
            any::<u64>().prop_map(|acked| Frame::SyncReady { acked }),
            any::<u64>().prop_map(|upto| Frame::SyncAck { upto }),
            (".{0,30}", ".{0,30}").prop_map(|(from, channel)| Frame::Deliver { from, channel }),
            any::<u64>().prop_map(|upto| Frame::SyncDelivered { upto }),
            (".{0,20}", ".{0,20}").prop_map(|(version, part)| Frame::FirmwareGet { version, part }),
            (any::<u64>(), ".{0,60}").prop_map(|(seq, reason)| Frame::SyncFailed { seq, reason }),
            (code, ".{0,20}", ".{0,200}").prop_map(|(code, rule, message)| Frame::Refuse {
                code,
                rule,
                message
            }),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip(f in frame(), tail in prop::collection::vec(any::<u8>(), 0..8)) {
            let mut bytes = f.to_bytes();
            let len = bytes.len();
            bytes.extend_from_slice(&tail);
            prop_assert_eq!(Frame::decode(&bytes), Ok((f, len)));
        }

        #[test]
        fn every_prefix_is_incomplete(f in frame()) {
            let bytes = f.to_bytes();
            for cut in 0..bytes.len() {
                prop_assert_eq!(Frame::decode(&bytes[..cut]), Err(DecodeError::Incomplete));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = Frame::decode(&bytes);
            let _ = Frame::decode_body(&bytes);
            let _ = decode_datagram(&bytes);
            let _ = Batch::decode_body(&bytes);
        }

        #[test]
        fn batches_round_trip(
            start in 0u64..1 << 40,
            steps in prop::collection::vec((1u64..5, any::<i64>(), "[a-z]{0,6}", prop::collection::vec(any::<u8>(), 0..40)), 0..12),
        ) {
            let mut seq = start;
            let records: Vec<SyncRecord> = steps.into_iter().map(|(step, time_ms, format, body)| {
                seq += step;
                SyncRecord { seq, time_ms, format, body }
            }).collect();
            let mut bytes = Vec::new();
            Batch::encode(&records, &mut bytes);
            let n = Batch::body_len(bytes[..4].try_into().expect("prefix")).expect("length");
            prop_assert_eq!(n, bytes.len() - 4);
            prop_assert_eq!(Batch::decode_body(&bytes[4..]), Ok(records));
        }

        #[test]
        fn datagrams_round_trip(flow in any::<u32>(), payload in prop::collection::vec(any::<u8>(), 0..64)) {
            let d = encode_datagram(flow, &payload);
            prop_assert_eq!(decode_datagram(&d), Ok((flow, &payload[..])));
        }
    }

    /// Found by the fuzzer: a Refuse with a code this version does not know
    /// (0, 0x0400) decoded as Protocol (6) and re-encoded differently.
    #[test]
    fn unknown_refuse_codes_are_kept_as_sent() {
        for input in [
            &[0, 0, 0, 7, 3, 0, 0, 0, 0, 0, 0, 0, 1, 0][..],
            &[0, 0, 0, 7, 3, 4, 0, 0, 0, 0, 0],
        ] {
            let (frame, used) = Frame::decode(input).expect("decodes");
            assert_eq!(frame.to_bytes(), input[..used].to_vec(), "{frame:?}");
        }
        assert_eq!(RefuseCode::from_u16(0x0400), RefuseCode::Other(0x0400));
        assert_eq!(RefuseCode::from_u16(6), RefuseCode::Protocol);
    }

    #[test]
    fn oversized_frames_are_refused_before_reading() {
        let mut b = vec![0xff, 0xff, 0xff, 0xff];
        b.push(tag::OPENED);
        assert_eq!(
            Frame::decode(&b),
            Err(DecodeError::TooLarge(u32::MAX as usize))
        );
    }
}
