//! A served export over a temp store, and what the tests know about its layout.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tandem_proto::manifest::{Manifest, MANIFEST_FORMAT};
use tandem_store::ingest::FileSource;
use tandem_store::{ingest, ImageReader, IngestOptions, Store};

/// Chunk size of the test image.
pub const CHUNK: u64 = 64 << 10;

/// Which 64 KiB chunks of the test image are holes (all zeros); the last chunk is a
/// partial data chunk of 12 KiB.
pub const LAYOUT: &[bool] = &[
    false, true, true, true, false, false, true, true, true, true, true, false, true, false, false,
    false, true, true, true, true, true, true, true, true, false, false,
];
const TAIL: u64 = 12 << 10;

/// Size of the test image in bytes.
pub fn image_size() -> u64 {
    (LAYOUT.len() as u64 - 1) * CHUNK + TAIL
}

/// The test image: pseudo-random data in data chunks (one of them half zeros, which is
/// still data), zeros in holes.
pub fn image_bytes() -> Vec<u8> {
    let mut data = vec![0u8; image_size() as usize];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for (i, hole) in LAYOUT.iter().enumerate() {
        if *hole {
            continue;
        }
        let start = i * CHUNK as usize;
        let end = (start + CHUNK as usize).min(data.len());
        let end = if i == 4 {
            start + CHUNK as usize / 2
        } else {
            end
        };
        for b in &mut data[start..end] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8 | 1;
        }
    }
    data
}

/// The layout as maximal `(offset, length, hole)` runs.
pub fn expected_runs() -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let size = image_size();
    for (i, hole) in LAYOUT.iter().enumerate() {
        let off = i as u64 * CHUNK;
        let len = CHUNK.min(size - off);
        match out.last_mut() {
            Some(r) if r.2 == *hole => r.1 += len,
            _ => out.push((off, len, *hole)),
        }
    }
    out
}

/// Merges neighbouring runs of the same kind (clients may split what the server sends
/// at their own request boundaries).
pub fn merge(runs: impl IntoIterator<Item = (u64, u64, bool)>) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for r in runs {
        match out.last_mut() {
            Some(l) if l.2 == r.2 && l.0 + l.1 == r.0 => l.1 += r.1,
            _ => out.push(r),
        }
    }
    out
}

/// The export name the fixture serves.
pub const EXPORT: &str = "test@1";

/// The test image served by `tandem_nbd::serve` on a unix socket in a temp dir; stops
/// the server and removes everything on drop.
pub struct Export {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub data: Vec<u8>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Export {
    pub fn start() -> Export {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = image_bytes();
        let img = dir.path().join("image.raw");
        std::fs::write(&img, &data).expect("write image");
        let store = Arc::new(Store::open(&dir.path().join("store")).expect("store"));
        let src = FileSource::open(&img).expect("open image");
        let opts = IngestOptions {
            chunk_size: CHUNK as u32,
            ..IngestOptions::default()
        };
        let r = ingest(&store, &src, &opts, &|_| {}).expect("ingest");
        let holes: Vec<bool> = r.chunks.iter().map(Option::is_none).collect();
        assert_eq!(holes, LAYOUT, "the store must see the planned holes");
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            name: "test".into(),
            version: 1,
            size: r.size,
            chunk_size: CHUNK as u32,
            chunks: r.chunks,
        };
        let reader = Arc::new(ImageReader::open(store, manifest).expect("reader"));
        let socket = dir.path().join("nbd.sock");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sock = socket.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tandem_nbd::bind(&sock).expect("bind");
                ready_tx.send(()).expect("test waiting");
                tandem_nbd::serve(listener, reader, EXPORT.into(), async {
                    let _ = stopped.await;
                })
                .await;
            });
        });
        ready_rx.recv().expect("server started");
        Export {
            dir,
            socket,
            data,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `nbd+unix` URI of the default export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs a client tool and returns its stdout; fails the test with its stderr otherwise.
/// A missing tool is a failure that says which package to install.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {program} ({e}): install the packages in scripts/packages.txt \
             (libnbd-bin for nbdinfo/nbdcopy, qemu-utils for qemu-img)"
            )
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Bytes of `path` that are allocated on disk.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// Bytes of the test image that are data.
pub fn data_bytes() -> u64 {
    expected_runs().iter().filter(|r| !r.2).map(|r| r.1).sum()
}
