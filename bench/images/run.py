#!/usr/bin/env python3
"""Gold-image benchmarks: update transfer, publish throughput, NBD read path.

Inputs (built once, cached in /var/cache/tandem/bench/images):
  v1.ext4          mkfs.ext4 -d of a copy of /usr/share (~670 MB of real files), 1 GiB
  v2-inplace.ext4  v1 edited in place with debugfs: ~1% of files patched (64 random bytes),
                   grown (by a piece of another file), deleted, or added (another file's
                   content, lightly edited); rm + write, so changed files also move
  v2-rebuilt.ext4  mkfs.ext4 -d of the edited tree

1. Update transfer v1 -> v2 (both cases), bytes on the wire and wall time:
   tandem image pull (server on 127.0.0.1), rsync --no-whole-file (plain and with
   --compress --compress-choice=zstd), casync extract --seed (chunks v2 needs that v1's
   index lacks, as compressed in its store), zsync (HTTP on 127.0.0.1), and the ideal:
   zstd -3 of the 4 KiB blocks of v2 that occur nowhere in v1.
2. Publish throughput: tandem image publish (fresh store) vs casync make vs zstd -3 (1 core).
3. Read path: qemu-img bench (4 KiB reads, sequential and strided "random") of the NBD
   export vs the same image as a raw file, both with a warm cache.

Unfairness, said up front: tandem zeroes free filesystem blocks at publish by default
("free space never travels"), so it can beat the ideal computed on the image as it
stands; the --keep-free-space rows are the like-for-like comparison. rsync runs locally
(sender and receiver over a pipe), which counts the same protocol bytes as over ssh.

Usage: bench/images/run.py   (CSV in bench/results/images-<date>-<host>.csv)
"""
import csv, hashlib, os, platform, random, shutil, socket, subprocess, sys, tempfile, threading, time
import http.server, functools

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


def row(section, case, tool, value, unit, ratio=None, note=""):
    rows.append(dict(section=section, case=case, tool=tool, value=value, unit=unit,
                     ratio="" if ratio is None else f"{ratio:.2f}", note=note))
    r = "" if ratio is None else f"  x{ratio:.2f}"
    print(f"  {tool:34} {value:>14,.0f} {unit}{r}  {note}" if isinstance(value, (int, float)) and unit == "B"
          else f"  {tool:34} {value:>14.2f} {unit}{r}  {note}", flush=True)


