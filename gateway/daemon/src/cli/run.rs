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

use crate::fleet::edge as managed;
use crate::fleet::pushed_config;
use crate::node::clock::today_local;
use crate::os::exit;
use crate::os::notify;
use crate::os::privilege;
use crate::role::{self, Bindings, StartError};
use crate::tunnel::pki::PkiError;
use crate::tunnel::tls::TlsError;

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
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(crate::fleet::logring::RingLayer)
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
    // Scan detection's NFLOG socket needs CAP_NET_ADMIN: bound here, on the
    // only thread there is, and the capability given up before any other
    // thread exists (capabilities are per thread).
    let nflog = config.detect.enabled.then(crate::detect::nflog::open);
    privilege::drop_net_admin();
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
    rt.block_on(serve(args, config, nflog))
}

/// The config to run: the centrally managed one in the state directory when
/// there is one that checks and belongs to this box, else the local file.
/// Returns it with (managed version, text) and whether a try window was open.
fn choose_config(
    path: &Path,
    local: gateway_core::config::Config,
) -> (gateway_core::config::Config, (u64, String), bool) {
    let local_text = std::fs::read_to_string(path).unwrap_or_default();
    let Some((version, text, trying)) = pushed_config::load_managed(&local.node.state_dir) else {
        return (local, (0, local_text), false);
    };
    match pushed_config::check_text(&text, "managed config") {
        Ok(c) if c.node.id == local.node.id && c.node.state_dir == local.node.state_dir => {
            info!(
                version,
                dir = %local.node.state_dir.join("managed").display(),
                "Running the centrally managed config; the --config file is the bootstrap"
            );
            (c, (version, text), trying)
        }
        Ok(_) => {
            warn!(
                "The managed config belongs to another node id or state_dir; running the local file"
            );
            (local, (0, local_text), false)
        }
        Err(errors) => {
            for e in errors {
                error!("{e}");
            }
            warn!("The managed config does not check; running the local file");
            (local, (0, local_text), false)
        }
    }
}

