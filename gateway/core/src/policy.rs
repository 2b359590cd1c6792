//! The boundary rules (DESIGN.md rules 1-6), as a pure policy engine with two faces.
//!
//! - [`check_config`]: at config time, forbidden bridges and missing controls are
//!   errors with the id of the rule that forbids them.
//! - [`Policy::decide`]: at run time, every relay open and every channel record is
//!   decided against the checked config and the date. Default deny: a crossing is
//!   allowed only when a declared service, access, channel or publish allows it and
//!   no rule forbids it.
//!
//! Both faces share [`bridge`], so a config the checker accepts cannot be allowed
//! at run time to do what the checker would refuse. Rule ids are stable: they
//! appear in `docs/policy.md`, in `gatewayd check` output and in audit records.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::config::{Config, Format, Level, MIN_RETENTION_DAYS, Peer, Role, Zone, ZoneKind};
use crate::diag::{Diagnostic, Location};
pub use crate::rule::RuleId;
use crate::units::Date;

/// Days before an assessment's end at which `check` starts warning.
pub const ASSESSMENT_WARNING_DAYS: i64 = 30;

/// How data moves across a bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Flow {
    /// A relayed connection: data moves both ways.
    Interactive,
    /// Records pushed through a channel, one way.
    Channel {
        /// Declared `one_way = true`.
        one_way: bool,
        /// Formats and a record size limit are declared and checked.
        content_checked: bool,
    },
}

/// A refusal: the rule and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The rule that refuses.
    pub rule: RuleId,
    /// Why, in the operator's terms.
    pub reason: String,
}

fn refuse(rule: RuleId, reason: impl Into<String>) -> Refusal {
    Refusal {
        rule,
        reason: reason.into(),
    }
}

/// The boundary level of a crossing between two zones: the higher of their levels.
pub fn boundary_level(a: &Zone, b: &Zone) -> Level {
    a.level.max(b.level)
}

/// Rules 1, 2 and 4 for data moving from zone `from` to zone `to` on the box
/// described by `config`. Returns the boundary level when the bridge is allowed.
///
/// # Errors
/// The refusal, with the rule that forbids the bridge.
pub fn bridge(config: &Config, from: &Zone, to: &Zone, flow: Flow) -> Result<Level, Refusal> {
    for z in [from, to] {
        if z.kind == ZoneKind::Internet {
            return Err(refuse(
                RuleId::Internet,
                format!(
                    "zone {:?} is an internet zone, which is never bridged",
                    z.name
                ),
            ));
        }
    }
    if let Some((i, o)) = intranet_conflict(config) {
        return Err(refuse(
            RuleId::IntranetIsolation,
            format!(
                "this box holds the intranet zone {:?} together with the {} zone {:?}",
                i.name,
                o.kind.as_str(),
                o.name
            ),
        ));
    }
    if from.classified != to.classified {
        let (secret, open) = if from.classified {
            (from, to)
        } else {
            (to, from)
        };
        return Err(if secret.kind == ZoneKind::Intranet {
            refuse(
                RuleId::OneWayImport,
                format!(
                    "unclassified zone {:?} cannot be bridged to the intranet {:?}: unclassified data enters the intranet only through an approved one-way import device, which this gateway is not",
                    open.name, secret.name
                ),
            )
        } else {
            refuse(
                RuleId::ClassifiedBridge,
                format!(
                    "classified zone {:?} may bridge only to the intranet, not to the {} zone {:?}",
                    secret.name,
                    open.kind.as_str(),
                    open.name
                ),
            )
        });
    }
    if from.level > to.level {
        let down = format!(
            "from {:?} ({}) down to {:?} ({})",
            from.name, from.level, to.name, to.level
        );
        match flow {
            Flow::Interactive => {
                return Err(refuse(
                    RuleId::LevelDown,
                    format!("an interactive relay may not run {down}"),
                ));
            }
            Flow::Channel {
                one_way,
                content_checked,
            } if !(one_way && content_checked) => {
                return Err(refuse(
                    RuleId::LevelDown,
                    format!(
                        "data may flow {down} only through a channel declared one_way = true with formats and max_record_bytes"
                    ),
                ));
            }
            Flow::Channel { .. } => {}
        }
    }
    Ok(boundary_level(from, to))
}

