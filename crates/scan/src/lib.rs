//! Out-of-band malware scanning of VM disks: a random-access disk view in, a verdict per
//! file and per volume out.
//!
//! Pipeline: [`tandem_disk::volumes`] (GPT, MBR, or the whole disk) → per volume, the
//! filesystem by signature → a walker (`ext4-view` for ext2/3/4, `fatfs` behind a
//! write-refusing adapter for FAT, `ntfs` for NTFS including alternate data streams) →
//! every regular file read completely (sparse regions as zeros) → SHA-256 against the
//! blocklist and YARA-X rules (compiled once per scan, see [`engine`]).
//!
//! Invariants:
//! - Every file and volume ends `clean`, `infected` or `not_scanned` with a [`Reason`];
//!   anything not read completely is `not_scanned`, never `clean`. A volume is clean only
//!   when every file in it is.
//! - Limits: per-file size cap, rule-engine timeout per file, time budget per volume
//!   ([`ScanConfig`]); third-party parser panics fail one file or one volume. In
//!   [`isolate`], each volume is scanned by a child process (the `tandem` binary's hidden
//!   `scan worker`) under memory and CPU rlimits and a wall-clock timeout, killed with
//!   its parent, so a hostile filesystem can at worst fail its own volume's scan; the
//!   disk's format and partition table are read by a worker too, never by the parent.
//! - Incremental ([`state`]): a file is skipped (rule matching only) when the previous
//!   clean scan under the same rules digest saw the same path, file id (NTFS MFT record),
//!   size, mtime **and BLAKE3 hash of its content**. Content is always read and hashed: a guest
//!   that rewrites blocks under its filesystem, or resets mtimes, cannot hide a change.
//!
//! Entry points: [`scan_disk`] (in process, e.g. gold-image publish), [`isolate::scan_isolated`]
//! (the CLI), [`volume::scan_volume`] (a worker).

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod engine;
mod fs;
pub mod isolate;
pub mod model;
pub mod state;
pub mod volume;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use engine::{Engine, RuleBundle, RuleSet, BUNDLE_KIND};
pub use model::{Counts, FileResult, Hit, Outcome, Reason, Report, Verdict, VolumeResult};
pub use state::ScanState;

/// Limits and options of a scan (deserialized from the CLI and passed to workers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ScanConfig {
    /// Files larger than this are `not_scanned: too_large`.
    pub max_file_size: u64,
    /// Rule-engine timeout per file, seconds.
    pub file_timeout_secs: u64,
    /// Time budget per volume, seconds (also the worker's wall-clock limit).
    pub volume_timeout_secs: u64,
    /// Worker address-space data limit, MiB.
    pub worker_memory_mib: u64,
    /// Worker CPU-time limit, seconds.
    pub worker_cpu_secs: u64,
    /// List clean files in the report too.
    pub list_clean: bool,
    /// Keep incremental state (hash every file's content with BLAKE3).
    #[serde(default)]
    pub incremental: bool,
}

impl Default for ScanConfig {
    fn default() -> Self {
        ScanConfig {
            max_file_size: 512 << 20,
            file_timeout_secs: 60,
            volume_timeout_secs: 3600,
            worker_memory_mib: 2048,
            worker_cpu_secs: 7200,
            list_clean: false,
            incremental: false,
        }
    }
}

/// A scan could not run at all (as opposed to a file or volume that was not scanned).
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// A rules, blocklist or state file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A YARA source does not compile.
    #[error("rules {name:?} do not compile: {detail}")]
    Rules {
        /// Rule file (namespace).
        name: String,
        /// Compiler message.
        detail: String,
    },
    /// A blocklist line is not `<sha256> [name]`.
    #[error("blocklist {path} line {line}: {detail}")]
    Blocklist {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What was wrong.
        detail: String,
    },
    /// Neither rules nor a blocklist were given.
    #[error("no rules: pass --rules FILE|DIR, --blocklist FILE or --bundle FILE")]
    NoRules,
    /// A rule bundle failed verification.
    #[error("rule bundle refused: {0}")]
    Bundle(#[source] tandem_proto::SignError),
    /// A verified bundle has an unknown format.
    #[error("rule bundle has an unsupported format: {0}")]
    BundleFormat(String),
    /// The disk's partition table cannot be read.
    #[error("cannot read the disk layout: {0}")]
    Disk(#[from] tandem_disk::DiskError),
    /// The state file is not ours or is damaged.
    #[error("scan state {path} is unusable ({detail}); delete it to start a full scan")]
    State {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The disk could not be opened or its layout read (in the layout worker): a refused
    /// backing file, a FIFO, a damaged partition table, a worker that was killed.
    #[error("cannot open the disk: {0}")]
    Open(String),
    /// A scan worker could not be started.
    #[error("cannot start the scan worker {exe}: {source}")]
    Worker {
        /// The executable.
        exe: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Scans every volume of `view` in this process (no worker isolation): the simple library
/// call for callers that already run isolated, e.g. gold-image publish.
pub fn scan_disk(
    view: Arc<dyn tandem_disk::ReadAt>,
    target: &str,
    engine: &Engine,
    cfg: &ScanConfig,
) -> Result<Report, ScanError> {
    let started = Instant::now();
    let vols = tandem_disk::volumes(&*view)?;
    let results = vols
        .iter()
        .map(|v| volume::scan_volume(view.clone(), v, engine, cfg, None).0)
        .collect();
    Ok(Report::new(
        target.to_string(),
        view.size(),
        engine.info().clone(),
        results,
        started.elapsed().as_millis() as u64,
    ))
}
