//! The configuration model: checked types that cannot hold a bad value.
//!
//! A file is read in two steps (see [`compile`]): TOML into the raw serde structs
//! of [`raw`], then raw into [`Config`], collecting every mistake with its line and
//! column. The boundary rules are then applied by [`crate::policy::check_config`].
//! [`load`] does all of it.

pub mod compile;
pub mod raw;
pub mod restart;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::diag::Location;
use crate::units::{ByteSize, Cidr, Date, HostPort};

/// The smallest audit retention the law allows, in days (rule R6.retention).
pub const MIN_RETENTION_DAYS: u32 = 180;

/// A configuration that passed every check of [`compile`].
#[derive(Debug, Clone)]
pub struct Config {
    /// `[node]`
    pub node: Node,
    /// `[[zone]]`, in file order.
    pub zones: Vec<Zone>,
    /// What the role brings: edge or hub sections.
    pub role: Role,
    /// `[audit]`
    pub audit: Audit,
    /// `[admin]`
    pub admin: Admin,
    /// `[detect]`
    pub detect: Detect,
    /// `[alarms]`
    pub alarms: AlarmForwarding,
    /// `[scan]`
    pub scan: Option<ScanSettings>,
}

impl Config {
    /// The zone named `name`.
    pub fn zone(&self, name: &str) -> Option<&Zone> {
        self.zones.iter().find(|z| z.name == name)
    }

    /// The provincial zone an edge's uplink reaches (its one intranet or extranet zone).
    pub fn uplink_zone(&self) -> Option<&Zone> {
        let mut provincial = self
            .zones
            .iter()
            .filter(|z| matches!(z.kind, ZoneKind::Intranet | ZoneKind::Extranet));
        let first = provincial.next()?;
        provincial.next().is_none().then_some(first)
    }

    /// The edge sections, if this is an edge.
    pub fn edge(&self) -> Option<&Edge> {
        match &self.role {
            Role::Edge(e) => Some(e),
            Role::Hub(_) => None,
        }
    }

    /// The hub sections, if this is a hub.
    pub fn hub(&self) -> Option<&Hub> {
        match &self.role {
            Role::Hub(h) => Some(h),
            Role::Edge(_) => None,
        }
    }

    /// Files that must exist when the daemon runs, with where they are named.
    pub fn runtime_paths(&self) -> Vec<&FilePath> {
        let mut paths = match &self.role {
            Role::Edge(e) => {
                let mut v = vec![&e.uplink.ca, &e.uplink.cert, &e.uplink.key];
                for i in &e.ingests {
                    match &i.auth {
                        IngestAuth::None => {}
                        IngestAuth::Token { tokens } => v.push(tokens),
                        IngestAuth::Mtls {
                            client_ca,
                            cert,
                            key,
                        } => v.extend([client_ca, cert, key]),
                    }
                }
                v
            }
            Role::Hub(h) => {
                let mut v = vec![
                    &h.settings.ca_cert,
                    &h.settings.ca_key,
                    &h.settings.cert,
                    &h.settings.key,
                ];
                v.extend(&h.settings.box_ca);
                if let Some(pg) = &h.settings.postgres {
                    if let PgTlsMode::VerifyFull { ca } = &pg.tls {
                        v.push(ca);
                    }
                    if let PgPassword::File(f) = &pg.password {
                        v.push(f);
                    }
                }
                v
            }
        };
        if let Role::Edge(e) = &self.role {
            for s in &e.services {
                if let Some(t) = &s.postgres.tls {
                    paths.extend([&t.cert, &t.key]);
                }
            }
        }
        let a = &self.alarms;
        if let Some(t) = &a.syslog {
            paths.push(&t.ca);
            if let Some((c, k)) = &t.client {
                paths.extend([c, k]);
            }
        }
        if let Some(t) = &a.webhook {
            paths.push(&t.ca);
            paths.extend(&t.token_file);
        }
        paths
    }
}

/// `[node]`
#[derive(Debug, Clone)]
pub struct Node {
    /// The device id; equals the identity in the device's certificate.
    pub id: String,
    /// Where the daemon keeps its databases (absolute).
    pub state_dir: PathBuf,
    /// The user to drop to after binding, when started as root.
    pub user: Option<String>,
    /// Connections open at once on each HTTP listener (ingest, admin, the
    /// hub's APIs).
    pub max_http_connections: u32,
    /// Connections open at once from one address on each HTTP listener.
    pub max_http_connections_per_source: u32,
}

