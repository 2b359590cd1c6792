use super::*;

fn steps(s: &str) -> Vec<WaveStep> {
    parse_waves(s).expect("waves")
}

#[test]
fn one_percent_of_seven_devices() {
    // Every wave adds at least one device; shares round up.
    assert_eq!(plan(7, &steps("1%,10%,50%,100%"), 1), [1, 2, 4, 7]);
    // --min-wave 5: the first wave takes 5, the next the other 2, the rest
    // would add nobody and are dropped.
    assert_eq!(plan(7, &steps("1%,10%,50%,100%"), 5), [5, 7]);
    assert_eq!(
        plan(10_000, &steps("1%,10%,50%,100%"), 5),
        [100, 1000, 5000, 10_000]
    );
    assert_eq!(plan(3, &steps("5,50%,100%"), 1), [3]);
    assert_eq!(plan(0, &steps("100%"), 1), Vec::<usize>::new());
    assert_eq!(plan(200, &steps("0.5%,100%"), 1), [1, 200]);
}

#[test]
fn waves_are_checked() {
    for bad in [
        "",
        "10%",
        "50%,10%,100%",
        "0%,100%",
        "101%",
        "1.234%,100%",
        "x,100%",
        "-1,100%",
        "5,3,100%",
    ] {
        assert!(parse_waves(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        steps("5, 10%,100%"),
        [
            WaveStep::Count(5),
            WaveStep::Share(1000),
            WaveStep::Share(10_000)
        ]
    );
    let many = vec!["1"; 30].join(",");
    assert!(parse_waves(&many).is_err());
}

#[test]
fn failure_limits() {
    assert_eq!(FailureLimit::parse("2%").expect("share").allowed(200), 4);
    assert_eq!(FailureLimit::parse("2%").expect("share").allowed(20), 0);
    assert_eq!(FailureLimit::parse("3").expect("count").allowed(20), 3);
    assert_eq!(FailureLimit::parse("0%").expect("zero").allowed(20), 0);
    for bad in ["", "-1", "2 %", "x", "150%"] {
        assert!(FailureLimit::parse(bad).is_err(), "{bad:?}");
    }
}

fn rollout(n: usize, waves: &[usize], soak_ms: u64) -> Rollout {
    Rollout {
        id: "r-1".into(),
        template: "t".into(),
        template_version: 1,
        selector: String::new(),
        waves_spec: "x".into(),
        waves: waves.to_vec(),
        max_failures_spec: "1".into(),
        max_failures: 1,
        soak_ms,
        by: "wang".into(),
        by_role: "system".into(),
        restart: false,
        created_ms: 0,
        state: State::Running,
        reason: None,
        wave_started_ms: vec![],
        failure_base: 0,
        pushing: None,
        rollback_started_ms: None,
        devices: members((0..n).map(|i| format!("d{i}")).collect(), waves),
        firmware: None,
    }
}

fn applied(v: u64, at: i64) -> Observed {
    Observed {
        desired: Some(v),
        applied: Some(v),
        result: Some(format!(r#"{{"offered":{v},"outcome":"applied"}}"#)),
        heartbeat: Some((at + 1, v)),
        result_ms: Some(at),
        trying: false,
        firmware: None,
    }
}

#[test]
fn a_report_means_what_it_says() {
    let soak = 10_000;
    let offered = 1_000;
    let none = Observed::default();
    assert_eq!(
        status_of(3, offered, &none, soak, 2_000),
        DeviceStatus::Pending
    );
    assert_eq!(
        status_of(3, offered, &none, soak, offered + MIN_REPORT_MS as i64 + 1),
        DeviceStatus::Silent
    );
    assert_eq!(
        status_of(3, offered, &applied(3, 1500), soak, 2_000),
        DeviceStatus::Applied
    );
    // Applied, but its heartbeat says the config is still on trial (it may
    // have come over the tunnel the new config is about to replace).
    let mut trial = applied(3, 1500);
    trial.trying = true;
    assert_eq!(
        status_of(3, offered, &trial, soak, 2_000),
        DeviceStatus::Pending
    );
    // Applied, but not heard from since: not yet.
    let mut quiet = applied(3, 1500);
    quiet.heartbeat = Some((1400, 2));
    assert_eq!(
        status_of(3, offered, &quiet, soak, 2_000),
        DeviceStatus::Pending
    );
    let reverted = Observed {
        applied: Some(2),
        result: Some(r#"{"offered":3,"outcome":"reverted","tried":3,"reason":"no hub"}"#.into()),
        ..Observed::default()
    };
    assert_eq!(
        status_of(3, offered, &reverted, soak, 2_000),
        DeviceStatus::Reverted("no hub".into())
    );
    let refused = Observed {
        applied: Some(2),
        result: Some(r#"{"offered":3,"outcome":"refused","errors":["line 3: bad"]}"#.into()),
        ..Observed::default()
    };
    assert_eq!(
        status_of(3, offered, &refused, soak, 2_000),
        DeviceStatus::Failed("refused: line 3: bad".into())
    );
    // A refusal of an older version says nothing of this one.
    let old = Observed {
        applied: Some(2),
        result: Some(r#"{"offered":2,"outcome":"refused","errors":[]}"#.into()),
        ..Observed::default()
    };
    assert_eq!(
        status_of(3, offered, &old, soak, 2_000),
        DeviceStatus::Pending
    );
    // Refused as "not newer" by a box that runs it (a second hub's offer).
    let again = Observed {
        applied: Some(3),
        result: Some(r#"{"offered":3,"outcome":"refused","errors":["not newer"]}"#.into()),
        heartbeat: Some((2_000, 3)),
        result_ms: Some(1_500),
        ..Observed::default()
    };
    assert_eq!(
        status_of(3, offered, &again, soak, 2_500),
        DeviceStatus::Applied
    );
    let later = Observed {
        desired: Some(4),
        ..Observed::default()
    };
    assert_eq!(
        status_of(3, offered, &later, soak, 2_000),
        DeviceStatus::Superseded
    );
}

#[test]
fn waves_close_after_their_soak_and_failures_pause() {
    let mut r = rollout(10, &[1, 5, 10], 5_000);
    let st = |r: &Rollout, obs: &dyn Fn(&str) -> Observed, now| -> Vec<DeviceStatus> {
        r.devices
            .iter()
            .map(|m| member_status(r, m, &obs(&m.device), now))
            .collect()
    };
    let none = |_: &str| Observed::default();
    assert_eq!(decide(&r, &st(&r, &none, 0), 0), Decision::StartWave(0));
    r.wave_started_ms.push(0);
    r.devices[0].pushed = Some(2);
    let ok = |_: &str| applied(2, 100);
    // Applied, but the soak has not passed.
    assert_eq!(decide(&r, &st(&r, &ok, 1_000), 1_000), Decision::Wait);
    assert_eq!(
        decide(&r, &st(&r, &ok, 5_000), 5_000),
        Decision::StartWave(1)
    );
    r.wave_started_ms.push(5_000);
    for m in &mut r.devices[1..5] {
        m.pushed = Some(2);
    }
    // One failure is allowed, two pause.
    let some_fail = |d: &str| match d {
        "d1" | "d2" => Observed {
            applied: Some(1),
            result: Some(
                r#"{"offered":2,"outcome":"reverted","tried":2,"reason":"no hub"}"#.into(),
            ),
            ..Observed::default()
        },
        _ => applied(2, 6_000),
    };
    let s = st(&r, &some_fail, 20_000);
    assert_eq!(failures(&s), 2);
    match decide(&r, &s, 20_000) {
        Decision::Pause(why) => assert!(
            why.contains("d1, d2") && why.contains("more than --max-failures 1"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
    // Resumed: those two are counted already.
    r.failure_base = 2;
    assert_eq!(decide(&r, &s, 20_000), Decision::StartWave(2));
    // Paused or finished rollouts do nothing.
    r.state = State::Paused;
    assert_eq!(decide(&r, &s, 20_000), Decision::Wait);
}

#[test]
fn a_wave_waits_for_its_pending_devices_until_they_are_silent() {
    let mut r = rollout(2, &[2], 0);
    r.wave_started_ms.push(0);
    r.devices[0].pushed = Some(2);
    r.devices[1].pushed = Some(2);
    let obs = |d: &str| {
        if d == "d0" {
            applied(2, 10)
        } else {
            Observed::default()
        }
    };
    let at = |now| -> Vec<DeviceStatus> {
        r.devices
            .iter()
            .map(|m| member_status(&r, m, &obs(&m.device), now))
            .collect()
    };
    assert_eq!(decide(&r, &at(1_000), 1_000), Decision::Wait);
    let late = MIN_REPORT_MS as i64 + 1;
    // Silent is a failure: over the limit of 1? No: one failure is allowed.
    assert_eq!(at(late)[1], DeviceStatus::Silent);
    assert_eq!(decide(&r, &at(late), late), Decision::Finish);
}

#[test]
fn a_rollback_finishes_when_every_device_answered() {
    let mut r = rollout(2, &[2], 0);
    r.wave_started_ms.push(0);
    r.state = State::RollingBack;
    r.rollback_started_ms = Some(100);
    r.devices[0].pushed = Some(2);
    r.devices[0].rollback = Some(3);
    let obs = |d: &str| {
        if d == "d0" {
            applied(3, 200)
        } else {
            Observed::default()
        }
    };
    let s: Vec<DeviceStatus> = r
        .devices
        .iter()
        .map(|m| member_status(&r, m, &obs(&m.device), 300))
        .collect();
    assert_eq!(s[0], DeviceStatus::Applied);
    assert_eq!(decide(&r, &s, 300), Decision::FinishRollback);
    // One still to be offered its previous version: not finished.
    r.devices[1].pushed = Some(2);
    let s: Vec<DeviceStatus> = r
        .devices
        .iter()
        .map(|m| member_status(&r, m, &obs(&m.device), 300))
        .collect();
    assert_eq!(decide(&r, &s, 300), Decision::Wait);
}

#[test]
fn a_rollout_reads_back_as_itself() {
    let r = rollout(3, &[1, 3], 1);
    let back: Rollout =
        serde_json::from_str(&serde_json::to_string(&r).expect("json")).expect("read");
    assert_eq!(back, r);
    assert!(valid_id("r-20261202-1a2b"));
    assert!(!valid_id("r-../x") && !valid_id("x-1"));
}

proptest::proptest! {
    #[test]
    fn any_plan_covers_every_device_once_in_growing_waves(
        total in 0usize..20_000,
        shares in proptest::collection::btree_set(1u32..10_000, 0..6),
        min_wave in 0usize..50,
    ) {
        let mut s: Vec<WaveStep> = shares.into_iter().map(WaveStep::Share).collect();
        s.push(WaveStep::Share(10_000));
        let ends = plan(total, &s, min_wave);
        proptest::prop_assert_eq!(ends.last().copied().unwrap_or(0), total);
        for w in ends.windows(2) {
            proptest::prop_assert!(w[1] > w[0]);
            // Every wave but the last adds at least min_wave.
            proptest::prop_assert!(w[1] - w[0] >= min_wave.max(1) || w[1] == total);
        }
        proptest::prop_assert!(ends.len() <= s.len() + 1);
    }

    #[test]
    fn any_waves_text_parses_or_is_refused(s in ".{0,40}") {
        let _ = parse_waves(&s);
        let _ = FailureLimit::parse(&s);
    }
}

fn box_firmware(at: i64, f: FirmwareStatus) -> Observed {
    Observed {
        heartbeat: Some((at, 0)),
        firmware: Some(f),
        ..Observed::default()
    }
}

#[test]
fn a_box_firmware_report_means_what_it_says() {
    let fw = FirmwareRollout {
        version: "2.0".into(),
        trial_ms: 10_000,
    };
    let offered = 1_000;
    let on = |running: &str, phase: &str| FirmwareStatus {
        running: running.into(),
        phase: phase.into(),
        target: (phase != "idle").then(|| "2.0".to_owned()),
        ..FirmwareStatus::default()
    };
    let st = |obs: &Observed, now| firmware_status(&fw, offered, obs, now);
    // Fetching, staged, on trial: pending while it is heard from.
    for phase in ["writing", "staged"] {
        assert_eq!(
            st(&box_firmware(20_000, on("1.0", phase)), 25_000),
            DeviceStatus::Pending
        );
    }
    assert_eq!(
        st(&box_firmware(20_000, on("2.0", "trial")), 25_000),
        DeviceStatus::Pending
    );
    // Committed: running it off trial, heard from since the offer.
    let mut done = on("2.0", "report");
    done.outcome = Some(Outcome::Committed {
        version: "2.0".into(),
        security_version: 3,
    });
    assert_eq!(
        st(&box_firmware(20_000, done.clone()), 25_000),
        DeviceStatus::Applied
    );
    assert_eq!(
        st(&box_firmware(20_000, on("2.0", "idle")), 25_000),
        DeviceStatus::Applied
    );
    // A heartbeat from before the offer proves nothing.
    assert_eq!(
        st(&box_firmware(500, on("2.0", "idle")), 2_000),
        DeviceStatus::Pending
    );
    // Rolled back: reverted, with the failed boot's last journal line.
    let mut back = on("1.0", "report");
    back.outcome = Some(Outcome::RolledBack {
        version: "2.0".into(),
        running: "1.0".into(),
    });
    back.journal = vec!["gatewayd: no hub".into()];
    let s = st(&box_firmware(20_000, back), 25_000);
    assert!(
        matches!(&s, DeviceStatus::Reverted(why) if why.contains("back on 1.0") && why.contains("no hub")),
        "{s:?}"
    );
    // Once the report is acknowledged, the failed list still says so.
    let mut later = on("1.0", "idle");
    later.failed = vec!["2.0".into()];
    assert!(matches!(
        st(&box_firmware(20_000, later), 25_000),
        DeviceStatus::Reverted(_)
    ));
    // The updater refused it (a bad signature, a downgrade): failed.
    let mut refused = on("1.0", "idle");
    refused.error = Some((
        "2.0".into(),
        "offer refused: security_version 1 is below 3".into(),
    ));
    assert!(matches!(
        st(&box_firmware(20_000, refused.clone()), 25_000),
        DeviceStatus::Failed(why) if why.contains("below 3")
    ));
    // ...but a refusal of another version is not this rollout's.
    refused.error = Some(("1.5".into(), "no".into()));
    assert_eq!(
        st(&box_firmware(20_000, refused), 25_000),
        DeviceStatus::Pending
    );
    // Silent: not heard from for twice the trial time, since the offer or
    // since its last heartbeat, whichever is later.
    assert_eq!(
        st(&Observed::default(), offered + 20_000),
        DeviceStatus::Pending
    );
    assert_eq!(
        st(&Observed::default(), offered + 20_001),
        DeviceStatus::Silent
    );
    assert_eq!(
        st(&box_firmware(30_000, on("2.0", "trial")), 50_000),
        DeviceStatus::Pending
    );
    assert_eq!(
        st(&box_firmware(30_000, on("2.0", "trial")), 50_001),
        DeviceStatus::Silent
    );
    assert!(!DeviceStatus::Pending.is_failure() && DeviceStatus::Silent.is_failure());
}

#[test]
fn a_firmware_rollout_pauses_past_its_failures() {
    let mut r = rollout(3, &[1, 3], 0);
    r.template = String::new();
    r.firmware = Some(FirmwareRollout {
        version: "2.0".into(),
        trial_ms: 10_000,
    });
    r.max_failures = 0;
    let waiting = Observed::default();
    let st: Vec<DeviceStatus> = r
        .devices
        .iter()
        .map(|m| member_status(&r, m, &waiting, 0))
        .collect();
    assert!(st.iter().all(|s| *s == DeviceStatus::Waiting));
    assert_eq!(decide(&r, &st, 0), Decision::StartWave(0));
    r.wave_started_ms.push(1_000);
    let ok = box_firmware(
        5_000,
        FirmwareStatus {
            running: "2.0".into(),
            phase: "idle".into(),
            ..FirmwareStatus::default()
        },
    );
    let st: Vec<DeviceStatus> = r
        .devices
        .iter()
        .map(|m| member_status(&r, m, &ok, 6_000))
        .collect();
    assert_eq!(st[0], DeviceStatus::Applied);
    assert_eq!(st[1], DeviceStatus::Waiting);
    assert_eq!(decide(&r, &st, 6_000), Decision::StartWave(1));
    r.wave_started_ms.push(7_000);
    let st = vec![
        DeviceStatus::Applied,
        DeviceStatus::Reverted("x".into()),
        DeviceStatus::Pending,
    ];
    assert!(matches!(decide(&r, &st, 8_000), Decision::Pause(why) if why.contains("d1")));
}
