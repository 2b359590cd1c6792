//! Raw TOML to checked [`Config`], collecting every mistake.
//!
//! The document is parsed with error recovery; each top-level section (and each
//! element of an array of tables) is deserialized on its own, so one bad table does
//! not hide the mistakes in the next. Values are then checked one by one, and
//! cross-references last. Only when nothing is wrong is a [`Config`] returned.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::raw::*;
use super::*;
use crate::diag::{Diagnostic, LineIndex, Location};
use crate::units::{self, ByteSize, Cidr, Date, HostPort, ValueError};

mod hub_store;
mod postgres;

/// Unknown keys reported in one table before the rest of it is given up.
const MAX_UNKNOWN_KEYS: usize = 32;

const SECTIONS: &str = "node, zone, uplink, service, access, channel, ingest, audit, admin, detect, alarms, scan, update, hub, publish";

/// Compiles TOML text into a [`Config`] (when there is no error) and the
/// diagnostics found. Boundary rules are not applied here; see [`super::load`].
pub fn compile(src: &str) -> (Option<Config>, Vec<Diagnostic>) {
    let mut c = Compiler {
        idx: LineIndex::new(src),
        diags: Vec::new(),
        declared_zones: HashSet::new(),
    };
    let (doc, errors) = DeTable::parse_recoverable(src);
    if !errors.is_empty() {
        for e in &errors {
            c.toml_error(e, "fix the TOML syntax (https://toml.io)");
        }
        return (None, c.diags);
    }
    let raw = c.split(doc.into_inner());
    let config = c.config(raw);
    let ok = !c.diags.iter().any(Diagnostic::is_error);
    (config.filter(|_| ok), c.diags)
}

#[derive(Default)]
struct RawDoc {
    node: Option<RawNode>,
    zones: Vec<RawZone>,
    uplink: Option<(RawUplink, Range<usize>)>,
    services: Vec<(RawService, Range<usize>)>,
    accesses: Vec<(RawAccess, Range<usize>)>,
    channels: Vec<(RawChannel, Range<usize>)>,
    ingests: Vec<(RawIngest, Range<usize>)>,
    audit: Option<(RawAudit, Range<usize>)>,
    admin: Option<RawAdmin>,
    update: Option<(RawUpdate, Range<usize>)>,
    detect: Option<(RawDetect, Range<usize>)>,
    alarms: Option<RawAlarms>,
    scan: Option<RawScan>,
    hub: Option<(RawHub, Range<usize>)>,
    publishes: Vec<(RawPublish, Range<usize>)>,
    /// Sections present but malformed: their absence must not be reported again.
    broken: HashSet<&'static str>,
}

struct Compiler<'a> {
    idx: LineIndex<'a>,
    diags: Vec<Diagnostic>,
    /// Names of every `[[zone]]` written, refused or not: a reference to a
    /// refused one is not reported again (its own errors say why it is gone).
    declared_zones: HashSet<String>,
}

