//! Zeroing the claimed-unused ranges never changes a file: checked by reading every file
//! back with independent readers (ext4-view, ntfscat) from the zeroed copy.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tandem_disk::{open_image, unused_ranges, FsKind, ReadAt};

use super::util::{pattern, s, sh};

/// A source tree with files of many sizes, including multi-extent and empty ones.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for (i, len) in [0usize, 1, 100, 4095, 4096, 4097, 70_000, 300_000, 1_500_000]
        .iter()
        .enumerate()
    {
        let rel = PathBuf::from(format!("d{}/sub/f{i}.bin", i % 3));
        let data = pattern(*len, 100 + i as u64);
        std::fs::create_dir_all(dir.join(&rel).parent().expect("parent")).expect("mkdir");
        std::fs::write(dir.join(&rel), &data).expect("write");
        files.push((rel, data));
    }
    files
}

fn zeroed_copy(img: &Path, out: &Path, start: u64) -> (Vec<u8>, tandem_disk::UnusedMap) {
    let v: Arc<dyn ReadAt> = Arc::from(open_image(img).expect("open"));
    let map = unused_ranges(v).expect("unused");
    let mut b = std::fs::read(img).expect("read");
    map.zero_unused(&mut b, 0);
    std::fs::write(out, &b).expect("write");
    let _ = start;
    (b, map)
}

fn free_blocks(img: &str) -> u64 {
    let out = sh("dumpe2fs", &["-h", img]);
    let line = |k: &str| {
        out.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().parse::<u64>().expect("number"))
            .expect("field")
    };
    line("Free blocks") * line("Block size")
}

fn check_ext4(mkfs_args: &[&str], size: u64) {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    let files = tree(&src);
    let img = d.path().join("fs.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(size))
        .expect("create");
    let mut args = vec!["-q", "-F", "-d", s(&src)];
    args.extend_from_slice(mkfs_args);
    args.push(s(&img));
    sh("mkfs.ext4", &args);
    let zeroed = d.path().join("zeroed.img");
    let (_, map) = zeroed_copy(&img, &zeroed, 0);
    assert_eq!(map.volumes.len(), 1);
    assert_eq!(map.volumes[0].fs, FsKind::Ext);
    assert!(map.volumes[0].note.is_none(), "{:?}", map.volumes[0].note);
    // Exactly the blocks e2fsprogs counts as free, no more (uninit groups included).
    assert_eq!(map.unused_bytes(), free_blocks(s(&img)));
    let fs = super::util::ext4(&zeroed);
    for (rel, data) in &files {
        let p = format!("/{}", rel.display());
        assert_eq!(
            &fs.read(p.as_str()).expect("read file"),
            data,
            "{p} changed"
        );
    }
    sh("e2fsck", &["-fn", s(&zeroed)]);
}

#[test]
fn ext4_default_features_files_survive_and_free_matches_e2fsprogs() {
    check_ext4(&[], 32 << 20);
}

#[test]
fn ext4_many_uninit_groups_with_flex_bg() {
    // 1 KiB blocks, 1024 blocks per group: 48 groups, most BLOCK_UNINIT, metadata packed
    // into the first groups by flex_bg.
    check_ext4(
        &[
            "-b",
            "1024",
            "-g",
            "1024",
            "-O",
            "flex_bg,uninit_bg,^metadata_csum",
        ],
        48 << 20,
    );
}

#[test]
fn ext2_without_uninit_groups() {
    check_ext4(&["-t", "ext2", "-O", "^dir_index"], 8 << 20);
}

#[test]
fn ext4_inside_gpt_and_mbr_partitions_only_claims_inside_the_filesystem() {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    let files = tree(&src);
    let fsimg = d.path().join("fs.img");
    std::fs::File::create(&fsimg)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create");
    sh("mkfs.ext4", &["-q", "-F", "-d", s(&src), s(&fsimg)]);
    let fsbytes = std::fs::read(&fsimg).expect("read");
    for label in ["gpt", "mbr"] {
        let disk = d.path().join(format!("{label}.img"));
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(24 << 20))
            .expect("create");
        if label == "gpt" {
            sh("sgdisk", &["-n", "1:2048:+16M", s(&disk)]);
        } else {
            sh(
                "sh",
                &[
                    "-c",
                    &format!(
                        "echo 'start=2048, size=32768, type=83' | sfdisk -q {}",
                        s(&disk)
                    ),
                ],
            );
        }
        let mut b = std::fs::read(&disk).expect("read");
        b[1 << 20..(1 << 20) + fsbytes.len()].copy_from_slice(&fsbytes);
        // Garbage outside the filesystem must never be claimed.
        b[(17 << 20) + 4096..(18 << 20)].fill(0xee);
        std::fs::write(&disk, &b).expect("write");
        let v: Arc<dyn ReadAt> = Arc::from(open_image(&disk).expect("open"));
        let map = unused_ranges(v).expect("unused");
        assert!(
            map.ranges
                .iter()
                .all(|r| r.start >= 1 << 20 && r.end <= 17 << 20),
            "{label}: claim outside fs"
        );
        assert!(map.unused_bytes() > 8 << 20, "{label}: too little claimed");
        let mut z = b.clone();
        map.zero_unused(&mut z, 0);
        assert!(z[(17 << 20) + 4096..(18 << 20)].iter().all(|&x| x == 0xee));
        let part = d.path().join("part.img");
        std::fs::write(&part, &z[1 << 20..17 << 20]).expect("write");
        let fs = super::util::ext4(&part);
        for (rel, data) in &files {
            assert_eq!(
                &fs.read(format!("/{}", rel.display()).as_str())
                    .expect("read"),
                data
            );
        }
    }
}

