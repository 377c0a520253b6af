//! The two desktops of a Tandem laptop, built from layered disks.
//!
//! - **Corporate**: system disk = the current gold version (a read-only base, normally the
//!   agent's NBD export of a verified, synced version) under a **volatile** qcow2 overlay
//!   recreated at every start, so nothing the user or malware changes in the system
//!   survives a reboot; user disk = a persistent qcow2 encrypted with LUKS, whose random
//!   key is wrapped on the device ([`keys`]) and unwrapped only after the lease check.
//!   Its definition comes from policy; the user cannot snapshot, roll back or reset it.
//! - **Personal**: base image under a **persistent** overlay the user owns, with recovery
//!   points (qcow2 internal snapshots), rollback, and reset to the pristine base.
//!
//! The running VM keeps the base it started with (its overlay names that base); a newer
//! gold version takes effect at the next start.
//!
//! Layout under the agent directory:
//!
//! | path | what |
//! |---|---|
//! | `corporate/system.qcow2` | volatile overlay, recreated at every start |
//! | `corporate/user.qcow2` | LUKS-encrypted user disk (ext4 inside) |
//! | `corporate/base.json` | which base the running corporate VM uses |
//! | `personal/overlay.qcow2` | persistent overlay with the recovery points |
//! | `personal/overlay-base` | the exact base (`name@version`) the overlay was made on |
//! | `keys/user-disk.wrapped`, `keys/wrap.key` | the user disk key, wrapped; the wrapping key |
//! | `run/` | short-lived secret files handed to QEMU at start (0600, removed after) |
//! | `vms/` | state directory of the VM supervisor (`corporate`, `personal`) |

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod disks;
pub mod keys;
pub mod layout;
pub mod personal;
pub mod prepare;

use std::path::PathBuf;

pub use layout::{BaseDisk, Desktop, Layout};

/// A desktop operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DesktopError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The disk is full.
    #[error("no space left on the device while writing {path}; free some space and retry (nothing was changed)")]
    DiskFull {
        /// What was being written.
        path: PathBuf,
    },
    /// `qemu-img` is missing.
    #[error(
        "qemu-img is not installed; run scripts/setup.sh (or `apt-get install -y qemu-utils`)"
    )]
    QemuImgMissing,
    /// `qemu-img` refused.
    #[error("qemu-img {action} failed: {stderr}")]
    QemuImg {
        /// What was attempted.
        action: String,
        /// Its error output.
        stderr: String,
    },
    /// The operation needs the VM powered off.
    #[error(
        "the {desktop} VM is running; stop it first (`tandem desktop stop {desktop}`) and retry"
    )]
    Running {
        /// Which desktop.
        desktop: Desktop,
    },
    /// The corporate desktop is managed by IT.
    #[error("the corporate desktop is managed by IT: {0} is not allowed")]
    Locked(String),
    /// The personal overlay belongs to another base version.
    #[error("the personal desktop's disk was made on {bound} and cannot run on {requested} (its changes would land on different blocks); start it on {bound} (`--image {bound}`), or reset it to move to {requested} (`tandem vm reset personal`: drops its changes)")]
    OverlayBound {
        /// The base the overlay was made on.
        bound: String,
        /// The base asked for.
        requested: String,
    },
    /// A personal overlay from before Tandem recorded its base, on a base its header
    /// does not identify.
    #[error("the personal desktop's disk was made before Tandem recorded which base version it belongs to, and its header ({backing}) does not say whether that is {requested}: starting it on another version would corrupt it. Reset it to start on {requested} (`tandem vm reset personal`: drops its changes; copy what you need out of it first)")]
    OverlayUnbound {
        /// The backing file the overlay's header names.
        backing: String,
        /// The base asked for.
        requested: String,
    },
    /// No such recovery point.
    #[error("the {desktop} VM has no recovery point `{name}`; it has: {available}")]
    NoSuchSnapshot {
        /// Which desktop.
        desktop: Desktop,
        /// The name asked for.
        name: String,
        /// What exists.
        available: String,
    },
    /// A recovery point name is unusable.
    #[error("recovery point name `{0}` must be 1-64 letters, digits, `.`, `-` or `_`")]
    BadSnapshotName(String),
    /// The user disk key cannot be unwrapped.
    #[error("the corporate user disk key cannot be unwrapped ({0}); the device may have been killed, or its keys damaged; re-provision with `tandem admin device replace`")]
    KeyUnwrap(String),
    /// A key file is missing.
    #[error("the corporate key material is missing ({0}); the device was killed or never set up")]
    KeyMissing(PathBuf),
    /// The VM layer failed.
    #[error(transparent)]
    Vm(#[from] tandem_vm::VmError),
}

impl DesktopError {
    /// An I/O error on `path` (ENOSPC becomes [`DesktopError::DiskFull`]).
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(28) {
            return DesktopError::DiskFull { path };
        }
        DesktopError::Io { path, source }
    }
}
