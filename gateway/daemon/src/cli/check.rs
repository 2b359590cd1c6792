//! `gatewayd check --config FILE [--format text|json] [--at YYYY-MM-DD]`
//!
//! Exit 0 when the config is valid (warnings printed), 64 when not (every error
//! listed), 66 when the file cannot be read. The JSON document is described in
//! docs/config.md ("check output") and only ever gains fields.

use std::path::{Path, PathBuf};

use gateway_core::check::{self, Checked};
use gateway_core::diag::{self, Diagnostic, Severity};
use gateway_core::summary::Summary;
use gateway_core::units::Date;
use serde::Serialize;

use super::OutputFormat;
use crate::os::exit;

/// Arguments of `gatewayd check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The configuration file to check.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: OutputFormat,
    /// Evaluate assessment validity on this date instead of today (China Standard Time).
    #[arg(long, value_name = "YYYY-MM-DD", value_parser = super::parse_date)]
    pub at: Option<Date>,
}

/// The JSON form of a diagnostic.
#[derive(Debug, Serialize)]
struct JsonDiagnostic<'a> {
    severity: Severity,
    rule: Option<&'static str>,
    file: &'a str,
    line: u32,
    column: u32,
    message: &'a str,
    hint: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    format_version: u32,
    file: &'a str,
    checked_for: Date,
    valid: bool,
    boundary_rules_checked: bool,
    errors: Vec<JsonDiagnostic<'a>>,
    warnings: Vec<JsonDiagnostic<'a>>,
    summary: Option<Summary>,
}

/// Reads and checks a config file, adding warnings for run-time files that are
/// missing. Returns the file's text on success too, for the caller's messages.
///
/// # Errors
/// When the file cannot be read.
pub fn check_file(path: &Path, today: Date) -> std::io::Result<Checked> {
    let src = std::fs::read_to_string(path)?;
    let mut checked = check::load(&src, today);
    if let Some(cfg) = &checked.config {
        for f in cfg.runtime_paths() {
            if !f.path.exists() {
                checked.diagnostics.push(
                    Diagnostic::warning(f.loc, format!("{}: {} does not exist on this machine", f.key, f.path.display()))
                        .hint("it must be in place before gatewayd runs; ignore this when checking a config for another box"),
                );
            }
        }
        if let Some(mode) = crate::os::open_to_others(&cfg.node.state_dir) {
            // The key's line, for the location (the checked config keeps none).
            let line = src
                .lines()
                .position(|l| l.trim_start().starts_with("state_dir"))
                .map_or(1, |i| u32::try_from(i + 1).unwrap_or(1));
            checked.diagnostics.push(
                Diagnostic::warning(
                    gateway_core::diag::Location { line, column: 1 },
                    format!(
                        "node.state_dir: {} is open to other users (mode {mode:04o})",
                        cfg.node.state_dir.display()
                    ),
                )
                .hint("chmod 700 it: the audit chain, databases, keys and spool files live there"),
            );
        }
        if let Some(scan) = &cfg.scan
            && let Some(dir) = &scan.database_dir
            && let Some(age) = newest_file_age(dir)
            && age > scan.max_db_age
        {
            let line = src
                .lines()
                .position(|l| l.trim_start().starts_with("database_dir"))
                .map_or(1, |i| u32::try_from(i + 1).unwrap_or(1));
            checked.diagnostics.push(
                Diagnostic::warning(
                    gateway_core::diag::Location { line, column: 1 },
                    format!(
                        "scan.database_dir: the malware signature database in {} is {} days old, older than scan.max_db_age (GB/T 22239-2019 8.1.3.4 a: keep it updated)",
                        dir.display(),
                        age.as_secs() / 86_400
                    ),
                )
                .hint("update it (freshclam, or the offline update procedure), or raise max_db_age"),
            );
        }
        diag::sort(&mut checked.diagnostics);
    }
    Ok(checked)
}

/// How long ago the newest regular file in `dir` was modified.
fn newest_file_age(dir: &Path) -> Option<std::time::Duration> {
    let newest = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            m.is_file().then_some(m.modified().ok()?)
        })
        .max()?;
    newest.elapsed().ok()
}

/// Runs `gatewayd check`; returns the exit code.
pub fn run(args: &CheckArgs) -> u8 {
    let today = args.at.unwrap_or_else(super::today);
    let file = args.config.display().to_string();
    let checked = match check_file(&args.config, today) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot read {file}: {e}");
            eprintln!(
                "  hint: give the path of a gatewayd TOML config, for example --config /etc/gatewayd/gatewayd.toml"
            );
            return exit::NO_INPUT;
        }
    };
    let valid = !checked.has_errors();
    let summary = checked.config.as_ref().map(|c| Summary::new(c, today));
    match args.format {
        OutputFormat::Json => {
            fn json<'a>(file: &'a str, d: &'a Diagnostic) -> JsonDiagnostic<'a> {
                JsonDiagnostic {
                    severity: d.severity,
                    rule: d.rule.map(|r| r.as_str()),
                    file,
                    line: d.location.line,
                    column: d.location.column,
                    message: &d.message,
                    hint: d.hint.as_deref(),
                }
            }
            let report = JsonReport {
                format_version: 1,
                file: &file,
                checked_for: today,
                valid,
                boundary_rules_checked: checked.rules_checked,
                errors: checked
                    .diagnostics
                    .iter()
                    .filter(|d| d.is_error())
                    .map(|d| json(&file, d))
                    .collect(),
                warnings: checked
                    .diagnostics
                    .iter()
                    .filter(|d| !d.is_error())
                    .map(|d| json(&file, d))
                    .collect(),
                summary,
            };
            match serde_json::to_string_pretty(&report) {
                Ok(s) => println!("{s}"),
                Err(e) => {
                    eprintln!("error: cannot encode the report: {e}");
                    return exit::SOFTWARE;
                }
            }
        }
        OutputFormat::Text => {
            for d in &checked.diagnostics {
                eprintln!("{}", d.render(&file));
            }
            let errors = checked.diagnostics.iter().filter(|d| d.is_error()).count();
            let warnings = checked.diagnostics.len() - errors;
            if valid {
                let s = summary
                    .as_ref()
                    .map(Summary::render_text)
                    .unwrap_or_default();
                println!(
                    "{file}: valid, checked for {today} ({warnings} warning{})\n",
                    plural(warnings)
                );
                print!("{s}");
            } else {
                eprintln!(
                    "{file}: invalid: {errors} error{}, {warnings} warning{}",
                    plural(errors),
                    plural(warnings)
                );
                if !checked.rules_checked {
                    eprintln!(
                        "note: the boundary rules (docs/policy.md) are checked once these errors are fixed"
                    );
                }
            }
        }
    }
    if valid { exit::OK } else { exit::CONFIG }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
