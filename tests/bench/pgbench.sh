#!/usr/bin/env bash
# A legacy database through the relay, side by side with rathole (issue 21):
# one PostgreSQL 15 (started here, pgbench -i -s 10, fsync off) behind
#   direct    pgbench -> PostgreSQL
#   gatewayd  pgbench -> hub publish -> QUIC tunnel -> edge -> PostgreSQL
#   rathole   pgbench -> rathole server -> noise tunnel -> rathole client -> PostgreSQL
#   lanes     pgbench -> lane relay hub -> QUIC -> lane relay edge -> PostgreSQL:
#             the relay's data path alone on tunnel lanes (relay::pipes, one
#             task per side; examples/quic_floor.rs relay-hub / relay-edge), no
#             policy, audit or opening frames: what the relay gains on lanes
# pgbench select-only (-S) and TPC-B-like (the built-in default), at 8 and 32
# clients, ROUNDS rounds of every combination interleaved (each round runs
# direct, gatewayd and rathole one after the other), SECONDS per run; prints
# the median tps of each and the ratios gatewayd / rathole.
#
# NETNS=1 puts the hub side (the hub, rathole's server, pgbench) and the box
# side (the edge, rathole's client, PostgreSQL) in two network namespaces
# joined by a veth pair with a 1,500-byte MTU: the path a real box has
# (loopback lets QUIC use far larger packets). Needs root for that.
#
# Needs: postgresql-15 (apt), rathole (cargo install rathole).
# Usage: tests/bench/pgbench.sh [SECONDS] [ROUNDS]   (GATEWAYD=PATH, QUIC_FLOOR=PATH
# for other builds)
set -euo pipefail
cd "$(dirname "$0")/../.."
D=${1:-10}
ROUNDS=${2:-3}
BIN=/usr/lib/postgresql/15/bin
[ -x $BIN/pgbench ] || { echo "needs postgresql-15 (apt-get install postgresql-15)" >&2; exit 1; }
command -v rathole >/dev/null || { echo "needs rathole (cargo install rathole)" >&2; exit 1; }
if [ -z "${GATEWAYD:-}" ]; then
    cargo build --release -q -p gateway-daemon --bin gatewayd
fi
if [ -z "${QUIC_FLOOR:-}" ]; then
    cargo build --release -q -p gateway-daemon --example quic_floor
fi
G=${GATEWAYD:-$PWD/target/release/gatewayd}
F=${QUIC_FLOOR:-$PWD/target/release/examples/quic_floor}
W=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}")
chmod 755 "$W"
PIDS=()
NA=gwbench-hub NB=gwbench-box
if [ "${NETNS:-0}" = 1 ]; then
    [ "$(id -u)" = 0 ] || { echo "NETNS=1 needs root" >&2; exit 1; }
    A=(ip netns exec $NA) B=(ip netns exec $NB)
    HUB_IP=10.77.0.1 PG_IP=10.77.0.2 PATH_NAME="two namespaces, veth MTU 1500"
else
    A=() B=()
    HUB_IP=127.0.0.1 PG_IP=127.0.1.10 PATH_NAME="loopback"
fi
as_pg() { if [ "$(id -u)" = 0 ]; then "${B[@]}" runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
    [ -f "$W/data/postmaster.pid" ] && kill -INT "$(head -1 "$W/data/postmaster.pid")" 2>/dev/null || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "${NETNS:-0}" = 1 ]; then ip netns del $NA 2>/dev/null || true; ip netns del $NB 2>/dev/null || true; fi
    rm -rf "$W"
}
trap cleanup EXIT
if [ "${NETNS:-0}" = 1 ]; then
    ip netns del $NA 2>/dev/null || true; ip netns del $NB 2>/dev/null || true
    ip netns add $NA; ip netns add $NB
    ip link add gwb-a type veth peer name gwb-b
    ip link set gwb-a netns $NA; ip link set gwb-b netns $NB
    ip -n $NA addr add 10.77.0.1/24 dev gwb-a; ip -n $NB addr add 10.77.0.2/24 dev gwb-b
    for ns in $NA $NB; do ip -n $ns link set lo up; done
    ip -n $NA link set gwb-a mtu 1500 up; ip -n $NB link set gwb-b mtu 1500 up