/// The role's own sections.
#[derive(Debug, Clone)]
pub enum Role {
    /// A department's gateway.
    Edge(Edge),
    /// The central hub.
    Hub(Hub),
}

impl Role {
    /// `"edge"` or `"hub"`.
    pub fn name(&self) -> &'static str {
        match self {
            Role::Edge(_) => "edge",
            Role::Hub(_) => "hub",
        }
    }
}

/// What an edge configures.
#[derive(Debug, Clone)]
pub struct Edge {
    /// `[uplink]`
    pub uplink: Uplink,
    /// `[[service]]`
    pub services: Vec<Service>,
    /// `[[access]]`
    pub accesses: Vec<Access>,
    /// `[[channel]]`
    pub channels: Vec<Channel>,
    /// `[[ingest]]`
    pub ingests: Vec<Ingest>,
    /// `[update]`
    pub update: Update,
}

/// `[update]`: firmware updates from the hub (the appliance image's updater
/// does them; gatewayd hands it the offers).
#[derive(Debug, Clone)]
pub struct Update {
    /// When the box may reboot into a staged version (local time); `None`
    /// (`window = "any"`): as soon as it is staged.
    pub window: Option<crate::firmware::report::Window>,
    /// How long a new version has on its trial boot to bring a hub tunnel
    /// up and have a heartbeat acknowledged (default 15 min).
    pub trial: std::time::Duration,
    /// The updater's state directory, where it publishes `status.json`
    /// (read-only to gatewayd; default `/var/lib/gw-state/updater`).
    pub updater_state: PathBuf,
    /// Where gatewayd hands offers and the hub's acknowledgements to the
    /// updater (`offer.json`, `ack.json`; readable by it; default
    /// `/var/lib/gw-state/handoff`).
    pub handoff: PathBuf,
}

impl Default for Update {
    fn default() -> Self {
        Update {
            window: Some(crate::firmware::report::Window { from: 120, to: 300 }),
            trial: std::time::Duration::from_secs(15 * 60),
            updater_state: PathBuf::from("/var/lib/gw-state/updater"),
            handoff: PathBuf::from("/var/lib/gw-state/handoff"),
        }
    }
}

/// What a hub configures.
#[derive(Debug, Clone)]
pub struct Hub {
    /// `[hub]`
    pub settings: HubSettings,
    /// `[[publish]]`
    pub publishes: Vec<Publish>,
}

/// What kind of network a zone is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ZoneKind {
    /// A department's legacy private network (业务专网).
    Legacy,
    /// The e-government intranet (电子政务内网): classified, physically isolated.
    Intranet,
    /// The e-government extranet (电子政务外网): unclassified.
    Extranet,
    /// The internet: never bridged.
    Internet,
}

impl ZoneKind {
    /// The word used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            ZoneKind::Legacy => "legacy",
            ZoneKind::Intranet => "intranet",
            ZoneKind::Extranet => "extranet",
            ZoneKind::Internet => "internet",
        }
    }
}

/// A protection level under GB/T 22239-2019, 1 to 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Level(u8);

impl Level {
    /// The level, if it is 1 to 4.
    pub fn new(level: i64) -> Option<Self> {
        u8::try_from(level)
            .ok()
            .filter(|l| (1..=4).contains(l))
            .map(Level)
    }

    /// 1 to 4.
    pub fn get(self) -> u8 {
        self.0
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "L{}", self.0)
    }
}

/// `[[zone]]`
#[derive(Debug, Clone)]
pub struct Zone {
    /// Unique name.
    pub name: String,
    /// What network it is.
    pub kind: ZoneKind,
    /// Whether it carries classified information (intranet: always; extranet, internet: never).
    pub classified: bool,
    /// Protection level.
    pub level: Level,
    /// Its address ranges; never empty, never overlapping another zone's.
    pub networks: Vec<Cidr>,
    /// The box's network interfaces this zone is reached on (none: not
    /// said): the nftables baseline takes its listeners' packets only from
    /// these, so a neighbour on another port cannot pose as the zone.
    pub interfaces: Vec<String>,
    /// The assessment (测评) that allows bridging a legacy zone.
    pub assessment: Option<Assessment>,
    /// Where the zone is declared.
    pub loc: Location,
}

