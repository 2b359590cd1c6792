//! The registry's PostgreSQL engine: the same invariants as the SQLite one
//! ([`crate::registry`]), kept across any number of hubs.
//!
//! Where SQLite serialises writers with `BEGIN IMMEDIATE`, this engine locks
//! the rows a write depends on (`SELECT ... FOR UPDATE`): a token redeemed at
//! two hubs at once is redeemed once, a device admitted at two hubs sees one
//! serial, two pushes get two versions. Changes other hubs act on are logged
//! in the same transaction ([`super::changes`]).

use std::sync::Arc;

use deadpool_postgres::GenericClient;
use gateway_core::audit::{self, Record};
use gateway_core::detect::Alarm;
use gateway_core::fleet::AdminRole;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{Pg, changes};
use crate::registry::{
    Admission, AlarmQuery, AlarmRow, AppliedReport, AuditExport, Change, ChangeKind,
    ConfigConnected, ConfigPush, ConfigSeen, ConsumerRow, DeviceRow, DeviceState, DevicesPage,
    Enrollment, FirmwarePart, FirmwareRow, Heartbeat, LabelChange, NewAccount, NewConsumer,
    NewFirmware, NewRollout, NewTemplate, NewToken, Registry, RegistryError, RegistryFuture,
    Renewal, RolloutRow, RolloutUpdate, SignCertificate, StoredFirmware, TemplateRow, VarsChange,
    apply_labels, continue_chain,
};

/// The registry of hubs sharing one PostgreSQL database.
#[derive(Clone, Debug)]
pub struct PgRegistry {
    pub(super) pg: Pg,
}

impl PgRegistry {
    /// The registry in `pg`'s database.
    pub fn new(pg: Pg) -> Self {
        PgRegistry { pg }
    }
}

type R<T> = Result<T, RegistryError>;

/// A device's certificate state: revoked at, serial, seen, previous serial
/// and until when it is handed over.
type CertRow = (
    Option<i64>,
    Option<String>,
    bool,
    Option<String>,
    Option<i64>,
);

fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn consumer_row(r: &Row) -> ConsumerRow {
    ConsumerRow {
        name: r.get(0),
        serial: r.get(1),
        not_after_ms: r.get(2),
        created_by: r.get(3),
        created_ms: r.get(4),
        revoked_ms: r.get(5),
    }
}

const CONSUMER_COLUMNS: &str =
    "SELECT name, serial, not_after_ms, created_by, created_ms, revoked_ms FROM consumer";

async fn is_revoked(c: &impl GenericClient, device: &str) -> R<bool> {
    Ok(c.query_opt(
        "SELECT 1 FROM device WHERE id = $1 AND revoked_ms IS NOT NULL",
        &[&device],
    )
    .await?
    .is_some())
}

async fn desired(c: &impl GenericClient, device: &str) -> R<Option<(u64, String)>> {
    Ok(c.query_opt(
        "SELECT version, text FROM config WHERE device = $1 ORDER BY version DESC LIMIT 1",
        &[&device],
    )
    .await?
    .map(|r| (u64_of(r.get(0)), r.get(1))))
}

