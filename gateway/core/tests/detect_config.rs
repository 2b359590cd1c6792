//! `[detect]`: defaults when absent, each key read, and each mistake located.

mod common;

use gateway_core::config::{NeverBan, compile::compile};
use gateway_core::detect::Thresholds;
use gateway_core::detect::bucket::Shape;

fn hub(detect: &str) -> String {
    format!(
        r#"[node]
id = "hub-1"
role = "hub"
state_dir = "/var/lib/gatewayd"

[hub]
listen = "127.0.0.1:7443"
api = "127.0.0.1:7444"
ca_cert = "/etc/gatewayd/ca.pem"
ca_key = "/etc/gatewayd/ca.key"
cert = "/etc/gatewayd/hub.pem"
key = "/etc/gatewayd/hub.key"
{detect}"#
    )
}

#[test]
fn absent_means_on_with_the_documented_defaults() {
    let (config, diags) = compile(&hub(""));
    let config = config.unwrap_or_else(|| panic!("{diags:?}"));
    assert!(config.detect.enabled);
    assert_eq!(config.detect.thresholds, Thresholds::default());
    let t = Thresholds::default();
    assert_eq!(t.refusals, Shape::per(10, 60_000));
    assert_eq!(t.scan.leak_ms(), 5_000);
    assert_eq!(t.handshakes.leak_ms(), 10_000);
    assert_eq!(t.ban_ms, 600_000);
    assert_eq!(t.scan_ban_ms, 4 * 3_600_000);
}

