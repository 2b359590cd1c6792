//! `image/bundle.sh` with Debian's `minisign`: the bundle it makes verifies
//! and installs with `gateway-updater`, under the current key or the next
//! one (rotation), and not under another key or once its manifest is
//! changed. Skipped, saying why, without minisign.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_gateway-updater");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .expect("workspace root")
}

fn run(c: &mut Command) -> Output {
    c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"))
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn keypair(dir: &Path, name: &str) {
    ok(&run(Command::new("minisign")
        .args(["-G", "-W", "-p"])
        .arg(dir.join(format!("{name}.pub")))
        .arg("-s")
        .arg(dir.join(format!("{name}.key")))));
}

fn updater(dir: &Path, keys: &[&str], args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--esp")
        .arg(dir.join("esp"))
        .arg("--slot-a")
        .arg(dir.join("slot-a"))
        .arg("--slot-b")
        .arg(dir.join("slot-b"))
        .args(["--running-slot", "a", "--running-version", "1.0"])
        .args(["--hardware", "qemu-x86_64", "--gatewayd-state"])
        .arg(dir.join("none"));
    for k in keys {
        c.arg("--key").arg(dir.join(format!("{k}.pub")));
    }
    run(&mut c)
}

#[test]
fn a_bundle_signed_by_minisign_verifies_installs_and_rotates_keys() {
    if run(Command::new("sh").args(["-c", "command -v minisign"]))
        .status
        .code()
        != Some(0)
    {
        println!("skipped: no minisign (apt-get install -y minisign; CI installs it)");
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let d = t.path();
    keypair(d, "current");
    keypair(d, "next");
    keypair(d, "other");
    let image: Vec<u8> = (0..2_600_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(d.join("root.img"), &image).expect("root");
    std::fs::write(d.join("vmlinuz"), b"kernel").expect("kernel");
    std::fs::write(d.join("initrd.img"), b"initrd").expect("initrd");
    for f in ["slot-a", "slot-b"] {
        std::fs::write(d.join(f), vec![0; 4 << 20]).expect("slot");
    }
    let bundle = |key: &str, out: &str| {
        run(Command::new(root().join("image/bundle.sh"))
            .arg("--root")
            .arg(d.join("root.img"))
            .arg("--kernel")
            .arg(d.join("vmlinuz"))
            .arg("--initrd")
            .arg(d.join("initrd.img"))
            .args(["--version", "2.0", "--security-version", "2"])
            .args(["--hardware", "qemu-x86_64,g2", "--min-from", "1.0", "--key"])
            .arg(d.join(format!("{key}.key")))
            .arg("--out")
            .arg(d.join(out)))
    };
    let made = ok(&bundle("next", "b-next"));
    assert!(made.contains("version 2.0, 3 chunks, signed"), "{made}");
    let path = |b: &str| d.join(b).to_str().expect("utf8").to_owned();

    // Signed by the next key: trusted when the image holds both.
    let v = ok(&updater(
        d,
        &["current", "next"],
        &["verify", &path("b-next")],
    ));
    assert!(v.contains("signature good"), "{v}");
    let refused = updater(d, &["current"], &["verify", &path("b-next")]);
    assert!(
        !refused.status.success(),
        "trusted by a key it was not signed with"
    );

    ok(&bundle("other", "b-other"));
    let refused = updater(d, &["current", "next"], &["verify", &path("b-other")]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("signature"));

    // A changed manifest (a larger security version) no longer verifies.
    ok(&bundle("current", "b-tampered"));
    let m = d.join("b-tampered/manifest.json");
    let text = std::fs::read_to_string(&m).expect("manifest");
    std::fs::write(
        &m,
        text.replace("\"security_version\": 2", "\"security_version\": 9"),
    )
    .expect("tamper");
    let refused = updater(d, &["current"], &["verify", &path("b-tampered")]);
    assert!(!refused.status.success(), "a changed manifest verified");

    // The next key's bundle installs.
    let out = ok(&updater(
        d,
        &["current", "next"],
        &["install", &path("b-next")],
    ));
    assert!(out.contains("staged 2.0"), "{out}");
    let slot = std::fs::read(d.join("slot-b")).expect("slot");
    assert_eq!(&slot[..image.len()], &image[..]);
    assert!(d.join("esp/loader/entries/gw-2.0+3.conf").is_file());
}
