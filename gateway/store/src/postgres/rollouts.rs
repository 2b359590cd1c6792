//! The PostgreSQL registry's share of running a province: pages of the
//! device table, config templates, devices' template variables and rollouts,
//! as in the SQLite engine ([`crate::sqlite::rollouts`]). A rollout's hold on
//! its devices is one `rollout_member` row per device, claimed with one
//! `INSERT ... ON CONFLICT` over all of them: two hubs starting rollouts of
//! the same devices at once queue on those rows, and the second is refused.

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;

use gateway_core::selector::Stored;

use super::changes;
use super::registry::PgRegistry;
use crate::device_query::{self, Param};
use crate::registry::{
    ChangeKind, DeviceRow, DeviceState, DevicesPage, Heartbeat, Members, NewRollout, NewTemplate,
    RegistryError, RolloutRow, RolloutUpdate, TemplateRow, VarsChange, apply_vars,
};

/// The tables (migration 3).
pub const SCHEMA: &str = "
CREATE TABLE template (
    name    TEXT NOT NULL,
    version BIGINT NOT NULL,
    text    TEXT NOT NULL,
    by_account TEXT NOT NULL,
    at_ms   BIGINT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE device_var (
    device TEXT NOT NULL,
    name   TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (device, name)
);
CREATE TABLE rollout (
    id         TEXT PRIMARY KEY,
    rev        BIGINT NOT NULL,
    json       TEXT NOT NULL,
    active     BOOLEAN NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX rollout_by_created ON rollout (created_ms);
CREATE TABLE rollout_member (
    device  TEXT PRIMARY KEY,
    rollout TEXT NOT NULL
);
CREATE INDEX rollout_member_by_rollout ON rollout_member (rollout);
";

/// How this engine joins a device's audit head.
const AUDIT_JOIN: &str = "LEFT JOIN edge_audit_head h ON h.device = ids.id AND h.head_seq >= 0";

type R<T> = Result<T, RegistryError>;

fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn template_row(r: &tokio_postgres::Row) -> TemplateRow {
    TemplateRow {
        name: r.get(0),
        version: u64_of(r.get(1)),
        text: r.get(2),
        by: r.get(3),
        at_ms: r.get(4),
    }
}

fn rollout_row(r: &tokio_postgres::Row) -> RolloutRow {
    RolloutRow {
        id: r.get(0),
        rev: u64_of(r.get(1)),
        json: r.get(2),
        active: r.get(3),
    }
}

/// Claims `devices` for `rollout`; the first one another rollout holds.
async fn claim(tx: &impl GenericClient, rollout: &str, devices: &[String]) -> R<()> {
    let mut unique: Vec<&String> = devices.iter().collect();
    unique.sort();
    unique.dedup();
    let unique: Vec<String> = unique.into_iter().cloned().collect();
    let n = tx
        .execute(
            "INSERT INTO rollout_member (device, rollout) SELECT d, $2 FROM unnest($1::text[]) d
             ON CONFLICT (device) DO UPDATE SET rollout = EXCLUDED.rollout
             WHERE rollout_member.rollout = EXCLUDED.rollout",
            &[&unique, &rollout],
        )
        .await?;
    if usize::try_from(n).unwrap_or(0) < unique.len() {
        let held = tx
            .query_opt(
                "SELECT device, rollout FROM rollout_member
                 WHERE device = ANY($1) AND rollout <> $2 ORDER BY device LIMIT 1",
                &[&unique, &rollout],
            )
            .await?;
        if let Some(h) = held {
            return Err(RegistryError::InRollout {
                device: h.get(0),
                rollout: h.get(1),
            });
        }
    }
    Ok(())
}

impl PgRegistry {
    pub(super) async fn heartbeats(&self, beats: Vec<Heartbeat>) -> R<()> {
        if beats.is_empty() {
            return Ok(());
        }
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        let certs: Vec<(&String, i64)> = beats
            .iter()
            .filter_map(|b| b.not_after_ms.map(|t| (&b.device, t)))
            .collect();
        if !certs.is_empty() {
            let ids: Vec<&String> = certs.iter().map(|c| c.0).collect();
            let times: Vec<i64> = certs.iter().map(|c| c.1).collect();
            tx.execute(
                "INSERT INTO device (id, enrolled_ms, not_after_ms)
                 SELECT id, 0, t FROM unnest($1::text[], $2::bigint[]) AS u(id, t)
                 ON CONFLICT (id) DO UPDATE SET not_after_ms = EXCLUDED.not_after_ms",
                &[&ids, &times],
            )
            .await?;
        }
        // One row per device (the newest), in a fixed order: two hubs
        // writing overlapping batches lock the rows in the same order.
        let mut newest: BTreeMap<&str, &Heartbeat> = BTreeMap::new();
        for b in &beats {
            let keep = newest
                .get(b.device.as_str())
                .is_none_or(|o| o.now_ms <= b.now_ms);
            if keep {
                newest.insert(&b.device, b);
            }
        }
        let ids: Vec<&str> = newest.keys().copied().collect();
        let times: Vec<i64> = newest.values().map(|b| b.now_ms).collect();
        let jsons: Vec<&str> = newest.values().map(|b| b.json.as_str()).collect();
        tx.execute(
            "INSERT INTO status (device, last_ms, json)
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[])
             ON CONFLICT (device) DO UPDATE SET last_ms = EXCLUDED.last_ms, json = EXCLUDED.json",
            &[&ids, &times, &jsons],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn devices_page(
        &self,
        after: Option<String>,
        limit: usize,
        filter: Stored,
    ) -> R<DevicesPage> {
        let Some((sql, binds)) =
            device_query::page(&after.unwrap_or_default(), limit, &filter, AUDIT_JOIN)
        else {
            return Ok(DevicesPage::default());
        };
        let binds: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = binds
            .into_iter()
            .map(|p| -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
                match p {
                    Param::Text(t) => Box::new(t),
                    Param::Int(n) => Box::new(n),
                }
            })
            .collect();
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = binds
            .iter()
            .map(|b| b.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let c = self.pg.client().await?;
        let rows: Vec<DeviceRow> = c
            .query(&sql, &refs)
            .await?
            .iter()
            .map(|r| {
                let id: String = r.get(0);
                let cert = r.get::<_, Option<i64>>(1).map(|e| (e, r.get(2), r.get(3)));
                let state = DeviceState {
                    status: r.get::<_, Option<i64>>(4).map(|t| (t, r.get(5))),
                    desired: r.get::<_, Option<i64>>(6).map(u64_of),
                    applied: r
                        .get::<_, Option<i64>>(7)
                        .map(|a| (u64_of(a), r.get(8), r.get(9))),
                    audit: r.get::<_, Option<i64>>(10).map(|h| (u64_of(h), r.get(11))),
                };
                DeviceRow::assemble(&id, cert, state).unwrap_or_else(|| DeviceRow::unknown(&id))
            })
            .collect();
        let labels = match (rows.first(), rows.last()) {
            (Some(first), Some(last)) => c
                .query(
                    "SELECT device, key, value FROM device_label
                     WHERE device >= $1 AND device <= $2 ORDER BY device, key",
                    &[&first.id, &last.id],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
            _ => Vec::new(),
        };
        Ok(DevicesPage { rows, labels })
    }

    pub(super) async fn put_template(&self, t: NewTemplate) -> R<u64> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        // Two pushes of one name queue on the table's lock for that name.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('gw-template:' || $1))",
            &[&t.name],
        )
        .await?;
        let max: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM template WHERE name = $1",
                &[&t.name],
            )
            .await?
            .get(0);
        tx.execute(
            "INSERT INTO template (name, version, text, by_account, at_ms) VALUES ($1, $2, $3, $4, $5)",
            &[&t.name, &(max + 1), &t.text, &t.by, &t.now_ms],
        )
        .await?;
        tx.commit().await?;
        Ok(u64_of(max + 1))
    }

    pub(super) async fn template(
        &self,
        name: String,
        version: Option<u64>,
    ) -> R<Option<TemplateRow>> {
        let c = self.pg.client().await?;
        let v = version.map(i64_of);
        Ok(c.query_opt(
            "SELECT name, version, text, by_account, at_ms FROM template
             WHERE name = $1 AND ($2::BIGINT IS NULL OR version = $2)
             ORDER BY version DESC LIMIT 1",
            &[&name, &v],
        )
        .await?
        .as_ref()
        .map(template_row))
    }

    pub(super) async fn templates(&self) -> R<Vec<TemplateRow>> {
        let c = self.pg.client().await?;
        Ok(c.query(
            "SELECT DISTINCT ON (name) name, version, text, by_account, at_ms FROM template
             ORDER BY name, version DESC",
            &[],
        )
        .await?
        .iter()
        .map(template_row)
        .collect())
    }

    pub(super) async fn set_vars(&self, v: VarsChange) -> R<Vec<(String, String)>> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('gw-vars:' || $1))",
            &[&v.device],
        )
        .await?;
        let now: BTreeMap<String, String> = tx
            .query(
                "SELECT name, value FROM device_var WHERE device = $1",
                &[&v.device],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let after = apply_vars(now, &v)?;
        tx.execute("DELETE FROM device_var WHERE device = $1", &[&v.device])
            .await?;
        for (k, value) in &after {
            tx.execute(
                "INSERT INTO device_var (device, name, value) VALUES ($1, $2, $3)",
                &[&v.device, k, value],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(after)
    }

    pub(super) async fn vars(&self, devices: Vec<String>) -> R<Vec<(String, String, String)>> {
        let c = self.pg.client().await?;
        let rows = if devices.is_empty() {
            c.query(
                "SELECT device, name, value FROM device_var ORDER BY device, name",
                &[],
            )
            .await?
        } else {
            c.query(
                "SELECT device, name, value FROM device_var WHERE device = ANY($1)
                 ORDER BY device, name",
                &[&devices],
            )
            .await?
        };
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    pub(super) async fn create_rollout(&self, n: NewRollout) -> R<()> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        claim(&tx, &n.id, &n.devices).await?;
        tx.execute(
            "INSERT INTO rollout (id, rev, json, active, created_ms, updated_ms)
             VALUES ($1, 1, $2, TRUE, $3, $3)",
            &[&n.id, &n.json, &n.now_ms],
        )
        .await?;
        changes::record(&tx, ChangeKind::Rollout, &n.id, n.now_ms).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn rollout(&self, id: String) -> R<Option<RolloutRow>> {
        let c = self.pg.client().await?;
        Ok(c.query_opt(
            "SELECT id, rev, json, active FROM rollout WHERE id = $1",
            &[&id],
        )
        .await?
        .as_ref()
        .map(rollout_row))
    }

    pub(super) async fn rollouts(&self, active: bool) -> R<Vec<RolloutRow>> {
        let c = self.pg.client().await?;
        Ok(c.query(
            "SELECT id, rev, json, active FROM rollout WHERE active OR NOT $1
             ORDER BY created_ms DESC, id DESC LIMIT 1000",
            &[&active],
        )
        .await?
        .iter()
        .map(rollout_row)
        .collect())
    }

    pub(super) async fn update_rollout(&self, u: RolloutUpdate) -> R<bool> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        let n = tx
            .execute(
                "UPDATE rollout SET rev = rev + 1, json = $3, active = $4, updated_ms = $5
                 WHERE id = $1 AND rev = $2",
                &[&u.id, &i64_of(u.rev), &u.json, &u.active, &u.now_ms],
            )
            .await?;
        if n == 0 {
            return Ok(false);
        }
        match &u.members {
            Members::Keep => {}
            Members::Release => {
                tx.execute("DELETE FROM rollout_member WHERE rollout = $1", &[&u.id])
                    .await?;
            }
            Members::Claim(devices) => claim(&tx, &u.id, devices).await?,
        }
        changes::record(&tx, ChangeKind::Rollout, &u.id, u.now_ms).await?;
        tx.commit().await?;
        Ok(true)
    }
}
