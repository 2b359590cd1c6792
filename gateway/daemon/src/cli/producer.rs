//! `gatewayd producer add|remove|list --tokens FILE`: the producers of an
//! `[[ingest]]` with `auth = "token"`. `add` writes the new token to a file
//! of its own (mode 0600, never overwritten) for the producer application,
//! and only its SHA-256 to the tokens file; the running daemon picks the
//! change up within a second.

use std::path::{Path, PathBuf};

use gateway_core::fleet::Secret;
use gateway_core::producers::{PRODUCER_KIND, Tokens};

use crate::channel::producers::read_tokens;
use crate::os::exit;
use crate::tunnel::pki::{write_new, write_replace};

/// `gatewayd producer`
#[derive(Debug, clap::Subcommand)]
pub enum ProducerCommand {
    /// Give a producer application a token (a new one replaces its old one).
    Add(AddArgs),
    /// Take a producer's token away.
    Remove(RemoveArgs),
    /// List the producers of a tokens file.
    List(ListArgs),
}

/// `gatewayd producer add`
#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// The producer's name (as it appears in the audit and the receipts).
    pub name: String,
    /// The tokens file named by `[[ingest]] tokens` (created if missing).
    #[arg(long, value_name = "FILE")]
    pub tokens: PathBuf,
    /// Where to write the token for the producer (mode 0600; never overwritten).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// `gatewayd producer remove`
#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    /// The producer's name.
    pub name: String,
    /// The tokens file.
    #[arg(long, value_name = "FILE")]
    pub tokens: PathBuf,
}

/// `gatewayd producer list`
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// The tokens file.
    #[arg(long, value_name = "FILE")]
    pub tokens: PathBuf,
}

/// Runs the subcommand; returns the exit code.
pub fn run(cmd: &ProducerCommand) -> u8 {
    let result = match cmd {
        ProducerCommand::Add(a) => add(a),
        ProducerCommand::Remove(a) => remove(a),
        ProducerCommand::List(a) => load(&a.tokens, false).map(|t| {
            println!("PRODUCER");
            for n in t.names() {
                println!("{n}");
            }
        }),
    };
    match result {
        Ok(()) => exit::OK,
        Err((code, message)) => {
            eprintln!("error: {message}");
            code
        }
    }
}

fn load(path: &Path, may_be_missing: bool) -> Result<Tokens, (u8, String)> {
    if may_be_missing && std::fs::symlink_metadata(path).is_err() {
        return Ok(Tokens::default());
    }
    read_tokens(path).map_err(|e| (exit::CONFIG, e))
}

/// Replaces the tokens file with `tokens`, all or nothing (a temporary file
/// beside it, synced, renamed over it), keeping its owner, group and
/// read permissions (the daemon's user must go on reading it), never
/// writable by group or others.
fn save(path: &Path, tokens: &Tokens) -> Result<(), (u8, String)> {
    use std::os::unix::fs::MetadataExt as _;
    let before = std::fs::symlink_metadata(path).ok();
    let mode = before
        .as_ref()
        .map_or(0o600, |m| (m.mode() & 0o644) | 0o600);
    write_replace(path, &tokens.render(), mode).map_err(|e| (exit::OS_ERR, e.to_string()))?;
    if let Some(m) = before {
        std::os::unix::fs::chown(path, Some(m.uid()), Some(m.gid()))
            .map_err(|e| (exit::OS_ERR, format!("{}: {e}", path.display())))?;
        // chown may have cleared nothing; the mode is set again to be sure.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(|e| (exit::OS_ERR, format!("{}: {e}", path.display())))?;
    }
    Ok(())
}

fn add(a: &AddArgs) -> Result<(), (u8, String)> {
    gateway_core::units::check_name("producer", &a.name)
        .map_err(|e| (exit::USAGE, format!("NAME: {}; {}", e.message, e.hint)))?;
    let mut tokens = load(&a.tokens, true)?;
    let secret: Secret = crate::fleet::new_secret(PRODUCER_KIND, a.name.clone());
    // The token's file first: a digest whose token was not written is useless.
    write_new(&a.out, &format!("{}\n", secret.to_text()), 0o600).map_err(|e| {
        (
            exit::OS_ERR,
            format!("{e} (a token file is never overwritten)"),
        )
    })?;
    let replaced = tokens.names().any(|n| n == a.name);
    tokens.set(&a.name, secret.digest());
    if let Err(e) = save(&a.tokens, &tokens) {
        let _ = std::fs::remove_file(&a.out);
        return Err(e);
    }
    println!(
        "producer {} {}; its token is in {} (mode 0600)",
        a.name,
        if replaced {
            "has a new token (the old one no longer works)"
        } else {
            "added"
        },
        a.out.display()
    );
    println!(
        "  the producer sends it as: Authorization: Bearer $(cat {})",
        a.out.display()
    );
    Ok(())
}

fn remove(a: &RemoveArgs) -> Result<(), (u8, String)> {
    let mut tokens = load(&a.tokens, false)?;
    if !tokens.remove(&a.name) {
        return Err((
            exit::CONFIG,
            format!("{}: no producer {:?}", a.tokens.display(), a.name),
        ));
    }
    save(&a.tokens, &tokens)?;
    println!("producer {} removed; its token no longer works", a.name);
    Ok(())
}
