//! The PostgreSQL registry's firmware store, as in the SQLite engine
//! ([`crate::sqlite::firmware`]): every hub on the database serves the
//! parts any of them received.

use deadpool_postgres::GenericClient;

use super::registry::PgRegistry;
use crate::registry::{
    FirmwarePart, FirmwareRow, NewFirmware, RegistryError, StoredFirmware, same_firmware,
};

/// The tables (migration 4).
pub const SCHEMA: &str = "
CREATE TABLE firmware (
    version          TEXT PRIMARY KEY,
    security_version BIGINT NOT NULL,
    manifest         TEXT NOT NULL,
    signature        TEXT NOT NULL,
    parts            BIGINT NOT NULL,
    linux_parts      BIGINT NOT NULL,
    initrd_parts     BIGINT NOT NULL,
    complete         BOOLEAN NOT NULL,
    by_account       TEXT NOT NULL,
    at_ms            BIGINT NOT NULL
);
CREATE TABLE firmware_part (
    version TEXT NOT NULL,
    name    TEXT NOT NULL,
    bytes   BYTEA NOT NULL,
    PRIMARY KEY (version, name)
);
";

const ROW: &str = "SELECT f.version, f.security_version, f.parts, f.linux_parts, f.initrd_parts,
        (SELECT COUNT(*) FROM firmware_part p WHERE p.version = f.version),
        f.complete, f.by_account, f.at_ms
    FROM firmware f";

type R<T> = Result<T, RegistryError>;

fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn firmware_row(r: &tokio_postgres::Row) -> FirmwareRow {
    FirmwareRow {
        version: r.get(0),
        security_version: u64_of(r.get(1)),
        parts: u64_of(r.get(2)),
        boot_parts: [u64_of(r.get(3)), u64_of(r.get(4))],
        stored: u64_of(r.get(5)),
        complete: r.get(6),
        by: r.get(7),
        at_ms: r.get(8),
    }
}

impl PgRegistry {
    pub(super) async fn put_firmware(&self, f: NewFirmware) -> R<FirmwareRow> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        // Two hubs taking the same upload at once: the second's insert waits
        // on the first's row, then compares with it.
        tx.execute(
            "INSERT INTO firmware (version, security_version, manifest, signature,
                 parts, linux_parts, initrd_parts, complete, by_account, at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, FALSE, $8, $9)
             ON CONFLICT (version) DO NOTHING",
            &[
                &f.version,
                &i64_of(f.security_version),
                &f.manifest,
                &f.signature,
                &i64_of(f.parts),
                &i64_of(f.boot_parts[0]),
                &i64_of(f.boot_parts[1]),
                &f.by,
                &f.now_ms,
            ],
        )
        .await?;
        let stored = tx
            .query_one(
                "SELECT manifest, parts, linux_parts, initrd_parts FROM firmware WHERE version = $1",
                &[&f.version],
            )
            .await?;
        let parts = [1, 2, 3].map(|i| u64_of(stored.get(i)));
        same_firmware(stored.get(0), parts, &f)?;
        let row = tx
            .query_one(&format!("{ROW} WHERE f.version = $1"), &[&f.version])
            .await?;
        tx.commit().await?;
        Ok(firmware_row(&row))
    }

    pub(super) async fn firmwares(&self) -> R<Vec<FirmwareRow>> {
        let c = self.pg.client().await?;
        Ok(c.query(
            &format!("{ROW} ORDER BY f.at_ms DESC, f.version DESC LIMIT 1000"),
            &[],
        )
        .await?
        .iter()
        .map(firmware_row)
        .collect())
    }

    pub(super) async fn firmware(&self, version: String) -> R<Option<StoredFirmware>> {
        let c = self.pg.client().await?;
        let Some(row) = c
            .query_opt(&format!("{ROW} WHERE f.version = $1"), &[&version])
            .await?
        else {
            return Ok(None);
        };
        let text = c
            .query_one(
                "SELECT manifest, signature FROM firmware WHERE version = $1",
                &[&version],
            )
            .await?;
        Ok(Some(StoredFirmware {
            row: firmware_row(&row),
            manifest: text.get(0),
            signature: text.get(1),
        }))
    }

    pub(super) async fn put_firmware_part(&self, p: FirmwarePart) -> R<()> {
        let c = self.pg.client().await?;
        c.execute(
            "INSERT INTO firmware_part (version, name, bytes) VALUES ($1, $2, $3)
             ON CONFLICT (version, name) DO UPDATE SET bytes = EXCLUDED.bytes",
            &[&p.version, &p.name, &p.bytes],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn firmware_part(&self, version: String, name: String) -> R<Option<Vec<u8>>> {
        let c = self.pg.client().await?;
        Ok(c.query_opt(
            "SELECT bytes FROM firmware_part WHERE version = $1 AND name = $2",
            &[&version, &name],
        )
        .await?
        .map(|r| r.get(0)))
    }

    pub(super) async fn firmware_parts(&self, version: String) -> R<Vec<String>> {
        let c = self.pg.client().await?;
        Ok(c.query(
            "SELECT name FROM firmware_part WHERE version = $1 ORDER BY name",
            &[&version],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
    }

    pub(super) async fn firmware_complete(&self, version: String) -> R<()> {
        let c = self.pg.client().await?;
        c.execute(
            "UPDATE firmware SET complete = TRUE WHERE version = $1",
            &[&version],
        )
        .await?;
        Ok(())
    }
}
