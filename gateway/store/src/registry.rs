//! The hub's registry of its fleet, behind a trait the daemon calls: operator
//! accounts (one role each), single-use enrollment tokens, enrolled devices
//! with their certificate expiry and revocation, the last heartbeat, pushed
//! config versions and what each device reported applying, and every device's
//! audit chain as collected. [`crate::sqlite::SqliteRegistry`] is the embedded
//! engine.
//!
//! Invariants every engine keeps (the SQLite engine's tests check them):
//! - Secrets are stored only as digests (SHA-256 of the whole token text).
//! - A token is redeemed at most once, only for its device, only before its
//!   expiry, only while the device is not revoked; redeeming and recording the
//!   device happen in one transaction, with the certificate's signing.
//! - An account name holds exactly one role; adding it again is refused.
//! - Config versions of a device only grow; a push gets `max + 1`.
//! - Collected audit records of a device are accepted only if they continue its
//!   chain; otherwise nothing is stored and the device is marked broken.
//!
//! Cancel safety: no method is cancel-safe in the sense of "dropped means not
//! done": an engine finishes an operation it started. Callers that give up on
//! a write must read again before they assume either outcome.

use std::sync::Arc;

use gateway_core::audit::{Hash, Record, Verifier};
use gateway_core::detect::Alarm;
use gateway_core::fleet::AdminRole;

use crate::error::{StoreError, StoreFuture};

/// A registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The engine failed: [`StoreError::Unavailable`] (retry later) or
    /// [`StoreError::Refused`].
    #[error("fleet registry: {0}")]
    Store(#[from] StoreError),
    /// An account of that name exists.
    #[error(
        "account {0:?} exists; an account holds exactly one role, make another account for another role"
    )]
    AccountExists(String),
    /// The token is unknown, used, expired, or for another device.
    #[error("{0}")]
    Token(&'static str),
    /// The device is revoked.
    #[error(
        "device {0} is revoked; to bring it back, the security administrator makes a token with gatewayctl token create --device {0} --replace"
    )]
    Revoked(String),
    /// A device is held by another active rollout.
    #[error(
        "device {device} is in rollout {rollout}, which is still active; a device is in at most one active rollout (finish, abort or roll that one back first)"
    )]
    InRollout {
        /// The device.
        device: String,
        /// The rollout holding it.
        rollout: String,
    },
    /// A consumer of that name exists (or existed: names are not reused).
    #[error("consumer {0:?} exists; choose another name (a revoked consumer's name is not reused)")]
    ConsumerExists(String),
    /// The caller's own step (signing a certificate) failed.
    #[error("{0}")]
    Refused(String),
}

/// Whether a device revoked at `revoked_ms` (if it is) may enroll on a
/// token that `replaces` and was made at `token_created_ms`: only on a
/// replacing token made after the revocation (tokens made before it are void).
pub fn may_come_back(revoked_ms: Option<i64>, replaces: bool, token_created_ms: i64) -> bool {
    revoked_ms.is_none_or(|r| replaces && token_created_ms > r)
}

/// One device as the hub knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    /// The id.
    pub id: String,
    /// Enrolled at (Unix ms; 0 when it connected with an offline certificate).
    pub enrolled_ms: i64,
    /// The last certificate's expiry.
    pub not_after_ms: Option<i64>,
    /// Revoked at.
    pub revoked_ms: Option<i64>,
    /// The last heartbeat (Unix ms, JSON).
    pub status: Option<(i64, String)>,
    /// The newest pushed version.
    pub desired: Option<u64>,
    /// What it reported: version in force, last result (JSON), when.
    pub applied: Option<(u64, String, i64)>,
    /// Collected audit: head sequence number, and why the chain is broken.
    pub audit: Option<(u64, Option<String>)>,
}

