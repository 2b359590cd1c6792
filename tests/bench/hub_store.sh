#!/usr/bin/env bash
# The hub's store under load (issue 18), side by side in one run: 4 edges
# ingest 1 KiB records (NDJSON batches of BATCH, default 100; 4 producers
# each) for SECONDS and sync them to
#   sqlite: one hub, its sink in SQLite (WAL, synchronous = FULL);
#   pg1:    one hub, its state in PostgreSQL 15;
#   pg2:    two hubs on the same PostgreSQL database, two edges each.
# PostgreSQL runs from Debian's packages in a temporary directory with
# fsync = on and synchronous_commit = on (what production runs). Rounds
# (ROUNDS, default 3) rotate the order of the three setups; each setup
# starts from an empty store. Reported per run: records committed at the
# sink per second over the load, and end to end (from the load's start until
# the sink holds every record the edges took), with the medians and ratios to
# sqlite.
#
# Needs: wrk, curl, python3, postgresql-15 (apt-get install -y wrk curl
# postgresql-15).
# Usage: tests/bench/hub_store.sh [SECONDS]   (env ROUNDS=3 BATCH=100)
set -euo pipefail
cd "$(dirname "$0")/../.."
D=${1:-10}
ROUNDS=${ROUNDS:-3}
BATCH=${BATCH:-100}
PGBIN=/usr/lib/postgresql/15/bin
for tool in wrk curl python3 "$PGBIN/initdb"; do
    command -v "$tool" >/dev/null || [ -x "$tool" ] || { echo "missing $tool: apt-get install -y wrk curl postgresql-15" >&2; exit 1; }
done
if [ -z "${GATEWAYD:-}" ]; then
    cargo build --release -q -p gateway-daemon --bin gatewayd
fi
G=${GATEWAYD:-$PWD/target/release/gatewayd}
W=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}")
chmod 755 "$W"
PIDS=()
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    as_pg "$PGBIN/pg_ctl" stop -D "$W/pg/data" -m immediate -w >/dev/null 2>&1 || true
    rm -rf "$W"
}
trap cleanup EXIT
PGPORT=17432
mkdir -p "$W/pg/data" "$W/pg/sock"
[ "$(id -u)" = 0 ] && chown -R postgres:postgres "$W/pg"
as_pg "$PGBIN/initdb" -D "$W/pg/data" -U postgres --auth-local=trust -E UTF8 --no-instructions >/dev/null
as_pg "$PGBIN/pg_ctl" start -D "$W/pg/data" -w -t 60 -l "$W/pg/sock/log" \
    -o "-k $W/pg/sock -p $PGPORT -c listen_addresses='' -c fsync=on -c synchronous_commit=on -c max_connections=100" >/dev/null
psql_() { "$PGBIN/psql" -h "$W/pg/sock" -p $PGPORT -U postgres -X -At -v ON_ERROR_STOP=1 "$@"; }

$G pki init --out "$W/ca" >/dev/null
for h in 1 2; do $G pki issue --ca "$W/ca" --id bench-hub-$h --san 127.0.0.20$h --out "$W/c" >/dev/null; done
for e in 1 2 3 4; do $G pki issue --ca "$W/ca" --id bench-edge-$e --out "$W/c" >/dev/null; done
python3 -c "import json; print('\n'.join(json.dumps({'meter': i, 'pad': 'x' * 1000}) for i in range($BATCH)))" > "$W/batch.ndjson"
cat > "$W/batch.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-ndjson"
local f = io.open("$W/batch.ndjson", "r"); wrk.body = f:read("*a"); f:close()
LUA

hub_toml() { # N STORE(sqlite|pg) STATE
    cat <<TOML
[node]
id = "bench-hub-$1"
role = "hub"
state_dir = "$3"
[hub]
listen = "127.0.0.20$1:1754$1"
api = "127.0.0.20$1:1755$1"
ca_cert = "$W/ca/ca.pem"
ca_key = "$W/ca/ca.key"
cert = "$W/c/bench-hub-$1.pem"
key = "$W/c/bench-hub-$1.key"
$([ "$2" = pg ] && echo 'store = "postgres"')
[[zone]]
name = "extranet"
kind = "extranet"
level = 3
networks = ["127.0.0.128/25"]
[admin]
listen = "127.0.0.1:1970$1"
$([ "$2" = pg ] && printf '[hub.postgres]\nconnect = "host=%s port=%s dbname=hubs user=postgres sslmode=disable"\npool = 8\n' "$W/pg/sock" "$PGPORT")
TOML
}
edge_toml() { # N HUB STATE
    cat <<TOML
[node]
id = "bench-edge-$1"
role = "edge"
state_dir = "$3"
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
hubs = ["127.0.0.20$2:1754$2"]
ca = "$W/ca/ca.pem"
cert = "$W/c/bench-edge-$1.pem"
key = "$W/c/bench-edge-$1.key"
[[channel]]
name = "readings"
zone = "lab"
formats = ["json"]
max_record_bytes = "4KiB"
max_bytes = "16GiB"
[[ingest]]
zone = "lab"
listen = "127.0.1.$1:1848$1"
[admin]
listen = "127.0.0.1:1971$1"
TOML
}
now() { date +%s.%N; }
ticks() { # PID...: CPU clock ticks used so far (user + system), summed
    local n=0 p
    for p in "$@"; do
        [ -r /proc/$p/stat ] && n=$(( n + $(awk '{print $14 + $15}' /proc/$p/stat) ))
    done
    echo $n
}
pg_pids() { pgrep -u "$(stat -c %U "$W/pg/data")" -f "postgres" | tr '\n' ' '; }
committed() { # edges' records taken, summed
    local n=0
    for e in 1 2 3 4; do
        n=$(( n + $($G channels --state-dir "$W/run/e$e" --format json | python3 -c 'import json,sys; print(sum(c["committed"] for c in json.load(sys.stdin)["channels"]))') ))
    done
    echo $n
}
high() { # SETUP: records in the sink, summed over streams
    if [ "$1" = sqlite ]; then
        $G channels --state-dir "$W/run/h1" --format json 2>/dev/null | python3 -c 'import json,sys; print(sum(c["high"] for c in json.load(sys.stdin)["channels"]))' 2>/dev/null || echo 0
    else
        psql_ -d hubs -c "SELECT COALESCE(sum(high), 0) FROM stream" 2>/dev/null || echo 0
    fi
}

