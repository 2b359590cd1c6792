//! Intrusion detection at the boundary (GB/T 22239-2019 8.1.3.3): what every
//! listener saw, per source, through leaky buckets, into detections that ban
//! the source and raise an alarm. Pure: events carry their time (Unix ms);
//! the daemon feeds them and carries out the verdicts.
//!
//! - [`bucket`]: leaky buckets (counting, and counting distinct targets).
//! - [`bans`]: the ban table, with escalation for sources that come back.
//! - [`baseline`]: hourly volumes per channel and service against their
//!   last 14 days (basic behaviour analysis).
//! - [`syslog`]: an alarm as an RFC 5424 message for the SOC.
//! - [`clamd`]: ClamAV's answers (verdicts, versions), read without trusting them.
//! - [`nflog`]: packets the nftables baseline dropped, as the kernel logs them.
//!
//! A source's address is trusted only when the event says it was verified
//! (a TCP connection, a QUIC connection past address validation): an event
//! from an address that could be spoofed (a UDP datagram) raises alarms but
//! never bans, so nobody can get a hub or a partner gateway banned by forging
//! its address. Proven and unproven events of a source are counted apart, so
//! forged events cannot fill the bucket a few real ones then tip into a ban.
//! Sources in `never_ban` are alarmed about and never banned.
//!
//! An IPv6 source counts as its /64 ([`source_key`]): one host holds a whole
//! /64 and could otherwise dodge every bucket and ban by changing address.

pub mod bans;
pub mod baseline;
pub mod bucket;
pub mod clamd;
pub mod nflog;
pub mod syslog;

use std::collections::HashMap;
use std::net::IpAddr;

use crate::table::{evict_oldest, shrink};
use bucket::{Distinct, Leaky, Shape};

/// The key a source is counted and banned under: an IPv4 address (an
/// IPv4-mapped IPv6 address as its IPv4 one), or an IPv6 address's /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// Which side an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the provincial side (a hub's publish, the QUIC port, the APIs).
    Inbound,
    /// From the legacy side (an access, an ingest).
    Outbound,
}

impl Direction {
    /// As written in alarms.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// What a listener saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// A crossing the policy refused; `target` is the port or service asked
    /// for (distinct targets make a scan).
    Refused {
        /// A stable number for the port or service (e.g. its port).
        target: u64,
    },
    /// A TLS or QUIC handshake that failed (a bad or expired certificate, none).
    HandshakeFailed,
    /// A certificate from a CA this node does not trust.
    ForeignCertificate,
    /// An application-protocol violation (R5.app-protocol).
    ProtocolViolation,
    /// A connection accepted and closed without a byte.
    EmptyConnection,
    /// A new connection (or UDP flow).
    Connection,
    /// A datagram of a UDP flow.
    Datagram {
        /// The flow.
        flow: u32,
    },
    /// Handshakes this source has in progress now.
    Handshakes {
        /// How many.
        in_progress: u32,
    },
    /// Content a channel refused (keywords, formats, sizes).
    ContentRefused,
    /// Malicious code found in what crossed.
    Malware {
        /// The scanner's name for it.
        signature: String,
    },
}

/// One event from a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Unix ms.
    pub at_ms: i64,
    /// The source address.
    pub source: IpAddr,
    /// Its port.
    pub port: u16,
    /// The device id its certificate names, if any.
    pub device: Option<String>,
    /// Whether the address is proven (a handshake completed with it).
    pub verified: bool,
    /// Which side.
    pub direction: Direction,
    /// The listener, service or channel.
    pub target: String,
    /// What happened.
    pub signal: Signal,
}

/// The kinds of attack detected; each has a stable rule id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Attack {
    /// Repeated policy refusals.
    Refusals,
    /// Distinct ports or services refused: a scan.
    Scan,
    /// Repeated handshake or certificate failures.
    HandshakeFailures,
    /// A certificate from a foreign CA.
    ForeignCa,
    /// Repeated application-protocol violations.
    ProtocolViolations,
    /// Repeated empty connections.
    EmptyConnections,
    /// Too many new connections per second.
    ConnectionFlood,
    /// Too many datagrams per flow per second.
    DatagramFlood,
    /// Too many handshakes in progress.
    HandshakeFlood,
    /// Repeated content refusals.
    ContentRefusals,
    /// Malicious code.
    Malware,
}

