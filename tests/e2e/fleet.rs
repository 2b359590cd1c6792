//! Central management end to end, with real processes: a hub with its
//! operators' API, edges enrolled by token, `gatewayctl` as operators use it.
//!
//! - enrollment, token reuse and a token for another id refused; renewal with a
//!   6-second lifetime, the renewed certificate accepted by a restarted hub after
//!   the first one expired; revocation cutting a live relay; each role refused
//!   what it may not do;
//! - config push: a bad file refused at the hub with its located error, a policy
//!   change refused to the system administrator, a push applied, one that breaks
//!   the uplink reverted by try mode and reported; heartbeats and offline
//!   marking; remote commands; audit export verified, a tampered one detected;
//! - the CA rotation of docs/operate.md, step by step.

mod common;
mod net;
mod process;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use net::*;
use nix::sys::signal::Signal;
use process::*;
use serde_json::Value;

/// A hub process with its operators' API and three accounts.
struct Hub {
    proc: Option<Proc>,
    config: PathBuf,
    quic: SocketAddr,
    ops: SocketAddr,
    publish: SocketAddr,
    dir: tempfile::TempDir,
    pki: std::sync::Arc<Pki>,
}

impl Hub {
    fn start(lifetime: &str) -> Hub {
        Hub::start_on(std::sync::Arc::new(Pki::new()), "hub-01", lifetime, None)
    }

    /// A hub `id` of the CA in `pki`; with `registry`, sharing that registry
    /// file (the accounts are made only when it does not exist yet).
    fn start_on(
        pki: std::sync::Arc<Pki>,
        id: &str,
        lifetime: &str,
        registry: Option<&Path>,
    ) -> Hub {
        pki.issue(id);
        let dir = tempfile::tempdir().expect("dir");
        let (quic, ops, publish) = (free_udp(), free_tcp("127.0.0.1"), free_tcp("127.0.0.1"));
        let spec = HubSpec::new(id, 2, &["edge-a/echo"]);
        let text = hub_toml(
            &pki,
            &spec,
            quic,
            &[publish],
            (free_tcp("127.0.0.1"), free_tcp("127.0.0.1")),
            &dir.path().join("state"),
        )
        .replacen(
            "[hub]\n",
            &format!(
                "[hub]\nops = \"{ops}\"\ncert_lifetime = \"{lifetime}\"\n{}",
                registry.map_or(String::new(), |r| format!(
                    "registry = \"{}\"\n",
                    r.display()
                ))
            ),
            1,
        );
        let fresh = registry.is_none_or(|r| !r.exists());
        let config = dir.path().join("hub.toml");
        std::fs::write(&config, text).expect("write");
        let accounts: &[(&str, &str)] = if fresh {
            &[("sam", "system"), ("sue", "security"), ("ada", "audit")]
        } else {
            &[]
        };
        for (name, role) in accounts.iter().copied() {
            let out = common::gatewayd(&[
                "accounts",
                "add",
                "--config",
                config.to_str().expect("path"),
                "--name",
                name,
                "--role",
                role,
                "--out",
                dir.path()
                    .join(format!("{name}.cred"))
                    .to_str()
                    .expect("path"),
            ]);
            assert_eq!(common::code(&out), 0, "{:?}", common::text(&out));
        }
        let mut hub = Hub {
            proc: None,
            config,
            quic,
            ops,
            publish,
            dir,
            pki,
        };
        hub.run();
        hub
    }

    fn run(&mut self) {
        let mut p = Proc::start(&self.config);
        p.wait_log("Running;");
        self.proc = Some(p);
    }