/// What a registry knows of a device besides its certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// The last heartbeat (Unix ms, JSON).
    pub status: Option<(i64, String)>,
    /// The newest pushed version.
    pub desired: Option<u64>,
    /// What it reported: version, last result (JSON), when.
    pub applied: Option<(u64, String, i64)>,
    /// Collected audit: head, and why the chain is broken.
    pub audit: Option<(u64, Option<String>)>,
}

impl DeviceRow {
    /// A device known only by id (every field empty).
    pub fn unknown(id: &str) -> DeviceRow {
        DeviceRow {
            id: id.to_owned(),
            enrolled_ms: 0,
            not_after_ms: None,
            revoked_ms: None,
            status: None,
            desired: None,
            applied: None,
            audit: None,
        }
    }

    /// The row of `id` from its certificate's (enrolled, expiry, revoked) and
    /// the rest; `None` when the registry knows nothing of it but collected
    /// audit.
    pub fn assemble(
        id: &str,
        cert: Option<(i64, Option<i64>, Option<i64>)>,
        s: DeviceState,
    ) -> Option<DeviceRow> {
        if cert.is_none() && s.status.is_none() && s.desired.is_none() && s.applied.is_none() {
            return None;
        }
        let (enrolled_ms, not_after_ms, revoked_ms) = cert.unwrap_or((0, None, None));
        Some(DeviceRow {
            id: id.to_owned(),
            enrolled_ms,
            not_after_ms,
            revoked_ms,
            status: s.status,
            desired: s.desired,
            applied: s.applied,
            audit: s.audit,
        })
    }
}

impl RegistryError {
    /// Whether trying again later may succeed (the engine was unavailable).
    pub fn retry_later(&self) -> bool {
        matches!(self, RegistryError::Store(StoreError::Unavailable(_)))
    }
}

/// A registry future: the engine's answer, or why not.
pub type RegistryFuture<'a, T> = StoreFuture<'a, T, RegistryError>;

/// Signs the certificate of a device being enrolled, inside the enrollment's
/// transaction: returns the certificate (PEM), its expiry (Unix ms) and its
/// serial (hex).
pub type SignCertificate = Box<dyn FnOnce() -> Result<(String, i64, String), RegistryError> + Send>;

/// Whether a device may open a tunnel with the certificate it presents: one
/// live certificate per device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Its latest certificate.
    Current,
    /// The certificate it renewed from, during the handover.
    Handover {
        /// The serial of its latest certificate.
        current: String,
    },
    /// The first certificate seen for a device the hub did not enroll (made
    /// offline): it is the device's from now on.
    FirstSeen,
    /// Refused: a certificate older than its latest (replaced by re-enrollment,
    /// or renewed and handed over).
    Superseded {
        /// The serial of its latest certificate.
        current: String,
    },
    /// Refused: the device is revoked.
    Revoked,
}

/// A device's collected audit for export: the anchor (the record before the
/// first one returned), the head, and the records between.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditExport {
    /// Sequence number of the record before the first one returned.
    pub anchor_seq: u64,
    /// Its hash (hex).
    pub anchor_hash: String,
    /// The newest collected record's sequence number.
    pub head_seq: u64,
    /// Its hash (hex).
    pub head_hash: String,
    /// Whether the collected chain has no break.
    pub continuous: bool,
    /// The records, in order.
    pub records: Vec<Record>,
}

