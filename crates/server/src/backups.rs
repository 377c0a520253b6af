//! Backups of users' corporate disks, key escrow, and re-provisioning onto a new device.
//!
//! Layout under the data directory (user names are hex-encoded into file names):
//!
//! | path | what |
//! |---|---|
//! | `backups/<hex user>/<seq, 20 digits>.json` | one committed [`BackupRecord`] |
//! | `backups/<hex user>/store/` | the user's own chunk store: every chunk of their backups |
//! | `backups/<hex user>/staging/<upload>/<index>.json` | manifest parts of a backup not yet committed |
//! | `escrow/<hex user>.key` | the user disk key, sealed (see [`crate::keys::EscrowVault`]) |
//!
//! # Per-user chunk namespace
//!
//! Each user's backup chunks live in a store of their own, which only that user's devices
//! write (`PUT /v1/backups/chunks/{id}`, checked against the id) and query
//! (`POST /v1/backups/chunks/missing`). A backup manifest may name only chunks in that
//! store, so a device cannot "launder" a chunk it never had — another user's data or an
//! image version not assigned to it — by naming its id in a backup and reading it back.
//! The dedup query answers from the same store, so it says nothing about what other users
//! or images hold. Why a namespace rather than per-user ownership rows over the shared
//! store: backups are LUKS ciphertext under a key per user, so two users' chunks never
//! match and cross-user dedup would save nothing; a namespace needs no bookkeeping that
//! could drift from the store, and GC of one user's store cannot touch anyone else's data.
//! Backups committed before the namespace existed name chunks of the shared store; their
//! chunks are still served from there (only chunks those records name).
//!
//! # Commit and garbage collection
//!
//! A backup is committed — written atomically, numbered, and visible as "latest" — only
//! after the server checked that every chunk it names is in the user's store, so a device
//! that loses power mid-upload leaves the previous backup as the latest. The commit holds
//! the store's ingest guard from that check until the record is written, and the user-store
//! GC takes the exclusive lock *before* it reads the records (its mark): a chunk can never
//! be swept between a commit's check and its record. Retention keeps the newest
//! [`KEEP_LAST`] backups plus the newest of each day for [`KEEP_DAYS`] days; when it drops a
//! record the user's store is collected, keeping chunks younger than [`UPLOAD_GRACE`] (a
//! backup still uploading).
//!
//! # Quotas
//!
//! A user's policy sets `backup_quota_mb` (default
//! [`tandem_proto::fleet::DEFAULT_BACKUP_QUOTA_MB`], 0 = none): the most the user's store
//! may hold, counted as the stored (compressed) bytes of its chunks. An upload of a chunk
//! the store lacks is refused (403 `backup_quota_exceeded`, audited) when it would take
//! the store past the quota; a chunk already there costs nothing and is accepted. Commits
//! are not refused: they add no chunk bytes, and a commit is what runs retention, whose
//! collection brings the count down. The count is kept in memory per user (computed from
//! the store once, corrected by each upload, recomputed after each collection and, at
//! most once a minute, before a refusal), and each upload reserves its bytes before
//! writing, so concurrent uploads cannot overshoot. Staged manifest parts are not
//! counted: they are bounded on their own (see below).
//!
//! # Large disks
//!
//! A manifest has one entry per 64 KiB of disk; a disk of [`MAX_DISK`] would be ~280 MB of
//! JSON. No request carries that: the chunk list travels in parts of
//! [`tandem_proto::backup::PART_CHUNKS`] entries, staged on disk, and is read back the same
//! way; every backup route has an explicit body limit ([`MAX_PART_BODY`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use tandem_proto::backup::{
    valid_upload_id, BackupHead, BackupInfo, BackupRecord, BackupUpload, Escrow, ManifestPart,
    ReplaceRequest, PART_CHUNKS,
};
use tandem_proto::fleet::{DeviceId, DeviceStatus};
use tandem_proto::manifest::{ChunkList, MAX_CHUNKS_PER_REQUEST};
use tandem_proto::ChunkId;
use tandem_store::Store;
use tandem_tools::atomic::write_atomic;

use crate::auth::{Admin, Caller};
use crate::error::{parse_json, ApiError, InternalError};
use crate::{audit, now, AppState};

/// Backups always kept, newest first.
pub const KEEP_LAST: usize = 7;
/// Days for which the newest backup of each day is kept.
pub const KEEP_DAYS: u64 = 30;
/// Largest user disk accepted.
pub const MAX_DISK: u64 = 256 << 30;
/// Largest body of a manifest part, a whole small manifest, or a commit: a part of
/// [`PART_CHUNKS`] data entries is ~1.1 MB of JSON.
pub const MAX_PART_BODY: usize = 4 << 20;
/// Chunks uploaded this recently survive a user-store collection even when no committed
/// backup names them yet (another device of the user may be mid-backup).
pub const UPLOAD_GRACE: Duration = Duration::from_secs(86_400);
/// Staged parts older than this are dropped (an upload that never committed).
const STAGING_TTL: u64 = 2 * 86_400;
/// User stores kept open at once.
const OPEN_STORES: usize = 64;
/// Unfinished staged uploads per user: bounds what a device can park on the server.
const MAX_STAGED_UPLOADS: usize = 4;
/// How long a user's quota, read from their policy, is trusted before it is read again.
const QUOTA_TTL: Duration = Duration::from_secs(60);
/// A stored chunk may be a little larger than its plaintext (incompressible data in a
/// zstd frame): what an upload reserves beyond its length.
const CHUNK_OVERHEAD: u64 = 64;

/// Stores and serves backups.
pub struct BackupService {
    shared: Arc<Store>,
    root: PathBuf,
    escrow: crate::keys::EscrowVault,
    stores: Mutex<HashMap<String, Arc<Store>>>,
    commit: Mutex<()>,
    /// Stored bytes per user store (those counted so far), and when they were counted.
    usage: Mutex<HashMap<String, Usage>>,
    /// Quota in MiB per user, as last read from the user's policy.
    quotas: Mutex<HashMap<String, (std::time::Instant, u64)>>,
}

#[derive(Debug, Clone, Copy)]
struct Usage {
    bytes: u64,
    counted: std::time::Instant,
}

/// A user's backup quota in MiB; 0 is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaMb(pub u64);

impl QuotaMb {
    /// No limit.
    pub const NONE: QuotaMb = QuotaMb(0);

    fn bytes(self) -> Option<u64> {
        (self.0 > 0).then(|| self.0.saturating_mul(1 << 20))
    }
}

