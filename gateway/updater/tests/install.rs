//! The real `gateway-updater` binary against files standing in for the two
//! root partitions and a directory for the ESP: a bundle installs into the
//! inactive slot (copying what the running slot holds, fetching the rest),
//! a tampered chunk is never written, a `kill -9` mid-install resumes
//! without writing a marked chunk again, and the boots that follow commit,
//! roll back and refuse a downgrade as the kept state says.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gateway_core::firmware::{CHUNK_BYTES, FORMAT, Manifest};

#[path = "../../../tests/e2e/minisign_signer.rs"]
mod minisign_signer;

use minisign_signer::Signer;

fn sha(b: &[u8]) -> String {
    gateway_updater::sha256_hex(b)
}

const BIN: &str = env!("CARGO_BIN_EXE_gateway-updater");

/// A root image of `n` chunks and a half: chunk `i` is filled with `tag + i`,
/// except those in `shared`, filled as the v1 image's chunk of that number
/// is (so they can be copied from the running slot).
fn image(tag: u8, n: usize, shared: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..=n {
        let t = if shared.contains(&i) {
            i as u8
        } else {
            tag.wrapping_add(i as u8)
        };
        let len = if i == n { CHUNK_BYTES / 2 } else { CHUNK_BYTES };
        out.extend((0..len).map(|j| t ^ (j % 7) as u8));
    }
    out
}

struct Box {
    dir: tempfile::TempDir,
    key: PathBuf,
}

impl Box {
    /// A box running v1 (`image(0, n, [])`) from slot A; slot B is zeros.
    fn new(signer: &Signer, n: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = CHUNK_BYTES as usize * (n + 4);
        let mut a = image(0, n, &[]);
        a.resize(size, 0);
        std::fs::write(dir.path().join("slot-a"), a).expect("slot a");
        std::fs::write(dir.path().join("slot-b"), vec![0; size]).expect("slot b");
        let entries = dir.path().join("esp/loader/entries");
        std::fs::create_dir_all(&entries).expect("esp");
        std::fs::write(entries.join("gw-1.0.conf"), "title Gateway 1.0\n").expect("entry");
        std::fs::write(entries.join("loader-other.conf"), "not ours\n").expect("other");
        let key = dir.path().join("key.pub");
        std::fs::write(&key, signer.public_file()).expect("key");
        Box { dir, key }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn command(&self, running: (&str, &str), args: &[&str]) -> Command {
        let d = self.dir.path();
        let mut c = Command::new(BIN);
        c.args(args)
            .arg("--state-dir")
            .arg(d.join("state"))
            .arg("--esp")
            .arg(d.join("esp"))
            .arg("--slot-a")
            .arg(d.join("slot-a"))
            .arg("--slot-b")
            .arg(d.join("slot-b"))
            .args(["--running-slot", running.0, "--running-version", running.1])
            .args(["--hardware", "qemu-x86_64"])
            .arg("--key")
            .arg(&self.key)
            .arg("--gatewayd-state")
            .arg(d.join("gatewayd"));
        c
    }

    fn updater(&self, running: (&str, &str), args: &[&str]) -> Output {
        self.command(running, args)
            .output()
            .expect("gateway-updater runs")
    }

    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.path("esp/loader/entries"))
            .expect("entries")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("gw-"))
            .collect();
        names.sort();
        names
    }

    fn rename_entry(&self, from: &str, to: &str) {
        let d = self.path("esp/loader/entries");
        std::fs::rename(d.join(from), d.join(to)).expect("rename");
    }

    fn kept(&self) -> serde_json::Value {
        let text = std::fs::read(self.path("state/updater.json")).expect("kept");
        serde_json::from_slice(&text).expect("json")
    }
}

