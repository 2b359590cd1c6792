//! Copies a single hub's SQLite state (`fleet.sqlite`, `sink.sqlite`) into
//! an empty PostgreSQL database, then checks the copy: the row count of every
//! table, and every collected audit chain re-verified record by record from
//! its anchor to its head as it now reads from PostgreSQL.
//!
//! The SQLite files are opened read-only; the copy is one transaction, so a
//! failed import leaves the database empty. A database that already holds
//! a hub's state is refused (the import does not merge).

use std::path::Path;

use gateway_core::audit::{self, Record, Verifier};
use rusqlite::types::Value;
use tokio_postgres::types::ToSql;

use super::Pg;
use crate::error::StoreError;

/// How a column is read from SQLite and written to PostgreSQL.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// TEXT (NULL allowed).
    Text,
    /// BIGINT (NULL allowed).
    Int,
    /// BOOLEAN, stored as 0/1 in SQLite.
    Bool,
    /// BYTEA.
    Bytes,
}

/// The tables copied, from which file, with their columns. The change log is
/// not copied: hubs on PostgreSQL start from its head.
const TABLES: &[Table] = &[
    (
        File::Registry,
        "account",
        &[
            ("name", Kind::Text),
            ("role", Kind::Text),
            ("digest", Kind::Text),
            ("created_ms", Kind::Int),
        ],
    ),
    (
        File::Registry,
        "token",
        &[
            ("digest", Kind::Text),
            ("device", Kind::Text),
            ("expires_ms", Kind::Int),
            ("used_ms", Kind::Int),
            ("created_by", Kind::Text),
            ("created_ms", Kind::Int),
            ("replaces", Kind::Bool),
        ],
    ),
    (
        File::Registry,
        "device",
        &[
            ("id", Kind::Text),
            ("enrolled_ms", Kind::Int),
            ("not_after_ms", Kind::Int),
            ("revoked_ms", Kind::Int),
            ("revoked_by", Kind::Text),
            ("serial", Kind::Text),
            ("serial_seen", Kind::Bool),
            ("prev_serial", Kind::Text),
            ("prev_until_ms", Kind::Int),
        ],
    ),
    (
        File::Registry,
        "consumer",
        &[
            ("name", Kind::Text),
            ("serial", Kind::Text),
            ("not_after_ms", Kind::Int),
            ("created_by", Kind::Text),
            ("created_ms", Kind::Int),
            ("revoked_ms", Kind::Int),
            ("revoked_by", Kind::Text),
        ],
    ),
    (
        File::Registry,
        "status",
        &[
            ("device", Kind::Text),
            ("last_ms", Kind::Int),
            ("json", Kind::Text),
        ],
    ),
    (
        File::Registry,
        "config",
        &[
            ("device", Kind::Text),
            ("version", Kind::Int),
            ("text", Kind::Text),
            ("pushed_by", Kind::Text),
            ("pushed_ms", Kind::Int),
        ],
    ),
    (
        File::Registry,
        "config_state",
        &[
            ("device", Kind::Text),
            ("applied", Kind::Int),
            ("text", Kind::Text),
            ("result", Kind::Text),
            ("result_ms", Kind::Int),
        ],
    ),
    (
        File::Registry,
        "edge_audit",
        &[
            ("device", Kind::Text),
            ("seq", Kind::Int),
            ("time_ms", Kind::Int),
            ("json", Kind::Text),
        ],
    ),
    (
        File::Registry,
        "edge_audit_head",
        &[
            ("device", Kind::Text),
            ("anchor_seq", Kind::Int),
            ("anchor_hash", Kind::Text),
            ("head_seq", Kind::Int),
            ("head_hash", Kind::Text),
            ("broken", Kind::Text),
        ],
    ),
    (
        File::Registry,
        "device_label",
        &[
            ("device", Kind::Text),
            ("key", Kind::Text),
            ("value", Kind::Text),
        ],
    ),
    (
        File::Registry,
        "template",
        &[
            ("name", Kind::Text),
            ("version", Kind::Int),
            ("text", Kind::Text),
            ("by_account", Kind::Text),
            ("at_ms", Kind::Int),
        ],
    ),
    (
        File::Registry,
        "device_var",
        &[
            ("device", Kind::Text),
            ("name", Kind::Text),
            ("value", Kind::Text),
        ],
    ),
    (
        File::Registry,
        "rollout",
        &[
            ("id", Kind::Text),
            ("rev", Kind::Int),
            ("json", Kind::Text),
            ("active", Kind::Bool),
            ("created_ms", Kind::Int),
            ("updated_ms", Kind::Int),
        ],
    ),
    (
        File::Registry,
        "rollout_member",
        &[("device", Kind::Text), ("rollout", Kind::Text)],
    ),
    (
        File::Registry,
        "firmware",
        &[
            ("version", Kind::Text),
            ("security_version", Kind::Int),
            ("manifest", Kind::Text),
            ("signature", Kind::Text),
            ("parts", Kind::Int),
            ("linux_parts", Kind::Int),
            ("initrd_parts", Kind::Int),
            ("complete", Kind::Bool),
            ("by_account", Kind::Text),
            ("at_ms", Kind::Int),
        ],
    ),
    (
        File::Registry,
        "firmware_part",
        &[
            ("version", Kind::Text),
            ("name", Kind::Text),
            ("bytes", Kind::Bytes),
        ],
    ),
    (
        File::Registry,
        "alarm",
        &[
            ("id", Kind::Text),
            ("device", Kind::Text),
            ("time_ms", Kind::Int),
            ("json", Kind::Text),
            ("acked_by", Kind::Text),
            ("acked_ms", Kind::Int),
        ],
    ),
    (
        File::Sink,
        "stream",
        &[
            ("device", Kind::Text),
            ("channel", Kind::Text),
            ("deliver_to", Kind::Text),
            ("high", Kind::Int),
            ("consumed", Kind::Int),
            ("records", Kind::Int),
            ("bytes", Kind::Int),
            ("duplicates", Kind::Int),
            ("expired_unread", Kind::Int),
        ],
    ),
    (
        File::Sink,
        "cursor",
        &[
            ("device", Kind::Text),
            ("channel", Kind::Text),
            ("consumer", Kind::Text),
            ("acked", Kind::Int),
            ("granted_ms", Kind::Int),
        ],
    ),
    (
        File::Sink,
        "failure",
        &[
            ("device", Kind::Text),
            ("channel", Kind::Text),
            ("seq", Kind::Int),
            ("reason", Kind::Text),
        ],
    ),
    (
        File::Sink,
        "record",
        &[
            ("device", Kind::Text),
            ("channel", Kind::Text),
            ("seq", Kind::Int),
            ("time_ms", Kind::Int),
            ("received_ms", Kind::Int),
            ("format", Kind::Text),
            ("body", Kind::Bytes),
        ],
    ),
];