    fn wait_log(&mut self, needle: &str) {
        self.proc.as_mut().expect("running").wait_log(needle);
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal(Signal::SIGKILL);
            let _ = p.child.wait();
        }
    }

    /// Runs gatewayctl as `account`; (exit code, stdout, stderr).
    fn ctl(&self, account: &str, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
            .args(args)
            .env("GATEWAYCTL_HUB", self.ops.to_string())
            .env("GATEWAYCTL_CA", self.pki.ca().join("ca.pem"))
            .env(
                "GATEWAYCTL_CREDENTIALS",
                self.dir.path().join(format!("{account}.cred")),
            )
            .output()
            .expect("run gatewayctl");
        let (o, e) = common::text(&out);
        (out.status.code().unwrap_or(-1), o, e)
    }

    fn token(&self, device: &str) -> String {
        let (code, out, err) = self.ctl("sam", &["token", "create", "--device", device]);
        assert_eq!(code, 0, "{err}");
        out.trim().to_owned()
    }

    fn device(&self, id: &str) -> Value {
        let (code, out, err) = self.ctl("sam", &["devices", "show", id, "--format", "json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).expect("json")
    }

    /// Writes `text` to a file and pushes it to edge-a as `account`.
    fn push(&self, account: &str, text: &str) -> (i32, String, String) {
        let file = tempfile::NamedTempFile::new_in(self.dir.path()).expect("file");
        std::fs::write(file.path(), text).expect("write");
        self.ctl(
            account,
            &[
                "config",
                "push",
                "edge-a",
                file.path().to_str().expect("path"),
            ],
        )
    }

    /// Waits until edge-a's config status satisfies `ok`; returns it.
    fn wait_config(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        poll_blocking(what, Duration::from_secs(15), || {
            let s = self.config_status("edge-a");
            if ok(&s) { Ok(s) } else { Err(s.to_string()) }
        })
    }

    fn config_status(&self, id: &str) -> Value {
        let (code, out, err) = self.ctl("sue", &["config", "status", "--format", "json"]);
        assert_eq!(code, 0, "{err}");
        let all: Value = serde_json::from_str(&out).expect("json");
        all.as_array()
            .into_iter()
            .flatten()
            .find(|d| d["id"] == id)
            .cloned()
            .unwrap_or(Value::Null)
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An edge's config whose certificate and key live in its state directory
/// (they come from enrollment), with a published echo service.
fn edge_config(hub: &Hub, id: &str, echo: SocketAddr, extra_uplink: &str) -> (PathBuf, PathBuf) {
    let dir = hub.dir.path().join(id);
    std::fs::create_dir_all(&dir).expect("dir");
    let state = dir.join("state");
    let mut spec = EdgeSpec::new(id, 1, 2, vec![hub.quic]);
    spec.cert = Some((
        hub.pki.ca().join("ca.pem"),
        state.join("device.pem"),
        state.join("device.key"),
    ));
    spec.services = vec![("echo", echo, "\"extranet\"", None, None)];
    let text = edge_toml(&hub.pki, &spec, &[], free_tcp("127.0.0.1"), &state).replacen(
        "[uplink]\n",
        &format!("[uplink]\nheartbeat = \"1s\"\n{extra_uplink}"),
        1,
    );
    let path = dir.join("edge.toml");
    std::fs::write(&path, text).expect("write");
    (path, state)
}

fn enroll(config: &Path, token: &str) -> (i32, String) {
    let out = common::gatewayd(&[
        "enroll",
        "--config",
        config.to_str().expect("path"),
        "--token",
        token,
    ]);
    let (o, e) = common::text(&out);
    (common::code(&out), format!("{o}{e}"))
}

/// A legacy echo server on the edge's legacy network.
fn echo_server(ip: &str) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut s = s;
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

fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).expect("write");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).expect("echo");
    assert_eq!(back, msg);
}

/// Waits for the hub's audit to hold an `event` about edge-a (the writer
/// commits in batches).
fn wait_audit(hub: &Hub, event: &str) {
    poll_blocking(event, Duration::from_secs(5), || {
        let audit = audit_lines(&hub.dir.path().join("state"));
        if audit
            .iter()
            .any(|l| l.contains(event) && l.contains("edge-a"))
        {
            Ok(())
        } else {
            Err(audit.join("\n"))
        }
    });
}

/// The relayed connection ends (EOF or reset) within 5 s.
fn assert_cut_within_5s(client: &mut TcpStream, what: &str) {
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e)
            if e.kind() != std::io::ErrorKind::WouldBlock
                && e.kind() != std::io::ErrorKind::TimedOut => {}
        other => panic!("{what} outlived the revocation by 5 s: {other:?}"),
    }
}

fn not_after(cert: &Path) -> i64 {
    gateway_daemon::tunnel::pki::validity(&std::fs::read_to_string(cert).expect("cert"))
        .expect("validity")
        .1
}

