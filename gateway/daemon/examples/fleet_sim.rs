//! The fleet simulator: N edges in one process, each with its own key and
//! certificate (issued by the CA once, kept in `--dir`), its own QUIC
//! connection to every hub, and the real edge's code on it: the tunnel's
//! dialing and backoff (`tunnel::dial::keep_tunnel`), the control session
//! (`fleet::edge::session`: heartbeats with the status a box reports, audit
//! shipping from an in-memory chain, config offers, certificate renewal) and
//! the applier of pushed configs (`fleet::pushed_config::Applier`, try mode
//! included). A share of the boxes (`--channel-share`) also has a channel,
//! `readings`, on the real durable buffer (a SQLite file in its directory)
//! and channel sync, with a producer adding a record every
//! `--channel-every`; a share (`--renew-share`) starts on a certificate
//! with `--renew-left` of its life left and two thirds of it past, so it
//! renews over its control session as soon as it is connected (a fleet
//! enrolled together renews together). Only the relays are missing: a simulated box
//! publishes nothing.
//!
//! ```text
//! cargo run --release --example fleet_sim -- --ca-dir CA --dir DIR \
//!     --hub 127.0.0.1:4433 --hub 127.0.0.1:4434 --edges 1000
//! ```
//!
//! Every `--every` it prints one JSON line to stdout: the time, how many
//! edges have a tunnel up to each hub and to all hubs, the applied config
//! versions seen, the watched edge's tunnels (`--watch ID`), the channel
//! records made and waiting in the buffers (counted every 5 s), and how many
//! boxes renewed their certificate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gateway_core::units::HostPort;
use gateway_core::wire::Frame;
use gateway_daemon::channel::buffer::BufferHandle;
use gateway_daemon::channel::edge_sync;
use gateway_daemon::fleet::edge::{self, EdgeFleet, Request};
use gateway_daemon::fleet::pushed_config::Applier;
use gateway_daemon::node::Ctx;
use gateway_daemon::node::audit::AuditSink;
use gateway_daemon::tunnel::accept::{BiStream, Control};
use gateway_daemon::tunnel::dial::{self, Handler, TunnelSpec};
use gateway_daemon::tunnel::hubs::Hubs;
use gateway_daemon::tunnel::{endpoint, frame, pki, tls};
use gateway_store::buffer::{NewRecord, WhenFull};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
struct Args {
    ca_dir: PathBuf,
    dir: PathBuf,
    hubs: Vec<String>,
    edges: usize,
    prefix: String,
    heartbeat: String,
    every: Duration,
    watch: Option<String>,
    endpoints: usize,
    start_rate: usize,
    channel_share: f64,
    channel_every: Duration,
    renew_share: f64,
    renew_left: Duration,
}

/// Whether box `n` is among `share` of them, spread evenly.
fn among(n: usize, share: f64) -> bool {
    let s = share.clamp(0.0, 1.0);
    ((n + 1) as f64 * s).floor() > (n as f64 * s).floor()
}

fn usage(why: &str) -> ! {
    eprintln!(
        "error: {why}\nusage: fleet_sim --ca-dir DIR --dir DIR --hub HOST:PORT [--hub ...] --edges N [--prefix sim-] [--heartbeat 10s] [--every 1s] [--watch ID] [--endpoints 32] [--start-rate 500] [--channel-share 0.1] [--channel-every 5s] [--renew-share 0.05] [--renew-left 5m]"
    );
    std::process::exit(2)
}

