//! `gatewayctl`: the central operator's command line. It talks to a hub's
//! operators' API (`[hub].ops`, HTTPS) with an account's credential; `audit
//! verify` works offline.
//!
//! Settings come from flags or the environment, never a credential on the
//! command line: `--hub HOST:PORT` / `GATEWAYCTL_HUB`, `--ca FILE` /
//! `GATEWAYCTL_CA` (the CA that signed the hub), `--credentials FILE` /
//! `GATEWAYCTL_CREDENTIALS` (written by `gatewayd accounts add`).
//!
//! Exit codes: 0 done, 1 the hub refused or failed, 2 usage, 65 an audit export
//! that does not verify, 69 the hub is unreachable, 77 not allowed (role or
//! credential).

mod firmware;
mod province;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gateway_daemon::fleet::ops_client::{ClientError, OpsClient};
use serde_json::Value;

/// The central operator's command line: enroll boxes, push config, watch the
/// fleet, revoke, collect audit. Talks to a hub's operators' API.
#[derive(Debug, Parser)]
#[command(name = "gatewayctl", version, about, long_about = None)]
struct Cli {
    /// The hub's operators' API, HOST:PORT ([hub].ops).
    #[arg(long, env = "GATEWAYCTL_HUB", global = true)]
    hub: Option<String>,
    /// The CA certificate that signed the hub's certificate.
    #[arg(long, env = "GATEWAYCTL_CA", global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The file holding this operator's credential (gatewayd accounts add).
    #[arg(
        long,
        env = "GATEWAYCTL_CREDENTIALS",
        global = true,
        value_name = "FILE"
    )]
    credentials: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Which account and role the credential belongs to.
    Whoami,
    /// Enrollment tokens (system administrator).
    #[command(subcommand)]
    Token(TokenCommand),
    /// The fleet's status from heartbeats.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Revoke a device: its connections are dropped now and it is refused from
    /// then on (security administrator).
    Revoke {
        /// The device id.
        device: String,
    },
    /// Desired-state configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run a command on a device and print its result (system administrator).
    #[command(name = "command")]
    Run {
        /// The device id.
        device: String,
        /// reconnect or diagnostics.
        #[arg(value_parser = ["reconnect", "diagnostics"])]
        kind: String,
    },
    /// Collected audit (audit administrator); `verify` works offline.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Consumers: applications that read departments' records from the hub
    /// with their own certificate.
    #[command(subcommand)]
    Consumer(ConsumerCommand),
    /// Intrusion alarms of the hub and its devices, and bans.
    #[command(subcommand)]
    Alarms(AlarmsCommand),
    /// Config templates: one config with `{{ name }}` placeholders for many
    /// devices, each with its variables (devices vars).
    #[command(subcommand)]
    Template(province::TemplateCommand),
    /// Rollouts of a template in waves, paused by themselves on failures.
    #[command(subcommand)]
    Rollout(province::RolloutCommand),
    /// Firmware bundles in the hub's store, which every hub serves to boxes.
    #[command(subcommand)]
    Firmware(firmware::FirmwareCommand),
}

