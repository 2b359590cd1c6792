//! The boundary's guard (GB/T 22239-2019 8.1.3.3): every listener reports what
//! it saw here and asks, before doing any work, whether a source is banned.
//!
//! The decisions are `gateway_core::detect`'s; this holds its tables behind
//! locks, applies bans at once (the next connection from the source is
//! dropped), and queues the alarms for the `detect` capability, which audits,
//! ships and forwards them. Reports cost a hash lookup and a little arithmetic
//! under a lock; a ban check with no ban in force costs one atomic load.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use gateway_core::config::Detect;
use gateway_core::detect::bans::{Bans, Entry};
use gateway_core::detect::{Action, Alarm, Alarms, Detector, Direction, Event, Signal};
use tokio::sync::mpsc;

use super::clock::now_ms;
use crate::admin::metrics::Metrics;

/// Alarms waiting for the detect task; past this they are counted as lost
/// (a detection is de-duplicated first, so this takes a flood of sources).
pub const ALARM_QUEUE: usize = 4096;

struct State {
    enabled: bool,
    detector: Detector,
    alarms: Alarms,
}

/// Detection and bans of a running node.
pub struct Guard {
    node: String,
    state: Mutex<State>,
    bans: RwLock<Bans>,
    /// Whether any ban may be in force (false: no lookup needed).
    any_ban: AtomicBool,
    /// The ban table changed since it was last saved.
    dirty: AtomicBool,
    tx: mpsc::Sender<Alarm>,
    rx: Mutex<Option<mpsc::Receiver<Alarm>>>,
    /// Addresses devices proved themselves from lately (a tunnel came up):
    /// events from there carry the device id, so `never_ban` by device id
    /// covers a partner gateway wherever it connects from.
    learned: Mutex<std::collections::HashMap<IpAddr, (String, i64)>>,
}

/// How long an address stays a device's after its tunnel came up.
const LEARNED_MS: i64 = 24 * 3_600_000;
/// Addresses learned at once.
const MAX_LEARNED: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn detector(config: &Detect) -> Detector {
    let c = config.clone();
    Detector::new(config.thresholds.clone(), move |ip, dev| c.exempt(ip, dev))
}

/// What a listener reports about one source.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    /// The peer.
    pub peer: SocketAddr,
    /// Whether its address is proven (a completed TCP or QUIC handshake).
    pub verified: bool,
    /// Which side it came from.
    pub direction: Direction,
    /// The listener, service or channel.
    pub target: &'a str,
    /// The device id its certificate proved, if any (never a claimed one:
    /// `never_ban` trusts it).
    pub device: Option<&'a str>,
}

impl Report<'_> {
    /// No address at all (a spool file, a record another department sent
    /// through the hub): alarmed about, never banned.
    pub fn no_address(direction: Direction, target: &str) -> Report<'_> {
        Report {
            peer: SocketAddr::from(([0, 0, 0, 0], 0)),
            verified: false,
            direction,
            target,
            device: None,
        }
    }

    /// A proven TCP peer.
    pub fn tcp(peer: SocketAddr, direction: Direction, target: &str) -> Report<'_> {
        Report {
            peer,
            verified: true,
            direction,
            target,
            device: None,
        }
    }
}

