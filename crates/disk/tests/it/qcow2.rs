//! qcow2 reads match what QEMU itself reads.

use std::sync::Arc;

use tandem_disk::{open_image, open_image_with, BackingPolicy, DiskError, ReadAt};

use super::util::{pattern, read_all, s, sh};

fn flat(dir: &std::path::Path, img: &std::path::Path) -> Vec<u8> {
    let out = dir.join("flat.raw");
    sh("qemu-img", &["convert", "-O", "raw", s(img), s(&out)]);
    std::fs::read(out).expect("read flat")
}

#[test]
fn qcow2_reads_match_qemu_including_backing_zero_and_partial_clusters() {
    let d = tempfile::tempdir().expect("tempdir");
    let base = d.path().join("base.raw");
    let mut data = pattern(3 << 20, 1);
    data[1 << 20..(1 << 20) + 200_000].fill(0);
    std::fs::write(&base, &data).expect("write base");
    // A qcow2 copy with small clusters, then an overlay on the raw base.
    let q = d.path().join("copy.qcow2");
    sh(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            s(&base),
            s(&q),
        ],
    );
    let v = open_image(&q).expect("open copy");
    assert_eq!(read_all(&*v), data);

    let ov = d.path().join("ov.qcow2");
    // Overlay larger than its base: the tail reads as zeros.
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "base.raw",
            s(&ov),
            "4M",
        ],
    );
    sh(
        "qemu-io",
        &[
            "-c",
            "write -P 0xab 65536 70000",
            "-c",
            "write -z 1048576 65536",
            "-c",
            "write -P 0x11 3500000 1000",
            s(&ov),
        ],
    );
    // And an overlay on the overlay, with its own write.
    let top = d.path().join("top.qcow2");
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
            "ov.qcow2",
            s(&top),
        ],
    );
    sh("qemu-io", &["-c", "write -P 0x5c 100 5000", s(&top)]);
    // Backing files are followed only when the operator named each one.
    let err = open_image(&top).expect_err("no backing files by default");
    assert!(matches!(err, DiskError::Backing { .. }), "{err}");
    let only_ov = BackingPolicy::allow(std::slice::from_ref(&ov)).expect("allow");
    let err = open_image_with(&top, &only_ov).expect_err("base.raw not named");
    assert!(err.to_string().contains("base.raw"), "{err}");
    let both = BackingPolicy::allow(&[ov.clone(), base.clone()]).expect("allow");
    let v = open_image_with(&top, &both).expect("open top");
    assert_eq!(v.size(), 4 << 20);
    let expect = flat(d.path(), &top);
    assert_eq!(read_all(&*v), expect);
    // Unaligned small reads across cluster boundaries.
    let mut b = vec![0u8; 70_001];
    v.read_at(&mut b, 65_535).expect("read");
    assert_eq!(b, expect[65_535..65_535 + 70_001]);
    assert!(
        v.read_at(&mut b, (4 << 20) - 10).is_err(),
        "past the end is an error"
    );
}

#[test]
fn zstd_compressed_is_read_zlib_is_a_clear_error() {
    let d = tempfile::tempdir().expect("tempdir");
    let base = d.path().join("base.raw");
    let mut data = pattern(1 << 20, 2);
    data[..300_000].fill(7); // compressible
    std::fs::write(&base, &data).expect("write");
    let z = d.path().join("z.qcow2");
    sh(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            s(&base),
            s(&z),
        ],
    );
    assert_eq!(read_all(&*open_image(&z).expect("open zstd")), data);
    let g = d.path().join("g.qcow2");
    sh(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", s(&base), s(&g)],
    );
    let v = open_image(&g).expect("open zlib");
    let mut b = vec![0u8; 65536];
    let err = v.read_at(&mut b, 0).expect_err("zlib unsupported");
    assert!(err.to_string().contains("qemu-img convert"), "{err}");
}

