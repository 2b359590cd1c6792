#!/usr/bin/env bash
# Channel benchmark (issue 4), one run on this machine:
#   1. the disk's ceiling: SQLite (WAL, synchronous=FULL) inserting 1 KiB records,
#      one transaction per record and 100 per transaction (python3's sqlite3);
#   2. durable ingest over HTTP, 16 producers (wrk), one record per request and
#      NDJSON batches (env BATCHES, default "10 100" records), with a hub connected: records/s, producer p50/p99, and
#      records/s delivered and acknowledged at the hub's sink over the same time;
#   3. drain: the hub stopped, a backlog of DRAIN_MB (default 1024) MiB built up,
#      the hub started: time until the sink holds all of it;
#   4. a channel capped at CAP (default 40Mbit = 5 MB/s): its backlog of about
#      CAP_MB (default 100) MiB drains at what share of the cap.
#
# Needs: wrk, curl, python3 (apt-get install -y wrk curl).
# Usage: tests/bench/channels.sh [SECONDS]   (env DRAIN_MB=1024)
set -euo pipefail
cd "$(dirname "$0")/../.."
D=${1:-10}
DRAIN_MB=${DRAIN_MB:-1024}
CAP=${CAP:-40Mbit} CAP_MB=${CAP_MB:-100}
for tool in wrk curl python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y wrk curl" >&2; exit 1; }
done
# GATEWAYD=PATH measures that binary instead (another commit's, side by side).
if [ -z "${GATEWAYD:-}" ]; then
    cargo build --release -q -p gateway-daemon --bin gatewayd
fi
G=${GATEWAYD:-$PWD/target/release/gatewayd}
W=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
QUIC=17543 API=17544 INGEST=18481 HADMIN=19702 EADMIN=19703
# The producers (wrk, curl) connect from 127.0.0.1: it is in the legacy zone
# "lab" (ingest serves only its zone); the provincial side is 127.0.0.128/25.

echo "== 1. SQLite ceiling (same disk, same 1 KiB records)"
python3 - "$W/ceiling.sqlite" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL"); db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE r (id INTEGER PRIMARY KEY, ch TEXT, seq INTEGER, body BLOB)")
body = b"x" * 1024
for per_tx in (1, 100):
    n, seq, t0 = 0, 0, time.time()
    while time.time() - t0 < 3:
        db.execute("BEGIN IMMEDIATE")
        for _ in range(per_tx):
            seq += 1
            db.execute("INSERT INTO r (ch, seq, body) VALUES ('c', ?, ?)", (seq, body))
        db.execute("COMMIT")
        n += per_tx
    print(f"sqlite_{per_tx}_per_tx {n / (time.time() - t0):.0f}")
PY

$G pki init --out "$W/ca" >/dev/null
$G pki issue --ca "$W/ca" --id bench-hub --san 127.0.0.200 --out "$W/c" >/dev/null
$G pki issue --ca "$W/ca" --id bench-edge --out "$W/c" >/dev/null
cat > "$W/hub.toml" <<TOML
[node]
id = "bench-hub"
role = "hub"
state_dir = "$W/hub"
[hub]
listen = "127.0.0.200:$QUIC"
api = "127.0.0.200:$API"
ca_cert = "$W/ca/ca.pem"
ca_key = "$W/ca/ca.key"
cert = "$W/c/bench-hub.pem"
key = "$W/c/bench-hub.key"
[[zone]]
name = "extranet"
kind = "extranet"
level = 3
networks = ["127.0.0.128/25"]
[admin]
listen = "127.0.0.1:$HADMIN"
TOML
cat > "$W/edge.toml" <<TOML
[node]
id = "bench-edge"
role = "edge"
state_dir = "$W/edge"
[[zone]]
name = "lab"
kind = "legacy"
classified = false
level = 3
networks = ["127.0.1.0/24", "127.0.0.0/25"]
assessment = { id = "BENCH", valid_until = 2099-12-31 }
[[zone]]
name = "extranet"
kind = "extranet"
level = 3
networks = ["127.0.0.128/25"]
[uplink]
hubs = ["127.0.0.200:$QUIC"]
ca = "$W/ca/ca.pem"
cert = "$W/c/bench-edge.pem"
key = "$W/c/bench-edge.key"
[[channel]]
name = "readings"
zone = "lab"
formats = ["json"]
max_record_bytes = "4KiB"
max_bytes = "16GiB"
[[channel]]
name = "capped"
zone = "lab"
formats = ["json"]
max_record_bytes = "4KiB"
max_bytes = "16GiB"
bandwidth = "$CAP"
[[ingest]]
zone = "lab"
listen = "127.0.1.1:$INGEST"
[admin]
listen = "127.0.0.1:$EADMIN"
TOML
mkdir -p "$W/hub" "$W/edge"
start_hub() { RUST_LOG=warn $G run --config "$W/hub.toml" 2>>"$W/hub.log" & HUB=$!; PIDS+=($HUB); }
RUST_LOG=warn $G run --config "$W/edge.toml" 2>"$W/edge.log" & EDGE=$!; PIDS+=($EDGE)
start_hub
for _ in $(seq 100); do curl -sf 127.0.0.1:$EADMIN/readyz >/dev/null 2>&1 && break; sleep 0.1; done

