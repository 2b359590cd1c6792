//! Real separate hosts: network namespaces joined by veth pairs, one
//! `gatewayd` process per box.
//!
//! ```text
//!  legacy (10.0.0.10)           legacy2 (10.0.0.10: the same plan)
//!      | 10.0.0.0/24                | 10.0.0.0/24
//!  gw (10.0.0.1 | 172.16.0.2)    gw2 (10.0.0.1 | 172.16.0.3)      ip_forward = 0
//!      \__________ provincial 172.16.0.0/24 (a bridge in hub) ___/
//!                    hub (172.16.0.1)    prov (172.16.0.10, a client)
//! ```
//!
//! Proves: the legacy app is reachable from the provincial client only through
//! the published service; a direct packet to the legacy network does not get
//! through the gateway; a crossing the policy denies is refused and audited;
//! taking the gateway's provincial link down and up loses no channel record and
//! relays recover; two departments with the same legacy address plan both work.
//!
//! Needs root and `ip` (iproute2); elsewhere each test prints why it is skipped.

mod net;
mod process;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use process::poll_blocking;

fn skip_reason() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    if euid != "0" {
        return Some("needs root (network namespaces)".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "`ip netns` fails here: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!(
            "no `ip` command (apt-get install -y iproute2): {e}"
        )),
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces of one test, deleted on drop.
struct Lab {
    prefix: String,
}

impl Lab {
    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// `ip -n NS ARGS...`
    fn at(&self, ns: &str, args: &[&str]) {
        let ns = self.ns(ns);
        let mut all = vec!["-n", ns.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// A veth pair between two namespaces, with an address on each end.
    fn link(&self, (a, a_if, a_addr): (&str, &str, &str), (b, b_if, b_addr): (&str, &str, &str)) {
        let (na, nb) = (self.ns(a), self.ns(b));
        ip(&[
            "link", "add", a_if, "netns", &na, "type", "veth", "peer", "name", b_if, "netns", &nb,
        ]);
        for (ns, dev, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
            if !addr.is_empty() {
                self.at(ns, &["addr", "add", addr, "dev", dev]);
            }
            self.at(ns, &["link", "set", dev, "up"]);
        }
    }

    fn build() -> Lab {
        // Unique per lab: the tests of this file run at once.
        static LABS: AtomicUsize = AtomicUsize::new(0);
        let lab = Lab {
            prefix: format!(
                "gw{}{}-",
                std::process::id() % 100_000,
                LABS.fetch_add(1, Ordering::SeqCst)
            ),
        };
        for n in ["legacy", "legacy2", "gw", "gw2", "hub", "prov"] {
            ip(&["netns", "add", &lab.ns(n)]);
            lab.at(n, &["link", "set", "lo", "up"]);
        }
        lab.link(
            ("legacy", "eth0", "10.0.0.10/24"),
            ("gw", "leg0", "10.0.0.1/24"),
        );
        lab.link(
            ("legacy2", "eth0", "10.0.0.10/24"),
            ("gw2", "leg0", "10.0.0.1/24"),
        );
        // The provincial network: a bridge in the hub's namespace.
        lab.at("hub", &["link", "add", "br0", "type", "bridge"]);
        lab.at("hub", &["addr", "add", "172.16.0.1/24", "dev", "br0"]);
        lab.at("hub", &["link", "set", "br0", "up"]);
        for (n, addr, port) in [
            ("gw", "172.16.0.2/24", "p-gw"),
            ("gw2", "172.16.0.3/24", "p-gw2"),
            ("prov", "172.16.0.10/24", "p-prov"),
        ] {
            lab.link((n, "prov0", addr), ("hub", port, ""));
            lab.at("hub", &["link", "set", port, "master", "br0"]);
        }
        // The provincial client even has a route to the legacy plan via the
        // gateway: only the gateway not routing keeps it out.
        lab.at(
            "prov",
            &["route", "add", "10.0.0.0/24", "via", "172.16.0.2"],
        );
        lab.at("legacy", &["route", "add", "default", "via", "10.0.0.1"]);
        for n in ["gw", "gw2"] {
            let forward = in_ns(&lab, n, || {
                std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("ip_forward")
            });
            assert_eq!(forward.trim(), "0", "the gateway must not route");
        }
        lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in ["legacy", "legacy2", "gw", "gw2", "hub", "prov"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(n)])
                .status();
        }
    }
}

