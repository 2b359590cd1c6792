//! Pure logic of the gateway appliance: no sockets, no files, no clock, no tokio.
//!
//! - [`config`]: the configuration users write, parsed from TOML into raw serde
//!   structs and compiled into checked types, with every mistake located.
//! - [`check`]: [`check::load`], a config as the daemon accepts it: compiled,
//!   then the boundary rules applied.
//! - [`policy`]: the boundary rules (GB/T 22239-2019 levels, secrecy rules) with two
//!   faces: [`policy::check_config`] at config time and [`policy::Policy::decide`]
//!   at run time; [`rule`]: the rules' stable ids.
//! - [`audit`]: the canonical encoding and hash chaining of audit records.
//! - [`wire`]: the tunnel's frames; [`sniff`]: application-protocol checks,
//!   [`urlpath`]: URL paths as a server reads them (for `http_allow`);
//!   [`backoff`]: reconnect delays.
//! - [`fleet`]: central management: control messages, operator roles, which
//!   config sections are policy, renewal timing, the audit export check.
//! - [`producers`]: producers' tokens for an ingest with `auth = "token"`.
//! - [`selector`]: device labels and the selectors that pick devices by them;
//!   [`template`]: config templates rendered strictly for one device.
//! - [`summary`]: what a checked configuration will bridge, for `gatewayd check`.
//! - [`detect`]: intrusion detection: per-source leaky buckets into
//!   detections, bans with escalation, alarms de-duplicated.
//! - [`table`]: capped tables keyed by what peers send; [`hex`]: hashes as text.
//! - [`refusals`]: refusals of unauthenticated peers summarised for the audit,
//!   and peer-supplied strings made safe to record.
//! - [`firmware`]: update bundles: the minisign-signed manifest, chunk
//!   hashes, and whether a box may install a version (no downgrade past a
//!   security fix, no clock read).
//!
//! Time always comes in as a parameter ([`units::Date`], Unix milliseconds).
#![forbid(unsafe_code)]

pub mod audit;
pub mod backoff;
pub mod check;
pub mod config;
pub mod content;
pub mod detect;
pub mod diag;
pub mod expiry;
pub mod firewall;
pub mod firmware;
pub mod fleet;
pub mod hex;
pub mod policy;
pub mod producers;
pub mod rate;
pub mod refusals;
pub mod rollout;
pub mod rule;
pub mod selector;
pub mod sniff;
pub mod summary;
pub mod table;
pub mod template;
pub mod units;
pub mod urlpath;
pub mod wire;
