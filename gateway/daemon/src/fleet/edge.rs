//! The edge's side of central management: the control session on the first
//! lane of each hub tunnel (heartbeats, config offers, commands, certificate
//! renewal, audit shipping). Enrollment is [`super::enroll`]; what becomes of
//! an offered config is [`super::pushed_config`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_core::config::{Config, Role};
use gateway_core::fleet::{self, CommandKind, ConfigOutcome, Message, Status};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::{read_msg, write_msg};
use crate::node::Ctx;
use crate::node::clock::now_ms;
use crate::tunnel::pki;
use crate::tunnel::tls::{self, ClientHolder};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a control session asks of the main loop (which owns the running node).
pub enum Request {
    /// Apply an offered config; the answer is the `ConfigResult` to send.
    Apply {
        /// Offered version.
        version: u64,
        /// Its text.
        text: String,
        /// Where the result goes.
        reply: oneshot::Sender<Message>,
    },
    /// Close and re-open every hub tunnel.
    Reconnect,
}

/// The edge's management state.
pub struct EdgeFleet {
    state_dir: PathBuf,
    /// `[uplink]` `ca`, `cert` and `key` of the config in force (a reload
    /// may move them).
    uplink: Mutex<(PathBuf, PathBuf, PathBuf)>,
    /// The TLS client configuration the tunnels connect with (swapped on renewal).
    pub client: ClientHolder,
    heartbeat: Duration,
    started: Instant,
    applied: Mutex<(u64, String)>,
    report: Mutex<Option<Message>>,
    requests: mpsc::Sender<Request>,
    validity: Mutex<Option<(i64, i64)>>,
    /// A pushed config is in its try window.
    trying: std::sync::atomic::AtomicBool,
    /// Fingerprints of the CA file as last read for the tunnels.
    ca_fingerprints: Mutex<Vec<String>>,
    /// Woken when a try ends: the sessions send a heartbeat at once, so
    /// the hub (and a rollout waiting on it) hears the version is kept
    /// without waiting up to an interval.
    try_ended: tokio::sync::Notify,
    /// A renewal is in flight on one of the hubs' sessions: one at a time,
    /// or two hubs each record a new certificate and the box may keep the
    /// one the registry no longer knows (then every hub refuses it).
    renewal: std::sync::atomic::AtomicBool,
    /// `[update] handoff` (fixed at start): where offers and
    /// acknowledgements are handed to the updater, and `config-try` says a
    /// config try runs.
    handoff: PathBuf,
}

/// Where a box keeps the CA bundle a hub sent it (a CA rotation): while it
/// is there the box trusts it for hubs in place of its `[uplink].ca` file.
pub fn delivered_ca(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("trust").join("ca.pem")
}

/// The CA file a box checks hubs against: the delivered bundle if there is
/// one, else `[uplink].ca`.
pub fn trust_path(state_dir: &std::path::Path, configured: &std::path::Path) -> PathBuf {
    let delivered = delivered_ca(state_dir);
    if delivered.is_file() {
        delivered
    } else {
        configured.to_owned()
    }
}

/// What the box holds of a delivered bundle (`trust/ca.json`).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Delivered {
    issued_ms: i64,
    signer: String,
}

/// The fingerprints of the CA certificates in `path` (empty when unreadable).
fn ca_fingerprints(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|pem| pki::fingerprints(&pem))
        .unwrap_or_default()
}

/// A session's claim on the box's one renewal in flight; given back when
/// dropped (answered, or the session ended or was aborted).
struct RenewalClaim(Arc<EdgeFleet>);

impl RenewalClaim {
    fn take(fleet: &Arc<EdgeFleet>) -> Option<Self> {
        fleet
            .renewal
            .compare_exchange(
                false,
                true,
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
            )
            .ok()
            .map(|_| RenewalClaim(fleet.clone()))
    }
}

