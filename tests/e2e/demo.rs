//! `gatewayd demo` as a new user runs it: it tells its story on stdout, the
//! published service it names answers, and Ctrl-C stops it cleanly and removes
//! its directory.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[test]
fn the_demo_runs_the_whole_story_and_cleans_up() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
        .arg("demo")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gatewayd demo");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.starts_with("Running.")) {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => seen.push(l),
            Err(_) => {
                let _ = child.kill();
                let mut err = String::new();
                let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
                panic!(
                    "the demo did not finish its setup:\n{}\n{err}",
                    seen.join("\n")
                );
            }
        }
    }
    let text = seen.join("\n");
    for want in [
        "-> HTTP/1.0 200 OK",
        "dept-b received",
        "\"status\":\"delivered\"",
        "[R0.default-deny]",
        "with its certificate -> 200",
        "pensioners",
        "not granted -> 403",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    // The published service it names answers a new client.
    let url = seen
        .iter()
        .find_map(|l| l.trim().strip_prefix("curl http://"))
        .and_then(|l| l.split('/').next())
        .expect("a published address");
    let mut s = std::net::TcpStream::connect(url).expect("connect to the published service");
    s.write_all(b"GET /pension/7 HTTP/1.0\r\n\r\n")
        .expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    assert!(answer.contains("pension record"), "{answer}");
    // The central management commands it prints work as printed.
    let env: Vec<(String, String)> = seen
        .iter()
        .find_map(|l| l.trim().strip_prefix("export GATEWAYCTL_HUB="))
        .map(|rest| format!("GATEWAYCTL_HUB={rest}"))
        .expect("an export line")
        .split_whitespace()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    let ctl = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("gatewayctl");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table = ctl(&["devices", "list"]);
    assert!(
        table.contains("dept-a") && table.contains("dept-b"),
        "{table}"
    );
    let diag = ctl(&["command", "dept-a", "diagnostics"]);
    assert!(diag.contains("config_valid"), "{diag}");
    let dir = seen
        .iter()
        .find_map(|l| l.strip_prefix("State directory: "))
        .expect("state directory")
        .to_owned();
    assert!(std::path::Path::new(&dir).is_dir());
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).expect("ctrl-c");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
}
