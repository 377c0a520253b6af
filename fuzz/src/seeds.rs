//! Seed corpora, one directory per target: JSON and wire seeds serialized from the real
//! types (the shapes the crate tests use), block deltas computed by the real encoder, and
//! disk images made by the real tools (qemu-img, mkfs.ext4, mkfs.vfat + mtools, mkntfs +
//! ntfscp, sgdisk, sfdisk; all in `scripts/packages.txt`). Each seed is under 1 MiB,
//! AFL++'s input limit.

use std::path::Path;
use std::process::Command;

use tandem_proto::backup::{BackupHead, BackupUpload, ManifestPart, StagedManifest};
use tandem_proto::manifest::{Manifest, ManifestDelta, MANIFEST_FORMAT};
use tandem_proto::{ChunkId, SigningKey};

use crate::targets::{delta_images, manifest_of, NTFS_DISK};

/// The file planted in every filesystem seed (the scan targets blocklist its SHA-256).
pub const PLANTED: &[u8] = b"planted by tandem-fuzz: a file the blocklist names\n";

/// Writes every target's seeds into `dir/<target>/`.
pub fn write_all(dir: &Path) -> Result<(), String> {
    let tmp = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let w = Writer(dir);
    json_and_wire(&w)?;
    block_delta(&w, tmp.path())?;
    disks(&w, tmp.path())?;
    Ok(())
}

struct Writer<'a>(&'a Path);

impl Writer<'_> {
    fn put(&self, target: &str, name: &str, bytes: &[u8]) -> Result<(), String> {
        let d = self.0.join(target);
        std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        std::fs::write(d.join(name), bytes).map_err(|e| format!("{}/{name}: {e}", d.display()))
    }

    fn json(&self, target: &str, name: &str, v: &impl serde::Serialize) -> Result<(), String> {
        let text = serde_json::to_vec_pretty(v).map_err(|e| format!("{target}/{name}: {e}"))?;
        self.put(target, name, &text)
    }

    fn copy(&self, target: &str, name: &str, from: &Path) -> Result<(), String> {
        let bytes = std::fs::read(from).map_err(|e| format!("{}: {e}", from.display()))?;
        self.put(target, name, &bytes)
    }
}

fn json_and_wire(w: &Writer) -> Result<(), String> {
    let key = SigningKey::generate();
    let id = |i: u8| Some(ChunkId::of(&[i; 64]));
    let m = |v: u64, chunks: Vec<Option<ChunkId>>| Manifest {
        format: MANIFEST_FORMAT,
        name: "gold".into(),
        version: v,
        size: chunks.len() as u64 * 65536 - 512,
        chunk_size: 65536,
        chunks,
    };
    let a = m(1, vec![id(1), None, id(2), id(1)]);
    let b = m(2, vec![id(1), id(3), None, id(1), id(4)]);
    let (sa, sb) = (a.sign(&key), b.sign(&key));
    w.json("manifest", "signed.json", &sa)?;
    w.json("manifest", "bare.json", &b)?;
    w.json("envelope", "manifest.json", &sb)?;
    let lease = key.sign(
        "lease",
        &serde_json::json!({"device": "d1", "not_after": 1}),
    );
    w.json("envelope", "lease.json", &lease)?;
    w.put("envelope", "key.txt", key.public().to_base64().as_bytes())?;
    w.json(
        "manifest_delta",
        "delta.json",
        &ManifestDelta::compute(&a, &b, &sb),
    )?;

    let up = BackupUpload {
        manifest: m(0, vec![id(5), None]),
        taken_at: 1_700_000_000,
        staged: Some(StagedManifest {
            upload: "0123456789abcdef0123456789abcdef".into(),
            parts: 2,
        }),
    };
    w.json("backup_manifest", "upload.json", &up)?;
    let part = ManifestPart {
        chunks: vec![id(6), None, id(7)],
    };
    w.json("backup_manifest", "part.json", &part)?;
    let head = BackupHead {
        seq: 3,
        size: 1 << 30,
        chunk_size: 65536,
        chunks: 16384,
        parts: 1,
    };
    w.json("backup_manifest", "head.json", &head)?;

    api_requests(w)?;

    let mut req = Vec::new();
    req.extend_from_slice(&tandem_nbd::wire::REQUEST_MAGIC.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes()); // flags
    req.extend_from_slice(&0u16.to_be_bytes()); // read
    req.extend_from_slice(&7u64.to_be_bytes()); // handle
    req.extend_from_slice(&4096u64.to_be_bytes()); // offset
    req.extend_from_slice(&512u32.to_be_bytes()); // length
    w.put("nbd_request", "read.bin", &req)?;
    let mut opt = Vec::new();
    opt.extend_from_slice(&4u32.to_be_bytes());
    opt.extend_from_slice(b"gold");
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&15u32.to_be_bytes());
    opt.extend_from_slice(b"base:allocation");
    w.put("nbd_request", "meta.bin", &opt)
}

