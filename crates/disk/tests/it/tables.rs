//! Partition tables written by sfdisk and sgdisk.

use tandem_disk::{open_image, volumes, TableKind};

use super::util::{s, sh};

fn sfdisk(img: &std::path::Path, script: &str) {
    use std::io::Write as _;
    let mut c = std::process::Command::new("sfdisk")
        .args(["-q", s(img)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn sfdisk");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("script");
    assert!(c.wait().expect("wait").success(), "sfdisk failed");
}

#[test]
fn mbr_primary_and_logical_partitions() {
    let d = tempfile::tempdir().expect("tempdir");
    let img = d.path().join("mbr.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create");
    sfdisk(&img, "label: dos\nstart=2048, size=4096, type=83\nstart=8192, size=20000, type=5\nstart=10240, size=2048, type=7\nstart=14336, size=2048, type=c\n");
    let v = volumes(&*open_image(&img).expect("open")).expect("volumes");
    let got: Vec<(u32, u64, u64, &str)> = v
        .iter()
        .map(|v| (v.index, v.start / 512, v.len / 512, v.type_id.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, 2048, 4096, "0x83"),
            (5, 10240, 2048, "0x07"),
            (6, 14336, 2048, "0x0c")
        ]
    );
    assert!(v.iter().all(|v| v.table == TableKind::Mbr));
}

#[test]
fn gpt_partitions_and_backup_when_primary_is_damaged() {
    let d = tempfile::tempdir().expect("tempdir");
    let img = d.path().join("gpt.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(8 << 20))
        .expect("create");
    sh(
        "sgdisk",
        &[
            "-n",
            "1:2048:4095",
            "-c",
            "1:boot",
            "-t",
            "1:ef00",
            "-n",
            "2:4096:12000",
            "-c",
            "2:données",
            s(&img),
        ],
    );
    let v = volumes(&*open_image(&img).expect("open")).expect("volumes");
    assert_eq!(v.len(), 2);
    assert_eq!((v[0].start, v[0].len), (2048 * 512, 2048 * 512));
    assert_eq!(v[0].type_id, "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
    assert_eq!(v[1].name.as_deref(), Some("données"));
    assert_eq!(v[1].table, TableKind::Gpt);
    // Damage the primary header: the backup still describes the disk.
    let mut b = std::fs::read(&img).expect("read");
    b[512 + 24] ^= 0xff;
    std::fs::write(&img, &b).expect("write");
    let v2 = volumes(&*open_image(&img).expect("open")).expect("backup used");
    assert_eq!(v2, v);
}
