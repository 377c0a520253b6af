#!/usr/bin/env bash
# Fuzz every parser of untrusted input with cargo-afl (afl.rs + AFL++, stable toolchain):
# install cargo-afl (pinned), build the targets instrumented, replay the committed
# regression inputs and the seeds (fuzz/tests/replay.rs), then run each target for
# SECONDS (default 30; 0 = replay only). scripts/test.sh runs it after the main tests.
#
#   scripts/fuzz.sh 20            # every target, 20 s each (what CI does)
#   scripts/fuzz.sh 600 qcow2     # one target for 10 minutes
#
# A crash fails the run and is copied to fuzz/regressions/<target>/crash-<sha256 prefix>:
# commit it with the fix, and the replay test keeps it fixed. Hangs (an input that takes
# over 5 s, -t) are reported and kept in $TANDEM_FUZZ_DIR/hangs/<target>/, not failed on:
# on a shared 2-core machine a slow execution is not proof of a loop.
# Per-target numbers go to $TANDEM_FUZZ_DIR/summary.txt (TANDEM_FUZZ_DIR defaults to
# /var/cache/tandem/fuzz). The instrumented build lives in /var/cache/tandem/fuzz-target.
set -euo pipefail
secs=${1:-30}
shift || true
cd "$(dirname "$0")/.."
root=$PWD
AFL_VERSION=0.18.2
phase_start=$SECONDS
phase() {
  echo "fuzz: $1 took $((SECONDS - phase_start)) s"
  phase_start=$SECONDS
}

have=$(cargo afl --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$AFL_VERSION" ]; then
  echo "fuzz: installing cargo-afl $AFL_VERSION (builds AFL++; found '${have:-none}')"
  cargo install cargo-afl --version "$AFL_VERSION" --locked --force
  phase "installing cargo-afl"
fi

export CARGO_TARGET_DIR=${TANDEM_FUZZ_TARGET:-/var/cache/tandem/fuzz-target}
# The product's exact dependency versions: fuzz/Cargo.lock starts as the main lock, and
# cargo adds only afl.rs's own crates (and drops what fuzz/ does not use).
cp Cargo.lock fuzz/Cargo.lock
(cd fuzz && cargo afl build --release)
phase "instrumented build"
# The replay test, instrumented too so it reuses the build above (a plain build would
# link YARA-X through tandem-agent: see crates/scan/Cargo.toml).
(cd fuzz && cargo afl test --release --test replay)
phase "replay of regressions and seeds"
[ "$secs" -gt 0 ] || exit 0

bin=$CARGO_TARGET_DIR/release
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <("$bin/seeds" --list)
fi
work=${TANDEM_FUZZ_DIR:-/var/cache/tandem/fuzz}
seeds=$work/seeds
rm -rf "$seeds" && mkdir -p "$seeds"
"$bin/seeds" "$seeds"
phase "seeds"

# No UI, any CPU, and no refusal over the machine's crash-report or CPU-frequency setup
# (core_pattern may pipe to a crash handler; AFL++ then only warns).
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
export AFL_NO_AFFINITY=1
status=0
summary=$work/summary.txt
printf '%-16s %10s %8s %6s %8s %7s %6s\n' target execs execs/s corpus edges crashes hangs | tee "$summary"
for t in "${targets[@]}"; do
  out=$work/out/$t
  rm -rf "$out" && mkdir -p "$work/out"
  extra=()
  case $t in
    # Disk images (up to 1 MiB): havoc only, no trimming, or 20 s go to one input.
    qcow2 | partitions | allocation | scan_*) extra=(-z) ;;
  esac
  if [ "${#extra[@]}" -gt 0 ]; then export AFL_DISABLE_TRIM=1; else unset AFL_DISABLE_TRIM; fi
  # -t: time limit per execution (ms); generous, the machine is shared.
  cargo afl fuzz -V "$secs" -t 5000 "${extra[@]}" -i "$seeds/$t" -o "$out" "$bin/$t" >"$work/$t.log" 2>&1 || true
  stats=$out/default/fuzzer_stats
  if [ ! -f "$stats" ]; then
    echo "fuzz: $t: afl-fuzz did not run; see $work/$t.log" >&2
    tail -20 "$work/$t.log" >&2
    status=1
    continue
  fi
  get() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
  crashes=$(get saved_crashes)
  hangs=$(get saved_hangs)
  printf '%-16s %10s %8s %6s %8s %7s %6s\n' "$t" "$(get execs_done)" "$(get execs_per_sec)" \
    "$(get corpus_count)" "$(get edges_found)/$(get total_edges)" "$crashes" "$hangs" | tee -a "$summary"
  if [ "${crashes:-0}" != 0 ]; then
    mkdir -p "$root/fuzz/regressions/$t"
    for c in "$out"/default/crashes/id:*; do
      cp "$c" "$root/fuzz/regressions/$t/crash-$(sha256sum <"$c" | head -c 16)"
    done
    echo "fuzz: $t: $crashes crash(es), kept in fuzz/regressions/$t/" >&2
    status=1
  fi
  if [ "${hangs:-0}" != 0 ]; then
    mkdir -p "$work/hangs/$t"
    cp "$out"/default/hangs/id:* "$work/hangs/$t/" 2>/dev/null || true
    echo "fuzz: $t: $hangs hang(s) over 5 s, kept in $work/hangs/$t/" >&2
  fi
done
phase "fuzzing ${#targets[@]} targets for $secs s each"
exit $status
