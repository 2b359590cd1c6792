//! The hub's side of central management: the registry, enrollment of new
//! boxes, and one control session per connected edge (heartbeats, config
//! offers and results, commands, renewal, audit collection).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway_core::fleet::{
    self, CommandKind, ConfigOutcome, EnrollAnswer, EnrollRequest, Message, Secret,
};
use gateway_store::registry::{
    Admission, AppliedReport, Change, ChangeKind, ConfigConnected, ConfigPush, Enrollment,
    Heartbeat, Registry, RegistryError, Renewal,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::{read_msg, read_msg_max, write_msg};
use crate::channel::consumers::Consumers;
use crate::node::clock::now_ms;
use crate::node::{Ctx, PeerAttempt};
use crate::tunnel::accept::Refusal;
use crate::tunnel::devices::Devices;
use crate::tunnel::pki;
use crate::tunnel::pki::Signer;
use gateway_core::audit::collect::Collected;
use gateway_core::detect::Alarm;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A command's answer: (worked, output).
pub type CommandAnswer = (bool, String);

/// The hub's fleet state.
pub struct Fleet {
    reg: Arc<dyn Registry>,
    consumers: Arc<Consumers>,
    signer: Signer,
    export_key: Option<(ring::signature::EcdsaKeyPair, String)>,
    /// `[hub].box_ca`, signed, with its fingerprints: sent to each box whose
    /// heartbeat reports other CAs.
    box_ca: Option<(Message, Vec<String>)>,
    /// `[hub].firmware_keys`: what an uploaded bundle must be signed with.
    firmware_keys: Vec<gateway_core::firmware::PublicKey>,
    /// The pacing of firmware parts sent to boxes.
    firmware_pacer: super::firmware::Pacer,
    /// Firmware versions seen complete in the store.
    firmware_complete: super::firmware::Complete,
    /// The firmware rollouts' offers, and the steps boxes reported.
    firmware_offers: super::firmware_offers::Offers,
    lifetime: Duration,
    ctx: Arc<Ctx>,
    devices: Arc<Devices>,
    sessions: Mutex<HashMap<String, mpsc::UnboundedSender<Message>>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<CommandAnswer>>>,
    next_command: AtomicU64,
    enrolling: Arc<tokio::sync::Semaphore>,
    enrolling_from: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    /// When each device's last duplicate-identity alarm was recorded, and how
    /// many were counted since.
    duplicates: Mutex<HashMap<String, (i64, u64)>>,
    /// The config version this hub last offered each device, so a push seen
    /// again in the change log is not offered twice.
    offered: Mutex<HashMap<String, u64>>,
    /// Devices this hub knows are revoked (read at start, then from the
    /// change log): refused even while the registry does not answer.
    revoked: Mutex<std::collections::HashSet<String>>,
    /// Wakes the rollout controller (a rollout changed here or at another hub).
    rollouts: Arc<tokio::sync::Notify>,
    /// Heartbeats not written yet, the newest per device: written together
    /// once a second ([`Fleet::write_heartbeats`]).
    beats: Mutex<HashMap<String, Heartbeat>>,
    /// The certificate expiry each device last reported (written only when
    /// it changes).
    certs: Mutex<HashMap<String, i64>>,
    /// Collected audit records not stored yet: written together once a
    /// second ([`Fleet::write_audit`]), kept while the store cannot take them.
    collected: Mutex<Collected>,
    /// Devices whose broken chain this hub has raised the alarm for.
    broken: Mutex<std::collections::HashSet<String>>,
}

/// Collected audit records held for the store, per device and in all (about
/// 300 bytes each): past them a box is told to send again later.
const COLLECTED_PER_DEVICE: usize = 5_000;
const COLLECTED_ALL: usize = 200_000;
/// Boxes per collected-audit transaction, and such transactions at once.
const AUDIT_WRITE_DEVICES: usize = 200;
const AUDIT_WRITES_AT_ONCE: usize = 6;
/// Pushed configs read from the registry at once while following its log.
const PUSH_READS: usize = 16;

/// Devices whose newest pushed config is to be read and offered, each once
/// (so it holds at most one entry per device), in the order pushed.
#[derive(Default)]
struct PushQueue {
    devices: Mutex<(VecDeque<String>, HashSet<String>)>,
    wake: tokio::sync::Notify,
}

/// How often buffered heartbeats are written.
pub const HEARTBEAT_WRITES: Duration = Duration::from_secs(1);

/// At most one duplicate-identity record per device in this long (the metric
/// counts every one): a replaced box retrying must not flood the audit.
const DUPLICATE_ALARM_EVERY_MS: i64 = 60_000;

/// Enrollment requests redeemed at once; more are closed at once.
pub const MAX_ENROLLING: usize = 32;
/// Enrollment connections in progress at once from one address.
pub const MAX_ENROLLING_PER_SOURCE: usize = 4;
/// How long a certificate-less connection has to send its enrollment request.
pub const ENROLL_REQUEST_WAIT: Duration = Duration::from_secs(2);
/// Largest enrollment request read (a device id, a token and a CSR need far less).
pub const MAX_ENROLL_REQUEST: usize = 16 * 1024;

/// One enrollment connection in progress from an address; counted in the map
/// until dropped.
struct SourceSlot {
    map: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl SourceSlot {
    /// A slot for `ip`, unless it has [`MAX_ENROLLING_PER_SOURCE`] already.
    fn take(
        map: &Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<Self> {
        let mut m = lock(map);
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_ENROLLING_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            map: map.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = lock(&self.map);
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Why an operator's request failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The registry failed.
    #[error(transparent)]
    Fleet(#[from] RegistryError),
    /// The device is not connected.
    #[error("device {0} is not connected to this hub")]
    Offline(String),
    /// The device did not answer in time.
    #[error("device {0} did not answer within {1} s")]
    Timeout(String, u64),
}

impl Fleet {
    /// The hub's fleet state over an open registry and the CA's signer.
    pub fn new(
        ctx: Arc<Ctx>,
        devices: Arc<Devices>,
        registry: Arc<dyn Registry>,
        consumers: Arc<Consumers>,
        signer: Signer,
        settings: &gateway_core::config::HubSettings,
        files: HubFiles,
    ) -> Arc<Self> {
        let lifetime = settings.cert_lifetime;
        let export_key = export_key(&settings.cert.path, &settings.key.path);
        if export_key.is_none() {
            warn!("The hub's key is not ECDSA P-256: audit exports are not signed");
        }
        Arc::new(Fleet {
            reg: registry,
            consumers,
            signer,
            export_key,
            box_ca: files.box_ca,
            firmware_keys: files.firmware_keys,
            firmware_pacer: super::firmware::Pacer::new(
                settings.firmware.rate,
                settings.firmware.rate_per_box,
            ),
            firmware_complete: super::firmware::Complete::default(),
            firmware_offers: super::firmware_offers::Offers::default(),
            lifetime,
            ctx,
            devices,
            sessions: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_command: AtomicU64::new(1),
            enrolling: Arc::new(tokio::sync::Semaphore::new(MAX_ENROLLING)),
            enrolling_from: Arc::default(),
            duplicates: Mutex::default(),
            offered: Mutex::default(),
            revoked: Mutex::default(),
            rollouts: Arc::default(),
            beats: Mutex::default(),
            certs: Mutex::default(),
            collected: Mutex::new(Collected::new(COLLECTED_PER_DEVICE, COLLECTED_ALL)),
            broken: Mutex::default(),
        })
    }

    /// The keys an uploaded firmware bundle must be signed with.
    pub fn firmware_keys(&self) -> &[gateway_core::firmware::PublicKey] {
        &self.firmware_keys
    }

    /// The pacing of firmware parts sent to boxes.
    pub fn firmware_pacer(&self) -> &super::firmware::Pacer {
        &self.firmware_pacer
    }

    /// Firmware versions seen complete in the store.
    pub fn firmware_complete(&self) -> &super::firmware::Complete {
        &self.firmware_complete
    }

    /// The firmware rollouts' offers.
    pub fn firmware_offers(&self) -> &super::firmware_offers::Offers {
        &self.firmware_offers
    }

    /// Wakes the rollout controller.
    pub fn wake_rollouts(&self) {
        self.rollouts.notify_one();
    }

    /// What wakes the rollout controller.
    pub fn rollouts_wake(&self) -> Arc<tokio::sync::Notify> {
        self.rollouts.clone()
    }

    /// The registry.
    pub fn registry(&self) -> &dyn Registry {
        &*self.reg
    }

    /// The consumers of the sink.
    pub fn consumers(&self) -> &Consumers {
        &self.consumers
    }

    /// The CA's signer.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// The hub's audit, for operators' actions.
    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    /// Signs an audit export's header with the hub's key.
    pub fn sign_export(&self, header: &mut fleet::ExportHeader) {
        let Some((key, cert_pem)) = &self.export_key else {
            return;
        };
        header.signed_by = Some(self.ctx.id.clone());
        let msg = fleet::signed_message(header);
        let rng = ring::rand::SystemRandom::new();
        if let Ok(sig) = key.sign(&rng, &msg) {
            header.hub_cert_pem = Some(cert_pem.clone());
            header.signature = Some(gateway_core::hex::encode(sig.as_ref()));
        }
    }

    /// Whether `device` may connect.
    pub async fn is_revoked(&self, device: &str) -> bool {
        self.reg
            .is_revoked(device.to_owned())
            .await
            .unwrap_or(false)
    }

    /// Whether `device` may open a tunnel with the certificate `serial`: one
    /// live certificate per device. A refused older certificate is audited
    /// under the peer's address (summarised); two certificates of one device
    /// at once raise an alarm. When the registry cannot answer, the tunnel is
    /// let in (as before a registry existed) and the error logged.
    ///
    /// # Errors
    /// The refusal.
    pub async fn admit(
        &self,
        device: &str,
        serial: &str,
        remote: std::net::SocketAddr,
    ) -> Result<(), Refusal> {
        let answer = self
            .reg
            .admit(device.to_owned(), serial.to_owned(), now_ms())
            .await;
        let live = self.devices.serials(device);
        match answer {
            Ok(Admission::Revoked) => Err(Refusal::Revoked),
            Ok(Admission::Superseded { current }) => {
                let reason =
                    format!("certificate {serial} of device {device} is superseded by {current}");
                warn!(%device, %remote, %serial, %current, "Refusing tunnel: a superseded certificate");
                if !live.is_empty() {
                    self.duplicate(device, serial, &live, remote, "refused");
                }
                self.ctx.refuse_peer(
                    remote,
                    true,
                    PeerAttempt::SupersededCertificate,
                    &reason,
                    "",
                );
                Err(Refusal::Superseded)
            }
            Ok(admitted) => {
                let others: Vec<&String> = live.iter().filter(|s| *s != serial).collect();
                if !others.is_empty() {
                    // Both halves of a renewal's handover are one identity.
                    let allowed = match admitted {
                        Admission::Handover { current } => vec![current],
                        _ => self
                            .reg
                            .live_serials(vec![device.to_owned()])
                            .await
                            .ok()
                            .and_then(|v| v.into_iter().next())
                            .map(|(_, s)| s)
                            .unwrap_or_default(),
                    };
                    if others.iter().any(|s| !allowed.contains(s)) {
                        self.duplicate(device, serial, &live, remote, "admitted");
                    }
                }
                Ok(())
            }
            Err(_) if lock(&self.revoked).contains(device) => {
                warn!(%device, %remote, "Refusing tunnel: the device is revoked (known here; the registry does not answer)");
                Err(Refusal::Revoked)
            }
            Err(error) => {
                error!(%device, %error, "Cannot check the device's certificate in the registry; letting the tunnel in");
                Ok(())
            }
        }
    }

    /// Two certificates of one device at once: an alarm record and a metric.
    fn duplicate(
        &self,
        device: &str,
        serial: &str,
        live: &[String],
        remote: std::net::SocketAddr,
        outcome: &str,
    ) {
        self.ctx.metrics.duplicate_identity(device);
        let now = now_ms();
        let since = {
            let mut m = lock(&self.duplicates);
            let e = m.entry(device.to_owned()).or_insert((i64::MIN, 0));
            e.1 += 1;
            if now.saturating_sub(e.0) < DUPLICATE_ALARM_EVERY_MS {
                return;
            }
            let n = e.1;
            *e = (now, 0);
            n
        };
        let detail = format!(
            "certificate {serial} from {remote} ({outcome}) while connected with {}; {since} time(s) since the last record",
            live.join(", ")
        );
        error!(%device, %detail, "Duplicate identity: two certificates of one device at once");
        self.ctx.audit.record(
            device,
            "tunnel",
            "device.duplicate_identity",
            "alarm",
            "",
            detail,
        );
    }

    /// Whether `device` has a control session here now.
    pub fn connected(&self, device: &str) -> bool {
        lock(&self.sessions).contains_key(device)
    }

    /// Revokes `device`: refused from now on, its connections closed now.
    ///
    /// # Errors
    /// When the registry fails.
    pub async fn revoke(&self, device: &str, by: &str) -> Result<bool, RegistryError> {
        let fresh = self
            .reg
            .revoke(device.to_owned(), by.to_owned(), now_ms())
            .await?;
        lock(&self.revoked).insert(device.to_owned());
        let closed = self.devices.close_all(
            device,
            fleet::CLOSE_REVOKED,
            b"revoked by central operations",
        );
        lock(&self.sessions).remove(device);
        warn!(%device, by, closed, "Device revoked: connections closed, it is refused from now on");
        self.ctx.audit.record(
            by,
            device,
            "admin.device.revoke",
            "ok",
            "",
            format!("connections_closed={closed}"),
        );
        Ok(fresh)
    }

    /// Stores a config version for `device` and offers it if it is connected.
    ///
    /// # Errors
    /// When the registry fails.
    pub async fn push(&self, device: &str, text: String, by: &str) -> Result<u64, RegistryError> {
        let version = self
            .reg
            .push_config(ConfigPush {
                device: device.to_owned(),
                text: text.clone(),
                by: by.to_owned(),
                now_ms: now_ms(),
            })
            .await?;
        info!(%device, version, by, "Config version stored; offering it");
        self.offer(device, version, text);
        Ok(version)
    }

    /// Sends a command to `device` and waits for its answer.
    ///
    /// # Errors
    /// When the device is not connected or does not answer within 20 s.
    pub async fn command(
        &self,
        device: &str,
        kind: CommandKind,
    ) -> Result<CommandAnswer, OpsError> {
        self.ask(device, |id| Message::Command { id, kind }).await
    }

    /// Sends `device` the request `make` builds with a fresh id and waits (20 s
    /// at most) for the `CommandResult` of that id.
    async fn ask(
        &self,
        device: &str,
        make: impl FnOnce(u64) -> Message,
    ) -> Result<CommandAnswer, OpsError> {
        let id = self.next_command.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        if !self.send(device, make(id)) {
            lock(&self.pending).remove(&id);
            return Err(OpsError::Offline(device.to_owned()));
        }
        match tokio::time::timeout(Duration::from_secs(20), rx).await {
            Ok(Ok(answer)) => Ok(answer),
            _ => {
                lock(&self.pending).remove(&id);
                Err(OpsError::Timeout(device.to_owned(), 20))
            }
        }
    }

    /// Lifts the ban of `address` on `device` (the edge answers like a command).
    ///
    /// # Errors
    /// [`OpsError`] when the device is offline or does not answer.
    pub async fn lift_ban(&self, device: &str, address: String) -> Result<CommandAnswer, OpsError> {
        self.ask(device, |id| Message::LiftBan { id, address })
            .await
    }

    /// Keeps this hub's own alarms in the registry, beside those its devices
    /// ship in their audit chains.
    pub async fn keep_own_alarms(self: Arc<Self>, mut rx: mpsc::Receiver<Alarm>) {
        while let Some(a) = rx.recv().await {
            let mut batch = vec![a];
            while batch.len() < 256 {
                match rx.try_recv() {
                    Ok(a) => batch.push(a),
                    Err(_) => break,
                }
            }
            if let Err(e) = self.reg.add_alarms(self.ctx.id.clone(), batch).await {
                error!(%e, "Cannot keep this hub's alarms in the registry (they are in its audit chain)");
            }
        }
    }

    fn send(&self, device: &str, m: Message) -> bool {
        lock(&self.sessions)
            .get(device)
            .is_some_and(|tx| tx.send(m).is_ok())
    }

    /// Serves an enrollment connection (ALPN `gw-enroll/1`, no client
    /// certificate): one request, one answer. Such a connection proves nothing,
    /// so it gets little: at most [`MAX_ENROLLING_PER_SOURCE`] at once from one
    /// address, [`ENROLL_REQUEST_WAIT`] to send its request, which may be at most
    /// [`MAX_ENROLL_REQUEST`] bytes; it takes one of the [`MAX_ENROLLING`]
    /// slots only once its request has arrived. Refusals are audited under the
    /// peer's address, summarised.
    pub async fn enroll(self: Arc<Self>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let Some(from_slot) = SourceSlot::take(&self.enrolling_from, remote.ip()) else {
            self.ctx.refuse_peer(
                remote,
                true,
                PeerAttempt::EnrollmentConnection,
                &format!(
                    "more than {MAX_ENROLLING_PER_SOURCE} enrollments at once from this address"
                ),
                "",
            );
            conn.close(
                quinn::VarInt::from_u32(1),
                b"too many enrollments at once from your address; retry",
            );
            return;
        };
        let request = tokio::time::timeout(ENROLL_REQUEST_WAIT, async {
            let (send, mut recv) = conn.accept_bi().await.ok()?;
            let req: EnrollRequest = read_msg_max(&mut recv, MAX_ENROLL_REQUEST).await.ok()?;
            Some((send, req))
        })
        .await;
        let Ok(Some((mut send, req))) = request else {
            self.ctx.refuse_peer(
                remote,
                true,
                PeerAttempt::EnrollmentConnection,
                &format!(
                    "no enrollment request (at most {MAX_ENROLL_REQUEST} bytes) within {} s",
                    ENROLL_REQUEST_WAIT.as_secs()
                ),
                "",
            );
            conn.close(
                quinn::VarInt::from_u32(1),
                b"expected an enrollment request",
            );
            return;
        };
        let Ok(_permit) = self.enrolling.clone().try_acquire_owned() else {
            warn!(%remote, limit = MAX_ENROLLING, "Enrollment refused: too many at once");
            conn.close(
                quinn::VarInt::from_u32(1),
                b"too many enrollments at once; retry",
            );
            return;
        };
        let answer = self.clone().redeem(req, remote).await;
        let _ = write_msg(&mut send, &answer).await;
        let _ = send.finish();
        // Answered: no longer in progress for its address, while the
        // connection is left to close.
        drop(from_slot);
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    }

    async fn redeem(
        self: Arc<Self>,
        req: EnrollRequest,
        remote: std::net::SocketAddr,
    ) -> EnrollAnswer {
        let device = req.device.clone();
        let refuse = |reason: String| {
            let claimed = format!("device {device}");
            self.ctx
                .refuse_peer(remote, true, PeerAttempt::Enrollment, &reason, &claimed);
            EnrollAnswer::Refused {
                reason: gateway_core::refusals::peer_text(&reason),
            }
        };
        let Some(token) = Secret::parse(fleet::TOKEN_KIND, &req.token) else {
            return refuse(
                "the enrollment token is malformed; it looks like gwt1.DEVICE.HEX".into(),
            );
        };
        if token.owner != req.device {
            return refuse(format!(
                "this enrollment token was issued for {}, not for {}",
                token.owner, req.device
            ));
        }
        let me = self.clone();
        let (digest, csr, id) = (token.digest(), req.csr_pem.clone(), req.device.clone());
        let sign = Box::new(move || {
            me.signer
                .sign_csr(&csr, &id, now_ms(), me.lifetime)
                .map_err(|e| RegistryError::Refused(e.to_string()))
        });
        let result = self
            .reg
            .enroll(
                Enrollment {
                    digest,
                    device: req.device.clone(),
                    now_ms: now_ms(),
                },
                sign,
            )
            .await;
        match result {
            Ok(cert_pem) => {
                let serial = pki::serial_of_pem(&cert_pem).unwrap_or_default();
                info!(%device, %remote, %serial, "Device enrolled");
                self.ctx.audit.record(
                    &remote.to_string(),
                    &device,
                    "device.enroll",
                    "ok",
                    "",
                    format!("serial={serial} lifetime_s={}", self.lifetime.as_secs()),
                );
                // The new certificate is the device's one: connections with an
                // older one close now (hubs sharing the registry close theirs
                // within a second, in the sweep).
                let closed = self.devices.close_except(
                    &device,
                    std::slice::from_ref(&serial),
                    fleet::CLOSE_SUPERSEDED,
                    b"re-enrolled: this certificate is no longer the device's",
                );
                if closed > 0 {
                    lock(&self.sessions).remove(&device);
                    warn!(%device, closed, "Re-enrolled: the old certificate's connections are closed");
                    self.ctx.audit.record(
                        &remote.to_string(),
                        &device,
                        "device.replace",
                        "ok",
                        "",
                        format!("serial={serial} connections_closed={closed}"),
                    );
                }
                EnrollAnswer::Issued { cert_pem }
            }
            // The box did nothing wrong: not counted against its address.
            Err(e) if e.retry_later() => {
                warn!(%device, %remote, %e, "Enrollment not done: the hub's store is unavailable");
                EnrollAnswer::Refused {
                    reason: "the hub cannot reach its store now; the token was not used, try again in a minute".into(),
                }
            }
            Err(e) => refuse(e.to_string()),
        }
    }

    /// Runs the control session of `device` on its tunnel's control stream,
    /// until the stream or the tunnel ends.
    pub async fn session(
        self: Arc<Self>,
        device: String,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        let span = info_span!("control", %device);
        async move {
            // The writer: everything for this device goes through one task.
            let writer = tokio::spawn(async move {
                while let Some(m) = rx.recv().await {
                    if write_msg(&mut send, &m).await.is_err() {
                        break;
                    }
                }
            });
            let mut registered = false;
            let mut cursor = None;
            let mut ca_sent = false;
            loop {
                let m: Message = match read_msg(&mut recv).await {
                    Ok(m) => m,
                    Err(_) => break,
                };
                // A box that trusts other CAs than the rotation's bundle is
                // sent it, once a session.
                if let (Message::Heartbeat(status), Some((bundle, fps)), false) =
                    (&m, &self.box_ca, ca_sent)
                {
                    if !status.ca.is_empty() && status.ca != *fps {
                        info!("Sending the box the CA bundle of hub.box_ca");
                        let _ = tx.send(bundle.clone());
                        ca_sent = true;
                    }
                }
                if !registered {
                    // The edge's first message marks its management lane.
                    lock(&self.sessions).insert(device.clone(), tx.clone());
                    registered = true;
                    cursor = Some(tokio::spawn(
                        self.clone().send_cursor(device.clone(), tx.clone()),
                    ));
                }
                self.handle(&device, m, &tx).await;
            }
            if let Some(c) = cursor {
                c.abort();
            }
            if registered {
                let mut s = lock(&self.sessions);
                if s.get(&device).is_some_and(|t| t.same_channel(&tx)) {
                    s.remove(&device);
                }
            }
            writer.abort();
        }
        .instrument(span)
        .await;
    }

    async fn handle(&self, device: &str, m: Message, tx: &mpsc::UnboundedSender<Message>) {
        let d = device.to_owned();
        match m {
            Message::Heartbeat(mut status) => {
                status.bound();
                if let Some(f) = &status.firmware {
                    let (replies, records) = self.firmware_offers.heard(&d, f, now_ms());
                    for (event, outcome, detail) in records {
                        info!(event, outcome, %detail, "Firmware");
                        self.ctx
                            .audit
                            .record(device, "firmware", event, outcome, "", detail);
                    }
                    for m in replies {
                        let _ = tx.send(m);
                    }
                }
                let json = serde_json::to_string(&status).unwrap_or_default();
                // Coalesced: the newest per device, written within a second.
                let changed = status
                    .cert_not_after_ms
                    .filter(|t| lock(&self.certs).insert(d.clone(), *t) != Some(*t));
                let mut beats = lock(&self.beats);
                let not_after_ms = changed.or_else(|| beats.get(&d).and_then(|b| b.not_after_ms));
                beats.insert(
                    d.clone(),
                    Heartbeat {
                        device: d,
                        now_ms: now_ms(),
                        json,
                        not_after_ms,
                    },
                );
            }
            Message::ConfigState { version, text } => {
                let seen = self
                    .reg
                    .config_connected(ConfigConnected {
                        device: d,
                        version,
                        text,
                        now_ms: now_ms(),
                    })
                    .await;
                // Offer what is newer, unless the edge already refused or
                // reverted exactly that version.
                let offer = seen.ok().and_then(|seen| {
                    let refused = seen
                        .before
                        .and_then(|(_, result)| {
                            serde_json::from_str::<serde_json::Value>(&result).ok()
                        })
                        .filter(|v| v["outcome"] != "applied" && v["outcome"] != "connected")
                        .and_then(|v| v["offered"].as_u64());
                    seen.desired
                        .filter(|(v, _)| *v > version && Some(*v) != refused)
                });
                if let Some((version, text)) = offer {
                    info!(version, "Offering the desired config");
                    lock(&self.offered).insert(device.to_owned(), version);
                    let _ = tx.send(Message::ConfigOffer { version, text });
                }
            }
            Message::ConfigResult {
                offered,
                applied,
                outcome,
            } => {
                let json = match &outcome {
                    ConfigOutcome::Refused { errors } => serde_json::json!({
                        "offered": offered, "outcome": "refused", "errors": errors
                    })
                    .to_string(),
                    ConfigOutcome::Reverted { tried, reason } => serde_json::json!({
                        "offered": offered, "outcome": "reverted", "tried": tried, "reason": reason
                    })
                    .to_string(),
                    ConfigOutcome::Applied => {
                        serde_json::json!({ "offered": offered, "outcome": "applied" }).to_string()
                    }
                };
                let _ = self
                    .reg
                    .set_applied(AppliedReport {
                        device: d,
                        version: applied,
                        text: None,
                        result: json,
                        now_ms: now_ms(),
                    })
                    .await;
                let (result, detail) = match &outcome {
                    ConfigOutcome::Applied => ("ok", format!("applied version {applied}")),
                    ConfigOutcome::Refused { errors } => (
                        "error",
                        format!(
                            "refused version {offered}, kept {applied}: {}",
                            errors.join("; ")
                        ),
                    ),
                    ConfigOutcome::Reverted { tried, reason } => (
                        "error",
                        format!("reverted version {tried} to {applied}: {reason}"),
                    ),
                };
                if result == "ok" {
                    info!(%detail, "Config result");
                } else {
                    warn!(%detail, "Config result");
                }
                self.ctx
                    .audit
                    .record(device, "config", "config.result", result, "", detail);
            }
            Message::CommandResult { id, ok, output } => {
                if let Some(waiter) = lock(&self.pending).remove(&id) {
                    let _ = waiter.send((ok, output));
                }
            }
            Message::Renew { csr_pem } => {
                let answer = if self.is_revoked(device).await {
                    Message::RenewRefused {
                        reason: "this device is revoked".into(),
                    }
                } else {
                    match self
                        .signer
                        .sign_csr(&csr_pem, device, now_ms(), self.lifetime)
                    {
                        Ok((cert_pem, not_after, serial)) => {
                            // Recorded before the box has it: it may connect
                            // with it at once.
                            let handover = i64::try_from(self.lifetime.as_millis() / 3)
                                .unwrap_or(i64::MAX / 4);
                            let renewal = Renewal {
                                device: d,
                                serial,
                                not_after_ms: not_after,
                                now_ms: now_ms(),
                                handover_ms: handover,
                            };
                            match self.reg.renewed(renewal).await {
                                Ok(()) => Message::Renewed { cert_pem },
                                Err(e) => Message::RenewRefused {
                                    reason: format!("the hub cannot record the certificate: {e}"),
                                },
                            }
                        }
                        Err(e) => Message::RenewRefused {
                            reason: e.to_string(),
                        },
                    }
                };
                let (outcome, detail) = match &answer {
                    Message::RenewRefused { reason } => ("deny", reason.clone()),
                    _ => ("ok", format!("lifetime_s={}", self.lifetime.as_secs())),
                };
                info!(outcome, %detail, "Certificate renewal");
                self.ctx
                    .audit
                    .record(device, "certificate", "cert.renew", outcome, "", detail);
                let _ = tx.send(answer);
            }
            Message::AuditBatch { records } => self.collect(device, records, tx),
            other => {
                warn!(?other, "Unexpected control message from an edge; ignored");
            }
        }
    }

    /// Tells a box from which record to ship its audit: after what the store
    /// holds and what this hub holds for it. While the store does not answer,
    /// the box waits (it ships nothing without a cursor).
    async fn send_cursor(self: Arc<Self>, device: String, tx: mpsc::UnboundedSender<Message>) {
        loop {
            match self.reg.audit_next(device.clone()).await {
                Ok(stored) => {
                    let held = lock(&self.collected).next_after(&device);
                    let next = held.map_or(stored, |h| h.max(stored));
                    let _ = tx.send(Message::AuditCursor { next_seq: next });
                    return;
                }
                Err(e) => {
                    debug!(%device, %e, "Cannot read where the device's audit stands; asking again");
                    if !self.ctx.pause(Duration::from_secs(2)).await || tx.is_closed() {
                        return;
                    }
                }
            }
        }
    }

    /// Queues a box's batch for the next write; past the queue's bounds the
    /// box is told to send again from the first record not taken.
    fn collect(
        &self,
        device: &str,
        records: Vec<gateway_core::audit::Record>,
        tx: &mpsc::UnboundedSender<Message>,
    ) {
        let added = lock(&self.collected).add(device, records);
        if let Some(from) = added.refused_from {
            debug!(%device, from, "Collected audit queue full; the device sends again later");
            let _ = tx.send(Message::AuditCursor { next_seq: from });
        }
    }

    /// Writes the collected audit every [`HEARTBEAT_WRITES`], every device's
    /// batch in one transaction, until draining (then once more). A failed
    /// write keeps the records for the next round.
    pub async fn write_audit(self: Arc<Self>) {
        loop {
            let go = self.ctx.pause(HEARTBEAT_WRITES).await;
            let mut batches = lock(&self.collected).take();
            if !batches.is_empty() {
                // Transactions of a few hundred boxes, several at once: one
                // of thousands holds their head rows for seconds, and the
                // other hubs collecting the same boxes wait on it.
                batches.sort_by(|a, b| a.0.cmp(&b.0));
                let mut chunks = Vec::new();
                let mut all = batches.into_iter();
                loop {
                    let chunk: Vec<_> = all.by_ref().take(AUDIT_WRITE_DEVICES).collect();
                    if chunk.is_empty() {
                        break;
                    }
                    chunks.push(chunk);
                }
                let mut writes = tokio::task::JoinSet::new();
                let mut done = Vec::new();
                let mut failed = Vec::new();
                let mut next = chunks.into_iter();
                loop {
                    while writes.len() < AUDIT_WRITES_AT_ONCE {
                        let Some(chunk) = next.next() else { break };
                        let reg = self.reg.clone();
                        writes.spawn(async move {
                            let result = reg.append_audits(chunk.clone()).await;
                            (chunk, result)
                        });
                    }
                    let Some(joined) = writes.join_next().await else {
                        break;
                    };
                    match joined {
                        Ok((chunk, Ok(results))) => done.push((chunk, results)),
                        Ok((chunk, Err(e))) => {
                            let n: usize = chunk.iter().map(|b| b.1.len()).sum();
                            warn!(%e, records = n, devices = chunk.len(), "Cannot store collected audit; keeping it for the next round");
                            failed.extend(chunk);
                        }
                        Err(e) => error!(%e, "A collected audit write failed"),
                    }
                }
                {
                    let mut collected = lock(&self.collected);
                    collected.written();
                    if !failed.is_empty() {
                        collected.put_back(failed);
                    }
                }
                for (chunk, results) in done {
                    for ((device, records), result) in chunk.iter().zip(results) {
                        self.stored(device, records, result).await;
                    }
                }
            }
            if !go {
                return;
            }
        }
    }

    /// What the store said of one device's batch.
    async fn stored(
        &self,
        device: &str,
        records: &[gateway_core::audit::Record],
        result: Result<usize, String>,
    ) {
        match result {
            Ok(_) => {
                // Kept only once the chain they came in verified.
                let alarms = alarms_in(device, records);
                if !alarms.is_empty() {
                    if let Err(e) = self.reg.add_alarms(device.to_owned(), alarms).await {
                        error!(%device, %e, "Cannot keep the device's alarms");
                    }
                }
            }
            Err(problem) => {
                let first = {
                    let mut b = lock(&self.broken);
                    if b.len() >= COLLECTED_ALL {
                        b.clear();
                    }
                    b.insert(device.to_owned())
                };
                if !first {
                    debug!(%device, %problem, "Collected audit of a broken chain refused");
                    return;
                }
                // The registry and the metric say so before the log does.
                self.ctx.metrics.audit_alarm(device);
                error!(%device, %problem, "ALARM: the device's audit chain does not continue; collection stopped for it");
                self.ctx.audit.record(
                    device,
                    "audit",
                    "audit.chain_broken",
                    "error",
                    "R6.audit",
                    format!("{} records refused: {problem}", records.len()),
                );
            }
        }
    }

    /// Closes live connections whose certificate is no longer their device's
    /// (re-enrolled at another hub sharing the registry).
    async fn close_superseded(&self, ids: &[String]) {
        let Ok(live) = self.reg.live_serials(ids.to_vec()).await else {
            return;
        };
        for (device, allowed) in live {
            let closed = self.devices.close_except(
                &device,
                &allowed,
                fleet::CLOSE_SUPERSEDED,
                b"re-enrolled: this certificate is no longer the device's",
            );
            if closed > 0 {
                warn!(%device, closed, "Re-enrolled (seen in the registry): the old certificate's connections are closed");
                self.ctx.audit.record(
                    "registry",
                    &device,
                    "device.replace",
                    "ok",
                    "",
                    format!("connections_closed={closed}"),
                );
            }
        }
    }

    /// Offers `device` config `version` if it has a control session here and
    /// this hub did not offer it that version already.
    fn offer(&self, device: &str, version: u64, text: String) {
        let mut offered = lock(&self.offered);
        if offered.get(device) == Some(&version) {
            return;
        }
        if self.send(device, Message::ConfigOffer { version, text }) {
            offered.insert(device.to_owned(), version);
        }
    }

    /// Cuts the connections here of a device revoked in the registry.
    fn cut_revoked(&self, device: &str) {
        lock(&self.revoked).insert(device.to_owned());
        let closed = self.devices.close_all(
            device,
            fleet::CLOSE_REVOKED,
            b"revoked by central operations",
        );
        lock(&self.sessions).remove(device);
        if closed > 0 {
            warn!(%device, closed, "Device revoked (seen in the registry): connections closed");
            self.ctx.audit.record(
                "registry",
                device,
                "device.revoke",
                "ok",
                "",
                format!("connections_closed={closed}"),
            );
        }
    }

    /// Acts on one change another hub (or this one) made in the registry.
    async fn act(&self, change: Change) {
        let device = change.subject;
        match change.kind {
            // Read late, a revocation may be history: the device may have
            // been re-enrolled on a replacing token since. Only a device
            // revoked now is cut (an unanswering registry: cut, to be safe).
            ChangeKind::Revoked => {
                if self.reg.is_revoked(device.clone()).await.unwrap_or(true) {
                    self.cut_revoked(&device);
                } else {
                    debug!(%device, "A revocation read from the change log is undone already (re-enrolled)");
                }
            }
            ChangeKind::Enrolled | ChangeKind::Renewed => {
                // A revoked device re-enrolled on a replacing token is back.
                lock(&self.revoked).remove(&device);
                if self.devices.ids().contains(&device) {
                    self.close_superseded(&[device]).await;
                }
            }
            ChangeKind::Config => self.offer_pushed(device).await,
            ChangeKind::ConsumerRevoked => self.consumers.close(&device),
            ChangeKind::Rollout => self.wake_rollouts(),
        }
    }

    /// Offers `device` its newest pushed config if it has a control session
    /// here.
    async fn offer_pushed(&self, device: String) {
        if !self.connected(&device) {
            return;
        }
        match self.reg.desired(device.clone()).await {
            Ok(Some((version, text))) => {
                debug!(%device, version, "Config pushed (seen in the registry); offering it");
                self.offer(&device, version, text);
            }
            Ok(None) => {}
            Err(e) => warn!(%device, %e, "Cannot read the pushed config"),
        }
    }

    /// Acts on a page of the change log in order, but for pushes: those go to
    /// `pushes`, read and offered by [`Fleet::offer_pushes`] beside this
    /// loop. A rollout's wave writes thousands of pushes; read here, one
    /// registry read each, they would hold the next revocation behind them
    /// for seconds. A revocation and a re-enrollment of one device are acted
    /// on in their order.
    async fn act_on(&self, changes: Vec<Change>, pushes: &PushQueue) {
        let mut queued = false;
        for c in changes {
            if c.kind == ChangeKind::Config {
                let mut q = lock(&pushes.devices);
                if q.1.insert(c.subject.clone()) {
                    q.0.push_back(c.subject);
                    queued = true;
                }
            } else {
                self.act(c).await;
            }
        }
        if queued {
            pushes.wake.notify_one();
        }
    }

    /// Reads and offers the pushed configs `pushes` holds, [`PUSH_READS`]
    /// at a time, until draining.
    async fn offer_pushes(self: Arc<Self>, pushes: Arc<PushQueue>) {
        loop {
            let batch: Vec<String> = {
                let mut q = lock(&pushes.devices);
                let n = q.0.len().min(PUSH_READS * 8);
                let batch: Vec<String> = q.0.drain(..n).collect();
                for d in &batch {
                    q.1.remove(d);
                }
                batch
            };
            if batch.is_empty() {
                let go = tokio::select! {
                    () = pushes.wake.notified() => true,
                    go = self.ctx.pause(Duration::from_secs(5)) => go,
                };
                if !go {
                    return;
                }
                continue;
            }
            let mut reads = tokio::task::JoinSet::new();
            for device in batch {
                if reads.len() >= PUSH_READS {
                    let _ = reads.join_next().await;
                }
                let hub = self.clone();
                reads.spawn(async move { hub.offer_pushed(device).await });
            }
            while reads.join_next().await.is_some() {}
        }
    }

    /// Every connection here of a revoked device, or of a certificate no
    /// longer its device's, is cut (the fallback for changes this hub could
    /// not read when they were made).
    async fn sweep(&self) {
        let ids = self.devices.ids();
        if ids.is_empty() {
            return;
        }
        self.close_superseded(&ids).await;
        if let Ok(revoked) = self.reg.revoked_among(ids).await {
            for device in revoked {
                self.cut_revoked(&device);
            }
        }
    }

    /// Follows the registry's change log until draining: hubs sharing one
    /// registry act on a revocation, a re-enrollment or a push made at any of
    /// them. Woken by the engine where it can tell (PostgreSQL's `NOTIFY`:
    /// milliseconds), else every second; every 30 s the connected devices
    /// are swept as well.
    pub async fn follow_changes(self: Arc<Self>) {
        let wake = self.reg.wake();
        let poll = if wake.is_some() {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(1)
        };
        let mut from = loop {
            // The head first, then the revoked: a revocation between the two
            // is read again from the log (acting on it twice is harmless).
            let known = match self.reg.change_head().await {
                Ok(head) => self.reg.revoked().await.map(|r| (head, r)),
                Err(e) => Err(e),
            };
            match known {
                Ok((head, revoked)) => {
                    lock(&self.revoked).extend(revoked);
                    break head;
                }
                Err(e) => warn!(%e, "Cannot read the registry's change log; retrying"),
            }
            if !self.ctx.pause(Duration::from_secs(2)).await {
                return;
            }
        };
        let pushes = Arc::new(PushQueue::default());
        tokio::spawn(self.clone().offer_pushes(pushes.clone()));
        let mut swept = tokio::time::Instant::now();
        loop {
            let go = match &wake {
                Some(w) => tokio::select! {
                    () = w.notified() => true,
                    go = self.ctx.pause(poll) => go,
                },
                None => self.ctx.pause(poll).await,
            };
            if !go {
                return;
            }
            loop {
                match self.reg.changes(from, 1000).await {
                    Ok(changes) => {
                        let full = changes.len() == 1000;
                        if let Some(last) = changes.last() {
                            from = last.id;
                        }
                        self.act_on(changes, &pushes).await;
                        if !full {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!(%e, "Cannot read the registry's change log");
                        break;
                    }
                }
            }
            if swept.elapsed() >= Duration::from_secs(30) {
                self.sweep().await;
                swept = tokio::time::Instant::now();
            }
        }
    }

    /// Writes the buffered heartbeats every [`HEARTBEAT_WRITES`] in one
    /// transaction, until draining (then once more). A failed write keeps
    /// them for the next round unless newer ones came.
    pub async fn write_heartbeats(self: Arc<Self>) {
        loop {
            let go = self.ctx.pause(HEARTBEAT_WRITES).await;
            let batch: Vec<Heartbeat> = lock(&self.beats).drain().map(|(_, b)| b).collect();
            if !batch.is_empty() {
                let n = batch.len();
                if let Err(e) = self.reg.heartbeats(batch.clone()).await {
                    warn!(%e, heartbeats = n, "Cannot write heartbeats; keeping them for the next round");
                    let mut beats = lock(&self.beats);
                    let mut certs = lock(&self.certs);
                    for b in batch {
                        if b.not_after_ms.is_some() {
                            certs.remove(&b.device);
                        }
                        beats.entry(b.device.clone()).or_insert(b);
                    }
                }
            }
            if !go {
                return;
            }
        }
    }

    /// Drops collected audit older than `days`, hourly, until draining.
    pub async fn prune_loop(self: Arc<Self>, days: u32) {
        loop {
            let before = now_ms() - i64::from(days) * 86_400_000;
            match self.reg.prune_audit(before).await {
                Ok(0) => {}
                Ok(n) => info!(records = n, days, "Pruned collected audit past retention"),
                Err(e) => warn!(%e, "Cannot prune collected audit"),
            }
            if !self.ctx.pause(Duration::from_secs(3600)).await {
                return;
            }
        }
    }
}

/// What the hub reads from files its config names, at start.
pub struct HubFiles {
    /// [`box_ca_offer`].
    pub box_ca: Option<(Message, Vec<String>)>,
    /// [`firmware_keys`].
    pub firmware_keys: Vec<gateway_core::firmware::PublicKey>,
}

/// `[hub].firmware_keys` read: minisign public key files, each at most 4 KiB,
/// not followed through a link.
///
/// # Errors
/// A file that cannot be read or is not a minisign public key, naming it.
pub fn firmware_keys(
    h: &gateway_core::config::HubSettings,
) -> Result<Vec<gateway_core::firmware::PublicKey>, String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    h.firmware
        .keys
        .iter()
        .map(|file| {
            let at = |e: &dyn std::fmt::Display| {
                format!("hub.firmware_keys ({}): {e}", file.path.display())
            };
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(
                    (nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits(),
                )
                .open(&file.path)
                .map_err(|e| at(&e))?;
            if !f.metadata().map_err(|e| at(&e))?.is_file() {
                return Err(at(&"not a regular file"));
            }
            let mut text = String::new();
            f.take(4097).read_to_string(&mut text).map_err(|e| at(&e))?;
            if text.len() > 4096 {
                return Err(at(&"over 4096 bytes; a minisign public key is two lines"));
            }
            gateway_core::firmware::PublicKey::parse(&text).map_err(|e| {
                at(&format!(
                    "{e} (the .pub file minisign -G wrote, not the secret key)"
                ))
            })
        })
        .collect()
}

/// `[hub].box_ca` made ready to send: read (at most
/// [`fleet::MAX_CA_BUNDLE_BYTES`]), checked as `pki bundle` checks, holding
/// the CA that signs (the first of `ca_cert`), and signed with `ca_key`;
/// dated by the file's modification time. With its fingerprints.
///
/// # Errors
/// What is wrong with the file, naming the key.
pub fn box_ca_offer(
    h: &gateway_core::config::HubSettings,
) -> Result<Option<(Message, Vec<String>)>, String> {
    use std::io::Read as _;
    let Some(file) = &h.box_ca else {
        return Ok(None);
    };
    let at = |e: &dyn std::fmt::Display| format!("hub.box_ca ({}): {e}", file.path.display());
    let f = std::fs::File::open(&file.path).map_err(|e| at(&e))?;
    let modified = f
        .metadata()
        .and_then(|m| m.modified())
        .map_err(|e| at(&e))?;
    let mut text = String::new();
    f.take(fleet::MAX_CA_BUNDLE_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|e| at(&e))?;
    if text.len() > fleet::MAX_CA_BUNDLE_BYTES {
        return Err(at(&format!(
            "over {} bytes; a bundle holds a few CA certificates",
            fleet::MAX_CA_BUNDLE_BYTES
        )));
    }
    let (pem, fps) = pki::checked_bundle(&text).map_err(|e| at(&e))?;
    let signing = std::fs::read_to_string(&h.ca_cert.path)
        .map(|p| pki::fingerprints(&p))
        .map_err(|e| at(&format!("cannot read hub.ca_cert: {e}")))?;
    let Some(signer) = signing.first() else {
        return Err(at(&"hub.ca_cert holds no certificate"));
    };
    if !fps.contains(signer) {
        return Err(at(&format!(
            "it leaves out {signer}, the CA that signs (the first of hub.ca_cert): boxes would refuse it; build it with that CA in it"
        )));
    }
    let issued_ms = modified
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let key = std::fs::read_to_string(&h.ca_key.path).map_err(|e| at(&e))?;
    let signature = pki::sign_ca_bundle(&key, &pem, issued_ms).map_err(|e| at(&e))?;
    Ok(Some((
        Message::CaBundle {
            pem,
            issued_ms,
            signature,
        },
        fps,
    )))
}

/// The hub's key, for signing audit exports (ECDSA P-256 as `gatewayd pki` makes).
fn export_key(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Option<(ring::signature::EcdsaKeyPair, String)> {
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_file(key).ok()?;
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        der.secret_pkcs8_der(),
        &ring::rand::SystemRandom::new(),
    )
    .ok()?;
    Some((pair, std::fs::read_to_string(cert).ok()?))
}

/// The alarms among a device's collected records: `detect.alarm` records of
/// that device whose alarm names it as the node and carries its id prefix
/// (so one device cannot shadow another's alarm ids).
fn alarms_in(device: &str, records: &[gateway_core::audit::Record]) -> Vec<Alarm> {
    records
        .iter()
        .filter(|r| r.event.event == "detect.alarm" && r.event.device == device)
        .filter_map(|r| serde_json::from_str::<Alarm>(&r.event.detail).ok())
        .filter(|a| {
            let ok = a.node == device && a.id.starts_with(&format!("{device}-"));
            if !ok {
                warn!(%device, id = %a.id, node = %a.node, "An alarm naming another node was not kept");
            }
            ok
        })
        .collect()
}
