//! The target bodies. Each returns normally on any input; a panic, an abort or a failed
//! `assert!` is a finding.

use std::sync::OnceLock;

use tandem_disk::FsKind;
use tandem_proto::manifest::{Manifest, ManifestDelta, MANIFEST_FORMAT};
use tandem_proto::ChunkId;

use crate::{disk, padded_disk, read_some, trusted};

/// Manifest decoder: a signed envelope as JSON, verified, and a bare manifest validated.
pub fn manifest(data: &[u8]) {
    let _ = Manifest::verify_json(data, &trusted());
    if let Ok(m) = serde_json::from_slice::<Manifest>(data) {
        if m.validate().is_ok() {
            let _ = m.chunk_set();
        }
    }
}

/// Manifest delta decoder (`manifest?against=`): decoded and applied against a small base.
pub fn manifest_delta(data: &[u8]) {
    static BASE: OnceLock<Manifest> = OnceLock::new();
    let base = BASE.get_or_init(|| Manifest {
        format: MANIFEST_FORMAT,
        name: "gold".into(),
        version: 1,
        size: 4 * 65536,
        chunk_size: 65536,
        chunks: vec![None; 4],
    });
    if let Ok(d) = serde_json::from_slice::<ManifestDelta>(data) {
        let _ = d.apply(base, &trusted());
    }
}

/// Chunk size of the block-delta fixture.
pub const DELTA_CHUNK: u32 = 16384;

/// The two image versions the block-delta target and its seeds use: v2 has a new block,
/// moved blocks, a zeroed block and a short grown tail.
pub fn delta_images() -> (Vec<u8>, Vec<u8>) {
    let mut v1 = vec![0u8; 20 * 4096 + 1000];
    for (i, b) in v1.iter_mut().enumerate().skip(8192) {
        *b = ((i * 7919) % 253) as u8;
    }
    let mut v2 = v1.clone();
    v2[4096..8192].fill(9);
    let moved = v1[10 * 4096..12 * 4096].to_vec();
    v2[16 * 4096..18 * 4096].copy_from_slice(&moved);
    v2[13 * 4096..14 * 4096].fill(0);
    v2.extend_from_slice(&[5u8; 3000]);
    (v1, v2)
}

/// The manifest of `bytes` as version `version` (all-zero chunks are holes).
pub fn manifest_of(bytes: &[u8], version: u64) -> Manifest {
    let chunks = bytes
        .chunks(DELTA_CHUNK as usize)
        .map(|c| c.iter().any(|b| *b != 0).then(|| ChunkId::of(c)))
        .collect();
    Manifest {
        format: MANIFEST_FORMAT,
        name: "gold".into(),
        version,
        size: bytes.len() as u64,
        chunk_size: DELTA_CHUNK,
        chunks,
    }
}

/// Block-delta decoder (`delta?from=`, [`tandem_sync::delta::apply_from`]) against v1 of
/// [`delta_images`], building v2. First byte even: the rest is the decompressed stream
/// (compressed here, so mutations hit the format); odd: the rest is the zstd stream as
/// sent. Every chunk handed to the sink must hash to v2's manifest entry.
pub fn chunk_delta(data: &[u8]) {
    let _ = apply_chunk_delta(data);
}

/// The body of [`chunk_delta`], with what it built (the replay test checks the seeds
/// build every chunk they describe).
pub fn apply_chunk_delta(
    data: &[u8],
) -> Option<Result<tandem_sync::delta::ApplyStats, tandem_sync::SyncError>> {
    static FIXTURE: OnceLock<(tandem_disk::MemDisk, Manifest)> = OnceLock::new();
    let (old, new) = FIXTURE.get_or_init(|| {
        let (v1, v2) = delta_images();
        (tandem_disk::MemDisk(v1), manifest_of(&v2, 2))
    });
    let (mode, rest) = data.split_first()?;
    let compressed;
    let mut input: &[u8] = if mode % 2 == 0 {
        compressed = zstd::bulk::compress(rest, 1).expect("zstd compresses any bytes");
        &compressed
    } else {
        rest
    };
    let mut sink = |id: ChunkId, bytes: Vec<u8>| {
        assert_eq!(
            ChunkId::of(&bytes),
            id,
            "sink got a chunk that is not its id"
        );
        assert!(
            new.chunks.contains(&Some(id)),
            "sink got a chunk v2 does not name"
        );
        Ok(())
    };
    Some(tandem_sync::delta::apply_from(
        &mut input, 1, old, new, &mut sink,
    ))
}

/// Signed-envelope verification: any kind, any payload, against a pinned key.
pub fn envelope(data: &[u8]) {
    if let Ok(s) = serde_json::from_slice::<tandem_proto::Signed>(data) {
        let keys = trusted();
        let _ = s.verify::<serde_json::Value>(&s.kind.clone(), &keys);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tandem_proto::PublicKey::from_base64(text);
    }
}

/// Backup manifest: the upload body a device sends, its staged parts and the head.
pub fn backup_manifest(data: &[u8]) {
    use tandem_proto::backup::{BackupHead, BackupUpload, ManifestPart};
    if let Ok(u) = serde_json::from_slice::<BackupUpload>(data) {
        let _ = u.manifest.validate();
        if let Some(s) = &u.staged {
            let _ = tandem_proto::backup::valid_upload_id(&s.upload);
        }
    }
    let _ = serde_json::from_slice::<ManifestPart>(data);
    let _ = serde_json::from_slice::<BackupHead>(data);
}

