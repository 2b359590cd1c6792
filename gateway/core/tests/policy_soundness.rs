//! Property: for any configuration the checker accepts, the run-time policy allows
//! exactly the crossings that the boundary rules (restated independently below)
//! do not forbid. In particular no accepted configuration ever yields an allowed
//! crossing that the rules forbid.

use std::cell::Cell;
use std::net::IpAddr;

use gateway_core::check;
use gateway_core::config::{Config, Format, Peer, Zone, ZoneKind};
use gateway_core::policy::{Crossing, Origin, Policy};
use gateway_core::units::Date;
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestRunner};

#[derive(Debug, Clone)]
struct ZoneM {
    kind: ZoneKind,
    classified: bool,
    level: u8,
    valid_days: Option<i64>,
}

#[derive(Debug, Clone)]
struct ServiceM {
    zone: usize,
    allow: Vec<usize>,
    allow_devices: Vec<&'static str>,
    app: bool,
}

#[derive(Debug, Clone)]
struct ChannelM {
    zone: usize,
    one_way: bool,
    formats: Vec<&'static str>,
    max_record: Option<u32>,
}

#[derive(Debug, Clone)]
struct Model {
    zones: Vec<ZoneM>,
    services: Vec<ServiceM>,
    accesses: Vec<usize>,
    channels: Vec<ChannelM>,
    retention: u32,
    decide_offset: i64,
}

fn zone_m(first: Option<ZoneKind>) -> impl Strategy<Value = ZoneM> {
    let kinds = prop_oneof![
        4 => Just(ZoneKind::Legacy),
        1 => Just(ZoneKind::Intranet),
        2 => Just(ZoneKind::Extranet),
        2 => Just(ZoneKind::Internet),
    ];
    let kind = match first {
        Some(k) => Just(k).boxed(),
        None => kinds.boxed(),
    };
    (
        kind,
        any::<bool>(),
        1u8..=4,
        prop::option::weighted(0.9, -60i64..400),
    )
        .prop_map(|(kind, c, level, valid_days)| ZoneM {
            kind,
            classified: match kind {
                ZoneKind::Legacy => c,
                ZoneKind::Intranet => true,
                _ => false,
            },
            level,
            valid_days,
        })
}

fn model() -> impl Strategy<Value = Model> {
    let provincial = prop_oneof![3 => Just(ZoneKind::Extranet), 1 => Just(ZoneKind::Intranet)];
    let zones = (
        zone_m(Some(ZoneKind::Legacy)),
        provincial.prop_flat_map(|k| zone_m(Some(k))),
        prop::collection::vec(zone_m(None), 0..=2),
    )
        .prop_map(|(a, b, rest)| [vec![a, b], rest].concat());
    // Real configs mostly get classification and levels right: bias towards that,
    // so that enough generated configs are accepted for the property to bite.
    let zones = (zones, prop::bool::weighted(0.8), prop::bool::weighted(0.5)).prop_map(
        |(mut zones, fix_class, fix_level)| {
            if fix_class {
                zones[0].classified = zones[1].kind == ZoneKind::Intranet;
            }
            if fix_level {
                zones[0].level = zones[1].level;
            }
            zones
        },
    );
    zones.prop_flat_map(|zones| {
        let n = zones.len();
        // Mostly the first (legacy) zone, sometimes any zone (then compile refuses).
        let home = move || prop_oneof![6 => Just(0usize), 1 => 0..n];
        let service = (
            home(),
            prop::collection::vec(0..n, 0..=2),
            prop::sample::subsequence(vec!["dev-a", "dev-b"], 0..=2),
            prop::bool::weighted(0.7),
        )
            .prop_map(|(zone, allow, allow_devices, app)| ServiceM {
                zone,
                allow,
                allow_devices,
                app,
            });
        let channel = (
            home(),
            any::<bool>(),
            prop::sample::subsequence(vec!["json", "xml", "csv"], 0..=3),
            prop::option::weighted(0.8, 1u32..4096),
        )
            .prop_map(|(zone, one_way, formats, max_record)| ChannelM {
                zone,
                one_way,
                formats,
                max_record,
            });
        (
            Just(zones),
            prop::collection::vec(service, 0..=3),
            prop::collection::vec(home(), 0..=2),
            prop::collection::vec(channel, 0..=2),
            prop_oneof![1 => Just(90u32), 6 => Just(180), 2 => Just(400)],
            -5i64..420,
        )
            .prop_map(
                |(zones, services, accesses, channels, retention, decide_offset)| Model {
                    zones,
                    services,
                    accesses,
                    channels,
                    retention,
                    decide_offset,
                },
            )
    })
}

fn today() -> Date {
    Date::new(2026, 11, 26).expect("date")
}

