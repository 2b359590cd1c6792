//! The hub's consumers' API on `[hub].api`: HTTPS only (TLS 1.3, the hub's
//! certificate), and every request must come with a consumer's client
//! certificate issued by the hub's CA (`gatewayctl consumer create`). A
//! consumer sees and reads only the streams granted to it (`gatewayctl
//! consumer grant`), each with its own cursor.
//!
//! - `GET /v1/channels`: the caller's granted streams, with its cursor.
//! - `GET /v1/channels/{device}/{name}/records?after=CURSOR&limit=N`: records
//!   after the cursor (default: the caller's own) in sequence order,
//!   `{"records": [...], "next": CURSOR}`.
//! - `POST /v1/channels/{device}/{name}/ack?cursor=CURSOR`: the caller has
//!   every record up to the cursor; only its cursor moves (409 with `high`
//!   beyond what exists). A record leaves the sink when every consumer granted
//!   its stream has acknowledged it, or by `[hub].sink_retention`.
//!
//! No certificate: 401 (audited under the peer's address, summarised); no
//! grant: 403. Every read and ack is a crossing: one audit record per request
//! (consumer, stream, sequence range, records, bytes, outcome).
//!
//! The format is documented in `docs/protocol.md` ("Hub API").

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use gateway_store::error::StoreError;
use gateway_store::sink::{Acked, StreamKey};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::consumers::Consumers;
use crate::node::http;
use crate::node::{Ctx, PeerAttempt};

/// Most records one read returns.
pub const MAX_LIMIT: usize = 10_000;
/// Records a read returns without `limit`.
pub const DEFAULT_LIMIT: usize = 1000;
/// The rule a read or ack without a grant is refused by.
pub const RULE_NO_GRANT: &str = "consumer-grant";
/// The rule an acknowledgement past the stream's end is refused by.
pub const RULE_BEYOND_HIGH: &str = "consumer-ack-beyond-high";

/// What the API serves from.
#[derive(Clone)]
struct Api {
    ctx: Arc<Ctx>,
    consumers: Arc<Consumers>,
}

/// Serves the consumers' API on `listener` with `tls` until `stop`.
pub async fn serve(
    ctx: Arc<Ctx>,
    consumers: Arc<Consumers>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) {
    info!(listen = ?listener.local_addr().ok(), "Hub API (consumers) listening");
    let admit: http::Admit = {
        let consumers = consumers.clone();
        Arc::new(move |tls: &rustls::ServerConnection| consumers.admit(tls))
    };
    let app = Router::new()
        .route("/v1/channels", get(streams))
        .route("/v1/channels/{device}/{name}/records", get(records))
        .route("/v1/channels/{device}/{name}/ack", post(ack))
        .with_state(Api {
            ctx: ctx.clone(),
            consumers,
        });
    let listener = http::Listener {
        tcp: listener,
        security: http::Security::Tls(tokio_rustls::TlsAcceptor::from(tls), Some(admit)),
        what: "Hub API",
        limits: ctx.http_limits(),
    };
    let info = |addr, cert| Peer { addr, cert };
    http::serve(Some(ctx), listener, app, info, stop).await;
}

/// A connection's address and verified client certificate.
#[derive(Clone)]
struct Peer {
    addr: SocketAddr,
    cert: Option<rustls_pki_types::CertificateDer<'static>>,
}

/// An error answer: `{"error": ..., more}`.
fn fail(status: StatusCode, error: String, more: Value) -> Response {
    let mut body = json!({ "error": error });
    if let (Value::Object(b), Value::Object(m)) = (&mut body, more) {
        b.extend(m);
    }
    (status, axum::Json(body)).into_response()
}

/// A store failure: 503 when the engine is unavailable (retry), else 500.
fn store_failed(e: &StoreError) -> Response {
    let status = if e.retry_later() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    fail(status, e.to_string(), json!({}))
}

/// The consumer behind a request, or the 401 (audited, summarised per source).
async fn consumer(api: &Api, peer: &Peer) -> Result<String, Response> {
    match api.consumers.identify(peer.cert.as_ref()).await {
        Ok(Ok(name)) => Ok(name),
        Ok(Err(not)) => {
            let reason = not.reason();
            api.ctx.refuse_peer(
                peer.addr,
                true,
                PeerAttempt::ConsumerCertificate,
                &reason,
                not.claimed(),
            );
            Err(fail(
                StatusCode::UNAUTHORIZED,
                reason,
                json!({ "missing": "a consumer certificate issued by the hub (gatewayctl consumer create)" }),
            ))
        }
        Err(e) => Err(fail(
            if e.retry_later() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            },
            e.to_string(),
            json!({}),
        )),
    }
}

/// A stream named by the path, or a 400 naming the part that is wrong.
pub fn stream_of(device: &str, name: &str) -> Result<StreamKey, (String, String)> {
    gateway_core::units::check_name("device", device)
        .map_err(|e| ("device".to_owned(), format!("{}; {}", e.message, e.hint)))?;
    gateway_core::units::check_name("channel", name)
        .map_err(|e| ("channel".to_owned(), format!("{}; {}", e.message, e.hint)))?;
    Ok(StreamKey::new(device, name))
}

