//! `gatewayd nftables` turns each shipped config into a ruleset that `nft`
//! accepts (checked with `nft -c`, as root, where nftables is installed), with
//! forwarding dropped and every listener opened on its own address.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn every_shipped_config_gives_a_ruleset_nft_accepts() {
    let dir = common::root().join("config");
    let mut checked_by_nft = 0;
    for e in std::fs::read_dir(&dir).expect("config/").flatten() {
        let path = e.path();
        let out = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
            .args(["nftables", "--config"])
            .arg(&path)
            .output()
            .expect("gatewayd nftables");
        assert!(out.status.success(), "{}: {out:?}", path.display());
        let rules = String::from_utf8(out.stdout).expect("utf-8");
        assert!(
            rules.contains("hook forward priority filter; policy drop;"),
            "{rules}"
        );
        assert!(
            rules.contains("hook input priority filter; policy drop;"),
            "{rules}"
        );
        let nft = Command::new("nft")
            .args(["-c", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let Ok(mut nft) = nft else {
            continue;
        };
        nft.stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("write rules");
        let res = nft.wait_with_output().expect("nft");
        let err = String::from_utf8_lossy(&res.stderr);
        if err.contains("Operation not permitted") {
            continue;
        }
        assert!(
            res.status.success(),
            "{}: nft refuses:\n{err}\n{rules}",
            path.display()
        );
        checked_by_nft += 1;
    }
    if checked_by_nft == 0 {
        println!("skipped the nft check: no nft here, or not root (apt-get install -y nftables)");
    }
}

/// Runs `ip ARGS`, panicking with its error.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces deleted on drop.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Runs `f` on a thread inside namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).expect("netns file");
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("thread in namespace")
}

/// Whether a TCP connection from `src` (in `ns`) to `to` is set up within 2 s.
fn connects(ns: &str, src: &str, to: &str) -> bool {
    let (src, to): (std::net::SocketAddr, std::net::SocketAddr) = (
        format!("{src}:0").parse().expect("src"),
        to.parse().expect("to"),
    );
    in_ns(ns, move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        s.bind(&src.into()).expect("bind the source");
        s.connect_timeout(&to.into(), std::time::Duration::from_secs(2))
            .is_ok()
    })
}

/// Applies `gatewayd nftables` for `config` inside `ns`.
fn apply(ns: &str, config: &std::path::Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
        .args(["nftables", "--config"])
        .arg(config)
        .output()
        .expect("gatewayd nftables");
    assert!(out.status.success(), "{out:?}");
    let mut nft = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft");
    nft.stdin
        .take()
        .expect("stdin")
        .write_all(&out.stdout)
        .expect("rules");
    assert!(nft.wait().expect("nft").success());
}