fn render(m: &Model) -> String {
    let mut s = String::from(
        "[node]\nid = \"jl-gat-0001\"\nrole = \"edge\"\nstate_dir = \"/var/lib/gatewayd\"\n\n[uplink]\nhubs = [\"hub:7443\"]\nca = \"/c\"\ncert = \"/d\"\nkey = \"/k\"\n",
    );
    s += &format!("\n[audit]\nretention_days = {}\n", m.retention);
    for (i, z) in m.zones.iter().enumerate() {
        s += &format!(
            "\n[[zone]]\nname = \"z{i}\"\nkind = \"{}\"\nlevel = {}\nnetworks = [\"10.{i}.0.0/16\"]\n",
            z.kind.as_str(),
            z.level
        );
        if z.kind == ZoneKind::Legacy {
            s += &format!("classified = {}\n", z.classified);
        }
        if let Some(d) = z.valid_days {
            s += &format!(
                "assessment = {{ id = \"A{i}\", valid_until = {} }}\n",
                today().add_days(d)
            );
        }
    }
    for (i, v) in m.services.iter().enumerate() {
        let mut allow: Vec<String> = v.allow.iter().map(|z| format!("\"z{z}\"")).collect();
        allow.extend(v.allow_devices.iter().map(|d| format!("\"{d}\"")));
        allow.sort();
        allow.dedup();
        s += &format!(
            "\n[[service]]\nname = \"s{i}\"\nzone = \"z{}\"\ntarget = \"10.{}.1.1:80\"\nallow = [{}]\n",
            v.zone,
            v.zone,
            allow.join(", ")
        );
        if v.app {
            s += "app_protocol = \"http\"\n";
        }
    }
    for (i, z) in m.accesses.iter().enumerate() {
        s += &format!(
            "\n[[access]]\nlisten = \"10.{z}.0.{}:15000\"\nzone = \"z{z}\"\nservice = \"dev-b/db\"\n",
            i + 1
        );
    }
    for (i, c) in m.channels.iter().enumerate() {
        s += &format!(
            "\n[[channel]]\nname = \"c{i}\"\nzone = \"z{}\"\none_way = {}\n",
            c.zone, c.one_way
        );
        if !c.formats.is_empty() {
            let f: Vec<String> = c.formats.iter().map(|f| format!("\"{f}\"")).collect();
            s += &format!("formats = [{}]\n", f.join(", "));
        }
        if let Some(b) = c.max_record {
            s += &format!("max_record_bytes = \"{b}B\"\n");
        }
    }
    s
}

/// The rules, restated from DESIGN.md without the engine's code.
fn forbidden(cfg: &Config, c: &Crossing<'_>, date: Date) -> bool {
    let has = |k: ZoneKind| cfg.zones.iter().any(|z| z.kind == k);
    let intranet_mixed =
        has(ZoneKind::Intranet) && (has(ZoneKind::Extranet) || has(ZoneKind::Internet));
    let provincial: Vec<&Zone> = cfg
        .zones
        .iter()
        .filter(|z| matches!(z.kind, ZoneKind::Intranet | ZoneKind::Extranet))
        .collect();
    let uplink = if provincial.len() == 1 {
        Some(provincial[0])
    } else {
        None
    };
    // Rules 1 and 2 for a pair of zones.
    let bad_pair = |a: &Zone, b: &Zone| {
        a.kind == ZoneKind::Internet
            || b.kind == ZoneKind::Internet
            || intranet_mixed
            || a.classified != b.classified
    };
    // Rule 3.
    let expired = |z: &Zone| {
        z.kind == ZoneKind::Legacy && z.assessment.as_ref().is_none_or(|a| date > a.valid_until)
    };
    let zone_of = |ip: IpAddr| {
        cfg.zones
            .iter()
            .find(|z| z.networks.iter().any(|n| n.contains(ip)))
    };
    let Some(edge) = cfg.edge() else { return true };
    match *c {
        Crossing::ServiceOpen { service, origin } => {
            let Some(s) = edge.services.iter().find(|s| s.name == service) else {
                return true;
            };
            let Some(to) = cfg.zone(&s.zone) else {
                return true;
            };
            let (from, peer) = match origin {
                Origin::Local { client } => match zone_of(client) {
                    Some(z) => (z, Peer::Zone(z.name.clone())),
                    None => return true,
                },
                Origin::Provincial { client } => match uplink {
                    Some(u) if zone_of(client).is_some_and(|z| z.name == u.name) => {
                        (u, Peer::Zone(u.name.clone()))
                    }
                    _ => return true,
                },
                Origin::Device(d) => match uplink {
                    Some(u) => (u, Peer::Device(d.to_owned())),
                    None => return true,
                },
            };
            let level = from.level.max(to.level).get();
            !s.allow.contains(&peer)
                || bad_pair(from, to)
                || from.level > to.level // rule 4: relays never run downward
                || expired(from)
                || expired(to)
                || (level >= 3 && s.app_protocol.is_none()) // rule 5
        }
        Crossing::AccessOpen { listen, client } => {
            let Some(a) = edge.accesses.iter().find(|a| a.listen == listen) else {
                return true;
            };
            let Some(from) = cfg.zone(&a.zone) else {
                return true;
            };
            let Some(to) = uplink else { return true };
            zone_of(client).is_none_or(|z| z.name != from.name)
                || bad_pair(from, to)
                || from.level > to.level
                || expired(from)
                || expired(to)
        }
        Crossing::IngestOpen { zone, client } => zone_of(client).is_none_or(|z| z.name != zone),
        Crossing::ChannelRecord {
            channel,
            format,
            bytes,
        } => {
            let Some(ch) = edge.channels.iter().find(|c| c.name == channel) else {
                return true;
            };
            let Some(from) = cfg.zone(&ch.zone) else {
                return true;
            };
            let Some(to) = uplink else { return true };
            let checked = !ch.formats.is_empty() && ch.max_record_bytes.is_some();
            let level = from.level.max(to.level).get();
            bad_pair(from, to)
                || (from.level > to.level && !(ch.one_way && checked))
                || expired(from)
                || expired(to)
                || (level >= 3 && !checked)
                || (!ch.formats.is_empty() && !ch.formats.contains(&format))
                || ch.max_record_bytes.is_some_and(|m| bytes > m.0)
        }
        Crossing::PublishOpen { .. } | Crossing::Transit { .. } => true,
    }
}

