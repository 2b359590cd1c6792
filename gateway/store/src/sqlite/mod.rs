//! The embedded engine of the hub's storage traits: SQLite files in WAL mode
//! with `synchronous = FULL`, one connection per file, run on tokio's blocking
//! threads by [`Blocking`] so no async task waits on a disk sync.
//!
//! - [`registry`]: [`SqliteRegistry`], the fleet registry.
//! - [`sink`]: [`SqliteSink`], the sink of channel records.
//!
//! Errors are sorted for the caller: a busy or locked database, a failing or
//! full disk is [`StoreError::Unavailable`] (retry later); a constraint, a
//! corrupt or newer database is [`StoreError::Refused`].

pub mod firmware;
pub mod registry;
pub mod rollouts;
pub mod sink;

use std::sync::{Arc, Mutex, PoisonError};

use gateway_core::audit::Record;
use gateway_core::fleet::AdminRole;

pub use registry::SqliteRegistry;
pub use sink::{SinkError, SqliteSink};

use crate::error::{StoreError, StoreFuture};
use gateway_core::detect::Alarm;

use crate::registry::{
    Admission, AlarmQuery, AlarmRow, AppliedReport, AuditExport, Change, ConfigConnected,
    ConfigPush, ConfigSeen, ConsumerRow, DeviceRow, DevicesPage, Enrollment, FirmwarePart,
    FirmwareRow, LabelChange, NewAccount, NewConsumer, NewFirmware, NewRollout, NewTemplate,
    NewToken, Registry, RegistryError, RegistryFuture, Renewal, RolloutRow, RolloutUpdate,
    SignCertificate, StoredFirmware, TemplateRow, VarsChange,
};
use crate::sink::{Acked, Committed, Expired, Grant, Sink, SinkBatch, Stored, Stream, StreamKey};

/// What a SQLite failure means to the caller.
pub fn classify(e: &rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode as C;
    let text = e.to_string();
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                C::DatabaseBusy
                    | C::DatabaseLocked
                    | C::SystemIoFailure
                    | C::DiskFull
                    | C::CannotOpen
                    | C::OutOfMemory
                    | C::FileLockingProtocolFailed
            ) =>
        {
            StoreError::Unavailable(text)
        }
        _ => StoreError::Refused(text),
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        classify(&e)
    }
}

impl From<rusqlite::Error> for RegistryError {
    fn from(e: rusqlite::Error) -> Self {
        RegistryError::Store(classify(&e))
    }
}

impl From<SinkError> for StoreError {
    fn from(e: SinkError) -> Self {
        match e {
            SinkError::Sqlite(e) => classify(&e),
            newer @ SinkError::NewerSchema(_) => StoreError::Refused(newer.to_string()),
        }
    }
}

/// A SQLite engine shared by async callers: each call runs on a blocking
/// thread, one at a time (SQLite serialises writers anyway).
pub struct Blocking<T> {
    engine: Arc<Mutex<T>>,
}

impl<T: Send + 'static> Blocking<T> {
    /// Wraps an open engine.
    pub fn new(engine: T) -> Self {
        Blocking {
            engine: Arc::new(Mutex::new(engine)),
        }
    }

    /// Runs `f` on the engine in a blocking thread.
    fn run<R, E>(
        &self,
        f: impl FnOnce(&mut T) -> Result<R, E> + Send + 'static,
    ) -> StoreFuture<'static, R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let engine = self.engine.clone();
        Box::pin(async move {
            let done = tokio::task::spawn_blocking(move || {
                f(&mut engine.lock().unwrap_or_else(PoisonError::into_inner))
            })
            .await;
            match done {
                Ok(r) => r,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => Err(StoreError::Unavailable(format!("storage thread: {e}")).into()),
            }
        })
    }
}

