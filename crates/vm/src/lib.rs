//! One QEMU process per VM, driven over QMP: validate a typed [`VmSpec`], build the
//! command line, start, watch, stop, and tell a clean power-off from a crash.
//!
//! Two ways to run a VM:
//! - [`Vm`] — a handle owned by the caller. QEMU dies with the thread that started it
//!   (`PR_SET_PDEATHSIG`) and with the handle (`Drop` kills it), so no QEMU outlives its
//!   owner.
//! - [`rundir`] — named VMs under a state directory, each owned by a small detached
//!   supervisor process (`tandem vm supervise`). The supervisor holds an exclusive `flock`
//!   on `<state>/<name>/lock` for as long as the VM lives: that lock is what "this name
//!   already runs" means, and it disappears with the supervisor even on SIGKILL.
//!
//! Stopping is graceful first: the ACPI power button (QMP `system_powerdown`), then QMP
//! `quit` after a timeout, then SIGKILL. An exit nobody asked for — QEMU killed, QEMU
//! failing, the guest resetting — ends in state `crashed` with the exit status and the
//! last serial lines.

#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod accel;
pub mod qmp;
pub mod rundir;
pub mod spec;
mod sys;
mod vm;

use std::path::{Path, PathBuf};

pub use accel::{Accel, ResolvedAccel};
pub use qmp::{Qmp, QmpError, VmStatus};
pub use spec::{
    Boot, DeviceControls, DiskFormat, DiskSpec, Network, RunAs, Serial, VmSpec, Vnc, QEMU,
};
pub use vm::{Exit, Vm};

/// Starting, watching or stopping a VM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The spec itself is wrong.
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    /// QEMU is not installed.
    #[error(
        "{QEMU} is not installed; run scripts/setup.sh (or `apt-get install -y qemu-system-x86`)"
    )]
    QemuNotInstalled,
    /// KVM was requested but cannot be used.
    #[error(
        "KVM was requested but /dev/kvm cannot be used ({0}); use --accel tcg or --accel auto"
    )]
    KvmUnavailable(String),
    /// The kernel file cannot be read.
    #[error("kernel {path} cannot be read: {source}; build the guest with `tandem guest build` or pass --kernel")]
    KernelUnreadable {
        /// Path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel file is not a Linux bzImage.
    #[error("kernel {0} is not a Linux bzImage (no HdrS header); pass the vmlinuz file")]
    KernelInvalid(PathBuf),
    /// The initramfs cannot be read.
    #[error("initrd {path} cannot be read: {source}")]
    InitrdUnreadable {
        /// Path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The initramfs is neither cpio nor a compressed cpio.
    #[error(
        "initrd {0} is not a cpio archive (plain, gzip, zstd, xz or lz4); pass the initrd.img file"
    )]
    InitrdInvalid(PathBuf),
    /// A disk cannot be read.
    #[error("disk {path} cannot be read: {source}")]
    DiskUnreadable {
        /// Path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A disk's header says another format than the spec.
    #[error("disk {path} is {} but was declared {}; pass format={}", found.as_str(), declared.as_str(), found.as_str())]
    DiskFormatMismatch {
        /// Path given.
        path: PathBuf,
        /// Format in the spec.
        declared: DiskFormat,
        /// Format of the file.
        found: DiskFormat,
    },
    /// A disk is unusable for another reason.
    #[error("disk {path} is unusable: {reason}")]
    DiskInvalid {
        /// Path given.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Something already listens on a socket the VM needs.
    #[error("socket {0} is in use by another process; stop it or choose another path")]
    SocketInUse(PathBuf),
    /// A TCP port the VM needs is taken.
    #[error("port 127.0.0.1:{0} is in use; choose another VNC display or websocket port")]
    PortInUse(u16),
    /// The state directory cannot be written.
    #[error("state directory {path} is not writable ({source}); pass --state-dir with a writable directory")]
    StateDirUnwritable {
        /// Directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A VM with this name is already running.
    #[error("a VM named `{name}` is already running (supervisor pid {pid}); stop it with `tandem vm stop {name}` or pick another name")]
    AlreadyRunning {
        /// VM name.
        name: String,
        /// Supervisor process.
        pid: u32,
    },
    /// No VM with this name is known.
    #[error("no VM named `{0}` in this state directory; see `tandem vm list`")]
    UnknownVm(String),
    /// The VM is not running.
    #[error("VM `{0}` is not running")]
    NotRunning(String),
    /// QEMU exited during start-up.
    #[error("QEMU failed to start ({status}): {stderr}")]
    StartFailed {
        /// Exit status.
        status: String,
        /// QEMU's error output.
        stderr: String,
    },
    /// QEMU never opened its monitor.
    #[error("QEMU did not answer on its monitor within {0} s; see its log")]
    StartTimeout(u64),
    /// Monitor failure.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// Other I/O failure.
    #[error("{path}: {source}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl VmError {
    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        VmError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

/// The last `n` lines of a serial log (lossy UTF-8), for crash reports.
pub fn tail_lines(path: &Path, n: usize) -> Vec<String> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let start = bytes.len().saturating_sub(64 * 1024);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}
