//! `gateway-updater`: installs a signed firmware bundle into the inactive
//! root slot, resuming where it stopped, and stages its boot entry.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gateway_updater::bundle::{self, BundleSource};
use gateway_updater::esp::SlotName;
use gateway_updater::install::{Device, Event, UpdateError, Updater, Waiting, config_trying};
use gateway_updater::source::ChunkSource;

/// The appliance's firmware updater.
#[derive(Parser)]
#[command(name = "gateway-updater", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(clap::Args)]
struct DeviceArgs {
    /// The updater's state directory (on the state disk).
    #[arg(long, global = true, default_value = "/var/lib/gateway-updater")]
    state_dir: PathBuf,
    /// The EFI system partition's mount point.
    #[arg(long, global = true, default_value = "/efi")]
    esp: PathBuf,
    /// Root slot A's partition (or a file standing in for it).
    #[arg(
        long,
        global = true,
        default_value = "/dev/disk/by-partlabel/gw-root-a"
    )]
    slot_a: PathBuf,
    /// Root slot B's partition.
    #[arg(
        long,
        global = true,
        default_value = "/dev/disk/by-partlabel/gw-root-b"
    )]
    slot_b: PathBuf,
    /// The slot that booted (`a` or `b`); default: `gw.slot=` of /proc/cmdline.
    #[arg(long, global = true)]
    running_slot: Option<String>,
    /// The version that booted; default: `gw.version=` of /proc/cmdline.
    #[arg(long = "running-version", global = true)]
    running_version: Option<String>,
    /// The hardware model; default: `gw.hardware=` of /proc/cmdline.
    #[arg(long, global = true)]
    hardware: Option<String>,
    /// A trusted public key (minisign); give the current and the next.
    #[arg(long = "key", global = true)]
    keys: Vec<PathBuf>,
    /// The running image's security_version, the floor below which nothing
    /// installs; default: /usr/lib/gateway-updater/security_version of the
    /// read-only root (0 when the image has none).
    #[arg(long, global = true)]
    image_security_version: Option<u64>,
    /// gatewayd's state directory (a configuration try there holds updates).
    #[arg(long, global = true, default_value = "/var/lib/gatewayd")]
    gatewayd_state: PathBuf,
    /// gatewayd's handoff (`[update] handoff`): its offers, the hub's
    /// acknowledgements, the mark of a config try.
    #[arg(long, global = true, default_value = "/var/lib/gw-state/handoff")]
    handoff: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Installs BUNDLE into the inactive slot (resuming a cut install) and
    /// stages its boot entry; the box boots it at the next reboot.
    Install {
        /// The bundle directory (manifest.json, its .minisig, chunks/).
        bundle: PathBuf,
        /// Install it even though it rolled back on this box before.
        #[arg(long)]
        retry: bool,
    },
    /// Installs VERSION from the hub, through gatewayd's admin listener
    /// (which fetches each part over its tunnel): as install does, and
    /// across a dropping link, resuming from what is written, until it is
    /// staged or --give-up-after passes.
    Fetch {
        /// The version (as `gatewayctl firmware list` shows it).
        version: String,
        /// gatewayd's admin listener (`[admin] listen`).
        #[arg(long, default_value = "127.0.0.1:9600")]
        admin: std::net::SocketAddr,
        /// Install it even though it rolled back on this box before.
        #[arg(long)]
        retry: bool,
        /// Stop trying after this long (what is written stays for the next try).
        #[arg(long, default_value = "6h", value_parser = trial)]
        give_up_after: std::time::Duration,
    },
    /// One pass over gatewayd's handoff: an acknowledged outcome cleared, an
    /// offered version fetched from the hub (resuming), a staged one
    /// rebooted into inside its window. Run by gateway-updater-follow.service.
    Follow {
        /// gatewayd's admin listener (`[admin] listen`).
        #[arg(long, default_value = "127.0.0.1:9600")]
        admin: std::net::SocketAddr,
        /// Stop fetching after this long (what is written stays for the next pass).
        #[arg(long, default_value = "6h", value_parser = trial)]
        give_up_after: std::time::Duration,
        /// How the box reboots into a staged version.
        #[arg(long, default_value = "systemctl reboot")]
        reboot_command: String,
    },
    /// Checks BUNDLE's signature and whether this box may install it.
    Verify {
        /// The bundle directory.
        bundle: PathBuf,
    },
    /// Reconciles the kept state with what booted and prints it.
    Status,
    /// The hub has the outcome: clears the report.
    Reported,
    /// The health gate of a trial boot: passes once gatewayd's tunnel to a
    /// hub is up, fails when `--trial` passes first (its unit then reboots
    /// the box). Passes at once when this boot is not a trial.
    Gate {
        /// gatewayd's admin listener (`[admin] listen`).
        #[arg(long, default_value = "127.0.0.1:9600")]
        admin: std::net::SocketAddr,
        /// How long the new version has to bring its tunnel up.
        #[arg(long, default_value = "15m", value_parser = trial)]
        trial: std::time::Duration,
    },
}