#[derive(Debug, Subcommand)]
enum AlarmsCommand {
    /// Alarms, newest first (any administrator).
    List {
        /// Only this device's (the hub's id for its own).
        #[arg(long)]
        device: Option<String>,
        /// Only those raised within this long, e.g. 24h.
        #[arg(long)]
        since: Option<String>,
        /// Only those not acknowledged.
        #[arg(long)]
        unacked: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Acknowledge an alarm (security administrator; audited).
    Ack {
        /// The alarm's id, as `alarms list` prints it.
        id: String,
    },
    /// Lift a ban (security administrator; audited).
    Lift {
        /// The banned address.
        address: String,
        /// The device that banned it (default: the hub).
        #[arg(long)]
        device: Option<String>,
    },
    /// The hub's own bans in force.
    Bans {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
}

#[derive(Debug, Subcommand)]
enum ConsumerCommand {
    /// Make a consumer and its certificate (system administrator): sign its
    /// own key's request (--csr), or make key and certificate for it (--out).
    Create {
        /// The consumer's name (lowercase letters, digits, '-', '_').
        name: String,
        /// Its certificate request (PEM); the certificate goes to stdout.
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "out",
            required_unless_present = "out"
        )]
        csr: Option<PathBuf>,
        /// Write NAME.key and NAME.pem (mode 0600) into this directory.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// How long the certificate is valid, days (at most 825).
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Let a consumer read a department's stream (security administrator).
    Grant {
        /// The consumer.
        name: String,
        /// The stream: DEVICE/CHANNEL.
        stream: String,
    },
    /// Withdraw a grant (security administrator).
    RevokeGrant {
        /// The consumer.
        name: String,
        /// The stream: DEVICE/CHANNEL.
        stream: String,
    },
    /// Revoke a consumer: its connections close and its grants go (security
    /// administrator).
    Revoke {
        /// The consumer.
        name: String,
    },
    /// Every consumer with its grants and cursors.
    List {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a single-use enrollment token bound to a device id.
    Create {
        /// The device id the box will have (its config's node.id).
        #[arg(long)]
        device: String,
        /// How long the token may be used.
        #[arg(long, default_value = "24h")]
        expires: String,
        /// Re-enroll a device that is enrolled (security administrator): its
        /// new certificate replaces the old one.
        #[arg(long)]
        replace: bool,
        /// A label the box arrives with, KEY=VALUE (repeat for more).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Write the token to this file (mode 0600; an existing file is
        /// never overwritten) instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

/// How a device listing is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ListFormat {
    Text,
    Json,
    Csv,
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// The devices the hub knows, with their state: all, or those a
    /// selector picks (filtered and paged at the hub).
    List {
        /// Which devices: `city=changchun,ring in (canary,early),!retired`,
        /// `state=offline`, `config=drift`, `cert-expires<72h` (all must hold).
        #[arg(long, short = 'l', default_value = "")]
        selector: String,
        #[arg(long, value_enum, default_value = "text")]
        format: ListFormat,
        /// Devices per request to the hub (1-5000).
        #[arg(long, default_value_t = 500)]
        page_size: usize,
    },
    /// Set labels of a device (KEY=VALUE) or remove them (KEY-) (system
    /// administrator).
    Label {
        /// The device id.
        device: String,
        /// KEY=VALUE to set, KEY- to remove.
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        labels: Vec<String>,
    },
    /// A device's template variables: print them, set NAME=VALUE, remove
    /// NAME-, or replace them all with a FILE of `name = "value"` lines
    /// (system administrator).
    Vars {
        /// The device id.
        device: String,
        /// FILE, NAME=VALUE or NAME-; none prints them.
        #[arg(value_name = "FILE|NAME=VALUE|NAME-")]
        items: Vec<String>,
        /// Remove every variable not set here.
        #[arg(long)]
        replace: bool,
    },
    /// One device in full.
    Show {
        /// The device id.
        device: String,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Store a new config version for a device; the hub checks it first and
    /// offers it to the device, which reports what it did.
    Push {
        /// The device id.
        device: String,
        /// The config file (TOML).
        file: PathBuf,
        /// The change includes keys a running box cannot reload (such as
        /// `admin.listen`): the box applies it by restarting itself, then
        /// tries it as any push.
        #[arg(long)]
        restart: bool,
    },
    /// Print a device's config: the newest pushed version, a given one, or
    /// the one the box runs (as it reported).
    Show {
        /// The device id.
        device: String,
        /// A pushed version number.
        #[arg(long, conflicts_with = "applied")]
        version: Option<u64>,
        /// What the box runs now.
        #[arg(long)]
        applied: bool,
    },
    /// Desired and applied config version of each device.
    Status {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Write a device's collected audit records (JSON lines) with the chain
    /// proof in the first line.
    Export {
        /// The device id.
        #[arg(long)]
        device: String,
        /// From this date on (YYYY-MM-DD, China Standard Time).
        #[arg(long)]
        since: Option<String>,
        /// Write here instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Check an export offline: every record's hash and link up to its head,
    /// and, with --ca (or GATEWAYCTL_CA), the hub's signature over the head.
    Verify {
        /// The export file.
        file: PathBuf,
        /// Without --ca, exit 0 for an export whose hashes and links hold
        /// (otherwise 3: its end and a consistent re-hash were not checked).
        #[arg(long)]
        unsigned_ok: bool,
    },
}

const USAGE: u8 = 2;
/// `audit verify` without the hub's signature: what could be checked holds.
const UNSIGNED: u8 = 3;
const REFUSED: u8 = 1;
const BAD_DATA: u8 = 65;
const UNREACHABLE: u8 = 69;
const NO_PERM: u8 = 77;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Audit(AuditCommand::Verify { file, unsigned_ok }) = &cli.command {
        return ExitCode::from(verify(file, cli.ca.as_deref(), *unsigned_ok));
    }
    let (Some(hub), Some(ca), Some(credentials)) = (&cli.hub, &cli.ca, &cli.credentials) else {
        eprintln!("error: gatewayctl needs the hub, its CA and a credential");
        eprintln!(
            "  hint: set --hub HOST:PORT --ca FILE --credentials FILE, or GATEWAYCTL_HUB, GATEWAYCTL_CA and GATEWAYCTL_CREDENTIALS"
        );
        return ExitCode::from(USAGE);
    };
    let client = match OpsClient::new(hub, ca, credentials) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(USAGE);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(REFUSED);
        }
    };
    ExitCode::from(rt.block_on(run(&client, cli.command)))
}

/// Sends a request; on a refusal prints the hub's message and returns the code.
async fn call(
    client: &OpsClient,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> Result<(u16, Vec<u8>), u8> {
    match client.request(method, path, body).await {
        Ok((status, body)) if status < 300 => Ok((status, body)),
        Ok((status, body)) => {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let message = v["error"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            eprintln!("error: the hub refused ({status}): {message}");
            if let Some(errors) = v["errors"].as_array() {
                for e in errors {
                    eprintln!("  {}", e.as_str().unwrap_or_default());
                }
            }
            Err(if status == 401 || status == 403 {
                NO_PERM
            } else {
                REFUSED
            })
        }
        Err(e @ ClientError::Connect(..)) => {
            eprintln!("error: {e}");
            if e.to_string().contains("certificate") {
                eprintln!(
                    "  hint: --ca must be the CA that signed the hub, and the hub's certificate must name the host in --hub (gatewayd pki issue --san)"
                );
            }
            Err(UNREACHABLE)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(REFUSED)
        }
    }
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

async fn run(client: &OpsClient, command: Command) -> u8 {
    match go(client, command).await {
        Ok(()) => 0,
        Err(code) => code,
    }
}

async fn go(client: &OpsClient, command: Command) -> Result<(), u8> {
    match command {
        Command::Whoami => {
            let (_, b) = call(client, "GET", "/v1/whoami", None).await?;
            let v = json(&b);
            println!(
                "{} ({} administrator)",
                v["account"].as_str().unwrap_or("?"),
                v["role"].as_str().unwrap_or("?")
            );
        }
        Command::Token(TokenCommand::Create {
            device,
            expires,
            replace,
            labels,
            out,
        }) => {
            if let Some(out) = out.as_ref().filter(|o| o.exists()) {
                eprintln!(
                    "error: --out {}: the file exists and is not overwritten: choose another name, or remove it first",
                    out.display()
                );
                return Err(USAGE);
            }
            let d = gateway_core::units::parse_duration(&expires).map_err(|e| {
                eprintln!("error: --expires: {e}; {}", e.hint);
                USAGE
            })?;
            let body =
                serde_json::json!({ "device": device, "expires_s": d.as_secs(), "replace": replace, "labels": labels })
                    .to_string();
            let (_, b) = call(
                client,
                "POST",
                "/v1/tokens",
                Some(("application/json", body.as_bytes())),
            )
            .await?;
            let v = json(&b);
            let token = v["token"].as_str().unwrap_or_default();
            match &out {
                Some(out) => {
                    gateway_daemon::tunnel::pki::write_new(out, &format!("{token}\n"), 0o600)
                        .map_err(|e| {
                            eprintln!(
                                "error: --out {}: {e}; the token was made on the hub but not written: make another (the hub lets one expire unused)",
                                out.display()
                            );
                            NO_PERM
                        })?;
                    eprintln!(
                        "single-use enrollment token for {device}, valid {expires}, written to {} (mode 0600); on the box: gatewayd enroll --config FILE --token-file {}",
                        out.display(),
                        out.display()
                    );
                }
                None => {
                    println!("{token}");
                    eprintln!(
                        "single-use enrollment token for {device}, valid {expires}; on the box: gatewayd enroll --config FILE --token-file FILE (use --out FILE to write it owner-only)"
                    );
                }
            }
        }
        Command::Devices(DevicesCommand::List {
            selector,
            format,
            page_size,
        }) => {
            // Page by page, as the hub filters and pages them.
            let mut all = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let mut path = format!(
                    "/v1/devices?selector={}&limit={page_size}",
                    query_escape(&selector)
                );
                if let Some(a) = &after {
                    path += &format!("&after={}", query_escape(a));
                }
                let (_, b) = call(client, "GET", &path, None).await?;
                let v = json(&b);
                all.extend(v["devices"].as_array().cloned().unwrap_or_default());
                match v["next"].as_str() {
                    Some(n) => after = Some(n.to_owned()),
                    None => break,
                }
            }
            let v = serde_json::Value::Array(all);
            match format {
                ListFormat::Json => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
                }
                ListFormat::Text => print!("{}", devices_table(&v)),
                ListFormat::Csv => print!("{}", devices_csv(&v)),
            }
        }
        Command::Devices(DevicesCommand::Label { device, labels }) => {
            let body = serde_json::json!({ "labels": labels }).to_string();
            let (_, b) = call(
                client,
                "POST",
                &format!("/v1/devices/{device}/labels"),
                Some(("application/json", body.as_bytes())),
            )
            .await?;
            let v = json(&b);
            let now: Vec<String> = v["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect();
            println!(
                "{device}: {}",
                if now.is_empty() {
                    "no labels".to_owned()
                } else {
                    now.join(",")
                }
            );
        }
        Command::Devices(DevicesCommand::Vars {
            device,
            items,
            replace,
        }) => province::vars(client, &device, &items, replace).await?,
        Command::Template(c) => province::template(client, c).await?,
        Command::Rollout(c) => province::rollout(client, c).await?,
        Command::Firmware(c) => firmware::firmware(client, c).await?,
        Command::Devices(DevicesCommand::Show { device, format }) => {
            let (_, b) = call(client, "GET", &format!("/v1/devices/{device}"), None).await?;
            let v = json(&b);
            match format {
                Format::Json => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
                }
                Format::Text => print!("{}", device_text(&v)),
            }
        }
        Command::Revoke { device } => {
            let (_, b) = call(
                client,
                "POST",
                &format!("/v1/devices/{device}/revoke"),
                None,
            )
            .await?;
            let v = json(&b);
            if v["already"].as_bool() == Some(true) {
                println!("{device} was already revoked");
            } else {
                println!(
                    "{device} revoked: its connections are closed and it is refused from now on"
                );
            }
        }
        Command::Config(ConfigCommand::Push {
            device,
            file,
            restart,
        }) => {
            let text = std::fs::read(&file).map_err(|e| {
                eprintln!("error: {}: {e}", file.display());
                USAGE
            })?;
            // The hub locates its errors in this name (a plain one only).
            let name = file
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| {
                    n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
                })
                .map(|n| format!("file={n}"));
            let query = name
                .into_iter()
                .chain(restart.then(|| "restart=true".to_owned()))
                .collect::<Vec<_>>()
                .join("&");
            let query = if query.is_empty() {
                query
            } else {
                format!("?{query}")
            };
            let (_, b) = call(
                client,
                "POST",
                &format!("/v1/devices/{device}/config{query}"),
                Some(("application/toml", &text)),
            )
            .await?;
            let v = json(&b);
            println!(
                "config version {} stored for {device}{}{}",
                v["version"],
                if restart {
                    " (the box restarts itself to apply it)"
                } else {
                    ""
                },
                if v["offered"].as_bool() == Some(true) {
                    "; offered to the device now (see gatewayctl config status)"
                } else {
                    "; the device gets it when it next connects"
                }
            );
        }
        Command::Config(ConfigCommand::Show {
            device,
            version,
            applied,
        }) => {
            let path = match (version, applied) {
                (Some(v), _) => format!("/v1/devices/{device}/config?version={v}"),
                (None, true) => format!("/v1/devices/{device}/config?version=applied"),
                (None, false) => format!("/v1/devices/{device}/config"),
            };
            let (_, b) = call(client, "GET", &path, None).await?;
            use std::io::Write as _;
            let _ = std::io::stdout().write_all(&b);
        }
        Command::Config(ConfigCommand::Status { format }) => {
            let (_, b) = call(client, "GET", "/v1/config", None).await?;
            let v = json(&b);
            match format {
                Format::Json => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
                }
                Format::Text => {
                    println!("{:<20} {:>8} {:>8}  RESULT", "DEVICE", "DESIRED", "APPLIED");
                    for d in v.as_array().into_iter().flatten() {
                        let r = &d["result"];
                        let result = match r["outcome"].as_str() {
                            Some("refused") => format!(
                                "refused v{}: {}",
                                r["offered"],
                                r["errors"]
                                    .as_array()
                                    .map(|e| e
                                        .iter()
                                        .filter_map(Value::as_str)
                                        .collect::<Vec<_>>()
                                        .join("; "))
                                    .unwrap_or_default()
                            ),
                            Some("reverted") => format!(
                                "reverted v{}: {}",
                                r["tried"],
                                r["reason"].as_str().unwrap_or_default()
                            ),
                            Some(o) => o.to_owned(),
                            None => "-".into(),
                        };
                        println!(
                            "{:<20} {:>8} {:>8}  {result}",
                            d["id"].as_str().unwrap_or("?"),
                            opt(&d["desired"]),
                            opt(&d["applied"]),
                        );
                    }
                }
            }
        }
        Command::Consumer(c) => consumer(client, c).await?,
        Command::Alarms(a) => alarms(client, a).await?,
        Command::Run { device, kind } => {
            let (_, b) = call(
                client,
                "POST",
                &format!("/v1/devices/{device}/commands/{kind}"),
                None,
            )
            .await?;
            let v = json(&b);
            println!(
                "{}",
                serde_json::to_string_pretty(&v["output"]).unwrap_or_default()
            );
            if v["ok"].as_bool() != Some(true) {
                return Err(REFUSED);
            }
        }
        Command::Audit(AuditCommand::Export { device, since, out }) => {
            let path = match &since {
                Some(s) => format!("/v1/devices/{device}/audit?since={s}"),
                None => format!("/v1/devices/{device}/audit"),
            };
            let (_, b) = call(client, "GET", &path, None).await?;
            let records = b.iter().filter(|c| **c == b'\n').count().saturating_sub(1);
            match out {
                Some(f) => {
                    std::fs::write(&f, &b).map_err(|e| {
                        eprintln!("error: {}: {e}", f.display());
                        REFUSED
                    })?;
                    eprintln!(
                        "{records} records of {device} written to {}; check with gatewayctl audit verify {}",
                        f.display(),
                        f.display()
                    );
                }
                None => {
                    use std::io::Write as _;
                    let _ = std::io::stdout().write_all(&b);
                }
            }
        }
        Command::Audit(AuditCommand::Verify { .. }) => {}
    }
    Ok(())
}

fn opt(v: &Value) -> String {
    if v.is_null() {
        "-".into()
    } else {
        v.to_string()
    }
}

fn ago(ms: &Value) -> String {
    match ms.as_i64() {
        Some(t) => format!(
            "{}s ago",
            (gateway_daemon::node::clock::now_ms() - t).max(0) / 1000
        ),
        None => "-".into(),
    }
}

fn until(ms: &Value) -> String {
    match ms.as_i64() {
        Some(t) => {
            let s = (t - gateway_daemon::node::clock::now_ms()) / 1000;
            if s < 0 {
                "EXPIRED".into()
            } else if s < 120 {
                format!("in {s}s")
            } else if s < 7200 {
                format!("in {}m", s / 60)
            } else {
                format!("in {}h", s / 3600)
            }
        }
        None => "-".into(),
    }
}

/// Largest certificate request read from a file.
const MAX_CSR_FILE: u64 = 16 * 1024;

async fn consumer(client: &OpsClient, command: ConsumerCommand) -> Result<(), u8> {
    use gateway_daemon::tunnel::pki;
    let post = |path: String, body: Value| async move {
        let body = body.to_string();
        call(
            client,
            "POST",
            &path,
            Some(("application/json", body.as_bytes())),
        )
        .await
        .map(|(_, b)| json(&b))
    };
    match command {
        ConsumerCommand::Create {
            name,
            csr,
            out,
            days,
        } => {
            let (key, csr_pem) = match (&csr, &out) {
                (Some(file), _) => {
                    let text = read_bounded(file, MAX_CSR_FILE).map_err(|e| {
                        eprintln!("error: --csr {}: {e}", file.display());
                        USAGE
                    })?;
                    (None, text)
                }
                (None, Some(_)) => {
                    let (key, csr) = pki::new_consumer_request(&name).map_err(|e| {
                        eprintln!("error: {e}");
                        USAGE
                    })?;
                    (Some(key), csr)
                }
                (None, None) => {
                    eprintln!("error: give --csr FILE or --out DIR");
                    return Err(USAGE);
                }
            };
            // Refuse before asking the hub if the files cannot be written.
            let files = out.as_ref().map(|dir| {
                (
                    dir.join(format!("{name}.key")),
                    dir.join(format!("{name}.pem")),
                )
            });
            if let (Some(dir), Some((k, c))) = (&out, &files) {
                if let Err(e) = private_dir(dir) {
                    eprintln!("error: --out {}: {e}", dir.display());
                    return Err(USAGE);
                }
                for f in [k, c] {
                    if f.exists() {
                        eprintln!(
                            "error: {} exists; remove it or choose another --out",
                            f.display()
                        );
                        return Err(USAGE);
                    }
                }
            }
            let v = post(
                "/v1/consumers".into(),
                serde_json::json!({ "name": name, "csr": csr_pem, "days": days }),
            )
            .await?;
            let cert = v["certificate"].as_str().unwrap_or_default();
            match (key, files) {
                (Some(key), Some((k, c))) => {
                    for (path, text) in [(&k, key.as_str()), (&c, cert)] {
                        pki::write_new(path, text, 0o600).map_err(|e| {
                            eprintln!("error: {e}");
                            REFUSED
                        })?;
                    }
                    println!("{}\n{}", k.display(), c.display());
                }
                _ => print!("{cert}"),
            }
            eprintln!(
                "consumer {name} created (certificate serial {}, valid {days} days); it reads nothing until the security administrator runs: gatewayctl consumer grant {name} DEVICE/CHANNEL",
                v["serial"].as_str().unwrap_or("?")
            );
        }
        ConsumerCommand::Grant { name, stream } => {
            let v = post(
                format!("/v1/consumers/{name}/grants"),
                serde_json::json!({ "stream": stream }),
            )
            .await?;
            if v["already"].as_bool() == Some(true) {
                println!("{name} was already granted {stream}");
            } else {
                println!("{name} may read {stream} from its first record still in the sink");
            }
        }
        ConsumerCommand::RevokeGrant { name, stream } => {
            let v = post(
                format!("/v1/consumers/{name}/grants/revoke"),
                serde_json::json!({ "stream": stream }),
            )
            .await?;
            println!(
                "{name} may no longer read {stream} ({} records every other consumer had left the sink)",
                v["removed"]
            );
        }
        ConsumerCommand::Revoke { name } => {
            let v = post(format!("/v1/consumers/{name}/revoke"), Value::Null).await?;
            if v["already"].as_bool() == Some(true) {
                println!("{name} was already revoked");
            } else {
                println!(
                    "{name} revoked: its connections are closed, its {} grants withdrawn, and its certificate refused from now on",
                    v["grants"]
                );
            }
        }
        ConsumerCommand::List { format } => {
            let (_, b) = call(client, "GET", "/v1/consumers", None).await?;
            let v = json(&b);
            match format {
                Format::Json => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
                }
                Format::Text => {
                    println!(
                        "{:<24} {:<8} {:>12}  GRANTS (cursor)",
                        "CONSUMER", "STATE", "CERT"
                    );
                    for c in v["consumers"].as_array().into_iter().flatten() {
                        let grants: Vec<String> = c["grants"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|g| {
                                format!("{} ({})", g["stream"].as_str().unwrap_or("?"), g["cursor"])
                            })
                            .collect();
                        println!(
                            "{:<24} {:<8} {:>12}  {}",
                            c["name"].as_str().unwrap_or("?"),
                            if c["revoked_ms"].is_null() {
                                "active"
                            } else {
                                "revoked"
                            },
                            until(&c["not_after_ms"]),
                            if grants.is_empty() {
                                "-".into()
                            } else {
                                grants.join(", ")
                            },
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Reads at most `max` bytes of a regular file, not following a link.
fn read_bounded(path: &std::path::Path, max: u64) -> std::io::Result<String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)?;
    let mut text = String::new();
    f.take(max + 1).read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(std::io::Error::other(format!("longer than {max} bytes")));
    }
    Ok(text)
}

/// Creates `dir` (mode 0700) if it does not exist.
fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// A query-string value, percent-encoded but for unreserved characters.
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One line per device: id, state, labels, config applied and desired,
/// certificate expiry, last heartbeat (Unix ms); quoted where needed.
fn devices_csv(v: &Value) -> String {
    let field = |s: String| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s
        }
    };
    let mut o = String::from(
        "id,state,labels,config_applied,config_desired,cert_not_after_ms,last_heartbeat_ms,firmware_running,firmware_standby\n",
    );
    for d in v.as_array().into_iter().flatten() {
        let labels: Vec<String> = d["labels"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect();
        let n = |x: &Value| x.as_i64().map_or(String::new(), |n| n.to_string());
        o += &[
            field(d["id"].as_str().unwrap_or_default().to_owned()),
            field(d["state"].as_str().unwrap_or_default().to_owned()),
            field(labels.join(";")),
            n(&d["config_applied"]),
            n(&d["config_desired"]),
            n(&d["cert_not_after_ms"]),
            n(&d["last_heartbeat_ms"]),
            field(firmware(&d["status"]).0),
            field(firmware(&d["status"]).1),
        ]
        .join(",");
        o.push('\n');
    }
    o
}

/// The CA fingerprints a heartbeat says the box trusts.
fn trusted_cas(status: &Value) -> Vec<&str> {
    status["ca"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// The firmware a heartbeat says runs and stands by (empty off the
/// appliance image), and what the updater is doing.
fn firmware(status: &Value) -> (String, String, String) {
    let f = &status["firmware"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let summary =
        serde_json::from_value::<gateway_core::firmware::report::FirmwareStatus>(f.clone())
            .map(|f| f.summary())
            .unwrap_or_default();
    (text(&f["running"]), text(&f["standby"]), summary)
}

fn devices_table(v: &Value) -> String {
    let mut o = format!(
        "{:<20} {:<10} {:>7} {:>12} {:>12} {:>6} {:>8} {:<17} {:<10} {:<10}  LAST ERROR\n",
        "DEVICE",
        "STATE",
        "CONFIG",
        "CERT",
        "HEARTBEAT",
        "RELAYS",
        "BACKLOG",
        "CA",
        "FIRMWARE",
        "STANDBY"
    );
    for d in v.as_array().into_iter().flatten() {
        let s = &d["status"];
        // Relays and backlogs are of the last heartbeat: shown only while
        // the box is online (HEARTBEAT says how old the rest is).
        let current = d["state"].as_str() == Some("online");
        let backlog: u64 = s["backlogs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b[1].as_u64())
            .sum();
        let config = format!(
            "{}/{}",
            opt(&d["config_applied"]),
            opt(&d["config_desired"])
        );
        // Each trusted CA by the first 8 digits of its fingerprint.
        let ca: Vec<&str> = trusted_cas(s)
            .into_iter()
            .map(|f| f.get(..8).unwrap_or(f))
            .collect();
        let ca = if ca.is_empty() {
            "-".to_owned()
        } else {
            ca.join("+")
        };
        let (running, standby, _) = firmware(s);
        let dash = |s: String| if s.is_empty() { "-".to_owned() } else { s };
        o += &format!(
            "{:<20} {:<10} {:>7} {:>12} {:>12} {:>6} {:>8} {:<17} {:<10} {:<10}  {}\n",
            d["id"].as_str().unwrap_or("?"),
            d["state"].as_str().unwrap_or("?"),
            config,
            until(&d["cert_not_after_ms"]),
            ago(&d["last_heartbeat_ms"]),
            if current {
                opt(&s["relays_open"])
            } else {
                "-".into()
            },
            if current {
                backlog.to_string()
            } else {
                "-".into()
            },
            ca,
            dash(running),
            dash(standby),
            s["last_error"].as_str().unwrap_or("-"),
        );
    }
    o
}

fn device_text(d: &Value) -> String {
    let s = &d["status"];
    let mut o = format!("device        {}\n", d["id"].as_str().unwrap_or("?"));
    o += &format!("state         {}\n", d["state"].as_str().unwrap_or("?"));
    o += &format!("heartbeat     {}\n", ago(&d["last_heartbeat_ms"]));
    o += &format!("version       {}\n", s["version"].as_str().unwrap_or("-"));
    let (_, standby, summary) = firmware(s);
    if !summary.is_empty() {
        o += &format!(
            "firmware      {summary}{}\n",
            if standby.is_empty() {
                String::new()
            } else {
                format!(", {standby} standing by")
            }
        );
    }
    o += &format!("uptime        {}s\n", opt(&s["uptime_s"]));
    o += &format!("certificate   expires {}\n", until(&d["cert_not_after_ms"]));
    // The CAs the box checks hubs against (SHA-256), as it last read them.
    let cas = trusted_cas(s);
    o += &format!(
        "trusts CAs    {}\n",
        if cas.is_empty() {
            "-".to_owned()
        } else {
            cas.join(", ")
        }
    );
    o += &format!(
        "config        applied {} / desired {} ({})\n",
        opt(&d["config_applied"]),
        opt(&d["config_desired"]),
        d["config_result"]["outcome"].as_str().unwrap_or("-")
    );
    for a in s["assessments"].as_array().into_iter().flatten() {
        o += &format!(
            "assessment    {} valid until {}\n",
            a[0].as_str().unwrap_or("?"),
            a[1].as_str().unwrap_or("?")
        );
    }
    o += &format!("relays open   {}\n", opt(&s["relays_open"]));
    for b in s["backlogs"].as_array().into_iter().flatten() {
        o += &format!(
            "backlog       {} {} records\n",
            b[0].as_str().unwrap_or("?"),
            b[1]
        );
    }
    o += &format!(
        "audit         collected to record {}{}\n",
        opt(&d["audit_head"]),
        d["audit_broken"]
            .as_str()
            .map(|b| format!(" -- CHAIN BROKEN: {b}"))
            .unwrap_or_default()
    );
    o += &format!(
        "last error    {}\n",
        s["last_error"].as_str().unwrap_or("-")
    );
    o
}

fn verify(file: &std::path::Path, ca: Option<&std::path::Path>, unsigned_ok: bool) -> u8 {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {}: {e}", file.display());
            return USAGE;
        }
    };
    match gateway_core::fleet::verify_export(&text) {
        Ok(s) => {
            let Some(ca) = ca else {
                println!(
                    "{}: {} records of {} (records {} to {}), every hash and link checked up to the head in the file; \
                     NOT checked without the hub's signature (give --ca FILE or GATEWAYCTL_CA): that no newer records were cut off \
                     the end, and that the file was not re-hashed consistently after an edit",
                    if unsigned_ok {
                        "intact as far as checked"
                    } else {
                        "UNSIGNED"
                    },
                    s.records,
                    s.device,
                    s.first_seq,
                    s.last_seq
                );
                return if unsigned_ok { 0 } else { UNSIGNED };
            };
            let signature = std::fs::read(ca)
                .map_err(|e| format!("{}: {e}", ca.display()))
                .and_then(|pem| {
                    let header =
                        gateway_core::fleet::export_header(&text).map_err(|e| e.to_string())?;
                    gateway_daemon::fleet::verify_export_signature(&header, &pem)
                })
                .map(|hub| format!("signed by hub {hub}, whose certificate chains to the CA"));
            match signature {
                Ok(how) => {
                    println!(
                        "intact: {} records of {} (records {} to {}), every hash and link checked up to the head; {how}",
                        s.records, s.device, s.first_seq, s.last_seq
                    );
                    0
                }
                Err(e) => {
                    println!("BROKEN: {e}");
                    BAD_DATA
                }
            }
        }
        Err(e) => {
            println!("BROKEN: {e}");
            BAD_DATA
        }
    }
}

async fn alarms(client: &OpsClient, command: AlarmsCommand) -> Result<(), u8> {
    match command {
        AlarmsCommand::List {
            device,
            since,
            unacked,
            limit,
            format,
        } => {
            let mut path = format!("/v1/alarms?limit={limit}&unacked={unacked}");
            if let Some(d) = device {
                gateway_core::units::check_name("device", &d).map_err(|e| {
                    eprintln!("error: --device: {}; {}", e.message, e.hint);
                    USAGE
                })?;
                path += &format!("&device={d}");
            }
            if let Some(s) = since {
                let d = gateway_core::units::parse_duration(&s).map_err(|e| {
                    eprintln!("error: --since: {e}; {}", e.hint);
                    USAGE
                })?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |t| t.as_millis());
                let since_ms = now.saturating_sub(d.as_millis());
                path += &format!("&since_ms={since_ms}");
            }
            let (_, b) = call(client, "GET", &path, None).await?;
            let v = json(&b);
            match format {
                Format::Json => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
                }
                Format::Text => print!("{}", alarms_table(&v)),
            }
        }
        AlarmsCommand::Ack { id } => {
            // It goes into the request line: letters, digits, - and _ only.
            if !gateway_core::detect::valid_alarm_id(&id) {
                eprintln!(
                    "error: {id:?} is not an alarm id (as `gatewayctl alarms list` prints it)"
                );
                return Err(USAGE);
            }
            let (_, b) = call(client, "POST", &format!("/v1/alarms/{id}/ack"), None).await?;
            if json(&b)["already"].as_bool() == Some(true) {
                println!("alarm {id} was already acknowledged");
            } else {
                println!("alarm {id} acknowledged");
            }
        }
        AlarmsCommand::Lift { address, device } => {
            let body = serde_json::json!({ "address": address, "device": device }).to_string();
            let (_, b) = call(
                client,
                "POST",
                "/v1/bans/lift",
                Some(("application/json", body.as_bytes())),
            )
            .await?;
            let v = json(&b);
            let on = v["device"].as_str().unwrap_or("?");
            if v["lifted"].as_bool() == Some(true) {
                println!("ban of {address} lifted on {on}");
            } else {
                println!("{address} was not banned on {on}");
            }
        }
        AlarmsCommand::Bans { format } => {
            let (_, b) = call(client, "GET", "/v1/bans", None).await?;
            let v = json(&b);
            match format {
                Format::Json => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
                }
                Format::Text => {
                    let bans = v["bans"].as_array().cloned().unwrap_or_default();
                    if bans.is_empty() {
                        println!("no ban in force on {}", v["node"].as_str().unwrap_or("?"));
                    }
                    for b in bans {
                        println!(
                            "{}  until {}",
                            b["source"].as_str().unwrap_or("?"),
                            b["until"].as_str().unwrap_or("?")
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Alarms as a table: time, device, severity, rule, source, target, action, count, id.
fn alarms_table(v: &Value) -> String {
    let alarms = v["alarms"].as_array().cloned().unwrap_or_default();
    if alarms.is_empty() {
        return "no alarm\n".into();
    }
    let mut out = String::from(
        "TIME                           DEVICE         SEVERITY  RULE                 SOURCE                  TARGET                         ACTION  COUNT  ACK       ID\n",
    );
    for a in alarms {
        let s = |k: &str| a[k].as_str().unwrap_or("-").to_owned();
        let source = format!("{}:{}", s("source"), a["port"].as_u64().unwrap_or(0));
        let action = if s("action") == "ban" { "ban" } else { "alarm" };
        out += &format!(
            "{:<30} {:<14} {:<9} {:<20} {:<23} {:<30} {:<7} {:<6} {:<9} {}\n",
            s("time"),
            s("device"),
            s("severity"),
            s("rule"),
            source,
            s("target"),
            action,
            a["count"].as_u64().unwrap_or(0),
            a["acked_by"].as_str().unwrap_or("-"),
            s("id"),
        );
    }
    out
}