#[test]
fn encrypted_qcow2_is_refused_with_a_clear_message() {
    let d = tempfile::tempdir().expect("tempdir");
    let key = d.path().join("key");
    std::fs::write(&key, "c2VjcmV0").expect("key");
    let e = d.path().join("e.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            &format!("secret,id=s0,file={}", s(&key)),
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            s(&e),
            "1M",
        ],
    );
    let err = open_image(&e).expect_err("encrypted");
    assert!(matches!(err, DiskError::Encrypted { .. }), "{err}");
}

#[test]
fn truncated_and_mutated_qcow2_fail_cleanly() {
    let d = tempfile::tempdir().expect("tempdir");
    let base = d.path().join("base.raw");
    std::fs::write(&base, pattern(2 << 20, 3)).expect("write");
    let q = d.path().join("q.qcow2");
    sh("qemu-img", &["convert", "-O", "qcow2", s(&base), s(&q)]);
    let good = std::fs::read(&q).expect("read");
    // Truncated: either open fails or reading the tail fails; never a panic or zeros.
    let t = d.path().join("t.qcow2");
    std::fs::write(&t, &good[..good.len() / 2]).expect("write");
    match open_image(&t) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(v) => {
            let mut b = vec![0u8; v.size() as usize];
            assert!(v.read_at(&mut b, 0).is_err(), "truncated image read fully");
        }
    }
    // Header fields set to hostile values, one byte at a time.
    let m = d.path().join("m.qcow2");
    for at in 4..112 {
        for val in [0x00u8, 0xff, 0x7f] {
            let mut bad = good.clone();
            bad[at] = val;
            std::fs::write(&m, &bad).expect("write");
            if let Ok(v) = open_image(&m) {
                let v: Arc<dyn ReadAt> = Arc::from(v);
                let mut b = vec![0u8; 4096];
                let _ = v.read_at(&mut b, 0);
                let _ = v.read_at(&mut b, v.size().saturating_sub(4096));
            }
        }
    }
}

#[test]
fn backing_loop_is_an_error() {
    let d = tempfile::tempdir().expect("tempdir");
    let a = d.path().join("a.qcow2");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", s(&a), "1M"]);
    let b = d.path().join("b.qcow2");
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
            "a.qcow2",
            s(&b),
        ],
    );
    // Point a at b: qemu-img rebase -u does not check for loops.
    sh(
        "qemu-img",
        &["rebase", "-u", "-F", "qcow2", "-b", "b.qcow2", s(&a)],
    );
    let both = BackingPolicy::allow(&[a.clone(), b.clone()]).expect("allow");
    let err = open_image_with(&b, &both).expect_err("loop");
    assert!(err.to_string().contains("deeper"), "{err}");
}

#[test]
fn qcow2_bytes_held_in_another_view_are_read_the_same() {
    let d = tempfile::tempdir().expect("tempdir");
    let base = d.path().join("base.raw");
    let data = pattern(1 << 20, 4);
    std::fs::write(&base, &data).expect("write");
    let q = d.path().join("q.qcow2");
    sh("qemu-img", &["convert", "-O", "qcow2", s(&base), s(&q)]);
    let held: Arc<dyn ReadAt> = Arc::new(tandem_disk::MemDisk(std::fs::read(&q).expect("read")));
    let v = tandem_disk::open_view(held, &q).expect("open view");
    assert_eq!(read_all(&*v), data);
    let raw: Arc<dyn ReadAt> = Arc::new(tandem_disk::MemDisk(data.clone()));
    assert_eq!(
        read_all(&*tandem_disk::open_view(raw, &base).expect("raw")),
        data
    );
    // An overlay kept in a store cannot reach its backing file: refused, clearly.
    let ov = d.path().join("ov.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "base.raw",
            s(&ov),
        ],
    );
    let held: Arc<dyn ReadAt> = Arc::new(tandem_disk::MemDisk(std::fs::read(&ov).expect("read")));
    let err = tandem_disk::open_view(held, &ov).expect_err("backing refused");
    assert!(err.to_string().contains("backing file"), "{err}");
}