#[test]
fn every_key_is_read() {
    let (config, diags) = compile(&hub(r#"
[detect]
enabled = true
refusals = "20/2m"
scan = "30/60s"
handshake_failures = "3/30s"
protocol_violations = "7/70s"
empty_connections = "8/80s"
connections_per_second = 50
datagrams_per_second = 1000
handshakes_in_progress = 8
content_refusals = "4/40s"
ban = "15m"
scan_ban = "8h"
repeat_ban = "2w"
never_ban = ["10.9.0.1", "10.8.0.0/16", "fd00::/64", "hub-2"]
"#));
    let d = config.unwrap_or_else(|| panic!("{diags:?}")).detect;
    let t = &d.thresholds;
    assert_eq!(t.refusals, Shape::per(20, 120_000));
    assert_eq!(t.scan.leak_ms(), 2_000);
    assert_eq!(t.handshakes, Shape::per(3, 30_000));
    assert_eq!(t.protocol, Shape::per(7, 70_000));
    assert_eq!(t.empty, Shape::per(8, 80_000));
    assert_eq!(t.connections, Shape::per(50, 1_000));
    assert_eq!(t.datagrams, Shape::per(1_000, 1_000));
    assert_eq!(t.handshakes_in_progress, 8);
    assert_eq!(t.content, Shape::per(4, 40_000));
    assert_eq!((t.ban_ms, t.scan_ban_ms), (900_000, 8 * 3_600_000));
    assert_eq!(d.escalation.repeat_ms, 14 * 86_400_000);
    assert_eq!(d.never_ban.len(), 4);
    assert!(matches!(&d.never_ban[3], NeverBan::Device(id) if id == "hub-2"));
    assert!(d.exempt("10.9.0.1".parse().expect("an address"), None));
    assert!(!d.exempt("10.9.0.2".parse().expect("an address"), None));
    assert!(d.exempt("10.8.200.1".parse().expect("an address"), None));
    assert!(d.exempt("fd00::77".parse().expect("an address"), None));
    assert!(d.exempt("192.0.2.1".parse().expect("an address"), Some("hub-2")));
    assert!(!d.exempt("192.0.2.1".parse().expect("an address"), Some("hub-3")));
}

#[test]
fn each_mistake_is_located_and_explained() {
    let src = hub(r#"
[detect]
refusals = "ten in a minute"
scan = "0/5s"
ban = "forever"
connections_per_second = -1
never_ban = ["10.0.0.1/8", "Not A Device!"]
colour = "red"
"#);
    let (config, diags) = compile(&src);
    assert!(config.is_none());
    let text: Vec<String> = diags
        .iter()
        .map(|d| format!("{}:{} {}", d.location.line, d.location.column, d.message))
        .collect();
    // An unknown key stops the section at serde; the rest is checked once it is gone.
    assert!(text.iter().any(|t| t.contains("colour")), "{text:?}");
    let (config, diags) = compile(&src.replace("colour = \"red\"\n", ""));
    assert!(config.is_none());
    let text: Vec<String> = diags
        .iter()
        .map(|d| {
            format!(
                "{} {} | {}",
                d.location.line,
                d.message,
                d.hint.clone().unwrap_or_default()
            )
        })
        .collect();
    let find = |key: &str, line: usize| {
        assert!(
            text.iter().any(|t| t.starts_with(&format!("{line} {key}"))),
            "{key} at line {line}: {text:?}"
        )
    };
    find("detect.refusals", 15);
    find("detect.scan", 16);
    find("detect.ban", 17);
    find("detect.connections_per_second", 18);
    find("detect.never_ban", 19);
    assert_eq!(
        text.iter()
            .filter(|t| t.contains("detect.never_ban"))
            .count(),
        2,
        "{text:?}"
    );
    assert!(
        text.iter().any(|t| t.contains("COUNT/DURATION")),
        "{text:?}"
    );
}

#[test]
fn alarm_targets_need_their_ca_and_tls() {
    let (config, diags) = compile(&hub(r#"
[alarms]
syslog = "soc.example.gov:6514"
syslog_ca = "/etc/gatewayd/soc-ca.pem"
webhook = "https://soc.example.gov/api/alarms?src=gw"
webhook_ca = "/etc/gatewayd/soc-ca.pem"
webhook_token_file = "/etc/gatewayd/soc.token"
min_severity = "medium"
down_after = "2m"
"#));
    let a = config.unwrap_or_else(|| panic!("{diags:?}")).alarms;
    let w = a.webhook.expect("webhook");
    assert_eq!(
        (w.address.host.as_str(), w.address.port.get()),
        ("soc.example.gov", 443)
    );
    assert_eq!(w.path, "/api/alarms?src=gw");
    assert_eq!(a.syslog.expect("syslog").address.port.get(), 6514);
    assert_eq!(a.min_severity, gateway_core::detect::Severity::Medium);
    assert_eq!(a.down_after, std::time::Duration::from_secs(120));

    let (config, diags) = compile(&hub(r#"
[alarms]
syslog = "soc.example.gov:6514"
webhook = "http://soc.example.gov/alarms"
webhook_ca = "/etc/gatewayd/soc-ca.pem"
syslog_cert = "/etc/gatewayd/gw.pem"
min_severity = "severe"
"#));
    assert!(config.is_none());
    let text: Vec<String> = diags
        .iter()
        .map(|d| format!("{} {}", d.location.line, d.message))
        .collect();
    for (line, says) in [
        (15, "alarms.syslog: the collector's CA is missing"),
        (16, "not an https:// URL"),
        (18, "alarms.syslog_cert and alarms.syslog_key go together"),
        (19, "alarms.min_severity: unknown severity"),
    ] {
        assert!(
            text.iter()
                .any(|t| t.starts_with(&format!("{line} ")) && t.contains(says)),
            "{says} at line {line}: {text:?}"
        );
    }
}

fn warnings_and_controls(src: &str) -> (Vec<String>, Vec<String>) {
    let today = gateway_core::units::Date::new(2026, 12, 1).expect("date");
    let checked = gateway_core::check::load(src, today);
    let warnings = checked
        .diagnostics
        .iter()
        .filter(|d| !d.is_error())
        .map(|d| d.message.clone())
        .collect();
    let config = checked
        .config
        .unwrap_or_else(|| panic!("{:?}", checked.diagnostics));
    let s = gateway_core::summary::Summary::new(&config, today);
    let controls = s
        .crossings
        .iter()
        .find(|c| c.level == 3)
        .map(|c| c.controls.clone())
        .expect("a level-3 crossing");
    (warnings, controls)
}

#[test]
fn check_lists_the_controls_the_config_enforces_and_warns_of_missing_ones_by_clause() {
    let (warnings, controls) = warnings_and_controls(&common::level3_edge(""));
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("not scanned for malicious code") && w.contains("8.1.3.4 a")),
        "{warnings:?}"
    );
    assert!(
        !controls.iter().any(|c| c.contains("malware")),
        "{controls:?}"
    );
    assert!(
        controls.iter().any(|c| c.contains("intrusion detection")),
        "{controls:?}"
    );

    let (warnings, controls) = warnings_and_controls(&common::level3_edge(
        "\n[scan]\nclamd = \"/run/clamav/clamd.ctl\"\n\n[detect]\nenabled = false\n",
    ));
    assert!(
        !warnings.iter().any(|w| w.contains("8.1.3.4")),
        "{warnings:?}"
    );
    assert!(
        controls.iter().any(|c| c.contains("malware scanning")),
        "{controls:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("intrusion detection is off") && w.contains("8.1.3.3")),
        "{warnings:?}"
    );
    assert!(
        !controls.iter().any(|c| c.contains("intrusion detection")),
        "{controls:?}"
    );
}
