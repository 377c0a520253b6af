//! Backing up the corporate user disk to the server, escrowing its key, and restoring
//! both onto a replacement device.
//!
//! A backup reads a point-in-time copy of the disk file (the caller makes it: VM off, or
//! paused while copied) in 64 KiB chunks, asks the server which chunks it lacks, uploads
//! only those (the server checks each against its id), then commits the manifest. The
//! server commits only when every chunk is present, so a backup cut short by power loss
//! or a dead link never becomes the latest. Restore fetches the latest backup's chunks,
//! verifies each against its id, writes them into a temporary file and renames it into
//! place only when complete.
//!
//! What travels is the encrypted qcow2 file (LUKS inside): the server stores ciphertext.
//!
//! Chunks go to the user's own namespace on the server (`/v1/backups/chunks/…`): the dedup
//! query answers only about this user's earlier uploads. The manifest's chunk list travels
//! in parts of [`PART_CHUNKS`] entries (staged, then committed by name), and is read back
//! the same way, so no request grows with the disk.

use std::collections::HashSet;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use tandem_proto::backup::{
    BackupHead, BackupInfo, BackupUpload, Escrow, ManifestPart, StagedManifest, PART_CHUNKS,
};
use tandem_proto::manifest::{
    ChunkList, Manifest, DEFAULT_CHUNK_SIZE, MANIFEST_FORMAT, MAX_CHUNKS_PER_REQUEST,
};
use tandem_proto::ChunkId;

use crate::client::{self, ClientError};
use crate::identity::{Identity, IdentityError};
use crate::AgentDir;

/// A backup, restore or escrow step failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The device is not enrolled.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Talking to the server failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A local file failed.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The user's backup quota on the server is used up: this backup stopped at its first
    /// refused chunk (nothing more is sent); the scheduler tries again at its next
    /// interval, when IT may have raised the quota or pruned.
    #[error("{0}")]
    Quota(String),
    /// The server sent a chunk whose content does not match its id.
    #[error("backup chunk {0} from the server does not match its id; nothing was restored (retry; report if it persists)")]
    BadChunk(ChunkId),
}