fn storage(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(InternalError::Storage(format!("{what}: {e}")))
}

fn user_dir_name(user: &str) -> String {
    hex::encode(user.as_bytes())
}

fn record_name(seq: u64) -> String {
    format!("{seq:020}.json")
}

impl BackupService {
    /// Opens the backup area of `data_dir`; `shared` is the image store (read only for
    /// backups committed before per-user stores), `escrow` seals escrowed keys.
    pub fn new(data_dir: &Path, shared: Arc<Store>, escrow: crate::keys::EscrowVault) -> Arc<Self> {
        Arc::new(BackupService {
            shared,
            root: data_dir.join("backups"),
            escrow,
            stores: Mutex::new(HashMap::new()),
            commit: Mutex::new(()),
            usage: Mutex::new(HashMap::new()),
            quotas: Mutex::new(HashMap::new()),
        })
    }

    /// `user`'s quota as last read, if read within [`QUOTA_TTL`].
    pub fn cached_quota(&self, user: &str) -> Option<QuotaMb> {
        let q = self.quotas.lock().ok()?;
        q.get(user)
            .filter(|(at, _)| at.elapsed() < QUOTA_TTL)
            .map(|(_, mb)| QuotaMb(*mb))
    }

    /// Remembers `user`'s quota (read from the user's policy).
    pub fn remember_quota(&self, user: &str, quota: QuotaMb) {
        if let Ok(mut q) = self.quotas.lock() {
            if q.len() >= 10_000 {
                q.retain(|_, (at, _)| at.elapsed() < QUOTA_TTL);
            }
            q.insert(user.to_string(), (std::time::Instant::now(), quota.0));
        }
    }

    /// Bytes `user`'s backup chunks occupy in their store (compressed), as counted.
    pub fn stored_bytes(&self, user: &str) -> Result<u64, ApiError> {
        if let Some(u) = self.lock_usage()?.get(user) {
            return Ok(u.bytes);
        }
        self.recount(user)
    }