/// How serious an alarm is; `High` and above are the standard's serious
/// intrusions (8.1.3.3 d), forwarded at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Severity {
    /// Worth a look.
    #[default]
    Low,
    /// Hostile, not yet serious.
    Medium,
    /// A serious intrusion attempt.
    High,
    /// Malicious code, or worse.
    Critical,
}

impl Severity {
    /// Every severity, lowest first.
    pub const ALL: [Severity; 4] = [Self::Low, Self::Medium, Self::High, Self::Critical];

    /// Parses a severity as written in alarms.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// As written in alarms.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

impl Attack {
    /// The detector's rule id.
    pub fn rule(self) -> &'static str {
        match self {
            Self::Refusals => "D1.refusals",
            Self::Scan => "D2.scan",
            Self::HandshakeFailures => "D3.handshake",
            Self::ForeignCa => "D3.foreign-ca",
            Self::ProtocolViolations => "D4.protocol",
            Self::EmptyConnections => "D4.empty",
            Self::ConnectionFlood => "D5.connection-flood",
            Self::DatagramFlood => "D5.datagram-flood",
            Self::HandshakeFlood => "D5.handshake-flood",
            Self::ContentRefusals => "D6.content",
            Self::Malware => "D6.malware",
        }
    }

    /// The attack type, as written in alarms.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refusals => "repeated-refusals",
            Self::Scan => "scan",
            Self::HandshakeFailures => "handshake-failures",
            Self::ForeignCa => "foreign-certificate",
            Self::ProtocolViolations => "protocol-violations",
            Self::EmptyConnections => "empty-connections",
            Self::ConnectionFlood => "connection-flood",
            Self::DatagramFlood => "datagram-flood",
            Self::HandshakeFlood => "handshake-flood",
            Self::ContentRefusals => "content-refusals",
            Self::Malware => "malware",
        }
    }

    /// How serious.
    pub fn severity(self) -> Severity {
        match self {
            Self::EmptyConnections => Severity::Low,
            Self::Refusals
            | Self::HandshakeFailures
            | Self::ProtocolViolations
            | Self::ContentRefusals => Severity::Medium,
            Self::Scan
            | Self::ForeignCa
            | Self::ConnectionFlood
            | Self::DatagramFlood
            | Self::HandshakeFlood => Severity::High,
            Self::Malware => Severity::Critical,
        }
    }
}

/// The detectors' thresholds (`[detect]`); the defaults and where each comes
/// from are in docs/config.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thresholds {
    /// Policy refusals from one source: 10 in 60 s.
    pub refusals: Shape,
    /// Distinct ports or services refused: 15, one forgotten every 5 s.
    pub scan: Shape,
    /// Handshake failures: 5, one forgotten every 10 s.
    pub handshakes: Shape,
    /// Protocol violations: 5 in 60 s.
    pub protocol: Shape,
    /// Empty connections: 5 in 60 s.
    pub empty: Shape,
    /// New connections per source: 1,000 a second.
    pub connections: Shape,
    /// Datagrams per flow: 20,000 a second.
    pub datagrams: Shape,
    /// Handshakes in progress per source: 32.
    pub handshakes_in_progress: u32,
    /// Content refusals: 10 in 60 s.
    pub content: Shape,
    /// A ban's length (10 min).
    pub ban_ms: i64,
    /// A scanner's ban (4 h).
    pub scan_ban_ms: i64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            refusals: Shape::per(10, 60_000),
            scan: Shape::per(15, 15 * 5_000),
            handshakes: Shape::per(5, 5 * 10_000),
            protocol: Shape::per(5, 60_000),
            empty: Shape::per(5, 60_000),
            connections: Shape::per(1_000, 1_000),
            datagrams: Shape::per(20_000, 1_000),
            handshakes_in_progress: 32,
            content: Shape::per(10, 60_000),
            ban_ms: 10 * 60_000,
            scan_ban_ms: 4 * 3_600_000,
        }
    }
}