impl BackupError {
    /// Whether retrying later can help (network trouble), as opposed to a permanent error.
    pub fn is_temporary(&self) -> bool {
        matches!(self, BackupError::Client(c) if c.is_temporary())
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a backup did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupReport {
    /// The committed backup.
    pub backup: BackupInfo,
    /// Bytes of the disk file.
    pub disk_bytes: u64,
    /// Distinct chunks holding data.
    pub data_chunks: u64,
    /// Chunks the server lacked and received.
    pub uploaded_chunks: u64,
    /// Bytes sent for them.
    pub uploaded_bytes: u64,
}

/// What a restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    /// The backup restored.
    pub seq: u64,
    /// Bytes written.
    pub disk_bytes: u64,
    /// Chunks downloaded.
    pub chunks: u64,
}

/// A distinct data chunk of a disk file: its id, offset and length.
type DataChunk = (ChunkId, u64, usize);

/// Splits `file` into chunks: the manifest (holes for all-zero chunks) and the distinct
/// data chunks.
fn chunk_file(file: &Path) -> Result<(Manifest, Vec<DataChunk>), BackupError> {
    let mut f = std::fs::File::open(file).map_err(io(file))?;
    let size = f.metadata().map_err(io(file))?.len();
    let cs = DEFAULT_CHUNK_SIZE as usize;
    let mut buf = vec![0u8; cs];
    let mut chunks = Vec::new();
    let mut distinct = Vec::new();
    let mut seen = HashSet::new();
    let mut offset = 0u64;
    while offset < size {
        let len = ((size - offset) as usize).min(cs);
        f.read_exact(&mut buf[..len]).map_err(io(file))?;
        let piece = &buf[..len];
        if piece.iter().all(|b| *b == 0) {
            chunks.push(None);
        } else {
            let id = ChunkId::of(piece);
            if seen.insert(id) {
                distinct.push((id, offset, len));
            }
            chunks.push(Some(id));
        }
        offset += len as u64;
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: "backup".into(),
        version: 1,
        size,
        chunk_size: DEFAULT_CHUNK_SIZE,
        chunks,
    };
    Ok((manifest, distinct))
}

/// Uploads a point-in-time copy `file` of the user disk as the user's next backup.
pub async fn upload(
    dir: &AgentDir,
    file: &Path,
    taken_at: u64,
) -> Result<BackupReport, BackupError> {
    let id = Identity::load(dir)?;
    let http = client::http()?;
    let (manifest, distinct) = {
        let file = file.to_path_buf();
        tokio::task::spawn_blocking(move || chunk_file(&file))
            .await
            .map_err(|e| BackupError::Io {
                path: PathBuf::new(),
                source: std::io::Error::other(e),
            })??
    };
    let mut missing: HashSet<ChunkId> = HashSet::new();
    for batch in distinct.chunks(MAX_CHUNKS_PER_REQUEST) {
        let ask = ChunkList {
            chunks: batch.iter().map(|(c, _, _)| *c).collect(),
        };
        let lacking: ChunkList = client::signed(
            &http,
            &id,
            reqwest::Method::POST,
            "/v1/backups/chunks/missing",
            Some(&ask),
        )
        .await?;
        missing.extend(lacking.chunks);
    }
    let mut f = std::fs::File::open(file).map_err(io(file))?;
    let mut uploaded_bytes = 0u64;
    let mut uploaded_chunks = 0u64;
    for (cid, offset, len) in &distinct {
        if !missing.contains(cid) {
            continue;
        }
        let mut data = vec![0u8; *len];
        f.seek(SeekFrom::Start(*offset)).map_err(io(file))?;
        f.read_exact(&mut data).map_err(io(file))?;
        if ChunkId::of(&data) != *cid {
            // The file changed under us: the copy was not point-in-time.
            return Err(BackupError::Io {
                path: file.to_path_buf(),
                source: std::io::Error::other("the disk copy changed while it was being backed up"),
            });
        }
        uploaded_bytes += data.len() as u64;
        client::signed_bytes(
            &http,
            &id,
            reqwest::Method::PUT,
            &format!("/v1/backups/chunks/{cid}"),
            data,
        )
        .await
        .map_err(|e| match e {
            ClientError::Refused { body, .. } if body.code == "backup_quota_exceeded" => {
                BackupError::Quota(body.message)
            }
            other => other.into(),
        })?;
        uploaded_chunks += 1;
    }
    let disk_bytes = manifest.size;
    let data_chunks = distinct.len() as u64;
    let up = stage_manifest(&http, &id, manifest, taken_at).await?;
    let backup: BackupInfo =
        client::signed(&http, &id, reqwest::Method::POST, "/v1/backups", Some(&up)).await?;
    tracing::info!(
        seq = backup.seq,
        uploaded_chunks,
        uploaded_bytes,
        "backup committed"
    );
    Ok(BackupReport {
        backup,
        disk_bytes,
        data_chunks,
        uploaded_chunks,
        uploaded_bytes,
    })
}

/// Sends the chunk list of `manifest` in parts; returns the commit that names them.
async fn stage_manifest(
    http: &reqwest::Client,
    id: &Identity,
    mut manifest: Manifest,
    taken_at: u64,
) -> Result<BackupUpload, BackupError> {
    let upload = hex::encode(rand::random::<[u8; 16]>());
    let chunks = std::mem::take(&mut manifest.chunks);
    let mut parts = 0u32;
    for (i, part) in chunks.chunks(PART_CHUNKS).enumerate() {
        let body = serde_json::to_vec(&ManifestPart {
            chunks: part.to_vec(),
        })
        .expect("manifest part serializes");
        client::signed_bytes(
            http,
            id,
            reqwest::Method::PUT,
            &format!("/v1/backups/staged/{upload}/{i}"),
            body,
        )
        .await?;
        parts += 1;
    }
    Ok(BackupUpload {
        manifest,
        taken_at,
        staged: Some(StagedManifest { upload, parts }),
    })
}

/// Reads the latest backup's head and chunk list (in parts). `Ok(None)`: no backup yet.
async fn latest_manifest(
    http: &reqwest::Client,
    id: &Identity,
) -> Result<Option<(u64, Manifest)>, BackupError> {
    let head: BackupHead = match client::signed::<(), _>(
        http,
        id,
        reqwest::Method::GET,
        "/v1/backups/latest/head",
        None,
    )
    .await
    {
        Ok(h) => h,
        Err(ClientError::Refused { status: 404, .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut chunks = Vec::with_capacity(usize::try_from(head.chunks).unwrap_or(0));
    for i in 0..head.parts {
        let part: ManifestPart = client::signed::<(), _>(
            http,
            id,
            reqwest::Method::GET,
            &format!("/v1/backups/{}/parts/{i}", head.seq),
            None,
        )
        .await?;
        chunks.extend(part.chunks);
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: "backup".into(),
        version: head.seq,
        size: head.size,
        chunk_size: head.chunk_size,
        chunks,
    };
    manifest.validate().map_err(|e| BackupError::Io {
        path: PathBuf::from("/v1/backups/latest"),
        source: std::io::Error::other(format!("the server's backup manifest is inconsistent: {e}")),
    })?;
    Ok(Some((head.seq, manifest)))
}

/// Restores the user's latest backup into `dest` (atomically). `Ok(None)`: no backup yet.
pub async fn restore_latest(
    dir: &AgentDir,
    dest: &Path,
) -> Result<Option<RestoreReport>, BackupError> {
    let id = Identity::load(dir)?;
    let http = client::http()?;
    let Some((seq, manifest)) = latest_manifest(&http, &id).await? else {
        return Ok(None);
    };
    // Removed by its drop on every early return.
    let mut temp = tandem_tools::atomic::TempFile::beside(dest, tandem_tools::atomic::DEFAULT_MODE)
        .map_err(io(dest))?;
    let tmp = temp.path().to_path_buf();
    let f = temp.file();
    f.set_len(manifest.size).map_err(io(&tmp))?;
    let cs = u64::from(manifest.chunk_size);
    // Where each chunk was first written: a repeat is copied from there, so memory holds
    // one chunk at a time whatever the disk size.
    let mut written: std::collections::HashMap<ChunkId, u64> = std::collections::HashMap::new();
    let mut chunks = 0u64;
    for (i, c) in manifest.chunks.iter().enumerate() {
        let Some(cid) = c else { continue };
        let offset = i as u64 * cs;
        let data = match written.get(cid) {
            Some(first) => {
                let mut data = vec![0u8; manifest.chunk_len(i as u64) as usize];
                f.seek(SeekFrom::Start(*first)).map_err(io(&tmp))?;
                f.read_exact(&mut data).map_err(io(&tmp))?;
                data
            }
            None => {
                let data = client::signed_bytes(
                    &http,
                    &id,
                    reqwest::Method::GET,
                    &format!("/v1/backups/{seq}/chunks/{cid}"),
                    Vec::new(),
                )
                .await?;
                if ChunkId::of(&data) != *cid {
                    return Err(BackupError::BadChunk(*cid));
                }
                chunks += 1;
                written.insert(*cid, offset);
                data
            }
        };
        f.seek(SeekFrom::Start(offset)).map_err(io(&tmp))?;
        f.write_all(&data).map_err(io(&tmp))?;
    }
    temp.persist().map_err(io(dest))?;
    Ok(Some(RestoreReport {
        seq,
        disk_bytes: manifest.size,
        chunks,
    }))
}

/// Escrows the user disk key on the server.
pub async fn escrow_put(dir: &AgentDir, key_base64: &str) -> Result<(), BackupError> {
    let id = Identity::load(dir)?;
    let http = client::http()?;
    let body = serde_json::to_vec(&Escrow {
        key: key_base64.to_string(),
    })
    .expect("escrow serializes");
    client::signed_bytes(&http, &id, reqwest::Method::PUT, "/v1/escrow", body).await?;
    Ok(())
}

/// The escrowed user disk key, if the server holds one for this device's user.
pub async fn escrow_get(dir: &AgentDir) -> Result<Option<String>, BackupError> {
    let id = Identity::load(dir)?;
    let http = client::http()?;
    match client::signed::<(), Escrow>(&http, &id, reqwest::Method::GET, "/v1/escrow", None).await {
        Ok(e) => Ok(Some(e.key)),
        Err(ClientError::Refused { status: 404, .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_makes_holes_of_zeros_and_dedups() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("disk");
        let cs = DEFAULT_CHUNK_SIZE as usize;
        let mut data = vec![0u8; cs * 4 + 100];
        data[..cs].fill(7);
        data[2 * cs..3 * cs].fill(7);
        data[4 * cs..].fill(9);
        std::fs::write(&p, &data).expect("write");
        let (m, distinct) = chunk_file(&p).expect("chunks");
        m.validate().expect("valid manifest");
        assert_eq!(m.chunks.len(), 5);
        assert!(m.chunks[1].is_none() && m.chunks[3].is_none());
        assert_eq!(m.chunks[0], m.chunks[2]);
        assert_eq!(distinct.len(), 2);
        assert_eq!(distinct[1].2, 100);
    }
}
