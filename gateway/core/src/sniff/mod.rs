//! Application-protocol checks of a relayed connection (rule R5.app-protocol):
//! [`sniff`] tells from the first bytes whether this can be HTTP/1.x or a TLS
//! handshake; an [`Inspector`] then follows a whole stream:
//!
//! - `http` ([`http`]): every request on the connection (keep-alive and
//!   pipelined) must have a valid request line and headers (httparse) before
//!   any of its bytes are released; its body is delimited by `Content-Length`
//!   or chunked encoding as HTTP/1.1 says, and the next request is checked
//!   again. Both lengths, an unknown `Transfer-Encoding`, `Upgrade` and
//!   `CONNECT` are refused (request smuggling, tunnels). The legacy server's
//!   responses are followed the same way by a second inspector, told by the
//!   first what each request asked ([`Asked`]). A service's `http_allow`
//!   ([`allow`], rule R5.http-allow) lists the methods and paths a client may
//!   request: another request is held back ([`Inspector::forbidden`]) and
//!   answered 403 by the gateway.
//! - `tls` ([`tls`]): the first record must be a whole, well-formed
//!   ClientHello (content type 22, handshake type 1, every length consistent)
//!   before a byte is released; the rest is encrypted and passes.
//!
//! A violation names its byte offset in the stream. UDP services' datagrams
//! (`rtp`, `mpegts`) are checked one by one by [`datagram`]; [`postgres`]
//! frames the PostgreSQL protocol and follows a
//! connection both ways ([`postgres::session`]), refusing writes through a
//! read-only service ([`postgres::read_only`]).

mod allow;
pub mod datagram;
mod http;
pub mod postgres;
mod tls;

pub use allow::Forbidden;

use crate::config::AppProtocol;

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// The bytes start like the declared protocol.
    Match,
    /// They cannot be the declared protocol.
    Mismatch,
    /// Too few bytes to tell.
    NeedMore,
}

/// Bytes needed at most to decide.
pub const MAX_SNIFF: usize = 8;

const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Checks the first bytes of a client's stream against `proto`.
pub fn sniff(proto: AppProtocol, first: &[u8]) -> Sniff {
    match proto {
        AppProtocol::Http => {
            let mut need_more = false;
            for m in METHODS {
                let n = first.len().min(m.len());
                if first[..n] == m[..n] {
                    if first.len() >= m.len() {
                        return Sniff::Match;
                    }
                    need_more = true;
                }
            }
            if need_more {
                Sniff::NeedMore
            } else {
                Sniff::Mismatch
            }
        }
        // TLS record: handshake (22), legacy version 3.x (x <= 4).
        AppProtocol::Tls => match first {
            [] | [0x16] | [0x16, 0x03] => {
                if first.first().is_some_and(|b| *b != 0x16) {
                    Sniff::Mismatch
                } else {
                    Sniff::NeedMore
                }
            }
            [0x16, 0x03, minor, ..] if *minor <= 4 => Sniff::Match,
            _ => Sniff::Mismatch,
        },
        // Datagram protocols are checked one datagram at a time
        // ([`datagram`]); a stream is never one (the config says so).
        AppProtocol::Rtp | AppProtocol::Mpegts => Sniff::Mismatch,
        // A startup packet, an SSLRequest, a GSSENCRequest or a CancelRequest.
        AppProtocol::Postgres => match postgres::startup(first) {
            Ok(postgres::Read::NeedMore) if first.len() < MAX_SNIFF => Sniff::NeedMore,
            Ok(_) => Sniff::Match,
            Err(_) => Sniff::Mismatch,
        },
    }
}

/// Longest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers in a request.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 1024;
/// Largest TLS record (2^14 plus room for compression and padding).
const MAX_RECORD: usize = (1 << 14) + 2048;

/// A stream that is not its declared protocol: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Byte offset in the stream.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

/// What a service allows beyond its protocol's bare rules.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// `http`: an `Upgrade` request passes, and the rest of the connection
    /// is the upgraded protocol's.
    pub allow_upgrade: bool,
    /// `tls`: the server names a ClientHello may ask for (lowercase; empty:
    /// any).
    pub sni: Vec<String>,
    /// `http`: the requests a client may make (empty: any).
    pub http_allow: Vec<crate::config::HttpAllow>,
}

