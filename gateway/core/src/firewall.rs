//! The nftables baseline of a box, derived from its configuration
//! (`gatewayd nftables --config FILE`): nothing is forwarded between
//! interfaces (the gateway relays, it never routes), and only the configured
//! listeners accept connections, each on its own address, and a listener that
//! serves one zone (an access, an ingest, a publish) only from that zone's
//! networks, arriving on that zone's `interfaces` when it names them. Pure:
//! text out.

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::config::{Config, Protocol, Role};

/// A listener the ruleset opens.
struct Open {
    addr: SocketAddr,
    udp: bool,
    what: String,
    /// The zone whose networks alone may reach it (none: any source).
    zone: Option<String>,
}

fn opens(cfg: &Config) -> Vec<Open> {
    let tcp = |addr: SocketAddr, what: String| Open {
        addr,
        udp: false,
        what,
        zone: None,
    };
    let zoned = |addr: SocketAddr, udp: bool, what: String, zone: &str| Open {
        addr,
        udp,
        what,
        zone: Some(zone.to_owned()),
    };
    let mut v = vec![tcp(
        cfg.admin.listen,
        "admin (/metrics, /healthz, /readyz)".into(),
    )];
    match &cfg.role {
        Role::Edge(e) => {
            for a in &e.accesses {
                v.push(zoned(
                    a.listen,
                    false,
                    format!("access to {}/{} for zone {}", a.device, a.service, a.zone),
                    &a.zone,
                ));
            }
            for i in &e.ingests {
                v.push(zoned(
                    i.listen,
                    false,
                    format!("channel ingest for zone {}", i.zone),
                    &i.zone,
                ));
            }
        }
        Role::Hub(h) => {
            v.push(Open {
                addr: h.settings.listen,
                udp: true,
                what: "QUIC tunnels from edges".into(),
                zone: None,
            });
            v.push(tcp(
                h.settings.api,
                "consumers' API (HTTPS, consumer certificates)".into(),
            ));
            if let Some(ops) = h.settings.ops {
                v.push(tcp(ops, "operators' API (gatewayctl)".into()));
            }
            for p in &h.publishes {
                v.push(zoned(
                    p.listen,
                    p.protocol == Protocol::Udp,
                    format!("publish of {}/{} in zone {}", p.device, p.service, p.zone),
                    &p.zone,
                ));
            }
        }
    }
    v
}

/// The ruleset, for `nft -f`. It replaces only its own table (`inet gatewayd`).
pub fn nftables(cfg: &Config) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "#!/usr/sbin/nft -f\n# gatewayd baseline for node {} (generated from its config; regenerate after changes)\n\
         table inet gatewayd\ndelete table inet gatewayd\ntable inet gatewayd {{",
        cfg.node.id
    );
    let _ = writeln!(
        o,
        "    chain input {{\n        type filter hook input priority filter; policy drop;\n        \
         ct state established,related accept\n        ct state invalid drop\n        iif \"lo\" accept\n        \
         meta l4proto {{ icmp, ipv6-icmp }} limit rate 10/second accept"
    );
    for open in opens(cfg) {
        let fam = if open.addr.is_ipv4() { "ip" } else { "ip6" };
        let proto = if open.udp { "udp" } else { "tcp" };
        let from = match open.zone.as_deref().and_then(|z| cfg.zone(z)) {
            None => String::new(),
            Some(z) => {
                let nets: Vec<String> = z
                    .networks
                    .iter()
                    .filter(|n| n.addr().is_ipv4() == open.addr.is_ipv4())
                    .map(ToString::to_string)
                    .collect();
                if nets.is_empty() {
                    // No network of this family: nothing may reach it.
                    continue;
                }
                let on = if z.interfaces.is_empty() {
                    String::new()
                } else {
                    let names: Vec<String> =
                        z.interfaces.iter().map(|i| format!("\"{i}\"")).collect();
                    format!("iifname {{ {} }} ", names.join(", "))
                };
                format!("{on}{fam} saddr {{ {} }} ", nets.join(", "))
            }
        };
        let _ = writeln!(
            o,
            "        {from}{fam} daddr {} {proto} dport {} accept comment \"{}\"",
            open.addr.ip(),
            open.addr.port(),
            open.what.replace('"', "'")
        );
    }
    // New connections nothing accepts go to gatewayd's scan detection
    // (NFLOG, detect::nflog), bounded; then a few to the kernel log.
    let _ = writeln!(
        o,
        "        ct state new meta l4proto {{ tcp, udp }} limit rate 2000/second log group {} snaplen {} comment \"to gatewayd's scan detection\"",
        crate::detect::nflog::GROUP,
        crate::detect::nflog::COPY_RANGE
    );
    let _ = writeln!(
        o,
        "        limit rate 5/second log prefix \"gatewayd-drop-in \"\n    }}\n    \
         chain forward {{\n        type filter hook forward priority filter; policy drop;\n        \
         limit rate 5/second log prefix \"gatewayd-drop-fwd \"\n    }}\n    \
         chain output {{\n        type filter hook output priority filter; policy accept;\n    }}\n}}"
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listener_is_opened_on_its_address_and_nothing_is_forwarded() {
        let text = include_str!("../../../config/hub-extranet.toml");
        let cfg = crate::check::load(text, crate::units::Date::new(2026, 1, 1).expect("date"))
            .config
            .expect("valid");
        let rules = nftables(&cfg);
        assert!(
            rules.contains(
                "chain forward {\n        type filter hook forward priority filter; policy drop;"
            ),
            "{rules}"
        );
        let Role::Hub(h) = &cfg.role else {
            panic!("a hub")
        };
        assert!(
            rules.contains(&format!("udp dport {} accept", h.settings.listen.port())),
            "{rules}"
        );
        for p in &h.publishes {
            let zone = cfg.zone(&p.zone).expect("zone");
            assert!(
                rules.contains(&format!(
                    "ip saddr {{ {} }} ip daddr {} ",
                    zone.networks[0],
                    p.listen.ip()
                )),
                "a publish takes only its zone: {rules}"
            );
            assert!(
                rules.contains(&format!("dport {} accept", p.listen.port())),
                "{rules}"
            );
        }
    }
}
