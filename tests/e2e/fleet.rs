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
mod minisign_signer;
mod net;
mod process;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gateway_store::postgres::cluster::{self, Cluster};
use minisign_signer::Signer;
use net::*;
use nix::sys::signal::Signal;
use process::*;
use serde_json::Value;

/// Where a test hub keeps its state.
#[derive(Clone, Copy)]
enum Shared<'a> {
    /// Its own SQLite files.
    No,
    /// A registry file shared with other hubs.
    Sqlite(&'a Path),
    /// A database of a PostgreSQL cluster shared with other hubs; `true` for
    /// the first hub (it makes the accounts).
    Postgres(&'a Cluster, bool),
}

/// A hub process with its operators' API and three accounts.
struct Hub {
    proc: Option<Proc>,
    config: PathBuf,
    quic: SocketAddr,
    ops: SocketAddr,
    /// The consumers' API.
    api: SocketAddr,
    publish: SocketAddr,
    dir: tempfile::TempDir,
    pki: std::sync::Arc<Pki>,
}

impl Hub {
    fn start(lifetime: &str) -> Hub {
        Hub::start_on(
            std::sync::Arc::new(Pki::new()),
            "hub-01",
            lifetime,
            Shared::No,
        )
    }

    /// A hub `id` of the CA in `pki`, keeping its state as `shared` says (the
    /// accounts are made only by the first hub of a shared store).
    fn start_on(pki: std::sync::Arc<Pki>, id: &str, lifetime: &str, shared: Shared<'_>) -> Hub {
        pki.issue(id);
        let dir = tempfile::tempdir().expect("dir");
        let (quic, ops, publish) = (free_udp(), free_tcp("127.0.0.1"), free_tcp("127.0.0.1"));
        let api = free_tcp("127.0.0.1");
        let state = dir.path().join("state");
        // With every hub on PostgreSQL, hubs that would share a registry
        // file share a database (one per state directory otherwise).
        let pg_shared = match shared {
            Shared::Sqlite(r) if pg_mode() => Some(pg_for(r)),
            Shared::No if pg_mode() => Some(pg_for(&state)),
            _ => None,
        };
        let postgres = match (shared, &pg_shared) {
            (Shared::Postgres(c, _), _) => Some((c, "hubs")),
            (_, Some((c, db, _))) => Some((*c, db.as_str())),
            _ => None,
        };
        // Several tests flood the hub from loopback on purpose.
        let spec = HubSpec {
            extra: LOOPBACK_NEVER_BANNED,
            postgres,
            ..HubSpec::new(id, 2, &["edge-a/echo"])
        };
        let text = hub_toml(
            &pki,
            &spec,
            quic,
            &[publish],
            (free_tcp("127.0.0.1"), api),
            &state,
        )
        .replacen(
            "[hub]\n",
            &format!(
                "[hub]\nops = \"{ops}\"\ncert_lifetime = \"{lifetime}\"\n{}",
                match shared {
                    Shared::Sqlite(r) if !pg_mode() => format!("registry = \"{}\"\n", r.display()),
                    _ => String::new(),
                }
            ),
            1,
        );
        let fresh = match (shared, &pg_shared) {
            (Shared::Postgres(_, first), _) => first,
            (_, Some((_, _, fresh))) => *fresh,
            (Shared::Sqlite(r), None) => !r.exists(),
            _ => true,
        };
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
            api,
            publish,
            dir,
            pki,
        };
        hub.run();
        hub
    }

    /// Restarts the hub trusting `signer` for firmware bundles.
    fn trust_firmware(&mut self, signer: &Signer) {
        let key = self.dir.path().join("firmware.pub");
        std::fs::write(&key, signer.public_file()).expect("key");
        self.kill();
        let text = std::fs::read_to_string(&self.config).expect("config");
        let text = text.replacen(
            "[hub]\n",
            &format!("[hub]\nfirmware_keys = [\"{}\"]\n", key.display()),
            1,
        );
        std::fs::write(&self.config, text).expect("config");
        self.run();
    }

    fn run(&mut self) {
        let mut p = Proc::start(&self.config);
        p.wait_log("Running;");
        self.proc = Some(p);
    }

    fn wait_log(&mut self, needle: &str) {
        self.proc.as_mut().expect("running").wait_log(needle);
    }

    fn wait_next_log(&mut self, needle: &str) {
        self.proc.as_mut().expect("running").wait_next_log(needle);
    }

    /// The hub's log so far, for a failure message.
    fn log_so_far(&mut self) -> String {
        self.proc.as_mut().map(Proc::log_so_far).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal(Signal::SIGKILL);
            let _ = p.child.wait();
        }
    }

    /// Runs gatewayctl as `account`; (exit code, stdout, stderr).
    fn ctl(&self, account: &str, args: &[&str]) -> (i32, String, String) {
        self.ctl_trusting(&self.pki.ca().join("ca.pem"), account, args)
    }

    /// [`Hub::ctl`] checking the hub against `ca` (after a CA rotation).
    fn ctl_trusting(&self, ca: &Path, account: &str, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
            .args(args)
            .env("GATEWAYCTL_HUB", self.ops.to_string())
            .env("GATEWAYCTL_CA", ca)
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
        self.push_with(account, text, &[])
    }

    /// [`Hub::push`] with more `config push` arguments.
    fn push_with(&self, account: &str, text: &str, extra: &[&str]) -> (i32, String, String) {
        let file = tempfile::Builder::new()
            .prefix("pushed-")
            .suffix(".toml")
            .tempfile_in(self.dir.path())
            .expect("file");
        std::fs::write(file.path(), text).expect("write");
        let mut args = vec![
            "config",
            "push",
            "edge-a",
            file.path().to_str().expect("path"),
        ];
        args.extend_from_slice(extra);
        self.ctl(account, &args)
    }

    /// Waits until edge-a's config status satisfies `ok`; returns it.
    fn wait_config(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        poll_blocking(what, Duration::from_secs(15), || {
            let s = self.config_status("edge-a");
            if ok(&s) { Ok(s) } else { Err(s.to_string()) }
        })
    }

    /// Waits until `id`'s config status satisfies `ok`.
    fn wait_config_of(&self, id: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        poll_blocking(what, Duration::from_secs(90), || {
            let s = self.config_status(id);
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
    // The hub's own certificate (30 days here): its expiry on /metrics, and
    // a warning at start since it is under 30 days.
    let (hub_cert, _) = hub.pki.issue("hub-01");
    let metrics = admin_get(&hub, "/metrics");
    assert!(
        metrics.contains(&format!(
            "gateway_cert_expiry_timestamp_seconds {}",
            not_after(&hub_cert).div_euclid(1000)
        )),
        "{metrics}"
    );
    hub.wait_log("The hub's certificate expires in");
    let echo = echo_server("127.0.1.1");
    let (config, state) = edge_config(&hub, "edge-a", echo, "");

    // Before enrollment the box does not start, and says what to do.
    let (code, lines) = Proc::start(&config).wait_exit();
    assert_eq!(code, 66, "{lines:#?}");
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
    // The edge renews every few seconds, so the kill itself may land inside a
    // renewal: a staged certificate is then that very case, left as it is; a
    // key staged alone is what the next start would discard, so it goes before
    // the crash is staged by hand.
    edge.signal(Signal::SIGKILL);
    let _ = edge.wait_exit();
    if !state.join("device.pem.next").exists() {
        let _ = std::fs::remove_file(state.join("device.key.next"));
        std::fs::rename(state.join("device.pem"), state.join("device.pem.next")).expect("stage");
        std::fs::write(state.join("device.pem"), &first_cert).expect("old certificate");
    }
    let mut edge = Proc::start(&config);
    edge.wait_log("staged before a crash");
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
    edge.wait_next_log("The hub revoked this device");
    let revoked_at = edge.log_so_far().lines().count();
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
            let refused = audit.iter().any(|l| {
                l.contains("sam") && l.contains("admin.device.revoke") && l.contains("deny")
            });
            if revoked && refused {
                Ok(())
            } else {
                Err(audit.join("\n"))
            }
        },
    );
    // The revoked box says how to bring it back and does not retry: no
    // connect attempt since (the old box retried within 100 ms, forever).
    let log = edge.log_so_far();
    let since: Vec<&str> = log.lines().skip(revoked_at).collect();
    assert!(
        log.contains("gatewayctl token create --device ID --replace")
            && !since.iter().any(|l| l.contains("Tunnel connect failed")),
        "{}",
        since.join("\n")
    );
    edge.signal(Signal::SIGKILL);
    let _ = edge.wait_exit();
    // The security administrator brings the revoked id back on a replacing
    // token; the box enrolls again and its tunnel comes up.
    let (code, _, err) = hub.ctl(
        "sam",
        &["token", "create", "--device", "edge-a", "--replace"],
    );
    assert_ne!(code, 0, "the system administrator may not: {err}");
    let (code, token, err) = hub.ctl(
        "sue",
        &["token", "create", "--device", "edge-a", "--replace"],
    );
    assert_eq!(code, 0, "{err}");
    let (code, out) = enroll(&config, token.trim());
    assert_eq!(code, 0, "{out}");
    let mut back = Proc::start(&config);
    back.wait_log("Tunnel up");
    assert_ne!(hub.device("edge-a")["state"], "revoked");
    let audit = audit_lines(&hub.dir.path().join("state"));
    assert!(
        audit
            .iter()
            .any(|l| l.contains("sue") && l.contains("token.create") && l.contains("replace=true")),
        "{}",
        audit.join("\n")
    );
    back.signal(Signal::SIGKILL);
}

