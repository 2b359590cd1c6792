//! `gatewayd enroll --config FILE --token TOKEN`: get this box its device
//! certificate from a hub. The key is made here and never leaves the box; the
//! token (from `gatewayctl token create`) is single-use and bound to the
//! config's `node.id`. The certificate and key land where `[uplink]` says.

use std::path::PathBuf;

use super::run::init_logging;
use crate::fleet::enroll::{self, EnrollError};
use crate::os::exit;

/// `gatewayd enroll`
#[derive(Debug, clap::Args)]
pub struct EnrollArgs {
    /// The edge's configuration file ([node].id, [uplink] hubs, ca, cert, key).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// The enrollment token, `gwt1.DEVICE.HEX` (or use --token-file, or the
    /// GATEWAYD_ENROLL_TOKEN environment variable).
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// A file holding the token.
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
}

/// Enrolls; returns the exit code.
pub fn run(args: &EnrollArgs) -> u8 {
    init_logging();
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {}: {e}", f.display());
                return exit::NO_INPUT;
            }
        },
        (None, None) => match std::env::var("GATEWAYD_ENROLL_TOKEN") {
            Ok(t) => t,
            Err(_) => {
                eprintln!("error: no token: give --token, --token-file or GATEWAYD_ENROLL_TOKEN");
                eprintln!(
                    "  hint: central ops make one with `gatewayctl token create --device ID`"
                );
                return exit::USAGE;
            }
        },
    };
    let checked = match super::check::check_file(&args.config, super::today()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", args.config.display());
            return exit::NO_INPUT;
        }
    };
    let Some(config) = checked.config else {
        for d in checked.diagnostics.iter().filter(|d| d.is_error()) {
            eprintln!("{}", d.render(&args.config.display().to_string()));
        }
        return exit::CONFIG;
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return exit::SOFTWARE;
        }
    };
    match rt.block_on(enroll::enroll(&config, &token)) {
        Ok((hub, not_after)) => {
            // Whole minutes once it is long: "24h", not "86399s".
            let secs =
                u64::try_from((not_after - crate::node::clock::now_ms()) / 1000).unwrap_or(0);
            let left = std::time::Duration::from_secs(if secs >= 120 {
                (secs + 30) / 60 * 60
            } else {
                secs
            });
            println!(
                "enrolled {} with hub {hub}; certificate valid for {}, renewed over the tunnel at two thirds of that",
                config.node.id,
                gateway_core::units::format_duration(left)
            );
            if let gateway_core::config::Role::Edge(e) = &config.role {
                println!("  certificate: {}", e.uplink.cert.path.display());
                println!("  key (0600, made here): {}", e.uplink.key.path.display());
            }
            println!("next: gatewayd run --config {}", args.config.display());
            exit::OK
        }
        Err(e) => {
            eprintln!("error: enrollment failed: {e}");
            match e {
                EnrollError::Refused(_) => {
                    eprintln!(
                        "  hint: a token works once, for the device id it was made for, until it expires; ask central ops for a new one"
                    );
                    exit::NO_PERM
                }
                EnrollError::Unreachable(_) => {
                    eprintln!(
                        "  hint: check [uplink].hubs and that the hub's QUIC port is reachable from this box"
                    );
                    exit::FAILED
                }
                EnrollError::Pki(_) | EnrollError::Tls(_) => exit::OS_ERR,
            }
        }
    }
}
