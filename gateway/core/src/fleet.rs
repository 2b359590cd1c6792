//! Central management, the pure part: the messages of the control stream and of
//! enrollment, the operators' roles, tokens and credentials, which sections of a
//! config are boundary policy, when to renew a certificate, and the audit export
//! format with its offline check.
//!
//! Messages are JSON in a length-prefixed envelope: `len: u32` (big-endian) then
//! that many bytes of one JSON object with a `"type"` field. A message above
//! [`MAX_MESSAGE`] is refused before anything is allocated for it.

use serde::{Deserialize, Serialize};

use crate::audit::{self, Record};

/// ALPN of an enrollment connection (no client certificate yet).
pub const ENROLL_ALPN: &[u8] = b"gw-enroll/1";

/// Largest control or enrollment message (a pushed config, an audit batch).
pub const MAX_MESSAGE: usize = 4 << 20;

/// QUIC close code for a revoked device.
pub const CLOSE_REVOKED: u32 = 0x52;

/// QUIC close code for a certificate that is no longer the device's (it was
/// re-enrolled, or renewed and handed over).
pub const CLOSE_SUPERSEDED: u32 = 0x53;

/// A heartbeat: what an edge reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// gatewayd's version.
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_s: u64,
    /// The version of the centrally managed config in force (0: the local file).
    pub config_version: u64,
    /// When the device certificate expires (Unix ms), if known.
    pub cert_not_after_ms: Option<i64>,
    /// Each legacy zone's assessment expiry (`YYYY-MM-DD`).
    pub assessments: Vec<(String, String)>,
    /// Relays open now.
    pub relays_open: u64,
    /// Records waiting in each channel's buffer.
    pub backlogs: Vec<(String, u64)>,
    /// The last error or warning logged, if any.
    pub last_error: Option<String>,
    /// Seconds between heartbeats.
    pub interval_s: u64,
    /// The config in force was pushed and has not reached a hub yet (its
    /// try window is open): not proven good.
    #[serde(default)]
    pub config_trying: bool,
    /// SHA-256 fingerprints of the CA certificates the box trusts hubs by,
    /// as it read them last (at start, renewal or an uplink reload): in a CA
    /// rotation, which boxes hold the new bundle.
    #[serde(default)]
    pub ca: Vec<String>,
    /// The box's firmware, as its updater published it (absent off the
    /// appliance image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Box<crate::firmware::report::FirmwareStatus>>,
}

impl Status {
    /// Keeps only what a hub may store of a peer's claim: at most
    /// [`crate::fleet::MAX_CA`] fingerprints, each 64 lowercase hex digits.
    pub fn bound(&mut self) {
        self.ca.retain(|f| {
            f.len() == 64
                && f.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        self.ca.truncate(MAX_CA);
        if let Some(f) = &mut self.firmware {
            f.bound();
        }
    }
}

/// CA fingerprints a heartbeat may carry.
pub const MAX_CA: usize = 8;

/// What an edge did with an offered config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ConfigOutcome {
    /// Applied; the edge now runs it.
    Applied,
    /// Refused: it does not check, or it is not newer than what runs.
    Refused {
        /// The located errors, or why it is stale.
        errors: Vec<String>,
    },
    /// Applied, but no hub was reachable within the try window: the edge went
    /// back to its last good config.
    Reverted {
        /// The version that was tried.
        tried: u64,
        /// What happened.
        reason: String,
    },
}

/// A remote command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// Close and re-open every hub tunnel.
    Reconnect,
    /// Recent log lines, a metrics snapshot and the config check result.
    Diagnostics,
}

