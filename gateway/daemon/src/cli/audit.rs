//! `gatewayd audit verify|show --state-dir DIR`
//!
//! `verify` exits 0 and prints the count when the chain is intact, 1 naming the
//! first broken record when not, 66 when there is no audit database.

use std::path::PathBuf;

use gateway_store::audit::{AuditLog, OpenError, VerifyError};
use serde::Serialize;

use super::OutputFormat;
use crate::os::exit;

/// `gatewayd audit ...`
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Walk the hash chain and report the first broken record, if any.
    Verify {
        /// The daemon's state directory (holds audit.sqlite).
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
    },
    /// List audit records, oldest first.
    Show {
        /// The daemon's state directory (holds audit.sqlite).
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// Output format (json: one array).
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
        /// Start at this sequence number.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Show at most this many records.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

#[derive(Serialize)]
struct VerifyReport {
    intact: bool,
    records: Option<u64>,
    pruned: Option<u64>,
    head_seq: Option<u64>,
    broken_at: Option<u64>,
    reason: Option<String>,
}

fn open(state_dir: &std::path::Path) -> Result<AuditLog, u8> {
    AuditLog::open_existing(state_dir).map_err(|e| {
        eprintln!("error: {e}");
        match e {
            OpenError::Missing(_) => {
                eprintln!("  hint: give the state directory of a gatewayd that has run (node.state_dir in its config)");
                exit::NO_INPUT
            }
            _ => exit::FAILED,
        }
    })
}

/// Runs an audit subcommand; returns the exit code.
pub fn run(cmd: &AuditCommand) -> u8 {
    match cmd {
        AuditCommand::Verify { state_dir, format } => {
            let log = match open(state_dir) {
                Ok(l) => l,
                Err(code) => return code,
            };
            let result = log.verify();
            let (code, report) = match &result {
                Ok(v) => (
                    exit::OK,
                    VerifyReport {
                        intact: true,
                        records: Some(v.count),
                        pruned: Some(v.pruned),
                        head_seq: Some(v.head_seq),
                        broken_at: None,
                        reason: None,
                    },
                ),
                Err(
                    e @ (VerifyError::Broken(_)
                    | VerifyError::Unreadable { .. }
                    | VerifyError::Meta),
                ) => {
                    let at = match e {
                        VerifyError::Broken(b) => Some(b.seq()),
                        VerifyError::Unreadable { seq, .. } => u64::try_from(*seq).ok(),
                        _ => None,
                    };
                    (
                        exit::FAILED,
                        VerifyReport {
                            intact: false,
                            records: None,
                            pruned: None,
                            head_seq: None,
                            broken_at: at,
                            reason: Some(e.to_string()),
                        },
                    )
                }
                Err(e) => {
                    eprintln!("error: cannot read the audit chain: {e}");
                    return exit::FAILED;
                }
            };
            match format {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                ),
                OutputFormat::Text => match &result {
                    Ok(v) => {
                        let pruned = if v.pruned > 0 {
                            format!(" ({} older records pruned by retention)", v.pruned)
                        } else {
                            String::new()
                        };
                        println!(
                            "audit chain intact: {} records{pruned}, head at record {}",
                            v.count, v.head_seq
                        );
                    }
                    Err(e) => eprintln!("audit chain BROKEN: {e}"),
                },
            }
            code
        }
        AuditCommand::Show {
            state_dir,
            format,
            from,
            limit,
        } => {
            let log = match open(state_dir) {
                Ok(l) => l,
                Err(code) => return code,
            };
            let records = match log.records(*from, *limit) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    eprintln!(
                        "  hint: run `gatewayd audit verify --state-dir {}`",
                        state_dir.display()
                    );
                    return exit::FAILED;
                }
            };
            match format {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&records).unwrap_or_default()
                ),
                OutputFormat::Text => {
                    // Fields may hold what a peer sent: a control character
                    // (a newline above all) is printed escaped, so no field
                    // can print a line that looks like another record.
                    let safe = gateway_core::refusals::escape_controls;
                    for r in &records {
                        let e = &r.event;
                        let rule = if e.rule.is_empty() {
                            String::new()
                        } else {
                            format!(" [{}]", safe(&e.rule))
                        };
                        println!(
                            "{:>6} {} {} {} {} -> {} {}{rule} {}",
                            r.seq,
                            format_time(e.time_ms),
                            safe(&e.device),
                            safe(&e.event),
                            safe(&e.subject),
                            safe(&e.object),
                            safe(&e.outcome),
                            safe(&e.detail)
                        );
                    }
                    if records.is_empty() {
                        println!("no audit records from {from}");
                    }
                }
            }
            exit::OK
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a Unix time in milliseconds.
fn format_time(ms: i64) -> String {
    let date = gateway_core::units::Date::from_unix_ms(ms);
    let in_day = ms.rem_euclid(86_400_000);
    let (h, m, s, milli) = (
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000,
    );
    format!("{date}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}
