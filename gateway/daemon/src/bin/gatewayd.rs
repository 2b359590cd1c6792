//! `gatewayd`: the gateway appliance daemon (edge or hub, chosen by its config).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gateway_daemon::cli;

/// jemalloc, which gives memory freed after a flood back to the kernel (its
/// decay settings are built in: .cargo/config.toml); glibc's malloc kept it.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Gateway appliance daemon: bridges a department's legacy network to the
/// provincial e-government network under the boundary rules of GB/T 22239-2019.
#[derive(Debug, Parser)]
#[command(name = "gatewayd", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// See the whole product work on this machine: a hub and two department
    /// gateways on loopback, a published legacy app, a channel between the
    /// departments, a refused crossing. Runs until Ctrl-C.
    Demo(cli::demo::DemoArgs),
    /// Check a configuration file: every mistake with its line and column, and
    /// a summary of what will be bridged (exit 0 valid, 64 invalid).
    Check(cli::check::CheckArgs),
    /// Run the daemon (edge or hub, as the config says). SIGTERM drains, SIGHUP reloads.
    Run(cli::run::RunArgs),
    /// Enroll this box with a hub: a key made here, a certificate signed by the
    /// hub for a single-use token from central ops.
    Enroll(cli::enroll::EnrollArgs),
    /// Operator accounts of a hub (one role each): the bootstrap for gatewayctl.
    #[command(subcommand)]
    Accounts(cli::accounts::AccountsCommand),
    /// A hub's store: move a single hub's SQLite state into PostgreSQL.
    #[command(subcommand)]
    Hub(cli::hub::HubCommand),
    /// Producers of an ingest with auth = "token": give one a token, take it
    /// away, list them (the tokens file keeps only digests).
    #[command(subcommand)]
    Producer(cli::producer::ProducerCommand),
    /// Create a private CA and issue device and hub certificates (offline).
    #[command(subcommand)]
    Pki(cli::pki::PkiCommand),
    /// Inspect the tamper-evident audit chain.
    #[command(subcommand)]
    Audit(cli::audit::AuditCommand),
    /// Show the data channels of a node from its state directory: backlogs on
    /// an edge, synced streams on a hub.
    Channels(cli::channels::ChannelsArgs),
    /// Print the box's nftables baseline from its config: nothing forwarded,
    /// only the configured listeners open (`| nft -f -` to apply).
    Nftables(cli::nftables::NftablesArgs),
}

fn main() -> ExitCode {
    // State, keys and databases are the daemon user's alone, whatever the
    // umask it was started with (the unit sets UMask=0077 too).
    gateway_daemon::os::private_files();
    let args = Cli::parse();
    let code = match &args.command {
        Command::Demo(a) => cli::demo::run(a),
        Command::Check(a) => cli::check::run(a),
        Command::Run(a) => cli::run::run(a),
        Command::Enroll(a) => cli::enroll::run(a),
        Command::Accounts(a) => cli::accounts::run(a),
        Command::Hub(a) => cli::hub::run(a),
        Command::Pki(a) => cli::pki::run(a),
        Command::Producer(a) => cli::producer::run(a),
        Command::Audit(a) => cli::audit::run(a),
        Command::Channels(a) => cli::channels::run(a),
        Command::Nftables(a) => cli::nftables::run(a),
    };
    ExitCode::from(code)
}