/// A message on the control stream, after the hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Edge to hub, every `interval_s`.
    Heartbeat(Status),
    /// Edge to hub, once per tunnel: the config in force.
    ConfigState {
        /// Its version (0: the local file, never pushed).
        version: u64,
        /// Its text.
        text: String,
    },
    /// Hub to edge: a desired config.
    ConfigOffer {
        /// Its version.
        version: u64,
        /// Its text.
        text: String,
    },
    /// Edge to hub: the result of an offer (or of a revert, reported later).
    ConfigResult {
        /// The version offered (or tried).
        offered: u64,
        /// The version in force now.
        applied: u64,
        /// What happened.
        #[serde(flatten)]
        outcome: ConfigOutcome,
    },
    /// Hub to edge.
    Command {
        /// Matches the result to the request.
        id: u64,
        /// What to do.
        kind: CommandKind,
    },
    /// Hub to edge: lift the ban of an address (the security administrator's);
    /// answered with a `CommandResult` of the same id.
    LiftBan {
        /// Matches the result to the request.
        id: u64,
        /// The banned address (or any address of a banned IPv6 /64).
        address: String,
    },
    /// Edge to hub.
    CommandResult {
        /// The command's id.
        id: u64,
        /// Whether it worked.
        ok: bool,
        /// Its output (JSON text for diagnostics).
        output: String,
    },
    /// Edge to hub: a certificate signing request for a fresh key.
    Renew {
        /// The CSR, PEM.
        csr_pem: String,
    },
    /// Hub to edge: the renewed certificate.
    Renewed {
        /// The certificate, PEM.
        cert_pem: String,
    },
    /// Hub to edge: renewal refused.
    RenewRefused {
        /// Why.
        reason: String,
    },
    /// Hub to edge: send audit records from this sequence number on.
    AuditCursor {
        /// The next record the hub wants.
        next_seq: u64,
    },
    /// Edge to hub: audit records, in order.
    AuditBatch {
        /// The records.
        records: Vec<Record>,
    },
    /// Hub to edge: install firmware `version` (from the hub's store), for
    /// rollout `rollout`. Sent with heartbeats until the box's firmware
    /// status shows it taken (or refused).
    FirmwareOffer {
        /// The rollout that offers it.
        rollout: String,
        /// The version.
        version: String,
    },
    /// Hub to edge: the rollout that offered `version` was aborted; a box
    /// that has not booted it yet drops it (its status shows it being
    /// written or staged). Sent with heartbeats while it does.
    FirmwareWithdraw {
        /// The version.
        version: String,
    },
    /// Hub to edge: the hub has recorded a heartbeat in which the box runs
    /// `running` (on a trial boot, the health gate waits for this), and the
    /// update's `outcome` if the heartbeat carried one (the updater then
    /// forgets it).
    FirmwareAck {
        /// The version the heartbeat said runs.
        running: String,
        /// The outcome recorded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outcome: Option<crate::firmware::update::Outcome>,
        /// The boot id the heartbeat's firmware status carried, echoed.
        #[serde(default)]
        boot: String,
    },
    /// Hub to edge: the CA certificates the box is to trust for hubs from
    /// now on (a CA rotation), signed by the key of a CA the box trusts now
    /// ([`ca_bundle_signed`]). Sent when the box's heartbeat reports other
    /// CAs than these.
    CaBundle {
        /// The certificates, PEM, at most [`MAX_CA_BUNDLE_BYTES`].
        pem: String,
        /// When the operator made the bundle (Unix ms): a box never goes
        /// back to an older one.
        issued_ms: i64,
        /// ECDSA P-256 / SHA-256 (ASN.1 DER), hex, over [`ca_bundle_signed`].
        signature: String,
    },
}

/// The largest CA bundle a box takes from a hub.
pub const MAX_CA_BUNDLE_BYTES: usize = 64 * 1024;

/// What the hub's CA key signs for [`Message::CaBundle`]: a fixed label,
/// the time and the PEM text, so a signature over anything else (an audit
/// export's head, a certificate) is never taken for one.
pub fn ca_bundle_signed(pem: &str, issued_ms: i64) -> Vec<u8> {
    format!("gatewayd ca bundle v1\n{issued_ms}\n{pem}").into_bytes()
}

/// Enrollment, edge to hub: the only message of an enrollment connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The single-use token from `gatewayctl token create`.
    pub token: String,
    /// The device id the box claims (must match the token and the CSR).
    pub device: String,
    /// A CSR for a key made on the box, PEM.
    pub csr_pem: String,
}

/// Enrollment, hub to edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum EnrollAnswer {
    /// The signed certificate.
    Issued {
        /// PEM.
        cert_pem: String,
    },
    /// Refused.
    Refused {
        /// Why, for the engineer at the box.
        reason: String,
    },
}

/// A message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix is above [`MAX_MESSAGE`].
    #[error("message of {0} bytes is larger than the {MAX_MESSAGE}-byte limit")]
    TooLarge(usize),
    /// Not the JSON of a known message.
    #[error("malformed message: {0}")]
    Json(String),
}

/// `len: u32` + JSON.
pub fn encode<T: Serialize>(m: &T) -> Vec<u8> {
    let body = serde_json::to_vec(m).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The body length a prefix announces.
///
/// # Errors
/// [`DecodeError::TooLarge`] above [`MAX_MESSAGE`].
pub fn body_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
    let n = u32::from_be_bytes(prefix) as usize;
    if n > MAX_MESSAGE {
        return Err(DecodeError::TooLarge(n));
    }
    Ok(n)
}

/// Decodes a message body (without its prefix).
///
/// # Errors
/// When it is not the JSON of a `T`.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, DecodeError> {
    serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))
}

// ---------------------------------------------------------------------------
// Operators

/// An operator's role. An account holds exactly one (DESIGN.md rule 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminRole {
    /// Devices, tokens, the non-policy sections of config, remote commands.
    System,
    /// The policy sections of config, revocation.
    Security,
    /// Audit read and export only.
    Audit,
}

