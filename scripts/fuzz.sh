#!/usr/bin/env bash
# Fuzz every parser of untrusted input for SECONDS each (default 30) with cargo-afl
# (afl.rs, AFL++), which works on the stable toolchain. Not part of scripts/test.sh: the
# instrumented build alone takes minutes on 2 cores (see fuzz/README.md).
#
#   scripts/fuzz.sh 60            # every target, 60 s each
#   scripts/fuzz.sh 300 qcow2     # one target
#
# Seeds: JSON and wire seeds from the real types (fuzz's `seeds`), disk images made with
# qemu-img, mkfs.ext4, mkfs.vfat, mkntfs, sgdisk and sfdisk. Crashes are copied to
# fuzz/crashes/<target>/ (commit them: they become regression inputs) and fail the run.
set -euo pipefail
secs=${1:-30}
shift || true
cd "$(dirname "$0")/.."
root=$PWD
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(manifest manifest_delta envelope backup_manifest nbd_request qcow2 partitions allocation)
fi
command -v cargo-afl >/dev/null || cargo install cargo-afl --locked
export CARGO_TARGET_DIR=${TANDEM_FUZZ_TARGET:-/var/cache/tandem/fuzz-target}
(cd fuzz && cargo afl build --release)
bin=$CARGO_TARGET_DIR/release
work=${TANDEM_FUZZ_DIR:-/var/cache/tandem/fuzz}
seeds=$work/seeds
rm -rf "$seeds" && mkdir -p "$seeds"
"$bin/seeds" "$seeds"

# Disk seeds (each under 1 MiB, AFL's input limit).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$seeds"/{qcow2,partitions,allocation} "$tmp/src/a"
echo hello >"$tmp/src/a/f.txt"
truncate -s 512K "$tmp/ext4.img"
mkfs.ext4 -q -F -b 1024 -N 32 -d "$tmp/src" "$tmp/ext4.img"
truncate -s 512K "$tmp/fat.img"
mkfs.vfat "$tmp/fat.img" >/dev/null
truncate -s 1M "$tmp/ntfs.img"
mkntfs -q -F -f -s 512 -c 512 "$tmp/ntfs.img" >/dev/null 2>&1 || true
head -c 1000000 "$tmp/ntfs.img" >"$seeds/allocation/ntfs-cut.img"
cp "$tmp/ext4.img" "$seeds/allocation/ext4.img"
cp "$tmp/ext4.img" "$seeds/partitions/whole-ext4.img"
cp "$tmp/fat.img" "$seeds/partitions/whole-fat.img"
truncate -s 256K "$tmp/gpt.img"
sgdisk -q -n 1:34:200 -n 2:201:400 "$tmp/gpt.img" >/dev/null
cp "$tmp/gpt.img" "$seeds/partitions/gpt.img"
truncate -s 256K "$tmp/mbr.img"
printf 'label: dos\nstart=1, size=100, type=83\nstart=101, size=200, type=5\nstart=102, size=50, type=83\n' |
  sfdisk -q "$tmp/mbr.img" >/dev/null
cp "$tmp/mbr.img" "$seeds/partitions/mbr-logical.img"
head -c 65536 /dev/zero | tr '\0' 'x' >"$tmp/data.raw"
truncate -s 256K "$tmp/data.raw"
qemu-img convert -q -O qcow2 -o cluster_size=4096 "$tmp/data.raw" "$seeds/qcow2/v3.qcow2"
qemu-img convert -q -O qcow2 -o compat=0.10,cluster_size=4096 "$tmp/data.raw" "$seeds/qcow2/v2.qcow2"
qemu-img convert -q -O qcow2 -c -o compression_type=zstd,cluster_size=4096 "$tmp/data.raw" "$seeds/qcow2/zstd.qcow2"
qemu-img create -q -f qcow2 -o cluster_size=512 "$seeds/qcow2/empty.qcow2" 1M

export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
export AFL_NO_AFFINITY=1
status=0
printf '%-16s %12s %10s %8s %8s\n' target execs execs/s paths crashes
for t in "${targets[@]}"; do
  out=$work/out/$t
  rm -rf "$out" && mkdir -p "$work/out"
  # -t: time limit per execution (ms); generous, the machine is shared.
  cargo afl fuzz -V "$secs" -t 5000 -i "$seeds/$t" -o "$out" "$bin/$t" >"$work/$t.log" 2>&1 || true
  stats=$out/default/fuzzer_stats
  if [ ! -f "$stats" ]; then
    echo "$t: afl-fuzz did not run; see $work/$t.log" >&2
    tail -20 "$work/$t.log" >&2
    status=1
    continue
  fi
  get() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
  crashes=$(get saved_crashes)
  printf '%-16s %12s %10s %8s %8s\n' "$t" "$(get execs_done)" "$(get execs_per_sec)" "$(get corpus_count)" "$crashes"
  if [ "${crashes:-0}" != 0 ]; then
    mkdir -p "$root/fuzz/crashes/$t"
    cp "$out"/default/crashes/id:* "$root/fuzz/crashes/$t/" 2>/dev/null || true
    status=1
  fi
done
exit $status