/// The agent's local API request decoder (`tandem_agent::api::parse`, one line from the
/// unix socket). A request it accepts must survive a round trip through the client's
/// encoding; a refusal must serialize as an answer.
pub fn api_request(data: &[u8]) {
    use tandem_agent::api::{parse, ApiRequest, API_VERSION, MAX_REQUEST};
    match parse(data) {
        Ok(request) => {
            let line = serde_json::to_vec(&ApiRequest {
                version: API_VERSION,
                request: request.clone(),
            })
            .expect("a request serializes");
            if line.len() as u64 <= MAX_REQUEST {
                assert_eq!(parse(&line).ok(), Some(request), "round trip changed it");
            }
        }
        Err(answer) => {
            serde_json::to_vec(&answer).expect("an error answer serializes");
        }
    }
}

/// NBD transmission request header and option payload parsers.
pub fn nbd_request(data: &[u8]) {
    let _ = tandem_nbd::wire::parse_request(data);
    let _ = tandem_nbd::wire::parse_meta_context_option(data);
    let _ = tandem_nbd::wire::parse_info_option(data);
}

/// qcow2 reader over in-memory bytes (a backing file is refused there), then read.
pub fn qcow2(data: &[u8]) {
    let view = disk(data);
    if let Ok(q) = tandem_disk::open_view(view, "fuzz.qcow2".as_ref()) {
        read_some(&*q, 4 << 20);
    }
}

/// MBR/GPT: the volume list, each volume's filesystem signature.
pub fn partitions(data: &[u8]) {
    let view = disk(data);
    if let Ok(vols) = tandem_disk::volumes(&*view) {
        for v in vols {
            if let Ok(s) = v.view(view.clone()) {
                let _ = tandem_disk::detect_fs(&s);
            }
        }
    }
}

/// ext2/3/4 block bitmaps and NTFS `$Bitmap` (what publish reads to drop free space).
pub fn allocation(data: &[u8]) {
    let _ = tandem_disk::unused_ranges(padded_disk(data, NTFS_DISK));
}

/// Smallest disk the scan targets present: an NTFS volume made by `mkntfs` needs
/// 1100 KiB; its seed keeps only the first 830 KiB, where all its metadata is.
pub const NTFS_DISK: usize = 1100 << 10;

/// SHA-256 of the file the seed images hold (`seeds::PLANTED`), blocklisted so a walker
/// that reaches it reports an infection.
fn engine() -> &'static tandem_scan::Engine {
    static ENGINE: OnceLock<tandem_scan::Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        use sha2::Digest as _;
        tandem_scan::RuleSet {
            origin: "fuzz blocklist".into(),
            rules: Vec::new(),
            blocklist: vec![tandem_scan::engine::BlockEntry {
                sha256: hex::encode(sha2::Sha256::digest(crate::seeds::PLANTED)),
                name: "planted".into(),
            }],
        }
        .compile()
        .expect("a blocklist-only engine compiles")
    })
}

/// The scanner's entry point ([`tandem_scan::scan_disk`], blocklist only) on a whole-disk
/// filesystem of kind `kind` (other inputs are left to the other targets). Every report
/// must be honest (a volume is clean only when every file listed in it is) and bounded:
/// each file listed needs a directory entry of its own, at least 8 bytes of the volume,
/// unless the walker went through a directory twice (a loop, which can make the walk
/// exponential). A 2 s volume budget ends such walks before AFL++'s 5 s hang limit.
fn scan(data: &[u8], kind: FsKind) {
    let _ = scan_report(data, kind);
}

/// The body of the `scan_*` targets, with the report (`None`: not that filesystem, or no
/// readable layout). The replay test checks that each seed's planted file is found.
pub fn scan_report(data: &[u8], kind: FsKind) -> Option<tandem_scan::Report> {
    let view = padded_disk(data, NTFS_DISK);
    if !tandem_disk::detect_fs(&*view).is_ok_and(|k| k == kind) {
        return None;
    }
    let entries = view.size() / 8;
    let cfg = tandem_scan::ScanConfig {
        max_file_size: 1 << 20,
        file_timeout_secs: 1,
        volume_timeout_secs: 2,
        list_clean: true,
        incremental: true,
        ..tandem_scan::ScanConfig::default()
    };
    let report = tandem_scan::scan_disk(view, "fuzz", engine(), &cfg).ok()?;
    for v in &report.volumes {
        assert!(
            v.counts.files <= entries,
            "{} files listed in a {}-byte volume: a directory was walked twice",
            v.counts.files,
            v.len
        );
        if matches!(v.verdict, tandem_scan::Verdict::Clean) {
            assert!(
                v.files
                    .iter()
                    .all(|f| matches!(f.verdict, tandem_scan::Verdict::Clean)),
                "a clean volume lists a file that is not clean"
            );
        }
    }
    Some(report)
}

/// The ext2/3/4 walker through `scan_disk`.
pub fn scan_ext4(data: &[u8]) {
    scan(data, FsKind::Ext);
}

/// The FAT walker through `scan_disk`.
pub fn scan_fat(data: &[u8]) {
    scan(data, FsKind::Fat);
}

/// The NTFS walker (with alternate data streams) through `scan_disk`.
pub fn scan_ntfs(data: &[u8]) {
    scan(data, FsKind::Ntfs);
}
