//! Pull: bring one image version from the server into the laptop's store, verified and
//! committed atomically.
//!
//! Steps: choose the version (asked, or the newest the server offers); fetch its manifest
//! (as a manifest delta against the local base when there is one) and verify it with the
//! pinned image key; apply the version delta from the best local base (the highest
//! complete local version); fetch every chunk still missing in batches; check that the
//! version is complete; then write the manifest into the local catalog. Until that last
//! write nothing refers to the new chunks and every older version stays as it was, so an
//! interrupted or failed pull leaves the laptop bootable, and the next pull continues
//! where this one stopped.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tandem_proto::manifest::{ChunkRequest, Manifest};
use tandem_proto::{ChunkId, PublicKey, Signed};
use tandem_store::{DataKey, ImageReader, Payload, Store};

use crate::catalog::Catalog;
use crate::client::{Client, FetchedChunk};
use crate::{delta, Progress, SyncError};

/// Chunks per fetch request.
const FETCH_BATCH: usize = 512;
/// Chunks per store write while applying a delta or fetching.
const PUT_BATCH: usize = 256;

/// The laptop side: a sealed store, its catalog and the pinned image keys.
#[derive(Debug, Clone)]
pub struct Local {
    /// The chunk store (sealed with `<dir>/keys/store.key`).
    pub store: Arc<Store>,
    /// Verified, committed manifests.
    pub catalog: Catalog,
    /// Image-signing keys pinned at enrollment.
    pub trusted: Vec<PublicKey>,
    incoming: PathBuf,
}

impl Local {
    /// Opens (creating on first use) the laptop store under `dir`.
    pub fn open(dir: &Path, trusted: Vec<PublicKey>) -> Result<Local, SyncError> {
        let key = DataKey::load_or_create(&dir.join("keys").join("store.key"))?;
        let root = dir.join("store");
        let store = Arc::new(Store::open_encrypted(&root, key)?);
        let incoming = root.join("incoming");
        std::fs::create_dir_all(&incoming).map_err(|source| SyncError::Io {
            path: incoming.clone(),
            source,
        })?;
        Ok(Local {
            store,
            catalog: Catalog::new(&root.join("catalog")),
            trusted,
            incoming,
        })
    }

    /// A committed version, re-verified.
    pub fn manifest(&self, name: &str, version: u64) -> Result<(Manifest, Signed), SyncError> {
        self.catalog.load(name, version, &self.trusted)
    }

    /// A reader over a committed version (for NBD and the scanner).
    pub fn reader(&self, name: &str, version: u64) -> Result<ImageReader, SyncError> {
        let (m, _) = self.manifest(name, version)?;
        Ok(ImageReader::open(self.store.clone(), m)?)
    }

    /// Chunk ids of `m` the store does not hold.
    pub fn missing(&self, m: &Manifest) -> Result<Vec<ChunkId>, SyncError> {
        let ids: Vec<ChunkId> = m.chunk_set().into_iter().collect();
        let have = self.store.contains_many(&ids)?;
        Ok(ids
            .into_iter()
            .zip(have)
            .filter(|(_, h)| !h)
            .map(|(id, _)| id)
            .collect())
    }
}

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Only say what would be transferred.
    pub dry_run: bool,
    /// Never use version deltas (fetch whole chunks).
    pub no_delta: bool,
}

/// What a pull did (or, for a dry run, would do).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PullReport {
    /// Image.
    pub name: String,
    /// Version pulled.
    pub version: u64,
    /// Local version used as the delta base.
    pub base: Option<u64>,
    /// `up-to-date`, `delta`, `chunks` or `delta+chunks`.
    pub method: String,
    /// Bytes received for manifests, deltas and chunks.
    pub bytes_received: u64,
    /// Delta bytes received by this run.
    pub delta_bytes: u64,
    /// Chunks built from the delta.
    pub chunks_from_delta: u64,
    /// Chunks fetched whole.
    pub chunks_fetched: u64,
    /// Chunks of the version that were already local.
    pub chunks_present: u64,
    /// Chunks the delta produced wrongly (then fetched whole).
    pub delta_mismatches: u64,
    /// Dry run: bytes the update would move.
    pub estimated_bytes: Option<u64>,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Whether the version is now committed locally.
    pub committed: bool,
}

fn check_identity(m: &Manifest, name: &str, version: u64) -> Result<(), SyncError> {
    if m.name != name || m.version != version {
        return Err(SyncError::WrongManifest {
            want: format!("{name} v{version}"),
            got: format!("{} v{}", m.name, m.version),
        });
    }
    Ok(())
}