/// Every verb of the local API, as the CLI sends it (one line), plus the refusals the
/// crate test checks.
fn api_requests(w: &Writer) -> Result<(), String> {
    use tandem_agent::api::{ApiRequest, Request, API_VERSION};
    use tandem_agent::laptop::{BaseChoice, Recovery};
    use tandem_desktop::Desktop;
    let base = BaseChoice {
        image: Some("gold@3".into()),
        base_file: Some("/var/lib/tandem/base.raw".into()),
    };
    let requests = [
        Request::DesktopStart {
            desktop: Desktop::Personal,
            base,
        },
        Request::DesktopStop {
            desktop: Desktop::Corporate,
            timeout_secs: 30,
        },
        Request::DesktopStatus,
        Request::Recovery {
            desktop: Desktop::Personal,
            action: Recovery::Snapshot {
                name: "before-update".into(),
            },
        },
        Request::Recovery {
            desktop: Desktop::Corporate,
            action: Recovery::List,
        },
        Request::Recovery {
            desktop: Desktop::Personal,
            action: Recovery::Rollback { name: "a".into() },
        },
        Request::Recovery {
            desktop: Desktop::Personal,
            action: Recovery::Reset,
        },
        Request::Backup,
        Request::Status,
        Request::CheckIn,
    ];
    for (i, request) in requests.into_iter().enumerate() {
        let mut line = serde_json::to_vec(&ApiRequest {
            version: API_VERSION,
            request,
        })
        .map_err(|e| e.to_string())?;
        line.push(b'\n');
        w.put("api_request", &format!("verb-{i}.json"), &line)?;
    }
    w.put(
        "api_request",
        "other-version.json",
        b"{\"version\": 2, \"request\": {\"verb\": \"status\"}}\n",
    )?;
    w.put(
        "api_request",
        "extra-field.json",
        b"{\"version\": 1, \"request\": {\"verb\": \"status\"}, \"sudo\": true}\n",
    )
}

/// A real delta v1 -> v2 of [`delta_images`] from `tandem_sync::delta::compute`, in both
/// of the target's forms (decompressed, and as sent).
fn block_delta(w: &Writer, tmp: &Path) -> Result<(), String> {
    use tandem_store::ingest::{block_hash, BLOCK_SIZE};
    let (v1, v2) = delta_images();
    let store = tandem_store::Store::open(&tmp.join("store")).map_err(|e| e.to_string())?;
    let (m1, m2) = (manifest_of(&v1, 1), manifest_of(&v2, 2));
    let mut chunks = Vec::new();
    for (bytes, m) in [(&v1, &m1), (&v2, &m2)] {
        for (c, id) in bytes.chunks(m.chunk_size as usize).zip(&m.chunks) {
            if let Some(id) = id {
                chunks.push((*id, tandem_store::Payload::Raw(c.to_vec())));
            }
        }
    }
    store.put_many(chunks).map_err(|e| e.to_string())?;
    let blocks = |b: &[u8]| b.chunks(BLOCK_SIZE).map(block_hash).collect::<Vec<_>>();
    let mut delta = Vec::new();
    tandem_sync::delta::compute(&store, &m1, &blocks(&v1), &m2, &blocks(&v2), &mut delta)
        .map_err(|e| e.to_string())?;
    let raw = zstd::stream::decode_all(&delta[..]).map_err(|e| e.to_string())?;
    w.put("chunk_delta", "raw.bin", &[&[0u8][..], &raw].concat())?;
    w.put("chunk_delta", "zstd.bin", &[&[1u8][..], &delta].concat())
}

