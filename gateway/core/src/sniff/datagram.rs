//! Application-protocol checks of UDP services (rule R5.app-protocol), one
//! datagram at a time:
//!
//! - `rtp`: an RTP packet (RFC 3550 5.1): version 2, the CSRC list and a
//!   header extension within the datagram, padding counted by the last byte
//!   and within the payload, the payload type in `rtp_payload_types` when
//!   given. RTCP on the same flow (RFC 5761 4: the second byte 192-223) is a
//!   compound of RTCP packets, each version 2, whose lengths tile the datagram.
//! - `mpegts`: a whole number of 188-byte transport stream packets, each
//!   starting with the sync byte 0x47, their PIDs in `mpegts_pids` when given.
//!
//! A violation names its byte offset in the datagram. Pure and allocation-free.

/// What a datagram must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// RTP (and RTCP on the same flow), with these payload types only when not empty.
    Rtp(&'a [u8]),
    /// MPEG-TS, with these PIDs only when not empty.
    Mpegts(&'a [u16]),
}

/// Why a datagram was refused, at which byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    /// Byte offset in the datagram.
    pub offset: usize,
    /// What is wrong.
    pub reason: &'static str,
}

fn bad(offset: usize, reason: &'static str) -> Violation {
    Violation { offset, reason }
}

/// A datagram that passed: RTP or RTCP (for `rtp`), TS (for `mpegts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passed {
    /// An RTP packet.
    Rtp,
    /// An RTCP compound packet.
    Rtcp,
    /// Transport stream packets.
    Ts,
}

/// Checks one datagram.
///
/// # Errors
/// The first thing wrong with it, at its offset.
pub fn check(proto: &Datagram<'_>, d: &[u8]) -> Result<Passed, Violation> {
    match proto {
        Datagram::Rtp(types) => rtp(d, types),
        Datagram::Mpegts(pids) => mpegts(d, pids),
    }
}

fn rtp(d: &[u8], types: &[u8]) -> Result<Passed, Violation> {
    if d.len() < 4 {
        return Err(bad(d.len(), "shorter than an RTP or RTCP header"));
    }
    if d[0] >> 6 != 2 {
        return Err(bad(0, "not RTP version 2"));
    }
    if (192..=223).contains(&d[1]) {
        return rtcp(d);
    }
    if d.len() < 12 {
        return Err(bad(d.len(), "shorter than the 12-byte RTP header"));
    }
    let padding = d[0] & 0x20 != 0;
    let extension = d[0] & 0x10 != 0;
    let csrcs = usize::from(d[0] & 0x0f);
    let mut header = 12 + 4 * csrcs;
    if header > d.len() {
        return Err(bad(12, "the CSRC list runs past the datagram"));
    }
    if extension {
        if header + 4 > d.len() {
            return Err(bad(header, "the header extension runs past the datagram"));
        }
        let words = usize::from(u16::from_be_bytes([d[header + 2], d[header + 3]]));
        let end = header + 4 + 4 * words;
        if end > d.len() {
            return Err(bad(
                header + 2,
                "the header extension's length runs past the datagram",
            ));
        }
        header = end;
    }
    if padding {
        let count = usize::from(d[d.len() - 1]);
        if count == 0 || header + count > d.len() {
            return Err(bad(
                d.len() - 1,
                "the padding count is zero or longer than the payload",
            ));
        }
    }
    let pt = d[1] & 0x7f;
    if !types.is_empty() && !types.contains(&pt) {
        return Err(bad(1, "payload type not in rtp_payload_types"));
    }
    Ok(Passed::Rtp)
}

