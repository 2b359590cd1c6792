#!/usr/bin/env bash
# Builds the appliance image from Debian's packages (debootstrap) and our .deb:
#
#   OUT/disk.img    GPT: the EFI system partition (systemd-boot, the kernel and
#                   initrd of each version, one boot entry per version with a
#                   boot counter) and two root slots gw-root-a / gw-root-b
#                   (squashfs, read-only); this version is in slot A
#   OUT/state.img   ext4: /var/lib/gw-state, writable: gatewayd/ (bound at
#                   /var/lib/gatewayd: databases, spool) and updater/ (the
#                   firmware updater's own, root's)
#   OUT/config.img  ext4: /etc/gatewayd (first-boot config and certificates);
#                   a file edge.toml there starts gatewayd@edge at boot
#   OUT/bundle/     this version as an update bundle (image/bundle.sh)
#   OUT/keys/       the signing key pair, when none was given (a test key)
#
# Usage (root, with debootstrap, e2fsprogs, squashfs-tools, dosfstools, mtools,
# fdisk, systemd-boot-efi, minisign): image/build.sh [OUT] [CONFIG_DIR]
# CONFIG_DIR holds edge.toml (or hub.toml) and the files it names; without it a
# self-contained demo config (an edge whose hub is absent) is generated, which
# is what image/test boots.
#
# Environment: FIRMWARE_VERSION (1.0), SECURITY_VERSION (1), MIN_FROM (1.0),
# HARDWARE (qemu-x86_64), SIGNING_KEY (a minisign secret key; default
# OUT/keys/gw.key, made without a password when missing), NEXT_KEY_PUB (the
# next key's public half, trusted too), TRIAL (the health gate's time, 15m),
# ROOT_MB (each slot's size, 1024), and for tests BROKEN_TUNNEL=1 (gatewayd
# cannot reach any hub: the health gate fails).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/target/image}
CONF=${2:-}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
for tool in debootstrap mkfs.ext4 dpkg-deb mksquashfs mkfs.vfat mcopy sfdisk minisign; do
    command -v $tool >/dev/null || { echo "missing $tool: apt-get install -y debootstrap e2fsprogs squashfs-tools dosfstools mtools fdisk systemd-boot-efi minisign" >&2; exit 1; }
done
BOOTEFI=/usr/lib/systemd/boot/efi/systemd-bootx64.efi
[ -f $BOOTEFI ] || { echo "missing $BOOTEFI: apt-get install -y systemd-boot-efi" >&2; exit 1; }
FIRMWARE_VERSION=${FIRMWARE_VERSION:-1.0}
SECURITY_VERSION=${SECURITY_VERSION:-1}
MIN_FROM=${MIN_FROM:-1.0}
HARDWARE=${HARDWARE:-qemu-x86_64}
TRIAL=${TRIAL:-15m}
ROOT_MB=${ROOT_MB:-1024}
[ "$(id -u)" = 0 ] || { echo "image/build.sh needs root (debootstrap, chroot)" >&2; exit 1; }
mkdir -p "$OUT"
SIGNING_KEY=${SIGNING_KEY:-$OUT/keys/gw.key}
if [ ! -f "$SIGNING_KEY" ]; then
    mkdir -p "$(dirname "$SIGNING_KEY")"
    minisign -G -W -p "${SIGNING_KEY%.key}.pub" -s "$SIGNING_KEY" >/dev/null
    echo "warning: made a TEST signing key $SIGNING_KEY (no password); sign releases with the offline key" >&2
fi
SIGNING_PUB=${SIGNING_KEY%.key}.pub
[ -f "$SIGNING_PUB" ] || { echo "missing $SIGNING_PUB (the public half of $SIGNING_KEY)" >&2; exit 1; }
W=$(mktemp -d)
trap 'umount -R "$W/rootfs/proc" 2>/dev/null || true; rm -rf "$W"' EXIT

echo "== package"
DEB=$("$ROOT/image/deb/build.sh" --out "$W")

