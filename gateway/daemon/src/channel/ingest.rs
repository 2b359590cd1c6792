//! Ingest on the legacy side: `POST /v1/channels/{name}/records` on each
//! `[[ingest]]` listener. A record is checked at the boundary (the policy's
//! channel rules, then its declared format really parses), committed durably to
//! the buffer, and only then answered with its sequence number.
//!
//! Records are committed by the buffer thread ([`super::buffer`]), which groups
//! concurrent producers into one transaction.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use gateway_core::config::{Format, WhenFull as CfgWhenFull};
use gateway_store::buffer::NewRecord;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{error, info};

use super::buffer::BufferHandle;
use super::check::{buffer_when_full, check_records, split_records};
use crate::node::Ctx;

/// How long `when_full = "block"` holds a producer before answering 503.
pub const BLOCK_TIMEOUT: Duration = Duration::from_secs(5);
#[derive(Clone)]
struct IngestState {
    ctx: Arc<Ctx>,
    zone: String,
    writer: BufferHandle,
}

/// Serves one `[[ingest]]` listener until draining.
pub async fn serve(ctx: Arc<Ctx>, zone: String, listener: TcpListener, writer: BufferHandle) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    info!(listen = ?addr, %zone, "Ingest listening");
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
    let app = Router::new()
        .route("/v1/channels/{name}/records", post(post_record))
        .route("/v1/channels/{name}/receipts", get(receipts))
        // Room above the largest record limit, so an oversized record still
        // reaches the policy and gets an explained, audited refusal.
        .layer(DefaultBodyLimit::max(
            usize::try_from(limit.saturating_add(1 << 20)).unwrap_or(usize::MAX),
        ))
        .with_state(IngestState { ctx, zone, writer });
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(draining.cancelled_owned())
        .await
    {
        error!(%error, "Ingest listener failed");
    }
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}

fn format_of(headers: &HeaderMap) -> Option<Format> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mime = ct.split(';').next()?.trim().to_ascii_lowercase();
    match mime.as_str() {
        "application/json" | "application/x-ndjson" => Some(Format::Json),
        "application/xml" | "text/xml" => Some(Format::Xml),
        "text/csv" => Some(Format::Csv),
        "text/plain" => Some(Format::Text),
        "application/octet-stream" => Some(Format::Raw),
        _ => None,
    }
}

async fn post_record(
    State(st): State<IngestState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
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
        return answer(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            json!({ "error": "declare the record's format with Content-Type: application/json, application/xml, text/csv or text/plain" }),
        );
    };
    let subject = format!("ingest:{}", st.zone);
    // A batch: `application/x-ndjson`, one JSON record per non-empty line,
    // accepted or refused as a whole.
    let batch = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/x-ndjson"));
    let items = split_records(&body, batch);
    if items.is_empty() {
        return answer(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "error": "the batch holds no record" }),
        );
    }
    if let Err(r) = check_records(&st.ctx, &subject, &name, format, &items, batch) {
        let status = if r.by_policy {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        return answer(status, json!({ "error": r.reason, "rule": r.rule }));
    }
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
            .append(&name, records.clone(), channel.max_bytes.0, when_full)
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
                return answer(
                    StatusCode::OK,
                    json!({ "channel": name, "seq": a.first, "last": a.last, "dropped": a.dropped.map(|(f, t)| [f, t]) }),
                );
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
    Path(name): Path<String>,
    Query(q): Query<ReceiptsQuery>,
) -> Response {
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
