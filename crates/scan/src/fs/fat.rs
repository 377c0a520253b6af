//! FAT12/16/32 through `fatfs`, behind [`ReadOnly`], which refuses every write: `fatfs`
//! wants a writable device and may flush on drop, and a scanner must never change a disk.
//!
//! Each directory is walked once, known by where its first entry lies on the volume
//! (`fatfs` hides the cluster numbers, so [`ReadOnly`] reports where the first read of a
//! directory lands): a subdirectory entry pointing back at a directory already walked,
//! a loop a hostile volume can make, is not followed again. Without that, two such
//! entries made the walk exponential up to `MAX_DEPTH` (found by `fuzz/`'s `scan_fat`).

use std::cell::Cell;
use std::collections::HashSet;
use std::io::{self, Read as _, Seek as _};
use std::rc::Rc;

use tandem_disk::{ReadAtCursor, Slice};

use crate::fs::{MAX_DEPTH, MAX_ENTRIES};
use crate::model::{Reason, Verdict};
use crate::volume::Ctx;

/// `Read + Seek` over a volume, with `Write` that always fails; tells its [`FirstRead`]
/// where reads start.
pub struct ReadOnly(pub ReadAtCursor<Slice>, Rc<FirstRead>);

/// Where the first read after [`FirstRead::arm`] started on the volume.
#[derive(Default)]
pub(crate) struct FirstRead {
    armed: Cell<bool>,
    at: Cell<Option<u64>>,
}

impl FirstRead {
    fn arm(&self) {
        self.at.set(None);
        self.armed.set(true);
    }

    fn take(&self) -> Option<u64> {
        self.armed.set(false);
        self.at.take()
    }
}

impl io::Read for ReadOnly {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.1.armed.get() && self.1.at.get().is_none() {
            self.1.at.set(Some(self.0.stream_position()?));
        }
        self.0.read(buf)
    }
}

impl io::Seek for ReadOnly {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        self.0.seek(pos)
    }
}

impl io::Write for ReadOnly {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        tracing::warn!("fatfs tried to write to a scanned volume; refused");
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the scanner never writes to a guest disk",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn read_err(e: io::Error) -> (Reason, String) {
    let r = if e.kind() == io::ErrorKind::UnexpectedEof {
        Reason::ReadError
    } else {
        Reason::ParseError
    };
    (r, e.to_string())
}