echo "== debootstrap $SUITE (minbase + systemd + kernel)"
CACHE=${DEBOOTSTRAP_CACHE:-$ROOT/target/image-cache}
mkdir -p "$CACHE"
debootstrap --variant=minbase --cache-dir="$CACHE" \
    --include=systemd,systemd-sysv,systemd-boot,udev,linux-image-amd64,iproute2,nftables,ca-certificates \
    "$SUITE" "$W/rootfs" "$MIRROR" >"$W/debootstrap.log" 2>&1 ||
    { tail -20 "$W/debootstrap.log"; exit 1; }

echo "== gatewayd into the image"
cp "$DEB" "$W/rootfs/tmp/gatewayd.deb"
mount -t proc proc "$W/rootfs/proc"
chroot "$W/rootfs" dpkg -i /tmp/gatewayd.deb >/dev/null
# The root is squashfs, found by its GPT name: the initrd must mount it.
echo squashfs >> "$W/rootfs/etc/initramfs-tools/modules"
chroot "$W/rootfs" update-initramfs -u >/dev/null 2>&1
umount "$W/rootfs/proc"
rm "$W/rootfs/tmp/gatewayd.deb"

# Read-only root (squashfs, the slot named on the kernel command line); the
# state and config partitions are mounted by label, the ESP by its GPT name.
mkdir -p "$W/rootfs/var/lib/gw-state" "$W/rootfs/efi" "$W/rootfs/var/log/journal"
cat > "$W/rootfs/etc/fstab" <<FSTAB
LABEL=gw-state  /var/lib/gw-state  ext4 rw,noatime,nosuid,nodev   0 2
/var/lib/gw-state/gatewayd /var/lib/gatewayd none bind,x-systemd.requires-mounts-for=/var/lib/gw-state 0 0
# The journal persists on the state disk: a rollback report carries the
# failed boot's last lines. nofail: a state disk from an older image has no
# journal/ yet (tmpfiles makes it; it is bound from the next boot on).
/var/lib/gw-state/journal /var/log/journal none bind,nofail,x-systemd.requires-mounts-for=/var/lib/gw-state 0 0
LABEL=gw-config /etc/gatewayd      ext4 ro,noatime,nosuid,nodev   0 2
PARTLABEL=gw-esp /efi              vfat rw,noatime,umask=0077     0 2
# The unit's PrivateTmp needs writable /tmp and /var/tmp (226/NAMESPACE without).
tmpfs           /tmp               tmpfs mode=1777,nosuid,nodev   0 0
tmpfs           /var/tmp           tmpfs mode=1777,nosuid,nodev   0 0
FSTAB
echo "$FIRMWARE_VERSION" > "$W/rootfs/usr/lib/gateway-release"
# The image's own security version: the updater's floor for downgrades,
# held by the read-only root whatever the state disk says.
install -d "$W/rootfs/usr/lib/gateway-updater"
echo "$SECURITY_VERSION" > "$W/rootfs/usr/lib/gateway-updater/security_version"
# The keys bundles are signed with: the current one and, in a rotation, the next.
install -D -m 0644 "$SIGNING_PUB" "$W/rootfs/usr/lib/gateway-updater/keys/current.pub"
if [ -n "${NEXT_KEY_PUB:-}" ]; then
    install -D -m 0644 "$NEXT_KEY_PUB" "$W/rootfs/usr/lib/gateway-updater/keys/next.pub"