impl Compiler<'_> {
    fn at(&self, span: &Range<usize>) -> Location {
        self.idx.locate_span(span)
    }

    /// Warns about a level-3 (or 4) zone that has listeners on this box but
    /// names no `interfaces`: the nftables baseline can then tell its packets
    /// only by source address, which a neighbour on another port can forge.
    fn unbound_zones(&mut self, zones: &[Zone], role: Option<&Role>) {
        let listened: Vec<&str> = match role {
            Some(Role::Edge(e)) => e
                .accesses
                .iter()
                .map(|a| a.zone.as_str())
                .chain(e.ingests.iter().map(|i| i.zone.as_str()))
                .collect(),
            Some(Role::Hub(h)) => h.publishes.iter().map(|p| p.zone.as_str()).collect(),
            None => Vec::new(),
        };
        for z in zones {
            if z.level.get() >= 3 && z.interfaces.is_empty() && listened.contains(&z.name.as_str())
            {
                self.diags.push(
                    Diagnostic::warning(
                        z.loc,
                        format!("zone {:?} has listeners on this box but names no interfaces: the firewall can tell its packets only by their source address, which a neighbour on another port can forge", z.name),
                    )
                    .hint("add interfaces = [\"eth1\"] (the ports this zone is cabled to, as `ip link` names them)"),
                );
            }
        }
    }

    /// An `[[ingest]]`'s `auth` and the files it names; only the keys its
    /// kind uses may be set.
    fn ingest_auth(&mut self, i: &RawIngest, level: Option<Level>) -> Option<IngestAuth> {
        #[derive(Clone, Copy, PartialEq)]
        enum Kind {
            None,
            Token,
            Mtls,
        }
        let kind = match &i.auth {
            None => Kind::None,
            Some(a) => self.choice(
                a,
                "ingest.auth",
                &[
                    ("none", Kind::None),
                    ("token", Kind::Token),
                    ("mtls", Kind::Mtls),
                ],
            )?,
        };
        let keys: [(&Option<S>, &'static str, Kind); 4] = [
            (&i.tokens, "ingest.tokens", Kind::Token),
            (&i.client_ca, "ingest.client_ca", Kind::Mtls),
            (&i.cert, "ingest.cert", Kind::Mtls),
            (&i.key, "ingest.key", Kind::Mtls),
        ];
        let mut ok = true;
        for (value, key, needs) in keys {
            match (value, kind == needs) {
                (Some(v), false) => {
                    ok = false;
                    let word = if needs == Kind::Token {
                        "token"
                    } else {
                        "mtls"
                    };
                    self.error(
                        &v.span(),
                        format!("{key} is used only with auth = \"{word}\""),
                        format!("set auth = \"{word}\", or remove {key}"),
                    );
                }
                (None, true) => {
                    ok = false;
                    let span = i.auth.as_ref().map_or(i.listen.span(), Spanned::span);
                    self.error(
                        &span,
                        format!("ingest.auth = \"{}\" needs {key}", if needs == Kind::Token { "token" } else { "mtls" }),
                        match needs {
                            Kind::Token => "add tokens = \"/etc/gatewayd/producers.tokens\" (gatewayd producer add writes it)",
                            _ => "add client_ca (the CA of producers' certificates), cert and key (the listener's own)",
                        },
                    );
                }
                _ => {}
            }
        }
        if kind == Kind::None && level.is_some_and(|l| l.get() >= 3) {
            let span = i.auth.as_ref().map_or(i.listen.span(), Spanned::span);
            self.warning(
                &span,
                "ingest: a level-3 zone's producers are not authenticated (auth = \"none\"): any client in the zone can write to its channels",
                "set auth = \"token\" or \"mtls\" so each record names its producer",
            );
        }
        if !ok {
            return None;
        }
        let file = |c: &mut Self, v: &Option<S>, key| v.as_ref().and_then(|v| c.file(v, key));
        Some(match kind {
            Kind::None => IngestAuth::None,
            Kind::Token => IngestAuth::Token {
                tokens: file(self, &i.tokens, "ingest.tokens")?,
            },
            Kind::Mtls => IngestAuth::Mtls {
                client_ca: file(self, &i.client_ca, "ingest.client_ca")?,
                cert: file(self, &i.cert, "ingest.cert")?,
                key: file(self, &i.key, "ingest.key")?,
            },
        })
    }

    /// A service's `http_allow`: method names as HTTP spells them, path
    /// prefixes already in the form the relay matches (`/reports/`, not
    /// `/reports/../x` or `%2e`), for `app_protocol = "http"` only.
    fn http_allow(
        &mut self,
        raw: Option<&Spanned<Vec<Spanned<RawHttpAllow>>>>,
        app_protocol: Option<Option<AppProtocol>>,
    ) -> Vec<HttpAllow> {
        let Some(list) = raw else {
            return Vec::new();
        };
        if app_protocol.is_some_and(|a| a != Some(AppProtocol::Http)) {
            self.error(
                &list.span(),
                "service.http_allow applies to app_protocol = \"http\" only",
                "remove http_allow, or set app_protocol = \"http\"",
            );
        }
        if list.get_ref().is_empty() {
            self.error(
                &list.span(),
                "service.http_allow is empty, so no request could pass",
                "list what may be requested, like [{ methods = [\"GET\"], paths = [\"/reports/\"] }], or remove http_allow",
            );
        }
        let mut out = Vec::new();
        for entry in list.get_ref() {
            let e = entry.get_ref();
            if e.methods.is_none() && e.paths.is_none() {
                self.error(
                    &entry.span(),
                    "service.http_allow: an entry with neither methods nor paths allows every request",
                    "give methods = [...], paths = [...], or both",
                );
                continue;
            }
            let mut rule = HttpAllow {
                methods: Vec::new(),
                paths: Vec::new(),
            };
            for m in e.methods.iter().flat_map(|l| l.get_ref()) {
                let name = m.get_ref();
                if name.is_empty()
                    || name.len() > 32
                    || !name.bytes().all(|b| b.is_ascii_uppercase() || b == b'-')
                {
                    self.error(
                        &m.span(),
                        format!("service.http_allow: {name:?} is not an HTTP method"),
                        "write methods in capitals, as HTTP sends them: \"GET\", \"POST\"",
                    );
                } else if name == "CONNECT" {
                    self.error(
                        &m.span(),
                        "service.http_allow: CONNECT opens a tunnel and is always refused",
                        "remove CONNECT",
                    );
                } else {
                    rule.methods.push(name.clone());
                }
            }
            for p in e.paths.iter().flat_map(|l| l.get_ref()) {
                let path = p.get_ref();
                let normal = crate::urlpath::normalise_path(path);
                match normal {
                    Ok(n) if path.starts_with('/') && n == *path => rule.paths.push(n),
                    Ok(n) if path.starts_with('/') => self.error(
                        &p.span(),
                        format!("service.http_allow: the path {path:?} reads as {n:?}"),
                        format!("write it as {n:?}"),
                    ),
                    Ok(_) => self.error(
                        &p.span(),
                        format!("service.http_allow: the path {path:?} does not start with /"),
                        "write a path prefix like \"/reports/\"",
                    ),
                    Err(why) => self.error(
                        &p.span(),
                        format!("service.http_allow: the path {path:?} has {why}"),
                        "write the path as the server names it, without escapes",
                    ),
                }
            }
            out.push(rule);
        }
        out
    }

    fn error(&mut self, span: &Range<usize>, message: impl Into<String>, hint: impl Into<String>) {
        let d = Diagnostic::error(self.at(span), message).hint(hint);
        self.diags.push(d);
    }

    fn warning(
        &mut self,
        span: &Range<usize>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        let d = Diagnostic::warning(self.at(span), message).hint(hint);
        self.diags.push(d);
    }

    fn value_error(&mut self, span: &Range<usize>, key: &str, e: ValueError) {
        self.error(span, format!("{key}: {}", e.message), e.hint);
    }

    /// An optional duration, `default_s` seconds when absent; zero is refused.
    fn duration_or(
        &mut self,
        raw: Option<&S>,
        key: &str,
        default_s: u64,
    ) -> Option<std::time::Duration> {
        let Some(t) = raw else {
            return Some(std::time::Duration::from_secs(default_s));
        };
        match units::parse_duration(t.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.error(
                    &t.span(),
                    format!("{key}: must be longer than zero"),
                    format!("write a duration like \"{default_s}s\""),
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.value_error(&t.span(), key, e);
                None
            }
        }
    }

    fn toml_error(&mut self, e: &toml::de::Error, hint: &str) {
        let span = e.span().unwrap_or(0..0);
        // serde speaks Rust; say it in TOML terms.
        let mut message = e.message().trim().to_owned();
        for (rust, toml) in [
            ("expected i64", "expected a whole number"),
            (
                "expected a sequence",
                "expected an array like [\"a\", \"b\"]",
            ),
            ("expected a string", "expected a string in quotes"),
            ("expected struct", "expected a table, for"),
        ] {
            message = message.replace(rust, toml);
        }
        self.error(&span, message, hint.to_owned());
    }

    // ---- step 1: split the document into raw sections ----

    fn split(&mut self, doc: DeTable<'_>) -> RawDoc {
        let mut raw = RawDoc::default();
        for (key, value) in doc {
            let name = key.get_ref().as_ref();
            let kspan = key.span();
            match name {
                "node" => raw.node = self.one(value, "node", &mut raw.broken).map(|(t, _)| t),
                "uplink" => raw.uplink = self.one(value, "uplink", &mut raw.broken),
                "audit" => raw.audit = self.one(value, "audit", &mut raw.broken),
                "admin" => raw.admin = self.one(value, "admin", &mut raw.broken).map(|(t, _)| t),
                "update" => raw.update = self.one(value, "update", &mut raw.broken),
                "hub" => raw.hub = self.one(value, "hub", &mut raw.broken),
                "detect" => raw.detect = self.one(value, "detect", &mut raw.broken),
                "alarms" => raw.alarms = self.one(value, "alarms", &mut raw.broken).map(|(t, _)| t),
                "scan" => raw.scan = self.one(value, "scan", &mut raw.broken).map(|(t, _)| t),
                "zone" => {
                    if let DeValue::Array(items) = value.get_ref() {
                        let names = items.iter().filter_map(|i| match i.get_ref() {
                            DeValue::Table(t) => match t.get("name").map(Spanned::get_ref) {
                                Some(DeValue::String(n)) => Some(n.to_string()),
                                _ => None,
                            },
                            _ => None,
                        });
                        self.declared_zones.extend(names);
                    }
                    raw.zones = self
                        .many(value, "zone")
                        .into_iter()
                        .map(|(t, _)| t)
                        .collect()
                }
                "service" => raw.services = self.many(value, "service"),
                "access" => raw.accesses = self.many(value, "access"),
                "channel" => raw.channels = self.many(value, "channel"),
                "ingest" => raw.ingests = self.many(value, "ingest"),
                "publish" => raw.publishes = self.many(value, "publish"),
                other => {
                    let hint = match closest(other, SECTIONS.split(", ")) {
                        Some(s) => format!("did you mean [{s}]? The sections are: {SECTIONS}"),
                        None => format!("the sections are: {SECTIONS}"),
                    };
                    self.error(&kspan, format!("unknown section or key `{other}`"), hint);
                }
            }
        }
        raw
    }

    fn de<T: DeserializeOwned>(
        &mut self,
        value: Spanned<DeValue<'_>>,
        section: &str,
    ) -> Option<(T, Range<usize>)> {
        let span = value.span();
        let hint = format!("see the keys of [{section}] in docs/config.md");
        let mut value = value;
        // An unknown key is reported and the table read again without it, so
        // a misspelt key does not hide the other mistakes of its table.
        for _ in 0..MAX_UNKNOWN_KEYS {
            let e = match T::deserialize(ValueDeserializer::from(value.clone())) {
                Ok(t) => return Some((t, span)),
                Err(e) => e,
            };
            self.toml_error(&e, &hint);
            let unknown = e
                .message()
                .strip_prefix("unknown field `")
                .and_then(|m| m.split('`').next())
                .map(str::to_owned);
            let (Some(key), DeValue::Table(table)) = (unknown, value.get_mut()) else {
                return None;
            };
            // A key that is not at this level (inside an inline table): give up.
            table.remove(key.as_str())?;
        }
        None
    }

    fn one<T: DeserializeOwned>(
        &mut self,
        value: Spanned<DeValue<'_>>,
        section: &'static str,
        broken: &mut HashSet<&'static str>,
    ) -> Option<(T, Range<usize>)> {
        if !matches!(value.get_ref(), DeValue::Table(_)) {
            broken.insert(section);
            self.error(
                &value.span(),
                format!("`{section}` must be a table, written [{section}] once"),
                format!("write the section header as [{section}], not [[{section}]] or `{section} = ...`"),
            );
            return None;
        }
        let out = self.de(value, section);
        if out.is_none() {
            broken.insert(section);
        }
        out
    }

    fn many<T: DeserializeOwned>(
        &mut self,
        value: Spanned<DeValue<'_>>,
        section: &str,
    ) -> Vec<(T, Range<usize>)> {
        let span = value.span();
        let DeValue::Array(items) = value.into_inner() else {
            self.error(
                &span,
                format!("`{section}` must be an array of tables, written [[{section}]]"),
                format!("write each entry under its own [[{section}]] header"),
            );
            return Vec::new();
        };
        items
            .iter()
            .cloned()
            .filter_map(|item| self.de(item, section))
            .collect()
    }

    // ---- step 2: check values and build the config ----

    fn config(&mut self, raw: RawDoc) -> Option<Config> {
        let start = 0..0;
        // Without a usable [node], the rest is still checked: the role is guessed
        // from the sections present, and no config is built.
        let mut raw = raw;
        let (id, role, state_dir, role_span) = match &raw.node {
            Some(node) => {
                let id = self.device_id(&node.id, "node.id");
                let role = match node.role.get_ref().as_str() {
                    "edge" => Some(true),
                    "hub" => Some(false),
                    other => {
                        self.error(
                            &node.role.span(),
                            format!("node.role: unknown role {other:?}"),
                            "write role = \"edge\" (a department's gateway) or role = \"hub\" (the central hub)",
                        );
                        None
                    }
                };
                let state_dir = PathBuf::from(node.state_dir.get_ref());
                if !state_dir.is_absolute() {
                    self.error(
                        &node.state_dir.span(),
                        format!(
                            "node.state_dir: {:?} is not an absolute path",
                            node.state_dir.get_ref()
                        ),
                        "write an absolute path, for example \"/var/lib/gatewayd\"",
                    );
                }
                (id, role, Some(state_dir), Some(node.role.span()))
            }
            None => {
                if !raw.broken.contains("node") {
                    self.error(
                        &start,
                        "the [node] section is missing",
                        "add [node] with id, role and state_dir",
                    );
                }
                let hubbish =
                    raw.hub.is_some() || !raw.publishes.is_empty() || raw.broken.contains("hub");
                // With the role unknown, a missing [uplink] or [hub] is not reported.
                raw.broken.insert(if hubbish { "hub" } else { "uplink" });
                (None, Some(!hubbish), None, None)
            }
        };
        let mismatch_span = role_span.clone().unwrap_or(start.clone());
        let zones = self.zones(raw.zones);
        let audit = self.audit(raw.audit);
        let detect = raw.detect.take().map(|d| self.detect(d));
        let alarms = raw.alarms.take().map(|a| self.alarms(a));
        let scan = match raw.scan.take() {
            None => Some(None),
            Some(s) => self.scan(s).map(Some),
        };
        let admin = self.admin(raw.admin);

        let role = match role {
            Some(true) => {
                for (present, name) in [
                    (raw.hub.is_some(), "[hub]"),
                    (!raw.publishes.is_empty(), "[[publish]]"),
                ] {
                    if present && role_span.is_some() {
                        self.error(
                            &mismatch_span,
                            format!("{name} is for hubs, but this node's role is \"edge\""),
                            format!("remove {name}, or set role = \"hub\""),
                        );
                    }
                }
                let update = match raw.update.take() {
                    Some((u, _)) => self.update(u),
                    None => Some(Update::default()),
                };
                self.edge(
                    &zones,
                    raw.uplink,
                    raw.services,
                    raw.accesses,
                    raw.channels,
                    raw.ingests,
                    raw.broken.contains("uplink"),
                )
                .zip(update)
                .map(|(mut e, update)| {
                    e.update = update;
                    Role::Edge(e)
                })
            }
            Some(false) => {
                let edge_only = [
                    (raw.uplink.is_some(), "[uplink]"),
                    (raw.update.is_some(), "[update]"),
                    (!raw.services.is_empty(), "[[service]]"),
                    (!raw.accesses.is_empty(), "[[access]]"),
                    (!raw.channels.is_empty(), "[[channel]]"),
                    (!raw.ingests.is_empty(), "[[ingest]]"),
                ];
                for (present, name) in edge_only {
                    if present && role_span.is_some() {
                        self.error(
                            &mismatch_span,
                            format!("{name} is for edges, but this node's role is \"hub\""),
                            format!("remove {name}, or set role = \"edge\""),
                        );
                    }
                }
                if let Some(z) = zones.iter().find(|z| z.kind == ZoneKind::Legacy) {
                    self.diags.push(
                        Diagnostic::error(z.loc, format!("zone {:?}: a hub holds no legacy zone", z.name))
                            .hint("declare legacy zones on the department's edge; a hub lives on the provincial network"),
                    );
                }
                self.hub(&zones, raw.hub, raw.publishes, raw.broken.contains("hub"))
                    .map(Role::Hub)
            }
            None => None,
        };
        self.unique_listeners(&admin, role.as_ref());
        self.unbound_zones(&zones, role.as_ref());

        let positive = Self::positive;
        let max_http = positive(
            self,
            raw.node
                .as_ref()
                .and_then(|n| n.max_http_connections.as_ref()),
            "node.max_http_connections",
            1024,
        );
        let max_http_source = positive(
            self,
            raw.node
                .as_ref()
                .and_then(|n| n.max_http_connections_per_source.as_ref()),
            "node.max_http_connections_per_source",
            64,
        );
        Some(Config {
            node: Node {
                max_http_connections: max_http?,
                max_http_connections_per_source: max_http_source?,
                id: id?,
                state_dir: state_dir?,
                user: raw
                    .node
                    .as_ref()
                    .and_then(|n| n.user.as_ref())
                    .map(|u| u.get_ref().clone()),
            },
            zones,
            role: role?,
            audit,
            admin,
            detect: detect.unwrap_or_else(|| Some(Detect::default()))?,
            alarms: alarms.unwrap_or_else(|| Some(AlarmForwarding::default()))?,
            scan: scan?,
        })
    }

    fn device_id(&mut self, s: &S, key: &str) -> Option<String> {
        match units::check_name("device", s.get_ref()) {
            Ok(()) => Some(s.get_ref().clone()),
            Err(e) => {
                self.value_error(&s.span(), key, e);
                None
            }
        }
    }

    fn name(
        &mut self,
        s: &S,
        what: &str,
        seen: &mut HashMap<String, Range<usize>>,
    ) -> Option<String> {
        let key = format!("{what}.name");
        if let Err(e) = units::check_name(what, s.get_ref()) {
            self.value_error(&s.span(), &key, e);
            return None;
        }
        if let Some(first) = seen.get(s.get_ref()) {
            let first = self.at(first);
            self.error(
                &s.span(),
                format!(
                    "{key}: {what} {:?} is declared twice (first at line {})",
                    s.get_ref(),
                    first.line
                ),
                format!("give each {what} a unique name"),
            );
            return None;
        }
        seen.insert(s.get_ref().clone(), s.span());
        Some(s.get_ref().clone())
    }

    fn socket(&mut self, s: &S, key: &str) -> Option<SocketAddr> {
        match s.get_ref().parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 => Some(a),
            Ok(_) => {
                self.error(
                    &s.span(),
                    format!("{key}: port 0 is not allowed"),
                    "give a fixed port from 1 to 65535",
                );
                None
            }
            Err(_) => {
                self.error(
                    &s.span(),
                    format!("{key}: {:?} is not an IP address and port", s.get_ref()),
                    "write ADDRESS:PORT with an IP address, for example \"10.20.0.1:8480\" or \"[fd00::1]:8480\"",
                );
                None
            }
        }
    }

    fn parsed<T: FromStr<Err = ValueError>>(&mut self, s: &S, key: &str) -> Option<T> {
        match s.get_ref().parse::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                self.value_error(&s.span(), key, e);
                None
            }
        }
    }

    fn file(&mut self, s: &S, key: &'static str) -> Option<FilePath> {
        let path = PathBuf::from(s.get_ref());
        if !path.is_absolute() {
            self.error(
                &s.span(),
                format!("{key}: {:?} is not an absolute path", s.get_ref()),
                "write an absolute path, for example \"/etc/gatewayd/ca.pem\"",
            );
            return None;
        }
        Some(FilePath {
            path,
            key,
            loc: self.at(&s.span()),
        })
    }

    /// A rate key (`"10MB/s"`, `"100Mbit"`), or `default` bytes per second.
    fn rate_or(&mut self, s: Option<&S>, key: &str, default: u64) -> Option<u64> {
        let Some(s) = s else {
            return Some(default);
        };
        match units::parse_bandwidth(s.get_ref()) {
            Ok(b) => Some(b),
            Err(e) => {
                self.value_error(&s.span(), key, e);
                None
            }
        }
    }

    /// `hub.firmware_keys`: one or two absolute paths (the current key and
    /// the next).
    fn firmware_keys(&mut self, keys: Option<&Spanned<Vec<S>>>) -> Option<Vec<FilePath>> {
        let Some(keys) = keys else {
            return Some(Vec::new());
        };
        if keys.get_ref().is_empty() || keys.get_ref().len() > 2 {
            self.error(
                &keys.span(),
                format!(
                    "hub.firmware_keys: {} keys; give one or two",
                    keys.get_ref().len()
                ),
                "the current signing key, and the next one while the key rotates (docs/operate.md, \"Firmware updates\")",
            );
            return None;
        }
        let files: Vec<Option<FilePath>> = keys
            .get_ref()
            .iter()
            .map(|k| self.file(k, "hub.firmware_keys"))
            .collect();
        files.into_iter().collect()
    }

    /// A `protocol` key: `"tcp"` (the default) or `"udp"`.
    fn protocol(&mut self, s: Option<&S>, key: &str) -> Option<Protocol> {
        match s {
            None => Some(Protocol::Tcp),
            Some(p) => self.choice(p, key, &[("tcp", Protocol::Tcp), ("udp", Protocol::Udp)]),
        }
    }

    fn choice<T: Copy>(&mut self, s: &S, key: &str, options: &[(&str, T)]) -> Option<T> {
        if let Some((_, v)) = options
            .iter()
            .find(|(name, _)| *name == s.get_ref().as_str())
        {
            return Some(*v);
        }
        let names: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
        self.error(
            &s.span(),
            format!("{key}: unknown value {:?}", s.get_ref()),
            format!("write one of {}", names.join(", ")),
        );
        None
    }

    fn zones(&mut self, raw: Vec<RawZone>) -> Vec<Zone> {
        let mut seen = HashMap::new();
        let mut zones: Vec<(Zone, Range<usize>)> = Vec::new();
        for z in raw {
            let name = self.name(&z.name, "zone", &mut seen);
            let kinds = [
                ("legacy", ZoneKind::Legacy),
                ("intranet", ZoneKind::Intranet),
                ("extranet", ZoneKind::Extranet),
                ("internet", ZoneKind::Internet),
            ];
            let kind = self.choice(&z.kind, "zone.kind", &kinds);
            let level = Level::new(*z.level.get_ref());
            if level.is_none() {
                self.error(
                    &z.level.span(),
                    format!(
                        "zone.level: {} is not a protection level",
                        z.level.get_ref()
                    ),
                    "GB/T 22239-2019 defines levels 1 to 4; write level = 1, 2, 3 or 4",
                );
            }
            let classified = match (
                kind,
                z.classified.as_ref().map(|c| (*c.get_ref(), c.span())),
            ) {
                (Some(ZoneKind::Legacy), Some((c, _))) => Some(c),
                (Some(ZoneKind::Legacy), None) => {
                    self.error(
                        &z.name.span(),
                        "zone.classified: a legacy zone must say whether it is classified",
                        "add classified = true (涉密) or classified = false (非涉密), as the department's classification decided",
                    );
                    None
                }
                (Some(ZoneKind::Intranet), None | Some((true, _))) => Some(true),
                (Some(ZoneKind::Intranet), Some((false, span))) => {
                    self.error(
                        &span,
                        "zone.classified: the intranet is always classified",
                        "remove `classified`, or write classified = true",
                    );
                    None
                }
                (Some(k), None | Some((false, _))) => Some(k == ZoneKind::Intranet),
                (Some(k), Some((true, span))) => {
                    self.error(
                        &span,
                        format!("zone.classified: the {} never carries classified information", k.as_str()),
                        "classified networks connect only to the intranet; remove `classified` or change the kind",
                    );
                    None
                }
                (None, _) => None,
            };
            let mut networks = Vec::new();
            if z.networks.get_ref().is_empty() {
                self.error(
                    &z.networks.span(),
                    "zone.networks is empty",
                    "list the zone's address ranges, for example [\"10.20.0.0/16\"]",
                );
            }
            let mut net_ok = true;
            for n in z.networks.get_ref() {
                match self.parsed::<Cidr>(n, "zone.networks") {
                    Some(c) => networks.push(c),
                    None => net_ok = false,
                }
            }
            let mut interfaces = Vec::new();
            for i in z.interfaces.iter().flat_map(|l| l.get_ref()) {
                let name = i.get_ref();
                // Linux: at most 15 bytes, no '/', ':' or white space (and
                // quotes would break the ruleset).
                let ok = !name.is_empty()
                    && name.len() <= 15
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
                if !ok {
                    self.error(
                        &i.span(),
                        format!("zone.interfaces: {name:?} is not a network interface name"),
                        "write the interface as `ip link` shows it, like \"eth1\" or \"enp3s0\" (1 to 15 letters, digits, '-', '_', '.')",
                    );
                } else if interfaces.contains(name) {
                    self.error(
                        &i.span(),
                        format!("zone.interfaces: {name:?} is listed twice"),
                        "list each interface once",
                    );
                } else {
                    interfaces.push(name.clone());
                }
            }
            let assessment_span = z.assessment.as_ref().map(Spanned::span);
            let assessment = z.assessment.map(|a| {
                let a = a.into_inner();
                let date = self.date(&a.valid_until, "zone.assessment.valid_until");
                (a.id, date, a.valid_until.span())
            });
            let assessment = match assessment {
                Some((id, Some(valid_until), span)) => Some(Some(Assessment {
                    id: id.into_inner(),
                    valid_until,
                    loc: self.at(&span),
                })),
                Some((_, None, _)) => None,
                None => Some(None),
            };
            if let (Some(k), Some(Some(_)), Some(span)) = (kind, &assessment, &assessment_span) {
                if k != ZoneKind::Legacy {
                    self.warning(
                        span,
                        format!("zone.assessment: only legacy zones are bridged on an assessment; this {} zone's is ignored", k.as_str()),
                        "remove the assessment from this zone",
                    );
                }
            }
            let (Some(name), Some(kind), Some(level), Some(classified), Some(assessment), true) =
                (name, kind, level, classified, assessment, net_ok)
            else {
                continue;
            };
            let loc = self.at(&z.name.span());
            zones.push((
                Zone {
                    name,
                    kind,
                    classified,
                    level,
                    networks,
                    interfaces,
                    assessment,
                    loc,
                },
                z.networks.span(),
            ));
        }
        // An address belongs to one zone at most.
        for (i, (a, _)) in zones.iter().enumerate() {
            for (b, span) in &zones[i + 1..] {
                for na in &a.networks {
                    if let Some(nb) = b.networks.iter().find(|nb| na.overlaps(nb)) {
                        let msg = format!(
                            "zone.networks: {nb} of zone {:?} overlaps {na} of zone {:?}",
                            b.name, a.name
                        );
                        let d = Diagnostic::error(self.at(span), msg).hint(
                            "an address must belong to one zone only; split or correct the ranges",
                        );
                        self.diags.push(d);
                    }
                }
            }
        }
        zones.into_iter().map(|(z, _)| z).collect()
    }

    fn date(&mut self, v: &Spanned<toml::value::Datetime>, key: &str) -> Option<Date> {
        let dt = v.get_ref();
        let hint = "write a bare TOML date, for example valid_until = 2027-03-31";
        match (dt.date, dt.time) {
            (Some(d), None) => {
                let date = Date::new(i32::from(d.year), d.month, d.day);
                if date.is_none() {
                    self.error(
                        &v.span(),
                        format!("{key}: {dt} is not a calendar date"),
                        hint,
                    );
                }
                date
            }
            _ => {
                self.error(&v.span(), format!("{key}: {dt} is not a plain date"), hint);
                None
            }
        }
    }

    fn audit(&mut self, raw: Option<(RawAudit, Range<usize>)>) -> Audit {
        let Some((a, span)) = raw else {
            return Audit {
                retention_days: MIN_RETENTION_DAYS,
                loc: Location { line: 1, column: 1 },
            };
        };
        match a.retention_days {
            None => Audit {
                retention_days: MIN_RETENTION_DAYS,
                loc: self.at(&span),
            },
            Some(d) => {
                let loc = self.at(&d.span());
                let days = u32::try_from(*d.get_ref()).ok().filter(|d| *d > 0);
                if days.is_none() {
                    self.error(
                        &d.span(),
                        format!(
                            "audit.retention_days: {} is not a number of days",
                            d.get_ref()
                        ),
                        "write a whole number of days, at least 180",
                    );
                }
                // A bad value is reported above; the checker then sees the minimum.
                Audit {
                    retention_days: days.unwrap_or(MIN_RETENTION_DAYS),
                    loc,
                }
            }
        }
    }

    /// An optional positive whole number (`default` when absent).
    fn positive(&mut self, v: Option<&Spanned<i64>>, key: &str, default: u32) -> Option<u32> {
        let Some(m) = v else {
            return Some(default);
        };
        let n = u32::try_from(*m.get_ref()).ok().filter(|n| *n > 0);
        if n.is_none() {
            self.error(
                &m.span(),
                format!("{key}: {} is not a positive number", m.get_ref()),
                format!(
                    "write a whole number above zero, or remove the key for the default ({default})"
                ),
            );
        }
        n
    }

    /// `[scan]`: clamd's socket (an absolute path, or HOST:PORT) and limits.
    fn scan(&mut self, s: RawScan) -> Option<ScanSettings> {
        let text = s.clamd.get_ref();
        let clamd = if text.starts_with('/') {
            Some(ClamdAddress::Unix(PathBuf::from(text)))
        } else if text.contains(':') {
            self.parsed::<HostPort>(&s.clamd, "scan.clamd")
                .map(ClamdAddress::Tcp)
        } else {
            self.error(
                &s.clamd.span(),
                format!("scan.clamd: {text:?} is neither a socket path nor HOST:PORT"),
                "write clamd's LocalSocket (\"/run/clamav/clamd.ctl\") or its TCPAddr and TCPSocket (\"127.0.0.1:3310\")",
            );
            None
        };
        let timeout = self.duration_or(s.timeout.as_ref(), "scan.timeout", 30);
        let max_db_age = self.duration_or(s.max_db_age.as_ref(), "scan.max_db_age", 7 * 86_400);
        let database_dir = match &s.database_dir {
            None => Some(None),
            Some(d) if d.get_ref().starts_with('/') => Some(Some(PathBuf::from(d.get_ref()))),
            Some(d) => {
                self.error(
                    &d.span(),
                    format!(
                        "scan.database_dir: {:?} is not an absolute path",
                        d.get_ref()
                    ),
                    "write clamd's DatabaseDirectory, for example \"/var/lib/clamav\"",
                );
                None
            }
        };
        Some(ScanSettings {
            clamd: clamd?,
            timeout: timeout?,
            max_db_age: max_db_age?,
            database_dir: database_dir?,
        })
    }

    /// `[alarms]`: each target with its CA; a key without its target, or a
    /// target without its CA, is an error.
    fn alarms(&mut self, a: RawAlarms) -> Option<AlarmForwarding> {
        let mut ok = true;
        let min_severity = match &a.min_severity {
            None => crate::detect::Severity::Low,
            Some(s) => match crate::detect::Severity::parse(s.get_ref()) {
                Some(v) => v,
                None => {
                    self.error(
                        &s.span(),
                        format!("alarms.min_severity: unknown severity {:?}", s.get_ref()),
                        "write one of \"low\", \"medium\", \"high\", \"critical\"",
                    );
                    ok = false;
                    crate::detect::Severity::Low
                }
            },
        };
        let needs = |c: &mut Self, v: &Option<S>, key: &str, target: &str| {
            if let Some(s) = v {
                c.error(
                    &s.span(),
                    format!("alarms.{key} is set but alarms.{target} is not"),
                    format!("add alarms.{target}, or remove alarms.{key}"),
                );
                false
            } else {
                true
            }
        };
        let syslog = match &a.syslog {
            None => {
                ok &= needs(self, &a.syslog_ca, "syslog_ca", "syslog")
                    & needs(self, &a.syslog_cert, "syslog_cert", "syslog")
                    & needs(self, &a.syslog_key, "syslog_key", "syslog");
                None
            }
            Some(addr) => {
                let address = self.parsed::<HostPort>(addr, "alarms.syslog");
                let ca = match &a.syslog_ca {
                    Some(p) => self.file(p, "alarms.syslog_ca"),
                    None => {
                        self.error(
                            &addr.span(),
                            "alarms.syslog: the collector's CA is missing",
                            "add alarms.syslog_ca, the CA file that signed the collector's certificate (alarms go over TLS only)",
                        );
                        None
                    }
                };
                let client = match (&a.syslog_cert, &a.syslog_key) {
                    (None, None) => Some(None),
                    (Some(c), Some(k)) => {
                        let c = self.file(c, "alarms.syslog_cert");
                        let k = self.file(k, "alarms.syslog_key");
                        c.zip(k).map(Some)
                    }
                    (Some(s), None) | (None, Some(s)) => {
                        self.error(
                            &s.span(),
                            "alarms.syslog_cert and alarms.syslog_key go together",
                            "give both (a client certificate for the collector) or neither",
                        );
                        None
                    }
                };
                match (address, ca, client) {
                    (Some(address), Some(ca), Some(client)) => Some(SyslogTarget {
                        address,
                        ca,
                        client,
                    }),
                    _ => {
                        ok = false;
                        None
                    }
                }
            }
        };
        let webhook = match &a.webhook {
            None => {
                ok &= needs(self, &a.webhook_ca, "webhook_ca", "webhook")
                    & needs(self, &a.webhook_token_file, "webhook_token_file", "webhook");
                None
            }
            Some(url) => {
                let target = match parse_https_url(url.get_ref()) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        self.value_error(&url.span(), "alarms.webhook", e);
                        None
                    }
                };
                let ca = match &a.webhook_ca {
                    Some(p) => self.file(p, "alarms.webhook_ca"),
                    None => {
                        self.error(
                            &url.span(),
                            "alarms.webhook: the server's CA is missing",
                            "add alarms.webhook_ca, the CA file that signed the webhook server's certificate",
                        );
                        None
                    }
                };
                let token = match &a.webhook_token_file {
                    None => Some(None),
                    Some(p) => self.file(p, "alarms.webhook_token_file").map(Some),
                };
                match (target, ca, token) {
                    (Some((address, path)), Some(ca), Some(token_file)) => Some(WebhookTarget {
                        address,
                        path,
                        ca,
                        token_file,
                    }),
                    _ => {
                        ok = false;
                        None
                    }
                }
            }
        };
        let down_after = self.duration_or(a.down_after.as_ref(), "alarms.down_after", 60);
        ok &= down_after.is_some();
        ok.then_some(AlarmForwarding {
            min_severity,
            down_after: down_after.unwrap_or_default(),
            syslog,
            webhook,
        })
    }

    /// `[detect]`: every key optional, each default documented in docs/config.md.
    fn detect(&mut self, (d, span): (RawDetect, Range<usize>)) -> Option<Detect> {
        let loc = self.at(&span);
        use crate::detect::bucket::Shape;
        let t0 = crate::detect::Thresholds::default();
        let e0 = crate::detect::bans::Escalation::default();
        let shape = |c: &mut Self, v: &Option<S>, key: &str, default: Shape| match v {
            None => Some(default),
            Some(s) => match parse_shape(s.get_ref()) {
                Ok(shape) => Some(shape),
                Err(e) => {
                    c.value_error(&s.span(), key, e);
                    None
                }
            },
        };
        let count = |c: &mut Self, v: &Option<Spanned<i64>>, key: &str, default: u32| {
            c.positive(v.as_ref(), key, default)
        };
        let ms = |c: &mut Self, v: &Option<S>, key: &str, default_ms: i64| {
            let d = c.duration_or(
                v.as_ref(),
                key,
                u64::try_from(default_ms / 1000).unwrap_or(1),
            )?;
            Some(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        };
        let refusals = shape(self, &d.refusals, "detect.refusals", t0.refusals);
        let scan = shape(self, &d.scan, "detect.scan", t0.scan);
        let handshakes = shape(
            self,
            &d.handshake_failures,
            "detect.handshake_failures",
            t0.handshakes,
        );
        let protocol = shape(
            self,
            &d.protocol_violations,
            "detect.protocol_violations",
            t0.protocol,
        );
        let empty = shape(
            self,
            &d.empty_connections,
            "detect.empty_connections",
            t0.empty,
        );
        let content = shape(
            self,
            &d.content_refusals,
            "detect.content_refusals",
            t0.content,
        );
        let connections = count(
            self,
            &d.connections_per_second,
            "detect.connections_per_second",
            t0.connections.capacity,
        );
        let datagrams = count(
            self,
            &d.datagrams_per_second,
            "detect.datagrams_per_second",
            t0.datagrams.capacity,
        );
        let in_progress = count(
            self,
            &d.handshakes_in_progress,
            "detect.handshakes_in_progress",
            t0.handshakes_in_progress,
        );
        let ban_ms = ms(self, &d.ban, "detect.ban", t0.ban_ms);
        let scan_ban_ms = ms(self, &d.scan_ban, "detect.scan_ban", t0.scan_ban_ms);
        let repeat_ms = ms(self, &d.repeat_ban, "detect.repeat_ban", e0.repeat_ms);
        let mut never_ban = Vec::new();
        for n in d.never_ban.iter().flat_map(|v| v.get_ref()) {
            let text = n.get_ref();
            if let Ok(ip) = text.parse::<IpAddr>() {
                let prefix = if ip.is_ipv4() { 32 } else { 128 };
                let c = format!("{ip}/{prefix}").parse::<Cidr>();
                never_ban.extend(c.ok().map(NeverBan::Network));
            } else if text.contains('/') {
                never_ban.extend(
                    self.parsed::<Cidr>(n, "detect.never_ban")
                        .map(NeverBan::Network),
                );
            } else {
                match units::check_name("device", text) {
                    Ok(()) => never_ban.push(NeverBan::Device(text.clone())),
                    Err(_) => self.error(
                        &n.span(),
                        format!("detect.never_ban: {text:?} is neither an address, a network nor a device id"),
                        "write an address (\"10.0.0.1\"), a network (\"10.0.0.0/24\") or a device id (\"hub-1\")",
                    ),
                }
            }
        }
        Some(Detect {
            enabled: d.enabled.is_none_or(|e| *e.get_ref()),
            thresholds: crate::detect::Thresholds {
                refusals: refusals?,
                scan: scan?,
                handshakes: handshakes?,
                protocol: protocol?,
                empty: empty?,
                connections: Shape::per(connections?, 1_000),
                datagrams: Shape::per(datagrams?, 1_000),
                handshakes_in_progress: in_progress?,
                content: content?,
                ban_ms: ban_ms?,
                scan_ban_ms: scan_ban_ms?,
            },
            escalation: crate::detect::bans::Escalation {
                repeat_ms: repeat_ms?,
                ..e0
            },
            never_ban,
            loc,
        })
    }

    fn update(&mut self, raw: RawUpdate) -> Option<Update> {
        let mut out = Update::default();
        let mut ok = true;
        if let Some(w) = &raw.window {
            if w.get_ref() == "any" {
                out.window = None;
            } else {
                match crate::firmware::report::Window::parse(w.get_ref()) {
                    Ok(win) => out.window = Some(win),
                    Err(e) => {
                        self.error(
                            &w.span(),
                            format!("update.window: {e}"),
                            "write \"02:00-05:00\" (local time; it may span midnight), or \"any\" to reboot as soon as a version is staged",
                        );
                        ok = false;
                    }
                }
            }
        }
        match self.duration_or(raw.trial.as_ref(), "update.trial", 15 * 60) {
            Some(t) => out.trial = t,
            None => ok = false,
        }
        for (raw, key, into, hint) in [
            (
                &raw.updater_state,
                "update.updater_state",
                &mut out.updater_state,
                "write the updater's --state-dir, /var/lib/gw-state/updater on the appliance image",
            ),
            (
                &raw.handoff,
                "update.handoff",
                &mut out.handoff,
                "write the updater's --handoff, /var/lib/gw-state/handoff on the appliance image",
            ),
        ] {
            let Some(p) = raw else { continue };
            let path = PathBuf::from(p.get_ref());
            if path.is_absolute() {
                *into = path;
            } else {
                self.error(
                    &p.span(),
                    format!("{key}: {:?} is not an absolute path", p.get_ref()),
                    hint,
                );
                ok = false;
            }
        }
        ok.then_some(out)
    }

    fn admin(&mut self, raw: Option<RawAdmin>) -> Admin {
        let default = SocketAddr::from(([127, 0, 0, 1], DEFAULT_ADMIN_PORT.get()));
        let listen = raw
            .and_then(|a| a.listen)
            .map_or(Some(default), |l| self.socket(&l, "admin.listen"));
        Admin {
            listen: listen.unwrap_or(default),
        }
    }

    fn zone_ref<'z>(
        &mut self,
        zones: &'z [Zone],
        s: &S,
        key: &str,
        must_be_legacy: bool,
    ) -> Option<&'z Zone> {
        let Some(z) = zones.iter().find(|z| z.name == *s.get_ref()) else {
            if self.declared_zones.contains(s.get_ref()) {
                // Declared and refused: its errors are reported where it is.
                return None;
            }
            let names: Vec<&str> = zones.iter().map(|z| z.name.as_str()).collect();
            let hint = match closest(s.get_ref(), names.iter().copied()) {
                Some(n) => format!("did you mean {n:?}? Declared zones: {}", names.join(", ")),
                None if names.is_empty() => "declare the zone with [[zone]]".to_owned(),
                None => format!("declared zones: {}", names.join(", ")),
            };
            self.error(
                &s.span(),
                format!("{key}: no zone named {:?}", s.get_ref()),
                hint,
            );
            return None;
        };
        if must_be_legacy && z.kind != ZoneKind::Legacy {
            self.error(
                &s.span(),
                format!("{key}: zone {:?} is of kind {}, not a legacy zone", z.name, z.kind.as_str()),
                "services, accesses, channels and ingest listeners live in the department's legacy zone",
            );
            return None;
        }
        Some(z)
    }

    fn inside(&mut self, zone: Option<&Zone>, addr: Option<SocketAddr>, s: &S, key: &str) {
        if let (Some(z), Some(a)) = (zone, addr) {
            let (message, hint) = if a.ip().is_unspecified() {
                (
                    format!("{key}: {a} listens on every interface"),
                    format!(
                        "bind to an address of zone {:?} ({}) so nothing listens on the other side of the boundary",
                        z.name,
                        nets(z)
                    ),
                )
            } else if !z.contains(a.ip()) {
                (
                    format!("{key}: {} is not in zone {:?}", a.ip(), z.name),
                    format!("use an address inside the zone's networks ({})", nets(z)),
                )
            } else {
                return;
            };
            let d = Diagnostic::error(self.at(&s.span()), message)
                .hint(hint)
                .rule(crate::rule::RuleId::Address);
            self.diags.push(d);
        }
    }

    fn remote(&mut self, s: &S, key: &str, what: &str) -> Option<(String, String)> {
        let hint = format!(
            "write DEVICE/{}, for example \"jl-gat-0007/{}\"",
            what.to_uppercase(),
            if what == "service" {
                "population-db"
            } else {
                "monthly-report"
            }
        );
        let Some((device, name)) = s.get_ref().split_once('/') else {
            self.error(
                &s.span(),
                format!(
                    "{key}: {:?} does not name a device and a {what}",
                    s.get_ref()
                ),
                hint,
            );
            return None;
        };
        if units::check_name("device", device).is_err() || units::check_name(what, name).is_err() {
            self.error(
                &s.span(),
                format!(
                    "{key}: {:?} is not a valid DEVICE/{}",
                    s.get_ref(),
                    what.to_uppercase()
                ),
                hint,
            );
            return None;
        }
        Some((device.to_owned(), name.to_owned()))
    }

    #[allow(clippy::too_many_arguments)]
    fn edge(
        &mut self,
        zones: &[Zone],
        uplink: Option<(RawUplink, Range<usize>)>,
        raw_services: Vec<(RawService, Range<usize>)>,
        raw_accesses: Vec<(RawAccess, Range<usize>)>,
        raw_channels: Vec<(RawChannel, Range<usize>)>,
        raw_ingests: Vec<(RawIngest, Range<usize>)>,
        uplink_broken: bool,
    ) -> Option<Edge> {
        let uplink = match uplink {
            None => {
                if !uplink_broken {
                    self.error(
                        &(0..0),
                        "an edge needs an [uplink] section",
                        "add [uplink] with hubs, ca, cert and key",
                    );
                }
                None
            }
            Some((u, _)) => {
                let mut hubs = Vec::new();
                if u.hubs.get_ref().is_empty() {
                    self.error(
                        &u.hubs.span(),
                        "uplink.hubs is empty",
                        "list at least one hub, for example [\"hub1.example.gov:7443\"]",
                    );
                }
                for h in u.hubs.get_ref() {
                    if let Some(hp) = self.parsed::<HostPort>(h, "uplink.hubs") {
                        if hubs.contains(&hp) {
                            self.error(
                                &h.span(),
                                format!("uplink.hubs: {hp} is listed twice"),
                                "list each hub once",
                            );
                        } else {
                            hubs.push(hp);
                        }
                    }
                }
                let ca = self.file(&u.ca, "uplink.ca");
                let cert = self.file(&u.cert, "uplink.cert");
                let key = self.file(&u.key, "uplink.key");
                let heartbeat = self.duration_or(u.heartbeat.as_ref(), "uplink.heartbeat", 10);
                let config_try = self.duration_or(u.config_try.as_ref(), "uplink.config_try", 60);
                match (ca, cert, key, heartbeat, config_try) {
                    (Some(ca), Some(cert), Some(key), Some(heartbeat), Some(config_try)) => {
                        Some(Uplink {
                            hubs,
                            ca,
                            cert,
                            key,
                            heartbeat,
                            config_try,
                        })
                    }
                    _ => None,
                }
            }
        };

        let mut seen = HashMap::new();
        let mut services = Vec::new();
        for (s, _) in raw_services {
            let name = self.name(&s.name, "service", &mut seen);
            let zone = self.zone_ref(zones, &s.zone, "service.zone", true);
            let protocol = self.protocol(s.protocol.as_ref(), "service.protocol");
            let target = self.socket(&s.target, "service.target");
            if let (Some(z), Some(t)) = (zone, target) {
                if !z.contains(t.ip()) {
                    let d = Diagnostic::error(
                        self.at(&s.target.span()),
                        format!("service.target: {} is not in zone {:?}", t.ip(), z.name),
                    )
                    .hint(format!(
                        "a published service lives inside its legacy zone ({})",
                        nets(z)
                    ))
                    .rule(crate::rule::RuleId::Address);
                    self.diags.push(d);
                }
            }
            let app_protocol = match &s.app_protocol {
                None => Some(None),
                Some(a) => self
                    .choice(
                        a,
                        "service.app_protocol",
                        &[
                            ("http", AppProtocol::Http),
                            ("tls", AppProtocol::Tls),
                            ("rtp", AppProtocol::Rtp),
                            ("mpegts", AppProtocol::Mpegts),
                            ("postgres", AppProtocol::Postgres),
                        ],
                    )
                    .map(Some),
            };
            let mut app_protocol = app_protocol;
            match (app_protocol, protocol, &s.app_protocol) {
                (
                    Some(Some(AppProtocol::Http | AppProtocol::Tls | AppProtocol::Postgres)),
                    Some(Protocol::Udp),
                    Some(a),
                ) => {
                    self.error(
                        &a.span(),
                        "service.app_protocol: http, tls and postgres run over TCP, but this service is udp",
                        "set protocol = \"tcp\", or remove app_protocol",
                    );
                    app_protocol = None;
                }
                (
                    Some(Some(p @ (AppProtocol::Rtp | AppProtocol::Mpegts))),
                    Some(Protocol::Tcp),
                    Some(a),
                ) => {
                    self.error(
                        &a.span(),
                        format!(
                            "service.app_protocol: {} runs over UDP, but this service is tcp",
                            p.as_str()
                        ),
                        "set protocol = \"udp\"",
                    );
                    app_protocol = None;
                }
                _ => {}
            }
            let declared = app_protocol.flatten();
            let numbers = |c: &mut Self,
                           v: &Option<Spanned<Vec<Spanned<i64>>>>,
                           key: &str,
                           max: i64,
                           needs: AppProtocol|
             -> Option<Vec<i64>> {
                let Some(list) = v else {
                    return Some(Vec::new());
                };
                if declared != Some(needs) {
                    c.error(
                        &list.span(),
                        format!(
                            "service.{key} applies to app_protocol = \"{}\" only",
                            needs.as_str()
                        ),
                        format!("remove {key}, or set app_protocol = \"{}\"", needs.as_str()),
                    );
                    return None;
                }
                let mut out = Vec::new();
                for n in list.get_ref() {
                    if (0..=max).contains(n.get_ref()) {
                        out.push(*n.get_ref());
                    } else {
                        c.error(
                            &n.span(),
                            format!("service.{key}: {} is not from 0 to {max}", n.get_ref()),
                            format!("write numbers from 0 to {max}"),
                        );
                        return None;
                    }
                }
                Some(out)
            };
            let rtp_payload_types = numbers(
                self,
                &s.rtp_payload_types,
                "rtp_payload_types",
                127,
                AppProtocol::Rtp,
            )
            .map(|v| {
                v.into_iter()
                    .filter_map(|n| u8::try_from(n).ok())
                    .collect::<Vec<u8>>()
            });
            let mpegts_pids = numbers(
                self,
                &s.mpegts_pids,
                "mpegts_pids",
                8191,
                AppProtocol::Mpegts,
            )
            .map(|v| {
                v.into_iter()
                    .filter_map(|n| u16::try_from(n).ok())
                    .collect::<Vec<u16>>()
            });
            if let Some(m) = &s.max_violations
                && !declared.is_some_and(AppProtocol::is_datagram)
            {
                self.error(
                    &m.span(),
                    "service.max_violations applies to app_protocol = \"rtp\" or \"mpegts\" only",
                    "remove max_violations, or set app_protocol",
                );
            }
            let max_violations =
                self.positive(s.max_violations.as_ref(), "service.max_violations", 100);
            if let (Some(u), Some(a)) = (&s.allow_upgrade, app_protocol) {
                if *u.get_ref() && a != Some(AppProtocol::Http) {
                    self.error(
                        &u.span(),
                        "service.allow_upgrade applies to app_protocol = \"http\" only",
                        "remove allow_upgrade, or set app_protocol = \"http\"",
                    );
                }
            }
            let mut sni = Vec::new();
            if let (Some(list), Some(a)) = (&s.sni, app_protocol) {
                if a != Some(AppProtocol::Tls) {
                    self.error(
                        &list.span(),
                        "service.sni applies to app_protocol = \"tls\" only",
                        "remove sni, or set app_protocol = \"tls\"",
                    );
                }
                for n in list.get_ref() {
                    let name = n.get_ref().to_ascii_lowercase();
                    let ok = !name.is_empty()
                        && name.len() <= 253
                        && name.split('.').all(|l| {
                            !l.is_empty()
                                && l.len() <= 63
                                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                        });
                    if ok {
                        sni.push(name);
                    } else {
                        self.error(
                            &n.span(),
                            format!("service.sni: {:?} is not a DNS name", n.get_ref()),
                            "write host names like \"pension.jl.gov.cn\"",
                        );
                    }
                }
            }
            let http_allow = self.http_allow(s.http_allow.as_ref(), app_protocol);
            let pg = self.postgres(&s, declared);
            let mut allow = Vec::new();
            if s.allow.get_ref().is_empty() {
                self.warning(
                    &s.allow.span(),
                    "service.allow is empty: nobody can reach this service",
                    "list the zones or device ids that may reach it",
                );
            }
            for a in s.allow.get_ref() {
                let entry = a.get_ref();
                if let Some(z) = zones.iter().find(|z| z.name == *entry) {
                    allow.push(Peer::Zone(z.name.clone()));
                } else if units::check_name("device", entry).is_ok() {
                    if let Some(near) = closest(entry, zones.iter().map(|z| z.name.as_str())) {
                        self.warning(
                            &a.span(),
                            format!("service.allow: {entry:?} is not a zone, so it is taken as a device id"),
                            format!("did you mean zone {near:?}?"),
                        );
                    }
                    allow.push(Peer::Device(entry.clone()));
                } else {
                    self.error(
                        &a.span(),
                        format!("service.allow: {entry:?} is neither a zone nor a device id"),
                        "list zone names or device ids",
                    );
                }
            }
            let max_connections = match &s.max_connections {
                None => Some(None),
                Some(m) => {
                    let v = u32::try_from(*m.get_ref())
                        .ok()
                        .and_then(std::num::NonZeroU32::new);
                    if v.is_none() {
                        self.error(
                            &m.span(),
                            format!(
                                "service.max_connections: {} is not a positive number",
                                m.get_ref()
                            ),
                            "write a whole number above zero, or remove the key for no limit",
                        );
                    }
                    v.map(Some)
                }
            };
            let bandwidth = match &s.bandwidth {
                None => Some(None),
                Some(b) => match units::parse_bandwidth(b.get_ref()) {
                    Ok(v) => Some(Some(v)),
                    Err(e) => {
                        self.value_error(&b.span(), "service.bandwidth", e);
                        None
                    }
                },
            };
            let idle_timeout = match &s.idle_timeout {
                // UDP flows: a minute; TCP relays: an hour.
                None => Some(std::time::Duration::from_secs(
                    if protocol == Some(Protocol::Tcp) {
                        3600
                    } else {
                        60
                    },
                )),
                Some(t) => match units::parse_duration(t.get_ref()) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        self.value_error(&t.span(), "service.idle_timeout", e);
                        None
                    }
                },
            };
            if let (
                Some(name),
                Some(z),
                Some(protocol),
                Some(target),
                Some(app_protocol),
                Some(max_connections),
                Some(bandwidth),
                Some(idle_timeout),
                Some((rtp_payload_types, mpegts_pids, max_violations)),
                Some(postgres),
            ) = (
                name,
                zone,
                protocol,
                target,
                app_protocol,
                max_connections,
                bandwidth,
                idle_timeout,
                rtp_payload_types
                    .zip(mpegts_pids)
                    .zip(max_violations)
                    .map(|((a, b), c)| (a, b, c)),
                pg,
            ) {
                let loc = self.at(&s.name.span());
                services.push(Service {
                    name,
                    zone: z.name.clone(),
                    protocol,
                    target,
                    app_protocol,
                    allow,
                    max_connections,
                    bandwidth,
                    idle_timeout,
                    allow_upgrade: s.allow_upgrade.as_ref().is_some_and(|u| *u.get_ref()),
                    sni,
                    http_allow,
                    rtp_payload_types,
                    mpegts_pids,
                    max_violations,
                    postgres,
                    loc,
                });
            }
        }

        let mut accesses = Vec::new();
        for (a, _) in raw_accesses {
            let zone = self.zone_ref(zones, &a.zone, "access.zone", true);
            let listen = self.socket(&a.listen, "access.listen");
            self.inside(zone, listen, &a.listen, "access.listen");
            let remote = self.remote(&a.service, "access.service", "service");
            let protocol = self.protocol(a.protocol.as_ref(), "access.protocol");
            if let (Some(z), Some(listen), Some((device, service)), Some(protocol)) =
                (zone, listen, remote, protocol)
            {
                let loc = self.at(&a.listen.span());
                accesses.push(Access {
                    listen,
                    zone: z.name.clone(),
                    device,
                    service,
                    protocol,
                    loc,
                });
            }
        }

        let mut seen = HashMap::new();
        let mut channels = Vec::new();
        for (c, _) in raw_channels {
            if let Some(ch) = self.channel(zones, c, &mut seen) {
                channels.push(ch);
            }
        }

        let mut ingests = Vec::new();
        for (i, _) in raw_ingests {
            let zone = self.zone_ref(zones, &i.zone, "ingest.zone", true);
            let listen = self.socket(&i.listen, "ingest.listen");
            self.inside(zone, listen, &i.listen, "ingest.listen");
            let auth = self.ingest_auth(&i, zone.map(|z| z.level));
            if let (Some(z), Some(listen), Some(auth)) = (zone, listen, auth) {
                let loc = self.at(&i.listen.span());
                ingests.push(Ingest {
                    zone: z.name.clone(),
                    listen,
                    auth,
                    loc,
                });
            }
        }
        for ch in &channels {
            if !ingests.iter().any(|i| i.zone == ch.zone) {
                self.diags.push(
                    Diagnostic::warning(ch.loc, format!("channel {:?}: no [[ingest]] listens in zone {:?}", ch.name, ch.zone))
                        .hint("producers can still use the spool directory; add [[ingest]] for the HTTP API"),
                );
            }
        }
        Some(Edge {
            uplink: uplink?,
            services,
            accesses,
            channels,
            ingests,
            update: Update::default(),
        })
    }

    fn channel(
        &mut self,
        zones: &[Zone],
        c: RawChannel,
        seen: &mut HashMap<String, Range<usize>>,
    ) -> Option<Channel> {
        let name = self.name(&c.name, "channel", seen);
        let zone = self.zone_ref(zones, &c.zone, "channel.zone", true);
        let priority = match &c.priority {
            None => Some(4),
            Some(p) => {
                let v = u8::try_from(*p.get_ref()).ok().filter(|p| *p <= 9);
                if v.is_none() {
                    self.error(
                        &p.span(),
                        format!("channel.priority: {} is out of range", p.get_ref()),
                        "write a priority from 0 (most urgent) to 9",
                    );
                }
                v
            }
        };
        let ttl = match &c.ttl {
            None => Some(std::time::Duration::from_secs(7 * 86_400)),
            Some(t) => match units::parse_duration(t.get_ref()) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.value_error(&t.span(), "channel.ttl", e);
                    None
                }
            },
        };
        let max_bytes = match &c.max_bytes {
            None => Some(ByteSize(1 << 30)),
            Some(s) => self.parsed::<ByteSize>(s, "channel.max_bytes"),
        };
        let when_full = match &c.when_full {
            None => Some(WhenFull::Reject),
            Some(w) => self.choice(
                w,
                "channel.when_full",
                &[
                    ("reject", WhenFull::Reject),
                    ("drop_oldest", WhenFull::DropOldest),
                    ("block", WhenFull::Block),
                ],
            ),
        };
        let mut formats = Vec::new();
        let mut formats_ok = true;
        if let Some(fs) = &c.formats {
            if fs.get_ref().is_empty() {
                self.error(&fs.span(), "channel.formats is empty: no record could ever be accepted", "list the accepted formats (json, xml, csv, text, raw), or remove the key to accept any");
                formats_ok = false;
            }
            for f in fs.get_ref() {
                match Format::parse(f.get_ref()) {
                    Some(fmt) if !formats.contains(&fmt) => formats.push(fmt),
                    Some(_) => self.warning(
                        &f.span(),
                        format!("channel.formats: {:?} is listed twice", f.get_ref()),
                        "list each format once",
                    ),
                    None => {
                        formats_ok = false;
                        self.error(
                            &f.span(),
                            format!("channel.formats: unknown format {:?}", f.get_ref()),
                            "write json, xml, csv, text or raw",
                        );
                    }
                }
            }
        }
        let max_record_bytes = match &c.max_record_bytes {
            None => Some(None),
            Some(s) => self
                .parsed::<ByteSize>(s, "channel.max_record_bytes")
                .map(Some),
        };
        if let (Some(Some(rec)), Some(total), Some(s)) =
            (max_record_bytes, max_bytes, &c.max_record_bytes)
        {
            if rec > total {
                self.error(&s.span(), format!("channel.max_record_bytes: {rec} is larger than max_bytes ({total})"), "a record must fit in the channel's buffer; lower max_record_bytes or raise max_bytes");
            }
        }
        let deliver_to = match &c.deliver_to {
            None => Some(Destination::Hub),
            Some(d) if d.get_ref() == "hub" => Some(Destination::Hub),
            Some(d) => self
                .remote(d, "channel.deliver_to", "channel")
                .map(|(device, channel)| Destination::Edge { device, channel }),
        };
        let one_way = c.one_way.is_some_and(|o| *o.get_ref());
        let ttl_pauses_offline = c.ttl_pauses_offline.is_some_and(|o| *o.get_ref());
        let scan = c.scan.as_ref().map(|s| *s.get_ref());
        let mut deny_keywords = Vec::new();
        if let Some(ks) = &c.deny_keywords {
            for k in ks.get_ref() {
                if k.get_ref().trim().is_empty() {
                    self.error(
                        &k.span(),
                        "channel.deny_keywords: an empty keyword would refuse every record",
                        "remove it",
                    );
                } else {
                    deny_keywords.push(k.get_ref().to_lowercase());
                }
            }
        }
        let bandwidth = match &c.bandwidth {
            None => Some(None),
            Some(b) => match units::parse_bandwidth(b.get_ref()) {
                Ok(v) => Some(Some(v)),
                Err(e) => {
                    self.value_error(&b.span(), "channel.bandwidth", e);
                    None
                }
            },
        };
        let loc = self.at(&c.name.span());
        match (
            name,
            zone,
            priority,
            ttl,
            max_bytes,
            when_full,
            max_record_bytes,
            deliver_to,
            formats_ok,
            bandwidth,
        ) {
            (
                Some(name),
                Some(z),
                Some(priority),
                Some(ttl),
                Some(max_bytes),
                Some(when_full),
                Some(max_record_bytes),
                Some(deliver_to),
                true,
                Some(bandwidth),
            ) => Some(Channel {
                name,
                zone: z.name.clone(),
                priority,
                ttl,
                max_bytes,
                when_full,
                formats,
                max_record_bytes,
                deliver_to,
                one_way,
                deny_keywords,
                bandwidth,
                ttl_pauses_offline,
                scan,
                loc,
            }),
            _ => None,
        }
    }

    fn hub(
        &mut self,
        zones: &[Zone],
        raw: Option<(RawHub, Range<usize>)>,
        raw_publishes: Vec<(RawPublish, Range<usize>)>,
        hub_broken: bool,
    ) -> Option<Hub> {
        let Some((h, _)) = raw else {
            if !hub_broken {
                self.error(
                    &(0..0),
                    "a hub needs a [hub] section",
                    "add [hub] with listen, api, ca_cert, ca_key, cert and key",
                );
            }
            return None;
        };
        let listen = self.socket(&h.listen, "hub.listen");
        let api = self.socket(&h.api, "hub.api");
        for (addr, s, key) in [(listen, &h.listen, "hub.listen"), (api, &h.api, "hub.api")] {
            if let Some(a) = addr {
                if !a.ip().is_loopback()
                    && !a.ip().is_unspecified()
                    && !zones.iter().any(|z| z.contains(a.ip()))
                {
                    self.error(
                        &s.span(),
                        format!("{key}: {} is in none of the declared zones", a.ip()),
                        "bind to an address of the provincial zone the hub serves",
                    );
                }
            }
        }
        let ca_cert = self.file(&h.ca_cert, "hub.ca_cert");
        let ca_key = self.file(&h.ca_key, "hub.ca_key");
        let box_ca = match &h.box_ca {
            None => Some(None),
            Some(s) => self.file(s, "hub.box_ca").map(Some),
        };
        let firmware_keys = self.firmware_keys(h.firmware_keys.as_ref());
        let firmware_rate =
            self.rate_or(h.firmware_rate.as_ref(), "hub.firmware_rate", 100_000_000);
        let firmware_rate_per_box = self.rate_or(
            h.firmware_rate_per_box.as_ref(),
            "hub.firmware_rate_per_box",
            2_000_000,
        );
        let cert = self.file(&h.cert, "hub.cert");
        let key = self.file(&h.key, "hub.key");
        let cert_lifetime = self.duration_or(h.cert_lifetime.as_ref(), "hub.cert_lifetime", 86_400);
        let max_token_lifetime = self.duration_or(
            h.max_token_lifetime.as_ref(),
            "hub.max_token_lifetime",
            7 * 86_400,
        );
        let sink_retention =
            self.duration_or(h.sink_retention.as_ref(), "hub.sink_retention", 30 * 86_400);
        let ops = match &h.ops {
            None => Some(None),
            Some(s) => self.socket(s, "hub.ops").map(Some),
        };
        let postgres = self.hub_store(&h);
        let mut publishes = Vec::new();
        let mut seen: HashMap<(String, String), Range<usize>> = HashMap::new();
        for (p, _) in raw_publishes {
            let remote = self.remote(&p.service, "publish.service", "service");
            let zone = self.zone_ref(zones, &p.zone, "publish.zone", false);
            let listen = self.socket(&p.listen, "publish.listen");
            self.inside(zone, listen, &p.listen, "publish.listen");
            if let Some(r) = &remote {
                if let Some(first) = seen.get(r) {
                    let line = self.at(first).line;
                    self.warning(
                        &p.service.span(),
                        format!(
                            "publish.service: {}/{} is published twice (first at line {line})",
                            r.0, r.1
                        ),
                        "one listener per service is usually enough",
                    );
                } else {
                    seen.insert(r.clone(), p.service.span());
                }
            }
            let protocol = self.protocol(p.protocol.as_ref(), "publish.protocol");
            if let (Some((device, service)), Some(z), Some(listen), Some(protocol)) =
                (remote, zone, listen, protocol)
            {
                let loc = self.at(&p.service.span());
                publishes.push(Publish {
                    device,
                    service,
                    zone: z.name.clone(),
                    listen,
                    protocol,
                    loc,
                });
            }
        }
        Some(Hub {
            settings: HubSettings {
                listen: listen?,
                api: api?,
                ca_cert: ca_cert?,
                ca_key: ca_key?,
                box_ca: box_ca?,
                firmware: Box::new(HubFirmware {
                    keys: firmware_keys?,
                    rate: firmware_rate?,
                    rate_per_box: firmware_rate_per_box?,
                }),
                cert: cert?,
                key: key?,
                cert_lifetime: cert_lifetime?,
                max_token_lifetime: max_token_lifetime?,
                sink_retention: sink_retention?,
                ops: ops?,
                registry: h
                    .registry
                    .as_ref()
                    .map(|s| std::path::PathBuf::from(s.get_ref())),
                sink: h
                    .sink
                    .as_ref()
                    .map(|s| std::path::PathBuf::from(s.get_ref())),
                postgres: postgres?,
            },
            publishes,
        })
    }

    /// Two listeners on one address cannot both bind.
    fn unique_listeners(&mut self, admin: &Admin, role: Option<&Role>) {
        let mut all: Vec<(SocketAddr, Location, &str)> = vec![(
            admin.listen,
            Location { line: 1, column: 1 },
            "admin.listen",
        )];
        match role {
            Some(Role::Edge(e)) => {
                all.extend(
                    e.accesses
                        .iter()
                        .map(|a| (a.listen, a.loc, "access.listen")),
                );
                all.extend(e.ingests.iter().map(|i| (i.listen, i.loc, "ingest.listen")));
            }
            Some(Role::Hub(h)) => {
                all.extend(
                    h.publishes
                        .iter()
                        .map(|p| (p.listen, p.loc, "publish.listen")),
                );
                all.push((h.settings.api, Location { line: 1, column: 1 }, "hub.api"));
            }
            None => {}
        }
        for (i, (addr, _, _)) in all.iter().enumerate() {
            if let Some((_, loc, key)) = all[i + 1..].iter().find(|(b, _, _)| b == addr) {
                let d = Diagnostic::error(
                    *loc,
                    format!("{key}: {addr} is already used by another listener"),
                )
                .hint("give each listener its own address and port");
                self.diags.push(d);
            }
        }
    }
}