/// A table copied: its file, its name, its columns.
type Table = (File, &'static str, &'static [(&'static str, Kind)]);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum File {
    Registry,
    Sink,
}

/// Records are keyed by their stream's number in PostgreSQL (copied before
/// them); a record of no stream inserts nothing, and the count says so.
const RECORD_INSERT: &str = "INSERT INTO record (stream, seq, time_ms, received_ms, format, body)
     SELECT id, $3, $4, $5, $6, $7 FROM stream WHERE device = $1 AND channel = $2";

/// Rows copied per pipelined round trip.
const CHUNK: usize = 500;

/// Why an import failed (nothing was written, or it was rolled back).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A SQLite file cannot be read.
    #[error("{file}: {reason}")]
    Sqlite {
        /// The file.
        file: String,
        /// What went wrong.
        reason: String,
    },
    /// The database holds a hub's state already.
    #[error("the PostgreSQL database is not empty ({0}); import into a new database")]
    NotEmpty(String),
    /// The copy differs from the source.
    #[error("the copy does not match: {0}")]
    Mismatch(String),
    /// PostgreSQL failed.
    #[error("PostgreSQL: {0}")]
    Store(#[from] StoreError),
}

impl From<tokio_postgres::Error> for ImportError {
    fn from(e: tokio_postgres::Error) -> Self {
        ImportError::Store(e.into())
    }
}

/// What an import copied and checked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Imported {
    /// Rows per table, in copy order.
    pub tables: Vec<(String, u64)>,
    /// Audit chains re-verified, and those the source marked broken (copied
    /// as they were, with their mark).
    pub chains: (u64, u64),
}

fn open(path: &Path) -> Result<rusqlite::Connection, ImportError> {
    let err = |e: rusqlite::Error| ImportError::Sqlite {
        file: path.display().to_string(),
        reason: e.to_string(),
    };
    if !path.exists() {
        return Err(ImportError::Sqlite {
            file: path.display().to_string(),
            reason: "no such file (is --from-sqlite the old hub's state directory?)".into(),
        });
    }
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(err)?;
    c.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(err)?;
    Ok(c)
}

/// A SQLite value as the PostgreSQL column `kind` takes it.
fn param(v: Value, kind: Kind) -> Box<dyn ToSql + Sync + Send> {
    match (kind, v) {
        (Kind::Text, Value::Text(t)) => Box::new(Some(t)),
        (Kind::Int, Value::Integer(i)) => Box::new(Some(i)),
        (Kind::Bool, Value::Integer(i)) => Box::new(i != 0),
        (Kind::Bytes, Value::Blob(b)) => Box::new(b),
        (Kind::Bytes, Value::Text(t)) => Box::new(t.into_bytes()),
        (Kind::Text, _) => Box::new(None::<String>),
        (Kind::Int, _) => Box::new(None::<i64>),
        (Kind::Bool, _) => Box::new(false),
        (Kind::Bytes, _) => Box::new(Vec::<u8>::new()),
    }
}

/// Copies the hub state of `registry` and `sink` (SQLite files) into `pg`'s
/// database and checks it; `progress` hears (table, rows copied so far).
///
/// # Errors
/// [`ImportError`]; on any error the database is left as it was.
pub async fn from_sqlite(
    pg: &Pg,
    registry: &Path,
    sink: &Path,
    mut progress: impl FnMut(&str, u64),
) -> Result<Imported, ImportError> {
    let sources = (open(registry)?, open(sink)?);
    let mut client = pg.client().await?;
    let tx = client.transaction().await?;
    for t in ["account", "device", "stream", "record", "edge_audit"] {
        let row = tx
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .await?;
        let n: i64 = row.get(0);
        if n > 0 {
            return Err(ImportError::NotEmpty(format!("{t} holds {n} rows")));
        }
    }
    let mut out = Imported::default();
    for (file, table, columns) in TABLES {
        let (src, path) = match file {
            File::Registry => (&sources.0, registry),
            File::Sink => (&sources.1, sink),
        };
        let sq = |e: rusqlite::Error| ImportError::Sqlite {
            file: path.display().to_string(),
            reason: format!("{table}: {e}"),
        };
        let names: Vec<&str> = columns.iter().map(|c| c.0).collect();
        let marks: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
        let insert = if *table == "record" {
            tx.prepare(RECORD_INSERT).await?
        } else {
            tx.prepare(&format!(
                "INSERT INTO {table} ({}) VALUES ({})",
                names.join(", "),
                marks.join(", ")
            ))
            .await?
        };
        // A table an older SQLite registry never had is empty here.
        let exists: bool = src
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
                [table],
                |r| r.get(0),
            )
            .map_err(sq)?;
        let mut copied = 0u64;
        if exists {
            let mut st = src
                .prepare(&format!("SELECT {} FROM {table}", names.join(", ")))
                .map_err(sq)?;
            let mut rows = st.query([]).map_err(sq)?;
            let mut chunk: Vec<Vec<Box<dyn ToSql + Sync + Send>>> = Vec::with_capacity(CHUNK);
            loop {
                let row = rows.next().map_err(sq)?;
                if let Some(r) = row {
                    let mut values = Vec::with_capacity(columns.len());
                    for (i, (_, kind)) in columns.iter().enumerate() {
                        values.push(param(r.get::<_, Value>(i).map_err(sq)?, *kind));
                    }
                    chunk.push(values);
                }
                if chunk.len() == CHUNK || (row.is_none() && !chunk.is_empty()) {
                    futures_util::future::try_join_all(chunk.iter().map(|values| {
                        let params: Vec<&(dyn ToSql + Sync)> =
                            values.iter().map(|v| &**v as &(dyn ToSql + Sync)).collect();
                        tx.execute_raw(&insert, params)
                    }))
                    .await?;
                    copied += chunk.len() as u64;
                    chunk.clear();
                    progress(table, copied);
                }
                if row.is_none() {
                    break;
                }
            }
        }
        // The count, as PostgreSQL now has it.
        let want: i64 = if exists {
            src.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .map_err(sq)?
        } else {
            0
        };
        let got: i64 = tx
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await?
            .get(0);
        if got != want {
            return Err(ImportError::Mismatch(format!(
                "{table}: {got} rows in PostgreSQL, {want} in SQLite"
            )));
        }
        out.tables
            .push(((*table).to_owned(), u64::try_from(got).unwrap_or(0)));
    }
    out.chains = verify_chains(&tx).await?;
    tx.commit().await?;
    Ok(out)
}

