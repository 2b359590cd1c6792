//! Every boundary rule, at config time and at run time, with an allowed and a
//! refused case each (table-driven).

use gateway_core::check;
use gateway_core::config::{self, Format};
use gateway_core::diag::Severity;
use gateway_core::policy::{Crossing, Origin, Policy, RuleId, Verdict};
use gateway_core::units::Date;

fn day(s: &str) -> Date {
    s.parse().expect("test date")
}

const TODAY: &str = "2026-11-26";

/// An edge config: `[node]`, `[uplink]`, then `rest` verbatim.
fn edge(rest: &str) -> String {
    format!(
        r#"[node]
id = "jl-gat-0001"
role = "edge"
state_dir = "/var/lib/gatewayd"

[uplink]
hubs = ["hub1.example.gov:7443"]
ca = "/etc/gatewayd/ca.pem"
cert = "/var/lib/gatewayd/device.pem"
key = "/var/lib/gatewayd/device.key"
{rest}"#
    )
}

fn legacy(name: &str, classified: bool, level: u8, net: &str) -> String {
    format!(
        "\n[[zone]]\nname = \"{name}\"\nkind = \"legacy\"\nclassified = {classified}\nlevel = {level}\nnetworks = [\"{net}\"]\nassessment = {{ id = \"A-1\", valid_until = 2027-03-31 }}\n"
    )
}

fn zone(name: &str, kind: &str, level: u8, net: &str) -> String {
    format!(
        "\n[[zone]]\nname = \"{name}\"\nkind = \"{kind}\"\nlevel = {level}\nnetworks = [\"{net}\"]\n"
    )
}

fn service(zone: &str, target: &str, allow: &str, app: Option<&str>) -> String {
    let app = app
        .map(|a| format!("app_protocol = \"{a}\"\n"))
        .unwrap_or_default();
    format!(
        "\n[[service]]\nname = \"svc\"\nzone = \"{zone}\"\ntarget = \"{target}\"\n{app}allow = [{allow}]\n"
    )
}

fn channel(zone: &str, extra: &str) -> String {
    format!("\n[[channel]]\nname = \"ch\"\nzone = \"{zone}\"\n{extra}\n")
}

/// The rule ids of the errors found, and of the warnings.
fn rules_of(src: &str, today: &str) -> (Vec<RuleId>, Vec<RuleId>, Vec<String>) {
    let checked = check::load(src, day(today));
    let pick = |sev| {
        checked
            .diagnostics
            .iter()
            .filter(|d| d.severity == sev)
            .filter_map(|d| d.rule)
            .collect()
    };
    let all = checked
        .diagnostics
        .iter()
        .map(|d| d.render("test.toml"))
        .collect();
    (pick(Severity::Error), pick(Severity::Warning), all)
}

struct Case {
    name: &'static str,
    src: String,
    today: &'static str,
    /// `None`: accepted with no error; `Some(rule)`: refused by that rule.
    refused_by: Option<RuleId>,
}

fn ok(name: &'static str, src: String) -> Case {
    Case {
        name,
        src,
        today: TODAY,
        refused_by: None,
    }
}

fn refused(name: &'static str, src: String, rule: RuleId) -> Case {
    Case {
        name,
        src,
        today: TODAY,
        refused_by: Some(rule),
    }
}