fn nets(z: &Zone) -> String {
    z.networks
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The candidate within edit distance 2 of `word`, if any.
/// An `https://HOST[:PORT]/PATH` URL: the address (port 443 by default) and
/// the path.
fn parse_https_url(s: &str) -> Result<(HostPort, String), ValueError> {
    let bad = |m: String| ValueError {
        message: m,
        hint: "write an https URL, for example \"https://soc.example.gov:8443/alarms\"".into(),
    };
    let rest = s.strip_prefix("https://").ok_or_else(|| {
        bad(format!(
            "{s:?} is not an https:// URL (alarms leave the box over TLS only)"
        ))
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') || path.chars().any(|c| c.is_control() || c == ' ') {
        return Err(bad(format!(
            "{s:?}: no user info, spaces or control characters"
        )));
    }
    let with_port = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:443")
    } else {
        authority.to_owned()
    };
    let address = with_port
        .parse::<HostPort>()
        .map_err(|e| bad(format!("{s:?}: {}", e.message)))?;
    Ok((address, path.to_owned()))
}

/// A detector's bucket written `COUNT/DURATION`: it trips at COUNT events,
/// and a full bucket empties in DURATION (one forgotten every DURATION / COUNT).
fn parse_shape(s: &str) -> Result<crate::detect::bucket::Shape, ValueError> {
    let hint =
        "write COUNT/DURATION, for example \"10/60s\" (trips at 10, one forgotten every 6 s)";
    let bad = |m: String| ValueError {
        message: m,
        hint: hint.to_owned(),
    };
    let Some((n, d)) = s.split_once('/') else {
        return Err(bad(format!("{s:?} is not COUNT/DURATION")));
    };
    let n = n
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| bad(format!("{:?} in {s:?} is not a count above zero", n.trim())))?;
    let d = units::parse_duration(d.trim()).map_err(|e| bad(e.message))?;
    let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    Ok(crate::detect::bucket::Shape::per(n, ms))
}

fn closest<'c>(word: &str, candidates: impl Iterator<Item = &'c str>) -> Option<&'c str> {
    candidates
        .map(|c| (levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 2 && *d < c.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