    fn lock_usage(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Usage>>, ApiError> {
        self.usage
            .lock()
            .map_err(|_| storage("usage cache", "poisoned"))
    }

    /// Counts `user`'s stored bytes from the store and remembers the count.
    fn recount(&self, user: &str) -> Result<u64, ApiError> {
        let store = self.user_store(user)?;
        let bytes = store
            .stats()
            .map_err(|e| storage("store stats", e))?
            .stored_bytes;
        self.lock_usage()?.insert(
            user.to_string(),
            Usage {
                bytes,
                counted: std::time::Instant::now(),
            },
        );
        Ok(bytes)
    }

    /// Reserves `n` bytes of `user`'s quota for an upload, or refuses it.
    fn reserve(&self, user: &str, n: u64, quota: QuotaMb) -> Result<(), ApiError> {
        let Some(limit) = quota.bytes() else {
            return Ok(());
        };
        let mut fresh = false;
        loop {
            {
                let mut usage = self.lock_usage()?;
                // Not counted yet (or a collection just dropped the count).
                let Some(u) = usage.get_mut(user) else {
                    drop(usage);
                    self.recount(user)?;
                    fresh = true;
                    continue;
                };
                if u.bytes.saturating_add(n) <= limit {
                    u.bytes += n;
                    return Ok(());
                }
                // Before refusing, count again if the count is old: something outside
                // this process (`tandem store gc`) may have freed space.
                if fresh || u.counted.elapsed() < QUOTA_TTL {
                    let used = u.bytes;
                    return Err(ApiError::Forbidden {
                        code: "backup_quota_exceeded",
                        message: format!(
                            "backup quota of {} MiB for user {user} exceeded ({} MiB stored); ask IT to raise it (`tandem admin policy set POLICY --backup-quota-mb N`) or prune old backups (`tandem admin backups prune {user} --keep N`); the previous backup stays the latest",
                            quota.0,
                            used.div_ceil(1 << 20)
                        ),
                    });
                }
            }
            self.recount(user)?;
            fresh = true;
        }
    }

    /// Corrects `user`'s count once an upload that reserved `reserved` bytes wrote
    /// `written` (0 when it failed or the chunk was there already).
    fn settle(&self, user: &str, reserved: u64, written: u64) {
        if let Ok(mut usage) = self.usage.lock() {
            if let Some(u) = usage.get_mut(user) {
                u.bytes = u.bytes.saturating_sub(reserved).saturating_add(written);
            }
        }
    }

    fn user_dir(&self, user: &str) -> PathBuf {
        self.root.join(user_dir_name(user))
    }

    /// The chunk store of `user`'s backups (opened once, kept among the recently used).
    pub fn user_store(&self, user: &str) -> Result<Arc<Store>, ApiError> {
        let mut open = self
            .stores
            .lock()
            .map_err(|_| storage("store cache", "poisoned"))?;
        if let Some(s) = open.get(user) {
            return Ok(s.clone());
        }
        let path = self.user_dir(user).join("store");
        let store = Arc::new(Store::open(&path).map_err(|e| storage("user store", e))?);
        if open.len() >= OPEN_STORES {
            // Only stores nobody else holds are closed: one user never has two open
            // instances (two pack writers, one of which a collection could not see).
            open.retain(|_, s| Arc::strong_count(s) > 1);
        }
        open.insert(user.to_string(), store.clone());
        Ok(store)
    }

    /// Every committed backup of `user`, oldest first.
    pub fn list(&self, user: &str) -> std::io::Result<Vec<BackupRecord>> {
        read_records(&self.user_dir(user))
    }

    /// Chunks referenced by any backup: live for the shared store's garbage collection
    /// (only backups from before per-user stores name chunks there).
    pub fn live_chunks(data_dir: &Path) -> std::io::Result<HashSet<ChunkId>> {
        let root = data_dir.join("backups");
        let mut live = HashSet::new();
        let users = match std::fs::read_dir(&root) {
            Ok(u) => u,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(live),
            Err(e) => return Err(e),
        };
        for user in users.flatten() {
            if !user.path().is_dir() {
                continue;
            }
            for r in read_records(&user.path())? {
                live.extend(r.manifest.chunks.iter().flatten().copied());
            }
        }
        Ok(live)
    }

    /// Which of `ids` `user`'s store lacks (the dedup query of backup uploads).
    pub fn missing(&self, user: &str, ids: &[ChunkId]) -> Result<Vec<ChunkId>, ApiError> {
        let store = self.user_store(user)?;
        let have = store
            .contains_many(ids)
            .map_err(|e| storage("chunk store", e))?;
        Ok(ids
            .iter()
            .zip(have)
            .filter(|(_, h)| !h)
            .map(|(id, _)| *id)
            .collect())
    }

    /// Stores one chunk of `user`'s backup; refused unless `data` hashes to `id`, and
    /// when the user's store lacks it and it would take the store past `quota`.
    pub fn put_chunk(
        &self,
        user: &str,
        id: ChunkId,
        data: Vec<u8>,
        quota: QuotaMb,
    ) -> Result<(), ApiError> {
        if ChunkId::of(&data) != id {
            return Err(ApiError::BadRequest(format!(
                "content does not hash to {id}; refused"
            )));
        }
        let store = self.user_store(user)?;
        let _g = store
            .ingest_guard()
            .map_err(|e| storage("ingest lock", e))?;
        if quota != QuotaMb::NONE {
            let have = store
                .contains_many(&[id])
                .map_err(|e| storage("chunk store", e))?;
            if have.first().copied().unwrap_or(false) {
                return Ok(());
            }
        }
        let reserved = data.len() as u64 + CHUNK_OVERHEAD;
        self.reserve(user, reserved, quota)?;
        let written = store.put_many(vec![(id, tandem_store::Payload::Raw(data))]);
        self.settle(user, reserved, *written.as_ref().unwrap_or(&0));
        written.map_err(|e| storage("chunk write", e))?;
        Ok(())
    }

    /// Stages part `index` of upload `upload` of `user`.
    pub fn stage(
        &self,
        user: &str,
        upload: &str,
        index: u32,
        part: &ManifestPart,
    ) -> Result<(), ApiError> {
        if !valid_upload_id(upload) {
            return Err(ApiError::BadRequest(
                "upload id must be 32 lower-case hex characters".into(),
            ));
        }
        if part.chunks.len() > PART_CHUNKS {
            return Err(ApiError::BadRequest(format!(
                "a manifest part holds at most {PART_CHUNKS} entries"
            )));
        }
        if u64::from(index) >= max_parts() {
            return Err(ApiError::BadRequest(format!(
                "part {index} is beyond the largest disk ({MAX_DISK} bytes)"
            )));
        }
        let dir = self.user_dir(user).join("staging");
        drop_stale_staging(&dir);
        if !dir.join(upload).exists() {
            let unfinished = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
            if unfinished >= MAX_STAGED_UPLOADS {
                return Err(ApiError::Conflict(format!(
                    "{unfinished} unfinished backup uploads already; commit one or wait for them to expire"
                )));
            }
        }
        let path = dir.join(upload).join(format!("{index:08}.json"));
        let json = serde_json::to_vec(part).expect("part serializes");
        write_atomic(&path, &json, 0o600).map_err(|e| storage("staged part", e))
    }

    fn assemble(
        &self,
        user: &str,
        upload: &str,
        parts: u32,
    ) -> Result<Vec<Option<ChunkId>>, ApiError> {
        if !valid_upload_id(upload) {
            return Err(ApiError::BadRequest(
                "upload id must be 32 lower-case hex characters".into(),
            ));
        }
        if u64::from(parts) > max_parts() {
            return Err(ApiError::BadRequest(format!(
                "{parts} parts is more than the largest disk ({MAX_DISK} bytes) needs"
            )));
        }
        let dir = self.user_dir(user).join("staging").join(upload);
        let mut chunks = Vec::new();
        for i in 0..parts {
            let path = dir.join(format!("{i:08}.json"));
            let bytes = std::fs::read(&path).map_err(|_| {
                ApiError::Conflict(format!(
                    "part {i} of upload {upload} was not staged; stage every part, then commit"
                ))
            })?;
            let part: ManifestPart =
                serde_json::from_slice(&bytes).map_err(|e| storage("staged part", e))?;
            chunks.extend(part.chunks);
        }
        Ok(chunks)
    }

    /// Commits a backup of `user` uploaded by `device`.
    pub fn commit(
        &self,
        user: &str,
        device: &str,
        up: BackupUpload,
    ) -> Result<BackupRecord, ApiError> {
        self.commit_with(user, device, up, || {})
    }

    /// [`BackupService::commit`], running `between` after the completeness check and
    /// before the record is written (where a racing GC would do harm; tests use it).
    fn commit_with(
        &self,
        user: &str,
        device: &str,
        up: BackupUpload,
        between: impl FnOnce(),
    ) -> Result<BackupRecord, ApiError> {
        let mut manifest = up.manifest;
        if let Some(st) = &up.staged {
            if !manifest.chunks.is_empty() {
                return Err(ApiError::BadRequest(
                    "a staged backup carries its chunk list in the staged parts only".into(),
                ));
            }
            manifest.chunks = self.assemble(user, &st.upload, st.parts)?;
        }
        if manifest.size > MAX_DISK {
            return Err(ApiError::BadRequest(format!(
                "backup of {} bytes is larger than the {MAX_DISK}-byte limit",
                manifest.size
            )));
        }
        manifest
            .validate()
            .map_err(|e| ApiError::BadRequest(format!("backup manifest: {e}")))?;
        let ids: Vec<ChunkId> = manifest
            .chunks
            .iter()
            .flatten()
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let store = self.user_store(user)?;
        // From the check until the record is written no GC may sweep this store.
        let guard = store
            .ingest_guard()
            .map_err(|e| storage("ingest lock", e))?;
        let have = store
            .contains_many(&ids)
            .map_err(|e| storage("chunk store", e))?;
        let missing = have.iter().filter(|h| !**h).count();
        if missing > 0 {
            return Err(ApiError::Conflict(format!(
                "{missing} chunks of this backup were not uploaded by this user; upload them first (the previous backup stays the latest)"
            )));
        }
        between();
        let commit = self
            .commit
            .lock()
            .map_err(|_| storage("backup lock", "poisoned"))?;
        let existing = self.list(user).map_err(|e| storage("backup list", e))?;
        let seq = existing.last().map(|r| r.seq + 1).unwrap_or(1);
        manifest.name = format!("backup-{}", user_dir_name(user));
        manifest.version = seq;
        let record = BackupRecord {
            user: user.to_string(),
            seq,
            device: device.to_string(),
            taken_at: up.taken_at,
            committed_at: now(),
            manifest,
        };
        let path = self.user_dir(user).join(record_name(seq));
        let json = serde_json::to_vec(&record).expect("record serializes");
        write_atomic(&path, &json, 0o600).map_err(|e| storage("backup record", e))?;
        let mut all = existing;
        all.push(record.clone());
        let dropped = prune(&all, record.committed_at);
        for old in &dropped {
            let p = self.user_dir(user).join(record_name(*old));
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(path = %p.display(), error = %e, "could not prune backup");
            }
        }
        drop(commit);
        drop(guard);
        if let Some(st) = &up.staged {
            let _ = std::fs::remove_dir_all(self.user_dir(user).join("staging").join(&st.upload));
        }
        if !dropped.is_empty() {
            match self.collect(user, UPLOAD_GRACE) {
                Ok(r) => tracing::info!(
                    user,
                    removed = r.removed_chunks,
                    "user backup store collected"
                ),
                Err(e) => {
                    tracing::info!(user, error = %e, "user backup store not collected this time")
                }
            }
        }
        Ok(record)
    }