async fn serve(
    args: &RunArgs,
    config: gateway_core::config::Config,
    nflog: Option<Result<std::os::fd::OwnedFd, String>>,
) -> u8 {
    let (config, source, trying) = choose_config(&args.config, config);
    let try_window = match &config.role {
        gateway_core::config::Role::Edge(e) => e.uplink.config_try,
        gateway_core::config::Role::Hub(_) => Duration::from_secs(60),
    };
    let mut applier = pushed_config::Applier::new(try_window, trying.then_some(source.0));
    let (user, state_dir) = (config.node.user.clone(), config.node.state_dir.clone());
    let role = config.role.clone();
    let bindings = Bindings {
        config_source: Some(source),
        nflog,
        ..Bindings::default()
    };
    let running = match role::start(config, bindings).await {
        Ok(r) => r,
        Err(e) => {
            error!("Not started: {e}");
            // A pushed version on trial that cannot start is not kept: the
            // last good one runs at the next start.
            if trying && pushed_config::revert_on_disk(&state_dir, &e.to_string()) {
                return exit::RESTART;
            }
            if let (StartError::Tls(_), gateway_core::config::Role::Edge(e)) = (&e, &role) {
                if !e.uplink.cert.path.exists() || !e.uplink.key.path.exists() {
                    error!(
                        "This box has no device certificate yet: run `gatewayd enroll --config {} --token-file FILE` with a token from central ops (or install one made by `gatewayd pki issue`)",
                        args.config.display()
                    );
                }
            }
            return match e {
                StartError::Tls(TlsError::Key(PkiError::KeyPermissions { .. })) => exit::NO_PERM,
                // Not enrolled yet, or a certificate or CA file not installed.
                StartError::Tls(TlsError::Read { path, .. }) if !Path::new(&path).exists() => {
                    exit::NO_INPUT
                }
                StartError::Store(gateway_store::postgres::OpenError::Store(e))
                    if e.retry_later() =>
                {
                    exit::UNAVAILABLE
                }
                StartError::Store(_) => exit::CONFIG,
                StartError::Tls(_)
                | StartError::Bind { .. }
                | StartError::StateDir { .. }
                | StartError::Audit(_)
                | StartError::Buffer(_)
                | StartError::Sink(_)
                | StartError::Registry(_)
                | StartError::Fleet(_)
                | StartError::Alarms(_) => exit::OS_ERR,
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
    let mut requests = running.take_fleet_requests();
    let fleet = running.edge_fleet();
    if let (Some(f), Some(m)) = (&fleet, pushed_config::saved_report(&state_dir)) {
        // From before the restart (a revert, a restart to apply a push).
        f.report_later(m);
    }
    let mut code = exit::OK;
    loop {
        if let Some(what) = applier.restart() {
            info!(needs = what, "Restarting to run the stored config version");
            code = exit::RESTART;
            break;
        }
        // A pushed config is on trial until a hub is reachable with it.
        if applier.deadline().is_some() && running.hub_reachable() {
            if let Some(f) = &fleet {
                applier.confirm(f, &state_dir);
            }
        }
        let trial = async {
            match applier.deadline() {
                Some(at) => tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => true,
                    () = running.hub_came_up() => false,
                },
                None => std::future::pending().await,
            }
        };
        let request = async {
            match requests.as_mut() {
                Some(r) => r.recv().await,
                None => std::future::pending().await,
            }
        };
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
            expired = trial => {
                if expired && !running.hub_reachable() {
                    if let Some(f) = &fleet {
                        let current = running.ctx().policy().config().clone();
                        applier.revert(f, &current, |c| running.reload(c).map_err(|e| e.to_string()));
                        running.ctx().metrics.config_version(f.applied().0);
                    }
                }
            }
            Some(req) = request => match (req, &fleet) {
                (managed::Request::Apply { version, text, reply }, Some(f)) => {
                    let current = running.ctx().policy().config().clone();
                    let result = applier.apply(f, &current, version, &text, |c| {
                        running.reload(c).map_err(|e| e.to_string())
                    });
                    running.ctx().metrics.config_version(f.applied().0);
                    let (outcome, detail) = match &result {
                        gateway_core::fleet::Message::ConfigResult { outcome: gateway_core::fleet::ConfigOutcome::Applied, .. } => ("ok", format!("applied version {version}")),
                        _ => ("error", format!("refused version {version}")),
                    };
                    let ctx = running.ctx();
                    ctx.audit.record("hub", "config", "config.push", outcome, "", detail);
                    // An [uplink] change closed the session that asked: the
                    // result goes out on the next connection.
                    if let Err(result) = reply.send(result) {
                        f.report_later(result);
                    }
                }
                (managed::Request::Reconnect, _) => {
                    info!("Reconnecting every hub tunnel (remote command)");
                    running.reconnect();
                }
                (managed::Request::Apply { .. }, None) => {}
            },
            _ = hup.recv() => {
                let managed_version = fleet.as_ref().map_or(0, |f| f.applied().0);
                notify::notify("RELOADING=1\nSTATUS=reloading the configuration");
                let refused = if managed_version > 0 {
                    warn!(version = managed_version, "SIGHUP: this box runs a centrally managed config; reloading it (remove STATE_DIR/managed to go back to the local file)");
                    let text = fleet.as_ref().map(|f| f.applied().1).unwrap_or_default();
                    match pushed_config::check_text(&text, "managed config") {
                        Ok(c) => running.reload(c).err().map(|e| e.to_string()),
                        Err(e) => Some(e.join("; ")),
                    }
                } else {
                    info!(file = %args.config.display(), "SIGHUP: reloading");
                    match load(&args.config) {
                        Ok(c) => {
                            let refused = running.reload(c).err().map(|e| e.to_string());
                            if refused.is_none() {
                                if let (Some(f), Ok(text)) = (&fleet, std::fs::read_to_string(&args.config)) {
                                    f.set_applied(0, text);
                                }
                            }
                            refused
                        }
                        Err(_) => Some("the new configuration has errors (logged above)".to_owned()),
                    }
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
    code
}
