//! What every capability of a running node shares (the layer under tunnel,
//! relay, channel and fleet): identity, the policy in force, the audit writer,
//! metrics, the shutdown tokens, the tokens that cut relays of a removed
//! service or an expired zone, and bandwidth caps.
//!
//! - [`audit`]: the audit writer thread; [`clock`]: now, and today in CST;
//!   [`limit`]: bandwidth caps; [`sockets`]: listeners, handed in or bound.
//!
//! Invariants: a zone whose assessment ended is cut once, audited once, and
//! bridged again only when valid again; a service removed from the policy has
//! its relays cut as the policy is swapped.

pub mod audit;
pub mod clock;
pub mod guard;
pub mod http;
pub mod limit;
pub mod sockets;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use gateway_core::config::ZoneKind;
use gateway_core::policy::{Policy, RuleId, assessment_valid};
use gateway_core::refusals::{Summary, Verdict, peer_text};
use gateway_core::units::Date;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::admin::metrics::Metrics;
use audit::AuditSink;
use clock::today_local;
use limit::Limiter;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
    /// Intrusion detection and bans.
    pub guard: guard::Guard,
    /// Every relay task, for draining.
    pub tracker: TaskTracker,
    /// Cancelled when draining starts: listeners stop accepting.
    pub draining: CancellationToken,
    /// Cancelled when the grace period ends: relays are cut.
    pub kill: CancellationToken,
    services: Mutex<HashMap<String, CancellationToken>>,
    zones: Mutex<HashMap<String, CancellationToken>>,
    limiters: Mutex<HashMap<String, Arc<[Limiter; 2]>>>,
    expired: Mutex<Vec<String>>,
    clock_offset_days: AtomicI64,
    refusals: Mutex<Summary>,
}

/// What an unauthenticated peer tried and was refused: audited with the
/// peer's address as subject, summarised per (address, attempt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerAttempt {
    /// An operators' API request without a valid credential.
    OperatorCredential,
    /// An enrollment request refused (bad token, wrong device, malformed).
    Enrollment,
    /// A certificate-less connection that sent no enrollment request in time,
    /// or found its address's enrollments all in progress.
    EnrollmentConnection,
    /// A consumer API request without a valid consumer certificate.
    ConsumerCertificate,
    /// A tunnel presenting a device certificate that is no longer the
    /// device's (re-enrolled, or renewed and handed over).
    SupersededCertificate,
    /// A producer outside its ingest listener's zone.
    IngestAddress,
    /// A producer without a valid token or certificate (`auth` set).
    ProducerCredential,
    /// A connection over an HTTP listener's cap (in all, or from one address).
    ConnectionCap,
    /// A tunnel from a revoked device (its certificate is valid, the device
    /// is not): a box that keeps retrying is summarised, not logged each time.
    RevokedDevice,
}

impl PeerAttempt {
    const ALL: [PeerAttempt; 9] = [
        PeerAttempt::RevokedDevice,
        PeerAttempt::ConnectionCap,
        PeerAttempt::IngestAddress,
        PeerAttempt::ProducerCredential,
        PeerAttempt::OperatorCredential,
        PeerAttempt::Enrollment,
        PeerAttempt::EnrollmentConnection,
        PeerAttempt::ConsumerCertificate,
        PeerAttempt::SupersededCertificate,
    ];