    /// Garbage-collects `user`'s store: locks it first, then marks every chunk its
    /// committed backups name, then sweeps what is unnamed and older than `grace`.
    pub fn collect(&self, user: &str, grace: Duration) -> Result<tandem_store::GcReport, ApiError> {
        let store = self.user_store(user)?;
        let lock = store.gc_lock().map_err(|e| match e {
            tandem_store::StoreError::InUse { .. } => ApiError::Conflict(format!(
                "backups of {user} are being written; collect later"
            )),
            other => storage("gc lock", other),
        })?;
        let mut live = HashSet::new();
        for r in self.list(user).map_err(|e| storage("backup list", e))? {
            live.extend(r.manifest.chunks.iter().flatten().copied());
        }
        let report = store
            .gc_locked(&lock, &live, grace)
            .map_err(|e| storage("gc", e));
        // The next quota check counts the store again.
        self.lock_usage()?.remove(user);
        report
    }

    /// Drops all but the newest `keep` backups of `user`, then collects the user's store
    /// (keeping chunks younger than [`UPLOAD_GRACE`]). Returns the sequence numbers
    /// dropped and the collection's report.
    pub fn prune_to(
        &self,
        user: &str,
        keep: usize,
    ) -> Result<(Vec<u64>, tandem_store::GcReport), ApiError> {
        if keep == 0 {
            return Err(ApiError::BadRequest(
                "keep at least one backup (--keep 1 or more)".into(),
            ));
        }
        let dropped: Vec<u64> = {
            let _commit = self
                .commit
                .lock()
                .map_err(|_| storage("backup lock", "poisoned"))?;
            let all = self.list(user).map_err(|e| storage("backup list", e))?;
            let n = all.len().saturating_sub(keep);
            let dropped: Vec<u64> = all[..n].iter().map(|r| r.seq).collect();
            for seq in &dropped {
                let p = self.user_dir(user).join(record_name(*seq));
                std::fs::remove_file(&p).map_err(|e| storage("backup prune", e))?;
            }
            dropped
        };
        let report = self.collect(user, UPLOAD_GRACE)?;
        Ok((dropped, report))
    }

    /// Reads chunk `id` of `user`'s backup `seq`, refused unless that backup names it.
    pub fn read_chunk(&self, user: &str, seq: u64, id: ChunkId) -> Result<Vec<u8>, ApiError> {
        let record = self.record(user, seq)?;
        if !record.manifest.chunks.iter().flatten().any(|c| *c == id) {
            return Err(ApiError::Forbidden {
                code: "not_in_backup",
                message: format!("chunk {id} is not part of backup {seq}"),
            });
        }
        let store = self.user_store(user)?;
        if store
            .contains_many(&[id])
            .map_err(|e| storage("chunk store", e))?
            .first()
            .copied()
            .unwrap_or(false)
        {
            return store.get(id).map_err(|e| storage("chunk read", e));
        }
        // A backup committed before per-user stores.
        self.shared.get(id).map_err(|e| storage("chunk read", e))
    }

    fn record(&self, user: &str, seq: u64) -> Result<BackupRecord, ApiError> {
        let path = self.user_dir(user).join(record_name(seq));
        let bytes = std::fs::read(&path)
            .map_err(|_| ApiError::NotFound(format!("user {user} has no backup {seq}")))?;
        serde_json::from_slice(&bytes).map_err(|e| storage("backup record", e))
    }
}

/// Parts a manifest of the largest disk needs at the backup chunk size (64 KiB): 256.
/// A manifest with smaller chunks supports a proportionally smaller disk.
fn max_parts() -> u64 {
    (MAX_DISK / u64::from(tandem_proto::manifest::DEFAULT_CHUNK_SIZE)).div_ceil(PART_CHUNKS as u64)
}

/// Every record in a user's backup directory, oldest first; damaged ones are skipped.
fn read_records(dir: &Path) -> std::io::Result<Vec<BackupRecord>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") || !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        match serde_json::from_slice::<BackupRecord>(&bytes) {
            Ok(r) => out.push(r),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "damaged backup record skipped")
            }
        }
    }
    out.sort_by_key(|r| r.seq);
    Ok(out)
}

/// Removes staged uploads older than [`STAGING_TTL`].
fn drop_stale_staging(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let horizon = std::time::SystemTime::now() - Duration::from_secs(STAGING_TTL);
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < horizon);
        if old {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Which sequence numbers retention drops from `all` (oldest first) at time `now`.
pub fn prune(all: &[BackupRecord], now: u64) -> Vec<u64> {
    let mut keep: HashSet<u64> = all.iter().rev().take(KEEP_LAST).map(|r| r.seq).collect();
    let mut newest_per_day: BTreeMap<u64, u64> = BTreeMap::new();
    for r in all {
        let day = r.committed_at / 86_400;
        if now.saturating_sub(r.committed_at) <= KEEP_DAYS * 86_400 {
            newest_per_day.insert(day, r.seq);
        }
    }
    keep.extend(newest_per_day.values());
    all.iter()
        .map(|r| r.seq)
        .filter(|s| !keep.contains(s))
        .collect()
}

/// The state backup handlers need.
#[derive(Clone)]
pub struct BackupState {
    /// Fleet state (database, audit).
    pub app: AppState,
    /// Backup storage.
    pub svc: Arc<BackupService>,
}

fn device_of(c: Caller) -> Result<(DeviceId, String), ApiError> {
    match c {
        Caller::Device { id, user } => Ok((id, user)),
        Caller::Admin { .. } => Err(ApiError::Forbidden {
            code: "devices_only",
            message: "only an enrolled device backs up or restores its user's disk".into(),
        }),
    }
}

/// The backup, escrow and re-provisioning routes; mount behind authentication. Each route
/// has an explicit body limit: nothing here needs more than one manifest part or chunk.
pub fn routes(state: BackupState) -> Router {
    let chunk_limit = DefaultBodyLimit::max(tandem_store::MAX_CHUNK_LEN + 1);
    Router::new()
        .route("/v1/backups", post(upload))
        .route("/v1/backups/latest", get(latest))
        .route("/v1/backups/latest/head", get(latest_head))
        .route("/v1/backups/chunks/missing", post(missing))
        .route("/v1/backups/chunks/{id}", put(put_chunk).layer(chunk_limit))
        .route("/v1/backups/staged/{upload}/{index}", put(stage))
        .route("/v1/backups/{seq}/parts/{index}", get(read_part))
        .route("/v1/backups/{seq}/chunks/{id}", get(chunk))
        .route("/v1/escrow", get(get_escrow).put(put_escrow))
        .route("/v1/admin/backups/{who}", get(admin_list))
        .route("/v1/admin/backups/{who}/prune", post(admin_prune))
        .route("/v1/admin/devices/{old}/replace", post(replace))
        .layer(DefaultBodyLimit::max(MAX_PART_BODY))
        .with_state(state)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| storage("backup task", e))?
}