async fn device_row(c: &impl GenericClient, id: &str) -> R<Option<DeviceRow>> {
    let dev = c
        .query_opt(
            "SELECT enrolled_ms, not_after_ms, revoked_ms FROM device WHERE id = $1",
            &[&id],
        )
        .await?
        .map(|r| (r.get::<_, i64>(0), r.get(1), r.get(2)));
    let status = c
        .query_opt("SELECT last_ms, json FROM status WHERE device = $1", &[&id])
        .await?
        .map(|r| (r.get(0), r.get(1)));
    let desired = desired(c, id).await?.map(|d| d.0);
    let applied = c
        .query_opt(
            "SELECT applied, result, result_ms FROM config_state WHERE device = $1",
            &[&id],
        )
        .await?
        .map(|r| (u64_of(r.get(0)), r.get(1), r.get(2)));
    let audit = c
        .query_opt(
            "SELECT head_seq, broken FROM edge_audit_head WHERE device = $1 AND head_seq >= 0",
            &[&id],
        )
        .await?
        .map(|r| (u64_of(r.get(0)), r.get(1)));
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

impl PgRegistry {
    async fn add_account(&self, a: NewAccount) -> R<()> {
        let c = self.pg.client().await?;
        let n = c
            .execute(
                "INSERT INTO account (name, role, digest, created_ms) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO NOTHING",
                &[&a.name, &a.role.as_str(), &a.digest, &a.now_ms],
            )
            .await?;
        if n == 0 {
            return Err(RegistryError::AccountExists(a.name));
        }
        Ok(())
    }

    async fn create_token(&self, t: NewToken) -> R<()> {
        let c = self.pg.client().await?;
        // A revoked device comes back only on a replacing token (the
        // security administrator's), made after the revocation.
        if !t.replaces && is_revoked(&c, &t.device).await? {
            return Err(RegistryError::Revoked(t.device));
        }
        c.execute(
            "INSERT INTO token (digest, device, expires_ms, created_by, created_ms, replaces)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &t.digest,
                &t.device,
                &t.expires_ms,
                &t.by,
                &t.now_ms,
                &t.replaces,
            ],
        )
        .await?;
        Ok(())
    }

    async fn enroll(&self, e: Enrollment, sign: SignCertificate) -> R<String> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        // The token's row is locked: a second redemption waits, then sees it used.
        let row = tx
            .query_opt(
                "SELECT device, expires_ms, used_ms, replaces, created_ms FROM token WHERE digest = $1 FOR UPDATE",
                &[&e.digest],
            )
            .await?;
        let Some(row) = row else {
            return Err(RegistryError::Token("unknown enrollment token"));
        };
        let (for_device, expires, used, replaces, created): (String, i64, Option<i64>, bool, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        if used.is_some() {
            return Err(RegistryError::Token(
                "this enrollment token was used already; ask central ops for a new one",
            ));
        }
        if for_device != e.device {
            return Err(RegistryError::Token(
                "this enrollment token was issued for another device id",
            ));
        }
        if expires < e.now_ms {
            return Err(RegistryError::Token(
                "this enrollment token has expired; ask central ops for a new one",
            ));
        }
        let dev = tx
            .query_opt(
                "SELECT revoked_ms, not_after_ms FROM device WHERE id = $1 FOR UPDATE",
                &[&e.device],
            )
            .await?;
        let (revoked, not_after): (Option<i64>, Option<i64>) =
            dev.map_or((None, None), |r| (r.get(0), r.get(1)));
        if !crate::registry::may_come_back(revoked, replaces, created) {
            return Err(RegistryError::Revoked(e.device));
        }
        if not_after.is_some_and(|t| t > e.now_ms) && !replaces {
            return Err(RegistryError::Token(
                "this device is enrolled with a valid certificate; re-enrolling it takes a token made with --replace by the security administrator",
            ));
        }
        let (out, not_after, serial) = sign()?;
        tx.execute(
            "UPDATE token SET used_ms = $2 WHERE digest = $1",
            &[&e.digest, &e.now_ms],
        )
        .await?;
        tx.execute(
            "INSERT INTO device (id, enrolled_ms, not_after_ms, serial, serial_seen) VALUES ($1, $2, $3, $4, FALSE)
             ON CONFLICT (id) DO UPDATE SET enrolled_ms = $2, not_after_ms = $3, serial = $4,
                 serial_seen = FALSE, prev_serial = NULL, prev_until_ms = NULL,
                 revoked_ms = NULL, revoked_by = NULL",
            &[&e.device, &e.now_ms, &not_after, &serial],
        )
        .await?;
        changes::record(&tx, ChangeKind::Enrolled, &e.device, e.now_ms).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn set_cert(&self, device: String, not_after_ms: i64) -> R<()> {
        let c = self.pg.client().await?;
        let st = c
            .prepare_cached(
                "INSERT INTO device (id, enrolled_ms, not_after_ms) VALUES ($1, 0, $2)
                 ON CONFLICT (id) DO UPDATE SET not_after_ms = $2",
            )
            .await?;
        c.execute(&st, &[&device, &not_after_ms]).await?;
        Ok(())
    }

    async fn renewed(&self, n: Renewal) -> R<()> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT serial, serial_seen, prev_serial FROM device WHERE id = $1 FOR UPDATE",
                &[&n.device],
            )
            .await?;
        let row: Option<(Option<String>, bool, Option<String>)> =
            row.map(|r| (r.get(0), r.get(1), r.get(2)));
        // The one in use: the current one if the device has connected with
        // it, else the one handed over from.
        let in_use = match row {
            Some((current, true, _)) | Some((current, false, None)) => current,
            Some((_, false, prev)) => prev,
            None => None,
        };
        let until = n.now_ms + n.handover_ms;
        tx.execute(
            "INSERT INTO device (id, enrolled_ms, not_after_ms, serial, serial_seen, prev_serial, prev_until_ms)
                 VALUES ($1, 0, $2, $3, FALSE, $4, $5)
             ON CONFLICT (id) DO UPDATE SET not_after_ms = $2, serial = $3, serial_seen = FALSE,
                 prev_serial = $4, prev_until_ms = $5",
            &[&n.device, &n.not_after_ms, &n.serial, &in_use, &until],
        )
        .await?;
        changes::record(&tx, ChangeKind::Renewed, &n.device, n.now_ms).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn admit(&self, device: String, serial: String, now_ms: i64) -> R<Admission> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT revoked_ms, serial, serial_seen, prev_serial, prev_until_ms FROM device WHERE id = $1 FOR UPDATE",
                &[&device],
            )
            .await?;
        let row: Option<CertRow> = row.map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)));
        let answer = match row {
            Some((Some(_), ..)) => Admission::Revoked,
            None | Some((None, None, ..)) => {
                tx.execute(
                    "INSERT INTO device (id, enrolled_ms, serial, serial_seen) VALUES ($1, 0, $2, TRUE)
                     ON CONFLICT (id) DO UPDATE SET serial = $2, serial_seen = TRUE",
                    &[&device, &serial],
                )
                .await?;
                Admission::FirstSeen
            }
            Some((None, Some(current), seen, ..)) if current == serial => {
                if !seen {
                    tx.execute(
                        "UPDATE device SET serial_seen = TRUE,
                             prev_until_ms = LEAST(COALESCE(prev_until_ms, $2), $2) WHERE id = $1",
                        &[&device, &now_ms],
                    )
                    .await?;
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
        tx.commit().await?;
        Ok(answer)
    }

    async fn live_serials(&self, ids: Vec<String>) -> R<Vec<(String, Vec<String>)>> {
        let c = self.pg.client().await?;
        let st = c
            .prepare_cached("SELECT serial, prev_serial FROM device WHERE id = $1")
            .await?;
        let mut out = Vec::new();
        for id in ids {
            if let Some(r) = c.query_opt(&st, &[&id]).await? {
                let (current, prev): (Option<String>, Option<String>) = (r.get(0), r.get(1));
                if let Some(current) = current {
                    out.push((id, std::iter::once(current).chain(prev).collect()));
                }
            }
        }
        Ok(out)
    }

    async fn revoked_among(&self, ids: Vec<String>) -> R<Vec<String>> {
        let c = self.pg.client().await?;
        let st = c
            .prepare_cached("SELECT 1 FROM device WHERE id = $1 AND revoked_ms IS NOT NULL")
            .await?;
        let mut out = Vec::new();
        for id in ids {
            if c.query_opt(&st, &[&id]).await?.is_some() {
                out.push(id);
            }
        }
        Ok(out)
    }

    async fn revoke(&self, device: String, by: String, now_ms: i64) -> R<bool> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        tx.execute(
            "INSERT INTO device (id, enrolled_ms) VALUES ($1, 0) ON CONFLICT (id) DO NOTHING",
            &[&device],
        )
        .await?;
        let n = tx
            .execute(
                "UPDATE device SET revoked_ms = $2, revoked_by = $3 WHERE id = $1 AND revoked_ms IS NULL",
                &[&device, &now_ms, &by],
            )
            .await?;
        if n == 0 {
            return Ok(false);
        }
        tx.execute(
            "UPDATE token SET used_ms = $2 WHERE device = $1 AND used_ms IS NULL",
            &[&device, &now_ms],
        )
        .await?;
        changes::record(&tx, ChangeKind::Revoked, &device, now_ms).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn heartbeat(&self, device: String, now_ms: i64, json: String) -> R<()> {
        let c = self.pg.client().await?;
        let st = c
            .prepare_cached(
                "INSERT INTO status (device, last_ms, json) VALUES ($1, $2, $3)
                 ON CONFLICT (device) DO UPDATE SET last_ms = $2, json = $3",
            )
            .await?;
        c.execute(&st, &[&device, &now_ms, &json]).await?;
        Ok(())
    }

    async fn push_config(&self, p: ConfigPush) -> R<u64> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        // Pushes of one device queue on its row of config_lock.
        tx.execute(
            "INSERT INTO config_lock (device) VALUES ($1) ON CONFLICT (device) DO NOTHING",
            &[&p.device],
        )
        .await?;
        tx.execute(
            "SELECT device FROM config_lock WHERE device = $1 FOR UPDATE",
            &[&p.device],
        )
        .await?;
        let applied: i64 = tx
            .query_opt(
                "SELECT applied FROM config_state WHERE device = $1",
                &[&p.device],
            )
            .await?
            .map_or(0, |r| r.get(0));
        let max: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM config WHERE device = $1",
                &[&p.device],
            )
            .await?
            .get(0);
        let version = max.max(applied) + 1;
        // The box's own file, before its first push, is kept as version 0:
        // what a rollback offers it again.
        if max == 0 && applied == 0 {
            tx.execute(
                "INSERT INTO config (device, version, text, pushed_by, pushed_ms)
                 SELECT device, 0, text, 'the box''s own file', result_ms FROM config_state
                 WHERE device = $1 AND applied = 0 ON CONFLICT DO NOTHING",
                &[&p.device],
            )
            .await?;
        }
        tx.execute(
            "INSERT INTO config (device, version, text, pushed_by, pushed_ms) VALUES ($1, $2, $3, $4, $5)",
            &[&p.device, &version, &p.text, &p.by, &p.now_ms],
        )
        .await?;
        changes::record(&tx, ChangeKind::Config, &p.device, p.now_ms).await?;
        tx.commit().await?;
        Ok(u64_of(version))
    }

    async fn set_applied(&self, a: AppliedReport) -> R<()> {
        let c = self.pg.client().await?;
        let version = i64_of(a.version);
        let text = match a.text {
            Some(t) => t,
            None => match c
                .query_opt(
                    "SELECT text FROM config WHERE device = $1 AND version = $2",
                    &[&a.device, &version],
                )
                .await?
            {
                Some(r) => r.get(0),
                None => c
                    .query_opt(
                        "SELECT text FROM config_state WHERE device = $1",
                        &[&a.device],
                    )
                    .await?
                    .map(|r| r.get(0))
                    .unwrap_or_default(),
            },
        };
        c.execute(
            "INSERT INTO config_state (device, applied, text, result, result_ms) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (device) DO UPDATE SET applied = $2, text = $3, result = $4, result_ms = $5",
            &[&a.device, &version, &text, &a.result, &a.now_ms],
        )
        .await?;
        Ok(())
    }

    async fn devices(&self) -> R<Vec<DeviceRow>> {
        let c = self.pg.client().await?;
        let ids: Vec<String> = c
            .query(
                "SELECT id FROM device UNION SELECT device FROM status UNION SELECT device FROM config
                 UNION SELECT device FROM config_state ORDER BY 1",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let row = device_row(&c, &id).await?;
            out.push(row.unwrap_or_else(|| DeviceRow::unknown(&id)));
        }
        Ok(out)
    }

    async fn audit_next(&self, device: String) -> R<u64> {
        let c = self.pg.client().await?;
        Ok(c.query_opt(
            "SELECT head_seq FROM edge_audit_head WHERE device = $1 AND head_seq >= 0",
            &[&device],
        )
        .await?
        .map_or(1, |r| u64_of(r.get(0)) + 1))
    }

    async fn append_audits(
        &self,
        mut batches: Vec<(String, Vec<Record>)>,
    ) -> R<Vec<Result<usize, String>>> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        // Head rows locked in one order whatever the batch: two hubs writing
        // overlapping devices never wait on each other in a cycle.
        let mut order: Vec<usize> = (0..batches.len()).collect();
        order.sort_by(|a, b| batches[*a].0.cmp(&batches[*b].0));
        let mut results = vec![Ok(0); batches.len()];
        for i in order {
            let (device, entries) = std::mem::take(&mut batches[i]);
            results[i] = append_one(&tx, device, entries).await?;
        }
        tx.commit().await?;
        Ok(results)
    }

    async fn audit_export(&self, device: String, since_ms: i64) -> R<Option<AuditExport>> {
        let c = self.pg.client().await?;
        let head = c
            .query_opt(
                "SELECT head_seq, head_hash, broken FROM edge_audit_head WHERE device = $1 AND head_seq >= 0",
                &[&device],
            )
            .await?;
        let Some(head) = head else {
            return Ok(None);
        };
        let (head_seq, head_hash, broken): (i64, String, Option<String>) =
            (head.get(0), head.get(1), head.get(2));
        let first: Option<i64> = c
            .query_one(
                "SELECT MIN(seq) FROM edge_audit WHERE device = $1 AND time_ms >= $2",
                &[&device, &since_ms],
            )
            .await?
            .get(0);
        let from = first.unwrap_or(head_seq + 1);
        let records: Vec<Record> = c
            .query(
                // Records stored after the head was read are not this
                // export's: it ends at the head it names.
                "SELECT json FROM edge_audit WHERE device = $1 AND seq >= $2 AND seq <= $3 ORDER BY seq",
                &[&device, &from, &head_seq],
            )
            .await?
            .iter()
            .filter_map(|r| serde_json::from_str(r.get::<_, &str>(0)).ok())
            .collect();
        let (anchor_seq, anchor_hash) = match records.first() {
            Some(r) => (r.seq - 1, audit::to_hex(&r.prev_hash)),
            None => (u64_of(head_seq), head_hash.clone()),
        };
        Ok(Some(AuditExport {
            anchor_seq,
            anchor_hash,
            head_seq: u64_of(head_seq),
            head_hash,
            continuous: broken.is_none(),
            records,
        }))
    }

    async fn prune_audit(&self, before_ms: i64) -> R<usize> {
        let c = self.pg.client().await?;
        c.execute("DELETE FROM alarm WHERE time_ms < $1", &[&before_ms])
            .await?;
        // Hubs read the change log within seconds; what is older than the
        // retention is nobody's news (the sweeps cover a hub away that long).
        c.execute("DELETE FROM change_log WHERE at_ms < $1", &[&before_ms])
            .await?;
        let n = c
            .execute(
                "DELETE FROM edge_audit WHERE time_ms < $1
                 AND seq < (SELECT head_seq FROM edge_audit_head h WHERE h.device = edge_audit.device)",
                &[&before_ms],
            )
            .await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    async fn add_consumer(&self, n: NewConsumer) -> R<()> {
        let c = self.pg.client().await?;
        let added = c
            .execute(
                "INSERT INTO consumer (name, serial, not_after_ms, created_by, created_ms)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
                &[&n.name, &n.serial, &n.not_after_ms, &n.by, &n.now_ms],
            )
            .await?;
        if added == 0 {
            return Err(RegistryError::ConsumerExists(n.name));
        }
        Ok(())
    }

    async fn revoke_consumer(&self, name: String, by: String, now_ms: i64) -> R<Option<bool>> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT revoked_ms FROM consumer WHERE name = $1 FOR UPDATE",
                &[&name],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        if row.get::<_, Option<i64>>(0).is_some() {
            return Ok(Some(false));
        }
        tx.execute(
            "UPDATE consumer SET revoked_ms = $2, revoked_by = $3 WHERE name = $1",
            &[&name, &now_ms, &by],
        )
        .await?;
        changes::record(&tx, ChangeKind::ConsumerRevoked, &name, now_ms).await?;
        tx.commit().await?;
        Ok(Some(true))
    }

    async fn add_alarms(&self, device: String, alarms: Vec<Alarm>) -> R<usize> {
        let c = self.pg.client().await?;
        let st = c
            .prepare_cached(
                "INSERT INTO alarm (id, device, time_ms, json) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO NOTHING",
            )
            .await?;
        let mut added = 0;
        for a in &alarms {
            let json = serde_json::to_string(a).unwrap_or_default();
            added += c.execute(&st, &[&a.id, &device, &a.at_ms, &json]).await?;
        }
        Ok(usize::try_from(added).unwrap_or(usize::MAX))
    }

    async fn alarms(&self, q: AlarmQuery) -> R<Vec<AlarmRow>> {
        let c = self.pg.client().await?;
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let rows = c
            .query(
                "SELECT device, json, acked_by, acked_ms FROM alarm
                 WHERE ($1::TEXT IS NULL OR device = $1) AND time_ms >= $2 AND ($3 = FALSE OR acked_by IS NULL)
                 ORDER BY time_ms DESC, id LIMIT $4",
                &[&q.device, &q.since_ms.unwrap_or(i64::MIN), &q.unacked, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let alarm = serde_json::from_str(r.get::<_, &str>(1)).ok()?;
                let by: Option<String> = r.get(2);
                let at: Option<i64> = r.get(3);
                Some(AlarmRow {
                    device: r.get(0),
                    alarm,
                    acked: by.zip(at),
                })
            })
            .collect())
    }

    async fn ack_alarm(&self, id: String, by: String, now_ms: i64) -> R<Option<bool>> {
        let c = self.pg.client().await?;
        let n = c
            .execute(
                "UPDATE alarm SET acked_by = $2, acked_ms = $3 WHERE id = $1 AND acked_by IS NULL",
                &[&id, &by, &now_ms],
            )
            .await?;
        if n == 1 {
            return Ok(Some(true));
        }
        let known = c
            .query_opt("SELECT 1 FROM alarm WHERE id = $1", &[&id])
            .await?
            .is_some();
        Ok(known.then_some(false))
    }
}

