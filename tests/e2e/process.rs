//! `gatewayd run` as a real process for the process tests: start it, read its
//! log lines, signal it, and wait for its exit without sleeping.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;

/// A free TCP port on `ip`, never one this process handed out before: the
/// kernel may give a port back as soon as its listener is closed, and two
/// listeners of one config on the same port are refused.
pub fn free_tcp(ip: &str) -> SocketAddr {
    static GIVEN: std::sync::Mutex<Vec<SocketAddr>> = std::sync::Mutex::new(Vec::new());
    loop {
        let l = std::net::TcpListener::bind((ip, 0)).expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !given.contains(&addr) {
            given.push(addr);
            return addr;
        }
    }
}

pub fn free_udp() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr")
}

/// Asks `probe` until it answers `Ok(value)`, up to `limit`: for state only
/// reachable by asking (an HTTP API of another process, a log file). `Err(last)`
/// says what it saw, for the failure message. The one polling loop of the
/// process tests.
pub fn poll_blocking<T>(
    what: &str,
    limit: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(last) => assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}; last seen:\n{last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running `gatewayd run`, with its stderr lines forwarded to a channel.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    pub fn start(config: &Path) -> Proc {
        Self::start_with_grace(config, "2s")
    }

    pub fn start_with_grace(config: &Path, grace: &str) -> Proc {
        Self::start_env(config, grace, &[])
    }

    /// Starts with extra environment variables.
    pub fn start_env(config: &Path, grace: &str, env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
            .args([
                "run",
                "--config",
                config.to_str().expect("path"),
                "--grace",
                grace,
            ])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gatewayd");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_log(&mut self, needle: &str) {
        if self.seen.iter().any(|l| l.contains(needle)) {
            return;
        }
        self.wait_next_log(needle);
    }

    /// Waits for a log line containing `needle` among lines not read yet.
    pub fn wait_next_log(&mut self, needle: &str) {
        self.wait_next_log_within(needle, Duration::from_secs(15));
    }

    /// [`Proc::wait_next_log`] for up to `within`.
    pub fn wait_next_log_within(&mut self, needle: &str, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.contains(needle);
                    self.seen.push(l);
                    if hit {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "no log line with {needle:?}; saw:\n{}",
            self.seen.join("\n")
        );
    }

    /// Every log line so far (read or not), for a failure message.
    pub fn log_so_far(&mut self) -> String {
        self.seen.extend(self.lines.try_iter());
        self.seen.join("\n")
    }

    pub fn signal(&self, s: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), s).expect("kill");
    }

    /// Waits up to 15 s for the exit, and returns its code and every log line.
    pub fn wait_exit(mut self) -> (i32, Vec<String>) {
        let pid = Pid::from_raw(self.child.id() as i32);
        let (tx, exited) = mpsc::channel();
        // WNOWAIT: learn of the exit without reaping, so `Child` still owns the pid.
        std::thread::spawn(move || {
            let _ = tx.send(waitid(
                Id::Pid(pid),
                WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
            ));
        });
        exited
            .recv_timeout(Duration::from_secs(15))
            .expect("gatewayd did not exit within 15 s")
            .expect("waitid");
        let status = self.child.wait().expect("reap");
        // stderr closed at exit: the reader thread has sent every line.
        self.seen.extend(self.lines.iter());
        (status.code().unwrap_or(-1), std::mem::take(&mut self.seen))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