impl AdminRole {
    /// The role's name as written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminRole::System => "system",
            AdminRole::Security => "security",
            AdminRole::Audit => "audit",
        }
    }

    /// Parses `system`, `security` or `audit`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "system" => Some(Self::System),
            "security" => Some(Self::Security),
            "audit" => Some(Self::Audit),
            _ => None,
        }
    }
}

/// What an operator asks the hub to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Create an enrollment token for a device not enrolled (or revoked).
    TokenCreate,
    /// Create a token that re-enrolls a device already enrolled: a new
    /// identity for a department is policy.
    TokenReplace,
    /// List or show devices, config status.
    DevicesRead,
    /// Run a remote command on a device.
    Command,
    /// Push a config that changes its non-policy sections.
    ConfigPushOther,
    /// Push a config that changes its policy sections.
    ConfigPushPolicy,
    /// Revoke a device.
    Revoke,
    /// Read or export audit records.
    AuditRead,
    /// Create a consumer (an application reading the sink) and its certificate.
    ConsumerCreate,
    /// Grant or withdraw a consumer's reading of a department's stream: who
    /// may read a department's data is policy.
    ConsumerGrant,
    /// Revoke a consumer.
    ConsumerRevoke,
    /// List intrusion alarms and bans.
    AlarmsRead,
    /// Acknowledge an alarm.
    AlarmAck,
    /// Lift a ban: who may reach the boundary again is policy.
    BanLift,
    /// Set or remove devices' labels.
    DevicesLabel,
    /// Set or remove devices' template variables.
    DevicesVars,
    /// Upload a firmware version (its signature is checked all the same).
    FirmwareUpload,
    /// Roll a firmware version out to boxes.
    FirmwareRollout,
}

/// Every operator action's audit event, recorded as `admin.EVENT` whether it
/// was allowed (`ok`) or refused (`deny`, with the refusal in the detail),
/// and what it is. docs/audit.md's table is tested against this list, and
/// the hub checks every event it records is here (in debug builds).
pub const ADMIN_EVENTS: &[(&str, &str)] = &[
    (
        "token.create",
        "an enrollment token made (`replace=true`: re-enrolls an enrolled or revoked device)",
    ),
    ("device.list", "devices listed (`devices list`)"),
    ("device.show", "one device read (`devices show`)"),
    ("device.label", "labels set or removed"),
    ("device.vars", "template variables set"),
    ("device.vars.show", "template variables read"),
    ("device.revoke", "a device revoked"),
    ("command", "a remote command (reconnect, diagnostics)"),
    ("config.push", "a config pushed to a device"),
    ("config.show", "a pushed or applied config read"),
    ("config.status", "every device's config status read"),
    ("template.push", "a template version stored"),
    ("template.list", "templates listed"),
    ("template.show", "a template read"),
    ("rollout.start", "a rollout started"),
    ("rollout.list", "rollouts listed"),
    ("rollout.status", "a rollout's status read"),
    ("rollout.pause", "a rollout paused"),
    ("rollout.resume", "a rollout resumed"),
    ("rollout.abort", "a rollout aborted"),
    ("rollout.rollback", "a rollout rolled back"),
    (
        "firmware.upload",
        "a firmware version uploaded (begun, resumed or completed; refused: the signature or a part that does not match)",
    ),
    ("firmware.list", "firmware versions listed"),
    ("audit.export", "a device's collected audit exported"),
    ("consumer.create", "a consumer and its certificate made"),
    ("consumer.list", "consumers listed"),
    (
        "consumer.grant",
        "a consumer may read a department's stream",
    ),
    ("consumer.revoke-grant", "a consumer's grant withdrawn"),
    ("consumer.revoke", "a consumer revoked"),
    ("alarm.list", "alarms read"),
    ("alarm.ack", "an alarm acknowledged"),
    ("ban.list", "bans read"),
    ("ban.lift", "a ban lifted"),
    (
        "auth",
        "a request without a valid credential (subject: its address, summarised)",
    ),
];

/// Whether `event` (without `admin.`) is one of [`ADMIN_EVENTS`].
pub fn is_admin_event(event: &str) -> bool {
    ADMIN_EVENTS.iter().any(|(e, _)| *e == event)
}

/// Whether `role` may do `action`. Nothing is shared between the system and
/// security roles' write actions, and the audit role only reads (audit and
/// alarms).
pub fn allowed(role: AdminRole, action: Action) -> bool {
    use Action as A;
    match role {
        AdminRole::System => matches!(
            action,
            A::TokenCreate
                | A::DevicesRead
                | A::DevicesLabel
                | A::DevicesVars
                | A::Command
                | A::ConfigPushOther
                | A::ConsumerCreate
                | A::AlarmsRead
                | A::FirmwareUpload
                | A::FirmwareRollout
        ),
        AdminRole::Security => matches!(
            action,
            A::DevicesRead
                | A::ConfigPushPolicy
                | A::Revoke
                | A::TokenReplace
                | A::ConsumerGrant
                | A::ConsumerRevoke
                | A::AlarmsRead
                | A::AlarmAck
                | A::BanLift
        ),
        AdminRole::Audit => matches!(action, A::AuditRead | A::AlarmsRead),
    }
}