impl Registry for PgRegistry {
    fn add_account(&self, a: NewAccount) -> RegistryFuture<'_, ()> {
        Box::pin(self.add_account(a))
    }

    fn accounts(&self) -> RegistryFuture<'_, Vec<(String, String)>> {
        Box::pin(async move {
            let c = self.pg.client().await?;
            let rows = c
                .query("SELECT name, role FROM account ORDER BY name", &[])
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn account(&self, digest: String) -> RegistryFuture<'_, Option<(String, AdminRole)>> {
        Box::pin(async move {
            let c = self.pg.client().await?;
            let row = c
                .query_opt(
                    "SELECT name, role FROM account WHERE digest = $1",
                    &[&digest],
                )
                .await?;
            Ok(
                row.and_then(|r| {
                    AdminRole::parse(r.get::<_, &str>(1)).map(|role| (r.get(0), role))
                }),
            )
        })
    }

    fn create_token(&self, t: NewToken) -> RegistryFuture<'_, ()> {
        Box::pin(self.create_token(t))
    }

    fn enroll(&self, e: Enrollment, sign: SignCertificate) -> RegistryFuture<'_, String> {
        Box::pin(self.enroll(e, sign))
    }

    fn set_cert(&self, device: String, not_after_ms: i64) -> RegistryFuture<'_, ()> {
        Box::pin(self.set_cert(device, not_after_ms))
    }

    fn renewed(&self, n: Renewal) -> RegistryFuture<'_, ()> {
        Box::pin(self.renewed(n))
    }

    fn admit(&self, device: String, serial: String, now_ms: i64) -> RegistryFuture<'_, Admission> {
        Box::pin(self.admit(device, serial, now_ms))
    }

    fn live_serials(&self, ids: Vec<String>) -> RegistryFuture<'_, Vec<(String, Vec<String>)>> {
        Box::pin(self.live_serials(ids))
    }

    fn is_revoked(&self, device: String) -> RegistryFuture<'_, bool> {
        Box::pin(async move {
            let c = self.pg.client().await?;
            is_revoked(&c, &device).await
        })
    }

    fn revoked_among(&self, ids: Vec<String>) -> RegistryFuture<'_, Vec<String>> {
        Box::pin(self.revoked_among(ids))
    }

    fn set_labels(&self, c: LabelChange) -> RegistryFuture<'_, Vec<(String, String)>> {
        Box::pin(async move {
            let mut client = self.pg.client().await?;
            let tx = client.transaction().await?;
            // Two operators labelling one device queue on its rows.
            tx.execute(
                "SELECT 1 FROM device_label WHERE device = $1 FOR UPDATE",
                &[&c.device],
            )
            .await?;
            let now = tx
                .query(
                    "SELECT key, value FROM device_label WHERE device = $1",
                    &[&c.device],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let after = apply_labels(now, &c)?;
            tx.execute("DELETE FROM device_label WHERE device = $1", &[&c.device])
                .await?;
            for (k, v) in &after {
                tx.execute(
                    "INSERT INTO device_label (device, key, value) VALUES ($1, $2, $3)",
                    &[&c.device, k, v],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(after)
        })
    }

    fn labels(&self) -> RegistryFuture<'_, Vec<(String, String, String)>> {
        Box::pin(async move {
            let c = self.pg.client().await?;
            let rows = c
                .query(
                    "SELECT device, key, value FROM device_label ORDER BY device, key",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect())
        })
    }

    fn revoked(&self) -> RegistryFuture<'_, Vec<String>> {
        Box::pin(async move {
            let c = self.pg.client().await?;
            let rows = c
                .query(
                    "SELECT id FROM device WHERE revoked_ms IS NOT NULL ORDER BY id",
                    &[],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn revoke(&self, device: String, by: String, now_ms: i64) -> RegistryFuture<'_, bool> {
        Box::pin(self.revoke(device, by, now_ms))
    }

    fn heartbeat(&self, device: String, now_ms: i64, json: String) -> RegistryFuture<'_, ()> {
        Box::pin(self.heartbeat(device, now_ms, json))
    }

    fn push_config(&self, p: ConfigPush) -> RegistryFuture<'_, u64> {
        Box::pin(self.push_config(p))
    }

    fn desired(&self, device: String) -> RegistryFuture<'_, Option<(u64, String)>> {
        Box::pin(async move {
            let c = self.pg.client().await?;
            desired(&c, &device).await
        })
    }

    fn config_version(&self, device: String, version: u64) -> RegistryFuture<'_, Option<String>> {
        Box::pin(async move {
            let c = self.pg.client().await?;
            Ok(c.query_opt(
                "SELECT text FROM config WHERE device = $1 AND version = $2",
                &[&device, &i64_of(version)],
            )
            .await?
            .map(|r| r.get(0)))
        })
    }

    fn applied(&self, device: String) -> RegistryFuture<'_, Option<(u64, String)>> {
        Box::pin(async move {
            let c = self.pg.client().await?;
            Ok(c.query_opt(
                "SELECT applied, text FROM config_state WHERE device = $1",
                &[&device],
            )
            .await?
            .map(|r| (u64_of(r.get(0)), r.get(1))))
        })
    }

    fn config_connected(&self, c: ConfigConnected) -> RegistryFuture<'_, ConfigSeen> {
        Box::pin(async move {
            let client = self.pg.client().await?;
            // One device's rows; a box has one management session per hub,
            // and the last writer's row is what it reported last.
            let before = client
                .query_opt(
                    "SELECT applied, result FROM config_state WHERE device = $1",
                    &[&c.device],
                )
                .await?
                .map(|r| (u64_of(r.get(0)), r.get::<_, String>(1)));
            let result = crate::registry::result_on_connect(before.as_ref(), c.version);
            client
                .execute(
                    "INSERT INTO config_state (device, applied, text, result, result_ms) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (device) DO UPDATE SET applied = $2, text = $3, result = $4, result_ms = $5",
                    &[&c.device, &i64_of(c.version), &c.text, &result, &c.now_ms],
                )
                .await?;
            let desired = desired(&client, &c.device).await?;
            Ok(ConfigSeen { before, desired })
        })
    }

    fn set_applied(&self, a: AppliedReport) -> RegistryFuture<'_, ()> {
        Box::pin(self.set_applied(a))
    }

    fn devices(&self) -> RegistryFuture<'_, Vec<DeviceRow>> {
        Box::pin(self.devices())
    }

    fn device(&self, id: String) -> RegistryFuture<'_, Option<DeviceRow>> {
        Box::pin(async move {
            let c = self.pg.client().await?;
            device_row(&c, &id).await
        })
    }

    fn audit_next(&self, device: String) -> RegistryFuture<'_, u64> {
        Box::pin(self.audit_next(device))
    }

    fn append_audits(
        &self,
        batches: Vec<(String, Vec<Record>)>,
    ) -> RegistryFuture<'_, Vec<Result<usize, String>>> {
        Box::pin(self.append_audits(batches))
    }

    fn audit_export(
        &self,
        device: String,
        since_ms: i64,
    ) -> RegistryFuture<'_, Option<AuditExport>> {
        Box::pin(self.audit_export(device, since_ms))
    }

    fn prune_audit(&self, before_ms: i64) -> RegistryFuture<'_, usize> {
        Box::pin(self.prune_audit(before_ms))
    }

    fn add_consumer(&self, n: NewConsumer) -> RegistryFuture<'_, ()> {
        Box::pin(self.add_consumer(n))
    }

    fn consumer(&self, name: String) -> RegistryFuture<'_, Option<ConsumerRow>> {
        Box::pin(async move {
            let c = self.pg.client().await?;
            let q = format!("{CONSUMER_COLUMNS} WHERE name = $1");
            Ok(c.query_opt(&q, &[&name]).await?.as_ref().map(consumer_row))
        })
    }

    fn consumers(&self) -> RegistryFuture<'_, Vec<ConsumerRow>> {
        Box::pin(async move {
            let c = self.pg.client().await?;
            let q = format!("{CONSUMER_COLUMNS} ORDER BY name");
            Ok(c.query(&q, &[]).await?.iter().map(consumer_row).collect())
        })
    }

    fn revoke_consumer(
        &self,
        name: String,
        by: String,
        now_ms: i64,
    ) -> RegistryFuture<'_, Option<bool>> {
        Box::pin(self.revoke_consumer(name, by, now_ms))
    }

    fn add_alarms(&self, device: String, alarms: Vec<Alarm>) -> RegistryFuture<'_, usize> {
        Box::pin(self.add_alarms(device, alarms))
    }

    fn alarms(&self, query: AlarmQuery) -> RegistryFuture<'_, Vec<AlarmRow>> {
        Box::pin(self.alarms(query))
    }

    fn ack_alarm(&self, id: String, by: String, now_ms: i64) -> RegistryFuture<'_, Option<bool>> {
        Box::pin(self.ack_alarm(id, by, now_ms))
    }

    fn changes(&self, after: u64, limit: usize) -> RegistryFuture<'_, Vec<Change>> {
        Box::pin(async move { Ok(self.pg.changes(after, limit).await?) })
    }

    fn change_head(&self) -> RegistryFuture<'_, u64> {
        Box::pin(async move { Ok(self.pg.change_head().await?) })
    }

    fn wake(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.pg.wake.clone())
    }

    fn devices_page(
        &self,
        after: Option<String>,
        limit: usize,
        filter: gateway_core::selector::Stored,
    ) -> RegistryFuture<'_, DevicesPage> {
        Box::pin(self.devices_page(after, limit, filter))
    }

    fn heartbeats(&self, beats: Vec<Heartbeat>) -> RegistryFuture<'_, ()> {
        Box::pin(self.heartbeats(beats))
    }

    fn put_template(&self, t: NewTemplate) -> RegistryFuture<'_, u64> {
        Box::pin(self.put_template(t))
    }

    fn template(
        &self,
        name: String,
        version: Option<u64>,
    ) -> RegistryFuture<'_, Option<TemplateRow>> {
        Box::pin(self.template(name, version))
    }

    fn templates(&self) -> RegistryFuture<'_, Vec<TemplateRow>> {
        Box::pin(self.templates())
    }

    fn set_vars(&self, c: VarsChange) -> RegistryFuture<'_, Vec<(String, String)>> {
        Box::pin(self.set_vars(c))
    }

    fn vars(&self, devices: Vec<String>) -> RegistryFuture<'_, Vec<(String, String, String)>> {
        Box::pin(self.vars(devices))
    }

    fn create_rollout(&self, n: NewRollout) -> RegistryFuture<'_, ()> {
        Box::pin(self.create_rollout(n))
    }

    fn rollout(&self, id: String) -> RegistryFuture<'_, Option<RolloutRow>> {
        Box::pin(self.rollout(id))
    }

    fn rollouts(&self, active: bool) -> RegistryFuture<'_, Vec<RolloutRow>> {
        Box::pin(self.rollouts(active))
    }

    fn update_rollout(&self, u: RolloutUpdate) -> RegistryFuture<'_, bool> {
        Box::pin(self.update_rollout(u))
    }

    fn put_firmware(&self, f: NewFirmware) -> RegistryFuture<'_, FirmwareRow> {
        Box::pin(self.put_firmware(f))
    }

    fn firmwares(&self) -> RegistryFuture<'_, Vec<FirmwareRow>> {
        Box::pin(self.firmwares())
    }

    fn firmware(&self, version: String) -> RegistryFuture<'_, Option<StoredFirmware>> {
        Box::pin(self.firmware(version))
    }

    fn put_firmware_part(&self, p: FirmwarePart) -> RegistryFuture<'_, ()> {
        Box::pin(self.put_firmware_part(p))
    }

    fn firmware_part(&self, version: String, name: String) -> RegistryFuture<'_, Option<Vec<u8>>> {
        Box::pin(self.firmware_part(version, name))
    }

    fn firmware_parts(&self, version: String) -> RegistryFuture<'_, Vec<String>> {
        Box::pin(self.firmware_parts(version))
    }

    fn firmware_complete(&self, version: String) -> RegistryFuture<'_, ()> {
        Box::pin(self.firmware_complete(version))
    }
}