/// Verifies a fetched chunk and turns it into a store payload.
pub fn verify_fetched(c: FetchedChunk, max_len: u32) -> Result<(ChunkId, Payload), SyncError> {
    if c.raw_len > max_len {
        return Err(SyncError::BadChunk { id: c.id });
    }
    if c.zstd {
        let plain = tandem_store::decompress(&c.bytes, c.raw_len as usize)
            .map_err(|_| SyncError::BadChunk { id: c.id })?;
        if ChunkId::of(&plain) != c.id {
            return Err(SyncError::BadChunk { id: c.id });
        }
        Ok((
            c.id,
            Payload::Zstd {
                raw_len: c.raw_len,
                bytes: c.bytes,
            },
        ))
    } else {
        if c.bytes.len() != c.raw_len as usize || ChunkId::of(&c.bytes) != c.id {
            return Err(SyncError::BadChunk { id: c.id });
        }
        Ok((c.id, Payload::Raw(c.bytes)))
    }
}

async fn put_batch(store: &Arc<Store>, batch: Vec<(ChunkId, Payload)>) -> Result<(), SyncError> {
    if batch.is_empty() {
        return Ok(());
    }
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.put_many(batch))
        .await
        .expect("store writer task panicked")?;
    Ok(())
}

/// Pulls `name` at `version` (default: newest offered) into `local`.
#[tracing::instrument(skip_all, fields(image = name, server = client.base()))]
pub async fn pull(
    client: &Client,
    local: &Local,
    name: &str,
    version: Option<u64>,
    opts: &PullOptions,
    progress: &dyn Progress,
) -> Result<PullReport, SyncError> {
    tandem_proto::manifest::validate_name(name)?;
    let version = match version {
        Some(v) => v,
        None => *client
            .versions(name)
            .await?
            .last()
            .ok_or_else(|| SyncError::NoSuchImage {
                name: name.to_string(),
            })?,
    };
    let mut report = PullReport {
        name: name.to_string(),
        version,
        dry_run: opts.dry_run,
        ..PullReport::default()
    };

    // Best local base: the highest complete version (below the target when possible).
    let mut local_versions = local.catalog.versions(name)?;
    local_versions.sort_unstable_by_key(|v| (*v < version, *v));
    let mut base: Option<(Manifest, Signed)> = None;
    for v in local_versions
        .iter()
        .rev()
        .copied()
        .filter(|v| *v != version)
    {
        match local.manifest(name, v) {
            Ok((m, s)) if local.missing(&m)?.is_empty() => {
                base = Some((m, s));
                break;
            }
            Ok(_) => tracing::info!(version = v, "local version incomplete; not used as a base"),
            Err(e) => tracing::warn!(version = v, "local manifest unusable: {e}"),
        }
    }
    report.base = base.as_ref().map(|(m, _)| m.version);

    // The target manifest: local if committed, else a manifest delta, else whole.
    let (manifest, signed) = match local.manifest(name, version) {
        Ok(ms) => ms,
        Err(_) => {
            let via_delta = match &base {
                Some((bm, _)) => match client.manifest_delta(name, version, bm.version).await {
                    Ok(d) => match d.apply(bm, &local.trusted) {
                        Ok(ms) => Some(ms),
                        Err(e) => {
                            tracing::warn!(
                                "manifest delta refused, fetching the whole manifest: {e}"
                            );
                            None
                        }
                    },
                    Err(e) => {
                        tracing::info!("no manifest delta: {e}");
                        None
                    }
                },
                None => None,
            };
            match via_delta {
                Some(ms) => ms,
                None => {
                    let s = client.manifest(name, version).await?;
                    let m = Manifest::verify(&s, &local.trusted)?;
                    (m, s)
                }
            }
        }
    };
    check_identity(&manifest, name, version)?;
    let total_chunks = manifest.chunk_set().len() as u64;
    let missing = local.missing(&manifest)?;
    report.chunks_present = total_chunks - missing.len() as u64;

    if missing.is_empty() {
        report.method = "up-to-date".into();
        if !opts.dry_run {
            local.catalog.save(&manifest, &signed)?;
            report.committed = true;
        }
        return Ok(report);
    }

    let use_delta = !opts.no_delta && base.is_some();
    if opts.dry_run {
        let est = if use_delta {
            let (bm, _) = base.as_ref().expect("checked");
            client.delta_size(name, bm.version, version).await.ok()
        } else {
            None
        };
        let est = match est {
            Some(e) => {
                report.method = "delta".into();
                e
            }
            None => {
                report.method = "chunks".into();
                let mut bytes = 0;
                for batch in missing.chunks(tandem_proto::manifest::MAX_CHUNKS_PER_REQUEST) {
                    let st = client
                        .stat_chunks(&ChunkRequest {
                            image: name.to_string(),
                            version,
                            chunks: batch.to_vec(),
                        })
                        .await?;
                    bytes += st.bytes;
                }
                bytes
            }
        };
        report.estimated_bytes = Some(est);
        return Ok(report);
    }

    let mut methods = Vec::new();
    if use_delta {
        let (bm, _) = base.as_ref().expect("checked");
        match apply_delta(client, local, &manifest, bm, progress, &mut report).await {
            Ok(()) => methods.push("delta"),
            Err(e) if matches!(e, SyncError::Delta { .. } | SyncError::Status { .. }) => {
                tracing::warn!("version delta not used, fetching chunks instead: {e}");
            }
            Err(e) => return Err(e),
        }
    }

    let missing = local.missing(&manifest)?;
    if !missing.is_empty() {
        methods.push("chunks");
        fetch_missing(client, local, &manifest, &missing, progress, &mut report).await?;
    }
    let still = local.missing(&manifest)?;
    if !still.is_empty() {
        return Err(SyncError::Incomplete {
            name: name.to_string(),
            version,
            missing: still.len() as u64,
        });
    }
    local.catalog.save(&manifest, &signed)?;
    report.committed = true;
    report.method = methods.join("+");
    tracing::info!(version, bytes = report.bytes_received, "version committed");
    Ok(report)
}