/// The intranet zone and an extranet or internet zone held together, if any.
fn intranet_conflict(config: &Config) -> Option<(&Zone, &Zone)> {
    let intranet = config.zones.iter().find(|z| z.kind == ZoneKind::Intranet)?;
    let other = config
        .zones
        .iter()
        .find(|z| matches!(z.kind, ZoneKind::Extranet | ZoneKind::Internet))?;
    Some((intranet, other))
}

/// Rule 3 for one zone on `today`.
///
/// # Errors
/// The refusal when a legacy zone has no assessment or it has ended.
pub fn assessment_valid(zone: &Zone, today: Date) -> Result<(), Refusal> {
    if zone.kind != ZoneKind::Legacy {
        return Ok(());
    }
    match &zone.assessment {
        None => Err(refuse(
            RuleId::AssessmentMissing,
            format!("legacy zone {:?} has no assessment", zone.name),
        )),
        Some(a) if today > a.valid_until => Err(refuse(
            RuleId::AssessmentExpired,
            format!(
                "the assessment {} of zone {:?} ended on {}",
                a.id, zone.name, a.valid_until
            ),
        )),
        Some(_) => Ok(()),
    }
}

/// What a declared crossing is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "name")]
pub enum Purpose {
    /// A `[[service]]` reached from a zone of this box or, through the hub, the provincial network.
    Service(String),
    /// A `[[service]]` reached by another department's gateway through the hub.
    ServiceFromDevice(String),
    /// An `[[access]]` to another department's service.
    Access(String),
    /// A `[[channel]]`.
    Channel(String),
    /// A hub's `[[publish]]`.
    Publish(String),
}

/// A crossing the configuration declares: from which zone to which, for what.
#[derive(Debug, Clone)]
pub struct Declared<'c> {
    /// Where data enters (the client's side for relays, the producer's for channels).
    pub from: &'c Zone,
    /// Where it goes.
    pub to: &'c Zone,
    /// Relay or channel.
    pub flow: Flow,
    /// What declares it.
    pub purpose: Purpose,
    /// Where it is declared.
    pub loc: Location,
}

/// Every crossing `config` declares, in file order. Entries that need the uplink
/// zone are left out when the edge has none (that is reported by [`check_config`]).
pub fn declared(config: &Config) -> Vec<Declared<'_>> {
    let mut out = Vec::new();
    let uplink = config.uplink_zone();
    match &config.role {
        Role::Edge(e) => {
            for s in &e.services {
                let Some(to) = config.zone(&s.zone) else {
                    continue;
                };
                for peer in &s.allow {
                    let (from, purpose) = match peer {
                        Peer::Zone(z) => (config.zone(z), Purpose::Service(s.name.clone())),
                        Peer::Device(d) => (
                            uplink,
                            Purpose::ServiceFromDevice(format!("{}<-{d}", s.name)),
                        ),
                    };
                    if let Some(from) = from {
                        out.push(Declared {
                            from,
                            to,
                            flow: Flow::Interactive,
                            purpose,
                            loc: s.loc,
                        });
                    }
                }
            }
            for a in &e.accesses {
                if let (Some(from), Some(to)) = (config.zone(&a.zone), uplink) {
                    let purpose = Purpose::Access(format!("{}/{}", a.device, a.service));
                    out.push(Declared {
                        from,
                        to,
                        flow: Flow::Interactive,
                        purpose,
                        loc: a.loc,
                    });
                }
            }
            for c in &e.channels {
                if let (Some(from), Some(to)) = (config.zone(&c.zone), uplink) {
                    let flow = Flow::Channel {
                        one_way: c.one_way,
                        content_checked: !c.formats.is_empty() && c.max_record_bytes.is_some(),
                    };
                    out.push(Declared {
                        from,
                        to,
                        flow,
                        purpose: Purpose::Channel(c.name.clone()),
                        loc: c.loc,
                    });
                }
            }
        }
        Role::Hub(h) => {
            for p in &h.publishes {
                if let Some(z) = config.zone(&p.zone) {
                    let purpose = Purpose::Publish(format!("{}/{}", p.device, p.service));
                    out.push(Declared {
                        from: z,
                        to: z,
                        flow: Flow::Interactive,
                        purpose,
                        loc: p.loc,
                    });
                }
            }
        }
    }
    out
}

