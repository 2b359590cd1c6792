#!/usr/bin/env bash
# A province on this machine (issue 19): two hubs on one PostgreSQL 15
# database and N simulated edges (examples/fleet_sim.rs: one process, each
# edge with its own certificate and QUIC connection to both hubs, running the
# real edge's tunnel, control session and config applier). It drives:
#   connect:  all N connect (the simulator starts 500 edges a second);
#             CHANNEL_SHARE of them (default 0.02) run a channel on the real
#             buffer with a producer adding a record every 5 s, RENEW_SHARE
#             (default 0.05) start on a certificate due for renewal (5 minutes
#             left) and renew it over their control session;
#   steady:   STEADY seconds (default 120): each hub's RSS and CPU per edge;
#   restart:  hub 1 killed with -9 and started again: time until 99 % and
#             100 % of the edges have their tunnel to it back, and the CPU
#             each process used meanwhile;
#   rollout:  a template (the edges' own file, config_try changed) rolled out
#             to all N in waves 1%,10%,50%,100% with --soak 1s: time until done;
#   revoke:   one edge revoked at hub 2: time until its tunnels are closed;
#   renew:    how many of the short-lived certificates were renewed;
#   query:    gatewayctl devices list --selector over the N devices.
# After the restart it says why it took what it took: the edges' connect
# failures by error, hub 1's log lines by message (HUB_LOG, default warn, is
# the hubs' RUST_LOG; SIM_LOG the simulator's), UDP datagrams dropped, and
# PostgreSQL's statements by time.
# PostgreSQL runs from Debian's packages in a temporary directory (fsync on).
# Certificates of the simulated edges are kept in FLEET_CACHE (default
# /var/tmp/gw-fleet-cache) for the next run.
#
# Needs: curl, python3, postgresql-15.
# Usage: tests/bench/fleet.sh N   (env STEADY=120 CHANNEL_SHARE=0.02 RENEW_SHARE=0.05)
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-1000}
STEADY=${STEADY:-120}
CHANNEL_SHARE=${CHANNEL_SHARE:-0.02}
RENEW_SHARE=${RENEW_SHARE:-0.05}
CACHE=${FLEET_CACHE:-/var/tmp/gw-fleet-cache}
PGBIN=/usr/lib/postgresql/15/bin
for tool in curl python3 "$PGBIN/initdb"; do
    command -v "$tool" >/dev/null || [ -x "$tool" ] || { echo "missing $tool: apt-get install -y curl postgresql-15" >&2; exit 1; }
done
if [ -z "${GATEWAYD:-}" ]; then
    cargo build --release -q -p gateway-daemon --bins --example fleet_sim
fi
G=${GATEWAYD:-$PWD/target/release/gatewayd}
CTL=${GATEWAYCTL:-$PWD/target/release/gatewayctl}
SIM=${FLEET_SIM:-$PWD/target/release/examples/fleet_sim}
ulimit -n 65536 || true
W=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}")
chmod 755 "$W"
PIDS=()
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    as_pg "$PGBIN/pg_ctl" stop -D "$W/pg/data" -m immediate -w >/dev/null 2>&1 || true
    rm -rf "$W"
}
trap cleanup EXIT
PGPORT=17433
mkdir -p "$W/pg/data" "$W/pg/sock"
[ "$(id -u)" = 0 ] && chown -R postgres:postgres "$W/pg"
as_pg "$PGBIN/initdb" -D "$W/pg/data" -U postgres --auth-local=trust -E UTF8 --no-instructions >/dev/null
as_pg "$PGBIN/pg_ctl" start -D "$W/pg/data" -w -t 60 -l "$W/pg/sock/log" \
    -o "-k $W/pg/sock -p $PGPORT -c listen_addresses='' -c fsync=on -c synchronous_commit=on -c max_connections=100 -c shared_preload_libraries=pg_stat_statements" >/dev/null
"$PGBIN/psql" -h "$W/pg/sock" -p $PGPORT -U postgres -X -q -c "CREATE DATABASE hubs"
pgq() { "$PGBIN/psql" -h "$W/pg/sock" -p $PGPORT -U postgres -X -q -d hubs -At "$@"; }
pgq -c "CREATE EXTENSION pg_stat_statements"

