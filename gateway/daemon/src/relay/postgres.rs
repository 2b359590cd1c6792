//! A relay of an `app_protocol = "postgres"` service, a checking proxy of the
//! PostgreSQL protocol (v3) on the edge that publishes the database:
//!
//! 1. The startup phase, here: an SSLRequest is answered "N" (the client goes
//!    on in the clear inside the department; the crossing itself is inside
//!    the QUIC tunnel), or with `pg_tls = "terminate"` answered "S" and TLS
//!    is ended here with the service's certificate; a GSSENCRequest is
//!    answered "N"; a CancelRequest passes to the server as it is. The
//!    startup message's user and database are checked against `pg_users`
//!    and `pg_databases` (rule R5.pg-login: the client gets a FATAL error)
//!    and named in the relay's audit record.
//! 2. Then every message both ways through one
//!    [`gateway_core::sniff::postgres::session::Session`]: framed and
//!    length-checked, each statement audited (`pg.statement`), and with
//!    `pg_read_only` writes answered by the gateway (`pg.refuse`, rule
//!    R5.pg-read-only). A protocol violation either way cuts the relay and
//!    is audited (`relay.refuse`, R5.app-protocol).

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use gateway_core::config::{AppProtocol, PgRules, Service};
use gateway_core::sniff::postgres::session::{Event, Outcome, Rules, Session, error_response};
use gateway_core::sniff::postgres::{self as pg, LOGIN_RULE, Read, Startup};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::listen::reset_tcp;
use super::splice::{BufSource, Sink, Source};
use crate::node::Ctx;
use crate::tunnel::frame::HANDSHAKE_TIMEOUT;

const APP_RULE: &str = "R5.app-protocol";

/// Who opens the relay and why it was allowed, for its audit records.
pub struct Who<'a> {
    /// The client, as the audit names it.
    pub subject: &'a str,
    /// The service.
    pub service: &'a str,
    /// The rule that allowed it.
    pub rule: &'a str,
    /// The policy's reason.
    pub reason: String,
}

/// Whether a relay of `svc` is followed as PostgreSQL: a `postgres` service
/// at level 3 and up, or at any level when it sets a `pg_*` rule.
pub fn followed(svc: &Service, level3: bool) -> bool {
    let p = &svc.postgres;
    svc.app_protocol == Some(AppProtocol::Postgres)
        && (level3
            || p.read_only
            || !p.users.is_empty()
            || !p.databases.is_empty()
            || p.tls.is_some())
}

/// How the startup phase ended.
enum Begin {
    /// A login to relay.
    Start(Login),
    /// A CancelRequest, for the server as it is.
    Cancel(Vec<u8>),
    /// The client asked for TLS and was told "S".
    StartTls,
}

/// Why a relay ended in its startup phase: the rule and what to audit.
struct Refused {
    rule: &'static str,
    reason: String,
}

fn violation(reason: impl Into<String>) -> Refused {
    Refused {
        rule: APP_RULE,
        reason: reason.into(),
    }
}

