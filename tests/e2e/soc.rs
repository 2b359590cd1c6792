//! Alarms reach the security operations centre (`[alarms]`): a real rsyslog
//! with rsyslog-gnutls on loopback takes them over TLS (RFC 5425) with the
//! fields as structured data; an HTTPS webhook takes them as JSON with the
//! bearer token. A collector that is down holds nothing up: the alarms wait
//! in the audit chain, the target shows on /readyz as degraded and raises its
//! own alarm, and everything arrives once it is back.

mod net;
mod process;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use net::*;

/// Scans 15 of `ports` from `from`: one D2.scan alarm.
fn scan(from: &str, ports: &[SocketAddr]) {
    for p in ports.iter().take(15) {
        knock(from, *p);
    }
}

/// A hub with 15 publishes and `alarms` as its `[alarms]` section.
async fn hub_with(pki: &Pki, names: &[String], alarms: &str) -> HubNode {
    let publishes: Vec<&str> = names.iter().map(String::as_str).collect();
    let extra: &'static str = Box::leak(format!("\n[alarms]\n{alarms}").into_boxed_str());
    start_hub(
        pki,
        HubSpec {
            extra,
            ..HubSpec::new("hub-01", 2, &publishes)
        },
    )
    .await
}

fn publishes() -> Vec<String> {
    (0..15).map(|i| format!("edge-a/s{i}")).collect()
}

/// rsyslogd in the foreground with TLS on `port`, writing every message's
/// raw text to `out`.
struct Rsyslog {
    child: std::process::Child,
}

impl Rsyslog {
    fn start(dir: &Path, pki: &Pki, port: u16) -> Rsyslog {
        let (cert, key) = pki.issue("syslog");
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                r#"global(
  workDirectory="{dir}"
  DefaultNetstreamDriver="gtls"
  DefaultNetstreamDriverCAFile="{ca}"
  DefaultNetstreamDriverCertFile="{cert}"
  DefaultNetstreamDriverKeyFile="{key}"
)
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
input(type="imtcp" address="127.0.0.1" port="{port}")
template(name="raw" type="string" string="%rawmsg%\n")
*.* action(type="omfile" file="{dir}/received.log" template="raw")
"#,
                dir = dir.display(),
                ca = pki.ca().join("ca.pem").display(),
                cert = cert.display(),
                key = key.display(),
            ),
        )
        .expect("rsyslog.conf");
        let child = std::process::Command::new("rsyslogd")
            .args(["-n", "-f"])
            .arg(&conf)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("rsyslogd");
        process::poll_blocking("rsyslogd listening", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .map(drop)
                .map_err(|e| e.to_string())
        });
        Rsyslog { child }
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rsyslog_missing() -> Option<String> {
    if std::process::Command::new("rsyslogd")
        .arg("-v")
        .output()
        .is_err()
    {
        return Some("rsyslogd is not installed (apt-get install rsyslog rsyslog-gnutls)".into());
    }
    let gtls = [
        "/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so",
        "/usr/lib/rsyslog/lmnsd_gtls.so",
    ];
    if !gtls.iter().any(|p| Path::new(p).exists()) {
        return Some(
            "rsyslog's TLS driver is not installed (apt-get install rsyslog-gnutls)".into(),
        );
    }
    None
}

