//! `gatewayd nftables --config FILE`: prints the box's nftables baseline (no
//! forwarding; only the configured listeners, each on its address). Apply with
//! `gatewayd nftables --config FILE | nft -f -`.

use std::path::PathBuf;

use crate::os::exit;

/// `gatewayd nftables`
#[derive(Debug, clap::Args)]
pub struct NftablesArgs {
    /// The configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Prints the ruleset; returns the exit code.
pub fn run(args: &NftablesArgs) -> u8 {
    let text = match std::fs::read_to_string(&args.config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", args.config.display());
            return exit::NO_INPUT;
        }
    };
    let checked = gateway_core::check::load(&text, super::today());
    let Some(config) = checked.config else {
        eprintln!(
            "error: {} is not valid; `gatewayd check --config {}` shows why",
            args.config.display(),
            args.config.display()
        );
        return exit::CONFIG;
    };
    print!("{}", gateway_core::firewall::nftables(&config));
    exit::OK
}