/// Appends one device's batch inside `tx` (see `Registry::append_audits`).
async fn append_one(
    tx: &deadpool_postgres::Transaction<'_>,
    device: String,
    entries: Vec<Record>,
) -> R<Result<usize, String>> {
    // Two hubs collecting one device queue on its head row.
    tx.execute(
        "INSERT INTO edge_audit_head (device, anchor_seq, anchor_hash, head_seq, head_hash)
         VALUES ($1, -1, '', -1, '') ON CONFLICT (device) DO NOTHING",
        &[&device],
    )
    .await?;
    let head = tx
        .query_one(
            "SELECT head_seq, head_hash, broken FROM edge_audit_head WHERE device = $1 FOR UPDATE",
            &[&device],
        )
        .await?;
    let (head_seq, head_hash, broken): (i64, String, Option<String>) =
        (head.get(0), head.get(1), head.get(2));
    // -1: a head row made just now as the lock, nothing collected yet.
    let head = (head_seq >= 0).then_some((u64_of(head_seq), head_hash));
    if let Some(broken) = broken {
        return Ok(Err(format!("chain already marked broken: {broken}")));
    }
    let known = head.as_ref().map_or(0, |h| h.0);
    let same = tx
        .prepare_cached("SELECT json FROM edge_audit WHERE device = $1 AND seq = $2")
        .await?;
    for e in entries.iter().filter(|e| e.seq <= known) {
        let stored = tx.query_opt(&same, &[&device, &i64_of(e.seq)]).await?;
        let same = stored
            .and_then(|r| serde_json::from_str::<Record>(r.get::<_, &str>(0)).ok())
            .is_none_or(|s| s.hash == e.hash);
        if !same {
            let p = format!("record {} differs from the one collected before", e.seq);
            tx.execute(
                "UPDATE edge_audit_head SET broken = $2 WHERE device = $1",
                &[&device, &p],
            )
            .await?;
            return Ok(Err(p));
        }
    }
    let entries: Vec<&Record> = entries.iter().filter(|e| e.seq > known).collect();
    let Some(first) = entries.first() else {
        return Ok(Ok(0));
    };
    let anchor = match &head {
        Some((seq, hash)) => (*seq, audit::from_hex(hash).unwrap_or(audit::GENESIS)),
        None => (first.seq.saturating_sub(1), first.prev_hash),
    };
    let anchor_hex = audit::to_hex(&anchor.1);
    let last = match continue_chain(&device, anchor, &entries) {
        Ok(last) => last,
        Err(p) => {
            tx.execute(
                "UPDATE edge_audit_head SET anchor_seq = CASE WHEN head_seq < 0 THEN $2 ELSE anchor_seq END,
                     anchor_hash = CASE WHEN head_seq < 0 THEN $3 ELSE anchor_hash END,
                     head_hash = CASE WHEN head_seq < 0 THEN $3 ELSE head_hash END,
                     head_seq = CASE WHEN head_seq < 0 THEN $2 ELSE head_seq END,
                     broken = $4
                 WHERE device = $1",
                &[&device, &i64_of(anchor.0), &anchor_hex, &p],
            )
            .await?;
            return Ok(Err(p));
        }
    };
    let insert = tx
        .prepare_cached(
            "INSERT INTO edge_audit (device, seq, time_ms, json) VALUES ($1, $2, $3, $4)",
        )
        .await?;
    // Sent together (pipelined), answered in order.
    let rows: Vec<(i64, i64, String)> = entries
        .iter()
        .map(|e| {
            (
                i64_of(e.seq),
                e.event.time_ms,
                serde_json::to_string(e).unwrap_or_default(),
            )
        })
        .collect();
    futures_util::future::try_join_all(rows.iter().map(|(seq, t, json)| {
        let params: [&(dyn ToSql + Sync); 4] = [&device, seq, t, json];
        tx.execute_raw(&insert, params)
    }))
    .await?;
    tx.execute(
        "UPDATE edge_audit_head SET anchor_seq = CASE WHEN head_seq < 0 THEN $2 ELSE anchor_seq END,
             anchor_hash = CASE WHEN head_seq < 0 THEN $3 ELSE anchor_hash END,
             head_seq = $4, head_hash = $5
         WHERE device = $1",
        &[
            &device,
            &i64_of(anchor.0),
            &anchor_hex,
            &i64_of(last.0),
            &audit::to_hex(&last.1),
        ],
    )
    .await?;
    Ok(Ok(entries.len()))
}
