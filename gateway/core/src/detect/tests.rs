use super::*;

const MIN: i64 = 60_000;

fn event(source: [u8; 4], at_ms: i64, signal: Signal) -> Event {
    Event {
        at_ms,
        source: IpAddr::from(source),
        port: 40_000,
        device: None,
        verified: true,
        direction: Direction::Inbound,
        target: "publish 127.0.0.1:8443".into(),
        signal,
    }
}

fn hub_exempt() -> Detector {
    Detector::new(Thresholds::default(), |ip, device| {
        ip == IpAddr::from([10, 9, 9, 9]) || device == Some("partner-gw")
    })
}

#[test]
fn a_scan_over_thirty_ports_trips_at_the_fifteenth_and_bans_for_four_hours() {
    let mut d = hub_exempt();
    let mut hits = Vec::new();
    for port in 0..30u64 {
        if let Some(x) = d.observe(event(
            [192, 0, 2, 1],
            port as i64 * 50,
            Signal::Refused {
                target: 1000 + port,
            },
        )) {
            hits.push((port, x));
        }
    }
    let (port, first) = &hits[0];
    assert_eq!(*port, 14, "the fifteenth distinct port");
    assert_eq!(first.attack, Attack::Scan);
    assert_eq!(first.attack.severity(), Severity::High);
    assert_eq!(first.count, 15);
    assert_eq!(first.ban_ms, Some(4 * 60 * MIN));
    assert_eq!(first.attack.rule(), "D2.scan");
    assert_eq!(hits.len(), 2, "thirty ports: two scans");
}

#[test]
fn refusals_of_one_service_within_a_second_are_repeated_refusals_not_a_scan() {
    let mut d = hub_exempt();
    // The first refusal of port 22 is a new target (towards a scan); the ten
    // after it are repeats.
    let found: Vec<_> = (0..11)
        .filter_map(|i| {
            d.observe(event(
                [192, 0, 2, 2],
                i * 100,
                Signal::Refused { target: 22 },
            ))
        })
        .collect();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].attack, Attack::Refusals);
    assert_eq!(found[0].ban_ms, Some(10 * MIN));
    assert_eq!(found[0].window_ms, 60_000);
    // Nine a minute, spread out, never trip.
    let mut d = hub_exempt();
    let none = (0..100).all(|i| {
        d.observe(event(
            [192, 0, 2, 3],
            i * 6_500,
            Signal::Refused { target: 22 },
        ))
        .is_none()
    });
    assert!(none);
}

#[test]
fn a_never_ban_source_and_a_spoofable_address_are_alarmed_about_but_not_banned() {
    let mut d = hub_exempt();
    let hub = (0..15)
        .filter_map(|p| {
            d.observe(event(
                [10, 9, 9, 9],
                p,
                Signal::Refused { target: p as u64 },
            ))
        })
        .next()
        .expect("the hub's scan is still detected");
    assert_eq!(hub.ban_ms, None);
    let mut partner = event([192, 0, 2, 7], 0, Signal::ForeignCertificate);
    partner.device = Some("partner-gw".into());
    assert_eq!(d.observe(partner).expect("alarm").ban_ms, None);
    // Datagrams from a forged address: a flood is seen, nobody is banned.
    let mut spoofed = None;
    // 60,000 a second against a bucket of 20,000 leaking 20,000 a second.
    for i in 0..60_000 {
        let mut e = event([10, 9, 9, 1], i / 60, Signal::Datagram { flow: 7 });
        e.verified = false;
        spoofed = spoofed.or(d.observe(e));
    }
    let spoofed = spoofed.expect("the datagram flood is detected");
    assert_eq!(spoofed.attack, Attack::DatagramFlood);
    assert_eq!(spoofed.ban_ms, None);
}