/// A secret with its kind and owner: `gwt1.DEVICE.HEX` (enrollment token) or
/// `gwa1.ACCOUNT.HEX` (operator credential).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    /// `gwt1` or `gwa1`.
    pub kind: &'static str,
    /// The device or account it belongs to.
    pub owner: String,
    /// The random part, hex.
    pub secret: String,
}

/// Prefix of enrollment tokens.
pub const TOKEN_KIND: &str = "gwt1";
/// Prefix of operator credentials.
pub const CREDENTIAL_KIND: &str = "gwa1";

impl Secret {
    /// Parses a token or credential of `kind`.
    pub fn parse(kind: &'static str, s: &str) -> Option<Secret> {
        let s = s.trim();
        let rest = s.strip_prefix(kind)?.strip_prefix('.')?;
        let (owner, secret) = rest.rsplit_once('.')?;
        if owner.is_empty() || secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return None;
        }
        Some(Secret {
            kind,
            owner: owner.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// The text form.
    pub fn to_text(&self) -> String {
        format!("{}.{}.{}", self.kind, self.owner, self.secret)
    }

    /// What the hub stores: SHA-256 of the whole text, hex. The secret itself is
    /// never stored.
    pub fn digest(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, self.to_text().as_bytes());
        crate::hex::encode(d.as_ref())
    }
}

// ---------------------------------------------------------------------------
// Config sections

/// Keys that are boundary policy: who may cross and what may cross. A push that
/// changes any of them needs the security administrator; one that changes
/// anything else needs the system administrator.
///
/// Where a connection goes is policy too: a service's `target` and `protocol`,
/// an access's `listen`, the uplink's `hubs` (the system administrator alone
/// could otherwise redirect a published service or the whole box). So is
/// `[detect]`: turning detection off or exempting a source is a boundary
/// decision.
const POLICY_TABLES: &[&str] = &["zone", "detect", "alarms", "scan"];
const POLICY_KEYS: &[(&str, &[&str])] = &[
    (
        "service",
        &[
            "allow",
            "app_protocol",
            "allow_upgrade",
            "sni",
            "http_allow",
            "zone",
            "target",
            "protocol",
        ],
    ),
    ("access", &["zone", "service", "listen", "protocol"]),
    (
        "channel",
        &[
            "zone",
            "formats",
            "deny_keywords",
            "max_record_bytes",
            "deliver_to",
            "one_way",
            "scan",
        ],
    ),
    ("ingest", &["zone", "listen", "auth", "tokens", "client_ca"]),
    ("publish", &["zone", "service", "listen", "protocol"]),
];
/// Keys of single tables that are policy.
const POLICY_TABLE_KEYS: &[(&str, &[&str])] = &[("uplink", &["hubs"])];

/// Every policy key as `TABLE.KEY` (`zone.*` for the whole table), in the
/// order docs/operate.md lists them.
pub fn policy_keys() -> Vec<String> {
    let mut keys: Vec<String> = POLICY_TABLES.iter().map(|t| format!("{t}.*")).collect();
    for (table, ks) in POLICY_KEYS.iter().chain(POLICY_TABLE_KEYS) {
        keys.extend(ks.iter().map(|k| format!("{table}.{k}")));
    }
    keys
}

/// Which parts of a config a change touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Change {
    /// Zones, allow lists, content rules changed.
    pub policy: bool,
    /// Anything else changed.
    pub other: bool,
}

/// Splits a config's TOML into (policy part, the rest).
fn split(text: &str) -> Option<(toml::Table, toml::Table)> {
    let mut rest: toml::Table = toml::from_str(text).ok()?;
    let mut policy = toml::Table::new();
    for t in POLICY_TABLES {
        if let Some(v) = rest.remove(*t) {
            policy.insert((*t).to_owned(), v);
        }
    }
    for (table, keys) in POLICY_TABLE_KEYS {
        let Some(toml::Value::Table(t)) = rest.get_mut(*table) else {
            continue;
        };
        let mut p = toml::Table::new();
        for k in *keys {
            if let Some(v) = t.remove(*k) {
                p.insert((*k).to_owned(), v);
            }
        }
        policy.insert((*table).to_owned(), toml::Value::Table(p));
    }
    for (table, keys) in POLICY_KEYS {
        let Some(toml::Value::Array(items)) = rest.get_mut(*table) else {
            continue;
        };
        let mut taken = Vec::new();
        for item in items.iter_mut() {
            let mut p = toml::Table::new();
            if let toml::Value::Table(t) = item {
                // The name identifies the entry in both halves.
                if let Some(n) = t.get("name").or_else(|| t.get("listen")) {
                    p.insert("id".into(), n.clone());
                }
                for k in *keys {
                    if let Some(v) = t.remove(*k) {
                        p.insert((*k).to_owned(), v);
                    }
                }
            }
            taken.push(toml::Value::Table(p));
        }
        policy.insert((*table).to_owned(), toml::Value::Array(taken));
    }
    Some((policy, rest))
}

