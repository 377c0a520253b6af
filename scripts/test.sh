#!/usr/bin/env bash
# README's second command: set up a fresh machine and run the whole test suite (unit,
# crate integration and end-to-end tests with real QEMU, servers on loopback and a private
# PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh

echo "test: cargo fmt --check"
cargo fmt --all -- --check

pg_dir=""
cleanup() {
  if [ -n "$pg_dir" ] && [ -x scripts/postgres.sh ]; then scripts/postgres.sh stop "$pg_dir" || true; rm -rf "$pg_dir"; fi
}
trap cleanup EXIT
if [ -x scripts/postgres.sh ]; then
  pg_dir=$(mktemp -d /tmp/tandem-pg.XXXXXX)
  TANDEM_TEST_POSTGRES_URL=$(scripts/postgres.sh start "$pg_dir")
  export TANDEM_TEST_POSTGRES_URL
  export TANDEM_REQUIRE_POSTGRES=1
  echo "test: PostgreSQL at $TANDEM_TEST_POSTGRES_URL"
fi

echo "test: cargo test (release profile: the same build as the demo)"
cargo test --release --locked --workspace --no-fail-fast -- "$@"

# Fuzzing (fuzz/README.md): replays every kept regression input and seed, then runs each
# target for TANDEM_FUZZ_SECS (0 = replay only); a crash fails the suite.
echo "test: fuzz (cargo-afl, ${TANDEM_FUZZ_SECS:-20} s per target)"
scripts/fuzz.sh "${TANDEM_FUZZ_SECS:-20}"
