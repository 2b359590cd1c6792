//! Every example in config/ passes `gatewayd check`, and the test knows how many
//! there are, so a glob that matches nothing cannot pass.

mod common;

use common::{code, gatewayd, root, text, tomls};

#[test]
fn every_shipped_config_passes_check() {
    let files = tomls(&root().join("config"));
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "edge-extranet-l3.toml",
            "edge-intranet-classified.toml",
            "edge-loopback-dev.toml",
            "hub-extranet.toml",
            "hub-loopback-dev.toml",
        ],
        "the shipped examples changed: update this list"
    );
    for f in &files {
        let out = gatewayd(&[
            "check",
            "--config",
            f.to_str().expect("path"),
            "--format",
            "json",
        ]);
        let (stdout, stderr) = text(&out);
        assert_eq!(code(&out), 0, "{}: {stdout}{stderr}", f.display());
        let r: serde_json::Value = serde_json::from_str(&stdout).expect("json");
        assert_eq!(r["valid"], true);
        // Only warnings about run-time files absent from this machine are allowed.
        for w in r["warnings"].as_array().expect("warnings") {
            assert!(
                w["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("does not exist on this machine")),
                "{}: {w}",
                f.display()
            );
        }
    }
}
