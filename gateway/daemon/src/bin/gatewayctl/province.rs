//! `gatewayctl template`, `devices vars` and `rollout`: config templates,
//! devices' variables and rollouts in waves.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use gateway_daemon::fleet::ops_client::OpsClient;
use serde_json::{Value, json};

use super::{Format, REFUSED, USAGE, call, json as parse, read_bounded};

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Store a new version of a config template (`{{ name }}` placeholders;
    /// `{{ device }}` is the device's id). Its change is classified as a
    /// push's: policy sections are the security administrator's, the rest
    /// the system administrator's.
    Push {
        /// The template's name.
        name: String,
        /// The template file.
        file: PathBuf,
    },
    /// The templates, newest version of each.
    List {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Print a template (the newest version, or --version).
    Show {
        /// The template's name.
        name: String,
        /// A version number.
        #[arg(long)]
        version: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Render a template for every device a selector picks, check each
    /// config as gatewayd check does, and offer them in waves.
    Start {
        /// The template.
        #[arg(long)]
        template: String,
        /// Its version (the newest when not given).
        #[arg(long)]
        version: Option<u64>,
        /// Which devices (as devices list --selector; revoked ones never).
        #[arg(long, short = 'l', default_value = "")]
        selector: String,
        /// Cumulative shares or counts of the devices reached by the end of
        /// each wave; the last must be 100%.
        #[arg(long, default_value = "1%,10%,50%,100%")]
        waves: String,
        /// Every wave holds at least this many devices.
        #[arg(long, default_value_t = 1)]
        min_wave: usize,
        /// Failures (refused, reverted, silent) allowed before the rollout
        /// pauses by itself: a share (2%) or a count (3).
        #[arg(long, default_value = "0")]
        max_failures: String,
        /// How long each wave is watched before the next starts; a device not
        /// heard from running its version by then (at least 1 minute) is silent.
        #[arg(long, default_value = "1m")]
        soak: String,
        /// Render and check only; start nothing.
        #[arg(long)]
        dry_run: bool,
        /// The configs change keys a running box cannot reload (such as
        /// `admin.listen`): each box applies its version by restarting itself.
        #[arg(long)]
        restart: bool,
    },
    /// The rollouts, newest first.
    List {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// A rollout's waves, each device's status, and why it paused.
    Status {
        /// The rollout id.
        id: String,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// Wait until it is no longer running or rolling back (paused, done,
        /// aborted, rolled back), printing each change.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long (exit 1).
        #[arg(long, default_value = "1h")]
        timeout: String,
    },
    /// Start no new wave (the one offered goes on).
    Pause {
        /// The rollout id.
        id: String,
    },
    /// Go on after a pause; failures so far are not counted again.
    Resume {
        /// The rollout id.
        id: String,
    },
    /// Stop for good; devices keep what they have.
    Abort {
        /// The rollout id.
        id: String,
    },
    /// Offer every device the rollout pushed to its previous version.
    Rollback {
        /// The rollout id.
        id: String,
    },
}

/// The largest template or variables file read.
const MAX_FILE: u64 = 1 << 20;

pub async fn template(client: &OpsClient, command: TemplateCommand) -> Result<(), u8> {
    match command {
        TemplateCommand::Push { name, file } => {
            let text = read_bounded(&file, MAX_FILE).map_err(|e| {
                eprintln!("error: {}: {e}", file.display());
                USAGE
            })?;
            let (_, b) = call(
                client,
                "POST",
                &format!("/v1/templates/{name}"),
                Some(("application/toml", text.as_bytes())),
            )
            .await?;
            let v = parse(&b);
            let vars: Vec<&str> = v["variables"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            println!(
                "template {name} version {} stored (variables: {})",
                v["version"],
                if vars.is_empty() {
                    "none".to_owned()
                } else {
                    vars.join(", ")
                }
            );
        }
        TemplateCommand::List { format } => {
            let (_, b) = call(client, "GET", "/v1/templates", None).await?;
            let v = parse(&b);
            match format {
                Format::Json => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
                }
                Format::Text => {
                    println!(
                        "{:<24} {:>7}  {:<12} variables",
                        "template", "version", "by"
                    );
                    for t in v.as_array().into_iter().flatten() {
                        let vars: Vec<&str> = t["variables"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                            .collect();
                        println!(
                            "{:<24} {:>7}  {:<12} {}",
                            t["name"].as_str().unwrap_or(""),
                            t["version"],
                            t["by"].as_str().unwrap_or(""),
                            vars.join(",")
                        );
                    }
                }
            }
        }
        TemplateCommand::Show { name, version } => {
            let path = match version {
                Some(v) => format!("/v1/templates/{name}?version={v}"),
                None => format!("/v1/templates/{name}"),
            };
            let (_, b) = call(client, "GET", &path, None).await?;
            print!("{}", String::from_utf8_lossy(&b));
        }
    }
    Ok(())
}

/// `devices vars ID [FILE|NAME=VALUE|NAME-]...`: a FILE (TOML, `name = "value"`
/// lines) replaces every variable; NAME=VALUE sets one, NAME- removes one;
/// nothing prints them.
pub async fn vars(
    client: &OpsClient,
    device: &str,
    items: &[String],
    replace: bool,
) -> Result<(), u8> {
    let path = format!("/v1/devices/{device}/vars");
    let b = if items.is_empty() && !replace {
        call(client, "GET", &path, None).await?.1
    } else {
        let mut set = serde_json::Map::new();
        let mut remove = Vec::new();
        let mut replace = replace;
        for item in items {
            if let Some((k, v)) = item.split_once('=') {
                set.insert(k.to_owned(), json!(v));
            } else if let Some(k) = item.strip_suffix('-') {
                remove.push(k.to_owned());
            } else {
                let file = PathBuf::from(item);
                let text = read_bounded(&file, MAX_FILE).map_err(|e| {
                    eprintln!(
                        "error: {item}: {e} (give a file of name = \"value\" lines, NAME=VALUE or NAME-)"
                    );
                    USAGE
                })?;
                let file_vars = gateway_core::template::parse_vars_file(&text).map_err(|e| {
                    eprintln!("error: {item}: {e}");
                    USAGE
                })?;
                for (k, v) in file_vars {
                    set.insert(k, json!(v));
                }
                replace = true;
            }
        }
        let body = json!({ "set": set, "remove": remove, "replace": replace }).to_string();
        call(
            client,
            "POST",
            &path,
            Some(("application/json", body.as_bytes())),
        )
        .await?
        .1
    };
    let v = parse(&b);
    let vars: Vec<String> = v["vars"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k} = {}", json!(v.as_str().unwrap_or_default())))
        .collect();
    if vars.is_empty() {
        println!("# {device}: no variables");
    } else {
        println!("# {device}\n{}", vars.join("\n"));
    }
    Ok(())
}

/// Starts a rollout (`POST /v1/rollouts` with `body`) and says what it is,
/// as `what` words it from the hub's answer and the waves' sizes.
pub async fn start(
    client: &OpsClient,
    body: &str,
    dry_run: bool,
    what: impl FnOnce(&Value, &[String]) -> String,
) -> Result<(), u8> {
    let (_, b) = call(
        client,
        "POST",
        "/v1/rollouts",
        Some(("application/json", body.as_bytes())),
    )
    .await?;
    let v = parse(&b);
    let sizes: Vec<String> = v["waves"]
        .as_array()
        .into_iter()
        .flatten()
        .map(Value::to_string)
        .collect();
    let what = what(&v, &sizes);
    if dry_run {
        println!("checked, nothing started: {what}");
    } else {
        println!("{}", v["id"].as_str().unwrap_or(""));
        eprintln!("rollout started: {what}; gatewayctl rollout status ID shows its waves");
    }
    Ok(())
}

pub async fn rollout(client: &OpsClient, command: RolloutCommand) -> Result<(), u8> {
    match command {
        RolloutCommand::Start {
            template,
            version,
            selector,
            waves,
            min_wave,
            max_failures,
            soak,
            dry_run,
            restart,
        } => {
            let body = json!({
                "template": template, "version": version, "selector": selector,
                "waves": waves, "min_wave": min_wave, "max_failures": max_failures,
                "soak": soak, "dry_run": dry_run, "restart": restart,
            })
            .to_string();
            start(client, &body, dry_run, |v, sizes| {
                format!(
                    "template {} v{} for {} device(s) in {} wave(s) of {} (changes: {} policy, {} other, {} unchanged; {} failure(s) allowed)",
                    v["template"].as_str().unwrap_or(""),
                    v["template_version"],
                    v["devices"],
                    sizes.len(),
                    sizes.join(", "),
                    v["changes"]["policy"],
                    v["changes"]["other"],
                    v["changes"]["unchanged"],
                    v["max_failures"],
                )
            })
            .await?;
        }
        RolloutCommand::List { format } => {
            let (_, b) = call(client, "GET", "/v1/rollouts", None).await?;
            let v = parse(&b);
            match format {
                Format::Json => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
                }
                Format::Text => {
                    println!(
                        "{:<26} {:<13} {:<20} {:>7} {:>5}  by",
                        "rollout", "state", "template", "devices", "wave"
                    );
                    for r in v.as_array().into_iter().flatten() {
                        println!(
                            "{:<26} {:<13} {:<20} {:>7} {:>5}  {}",
                            r["id"].as_str().unwrap_or(""),
                            r["state"].as_str().unwrap_or(""),
                            what_rolled(r),
                            r["devices"],
                            format!("{}/{}", r["wave"], r["waves"]),
                            r["by"].as_str().unwrap_or(""),
                        );
                    }
                }
            }
        }
        RolloutCommand::Status {
            id,
            format,
            wait,
            timeout,
        } => {
            let limit = gateway_core::units::parse_duration(&timeout).map_err(|e| {
                eprintln!("error: --timeout: {e}; {}", e.hint);
                USAGE
            })?;
            let until = tokio::time::Instant::now() + limit;
            let mut last = String::new();
            loop {
                let (_, b) = call(client, "GET", &format!("/v1/rollouts/{id}"), None).await?;
                let v = parse(&b);
                let settled = !matches!(v["state"].as_str(), Some("running" | "rolling-back"));
                if !wait || settled {
                    match format {
                        Format::Json => {
                            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
                        }
                        Format::Text => print!("{}", status_text(&v)),
                    }
                    return Ok(());
                }
                let line = progress_line(&v);
                if line != last {
                    eprintln!("{line}");
                    last = line;
                }
                if tokio::time::Instant::now() >= until {
                    eprintln!(
                        "error: rollout {id} is still {} after {timeout}",
                        v["state"].as_str().unwrap_or("?")
                    );
                    return Err(REFUSED);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        RolloutCommand::Pause { id } => verb(client, &id, "pause").await?,
        RolloutCommand::Resume { id } => verb(client, &id, "resume").await?,
        RolloutCommand::Abort { id } => verb(client, &id, "abort").await?,
        RolloutCommand::Rollback { id } => verb(client, &id, "rollback").await?,
    }
    Ok(())
}

async fn verb(client: &OpsClient, id: &str, verb: &str) -> Result<(), u8> {
    let (_, b) = call(client, "POST", &format!("/v1/rollouts/{id}/{verb}"), None).await?;
    let v = parse(&b);
    println!("{id}: {}", v["state"].as_str().unwrap_or("?"));
    Ok(())
}

/// `running, wave 2/4: applied 10, pending 3`: one line of progress.
fn progress_line(v: &Value) -> String {
    let waves = v["waves"].as_array().cloned().unwrap_or_default();
    let k = v["wave"].as_u64().unwrap_or(0) as usize;
    let counts = k
        .checked_sub(1)
        .and_then(|i| waves.get(i))
        .map(|w| counts_text(&w["counts"]))
        .unwrap_or_default();
    format!(
        "{} {}, wave {k}/{}: {counts}",
        v["id"].as_str().unwrap_or(""),
        v["state"].as_str().unwrap_or(""),
        waves.len()
    )
}

fn counts_text(c: &Value) -> String {
    c.as_object()
        .into_iter()
        .flatten()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A rollout's status for a reader: its state and why, then each wave with
/// its counts and the devices that did not apply, with the cause.
/// `template t v3` or `firmware 2.0`: what a rollout rolls out.
fn what_rolled(v: &Value) -> String {
    match v["firmware"].as_str() {
        Some(f) => format!("firmware {f}"),
        None => format!(
            "template {} v{}",
            v["template"].as_str().unwrap_or(""),
            v["template_version"]
        ),
    }
}

fn status_text(v: &Value) -> String {
    let mut out = format!(
        "rollout {}: {}{}\n",
        v["id"].as_str().unwrap_or(""),
        v["state"].as_str().unwrap_or(""),
        v["reason"]
            .as_str()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    let trial = v["trial_ms"]
        .as_u64()
        .map(|t| format!(", trial {} s", t / 1000))
        .unwrap_or_default();
    out += &format!(
        "{}{trial}, selector {:?}, {} device(s), waves {}, max failures {} ({} allowed, {} so far), soak {} s, by {}\n",
        what_rolled(v),
        v["selector"].as_str().unwrap_or(""),
        v["devices"],
        v["waves_spec"].as_str().unwrap_or(""),
        v["max_failures"].as_str().unwrap_or(""),
        v["max_failures_allowed"],
        v["failures"],
        v["soak_ms"].as_u64().unwrap_or(0) / 1000,
        v["by"].as_str().unwrap_or(""),
    );
    let waves = v["waves"].as_array().cloned().unwrap_or_default();
    for w in &waves {
        out += &format!(
            "wave {}/{} ({} device(s)): {}\n",
            w["wave"],
            waves.len(),
            w["size"],
            counts_text(&w["counts"])
        );
        for status in ["failed", "reverted", "silent", "pending"] {
            let devices = w["devices"][status].as_array().cloned().unwrap_or_default();
            for d in devices.iter().take(20) {
                out += &format!(
                    "  {status}: {}{}\n",
                    d["device"].as_str().unwrap_or(""),
                    d["detail"]
                        .as_str()
                        .map(|x| format!(" ({x})"))
                        .unwrap_or_default()
                );
            }
            if devices.len() > 20 {
                out += &format!(
                    "  {status}: and {} more (--format json lists all)\n",
                    devices.len() - 20
                );
            }
        }
    }
    out
}
