//! Counters for `/metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Per-service counters.
#[derive(Debug, Default, Clone)]
pub struct ServiceCounters {
    /// Relays open now.
    pub active: i64,
    /// Relays opened.
    pub opened: u64,
    /// Bytes from clients to the service.
    pub bytes_up: u64,
    /// Bytes from the service to clients.
    pub bytes_down: u64,
}

/// Per-hub tunnel state (on an edge) or per-device (on a hub).
#[derive(Debug, Default, Clone)]
pub struct PeerCounters {
    /// Connected now.
    pub up: bool,
    /// Connections established.
    pub connects: u64,
    /// Connection attempts that failed (handshake, TLS, hello).
    pub failures: u64,
    /// Latest round-trip time, seconds.
    pub rtt_seconds: f64,
    /// Latest path MTU (largest UDP payload), bytes.
    pub mtu_bytes: u16,
    /// Packets QUIC declared lost.
    pub lost_packets: u64,
    /// Congestion events (the window cut after a loss).
    pub congestion_events: u64,
    /// MTU black holes detected (the MTU fell back to 1200).
    pub black_holes: u64,
}

/// How often each tunnel connection's path figures are sampled.
pub const PATH_SAMPLE: std::time::Duration = std::time::Duration::from_secs(2);

/// One per-peer series: name (after `gateway_tunnel_`), type, help, value.
type PeerSeries = (
    &'static str,
    &'static str,
    &'static str,
    fn(&PeerCounters) -> u64,
);

/// Per-channel counters (edge).
#[derive(Debug, Default, Clone)]
pub struct ChannelCounters {
    /// Records waiting in the buffer.
    pub backlog_records: u64,
    /// Their accounted bytes.
    pub backlog_bytes: u64,
    /// Age of the oldest waiting record, seconds.
    pub oldest_age_seconds: f64,
    /// Next sequence number to be given (committed = next - 1, ever).
    pub next_seq: u64,
    /// Records sent to a hub (resends included).
    pub sent: u64,
    /// Batch bytes sent.
    pub sent_bytes: u64,
    /// Highest sequence number acknowledged by a hub.
    pub last_acked: u64,
    /// Records acknowledged by a hub (and deleted from the buffer).
    pub acked: u64,
    /// Records removed without delivery, by reason (ttl, quota, corrupt).
    pub dropped_ttl: u64,
    /// See `dropped_ttl`.
    pub dropped_quota: u64,
    /// See `dropped_ttl`.
    pub dropped_corrupt: u64,
    /// Records refused at ingest by the boundary checks.
    pub dropped_content: u64,
}

/// Per-(device, channel) counters of the hub's sink.
#[derive(Debug, Default, Clone)]
pub struct SinkCounters {
    /// Records committed.
    pub stored: u64,
    /// Duplicates received and ignored.
    pub duplicates: u64,
    /// Records dropped by retention before every consumer had them.
    pub expired_unread: u64,
}