/// Runs `f` on a thread inside namespace `ns`; sockets it makes stay there.
fn in_ns<T: Send + 'static>(lab: &Lab, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{}", lab.ns(ns));
    std::thread::spawn(move || {
        let fd = File::open(&path).expect("netns file");
        setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("thread in namespace")
}

/// A legacy echo server at `addr` in `ns`, counting connections.
fn legacy_echo(lab: &Lab, ns: &str, addr: &str) -> Arc<AtomicUsize> {
    let addr = addr.to_owned();
    let l = in_ns(lab, ns, move || {
        TcpListener::bind(addr).expect("bind legacy app")
    });
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            c.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    conns
}

/// One echo through `addr` from namespace `ns`; `Err` when it does not work.
fn echo_from(lab: &Lab, ns: &str, addr: &str, msg: &'static [u8]) -> Result<Vec<u8>, String> {
    let addr: SocketAddr = addr.parse().expect("addr");
    in_ns(lab, ns, move || {
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        s.write_all(msg).map_err(|e| e.to_string())?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).map_err(|e| e.to_string())?;
        Ok(got)
    })
}

/// The value of one series in a Prometheus text page.
fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// One HTTP/1.0 request from namespace `ns`: (status, body).
fn http_from(
    lab: &Lab,
    ns: &str,
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, String)> {
    let addr: SocketAddr = addr.parse().expect("addr");
    let req = format!(
        "{method} {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    in_ns(lab, ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(req.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let status = out.split(' ').nth(1)?.parse().ok()?;
        Some((status, out.split_once("\r\n\r\n")?.1.to_owned()))
    })
}