impl Guard {
    /// A guard for node `node` configured by `[detect]`.
    pub fn new(node: &str, config: &Detect) -> Self {
        let (tx, rx) = mpsc::channel(ALARM_QUEUE);
        Self {
            node: node.to_owned(),
            state: Mutex::new(State {
                enabled: config.enabled,
                detector: detector(config),
                alarms: Alarms::default(),
            }),
            bans: RwLock::new(Bans::new(config.escalation)),
            any_ban: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            tx,
            rx: Mutex::new(Some(rx)),
            learned: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// `device` proved itself from `ip` (its tunnel is up).
    pub fn learn(&self, ip: IpAddr, device: &str) {
        let now = now_ms();
        let mut l = lock(&self.learned);
        if !l.contains_key(&ip) && l.len() >= MAX_LEARNED {
            l.retain(|_, (_, until)| *until > now);
            if l.len() >= MAX_LEARNED {
                gateway_core::table::evict_oldest(&mut l, |(_, until)| *until);
            }
        }
        l.insert(ip, (device.to_owned(), now + LEARNED_MS));
    }

    fn device_at(&self, ip: IpAddr, now: i64) -> Option<String> {
        lock(&self.learned)
            .get(&ip)
            .filter(|(_, until)| *until > now)
            .map(|(d, _)| d.clone())
    }

    /// A new `[detect]` (a reload): thresholds and exemptions change, the
    /// buckets and bans stay. A source now in `never_ban` is not unbanned
    /// here (the security administrator lifts bans by name).
    pub fn reconfigure(&self, config: &Detect) {
        let mut s = lock(&self.state);
        s.enabled = config.enabled;
        let c = config.clone();
        s.detector
            .reconfigure(config.thresholds.clone(), move |ip, dev| c.exempt(ip, dev));
    }

    /// Whether `ip` is banned now; counted as a drop when it is.
    pub fn banned(&self, ip: IpAddr, metrics: &Metrics) -> bool {
        if !self.any_ban.load(Ordering::Acquire) {
            return false;
        }
        let hit = self
            .bans
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .banned_until(ip, now_ms())
            .is_some();
        if hit {
            metrics.banned_dropped();
        }
        hit
    }

    /// Takes what a listener saw; a tripped detector bans the source at once
    /// (unless exempt or unproven) and queues its alarm.
    pub fn report(&self, r: &Report<'_>, signal: Signal, metrics: &Metrics) {
        let now = now_ms();
        let device = r
            .device
            .map(str::to_owned)
            .or_else(|| self.device_at(r.peer.ip(), now));
        let event = Event {
            at_ms: now,
            source: r.peer.ip(),
            port: r.peer.port(),
            device,
            verified: r.verified,
            direction: r.direction,
            target: r.target.to_owned(),
            signal,
        };
        let mut s = lock(&self.state);
        if !s.enabled {
            return;
        }
        let Some(d) = s.detector.observe(event) else {
            return;
        };
        let action = match d.ban_ms {
            Some(ms) => {
                let until = self
                    .bans
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .ban(d.event.source, now, ms);
                self.any_ban.store(true, Ordering::Release);
                self.dirty.store(true, Ordering::Release);
                Action::Banned(until)
            }
            None => Action::AlarmOnly,
        };
        let Some(d) = s.alarms.raise(d) else {
            return;
        };
        drop(s);
        self.queue(
            Alarm::new(&self.node, self.alarm_id(now), &d, action),
            metrics,
        );
    }

    /// Raises an alarm the node made itself (not a detector's: a forwarding
    /// target down), queued like the others.
    pub fn raise(&self, make: impl FnOnce(&str, String) -> Alarm, metrics: &Metrics) {
        let a = make(&self.node, self.alarm_id(now_ms()));
        self.queue(a, metrics);
    }

    fn alarm_id(&self, now: i64) -> String {
        format!("{}-{now:x}-{:08x}", self.node, rand::random::<u32>())
    }

    fn queue(&self, a: Alarm, metrics: &Metrics) {
        if self.tx.try_send(a).is_err() {
            metrics.alarm_lost();
        }
    }

    /// The alarms' receiver, for the detect task (once).
    pub fn alarms(&self) -> Option<mpsc::Receiver<Alarm>> {
        lock(&self.rx).take()
    }

    /// Once a second: alarms whose de-duplication window ended with more
    /// detections are queued (one each, with the count); idle buckets and
    /// ended bans are forgotten. Returns the bans in force.
    pub fn tick(&self, metrics: &Metrics) -> usize {
        let now = now_ms();
        let due = {
            let mut s = lock(&self.state);
            s.detector.forget_idle(now);
            s.alarms.poll_due(now)
        };
        for d in due {
            let action = match self.banned_until(d.event.source, now) {
                Some(until) => Action::Banned(until),
                None => Action::AlarmOnly,
            };
            self.queue(
                Alarm::new(&self.node, self.alarm_id(now), &d, action),
                metrics,
            );
        }
        let mut bans = self
            .bans
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = bans.len();
        bans.forget_ended(now);
        if bans.len() != before {
            self.dirty.store(true, Ordering::Release);
        }
        let active = bans.active_count(now);
        self.any_ban.store(active > 0, Ordering::Release);
        metrics.bans_active(active as u64);
        active
    }

    fn banned_until(&self, ip: IpAddr, now: i64) -> Option<i64> {
        self.bans
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .banned_until(ip, now)
    }

    /// Lifts the ban of `ip` (or its /64). Whether it was banned.
    pub fn lift(&self, ip: IpAddr) -> bool {
        let lifted = self
            .bans
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .lift(ip, now_ms());
        if lifted {
            self.dirty.store(true, Ordering::Release);
        }
        lifted
    }

    /// The bans in force: source (or /64) and until when (Unix ms).
    pub fn active_bans(&self) -> Vec<(IpAddr, i64)> {
        self.bans
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .active(now_ms())
    }

    /// The ban table to save, when it changed since the last call.
    pub fn take_changed(&self) -> Option<Vec<(IpAddr, Entry)>> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return None;
        }
        let bans = self
            .bans
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(bans.entries().map(|(ip, e)| (*ip, e.clone())).collect())
    }

    /// Puts back saved bans (at start).
    pub fn restore(&self, saved: Vec<(IpAddr, Entry)>) {
        let now = now_ms();
        let mut bans = self
            .bans
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (ip, e) in saved {
            bans.restore(ip, e, now);
        }
        self.any_ban
            .store(bans.active_count(now) > 0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_core::config::NeverBan;

    fn report(ip: [u8; 4]) -> Report<'static> {
        Report {
            peer: SocketAddr::from((ip, 40_000)),
            verified: true,
            direction: Direction::Inbound,
            target: "quic 10.0.0.1:7443",
            device: None,
        }
    }

    #[test]
    fn a_device_in_never_ban_covers_the_address_it_proved_itself_from() {
        let config = Detect {
            never_ban: vec![NeverBan::Device("partner-gw".into())],
            ..Detect::default()
        };
        let guard = Guard::new("hub-1", &config);
        let metrics = Metrics::default();
        let mut alarms = guard.alarms().expect("receiver");
        guard.learn(IpAddr::from([198, 51, 100, 7]), "partner-gw");
        for ip in [[198, 51, 100, 7], [198, 51, 100, 8]] {
            for _ in 0..5 {
                guard.report(&report(ip), Signal::HandshakeFailed, &metrics);
            }
        }
        let (a, b) = (
            alarms.try_recv().expect("alarm"),
            alarms.try_recv().expect("alarm"),
        );
        assert_eq!(a.device.as_deref(), Some("partner-gw"));
        assert_eq!(a.action, "alarm (never_ban, not banned)");
        assert_eq!(
            (b.source.as_str(), b.action.as_str()),
            ("198.51.100.8", "ban")
        );
        assert!(!guard.banned(IpAddr::from([198, 51, 100, 7]), &metrics));
        assert!(guard.banned(IpAddr::from([198, 51, 100, 8]), &metrics));
    }
}