/// All counters of a node.
#[derive(Debug, Default)]
pub struct Metrics {
    services: Mutex<BTreeMap<String, ServiceCounters>>,
    refusals: Mutex<BTreeMap<(String, String), u64>>,
    peers: Mutex<BTreeMap<String, PeerCounters>>,
    channels: Mutex<BTreeMap<String, ChannelCounters>>,
    sink: Mutex<BTreeMap<(String, String), SinkCounters>>,
    fleet: Mutex<FleetGauges>,
    /// Hub: times two certificates of one device were seen at once.
    duplicates: Mutex<BTreeMap<String, u64>>,
    detect: Mutex<DetectCounters>,
    /// Hub: its networked store's engine, and since when (Unix ms) and why it
    /// does not answer.
    store: Mutex<Option<(&'static str, Option<Down>)>>,
}

/// Since when (Unix ms) and why something does not answer.
type Down = (i64, String);

/// Intrusion detection's counters.
#[derive(Debug, Default, Clone)]
pub struct DetectCounters {
    /// Alarms raised, by (attack type, severity).
    pub alarms: BTreeMap<(String, String), u64>,
    /// Sources banned now.
    pub bans_active: u64,
    /// Connections, datagrams and QUIC Initials dropped because their source is banned.
    pub banned_dropped: u64,
    /// Alarms lost because the alarm queue was full.
    pub alarms_lost: u64,
    /// QUIC handshakes refused because more came at once than the hub takes.
    pub handshakes_deferred: u64,
    /// Per forwarding target: alarms forwarded, failed attempts, and since
    /// when (Unix ms) it is unreachable.
    pub forwarding: BTreeMap<String, Forwarding>,
    /// Records scanned, by verdict (clean, found, refused, unavailable).
    pub scans: BTreeMap<String, u64>,
    /// The signature database's age, ms (`None`: unknown or no scanner).
    pub scan_db_age_ms: Option<i64>,
    /// UDP datagrams refused by their service's protocol check.
    pub udp_violations: BTreeMap<String, u64>,
    /// PostgreSQL statements answered, by (service, outcome).
    pub pg_statements: BTreeMap<String, BTreeMap<&'static str, u64>>,
}

/// One forwarding target's figures: alarms forwarded, failed attempts, and
/// since when (Unix ms) it is unreachable.
pub type Forwarding = (u64, u64, Option<i64>);

/// One per-target series: name, type, help, value.
type ForwardSeries = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Forwarding) -> u64,
);

/// Central management gauges.
#[derive(Debug, Default, Clone)]
pub struct FleetGauges {
    /// Edge: when the device certificate expires (Unix seconds).
    pub cert_not_after_s: Option<i64>,
    /// Edge: certificate renewals done, and refused or failed.
    pub renewals: u64,
    /// See `renewals`.
    pub renewal_failures: u64,
    /// Edge: the managed config version in force.
    pub config_version: u64,
    /// Hub: devices whose collected audit chain is broken.
    pub audit_broken: std::collections::BTreeSet<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Metrics {
    /// A relay of `service` opened.
    pub fn opened(&self, service: &str) {
        let mut s = lock(&self.services);
        let c = s.entry(service.to_owned()).or_default();
        c.active += 1;
        c.opened += 1;
    }

    /// A relay of `service` closed after moving these bytes.
    pub fn closed(&self, service: &str, up: u64, down: u64) {
        let mut s = lock(&self.services);
        let c = s.entry(service.to_owned()).or_default();
        c.active -= 1;
        c.bytes_up += up;
        c.bytes_down += down;
    }

    /// A crossing to `object` was refused by `rule`. The object can come
    /// from a peer (a channel name in a producer's request): past
    /// [`MAX_REFUSAL_SERIES`] series a new one is counted under object `*`.
    pub fn refused(&self, object: &str, rule: &str) {
        let mut m = lock(&self.refusals);
        let mut key = (object.to_owned(), rule.to_owned());
        if !m.contains_key(&key) && m.len() >= MAX_REFUSAL_SERIES {
            key.0 = "*".to_owned();
        }
        *m.entry(key).or_default() += 1;
    }

    /// An attempt to bring a tunnel to `peer` up failed.
    pub fn connect_failed(&self, peer: &str) {
        lock(&self.peers)
            .entry(peer.to_owned())
            .or_default()
            .failures += 1;
    }

    /// Failed connection attempts to every peer together.
    pub fn connect_failures(&self) -> u64 {
        lock(&self.peers).values().map(|p| p.failures).sum()
    }

    /// A tunnel to or from `peer` came up or went down.
    pub fn peer(&self, peer: &str, up: bool) {
        let mut p = lock(&self.peers);
        let c = p.entry(peer.to_owned()).or_default();
        if up && !c.up {
            c.connects += 1;
        }
        c.up = up;
    }

    /// Samples `conn`'s path to `peer` against `before` (the same connection's
    /// previous sample, so that counters add up over every lane and
    /// reconnection); returns the sample for the next time.
    pub fn sample_path(
        &self,
        peer: &str,
        conn: &quinn::Connection,
        before: &quinn::PathStats,
    ) -> quinn::PathStats {
        let now = conn.stats().path;
        let mut peers = lock(&self.peers);
        let c = peers.entry(peer.to_owned()).or_default();
        c.rtt_seconds = now.rtt.as_secs_f64();
        c.mtu_bytes = now.current_mtu;
        c.lost_packets += now.lost_packets.saturating_sub(before.lost_packets);
        c.congestion_events += now
            .congestion_events
            .saturating_sub(before.congestion_events);
        c.black_holes += now
            .black_holes_detected
            .saturating_sub(before.black_holes_detected);
        now
    }

    /// A one-line state for the service manager: tunnels up and relays open.
    pub fn status_line(&self) -> String {
        let peers = lock(&self.peers);
        let up = peers.values().filter(|p| p.up).count();
        let relays: i64 = lock(&self.services).values().map(|c| c.active).sum();
        format!("{up} of {} tunnels up, {relays} relays open", peers.len())
    }

    /// Whether any tunnel is up.
    pub fn any_peer_up(&self) -> bool {
        lock(&self.peers).values().any(|p| p.up)
    }

    /// The tunnel figures of every peer.
    pub fn peers(&self) -> BTreeMap<String, PeerCounters> {
        lock(&self.peers).clone()
    }

    /// A batch of `records` (`bytes` on the wire) of `channel` went to a hub.
    pub fn channel_sent(&self, channel: &str, records: u64, bytes: u64) {
        let mut c = lock(&self.channels);
        let c = c.entry(channel.to_owned()).or_default();
        c.sent += records;
        c.sent_bytes += bytes;
    }

    /// A hub acknowledged `channel` up to `seq`, `records` of them new.
    pub fn channel_acked(&self, channel: &str, seq: u64, records: u64) {
        let mut c = lock(&self.channels);
        let c = c.entry(channel.to_owned()).or_default();
        c.last_acked = c.last_acked.max(seq);
        c.acked += records;
    }

    /// The buffer's view of `channel`, refreshed by its housekeeping.
    pub fn channel_backlog(&self, channel: &str, b: &gateway_store::buffer::Backlog, now_ms: i64) {
        let mut c = lock(&self.channels);
        let c = c.entry(channel.to_owned()).or_default();
        c.backlog_records = b.records;
        c.backlog_bytes = b.bytes;
        c.oldest_age_seconds = b
            .oldest_ms
            .map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0);
        c.next_seq = b.next_seq;
        c.dropped_ttl = b.expired;
        c.dropped_quota = b.dropped;
        c.dropped_corrupt = b.corrupt;
    }