impl Zone {
    /// Whether `ip` lies in one of the zone's networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|n| n.contains(ip))
    }
}

/// A zone's assessment (测评).
#[derive(Debug, Clone)]
pub struct Assessment {
    /// The assessment report's id.
    pub id: String,
    /// Last day on which it is valid (inclusive).
    pub valid_until: Date,
    /// Where `valid_until` is written.
    pub loc: Location,
}

/// A file named in the config that must exist at run time.
#[derive(Debug, Clone)]
pub struct FilePath {
    /// The path as written.
    pub path: PathBuf,
    /// The key that names it, for messages (`uplink.ca`).
    pub key: &'static str,
    /// Where it is written.
    pub loc: Location,
}

/// `[uplink]`
#[derive(Debug, Clone)]
pub struct Uplink {
    /// The hubs, in order of preference; never empty, no duplicates.
    pub hubs: Vec<HostPort>,
    /// The CA that signs the hubs' certificates.
    pub ca: FilePath,
    /// This device's certificate.
    pub cert: FilePath,
    /// This device's private key.
    pub key: FilePath,
    /// How often the edge reports its status to each hub (default 10 s).
    pub heartbeat: Duration,
    /// After applying a config pushed by a hub: how long the edge waits for a
    /// hub connection before it reverts to the last good config (default 60 s).
    pub config_try: Duration,
}

/// Transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Relayed over one QUIC stream per connection.
    Tcp,
    /// Relayed over QUIC datagrams tagged with a flow id.
    Udp,
}

/// Application protocol a service declares; checked on the first bytes at level 3 and up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.x requests.
    Http,
    /// A TLS handshake.
    Tls,
    /// RTP (and RTCP) datagrams (UDP).
    Rtp,
    /// MPEG transport stream datagrams (UDP).
    Mpegts,
    /// The PostgreSQL frontend/backend protocol v3 (TCP), followed both ways.
    Postgres,
}

impl AppProtocol {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tls => "tls",
            Self::Rtp => "rtp",
            Self::Mpegts => "mpegts",
            Self::Postgres => "postgres",
        }
    }

    /// Whether it is checked datagram by datagram (a UDP service's).
    pub fn is_datagram(self) -> bool {
        matches!(self, Self::Rtp | Self::Mpegts)
    }
}

/// Who may reach a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "name")]
pub enum Peer {
    /// Clients in a zone of this box.
    Zone(String),
    /// Another department's gateway, through the hub.
    Device(String),
}

/// `[[service]]`: a legacy application published through the hub.
#[derive(Debug, Clone)]
pub struct Service {
    /// Unique name.
    pub name: String,
    /// The legacy zone it lives in.
    pub zone: String,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The legacy server, inside the zone's networks.
    pub target: SocketAddr,
    /// Declared application protocol (required at level 3 and up).
    pub app_protocol: Option<AppProtocol>,
    /// Who may reach it; anything else is denied.
    pub allow: Vec<Peer>,
    /// Most relayed connections at once; over it new ones are refused
    /// (unset: [`DEFAULT_MAX_CONNECTIONS`]).
    pub max_connections: Option<std::num::NonZeroU32>,
    /// Cap on the bytes per second of all its relays together, each direction.
    pub bandwidth: Option<u64>,
    /// A UDP flow without a datagram either way, or a TCP relay without a
    /// byte either way, for this long is closed (defaults: 60 s UDP, 1 h TCP).
    pub idle_timeout: Duration,
    /// `http` at level 3: an `Upgrade` request (WebSocket) may pass, and the
    /// rest of its connection is not followed as HTTP.
    pub allow_upgrade: bool,
    /// `tls` at level 3: the server names a ClientHello may ask for (none:
    /// any).
    pub sni: Vec<String>,
    /// `http`: the requests its clients may make (none: any); another request
    /// is answered 403 by the gateway (rule R5.http-allow).
    pub http_allow: Vec<HttpAllow>,
    /// `rtp`: the payload types allowed (none: any).
    pub rtp_payload_types: Vec<u8>,
    /// `mpegts`: the PIDs allowed (none: any).
    pub mpegts_pids: Vec<u16>,
    /// `rtp`, `mpegts`: refused datagrams a flow may have in a minute before
    /// it is closed.
    pub max_violations: u32,
    /// `postgres`: who may log in, what may run, how TLS is met.
    pub postgres: PgRules,
    /// Where it is declared.
    pub loc: Location,
}

