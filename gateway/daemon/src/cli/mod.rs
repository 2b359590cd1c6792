//! `gatewayd` subcommands.

pub mod accounts;
pub mod audit;
pub mod channels;
pub mod check;
pub mod demo;
pub mod enroll;
pub mod hub;
pub mod nftables;
pub mod pki;
pub mod producer;
pub mod run;

use gateway_core::units::Date;

/// Output format of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// For people.
    Text,
    /// For scripts: one JSON document on stdout.
    Json,
}

/// Today's date in China Standard Time, in which assessment dates are written.
pub fn today() -> Date {
    crate::node::clock::today_local()
}

/// Parses `--at YYYY-MM-DD` for clap.
///
/// # Errors
/// When the text is not a calendar date.
pub fn parse_date(s: &str) -> Result<Date, String> {
    s.parse::<Date>().map_err(|e| format!("{e}; {}", e.hint))
}