async fn upload(
    State(st): State<BackupState>,
    c: Caller,
    body: Bytes,
) -> Result<Json<BackupInfo>, ApiError> {
    let (device, user) = device_of(c)?;
    let up: BackupUpload = parse_json(&body, MAX_PART_BODY)?;
    let svc = st.svc.clone();
    let u = user.clone();
    let record = blocking(move || svc.commit(&u, &device.to_string(), up)).await?;
    let info = BackupInfo::from(&record);
    audit(
        &st.app,
        &format!("device:{device}"),
        "backup.committed",
        Some(device),
        None,
        serde_json::json!({"user": user, "seq": info.seq, "size": info.size, "data_chunks": info.data_chunks}),
    )
    .await;
    Ok(Json(info))
}

async fn missing(
    State(st): State<BackupState>,
    c: Caller,
    body: Bytes,
) -> Result<Json<ChunkList>, ApiError> {
    let (_, user) = device_of(c)?;
    let req: ChunkList = parse_json(&body, MAX_PART_BODY)?;
    if req.chunks.len() > MAX_CHUNKS_PER_REQUEST {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_CHUNKS_PER_REQUEST} chunks per request"
        )));
    }
    let svc = st.svc.clone();
    let chunks = blocking(move || svc.missing(&user, &req.chunks)).await?;
    Ok(Json(ChunkList { chunks }))
}

async fn put_chunk(
    State(st): State<BackupState>,
    c: Caller,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let (device, user) = device_of(c)?;
    let id: ChunkId = id
        .parse()
        .map_err(|e| ApiError::BadRequest(format!("chunk id: {e}")))?;
    let quota = quota_of(&st, &user).await?;
    let svc = st.svc.clone();
    let u = user.clone();
    let result = blocking(move || svc.put_chunk(&u, id, body.to_vec(), quota)).await;
    if let Err(ApiError::Forbidden {
        code: "backup_quota_exceeded",
        ..
    }) = &result
    {
        tracing::warn!(%device, user, quota_mb = quota.0, "backup upload refused: quota");
        crate::auth::audit_limited(
            &st.app,
            &device.to_string(),
            &format!("device:{device}"),
            "backup.quota-exceeded",
            Some(device),
            serde_json::json!({
                "user": user,
                "quota_mb": quota.0,
                "stored_mb": st.svc.stored_bytes(&user).unwrap_or(0).div_ceil(1 << 20),
            }),
        )
        .await;
    }
    result?;
    Ok(StatusCode::NO_CONTENT)
}

/// `user`'s backup quota, from their policy (cached for a minute).
async fn quota_of(st: &BackupState, user: &str) -> Result<QuotaMb, ApiError> {
    if let Some(q) = st.svc.cached_quota(user) {
        return Ok(q);
    }
    let (_, policy_json) = st
        .app
        .db
        .user_with_policy(user)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("user {user} not found")))?;
    let policy: tandem_proto::fleet::Policy =
        serde_json::from_str(&policy_json).map_err(|source| {
            ApiError::Internal(InternalError::Stored {
                what: "policy",
                source,
            })
        })?;
    let q = QuotaMb(policy.backup_quota_mb);
    st.svc.remember_quota(user, q);
    Ok(q)
}

