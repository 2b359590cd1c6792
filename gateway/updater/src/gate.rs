//! The health gate of a trial boot: the new version is kept only if
//! gatewayd's tunnel to a hub comes up within the trial time (its `/readyz`
//! answers 200: "a hub tunnel is up") and a hub has acknowledged a heartbeat
//! in which the box runs the new version (gatewayd's `ack.json` in the
//! handoff, of this boot). `gateway-boot-ok.service`, required by
//! `boot-complete.target`, runs it; when it fails the unit reboots the box
//! and systemd-boot's counter runs down.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The most of an answer the gate reads.
const MAX_ANSWER: u64 = 4096;

/// What one look at `/readyz` saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Look {
    /// 200: a hub tunnel is up.
    Ready,
    /// Another status, with its first line.
    NotReady(String),
    /// No answer (gatewayd not up yet).
    NoAnswer(String),
}

/// Asks gatewayd's admin listener at `admin` for `/readyz`, waiting at most
/// `timeout`.
pub fn look(admin: SocketAddr, timeout: Duration) -> Look {
    let attempt = || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&admin, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut text = String::new();
        s.take(MAX_ANSWER).read_to_string(&mut text)?;
        Ok(text)
    };
    match attempt() {
        Err(e) => Look::NoAnswer(e.to_string()),
        Ok(text) => {
            let status = text.lines().next().unwrap_or("").to_owned();
            if status.split_whitespace().nth(1) == Some("200") {
                Look::Ready
            } else {
                let body = text.split("\r\n\r\n").nth(1).unwrap_or("").trim();
                Look::NotReady(format!("{status}: {body}"))
            }
        }
    }
}

/// Waits until gatewayd is ready and `acked` says a hub acknowledged the
/// new version, or `trial` has passed; the last thing seen when it has not.
///
/// # Errors
/// The last look, when the trial ran out.
pub fn wait(
    admin: SocketAddr,
    trial: Duration,
    every: Duration,
    acked: &dyn Fn() -> bool,
) -> Result<Duration, Look> {
    let start = Instant::now();
    loop {
        let mut seen = look(admin, every.max(Duration::from_secs(1)));
        if seen == Look::Ready {
            if acked() {
                return Ok(start.elapsed());
            }
            seen = Look::NotReady(
                "a hub tunnel is up, but no hub has acknowledged a heartbeat carrying this version yet".into(),
            );
        }
        if start.elapsed() >= trial {
            return Err(seen);
        }
        std::thread::sleep(every.min(trial.saturating_sub(start.elapsed())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve(answer: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let mut buf = [0; 512];
                let _ = s.read(&mut buf);
                let _ = s.write_all(answer.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn ready_only_on_200() {
        let up = serve("HTTP/1.1 200 OK\r\n\r\nready: a hub tunnel is up\n");
        assert_eq!(look(up, Duration::from_secs(2)), Look::Ready);
        let down =
            serve("HTTP/1.1 503 Service Unavailable\r\n\r\nnot ready: no hub tunnel is up\n");
        assert_eq!(
            look(down, Duration::from_secs(2)),
            Look::NotReady(
                "HTTP/1.1 503 Service Unavailable: not ready: no hub tunnel is up".into()
            )
        );
        let r = wait(
            down,
            Duration::from_millis(300),
            Duration::from_millis(100),
            &|| true,
        );
        assert!(matches!(r, Err(Look::NotReady(_))), "{r:?}");
        // Up, but no acknowledgement: not passed.
        let r = wait(
            up,
            Duration::from_millis(300),
            Duration::from_millis(100),
            &|| false,
        );
        assert!(
            matches!(&r, Err(Look::NotReady(why)) if why.contains("acknowledged")),
            "{r:?}"
        );
        assert!(
            wait(
                up,
                Duration::from_millis(300),
                Duration::from_millis(100),
                &|| true
            )
            .is_ok()
        );
    }

    #[test]
    fn no_listener_is_no_answer() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        assert!(matches!(
            look(addr, Duration::from_secs(1)),
            Look::NoAnswer(_)
        ));
    }
}
