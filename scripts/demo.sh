#!/usr/bin/env bash
# README's first command: set up a fresh machine and run `tandem demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
exec "$TANDEM_BIN" demo "$@"