# One CA for the hubs and the cached edge certificates.
if [ ! -f "$CACHE/ca/ca.key" ]; then
    rm -rf "$CACHE"; mkdir -p "$CACHE"
    $G pki init --out "$CACHE/ca" >/dev/null
fi
for h in 1 2; do $G pki issue --ca "$CACHE/ca" --id fleet-hub-$h --san 127.0.0.21$h --out "$W/c" >/dev/null; done

hub_toml() { # N
    cat <<TOML
[node]
id = "fleet-hub-$1"
role = "hub"
state_dir = "$W/h$1"
[hub]
listen = "127.0.0.21$1:1760$1"
api = "127.0.0.21$1:1761$1"
ops = "127.0.0.21$1:1762$1"
ca_cert = "$CACHE/ca/ca.pem"
ca_key = "$CACHE/ca/ca.key"
cert = "$W/c/fleet-hub-$1.pem"
key = "$W/c/fleet-hub-$1.key"
cert_lifetime = "30d"
store = "postgres"
# Every simulated box comes from 127.0.0.1, which no two real sites share:
# a ban of one (say, a box whose certificate expired mid-storm) would shut
# out the whole simulated province. Alarms are still raised.
[detect]
never_ban = ["127.0.0.1"]
[[zone]]
name = "extranet"
kind = "extranet"
level = 2
networks = ["127.0.0.0/24"]
[admin]
listen = "127.0.0.1:1763$1"
[hub.postgres]
connect = "host=$W/pg/sock port=$PGPORT dbname=hubs user=postgres sslmode=disable"
pool = 16
TOML
}
HUBPID=()
start_hub() { # N
    RUST_LOG=${HUB_LOG:-warn} $G run --config "$W/hub$1.toml" 2>>"$W/hub$1.log" &
    HUBPID[$1]=$!; PIDS+=($!)
    for _ in $(seq 400); do curl -sf 127.0.0.1:1763$1/readyz >/dev/null 2>&1 && return; sleep 0.05; done
    echo "hub $1 did not become ready" >&2; tail "$W/hub$1.log" >&2; exit 1
}
for h in 1 2; do mkdir -p "$W/h$h"; hub_toml $h > "$W/hub$h.toml"; done
start_hub 1
$G accounts add --config "$W/hub1.toml" --name sam --role system --out "$W/sam.cred" >/dev/null
$G accounts add --config "$W/hub1.toml" --name sue --role security --out "$W/sue.cred" >/dev/null
start_hub 2
ctl() { # ACCOUNT ARGS...
    local who=$1; shift
    GATEWAYCTL_HUB=127.0.0.212:17622 GATEWAYCTL_CA="$CACHE/ca/ca.pem" GATEWAYCTL_CREDENTIALS="$W/$who.cred" "$CTL" "$@"
}
now() { date +%s.%N; }
ticks() { awk '{print $14 + $15}' /proc/$1/stat; }
pg_ticks() { # the PostgreSQL server and its backends
    local pm; pm=$(head -n 1 "$W/pg/data/postmaster.pid")
    { echo "$pm"; ps -o pid= --ppid "$pm"; } | while read -r p; do awk '{print $14 + $15}' /proc/$p/stat 2>/dev/null; done | awk '{s += $1} END {print s + 0}'
}
udp_drops() { awk '/^Udp:/ && $2 ~ /^[0-9]+$/ {print $6}' /proc/net/snmp; }  # RcvbufErrors, host-wide
sock_drops() { # PORT: datagrams the kernel dropped on that port's sockets (buffer full)
    ss -uamnH "sport = :$1" | grep -o 'd[0-9]*)' | tr -d 'd)' | awk '{s += $1} END {print s + 0}'
}
rss_kib() { awk '/VmRSS/ {print $2}' /proc/$1/status; }
last() { tail -n 1 "$W/sim.jsonl"; }
field() { last | python3 -c "import json,sys; v=json.load(sys.stdin); print(eval(sys.argv[1], {}, v))" "$1"; }
wait_for() { # PYTHON-EXPR-ON-THE-LAST-LINE TIMEOUT-S
    local until=$(( $(date +%s) + $2 ))
    while [ "$(date +%s)" -lt $until ]; do
        [ -s "$W/sim.jsonl" ] && [ "$(field "$1")" = True ] && return 0
        sleep 0.1
    done
    echo "timed out waiting for $1: $(last)" >&2; return 1
}
WATCH=sim-00042
[ "$N" -le 42 ] && WATCH=sim-00000

