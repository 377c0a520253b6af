#!/usr/bin/env python3
"""Boot-time overhead of Tandem's VM supervisor versus bare QEMU.

Boots the same guest N times through `tandem vm run` and through the equivalent bare
`qemu-system-x86_64` command (the exact arguments `tandem vm run --print-qemu-command`
prints), in alternation, and reports the median time from launch to the guest's release
marker on the serial console, and their ratio. Goal: Tandem adds under 5%.

Usage: bench/boot/run.py [N]   (needs scripts/setup.sh to have run)
"""
import csv, os, platform, statistics, subprocess, sys, tempfile, time

MARKER = b"tandem-release: "
N = int(sys.argv[1]) if len(sys.argv) > 1 else 10
target = os.environ.get("CARGO_TARGET_DIR", "/var/cache/tandem/target")
tandem = os.environ.get("TANDEM_BIN", os.path.join(target, "release", "tandem"))
guest = os.environ.get("TANDEM_GUEST_DIR", "/var/cache/tandem/guest")
common = ["--image", "gold-v1", "--guest-dir", guest, "--accel", "auto"]


def time_to_marker(cmd, stop):
    """Launches cmd, returns seconds until MARKER appears on its stdout."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    buf = b""
    try:
        while True:
            chunk = p.stdout.readline()
            if not chunk:
                raise RuntimeError(f"{cmd[0]} exited before the marker")
            buf += chunk
            if MARKER in chunk:
                return time.monotonic() - t0
    finally:
        stop(p)


def stop_kill(p):
    p.kill()
    p.wait()


def main():
    qemu_cmd = subprocess.run([tandem, "vm", "run", "--name", "bench", *common, "--print-qemu-command"],
                              check=True, capture_output=True, text=True).stdout.split("\n")
    qemu_cmd = [a for a in qemu_cmd if a]
    # The bare run gets its own monitor socket path, like Tandem's.
    qmp_tmp = tempfile.mkdtemp()
    qemu_cmd = [a.replace(os.path.join(tempfile.gettempdir(), "tandem-bench-qmp.sock"),
                          os.path.join(qmp_tmp, "qmp.sock")) for a in qemu_cmd]
    tandem_cmd = [tandem, "vm", "run", "--name", "bench", *common, "--exit-on", MARKER.decode()]
    rows = []
    for i in range(N):
        for kind, cmd in (("tandem", tandem_cmd), ("qemu", qemu_cmd)) if i % 2 == 0 else (("qemu", qemu_cmd), ("tandem", tandem_cmd)):
            t = time_to_marker(cmd, stop_kill)
            rows.append((kind, i, t))
            print(f"run {i+1:2}/{N} {kind:6} {t:6.3f} s", file=sys.stderr)
    med = {k: statistics.median([t for kk, _, t in rows if kk == k]) for k in ("tandem", "qemu")}
    ratio = med["tandem"] / med["qemu"]
    print(f"machine: {platform.node()} {os.cpu_count()} cpus; boots per tool: {N}")
    print(f"{'tool':<8} {'median s':>9} {'ratio':>7}")
    print(f"{'qemu':<8} {med['qemu']:9.3f} {1.0:7.3f}")
    print(f"{'tandem':<8} {med['tandem']:9.3f} {ratio:7.3f}")
    print(f"tandem overhead: {100*(ratio-1):+.1f}% (goal: under +5%)")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "boot.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tool", "run", "seconds_to_marker"])
        w.writerows(rows)


if __name__ == "__main__":
    main()
