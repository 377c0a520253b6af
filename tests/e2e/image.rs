//! End-to-end tests: gold images. Publish on a server data dir, serve the image API on
//! loopback, pull into a laptop dir (chunks, then deltas), serve over NBD, boot QEMU from
//! it, and every fault from the images issue.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::util::*;

/// A server data dir, a laptop dir and a scratch dir in one temp dir.
struct Env {
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            tmp: tempfile::tempdir().expect("tempdir"),
        }
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }
    fn data(&self) -> PathBuf {
        self.p("server")
    }
    fn laptop(&self) -> PathBuf {
        self.p("laptop")
    }
    fn publish(&self, name: &str, file: &Path, extra: &[&str]) -> serde_json::Value {
        run(tandem()
            .args(["image", "publish", name])
            .arg(file)
            .arg("--data")
            .arg(self.data())
            .args(extra)
            .arg("--json"))
        .ok()
        .json()
    }
    fn key(&self) -> String {
        run(tandem().args(["image", "key", "--data"]).arg(self.data()))
            .ok()
            .stdout
            .trim()
            .to_string()
    }
    fn pull(&self, url: &str, spec: &str, extra: &[&str]) -> Ran {
        run(tandem()
            .args(["image", "pull", spec, "--server", url, "--dir"])
            .arg(self.laptop())
            .args(["--image-key", &self.key(), "--json"])
            .args(extra))
    }
}

/// `tandem image serve-http` on 127.0.0.1:0; returns the process and its URL.
fn serve_http(data: &Path) -> (Reaped, String) {
    let mut child = Reaped::spawn(
        tandem()
            .args(["image", "serve-http", "--data"])
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let out = child.0.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .expect("read listening line");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, url)
}

/// Builds a small ext4 image from a directory tree with `mkfs.ext4 -d`.
fn make_ext4(tree: &Path, out: &Path, size_mb: u32) {
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-E", "root_owner=0:0", "-d"])
        .arg(tree)
        .arg(out)
        .arg(format!("{size_mb}M"))
        .stdout(Stdio::null())
        .status()
        .expect("run mkfs.ext4");
    assert!(st.success(), "mkfs.ext4 failed");
}

/// Pseudo-random, incompressible-ish bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A tree of files; `edit` changes a few of them (v2).
fn make_tree(root: &Path, edit: bool) {
    std::fs::create_dir_all(root.join("etc")).expect("mkdir");
    std::fs::create_dir_all(root.join("usr/lib")).expect("mkdir");
    for i in 0..40u64 {
        let mut data = noise(i, 40_000 + (i as usize * 997) % 30_000);
        if edit && i % 10 == 3 {
            data[1000..1100].fill(0xab);
        }
        std::fs::write(root.join(format!("usr/lib/lib{i}.so")), data).expect("write");
    }
    let release = if edit {
        "tandem-gold 2\n"
    } else {
        "tandem-gold 1\n"
    };
    std::fs::write(root.join("etc/release"), release).expect("write");
    if edit {
        std::fs::write(root.join("usr/lib/new.so"), noise(999, 50_000)).expect("write");
    }
}

fn versions(env: &Env, edit_v2: bool) -> (PathBuf, PathBuf) {
    let t1 = env.p("tree1");
    let t2 = env.p("tree2");
    make_tree(&t1, false);
    make_tree(&t2, edit_v2);
    let v1 = env.p("v1.ext4");
    let v2 = env.p("v2.ext4");
    make_ext4(&t1, &v1, 24);
    make_ext4(&t2, &v2, 24);
    (v1, v2)
}

/// Reads a whole NBD export through qemu-img into a file.
fn nbd_to_file(socket: &Path, out: &Path) {
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd+unix:///?socket={}", socket.display()))
        .arg(out)
        .status()
        .expect("qemu-img");
    assert!(st.success(), "qemu-img convert from NBD failed");
}

