//! `gatewayd run` as a real process: refusals at start, SIGHUP reload, SIGTERM
//! drain. Ports come from binding port 0 and releasing it just before start.

mod common;
mod net;
mod process;

use std::net::SocketAddr;

use net::*;
use nix::sys::signal::Signal;
use process::*;

#[test]
fn a_group_readable_key_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new();
    let (_, key) = pki.issue("hub-01");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let state = tempfile::tempdir().expect("state");
    let spec = HubSpec::new("hub-01", 2, &[]);
    let text = hub_toml(
        &pki,
        &spec,
        free_udp(),
        &[],
        (free_tcp("127.0.0.1"), free_tcp("127.0.0.1")),
        state.path(),
    );
    let path = state.path().join("hub.toml");
    std::fs::write(&path, text).expect("write");
    let (code, lines) = Proc::start(&path).wait_exit();
    assert_eq!(code, 77, "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("readable by group or others") && l.contains("chmod 600")),
        "{lines:#?}"
    );
}

#[test]
fn an_invalid_config_exits_64_before_binding() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("bad.toml");
    std::fs::copy(common::root().join("tests/configs/bad/level-9.toml"), &path).expect("copy");
    let (code, lines) = Proc::start(&path).wait_exit();
    assert_eq!(code, 64, "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("is not a protection level")),
        "{lines:#?}"
    );
}

/// A hub publishing `edge-b/echo` on `publish` and an edge serving it from a
/// legacy echo server, as config files ready for `gatewayd run`.
struct Pair {
    rt: tokio::runtime::Runtime,
    /// Keeps the certificates the configs name on disk.
    _pki: Pki,
    hub_text: String,
    hub_path: std::path::PathBuf,
    edge_path: std::path::PathBuf,
    publish: SocketAddr,
    hub_state: tempfile::TempDir,
    _edge_state: tempfile::TempDir,
}

impl Pair {
    fn new() -> Pair {
        let rt = tokio::runtime::Runtime::new().expect("rt");
        let pki = Pki::new();
        pki.issue("hub-01");
        pki.issue("edge-b");
        let echo_b = rt.block_on(echo("127.0.2.10"));
        let (hub_state, edge_state) = (
            tempfile::tempdir().expect("state"),
            tempfile::tempdir().expect("state"),
        );
        let (quic, publish) = (free_udp(), free_tcp("127.0.0.1"));
        let spec = HubSpec::new("hub-01", 2, &["edge-b/echo"]);
        let hub_text = hub_toml(
            &pki,
            &spec,
            quic,
            &[publish],
            (free_tcp("127.0.0.1"), free_tcp("127.0.0.1")),
            hub_state.path(),
        );
        let hub_path = hub_state.path().join("hub.toml");
        std::fs::write(&hub_path, &hub_text).expect("write");
        let espec = EdgeSpec {
            services: vec![("echo", echo_b.addr, "\"extranet\"", None, None)],
            ..EdgeSpec::new("edge-b", 2, 2, vec![quic])
        };
        let edge_path = edge_state.path().join("edge.toml");
        std::fs::write(
            &edge_path,
            edge_toml(&pki, &espec, &[], free_tcp("127.0.0.1"), edge_state.path()),
        )
        .expect("write");
        Pair {
            rt,
            _pki: pki,
            hub_text,
            hub_path,
            edge_path,
            publish,
            hub_state,
            _edge_state: edge_state,
        }
    }
}

#[test]
fn sighup_adds_a_publish_and_sigterm_drains() {
    let pair = Pair::new();
    let (rt, hub_text, hub_path, p1) = (&pair.rt, &pair.hub_text, &pair.hub_path, pair.publish);
    let p2 = free_tcp("127.0.0.1");

    let mut hub = Proc::start(hub_path);
    hub.wait_log("Hub started");
    let mut edge = Proc::start(&pair.edge_path);
    edge.wait_log("Tunnel up");
    let back = rt
        .block_on(round_trip(p1, "127.0.0.1", b"before reload".to_vec()))
        .expect("relay");
    assert_eq!(back, b"before reload");

    // A broken config on SIGHUP is refused; the old one stays.
    std::fs::write(hub_path, format!("{hub_text}\n[[publish]]\nservice = \"edge-b/echo\"\nzone = \"nowhere\"\nlisten = \"{p2}\"\n")).expect("write");
    hub.signal(Signal::SIGHUP);
    hub.wait_log("Reload refused");
    // A good one adds the publish.
    std::fs::write(hub_path, format!("{hub_text}\n[[publish]]\nservice = \"edge-b/echo\"\nzone = \"extranet\"\nlisten = \"{p2}\"\n")).expect("write");
    hub.signal(Signal::SIGHUP);
    hub.wait_log("Configuration reloaded");
    let back = rt
        .block_on(round_trip(p2, "127.0.0.1", b"after reload".to_vec()))
        .expect("relay on the new publish");
    assert_eq!(back, b"after reload");

    edge.signal(Signal::SIGTERM);
    hub.signal(Signal::SIGTERM);
    let (edge_code, edge_lines) = edge.wait_exit();
    let (hub_code, hub_lines) = hub.wait_exit();
    assert_eq!(edge_code, 0, "{edge_lines:#?}");
    assert_eq!(hub_code, 0, "{hub_lines:#?}");
    let lines = audit_lines(pair.hub_state.path());
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("config.reload") && l.contains(" error ")),
        "the refused reload is audited: {lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("config.reload") && l.contains(" ok ")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("node.stop")),
        "{lines:#?}"
    );
}