#[test]
fn a_foreign_ca_and_malware_alarm_at_once() {
    let mut d = hub_exempt();
    let ca = d
        .observe(event([192, 0, 2, 4], 0, Signal::ForeignCertificate))
        .expect("at once");
    assert_eq!((ca.attack, ca.count), (Attack::ForeignCa, 1));
    let m = d
        .observe(event(
            [192, 0, 2, 4],
            1,
            Signal::Malware {
                signature: "Eicar-Test-Signature".into(),
            },
        ))
        .expect("at once");
    assert_eq!(m.attack.severity(), Severity::Critical);
    // Four handshake failures pass; the fifth within ten seconds trips.
    let fails: Vec<_> = (0..5)
        .map(|i| d.observe(event([192, 0, 2, 5], i * 100, Signal::HandshakeFailed)))
        .collect();
    assert!(fails[..4].iter().all(Option::is_none));
    assert_eq!(
        fails[4].as_ref().map(|x| x.attack),
        Some(Attack::HandshakeFailures)
    );
    let many = d.observe(event(
        [192, 0, 2, 6],
        0,
        Signal::Handshakes { in_progress: 33 },
    ));
    assert_eq!(many.map(|x| x.attack), Some(Attack::HandshakeFlood));
    assert!(
        d.observe(event(
            [192, 0, 2, 6],
            0,
            Signal::Handshakes { in_progress: 32 }
        ))
        .is_none()
    );
}

#[test]
fn five_empty_connections_and_a_connection_flood_trip() {
    let mut d = hub_exempt();
    let empty = (0..5)
        .filter_map(|i| d.observe(event([192, 0, 2, 8], i * 2_000, Signal::EmptyConnection)))
        .collect::<Vec<_>>();
    assert_eq!(empty.len(), 1);
    assert_eq!(empty[0].attack.severity(), Severity::Low);
    let flood = (0..3_000)
        .filter_map(|i| d.observe(event([192, 0, 2, 9], i / 2, Signal::Connection)))
        .collect::<Vec<_>>();
    assert_eq!(flood.len(), 1, "2,000 a second for a second and a half");
    let calm = (0..2_000).all(|i| {
        d.observe(event([192, 0, 2, 10], i * 2, Signal::Connection))
            .is_none()
    });
    assert!(calm, "500 a second is not a flood");
}

#[test]
fn the_source_table_is_capped_and_forgets_idle_buckets() {
    let mut d = hub_exempt();
    for i in 0..(MAX_SOURCES as u32 + 500) {
        let ip = (0x0a00_0000 + i).to_be_bytes();
        d.observe(event(ip, i64::from(i), Signal::EmptyConnection));
    }
    assert!(d.sources() <= MAX_SOURCES);
    d.forget_idle(10 * MIN);
    assert_eq!(d.sources(), 0);
}

#[test]
fn alarms_are_raised_once_per_source_and_attack_a_minute_with_a_count() {
    let mut d = hub_exempt();
    let mut alarms = Alarms::default();
    let mut raised = 0;
    for i in 0..5 {
        let x = d
            .observe(event(
                [192, 0, 2, 11],
                i * 1_000,
                Signal::ForeignCertificate,
            ))
            .expect("each is a detection");
        raised += usize::from(alarms.raise(x).is_some());
    }
    assert_eq!(raised, 1);
    assert!(
        alarms.poll_due(30_000).is_empty(),
        "the window is still open"
    );
    let due = alarms.poll_due(60_000);
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].count, 4, "the four only counted");
    assert!(alarms.poll_due(200_000).is_empty());
    let again = d.observe(event([192, 0, 2, 11], 200_000, Signal::ForeignCertificate));
    assert!(
        alarms.raise(again.expect("detection")).is_some(),
        "a new window"
    );
}

#[test]
fn past_the_cap_new_sources_share_one_alarm_per_attack() {
    let mut alarms = Alarms::default();
    let detection = |i: u32, at: i64| Detection {
        attack: Attack::Scan,
        event: event(
            (0x0a00_0000 + i).to_be_bytes(),
            at,
            Signal::Refused { target: 1 },
        ),
        count: 15,
        window_ms: 75_000,
        ban_ms: None,
    };
    let raised = (0..MAX_SOURCES as u32)
        .filter(|i| alarms.raise(detection(*i, 0)).is_some())
        .count();
    assert_eq!(raised, MAX_SOURCES);
    let past: Vec<_> = (0..1_000u32)
        .filter_map(|i| alarms.raise(detection(MAX_SOURCES as u32 + i, 10)))
        .collect();
    assert_eq!(past.len(), 1, "a thousand more sources: one alarm");
    assert_eq!(past[0].event.source, OVERFLOW);
    let due: Vec<_> = alarms
        .poll_due(ALARM_WINDOW_MS + 10)
        .into_iter()
        .filter(|d| d.event.source == OVERFLOW)
        .collect();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].count, 999, "the rest counted");
}

