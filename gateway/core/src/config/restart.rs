//! Which changes between two configs a running node cannot put in force by a
//! reload: listeners and sockets bound once at start, the scanner and the
//! alarm forwarders made once. The daemon's reload refuses them; the hub
//! offers a pushed config that makes one only when the push says `--restart`
//! (the box then applies it by restarting itself).

use std::net::SocketAddr;
use std::path::Path;

use super::{AlarmForwarding, Config, Edge, IngestAuth, Protocol, Role};

/// The first part of `after` that differs from `before` and needs a restart,
/// named as the operator's guide and the refusal name it; `None` when a
/// reload puts all of `after` in force.
pub fn restart_needed(before: &Config, after: &Config) -> Option<&'static str> {
    if before.node.id != after.node.id {
        return Some("node.id");
    }
    if std::mem::discriminant(&before.role) != std::mem::discriminant(&after.role) {
        return Some("node.role");
    }
    // UDP fronts are bound once at start: a change would be half applied.
    if udp_fronts(&before.role) != udp_fronts(&after.role) {
        return Some("a UDP [[publish]] or [[access]]");
    }
    // Listeners bound once at start: a change would be silently ignored.
    if before.admin.listen != after.admin.listen {
        return Some("admin.listen");
    }
    if before.node.user != after.node.user {
        return Some("node.user");
    }
    if before.node.state_dir != after.node.state_dir {
        return Some("node.state_dir");
    }
    // The scanner and the alarm forwarders are made once at start.
    if before.scan != after.scan {
        return Some("[scan]");
    }
    if forwarding(&before.alarms) != forwarding(&after.alarms) {
        return Some("[alarms]");
    }
    if let (Role::Edge(b), Role::Edge(a)) = (&before.role, &after.role) {
        // Where they listen and how they know producers (a tokens file's
        // contents are re-read without a restart).
        if ingest_listens(b) != ingest_listens(a) {
            return Some("[[ingest]]");
        }
        // The handoff to the updater is where gatewayd marks a config try.
        if b.update.handoff != a.update.handoff {
            return Some("update.handoff");
        }
    }
    None
}

/// [`restart_needed`] over the text of the version `after` replaces, read
/// without the checks that depend on the day (an assessment that expired
/// since it was pushed does not hide a restart). A text that no longer reads
/// at all takes a restart to be safe: nothing tells what the box would keep.
pub fn restart_needed_over(before_text: &str, after: &Config) -> Option<&'static str> {
    match super::compile::compile(before_text).0 {
        Some(before) => restart_needed(&before, after),
        None => Some("the whole file (the version it replaces no longer reads)"),
    }
}

/// The UDP publishes or accesses of a role: (listen, device, service, zone).
fn udp_fronts(role: &Role) -> Vec<(SocketAddr, &str, &str, &str)> {
    let all: Vec<_> = match role {
        Role::Hub(h) => h
            .publishes
            .iter()
            .map(|p| (p.protocol, (p.listen, &*p.device, &*p.service, &*p.zone)))
            .collect(),
        Role::Edge(e) => e
            .accesses
            .iter()
            .map(|a| (a.protocol, (a.listen, &*a.device, &*a.service, &*a.zone)))
            .collect(),
    };
    all.into_iter()
        .filter(|(protocol, _)| *protocol == Protocol::Udp)
        .map(|(_, front)| front)
        .collect()
}

/// What an `[alarms]` section configures, without where it is written.
fn forwarding(a: &AlarmForwarding) -> String {
    let syslog = a.syslog.as_ref().map(|s| {
        (
            format!("{}:{}", s.address.host, s.address.port),
            s.ca.path.clone(),
            s.client
                .as_ref()
                .map(|(c, k)| (c.path.clone(), k.path.clone())),
        )
    });
    let webhook = a.webhook.as_ref().map(|w| {
        (
            format!("{}:{}{}", w.address.host, w.address.port, w.path),
            w.ca.path.clone(),
            w.token_file.as_ref().map(|t| t.path.clone()),
        )
    });
    format!(
        "{:?} {:?} {syslog:?} {webhook:?}",
        a.min_severity, a.down_after
    )
}

/// Where an edge's ingest listeners listen and how each knows producers.
fn ingest_listens(e: &Edge) -> Vec<(&str, SocketAddr, &'static str, Vec<&Path>)> {
    e.ingests
        .iter()
        .map(|i| {
            let (kind, files) = auth_files(&i.auth);
            (&*i.zone, i.listen, kind, files)
        })
        .collect()
}

/// An ingest's kind of authentication and the files it reads at start.
fn auth_files(auth: &IngestAuth) -> (&'static str, Vec<&Path>) {
    let files = match auth {
        IngestAuth::None => vec![],
        IngestAuth::Token { tokens } => vec![tokens.path.as_path()],
        IngestAuth::Mtls {
            client_ca,
            cert,
            key,
        } => vec![
            client_ca.path.as_path(),
            cert.path.as_path(),
            key.path.as_path(),
        ],
    };
    (auth.as_str(), files)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDGE: &str = r#"
[node]
id = "edge-a"
role = "edge"
state_dir = "/var/lib/gatewayd/edge-a"

[admin]
listen = "127.0.0.1:9100"

[uplink]
hubs = ["127.0.0.1:7000"]
ca = "/etc/gatewayd/ca.pem"
cert = "/etc/gatewayd/edge-a.pem"
key = "/etc/gatewayd/edge-a.key"
heartbeat = "10s"
"#;

    fn config(text: &str) -> Config {
        let (config, diagnostics) = crate::config::compile::compile(text);
        config.unwrap_or_else(|| {
            panic!(
                "{:?}",
                diagnostics
                    .iter()
                    .map(|d| d.render("t.toml"))
                    .collect::<Vec<_>>()
            )
        })
    }

    #[test]
    fn a_listener_bound_at_start_needs_a_restart_and_a_heartbeat_does_not() {
        let before = config(EDGE);
        assert_eq!(restart_needed(&before, &before), None);
        let heartbeat = config(&EDGE.replace("\"10s\"", "\"5s\""));
        assert_eq!(restart_needed(&before, &heartbeat), None);
        let admin = config(&EDGE.replace("9100", "9101"));
        assert_eq!(restart_needed(&before, &admin), Some("admin.listen"));
        let user = config(&EDGE.replace("[admin]", "user = \"gatewayd\"\n\n[admin]"));
        assert_eq!(restart_needed(&before, &user), Some("node.user"));
    }

    #[test]
    fn the_text_replaced_is_read_without_the_day_s_checks_and_an_unreadable_one_takes_a_restart() {
        let zone = "\n[[zone]]\nname = \"lab\"\nkind = \"legacy\"\nclassified = false\nlevel = 2\nnetworks = [\"10.0.0.0/24\"]\nassessment = { id = \"A\", valid_until = 2020-01-01 }\n";
        let expired = format!("{EDGE}{zone}");
        let moved = config(&format!("{}{zone}", EDGE.replace("9100", "9101")));
        // The assessment expired long ago (the day's checks refuse it for a
        // bridged zone): read without them, the restart is still seen.
        assert_eq!(restart_needed_over(&expired, &moved), Some("admin.listen"));
        assert_eq!(restart_needed_over(&expired, &config(&expired)), None);
        assert!(restart_needed_over("not toml ===", &moved).is_some());
    }
}
