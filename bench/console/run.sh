#!/usr/bin/env bash
# Admin console: server-side time to answer the device list page with N devices, SQLite
# vs PostgreSQL, same run, same fleet shape.
#
#   bench/console/run.sh [DEVICES] [REQUESTS]      (defaults 10000 200)
#
# For each back-end: a fresh `tandem server`, N devices enrolled through the real API and
# checked in once (`tandem server bench-checkin`), a console session opened through the
# real sign-in form, then REQUESTS sequential GETs of each device-list view below. The
# time is the server's own (`Server-Timing: app;dur=`: session lookup, the paged SQL query
# and count, and rendering the HTML), so the client's overhead is not in it; the client-side
# wall time is printed beside it. Prints p50/p99 per view and appends a CSV under
# bench/results/. Server and client share this machine's cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
devices="${1:-10000}"; requests="${2:-200}"
cache="${TANDEM_BENCH_CACHE:-/var/cache/tandem/bench}/console"
mkdir -p "$cache" bench/results
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
  echo "== $name: enrolling $devices devices" >&2
  "$TANDEM_BIN" server bench-checkin --server "$url" --token "$token" \
    --devices "$devices" --concurrency 32 --rounds 1 --json >/dev/null
  echo "== $name: $requests requests per view" >&2
  python3 bench/console/measure.py "$url" "$token" "$requests" "$devices" >"$work/$name.json"
  kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
}

run_backend sqlite
pg_url="$(scripts/postgres.sh start "$pgdir")"
psql -q "$pg_url" -c "CREATE DATABASE tandem_bench" >/dev/null
run_backend postgres "${pg_url%/postgres}/tandem_bench"

csv="bench/results/console-$(date -u +%Y%m%d)-$(hostname).csv"
python3 - "$work" "$csv" "$(nproc)" <<'PY'
import json, os, sys
work, csv, cpus = sys.argv[1], sys.argv[2], sys.argv[3]
new = not os.path.exists(csv)
date = os.popen("date -u +%FT%TZ").read().strip()
print(f"{'backend':<9} {'view':<28} {'devices':>8} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'wall p50':>9} {'bytes':>8}")
with open(csv, "a") as f:
    if new:
        f.write("date,host,cpus,backend,view,devices,requests,server_p50_ms,server_p99_ms,wall_p50_ms,wall_p99_ms,page_bytes\n")
    for b in ("sqlite", "postgres"):
        for r in json.load(open(os.path.join(work, b + ".json"))):
            print(f"{b:<9} {r['view']:<28} {r['devices']:>8} {r['n']:>5} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['wall_p50']:>9.2f} {r['bytes']:>8}")
            f.write(",".join(str(x) for x in [date, os.uname().nodename, cpus, b, r["view"], r["devices"], r["n"],
                     f"{r['p50']:.3f}", f"{r['p99']:.3f}", f"{r['wall_p50']:.3f}", f"{r['wall_p99']:.3f}", r["bytes"]]) + "\n")
print(f"(saved {csv}; machine: {cpus} cores, server and client on the same cores)")
PY