/// Reads startup packets from `io` until a login, a CancelRequest, or an
/// accepted SSLRequest (when `tls` is offered); answers an SSLRequest or a
/// GSSENCRequest it does not take with "N".
async fn begin<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    tls: bool,
    rules: &PgRules,
) -> Result<Begin, Refused> {
    let mut buf = Vec::new();
    let (mut ssl, mut gss) = (false, false);
    let mut chunk = [0u8; 4096];
    loop {
        let (first, n) = loop {
            match pg::startup(&buf) {
                Ok(Read::Got(s, n)) => break (s, n),
                Ok(Read::NeedMore) => {}
                Err(v) => {
                    return Err(violation(format!(
                        "not a PostgreSQL startup at byte {}: {}",
                        v.offset, v.reason
                    )));
                }
            }
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    return Err(violation("the client left before its startup message"));
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        match first {
            Startup::Ssl | Startup::Gssenc if buf.len() > n => {
                // Bytes sent before the answer would be read as if protected.
                return Err(violation(
                    "bytes after an SSLRequest or GSSENCRequest, before its answer",
                ));
            }
            Startup::Ssl if ssl => return Err(violation("a second SSLRequest")),
            Startup::Gssenc if gss => return Err(violation("a second GSSENCRequest")),
            Startup::Ssl if tls => {
                io.write_all(b"S")
                    .await
                    .map_err(|_| violation("the client left"))?;
                return Ok(Begin::StartTls);
            }
            Startup::Ssl | Startup::Gssenc => {
                ssl |= first == Startup::Ssl;
                gss |= first == Startup::Gssenc;
                io.write_all(b"N")
                    .await
                    .map_err(|_| violation("the client left"))?;
                buf.clear();
            }
            Startup::Cancel => return Ok(Begin::Cancel(buf[..n].to_vec())),
            Startup::Start {
                user,
                database,
                params,
            } => {
                let login = pg::Login {
                    users: rules.users.clone(),
                    databases: rules.databases.clone(),
                    read_only: rules.read_only,
                };
                return match pg::login(&user, &database, &params, &login) {
                    Ok(startup) => Ok(Begin::Start(Login {
                        startup,
                        rest: buf[n..].to_vec(),
                        user,
                        database,
                    })),
                    Err(reason) => {
                        let message = format!("gateway: {reason} (rule {LOGIN_RULE})");
                        let _ = io
                            .write_all(&error_response("FATAL", "28000", &message))
                            .await;
                        let _ = io.flush().await;
                        Err(Refused {
                            rule: LOGIN_RULE,
                            reason: format!("user {user:?}, database {database:?}: {reason}"),
                        })
                    }
                };
            }
        }
    }
}

/// Relays one connection to a `postgres` service (see the module's text);
/// `target` is connected, and the hub was told the relay is open.
pub async fn relay(
    ctx: &Ctx,
    svc: &Service,
    who: Who<'_>,
    (mut send, mut recv): (quinn::SendStream, quinn::RecvStream),
    target: TcpStream,
) {
    let rules = &svc.postgres;
    let begun = {
        let mut io = tokio::io::join(&mut recv, &mut send);
        tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            begin(&mut io, rules.tls.is_some(), rules),
        )
        .await
    };
    let begun = begun.unwrap_or_else(|_| Err(violation("no startup message within 10 s")));
    match begun {
        Ok(Begin::Start(login)) => {
            run(
                ctx,
                svc,
                &who,
                (BufSource::new(&mut recv), &mut send),
                target,
                login,
            )
            .await;
        }
        Ok(Begin::Cancel(request)) => {
            cancel(ctx, &who, target, &request).await;
            let _ = send.finish();
        }
        Ok(Begin::StartTls) => {
            let tls = match start_tls(svc, (recv, send)).await {
                Ok(t) => t,
                Err(reason) => return refused(ctx, &who, &target, &violation(reason)),
            };
            let mut tls = tls;
            let begun = tokio::time::timeout(HANDSHAKE_TIMEOUT, begin(&mut tls, false, rules))
                .await
                .unwrap_or_else(|_| Err(violation("no startup message within 10 s")));
            match begun {
                Ok(Begin::Start(login)) => {
                    let (r, w) = tokio::io::split(tls);
                    let mut w = TlsSink(w);
                    run(ctx, svc, &who, (BufSource::new(r), &mut w), target, login).await;
                }
                Ok(Begin::Cancel(request)) => cancel(ctx, &who, target, &request).await,
                Ok(Begin::StartTls) => {
                    refused(ctx, &who, &target, &violation("a second SSLRequest"));
                }
                Err(r) => refused(ctx, &who, &target, &r),
            }
        }
        Err(r) => {
            refused(ctx, &who, &target, &r);
            let code =
                quinn::VarInt::from_u32(u32::from(gateway_core::wire::RefuseCode::Policy.number()));
            if r.rule == LOGIN_RULE {
                let _ = send.finish();
            } else {
                let _ = send.reset(code);
            }
            let _ = recv.stop(code);
        }
    }
}

/// Audits a relay refused in its startup phase and resets the server side.
fn refused(ctx: &Ctx, who: &Who<'_>, target: &TcpStream, r: &Refused) {
    ctx.refuse("relay.refuse", who.subject, who.service, r.rule, &r.reason);
    reset_tcp(target);
}