/// The hub's registry. Every method is one transaction (or one statement) of
/// the engine: hubs sharing one engine see each other's writes. Arguments are
/// owned, so an engine can move them to its own thread or connection.
pub trait Registry: Send + Sync {
    /// Adds an operator account with `role`, identified by a credential digest.
    /// [`RegistryError::AccountExists`] when the name is taken.
    fn add_account(&self, account: NewAccount) -> RegistryFuture<'_, ()>;
    /// The accounts: (name, role).
    fn accounts(&self) -> RegistryFuture<'_, Vec<(String, String)>>;
    /// The account (name, role) a credential digest belongs to.
    fn account(&self, digest: String) -> RegistryFuture<'_, Option<(String, AdminRole)>>;
    /// Stores a new enrollment token; [`RegistryError::Revoked`] for a revoked
    /// device.
    fn create_token(&self, token: NewToken) -> RegistryFuture<'_, ()>;
    /// Redeems the token for its device and lets `sign` make its certificate;
    /// both are committed together, or neither. Returns the certificate.
    fn enroll(&self, enrollment: Enrollment, sign: SignCertificate) -> RegistryFuture<'_, String>;
    /// Records the expiry of `device`'s newest certificate.
    fn set_cert(&self, device: String, not_after_ms: i64) -> RegistryFuture<'_, ()>;
    /// A renewed certificate (serial, expiry) is `device`'s one; the one it
    /// connects with stays valid for new connections until it first connects
    /// with the new one, or `handover_ms` at most.
    fn renewed(&self, renewal: Renewal) -> RegistryFuture<'_, ()>;
    /// Whether `device` may open a tunnel with the certificate `serial`.
    fn admit(&self, device: String, serial: String, now_ms: i64) -> RegistryFuture<'_, Admission>;
    /// For each of `ids` the registry knows a certificate of: the serials its
    /// live connections may present (current, and the one renewed from).
    fn live_serials(&self, ids: Vec<String>) -> RegistryFuture<'_, Vec<(String, Vec<String>)>>;
    /// Whether `device` is revoked.
    fn is_revoked(&self, device: String) -> RegistryFuture<'_, bool>;
    /// Which of `ids` are revoked.
    fn revoked_among(&self, ids: Vec<String>) -> RegistryFuture<'_, Vec<String>>;
    /// Every revoked device.
    fn revoked(&self) -> RegistryFuture<'_, Vec<String>>;
    /// Sets and removes labels of `device` (known or not, so a token's
    /// device arrives labelled) in one transaction; its labels after. More
    /// than [`gateway_core::selector::MAX_LABELS`] is [`RegistryError::Refused`].
    fn set_labels(&self, change: LabelChange) -> RegistryFuture<'_, Vec<(String, String)>>;
    /// Every label: (device, key, value), by device and key.
    fn labels(&self) -> RegistryFuture<'_, Vec<(String, String, String)>>;
    /// Revokes `device` (by operator `by`); whether it was not revoked before.
    fn revoke(&self, device: String, by: String, now_ms: i64) -> RegistryFuture<'_, bool>;
    /// Stores `device`'s latest heartbeat (JSON).
    fn heartbeat(&self, device: String, now_ms: i64, json: String) -> RegistryFuture<'_, ()>;
    /// Stores a config version for its device; returns its version number.
    fn push_config(&self, push: ConfigPush) -> RegistryFuture<'_, u64>;
    /// The newest pushed version and its text.
    fn desired(&self, device: String) -> RegistryFuture<'_, Option<(u64, String)>>;
    /// The text of one pushed version.
    fn config_version(&self, device: String, version: u64) -> RegistryFuture<'_, Option<String>>;
    /// What `device` runs as it reported: version and text.
    fn applied(&self, device: String) -> RegistryFuture<'_, Option<(u64, String)>>;
    /// Records what a device runs and its last result.
    fn set_applied(&self, report: AppliedReport) -> RegistryFuture<'_, ()>;
    /// A device connected running `version` with `text`: records it (its
    /// last result kept while it speaks of `version`, else `connected`) and
    /// answers the result it had before and the newest pushed version, in
    /// three statements (each box does this at every connection).
    fn config_connected(&self, c: ConfigConnected) -> RegistryFuture<'_, ConfigSeen>;
    /// Every device the hub knows, by id.
    fn devices(&self) -> RegistryFuture<'_, Vec<DeviceRow>>;
    /// One device.
    fn device(&self, id: String) -> RegistryFuture<'_, Option<DeviceRow>>;
    /// The next audit record wanted from `device`.
    fn audit_next(&self, device: String) -> RegistryFuture<'_, u64>;
    /// Appends collected records, a batch per device, in one transaction
    /// (the hub's coalesced write): for each batch in order, how many were
    /// stored, or the break in its chain (then nothing of that batch is
    /// stored and its device is marked). A store error stores nothing.
    fn append_audits(
        &self,
        batches: Vec<(String, Vec<Record>)>,
    ) -> RegistryFuture<'_, Vec<Result<usize, String>>>;
    /// Collected records of `device` from `since_ms` on, for export.
    fn audit_export(
        &self,
        device: String,
        since_ms: i64,
    ) -> RegistryFuture<'_, Option<AuditExport>>;
    /// Removes collected records older than `before_ms`, keeping each
    /// device's newest, and alarms and change log rows older than it;
    /// returns how many records.
    fn prune_audit(&self, before_ms: i64) -> RegistryFuture<'_, usize>;
    /// Records a new consumer; [`RegistryError::ConsumerExists`] when the
    /// name was ever taken.
    fn add_consumer(&self, consumer: NewConsumer) -> RegistryFuture<'_, ()>;
    /// One consumer.
    fn consumer(&self, name: String) -> RegistryFuture<'_, Option<ConsumerRow>>;
    /// Every consumer, by name.
    fn consumers(&self) -> RegistryFuture<'_, Vec<ConsumerRow>>;
    /// Revokes a consumer: `None` when unknown, else whether it was not
    /// revoked before.
    fn revoke_consumer(
        &self,
        name: String,
        by: String,
        now_ms: i64,
    ) -> RegistryFuture<'_, Option<bool>>;
    /// Keeps intrusion alarms raised by `device` (a hub's own, or taken from
    /// a device's collected and verified audit chain); an alarm already held
    /// (same id) is skipped. Returns how many were new.
    fn add_alarms(&self, device: String, alarms: Vec<Alarm>) -> RegistryFuture<'_, usize>;
    /// Alarms, newest first.
    fn alarms(&self, query: AlarmQuery) -> RegistryFuture<'_, Vec<AlarmRow>>;
    /// Acknowledges alarm `id`: `None` when unknown, else whether it was not
    /// acknowledged before.
    fn ack_alarm(&self, id: String, by: String, now_ms: i64) -> RegistryFuture<'_, Option<bool>>;
    /// Up to `limit` changes after `after`, in order.
    fn changes(&self, after: u64, limit: usize) -> RegistryFuture<'_, Vec<Change>>;
    /// The newest change's id (0 when none): where a starting hub begins.
    fn change_head(&self) -> RegistryFuture<'_, u64>;
    /// Notified when the engine learns of a change (PostgreSQL's `NOTIFY`);
    /// `None` when the engine cannot tell and its changes are polled.
    fn wake(&self) -> Option<Arc<tokio::sync::Notify>>;

