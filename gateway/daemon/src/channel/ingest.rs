//! Ingest on the legacy side: `POST /v1/channels/{name}/records` on each
//! `[[ingest]]` listener. A record is checked at the boundary (the policy's
//! channel rules, then its declared format really parses), committed durably to
//! the buffer, and only then answered with its sequence number.
//!
//! Records are committed by the buffer thread ([`super::buffer`]), which groups
//! concurrent producers into one transaction.
//!
//! Only producers inside the listener's zone are served (R5.address; others get
//! 403, audited under their address and summarised). Every accepted request is
//! a crossing: audited as `channel.accept` with the producer (`NAME@ADDRESS`
//! when the listener's `auth` names producers, by token or client
//! certificate: [`super::producers`]; else its address), the sequence
//! numbers, count, bytes and the SHA-256 of the body. The audit
//! writes are batched: one record per (producer, channel) for up to
//! [`ACCEPT_BATCH`] requests or [`ACCEPT_EVERY`], each request's sequence
//! numbers, bytes and digest in its detail. A body larger
//! than the largest record limit allows (413), an undeclared format (415), or
//! a body sent slower than [`MIN_BODY_RATE`] after [`BODY_GRACE`] is refused
//! and audited too.

use crate::node::guard::Report;
use gateway_core::detect::{Direction, Signal};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use gateway_core::config::{Format, Ingest, IngestAuth, WhenFull as CfgWhenFull};
use gateway_store::buffer::NewRecord;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::info;

use super::buffer::BufferHandle;
use super::check::{buffer_when_full, check_records, scan_records, split_records};
use super::producers::{Producers, Unknown};
use crate::detect::scan::{Scanner, Verdict};
use crate::node::http::{self, BODY_GRACE, BodyError, MIN_BODY_RATE, read_body};
use crate::node::{Ctx, PeerAttempt};
use gateway_core::policy::Crossing;

/// How long `when_full = "block"` holds a producer before answering 503.
pub const BLOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests of one producer and channel audited in one record at most ...
pub const ACCEPT_BATCH: usize = 32;
/// ... and the longest a request waits for its record.
pub const ACCEPT_EVERY: Duration = Duration::from_millis(100);

/// Accepted requests waiting for their audit record, per (producer, channel).
#[derive(Default)]
struct Accepts {
    pending: std::collections::HashMap<(String, String), Vec<String>>,
}

impl Accepts {
    fn flush(ctx: &Ctx, key: &(String, String), lines: Vec<String>) {
        ctx.audit.record(
            &key.0,
            &key.1,
            "channel.accept",
            "ok",
            "",
            format!("{} request(s): {}", lines.len(), lines.join("; ")),
        );
    }
}

/// The audit of accepted requests, batched ([`ACCEPT_BATCH`], [`ACCEPT_EVERY`]).
#[derive(Clone)]
struct AcceptLog {
    ctx: Arc<Ctx>,
    inner: Arc<std::sync::Mutex<Accepts>>,
}

impl AcceptLog {
    fn add(&self, producer: &str, channel: &str, line: String) {
        let full = {
            let mut a = self
                .inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let key = (producer.to_owned(), channel.to_owned());
            let v = a.pending.entry(key.clone()).or_default();
            v.push(line);
            (v.len() >= ACCEPT_BATCH)
                .then(|| (key.clone(), a.pending.remove(&key).unwrap_or_default()))
        };
        if let Some((key, lines)) = full {
            Accepts::flush(&self.ctx, &key, lines);
        }
    }

    fn flush_all(&self) {
        let all = std::mem::take(
            &mut self
                .inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pending,
        );
        for (key, lines) in all {
            Accepts::flush(&self.ctx, &key, lines);
        }
    }

    /// Flushes every [`ACCEPT_EVERY`] until `stop`, and once more then.
    async fn run(self, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(ACCEPT_EVERY) => self.flush_all(),
                () = stop.cancelled() => break,
            }
        }
        self.flush_all();
    }
}

#[derive(Clone)]
struct IngestState {
    scanner: Option<Arc<dyn Scanner>>,
    accepts: AcceptLog,
    ctx: Arc<Ctx>,
    zone: String,
    producers: Arc<Producers>,
    writer: BufferHandle,
    /// Largest body read: the largest record limit of the node's channels,
    /// plus room for an NDJSON batch's framing.
    limit: usize,
}

