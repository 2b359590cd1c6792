//! What a checked configuration will bridge, for `gatewayd check` (text and JSON).
//!
//! The JSON form is a stable interface (documented in `docs/config.md`): fields are
//! only ever added.

use std::fmt::Write as _;

use serde::Serialize;

use crate::config::{AppProtocol, Config, Destination, Peer, Protocol, Role, WhenFull, ZoneKind};
use crate::policy::{self, Flow, Purpose};
use crate::units::{ByteSize, Cidr, Date, format_duration};

/// The summary of a configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// `node.id`
    pub node: String,
    /// `edge` or `hub`.
    pub role: &'static str,
    /// Zones, in file order.
    pub zones: Vec<ZoneSummary>,
    /// Every boundary crossing the configuration declares.
    pub crossings: Vec<CrossingSummary>,
    /// Edge: uplink hubs.
    pub hubs: Vec<String>,
    /// Edge: published services.
    pub services: Vec<ServiceSummary>,
    /// Edge: accesses to other departments' services.
    pub accesses: Vec<AccessSummary>,
    /// Edge: data channels.
    pub channels: Vec<ChannelSummary>,
    /// Hub: publish listeners.
    pub publishes: Vec<PublishSummary>,
    /// Days audit records are kept.
    pub audit_retention_days: u32,
}

/// A zone.
#[derive(Debug, Clone, Serialize)]
pub struct ZoneSummary {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: ZoneKind,
    /// Classified or not.
    pub classified: bool,
    /// Protection level, 1 to 4.
    pub level: u8,
    /// Networks.
    pub networks: Vec<Cidr>,
    /// Assessment id, if any.
    pub assessment: Option<String>,
    /// Last valid day of the assessment.
    pub valid_until: Option<Date>,
    /// Days from the check date to `valid_until`.
    pub days_left: Option<i64>,
}

/// A boundary crossing.
#[derive(Debug, Clone, Serialize)]
pub struct CrossingSummary {
    /// Zone data comes from.
    pub from: String,
    /// Zone data goes to.
    pub to: String,
    /// Boundary level (the higher of the two zones').
    pub level: u8,
    /// Relay or channel.
    pub flow: Flow,
    /// What declares it.
    pub purpose: Purpose,
    /// The controls it gets: those its level imposes that the configuration
    /// enforces.
    pub controls: Vec<String>,
}

/// A published service.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceSummary {
    /// Name.
    pub name: String,
    /// Its legacy zone.
    pub zone: String,
    /// tcp or udp.
    pub protocol: Protocol,
    /// Legacy server.
    pub target: String,
    /// Declared application protocol.
    pub app_protocol: Option<AppProtocol>,
    /// Who may reach it.
    pub allow: Vec<Peer>,
    /// The HTTP requests its clients may make (empty: any).
    pub http_allow: Vec<crate::config::HttpAllow>,
    /// `postgres`: its pg_* rules, in words (empty: none or not postgres).
    pub postgres: Vec<String>,
}

/// An access.
#[derive(Debug, Clone, Serialize)]
pub struct AccessSummary {
    /// Listener on the legacy side.
    pub listen: String,
    /// Its zone.
    pub zone: String,
    /// `DEVICE/SERVICE` reached.
    pub service: String,
}

/// A channel.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelSummary {
    /// Name.
    pub name: String,
    /// Producers' zone.
    pub zone: String,
    /// 0 most urgent.
    pub priority: u8,
    /// Time to live, like `30d`.
    pub ttl: String,
    /// Buffer space.
    pub max_bytes: ByteSize,
    /// Full-buffer behaviour.
    pub when_full: WhenFull,
    /// Accepted formats (empty: any).
    pub formats: Vec<&'static str>,
    /// Largest record.
    pub max_record_bytes: Option<ByteSize>,
    /// Destination.
    pub deliver_to: Destination,
    /// Declared one-way.
    pub one_way: bool,
}

/// A hub's publish listener.
#[derive(Debug, Clone, Serialize)]
pub struct PublishSummary {
    /// `DEVICE/SERVICE`.
    pub service: String,
    /// Its zone.
    pub zone: String,
    /// Listener.
    pub listen: String,
}