impl Sink for Blocking<SqliteSink> {
    fn high(&self, k: StreamKey) -> StoreFuture<'_, u64> {
        self.run(move |s| Ok(s.high(&k.device, &k.channel)?))
    }

    fn commit(&self, batches: Vec<SinkBatch>) -> StoreFuture<'_, Vec<Committed>> {
        self.run(move |s| Ok(s.commit_batches(&batches)?))
    }

    fn read(&self, k: StreamKey, after: u64, limit: usize) -> StoreFuture<'_, Vec<Stored>> {
        self.run(move |s| Ok(s.read(&k.device, &k.channel, after, limit)?))
    }

    fn consume(&self, k: StreamKey, upto: u64) -> StoreFuture<'_, u64> {
        self.run(move |s| Ok(s.consume(&k.device, &k.channel, upto)?))
    }

    fn failed(&self, k: StreamKey, seq: u64, reason: String) -> StoreFuture<'_, ()> {
        self.run(move |s| Ok(s.failed(&k.device, &k.channel, seq, &reason)?))
    }

    fn failures(&self, k: StreamKey, after: u64, upto: u64) -> StoreFuture<'_, Vec<(u64, String)>> {
        self.run(move |s| Ok(s.failures(&k.device, &k.channel, after, upto)?))
    }

    fn streams(&self) -> StoreFuture<'_, Vec<Stream>> {
        self.run(|s| Ok(s.streams()?))
    }

    fn maintain(&self) -> StoreFuture<'_, ()> {
        self.run(|s| Ok(s.compact()?))
    }

    fn grant(&self, k: StreamKey, consumer: String, now_ms: i64) -> StoreFuture<'_, bool> {
        self.run(move |s| Ok(s.grant(&k.device, &k.channel, &consumer, now_ms)?))
    }

    fn revoke_grant(&self, k: StreamKey, consumer: String) -> StoreFuture<'_, Option<u64>> {
        self.run(move |s| Ok(s.revoke_grant(&k.device, &k.channel, &consumer)?))
    }

    fn drop_consumer(&self, consumer: String) -> StoreFuture<'_, u64> {
        self.run(move |s| Ok(s.drop_consumer(&consumer)?))
    }

    fn grants(&self, consumer: Option<String>) -> StoreFuture<'_, Vec<Grant>> {
        self.run(move |s| Ok(s.grants(consumer.as_deref())?))
    }

    fn cursor(&self, k: StreamKey, consumer: String) -> StoreFuture<'_, Option<u64>> {
        self.run(move |s| Ok(s.cursor(&k.device, &k.channel, &consumer)?))
    }

    fn ack(&self, k: StreamKey, consumer: String, upto: u64) -> StoreFuture<'_, Acked> {
        self.run(move |s| Ok(s.ack(&k.device, &k.channel, &consumer, upto)?))
    }

    fn expire(&self, before_ms: i64) -> StoreFuture<'_, Vec<Expired>> {
        self.run(move |s| Ok(s.expire(before_ms)?))
    }
}