#[test]
fn enrollment_renewal_revocation_and_roles() {
    let mut hub = Hub::start("6s");
    let echo = echo_server("127.0.1.1");
    let (config, state) = edge_config(&hub, "edge-a", echo, "");

    // Before enrollment the box does not start, and says what to do.
    let (code, lines) = Proc::start(&config).wait_exit();
    assert_eq!(code, 71, "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("gatewayd enroll --config")),
        "{lines:#?}"
    );

    // A token for another id, then the right one, then the same one again.
    let other = hub.token("edge-b");
    let (code, out) = enroll(&config, &other);
    assert_eq!(code, 77, "{out}");
    assert!(out.contains("issued for edge-b, not for edge-a"), "{out}");
    let token = hub.token("edge-a");
    let (code, out) = enroll(&config, &token);
    assert_eq!(code, 0, "{out}");
    let key_mode = std::fs::metadata(state.join("device.key"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .expect("key");
    assert_eq!(key_mode, 0o600);
    let (code, out) = enroll(&config, &token);
    assert_eq!(code, 77, "{out}");
    assert!(out.contains("used already"), "{out}");
    let first_expiry = not_after(&state.join("device.pem"));
    let first_cert = std::fs::read(state.join("device.pem")).expect("first certificate");

    // The enrolled edge connects and its service is reachable.
    let mut edge = Proc::start(&config);
    edge.wait_log("Tunnel up");
    let mut client = TcpStream::connect(hub.publish).expect("publish");
    round_trip(&mut client, b"hello through the hub");

    // Renewal over the tunnel at two thirds of the 6 s lifetime.
    edge.wait_log("Certificate renewed");
    let renewed_expiry = not_after(&state.join("device.pem"));
    assert!(
        renewed_expiry > first_expiry,
        "{renewed_expiry} > {first_expiry}"
    );
    // After the first certificate expired, a restarted hub accepts the renewed one.
    poll_blocking(
        "the first certificate to expire",
        Duration::from_secs(10),
        || {
            if gateway_daemon::node::clock::now_ms() > first_expiry + 1_000 {
                Ok(())
            } else {
                Err("not yet".into())
            }
        },
    );
    hub.kill();
    hub.run();
    edge.wait_next_log("Tunnel up");
    let mut client = TcpStream::connect(hub.publish).expect("publish");
    round_trip(&mut client, b"after the hub restarted");
    let d = hub.device("edge-a");
    assert!(
        d["cert_not_after_ms"].as_i64().unwrap_or(0) > first_expiry,
        "{d}"
    );

    // Power lost during a renewal, between installing the new key and its
    // certificate: the new key is in place, the old certificate too, the new
    // one staged. The next start finishes the renewal instead of failing.
    edge.signal(Signal::SIGKILL);
    std::fs::rename(state.join("device.pem"), state.join("device.pem.next")).expect("stage");
    std::fs::write(state.join("device.pem"), &first_cert).expect("old certificate");
    let mut edge = Proc::start(&config);
    edge.wait_log("installed the renewed certificate staged before a crash");
    edge.wait_log("Tunnel up");
    // Every relay goes to the new process at once, none to the killed one's
    // connections (alive to QUIC until their idle timeout: the hub pings them).
    for i in 0..6 {
        let mut client = TcpStream::connect(hub.publish).expect("publish");
        round_trip(
            &mut client,
            format!("after a crash mid-renewal, relay {i}").as_bytes(),
        );
    }
    hub.wait_log("does not answer; closing it");
    let mut client = TcpStream::connect(hub.publish).expect("publish");
    round_trip(&mut client, b"a relay kept open");

    // Each role is refused what it may not do.
    for (account, args) in [
        ("sam", vec!["revoke", "edge-a"]),
        ("ada", vec!["devices", "list"]),
        ("sue", vec!["token", "create", "--device", "edge-c"]),
        ("sam", vec!["audit", "export", "--device", "edge-a"]),
        ("ada", vec!["command", "edge-a", "reconnect"]),
    ] {
        let (code, _, err) = hub.ctl(account, &args);
        assert_eq!(code, 77, "{account} {args:?}: {err}");
        assert!(err.contains("may not"), "{err}");
    }

    // Revocation drops the live relay and refuses the device from then on.
    round_trip(&mut client, b"still up");
    let (code, out, err) = hub.ctl("sue", &["revoke", "edge-a"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked"), "{out}");
    assert_cut_within_5s(&mut client, "the relay");
    edge.wait_next_log("revoked");
    assert_eq!(hub.device("edge-a")["state"], "revoked");
    let refused = TcpStream::connect(hub.publish).and_then(|mut c| {
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"x")?;
        let mut b = [0u8; 1];
        c.read(&mut b)
    });
    assert!(matches!(refused, Ok(0) | Err(_)), "{refused:?}");
    // No new token for a revoked device.
    let (code, _, err) = hub.ctl("sam", &["token", "create", "--device", "edge-a"]);
    assert_ne!(code, 0);
    assert!(err.contains("revoked"), "{err}");
    // The hub's own audit holds the operators' actions with their accounts.
    poll_blocking(
        "the operators' actions in the hub's audit",
        Duration::from_secs(5),
        || {
            let audit = audit_lines(&hub.dir.path().join("state"));
            let revoked = audit
                .iter()
                .any(|l| l.contains("sue") && l.contains("device.revoke"));
            let refused = audit
                .iter()
                .any(|l| l.contains("sam") && l.contains("admin.revoke") && l.contains("deny"));
            if revoked && refused {
                Ok(())
            } else {
                Err(audit.join("\n"))
            }
        },
    );
    edge.signal(Signal::SIGKILL);
}

#[test]
fn config_push_try_mode_status_commands_and_audit() {
    let hub = Hub::start("1h");
    let echo = echo_server("127.0.1.1");
    let (config, state) = edge_config(&hub, "edge-a", echo, "config_try = \"3s\"\n");
    let (code, out) = enroll(&config, &hub.token("edge-a"));
    assert_eq!(code, 0, "{out}");
    let mut edge = Proc::start(&config);
    edge.wait_log("Tunnel up");
    let base = std::fs::read_to_string(&config).expect("config");

    // Heartbeats reach the hub.
    let d = poll_blocking("a heartbeat", Duration::from_secs(10), || {
        let d = hub.device("edge-a");
        if d["state"] == "online" && d["status"]["version"].is_string() {
            Ok(d)
        } else {
            Err(d.to_string())
        }
    });
    assert_eq!(d["status"]["assessments"][0][0], "lab", "{d}");
    let (code, table, _) = hub.ctl("sam", &["devices", "list"]);
    assert_eq!(code, 0);
    assert!(
        table.contains("edge-a") && table.contains("online"),
        "{table}"
    );

    // A bad file is refused at the hub with its located error.
    let (code, _, err) = hub.push("sam", &base.replacen("level = 2", "level = 7", 1));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("edge-a.toml:") && err.contains("protection level"),
        "{err}"
    );
    // A policy change is not the system administrator's.
    let allow_more = |t: &str| t.replace("\"extranet\"]\n", "\"extranet\", \"edge-z\"]\n");
    let policy = allow_more(&base);
    let (code, _, err) = hub.push("sam", &policy);
    assert_eq!(code, 77, "{err}");
    assert!(err.contains("policy sections"), "{err}");
    // A good one (a non-policy change) is applied.
    let good_text = base.replacen("heartbeat = \"1s\"", "heartbeat = \"2s\"", 1);
    let (code, out, err) = hub.push("sam", &good_text);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("version 1"), "{out}");
    edge.wait_log("Pushed config applied");
    let s = hub.wait_config("version 1 applied", |s| {
        s["applied"] == 1 && s["result"]["outcome"] == "applied"
    });
    assert_eq!(s["desired"], 1);
    assert_eq!(
        std::fs::read_to_string(state.join("managed/config.toml")).expect("managed"),
        good_text
    );
    // Operators read what was pushed and what the box runs.
    for args in [
        vec!["config", "show", "edge-a"],
        vec!["config", "show", "edge-a", "--version", "1"],
        vec!["config", "show", "edge-a", "--applied"],
    ] {
        let (code, out, err) = hub.ctl("sue", &args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert_eq!(out, good_text, "{args:?}");
    }
    let (code, _, err) = hub.ctl("ada", &["config", "show", "edge-a"]);
    assert_eq!(code, 77, "{err}");
    // Over version 1 the first policy file also changes the heartbeat back:
    // not the security administrator's alone.
    let (code, _, err) = hub.push("sue", &policy);
    assert_eq!(code, 77, "{err}");
    assert!(err.contains("non-policy sections"), "{err}");
    // Her policy change on top of version 1 is applied.
    let policy2 = allow_more(&good_text);
    let (code, _, err) = hub.push("sue", &policy2);
    assert_eq!(code, 0, "{err}");
    edge.wait_next_log("Pushed config applied");

    // A change only a restart can make is refused by the box, which says so.
    let admin = hub_admin_of(&config);
    let restart = policy2.replace(&admin, &free_tcp("127.0.0.1").to_string());
    let (code, _, err) = hub.push("sam", &restart);
    assert_eq!(code, 0, "{err}");
    let s = hub.wait_config("version 3 refused by the box", |s| {
        s["result"]["outcome"] == "refused"
    });
    assert_eq!(s["applied"], 2, "{s}");
    assert!(
        s["result"]["errors"][0]
            .as_str()
            .unwrap_or("")
            .contains("admin.listen cannot change on reload"),
        "{s}"
    );

    // A config that cannot reach any hub is reverted by try mode and reported.
    let broken = policy2.replace(&hub.quic.to_string(), &free_udp().to_string());
    let (code, _, err) = hub.push("sam", &broken);
    assert_eq!(code, 0, "{err}");
    edge.wait_next_log("reverting to the last good config");
    let s = hub.wait_config("the revert reported", |s| {
        s["result"]["outcome"] == "reverted"
    });
    assert_eq!(
        (s["desired"].as_u64(), s["applied"].as_u64()),
        (Some(4), Some(2)),
        "{s}"
    );
    // The reverted version is not offered again.
    let (code, text, _) = hub.ctl("sam", &["config", "status"]);
    assert_eq!(code, 0);
    assert!(text.contains("reverted v4"), "{text}");

    // Remote commands.
    let (code, out, err) = hub.ctl("sam", &["command", "edge-a", "diagnostics"]);
    assert_eq!(code, 0, "{err}");
    let diag: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(diag["config_version"], 2, "{diag}");
    assert_eq!(diag["config_valid"], true);
    assert!(
        diag["metrics"]
            .as_str()
            .unwrap_or("")
            .contains("gateway_tunnel_up"),
        "{diag}"
    );
    assert!(diag["log"].as_array().is_some_and(|l| !l.is_empty()));
    let (code, _, err) = hub.ctl("sam", &["command", "edge-a", "reconnect"]);
    assert_eq!(code, 0, "{err}");
    edge.wait_next_log("Tunnel closed to reconnect");
    edge.wait_next_log("Tunnel up");

    // Audit collection: export, verify offline, a tampered export detected.
    let export = hub.dir.path().join("export.jsonl");
    let n = poll_blocking("audit collected", Duration::from_secs(10), || {
        let (code, _, err) = hub.ctl(
            "ada",
            &[
                "audit",
                "export",
                "--device",
                "edge-a",
                "--since",
                "2020-01-01",
                "--out",
                export.to_str().expect("p"),
            ],
        );
        let text = std::fs::read_to_string(&export).unwrap_or_default();
        let n = text.lines().count();
        if code == 0 && text.contains("config.push") {
            Ok(n)
        } else {
            Err(format!("{code} {err} {n}"))
        }
    });
    assert!(n > 5, "{n}");
    let ca = hub.pki.ca().join("ca.pem");
    let verify = |f: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
            .args([
                "audit",
                "verify",
                f.to_str().expect("p"),
                "--ca",
                ca.to_str().expect("p"),
            ])
            .output()
            .expect("verify");
        (out.status.code().unwrap_or(-1), common::text(&out).0)
    };
    let (code, out) = verify(&export);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("intact") && out.contains("signed by hub hub-01"),
        "{out}"
    );
    // Re-hashing an edited record and the head keeps the chain consistent; the
    // hub's signature over the head does not follow.
    let text = std::fs::read_to_string(&export).expect("export");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let last = lines.len() - 1;
    let mut record: gateway_core::audit::Record =
        serde_json::from_str(&lines[last]).expect("record");
    record.event.detail = "nothing happened".into();
    record = gateway_core::audit::Record::chain(record.seq, record.event, record.prev_hash);
    lines[last] = serde_json::to_string(&record).expect("json");
    let mut header = gateway_core::fleet::export_header(&text).expect("header");
    header.head_hash = gateway_core::audit::to_hex(&record.hash);
    lines[0] = serde_json::to_string(&header).expect("json");
    let forged = hub.dir.path().join("forged.jsonl");
    std::fs::write(&forged, lines.join("\n")).expect("write");
    let (code, out) = verify(&forged);
    assert_eq!(code, 65, "{out}");
    assert!(out.contains("signature does not match"), "{out}");
    let text = std::fs::read_to_string(&export).expect("export");
    let tampered = hub.dir.path().join("tampered.jsonl");
    std::fs::write(
        &tampered,
        text.replacen("\"outcome\":\"ok\"", "\"outcome\":\"deny\"", 1),
    )
    .expect("write");
    let (code, out) = verify(&tampered);
    assert_eq!(code, 65, "{out}");
    assert!(out.contains("does not match its hash"), "{out}");
    let mut lines: Vec<&str> = text.lines().collect();
    lines.remove(3);
    std::fs::write(&tampered, lines.join("\n")).expect("write");
    let (code, out) = verify(&tampered);
    assert_eq!(code, 65, "{out}");

    // Three missed heartbeats: offline.
    edge.signal(Signal::SIGKILL);
    let _ = edge.child.wait();
    poll_blocking("the device marked offline", Duration::from_secs(20), || {
        let d = hub.device("edge-a");
        if d["state"] == "offline" {
            Ok(())
        } else {
            Err(d["state"].to_string())
        }
    });
}

