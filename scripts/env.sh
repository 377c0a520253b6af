# Sourced by the project's scripts: one cargo target directory outside the clone when the
# machine has one (CI caches it), so dependencies are compiled once per machine.
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  if mkdir -p /var/cache/tandem/target 2>/dev/null && [ -w /var/cache/tandem/target ]; then
    export CARGO_TARGET_DIR=/var/cache/tandem/target
  else
    export CARGO_TARGET_DIR="$(pwd)/target"
  fi
fi
export TANDEM_BIN="$CARGO_TARGET_DIR/release/tandem"
export TANDEM_GUEST_DIR="${TANDEM_GUEST_DIR:-/var/cache/tandem/guest}"