fn serve_nbd(env: &Env, spec: &str, socket: &Path) -> Reaped {
    let child = Reaped::spawn(
        tandem()
            .args(["image", "serve", spec, "--dir"])
            .arg(env.laptop())
            .arg("--socket")
            .arg(socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    assert!(
        wait_for(20, || UnixStream::connect(socket).is_ok()),
        "NBD socket never appeared"
    );
    child
}

fn files_equal(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read a") == std::fs::read(b).expect("read b")
}

#[test]
fn publish_pull_delta_update_and_nbd_read_back_exactly() {
    let env = Env::new();
    let (v1, v2) = versions(&env, true);
    let p1 = env.publish("gold", &v1, &["--keep-free-space"]);
    assert_eq!(p1["version"], 1);
    assert!(p1["new_chunks"].as_u64().expect("n") > 0);
    let (_srv, url) = serve_http(&env.data());

    let r1 = env.pull(&url, "gold@1", &[]).ok().json();
    assert_eq!(r1["method"], "chunks");
    assert_eq!(r1["committed"], true);
    let full_bytes = r1["bytes_received"].as_u64().expect("bytes");

    let p2 = env.publish("gold", &v2, &["--keep-free-space"]);
    assert_eq!(p2["version"], 2);
    assert!(p2["dedup_chunks"].as_u64().expect("n") > 0, "{p2}");

    let dry = env.pull(&url, "gold", &["--dry-run"]).ok().json();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["method"], "delta");
    let estimate = dry["estimated_bytes"].as_u64().expect("estimate");
    assert!(estimate > 0);
    let listed = run(tandem()
        .args(["image", "list", "--json", "--dir"])
        .arg(env.laptop()))
    .ok()
    .json();
    assert_eq!(
        listed[0]["versions"],
        serde_json::json!([1]),
        "dry run committed nothing"
    );

    let r2 = env.pull(&url, "gold", &[]).ok().json();
    assert_eq!(r2["method"], "delta", "{r2}");
    assert_eq!(r2["base"], 1);
    assert_eq!(
        r2["delta_bytes"].as_u64(),
        Some(estimate),
        "dry run predicted the bytes"
    );
    assert!(
        r2["bytes_received"].as_u64().expect("b") < full_bytes / 2,
        "{r2} vs {full_bytes}"
    );

    // A second pull of the same version moves nothing.
    let r3 = env.pull(&url, "gold@2", &[]).ok().json();
    assert_eq!(r3["method"], "up-to-date");
    assert_eq!(r3["bytes_received"], 0);

    // Both versions read back byte for byte over NBD.
    for (spec, src) in [("gold@1", &v1), ("gold@2", &v2)] {
        let sock = env.p(&format!("{spec}.sock"));
        let _nbd = serve_nbd(&env, spec, &sock);
        let out = env.p(&format!("{spec}.out"));
        nbd_to_file(&sock, &out);
        assert!(
            files_equal(&out, src),
            "{spec} differs from what was published"
        );
    }
    let chk = run(tandem()
        .args(["store", "check", "--json", "--dir"])
        .arg(env.laptop()))
    .ok()
    .json();
    assert_eq!(chk["damaged"], serde_json::json!([]));
}

#[test]
fn free_space_never_travels_but_files_survive() {
    let env = Env::new();
    let tree = env.p("tree");
    make_tree(&tree, false);
    // A big file that is deleted before publishing: its blocks stay on disk as garbage.
    std::fs::write(tree.join("cache.bin"), noise(7, 4 << 20)).expect("write");
    let img = env.p("img.ext4");
    make_ext4(&tree, &img, 24);
    let st = Command::new("debugfs")
        .args(["-w", "-R", "rm /cache.bin"])
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("debugfs");
    assert!(st.success());
    // Separate servers, so the second publish cannot dedup against the first.
    let other = Env::new();
    let kept = other.publish("kept", &img, &["--keep-free-space"]);
    let dropped = env.publish("dropped", &img, &[]);
    assert!(
        dropped["free_space_dropped"].as_u64().expect("n") > 4 << 20,
        "{dropped}"
    );
    assert!(
        dropped["new_bytes"].as_u64().expect("n") + (4 << 20)
            <= kept["new_bytes"].as_u64().expect("n") + (1 << 20),
        "the deleted file's 4 MiB still travels: {dropped} vs {kept}"
    );
    // The published image is still a clean filesystem with the same files.
    let (_srv, url) = serve_http(&env.data());
    env.pull(&url, "dropped@1", &[]).ok();
    let sock = env.p("d.sock");
    let _nbd = serve_nbd(&env, "dropped@1", &sock);
    let out = env.p("out.ext4");
    nbd_to_file(&sock, &out);
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&out)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let cat = Command::new("debugfs")
        .args(["-R", "cat /usr/lib/lib5.so"])
        .arg(&out)
        .output()
        .expect("debugfs");
    assert_eq!(
        cat.stdout,
        std::fs::read(tree.join("usr/lib/lib5.so")).expect("read")
    );
}