/// What changed from `old` to `new` (both TOML). Text that does not parse
/// counts as changed everywhere.
pub fn classify_change(old: &str, new: &str) -> Change {
    match (split(old), split(new)) {
        (Some((p0, r0)), Some((p1, r1))) => Change {
            policy: p0 != p1,
            other: r0 != r1,
        },
        _ => Change {
            policy: true,
            other: true,
        },
    }
}

/// Whether `TABLE.KEY` (a key of a table or of an array of tables' entry)
/// is policy, as [`classify_change`] decides.
fn is_policy_key(table: &str, key: &str) -> bool {
    POLICY_TABLES.contains(&table)
        || POLICY_KEYS
            .iter()
            .chain(POLICY_TABLE_KEYS)
            .any(|(t, ks)| *t == table && ks.contains(&key))
}

/// Every key of a config as a path (`uplink.heartbeat`, `service[pension].allow`,
/// an entry named by its `name`, else its `listen`, else its position) with
/// its value, and the table it belongs to.
fn flatten(t: &toml::Table) -> std::collections::BTreeMap<String, (String, String, toml::Value)> {
    type Flat = std::collections::BTreeMap<String, (String, String, toml::Value)>;
    let mut out = Flat::new();
    let table = |out: &mut Flat, name: &str, entry: &str, t: &toml::Table| {
        for (k, v) in t {
            out.insert(
                format!("{name}{entry}.{k}"),
                (name.to_owned(), k.clone(), v.clone()),
            );
        }
    };
    for (name, v) in t {
        match v {
            toml::Value::Table(t) => table(&mut out, name, "", t),
            toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
                for (i, item) in items.iter().enumerate() {
                    let Some(t) = item.as_table() else { continue };
                    let id = t
                        .get("name")
                        .or_else(|| t.get("listen"))
                        .and_then(toml::Value::as_str)
                        .map_or_else(|| i.to_string(), str::to_owned);
                    table(&mut out, name, &format!("[{id}]"), t);
                }
            }
            other => {
                out.insert(name.clone(), (name.clone(), String::new(), other.clone()));
            }
        }
    }
    out
}

/// The keys a change from `old` to `new` touches, split into (policy, other),
/// each as paths like `service[pension].allow`, so a refusal can say what
/// made a file policy. Text that does not parse: `(the whole file)` on both.
pub fn changed_keys(old: &str, new: &str) -> (Vec<String>, Vec<String>) {
    let (Ok(a), Ok(b)) = (old.parse::<toml::Table>(), new.parse::<toml::Table>()) else {
        let whole = vec!["(the whole file)".to_owned()];
        return (whole.clone(), whole);
    };
    let (a, b) = (flatten(&a), flatten(&b));
    let (mut policy, mut other) = (Vec::new(), Vec::new());
    // Every path of either side once, in order (both maps are sorted).
    let paths: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for path in paths {
        let (x, y) = (a.get(path), b.get(path));
        let Some((table, key, _)) = x.or(y) else {
            continue;
        };
        if x.map(|x| &x.2) == y.map(|y| &y.2) {
            continue;
        }
        if is_policy_key(table, key) {
            policy.push(path.clone());
        } else {
            other.push(path.clone());
        }
    }
    (policy, other)
}

// ---------------------------------------------------------------------------
// Certificates and liveness

/// Milliseconds from `now_ms` until a certificate valid from `not_before_ms` to
/// `not_after_ms` should be renewed: at two thirds of its lifetime, minus up to
/// a tenth of it of jitter (`r` in `[0, 1)`), so a fleet enrolled together does
/// not renew together. Zero when that moment has passed.
pub fn renew_in_ms(not_before_ms: i64, not_after_ms: i64, now_ms: i64, r: f64) -> i64 {
    let life = (not_after_ms - not_before_ms).max(0);
    let jitter = (life as f64 / 10.0 * r.clamp(0.0, 1.0)) as i64;
    let at = not_before_ms + life * 2 / 3 - jitter;
    (at - now_ms).max(0)
}

/// Whether a device counts as online: connected, and a heartbeat within three
/// intervals.
pub fn online(
    connected: bool,
    last_heartbeat_ms: Option<i64>,
    interval_s: u64,
    now_ms: i64,
) -> bool {
    let window = 3 * i64::try_from(interval_s.max(1)).unwrap_or(i64::MAX / 4_000) * 1_000;
    connected && last_heartbeat_ms.is_some_and(|t| now_ms - t <= window)
}

