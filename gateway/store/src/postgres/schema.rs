//! The schema of the hub's state in PostgreSQL, as versioned migrations.
//!
//! [`migrate`] runs at every hub's start inside one transaction holding an
//! advisory lock, so hubs starting at once migrate once: the first applies
//! what is missing, the others wait for it and find nothing to do. A database
//! migrated by a newer gatewayd is refused, not downgraded.
//!
//! The SQL is a portable subset: `BIGINT`, `TEXT`, `BOOLEAN`, `BYTEA`, primary
//! keys and plain indexes, `INSERT ... ON CONFLICT`, `SELECT ... FOR UPDATE`.
//! What a non-PostgreSQL dialect would replace is listed in docs/operate.md
//! ("Several hubs on PostgreSQL"): the advisory lock here, `LOCK TABLE` and
//! `NOTIFY` in [`super::changes`], `BYTEA` and the identity column.

use deadpool_postgres::GenericClient;

use crate::error::StoreError;

/// The advisory lock key of migrations ("gwhub" in ASCII).
const LOCK_KEY: i64 = 0x67_77_68_75_62;

/// The migrations, in order: (version, what it does, SQL).
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "the hub's state", V1),
    (2, "devices' labels", V2),
    (
        3,
        "templates, variables and rollouts",
        super::rollouts::SCHEMA,
    ),
    (
        4,
        "firmware versions and their parts",
        super::firmware::SCHEMA,
    ),
];

const V2: &str = "
CREATE TABLE device_label (
    device TEXT NOT NULL,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (device, key)
);
CREATE INDEX device_label_by_key ON device_label (key, value);
";

/// The schema version this gatewayd writes.
pub fn latest() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

const V1: &str = "
CREATE TABLE account (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL,
    digest     TEXT NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL
);
CREATE TABLE token (
    digest     TEXT PRIMARY KEY,
    device     TEXT NOT NULL,
    expires_ms BIGINT NOT NULL,
    used_ms    BIGINT,
    created_by TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    replaces   BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX token_by_device ON token (device);
CREATE TABLE device (
    id            TEXT PRIMARY KEY,
    enrolled_ms   BIGINT NOT NULL,
    not_after_ms  BIGINT,
    revoked_ms    BIGINT,
    revoked_by    TEXT,
    serial        TEXT,
    serial_seen   BOOLEAN NOT NULL DEFAULT FALSE,
    prev_serial   TEXT,
    prev_until_ms BIGINT
);
CREATE TABLE consumer (
    name         TEXT PRIMARY KEY,
    serial       TEXT NOT NULL,
    not_after_ms BIGINT NOT NULL,
    created_by   TEXT NOT NULL,
    created_ms   BIGINT NOT NULL,
    revoked_ms   BIGINT,
    revoked_by   TEXT
);
CREATE TABLE status (
    device  TEXT PRIMARY KEY,
    last_ms BIGINT NOT NULL,
    json    TEXT NOT NULL
);
CREATE TABLE config (
    device    TEXT NOT NULL,
    version   BIGINT NOT NULL,
    text      TEXT NOT NULL,
    pushed_by TEXT NOT NULL,
    pushed_ms BIGINT NOT NULL,
    PRIMARY KEY (device, version)
);
-- The row pushes of one device lock, so two hubs number them apart.
CREATE TABLE config_lock (
    device TEXT PRIMARY KEY
);
CREATE TABLE config_state (
    device    TEXT PRIMARY KEY,
    applied   BIGINT NOT NULL,
    text      TEXT NOT NULL,
    result    TEXT NOT NULL,
    result_ms BIGINT NOT NULL
);
CREATE TABLE edge_audit (
    device  TEXT NOT NULL,
    seq     BIGINT NOT NULL,
    time_ms BIGINT NOT NULL,
    json    TEXT NOT NULL,
    PRIMARY KEY (device, seq)
);
CREATE INDEX edge_audit_by_time ON edge_audit (time_ms);
CREATE TABLE edge_audit_head (
    device      TEXT PRIMARY KEY,
    anchor_seq  BIGINT NOT NULL,
    anchor_hash TEXT NOT NULL,
    head_seq    BIGINT NOT NULL,
    head_hash   TEXT NOT NULL,
    broken      TEXT
);
CREATE TABLE alarm (
    id       TEXT PRIMARY KEY,
    device   TEXT NOT NULL,
    time_ms  BIGINT NOT NULL,
    json     TEXT NOT NULL,
    acked_by TEXT,
    acked_ms BIGINT
);
CREATE INDEX alarm_by_time ON alarm (time_ms);
CREATE TABLE change_log (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind    TEXT NOT NULL,
    subject TEXT NOT NULL,
    at_ms   BIGINT NOT NULL
);
CREATE TABLE stream (
    -- The key records carry: a number, not the two names, in every row and
    -- index entry of the largest table.
    id             BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    device         TEXT NOT NULL,
    channel        TEXT NOT NULL,
    deliver_to     TEXT NOT NULL,
    high           BIGINT NOT NULL,
    consumed       BIGINT NOT NULL,
    records        BIGINT NOT NULL,
    bytes          BIGINT NOT NULL,
    duplicates     BIGINT NOT NULL,
    expired_unread BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (device, channel)
);
CREATE TABLE cursor (
    device     TEXT NOT NULL,
    channel    TEXT NOT NULL,
    consumer   TEXT NOT NULL,
    acked      BIGINT NOT NULL,
    granted_ms BIGINT NOT NULL,
    PRIMARY KEY (device, channel, consumer)
);
CREATE INDEX cursor_by_consumer ON cursor (consumer);
CREATE TABLE failure (
    device  TEXT NOT NULL,
    channel TEXT NOT NULL,
    seq     BIGINT NOT NULL,
    reason  TEXT NOT NULL,
    PRIMARY KEY (device, channel, seq)
);
-- A record of stream (device, channel), keyed by its sequence number.
CREATE TABLE record (
    stream      BIGINT NOT NULL REFERENCES stream (id),
    seq         BIGINT NOT NULL,
    time_ms     BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    format      TEXT NOT NULL,
    body        BYTEA NOT NULL,
    PRIMARY KEY (stream, seq)
);
-- Retention scans by time; received_ms grows with the table, so a BRIN
-- index (a few pages, nearly free to keep up) serves it.
CREATE INDEX record_by_received ON record USING brin (received_ms);
";

/// Brings the schema to [`latest`]; returns the version found before.
///
/// # Errors
/// [`StoreError::Refused`] for a schema newer than this gatewayd; the
/// database's errors.
pub async fn migrate(c: &mut deadpool_postgres::Object) -> Result<i64, StoreError> {
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migration (
            version     BIGINT PRIMARY KEY,
            description TEXT NOT NULL,
            applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let found = version(&tx).await?;
    if found > latest() {
        return Err(StoreError::Refused(format!(
            "the database's schema is version {found}, newer than this gatewayd's {}: upgrade this hub's gatewayd",
            latest()
        )));
    }
    for (v, what, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migration (version, description) VALUES ($1, $2)",
            &[v, what],
        )
        .await?;
        tracing::info!(version = v, what, "PostgreSQL schema migrated");
    }
    tx.commit().await?;
    Ok(found)
}

/// The schema version of the database `c` is connected to.
///
/// # Errors
/// The database's errors.
pub async fn version(c: &impl GenericClient) -> Result<i64, StoreError> {
    let row = c
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migration",
            &[],
        )
        .await?;
    Ok(row.get(0))
}