/// A detector tripped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    /// What it saw.
    pub attack: Attack,
    /// The event that tripped it (source, port, device, direction, target, time).
    pub event: Event,
    /// Events in the bucket when it overflowed.
    pub count: u32,
    /// The bucket's window, ms.
    pub window_ms: i64,
    /// How long to ban the source for; `None`: alarm only (never-ban
    /// source, or an address that could be spoofed).
    pub ban_ms: Option<i64>,
}

/// Sources whose buckets are kept at once; when full, empty buckets go
/// first, then the source seen longest ago.
pub const MAX_SOURCES: usize = 16_384;
/// Flows whose datagram buckets are kept at once.
pub const MAX_FLOWS: usize = 16_384;

#[derive(Debug, Default)]
struct Buckets {
    refusals: Leaky,
    scan: Distinct,
    handshakes: Leaky,
    protocol: Leaky,
    empty: Leaky,
    connections: Leaky,
    content: Leaky,
    last_ms: i64,
}

/// Whether a source (its address, its certificate's device id) is never banned.
pub type NeverBan = dyn Fn(IpAddr, Option<&str>) -> bool + Send + Sync;

/// The detectors: per-source buckets and the rules that read them.
pub struct Detector {
    limits: Thresholds,
    never_ban: Box<NeverBan>,
    /// By source and whether its events were proven: a forged event never
    /// fills the bucket a proven one would ban by.
    sources: HashMap<(IpAddr, bool), Buckets>,
    flows: HashMap<(IpAddr, u32), (Leaky, i64)>,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector")
            .field("limits", &self.limits)
            .field("sources", &self.sources.len())
            .field("flows", &self.flows.len())
            .finish_non_exhaustive()
    }
}