fn cases() -> Vec<Case> {
    let ssn = legacy("ssn", false, 3, "10.20.0.0/16");
    let ext = zone("extranet", "extranet", 3, "59.72.0.0/16");
    let int = zone("intranet", "intranet", 3, "30.1.0.0/16");
    let secret = legacy("secret", true, 3, "172.16.0.0/16");
    let http_svc = |z: &str, t: &str, allow: &str| service(z, t, allow, Some("http"));
    vec![
        // R1.intranet-isolation
        ok(
            "classified legacy with intranet",
            format!(
                "{secret}{int}{}",
                http_svc("secret", "172.16.0.5:80", "\"intranet\"")
            ),
        ),
        refused(
            "intranet and extranet on one box",
            format!("{secret}{int}{ext}"),
            RuleId::IntranetIsolation,
        ),
        refused(
            "intranet and internet on one box",
            format!("{secret}{int}{}", zone("web", "internet", 1, "8.0.0.0/8")),
            RuleId::IntranetIsolation,
        ),
        // R1.classified-bridge
        refused(
            "classified legacy published to the extranet",
            format!(
                "{secret}{ext}{}",
                http_svc("secret", "172.16.0.5:80", "\"extranet\"")
            ),
            RuleId::ClassifiedBridge,
        ),
        refused(
            "classified legacy bridged to an unclassified legacy zone",
            format!(
                "{secret}{ssn}{ext}{}",
                http_svc("secret", "172.16.0.5:80", "\"ssn\"")
            ),
            RuleId::ClassifiedBridge,
        ),
        // R1.one-way-import
        ok(
            "unclassified legacy to extranet",
            format!(
                "{ssn}{ext}{}",
                http_svc("ssn", "10.20.1.15:8080", "\"extranet\"")
            ),
        ),
        refused(
            "unclassified legacy published to the intranet",
            format!(
                "{ssn}{int}{}",
                http_svc("ssn", "10.20.1.15:8080", "\"intranet\"")
            ),
            RuleId::OneWayImport,
        ),
        refused(
            "unclassified channel into the intranet",
            format!(
                "{ssn}{int}{}",
                channel("ssn", "formats = [\"json\"]\nmax_record_bytes = \"1MiB\"")
            ),
            RuleId::OneWayImport,
        ),
        // R2.internet
        ok(
            "internet zone declared, not bridged",
            format!("{ssn}{ext}{}", zone("web", "internet", 1, "8.0.0.0/8")),
        ),
        refused(
            "service allowed from the internet",
            format!(
                "{ssn}{ext}{}{}",
                zone("web", "internet", 1, "8.0.0.0/8"),
                http_svc("ssn", "10.20.1.15:8080", "\"web\"")
            ),
            RuleId::Internet,
        ),
        // R3
        refused(
            "bridged legacy zone without assessment",
            format!(
                "{}{ext}{}",
                "\n[[zone]]\nname = \"ssn\"\nkind = \"legacy\"\nclassified = false\nlevel = 3\nnetworks = [\"10.20.0.0/16\"]\n",
                http_svc("ssn", "10.20.1.15:8080", "\"extranet\"")
            ),
            RuleId::AssessmentMissing,
        ),
        Case {
            name: "assessment ended",
            src: format!(
                "{ssn}{ext}{}",
                http_svc("ssn", "10.20.1.15:8080", "\"extranet\"")
            ),
            today: "2027-04-01",
            refused_by: Some(RuleId::AssessmentExpired),
        },
        Case {
            name: "assessment valid on its last day",
            src: format!(
                "{ssn}{ext}{}",
                http_svc("ssn", "10.20.1.15:8080", "\"extranet\"")
            ),
            today: "2027-03-31",
            refused_by: None,
        },
        // R4.level-down
        refused(
            "L4 legacy client reaches out to the L3 extranet",
            format!(
                "{}{ext}\n[[access]]\nlisten = \"10.20.0.1:15432\"\nzone = \"ssn\"\nservice = \"jl-gat-0007/population-db\"\n",
                legacy("ssn", false, 4, "10.20.0.0/16")
            ),
            RuleId::LevelDown,
        ),
        ok(
            "L3 extranet client reaches an L4 legacy service",
            format!(
                "{}{ext}{}",
                legacy("ssn", false, 4, "10.20.0.0/16"),
                http_svc("ssn", "10.20.1.15:8080", "\"extranet\"")
            ),
        ),
        refused(
            "L4 channel down to L3 without one_way",
            format!(
                "{}{ext}{}",
                legacy("ssn", false, 4, "10.20.0.0/16"),
                channel("ssn", "formats = [\"json\"]\nmax_record_bytes = \"1MiB\"")
            ),
            RuleId::LevelDown,
        ),
        ok(
            "L4 channel down to L3, one-way and content-checked",
            format!(
                "{}{ext}{}",
                legacy("ssn", false, 4, "10.20.0.0/16"),
                channel(
                    "ssn",
                    "one_way = true\nformats = [\"json\"]\nmax_record_bytes = \"1MiB\""
                )
            ),
        ),
        // R5.app-protocol
        refused(
            "L3 service without app_protocol",
            format!(
                "{ssn}{ext}{}",
                service("ssn", "10.20.1.15:8080", "\"extranet\"", None)
            ),
            RuleId::AppProtocol,
        ),
        ok(
            "L2 service without app_protocol",
            format!(
                "{}{}{}",
                legacy("ssn", false, 2, "10.20.0.0/16"),
                zone("extranet", "extranet", 2, "59.72.0.0/16"),
                service("ssn", "10.20.1.15:8080", "\"extranet\"", None)
            ),
        ),
        // R5.channel-content
        refused(
            "L3 channel without formats",
            format!(
                "{ssn}{ext}{}",
                channel("ssn", "max_record_bytes = \"1MiB\"")
            ),
            RuleId::ChannelContent,
        ),
        refused(
            "L3 channel without record limit",
            format!("{ssn}{ext}{}", channel("ssn", "formats = [\"csv\"]")),
            RuleId::ChannelContent,
        ),
        ok(
            "L3 channel with formats and limit",
            format!(
                "{ssn}{ext}{}",
                channel("ssn", "formats = [\"csv\"]\nmax_record_bytes = \"1MiB\"")
            ),
        ),
        // R5.address (config face: listeners and targets inside their zone)
        refused(
            "ingest listening outside its zone",
            format!("{ssn}{ext}\n[[ingest]]\nzone = \"ssn\"\nlisten = \"59.72.0.1:8480\"\n"),
            RuleId::Address,
        ),
        refused(
            "ingest listening on every interface",
            format!("{ssn}{ext}\n[[ingest]]\nzone = \"ssn\"\nlisten = \"0.0.0.0:8480\"\n"),
            RuleId::Address,
        ),
        refused(
            "service target outside its zone",
            format!(
                "{ssn}{ext}{}",
                http_svc("ssn", "59.72.1.15:8080", "\"extranet\"")
            ),
            RuleId::Address,
        ),
        ok(
            "ingest inside its zone",
            format!("{ssn}{ext}\n[[ingest]]\nzone = \"ssn\"\nlisten = \"10.20.0.1:8480\"\n"),
        ),
        // R6.retention
        refused(
            "retention below 180 days",
            format!("{ssn}{ext}\n[audit]\nretention_days = 90\n"),
            RuleId::Retention,
        ),
        ok(
            "retention of 180 days",
            format!("{ssn}{ext}\n[audit]\nretention_days = 180\n"),
        ),
    ]
}