#[test]
fn files_that_are_not_disk_images_are_refused() {
    let env = Env::new();
    let text = env.p("notes.txt");
    std::fs::write(&text, "this is not a disk\n".repeat(100)).expect("write");
    let ran = run(tandem()
        .args(["image", "publish", "gold"])
        .arg(&text)
        .arg("--data")
        .arg(env.data()))
    .code(3);
    assert!(ran.stderr.contains("not a disk image"), "{}", ran.stderr);
    let bad_name = run(tandem()
        .args(["image", "publish", "../x"])
        .arg(&text)
        .arg("--data")
        .arg(env.data()))
    .code(3);
    assert!(
        bad_name.stderr.contains("invalid image name"),
        "{}",
        bad_name.stderr
    );
    let listed = run(tandem()
        .args(["image", "list", "--json", "--data"])
        .arg(env.data()))
    .ok()
    .json();
    assert_eq!(listed, serde_json::json!([]));
}

fn manifest_file(env: &Env, version: u64) -> PathBuf {
    env.data()
        .join("images/gold")
        .join(format!("{version}.manifest.json"))
}

#[test]
fn tampered_or_truncated_manifest_is_refused_and_nothing_committed() {
    let env = Env::new();
    let (v1, _) = versions(&env, false);
    env.publish("gold", &v1, &[]);
    let (_srv, url) = serve_http(&env.data());
    let path = manifest_file(&env, 1);
    let original = std::fs::read_to_string(&path).expect("read");

    // Altered payload, signature kept.
    let mut signed: serde_json::Value = serde_json::from_str(&original).expect("json");
    let payload =
        signed["payload"]
            .as_str()
            .expect("payload")
            .replacen("\"size\":", "\"size\":1", 1);
    signed["payload"] = serde_json::Value::String(payload);
    std::fs::write(&path, signed.to_string()).expect("write");
    let ran = env.pull(&url, "gold@1", &[]).code(3);
    assert!(ran.stderr.contains("altered or forged"), "{}", ran.stderr);

    // Truncated.
    std::fs::write(&path, &original[..original.len() / 2]).expect("write");
    let ran = env.pull(&url, "gold@1", &[]).code(3);
    assert!(ran.stderr.contains("pulling gold@1"), "{}", ran.stderr);

    // Signed by another key (a second server's).
    let other = Env::new();
    other.publish("gold", &v1, &[]);
    std::fs::copy(manifest_file(&other, 1), &path).expect("copy");
    let ran = env.pull(&url, "gold@1", &[]).code(3);
    assert!(ran.stderr.contains("unknown key"), "{}", ran.stderr);

    let listed = run(tandem()
        .args(["image", "list", "--json", "--dir"])
        .arg(env.laptop()))
    .ok()
    .json();
    assert_eq!(listed, serde_json::json!([]));

    // Restored, the pull works.
    std::fs::write(&path, &original).expect("write");
    env.pull(&url, "gold@1", &[]).ok();
}

/// Flips one byte in the middle of the first record of every pack under `store`.
fn corrupt_packs(store: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(store.join("packs")).expect("packs") {
        let p = e.expect("entry").path();
        let mut data = std::fs::read(&p).expect("read");
        if data.len() > 200 {
            let at = 8 + 48 + 40;
            data[at] ^= 0x5a;
            std::fs::write(&p, data).expect("write");
            n += 1;
        }
    }
    n
}

/// Flips 64 bytes in the middle of the largest (or the newest) pack under `store`.
fn corrupt_middle_of_pack(store: &Path, newest: bool) {
    let p = std::fs::read_dir(store.join("packs"))
        .expect("packs")
        .map(|e| e.expect("entry").path())
        .max_by_key(|p| {
            let m = std::fs::metadata(p).expect("meta");
            if newest {
                m.modified()
                    .expect("mtime")
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("time")
                    .as_nanos()
            } else {
                u128::from(m.len())
            }
        })
        .expect("a pack");
    let mut data = std::fs::read(&p).expect("read");
    let mid = data.len() / 2;
    for b in &mut data[mid..mid + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&p, data).expect("write");
}

