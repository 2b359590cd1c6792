//! The SQLite registry's firmware store: each uploaded version's signed
//! manifest and its parts (root chunks, kernel and initrd in 1 MiB parts),
//! so any hub on the file can serve them to boxes.

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::registry::SqliteRegistry;
use crate::registry::{
    FirmwarePart, FirmwareRow, NewFirmware, RegistryError, StoredFirmware, same_firmware,
};

/// The tables (created with the registry's).
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS firmware (
    version          TEXT PRIMARY KEY,
    security_version INTEGER NOT NULL,
    manifest         TEXT NOT NULL,
    signature        TEXT NOT NULL,
    parts            INTEGER NOT NULL,
    linux_parts      INTEGER NOT NULL,
    initrd_parts     INTEGER NOT NULL,
    complete         INTEGER NOT NULL,
    by_account       TEXT NOT NULL,
    at_ms            INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS firmware_part (
    version TEXT NOT NULL,
    name    TEXT NOT NULL,
    bytes   BLOB NOT NULL,
    PRIMARY KEY (version, name)
) STRICT;
";

const ROW: &str = "SELECT f.version, f.security_version, f.parts, f.linux_parts, f.initrd_parts,
        (SELECT COUNT(*) FROM firmware_part p WHERE p.version = f.version),
        f.complete, f.by_account, f.at_ms
    FROM firmware f";

fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn firmware_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FirmwareRow> {
    Ok(FirmwareRow {
        version: r.get(0)?,
        security_version: u64_of(r.get(1)?),
        parts: u64_of(r.get(2)?),
        boot_parts: [u64_of(r.get(3)?), u64_of(r.get(4)?)],
        stored: u64_of(r.get(5)?),
        complete: r.get::<_, i64>(6)? != 0,
        by: r.get(7)?,
        at_ms: r.get(8)?,
    })
}

impl SqliteRegistry {
    /// See [`crate::registry::Registry::put_firmware`].
    ///
    /// # Errors
    /// Another manifest under the version; SQLite.
    pub fn put_firmware(&mut self, f: &NewFirmware) -> Result<FirmwareRow, RegistryError> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let stored: Option<(String, [i64; 3])> = tx
            .query_row(
                "SELECT manifest, parts, linux_parts, initrd_parts FROM firmware WHERE version = ?1",
                [&f.version],
                |r| Ok((r.get(0)?, [r.get(1)?, r.get(2)?, r.get(3)?])),
            )
            .optional()?;
        match stored {
            Some((manifest, parts)) => same_firmware(&manifest, parts.map(u64_of), f)?,
            None => {
                tx.execute(
                    "INSERT INTO firmware (version, security_version, manifest, signature,
                         parts, linux_parts, initrd_parts, complete, by_account, at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8, ?9)",
                    params![
                        f.version,
                        i64_of(f.security_version),
                        f.manifest,
                        f.signature,
                        i64_of(f.parts),
                        i64_of(f.boot_parts[0]),
                        i64_of(f.boot_parts[1]),
                        f.by,
                        f.now_ms
                    ],
                )?;
            }
        }
        let row = tx.query_row(
            &format!("{ROW} WHERE f.version = ?1"),
            [&f.version],
            firmware_row,
        )?;
        tx.commit()?;
        Ok(row)
    }

    /// See [`crate::registry::Registry::firmwares`].
    ///
    /// # Errors
    /// SQLite.
    pub fn firmwares(&self) -> Result<Vec<FirmwareRow>, RegistryError> {
        let mut st = self.db.prepare_cached(&format!(
            "{ROW} ORDER BY f.at_ms DESC, f.version DESC LIMIT 1000"
        ))?;
        let rows = st.query_map([], firmware_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// See [`crate::registry::Registry::firmware`].
    ///
    /// # Errors
    /// SQLite.
    pub fn firmware(&self, version: &str) -> Result<Option<StoredFirmware>, RegistryError> {
        let Some(row) = self
            .db
            .query_row(
                &format!("{ROW} WHERE f.version = ?1"),
                [version],
                firmware_row,
            )
            .optional()?
        else {
            return Ok(None);
        };
        let (manifest, signature) = self.db.query_row(
            "SELECT manifest, signature FROM firmware WHERE version = ?1",
            [version],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(Some(StoredFirmware {
            row,
            manifest,
            signature,
        }))
    }

    /// See [`crate::registry::Registry::put_firmware_part`].
    ///
    /// # Errors
    /// SQLite.
    pub fn put_firmware_part(&mut self, p: &FirmwarePart) -> Result<(), RegistryError> {
        self.db.execute(
            "INSERT INTO firmware_part (version, name, bytes) VALUES (?1, ?2, ?3)
             ON CONFLICT (version, name) DO UPDATE SET bytes = ?3",
            params![p.version, p.name, p.bytes],
        )?;
        Ok(())
    }

    /// See [`crate::registry::Registry::firmware_part`].
    ///
    /// # Errors
    /// SQLite.
    pub fn firmware_part(
        &self,
        version: &str,
        name: &str,
    ) -> Result<Option<Vec<u8>>, RegistryError> {
        Ok(self
            .db
            .query_row(
                "SELECT bytes FROM firmware_part WHERE version = ?1 AND name = ?2",
                [version, name],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// See [`crate::registry::Registry::firmware_parts`].
    ///
    /// # Errors
    /// SQLite.
    pub fn firmware_parts(&self, version: &str) -> Result<Vec<String>, RegistryError> {
        let mut st = self
            .db
            .prepare_cached("SELECT name FROM firmware_part WHERE version = ?1 ORDER BY name")?;
        let rows = st.query_map([version], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// See [`crate::registry::Registry::firmware_complete`].
    ///
    /// # Errors
    /// SQLite.
    pub fn firmware_complete(&mut self, version: &str) -> Result<(), RegistryError> {
        self.db.execute(
            "UPDATE firmware SET complete = 1 WHERE version = ?1",
            [version],
        )?;
        Ok(())
    }
}
