#!/usr/bin/env bash
# Relay benchmark, side by side in one run on this machine (loopback):
#   direct   iperf3 client -> iperf3 server
#   gatewayd iperf3 client -> hub publish -> QUIC tunnel -> edge -> iperf3 server
#   rathole  iperf3 client -> rathole server -> noise tunnel -> rathole client -> iperf3 server
#   rathole-tls the same over rathole's TLS transport (native-tls, certificates
#            from the same CA as gatewayd's: the like-for-like authentication)
#   lanes    the relay's data path alone on tunnel lanes (relay::pipes, one task
#            per side: examples/quic_floor.rs relay-hub / relay-edge, one pair
#            per service), no policy or audit: what the relay gains on lanes
# Single-stream and 8-stream throughput, 64-byte request/response latency
# (p50/p99, through an echo server), RSS of the tunnel daemons idle and holding
# 1,000 idle relayed connections. Prints a markdown table with ratios: medians of
# REPS (default 3) interleaved runs, the single runs on stderr.
#
# Needs: iperf3, socat, python3, openssl (apt-get install -y iperf3 socat openssl), rathole
# (cargo install rathole). Usage: tests/bench/relay.sh [SECONDS_PER_RUN]
# LAT_ONLY=1 measures the round trips only (about a minute), for trying changes.
# NETNS=1 puts the hub side (the hub, rathole's servers, the clients) and the
# box side (the edge, rathole's clients, the iperf3 and echo servers) in two
# network namespaces joined by a veth pair with a 1,500-byte MTU, the path a
# real box has (loopback lets QUIC use 6,500-byte packets and flatters it);
# "direct" then crosses the veth too. Needs root for that.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
T=${1:-5}
for tool in iperf3 socat python3 openssl rathole; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y iperf3 socat; cargo install rathole" >&2; exit 1; }
done
# GATEWAYD=PATH measures that binary instead (another commit's, side by side).
if [ -z "${GATEWAYD:-}" ]; then
    cargo build --release -q -p gateway-daemon --bin gatewayd
fi
if [ -z "${QUIC_FLOOR:-}" ]; then
    cargo build --release -q -p gateway-daemon --example quic_floor
fi
G=${GATEWAYD:-$ROOT/target/release/gatewayd}
F=${QUIC_FLOOR:-$ROOT/target/release/examples/quic_floor}
W=$(mktemp -d)
PIDS=()
NA=gwrelay-hub NB=gwrelay-box
if [ "${NETNS:-0}" = 1 ]; then
    [ "$(id -u)" = 0 ] || { echo "NETNS=1 needs root" >&2; exit 1; }
    A=(ip netns exec $NA) B=(ip netns exec $NB)
    HUB_IP=10.77.1.1 DIRECT_IP=10.77.1.2 PATH_NAME="two namespaces, veth MTU 1500"
else
    A=() B=()
    HUB_IP=127.0.0.1 DIRECT_IP=127.0.1.10 PATH_NAME="loopback"
fi
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
    if [ "${NETNS:-0}" = 1 ]; then ip netns del $NA 2>/dev/null || true; ip netns del $NB 2>/dev/null || true; fi
    rm -rf "$W"
}
trap cleanup EXIT
if [ "${NETNS:-0}" = 1 ]; then
    ip netns del $NA 2>/dev/null || true; ip netns del $NB 2>/dev/null || true
    ip netns add $NA; ip netns add $NB
    ip link add gwr-a type veth peer name gwr-b
    ip link set gwr-a netns $NA; ip link set gwr-b netns $NB
    ip -n $NA addr add 10.77.1.1/24 dev gwr-a; ip -n $NB addr add 10.77.1.2/24 dev gwr-b
    for ns in $NA $NB; do ip -n $ns link set lo up; done
    ip -n $NA link set gwr-a mtu 1500 up; ip -n $NB link set gwr-b mtu 1500 up
fi

# Ports (fixed, loopback only; the run fails loudly if one is taken).
IPERF=15201 ECHO=15202 HUBQ=17443 PUB_IPERF=18201 PUB_ECHO=18202 RH_CTRL=12333 RH_IPERF=19201 RH_ECHO=19202
RT_CTRL=12334 RT_IPERF=19211 RT_ECHO=19212
LN_Q1=17444 LN_Q2=17445 LN_IPERF=19221 LN_ECHO=19222

for ip in $(echo "127.0.1.10 $DIRECT_IP" | tr ' ' '\n' | sort -u); do
    "${B[@]}" iperf3 -s -B $ip -p $IPERF >/dev/null 2>&1 & PIDS+=($!)
    "${B[@]}" socat TCP-LISTEN:$ECHO,bind=$ip,fork,reuseaddr,backlog=4096 EXEC:cat >/dev/null 2>&1 & PIDS+=($!)