/// The config-time face: every boundary rule applied to a compiled config, as of `today`.
pub fn check_config(config: &Config, today: Date) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let err = |rule: RuleId, loc: Location, msg: String| Diagnostic::error(loc, msg).rule(rule);

    if let Some((i, o)) = intranet_conflict(config) {
        let (first, second) = if i.loc < o.loc { (i, o) } else { (o, i) };
        out.push(
            err(
                RuleId::IntranetIsolation,
                second.loc,
                format!(
                    "zone {:?} ({}) and zone {:?} ({}) on one box: the intranet is physically isolated from the extranet and the internet",
                    second.name, second.kind.as_str(), first.name, first.kind.as_str()
                ),
            )
            .hint("use separate gateways for the intranet and the extranet"),
        );
    }

    if config.audit.retention_days < MIN_RETENTION_DAYS {
        out.push(
            err(
                RuleId::Retention,
                config.audit.loc,
                format!("audit.retention_days = {} is below the legal minimum of {MIN_RETENTION_DAYS} days", config.audit.retention_days),
            )
            .hint(format!("set retention_days = {MIN_RETENTION_DAYS} or more (Cybersecurity Law, Art. 23(3))")),
        );
    }

    if let Role::Edge(e) = &config.role {
        let provincial: Vec<&Zone> = config
            .zones
            .iter()
            .filter(|z| matches!(z.kind, ZoneKind::Intranet | ZoneKind::Extranet))
            .collect();
        let needs_uplink_zone = !e.accesses.is_empty()
            || !e.channels.is_empty()
            || e.services
                .iter()
                .any(|s| s.allow.iter().any(|p| matches!(p, Peer::Device(_))));
        if provincial.is_empty() && needs_uplink_zone {
            out.push(
                Diagnostic::error(Location { line: 1, column: 1 }, "no intranet or extranet zone: accesses, channels and device peers cross to the provincial network the uplink reaches")
                    .hint("declare the provincial zone this edge connects to, e.g. [[zone]] kind = \"extranet\""),
            );
        }
        if provincial.len() > 1 && intranet_conflict(config).is_none() {
            out.push(
                Diagnostic::error(provincial[1].loc, format!("zone {:?}: an edge connects to one provincial zone, and {:?} is already declared", provincial[1].name, provincial[0].name))
                    .hint("merge the networks into one zone"),
            );
        }
    }

    let mut bridged: Vec<&Zone> = Vec::new();
    let mut detect_warned = false;
    for d in declared(config) {
        match bridge(config, d.from, d.to, d.flow) {
            Err(r) if r.rule == RuleId::IntranetIsolation => {} // reported once above
            Err(r) => {
                let hint = match r.rule {
                    RuleId::OneWayImport => {
                        "remove this bridge; import unclassified data through the approved one-way import device"
                    }
                    RuleId::ClassifiedBridge => {
                        "connect the classified network through a gateway on the intranet"
                    }
                    RuleId::Internet => "internet zones are never bridged; remove this crossing",
                    RuleId::LevelDown if matches!(d.flow, Flow::Channel { .. }) => {
                        "declare the channel one_way = true with formats and max_record_bytes, or do not send data down"
                    }
                    _ => {
                        "reverse the direction: clients in the lower-level zone may reach services in the higher-level one"
                    }
                };
                out.push(err(r.rule, d.loc, r.reason).hint(hint));
            }
            Ok(level) => {
                if level.get() >= 3 {
                    out.extend(level3_controls(config, &d, level));
                    if !config.detect.enabled && !detect_warned {
                        detect_warned = true;
                        out.push(
                            Diagnostic::warning(config.detect.loc, format!("intrusion detection is off ([detect] enabled = false), but this node has a level-{} crossing (GB/T 22239-2019 8.1.3.3)", level.get()))
                                .hint("remove enabled = false; tune the thresholds or never_ban instead (docs/config.md)"),
                        );
                    }
                }
            }
        }
        for z in [d.from, d.to] {
            if z.kind == ZoneKind::Legacy && !bridged.iter().any(|b| b.name == z.name) {
                bridged.push(z);
            }
        }
    }

    for z in bridged {
        match (&z.assessment, assessment_valid(z, today)) {
            (_, Err(r)) => {
                let hint = match r.rule {
                    RuleId::AssessmentMissing => {
                        "add assessment = { id = \"REPORT-ID\", valid_until = YYYY-MM-DD } once the zone has passed its assessment (测评)"
                    }
                    _ => {
                        "renew the assessment (测评) and update valid_until; until then nothing in this zone is bridged"
                    }
                };
                let loc = z.assessment.as_ref().map_or(z.loc, |a| a.loc);
                out.push(err(r.rule, loc, r.reason).hint(hint));
            }
            (Some(a), Ok(())) => {
                let left = today.days_until(a.valid_until);
                if left <= ASSESSMENT_WARNING_DAYS {
                    out.push(
                        Diagnostic::warning(a.loc, format!("the assessment {} of zone {:?} ends on {} ({left} days left); bridging stops then", a.id, z.name, a.valid_until))
                            .rule(RuleId::AssessmentExpiring)
                            .hint("schedule the re-assessment (测评) now"),
                    );
                }
            }
            (None, Ok(())) => {}
        }
    }
    out
}