#[test]
fn an_ipv6_host_changing_address_within_its_64_is_one_source() {
    let mut d = hub_exempt();
    let mut hit = None;
    for i in 0..15u16 {
        let ip: IpAddr = format!("2001:db8:1:2::{:x}", 0x100 + i)
            .parse()
            .expect("an address");
        let mut e = event(
            [0, 0, 0, 0],
            i64::from(i) * 10,
            Signal::Refused {
                target: u64::from(i),
            },
        );
        e.source = ip;
        hit = hit.or(d.observe(e));
    }
    let hit = hit.expect("fifteen ports from one /64 are a scan");
    assert_eq!(hit.attack, Attack::Scan);
    assert_eq!(
        hit.event.source,
        "2001:db8:1:2::10e".parse::<IpAddr>().expect("an address"),
        "the alarm names the address seen"
    );
    let mut bans = bans::Bans::default();
    bans.ban(hit.event.source, 0, 1_000);
    assert!(
        bans.banned_until("2001:db8:1:2:ffff::1".parse().expect("an address"), 1)
            .is_some()
    );
    assert!(
        bans.banned_until("2001:db8:1:3::1".parse().expect("an address"), 1)
            .is_none()
    );
    bans.ban("::ffff:192.0.2.7".parse().expect("an address"), 0, 1_000);
    assert!(
        bans.banned_until("192.0.2.7".parse().expect("an address"), 1)
            .is_some(),
        "an IPv4-mapped address is its IPv4 one"
    );
}

#[test]
fn an_alarm_carries_the_four_fields_and_the_time_in_rfc3339_with_milliseconds() {
    let mut d = hub_exempt();
    let mut e = event(
        [192, 0, 2, 9],
        1_764_611_401_123,
        Signal::ForeignCertificate,
    );
    e.device = Some("jl-gat-0009".into());
    let hit = d.observe(e).expect("a foreign CA alarms at once");
    let a = Alarm::new("hub-1", "x".into(), &hit, Action::Banned(1_764_612_001_123));
    assert_eq!((a.source.as_str(), a.port), ("192.0.2.9", 40_000));
    assert_eq!(
        (a.rule.as_str(), a.attack.as_str()),
        ("D3.foreign-ca", "foreign-certificate")
    );
    assert_eq!(a.target, "publish 127.0.0.1:8443");
    assert_eq!(a.time, "2025-12-02T01:50:01.123+08:00");
    assert_eq!(
        a.banned_until.as_deref(),
        Some("2025-12-02T02:00:01.123+08:00")
    );
    assert_eq!(a.device.as_deref(), Some("jl-gat-0009"));
    assert_eq!(a.direction, "inbound");
    assert_eq!(
        crate::units::rfc3339_cst(0),
        "1970-01-01T08:00:00.000+08:00"
    );
    assert_eq!(
        crate::units::rfc3339_cst(-1),
        "1970-01-01T07:59:59.999+08:00"
    );
}

#[test]
fn forged_events_do_not_help_a_few_real_ones_to_a_ban() {
    let mut d = hub_exempt();
    let mut bans = Vec::new();
    // 1,800 forged flows a second from a partner's address for two
    // seconds, and 200 real connections a second: a flood by the first
    // count, never a ban.
    for i in 0..4_000i64 {
        let mut e = event([198, 51, 100, 60], i / 2, Signal::Connection);
        e.verified = i % 10 == 0;
        if let Some(x) = d.observe(e) {
            bans.push(x);
        }
    }
    assert!(bans.iter().all(|x| x.ban_ms.is_none()), "{bans:?}");
    assert!(!bans.is_empty(), "the forged flood itself is alarmed");
}

#[test]
fn a_ban_is_raised_at_once_after_an_alarm_only_of_the_same_kind() {
    let mut alarms = Alarms::default();
    let mut d = hub_exempt();
    let mut first = None;
    let mut e = event([198, 51, 100, 61], 0, Signal::ForeignCertificate);
    e.verified = false;
    first = first.or(d.observe(e));
    let first = first.expect("alarm");
    assert!(first.ban_ms.is_none());
    assert!(alarms.raise(first).is_some());
    let banned = d
        .observe(event([198, 51, 100, 61], 10, Signal::ForeignCertificate))
        .expect("alarm");
    assert!(banned.ban_ms.is_some());
    assert!(
        alarms.raise(banned).is_some(),
        "the ban's alarm is not held back"
    );
}