/// `gatewayd run` inside a namespace, killed on drop; its log in a file.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(lab: &Lab, ns: &str, config: &Path) -> Daemon {
        let log = config.with_extension("log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.ns(ns),
                env!("CARGO_BIN_EXE_gatewayd"),
                "run",
                "--config",
            ])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn gatewayd");
        Daemon { child, log }
    }

    fn wait_log(&self, needle: &str) {
        self.wait_log_n(needle, 1);
    }

    /// Waits until the log holds `n` lines containing `needle`.
    fn wait_log_n(&self, needle: &str, n: usize) {
        poll_blocking(
            &format!("{n} log lines with {needle:?}"),
            Duration::from_secs(20),
            || {
                let text = std::fs::read_to_string(&self.log).unwrap_or_default();
                if text.lines().filter(|l| l.contains(needle)).count() >= n {
                    Ok(())
                } else {
                    Err(text)
                }
            },
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    poll_blocking(what, Duration::from_secs(30), || {
        if f() { Ok(()) } else { Err(String::new()) }
    });
}

fn edge_config(dir: &Path, id: &str, hub: &str, extra: &str) -> PathBuf {
    let d = dir.display();
    let text = format!(
        r#"[node]
id = "{id}"
role = "edge"
state_dir = "{d}/{id}"

[[zone]]
name = "legacy"
kind = "legacy"
classified = false
level = 3
networks = ["10.0.0.0/24"]
assessment = {{ id = "T-{id}", valid_until = 2099-12-31 }}

[[zone]]
name = "extranet"
kind = "extranet"
level = 3
networks = ["172.16.0.0/24"]

[uplink]
hubs = ["{hub}"]
ca = "{d}/ca/ca.pem"
cert = "{d}/certs/{id}.pem"
key = "{d}/certs/{id}.key"

[[service]]
name = "echo"
zone = "legacy"
target = "10.0.0.10:7000"
app_protocol = "tls"
allow = ["extranet"]

[admin]
listen = "127.0.0.1:9600"
{extra}"#
    );
    let path = dir.join(format!("{id}.toml"));
    std::fs::create_dir_all(dir.join(id)).expect("state dir");
    std::fs::write(&path, text).expect("write config");
    path
}

/// A minimal well-formed TLS ClientHello record (one suite, one extension).
fn client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend([7u8; 32]);
    body.push(0);
    body.extend([0x00, 0x02, 0x13, 0x01]);
    body.extend([0x01, 0x00]);
    let ext = [0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04];
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut hs = vec![0x01, 0, 0, body.len() as u8];
    hs.extend(body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend((hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

#[test]
fn real_namespaces_bridge_only_what_is_published() {
    if let Some(why) = skip_reason() {
        println!("skipped: {why}");
        return;
    }
    let lab = Lab::build();
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path();
    gateway_daemon::tunnel::pki::init(&d.join("ca"), "topology CA").expect("ca");
    gateway_daemon::tunnel::pki::issue(
        &d.join("ca"),
        "hub-01",
        &["172.16.0.1".into()],
        2,
        &d.join("certs"),
    )
    .expect("hub cert");
    for id in ["gw-01", "gw-02"] {
        gateway_daemon::tunnel::pki::issue(&d.join("ca"), id, &[], 2, &d.join("certs"))
            .expect("edge cert");
    }
    let legacy_conns = legacy_echo(&lab, "legacy", "10.0.0.10:7000");
    let legacy2_conns = legacy_echo(&lab, "legacy2", "10.0.0.10:7000");

    let hub_text = format!(
        r#"[node]
id = "hub-01"
role = "hub"
state_dir = "{dd}/hub-01"

[hub]
listen = "172.16.0.1:7443"
api = "172.16.0.1:9443"
ca_cert = "{dd}/ca/ca.pem"
ca_key = "{dd}/ca/ca.key"
cert = "{dd}/certs/hub-01.pem"
key = "{dd}/certs/hub-01.key"

[[zone]]
name = "extranet"
kind = "extranet"
level = 3
networks = ["172.16.0.0/24"]

[[publish]]
service = "gw-01/echo"
zone = "extranet"
listen = "172.16.0.1:18001"

[[publish]]
service = "gw-02/echo"
zone = "extranet"
listen = "172.16.0.1:18002"

[[publish]]
service = "gw-01/records-db"
zone = "extranet"
listen = "172.16.0.1:18003"

[admin]
listen = "127.0.0.1:9600"
"#,
        dd = d.display()
    );
    std::fs::create_dir_all(d.join("hub-01")).expect("hub state");
    std::fs::write(d.join("hub.toml"), hub_text).expect("hub config");
    let channel = r#"
[[service]]
name = "records-db"
zone = "legacy"
target = "10.0.0.10:5432"
app_protocol = "tls"
allow = ["gw-02"]

[[channel]]
name = "readings"
zone = "legacy"
formats = ["json"]
max_record_bytes = "4KiB"

[[ingest]]
zone = "legacy"
listen = "10.0.0.1:8480"
"#;
    let gw1 = edge_config(d, "gw-01", "172.16.0.1:7443", channel);
    let gw2 = edge_config(d, "gw-02", "172.16.0.1:7443", "");
    let hub = Daemon::start(&lab, "hub", &d.join("hub.toml"));
    hub.wait_log("Hub started");
    let edge1 = Daemon::start(&lab, "gw", &gw1);
    let edge2 = Daemon::start(&lab, "gw2", &gw2);
    edge1.wait_log("Tunnel up");
    edge2.wait_log("Tunnel up");

    // 1. Published: the provincial client reaches each department's app, and
    //    the two identical address plans do not collide (services are named).
    //    app_protocol = "tls" at level 3: a whole, well-formed ClientHello.
    let hello: &'static [u8] = Box::leak(client_hello().into_boxed_slice());
    assert_eq!(
        echo_from(&lab, "prov", "172.16.0.1:18001", hello).expect("via gw-01"),
        hello
    );
    assert_eq!(
        echo_from(&lab, "prov", "172.16.0.1:18002", hello).expect("via gw-02"),
        hello
    );
    assert_eq!(legacy_conns.load(Ordering::SeqCst), 1);
    assert_eq!(legacy2_conns.load(Ordering::SeqCst), 1);

    // Path MTU discovery on 1,500-byte links: probes above fail, the path
    // settles just under the link's MTU, and nothing reads as a black hole.
    until("gw-01's path MTU settled under 1,500 bytes", || {
        http_from(&lab, "hub", "127.0.0.1:9600", "GET", "/metrics", "").is_some_and(|(_, m)| {
            let mtu = metric(&m, "gateway_tunnel_path_mtu_bytes{peer=\"gw-01\"}");
            let holes = metric(&m, "gateway_tunnel_mtu_black_holes_total{peer=\"gw-01\"}");
            mtu.is_some_and(|v| v > 1400.0 && v <= 1472.0) && holes == Some(0.0)
        })
    });

    // 2. Not routed: straight at the legacy address, via the gateway, nothing.
    let direct = echo_from(&lab, "prov", "10.0.0.10:7000", hello);
    assert!(direct.is_err(), "a packet crossed the gateway: {direct:?}");
    assert_eq!(
        legacy_conns.load(Ordering::SeqCst),
        1,
        "the legacy app saw the direct attempt"
    );

    // 3. Denied by policy: records-db admits only gw-02, not provincial clients.
    let denied = echo_from(&lab, "prov", "172.16.0.1:18003", hello);
    assert!(denied.is_err(), "{denied:?}");
    until("the refusal in gw-01's audit", || {
        let out = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
            .args(["audit", "show", "--state-dir"])
            .arg(d.join("gw-01"))
            .output()
            .expect("audit show");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .any(|l| l.contains("relay.refuse") && l.contains("records-db") && l.contains("[R0."))
    });

    // 4. The provincial link goes down while legacy producers write, and back:
    //    every record reaches the hub once, and relays work again.
    let post = |from: u64, to: u64| {
        for n in from..=to {
            let (s, b) = http_from(
                &lab,
                "legacy",
                "10.0.0.1:8480",
                "POST",
                "/v1/channels/readings/records",
                &format!("{{\"n\":{n}}}"),
            )
            .expect("ingest answers");
            assert_eq!(s, 200, "{b}");
        }
    };
    post(1, 50);
    lab.at("gw", &["link", "set", "prov0", "down"]);
    post(51, 100);
    // Down long enough for the edge to declare its tunnels dead (8 s idle).
    edge1.wait_log("Tunnel down");
    post(101, 150);
    lab.at("gw", &["link", "set", "prov0", "up"]);
    let lanes = std::fs::read_to_string(&edge1.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Tunnel down"))
        .count();
    edge1.wait_log_n("Tunnel up", 2 * lanes);
    post(151, 200);
    // A consumer with its certificate, granted gw-01's stream, reads it from
    // the provincial side.
    let reader = net::Reader::for_dirs(
        &d.join("ca"),
        &d.join("consumers"),
        (&d.join("hub-01"), None),
        "172.16.0.1:9443".parse().expect("addr"),
        "reader",
        &["gw-01/readings"],
    );
    let hub_api = |path: String| {
        let reader = reader.clone();
        in_ns(&lab, "prov", move || reader.request("GET", &path))
    };
    until("all 200 records at the hub", || {
        hub_api("/v1/channels".into()).is_some_and(|(_, b)| b.contains("\"high\":200"))
    });
    let mut seqs = Vec::new();
    let mut after = 0;
    loop {
        let (_, b) = hub_api(format!(
            "/v1/channels/gw-01/readings/records?after={after}&limit=1000"
        ))
        .expect("consumer API");
        let v: serde_json::Value = serde_json::from_str(&b).expect("json");
        let list = v["records"].as_array().expect("records").clone();
        if list.is_empty() {
            break;
        }
        for r in list {
            seqs.push(r["seq"].as_u64().expect("seq"));
        }
        after = v["next"].as_u64().expect("next");
    }
    assert_eq!(
        seqs,
        (1..=200).collect::<Vec<_>>(),
        "every record once, in order"
    );
    until("the relay back after the link returned", || {
        echo_from(&lab, "prov", "172.16.0.1:18001", hello).is_ok()
    });
    drop((edge1, edge2, hub));
}

/// Connection attempts from `ns` to `ip` on each of `ports`; the box drops
/// them, so each waits a little and gives up.
fn scan_from(lab: &Lab, ns: &str, ip: &'static str, ports: std::ops::Range<u16>) {
    in_ns(lab, ns, move || {
        for port in ports {
            let addr = SocketAddr::new(ip.parse().expect("ip"), port);
            let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(100));
        }
    });
}

/// An assessor's port scan of the box from each side, on ports nothing
/// listens on: the nftables baseline drops the SYNs and hands them to
/// gatewayd (NFLOG), which raises a scan alarm with the four fields for each
/// source, marked unproven (a SYN's source can be forged): alarmed, not banned.
#[test]
fn a_port_scan_of_closed_ports_from_each_side_is_alarmed() {
    if let Some(why) = skip_reason() {
        println!("skipped: {why}");
        return;
    }
    if Command::new("nft").arg("--version").output().is_err() {
        println!("skipped: no nft (apt-get install -y nftables)");
        return;
    }
    let lab = Lab::build();
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path();
    gateway_daemon::tunnel::pki::init(&d.join("ca"), "topology CA").expect("ca");
    gateway_daemon::tunnel::pki::issue(&d.join("ca"), "edge-s", &[], 2, &d.join("certs"))
        .expect("cert");
    let config = edge_config(d, "edge-s", "172.16.0.1:7443", "");
    let rules = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
        .args(["nftables", "--config"])
        .arg(&config)
        .output()
        .expect("gatewayd nftables");
    assert!(rules.status.success());
    let mut nft = Command::new("ip")
        .args(["netns", "exec", &lab.ns("gw"), "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft");
    nft.stdin
        .take()
        .expect("stdin")
        .write_all(&rules.stdout)
        .expect("rules");
    assert!(nft.wait().expect("nft").success(), "the baseline applies");
    let daemon = Daemon::start(&lab, "gw", &config);
    let watching = poll_blocking("the NFLOG reader's start", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&daemon.log).unwrap_or_default();
        if text.contains("Watching the packets the nftables baseline drops") {
            Ok(true)
        } else if text.contains("are not watched") {
            Ok(false)
        } else {
            Err(text)
        }
    });
    if !watching {
        println!("skipped: this kernel gives no NFLOG (nfnetlink_log) to the daemon");
        return;
    }
    scan_from(&lab, "prov", "172.16.0.2", 1..31);
    scan_from(&lab, "legacy", "10.0.0.1", 1..31);
    let state = d.join("edge-s");
    let alarm = |source: &str| {
        net::audit_lines(&state).into_iter().find(|l| {
            l.starts_with(&format!("detect.alarm {source} dropped tcp/")) && l.contains("[D2.scan]")
        })
    };
    until("both scans alarmed", || {
        alarm("172.16.0.10").is_some() && alarm("10.0.0.10").is_some()
    });
    let inbound = alarm("172.16.0.10").expect("alarm");
    println!("{inbound}");
    let json: serde_json::Value =
        serde_json::from_str(inbound.split_once("] ").expect("detail").1).expect("json");
    assert_eq!(json["direction"], "inbound");
    assert_eq!(json["attack"], "scan");
    assert_eq!(json["action"], "alarm (address unproven, not banned)");
    assert!(json["time"].as_str().is_some_and(|t| t.ends_with("+08:00")));
    let outbound = alarm("10.0.0.10").expect("alarm");
    assert!(
        outbound.contains("\"direction\":\"outbound\""),
        "{outbound}"
    );
    drop(daemon);
}
