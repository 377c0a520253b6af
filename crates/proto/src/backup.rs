//! Backups of the corporate user disk and the escrow of its key: the bodies that travel
//! between the agent and the server.
//!
//! Backups belong to a **user**, not a device: a replacement laptop enrolled for the same
//! user restores the latest one. A backup is committed only when every chunk its manifest
//! names is on the server, so an interrupted upload never becomes the latest backup.

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;

/// Chunk entries per manifest part. A part is about 1.1 MB of JSON, so every request of a
/// backup stays far below the server's per-request body limits whatever the disk size.
pub const PART_CHUNKS: usize = 16_384;

/// `POST /v1/backups`: a finished upload, committed if every chunk is present.
///
/// A small manifest may travel whole in `manifest.chunks`. A large one is first staged in
/// parts of at most [`PART_CHUNKS`] entries (`PUT /v1/backups/staged/{upload}/{index}`,
/// body [`ManifestPart`]); the commit then names the staged upload and carries an empty
/// chunk list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupUpload {
    /// The disk as chunks (name `backup:<user>`, version ignored: the server numbers it).
    pub manifest: Manifest,
    /// When the point-in-time copy was taken (device clock, unix seconds).
    pub taken_at: u64,
    /// The staged parts holding the chunk list, when it was sent in parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<StagedManifest>,
}

/// Which staged upload holds a manifest's chunk list, and in how many parts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StagedManifest {
    /// Upload id chosen by the device: 32 lower-case hex characters.
    pub upload: String,
    /// Number of parts, indexed from 0.
    pub parts: u32,
}

/// One part of a manifest's chunk list (`None` is a hole), staged or read back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ManifestPart {
    /// At most [`PART_CHUNKS`] entries.
    pub chunks: Vec<Option<crate::ChunkId>>,
}

/// `GET /v1/backups/latest/head`: the latest backup without its chunk list, which is read
/// with `GET /v1/backups/{seq}/parts/{index}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackupHead {
    /// Sequence number.
    pub seq: u64,
    /// Disk size in bytes.
    pub size: u64,
    /// Chunk size of the manifest.
    pub chunk_size: u32,
    /// Number of chunk entries (holes included).
    pub chunks: u64,
    /// Number of parts of [`PART_CHUNKS`] entries.
    pub parts: u32,
}

/// Whether `s` is a well-formed staged-upload id.
pub fn valid_upload_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// One committed backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupRecord {
    /// Owner.
    pub user: String,
    /// Sequence number, increasing per user.
    pub seq: u64,
    /// The device that uploaded it.
    pub device: String,
    /// When the copy was taken (device clock).
    pub taken_at: u64,
    /// When the server committed it.
    pub committed_at: u64,
    /// The disk.
    pub manifest: Manifest,
}

/// A summary for listings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupInfo {
    /// Owner.
    pub user: String,
    /// Sequence number.
    pub seq: u64,
    /// Uploading device.
    pub device: String,
    /// When the copy was taken.
    pub taken_at: u64,
    /// When it was committed.
    pub committed_at: u64,
    /// Disk size in bytes.
    pub size: u64,
    /// Chunks that hold data (holes excluded).
    pub data_chunks: u64,
}

impl From<&BackupRecord> for BackupInfo {
    fn from(r: &BackupRecord) -> Self {
        BackupInfo {
            user: r.user.clone(),
            seq: r.seq,
            device: r.device.clone(),
            taken_at: r.taken_at,
            committed_at: r.committed_at,
            size: r.manifest.size,
            data_chunks: r.manifest.chunks.iter().filter(|c| c.is_some()).count() as u64,
        }
    }
}

/// `PUT/GET /v1/escrow`: the user disk key, held by the server for re-provisioning.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Escrow {
    /// The key, base64 (32 bytes).
    pub key: String,
}

impl std::fmt::Debug for Escrow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Escrow { key: **** }")
    }
}

/// `POST /v1/admin/backups/{who}/prune`: keep only a user's newest backups.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    /// How many of the newest backups stay (at least 1).
    pub keep: u32,
    /// Why (audit log).
    pub reason: String,
}

/// What a prune did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruneReport {
    /// The user.
    pub user: String,
    /// Backups dropped, by sequence number.
    pub dropped: Vec<u64>,
    /// Bytes the user's chunk store freed (chunks uploaded within the last day stay until
    /// a later collection).
    pub bytes_freed: u64,
    /// What the user's backups occupy now (compressed).
    pub stored_bytes: u64,
}

/// `POST /v1/admin/devices/{old}/replace`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaceRequest {
    /// The new device, already enrolled for the same user.
    pub new: String,
    /// Why (audit log).
    pub reason: String,
}
