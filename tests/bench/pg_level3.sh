#!/usr/bin/env bash
# What following PostgreSQL costs (issue 17), side by side in one run: one
# PostgreSQL 15 (started here, pgbench -i -s 10) behind three gateway pairs
# (a hub and an edge each) that differ only in the service:
#   level2     level-2 zones, no app_protocol: bytes relayed as they are
#   level3     level-3 zones, app_protocol = "postgres": every message framed,
#              every statement audited
#   read_only  the same with pg_read_only = true: every statement parsed too
# pgbench -S (select-only) through each in turn (each round starting with
# the next), ROUNDS times, CLIENTS clients, SECONDS each: tps of each run,
# the median per service, and the ratios to level2.
#
# Needs: postgresql-15 (apt). Usage: tests/bench/pg_level3.sh [SECONDS] [ROUNDS] [CLIENTS]
# (GATEWAYD=PATH for another build)
set -euo pipefail
cd "$(dirname "$0")/../.."
D=${1:-10}
ROUNDS=${2:-3}
CLIENTS=${3:-8}
BIN=/usr/lib/postgresql/15/bin
[ -x $BIN/pgbench ] || { echo "needs postgresql-15 (apt-get install postgresql-15)"; exit 1; }
if [ -z "${GATEWAYD:-}" ]; then
    cargo build --release -q -p gateway-daemon --bin gatewayd
fi
G=${GATEWAYD:-$PWD/target/release/gatewayd}
W=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}")
chmod 755 "$W"
PIDS=()
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
    [ -f "$W/data/postmaster.pid" ] && kill -INT "$(head -1 "$W/data/postmaster.pid")" 2>/dev/null || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
PG=17760
mkdir -p "$W/data" "$W/sock"
[ "$(id -u)" = 0 ] && chown postgres: "$W/data" "$W/sock"
as_pg $BIN/initdb -D "$W/data" -U postgres --auth=trust --no-sync --no-instructions >/dev/null
as_pg $BIN/postgres -D "$W/data" -k "$W/sock" -c listen_addresses=127.0.1.10 -p $PG \
    -c fsync=off -c max_connections=100 -c shared_buffers=256MB 2>"$W/pg.log" &
PIDS+=($!)
for _ in $(seq 100); do $BIN/pg_isready -q -h "$W/sock" -p $PG && break; sleep 0.1; done
$BIN/pgbench -h "$W/sock" -p $PG -U postgres -i -s 10 -q postgres 2>/dev/null

$G pki init --out "$W/ca" >/dev/null
# One pair per service: hub QUIC, publish and admin ports from BASE.
pair() {
    local name=$1 level=$2 keys=$3 base=$4
    $G pki issue --ca "$W/ca" --id "$name-hub" --san 127.0.0.1 --out "$W/c" >/dev/null
    $G pki issue --ca "$W/ca" --id "$name-edge" --out "$W/c" >/dev/null
    mkdir -p "$W/$name/hub" "$W/$name/edge"
    cat > "$W/$name/hub.toml" <<TOML
[node]
id = "$name-hub"
role = "hub"
state_dir = "$W/$name/hub"
[hub]
listen = "127.0.0.1:$base"
api = "127.0.0.1:$((base + 1))"
ca_cert = "$W/ca/ca.pem"
ca_key = "$W/ca/ca.key"
cert = "$W/c/$name-hub.pem"
key = "$W/c/$name-hub.key"
[[zone]]
name = "extranet"
kind = "extranet"
level = $level
networks = ["127.0.0.0/24"]
[[publish]]
service = "$name-edge/db"
zone = "extranet"
listen = "127.0.0.1:$((base + 2))"
[detect]
never_ban = ["127.0.0.0/8"]
[admin]
listen = "127.0.0.1:$((base + 3))"
TOML
    cat > "$W/$name/edge.toml" <<TOML
[node]
id = "$name-edge"
role = "edge"
state_dir = "$W/$name/edge"
[[zone]]
name = "lab"
kind = "legacy"
classified = false
level = $level
networks = ["127.0.1.0/24"]
assessment = { id = "BENCH", valid_until = 2099-12-31 }
[[zone]]
name = "extranet"
kind = "extranet"
level = $level
networks = ["127.0.0.0/24"]
[uplink]
hubs = ["127.0.0.1:$base"]
ca = "$W/ca/ca.pem"
cert = "$W/c/$name-edge.pem"
key = "$W/c/$name-edge.key"
[[service]]
name = "db"
zone = "lab"
target = "127.0.1.10:$PG"
allow = ["extranet"]
$keys
[detect]
never_ban = ["127.0.0.0/8"]
[admin]
listen = "127.0.0.1:$((base + 4))"
TOML
    RUST_LOG=warn $G run --config "$W/$name/hub.toml" 2>"$W/$name/hub.log" & PIDS+=($!)
    echo $! > "$W/$name/hub.pid"
    RUST_LOG=warn $G run --config "$W/$name/edge.toml" 2>"$W/$name/edge.log" & PIDS+=($!)
    echo $! > "$W/$name/edge.pid"
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$((base + 4))/readyz" >/dev/null 2>&1 && break
        sleep 0.1
    done
}
pair level2 2 '' 17800
pair level3 3 'app_protocol = "postgres"' 17810
pair read_only 3 $'app_protocol = "postgres"\npg_read_only = true' 17820
port() { case $1 in level2) echo 17802;; level3) echo 17812;; read_only) echo 17822;; esac; }

