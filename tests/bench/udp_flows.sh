#!/usr/bin/env bash
# UDP flow memory (issue 15): a hub publishes an edge's UDP echo service; waves
# of datagrams from many source ports of a few client addresses open flows
# (at most 256 per address, 4,096 per listener). Prints the RSS of the hub and
# the edge (and its anonymous part: the rest is the binary's and libraries'
# pages, which grow as code first runs) at start, after a warm-up of ten flows
# (expired), right after each wave, and after the flows expired (1 s idle;
# sampled 4 and 12 s after the wave), and how many flows each wave opened
# (relay.open records at the edge).
#
# Needs: python3. Usage: [WAVES=N] tests/bench/udp_flows.sh [PORTS_PER_ADDRESS] [ADDRESSES]
#   (defaults 2000 and 10: 20,000 source ports per wave, two waves)
set -euo pipefail
cd "$(dirname "$0")/../.."
PORTS=${1:-2000} ADDRS=${2:-10}
# GATEWAYD=PATH measures that binary instead.
if [ -z "${GATEWAYD:-}" ]; then
    cargo build --release -q -p gateway-daemon --bin gatewayd
fi
G=${GATEWAYD:-$PWD/target/release/gatewayd}
W=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
QUIC=17643 PUB=17644 ECHO=17645 HADMIN=19802 EADMIN=19803

$G pki init --out "$W/ca" >/dev/null
$G pki issue --ca "$W/ca" --id flow-hub --san 127.0.0.1 --out "$W/c" >/dev/null
$G pki issue --ca "$W/ca" --id flow-edge --out "$W/c" >/dev/null
cat > "$W/hub.toml" <<TOML
[node]
id = "flow-hub"
role = "hub"
state_dir = "$W/hub"
[hub]
listen = "127.0.0.1:$QUIC"
api = "127.0.0.1:$((QUIC + 10))"
ca_cert = "$W/ca/ca.pem"
ca_key = "$W/ca/ca.key"
cert = "$W/c/flow-hub.pem"
key = "$W/c/flow-hub.key"
[[zone]]
name = "extranet"
kind = "extranet"
level = 2
networks = ["127.0.0.0/24"]
[[publish]]
service = "flow-edge/echo"
zone = "extranet"
listen = "127.0.0.1:$PUB"
protocol = "udp"
[admin]
listen = "127.0.0.1:$HADMIN"
TOML
cat > "$W/edge.toml" <<TOML
[node]
id = "flow-edge"
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
cert = "$W/c/flow-edge.pem"
key = "$W/c/flow-edge.key"
[[service]]
name = "echo"
zone = "lab"
protocol = "udp"
target = "127.0.1.10:$ECHO"
allow = ["extranet"]
idle_timeout = "1s"
[admin]
listen = "127.0.0.1:$EADMIN"
TOML
mkdir -p "$W/hub" "$W/edge"
python3 - "$ECHO" <<'PY' &
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.1.10", int(sys.argv[1])))
while True:
    d, a = s.recvfrom(65536)
    s.sendto(d, a)
PY
PIDS+=($!)
RUST_LOG=warn $G run --config "$W/hub.toml" 2>"$W/hub.log" & HUB=$!; PIDS+=($HUB)
RUST_LOG=warn $G run --config "$W/edge.toml" 2>"$W/edge.log" & EDGE=$!; PIDS+=($EDGE)
for _ in $(seq 100); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$EADMIN/readyz', timeout=1)" 2>/dev/null && break
    sleep 0.1
done
rss() { awk '/VmRSS/{t=$2} /RssAnon/{a=$2} END{printf "%.1f (%.1f)", t/1024, a/1024}' "/proc/$1/status"; }
opens() { $G audit show --state-dir "$W/edge" --limit 10000000 2>/dev/null | grep -c 'relay.open' || true; }
wave() { # one datagram from each of $1 source ports of $2 addresses
    python3 - "$PUB" "$1" "$2" <<'PY'
import socket, sys
port, n, addrs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
socks = []
for a in range(addrs):
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.%d" % (100 + a), 0))
        s.sendto(b"x" * 64, ("127.0.0.1", port))
        s.close()
PY
}
echo "| moment | hub RSS (anonymous), MB | edge RSS (anonymous), MB | flows opened at the edge (total) |"
echo "|---|---|---|---|"
echo "| started | $(rss $HUB) | $(rss $EDGE) | $(opens) |"
wave 10 1
sleep 4
echo "| after 10 flows (expired) | $(rss $HUB) | $(rss $EDGE) | $(opens) |"
for w in $(seq "${WAVES:-2}"); do
    wave "$PORTS" "$ADDRS"
    echo "| right after wave $w ($((PORTS * ADDRS)) source ports) | $(rss $HUB) | $(rss $EDGE) | $(opens) |"
    sleep 4
    echo "| 4 s later (flows expired) | $(rss $HUB) | $(rss $EDGE) | $(opens) |"
    sleep 8
    echo "| 12 s later | $(rss $HUB) | $(rss $EDGE) | $(opens) |"
done
echo "machine: $(nproc) cores, $(uname -r), $(date +%F)"
