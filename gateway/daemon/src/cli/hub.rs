//! `gatewayd hub migrate-store --config HUB --from-sqlite DIR`: moves a
//! single hub's SQLite state into the PostgreSQL database of `HUB` (a config
//! with `[hub] store = "postgres"`), then checks the copy: every table's row
//! count, every collected audit chain re-verified. Run it with the old hub
//! stopped; the new hubs start on the database afterwards.

use std::path::PathBuf;

use gateway_store::postgres::Pg;
use gateway_store::postgres::import::{self, ImportError};

use crate::os::exit;

/// `gatewayd hub`
#[derive(Debug, clap::Subcommand)]
pub enum HubCommand {
    /// Copy a single hub's SQLite state (fleet.sqlite, sink.sqlite) into the
    /// PostgreSQL database a hub config names, and verify the copy.
    MigrateStore(MigrateArgs),
}

/// `gatewayd hub migrate-store`
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The hub config with `[hub] store = "postgres"` (where to copy to).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// The old hub's state directory (its fleet.sqlite and sink.sqlite).
    #[arg(long, value_name = "DIR")]
    pub from_sqlite: PathBuf,
}

/// Runs the subcommand; returns the exit code.
pub fn run(cmd: &HubCommand) -> u8 {
    let HubCommand::MigrateStore(a) = cmd;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::OS_ERR;
        }
    };
    match rt.block_on(migrate(a)) {
        Ok(()) => exit::OK,
        Err((code, message)) => {
            eprintln!("error: {message}");
            code
        }
    }
}

async fn migrate(a: &MigrateArgs) -> Result<(), (u8, String)> {
    let checked = super::check::check_file(&a.config, super::today()).map_err(|e| {
        (
            exit::NO_INPUT,
            format!("cannot read {}: {e}", a.config.display()),
        )
    })?;
    let Some(c) = checked.config else {
        return Err((
            exit::CONFIG,
            format!("{} does not check; run gatewayd check", a.config.display()),
        ));
    };
    let Some(store) = c.hub().and_then(|h| h.settings.postgres.as_deref()) else {
        return Err((
            exit::USAGE,
            format!(
                "{} is not a hub with store = \"postgres\"; migrate-store copies into the database such a config names",
                a.config.display()
            ),
        ));
    };
    let registry = a
        .from_sqlite
        .join(gateway_store::sqlite::registry::FILE_NAME);
    let sink = a.from_sqlite.join(gateway_store::sqlite::sink::FILE_NAME);
    let pg = Pg::open(store).await.map_err(|e| {
        let code = match &e {
            gateway_store::postgres::OpenError::Store(s) if s.retry_later() => exit::UNAVAILABLE,
            _ => exit::CONFIG,
        };
        (code, e.to_string())
    })?;
    println!(
        "copying {} and {} into PostgreSQL database {}",
        registry.display(),
        sink.display(),
        store.dbname
    );
    let mut last = (String::new(), 0u64);
    let report = import::from_sqlite(&pg, &registry, &sink, |table, n| {
        if table != last.0 || n >= last.1 + 10_000 {
            println!("  {table}: {n} rows");
            last = (table.to_owned(), n);
        }
    })
    .await
    .map_err(|e| {
        let code = match &e {
            ImportError::Sqlite { .. } => exit::NO_INPUT,
            ImportError::Store(s) if s.retry_later() => exit::UNAVAILABLE,
            _ => exit::FAILED,
        };
        (code, format!("{e}; nothing was copied"))
    })?;
    println!("copied and counted:");
    for (table, n) in &report.tables {
        println!("  {table:<16} {n}");
    }
    println!(
        "audit chains: {} verified from anchor to head, {} marked broken at the source (copied with their mark)",
        report.chains.0, report.chains.1
    );
    println!("done: start the hubs with {}", a.config.display());
    Ok(())
}