#[test]
fn every_rule_has_an_allowed_and_a_refused_case() {
    for case in cases() {
        let (errors, _warnings, all) = rules_of(&edge(&case.src), case.today);
        match case.refused_by {
            None => assert!(
                all.iter().all(|d| !d.starts_with("error")),
                "{}: expected no error, got {all:#?}",
                case.name
            ),
            Some(rule) => assert!(
                errors.contains(&rule),
                "{}: expected {rule}, got {all:#?}",
                case.name
            ),
        }
    }
}

#[test]
fn every_refusing_rule_is_covered_by_a_case() {
    let covered: Vec<RuleId> = cases().iter().filter_map(|c| c.refused_by).collect();
    let allow_or_warn = [
        RuleId::DefaultDeny, // run time only: see run_time_decisions
        RuleId::AllowService,
        RuleId::AllowAccess,
        RuleId::AllowChannel,
        RuleId::AllowPublish,
        RuleId::AllowTransit,
        RuleId::AssessmentExpiring, // a warning: see assessment_expiry_warns
        RuleId::HttpAllow,          // run time only: see the sniff tests and tests/relay.rs
        RuleId::PgLogin,            // run time only: tests/e2e/postgres.rs
        RuleId::PgReadOnly,         // run time only: the read_only tests and tests/e2e/postgres.rs
    ];
    for rule in RuleId::ALL {
        assert!(
            covered.contains(rule) || allow_or_warn.contains(rule),
            "no config case for {rule}"
        );
    }
}