/// A producer's connection: its address, and the client certificate it
/// presented (`auth = "mtls"`).
#[derive(Clone)]
struct Peer {
    addr: SocketAddr,
    cert: Option<rustls_pki_types::CertificateDer<'static>>,
}

/// Serves one `[[ingest]]` listener until draining.
pub async fn serve(
    ctx: Arc<Ctx>,
    ingest: Ingest,
    listener: TcpListener,
    writer: BufferHandle,
    scanner: Option<Arc<dyn Scanner>>,
) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let zone = ingest.zone.clone();
    info!(listen = ?addr, %zone, auth = ingest.auth.as_str(), "Ingest listening");
    let security = match &ingest.auth {
        IngestAuth::Mtls {
            client_ca,
            cert,
            key,
        } => match crate::tunnel::tls::client_cert_server(&client_ca.path, &cert.path, &key.path) {
            Ok(tls) => http::Security::Tls(tokio_rustls::TlsAcceptor::from(tls), None),
            Err(e) => {
                let reason = format!(
                    "ingest on {} not served: its TLS files ({}, {}, {}) cannot be used: {e}",
                    ingest.listen,
                    client_ca.path.display(),
                    cert.path.display(),
                    key.path.display()
                );
                tracing::error!(%reason, "Ingest refused");
                ctx.audit
                    .record("node", "ingest", "ingest.error", "error", "", reason);
                return;
            }
        },
        IngestAuth::None | IngestAuth::Token { .. } => http::Security::Plain,
    };
    let producers = Arc::new(Producers::new(&ingest.auth));
    let limit = ctx
        .policy()
        .config()
        .edge()
        .map(|e| {
            e.channels
                .iter()
                .map(|c| c.max_record_bytes.map_or(c.max_bytes.0, |m| m.0))
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    let draining = ctx.draining.clone();
    // Room above the largest record limit, so an oversized record still
    // reaches the policy and gets an explained, audited refusal.
    let limit = usize::try_from(limit.saturating_add(1 << 20)).unwrap_or(usize::MAX);
    let accepts = AcceptLog {
        ctx: ctx.clone(),
        inner: Arc::default(),
    };
    let flushing = tokio::spawn(accepts.clone().run(draining.clone()));
    let app = Router::new()
        .route("/v1/channels/{name}/records", post(post_record))
        .route("/v1/channels/{name}/receipts", get(receipts))
        // Bodies are read by post_record, capped and timed (and refusals audited).
        .layer(DefaultBodyLimit::disable())
        .with_state(IngestState {
            scanner,
            accepts: accepts.clone(),
            ctx: ctx.clone(),
            zone,
            producers,
            writer,
            limit,
        });
    let listener = http::Listener {
        tcp: listener,
        security,
        what: "Ingest",
        limits: http::Limits {
            max_body: None,
            ..ctx.http_limits()
        },
    };
    http::serve(
        Some(ctx),
        listener,
        app,
        |addr, cert| Peer { addr, cert },
        draining,
    )
    .await;
    let _ = flushing.await;
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}

/// The media type of a request, lowercase, without parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(ct.split(';').next()?.trim().to_ascii_lowercase())
}

fn format_of(headers: &HeaderMap) -> Option<Format> {
    match media_type(headers)?.as_str() {
        "application/json" | "application/x-ndjson" => Some(Format::Json),
        "application/xml" | "text/xml" => Some(Format::Xml),
        "text/csv" => Some(Format::Csv),
        "text/plain" => Some(Format::Text),
        "application/octet-stream" => Some(Format::Raw),
        _ => None,
    }
}

