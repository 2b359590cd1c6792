//! docs/operate.md as a script: its own `sh` and `toml` blocks, taken from
//! the page in order and run as written from "Bootstrap the hub" to the end of
//! "Changing configuration on the box itself", with the page's addresses and
//! `/etc/gatewayd` replaced by this machine's loopback ports and a temporary
//! directory. Each command must exit 0. A `toml` block of `[hub]` keys is
//! put into the hub's config; `systemctl` lines act on the processes this
//! test runs as systemd would (restart, reload, stop, start, and a start
//! again after exit 75). What the page says in prose (which account, point
//! the config at a file, wait for the boxes) the drill does between blocks,
//! and checks the service after the steps that change it.
//!
//! Skipped, with the reason in `SKIPPED`: blocks that need what this drill
//! does not make (an alarm's id). The page cannot drift from the product
//! without failing here: a renamed flag, a file `--out` will not overwrite, a
//! step that leaves the next one unreachable.

mod common;
mod process;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use process::*;
use serde_json::Value;

/// The sections run, in the page's order; the drill stops after the last.
const SECTIONS: &[&str] = &[
    "Bootstrap the hub",
    "Enroll a box",
    "Push config",
    "Watch the fleet",
    "Alarms and bans",
    "Revoke",
    "Collect audit",
    "The hub's own certificate",
    "Rotate the CA",
    "Changing configuration on the box itself",
];

/// (section, block) not run, and why.
const SKIPPED: &[(&str, usize, &str)] = &[(
    "Alarms and bans",
    0,
    "acknowledges an alarm id of the page's example; tests/e2e/fleet.rs raises and acknowledges a real one",
)];

/// A fenced block: its section (the `##` heading), its language, its text.
#[derive(Debug)]
struct Block {
    section: String,
    lang: String,
    text: String,
}

/// The `sh` and `toml` blocks of a page, each with its `##` section.
fn blocks(md: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut open: Option<(String, String)> = None;
    for line in md.lines() {
        let trimmed = line.trim_start();
        if let Some((lang, text)) = &mut open {
            if trimmed.starts_with("```") {
                if lang == "sh" || lang == "toml" {
                    out.push(Block {
                        section: section.clone(),
                        lang: lang.clone(),
                        text: std::mem::take(text),
                    });
                }
                open = None;
            } else {
                text.push_str(trimmed);
                text.push('\n');
            }
        } else if let Some(lang) = trimmed.strip_prefix("```") {
            open = Some((lang.trim().to_owned(), String::new()));
        } else if let Some(h) = line.strip_prefix("## ") {
            section = h.trim().to_owned();
        }
    }
    out
}

/// A legacy echo service behind the box.
fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.1.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
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
    addr
}

struct Drill {
    dir: tempfile::TempDir,
    /// What the page writes, and what it stands for here.
    subst: Vec<(String, String)>,
    env: BTreeMap<String, String>,
    hub_config: PathBuf,
    edge_config: PathBuf,
    publish: SocketAddr,
    hub: Option<Proc>,
    edge: Option<Proc>,
    /// The last command's stdout.
    last: String,
}

impl Drill {
    fn new() -> Drill {
        let dir = tempfile::tempdir().expect("dir");
        for d in ["etc", "root", "var/hub", "var/edge"] {
            std::fs::create_dir_all(dir.path().join(d)).expect("dir");
        }
        let (quic, api, ops) = (free_udp(), free_tcp("127.0.0.1"), free_tcp("127.0.0.1"));
        let root = dir.path().display().to_string();
        let subst = vec![
            ("/etc/gatewayd".to_owned(), format!("{root}/etc")),
            ("/root/".to_owned(), format!("{root}/root/")),
            ("59.72.1.10:7443".to_owned(), quic.to_string()),
            ("59.72.1.10:9443".to_owned(), api.to_string()),
            ("10.99.0.10:9444".to_owned(), ops.to_string()),
            (
                "--san 59.72.1.10 --san 10.99.0.10".to_owned(),
                "--san 127.0.0.1".to_owned(),
            ),
            // Renewals within the drill's minute, with room for the box to
            // reconnect after each hub restart before it must renew.
            (
                "cert_lifetime = \"24h\"".to_owned(),
                "cert_lifetime = \"30s\"".to_owned(),
            ),
        ];
        let bin = Path::new(env!("CARGO_BIN_EXE_gatewayd"))
            .parent()
            .expect("bin dir")
            .display()
            .to_string();
        let mut env = BTreeMap::new();
        env.insert(
            "PATH".to_owned(),
            format!("{bin}:{}", std::env::var("PATH").unwrap_or_default()),
        );
        env.insert("HOME".to_owned(), format!("{root}/root"));
        Drill {
            hub_config: dir.path().join("etc/hub.toml"),
            edge_config: dir.path().join("etc/edge.toml"),
            publish: free_tcp("127.0.0.1"),
            dir,
            subst,
            env,
            hub: None,
            edge: None,
            last: String::new(),
        }
    }

