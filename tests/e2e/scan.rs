//! End-to-end tests: `tandem scan` on images generated here with the real tools
//! (mkfs.ext4 -d, mkfs.vfat + mtools, mkntfs + ntfscp, sgdisk/sfdisk, qemu-img).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::util::{run, tandem, Ran};

const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

fn sh(prog: &str, args: &[&str]) {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel.trim_start_matches('/'));
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, data).expect("write");
}

fn sized(path: &Path, bytes: u64) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(bytes))
        .expect("create image");
}

/// Pseudo-random bytes that contain no EICAR.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A tree with EICAR at several depths, in a large file, a sparse file and a Unicode
/// name, plus clean files; returns the infected paths.
fn planted_tree(root: &Path) -> BTreeSet<String> {
    write(root, "/eicar.com", EICAR.as_bytes());
    write(
        root,
        "/a/b/c/d/e/deep.txt",
        format!("notes\n{EICAR}\nmore notes").as_bytes(),
    );
    let mut big = noise(12 << 20, 7);
    let at = big.len() - 1000;
    big[at..at + EICAR.len()].copy_from_slice(EICAR.as_bytes());
    write(root, "/big.bin", &big);
    // Sparse: 64 MiB apparent, EICAR after a 40 MiB hole.
    let sp = root.join("sparse.img");
    let f = std::fs::File::create(&sp).expect("sparse");
    f.set_len(64 << 20).expect("len");
    use std::os::unix::fs::FileExt as _;
    f.write_all_at(EICAR.as_bytes(), 40 << 20)
        .expect("write sparse");
    write(root, "/ünïcødé/文件.txt", EICAR.as_bytes());
    for i in 0..20 {
        write(
            root,
            &format!("/clean/f{i}.txt"),
            &noise(1000 + i * 3000, i as u64 + 100),
        );
    }
    write(
        root,
        "/notes.txt",
        b"MARKER-0123456789-clean-notes-that-will-be-rewritten-in-place-XXXXXXXXXX",
    );
    [
        "/eicar.com",
        "/a/b/c/d/e/deep.txt",
        "/big.bin",
        "/sparse.img",
        "/ünïcødé/文件.txt",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// CRC-32C as ext4 uses it: seed !0, no final inversion.
fn crc32c_raw(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
    }
    c
}

fn mkext4(dir: &Path, src: &Path, name: &str, mib: u64, extra: &[&str]) -> PathBuf {
    let img = dir.join(name);
    sized(&img, mib << 20);
    let mut args = vec!["-q", "-F", "-U", "6f1c0e3a-6c61-4b4e-9d7b-0d1a2b3c4d5e"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-d", s(src), s(&img)]);
    sh("mkfs.ext4", &args);
    img
}

/// Copies `src` into `disk` at byte offset `at` (like `dd conv=notrunc`).
fn place(src: &Path, disk: &Path, at: u64) {
    use std::os::unix::fs::FileExt as _;
    let data = std::fs::read(src).expect("read fs image");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .expect("open disk");
    f.write_all_at(&data, at).expect("write into disk");
}

/// A 48 MiB GPT disk with the 40 MiB filesystem `fs` in partition 1 (at 1 MiB).
fn gpt_disk(dir: &Path, fs: &Path) -> PathBuf {
    let disk = dir.join("gpt.img");
    sized(&disk, 48 << 20);
    sh("sgdisk", &["-n", "1:2048:+40M", s(&disk)]);
    place(fs, &disk, 1 << 20);
    disk
}

fn scan(img: &Path, extra: &[&str]) -> Ran {
    let mut c = tandem();
    c.args(["scan", "image", s(img), "--json"]).args(extra);
    run(&mut c)
}

fn infected(r: &Ran) -> BTreeSet<String> {
    let j = r.json();
    let mut out = BTreeSet::new();
    for v in j["volumes"].as_array().expect("volumes") {
        for f in v["files"].as_array().expect("files") {
            if f["verdict"] == "infected" {
                out.insert(f["path"].as_str().expect("path").to_string());
            }
        }
    }
    out
}

fn not_scanned(r: &Ran) -> Vec<(String, String)> {
    let j = r.json();
    let mut out = Vec::new();
    for v in j["volumes"].as_array().expect("volumes") {
        if v["verdict"] == "not_scanned" && v["files"].as_array().is_some_and(|f| f.is_empty()) {
            out.push((
                format!("volume {}", v["index"]),
                v["reason"].as_str().unwrap_or("").to_string(),
            ));
        }
        for f in v["files"].as_array().expect("files") {
            if f["verdict"] == "not_scanned" {
                out.push((
                    f["path"].as_str().unwrap_or("").to_string(),
                    f["reason"].as_str().unwrap_or("").to_string(),
                ));
            }
        }
    }
    out
}

#[test]
fn scan_ext4_whole_disk_gpt_and_qcow2_finds_every_planted_file() {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    let want = planted_tree(&src);
    let fs = mkext4(d.path(), &src, "fs.img", 40, &[]);
    let r = scan(&fs, &[]).code(1);
    assert_eq!(infected(&r), want);
    let j = r.json();
    assert_eq!(j["outcome"], "infected");
    assert_eq!(j["volumes"][0]["fs"], "ext");
    assert_eq!(j["volumes"][0]["table"], "whole");
    assert_eq!(j["counts"]["infected"], 5);
    assert_eq!(j["counts"]["not_scanned"], 0);

    // The same filesystem inside a GPT partition, then as a qcow2 with a backing file.
    let disk = gpt_disk(d.path(), &fs);
    let r = scan(&disk, &[]).code(1);
    assert_eq!(infected(&r), want);
    assert_eq!(r.json()["volumes"][0]["table"], "gpt");
    let base = d.path().join("base.qcow2");
    sh("qemu-img", &["convert", "-O", "qcow2", s(&disk), s(&base)]);
    let ov = d.path().join("overlay.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            s(&ov),
        ],
    );
    // Backing files are opened only when named.
    let r = scan(&ov, &[]).code(3);
    assert!(r.stderr.contains("--backing"), "{}", r.stderr);
    let r = scan(&ov, &["--backing", s(&base)]).code(1);
    assert_eq!(infected(&r), want);

    // A journal that needs recovery (an unclean shutdown) goes through ext4-view, which
    // replays the journal in memory. Set the flag and fix the superblock checksum.
    let mut b = std::fs::read(&fs).expect("read");
    b[1024 + 0x60] |= 0x4;
    let sum = crc32c_raw(&b[1024..1024 + 0x3fc]);
    b[1024 + 0x3fc..1024 + 0x400].copy_from_slice(&sum.to_le_bytes());
    let rec = d.path().join("recover.img");
    std::fs::write(&rec, &b).expect("write");
    // A journal mkfs made and no kernel mounted lacks the checksum features ext4-view's
    // replay needs: then the volume is not scanned, with the reason, never "clean".
    let r = scan(&rec, &[]);
    let j = r.json();
    if r.code == 2 {
        assert_eq!(
            j["volumes"][0]["reason"], "fs_unsupported_feature",
            "{}",
            r.stdout
        );
        assert!(
            j["volumes"][0]["detail"]
                .as_str()
                .unwrap_or("")
                .contains("journal"),
            "{}",
            r.stdout
        );
    } else {
        assert_eq!(infected(&r.code(1)), want);
    }

    // Human output names the infected files on stdout.
    let r = run(tandem().args(["scan", "image", s(&ov), "--backing", s(&base)])).code(1);
    assert!(
        r.stdout.contains("INFECTED") && r.stdout.contains("/a/b/c/d/e/deep.txt"),
        "{}",
        r.stdout
    );
}

#[test]
fn scan_clean_image_exits_zero_and_custom_rules_and_blocklist_work() {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    for i in 0..10 {
        write(&src, &format!("/docs/{i}.txt"), &noise(5000, i));
    }
    write(
        &src,
        "/bin/tool",
        b"harmless tool with SIGNATURE-OF-EVIL-2026 inside",
    );
    let fs = mkext4(d.path(), &src, "clean.img", 8, &[]);
    let r = scan(&fs, &[]).code(0);
    assert_eq!(r.json()["outcome"], "clean");
    assert_eq!(r.json()["counts"]["files"], 11);
    let rules = d.path().join("evil.yar");
    std::fs::write(
        &rules,
        "rule evil { strings: $a = \"SIGNATURE-OF-EVIL-2026\" condition: $a }",
    )
    .expect("rules");
    // Blocklist the SHA-256 of docs/3.txt.
    let sha = {
        use std::io::Write as _;
        let mut c = Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sha256sum");
        c.stdin
            .take()
            .expect("stdin")
            .write_all(&noise(5000, 3))
            .expect("write");
        let out = c.wait_with_output().expect("wait");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .expect("hash")
            .to_string()
    };
    let bl = d.path().join("block.txt");
    std::fs::write(&bl, format!("# test\n{sha} Test.Blocklisted\n")).expect("bl");
    let r = scan(&fs, &["--rules", s(&rules), "--blocklist", s(&bl)]).code(1);
    assert_eq!(
        infected(&r),
        ["/bin/tool", "/docs/3.txt"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    let bad = d.path().join("bad.yar");
    std::fs::write(&bad, "rule broken { condition: nope }").expect("bad");
    let r = scan(&fs, &["--rules", s(&bad)]).code(3);
    assert!(r.stderr.contains("do not compile"), "{}", r.stderr);
}

#[test]
fn scan_fat_and_ext4_partitions_of_one_mbr_disk() {
    let d = tempfile::tempdir().expect("tempdir");
    let fat = d.path().join("fat.img");
    sh("mkfs.vfat", &["-C", s(&fat), "8192"]);
    let e = d.path().join("e.txt");
    std::fs::write(&e, format!("x{EICAR}y")).expect("e");
    let c = d.path().join("c.txt");
    std::fs::write(&c, noise(70_000, 5)).expect("c");
    let fi = s(&fat);
    sh(
        "mmd",
        &["-i", fi, "::/dir", "::/dir/sub", "::/dir/sub/deeper"],
    );
    sh("mcopy", &["-i", fi, s(&e), "::/dir/sub/deeper/payload.txt"]);
    sh("mcopy", &["-i", fi, s(&e), "::/Ünïcode name.txt"]);
    sh("mcopy", &["-i", fi, s(&c), "::/dir/clean.bin"]);
    let src = d.path().join("src");
    write(&src, "/home/user/eicar.txt", EICAR.as_bytes());
    let ext = mkext4(d.path(), &src, "ext.img", 8, &[]);
    let disk = d.path().join("mbr.img");
    sized(&disk, 20 << 20);
    let script = "label: dos\nstart=2048, size=16384, type=c\nstart=18432, size=16384, type=83\n";
    let mut p = Command::new("sfdisk")
        .args(["-q", s(&disk)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk");
    use std::io::Write as _;
    p.stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("script");
    assert!(p.wait().expect("wait").success());
    place(&fat, &disk, 2048 * 512);
    place(&ext, &disk, 18432 * 512);
    let r = scan(&disk, &[]).code(1);
    let j = r.json();
    assert_eq!(j["volumes"][0]["fs"], "fat");
    assert_eq!(j["volumes"][1]["fs"], "ext");
    assert_eq!(j["counts"]["files"], 4);
    assert_eq!(
        infected(&r),
        [
            "/dir/sub/deeper/payload.txt",
            "/Ünïcode name.txt",
            "/home/user/eicar.txt"
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    );
    // The scan never wrote to the disk.
    let before = std::fs::read(&disk).expect("read");
    scan(&disk, &[]).code(1);
    assert!(
        std::fs::read(&disk).expect("read") == before,
        "scan modified the image"
    );
}

#[test]
fn scan_ntfs_finds_eicar_in_files_and_alternate_streams_compressed_is_not_scanned() {
    let d = tempfile::tempdir().expect("tempdir");
    let img = d.path().join("ntfs.img");
    sized(&img, 16 << 20);
    sh("mkntfs", &["-q", "-F", "-f", s(&img)]);
    let e = d.path().join("e.txt");
    std::fs::write(&e, format!("header {EICAR} trailer")).expect("e");
    let c = d.path().join("c.txt");
    std::fs::write(&c, noise(300_000, 9)).expect("c");
    sh("ntfscp", &["-q", "-f", s(&img), s(&e), "eicar.txt"]);
    sh(
        "ntfscp",
        &["-q", "-f", s(&img), s(&e), "Ωmega документ.txt"],
    );
    sh("ntfscp", &["-q", "-f", s(&img), s(&c), "clean.bin"]);
    sh(
        "ntfscp",
        &["-q", "-f", "-N", "hidden", s(&img), s(&e), "clean.bin"],
    );
    let r = scan(&img, &[]).code(1);
    assert_eq!(r.json()["volumes"][0]["fs"], "ntfs");
    assert_eq!(
        infected(&r),
        ["/eicar.txt", "/Ωmega документ.txt", "/clean.bin:hidden"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    // A compressed file holding EICAR: not scanned, never clean, exit 2.
    let ci = d.path().join("compressed.img");
    sized(&ci, 8 << 20);
    sh("mkntfs", &["-q", "-F", "-f", "-C", s(&ci)]);
    sh("ntfscp", &["-q", "-f", s(&ci), s(&e), "packed.txt"]);
    let r = scan(&ci, &[]).code(2);
    assert_eq!(
        not_scanned(&r),
        vec![("/packed.txt".to_string(), "ntfs_compressed".to_string())]
    );
    assert_eq!(r.json()["outcome"], "incomplete");
}

#[test]
fn scan_inline_data_ext4_files_are_not_scanned_with_their_reason() {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    write(&src, "/small.txt", EICAR.as_bytes());
    write(&src, "/big.txt", &noise(20_000, 4));
    write(&src, "/dir/tiny.txt", b"tiny");
    let img = mkext4(d.path(), &src, "inline.img", 8, &["-O", "inline_data"]);
    let r = scan(&img, &["--all-files"]).code(2);
    // The small file and the small directory live inside their inodes: not scanned,
    // with the reason; everything else is read.
    let mut ns = not_scanned(&r);
    ns.sort();
    let unsupported = "fs_unsupported_feature".to_string();
    assert_eq!(
        ns,
        vec![
            ("/dir/".to_string(), unsupported.clone()),
            ("/small.txt".to_string(), unsupported)
        ]
    );
    assert!(r.stdout.contains("inline_data"), "{}", r.stdout);
    let j = r.json();
    assert_eq!(j["volumes"][0]["reason"], "files_not_scanned");
    assert_eq!(j["counts"]["clean"], 1, "the non-inline file is still read");
}

#[test]
fn scan_truncated_and_garbage_images_fail_clearly_without_hanging() {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    planted_tree(&src);
    let fs = mkext4(d.path(), &src, "fs.img", 40, &[]);
    let disk = gpt_disk(d.path(), &fs);
    // Truncated mid-filesystem: the partition runs past the end → not scanned, exit 2.
    let t = d.path().join("trunc.img");
    let b = std::fs::read(&disk).expect("read");
    std::fs::write(&t, &b[..20 << 20]).expect("write");
    let r = scan(&t, &[]).code(2);
    assert_eq!(not_scanned(&r)[0].1, "read_error", "{}", r.stdout);
    assert!(r.stdout.contains("truncated"), "{}", r.stdout);
    // A whole-disk filesystem cut short: files past the cut are not scanned.
    let t2 = d.path().join("trunc2.img");
    std::fs::write(&t2, &std::fs::read(&fs).expect("read")[..6 << 20]).expect("write");
    let r = scan(&t2, &[]);
    assert!(r.code == 2 || r.code == 1, "exit {}: {}", r.code, r.stderr);
    assert!(!not_scanned(&r).is_empty());
    // Random garbage: no filesystem → not scanned (unknown_filesystem), exit 2.
    let g = d.path().join("garbage.img");
    std::fs::write(&g, noise(4 << 20, 99)).expect("write");
    let r = scan(&g, &[]).code(2);
    assert_eq!(
        not_scanned(&r),
        vec![("volume 0".to_string(), "unknown_filesystem".to_string())]
    );
    // A truncated qcow2: a clear error, exit 3 or not scanned, never a crash.
    let q = d.path().join("q.qcow2");
    sh("qemu-img", &["convert", "-O", "qcow2", s(&disk), s(&q)]);
    let qb = std::fs::read(&q).expect("read");
    std::fs::write(&q, &qb[..qb.len() / 3]).expect("write");
    // Files whose clusters were cut off are not scanned; those before the cut still are
    // (so it may still find EICAR: infected wins over incomplete).
    let r = scan(&q, &[]);
    match r.code {
        1 | 2 => assert!(
            not_scanned(&r).iter().any(|(_, why)| why == "read_error"),
            "{}",
            r.stdout
        ),
        3 => assert!(r.stderr.contains("qcow2"), "{}", r.stderr),
        c => panic!("exit {c}: {}\n{}", r.stdout, r.stderr),
    }
    // Not an image at all.
    let r = run(tandem().args(["scan", "image", "/nonexistent/disk.img"])).code(3);
    assert!(
        r.stderr
            .contains("cannot open disk image /nonexistent/disk.img"),
        "{}",
        r.stderr
    );
    assert_eq!(
        r.stderr.matches("No such file").count(),
        1,
        "the cause is said once: {}",
        r.stderr
    );
}

#[test]
fn scan_incremental_skips_unchanged_but_never_a_file_rewritten_in_place() {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    planted_tree(&src);
    let img = mkext4(d.path(), &src, "fs.img", 40, &[]);
    let state = d.path().join("state.json");
    let st = ["--state", s(&state), "--all-files"];
    let r1 = scan(&img, &st).code(1);
    let j1 = r1.json();
    assert_eq!(j1["counts"]["unchanged"], 0);
    let clean = j1["counts"]["clean"].as_u64().expect("clean");
    let r2 = scan(&img, &st).code(1);
    assert_eq!(r2.json()["counts"]["unchanged"].as_u64(), Some(clean));
    assert_eq!(
        infected(&r2),
        infected(&r1),
        "infected files are never skipped"
    );
    // Rewrite /notes.txt's blocks in place (same size, same inode, same mtime): the
    // filesystem metadata cannot tell, the content hash does.
    let mut b = std::fs::read(&img).expect("read");
    let marker = b"MARKER-0123456789-clean-notes-that-will-be-rewritten-in-place-XXXXXXXXXX";
    let at = b
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("marker in image");
    b[at..at + EICAR.len()].copy_from_slice(EICAR.as_bytes());
    std::fs::write(&img, &b).expect("write");
    let r3 = scan(&img, &st).code(1);
    assert!(
        infected(&r3).contains("/notes.txt"),
        "changed file was skipped: {}",
        r3.stdout
    );
    assert_eq!(r3.json()["counts"]["unchanged"].as_u64(), Some(clean - 1));
    // New rules invalidate the state: everything is matched again.
    let rules = d.path().join("r.yar");
    std::fs::write(
        &rules,
        "rule e { strings: $a = \"EICAR-STANDARD\" condition: $a }",
    )
    .expect("rules");
    let r4 = scan(&img, &["--state", s(&state), "--rules", s(&rules)]).code(1);
    assert_eq!(r4.json()["counts"]["unchanged"], 0);
}

#[test]
fn scan_worker_limits_fail_only_the_scan_and_say_why() {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    planted_tree(&src);
    let img = mkext4(d.path(), &src, "fs.img", 40, &[]);
    // The 64 MiB sparse file does not fit a worker held to 40 MiB: the worker dies, the
    // volume is not scanned (worker_failed) and says why — never clean, never a hang.
    let r = scan(&img, &["--worker-memory", "40"]).code(2);
    let j = r.json();
    assert_eq!(j["volumes"][0]["reason"], "worker_failed", "{}", r.stdout);
    assert!(
        j["volumes"][0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("memory allocation"),
        "{}",
        r.stdout
    );
    let src = d.path().join("src2");
    write(&src, "/a.txt", EICAR.as_bytes());
    let img = mkext4(d.path(), &src, "fs2.img", 8, &[]);
    // Files over the size cap: too_large.
    let r = scan(&img, &["--max-file-size", "10"]).code(2);
    assert_eq!(
        not_scanned(&r),
        vec![("/a.txt".to_string(), "too_large".to_string())]
    );
}

#[test]
fn scan_with_signed_bundle_and_refuse_tampered_or_untrusted() {
    let d = tempfile::tempdir().expect("tempdir");
    let data = d.path().join("server");
    let rules = d.path().join("r.yar");
    std::fs::write(
        &rules,
        "rule marker { strings: $a = \"BUNDLE-MARKER-42\" condition: $a }",
    )
    .expect("rules");
    let bundle = d.path().join("bundle.json");
    let r = run(tandem().args([
        "scan",
        "bundle",
        "sign",
        "--rules",
        s(&rules),
        "--bundle-version",
        "3",
        "--data",
        s(&data),
        "-o",
        s(&bundle),
    ]))
    .ok();
    let key = r.json()["public_key"]
        .as_str()
        .expect("public key")
        .to_string();
    let src = d.path().join("src");
    write(&src, "/x.bin", b"...BUNDLE-MARKER-42...");
    let img = mkext4(d.path(), &src, "fs.img", 8, &[]);
    let r = scan(&img, &["--bundle", s(&bundle), "--trust", &key]).code(1);
    assert_eq!(infected(&r), ["/x.bin".to_string()].into_iter().collect());
    assert!(r.json()["rules"]["source"]
        .as_str()
        .unwrap_or("")
        .contains("bundle v3"));
    // Tampered payload.
    let text = std::fs::read_to_string(&bundle).expect("read");
    let t = d.path().join("tampered.json");
    std::fs::write(&t, text.replace("BUNDLE-MARKER-42", "BUNDLE-MARKER-43")).expect("write");
    let r = scan(&img, &["--bundle", s(&t), "--trust", &key]).code(3);
    assert!(r.stderr.contains("rule bundle refused"), "{}", r.stderr);
    // Signed by another server.
    let other = d.path().join("other");
    let r = run(tandem().args([
        "scan",
        "bundle",
        "sign",
        "--rules",
        s(&rules),
        "--bundle-version",
        "1",
        "--data",
        s(&other),
        "-o",
        s(&t),
    ]))
    .ok();
    assert_ne!(r.json()["public_key"].as_str(), Some(key.as_str()));
    let r = scan(&img, &["--bundle", s(&t), "--trust", &key]).code(3);
    assert!(r.stderr.contains("unknown key"), "{}", r.stderr);
}

#[test]
fn scan_hostile_ext4_metadata_fails_files_or_volume_never_crashes_or_hangs() {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    planted_tree(&src);
    let img = mkext4(d.path(), &src, "fs.img", 40, &["-b", "1024"]);
    let good = std::fs::read(&img).expect("read");
    let bad = d.path().join("bad.img");
    // Overwrite metadata regions (superblock, descriptors, bitmaps, inode tables, the first
    // directory and extent blocks) with noise, one region per run.
    for (i, at) in (1024usize..(600 << 10)).step_by(20 << 10).enumerate() {
        let mut b = good.clone();
        b[at..at + 512].copy_from_slice(&noise(512, i as u64 + 1000));
        std::fs::write(&bad, &b).expect("write");
        let r = scan(&bad, &["--volume-timeout", "60"]);
        assert!(
            matches!(r.code, 0..=2),
            "mutation at {at}: exit {}\n{}",
            r.code,
            r.stderr
        );
        let _ = r.json();
    }
}

#[test]
fn scan_stored_version_reads_the_chunk_store() {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    let want = planted_tree(&src);
    let img = mkext4(d.path(), &src, "gold.img", 40, &[]);
    let data = d.path().join("server");
    let mut c = tandem();
    c.args([
        "image",
        "publish",
        "--data",
        s(&data),
        "gold",
        s(&img),
        // The image is planted with test malware on purpose: publish refuses it without.
        "--force",
        "--json",
    ]);
    run(&mut c).ok();
    let r = run(tandem().args(["scan", "version", "gold@1", "--data", s(&data), "--json"])).code(1);
    assert_eq!(infected(&r), want);
    assert_eq!(r.json()["target"], "gold@1");
    // NAME alone means the newest version; an unknown one is a clear error.
    run(tandem().args(["scan", "version", "gold", "--data", s(&data), "--json"])).code(1);
    let r = run(tandem().args(["scan", "version", "gold@9", "--data", s(&data)])).code(3);
    assert!(r.stderr.contains("gold@9"), "{}", r.stderr);
}

#[test]
fn scan_vm_refuses_a_running_vm_and_scans_its_disks_when_stopped() {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    write(&src, "/home/user/payload.txt", EICAR.as_bytes());
    let data_disk = mkext4(d.path(), &src, "data.img", 8, &[]);
    let guest = super::util::guest();
    let vm = super::util::NamedVm::new("e2e-scan");
    let disk_arg = format!("{},ro", s(&data_disk));
    // A LUKS-encrypted qcow2 (like the corporate user disk): read through qemu-nbd with
    // the VM's own key file.
    let src2 = d.path().join("src2");
    write(
        &src2,
        "/Documents/secret-payload.doc",
        format!("..{EICAR}..").as_bytes(),
    );
    let plain = mkext4(d.path(), &src2, "user.img", 8, &[]);
    let key = d.path().join("user.key");
    std::fs::write(&key, "dGFuZGVtLXRlc3Qta2V5").expect("key");
    let user = d.path().join("user.qcow2");
    let secret = format!("secret,id=s0,file={}", s(&key));
    let luks = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10";
    sh(
        "qemu-img",
        &[
            "convert",
            "--object",
            &secret,
            "-O",
            "qcow2",
            "-o",
            luks,
            s(&plain),
            s(&user),
        ],
    );
    let user_arg = format!("{},secret={}", s(&user), s(&key));
    let g = s(&guest).to_string();
    run(&mut vm.cmd(
        "start",
        &[
            "--image",
            "gold-v1",
            "--guest-dir",
            &g,
            "--disk",
            &disk_arg,
            "--disk",
            &user_arg,
            "--json",
        ],
    ))
    .ok();
    let scan_vm = || {
        run(tandem()
            .args(["scan", "vm", &vm.name, "--json", "--state-dir"])
            .arg(vm.state.path()))
    };
    let r = scan_vm().code(3);
    assert!(r.stderr.contains("is running"), "{}", r.stderr);
    // Let the guest finish booting so it powers off at once when asked.
    run(&mut vm.cmd(
        "console",
        &["--wait-for", "tandem-boot: ready", "--timeout", "120"],
    ))
    .ok();
    run(&mut vm.cmd("stop", &["--timeout", "60", "--json"])).ok();
    let r = scan_vm().code(1);
    let j = r.json();
    assert_eq!(
        j["disks"].as_array().map(|a| a.len()),
        Some(3),
        "{}",
        r.stdout
    );
    assert_eq!(j["disks"][0]["report"]["outcome"], "clean", "{}", r.stdout);
    let infected: Vec<&str> = j["disks"][1]["report"]["volumes"][0]["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter_map(|f| f["path"].as_str())
        .collect();
    assert_eq!(infected, vec!["/home/user/payload.txt"]);
    let enc: Vec<&str> = j["disks"][2]["report"]["volumes"][0]["files"]
        .as_array()
        .expect("files of the encrypted disk")
        .iter()
        .filter_map(|f| f["path"].as_str())
        .collect();
    assert_eq!(enc, vec!["/Documents/secret-payload.doc"], "{}", r.stdout);
}

#[test]
fn scan_hostile_fat_and_ntfs_metadata_never_crash_or_hang() {
    let d = tempfile::tempdir().expect("tempdir");
    let e = d.path().join("e.txt");
    std::fs::write(&e, format!("x{EICAR}y")).expect("e");
    let fat = d.path().join("fat.img");
    sh("mkfs.vfat", &["-C", s(&fat), "4096"]);
    sh("mmd", &["-i", s(&fat), "::/a", "::/a/b"]);
    for i in 0..20 {
        sh(
            "mcopy",
            &["-i", s(&fat), s(&e), &format!("::/a/b/f{i}.txt")],
        );
    }
    let ntfs = d.path().join("ntfs.img");
    sized(&ntfs, 8 << 20);
    sh("mkntfs", &["-q", "-F", "-f", s(&ntfs)]);
    for i in 0..10 {
        sh(
            "ntfscp",
            &["-q", "-f", s(&ntfs), s(&e), &format!("f{i}.txt")],
        );
    }
    let bad = d.path().join("bad.img");
    for img in [&fat, &ntfs] {
        let good = std::fs::read(img).expect("read");
        let mut regions: Vec<usize> = (0..(64 << 10)).step_by(4 << 10).collect();
        // NTFS keeps its MFT near the middle of a small volume: hit it too.
        if let Some(at) = good.windows(4).position(|w| w == b"FILE") {
            regions.extend((at..at + (32 << 10)).step_by(2 << 10));
        }
        for (i, at) in regions.into_iter().enumerate() {
            let mut b = good.clone();
            b[at..at + 512].copy_from_slice(&noise(512, i as u64 + 7000));
            std::fs::write(&bad, &b).expect("write");
            let r = scan(&bad, &["--volume-timeout", "5"]);
            assert!(
                matches!(r.code, 0..=2),
                "{} mutated at {at}: exit {}\n{}",
                img.display(),
                r.code,
                r.stderr
            );
            let _ = r.json();
        }
    }
    // A zero time budget: the volume ends not scanned (timeout), never clean.
    let r = scan(&fat, &["--volume-timeout", "0"]).code(2);
    assert_eq!(r.json()["volumes"][0]["reason"], "timeout", "{}", r.stdout);
}

#[test]
fn publish_scans_the_gold_image_first_and_refuses_an_infected_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("boot.sh");
    // The EICAR test string, split so this source file is not itself a detection.
    let eicar = format!(
        "{}{}",
        "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-", "ANTIVIRUS-TEST-FILE!$H+H*"
    );
    std::fs::write(&script, format!("{eicar}\n")).expect("write script");
    let image = dir.path().join("gold.ext4");
    run(tandem()
        .args([
            "guest",
            "rootfs",
            "--release",
            "bad gold",
            "--size-mib",
            "16",
            "--out",
        ])
        .arg(&image)
        .arg("--boot-script")
        .arg(&script))
    .ok();
    let data = dir.path().join("srv");
    let refused = run(tandem()
        .args(["image", "publish", "corp-gold"])
        .arg(&image)
        .arg("--data")
        .arg(&data))
    .code(3);
    assert!(
        refused.stderr.contains("found malware") && refused.stderr.contains("/etc/tandem/boot.sh"),
        "{}",
        refused.stderr
    );
    let listed = run(tandem()
        .args(["image", "list", "--json", "--data"])
        .arg(&data))
    .ok();
    assert!(
        !listed.stdout.contains("corp-gold"),
        "an infected image was published: {}",
        listed.stdout
    );
    let forced = run(tandem()
        .args(["image", "publish", "corp-gold", "--force"])
        .arg(&image)
        .arg("--data")
        .arg(&data))
    .ok();
    assert!(
        forced
            .stderr
            .contains("publishing anyway because of --force"),
        "{}",
        forced.stderr
    );
}

/// Runs `cmd` in its own process group and waits for it; a hang is a test failure (and
/// the whole group, workers included, is killed).
fn run_bounded(cmd: &mut Command, secs: u64) -> Ran {
    use std::io::Read as _;
    use std::process::Stdio;
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = super::util::Reaped::spawn(cmd);
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
    let ended = super::util::wait_for(secs, || {
        status = child.0.try_wait().expect("try_wait");
        status.is_some()
    });
    assert!(ended, "{cmd:?} hung (still running after {secs} s)");
    let status = status.expect("ended");
    Ran {
        code: status.code().unwrap_or(-1),
        stdout: o.join().expect("stdout reader"),
        stderr: e.join().expect("stderr reader"),
    }
}

/// A qcow2 overlay (1 MiB, no data) whose header names `backing` (not opened by qemu-img).
fn overlay_on(dir: &Path, name: &str, backing: &Path, fmt: &str) -> PathBuf {
    let ov = dir.join(name);
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            s(backing),
            "-F",
            fmt,
            s(&ov),
            "1M",
        ],
    );
    ov
}

#[test]
fn scan_refuses_backing_files_outside_the_allow_list_fifos_and_symlinks() {
    let d = tempfile::tempdir().expect("tempdir");
    // A stand-in for a server key: a regular file the image's author wants read.
    let key = d.path().join("image-signing.key");
    std::fs::write(&key, format!("{EICAR}\n")).expect("write key");
    let ov = overlay_on(d.path(), "key.qcow2", &key, "raw");
    let r = run_bounded(tandem().args(["scan", "image", s(&ov), "--json"]), 120).code(3);
    assert!(
        r.stderr.contains("backing file") && r.stderr.contains("image-signing.key"),
        "{}",
        r.stderr
    );
    // Named explicitly, the operator gets what they asked for.
    let r = run_bounded(
        tandem().args(["scan", "image", s(&ov), "--backing", s(&key), "--json"]),
        120,
    );
    assert!(matches!(r.code, 1 | 2), "{}", r.stderr);

    // A FIFO as backing file, or as the image: refused at once, never waited on.
    let fifo = d.path().join("fifo");
    sh("mkfifo", &[s(&fifo)]);
    let ov = overlay_on(d.path(), "fifo.qcow2", &fifo, "raw");
    for extra in [&[][..], &["--backing", s(&fifo)][..]] {
        let r = run_bounded(
            tandem()
                .args(["scan", "image", s(&ov), "--json"])
                .args(extra),
            120,
        )
        .code(3);
        assert!(
            r.stderr.contains("FIFO") || r.stderr.contains("--backing"),
            "{}",
            r.stderr
        );
    }
    let r = run_bounded(tandem().args(["scan", "image", s(&fifo)]), 120).code(3);
    assert!(r.stderr.contains("FIFO"), "{}", r.stderr);

    // A symlink, named or followed, is refused: the header cannot lead elsewhere.
    let link = d.path().join("link.raw");
    std::os::unix::fs::symlink(&key, &link).expect("symlink");
    let ov = overlay_on(d.path(), "link.qcow2", &link, "raw");
    for named in [&link, &key] {
        let r = run_bounded(
            tandem().args(["scan", "image", s(&ov), "--backing", s(named)]),
            120,
        )
        .code(3);
        assert!(r.stderr.contains("symbolic link"), "{}", r.stderr);
    }
}

#[test]
fn scan_of_hostile_ext4_uninit_groups_and_huge_inodes_per_group_ends() {
    let d = tempfile::tempdir().expect("tempdir");
    let img = d.path().join("fs.img");
    sized(&img, 256 << 20);
    sh(
        "mkfs.ext4",
        &["-q", "-F", "-b", "1024", "-N", "2048", s(&img)],
    );
    let mut b = std::fs::read(&img).expect("read");
    b[1024 + 0x28..1024 + 0x2c].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&img, &b).expect("write");
    let r = run_bounded(tandem().args(["scan", "image", s(&img), "--json"]), 300);
    assert!(matches!(r.code, 0..=2), "exit {}: {}", r.code, r.stderr);
    let _ = r.json();
}

/// Pids of live `tandem … worker`/`publish-reader` processes whose parent is `parent`.
fn workers_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid …; comm may hold spaces, so split after the last ')'.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let mut f = rest.split_whitespace();
        let (state, ppid) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
        if state != "Z" && ppid == parent.to_string() {
            out.push(pid);
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start())
                .unwrap_or("");
            !state.starts_with('Z')
        })
        .unwrap_or(false)
}

#[test]
fn scan_and_publish_workers_die_with_a_killed_parent() {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    write(&src, "/hello.txt", b"hello");
    let img = mkext4(d.path(), &src, "fs.img", 8, &[]);
    let data = d.path().join("srv");
    let cmds: Vec<Vec<String>> = vec![
        vec!["scan".into(), "image".into(), s(&img).into()],
        vec![
            "image".into(),
            "publish".into(),
            "gold".into(),
            s(&img).into(),
            "--data".into(),
            s(&data).into(),
        ],
    ];
    for args in cmds {
        let mut c = tandem();
        c.args(&args)
            .env("TANDEM_TEST_SCAN_WORKER_HOLD", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let parent = super::util::Reaped::spawn(&mut c);
        let mut workers = Vec::new();
        assert!(
            super::util::wait_for(120, || {
                workers = workers_of(parent.pid());
                !workers.is_empty()
            }),
            "{args:?}: no worker started"
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(parent.pid() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill parent");
        assert!(
            super::util::wait_for(60, || workers.iter().all(|w| !alive(*w))),
            "{args:?}: workers {workers:?} outlived their killed parent"
        );
        drop(parent);
    }
}
