//! The incremental-scan state file.
//!
//! JSON: `{"format": "tandem-scan-state", "version": 1, "rules_digest": …, "volumes":
//! {"<index>@<start>": {"fs_id": …, "files": {"<path>": {id, size, mtime, content (BLAKE3)}}}}}`.
//! Only files that ended clean are recorded. The whole state is ignored when the rules
//! digest differs (new rules must see every file again), a volume's state is ignored
//! when its filesystem id differs. Written atomically (temp file + rename).

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tandem_disk::Volume;

use crate::volume::VolumeState;
use crate::ScanError;

const FORMAT: &str = "tandem-scan-state";
const VERSION: u32 = 1;

/// State of every volume of one disk after a scan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanState {
    /// Always `tandem-scan-state`.
    pub format: String,
    /// Format version (1).
    pub version: u32,
    /// Digest of the rules the files were found clean under.
    pub rules_digest: String,
    /// Per volume, keyed by [`ScanState::key`].
    pub volumes: HashMap<String, VolumeState>,
}

impl ScanState {
    /// An empty state for `rules_digest`.
    pub fn new(rules_digest: &str) -> Self {
        ScanState {
            format: FORMAT.into(),
            version: VERSION,
            rules_digest: rules_digest.into(),
            volumes: HashMap::new(),
        }
    }

    /// The key of a volume: partition number and start offset.
    pub fn key(v: &Volume) -> String {
        format!("{}@{}", v.index, v.start)
    }

    /// Loads the state at `path` for `rules_digest`: empty when the file does not exist
    /// or was made under other rules.
    pub fn load(path: &Path, rules_digest: &str) -> Result<Self, ScanError> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::new(rules_digest))
            }
            Err(source) => {
                return Err(ScanError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let s: ScanState = serde_json::from_slice(&text).map_err(|e| ScanError::State {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        if s.format != FORMAT || s.version != VERSION {
            return Err(ScanError::State {
                path: path.to_path_buf(),
                detail: format!(
                    "format {} v{} is not {FORMAT} v{VERSION}",
                    s.format, s.version
                ),
            });
        }
        if s.rules_digest != rules_digest {
            tracing::info!(path = %path.display(), "rules changed since the last scan; scanning every file");
            return Ok(Self::new(rules_digest));
        }
        Ok(s)
    }

    /// Writes the state atomically.
    pub fn save(&self, path: &Path) -> Result<(), ScanError> {
        let io = |source| ScanError::Io {
            path: path.to_path_buf(),
            source,
        };
        tandem_tools::atomic::write_atomic(
            path,
            &serde_json::to_vec(self).expect("plain data serializes"),
            tandem_tools::atomic::DEFAULT_MODE,
        )
        .map_err(io)
    }
}