high() { # [channel]: the sink's high-water mark, read from its file (the API takes consumer certificates)
    $G channels --state-dir "$W/hub" --format json 2>/dev/null | python3 -c 'import json,sys; c=[x for x in json.load(sys.stdin)["channels"] if x["channel"]==sys.argv[1]]; print(c[0]["high"] if c else 0)' "${1:-readings}" 2>/dev/null || echo 0
}
committed() { # [channel]
    $G channels --state-dir "$W/edge" --format json | python3 -c 'import json,sys; c=[x for x in json.load(sys.stdin)["channels"] if x["channel"]==sys.argv[1]]; print(c[0]["committed"] if c else 0)' "${1:-readings}"
}
now() { date +%s.%N; }
wait_high() { # N [channel]: until the sink holds N records; prints the time it was reached
    while [ "$(high "${2:-readings}")" -lt "$1" ]; do sleep 0.05; done; now
}

python3 -c 'import json; print(json.dumps({"meter": 1, "pad": "x" * 1000}))' > "$W/rec.json"
BATCHES=${BATCHES:-10 100}
KINDS=rec
for n in $BATCHES; do
    python3 -c "import json; print('\n'.join(json.dumps({'meter': i, 'pad': 'x' * 1000}) for i in range($n)))" > "$W/batch$n.ndjson"
    KINDS+=" batch$n"
done
cp "$W/batch${BATCHES##* }.ndjson" "$W/batch.ndjson"   # the largest, for the backlogs
for kind in $KINDS batch; do
    ct=application/json; f=$W/rec.json
    [ $kind != rec ] && { ct=application/x-ndjson; f=$W/$kind.ndjson; }
    cat > "$W/$kind.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "$ct"
local f = io.open("$f", "r"); wrk.body = f:read("*a"); f:close()
LUA
done

echo "== 2. durable ingest, 16 producers, hub connected"
for kind in $KINDS; do
    h0=$(high); c0=$(committed); t0=$(now)
    OUT=$(wrk -t2 -c16 -d"${D}s" --latency -s "$W/$kind.lua" "http://127.0.1.1:$INGEST/v1/channels/readings/records")
    t1=$(now); h1=$(high); c1=$(committed)
    tdone=$(wait_high "$c1")
    python3 - "$kind" "$t0" "$t1" "$tdone" "$h0" "$h1" "$c0" "$c1" <<'PY' "$OUT"
import re, sys
kind, t0, t1, tdone = sys.argv[1], *map(float, sys.argv[2:5])
h0, h1, c0, c1 = map(int, sys.argv[5:9])
out = sys.argv[9]
p = {k: v for k, v in re.findall(r"\s(50|99)%\s+(\S+)", out)}
print(f"{kind}: ingest {(c1 - c0) / (t1 - t0):.0f} records/s, producer p50 {p.get('50')} p99 {p.get('99')} per request;"
      f" at the hub {(h1 - h0) / (t1 - t0):.0f} records/s during ingest,"
      f" all {c1 - c0} acknowledged {tdone - t1:.2f} s after ingest stopped"
      f" ({(c1 - c0) / (tdone - t0):.0f} records/s end to end)")