    fn sub(&self, text: &str) -> String {
        self.subst
            .iter()
            .fold(text.to_owned(), |t, (from, to)| t.replace(from, to))
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Runs a block's lines, in order.
    fn run(&mut self, b: &Block) {
        let text = self.sub(&b.text);
        if b.lang == "toml" {
            self.set_hub_keys(&text);
            return;
        }
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            for part in line.split(" && ") {
                self.command(part.trim(), line);
            }
        }
    }

    /// One command of a line (`&&` parts run one after the other).
    fn command(&mut self, cmd: &str, line: &str) {
        if let Some(vars) = cmd.strip_prefix("export ") {
            let vars = vars.split('#').next().unwrap_or("");
            for kv in vars.split_whitespace() {
                let (k, v) = kv.split_once('=').expect("export K=V");
                self.env.insert(k.to_owned(), v.to_owned());
            }
            return;
        }
        if let Some(what) = cmd.strip_prefix("systemctl ") {
            let what: Vec<&str> = what.split_whitespace().collect();
            match what.as_slice() {
                ["restart", "gatewayd@hub"] => self.restart_hub(),
                ["reload", "gatewayd@hub"] => {
                    let hub = self.hub.as_mut().expect("hub");
                    hub.signal(Signal::SIGHUP);
                    hub.wait_next_log("SIGHUP: reloading");
                }
                ["stop", "gatewayd@edge"] => {
                    let edge = self.edge.take().expect("edge");
                    edge.signal(Signal::SIGTERM);
                    let (code, log) = edge.wait_exit();
                    assert_eq!(code, 0, "{}", log.join("\n"));
                }
                ["start", "gatewayd@edge"] => self.start_edge(),
                other => panic!("{line}: no systemd stand-in for {other:?}"),
            }
            return;
        }
        if cmd.starts_with("gatewayd run ") {
            self.start_edge();
            return;
        }
        if cmd.starts_with("gatewayctl ") && self.hub.is_none() {
            self.start_hub();
        }
        let mut c = Command::new("bash");
        c.arg("-c")
            .arg(cmd)
            .current_dir(self.path("root"))
            .env_clear()
            .envs(&self.env);
        // The page says whose each action is; the drill holds all three.
        let account = if cmd.starts_with("gatewayctl revoke") || cmd.contains("--replace") {
            Some("zhao-min")
        } else if cmd.starts_with("gatewayctl audit") {
            Some("sun-yan")
        } else {
            None
        };
        if let Some(a) = account {
            c.env(
                "GATEWAYCTL_CREDENTIALS",
                self.path(&format!("root/{a}.cred")),
            );
        }
        let out = c.output().expect("bash");
        let (o, e) = common::text(&out);
        assert_eq!(
            common::code(&out),
            0,
            "docs/operate.md: `{line}` failed\nstdout:\n{o}\nstderr:\n{e}"
        );
        self.last = o;
    }

    /// The `[hub]` keys of a toml block put into the hub's config (the
    /// first block makes the whole file around them).
    fn set_hub_keys(&mut self, block: &str) {
        let keys: Vec<(&str, &str)> = block
            .lines()
            .filter_map(|l| l.split('#').next())
            .filter_map(|l| l.split_once(" = "))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        assert!(block.trim_start().starts_with("[hub]"), "{block}");
        let mut text = std::fs::read_to_string(&self.hub_config).unwrap_or_else(|_| {
            format!(
                "[node]\nid = \"hub-01\"\nrole = \"hub\"\nstate_dir = \"{state}\"\n\n[[zone]]\nname = \"extranet\"\nkind = \"extranet\"\nlevel = 2\nnetworks = [\"127.0.0.0/24\"]\n\n[admin]\nlisten = \"{admin}\"\n\n[hub]\n\n[[publish]]\nservice = \"jl-gat-0001/echo\"\nzone = \"extranet\"\nlisten = \"{publish}\"\n",
                state = self.path("var/hub").display(),
                admin = free_tcp("127.0.0.1"),
                publish = self.publish,
            )
        });
        for (k, v) in keys {
            let line = format!("{k} = {v}");
            let (head, tail) = text.split_once("[hub]\n").expect("[hub]");
            let (section, rest) = match tail.find("\n[") {
                Some(i) => tail.split_at(i),
                None => (tail, ""),
            };
            let mut lines: Vec<String> = section.lines().map(str::to_owned).collect();
            match lines.iter_mut().find(|l| l.starts_with(&format!("{k} = "))) {
                Some(l) => *l = line,
                None => lines.insert(0, line),
            }
            text = format!("{head}[hub]\n{}\n{}", lines.join("\n").trim_end(), rest);
        }
        std::fs::write(&self.hub_config, text).expect("hub config");
    }