/// Passes a CancelRequest to the server (it closes after reading it).
async fn cancel(ctx: &Ctx, who: &Who<'_>, mut target: TcpStream, request: &[u8]) {
    ctx.audit.record(
        who.subject,
        who.service,
        "pg.cancel",
        "allow",
        who.rule,
        "a CancelRequest passed to the server".into(),
    );
    let _ = target.write_all(request).await;
    let _ = target.shutdown().await;
}

type TlsStream =
    tokio_rustls::server::TlsStream<tokio::io::Join<quinn::RecvStream, quinn::SendStream>>;

/// Ends TLS here with the service's certificate (`pg_tls = "terminate"`).
async fn start_tls(
    svc: &Service,
    (recv, send): (quinn::RecvStream, quinn::SendStream),
) -> Result<TlsStream, String> {
    let Some(t) = &svc.postgres.tls else {
        return Err("TLS is not configured".into());
    };
    let config = crate::tunnel::tls::pg_server(&t.cert.path, &t.key.path)
        .map_err(|e| format!("the service's TLS certificate cannot be used: {e}"))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        acceptor.accept(tokio::io::join(recv, send)),
    )
    .await
    {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("the client's TLS handshake failed: {e}")),
        Err(_) => Err("the client's TLS handshake did not end within 10 s".into()),
    }
}

/// The write side of a TLS-terminated client.
struct TlsSink(tokio::io::WriteHalf<TlsStream>);

impl Sink for TlsSink {
    async fn put(&mut self, chunk: Bytes) -> std::io::Result<()> {
        self.0.write_all(&chunk).await?;
        self.0.flush().await
    }
    async fn end(&mut self) {
        let _ = self.0.shutdown().await;
    }
    // The QUIC stream is inside the TLS session: it ends when dropped.
    fn abort(&mut self) {}
}

/// A login the startup phase let through: the startup message for the
/// server, the client's bytes after it, and who logs in.
struct Login {
    startup: Vec<u8>,
    rest: Vec<u8>,
    user: String,
    database: String,
}

/// What both directions of one relay share.
struct Shared<'a> {
    ctx: &'a Ctx,
    who: &'a Who<'a>,
    user: String,
    database: String,
    session: Mutex<Session>,
    broke: Mutex<Option<String>>,
    epoch: std::time::Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared<'_> {
    /// Feeds `chunk` to the session (`client` side or the server's), audits
    /// what it saw, and returns the bytes to pass on.
    fn feed(&self, chunk: &[u8], client: bool) -> std::io::Result<Vec<u8>> {
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let (fed, events) = {
            let mut s = lock(&self.session);
            let fed = if client {
                s.client(chunk, now)
            } else {
                s.server(chunk, now)
            };
            (fed, s.take_events())
        };
        for e in events {
            self.audit(e);
        }
        fed.map_err(|v| {
            let side = if client {
                "the client's stream"
            } else {
                "the server's stream"
            };
            let message = format!(
                "{side} is not PostgreSQL at byte {}: {}",
                v.offset, v.reason
            );
            lock(&self.broke).get_or_insert_with(|| message.clone());
            std::io::Error::new(std::io::ErrorKind::InvalidData, message)
        })
    }

    fn audit(&self, e: Event) {
        let (user, database) = (&self.user, &self.database);
        let Who {
            subject, service, ..
        } = *self.who;
        match e {
            Event::LoggedIn => self.ctx.audit.record(
                subject,
                service,
                "pg.login",
                "allow",
                "",
                format!("user={user:?} database={database:?}: the server accepted the login"),
            ),
            Event::LoginFailed(code, message) => self.ctx.audit.record(
                subject,
                service,
                "pg.login",
                "deny",
                "",
                format!(
                    "user={user:?} database={database:?}: the server refused the login (sqlstate={code:?} error={message:?})"
                ),
            ),
            Event::Refused { text, reason } => self.ctx.refuse(
                "pg.refuse",
                subject,
                service,
                pg::session::READ_ONLY_RULE,
                &format!(
                    "user={user:?} database={database:?} sha256={} statement={:?}{}: {reason} (answered 42501)",
                    text.sha256,
                    text.head,
                    if text.whole { "" } else { "..." },
                ),
            ),
            Event::Statement(st) => {
                let (outcome, error) = match &st.outcome {
                    Outcome::Ok => ("ok", String::new()),
                    Outcome::Suspended => ("suspended", String::new()),
                    Outcome::Skipped => ("skipped", String::new()),
                    Outcome::Error(code, message) => {
                        ("error", format!(" sqlstate={code} error={message:?}"))
                    }
                };
                self.ctx.metrics.pg_statement(service, outcome);
                self.ctx.audit.record(
                    subject,
                    service,
                    "pg.statement",
                    outcome,
                    "",
                    format!(
                        "user={user:?} database={database:?} kind={} rows={} commands={} duration_ms={:.3}{error} sha256={} statement={:?}{}",
                        st.kind,
                        st.rows,
                        st.commands,
                        st.micros as f64 / 1000.0,
                        st.text.sha256,
                        st.text.head,
                        if st.text.whole { "" } else { "..." },
                    ),
                );
            }
        }
    }
}