    /// Stores many heartbeats (and the certificate expiries they report) in
    /// one transaction: the hub writes them coalesced, once per interval.
    fn heartbeats(&self, beats: Vec<Heartbeat>) -> RegistryFuture<'_, ()>;
    /// One page of devices in id order after `after` that pass `filter`
    /// (the registry's part of a selector), with their labels: one query,
    /// reading only the rows that may match.
    fn devices_page(
        &self,
        after: Option<String>,
        limit: usize,
        filter: gateway_core::selector::Stored,
    ) -> RegistryFuture<'_, DevicesPage>;
    /// Stores a new version of a config template; returns its number.
    fn put_template(&self, t: NewTemplate) -> RegistryFuture<'_, u64>;
    /// A template's version (`None`: the newest).
    fn template(
        &self,
        name: String,
        version: Option<u64>,
    ) -> RegistryFuture<'_, Option<TemplateRow>>;
    /// The newest version of every template.
    fn templates(&self) -> RegistryFuture<'_, Vec<TemplateRow>>;
    /// Sets and removes a device's template variables; its variables after.
    fn set_vars(&self, change: VarsChange) -> RegistryFuture<'_, Vec<(String, String)>>;
    /// The variables of `devices` (all devices when empty): (device, name, value).
    fn vars(&self, devices: Vec<String>) -> RegistryFuture<'_, Vec<(String, String, String)>>;
    /// Stores a new rollout holding `devices`; [`RegistryError::InRollout`]
    /// when one of them is held by another rollout.
    fn create_rollout(&self, r: NewRollout) -> RegistryFuture<'_, ()>;
    /// A rollout.
    fn rollout(&self, id: String) -> RegistryFuture<'_, Option<RolloutRow>>;
    /// Rollouts, newest first (`active`: only those holding devices).
    fn rollouts(&self, active: bool) -> RegistryFuture<'_, Vec<RolloutRow>>;
    /// Replaces a rollout's document if it is still at `rev`: false when
    /// another hub or operator changed it first (read it again).
    fn update_rollout(&self, u: RolloutUpdate) -> RegistryFuture<'_, bool>;