#[test]
fn assessment_expiry_warns_30_days_ahead() {
    let src = edge(&format!(
        "{}{}{}",
        legacy("ssn", false, 3, "10.20.0.0/16"),
        zone("extranet", "extranet", 3, "59.72.0.0/16"),
        service("ssn", "10.20.1.15:8080", "\"extranet\"", Some("http"))
    ));
    let (errors, warnings, _) = rules_of(&src, "2027-03-01");
    assert!(errors.is_empty());
    assert_eq!(warnings, vec![RuleId::AssessmentExpiring]);
    let (_, warnings, _) = rules_of(&src, "2027-02-28");
    assert!(warnings.is_empty(), "31 days ahead is not yet a warning");
}

#[test]
fn one_way_import_error_names_the_import_device() {
    let src = edge(&format!(
        "{}{}{}",
        legacy("ssn", false, 3, "10.20.0.0/16"),
        zone("intranet", "intranet", 3, "30.1.0.0/16"),
        service("ssn", "10.20.1.15:8080", "\"intranet\"", Some("http"))
    ));
    let (_, _, all) = rules_of(&src, TODAY);
    assert!(
        all.iter().any(|d| d.contains("one-way import device")),
        "{all:#?}"
    );
}

/// A policy over a config that passed every check.
fn policy(src: &str) -> Policy {
    let checked = check::load(&edge(src), day(TODAY));
    let msgs: Vec<String> = checked.diagnostics.iter().map(|d| d.render("t")).collect();
    Policy::new(
        checked
            .config
            .unwrap_or_else(|| panic!("config refused: {msgs:#?}")),
    )
}

/// A policy over a config that only passed compilation (not the boundary rules):
/// the run-time face must refuse on its own what the checker would have refused.
fn unchecked_policy(src: &str) -> Policy {
    let (config, diags) = config::compile::compile(&edge(src));
    Policy::new(config.unwrap_or_else(|| panic!("config does not compile: {diags:#?}")))
}

