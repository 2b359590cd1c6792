#!/usr/bin/env bash
# What the level-3 datagram check costs (issue 17), side by side in one run:
# a hub publishes two UDP services of one edge that differ only in
# `app_protocol` (mpegts, checked on every datagram; none), each to its own
# counting sink. A sender offers 1,316-byte MPEG-TS datagrams (7 packets, as
# ffmpeg sends them) to each publish in turn, as fast as one python3 socket
# goes, for SECONDS: datagrams/s offered and delivered, and the ratio.
#
# Needs: python3. Usage: tests/bench/udp_check.sh [SECONDS]   (GATEWAYD=PATH for another build)
set -euo pipefail
cd "$(dirname "$0")/../.."
D=${1:-5}
if [ -z "${GATEWAYD:-}" ]; then
    cargo build --release -q -p gateway-daemon --bin gatewayd
fi
G=${GATEWAYD:-$PWD/target/release/gatewayd}
W=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
QUIC=17743 PUB_PLAIN=17744 PUB_TS=17745 SINK_PLAIN=17746 SINK_TS=17747 HADMIN=19812 EADMIN=19813

$G pki init --out "$W/ca" >/dev/null
$G pki issue --ca "$W/ca" --id check-hub --san 127.0.0.1 --out "$W/c" >/dev/null
$G pki issue --ca "$W/ca" --id check-edge --out "$W/c" >/dev/null
publish() { printf '[[publish]]\nservice = "check-edge/%s"\nzone = "extranet"\nlisten = "127.0.0.1:%s"\nprotocol = "udp"\n' "$1" "$2"; }
service() { printf '[[service]]\nname = "%s"\nzone = "lab"\nprotocol = "udp"\ntarget = "127.0.1.10:%s"\nallow = ["extranet"]\n%s\n' "$1" "$2" "$3"; }
cat > "$W/hub.toml" <<TOML
[node]
id = "check-hub"
role = "hub"
state_dir = "$W/hub"
[hub]
listen = "127.0.0.1:$QUIC"
api = "127.0.0.1:$((QUIC + 10))"
ca_cert = "$W/ca/ca.pem"
ca_key = "$W/ca/ca.key"
cert = "$W/c/check-hub.pem"
key = "$W/c/check-hub.key"
[[zone]]
name = "extranet"
kind = "extranet"
level = 2
networks = ["127.0.0.0/24"]
$(publish plain $PUB_PLAIN)
$(publish video $PUB_TS)
[detect]
never_ban = ["127.0.0.0/8"]
[admin]
listen = "127.0.0.1:$HADMIN"
TOML
cat > "$W/edge.toml" <<TOML
[node]
id = "check-edge"
role = "edge"
state_dir = "$W/edge"
[[zone]]
name = "lab"
kind = "legacy"
classified = false
level = 2
networks = ["127.0.1.0/24"]
assessment = { id = "BENCH", valid_until = 2099-12-31 }
[[zone]]
name = "extranet"
kind = "extranet"
level = 2
networks = ["127.0.0.0/24"]
[uplink]
hubs = ["127.0.0.1:$QUIC"]
ca = "$W/ca/ca.pem"
cert = "$W/c/check-edge.pem"
key = "$W/c/check-edge.key"
$(service plain $SINK_PLAIN "")
$(service video $SINK_TS 'app_protocol = "mpegts"')
[detect]
never_ban = ["127.0.0.0/8"]
[admin]
listen = "127.0.0.1:$EADMIN"
TOML
mkdir -p "$W/hub" "$W/edge"
for port in $SINK_PLAIN $SINK_TS; do
    python3 - "$port" "$W/sink$port" <<'PY' &
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("127.0.1.10", int(sys.argv[1])))
n = 0
last = time.time()
while True:
    s.recv(65536)
    n += 1
    if time.time() - last > 0.2:
        open(sys.argv[2], "w").write(str(n)); last = time.time()
PY
    PIDS+=($!)
done
RUST_LOG=warn $G run --config "$W/hub.toml" 2>"$W/hub.log" & PIDS+=($!)
RUST_LOG=warn $G run --config "$W/edge.toml" 2>"$W/edge.log" & PIDS+=($!)
for _ in $(seq 100); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$EADMIN/readyz', timeout=1)" 2>/dev/null && break
    sleep 0.1
done
sink() { cat "$W/sink$1" 2>/dev/null || echo 0; }

echo "== 1,316-byte MPEG-TS datagrams, one sender, ${D} s per service"
printf '%-22s %12s %12s %10s\n' service offered/s delivered/s delivered
for which in plain video; do
    if [ $which = plain ]; then pub=$PUB_PLAIN sinkp=$SINK_PLAIN; else pub=$PUB_TS sinkp=$SINK_TS; fi
    before=$(sink $sinkp)
    sent=$(python3 - "$pub" "$D" <<'PY'
import socket, sys, time
port, secs = int(sys.argv[1]), float(sys.argv[2])
pkt = bytearray(b"\xff" * 188); pkt[0] = 0x47; pkt[1] = 0x01; pkt[2] = 0x00
d = bytes(pkt) * 7
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("127.0.0.1", port))
n, t0 = 0, time.time()
while time.time() - t0 < secs:
    for _ in range(100):
        try:
            s.send(d); n += 1
        except BlockingIOError:
            pass
print(n)
PY
)
    sleep 1.5
    after=$(sink $sinkp)
    got=$((after - before))
    label=$([ $which = plain ] && echo "no check" || echo "app_protocol mpegts")
    python3 -c "import sys; s,g,d=int(sys.argv[1]),int(sys.argv[2]),float(sys.argv[3]); print(f'{sys.argv[4]:<22} {s/d:12.0f} {g/d:12.0f} {100*g/max(s,1):9.1f}%')" "$sent" "$got" "$D" "$label"
done
curl -s 127.0.0.1:$EADMIN/metrics 2>/dev/null | grep -E '^gateway_udp_protocol_violations_total' || echo "no datagram refused"
