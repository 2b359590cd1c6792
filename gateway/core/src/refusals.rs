//! Refusals of unauthenticated peers, summarised for the audit (DESIGN.md
//! "Threats": summarise floods instead of writing one record per packet).
//!
//! The first refusal of each (source address, kind) is recorded at once; the
//! ones after it within [`WINDOW_MS`] are only counted, and [`Summary::poll_due`]
//! hands out one record per (source, kind) and window carrying the count. So an
//! attacker's pace sets a counter, never the audit's size.
//!
//! The table is capped at [`MAX_SOURCES`]: when it is full, sources that are
//! quiet are forgotten first; if every slot is busy, a new source is counted in
//! one overflow slot per kind (recorded like a source, with the address
//! `*`), so many addresses cannot flood the audit either.
//!
//! Pure: time comes in as Unix milliseconds.

use std::collections::HashMap;
use std::net::IpAddr;

/// Why a refusal that no boundary rule (docs/policy.md) decides was made: an
/// audit record of such a refusal carries one of these in its `rule` column,
/// as a rule-decided one carries the rule's id. docs/audit.md lists them
/// (tested against this list).
pub const REASONS: &[(&str, &str)] = &[
    (
        "no-route",
        "the target cannot be reached now: no tunnel up, the device not connected, no service of that name",
    ),
    ("protocol", "TCP asked of a UDP service, or the reverse"),
    ("max-connections", "the service is at its `max_connections`"),
    ("quota", "a producer or channel is over its quota"),
    (
        "spool",
        "a spooled file cannot be taken (too large, the spool full)",
    ),
    ("format", "a record is not in the channel's declared format"),
    (
        "size",
        "a request body longer than any record the node takes",
    ),
    ("slow", "a request body sent slower than the minimum rate"),
    (
        "D6.malware",
        "the scanner found malicious code (GB/T 22239-2019 8.1.3.4 a)",
    ),
    (
        "config",
        "an operator's config push, template or rollout the hub will not offer: it does not check, changes nothing, or conflicts with what the hub holds",
    ),
    (
        "roles",
        "the operator's account does not hold the role the action needs (three-role separation, DESIGN.md rule 7)",
    ),
    (
        "operator-credential",
        "an operator request without a valid credential",
    ),
    (
        "enrollment",
        "an enrollment refused (token unknown, used, expired or for another device)",
    ),
    (
        "enrollment-connection",
        "an enrollment connection that sent no request in time, or over the per-address limit",
    ),
    (
        "consumer-certificate",
        "a consumer request without a valid consumer certificate",
    ),
    (
        "superseded-certificate",
        "a tunnel with a certificate that is no longer its device's",
    ),
    ("revoked-device", "a tunnel from a revoked device"),
    (
        "producer-credential",
        "a producer without a valid token or certificate",
    ),
    ("connection-cap", "a connection over an HTTP listener's cap"),
    (
        "scan-refused",
        "the scanner would not scan a record (over its size limit): refused, not passed unscanned",
    ),
    (
        "scan-unavailable",
        "a record of a scanned channel while no scanner answers: refused, not passed unscanned",
    ),
    (
        "ca-bundle",
        "a CA bundle from a hub the box does not take: not signed by a CA it trusts, leaving that CA out, or older than the one it holds",
    ),
];

/// Whether `why` is one of [`REASONS`].
pub fn is_reason(why: &str) -> bool {
    REASONS.iter().any(|(r, _)| *r == why)
}

/// How long after a recorded refusal the same (source, kind) is only counted.
pub const WINDOW_MS: i64 = 10_000;
/// Sources remembered at once.
pub const MAX_SOURCES: usize = 4096;
/// Bytes of a peer-supplied string kept in an audit record.
pub const MAX_PEER_TEXT: usize = 256;

/// Who was refused: an address, or every address past the table's cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// One peer address.
    Addr(IpAddr),
    /// The addresses that found the table full.
    Overflow,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Addr(a) => write!(f, "{a}"),
            Source::Overflow => f.write_str("*"),
        }
    }
}

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Record it now (the first of its window), as from `source`.
    Record(Source),
    /// Only counted; a later [`Summary::poll_due`] reports it.
    Counted,
}

/// Refusals counted since the last record of a (source, kind), due now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// Who.
    pub source: Source,
    /// Which kind of refusal.
    pub kind: &'static str,
    /// How many since the last record.
    pub count: u64,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// When the last record of this (source, kind) was written.
    recorded_ms: i64,
    /// Refusals since then, not yet recorded.
    counted: u64,
}

/// The summariser's state.
#[derive(Debug, Default)]
pub struct Summary {
    slots: HashMap<(Source, &'static str), Slot>,
}

impl Summary {
    /// A refusal of `kind` from `addr` at `now_ms`.
    pub fn handle_refusal(&mut self, now_ms: i64, addr: IpAddr, kind: &'static str) -> Verdict {
        let mut source = Source::Addr(addr);
        if !self.slots.contains_key(&(source, kind)) && self.slots.len() >= MAX_SOURCES {
            self.forget_quiet(now_ms);
            if self.slots.len() >= MAX_SOURCES {
                source = Source::Overflow;
            }
        }
        match self.slots.get_mut(&(source, kind)) {
            Some(slot) if now_ms - slot.recorded_ms < WINDOW_MS => {
                slot.counted += 1;
                Verdict::Counted
            }
            Some(slot) if slot.counted > 0 => {
                // Its window ended with refusals not yet reported: they and this
                // one go into the next due record.
                slot.counted += 1;
                Verdict::Counted
            }
            Some(slot) => {
                slot.recorded_ms = now_ms;
                Verdict::Record(source)
            }
            None => {
                self.slots.insert(
                    (source, kind),
                    Slot {
                        recorded_ms: now_ms,
                        counted: 0,
                    },
                );
                Verdict::Record(source)
            }
        }
    }

