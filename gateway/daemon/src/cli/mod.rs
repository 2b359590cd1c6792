//! `gatewayd` subcommands.

pub mod audit;
pub mod check;

use std::time::{SystemTime, UNIX_EPOCH};

use gateway_core::units::Date;

/// Output format of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// For people.
    Text,
    /// For scripts: one JSON document on stdout.
    Json,
}

/// Today's date in UTC, from the system clock.
pub fn today_utc() -> Date {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    Date::from_unix_ms(ms)
}

/// Parses `--at YYYY-MM-DD` for clap.
///
/// # Errors
/// When the text is not a calendar date.
pub fn parse_date(s: &str) -> Result<Date, String> {
    s.parse::<Date>().map_err(|e| format!("{e}; {}", e.hint))
}
