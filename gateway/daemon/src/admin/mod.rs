//! The admin listener: `/healthz`, `/readyz`, `/metrics` on `[admin].listen`,
//! and the counters behind it ([`metrics`]). Below every capability: each one
//! counts into [`metrics::Metrics`] through the node's context.

pub mod metrics;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use metrics::Metrics;

/// When the node is ready.
#[derive(Clone)]
pub enum Readiness {
    /// A hub: ready once listening.
    Hub,
    /// An edge: ready while at least one hub tunnel is up.
    Edge,
}

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    readiness: Readiness,
}

/// Serves the admin endpoints until `stop`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|State(s): State<AdminState>| async move { s.metrics.render() }),
        )
        .with_state(AdminState { metrics, readiness });
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(%error, "Admin listener failed");
    }
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    match s.readiness {
        Readiness::Hub => (StatusCode::OK, "ready\n"),
        Readiness::Edge if s.metrics.any_peer_up() => {
            (StatusCode::OK, "ready: a hub tunnel is up\n")
        }
        Readiness::Edge => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no hub tunnel is up\n",
        ),
    }
}
