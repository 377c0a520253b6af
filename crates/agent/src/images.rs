//! Image sync from the agent's side: after a verified target state, pull the assigned
//! corporate and personal versions that are not committed locally yet, through the image
//! sync client (`tandem_sync`) with every request signed by the device key. Manifests are
//! verified against the image key pinned at enrollment. A failed pull is reported and
//! retried at the next check-in; it never blocks the VMs or the lease.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tandem_proto::fleet::{ImageRef, TargetState};

use crate::identity::Identity;
use crate::AgentDir;

/// Signs image-sync requests with the device key.
pub struct DeviceSigner(pub Arc<Identity>);

impl tandem_sync::SignRequest for DeviceSigner {
    fn headers(&self, method: &str, path_and_query: &str, body: &[u8]) -> Vec<(String, String)> {
        self.0
            .sign_request(method, path_and_query, body)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }
}

/// The laptop store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LocalStoreError {
    /// No image-signing key is pinned: the device is neither enrolled nor given a key.
    #[error("no image-signing key is pinned in {0}; enroll with `tandem agent enroll` (or pull once with --image-key)")]
    NoPinnedKey(std::path::PathBuf),
    /// The pinned key file is damaged.
    #[error("the pinned image key {path} is damaged: {why}")]
    DamagedKey {
        /// Key file.
        path: std::path::PathBuf,
        /// Why.
        why: String,
    },
    /// Opening the store failed.
    #[error("opening the laptop store: {0}")]
    Sync(#[from] tandem_sync::SyncError),
}

/// The image-signing key(s) this laptop trusts: the one pinned at enrollment, else the
/// one pinned by an earlier `tandem image pull --image-key` (`keys/image-signing.pub`).
pub fn trusted_keys(dir: &AgentDir) -> Result<Vec<tandem_proto::PublicKey>, LocalStoreError> {
    if let Ok(id) = Identity::load(dir) {
        return Ok(vec![id.info.keys.image.clone()]);
    }
    let path = dir.keys().join("image-signing.pub");
    match std::fs::read_to_string(&path) {
        Ok(text) => tandem_proto::PublicKey::from_base64(text.trim())
            .map(|k| vec![k])
            .map_err(|e| LocalStoreError::DamagedKey {
                path,
                why: e.to_string(),
            }),
        Err(_) => Err(LocalStoreError::NoPinnedKey(dir.root().to_path_buf())),
    }
}

/// Opens the laptop's chunk store and catalog with the pinned image key.
pub fn open_local(dir: &AgentDir) -> Result<tandem_sync::Local, LocalStoreError> {
    let trusted = trusted_keys(dir)?;
    Ok(tandem_sync::Local::open(dir.root(), trusted)?)
}

/// Image versions committed in the local store (reported at check-in).
pub fn held(dir: &AgentDir) -> Vec<ImageRef> {
    let catalog = tandem_sync::Catalog::new(&dir.store().join("catalog"));
    match catalog.list() {
        Ok(list) => list
            .into_iter()
            .flat_map(|iv| {
                iv.versions.into_iter().map(move |version| ImageRef {
                    image: iv.name.clone(),
                    version,
                })
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list local images");
            Vec::new()
        }
    }
}

/// What happened to one assigned version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PullResult {
    /// Which version.
    pub image: ImageRef,
    /// `present`, `pulled`, or `failed`.
    pub outcome: String,
    /// Why it failed.
    pub error: Option<String>,
    /// Bytes received.
    pub bytes: u64,
}

/// Pulls every assigned version not held yet.
pub async fn pull_assigned(
    dir: &AgentDir,
    id: Arc<Identity>,
    target: &TargetState,
) -> Vec<PullResult> {
    let wanted: Vec<ImageRef> = [&target.assignments.corporate, &target.assignments.personal]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let have = held(dir);
    let mut out = Vec::new();
    let mut local = None;
    for r in wanted {
        if have.contains(&r) {
            out.push(PullResult {
                image: r,
                outcome: "present".into(),
                error: None,
                bytes: 0,
            });
            continue;
        }
        let res = async {
            if local.is_none() {
                local = Some(tandem_sync::Local::open(
                    dir.root(),
                    vec![id.info.keys.image.clone()],
                )?);
            }
            let local = local.as_ref().expect("opened just above");
            let client =
                tandem_sync::Client::new(&id.info.server, Arc::new(DeviceSigner(id.clone())));
            tandem_sync::pull(
                &client,
                local,
                &r.image,
                Some(r.version),
                &tandem_sync::PullOptions::default(),
                &tandem_sync::NoProgress,
            )
            .await
        }
        .await;
        out.push(match res {
            Ok(report) => {
                tracing::info!(image = r.image, version = r.version, bytes = report.bytes_received, "pulled assigned image");
                PullResult {
                    image: r,
                    outcome: "pulled".into(),
                    error: None,
                    bytes: report.bytes_received,
                }
            }
            Err(e) => {
                tracing::warn!(image = r.image, version = r.version, error = %e, "pulling assigned image failed; retrying at next check-in");
                PullResult {
                    image: r,
                    outcome: "failed".into(),
                    error: Some(e.to_string()),
                    bytes: 0,
                }
            }
        });
    }
    out
}