echo "== fleet of $N simulated edges, two hubs on PostgreSQL ($(nproc) cores, $(date -u +%Y-%m-%d))"
t0=$(now)
RUST_LOG=${SIM_LOG:-warn} "$SIM" --ca-dir "$CACHE/ca" --dir "$CACHE/edges" --hub 127.0.0.211:17601 --hub 127.0.0.212:17602 \
    --edges "$N" --heartbeat 10s --every 250ms --watch $WATCH \
    --channel-share "$CHANNEL_SHARE" --channel-every 5s --renew-share "$RENEW_SHARE" --renew-left 5m \
    > "$W/sim.jsonl" 2>"$W/sim.log" &
SIMPID=$!; PIDS+=($SIMPID)
wait_for "up_all == $N and edges == $N" 900
t1=$(now)
printf 'connect: all %d edges up to both hubs %.1f s after the simulator started\n' "$N" "$(echo "$t1 - $t0" | bc)"

# Steady state.
sleep 15
c1a=$(ticks ${HUBPID[1]}); c2a=$(ticks ${HUBPID[2]}); ca=$(ticks $SIMPID); ts=$(now); ma=$(field records_made); sa=$(udp_drops)
sleep "$STEADY"
c1b=$(ticks ${HUBPID[1]}); c2b=$(ticks ${HUBPID[2]}); cb=$(ticks $SIMPID); te=$(now); mb=$(field records_made); sb=$(udp_drops)
printf 'channels: %s of the edges each add a record every 5 s: %d records in the steady state, %s waiting in the buffers at its end\n' \
    "$CHANNEL_SHARE" "$((mb - ma))" "$(field records_waiting)"
echo "steady: UDP datagrams dropped for full receive buffers: $((sb - sa)) on the host"
r1=$(rss_kib ${HUBPID[1]}); r2=$(rss_kib ${HUBPID[2]}); rs=$(rss_kib $SIMPID)
python3 - "$N" "$ts" "$te" "$c1a" "$c1b" "$c2a" "$c2b" "$ca" "$cb" "$r1" "$r2" "$rs" <<'PY'
import os, sys
n, ts, te = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
c = list(map(int, sys.argv[4:10])); r1, r2, rs = map(int, sys.argv[10:13])
hz = os.sysconf('SC_CLK_TCK'); d = te - ts
cpu = lambda a, b: (b - a) / hz / d * 100
print(f"steady ({d:.0f} s): hub 1 {cpu(c[0], c[1]):.1f} % of a core, {r1 / 1024:.0f} MiB RSS ({r1 / n:.1f} KiB per edge); "
      f"hub 2 {cpu(c[2], c[3]):.1f} %, {r2 / 1024:.0f} MiB ({r2 / n:.1f} KiB per edge); simulator {cpu(c[4], c[5]):.1f} %, {rs / 1024:.0f} MiB")
PY

# Hub 1 killed and restarted.
kill -9 "${HUBPID[1]}"; wait "${HUBPID[1]}" 2>/dev/null || true
wait_for "up[0] == 0" 60
tr=$(now); c2a=$(ticks ${HUBPID[2]}); ca=$(ticks $SIMPID); pa=$(pg_ticks); ua=$(udp_drops); pgq -c "SELECT pg_stat_statements_reset()" >/dev/null
start_hub 1
c1a=$(ticks ${HUBPID[1]})
n99=$(( (N * 99 + 99) / 100 ))
wait_for "up[0] >= $n99" 600; t99=$(now)
wait_for "up[0] == $N" 600; t100=$(now)
c1b=$(ticks ${HUBPID[1]}); c2b=$(ticks ${HUBPID[2]}); cb=$(ticks $SIMPID); pb=$(pg_ticks)
printf 'restart: hub 1 back; 99 %% of the edges reconnected %.1f s after its start, 100 %% %.1f s\n' \
    "$(echo "$t99 - $tr" | bc)" "$(echo "$t100 - $tr" | bc)"