#[test]
fn ntfs_files_survive_zeroing_bitmap_free_clusters() {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    let files = tree(&src);
    let img = d.path().join("ntfs.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create");
    sh("mkntfs", &["-q", "-F", "-f", s(&img)]);
    for (i, (_, data)) in files.iter().enumerate() {
        let p = d.path().join(format!("f{i}"));
        std::fs::write(&p, data).expect("write");
        sh(
            "ntfscp",
            &["-q", "-f", s(&img), s(&p), &format!("f{i}.bin")],
        );
    }
    let zeroed = d.path().join("zeroed.img");
    let (_, map) = zeroed_copy(&img, &zeroed, 0);
    assert_eq!(map.volumes[0].fs, FsKind::Ntfs);
    assert!(map.volumes[0].note.is_none(), "{:?}", map.volumes[0].note);
    assert!(
        map.unused_bytes() > 8 << 20 && map.unused_bytes() < 16 << 20,
        "{}",
        map.unused_bytes()
    );
    for (i, (_, data)) in files.iter().enumerate() {
        let out = std::process::Command::new("ntfscat")
            .args([s(&zeroed), &format!("f{i}.bin")])
            .output()
            .expect("ntfscat");
        assert!(
            out.status.success(),
            "ntfscat f{i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(&out.stdout, data, "f{i}.bin changed");
    }
}

#[test]
fn unknown_volumes_and_dirty_journals_claim_nothing() {
    let d = tempfile::tempdir().expect("tempdir");
    let img = d.path().join("junk.img");
    std::fs::write(&img, pattern(4 << 20, 9)).expect("write");
    let v: Arc<dyn ReadAt> = Arc::from(open_image(&img).expect("open"));
    let map = unused_ranges(v).expect("unused");
    assert_eq!(map.unused_bytes(), 0);
    // An ext4 whose journal needs recovery (incompat RECOVER bit set by hand).
    let e = d.path().join("e.img");
    std::fs::File::create(&e)
        .and_then(|f| f.set_len(8 << 20))
        .expect("create");
    sh("mkfs.ext4", &["-q", "-F", s(&e)]);
    let mut b = std::fs::read(&e).expect("read");
    b[1024 + 0x60] |= 0x4;
    std::fs::write(&e, &b).expect("write");
    let v: Arc<dyn ReadAt> = Arc::from(open_image(&e).expect("open"));
    let map = unused_ranges(v).expect("unused");
    assert_eq!(map.unused_bytes(), 0);
    assert!(map.volumes[0]
        .note
        .as_deref()
        .unwrap_or("")
        .contains("recovery"));
}

/// Runs `f` on a thread and fails the test if it has not returned after `secs` (a hang
/// detector, far above the milliseconds the work takes).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .expect("the parser hung on a hostile image")
}

#[test]
fn hostile_ext4_uninit_groups_with_huge_inodes_per_group_claim_nothing_and_return() {
    let d = tempfile::tempdir().expect("tempdir");
    let img = d.path().join("fs.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(256 << 20))
        .expect("create");
    // 1 KiB blocks: 32 groups, most of them BLOCK_UNINIT (metadata_csum, flex_bg defaults).
    sh(
        "mkfs.ext4",
        &["-q", "-F", "-b", "1024", "-N", "2048", s(&img)],
    );
    let mut b = std::fs::read(&img).expect("read");
    // s_inodes_per_group = 0xffffffff: each inode table would span ~2^28 blocks.
    b[1024 + 0x28..1024 + 0x2c].copy_from_slice(&u32::MAX.to_le_bytes());
    let bad = d.path().join("bad.img");
    std::fs::write(&bad, &b).expect("write");
    let map = within(120, move || {
        let v: Arc<dyn ReadAt> = Arc::from(open_image(&bad).expect("open"));
        unused_ranges(v).expect("the partition table is fine")
    });
    assert_eq!(
        map.unused_bytes(),
        0,
        "nothing is claimed on a broken filesystem"
    );
    let note = map.volumes[0].note.clone().unwrap_or_default();
    assert!(note.contains("inodes per group"), "{note}");

    // Inode tables that all claim the same blocks: still bounded work, still a sound map.
    let mut b = std::fs::read(&img).expect("read");
    let ipg = u32::from_le_bytes(b[1024 + 0x28..1024 + 0x2c].try_into().expect("4"));
    assert!(ipg > 0);
    let gdt = 2048usize; // block 2 with 1 KiB blocks
    let desc = 64usize; // 64bit feature is a mkfs default
    for g in 0..32 {
        let at = gdt + g * desc + 8;
        b[at..at + 4].copy_from_slice(&100u32.to_le_bytes());
    }
    std::fs::write(d.path().join("shared.img"), &b).expect("write");
    let shared = d.path().join("shared.img");
    within(120, move || {
        let v: Arc<dyn ReadAt> = Arc::from(open_image(&shared).expect("open"));
        unused_ranges(v).expect("map")
    });
}