fn level3_controls(config: &Config, d: &Declared<'_>, level: Level) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let Some(edge) = config.edge() else {
        return out;
    };
    match &d.purpose {
        Purpose::Service(name) | Purpose::ServiceFromDevice(name) => {
            let name = name.split("<-").next().unwrap_or(name);
            if let Some(s) = edge.services.iter().find(|s| s.name == name) {
                if s.app_protocol.is_none() && !out.iter().any(|o: &Diagnostic| o.location == s.loc)
                {
                    out.push(
                        Diagnostic::error(s.loc, format!("service {:?} crosses a level-{} boundary but declares no app_protocol", s.name, level.get()))
                            .rule(RuleId::AppProtocol)
                            .hint(if s.protocol == crate::config::Protocol::Udp {
                                "add app_protocol = \"rtp\" or \"mpegts\"; every datagram is checked"
                            } else {
                                "add app_protocol = \"http\", \"tls\" or \"postgres\"; the whole connection is checked"
                            }),
                    );
                }
            }
        }
        Purpose::Channel(name) => {
            if let Some(c) = edge.channels.iter().find(|c| c.name == *name) {
                if !config.scans(c) {
                    let (why, hint) = if config.scan.is_none() {
                        (
                            "no [scan] section names a scanner",
                            "add [scan] with clamd = \"/run/clamav/clamd.ctl\" (docs/config.md)",
                        )
                    } else {
                        ("it sets scan = false", "remove scan = false")
                    };
                    out.push(
                        Diagnostic::warning(c.loc, format!("channel {:?} crosses a level-{} boundary but its records are not scanned for malicious code: {why} (GB/T 22239-2019 8.1.3.4 a)", c.name, level.get()))
                            .hint(hint),
                    );
                }
                let mut missing = Vec::new();
                if c.formats.is_empty() {
                    missing.push("formats");
                }
                if c.max_record_bytes.is_none() {
                    missing.push("max_record_bytes");
                }
                if !missing.is_empty() {
                    out.push(
                        Diagnostic::error(c.loc, format!("channel {:?} crosses a level-{} boundary but declares no {}", c.name, level.get(), missing.join(" and ")))
                            .rule(RuleId::ChannelContent)
                            .hint("add formats = [\"json\"] (or xml, csv, text) and max_record_bytes = \"4MiB\""),
                    );
                }
            }
        }
        Purpose::Access(_) | Purpose::Publish(_) => {}
    }
    out
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The crossing may proceed.
    Allow,
    /// The crossing is refused.
    Deny,
}