#[test]
fn config_push_try_mode_status_commands_and_audit() {
    let mut hub = Hub::start("1h");
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
    // Located in the file the operator pushed, not one the hub made up.
    assert!(
        err.contains("pushed-") && err.contains(".toml:") && err.contains("protection level"),
        "{err}"
    );
    assert!(!err.contains("edge-a.toml"), "{err}");
    // A policy change is not the system administrator's, and the refusal
    // names the key that made it policy.
    let allow_more = |t: &str| t.replace("\"extranet\"]\n", "\"extranet\", \"edge-z\"]\n");
    let policy = allow_more(&base);
    let (code, _, err) = hub.push("sam", &policy);
    assert_eq!(code, 77, "{err}");
    assert!(
        err.contains("policy keys (service[")
            && err.contains("].allow")
            && err.contains("security administrator's"),
        "{err}"
    );
    // The audit administrator is told whose each half is.
    let (code, _, err) = hub.push("ada", &policy);
    assert_eq!(code, 77, "{err}");
    assert!(
        err.contains("policy sections is the security administrator's")
            && err.contains("others the system administrator's"),
        "{err}"
    );
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
    assert!(err.contains("non-policy keys (uplink.heartbeat)"), "{err}");
    // Her policy change on top of version 1 is applied.
    let policy2 = allow_more(&good_text);
    let (code, _, err) = hub.push("sue", &policy2);
    assert_eq!(code, 0, "{err}");
    edge.wait_next_log("Pushed config applied");

    // A change only a restart can make is refused by the hub unless the push
    // says --restart (a_push_with_restart_restarts_the_box_and_reverts_by_restarting
    // follows one through).
    let admin = hub_admin_of(&config);
    let restart = policy2.replace(&admin, &free_tcp("127.0.0.1").to_string());
    let (code, _, err) = hub.push("sam", &restart);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("the change to admin.listen takes a restart of the box")
            && err.contains("--restart"),
        "{err}"
    );
    assert_eq!(hub.config_status("edge-a")["desired"], 2);

    // A config that cannot reach any hub is reverted by try mode and reported
    // (the uplink's hubs are policy: the security administrator pushes it).
    let broken = policy2.replace(&hub.quic.to_string(), &free_udp().to_string());
    let (code, _, err) = hub.push("sam", &broken);
    assert_ne!(
        code, 0,
        "the system administrator may not move the uplink: {err}"
    );
    let (code, _, err) = hub.push("sue", &broken);
    assert_eq!(code, 0, "{err}");
    edge.wait_next_log("reverting to the last good config");
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        hub.wait_config("the revert reported", |s| {
            s["result"]["outcome"] == "reverted"
        })
    }));
    let s = match waited {
        Ok(s) => s,
        Err(panic) => {
            eprintln!("the box's log:\n{}", edge.log_so_far());
            eprintln!("the hub's log:\n{}", hub.log_so_far());
            std::panic::resume_unwind(panic);
        }
    };
    assert_eq!(
        (s["desired"].as_u64(), s["applied"].as_u64()),
        (Some(3), Some(2)),
        "{s}"
    );
    // The reverted version is not offered again.
    let (code, text, _) = hub.ctl("sam", &["config", "status"]);
    assert_eq!(code, 0);
    assert!(text.contains("reverted v3"), "{text}");

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
    // Without the CA it says what it could not check, and exits 3 unless told
    // an unsigned check will do.
    let unsigned = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
            .args(["audit", "verify", export.to_str().expect("p")])
            .args(extra)
            .env_remove("GATEWAYCTL_CA")
            .output()
            .expect("verify");
        (out.status.code().unwrap_or(-1), common::text(&out).0)
    };
    let (code, out) = unsigned(&[]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.starts_with("UNSIGNED") && out.contains("cut off") && out.contains("--ca"),
        "{out}"
    );
    let (code, out) = unsigned(&["--unsigned-ok"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("intact as far as checked"), "{out}");
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

/// Answers `GET /healthz` on an admin address, or why not.
fn healthz(admin: &str) -> Result<String, String> {
    let mut c = TcpStream::connect(admin).map_err(|e| e.to_string())?;
    c.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    c.read_to_string(&mut text).map_err(|e| e.to_string())?;
    Ok(text)
}

/// A restart-only key (admin.listen) pushed with --restart: the box stores it,
/// exits 75 as its unit restarts on, the next start runs it on trial and the
/// hub hears it applied; then one whose way back also needs a restart and
/// that cannot reach a hub: the box restarts onto the last good version and
/// reports the revert it kept on disk across the restart.
#[test]
fn a_push_with_restart_restarts_the_box_and_reverts_by_restarting() {
    let hub = Hub::start("1h");
    let echo = echo_server("127.0.1.1");
    let (config, state) = edge_config(&hub, "edge-a", echo, "config_try = \"3s\"\n");
    let (code, out) = enroll(&config, &hub.token("edge-a"));
    assert_eq!(code, 0, "{out}");
    let mut edge = Proc::start(&config);
    edge.wait_log("Tunnel up");
    hub.wait_config("the box's config seen", |s| s["applied"] == 0);
    let base = std::fs::read_to_string(&config).expect("config");
    let old_admin = hub_admin_of(&config);
    let new_admin = free_tcp("127.0.0.1").to_string();
    let moved = base.replace(&old_admin, &new_admin);

    // Without --restart: refused at the hub, nothing stored.
    let (code, _, err) = hub.push("sam", &moved);
    assert_ne!(code, 0);
    assert!(err.contains("admin.listen takes a restart"), "{err}");
    // With it: the box stores it, says so and exits 75.
    let (code, out, err) = hub.push_with("sam", &moved, &["--restart"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("restarts itself"), "{out}");
    edge.wait_log("restarting to apply it");
    let (code, log) = edge.wait_exit();
    assert_eq!(code, 75, "{}", log.join("\n"));
    assert_eq!(
        gateway_daemon::fleet::pushed_config::load_managed(&state).map(|m| (m.0, m.2)),
        Some((1, true)),
        "stored on trial"
    );
    // What systemd does on 75 (Restart=on-failure): start it again.
    let mut edge = Proc::start(&config);
    edge.wait_log("Pushed config confirmed");
    let s = hub.wait_config("version 1 applied", |s| {
        s["applied"] == 1 && s["result"]["outcome"] == "applied"
    });
    assert_eq!(s["desired"], 1, "{s}");
    let answer = healthz(&new_admin).expect("the new admin.listen answers");
    assert!(
        answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
        "{answer}"
    );
    assert!(
        healthz(&old_admin).is_err(),
        "the old admin.listen is closed"
    );

    // Version 2 moves admin.listen again and its uplink CA to one the hub's
    // certificate is not from: no hub within config_try. The way back to
    // version 1 moves admin.listen too, so the box restarts again.
    let other_ca = hub.dir.path().join("other-ca");
    let out = common::gatewayd(&["pki", "init", "--out", other_ca.to_str().expect("p")]);
    assert_eq!(common::code(&out), 0, "{:?}", common::text(&out));
    let third_admin = free_tcp("127.0.0.1").to_string();
    let broken = moved.replace(&new_admin, &third_admin).replace(
        hub.pki.ca().join("ca.pem").to_str().expect("p"),
        other_ca.join("ca.pem").to_str().expect("p"),
    );
    assert_ne!(
        broken,
        moved.replace(&new_admin, &third_admin),
        "the CA moved"
    );
    let (code, _, err) = hub.push_with("sam", &broken, &["--restart"]);
    assert_eq!(code, 0, "{err}");
    let (code, log) = edge.wait_exit();
    assert_eq!(code, 75, "{}", log.join("\n"));
    let mut edge = Proc::start(&config);
    edge.wait_log("Restarting to run the last good config");
    let (code, log) = edge.wait_exit();
    assert_eq!(code, 75, "{}", log.join("\n"));
    assert_eq!(
        gateway_daemon::fleet::pushed_config::load_managed(&state).map(|m| (m.0, m.2)),
        Some((1, false)),
        "back to version 1 on disk"
    );
    let mut edge = Proc::start(&config);
    edge.wait_log("Tunnel up");
    let s = hub.wait_config("the revert reported", |s| {
        s["result"]["outcome"] == "reverted"
    });
    assert_eq!(
        (s["desired"].as_u64(), s["applied"].as_u64()),
        (Some(2), Some(1)),
        "{s}"
    );
    assert!(
        s["result"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no hub was reachable")),
        "{s}"
    );
    assert!(
        healthz(&new_admin).is_ok(),
        "version 1's admin.listen again"
    );
    // Sent once: the kept report is gone.
    poll_blocking("the report forgotten", Duration::from_secs(10), || {
        if state.join("managed/report.json").exists() {
            Err("still there".to_owned())
        } else {
            Ok(())
        }
    });
    drop(edge);
}

#[test]
fn hubs_sharing_a_registry_cut_a_device_revoked_at_either() {
    let pki = std::sync::Arc::new(Pki::new());
    let shared = tempfile::tempdir().expect("dir");
    let registry = shared.path().join("fleet.sqlite");
    // Certificates of 9 s: renewed every 6 s or so, over either hub.
    let mut hub1 = Hub::start_on(pki.clone(), "hub-01", "9s", Shared::Sqlite(&registry));
    let mut hub2 = Hub::start_on(pki, "hub-02", "9s", Shared::Sqlite(&registry));
    let echo = echo_server("127.0.1.1");
    let (config, _state) = edge_config(&hub1, "edge-a", echo, "");
    let text = std::fs::read_to_string(&config).expect("config").replace(
        &format!("\"{}\"]", hub1.quic),
        &format!("\"{}\", \"{}\"]", hub1.quic, hub2.quic),
    );
    std::fs::write(&config, text).expect("write");
    let (code, out) = enroll(&config, &hub1.token("edge-a"));
    assert_eq!(code, 0, "{out}");
    let mut edge = Proc::start(&config);
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
    // Renewed over one hub's session at a time: the session with the other
    // hub sees the new certificate and does not renew it again (the fleet
    // simulator caught two sessions renewing at once, and boxes keeping the
    // certificate the registry had replaced: refused by every hub after).
    edge.wait_log("Certificate renewed");
    edge.wait_next_log("Certificate renewed");
    edge.wait_next_log("Certificate renewed");
    let log = edge.log_so_far();
    let asked: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("Renewing the device certificate"))
        .filter_map(|l| {
            // 2026-12-02T07:10:54.133181Z: seconds of the day.
            let (h, m, s) = (l.get(11..13)?, l.get(14..16)?, l.get(17..26)?);
            Some(
                h.parse::<f64>().ok()? * 3600.0
                    + m.parse::<f64>().ok()? * 60.0
                    + s.parse::<f64>().ok()?,
            )
        })
        .collect();
    assert!(asked.len() >= 3, "{log}");
    assert!(
        asked.windows(2).all(|w| w[1] - w[0] > 2.0),
        "one renewal per certificate, not one per hub: {asked:?}\n{log}"
    );
    // Both hubs take the newest certificate when the box reconnects.
    let (code, _, err) = hub1.ctl("sam", &["command", "edge-a", "reconnect"]);
    assert_eq!(code, 0, "{err}");
    hub1.wait_next_log("Edge connected");
    hub2.wait_next_log("Edge connected");
    for hub in [&mut hub1, &mut hub2] {
        let log = hub.log_so_far();
        assert!(!log.contains("superseded certificate"), "{log}");
    }
    // Through the second hub once the box's new tunnels are all up there.
    let mut fresh = poll_blocking(
        "a relay after the renewals",
        Duration::from_secs(10),
        || {
            let mut c = TcpStream::connect(hub2.publish).map_err(|e| e.to_string())?;
            c.write_all(b"after renewals").map_err(|e| e.to_string())?;
            let mut back = [0u8; 14];
            c.read_exact(&mut back).map_err(|e| e.to_string())?;
            if &back == b"after renewals" {
                Ok(c)
            } else {
                Err(format!("{back:?}"))
            }
        },
    );
    // Revoked at the first hub: the second cuts its relay too.
    let (code, _, err) = hub1.ctl("sue", &["revoke", "edge-a"]);
    assert_eq!(code, 0, "{err}");
    assert_cut_within_5s(&mut fresh, "the relay through hub-02");
    wait_audit(&hub2, "device.revoke");
}

/// Three hub processes on one PostgreSQL database: an edge enrolled with a
/// token made at the first hub and connected only to the second; a config
/// pushed at the first reaches it, the third sees what it applied; a
/// revocation at the third cuts its relay through the second within 5 s.
#[test]
fn three_hubs_on_one_postgres_share_tokens_pushes_and_revocations() {
    if let Some(why) = cluster::missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let pg = Cluster::start(false).expect("PostgreSQL");
    pg.create_database("hubs").expect("database");
    let pki = std::sync::Arc::new(Pki::new());
    let a = Hub::start_on(pki.clone(), "hub-01", "1h", Shared::Postgres(&pg, true));
    let mut b = Hub::start_on(pki.clone(), "hub-02", "1h", Shared::Postgres(&pg, false));
    let c = Hub::start_on(pki, "hub-03", "1h", Shared::Postgres(&pg, false));
    // The accounts made for the first hub are the others' too.
    for h in [&b, &c] {
        for who in ["sam", "sue", "ada"] {
            std::fs::copy(
                a.dir.path().join(format!("{who}.cred")),
                h.dir.path().join(format!("{who}.cred")),
            )
            .expect("credential");
        }
    }
    let echo = echo_server("127.0.1.1");
    let (config, state) = edge_config(&b, "edge-a", echo, "");
    let (code, out) = enroll(&config, &a.token("edge-a"));
    assert_eq!(code, 0, "enrolled at hub-02 with hub-01's token: {out}");
    let mut edge = Proc::start(&config);
    b.wait_log("Edge connected");
    let mut client = TcpStream::connect(b.publish).expect("publish on hub-02");
    round_trip(&mut client, b"ping");
    // Pushed at hub-01, offered by hub-02, seen applied at hub-03 (once the
    // box has reported its config through hub-02).
    a.wait_config("the box's config reported", |s| !s["applied"].is_null());
    let base = std::fs::read_to_string(&config).expect("config");
    let good = base.replacen("heartbeat = \"1s\"", "heartbeat = \"2s\"", 1);
    let (code, out, err) = a.push("sam", &good);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("version 1"), "{out}");
    edge.wait_log("Pushed config applied");
    c.wait_config("version 1 applied, seen at hub-03", |s| {
        s["applied"] == 1 && s["result"]["outcome"] == "applied"
    });
    assert_eq!(
        std::fs::read_to_string(state.join("managed/config.toml")).expect("managed"),
        good
    );
    // Revoked at hub-03: hub-02 cuts the relay and refuses the box.
    let (code, _, err) = c.ctl("sue", &["revoke", "edge-a"]);
    assert_eq!(code, 0, "{err}");
    assert_cut_within_5s(&mut client, "the relay through hub-02");
    wait_audit(&b, "device.revoke");
    // It all lives in the database, not in the hubs' state directories.
    assert_eq!(
        pg.sql(
            "hubs",
            "SELECT revoked_ms IS NOT NULL, (SELECT count(*) FROM config WHERE device = 'edge-a' AND version > 0) FROM device WHERE id = 'edge-a'"
        )
        .expect("sql"),
        "t|1"
    );
    for h in [&a, &b, &c] {
        assert!(!h.dir.path().join("state/fleet.sqlite").exists());
    }
    drop(edge);
}

/// Labels set at token creation and by `devices label`; selectors filtered
/// and paged at the hub; JSON and CSV; mistakes and roles refused.
#[test]
fn labels_and_selectors_pick_devices_at_the_hub() {
    let hub = Hub::start("1h");
    let ids = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["devices", "list", "--format", "json"];
        all.extend_from_slice(args);
        let (code, out, err) = hub.ctl("sam", &all);
        assert_eq!(code, 0, "{args:?}: {err}");
        let v: Value = serde_json::from_str(&out).expect("json");
        v.as_array()
            .expect("array")
            .iter()
            .map(|d| d["id"].as_str().expect("id").to_owned())
            .collect()
    };
    let (code, token, err) = hub.ctl(
        "sam",
        &[
            "token",
            "create",
            "--device",
            "edge-a",
            "--label",
            "city=changchun",
            "--label",
            "ring=canary",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (config, _) = edge_config(&hub, "edge-a", echo_server("127.0.1.1"), "");
    let (code, out) = enroll(&config, token.trim());
    assert_eq!(code, 0, "{out}");
    // Four more devices the registry knows (revoked ones are listed too).
    for d in ["dev-1", "dev-2", "dev-3", "dev-4"] {
        let (code, _, err) = hub.ctl("sue", &["revoke", d]);
        assert_eq!(code, 0, "{err}");
    }
    for (d, labels) in [
        ("dev-1", vec!["city=jilin"]),
        ("dev-2", vec!["city=changchun", "ring=main"]),
        ("dev-2", vec!["ring-"]),
    ] {
        let mut args = vec!["devices", "label", d];
        args.extend(labels);
        let (code, out, err) = hub.ctl("sam", &args);
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with(d), "{out}");
    }
    assert_eq!(ids(&["--selector", "city=changchun"]), ["dev-2", "edge-a"]);
    assert_eq!(
        ids(&["--selector", "city=changchun, ring=canary"]),
        ["edge-a"]
    );
    assert_eq!(
        ids(&["--selector", "city in (jilin,changchun),ring!=canary"]),
        ["dev-1", "dev-2"]
    );
    assert_eq!(ids(&["--selector", "!city"]), ["dev-3", "dev-4"]);
    assert_eq!(ids(&["--selector", "cert-expires<2h"]), ["edge-a"]);
    assert_eq!(ids(&["--selector", "state=never-seen"]), ["edge-a"]);
    // Paged at the hub, one device per request: all of them still.
    assert_eq!(
        ids(&["--selector", "state=revoked", "--page-size", "1"]),
        ["dev-1", "dev-2", "dev-3", "dev-4"]
    );
    let (code, csv, err) = hub.ctl(
        "sam",
        &["devices", "list", "--selector", "ring", "--format", "csv"],
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(lines[0].starts_with("id,state,labels,"), "{csv}");
    assert!(
        lines[1].starts_with("edge-a,never-seen,city=changchun;ring=canary,"),
        "{csv}"
    );
    // Mistakes, located; labels are the system administrator's.
    let (code, _, err) = hub.ctl(
        "sam",
        &["devices", "list", "--selector", "city=changchun ring=x"],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("selector") && err.contains("at byte 15"),
        "{err}"
    );
    let (code, _, err) = hub.ctl("sam", &["devices", "label", "dev-1", "State=x"]);
    assert_ne!(code, 0);
    assert!(err.contains("labels[0]"), "{err}");
    let (code, _, err) = hub.ctl("ada", &["devices", "label", "dev-1", "x=y"]);
    assert_eq!(code, 77, "{err}");
    wait_audit_line(&hub, "device.label");
}

/// One GET on the hub's admin listener; the body.
fn admin_get(hub: &Hub, path: &str) -> String {
    let mut c = TcpStream::connect(hub_admin(hub)).expect("admin");
    c.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .expect("request");
    let mut text = String::new();
    c.read_to_string(&mut text).expect("answer");
    text
}

/// PostgreSQL stopped under a running hub: relays go on (the open one and new
/// ones), operators' writes answer 503 and change nothing, an enrollment is
/// told to try again without using its token up, `/readyz` and
/// `gateway_store_up` say the store is down; a hub that starts meanwhile exits
/// with 69; a revoked box is still refused. Once PostgreSQL is back all of it
/// works again, the token included.
#[test]
fn a_hub_on_postgres_rides_out_its_database_going_away() {
    if let Some(why) = cluster::missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let pg = Cluster::start(true).expect("PostgreSQL");
    pg.create_database("hubs").expect("database");
    let mut hub = Hub::start_on(
        std::sync::Arc::new(Pki::new()),
        "hub-01",
        "1h",
        Shared::Postgres(&pg, true),
    );
    let echo = echo_server("127.0.1.1");
    let (config, _) = edge_config(&hub, "edge-a", echo, "");
    let (code, out) = enroll(&config, &hub.token("edge-a"));
    assert_eq!(code, 0, "{out}");
    let (config_z, _) = edge_config(&hub, "edge-z", echo_server("127.0.1.1"), "");
    let (code, out) = enroll(&config_z, &hub.token("edge-z"));
    assert_eq!(code, 0, "{out}");
    let (code, _, err) = hub.ctl("sue", &["revoke", "edge-z"]);
    assert_eq!(code, 0, "{err}");
    let (config_b, _) = edge_config(&hub, "edge-b", echo_server("127.0.1.1"), "");
    let token_b = hub.token("edge-b");
    let mut edge = Proc::start(&config);
    edge.wait_log("Tunnel up");
    let mut open = TcpStream::connect(hub.publish).expect("publish");
    round_trip(&mut open, b"before");
    // The box's audit collected so far (its tunnel and relay records).
    let head0 = poll_blocking("audit collected", Duration::from_secs(10), || {
        let h = hub.device("edge-a")["audit_head"].as_u64().unwrap_or(0);
        if h > 0 { Ok(h) } else { Err(h.to_string()) }
    });

    pg.stop_immediate();
    poll_blocking("the store reported down", Duration::from_secs(15), || {
        let m = admin_get(&hub, "/metrics");
        if m.contains("gateway_store_up{engine=\"postgres\"} 0") {
            Ok(())
        } else {
            Err(m)
        }
    });
    let ready = admin_get(&hub, "/readyz");
    assert!(
        ready.contains("degraded: the hub's store (PostgreSQL) does not answer"),
        "{ready}"
    );
    // Relays: the open one, and a new one.
    round_trip(&mut open, b"during");
    let mut fresh = TcpStream::connect(hub.publish).expect("publish");
    round_trip(&mut fresh, b"new during");
    // Closed: the box audits it now and ships it to a hub that cannot
    // store it.
    drop(fresh);
    // An operator's write: 503, the reason, nothing changed.
    let (code, _, err) = hub.ctl("sue", &["revoke", "edge-a"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("503") && err.contains("store is unavailable"),
        "{err}"
    );
    // An enrollment: told to try again.
    let (code, out) = enroll(&config_b, &token_b);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("try again"), "{out}");
    // The revoked box: still refused (this hub knows it is revoked).
    let mut z = Proc::start(&config_z);
    z.wait_log("revoked");
    z.signal(Signal::SIGTERM);
    let _ = z.wait_exit();
    // A hub starting now cannot reach its store: 69, and it says so.
    let (mut second, _) = (
        std::process::Command::new(env!("CARGO_BIN_EXE_gatewayd"))
            .args(["run", "--config"])
            .arg(&hub.config)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("second hub"),
        (),
    );
    let status = second.wait().expect("exit");
    let mut err = String::new();
    second
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    assert_eq!(status.code(), Some(69), "{err}");
    assert!(err.contains("PostgreSQL"), "{err}");

    pg.start_again().expect("PostgreSQL back");
    poll_blocking("the store back", Duration::from_secs(30), || {
        let r = admin_get(&hub, "/readyz");
        if r.contains("degraded") {
            Err(r)
        } else {
            Ok(())
        }
    });
    round_trip(&mut open, b"after");
    // What the box audited during the outage (the relay opened then, its
    // tunnel's records) reaches the hub once the store is back.
    poll_blocking(
        "the outage's audit collected",
        Duration::from_secs(20),
        || {
            let d = hub.device("edge-a");
            let h = d["audit_head"].as_u64().unwrap_or(0);
            if h > head0 && d["audit_broken"].is_null() {
                Ok(())
            } else {
                Err(d.to_string())
            }
        },
    );
    let (code, out) = enroll(&config_b, &token_b);
    assert_eq!(code, 0, "the token was not used up: {out}");
    let (code, _, err) = hub.ctl("sue", &["revoke", "edge-a"]);
    assert_eq!(code, 0, "{err}");
    assert_cut_within_5s(&mut open, "the relay of the box revoked after the outage");
    hub.wait_log("Device revoked");
    // What the box audited during the outage was collected once the store
    // was back, its chain whole: no false alarm of a break.
    let d = hub.device("edge-a");
    assert!(d["audit_broken"].is_null(), "{d}");
    let audit = audit_lines(&hub.dir.path().join("state"));
    assert!(
        !audit.iter().any(|l| l.contains("audit.chain_broken")),
        "{audit:?}"
    );
    drop(edge);
}

/// A single hub's SQLite state moved into PostgreSQL with `gatewayd hub
/// migrate-store`: the hub on PostgreSQL knows the accounts, the device, its
/// pushed config and its audit chain (exported and verified against the CA);
/// a second migration into the same database is refused.
#[test]
fn a_single_hub_moves_to_postgres_with_migrate_store() {
    if let Some(why) = cluster::missing() {
        eprintln!("skipped: {why}");
        return;
    }
    if pg_mode() {
        eprintln!("skipped: with GW_HUB_STORE=postgres there is no SQLite hub to move");
        return;
    }
    let mut old = Hub::start("1h");
    let echo = echo_server("127.0.1.1");
    let (config, _state) = edge_config(&old, "edge-a", echo, "");
    let (code, out) = enroll(&config, &old.token("edge-a"));
    assert_eq!(code, 0, "{out}");
    let mut edge = Proc::start(&config);
    edge.wait_log("Tunnel up");
    // A push needs the config the box reported when its session began.
    old.wait_config("the box's config reported", |s| !s["applied"].is_null());
    let base = std::fs::read_to_string(&config).expect("config");
    let (code, _, err) = old.push(
        "sam",
        &base.replacen("heartbeat = \"1s\"", "heartbeat = \"2s\"", 1),
    );
    assert_eq!(code, 0, "{err}");
    let head = poll_blocking("audit collected", Duration::from_secs(10), || {
        let d = old.device("edge-a");
        d["audit_head"]
            .as_u64()
            .filter(|h| *h >= 2)
            .ok_or(d.to_string())
    });
    edge.signal(Signal::SIGTERM);
    let _ = edge.wait_exit();
    old.kill();

    let pg = Cluster::start(false).expect("PostgreSQL");
    pg.create_database("hubs").expect("database");
    let text = on_postgres(
        &std::fs::read_to_string(&old.config).expect("config"),
        &pg,
        "hubs",
    )
    .replace(
        &old.dir.path().join("state").display().to_string(),
        &old.dir.path().join("state-pg").display().to_string(),
    );
    let pg_config = old.dir.path().join("hub-pg.toml");
    std::fs::write(&pg_config, text).expect("write");
    let from = old.dir.path().join("state");
    let migrate = |c: &Path| {
        let out = common::gatewayd(&[
            "hub",
            "migrate-store",
            "--config",
            c.to_str().expect("path"),
            "--from-sqlite",
            from.to_str().expect("path"),
        ]);
        let (o, e) = common::text(&out);
        (common::code(&out), o, e)
    };
    let (code, out, err) = migrate(&pg_config);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("audit chains: 1 verified"), "{out}");
    assert!(
        out.contains("account ") && out.contains("edge_audit "),
        "{out}"
    );
    let (code, _, err) = migrate(&pg_config);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not empty"), "{err}");
    // An SQLite hub's config is not a target.
    let (code, _, err) = migrate(&old.config);
    assert_eq!(code, 2, "{err}");

    // The hub on PostgreSQL: same accounts, same device, same chain.
    old.config = pg_config;
    old.run();
    let d = old.device("edge-a");
    assert_eq!(d["audit_head"].as_u64(), Some(head), "{d}");
    assert!(d["audit_broken"].is_null(), "{d}");
    let s = old.config_status("edge-a");
    assert_eq!(s["desired"], 1, "{s}");
    let export = old.dir.path().join("moved.jsonl");
    let (code, _, err) = old.ctl(
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
        .args(["audit", "verify", export.to_str().expect("p"), "--ca"])
        .arg(old.pki.ca().join("ca.pem"))
        .output()
        .expect("verify");
    let (o, e) = common::text(&out);
    assert_eq!(out.status.code(), Some(0), "{o}{e}");
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

/// Waits up to 15 s for a hub audit record containing `needle`.
fn wait_audit_line(hub: &Hub, needle: &str) {
    poll_blocking(needle, Duration::from_secs(15), || {
        let audit = audit_lines(&hub.dir.path().join("state"));
        if audit.iter().any(|l| l.contains(needle)) {
            Ok(())
        } else {
            Err(audit.join("\n"))
        }
    });
}

/// Size of the hub's audit database and its write-ahead log.
fn audit_bytes(hub: &Hub) -> u64 {
    let state = hub.dir.path().join("state");
    ["audit.sqlite", "audit.sqlite-wal"]
        .iter()
        .map(|f| std::fs::metadata(state.join(f)).map_or(0, |m| m.len()))
        .sum()
}

/// `n` requests to the operators' API, each with `credential` as its bearer,
/// on keep-alive TLS connections (a new one when the hub closes one); the
/// statuses.
async fn ops_requests(hub: &Hub, credential: &str, n: usize) -> Vec<u16> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let tls = gateway_daemon::tunnel::tls::ops_client(&hub.pki.ca().join("ca.pem")).expect("tls");
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(hub.ops)
            .await
            .expect("connect");
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .expect("handshake");
        tokio::io::BufReader::new(stream)
    };
    let request = format!(
        "GET /v1/whoami HTTP/1.1\r\nhost: hub\r\nauthorization: Bearer {credential}\r\n\r\n"
    );
    let mut statuses = Vec::with_capacity(n);
    let mut stream = connect().await;
    let mut connections = 1;
    while statuses.len() < n {
        let mut line = String::new();
        let answered = async {
            stream.get_mut().write_all(request.as_bytes()).await.ok()?;
            if stream.read_line(&mut line).await.ok()? == 0 {
                return None;
            }
            let status = line.split(' ').nth(1).and_then(|s| s.parse().ok())?;
            let mut length = 0;
            loop {
                line.clear();
                if stream.read_line(&mut line).await.ok()? == 0 {
                    return None;
                }
                if line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().ok()?;
                }
            }
            let mut body = vec![0u8; length];
            stream.read_exact(&mut body).await.ok()?;
            Some(status)
        }
        .await;
        match answered {
            Some(status) => statuses.push(status),
            None => {
                connections += 1;
                assert!(connections < n + 10, "the hub keeps closing connections");
                stream = connect().await;
            }
        }
    }
    println!("{n} requests on {connections} connections");
    statuses
}

