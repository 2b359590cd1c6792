//! `gatewayd demo`: the whole product on one machine, in one process.
//!
//! In a temporary state directory it creates a private CA, starts a hub and two
//! department edges on loopback (each department's "legacy network" is its own
//! 127.0.N.0/24), a sample legacy HTTP application behind department A, publishes
//! it through the hub, lets department B reach it through an access, sends
//! records from A's channel to B's spool directory, lets a central consumer
//! read A's statistics from the hub with its own certificate, shows a crossing
//! the policy refuses and why, and prints what to try next. Ctrl-C drains everything and
//! removes the directory (unless `--keep`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gateway_core::check;
use gateway_core::config;
use gateway_core::fleet::AdminRole;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::os::exit;
use crate::role::{self, Bindings, Running};

/// `gatewayd demo`
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the state directory (configs, certificates, audit, buffers) at exit.
    #[arg(long)]
    pub keep: bool,
}

/// Runs the demo until Ctrl-C; returns the exit code.
pub fn run(args: &DemoArgs) -> u8 {
    if std::env::var_os("RUST_LOG").is_none() {
        // The story goes to stdout; only problems to stderr.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .with_writer(std::io::stderr)
            .try_init();
    } else {
        super::run::init_logging();
    }
    let dir = std::env::temp_dir().join(format!("gatewayd-demo-{}", std::process::id()));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return exit::SOFTWARE;
        }
    };
    let code = rt.block_on(async {
        match demo(&dir).await {
            Ok(nodes) => {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut term) => {
                        tokio::select! {
                            _ = tokio::signal::ctrl_c() => {}
                            _ = term.recv() => {}
                        }
                    }
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
                println!("\nStopping: draining the hub and both edges...");
                for n in &nodes {
                    n.drain(Duration::from_secs(2)).await;
                }
                for n in nodes {
                    let _ = tokio::task::spawn_blocking(move || n.flush_audit()).await;
                }
                exit::OK
            }
            Err(e) => {
                eprintln!("error: the demo could not start: {e}");
                exit::FAILED
            }
        }
    });
    if args.keep {
        println!("Kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
        println!("Removed {}", dir.display());
    }
    code
}

fn bind(addr: &str) -> Result<std::net::TcpListener, String> {
    let a: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    crate::node::sockets::listen_tcp(a).map_err(|e| format!("cannot listen on {addr}: {e}"))
}

/// Pre-binds a loopback port for a config and remembers the listener.
fn port(b: &mut Bindings, ip: &str) -> Result<SocketAddr, String> {
    let l = bind(&format!("{ip}:0"))?;
    let a = l.local_addr().map_err(|e| e.to_string())?;
    b.tcp.insert(a, l);
    Ok(a)
}

fn load(text: &str, what: &str) -> Result<config::Config, String> {
    let checked = check::load(text, crate::node::clock::today_local());
    checked.config.ok_or_else(|| {
        let errors: Vec<String> = checked
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .map(|d| d.render(what))
            .collect();
        format!(
            "the generated {what} config is invalid:\n{}",
            errors.join("\n")
        )
    })
}