    /// Stores a firmware version's signed manifest (checked by the caller)
    /// and the parts it is to have. The same manifest again is the same
    /// upload resumed: the row as it stands. Another manifest under a stored
    /// version is [`RegistryError::Refused`].
    fn put_firmware(&self, f: NewFirmware) -> RegistryFuture<'_, FirmwareRow>;
    /// The firmware versions, newest upload first (at most 1,000).
    fn firmwares(&self) -> RegistryFuture<'_, Vec<FirmwareRow>>;
    /// A version, with its manifest and signature as uploaded.
    fn firmware(&self, version: String) -> RegistryFuture<'_, Option<StoredFirmware>>;
    /// Stores one part of a version (checked by the caller), over any
    /// stored under that name.
    fn put_firmware_part(&self, part: FirmwarePart) -> RegistryFuture<'_, ()>;
    /// One part's bytes.
    fn firmware_part(&self, version: String, name: String) -> RegistryFuture<'_, Option<Vec<u8>>>;
    /// The names of the parts stored for a version.
    fn firmware_parts(&self, version: String) -> RegistryFuture<'_, Vec<String>>;
    /// Marks a version complete: every part stored and checked whole.
    fn firmware_complete(&self, version: String) -> RegistryFuture<'_, ()>;
}

/// A firmware version to store ([`Registry::put_firmware`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFirmware {
    /// Its version (the manifest's).
    pub version: String,
    /// The manifest's `security_version`.
    pub security_version: u64,
    /// The manifest, as signed.
    pub manifest: String,
    /// Its minisign signature.
    pub signature: String,
    /// How many parts it is to have (root chunks, kernel and initrd parts).
    pub parts: u64,
    /// How many of them are the kernel's, and the initrd's.
    pub boot_parts: [u64; 2],
    /// The account uploading it.
    pub by: String,
    /// When (Unix ms).
    pub now_ms: i64,
}

/// A stored firmware version (without its manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareRow {
    /// Its version.
    pub version: String,
    /// The manifest's `security_version`.
    pub security_version: u64,
    /// How many parts it is to have.
    pub parts: u64,
    /// How many of them are the kernel's, and the initrd's.
    pub boot_parts: [u64; 2],
    /// How many are stored.
    pub stored: u64,
    /// Every part stored and the kernel and initrd checked whole.
    pub complete: bool,
    /// Who uploaded it.
    pub by: String,
    /// When it was first uploaded (Unix ms).
    pub at_ms: i64,
}

/// A stored firmware version with its manifest ([`Registry::firmware`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFirmware {
    /// The version.
    pub row: FirmwareRow,
    /// The manifest, as signed.
    pub manifest: String,
    /// Its minisign signature.
    pub signature: String,
}

/// One part of a firmware version ([`Registry::put_firmware_part`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwarePart {
    /// The version.
    pub version: String,
    /// `root/000012`, `linux/000000`, `initrd/000003`.
    pub name: String,
    /// Its bytes (at most one 1 MiB chunk).
    pub bytes: Vec<u8>,
}

