//! Alarms to the security operations centre (`[alarms]`): syslog over TLS
//! (RFC 5425, octet counting, the fields as RFC 5424 structured data) and an
//! HTTPS webhook taking each alarm as JSON.
//!
//! The queue is the audit chain itself: each target keeps a cursor (the last
//! record it took, `STATE_DIR/alarms.TARGET.cursor`) and follows the chain's
//! `detect.alarm` records from there. So alarms wait on disk while a target
//! is down, in the order they were raised, bounded by the audit retention,
//! and none is lost to a restart. A target down for a minute raises an alarm
//! of its own (`D7.forwarding`) and shows on `/readyz` as degraded.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway_core::config::{AlarmForwarding, SyslogTarget, WebhookTarget};
use gateway_core::detect::{Alarm, Severity, syslog};
use gateway_store::audit::AuditLog;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::{info, warn};

use crate::node::Ctx;
use crate::node::clock::now_ms;
use crate::os::dir::SafeDir;

/// Alarms read from the chain per batch.
const BATCH: usize = 100;
/// The longest wait between attempts at a target that is down.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Connect, handshake, write and answer, each.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of a webhook's answer read (its status line is all that counts).
const MAX_ANSWER: usize = 16 << 10;

/// Where alarms go.
enum Kind {
    Syslog {
        tls: TlsConnector,
        /// Kept open between batches.
        conn: Option<Box<TlsStream<TcpStream>>>,
    },
    Webhook {
        tls: TlsConnector,
        path: String,
        token: Option<String>,
    },
}

/// One forwarding target.
pub struct Forwarder {
    /// `syslog` or `webhook`: the cursor file's name.
    slug: &'static str,
    /// For logs and metrics: `syslog soc.example.gov:6514`.
    name: String,
    host: String,
    port: u16,
    server: ServerName<'static>,
    kind: Kind,
}

/// The targets `[alarms]` names, ready to connect.
///
/// # Errors
/// When a CA, certificate, key or token file cannot be read.
pub fn forwarders(config: &AlarmForwarding) -> Result<Vec<Forwarder>, String> {
    let mut out = Vec::new();
    if let Some(SyslogTarget {
        address,
        ca,
        client,
    }) = &config.syslog
    {
        let client = client
            .as_ref()
            .map(|(c, k)| (c.path.as_path(), k.path.as_path()));
        let tls = crate::tunnel::tls::soc_client(&ca.path, client, &[])
            .map_err(|e| format!("alarms.syslog: {e}"))?;
        out.push(Forwarder::new(
            "syslog",
            &address.host,
            address.port.get(),
            Kind::Syslog {
                tls: TlsConnector::from(tls),
                conn: None,
            },
        )?);
    }
    if let Some(WebhookTarget {
        address,
        path,
        ca,
        token_file,
    }) = &config.webhook
    {
        let tls = crate::tunnel::tls::soc_client(&ca.path, None, &[b"http/1.1"])
            .map_err(|e| format!("alarms.webhook: {e}"))?;
        let token = match token_file {
            None => None,
            Some(f) => Some(read_token(&f.path)?),
        };
        out.push(Forwarder::new(
            "webhook",
            &address.host,
            address.port.get(),
            Kind::Webhook {
                tls: TlsConnector::from(tls),
                path: path.clone(),
                token,
            },
        )?);
    }
    Ok(out)
}

/// A bearer token: one line of printable ASCII, at most 4 KiB.
fn read_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("alarms.webhook_token_file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() || token.len() > 4096 || !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "alarms.webhook_token_file {}: not one line of printable ASCII (at most 4 KiB)",
            path.display()
        ));
    }
    Ok(token.to_owned())
}