/// Writes a bundle of `root` as `version` into `dir`; returns its manifest.
fn bundle(signer: &Signer, dir: &Path, version: &str, security: u64, root: &[u8]) -> Manifest {
    std::fs::create_dir_all(dir.join("chunks")).expect("bundle");
    let (linux, initrd) = (format!("kernel {version}"), format!("initrd {version}"));
    let chunks: Vec<&[u8]> = root.chunks(CHUNK_BYTES as usize).collect();
    for (i, c) in chunks.iter().enumerate() {
        std::fs::write(dir.join(format!("chunks/{i:06}")), c).expect("chunk");
    }
    std::fs::write(dir.join("linux"), &linux).expect("linux");
    std::fs::write(dir.join("initrd"), &initrd).expect("initrd");
    let m = Manifest {
        format: FORMAT.into(),
        version: version.into(),
        security_version: security,
        hardware: vec!["qemu-x86_64".into()],
        min_from_version: "1.0".into(),
        kernel_sha256: sha(linux.as_bytes()),
        initrd_sha256: sha(initrd.as_bytes()),
        root_bytes: root.len() as u64,
        chunks: chunks.iter().map(|c| sha(c)).collect(),
    };
    let text = serde_json::to_vec_pretty(&m).expect("manifest");
    std::fs::write(dir.join("manifest.json"), &text).expect("manifest");
    std::fs::write(dir.join("manifest.json.minisig"), signer.sign(&text)).expect("sig");
    m
}