/// One operator account per role in the hub's registry, their credentials in
/// `DIR/ops/ROLE.cred` (what `gatewayd accounts add` does).
fn operators(dir: &Path) -> Result<std::path::PathBuf, String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let hub_state = dir.join("hub-01");
    let out = dir.join("ops");
    std::fs::create_dir_all(&hub_state).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let mut reg =
        gateway_store::sqlite::SqliteRegistry::open(&hub_state).map_err(|e| e.to_string())?;
    for (name, role) in [
        ("system", AdminRole::System),
        ("security", AdminRole::Security),
        ("audit", AdminRole::Audit),
    ] {
        let secret =
            crate::fleet::new_secret(gateway_core::fleet::CREDENTIAL_KIND, format!("demo-{name}"));
        reg.add_account(
            &secret.owner,
            role,
            &secret.digest(),
            crate::node::clock::now_ms(),
        )
        .map_err(|e| e.to_string())?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out.join(format!("{name}.cred")))
            .and_then(|mut f| f.write_all(format!("{}\n", secret.to_text()).as_bytes()))
            .map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Step 6: the system administrator makes consumer `stats-office` (its key
/// made here, only its certificate request sent), the security administrator
/// grants it dept-a's `stats`, dept-a sends a record, and the consumer reads it
/// with its certificate; a stream it was not granted is refused. Returns its
/// certificate and key files.
async fn consumer_reads(
    dir: &Path,
    (ops, api): (SocketAddr, SocketAddr),
    creds: &Path,
    a_ingest: SocketAddr,
) -> Result<(PathBuf, PathBuf), String> {
    use crate::fleet::ops_client::OpsClient;
    let ca = dir.join("ca/ca.pem");
    let out = dir.join("consumers");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let (cert, key) = (out.join("stats-office.pem"), out.join("stats-office.key"));
    let as_role = |role: &str| {
        OpsClient::new(&ops.to_string(), &ca, &creds.join(format!("{role}.cred")))
            .map_err(|e| e.to_string())
    };
    let ask = |client: OpsClient, path: String, body: serde_json::Value| async move {
        let body = body.to_string();
        let (status, answer) = client
            .request("POST", &path, Some(("application/json", body.as_bytes())))
            .await
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
        if status >= 300 {
            return Err(format!("{path}: {status} {v}"));
        }
        Ok(v)
    };
    let (key_pem, csr) =
        crate::tunnel::pki::new_consumer_request("stats-office").map_err(|e| e.to_string())?;
    let made = ask(
        as_role("system")?,
        "/v1/consumers".into(),
        serde_json::json!({ "name": "stats-office", "csr": csr, "days": 30 }),
    )
    .await?;
    crate::tunnel::pki::write_new(&key, &key_pem, 0o600).map_err(|e| e.to_string())?;
    crate::tunnel::pki::write_new(
        &cert,
        made["certificate"].as_str().unwrap_or_default(),
        0o600,
    )
    .map_err(|e| e.to_string())?;
    println!(
        "   the system administrator made consumer stats-office: {} (gatewayctl consumer create stats-office --out DIR)",
        cert.display()
    );
    ask(
        as_role("security")?,
        "/v1/consumers/stats-office/grants".into(),
        serde_json::json!({ "stream": "dept-a/stats" }),
    )
    .await?;
    println!(
        "   the security administrator granted it dept-a/stats (gatewayctl consumer grant stats-office dept-a/stats)"
    );
    let (status, _) = http(
        ("127.0.1.20", a_ingest),
        "POST",
        "/v1/channels/stats/records",
        Some((
            "application/json",
            r#"{"month":"2026-11","pensioners":48210}"#,
        )),
    )
    .await?;
    println!("   dept-a POSTs a record to channel stats -> {status}");
    let reader =
        OpsClient::consumer(&api.to_string(), &ca, &cert, &key).map_err(|e| e.to_string())?;
    let read = poll("the record at the hub", || async {
        let (status, body) = reader
            .request("GET", "/v1/channels/dept-a/stats/records", None)
            .await
            .ok()?;
        let body = String::from_utf8_lossy(&body).into_owned();
        (status == 200 && body.contains("pensioners")).then_some(body)
    })
    .await?;
    println!(
        "   GET https://{api}/v1/channels/dept-a/stats/records with its certificate -> 200\n      {read}"
    );
    let (status, body) = reader
        .request("GET", "/v1/channels/dept-b/inbox/records", None)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "   GET .../dept-b/inbox/records, not granted -> {status}\n      {}",
        String::from_utf8_lossy(&body)
    );
    Ok((cert, key))
}

fn step(n: u32, text: &str) {
    println!("\n{n}. {text}");
}

/// A tiny legacy HTTP application: answers every request with one line.
async fn legacy_app(l: TcpListener) {
    while let Ok((mut s, _)) = l.accept().await {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let body =
                "pension record 42: status=active, monthly=3120.50 CNY (legacy app of dept-a)\n";
            let _ = s
                .write_all(
                    format!(
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
        });
    }
}

/// One HTTP/1.0 exchange; returns the status line and the body.
async fn http(
    (from, addr): (&str, SocketAddr),
    method: &str,
    path: &str,
    body: Option<(&str, &str)>,
) -> Result<(String, String), String> {
    // Clients live on a network: dept-b's legacy clients come from 127.0.2.x.
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    let ip: std::net::IpAddr = from.parse().map_err(|e| format!("{from}: {e}"))?;
    socket
        .bind(SocketAddr::new(ip, 0))
        .map_err(|e| format!("{from}: {e}"))?;
    let mut s = tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
        .await
        .map_err(|_| format!("{addr}: timed out"))?
        .map_err(|e| format!("{addr}: {e}"))?;
    let (ct, data) = body.unwrap_or(("text/plain", ""));
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: demo\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n{data}",
        data.len()
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| format!("{addr}: no answer"))?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.lines().next().unwrap_or("").to_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim_end().to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Asks `probe` every 20 ms, for up to 10 s, until it answers: for state the
/// demo can only ask about (readiness, another node's API, files, the audit).
async fn poll<T, F, Fut>(what: &str, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..500 {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("timed out waiting for {what}"))
}

