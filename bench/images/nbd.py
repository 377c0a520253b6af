#!/usr/bin/env python3
"""NBD read path: tandem's export against the same image as a raw file, in one run.

Input: the 1 GiB ext4 image of bench/images/run.py (v1.ext4: mkfs.ext4 -d of a copy of
/usr/share, built once in /var/cache/tandem/bench/images; only v1 is built here if
missing), or any raw image with --image.

The image is published, pulled into a laptop dir (encrypted store, like a laptop) and served
with `tandem image serve --cache-mb` large enough to hold it, so "warm" means: every chunk
decoded in the export's cache on one side, every page in the page cache on the other.
Each side is read once before measuring. Then, for --rounds rounds, alternating which side
goes first:

  qemu-img bench, 4 KiB reads, queue depth 16: sequential (the goal: >= 0.95x raw) and
  strided ("random", -S 4096*7919); 64 KiB sequential reads as a second size.
  nbdcopy SOURCE null: of the whole image (4 connections, block status on the export,
  seek-hole on the file): how fast a client that knows about holes can read it.

The median of the rounds is reported with the ratio export/raw. The raw side is QEMU's
`file` driver with `-t writeback` reading the page cache through its thread pool; the
export side is QEMU's NBD client over a unix socket, so the export pays for a socket round
trip and a copy per request that the raw file does not. That is the comparison the issue
asks for; it is not a like-for-like comparison of two servers.

--server-bin BIN (repeatable) adds a side served by BIN IMAGE SOCKET CACHE_MB, a program that
prints "ready" once it listens: crates/nbd/examples/serve_raw.rs is one (built with
`cargo build --release -p tandem-nbd --example serve_raw`); a copy of it built from an older
commit gives a before/after comparison in the same run.

Usage: bench/images/nbd.py [--image RAW] [--rounds N] [--server-bin BIN]...
CSV: bench/results/nbd-<date>-<host>.csv
"""
import argparse, csv, os, platform, re, shutil, statistics, subprocess, sys, tempfile, time

CACHE = os.environ.get("TANDEM_BENCH_CACHE", "/var/cache/tandem/bench/images")
target = os.environ.get("CARGO_TARGET_DIR", "/var/cache/tandem/target")
TANDEM = os.environ.get("TANDEM_BIN", os.path.join(target, "release", "tandem"))
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "..", "results")
rows = []


