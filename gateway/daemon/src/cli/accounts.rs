//! `gatewayd accounts add|list --config HUB.toml`: the bootstrap of operator
//! accounts, run on the hub itself. Each account holds exactly one role
//! (system, security or audit administrator); its credential is written to a
//! file (mode 0600) and only its digest is kept in the hub's registry.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;

use std::sync::Arc;

use gateway_core::fleet::{self, AdminRole};
use gateway_store::registry::{NewAccount, Registry};

use crate::os::exit;

/// `gatewayd accounts`
#[derive(Debug, clap::Subcommand)]
pub enum AccountsCommand {
    /// Create an operator account and write its credential to a file.
    Add(AddArgs),
    /// List the accounts and their roles.
    List(ListArgs),
}

/// `gatewayd accounts add`
#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// The hub's configuration file (for its state directory).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// Account name (a person).
    #[arg(long)]
    pub name: String,
    /// system, security or audit.
    #[arg(long, value_parser = ["system", "security", "audit"])]
    pub role: String,
    /// Where to write the credential (mode 0600; never overwritten).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// `gatewayd accounts list`
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// The hub's configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
}

/// The hub's registry, opened directly (offline, like `gatewayd pki`): its
/// SQLite file, or its PostgreSQL database.
async fn registry(config: &std::path::Path) -> Result<Arc<dyn Registry>, (u8, String)> {
    let checked = super::check::check_file(config, super::today()).map_err(|e| {
        (
            exit::NO_INPUT,
            format!("cannot read {}: {e}", config.display()),
        )
    })?;
    let Some(c) = checked.config else {
        return Err((
            exit::CONFIG,
            format!("{} does not check; run gatewayd check", config.display()),
        ));
    };
    let gateway_core::config::Role::Hub(h) = &c.role else {
        return Err((
            exit::USAGE,
            "operator accounts live on a hub; this config is an edge's".into(),
        ));
    };
    if h.settings.postgres.is_none() {
        std::fs::create_dir_all(&c.node.state_dir)
            .map_err(|e| (exit::OS_ERR, format!("{}: {e}", c.node.state_dir.display())))?;
    }
    crate::role::open_registry(h, &c.node.state_dir)
        .await
        .map_err(|e| (exit::OS_ERR, e.to_string()))
}

/// Runs the subcommand; returns the exit code.
pub fn run(cmd: &AccountsCommand) -> u8 {
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
    let result = rt.block_on(async {
        match cmd {
            AccountsCommand::Add(a) => add(a).await,
            AccountsCommand::List(a) => {
                let r = registry(&a.config).await?;
                let rows = r
                    .accounts()
                    .await
                    .map_err(|e| (exit::OS_ERR, e.to_string()))?;
                println!("{:<24} ROLE", "ACCOUNT");
                for (name, role) in rows {
                    println!("{name:<24} {role}");
                }
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => exit::OK,
        Err((code, message)) => {
            eprintln!("error: {message}");
            code
        }
    }
}

async fn add(a: &AddArgs) -> Result<(), (u8, String)> {
    gateway_core::units::check_name("account", &a.name)
        .map_err(|e| (exit::USAGE, format!("--name: {}; {}", e.message, e.hint)))?;
    let role = AdminRole::parse(&a.role)
        .ok_or((exit::USAGE, "--role: system, security or audit".into()))?;
    let reg = registry(&a.config).await?;
    let secret = crate::fleet::new_secret(fleet::CREDENTIAL_KIND, a.name.clone());
    // The file first: an account whose credential could not be written is useless.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&a.out)
        .map_err(|e| {
            (
                exit::OS_ERR,
                format!("{}: {e} (it is never overwritten)", a.out.display()),
            )
        })?;
    let now = crate::node::clock::now_ms();
    let account = NewAccount {
        name: a.name.clone(),
        role,
        digest: secret.digest(),
        now_ms: now,
    };
    if let Err(e) = reg.add_account(account).await {
        drop(f);
        let _ = std::fs::remove_file(&a.out);
        return Err((exit::FAILED, e.to_string()));
    }
    f.write_all(format!("{}\n", secret.to_text()).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| (exit::OS_ERR, format!("{}: {e}", a.out.display())))?;
    println!(
        "account {} ({} administrator) created; credential in {} (mode 0600)",
        a.name,
        role.as_str(),
        a.out.display()
    );
    println!("  give it to gatewayctl with --credentials FILE or GATEWAYCTL_CREDENTIALS=FILE");
    Ok(())
}