impl Drop for RenewalClaim {
    fn drop(&mut self) {
        self.0
            .renewal
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

impl EdgeFleet {
    /// The management state of an edge running `applied` (version, text).
    pub fn new(
        config: &Config,
        client: ClientHolder,
        applied: (u64, String),
        requests: mpsc::Sender<Request>,
    ) -> Option<Arc<Self>> {
        let Role::Edge(e) = &config.role else {
            return None;
        };
        let validity = std::fs::read_to_string(&e.uplink.cert.path)
            .ok()
            .and_then(|p| pki::validity(&p));
        let trust = trust_path(&config.node.state_dir, &e.uplink.ca.path);
        // The marker as the managed state on disk says: a try resumed at
        // start stays marked, one a crash left behind is cleared.
        let resumed = super::pushed_config::load_managed(&config.node.state_dir)
            .is_some_and(|(_, _, trying)| trying);
        if let Err(err) = super::firmware_box::mark_config_try(&e.update.handoff, resumed) {
            error!(%err, "Cannot clear the config-try marker of the updater's handoff");
        }
        Some(Arc::new(EdgeFleet {
            state_dir: config.node.state_dir.clone(),
            uplink: Mutex::new((
                e.uplink.ca.path.clone(),
                e.uplink.cert.path.clone(),
                e.uplink.key.path.clone(),
            )),
            client,
            heartbeat: e.uplink.heartbeat,
            started: Instant::now(),
            applied: Mutex::new(applied),
            report: Mutex::new(None),
            requests,
            validity: Mutex::new(validity),
            trying: std::sync::atomic::AtomicBool::new(false),
            ca_fingerprints: Mutex::new(ca_fingerprints(&trust)),
            try_ended: tokio::sync::Notify::new(),
            renewal: std::sync::atomic::AtomicBool::new(false),
            handoff: e.update.handoff.clone(),
        }))
    }

    /// The CA file the box checks hubs against now.
    pub fn trust(&self) -> PathBuf {
        trust_path(&self.state_dir, &lock(&self.uplink).0)
    }

    /// A reload put other `[uplink]` files in force (the tunnels were given a
    /// client made from them): renewals and a delivered bundle use them.
    pub fn set_uplink(&self, ca: PathBuf, cert: PathBuf, key: PathBuf) {
        *lock(&self.uplink) = (ca, cert, key);
        *lock(&self.ca_fingerprints) = ca_fingerprints(&self.trust());
    }

    /// The tunnels' TLS client made again from the files in force.
    fn reload_client(&self) -> Result<(), String> {
        let (_, cert, key) = lock(&self.uplink).clone();
        let trust = self.trust();
        let client = tls::client(&trust, &cert, &key).map_err(|e| e.to_string())?;
        *self
            .client
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = client;
        *lock(&self.ca_fingerprints) = ca_fingerprints(&trust);
        Ok(())
    }

    /// A CA bundle from a hub: kept and trusted for hubs from now on when a CA
    /// the box trusts now signed it, it holds that CA and it is not older
    /// than the one held. Returns the new fingerprints, or `None` when it is
    /// the one held already.
    ///
    /// # Errors
    /// Why it was refused (the box goes on trusting what it trusted).
    pub fn take_ca_bundle(
        &self,
        pem: &str,
        issued_ms: i64,
        signature: &str,
    ) -> Result<Option<Vec<String>>, String> {
        use std::io::Read as _;
        let dir = self.state_dir.join("trust");
        let held: Delivered = std::fs::read_to_string(dir.join("ca.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        if delivered_ca(&self.state_dir).is_file() {
            if issued_ms < held.issued_ms {
                return Err(format!(
                    "it was made at {} ms, before the bundle held ({} ms)",
                    issued_ms, held.issued_ms
                ));
            }
            let same =
                std::fs::read_to_string(delivered_ca(&self.state_dir)).is_ok_and(|t| t == pem);
            if same && issued_ms == held.issued_ms {
                return Ok(None);
            }
        }
        let mut trusted = String::new();
        std::fs::File::open(self.trust())
            .and_then(|f| {
                f.take(gateway_core::fleet::MAX_CA_BUNDLE_BYTES as u64)
                    .read_to_string(&mut trusted)
            })
            .map_err(|e| format!("cannot read the CAs trusted now: {e}"))?;
        let (signer, fps) = pki::verify_ca_bundle(&trusted, pem, issued_ms, signature)?;
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let meta = serde_json::to_string(&Delivered { issued_ms, signer }).unwrap_or_default();
        pki::write_replace(&dir.join("ca.json"), &meta, 0o600).map_err(|e| e.to_string())?;
        pki::write_replace(&delivered_ca(&self.state_dir), pem, 0o600)
            .map_err(|e| e.to_string())?;
        self.reload_client()?;
        Ok(Some(fps))
    }

    /// The config in force: (version, text).
    pub fn applied(&self) -> (u64, String) {
        lock(&self.applied).clone()
    }

    /// Whether a pushed config is on trial (heartbeats say so). Starting a
    /// try: `false` when the updater cannot be told (the try must not
    /// start: the updater could reboot the box in the middle of it).
    pub fn set_trying(&self, trying: bool) -> bool {
        let was = self
            .trying
            .swap(trying, std::sync::atomic::Ordering::Relaxed);
        // Before the try's reload: the updater starts nothing while it runs.
        if let Err(e) = super::firmware_box::mark_config_try(&self.handoff, trying) {
            error!(%e, "Cannot tell the updater whether a config try runs");
            if trying {
                self.trying.store(was, std::sync::atomic::Ordering::Relaxed);
                return false;
            }
        }
        if was && !trying {
            self.try_ended.notify_waiters();
        }
        true
    }

    /// Records the config in force.
    pub fn set_applied(&self, version: u64, text: String) {
        *lock(&self.applied) = (version, text);
    }

    /// Keeps a result for the next control session (a revert, found while no
    /// hub was reachable).
    pub fn report_later(&self, m: Message) {
        *lock(&self.report) = Some(m);
    }

    /// Replaces the result kept for the next control session; the one before.
    pub fn replace_report(&self, m: Option<Message>) -> Option<Message> {
        std::mem::replace(&mut *lock(&self.report), m)
    }

    /// The heartbeat interval of the config in force.
    fn heartbeat_now(&self, ctx: &Ctx) -> Duration {
        match &ctx.policy().config().role {
            Role::Edge(e) => e.uplink.heartbeat,
            Role::Hub(_) => self.heartbeat,
        }
    }

    /// The certificate's validity (Unix ms).
    pub fn validity(&self) -> Option<(i64, i64)> {
        *lock(&self.validity)
    }

    fn status(&self, ctx: &Ctx) -> Status {
        let policy = ctx.policy();
        let config = policy.config();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_s: self.started.elapsed().as_secs(),
            config_version: lock(&self.applied).0,
            cert_not_after_ms: self.validity().map(|v| v.1),
            assessments: config
                .zones
                .iter()
                .filter_map(|z| {
                    z.assessment
                        .as_ref()
                        .map(|a| (z.name.clone(), a.valid_until.to_string()))
                })
                .collect(),
            relays_open: ctx.metrics.relays_open(),
            backlogs: ctx.metrics.backlogs(),
            last_error: super::logring::last_error(),
            interval_s: self.heartbeat_now(ctx).as_secs().max(1),
            config_trying: self.trying.load(std::sync::atomic::Ordering::Relaxed),
            ca: lock(&self.ca_fingerprints).clone(),
            firmware: firmware_now(ctx).map(Box::new),
        }
    }

    /// Renewal: install a certificate the hub signed for the key made here.
    fn install(&self, ctx: &Ctx, key_pem: &str, cert_pem: &str) -> Result<(i64, i64), String> {
        let v = pki::validity(cert_pem).ok_or("the hub sent a certificate that does not parse")?;
        if v.1 <= now_ms() {
            return Err("the hub sent an expired certificate".into());
        }
        let (_, cert, key) = lock(&self.uplink).clone();
        // As a pair: a crash half way is finished at the next start.
        pki::write_pair(&key, key_pem, &cert, cert_pem).map_err(|e| e.to_string())?;
        self.reload_client()?;
        *lock(&self.validity) = Some(v);
        ctx.metrics.cert_expiry(v.1);
        Ok(v)
    }
}

/// Runs the control session on a tunnel's first lane until the tunnel ends.
pub async fn session(
    fleet: Arc<EdgeFleet>,
    ctx: Arc<Ctx>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    // A result kept from while no hub was reachable goes first, so the hub
    // knows of a revert before it decides what to offer.
    let report = lock(&fleet.report).take();
    if let Some(m) = report {
        if write_msg(&mut send, &m).await.is_err() {
            fleet.report_later(m);
            return;
        }
        super::pushed_config::forget_report(&fleet.state_dir);
    }
    let (version, text) = fleet.applied();
    if write_msg(&mut send, &Message::ConfigState { version, text })
        .await
        .is_err()
    {
        return;
    }
    // Reading runs on its own so a half-read message is never dropped by select.
    let (in_tx, mut incoming) = mpsc::channel::<Message>(16);
    let reader = tokio::spawn(async move {
        let mut recv = recv;
        while let Ok(m) = read_msg::<Message, _>(&mut recv).await {
            if in_tx.send(m).await.is_err() {
                break;
            }
        }
    });
    let mut period = fleet.heartbeat_now(&ctx);
    let mut heartbeat = tokio::time::interval(period);
    let mut ship = tokio::time::interval(Duration::from_secs(1));
    let mut cursor: Option<u64> = None;
    let audit = Arc::new(Mutex::new(None::<gateway_store::audit::AuditLog>));
    let jitter = rand::random::<f64>();
    let mut renewing: Option<(String, RenewalClaim)> = None;
    let mut renew_at = renew_deadline(&fleet, jitter);
    // The updater's status as last sent: a change is sent at once.
    let mut firmware_watch = tokio::time::interval(Duration::from_secs(2));
    let mut firmware_sent = firmware_now(&ctx);
    loop {
        tokio::select! {
            _ = firmware_watch.tick() => {
                let now = firmware_now(&ctx);
                if now != firmware_sent {
                    firmware_sent = now;
                    if write_msg(&mut send, &Message::Heartbeat(fleet.status(&ctx))).await.is_err() {
                        break;
                    }
                }
            }
            _ = heartbeat.tick() => {
                // A pushed or reloaded config may change the interval.
                let now = fleet.heartbeat_now(&ctx);
                if now != period {
                    period = now;
                    heartbeat = tokio::time::interval_at((Instant::now() + period).into(), period);
                }
                if write_msg(&mut send, &Message::Heartbeat(fleet.status(&ctx))).await.is_err() {
                    break;
                }
            }
            () = fleet.try_ended.notified() => {
                // A pushed config was kept or reverted: say so now.
                if write_msg(&mut send, &Message::Heartbeat(fleet.status(&ctx))).await.is_err() {
                    break;
                }
                heartbeat.reset();
            }
            _ = ship.tick(), if cursor.is_some() => {
                let from = cursor.unwrap_or(1);
                let (dir, audit) = (fleet.state_dir.clone(), audit.clone());
                // The newest records from memory; older ones from the file.
                let records = if let Some(r) = ctx.audit.recent(from, 500) { r } else { tokio::task::spawn_blocking(move || {
                    let mut a = lock(&audit);
                    if a.is_none() {
                        *a = gateway_store::audit::AuditLog::open_existing(&dir).ok();
                    }
                    a.as_ref().and_then(|a| a.records(from, 500).ok()).unwrap_or_default()
                }).await.unwrap_or_default() };
                if let Some(last) = records.last() {
                    let next = last.seq + 1;
                    if write_msg(&mut send, &Message::AuditBatch { records }).await.is_err() {
                        break;
                    }
                    cursor = Some(next);
                    if next > from + 499 {
                        ship.reset_immediately();
                    }
                }
            }
            () = sleep_until(renew_at), if renewing.is_none() && renew_at.is_some() => {
                // The session with another hub may have renewed meanwhile:
                // due again only by the certificate in force now.
                let due = renew_deadline(&fleet, jitter);
                if due.is_some_and(|d| d > Instant::now() + Duration::from_secs(1)) {
                    renew_at = due;
                    continue;
                }
                let Some(claim) = RenewalClaim::take(&fleet) else {
                    // Another hub's session is renewing: look again later.
                    renew_at = Some(Instant::now() + Duration::from_secs(20));
                    continue;
                };
                let id = ctx.id.clone();
                match tokio::task::spawn_blocking(move || pki::new_request(&id)).await {
                    Ok(Ok((key_pem, csr_pem))) => {
                        info!("Renewing the device certificate");
                        if write_msg(&mut send, &Message::Renew { csr_pem }).await.is_err() {
                            break;
                        }
                        renewing = Some((key_pem, claim));
                    }
                    _ => {
                        error!("Cannot make a key for renewal");
                        renew_at = Some(Instant::now() + Duration::from_secs(60));
                    }
                }
            }
            m = incoming.recv() => {
                let Some(m) = m else { break };
                match m {
                    Message::AuditCursor { next_seq } => cursor = Some(next_seq),
                    Message::Renewed { cert_pem } => {
                        // The claim is given back once this is installed.
                        let Some((key, _claim)) = renewing.take() else {
                            warn!("A renewed certificate nobody asked for; ignored");
                            continue;
                        };
                        match fleet.install(&ctx, &key, &cert_pem) {
                            Ok((_, not_after)) => {
                                ctx.metrics.renewal(true);
                                info!(valid_for_s = (not_after - now_ms()) / 1000, "Certificate renewed");
                                ctx.audit.record(&ctx.id, "certificate", "cert.renew", "ok", "", format!("not_after_ms={not_after}"));
                                renew_at = renew_deadline(&fleet, rand::random::<f64>());
                            }
                            Err(e) => {
                                ctx.metrics.renewal(false);
                                error!(%e, "Cannot install the renewed certificate");
                                renew_at = retry_deadline(&fleet);
                            }
                        }
                    }
                    Message::RenewRefused { reason } => {
                        renewing = None;
                        ctx.metrics.renewal(false);
                        error!(%reason, "The hub refused to renew the device certificate");
                        ctx.audit.record(&ctx.id, "certificate", "cert.renew", "deny", "", reason);
                        renew_at = retry_deadline(&fleet);
                    }
                    Message::ConfigOffer { version, text } => {
                        info!(version, "The hub offers a config");
                        let (reply, answer) = oneshot::channel();
                        let result = if fleet.requests.send(Request::Apply { version, text, reply }).await.is_ok() {
                            answer.await.ok()
                        } else {
                            None
                        };
                        let result = result.unwrap_or(Message::ConfigResult {
                            offered: version,
                            applied: fleet.applied().0,
                            outcome: ConfigOutcome::Refused { errors: vec!["this node cannot apply configs (not run by `gatewayd run`)".into()] },
                        });
                        let applied = matches!(&result, Message::ConfigResult { outcome: ConfigOutcome::Applied, .. });
                        if write_msg(&mut send, &result).await.is_err() {
                            fleet.report_later(result);
                            break;
                        }
                        // The hub hears at once that the box runs it (a
                        // rollout's wave waits for that).
                        if applied && write_msg(&mut send, &Message::Heartbeat(fleet.status(&ctx))).await.is_err() {
                            break;
                        }
                    }
                    Message::FirmwareOffer { rollout, version } => {
                        take_firmware_offer(&fleet, &ctx, &rollout, &version);
                    }
                    Message::FirmwareWithdraw { version } => {
                        if gateway_core::firmware::version_numbers(&version).is_none() {
                            warn!(version = %gateway_core::refusals::peer_text(&version), "A firmware withdrawal that does not read; ignored");
                        } else {
                            match super::firmware_box::write_withdraw(&fleet.handoff, &version) {
                                Ok(true) => {
                                    info!(%version, "Firmware withdrawn (its rollout was aborted): the updater drops it unless it has booted");
                                    ctx.audit.record("hub", &version, "firmware.withdraw", "ok", "", String::new());
                                }
                                Ok(false) => {}
                                Err(e) => error!(%e, "Cannot hand the firmware withdrawal to the updater"),
                            }
                        }
                    }
                    Message::FirmwareAck { running, outcome, boot } => {
                        if !gateway_core::firmware::report::Ack::well_formed(&running, outcome.as_ref(), &boot) {
                            warn!(running = %gateway_core::refusals::peer_text(&running), "A firmware acknowledgement that does not read; ignored");
                        } else if let Err(e) = super::firmware_box::write_ack(&fleet.handoff, (&running, outcome, &boot), now_ms()) {
                            error!(%e, "Cannot record the hub's acknowledgement for the updater");
                        }
                    }
                    Message::CaBundle { pem, issued_ms, signature } => {
                        let f = fleet.clone();
                        let taken = tokio::task::spawn_blocking(move || f.take_ca_bundle(&pem, issued_ms, &signature)).await;
                        match taken {
                            Ok(Ok(Some(fps))) => {
                                info!(cas = %fps.join(","), "The hub sent a CA bundle signed by a CA this box trusts: hubs are checked against it from now on");
                                ctx.audit.record("hub", "ca", "ca.bundle", "ok", "", format!("cas={}", fps.join(",")));
                                fleet.try_ended.notify_waiters();
                            }
                            Ok(Ok(None)) => {}
                            Ok(Err(why)) => {
                                warn!(%why, "A CA bundle from the hub refused; the CAs trusted now stay");
                                ctx.audit.record("hub", "ca", "ca.bundle", "deny", "ca-bundle", why);
                            }
                            Err(e) => error!(%e, "Checking a CA bundle failed"),
                        }
                    }
                    Message::Command { id, kind: CommandKind::Reconnect } => {
                        // Answer first and wait until the hub has it: reconnecting
                        // closes this connection, and unsent data with it.
                        info!("Remote command: reconnect");
                        ctx.audit.record("hub", "node", "command", "ok", "", "reconnect".into());
                        let result = Message::CommandResult { id, ok: true, output: "reconnecting every hub tunnel".into() };
                        if write_msg(&mut send, &result).await.is_ok() && send.finish().is_ok() {
                            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
                        }
                        let _ = fleet.requests.send(Request::Reconnect).await;
                        break;
                    }
                    Message::LiftBan { id, address } => {
                        let (ok, output) = match address.parse::<std::net::IpAddr>() {
                            Ok(ip) => {
                                let lifted = ctx.guard.lift(ip);
                                info!(%ip, lifted, "Remote command: lift a ban");
                                ctx.audit.record("hub", &ip.to_string(), "ban.lift", "ok", "", format!("lifted={lifted}"));
                                (lifted, if lifted { "lifted" } else { "not banned" }.to_owned())
                            }
                            Err(_) => (false, "not an IP address".to_owned()),
                        };
                        if write_msg(&mut send, &Message::CommandResult { id, ok, output }).await.is_err() {
                            break;
                        }
                    }
                    Message::Command { id, kind } => {
                        let (ok, output) = command(&fleet, &ctx, kind);
                        if write_msg(&mut send, &Message::CommandResult { id, ok, output }).await.is_err() {
                            break;
                        }
                    }
                    other => warn!(?other, "Unexpected control message from the hub; ignored"),
                }
            }
            _ = conn.closed() => break,
        }
    }
    reader.abort();
}

/// The updater's published status, per `[update] updater_state`.
fn firmware_now(ctx: &Ctx) -> Option<gateway_core::firmware::report::FirmwareStatus> {
    match &ctx.policy().config().role {
        Role::Edge(e) => super::firmware_box::status(&e.update.updater_state),
        Role::Hub(_) => None,
    }
}

/// A hub offers firmware: handed to the updater (`offer.json`), unless a
/// config try is running (the offer comes again with the next heartbeat's
/// answer) or it does not read.
fn take_firmware_offer(fleet: &EdgeFleet, ctx: &Ctx, rollout: &str, version: &str) {
    let text = gateway_core::refusals::peer_text;
    if gateway_core::firmware::version_numbers(version).is_none()
        || !gateway_core::rollout::valid_id(rollout)
    {
        warn!(version = %text(version), rollout = %text(rollout), "A firmware offer that does not read; ignored");
        return;
    }
    if fleet.trying.load(std::sync::atomic::Ordering::Relaxed) {
        info!(%version, "Firmware offered while a config try runs: taken after it ends");
        return;
    }
    let policy = ctx.policy();
    let Role::Edge(e) = &policy.config().role else {
        return;
    };
    let offer = gateway_core::firmware::report::Offer {
        rollout: rollout.to_owned(),
        version: version.to_owned(),
        window: e
            .update
            .window
            .map_or_else(|| "any".to_owned(), |w| w.to_string()),
        trial_s: e.update.trial.as_secs(),
    };
    match super::firmware_box::write_offer(&fleet.handoff, &offer) {
        Ok(true) => {
            info!(%version, %rollout, window = %offer.window, "Firmware offered: handed to the updater");
            ctx.audit.record(
                "hub",
                version,
                "firmware.offer",
                "ok",
                "",
                format!(
                    "rollout={rollout} window={} trial_s={}",
                    offer.window, offer.trial_s
                ),
            );
        }
        Ok(false) => {}
        Err(e) => error!(%e, "Cannot hand the firmware offer to the updater"),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn renew_deadline(fleet: &EdgeFleet, jitter: f64) -> Option<Instant> {
    let (nb, na) = fleet.validity()?;
    let ms = fleet::renew_in_ms(nb, na, now_ms(), jitter);
    Some(Instant::now() + Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

fn retry_deadline(fleet: &EdgeFleet) -> Option<Instant> {
    let (_, na) = fleet.validity()?;
    let left = (na - now_ms()).max(0);
    let ms = (left / 8).clamp(1_000, 60_000);
    Some(Instant::now() + Duration::from_millis(u64::try_from(ms).unwrap_or(1_000)))
}

fn command(fleet: &EdgeFleet, ctx: &Ctx, kind: CommandKind) -> (bool, String) {
    info!(?kind, "Remote command");
    ctx.audit.record(
        "hub",
        "node",
        "command",
        "ok",
        "",
        format!("{kind:?}").to_lowercase(),
    );
    match kind {
        // Handled by the session (it must answer before the tunnel closes).
        CommandKind::Reconnect => (false, "reconnect is handled by the session".into()),
        CommandKind::Diagnostics => {
            let (version, text) = fleet.applied();
            let checked = gateway_core::check::load(&text, crate::node::clock::today_local());
            let check: Vec<String> = checked
                .diagnostics
                .iter()
                .map(|d| d.render(&format!("config v{version}")))
                .collect();
            let out = serde_json::json!({
                "config_version": version,
                "config_valid": checked.config.is_some(),
                "config_check": check,
                "status": fleet.status(ctx),
                "log": super::logring::recent(),
                "metrics": ctx.metrics.render(),
            });
            (true, out.to_string())
        }
    }
}

/// Watches the certificate's expiry: a metric, and a warning in the log when a
/// quarter of its lifetime is left (renewal should have happened at two thirds).
pub async fn watch_cert(fleet: Arc<EdgeFleet>, ctx: Arc<Ctx>) {
    let mut warned = 0;
    loop {
        let Some((nb, na)) = fleet.validity() else {
            return;
        };
        ctx.metrics.cert_expiry(na);
        let (life, left) = (na - nb, na - now_ms());
        if left <= 0 && warned < 2 {
            error!(
                "The device certificate has expired: the hubs will refuse this box; re-enroll it with a new token (gatewayd enroll)"
            );
            warned = 2;
        } else if left > 0 && left < life / 4 && warned < 1 {
            warn!(
                left_s = left / 1000,
                "The device certificate expires soon and has not been renewed; check the hub connection"
            );
            warned = 1;
        } else if left >= life / 4 {
            warned = 0;
        }
        let step = (life / 20).clamp(1_000, 60_000);
        if !ctx
            .pause(Duration::from_millis(u64::try_from(step).unwrap_or(1_000)))
            .await
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::pushed_config::{Applier, check_text, load_managed};

    struct Box_ {
        _dir: tempfile::TempDir,
        config: Config,
        text: String,
        fleet: Arc<EdgeFleet>,
    }

    fn edge() -> Box_ {
        let dir = tempfile::tempdir().expect("dir");
        pki::init(&dir.path().join("ca"), "t").expect("ca");
        pki::issue(&dir.path().join("ca"), "e1", &[], 1, &dir.path().join("c")).expect("cert");
        let text = format!(
            "[node]\nid = \"e1\"\nrole = \"edge\"\nstate_dir = \"{d}/state\"\n\n[[zone]]\nname = \"lab\"\nkind = \"legacy\"\nclassified = false\nlevel = 2\nnetworks = [\"10.0.0.0/24\"]\nassessment = {{ id = \"A\", valid_until = 2099-01-01 }}\n\n[uplink]\nhubs = [\"127.0.0.1:1\"]\nca = \"{d}/ca/ca.pem\"\ncert = \"{d}/c/e1.pem\"\nkey = \"{d}/c/e1.key\"\nheartbeat = \"10s\"\n\n[admin]\nlisten = \"127.0.0.1:9600\"\n",
            d = dir.path().display()
        );
        let config = check_text(&text, "t").expect("config");
        let Role::Edge(e) = &config.role else {
            panic!("edge")
        };
        let client = Arc::new(std::sync::RwLock::new(
            tls::client(&e.uplink.ca.path, &e.uplink.cert.path, &e.uplink.key.path)
                .expect("client"),
        ));
        let (tx, _rx) = mpsc::channel(1);
        let fleet = EdgeFleet::new(&config, client, (0, text.clone()), tx).expect("fleet");
        Box_ {
            _dir: dir,
            config,
            text,
            fleet,
        }
    }

    fn outcome(m: &Message) -> (&ConfigOutcome, u64) {
        match m {
            Message::ConfigResult {
                outcome, applied, ..
            } => (outcome, *applied),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn offers_are_checked_applied_confirmed_or_reverted() {
        let b = edge();
        let state = b.config.node.state_dir.clone();
        let mut a = Applier::new(Duration::from_secs(60), None);
        let never = |_: Config| -> Result<(), String> { panic!("must not reload") };

        // The version in force offered again (a second hub's offer): applied
        // already, nothing reloaded.
        let r = a.apply(&b.fleet, &b.config, 0, &b.text, never);
        assert!(matches!(outcome(&r), (ConfigOutcome::Applied, 0)), "{r:?}");
        assert!(
            a.deadline().is_none(),
            "no try window for what runs already"
        );
        // Equal or older with another text: refused.
        let r = a.apply(
            &b.fleet,
            &b.config,
            0,
            &format!("{}# changed\n", b.text),
            never,
        );
        assert!(
            matches!(outcome(&r), (ConfigOutcome::Refused { errors }, 0) if errors[0].contains("not newer"))
        );
        // Errors: refused with their location.
        let bad = b.text.replace("level = 2", "level = 9");
        let r = a.apply(&b.fleet, &b.config, 1, &bad, never);
        assert!(
            matches!(outcome(&r), (ConfigOutcome::Refused { errors }, 0) if errors[0].contains("pushed config v1:10:"))
        );
        // Another box's config: refused.
        let other = b.text.replace("id = \"e1\"", "id = \"e2\"");
        let r = a.apply(&b.fleet, &b.config, 1, &other, never);
        assert!(
            matches!(outcome(&r), (ConfigOutcome::Refused { errors }, 0) if errors[0].contains("this box is e1"))
        );
        // A reload failure leaves everything as it was.
        let v1 = b.text.replace("\"10s\"", "\"11s\"");
        let r = a.apply(&b.fleet, &b.config, 1, &v1, |_| Err("cannot bind".into()));
        assert!(matches!(outcome(&r), (ConfigOutcome::Refused { .. }, 0)));
        assert_eq!(b.fleet.applied().0, 0);
        assert!(a.deadline().is_none());

        // Applied, on trial, then confirmed. A tunnel the reload opens starts
        // its session at once: it must already report the new version, on
        // trial (CI caught a session reporting the old one).
        let r = a.apply(&b.fleet, &b.config, 1, &v1, |_| {
            assert_eq!(b.fleet.applied().0, 1, "said before the reload");
            assert!(b.fleet.trying.load(std::sync::atomic::Ordering::Relaxed));
            Ok(())
        });
        assert_eq!(outcome(&r), (&ConfigOutcome::Applied, 1));
        assert!(a.deadline().is_some());
        assert_eq!(load_managed(&state), Some((1, v1.clone(), true)));
        a.confirm(&b.fleet, &state);
        assert!(a.deadline().is_none());
        assert_eq!(load_managed(&state), Some((1, v1.clone(), false)));

        // Applied, then no hub within the window: back to version 1, reported.
        let v2 = v1.replace("\"11s\"", "\"12s\"");
        let r = a.apply(&b.fleet, &b.config, 2, &v2, |_| Ok(()));
        assert_eq!(outcome(&r), (&ConfigOutcome::Applied, 2));
        let mut reloaded = None;
        a.revert(&b.fleet, &b.config, |c| {
            let Role::Edge(e) = &c.role else {
                panic!("edge")
            };
            reloaded = Some(e.uplink.heartbeat.as_secs());
            // A session starting now reports the revert, then version 1.
            assert_eq!(b.fleet.applied().0, 1, "said before the reload");
            assert!(lock(&b.fleet.report).is_some(), "the revert goes first");
            Ok(())
        });
        assert_eq!(reloaded, Some(11));
        assert_eq!(b.fleet.applied(), (1, v1.clone()));
        assert_eq!(load_managed(&state), Some((1, v1.clone(), false)));
        let report = lock(&b.fleet.report).take().expect("report");
        assert!(matches!(
            outcome(&report),
            (ConfigOutcome::Reverted { tried: 2, .. }, 1)
        ));

        // A revert whose reload fails leaves the tried version said, and no
        // report of a revert that did not happen.
        let v3 = v1.replace("\"11s\"", "\"13s\"");
        let r = a.apply(&b.fleet, &b.config, 3, &v3, |_| Ok(()));
        assert_eq!(outcome(&r), (&ConfigOutcome::Applied, 3));
        a.revert(&b.fleet, &b.config, |_| Err("cannot bind".into()));
        assert_eq!(b.fleet.applied(), (3, v3));
        assert!(lock(&b.fleet.report).is_none());
    }

    #[test]
    fn a_restart_only_change_is_stored_for_the_next_start_and_so_is_the_way_back() {
        use crate::fleet::pushed_config::{revert_on_disk, saved_report};
        let b = edge();
        let state = b.config.node.state_dir.clone();
        let mut a = Applier::new(Duration::from_secs(60), None);
        let never = |_: Config| -> Result<(), String> { panic!("must not reload") };
        // admin.listen is bound once: stored on trial, to run at the next
        // start; nothing reloaded, the result kept on disk.
        let v1 = b.text.replace("9600", "9601");
        let r = a.apply(&b.fleet, &b.config, 1, &v1, never);
        assert_eq!(outcome(&r), (&ConfigOutcome::Applied, 1));
        assert_eq!(a.restart(), Some("admin.listen"));
        assert!(a.deadline().is_none(), "the try starts at the next start");
        assert_eq!(load_managed(&state), Some((1, v1.clone(), true)));
        assert_eq!(saved_report(&state), Some(r));

        // The next start runs v1 on trial; no hub within the window: the way
        // back to the bootstrap text needs a restart as well.
        let tried = check_text(&v1, "v1").expect("v1");
        let mut a = Applier::new(Duration::from_secs(60), Some(1));
        b.fleet.set_applied(1, v1.clone());
        a.revert(&b.fleet, &tried, never);
        assert_eq!(a.restart(), Some("admin.listen"));
        assert_eq!(load_managed(&state), Some((0, b.text.clone(), false)));
        assert!(matches!(
            saved_report(&state).as_ref().map(outcome),
            Some((ConfigOutcome::Reverted { tried: 1, .. }, 0))
        ));

        // A tried version that cannot start at all goes back on disk.
        let mut a = Applier::new(Duration::from_secs(60), None);
        let r = a.apply(&b.fleet, &b.config, 2, &v1.replace("9601", "9602"), never);
        assert_eq!(outcome(&r), (&ConfigOutcome::Applied, 2));
        assert!(revert_on_disk(&state, "cannot listen on 127.0.0.1:9602"));
        assert_eq!(load_managed(&state), Some((1, v1.clone(), false)));
        let Some(Message::ConfigResult {
            outcome: ConfigOutcome::Reverted { tried: 2, reason },
            ..
        }) = saved_report(&state)
        else {
            panic!("a revert report")
        };
        assert!(
            reason.contains("could not start with version 2"),
            "{reason}"
        );
        assert!(!revert_on_disk(&state, "again"), "nothing on trial now");
    }

    #[test]
    fn a_delivered_ca_bundle_is_kept_trusted_and_never_replaced_by_an_older_one() {
        let b = edge();
        let ca_dir = b.config.node.state_dir.parent().expect("dir").join("ca");
        let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem")).expect("ca");
        let key = std::fs::read_to_string(ca_dir.join("ca.key")).expect("key");
        let (bundle, fps) = pki::checked_bundle(&ca_pem).expect("bundle");
        let sign = |at: i64| pki::sign_ca_bundle(&key, &bundle, at).expect("sign");
        assert_eq!(
            b.fleet.trust(),
            ca_dir.join("ca.pem"),
            "[uplink].ca at first"
        );
        assert_eq!(
            b.fleet.take_ca_bundle(&bundle, 10, &sign(10)),
            Ok(Some(fps.clone()))
        );
        assert_eq!(b.fleet.trust(), delivered_ca(&b.config.node.state_dir));
        assert_eq!(*lock(&b.fleet.ca_fingerprints), fps);
        // The same again: nothing to do; an older one: refused; a forged
        // signature: refused, the bundle held stays.
        assert_eq!(b.fleet.take_ca_bundle(&bundle, 10, &sign(10)), Ok(None));
        let err = b
            .fleet
            .take_ca_bundle(&bundle, 9, &sign(9))
            .expect_err("older");
        assert!(err.contains("before the bundle held"), "{err}");
        assert!(b.fleet.take_ca_bundle(&bundle, 11, &sign(10)).is_err());
        assert_eq!(
            b.fleet.take_ca_bundle(&bundle, 11, &sign(11)),
            Ok(Some(fps))
        );
    }
}
