#!/usr/bin/env bash
# Sets up a fresh machine for Tandem: installs the Debian packages in scripts/packages.txt
# that are missing, builds the release binary, and builds the guest (cached by content).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

# The first Debian archive URI in the machine's own apt configuration (deb822 or one-line).
debian_mirror() {
  {
    grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
    grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}'
  } | grep -v -e security -e backports | grep '/debian/\?$' | head -n1
}

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

mapfile -t wanted < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' scripts/packages.txt | sort -u)
missing=()
for p in "${wanted[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  # qemu-system-x86 must match qemu-utils; when the machine carries the backports build of
  # qemu-utils, take QEMU from bookworm-backports too.
  backports=""
  if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q bpo; then
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    list=/etc/apt/sources.list.d/tandem-backports.list
    if ! grep -rqs "${codename}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      # The mirror is the one this machine already uses for Debian itself.
      mirror=$(debian_mirror)
      if [ -z "$mirror" ]; then
        echo "setup: cannot find this machine's Debian mirror in /etc/apt/sources.list*; add ${codename}-backports by hand" >&2
        exit 3
      fi
      echo "deb ${mirror} ${codename}-backports main" | $SUDO tee "$list" >/dev/null
    fi
    backports="${codename}-backports"
  fi
  $SUDO apt-get update -qq
  export DEBIAN_FRONTEND=noninteractive
  qemu=()
  rest=()
  for p in "${missing[@]}"; do
    case "$p" in qemu-system-x86|qemu-utils) qemu+=("$p") ;; *) rest+=("$p") ;; esac
  done
  if [ ${#qemu[@]} -gt 0 ]; then
    if [ -n "$backports" ]; then
      $SUDO apt-get install -y -qq --no-install-recommends -t "$backports" qemu-system-x86 qemu-utils
    else
      $SUDO apt-get install -y -qq --no-install-recommends "${qemu[@]}"
    fi
  fi
  if [ ${#rest[@]} -gt 0 ]; then
    $SUDO apt-get install -y -qq --no-install-recommends "${rest[@]}"
  fi
fi

echo "setup: building tandem (release) into $CARGO_TARGET_DIR"
cargo build --release --locked --bin tandem
echo "setup: building the guest into $TANDEM_GUEST_DIR"
"$TANDEM_BIN" guest build --out "$TANDEM_GUEST_DIR"