/// Whether an upload of `new` may go on over `stored`: the same manifest
/// and shape resumes it; anything else under that version is refused.
///
/// # Errors
/// [`RegistryError::Refused`], saying what differs.
pub fn same_firmware(
    stored_manifest: &str,
    stored_parts: [u64; 3],
    new: &NewFirmware,
) -> Result<(), RegistryError> {
    if stored_manifest != new.manifest {
        return Err(RegistryError::Refused(format!(
            "version {} is stored with another manifest; a version is uploaded once (give a new build a new version)",
            new.version
        )));
    }
    if stored_parts != [new.parts, new.boot_parts[0], new.boot_parts[1]] {
        return Err(RegistryError::Refused(format!(
            "version {} is stored with {} parts, not {}: its kernel or initrd differs from the upload begun before",
            new.version, stored_parts[0], new.parts
        )));
    }
    Ok(())
}

/// One device's last heartbeat, for [`Registry::heartbeats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The device.
    pub device: String,
    /// When it came (Unix ms).
    pub now_ms: i64,
    /// Its status (JSON).
    pub json: String,
    /// The certificate expiry it reported, when it changed.
    pub not_after_ms: Option<i64>,
}

/// A page of [`Registry::devices_page`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DevicesPage {
    /// The devices, in id order.
    pub rows: Vec<DeviceRow>,
    /// Their labels: (device, key, value).
    pub labels: Vec<(String, String, String)>,
}

/// A template version to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTemplate {
    /// Its name.
    pub name: String,
    /// Its text.
    pub text: String,
    /// The account pushing it.
    pub by: String,
    /// When (Unix ms).
    pub now_ms: i64,
}

/// A stored template version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRow {
    /// Its name.
    pub name: String,
    /// Its version (1, 2, ...).
    pub version: u64,
    /// Its text.
    pub text: String,
    /// Who pushed it.
    pub by: String,
    /// When (Unix ms).
    pub at_ms: i64,
}

/// Variables to set and remove on one device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VarsChange {
    /// The device.
    pub device: String,
    /// (name, value) to set.
    pub set: Vec<(String, String)>,
    /// Names to remove.
    pub remove: Vec<String>,
    /// Remove every variable not set here first.
    pub replace: bool,
}

/// Applies `change` to the variables `now` holds; the result, or why not.
///
/// # Errors
/// A bad name or value, or more variables than a device may have.
pub fn apply_vars(
    mut now: std::collections::BTreeMap<String, String>,
    change: &VarsChange,
) -> Result<Vec<(String, String)>, RegistryError> {
    if change.replace {
        now.clear();
    }
    for k in &change.remove {
        now.remove(k);
    }
    for (k, v) in &change.set {
        gateway_core::template::check_variable(k, v).map_err(RegistryError::Refused)?;
        now.insert(k.clone(), v.clone());
    }
    let max = gateway_core::template::MAX_VARIABLES;
    if now.len() > max {
        return Err(RegistryError::Refused(format!(
            "a device has at most {max} variables; remove some first"
        )));
    }
    Ok(now.into_iter().collect())
}

/// A rollout to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRollout {
    /// Its id.
    pub id: String,
    /// Its document (JSON of `gateway_core::rollout::Rollout`).
    pub json: String,
    /// The devices it holds.
    pub devices: Vec<String>,
    /// When (Unix ms).
    pub now_ms: i64,
}

/// A stored rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutRow {
    /// Its id.
    pub id: String,
    /// Its revision: grows at every update.
    pub rev: u64,
    /// Its document.
    pub json: String,
    /// Whether it holds its devices.
    pub active: bool,
}

/// What an update does with a rollout's hold on its devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Members {
    /// Nothing.
    Keep,
    /// Releases them (the rollout finished or was aborted).
    Release,
    /// Takes them again (a finished rollout rolled back);
    /// [`RegistryError::InRollout`] when another rollout holds one.
    Claim(Vec<String>),
}