#[test]
fn a_second_sigterm_forces_the_exit() {
    use std::io::{Read, Write};
    let pair = Pair::new();
    let mut edge = Proc::start(&pair.edge_path);
    // The hub drains for up to ten minutes: only a second signal ends it sooner.
    let mut hub = Proc::start_with_grace(&pair.hub_path, "10m");
    edge.wait_log("Tunnel up");
    // A relay that stays open through the drain.
    let mut held = std::net::TcpStream::connect(pair.publish).expect("connect");
    held.write_all(b"ping").expect("write");
    let mut b = [0u8; 4];
    held.read_exact(&mut b).expect("echo");
    hub.signal(Signal::SIGTERM);
    hub.wait_log("Draining");
    // The open relay still works while the hub drains, and holds the drain.
    held.write_all(b"pong").expect("write while draining");
    held.read_exact(&mut b).expect("echo while draining");
    assert_eq!(&b, b"pong");
    assert!(
        hub.child.try_wait().expect("wait").is_none(),
        "the open relay holds the drain"
    );
    hub.signal(Signal::SIGTERM);
    let (code, lines) = hub.wait_exit();
    assert_eq!(code, 1, "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("Second signal")),
        "{lines:#?}"
    );
    drop(held);
}

#[test]
fn it_tells_the_service_manager_ready_watchdog_and_stopping() {
    let pair = Pair::new();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("notify socket");
    sock.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .expect("timeout");
    let mut hub = Proc::start_env(
        &pair.hub_path,
        "2s",
        &[
            ("NOTIFY_SOCKET", path.to_str().expect("path")),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut seen = Vec::new();
    let until = |want: &str, seen: &mut Vec<String>| {
        let mut buf = [0u8; 4096];
        while !seen.iter().any(|m| m.contains(want)) {
            let n = sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {want:?} (got {seen:?}): {e}"));
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    until("READY=1", &mut seen);
    assert!(
        seen.iter().any(|m| m.contains("STATUS=running: ")),
        "{seen:?}"
    );
    // The watchdog is fed at half of WATCHDOG_USEC, from the main loop.
    until("WATCHDOG=1", &mut seen);
    seen.retain(|m| !m.contains("WATCHDOG=1"));
    until("WATCHDOG=1", &mut seen);
    hub.wait_log("Hub started");
    hub.signal(Signal::SIGTERM);
    until("STOPPING=1", &mut seen);
    let (code, lines) = hub.wait_exit();
    assert_eq!(code, 0, "{lines:#?}");
}

#[test]
fn started_as_root_it_drops_to_node_user_after_binding() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if !status
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    {
        println!("skipped: needs root to drop it");
        return;
    }
    let pair = Pair::new();
    let text = pair
        .hub_text
        .replacen("role = \"hub\"", "role = \"hub\"\nuser = \"nobody\"", 1);
    std::fs::write(&pair.hub_path, text).expect("write");
    let mut hub = Proc::start(&pair.hub_path);
    hub.wait_log("Dropped root privileges");
    let mut edge = Proc::start(&pair.edge_path);
    edge.wait_log("Tunnel up");
    let proc_status =
        std::fs::read_to_string(format!("/proc/{}/status", hub.child.id())).expect("status");
    let field = |name: &str| {
        proc_status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    assert!(
        field("Uid:").split_whitespace().all(|u| u == "65534"),
        "{proc_status}"
    );
    assert_eq!(field("CapEff:"), "0000000000000000", "{proc_status}");
    assert_eq!(field("CapPrm:"), "0000000000000000", "{proc_status}");
    // The listeners bound as root still serve.
    let back = pair
        .rt
        .block_on(round_trip(pair.publish, "127.0.0.1", b"as nobody".to_vec()))
        .expect("relay after the drop");
    assert_eq!(back, b"as nobody");
    hub.signal(Signal::SIGTERM);
    edge.signal(Signal::SIGTERM);
    let (code, lines) = hub.wait_exit();
    assert_eq!(code, 0, "{lines:#?}");
    let _ = edge.wait_exit();
    assert!(
        audit_lines(pair.hub_state.path())
            .iter()
            .any(|l| l.starts_with("node.stop")),
        "the audit is still written after the drop"
    );
}