fn ok(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "gateway-updater failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn failed(out: &Output) -> String {
    assert!(!out.status.success(), "gateway-updater succeeded: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn slot_holds(b: &Box, slot: &str, root: &[u8]) -> bool {
    let bytes = std::fs::read(b.path(slot)).expect("slot");
    &bytes[..root.len()] == root
}

#[test]
fn a_bundle_installs_into_the_inactive_slot_copying_what_the_running_one_holds() {
    let signer = Signer::new(1);
    let b = Box::new(&signer, 8);
    let v2 = image(100, 8, &[1, 4, 6]);
    bundle(&signer, &b.path("v2"), "2.0", 2, &v2);
    // The shared chunks are not in the bundle: fetching one would fail.
    for i in [1, 4, 6] {
        std::fs::remove_file(b.path(&format!("v2/chunks/{i:06}"))).expect("rm");
    }
    let out = ok(&b.updater(
        ("a", "1.0"),
        &["install", b.path("v2").to_str().expect("utf8")],
    ));
    assert!(
        out.contains("installing 2.0 into slot b (9 chunks)"),
        "{out}"
    );
    assert!(out.contains("chunks 9/9"), "{out}");
    assert!(out.contains("staged 2.0"), "{out}");
    assert!(slot_holds(&b, "slot-b", &v2), "slot b holds v2");
    assert!(
        slot_holds(&b, "slot-a", &image(0, 8, &[])),
        "slot a untouched"
    );
    assert_eq!(b.entries(), ["gw-1.0.conf", "gw-2.0+3.conf"]);
    let entry = std::fs::read_to_string(b.path("esp/loader/entries/gw-2.0+3.conf")).expect("entry");
    assert!(entry.contains("root=PARTLABEL=gw-root-b"), "{entry}");
    assert!(
        entry.contains("gw.slot=b gw.version=2.0 gw.hardware=qemu-x86_64"),
        "{entry}"
    );
    assert!(entry.contains("linux /EFI/gw/2.0/linux"), "{entry}");
    assert_eq!(
        std::fs::read_to_string(b.path("esp/EFI/gw/2.0/linux")).expect("linux"),
        "kernel 2.0"
    );
    assert!(
        b.path("esp/loader/entries/loader-other.conf").exists(),
        "not ours: left"
    );
    assert_eq!(b.kept()["state"]["phase"], "staged");
    // Installing it again changes nothing (the entry is not written twice).
    let again = b.updater(
        ("a", "1.0"),
        &["install", b.path("v2").to_str().expect("utf8")],
    );
    assert!(failed(&again).contains("staged or on trial"), "{again:?}");
}

#[test]
fn a_tampered_chunk_is_not_written_and_a_fixed_bundle_resumes() {
    let signer = Signer::new(2);
    let b = Box::new(&signer, 6);
    let v2 = image(50, 6, &[]);
    bundle(&signer, &b.path("v2"), "2.0", 1, &v2);
    let good = std::fs::read(b.path("v2/chunks/000003")).expect("chunk");
    let mut bad = good.clone();
    bad[100] ^= 1;
    std::fs::write(b.path("v2/chunks/000003"), &bad).expect("tamper");
    let err = failed(&b.updater(
        ("a", "1.0"),
        &["install", b.path("v2").to_str().expect("utf8")],
    ));
    assert!(
        err.contains("chunk 3 of 2.0 does not match its signed hash"),
        "{err}"
    );
    let slot = std::fs::read(b.path("slot-b")).expect("slot");
    let at = 3 * CHUNK_BYTES as usize;
    assert!(
        slot[at..at + CHUNK_BYTES as usize].iter().all(|x| *x == 0),
        "chunk 3 not written"
    );
    assert_eq!(
        b.entries(),
        ["gw-1.0.conf"],
        "no entry for a slot half written"
    );
    // A missing chunk (a link that dropped) stops it the same way.
    std::fs::remove_file(b.path("v2/chunks/000003")).expect("rm");
    let err = failed(&b.updater(
        ("a", "1.0"),
        &["install", b.path("v2").to_str().expect("utf8")],
    ));
    assert!(
        err.contains("fetching:") && err.contains("000003: missing"),
        "{err}"
    );
    std::fs::write(b.path("v2/chunks/000003"), &good).expect("fix");
    // Chunks 0-2 are kept: the bundle no longer needs them.
    for i in 0..3 {
        std::fs::remove_file(b.path(&format!("v2/chunks/{i:06}"))).expect("rm");
    }
    ok(&b.updater(
        ("a", "1.0"),
        &["install", b.path("v2").to_str().expect("utf8")],
    ));
    assert!(slot_holds(&b, "slot-b", &v2));
}

#[test]
fn a_kill_mid_install_resumes_without_writing_a_marked_chunk_again() {
    let signer = Signer::new(3);
    let n = 48;
    let mut landed = false;
    for _ in 0..20 {
        let b = Box::new(&signer, n);
        let v2 = image(70, n, &[]);
        bundle(&signer, &b.path("v2"), "2.0", 1, &v2);
        let mut child = b
            .command(
                ("a", "1.0"),
                &["install", b.path("v2").to_str().expect("utf8")],
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        // Kill it once it has kept a chunk.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let kept = std::fs::read(b.path("state/updater.json")).ok();
            let writing = kept
                .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
                .is_some_and(|v| {
                    v["state"]["phase"] == "writing"
                        && v["state"]["progress"]["have"][0].as_u64().unwrap_or(0) != 0
                });
            if writing || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::yield_now();
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let v = b.kept();
        if v["state"]["phase"] != "writing" {
            continue; // it finished first: try again
        }
        landed = true;
        let have: Vec<u64> = v["state"]["progress"]["have"]
            .as_array()
            .expect("bitmap")
            .iter()
            .map(|w| w.as_u64().expect("word"))
            .collect();
        let marked: Vec<usize> = (0..=n)
            .filter(|i| have[i / 64] & (1 << (i % 64)) != 0)
            .collect();
        assert!(!marked.is_empty() && marked.len() <= n, "{marked:?}");
        assert_eq!(
            b.entries(),
            ["gw-1.0.conf"],
            "no entry before the last chunk"
        );
        // The marked chunks are in the slot: the bundle no longer has them.
        for i in &marked {
            std::fs::remove_file(b.path(&format!("v2/chunks/{i:06}"))).expect("rm");
        }
        let out = ok(&b.updater(
            ("a", "1.0"),
            &["install", b.path("v2").to_str().expect("utf8")],
        ));
        assert!(out.contains("staged 2.0"), "{out}");
        assert!(
            slot_holds(&b, "slot-b", &v2),
            "slot b holds v2 after the resume"
        );
        break;
    }
    assert!(landed, "no kill landed mid-install in 20 tries");
}

#[test]
fn boots_commit_roll_back_and_a_downgrade_is_refused() {
    let signer = Signer::new(4);
    let b = Box::new(&signer, 4);
    let v2 = image(10, 4, &[]);
    bundle(&signer, &b.path("v2"), "2.0", 5, &v2);
    ok(&b.updater(
        ("a", "1.0"),
        &["install", b.path("v2").to_str().expect("utf8")],
    ));
    // systemd-boot tries 2.0 (one try used), on slot b.
    b.rename_entry("gw-2.0+3.conf", "gw-2.0+2-1.conf");
    let s = ok(&b.updater(("b", "2.0"), &["status"]));
    assert!(s.contains("\"phase\": \"trial\""), "{s}");
    // The health gate passed: systemd-bless-boot drops the counter.
    b.rename_entry("gw-2.0+2-1.conf", "gw-2.0.conf");
    let s = ok(&b.updater(("b", "2.0"), &["status"]));
    assert!(s.contains("\"outcome\": \"committed\""), "{s}");
    assert_eq!(b.kept()["security_version"], 5, "recorded once committed");
    ok(&b.updater(("b", "2.0"), &["reported"]));
    assert_eq!(b.kept()["state"]["phase"], "idle");

    // A signed bundle below security version 5 is refused.
    let old = image(20, 4, &[]);
    bundle(&signer, &b.path("v3-old"), "3.0", 4, &old);
    let err = failed(&b.updater(
        ("b", "2.0"),
        &["install", b.path("v3-old").to_str().expect("utf8")],
    ));
    assert!(err.contains("below this box's 5"), "{err}");
    // One signed by another key is refused.
    let other = Signer::new(9);
    bundle(&other, &b.path("v3-other"), "3.0", 6, &old);
    let err = failed(&b.updater(
        ("b", "2.0"),
        &["verify", b.path("v3-other").to_str().expect("utf8")],
    ));
    assert!(err.contains("signature"), "{err}");

    // 3.0 installs into slot a (1.0's entry goes first), then fails its
    // three tries: the box is back on 2.0 by itself and reports it.
    let v3 = image(30, 4, &[]);
    bundle(&signer, &b.path("v3"), "3.0", 6, &v3);
    ok(&b.updater(
        ("b", "2.0"),
        &["install", b.path("v3").to_str().expect("utf8")],
    ));
    assert_eq!(b.entries(), ["gw-2.0.conf", "gw-3.0+3.conf"]);
    assert!(slot_holds(&b, "slot-a", &v3));
    assert!(!b.path("esp/EFI/gw/1.0").exists() || !b.path("esp/EFI/gw/1.0/linux").exists());
    b.rename_entry("gw-3.0+3.conf", "gw-3.0+0-3.conf");
    let s = ok(&b.updater(("b", "2.0"), &["status"]));
    assert!(s.contains("\"outcome\": \"rolled-back\""), "{s}");
    assert!(s.contains("\"running\": \"2.0\""), "{s}");
    assert_eq!(
        b.kept()["security_version"],
        5,
        "a rollback records nothing"
    );
    // Reported; the same bundle again (a stick left in) is refused, unless
    // asked to retry.
    ok(&b.updater(("b", "2.0"), &["reported"]));
    let again = b.updater(
        ("b", "2.0"),
        &["install", b.path("v3").to_str().expect("utf8")],
    );
    assert!(
        failed(&again).contains("rolled back on this box before"),
        "{again:?}"
    );
    let retry = ok(&b.updater(
        ("b", "2.0"),
        &["install", "--retry", b.path("v3").to_str().expect("utf8")],
    ));
    assert!(retry.contains("staged 3.0"), "{retry}");
    assert_eq!(
        b.entries(),
        ["gw-2.0.conf", "gw-3.0+3.conf"],
        "a fresh entry, three tries"
    );
}

#[test]
fn a_slot_reached_through_a_link_is_refused() {
    let signer = Signer::new(5);
    let b = Box::new(&signer, 2);
    bundle(&signer, &b.path("v2"), "2.0", 1, &image(1, 2, &[]));
    std::fs::rename(b.path("slot-b"), b.path("elsewhere")).expect("mv");
    std::os::unix::fs::symlink(b.path("elsewhere"), b.path("slot-b")).expect("link");
    let err = failed(&b.updater(
        ("a", "1.0"),
        &["install", b.path("v2").to_str().expect("utf8")],
    ));
    assert!(err.contains("slot") && err.contains("slot-b"), "{err}");
    assert!(
        std::fs::read(b.path("elsewhere"))
            .expect("target")
            .iter()
            .all(|x| *x == 0)
    );
}

/// Runs `c`, failing the test if it has not ended within 20 s (a FIFO that
/// hangs the updater would otherwise hang the test).
fn within_20s(mut c: Command) -> Output {
    let child = c
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(20)) {
        Ok(out) => out.expect("output"),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("gateway-updater hung");
        }
    }
}