// ---------------------------------------------------------------------------
// Audit export

/// First line of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportHeader {
    /// `gw-audit-export/1`.
    pub format: String,
    /// The device whose chain this is.
    pub device: String,
    /// The record before the first exported one: its sequence number and hash
    /// (the chain is checked from there).
    pub anchor_seq: u64,
    /// Hex.
    pub anchor_hash: String,
    /// The chain's head at the hub when exported: the last record's number and
    /// hash; every exported record links up to it.
    pub head_seq: u64,
    /// Hex.
    pub head_hash: String,
    /// Whether the hub found the device's chain continuous when collecting it.
    pub continuous: bool,
    /// When the hub wrote the export (Unix ms).
    #[serde(default)]
    pub exported_ms: i64,
    /// The hub that signed it.
    #[serde(default)]
    pub signed_by: Option<String>,
    /// That hub's certificate (PEM), to check against the CA.
    #[serde(default)]
    pub hub_cert_pem: Option<String>,
    /// ECDSA P-256 signature (hex, ASN.1) over [`signed_message`].
    #[serde(default)]
    pub signature: Option<String>,
}

/// What the hub signs: every header field but the certificate and the
/// signature, so the head (and with it every record, through the chain) cannot
/// be changed, or the export cut short, without the hub's key.
pub fn signed_message(h: &ExportHeader) -> Vec<u8> {
    format!(
        "{EXPORT_FORMAT}\0{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}",
        h.device,
        h.anchor_seq,
        h.anchor_hash,
        h.head_seq,
        h.head_hash,
        h.continuous,
        h.exported_ms,
        h.signed_by.as_deref().unwrap_or("")
    )
    .into_bytes()
}

/// The header of an export (its first line).
///
/// # Errors
/// When the first line is not a header.
pub fn export_header(text: &str) -> Result<ExportHeader, ExportError> {
    let line = text
        .lines()
        .next()
        .ok_or_else(|| ExportError::Header("the file is empty".into()))?;
    serde_json::from_str(line).map_err(|e| ExportError::Header(e.to_string()))
}

/// The export format's name.
pub const EXPORT_FORMAT: &str = "gw-audit-export/1";

/// What an intact export holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportSummary {
    /// The device.
    pub device: String,
    /// Records checked.
    pub records: u64,
    /// First and last sequence numbers.
    pub first_seq: u64,
    /// Last.
    pub last_seq: u64,
}

/// Why an export does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// The first line is not a header.
    #[error("line 1: not a gw-audit-export/1 header: {0}")]
    Header(String),
    /// A line is not a record.
    #[error("line {line}: not an audit record: {message}")]
    Line {
        /// 1-based.
        line: usize,
        /// Why.
        message: String,
    },
    /// A record belongs to another device.
    #[error("line {line}: record {seq} belongs to {device}, not to this export's device")]
    Device {
        /// 1-based.
        line: usize,
        /// Its number.
        seq: u64,
        /// Its device.
        device: String,
    },
    /// The chain is broken.
    #[error("line {line}: {cause}")]
    Broken {
        /// 1-based.
        line: usize,
        /// The break.
        cause: audit::Break,
    },
    /// The export ends before the head.
    #[error("the export ends early: {0}")]
    Truncated(audit::Break),
    /// The hub had found the chain broken when it collected it.
    #[error("the hub found this device's chain broken when it collected it")]
    NotContinuous,
}