#[test]
fn run_time_decisions() {
    let ext = zone("extranet", "extranet", 3, "59.72.0.0/16");
    let p = policy(&format!(
        "{}{}{ext}{}{}\n[[access]]\nlisten = \"10.20.0.1:15432\"\nzone = \"ssn\"\nservice = \"jl-gat-0007/population-db\"\n",
        legacy("ssn", false, 3, "10.20.0.0/16"),
        legacy("lab", false, 3, "10.30.0.0/16"),
        service(
            "ssn",
            "10.20.1.15:8080",
            "\"extranet\", \"jl-gat-0007\"",
            Some("http")
        ),
        channel("ssn", "formats = [\"json\"]\nmax_record_bytes = \"1KiB\""),
    ));
    let ip = |s: &str| s.parse().expect("ip");
    let today = day(TODAY);
    let svc = |origin| Crossing::ServiceOpen {
        service: "svc",
        origin,
    };
    let rec = |format, bytes| Crossing::ChannelRecord {
        channel: "ch",
        format,
        bytes,
    };
    let table: Vec<(&str, Crossing<'_>, Date, Verdict, RuleId)> = vec![
        (
            "provincial client allowed",
            svc(Origin::Provincial {
                client: ip("59.72.3.4"),
            }),
            today,
            Verdict::Allow,
            RuleId::AllowService,
        ),
        (
            "allowed device",
            svc(Origin::Device("jl-gat-0007")),
            today,
            Verdict::Allow,
            RuleId::AllowService,
        ),
        (
            "device not in allow list",
            svc(Origin::Device("jl-gat-0099")),
            today,
            Verdict::Deny,
            RuleId::DefaultDeny,
        ),
        (
            "zone not in allow list",
            svc(Origin::Local {
                client: ip("10.30.0.9"),
            }),
            today,
            Verdict::Deny,
            RuleId::DefaultDeny,
        ),
        (
            "client in no zone",
            svc(Origin::Local {
                client: ip("192.0.2.1"),
            }),
            today,
            Verdict::Deny,
            RuleId::Address,
        ),
        (
            "provincial client outside the zone",
            svc(Origin::Provincial {
                client: ip("198.51.100.1"),
            }),
            today,
            Verdict::Deny,
            RuleId::Address,
        ),
        (
            "unknown service",
            Crossing::ServiceOpen {
                service: "nope",
                origin: Origin::Device("jl-gat-0007"),
            },
            today,
            Verdict::Deny,
            RuleId::DefaultDeny,
        ),
        (
            "assessment ended",
            svc(Origin::Device("jl-gat-0007")),
            day("2027-04-01"),
            Verdict::Deny,
            RuleId::AssessmentExpired,
        ),
        (
            "access from its zone",
            Crossing::AccessOpen {
                listen: "10.20.0.1:15432".parse().expect("addr"),
                client: ip("10.20.5.5"),
            },
            today,
            Verdict::Allow,
            RuleId::AllowAccess,
        ),
        (
            "access from another zone",
            Crossing::AccessOpen {
                listen: "10.20.0.1:15432".parse().expect("addr"),
                client: ip("10.30.5.5"),
            },
            today,
            Verdict::Deny,
            RuleId::Address,
        ),
        (
            "ingest from its zone",
            Crossing::IngestOpen {
                zone: "ssn",
                client: ip("10.20.7.7"),
            },
            today,
            Verdict::Allow,
            RuleId::AllowChannel,
        ),
        (
            "ingest from another zone",
            Crossing::IngestOpen {
                zone: "ssn",
                client: ip("10.30.7.7"),
            },
            today,
            Verdict::Deny,
            RuleId::Address,
        ),
        (
            "ingest from the provincial side",
            Crossing::IngestOpen {
                zone: "ssn",
                client: ip("59.72.1.1"),
            },
            today,
            Verdict::Deny,
            RuleId::Address,
        ),
        (
            "access on an unknown listener",
            Crossing::AccessOpen {
                listen: "10.20.0.1:1".parse().expect("addr"),
                client: ip("10.20.5.5"),
            },
            today,
            Verdict::Deny,
            RuleId::DefaultDeny,
        ),
        (
            "json record",
            rec(Format::Json, 100),
            today,
            Verdict::Allow,
            RuleId::AllowChannel,
        ),
        (
            "xml record refused",
            rec(Format::Xml, 100),
            today,
            Verdict::Deny,
            RuleId::ChannelContent,
        ),
        (
            "record too large",
            rec(Format::Json, 1025),
            today,
            Verdict::Deny,
            RuleId::ChannelContent,
        ),
        (
            "record for unknown channel",
            Crossing::ChannelRecord {
                channel: "nope",
                format: Format::Json,
                bytes: 1,
            },
            today,
            Verdict::Deny,
            RuleId::DefaultDeny,
        ),
        (
            "publish on an edge",
            Crossing::PublishOpen {
                listen: "59.72.1.10:18080".parse().expect("addr"),
                client: ip("59.72.3.4"),
            },
            today,
            Verdict::Deny,
            RuleId::DefaultDeny,
        ),
    ];
    for (name, crossing, date, verdict, rule) in table {
        let d = p.decide(&crossing, date);
        assert_eq!((d.verdict, d.rule), (verdict, rule), "{name}: {d:?}");
        assert!(!d.reason.is_empty(), "{name}: a decision always says why");
    }
}