/// The `pg_*` keys of an `app_protocol = "postgres"` service.
#[derive(Debug, Clone)]
pub struct PgRules {
    /// `pg_users`: users who may log in (none: any).
    pub users: Vec<String>,
    /// `pg_databases`: databases they may log in to (none: any).
    pub databases: Vec<String>,
    /// `pg_max_message`: the largest message either way, in bytes.
    pub max_message: usize,
    /// `pg_read_only`: only single read statements pass.
    pub read_only: bool,
    /// `pg_tls = "terminate"`: the gateway's certificate and key; `None`
    /// (`"decline"`): an SSLRequest is answered "not supported".
    pub tls: Option<PgTls>,
}

/// A default `pg_max_message`: 1 MiB.
pub const DEFAULT_PG_MAX_MESSAGE: usize = 1 << 20;

impl Default for PgRules {
    fn default() -> Self {
        PgRules {
            users: Vec::new(),
            databases: Vec::new(),
            max_message: DEFAULT_PG_MAX_MESSAGE,
            read_only: false,
            tls: None,
        }
    }
}

/// Where TLS to a `postgres` service's clients ends.
#[derive(Debug, Clone)]
pub struct PgTls {
    /// `pg_cert`: the certificate chain shown to clients (PEM).
    pub cert: FilePath,
    /// `pg_key`: its private key (PEM).
    pub key: FilePath,
}

/// One entry of a service's `http_allow`: a request passes when its method is
/// one of `methods` and its path is one of `paths` or below it (an empty list
/// matches anything).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HttpAllow {
    /// Method names, as sent (`GET`, `POST`).
    pub methods: Vec<String>,
    /// Path prefixes, normalised, each starting with `/`.
    pub paths: Vec<String>,
}

/// Relayed connections of a service at once when it sets no `max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;

/// `[[access]]`: a listener on the legacy side reaching another department's service.
#[derive(Debug, Clone)]
pub struct Access {
    /// Where legacy clients connect, inside the zone's networks.
    pub listen: SocketAddr,
    /// The legacy zone of the listener.
    pub zone: String,
    /// The device that publishes the service.
    pub device: String,
    /// The service's name on that device.
    pub service: String,
    /// TCP (a listener) or UDP (a socket whose datagrams travel as flows).
    pub protocol: Protocol,
    /// Where it is declared.
    pub loc: Location,
}

/// What a full channel does with a new record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Refuse the new record (the producer sees an error and may retry).
    Reject,
    /// Delete the oldest undelivered record (audited).
    DropOldest,
    /// Hold the producer until space frees.
    Block,
}

/// Record formats a channel accepts; checked on every record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A JSON document.
    Json,
    /// An XML document.
    Xml,
    /// Comma-separated values.
    Csv,
    /// UTF-8 text.
    Text,
    /// Bytes, unchecked beyond their size (declared `application/octet-stream`).
    Raw,
}

impl Format {
    /// The word used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Xml => "xml",
            Format::Csv => "csv",
            Format::Text => "text",
            Format::Raw => "raw",
        }
    }

    /// Parses the config word.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Format::Json,
            Format::Xml,
            Format::Csv,
            Format::Text,
            Format::Raw,
        ]
        .into_iter()
        .find(|f| f.as_str() == s)
    }
}

/// Where a channel's records go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Destination {
    /// The hub's store; consumers pull with a cursor.
    Hub,
    /// Another department's channel, through the hub.
    Edge {
        /// The receiving device.
        device: String,
        /// Its channel.
        channel: String,
    },
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Hub => f.write_str("hub"),
            Destination::Edge { device, channel } => write!(f, "{device}/{channel}"),
        }
    }
}