#[test]
fn corrupted_laptop_chunk_is_eio_named_by_check_and_repaired_by_next_pull() {
    let env = Env::new();
    let (v1, _) = versions(&env, false);
    env.publish("gold", &v1, &["--keep-free-space"]);
    let (_srv, url) = serve_http(&env.data());
    env.pull(&url, "gold@1", &[]).ok();
    // Round 1: `store check` names the damaged chunk and the next pull repairs it.
    assert!(corrupt_packs(&env.laptop().join("store")) > 0);
    let check = run(tandem()
        .args(["store", "check", "--json", "--dir"])
        .arg(env.laptop()))
    .code(1)
    .json();
    let damaged = check["damaged"].as_array().expect("array");
    assert!(!damaged.is_empty(), "{check}");
    assert_eq!(damaged[0]["chunk"].as_str().expect("id").len(), 64);
    assert_eq!(check["incomplete_versions"][0]["name"], "gold");
    let r = env.pull(&url, "gold@1", &[]).ok().json();
    assert_eq!(
        r["chunks_fetched"].as_u64(),
        Some(damaged.len() as u64),
        "{r}"
    );
    run(tandem().args(["store", "check", "--dir"]).arg(env.laptop())).ok();

    // Round 2: a reader meets the damage first: the guest gets an I/O error, not data.
    corrupt_middle_of_pack(&env.laptop().join("store"), false);
    let sock = env.p("c.sock");
    {
        let _nbd = serve_nbd(&env, "gold@1", &sock);
        let out = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(format!("nbd+unix:///?socket={}", sock.display()))
            .arg(env.p("c.out"))
            .output()
            .expect("qemu-img");
        assert!(!out.status.success(), "a damaged chunk was served");
    }
    let check = run(tandem()
        .args(["store", "check", "--json", "--dir"])
        .arg(env.laptop()))
    .code(1)
    .json();
    assert_eq!(check["incomplete_versions"][0]["name"], "gold", "{check}");
    let r = env.pull(&url, "gold@1", &[]).ok().json();
    assert!(r["chunks_fetched"].as_u64().expect("n") >= 1, "{r}");
    run(tandem().args(["store", "check", "--dir"]).arg(env.laptop())).ok();
    let _nbd = serve_nbd(&env, "gold@1", &sock);
    nbd_to_file(&sock, &env.p("fixed.out"));
    assert!(files_equal(&env.p("fixed.out"), &v1));
}

#[test]
fn server_side_damage_and_bad_deltas_never_reach_the_laptop() {
    let env = Env::new();
    let (v1, v2) = versions(&env, true);
    env.publish("gold", &v1, &["--keep-free-space"]);
    env.publish("gold", &v2, &["--keep-free-space"]);
    let (_srv, url) = serve_http(&env.data());
    env.pull(&url, "gold@1", &[]).ok();

    // A delta whose result does not match the manifest: the delta is computed, then the
    // cached file is replaced by one for different content (v1 -> v1-with-noise).
    let dry = env.pull(&url, "gold@2", &["--dry-run"]).ok().json();
    assert_eq!(dry["method"], "delta");
    let cached = env.data().join("images/gold/deltas/1-2.delta");
    let real = std::fs::read(&cached).expect("cached delta");
    let mut raw = zstd_decode(&real);
    let last = raw.len() - 100;
    for b in &mut raw[200..last] {
        *b = b.wrapping_add(1);
    }
    std::fs::write(&cached, zstd_encode(&raw)).expect("write");
    let r = env.pull(&url, "gold@2", &[]).ok().json();
    assert!(r["method"].as_str().expect("m").contains("chunks"), "{r}");
    let sock = env.p("g2.sock");
    {
        let _nbd = serve_nbd(&env, "gold@2", &sock);
        nbd_to_file(&sock, &env.p("g2.out"));
    }
    assert!(
        files_equal(&env.p("g2.out"), &v2),
        "a bad delta corrupted the result"
    );

    // A damaged chunk on the server: the pull fails, nothing is committed, v2 stays usable.
    let (v3, _) = (env.p("v3.ext4"), ());
    let t3 = env.p("tree3");
    make_tree(&t3, true);
    std::fs::write(t3.join("usr/lib/v3.so"), noise(3333, 200_000)).expect("write");
    make_ext4(&t3, &v3, 24);
    env.publish("gold", &v3, &["--keep-free-space"]);
    corrupt_middle_of_pack(&env.data().join("store"), true);
    let ran = env.pull(&url, "gold@3", &["--no-delta"]).code(3);
    assert!(ran.stderr.contains("pulling gold@3"), "{}", ran.stderr);
    let listed = run(tandem()
        .args(["image", "list", "--json", "--dir"])
        .arg(env.laptop()))
    .ok()
    .json();
    assert_eq!(listed[0]["versions"], serde_json::json!([1, 2]));
    let _nbd = serve_nbd(&env, "gold@2", &sock);
    nbd_to_file(&sock, &env.p("g2b.out"));
    assert!(files_equal(&env.p("g2b.out"), &v2));
}

