//! `http`: request and response heads, checked, and their bodies delimited
//! as HTTP/1.1 says (RFC 9112 section 6).

use super::{Asked, Inspector, MAX_HEAD, MAX_HEADERS, MAX_SNIFF, Side, Sniff, State, Violation};
use crate::config::AppProtocol;
use crate::refusals::peer_text;

/// How a message's body is delimited, from its headers.
struct Framing {
    length: Option<u64>,
    chunked: bool,
    upgrade: bool,
}

impl Inspector {
    /// A whole head at the start of `buf` (a request's, or a response's on
    /// the response side), checked: its length.
    pub(super) fn head(&mut self) -> Result<Option<usize>, Violation> {
        let what = match self.side {
            Side::Request => "request",
            Side::Response => "response",
        };
        // Not even the start of a method (or of `HTTP/1.`): refuse without
        // waiting for more.
        let start = &self.buf[..self.buf.len().min(MAX_SNIFF)];
        let starts = match self.side {
            Side::Request => super::sniff(AppProtocol::Http, start) != Sniff::Mismatch,
            Side::Response => b"HTTP/1."[..start.len().min(7)] == start[..start.len().min(7)],
        };
        if !starts {
            return Err(self.violation(0, format!("not an HTTP {what} line")));
        }
        // The first line is visible ASCII (a response's reason phrase may
        // carry obs-text), the headers have no control bytes but tab, CR and
        // LF: refused at once, whatever comes after. Each byte is looked at
        // once, however the head is cut into pieces.
        let from = self.scanned;
        let upto = self.buf.len().min(MAX_HEAD + 1);
        let mut newline = false;
        for i in from..upto {
            let b = self.buf[i];
            if !self.in_headers {
                let fine = (0x20..0x7f).contains(&b)
                    || b == b'\r'
                    || (self.side == Side::Response && (b >= 0x80 || b == b'\t'));
                if b == b'\n' {
                    self.in_headers = true;
                    newline = true;
                } else if !fine {
                    return Err(self.violation(i, format!("byte 0x{b:02x} in the {what} line")));
                }
            } else {
                if (b < 0x20 && !matches!(b, b'\t' | b'\r' | b'\n')) || b == 0x7f {
                    return Err(
                        self.violation(i, format!("control byte 0x{b:02x} in the {what} head"))
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
                return Err(self.violation(0, format!("a {what} head longer than 16 KiB")));
            }
            return Ok(None);
        }
        match self.side {
            Side::Request => self.request_head(),
            Side::Response => self.response_head(),
        }
    }

    fn request_head(&mut self) -> Result<Option<usize>, Violation> {
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
        let framing = self.framing(req.headers, true)?;
        let (method, target) = (method.to_owned(), req.path.unwrap_or("").to_owned());
        self.requests += 1;
        (self.scanned, self.in_headers) = (0, false);
        if let Err(f) = super::allow::permits(&self.rules.http_allow, &method, &target) {
            // Held back: the gateway answers it, the server never sees it.
            self.forbidden = Some(f);
            self.state = State::Forbidden;
            return Ok(None);
        }
        self.asked.push_back(Asked {
            head: method == "HEAD",
            upgrade: framing.upgrade,
        });
        self.state = if framing.upgrade {
            // The upgraded protocol's bytes are not HTTP.
            State::Through
        } else {
            body(&framing)
        };
        Ok(Some(len))
    }

    fn response_head(&mut self) -> Result<Option<usize>, Violation> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut headers);
        let window = &self.buf[..self.buf.len().min(MAX_HEAD + 1)];
        let len = match res.parse(window) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if self.buf.len() > MAX_HEAD => {
                return Err(self.violation(0, "a response head longer than 16 KiB"));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(self.violation(0, format!("not a valid HTTP response: {e}"))),
        };
        let code = res.code.unwrap_or(0);
        let Some(asked) = self.asked.front().copied() else {
            return Err(self.violation(0, format!("a {code} response no request asked for")));
        };
        let framing = self.framing(res.headers, false)?;
        (self.scanned, self.in_headers) = (0, false);
        self.requests += 1;
        self.state = match code {
            101 if asked.upgrade => {
                self.asked.pop_front();
                State::Through
            }
            101 => {
                return Err(self.violation(
                    0,
                    "101 Switching Protocols to a request that asked no upgrade",
                ));
            }
            // Interim: the final response to the same request follows.
            100..=199 => State::Head,
            _ => {
                self.asked.pop_front();
                if asked.head || code == 204 || code == 304 {
                    State::Head
                } else if framing.chunked || framing.length.is_some() {
                    body(&framing)
                } else {
                    // Delimited by the server's close: the rest is body.
                    State::Through
                }
            }
        };
        Ok(Some(len))
    }