fn rtcp(d: &[u8]) -> Result<Passed, Violation> {
    let mut at = 0;
    while at < d.len() {
        if d.len() - at < 4 {
            return Err(bad(at, "an RTCP packet shorter than its header"));
        }
        if d[at] >> 6 != 2 {
            return Err(bad(at, "an RTCP packet not of version 2"));
        }
        if !(192..=223).contains(&d[at + 1]) {
            return Err(bad(at + 1, "not an RTCP packet type"));
        }
        let len = (usize::from(u16::from_be_bytes([d[at + 2], d[at + 3]])) + 1) * 4;
        if at + len > d.len() {
            return Err(bad(
                at + 2,
                "an RTCP packet's length runs past the datagram",
            ));
        }
        at += len;
    }
    Ok(Passed::Rtcp)
}

/// A transport stream packet's size.
pub const TS_PACKET: usize = 188;

fn mpegts(d: &[u8], pids: &[u16]) -> Result<Passed, Violation> {
    if d.is_empty() || d.len() % TS_PACKET != 0 {
        return Err(bad(
            d.len() - d.len() % TS_PACKET,
            "not a whole number of 188-byte transport stream packets",
        ));
    }
    for (i, p) in d.chunks_exact(TS_PACKET).enumerate() {
        let at = i * TS_PACKET;
        if p[0] != 0x47 {
            return Err(bad(
                at,
                "a transport stream packet without the 0x47 sync byte",
            ));
        }
        let pid = (u16::from(p[1] & 0x1f) << 8) | u16::from(p[2]);
        if !pids.is_empty() && !pids.contains(&pid) {
            return Err(bad(at + 1, "PID not in mpegts_pids"));
        }
    }
    Ok(Passed::Ts)
}

/// What a flow's violations call for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Audit this one (the flow's first, then one per [`AUDIT_EVERY_MS`]).
    pub audit: bool,
    /// Close the flow: more than its `max_violations` in a minute.
    pub close: bool,
    /// Violations counted in the current minute.
    pub in_minute: u32,
}

/// Audit at most one violation of a flow this often (after its first).
pub const AUDIT_EVERY_MS: i64 = 10_000;

/// A flow's violations.
#[derive(Debug, Clone, Default)]
pub struct Violations {
    minute_from: i64,
    in_minute: u32,
    last_audit: Option<i64>,
}