/// One enrollment attempt over a certificate-less QUIC connection from
/// `endpoint`: the hub's answer, or why there was none.
async fn enroll_attempt(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    hub: SocketAddr,
    req: &gateway_core::fleet::EnrollRequest,
) -> Result<gateway_core::fleet::EnrollAnswer, String> {
    let conn = endpoint
        .connect_with(client.clone(), hub, "127.0.0.1")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    gateway_daemon::fleet::write_msg(&mut send, req)
        .await
        .map_err(|e| e.to_string())?;
    let answer = gateway_daemon::fleet::read_msg(&mut recv)
        .await
        .map_err(|e| e.to_string());
    conn.close(quinn::VarInt::from_u32(0), b"done");
    answer
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Unauthenticated traffic writes the audit at most once per source, kind and
/// 10 s, under the peer's address, with what it claimed escaped and capped:
/// 10,000 bad credentials and 10,000 bad enrollments from one address grow the
/// audit database by less than 1 MB, and a real operator is still answered.
#[test]
fn unauthenticated_floods_are_summarised_under_the_peer_address() {
    let hub = Hub::start("1h");
    let before = audit_bytes(&hub);
    let flood_started = std::time::Instant::now();
    let rt = runtime();
    rt.block_on(async {
        // A credential naming another account, with a control character in
        // it (HTTP itself refuses a line break in a header).
        let forged = "gwa1.sue\tadmin.revoke forged.0000000000000000000000000000000000000000000000000000000000000000";
        let statuses = ops_requests(&hub, forged, 5_000).await;
        let unknown = "gwa1.demo-security.00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let more = ops_requests(&hub, unknown, 5_000).await;
        assert!(statuses.iter().chain(&more).all(|s| *s == 401), "{:?}", &statuses[..3]);

        let client = gateway_daemon::tunnel::tls::enroll_client(&hub.pki.ca().join("ca.pem"))
            .expect("client");
        let endpoint = std::sync::Arc::new(
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint"),
        );
        // One oversized request (a 1.5 MB device name) and 10,000 bad tokens,
        // four at a time (the most one address may have in progress).
        let huge = gateway_core::fleet::EnrollRequest {
            device: "d".repeat(1_500_000),
            token: "t".repeat(64),
            csr_pem: String::new(),
        };
        let refused = enroll_attempt(&endpoint, &client, hub.quic, &huge).await;
        assert!(refused.is_err(), "an oversized request has no answer: {refused:?}");
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..4 {
            let (endpoint, client, quic) = (endpoint.clone(), client.clone(), hub.quic);
            tasks.spawn(async move {
                let mut refusals = 0;
                for i in 0..2_500 {
                    let req = gateway_core::fleet::EnrollRequest {
                        device: format!("dept-{worker}-{i}\nrelay.open forged"),
                        token: "gwt1.nobody.00".into(),
                        csr_pem: String::new(),
                    };
                    // A connection may find the address's four in progress
                    // (the hub counts one until it sees it closed): try again.
                    for _ in 0..20 {
                        if let Ok(gateway_core::fleet::EnrollAnswer::Refused { .. }) =
                            enroll_attempt(&endpoint, &client, quic, &req).await
                        {
                            refusals += 1;
                            break;
                        }
                    }
                }
                refusals
            });
        }
        let refusals: usize = tasks.join_all().await.into_iter().sum();
        assert_eq!(refusals, 10_000, "every bad enrollment gets its refusal");
    });
    // A real operator is answered at once.
    let started = std::time::Instant::now();
    let (code, out, err) = hub.ctl("sam", &["whoami"]);
    println!(
        "a good operator answered in {:?} (gatewayctl process included)",
        started.elapsed()
    );
    assert_eq!(code, 0, "{out}{err}");
    // The summaries are written once the 10 s window ends.
    wait_audit_line(&hub, "more refused since the last record");
    let grown = audit_bytes(&hub).saturating_sub(before);
    println!("audit grew by {grown} bytes for 20,001 refusals");
    assert!(grown < 1_000_000, "the audit grew by {grown} bytes");
    let lines = audit_lines(&hub.dir.path().join("state"));
    let auth: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("admin.auth"))
        .collect();
    // At most one record per kind and 10 s window (two kinds of enrollment
    // refusal), whatever the attacker's pace.
    let windows = flood_started.elapsed().as_secs() / 10 + 2;
    assert!(
        !auth.is_empty() && auth.len() as u64 <= windows,
        "{auth:#?}"
    );
    assert!(
        auth.iter()
            .all(|l| l.starts_with("admin.auth 127.0.0.1 operators-api deny")),
        "the peer's address is the subject, never a claimed account: {auth:#?}"
    );
    let enrolls: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("device.enroll"))
        .collect();
    assert!(
        !enrolls.is_empty() && enrolls.len() as u64 <= 2 * windows,
        "{} records in {windows} windows: {enrolls:#?}",
        enrolls.len()
    );
    assert!(
        enrolls
            .iter()
            .all(|l| l.starts_with("device.enroll 127.0.0.1 enrollment deny"))
    );
    assert!(
        lines.iter().all(|l| l.len() < 1_000),
        "every record's detail is capped"
    );
    // `audit show` prints what a peer sent escaped: no forged line.
    let out = common::gatewayd(&[
        "audit",
        "show",
        "--state-dir",
        hub.dir.path().join("state").to_str().expect("path"),
    ]);
    let (text, _) = common::text(&out);
    assert!(
        text.contains("\\nrelay.open forged") || text.contains("\\nadmin.revoke"),
        "{text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("relay.open forged") || l.starts_with("admin.revoke forged")),
        "{text}"
    );
}

