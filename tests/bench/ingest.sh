#!/usr/bin/env bash
# Durable ingest benchmark: wrk posts 1 KiB JSON records with 16 connections to
# an edge's [[ingest]] listener (synchronous=FULL, one record per request), and
# reports records/s, producer latency and the buffer's size on disk.
#
# Needs: wrk (apt-get install -y wrk). Usage: tests/bench/ingest.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
D=${1:-10}
command -v wrk >/dev/null || { echo "missing wrk: apt-get install -y wrk" >&2; exit 1; }
cargo build --release -q -p gateway-daemon --bin gatewayd
G=$PWD/target/release/gatewayd
W=$(mktemp -d)
trap 'kill $EDGE 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"' EXIT
$G pki init --out "$W/ca" >/dev/null
$G pki issue --ca "$W/ca" --id bench-edge --out "$W/c" >/dev/null
cat > "$W/edge.toml" <<TOML
[node]
id = "bench-edge"
role = "edge"
state_dir = "$W/state"
[[zone]]
name = "lab"
kind = "legacy"
classified = false
level = 3
networks = ["127.0.1.0/24"]
assessment = { id = "BENCH", valid_until = 2099-12-31 }
[[zone]]
name = "extranet"
kind = "extranet"
level = 3
networks = ["127.0.0.0/24"]
[uplink]
hubs = ["127.0.0.1:9"]
ca = "$W/ca/ca.pem"
cert = "$W/c/bench-edge.pem"
key = "$W/c/bench-edge.key"
[[channel]]
name = "readings"
zone = "lab"
formats = ["json"]
max_record_bytes = "4KiB"
max_bytes = "8GiB"
[[ingest]]
zone = "lab"
listen = "127.0.1.1:18480"
[admin]
listen = "127.0.0.1:19700"
TOML
RUST_LOG=warn $G run --config "$W/edge.toml" 2>"$W/edge.log" & EDGE=$!
for _ in $(seq 50); do curl -sf 127.0.0.1:19700/healthz >/dev/null 2>&1 && break; sleep 0.1; done
python3 -c 'import json; print(json.dumps({"meter": 1, "pad": "x" * 1000}))' > "$W/rec.json"
cat > "$W/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$W/rec.json", "r"); wrk.body = f:read("*a"); f:close()
LUA
OUT=$(wrk -t2 -c16 -d"${D}s" --latency -s "$W/post.lua" http://127.0.1.1:18480/v1/channels/readings/records)
echo "one record per request:"
echo "$OUT" | grep -E "Requests/sec|50%|99%|Non-2xx" || true
# Batches of 100 records (application/x-ndjson).
python3 -c 'import json; print("\n".join(json.dumps({"meter": i, "pad": "x" * 1000}) for i in range(100)))' > "$W/batch.ndjson"
cat > "$W/batch.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-ndjson"
local f = io.open("$W/batch.ndjson", "r"); wrk.body = f:read("*a"); f:close()
LUA
OUTB=$(wrk -t2 -c16 -d"${D}s" --latency -s "$W/batch.lua" http://127.0.1.1:18480/v1/channels/readings/records)
echo "batches of 100 records (records/s = requests/s x 100):"
echo "$OUTB" | grep -E "Requests/sec|50%|99%|Non-2xx" || true
kill -TERM $EDGE; wait $EDGE 2>/dev/null || true
echo "buffer on disk: $(du -m "$W/state/buffer.sqlite" | cut -f1) MB for $(( $(echo "$OUT" | awk '/requests in/{print $1}') + 100 * $(echo "$OUTB" | awk '/requests in/{print $1}') )) records of about $(wc -c < "$W/rec.json") bytes"
echo "machine: $(nproc) cores, $(uname -r), $(date -u +%Y-%m-%d), $D s"