async fn stage(
    State(st): State<BackupState>,
    c: Caller,
    UrlPath((upload, index)): UrlPath<(String, u32)>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let (_, user) = device_of(c)?;
    let part: ManifestPart = parse_json(&body, MAX_PART_BODY)?;
    let svc = st.svc.clone();
    blocking(move || svc.stage(&user, &upload, index, &part)).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn latest_record(svc: &BackupService, user: &str) -> Result<BackupRecord, ApiError> {
    let list = svc.list(user).map_err(|e| storage("backup list", e))?;
    list.into_iter()
        .last()
        .ok_or_else(|| ApiError::NotFound(format!("user {user} has no backup yet")))
}

async fn latest(State(st): State<BackupState>, c: Caller) -> Result<Json<BackupRecord>, ApiError> {
    let (_, user) = device_of(c)?;
    let svc = st.svc.clone();
    Ok(Json(blocking(move || latest_record(&svc, &user)).await?))
}

async fn latest_head(
    State(st): State<BackupState>,
    c: Caller,
) -> Result<Json<BackupHead>, ApiError> {
    let (_, user) = device_of(c)?;
    let svc = st.svc.clone();
    let r = blocking(move || latest_record(&svc, &user)).await?;
    let chunks = r.manifest.chunks.len() as u64;
    Ok(Json(BackupHead {
        seq: r.seq,
        size: r.manifest.size,
        chunk_size: r.manifest.chunk_size,
        chunks,
        parts: u32::try_from(chunks.div_ceil(PART_CHUNKS as u64)).unwrap_or(u32::MAX),
    }))
}

async fn read_part(
    State(st): State<BackupState>,
    c: Caller,
    UrlPath((seq, index)): UrlPath<(u64, u32)>,
) -> Result<Json<ManifestPart>, ApiError> {
    let (_, user) = device_of(c)?;
    let svc = st.svc.clone();
    let r = blocking(move || svc.record(&user, seq)).await?;
    let start = index as usize * PART_CHUNKS;
    if start >= r.manifest.chunks.len() && !(index == 0 && r.manifest.chunks.is_empty()) {
        return Err(ApiError::NotFound(format!(
            "backup {seq} has no part {index}"
        )));
    }
    let end = (start + PART_CHUNKS).min(r.manifest.chunks.len());
    Ok(Json(ManifestPart {
        chunks: r.manifest.chunks[start..end].to_vec(),
    }))
}

async fn chunk(
    State(st): State<BackupState>,
    c: Caller,
    UrlPath((seq, id)): UrlPath<(u64, String)>,
) -> Result<Vec<u8>, ApiError> {
    let (_, user) = device_of(c)?;
    let id: ChunkId = id
        .parse()
        .map_err(|e| ApiError::BadRequest(format!("chunk id: {e}")))?;
    let svc = st.svc.clone();
    blocking(move || svc.read_chunk(&user, seq, id)).await
}

async fn put_escrow(
    State(st): State<BackupState>,
    c: Caller,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let (device, user) = device_of(c)?;
    let e: Escrow = parse_json(&body, 4096)?;
    let svc = st.svc.clone();
    let u = user.clone();
    let stored = blocking(move || Ok(svc.escrow.put(&u, &e.key)?)).await?;
    if stored {
        audit(
            &st.app,
            &format!("device:{device}"),
            "key.escrowed",
            Some(device),
            None,
            serde_json::json!({"user": user}),
        )
        .await;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn get_escrow(State(st): State<BackupState>, c: Caller) -> Result<Json<Escrow>, ApiError> {
    let (device, user) = device_of(c)?;
    let svc = st.svc.clone();
    let u = user.clone();
    let key = blocking(move || Ok(svc.escrow.get(&u)?)).await?;
    audit(
        &st.app,
        &format!("device:{device}"),
        "key.released",
        Some(device),
        None,
        serde_json::json!({"user": user}),
    )
    .await;
    Ok(Json(Escrow { key }))
}

/// `GET /v1/admin/backups/{who}`: a user's (or a device's user's) backups, oldest first.
pub async fn admin_list(
    State(st): State<BackupState>,
    Admin(_): Admin,
    UrlPath(who): UrlPath<String>,
) -> Result<Json<Vec<BackupInfo>>, ApiError> {
    let user = match who.parse::<DeviceId>() {
        Ok(id) => st
            .app
            .db
            .device(id)
            .await?
            .map(|d| d.user)
            .ok_or_else(|| ApiError::NotFound(format!("device {id} not found")))?,
        Err(_) => who,
    };
    let list = st.svc.list(&user).map_err(|e| storage("backup list", e))?;
    Ok(Json(list.iter().map(BackupInfo::from).collect()))
}

/// `POST /v1/admin/backups/{who}/prune`: drops all but a user's newest backups and
/// collects the user's store (to get under a quota).
pub async fn admin_prune(
    State(st): State<BackupState>,
    Admin(admin): Admin,
    UrlPath(who): UrlPath<String>,
    body: Bytes,
) -> Result<Json<tandem_proto::backup::PruneReport>, ApiError> {
    let req: tandem_proto::backup::PruneRequest = parse_json(&body, 4096)?;
    if req.reason.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "pruning backups needs a reason (--reason)".into(),
        ));
    }
    let user = match who.parse::<DeviceId>() {
        Ok(id) => st
            .app
            .db
            .device(id)
            .await?
            .map(|d| d.user)
            .ok_or_else(|| ApiError::NotFound(format!("device {id} not found")))?,
        Err(_) => who,
    };
    if st.app.db.user(&user).await?.is_none() {
        return Err(ApiError::NotFound(format!("user {user} not found")));
    }
    let svc = st.svc.clone();
    let u = user.clone();
    let keep = req.keep as usize;
    let (dropped, gc) = blocking(move || svc.prune_to(&u, keep)).await?;
    let svc = st.svc.clone();
    let u = user.clone();
    let stored_bytes = blocking(move || svc.stored_bytes(&u)).await?;
    audit(
        &st.app,
        &format!("admin:{admin}"),
        "backups.pruned",
        None,
        Some(req.reason),
        serde_json::json!({"user": user, "keep": req.keep, "dropped": dropped, "bytes_freed": gc.bytes_freed}),
    )
    .await;
    Ok(Json(tandem_proto::backup::PruneReport {
        user,
        dropped,
        bytes_freed: gc.bytes_freed,
        stored_bytes,
    }))
}