/// The run-time answer for one crossing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Allow or deny.
    pub verdict: Verdict,
    /// The rule that decided.
    pub rule: RuleId,
    /// Why, for the log, the audit record and the client.
    pub reason: String,
    /// The boundary level of the crossing, when its zones are known.
    pub level: Option<Level>,
}

impl Decision {
    /// Whether the crossing may proceed.
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    fn deny(r: Refusal, level: Option<Level>) -> Self {
        Self {
            verdict: Verdict::Deny,
            rule: r.rule,
            reason: r.reason,
            level,
        }
    }

    fn allow(rule: RuleId, reason: String, level: Level) -> Self {
        Self {
            verdict: Verdict::Allow,
            rule,
            reason,
            level: Some(level),
        }
    }
}

/// Where a connection to a published service comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin<'a> {
    /// A client in a zone of this box, known by its address.
    Local {
        /// The client's address.
        client: IpAddr,
    },
    /// A provincial client relayed by the hub from a publish listener.
    Provincial {
        /// The client's address on the provincial network.
        client: IpAddr,
    },
    /// Another department's gateway, relayed by the hub (its id from its certificate).
    Device(&'a str),
}

/// A crossing to decide at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crossing<'a> {
    /// Open a connection to a service published by this edge.
    ServiceOpen {
        /// The service's name.
        service: &'a str,
        /// Who opens it.
        origin: Origin<'a>,
    },
    /// A legacy client connects to an access listener of this edge.
    AccessOpen {
        /// The listener.
        listen: SocketAddr,
        /// The legacy client's address.
        client: IpAddr,
    },
    /// A producer connects to an ingest listener of this edge in `zone`.
    IngestOpen {
        /// The listener's zone.
        zone: &'a str,
        /// The producer's address.
        client: IpAddr,
    },
    /// A producer hands a record to a channel.
    ChannelRecord {
        /// The channel's name.
        channel: &'a str,
        /// The record's declared format.
        format: Format,
        /// The record's size.
        bytes: u64,
    },
    /// A provincial client connects to a hub's publish listener.
    PublishOpen {
        /// The listener.
        listen: SocketAddr,
        /// The client's address.
        client: IpAddr,
    },
    /// On a hub: gateway `from` asks to reach a service of gateway `to`
    /// (the owning edge decides again against its `allow` list).
    Transit {
        /// The asking device (from its certificate).
        from: &'a str,
        /// The device that owns the service.
        to: &'a str,
    },
}

/// The run-time face: decides crossings against a checked configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    config: Config,
}

impl Policy {
    /// A policy for `config` (which should have passed [`crate::check::load`]).
    pub fn new(config: Config) -> Self {
        Self { config }
    }

    /// The configuration it decides against.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Decides one crossing on the civil date `today`. Default deny.
    pub fn decide(&self, crossing: &Crossing<'_>, today: Date) -> Decision {
        match self.try_decide(crossing, today) {
            Ok(d) => d,
            Err((r, level)) => Decision::deny(r, level),
        }
    }

