//! The corporate user disk key on this laptop: unwrapped locally; or, on a new or
//! re-provisioned device, the escrowed key plus the latest backup of the user disk; or,
//! for a brand-new user, a fresh key that is escrowed on the server at once.
//!
//! Re-provisioning is all or nothing. `corporate/restore-pending` is written before
//! anything else; the backup is restored into `corporate/user.qcow2.restore`, streaming
//! one verified chunk at a time ([`backup::restore_latest`]);
//! only then are the key and the disk installed, and the marker removed last. A marker
//! found at start means an earlier attempt died half-way (crash, power loss, server gone):
//! whatever key or disk it left is discarded and provisioning starts over — a key without
//! its disk never leads to an empty user disk whose backups would push the real ones out.

use std::path::{Path, PathBuf};

use crate::backup::{self, BackupError};
use crate::AgentDir;
use serde::{Deserialize, Serialize};
use tandem_desktop::keys::{SecretKey, UserDiskKeys};
use tandem_desktop::{Desktop, DesktopError, Layout};

/// Getting the user disk key failed; nothing was started.
#[derive(Debug, thiserror::Error)]
pub enum EscrowError {
    /// The local key could not be unwrapped or stored.
    #[error(transparent)]
    Desktop(#[from] DesktopError),
    /// Escrow or restore on the server failed.
    #[error("re-provisioning the corporate user disk failed ({0}); nothing was installed — retry `tandem desktop start corporate` when the server is reachable")]
    Remote(#[from] BackupError),
    /// Escrowing a new key failed.
    #[error("escrowing the new user disk key on the server failed ({0}); nothing was started — retry when the server is reachable")]
    Escrow(BackupError),
    /// A local file failed.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EscrowError + '_ {
    move |source| EscrowError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the key came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Provisioning {
    /// Unwrapped from this laptop's key files.
    Local,
    /// Escrowed key and the latest backup restored from the server.
    Restored {
        /// The backup restored.
        seq: u64,
        /// Chunks downloaded.
        chunks: u64,
        /// Size of the disk.
        disk_bytes: u64,
    },
    /// Escrowed key; the server holds no backup yet (a new disk is created).
    EscrowedNoBackup,
    /// A brand-new key, escrowed now.
    New,
}

/// The restore-pending marker.
pub fn marker(layout: &Layout) -> PathBuf {
    layout
        .desktop_dir(Desktop::Corporate)
        .join("restore-pending")
}

fn remove_if_exists(p: &Path) -> Result<(), EscrowError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(p)(e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), EscrowError> {
    tandem_tools::atomic::sync_dir(dir).map_err(io(dir))
}

/// The user disk key (see the module doc). Call only after the lease check passed.
pub async fn user_disk_key(
    dir: &AgentDir,
    layout: &Layout,
) -> Result<(SecretKey, Provisioning), EscrowError> {
    let keys = UserDiskKeys::new(&layout.keys_dir());
    let disk = layout.corporate_user_disk();
    let pending = marker(layout);
    if !pending.exists() && (keys.exists() || disk.exists()) {
        return Ok((keys.unwrap_key()?, Provisioning::Local));
    }
    let corp = layout.desktop_dir(Desktop::Corporate);
    std::fs::create_dir_all(&corp).map_err(io(&corp))?;
    let tmp = disk.with_extension("qcow2.restore");
    if pending.exists() {
        tracing::warn!("an earlier re-provisioning did not finish; starting it over");
    }
    tandem_tools::atomic::write_atomic(
        &pending,
        crate::now().to_string().as_bytes(),
        tandem_tools::atomic::DEFAULT_MODE,
    )
    .map_err(io(&pending))?;
    // Whatever an interrupted attempt left is not to be trusted.
    tandem_tools::atomic::remove_stale(&tmp).map_err(io(&tmp))?;
    for p in [
        &tmp,
        &disk,
        &layout.keys_dir().join("user-disk.wrapped"),
        &layout.keys_dir().join("wrap.key"),
    ] {
        remove_if_exists(p)?;
    }
    match backup::escrow_get(dir).await? {
        Some(text) => {
            let key = SecretKey::from_base64(&text)?;
            // Streams one verified chunk at a time into `tmp`.
            let restored = match backup::restore_latest(dir, &tmp).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e.into());
                }
            };
            // Key and disk together; the marker goes last.
            keys.install(&key)?;
            if restored.is_some() {
                std::fs::rename(&tmp, &disk).map_err(io(&disk))?;
            }
            sync_dir(&corp)?;
            remove_if_exists(&pending)?;
            sync_dir(&corp)?;
            let how = match restored {
                Some(r) => Provisioning::Restored {
                    seq: r.seq,
                    chunks: r.chunks,
                    disk_bytes: r.disk_bytes,
                },
                None => Provisioning::EscrowedNoBackup,
            };
            Ok((key, how))
        }
        None => {
            let key = keys.create()?;
            if let Err(e) = backup::escrow_put(dir, &key.to_base64()).await {
                // Without escrow the disk could never be re-provisioned: do not keep it.
                let _ = std::fs::remove_file(layout.keys_dir().join("user-disk.wrapped"));
                return Err(EscrowError::Escrow(e));
            }
            remove_if_exists(&pending)?;
            Ok((key, Provisioning::New))
        }
    }
}
