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
//!
//! The image is untrusted input (a qcow2 header names files, a filesystem's metadata
//! drives loops). [`publish_isolated`], what the CLI uses, never parses it in the
//! publishing process: a reader child ([`reader_main`], the binary's hidden
//! `image publish-reader`) opens the image under the caller's [`BackingPolicy`] (backing
//! files only when named, never a FIFO or device, never blocking), checks its size
//! before any work, reads the allocation maps, and streams the guest-visible bytes
//! (unused blocks already zeroed) over a pipe. The reader dies with its parent (parent
//! death signal), runs under memory and CPU-time limits, and is killed when its stream
//! stalls. The stream: an 8-byte little-endian length, a JSON [`ReaderHeader`], then
//! exactly `size` bytes; anything short of that fails the publish before the commit.
//! [`publish`] does the same work in-process, for trusted inputs and tests.

use std::ffi::OsString;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_disk::BackingPolicy;

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
    /// Backing files the image's qcow2 chain may use (only these are ever opened).
    pub backing: Vec<PathBuf>,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            chunk_size: tandem_proto::manifest::DEFAULT_CHUNK_SIZE,
            keep_free_space: false,
            version: None,
            threads: IngestOptions::default().threads,
            backing: Vec::new(),
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

/// Publishes `path` as the next version of `name`, parsing the image in this process
/// (trusted inputs and tests; the CLI uses [`publish_isolated`]).
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
    let prepared = prepare(path, &opts.backing, opts.keep_free_space)?;
    let src = DiskSource {
        disk: prepared.disk,
        unused: prepared.unused,
    };
    commit(
        store,
        catalog,
        key,
        name,
        &src,
        prepared.header,
        opts,
        start,
        progress,
        &mut || Ok(()),
    )
}

/// What the reader says before the bytes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReaderHeader {
    /// Guest-visible size in bytes: exactly this many bytes follow.
    pub size: u64,
    /// Bytes zeroed as unused filesystem space.
    pub free_space_dropped: u64,
    /// Per-volume notes on free-space detection.
    pub volumes: Vec<String>,
}

/// What the publishing process asks its reader (JSON on the reader's stdin).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReaderRequest {
    /// The image.
    pub path: PathBuf,
    /// Backing files it may use.
    pub backing: Vec<PathBuf>,
    /// Keep unused filesystem blocks as they are.
    pub keep_free_space: bool,
    /// The parent's pid (the reader stops when it is no longer its parent).
    pub parent: u32,
    /// Data-segment limit, MiB.
    pub memory_mib: u64,
    /// CPU-time limit, seconds.
    pub cpu_secs: u64,
}

/// Limits of the publish reader.
#[derive(Debug, Clone)]
pub struct ReaderLimits {
    /// Data-segment limit, MiB (qcow2 tables ≤ 64 MiB, bitmaps ≤ 256 MiB, the map).
    pub memory_mib: u64,
    /// CPU-time limit, seconds.
    pub cpu_secs: u64,
    /// The reader is killed when no byte arrives for this long (wall clock).
    pub stall_secs: u64,
}

impl Default for ReaderLimits {
    fn default() -> Self {
        ReaderLimits {
            memory_mib: 2048,
            cpu_secs: 4 * 3600,
            stall_secs: 600,
        }
    }
}

struct Prepared {
    disk: Arc<dyn ReadAt>,
    unused: Option<UnusedMap>,
    header: ReaderHeader,
}