#[test]
fn accepted_configs_never_allow_a_forbidden_crossing() {
    let accepted = Cell::new(0u32);
    let allowed = Cell::new(0u32);
    let denied = Cell::new(0u32);
    let cases = 2000;
    let mut runner = TestRunner::new(PtConfig {
        cases,
        failure_persistence: None,
        ..PtConfig::default()
    });
    let result = runner.run(&model(), |m| {
        let src = render(&m);
        let checked = check::load(&src, today());
        let Some(cfg) = checked.config else {
            if std::env::var_os("SOUNDNESS_DEBUG").is_some() {
                for d in checked.diagnostics.iter().filter(|d| d.is_error()) {
                    eprintln!(
                        "REJ {}",
                        d.rule.map_or_else(
                            || d.message.split(':').next().unwrap_or("").to_owned(),
                            |r| r.to_string()
                        )
                    );
                }
            }
            return Ok(());
        };
        accepted.set(accepted.get() + 1);

        let policy = Policy::new(cfg.clone());
        let date = today().add_days(m.decide_offset);
        let ips: Vec<IpAddr> = (0..cfg.zones.len())
            .map(|i| format!("10.{i}.9.9").parse().expect("ip"))
            .chain(["192.0.2.1".parse().expect("ip")])
            .collect();
        let mut crossings: Vec<Crossing<'_>> = Vec::new();
        let edge = cfg.edge().expect("edge");
        for s in &edge.services {
            for ip in &ips {
                crossings.push(Crossing::ServiceOpen {
                    service: &s.name,
                    origin: Origin::Local { client: *ip },
                });
                crossings.push(Crossing::ServiceOpen {
                    service: &s.name,
                    origin: Origin::Provincial { client: *ip },
                });
            }
            for d in ["dev-a", "dev-b", "dev-c"] {
                crossings.push(Crossing::ServiceOpen {
                    service: &s.name,
                    origin: Origin::Device(d),
                });
            }
        }
        for a in &edge.accesses {
            for ip in &ips {
                crossings.push(Crossing::AccessOpen {
                    listen: a.listen,
                    client: *ip,
                });
            }
        }
        for z in &cfg.zones {
            for ip in &ips {
                crossings.push(Crossing::IngestOpen {
                    zone: &z.name,
                    client: *ip,
                });
            }
        }
        for c in &edge.channels {
            for format in [
                Format::Json,
                Format::Xml,
                Format::Csv,
                Format::Text,
                Format::Raw,
            ] {
                for bytes in [1, 100, 5000] {
                    crossings.push(Crossing::ChannelRecord {
                        channel: &c.name,
                        format,
                        bytes,
                    });
                }
            }
        }
        for c in &crossings {
            let d = policy.decide(c, date);
            let must_deny = forbidden(&cfg, c, date);
            prop_assert!(
                !(d.is_allowed() && must_deny),
                "allowed a forbidden crossing {c:?} on {date}: {d:?}\nconfig:\n{src}"
            );
            prop_assert!(
                d.is_allowed() || must_deny,
                "denied a crossing no rule forbids {c:?} on {date}: {d:?}\nconfig:\n{src}"
            );
            if d.is_allowed() {
                allowed.set(allowed.get() + 1);
            } else {
                denied.set(denied.get() + 1);
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // The property is only worth something if the generator reaches accepted
    // configs and both verdicts often.
    println!(
        "accepted {} of {cases} configs; {} crossings allowed, {} denied",
        accepted.get(),
        allowed.get(),
        denied.get()
    );
    assert!(
        accepted.get() >= cases / 20,
        "only {} of {cases} generated configs were accepted",
        accepted.get()
    );
    assert!(
        allowed.get() >= 100 && denied.get() >= 100,
        "allowed {} denied {}",
        allowed.get(),
        denied.get()
    );
}