/// An enrollment token lives at most `[hub].max_token_lifetime` (7 days by
/// default): longer, or 2^64-1 seconds, is refused naming the field.
#[test]
fn token_lifetimes_are_bounded() {
    let hub = Hub::start("1h");
    let (code, out, err) = hub.ctl(
        "sam",
        &["token", "create", "--device", "edge-z", "--expires", "7d"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = hub.ctl(
        "sam",
        &["token", "create", "--device", "edge-z", "--expires", "8d"],
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("expires_s") && err.contains("max_token_lifetime"),
        "{err}"
    );
    // Straight to the API, past gatewayctl's own parsing.
    let client = gateway_daemon::fleet::ops_client::OpsClient::new(
        &hub.ops.to_string(),
        &hub.pki.ca().join("ca.pem"),
        &hub.dir.path().join("sam.cred"),
    )
    .expect("client");
    let body = br#"{"device": "edge-z", "expires_s": 18446744073709551615}"#;
    let (status, answer) = runtime()
        .block_on(client.request("POST", "/v1/tokens", Some(("application/json", body))))
        .expect("request");
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("expires_s"), "{answer}");
}

/// Operators' API input that is wrong gets a 400 naming the field: a JSON
/// body of the wrong shape, a device id that is not one; without a valid
/// credential it is a 401 first.
#[test]
fn operators_api_inputs_are_validated_naming_the_field() {
    let hub = Hub::start("1h");
    let rt = runtime();
    let client = |cred: &str| {
        gateway_daemon::fleet::ops_client::OpsClient::new(
            &hub.ops.to_string(),
            &hub.pki.ca().join("ca.pem"),
            &hub.dir.path().join(cred),
        )
        .expect("client")
    };
    let sam = client("sam.cred");
    let ask = |c: &gateway_daemon::fleet::ops_client::OpsClient,
               method: &str,
               path: &str,
               body: &[u8]| {
        let body = (!body.is_empty()).then_some(("application/json", body));
        let (status, answer) = rt.block_on(c.request(method, path, body)).expect("request");
        (status, String::from_utf8_lossy(&answer).into_owned())
    };
    for (body, field) in [
        (&br#"{"device": 5}"#[..], "device"),
        (br#"{"device": "edge-z", "expires_s": "soon"}"#, "expires_s"),
        (br#"{"expires_s": 60}"#, "device"),
        (b"not json", "body"),
    ] {
        let (status, answer) = ask(&sam, "POST", "/v1/tokens", body);
        assert_eq!(status, 400, "{answer}");
        assert!(answer.contains(field), "{field}: {answer}");
    }
    let (status, answer) = ask(&sam, "GET", "/v1/devices/No%20Such..Device", b"");
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("device"), "{answer}");
    std::fs::write(hub.dir.path().join("nobody.cred"), "gwa1.nobody.00\n").expect("cred");
    let (status, answer) = ask(&client("nobody.cred"), "POST", "/v1/tokens", b"not json");
    assert_eq!(status, 401, "{answer}");
}

/// A token for a device that is enrolled, with a valid certificate, is
/// refused to the system administrator, naming the device's state;
/// re-enrolling it takes --replace, which only the security administrator has.
#[test]
fn an_enrolled_device_is_re_enrolled_only_with_replace_by_security() {
    let hub = Hub::start("1h");
    let (config, _state) = edge_config(&hub, "edge-a", echo_server("127.0.1.1"), "");
    // Two tokens made before the device enrolled: the second cannot make a
    // second identity once the first is used.
    let (first, second) = (hub.token("edge-a"), hub.token("edge-a"));
    let (code, out) = enroll(&config, &first);
    assert_eq!(code, 0, "{out}");
    let impostor = hub.dir.path().join("impostor");
    std::fs::create_dir_all(&impostor).expect("dir");
    let text = std::fs::read_to_string(&config).expect("config");
    let state = hub.dir.path().join("edge-a").join("state");
    let other = impostor.join("edge.toml");
    let moved = text.replace(
        &state.display().to_string(),
        &impostor.join("state").display().to_string(),
    );
    std::fs::write(&other, moved).expect("write");
    let (code, out) = enroll(&other, &second);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("--replace"), "{out}");
    let (code, out, err) = hub.ctl("sam", &["token", "create", "--device", "edge-a"]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("is enrolled") && err.contains("--replace"),
        "{err}"
    );
    let (code, _, err) = hub.ctl(
        "sam",
        &["token", "create", "--device", "edge-a", "--replace"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("security administrator"), "{err}");
    let (code, out, err) = hub.ctl(
        "sue",
        &["token", "create", "--device", "edge-a", "--replace"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.trim().starts_with("gwt1.edge-a."), "{out}");
    let (code, replaced) = enroll(&other, out.trim());
    assert_eq!(
        code, 0,
        "the replacing token enrolls the new box: {replaced}"
    );
    // A device not enrolled still takes the system administrator's token,
    // written owner-only with --out, and never over an existing file.
    let file = hub.dir.path().join("edge-b.token");
    let out = file.to_str().expect("utf-8");
    let (code, _, err) = hub.ctl(
        "sam",
        &["token", "create", "--device", "edge-b", "--out", out],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(mode(&file), 0o600);
    let token = std::fs::read_to_string(&file).expect("token");
    assert!(token.starts_with("gwt1.edge-b."), "{token}");
    let (code, _, err) = hub.ctl(
        "sam",
        &["token", "create", "--device", "edge-b", "--out", out],
    );
    assert_ne!(code, 0);
    assert!(err.contains("exists and is not overwritten"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).expect("token"), token);
}

/// The mode bits of `path`.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Started with umask 022 (this test's), the hub and an enrolled box still
/// keep their state directories 0700 and databases and keys 0600; a state
/// directory opened to others is a warning of `gatewayd check`.
#[test]
fn state_files_are_private_whatever_the_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let hub = Hub::start("1h");
    let state = hub.dir.path().join("state");
    let (config, edge_state) = edge_config(&hub, "edge-a", echo_server("127.0.1.1"), "");
    let (code, out) = enroll(&config, &hub.token("edge-a"));
    assert_eq!(code, 0, "{out}");
    wait_audit_line(&hub, "device.enroll");
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&edge_state), 0o700);
    // On PostgreSQL the registry and the sink are not files of the hub.
    let files: &[&str] = if pg_mode() {
        &["audit.sqlite"]
    } else {
        &["audit.sqlite", "sink.sqlite", "fleet.sqlite"]
    };
    for f in files {
        assert_eq!(mode(&state.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&edge_state.join("device.key")), 0o600);
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let out = common::gatewayd(&["check", "--config", hub.config.to_str().expect("path")]);
    let (o, e) = common::text(&out);
    assert!(
        format!("{o}{e}").contains("is open to other users (mode 0755)"),
        "{o}{e}"
    );
}

/// A certificate-less connection takes an enrollment slot only once its
/// request arrives, must send it within 2 s, and one address may have at most
/// 4 in progress: 40 silent and 40 slow connections from one address do not
/// keep a real box from enrolling.
#[test]
fn enrollment_cannot_be_starved_by_silent_or_slow_connections() {
    let hub = Hub::start("1h");
    let rt = runtime();
    let (closed, config, token) = rt.block_on(async {
        let client = gateway_daemon::tunnel::tls::enroll_client(&hub.pki.ca().join("ca.pem"))
            .expect("client");
        // The attacker's address is not the real box's.
        let endpoint =
            quinn::Endpoint::client("127.0.0.5:0".parse().expect("addr")).expect("endpoint");
        let mut held = tokio::task::JoinSet::new();
        for i in 0..80 {
            let c = endpoint
                .connect_with(client.clone(), hub.quic, "127.0.0.1")
                .expect("connect")
                .await
                .expect("handshake");
            held.spawn(async move {
                if i % 2 == 1 {
                    // Slow: a stream and a few bytes of a request, never the rest.
                    if let Ok((mut send, _recv)) = c.open_bi().await {
                        let _ = send.write_all(&[0, 0, 4, 0, b'{']).await;
                        let _ = tokio::time::timeout(Duration::from_secs(6), c.closed()).await;
                        return c.close_reason().map(|r| r.to_string());
                    }
                }
                tokio::time::timeout(Duration::from_secs(6), c.closed())
                    .await
                    .ok()
                    .map(|r| r.to_string())
            });
        }
        let (config, _state) = edge_config(&hub, "edge-a", echo_server("127.0.1.1"), "");
        (held, config, hub.token("edge-a"))
    });
    // The real box enrolls while the 80 connections are held open or refused.
    let (code, out) = enroll(&config, &token);
    assert_eq!(code, 0, "{out}");
    let closed: Vec<String> = rt
        .block_on(closed.join_all())
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(
        closed.len(),
        80,
        "every connection is closed within 6 s: {closed:?}"
    );
    let busy = closed
        .iter()
        .filter(|c| c.contains("from your address"))
        .count();
    let timed_out = closed
        .iter()
        .filter(|c| c.contains("expected an enrollment request"))
        .count();
    assert!(busy >= 70, "{closed:?}");
    assert_eq!(busy + timed_out, 80, "{closed:?}");
    // One record at once, the other 79 refusals summarised in one more.
    wait_audit_line(&hub, "79 more refused since the last record");
    let lines = audit_lines(&hub.dir.path().join("state"));
    let refused: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("device.enroll 127.0.0.5 enrollment deny"))
        .collect();
    assert_eq!(refused.len(), 2, "{lines:#?}");
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

    // The box reports the CA it trusts.
    let fingerprints = |p: &Path| gateway_daemon::tunnel::pki::fingerprints(&pem(p));
    let trusts_as_told_by = |hub: &Hub, ca: &Path, want: Vec<String>| {
        poll_blocking("the box reports its CAs", Duration::from_secs(15), || {
            let (code, out, err) = hub.ctl_trusting(
                ca,
                "sam",
                &["devices", "show", "edge-a", "--format", "json"],
            );
            assert_eq!(code, 0, "{err}");
            let d: Value = serde_json::from_str(&out).expect("json");
            let ca: Vec<String> = d["status"]["ca"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            if ca == want {
                Ok(())
            } else {
                Err(format!("{ca:?} != {want:?}"))
            }
        });
    };
    let trusts = |hub: &Hub, want: Vec<String>| trusts_as_told_by(hub, &old_ca, want);
    trusts(&hub, fingerprints(&old_ca));
    // 1. A new CA, named apart from the old one.
    let new_ca = hub.dir.path().join("ca-2027");
    gatewayd(&[
        "pki",
        "init",
        "--out",
        &path(&new_ca),
        "--name",
        "Jilin e-gov CA 2027",
    ]);
    // 2. The box trusts the old and the new CA: a bundle `pki bundle` makes,
    //    named by hub.box_ca; the hub signs it with the CA key the box trusts
    //    and sends it to the box, which says so in its heartbeat. The box's
    //    own file is not touched.
    let edit_hub = |hub: &Hub, from: String, to: String| {
        let text = std::fs::read_to_string(&hub.config).expect("hub config");
        assert!(text.contains(&from), "{from} not in {text}");
        std::fs::write(&hub.config, text.replace(&from, &to)).expect("write");
    };
    let box_bundle = hub.dir.path().join("box-ca-2027.pem");
    gatewayd(&[
        "pki",
        "bundle",
        "--out",
        &path(&box_bundle),
        &path(&old_ca),
        &path(&new_ca.join("ca.pem")),
    ]);
    let ca_key_line = format!("ca_key = \"{}\"", hub.pki.ca().join("ca.key").display());
    edit_hub(
        &hub,
        ca_key_line.clone(),
        format!("{ca_key_line}\nbox_ca = \"{}\"", box_bundle.display()),
    );
    hub.kill();
    hub.run();
    edge.wait_next_log("The hub sent a CA bundle");
    trusts(
        &hub,
        [fingerprints(&old_ca), fingerprints(&new_ca.join("ca.pem"))].concat(),
    );
    assert_eq!(pem(&box_ca), pem(&old_ca), "the box's own file stays");
    let (_, listing, _) = hub.ctl("sam", &["devices", "list"]);
    let short = |f: &[String]| f[0][..8].to_owned();
    assert!(
        listing.contains(&format!(
            "{}+{}",
            short(&fingerprints(&old_ca)),
            short(&fingerprints(&new_ca.join("ca.pem")))
        )),
        "{listing}"
    );
    // 3. The hub checks against new + old and signs with the new key.
    let hub_bundle = hub.dir.path().join("ca-bundle.pem");
    std::fs::write(&hub_bundle, pem(&new_ca.join("ca.pem")) + &pem(&old_ca)).expect("bundle");
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
    // Lines logged so far are not the reconnection's.
    let _ = edge.log_so_far();
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
    //    of the old CA, and the box, sent the new CA alone (signed by it, a
    //    CA the box trusts), trusts only the new one.
    std::fs::write(&hub_bundle, pem(&new_ca.join("ca.pem"))).expect("new CA only");
    let box_bundle_2 = hub.dir.path().join("box-ca-2027-only.pem");
    gatewayd(&[
        "pki",
        "bundle",
        "--out",
        &path(&box_bundle_2),
        &path(&new_ca.join("ca.pem")),
    ]);
    edit_hub(
        &hub,
        format!("box_ca = \"{}\"", box_bundle.display()),
        format!("box_ca = \"{}\"", box_bundle_2.display()),
    );
    hub.kill();
    hub.run();
    edge.wait_next_log("The hub sent a CA bundle");
    trusts_as_told_by(
        &hub,
        &new_ca.join("ca.pem"),
        fingerprints(&new_ca.join("ca.pem")),
    );
    relay(&hub, "the old CA is gone");
    // The box no longer accepts a hub certificate from the old CA: it
    // reconnects to this hub only because its certificate is the new CA's.
    edge.signal(Signal::SIGKILL);
    let _ = edge.child.wait();
    let mut edge = Proc::start(&config);
    edge.wait_log("Tunnel up");
    relay(
        &hub,
        "after a restart the box still trusts the bundle it was sent",
    );
    edge.signal(Signal::SIGKILL);
}

/// A consumer as central ops make one: the system administrator creates it
/// (key made by gatewayctl, or the application's own request signed), the
/// security administrator grants it a stream; the roles do not cross; a
/// revoked consumer's open connection closes within 5 s and its certificate
/// is refused from then on.
#[test]
fn consumers_are_made_granted_and_revoked_by_the_right_roles() {
    let hub = Hub::start("24h");
    let out = hub.dir.path().join("central");
    let (code, stdout, err) = hub.ctl(
        "sam",
        &[
            "consumer",
            "create",
            "stats",
            "--out",
            out.to_str().expect("path"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (key, cert) = (out.join("stats.key"), out.join("stats.pem"));
    assert!(
        stdout.contains("stats.key") && stdout.contains("stats.pem"),
        "{stdout}"
    );
    for f in [&key, &cert] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(f).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    // The application's own key: only its request leaves it.
    let (app_key, csr) = gateway_daemon::tunnel::pki::new_consumer_request("archive").expect("csr");
    let csr_file = hub.dir.path().join("archive.csr");
    std::fs::write(&csr_file, csr).expect("csr file");
    let (code, pem, err) = hub.ctl(
        "sam",
        &[
            "consumer",
            "create",
            "archive",
            "--csr",
            csr_file.to_str().expect("path"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let (code, _, err) = hub.ctl(
        "sam",
        &[
            "consumer",
            "create",
            "stats",
            "--csr",
            csr_file.to_str().expect("path"),
        ],
    );
    assert_eq!(code, 1, "a second consumer of one name: {err}");
    assert!(err.contains("exists"), "{err}");

    // Who reads a department's data is policy: the security administrator's.
    let (code, _, err) = hub.ctl("sam", &["consumer", "grant", "stats", "edge-a/reports"]);
    assert_eq!(code, 77, "{err}");
    assert!(err.contains("security administrator"), "{err}");
    let (code, _, err) = hub.ctl("sue", &["consumer", "create", "x", "--out", "/tmp/none"]);
    assert_eq!(code, 77, "{err}");
    let (code, _, err) = hub.ctl("sue", &["consumer", "grant", "stats", "edge-a/reports"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = hub.ctl("sue", &["consumer", "grant", "stats", "edge-a"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("DEVICE/CHANNEL"), "{err}");
    let (code, table, err) = hub.ctl("sam", &["consumer", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains("stats") && table.contains("edge-a/reports (0)"),
        "{table}"
    );
    assert!(table.contains("archive"), "{table}");

    // The consumer reads what it was granted, over HTTPS with its certificate.
    let ca = hub.pki.ca().join("ca.pem");
    let stats = Reader::with_files(&ca, hub.api, "stats", Some((&cert, &key)));
    let (status, body) = stats.request("GET", "/v1/channels").expect("answer");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"channel\":\"reports\""), "{body}");
    let archive_key = hub.dir.path().join("archive.key");
    std::fs::write(&archive_key, app_key).expect("key");
    let archive_pem = hub.dir.path().join("archive.pem");
    std::fs::write(&archive_pem, &pem).expect("pem");
    let archive = Reader::with_files(&ca, hub.api, "archive", Some((&archive_pem, &archive_key)));
    let (status, body) = archive.request("GET", "/v1/channels").expect("answer");
    assert_eq!((status, body.as_str()), (200, "{\"channels\":[]}"));

    // An open connection of the consumer, between two requests.
    let mut open = stats.keep_alive().expect("connect");
    assert_eq!(open.get("/v1/channels").map(|r| r.0), Some(200));
    assert!(
        !open.wait_closed(Duration::from_millis(500)),
        "the connection closes by itself"
    );
    let (code, said, err) = hub.ctl("sue", &["consumer", "revoke", "stats"]);
    assert_eq!(code, 0, "{err}");
    assert!(said.contains("revoked"), "{said}");
    let closed = open.wait_closed(Duration::from_secs(5));
    assert!(
        closed,
        "the revoked consumer's connection is still open after 5 s"
    );
    let (status, body) = stats.request("GET", "/v1/channels").expect("answer");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("revoked"), "{body}");
    let (_, table, _) = hub.ctl("sam", &["consumer", "list"]);
    assert!(table.contains("revoked"), "{table}");
    for want in [
        "admin.consumer.create sam stats ok",
        "admin.consumer.grant sue stats ok [] may read edge-a/reports",
        "admin.consumer.revoke sue stats ok",
        "admin.consumer.grant sam stats deny [roles]",
    ] {
        // The audit writer commits in batches: wait for the record.
        wait_audit_line(&hub, want);
    }
}

/// One live certificate per device: re-enrolling edge-a with --replace
/// closes the old box's tunnel and relays within 5 s and refuses its
/// certificate from then on; the old box trying while the new one is
/// connected raises the duplicate-identity alarm and metric.
#[test]
fn a_replaced_certificate_is_refused_and_its_connections_closed() {
    let hub = Hub::start("1h");
    let echo = echo_server("127.0.1.1");
    let (config, _state) = edge_config(&hub, "edge-a", echo, "");
    let (code, out) = enroll(&config, &hub.token("edge-a"));
    assert_eq!(code, 0, "{out}");
    let mut old = Proc::start(&config);
    old.wait_log("Tunnel up");
    let mut client = TcpStream::connect(hub.publish).expect("publish");
    round_trip(&mut client, b"through the first box");

    // A second box for the same department, its own admin port and state.
    let text = std::fs::read_to_string(&config).expect("config");
    let state = hub.dir.path().join("edge-a").join("state");
    let new_dir = hub.dir.path().join("edge-a-new");
    std::fs::create_dir_all(&new_dir).expect("dir");
    let admin = text
        .lines()
        .skip_while(|l| *l != "[admin]")
        .find_map(|l| l.strip_prefix("listen = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("admin listen")
        .to_owned();
    let moved = text
        .replace(
            &state.display().to_string(),
            &new_dir.join("state").display().to_string(),
        )
        .replace(&admin, &free_tcp("127.0.0.1").to_string());
    let new_config = new_dir.join("edge.toml");
    std::fs::write(&new_config, moved).expect("write");
    let (code, token, err) = hub.ctl(
        "sue",
        &["token", "create", "--device", "edge-a", "--replace"],
    );
    assert_eq!(code, 0, "{err}");
    let (code, out) = enroll(&new_config, token.trim());
    assert_eq!(code, 0, "{out}");

    // The old certificate's tunnel and its relays are cut at once.
    assert_cut_within_5s(&mut client, "a relay through the replaced box");
    old.wait_log("no longer the device's");
    wait_audit(&hub, "device.replace");
    wait_audit_line(&hub, "tunnel.refuse");

    // The new box connects and serves; the old one, still trying, is refused
    // and raises the alarm.
    let mut new = Proc::start(&new_config);
    new.wait_log("Tunnel up");
    let mut client = TcpStream::connect(hub.publish).expect("publish");
    round_trip(&mut client, b"through the new box");
    wait_audit_line(&hub, "device.duplicate_identity");
    let mut c = TcpStream::connect(hub_admin(&hub)).expect("admin");
    c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("request");
    let mut metrics = String::new();
    c.read_to_string(&mut metrics).expect("metrics");
    assert!(
        metrics.contains("gateway_device_duplicate_identity{device=\"edge-a\"}"),
        "{metrics}"
    );
    let audit = audit_lines(&hub.dir.path().join("state"));
    let refused: Vec<&String> = audit
        .iter()
        .filter(|l| l.starts_with("tunnel.refuse 127.0.0.1 tunnel deny"))
        .collect();
    assert!(!refused.is_empty(), "{audit:#?}");
    assert!(refused[0].contains("superseded"), "{refused:?}");
    drop((old, new));
}

/// A request from `from` to the ingest at `to`; its status, or `None` when
/// the connection was dropped unanswered (a ban).
fn post_from(from: &str, to: SocketAddr) -> Option<u16> {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let src: std::net::IpAddr = from.parse().expect("ip");
    sock.bind(&SocketAddr::new(src, 0).into()).expect("bind");
    sock.connect_timeout(&to.into(), Duration::from_secs(2))
        .ok()?;
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let body = "{\"a\":1}";
    let req = format!(
        "POST /v1/channels/readings/records HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    answer.split(' ').nth(1)?.parse().ok()
}

/// An edge bans a neighbour posting from outside its zone; the alarm reaches
/// the hub in its audit chain within seconds, where any administrator lists
/// it, only the security administrator acknowledges it and lifts the ban on
/// the box, and each of those acts is audited.
#[test]
fn an_edges_alarm_reaches_the_hub_and_the_security_administrator_lifts_its_ban() {
    let hub = Hub::start("1h");
    let echo = echo_server("127.0.1.1");
    let (config, state) = edge_config(&hub, "edge-a", echo, "");
    let ingest = free_tcp("127.0.1.1");
    let mut text = std::fs::read_to_string(&config).expect("config");
    text += &format!(
        "\n[[channel]]\nname = \"readings\"\nzone = \"lab\"\nformats = [\"json\"]\nmax_record_bytes = \"4KiB\"\n\n[[ingest]]\nzone = \"lab\"\nlisten = \"{ingest}\"\n"
    );
    std::fs::write(&config, text).expect("write");
    let (code, out) = enroll(&config, &hub.token("edge-a"));
    assert_eq!(code, 0, "{out}");
    let mut edge = Proc::start(&config);
    edge.wait_log("Tunnel up");

    // Ten refusals of the same listener after the first trip D1.refusals.
    let statuses: Vec<Option<u16>> = (0..11).map(|_| post_from("127.0.9.9", ingest)).collect();
    assert!(statuses.iter().all(|s| *s == Some(403)), "{statuses:?}");
    let raised = std::time::Instant::now();
    assert_eq!(
        post_from("127.0.9.9", ingest),
        None,
        "banned: dropped unanswered"
    );
    let alarm = poll_blocking(
        "the edge's alarm at the hub",
        Duration::from_secs(15),
        || {
            let (code, out, err) = hub.ctl(
                "ada",
                &[
                    "alarms", "list", "--device", "edge-a", "--since", "1h", "--format", "json",
                ],
            );
            if code != 0 {
                return Err(err);
            }
            let v: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
            v["alarms"]
                .as_array()
                .and_then(|a| a.iter().find(|a| a["rule"] == "D1.refusals").cloned())
                .ok_or(out)
        },
    );
    println!(
        "the alarm was listed at the hub {:?} after it was raised: {alarm}",
        raised.elapsed()
    );
    assert_eq!(alarm["source"], "127.0.9.9");
    assert_eq!(alarm["direction"], "outbound");
    assert_eq!(alarm["device"], "edge-a");
    assert_eq!(alarm["action"], "ban");
    let id = alarm["id"].as_str().expect("id").to_owned();
    let (code, out, _) = hub.ctl("ada", &["alarms", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains(&id) && out.contains("D1.refusals"), "{out}");

    // Acknowledged by the security administrator only, once.
    let (code, _, err) = hub.ctl("sam", &["alarms", "ack", &id]);
    assert_eq!(code, 77, "the system administrator may not: {err}");
    assert!(err.contains("security administrator"), "{err}");
    let (code, out, err) = hub.ctl("sue", &["alarms", "ack", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("acknowledged"), "{out}");
    let (_, out, _) = hub.ctl("sue", &["alarms", "ack", &id]);
    assert!(out.contains("already"), "{out}");
    let (code, _, err) = hub.ctl("sue", &["alarms", "ack", "x HTTP/1.1\r\nX-Forged: 1"]);
    assert_ne!(code, 0);
    assert!(err.contains("is not an alarm id"), "{err}");
    let (_, out, _) = hub.ctl(
        "ada",
        &["alarms", "list", "--unacked", "--device", "edge-a"],
    );
    assert!(!out.contains(&id), "{out}");

    // The ban is lifted on the box by the security administrator.
    let (code, _, err) = hub.ctl(
        "sam",
        &["alarms", "lift", "127.0.9.9", "--device", "edge-a"],
    );
    assert_eq!(code, 77, "{err}");
    let (code, out, err) = hub.ctl(
        "sue",
        &["alarms", "lift", "127.0.9.9", "--device", "edge-a"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("lifted on edge-a"), "{out}");
    assert_eq!(post_from("127.0.9.9", ingest), Some(403), "decided again");
    wait_audit(&hub, "admin.alarm.ack");
    wait_audit(&hub, "admin.ban.lift");
    poll_blocking(
        "the lift in the edge's audit",
        Duration::from_secs(5),
        || {
            let lines = audit_lines(&state);
            if lines
                .iter()
                .any(|l| l.starts_with("ban.lift hub 127.0.9.9 ok"))
            {
                Ok(())
            } else {
                Err(lines.join("\n"))
            }
        },
    );
    edge.signal(Signal::SIGKILL);

    // The hub's own alarms are listed beside its devices': bad credentials
    // on the operators' API (loopback is never banned by this test hub).
    let forged = "gwa1.sue.0000000000000000000000000000000000000000000000000000000000000000";
    runtime().block_on(ops_requests(&hub, forged, 6));
    let own = poll_blocking("the hub's own alarm", Duration::from_secs(10), || {
        let (_, out, err) = hub.ctl(
            "ada",
            &["alarms", "list", "--device", "hub-01", "--format", "json"],
        );
        let v: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {err}"))?;
        v["alarms"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["rule"] == "D3.handshake").cloned())
            .ok_or(out)
    });
    assert_eq!(own["action"], "alarm (never_ban, not banned)");
    assert_eq!(own["target"], "operators-api");
}

/// Central ops roll a template out over 20 real edges in three waves: one
/// device's variables break its uplink (another CA), it reverts through try
/// mode, is counted failed, and the rollout pauses by itself at
/// `--max-failures 0` before the last wave; the status says why and which
/// device; then `rollback` offers every pushed device its previous version.
/// Along the way: a template change is classified as pushes are, a missing
/// variable is refused naming the device, the line and the variable, and a
/// device is in at most one active rollout.
#[test]
fn a_template_rolls_out_in_waves_pauses_on_a_failure_and_rolls_back() {
    const N: usize = 20;
    const BROKEN: &str = "edge-07";
    let mut hub = Hub::start("1h");
    let echo = echo_server("127.0.1.1");
    let ids: Vec<String> = (0..N).map(|i| format!("edge-{i:02}")).collect();
    let mut edges = Vec::new();
    let mut texts = Vec::new();
    for id in &ids {
        let (config, _) = edge_config(&hub, id, echo, "config_try = \"3s\"\n");
        let (code, out) = enroll(&config, &hub.token(id));
        assert_eq!(code, 0, "{out}");
        texts.push(std::fs::read_to_string(&config).expect("config"));
        edges.push(Proc::start(&config));
    }
    for e in &mut edges {
        e.wait_log("Tunnel up");
    }
    // The hub has every box's own file.
    poll_blocking(
        "every box's config at the hub",
        Duration::from_secs(20),
        || {
            let n = ids
                .iter()
                .filter(|id| hub.config_status(id)["applied"] == 0)
                .count();
            if n == N {
                Ok(())
            } else {
                Err(format!("{n} of {N}"))
            }
        },
    );

    // The template: edge-00's file with what differs per box as variables,
    // and one change for all (the heartbeat, not policy).
    let ca = hub.pki.ca().join("ca.pem");
    let ca = ca.to_str().expect("path");
    let admin0 = hub_admin_of(&hub.dir.path().join("edge-00/edge.toml"));
    let template = texts[0]
        .replace("edge-00", "{{ device }}")
        .replace(&admin0, "{{ admin }}")
        .replace(ca, "{{ ca }}")
        .replace("heartbeat = \"1s\"", "heartbeat = \"2s\"");
    assert!(template.contains("{{ admin }}") && template.contains("{{ ca }}"));
    let other_ca = Pki::new();
    let other_ca = other_ca.ca().join("ca.pem");
    for (id, text) in ids.iter().zip(&texts) {
        let admin = text
            .lines()
            .find_map(|l| l.strip_prefix("listen = \""))
            .and_then(|l| l.strip_suffix('"'))
            .expect("admin.listen");
        let their_ca = if id == BROKEN {
            other_ca.to_str().expect("path")
        } else {
            ca
        };
        let (code, out, err) = hub.ctl(
            "sam",
            &[
                "devices",
                "vars",
                id,
                &format!("admin={admin}"),
                &format!("ca={their_ca}"),
            ],
        );
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("admin = ") && out.contains("ca = "), "{out}");
    }
    let push_template = |account: &str, name: &str, text: &str| {
        let file = tempfile::NamedTempFile::new_in(hub.dir.path()).expect("file");
        std::fs::write(file.path(), text).expect("write");
        hub.ctl(
            account,
            &[
                "template",
                "push",
                name,
                file.path().to_str().expect("path"),
            ],
        )
    };
    let (code, out, err) = push_template("sam", "county", &template);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("version 1 stored (variables: device, ca, admin)"),
        "{out}"
    );
    // A later version is classified against the one before it.
    let (code, _, err) = push_template(
        "sam",
        "county",
        &template.replace("\"extranet\"]\n", "\"extranet\", \"edge-z\"]\n"),
    );
    assert_eq!(code, 77, "{err}");
    assert!(
        err.contains("may not change policy keys (service[")
            && err.contains("].allow;")
            && err.contains("of the template"),
        "{err}"
    );
    let (code, _, err) = push_template(
        "sue",
        "county",
        &template.replace("heartbeat = \"2s\"", "heartbeat = \"3s\""),
    );
    assert_eq!(code, 77, "{err}");
    assert!(err.contains("non-policy keys (uplink.heartbeat)"), "{err}");
    // A variable no device has: refused naming the device, line and variable.
    let line = template
        .lines()
        .position(|l| l.contains("{{ admin }}"))
        .expect("line")
        + 1;
    let (code, _, err) = push_template(
        "sam",
        "typo",
        &template.replace("{{ admin }}", "{{ admni }}"),
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = hub.ctl(
        "sam",
        &["rollout", "start", "--template", "typo", "--waves", "100%"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("template typo v1 for edge-00:{line}:"))
            && err.contains("variable admni has no value"),
        "{err}"
    );

    // A dry run says what would change, and starts nothing. The soak is
    // longer than the boxes' try window (3 s), as docs/operate.md says it
    // must be for a revert to count in its wave.
    let start = [
        "rollout",
        "start",
        "--template",
        "county",
        "--waves",
        "1,50%,100%",
        "--max-failures",
        "0",
        "--soak",
        "15s",
    ];
    let mut dry = start.to_vec();
    dry.push("--dry-run");
    let (code, _, err) = hub.ctl("sue", &dry);
    assert_eq!(
        code, 77,
        "the heartbeat is the system administrator's: {err}"
    );
    let (code, out, err) = hub.ctl("sam", &dry);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("20 device(s) in 3 wave(s) of 1, 9, 10") && out.contains("0 policy, 20 other"),
        "{out}"
    );
    // A variable that moves a box's admin.listen makes its config one a box
    // applies only by restarting: refused unless the rollout says --restart.
    let vars = |admin: &str| {
        let (code, _, err) = hub.ctl(
            "sam",
            &["devices", "vars", "edge-00", &format!("admin={admin}")],
        );
        assert_eq!(code, 0, "{err}");
    };
    vars(&free_tcp("127.0.0.1").to_string());
    let (code, _, err) = hub.ctl("sam", &dry);
    assert_ne!(code, 0);
    assert!(
        err.contains("template county v1 for edge-00: the change to admin.listen takes a restart")
            && err.contains("--restart"),
        "{err}"
    );
    let mut dry_restart = dry.clone();
    dry_restart.push("--restart");
    let (code, _, err) = hub.ctl("sam", &dry_restart);
    assert_eq!(code, 0, "{err}");
    vars(&admin0);

    let (code, id, err) = hub.ctl("sam", &start);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_owned();

    // Wave 1 (edge-00) applies; wave 2 holds the broken box: it reverts and
    // the rollout pauses before wave 3.
    let (code, status, err) = hub.ctl(
        "sam",
        &["rollout", "status", &id, "--wait", "--timeout", "3m"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        status.starts_with(&format!("rollout {id}: paused")),
        "{status}"
    );
    assert!(
        status.contains(&format!("{BROKEN})")) && status.contains("more than --max-failures 0"),
        "{status}"
    );
    assert!(
        status.contains("wave 1/3 (1 device(s)): applied 1"),
        "{status}"
    );
    assert!(
        status.contains("wave 3/3 (10 device(s)): waiting 10"),
        "{status}"
    );
    let (code, json_status, _) = hub.ctl("sam", &["rollout", "status", &id, "--format", "json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&json_status).expect("json");
    let wave2 = &v["waves"][1]["devices"];
    let failed: Vec<&str> = ["reverted", "silent", "failed"]
        .iter()
        .flat_map(|s| wave2[*s].as_array().into_iter().flatten())
        .filter_map(|d| d["device"].as_str())
        .collect();
    assert_eq!(failed, [BROKEN], "{v}");
    // The broken box went back to its own file and says so.
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        hub.wait_config_of(BROKEN, "the revert reported", |s| {
            s["result"]["outcome"] == "reverted"
        })
    }));
    if let Err(panic) = waited {
        let broken = ids.iter().position(|i| i == BROKEN).expect("broken");
        eprintln!("{BROKEN}'s log:\n{}", edges[broken].log_so_far());
        eprintln!("the hub's log:\n{}", hub.log_so_far());
        std::panic::resume_unwind(panic);
    }
    // Wave 3 was never offered anything.
    assert!(hub.config_status("edge-15")["desired"].is_null());
    // The applied boxes run the template's rendering.
    let applied = hub
        .ctl("sue", &["config", "show", "edge-03", "--applied"])
        .1;
    assert!(
        applied.contains("heartbeat = \"2s\"") && applied.contains("id = \"edge-03\""),
        "{applied}"
    );

    // A device is in at most one active rollout.
    let (code, _, err) = hub.ctl(
        "sam",
        &[
            "rollout",
            "start",
            "--template",
            "county",
            "--selector",
            "",
            "--waves",
            "100%",
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("is in rollout {id}")), "{err}");
    // Resuming and rolling back push as the rollout's role.
    let (code, _, err) = hub.ctl("sue", &["rollout", "resume", &id]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("system administrator who started it"), "{err}");

    // Rollback: every pushed box gets its own file again.
    let (code, out, err) = hub.ctl("sam", &["rollout", "rollback", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rolling-back"), "{out}");
    let (code, status, err) = hub.ctl(
        "sam",
        &["rollout", "status", &id, "--wait", "--timeout", "3m"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        status.starts_with(&format!("rollout {id}: rolled-back")),
        "{status}"
    );
    for (i, id) in ids.iter().enumerate().take(10) {
        let applied = hub.ctl("sue", &["config", "show", id, "--applied"]).1;
        assert_eq!(applied, texts[i], "{id} runs its own file again");
    }
    // Every step is audited with the account.
    for event in [
        "admin.rollout.start",
        "rollout.wave",
        "rollout.pause",
        "admin.rollout.rollback",
        "rollout.rolled-back",
    ] {
        wait_audit_line(&hub, event);
    }
    let audit = audit_lines(&hub.dir.path().join("state"));
    assert!(
        audit
            .iter()
            .any(|l| l.starts_with("admin.rollout.start sam r-")),
        "{audit:?}"
    );
}

/// A signed bundle of `version` in `dir`, as image/build.sh lays one out: a
/// root image of two chunks and a half, a kernel of a chunk and a half (two
/// parts) and a small initrd; `salt` makes the bytes differ between builds.
fn firmware_bundle(signer: &Signer, dir: &Path, version: &str, salt: u8) -> Vec<u8> {
    firmware_bundle_of(signer, dir, (version, 2), salt)
}

/// [`firmware_bundle`] with a root image of `chunks` chunks and a half.
fn firmware_bundle_of(
    signer: &Signer,
    dir: &Path,
    (version, chunks): (&str, u64),
    salt: u8,
) -> Vec<u8> {
    use gateway_core::firmware::{CHUNK_BYTES, FORMAT, Manifest};
    let sha = |b: &[u8]| {
        gateway_core::hex::encode(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
    };
    let fill = |len: u64, tag: u8| -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ tag ^ salt ^ (i / CHUNK_BYTES) as u8)
            .collect()
    };
    let root = fill(chunks * CHUNK_BYTES + CHUNK_BYTES / 2, 1);
    let (linux, initrd) = (fill(CHUNK_BYTES + CHUNK_BYTES / 2, 2), fill(100, 3));
    std::fs::create_dir_all(dir.join("chunks")).expect("bundle");
    let chunks: Vec<&[u8]> = root.chunks(CHUNK_BYTES as usize).collect();
    for (i, c) in chunks.iter().enumerate() {
        std::fs::write(dir.join(format!("chunks/{i:06}")), c).expect("chunk");
    }
    std::fs::write(dir.join("linux"), &linux).expect("linux");
    std::fs::write(dir.join("initrd"), &initrd).expect("initrd");
    let m = Manifest {
        format: FORMAT.into(),
        version: version.into(),
        security_version: 4,
        hardware: vec!["qemu-x86_64".into()],
        min_from_version: "1.0".into(),
        kernel_sha256: sha(&linux),
        initrd_sha256: sha(&initrd),
        root_bytes: root.len() as u64,
        chunks: chunks.iter().map(|c| sha(c)).collect(),
    };
    let text = serde_json::to_vec_pretty(&m).expect("manifest");
    std::fs::write(dir.join("manifest.json"), &text).expect("manifest");
    std::fs::write(dir.join("manifest.json.minisig"), signer.sign(&text)).expect("sig");
    root
}

/// `gatewayctl firmware upload` against a hub: refused without
/// `[hub] firmware_keys`, under another key, to roles other than the system
/// administrator's; a tampered chunk refused and the upload resumed from
/// what was stored; a kernel whose parts do not hash to the manifest's sent
/// again; another manifest under a stored version refused; `firmware list`
/// after a restart; each step audited.
#[test]
fn firmware_uploads_are_checked_resumed_and_listed() {
    let mut hub = Hub::start("1h");
    let d = hub.dir.path().to_owned();
    let (current, other) = (Signer::new(3), Signer::new(4));
    firmware_bundle(&current, &d.join("b2.0"), "2.0", 0);
    let b20 = d.join("b2.0").to_str().expect("path").to_owned();
    let (code, _, err) = hub.ctl("sam", &["firmware", "upload", &b20]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("set [hub] firmware_keys"), "{err}");
    poll_blocking("the refusal's audit", Duration::from_secs(5), || {
        let audit = audit_lines(&d.join("state"));
        match audit
            .iter()
            .any(|l| l.contains("trusts no firmware signing key"))
        {
            true => Ok(()),
            false => Err(audit.join("\n")),
        }
    });

    hub.trust_firmware(&current);

    for (account, code) in [("sue", 77), ("ada", 77)] {
        let (got, _, err) = hub.ctl(account, &["firmware", "upload", &b20]);
        assert_eq!(got, code, "{err}");
        assert!(err.contains("system administrator"), "{err}");
    }
    firmware_bundle(&other, &d.join("b2.0-other-key"), "2.0", 0);
    let (code, _, err) = hub.ctl(
        "sam",
        &[
            "firmware",
            "upload",
            d.join("b2.0-other-key").to_str().expect("path"),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the bundle is refused: signature"), "{err}");

    // A chunk changed after signing: refused, nothing after it sent; the
    // chunk mended, the upload resumes from what the hub stored.
    let chunk1 = d.join("b2.0/chunks/000001");
    let good = std::fs::read(&chunk1).expect("chunk");
    let mut bad = good.clone();
    bad[77] ^= 1;
    std::fs::write(&chunk1, &bad).expect("tamper");
    let (code, _, err) = hub.ctl("sam", &["firmware", "upload", &b20]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("part root/000001: its length or SHA-256 is not the manifest's"),
        "{err}"
    );
    assert!(
        err.contains("run the same command again to resume"),
        "{err}"
    );
    std::fs::write(&chunk1, &good).expect("mend");
    let (code, out, err) = hub.ctl("sam", &["firmware", "upload", &b20]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("5 of 6 parts to send"), "{err}");
    assert!(
        out.contains("firmware 2.0 (security_version 4) is complete"),
        "{out}"
    );
    // Once complete, uploading it again sends nothing.
    let (code, _, err) = hub.ctl("sam", &["firmware", "upload", &b20]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("0 of 6 parts to send"), "{err}");
    // Another build under a stored version is refused.
    firmware_bundle(&current, &d.join("b2.0-again"), "2.0", 9);
    let (code, _, err) = hub.ctl(
        "sam",
        &[
            "firmware",
            "upload",
            d.join("b2.0-again").to_str().expect("path"),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("stored with another manifest"), "{err}");

    // A kernel changed after signing, its length kept: every part passes
    // alone, the whole does not; mended, its parts are sent again.
    firmware_bundle(&current, &d.join("b2.1"), "2.1", 5);
    let b21 = d.join("b2.1").to_str().expect("path").to_owned();
    let linux = d.join("b2.1/linux");
    let good = std::fs::read(&linux).expect("linux");
    let mut bad = good.clone();
    bad[5] ^= 1;
    std::fs::write(&linux, &bad).expect("tamper");
    let (code, _, err) = hub.ctl("sam", &["firmware", "upload", &b21]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("its linux parts hash to"), "{err}");
    std::fs::write(&linux, &good).expect("mend");
    let (code, _, err) = hub.ctl("sam", &["firmware", "upload", &b21]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("3 of 6 parts to send"), "{err}");

    // What the store holds survives a restart, for every role that reads devices.
    hub.kill();
    hub.run();
    let (code, out, err) = hub.ctl("sue", &["firmware", "list"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[1].starts_with("2.1") && lines[1].contains("6/6") && lines[1].contains("complete"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("2.0") && lines[2].contains("sam"),
        "{out}"
    );
    let (code, out, _) = hub.ctl("sam", &["firmware", "list", "--format", "json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["firmware"][1]["security_version"], 4, "{v}");
    let (code, _, err) = hub.ctl("ada", &["firmware", "list"]);
    assert_eq!(code, 77, "{err}");

    // The audit is written behind the answers: waited for.
    let mut audit = Vec::new();
    poll_blocking("the firmware audit", Duration::from_secs(5), || {
        audit = audit_lines(&d.join("state"));
        if audit
            .iter()
            .any(|l| l.starts_with("admin.firmware.list sue"))
        {
            Ok(())
        } else {
            Err(audit.join("\n"))
        }
    });
    for needle in [
        "admin.firmware.upload sam 2.0 ok",
        "admin.firmware.upload sam 2.0 deny",
        "admin.firmware.upload sam 2.1 deny",
        "admin.firmware.upload sam firmware deny",
        "admin.firmware.upload ada firmware deny",
        "admin.firmware.list sue firmware ok",
    ] {
        assert!(
            audit.iter().any(|l| l.starts_with(needle)),
            "no audit line {needle:?}:\n{}",
            audit.join("\n")
        );
    }
    assert!(
        audit
            .iter()
            .any(|l| l.contains("admin.firmware.upload") && l.contains("completed: 6 parts")),
        "{}",
        audit.join("\n")
    );
}

/// A box's updater fetching a version from the hub through its gatewayd (the
/// admin listener, then the tunnel) while the hub is killed and restarted
/// twice: every attempt after a cut goes on from what is written, chunks the
/// running slot holds are copied instead of fetched, none is fetched twice,
/// and the slot and boot entry end up as the signed manifest says.
#[test]
fn a_box_fetches_firmware_over_the_tunnel_across_hub_restarts() {
    use gateway_updater::install::{Device, Event, Updater, Waiting};
    let mut hub = Hub::start("1h");
    let d = hub.dir.path().to_owned();
    let signer = Signer::new(3);
    hub.trust_firmware(&signer);
    // Twelve chunks: about 6 s at the default 2 MB/s for one box.
    let root = firmware_bundle_of(&signer, &d.join("b2.0"), ("2.0", 11), 0);
    let (code, _, err) = hub.ctl(
        "sam",
        &["firmware", "upload", d.join("b2.0").to_str().expect("path")],
    );
    assert_eq!(code, 0, "{err}");

    let echo = echo_server("127.0.1.1");
    let (config, state) = edge_config(&hub, "edge-a", echo, "");
    let (code, out) = enroll(&config, &hub.token("edge-a"));
    assert_eq!(code, 0, "{out}");
    let mut edge = Proc::start(&config);
    edge.wait_log("Tunnel up");
    let admin: SocketAddr = hub_admin_of(&config).parse().expect("admin");

    // The box: v1.0 in slot A, which shares chunks 4 and 8 with 2.0.
    let chunk = gateway_core::firmware::CHUNK_BYTES as usize;
    let size = root.len() + 4 * chunk;
    let mut a: Vec<u8> = root.iter().map(|b| b ^ 0x5a).collect();
    for shared in [4, 8] {
        let r = shared * chunk..(shared + 1) * chunk;
        a[r.clone()].copy_from_slice(&root[r]);
    }
    a.resize(size, 0);
    let boxdir = d.join("box");
    std::fs::create_dir_all(boxdir.join("esp/loader/entries")).expect("esp");
    std::fs::write(boxdir.join("esp/loader/entries/gw-1.0.conf"), "title 1.0\n").expect("entry");
    std::fs::write(boxdir.join("slot-a"), &a).expect("slot a");
    std::fs::write(boxdir.join("slot-b"), vec![0u8; size]).expect("slot b");
    let device = Device {
        state_dir: boxdir.join("updater"),
        esp: boxdir.join("esp"),
        slots: [boxdir.join("slot-a"), boxdir.join("slot-b")],
        running: gateway_updater::esp::SlotName::A,
        version: "1.0".into(),
        hardware: "qemu-x86_64".into(),
        trusted: vec![
            gateway_core::firmware::PublicKey::parse(&signer.public_file()).expect("key"),
        ],
        image_security_version: 0,
    };
    let (progress, done) = std::sync::mpsc::channel();
    let fetching = std::thread::spawn(move || {
        let mut updater = Updater::open(device).expect("updater");
        let mut on = |e: &Event| {
            if let Event::Chunk { done, .. } = e {
                let _ = progress.send(*done);
            }
        };
        let mut said = Vec::new();
        let got = gateway_updater::hub::fetch(
            &mut updater,
            &|| gateway_updater::install::config_trying(&state),
            ("2.0", admin),
            (false, Duration::from_secs(120)),
            (&mut on, &mut |line: String| said.push(line)),
        );
        (got, said)
    });
    // The hub goes away twice while chunks flow, and comes back.
    for after in [3, 7] {
        loop {
            let n = done
                .recv_timeout(Duration::from_secs(60))
                .expect("progress");
            if n >= after {
                break;
            }
        }
        hub.kill();
        hub.run();
    }
    let (got, said) = fetching.join().expect("fetch thread");
    let got = got.unwrap_or_else(|e| panic!("{e}\n{}", said.join("\n")));
    assert_eq!(got.waiting, Waiting::Reboot, "{said:?}");
    assert!(got.tries >= 3, "two cuts, {} tries: {said:?}", got.tries);
    assert_eq!(
        got.fetched,
        12 - 2,
        "each chunk fetched once, two copied: {said:?}"
    );
    let b = std::fs::read(boxdir.join("slot-b")).expect("slot b");
    assert!(b[..root.len()] == root[..], "slot B holds 2.0's root image");
    let entries: Vec<String> = std::fs::read_dir(boxdir.join("esp/loader/entries"))
        .expect("entries")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(entries.iter().any(|e| e == "gw-2.0+3.conf"), "{entries:?}");
    assert_eq!(
        std::fs::read(boxdir.join("esp/EFI/gw/2.0/linux")).expect("kernel"),
        std::fs::read(d.join("b2.0/linux")).expect("bundle kernel")
    );
    drop(edge);
}

/// The box as the updater sees it in the firmware tests: slots and an ESP
/// in files, running `version` from `slot`.
fn test_box(
    boxdir: &Path,
    signer: &Signer,
    (version, slot): (&str, gateway_updater::esp::SlotName),
) -> gateway_updater::install::Device {
    gateway_updater::install::Device {
        state_dir: boxdir.join("updater"),
        esp: boxdir.join("esp"),
        slots: [boxdir.join("slot-a"), boxdir.join("slot-b")],
        running: slot,
        version: version.into(),
        hardware: "qemu-x86_64".into(),
        trusted: vec![
            gateway_core::firmware::PublicKey::parse(&signer.public_file()).expect("key"),
        ],
        image_security_version: 0,
    }
}

/// Central ops roll firmware out as docs/operate.md says, against a real hub
/// and a real enrolled gatewayd, with the updater's library standing in for
/// its units (the path unit's `follow`, the reboot, systemd-boot's counter
/// and systemd-bless-boot are played by the test; image/test-update runs
/// them for real under qemu):
///
/// 1. `firmware rollout 2.0`: the hub offers it with the box's heartbeats,
///    gatewayd hands it to the updater, `follow` fetches it over the tunnel
///    and reboots (the window is `any`); on the trial boot the gate passes
///    only once a hub acknowledged a heartbeat running 2.0; blessed, the
///    box reports 2.0 committed, the wave succeeds and the rollout is done;
///    `devices list` shows 2.0 running, 1.0 standing by;
/// 2. `firmware rollout 3.0` (a build that never reaches the hub): its
///    trial boots use up their tries, the box is back on 2.0 by itself and
///    reports the rollback with the failed boot's journal; the rollout
///    pauses by itself past `--max-failures 0`, and 3.0 is not taken again.
#[test]
fn firmware_rolls_out_in_waves_commits_and_a_broken_version_rolls_back() {
    use gateway_updater::esp::SlotName;
    use gateway_updater::follow::{Env, Followed};
    use gateway_updater::install::{Event, Updater};
    let mut hub = Hub::start("1h");
    let d = hub.dir.path().to_owned();
    let signer = Signer::new(3);
    hub.trust_firmware(&signer);
    let root2 = firmware_bundle(&signer, &d.join("b2.0"), "2.0", 0);
    let root3 = firmware_bundle(&signer, &d.join("b3.0"), "3.0", 7);
    for b in ["b2.0", "b3.0"] {
        let (code, _, err) = hub.ctl(
            "sam",
            &["firmware", "upload", d.join(b).to_str().expect("path")],
        );
        assert_eq!(code, 0, "{err}");
    }
    let boxdir = d.join("box");
    let (handoff, updater_state) = (boxdir.join("handoff"), boxdir.join("updater"));
    std::fs::create_dir_all(&handoff).expect("handoff");
    let echo = echo_server("127.0.1.1");
    let (config, _) = edge_config(&hub, "edge-a", echo, "");
    let mut text = std::fs::read_to_string(&config).expect("config");
    text += &format!(
        "\n[update]\nwindow = \"any\"\ntrial = \"20s\"\nhandoff = \"{}\"\nupdater_state = \"{}\"\n",
        handoff.display(),
        updater_state.display()
    );
    std::fs::write(&config, text).expect("config");
    let (code, out) = enroll(&config, &hub.token("edge-a"));
    assert_eq!(code, 0, "{out}");
    let admin: SocketAddr = hub_admin_of(&config).parse().expect("admin");

    // The box runs 1.0 from slot A; its updater publishes that.
    let size = root2.len().max(root3.len()) + gateway_core::firmware::CHUNK_BYTES as usize;
    std::fs::create_dir_all(boxdir.join("esp/loader/entries")).expect("esp");
    std::fs::write(boxdir.join("esp/loader/entries/gw-1.0.conf"), "title 1.0\n").expect("entry");
    std::fs::write(boxdir.join("slot-a"), vec![0x11u8; size]).expect("slot a");
    std::fs::write(boxdir.join("slot-b"), vec![0u8; size]).expect("slot b");
    drop(Updater::open(test_box(&boxdir, &signer, ("1.0", SlotName::A))).expect("updater"));
    let mut edge = Proc::start(&config);
    edge.wait_log("Tunnel up");
    let firmware_of = |hub: &Hub| -> Value {
        let (code, out, err) = hub.ctl("sam", &["devices", "show", "edge-a", "--format", "json"]);
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(&out).expect("json");
        v["status"]["firmware"].clone()
    };
    poll_blocking(
        "the box's firmware in its heartbeat",
        Duration::from_secs(15),
        || {
            let f = firmware_of(&hub);
            if f["running"] == "1.0" {
                Ok(())
            } else {
                Err(f.to_string())
            }
        },
    );
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .expect("boot id")
        .trim()
        .to_owned();
    // One pass of the path unit's service.
    // One pass of the path unit's service, rebooting with `reboot`.
    let pass = |version: &str,
                slot: SlotName,
                reboot: &mut dyn FnMut() -> Result<(), String>|
     -> Result<Followed, String> {
        let mut updater =
            Updater::open(test_box(&boxdir, &signer, (version, slot))).expect("updater");
        let env = Env {
            handoff: &handoff,
            admin,
            give_up: Duration::from_secs(60),
            boot_id: &boot_id,
            minute: 0,
            reboot,
        };
        gateway_updater::follow::follow(
            &mut updater,
            env,
            (&mut |_: &Event| {}, &mut |_: String| {}),
        )
    };
    // A pass whose reboot is recorded in `rebooted`.
    let follow = |version: &str, slot: SlotName, rebooted: &mut bool| -> Followed {
        pass(version, slot, &mut || {
            *rebooted = true;
            Ok(())
        })
        .expect("follow")
    };
    // `firmware rollout VERSION` to every box in one wave, no failure allowed.
    let roll = |version: &str, extra: &[&str]| {
        let mut args = vec![
            "firmware",
            "rollout",
            version,
            "--waves",
            "100%",
            "--max-failures",
            "0",
        ];
        args.extend_from_slice(extra);
        hub.ctl("sam", &args)
    };
    let wait_offer = |version: &str| {
        poll_blocking(
            "gatewayd hands the offer to the updater",
            Duration::from_secs(30),
            || match std::fs::read_to_string(handoff.join("offer.json")) {
                Ok(t) if t.contains(&format!("\"{version}\"")) => Ok(t),
                other => Err(format!("{other:?}")),
            },
        )
    };
    let entries = || -> Vec<String> {
        let mut e: Vec<String> = std::fs::read_dir(boxdir.join("esp/loader/entries"))
            .expect("entries")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        e.sort();
        e
    };

    // 1. 2.0, committed.
    let (code, id, err) = roll("2.0", &["--trial", "20s"]);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_owned();
    let offer = wait_offer("2.0");
    assert!(offer.contains("\"any\"") && offer.contains("20"), "{offer}");
    let mut rebooted = false;
    assert_eq!(
        follow("1.0", SlotName::A, &mut rebooted),
        Followed::Rebooting("2.0".into())
    );
    assert!(rebooted);
    assert!(
        entries().contains(&"gw-2.0+3.conf".to_owned()),
        "{:?}",
        entries()
    );
    assert!(std::fs::read(boxdir.join("slot-b")).expect("slot b")[..root2.len()] == root2[..]);
    // The trial boot: 2.0 from slot B, its entry counting (systemd-boot
    // took one try).
    std::fs::rename(
        boxdir.join("esp/loader/entries/gw-2.0+3.conf"),
        boxdir.join("esp/loader/entries/gw-2.0+2-1.conf"),
    )
    .expect("count a try");
    let trial = Updater::open(test_box(&boxdir, &signer, ("2.0", SlotName::B))).expect("updater");
    assert_eq!(trial.status().expect("status").phase, "trial");
    drop(trial);
    // The gate: gatewayd's tunnel is up, and it passes once a hub has
    // acknowledged a heartbeat carrying 2.0 in this boot.
    let acked = || {
        gateway_updater::follow::ack(&handoff, &boot_id)
            .ok()
            .flatten()
            .is_some_and(|a| a.running == "2.0")
    };
    gateway_updater::gate::wait(
        admin,
        Duration::from_secs(30),
        Duration::from_millis(200),
        &acked,
    )
    .expect("the health gate passes");
    // systemd-bless-boot marks the entry good.
    std::fs::rename(
        boxdir.join("esp/loader/entries/gw-2.0+2-1.conf"),
        boxdir.join("esp/loader/entries/gw-2.0.conf"),
    )
    .expect("bless");
    let committed =
        Updater::open(test_box(&boxdir, &signer, ("2.0", SlotName::B))).expect("updater");
    assert_eq!(committed.status().expect("status").phase, "report");
    drop(committed);
    poll_blocking(
        "the hub acknowledges the outcome",
        Duration::from_secs(15),
        || match gateway_updater::follow::ack(&handoff, &boot_id) {
            Ok(Some(a)) if a.outcome.is_some() => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let mut no = false;
    assert!(matches!(
        follow("2.0", SlotName::B, &mut no),
        Followed::Reported(_)
    ));
    assert!(!no);
    let (code, out, err) = hub.ctl(
        "sam",
        &["rollout", "status", &id, "--wait", "--timeout", "1m"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(": done") && out.contains("applied"), "{out}");
    poll_blocking(
        "devices list shows the versions",
        Duration::from_secs(15),
        || {
            let (_, out, _) = hub.ctl("sam", &["devices", "list"]);
            let line = out
                .lines()
                .find(|l| l.starts_with("edge-a"))
                .unwrap_or("")
                .to_owned();
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.contains(&"2.0") && cols.contains(&"1.0") {
                Ok(())
            } else {
                Err(out)
            }
        },
    );

    // 2. 3.0, which never comes up: rolled back, and the rollout pauses.
    let (code, id3, err) = roll("3.0", &["--trial", "20s"]);
    assert_eq!(code, 0, "{err}");
    let id3 = id3.trim().to_owned();
    wait_offer("3.0");
    let mut rebooted = false;
    assert_eq!(
        follow("2.0", SlotName::B, &mut rebooted),
        Followed::Rebooting("3.0".into())
    );
    assert!(std::fs::read(boxdir.join("slot-a")).expect("slot a")[..root3.len()] == root3[..]);
    // Three trial boots whose gate never passes: systemd-boot counts the
    // entry down to none left and boots 2.0 by itself.
    std::fs::rename(
        boxdir.join("esp/loader/entries/gw-3.0+3.conf"),
        boxdir.join("esp/loader/entries/gw-3.0+0-3.conf"),
    )
    .expect("tries used up");
    let mut back =
        Updater::open(test_box(&boxdir, &signer, ("2.0", SlotName::B))).expect("updater");
    back.keep_journal(vec![
        "gatewayd@edge[812]: no hub answered within 20s".into(),
    ])
    .expect("journal");
    drop(back);
    let (code, out, err) = hub.ctl(
        "sam",
        &["rollout", "status", &id3, "--wait", "--timeout", "1m"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(": paused") && out.contains("reverted"),
        "{out}"
    );
    assert!(
        out.contains("back on 2.0") && out.contains("no hub answered"),
        "{out}"
    );
    poll_blocking("the rollback acknowledged", Duration::from_secs(15), || {
        match gateway_updater::follow::ack(&handoff, &boot_id) {
            Ok(Some(a))
                if matches!(
                    a.outcome,
                    Some(gateway_core::firmware::update::Outcome::RolledBack { .. })
                ) =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    });
    assert!(matches!(
        follow("2.0", SlotName::B, &mut no),
        Followed::Reported(_)
    ));
    // 3.0 is offered still (the rollout is paused, not aborted) but never
    // taken again.
    assert_eq!(follow("2.0", SlotName::B, &mut no), Followed::Nothing);
    assert!(!no, "never rebooted again");
    let f = firmware_of(&hub);
    assert_eq!(f["running"], "2.0", "{f}");
    let audit = audit_lines(&hub.dir.path().join("state"));
    for needle in [
        "firmware.step edge-a firmware ok [] phase=writing running=1.0 target=2.0",
        "firmware.outcome edge-a firmware ok [] committed 2.0",
        "firmware.outcome edge-a firmware error [] rolled back: 3.0",
        "rollout.pause",
    ] {
        assert!(audit.iter().any(|l| l.starts_with(needle) || (needle == "rollout.pause" && l.contains(needle))), "{needle}: {audit:#?}");
    }
    let edge_audit = audit_lines(&d.join("edge-a").join("state"));
    assert!(
        edge_audit
            .iter()
            .any(|l| l.starts_with("firmware.offer hub 2.0 ok")),
        "{edge_audit:#?}"
    );

    // 3. 2.5, signed but below the security version 2.0 committed: the
    // paused rollout is aborted first (it holds the box), then the box's
    // updater refuses 2.5, says why, and that rollout pauses too.
    firmware_bundle(&signer, &d.join("b2.5"), "2.5", 9);
    let manifest = d.join("b2.5/manifest.json");
    let text = std::fs::read_to_string(&manifest)
        .expect("manifest")
        .replace("\"security_version\": 4", "\"security_version\": 3");
    std::fs::write(&manifest, &text).expect("manifest");
    std::fs::write(
        d.join("b2.5/manifest.json.minisig"),
        signer.sign(text.as_bytes()),
    )
    .expect("sig");
    let (code, _, err) = hub.ctl(
        "sam",
        &["firmware", "upload", d.join("b2.5").to_str().expect("path")],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = roll("2.5", &[]);
    assert_ne!(code, 0, "the box is held by the paused rollout");
    assert!(err.contains("rollout"), "{err}");
    let (code, _, err) = hub.ctl("sam", &["rollout", "abort", &id3]);
    assert_eq!(code, 0, "{err}");
    let (code, id25, err) = roll("2.5", &[]);
    assert_eq!(code, 0, "{err}");
    let id25 = id25.trim().to_owned();
    wait_offer("2.5");
    match follow("2.0", SlotName::B, &mut no) {
        Followed::Refused(v, why) => assert!(v == "2.5" && why.contains("security"), "{why}"),
        other => panic!("{other:?}"),
    }
    let (code, out, err) = hub.ctl(
        "sam",
        &["rollout", "status", &id25, "--wait", "--timeout", "1m"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(": paused") && out.contains("failed") && out.contains("updater:"),
        "{out}"
    );
    assert_eq!(
        follow("2.0", SlotName::B, &mut no),
        Followed::Nothing,
        "not tried again"
    );
    assert!(!no);

    // 4. 2.7 staged (the reboot does not happen), then its rollout aborted:
    // the hub withdraws it, the updater removes its entry before it boots.
    firmware_bundle(&signer, &d.join("b2.7"), "2.7", 11);
    let (code, _, err) = hub.ctl(
        "sam",
        &["firmware", "upload", d.join("b2.7").to_str().expect("path")],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = hub.ctl("sam", &["rollout", "abort", &id25]);
    assert_eq!(code, 0, "{err}");
    let (code, id27, err) = roll("2.7", &[]);
    assert_eq!(code, 0, "{err}");
    wait_offer("2.7");
    assert_eq!(
        pass("2.0", SlotName::B, &mut || Err(
            "no reboot in this test".to_owned()
        )),
        Err("no reboot in this test".to_owned())
    );
    assert_eq!(
        Updater::open(test_box(&boxdir, &signer, ("2.0", SlotName::B)))
            .expect("updater")
            .status()
            .expect("status")
            .phase,
        "staged"
    );
    assert!(
        entries().iter().any(|e| e.starts_with("gw-2.7+")),
        "{:?}",
        entries()
    );
    let (code, _, err) = hub.ctl("sam", &["rollout", "abort", id27.trim()]);
    assert_eq!(code, 0, "{err}");
    poll_blocking(
        "gatewayd hands the withdrawal to the updater",
        Duration::from_secs(30),
        || match std::fs::read_to_string(handoff.join("withdraw.json")) {
            Ok(t) if t.contains("2.7") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert!(!handoff.join("offer.json").exists(), "the offer is gone");
    assert_eq!(
        follow("2.0", SlotName::B, &mut no),
        Followed::Withdrawn("2.7".into())
    );
    assert!(
        !entries().iter().any(|e| e.contains("2.7")),
        "{:?}",
        entries()
    );
    assert!(
        entries().iter().any(|e| e.starts_with("gw-2.0")),
        "{:?}",
        entries()
    );
    poll_blocking(
        "the box is idle on 2.0 again",
        Duration::from_secs(15),
        || {
            let f = firmware_of(&hub);
            if f["phase"] == "idle" && f["running"] == "2.0" {
                Ok(())
            } else {
                Err(f.to_string())
            }
        },
    );
    drop(edge);
}