#[test]
fn nbd_client_reads_an_encrypted_qcow2_decrypted_by_qemu_nbd() {
    let d = tempfile::tempdir().expect("tempdir");
    let base = d.path().join("base.raw");
    let data = pattern(3 << 20, 5);
    std::fs::write(&base, &data).expect("write");
    let key = d.path().join("key");
    std::fs::write(&key, "c2VjcmV0LXBhc3M=").expect("key");
    let e = d.path().join("e.qcow2");
    let secret = format!("secret,id=s0,file={}", s(&key));
    sh(
        "qemu-img",
        &[
            "convert",
            "--object",
            &secret,
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            s(&base),
            s(&e),
        ],
    );
    let sock = d.path().join("nbd.sock");
    let mut child = std::process::Command::new("qemu-nbd")
        .args([
            "--read-only",
            "--persistent",
            "--shared=4",
            "--socket",
            s(&sock),
            "--object",
            &secret,
            "--image-opts",
        ])
        .arg(format!(
            "driver=qcow2,file.driver=file,file.filename={},encrypt.key-secret=s0",
            s(&e)
        ))
        .spawn()
        .expect("qemu-nbd");
    let mut ok = false;
    for _ in 0..100 {
        if sock.exists() {
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let result = std::panic::catch_unwind(|| {
        assert!(ok, "qemu-nbd did not create its socket");
        let v = tandem_disk::NbdClient::connect(&sock).expect("connect");
        assert_eq!(v.size(), data.len() as u64);
        assert_eq!(read_all(&v), data);
        let mut b = vec![0u8; 777];
        v.read_at(&mut b, 1_000_001).expect("read");
        assert_eq!(b, data[1_000_001..1_000_778]);
        assert!(v.read_at(&mut b, data.len() as u64 - 10).is_err());
    });
    let _ = child.kill();
    let _ = child.wait();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// A qcow2 whose header names a host file (here a stand-in for a server key), a FIFO,
/// a symlink or a device: none of them is ever opened, and nothing blocks.
#[test]
fn backing_files_outside_the_allow_list_are_never_opened() {
    let d = tempfile::tempdir().expect("tempdir");
    let secret = d.path().join("image-signing.key");
    std::fs::write(&secret, pattern(4096, 9)).expect("write key");
    let fifo = d.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let link = d.path().join("link.raw");
    std::os::unix::fs::symlink(&secret, &link).expect("symlink");
    let ov = d.path().join("ov.qcow2");
    for (target, fmt) in [
        (secret.clone(), "raw"),
        (fifo.clone(), "raw"),
        (link.clone(), "raw"),
        ("/dev/zero".into(), "raw"),
        (secret.clone(), "qcow2"),
    ] {
        let _ = std::fs::remove_file(&ov);
        let args = vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            s(&target),
            "-F",
            fmt,
            s(&ov),
            "1M",
        ];
        sh("qemu-img", &args);
        let err = open_image(&ov).expect_err("refused by default");
        assert!(matches!(err, DiskError::Backing { .. }), "{err}");
        // Naming the overlay's target explicitly still refuses what is not a regular file.
        if let Ok(p) = BackingPolicy::allow(std::slice::from_ref(&target)) {
            assert_eq!(target, secret, "only the regular file can be named");
            // Named, it is read as what the header says: raw works, qcow2 is no qcow2.
            assert_eq!(open_image_with(&ov, &p).is_ok(), fmt == "raw");
        }
        let p = BackingPolicy::allow(std::slice::from_ref(&secret)).expect("allow");
        if target != secret {
            let e = open_image_with(&ov, &p).expect_err("not the named file");
            assert!(matches!(e, DiskError::Backing { .. }), "{e}");
        }
    }
    // The image itself may not be a FIFO either (opening it would block).
    let err = open_image(&fifo).expect_err("fifo image");
    assert!(matches!(err, DiskError::NotADiskFile { .. }), "{err}");
}