    /// Records of `channel` refused at ingest by the boundary checks.
    pub fn channel_refused(&self, channel: &str, records: u64) {
        lock(&self.channels)
            .entry(channel.to_owned())
            .or_default()
            .dropped_content += records;
    }

    /// A channel's counters.
    pub fn channel(&self, channel: &str) -> ChannelCounters {
        lock(&self.channels)
            .get(channel)
            .cloned()
            .unwrap_or_default()
    }

    /// The hub's sink committed records of (device, channel).
    pub fn sink_committed(&self, device: &str, channel: &str, stored: u64, duplicates: u64) {
        let mut s = lock(&self.sink);
        let c = s
            .entry((device.to_owned(), channel.to_owned()))
            .or_default();
        c.stored += stored;
        c.duplicates += duplicates;
    }

    /// Hub: two certificates of `device` at once.
    pub fn duplicate_identity(&self, device: &str) {
        *lock(&self.duplicates).entry(device.to_owned()).or_default() += 1;
    }

    /// Retention dropped `records` of (device, channel) unread.
    pub fn sink_expired(&self, device: &str, channel: &str, records: u64) {
        lock(&self.sink)
            .entry((device.to_owned(), channel.to_owned()))
            .or_default()
            .expired_unread += records;
    }

    /// Edge: the device certificate's expiry.
    pub fn cert_expiry(&self, not_after_ms: i64) {
        lock(&self.fleet).cert_not_after_s = Some(not_after_ms.div_euclid(1000));
    }