python3 - "$tr" "$t100" "$c1a" "$c1b" "$c2a" "$c2b" "$ca" "$cb" "$pa" "$pb" <<'PY'
import os, sys
d = float(sys.argv[2]) - float(sys.argv[1]); t = list(map(int, sys.argv[3:11])); hz = os.sysconf('SC_CLK_TCK')
cores = lambda a, b: (b - a) / hz / d
parts = [("hub 1", cores(t[0], t[1])), ("hub 2", cores(t[2], t[3])), ("simulator", cores(t[4], t[5])), ("PostgreSQL", cores(t[6], t[7]))]
print(f"restart CPU over those {d:.0f} s, in cores (of {os.cpu_count()}): " + ", ".join(f"{n} {c:.2f}" for n, c in parts) + f"; all {sum(c for _, c in parts):.2f}")
PY
grep -h "handshakes_deferred" <(curl -s 127.0.0.1:17631/metrics) | grep -v '^#' || true
echo "PostgreSQL's statements meanwhile, by time spent (ms, calls, statement):"
pgq -F ' ' -c "SELECT round(total_exec_time), calls, left(regexp_replace(query, '\s+', ' ', 'g'), 110)
    FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 8"
echo "UDP datagrams dropped for full receive buffers meanwhile: $(( $(udp_drops) - ua )) on the host, $(sock_drops 17601) of them at hub 1's sockets"
# Why the edges' attempts failed meanwhile (their first three failures each).
echo "edges' connect failures logged since the start, by error:"
grep 'Tunnel connect failed' "$W/sim.log" | sed -e 's/\x1b\[[0-9;]*m//g' -e 's/.*error=\(.*\) failures=.*/\1/' \
    | sed -e 's/sim-[0-9]*/sim-N/g' | sort | uniq -c | sort -rn | head -n 8 || true
# Hub 1's timestamped lines since its restart (continuation lines such as
# hints carry no time and are left out).
sed -e 's/\x1b\[[0-9;]*m//g' "$W/hub1.log" \
    | awk -v t="$(date -u -d @"${tr%.*}" +%Y-%m-%dT%H:%M:%S)" '$1 ~ /^[0-9]/ && $1 >= t' > "$W/hub1.since"
echo "hub 1's log lines since its restart, by message:"
sed -E -e 's/^[^ ]+ +(INFO|WARN|ERROR) //' -e 's/^([a-z_]+(\{[^}]*\})?:)+ //' -e 's/^[a-z_:]+: //' -e 's/ [a-z_]+=.*//' \
    "$W/hub1.since" | sort | uniq -c | sort -rn | head -n 8 || true
grep 'Tunnel handshake failed' "$W/hub1.since" | sed -e 's/.* error=//' | sort | uniq -c | sort -rn | head -n 4 \
    | sed 's/^/  handshake failed: /' || true

# A rollout to all N in four waves.
# The template is the simulated box's own file with its id as a placeholder.
python3 - "$CACHE" "$W/template.toml" <<'PY'
import sys
cache, out = sys.argv[1], sys.argv[2]
hubs = '"127.0.0.211:17601", "127.0.0.212:17602"'
t = f'''[node]
id = "{{{{ device }}}}"
role = "edge"
state_dir = "{cache}/edges/{{{{ device }}}}"

[[zone]]
name = "lab"
kind = "legacy"
classified = false
level = 2
networks = ["10.99.0.0/16"]
assessment = {{ id = "SIM-1", valid_until = 2099-12-31 }}

[[zone]]
name = "extranet"
kind = "extranet"
level = 2
networks = ["127.0.0.0/24"]

[uplink]
hubs = [{hubs}]
ca = "{cache}/ca/ca.pem"
cert = "{cache}/edges/{{{{ device }}}}/{{{{ device }}}}.pem"
key = "{cache}/edges/{{{{ device }}}}/{{{{ device }}}}.key"
heartbeat = "10s"
config_try = "59s"

[[channel]]
name = "readings"
zone = "lab"
formats = ["json"]
max_bytes = "16MiB"
'''
open(out, "w").write(t)
PY
ctl sam template push sim "$W/template.toml" >/dev/null
tq=$(now)
id=$(ctl sam rollout start --template sim --waves 1%,10%,50%,100% --max-failures 1% --soak 1s 2>"$W/rollout.err") \
    || { cat "$W/rollout.err" >&2; exit 1; }
