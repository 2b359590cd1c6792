//! `gatewayd check` as a user runs it: the bad configs under tests/configs/bad
//! each fail with exit 64 and errors at the lines and columns their
//! `# expect: LINE:COL TEXT` comments name; options and exit codes behave.

mod common;

use common::{code, gatewayd, root, text, tomls};
use serde_json::Value;

#[test]
fn every_bad_config_fails_at_the_expected_places() {
    let dir = root().join("tests/configs/bad");
    let files = tomls(&dir);
    assert_eq!(files.len(), 22, "bad configs found: {files:?}");
    for f in files {
        let src = std::fs::read_to_string(&f).expect("read");
        let expects: Vec<(u64, u64, String)> = src
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .map(|e| {
                let (pos, what) = e.split_once(' ').expect("# expect: LINE:COL TEXT");
                let (l, c) = pos.split_once(':').expect("LINE:COL");
                (
                    l.parse().expect("line"),
                    c.parse().expect("col"),
                    what.to_owned(),
                )
            })
            .collect();
        assert!(!expects.is_empty(), "{}: no # expect: lines", f.display());
        let path = f.to_str().expect("utf-8 path");

        let out = gatewayd(&[
            "check",
            "--config",
            path,
            "--format",
            "json",
            "--at",
            "2026-11-26",
        ]);
        assert_eq!(code(&out), 64, "{}: {:?}", f.display(), text(&out));
        let report: Value = serde_json::from_slice(&out.stdout).expect("json report");
        assert_eq!(report["valid"], false);
        assert!(report["summary"].is_null());
        let errors = report["errors"].as_array().expect("errors");
        for (line, col, what) in &expects {
            let found = errors.iter().any(|e| {
                e["line"] == *line
                    && e["column"] == *col
                    && (e["rule"] == what.as_str()
                        || e["message"]
                            .as_str()
                            .is_some_and(|m| m.contains(what.as_str())))
            });
            assert!(
                found,
                "{}: no error {line}:{col} {what:?} in {errors:#?}",
                f.display()
            );
        }
        for e in errors {
            assert!(
                e["hint"].is_string(),
                "{}: every error says how to fix it: {e}",
                f.display()
            );
        }

        // The text form names file:line:col for each expected error.
        let out = gatewayd(&["check", "--config", path, "--at", "2026-11-26"]);
        assert_eq!(code(&out), 64);
        let (_, stderr) = text(&out);
        for (line, col, _) in &expects {
            assert!(
                stderr.contains(&format!("{path}:{line}:{col}: ")),
                "{}: {stderr}",
                f.display()
            );
        }
        assert!(stderr.contains("invalid:"), "{stderr}");
    }
}

