#!/usr/bin/env bash
# A private PostgreSQL cluster for tests and benchmarks, on 127.0.0.1 at a free port.
#   scripts/postgres.sh start DIR   -> initializes DIR (once), starts, prints the URL on stdout
#   scripts/postgres.sh url DIR     -> prints the URL of the running cluster in DIR
#   scripts/postgres.sh stop DIR    -> stops it (the data stays in DIR)
# Runs the server as the `postgres` user when invoked as root (PostgreSQL refuses root).
# The URL uses trust authentication for user `tandem` on loopback only.
set -euo pipefail

cmd="${1:-}"; dir="${2:-}"
if [ -z "$cmd" ] || [ -z "$dir" ]; then
  echo "usage: $0 start|url|stop DIR" >&2; exit 3
fi
bin="${PG_BIN:-}"
if [ -z "$bin" ]; then
  bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
fi
if [ ! -x "$bin/pg_ctl" ]; then
  echo "postgres.sh: PostgreSQL binaries not found (install the 'postgresql' package)" >&2; exit 3
fi
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
data="$dir/data"

url() { echo "postgres://tandem@127.0.0.1:$(cat "$dir/port")/postgres"; }

case "$cmd" in
  start)
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
    if [ ! -f "$data/PG_VERSION" ]; then
      as_pg "$bin/initdb" -D "$data" -A trust -U tandem >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 3; }
    fi
    if as_pg "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then url; exit 0; fi
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    echo "$port" > "$dir/port"
    as_pg "$bin/pg_ctl" -D "$data" -w -t 60 -l "$data/log" \
      -o "-k $data -h 127.0.0.1 -p $port -c max_connections=300 -c fsync=on" start >&2 \
      || { tail -20 "$data/log" >&2; exit 3; }
    url
    ;;
  url) url ;;
  stop)
    as_pg "$bin/pg_ctl" -D "$data" -w -m fast stop >&2 || true
    ;;
  *) echo "usage: $0 start|url|stop DIR" >&2; exit 3 ;;
esac
