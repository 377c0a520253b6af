//! Moves image versions from the server to laptops: publish, catalog, 4 KiB block deltas,
//! batched chunk fetch, resume, atomic commit.
//!
//! - [`publish`]: server side, a disk image file -> chunks in the store + a 4 KiB block
//!   table + a signed manifest in the [`catalog`].
//! - [`delta`]: the server computes `old -> new` as copy runs from the old version plus new
//!   blocks in one zstd stream; the laptop applies it and verifies every chunk.
//! - [`client`]: the HTTP client (requests are signed through a [`client::SignRequest`]
//!   hook the agent implements with its device key), with an optional rate limit.
//! - [`pull`]: laptop side, `pull(client, local, name, version)`: pick the best local base,
//!   fetch the manifest (as a delta when possible), apply the version delta, fetch what is
//!   still missing in batched streamed requests, verify, and commit the version by writing
//!   its manifest into the local catalog last. An interrupted pull resumes: chunks that
//!   arrived are in the store, and a partly downloaded delta continues with an HTTP range.
//!
//! Laptop layout: `<dir>/keys/store.key` (the data key; delete it to crypto-erase),
//! `<dir>/store/` (sealed chunk store), `<dir>/store/catalog/` (verified manifests),
//! `<dir>/store/incoming/` (partial downloads).

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod catalog;
pub mod client;
pub mod delta;
pub mod publish;
pub mod pull;

use std::path::PathBuf;

pub use catalog::Catalog;
pub use client::{Client, NoAuth, SignRequest};
pub use publish::{publish, PublishOptions, PublishReport};
pub use pull::{pull, Local, PullOptions, PullReport};

/// Reports progress of long transfers; the CLI draws a bar, the agent logs.
pub trait Progress: Send + Sync {
    /// A phase starts with `total` units (bytes).
    fn start(&self, phase: &str, total: u64);
    /// `n` more units are done.
    fn inc(&self, n: u64);
}

/// Progress that goes nowhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _phase: &str, _total: u64) {}
    fn inc(&self, _n: u64) {}
}

/// Moving a version failed. [`SyncError::is_temporary`] says whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A local file could not be used.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The chunk store failed.
    #[error(transparent)]
    Store(#[from] tandem_store::StoreError),
    /// A manifest was refused.
    #[error(transparent)]
    Manifest(#[from] tandem_proto::manifest::ManifestError),
    /// The manifest served is for another image or version than asked.
    #[error("server sent the manifest of {got} when {want} was asked for")]
    WrongManifest {
        /// What was asked.
        want: String,
        /// What came.
        got: String,
    },
    /// The version is not in the catalog.
    #[error("image {name} has no version {version}")]
    NoSuchVersion {
        /// Image.
        name: String,
        /// Version.
        version: u64,
    },
    /// The image has no versions at all.
    #[error("image {name} has no versions on the server (or none assigned to this device)")]
    NoSuchImage {
        /// Image.
        name: String,
    },
    /// Publishing would overwrite a version.
    #[error(
        "image {name} has (or had) version {version}; versions are immutable and never reused, publish without --version"
    )]
    VersionExists {
        /// Image.
        name: String,
        /// Version.
        version: u64,
    },
    /// The input to publish is not a disk image.
    #[error("{path} is not a disk image: {reason}")]
    NotADiskImage {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        reason: String,
    },
    /// A file in a Tandem format is damaged.
    #[error("{what}: {reason}")]
    Format {
        /// Which file.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// A version delta could not be used.
    #[error("version delta refused: {reason}")]
    Delta {
        /// Why.
        reason: String,
    },
    /// The local copy of the old version could not be read while applying a delta.
    #[error("local copy of version {version} is unreadable: {reason}")]
    OldVersion {
        /// Base version.
        version: u64,
        /// Why.
        reason: String,
    },
    /// The server sent a chunk whose content does not match its id.
    #[error("server sent chunk {id} with content that does not match it; nothing was stored — the server's copy may be damaged (`tandem store check` there)")]
    BadChunk {
        /// Chunk id.
        id: tandem_proto::ChunkId,
    },
    /// The server could not be reached or the connection broke.
    #[error("{url}: {source}")]
    Http {
        /// Request URL.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The server answered with an error.
    #[error("{url}: server said {status}: {message}")]
    Status {
        /// Request URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Error message from the body.
        message: String,
    },
    /// The server's response broke the protocol.
    #[error("{url}: bad response: {reason}")]
    Protocol {
        /// Request URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// After every fetch, the version is still incomplete.
    #[error("{name} v{version} is still missing {missing} chunks after fetching; pull again")]
    Incomplete {
        /// Image.
        name: String,
        /// Version.
        version: u64,
        /// Chunks still missing.
        missing: u64,
    },
}

impl SyncError {
    /// Whether the same operation may succeed later (network, busy server, disk space).
    pub fn is_temporary(&self) -> bool {
        match self {
            SyncError::Http { .. } | SyncError::Incomplete { .. } => true,
            SyncError::Status { status, .. } => *status >= 500 || *status == 429,
            SyncError::Io { .. } => true,
            SyncError::Store(e) => matches!(
                e,
                tandem_store::StoreError::Io { .. } | tandem_store::StoreError::Busy { .. }
            ),
            _ => false,
        }
    }
}
