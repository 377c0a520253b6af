//! Replays every committed regression input (`regressions/<target>/`, each a crash or
//! hang the fuzzer once found) and every generated seed through its target. Run by
//! `scripts/fuzz.sh` (so by `scripts/test.sh` in CI) before fuzzing.

use std::path::{Path, PathBuf};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "README.md"))
        .collect();
    v.sort();
    v
}

#[test]
fn every_regression_input_and_seed_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let regressions = root.join("regressions");
    if let Ok(rd) = std::fs::read_dir(&regressions) {
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if e.path().is_dir() {
                assert!(
                    tandem_fuzz::TARGETS.iter().any(|t| t.name == name),
                    "regressions/{name}/ names no target"
                );
            }
        }
    }
    let seeds = tempfile::tempdir().expect("tempdir");
    tandem_fuzz::seeds::write_all(seeds.path()).expect("write seeds");
    let mut failures = Vec::new();
    let mut summary = Vec::new();
    for t in tandem_fuzz::TARGETS {
        let kept = inputs(&regressions.join(t.name));
        let seeded = inputs(&seeds.path().join(t.name));
        assert!(!seeded.is_empty(), "{}: no seeds", t.name);
        for p in kept.iter().chain(&seeded) {
            let data = std::fs::read(p).expect("read input");
            if let Err(found) = tandem_fuzz::replay(t.run, &data) {
                failures.push(format!("{} {}: {}", t.name, p.display(), found.join("; ")));
            }
        }
        summary.push(format!("{} {}+{}", t.name, kept.len(), seeded.len()));
    }
    eprintln!("replayed (regressions+seeds): {}", summary.join(", "));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The seeds reach what the targets are for: each filesystem seed's planted file is found
/// by its walker, and the block-delta seeds build every chunk of v2 they describe.
#[test]
fn seeds_reach_the_walkers_and_the_delta_builder() {
    use tandem_disk::FsKind;
    use tandem_fuzz::targets::{apply_chunk_delta, scan_report};
    let seeds = tempfile::tempdir().expect("tempdir");
    tandem_fuzz::seeds::write_all(seeds.path()).expect("write seeds");
    for (target, kind) in [
        ("scan_ext4", FsKind::Ext),
        ("scan_fat", FsKind::Fat),
        ("scan_ntfs", FsKind::Ntfs),
    ] {
        for p in inputs(&seeds.path().join(target)) {
            let data = std::fs::read(&p).expect("read seed");
            let r = scan_report(&data, kind).expect("a scannable filesystem");
            assert_eq!(
                r.outcome,
                tandem_scan::Outcome::Infected,
                "{}: {r:?}",
                p.display()
            );
        }
    }
    for p in inputs(&seeds.path().join("chunk_delta")) {
        let data = std::fs::read(&p).expect("read seed");
        let st = apply_chunk_delta(&data)
            .expect("not empty")
            .expect("the real delta applies");
        assert!(st.built > 0 && st.mismatched.is_empty(), "{st:?}");
    }
}

/// `replay` fails on a panic in our code even when something caught it (the scanner
/// catches walker panics), and on a panic that escapes the target.
#[test]
fn replay_reports_caught_and_escaped_panics() {
    fn caught(_: &[u8]) {
        let _ = std::panic::catch_unwind(|| panic!("caught inside"));
    }
    fn escaped(_: &[u8]) {
        panic!("escaped");
    }
    fn fine(_: &[u8]) {}
    let e = tandem_fuzz::replay(caught, b"").expect_err("caught panic reported");
    assert!(e[0].contains("caught inside"), "{e:?}");
    let e = tandem_fuzz::replay(escaped, b"").expect_err("escaped panic reported");
    assert!(e[0].contains("escaped"), "{e:?}");
    assert!(tandem_fuzz::replay(fine, b"").is_ok());
}