fi
# The updater at each boot, and the health gate of a trial boot.
mkdir -p "$W/rootfs/etc/systemd/system/boot-complete.target.requires" "$W/rootfs/etc/systemd/system/gateway-boot-ok.service.d"
ln -sf /usr/lib/systemd/system/gateway-boot-ok.service "$W/rootfs/etc/systemd/system/boot-complete.target.requires/gateway-boot-ok.service"
cat > "$W/rootfs/etc/systemd/system/gateway-boot-ok.service.d/trial.conf" <<DROPIN
[Service]
ExecStart=
ExecStart=/usr/bin/gateway-updater --state-dir /var/lib/gw-state/updater gate --trial $TRIAL
DROPIN
# An update from a disk labelled gw-bundle (a USB stick, or image/test-update's
# disk): installed at boot, then the box reboots into it.
cat > "$W/rootfs/etc/systemd/system/gateway-update-local.service" <<'UNIT'
[Unit]
Description=gateway firmware update from a disk labelled gw-bundle
After=gateway-updater.service local-fs.target
ConditionPathExists=/dev/disk/by-label/gw-bundle
[Service]
Type=oneshot
StandardOutput=journal+console
ExecStart=/bin/sh -c 'mkdir -p /run/gw-bundle && mount -o ro,nosuid,nodev,noexec LABEL=gw-bundle /run/gw-bundle && /usr/bin/gateway-updater --state-dir /var/lib/gw-state/updater install /run/gw-bundle; r=$?; umount /run/gw-bundle; [ $r = 0 ] && systemctl reboot; exit 0'
[Install]
WantedBy=multi-user.target
UNIT
# The network: DHCP on every Ethernet port (systemd-networkd).
mkdir -p "$W/rootfs/etc/systemd/network" "$W/rootfs/etc/systemd/system/multi-user.target.wants" "$W/rootfs/etc/systemd/system/sockets.target.wants" "$W/rootfs/etc/systemd/system/network-online.target.wants"
printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n' > "$W/rootfs/etc/systemd/network/50-ethernet.network"
ln -sf /lib/systemd/system/systemd-networkd.service "$W/rootfs/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
ln -sf /lib/systemd/system/systemd-networkd.socket "$W/rootfs/etc/systemd/system/sockets.target.wants/systemd-networkd.socket"
ln -sf /lib/systemd/system/systemd-networkd-wait-online.service "$W/rootfs/etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service"
# A hung boot is caught by the hardware watchdog.
mkdir -p "$W/rootfs/etc/systemd/system.conf.d"
printf '[Manager]\nRuntimeWatchdogSec=30s\n' > "$W/rootfs/etc/systemd/system.conf.d/watchdog.conf"
if [ -n "${BROKEN_TUNNEL:-}" ]; then
    # A test build: gatewayd reaches nothing but loopback.
    mkdir -p "$W/rootfs/etc/systemd/system/gatewayd@.service.d"
    printf '[Service]\nIPAddressAllow=\nIPAddressAllow=localhost\nIPAddressDeny=any\n' > "$W/rootfs/etc/systemd/system/gatewayd@.service.d/broken-tunnel.conf"
fi
echo gateway > "$W/rootfs/etc/hostname"
: > "$W/rootfs/etc/machine-id"
# First boot: gatewayd@edge and gatewayd@hub are enabled; each starts only if
# its edge.toml or hub.toml is on the config partition (mounted before it).
mkdir -p "$W/rootfs/etc/systemd/system/gatewayd@.service.d" "$W/rootfs/etc/systemd/system/multi-user.target.wants"
cat > "$W/rootfs/etc/systemd/system/gatewayd@.service.d/image.conf" <<'DROPIN'
[Unit]
RequiresMountsFor=/etc/gatewayd /var/lib/gatewayd
ConditionPathExists=/etc/gatewayd/%i.toml
[Service]
# [update] handoff: offers and acknowledgements for the updater (made by
# tmpfiles on a state disk from an older image; "-": never a failed start).
ReadWritePaths=-/var/lib/gw-state/handoff
DROPIN
# The directories an older image's state disk lacks.
cat > "$W/rootfs/etc/tmpfiles.d/gw-state.conf" <<'TMPFILES'
d /var/lib/gw-state/handoff 0755 gatewayd gatewayd -
d /var/lib/gw-state/journal 0755 root root -
TMPFILES
for name in edge hub; do
    ln -sf /usr/lib/systemd/system/gatewayd@.service "$W/rootfs/etc/systemd/system/multi-user.target.wants/gatewayd@$name.service"