fn sh(prog: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|e| format!("{prog}: {e} (install it: scripts/packages.txt)"))?;
    if !out.status.success() {
        return Err(format!(
            "{prog} {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn sized(p: &Path, len: u64) -> Result<(), String> {
    std::fs::File::create(p)
        .and_then(|f| f.set_len(len))
        .map_err(|e| format!("{}: {e}", p.display()))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn disks(w: &Writer, tmp: &Path) -> Result<(), String> {
    let src = tmp.join("src");
    std::fs::create_dir_all(src.join("a/b")).map_err(|e| e.to_string())?;
    let planted = src.join("a/b/planted.txt");
    std::fs::write(&planted, PLANTED).map_err(|e| e.to_string())?;
    std::fs::write(src.join("hello.txt"), b"hello\n").map_err(|e| e.to_string())?;

    // ext4: 1 KiB blocks, few inodes, a directory tree with the planted file.
    let ext4 = tmp.join("ext4.img");
    sized(&ext4, 256 << 10)?;
    sh(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "1024",
            "-N",
            "32",
            "-d",
            s(&src),
            s(&ext4),
        ],
    )?;
    w.copy("scan_ext4", "ext4.img", &ext4)?;
    w.copy("allocation", "ext4.img", &ext4)?;
    w.copy("partitions", "whole-ext4.img", &ext4)?;
    let ext2 = tmp.join("ext2.img");
    sized(&ext2, 128 << 10)?;
    sh(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-t",
            "ext2",
            "-b",
            "1024",
            "-N",
            "16",
            "-d",
            s(&src),
            s(&ext2),
        ],
    )?;
    w.copy("scan_ext4", "ext2.img", &ext2)?;

    // FAT12 with a long file name and a subdirectory.
    let fat = tmp.join("fat.img");
    sized(&fat, 128 << 10)?;
    sh("mkfs.vfat", &[s(&fat)])?;
    sh("mmd", &["-i", s(&fat), "::/a"])?;
    sh(
        "mcopy",
        &["-i", s(&fat), s(&planted), "::/a/planted-long-name.txt"],
    )?;
    sh(
        "mcopy",
        &["-i", s(&fat), s(&src.join("hello.txt")), "::/HELLO.TXT"],
    )?;
    w.copy("scan_fat", "fat12.img", &fat)?;
    w.copy("partitions", "whole-fat.img", &fat)?;

    // NTFS: the smallest volume mkntfs makes, cut after its last metadata sector (the
    // targets pad it back with zeros).
    let ntfs = tmp.join("ntfs.img");
    sized(&ntfs, NTFS_DISK as u64)?;
    sh(
        "mkntfs",
        &["-q", "-F", "-f", "-s", "512", "-c", "512", s(&ntfs)],
    )?;
    sh("ntfscp", &["-f", s(&ntfs), s(&planted), "planted.txt"])?;
    let bytes = std::fs::read(&ntfs).map_err(|e| e.to_string())?;
    let cut = bytes[..bytes.len() - 4096]
        .chunks(512)
        .rposition(|c| c.iter().any(|b| *b != 0))
        .map_or(512, |i| (i + 1) * 512);
    if cut > 1 << 20 {
        return Err(format!(
            "mkntfs wrote metadata up to {cut} bytes, over 1 MiB"
        ));
    }
    w.put("scan_ntfs", "ntfs.img", &bytes[..cut])?;
    w.put("allocation", "ntfs.img", &bytes[..cut])?;

    // Partition tables: GPT with two partitions, MBR with an extended partition.
    let gpt = tmp.join("gpt.img");
    sized(&gpt, 256 << 10)?;
    sh(
        "sgdisk",
        &["-q", "-n", "1:34:200", "-n", "2:201:400", s(&gpt)],
    )?;
    w.copy("partitions", "gpt.img", &gpt)?;
    let mbr = tmp.join("mbr.img");
    sized(&mbr, 256 << 10)?;
    let script = "label: dos\nstart=1, size=100, type=83\nstart=101, size=200, type=5\nstart=102, size=50, type=83\n";
    let mut child = Command::new("sfdisk")
        .args(["-q", s(&mbr)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("sfdisk: {e} (install fdisk)"))?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().ok_or("sfdisk: no stdin")?;
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let st = child.wait().map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!("sfdisk: {st}"));
    }
    w.copy("partitions", "mbr-logical.img", &mbr)?;

    // qcow2: v3, v2 (compat 0.10), zstd-compressed clusters, an empty image.
    let raw = tmp.join("data.raw");
    let mut data = vec![b'x'; 65536];
    data.resize(256 << 10, 0);
    std::fs::write(&raw, &data).map_err(|e| e.to_string())?;
    let q = |name: &str, opts: &[&str]| -> Result<(), String> {
        let out = tmp.join(name);
        let mut args = vec!["convert", "-q", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[s(&raw), s(&out)]);
        sh("qemu-img", &args)?;
        w.copy("qcow2", name, &out)
    };
    q("v3.qcow2", &["-o", "cluster_size=4096"])?;
    q("v2.qcow2", &["-o", "compat=0.10,cluster_size=4096"])?;
    q(
        "zstd.qcow2",
        &["-c", "-o", "compression_type=zstd,cluster_size=4096"],
    )?;
    let empty = tmp.join("empty.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            s(&empty),
            "1M",
        ],
    )?;
    w.copy("qcow2", "empty.qcow2", &empty)
}
