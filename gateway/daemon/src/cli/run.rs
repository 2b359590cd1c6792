//! `gatewayd run --config FILE`: load, check, bind, serve; SIGTERM drains,
//! a second SIGTERM forces, SIGHUP reloads.
//!
//! Exit codes: 0 after a clean drain, 64 invalid config (systemd's
//! `RestartPreventExitStatus=64` stops a restart loop), 66 unreadable config,
//! 77 a private key readable by others, 71 a listener or TLS failure.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::daemon::{self, Bindings, StartError};
use crate::exit;
use crate::node::today_local;
use crate::notify;
use crate::pki::PkiError;
use crate::privilege;
use crate::tls::TlsError;

/// Arguments of `gatewayd run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// Worker threads (default: one per core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// How long relays may finish after SIGTERM before they are cut.
    #[arg(long, default_value = "10s", value_parser = parse_grace)]
    pub grace: Duration,
}

fn parse_grace(s: &str) -> Result<Duration, String> {
    gateway_core::units::parse_duration(s).map_err(|e| format!("{e}; {}", e.hint))
}

/// Sets up logging: `RUST_LOG` or `info`, to stderr (journald keeps it).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Loads and checks a config for running; logs what is wrong.
fn load(path: &Path) -> Result<gateway_core::config::Config, u8> {
    let file = path.display().to_string();
    let checked = match super::check::check_file(path, today_local()) {
        Ok(c) => c,
        Err(e) => {
            error!("Cannot read {file}: {e}");
            return Err(exit::NO_INPUT);
        }
    };
    for d in &checked.diagnostics {
        if d.is_error() {
            error!("{}", d.render(&file));
        } else {
            warn!("{}", d.render(&file));
        }
    }
    checked.config.ok_or(exit::CONFIG)
}

/// Runs the daemon; returns the exit code.
pub fn run(args: &RunArgs) -> u8 {
    init_logging();
    let config = match load(&args.config) {
        Ok(c) => c,
        Err(code) => {
            if code == exit::CONFIG {
                error!(
                    "Configuration refused; nothing started. Run `gatewayd check --config {}` for details",
                    args.config.display()
                );
            }
            return code;
        }
    };
    let mut builder = match args.threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!("Cannot start the runtime: {e}");
            return exit::SOFTWARE;
        }
    };
    rt.block_on(serve(args, config))
}

async fn serve(args: &RunArgs, config: gateway_core::config::Config) -> u8 {
    let (user, state_dir) = (config.node.user.clone(), config.node.state_dir.clone());
    let running = match daemon::start(config, Bindings::default()).await {
        Ok(r) => r,
        Err(e) => {
            error!("Not started: {e}");
            return match e {
                StartError::Tls(TlsError::Key(PkiError::KeyPermissions { .. })) => exit::NO_PERM,
                StartError::Tls(_)
                | StartError::Bind { .. }
                | StartError::StateDir { .. }
                | StartError::Audit(_)
                | StartError::Buffer(_)
                | StartError::Sink(_) => exit::OS_ERR,
            };
        }
    };
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        error!("Cannot install signal handlers");
        return exit::OS_ERR;
    };
    // Listeners are bound: root is no longer needed.
    if privilege::is_root() {
        match &user {
            Some(u) => {
                if let Err(why) = privilege::drop_to(u, &state_dir) {
                    error!("Cannot drop root privileges, stopping: {why}");
                    running.drain(Duration::ZERO).await;
                    return exit::OS_ERR;
                }
                info!(user = %u, "Dropped root privileges");
            }
            None if std::env::var_os("INVOCATION_ID").is_none() => {
                warn!("Running as root: set node.user to drop privileges after binding");
            }
            None => {}
        }
    }
    info!(admin = %running.admin_addr, "Running; SIGTERM drains, SIGHUP reloads");
    let metrics = running.ctx().metrics.clone();
    notify::notify(&format!(
        "READY=1\nSTATUS=running: {}",
        metrics.status_line()
    ));
    // The watchdog is fed from this loop: if it stops turning, systemd restarts us.
    let mut watchdog = notify::watchdog_interval().map(tokio::time::interval);
    loop {
        let ping = async {
            match watchdog.as_mut() {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            () = ping => {
                notify::notify(&format!("WATCHDOG=1\nSTATUS=running: {}", metrics.status_line()));
            }
            _ = hup.recv() => {
                info!(file = %args.config.display(), "SIGHUP: reloading");
                notify::notify("RELOADING=1\nSTATUS=reloading the configuration");
                let refused = match load(&args.config) {
                    Ok(c) => running.reload(c).err().map(|e| e.to_string()),
                    Err(_) => Some("the new configuration has errors (logged above)".to_owned()),
                };
                if let Some(why) = refused {
                    error!("Reload refused, the old configuration stays in force: {why}");
                    let ctx = running.ctx();
                    ctx.audit.record(&ctx.id, "config", "config.reload", "error", "", why);
                }
                notify::notify(&format!("READY=1\nSTATUS=running: {}", metrics.status_line()));
            }
        }
    }
    // A second signal forces the exit.
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        warn!("Second signal: exiting without draining");
        std::process::exit(i32::from(exit::FAILED));
    });
    notify::notify("STOPPING=1\nSTATUS=draining: open relays get the grace period");
    running.drain(args.grace).await;
    tokio::task::spawn_blocking(move || running.flush_audit())
        .await
        .ok();
    info!("Stopped");
    exit::OK
}