/// Checks an export offline: every record's hash, its link to the one before,
/// from the anchor to the head the header names.
///
/// # Errors
/// The first problem found, with its line.
pub fn verify_export(text: &str) -> Result<ExportSummary, ExportError> {
    let header = export_header(text)?;
    let mut lines = text.lines();
    lines.next();
    if header.format != EXPORT_FORMAT {
        return Err(ExportError::Header(format!("format {:?}", header.format)));
    }
    let (Some(anchor), Some(head)) = (
        audit::from_hex(&header.anchor_hash),
        audit::from_hex(&header.head_hash),
    ) else {
        return Err(ExportError::Header("a hash is not 64 hex digits".into()));
    };
    let mut v = audit::Verifier::new(header.anchor_seq, anchor);
    let (mut first, mut last) = (0, 0);
    for (i, l) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let line = i + 2;
        let record: Record = serde_json::from_str(l).map_err(|e| ExportError::Line {
            line,
            message: e.to_string(),
        })?;
        if record.event.device != header.device {
            return Err(ExportError::Device {
                line,
                seq: record.seq,
                device: record.event.device,
            });
        }
        v.push(&record)
            .map_err(|cause| ExportError::Broken { line, cause })?;
        if first == 0 {
            first = record.seq;
        }
        last = record.seq;
    }
    let records = v
        .finish(header.head_seq, &head)
        .map_err(ExportError::Truncated)?;
    if !header.continuous {
        return Err(ExportError::NotContinuous);
    }
    Ok(ExportSummary {
        device: header.device,
        records,
        first_seq: first,
        last_seq: last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Event;
    use proptest::prelude::*;

    #[test]
    fn changed_keys_name_what_made_a_change_policy() {
        let old = "[node]\nid = \"a\"\n[uplink]\nhubs = [\"h:1\"]\nheartbeat = \"10s\"\n\
                   [[service]]\nname = \"pension\"\nallow = [\"x\"]\nbandwidth = \"1M\"\n\
                   [[service]]\nname = \"tax\"\nallow = [\"y\"]\n";
        let new = old
            .replace("allow = [\"y\"]", "allow = [\"y\", \"z\"]")
            .replace("10s", "5s");
        assert_eq!(
            changed_keys(old, &new),
            (
                vec!["service[tax].allow".to_owned()],
                vec!["uplink.heartbeat".to_owned()]
            )
        );
        let c = classify_change(old, &new);
        assert!(c.policy && c.other);
        let zone = format!("{old}[[zone]]\nname = \"legacy-a\"\nlevel = 2\n");
        assert_eq!(
            changed_keys(old, &zone).0,
            vec![
                "zone[legacy-a].level".to_owned(),
                "zone[legacy-a].name".to_owned()
            ]
        );
        assert_eq!(
            changed_keys(old, "not toml ===").0,
            vec!["(the whole file)".to_owned()]
        );
        assert_eq!(changed_keys(old, old), (vec![], vec![]));
    }

    #[test]
    fn roles_are_separated() {
        use Action as A;
        let all = [
            A::TokenCreate,
            A::TokenReplace,
            A::DevicesRead,
            A::Command,
            A::ConfigPushOther,
            A::ConfigPushPolicy,
            A::Revoke,
            A::AuditRead,
            A::ConsumerCreate,
            A::ConsumerGrant,
            A::ConsumerRevoke,
        ];
        let may = |r| all.iter().filter(|a| allowed(r, **a)).count();
        assert_eq!(may(AdminRole::Audit), 1);
        for a in all {
            // No write action is shared by two roles.
            let holders = [AdminRole::System, AdminRole::Security, AdminRole::Audit]
                .into_iter()
                .filter(|r| allowed(*r, a))
                .count();
            if a != A::DevicesRead {
                assert_eq!(holders, 1, "{a:?}");
            }
        }
        assert!(!allowed(AdminRole::System, A::Revoke));
        assert!(!allowed(AdminRole::System, A::ConfigPushPolicy));
        assert!(!allowed(AdminRole::Security, A::TokenCreate));
        assert!(!allowed(AdminRole::System, A::TokenReplace));
        assert!(!allowed(AdminRole::Audit, A::DevicesRead));
        // Who may read a department's data is policy.
        assert!(!allowed(AdminRole::System, A::ConsumerGrant));
        assert!(allowed(AdminRole::Security, A::ConsumerGrant));
    }

    #[test]
    fn secrets_parse_and_digest() {
        let s = Secret {
            kind: TOKEN_KIND,
            owner: "jl-gat-0001".into(),
            secret: "ab".repeat(32),
        };
        let text = s.to_text();
        assert_eq!(Secret::parse(TOKEN_KIND, &text), Some(s.clone()));
        assert_eq!(Secret::parse(CREDENTIAL_KIND, &text), None);
        assert_eq!(Secret::parse(TOKEN_KIND, &text[..text.len() - 1]), None);
        assert_eq!(s.digest().len(), 64);
        assert_ne!(s.digest(), s.secret);
    }

    const BASE: &str = r#"
[node]
id = "e1"
role = "edge"
state_dir = "/x"

[[zone]]
name = "lab"
level = 3

[[service]]
name = "web"
zone = "lab"
target = "10.0.0.1:80"
allow = ["extranet"]

[admin]
listen = "127.0.0.1:9600"
"#;

    #[test]
    fn changes_are_classified() {
        let same = classify_change(BASE, BASE);
        assert_eq!(same, Change::default());
        let other = BASE.replace("9600", "9700");
        assert_eq!(
            classify_change(BASE, &other),
            Change {
                policy: false,
                other: true
            }
        );
        // Where a service's connections go is policy (issue 14).
        let target = BASE.replace("10.0.0.1:80", "10.0.0.2:80");
        assert_eq!(
            classify_change(BASE, &target),
            Change {
                policy: true,
                other: false
            }
        );
        let hubs = BASE.replace("[admin]", "[uplink]\nhubs = [\"h2:7443\"]\n\n[admin]");
        let hubs2 = hubs.replace("h2:7443", "evil:7443");
        assert_eq!(
            classify_change(&hubs, &hubs2),
            Change {
                policy: true,
                other: false
            }
        );
        let allow = BASE.replace("[\"extranet\"]", "[\"extranet\", \"e9\"]");
        assert_eq!(
            classify_change(BASE, &allow),
            Change {
                policy: true,
                other: false
            }
        );
        let level = BASE.replace("level = 3", "level = 2");
        assert_eq!(
            classify_change(BASE, &level),
            Change {
                policy: true,
                other: false
            }
        );
        let both = level.replace("9600", "9700");
        assert_eq!(
            classify_change(BASE, &both),
            Change {
                policy: true,
                other: true
            }
        );
        assert_eq!(
            classify_change(BASE, "not = [toml"),
            Change {
                policy: true,
                other: true
            }
        );
    }

    #[test]
    fn renewal_at_two_thirds_with_jitter() {
        assert_eq!(renew_in_ms(0, 90_000, 0, 0.0), 60_000);
        assert_eq!(renew_in_ms(0, 90_000, 0, 0.5), 55_500);
        assert_eq!(renew_in_ms(0, 90_000, 70_000, 0.0), 0);
        assert_eq!(renew_in_ms(0, 0, 5, 0.5), 0);
    }

    #[test]
    fn online_needs_a_recent_heartbeat() {
        assert!(online(true, Some(0), 10, 30_000));
        assert!(!online(true, Some(0), 10, 30_001));
        assert!(!online(false, Some(0), 10, 1));
        assert!(!online(true, None, 10, 1));
    }

    fn chain(n: u64) -> Vec<Record> {
        let mut prev = audit::GENESIS;
        (1..=n)
            .map(|i| {
                let r = Record::chain(
                    i,
                    Event {
                        time_ms: i as i64,
                        device: "e1".into(),
                        subject: "s".into(),
                        object: "o".into(),
                        event: "relay.open".into(),
                        outcome: "allow".into(),
                        rule: "R0.allow".into(),
                        detail: String::new(),
                    },
                    prev,
                );
                prev = r.hash;
                r
            })
            .collect()
    }

    fn export(records: &[Record], from: usize) -> String {
        let anchor = if from == 0 {
            audit::GENESIS
        } else {
            records[from - 1].hash
        };
        let last = records.last().expect("records");
        let mut s = serde_json::to_string(&ExportHeader {
            format: EXPORT_FORMAT.into(),
            device: "e1".into(),
            anchor_seq: from as u64,
            anchor_hash: audit::to_hex(&anchor),
            head_seq: last.seq,
            head_hash: audit::to_hex(&last.hash),
            continuous: true,
            exported_ms: 0,
            signed_by: None,
            hub_cert_pem: None,
            signature: None,
        })
        .expect("json");
        for r in &records[from..] {
            s.push('\n');
            s += &serde_json::to_string(r).expect("json");
        }
        s
    }

    #[test]
    fn exports_verify_and_tampering_is_found() {
        let records = chain(10);
        let good = export(&records, 3);
        let summary = verify_export(&good).expect("intact");
        assert_eq!(
            (summary.records, summary.first_seq, summary.last_seq),
            (7, 4, 10)
        );

        let edited = good.replacen("\"outcome\":\"allow\"", "\"outcome\":\"deny\"", 1);
        assert!(matches!(
            verify_export(&edited),
            Err(ExportError::Broken { line: 2, .. })
        ));
        let mut lines: Vec<&str> = good.lines().collect();
        lines.remove(4);
        assert!(matches!(
            verify_export(&lines.join("\n")),
            Err(ExportError::Broken { .. })
        ));
        let truncated: Vec<&str> = good.lines().take(good.lines().count() - 1).collect();
        assert!(matches!(
            verify_export(&truncated.join("\n")),
            Err(ExportError::Truncated(_))
        ));
        assert!(verify_export("").is_err());
    }

    proptest! {
        #[test]
        fn messages_round_trip(v in any::<u64>(), text in ".*", id in any::<u64>()) {
            for m in [
                Message::ConfigOffer { version: v, text: text.clone() },
                Message::CommandResult { id, ok: true, output: text.clone() },
                Message::ConfigResult { offered: v, applied: id, outcome: ConfigOutcome::Refused { errors: vec![text.clone()] } },
                Message::Heartbeat(Status { version: text.clone(), uptime_s: v, ..Status::default() }),
                // Audit records travel in their own JSON form (hashes in hex).
                Message::AuditBatch { records: chain(3).into_iter().map(|mut r| { r.event.detail = text.clone(); r }).collect() },
            ] {
                let bytes = encode(&m);
                let n = body_len(bytes[..4].try_into().expect("prefix")).expect("len");
                prop_assert_eq!(n, bytes.len() - 4);
                prop_assert_eq!(decode::<Message>(&bytes[4..]).expect("decode"), m);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Message>(&bytes);
            let _ = decode::<EnrollRequest>(&bytes);
            let _ = decode::<EnrollAnswer>(&bytes);
            let _ = verify_export(&String::from_utf8_lossy(&bytes));
        }
    }
}