fn edge_toml(
    dir: &Path,
    id: &str,
    net: u8,
    hub: SocketAddr,
    admin: SocketAddr,
    extra: &str,
) -> String {
    let d = dir.display();
    format!(
        r#"# dept {id}: legacy network 127.0.{net}.0/24, provincial extranet 127.0.0.0/24
[node]
id = "{id}"
role = "edge"
state_dir = "{d}/{id}"

[[zone]]
name = "legacy"
kind = "legacy"
classified = false
level = 2
networks = ["127.0.{net}.0/24"]
assessment = {{ id = "DEMO-{net}", valid_until = 2099-12-31 }}

[[zone]]
name = "extranet"
kind = "extranet"
level = 2
networks = ["127.0.0.0/24"]

[uplink]
hubs = ["{hub}"]
ca = "{d}/ca/ca.pem"
cert = "{d}/certs/{id}.pem"
key = "{d}/certs/{id}.key"

[admin]
listen = "{admin}"
{extra}"#
    )
}

async fn demo(dir: &Path) -> Result<Vec<Running>, String> {
    println!("gatewayd demo: a hub and two department gateways on this machine.");
    println!("State directory: {}", dir.display());

    step(
        1,
        "A private CA and a certificate for the hub and each department gateway",
    );
    let ca = dir.join("ca");
    let certs = dir.join("certs");
    crate::tunnel::pki::init(&ca, "gatewayd demo CA").map_err(|e| e.to_string())?;
    crate::tunnel::pki::issue(&ca, "hub-01", &["127.0.0.1".into()], 30, &certs)
        .map_err(|e| e.to_string())?;
    for id in ["dept-a", "dept-b"] {
        crate::tunnel::pki::issue(&ca, id, &[], 30, &certs).map_err(|e| e.to_string())?;
    }
    println!(
        "   {}  (gatewayd pki init / pki issue do the same)",
        certs.display()
    );

    // Every address on loopback, every port chosen by the kernel.
    let app = TcpListener::from_std({
        let l = bind("127.0.1.10:0")?;
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        l
    })
    .map_err(|e| e.to_string())?;
    let app_addr = app.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(legacy_app(app));

    let mut hb = Bindings::default();
    let udp =
        crate::node::sockets::bind_udp_shared("127.0.0.1:0".parse().map_err(|e| format!("{e}"))?)
            .map_err(|e| e.to_string())?;
    let quic = udp.local_addr().map_err(|e| e.to_string())?;
    hb.udp = Some(udp);
    let (hub_admin, api, publish, ops) = (
        port(&mut hb, "127.0.0.1")?,
        port(&mut hb, "127.0.0.1")?,
        port(&mut hb, "127.0.0.1")?,
        port(&mut hb, "127.0.0.1")?,
    );
    let d = dir.display();
    let hub_text = format!(
        r#"# The hub: meets the departments' gateways on the provincial extranet
[node]
id = "hub-01"
role = "hub"
state_dir = "{d}/hub-01"

[hub]
listen = "{quic}"
api = "{api}"
ops = "{ops}"
ca_cert = "{d}/ca/ca.pem"
ca_key = "{d}/ca/ca.key"
cert = "{d}/certs/hub-01.pem"
key = "{d}/certs/hub-01.key"

[[zone]]
name = "extranet"
kind = "extranet"
level = 2
networks = ["127.0.0.0/24"]

[[publish]]
service = "dept-a/pension"
zone = "extranet"
listen = "{publish}"

[admin]
listen = "{hub_admin}"
"#
    );

    let mut ab = Bindings::default();
    let (a_admin, a_ingest) = (port(&mut ab, "127.0.0.1")?, port(&mut ab, "127.0.1.1")?);
    let a_text = edge_toml(
        dir,
        "dept-a",
        1,
        quic,
        a_admin,
        &format!(
            r#"
[[service]]
name = "pension"
zone = "legacy"
target = "{app_addr}"
allow = ["extranet", "dept-b"]

[[service]]
name = "records-db"
zone = "legacy"
target = "127.0.1.11:5432"
allow = ["extranet"]

[[channel]]
name = "reports"
zone = "legacy"
formats = ["json"]
max_record_bytes = "64KiB"
deliver_to = "dept-b/inbox"

# Monthly statistics for the province: kept at the hub for its consumers.
[[channel]]
name = "stats"
zone = "legacy"
formats = ["json"]
max_record_bytes = "64KiB"

[[ingest]]
zone = "legacy"
listen = "{a_ingest}"
"#
        ),
    );
    let mut bb = Bindings::default();
    let (b_admin, b_pension, b_db) = (
        port(&mut bb, "127.0.0.1")?,
        port(&mut bb, "127.0.2.1")?,
        port(&mut bb, "127.0.2.1")?,
    );
    let b_text = edge_toml(
        dir,
        "dept-b",
        2,
        quic,
        b_admin,
        &format!(
            r#"
[[access]]
listen = "{b_pension}"
zone = "legacy"
service = "dept-a/pension"

[[access]]
listen = "{b_db}"
zone = "legacy"
service = "dept-a/records-db"

[[channel]]
name = "inbox"
zone = "legacy"
formats = ["json"]
max_record_bytes = "64KiB"
"#
        ),
    );
    for (name, text) in [
        ("hub-01", &hub_text),
        ("dept-a", &a_text),
        ("dept-b", &b_text),
    ] {
        std::fs::create_dir_all(dir.join(name)).map_err(|e| e.to_string())?;
        std::fs::write(dir.join(format!("{name}.toml")), text).map_err(|e| e.to_string())?;
    }

    step(
        2,
        "The hub and the two department gateways start, and connect over QUIC with mutual TLS",
    );
    let creds = operators(dir)?;
    ab.config_source = Some((0, a_text.clone()));
    bb.config_source = Some((0, b_text.clone()));
    let hub = role::start(load(&hub_text, "hub-01.toml")?, hb)
        .await
        .map_err(|e| e.to_string())?;
    let a = role::start(load(&a_text, "dept-a.toml")?, ab)
        .await
        .map_err(|e| e.to_string())?;
    let b = role::start(load(&b_text, "dept-b.toml")?, bb)
        .await
        .map_err(|e| e.to_string())?;
    poll("both tunnels", || async {
        (a.ready() && b.ready()).then_some(())
    })
    .await?;
    println!(
        "   hub-01  QUIC {quic}, consumers' API https://{api}, metrics http://{hub_admin}/metrics"
    );
    println!("   dept-a  legacy network 127.0.1.0/24, metrics http://{a_admin}/metrics");
    println!("   dept-b  legacy network 127.0.2.0/24, metrics http://{b_admin}/metrics");
    println!("   configs: {d}/hub-01.toml, {d}/dept-a.toml, {d}/dept-b.toml");

    step(
        3,
        "dept-a's legacy pension application is published on the provincial network",
    );
    println!("   the app listens only on dept-a's legacy network: {app_addr}");
    println!(
        "   the hub publishes it at {publish}; no packet is routed across, each connection is relayed"
    );
    let (status, body) = http(("127.0.0.1", publish), "GET", "/pension/42", None).await?;
    println!("   GET http://{publish}/pension/42 -> {status}\n      {body}");

    step(
        4,
        "dept-b's legacy clients reach it through an access listener, gateway to gateway",
    );
    let (status, body) = http(("127.0.2.10", b_pension), "GET", "/pension/42", None).await?;
    println!(
        "   GET http://{b_pension}/pension/42 from 127.0.2.10 (dept-b's legacy network) -> {status}\n      {body}"
    );

    step(
        5,
        "dept-a pushes records into channel \"reports\", delivered exactly once to dept-b's spool",
    );
    let out = dir.join("dept-b/spool/inbox/out");
    for (i, r) in [
        r#"{"month":"2026-10","claims":1832}"#,
        r#"{"month":"2026-11","claims":1907}"#,
    ]
    .iter()
    .enumerate()
    {
        let (status, body) = http(
            ("127.0.1.20", a_ingest),
            "POST",
            "/v1/channels/reports/records",
            Some(("application/json", r)),
        )
        .await?;
        println!("   POST record {} -> {status} {body}", i + 1);
    }
    poll("the records in dept-b's out/", || async {
        (std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0) >= 2).then_some(())
    })
    .await?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&out)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    for f in &files {
        println!("   dept-b received {}", f.display());
    }
    let receipts = poll("both receipts delivered", || async {
        let (_, body) = http(
            ("127.0.1.20", a_ingest),
            "GET",
            "/v1/channels/reports/receipts",
            None,
        )
        .await
        .ok()?;
        (body.matches("\"delivered\"").count() >= 2).then_some(body)
    })
    .await?;
    println!("   receipts at dept-a: {receipts}");

    step(
        6,
        "A provincial statistics system reads dept-a's channel \"stats\" from the hub, with its own certificate",
    );
    let consumer = consumer_reads(dir, (ops, api), &creds, a_ingest).await?;

    step(7, "A crossing the boundary policy refuses");
    println!("   dept-a's records-db allows only the provincial extranet, not dept-b's gateway;");
    println!("   a client on dept-b's legacy network tries it through {b_db}:");
    let refused = http(("127.0.2.10", b_db), "GET", "/", None).await;
    println!(
        "   -> {}",
        match refused {
            Ok((s, _)) if s.is_empty() => "connection closed without an answer".to_owned(),
            Ok((s, _)) => s,
            Err(e) => e,
        }
    );
    let a_state = dir.join("dept-a");
    let why = poll("the refusal in dept-a's audit", || async {
        let log = gateway_store::audit::AuditLog::open_existing(&a_state).ok()?;
        let records = log.records(1, 10_000).ok()?;
        let e = &records
            .iter()
            .rev()
            .find(|r| r.event.event == "relay.refuse")?
            .event;
        Some(format!(
            "[{}] {} ({} asked for {})",
            e.rule, e.detail, e.subject, e.object
        ))
    })
    .await?;
    println!("   dept-a's audit says: {why}");

    step(
        8,
        "Try it yourself (Ctrl-C stops everything and removes the directory)",
    );
    let g = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "gatewayd".into());
    println!(
        "   curl http://{publish}/pension/7                         # published service, via the hub"
    );
    println!(
        "   curl --interface 127.0.2.10 http://{b_pension}/pension/7   # from dept-b's legacy network"
    );
    println!(
        "   curl http://{b_pension}/pension/7                       # from elsewhere: refused (R5.address), see the audit"
    );
    println!(
        "   curl --interface 127.0.1.20 -H 'Content-Type: application/json' -d '{{\"month\":\"2026-12\"}}' http://{a_ingest}/v1/channels/reports/records"
    );
    println!("   ls {}", out.display());
    println!("   curl --interface 127.0.1.20 http://{a_ingest}/v1/channels/reports/receipts");
    let (cert, key) = (&consumer.0, &consumer.1);
    let curl = format!(
        "curl --cacert {d}/ca/ca.pem --cert {} --key {}",
        cert.display(),
        key.display()
    );
    println!(
        "   {curl} https://{api}/v1/channels/dept-a/stats/records   # stats-office reads what it was granted"
    );
    println!("   {curl} https://{api}/v1/channels/dept-b/inbox/records   # not granted: 403");
    println!("   curl --cacert {d}/ca/ca.pem https://{api}/v1/channels   # no certificate: 401");
    println!("   curl -s http://{a_admin}/metrics | grep gateway_");
    println!("   {g} audit show --state-dir {d}/dept-a");
    println!("   {g} audit verify --state-dir {d}/hub-01");
    println!("   {g} channels --state-dir {d}/dept-a");
    println!("   {g} check --config {d}/dept-b.toml");
    let built = std::env::current_exe()
        .ok()
        .map(|p| p.with_file_name("gatewayctl"))
        .filter(|p| p.exists());
    let ctl = built
        .as_ref()
        .map_or_else(|| "gatewayctl".to_owned(), |p| p.display().to_string());
    println!("   # central management, as the system, security and audit administrators:");
    if built.is_none() {
        println!(
            "   cargo build --release -p gateway-daemon --bin gatewayctl   # then use target/release/gatewayctl"
        );
    }
    println!(
        "   export GATEWAYCTL_HUB={ops} GATEWAYCTL_CA={d}/ca/ca.pem GATEWAYCTL_CREDENTIALS={}",
        creds.join("system.cred").display()
    );
    println!("   {ctl} devices list");
    println!("   {ctl} consumer list                       # stats-office, its grant and cursor");
    println!("   {ctl} command dept-a diagnostics");
    println!(
        "   GATEWAYCTL_CREDENTIALS={} {ctl} audit export --device dept-a --out /tmp/dept-a-audit.jsonl",
        creds.join("audit.cred").display()
    );
    println!("   {ctl} audit verify /tmp/dept-a-audit.jsonl --ca {d}/ca/ca.pem");
    println!("\nRunning. Press Ctrl-C to stop.");
    Ok(vec![b, a, hub])
}