#[test]
fn run_time_refuses_bridges_the_checker_forbids() {
    let ip = |s: &str| s.parse().expect("ip");
    let today = day(TODAY);
    let cases: Vec<(&str, String, Crossing<'_>, RuleId)> = vec![
        (
            "classified to extranet",
            format!(
                "{}{}{}",
                legacy("s", true, 3, "172.16.0.0/16"),
                zone("extranet", "extranet", 3, "59.72.0.0/16"),
                service("s", "172.16.0.5:80", "\"extranet\"", Some("http"))
            ),
            Crossing::ServiceOpen {
                service: "svc",
                origin: Origin::Provincial {
                    client: ip("59.72.0.9"),
                },
            },
            RuleId::ClassifiedBridge,
        ),
        (
            "unclassified to intranet",
            format!(
                "{}{}{}",
                legacy("s", false, 3, "10.20.0.0/16"),
                zone("intranet", "intranet", 3, "30.1.0.0/16"),
                service("s", "10.20.0.5:80", "\"intranet\"", Some("http"))
            ),
            Crossing::ServiceOpen {
                service: "svc",
                origin: Origin::Provincial {
                    client: ip("30.1.0.9"),
                },
            },
            RuleId::OneWayImport,
        ),
        (
            "level down",
            format!(
                "{}{}\n[[access]]\nlisten = \"10.20.0.1:15432\"\nzone = \"s\"\nservice = \"jl-gat-0007/db\"\n",
                legacy("s", false, 4, "10.20.0.0/16"),
                zone("extranet", "extranet", 3, "59.72.0.0/16")
            ),
            Crossing::AccessOpen {
                listen: "10.20.0.1:15432".parse().expect("addr"),
                client: ip("10.20.0.9"),
            },
            RuleId::LevelDown,
        ),
        (
            "missing app_protocol",
            format!(
                "{}{}{}",
                legacy("s", false, 3, "10.20.0.0/16"),
                zone("extranet", "extranet", 3, "59.72.0.0/16"),
                service("s", "10.20.0.5:80", "\"extranet\"", None)
            ),
            Crossing::ServiceOpen {
                service: "svc",
                origin: Origin::Provincial {
                    client: ip("59.72.0.9"),
                },
            },
            RuleId::AppProtocol,
        ),
        (
            "internet",
            format!(
                "{}{}{}{}",
                legacy("s", false, 1, "10.20.0.0/16"),
                zone("extranet", "extranet", 1, "59.72.0.0/16"),
                zone("web", "internet", 1, "8.0.0.0/8"),
                service("s", "10.20.0.5:80", "\"web\"", None)
            ),
            Crossing::ServiceOpen {
                service: "svc",
                origin: Origin::Local {
                    client: ip("8.8.8.8"),
                },
            },
            RuleId::Internet,
        ),
    ];
    for (name, src, crossing, rule) in cases {
        let d = unchecked_policy(&src).decide(&crossing, today);
        assert_eq!((d.verdict, d.rule), (Verdict::Deny, rule), "{name}: {d:?}");
    }
}

#[test]
fn hub_decides_publish_and_transit() {
    let src = r#"
[node]
id = "jl-hub-01"
role = "hub"
state_dir = "/var/lib/gatewayd"

[hub]
listen = "59.72.1.10:7443"
api = "59.72.1.10:9443"
ca_cert = "/etc/gatewayd/ca.pem"
ca_key = "/etc/gatewayd/ca.key"
cert = "/etc/gatewayd/hub.pem"
key = "/etc/gatewayd/hub.key"

[[zone]]
name = "extranet"
kind = "extranet"
level = 3
networks = ["59.72.0.0/16"]

[[publish]]
service = "jl-gat-0001/pension-query"
zone = "extranet"
listen = "59.72.1.10:18080"
"#;
    let checked = check::load(src, day(TODAY));
    let p = Policy::new(checked.config.expect("hub config"));
    let today = day(TODAY);
    let listen = "59.72.1.10:18080".parse().expect("addr");
    let cases: Vec<(Crossing<'_>, Verdict, RuleId)> = vec![
        (
            Crossing::Transit {
                from: "jl-gat-0001",
                to: "jl-gat-0007",
            },
            Verdict::Allow,
            RuleId::AllowTransit,
        ),
        (
            Crossing::Transit {
                from: "jl-gat-0001",
                to: "jl-gat-0001",
            },
            Verdict::Deny,
            RuleId::DefaultDeny,
        ),
        (
            Crossing::PublishOpen {
                listen,
                client: "59.72.3.4".parse().expect("ip"),
            },
            Verdict::Allow,
            RuleId::AllowPublish,
        ),
        (
            Crossing::PublishOpen {
                listen,
                client: "8.8.8.8".parse().expect("ip"),
            },
            Verdict::Deny,
            RuleId::Address,
        ),
        (
            Crossing::ServiceOpen {
                service: "x",
                origin: Origin::Device("jl-gat-0001"),
            },
            Verdict::Deny,
            RuleId::DefaultDeny,
        ),
    ];
    for (c, verdict, rule) in cases {
        let d = p.decide(&c, today);
        assert_eq!((d.verdict, d.rule), (verdict, rule), "{c:?}: {d:?}");
    }
}