/// Runs the `zstd` tool as a filter over `data`.
fn zstd_filter(args: &[&str], data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("zstd")
        .args(args)
        .args(["-c", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("zstd");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = data.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&input));
    let mut out = Vec::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_end(&mut out)
        .expect("read");
    w.join().expect("writer").expect("write");
    assert!(child.wait().expect("wait").success());
    out
}

fn zstd_decode(data: &[u8]) -> Vec<u8> {
    zstd_filter(&["-d"], data)
}

fn zstd_encode(data: &[u8]) -> Vec<u8> {
    zstd_filter(&[], data)
}

#[test]
fn server_killed_mid_pull_then_resume_fetches_only_the_rest() {
    let env = Env::new();
    let tree = env.p("tree");
    make_tree(&tree, false);
    // More than loopback socket buffers hold, so killing the server cuts the transfer.
    std::fs::write(tree.join("big.bin"), noise(42, 32 << 20)).expect("write");
    let img = env.p("big.ext4");
    make_ext4(&tree, &img, 48);
    env.publish("gold", &img, &[]);
    let (srv, url) = serve_http(&env.data());
    let mut pull = Reaped::spawn(
        tandem()
            .args(["image", "pull", "gold@1", "--server", &url, "--dir"])
            .arg(env.laptop())
            .args(["--image-key", &env.key(), "--json", "--rate-limit", "4M"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    // Wait until some chunks have landed in the laptop store, then kill the server.
    let packs = env.laptop().join("store/packs");
    let landed = wait_for(60, || {
        std::fs::read_dir(&packs)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                    .sum::<u64>()
                    > 2 << 20
            })
            .unwrap_or(false)
    });
    assert!(landed, "nothing arrived before the kill");
    drop(srv);
    let status = pull.0.wait().expect("wait pull");
    assert_eq!(status.code(), Some(3), "the interrupted pull must fail");
    let mut err = String::new();
    pull.0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read");
    assert!(err.contains("pulling gold@1"), "{err}");
    let listed = run(tandem()
        .args(["image", "list", "--json", "--dir"])
        .arg(env.laptop()))
    .ok()
    .json();
    assert_eq!(
        listed,
        serde_json::json!([]),
        "an incomplete version was committed"
    );

    let (_srv2, url2) = serve_http(&env.data());
    let r = env.pull(&url2, "gold@1", &[]).ok().json();
    assert!(r["chunks_present"].as_u64().expect("n") > 0, "{r}");
    let total = r["chunks_present"].as_u64().expect("n") + r["chunks_fetched"].as_u64().expect("n");
    assert!(r["chunks_fetched"].as_u64().expect("n") < total, "{r}");
    let sock = env.p("r.sock");
    let _nbd = serve_nbd(&env, "gold@1", &sock);
    nbd_to_file(&sock, &env.p("r.out"));
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(env.p("r.out"))
        .output()
        .expect("e2fsck");
    assert!(fsck.status.success());
}

/// A tmpfs mounted for one test and unmounted on drop.
struct SmallFs(PathBuf);

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn disk_full_during_pull_is_a_clear_error_and_the_old_version_stays_bootable() {
    let env = Env::new();
    let (v1, _) = versions(&env, false);
    env.publish("gold", &v1, &["--keep-free-space"]);
    let t2 = env.p("tree-big");
    make_tree(&t2, true);
    std::fs::write(t2.join("big.bin"), noise(77, 8 << 20)).expect("write");
    let v2 = env.p("v2big.ext4");
    make_ext4(&t2, &v2, 24);
    env.publish("gold", &v2, &["--keep-free-space"]);
    let (_srv, url) = serve_http(&env.data());
    env.pull(&url, "gold@1", &[]).ok();
    let used: u64 = walk_size(&env.laptop());

    // Move the laptop dir onto a filesystem with room for v1 and little more.
    let mnt = env.p("small");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let size_kb = used / 1024 + 1024;
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size_kb}k"), "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        mounted,
        "this test needs root to mount a small tmpfs (it runs as root in CI)"
    );
    let _fs = SmallFs(mnt.clone());
    let copied = Command::new("cp")
        .arg("-a")
        .arg(env.laptop())
        .arg(mnt.join("laptop"))
        .status()
        .expect("cp");
    assert!(copied.success());
    let lap = mnt.join("laptop");
    let ran = run(tandem()
        .args(["image", "pull", "gold@2", "--server", &url, "--dir"])
        .arg(&lap)
        .arg("--no-delta"))
    .code(3);
    assert!(
        ran.stderr.contains("No space left on device"),
        "{}",
        ran.stderr
    );
    let listed = run(tandem()
        .args(["image", "list", "--json", "--dir"])
        .arg(&lap))
    .ok()
    .json();
    assert_eq!(listed[0]["versions"], serde_json::json!([1]));
    let sock = env.p("full.sock");
    let _nbd = Reaped::spawn(
        tandem()
            .args(["image", "serve", "gold@1", "--dir"])
            .arg(&lap)
            .arg("--socket")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    assert!(wait_for(20, || UnixStream::connect(&sock).is_ok()));
    nbd_to_file(&sock, &env.p("full.out"));
    assert!(files_equal(&env.p("full.out"), &v1));
}

