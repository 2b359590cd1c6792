//! `gatewayctl`: the central operator's command line.
//!
//! It talks to a hub's API, which arrives with the fleet-management issue; until
//! then it only prints the commands it will have, and refuses to pretend.

use std::process::ExitCode;

const PLAN: &str = "\
gatewayctl: the central operator's command line (planned; needs the hub API)

planned commands:
  gatewayctl devices list                       every enrolled gateway, with health
  gatewayctl devices show DEVICE                one gateway: status, config version, certificate
  gatewayctl enroll DEVICE --zone ...           issue an enrollment token for a new box
  gatewayctl revoke DEVICE                      revoke a gateway's certificate now
  gatewayctl config push DEVICE FILE            offer a desired configuration (checked first)
  gatewayctl audit export DEVICE --since DATE   collect a gateway's audit chain
  gatewayctl channel read CHANNEL --cursor N    read channel records from the hub's store

available today, on the box itself:
  gatewayd check --config FILE                  check a configuration
  gatewayd audit verify --state-dir DIR         verify the audit chain
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("-h" | "--help" | "help") => {
            print!("{PLAN}");
            ExitCode::SUCCESS
        }
        Some("-V" | "--version") => {
            println!("gatewayctl {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!(
                "gatewayctl: `{other}` is not available yet: gatewayctl needs the hub API, which is not built yet"
            );
            eprint!("{PLAN}");
            ExitCode::from(2)
        }
    }
}
