#!/usr/bin/env bash
# Check-in throughput and latency of `tandem server`, SQLite vs PostgreSQL, same run,
# same load: N simulated devices (each enrolled through the real API with its own key)
# check in concurrently from one load process on loopback, with real signed requests;
# every answer's signed target state is verified by the load generator.
#
#   bench/checkin/run.sh [DEVICES] [CONCURRENCY] [ROUNDS]     (defaults 10000 64 1)
#
# Prints check-ins/s and p50/p99 latency per back-end plus the PostgreSQL/SQLite ratio,
# and the CPU seconds the server and the PostgreSQL cluster used for the whole run
# (enrollment included): unlike throughput, that hardly moves when other work shares the
# cores, so compare it between builds. Appends a CSV under bench/results/. Server and load generator share this machine's
# cores (2 on the CI machines), so absolute numbers are a floor, not a capacity plan.
# TANDEM_BENCH_BIN=PATH benchmarks that binary instead of the build's (before/after runs
# while others rebuild the shared target directory); TANDEM_BENCH_LABEL=NAME ends the CSV's
# name with -NAME.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
devices="${1:-10000}"; conc="${2:-64}"; rounds="${3:-1}"
cache="${TANDEM_BENCH_CACHE:-/var/cache/tandem/bench}/checkin"
mkdir -p "$cache" bench/results
if [ -n "${TANDEM_BENCH_BIN:-}" ]; then TANDEM_BIN="$TANDEM_BENCH_BIN"; fi
[ -x "$TANDEM_BIN" ] || cargo build --release --bin tandem
work="$(mktemp -d "$cache/run.XXXXXX")"
chmod 755 "$work"   # the PostgreSQL server runs as user postgres
pgdir="$work/pg"
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  [ -d "$pgdir/data" ] && scripts/postgres.sh stop "$pgdir" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

ticks() { # PID... -> summed user+system clock ticks of those processes (0 when gone)
  local t=0 p s
  for p in "$@"; do
    s="$(cat "/proc/$p/stat" 2>/dev/null)" || continue
    set -- ${s##*) }   # fields after "(comm)": state is $1, utime $12, stime $13
    t=$((t + ${12} + ${13}))
  done
  echo "$t"
}
db_pids() { # the private PostgreSQL's postmaster and its backends
  local pm
  pm="$(head -1 "$pgdir/data/postmaster.pid" 2>/dev/null)" || return 0
  echo "$pm" $(ps --ppid "$pm" -o pid=)
}

run_backend() { # name [database-url]
  local name="$1" db="${2:-}" out="$work/$1.out"
  local args=(server --data "$work/$1-data" --listen 127.0.0.1:0)
  [ -n "$db" ] && args+=(--database "$db")
  TANDEM_LOG=error "$TANDEM_BIN" "${args[@]}" >"$out" 2>"$work/$1.err" &
  server_pid=$!
  for _ in $(seq 1 100); do grep -q "listening on" "$out" 2>/dev/null && break; sleep 0.1; done
  local url token
  url="$(sed -n 's/^listening on //p' "$out")"
  token="$(sed -n 's/^admin token: //p' "$out")"
  [ -n "$url" ] || { cat "$work/$1.err" >&2; exit 3; }
  echo "== $name: $devices devices, concurrency $conc, rounds $rounds" >&2
  local s0 d0
  s0="$(ticks "$server_pid")"; d0="$(ticks $(db_pids))"
  "$TANDEM_BIN" server bench-checkin --server "$url" --token "$token" \
    --devices "$devices" --concurrency "$conc" --rounds "$rounds" --json >"$work/$name.json"
  echo "$(( $(ticks "$server_pid") - s0 )) $(( $(ticks $(db_pids)) - d0 )) $(getconf CLK_TCK)" >"$work/$name.cpu"
  kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
}

run_backend sqlite
pg_url="$(scripts/postgres.sh start "$pgdir")"
psql -q "$pg_url" -c "CREATE DATABASE tandem_bench" >/dev/null
run_backend postgres "${pg_url%/postgres}/tandem_bench"

csv="bench/results/checkin-$(date -u +%Y%m%d)-$(hostname)${TANDEM_BENCH_LABEL:+-$TANDEM_BENCH_LABEL}.csv"
python3 - "$work" "$csv" "$(nproc)" <<'PY'
import json, os, sys
work, csv, cpus = sys.argv[1], sys.argv[2], sys.argv[3]
rows = {b: json.load(open(os.path.join(work, b + ".json"))) for b in ("sqlite", "postgres")}
for b, r in rows.items():
    srv, db, hz = (int(x) for x in open(os.path.join(work, b + ".cpu")).read().split())
    r["server_cpu_s"], r["db_cpu_s"] = srv / hz, db / hz
base = rows["sqlite"]["checkins_per_sec"]
print(f"{'backend':<10} {'devices':>8} {'check-ins':>10} {'per sec':>9} {'p50 ms':>8} {'p99 ms':>8} {'enroll s':>9} {'vs sqlite':>10} {'server cpu s':>13} {'db cpu s':>9}")
new = not os.path.exists(csv)
with open(csv, "a") as f:
    if new:
        f.write("date,host,cpus,backend,devices,concurrency,checkins,checkins_per_sec,p50_ms,p99_ms,enroll_seconds,server_cpu_s,db_cpu_s\n")
    for b, r in rows.items():
        ratio = r["checkins_per_sec"] / base
        print(f"{b:<10} {r['devices']:>8} {r['checkins']:>10} {r['checkins_per_sec']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['enroll_seconds']:>9.1f} {ratio:>9.2f}x {r['server_cpu_s']:>13.2f} {r['db_cpu_s']:>9.2f}")
        f.write(",".join(str(x) for x in [os.popen("date -u +%FT%TZ").read().strip(), os.uname().nodename, cpus, b,
                 r["devices"], r["concurrency"], r["checkins"], f"{r['checkins_per_sec']:.1f}",
                 f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['enroll_seconds']:.2f}",
                 f"{r['server_cpu_s']:.2f}", f"{r['db_cpu_s']:.2f}"]) + "\n")
print(f"(saved {csv}; machine: {cpus} cores, server and load generator on the same cores)")
PY
