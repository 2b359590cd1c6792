#!/usr/bin/env bash
# Builds the appliance image from Debian's packages (debootstrap) and our .deb:
#
#   OUT/root.img    ext4, the whole OS, mounted read-only
#   OUT/state.img   ext4, empty: /var/lib/gatewayd (databases, spool), writable
#   OUT/config.img  ext4: /etc/gatewayd (first-boot config and certificates);
#                   a file edge.toml there starts gatewayd@edge at boot
#   OUT/vmlinuz, OUT/initrd.img   the image's kernel, for direct boot
#
# Usage (root, with debootstrap and e2fsprogs): image/build.sh [OUT] [CONFIG_DIR]
# CONFIG_DIR holds edge.toml (or hub.toml) and the files it names; without it a
# self-contained demo config (an edge whose hub is absent) is generated, which
# is what image/test boots.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/target/image}
CONF=${2:-}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
for tool in debootstrap mkfs.ext4 dpkg-deb; do
    command -v $tool >/dev/null || { echo "missing $tool: apt-get install -y debootstrap e2fsprogs" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "image/build.sh needs root (debootstrap, chroot)" >&2; exit 1; }
mkdir -p "$OUT"
W=$(mktemp -d)
trap 'umount -R "$W/rootfs/proc" 2>/dev/null || true; rm -rf "$W"' EXIT

echo "== package"
DEB=$("$ROOT/image/deb/build.sh" --out "$W")

echo "== debootstrap $SUITE (minbase + systemd + kernel)"
CACHE=${DEBOOTSTRAP_CACHE:-$ROOT/target/image-cache}
mkdir -p "$CACHE"
debootstrap --variant=minbase --cache-dir="$CACHE" \
    --include=systemd,systemd-sysv,udev,linux-image-amd64,iproute2,nftables,ca-certificates \
    "$SUITE" "$W/rootfs" "$MIRROR" >"$W/debootstrap.log" 2>&1 ||
    { tail -20 "$W/debootstrap.log"; exit 1; }

echo "== gatewayd into the image"
cp "$DEB" "$W/rootfs/tmp/gatewayd.deb"
mount -t proc proc "$W/rootfs/proc"
chroot "$W/rootfs" dpkg -i /tmp/gatewayd.deb >/dev/null
umount "$W/rootfs/proc"
rm "$W/rootfs/tmp/gatewayd.deb"

# Read-only root: the state and config partitions are mounted by label.
cat > "$W/rootfs/etc/fstab" <<FSTAB
LABEL=gw-root   /                  ext4 ro,noatime                0 1
LABEL=gw-state  /var/lib/gatewayd  ext4 rw,noatime,nosuid,nodev   0 2
LABEL=gw-config /etc/gatewayd      ext4 ro,noatime,nosuid,nodev   0 2
# The unit's PrivateTmp needs writable /tmp and /var/tmp (226/NAMESPACE without).
tmpfs           /tmp               tmpfs mode=1777,nosuid,nodev   0 0
tmpfs           /var/tmp           tmpfs mode=1777,nosuid,nodev   0 0
FSTAB
echo gateway > "$W/rootfs/etc/hostname"
: > "$W/rootfs/etc/machine-id"
# First boot: gatewayd@edge and gatewayd@hub are enabled; each starts only if
# its edge.toml or hub.toml is on the config partition (mounted before it).
mkdir -p "$W/rootfs/etc/systemd/system/gatewayd@.service.d" "$W/rootfs/etc/systemd/system/multi-user.target.wants"
cat > "$W/rootfs/etc/systemd/system/gatewayd@.service.d/image.conf" <<'DROPIN'
[Unit]
RequiresMountsFor=/etc/gatewayd /var/lib/gatewayd
ConditionPathExists=/etc/gatewayd/%i.toml
DROPIN
for name in edge hub; do
    ln -sf /usr/lib/systemd/system/gatewayd@.service "$W/rootfs/etc/systemd/system/multi-user.target.wants/gatewayd@$name.service"
done
# The serial console shows systemd's progress, which image/test watches.
mkdir -p "$W/rootfs/etc/systemd/system.conf.d"
printf '[Manager]\nShowStatus=yes\n' > "$W/rootfs/etc/systemd/system.conf.d/console.conf"
ln -sf /dev/null "$W/rootfs/etc/systemd/system/getty.target"

GW_UID=$(chroot "$W/rootfs" id -u gatewayd)
GW_GID=$(chroot "$W/rootfs" id -g gatewayd)

echo "== config partition"
mkdir -p "$W/config"
if [ -n "$CONF" ]; then
    cp -a "$CONF/." "$W/config/"
else
    G=$ROOT/target/release/gatewayd
    [ -x "$G" ] || G=$(command -v gatewayd)
    "$G" pki init --out "$W/config/ca" >/dev/null
    "$G" pki issue --ca "$W/config/ca" --id image-edge-01 --out "$W/config" >/dev/null
    rm "$W/config/ca/ca.key"
    cat > "$W/config/edge.toml" <<TOML
# The image's demo config: an edge whose hub is absent. It starts, listens on
# its admin port and keeps trying the hub.
[node]
id = "image-edge-01"
role = "edge"
state_dir = "/var/lib/gatewayd"

[[zone]]
name = "legacy"
kind = "legacy"
classified = false
level = 2
networks = ["10.0.2.0/24"]
assessment = { id = "IMAGE-TEST", valid_until = 2099-12-31 }

[[zone]]
name = "extranet"
kind = "extranet"
level = 2
networks = ["192.0.2.0/24"]

[uplink]
hubs = ["192.0.2.1:7443"]
ca = "/etc/gatewayd/ca/ca.pem"
cert = "/etc/gatewayd/image-edge-01.pem"
key = "/etc/gatewayd/image-edge-01.key"

[admin]
listen = "127.0.0.1:9600"
TOML
fi
chown -R "$GW_UID:$GW_GID" "$W/config"
chmod -R go-rwx "$W/config"
chmod 0750 "$W/config"   # as the unit's ConfigurationDirectoryMode: nothing to change on a read-only mount

echo "== disk images"
cp "$W/rootfs/boot/vmlinuz-"* "$OUT/vmlinuz"
cp "$W/rootfs/boot/initrd.img-"* "$OUT/initrd.img"
SIZE_MB=$(( $(du -sm "$W/rootfs" | cut -f1) + 256 ))
rm -f "$OUT/root.img" "$OUT/state.img" "$OUT/config.img"
mkfs.ext4 -q -L gw-root -d "$W/rootfs" "$OUT/root.img" "${SIZE_MB}M"
mkfs.ext4 -q -L gw-state -E root_owner="$GW_UID:$GW_GID" "$OUT/state.img" 256M
mkfs.ext4 -q -L gw-config -d "$W/config" -E root_owner="$GW_UID:$GW_GID" "$OUT/config.img" 16M
ls -la "$OUT"