impl Detector {
    /// Detectors with these thresholds; `never_ban` says which sources (by
    /// address or certificate device id) are alarmed about but never banned.
    pub fn new(
        limits: Thresholds,
        never_ban: impl Fn(IpAddr, Option<&str>) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            limits,
            never_ban: Box::new(never_ban),
            sources: HashMap::new(),
            flows: HashMap::new(),
        }
    }

    /// New thresholds and exemptions (a reload); the buckets are kept.
    pub fn reconfigure(
        &mut self,
        limits: Thresholds,
        never_ban: impl Fn(IpAddr, Option<&str>) -> bool + Send + Sync + 'static,
    ) {
        self.limits = limits;
        self.never_ban = Box::new(never_ban);
    }

    /// Takes one event; a detection when a detector tripped.
    pub fn observe(&mut self, e: Event) -> Option<Detection> {
        let l = self.limits.clone();
        let now = e.at_ms;
        let (attack, count, window_ms) = match &e.signal {
            Signal::Malware { .. } => (Attack::Malware, 1, 0),
            Signal::ForeignCertificate => (Attack::ForeignCa, 1, 0),
            Signal::Handshakes { in_progress } => {
                if *in_progress <= l.handshakes_in_progress {
                    return None;
                }
                (Attack::HandshakeFlood, *in_progress, 0)
            }
            Signal::Datagram { flow } => {
                let key = (source_key(e.source), *flow);
                if !self.flows.contains_key(&key) && self.flows.len() >= MAX_FLOWS {
                    self.make_room_for_flow(now);
                }
                let (b, last) = self.flows.entry(key).or_default();
                *last = now;
                let n = b.pour(l.datagrams, now);
                if n < l.datagrams.capacity {
                    return None;
                }
                b.reset(now);
                (Attack::DatagramFlood, n, l.datagrams.window_ms)
            }
            signal => {
                let source = (source_key(e.source), e.verified);
                if !self.sources.contains_key(&source) && self.sources.len() >= MAX_SOURCES {
                    self.make_room(now);
                }
                let b = self.sources.entry(source).or_default();
                b.last_ms = now;
                let (bucket, shape, attack) = match signal {
                    Signal::Refused { target } => {
                        // A refusal of a target not refused lately counts
                        // towards a scan; of one refused lately, towards
                        // repeated refusals.
                        let (distinct, new) = b.scan.pour(l.scan, *target, now);
                        if distinct >= l.scan.capacity {
                            b.scan.reset(now);
                            let window = l.scan.window_ms;
                            return Some(self.verdict(e, Attack::Scan, distinct, window));
                        }
                        if new {
                            return None;
                        }
                        (&mut b.refusals, l.refusals, Attack::Refusals)
                    }
                    Signal::HandshakeFailed => {
                        (&mut b.handshakes, l.handshakes, Attack::HandshakeFailures)
                    }
                    Signal::ProtocolViolation => {
                        (&mut b.protocol, l.protocol, Attack::ProtocolViolations)
                    }
                    Signal::EmptyConnection => (&mut b.empty, l.empty, Attack::EmptyConnections),
                    Signal::Connection => {
                        (&mut b.connections, l.connections, Attack::ConnectionFlood)
                    }
                    _ => (&mut b.content, l.content, Attack::ContentRefusals),
                };
                let n = bucket.pour(shape, now);
                if n < shape.capacity {
                    return None;
                }
                bucket.reset(now);
                (attack, n, shape.window_ms)
            }
        };
        Some(self.verdict(e, attack, count, window_ms))
    }

    fn verdict(&self, event: Event, attack: Attack, count: u32, window_ms: i64) -> Detection {
        let exempt = (self.never_ban)(event.source, event.device.as_deref());
        let length = if attack == Attack::Scan {
            self.limits.scan_ban_ms
        } else {
            self.limits.ban_ms
        };
        let ban_ms = (event.verified && !exempt).then_some(length);
        Detection {
            attack,
            event,
            count,
            window_ms,
            ban_ms,
        }
    }

    /// Forgets buckets that have emptied (call now and then).
    pub fn forget_idle(&mut self, now_ms: i64) {
        let l = &self.limits;
        self.sources.retain(|_, b| {
            !(b.refusals.is_empty_at(l.refusals, now_ms)
                && b.scan.is_empty_at(l.scan, now_ms)
                && b.handshakes.is_empty_at(l.handshakes, now_ms)
                && b.protocol.is_empty_at(l.protocol, now_ms)
                && b.empty.is_empty_at(l.empty, now_ms)
                && b.connections.is_empty_at(l.connections, now_ms)
                && b.content.is_empty_at(l.content, now_ms))
        });
        self.flows
            .retain(|_, (b, _)| !b.is_empty_at(l.datagrams, now_ms));
        shrink(&mut self.sources);
        shrink(&mut self.flows);
    }

    /// Sources with buckets.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }

    fn make_room(&mut self, now_ms: i64) {
        self.forget_idle(now_ms);
        if self.sources.len() >= MAX_SOURCES {
            evict_oldest(&mut self.sources, |b| b.last_ms);
        }
    }

    fn make_room_for_flow(&mut self, now_ms: i64) {
        let l = self.limits.datagrams;
        self.flows.retain(|_, (b, _)| !b.is_empty_at(l, now_ms));
        if self.flows.len() >= MAX_FLOWS {
            evict_oldest(&mut self.flows, |(_, t)| *t);
        }
    }
}

/// What an alarm says (8.1.3.3 d: source, attack type, target, time), as
/// audited (the record's detail is this in JSON), shipped to the hub and
/// forwarded to the SOC.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Alarm {
    /// Unique: the node, the time and a random part.
    pub id: String,
    /// The node that raised it.
    pub node: String,
    /// The detector's rule id (`D2.scan`).
    pub rule: String,
    /// `low`, `medium`, `high` or `critical`.
    pub severity: String,
    /// The attack type (`scan`).
    pub attack: String,
    /// `inbound` (from the provincial side) or `outbound` (from the legacy side).
    pub direction: String,
    /// The source address.
    pub source: String,
    /// Its port.
    pub port: u16,
    /// The device id its certificate names, if any.
    pub device: Option<String>,
    /// The listener, service or channel.
    pub target: String,
    /// RFC 3339 with milliseconds and offset (China Standard Time).
    pub time: String,
    /// Unix ms.
    pub at_ms: i64,
    /// What was done: `ban`, or `alarm` with why not banned.
    pub action: String,
    /// Until when the source is banned (RFC 3339), if it is.
    pub banned_until: Option<String>,
    /// Detections this alarm stands for.
    pub count: u32,
    /// Their window, ms.
    pub window_ms: i64,
    /// What the scanner called it, for malware.
    pub signature: Option<String>,
}