    /// The counts whose window has ended, one per (source, kind); each is then
    /// recorded, which opens its next window.
    pub fn poll_due(&mut self, now_ms: i64) -> Vec<Due> {
        let mut due = Vec::new();
        for ((source, kind), slot) in &mut self.slots {
            if slot.counted > 0 && now_ms - slot.recorded_ms >= WINDOW_MS {
                due.push(Due {
                    source: *source,
                    kind,
                    count: slot.counted,
                });
                slot.counted = 0;
                slot.recorded_ms = now_ms;
            }
        }
        due.sort_by(|a, b| (a.kind, a.source.to_string()).cmp(&(b.kind, b.source.to_string())));
        self.forget_quiet(now_ms);
        due
    }

    /// Sources remembered now.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no source is remembered.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Forgets slots with nothing counted whose window has ended.
    fn forget_quiet(&mut self, now_ms: i64) {
        self.slots
            .retain(|_, s| s.counted > 0 || now_ms - s.recorded_ms < WINDOW_MS);
    }
}

/// Whether `c` is printed escaped: control characters, and the format and
/// separator characters that reorder or break text on a screen (bidirectional
/// overrides and isolates, zero-width characters, line and paragraph
/// separators, the byte-order mark).
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// A string a peer supplied (a claimed name, a token, a file name), made safe
/// for an audit record: control characters escaped (a newline cannot start a
/// forged line), and at most [`MAX_PEER_TEXT`] bytes kept, with how many
/// there were.
pub fn peer_text(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let piece: String = if hidden(c) {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        if out.len() + piece.len() > MAX_PEER_TEXT {
            out.push_str(&format!("...({} bytes in all)", s.len()));
            return out;
        }
        out.push_str(&piece);
    }
    out
}

/// Control characters of `s` escaped (for text output of audit records).
pub fn escape_controls(s: &str) -> String {
    if !s.chars().any(hidden) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if hidden(c) {
                c.escape_default().collect()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn a_flood_from_one_source_is_one_record_per_window_with_its_count() {
        let mut s = Summary::default();
        assert_eq!(
            s.handle_refusal(0, ip(1), "credential"),
            Verdict::Record(Source::Addr(ip(1)))
        );
        for t in 1..10_000 {
            assert_eq!(s.handle_refusal(t, ip(1), "credential"), Verdict::Counted);
        }
        assert!(s.poll_due(9_999).is_empty(), "the window has not ended");
        let due = s.poll_due(10_000);
        assert_eq!(
            due,
            [Due {
                source: Source::Addr(ip(1)),
                kind: "credential",
                count: 9_999
            }]
        );
        // The summary opened the next window: the next refusal is counted.
        assert_eq!(
            s.handle_refusal(10_001, ip(1), "credential"),
            Verdict::Counted
        );
        assert_eq!(s.poll_due(20_000)[0].count, 1);
        // A quiet source is recorded at once again, then forgotten.
        assert_eq!(
            s.handle_refusal(40_000, ip(1), "credential"),
            Verdict::Record(Source::Addr(ip(1)))
        );
        assert!(s.poll_due(60_000).is_empty());
        assert!(s.is_empty());
    }

    #[test]
    fn kinds_and_sources_are_summarised_apart() {
        let mut s = Summary::default();
        assert!(matches!(
            s.handle_refusal(0, ip(1), "a"),
            Verdict::Record(_)
        ));
        assert!(matches!(
            s.handle_refusal(0, ip(1), "b"),
            Verdict::Record(_)
        ));
        assert!(matches!(
            s.handle_refusal(0, ip(2), "a"),
            Verdict::Record(_)
        ));
        assert_eq!(s.handle_refusal(1, ip(2), "a"), Verdict::Counted);
    }

    #[test]
    fn many_sources_fill_the_table_then_share_one_overflow_slot() {
        let mut s = Summary::default();
        let addr = |i: usize| IpAddr::from(std::net::Ipv6Addr::from(i as u128));
        let mut records = 0;
        for i in 0..MAX_SOURCES * 3 {
            if matches!(s.handle_refusal(5, addr(i), "enroll"), Verdict::Record(_)) {
                records += 1;
            }
        }
        // Every slot busy: one record per source that found room, one for the rest.
        assert_eq!(records, MAX_SOURCES + 1);
        assert_eq!(s.len(), MAX_SOURCES + 1);
        let due = s.poll_due(WINDOW_MS + 5);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].source, Source::Overflow);
        assert_eq!(due[0].count, (MAX_SOURCES * 2 - 1) as u64);
        // Quiet sources go: the table has room again.
        let _ = s.poll_due(3 * WINDOW_MS);
        assert!(s.is_empty());
    }

    #[test]
    fn peer_text_escapes_controls_and_caps_the_length() {
        assert_eq!(peer_text("dept-a"), "dept-a");
        assert_eq!(peer_text("x\nrelay.open forged"), "x\\nrelay.open forged");
        let long = "a".repeat(1_500_000);
        let t = peer_text(&long);
        assert!(t.len() < MAX_PEER_TEXT + 40, "{}", t.len());
        assert!(t.ends_with("...(1500000 bytes in all)"));
        // Never cut inside a character.
        let t = peer_text(&"部".repeat(200));
        assert!(t.starts_with("部部"));
        assert_eq!(escape_controls("a\tb\u{1b}[31m"), "a\\tb\\u{1b}[31m");
        // Text that reorders or breaks lines on screen is shown escaped too.
        assert_eq!(
            peer_text("bob\u{2028}forged\u{202e}live"),
            "bob\\u{2028}forged\\u{202e}live"
        );
    }
}