fn args() -> Args {
    let mut a = Args {
        ca_dir: PathBuf::new(),
        dir: PathBuf::new(),
        hubs: Vec::new(),
        edges: 0,
        prefix: "sim-".into(),
        heartbeat: "10s".into(),
        every: Duration::from_secs(1),
        watch: None,
        endpoints: 32,
        start_rate: 500,
        channel_share: 0.1,
        channel_every: Duration::from_secs(5),
        renew_share: 0.05,
        renew_left: Duration::from_secs(300),
    };
    let share = |flag: &str, v: String| -> f64 {
        match v.parse::<f64>() {
            Ok(f) if (0.0..=1.0).contains(&f) => f,
            _ => usage(&format!("{flag}: a share from 0 to 1, such as 0.1")),
        }
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--ca-dir" => a.ca_dir = value().into(),
            "--dir" => a.dir = value().into(),
            "--hub" => a.hubs.push(value()),
            "--edges" => {
                a.edges = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--edges: a number"))
            }
            "--prefix" => a.prefix = value(),
            "--heartbeat" => a.heartbeat = value(),
            "--every" => {
                a.every = gateway_core::units::parse_duration(&value())
                    .unwrap_or_else(|e| usage(&format!("--every: {e}")))
            }
            "--watch" => a.watch = Some(value()),
            "--endpoints" => {
                a.endpoints = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--endpoints: a number"))
            }
            "--start-rate" => {
                a.start_rate = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--start-rate: a number"))
            }
            "--channel-share" => a.channel_share = share("--channel-share", value()),
            "--channel-every" => {
                a.channel_every = gateway_core::units::parse_duration(&value())
                    .unwrap_or_else(|e| usage(&format!("--channel-every: {e}")))
            }
            "--renew-share" => a.renew_share = share("--renew-share", value()),
            "--renew-left" => {
                a.renew_left = gateway_core::units::parse_duration(&value())
                    .unwrap_or_else(|e| usage(&format!("--renew-left: {e}")))
            }
            other => usage(&format!("unknown flag {other}")),
        }
    }
    if a.hubs.is_empty()
        || a.edges == 0
        || a.ca_dir.as_os_str().is_empty()
        || a.dir.as_os_str().is_empty()
    {
        usage("--ca-dir, --dir, --hub and --edges are required");
    }
    a
}

/// A simulated box's config, as a real one would read.
/// Every box declares the channel (so one template fits all); only the
/// `--channel-share` run its buffer, sync and producer.
fn config_text(a: &Args, id: &str, dir: &Path) -> String {
    let hubs: Vec<String> = a.hubs.iter().map(|h| format!("\"{h}\"")).collect();
    let channel = "\n[[channel]]\nname = \"readings\"\nzone = \"lab\"\nformats = [\"json\"]\nmax_bytes = \"16MiB\"\n";
    format!(
        "[node]\nid = \"{id}\"\nrole = \"edge\"\nstate_dir = \"{state}\"\n\n[[zone]]\nname = \"lab\"\nkind = \"legacy\"\nclassified = false\nlevel = 2\nnetworks = [\"10.99.0.0/16\"]\nassessment = {{ id = \"SIM-1\", valid_until = 2099-12-31 }}\n\n[[zone]]\nname = \"extranet\"\nkind = \"extranet\"\nlevel = 2\nnetworks = [\"127.0.0.0/24\"]\n\n[uplink]\nhubs = [{hubs}]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\nheartbeat = \"{hb}\"\nconfig_try = \"60s\"\n{channel}",
        state = dir.display(),
        hubs = hubs.join(", "),
        ca = a.ca_dir.join("ca.pem").display(),
        cert = dir.join(format!("{id}.pem")).display(),
        key = dir.join(format!("{id}.key")).display(),
        hb = a.heartbeat,
    )
}

/// What runs on a simulated box's tunnels: the management session on lane 0;
/// a stream the hub opens is refused (nothing is published here).
struct SimHandler {
    fleet: Arc<EdgeFleet>,
    ctx: Arc<Ctx>,
}

impl Handler for SimHandler {
    fn up(
        &self,
        _lane: usize,
        conn: &quinn::Connection,
        (send, recv): Control,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(edge::session(
            self.fleet.clone(),
            self.ctx.clone(),
            conn.clone(),
            send,
            recv,
        ))
    }

    async fn stream(
        &self,
        _hub: &str,
        _conn: quinn::Connection,
        first: Frame,
        (mut send, _recv): BiStream,
    ) {
        frame::refuse_unexpected(&mut send, &first).await;
    }
}

/// One simulated box.
struct Sim {
    hubs: Arc<Hubs>,
    fleet: Arc<EdgeFleet>,
    /// Its channel's buffer, for a box with one.
    buffer: Option<BufferHandle>,
    /// The certificate's end at start (a renewal moves it).
    started_not_after: Option<i64>,
}

/// Channel records made by the simulated producers.
static MADE: AtomicU64 = AtomicU64::new(0);

