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
}

/// All counters of a node.
#[derive(Debug, Default)]
pub struct Metrics {
    services: Mutex<BTreeMap<String, ServiceCounters>>,
    refusals: Mutex<BTreeMap<(String, String), u64>>,
    peers: Mutex<BTreeMap<String, PeerCounters>>,
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

    /// A crossing to `object` was refused by `rule`.
    pub fn refused(&self, object: &str, rule: &str) {
        *lock(&self.refusals)
            .entry((object.to_owned(), rule.to_owned()))
            .or_default() += 1;
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

    /// The latest round-trip time to `peer`.
    pub fn rtt(&self, peer: &str, rtt: std::time::Duration) {
        lock(&self.peers)
            .entry(peer.to_owned())
            .or_default()
            .rtt_seconds = rtt.as_secs_f64();
    }

    /// Whether any tunnel is up.
    pub fn any_peer_up(&self) -> bool {
        lock(&self.peers).values().any(|p| p.up)
    }

    /// Relays of `service` open now.
    pub fn active(&self, service: &str) -> i64 {
        lock(&self.services).get(service).map_or(0, |c| c.active)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
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
                "gateway_refusals_total{{object=\"{obj}\",rule=\"{rule}\"}} {n}"
            );
        }
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
        o
    }
}
