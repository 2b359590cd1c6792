//! The level-3 check of an `rtp` or `mpegts` service's flows, datagram by
//! datagram, both ways (rule R5.app-protocol; the checks are
//! `gateway_core::sniff::datagram`'s). A datagram that fails is dropped and
//! counted (`gateway_udp_protocol_violations_total`); a flow's first violation
//! and then one per 10 s are audited with the offset and the reason; a flow
//! with more than `max_violations` in a minute is closed, audited.

use std::sync::{Arc, Mutex};

use gateway_core::config::{AppProtocol, Service};
use gateway_core::sniff::datagram::{self, Datagram, Violations};

use crate::node::Ctx;
use crate::node::clock::now_ms;

enum Owned {
    Rtp(Vec<u8>),
    Mpegts(Vec<u16>),
}

/// One flow's check.
pub struct FlowCheck {
    ctx: Arc<Ctx>,
    what: Owned,
    protocol: &'static str,
    max: u32,
    violations: Mutex<Violations>,
    /// Notified when the flow is to be closed.
    pub closed: tokio::sync::Notify,
    who: (String, String),
    flow: u32,
}

impl FlowCheck {
    /// The check of flow `flow` of `svc` for `subject`, if its app_protocol
    /// is a datagram one.
    pub fn of(ctx: &Arc<Ctx>, svc: &Service, subject: &str, flow: u32) -> Option<Arc<Self>> {
        let what = match svc.app_protocol? {
            AppProtocol::Rtp => Owned::Rtp(svc.rtp_payload_types.clone()),
            AppProtocol::Mpegts => Owned::Mpegts(svc.mpegts_pids.clone()),
            AppProtocol::Http | AppProtocol::Tls | AppProtocol::Postgres => return None,
        };
        Some(Arc::new(Self {
            ctx: ctx.clone(),
            protocol: svc.app_protocol.map_or("", AppProtocol::as_str),
            what,
            max: svc.max_violations,
            violations: Mutex::new(Violations::default()),
            closed: tokio::sync::Notify::new(),
            who: (subject.to_owned(), svc.name.clone()),
            flow,
        }))
    }

    /// Whether datagram `d` (from the client when `from_client`) may pass.
    pub fn pass(&self, d: &[u8], from_client: bool) -> bool {
        let proto = match &self.what {
            Owned::Rtp(t) => Datagram::Rtp(t),
            Owned::Mpegts(p) => Datagram::Mpegts(p),
        };
        let Err(v) = datagram::check(&proto, d) else {
            return true;
        };
        let (subject, service) = (&self.who.0, &self.who.1);
        self.ctx.metrics.udp_violation(service);
        let verdict = self
            .violations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .add(now_ms(), self.max);
        let side = if from_client {
            "from the client"
        } else {
            "from the service"
        };
        if verdict.audit {
            tracing::info!(%subject, %service, flow = self.flow, offset = v.offset, reason = v.reason, "UDP datagram refused by the {} check", self.protocol);
            self.ctx.audit.record(
                subject,
                service,
                "relay.violation",
                "deny",
                "R5.app-protocol",
                format!(
                    "udp flow {}: a {}-byte datagram {side} is not {}: {} at byte {} ({} refused this minute; at most one record per {} s)",
                    self.flow,
                    d.len(),
                    self.protocol,
                    v.reason,
                    v.offset,
                    verdict.in_minute,
                    datagram::AUDIT_EVERY_MS / 1000
                ),
            );
        }
        if verdict.close {
            self.ctx.audit.record(
                subject,
                service,
                "relay.refuse",
                "deny",
                "R5.app-protocol",
                format!(
                    "udp flow {} closed: more than {} datagrams refused in a minute",
                    self.flow, self.max
                ),
            );
            self.closed.notify_one();
        }
        false
    }
}