    /// The summary key, and the metrics label.
    fn kind(self) -> &'static str {
        match self {
            PeerAttempt::OperatorCredential => "operator-credential",
            PeerAttempt::Enrollment => "enrollment",
            PeerAttempt::EnrollmentConnection => "enrollment-connection",
            PeerAttempt::ConsumerCertificate => "consumer-certificate",
            PeerAttempt::SupersededCertificate => "superseded-certificate",
            PeerAttempt::IngestAddress => "ingest-address",
            PeerAttempt::ProducerCredential => "producer-credential",
            PeerAttempt::ConnectionCap => "connection-cap",
            PeerAttempt::RevokedDevice => "revoked-device",
        }
    }

    fn event(self) -> &'static str {
        match self {
            PeerAttempt::OperatorCredential => "admin.auth",
            PeerAttempt::Enrollment | PeerAttempt::EnrollmentConnection => "device.enroll",
            PeerAttempt::ConsumerCertificate => "consumer.auth",
            PeerAttempt::SupersededCertificate | PeerAttempt::RevokedDevice => "tunnel.refuse",
            PeerAttempt::IngestAddress | PeerAttempt::ProducerCredential => "channel.refuse",
            PeerAttempt::ConnectionCap => "listener.refuse",
        }
    }

    fn object(self) -> &'static str {
        match self {
            PeerAttempt::OperatorCredential => "operators-api",
            PeerAttempt::Enrollment | PeerAttempt::EnrollmentConnection => "enrollment",
            PeerAttempt::ConsumerCertificate => "consumers-api",
            PeerAttempt::SupersededCertificate | PeerAttempt::RevokedDevice => "tunnel",
            PeerAttempt::IngestAddress | PeerAttempt::ProducerCredential => "ingest",
            PeerAttempt::ConnectionCap => "listener",
        }
    }

    /// What the detectors make of it, and from which side it came.
    fn signal(
        self,
    ) -> (
        gateway_core::detect::Signal,
        gateway_core::detect::Direction,
    ) {
        use gateway_core::detect::{Direction, Signal};
        match self {
            PeerAttempt::IngestAddress => (Signal::Refused { target: 1 }, Direction::Outbound),
            PeerAttempt::ProducerCredential => (Signal::HandshakeFailed, Direction::Outbound),
            PeerAttempt::ConnectionCap => (Signal::Connection, Direction::Inbound),
            PeerAttempt::OperatorCredential
            | PeerAttempt::Enrollment
            | PeerAttempt::EnrollmentConnection
            | PeerAttempt::ConsumerCertificate
            | PeerAttempt::SupersededCertificate
            | PeerAttempt::RevokedDevice => (Signal::HandshakeFailed, Direction::Inbound),
        }
    }

    /// The boundary rule the refusal is by, if one.
    fn rule(self) -> &'static str {
        match self {
            PeerAttempt::IngestAddress => "R5.address",
            other => other.kind(),
        }
    }
}

impl Ctx {
    /// A context for `policy`.
    pub fn new(id: String, policy: Policy, audit: AuditSink) -> Arc<Self> {
        Arc::new(Ctx {
            guard: guard::Guard::new(&id, &policy.config().detect),
            id,
            policy: RwLock::new(Arc::new(policy)),
            audit,
            metrics: Arc::new(Metrics::default()),
            tracker: TaskTracker::new(),
            draining: CancellationToken::new(),
            kill: CancellationToken::new(),
            services: Mutex::new(HashMap::new()),
            zones: Mutex::new(HashMap::new()),
            limiters: Mutex::new(HashMap::new()),
            expired: Mutex::new(Vec::new()),
            clock_offset_days: AtomicI64::new(0),
            refusals: Mutex::new(Summary::default()),
        })
    }

