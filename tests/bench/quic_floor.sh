#!/usr/bin/env bash
# The latency floor of the tunnel's transport on this machine, beside TCP's:
# 64-byte round trips between two processes over one quinn stream (the
# tunnel's transport and endpoint settings), over the tunnel's lane driver
# (tunnel::lane: quinn-proto driven by one task per process on quinn-udp's
# batched socket, no quinn driver tasks: what a relay on the lane can reach),
# and over one TCP connection, with the echo
# server's CPU time per round trip (user and system, /proc/PID/stat).
# A relay through gatewayd crosses one QUIC hop each way; rathole's crosses a
# TCP hop: the difference between the two rows is the part of
# tests/bench/relay.sh's latency gap that comes with quinn.
#
# Usage: tests/bench/quic_floor.sh [ROUND_TRIPS] (default 20000), REPS runs each
# (default 3), interleaved; prints the median of each column. QUIC_FLOOR=PATH
# runs another build of the example.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-20000}
REPS=${REPS:-3}
if [ -z "${QUIC_FLOOR:-}" ]; then
    cargo build --release -q -p gateway-daemon --example quic_floor
fi
F=${QUIC_FLOOR:-$PWD/target/release/examples/quic_floor}
W=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
QUIC=127.0.0.1:16401 TCP=127.0.0.1:16402 PROTO=127.0.0.1:16403
"$F" quic-server $QUIC "$W/cert.der" & QS=$!; PIDS+=($QS)
"$F" proto-server $PROTO "$W/proto.der" & PS=$!; PIDS+=($PS)
"$F" tcp-server $TCP & TS=$!; PIDS+=($TS)
for _ in $(seq 50); do [ -s "$W/cert.der" ] && [ -s "$W/proto.der" ] && break; sleep 0.1; done

ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
# run NAME PID CLIENT-ARGS...: appends "p50 p99 user_us sys_us" to $W/NAME
run() {
    local name=$1 pid=$2; shift 2
    read -r u0 s0 < <(ticks "$pid")
    read -r p50 p99 < <("$F" "$@")
    read -r u1 s1 < <(ticks "$pid")
    echo "$p50 $p99 $(( (u1 - u0) * 1000000 / HZ / N )) $(( (s1 - s0) * 1000000 / HZ / N ))" >> "$W/$name"
}
for _ in $(seq "$REPS"); do
    run quic $QS quic-client $QUIC "$W/cert.der" "$N"
    run proto $PS proto-client $PROTO "$W/proto.der" "$N"
    run tcp $TS tcp-client $TCP "$N"
done
median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
col() { cut -d' ' -f"$2" "$W/$1" | median; }
echo "runs (p50 p99 user sys): quic $(paste -sd'|' "$W/quic") | proto $(paste -sd'|' "$W/proto") | tcp $(paste -sd'|' "$W/tcp")" >&2
echo
echo "machine: $(nproc) cores, $(uname -r), $(date +%F), $N round trips of 64 B, median of $REPS interleaved runs"
echo
echo "| transport | p50, µs | p99, µs | echo server CPU per round trip, user µs | system µs |"
echo "|---|---|---|---|---|"
for t in quic proto tcp; do
    echo "| $t | $(col $t 1) | $(col $t 2) | $(col $t 3) | $(col $t 4) |"
done