impl Forwarder {
    fn new(slug: &'static str, host: &str, port: u16, kind: Kind) -> Result<Self, String> {
        let server = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("alarms.{slug}: {host:?} is not a TLS server name: {e}"))?;
        Ok(Self {
            slug,
            name: format!("{slug} {host}:{port}"),
            host: host.to_owned(),
            port,
            server,
            kind,
        })
    }

    /// Its name in logs, metrics and `/readyz`.
    pub fn name(&self) -> &str {
        &self.name
    }

    async fn connect(&self, tls: &TlsConnector) -> std::io::Result<TlsStream<TcpStream>> {
        let go = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
            let _ = tcp.set_nodelay(true);
            tls.connect(self.server.clone(), tcp).await
        };
        tokio::time::timeout(IO_TIMEOUT, go)
            .await
            .map_err(|_| std::io::Error::other("no TLS connection within 10 s"))?
    }

    /// Sends `alarms` in order; how many went (all of them, or up to the
    /// first failure, with the error).
    async fn send(&mut self, node: &str, alarms: &[Alarm]) -> (usize, Option<String>) {
        if alarms.is_empty() {
            return (0, None);
        }
        let pid = std::process::id();
        match &mut self.kind {
            Kind::Syslog { tls, conn } => {
                let tls = tls.clone();
                // A collector that went away since the last batch has closed
                // the kept connection: a write to it would vanish unseen.
                if let Some(c) = conn.as_mut()
                    && !still_open(c).await
                {
                    *conn = None;
                }
                if conn.is_none() {
                    match self.connect(&tls).await {
                        Ok(c) => {
                            if let Kind::Syslog { conn, .. } = &mut self.kind {
                                *conn = Some(Box::new(c));
                            }
                        }
                        Err(e) => return (0, Some(e.to_string())),
                    }
                }
                let Kind::Syslog { conn: Some(c), .. } = &mut self.kind else {
                    return (0, Some("no connection".into()));
                };
                let mut bytes = Vec::new();
                for a in alarms {
                    bytes.extend(syslog::framed(&syslog::message(a, node, pid)));
                }
                let write = async {
                    c.write_all(&bytes).await?;
                    c.flush().await
                };
                match tokio::time::timeout(IO_TIMEOUT, write).await {
                    Ok(Ok(())) => (alarms.len(), None),
                    other => {
                        // The collector may have had part of it: a resend after
                        // reconnecting can repeat alarms, never skip one.
                        if let Kind::Syslog { conn, .. } = &mut self.kind {
                            *conn = None;
                        }
                        let e = match other {
                            Ok(Err(e)) => e.to_string(),
                            _ => "write timed out".into(),
                        };
                        (0, Some(e))
                    }
                }
            }
            Kind::Webhook { tls, path, token } => {
                let (tls, path, token) = (tls.clone(), path.clone(), token.clone());
                for (i, a) in alarms.iter().enumerate() {
                    if let Err(e) = self.post(&tls, &path, token.as_deref(), a).await {
                        return (i, Some(e));
                    }
                }
                (alarms.len(), None)
            }
        }
    }

    /// One POST of one alarm; a 2xx answer is success.
    async fn post(
        &self,
        tls: &TlsConnector,
        path: &str,
        token: Option<&str>,
        a: &Alarm,
    ) -> Result<(), String> {
        let mut c = self.connect(tls).await.map_err(|e| e.to_string())?;
        let body = serde_json::to_vec(a).unwrap_or_default();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: gatewayd\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.host,
            self.port,
            body.len()
        );
        let exchange = async {
            c.write_all(head.as_bytes()).await?;
            c.write_all(&body).await?;
            c.flush().await?;
            let mut answer = Vec::new();
            let mut buf = [0u8; 1024];
            while !answer.windows(2).any(|w| w == b"\r\n") && answer.len() < MAX_ANSWER {
                let n = c.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&buf[..n]);
            }
            Ok::<_, std::io::Error>(answer)
        };
        let answer = tokio::time::timeout(IO_TIMEOUT, exchange)
            .await
            .map_err(|_| "no answer within 10 s".to_owned())?
            .map_err(|e| e.to_string())?;
        let line = String::from_utf8_lossy(&answer);
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| "the answer is not HTTP".to_owned())?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("the webhook answered {status}"))
        }
    }
}

/// Whether a kept connection is still open: a read that would block (the
/// collector says nothing) means yes; end of stream or an error, no.
async fn still_open(c: &mut TlsStream<TcpStream>) -> bool {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(Duration::ZERO, c.read(&mut buf)).await {
        Err(_) => true,
        Ok(Ok(n)) => n > 0,
        Ok(Err(_)) => false,
    }
}

/// The cursor file of target `slug`.
fn cursor_name(slug: &str) -> String {
    format!("alarms.{slug}.cursor")
}

fn load_cursor(state_dir: &Path, slug: &str) -> Option<u64> {
    let dir = SafeDir::open(state_dir).ok()?;
    let f = dir.read_entry(OsStr::new(&cursor_name(slug)), 64).ok()?;
    String::from_utf8_lossy(&f.bytes).trim().parse().ok()
}

fn save_cursor(state_dir: &Path, slug: &str, seq: u64) -> std::io::Result<()> {
    let dir = SafeDir::open(state_dir).map_err(std::io::Error::other)?;
    dir.write_replace(
        OsStr::new(&cursor_name(slug)),
        format!("{seq}\n").as_bytes(),
    )
}

