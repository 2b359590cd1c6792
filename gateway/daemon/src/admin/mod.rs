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

/// Ready or not; ready but degraded while an alarm forwarding target is
/// unreachable (relays and channels work; the SOC does not hear of attacks).
async fn readyz(State(s): State<AdminState>) -> (StatusCode, String) {
    let (status, text) = match s.readiness {
        Readiness::Hub => (StatusCode::OK, "ready"),
        Readiness::Edge if s.metrics.any_peer_up() => (StatusCode::OK, "ready: a hub tunnel is up"),
        Readiness::Edge => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no hub tunnel is up",
        ),
    };
    let mut text = text.to_owned();
    if let Some((since, why)) = s.metrics.store_down() {
        text += &format!(
            "\ndegraded: the hub's store (PostgreSQL) does not answer since {}: {why}; relays continue, channel batches wait in the edges' buffers",
            gateway_core::units::rfc3339_cst(since)
        );
    }
    for (target, since) in s.metrics.forwarding_down() {
        text += &format!(
            "\ndegraded: alarm forwarding to {target} is down since {}",
            gateway_core::units::rfc3339_cst(since)
        );
    }
    (status, text + "\n")
}