impl Alarm {
    /// The alarm a node raises about itself when an alarm forwarding target
    /// (`target`, at `host:port`) has been unreachable since `since_ms`.
    pub fn forwarding_down(
        node: &str,
        id: String,
        (target, host, port): (&str, &str, u16),
        since_ms: i64,
        now_ms: i64,
    ) -> Self {
        Self {
            id,
            node: node.to_owned(),
            rule: "D7.forwarding".into(),
            severity: Severity::High.as_str().into(),
            attack: "alarm-channel-down".into(),
            direction: Direction::Outbound.as_str().into(),
            source: host.to_owned(),
            port,
            device: None,
            target: target.to_owned(),
            time: crate::units::rfc3339_cst(now_ms),
            at_ms: now_ms,
            action: format!(
                "alarm (unreachable since {}; alarms wait in the audit chain)",
                crate::units::rfc3339_cst(since_ms)
            ),
            banned_until: None,
            count: 1,
            window_ms: now_ms - since_ms,
            signature: None,
        }
    }
}

impl Alarm {
    /// The alarm a node raises when its malware scanner (`scanner`) does not
    /// answer and records are refused for it.
    pub fn scanner_down(node: &str, id: String, scanner: &str, reason: &str, now_ms: i64) -> Self {
        Self {
            id,
            node: node.to_owned(),
            rule: "D6.scanner".into(),
            severity: Severity::High.as_str().into(),
            attack: "scanner-unavailable".into(),
            direction: Direction::Outbound.as_str().into(),
            source: "0.0.0.0".into(),
            port: 0,
            device: None,
            target: scanner
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect(),
            time: crate::units::rfc3339_cst(now_ms),
            at_ms: now_ms,
            action: format!(
                "alarm (records refused until it answers: {})",
                reason
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(200)
                    .collect::<String>()
            ),
            banned_until: None,
            count: 1,
            window_ms: 0,
            signature: None,
        }
    }
}

impl Alarm {
    /// The low-severity alarm for a behaviour anomaly (8.1.3.3 c).
    pub fn behaviour(node: &str, id: String, a: &baseline::Anomaly, now_ms: i64) -> Self {
        const FIGURES: [&str; 3] = ["connections or records", "bytes", "refusals"];
        let (rule, attack, key, count, action) = match a {
            baseline::Anomaly::Volume {
                key,
                figure,
                value,
                p95,
                ..
            } => (
                "D8.volume",
                "unusual-volume",
                key,
                *value,
                format!(
                    "alarm ({} in an hour: {value}, above {} times the 95th percentile of its active hours, {p95})",
                    FIGURES[(*figure).min(2)],
                    baseline::FACTOR
                ),
            ),
            baseline::Anomaly::UnusualHour { key, values, .. } => (
                "D8.hour",
                "unusual-hour",
                key,
                values[0],
                format!(
                    "alarm (active at an hour of the day that was quiet on each of the last 14 days: {} {}, {} bytes)",
                    values[0], FIGURES[0], values[1]
                ),
            ),
        };
        Self {
            id,
            node: node.to_owned(),
            rule: rule.into(),
            severity: Severity::Low.as_str().into(),
            attack: attack.into(),
            direction: Direction::Outbound.as_str().into(),
            source: "0.0.0.0".into(),
            port: 0,
            device: None,
            target: key.clone(),
            time: crate::units::rfc3339_cst(now_ms),
            at_ms: now_ms,
            action,
            banned_until: None,
            count: u32::try_from(count).unwrap_or(u32::MAX),
            window_ms: 3_600_000,
            signature: None,
        }
    }
}

/// Whether `id` can be an alarm's id (a node id, hex and `-`): what the
/// operators' API and `gatewayctl` accept before it goes into a path.
pub fn valid_alarm_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Why a detection did not ban, as the alarm's action says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Banned until (Unix ms).
    Banned(i64),
    /// The source is in `never_ban`, or its address is unproven.
    AlarmOnly,
    /// `[detect] enabled = false`: watched, not acted on.
    DetectionOff,
}