async fn apply_delta(
    client: &Client,
    local: &Local,
    manifest: &Manifest,
    base: &Manifest,
    progress: &dyn Progress,
    report: &mut PullReport,
) -> Result<(), SyncError> {
    let name = &manifest.name;
    let part = local.incoming.join(format!(
        "{name}-{}-{}.delta.part",
        base.version, manifest.version
    ));
    let got = client
        .download_delta(name, base.version, manifest.version, &part, progress)
        .await?;
    report.delta_bytes += got;
    report.bytes_received += got;
    let store = local.store.clone();
    // Copies jump around the old version; a larger cache keeps each old chunk decoded once.
    let old = ImageReader::with_cache(store.clone(), base.clone(), 256 << 20)?;
    let new = manifest.clone();
    let part2 = part.clone();
    let stats = tokio::task::spawn_blocking(move || -> Result<delta::ApplyStats, SyncError> {
        let f = std::fs::File::open(&part2).map_err(|source| SyncError::Io {
            path: part2.clone(),
            source,
        })?;
        let mut r = std::io::BufReader::with_capacity(1 << 20, f);
        // Building chunks and storing them (compress, seal, write) run side by side.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(ChunkId, Payload)>>(2);
        std::thread::scope(|scope| {
            let storer = scope.spawn(|| -> Result<(), SyncError> {
                for batch in rx {
                    store.put_many(batch)?;
                }
                Ok(())
            });
            let mut batch = Vec::new();
            let mut sink = |id: ChunkId, data: Vec<u8>| -> Result<(), SyncError> {
                batch.push((id, Payload::Raw(data)));
                if batch.len() >= PUT_BATCH {
                    tx.send(std::mem::take(&mut batch))
                        .map_err(|_| SyncError::Delta {
                            reason: "chunk writer stopped".into(),
                        })?;
                }
                Ok(())
            };
            let res = delta::apply(&mut r, &old, &new, &mut sink);
            // Keep what was built even when the stream broke later on.
            let _ = tx.send(batch);
            drop(tx);
            let stored = storer.join().expect("chunk writer panicked");
            stored.and(res)
        })
    })
    .await
    .expect("delta apply task panicked");
    // A delta that applied (or that is damaged) is not needed again.
    let _ = std::fs::remove_file(&part);
    let stats = stats?;
    report.chunks_from_delta += stats.built;
    report.delta_mismatches += stats.mismatched.len() as u64;
    Ok(())
}

async fn fetch_missing(
    client: &Client,
    local: &Local,
    manifest: &Manifest,
    missing: &[ChunkId],
    progress: &dyn Progress,
    report: &mut PullReport,
) -> Result<(), SyncError> {
    progress.start("chunks", 0);
    let wanted: HashSet<ChunkId> = missing.iter().copied().collect();
    for batch in missing.chunks(FETCH_BATCH) {
        let req = ChunkRequest {
            image: manifest.name.clone(),
            version: manifest.version,
            chunks: batch.to_vec(),
        };
        let mut pending: Vec<(ChunkId, Payload)> = Vec::new();
        let mut stored = 0u64;
        let max = manifest.chunk_size;
        let store = local.store.clone();
        let flush_every = ((8usize << 20) / max as usize).max(1);
        let got = {
            // Chunks are stored as they arrive (about 8 MiB at a time), so an interrupted
            // pull keeps them and the next one does not fetch them again.
            let mut on_chunk = |c: FetchedChunk| -> Result<(), SyncError> {
                if !wanted.contains(&c.id) {
                    return Err(SyncError::BadChunk { id: c.id });
                }
                pending.push(verify_fetched(c, max)?);
                if pending.len() >= flush_every {
                    stored += pending.len() as u64;
                    store.put_many(std::mem::take(&mut pending))?;
                }
                Ok(())
            };
            client
                .fetch_chunks(&req, max, &mut on_chunk, progress)
                .await
        };
        stored += pending.len() as u64;
        put_batch(&local.store, pending).await?;
        report.chunks_fetched += stored;
        report.bytes_received += got?;
    }
    Ok(())
}