/// `[[channel]]`: data pushed from the legacy side and synced to the hub.
#[derive(Debug, Clone)]
pub struct Channel {
    /// Unique name.
    pub name: String,
    /// The legacy zone producers live in.
    pub zone: String,
    /// 0 is most urgent, 9 least.
    pub priority: u8,
    /// How long an undelivered record is kept.
    pub ttl: Duration,
    /// Buffer space for this channel.
    pub max_bytes: ByteSize,
    /// What to do when the buffer is full.
    pub when_full: WhenFull,
    /// Accepted formats; empty means any (refused at level 3 and up).
    pub formats: Vec<Format>,
    /// Largest record accepted (required at level 3 and up).
    pub max_record_bytes: Option<ByteSize>,
    /// Where records go.
    pub deliver_to: Destination,
    /// Declared one-way: the only way data may flow to a lower-level zone (rule R4).
    pub one_way: bool,
    /// Records containing any of these (case-insensitive) are refused at ingest.
    pub deny_keywords: Vec<String>,
    /// Cap on the channel's sync traffic, bytes per second.
    pub bandwidth: Option<u64>,
    /// TTL does not run while no hub is reachable.
    pub ttl_pauses_offline: bool,
    /// `scan`: records scanned for malicious code; `None` means as the
    /// zone's level says (3 and up scan, when `[scan]` is set).
    pub scan: Option<bool>,
    /// Where it is declared.
    pub loc: Location,
}

/// `[[ingest]]`: where legacy applications hand records to channels.
#[derive(Debug, Clone)]
pub struct Ingest {
    /// The legacy zone it listens in.
    pub zone: String,
    /// HTTP listener inside the zone's networks.
    pub listen: SocketAddr,
    /// How producers prove who they are.
    pub auth: IngestAuth,
    /// Where it is declared.
    pub loc: Location,
}

/// `[[ingest]] auth`: how an ingest listener knows its producers.
#[derive(Debug, Clone)]
pub enum IngestAuth {
    /// `"none"`: any client in the zone (the default).
    None,
    /// `"token"`: `Authorization: Bearer TOKEN`, checked against the SHA-256
    /// digests in `tokens` (one producer name per token).
    Token {
        /// The producers' token digests (`gatewayd producer add` writes it).
        tokens: FilePath,
    },
    /// `"mtls"`: HTTPS, with a client certificate from `client_ca`; the
    /// producer's name is the certificate's first DNS name (or its CN).
    Mtls {
        /// The CA that issues producers' certificates.
        client_ca: FilePath,
        /// The listener's own certificate ...
        cert: FilePath,
        /// ... and its key.
        key: FilePath,
    },
}

impl IngestAuth {
    /// The config word.
    pub fn as_str(&self) -> &'static str {
        match self {
            IngestAuth::None => "none",
            IngestAuth::Token { .. } => "token",
            IngestAuth::Mtls { .. } => "mtls",
        }
    }
}

/// `[audit]`
#[derive(Debug, Clone)]
pub struct Audit {
    /// Days audit records are kept (at least 180).
    pub retention_days: u32,
    /// Where `retention_days` is written (or `[audit]`, or the file start).
    pub loc: Location,
}

/// `[detect]`: intrusion detection and bans (GB/T 22239-2019 8.1.3.3).
#[derive(Debug, Clone)]
pub struct Detect {
    /// Whether listeners' events are watched (on by default).
    pub enabled: bool,
    /// The detectors' thresholds and ban lengths.
    pub thresholds: crate::detect::Thresholds,
    /// How bans grow for a source that comes back.
    pub escalation: crate::detect::bans::Escalation,
    /// Sources alarmed about but never banned.
    pub never_ban: Vec<NeverBan>,
    /// Where `[detect]` is written (or the file's start).
    pub loc: Location,
}

impl Default for Detect {
    fn default() -> Self {
        Self {
            enabled: true,
            thresholds: crate::detect::Thresholds::default(),
            escalation: crate::detect::bans::Escalation::default(),
            never_ban: Vec::new(),
            loc: Location { line: 1, column: 1 },
        }
    }
}

impl Detect {
    /// Whether a source (its address, its certificate's device id) is in `never_ban`.
    pub fn exempt(&self, ip: IpAddr, device: Option<&str>) -> bool {
        self.never_ban.iter().any(|n| match n {
            NeverBan::Network(c) => c.contains(ip),
            NeverBan::Device(d) => device == Some(d.as_str()),
        })
    }
}

