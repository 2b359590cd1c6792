//! `tls`: the first record must be a whole, well-formed ClientHello, asking
//! for a server name the service allows.

use super::{Inspector, MAX_RECORD, Sniff, State, Violation, sniff};
use crate::config::AppProtocol;

impl Inspector {
    /// The first TLS record, whole and a well-formed ClientHello: its length.
    pub(super) fn hello(&mut self) -> Result<Option<usize>, Violation> {
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
            if !self.rules.sni.is_empty() && !names.iter().any(|n| self.rules.sni.contains(n)) {
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
        } else if !self.rules.sni.is_empty() {
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