/// `POST /v1/admin/devices/{old}/replace`: kill `old`, re-provision its user on the new device.
pub async fn replace(
    State(st): State<BackupState>,
    Admin(admin): Admin,
    UrlPath(old): UrlPath<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: ReplaceRequest = parse_json(&body, 4096)?;
    if req.reason.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "a replacement needs a reason (--reason)".into(),
        ));
    }
    let parse = |s: &str| {
        s.parse::<DeviceId>()
            .map_err(|_| ApiError::BadRequest(format!("malformed device id {s:?}")))
    };
    let (old_id, new_id) = (parse(&old)?, parse(&req.new)?);
    let old_row = st
        .app
        .db
        .device(old_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("device {old_id} not found")))?;
    let new_row = st.app.db.device(new_id).await?.ok_or_else(|| {
        ApiError::NotFound(format!(
            "device {new_id} not found; enroll it for user {} first",
            old_row.user
        ))
    })?;
    if new_row.user != old_row.user {
        return Err(ApiError::Conflict(format!(
            "device {new_id} is enrolled for {}, not {}; enroll it with a token for {}",
            new_row.user, old_row.user, old_row.user
        )));
    }
    if new_row.status != DeviceStatus::Active {
        return Err(ApiError::Conflict(format!("device {new_id} is not active")));
    }
    let actor = format!("admin:{admin}");
    if old_row.status == DeviceStatus::Active {
        st.app
            .db
            .order_kill(old_id, &actor, &req.reason, now())
            .await?;
        audit(
            &st.app,
            &actor,
            "device.kill-ordered",
            Some(old_id),
            Some(req.reason.clone()),
            serde_json::json!({"replaced_by": new_id.to_string()}),
        )
        .await;
    }
    let latest = st
        .svc
        .list(&old_row.user)
        .map_err(|e| storage("backup list", e))?
        .last()
        .map(|r| r.seq);
    audit(&st.app, &actor, "device.replaced", Some(new_id), Some(req.reason), serde_json::json!({"old": old_id.to_string(), "user": old_row.user, "latest_backup": latest})).await;
    Ok(Json(serde_json::json!({
        "old": old_id.to_string(),
        "new": new_id.to_string(),
        "user": old_row.user,
        "old_status": "kill-pending",
        "latest_backup": latest,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, at: u64) -> BackupRecord {
        BackupRecord {
            user: "u".into(),
            seq,
            device: "d".into(),
            taken_at: at,
            committed_at: at,
            manifest: tandem_proto::manifest::Manifest {
                format: 1,
                name: "backup".into(),
                version: seq,
                size: 0,
                chunk_size: 65536,
                chunks: vec![],
            },
        }
    }

    fn upload_of(chunks: Vec<Option<ChunkId>>) -> BackupUpload {
        BackupUpload {
            manifest: tandem_proto::manifest::Manifest {
                format: 1,
                name: "backup".into(),
                version: 1,
                size: chunks.len() as u64 * 65536,
                chunk_size: 65536,
                chunks,
            },
            taken_at: 1,
            staged: None,
        }
    }

    fn service(dir: &Path) -> (Arc<BackupService>, Arc<Store>) {
        let shared = Arc::new(Store::open(&dir.join("store")).expect("store"));
        let vault = crate::keys::EscrowVault::open(dir, &dir.join("escrow.key")).expect("vault");
        (BackupService::new(dir, shared.clone(), vault), shared)
    }

    fn data(i: u8) -> (ChunkId, Vec<u8>) {
        let d = vec![i; 65536];
        (ChunkId::of(&d), d)
    }

    #[test]
    fn a_backup_with_missing_chunks_never_becomes_latest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (svc, _) = service(dir.path());
        let (id, d) = data(7);
        svc.put_chunk("alice", id, d, QuotaMb::NONE).expect("put");
        let first = svc
            .commit("alice", "d1", upload_of(vec![Some(id), None]))
            .expect("complete backup commits");
        assert_eq!(first.seq, 1);
        // Power lost mid-upload: the manifest names a chunk the server never received.
        let lost = ChunkId::of(b"never uploaded");
        let err = svc
            .commit("alice", "d1", upload_of(vec![Some(id), Some(lost)]))
            .expect_err("incomplete backup refused");
        assert!(matches!(err, ApiError::Conflict(_)), "{err}");
        let list = svc.list("alice").expect("list");
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].seq, 1);
        // Backups are per user: bob sees none of alice's.
        assert!(svc.list("bob").expect("list").is_empty());
        // The user store lives under the backups directory, which live_chunks walks.
        assert!(BackupService::live_chunks(dir.path())
            .expect("live")
            .contains(&id));
        // Content that does not hash to its id is refused.
        let (other, _) = data(8);
        assert!(matches!(
            svc.put_chunk("alice", other, vec![7u8; 65536], QuotaMb::NONE),
            Err(ApiError::BadRequest(_))
        ));
    }

    /// Issue 12, must-fix 4: naming a chunk id in one's own backup must not make the server
    /// hand out a chunk the user never uploaded — another user's backup data, or an image
    /// chunk in the shared store.
    #[test]
    fn chunks_cannot_be_laundered_through_ones_own_backup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (svc, shared) = service(dir.path());
        let (secret, sd) = data(1);
        svc.put_chunk("alice", secret, sd, QuotaMb::NONE)
            .expect("alice uploads");
        svc.commit("alice", "da", upload_of(vec![Some(secret)]))
            .expect("alice's backup");
        let (image, idata) = data(2);
        shared
            .put_many(vec![(image, tandem_store::Payload::Raw(idata))])
            .expect("an image chunk in the shared store");
        // Bob's dedup query says "missing" for both: no hint that anyone holds them.
        assert_eq!(
            svc.missing("bob", &[secret, image]).expect("missing"),
            vec![secret, image]
        );
        assert_eq!(svc.missing("alice", &[secret]).expect("missing"), vec![]);
        // Bob's backup naming them is refused, so nothing is there to read back.
        for id in [secret, image] {
            let e = svc
                .commit("bob", "db", upload_of(vec![Some(id)]))
                .expect_err("laundering refused");
            assert!(matches!(e, ApiError::Conflict(_)), "{e}");
        }
        assert!(svc.list("bob").expect("list").is_empty());
        assert!(matches!(
            svc.read_chunk("bob", 1, secret),
            Err(ApiError::NotFound(_))
        ));
        // Alice reads her own chunk back.
        assert_eq!(
            svc.read_chunk("alice", 1, secret).expect("read").len(),
            65536
        );
    }

    /// Issue 12, must-fix 7: a GC that runs between a commit's completeness check and its
    /// record write must not delete the chunks the record names.
    #[test]
    fn gc_racing_a_commit_never_leaves_a_backup_without_its_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (svc, _) = service(dir.path());
        let (id, d) = data(3);
        svc.put_chunk("alice", id, d, QuotaMb::NONE).expect("put");
        let store = svc.user_store("alice").expect("store");
        // GC in the middle of the commit, with the live set as it is then (no record names
        // the chunk yet), and no grace: the old code deleted the chunk here.
        let mut gc_result = None;
        let rec = svc
            .commit_with("alice", "d1", upload_of(vec![Some(id)]), || {
                gc_result = Some(store.gc(&HashSet::new(), Duration::ZERO));
            })
            .expect("commit");
        assert!(
            matches!(gc_result, Some(Err(tandem_store::StoreError::InUse { .. }))),
            "GC must wait for the commit: {gc_result:?}"
        );
        assert_eq!(store.contains_many(&[id]).expect("contains"), vec![true]);
        assert_eq!(
            svc.read_chunk("alice", rec.seq, id).expect("read").len(),
            65536
        );

        // The other order: GC holds its lock first and marks; a commit that starts then
        // waits for the sweep, and either sees the chunk or is refused — never a record
        // naming a swept chunk.
        let (id2, d2) = data(4);
        svc.put_chunk("alice", id2, d2, QuotaMb::NONE).expect("put");
        let lock = store.gc_lock().expect("gc lock");
        let live: HashSet<ChunkId> = svc
            .list("alice")
            .expect("list")
            .iter()
            .flat_map(|r| r.manifest.chunks.iter().flatten().copied())
            .collect();
        let racing = {
            let svc = svc.clone();
            std::thread::spawn(move || svc.commit("alice", "d1", upload_of(vec![Some(id2)])))
        };
        store
            .gc_locked(&lock, &live, Duration::ZERO)
            .expect("sweep");
        drop(lock);
        let outcome = racing.join().expect("commit thread");
        assert!(matches!(outcome, Err(ApiError::Conflict(_))), "{outcome:?}");
        for r in svc.list("alice").expect("list") {
            let ids: Vec<ChunkId> = r.manifest.chunks.iter().flatten().copied().collect();
            assert!(
                store
                    .contains_many(&ids)
                    .expect("contains")
                    .iter()
                    .all(|h| *h),
                "backup {} names a swept chunk",
                r.seq
            );
        }
    }

    /// Issue 12, must-fix 5: a manifest larger than any one request travels in parts.
    #[test]
    fn a_large_manifest_commits_from_staged_parts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (svc, _) = service(dir.path());
        let (id, d) = data(5);
        svc.put_chunk("alice", id, d, QuotaMb::NONE).expect("put");
        let n = PART_CHUNKS * 2 + 10;
        let chunks: Vec<Option<ChunkId>> = (0..n).map(|i| (i % 3 != 0).then_some(id)).collect();
        let upload = "0123456789abcdef0123456789abcdef";
        for (i, part) in chunks.chunks(PART_CHUNKS).enumerate() {
            svc.stage(
                "alice",
                upload,
                i as u32,
                &ManifestPart {
                    chunks: part.to_vec(),
                },
            )
            .expect("stage");
        }
        let mut up = upload_of(Vec::new());
        up.manifest.size = n as u64 * 65536;
        up.staged = Some(tandem_proto::backup::StagedManifest {
            upload: upload.into(),
            parts: 3,
        });
        // Another user cannot commit alice's staged upload.
        assert!(matches!(
            svc.commit("bob", "db", up.clone()),
            Err(ApiError::Conflict(_))
        ));
        let rec = svc.commit("alice", "da", up).expect("commit");
        assert_eq!(rec.manifest.chunks, chunks);
        assert!(!svc.user_dir("alice").join("staging").join(upload).exists());
        // A bad upload id, an oversized part and a part beyond the largest disk are
        // refused, and a device cannot park more than a few unfinished uploads.
        let part = ManifestPart { chunks: vec![None] };
        assert!(svc.stage("alice", "../x", 0, &part).is_err());
        assert!(svc.stage("alice", upload, 256, &part).is_err());
        for i in 0..MAX_STAGED_UPLOADS {
            svc.stage("alice", &format!("{i:032x}"), 0, &part)
                .expect("a few unfinished uploads");
        }
        assert!(matches!(
            svc.stage("alice", &format!("{:032x}", 99), 0, &part),
            Err(ApiError::Conflict(_))
        ));
        let big = ManifestPart {
            chunks: vec![None; PART_CHUNKS + 1],
        };
        assert!(svc.stage("alice", upload, 0, &big).is_err());
    }

    /// Should-fix "per-user storage quotas on uploads": a chunk that would take the
    /// user's store past the quota is refused with a clear 403; chunks already stored
    /// still dedup; another user is unaffected; freeing space (retention or an admin
    /// prune) makes room again.
    #[test]
    fn backup_quota_refuses_uploads_past_it_per_user_and_pruning_makes_room() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (svc, _) = service(dir.path());
        // Incompressible chunks (LUKS ciphertext is): 64 KiB stored each.
        let chunk = |seed: u8| {
            let mut d = vec![0u8; 65536];
            let mut x = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
            for b in &mut d {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            (ChunkId::of(&d), d)
        };
        let one_mib = QuotaMb(1);
        let mut ids = Vec::new();
        let refused = loop {
            let (id, d) = chunk(ids.len() as u8);
            match svc.put_chunk("alice", id, d, one_mib) {
                Ok(()) => ids.push(id),
                Err(e) => break e,
            }
            assert!(
                ids.len() <= 16,
                "a 1 MiB quota holds at most 16 chunks of 64 KiB"
            );
        };
        assert!(ids.len() >= 14, "only {} chunks fit", ids.len());
        match &refused {
            ApiError::Forbidden { code, message } => {
                assert_eq!(*code, "backup_quota_exceeded");
                assert!(
                    message.contains("backup quota of 1 MiB for user alice exceeded"),
                    "{message}"
                );
                assert!(message.contains("raise it") && message.contains("prune"));
            }
            other => panic!("expected a quota refusal, got {other:?}"),
        }
        assert!(svc.stored_bytes("alice").expect("usage") <= 1 << 20);
        // A chunk alice already has costs nothing: accepted at the quota.
        let (id0, d0) = chunk(0);
        svc.put_chunk("alice", id0, d0, one_mib)
            .expect("dedup is free");
        // Bob, with the same quota, is unaffected; no quota is no limit.
        let (b, bd) = chunk(200);
        svc.put_chunk("bob", b, bd, one_mib).expect("bob has room");
        let (big, bigd) = chunk(201);
        svc.put_chunk("alice", big, bigd, QuotaMb::NONE)
            .expect("no quota");
        // Commits are not refused (they add no bytes, and run retention).
        for (i, id) in ids.iter().enumerate() {
            let mut up = upload_of(vec![Some(*id)]);
            up.taken_at = i as u64;
            svc.commit("alice", "da", up).expect("commit at the quota");
        }
        // Retention keeps 7 of alice's backups; an admin prune to the newest 2 (grace
        // aside, tested through collect) frees the rest, and uploads fit again.
        assert_eq!(svc.list("alice").expect("list").len(), KEEP_LAST);
        let (dropped, _) = svc.prune_to("alice", 2).expect("prune");
        assert_eq!(dropped.len(), KEEP_LAST - 2);
        assert!(svc.prune_to("alice", 0).is_err(), "keep at least one");
        svc.collect("alice", Duration::ZERO).expect("collect");
        assert!(svc.stored_bytes("alice").expect("usage") <= 3 * 65_600);
        let (next, nd) = chunk(100);
        svc.put_chunk("alice", next, nd, one_mib)
            .expect("room again after pruning");
        assert_eq!(svc.list("alice").expect("list").len(), 2);
    }

    #[test]
    fn retention_keeps_recent_and_one_per_day() {
        let day = 86_400;
        let now = 100 * day;
        // Ten backups today, then one a day for 40 days before.
        let mut all: Vec<BackupRecord> = (1..=40).map(|i| rec(i, now - (41 - i) * day)).collect();
        all.extend((41..=50).map(|i| rec(i, now - 50 + i)));
        let dropped = prune(&all, now);
        // The newest seven are kept.
        for s in 44..=50 {
            assert!(!dropped.contains(&s));
        }
        // Today's older ones go (except the newest of the day, already kept).
        assert!(dropped.contains(&41));
        // Daily ones within 30 days stay; older ones go.
        assert!(!dropped.contains(&35));
        assert!(dropped.contains(&2));
    }
}
