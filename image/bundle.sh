#!/usr/bin/env bash
# Makes a firmware update bundle from a root image, its kernel and initrd,
# signed with minisign (Debian's `minisign`; the box checks it with the keys
# under /usr/lib/gateway-updater/keys):
#
#   OUT/manifest.json           version, security_version, hardware, min_from_version,
#                               the kernel's and initrd's SHA-256, one SHA-256 per 1 MiB chunk
#   OUT/manifest.json.minisig   its signature (no expiry: a box with a wrong clock still updates)
#   OUT/linux, OUT/initrd       the kernel and initrd
#   OUT/chunks/000000 ...       the root image in 1 MiB chunks
#
# Usage:
#   image/bundle.sh --root ROOT_IMAGE --kernel VMLINUZ --initrd INITRD \
#       --version 1.2.0 --security-version 3 --hardware qemu-x86_64[,g2] \
#       --min-from 1.0.0 --key SECRET_KEY --out DIR
#
# A signing key pair: `minisign -G -p gw.pub -s gw.key` (kept offline; the
# image trusts gw.pub and the next key's .pub, so the key can rotate).
set -euo pipefail
usage() { echo "usage: $0 --root IMG --kernel F --initrd F --version V --security-version N --hardware M[,M] --min-from V --key KEY --out DIR" >&2; exit 2; }
ROOTIMG="" KERNEL="" INITRD="" VERSION="" SECURITY="" HARDWARE="" MINFROM="" KEY="" OUT=""
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || usage
    case $1 in
        --root) ROOTIMG=$2;; --kernel) KERNEL=$2;; --initrd) INITRD=$2;;
        --version) VERSION=$2;; --security-version) SECURITY=$2;;
        --hardware) HARDWARE=$2;; --min-from) MINFROM=$2;;
        --key) KEY=$2;; --out) OUT=$2;;
        *) usage;;
    esac
    shift 2
done
for v in ROOTIMG KERNEL INITRD VERSION SECURITY HARDWARE MINFROM KEY OUT; do
    [ -n "${!v}" ] || { echo "$0: missing --$(echo $v | tr 'A-Z' 'a-z')" >&2; usage; }
done
command -v minisign >/dev/null || { echo "$0: missing minisign: apt-get install -y minisign" >&2; exit 1; }
for f in "$ROOTIMG" "$KERNEL" "$INITRD" "$KEY"; do
    [ -f "$f" ] || { echo "$0: $f: no such file" >&2; exit 1; }
done
dotted='^[0-9]+(\.[0-9]+)*$'
[[ $VERSION =~ $dotted ]] || { echo "$0: --version $VERSION: dotted numbers (1.2.0)" >&2; exit 1; }
[[ $MINFROM =~ $dotted ]] || { echo "$0: --min-from $MINFROM: dotted numbers" >&2; exit 1; }
[[ $SECURITY =~ ^[0-9]+$ ]] || { echo "$0: --security-version $SECURITY: a whole number" >&2; exit 1; }
[[ $HARDWARE =~ ^[a-z0-9_-]+(,[a-z0-9_-]+)*$ ]] || { echo "$0: --hardware $HARDWARE: models of a-z, 0-9, - and _, comma-separated" >&2; exit 1; }
[ ! -e "$OUT" ] || [ -z "$(ls -A "$OUT")" ] || { echo "$0: $OUT is not empty" >&2; exit 1; }

mkdir -p "$OUT/chunks"
split -b 1048576 -d -a 6 "$ROOTIMG" "$OUT/chunks/"
cp "$KERNEL" "$OUT/linux"
cp "$INITRD" "$OUT/initrd"
sha() { sha256sum "$1" | cut -d' ' -f1; }
{
    printf '{\n  "format": "gw-firmware-1",\n  "version": "%s",\n  "security_version": %s,\n' "$VERSION" "$SECURITY"
    printf '  "hardware": [%s],\n' "$(echo "$HARDWARE" | sed 's/[^,]*/"&"/g')"
    printf '  "min_from_version": "%s",\n' "$MINFROM"
    printf '  "kernel_sha256": "%s",\n  "initrd_sha256": "%s",\n' "$(sha "$OUT/linux")" "$(sha "$OUT/initrd")"
    printf '  "root_bytes": %s,\n  "chunks": [\n' "$(stat -c %s "$ROOTIMG")"
    first=1
    for c in "$OUT"/chunks/*; do
        [ $first = 1 ] || printf ',\n'
        printf '    "%s"' "$(sha "$c")"
        first=0
    done
    printf '\n  ]\n}\n'
} > "$OUT/manifest.json"
minisign -S -s "$KEY" -m "$OUT/manifest.json" -x "$OUT/manifest.json.minisig" \
    -t "gateway firmware $VERSION (security_version $SECURITY)" </dev/null
echo "$OUT: version $VERSION, $(ls "$OUT/chunks" | wc -l) chunks, signed"
