#!/usr/bin/env python3
"""Incremental backup of a corporate user disk: Tandem versus restic, borg and rsync.

A 256 MiB LUKS-encrypted qcow2 user disk (ext4 inside, filled with real files from
/usr/share) is backed up once; then 1% of it (40 writes of 64 KiB at random guest
offsets, through QEMU's LUKS layer with qemu-io) changes and it is backed up again.
For the second backup the table shows wall time and the bytes each tool had to send or
store, against the 2.5 MiB that really changed.

Tandem uploads to a real `tandem server` on 127.0.0.1 (HTTP, signed requests, server-side
verification of every chunk); restic and borg write to local repositories; rsync copies to
a local directory with --no-whole-file. So Tandem pays for a network hop the others do
not: the comparison favours them on time.

Usage: bench/backup/run.py   (after scripts/setup.sh; installs restic/borgbackup if missing)
"""
import csv, json, os, platform, random, shutil, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
target = os.environ.get("CARGO_TARGET_DIR", "/var/cache/tandem/target")
TANDEM = os.environ.get("TANDEM_BIN", os.path.join(target, "release", "tandem"))
CACHE = "/var/cache/tandem/bench/backup"
DISK_MIB = 256
WRITES = 40
WRITE = 64 * 1024


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def need(tool, pkg):
    if shutil.which(tool) is None:
        print(f"installing {pkg} for the comparison", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", pkg], check=True)


def du(path):
    total = 0
    for dp, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dp, f))
            except OSError:
                pass
    return total


def make_disk(secret_file, out):
    """A LUKS qcow2 with an ext4 of real files; cached."""
    os.makedirs(CACHE, exist_ok=True)
    cached = os.path.join(CACHE, "user-base.qcow2")
    key = os.path.join(CACHE, "user.secret")
    if not os.path.exists(cached):
        with open(key, "w") as f:
            f.write("benchmark-passphrase-not-secret")
        tree = tempfile.mkdtemp(dir=CACHE)
        budget = 150 * 1024 * 1024
        used = 0
        for dp, _, files in os.walk("/usr/share"):
            for name in files:
                src = os.path.join(dp, name)
                if not os.path.isfile(src) or os.path.islink(src):
                    continue
                size = os.path.getsize(src)
                if used + size > budget:
                    continue
                dst = os.path.join(tree, os.path.relpath(src, "/usr/share"))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(src, dst)
                used += size
            if used > budget * 0.98:
                break
        raw = os.path.join(CACHE, "user.raw")
        sh("mkfs.ext4", "-q", "-F", "-d", tree, raw, f"{DISK_MIB}M")
        shutil.rmtree(tree)
        sh("qemu-img", "convert", "-q", "--object", f"secret,id=s0,file={key}", "-O", "qcow2",
           "-o", "encrypt.format=luks,encrypt.key-secret=s0", raw, cached)
        os.remove(raw)
    shutil.copyfile(cached, out)
    shutil.copyfile(key, secret_file)


