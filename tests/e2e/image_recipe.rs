//! The image recipe is checked in CI without building the image (debootstrap
//! and a qemu boot take minutes and need Debian's mirror): its scripts parse,
//! and they name the parts the image must hold. `image/build.sh && image/test`
//! is the full run; its last result is in image/README.md.

mod common;

use std::process::Command;

#[test]
fn the_image_scripts_parse_and_hold_the_appliance_layout() {
    let root = common::root();
    for script in [
        "image/build.sh",
        "image/test",
        "image/test-update",
        "image/deb/build.sh",
        "image/bundle.sh",
    ] {
        let out = Command::new("bash")
            .arg("-n")
            .arg(root.join(script))
            .output()
            .expect("bash -n");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let build = std::fs::read_to_string(root.join("image/build.sh")).expect("read");
    for must in [
        "LABEL=gw-state  /var/lib/gw-state  ext4 rw",
        "/var/lib/gw-state/gatewayd /var/lib/gatewayd none bind",
        "LABEL=gw-config /etc/gatewayd      ext4 ro",
        "PARTLABEL=gw-esp /efi              vfat rw",
        "name=gw-root-a",
        "name=gw-root-b",
        "options root=PARTLABEL=gw-root-a ro gw.slot=a gw.version=$V gw.hardware=$HARDWARE",
        "boot-complete.target.requires/gateway-boot-ok.service",
        "image/bundle.sh\" --root",
        "ConditionPathExists=/etc/gatewayd/%i.toml",
        "dpkg -i /tmp/gatewayd.deb",
    ] {
        assert!(build.contains(must), "image/build.sh lacks {must:?}");
    }
    let test = std::fs::read_to_string(root.join("image/test")).expect("read");
    assert!(
        test.contains("boundary gateway (edge)"),
        "image/test waits for the unit's start"
    );
}