fn walk_size(p: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| walk_size(&e.path())).sum())
            .unwrap_or(0)
    } else {
        meta.len()
    }
}

/// Minimal NBD client: fixed newstyle handshake + NBD_OPT_GO; returns the connection and
/// the export size.
fn nbd_connect(sock: &Path) -> (UnixStream, u64) {
    let mut s = UnixStream::connect(sock).expect("connect");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("hello");
    assert_eq!(&hello[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).expect("client flags");
    let mut opt = Vec::new();
    opt.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&6u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).expect("opt go");
    let mut size = 0;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("opt reply");
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize;
        let mut d = vec![0u8; len];
        s.read_exact(&mut d).expect("data");
        if kind == 3 && u16::from_be_bytes([d[0], d[1]]) == 0 {
            size = u64::from_be_bytes(d[2..10].try_into().expect("8"));
        }
        if kind == 1 {
            break;
        }
        assert!(kind < 0x8000_0000, "option error {kind:#x}");
    }
    (s, size)
}

fn nbd_request(s: &mut UnixStream, cmd: u16, offset: u64, len: u32) -> u32 {
    let mut r = Vec::new();
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&cmd.to_be_bytes());
    r.extend_from_slice(&77u64.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    s.write_all(&r).expect("request");
    let mut h = [0u8; 16];
    s.read_exact(&mut h).expect("reply");
    assert_eq!(
        u32::from_be_bytes(h[..4].try_into().expect("4")),
        0x6744_6698
    );
    assert_eq!(u64::from_be_bytes(h[8..16].try_into().expect("8")), 77);
    u32::from_be_bytes(h[4..8].try_into().expect("4"))
}

#[test]
fn nbd_refuses_reads_past_the_end_writes_and_garbage_and_keeps_serving() {
    let env = Env::new();
    let (v1, _) = versions(&env, false);
    env.publish("gold", &v1, &["--keep-free-space"]);
    let (_srv, url) = serve_http(&env.data());
    env.pull(&url, "gold@1", &[]).ok();
    let sock = env.p("n.sock");
    let _nbd = serve_nbd(&env, "gold@1", &sock);

    let (mut a, size) = nbd_connect(&sock);
    assert_eq!(size, std::fs::metadata(&v1).expect("meta").len());
    assert_eq!(
        nbd_request(&mut a, 0, size - 4096, 8192),
        22,
        "read past the end: EINVAL"
    );
    assert_eq!(
        nbd_request(&mut a, 0, u64::MAX - 10, 100),
        22,
        "offset overflow: EINVAL"
    );
    assert_eq!(
        nbd_request(&mut a, 0, 0, 64 << 20),
        22,
        "over-long read: EINVAL"
    );
    assert_eq!(
        nbd_request(&mut a, 4, 0, 4096),
        1,
        "trim on read-only: EPERM"
    );
    assert_eq!(nbd_request(&mut a, 99, 0, 0), 22, "unknown command: EINVAL");
    // A valid read still works on the same connection and returns the image's bytes.
    assert_eq!(nbd_request(&mut a, 0, 1024, 512), 0);
    let mut buf = vec![0u8; 512];
    a.read_exact(&mut buf).expect("data");
    assert_eq!(&buf[..], &std::fs::read(&v1).expect("read")[1024..1536]);

    // Garbage instead of a request: the server drops that connection only.
    let (mut b, _) = nbd_connect(&sock);
    b.write_all(&[0xde; 28]).expect("garbage");
    let mut one = [0u8; 1];
    assert_eq!(
        b.read(&mut one).unwrap_or(0),
        0,
        "connection closed after garbage"
    );
    // Garbage during the handshake, too.
    let mut c = UnixStream::connect(&sock).expect("connect");
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).expect("hello");
    c.write_all(&[0xff; 64]).expect("garbage");
    assert_eq!(c.read(&mut one).unwrap_or(0), 0);

    // Several clients at once, and the first one still works.
    let (mut d, _) = nbd_connect(&sock);
    assert_eq!(nbd_request(&mut d, 0, 0, 4096), 0);
    let mut page = vec![0u8; 4096];
    d.read_exact(&mut page).expect("data");
    assert_eq!(nbd_request(&mut a, 0, 0, 4096), 0);
    a.read_exact(&mut buf[..0]).expect("noop");
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .output()
        .expect("qemu-img");
    assert!(info.status.success());
}

