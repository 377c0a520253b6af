//! Backups of users' corporate disks, key escrow, and re-provisioning onto a new device.
//!
//! Layout under the data directory (user names are hex-encoded into file names):
//!
//! | path | what |
//! |---|---|
//! | `backups/<hex user>/<seq, 20 digits>.json` | one committed [`BackupRecord`] |
//! | `escrow/<hex user>.key` | the user disk key (base64), 0600 |
//!
//! Chunks live in the shared chunk store (single-instance across users and images); a
//! device reads back only chunks named by its own user's backups. A backup is committed
//! — written atomically, numbered, and visible as "latest" — only after the server checked
//! that every chunk it names is stored, so a device that loses power mid-upload leaves the
//! previous backup as the latest. Retention keeps the newest [`KEEP_LAST`] backups plus the
//! newest of each day for [`KEEP_DAYS`] days.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use tandem_proto::backup::{BackupInfo, BackupRecord, BackupUpload, Escrow, ReplaceRequest};
use tandem_proto::fleet::{DeviceId, DeviceStatus};
use tandem_proto::ChunkId;
use tandem_store::Store;

use crate::auth::{Admin, Caller};
use crate::error::{parse_json, ApiError, InternalError};
use crate::fsutil::write_atomic;
use crate::{audit, now, AppState};

/// Backups always kept, newest first.
pub const KEEP_LAST: usize = 7;
/// Days for which the newest backup of each day is kept.
pub const KEEP_DAYS: u64 = 30;
/// Largest manifest body accepted (a 1 TiB disk in 64 KiB chunks is ~1.1 GB of ids; we
/// cap user disks far lower).
const MAX_UPLOAD: usize = 32 << 20;
/// Largest user disk accepted.
const MAX_DISK: u64 = 256 << 30;

/// Stores and serves backups; shares the chunk store with the image service.
pub struct BackupService {
    store: Arc<Store>,
    root: PathBuf,
    escrow: PathBuf,
    commit: Mutex<()>,
}

fn storage(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(InternalError::Storage(format!("{what}: {e}")))
}

fn user_dir_name(user: &str) -> String {
    hex::encode(user.as_bytes())
}

impl BackupService {
    /// Opens the backup area of `data_dir`, sharing `store` with the image service.
    pub fn new(data_dir: &Path, store: Arc<Store>) -> Arc<Self> {
        Arc::new(BackupService {
            store,
            root: data_dir.join("backups"),
            escrow: data_dir.join("escrow"),
            commit: Mutex::new(()),
        })
    }

    fn user_dir(&self, user: &str) -> PathBuf {
        self.root.join(user_dir_name(user))
    }