#[test]
fn hubs_sharing_a_registry_cut_a_device_revoked_at_either() {
    let pki = std::sync::Arc::new(Pki::new());
    let shared = tempfile::tempdir().expect("dir");
    let registry = shared.path().join("fleet.sqlite");
    let hub1 = Hub::start_on(pki.clone(), "hub-01", "1h", Some(&registry));
    let mut hub2 = Hub::start_on(pki, "hub-02", "1h", Some(&registry));
    let echo = echo_server("127.0.1.1");
    let (config, _state) = edge_config(&hub1, "edge-a", echo, "");
    let text = std::fs::read_to_string(&config).expect("config").replace(
        &format!("\"{}\"]", hub1.quic),
        &format!("\"{}\", \"{}\"]", hub1.quic, hub2.quic),
    );
    std::fs::write(&config, text).expect("write");
    let (code, out) = enroll(&config, &hub1.token("edge-a"));
    assert_eq!(code, 0, "{out}");
    let _edge = Proc::start(&config);
    // A relay through the second hub.
    hub2.wait_log("Edge connected");
    let mut client = TcpStream::connect(hub2.publish).expect("publish on hub-02");
    round_trip(&mut client, b"ping");
    // Both hubs collect the edge's audit into the one registry: still continuous.
    poll_blocking(
        "audit collected through both hubs",
        Duration::from_secs(10),
        || {
            let d = hub1.device("edge-a");
            if d["audit_head"].as_u64().unwrap_or(0) > 0 && d["audit_broken"].is_null() {
                Ok(())
            } else {
                Err(d.to_string())
            }
        },
    );
    // Revoked at the first hub: the second cuts its relay too.
    let (code, _, err) = hub1.ctl("sue", &["revoke", "edge-a"]);
    assert_eq!(code, 0, "{err}");
    assert_cut_within_5s(&mut client, "the relay through hub-02");
    wait_audit(&hub2, "device.revoke");
}

