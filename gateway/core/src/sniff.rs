//! Application-protocol checks on the first bytes of a relayed connection
//! (rule R5.app-protocol): is this HTTP/1.x, is this a TLS handshake?

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
}