done
ln -sf /usr/lib/systemd/system/gateway-updater.service "$W/rootfs/etc/systemd/system/multi-user.target.wants/gateway-updater.service"
ln -sf /etc/systemd/system/gateway-update-local.service "$W/rootfs/etc/systemd/system/multi-user.target.wants/gateway-update-local.service"
# Updates from the hub: the path unit follows gatewayd's handoff, the timer
# the maintenance window.
mkdir -p "$W/rootfs/etc/systemd/system/timers.target.wants"
ln -sf /usr/lib/systemd/system/gateway-updater-follow.path "$W/rootfs/etc/systemd/system/multi-user.target.wants/gateway-updater-follow.path"
ln -sf /usr/lib/systemd/system/gateway-updater-follow.timer "$W/rootfs/etc/systemd/system/timers.target.wants/gateway-updater-follow.timer"
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
KERNEL=$(ls "$W/rootfs/boot/vmlinuz-"* | head -1)
INITRD=$(ls "$W/rootfs/boot/initrd.img-"* | head -1)
rm -f "$OUT/disk.img" "$OUT/state.img" "$OUT/config.img"
rm -rf "$OUT/bundle"
mksquashfs "$W/rootfs" "$W/root.sqfs" -noappend -quiet >/dev/null
SQ=$(stat -c %s "$W/root.sqfs")
[ "$SQ" -le $((ROOT_MB << 20)) ] || { echo "the root image ($SQ bytes) is larger than a slot (ROOT_MB=$ROOT_MB)" >&2; exit 1; }
# The state partition: gatewayd's directory, the updater's (it publishes
# status.json there for gatewayd), the handoff between them (gatewayd
# writes, the updater reads) and the journal.
mkdir -p "$W/state/gatewayd" "$W/state/updater" "$W/state/handoff" "$W/state/journal"
chown "$GW_UID:$GW_GID" "$W/state/gatewayd" "$W/state/handoff"
chmod 0700 "$W/state/gatewayd"
chmod 0755 "$W/state/updater" "$W/state/handoff"
mkfs.ext4 -q -L gw-state -d "$W/state" "$OUT/state.img" 256M
mkfs.ext4 -q -L gw-config -d "$W/config" -E root_owner="$GW_UID:$GW_GID" "$OUT/config.img" 16M
# The ESP: systemd-boot, this version's kernel and initrd, and its entry,
# blessed (the factory install needs no trial). Written as the updater writes
# entries (gateway/updater/src/esp.rs, entry_text).
ESP_MB=256
mkfs.vfat -n GW-ESP -C "$W/esp.img" $((ESP_MB * 1024)) >/dev/null
V=$FIRMWARE_VERSION
mmd -i "$W/esp.img" ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/EFI/gw ::/EFI/gw/$V ::/loader ::/loader/entries
mcopy -i "$W/esp.img" $BOOTEFI ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$W/esp.img" $BOOTEFI ::/EFI/systemd/systemd-bootx64.efi
mcopy -i "$W/esp.img" "$KERNEL" ::/EFI/gw/$V/linux
mcopy -i "$W/esp.img" "$INITRD" ::/EFI/gw/$V/initrd
printf 'timeout 0\neditor no\n' > "$W/loader.conf"
mcopy -i "$W/esp.img" "$W/loader.conf" ::/loader/loader.conf
cat > "$W/entry.conf" <<ENTRY
title Gateway $V
version $V
linux /EFI/gw/$V/linux
initrd /EFI/gw/$V/initrd
options root=PARTLABEL=gw-root-a ro gw.slot=a gw.version=$V gw.hardware=$HARDWARE console=ttyS0 panic=10
ENTRY
mcopy -i "$W/esp.img" "$W/entry.conf" ::/loader/entries/gw-$V.conf
# The disk: GPT with the ESP and the two slots; slot A holds this version.
ROOT_SECTORS=$((ROOT_MB * 2048))
truncate -s $(( (1 + ESP_MB + 2 * ROOT_MB + 1) << 20 )) "$OUT/disk.img"
sfdisk -q "$OUT/disk.img" <<GPT
label: gpt
start=2048, size=$((ESP_MB * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=gw-esp
start=$((2048 + ESP_MB * 2048)), size=$ROOT_SECTORS, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=gw-root-a
start=$((2048 + ESP_MB * 2048 + ROOT_SECTORS)), size=$ROOT_SECTORS, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=gw-root-b
GPT
dd if="$W/esp.img" of="$OUT/disk.img" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$W/root.sqfs" of="$OUT/disk.img" bs=1M seek=$((1 + ESP_MB)) conv=notrunc,sparse status=none
echo "== update bundle"
"$ROOT/image/bundle.sh" --root "$W/root.sqfs" --kernel "$KERNEL" --initrd "$INITRD" \
    --version "$V" --security-version "$SECURITY_VERSION" --hardware "$HARDWARE" \
    --min-from "$MIN_FROM" --key "$SIGNING_KEY" --out "$OUT/bundle" >/dev/null
ls -la "$OUT"