fi

PG=17770 HUBQ=17771 PUB=17772 RH_CTRL=17773 RH_PUB=17774 LANEQ=17778 LANE_PUB=17779
mkdir -p "$W/data" "$W/sock"
[ "$(id -u)" = 0 ] && chown postgres: "$W/data" "$W/sock"
as_pg $BIN/initdb -D "$W/data" -U postgres --auth=trust --no-sync --no-instructions >/dev/null
# Clients come from loopback and, with NETNS=1, from the hub side's veth.
printf 'host all all 127.0.0.0/8 trust\nhost all all 10.77.0.0/24 trust\n' >> "$W/data/pg_hba.conf"
as_pg $BIN/postgres -D "$W/data" -k "$W/sock" -c listen_addresses="$(echo "127.0.1.10 $PG_IP" | tr ' ' '\n' | sort -u | paste -sd,)" -p $PG \
    -c fsync=off -c synchronous_commit=off -c max_connections=100 -c shared_buffers=256MB 2>"$W/pg.log" &
PIDS+=($!)
for _ in $(seq 100); do "${B[@]}" $BIN/pg_isready -q -h "$W/sock" -p $PG && break; sleep 0.1; done
"${B[@]}" $BIN/pgbench -h "$W/sock" -p $PG -U postgres -i -s 10 -q postgres 2>/dev/null

# --- gatewayd: a hub and an edge, the database published as it is (level 2) ---
$G pki init --out "$W/ca" >/dev/null
$G pki issue --ca "$W/ca" --id bench-hub --san $HUB_IP --out "$W/certs" >/dev/null
$G pki issue --ca "$W/ca" --id bench-edge --out "$W/certs" >/dev/null
cat > "$W/hub.toml" <<TOML
[node]
id = "bench-hub"
role = "hub"
state_dir = "$W/hub-state"
[hub]
listen = "$HUB_IP:$HUBQ"
api = "127.0.0.1:17775"
ca_cert = "$W/ca/ca.pem"
ca_key = "$W/ca/ca.key"
cert = "$W/certs/bench-hub.pem"
key = "$W/certs/bench-hub.key"
[[zone]]
name = "extranet"
kind = "extranet"
level = 2
networks = ["127.0.0.0/24", "10.77.0.0/24"]
[[publish]]
service = "bench-edge/db"
zone = "extranet"
listen = "127.0.0.1:$PUB"
[admin]
listen = "127.0.0.1:17776"
TOML
cat > "$W/edge.toml" <<TOML
[node]
id = "bench-edge"
role = "edge"
state_dir = "$W/edge-state"
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
networks = ["127.0.0.0/24", "10.77.0.0/24"]
[uplink]
hubs = ["$HUB_IP:$HUBQ"]
ca = "$W/ca/ca.pem"
cert = "$W/certs/bench-edge.pem"
key = "$W/certs/bench-edge.key"
[[service]]
name = "db"
zone = "lab"
target = "127.0.1.10:$PG"
allow = ["extranet"]
[admin]
listen = "127.0.0.1:17777"
TOML
GW_ARGS=${GW_ARGS:-}
RUST_LOG=warn "${A[@]}" $G run --config "$W/hub.toml" $GW_ARGS 2>"$W/hub.log" & HUB=$!; PIDS+=($HUB)
sleep 0.3
RUST_LOG=warn "${B[@]}" $G run --config "$W/edge.toml" $GW_ARGS 2>"$W/edge.log" & EDGE=$!; PIDS+=($EDGE)
for _ in $(seq 100); do "${B[@]}" curl -sf 127.0.0.1:17777/readyz >/dev/null 2>&1 && break; sleep 0.1; done
"${B[@]}" curl -sf 127.0.0.1:17777/readyz >/dev/null || { echo "the edge's tunnel did not come up:" >&2; cat "$W/edge.log" >&2; exit 1; }