done

# --- gatewayd: a hub and an edge ---
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
api = "127.0.0.1:19443"
ca_cert = "$W/ca/ca.pem"
ca_key = "$W/ca/ca.key"
cert = "$W/certs/bench-hub.pem"
key = "$W/certs/bench-hub.key"
[[zone]]
name = "extranet"
kind = "extranet"
level = 2
networks = ["127.0.0.0/24", "10.77.1.1/32"]
[[publish]]
service = "bench-edge/iperf"
zone = "extranet"
listen = "127.0.0.1:$PUB_IPERF"
[[publish]]
service = "bench-edge/echo"
zone = "extranet"
listen = "127.0.0.1:$PUB_ECHO"
[admin]
listen = "127.0.0.1:19601"
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
networks = ["127.0.0.0/24", "10.77.1.1/32"]
[uplink]
hubs = ["$HUB_IP:$HUBQ"]
ca = "$W/ca/ca.pem"
cert = "$W/certs/bench-edge.pem"
key = "$W/certs/bench-edge.key"
[[service]]
name = "iperf"
zone = "lab"
target = "127.0.1.10:$IPERF"
allow = ["extranet"]
[[service]]
name = "echo"
zone = "lab"
target = "127.0.1.10:$ECHO"
allow = ["extranet"]
[admin]
listen = "127.0.0.1:19600"
TOML
GW_ARGS=${GW_ARGS:-}
RUST_LOG=warn "${A[@]}" $G run --config "$W/hub.toml" $GW_ARGS 2>"$W/hub.log" & HUB=$!; PIDS+=($HUB)
sleep 0.3
RUST_LOG=warn "${B[@]}" $G run --config "$W/edge.toml" $GW_ARGS 2>"$W/edge.log" & EDGE=$!; PIDS+=($EDGE)
for _ in $(seq 100); do "${B[@]}" curl -sf 127.0.0.1:19600/readyz >/dev/null 2>&1 && break; sleep 0.1; done

# --- rathole, noise transport ---
KEYS=$(rathole --genkey)
PRIV=$(echo "$KEYS" | awk '/Private Key/{getline; print}')
PUB=$(echo "$KEYS" | awk '/Public Key/{getline; print}')
cat > "$W/rh-server.toml" <<TOML
[server]
bind_addr = "$HUB_IP:$RH_CTRL"
[server.transport]
type = "noise"
[server.transport.noise]
local_private_key = "$PRIV"
[server.services.iperf]
token = "bench"
bind_addr = "127.0.0.1:$RH_IPERF"
[server.services.echo]
token = "bench"
bind_addr = "127.0.0.1:$RH_ECHO"
TOML
cat > "$W/rh-client.toml" <<TOML
[client]
remote_addr = "$HUB_IP:$RH_CTRL"
[client.transport]
type = "noise"
[client.transport.noise]
remote_public_key = "$PUB"
[client.services.iperf]
token = "bench"
local_addr = "127.0.1.10:$IPERF"
[client.services.echo]
token = "bench"
local_addr = "127.0.1.10:$ECHO"
TOML
"${A[@]}" rathole "$W/rh-server.toml" >"$W/rh-server.log" 2>&1 & RHS=$!; PIDS+=($RHS)
"${B[@]}" rathole "$W/rh-client.toml" >"$W/rh-client.log" 2>&1 & RHC=$!; PIDS+=($RHC)

# --- rathole, TLS transport (the hub's certificate from gatewayd's CA) ---
openssl pkcs12 -export -inkey "$W/certs/bench-hub.key" -in "$W/certs/bench-hub.pem" \
    -out "$W/rt.p12" -passout pass:bench 2>/dev/null
cat > "$W/rt-server.toml" <<TOML
[server]
bind_addr = "$HUB_IP:$RT_CTRL"
[server.transport]
type = "tls"
[server.transport.tls]
pkcs12 = "$W/rt.p12"
pkcs12_password = "bench"
[server.services.iperf]
token = "bench"
bind_addr = "127.0.0.1:$RT_IPERF"
[server.services.echo]
token = "bench"
bind_addr = "127.0.0.1:$RT_ECHO"
TOML
cat > "$W/rt-client.toml" <<TOML
[client]
remote_addr = "$HUB_IP:$RT_CTRL"
[client.transport]
type = "tls"
[client.transport.tls]
trusted_root = "$W/ca/ca.pem"
hostname = "bench-hub"
[client.services.iperf]
token = "bench"
local_addr = "127.0.1.10:$IPERF"
[client.services.echo]
token = "bench"
local_addr = "127.0.1.10:$ECHO"
TOML
"${A[@]}" rathole "$W/rt-server.toml" >"$W/rt-server.log" 2>&1 & RTS=$!; PIDS+=($RTS)
"${B[@]}" rathole "$W/rt-client.toml" >"$W/rt-client.log" 2>&1 & RTC=$!; PIDS+=($RTC)