    fn try_decide(
        &self,
        crossing: &Crossing<'_>,
        today: Date,
    ) -> Result<Decision, (Refusal, Option<Level>)> {
        let cfg = &self.config;
        let no_level = |r: Refusal| (r, None);
        let deny_default = |what: String| (refuse(RuleId::DefaultDeny, what), None);
        match *crossing {
            Crossing::ServiceOpen { service, origin } => {
                let edge = cfg
                    .edge()
                    .ok_or_else(|| deny_default("this node publishes no services".into()))?;
                let s = edge
                    .services
                    .iter()
                    .find(|s| s.name == service)
                    .ok_or_else(|| {
                        deny_default(format!("no service named {service:?} is published here"))
                    })?;
                let to = cfg
                    .zone(&s.zone)
                    .ok_or_else(|| deny_default(format!("zone {:?} is not declared", s.zone)))?;
                let (from, peer) = match origin {
                    Origin::Local { client } => {
                        let z = cfg
                            .zones
                            .iter()
                            .find(|z| z.contains(client))
                            .ok_or_else(|| {
                                no_level(refuse(
                                    RuleId::Address,
                                    format!("client {client} is in none of this box's zones"),
                                ))
                            })?;
                        (z, Peer::Zone(z.name.clone()))
                    }
                    Origin::Provincial { client } => {
                        let z = cfg.uplink_zone().ok_or_else(|| {
                            deny_default("this edge has no provincial zone".into())
                        })?;
                        if !z.contains(client) {
                            return Err(no_level(refuse(
                                RuleId::Address,
                                format!("client {client} is not in zone {:?}", z.name),
                            )));
                        }
                        (z, Peer::Zone(z.name.clone()))
                    }
                    Origin::Device(d) => {
                        let z = cfg.uplink_zone().ok_or_else(|| {
                            deny_default("this edge has no provincial zone".into())
                        })?;
                        (z, Peer::Device(d.to_owned()))
                    }
                };
                let level = Some(boundary_level(from, to));
                if !s.allow.contains(&peer) {
                    let who = match &peer {
                        Peer::Zone(z) => format!("zone {z:?}"),
                        Peer::Device(d) => format!("device {d:?}"),
                    };
                    return Err((
                        refuse(
                            RuleId::DefaultDeny,
                            format!("{who} is not allowed to reach service {:?}", s.name),
                        ),
                        level,
                    ));
                }
                let level = bridge(cfg, from, to, Flow::Interactive).map_err(|r| (r, level))?;
                self.assessments(&[from, to], today, level)?;
                if level.get() >= 3 && s.app_protocol.is_none() {
                    let r = refuse(
                        RuleId::AppProtocol,
                        format!(
                            "service {:?} declares no app_protocol at boundary level {}",
                            s.name,
                            level.get()
                        ),
                    );
                    return Err((r, Some(level)));
                }
                Ok(Decision::allow(
                    RuleId::AllowService,
                    format!("{} may reach service {:?}", describe(&peer), s.name),
                    level,
                ))
            }
            Crossing::AccessOpen { listen, client } => {
                let edge = cfg
                    .edge()
                    .ok_or_else(|| deny_default("this node has no accesses".into()))?;
                let a = edge
                    .accesses
                    .iter()
                    .find(|a| a.listen == listen)
                    .ok_or_else(|| deny_default(format!("no access listens on {listen}")))?;
                let from = cfg
                    .zone(&a.zone)
                    .ok_or_else(|| deny_default(format!("zone {:?} is not declared", a.zone)))?;
                if !from.contains(client) {
                    return Err(no_level(refuse(
                        RuleId::Address,
                        format!("client {client} is not in zone {:?}", from.name),
                    )));
                }
                let to = cfg
                    .uplink_zone()
                    .ok_or_else(|| deny_default("this edge has no provincial zone".into()))?;
                let level = bridge(cfg, from, to, Flow::Interactive)
                    .map_err(|r| (r, Some(boundary_level(from, to))))?;
                self.assessments(&[from, to], today, level)?;
                Ok(Decision::allow(
                    RuleId::AllowAccess,
                    format!(
                        "access to {}/{} from zone {:?}",
                        a.device, a.service, from.name
                    ),
                    level,
                ))
            }
            Crossing::IngestOpen { zone, client } => {
                let z = cfg
                    .zone(zone)
                    .ok_or_else(|| deny_default(format!("zone {zone:?} is not declared")))?;
                if !z.contains(client) {
                    return Err(no_level(refuse(
                        RuleId::Address,
                        format!(
                            "producer {client} is not in zone {:?}, the zone of this ingest listener",
                            z.name
                        ),
                    )));
                }
                Ok(Decision::allow(
                    RuleId::AllowChannel,
                    format!("producer {client} in zone {:?}", z.name),
                    z.level,
                ))
            }
            Crossing::ChannelRecord {
                channel,
                format,
                bytes,
            } => {
                let edge = cfg
                    .edge()
                    .ok_or_else(|| deny_default("this node has no channels".into()))?;
                let c = edge
                    .channels
                    .iter()
                    .find(|c| c.name == channel)
                    .ok_or_else(|| deny_default(format!("no channel named {channel:?}")))?;
                let from = cfg
                    .zone(&c.zone)
                    .ok_or_else(|| deny_default(format!("zone {:?} is not declared", c.zone)))?;
                let to = cfg
                    .uplink_zone()
                    .ok_or_else(|| deny_default("this edge has no provincial zone".into()))?;
                let content_checked = !c.formats.is_empty() && c.max_record_bytes.is_some();
                let flow = Flow::Channel {
                    one_way: c.one_way,
                    content_checked,
                };
                let level =
                    bridge(cfg, from, to, flow).map_err(|r| (r, Some(boundary_level(from, to))))?;
                self.assessments(&[from, to], today, level)?;
                let content = |why: String| (refuse(RuleId::ChannelContent, why), Some(level));
                if level.get() >= 3 && !content_checked {
                    return Err(content(format!(
                        "channel {:?} declares no formats or record size limit at boundary level {}",
                        c.name,
                        level.get()
                    )));
                }
                if !c.formats.is_empty() && !c.formats.contains(&format) {
                    return Err(content(format!(
                        "channel {:?} does not accept {} records",
                        c.name,
                        format.as_str()
                    )));
                }
                if let Some(max) = c.max_record_bytes {
                    if bytes > max.0 {
                        return Err(content(format!(
                            "record of {bytes} bytes exceeds max_record_bytes ({max}) of channel {:?}",
                            c.name
                        )));
                    }
                }
                Ok(Decision::allow(
                    RuleId::AllowChannel,
                    format!("{} record for channel {:?}", format.as_str(), c.name),
                    level,
                ))
            }
            Crossing::PublishOpen { listen, client } => {
                let hub = cfg
                    .hub()
                    .ok_or_else(|| deny_default("this node has no publish listeners".into()))?;
                let p = hub
                    .publishes
                    .iter()
                    .find(|p| p.listen == listen)
                    .ok_or_else(|| deny_default(format!("nothing is published on {listen}")))?;
                let z = cfg
                    .zone(&p.zone)
                    .ok_or_else(|| deny_default(format!("zone {:?} is not declared", p.zone)))?;
                if !z.contains(client) {
                    return Err(no_level(refuse(
                        RuleId::Address,
                        format!("client {client} is not in zone {:?}", z.name),
                    )));
                }
                let level = bridge(cfg, z, z, Flow::Interactive).map_err(|r| (r, Some(z.level)))?;
                Ok(Decision::allow(
                    RuleId::AllowPublish,
                    format!("{}/{} published in zone {:?}", p.device, p.service, z.name),
                    level,
                ))
            }
            Crossing::Transit { from, to } => {
                let hub = cfg
                    .hub()
                    .ok_or_else(|| deny_default("this node carries no transit".into()))?;
                if from == to {
                    return Err(deny_default(format!(
                        "device {from} asked for its own service through the hub"
                    )));
                }
                // The zone the hub meets edges in: the one holding its QUIC
                // listener, or its only provincial zone.
                let ip = hub.settings.listen.ip();
                let z = cfg
                    .zones
                    .iter()
                    .find(|z| z.contains(ip))
                    .or_else(|| cfg.uplink_zone())
                    .ok_or_else(|| {
                        deny_default("the hub has no provincial zone for transit".into())
                    })?;
                let level = bridge(cfg, z, z, Flow::Interactive).map_err(|r| (r, Some(z.level)))?;
                Ok(Decision::allow(
                    RuleId::AllowTransit,
                    format!("{from} to {to} across zone {:?}", z.name),
                    level,
                ))
            }
        }
    }