# --- rathole, noise transport ---
KEYS=$(rathole --genkey)
PRIV=$(echo "$KEYS" | awk '/Private Key/{getline; print}')
PUBKEY=$(echo "$KEYS" | awk '/Public Key/{getline; print}')
cat > "$W/rh-server.toml" <<TOML
[server]
bind_addr = "$HUB_IP:$RH_CTRL"
[server.transport]
type = "noise"
[server.transport.noise]
local_private_key = "$PRIV"
[server.services.db]
token = "bench"
bind_addr = "127.0.0.1:$RH_PUB"
TOML
cat > "$W/rh-client.toml" <<TOML
[client]
remote_addr = "$HUB_IP:$RH_CTRL"
[client.transport]
type = "noise"
[client.transport.noise]
remote_public_key = "$PUBKEY"
[client.services.db]
token = "bench"
local_addr = "127.0.1.10:$PG"
TOML
"${A[@]}" rathole "$W/rh-server.toml" >"$W/rh-server.log" 2>&1 & PIDS+=($!)
"${B[@]}" rathole "$W/rh-client.toml" >"$W/rh-client.log" 2>&1 & PIDS+=($!)

# --- the lane relay ---
"${A[@]}" "$F" relay-hub $HUB_IP:$LANEQ 127.0.0.1:$LANE_PUB "$W/lane.der" 2>"$W/lane-hub.log" & PIDS+=($!)
for _ in $(seq 50); do [ -s "$W/lane.der" ] && break; sleep 0.1; done
"${B[@]}" "$F" relay-edge $HUB_IP:$LANEQ "$W/lane.der" 127.0.1.10:$PG 2>"$W/lane-edge.log" & PIDS+=($!)
sleep 1

# tps HOST PORT CLIENTS MODE
tps() {
    local flag=""; [ "$4" = select ] && flag="-S"
    local out
    out=$("${A[@]}" $BIN/pgbench -h "$1" -p "$2" -U postgres -n $flag -c "$3" -j 2 -T "$D" postgres 2>&1) \
        || { echo "pgbench to $1:$2 failed: $out" >&2; return 1; }
    echo "$out" | awk '/^tps/ {printf "%.0f", $3}'
}
median() { python3 -c 'import sys, statistics; print("%.0f" % statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
declare -A S
for _ in $(seq "$ROUNDS"); do
    for c in 8 32; do
        for m in select tpcb; do
            S[direct,$m,$c]+=" $(tps $PG_IP $PG $c $m)"
            S[gw,$m,$c]+=" $(tps 127.0.0.1 $PUB $c $m)"
            S[rh,$m,$c]+=" $(tps 127.0.0.1 $RH_PUB $c $m)"
            S[lane,$m,$c]+=" $(tps 127.0.0.1 $LANE_PUB $c $m)"
        done
    done
done
echo "runs (tps): $(for k in "${!S[@]}"; do echo -n "$k:${S[$k]} | "; done)" >&2
echo
echo "machine: $(nproc) cores, $(uname -r), $(date -u +%Y-%m-%d), $PATH_NAME, pgbench -s 10, $D s per run, median of $ROUNDS interleaved rounds"
echo
echo "| workload | clients | direct, tps | gatewayd, tps | rathole (noise), tps | lanes, tps | gatewayd / rathole | lanes / rathole |"
echo "|---|---|---|---|---|---|---|---|"
for m in select tpcb; do
    for c in 8 32; do
        d=$(median ${S[direct,$m,$c]}); g=$(median ${S[gw,$m,$c]}); r=$(median ${S[rh,$m,$c]}); l=$(median ${S[lane,$m,$c]})
        name=$([ $m = select ] && echo "select-only (-S)" || echo "TPC-B-like")
        echo "| $name | $c | $d | $g | $r | $l | $(python3 -c "print('%.2f' % ($g / $r))") | $(python3 -c "print('%.2f' % ($l / $r))") |"
    done
done
