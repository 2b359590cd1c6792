//! Application-protocol checks of a relayed connection (rule R5.app-protocol):
//! [`sniff`] tells from the first bytes whether this can be HTTP/1.x or a TLS
//! handshake; [`Inspector`] then follows the client's whole stream:
//!
//! - `http`: every request on the connection (keep-alive and pipelined) must
//!   have a valid request line and headers (httparse) before any of its bytes
//!   are released; its body is delimited by `Content-Length` or chunked
//!   encoding as HTTP/1.1 says, and the next request is checked again. Both
//!   lengths, an unknown `Transfer-Encoding`, `Upgrade` and `CONNECT` are
//!   refused (request smuggling, tunnels).
//! - `tls`: the first record must be a whole, well-formed ClientHello
//!   (content type 22, handshake type 1, every length consistent) before a byte
//!   is released; the rest is encrypted and passes.
//!
//! A violation names its byte offset in the stream.

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
    /// Byte offset in the client's stream.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

/// Follows a client's stream and releases the bytes that were checked.
#[derive(Debug)]
pub struct Inspector {
    /// Bytes received, not yet released.
    buf: Vec<u8>,
    /// Offset of `buf[0]` in the stream.
    offset: u64,
    state: State,
    /// Requests checked so far.
    pub requests: u64,
    /// `http`: an `Upgrade` request passes, and the rest of the connection
    /// is the upgraded protocol's.
    allow_upgrade: bool,
    /// `tls`: the server names a ClientHello may ask for (empty: any).
    sni: Vec<String>,
    /// `http`: bytes of the current head already checked ...
    scanned: usize,
    /// ... and whether its request line has ended.
    in_headers: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// HTTP: waiting for a whole request head.
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
    /// TLS: waiting for the whole first record.
    Hello,
    /// Checked; everything passes.
    Through,
}

impl Inspector {
    /// An inspector of a client's stream for `proto`.
    pub fn new(proto: AppProtocol) -> Self {
        Self::for_service(proto, false, Vec::new())
    }