    fn assessments(
        &self,
        zones: &[&Zone],
        today: Date,
        level: Level,
    ) -> Result<(), (Refusal, Option<Level>)> {
        for z in zones {
            assessment_valid(z, today).map_err(|r| (r, Some(level)))?;
        }
        Ok(())
    }
}

fn describe(peer: &Peer) -> String {
    match peer {
        Peer::Zone(z) => format!("zone {z:?}"),
        Peer::Device(d) => format!("device {d:?}"),
    }
}

/// The controls a crossing gets, in words for `check`: those its boundary
/// level imposes (DESIGN.md rule 5) that this configuration enforces, each
/// derived from what is set (a level-3 control the configuration lacks is
/// warned about by [`check_config`], naming the clause).
pub fn controls(config: &Config, d: &Declared<'_>, level: Level) -> Vec<String> {
    let mut c = vec!["every crossing audited (hash-chained)".to_owned()];
    if level.get() >= 2 {
        c.extend([
            "default deny".to_owned(),
            "address, port, protocol and session-state control".to_owned(),
        ]);
    }
    let edge = config.edge();
    let service = |name: &str| {
        let name = name.split("<-").next().unwrap_or(name);
        edge.and_then(|e| e.services.iter().find(|s| s.name == name))
    };
    let channel = |name: &str| edge.and_then(|e| e.channels.iter().find(|c| c.name == name));
    if level.get() >= 3 {
        match &d.purpose {
            Purpose::Service(n) | Purpose::ServiceFromDevice(n) => {
                if let Some(s) = service(n) {
                    if let Some(p) = s.app_protocol {
                        c.push(if p.is_datagram() {
                            format!(
                                "application protocol {} checked on every datagram",
                                p.as_str()
                            )
                        } else {
                            format!(
                                "application protocol {} checked on the whole connection",
                                p.as_str()
                            )
                        });
                    }
                    if !s.http_allow.is_empty() {
                        c.push("HTTP methods and paths allowed by http_allow".into());
                    }
                    if p_is(s, crate::config::AppProtocol::Postgres) {
                        c.push(
                            "every SQL statement audited (text, SHA-256, rows, duration)".into(),
                        );
                        let pg = &s.postgres;
                        if !pg.users.is_empty() || !pg.databases.is_empty() {
                            c.push("logins limited by pg_users and pg_databases".into());
                        }
                        if pg.read_only {
                            c.push("read-only: only single read statements pass, as a SQL parser reads them".into());
                        }
                    }
                }
            }
            Purpose::Channel(n) => {
                if let Some(ch) = channel(n) {
                    if !ch.formats.is_empty() && ch.max_record_bytes.is_some() {
                        c.push("channel formats parsed and size limited".into());
                    }
                    if !ch.deny_keywords.is_empty() {
                        c.push("denied keywords checked in what records say".into());
                    }
                    if config.scans(ch) {
                        c.push("malware scanning (8.1.3.4)".into());
                    }
                    let authed = edge.is_some_and(|e| {
                        e.ingests
                            .iter()
                            .filter(|i| i.zone == ch.zone)
                            .all(|i| !matches!(i.auth, crate::config::IngestAuth::None))
                    });
                    if authed {
                        c.push("producers authenticated".into());
                    }
                }
            }
            Purpose::Access(_) | Purpose::Publish(_) => {}
        }
        c.push("mutual certificate authentication between gateways".into());
        if config.detect.enabled {
            c.push("intrusion detection with alarms and bans (8.1.3.3)".into());
        }
        if config.alarms.syslog.is_some() || config.alarms.webhook.is_some() {
            c.push("alarms forwarded to the SOC".into());
        }
        c.push("remote users' audit kept apart".into());
    }
    if level.get() >= 4 {
        c.extend([
            "exchange only by protocol conversion".to_owned(),
            "mutual crypto authentication before any data".to_owned(),
        ]);
    }
    c
}

/// Whether service `s` declares `app`.
fn p_is(s: &crate::config::Service, app: crate::config::AppProtocol) -> bool {
    s.app_protocol == Some(app)
}