    /// The limits of this node's HTTP listeners (`[node].max_http_connections`
    /// and `max_http_connections_per_source`; timeouts fixed).
    pub fn http_limits(&self) -> http::Limits {
        let policy = self.policy();
        let node = &policy.config().node;
        http::Limits {
            max_connections: node.max_http_connections as usize,
            per_source: node.max_http_connections_per_source as usize,
            ..http::Limits::default()
        }
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

    /// Whether `ip` is banned: its connection, datagram or QUIC Initial is
    /// dropped before any work (counted, not audited: a ban's alarm was).
    pub fn banned(&self, ip: IpAddr) -> bool {
        self.guard.banned(ip, &self.metrics)
    }

    /// What a listener saw, for the detectors.
    pub fn report(&self, r: &guard::Report<'_>, signal: gateway_core::detect::Signal) {
        self.guard.report(r, signal, &self.metrics);
    }

    /// A crossing refused by boundary rule `why` (anything else, such as
    /// `no-route` or a cap, is not the client's doing and is not reported):
    /// an application-protocol refusal is a protocol violation, the rest a
    /// refusal of `target` (a port or service; distinct ones make a scan).
    pub fn report_refusal(&self, r: &guard::Report<'_>, target: u64, why: &str) {
        use gateway_core::detect::Signal;
        let signal = match RuleId::parse(why) {
            None => return,
            Some(RuleId::AppProtocol | RuleId::HttpAllow) => Signal::ProtocolViolation,
            Some(RuleId::ChannelContent) => Signal::ContentRefused,
            Some(_) => Signal::Refused { target },
        };
        self.report(r, signal);
    }

    /// Sleeps for `d`; false if draining started meanwhile (stop retrying).
    pub async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => true,
            () = self.draining.cancelled() => false,
        }
    }

    /// Today's date for decisions (China Standard Time, plus the test offset).
    pub fn today(&self) -> Date {
        today_local().add_days(self.clock_offset_days.load(Ordering::Relaxed))
    }

    /// Moves this node's calendar by `days` (tests of assessment expiry).
    pub fn set_clock_offset_days(&self, days: i64) {
        self.clock_offset_days.store(days, Ordering::Relaxed);
    }

    /// The token that cuts every relay of legacy zone `zone` (assessment ended).
    pub fn zone_token(&self, zone: &str) -> CancellationToken {
        lock(&self.zones)
            .entry(zone.to_owned())
            .or_insert_with(|| self.kill.child_token())
            .clone()
    }

    /// The bandwidth caps (forward, backward) of `service`, if it has one.
    pub fn limiter(&self, service: &str, rate: Option<u64>) -> Option<Arc<[Limiter; 2]>> {
        let mut l = lock(&self.limiters);
        let Some(rate) = rate else {
            l.remove(service);
            return None;
        };
        let entry = l
            .entry(service.to_owned())
            .or_insert_with(|| Arc::new([Limiter::new(rate), Limiter::new(rate)]));
        if entry[0].rate != rate {
            *entry = Arc::new([Limiter::new(rate), Limiter::new(rate)]);
        }
        Some(entry.clone())
    }

    /// Rule R3 on running relays: a legacy zone whose assessment has ended stops
    /// bridging now. Its relays are cut, an error is logged and audited once.
    /// Returns the zones cut by this call. (Called every minute, and after reload.)
    pub fn recheck_assessments(&self) -> Vec<String> {
        let today = self.today();
        let policy = self.policy();
        let mut cut = Vec::new();
        let mut expired = lock(&self.expired);
        for z in policy
            .config()
            .zones
            .iter()
            .filter(|z| z.kind == ZoneKind::Legacy)
        {
            match assessment_valid(z, today) {
                Err(r) if !expired.contains(&z.name) => {
                    error!(zone = %z.name, rule = %r.rule, "Assessment ended: bridging of this zone stopped. {}", r.reason);
                    self.audit.record(
                        &self.id,
                        &z.name,
                        "zone.stop",
                        "deny",
                        r.rule.as_str(),
                        r.reason,
                    );
                    if let Some(t) = lock(&self.zones).remove(&z.name) {
                        t.cancel();
                    }
                    expired.push(z.name.clone());
                    cut.push(z.name.clone());
                }
                Ok(()) if expired.contains(&z.name) => {
                    info!(zone = %z.name, "Assessment valid again: bridging resumes");
                    expired.retain(|e| *e != z.name);
                }
                _ => {}
            }
        }
        cut
    }

    /// A refused crossing: logged, audited under `event` and counted. `why` is
    /// a rule id or a documented reason (`no-route`, `max-connections`, ...:
    /// [`gateway_core::refusals::REASONS`]); it goes into the audit record and
    /// the metrics label, anything else (a peer's claim) as `refused`.
    pub fn refuse(&self, event: &str, subject: &str, object: &str, why: &str, reason: &str) {
        info!(%subject, %object, why, %reason, "Refused");
        // The rule that decided, or the reason no rule decides (both
        // documented: docs/policy.md, docs/audit.md).
        let rule = if RuleId::parse(why).is_some() || gateway_core::refusals::is_reason(why) {
            why
        } else {
            ""
        };
        self.audit
            .record(subject, object, event, "deny", rule, reason.to_owned());
        self.metrics
            .refused(object, if rule.is_empty() { "refused" } else { rule });
    }

    /// An unauthenticated peer at `addr` refused (`proven`: its address is,
    /// a TCP or QUIC peer; a UDP datagram's is not): the first of each (address,
    /// attempt) in a window is logged and audited at once, with the address as
    /// subject and what the peer claimed (`claimed`, capped and escaped) in the
    /// detail; the rest are counted and summarised by [`watch_refusals`].
    pub fn refuse_peer(
        &self,
        addr: std::net::SocketAddr,
        proven: bool,
        attempt: PeerAttempt,
        reason: &str,
        claimed: &str,
    ) {
        let peer = addr.ip();
        self.metrics.refused(attempt.object(), attempt.kind());
        let (signal, direction) = attempt.signal();
        let report = guard::Report {
            peer: addr,
            verified: proven,
            direction,
            target: attempt.object(),
            device: None,
        };
        self.report(&report, signal);
        let verdict = lock(&self.refusals).handle_refusal(clock::now_ms(), peer, attempt.kind());
        let Verdict::Record(source) = verdict else {
            debug!(%peer, kind = attempt.kind(), %reason, "Refused (summarised)");
            return;
        };
        let reason = peer_text(reason);
        info!(%peer, kind = attempt.kind(), %reason, "Refused an unauthenticated peer");
        let detail = if claimed.is_empty() {
            reason
        } else {
            format!("{reason}; claimed: {}", peer_text(claimed))
        };
        self.audit.record(
            &source.to_string(),
            attempt.object(),
            attempt.event(),
            "deny",
            attempt.rule(),
            detail,
        );
    }

    /// Audits the summaries of unauthenticated refusals whose window ended.
    pub fn flush_refusals(&self) {
        let due = lock(&self.refusals).poll_due(clock::now_ms());
        for d in due {
            let Some(attempt) = PeerAttempt::ALL.into_iter().find(|a| a.kind() == d.kind) else {
                continue;
            };
            warn!(peer = %d.source, kind = d.kind, count = d.count, "Unauthenticated peer refused again (summarised)");
            self.audit.record(
                &d.source.to_string(),
                attempt.object(),
                attempt.event(),
                "deny",
                attempt.rule(),
                format!(
                    "{} more refused since the last record (summarised, at most one record per {} s)",
                    d.count,
                    gateway_core::refusals::WINDOW_MS / 1000
                ),
            );
        }
    }

    /// A relay (or UDP flow) opened: audited with the rule that allowed it and
    /// counted. Returns when it started, for its close.
    pub fn relay_opened(
        &self,
        subject: &str,
        object: &str,
        rule: &str,
        detail: String,
    ) -> std::time::Instant {
        let started = std::time::Instant::now();
        self.audit
            .record(subject, object, "relay.open", "allow", rule, detail);
        self.metrics.opened(object);
        started
    }

    /// A relay (or UDP flow) ended: its bytes counted and its close audited.
    pub fn relay_closed(
        &self,
        subject: &str,
        object: &str,
        (up, down): (u64, u64),
        started: std::time::Instant,
        end: &str,
        detail: &str,
    ) {
        self.metrics.closed(object, up, down);
        self.audit.record(
            subject,
            object,
            "relay.close",
            "ok",
            "",
            format!(
                "{detail}bytes_up={up} bytes_down={down} duration_ms={} end={end}",
                started.elapsed().as_millis()
            ),
        );
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

/// Re-checks assessments every minute until draining (rule R3 on running relays).
pub async fn watch_assessments(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                ctx.recheck_assessments();
            }
            () = ctx.draining.cancelled() => return,
        }
    }
}

/// Writes the summaries of unauthenticated refusals every second until draining.
pub async fn watch_refusals(ctx: Arc<Ctx>) {
    while ctx.pause(Duration::from_secs(1)).await {
        ctx.flush_refusals();
    }
    ctx.flush_refusals();
}