/// What a checked request asked, so that its response can be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked {
    /// A `HEAD` request: its response has no body.
    pub head: bool,
    /// An allowed `Upgrade` request: a `101` answer turns the connection over.
    pub upgrade: bool,
}

/// Which way an HTTP stream goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The client's requests.
    Request,
    /// The legacy server's responses.
    Response,
}

/// Follows a stream and releases the bytes that were checked.
#[derive(Debug)]
pub struct Inspector {
    /// Bytes received, not yet released.
    buf: Vec<u8>,
    /// Offset of `buf[0]` in the stream.
    offset: u64,
    state: State,
    side: Side,
    /// Requests (or responses) checked so far.
    pub requests: u64,
    rules: std::sync::Arc<Rules>,
    /// Requests: checked heads not yet handed to the response side.
    /// Responses: requests still to be answered, oldest first.
    asked: std::collections::VecDeque<Asked>,
    /// The request `http_allow` refused; nothing after it is released.
    forbidden: Option<Forbidden>,
    /// `http`: bytes of the current head already checked ...
    scanned: usize,
    /// ... and whether its first line has ended.
    in_headers: bool,
}

/// Most requests a connection may have waiting for their responses.
pub const MAX_PIPELINED: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// HTTP: waiting for a whole request (or response) head.
    Head,
    /// HTTP: `n` more body bytes.
    Fixed(u64),
    /// HTTP: a chunk-size line.
    ChunkSize,
    /// HTTP: `n` more bytes of a chunk, then its CRLF.
    ChunkData(u64),
    /// HTTP: the CRLF after a chunk.
    ChunkEnd,
    /// HTTP: trailer lines, to the empty one.
    Trailer,
    /// HTTP: a request `http_allow` refuses; nothing more passes.
    Forbidden,
    /// TLS: waiting for the whole first record.
    Hello,
    /// Checked; everything passes (a TLS stream after its ClientHello, an
    /// upgraded connection, a response body delimited by the close).
    Through,
}

impl Inspector {
    /// An inspector of a client's stream for `proto`, with no rules beyond
    /// the protocol's.
    pub fn new(proto: AppProtocol) -> Self {
        Self::requests(proto, std::sync::Arc::default())
    }

    /// An inspector of a client's stream for a service's `app_protocol` and
    /// its `rules`.
    pub fn requests(proto: AppProtocol, rules: std::sync::Arc<Rules>) -> Self {
        Inspector {
            scanned: 0,
            in_headers: false,
            rules,
            side: Side::Request,
            asked: std::collections::VecDeque::new(),
            forbidden: None,
            buf: Vec::new(),
            offset: 0,
            state: match proto {
                AppProtocol::Http => State::Head,
                AppProtocol::Tls => State::Hello,
                // Not a stream protocol: nothing passes.
                // Followed by [`postgres::session`], not here.
                AppProtocol::Rtp | AppProtocol::Mpegts | AppProtocol::Postgres => State::Forbidden,
            },
            requests: 0,
        }
    }

    /// An inspector of an HTTP server's responses; [`Inspector::expect`]
    /// tells it each request the client's inspector let through.
    pub fn responses() -> Self {
        Inspector {
            side: Side::Response,
            ..Self::requests(AppProtocol::Http, std::sync::Arc::default())
        }
    }

    /// Requests: the heads checked since the last call, for the response
    /// side.
    pub fn take_asked(&mut self) -> std::collections::VecDeque<Asked> {
        std::mem::take(&mut self.asked)
    }

    /// Responses: one more request to be answered.
    ///
    /// # Errors
    /// More than [`MAX_PIPELINED`] requests wait for their responses.
    pub fn expect(&mut self, asked: Asked) -> Result<(), Violation> {
        if self.asked.len() >= MAX_PIPELINED {
            return Err(self.violation(
                0,
                format!("more than {MAX_PIPELINED} requests wait for their responses"),
            ));
        }
        self.asked.push_back(asked);
        Ok(())
    }

    /// Responses: every request let through has been answered whole.
    pub fn answered(&self) -> bool {
        self.asked.is_empty() && self.state == State::Head && self.buf.is_empty()
    }