fn received(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("received.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_reach_rsyslog_over_tls_and_wait_while_it_is_down() {
    if let Some(why) = rsyslog_missing() {
        println!("skipped: {why}");
        return;
    }
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("dir");
    let port = process::free_tcp("127.0.0.1").port();
    let rsyslog = Rsyslog::start(dir.path(), &pki, port);
    let alarms = format!(
        "syslog = \"127.0.0.1:{port}\"\nsyslog_ca = \"{}\"\ndown_after = \"2s\"\n",
        pki.ca().join("ca.pem").display()
    );
    let names = publishes();
    let hub = hub_with(&pki, &names, &alarms).await;
    scan("127.0.9.1", &hub.publish);
    wait_for(
        "the alarm at the collector",
        Duration::from_secs(10),
        || received(dir.path()).contains("src=\"127.0.9.1\""),
    )
    .await;
    let text = received(dir.path());
    let line = text
        .lines()
        .find(|l| l.contains("127.0.9.1"))
        .expect("line");
    println!("rsyslog received: {line}");
    // <PRI>1 TIME HOST APP PROCID MSGID [SD] MSG; facility 4, severity 2 (high).
    assert!(line.starts_with("<34>1 "), "{line}");
    assert!(line.contains(" hub-01 gatewayd "), "{line}");
    assert!(line.contains(" D2.scan [gwAlarm@32473 "), "{line}");
    for field in [
        "attack=\"scan\"",
        "rule=\"D2.scan\"",
        "target=\"publish 127.0.0.1:",
        "time=\"20",
        "+08:00\"",
        "action=\"ban\"",
    ] {
        assert!(line.contains(field), "{field} in {line}");
    }

    // The collector goes away: the next alarm waits, /readyz says so, and
    // after down_after the target raises its own alarm.
    rsyslog.stop();
    scan("127.0.9.2", &hub.publish);
    let ctx = hub.running.ctx().clone();
    wait_for("the target marked down", Duration::from_secs(15), || {
        !ctx.metrics.forwarding_down().is_empty()
    })
    .await;
    let (status, body) = http_get(hub.running.admin_addr, "GET", "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("degraded: alarm forwarding to syslog 127.0.0.1:"),
        "{body}"
    );
    wait_for(
        "the target's own alarm in the audit",
        Duration::from_secs(15),
        || {
            audit_lines(hub.state.path()).iter().any(|l| {
                l.starts_with("detect.alarm 127.0.0.1 syslog") && l.contains("D7.forwarding")
            })
        },
    )
    .await;

    // Back: what waited arrives, in order, and /readyz is plain ready.
    let rsyslog = Rsyslog::start(dir.path(), &pki, port);
    wait_for("the alarms that waited", Duration::from_secs(30), || {
        let t = received(dir.path());
        t.contains("src=\"127.0.9.2\"") && t.contains("D7.forwarding")
    })
    .await;
    let t = received(dir.path());
    assert!(
        t.find("src=\"127.0.9.2\"") < t.find("D7.forwarding"),
        "in the order they were raised:\n{t}"
    );
    wait_for("the target up again", Duration::from_secs(10), || {
        ctx.metrics.forwarding_down().is_empty()
    })
    .await;
    let (_, body) = http_get(hub.running.admin_addr, "GET", "/readyz").await;
    assert!(!body.contains("degraded"), "{body}");
    let metrics = http_get(hub.running.admin_addr, "GET", "/metrics").await.1;
    assert!(
        metrics.contains("gateway_alarm_forward_up{target=\"syslog 127.0.0.1:"),
        "{metrics}"
    );
    drop(rsyslog);
}

/// A webhook server: HTTPS with a certificate of `pki`, recording each POST's
/// authorization header and body, answering 200 (or 503 while `failing`).
async fn webhook(pki: &Pki) -> (SocketAddr, Arc<Mutex<Vec<(String, String)>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (cert, key) = pki.issue("soc");
    let tls = gateway_daemon::tunnel::tls::ops_server(&cert, &key).expect("tls");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, s) = (acceptor.clone(), s.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut raw = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = tls.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    raw.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&raw).into_owned();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() < len {
                        continue;
                    }
                    let auth = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Authorization: "))
                        .unwrap_or("")
                        .to_owned();
                    s.lock().expect("lock").push((auth, body.to_owned()));
                    let _ = tls
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                    let _ = tls.shutdown().await;
                    return;
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_reach_an_https_webhook_as_json_with_the_token() {
    let pki = Pki::new();
    let (addr, seen) = webhook(&pki).await;
    let dir = tempfile::tempdir().expect("dir");
    let token = dir.path().join("webhook.token");
    std::fs::write(&token, "s3cret-token\n").expect("token");
    let alarms = format!(
        "webhook = \"https://127.0.0.1:{}/api/alarms\"\nwebhook_ca = \"{}\"\nwebhook_token_file = \"{}\"\nmin_severity = \"high\"\n",
        addr.port(),
        pki.ca().join("ca.pem").display(),
        token.display()
    );
    let names = publishes();
    let hub = hub_with(&pki, &names, &alarms).await;
    scan("127.0.9.3", &hub.publish);
    wait_for("the webhook's POST", Duration::from_secs(10), || {
        !seen.lock().expect("lock").is_empty()
    })
    .await;
    let (auth, body) = seen.lock().expect("lock")[0].clone();
    assert_eq!(auth, "Bearer s3cret-token");
    let a: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(a["source"], "127.0.9.3");
    assert_eq!(a["rule"], "D2.scan");
    assert_eq!(a["node"], "hub-01");
    assert!(a["time"].as_str().is_some_and(|t| t.ends_with("+08:00")));
    // Below min_severity: audited, not forwarded (empty connections are low).
    let before = seen.lock().expect("lock").len();
    for _ in 0..5 {
        drop(std::net::TcpStream::connect(hub.publish[0]));
    }
    assert_eq!(seen.lock().expect("lock").len(), before);
}