    /// Edge: a renewal worked (or not).
    pub fn renewal(&self, ok: bool) {
        let mut f = lock(&self.fleet);
        if ok {
            f.renewals += 1;
        } else {
            f.renewal_failures += 1;
        }
    }

    /// Edge: the managed config version in force.
    pub fn config_version(&self, v: u64) {
        lock(&self.fleet).config_version = v;
    }

    /// Hub: a device's collected audit chain is broken.
    pub fn audit_alarm(&self, device: &str) {
        lock(&self.fleet).audit_broken.insert(device.to_owned());
    }

    /// An alarm raised.
    pub fn alarm(&self, attack: &str, severity: &str) {
        *lock(&self.detect)
            .alarms
            .entry((attack.to_owned(), severity.to_owned()))
            .or_default() += 1;
    }

    /// Sources banned now.
    pub fn bans_active(&self, n: u64) {
        lock(&self.detect).bans_active = n;
    }

    /// Something from a banned source dropped.
    pub fn banned_dropped(&self) {
        lock(&self.detect).banned_dropped += 1;
    }

    /// A handshake refused for load (the edge retries after its backoff).
    pub fn handshake_deferred(&self) {
        lock(&self.detect).handshakes_deferred += 1;
    }

    /// An alarm lost (queue full).
    pub fn alarm_lost(&self) {
        lock(&self.detect).alarms_lost += 1;
    }

    /// Alarms forwarded to `target`.
    pub fn forwarded(&self, target: &str, n: u64) {
        let mut d = lock(&self.detect);
        let e = d.forwarding.entry(target.to_owned()).or_default();
        e.0 += n;
        e.2 = None;
    }

    /// An attempt to forward to `target` failed; it is down since `since_ms`.
    pub fn forward_failed(&self, target: &str, since_ms: i64) {
        let mut d = lock(&self.detect);
        let e = d.forwarding.entry(target.to_owned()).or_default();
        e.1 += 1;
        e.2 = Some(since_ms);
    }

    /// Whether the hub's networked store (`engine`) answers: `down` says why
    /// not.
    pub fn set_store(&self, engine: &'static str, down: Option<String>) {
        let mut s = lock(&self.store);
        let since = s.as_ref().and_then(|(_, d)| d.as_ref().map(|d| d.0));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        *s = Some((engine, down.map(|why| (since.unwrap_or(now), why))));
    }

    /// Since when (Unix ms) and why the hub's networked store does not answer.
    pub fn store_down(&self) -> Option<(i64, String)> {
        lock(&self.store).as_ref().and_then(|(_, d)| d.clone())
    }

    /// Forwarding targets unreachable now, with since when (Unix ms).
    pub fn forwarding_down(&self) -> Vec<(String, i64)> {
        lock(&self.detect)
            .forwarding
            .iter()
            .filter_map(|(t, (_, _, down))| down.map(|d| (t.clone(), d)))
            .collect()
    }