/// Starts box `id`: its certificate (made once, or afresh with a short life
/// for a box that is to renew), its tunnels, its applier, its channel.
async fn start(a: &Args, id: &str, pool: &[quinn::Endpoint], n: usize) -> Result<Sim, String> {
    let dir = a.dir.join(id);
    let cert = dir.join(format!("{id}.pem"));
    let renews = among(n, a.renew_share);
    if renews || !cert.exists() {
        let _ = std::fs::remove_file(&cert);
        let _ = std::fs::remove_file(dir.join(format!("{id}.key")));
        let (ca, id2, d2, left) = (a.ca_dir.clone(), id.to_owned(), dir.clone(), a.renew_left);
        tokio::task::spawn_blocking(move || {
            if renews {
                // Two thirds of its life (and the jitter's tenth) past.
                pki::issue_for(&ca, &id2, (left * 3, left), &d2)
            } else {
                pki::issue(&ca, &id2, &[], 30, &d2)
            }
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    }
    let channel = among(n, a.channel_share);
    let text = config_text(a, id, &dir);
    let checked = gateway_core::check::load(&text, gateway_daemon::node::clock::today_local());
    let config = checked.config.ok_or_else(|| {
        format!(
            "{id}: the simulated config does not check: {:?}",
            checked.diagnostics
        )
    })?;
    let gateway_core::config::Role::Edge(e) = &config.role else {
        return Err("not an edge".into());
    };
    let hubs: Vec<HostPort> = e.uplink.hubs.clone();
    let client = tls::client(&e.uplink.ca.path, &e.uplink.cert.path, &e.uplink.key.path)
        .map_err(|e| format!("{id}: {e}"))?;
    let client: tls::ClientHolder = Arc::new(std::sync::RwLock::new(client));
    let ctx = Ctx::new(
        id.to_owned(),
        gateway_core::policy::Policy::new(config.clone()),
        AuditSink::in_memory(id),
    );
    ctx.audit
        .record(id, "node", "node.start", "ok", "", "fleet simulator".into());
    let (req_tx, mut req_rx) = mpsc::channel::<Request>(4);
    let fleet = EdgeFleet::new(&config, client.clone(), (0, text), req_tx).ok_or("not an edge")?;
    let slots = Hubs::new(&hubs, 1);
    let buffer = if channel {
        let b = BufferHandle::start(&dir).map_err(|e| format!("{id}: buffer: {e}"))?;
        tokio::spawn(edge_sync::supervise(ctx.clone(), slots.clone(), b.clone()));
        tokio::spawn(produce(b.clone(), id.to_owned(), a.channel_every));
        Some(b)
    } else {
        None
    };
    for (i, hub) in hubs.iter().enumerate() {
        let spec = TunnelSpec {
            hubs: slots.clone(),
            index: i,
            hub: hub.clone(),
            endpoint: pool[(n * hubs.len() + i) % pool.len()].clone(),
            client: client.clone(),
            lane: 0,
            stop: CancellationToken::new(),
        };
        let handler = Arc::new(SimHandler {
            fleet: fleet.clone(),
            ctx: ctx.clone(),
        });
        tokio::spawn(dial::keep_tunnel(ctx.clone(), spec, handler));
    }
    // The box's main loop, as gatewayd run's: apply offers, confirm or revert.
    let (f, s, state_dir) = (fleet.clone(), slots.clone(), dir.clone());
    tokio::spawn(async move {
        let mut applier = Applier::new(Duration::from_secs(60), None);
        loop {
            if applier.deadline().is_some() && s.any_up() {
                applier.confirm(&f, &state_dir);
            }
            let trial = async {
                match applier.deadline() {
                    Some(at) => tokio::select! {
                        () = tokio::time::sleep_until(at.into()) => true,
                        () = s.came_up() => false,
                    },
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                expired = trial => if expired && !s.any_up() {
                    let c = ctx.clone();
                    let current = ctx.policy().config().clone();
                    applier.revert(&f, &current, |config| { c.set_policy(gateway_core::policy::Policy::new(config)); Ok(()) });
                },
                r = req_rx.recv() => match r {
                    Some(Request::Apply { version, text, reply }) => {
                        let current = ctx.policy().config().clone();
                        let c = ctx.clone();
                        let result = applier.apply(&f, &current, version, &text, |config| {
                            c.set_policy(gateway_core::policy::Policy::new(config));
                            Ok(())
                        });
                        if let Err(result) = reply.send(result) {
                            f.report_later(result);
                        }
                    }
                    Some(Request::Reconnect) => {}
                    None => return,
                },
            }
        }
    });
    let started_not_after = fleet.validity().map(|v| v.1);
    Ok(Sim {
        hubs: slots,
        fleet,
        buffer,
        started_not_after,
    })
}

/// A legacy application writing a reading every `every` (the first at a
/// random point of the interval, so producers do not beat together).
async fn produce(buffer: BufferHandle, id: String, every: Duration) {
    let first = tokio::time::Instant::now() + every.mul_f64(rand::random::<f64>());
    let mut tick = tokio::time::interval_at(first, every);
    let mut n = 0u64;
    loop {
        tick.tick().await;
        n += 1;
        let body = format!("{{\"device\":\"{id}\",\"n\":{n},\"value\":{}}}", n % 97);
        let record = NewRecord {
            format: "json".into(),
            body: body.into_bytes(),
        };
        match buffer
            .append("readings", vec![record], 16 << 20, WhenFull::Reject)
            .await
        {
            Ok(_) => {
                MADE.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => eprintln!("{id}: a reading was refused: {e}"),
        }
    }
}

fn main() {
    let a = args();
    // The edges' own log lines (why a connect failed, a session ended), to
    // stderr, as RUST_LOG says; none unless it is set.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| usage(&format!("runtime: {e}")));
    rt.block_on(run(a));
}

async fn run(a: Args) {
    let pool =
        endpoint::edge_endpoints(a.endpoints).unwrap_or_else(|e| usage(&format!("endpoints: {e}")));
    let t0 = Instant::now();
    let mut sims: Vec<(String, Sim)> = Vec::with_capacity(a.edges);
    // Started at a bounded rate, as boxes powering on over a morning would
    // not all start in one millisecond.
    let pace = Duration::from_secs_f64(1.0 / a.start_rate.max(1) as f64);
    for n in 0..a.edges {
        let id = format!("{}{n:05}", a.prefix);
        match start(&a, &id, &pool, n).await {
            Ok(s) => sims.push((id, s)),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
        tokio::time::sleep(pace).await;
    }
    eprintln!(
        "{} simulated edges started in {:.1} s",
        sims.len(),
        t0.elapsed().as_secs_f64()
    );
    let hubs = a.hubs.len();
    let mut tick = tokio::time::interval(a.every);
    let mut waiting = 0u64;
    let mut counted = Instant::now() - Duration::from_secs(60);
    loop {
        tick.tick().await;
        if counted.elapsed() >= Duration::from_secs(5) {
            counted = Instant::now();
            waiting = 0;
            for (_, s) in &sims {
                if let Some(b) = &s.buffer {
                    waiting += b.backlog("readings").await.map_or(0, |b| b.records);
                }
            }
        }
        let renewed = sims
            .iter()
            .filter(|(_, s)| s.fleet.validity().map(|v| v.1) != s.started_not_after)
            .count();
        let mut per_hub = vec![0usize; hubs];
        let mut all = 0usize;
        let mut versions: BTreeMap<u64, usize> = BTreeMap::new();
        let mut watched = None;
        for (id, s) in &sims {
            let up: Vec<bool> = (0..hubs).map(|i| s.hubs.up(i)).collect();
            for (i, u) in up.iter().enumerate() {
                per_hub[i] += usize::from(*u);
            }
            all += usize::from(up.iter().all(|u| *u));
            *versions.entry(s.fleet.applied().0).or_default() += 1;
            if a.watch.as_deref() == Some(id.as_str()) {
                watched = Some(up.iter().filter(|u| **u).count());
            }
        }
        let unix_ms = gateway_daemon::node::clock::now_ms();
        let line = serde_json::json!({
            "t_ms": unix_ms,
            "edges": sims.len(),
            "up": per_hub,
            "up_all": all,
            "versions": versions,
            "watch_up": watched,
            "records_made": MADE.load(Ordering::Relaxed),
            "records_waiting": waiting,
            "renewed": renewed,
        });
        println!("{line}");
    }
}
