#!/usr/bin/env bash
# Builds gatewayd_<version>_<arch>.deb with dpkg-deb (no other tool): the binary,
# the systemd template unit, sysusers/tmpfiles/sysctl files, the example configs,
# the guides, and gatewayd(8) generated from --help.
#
#   image/deb/build.sh [--binary PATH] [--updater PATH] [--out DIR]
#
# The package also holds gateway-updater (the firmware updater) and its units.
# Without --binary and --updater it builds the release binaries first.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN="" UPD="" OUT="$ROOT/target/deb"
while [ $# -gt 0 ]; do
    case $1 in
        --binary) BIN=$2; shift 2;;
        --updater) UPD=$2; shift 2;;
        --out) OUT=$2; shift 2;;
        *) echo "usage: $0 [--binary PATH] [--updater PATH] [--out DIR]" >&2; exit 2;;
    esac
done
if [ -z "$BIN" ]; then
    (cd "$ROOT" && cargo build --release --locked -q -p gateway-daemon --bin gatewayd)
    BIN=$ROOT/target/release/gatewayd
fi
if [ -z "$UPD" ]; then
    (cd "$ROOT" && cargo build --release --locked -q -p gateway-updater --bin gateway-updater)
    UPD=$ROOT/target/release/gateway-updater
fi
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -1)
ARCH=$(dpkg --print-architecture)
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT

install -D -m 0755 "$BIN" "$STAGE/usr/bin/gatewayd"
install -D -m 0644 "$ROOT/systemd/gatewayd@.service" "$STAGE/usr/lib/systemd/system/gatewayd@.service"
install -D -m 0755 "$UPD" "$STAGE/usr/bin/gateway-updater"
for u in gateway-updater.service gateway-boot-ok.service gateway-updater-follow.service \
    gateway-updater-follow.path gateway-updater-follow.timer; do
    install -D -m 0644 "$ROOT/systemd/$u" "$STAGE/usr/lib/systemd/system/$u"
done
install -D -m 0644 "$ROOT/systemd/gatewayd.sysusers" "$STAGE/usr/lib/sysusers.d/gatewayd.conf"
install -D -m 0644 "$ROOT/systemd/gatewayd.tmpfiles" "$STAGE/usr/lib/tmpfiles.d/gatewayd.conf"
install -D -m 0644 "$ROOT/systemd/90-gatewayd.sysctl" "$STAGE/usr/lib/sysctl.d/90-gatewayd.conf"
for f in "$ROOT"/config/*.toml; do
    install -D -m 0644 "$f" "$STAGE/usr/share/doc/gatewayd/examples/$(basename "$f")"
done
for f in "$ROOT"/docs/*.md "$ROOT/README.md"; do
    install -D -m 0644 "$f" "$STAGE/usr/share/doc/gatewayd/$(basename "$f")"
done
# A man page from the built-in help: every subcommand's --help, verbatim.
{
    echo ".TH GATEWAYD 8 \"\" \"gatewayd $VERSION\" \"System Administration\""
    echo ".SH NAME"
    echo "gatewayd \\- boundary gateway for government department networks"
    echo ".SH DESCRIPTION"
    echo ".nf"
    "$BIN" --help
    for sub in check run demo pki audit channels nftables; do
        echo
        echo "gatewayd $sub"
        "$BIN" "$sub" --help
    done
    echo ".fi"
    echo ".SH SEE ALSO"
    echo "/usr/share/doc/gatewayd/deploy.md, /usr/share/doc/gatewayd/config.md"
} | sed 's/^\./\\\&./' | sed '1,4s/^\\&//;/^\\&\.fi$/s/^\\&//;/^\\&\.nf$/s/^\\&//;/^\\&\.SH/s/^\\&//' | gzip -9n > "$STAGE/man.gz"
install -D -m 0644 "$STAGE/man.gz" "$STAGE/usr/share/man/man8/gatewayd.8.gz"
rm "$STAGE/man.gz"

mkdir -p "$STAGE/DEBIAN"
SIZE=$(du -sk "$STAGE/usr" | cut -f1)
cat > "$STAGE/DEBIAN/control" <<CONTROL
Package: gatewayd
Version: $VERSION
Architecture: $ARCH
Maintainer: gatewayd maintainers <gatewayd@localhost>
Installed-Size: $SIZE
Depends: libc6, systemd
Section: net
Priority: optional
Description: boundary gateway for government department networks
 Relays connections between a department's legacy network and the provincial
 e-government network through QUIC tunnels (never routing), enforces the
 GB/T 22239-2019 boundary rules, keeps a tamper-evident audit and syncs
 buffered data exactly once. Run one instance per config: gatewayd@NAME
 reads /etc/gatewayd/NAME.toml.
CONTROL
cat > "$STAGE/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    systemd-sysusers gatewayd.conf
    systemd-tmpfiles --create gatewayd.conf
    # The sysctl baseline takes effect at the next boot (or `sysctl --system`):
    # turning forwarding off under a running host could cut its other services.
    if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
POSTINST
cat > "$STAGE/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl stop 'gatewayd@*.service' || true
fi
PRERM
cat > "$STAGE/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
POSTRM
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"
mkdir -p "$OUT"
DEB=$OUT/gatewayd_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
