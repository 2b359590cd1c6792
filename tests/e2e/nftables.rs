//! `gatewayd nftables` turns each shipped config into a ruleset that `nft`
//! accepts (checked with `nft -c`, as root, where nftables is installed), with
//! forwarding dropped and every listener opened on its own address.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn every_shipped_config_gives_a_ruleset_nft_accepts() {
    let dir = common::root().join("config");
    let mut checked_by_nft = 0;
    for e in std::fs::read_dir(&dir).expect("config/").flatten() {
        let path = e.path();
        let out = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
            .args(["nftables", "--config"])
            .arg(&path)
            .output()
            .expect("gatewayd nftables");
        assert!(out.status.success(), "{}: {out:?}", path.display());
        let rules = String::from_utf8(out.stdout).expect("utf-8");
        assert!(
            rules.contains("hook forward priority filter; policy drop;"),
            "{rules}"
        );
        assert!(
            rules.contains("hook input priority filter; policy drop;"),
            "{rules}"
        );
        let nft = Command::new("nft")
            .args(["-c", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let Ok(mut nft) = nft else {
            continue;
        };
        nft.stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("write rules");
        let res = nft.wait_with_output().expect("nft");
        let err = String::from_utf8_lossy(&res.stderr);
        if err.contains("Operation not permitted") {
            continue;
        }
        assert!(
            res.status.success(),
            "{}: nft refuses:\n{err}\n{rules}",
            path.display()
        );
        checked_by_nft += 1;
    }
    if checked_by_nft == 0 {
        println!("skipped the nft check: no nft here, or not root (apt-get install -y nftables)");
    }
}