    fn start_hub(&mut self) {
        let mut p = Proc::start(&self.hub_config);
        p.wait_log("Running;");
        self.hub = Some(p);
    }

    /// What systemd's restart does; the box is back on a tunnel afterwards.
    fn restart_hub(&mut self) {
        if let Some(edge) = self.edge.as_mut() {
            let _ = edge.log_so_far();
        }
        if let Some(hub) = self.hub.take() {
            hub.signal(Signal::SIGTERM);
            let (code, log) = hub.wait_exit();
            assert_eq!(code, 0, "{}", log.join("\n"));
        }
        self.start_hub();
        if let Some(edge) = self.edge.as_mut() {
            edge.wait_next_log("Tunnel up");
        }
    }

    fn start_edge(&mut self) {
        let mut p = Proc::start(&self.edge_config);
        p.wait_log("Tunnel up");
        self.edge = Some(p);
    }

    fn edge(&mut self) -> &mut Proc {
        self.edge.as_mut().expect("the box runs")
    }

    /// gatewayctl as the page's system administrator, for the drill's checks.
    fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
            .args(args)
            .env_clear()
            .envs(&self.env)
            .output()
            .expect("gatewayctl");
        let (o, e) = common::text(&out);
        assert_eq!(common::code(&out), 0, "{args:?}: {e}");
        o
    }

    fn device(&self) -> Value {
        serde_json::from_str(&self.ctl(&["devices", "show", "jl-gat-0001", "--format", "json"]))
            .expect("json")
    }

    fn wait_trusts(&self, cas: &[&str]) {
        let want: Vec<String> = cas
            .iter()
            .flat_map(|f| {
                gateway_daemon::tunnel::pki::fingerprints(
                    &std::fs::read_to_string(self.path(f)).expect("ca"),
                )
            })
            .collect();
        poll_blocking("the box reports its CAs", Duration::from_secs(20), || {
            let ca = self.device()["status"]["ca"].clone();
            if ca == serde_json::json!(want) {
                Ok(())
            } else {
                Err(format!("{ca} != {want:?}"))
            }
        });
    }

    fn relay(&self) -> TcpStream {
        let mut s = TcpStream::connect(self.publish).expect("publish");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"ping").expect("write");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).expect("echo through the hub");
        assert_eq!(&buf, b"ping");
        s
    }

    /// The box's config as the engineer writes it (docs/deploy.md), with
    /// its certificate under its state directory (enrollment makes it).
    fn write_edge_config(&self, echo: SocketAddr) {
        let etc = self.path("etc");
        let state = self.path("var/edge");
        let text = format!(
            "[node]\nid = \"jl-gat-0001\"\nrole = \"edge\"\nstate_dir = \"{state}\"\n\n[[zone]]\nname = \"lab\"\nkind = \"legacy\"\nclassified = false\nlevel = 2\nnetworks = [\"127.0.1.0/24\"]\nassessment = {{ id = \"T-1\", valid_until = 2099-12-31 }}\n\n[[zone]]\nname = \"extranet\"\nkind = \"extranet\"\nlevel = 2\nnetworks = [\"127.0.0.0/24\"]\n\n[uplink]\nhubs = [\"{quic}\"]\nca = \"{etc}/ca/ca.pem\"\ncert = \"{state}/device.pem\"\nkey = \"{state}/device.key\"\nheartbeat = \"1s\"\nconfig_try = \"10s\"\n\n[admin]\nlisten = \"{admin}\"\n\n[[service]]\nname = \"echo\"\nzone = \"lab\"\ntarget = \"{echo}\"\nallow = [\"extranet\"]\n",
            state = state.display(),
            etc = etc.display(),
            quic = self.sub("59.72.1.10:7443"),
            admin = free_tcp("127.0.0.1"),
        );
        std::fs::write(&self.edge_config, text).expect("edge config");
    }

    /// The config the system administrator pushes: what the box runs, with
    /// `change` applied.
    fn write_push(&self, change: impl Fn(&str) -> String) {
        let runs = self.ctl(&["config", "show", "jl-gat-0001", "--applied"]);
        let pushed = change(&runs);
        assert_ne!(pushed, runs, "the push changes something");
        std::fs::write(self.path("root/jl-gat-0001.toml"), pushed).expect("push file");
    }

    fn wait_collected(&self) {
        let probe = self.path("root/probe.jsonl");
        poll_blocking("the box's audit collected", Duration::from_secs(20), || {
            let _ = std::fs::remove_file(&probe);
            let out = Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
                .args(["audit", "export", "--device", "jl-gat-0001", "--out"])
                .arg(&probe)
                .env_clear()
                .envs(&self.env)
                .env("GATEWAYCTL_CREDENTIALS", self.path("root/sun-yan.cred"))
                .output()
                .expect("gatewayctl");
            if common::code(&out) == 0 {
                Ok(())
            } else {
                Err(common::text(&out).1)
            }
        });
        let _ = std::fs::remove_file(&probe);
    }

    fn wait_applied(&self, version: u64) {
        poll_blocking("the push applied", Duration::from_secs(20), || {
            let all: Value =
                serde_json::from_str(&self.ctl(&["config", "status", "--format", "json"]))
                    .expect("json");
            let s = all
                .as_array()
                .into_iter()
                .flatten()
                .find(|d| d["id"] == "jl-gat-0001")
                .cloned()
                .unwrap_or_default();
            if s["applied"] == version && s["result"]["outcome"] == "applied" {
                Ok(())
            } else {
                Err(s.to_string())
            }
        });
    }
}