/// Opens the image under the backing policy, checks its size, reads its allocation maps.
fn prepare(path: &Path, backing: &[PathBuf], keep_free_space: bool) -> Result<Prepared, SyncError> {
    let not = |reason: String| SyncError::NotADiskImage {
        path: path.to_path_buf(),
        reason,
    };
    check_disk_image(path)?;
    let policy = BackingPolicy::allow(backing).map_err(|e| not(e.to_string()))?;
    let disk: Arc<dyn ReadAt> =
        Arc::from(tandem_disk::open_image_with(path, &policy).map_err(|e| not(e.to_string()))?);
    let size = disk.size();
    if size > tandem_proto::manifest::MAX_IMAGE_SIZE {
        return Err(not(format!(
            "its virtual size ({size} bytes) exceeds the {} TiB image limit",
            tandem_proto::manifest::MAX_IMAGE_SIZE >> 40
        )));
    }
    let mut notes = Vec::new();
    let unused = if keep_free_space {
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
    Ok(Prepared {
        disk,
        unused,
        header: ReaderHeader {
            size,
            free_space_dropped,
            volumes: notes,
        },
    })
}

/// The reader process's main: read the request on stdin, tie its life to the parent's,
/// limit itself, open and map the image, stream it to stdout. Returns the exit code.
pub fn reader_main() -> u8 {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("publish reader: cannot read request: {e}");
        return 3;
    }
    let req: ReaderRequest = match serde_json::from_slice(&input) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("publish reader: bad request: {e}");
            return 3;
        }
    };
    if let Err(e) = tandem_disk::worker::die_with_parent(req.parent) {
        eprintln!("publish reader: {e}");
        return 3;
    }
    if let Err(e) = tandem_disk::worker::limit_self(req.memory_mib, req.cpu_secs) {
        eprintln!("publish reader: cannot set limits: {e}");
        return 3;
    }
    let p = match prepare(&req.path, &req.backing, req.keep_free_space) {
        Ok(p) => p,
        Err(SyncError::NotADiskImage { reason, .. }) => {
            eprintln!("{reason}");
            return 3;
        }
        Err(e) => {
            eprintln!("{e}");
            return 3;
        }
    };
    let header = serde_json::to_vec(&p.header).expect("plain data serializes");
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    let sent = (|| -> std::io::Result<()> {
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        let size = p.header.size;
        let mut buf = vec![0u8; 4 << 20];
        let mut off = 0u64;
        while off < size {
            let n = (buf.len() as u64).min(size - off) as usize;
            p.disk.read_at(&mut buf[..n], off)?;
            if let Some(m) = &p.unused {
                m.zero_unused(&mut buf[..n], off);
            }
            out.write_all(&buf[..n])?;
            off += n as u64;
        }
        out.flush()
    })();
    match sent {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("publish reader: cannot read {}: {e}", req.path.display());
            3
        }
    }
}

/// The bytes of a reader's stream, read strictly in order (as ingest reads).
struct StreamSource {
    size: u64,
    pipe: Mutex<(std::process::ChildStdout, u64)>,
    received: Arc<AtomicU64>,
}

impl Source for StreamSource {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let mut g = self
            .pipe
            .lock()
            .map_err(|_| std::io::Error::other("publish reader stream lock poisoned"))?;
        if offset != g.1 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("stream read at {offset}, but the stream is at {}", g.1),
            ));
        }
        g.0.read_exact(buf).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("the publish reader stopped at byte {offset}: {e}"),
            )
        })?;
        g.1 += buf.len() as u64;
        self.received.store(g.1, Ordering::Relaxed);
        Ok(())
    }
}