impl Summary {
    /// Summarises `config` as of `today`.
    pub fn new(config: &Config, today: Date) -> Self {
        let zones = config
            .zones
            .iter()
            .map(|z| ZoneSummary {
                name: z.name.clone(),
                kind: z.kind,
                classified: z.classified,
                level: z.level.get(),
                networks: z.networks.clone(),
                assessment: z.assessment.as_ref().map(|a| a.id.clone()),
                valid_until: z.assessment.as_ref().map(|a| a.valid_until),
                days_left: z
                    .assessment
                    .as_ref()
                    .map(|a| today.days_until(a.valid_until)),
            })
            .collect();
        let crossings = policy::declared(config)
            .into_iter()
            .map(|d| {
                let level = policy::boundary_level(d.from, d.to);
                // A hub's publish crosses from its zone into a tunnel to the edge.
                let to = match &d.purpose {
                    Purpose::Publish(svc) => {
                        format!("{} (tunnel)", svc.split('/').next().unwrap_or(svc))
                    }
                    _ => d.to.name.clone(),
                };
                let controls = policy::controls(config, &d, level);
                CrossingSummary {
                    from: d.from.name.clone(),
                    to,
                    level: level.get(),
                    flow: d.flow,
                    purpose: d.purpose,
                    controls,
                }
            })
            .collect();
        let mut s = Summary {
            node: config.node.id.clone(),
            role: config.role.name(),
            zones,
            crossings,
            hubs: Vec::new(),
            services: Vec::new(),
            accesses: Vec::new(),
            channels: Vec::new(),
            publishes: Vec::new(),
            audit_retention_days: config.audit.retention_days,
        };
        match &config.role {
            Role::Edge(e) => {
                s.hubs = e.uplink.hubs.iter().map(ToString::to_string).collect();
                s.services = e
                    .services
                    .iter()
                    .map(|v| ServiceSummary {
                        name: v.name.clone(),
                        zone: v.zone.clone(),
                        protocol: v.protocol,
                        target: v.target.to_string(),
                        app_protocol: v.app_protocol,
                        allow: v.allow.clone(),
                        http_allow: v.http_allow.clone(),
                        postgres: pg_rules(v),
                    })
                    .collect();
                s.accesses = e
                    .accesses
                    .iter()
                    .map(|a| AccessSummary {
                        listen: a.listen.to_string(),
                        zone: a.zone.clone(),
                        service: format!("{}/{}", a.device, a.service),
                    })
                    .collect();
                s.channels = e
                    .channels
                    .iter()
                    .map(|c| ChannelSummary {
                        name: c.name.clone(),
                        zone: c.zone.clone(),
                        priority: c.priority,
                        ttl: format_duration(c.ttl),
                        max_bytes: c.max_bytes,
                        when_full: c.when_full,
                        formats: c.formats.iter().map(|f| f.as_str()).collect(),
                        max_record_bytes: c.max_record_bytes,
                        deliver_to: c.deliver_to.clone(),
                        one_way: c.one_way,
                    })
                    .collect();
            }
            Role::Hub(h) => {
                s.publishes = h
                    .publishes
                    .iter()
                    .map(|p| PublishSummary {
                        service: format!("{}/{}", p.device, p.service),
                        zone: p.zone.clone(),
                        listen: p.listen.to_string(),
                    })
                    .collect();
            }
        }
        s
    }