    /// The body framing a head's headers declare, refusing the ambiguous
    /// (both lengths, two different lengths, a coding other than chunked)
    /// and, on a request, an `Upgrade` the service does not allow.
    fn framing(
        &self,
        headers: &[httparse::Header<'_>],
        request: bool,
    ) -> Result<Framing, Violation> {
        let mut f = Framing {
            length: None,
            chunked: false,
            upgrade: false,
        };
        let mut te = false;
        for h in headers {
            let value = std::str::from_utf8(h.value).unwrap_or("").trim();
            if h.name.eq_ignore_ascii_case("content-length") {
                let n: u64 = value.parse().map_err(|_| {
                    self.violation(0, format!("bad Content-Length {:?}", peer_text(value)))
                })?;
                if f.length.is_some_and(|l| l != n) {
                    return Err(self.violation(0, "two different Content-Length headers"));
                }
                f.length = Some(n);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = true;
                f.chunked = value.eq_ignore_ascii_case("chunked");
                if !f.chunked {
                    return Err(self.violation(
                        0,
                        format!("Transfer-Encoding {:?} is not chunked", peer_text(value)),
                    ));
                }
            } else if request && h.name.eq_ignore_ascii_case("upgrade") {
                if !self.rules.allow_upgrade {
                    return Err(self.violation(
                        0,
                        format!(
                            "Upgrade to {:?} is refused (the service sets no allow_upgrade)",
                            peer_text(value)
                        ),
                    ));
                }
                f.upgrade = true;
            }
        }
        if te && f.length.is_some() {
            return Err(self.violation(0, "both Transfer-Encoding and Content-Length"));
        }
        Ok(f)
    }
}

/// The state that reads a body framed by `f`.
fn body(f: &Framing) -> State {
    if f.chunked {
        State::ChunkSize
    } else {
        match f.length {
            Some(n) if n > 0 => State::Fixed(n),
            _ => State::Head,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{Asked, Inspector, Rules};
    use crate::config::{AppProtocol, HttpAllow};

    /// A client's requests and the server's responses, each side fed whole:
    /// what each side releases.
    fn exchange(requests: &[u8], responses: &[u8]) -> (Vec<u8>, Result<Vec<u8>, String>) {
        let mut req = Inspector::new(AppProtocol::Http);
        let sent = req.feed(requests).expect("requests");
        let mut res = Inspector::responses();
        for a in req.take_asked() {
            res.expect(a).expect("room");
        }
        (sent, res.feed(responses).map_err(|v| v.reason))
    }

    #[test]
    fn responses_are_followed_request_by_request() {
        let requests = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nHEAD /b HTTP/1.1\r\nHost: x\r\n\r\nPOST /c HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi";
        let responses = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let (sent, got) = exchange(requests, responses);
        assert_eq!(sent, requests.to_vec());
        assert_eq!(got, Ok(responses.to_vec()));
        // Byte by byte, the same, and every request is answered.
        let mut req = Inspector::new(AppProtocol::Http);
        let _ = req.feed(requests).expect("requests");
        let mut res = Inspector::responses();
        for a in req.take_asked() {
            res.expect(a).expect("room");
        }
        let mut out = Vec::new();
        for b in responses.chunks(1) {
            out.extend(res.feed(b).expect("response"));
        }
        assert_eq!(out, responses.to_vec());
        assert!(res.answered());
        // A body delimited by the close: everything after passes.
        let (_, got) = exchange(
            b"GET / HTTP/1.0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\n\r\nanything \x00\x01 at all",
        );
        assert!(got.is_ok());
    }

    #[test]
    fn a_response_that_is_not_http_cuts_the_relay() {
        let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for (responses, why) in [
            (&b"SSH-2.0-OpenSSH_9.2\r\n"[..], "not an HTTP response line"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
                "no request asked for",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokSSH-2.0-x\r\n",
                "not an HTTP response line",
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                "asked no upgrade",
            ),
            (b"HTTP/1.1 200 OK\r\nX: a\x01b\r\n\r\n", "control byte"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both",
            ),
            (b"HTTP/1.1 2x0 OK\r\n\r\n", "not a valid HTTP response"),
        ] {
            let (_, got) = exchange(get, responses);
            let e = got.expect_err(why);
            assert!(e.contains(why), "{why}: {e}");
        }
        // An allowed upgrade turns the connection over on 101.
        let rules = Arc::new(Rules {
            allow_upgrade: true,
            ..Rules::default()
        });
        let mut req = Inspector::requests(AppProtocol::Http, rules);
        let _ = req
            .feed(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")
            .expect("upgrade");
        let mut res = Inspector::responses();
        for a in req.take_asked() {
            assert_eq!(
                a,
                Asked {
                    head: false,
                    upgrade: true
                }
            );
            res.expect(a).expect("room");
        }
        let ws = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi";
        assert_eq!(res.feed(ws).expect("switched"), ws.to_vec());
        // Too many requests waiting.
        let mut res = Inspector::responses();
        let a = Asked {
            head: false,
            upgrade: false,
        };
        for _ in 0..super::super::MAX_PIPELINED {
            res.expect(a).expect("room");
        }
        assert!(res.expect(a).is_err());
    }

    #[test]
    fn a_forbidden_request_is_held_back_with_all_after_it() {
        let rules = Arc::new(Rules {
            http_allow: vec![HttpAllow {
                methods: vec!["GET".into()],
                paths: vec!["/reports/".into()],
            }],
            ..Rules::default()
        });
        let ok = b"GET /reports/q3 HTTP/1.1\r\nHost: x\r\n\r\n";
        let bad = b"GET /reports/%2e%2e/admin HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut stream = ok.to_vec();
        stream.extend(bad);
        stream.extend(ok);
        for piece in [stream.len(), 1] {
            let mut i = Inspector::requests(AppProtocol::Http, rules.clone());
            let mut out = Vec::new();
            for c in stream.chunks(piece) {
                out.extend(i.feed(c).expect("no violation"));
            }
            assert_eq!(out, ok.to_vec());
            let f = i.forbidden().expect("forbidden");
            assert_eq!((f.method.as_str(), f.path.as_str()), ("GET", "/admin"));
            assert_eq!(i.take_asked().len(), 1);
            assert!(i.feed(b"more bytes").expect("held").is_empty());
        }
    }
}