/// Publishes `path` as the next version of `name`, the image read by a reader child
/// process started as `reader_cmd` (see the module doc).
#[allow(clippy::too_many_arguments)]
pub fn publish_isolated(
    store: &Store,
    catalog: &Catalog,
    key: &SigningKey,
    name: &str,
    path: &Path,
    opts: &PublishOptions,
    reader_cmd: &[OsString],
    limits: &ReaderLimits,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<(Manifest, Signed, PublishReport), SyncError> {
    use std::process::{Command, Stdio};
    let start = Instant::now();
    validate_name(name)?;
    let io = |source: std::io::Error| SyncError::Io {
        path: path.to_path_buf(),
        source,
    };
    let exe = reader_cmd.first().cloned().unwrap_or_default();
    let req = ReaderRequest {
        path: path.to_path_buf(),
        backing: opts.backing.clone(),
        keep_free_space: opts.keep_free_space,
        parent: std::process::id(),
        memory_mib: limits.memory_mib,
        cpu_secs: limits.cpu_secs,
    };
    let mut child = Command::new(&exe)
        .args(&reader_cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            io(std::io::Error::new(
                e.kind(),
                format!("cannot start the publish reader {exe:?}: {e}"),
            ))
        })?;
    let input = serde_json::to_vec(&req).expect("plain data serializes");
    let mut stdin = child.stdin.take().expect("stdin was piped");
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let mut stderr = child.stderr.take().expect("stderr was piped");
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = (&mut stderr).take(64 << 10).read_to_end(&mut b);
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        b
    });
    let mut stdout = child.stdout.take().expect("stdout was piped");
    let reader = ReaderChild {
        child: Arc::new(Mutex::new(child)),
        err: Mutex::new(Some(err_reader)),
        stalled: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        done: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    // Watchdog: a reader whose stream does not move for `stall_secs` is killed.
    let received = Arc::new(AtomicU64::new(0));
    let watchdog = {
        let (child, received, done, stalled) = (
            reader.child.clone(),
            received.clone(),
            reader.done.clone(),
            reader.stalled.clone(),
        );
        let stall = Duration::from_secs(limits.stall_secs);
        std::thread::spawn(move || {
            let (mut last, mut since) = (u64::MAX, Instant::now());
            while !done.load(Ordering::Relaxed) {
                let now = received.load(Ordering::Relaxed);
                if now != last {
                    (last, since) = (now, Instant::now());
                } else if since.elapsed() >= stall {
                    stalled.store(true, Ordering::Relaxed);
                    if let Ok(mut c) = child.lock() {
                        let _ = c.kill();
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let header = (|| -> std::io::Result<ReaderHeader> {
        let mut len = [0u8; 8];
        stdout.read_exact(&mut len)?;
        let len = u64::from_le_bytes(len);
        if len > 16 << 20 {
            return Err(std::io::Error::other("header too long"));
        }
        let mut h = vec![0u8; len as usize];
        stdout.read_exact(&mut h)?;
        serde_json::from_slice(&h).map_err(std::io::Error::other)
    })();
    let _ = writer.join();
    let result = match header {
        Err(e) => Err(reader
            .finish(path, limits, false)
            .err()
            .unwrap_or_else(|| io(std::io::Error::other(format!("bad reader header: {e}"))))),
        Ok(header) => {
            let src = StreamSource {
                size: header.size,
                pipe: Mutex::new((stdout, 0)),
                received: received.clone(),
            };
            let mut check = || reader.finish(path, limits, true);
            let r = commit(
                store, catalog, key, name, &src, header, opts, start, progress, &mut check,
            );
            match r {
                // The stream ended early: the reader is exiting; its own words say why.
                Err(SyncError::Store(tandem_store::StoreError::Read { .. })) => {
                    Err(reader.finish(path, limits, false).err().unwrap_or_else(|| {
                        io(std::io::Error::other(
                            "the publish reader's stream ended early",
                        ))
                    }))
                }
                Err(e) => {
                    // The reader may be blocked writing to a pipe nobody reads any more.
                    if let Ok(mut c) = reader.child.lock() {
                        let _ = c.kill();
                    }
                    let _ = reader.finish(path, limits, false);
                    Err(e)
                }
                ok => ok,
            }
        }
    };
    reader.done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    result
}

/// The running reader process, its stderr and the watchdog's flags.
struct ReaderChild {
    child: Arc<Mutex<std::process::Child>>,
    err: Mutex<Option<std::thread::JoinHandle<Vec<u8>>>>,
    stalled: Arc<std::sync::atomic::AtomicBool>,
    done: Arc<std::sync::atomic::AtomicBool>,
}

impl ReaderChild {
    /// Waits for the reader (the watchdog still armed) and says how it ended.
    fn finish(&self, path: &Path, limits: &ReaderLimits, ok_so_far: bool) -> Result<(), SyncError> {
        let io = |source: std::io::Error| SyncError::Io {
            path: path.to_path_buf(),
            source,
        };
        let status = loop {
            let polled = self
                .child
                .lock()
                .map_err(|_| io(std::io::Error::other("publish reader lock poisoned")))?
                .try_wait()
                .map_err(io)?;
            match polled {
                Some(s) => break s,
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        self.done.store(true, Ordering::Relaxed);
        let err = self
            .err
            .lock()
            .ok()
            .and_then(|mut h| h.take())
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let err = String::from_utf8_lossy(&err).trim().to_string();
        if self.stalled.load(Ordering::Relaxed) {
            return Err(io(std::io::Error::other(format!(
                "the publish reader made no progress for {} s and was killed; nothing was published",
                limits.stall_secs
            ))));
        }
        if status.success() && ok_so_far {
            return Ok(());
        }
        use std::os::unix::process::ExitStatusExt as _;
        let reason = if !err.is_empty() {
            err
        } else if let Some(sig) = status.signal() {
            format!("the publish reader was killed by signal {sig} (memory or CPU limit?)")
        } else {
            format!("the publish reader exited with {status}")
        };
        Err(SyncError::NotADiskImage {
            path: path.to_path_buf(),
            reason,
        })
    }
}

/// Stores the chunks, checks `finish` (the reader ended well), then commits the version.
#[allow(clippy::too_many_arguments)]
fn commit(
    store: &Store,
    catalog: &Catalog,
    key: &SigningKey,
    name: &str,
    src: &dyn Source,
    header: ReaderHeader,
    opts: &PublishOptions,
    start: Instant,
    progress: &(dyn Fn(u64, u64) + Sync),
    finish: &mut dyn FnMut() -> Result<(), SyncError>,
) -> Result<(Manifest, Signed, PublishReport), SyncError> {
    let total = header.size;
    let free_space_dropped = header.free_space_dropped;
    let notes = header.volumes;
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
    let r = ingest(store, src, &iopts, &|done| progress(done, total))?;
    finish()?;
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
