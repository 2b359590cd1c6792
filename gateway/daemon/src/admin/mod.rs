//! The admin listener: `/healthz`, `/readyz`, `/metrics` on `[admin].listen`,
//! and the counters behind it ([`metrics`]). Below every capability: each one
//! counts into [`metrics::Metrics`] through the node's context.

pub mod metrics;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

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

/// The admin endpoints (served by the role on `[admin].listen`, with the
/// node's HTTP limits).
pub fn router(metrics: Arc<Metrics>, readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|State(s): State<AdminState>| async move { s.metrics.render() }),
        )
        .with_state(AdminState { metrics, readiness })
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
