//! The SQLite registry's share of running a province: pages of the device
//! table, config templates, devices' template variables and rollouts (their
//! documents compared-and-swapped by revision, their hold on devices in
//! `rollout_member`, one row per device).

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::registry::{SqliteRegistry, log_change};
use crate::device_query::{self, Param};
use crate::registry::{
    ChangeKind, DeviceRow, DeviceState, DevicesPage, Heartbeat, Members, NewRollout, NewTemplate,
    RegistryError, RolloutRow, RolloutUpdate, TemplateRow, VarsChange, apply_vars,
};

/// The tables (created with the registry's).
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS template (
    name   TEXT NOT NULL,
    version INTEGER NOT NULL,
    text   TEXT NOT NULL,
    by_account TEXT NOT NULL,
    at_ms  INTEGER NOT NULL,
    PRIMARY KEY (name, version)
) STRICT;
CREATE TABLE IF NOT EXISTS device_var (
    device TEXT NOT NULL,
    name   TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (device, name)
) STRICT;
CREATE TABLE IF NOT EXISTS rollout (
    id         TEXT PRIMARY KEY,
    rev        INTEGER NOT NULL,
    json       TEXT NOT NULL,
    active     INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS rollout_by_created ON rollout (created_ms);
-- A device is in at most one active rollout: its row here names it.
CREATE TABLE IF NOT EXISTS rollout_member (
    device  TEXT PRIMARY KEY,
    rollout TEXT NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS rollout_member_by_rollout ON rollout_member (rollout);
";

/// How this engine joins a device's audit head (the page query itself is
/// `device_query`'s, shared with PostgreSQL).
const AUDIT_JOIN: &str = "LEFT JOIN edge_audit_head h ON h.device = ids.id";

fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Claims `devices` for `rollout` in `tx`; the first one held elsewhere.
fn claim(
    tx: &rusqlite::Transaction<'_>,
    rollout: &str,
    devices: &[String],
) -> Result<(), RegistryError> {
    let mut held = tx.prepare_cached("SELECT rollout FROM rollout_member WHERE device = ?1")?;
    let mut put = tx.prepare_cached(
        "INSERT INTO rollout_member (device, rollout) VALUES (?1, ?2)
         ON CONFLICT (device) DO UPDATE SET rollout = ?2",
    )?;
    for d in devices {
        let other: Option<String> = held.query_row([d], |r| r.get(0)).optional()?;
        if let Some(other) = other.filter(|o| o != rollout) {
            return Err(RegistryError::InRollout {
                device: d.clone(),
                rollout: other,
            });
        }
        put.execute(params![d, rollout])?;
    }
    Ok(())
}

fn rollout_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RolloutRow> {
    Ok(RolloutRow {
        id: r.get(0)?,
        rev: u64_of(r.get(1)?),
        json: r.get(2)?,
        active: r.get::<_, i64>(3)? != 0,
    })
}

impl SqliteRegistry {
    /// Many heartbeats in one transaction.
    ///
    /// # Errors
    /// SQLite.
    pub fn heartbeats(&mut self, beats: &[Heartbeat]) -> Result<(), RegistryError> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut status = tx.prepare_cached(
                "INSERT INTO status (device, last_ms, json) VALUES (?1, ?2, ?3)
                 ON CONFLICT (device) DO UPDATE SET last_ms = ?2, json = ?3",
            )?;
            let mut cert = tx.prepare_cached(
                "INSERT INTO device (id, enrolled_ms, not_after_ms) VALUES (?1, 0, ?2)
                 ON CONFLICT (id) DO UPDATE SET not_after_ms = ?2",
            )?;
            for b in beats {
                if let Some(t) = b.not_after_ms {
                    cert.execute(params![b.device, t])?;
                }
                status.execute(params![b.device, b.now_ms, b.json])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A page of devices after `after` (see the trait).
    ///
    /// # Errors
    /// SQLite.
    pub fn devices_page(
        &self,
        after: Option<&str>,
        limit: usize,
        filter: &gateway_core::selector::Stored,
    ) -> Result<DevicesPage, RegistryError> {
        let Some((sql, binds)) = device_query::page(after.unwrap_or(""), limit, filter, AUDIT_JOIN)
        else {
            return Ok(DevicesPage::default());
        };
        // `?N`: SQLite's numbered parameters (`$N` would be named ones).
        let mut st = self.db.prepare_cached(&sql.replace('$', "?"))?;
        let binds = binds.into_iter().map(|p| match p {
            Param::Text(t) => rusqlite::types::Value::Text(t),
            Param::Int(n) => rusqlite::types::Value::Integer(n),
        });
        let rows = st.query_map(rusqlite::params_from_iter(binds), |r| {
            let id: String = r.get(0)?;
            let cert = r
                .get::<_, Option<i64>>(1)?
                .map(|e| Ok::<_, rusqlite::Error>((e, r.get(2)?, r.get(3)?)))
                .transpose()?;
            let status = r
                .get::<_, Option<i64>>(4)?
                .map(|t| Ok::<_, rusqlite::Error>((t, r.get(5)?)))
                .transpose()?;
            let applied = r
                .get::<_, Option<i64>>(7)?
                .map(|a| Ok::<_, rusqlite::Error>((u64_of(a), r.get(8)?, r.get(9)?)))
                .transpose()?;
            let audit = r
                .get::<_, Option<i64>>(10)?
                .map(|h| Ok::<_, rusqlite::Error>((u64_of(h), r.get(11)?)))
                .transpose()?;
            let state = DeviceState {
                status,
                desired: r.get::<_, Option<i64>>(6)?.map(u64_of),
                applied,
                audit,
            };
            Ok(DeviceRow::assemble(&id, cert, state).unwrap_or_else(|| DeviceRow::unknown(&id)))
        })?;
        let rows: Vec<DeviceRow> = rows.collect::<Result<_, _>>()?;
        let labels = match (rows.first(), rows.last()) {
            (Some(first), Some(last)) => {
                let mut st = self.db.prepare_cached(
                    "SELECT device, key, value FROM device_label
                     WHERE device >= ?1 AND device <= ?2 ORDER BY device, key",
                )?;
                let found = st.query_map(params![first.id, last.id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
                found.collect::<Result<_, _>>()?
            }
            _ => Vec::new(),
        };
        Ok(DevicesPage { rows, labels })
    }

    /// Stores a template version; its number.
    ///
    /// # Errors
    /// SQLite.
    pub fn put_template(&mut self, t: &NewTemplate) -> Result<u64, RegistryError> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let max: i64 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM template WHERE name = ?1",
            [&t.name],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO template (name, version, text, by_account, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![t.name, max + 1, t.text, t.by, t.now_ms],
        )?;
        tx.commit()?;
        Ok(u64_of(max + 1))
    }

    /// A template version (`None`: the newest).
    ///
    /// # Errors
    /// SQLite.
    pub fn template(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<Option<TemplateRow>, RegistryError> {
        let v = version.map_or(i64::MAX, |v| i64::try_from(v).unwrap_or(i64::MAX));
        Ok(self
            .db
            .query_row(
                "SELECT name, version, text, by_account, at_ms FROM template
                 WHERE name = ?1 AND version <= ?2 AND (?3 = 0 OR version = ?2)
                 ORDER BY version DESC LIMIT 1",
                params![name, v, i64::from(version.is_some())],
                template_row,
            )
            .optional()?)
    }

    /// The newest version of every template.
    ///
    /// # Errors
    /// SQLite.
    pub fn templates(&self) -> Result<Vec<TemplateRow>, RegistryError> {
        let mut st = self.db.prepare(
            "SELECT name, version, text, by_account, at_ms FROM template t
             WHERE version = (SELECT MAX(version) FROM template u WHERE u.name = t.name)
             ORDER BY name",
        )?;
        let rows = st.query_map([], template_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sets and removes a device's variables; its variables after.
    ///
    /// # Errors
    /// SQLite; a bad name or value; too many.
    pub fn set_vars(&mut self, c: &VarsChange) -> Result<Vec<(String, String)>, RegistryError> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now: BTreeMap<String, String> = {
            let mut st = tx.prepare("SELECT name, value FROM device_var WHERE device = ?1")?;
            let rows = st.query_map([&c.device], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let after = apply_vars(now, c)?;
        tx.execute("DELETE FROM device_var WHERE device = ?1", [&c.device])?;
        for (k, v) in &after {
            tx.execute(
                "INSERT INTO device_var (device, name, value) VALUES (?1, ?2, ?3)",
                params![c.device, k, v],
            )?;
        }
        tx.commit()?;
        Ok(after)
    }

    /// Variables of `devices` (all when empty).
    ///
    /// # Errors
    /// SQLite.
    pub fn vars(&self, devices: &[String]) -> Result<Vec<(String, String, String)>, RegistryError> {
        let row = |r: &rusqlite::Row<'_>| Ok((r.get(0)?, r.get(1)?, r.get(2)?));
        if devices.is_empty() {
            let mut st = self
                .db
                .prepare("SELECT device, name, value FROM device_var ORDER BY device, name")?;
            let rows = st.query_map([], row)?;
            return Ok(rows.collect::<Result<_, _>>()?);
        }
        let mut st = self.db.prepare_cached(
            "SELECT device, name, value FROM device_var WHERE device = ?1 ORDER BY name",
        )?;
        let mut out = Vec::new();
        for d in devices {
            let rows = st.query_map([d], row)?;
            for r in rows {
                out.push(r?);
            }
        }
        Ok(out)
    }

    /// Stores a rollout holding its devices.
    ///
    /// # Errors
    /// [`RegistryError::InRollout`]; SQLite.
    pub fn create_rollout(&mut self, r: &NewRollout) -> Result<(), RegistryError> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        claim(&tx, &r.id, &r.devices)?;
        tx.execute(
            "INSERT INTO rollout (id, rev, json, active, created_ms, updated_ms)
             VALUES (?1, 1, ?2, 1, ?3, ?3)",
            params![r.id, r.json, r.now_ms],
        )?;
        log_change(&tx, ChangeKind::Rollout, &r.id, r.now_ms)?;
        tx.commit()?;
        Ok(())
    }

    /// A rollout.
    ///
    /// # Errors
    /// SQLite.
    pub fn rollout(&self, id: &str) -> Result<Option<RolloutRow>, RegistryError> {
        Ok(self
            .db
            .query_row(
                "SELECT id, rev, json, active FROM rollout WHERE id = ?1",
                [id],
                rollout_row,
            )
            .optional()?)
    }

    /// Rollouts, newest first.
    ///
    /// # Errors
    /// SQLite.
    pub fn rollouts(&self, active: bool) -> Result<Vec<RolloutRow>, RegistryError> {
        let mut st = self.db.prepare_cached(
            "SELECT id, rev, json, active FROM rollout WHERE active = 1 OR ?1 = 0
             ORDER BY created_ms DESC, id DESC LIMIT 1000",
        )?;
        let rows = st.query_map([i64::from(active)], rollout_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Compare-and-swap of a rollout's document.
    ///
    /// # Errors
    /// [`RegistryError::InRollout`] for a claim; SQLite.
    pub fn update_rollout(&mut self, u: &RolloutUpdate) -> Result<bool, RegistryError> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let rev = i64::try_from(u.rev).unwrap_or(i64::MAX);
        let n = tx.execute(
            "UPDATE rollout SET rev = rev + 1, json = ?3, active = ?4, updated_ms = ?5
             WHERE id = ?1 AND rev = ?2",
            params![u.id, rev, u.json, i64::from(u.active), u.now_ms],
        )?;
        if n == 0 {
            return Ok(false);
        }
        match &u.members {
            Members::Keep => {}
            Members::Release => {
                tx.execute("DELETE FROM rollout_member WHERE rollout = ?1", [&u.id])?;
            }
            Members::Claim(devices) => claim(&tx, &u.id, devices)?,
        }
        log_change(&tx, ChangeKind::Rollout, &u.id, u.now_ms)?;
        tx.commit()?;
        Ok(true)
    }
}

fn template_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TemplateRow> {
    Ok(TemplateRow {
        name: r.get(0)?,
        version: u64_of(r.get(1)?),
        text: r.get(2)?,
        by: r.get(3)?,
        at_ms: r.get(4)?,
    })
}
