//! The registry's SQLite engine: `STATE_DIR/fleet.sqlite` (or `[hub].registry`).
//!
//! Operator accounts (one role each), single-use enrollment tokens, enrolled
//! devices with their certificate expiry and revocation, the last heartbeat,
//! pushed config versions and what each device reported applying, and every
//! device's audit chain as collected.
//!
//! Invariants (tested below):
//! - Secrets are stored only as digests (SHA-256 of the whole token text).
//! - A token is redeemed at most once, only for its device, only before its
//!   expiry, only while the device is not revoked; redeeming and recording the
//!   device happen in one transaction.
//! - An account name holds exactly one role; adding it again is refused.
//! - Config versions of a device only grow; a push gets `max + 1`.
//! - Collected audit records of a device are accepted only if they continue its
//!   chain (next sequence number, link to the last hash); otherwise nothing is
//!   stored and the device is marked broken until an operator looks.

use std::path::Path;
use std::time::Duration;

use gateway_core::audit::{self, Hash, Record};
use gateway_core::fleet::AdminRole;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use gateway_core::detect::Alarm;

use crate::registry::{
    Admission, AlarmQuery, AlarmRow, Change, ChangeKind, ConsumerRow, DeviceRow, DeviceState,
    LabelChange, NewConsumer, RegistryError, apply_labels, continue_chain,
};