# --- the lane relay: one hub/edge pair per service ---
"${A[@]}" "$F" relay-hub $HUB_IP:$LN_Q1 127.0.0.1:$LN_IPERF "$W/ln1.der" 2>"$W/ln1-hub.log" & LNH1=$!; PIDS+=($LNH1)
"${A[@]}" "$F" relay-hub $HUB_IP:$LN_Q2 127.0.0.1:$LN_ECHO "$W/ln2.der" 2>"$W/ln2-hub.log" & LNH2=$!; PIDS+=($LNH2)
for _ in $(seq 50); do [ -s "$W/ln1.der" ] && [ -s "$W/ln2.der" ] && break; sleep 0.1; done
"${B[@]}" "$F" relay-edge $HUB_IP:$LN_Q1 "$W/ln1.der" 127.0.1.10:$IPERF 2>"$W/ln1-edge.log" & LNE1=$!; PIDS+=($LNE1)
"${B[@]}" "$F" relay-edge $HUB_IP:$LN_Q2 "$W/ln2.der" 127.0.1.10:$ECHO 2>"$W/ln2-edge.log" & LNE2=$!; PIDS+=($LNE2)
sleep 1

gbps() { # host port parallel
    "${A[@]}" iperf3 -c "$1" -p "$2" -P "$3" -t "$T" -J 2>/dev/null | python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}
cpu_ticks() { # pids... -> utime+stime in clock ticks
    local t=0; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' /proc/$p/stat))); done; echo $t
}
rss_mb() { # pids...
    local kb=0; for p in "$@"; do kb=$((kb + $(awk '/VmRSS/{print $2}' /proc/$p/status))); done; echo $((kb / 1024))
}

declare -A R
# Idle: tunnels up, nothing relayed yet.
R[gw,idle]=$(rss_mb $HUB $EDGE); R[rh,idle]=$(rss_mb $RHS $RHC); R[rt,idle]=$(rss_mb $RTS $RTC)

# Throughput: REPS runs each, gatewayd and rathole interleaved, median kept, so a
# burst of background load does not decide the ratio.
REPS=${REPS:-3}
median() { python3 -c 'import sys, statistics; print("%.2f" % statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
declare -A S
THROUGHPUT_REPS=$REPS; [ "${LAT_ONLY:-0}" = 1 ] && THROUGHPUT_REPS=0
for rep in $(seq "$THROUGHPUT_REPS"); do
    for n in 1 8; do
        S[direct,$n]+=" $(gbps $DIRECT_IP $IPERF $n)"
        c0=$(cpu_ticks $HUB $EDGE); g=$(gbps 127.0.0.1 $PUB_IPERF $n); c1=$(cpu_ticks $HUB $EDGE)
        S[gw,$n]+=" $g"; S[gw,cpu$n]+=" $(python3 -c "print(($c1 - $c0) / $(getconf CLK_TCK) / ($g * $T / 8))")"
        c0=$(cpu_ticks $RHS $RHC); r=$(gbps 127.0.0.1 $RH_IPERF $n); c1=$(cpu_ticks $RHS $RHC)
        S[rh,$n]+=" $r"; S[rh,cpu$n]+=" $(python3 -c "print(($c1 - $c0) / $(getconf CLK_TCK) / ($r * $T / 8))")"
        c0=$(cpu_ticks $RTS $RTC); r=$(gbps 127.0.0.1 $RT_IPERF $n); c1=$(cpu_ticks $RTS $RTC)
        S[rt,$n]+=" $r"; S[rt,cpu$n]+=" $(python3 -c "print(($c1 - $c0) / $(getconf CLK_TCK) / ($r * $T / 8))")"
        c0=$(cpu_ticks $LNH1 $LNE1); r=$(gbps 127.0.0.1 $LN_IPERF $n); c1=$(cpu_ticks $LNH1 $LNE1)
        S[ln,$n]+=" $r"; S[ln,cpu$n]+=" $(python3 -c "print(($c1 - $c0) / $(getconf CLK_TCK) / ($r * $T / 8))")"
    done
done
for k in direct,1 direct,8 gw,1 gw,8 rh,1 rh,8 rt,1 rt,8 ln,1 ln,8 gw,cpu8 rh,cpu8 rt,cpu8 ln,cpu8; do R[$k]=$(median ${S[$k]:-0}); done
R[gw,cpu]=${R[gw,cpu8]}; R[rh,cpu]=${R[rh,cpu8]}; R[rt,cpu]=${R[rt,cpu8]}; R[ln,cpu]=${R[ln,cpu8]}
[ "${LAT_ONLY:-0}" = 1 ] || echo "runs (Gbit/s): gatewayd 1:${S[gw,1]} 8:${S[gw,8]} | rathole noise 1:${S[rh,1]} 8:${S[rh,8]} | rathole tls 1:${S[rt,1]} 8:${S[rt,8]}" >&2

# Latency: REPS runs of 20,000 round trips each, interleaved; median of the p50s and p99s.
for rep in $(seq "$REPS"); do
    for who in direct gw rh rt ln; do
        case $who in direct) a="$DIRECT_IP $ECHO";; gw) a="127.0.0.1 $PUB_ECHO";; rh) a="127.0.0.1 $RH_ECHO";; rt) a="127.0.0.1 $RT_ECHO";; ln) a="127.0.0.1 $LN_ECHO";; esac
        read -r p50 p99 < <("${A[@]}" python3 tests/bench/rtt.py latency $a 20000)
        S[$who,p50]+=" $p50"; S[$who,p99]+=" $p99"
    done