/// Re-verifies every collected chain as PostgreSQL holds it: (verified,
/// marked broken at the source).
async fn verify_chains(tx: &deadpool_postgres::Transaction<'_>) -> Result<(u64, u64), ImportError> {
    let heads = tx
        .query(
            "SELECT device, head_seq, head_hash, broken FROM edge_audit_head ORDER BY device",
            &[],
        )
        .await?;
    let (mut ok, mut broken) = (0, 0);
    for h in heads {
        let (device, head_seq, head_hash, mark): (String, i64, String, Option<String>) =
            (h.get(0), h.get(1), h.get(2), h.get(3));
        if mark.is_some() {
            broken += 1;
            continue;
        }
        let rows = tx
            .query(
                "SELECT seq, json FROM edge_audit WHERE device = $1 ORDER BY seq",
                &[&device],
            )
            .await?;
        let records: Vec<Record> = rows
            .iter()
            .map(|r| {
                serde_json::from_str::<Record>(r.get::<_, &str>(1)).map_err(|e| {
                    ImportError::Mismatch(format!(
                        "{device}: record {} does not read back: {e}",
                        r.get::<_, i64>(0)
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        let Some(first) = records.first() else {
            ok += 1;
            continue;
        };
        let mut v = Verifier::new(first.seq.saturating_sub(1), first.prev_hash);
        for r in &records {
            v.push(r)
                .map_err(|b| ImportError::Mismatch(format!("{device}: {b}")))?;
        }
        let last = records.last().map(|r| (r.seq, audit::to_hex(&r.hash)));
        if last != Some((u64::try_from(head_seq).unwrap_or(0), head_hash.clone())) {
            return Err(ImportError::Mismatch(format!(
                "{device}: the chain ends at {last:?}, its head says {head_seq} {head_hash}"
            )));
        }
        ok += 1;
    }
    Ok((ok, broken))
}