impl Registry for Blocking<SqliteRegistry> {
    fn add_account(&self, a: NewAccount) -> RegistryFuture<'_, ()> {
        self.run(move |r| r.add_account(&a.name, a.role, &a.digest, a.now_ms))
    }

    fn accounts(&self) -> RegistryFuture<'_, Vec<(String, String)>> {
        self.run(|r| r.accounts())
    }

    fn account(&self, digest: String) -> RegistryFuture<'_, Option<(String, AdminRole)>> {
        self.run(move |r| r.account(&digest))
    }

    fn create_token(&self, t: NewToken) -> RegistryFuture<'_, ()> {
        self.run(move |r| {
            r.create_token_for(
                &t.device,
                &t.digest,
                t.expires_ms,
                (&t.by, t.now_ms),
                t.replaces,
            )
        })
    }

    fn enroll(&self, e: Enrollment, sign: SignCertificate) -> RegistryFuture<'_, String> {
        self.run(move |r| r.enroll(&e.digest, &e.device, e.now_ms, sign))
    }

    fn set_cert(&self, device: String, not_after_ms: i64) -> RegistryFuture<'_, ()> {
        self.run(move |r| r.set_cert(&device, not_after_ms))
    }

    fn renewed(&self, n: Renewal) -> RegistryFuture<'_, ()> {
        self.run(move |r| {
            r.renewed(
                &n.device,
                &n.serial,
                n.not_after_ms,
                (n.now_ms, n.handover_ms),
            )
        })
    }

    fn admit(&self, device: String, serial: String, now_ms: i64) -> RegistryFuture<'_, Admission> {
        self.run(move |r| r.admit(&device, &serial, now_ms))
    }

    fn live_serials(&self, ids: Vec<String>) -> RegistryFuture<'_, Vec<(String, Vec<String>)>> {
        self.run(move |r| r.live_serials(&ids))
    }

    fn is_revoked(&self, device: String) -> RegistryFuture<'_, bool> {
        self.run(move |r| r.is_revoked(&device))
    }

    fn revoked_among(&self, ids: Vec<String>) -> RegistryFuture<'_, Vec<String>> {
        self.run(move |r| r.revoked_among(&ids))
    }

    fn revoked(&self) -> RegistryFuture<'_, Vec<String>> {
        self.run(|r| r.revoked())
    }

    fn set_labels(&self, c: LabelChange) -> RegistryFuture<'_, Vec<(String, String)>> {
        self.run(move |r| r.set_labels(&c))
    }

    fn labels(&self) -> RegistryFuture<'_, Vec<(String, String, String)>> {
        self.run(|r| r.labels())
    }

    fn revoke(&self, device: String, by: String, now_ms: i64) -> RegistryFuture<'_, bool> {
        self.run(move |r| r.revoke(&device, &by, now_ms))
    }

    fn heartbeat(&self, device: String, now_ms: i64, json: String) -> RegistryFuture<'_, ()> {
        self.run(move |r| r.heartbeat(&device, now_ms, &json))
    }

    fn push_config(&self, p: ConfigPush) -> RegistryFuture<'_, u64> {
        self.run(move |r| r.push_config(&p.device, &p.text, &p.by, p.now_ms))
    }

    fn desired(&self, device: String) -> RegistryFuture<'_, Option<(u64, String)>> {
        self.run(move |r| r.desired(&device))
    }

    fn config_version(&self, device: String, version: u64) -> RegistryFuture<'_, Option<String>> {
        self.run(move |r| r.config_version(&device, version))
    }

    fn applied(&self, device: String) -> RegistryFuture<'_, Option<(u64, String)>> {
        self.run(move |r| r.applied(&device))
    }

    fn set_applied(&self, a: AppliedReport) -> RegistryFuture<'_, ()> {
        self.run(move |r| {
            r.set_applied(&a.device, a.version, a.text.as_deref(), &a.result, a.now_ms)
        })
    }

    fn devices(&self) -> RegistryFuture<'_, Vec<DeviceRow>> {
        self.run(|r| r.devices())
    }

    fn config_connected(&self, c: ConfigConnected) -> RegistryFuture<'_, ConfigSeen> {
        self.run(move |r| r.config_connected(&c))
    }

    fn device(&self, id: String) -> RegistryFuture<'_, Option<DeviceRow>> {
        self.run(move |r| r.device(&id))
    }

    fn audit_next(&self, device: String) -> RegistryFuture<'_, u64> {
        self.run(move |r| r.audit_next(&device))
    }

    fn append_audits(
        &self,
        batches: Vec<(String, Vec<Record>)>,
    ) -> RegistryFuture<'_, Vec<Result<usize, String>>> {
        self.run(move |r| r.append_audits(&batches))
    }

    fn audit_export(
        &self,
        device: String,
        since_ms: i64,
    ) -> RegistryFuture<'_, Option<AuditExport>> {
        self.run(move |r| {
            let found = r.audit_export(&device, since_ms)?;
            Ok(found.map(
                |(anchor_seq, anchor_hash, head_seq, head_hash, continuous, records)| AuditExport {
                    anchor_seq,
                    anchor_hash,
                    head_seq,
                    head_hash,
                    continuous,
                    records,
                },
            ))
        })
    }

    fn prune_audit(&self, before_ms: i64) -> RegistryFuture<'_, usize> {
        self.run(move |r| r.prune_audit(before_ms))
    }

    fn add_consumer(&self, c: NewConsumer) -> RegistryFuture<'_, ()> {
        self.run(move |r| r.add_consumer(&c))
    }

    fn consumer(&self, name: String) -> RegistryFuture<'_, Option<ConsumerRow>> {
        self.run(move |r| r.consumer(&name))
    }

    fn consumers(&self) -> RegistryFuture<'_, Vec<ConsumerRow>> {
        self.run(|r| r.consumers())
    }

    fn revoke_consumer(
        &self,
        name: String,
        by: String,
        now_ms: i64,
    ) -> RegistryFuture<'_, Option<bool>> {
        self.run(move |r| r.revoke_consumer(&name, &by, now_ms))
    }

    fn add_alarms(&self, device: String, alarms: Vec<Alarm>) -> RegistryFuture<'_, usize> {
        self.run(move |r| r.add_alarms(&device, &alarms))
    }

    fn alarms(&self, query: AlarmQuery) -> RegistryFuture<'_, Vec<AlarmRow>> {
        self.run(move |r| r.alarms(&query))
    }

    fn ack_alarm(&self, id: String, by: String, now_ms: i64) -> RegistryFuture<'_, Option<bool>> {
        self.run(move |r| r.ack_alarm(&id, &by, now_ms))
    }

    fn changes(&self, after: u64, limit: usize) -> RegistryFuture<'_, Vec<Change>> {
        self.run(move |r| r.changes(after, limit))
    }

    fn change_head(&self) -> RegistryFuture<'_, u64> {
        self.run(|r| r.change_head())
    }

    fn wake(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }

    fn devices_page(
        &self,
        after: Option<String>,
        limit: usize,
        filter: gateway_core::selector::Stored,
    ) -> RegistryFuture<'_, DevicesPage> {
        self.run(move |r| r.devices_page(after.as_deref(), limit, &filter))
    }

    fn heartbeats(&self, beats: Vec<crate::registry::Heartbeat>) -> RegistryFuture<'_, ()> {
        self.run(move |r| r.heartbeats(&beats))
    }

    fn put_template(&self, t: NewTemplate) -> RegistryFuture<'_, u64> {
        self.run(move |r| r.put_template(&t))
    }

    fn template(
        &self,
        name: String,
        version: Option<u64>,
    ) -> RegistryFuture<'_, Option<TemplateRow>> {
        self.run(move |r| r.template(&name, version))
    }

    fn templates(&self) -> RegistryFuture<'_, Vec<TemplateRow>> {
        self.run(|r| r.templates())
    }

    fn set_vars(&self, c: VarsChange) -> RegistryFuture<'_, Vec<(String, String)>> {
        self.run(move |r| r.set_vars(&c))
    }

    fn vars(&self, devices: Vec<String>) -> RegistryFuture<'_, Vec<(String, String, String)>> {
        self.run(move |r| r.vars(&devices))
    }

    fn create_rollout(&self, n: NewRollout) -> RegistryFuture<'_, ()> {
        self.run(move |r| r.create_rollout(&n))
    }

    fn rollout(&self, id: String) -> RegistryFuture<'_, Option<RolloutRow>> {
        self.run(move |r| r.rollout(&id))
    }

    fn rollouts(&self, active: bool) -> RegistryFuture<'_, Vec<RolloutRow>> {
        self.run(move |r| r.rollouts(active))
    }

    fn update_rollout(&self, u: RolloutUpdate) -> RegistryFuture<'_, bool> {
        self.run(move |r| r.update_rollout(&u))
    }

    fn put_firmware(&self, f: NewFirmware) -> RegistryFuture<'_, FirmwareRow> {
        self.run(move |r| r.put_firmware(&f))
    }

    fn firmwares(&self) -> RegistryFuture<'_, Vec<FirmwareRow>> {
        self.run(|r| r.firmwares())
    }

    fn firmware(&self, version: String) -> RegistryFuture<'_, Option<StoredFirmware>> {
        self.run(move |r| r.firmware(&version))
    }

    fn put_firmware_part(&self, p: FirmwarePart) -> RegistryFuture<'_, ()> {
        self.run(move |r| r.put_firmware_part(&p))
    }

    fn firmware_part(&self, version: String, name: String) -> RegistryFuture<'_, Option<Vec<u8>>> {
        self.run(move |r| r.firmware_part(&version, &name))
    }

    fn firmware_parts(&self, version: String) -> RegistryFuture<'_, Vec<String>> {
        self.run(move |r| r.firmware_parts(&version))
    }

    fn firmware_complete(&self, version: String) -> RegistryFuture<'_, ()> {
        self.run(move |r| r.firmware_complete(&version))
    }
}