/// File name inside the hub's state directory.
pub const FILE_NAME: &str = "fleet.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS account (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL,
    digest     TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS token (
    digest     TEXT PRIMARY KEY,
    device     TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    used_ms    INTEGER,
    created_by TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    replaces   INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE TABLE IF NOT EXISTS device (
    id           TEXT PRIMARY KEY,
    enrolled_ms  INTEGER NOT NULL,
    not_after_ms INTEGER,
    revoked_ms   INTEGER,
    revoked_by   TEXT,
    serial       TEXT,
    serial_seen  INTEGER NOT NULL DEFAULT 0,
    prev_serial  TEXT,
    prev_until_ms INTEGER
) STRICT;
-- Applications reading the sink, by the certificate the hub issued them.
CREATE TABLE IF NOT EXISTS consumer (
    name         TEXT PRIMARY KEY,
    serial       TEXT NOT NULL,
    not_after_ms INTEGER NOT NULL,
    created_by   TEXT NOT NULL,
    created_ms   INTEGER NOT NULL,
    revoked_ms   INTEGER,
    revoked_by   TEXT
) STRICT;
CREATE TABLE IF NOT EXISTS status (
    device  TEXT PRIMARY KEY,
    last_ms INTEGER NOT NULL,
    json    TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS config (
    device    TEXT NOT NULL,
    version   INTEGER NOT NULL,
    text      TEXT NOT NULL,
    pushed_by TEXT NOT NULL,
    pushed_ms INTEGER NOT NULL,
    PRIMARY KEY (device, version)
) STRICT;
CREATE TABLE IF NOT EXISTS config_state (
    device    TEXT PRIMARY KEY,
    applied   INTEGER NOT NULL,
    text      TEXT NOT NULL,
    result    TEXT NOT NULL,
    result_ms INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS edge_audit (
    device  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    json    TEXT NOT NULL,
    PRIMARY KEY (device, seq)
) STRICT;
CREATE TABLE IF NOT EXISTS alarm (
    id        TEXT PRIMARY KEY,
    device    TEXT NOT NULL,
    time_ms   INTEGER NOT NULL,
    json      TEXT NOT NULL,
    acked_by  TEXT,
    acked_ms  INTEGER
) STRICT;
CREATE INDEX IF NOT EXISTS alarm_time ON alarm (time_ms);
-- Operators' labels of devices (city=changchun, ring=canary).
CREATE TABLE IF NOT EXISTS device_label (
    device TEXT NOT NULL,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (device, key)
) STRICT;
-- What other hubs sharing this file must act on, written in the transaction
-- of the change (BEGIN IMMEDIATE: rows commit in id order).
CREATE TABLE IF NOT EXISTS change_log (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    kind    TEXT NOT NULL,
    subject TEXT NOT NULL,
    at_ms   INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS edge_audit_head (
    device      TEXT PRIMARY KEY,
    anchor_seq  INTEGER NOT NULL,
    anchor_hash TEXT NOT NULL,
    head_seq    INTEGER NOT NULL,
    head_hash   TEXT NOT NULL,
    broken      TEXT
) STRICT;
";

/// The registry in one SQLite file.
pub struct SqliteRegistry {
    pub(super) db: Connection,
}

fn hex(h: &Hash) -> String {
    audit::to_hex(h)
}

impl SqliteRegistry {
    /// Opens or creates `state_dir/fleet.sqlite`.
    ///
    /// # Errors
    /// When SQLite cannot open or set it up.
    pub fn open(state_dir: &Path) -> Result<Self, RegistryError> {
        Self::open_file(&state_dir.join(FILE_NAME))
    }

    /// Opens or creates the registry at `path` (hubs may share one file:
    /// every write is one `BEGIN IMMEDIATE` transaction or one statement).
    ///
    /// # Errors
    /// When SQLite cannot open or set it up.
    pub fn open_file(path: &Path) -> Result<Self, RegistryError> {
        let db = Connection::open(path)?;
        db.busy_timeout(Duration::from_secs(10))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        // Point lookups and appends (collected audit records): 512 KiB of
        // page cache, not SQLite's 2 MiB that a burst of records fills.
        db.pragma_update(None, "cache_size", -512)?;
        db.execute_batch(SCHEMA)?;
        db.execute_batch(super::rollouts::SCHEMA)?;
        db.execute_batch(super::firmware::SCHEMA)?;
        // Registries made before tokens could re-enroll a device.
        let has_replaces: bool = db.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('token') WHERE name = 'replaces')",
            [],
            |r| r.get(0),
        )?;
        if !has_replaces {
            db.execute_batch("ALTER TABLE token ADD COLUMN replaces INTEGER NOT NULL DEFAULT 0")?;
        }
        // Registries made before one live certificate per device.
        for (column, decl) in [
            ("serial", "TEXT"),
            ("serial_seen", "INTEGER NOT NULL DEFAULT 0"),
            ("prev_serial", "TEXT"),
            ("prev_until_ms", "INTEGER"),
        ] {
            let has: bool = db.query_row(
                "SELECT EXISTS (SELECT 1 FROM pragma_table_info('device') WHERE name = ?1)",
                [column],
                |r| r.get(0),
            )?;
            if !has {
                db.execute_batch(&format!("ALTER TABLE device ADD COLUMN {column} {decl}"))?;
            }
        }
        Ok(SqliteRegistry { db })
    }

    /// Adds an operator account with `role`, identified by a credential digest.
    ///
    /// # Errors
    /// [`RegistryError::AccountExists`] when the name is taken.
    pub fn add_account(
        &mut self,
        name: &str,
        role: AdminRole,
        digest: &str,
        now_ms: i64,
    ) -> Result<(), RegistryError> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM account WHERE name = ?1)",
            [name],
            |r| r.get(0),
        )?;
        if exists {
            return Err(RegistryError::AccountExists(name.to_owned()));
        }
        tx.execute(
            "INSERT INTO account (name, role, digest, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![name, role.as_str(), digest, now_ms],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The accounts: (name, role).
    ///
    /// # Errors
    /// SQLite.
    pub fn accounts(&self) -> Result<Vec<(String, String)>, RegistryError> {
        let mut st = self
            .db
            .prepare("SELECT name, role FROM account ORDER BY name")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The account a credential digest belongs to.
    ///
    /// # Errors
    /// SQLite.
    pub fn account(&self, digest: &str) -> Result<Option<(String, AdminRole)>, RegistryError> {
        let row: Option<(String, String)> = self
            .db
            .query_row(
                "SELECT name, role FROM account WHERE digest = ?1",
                [digest],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(row.and_then(|(n, r)| AdminRole::parse(&r).map(|r| (n, r))))
    }

    /// Stores a new enrollment token for `device`.
    ///
    /// # Errors
    /// [`RegistryError::Revoked`] for a revoked device.
    pub fn create_token(
        &mut self,
        device: &str,
        digest: &str,
        expires_ms: i64,
        by: &str,
        now_ms: i64,
    ) -> Result<(), RegistryError> {
        self.create_token_for(device, digest, expires_ms, (by, now_ms), false)
    }

    /// [`SqliteRegistry::create_token`]; with `replaces`, the token may
    /// re-enroll a device that is enrolled with a valid certificate.
    ///
    /// # Errors
    /// [`RegistryError::Revoked`] for a revoked device.
    pub fn create_token_for(
        &mut self,
        device: &str,
        digest: &str,
        expires_ms: i64,
        (by, now_ms): (&str, i64),
        replaces: bool,
    ) -> Result<(), RegistryError> {
        // A revoked device comes back only on a replacing token (the
        // security administrator's), made after the revocation.
        if !replaces && self.is_revoked(device)? {
            return Err(RegistryError::Revoked(device.to_owned()));
        }
        self.db.execute(
            "INSERT INTO token (digest, device, expires_ms, created_by, created_ms, replaces) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![digest, device, expires_ms, by, now_ms, replaces],
        )?;
        Ok(())
    }

    /// Redeems a token for `device`, then lets `sign` make its certificate; both
    /// are committed together, or neither. `sign` returns the certificate and
    /// its expiry.
    ///
    /// # Errors
    /// [`RegistryError::Token`] with the reason, [`RegistryError::Revoked`], or what
    /// `sign` returned.
    pub fn enroll<T>(
        &mut self,
        digest: &str,
        device: &str,
        now_ms: i64,
        sign: impl FnOnce() -> Result<(T, i64, String), RegistryError>,
    ) -> Result<T, RegistryError> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row: Option<(String, i64, Option<i64>, bool, i64)> = tx
            .query_row(
                "SELECT device, expires_ms, used_ms, replaces, created_ms FROM token WHERE digest = ?1",
                [digest],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        let Some((for_device, expires, used, replaces, created)) = row else {
            return Err(RegistryError::Token("unknown enrollment token"));
        };
        if used.is_some() {
            return Err(RegistryError::Token(
                "this enrollment token was used already; ask central ops for a new one",
            ));
        }
        if for_device != device {
            return Err(RegistryError::Token(
                "this enrollment token was issued for another device id",
            ));
        }
        if expires < now_ms {
            return Err(RegistryError::Token(
                "this enrollment token has expired; ask central ops for a new one",
            ));
        }
        let revoked: Option<i64> = tx
            .query_row(
                "SELECT revoked_ms FROM device WHERE id = ?1",
                [device],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        if !crate::registry::may_come_back(revoked, replaces, created) {
            return Err(RegistryError::Revoked(device.to_owned()));
        }
        // A second identity for an enrolled department takes a token made to
        // replace it, whenever the plain token was made.
        let enrolled: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM device WHERE id = ?1 AND not_after_ms > ?2)",
            params![device, now_ms],
            |r| r.get(0),
        )?;
        if enrolled && !replaces {
            return Err(RegistryError::Token(
                "this device is enrolled with a valid certificate; re-enrolling it takes a token made with --replace by the security administrator",
            ));
        }
        let (out, not_after, serial) = sign()?;
        tx.execute(
            "UPDATE token SET used_ms = ?2 WHERE digest = ?1",
            params![digest, now_ms],
        )?;
        // The new certificate is the device's one: any older one is refused
        // from now on, without a handover.
        tx.execute(
            "INSERT INTO device (id, enrolled_ms, not_after_ms, serial, serial_seen) VALUES (?1, ?2, ?3, ?4, 0)
             ON CONFLICT (id) DO UPDATE SET enrolled_ms = ?2, not_after_ms = ?3, serial = ?4,
                 serial_seen = 0, prev_serial = NULL, prev_until_ms = NULL,
                 revoked_ms = NULL, revoked_by = NULL",
            params![device, now_ms, not_after, serial],
        )?;
        log_change(&tx, ChangeKind::Enrolled, device, now_ms)?;
        tx.commit()?;
        Ok(out)
    }

    /// Records a renewed (or first seen) certificate's expiry.
    ///
    /// # Errors
    /// SQLite.
    pub fn set_cert(&mut self, device: &str, not_after_ms: i64) -> Result<(), RegistryError> {
        self.db.execute(
            "INSERT INTO device (id, enrolled_ms, not_after_ms) VALUES (?1, 0, ?2)
             ON CONFLICT (id) DO UPDATE SET not_after_ms = ?2",
            params![device, not_after_ms],
        )?;
        Ok(())
    }

    /// A renewed certificate of `device` (serial, expiry) is its one from now
    /// on. The certificate it connects with stays valid for new connections
    /// until it first connects with the new one, or `handover_ms` at most.
    ///
    /// # Errors
    /// SQLite.
    pub fn renewed(
        &mut self,
        device: &str,
        serial: &str,
        not_after_ms: i64,
        (now_ms, handover_ms): (i64, i64),
    ) -> Result<(), RegistryError> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row: Option<(Option<String>, bool, Option<String>)> = tx
            .query_row(
                "SELECT serial, serial_seen, prev_serial FROM device WHERE id = ?1",
                [device],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        // The one in use: the current one if the device has connected with
        // it, else the one handed over from (a renewal whose answer was lost
        // must not strand the certificate the box still holds).
        let in_use = match row {
            Some((current, true, _)) | Some((current, false, None)) => current,
            Some((_, false, prev)) => prev,
            None => None,
        };
        tx.execute(
            "INSERT INTO device (id, enrolled_ms, not_after_ms, serial, serial_seen, prev_serial, prev_until_ms)
                 VALUES (?1, 0, ?2, ?3, 0, ?4, ?5)
             ON CONFLICT (id) DO UPDATE SET not_after_ms = ?2, serial = ?3, serial_seen = 0,
                 prev_serial = ?4, prev_until_ms = ?5",
            params![device, not_after_ms, serial, in_use, now_ms + handover_ms],
        )?;
        log_change(&tx, ChangeKind::Renewed, device, now_ms)?;
        tx.commit()?;
        Ok(())
    }

    /// Whether `device` may open a tunnel presenting the certificate `serial`
    /// (see [`Admission`]); records what the answer implies (a first-seen
    /// certificate becomes the device's, the new one's first use ends the
    /// handover).
    ///
    /// # Errors
    /// SQLite.
    pub fn admit(
        &mut self,
        device: &str,
        serial: &str,
        now_ms: i64,
    ) -> Result<Admission, RegistryError> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row: Option<CertRow> = tx
            .query_row(
                "SELECT revoked_ms, serial, serial_seen, prev_serial, prev_until_ms FROM device WHERE id = ?1",
                [device],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        let answer = match row {
            Some((Some(_), ..)) => Admission::Revoked,
            None | Some((None, None, ..)) => {
                // A certificate made offline (gatewayd pki issue), or a
                // registry from before serials: the first one seen is the one.
                tx.execute(
                    "INSERT INTO device (id, enrolled_ms, serial, serial_seen) VALUES (?1, 0, ?2, 1)
                     ON CONFLICT (id) DO UPDATE SET serial = ?2, serial_seen = 1",
                    params![device, serial],
                )?;
                Admission::FirstSeen
            }
            Some((None, Some(current), seen, ..)) if current == serial => {
                if !seen {
                    tx.execute(
                        "UPDATE device SET serial_seen = 1, prev_until_ms = min(coalesce(prev_until_ms, ?2), ?2) WHERE id = ?1",
                        params![device, now_ms],
                    )?;
                }
                Admission::Current
            }
            Some((None, Some(current), _, Some(prev), Some(until)))
                if prev == serial && now_ms < until =>
            {
                Admission::Handover { current }
            }
            Some((None, Some(current), ..)) => Admission::Superseded { current },
        };
        tx.commit()?;
        Ok(answer)
    }

    /// The certificates each of `ids` may keep live connections with: its
    /// current serial and the one it renewed from (live connections made
    /// before the renewal go on until they close).
    ///
    /// # Errors
    /// SQLite.
    pub fn live_serials(
        &self,
        ids: &[String],
    ) -> Result<Vec<(String, Vec<String>)>, RegistryError> {
        let mut st = self
            .db
            .prepare_cached("SELECT serial, prev_serial FROM device WHERE id = ?1")?;
        let mut out = Vec::new();
        for id in ids {
            let row: Option<(Option<String>, Option<String>)> = st
                .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if let Some((Some(current), prev)) = row {
                out.push((id.clone(), std::iter::once(current).chain(prev).collect()));
            }
        }
        Ok(out)
    }

    /// Whether `device` is revoked.
    ///
    /// # Errors
    /// SQLite.
    pub fn is_revoked(&self, device: &str) -> Result<bool, RegistryError> {
        Ok(self.db.query_row(
            "SELECT EXISTS (SELECT 1 FROM device WHERE id = ?1 AND revoked_ms IS NOT NULL)",
            [device],
            |r| r.get(0),
        )?)
    }

    /// Which of `ids` are revoked.
    ///
    /// # Errors
    /// SQLite.
    pub fn revoked_among(&self, ids: &[String]) -> Result<Vec<String>, RegistryError> {
        let mut st = self
            .db
            .prepare_cached("SELECT 1 FROM device WHERE id = ?1 AND revoked_ms IS NOT NULL")?;
        let mut out = Vec::new();
        for id in ids {
            if st.exists([id])? {
                out.push(id.clone());
            }
        }
        Ok(out)
    }

    /// Every revoked device.
    ///
    /// # Errors
    /// SQLite.
    pub fn revoked(&self) -> Result<Vec<String>, RegistryError> {
        let mut st = self
            .db
            .prepare("SELECT id FROM device WHERE revoked_ms IS NOT NULL ORDER BY id")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Revokes `device` (known or not); false when it already was.
    ///
    /// # Errors
    /// SQLite.
    pub fn revoke(&mut self, device: &str, by: &str, now_ms: i64) -> Result<bool, RegistryError> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let revoked: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM device WHERE id = ?1 AND revoked_ms IS NOT NULL)",
            [device],
            |r| r.get(0),
        )?;
        if revoked {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO device (id, enrolled_ms, revoked_ms, revoked_by) VALUES (?1, 0, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET revoked_ms = ?2, revoked_by = ?3",
            params![device, now_ms, by],
        )?;
        tx.execute(
            "UPDATE token SET used_ms = ?2 WHERE device = ?1 AND used_ms IS NULL",
            params![device, now_ms],
        )?;
        log_change(&tx, ChangeKind::Revoked, device, now_ms)?;
        tx.commit()?;
        Ok(true)
    }

    /// Records a consumer and the serial of the certificate made for it.
    ///
    /// # Errors
    /// [`RegistryError::ConsumerExists`] when the name is taken (revoked or not).
    pub fn add_consumer(&mut self, c: &NewConsumer) -> Result<(), RegistryError> {
        let n = self.db.execute(
            "INSERT OR IGNORE INTO consumer (name, serial, not_after_ms, created_by, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![c.name, c.serial, c.not_after_ms, c.by, c.now_ms],
        )?;
        if n == 0 {
            return Err(RegistryError::ConsumerExists(c.name.clone()));
        }
        Ok(())
    }

    /// One consumer.
    ///
    /// # Errors
    /// SQLite.
    pub fn consumer(&self, name: &str) -> Result<Option<ConsumerRow>, RegistryError> {
        Ok(self
            .db
            .query_row(
                "SELECT name, serial, not_after_ms, created_by, created_ms, revoked_ms FROM consumer WHERE name = ?1",
                [name],
                consumer_row,
            )
            .optional()?)
    }

    /// Every consumer, by name.
    ///
    /// # Errors
    /// SQLite.
    pub fn consumers(&self) -> Result<Vec<ConsumerRow>, RegistryError> {
        let mut st = self.db.prepare(
            "SELECT name, serial, not_after_ms, created_by, created_ms, revoked_ms FROM consumer ORDER BY name",
        )?;
        let rows = st.query_map([], consumer_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Revokes consumer `name`: `None` when there is none, else whether it was
    /// not revoked before.
    ///
    /// # Errors
    /// SQLite.
    pub fn revoke_consumer(
        &mut self,
        name: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<Option<bool>, RegistryError> {
        let Some(row) = self.consumer(name)? else {
            return Ok(None);
        };
        if row.revoked_ms.is_some() {
            return Ok(Some(false));
        }
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE consumer SET revoked_ms = ?2, revoked_by = ?3 WHERE name = ?1",
            params![name, now_ms, by],
        )?;
        log_change(&tx, ChangeKind::ConsumerRevoked, name, now_ms)?;
        tx.commit()?;
        Ok(Some(true))
    }

    /// Stores a heartbeat.
    ///
    /// # Errors
    /// SQLite.
    pub fn heartbeat(
        &mut self,
        device: &str,
        now_ms: i64,
        json: &str,
    ) -> Result<(), RegistryError> {
        self.db.execute(
            "INSERT INTO status (device, last_ms, json) VALUES (?1, ?2, ?3)
             ON CONFLICT (device) DO UPDATE SET last_ms = ?2, json = ?3",
            params![device, now_ms, json],
        )?;
        Ok(())
    }

    /// Stores a new config version for `device`; returns its number.
    ///
    /// # Errors
    /// SQLite.
    pub fn push_config(
        &mut self,
        device: &str,
        text: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<u64, RegistryError> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let applied: i64 = tx
            .query_row(
                "SELECT applied FROM config_state WHERE device = ?1",
                [device],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let max: i64 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM config WHERE device = ?1",
            [device],
            |r| r.get(0),
        )?;
        let version = max.max(applied) + 1;
        // The box's own file, before its first push, is kept as version 0:
        // what a rollback offers it again.
        if max == 0 && applied == 0 {
            tx.execute(
                "INSERT INTO config (device, version, text, pushed_by, pushed_ms)
                 SELECT device, 0, text, 'the box''s own file', result_ms FROM config_state
                 WHERE device = ?1 AND applied = 0 ON CONFLICT DO NOTHING",
                [device],
            )?;
        }
        tx.execute(
            "INSERT INTO config (device, version, text, pushed_by, pushed_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![device, version, text, by, now_ms],
        )?;
        log_change(&tx, ChangeKind::Config, device, now_ms)?;
        tx.commit()?;
        Ok(u64::try_from(version).unwrap_or(0))
    }

    /// The newest pushed version of `device`: (version, text).
    ///
    /// # Errors
    /// SQLite.
    pub fn desired(&self, device: &str) -> Result<Option<(u64, String)>, RegistryError> {
        Ok(self
            .db
            .query_row(
                "SELECT version, text FROM config WHERE device = ?1 ORDER BY version DESC LIMIT 1",
                [device],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?)
    }

    /// A stored version of `device`'s config.
    ///
    /// # Errors
    /// SQLite.
    pub fn config_version(
        &self,
        device: &str,
        version: u64,
    ) -> Result<Option<String>, RegistryError> {
        Ok(self
            .db
            .query_row(
                "SELECT text FROM config WHERE device = ?1 AND version = ?2",
                params![device, version as i64],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// What `device` runs, as it reported: (version, text).
    ///
    /// # Errors
    /// SQLite.
    pub fn applied(&self, device: &str) -> Result<Option<(u64, String)>, RegistryError> {
        Ok(self
            .db
            .query_row(
                "SELECT applied, text FROM config_state WHERE device = ?1",
                [device],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?)
    }

    /// See `Registry::config_connected`.
    ///
    /// # Errors
    /// SQLite.
    pub fn config_connected(
        &mut self,
        c: &crate::registry::ConfigConnected,
    ) -> Result<crate::registry::ConfigSeen, RegistryError> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let before: Option<(u64, String)> = tx
            .query_row(
                "SELECT applied, result FROM config_state WHERE device = ?1",
                [&c.device],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?;
        let result = crate::registry::result_on_connect(before.as_ref(), c.version);
        tx.execute(
            "INSERT INTO config_state (device, applied, text, result, result_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (device) DO UPDATE SET applied = ?2, text = ?3, result = ?4, result_ms = ?5",
            params![c.device, c.version as i64, c.text, result, c.now_ms],
        )?;
        let desired = tx
            .query_row(
                "SELECT version, text FROM config WHERE device = ?1 ORDER BY version DESC LIMIT 1",
                [&c.device],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?;
        tx.commit()?;
        Ok(crate::registry::ConfigSeen { before, desired })
    }

    /// Records what `device` runs (`text` empty: keep the text known).
    ///
    /// # Errors
    /// SQLite.
    pub fn set_applied(
        &mut self,
        device: &str,
        version: u64,
        text: Option<&str>,
        result: &str,
        now_ms: i64,
    ) -> Result<(), RegistryError> {
        let text = match text {
            Some(t) => t.to_owned(),
            None => match self
                .db
                .query_row(
                    "SELECT text FROM config WHERE device = ?1 AND version = ?2",
                    params![device, version as i64],
                    |r| r.get::<_, String>(0),
                )
                .optional()?
            {
                Some(t) => t,
                None => self.applied(device)?.map(|a| a.1).unwrap_or_default(),
            },
        };
        self.db.execute(
            "INSERT INTO config_state (device, applied, text, result, result_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (device) DO UPDATE SET applied = ?2, text = ?3, result = ?4, result_ms = ?5",
            params![device, version as i64, text, result, now_ms],
        )?;
        Ok(())
    }

    /// Every device the hub knows (enrolled, seen, revoked or pushed to).
    ///
    /// # Errors
    /// SQLite.
    pub fn devices(&self) -> Result<Vec<DeviceRow>, RegistryError> {
        let mut st = self.db.prepare(
            "SELECT id FROM device UNION SELECT device FROM status UNION SELECT device FROM config
             UNION SELECT device FROM config_state ORDER BY 1",
        )?;
        let ids: Vec<String> = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        ids.iter()
            .map(|id| {
                self.device(id)
                    .map(|d| d.unwrap_or_else(|| DeviceRow::unknown(id)))
            })
            .collect()
    }

    /// One device.
    ///
    /// # Errors
    /// SQLite.
    pub fn device(&self, id: &str) -> Result<Option<DeviceRow>, RegistryError> {
        let dev: Option<(i64, Option<i64>, Option<i64>)> = self
            .db
            .query_row(
                "SELECT enrolled_ms, not_after_ms, revoked_ms FROM device WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let status: Option<(i64, String)> = self
            .db
            .query_row(
                "SELECT last_ms, json FROM status WHERE device = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let desired = self.desired(id)?.map(|d| d.0);
        let applied: Option<(u64, String, i64)> = self
            .db
            .query_row(
                "SELECT applied, result, result_ms FROM config_state WHERE device = ?1",
                [id],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let audit: Option<(u64, Option<String>)> = self
            .db
            .query_row(
                "SELECT head_seq, broken FROM edge_audit_head WHERE device = ?1",
                [id],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?;
        Ok(DeviceRow::assemble(
            id,
            dev,
            DeviceState {
                status,
                desired,
                applied,
                audit,
            },
        ))
    }

    /// The next audit record wanted from `device`.
    ///
    /// # Errors
    /// SQLite.
    pub fn audit_next(&self, device: &str) -> Result<u64, RegistryError> {
        Ok(self
            .db
            .query_row(
                "SELECT head_seq FROM edge_audit_head WHERE device = ?1",
                [device],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map_or(1, |h| h as u64 + 1))
    }

    /// Appends collected records of `device`. The first batch may start after a
    /// pruned part (its first record is the anchor's successor); later batches
    /// must continue the chain. Returns how many were stored, or the break (then
    /// nothing is stored and the device's chain is marked broken).
    ///
    /// # Errors
    /// SQLite.
    pub fn append_audit(
        &mut self,
        device: &str,
        entries: &[Record],
    ) -> Result<Result<usize, String>, RegistryError> {
        let mut all = self.append_audits(&[(device.to_owned(), entries.to_vec())])?;
        Ok(all.pop().unwrap_or(Ok(0)))
    }

    /// [`Self::append_audit`] for several devices in one transaction (the
    /// hub's coalesced write): a result per batch, in order.
    ///
    /// # Errors
    /// SQLite; then nothing is stored.
    pub fn append_audits(
        &mut self,
        batches: &[(String, Vec<Record>)],
    ) -> Result<Vec<Result<usize, String>>, RegistryError> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut results = Vec::with_capacity(batches.len());
        for (device, entries) in batches {
            results.push(append_one(&tx, device, entries)?);
        }
        tx.commit()?;
        Ok(results)
    }
    /// Collected records of `device` from `since_ms` on, with the anchor (the
    /// record before the first one returned) and the head:
    /// `(anchor_seq, anchor_hash, head_seq, head_hash, continuous, records)`.
    ///
    /// # Errors
    /// SQLite.
    #[allow(clippy::type_complexity)]
    pub fn audit_export(
        &self,
        device: &str,
        since_ms: i64,
    ) -> Result<Option<(u64, String, u64, String, bool, Vec<Record>)>, RegistryError> {
        let head: Option<(i64, String, Option<String>)> = self
            .db
            .query_row(
                "SELECT head_seq, head_hash, broken FROM edge_audit_head WHERE device = ?1",
                [device],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((head_seq, head_hash, broken)) = head else {
            return Ok(None);
        };
        // From the first record at or after `since`; everything after it, so the
        // export links up to the head.
        let first: Option<i64> = self.db.query_row(
            "SELECT MIN(seq) FROM edge_audit WHERE device = ?1 AND time_ms >= ?2",
            params![device, since_ms],
            |r| r.get(0),
        )?;
        // Records stored after the head was read are not this export's: it
        // ends at the head it names.
        let mut st = self.db.prepare(
            "SELECT json FROM edge_audit WHERE device = ?1 AND seq >= ?2 AND seq <= ?3 ORDER BY seq",
        )?;
        let from = first.unwrap_or(head_seq + 1);
        let records: Vec<Record> = st
            .query_map(params![device, from, head_seq], |r| r.get::<_, String>(0))?
            .filter_map(|j| j.ok().and_then(|j| serde_json::from_str(&j).ok()))
            .collect();
        let (a_seq, a_hash) = match records.first() {
            Some(r) => (r.seq - 1, hex(&r.prev_hash)),
            None => (head_seq as u64, head_hash.clone()),
        };
        Ok(Some((
            a_seq,
            a_hash,
            head_seq as u64,
            head_hash,
            broken.is_none(),
            records,
        )))
    }

    /// Removes collected records older than `before_ms`, keeping the newest
    /// record of each device so the chain goes on.
    ///
    /// # Errors
    /// SQLite.
    pub fn prune_audit(&mut self, before_ms: i64) -> Result<usize, RegistryError> {
        self.db
            .execute("DELETE FROM alarm WHERE time_ms < ?1", [before_ms])?;
        // Hubs read the change log within seconds; what is older than the
        // retention is nobody's news (the sweeps cover a hub away that long).
        self.db
            .execute("DELETE FROM change_log WHERE at_ms < ?1", [before_ms])?;
        Ok(self.db.execute(
            "DELETE FROM edge_audit WHERE time_ms < ?1
             AND seq < (SELECT head_seq FROM edge_audit_head h WHERE h.device = edge_audit.device)",
            [before_ms],
        )?)
    }

    /// Keeps `alarms` of `device`, skipping ids already held; how many were new.
    ///
    /// # Errors
    /// SQLite.
    pub fn add_alarms(&mut self, device: &str, alarms: &[Alarm]) -> Result<usize, RegistryError> {
        let tx = self.db.transaction()?;
        let mut added = 0;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO alarm (id, device, time_ms, json) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for a in alarms {
                let json = serde_json::to_string(a).unwrap_or_default();
                added += st.execute(params![a.id, device, a.at_ms, json])?;
            }
        }
        tx.commit()?;
        Ok(added)
    }

    /// Alarms matching `q`, newest first.
    ///
    /// # Errors
    /// SQLite.
    pub fn alarms(&self, q: &AlarmQuery) -> Result<Vec<AlarmRow>, RegistryError> {
        let mut st = self.db.prepare_cached(
            "SELECT device, json, acked_by, acked_ms FROM alarm
             WHERE (?1 IS NULL OR device = ?1) AND time_ms >= ?2 AND (?3 = 0 OR acked_by IS NULL)
             ORDER BY time_ms DESC, id LIMIT ?4",
        )?;
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let rows = st.query_map(
            params![
                q.device,
                q.since_ms.unwrap_or(i64::MIN),
                i64::from(q.unacked),
                limit
            ],
            |r| {
                let json: String = r.get(1)?;
                let by: Option<String> = r.get(2)?;
                let at: Option<i64> = r.get(3)?;
                Ok((r.get::<_, String>(0)?, json, by.zip(at)))
            },
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (device, json, acked) = row?;
            // Stored by this registry from a verified record; one that does
            // not read back is skipped rather than failing the listing.
            if let Ok(alarm) = serde_json::from_str(&json) {
                out.push(AlarmRow {
                    device,
                    alarm,
                    acked,
                });
            }
        }
        Ok(out)
    }

    /// Acknowledges alarm `id`: `None` when unknown, else whether it was not
    /// acknowledged before.
    ///
    /// # Errors
    /// SQLite.
    pub fn ack_alarm(
        &mut self,
        id: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<Option<bool>, RegistryError> {
        let acked: Option<Option<String>> = self
            .db
            .query_row("SELECT acked_by FROM alarm WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        match acked {
            None => Ok(None),
            Some(Some(_)) => Ok(Some(false)),
            Some(None) => {
                self.db.execute(
                    "UPDATE alarm SET acked_by = ?2, acked_ms = ?3 WHERE id = ?1",
                    params![id, by, now_ms],
                )?;
                Ok(Some(true))
            }
        }
    }
}

impl SqliteRegistry {
    /// Sets and removes labels of a device; its labels after.
    ///
    /// # Errors
    /// SQLite; more labels than a device may carry.
    pub fn set_labels(&mut self, c: &LabelChange) -> Result<Vec<(String, String)>, RegistryError> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now: std::collections::BTreeMap<String, String> = {
            let mut st = tx.prepare("SELECT key, value FROM device_label WHERE device = ?1")?;
            let rows = st.query_map([&c.device], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let after = apply_labels(now, c)?;
        tx.execute("DELETE FROM device_label WHERE device = ?1", [&c.device])?;
        for (k, v) in &after {
            tx.execute(
                "INSERT INTO device_label (device, key, value) VALUES (?1, ?2, ?3)",
                params![c.device, k, v],
            )?;
        }
        tx.commit()?;
        Ok(after)
    }

    /// Every label: (device, key, value).
    ///
    /// # Errors
    /// SQLite.
    pub fn labels(&self) -> Result<Vec<(String, String, String)>, RegistryError> {
        let mut st = self
            .db
            .prepare("SELECT device, key, value FROM device_label ORDER BY device, key")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Up to `limit` changes after `after`, in order (rows of a kind this
    /// version does not know are skipped).
    ///
    /// # Errors
    /// SQLite.
    pub fn changes(&self, after: u64, limit: usize) -> Result<Vec<Change>, RegistryError> {
        let mut st = self.db.prepare_cached(
            "SELECT id, kind, subject FROM change_log WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = st.query_map(params![after as i64, limit], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get(2)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, kind, subject) = row?;
            if let Some(kind) = ChangeKind::parse(&kind) {
                out.push(Change {
                    id: id as u64,
                    kind,
                    subject,
                });
            }
        }
        Ok(out)
    }

    /// The newest change's id, 0 when none.
    ///
    /// # Errors
    /// SQLite.
    pub fn change_head(&self) -> Result<u64, RegistryError> {
        let id: i64 =
            self.db
                .query_row("SELECT COALESCE(MAX(id), 0) FROM change_log", [], |r| {
                    r.get(0)
                })?;
        Ok(id as u64)
    }
}

/// Records a change in the transaction that makes it.
pub(super) fn log_change(
    db: &Connection,
    kind: ChangeKind,
    subject: &str,
    now_ms: i64,
) -> rusqlite::Result<()> {
    db.execute(
        "INSERT INTO change_log (kind, subject, at_ms) VALUES (?1, ?2, ?3)",
        params![kind.as_str(), subject, now_ms],
    )?;
    Ok(())
}

/// A device's certificate state: revoked at, serial, seen, previous serial,
/// handover end.
type CertRow = (
    Option<i64>,
    Option<String>,
    bool,
    Option<String>,
    Option<i64>,
);

fn consumer_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ConsumerRow> {
    Ok(ConsumerRow {
        name: r.get(0)?,
        serial: r.get(1)?,
        not_after_ms: r.get(2)?,
        created_by: r.get(3)?,
        created_ms: r.get(4)?,
        revoked_ms: r.get(5)?,
    })
}

/// Appends one device's batch inside `tx` (see `Registry::append_audit`).
fn append_one(
    tx: &rusqlite::Transaction<'_>,
    device: &str,
    entries: &[Record],
) -> Result<Result<usize, String>, RegistryError> {
    let head: Option<(i64, String, Option<String>)> = tx
        .query_row(
            "SELECT head_seq, head_hash, broken FROM edge_audit_head WHERE device = ?1",
            [device],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    if let Some((_, _, Some(broken))) = &head {
        return Ok(Err(format!("chain already marked broken: {broken}")));
    }
    // Records this registry holds already (another hub sharing it
    // collected them) are skipped if they are the same records.
    let known = head.as_ref().map_or(0, |h| h.0 as u64);
    for e in entries.iter().filter(|e| e.seq <= known) {
        let stored: Option<String> = tx
            .query_row(
                "SELECT json FROM edge_audit WHERE device = ?1 AND seq = ?2",
                params![device, e.seq as i64],
                |r| r.get(0),
            )
            .optional()?;
        let same = stored
            .and_then(|j| serde_json::from_str::<Record>(&j).ok())
            .is_none_or(|s| s.hash == e.hash);
        if !same {
            let p = format!("record {} differs from the one collected before", e.seq);
            tx.execute(
                "UPDATE edge_audit_head SET broken = ?2 WHERE device = ?1",
                params![device, p],
            )?;
            return Ok(Err(p));
        }
    }
    let entries: Vec<&Record> = entries.iter().filter(|e| e.seq > known).collect();
    let Some(first) = entries.first() else {
        return Ok(Ok(0));
    };
    let (anchor_seq, anchor_hash) = match &head {
        Some((seq, hash, _)) => (*seq as u64, audit::from_hex(hash).unwrap_or(audit::GENESIS)),
        None => (first.seq.saturating_sub(1), first.prev_hash),
    };
    let checked = continue_chain(device, (anchor_seq, anchor_hash), &entries);
    let last = match checked {
        Ok(last) => last,
        Err(p) => {
            tx.execute(
            "INSERT INTO edge_audit_head (device, anchor_seq, anchor_hash, head_seq, head_hash, broken)
             VALUES (?1, ?2, ?3, ?2, ?3, ?4)
             ON CONFLICT (device) DO UPDATE SET broken = ?4",
            params![device, anchor_seq as i64, hex(&anchor_hash), p],
        )?;
            return Ok(Err(p));
        }
    };
    {
        // One statement prepared for the batch, not one per record.
        let mut insert = tx.prepare_cached(
            "INSERT INTO edge_audit (device, seq, time_ms, json) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for e in &entries {
            insert.execute(params![
                device,
                e.seq as i64,
                e.event.time_ms,
                serde_json::to_string(e).unwrap_or_default()
            ])?;
        }
    }
    tx.execute(
        "INSERT INTO edge_audit_head (device, anchor_seq, anchor_hash, head_seq, head_hash)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (device) DO UPDATE SET head_seq = ?4, head_hash = ?5",
        params![
            device,
            anchor_seq as i64,
            hex(&anchor_hash),
            last.0 as i64,
            hex(&last.1)
        ],
    )?;
    Ok(Ok(entries.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_core::audit::Event;

    fn reg() -> (tempfile::TempDir, SqliteRegistry) {
        let d = tempfile::tempdir().expect("tempdir");
        let r = SqliteRegistry::open(d.path()).expect("open");
        (d, r)
    }

    #[test]
    fn tokens_are_single_use_and_bound_to_their_device() {
        let (_d, mut r) = reg();
        r.create_token("e1", "t1", 1_000, "alice", 0)
            .expect("token");
        let sign = || Ok(("cert", 99, "01".to_owned()));
        assert!(
            matches!(r.enroll("t1", "e2", 10, sign), Err(RegistryError::Token(m)) if m.contains("another device"))
        );
        assert!(
            matches!(r.enroll("nope", "e1", 10, sign), Err(RegistryError::Token(m)) if m.contains("unknown"))
        );
        assert_eq!(r.enroll("t1", "e1", 10, sign).expect("enroll"), "cert");
        assert!(
            matches!(r.enroll("t1", "e1", 11, sign), Err(RegistryError::Token(m)) if m.contains("used"))
        );
        r.create_token("e1", "t2", 1_000, "alice", 0)
            .expect("token");
        assert!(
            matches!(r.enroll("t2", "e1", 2_000, sign), Err(RegistryError::Token(m)) if m.contains("expired"))
        );
        // A failed signature uses nothing up (e1 is enrolled now: the token
        // is one that may replace it).
        r.create_token_for("e1", "t3", 1_000, ("alice", 0), true)
            .expect("token");
        assert!(
            r.enroll::<()>("t3", "e1", 10, || Err(RegistryError::Token("x")))
                .is_err()
        );
        assert!(r.enroll("t3", "e1", 10, sign).is_ok());
        assert_eq!(
            r.device("e1").expect("row").expect("known").not_after_ms,
            Some(99)
        );
        // Revocation voids open tokens and refuses new ones.
        r.create_token("e1", "t4", 1_000, "alice", 0)
            .expect("token");
        assert!(r.revoke("e1", "bob", 20).expect("revoke"));
        assert!(!r.revoke("e1", "bob", 21).expect("again"));
        assert!(r.enroll("t4", "e1", 30, sign).is_err());
        assert!(matches!(
            r.create_token("e1", "t5", 1_000, "alice", 0),
            Err(RegistryError::Revoked(_))
        ));
        // A replacing token made after the revocation brings it back; one
        // made before it is void.
        r.create_token_for("e2", "t6", 1_000, ("sue", 0), true)
            .expect("replacing token");
        assert!(r.revoke("e2", "bob", 20).expect("revoke"));
        assert!(r.enroll("t6", "e2", 30, sign).is_err());
        assert!(r.is_revoked("e2").expect("revoked?"));
        r.create_token_for("e2", "t7", 1_000, ("sue", 40), true)
            .expect("replacing token after the revocation");
        r.enroll("t7", "e2", 50, sign).expect("re-enrolled");
        assert!(!r.is_revoked("e2").expect("revoked?"));
    }

    #[test]
    fn accounts_hold_one_role() {
        let (_d, mut r) = reg();
        r.add_account("alice", AdminRole::System, "d1", 0)
            .expect("add");
        assert!(matches!(
            r.add_account("alice", AdminRole::Audit, "d2", 0),
            Err(RegistryError::AccountExists(_))
        ));
        assert_eq!(
            r.account("d1").expect("q"),
            Some(("alice".into(), AdminRole::System))
        );
        assert_eq!(r.account("d2").expect("q"), None);
    }

    #[test]
    fn config_versions_grow() {
        let (_d, mut r) = reg();
        r.set_applied("e1", 0, Some("base"), "{}", 0)
            .expect("state");
        assert_eq!(r.push_config("e1", "a", "alice", 1).expect("push"), 1);
        assert_eq!(r.push_config("e1", "b", "alice", 2).expect("push"), 2);
        assert_eq!(r.desired("e1").expect("q"), Some((2, "b".into())));
        r.set_applied("e1", 7, Some("x"), "{}", 3).expect("state");
        assert_eq!(r.push_config("e1", "c", "alice", 4).expect("push"), 8);
        r.set_applied("e1", 8, None, "{}", 5).expect("state");
        assert_eq!(r.applied("e1").expect("q"), Some((8, "c".into())));
    }

    fn chain(device: &str, n: u64) -> Vec<Record> {
        let mut prev = audit::GENESIS;
        (1..=n)
            .map(|i| {
                let r = Record::chain(
                    i,
                    Event {
                        time_ms: i as i64 * 1000,
                        device: device.into(),
                        subject: "s".into(),
                        object: "o".into(),
                        event: "relay.open".into(),
                        outcome: "allow".into(),
                        rule: String::new(),
                        detail: String::new(),
                    },
                    prev,
                );
                prev = r.hash;
                r
            })
            .collect()
    }

    #[test]
    fn collected_audit_must_continue_the_chain() {
        let (_d, mut r) = reg();
        let c = chain("e1", 10);
        assert_eq!(r.audit_next("e1").expect("next"), 1);
        assert_eq!(r.append_audit("e1", &c[..4]).expect("sql"), Ok(4));
        assert_eq!(r.audit_next("e1").expect("next"), 5);
        // A gap: nothing stored, the chain marked broken.
        assert!(r.append_audit("e1", &c[5..]).expect("sql").is_err());
        assert!(r.append_audit("e1", &c[4..]).expect("sql").is_err());
        let row = r.device("e1").expect("q");
        assert!(row.is_none() || row.expect("row").audit.expect("audit").1.is_some());
        let (_, _, head, _, continuous, records) =
            r.audit_export("e1", 0).expect("q").expect("some");
        assert_eq!((head, continuous, records.len()), (4, false, 4));

        // What another hub sharing the registry collected already is skipped
        // when it is the same, and breaks the chain when it differs.
        let c4 = chain("e4", 6);
        assert_eq!(r.append_audit("e4", &c4[..4]).expect("sql"), Ok(4));
        assert_eq!(r.append_audit("e4", &c4[..6]).expect("sql"), Ok(2));
        assert_eq!(r.append_audit("e4", &c4[2..]).expect("sql"), Ok(0));
        let mut forged = c4.clone();
        forged[1].hash = forged[2].hash;
        assert!(r.append_audit("e4", &forged).expect("sql").is_err());

        // Another device: an edited record is refused.
        let mut c2 = chain("e2", 3);
        c2[1].event.detail = "edited".into();
        assert!(r.append_audit("e2", &c2).expect("sql").is_err());

        // Export since a time starts there and links to the head.
        let c3 = chain("e3", 6);
        assert_eq!(r.append_audit("e3", &c3).expect("sql"), Ok(6));
        let (a_seq, _, head, _, ok, records) =
            r.audit_export("e3", 4_000).expect("q").expect("some");
        assert_eq!((a_seq, head, ok, records.len()), (3, 6, true, 3));
        assert_eq!(r.prune_audit(5_500).expect("prune"), 5 + 3 + 5);
    }
}