run_setup() { # SETUP
    local setup=$1 store=sqlite hubs=1
    [ "$setup" != sqlite ] && store=pg
    [ "$setup" = pg2 ] && hubs=2
    rm -rf "$W/run"; mkdir -p "$W/run"
    psql_ -d postgres -c "DROP DATABASE IF EXISTS hubs" >/dev/null
    psql_ -d postgres -c "CREATE DATABASE hubs" >/dev/null
    local run=()
    for h in $(seq $hubs); do
        mkdir -p "$W/run/h$h"
        hub_toml "$h" "$store" "$W/run/h$h" > "$W/run/hub$h.toml"
        RUST_LOG=warn $G run --config "$W/run/hub$h.toml" 2>>"$W/run/hub$h.log" & run+=($!); PIDS+=($!)
    done
    for h in $(seq $hubs); do
        for _ in $(seq 200); do curl -sf 127.0.0.1:1970$h/readyz >/dev/null 2>&1 && break; sleep 0.05; done
    done
    for e in 1 2 3 4; do
        local hub=1
        [ $hubs = 2 ] && [ $e -gt 2 ] && hub=2
        mkdir -p "$W/run/e$e"
        edge_toml "$e" "$hub" "$W/run/e$e" > "$W/run/edge$e.toml"
        RUST_LOG=warn $G run --config "$W/run/edge$e.toml" 2>>"$W/run/edge$e.log" & run+=($!); PIDS+=($!)
    done
    for e in 1 2 3 4; do
        for _ in $(seq 200); do curl -sf 127.0.0.1:1971$e/readyz >/dev/null 2>&1 && break; sleep 0.05; done
    done
    local h0 t0 t1 h1 c1 tdone hubs_pids edges_pids cpu0
    hubs_pids="${run[*]:0:$hubs}"; edges_pids="${run[*]:$hubs}"
    cpu0="$(ticks $hubs_pids) $(ticks $edges_pids) $(ticks $(pg_pids))"
    h0=$(high "$setup"); t0=$(now)
    local wrks=()
    for e in 1 2 3 4; do
        wrk -t1 -c4 -d"${D}s" -s "$W/batch.lua" "http://127.0.1.$e:1848$e/v1/channels/readings/records" > "$W/run/wrk$e.out" &
        wrks+=($!)
    done
    wait "${wrks[@]}"
    t1=$(now); h1=$(high "$setup"); c1=$(committed)
    while [ "$(high "$setup")" -lt "$c1" ]; do sleep 0.05; done
    tdone=$(now)
    local cpu1="$(ticks $hubs_pids) $(ticks $edges_pids) $(ticks $(pg_pids))"
    python3 -c "import sys, os; s, t0, t1, td, h0, h1, c1 = sys.argv[1], *map(float, sys.argv[2:8]); a = list(map(int, sys.argv[8].split())); b = list(map(int, sys.argv[9].split())); hz = os.sysconf('SC_CLK_TCK'); us = [(y - x) / hz * 1e6 / c1 for x, y in zip(a, b)]; print(f'{s} {(h1 - h0) / (t1 - t0):.0f} {c1 / (td - t0):.0f} {int(c1)} {us[0]:.1f} {us[1]:.1f} {us[2]:.1f}')" \
        "$setup" "$t0" "$t1" "$tdone" "$h0" "$h1" "$c1" "$cpu0" "$cpu1" | tee -a "$W/results"
    for p in "${run[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${run[@]}"; do wait "$p" 2>/dev/null || true; done
}

echo "== setup, records/s committed at the sink during the load, records/s end to end, records, CPU µs per record: hubs, edges, PostgreSQL"
orders=("sqlite pg1 pg2" "pg1 pg2 sqlite" "pg2 sqlite pg1")
for r in $(seq 0 $(( ROUNDS - 1 ))); do
    for s in ${orders[$(( r % 3 ))]}; do run_setup "$s"; done
done
python3 - "$W/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {}
for s in ("sqlite", "pg1", "pg2"):
    runs = [(float(r[1]), float(r[2])) for r in rows if r[0] == s]
    med[s] = (statistics.median(x[0] for x in runs), statistics.median(x[1] for x in runs))
cpu = {s: [statistics.median(float(r[i]) for r in rows if r[0] == s) for i in (4, 5, 6)] for s in med}
print("== medians (ratio to sqlite)")
for s, (during, e2e) in med.items():
    h, e, p = cpu[s]
    print(f"{s}: committed {during:.0f} records/s ({during / med['sqlite'][0]:.2f}), end to end {e2e:.0f} records/s ({e2e / med['sqlite'][1]:.2f});"
          f" CPU per record: hubs {h:.1f} µs, edges {e:.1f} µs, PostgreSQL {p:.1f} µs")
PY
