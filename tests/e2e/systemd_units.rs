//! The shipped systemd units are locked down: `systemd-analyze security
//! --offline=yes` scores each at 2.0 or lower ("OK"), and each keeps the
//! settings the daemon (or the updater) relies on. Skipped, saying why, without systemd-analyze.

mod common;

use std::process::Command;

#[test]
fn every_unit_scores_two_or_lower() {
    let dir = common::root().join("systemd");
    let units: Vec<_> = std::fs::read_dir(&dir)
        .expect("systemd/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "service"))
        .collect();
    assert!(!units.is_empty(), "no unit in {}", dir.display());
    for unit in &units {
        let text = std::fs::read_to_string(unit).expect("read unit");
        let name = unit.file_name().and_then(|n| n.to_str()).unwrap_or("");
        // The updater's units run as root (the ESP is root's) with no
        // capability at all, and may write only their own paths.
        let musts: &[&str] = if name.starts_with("gatewayd") {
            &[
                "Type=notify",
                "WatchdogSec=",
                "Restart=on-failure",
                "RestartPreventExitStatus=64",
                "User=gatewayd",
                "NoNewPrivileges=yes",
                "ProtectSystem=strict",
                "UMask=0077",
            ]
        } else {
            &[
                "Type=oneshot",
                "CapabilityBoundingSet=\n",
                "NoNewPrivileges=yes",
                "ProtectSystem=strict",
                "ReadWritePaths=/efi /var/lib/gw-state/updater\n",
                "IPAddressDeny=any",
                "UMask=0077",
            ]
        };
        for must in musts {
            assert!(text.contains(must), "{} lacks {must:?}", unit.display());
        }
        let out = match Command::new("systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(unit)
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                println!("skipped the score: no systemd-analyze ({e}); apt-get install -y systemd");
                return;
            }
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let score: f64 = text
            .lines()
            .find_map(|l| l.split_once("Overall exposure level for "))
            .and_then(|(_, rest)| rest.split(':').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no score for {}:\n{text}{}",
                    unit.display(),
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        println!("{}: {score}", unit.display());
        assert!(score <= 2.0, "{} scores {score}:\n{text}", unit.display());
    }
}