/// `[scan]`: the malware scanner records and spool files go through
/// (GB/T 22239-2019 8.1.3.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanSettings {
    /// Where clamd listens.
    pub clamd: ClamdAddress,
    /// The longest a scan may take (then the record is refused).
    pub timeout: Duration,
    /// A signature database older than this is warned about.
    pub max_db_age: Duration,
    /// Where the signature database lives, to tell its age by its files.
    pub database_dir: Option<PathBuf>,
}

/// clamd's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClamdAddress {
    /// A Unix socket (`LocalSocket`).
    Unix(PathBuf),
    /// A TCP socket (`TCPSocket`, `TCPAddr`).
    Tcp(HostPort),
}

impl std::fmt::Display for ClamdAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "{}", p.display()),
            Self::Tcp(h) => write!(f, "{}:{}", h.host, h.port),
        }
    }
}

impl Config {
    /// Whether records of `channel` are scanned: `scan = true`, or not set
    /// and the channel's zone is level 3 or up; and only with `[scan]`.
    pub fn scans(&self, channel: &Channel) -> bool {
        self.scan.is_some()
            && channel.scan.unwrap_or_else(|| {
                self.zone(&channel.zone)
                    .is_some_and(|z| z.level >= Level(3))
            })
    }
}

/// `[alarms]`: where alarms go besides the audit chain (and the hub).
#[derive(Debug, Clone)]
pub struct AlarmForwarding {
    /// Alarms below this are not forwarded (they are audited all the same).
    pub min_severity: crate::detect::Severity,
    /// How long a target may be unreachable before it raises its own alarm.
    pub down_after: Duration,
    /// Syslog over TLS (RFC 5425).
    pub syslog: Option<SyslogTarget>,
    /// An HTTPS webhook taking each alarm as JSON.
    pub webhook: Option<WebhookTarget>,
}

impl Default for AlarmForwarding {
    fn default() -> Self {
        Self {
            min_severity: crate::detect::Severity::Low,
            down_after: Duration::from_secs(60),
            syslog: None,
            webhook: None,
        }
    }
}

/// `[alarms] syslog`.
#[derive(Debug, Clone)]
pub struct SyslogTarget {
    /// The collector, `HOST:PORT` (6514 by convention).
    pub address: HostPort,
    /// The CA that signed its certificate.
    pub ca: FilePath,
    /// This node's client certificate and key, when the collector asks for one.
    pub client: Option<(FilePath, FilePath)>,
}

/// `[alarms] webhook`.
#[derive(Debug, Clone)]
pub struct WebhookTarget {
    /// The host and port of the URL.
    pub address: HostPort,
    /// Its path (and query), from `/`.
    pub path: String,
    /// The CA that signed the server's certificate.
    pub ca: FilePath,
    /// A file holding a bearer token, when the webhook wants one.
    pub token_file: Option<FilePath>,
}

/// An entry of `[detect] never_ban`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NeverBan {
    /// An address (as a /32 or /128) or a network.
    Network(Cidr),
    /// A device id, as its certificate names it (a hub, a partner gateway).
    Device(String),
}

/// `[admin]`
#[derive(Debug, Clone)]
pub struct Admin {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub listen: SocketAddr,
}

