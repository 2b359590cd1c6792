//! `gatewayd pki init|issue|bundle`: the offline identity path.

use std::path::PathBuf;

use crate::os::exit;
use crate::tunnel::pki;

/// `gatewayd pki ...`
#[derive(Debug, clap::Subcommand)]
pub enum PkiCommand {
    /// Create a private CA: DIR/ca.pem and DIR/ca.key (mode 0600).
    Init {
        /// Where to write the CA.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The CA's common name (default: "gatewayd private CA" and today's
        /// date, so a rotation's new CA is told from the old one).
        #[arg(long)]
        name: Option<String>,
    },
    /// Write a CA bundle for a rotation: the CA certificates given, in that
    /// order (the new one first), each checked to be a CA's; prints each
    /// one's SHA-256 fingerprint, as `gatewayctl devices show` shows a box's.
    Bundle {
        /// The CA certificates (each `pki init` directory's ca.pem).
        #[arg(required = true, value_name = "CA_PEM")]
        certs: Vec<PathBuf>,
        /// The bundle to write (never over an existing file).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Issue a certificate for a device or hub: DIR/ID.pem and DIR/ID.key (0600).
    Issue {
        /// The CA directory (from `pki init`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The node id (node.id in its config); the certificate's first DNS name.
        #[arg(long, value_name = "DEVICE_ID")]
        id: String,
        /// Extra names edges use to reach a hub (DNS names or IP addresses); repeat.
        #[arg(long, value_name = "NAME")]
        san: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Where to write the certificate and key.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// Runs a pki subcommand; returns the exit code.
pub fn run(cmd: &PkiCommand) -> u8 {
    let result = match cmd {
        PkiCommand::Init { out, name } => {
            let name = name.clone().unwrap_or_else(|| {
                format!("gatewayd private CA {}", crate::node::clock::today_local())
            });
            pki::init(out, &name)
        }
        PkiCommand::Bundle { certs, out } => match pki::bundle(certs, out) {
            Ok(fps) => {
                for fp in &fps {
                    println!("{fp}");
                }
                println!("wrote {} ({} CA certificates)", out.display(), fps.len());
                return exit::OK;
            }
            Err(e) => Err(e),
        },
        PkiCommand::Issue {
            ca,
            id,
            san,
            days,
            out,
        } => pki::issue(ca, id, san, *days, out),
    };
    match result {
        Ok(files) => {
            for f in files {
                println!("wrote {}", f.display());
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit::FAILED
        }
    }
}
