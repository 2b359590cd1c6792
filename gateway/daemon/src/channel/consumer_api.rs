//! The hub's API on `[hub].api`: consumers read channel records from the sink
//! with a cursor and acknowledge them. Plain HTTP without authentication:
//! keep it on a trusted address (consumers as authenticated identities with
//! their own cursors are issue 14).
//!
//! - `GET /v1/channels`: every (device, channel) stream in the sink.
//! - `GET /v1/channels/{device}/{name}/records?after=CURSOR&limit=N`: records
//!   after the cursor in sequence order, `{"records": [...], "next": CURSOR}`.
//! - `POST /v1/channels/{device}/{name}/ack?cursor=CURSOR`: the consumer has
//!   every record up to the cursor; they are removed from the sink.
//!
//! The format is documented in `docs/protocol.md` ("Hub API").

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use gateway_store::error::StoreError;
use gateway_store::sink::StreamKey;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::hub_sink::SinkHandle;

/// Most records one read returns.
pub const MAX_LIMIT: usize = 10_000;

/// Serves the hub API until `stop`.
pub async fn serve(listener: TcpListener, sink: SinkHandle, stop: CancellationToken) {
    info!(listen = ?listener.local_addr().ok(), "Hub API listening");
    let app = Router::new()
        .route("/v1/channels", get(streams))
        .route("/v1/channels/{device}/{name}/records", get(records))
        .route("/v1/channels/{device}/{name}/ack", post(ack))
        .with_state(sink);
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        error!(%error, "Hub API listener failed");
    }
}

/// A sink failure: 503 when the engine is unavailable (retry), else 500.
fn store_failed(e: &StoreError) -> Response {
    let status = if e.retry_later() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    fail(status, e.to_string())
}

fn fail(status: StatusCode, error: String) -> Response {
    (status, axum::Json(json!({ "error": error }))).into_response()
}

async fn streams(State(sink): State<SinkHandle>) -> Response {
    match sink.store().streams().await {
        Ok(list) => {
            let list: Vec<_> = list
                .into_iter()
                .map(|s| {
                    json!({
                        "device": s.device, "channel": s.channel, "deliver_to": s.deliver_to,
                        "high": s.high, "consumed": s.consumed, "records": s.records,
                        "bytes": s.bytes, "duplicates": s.duplicates,
                    })
                })
                .collect();
            axum::Json(json!({ "channels": list })).into_response()
        }
        Err(e) => store_failed(&e),
    }
}

#[derive(Deserialize)]
struct ReadQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

async fn records(
    State(sink): State<SinkHandle>,
    Path((device, name)): Path<(String, String)>,
    Query(q): Query<ReadQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(1000).clamp(1, MAX_LIMIT);
    let after = q.after;
    let got = sink
        .store()
        .read(
            StreamKey {
                device,
                channel: name,
            },
            after,
            limit,
        )
        .await;
    match got {
        Ok(records) => {
            let next = records.last().map_or(after, |r| r.seq);
            let records: Vec<_> = records
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
            axum::Json(json!({ "records": records, "next": next })).into_response()
        }
        Err(e) => store_failed(&e),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Deserialize)]
struct AckQuery {
    cursor: Option<u64>,
}

async fn ack(
    State(sink): State<SinkHandle>,
    Path((device, name)): Path<(String, String)>,
    Query(q): Query<AckQuery>,
) -> Response {
    let Some(cursor) = q.cursor else {
        return fail(
            StatusCode::BAD_REQUEST,
            "give the cursor of the last record taken: ?cursor=SEQ (the \"next\" of a read)".into(),
        );
    };
    match sink
        .store()
        .consume(
            StreamKey {
                device,
                channel: name,
            },
            cursor,
        )
        .await
    {
        Ok(n) => axum::Json(json!({ "consumed": n, "cursor": cursor })).into_response(),
        Err(e) => store_failed(&e),
    }
}