fn trial(s: &str) -> Result<std::time::Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: a number and s, m or h (15m)"))?;
    match unit {
        "s" => Ok(std::time::Duration::from_secs(n)),
        "m" => Ok(std::time::Duration::from_secs(n * 60)),
        "h" => Ok(std::time::Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: a number and s, m or h (15m)")),
    }
}

fn cmdline(key: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/cmdline").ok()?;
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
}

/// A partition named by a udev link is resolved here, once, to its device
/// node (the slot itself is then opened without following links).
fn resolve(p: &Path) -> PathBuf {
    if p.starts_with("/dev/disk") {
        std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned())
    } else {
        p.to_owned()
    }
}

fn device(a: &DeviceArgs) -> Result<Device, String> {
    let slot = a
        .running_slot
        .clone()
        .or_else(|| cmdline("gw.slot"))
        .ok_or("which slot booted is unknown: pass --running-slot a|b (or boot with gw.slot=)")?;
    let running = match slot.as_str() {
        "a" => SlotName::A,
        "b" => SlotName::B,
        other => return Err(format!("--running-slot {other:?}: a or b")),
    };
    let version = a
        .running_version
        .clone()
        .or_else(|| cmdline("gw.version"))
        .ok_or(
            "the running version is unknown: pass --running-version (or boot with gw.version=)",
        )?;
    let hardware = a
        .hardware
        .clone()
        .or_else(|| cmdline("gw.hardware"))
        .ok_or("the hardware model is unknown: pass --hardware (or boot with gw.hardware=)")?;
    if hardware.is_empty()
        || hardware.len() > 64
        || !hardware
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "hardware model {hardware:?}: at most 64 of a-z, 0-9, - and _ (qemu-x86_64)"
        ));
    }
    let keys = if a.keys.is_empty() {
        default_keys()
    } else {
        a.keys.clone()
    };
    if keys.is_empty() {
        return Err("no trusted key: pass --key FILE (minisign public key)".into());
    }
    let trusted = bundle::read_keys(&keys).map_err(|e| e.to_string())?;
    let image_security_version = match a.image_security_version {
        Some(n) => n,
        None => image_security_version()?,
    };
    Ok(Device {
        state_dir: a.state_dir.clone(),
        esp: a.esp.clone(),
        slots: [resolve(&a.slot_a), resolve(&a.slot_b)],
        running,
        version,
        hardware,
        trusted,
        image_security_version,
    })
}

/// The image's own security version, as `image/build.sh` wrote it.
fn image_security_version() -> Result<u64, String> {
    const FILE: &str = "/usr/lib/gateway-updater/security_version";
    match gateway_updater::files::read_limited(Path::new(FILE), 64) {
        Ok(None) => Ok(0),
        Ok(Some(b)) => String::from_utf8_lossy(&b).trim().parse().map_err(|_| {
            format!("{FILE}: not a number (the image is damaged; pass --image-security-version)")
        }),
        Err(e) => Err(e.to_string()),
    }
}

/// The keys the image trusts: `/usr/lib/gateway-updater/keys/*.pub`.
fn default_keys() -> Vec<PathBuf> {
    let mut keys: Vec<PathBuf> = std::fs::read_dir("/usr/lib/gateway-updater/keys")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pub"))
        .collect();
    keys.sort();
    keys
}