# ---------------------------------------------------------------- inputs
def build_inputs():
    os.makedirs(CACHE, exist_ok=True)
    v1, ip, rb = (os.path.join(CACHE, n) for n in ("v1.ext4", "v2-inplace.ext4", "v2-rebuilt.ext4"))
    if all(os.path.exists(p) for p in (v1, ip, rb)):
        return v1, ip, rb
    print("building inputs (once) in", CACHE, flush=True)
    t1, t2 = os.path.join(CACHE, "tree1"), os.path.join(CACHE, "tree2")
    if not (os.path.exists(v1) and os.path.isdir(t1)):
        shutil.rmtree(t1, ignore_errors=True)
        sh("cp", "-a", "/usr/share", t1)
        sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", t1, v1, "1024M")
    shutil.rmtree(t2, ignore_errors=True)
    files = sorted(os.path.relpath(os.path.join(d, f), t1)
                   for d, _, fs in os.walk(t1) for f in fs
                   if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f)))
    files = [f for f in files if all(c not in f for c in ' "\'\\\n')]
    rng = random.Random(42)
    picked = rng.sample(files, len(files) // 100)
    sh("cp", "-al", t1, t2)  # hard links; every edit below replaces a file, never writes into one
    cmds = []
    for i, rel in enumerate(picked):
        p = os.path.join(t2, rel)
        kind = i % 4
        if kind == 2:
            os.unlink(p)
            cmds.append(f'rm "/{rel}"')
            continue
        data = bytearray(open(p, "rb").read())
        if kind == 0 and data:  # patched in the middle
            at = len(data) // 2
            data[at:at + 64] = rng.randbytes(min(64, len(data) - at))
        elif kind == 1:  # grown by real content (a piece of another file), as updates do
            donor = open(os.path.join(t1, rng.choice(files)), "rb").read()
            data += donor[:rng.randint(4096, 65536)]
        else:  # kind 3: a new file beside it: another file's content, lightly edited
            rel = rel + ".new"
            p = os.path.join(t2, rel)
            data = bytearray(open(os.path.join(t1, rng.choice(files)), "rb").read()[:100000])
            data[len(data) // 3:len(data) // 3 + 16] = rng.randbytes(16)
        tmp = p + ".tmp-bench"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
        if kind != 3:
            cmds.append(f'rm "/{rel}"')
        cmds.append(f'write "{p}" "/{rel}"')
    cmdfile = os.path.join(CACHE, "edit.debugfs")
    with open(cmdfile, "w") as f:
        f.write("\n".join(cmds) + "\n")
    shutil.copyfile(v1, ip)
    sh("debugfs", "-w", "-f", cmdfile, ip, capture_output=True)
    sh("e2fsck", "-fy", ip, capture_output=True, check=False)
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", t2, rb, "1024M")
    print(f"  {len(picked)} of {len(files)} files changed", flush=True)
    return v1, ip, rb


# ---------------------------------------------------------------- helpers
def blocks(path):
    with open(path, "rb") as f:
        while True:
            b = f.read(4096)
            if not b:
                return
            yield b


def ideal(v1, v2):
    old = {hashlib.blake2b(b, digest_size=16).digest() for b in blocks(v1)}
    new = bytearray()
    for b in blocks(v2):
        if hashlib.blake2b(b, digest_size=16).digest() not in old:
            new += b
    return len(sh("zstd", "-3", "-c", input=bytes(new), capture_output=True).stdout)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class HttpServer:
    """Static files on 127.0.0.1 (for zsync), counting bytes sent."""

    def __init__(self, root):
        self.sent = 0
        outer = self

        class H(http.server.SimpleHTTPRequestHandler):
            # zsync sends multi-range requests and expects multipart/byteranges replies.
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                path = self.translate_path(self.path)
                rng = self.headers.get("Range")
                try:
                    size = os.path.getsize(path)
                except OSError:
                    self.send_error(404)
                    return
                with open(path, "rb") as f:
                    if not rng:
                        body, ctype, status, extra = f.read(), "application/octet-stream", 200, {}
                    else:
                        parts = []
                        for r in rng.removeprefix("bytes=").split(","):
                            a, b = r.strip().split("-")
                            a = int(a) if a else size - int(b)
                            b = min(int(b), size - 1) if b and a is not None and r.strip()[0] != "-" else size - 1
                            f.seek(a)
                            parts.append((a, b, f.read(b - a + 1)))
                        status = 206
                        if len(parts) == 1:
                            a, b, body = parts[0]
                            ctype, extra = "application/octet-stream", {"Content-Range": f"bytes {a}-{b}/{size}"}
                        else:
                            bnd = "tandembenchboundary"
                            # Apache's layout: every delimiter, the first included, is CRLF--boundary.
                            body = b"".join(
                                f"\r\n--{bnd}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{b}/{size}\r\n\r\n".encode()
                                + d for a, b, d in parts) + f"\r\n--{bnd}--\r\n".encode()
                            ctype, extra = f"multipart/byteranges; boundary={bnd}", {}
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                outer.sent += len(body)
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(H, directory=root))
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def tandem_server(data):
    p = subprocess.Popen([TANDEM, "image", "serve-http", "--data", data], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    url = p.stdout.readline().strip().removeprefix("listening on ")
    return p, url


def tandem_json(*args):
    import json
    return json.loads(out(TANDEM, *args, "--json"))


# ---------------------------------------------------------------- 1. update transfer
def update_transfer(v1, v2, case, work):
    print(f"\n== update transfer, {case} ==", flush=True)
    ideal_b = ideal(v1, v2)
    results = {}
    for label, extra in (("tandem pull", []), ("tandem pull (--keep-free-space)", ["--keep-free-space"])):
        d = tempfile.mkdtemp(dir=work)
        data, lap = os.path.join(d, "srv"), os.path.join(d, "lap")
        sh(TANDEM, "image", "publish", "gold", v1, "--data", data, *extra, capture_output=True)
        sh(TANDEM, "image", "publish", "gold", v2, "--data", data, *extra, capture_output=True)
        key = out(TANDEM, "image", "key", "--data", data).strip()
        srv, url = tandem_server(data)
        try:
            tandem_json("image", "pull", "gold@1", "--server", url, "--dir", lap, "--image-key", key)
            # The server computes and caches the delta once per version pair; time the pull.
            tandem_json("image", "pull", "gold@2", "--server", url, "--dir", lap, "--dry-run")
            t0 = time.monotonic()
            r = tandem_json("image", "pull", "gold@2", "--server", url, "--dir", lap)
            results[label] = (r["bytes_received"], time.monotonic() - t0)
            print(f"    {label}: {results[label][0]:,} B in {results[label][1]:.2f} s", flush=True)
        finally:
            srv.kill()
            srv.wait()
        shutil.rmtree(d)

    # rsync
    for label, extra in (("rsync --no-whole-file", []),
                         ("rsync --no-whole-file zstd", ["--compress", "--compress-choice=zstd"])):
        dst = os.path.join(work, "rsync-dst.img")
        shutil.copyfile(v1, dst)
        t0 = time.monotonic()
        st = out("rsync", "--no-whole-file", "--stats", *extra, v2, dst)
        dt = time.monotonic() - t0
        sent = int(next(l for l in st.splitlines() if l.startswith("Total bytes sent")).split(":")[1].replace(",", ""))
        recv = int(next(l for l in st.splitlines() if l.startswith("Total bytes received")).split(":")[1].replace(",", ""))
        results[label] = (sent + recv, dt)
        print(f"    {label}: {sent + recv:,} B in {dt:.2f} s", flush=True)
        os.unlink(dst)

    # casync: chunks of v2 that v1's store does not have, as stored (compressed)
    store = os.path.join(work, "casync.store")
    shutil.rmtree(store, ignore_errors=True)
    sh("casync", "make", f"--store={store}", os.path.join(work, "v1.caibx"), v1, capture_output=True)
    have = {os.path.join(dp, f) for dp, _, fs in os.walk(store) for f in fs}
    sh("casync", "make", f"--store={store}", os.path.join(work, "v2.caibx"), v2, capture_output=True)
    new = [os.path.join(dp, f) for dp, _, fs in os.walk(store) for f in fs if os.path.join(dp, f) not in have]
    cas_bytes = sum(os.path.getsize(p) for p in new)
    # Apply time: a store that holds only what v2 needs beyond the seed.
    store2 = os.path.join(work, "casync.store2")
    shutil.rmtree(store2, ignore_errors=True)
    for p in new:
        q = os.path.join(store2, os.path.relpath(p, store))
        os.makedirs(os.path.dirname(q), exist_ok=True)
        shutil.copyfile(p, q)
    t0 = time.monotonic()
    sh("casync", "extract", f"--store={store2}", f"--seed={v1}", os.path.join(work, "v2.caibx"),
       os.path.join(work, "casync-out.img"), capture_output=True)
    results["casync extract --seed"] = (cas_bytes, time.monotonic() - t0)
    for p in (store, store2):
        shutil.rmtree(p)
    os.unlink(os.path.join(work, "casync-out.img"))

    # zsync over HTTP on loopback
    zdir = os.path.join(work, "zsync")
    shutil.rmtree(zdir, ignore_errors=True)
    os.makedirs(zdir)
    os.symlink(v2, os.path.join(zdir, "v2.img"))
    srv = HttpServer(zdir)
    try:
        sh("zsyncmake", "-o", os.path.join(zdir, "v2.zsync"), "-u", f"http://127.0.0.1:{srv.port}/v2.img",
           os.path.join(zdir, "v2.img"), capture_output=True)
        meta = os.path.getsize(os.path.join(zdir, "v2.zsync"))
        srv.sent = 0
        t0 = time.monotonic()
        sh("zsync", "-q", "-i", v1, "-o", os.path.join(work, "zsync-out.img"),
           f"http://127.0.0.1:{srv.port}/v2.zsync", capture_output=True, cwd=work)
        results["zsync"] = (srv.sent, time.monotonic() - t0)
        _ = meta
    finally:
        srv.close()
    shutil.rmtree(zdir)
    for f in ("zsync-out.img", "zsync-out.img.part"):
        if os.path.exists(os.path.join(work, f)):
            os.unlink(os.path.join(work, f))

    row("update", case, "ideal (new 4 KiB blocks, zstd -3)", ideal_b, "B", 1.0)
    competitors = [k for k in results if not k.startswith("tandem")]
    best = min(competitors, key=lambda k: results[k][0])
    rsync_time = results["rsync --no-whole-file"][1]
    for k, (b, t) in results.items():
        row("update", case, k, b, "B", b / ideal_b, f"{t:.2f} s")
    tb, tt = results["tandem pull"]
    print(f"  -> tandem / ideal = {tb / ideal_b:.2f} (goal <= 1.2); best competitor ({best}) / tandem = "
          f"{results[best][0] / tb:.2f} (goal >= 2); rsync time / tandem time = {rsync_time / tt:.1f} (goal >= 10)")
    row("update", case, "ratio best-competitor/tandem", results[best][0] / tb, "x")
    row("update", case, "ratio rsync-time/tandem-time", rsync_time / tt, "x")


# ---------------------------------------------------------------- 2. publish throughput
def publish_throughput(v1, work):
    print("\n== publish throughput (1 GiB image) ==", flush=True)
    size = os.path.getsize(v1)
    sh("cat", v1, stdout=subprocess.DEVNULL)  # warm the page cache for every tool alike
    res = {}
    for label, extra in (("tandem publish", []), ("tandem publish --keep-free-space", ["--keep-free-space"])):
        d = tempfile.mkdtemp(dir=work)
        t0 = time.monotonic()
        sh(TANDEM, "image", "publish", "gold", v1, "--data", d, *extra, capture_output=True)
        res[label] = time.monotonic() - t0
        shutil.rmtree(d)
    store = os.path.join(work, "casync.pub")
    t0 = time.monotonic()
    sh("casync", "make", f"--store={store}", os.path.join(work, "pub.caibx"), v1, capture_output=True)
    res["casync make"] = time.monotonic() - t0
    shutil.rmtree(store)
    t0 = time.monotonic()
    sh("zstd", "-3", "-q", "-f", "-T1", v1, "-o", os.path.join(work, "pub.zst"))
    res["zstd -3 (1 thread)"] = time.monotonic() - t0
    os.unlink(os.path.join(work, "pub.zst"))
    for k, t in res.items():
        row("publish", "1 GiB", k, size / 1e6 / t, "MB/s", res["casync make"] / t, f"{t:.2f} s")
    print(f"  -> tandem / casync = {res['casync make'] / res['tandem publish']:.2f}x (goal >= 3); "
          f"--keep-free-space: {res['casync make'] / res['tandem publish --keep-free-space']:.2f}x")


# ---------------------------------------------------------------- 3. read path
def bench_read(target_args, pattern):
    count = 40000
    step = ["-S", str(4096 * 7919)] if pattern == "random" else []
    t0 = time.monotonic()
    sh("qemu-img", "bench", "-c", count, "-s", "4096", "-d", "16", *step, *target_args, capture_output=True)
    return count * 4096 / 1e6 / (time.monotonic() - t0)


def read_path(v1, work):
    print("\n== read path: qemu-img bench, 4 KiB reads, queue depth 16, warm ==", flush=True)
    d = tempfile.mkdtemp(dir=work)
    data, lap = os.path.join(d, "srv"), os.path.join(d, "lap")
    sh(TANDEM, "image", "publish", "gold", v1, "--data", data, "--keep-free-space", capture_output=True)
    key = out(TANDEM, "image", "key", "--data", data).strip()
    srv, url = tandem_server(data)
    sh(TANDEM, "image", "pull", "gold@1", "--server", url, "--dir", lap, "--image-key", key, capture_output=True)
    srv.kill()
    srv.wait()
    sock = os.path.join(d, "nbd.sock")
    nbd = subprocess.Popen([TANDEM, "image", "serve", "gold@1", "--dir", lap, "--socket", sock,
                            "--cache-mb", "1200"], stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        nbd_args = ["-f", "raw", f"nbd+unix:///?socket={sock}"]
        raw_args = ["-f", "raw", "-t", "writeback", v1]
        sh("cat", v1, stdout=subprocess.DEVNULL)
        for pattern in ("sequential", "random"):
            for _ in range(1):
                bench_read(nbd_args, pattern)  # warm-up pass
            n = bench_read(nbd_args, pattern)
            r = bench_read(raw_args, pattern)
            row("read", pattern, "raw file (page cache)", r, "MB/s", 1.0)
            row("read", pattern, "tandem NBD export", n, "MB/s", n / r)
            print(f"  -> NBD / raw = {n / r:.0%} (goal >= 70%)")
    finally:
        nbd.terminate()
        nbd.wait()
        shutil.rmtree(d)


def main():
    if not os.path.exists(TANDEM):
        sys.exit(f"build first: cargo build --release --bin tandem ({TANDEM} missing)")
    v1, ip, rb = build_inputs()
    work = tempfile.mkdtemp(prefix="tandem-bench-images-", dir=CACHE)
    only = sys.argv[1:] or ["update", "publish", "read"]
    try:
        if "update" in only:
            update_transfer(v1, ip, "edited in place", work)
            update_transfer(v1, rb, "rebuilt", work)
        if "publish" in only:
            publish_throughput(v1, work)
        if "read" in only:
            read_path(v1, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(RESULTS, exist_ok=True)
    name = os.path.join(RESULTS, f"images-{time.strftime('%Y%m%d-%H%M')}-{platform.node()}.csv")
    with open(name, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    print(f"\nmachine: {platform.node()}, {os.cpu_count()} cores; CSV: {os.path.relpath(name)}")


if __name__ == "__main__":
    main()