impl Alarm {
    /// The alarm for detection `d`, raised by `node` under `id`.
    pub fn new(node: &str, id: String, d: &Detection, action: Action) -> Self {
        let e = &d.event;
        let (action, until) = match action {
            Action::Banned(until) => ("ban".to_owned(), Some(crate::units::rfc3339_cst(until))),
            Action::AlarmOnly if !e.verified => {
                ("alarm (address unproven, not banned)".into(), None)
            }
            Action::AlarmOnly => ("alarm (never_ban, not banned)".into(), None),
            Action::DetectionOff => ("alarm (detection off, not banned)".into(), None),
        };
        Self {
            id,
            node: node.to_owned(),
            rule: d.attack.rule().to_owned(),
            severity: d.attack.severity().as_str().to_owned(),
            attack: d.attack.as_str().to_owned(),
            direction: e.direction.as_str().to_owned(),
            source: e.source.to_string(),
            port: e.port,
            device: e.device.clone(),
            target: e.target.clone(),
            time: crate::units::rfc3339_cst(e.at_ms),
            at_ms: e.at_ms,
            action,
            banned_until: until,
            count: d.count,
            window_ms: d.window_ms,
            signature: match &e.signal {
                Signal::Malware { signature } => Some(signature.clone()),
                _ => None,
            },
        }
    }
}

/// How long after an alarm the same (source, attack) is only counted.
pub const ALARM_WINDOW_MS: i64 = 60_000;

/// The source of an alarm that stands for every source past the table's cap
/// (`::`, never a peer's address).
pub const OVERFLOW: IpAddr = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);

/// Alarms de-duplicated: the first of each (source, attack) in a window is
/// raised at once, the rest counted and raised as one when the window ends
/// ([`Alarms::poll_due`]). Capped like the detectors: past the cap, new
/// sources are counted under [`OVERFLOW`].
#[derive(Debug, Default)]
pub struct Alarms {
    /// By source, attack, and whether it banned (a ban is never held back
    /// behind an alarm-only one of the same kind).
    open: HashMap<AlarmKey, (i64, u32, Option<Detection>)>,
}

/// What alarms are de-duplicated by: source (key), attack, whether it banned.
type AlarmKey = (IpAddr, Attack, bool);

impl Alarms {
    /// The detection to raise now, or `None` when one of its kind was
    /// raised for this source within the window (it is counted).
    pub fn raise(&mut self, d: Detection) -> Option<Detection> {
        let key = (source_key(d.event.source), d.attack, d.ban_ms.is_some());
        let now = d.event.at_ms;
        match self.open.get_mut(&key) {
            Some((since, count, last)) if now - *since < ALARM_WINDOW_MS => {
                *count += 1;
                *last = Some(d);
                None
            }
            _ => {
                if !self.open.contains_key(&key) && self.open.len() >= MAX_SOURCES {
                    self.open
                        .retain(|_, (since, _, _)| now - *since < ALARM_WINDOW_MS);
                    if self.open.len() >= MAX_SOURCES && key.0 != OVERFLOW {
                        // Every slot busy: the sources past the cap share one
                        // per attack, so many addresses cannot flood the alarms.
                        let mut d = d;
                        d.event.source = OVERFLOW;
                        return self.raise(d);
                    }
                }
                self.open.insert(key, (now, 0, None));
                Some(d)
            }
        }
    }

    /// Windows that ended with detections only counted: one each, its count
    /// the detections it stands for.
    pub fn poll_due(&mut self, now_ms: i64) -> Vec<Detection> {
        let mut due = Vec::new();
        self.open.retain(|_, (since, count, last)| {
            if now_ms - *since < ALARM_WINDOW_MS {
                return true;
            }
            if let Some(mut d) = last.take() {
                d.count = *count;
                d.window_ms = ALARM_WINDOW_MS;
                due.push(d);
            }
            false
        });
        due.sort_by_key(|d| (d.event.at_ms, d.attack));
        due
    }
}

#[cfg(test)]
mod tests;