def sh(*cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run(list(map(str, cmd)), **kw)


def out(*cmd):
    return sh(*cmd, capture_output=True, text=True).stdout


def v1_image():
    """bench/images/run.py's v1.ext4 (same recipe, same cache)."""
    os.makedirs(CACHE, exist_ok=True)
    v1, t1 = os.path.join(CACHE, "v1.ext4"), os.path.join(CACHE, "tree1")
    if os.path.exists(v1) and os.path.isdir(t1):
        return v1
    print("building v1.ext4 (once) in", CACHE, flush=True)
    shutil.rmtree(t1, ignore_errors=True)
    sh("cp", "-a", "/usr/share", t1)
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", t1, v1, "1024M")
    return v1


def serve(image, work, cache_mb):
    """Publish, pull into a laptop dir, serve over NBD; returns (process, socket)."""
    data, lap = os.path.join(work, "srv"), os.path.join(work, "lap")
    sh(TANDEM, "image", "publish", "gold", image, "--data", data, "--keep-free-space",
       capture_output=True)
    key = out(TANDEM, "image", "key", "--data", data).strip()
    srv = subprocess.Popen([TANDEM, "image", "serve-http", "--data", data],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = srv.stdout.readline().strip().removeprefix("listening on ")
        sh(TANDEM, "image", "pull", "gold@1", "--server", url, "--dir", lap, "--image-key", key,
           capture_output=True)
    finally:
        srv.kill()
        srv.wait()
    sock = os.path.join(work, "nbd.sock")
    nbd = subprocess.Popen([TANDEM, "image", "serve", "gold@1", "--dir", lap, "--socket", sock,
                            "--cache-mb", str(cache_mb)], stderr=subprocess.DEVNULL)
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    else:
        nbd.kill()
        sys.exit("tandem image serve did not create its socket")
    return nbd, sock


def serve_bin(binary, image, work, cache_mb):
    """A serve_raw-style program; returns (process, socket)."""
    sock = os.path.join(work, os.path.basename(binary) + ".sock")
    p = subprocess.Popen([binary, image, sock, str(cache_mb)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    if p.stdout.readline().strip() != "ready":
        p.kill()
        sys.exit(f"{binary} did not start")
    return p, sock


def qemu_bench(target_args, size, bs, pattern):
    """MB/s of one qemu-img bench run covering the whole image once."""
    count = size // bs
    step = ["-S", str(4096 * 7919)] if pattern == "random" else []
    res = out("qemu-img", "bench", "-c", count, "-s", bs, "-d", "16", *step, *target_args)
    m = re.search(r"Run completed in ([0-9.]+) seconds", res)
    if not m:
        sys.exit(f"unexpected qemu-img bench output: {res}")
    return count * bs / 1e6 / float(m.group(1))


def nbdcopy(source, size):
    t0 = time.monotonic()
    sh("nbdcopy", source, "null:")
    return size / 1e6 / (time.monotonic() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", help="raw image to serve (default: run.py's v1.ext4)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--server-bin", action="append", default=[],
                    help="extra NBD side: BIN IMAGE SOCKET CACHE_MB, prints ready")
    a = ap.parse_args()
    if not os.path.exists(TANDEM):
        sys.exit(f"build first: cargo build --release --bin tandem ({TANDEM} missing)")
    for tool in ("qemu-img", "nbdcopy"):
        if not shutil.which(tool):
            sys.exit(f"{tool} missing: install the packages in scripts/packages.txt")
    image = a.image or v1_image()
    size = os.path.getsize(image)
    size -= size % 65536
    work = tempfile.mkdtemp(prefix="tandem-bench-nbd-", dir=CACHE)
    procs = []
    try:
        cache_mb = size // (1 << 20) + 64
        nbd, sock = serve(image, work, cache_mb)
        procs.append(nbd)
        uris = {"tandem NBD export": f"nbd+unix:///?socket={sock}"}
        for b in a.server_bin:
            p, s = serve_bin(b, image, work, cache_mb)
            procs.append(p)
            uris[os.path.basename(b)] = f"nbd+unix:///?socket={s}"
        sides = {"raw file (page cache)": ["-f", "raw", "-t", "writeback", image]}
        copy_src = {"raw file (page cache)": image}
        for label, uri in uris.items():
            sides[label] = ["-f", "raw", uri]
            copy_src[label] = uri
        cases = [("sequential 4 KiB", 4096, "sequential"), ("strided 4 KiB", 4096, "random"),
                 ("sequential 64 KiB", 65536, "sequential")]
        # Warm both sides: the page cache and the export's chunk cache.
        sh("cat", image, stdout=subprocess.DEVNULL)
        for label in uris:
            qemu_bench(sides[label], size, 65536, "sequential")
        res = {}
        for r in range(a.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for case, bs, pattern in cases:
                for side in order:
                    res.setdefault((case, side), []).append(qemu_bench(sides[side], size, bs, pattern))
            for side in order:
                res.setdefault(("nbdcopy to null:", side), []).append(nbdcopy(copy_src[side], size))
        print(f"\n== NBD read path, {os.path.basename(image)} ({size >> 20} MiB), "
              f"median of {a.rounds} rounds, MB/s; ratio: median of per-round ratios ==", flush=True)
        for case in [c[0] for c in cases] + ["nbdcopy to null:"]:
            raws = res[(case, "raw file (page cache)")]
            for side in sides:
                vals = res[(case, side)]
                v = statistics.median(vals)
                # Each round measures both sides back to back: the ratio is the median of
                # the per-round ratios, which cancels most of the load other jobs put on
                # the machine between rounds.
                ratio = statistics.median(x / r for x, r in zip(vals, raws))
                spread = f"min {min(vals):.0f} max {max(vals):.0f}"
                rows.append(dict(section="nbd", case=case, tool=side, value=f"{v:.1f}", unit="MB/s",
                                 ratio=f"{ratio:.3f}", note=spread))
                print(f"  {case:20} {side:24} {v:9.1f} MB/s  x{ratio:.3f}  ({spread})")
            n = statistics.median(x / r for x, r in zip(res[(case, "tandem NBD export")], raws))
            print(f"  -> export / raw = {n:.3f}"
                  + ("  (goal >= 0.95)" if case == "sequential 4 KiB" else ""), flush=True)
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(RESULTS, exist_ok=True)
    name = os.path.join(RESULTS, f"nbd-{time.strftime('%Y%m%d-%H%M')}-{platform.node()}.csv")
    with open(name, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    print(f"\nmachine: {platform.node()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"tandem: {TANDEM}; CSV: {os.path.relpath(name)}")


if __name__ == "__main__":
    main()