/// A neighbour on the provincial side forging a legacy source address
/// (10.0.0.99, routed back to it) reaches an ingest listener that matches the
/// source alone; with the zone's `interfaces` the baseline drops it, and the
/// real legacy host still gets through.
#[test]
fn a_neighbour_forging_a_zone_address_is_dropped_on_the_wrong_interface() {
    let euid = nix::unistd::geteuid();
    let tools = Command::new("ip").args(["netns", "list"]).output();
    let nft = Command::new("nft").arg("--version").output();
    if !euid.is_root() || !tools.is_ok_and(|o| o.status.success()) || nft.is_err() {
        println!(
            "skipped: needs root, iproute2 and nftables (apt-get install -y iproute2 nftables)"
        );
        return;
    }
    let p = format!("nf{}-", std::process::id() % 100_000);
    let (fw, leg, prov) = (format!("{p}fw"), format!("{p}leg"), format!("{p}prov"));
    let _lab = Namespaces(vec![fw.clone(), leg.clone(), prov.clone()]);
    for n in [&fw, &leg, &prov] {
        ip(&["netns", "add", n]);
        ip(&["-n", n, "link", "set", "lo", "up"]);
    }
    for (peer, fw_if, fw_addr, peer_addr) in [
        (&leg, "leg0", "10.0.0.1/24", "10.0.0.10/24"),
        (&prov, "prov0", "172.16.0.2/24", "172.16.0.10/24"),
    ] {
        ip(&[
            "link", "add", fw_if, "netns", &fw, "type", "veth", "peer", "name", "eth0", "netns",
            peer,
        ]);
        ip(&["-n", &fw, "addr", "add", fw_addr, "dev", fw_if]);
        ip(&["-n", peer, "addr", "add", peer_addr, "dev", "eth0"]);
        ip(&["-n", &fw, "link", "set", fw_if, "mtu", "1500", "up"]);
        ip(&["-n", peer, "link", "set", "eth0", "mtu", "1500", "up"]);
    }
    // The forger: a legacy address on its provincial link, and the box
    // routes the answers back to it there (no reverse-path filter).
    ip(&["-n", &prov, "addr", "add", "10.0.0.99/32", "dev", "eth0"]);
    ip(&[
        "-n",
        &prov,
        "route",
        "add",
        "10.0.0.1/32",
        "dev",
        "eth0",
        "src",
        "10.0.0.99",
    ]);
    ip(&["-n", &fw, "route", "add", "10.0.0.99/32", "dev", "prov0"]);
    for key in ["all", "default", "prov0", "leg0"] {
        let path = format!("/proc/sys/net/ipv4/conf/{key}/rp_filter");
        in_ns(&fw, move || std::fs::write(path, "0").expect("rp_filter"));
    }
    // The ingest listener (any accepting socket shows what the firewall lets in).
    let listener = in_ns(&fw, || {
        std::net::TcpListener::bind("10.0.0.1:8480").expect("bind")
    });
    std::thread::spawn(move || for _ in listener.incoming() {});
    let (legacy_host, forger) = (
        || connects(&leg, "10.0.0.10", "10.0.0.1:8480"),
        || connects(&prov, "10.0.0.99", "10.0.0.1:8480"),
    );
    assert!(
        legacy_host() && forger(),
        "with no firewall both get through"
    );
    let dir = tempfile::tempdir().expect("dir");
    let config = |interfaces: &str| {
        let f = dir.path().join("edge.toml");
        std::fs::write(
            &f,
            format!(
                "[node]\nid = \"edge-b\"\nrole = \"edge\"\nstate_dir = \"/var/lib/gatewayd\"\n\n\
                 [uplink]\nhubs = [\"172.16.0.1:7443\"]\nca = \"/etc/gatewayd/ca.pem\"\ncert = \"/etc/gatewayd/d.pem\"\nkey = \"/etc/gatewayd/d.key\"\n\n\
                 [[zone]]\nname = \"lab\"\nkind = \"legacy\"\nclassified = false\nlevel = 3\nnetworks = [\"10.0.0.0/24\"]\n{interfaces}\
                 assessment = {{ id = \"T-1\", valid_until = 2099-12-31 }}\n\n\
                 [[zone]]\nname = \"extranet\"\nkind = \"extranet\"\nlevel = 3\nnetworks = [\"172.16.0.0/24\"]\n\n\
                 [[ingest]]\nzone = \"lab\"\nlisten = \"10.0.0.1:8480\"\nauth = \"token\"\ntokens = \"/etc/gatewayd/p.tokens\"\n"
            ),
        )
        .expect("config");
        f
    };
    // Source addresses alone: the forger gets in.
    apply(&fw, &config(""));
    assert!(legacy_host(), "the legacy host is let in");
    assert!(
        forger(),
        "a source-only match is forgeable from another port"
    );
    // With the zone's interface: only the legacy port.
    apply(&fw, &config("interfaces = [\"leg0\"]\n"));
    assert!(legacy_host(), "the legacy host is still let in");
    assert!(
        !forger(),
        "the forged source on the provincial port is dropped"
    );
    assert!(
        !connects(&prov, "172.16.0.10", "10.0.0.1:8480"),
        "the neighbour's own address is dropped"
    );
}