echo "== pgbench -S -M simple -c $CLIENTS -j 2, ${D} s per run, $ROUNDS rounds (tps)"
printf '%-6s %12s %12s %12s\n' round level2 level3 read_only
declare -A ALL
SERVICES=(level2 level3 read_only)
for r in $(seq "$ROUNDS"); do
    # Each round starts with the next service, so no one always runs first.
    declare -A TPS=()
    for i in 0 1 2; do
        s=${SERVICES[$(( (i + r - 1) % 3 ))]}
        tps=$($BIN/pgbench -h 127.0.0.1 -p "$(port $s)" -U postgres -n -S -M simple \
            -c "$CLIENTS" -j 2 -T "$D" postgres 2>/dev/null \
            | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
        ALL[$s]="${ALL[$s]:-} $tps"
        TPS[$s]=$tps
    done
    printf '%-6s %12s %12s %12s\n' "$r" "${TPS[level2]}" "${TPS[level3]}" "${TPS[read_only]}"
done
cpu() { awk '{print $14 + $15}' "/proc/$(cat "$W/$1/$2.pid")/stat"; }
python3 - "${ALL[level2]}" "${ALL[level3]}" "${ALL[read_only]}" "$D" "$(getconf CLK_TCK)" \
    "$(cpu level2 hub) $(cpu level2 edge)" "$(cpu level3 hub) $(cpu level3 edge)" \
    "$(cpu read_only hub) $(cpu read_only edge)" <<'PY'
import statistics, sys
runs = [[float(x) for x in a.split()] for a in sys.argv[1:4]]
d, tick = float(sys.argv[4]), float(sys.argv[5])
m = [statistics.median(r) for r in runs]
print(f"median {m[0]:12.0f} {m[1]:12.0f} {m[2]:12.0f}")
print(f"level3/level2 {m[1]/m[0]:.2f}   read_only/level2 {m[2]/m[0]:.2f}")
# CPU of each pair over the whole run, per transaction (one statement each).
for name, r, ticks in zip(("level2", "level3", "read_only"), runs, sys.argv[6:9]):
    hub, edge = (float(t) / tick for t in ticks.split())
    n = sum(r) * d
    print(f"{name:<10} gateway CPU per statement: hub {1e6*hub/n:5.1f} us, edge {1e6*edge/n:5.1f} us")
PY
n=$(curl -s 127.0.0.1:17824/metrics | sed -n 's/^gateway_pg_statements_total{service="db",outcome="ok"} //p')
echo "statements audited through read_only: ${n:-0}"