impl Violations {
    /// One more violation at `now_ms`; `max` a minute are allowed.
    pub fn add(&mut self, now_ms: i64, max: u32) -> Verdict {
        if now_ms - self.minute_from >= 60_000 {
            self.minute_from = now_ms;
            self.in_minute = 0;
        }
        self.in_minute = self.in_minute.saturating_add(1);
        let audit = self.last_audit.is_none_or(|t| now_ms - t >= AUDIT_EVERY_MS);
        if audit {
            self.last_audit = Some(now_ms);
        }
        Verdict {
            audit,
            close: self.in_minute > max,
            in_minute: self.in_minute,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtp_packet(
        pt: u8,
        csrcs: u8,
        ext_words: Option<u16>,
        payload: usize,
        pad: Option<u8>,
    ) -> Vec<u8> {
        let mut d = vec![0x80 | csrcs, pt, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9];
        d.extend(std::iter::repeat_n(0u8, 4 * usize::from(csrcs)));
        if let Some(w) = ext_words {
            d[0] |= 0x10;
            d.extend_from_slice(&[0xbe, 0xde]);
            d.extend_from_slice(&w.to_be_bytes());
            d.extend(std::iter::repeat_n(0u8, 4 * usize::from(w)));
        }
        d.extend(std::iter::repeat_n(7u8, payload));
        if let Some(p) = pad {
            d[0] |= 0x20;
            d.extend(std::iter::repeat_n(0u8, usize::from(p) - 1));
            d.push(p);
        }
        d
    }

    #[test]
    fn well_formed_rtp_and_rtcp_pass() {
        let any = Datagram::Rtp(&[]);
        assert_eq!(
            check(&any, &rtp_packet(96, 0, None, 100, None)),
            Ok(Passed::Rtp)
        );
        assert_eq!(
            check(&any, &rtp_packet(33, 2, Some(1), 50, Some(4))),
            Ok(Passed::Rtp)
        );
        // An RTCP receiver report (8 bytes) followed by an SDES (12 bytes).
        let mut rtcp = vec![0x80, 201, 0, 1, 0, 0, 0, 9];
        rtcp.extend_from_slice(&[0x81, 202, 0, 2, 0, 0, 0, 9, 1, 1, b'x', 0]);
        assert_eq!(check(&any, &rtcp), Ok(Passed::Rtcp));
        assert_eq!(
            check(&Datagram::Rtp(&[96]), &rtp_packet(96, 0, None, 10, None)),
            Ok(Passed::Rtp)
        );
    }

    #[test]
    fn malformed_rtp_is_refused_at_its_offset() {
        let any = Datagram::Rtp(&[]);
        let v = |d: &[u8]| check(&any, d).expect_err("refused");
        assert_eq!(v(b"GET / HTTP/1.1\r\n").reason, "not RTP version 2");
        assert_eq!(v(&[0x80, 96, 0]).offset, 3);
        let mut csrc = rtp_packet(96, 0, None, 0, None);
        csrc[0] |= 0x0f;
        assert_eq!(v(&csrc).offset, 12);
        let mut ext = rtp_packet(96, 0, Some(1), 0, None);
        ext[15] = 200;
        assert_eq!(v(&ext).offset, 14);
        let mut pad = rtp_packet(96, 0, None, 4, None);
        pad[0] |= 0x20;
        *pad.last_mut().expect("byte") = 200;
        assert_eq!(
            v(&pad).reason,
            "the padding count is zero or longer than the payload"
        );
        assert_eq!(
            check(&Datagram::Rtp(&[96]), &rtp_packet(8, 0, None, 10, None))
                .expect_err("pt")
                .reason,
            "payload type not in rtp_payload_types"
        );
        let mut rtcp = vec![0x80, 200, 0, 9, 0, 0, 0, 0];
        assert_eq!(v(&rtcp).offset, 2, "length past the datagram");
        rtcp[3] = 1;
        rtcp.extend_from_slice(&[0x80, 96, 0, 0]);
        assert_eq!(v(&rtcp).offset, 9, "a non-RTCP packet in a compound");
    }

    fn ts(pid: u16, n: usize) -> Vec<u8> {
        let mut d = Vec::new();
        for _ in 0..n {
            let mut p = vec![0xff; TS_PACKET];
            p[0] = 0x47;
            p[1] = ((pid >> 8) as u8) & 0x1f;
            p[2] = pid as u8;
            d.extend(p);
        }
        d
    }

    #[test]
    fn transport_streams_are_whole_packets_with_sync_bytes_and_allowed_pids() {
        assert_eq!(check(&Datagram::Mpegts(&[]), &ts(256, 7)), Ok(Passed::Ts));
        assert_eq!(
            check(&Datagram::Mpegts(&[0, 256]), &ts(256, 1)),
            Ok(Passed::Ts)
        );
        let v = |pids: &[u16], d: &[u8]| check(&Datagram::Mpegts(pids), d).expect_err("refused");
        assert_eq!(v(&[], &ts(256, 7)[..1000]).offset, 940);
        assert_eq!(
            v(&[], &[]).reason,
            "not a whole number of 188-byte transport stream packets"
        );
        let mut bad_sync = ts(256, 3);
        bad_sync[376] = 0x48;
        assert_eq!(v(&[], &bad_sync).offset, 376);
        assert_eq!(v(&[0, 256], &ts(257, 2)).offset, 1);
    }

    #[test]
    fn violations_are_audited_first_then_every_ten_seconds_and_close_past_the_max() {
        let mut v = Violations::default();
        let first = v.add(1_000, 3);
        assert!(first.audit && !first.close);
        assert!(!v.add(2_000, 3).audit);
        assert!(!v.add(3_000, 3).close);
        let fourth = v.add(4_000, 3);
        assert!(fourth.close, "four in a minute, three allowed");
        assert!(v.add(11_000, 3).audit, "ten seconds after the last audited");
        assert!(!v.add(70_000, 3).close, "a new minute");
    }
}