#[test]
fn an_edited_edge_audit_record_raises_the_alarm_at_the_hub() {
    let mut hub = Hub::start("1h");
    let echo = echo_server("127.0.1.1");
    let (config, state) = edge_config(&hub, "edge-a", echo, "");
    let (code, out) = enroll(&config, &hub.token("edge-a"));
    assert_eq!(code, 0, "{out}");
    let mut edge = Proc::start(&config);
    edge.wait_log("Tunnel up");
    let collected = poll_blocking("audit collected", Duration::from_secs(10), || {
        let d = hub.device("edge-a");
        d["audit_head"]
            .as_u64()
            .filter(|h| *h >= 2)
            .ok_or(d.to_string())
    });
    edge.signal(Signal::SIGTERM);
    let _ = edge.wait_exit();
    // While the box is down, someone with its disk edits a record the hub has
    // not collected yet (the stop's own records come after `collected`).
    let db = rusqlite::Connection::open(state.join("audit.sqlite")).expect("open");
    db.execute_batch(
        "DROP TRIGGER IF EXISTS audit_no_update; DROP TRIGGER IF EXISTS audit_no_delete;",
    )
    .expect("drop triggers");
    let n = db
        .execute(
            "UPDATE audit SET detail = 'nothing to see' WHERE seq = ?1",
            [collected as i64 + 1],
        )
        .expect("tamper");
    assert_eq!(n, 1);
    drop(db);
    let mut edge = Proc::start(&config);
    edge.wait_log("Tunnel up");
    // The hub logs the alarm once its registry and metric hold it.
    hub.wait_log("ALARM");
    let d = hub.device("edge-a");
    assert!(
        d["audit_broken"]
            .as_str()
            .unwrap_or("")
            .contains("does not match its hash"),
        "{d}"
    );
    let mut c = TcpStream::connect(hub_admin(&hub)).expect("admin");
    c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    c.read_to_string(&mut text).expect("metrics");
    assert!(
        text.contains("gateway_audit_chain_broken{device=\"edge-a\"} 1"),
        "{text}"
    );
    wait_audit(&hub, "audit.chain_broken");
    // The export says so, and verify refuses it.
    let export = hub.dir.path().join("broken.jsonl");
    let (code, _, err) = hub.ctl(
        "ada",
        &[
            "audit",
            "export",
            "--device",
            "edge-a",
            "--out",
            export.to_str().expect("p"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
        .args(["audit", "verify", export.to_str().expect("p")])
        .output()
        .expect("verify");
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stdout).contains("found this device's chain broken"));
    edge.signal(Signal::SIGKILL);
}

/// The hub's admin listener, from its config.
fn hub_admin(hub: &Hub) -> String {
    hub_admin_of(&hub.config)
}

/// `[admin].listen` of a config file.
fn hub_admin_of(config: &Path) -> String {
    let text = std::fs::read_to_string(config).expect("config");
    let admin = text.split("[admin]").nth(1).expect("[admin]");
    admin.split('"').nth(1).expect("listen").to_owned()
}

#[test]
fn enrollment_connections_without_a_certificate_are_bounded() {
    let hub = Hub::start("1h");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = gateway_daemon::tunnel::tls::enroll_client(&hub.pki.ca().join("ca.pem"))
            .expect("client");
        let endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        // One more silent enrollment connection than there are slots: exactly
        // one is closed at once, saying why; the others stay open until their
        // own timeout (10 s), longer than this test waits.
        let mut waiting = tokio::task::JoinSet::new();
        for _ in 0..=gateway_daemon::fleet::hub::MAX_ENROLLING {
            let c = endpoint
                .connect_with(client.clone(), hub.quic, "127.0.0.1")
                .expect("connect")
                .await
                .expect("handshake");
            waiting.spawn(async move {
                tokio::time::timeout(Duration::from_secs(5), c.closed())
                    .await
                    .ok()
                    .map(|why| why.to_string())
            });
        }
        let closed: Vec<String> = waiting.join_all().await.into_iter().flatten().collect();
        assert_eq!(closed.len(), 1, "{closed:?}");
        assert!(closed[0].contains("too many enrollments"), "{closed:?}");
    });
}