    /// An inspector for a service's `app_protocol`, `allow_upgrade` and
    /// `sni` (lowercase names).
    pub fn for_service(proto: AppProtocol, allow_upgrade: bool, sni: Vec<String>) -> Self {
        Inspector {
            scanned: 0,
            in_headers: false,
            allow_upgrade,
            sni,
            buf: Vec::new(),
            offset: 0,
            state: match proto {
                AppProtocol::Http => State::Head,
                AppProtocol::Tls => State::Hello,
            },
            requests: 0,
        }
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
        if self.state == State::Through {
            return Ok(data.to_vec());
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
                State::Fixed(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(self.buf.len());
                    if take == 0 && n > 0 {
                        break;
                    }
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Fixed(left)
                    };
                    take
                }
                State::ChunkSize => match self.chunk_size()? {
                    Some(n) => n,
                    None => break,
                },
                State::ChunkData(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(self.buf.len());
                    if take == 0 {
                        break;
                    }
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left)
                    };
                    take
                }
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

    /// A whole request head at the start of `buf`, checked: its length.
    fn head(&mut self) -> Result<Option<usize>, Violation> {
        // Not even the start of a method: refuse without waiting for more.
        if sniff(
            AppProtocol::Http,
            &self.buf[..self.buf.len().min(MAX_SNIFF)],
        ) == Sniff::Mismatch
        {
            return Err(self.violation(0, "not an HTTP request line"));
        }
        // The request line is visible ASCII, the headers have no control
        // bytes but tab, CR and LF: refused at once, whatever comes after.
        // Each byte is looked at once, however the head is cut into pieces.
        let from = self.scanned;
        let upto = self.buf.len().min(MAX_HEAD + 1);
        let mut newline = false;
        for i in from..upto {
            let b = self.buf[i];
            if !self.in_headers {
                if b == b'\n' {
                    self.in_headers = true;
                    newline = true;
                } else if !(0x20..0x7f).contains(&b) && b != b'\r' {
                    return Err(self.violation(i, format!("byte 0x{b:02x} in the request line")));
                }
            } else {
                if (b < 0x20 && !matches!(b, b'\t' | b'\r' | b'\n')) || b == 0x7f {
                    return Err(
                        self.violation(i, format!("control byte 0x{b:02x} in the request head"))
                    );
                }
                if b == b'\n' {
                    newline = true;
                    if (i >= 3 && &self.buf[i - 3..=i] == b"\r\n\r\n")
                        || (i >= 1 && &self.buf[i - 1..=i] == b"\n\n")
                    {
                        // The head ends here; what follows is the body's.
                        self.scanned = i + 1;
                        break;
                    }
                }
            }
            self.scanned = i + 1;
        }
        if !newline {
            // A head completes, or a line fails, only at a newline.
            if self.buf.len() > MAX_HEAD {
                return Err(self.violation(0, "a request head longer than 16 KiB"));
            }
            return Ok(None);
        }
        // Parsed as far as it goes: bytes that cannot start a valid head are
        // refused at once, a valid prefix waits for the rest.
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let window = &self.buf[..self.buf.len().min(MAX_HEAD + 1)];
        let len = match req.parse(window) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if self.buf.len() > MAX_HEAD => {
                return Err(self.violation(0, "a request head longer than 16 KiB"));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(self.violation(0, format!("not a valid HTTP request: {e}"))),
        };
        let method = req.method.unwrap_or("");
        if method == "CONNECT" {
            return Err(self.violation(0, "CONNECT (a tunnel) is refused"));
        }
        let (mut length, mut chunked, mut te, mut upgrade) = (None::<u64>, false, false, false);
        for h in req.headers.iter() {
            let value = std::str::from_utf8(h.value).unwrap_or("").trim();
            if h.name.eq_ignore_ascii_case("content-length") {
                let n: u64 = value.parse().map_err(|_| {
                    self.violation(
                        0,
                        format!("bad Content-Length {:?}", crate::refusals::peer_text(value)),
                    )
                })?;
                if length.is_some_and(|l| l != n) {
                    return Err(self.violation(0, "two different Content-Length headers"));
                }
                length = Some(n);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = true;
                chunked = value.eq_ignore_ascii_case("chunked");
                if !chunked {
                    return Err(self.violation(
                        0,
                        format!(
                            "Transfer-Encoding {:?} is not chunked",
                            crate::refusals::peer_text(value)
                        ),
                    ));
                }
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                if !self.allow_upgrade {
                    return Err(self.violation(
                        0,
                        format!(
                            "Upgrade to {:?} is refused (the service sets no allow_upgrade)",
                            crate::refusals::peer_text(value)
                        ),
                    ));
                }
                upgrade = true;
            }
        }
        if te && length.is_some() {
            return Err(self.violation(0, "both Transfer-Encoding and Content-Length"));
        }
        self.requests += 1;
        (self.scanned, self.in_headers) = (0, false);
        self.state = if upgrade {
            // The upgraded protocol's bytes are not HTTP.
            State::Through
        } else if chunked {
            State::ChunkSize
        } else {
            match length {
                Some(n) if n > 0 => State::Fixed(n),
                _ => State::Head,
            }
        };
        Ok(Some(len))
    }

    /// The first TLS record, whole and a well-formed ClientHello: its length.
    fn hello(&mut self) -> Result<Option<usize>, Violation> {
        let b = &self.buf;
        if b.len() < 5 {
            if sniff(AppProtocol::Tls, b) == Sniff::Mismatch {
                return Err(self.violation(0, "not a TLS handshake record"));
            }
            return Ok(None);
        }
        if b[0] != 0x16 || b[1] != 0x03 || b[2] > 0x04 {
            return Err(self.violation(0, "not a TLS handshake record"));
        }
        let rec = usize::from(u16::from_be_bytes([b[3], b[4]]));
        if !(4..=MAX_RECORD).contains(&rec) {
            return Err(self.violation(3, format!("a TLS record of {rec} bytes")));
        }
        if b.len() < 5 + rec {
            return Ok(None);
        }
        let h = &b[5..5 + rec];
        if h[0] != 0x01 {
            return Err(self.violation(5, "the first handshake message is not a ClientHello"));
        }
        let len = (usize::from(h[1]) << 16) | (usize::from(h[2]) << 8) | usize::from(h[3]);
        if len + 4 > rec {
            return Err(self.violation(
                6,
                "a ClientHello longer than its record (fragmented hellos are not accepted)",
            ));
        }
        let body = &h[4..4 + len];
        // legacy_version (2), random (32), session id, cipher suites,
        // compression methods, extensions: each length inside the body.
        let mut at = 34usize;
        let bad = |at: usize, what: &str| Violation {
            offset: self.offset + 9 + at as u64,
            reason: format!("a malformed ClientHello: {what}"),
        };
        let byte = |at: usize| body.get(at).copied().map(usize::from);
        let pair =
            |at: usize| Some((usize::from(*body.get(at)?) << 8) | usize::from(*body.get(at + 1)?));
        if body.len() < 34 || body[0] != 0x03 {
            return Err(bad(0, "legacy version"));
        }
        let sid = byte(at).ok_or_else(|| bad(at, "session id"))?;
        if sid > 32 {
            return Err(bad(at, "session id longer than 32 bytes"));
        }
        at += 1 + sid;
        let suites = pair(at).ok_or_else(|| bad(at, "cipher suites"))?;
        if suites < 2 || suites % 2 != 0 {
            return Err(bad(at, "cipher suites"));
        }
        at += 2 + suites;
        let comp = byte(at).ok_or_else(|| bad(at, "compression methods"))?;
        if comp < 1 {
            return Err(bad(at, "compression methods"));
        }
        at += 1 + comp;
        if at > body.len() {
            return Err(bad(at, "lengths past its end"));
        }
        if at < body.len() {
            let ext = pair(at).ok_or_else(|| bad(at, "extensions"))?;
            at += 2;
            if at + ext != body.len() {
                return Err(bad(at, "extension lengths do not add up"));
            }
            let mut e = at;
            let mut names: Vec<String> = Vec::new();
            while e < body.len() {
                let kind = pair(e).ok_or_else(|| bad(e, "an extension"))?;
                let l = pair(e + 2).ok_or_else(|| bad(e, "an extension"))?;
                if e + 4 + l > body.len() {
                    return Err(bad(e, "an extension past the end"));
                }
                if kind == 0 {
                    names = server_names(&body[e + 4..e + 4 + l])
                        .ok_or_else(|| bad(e, "server_name"))?;
                }
                e += 4 + l;
            }
            if !self.sni.is_empty() && !names.iter().any(|n| self.sni.contains(n)) {
                let asked = if names.is_empty() {
                    "no server name".to_owned()
                } else {
                    crate::refusals::peer_text(&names.join(", "))
                };
                return Err(Violation {
                    offset: self.offset,
                    reason: format!(
                        "the ClientHello asks for {asked}, not a name this service allows (sni)"
                    ),
                });
            }
        } else if !self.sni.is_empty() {
            return Err(bad(
                at,
                "no extensions, so no server name (the service sets sni)",
            ));
        }
        self.state = State::Through;
        Ok(Some(5 + rec))
    }
}

