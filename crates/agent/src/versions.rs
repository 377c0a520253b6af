//! Update at the next boot, second half: once a desktop runs on a newer version of its
//! image, older versions that no running desktop uses are dropped from this laptop and
//! their chunks collected. The newest version of every image always stays (it is the
//! base of the next delta), and so does every version a desktop runs on.

use std::time::Duration;

use tandem_proto::fleet::ImageRef;
use tandem_store::GcReport;
use tandem_sync::{Local, SyncError};

/// Chunks younger than this survive a collection (a pull may be adding them).
const GRACE: Duration = Duration::from_secs(3600);

/// Collecting old versions failed; the next start retries.
#[derive(Debug, thiserror::Error)]
pub enum VersionsError {
    /// The catalog could not be read or changed.
    #[error("old image versions not collected: {0}")]
    Catalog(#[from] SyncError),
    /// The chunk store's GC failed.
    #[error("old image versions dropped, but their chunks were not collected: {0}")]
    Store(#[from] tandem_store::StoreError),
}

/// What a collection did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Collected {
    /// Versions removed from this laptop.
    pub dropped: Vec<ImageRef>,
    /// Chunks removed from the store.
    pub removed_chunks: u64,
    /// Bytes freed on disk.
    pub bytes_freed: u64,
}

/// Drops every version older than the newest one `in_use` names for its image and not
/// itself in use, then collects chunks no remaining version references.
pub fn collect_old(local: &Local, in_use: &[ImageRef]) -> Result<Collected, VersionsError> {
    let mut out = Collected::default();
    for r in in_use {
        let newest_running = in_use
            .iter()
            .filter(|u| u.image == r.image)
            .map(|u| u.version)
            .max()
            .unwrap_or(r.version);
        if newest_running != r.version {
            continue;
        }
        for v in local.catalog.versions(&r.image)? {
            let used = in_use.iter().any(|u| u.image == r.image && u.version == v);
            if v < newest_running && !used {
                local.catalog.delete(&r.image, v)?;
                out.dropped.push(ImageRef {
                    image: r.image.clone(),
                    version: v,
                });
            }
        }
    }
    if out.dropped.is_empty() {
        return Ok(out);
    }
    let live = local.catalog.live_chunks(&local.trusted)?;
    let report: GcReport = local.store.gc(&live, GRACE)?;
    out.removed_chunks = report.removed_chunks;
    out.bytes_freed = report.bytes_freed;
    tracing::info!(
        dropped = out.dropped.len(),
        removed_chunks = out.removed_chunks,
        bytes_freed = out.bytes_freed,
        "old image versions collected"
    );
    Ok(out)
}
