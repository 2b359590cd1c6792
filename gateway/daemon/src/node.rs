//! What every task of a running node shares: identity, the current policy, the
//! audit writer, metrics, and the shutdown tokens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use gateway_core::policy::Policy;
use gateway_core::units::Date;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit_sink::AuditSink;
use crate::metrics::Metrics;

/// China Standard Time, in which assessment dates are written.
const LOCAL_OFFSET_MS: i64 = 8 * 3_600_000;

/// Today's civil date in China Standard Time (UTC+8, no daylight saving).
pub fn today_local() -> Date {
    Date::from_unix_ms(crate::audit_sink::now_ms() + LOCAL_OFFSET_MS)
}

/// Shared state of a running node.
pub struct Ctx {
    /// This node's id.
    pub id: String,
    policy: RwLock<Arc<Policy>>,
    /// The audit writer.
    pub audit: AuditSink,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Every relay task, for draining.
    pub tracker: TaskTracker,
    /// Cancelled when draining starts: listeners stop accepting.
    pub draining: CancellationToken,
    /// Cancelled when the grace period ends: relays are cut.
    pub kill: CancellationToken,
    services: Mutex<HashMap<String, CancellationToken>>,
}

impl Ctx {
    /// A context for `policy`.
    pub fn new(id: String, policy: Policy, audit: AuditSink) -> Arc<Self> {
        Arc::new(Ctx {
            id,
            policy: RwLock::new(Arc::new(policy)),
            audit,
            metrics: Arc::new(Metrics::default()),
            tracker: TaskTracker::new(),
            draining: CancellationToken::new(),
            kill: CancellationToken::new(),
            services: Mutex::new(HashMap::new()),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts a new policy in force; relays of services it no longer has are cut.
    pub fn set_policy(&self, policy: Policy) {
        let names: Vec<String> = policy
            .config()
            .edge()
            .map(|e| e.services.iter().map(|s| s.name.clone()).collect())
            .unwrap_or_default();
        *self
            .policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
        let mut services = self
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        services.retain(|name, token| {
            let keep = names.contains(name);
            if !keep {
                token.cancel();
            }
            keep
        });
    }

    /// The token that cuts relays of `service` when it is removed (or the node is killed).
    pub fn service_token(&self, service: &str) -> CancellationToken {
        let mut services = self
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        services
            .entry(service.to_owned())
            .or_insert_with(|| self.kill.child_token())
            .clone()
    }
}
