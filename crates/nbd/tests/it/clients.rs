//! Conformance with clients someone else wrote: libnbd's `nbdinfo` and `nbdcopy`
//! (Debian's `libnbd-bin`) and `qemu-img` see the manifest's holes as holes, and every
//! byte they copy is the image's.

use super::util::*;

/// `nbdinfo --map` prints `offset length type description` per extent of
/// `base:allocation`; type bit 0 is `NBD_STATE_HOLE`, bit 1 `NBD_STATE_ZERO`.
#[test]
fn nbdinfo_map_reports_manifest_holes_as_hole_zero() {
    let ex = Export::start();
    let out = run("nbdinfo", &["--map", &ex.uri()]);
    let mut seen = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 3, "unexpected nbdinfo --map line {line:?}");
        let (off, len, kind): (u64, u64, u32) = (
            f[0].parse().expect("offset"),
            f[1].parse().expect("length"),
            f[2].parse().expect("type"),
        );
        let hole = kind & 1 != 0;
        assert_eq!(
            kind,
            if hole { 3 } else { 0 },
            "line {line:?}: holes are hole,zero; data is 0"
        );
        seen.push((off, len, hole));
    }
    assert_eq!(merge(seen), expected_runs(), "nbdinfo --map output:\n{out}");
    // The export advertises what it negotiates.
    let info = run("nbdinfo", &[&ex.uri()]);
    assert!(
        info.contains("can_meta_context: base:allocation=true") || info.contains("base:allocation"),
        "nbdinfo does not list base:allocation:\n{info}"
    );
    assert!(info.contains("is_read_only: true"), "{info}");
}

/// `nbdcopy --sparse=0` turns off its own detection of zero blocks, so it skips exactly
/// the requests (64 KiB here, one chunk) that block status reported as zero, and
/// `--destination-is-zero` lets it skip them rather than write zeros: any hole in the
/// copy comes from the export's `base:allocation`.
#[test]
fn nbdcopy_copies_byte_exact_and_leaves_holes_unwritten() {
    let ex = Export::start();
    let out = ex.path("copy.raw");
    std::fs::File::create(&out).expect("create destination");
    run(
        "nbdcopy",
        &[
            "--sparse=0",
            "--request-size=65536",
            "--destination-is-zero",
            &ex.uri(),
            out.to_str().expect("utf-8 path"),
        ],
    );
    let copy = std::fs::read(&out).expect("read copy");
    assert!(copy == ex.data, "nbdcopy's copy differs from the image");
    let alloc = allocated(&out);
    assert!(
        alloc <= data_bytes() + 64 * 1024,
        "the copy has {alloc} bytes allocated for {} bytes of data: holes were copied as data",
        data_bytes()
    );
}

/// `qemu-img map` reads `base:allocation` through QEMU's NBD client.
#[test]
fn qemu_img_map_sees_holes_as_zero_and_data_as_data() {
    let ex = Export::start();
    let out = run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &ex.uri()],
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map JSON");
    let mut seen = Vec::new();
    for e in v.as_array().expect("a list of extents") {
        let start = e["start"].as_u64().expect("start");
        let len = e["length"].as_u64().expect("length");
        let data = e["data"].as_bool().expect("data");
        let zero = e["zero"].as_bool().expect("zero");
        assert_eq!(zero, !data, "extent {e}: holes read as zero, data does not");
        seen.push((start, len, !data));
    }
    assert_eq!(merge(seen), expected_runs(), "qemu-img map output:\n{out}");
}

/// `qemu-img convert` copies through QEMU's NBD client (structured reads, block status)
/// byte-exact and leaves the holes unallocated.
#[test]
fn qemu_img_convert_round_trips_byte_exact_and_sparse() {
    let ex = Export::start();
    let out = ex.path("convert.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &ex.uri(),
            out.to_str().expect("utf-8 path"),
        ],
    );
    let copy = std::fs::read(&out).expect("read copy");
    assert!(
        copy == ex.data,
        "qemu-img convert's copy differs from the image"
    );
    let alloc = allocated(&out);
    assert!(
        alloc <= data_bytes() + 64 * 1024,
        "the copy has {alloc} bytes allocated for {} bytes of data: holes were copied as data",
        data_bytes()
    );
}