#[test]
fn one_updater_at_a_time_and_a_fifo_in_a_bundle_hangs_nothing() {
    let signer = Signer::new(6);
    let b = Box::new(&signer, 3);
    let v2 = image(70, 3, &[]);
    bundle(&signer, &b.path("v2"), "2.0", 1, &v2);
    ok(&b.updater(("a", "1.0"), &["status"]));
    // Another updater holds the state directory's lock.
    let held = std::fs::File::open(b.path("state/lock")).expect("lock file");
    let held = nix::fcntl::Flock::lock(held, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .expect("flock");
    let err = failed(&b.updater(
        ("a", "1.0"),
        &["install", b.path("v2").to_str().expect("utf8")],
    ));
    assert!(err.contains("another gateway-updater is running"), "{err}");
    assert!(
        std::fs::read(b.path("slot-b"))
            .expect("b")
            .iter()
            .all(|x| *x == 0),
        "nothing written meanwhile"
    );
    drop(held);
    // A FIFO in place of a chunk and of the kernel: refused at once.
    let chunk = b.path("v2/chunks/000001");
    std::fs::remove_file(&chunk).expect("rm");
    nix::unistd::mkfifo(&chunk, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let out = within_20s(b.command(
        ("a", "1.0"),
        &["install", b.path("v2").to_str().expect("utf8")],
    ));
    let err = failed(&out);
    assert!(
        err.contains("000001") && err.contains("another kind of file"),
        "{err}"
    );
    std::fs::remove_file(&chunk).expect("rm");
    std::fs::write(&chunk, &v2[CHUNK_BYTES as usize..2 * CHUNK_BYTES as usize]).expect("chunk");
    let linux = b.path("v2/linux");
    let kernel = std::fs::read(&linux).expect("linux");
    std::fs::remove_file(&linux).expect("rm");
    nix::unistd::mkfifo(&linux, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let err = failed(&within_20s(b.command(
        ("a", "1.0"),
        &["install", b.path("v2").to_str().expect("utf8")],
    )));
    assert!(err.contains("linux"), "{err}");
    assert!(
        b.entries() == ["gw-1.0.conf"],
        "no entry for a slot without a kernel"
    );
    std::fs::remove_file(&linux).expect("rm");
    std::fs::write(&linux, kernel).expect("linux");
    let out = ok(&b.updater(
        ("a", "1.0"),
        &["install", b.path("v2").to_str().expect("utf8")],
    ));
    assert!(out.contains("staged 2.0"), "{out}");
}

#[test]
fn the_slot_is_read_back_before_its_entry_and_a_forged_bitmap_is_not_trusted() {
    let signer = Signer::new(7);
    for have in [serde_json::json!([511]), serde_json::json!([])] {
        let b = Box::new(&signer, 8);
        let v2 = image(90, 8, &[]);
        bundle(&signer, &b.path("v2"), "2.0", 1, &v2);
        // Cut after chunks 0-2: chunk 3 is missing from the bundle.
        let c3 = b.path("v2/chunks/000003");
        let kept_chunk = std::fs::read(&c3).expect("chunk");
        std::fs::remove_file(&c3).expect("rm");
        failed(&b.updater(
            ("a", "1.0"),
            &["install", b.path("v2").to_str().expect("utf8")],
        ));
        std::fs::write(&c3, kept_chunk).expect("chunk");
        // The state disk is edited to claim every chunk (or to hold a
        // bitmap of the wrong shape).
        let mut kept = b.kept();
        assert_eq!(kept["state"]["phase"], "writing");
        kept["state"]["progress"]["have"] = have.clone();
        std::fs::write(
            b.path("state/updater.json"),
            serde_json::to_vec(&kept).expect("json"),
        )
        .expect("write");
        // So is the offer, removed: offering again writes it again.
        std::fs::remove_file(b.path("state/offer.json")).expect("rm offer");
        let out = ok(&b.updater(
            ("a", "1.0"),
            &["install", b.path("v2").to_str().expect("utf8")],
        ));
        assert!(out.contains("staged 2.0"), "{have}: {out}");
        if have == serde_json::json!([511]) {
            assert!(
                out.contains("read back: 6 chunks of the slot do not match"),
                "{out}"
            );
        }
        assert!(slot_holds(&b, "slot-b", &v2), "{have}: slot b holds v2");
    }
}

#[test]
fn the_image_sets_the_floor_and_an_unreadable_config_state_holds_the_update() {
    let signer = Signer::new(8);
    let b = Box::new(&signer, 2);
    bundle(&signer, &b.path("v2"), "2.0", 4, &image(3, 2, &[]));
    // A fresh state disk (or one wiped) does not lower the floor the
    // running image carries.
    let mut c = b.command(
        ("a", "1.0"),
        &["install", b.path("v2").to_str().expect("utf8")],
    );
    c.args(["--image-security-version", "5"]);
    let err = failed(&c.output().expect("runs"));
    assert!(err.contains("below this box's 5"), "{err}");
    // gatewayd's managed state that does not parse: not updating.
    std::fs::create_dir_all(b.path("gatewayd/managed")).expect("dir");
    std::fs::write(b.path("gatewayd/managed/state.json"), "{trying").expect("state");
    let err = failed(&b.updater(
        ("a", "1.0"),
        &["install", b.path("v2").to_str().expect("utf8")],
    ));
    assert!(
        err.contains("unknown whether a configuration try runs"),
        "{err}"
    );
    std::fs::write(b.path("gatewayd/managed/state.json"), r#"{"trying":true}"#).expect("state");
    let err = failed(&b.updater(
        ("a", "1.0"),
        &["install", b.path("v2").to_str().expect("utf8")],
    ));
    assert!(err.contains("configuration try is running"), "{err}");
}

#[test]
fn a_boot_counting_tries_with_no_trial_on_record_fails_its_gate() {
    let signer = Signer::new(10);
    let b = Box::new(&signer, 2);
    let gate = ["gate", "--admin", "127.0.0.1:1", "--trial", "1s"];
    let out = ok(&b.updater(("a", "1.0"), &gate));
    assert!(out.contains("not a trial boot"), "{out}");
    // The state disk lost the trial, but systemd-boot is counting this
    // entry's tries: the gate fails rather than passing by default.
    b.rename_entry("gw-1.0.conf", "gw-1.0+2-1.conf");
    let err = failed(&b.updater(("a", "1.0"), &gate));
    assert!(err.contains("counts tries"), "{err}");
}