#[test]
fn qemu_boots_the_guest_from_a_pulled_nbd_served_image_through_a_qcow2_overlay() {
    let guest = guest();
    let env = Env::new();
    env.publish("corp", &guest.join("gold-v1.ext4"), &[]);
    let (_srv, url) = serve_http(&env.data());
    env.pull(&url, "corp@1", &[]).ok();
    let sock = env.p("corp.sock");
    let _nbd = serve_nbd(&env, "corp@1", &sock);
    nbd_to_file(&sock, &env.p("before.raw"));

    let overlay = env.p("system.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .arg(&overlay)
        .status()
        .expect("qemu-img create");
    assert!(st.success());
    let size_before = std::fs::metadata(&overlay).expect("meta").len();
    let ran = run(tandem()
        .args(["vm", "run", "--kernel"])
        .arg(guest.join("vmlinuz"))
        .arg("--initrd")
        .arg(guest.join("initrd.img"))
        .arg("--disk")
        .arg(&overlay)
        .args([
            "--accel",
            "tcg",
            "--exit-on",
            "tandem-boot: ready",
            "--timeout",
            "120",
        ]))
    .ok();
    assert!(
        ran.stdout.contains("tandem-release: tandem-gold 1"),
        "{}",
        ran.stdout
    );
    // Writes landed in the overlay; the base served over NBD is unchanged.
    assert!(std::fs::metadata(&overlay).expect("meta").len() > size_before);
    nbd_to_file(&sock, &env.p("after.raw"));
    assert!(
        files_equal(&env.p("before.raw"), &env.p("after.raw")),
        "the base changed"
    );
    run(tandem().args(["store", "check", "--dir"]).arg(env.laptop())).ok();
}

/// Runs `cmd` in its own process group; a hang is a test failure (the group is killed).
fn run_bounded(cmd: &mut Command, secs: u64) -> Ran {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = Reaped::spawn(cmd);
    let mut out = child.0.stdout.take().expect("stdout");
    let mut err = child.0.stderr.take().expect("stderr");
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut status = None;
    let ended = wait_for(secs, || {
        status = child.0.try_wait().expect("try_wait");
        status.is_some()
    });
    assert!(ended, "{cmd:?} hung (still running after {secs} s)");
    Ran {
        code: status.expect("ended").code().unwrap_or(-1),
        stdout: o.join().expect("stdout reader"),
        stderr: e.join().expect("stderr reader"),
    }
}

fn published(env: &Env) -> serde_json::Value {
    run(tandem()
        .args(["image", "list", "--json", "--data"])
        .arg(env.data()))
    .ok()
    .json()
}

/// A qcow2 overlay (1 MiB) whose header names `backing`, made without opening it.
fn overlay_on(env: &Env, name: &str, backing: &Path, fmt: &str) -> PathBuf {
    let ov = env.p(name);
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-b"])
        .arg(backing)
        .args(["-F", fmt])
        .arg(&ov)
        .arg("1M")
        .status()
        .expect("run qemu-img");
    assert!(st.success(), "qemu-img create failed");
    ov
}

/// The probe that found the hole: a qcow2 whose backing file is the server's own signing
/// key. It must never be published, --force or not, and no byte of the key may be read.
#[test]
fn publish_refuses_backing_files_outside_the_allow_list_even_with_force() {
    let env = Env::new();
    env.key(); // creates the server keys
    let key = env.data().join("keys").join("image-signing.key");
    assert!(key.is_file(), "server key at {}", key.display());
    let ov = overlay_on(&env, "evil.qcow2", &key, "raw");
    for force in [false, true] {
        let mut c = tandem();
        c.args(["image", "publish", "evil"])
            .arg(&ov)
            .arg("--data")
            .arg(env.data());
        if force {
            c.arg("--force");
        }
        let r = run_bounded(&mut c, 300).code(3);
        assert!(
            r.stderr.contains("backing file") && r.stderr.contains("image-signing.key"),
            "{}",
            r.stderr
        );
    }
    assert_eq!(published(&env), serde_json::json!([]));

    // A FIFO backing file (named or not) and a symlinked one: refused, never waited on.
    let fifo = env.p("fifo");
    let st = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(st.success());
    let ov = overlay_on(&env, "fifo.qcow2", &fifo, "raw");
    for extra in [
        vec![],
        vec!["--backing".to_string(), fifo.display().to_string()],
    ] {
        let r = run_bounded(
            tandem()
                .args(["image", "publish", "fifo", "--force"])
                .arg(&ov)
                .arg("--data")
                .arg(env.data())
                .args(&extra),
            300,
        )
        .code(3);
        assert!(
            r.stderr.contains("backing file") || r.stderr.contains("is a FIFO"),
            "{}",
            r.stderr
        );
    }
    let base = env.p("base.raw");
    std::fs::write(&base, noise(7, 1 << 20)).expect("write base");
    let link = env.p("link.raw");
    std::os::unix::fs::symlink(&base, &link).expect("symlink");
    let ov = overlay_on(&env, "link.qcow2", &link, "raw");
    let r = run_bounded(
        tandem()
            .args(["image", "publish", "link", "--force"])
            .arg(&ov)
            .arg("--data")
            .arg(env.data())
            .arg("--backing")
            .arg(&base),
        300,
    )
    .code(3);
    assert!(r.stderr.contains("symbolic link"), "{}", r.stderr);
    assert_eq!(published(&env), serde_json::json!([]));

    // Named with --backing, a regular file is used: the published bytes are the chain's.
    let ov = overlay_on(&env, "ok.qcow2", &base, "raw");
    let p = run_bounded(
        tandem()
            .args(["image", "publish", "ok", "--force", "--json"])
            .arg(&ov)
            .arg("--data")
            .arg(env.data())
            .arg("--backing")
            .arg(&base),
        300,
    )
    .ok()
    .json();
    assert_eq!(p["size"], 1 << 20);
    let (_server, url) = serve_http(&env.data());
    env.pull(&url, "ok@1", &[]).ok();
    let sock = env.p("ok.sock");
    let _nbd = serve_nbd(&env, "ok@1", &sock);
    let out = env.p("ok.back");
    nbd_to_file(&sock, &out);
    assert!(
        files_equal(&out, &base),
        "published bytes differ from the chain"
    );
}

#[test]
fn publish_refuses_an_incomplete_scan_unless_forced() {
    let env = Env::new();
    // No filesystem anywhere: the scan cannot read anything, so it is incomplete.
    let img = env.p("blob.raw");
    std::fs::write(&img, noise(3, 4 << 20)).expect("write");
    let r = run_bounded(
        tandem()
            .args(["image", "publish", "blob"])
            .arg(&img)
            .arg("--data")
            .arg(env.data()),
        300,
    )
    .code(3);
    assert!(
        r.stderr.contains("could not be scanned") && r.stderr.contains("nothing was published"),
        "{}",
        r.stderr
    );
    assert_eq!(published(&env), serde_json::json!([]));
    let r = run_bounded(
        tandem()
            .args(["image", "publish", "blob", "--force"])
            .arg(&img)
            .arg("--data")
            .arg(env.data()),
        300,
    )
    .ok();
    assert!(r.stderr.contains("because of --force"), "{}", r.stderr);
}

/// ext4 with uninitialised block groups and inodes-per-group of 2^32-1: publish used to
/// spin forever rebuilding bitmaps. Now the allocation map is refused (free space kept)
/// and the publish ends.
#[test]
fn publish_of_hostile_ext4_metadata_ends_and_keeps_free_space() {
    let env = Env::new();
    let img = env.p("hostile.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(256 << 20))
        .expect("create");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "1024", "-N", "2048"])
        .arg(&img)
        .status()
        .expect("mkfs.ext4");
    assert!(st.success());
    let mut b = std::fs::read(&img).expect("read");
    b[1024 + 0x28..1024 + 0x2c].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&img, &b).expect("write");
    let r = run_bounded(
        tandem()
            .args(["image", "publish", "hostile", "--force", "--json"])
            .arg(&img)
            .arg("--data")
            .arg(env.data()),
        600,
    )
    .ok();
    let j = r.json();
    assert_eq!(j["free_space_dropped"], 0, "{}", r.stdout);
    assert!(
        j["volumes"].to_string().contains("inodes per group"),
        "{}",
        r.stdout
    );
}