done
for who in direct gw rh rt ln; do R[$who,p50]=$(median ${S[$who,p50]}); R[$who,p99]=$(median ${S[$who,p99]}); done
echo "runs (µs p99): gatewayd${S[gw,p99]} | rathole noise${S[rh,p99]} | rathole tls${S[rt,p99]} | lanes${S[ln,p99]}" >&2

if [ "${LAT_ONLY:-0}" = 1 ]; then
    echo "| round trip | direct | gatewayd | rathole (noise) | rathole (tls) | lanes |"
    echo "|---|---|---|---|---|---|"
    for q in p50 p99; do echo "| $q, µs | ${R[direct,$q]} | ${R[gw,$q]} | ${R[rh,$q]} | ${R[rt,$q]} | ${R[ln,$q]} |"; done
    exit 0
fi
"${A[@]}" python3 tests/bench/rtt.py hold 127.0.0.1 $PUB_ECHO 1000 4 >/dev/null & H=$!; sleep 3; R[gw,1k]=$(rss_mb $HUB $EDGE); wait $H
"${A[@]}" python3 tests/bench/rtt.py hold 127.0.0.1 $RH_ECHO 1000 4 >/dev/null & H=$!; sleep 3; R[rh,1k]=$(rss_mb $RHS $RHC); wait $H
"${A[@]}" python3 tests/bench/rtt.py hold 127.0.0.1 $RT_ECHO 1000 4 >/dev/null & H=$!; sleep 3; R[rt,1k]=$(rss_mb $RTS $RTC); wait $H

ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }
echo
echo "machine: $(nproc) cores, $(uname -r), $(date -u +%Y-%m-%d), $PATH_NAME, $T s per iperf3 run, median of $REPS interleaved runs"
echo
echo "| measure | direct | gatewayd | rathole (noise) | rathole (tls) | lanes | gatewayd / direct | gatewayd / rathole noise | gatewayd / rathole tls | lanes / rathole noise |"
echo "|---|---|---|---|---|---|---|---|---|---|"
row() { # label key [direct-key]
    local d=${R[direct,$2]:--}
    local vd=-; [ "$d" != - ] && vd=$(ratio ${R[gw,$2]} $d)
    local l=${R[ln,$2]:--} vl=-
    [ "$l" != - ] && vl=$(ratio $l ${R[rh,$2]})
    echo "| $1 | $d | ${R[gw,$2]} | ${R[rh,$2]} | ${R[rt,$2]} | $l | $vd | $(ratio ${R[gw,$2]} ${R[rh,$2]}) | $(ratio ${R[gw,$2]} ${R[rt,$2]}) | $vl |"
}
row "1 stream, Gbit/s" 1
row "8 streams, Gbit/s" 8
row "CPU seconds per GB relayed (8 streams, both daemons)" cpu
row "64 B round trip p50, µs" p50
row "64 B round trip p99, µs" p99
row "RSS idle, MB (both daemons, before any relay)" idle
row "RSS with 1,000 idle relays, MB (after the throughput runs)" 1k