/// A compare-and-swap of a rollout's document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutUpdate {
    /// Its id.
    pub id: String,
    /// The revision read.
    pub rev: u64,
    /// The new document.
    pub json: String,
    /// Whether it holds its devices after.
    pub active: bool,
    /// What happens to the hold.
    pub members: Members,
    /// When (Unix ms).
    pub now_ms: i64,
}

/// What changed in the registry that hubs other than the one that made the
/// change must act on (a device's connections may be at any of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The device was revoked: cut its connections.
    Revoked,
    /// The device redeemed a token (re-enrolled): its older certificate's
    /// connections are cut.
    Enrolled,
    /// The device renewed its certificate.
    Renewed,
    /// A config version was pushed for the device: offer it.
    Config,
    /// A consumer was revoked.
    ConsumerRevoked,
    /// A rollout was started or changed: its controller looks at it.
    Rollout,
}

impl ChangeKind {
    /// Its name in the change log.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Revoked => "revoked",
            ChangeKind::Enrolled => "enrolled",
            ChangeKind::Renewed => "renewed",
            ChangeKind::Config => "config",
            ChangeKind::ConsumerRevoked => "consumer.revoked",
            ChangeKind::Rollout => "rollout",
        }
    }

    /// The kind a change log row names, if this version knows it.
    pub fn parse(s: &str) -> Option<Self> {
        [
            ChangeKind::Revoked,
            ChangeKind::Enrolled,
            ChangeKind::Renewed,
            ChangeKind::Config,
            ChangeKind::ConsumerRevoked,
            ChangeKind::Rollout,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One row of the change log: written in the same transaction as the change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its position in the log (grows; rows commit in this order).
    pub id: u64,
    /// What changed.
    pub kind: ChangeKind,
    /// The device (or consumer) it changed.
    pub subject: String,
}

/// Checks that `entries` (after the ones already held) continue `device`'s
/// chain from the record `anchor`: returns the new head, or the break.
pub fn continue_chain(
    device: &str,
    anchor: (u64, Hash),
    entries: &[&Record],
) -> Result<(u64, Hash), String> {
    let mut v = Verifier::new(anchor.0, anchor.1);
    let mut last = anchor;
    for e in entries {
        if e.event.device != device {
            return Err(format!(
                "record {} names device {}, not {device}",
                e.seq, e.event.device
            ));
        }
        v.push(e).map_err(|b| b.to_string())?;
        last = (e.seq, e.hash);
    }
    Ok(last)
}

/// Labels to set and remove on one device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelChange {
    /// The device.
    pub device: String,
    /// (key, value) to set.
    pub set: Vec<(String, String)>,
    /// Keys to remove.
    pub remove: Vec<String>,
}

/// Refused when `labels` would be more than a device may carry.
fn too_many(n: usize) -> Result<(), RegistryError> {
    let max = gateway_core::selector::MAX_LABELS;
    if n > max {
        return Err(RegistryError::Refused(format!(
            "a device carries at most {max} labels; remove some first"
        )));
    }
    Ok(())
}

/// Applies `change` to the labels `now` holds; the result, or why not.
///
/// # Errors
/// More labels than a device may carry.
pub fn apply_labels(
    mut now: std::collections::BTreeMap<String, String>,
    change: &LabelChange,
) -> Result<Vec<(String, String)>, RegistryError> {
    for k in &change.remove {
        now.remove(k);
    }
    for (k, v) in &change.set {
        now.insert(k.clone(), v.clone());
    }
    too_many(now.len())?;
    Ok(now.into_iter().collect())
}

/// Which alarms to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlarmQuery {
    /// Only this device's.
    pub device: Option<String>,
    /// Only those raised at or after (Unix ms).
    pub since_ms: Option<i64>,
    /// Only those not acknowledged.
    pub unacked: bool,
    /// At most this many.
    pub limit: usize,
}