fn bad_request((field, message): (String, String)) -> Response {
    fail(
        StatusCode::BAD_REQUEST,
        format!("{field}: {message}"),
        json!({ "field": field }),
    )
}

/// Parsed query parameters: each known one at most once, each a number.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Params {
    /// `after`.
    pub after: Option<u64>,
    /// `limit`.
    pub limit: Option<u64>,
    /// `cursor`.
    pub cursor: Option<u64>,
}

/// Longest query string read.
pub const MAX_QUERY: usize = 256;

/// Parses a query string of `allowed` parameters; an unknown, repeated or
/// non-numeric one is `(field, message)`.
///
/// # Errors
/// The field that is wrong and why.
pub fn parse_params(raw: Option<&str>, allowed: &[&str]) -> Result<Params, (String, String)> {
    let mut p = Params::default();
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(p);
    };
    if raw.len() > MAX_QUERY {
        return Err(("query".into(), format!("longer than {MAX_QUERY} bytes")));
    }
    for pair in raw.split('&').filter(|s| !s.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let field = gateway_core::refusals::peer_text(key);
        if !allowed.contains(&key) {
            return Err((
                field,
                format!("unknown parameter; this route takes {}", allowed.join(", ")),
            ));
        }
        let n: u64 = value.parse().map_err(|_| {
            (
                field.clone(),
                "must be a whole number from 0 to 18446744073709551615".to_owned(),
            )
        })?;
        let slot = match key {
            "after" => &mut p.after,
            "limit" => &mut p.limit,
            _ => &mut p.cursor,
        };
        if slot.replace(n).is_some() {
            return Err((field, "given twice".into()));
        }
    }
    Ok(p)
}

fn audit(
    api: &Api,
    consumer: &str,
    stream: &StreamKey,
    event: &str,
    outcome: (&str, &str),
    detail: String,
) {
    api.ctx.audit.record(
        consumer,
        &format!("{}/{}", stream.device, stream.channel),
        event,
        outcome.0,
        outcome.1,
        detail,
    );
}

/// A read or ack without a grant: 403, audited.
fn not_granted(api: &Api, consumer: &str, stream: &StreamKey, event: &str) -> Response {
    let message = format!(
        "consumer {consumer} is not granted {}/{}",
        stream.device, stream.channel
    );
    audit(
        api,
        consumer,
        stream,
        event,
        ("deny", RULE_NO_GRANT),
        message.clone(),
    );
    fail(
        StatusCode::FORBIDDEN,
        message,
        json!({
            "missing": format!("a grant: gatewayctl consumer grant {consumer} {}/{} (security administrator)", stream.device, stream.channel),
            "rule": RULE_NO_GRANT,
        }),
    )
}

async fn streams(
    State(api): State<Api>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<Peer>,
) -> Response {
    let name = match consumer(&api, &peer).await {
        Ok(n) => n,
        Err(r) => return r,
    };
    let sink = api.consumers.sink().store();
    let (grants, all) = match (sink.grants(Some(name)).await, sink.streams().await) {
        (Ok(g), Ok(s)) => (g, s),
        (Err(e), _) | (_, Err(e)) => return store_failed(&e),
    };
    let list: Vec<_> = grants
        .iter()
        .map(|g| {
            let s = all
                .iter()
                .find(|s| s.device == g.stream.device && s.channel == g.stream.channel);
            json!({
                "device": g.stream.device, "channel": g.stream.channel, "cursor": g.acked,
                "high": s.map_or(0, |s| s.high), "records": s.map_or(0, |s| s.records),
                "bytes": s.map_or(0, |s| s.bytes),
                "expired_unread": s.map_or(0, |s| s.expired_unread),
            })
        })
        .collect();
    axum::Json(json!({ "channels": list })).into_response()
}