#[test]
fn valid_config_prints_what_will_be_bridged() {
    let f = root().join("config/edge-extranet-l3.toml");
    let out = gatewayd(&[
        "check",
        "--config",
        f.to_str().expect("path"),
        "--at",
        "2026-11-26",
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(code(&out), 0, "{stderr}");
    for needle in [
        "valid, checked for 2026-11-26",
        "social-security-net    legacy    L3 unclassified",
        "extranet -> social-security-net  boundary L3  service pension-query (relay)",
        "social-security-net -> extranet  boundary L3  channel monthly-report",
        "controls at L3:",
        "mutual certificate authentication",
        "pension-query",
        "10.20.0.1:15432 in social-security-net -> jl-gat-0007/population-db",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
}

#[test]
fn a_level_3_ingest_without_producer_auth_is_warned_about() {
    let shipped =
        std::fs::read_to_string(root().join("config/edge-extranet-l3.toml")).expect("read");
    let open = shipped.replace(
        "auth = \"token\"\ntokens = \"/etc/gatewayd/producers.tokens\"\n",
        "",
    );
    assert_ne!(open, shipped, "the shipped config authenticates producers");
    let dir = tempfile::tempdir().expect("dir");
    for (config, warned) in [(&shipped, false), (&open, true)] {
        let f = dir.path().join("edge.toml");
        std::fs::write(&f, config).expect("write");
        let out = gatewayd(&["check", "--config", f.to_str().expect("path")]);
        let (_, stderr) = text(&out);
        assert_eq!(code(&out), 0, "{stderr}");
        assert_eq!(
            stderr.contains("producers are not authenticated"),
            warned,
            "{stderr}"
        );
    }
}

#[test]
fn json_output_is_stable() {
    let f = root().join("config/edge-extranet-l3.toml");
    let out = gatewayd(&[
        "check",
        "--config",
        f.to_str().expect("path"),
        "--format",
        "json",
        "--at",
        "2026-11-26",
    ]);
    assert_eq!(code(&out), 0);
    let r: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(r["format_version"], 1);
    assert_eq!(r["valid"], true);
    assert_eq!(r["checked_for"], "2026-11-26");
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0));
    let s = &r["summary"];
    assert_eq!(s["node"], "jl-gat-0001");
    assert_eq!(s["role"], "edge");
    assert_eq!(s["zones"][0]["level"], 3);
    assert_eq!(s["zones"][0]["classified"], false);
    assert_eq!(s["crossings"].as_array().map(Vec::len), Some(4));
    assert_eq!(s["crossings"][0]["from"], "extranet");
    assert_eq!(s["crossings"][0]["flow"]["kind"], "interactive");
    assert_eq!(s["crossings"][3]["flow"]["kind"], "channel");
    assert_eq!(s["channels"][0]["max_record_bytes"], 4 << 20);
    assert_eq!(s["services"][0]["allow"][1]["kind"], "device");
}

#[test]
fn at_moves_the_assessment_check() {
    let f = root().join("config/edge-extranet-l3.toml");
    let path = f.to_str().expect("path");
    // valid_until = 2099-03-31
    let warn = gatewayd(&[
        "check",
        "--config",
        path,
        "--at",
        "2099-03-15",
        "--format",
        "json",
    ]);
    assert_eq!(code(&warn), 0);
    let r: Value = serde_json::from_slice(&warn.stdout).expect("json");
    let rules: Vec<&Value> = r["warnings"]
        .as_array()
        .expect("warnings")
        .iter()
        .map(|w| &w["rule"])
        .collect();
    assert!(
        rules.contains(&&Value::from("R3.assessment-expiring")),
        "{r:#}"
    );

    let last_day = gatewayd(&["check", "--config", path, "--at", "2099-03-31"]);
    assert_eq!(code(&last_day), 0);

    let expired = gatewayd(&["check", "--config", path, "--at", "2099-04-01"]);
    assert_eq!(code(&expired), 64);
    let (_, stderr) = text(&expired);
    assert!(stderr.contains("error[R3.assessment-expired]"), "{stderr}");
    assert!(stderr.contains("edge-extranet-l3.toml:18:51"), "{stderr}");
}

#[test]
fn bad_invocations_have_distinct_exit_codes() {
    let missing = gatewayd(&["check", "--config", "/nonexistent/gatewayd.toml"]);
    assert_eq!(code(&missing), 66);
    assert!(
        text(&missing)
            .1
            .contains("cannot read /nonexistent/gatewayd.toml")
    );

    let bad_date = gatewayd(&["check", "--config", "x.toml", "--at", "2026-02-30"]);
    assert_eq!(code(&bad_date), 2);
    assert!(
        text(&bad_date).1.contains("does not exist in the calendar"),
        "{:?}",
        text(&bad_date)
    );

    let no_config = gatewayd(&["check"]);
    assert_eq!(code(&no_config), 2);
}

#[test]
fn gatewayctl_says_what_it_needs() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
        .arg("--help")
        .output()
        .expect("run");
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for cmd in ["token", "devices", "revoke", "config", "command", "audit"] {
        assert!(text.contains(cmd), "{cmd} missing:\n{text}");
    }
    // Without a hub, CA and credential: usage error naming the settings.
    let cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
        .args(["devices", "list"])
        .env_remove("GATEWAYCTL_HUB")
        .env_remove("GATEWAYCTL_CA")
        .env_remove("GATEWAYCTL_CREDENTIALS")
        .output()
        .expect("run");
    assert_eq!(cmd.status.code(), Some(2));
    let err = String::from_utf8_lossy(&cmd.stderr);
    assert!(err.contains("GATEWAYCTL_CREDENTIALS"), "{err}");
    // A hub nobody listens on: unreachable, exit 69.
    let dir = tempfile::tempdir().expect("dir");
    let cred = dir.path().join("c");
    std::fs::write(&cred, "gwa1.x.00").expect("write");
    gateway_daemon::tunnel::pki::init(&dir.path().join("ca"), "t").expect("ca");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
        .args(["devices", "list", "--hub", &port.to_string(), "--ca"])
        .arg(dir.path().join("ca/ca.pem"))
        .arg("--credentials")
        .arg(&cred)
        .output()
        .expect("run");
    assert_eq!(
        cmd.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&cmd.stderr)
    );
    assert!(String::from_utf8_lossy(&cmd.stderr).contains("cannot reach the hub"));
}

#[test]
fn an_old_signature_database_is_warned_about() {
    let dir = tempfile::tempdir().expect("dir");
    let db = dir.path().join("clamav");
    std::fs::create_dir(&db).expect("db dir");
    let sig = db.join("daily.cld");
    std::fs::write(&sig, b"signatures").expect("db file");
    let shipped =
        std::fs::read_to_string(root().join("config/edge-extranet-l3.toml")).expect("read");
    let config = shipped.replace(
        "database_dir = \"/var/lib/clamav\"",
        &format!("database_dir = \"{}\"\nmax_db_age = \"7d\"", db.display()),
    );
    assert_ne!(
        config, shipped,
        "the shipped level-3 config names a database_dir"
    );
    let f = dir.path().join("edge.toml");
    std::fs::write(&f, &config).expect("write");
    let check = || {
        let out = gatewayd(&["check", "--config", f.to_str().expect("path")]);
        assert_eq!(code(&out), 0, "{out:?}");
        text(&out).1
    };
    assert!(!check().contains("signature database"), "fresh");
    let ten_days_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(10 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(&sig)
        .expect("open")
        .set_modified(ten_days_ago)
        .expect("age it");
    let stderr = check();
    assert!(
        stderr.contains("10 days old, older than scan.max_db_age") && stderr.contains("8.1.3.4"),
        "{stderr}"
    );
}