/// An alarm the hub holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmRow {
    /// The device that raised it (as its certificate and chain prove).
    pub device: String,
    /// The alarm.
    pub alarm: Alarm,
    /// Who acknowledged it, and when (Unix ms).
    pub acked: Option<(String, i64)>,
}

/// An application that reads the sink, identified by a certificate the hub
/// issued (a consumer, not a device or an operator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRow {
    /// Its name.
    pub name: String,
    /// The serial (hex) of the one certificate that identifies it.
    pub serial: String,
    /// That certificate's expiry, Unix ms.
    pub not_after_ms: i64,
    /// The operator who made it.
    pub created_by: String,
    /// When.
    pub created_ms: i64,
    /// Revoked at.
    pub revoked_ms: Option<i64>,
}

/// A consumer to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewConsumer {
    /// Its name.
    pub name: String,
    /// Its certificate's serial (hex).
    pub serial: String,
    /// Its certificate's expiry, Unix ms.
    pub not_after_ms: i64,
    /// The operator who made it.
    pub by: String,
    /// When, Unix ms.
    pub now_ms: i64,
}

/// A device's renewed certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    /// The device.
    pub device: String,
    /// The new certificate's serial (hex).
    pub serial: String,
    /// Its expiry, Unix ms.
    pub not_after_ms: i64,
    /// When, Unix ms.
    pub now_ms: i64,
    /// How long the old certificate stays valid for new connections at most.
    pub handover_ms: i64,
}

/// An operator account to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAccount {
    /// The account's name (one role per name).
    pub name: String,
    /// Its role.
    pub role: AdminRole,
    /// Digest of its credential.
    pub digest: String,
    /// When, Unix ms.
    pub now_ms: i64,
}

/// An enrollment token to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewToken {
    /// The device it enrolls.
    pub device: String,
    /// Digest of the token.
    pub digest: String,
    /// Its expiry, Unix ms.
    pub expires_ms: i64,
    /// The operator who made it.
    pub by: String,
    /// When, Unix ms.
    pub now_ms: i64,
    /// It may re-enroll a device that is enrolled with a valid certificate.
    pub replaces: bool,
}

/// A device redeeming its enrollment token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrollment {
    /// Digest of the token it presented.
    pub digest: String,
    /// The device it says it is (the token must be for it).
    pub device: String,
    /// When, Unix ms.
    pub now_ms: i64,
}

/// A config version pushed for a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigPush {
    /// The device.
    pub device: String,
    /// The config text.
    pub text: String,
    /// The operator who pushed it.
    pub by: String,
    /// When, Unix ms.
    pub now_ms: i64,
}

/// A device's config as it connected ([`Registry::config_connected`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigConnected {
    /// The device.
    pub device: String,
    /// The version in force.
    pub version: u64,
    /// Its text.
    pub text: String,
    /// When, Unix ms.
    pub now_ms: i64,
}

/// What the registry held of a device's config when it connected.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigSeen {
    /// The version it ran before and the result of the last offer (JSON).
    pub before: Option<(u64, String)>,
    /// The newest version pushed to it, and its text.
    pub desired: Option<(u64, String)>,
}

/// The result kept when a device connects running `version`: the last one
/// while it speaks of that version (a refusal or a revert), else
/// `connected`.
pub fn result_on_connect(before: Option<&(u64, String)>, version: u64) -> String {
    before
        .filter(|(v, _)| *v == version)
        .map_or_else(|| "{\"outcome\":\"connected\"}".to_owned(), |b| b.1.clone())
}

/// What a device reported running, and the result of the last offer (JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedReport {
    /// The device.
    pub device: String,
    /// The version in force.
    pub version: u64,
    /// Its text, when the device sent it.
    pub text: Option<String>,
    /// The last result, JSON.
    pub result: String,
    /// When, Unix ms.
    pub now_ms: i64,
}
