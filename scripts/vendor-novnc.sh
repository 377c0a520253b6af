#!/usr/bin/env bash
# Fetches noVNC (the `@novnc/novnc` package from the npm registry) with `npm pack`, checks the
# tarball against the pinned SHA-256 below, and unpacks its ES modules (`core/`, `vendor/`) and
# licences into DEST (default: $TANDEM_NOVNC_DIR or /var/cache/tandem/novnc). The laptop UI and
# the server's VDI viewer serve these files from disk; nothing is downloaded at run time.
# The registry comes from the machine's npm configuration; this script names no host.
# Idempotent: an existing DEST with the right stamp is left alone.
set -euo pipefail

NOVNC_VERSION=1.7.0
NOVNC_SHA256=32689f18d6abe96bc6530828a6bd0b9ae33bda07c083a6575ed255b5a8f2e903

dest="${1:-${TANDEM_NOVNC_DIR:-/var/cache/tandem/novnc}}"
stamp="$dest/.tandem-novnc-$NOVNC_VERSION-$NOVNC_SHA256"
if [ -f "$stamp" ]; then
  echo "novnc: $NOVNC_VERSION already in $dest"
  exit 0
fi
command -v npm >/dev/null || { echo "novnc: npm not found; install Debian's npm (or Node.js) and retry" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "@novnc/novnc@$NOVNC_VERSION" >/dev/null)
tarball="$work/novnc-novnc-$NOVNC_VERSION.tgz"
got=$(sha256sum "$tarball" | cut -d' ' -f1)
if [ "$got" != "$NOVNC_SHA256" ]; then
  echo "novnc: checksum mismatch for @novnc/novnc@$NOVNC_VERSION: got $got, pinned $NOVNC_SHA256;" \
       "refusing to vendor it (if the version was bumped on purpose, update the pin in $0)" >&2
  exit 1
fi
tar -xzf "$tarball" -C "$work"
rm -rf "$dest.new"
mkdir -p "$dest.new"
cp -r "$work/package/core" "$work/package/vendor" "$work/package/LICENSE.txt" "$work/package/AUTHORS" "$dest.new/" 2>/dev/null \
  || cp -r "$work/package/core" "$work/package/vendor" "$dest.new/"
[ -d "$work/package/docs" ] && cp -r "$work/package/docs" "$dest.new/licences"
touch "$dest.new/.tandem-novnc-$NOVNC_VERSION-$NOVNC_SHA256"
rm -rf "$dest"
mv "$dest.new" "$dest"
echo "novnc: vendored @novnc/novnc@$NOVNC_VERSION into $dest"