async fn records(
    State(api): State<Api>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<Peer>,
    Path((device, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let consumer = match consumer(&api, &peer).await {
        Ok(n) => n,
        Err(r) => return r,
    };
    let stream = match stream_of(&device, &name) {
        Ok(s) => s,
        Err(e) => return bad_request(e),
    };
    let params = match parse_params(query.as_deref(), &["after", "limit"]) {
        Ok(p) => p,
        Err(e) => return bad_request(e),
    };
    let sink = api.consumers.sink().store();
    let cursor = match sink.cursor(stream.clone(), consumer.clone()).await {
        Ok(Some(c)) => c,
        Ok(None) => return not_granted(&api, &consumer, &stream, "consumer.read"),
        Err(e) => return store_failed(&e),
    };
    let after = params.after.unwrap_or(cursor);
    let limit = usize::try_from(params.limit.unwrap_or(DEFAULT_LIMIT as u64))
        .unwrap_or(MAX_LIMIT)
        .clamp(1, MAX_LIMIT);
    let got = match sink.read(stream.clone(), after, limit).await {
        Ok(r) => r,
        Err(e) => return store_failed(&e),
    };
    let next = got.last().map_or(after, |r| r.seq);
    let bytes: usize = got.iter().map(|r| r.body.len()).sum();
    let detail = match (got.first(), got.last()) {
        (Some(a), Some(b)) => format!(
            "seq {}-{}, {} records, {bytes} bytes",
            a.seq,
            b.seq,
            got.len()
        ),
        _ => format!("no records after {after}"),
    };
    audit(
        &api,
        &consumer,
        &stream,
        "consumer.read",
        ("ok", ""),
        detail,
    );
    let records: Vec<_> = got
        .into_iter()
        .map(|r| {
            let mut v = json!({
                "seq": r.seq, "time_ms": r.time_ms, "received_ms": r.received_ms,
                "format": r.format,
            });
            // Bodies of text formats are strings; anything else is hex.
            match String::from_utf8(r.body) {
                Ok(text) => v["body"] = text.into(),
                Err(e) => v["body_hex"] = hex(e.as_bytes()).into(),
            }
            v
        })
        .collect();
    axum::Json(json!({ "records": records, "next": next, "cursor": cursor })).into_response()
}

fn hex(b: &[u8]) -> String {
    gateway_core::hex::encode(b)
}

async fn ack(
    State(api): State<Api>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<Peer>,
    Path((device, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let consumer = match consumer(&api, &peer).await {
        Ok(n) => n,
        Err(r) => return r,
    };
    let stream = match stream_of(&device, &name) {
        Ok(s) => s,
        Err(e) => return bad_request(e),
    };
    let upto = match parse_params(query.as_deref(), &["cursor"]) {
        Ok(Params {
            cursor: Some(c), ..
        }) => c,
        Ok(_) => {
            return bad_request((
                "cursor".into(),
                "give the cursor of the last record taken: ?cursor=SEQ (the \"next\" of a read)"
                    .into(),
            ));
        }
        Err(e) => return bad_request(e),
    };
    let sink = api.consumers.sink().store();
    match sink.ack(stream.clone(), consumer.clone(), upto).await {
        Ok(Acked::Moved { cursor, removed }) => {
            audit(
                &api,
                &consumer,
                &stream,
                "consumer.ack",
                ("ok", ""),
                format!("cursor {cursor} (asked {upto}), {removed} records left the sink"),
            );
            axum::Json(json!({ "cursor": cursor, "removed": removed })).into_response()
        }
        Ok(Acked::Beyond { high }) => {
            let message = format!(
                "cursor {upto} is beyond the last record of {}/{} ({high})",
                stream.device, stream.channel
            );
            audit(
                &api,
                &consumer,
                &stream,
                "consumer.ack",
                ("deny", RULE_BEYOND_HIGH),
                message.clone(),
            );
            fail(
                StatusCode::CONFLICT,
                message,
                json!({ "high": high, "rule": RULE_BEYOND_HIGH }),
            )
        }
        Ok(Acked::NotGranted) => not_granted(&api, &consumer, &stream, "consumer.ack"),
        Err(e) => store_failed(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn queries_name_the_parameter_that_is_wrong() {
        let ok = parse_params(Some("after=3&limit=10"), &["after", "limit"]).expect("ok");
        assert_eq!((ok.after, ok.limit, ok.cursor), (Some(3), Some(10), None));
        let field = |q: &str| parse_params(Some(q), &["cursor"]).expect_err(q).0;
        assert_eq!(field("cursor=-1"), "cursor");
        assert_eq!(field("cursor=1&cursor=2"), "cursor");
        assert_eq!(field("after=1"), "after");
        assert_eq!(field("cursor=99999999999999999999"), "cursor");
        assert_eq!(field(&"x".repeat(300)), "query");
        assert_eq!(field("a\nb=1"), "a\\nb");
        assert!(stream_of("dept-a", "reports").is_ok());
        assert_eq!(stream_of("../x", "reports").expect_err("dots").0, "device");
        assert_eq!(stream_of("dept-a", "").expect_err("empty").0, "channel");
    }

    proptest! {
        /// Any query string and path: an answer, never a panic, and a field
        /// named in it is escaped and short.
        #[test]
        fn any_query_or_path_parses_or_names_a_short_field(
            q in ".{0,400}",
            d in ".{0,80}",
            n in ".{0,80}",
        ) {
            if let Err((field, _)) = parse_params(Some(&q), &["after", "limit"]) {
                prop_assert!(field.len() <= gateway_core::refusals::MAX_PEER_TEXT + 32, "{}", field.len());
                prop_assert!(!field.contains('\n'));
            }
            if let Ok(k) = stream_of(&d, &n) {
                prop_assert!(!k.device.contains('/') && !k.channel.contains('/'));
            }
        }
    }
}
