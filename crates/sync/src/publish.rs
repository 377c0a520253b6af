//! Publish: turn a raw or qcow2 disk image into a signed image version on the server.
//!
//! Order of effects (each step crash-safe): new chunks go into the store (packs, then
//! index), the 4 KiB block table is written, and the signed manifest is renamed into the
//! catalog last; that rename is the commit. A publish holds the image's lock file so two
//! publishes never take the same version number, and the store's shared ingest lock so GC
//! cannot collect its chunks before the manifest lands. A server running on the same data
//! directory sees the version the moment its manifest exists.
//!
//! Free space never travels: unless told to keep it, blocks that an ext2/3/4 or NTFS
//! filesystem (also inside MBR/GPT partitions) marks unused are read as zeros
//! (`tandem_disk::unused_ranges`), so deleted data is never stored or shipped.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tandem_disk::{ReadAt, UnusedMap};
use tandem_proto::manifest::{validate_name, Manifest, MANIFEST_FORMAT};
use tandem_proto::{Signed, SigningKey};
use tandem_store::ingest::{ingest, IngestOptions, Source};
use tandem_store::Store;

use crate::catalog::Catalog;
use crate::SyncError;

/// How to publish.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Chunk size of the new version.
    pub chunk_size: u32,
    /// Store unused filesystem blocks as they are instead of as zeros.
    pub keep_free_space: bool,
    /// Version number to use (default: one more than the highest).
    pub version: Option<u64>,
    /// Worker threads.
    pub threads: usize,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            chunk_size: tandem_proto::manifest::DEFAULT_CHUNK_SIZE,
            keep_free_space: false,
            version: None,
            threads: IngestOptions::default().threads,
        }
    }
}

/// What a publish did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PublishReport {
    /// Image name.
    pub name: String,
    /// New version.
    pub version: u64,
    /// Virtual size in bytes.
    pub size: u64,
    /// Chunk size.
    pub chunk_size: u32,
    /// Chunks in the manifest.
    pub chunks: u64,
    /// All-zero chunks (holes).
    pub zero_chunks: u64,
    /// Chunks already stored (earlier versions, or repeated within the image).
    pub dedup_chunks: u64,
    /// Chunks stored by this publish.
    pub new_chunks: u64,
    /// Plaintext bytes of the new chunks.
    pub new_bytes: u64,
    /// Bytes written to packs for them.
    pub stored_bytes: u64,
    /// Non-hole bytes of the image divided by the new plaintext bytes.
    pub dedup_ratio: f64,
    /// New plaintext bytes divided by stored bytes.
    pub compression_ratio: f64,
    /// Bytes filesystems marked unused, stored as zeros.
    pub free_space_dropped: u64,
    /// Per-volume notes on free-space detection.
    pub volumes: Vec<String>,
    /// Wall time.
    pub seconds: f64,
    /// Image bytes per second.
    pub throughput_mb_s: f64,
}

struct DiskSource {
    disk: Arc<dyn ReadAt>,
    unused: Option<UnusedMap>,
}

impl Source for DiskSource {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.disk.read_at(buf, offset)
    }
    fn zero_unused(&self, buf: &mut [u8], offset: u64) -> u64 {
        if let Some(m) = &self.unused {
            m.zero_unused(buf, offset);
        }
        0
    }
}

/// Refuses files that are obviously not disk images, naming what they are instead.
pub fn check_disk_image(path: &Path) -> Result<(), SyncError> {
    let not = |reason: String| SyncError::NotADiskImage {
        path: path.to_path_buf(),
        reason,
    };
    let io = |source| SyncError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(not("it is not a regular file".into()));
    }
    let mut head = vec![0u8; 4096.min(meta.len() as usize)];
    {
        use std::io::Read as _;
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut head))
            .map_err(io)?;
    }
    let magics: &[(&[u8], &str)] = &[
        (b"\x1f\x8b", "a gzip file; decompress it first"),
        (b"\x28\xb5\x2f\xfd", "a zstd file; decompress it first"),
        (b"\xfd7zXZ\x00", "an xz file; decompress it first"),
        (b"BZh", "a bzip2 file; decompress it first"),
        (b"PK\x03\x04", "a zip archive"),
        (b"\x7fELF", "an ELF executable"),
        (
            b"KDMV",
            "a VMDK image; convert it with `qemu-img convert -O raw`",
        ),
        (
            b"conectix",
            "a VHD image; convert it with `qemu-img convert -O raw`",
        ),
        (
            b"vhdxfile",
            "a VHDX image; convert it with `qemu-img convert -O raw`",
        ),
    ];
    if head.starts_with(b"QFI\xfb") {
        return Ok(());
    }
    for (m, what) in magics {
        if head.starts_with(m) {
            return Err(not(format!("it is {what}")));
        }
    }
    if meta.len() == 0 {
        return Err(not("it is empty".into()));
    }
    if meta.len() % 512 != 0 {
        return Err(not(format!(
            "its size ({} bytes) is not a multiple of 512; raw disk images are whole sectors",
            meta.len()
        )));
    }
    let printable = head
        .iter()
        .all(|&b| b == b'\n' || b == b'\r' || b == b'\t' || (0x20..0x7f).contains(&b));
    if printable {
        return Err(not(
            "it starts with plain text, not a boot sector or filesystem".into(),
        ));
    }
    Ok(())
}

