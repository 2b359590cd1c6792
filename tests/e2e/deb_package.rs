//! The Debian package: `image/deb/build.sh` packs the binary, the unit and its
//! files; installed on this machine (as root, with dpkg) it creates the user and
//! the private directories, `systemd-analyze verify` accepts the unit instance,
//! and it removes cleanly. Starting the unit needs a running systemd, which a
//! container or CI runner usually lacks: then only verify runs.

mod common;

use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Purges the package even when an assertion fails.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "gatewayd"]).output();
    }
}

#[test]
fn the_package_builds_installs_verifies_and_removes() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    let tools = ["dpkg-deb", "dpkg", "systemd-analyze", "systemd-sysusers"]
        .iter()
        .all(|t| {
            Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        });
    if !root || !tools {
        println!("skipped: needs root and dpkg, systemd-analyze, systemd-sysusers (Debian)");
        return;
    }
    // gateway-updater is another package's binary, built beside gatewayd by
    // `cargo test --workspace` (the README's test command).
    let updater =
        std::path::Path::new(env!("CARGO_BIN_EXE_gatewayd")).with_file_name("gateway-updater");
    if !updater.is_file() {
        println!(
            "skipped: no {} (run cargo test --workspace: the package holds it)",
            updater.display()
        );
        return;
    }
    let out = tempfile::tempdir().expect("out");
    let deb = run(Command::new(common::root().join("image/deb/build.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_gatewayd"), "--updater"])
        .arg(&updater)
        .arg("--out")
        .arg(out.path()));
    let deb = deb.trim();
    let contents = run(Command::new("dpkg-deb").args(["--contents", deb]));
    for f in [
        "./usr/bin/gatewayd",
        "./usr/lib/systemd/system/gatewayd@.service",
        "./usr/bin/gateway-updater",
        "./usr/lib/systemd/system/gateway-updater.service",
        "./usr/lib/systemd/system/gateway-boot-ok.service",
        "./usr/lib/sysusers.d/gatewayd.conf",
        "./usr/lib/tmpfiles.d/gatewayd.conf",
        "./usr/lib/sysctl.d/90-gatewayd.conf",
        "./usr/share/man/man8/gatewayd.8.gz",
        "./usr/share/doc/gatewayd/deploy.md",
        "./usr/share/doc/gatewayd/examples/edge-extranet-l3.toml",
    ] {
        assert!(contents.contains(f), "{f} missing:\n{contents}");
    }
    let _purge = Purge;
    run(Command::new("dpkg").args(["-i", deb]));
    let user = run(Command::new("getent").args(["passwd", "gatewayd"]));
    assert!(user.starts_with("gatewayd:"), "{user}");
    let meta = std::fs::metadata("/var/lib/gatewayd").expect("state directory");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o700
    );
    run(Command::new("systemd-analyze").args(["verify", "gatewayd@edge.service"]));
    run(Command::new("systemd-analyze").args([
        "verify",
        "gateway-updater.service",
        "gateway-boot-ok.service",
    ]));
    let help = run(Command::new("/usr/bin/gateway-updater").arg("--help"));
    assert!(help.contains("install") && help.contains("gate"), "{help}");
    let version = run(Command::new("/usr/bin/gatewayd").arg("--version"));
    assert!(version.starts_with("gatewayd "), "{version}");
    if std::path::Path::new("/run/systemd/system").is_dir() {
        println!("systemd runs here, but starting the unit needs a real config; verify passed");
    } else {
        println!("no running systemd here: systemctl start not tried; verify passed");
    }
}