/// The SHA-256 of a request body or spool file, hex.
pub fn sha256_hex(body: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let d = ring::digest::digest(&ring::digest::SHA256, body);
    let mut out = String::with_capacity(64);
    for b in d.as_ref() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

/// The 403 for a producer outside the listener's zone (audited under its
/// address, summarised); `None` for one inside.
fn outside_zone(st: &IngestState, peer: SocketAddr) -> Option<Response> {
    let allowed = st.ctx.policy().decide(
        &Crossing::IngestOpen {
            zone: &st.zone,
            client: peer.ip(),
        },
        st.ctx.today(),
    );
    if allowed.is_allowed() {
        return None;
    }
    st.ctx
        .refuse_peer(peer, true, PeerAttempt::IngestAddress, &allowed.reason, "");
    Some(answer(
        StatusCode::FORBIDDEN,
        json!({ "error": allowed.reason, "rule": allowed.rule.as_str() }),
    ))
}

/// The producer of a request from inside the zone (`None` when the listener
/// takes anyone), or the answer refusing it: 401 without a valid credential
/// (audited under its address, summarised), 503 when the tokens file cannot
/// be used.
fn producer(
    st: &IngestState,
    peer: &Peer,
    headers: &HeaderMap,
) -> Result<Option<String>, Box<Response>> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match st.producers.identify(authorization, peer.cert.as_ref()) {
        Ok(p) => Ok(p),
        Err(Unknown::Credential(why)) => {
            st.ctx
                .refuse_peer(peer.addr, true, PeerAttempt::ProducerCredential, why, "");
            let mut r = answer(StatusCode::UNAUTHORIZED, json!({ "error": why }));
            if matches!(*st.producers, Producers::Tokens(_)) {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Bearer"),
                );
            }
            Err(Box::new(r))
        }
        // Why is in the daemon's log, not for the producer.
        Err(Unknown::Unusable(_)) => Err(Box::new(answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": "this listener cannot check producer tokens now", "hint": "the box's operator must fix its tokens file (see the daemon's log)" }),
        ))),
    }
}

/// Who a request is from, for its audit records: `NAME@ADDRESS` for an
/// authenticated producer, else the address.
fn subject_of(producer: Option<&str>, peer: &Peer) -> String {
    match producer {
        Some(p) => format!("{p}@{}", peer.addr.ip()),
        None => peer.addr.ip().to_string(),
    }
}