/// Publishes `path` as the next version of `name`.
pub fn publish(
    store: &Store,
    catalog: &Catalog,
    key: &SigningKey,
    name: &str,
    path: &Path,
    opts: &PublishOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<(Manifest, Signed, PublishReport), SyncError> {
    let start = Instant::now();
    validate_name(name)?;
    check_disk_image(path)?;
    let disk: Arc<dyn ReadAt> =
        Arc::from(
            tandem_disk::open_image(path).map_err(|e| SyncError::NotADiskImage {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?,
        );
    let total = disk.size();
    let mut notes = Vec::new();
    let unused = if opts.keep_free_space {
        None
    } else {
        match tandem_disk::unused_ranges(disk.clone()) {
            Ok(map) => {
                for v in &map.volumes {
                    notes.push(format!(
                        "volume at {} ({:?}): {} bytes unused{}",
                        v.volume.start,
                        v.fs,
                        v.unused_bytes,
                        v.note
                            .as_ref()
                            .map(|n| format!(" ({n})"))
                            .unwrap_or_default()
                    ));
                }
                Some(map)
            }
            Err(e) => {
                notes.push(format!("free space kept: {e}"));
                None
            }
        }
    };
    let free_space_dropped = unused.as_ref().map(|m| m.unused_bytes()).unwrap_or(0);
    let src = DiskSource { disk, unused };

    let _lock = catalog.lock_image(name)?;
    let mut existing = catalog.versions(name)?;
    existing.extend(catalog.deleted_versions(name)?);
    existing.sort_unstable();
    let version = match opts.version {
        Some(v) if existing.contains(&v) => {
            return Err(SyncError::VersionExists {
                name: name.to_string(),
                version: v,
            })
        }
        Some(0) => {
            return Err(SyncError::VersionExists {
                name: name.to_string(),
                version: 0,
            })
        }
        Some(v) => v,
        None => existing.last().copied().unwrap_or(0) + 1,
    };
    let iopts = IngestOptions {
        chunk_size: opts.chunk_size,
        block_hashes: true,
        threads: opts.threads,
    };
    let r = ingest(store, &src, &iopts, &|done| progress(done, total))?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: name.to_string(),
        version,
        size: r.size,
        chunk_size: opts.chunk_size,
        chunks: r.chunks,
    };
    manifest.validate()?;
    let signed = manifest.sign(key);
    catalog.save_blocks(name, version, &r.block_hashes)?;
    catalog.save(&manifest, &signed)?;
    let seconds = start.elapsed().as_secs_f64();
    let nonzero = (manifest.chunks.len() as u64 - r.zero_chunks) * u64::from(opts.chunk_size);
    let report = PublishReport {
        name: name.to_string(),
        version,
        size: r.size,
        chunk_size: opts.chunk_size,
        chunks: manifest.chunks.len() as u64,
        zero_chunks: r.zero_chunks,
        dedup_chunks: r.dedup_chunks,
        new_chunks: r.new_chunks,
        new_bytes: r.new_raw_bytes,
        stored_bytes: r.new_stored_bytes,
        dedup_ratio: nonzero as f64 / r.new_raw_bytes.max(1) as f64,
        compression_ratio: r.new_raw_bytes as f64 / r.new_stored_bytes.max(1) as f64,
        free_space_dropped,
        volumes: notes,
        seconds,
        throughput_mb_s: r.size as f64 / 1e6 / seconds.max(1e-9),
    };
    tracing::info!(
        image = name,
        version,
        new_chunks = r.new_chunks,
        "published"
    );
    Ok((manifest, signed, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_that_are_not_disk_images_are_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("text", b"hello world\n".repeat(1024)),
            ("gz", [&b"\x1f\x8b\x08"[..], &[0u8; 1021]].concat()),
            ("odd", vec![1u8; 1000]),
            ("empty", vec![]),
        ];
        for (n, data) in cases {
            let p = d.path().join(n);
            std::fs::write(&p, &data).expect("write");
            let err = check_disk_image(&p).expect_err("refused");
            assert!(err.to_string().contains("not a disk image"), "{n}: {err}");
        }
        let p = d.path().join("ok.raw");
        std::fs::write(&p, vec![0u8; 8192]).expect("write");
        check_disk_image(&p).expect("a blank disk is a disk");
    }

    #[test]
    fn publish_assigns_versions_and_dedups_against_earlier_ones() {
        let d = tempfile::tempdir().expect("tempdir");
        let img = d.path().join("disk.raw");
        let mut data = vec![0u8; 1 << 20];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 4096 % 200) as u8 + 1;
        }
        std::fs::write(&img, &data).expect("write");
        let store = Store::open(&d.path().join("store")).expect("store");
        let cat = Catalog::new(&d.path().join("images"));
        let key = SigningKey::generate();
        let (m1, _, r1) = publish(
            &store,
            &cat,
            &key,
            "gold",
            &img,
            &PublishOptions::default(),
            &|_, _| {},
        )
        .expect("publish");
        assert_eq!(m1.version, 1);
        assert!(r1.new_chunks > 0);
        let (m2, _, r2) = publish(
            &store,
            &cat,
            &key,
            "gold",
            &img,
            &PublishOptions::default(),
            &|_, _| {},
        )
        .expect("publish");
        assert_eq!(m2.version, 2);
        assert_eq!(r2.new_chunks, 0);
        assert_eq!(cat.load_blocks("gold", 2).expect("blocks").len(), 256);
        let again = PublishOptions {
            version: Some(2),
            ..PublishOptions::default()
        };
        assert!(matches!(
            publish(&store, &cat, &key, "gold", &img, &again, &|_, _| {}),
            Err(SyncError::VersionExists { .. })
        ));
    }
}