pub(crate) fn walk(view: Slice, ctx: &mut Ctx) -> Result<(), Verdict> {
    let opts = fatfs::FsOptions::new().update_accessed_date(false);
    let first_read = Rc::new(FirstRead::default());
    let dev = ReadOnly(ReadAtCursor::new(view), first_read.clone());
    let fs = fatfs::FileSystem::new(dev, opts)
        .map_err(|e| Verdict::not_scanned(Reason::ParseError, format!("FAT: {e}")))?;
    ctx.set_fs_id(format!("{:08x}", fs.volume_id()));
    let mut stack = vec![(fs.root_dir(), String::new(), 0usize)];
    let mut entries = 0u64;
    // Volume offsets of the directories walked (see the module doc).
    let mut seen = HashSet::new();
    while let Some((dir, prefix, depth)) = stack.pop() {
        if ctx.expired() {
            return Err(Verdict::not_scanned(
                Reason::Timeout,
                "volume time budget ran out",
            ));
        }
        first_read.arm();
        let mut iter = dir.iter().peekable();
        let _ = iter.peek();
        if first_read.take().is_some_and(|at| !seen.insert(at)) {
            continue;
        }
        for ent in iter {
            entries += 1;
            if entries > MAX_ENTRIES {
                return Err(Verdict::not_scanned(
                    Reason::ParseError,
                    "too many directory entries (loop?)",
                ));
            }
            let ent = match ent {
                Ok(e) => e,
                Err(e) => {
                    let (r, d) = read_err(e);
                    ctx.skip(
                        format!("{prefix}/"),
                        0,
                        r,
                        format!("directory unreadable: {d}"),
                    );
                    break;
                }
            };
            let name = ent.file_name();
            if name == "." || name == ".." {
                continue;
            }
            let path = format!("{prefix}/{name}");
            if ent.is_dir() {
                if depth + 1 > MAX_DEPTH {
                    ctx.skip(path, 0, Reason::ParseError, "directory nesting too deep");
                } else {
                    stack.push((ent.to_dir(), path, depth + 1));
                }
                continue;
            }
            if !ent.is_file() {
                continue;
            }
            let size = ent.len();
            let m = ent.modified();
            let mtime =
                ((((m.date.year as i64 * 13 + m.date.month as i64) * 32 + m.date.day as i64) * 24
                    + m.time.hour as i64)
                    * 60
                    + m.time.min as i64)
                    * 60
                    + m.time.sec as i64;
            let mut file = ent.to_file();
            ctx.file(path, "", size, mtime, &mut |buf| {
                buf.clear();
                (&mut file).take(size).read_to_end(buf).map_err(read_err)?;
                Ok(())
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;
    use std::sync::Arc;

    use sha2::Digest as _;

    use crate::engine::BlockEntry;
    use crate::{Outcome, RuleSet, ScanConfig};

    fn sh(prog: &str, args: &[&str]) {
        let st = Command::new(prog).args(args).status().expect(prog);
        assert!(st.success(), "{prog} {args:?}");
    }

    fn s(p: &Path) -> &str {
        p.to_str().expect("utf-8 temp path")
    }

    /// Fuzzer finding (`fuzz/regressions/scan_fat/dir-loop-*`): subdirectory entries that
    /// name an ancestor made the walk exponential (2^256 paths); each directory is now
    /// walked once and the volume ends with every real file scanned.
    #[test]
    fn directories_that_point_back_at_an_ancestor_are_walked_once() {
        let d = tempfile::tempdir().expect("tempdir");
        let img = d.path().join("fat.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(1 << 20))
            .expect("create");
        let f = d.path().join("f.txt");
        let content = b"the one real file\n";
        std::fs::write(&f, content).expect("write");
        let (i, fp) = (s(&img), s(&f));
        sh("mkfs.vfat", &[i]);
        sh("mmd", &["-i", i, "::/a", "::/a/b"]);
        sh("mcopy", &["-i", i, fp, "::/a/b/f.txt"]);
        let mut b = std::fs::read(&img).expect("read");
        // /a/b's cluster starts with "." and "..", and its ".." names /a's cluster (/a's
        // own ".." names the root, cluster 0). Two more entries, copies of "..", loop
        // back to /a.
        let dot = |at: usize| &b[at..at + 11] == b".          " && b[at + 11] & 0x10 != 0;
        let cluster = |at: usize| u16::from_le_bytes([b[at + 26], b[at + 27]]);
        let at = (0..b.len() - 64)
            .step_by(32)
            .find(|&at| dot(at) && &b[at + 32..at + 34] == b".." && cluster(at + 32) != 0)
            .expect("/a/b's directory cluster");
        let parent: [u8; 32] = b[at + 32..at + 64].try_into().expect("32 bytes");
        let free: Vec<usize> = (at..at + 512)
            .step_by(32)
            .filter(|&e| b[e] == 0)
            .take(2)
            .collect();
        assert_eq!(free.len(), 2, "two free slots in /a/b");
        for (e, name) in free.into_iter().zip([b"L1         ", b"L2         "]) {
            b[e..e + 32].copy_from_slice(&parent);
            b[e..e + 11].copy_from_slice(name);
        }
        let rules = RuleSet {
            origin: "test".into(),
            rules: Vec::new(),
            blocklist: vec![BlockEntry {
                sha256: hex::encode(sha2::Sha256::digest(content)),
                name: "the file".into(),
            }],
        };
        let engine = rules.compile().expect("compile");
        let cfg = ScanConfig {
            volume_timeout_secs: 30,
            ..ScanConfig::default()
        };
        let disk: Arc<dyn tandem_disk::ReadAt> = Arc::new(tandem_disk::MemDisk(b));
        let r = crate::scan_disk(disk, "loop", &engine, &cfg).expect("scan");
        assert_eq!(r.outcome, Outcome::Infected, "{r:?}");
        assert_eq!(r.counts.files, 1, "{:?}", r.counts);
    }
}
