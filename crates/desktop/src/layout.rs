//! Where each desktop keeps its disks, and what it boots from.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Which desktop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desktop {
    /// IT's desktop.
    Corporate,
    /// The user's desktop.
    Personal,
}

impl Desktop {
    /// Its VM name.
    pub fn name(self) -> &'static str {
        match self {
            Desktop::Corporate => "corporate",
            Desktop::Personal => "personal",
        }
    }
}

impl fmt::Display for Desktop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Desktop {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "corporate" => Ok(Desktop::Corporate),
            "personal" => Ok(Desktop::Personal),
            other => Err(format!(
                "unknown desktop `{other}`; use corporate or personal"
            )),
        }
    }
}

/// The read-only base a desktop's overlay sits on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum BaseDisk {
    /// A version served over NBD on a unix socket (the normal case on a laptop).
    Nbd {
        /// Socket path.
        socket: PathBuf,
        /// Export name ("" for the default export).
        export: String,
        /// Virtual size in bytes.
        size: u64,
        /// Human label, e.g. `corp-gold@2`.
        label: String,
    },
    /// A raw image file (development, and bases the user brings).
    File {
        /// Image path.
        path: PathBuf,
        /// Human label.
        label: String,
    },
}

impl BaseDisk {
    /// The backing-file string qcow2 records.
    pub fn backing(&self) -> String {
        match self {
            BaseDisk::Nbd { socket, export, .. } => {
                format!("nbd+unix:///{export}?socket={}", socket.display())
            }
            BaseDisk::File { path, .. } => path.display().to_string(),
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> std::io::Result<u64> {
        match self {
            BaseDisk::Nbd { size, .. } => Ok(*size),
            BaseDisk::File { path, .. } => std::fs::metadata(path).map(|m| m.len()),
        }
    }

    /// Whether it is served over NBD (and may briefly go away when its server restarts).
    pub fn is_nbd(&self) -> bool {
        matches!(self, BaseDisk::Nbd { .. })
    }

    /// Human label.
    pub fn label(&self) -> &str {
        match self {
            BaseDisk::Nbd { label, .. } | BaseDisk::File { label, .. } => label,
        }
    }
}

/// Paths under an agent directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout of the agent directory `root`.
    pub fn new(root: &Path) -> Self {
        Layout {
            root: root.to_path_buf(),
        }
    }

    /// The agent directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of one desktop's disks.
    pub fn desktop_dir(&self, d: Desktop) -> PathBuf {
        self.root.join(d.name())
    }

    /// Corporate volatile system overlay.
    pub fn corporate_system(&self) -> PathBuf {
        self.desktop_dir(Desktop::Corporate).join("system.qcow2")
    }

    /// Corporate encrypted user disk.
    pub fn corporate_user_disk(&self) -> PathBuf {
        self.desktop_dir(Desktop::Corporate).join("user.qcow2")
    }

    /// Personal persistent overlay.
    pub fn personal_overlay(&self) -> PathBuf {
        self.desktop_dir(Desktop::Personal).join("overlay.qcow2")
    }

    /// The base the personal overlay was made on (`name@version` or a file's label): the
    /// overlay holds clusters relative to exactly that base and may never sit on another.
    pub fn personal_binding(&self) -> PathBuf {
        self.desktop_dir(Desktop::Personal).join("overlay-base")
    }

    /// Key material directory (destroyed by a kill).
    pub fn keys_dir(&self) -> PathBuf {
        self.root.join("keys")
    }

    /// Short-lived secrets handed to QEMU.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// The VM supervisor's state directory.
    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// Record of the base a desktop was started on.
    pub fn base_record(&self, d: Desktop) -> PathBuf {
        self.desktop_dir(d).join("base.json")
    }
}