    /// Every committed backup of `user`, oldest first.
    pub fn list(&self, user: &str) -> std::io::Result<Vec<BackupRecord>> {
        let dir = self.user_dir(user);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
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

    /// Chunks referenced by any backup: live for the store's garbage collection.
    pub fn live_chunks(data_dir: &Path) -> std::io::Result<HashSet<ChunkId>> {
        let root = data_dir.join("backups");
        let mut live = HashSet::new();
        let users = match std::fs::read_dir(&root) {
            Ok(u) => u,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(live),
            Err(e) => return Err(e),
        };
        for user in users.flatten() {
            for entry in std::fs::read_dir(user.path())?.flatten() {
                let bytes = std::fs::read(entry.path())?;
                if let Ok(r) = serde_json::from_slice::<BackupRecord>(&bytes) {
                    live.extend(r.manifest.chunks.iter().flatten().copied());
                }
            }
        }
        Ok(live)
    }

    fn commit(&self, user: &str, device: &str, up: BackupUpload) -> Result<BackupRecord, ApiError> {
        let mut manifest = up.manifest;
        manifest
            .validate()
            .map_err(|e| ApiError::BadRequest(format!("backup manifest: {e}")))?;
        if manifest.size > MAX_DISK {
            return Err(ApiError::BadRequest(format!(
                "backup of {} bytes is larger than the {MAX_DISK}-byte limit",
                manifest.size
            )));
        }
        let ids: Vec<ChunkId> = manifest
            .chunks
            .iter()
            .flatten()
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let have = self
            .store
            .contains_many(&ids)
            .map_err(|e| storage("chunk store", e))?;
        let missing = have.iter().filter(|h| !**h).count();
        if missing > 0 {
            return Err(ApiError::Conflict(format!(
                "{missing} chunks of this backup are not on the server; upload them first (the previous backup stays the latest)"
            )));
        }
        let _guard = self
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
        let path = self.user_dir(user).join(format!("{seq:020}.json"));
        let json = serde_json::to_vec(&record).expect("record serializes");
        write_atomic(&path, &json, 0o600).map_err(|e| storage("backup record", e))?;
        let mut all = existing;
        all.push(record.clone());
        for old in prune(&all, record.committed_at) {
            let p = self.user_dir(user).join(format!("{old:020}.json"));
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(path = %p.display(), error = %e, "could not prune backup");
            }
        }
        Ok(record)
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

/// The backup, escrow and re-provisioning routes; mount behind authentication.
pub fn routes(state: BackupState) -> Router {
    Router::new()
        .route("/v1/backups", post(upload))
        .route("/v1/backups/latest", get(latest))
        .route("/v1/backups/{seq}/chunks/{id}", get(chunk))
        .route("/v1/escrow", get(get_escrow).put(put_escrow))
        .route("/v1/admin/backups/{who}", get(admin_list))
        .route("/v1/admin/devices/{old}/replace", post(replace))
        .with_state(state)
}

async fn upload(
    State(st): State<BackupState>,
    c: Caller,
    body: Bytes,
) -> Result<Json<BackupInfo>, ApiError> {
    let (device, user) = device_of(c)?;
    let up: BackupUpload = parse_json(&body, MAX_UPLOAD)?;
    let svc = st.svc.clone();
    let u = user.clone();
    let record = tokio::task::spawn_blocking(move || svc.commit(&u, &device.to_string(), up))
        .await
        .map_err(|e| storage("backup task", e))??;
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

async fn latest(State(st): State<BackupState>, c: Caller) -> Result<Json<BackupRecord>, ApiError> {
    let (_, user) = device_of(c)?;
    let list = st.svc.list(&user).map_err(|e| storage("backup list", e))?;
    list.into_iter()
        .last()
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("user {user} has no backup yet")))
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
    let list = st.svc.list(&user).map_err(|e| storage("backup list", e))?;
    let record = list
        .into_iter()
        .find(|r| r.seq == seq)
        .ok_or_else(|| ApiError::NotFound(format!("user {user} has no backup {seq}")))?;
    if !record.manifest.chunks.iter().flatten().any(|c| *c == id) {
        return Err(ApiError::Forbidden {
            code: "not_in_backup",
            message: format!("chunk {id} is not part of backup {seq}"),
        });
    }
    let store = st.svc.store.clone();
    tokio::task::spawn_blocking(move || store.get(id))
        .await
        .map_err(|e| storage("chunk task", e))?
        .map_err(|e| storage("chunk read", e))
}

async fn put_escrow(
    State(st): State<BackupState>,
    c: Caller,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let (device, user) = device_of(c)?;
    let e: Escrow = parse_json(&body, 4096)?;
    if e.key.len() != 44 {
        return Err(ApiError::BadRequest(
            "escrowed key must be 32 bytes of base64".into(),
        ));
    }
    let path = st.svc.escrow.join(format!("{}.key", user_dir_name(&user)));
    if let Ok(existing) = std::fs::read_to_string(&path) {
        if existing.trim() == e.key {
            return Ok(StatusCode::NO_CONTENT);
        }
        return Err(ApiError::Conflict(format!(
            "user {user} already has an escrowed disk key; restore it with the existing key"
        )));
    }
    write_atomic(&path, e.key.as_bytes(), 0o600).map_err(|e| storage("escrow", e))?;
    audit(
        &st.app,
        &format!("device:{device}"),
        "key.escrowed",
        Some(device),
        None,
        serde_json::json!({"user": user}),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_escrow(State(st): State<BackupState>, c: Caller) -> Result<Json<Escrow>, ApiError> {
    let (device, user) = device_of(c)?;
    let path = st.svc.escrow.join(format!("{}.key", user_dir_name(&user)));
    let key = std::fs::read_to_string(&path)
        .map_err(|_| ApiError::NotFound(format!("user {user} has no escrowed disk key")))?;
    audit(
        &st.app,
        &format!("device:{device}"),
        "key.released",
        Some(device),
        None,
        serde_json::json!({"user": user}),
    )
    .await;
    Ok(Json(Escrow {
        key: key.trim().to_string(),
    }))
}

async fn admin_list(
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

async fn replace(
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
        }
    }

    #[test]
    fn a_backup_with_missing_chunks_never_becomes_latest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(&dir.path().join("store")).expect("store"));
        let svc = BackupService::new(dir.path(), store.clone());
        let data = vec![7u8; 65536];
        let id = ChunkId::of(&data);
        store
            .put_many(vec![(id, tandem_store::Payload::Raw(data))])
            .expect("put");
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
        assert!(BackupService::live_chunks(dir.path())
            .expect("live")
            .contains(&id));
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
