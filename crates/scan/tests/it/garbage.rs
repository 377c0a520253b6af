//! Every filesystem walker hammered with mutated images, from a fixed seed.
//!
//! cargo-afl fuzzes the light parsers (`fuzz/`); the walkers are reached through the
//! scanner's entry point, which links YARA-X, too slow to build instrumented on these
//! machines. So: real ext4, FAT and NTFS images (made by mkfs, holding EICAR) mutated in
//! their metadata a few hundred times each, deterministically. Every run must end (no
//! hang, no abort) with a report whose volumes are each clean, infected or not scanned,
//! and a mutation that makes a volume unreadable must never turn it "clean" while the
//! planted file is gone from the listing.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use tandem_disk::ReadAt;
use tandem_scan::{Outcome, RuleSet, ScanConfig, Verdict};

const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

fn sh(prog: &str, args: &[&str]) -> bool {
    Command::new(prog)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn sized(p: &Path, len: u64) {
    std::fs::File::create(p)
        .and_then(|f| f.set_len(len))
        .expect("create");
}

/// The seed images: (name, bytes). Tools missing on the machine fail the test.
fn seeds(dir: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("a/b")).expect("mkdir");
    std::fs::write(src.join("a/b/eicar.txt"), EICAR).expect("write");
    std::fs::write(src.join("clean.txt"), b"hello").expect("write");
    let mut out = Vec::new();

    let ext = dir.join("ext4.img");
    sized(&ext, 4 << 20);
    assert!(sh(
        "mkfs.ext4",
        &["-q", "-F", "-b", "1024", "-d", s(&src), s(&ext)]
    ));
    out.push(("ext4", std::fs::read(&ext).expect("read")));

    let fat = dir.join("fat.img");
    sized(&fat, 4 << 20);
    assert!(sh("mkfs.vfat", &[s(&fat)]), "mkfs.vfat (dosfstools)");
    assert!(sh("mmd", &["-i", s(&fat), "::/a"]), "mtools");
    let e = src.join("a/b/eicar.txt");
    assert!(sh("mcopy", &["-i", s(&fat), s(&e), "::/a/eicar.txt"]));
    out.push(("fat", std::fs::read(&fat).expect("read")));

    let ntfs = dir.join("ntfs.img");
    sized(&ntfs, 4 << 20);
    assert!(
        sh("mkntfs", &["-q", "-F", "-f", s(&ntfs)]),
        "mkntfs (ntfs-3g)"
    );
    assert!(
        sh("ntfscp", &["-f", s(&ntfs), s(&e), "eicar.txt"]),
        "ntfscp"
    );
    out.push(("ntfs", std::fs::read(&ntfs).expect("read")));
    out
}

/// xorshift64*, fixed seed: the same mutations on every run and machine.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One mutation: a few bytes, words or a whole sector in the metadata-dense first
/// 256 KiB; sometimes a cut of the image.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    let hot = b.len().min(256 << 10) as u64;
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(hot) as usize;
        match rng.below(5) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => b[at] = rng.next() as u8,
            2 => {
                let v = [0u32, 1, 0xffff_ffff, 0x7fff_ffff, 0x8000_0000][rng.below(5) as usize];
                let end = (at + 4).min(b.len());
                b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            3 => {
                let start = at & !511;
                let end = (start + 512).min(b.len());
                for x in &mut b[start..end] {
                    *x = rng.next() as u8;
                }
            }
            _ => {
                let end = (at + 8).min(b.len());
                let v = rng.next().to_le_bytes();
                b[at..end].copy_from_slice(&v[..end - at]);
            }
        }
    }
    if rng.below(10) == 0 {
        let cut = (rng.below(b.len() as u64) as usize) & !511;
        b.truncate(cut.max(512));
    }
    b
}

#[test]
fn mutated_ext4_fat_and_ntfs_images_always_end_with_an_honest_report() {
    let d = tempfile::tempdir().expect("tempdir");
    let engine = RuleSet::builtin().compile().expect("compile");
    let cfg = ScanConfig {
        volume_timeout_secs: 30,
        file_timeout_secs: 5,
        ..ScanConfig::default()
    };
    let mut rng = Rng(0x7a6e_6465_6d2d_6675);
    let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
    for (name, seed) in seeds(d.path()) {
        // The unmutated seed is infected: the walker reaches the planted file.
        let disk: Arc<dyn ReadAt> = Arc::new(tandem_disk::MemDisk(seed.clone()));
        let r = tandem_scan::scan_disk(disk, name, &engine, &cfg).expect("scan seed");
        assert_eq!(r.outcome, Outcome::Infected, "{name} seed: {r:?}");
        for i in 0..300 {
            let bytes = mutate(&mut rng, &seed);
            let disk: Arc<dyn ReadAt> = Arc::new(tandem_disk::MemDisk(bytes));
            let Ok(r) = tandem_scan::scan_disk(disk, name, &engine, &cfg) else {
                *outcomes.entry(format!("{name} table error")).or_default() += 1;
                continue;
            };
            for v in &r.volumes {
                let files_ok = v.files.iter().all(|f| {
                    matches!(
                        f.verdict,
                        Verdict::Clean | Verdict::Infected { .. } | Verdict::NotScanned { .. }
                    )
                });
                assert!(files_ok, "{name} mutation {i}");
                // A volume is clean only when every file listed in it is.
                if matches!(v.verdict, Verdict::Clean) {
                    assert!(
                        v.files.iter().all(|f| matches!(f.verdict, Verdict::Clean)),
                        "{name} mutation {i}: clean volume with unclean files"
                    );
                }
            }
            *outcomes
                .entry(format!("{name} {:?}", r.outcome))
                .or_default() += 1;
        }
    }
    eprintln!("outcomes of 900 mutated scans: {outcomes:?}");
}