/// The client's side: its bytes through the session (the bytes it sent
/// after its startup message first).
struct Client<'a, R> {
    first: Option<Vec<u8>>,
    inner: R,
    shared: &'a Shared<'a>,
}

impl<R: Source> Source for Client<'_, R> {
    async fn next(&mut self) -> std::io::Result<Option<Bytes>> {
        loop {
            let chunk = match self.first.take() {
                Some(f) => Bytes::from(f),
                None => match self.inner.next().await? {
                    Some(c) => c,
                    None => return Ok(None),
                },
            };
            let out = self.shared.feed(&chunk, true)?;
            if !out.is_empty() {
                return Ok(Some(out.into()));
            }
        }
    }
}

/// The server's side: its bytes through the session.
struct Server<'a, R> {
    inner: R,
    shared: &'a Shared<'a>,
}

impl<R: Source> Source for Server<'_, R> {
    async fn next(&mut self) -> std::io::Result<Option<Bytes>> {
        loop {
            let Some(chunk) = self.inner.next().await? else {
                return Ok(None);
            };
            let out = self.shared.feed(&chunk, false)?;
            if !out.is_empty() {
                return Ok(Some(out.into()));
            }
        }
    }
}

/// Sends the login to the server and follows the connection both ways.
async fn run<R: Source, W: Sink>(
    ctx: &Ctx,
    svc: &Service,
    who: &Who<'_>,
    (qr, qw): (R, &mut W),
    mut target: TcpStream,
    login: Login,
) {
    if target.write_all(&login.startup).await.is_err() {
        qw.abort();
        return;
    }
    let detail = format!(
        "{} user={:?} database={:?}",
        who.reason, login.user, login.database
    );
    let started = ctx.relay_opened(who.subject, who.service, who.rule, detail);
    let shared = Shared {
        ctx,
        who,
        user: login.user,
        database: login.database,
        session: Mutex::new(Session::new(Rules {
            read_only: svc.postgres.read_only,
            max_message: svc.postgres.max_message,
        })),
        broke: Mutex::new(None),
        epoch: std::time::Instant::now(),
    };
    let live = [
        AtomicU64::new(login.startup.len() as u64),
        AtomicU64::new(0),
    ];
    let done = {
        let (tr, mut tw) = target.split();
        let mut client = Client {
            first: Some(login.rest).filter(|r| !r.is_empty()),
            inner: qr,
            shared: &shared,
        };
        let mut server = Server {
            inner: BufSource::new(tr),
            shared: &shared,
        };
        super::service::spliced(ctx, svc, (&mut client, qw), (&mut server, &mut tw), &live).await
    };
    if done.is_none_or(|s| s.reset) {
        reset_tcp(&target);
        if done.is_none() {
            qw.abort();
        }
    }
    if let Some(reason) = lock(&shared.broke).take() {
        ctx.refuse(
            "relay.refuse",
            who.subject,
            who.service,
            APP_RULE,
            &format!("{reason} (relay cut)"),
        );
    }
    ctx.relay_closed(
        who.subject,
        who.service,
        super::splice::Spliced::moved(&live),
        started,
        super::splice::Spliced::end(done),
        "",
    );
}
