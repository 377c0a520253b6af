//! Keeping the scan rule bundle current: fetched when the target state announces a newer
//! version, verified against the rules key pinned at enrollment, never rolled back, kept
//! in `state/rules.json` for `tandem scan vm`.

use std::path::PathBuf;

use crate::client::{self, ClientError};
use crate::identity::Identity;
use crate::AgentDir;

/// The verified bundle's file.
pub fn bundle_path(dir: &AgentDir) -> PathBuf {
    dir.state().join("rules.json")
}

/// Why a bundle update failed (the previous bundle stays in use).
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// Fetching failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The bundle is not signed by the pinned rules key, or malformed.
    #[error("scan rule bundle refused: {0}")]
    Refused(String),
    /// The server offered an older bundle than the one in use.
    #[error("scan rule bundle v{offered} is older than v{held} in use; refused")]
    Rollback {
        /// Offered version.
        offered: u64,
        /// Version in use.
        held: u64,
    },
    /// Writing the bundle failed.
    #[error(transparent)]
    File(#[from] crate::fsutil::FileError),
}

/// The version of the verified bundle in use, if any.
pub fn held_version(dir: &AgentDir, id: &Identity) -> Option<u64> {
    let bytes = std::fs::read(bundle_path(dir)).ok()?;
    let signed: tandem_proto::Signed = serde_json::from_slice(&bytes).ok()?;
    tandem_scan::RuleSet::from_bundle(&signed, std::slice::from_ref(&id.info.keys.rules))
        .ok()
        .map(|(_, v)| v)
}

/// Fetches and installs the bundle when `announced` is newer than the one held.
/// Returns the version now in use.
pub async fn sync(
    dir: &AgentDir,
    id: &Identity,
    http: &reqwest::Client,
    announced: Option<u64>,
) -> Result<Option<u64>, RulesError> {
    let held = held_version(dir, id);
    let Some(want) = announced else {
        return Ok(held);
    };
    if held.is_some_and(|h| h >= want) {
        return Ok(held);
    }
    let signed: tandem_proto::Signed =
        client::signed::<(), _>(http, id, reqwest::Method::GET, "/v1/rules", None).await?;
    let (_, version) =
        tandem_scan::RuleSet::from_bundle(&signed, std::slice::from_ref(&id.info.keys.rules))
            .map_err(|e| RulesError::Refused(e.to_string()))?;
    if let Some(h) = held {
        if version < h {
            return Err(RulesError::Rollback {
                offered: version,
                held: h,
            });
        }
    }
    let path = bundle_path(dir);
    let json = serde_json::to_vec(&signed).expect("signed envelope serializes");
    crate::fsutil::write_atomic(&path, &json, 0o600)?;
    tracing::info!(version, "scan rule bundle updated");
    Ok(Some(version))
}