/// The host names of a `server_name` extension's data (lowercase).
fn server_names(d: &[u8]) -> Option<Vec<String>> {
    let list = (usize::from(*d.first()?) << 8) | usize::from(*d.get(1)?);
    if list + 2 != d.len() {
        return None;
    }
    let (mut at, mut out) = (2usize, Vec::new());
    while at < d.len() {
        let kind = *d.get(at)?;
        let l = (usize::from(*d.get(at + 1)?) << 8) | usize::from(*d.get(at + 2)?);
        let name = d.get(at + 3..at + 3 + l)?;
        if kind == 0 {
            out.push(String::from_utf8_lossy(name).to_ascii_lowercase());
        }
        at += 3 + l;
    }
    Some(out)
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
            Inspector::for_service(
                AppProtocol::Tls,
                false,
                names.iter().map(|n| (*n).to_owned()).collect(),
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
        let mut i = Inspector::for_service(AppProtocol::Http, true, Vec::new());
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
            tls in proptest::prelude::any::<bool>(),
        ) {
            let proto = if tls { AppProtocol::Tls } else { AppProtocol::Http };
            let cut = cut.min(data.len());
            let mut i = Inspector::new(proto);
            let mut out = Vec::new();
            for part in [&data[..cut], &data[cut..]] {
                match i.feed(part) {
                    Ok(b) => out.extend(b),
                    Err(_) => break,
                }
            }
            proptest::prop_assert!(data.starts_with(&out));
        }
    }
}