/// docs/operate.md, "Rotate the CA", step by step with real processes: the
/// box trusts a bundle, the hub signs with the new CA while accepting both,
/// the box renews onto the new CA, the hub takes a certificate from it, and
/// the old CA is dropped from both sides; the service is reachable after
/// every step (after the last only if the box's certificate and its trust
/// really moved to the new CA).
#[test]
fn the_ca_rotates_as_the_operators_guide_says() {
    let mut hub = Hub::start("6s");
    let echo = echo_server("127.0.1.1");
    let (config, _state) = edge_config(&hub, "edge-a", echo, "");
    // The box's own copy of the CA (the hub's file is not the box's).
    let old_ca = hub.pki.ca().join("ca.pem");
    let box_ca = hub.dir.path().join("edge-a").join("ca.pem");
    std::fs::copy(&old_ca, &box_ca).expect("box CA");
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text.replace(
        &format!("ca = \"{}\"", old_ca.display()),
        &format!("ca = \"{}\"", box_ca.display()),
    );
    assert!(text.contains(&box_ca.display().to_string()), "{text}");
    std::fs::write(&config, text).expect("write");
    let (code, out) = enroll(&config, &hub.token("edge-a"));
    assert_eq!(code, 0, "{out}");
    let mut edge = Proc::start(&config);
    edge.wait_log("Tunnel up");
    let relay = |hub: &Hub, what: &str| {
        let mut client = TcpStream::connect(hub.publish).expect("publish");
        round_trip(&mut client, what.as_bytes());
    };
    relay(&hub, "before the rotation");
    let pem = |p: &Path| std::fs::read_to_string(p).expect("pem");
    let path = |p: &Path| p.to_str().expect("path").to_owned();
    let gatewayd = |args: &[&str]| {
        let out = common::gatewayd(args);
        assert_eq!(common::code(&out), 0, "{args:?}: {:?}", common::text(&out));
    };

    // 1. A new CA.
    let new_ca = hub.dir.path().join("ca-2027");
    gatewayd(&["pki", "init", "--out", &path(&new_ca)]);
    // 2. The box trusts the old and the new CA; it reads the bundle when it
    //    next renews.
    std::fs::write(&box_ca, pem(&old_ca) + &pem(&new_ca.join("ca.pem"))).expect("bundle");
    edge.wait_next_log("Certificate renewed");
    // 3. The hub checks against new + old and signs with the new key.
    let hub_bundle = hub.dir.path().join("ca-bundle.pem");
    std::fs::write(&hub_bundle, pem(&new_ca.join("ca.pem")) + &pem(&old_ca)).expect("bundle");
    let edit_hub = |hub: &Hub, from: String, to: String| {
        let text = std::fs::read_to_string(&hub.config).expect("hub config");
        assert!(text.contains(&from), "{from} not in {text}");
        std::fs::write(&hub.config, text.replace(&from, &to)).expect("write");
    };
    edit_hub(
        &hub,
        format!("ca_cert = \"{}\"", old_ca.display()),
        format!("ca_cert = \"{}\"", hub_bundle.display()),
    );
    edit_hub(
        &hub,
        format!("ca_key = \"{}\"", hub.pki.ca().join("ca.key").display()),
        format!("ca_key = \"{}\"", new_ca.join("ca.key").display()),
    );
    hub.kill();
    hub.run();
    edge.wait_next_log("Tunnel up");
    relay(&hub, "the hub trusts both CAs");
    //    The box renews onto the new CA.
    edge.wait_next_log("Certificate renewed");
    // 4. The hub's own certificate from the new CA.
    let hub_certs = hub.dir.path().join("hub-2027");
    gatewayd(&[
        "pki",
        "issue",
        "--ca",
        &path(&new_ca),
        "--id",
        "hub-01",
        "--san",
        "127.0.0.1",
        "--out",
        &path(&hub_certs),
    ]);
    let (old_cert, old_key) = hub.pki.issue("hub-01");
    edit_hub(
        &hub,
        format!("cert = \"{}\"", old_cert.display()),
        format!("cert = \"{}\"", hub_certs.join("hub-01.pem").display()),
    );
    edit_hub(
        &hub,
        format!("key = \"{}\"", old_key.display()),
        format!("key = \"{}\"", hub_certs.join("hub-01.key").display()),
    );
    hub.kill();
    hub.run();
    edge.wait_next_log("Tunnel up");
    relay(&hub, "the hub's certificate is from the new CA");
    // 5. The old CA leaves both bundles: the hub now refuses any certificate
    //    of the old CA, and the box trusts only the new one from its next
    //    renewal on.
    std::fs::write(&hub_bundle, pem(&new_ca.join("ca.pem"))).expect("new CA only");
    std::fs::write(&box_ca, pem(&new_ca.join("ca.pem"))).expect("new CA only");
    edge.wait_next_log("Certificate renewed");
    hub.kill();
    hub.run();
    edge.wait_next_log("Tunnel up");
    relay(&hub, "the old CA is gone");
    edge.signal(Signal::SIGKILL);
}
