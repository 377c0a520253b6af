//! Scanning one volume: pick the filesystem walker, run every file through the engines,
//! keep the incremental state. This is what a scan worker runs.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tandem_disk::{detect_fs, FsKind, Slice, Volume};

use crate::engine::{Engine, MatchError, Matcher};
use crate::model::{Counts, FileResult, Reason, Verdict, VolumeResult};
use crate::ScanConfig;

/// What an earlier clean scan saw of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    /// Filesystem identity of the file (MFT record, or empty where the reader hides it).
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time in the filesystem's own unit.
    pub mtime: i64,
    /// BLAKE3 of the content, hex.
    pub content: String,
}

/// Incremental state of one volume: the files found clean, by path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeState {
    /// Filesystem UUID / serial: state of another filesystem is never reused.
    pub fs_id: String,
    /// Clean files by path.
    pub files: HashMap<String, FileState>,
}

/// Per-volume scanning context handed to the filesystem walkers.
pub(crate) struct Ctx<'a> {
    matcher: Matcher<'a>,
    cfg: &'a ScanConfig,
    prev: Option<&'a VolumeState>,
    pub(crate) next: VolumeState,
    pub(crate) files: Vec<FileResult>,
    pub(crate) counts: Counts,
    deadline: Instant,
    buf: Vec<u8>,
}

/// A file could not be read: reason and detail.
pub(crate) type ReadFail = (Reason, String);

impl<'a> Ctx<'a> {
    /// Tells the context which filesystem this is; earlier state of another one is dropped.
    pub(crate) fn set_fs_id(&mut self, id: String) {
        if self.prev.is_some_and(|p| p.fs_id != id) {
            self.prev = None;
        }
        self.next.fs_id = id;
    }

