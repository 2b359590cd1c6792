#!/usr/bin/env bash
# What malware scanning costs at ingest (issue 16), side by side in one run:
# one edge, two channels that differ only in `scan` (on: each record streamed
# to clamd with INSTREAM before it is committed; off), 1 KiB and 256 KiB
# records, 8 producers (wrk) for SECONDS each, in turn: records/s and p99.
#
# clamd runs with a local signature database written here (an EICAR body
# signature, as the tests use): no official database can be downloaded on
# this machine. A full database (millions of signatures) costs more per byte
# than this one; the figures are the gateway's overhead (a connection and a
# stream per record) plus clamd's own scan of a small database.
#
# Needs: clamd (apt-get install -y clamav-daemon), wrk, curl, python3.
# Usage: tests/bench/scan.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
D=${1:-10}
for tool in clamd wrk curl python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y clamav-daemon wrk curl python3" >&2; exit 1; }
done
if [ -z "${GATEWAYD:-}" ]; then
    cargo build --release -q -p gateway-daemon --bin gatewayd
fi
G=${GATEWAYD:-$PWD/target/release/gatewayd}
W=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
INGEST=18491 EADMIN=19713

mkdir -p "$W/db" "$W/tmp" "$W/edge"
python3 - "$W/db/bench.ndb" <<'PY'
import sys
eicar = "*H+H$!ELIF-TSET-SURIVITNA-DRADNATS-RACIE$}7)CC7)^P(45XZP\\4[PA@%P!O5X"[::-1]
open(sys.argv[1], "w").write("Gw.Bench.EICAR:0:*:" + eicar.encode().hex() + "\n")
PY
cat > "$W/clamd.conf" <<CONF
LocalSocket $W/clamd.sock
DatabaseDirectory $W/db
TemporaryDirectory $W/tmp
LogFile $W/clamd.log
PidFile $W/clamd.pid
Foreground yes
StreamMaxLength 2M
MaxThreads 8
Bytecode no
CONF
clamd -c "$W/clamd.conf" >/dev/null 2>&1 & PIDS+=($!)
for _ in $(seq 600); do [ -S "$W/clamd.sock" ] && break; sleep 0.1; done
[ -S "$W/clamd.sock" ] || { echo "clamd did not start: $(tail -5 "$W/clamd.log")" >&2; exit 1; }

$G pki init --out "$W/ca" >/dev/null
$G pki issue --ca "$W/ca" --id bench-edge --out "$W/c" >/dev/null
channel() { # NAME SCAN
    printf '[[channel]]\nname = "%s"\nzone = "lab"\nformats = ["raw"]\nmax_record_bytes = "1MiB"\nmax_bytes = "16GiB"\nscan = %s\n' "$1" "$2"
}
cat > "$W/edge.toml" <<TOML
[node]
id = "bench-edge"
role = "edge"
state_dir = "$W/edge"
[[zone]]
name = "lab"
kind = "legacy"
classified = false
level = 2
networks = ["127.0.1.0/24", "127.0.0.0/25"]
assessment = { id = "BENCH", valid_until = 2099-12-31 }
[[zone]]
name = "extranet"
kind = "extranet"
level = 2
networks = ["127.0.0.128/25"]
[uplink]
hubs = ["127.0.0.200:9"]
ca = "$W/ca/ca.pem"
cert = "$W/c/bench-edge.pem"
key = "$W/c/bench-edge.key"
$(channel scanned true)
$(channel plain false)
[[ingest]]
zone = "lab"
listen = "127.0.1.1:$INGEST"
[scan]
clamd = "$W/clamd.sock"
[detect]
never_ban = ["127.0.0.0/8"]
[admin]
listen = "127.0.0.1:$EADMIN"
TOML
RUST_LOG=warn $G run --config "$W/edge.toml" 2>"$W/edge.log" & PIDS+=($!)
for _ in $(seq 100); do curl -sf 127.0.0.1:$EADMIN/healthz >/dev/null 2>&1 && break; sleep 0.1; done

for size in 1024 262144; do
    python3 -c "import os,sys; sys.stdout.buffer.write(os.urandom($size))" > "$W/body$size"
    cat > "$W/post$size.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
local f = io.open("$W/body$size", "rb"); wrk.body = f:read("*a"); f:close()
LUA
done

echo "== ingest with and without scanning, 8 producers, ${D} s each"
printf '%-10s %-8s %12s %10s %10s\n' record scan records/s p99_ms non2xx
for size in 1024 262144; do
    for ch in plain scanned; do
        OUT=$(wrk -t2 -c8 -d"${D}s" --latency -s "$W/post$size.lua" "http://127.0.1.1:$INGEST/v1/channels/$ch/records")
        python3 - "$size" "$ch" <<'PY' "$OUT"
import re, sys
size, ch, out = sys.argv[1], sys.argv[2], sys.argv[3]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
p99 = float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)]
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
label = "1 KiB" if size == "1024" else "256 KiB"
print(f"{label:<10} {'on' if ch == 'scanned' else 'off':<8} {rps:12.0f} {p99:10.1f} {bad.group(1) if bad else 0:>10}")
PY
    done
done
curl -s 127.0.0.1:$EADMIN/metrics | grep -E '^gateway_scans_total' || true