    /// Running totals per service (`service NAME`: connections, bytes, refusals)
    /// and per channel (`channel NAME`: records committed, bytes sent,
    /// refusals), for the behaviour baseline.
    pub fn volumes(&self) -> Vec<(String, [u64; 3])> {
        let refused = |object: &str| -> u64 {
            lock(&self.refusals)
                .iter()
                .filter(|((o, _), _)| o == object)
                .map(|(_, n)| *n)
                .sum()
        };
        let mut out: Vec<(String, [u64; 3])> = lock(&self.services)
            .iter()
            .map(|(s, c)| (s.clone(), [c.opened, c.bytes_up + c.bytes_down]))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|(s, [a, b])| (format!("service {s}"), [a, b, refused(&s)]))
            .collect();
        let channels: Vec<(String, [u64; 2])> = lock(&self.channels)
            .iter()
            .map(|(n, c)| (n.clone(), [c.next_seq.saturating_sub(1), c.sent_bytes]))
            .collect();
        out.extend(
            channels
                .into_iter()
                .map(|(n, [a, b])| (format!("channel {n}"), [a, b, refused(&n)])),
        );
        out
    }

    /// A datagram of `service` refused by its protocol check.
    pub fn udp_violation(&self, service: &str) {
        *lock(&self.detect)
            .udp_violations
            .entry(service.to_owned())
            .or_default() += 1;
    }

    /// A statement of `postgres` service `service` answered with `outcome`.
    pub fn pg_statement(&self, service: &str, outcome: &'static str) {
        let mut d = lock(&self.detect);
        // Looked up first: no allocation per statement once the service is known.
        match d.pg_statements.get_mut(service) {
            Some(by) => *by.entry(outcome).or_default() += 1,
            None => {
                d.pg_statements
                    .insert(service.to_owned(), BTreeMap::from([(outcome, 1)]));
            }
        }
    }

    /// A record scanned with this verdict.
    pub fn scanned(&self, verdict: &str) {
        *lock(&self.detect)
            .scans
            .entry(verdict.to_owned())
            .or_default() += 1;
    }

    /// The signature database's age.
    pub fn scan_db_age(&self, ms: Option<i64>) {
        lock(&self.detect).scan_db_age_ms = ms;
    }

    /// Intrusion detection's counters.
    pub fn detect(&self) -> DetectCounters {
        lock(&self.detect).clone()
    }

    /// The central management gauges.
    pub fn fleet(&self) -> FleetGauges {
        lock(&self.fleet).clone()
    }

    /// Relays open now, over all services.
    pub fn relays_open(&self) -> u64 {
        let n: i64 = lock(&self.services).values().map(|c| c.active).sum();
        u64::try_from(n).unwrap_or(0)
    }

    /// Records waiting, per channel.
    pub fn backlogs(&self) -> Vec<(String, u64)> {
        lock(&self.channels)
            .iter()
            .map(|(k, c)| (k.clone(), c.backlog_records))
            .collect()
    }

    /// Relays of `service` open now.
    pub fn active(&self, service: &str) -> i64 {
        lock(&self.services).get(service).map_or(0, |c| c.active)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        if let Some((engine, down)) = lock(&self.store).clone() {
            let _ = writeln!(
                o,
                "# HELP gateway_store_up Whether the hub's store answers.\n# TYPE gateway_store_up gauge\ngateway_store_up{{engine=\"{engine}\"}} {}",
                u8::from(down.is_none())
            );
        }
        let services = lock(&self.services).clone();
        let _ = writeln!(
            o,
            "# HELP gateway_relays_active Relayed connections open now.\n# TYPE gateway_relays_active gauge"
        );
        for (s, c) in &services {
            let _ = writeln!(o, "gateway_relays_active{{service=\"{s}\"}} {}", c.active);
        }
        let _ = writeln!(
            o,
            "# HELP gateway_relays_total Relayed connections opened.\n# TYPE gateway_relays_total counter"
        );
        for (s, c) in &services {
            let _ = writeln!(o, "gateway_relays_total{{service=\"{s}\"}} {}", c.opened);
        }
        let _ = writeln!(
            o,
            "# HELP gateway_relay_bytes_total Bytes relayed.\n# TYPE gateway_relay_bytes_total counter"
        );
        for (s, c) in &services {
            let _ = writeln!(
                o,
                "gateway_relay_bytes_total{{service=\"{s}\",direction=\"up\"}} {}",
                c.bytes_up
            );
            let _ = writeln!(
                o,
                "gateway_relay_bytes_total{{service=\"{s}\",direction=\"down\"}} {}",
                c.bytes_down
            );
        }
        let _ = writeln!(
            o,
            "# HELP gateway_refusals_total Crossings refused, by rule.\n# TYPE gateway_refusals_total counter"
        );
        for ((obj, rule), n) in lock(&self.refusals).iter() {
            let _ = writeln!(
                o,
                "gateway_refusals_total{{object=\"{}\",rule=\"{}\"}} {n}",
                label(obj),
                label(rule)
            );
        }
        self.render_detect(&mut o);
        let peers = lock(&self.peers).clone();
        let _ = writeln!(
            o,
            "# HELP gateway_tunnel_up Tunnel state per peer (1 up).\n# TYPE gateway_tunnel_up gauge"
        );
        for (p, c) in &peers {
            let _ = writeln!(o, "gateway_tunnel_up{{peer=\"{p}\"}} {}", u8::from(c.up));
        }
        let _ = writeln!(
            o,
            "# HELP gateway_tunnel_connects_total Tunnel connections established.\n# TYPE gateway_tunnel_connects_total counter"
        );
        for (p, c) in &peers {
            let _ = writeln!(
                o,
                "gateway_tunnel_connects_total{{peer=\"{p}\"}} {}",
                c.connects
            );
        }
        let _ = writeln!(
            o,
            "# HELP gateway_tunnel_connect_failures_total Failed tunnel connection attempts.\n# TYPE gateway_tunnel_connect_failures_total counter"
        );
        for (p, c) in &peers {
            let _ = writeln!(
                o,
                "gateway_tunnel_connect_failures_total{{peer=\"{p}\"}} {}",
                c.failures
            );
        }
        let _ = writeln!(
            o,
            "# HELP gateway_tunnel_rtt_seconds Latest tunnel round-trip time.\n# TYPE gateway_tunnel_rtt_seconds gauge"
        );
        for (p, c) in &peers {
            let _ = writeln!(
                o,
                "gateway_tunnel_rtt_seconds{{peer=\"{p}\"}} {}",
                c.rtt_seconds
            );
        }
        let path: [PeerSeries; 4] = [
            (
                "path_mtu_bytes",
                "gauge",
                "Path MTU in use (largest UDP payload).",
                |c| u64::from(c.mtu_bytes),
            ),
            (
                "lost_packets_total",
                "counter",
                "QUIC packets declared lost.",
                |c| c.lost_packets,
            ),
            (
                "congestion_events_total",
                "counter",
                "Congestion window cuts after a loss.",
                |c| c.congestion_events,
            ),
            (
                "mtu_black_holes_total",
                "counter",
                "MTU black holes detected (MTU back to 1200).",
                |c| c.black_holes,
            ),
        ];
        for (name, kind, help, value) in path {
            let _ = writeln!(
                o,
                "# HELP gateway_tunnel_{name} {help}\n# TYPE gateway_tunnel_{name} {kind}"
            );
            for (p, c) in &peers {
                let _ = writeln!(o, "gateway_tunnel_{name}{{peer=\"{p}\"}} {}", value(c));
            }
        }
        self.render_channels(&mut o);
        self.render_fleet(&mut o);
        o
    }

    fn render_detect(&self, o: &mut String) {
        let d = self.detect();
        let _ = writeln!(
            o,
            "# HELP gateway_alarms_total Intrusion alarms raised (8.1.3.3), by attack type and severity.\n# TYPE gateway_alarms_total counter"
        );
        for ((t, sev), n) in &d.alarms {
            let _ = writeln!(
                o,
                "gateway_alarms_total{{type=\"{t}\",severity=\"{sev}\"}} {n}"
            );
        }
        let _ = writeln!(
            o,
            "# HELP gateway_scans_total Records and spool files scanned for malicious code, by verdict.\n# TYPE gateway_scans_total counter"
        );
        for (v, n) in &d.scans {
            let _ = writeln!(o, "gateway_scans_total{{verdict=\"{v}\"}} {n}");
        }
        let _ = writeln!(
            o,
            "# HELP gateway_udp_protocol_violations_total UDP datagrams refused by their service's rtp or mpegts check.\n# TYPE gateway_udp_protocol_violations_total counter"
        );
        for (s, n) in &d.udp_violations {
            let _ = writeln!(
                o,
                "gateway_udp_protocol_violations_total{{service=\"{s}\"}} {n}"
            );
        }
        let _ = writeln!(
            o,
            "# HELP gateway_pg_statements_total PostgreSQL statements relayed and answered, by service and outcome (ok, error, skipped, suspended).\n# TYPE gateway_pg_statements_total counter"
        );
        for (s, by) in &d.pg_statements {
            for (outcome, n) in by {
                let _ = writeln!(
                    o,
                    "gateway_pg_statements_total{{service=\"{s}\",outcome=\"{outcome}\"}} {n}"
                );
            }
        }
        if let Some(age) = d.scan_db_age_ms {
            let _ = writeln!(
                o,
                "# HELP gateway_scan_db_age_seconds Age of the malware signature database.\n# TYPE gateway_scan_db_age_seconds gauge\ngateway_scan_db_age_seconds {}",
                age / 1000
            );
        }
        let series: [ForwardSeries; 3] = [
            (
                "gateway_alarms_forwarded_total",
                "counter",
                "Alarms forwarded to a SOC target.",
                |f| f.0,
            ),
            (
                "gateway_alarm_forward_failures_total",
                "counter",
                "Failed attempts to forward alarms to a SOC target.",
                |f| f.1,
            ),
            (
                "gateway_alarm_forward_up",
                "gauge",
                "Whether a SOC target took the last alarms (1) or is unreachable (0).",
                |f| u64::from(f.2.is_none()),
            ),
        ];
        for (name, kind, help, value) in series {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (t, f) in &d.forwarding {
                let _ = writeln!(o, "{name}{{target=\"{t}\"}} {}", value(f));
            }
        }
        for (name, kind, help, v) in [
            (
                "gateway_bans_active",
                "gauge",
                "Sources banned now.",
                d.bans_active,
            ),
            (
                "gateway_banned_dropped_total",
                "counter",
                "Connections, datagrams and QUIC Initials from banned sources dropped.",
                d.banned_dropped,
            ),
            (
                "gateway_alarms_lost_total",
                "counter",
                "Alarms lost because the alarm queue was full.",
                d.alarms_lost,
            ),
            (
                "gateway_handshakes_deferred_total",
                "counter",
                "QUIC handshakes refused because more came at once than the hub takes (a reconnect storm); the edges retry after their backoff.",
                d.handshakes_deferred,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
    }

    fn render_fleet(&self, o: &mut String) {
        let f = lock(&self.fleet).clone();
        if let Some(t) = f.cert_not_after_s {
            let _ = writeln!(
                o,
                "# HELP gateway_cert_expiry_timestamp_seconds When this node's own certificate expires (an edge's device certificate, a hub's server certificate).\n# TYPE gateway_cert_expiry_timestamp_seconds gauge\ngateway_cert_expiry_timestamp_seconds {t}"
            );
            let _ = writeln!(
                o,
                "# HELP gateway_cert_renewals_total Certificate renewals, by result.\n# TYPE gateway_cert_renewals_total counter\ngateway_cert_renewals_total{{result=\"ok\"}} {}\ngateway_cert_renewals_total{{result=\"failed\"}} {}",
                f.renewals, f.renewal_failures
            );
            let _ = writeln!(
                o,
                "# HELP gateway_config_version The centrally managed config version in force (0: the local file).\n# TYPE gateway_config_version gauge\ngateway_config_version {}",
                f.config_version
            );
        }
        if !f.audit_broken.is_empty() {
            let _ = writeln!(
                o,
                "# HELP gateway_audit_chain_broken A device's collected audit chain does not continue.\n# TYPE gateway_audit_chain_broken gauge"
            );
            for d in &f.audit_broken {
                let _ = writeln!(o, "gateway_audit_chain_broken{{device=\"{d}\"}} 1");
            }
        }
    }

    fn render_channels(&self, o: &mut String) {
        let channels = lock(&self.channels).clone();
        type Get = fn(&ChannelCounters) -> String;
        let series: [(&str, &str, &str, Get); 8] = [
            (
                "gateway_channel_backlog_records",
                "gauge",
                "Records waiting in the buffer.",
                |c| c.backlog_records.to_string(),
            ),
            (
                "gateway_channel_backlog_bytes",
                "gauge",
                "Accounted bytes waiting in the buffer.",
                |c| c.backlog_bytes.to_string(),
            ),
            (
                "gateway_channel_oldest_record_age_seconds",
                "gauge",
                "Age of the oldest waiting record.",
                |c| c.oldest_age_seconds.to_string(),
            ),
            (
                "gateway_channel_committed_total",
                "counter",
                "Records committed to the buffer.",
                |c| c.next_seq.saturating_sub(1).to_string(),
            ),
            (
                "gateway_channel_sent_records_total",
                "counter",
                "Records sent to a hub, resends included.",
                |c| c.sent.to_string(),
            ),
            (
                "gateway_channel_acked_records_total",
                "counter",
                "Records a hub acknowledged (deleted from the buffer).",
                |c| c.acked.to_string(),
            ),
            (
                "gateway_channel_sent_bytes_total",
                "counter",
                "Batch bytes sent to a hub.",
                |c| c.sent_bytes.to_string(),
            ),
            (
                "gateway_channel_last_acked_seq",
                "gauge",
                "Highest sequence number a hub acknowledged.",
                |c| c.last_acked.to_string(),
            ),
        ];
        for (name, kind, help, get) in series {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (ch, c) in &channels {
                let _ = writeln!(o, "{name}{{channel=\"{ch}\"}} {}", get(c));
            }
        }
        let _ = writeln!(
            o,
            "# HELP gateway_channel_dropped_total Records removed without delivery, by reason.\n# TYPE gateway_channel_dropped_total counter"
        );
        for (ch, c) in &channels {
            for (reason, n) in [
                ("ttl", c.dropped_ttl),
                ("quota", c.dropped_quota),
                ("corrupt", c.dropped_corrupt),
                ("content", c.dropped_content),
            ] {
                let _ = writeln!(
                    o,
                    "gateway_channel_dropped_total{{channel=\"{ch}\",reason=\"{reason}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            o,
            "# HELP gateway_device_duplicate_identity Times a device presented two different certificates at once (one refused or replaced).\n# TYPE gateway_device_duplicate_identity counter"
        );
        for (d, n) in lock(&self.duplicates).iter() {
            let _ = writeln!(o, "gateway_device_duplicate_identity{{device=\"{d}\"}} {n}");
        }
        let sink = lock(&self.sink).clone();
        let _ = writeln!(
            o,
            "# HELP gateway_sink_records_total Records committed to the hub's sink; duplicates ignored.\n# TYPE gateway_sink_records_total counter"
        );
        for ((d, ch), c) in &sink {
            let _ = writeln!(
                o,
                "gateway_sink_records_total{{device=\"{d}\",channel=\"{ch}\",result=\"stored\"}} {}",
                c.stored
            );
            let _ = writeln!(
                o,
                "gateway_sink_records_total{{device=\"{d}\",channel=\"{ch}\",result=\"duplicate\"}} {}",
                c.duplicates
            );
            let _ = writeln!(
                o,
                "gateway_sink_records_total{{device=\"{d}\",channel=\"{ch}\",result=\"expired_unread\"}} {}",
                c.expired_unread
            );
        }
    }
}

/// Distinct (object, rule) series of `gateway_refusals_total`.
pub const MAX_REFUSAL_SERIES: usize = 1024;

/// A label value as the Prometheus text format wants it: backslashes, quotes
/// and line breaks escaped, so a peer's text cannot end the label or the line.
fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_series_are_capped_and_their_labels_escaped() {
        let m = Metrics::default();
        m.refused("a\"}x 1\nfake_metric", "no-route");
        for i in 0..MAX_REFUSAL_SERIES + 10 {
            m.refused(&format!("channel-{i}"), "format");
        }
        assert_eq!(
            lock(&m.refusals).len(),
            MAX_REFUSAL_SERIES + 1,
            "capped, plus `*`"
        );
        assert_eq!(
            lock(&m.refusals).get(&("*".to_owned(), "format".to_owned())),
            Some(&11)
        );
        assert_eq!(label("a\"}x 1\nb\\"), "a\\\"}x 1\\nb\\\\");
    }
}