async fn post_record(
    State(st): State<IngestState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(refused) = outside_zone(&st, peer.addr) {
        return refused;
    }
    let producer = match producer(&st, &peer, &headers) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    let subject = subject_of(producer.as_deref(), &peer);
    let body = match read_body(body, st.limit).await {
        Ok(b) => b,
        Err(e) => {
            let (status, why, reason) = match e {
                BodyError::TooLarge(limit) => (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "size",
                    format!(
                        "body longer than {limit} bytes, more than any record of this node may be"
                    ),
                ),
                BodyError::TooSlow(got) => (
                    StatusCode::REQUEST_TIMEOUT,
                    "slow",
                    format!(
                        "body too slow: {got} bytes, under {MIN_BODY_RATE} bytes/s after {} s",
                        BODY_GRACE.as_secs()
                    ),
                ),
                BodyError::Failed(e) => {
                    return answer(StatusCode::BAD_REQUEST, json!({ "error": e }));
                }
            };
            st.ctx.refuse(
                "channel.refuse",
                &subject,
                &gateway_core::refusals::peer_text(&name),
                why,
                &reason,
            );
            let who = Report::tcp(peer.addr, Direction::Outbound, "ingest");
            st.ctx.report(&who, Signal::ContentRefused);
            return answer(status, json!({ "error": reason }));
        }
    };
    let policy = st.ctx.policy();
    let Some(channel) = policy
        .config()
        .edge()
        .and_then(|e| {
            e.channels
                .iter()
                .find(|c| c.name == name && c.zone == st.zone)
        })
        .cloned()
    else {
        return answer(
            StatusCode::NOT_FOUND,
            json!({ "error": format!("no channel {name:?} takes records in zone {:?}", st.zone) }),
        );
    };
    let Some(format) = format_of(&headers) else {
        let reason = "declare the record's format with Content-Type: application/json, application/x-ndjson, application/xml, text/csv, text/plain or application/octet-stream";
        st.ctx.refuse(
            "channel.refuse",
            &subject,
            &name,
            "format",
            &format!(
                "{reason} (sent {})",
                gateway_core::refusals::peer_text(
                    headers
                        .get(header::CONTENT_TYPE)
                        .map_or("nothing", |v| v.to_str().unwrap_or("(not text)"))
                )
            ),
        );
        return answer(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            json!({ "error": reason }),
        );
    };
    // A batch: `application/x-ndjson`, one JSON record per non-empty line,
    // accepted or refused as a whole.
    let batch = media_type(&headers).as_deref() == Some("application/x-ndjson");
    let items = split_records(&body, batch);
    if items.is_empty() {
        return answer(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "error": "the batch holds no record" }),
        );
    }
    if let Err(r) = check_records(&st.ctx, &subject, &name, format, &items, batch) {
        let target = format!("ingest channel {name}");
        let who = Report::tcp(peer.addr, Direction::Outbound, &target);
        st.ctx.report(&who, Signal::ContentRefused);
        let status = if r.by_policy {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        return answer(status, json!({ "error": r.reason, "rule": r.rule }));
    }
    let target = format!("ingest channel {name}");
    let who = Report::tcp(peer.addr, Direction::Outbound, &target);
    let scanned = match scan_records(
        &st.ctx,
        st.scanner.as_deref(),
        (&subject, &name),
        &items,
        &who,
    )
    .await
    {
        Ok(v) => v,
        Err(r) => {
            let (status, rule, hint) = match r.verdict {
                Verdict::Found(_) => (
                    StatusCode::FORBIDDEN,
                    "D6.malware",
                    "the record holds malicious code; it was not accepted and an alarm was raised",
                ),
                Verdict::Refused(_) => (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "",
                    "the scanner will not take a record this large",
                ),
                _ => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "",
                    "the malware scanner did not answer: retry later",
                ),
            };
            return answer(
                status,
                json!({ "error": r.reason, "rule": rule, "hint": hint }),
            );
        }
    };
    let when_full = buffer_when_full(channel.when_full);
    let records: Vec<NewRecord> = items
        .iter()
        .map(|b| NewRecord {
            format: format.as_str().to_owned(),
            body: b.to_vec(),
        })
        .collect();
    let deadline = tokio::time::Instant::now() + BLOCK_TIMEOUT;
    loop {
        match st
            .writer
            .append_by(
                &name,
                records.clone(),
                channel.max_bytes.0,
                when_full,
                producer.clone(),
            )
            .await
        {
            Ok(a) => {
                if let Some((from, to)) = a.dropped {
                    st.ctx.audit.record(
                        &subject,
                        &name,
                        "channel.drop",
                        "ok",
                        "",
                        format!("quota: dropped records {from}..={to}"),
                    );
                }
                let scan = scanned
                    .as_ref()
                    .map(|v| format!(", scanned clean by {v}"))
                    .unwrap_or_default();
                st.accepts.add(
                    &subject,
                    &name,
                    format!(
                        "seq {}-{}, {} records, {} bytes, sha256={}{scan}",
                        a.first,
                        a.last,
                        items.len(),
                        body.len(),
                        sha256_hex(&body)
                    ),
                );
                let mut ok = json!({ "channel": name, "seq": a.first, "last": a.last, "dropped": a.dropped.map(|(f, t)| [f, t]) });
                if let Some(p) = &producer {
                    ok["producer"] = p.as_str().into();
                }
                return answer(StatusCode::OK, ok);
            }
            Err(reason) if reason.contains("is full") => {
                if channel.when_full == CfgWhenFull::Block && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                st.ctx
                    .refuse("channel.refuse", &subject, &name, "quota", &reason);
                let status = if channel.when_full == CfgWhenFull::Block {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::INSUFFICIENT_STORAGE
                };
                return answer(
                    status,
                    json!({ "error": reason, "hint": "the channel's buffer is full: retry later, or raise max_bytes" }),
                );
            }
            Err(reason) => {
                return answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({ "error": reason, "hint": "retry" }),
                );
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct ReceiptsQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

/// `GET /v1/channels/{name}/receipts?after=SEQ&limit=N`: what became of each
/// record after `after`, in sequence order.
async fn receipts(
    State(st): State<IngestState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
    Query(q): Query<ReceiptsQuery>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = outside_zone(&st, peer.addr) {
        return refused;
    }
    if let Err(refused) = producer(&st, &peer, &headers) {
        return *refused;
    }
    let known = st.ctx.policy().config().edge().is_some_and(|e| {
        e.channels
            .iter()
            .any(|c| c.name == name && c.zone == st.zone)
    });
    if !known {
        return answer(
            StatusCode::NOT_FOUND,
            json!({ "error": format!("no channel {name:?} takes records in zone {:?}", st.zone) }),
        );
    }
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    match st.writer.receipts(&name, q.after, limit).await {
        Ok(list) => {
            let next = list.last().map_or(q.after, |r| r.seq);
            let list: Vec<_> = list
                .iter()
                .map(|r| {
                    let mut v = json!({ "seq": r.seq, "status": r.status.name() });
                    if let Some(reason) = r.status.reason() {
                        v["reason"] = reason.into();
                    }
                    if let Some(p) = &r.producer {
                        v["producer"] = p.as_str().into();
                    }
                    v
                })
                .collect();
            answer(
                StatusCode::OK,
                json!({ "channel": name, "receipts": list, "next": next }),
            )
        }
        Err(e) => answer(StatusCode::SERVICE_UNAVAILABLE, json!({ "error": e })),
    }
}