PY
    echo "$OUT" | grep -E "Non-2xx|Socket errors" || true
done

echo "== 3. drain of a ${DRAIN_MB} MiB backlog"
kill -TERM $HUB; wait $HUB 2>/dev/null || true
c0=$(committed)
target=$(( DRAIN_MB * 1024 * 1024 / 1024 ))   # records of about 1 KiB
while [ $(( $(committed) - c0 )) -lt "$target" ]; do
    wrk -t2 -c16 -d5s -s "$W/batch.lua" "http://127.0.1.1:$INGEST/v1/channels/readings/records" >/dev/null
done
c1=$(committed); h0=$(high 2>/dev/null || echo 0)
backlog=$(( c1 - c0 ))
bytes=$($G channels --state-dir "$W/edge" --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["channels"][0]["backlog_bytes"])')
t0=$(now); start_hub
tdone=$(wait_high "$c1")
python3 -c "import sys; b=$bytes; n=$backlog; s=$tdone-$t0; print(f'drained {n} records ({b/2**20:.0f} MiB accounted) in {s:.1f} s from hub start: {n/s:.0f} records/s, {b/2**20/s:.1f} MiB/s')"
before=$(du -m "$W/edge/buffer.sqlite" | cut -f1)
# The edge deletes on each ack; its housekeeping compacts the file (WAL
# checkpoint, incremental vacuum) once a backlog is empty, within a second.
while [ "$($G channels --state-dir "$W/edge" --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["channels"][0]["backlog_records"])')" -gt 0 ]; do sleep 0.2; done
t0=$(now)
for _ in $(seq 600); do [ "$(du -m "$W/edge/buffer.sqlite" | cut -f1)" -lt $(( before / 4 )) ] && break; sleep 0.1; done
echo "edge buffer on disk: ${before} MB when the hub had it all, $(du -m "$W/edge/buffer.sqlite" | cut -f1) MB $(python3 -c "print(f'{$(now) - $t0:.1f}')") s after the backlog emptied (compaction)"
echo "== 4. a backlog of about ${CAP_MB} MiB on a channel capped at $CAP"
kill -TERM $HUB; wait $HUB 2>/dev/null || true
while [ "$(committed capped)" -lt $(( CAP_MB * 1024 )) ]; do
    wrk -t2 -c16 -d1s -s "$W/batch.lua" "http://127.0.1.1:$INGEST/v1/channels/capped/records" >/dev/null
done
c1=$(committed capped)
sent() { curl -sf 127.0.0.1:$EADMIN/metrics | awk -F'} ' '/^gateway_channel_sent_bytes_total\{channel="capped"/{print $2}'; }
start_hub
# From the first record through (the tunnel is up and syncing) to the last.
t0=$(wait_high 1 capped); s0=$(sent); s0=${s0:-0}
tdone=$(wait_high "$c1" capped)
sleep 1.2   # the sent-bytes counter is exact; this only waits for the last scrape
s1=$(sent)
python3 -c "
cap = '$CAP'; import re
n, unit = re.match(r'(\d+)(\w+)', cap).groups()
bps = int(n) * {'kbit': 125, 'Mbit': 125_000, 'Gbit': 125_000_000}[unit]
rate = ($s1 - $s0) / ($tdone - $t0)
print(f'drained $c1 records: {($s1 - $s0) / 2**20:.0f} MiB on the wire in {$tdone - $t0:.1f} s = {rate / 1e6:.2f} MB/s, {rate / bps:.1%} of the {bps / 1e6:.2f} MB/s cap')
"
echo "machine: $(nproc) cores, $(uname -r), $(date -u +%Y-%m-%d), $D s per ingest run"