    /// Requests: the request `http_allow` refused, if one was. The bytes
    /// before it were released; nothing from it on ever is.
    pub fn forbidden(&self) -> Option<&Forbidden> {
        self.forbidden.as_ref()
    }

    fn violation(&self, at: usize, reason: impl Into<String>) -> Violation {
        Violation {
            offset: self.offset + at as u64,
            reason: reason.into(),
        }
    }

    /// Takes the next bytes of the stream; returns those that may be relayed
    /// now (possibly none: a head is still incomplete).
    ///
    /// # Errors
    /// The first [`Violation`]; nothing after it may be relayed.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<u8>, Violation> {
        match self.state {
            State::Through => return Ok(data.to_vec()),
            State::Forbidden => return Ok(Vec::new()),
            _ => {}
        }
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            let released = match self.state {
                State::Through => self.buf.len(),
                State::Head => match self.head()? {
                    Some(n) => n,
                    None => break,
                },
                State::Fixed(n) => match self.body(n, State::Head, State::Fixed) {
                    Some(take) => take,
                    None => break,
                },
                State::ChunkSize => match self.chunk_size()? {
                    Some(n) => n,
                    None => break,
                },
                State::ChunkData(n) => match self.body(n, State::ChunkEnd, State::ChunkData) {
                    Some(take) => take,
                    None => break,
                },
                State::ChunkEnd => {
                    if self.buf.len() < 2 {
                        break;
                    }
                    if &self.buf[..2] != b"\r\n" {
                        return Err(self.violation(0, "a chunk is not followed by CRLF"));
                    }
                    self.state = State::ChunkSize;
                    2
                }
                State::Trailer => match self.line()? {
                    Some(2) => {
                        self.state = State::Head;
                        2
                    }
                    Some(n) => n,
                    None => break,
                },
                State::Hello => match self.hello()? {
                    Some(n) => n,
                    None => break,
                },
                State::Forbidden => {
                    self.buf.clear();
                    break;
                }
            };
            if released == 0 {
                break;
            }
            out.extend(self.buf.drain(..released));
            self.offset += released as u64;
            if self.buf.is_empty() && self.state != State::Through {
                break;
            }
        }
        if self.state == State::Through && !self.buf.is_empty() {
            out.append(&mut self.buf);
        }
        if self.state == State::Forbidden {
            self.buf = Vec::new();
        }
        Ok(out)
    }

    /// A whole line (to CRLF) at the start of `buf`: its length with the CRLF.
    fn line(&self) -> Result<Option<usize>, Violation> {
        match self.buf.windows(2).position(|w| w == b"\r\n") {
            Some(i) => Ok(Some(i + 2)),
            None if self.buf.len() > MAX_LINE => Err(self.violation(0, "a line longer than 1 KiB")),
            None => Ok(None),
        }
    }

    /// Passes up to `n` body bytes that are buffered: how many; the state
    /// after is `then` once all `n` have passed, else `more` of the rest.
    /// `None` while none are buffered.
    fn body(&mut self, n: u64, then: State, more: fn(u64) -> State) -> Option<usize> {
        let take = usize::try_from(n).unwrap_or(usize::MAX).min(self.buf.len());
        if take == 0 && n > 0 {
            return None;
        }
        let left = n - take as u64;
        self.state = if left == 0 { then } else { more(left) };
        Some(take)
    }

    fn chunk_size(&mut self) -> Result<Option<usize>, Violation> {
        let Some(n) = self.line()? else {
            return Ok(None);
        };
        let text = std::str::from_utf8(&self.buf[..n - 2]).unwrap_or("");
        let hex = text.split(';').next().unwrap_or("").trim_end();
        let size = u64::from_str_radix(hex, 16)
            .ok()
            .filter(|_| !hex.is_empty() && hex.len() <= 15)
            .ok_or_else(|| {
                self.violation(
                    0,
                    format!("bad chunk size {:?}", crate::refusals::peer_text(text)),
                )
            })?;
        self.state = if size == 0 {
            State::Trailer
        } else {
            State::ChunkData(size)
        };
        Ok(Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http() {
        assert_eq!(
            sniff(AppProtocol::Http, b"GET / HTTP/1.1\r\n"),
            Sniff::Match
        );
        assert_eq!(sniff(AppProtocol::Http, b"POS"), Sniff::NeedMore);
        assert_eq!(sniff(AppProtocol::Http, b""), Sniff::NeedMore);
        assert_eq!(
            sniff(AppProtocol::Http, b"SSH-2.0-OpenSSH"),
            Sniff::Mismatch
        );
        assert_eq!(
            sniff(AppProtocol::Http, &[0x16, 0x03, 0x01]),
            Sniff::Mismatch
        );
    }

    #[test]
    fn tls() {
        assert_eq!(
            sniff(AppProtocol::Tls, &[0x16, 0x03, 0x01, 0x02, 0x00]),
            Sniff::Match
        );
        assert_eq!(sniff(AppProtocol::Tls, &[0x16]), Sniff::NeedMore);
        assert_eq!(sniff(AppProtocol::Tls, b"GET / HTTP/1.1"), Sniff::Mismatch);
        assert_eq!(
            sniff(AppProtocol::Tls, &[0x16, 0x03, 0x09]),
            Sniff::Mismatch
        );
    }

    fn feed_all(proto: AppProtocol, parts: &[&[u8]]) -> Result<Vec<u8>, Violation> {
        let mut i = Inspector::new(proto);
        let mut out = Vec::new();
        for p in parts {
            out.extend(i.feed(p)?);
        }
        Ok(out)
    }

    #[test]
    fn every_request_of_a_connection_is_checked() {
        let two = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        assert_eq!(
            feed_all(AppProtocol::Http, &[two]).expect("ok"),
            two.to_vec()
        );
        // Byte by byte, the same.
        let bytes: Vec<&[u8]> = two.chunks(1).collect();
        assert_eq!(
            feed_all(AppProtocol::Http, &bytes).expect("ok"),
            two.to_vec()
        );
        // A head ended by bare LFs, with a binary body in the same piece.
        let lf = b"POST / HTTP/1.1\nHost: x\nContent-Length: 2\n\n\x00\x01";
        assert_eq!(feed_all(AppProtocol::Http, &[lf]).expect("ok"), lf.to_vec());
        // A head is held until it is whole.
        let mut i = Inspector::new(AppProtocol::Http);
        assert!(i.feed(b"GET / HTTP/1.1\r\nHo").expect("ok").is_empty());
        assert_eq!(i.feed(b"st: x\r\n\r\n").expect("ok").len(), 27);
        for (bad, why) in [
            (&b"GET \x00\x01\x02\x03 binary"[..], "request line"),
            (&b"PUT "[..], ""),
            (
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\nSSH-2.0-OpenSSH_9.2\r\n",
                "not an HTTP request line",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both",
            ),
            (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", "Upgrade"),
            (b"CONNECT x:22 HTTP/1.1\r\n\r\n", "CONNECT"),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
                "not chunked",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "chunk size",
            ),
        ] {
            let got = feed_all(AppProtocol::Http, &[bad]);
            if why.is_empty() {
                // Only a prefix: nothing released, nothing refused yet.
                assert_eq!(got, Ok(vec![]));
                let mut i = Inspector::new(AppProtocol::Http);
                let _ = i.feed(bad);
                let e = i.feed(&[0xff; 256]).expect_err("PUT and raw bytes");
                assert!(e.reason.contains("request line"), "{e:?}");
                continue;
            }
            let e = got.expect_err(std::str::from_utf8(bad).unwrap_or("bytes"));
            assert!(e.reason.contains(why), "{why}: {e:?}");
        }
        let e = feed_all(
            AppProtocol::Http,
            &[b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01"],
        )
        .expect_err("tls after http");
        assert_eq!(e.offset, 18);
    }

    fn client_hello() -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0x00, 0x02, 0x13, 0x01]); // one suite
        body.extend([0x01, 0x00]); // compression: null
        let ext = [0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]; // supported_versions
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![0x01, 0, 0, body.len() as u8];
        hs.extend(body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    /// A ClientHello asking for `name`.
    fn hello_for(name: &str) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([7u8; 32]);
        body.push(0);
        body.extend([0x00, 0x02, 0x13, 0x01]);
        body.extend([0x01, 0x00]);
        let n = name.as_bytes();
        let entry_len = 3 + n.len();
        let mut sni = vec![0x00, 0x00];
        sni.extend(((2 + entry_len) as u16).to_be_bytes());
        sni.extend((entry_len as u16).to_be_bytes());
        sni.push(0);
        sni.extend((n.len() as u16).to_be_bytes());
        sni.extend(n);
        body.extend((sni.len() as u16).to_be_bytes());
        body.extend(sni);
        let mut hs = vec![0x01, 0, 0, body.len() as u8];
        hs.extend(body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn sni_and_upgrade_follow_the_service() {
        let only = |names: &[&str]| {
            Inspector::requests(
                AppProtocol::Tls,
                std::sync::Arc::new(Rules {
                    sni: names.iter().map(|n| (*n).to_owned()).collect(),
                    ..Rules::default()
                }),
            )
        };
        let ok = hello_for("Pension.JL.gov.cn");
        assert_eq!(only(&["pension.jl.gov.cn"]).feed(&ok).expect("allowed"), ok);
        let e = only(&["records.jl.gov.cn"])
            .feed(&ok)
            .expect_err("another name");
        assert!(e.reason.contains("pension.jl.gov.cn"), "{e:?}");
        let e = only(&["records.jl.gov.cn"])
            .feed(&client_hello())
            .expect_err("none");
        assert!(e.reason.contains("no server name"), "{e:?}");
        assert!(Inspector::new(AppProtocol::Tls).feed(&ok).is_ok());
        let ws = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello";
        assert!(Inspector::new(AppProtocol::Http).feed(ws).is_err());
        let mut i = Inspector::requests(
            AppProtocol::Http,
            std::sync::Arc::new(Rules {
                allow_upgrade: true,
                ..Rules::default()
            }),
        );
        assert_eq!(i.feed(ws).expect("upgrade allowed"), ws.to_vec());
        assert_eq!(
            i.feed(b"\x00\xffraw").expect("upgraded"),
            b"\x00\xffraw".to_vec()
        );
    }

    #[test]
    fn a_tls_stream_must_open_with_a_whole_client_hello() {
        let mut hello = client_hello();
        hello.extend(b"encrypted records follow");
        assert_eq!(feed_all(AppProtocol::Tls, &[&hello]).expect("ok"), hello);
        let parts: Vec<&[u8]> = hello.chunks(3).collect();
        assert_eq!(feed_all(AppProtocol::Tls, &parts).expect("ok"), hello);
        let mut garbage = vec![0x16, 0x03, 0x01, 0x00, 0x40];
        garbage.extend([0xAB; 64]);
        assert!(feed_all(AppProtocol::Tls, &[&garbage]).is_err());
        let mut short = client_hello();
        short[8] = 0xff; // handshake length past the record
        assert!(feed_all(AppProtocol::Tls, &[&short]).is_err());
        assert!(feed_all(AppProtocol::Tls, &[b"GET / HTTP/1.1"]).is_err());
    }

    proptest::proptest! {
        /// Any bytes in any pieces: released bytes are always a prefix of the
        /// input, and never a panic.
        #[test]
        fn released_bytes_are_a_prefix_of_the_stream(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            cut in 0usize..400,
            kind in 0u8..3,
        ) {
            let inspector = || match kind {
                0 => Inspector::new(AppProtocol::Http),
                1 => Inspector::new(AppProtocol::Tls),
                _ => {
                    let mut i = Inspector::responses();
                    for head in [false, true, false] {
                        let _ = i.expect(Asked { head, upgrade: false });
                    }
                    i
                }
            };
            let cut = cut.min(data.len());
            let mut i = inspector();
            let mut out = Vec::new();
            let mut failed = false;
            for part in [&data[..cut], &data[cut..]] {
                match i.feed(part) {
                    Ok(b) => out.extend(b),
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            // However the stream is cut, the same bytes pass.
            if let (false, Ok(whole)) = (failed, inspector().feed(&data)) {
                proptest::prop_assert_eq!(&whole, &out);
            }
            proptest::prop_assert!(data.starts_with(&out));
        }
    }
}