/// `[hub]`
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// QUIC listener for edges.
    pub listen: SocketAddr,
    /// HTTP(S) API for operators and consumers.
    pub api: SocketAddr,
    /// The CA certificate edges are issued from.
    pub ca_cert: FilePath,
    /// The CA's private key.
    pub ca_key: FilePath,
    /// The CA bundle boxes are to trust for hubs (a CA rotation), sent to
    /// each box whose heartbeat reports other CAs, signed with `ca_key`.
    pub box_ca: Option<FilePath>,
    /// Firmware uploads and the pacing of parts sent to boxes.
    pub firmware: Box<HubFirmware>,
    /// The hub's certificate.
    pub cert: FilePath,
    /// The hub's private key.
    pub key: FilePath,
    /// Lifetime of issued device certificates.
    pub cert_lifetime: Duration,
    /// The longest an enrollment token may be valid (operators ask for less).
    pub max_token_lifetime: Duration,
    /// How long a record waits in the sink for its consumers before it is
    /// dropped (counted as `expired_unread`).
    pub sink_retention: Duration,
    /// The sink file, when several hubs share one (default
    /// `STATE_DIR/sink.sqlite`).
    pub sink: Option<std::path::PathBuf>,
    /// The operators' HTTPS API (`gatewayctl`), when set.
    pub ops: Option<SocketAddr>,
    /// The fleet registry file, when several hubs share one (default
    /// `STATE_DIR/fleet.sqlite`).
    pub registry: Option<std::path::PathBuf>,
    /// `store = "postgres"`: the registry and the sink live in PostgreSQL
    /// (`[hub.postgres]`); `None` is the embedded SQLite files.
    pub postgres: Option<Box<PgStore>>,
}

/// `[hub]`'s firmware keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFirmware {
    /// `firmware_keys`: the minisign public keys firmware bundles must be
    /// signed with (the current one and the next); none: the hub refuses
    /// uploads.
    pub keys: Vec<FilePath>,
    /// `firmware_rate`: bytes per second this hub sends firmware parts at,
    /// to every box together.
    pub rate: u64,
    /// `firmware_rate_per_box`: the same, to one box.
    pub rate_per_box: u64,
}

/// `[hub.postgres]`: where hubs sharing one PostgreSQL keep their state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgStore {
    /// The servers, tried in order; with several, the hub takes the one that
    /// accepts writes (`target_session_attrs=read-write`), so it follows a
    /// failover.
    pub hosts: Vec<PgHost>,
    /// The database.
    pub dbname: String,
    /// The role the hub logs in as.
    pub user: String,
    /// TLS to the server.
    pub tls: PgTlsMode,
    /// Where the password comes from (never the config itself).
    pub password: PgPassword,
    /// Connections of this hub's pool (one more is its listener).
    pub pool: u32,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// `application_name`, shown in `pg_stat_activity`.
    pub application_name: String,
}

/// A PostgreSQL server address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgHost {
    /// A host name or address, and port.
    Tcp {
        /// Name (checked against the certificate) or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// The directory of a Unix socket, and the port in its file name.
    Unix {
        /// Directory (`/run/postgresql`).
        dir: PathBuf,
        /// Port (`.s.PGSQL.5432`).
        port: u16,
    },
}

impl PgHost {
    /// Whether the connection stays on this machine (a Unix socket, or a
    /// loopback address): the only place TLS may be off.
    pub fn is_local(&self) -> bool {
        match self {
            PgHost::Unix { .. } => true,
            PgHost::Tcp { host, .. } => {
                host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|a| a.is_loopback())
            }
        }
    }
}

/// `sslmode`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgTlsMode {
    /// `verify-full` (the default): TLS, the server's certificate checked
    /// against `ca` and its name against the host.
    VerifyFull {
        /// The CA certificate(s) the server's certificate chains to.
        ca: FilePath,
    },
    /// `disable`: only to a Unix socket or a loopback address.
    Disable,
}

impl PartialEq for FilePath {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.key == other.key
    }
}

impl Eq for FilePath {}

/// Where the hub reads its PostgreSQL password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgPassword {
    /// None: the server trusts the socket's peer, or a client certificate.
    None,
    /// A file holding it (its first line), readable by the daemon only.
    File(FilePath),
    /// An environment variable (systemd's `LoadCredential=` or
    /// `EnvironmentFile=`).
    Env(String),
}

/// `[[publish]]`: a hub listener for an edge's service.
#[derive(Debug, Clone)]
pub struct Publish {
    /// The edge that publishes it.
    pub device: String,
    /// The service's name on that edge.
    pub service: String,
    /// The provincial zone of the listener.
    pub zone: String,
    /// Where provincial clients connect.
    pub listen: SocketAddr,
    /// TCP or UDP; must match the edge's service.
    pub protocol: Protocol,
    /// Where it is declared.
    pub loc: Location,
}

/// Default port of the admin endpoint.
pub const DEFAULT_ADMIN_PORT: NonZeroU16 = match NonZeroU16::new(9600) {
    Some(p) => p,
    None => unreachable!(),
};