impl Drop for Drill {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(e) = self.edge.as_mut() {
                eprintln!("the box's log:\n{}", e.log_so_far());
            }
            if let Some(h) = self.hub.as_mut() {
                eprintln!("the hub's log:\n{}", h.log_so_far());
            }
        }
    }
}

#[test]
fn the_operators_guide_runs_as_written() {
    let md = std::fs::read_to_string(common::root().join("docs/operate.md")).expect("page");
    let all = blocks(&md);
    let mut d = Drill::new();
    let echo = echo_server();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut ran = Vec::new();
    for b in all
        .iter()
        .filter(|b| SECTIONS.contains(&b.section.as_str()))
    {
        let n = {
            let c = counts.entry(b.section.clone()).or_default();
            *c += 1;
            *c - 1
        };
        if SKIPPED.iter().any(|(s, i, _)| *s == b.section && *i == n) {
            continue;
        }
        // What the page says in prose before the block.
        match (b.section.as_str(), n) {
            ("Enroll a box", 2) => d.write_edge_config(echo),
            ("Push config", 0) => {
                d.write_push(|t| t.replace("heartbeat = \"1s\"", "heartbeat = \"2s\""))
            }
            ("Push config", 1) => {
                let admin = free_tcp("127.0.0.1").to_string();
                d.write_push(|t| {
                    let old = t
                        .split("[admin]\nlisten = \"")
                        .nth(1)
                        .and_then(|r| r.split('"').next())
                        .expect("admin.listen");
                    t.replace(old, &admin)
                });
            }
            ("Revoke", 0) => {
                let _ = d.edge().log_so_far();
            }
            // The box's chain reaches the hub within a second or two.
            ("Collect audit", 0) => d.wait_collected(),
            _ => {}
        }
        let open = (b.section == "Revoke" && n == 0).then(|| d.relay());
        d.run(b);
        ran.push(format!("{} #{n}", b.section));
        // What the page says happens after it, checked.
        match (b.section.as_str(), n) {
            ("Enroll a box", 2) => {
                d.relay();
            }
            ("Push config", 0) => d.wait_applied(1),
            ("Push config", 1) => {
                // The box stops to apply it; systemd starts it again.
                let (code, log) = d.edge.take().expect("edge").wait_exit();
                assert_eq!(code, 75, "{}", log.join("\n"));
                d.start_edge();
                d.edge().wait_log("Pushed config confirmed");
                d.wait_applied(2);
            }
            ("Revoke", 0) => {
                let mut s = open.expect("relay");
                let mut buf = [0u8; 1];
                assert!(
                    matches!(s.read(&mut buf), Ok(0) | Err(_)),
                    "the relay is cut"
                );
                d.edge().wait_log("revoked");
            }
            ("Revoke", 1) => {
                d.relay();
            }
            ("Collect audit", 0) => {
                assert!(d.last.starts_with("intact"), "{}", d.last);
            }
            ("Rotate the CA", 3) => {
                d.wait_trusts(&["etc/ca/ca.pem", "etc/ca-2027/ca.pem"]);
            }
            ("Rotate the CA", 6) => {
                // Boxes renew onto the new CA (within a lifetime).
                d.edge()
                    .wait_next_log_within("Certificate renewed", Duration::from_secs(40));
                d.relay();
            }
            ("Rotate the CA", 9) => {
                d.relay();
            }
            ("Rotate the CA", 12) => {
                d.wait_trusts(&["etc/ca-2027/ca.pem"]);
                d.relay();
            }
            _ => {}
        }
    }
    // Every section the drill names ran, to its last block.
    for (section, last) in [
        ("Bootstrap the hub", 3),
        ("Push config", 1),
        ("Revoke", 1),
        ("Collect audit", 0),
        ("Rotate the CA", 12),
        ("Changing configuration on the box itself", 0),
    ] {
        assert!(
            ran.contains(&format!("{section} #{last}")),
            "docs/operate.md changed its blocks: {section} #{last} not run; ran {ran:?}"
        );
    }
}
