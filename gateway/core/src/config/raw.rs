//! Raw serde structs: the shape of the TOML file, nothing more.
//!
//! Every struct denies unknown keys. Values that need checking (addresses,
//! networks, sizes, enums) stay strings here, wrapped in [`Spanned`] so that the
//! compiler in [`super::compile`] can report each mistake at its line and column
//! and keep going to the next one.

#![allow(missing_docs)] // field names are the documented TOML keys (docs/config.md)

use serde::Deserialize;
use toml::Spanned;

/// A spanned string.
pub type S = Spanned<String>;

/// `[node]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    pub id: S,
    pub role: S,
    pub state_dir: S,
    pub user: Option<S>,
    pub max_http_connections: Option<Spanned<i64>>,
    pub max_http_connections_per_source: Option<Spanned<i64>>,
}

/// `[[zone]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawZone {
    pub name: S,
    pub kind: S,
    pub classified: Option<Spanned<bool>>,
    pub level: Spanned<i64>,
    pub networks: Spanned<Vec<S>>,
    pub interfaces: Option<Spanned<Vec<S>>>,
    pub assessment: Option<Spanned<RawAssessment>>,
}

/// `assessment = { id = "...", valid_until = 2027-03-31 }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAssessment {
    pub id: S,
    pub valid_until: Spanned<toml::value::Datetime>,
}

/// `[uplink]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUplink {
    pub hubs: Spanned<Vec<S>>,
    pub ca: S,
    pub cert: S,
    pub key: S,
    pub heartbeat: Option<S>,
    pub config_try: Option<S>,
}

/// `[[service]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: S,
    pub zone: S,
    pub protocol: Option<S>,
    pub target: S,
    pub app_protocol: Option<S>,
    pub allow: Spanned<Vec<S>>,
    pub max_connections: Option<Spanned<i64>>,
    pub bandwidth: Option<S>,
    pub idle_timeout: Option<S>,
    pub allow_upgrade: Option<Spanned<bool>>,
    pub sni: Option<Spanned<Vec<S>>>,
    pub http_allow: Option<Spanned<Vec<Spanned<RawHttpAllow>>>>,
    pub rtp_payload_types: Option<Spanned<Vec<Spanned<i64>>>>,
    pub mpegts_pids: Option<Spanned<Vec<Spanned<i64>>>>,
    pub max_violations: Option<Spanned<i64>>,
    pub pg_users: Option<Spanned<Vec<S>>>,
    pub pg_databases: Option<Spanned<Vec<S>>>,
    pub pg_max_message: Option<S>,
    pub pg_read_only: Option<Spanned<bool>>,
    pub pg_tls: Option<S>,
    pub pg_cert: Option<S>,
    pub pg_key: Option<S>,
}

/// An entry of `[[service]] http_allow`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpAllow {
    pub methods: Option<Spanned<Vec<S>>>,
    pub paths: Option<Spanned<Vec<S>>>,
}

/// `[[access]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccess {
    pub listen: S,
    pub zone: S,
    pub service: S,
    pub protocol: Option<S>,
}

/// `[[channel]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawChannel {
    pub name: S,
    pub zone: S,
    pub priority: Option<Spanned<i64>>,
    pub ttl: Option<S>,
    pub max_bytes: Option<S>,
    pub when_full: Option<S>,
    pub formats: Option<Spanned<Vec<S>>>,
    pub max_record_bytes: Option<S>,
    pub deliver_to: Option<S>,
    pub one_way: Option<Spanned<bool>>,
    pub deny_keywords: Option<Spanned<Vec<S>>>,
    pub bandwidth: Option<S>,
    pub ttl_pauses_offline: Option<Spanned<bool>>,
    pub scan: Option<Spanned<bool>>,
}

/// `[[ingest]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIngest {
    pub zone: S,
    pub listen: S,
    pub auth: Option<S>,
    pub tokens: Option<S>,
    pub client_ca: Option<S>,
    pub cert: Option<S>,
    pub key: Option<S>,
}

/// `[audit]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub retention_days: Option<Spanned<i64>>,
}

/// `[detect]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDetect {
    pub enabled: Option<Spanned<bool>>,
    pub refusals: Option<S>,
    pub scan: Option<S>,
    pub handshake_failures: Option<S>,
    pub protocol_violations: Option<S>,
    pub empty_connections: Option<S>,
    pub connections_per_second: Option<Spanned<i64>>,
    pub datagrams_per_second: Option<Spanned<i64>>,
    pub handshakes_in_progress: Option<Spanned<i64>>,
    pub content_refusals: Option<S>,
    pub ban: Option<S>,
    pub scan_ban: Option<S>,
    pub repeat_ban: Option<S>,
    pub never_ban: Option<Spanned<Vec<S>>>,
}

/// `[scan]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawScan {
    pub clamd: S,
    pub timeout: Option<S>,
    pub max_db_age: Option<S>,
    pub database_dir: Option<S>,
}

/// `[alarms]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlarms {
    pub min_severity: Option<S>,
    pub down_after: Option<S>,
    pub syslog: Option<S>,
    pub syslog_ca: Option<S>,
    pub syslog_cert: Option<S>,
    pub syslog_key: Option<S>,
    pub webhook: Option<S>,
    pub webhook_ca: Option<S>,
    pub webhook_token_file: Option<S>,
}

/// `[update]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpdate {
    pub window: Option<S>,
    pub trial: Option<S>,
    pub updater_state: Option<S>,
    pub handoff: Option<S>,
}

/// `[admin]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<S>,
}

/// `[hub]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHub {
    pub listen: S,
    pub api: S,
    pub ca_cert: S,
    pub ca_key: S,
    pub box_ca: Option<S>,
    pub firmware_keys: Option<Spanned<Vec<S>>>,
    pub firmware_rate: Option<S>,
    pub firmware_rate_per_box: Option<S>,
    pub cert: S,
    pub key: S,
    pub cert_lifetime: Option<S>,
    pub max_token_lifetime: Option<S>,
    pub sink_retention: Option<S>,
    pub sink: Option<S>,
    pub ops: Option<S>,
    pub registry: Option<S>,
    pub store: Option<S>,
    pub postgres: Option<Spanned<RawPgStore>>,
}

/// `[hub.postgres]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPgStore {
    pub connect: S,
    pub ca: Option<S>,
    pub password_file: Option<S>,
    pub password_env: Option<S>,
    /// Refused with a hint (never in the config), not as an unknown key.
    pub password: Option<S>,
    pub pool: Option<Spanned<i64>>,
}

/// `[[publish]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPublish {
    pub service: S,
    pub zone: S,
    pub listen: S,
    pub protocol: Option<S>,
}