ctl sam rollout status "$id" --wait --timeout 30m > "$W/rollout.txt" 2>"$W/rollout.progress"
td=$(now)
printf 'rollout: %s to all %d edges in 4 waves: %.1f s (%s)\n' "$id" "$N" "$(echo "$td - $tq" | bc)" "$(head -n 1 "$W/rollout.txt")"
grep -E '^wave|^  (failed|reverted|silent)' "$W/rollout.txt" | head -n 20 || true
# What hub 1 knows of the first silent ones, right after the rollout stopped.
cat > "$W/silent.py" <<'PY'
import json, sys, time
d = json.load(sys.stdin); now = time.time() * 1000
hb = d.get("last_heartbeat_ms"); s = d.get("status") or {}
age = f"{(now - hb) / 1000:.0f} s ago" if hb else "never"
result = json.dumps(d.get("config_result"))[:120]
print(f"  silent {d['id']}: state {d['state']}, connected to hub 1 {d['connected']}, last heartbeat {age}, "
      f"config applied {d.get('config_applied')} of {d.get('config_desired')}, heartbeat says config "
      f"{s.get('config_version')} (trying {s.get('config_trying')}), result {result}")
PY
for d in $(grep -E '^  silent: ' "$W/rollout.txt" | head -n 5 | awk '{print $2}'); do
    ctl sam devices show "$d" --format json | python3 "$W/silent.py" || true
done

# A revocation.
tv=$(now)
ctl sue revoke $WATCH >/dev/null
wait_for "watch_up == 0" 120; tw=$(now)
printf 'revoke: %s cut from both hubs %.2f s after gatewayctl revoke (simulator sampled every 0.25 s)\n' "$WATCH" "$(echo "$tw - $tv" | bc)"

# Renewals (a share started on certificates due for renewal, 5 minutes
# left) and the channels after the restart and the rollout.
renewing=$(python3 -c "import math,sys; n,s=int(sys.argv[1]),float(sys.argv[2]); print(sum(1 for i in range(n) if math.floor((i+1)*s) > math.floor(i*s)))" "$N" "$RENEW_SHARE")
wait_for "renewed >= $renewing" 120 || true
printf 'renewals: %s of %s edges started on a certificate due for renewal renewed it over their control session (%.0f s after the simulator started)\n' \
    "$(field renewed)" "$renewing" "$(echo "$(now) - $t0" | bc)"
printf 'channels: %s records made in all, %s waiting in the buffers\n' "$(field records_made)" "$(field records_waiting)"

# Selector queries over the whole fleet, and what any gatewayctl call costs
# (a process, a TLS handshake, the credential's check) for comparison.
best=
for _ in 1 2 3; do
    a=$(now); ctl sam whoami >/dev/null; b=$(now)
    ms=$(echo "($b - $a) * 1000 / 1" | bc)
    if [ -z "$best" ] || [ "$ms" -lt "$best" ]; then best=$ms; fi
done
printf 'query: gatewayctl whoami (no device read): %d ms (best of 3)\n' "$best"
for sel in "state=online" "config=drift" "state=revoked"; do
    best=
    for _ in 1 2 3; do
        a=$(now); n=$(ctl sam devices list --selector "$sel" --page-size 5000 --format csv | tail -n +2 | wc -l); b=$(now)
        ms=$(echo "($b - $a) * 1000 / 1" | bc)
        if [ -z "$best" ] || [ "$ms" -lt "$best" ]; then best=$ms; fi
    done
    printf 'query: devices list --selector %s: %d devices, %d ms (best of 3, gatewayctl included)\n' "$sel" "$n" "$best"
done