    /// Whether the volume's time budget ran out.
    pub(crate) fn expired(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// Records a file that will not be read.
    pub(crate) fn skip(
        &mut self,
        path: String,
        size: u64,
        reason: Reason,
        detail: impl Into<String>,
    ) {
        self.counts.files += 1;
        self.counts.not_scanned += 1;
        self.files.push(FileResult {
            path,
            size,
            verdict: Verdict::not_scanned(reason, detail),
            sha256: None,
            unchanged: false,
        });
    }

    /// Reads one file through `read` (which must fill the buffer with exactly `size`
    /// bytes) and matches it.
    pub(crate) fn file(
        &mut self,
        path: String,
        id: &str,
        size: u64,
        mtime: i64,
        read: &mut dyn FnMut(&mut Vec<u8>) -> Result<(), ReadFail>,
    ) {
        if size > self.cfg.max_file_size {
            let cap = self.cfg.max_file_size;
            return self.skip(
                path,
                size,
                Reason::TooLarge,
                format!("{size} bytes is over the {cap}-byte cap"),
            );
        }
        if self.expired() {
            return self.skip(path, size, Reason::Timeout, "volume time budget ran out");
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.reserve(size as usize);
        // Third-party parsers may panic on hostile structures: that fails this file only.
        let got = catch_unwind(AssertUnwindSafe(|| read(&mut buf))).unwrap_or_else(|_| {
            Err((
                Reason::ParseError,
                "filesystem reader panicked on this file".into(),
            ))
        });
        let verdict = match got {
            Err((reason, detail)) => Some(Verdict::not_scanned(reason, detail)),
            Ok(()) if buf.len() as u64 != size => Some(Verdict::not_scanned(
                Reason::ParseError,
                format!("read {} bytes of a {size}-byte file", buf.len()),
            )),
            Ok(()) => None,
        };
        if let Some(v) = verdict {
            self.buf = buf;
            self.counts.files += 1;
            self.counts.not_scanned += 1;
            self.files.push(FileResult {
                path,
                size,
                verdict: v,
                sha256: None,
                unchanged: false,
            });
            return;
        }
        self.counts.bytes += size;
        // Hash only what is needed: SHA-256 for a blocklist, BLAKE3 (several times faster)
        // for the incremental state.
        let mut sha = self
            .matcher
            .has_blocklist()
            .then(|| -> [u8; 32] { sha2::Sha256::digest(&buf).into() });
        let mut hits: Vec<_> = sha
            .as_ref()
            .and_then(|s| self.matcher.blocklisted(s))
            .into_iter()
            .collect();
        let content = self
            .cfg
            .incremental
            .then(|| blake3::hash(&buf).to_hex().to_string());
        let unchanged = hits.is_empty()
            && content.as_ref().is_some_and(|c| {
                self.prev.and_then(|p| p.files.get(&path)).is_some_and(|s| {
                    s.id == id && s.size == size && s.mtime == mtime && &s.content == c
                })
            });
        let mut verdict = None;
        if !unchanged {
            match self.matcher.rules(&buf) {
                Ok(h) => hits.extend(h),
                Err(MatchError::Timeout) => {
                    verdict = Some(Verdict::not_scanned(Reason::Timeout, "rule engine timeout"))
                }
                Err(MatchError::Other(e)) => {
                    verdict = Some(Verdict::not_scanned(Reason::ParseError, e))
                }
            }
        }
        if !hits.is_empty() && sha.is_none() {
            sha = Some(sha2::Sha256::digest(&buf).into());
        }
        self.buf = buf;
        let sha_hex = sha.map(hex::encode);
        let verdict = verdict.unwrap_or(if hits.is_empty() {
            Verdict::Clean
        } else {
            Verdict::Infected { hits }
        });
        self.counts.files += 1;
        match &verdict {
            Verdict::Clean => {
                self.counts.clean += 1;
                if unchanged {
                    self.counts.unchanged += 1;
                }
                if let Some(content) = content {
                    let state = FileState {
                        id: id.to_string(),
                        size,
                        mtime,
                        content,
                    };
                    self.next.files.insert(path.clone(), state);
                }
            }
            Verdict::Infected { .. } => self.counts.infected += 1,
            Verdict::NotScanned { .. } => self.counts.not_scanned += 1,
        }
        if !matches!(verdict, Verdict::Clean) || self.cfg.list_clean {
            self.files.push(FileResult {
                path,
                size,
                verdict,
                sha256: sha_hex,
                unchanged,
            });
        }
    }
}

/// Scans one volume of a disk in this process. `prev` is the volume's state from the
/// last scan under the same rules, if any; the new state comes back beside the result.
pub fn scan_volume(
    disk: std::sync::Arc<dyn tandem_disk::ReadAt>,
    vol: &Volume,
    engine: &Engine,
    cfg: &ScanConfig,
    prev: Option<&VolumeState>,
) -> (VolumeResult, VolumeState) {
    let started = Instant::now();
    let mut result = VolumeResult {
        index: vol.index,
        table: vol.table,
        start: vol.start,
        len: vol.len,
        fs: FsKind::Unknown,
        verdict: Verdict::Clean,
        counts: Counts::default(),
        files: Vec::new(),
        millis: 0,
    };
    let mut ctx = Ctx {
        matcher: engine.matcher(Duration::from_secs(cfg.file_timeout_secs)),
        cfg,
        prev,
        next: VolumeState::default(),
        files: Vec::new(),
        counts: Counts::default(),
        deadline: started + Duration::from_secs(cfg.volume_timeout_secs),
        buf: Vec::new(),
    };
    let outcome = (|| -> Result<(), Verdict> {
        let view = vol
            .view(disk)
            .map_err(|e| Verdict::not_scanned(Reason::ReadError, e.to_string()))?;
        let fs =
            detect_fs(&view).map_err(|e| Verdict::not_scanned(Reason::ReadError, e.to_string()))?;
        result.fs = fs;
        let walk = |view: Slice, ctx: &mut Ctx| match fs {
            FsKind::Ext => crate::fs::ext::walk(view, ctx),
            FsKind::Fat => crate::fs::fat::walk(view, ctx),
            FsKind::Ntfs => crate::fs::ntfs::walk(view, ctx),
            FsKind::Luks | FsKind::Bitlocker => Err(Verdict::not_scanned(
                Reason::EncryptedVolume,
                format!(
                    "{fs} volume: encrypted inside the guest; scan it from inside or with its key"
                ),
            )),
            FsKind::Swap | FsKind::Lvm | FsKind::Unknown => Err(Verdict::not_scanned(
                Reason::UnknownFilesystem,
                format!("{fs}: no filesystem this scanner reads"),
            )),
        };
        catch_unwind(AssertUnwindSafe(|| walk(view, &mut ctx))).unwrap_or_else(|_| {
            Err(Verdict::not_scanned(
                Reason::ParseError,
                "filesystem reader panicked",
            ))
        })
    })();
    result.files = std::mem::take(&mut ctx.files);
    result.counts = ctx.counts;
    if let Err(v) = outcome {
        result.verdict = v;
    }
    result.settle();
    result.millis = started.elapsed().as_millis() as u64;
    tracing::info!(volume = vol.index, fs = %result.fs, files = result.counts.files, bytes = result.counts.bytes, "volume scanned");
    (result, ctx.next)
}