type SharedLog = Arc<Mutex<Option<AuditLog>>>;

/// The next alarms after `after` and the last record looked at.
async fn next_alarms(
    state_dir: &Path,
    log: &SharedLog,
    after: u64,
    limit: usize,
) -> (Vec<(u64, Alarm)>, u64) {
    let (dir, log) = (state_dir.to_owned(), log.clone());
    tokio::task::spawn_blocking(move || {
        let mut l = log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if l.is_none() {
            *l = AuditLog::open_existing(&dir).ok();
        }
        let Some(Ok((records, seen))) = l
            .as_ref()
            .map(|l| l.events_after("detect.alarm", after, limit))
        else {
            return (Vec::new(), after);
        };
        let alarms = records
            .into_iter()
            .filter_map(|r| Some((r.seq, serde_json::from_str::<Alarm>(&r.event.detail).ok()?)))
            .collect();
        (alarms, seen)
    })
    .await
    .unwrap_or((Vec::new(), after))
}

/// Follows the audit chain's alarms into `f` until draining: woken by `wake`
/// (an alarm was raised) or every second; alarms below `min` are skipped; a
/// target unreachable for `down_after` raises its own alarm.
pub async fn run(
    ctx: Arc<Ctx>,
    state_dir: PathBuf,
    mut f: Forwarder,
    (min, down_after): (Severity, Duration),
    wake: Arc<tokio::sync::Notify>,
) {
    let down_after_ms = i64::try_from(down_after.as_millis()).unwrap_or(i64::MAX);
    let log: SharedLog = Arc::default();
    let mut cursor = match load_cursor(&state_dir, f.slug) {
        Some(c) => c,
        None => {
            // First start with this target: alarms from now on (the past
            // is in the audit chain, and at the hub).
            let (_, head) = next_alarms(&state_dir, &log, 0, 0).await;
            let _ = save_cursor(&state_dir, f.slug, head);
            head
        }
    };
    info!(target = %f.name, cursor, "Forwarding alarms");
    let mut down_since: Option<i64> = None;
    let mut alarmed = false;
    let mut backoff = Duration::from_secs(1);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = wake.notified() => {}
            _ = tick.tick() => {}
            () = ctx.draining.cancelled() => break,
        }
        loop {
            let (batch, seen) = next_alarms(&state_dir, &log, cursor, BATCH).await;
            let wanted: Vec<(u64, Alarm)> = batch
                .into_iter()
                .filter(|(_, a)| Severity::parse(&a.severity).unwrap_or_default() >= min)
                .collect();
            let alarms: Vec<Alarm> = wanted.iter().map(|(_, a)| a.clone()).collect();
            let (sent, error) = f.send(&ctx.id, &alarms).await;
            let done_to = match (&error, sent) {
                (None, _) => seen,
                (Some(_), 0) => cursor,
                (Some(_), n) => wanted[n - 1].0,
            };
            if done_to != cursor {
                cursor = done_to;
                if let Err(e) = save_cursor(&state_dir, f.slug, cursor) {
                    warn!(target = %f.name, error = %e, "Cannot save the forwarding cursor");
                }
            }
            if sent > 0 {
                ctx.metrics.forwarded(&f.name, sent as u64);
            }
            let Some(error) = error else {
                if let Some(since) = down_since.take() {
                    info!(target = %f.name, down_s = (now_ms() - since) / 1000, "Alarm forwarding target reachable again");
                    ctx.audit.record(
                        &ctx.id,
                        &f.name,
                        "alarm.forward",
                        "ok",
                        "",
                        format!("reachable again after {} s", (now_ms() - since) / 1000),
                    );
                    alarmed = false;
                    backoff = Duration::from_secs(1);
                }
                if wanted.len() < BATCH && seen == done_to {
                    break;
                }
                continue;
            };
            let since = *down_since.get_or_insert_with(now_ms);
            ctx.metrics.forward_failed(&f.name, since);
            warn!(target = %f.name, %error, "Cannot forward alarms; they wait in the audit chain");
            if !alarmed && now_ms() - since >= down_after_ms {
                alarmed = true;
                let (name, host, port) = (f.name.clone(), f.host.clone(), f.port);
                ctx.guard.raise(
                    |node, id| {
                        Alarm::forwarding_down(node, id, (&name, &host, port), since, now_ms())
                    },
                    &ctx.metrics,
                );
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = ctx.draining.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}