def change_one_percent(disk, secret_file):
    rng = random.Random(42)
    cmds = []
    for _ in range(WRITES):
        off = rng.randrange(0, DISK_MIB * 1024 * 1024 // WRITE) * WRITE
        cmds += ["-c", f"write -P {rng.randrange(1, 255)} {off} {WRITE}"]
    opts = f"driver=qcow2,file.filename={disk},encrypt.key-secret=s0"
    sh("qemu-io", "--object", f"secret,id=s0,file={secret_file}", "--image-opts", opts, *cmds)


def timed(fn):
    t = time.monotonic()
    out = fn()
    return time.monotonic() - t, out


def main():
    for tool, pkg in (("restic", "restic"), ("borg", "borgbackup"), ("rsync", "rsync")):
        need(tool, pkg)
    work = tempfile.mkdtemp(prefix="tandem-bench-backup-")
    server = None
    try:
        data, agent = os.path.join(work, "server"), os.path.join(work, "laptop")
        ready = os.path.join(work, "url")
        log = open(os.path.join(work, "server.log"), "w")
        server = subprocess.Popen([TANDEM, "server", "--data", data, "--listen", "127.0.0.1:0",
                                   "--ready-file", ready], stdout=log, stderr=log)
        for _ in range(300):
            if os.path.exists(ready) and open(ready).read().strip():
                break
            time.sleep(0.1)
        url = open(ready).read().strip()
        token = next(l.split()[-1] for l in open(os.path.join(work, "server.log")) if l.startswith("admin token:"))
        env = dict(os.environ, TANDEM_SERVER=url, TANDEM_ADMIN_TOKEN=token, TANDEM_AGENT_DIR=agent)
        run = lambda *a: subprocess.run([TANDEM, *a], check=True, capture_output=True, text=True, env=env).stdout
        run("admin", "user", "create", "bench")
        tok = json.loads(run("admin", "token", "create", "--user", "bench", "--json"))["token"]
        run("agent", "enroll", "--dir", agent, "--server", url, "--token", tok)
        disk = os.path.join(agent, "corporate", "user.qcow2")
        os.makedirs(os.path.dirname(disk))
        secret = os.path.join(work, "secret")
        make_disk(secret, disk)
        file_size = os.path.getsize(disk)

        restic_repo, borg_repo, rsync_dst = (os.path.join(work, n) for n in ("restic", "borg", "rsync"))
        renv = dict(os.environ, RESTIC_PASSWORD="bench", BORG_PASSPHRASE="bench",
                    BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes", BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")
        sh("restic", "init", "-q", "--repo", restic_repo, env=renv)
        sh("borg", "init", "-e", "repokey", borg_repo, env=renv)
        os.makedirs(rsync_dst)
        src_dir = os.path.dirname(disk)

        def tandem_backup():
            return json.loads(run("agent", "backup", "--dir", agent, "--json"))

        def restic_backup():
            sh("restic", "backup", "-q", "--repo", restic_repo, disk, env=renv)

        def borg_backup(n):
            sh("borg", "create", "--compression", "zstd,3", f"{borg_repo}::b{n}", disk, env=renv)

        def rsync_backup():
            out = sh("rsync", "-a", "--no-whole-file", "--inplace", "--stats", disk, rsync_dst + "/").stdout
            line = next(l for l in out.splitlines() if l.startswith("Total bytes sent"))
            return int(line.split(":")[1].replace(",", "").split()[0])

        # First (full) backups.
        tandem_backup(); restic_backup(); borg_backup(1); rsync_backup()
        before = {"restic": du(restic_repo), "borg": du(borg_repo)}
        change_one_percent(disk, secret)
        changed = WRITES * WRITE
        rows = []
        t, rep = timed(tandem_backup)
        rows.append(("tandem", t, rep["uploaded_bytes"], "chunk bytes uploaded (zstd on the server, 64 KiB chunks)"))
        t, _ = timed(restic_backup)
        rows.append(("restic", t, du(restic_repo) - before["restic"], "repository growth"))
        t, _ = timed(lambda: borg_backup(2))
        rows.append(("borg", t, du(borg_repo) - before["borg"], "repository growth (zstd,3)"))
        t, sent = timed(rsync_backup)
        rows.append(("rsync", t, sent, "bytes sent (--no-whole-file)"))

        print(f"machine: {platform.node()}, {os.cpu_count()} cpus")
        print(f"user disk: {DISK_MIB} MiB virtual, qcow2+LUKS file {file_size/1e6:.1f} MB; changed: {changed/1e6:.2f} MB ({WRITES} x 64 KiB)")
        print(f"{'tool':<8} {'2nd backup s':>12} {'MB moved':>9} {'x changed':>9} {'time vs tandem':>14}  what")
        base_t = rows[0][1]
        for name, t, b, what in rows:
            print(f"{name:<8} {t:12.2f} {b/1e6:9.2f} {b/changed:9.2f} {t/base_t:14.2f}  {what}")
        out = os.path.join(ROOT, "bench", "results")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"backup-{time.strftime('%Y%m%d-%H%M')}-{platform.node()}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["tool", "seconds", "bytes", "changed_bytes", "measure"])
            for name, t, b, what in rows:
                w.writerow([name, f"{t:.3f}", b, changed, what])
    finally:
        if server:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
