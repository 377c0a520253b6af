//! `scan_disk`: the in-process call gold-image publish uses.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use tandem_disk::ReadAt;
use tandem_scan::{Outcome, Reason, RuleSet, ScanConfig, Verdict};

const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

fn mkext4(dir: &Path, files: &[(&str, &[u8])]) -> Arc<dyn ReadAt> {
    let src = dir.join("src");
    for (rel, data) in files {
        let p = src.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, data).expect("write");
    }
    let img = dir.join("fs.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(8 << 20))
        .expect("create");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&img)
        .status()
        .expect("mkfs.ext4");
    assert!(st.success());
    Arc::from(tandem_disk::open_image(&img).expect("open"))
}

#[test]
fn scan_disk_reports_infected_clean_and_too_large() {
    let d = tempfile::tempdir().expect("tempdir");
    let big = vec![b'a'; 100_000];
    let disk = mkext4(
        d.path(),
        &[
            ("etc/ok.conf", b"clean"),
            ("tmp/x/eicar.txt", EICAR.as_bytes()),
            ("big.bin", &big),
        ],
    );
    let engine = RuleSet::builtin().compile().expect("compile");
    let cfg = ScanConfig {
        max_file_size: 50_000,
        list_clean: true,
        ..ScanConfig::default()
    };
    let r = tandem_scan::scan_disk(disk.clone(), "gold@1", &engine, &cfg).expect("scan");
    assert_eq!(r.outcome, Outcome::Infected);
    assert_eq!(
        r.infected_files().iter().map(|f| f.1).collect::<Vec<_>>(),
        vec!["/tmp/x/eicar.txt"]
    );
    let big = r.volumes[0]
        .files
        .iter()
        .find(|f| f.path == "/big.bin")
        .expect("listed");
    assert!(matches!(
        big.verdict,
        Verdict::NotScanned {
            reason: Reason::TooLarge,
            ..
        }
    ));
    assert_eq!((r.counts.files, r.counts.clean), (3, 1), "{:?}", r.counts);

    // Without the size cap and without EICAR-matching files, the disk is clean.
    let d2 = tempfile::tempdir().expect("tempdir");
    let clean = mkext4(d2.path(), &[("a.txt", b"hello")]);
    let r = tandem_scan::scan_disk(clean, "gold@2", &engine, &ScanConfig::default()).expect("scan");
    assert_eq!(r.outcome, Outcome::Clean);
    assert_eq!(r.counts.files, 1);
}