    /// Renders the summary for a terminal.
    pub fn render_text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "node {} ({}), audit kept {} days",
            self.node, self.role, self.audit_retention_days
        );
        let _ = writeln!(o, "\nzones:");
        for z in &self.zones {
            let class = if z.classified {
                "classified"
            } else {
                "unclassified"
            };
            let nets: Vec<String> = z.networks.iter().map(ToString::to_string).collect();
            let _ = write!(
                o,
                "  {:<22} {:<9} L{} {:<12} {}",
                z.name,
                z.kind.as_str(),
                z.level,
                class,
                nets.join(", ")
            );
            if let (Some(id), Some(until), Some(left)) = (&z.assessment, z.valid_until, z.days_left)
            {
                let _ = write!(o, "  assessment {id} valid until {until} ({left} days)");
            }
            o.push('\n');
        }
        let _ = writeln!(o, "\nboundary crossings:");
        if self.crossings.is_empty() {
            let _ = writeln!(o, "  none: nothing is bridged");
        }
        for c in &self.crossings {
            let what = match &c.purpose {
                Purpose::Service(n) => format!("service {n}"),
                Purpose::ServiceFromDevice(n) => {
                    let (svc, dev) = n.split_once("<-").unwrap_or((n, "?"));
                    format!("service {svc} for device {dev}")
                }
                Purpose::Access(n) => format!("access to {n}"),
                Purpose::Channel(n) => format!("channel {n}"),
                Purpose::Publish(n) => format!("publish {n}"),
            };
            let flow = match c.flow {
                Flow::Interactive => "relay",
                Flow::Channel { one_way: true, .. } => "channel, one-way",
                Flow::Channel { .. } => "channel",
            };
            let _ = writeln!(
                o,
                "  {} -> {}  boundary L{}  {} ({flow})",
                c.from, c.to, c.level, what
            );
        }
        let mut levels: Vec<u8> = self.crossings.iter().map(|c| c.level).collect();
        levels.sort_unstable();
        levels.dedup();
        for l in levels {
            if let Some(c) = self.crossings.iter().find(|c| c.level == l) {
                let _ = writeln!(o, "  controls at L{l}: {}", c.controls.join("; "));
            }
        }
        if !self.hubs.is_empty() {
            let _ = writeln!(o, "\nuplink hubs: {}", self.hubs.join(", "));
        }
        if !self.services.is_empty() {
            let _ = writeln!(o, "\nservices:");
            for s in &self.services {
                let allow: Vec<String> = s
                    .allow
                    .iter()
                    .map(|p| match p {
                        Peer::Zone(z) => format!("zone {z}"),
                        Peer::Device(d) => format!("device {d}"),
                    })
                    .collect();
                let app = s.app_protocol.map_or("any", AppProtocol::as_str);
                let proto = match s.protocol {
                    Protocol::Tcp => "tcp",
                    Protocol::Udp => "udp",
                };
                let _ = writeln!(
                    o,
                    "  {:<20} {proto}/{app} -> {} in {}; allowed: {}",
                    s.name,
                    s.target,
                    s.zone,
                    allow.join(", ")
                );
                if !s.http_allow.is_empty() {
                    let rules: Vec<String> = s
                        .http_allow
                        .iter()
                        .map(|r| {
                            let any = |v: &[String]| {
                                if v.is_empty() {
                                    "any".to_owned()
                                } else {
                                    v.join(",")
                                }
                            };
                            format!("{} {}", any(&r.methods), any(&r.paths))
                        })
                        .collect();
                    let _ = writeln!(
                        o,
                        "  {:<20} only these requests (else 403): {}",
                        "",
                        rules.join("; ")
                    );
                }
                if !s.postgres.is_empty() {
                    let _ = writeln!(o, "  {:<20} {}", "", s.postgres.join("; "));
                }
            }
        }
        if !self.accesses.is_empty() {
            let _ = writeln!(o, "\naccesses:");
            for a in &self.accesses {
                let _ = writeln!(o, "  {} in {} -> {}", a.listen, a.zone, a.service);
            }
        }
        if !self.channels.is_empty() {
            let _ = writeln!(o, "\nchannels:");
            for c in &self.channels {
                let formats = if c.formats.is_empty() {
                    "any".to_owned()
                } else {
                    c.formats.join(",")
                };
                let rec = c
                    .max_record_bytes
                    .map_or("no limit".to_owned(), |b| b.to_string());
                let to = match &c.deliver_to {
                    Destination::Hub => "hub".to_owned(),
                    Destination::Edge { device, channel } => format!("{device}/{channel}"),
                };
                let _ = writeln!(
                    o,
                    "  {:<20} from {} to {to}; priority {}, ttl {}, {} buffer ({} when full), formats {formats}, records up to {rec}",
                    c.name,
                    c.zone,
                    c.priority,
                    c.ttl,
                    c.max_bytes,
                    match c.when_full {
                        WhenFull::Reject => "reject",
                        WhenFull::DropOldest => "drop_oldest",
                        WhenFull::Block => "block",
                    }
                );
            }
        }
        if !self.publishes.is_empty() {
            let _ = writeln!(o, "\npublished:");
            for p in &self.publishes {
                let _ = writeln!(o, "  {} in {} -> {}", p.listen, p.zone, p.service);
            }
        }
        o
    }
}

/// A `postgres` service's rules, in words, for the summary.
fn pg_rules(s: &crate::config::Service) -> Vec<String> {
    if s.app_protocol != Some(AppProtocol::Postgres) {
        return Vec::new();
    }
    let p = &s.postgres;
    let list = |v: &[String]| {
        if v.is_empty() {
            "any".to_owned()
        } else {
            v.join(",")
        }
    };
    let mut out = vec![
        format!("users {}", list(&p.users)),
        format!("databases {}", list(&p.databases)),
        format!("messages up to {} bytes", p.max_message),
    ];
    if p.read_only {
        out.push("read-only".into());
    }
    out.push(if p.tls.is_some() {
        "TLS ended at the gateway".into()
    } else {
        "SSLRequest declined".into()
    });
    out
}