fn run(cli: Cli) -> Result<(), String> {
    let device = device(&cli.device)?;
    let gatewayd_state = cli.device.gatewayd_state.clone();
    let handoff = cli.device.handoff.clone();
    let mut updater = Updater::open_waiting(device, std::time::Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    // A rollback found at this start: its failed boot's journal goes with
    // the report.
    if let gateway_core::firmware::update::State::Report {
        outcome: gateway_core::firmware::update::Outcome::RolledBack { .. },
    } = &updater.kept().state
        && updater.kept().journal.is_empty()
    {
        updater
            .keep_journal(gateway_updater::journal::failed_boot(
                gateway_updater::journal::DIR,
                &gateway_updater::boot_id(),
            ))
            .map_err(|e| e.to_string())?;
    }
    match cli.command {
        Command::Status => {
            let text = serde_json::to_string_pretty(updater.kept()).map_err(|e| e.to_string())?;
            println!("{text}");
        }
        Command::Reported => updater.reported().map_err(|e| e.to_string())?,
        Command::Gate { admin, trial } => {
            let gateway_core::firmware::update::State::Trial { target } =
                updater.kept().state.clone()
            else {
                // An entry still counting tries is a trial whatever the
                // state disk says (it was lost or replaced): fail, so the
                // box goes back to the version last marked good.
                if let Some(e) = updater.running_entry().map_err(|e| e.to_string())?
                    && e.left.is_some()
                {
                    return Err(format!(
                        "health gate failed: this boot's entry {} counts tries but the updater has no trial of it on record; rebooting counts this try",
                        e.file_name()
                    ));
                }
                println!("not a trial boot: nothing to gate");
                return Ok(());
            };
            // The wait holds no lock: `status` answers meanwhile.
            drop(updater);
            // The trial gatewayd's [update] trial gave with the offer, for
            // this version (between 1 minute and a day).
            let trial = match gateway_updater::follow::offer(&handoff) {
                Ok(Some(o)) if o.version == target.version => {
                    std::time::Duration::from_secs(o.trial_s.clamp(60, 86_400))
                }
                _ => trial,
            };
            println!(
                "trial of {}: waiting up to {} s for gatewayd's hub tunnel ({admin})",
                target.version,
                trial.as_secs()
            );
            let boot = gateway_updater::boot_id();
            let acked = || {
                gateway_updater::follow::ack(&handoff, &boot)
                    .ok()
                    .flatten()
                    .is_some_and(|a| a.running == target.version)
            };
            match gateway_updater::gate::wait(
                admin,
                trial,
                std::time::Duration::from_secs(5),
                &acked,
            ) {
                Ok(after) => println!(
                    "health gate passed after {} s: {} is kept",
                    after.as_secs(),
                    target.version
                ),
                Err(seen) => {
                    return Err(format!(
                        "health gate failed: no hub acknowledged this version within {} s (last: {seen:?}); rebooting counts this try",
                        trial.as_secs()
                    ));
                }
            }
        }
        Command::Verify { bundle } => {
            let signed = bundle::read_signed(&bundle).map_err(|e| e.to_string())?;
            let m = updater.check(&signed).map_err(|e| e.to_string())?;
            println!(
                "{}: version {} (security_version {}), {} chunks: signature good, this box may install it",
                bundle.display(),
                m.version,
                m.security_version,
                m.chunk_count()
            );
        }
        Command::Install { bundle, retry } => {
            let signed = bundle::read_signed(&bundle).map_err(|e| e.to_string())?;
            let trying = config_trying(&gatewayd_state).map_err(|e| e.to_string())?
                || gateway_updater::follow::config_trying(&handoff).map_err(|e| e.to_string())?;
            let m = updater
                .offer(&signed, trying, retry)
                .map_err(|e| e.to_string())?;
            println!(
                "installing {} into slot {} ({} chunks)",
                m.version,
                updater.inactive().letter(),
                m.chunk_count()
            );
            let mut source = BundleSource::new(&bundle);
            let waiting = fill(&mut updater, &mut source).map_err(|e| e.to_string())?;
            staged(&m.version, &waiting);
        }
        Command::Fetch {
            version,
            admin,
            retry,
            give_up_after,
        } => fetch(
            &mut updater,
            (&gatewayd_state, &handoff),
            (&version, admin),
            retry,
            give_up_after,
        )?,
        Command::Follow {
            admin,
            give_up_after,
            reboot_command,
        } => follow(
            &mut updater,
            &handoff,
            admin,
            give_up_after,
            &reboot_command,
        )?,
    }
    Ok(())
}

/// `follow`, printing what happens.
fn follow(
    updater: &mut Updater,
    handoff: &Path,
    admin: std::net::SocketAddr,
    give_up: std::time::Duration,
    reboot_command: &str,
) -> Result<(), String> {
    use gateway_updater::follow::{Env, Followed};
    let mut last = std::time::Instant::now();
    let mut on = |e: &Event| print_event(e, &mut last);
    let mut reboot = || {
        println!("rebooting into the staged version: {reboot_command}");
        let mut words = reboot_command.split_whitespace();
        let program = words.next().ok_or("--reboot-command is empty")?;
        let status = std::process::Command::new(program)
            .args(words)
            .status()
            .map_err(|e| format!("{reboot_command}: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("{reboot_command}: {status}"))
        }
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let boot = gateway_updater::boot_id();
    let env = Env {
        handoff,
        admin,
        give_up,
        boot_id: &boot,
        minute: gateway_updater::follow::cst_minute(now_ms),
        reboot: &mut reboot,
    };
    let done = gateway_updater::follow::follow(
        updater,
        env,
        (&mut on, &mut |line: String| println!("{line}")),
    )?;
    match done {
        Followed::Nothing => println!("nothing offered to do"),
        Followed::Reported(o) => println!("the hub has the outcome ({o:?}): reported"),
        Followed::Staged(v, w) => {
            println!("{v} is staged: it boots in the window {w} (China Standard Time)")
        }
        Followed::Rebooting(v) => println!("rebooting into {v}"),
        Followed::Refused(v, why) => println!("{v} refused on this box: {why} (the hub is told)"),
        Followed::Busy(why) => println!("not now: {why}"),
        Followed::Withdrawn(v) => {
            println!("{v} withdrawn (its rollout was aborted): its boot entry removed")
        }
    }
    Ok(())
}

/// Writes the offer into the inactive slot from `source`, printing progress.
fn fill(updater: &mut Updater, source: &mut dyn ChunkSource) -> Result<Waiting, UpdateError> {
    let mut last = std::time::Instant::now();
    updater.run(source, &mut |e| print_event(e, &mut last))
}

fn print_event(e: &Event, last: &mut std::time::Instant) {
    match e {
        Event::Chunk { done, total, .. } => {
            if done == total || last.elapsed().as_secs() >= 1 {
                *last = std::time::Instant::now();
                println!("chunks {done}/{total}");
            }
        }
        Event::Cleared => println!("old entries of the inactive slot removed"),
        Event::Rechecked { bad } => println!(
            "read back: {bad} chunks of the slot do not match the manifest; writing them again"
        ),
        Event::Staged(v) => println!("boot entry for {v} written"),
    }
}

fn staged(version: &str, waiting: &Waiting) {
    match waiting {
        Waiting::Reboot => println!(
            "staged {version}: it boots at the next reboot, on trial ({} tries)",
            gateway_core::firmware::boot::TRIES
        ),
        other => println!("now waiting for {other:?}"),
    }
}

/// `fetch`, printing what happens.
fn fetch(
    updater: &mut Updater,
    (gatewayd_state, handoff): (&Path, &Path),
    (version, admin): (&str, std::net::SocketAddr),
    retry: bool,
    give_up: std::time::Duration,
) -> Result<(), String> {
    let mut last = std::time::Instant::now();
    let mut on = |e: &Event| print_event(e, &mut last);
    let trying =
        || Ok(config_trying(gatewayd_state)? || gateway_updater::follow::config_trying(handoff)?);
    let got = gateway_updater::hub::fetch(
        updater,
        &trying,
        (version, admin),
        (retry, give_up),
        (&mut on, &mut |line: String| println!("{line}")),
    )
    .map_err(|e| e.to_string())?;
    println!(
        "{} chunks fetched from the hub ({} tries; the rest were in the slot or copied from the running one)",
        got.fetched, got.tries
    );
    staged(version, &got.waiting);
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway-updater: {e}");
            ExitCode::FAILURE
        }
    }
}
