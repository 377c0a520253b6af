//! Which host files a disk reader may open, and how it opens them.
//!
//! A disk image is untrusted input, and so is every name written inside it. A qcow2
//! header names its backing file; a reader that opens that name opens whatever host path
//! the image's author chose: a server's private key (whose bytes then become "disk
//! data" and get published), a FIFO (the open blocks forever), a device. The rule here:
//!
//! - **The image itself** is a path the operator named: it may be a symlink (e.g.
//!   `/dev/disk/by-id/…`) but must end at a regular file or a block device.
//! - **A backing file** is opened only when the operator named that very file in a
//!   [`BackingPolicy`] (the CLI's `--backing FILE`). The default policy allows none, so an
//!   image that names a backing file is refused with the command that flattens it. A
//!   named file must be a regular file; its last path component must not be a symlink
//!   (`O_NOFOLLOW`), and the file reached from the image's header must be the same inode
//!   as one the operator named, so `../`, symlinked directories or hard-to-read names
//!   cannot reach anything else.
//! - Every open is `O_NONBLOCK | O_NOCTTY`, the kind is checked with `lstat` before the
//!   open (devices are never opened by a backing name) and again with `fstat` after it,
//!   on the same inode, so a file swapped between the two checks is refused too.

use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use crate::DiskError;

/// Whether the last component of a path may be a symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Follow {
    /// The operator named the path: follow it, then require a regular file or block device.
    Yes,
    /// A name read from an image: no symlink, a regular file only.
    No,
}

/// Identity of an open file: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

fn kind_name(ft: &std::fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_dir() {
        "a directory"
    } else {
        "a regular file"
    }
}

/// Opens a disk file read-only under the rules above; never blocks.
pub(crate) fn open_disk_file(path: &Path, follow: Follow) -> Result<std::fs::File, DiskError> {
    let open_err = |source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    };
    let refuse = |what: &str| DiskError::NotADiskFile {
        path: path.to_path_buf(),
        kind: what.to_string(),
    };
    let before = match follow {
        Follow::Yes => std::fs::metadata(path),
        Follow::No => std::fs::symlink_metadata(path),
    }
    .map_err(open_err)?;
    let ft = before.file_type();
    let ok = ft.is_file() || (follow == Follow::Yes && ft.is_block_device());
    if !ok {
        return Err(refuse(kind_name(&ft)));
    }
    let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY;
    if follow == Follow::No {
        flags |= libc::O_NOFOLLOW;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                refuse("a symbolic link")
            } else {
                open_err(e)
            }
        })?;
    let after = file.metadata().map_err(open_err)?;
    if after.dev() != before.dev() || after.ino() != before.ino() {
        return Err(refuse("a file that changed while it was opened"));
    }
    let ft = after.file_type();
    if !(ft.is_file() || (follow == Follow::Yes && ft.is_block_device())) {
        return Err(refuse(kind_name(&ft)));
    }
    Ok(file)
}

/// The backing files an image may use: exactly the files the operator named.
///
/// The default allows none. Build one with [`BackingPolicy::allow`]; each named file is
/// checked (regular file, not a symlink) and remembered by device and inode.
#[derive(Debug, Clone, Default)]
pub struct BackingPolicy {
    allowed: Vec<(FileId, PathBuf)>,
}

impl BackingPolicy {
    /// No backing files at all.
    pub fn none() -> Self {
        BackingPolicy::default()
    }

    /// Allows exactly `files` as backing files (anywhere in the chain).
    pub fn allow(files: &[PathBuf]) -> Result<Self, DiskError> {
        let mut allowed = Vec::new();
        for f in files {
            let file = open_disk_file(f, Follow::No)?;
            let m = file.metadata().map_err(|source| DiskError::Open {
                path: f.clone(),
                source,
            })?;
            allowed.push((
                FileId {
                    dev: m.dev(),
                    ino: m.ino(),
                },
                f.clone(),
            ));
        }
        Ok(BackingPolicy { allowed })
    }

    /// The files as the operator named them.
    pub fn files(&self) -> Vec<PathBuf> {
        self.allowed.iter().map(|(_, p)| p.clone()).collect()
    }

    /// Opens `full` (named by `overlay`'s header) if it is one of the allowed files.
    pub(crate) fn open(&self, overlay: &Path, full: &Path) -> Result<std::fs::File, DiskError> {
        let refused = |detail: String| DiskError::Backing {
            path: overlay.to_path_buf(),
            backing: full.to_path_buf(),
            detail,
        };
        if self.allowed.is_empty() {
            return Err(refused(
                "no backing files are allowed; flatten the image (`qemu-img convert -O qcow2 IMAGE FLAT.qcow2`) or name the file with --backing FILE".into(),
            ));
        }
        let file = open_disk_file(full, Follow::No).map_err(|e| refused(e.to_string()))?;
        let m = file
            .metadata()
            .map_err(|e| refused(format!("cannot stat it: {e}")))?;
        let id = FileId {
            dev: m.dev(),
            ino: m.ino(),
        };
        if !self.allowed.iter().any(|(a, _)| *a == id) {
            return Err(refused(format!(
                "it is not one of the files named with --backing ({})",
                self.files()
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_sockets_devices_and_symlinks_are_refused_without_blocking() {
        let d = tempfile::tempdir().expect("tempdir");
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        for follow in [Follow::Yes, Follow::No] {
            let e = open_disk_file(&fifo, follow).expect_err("fifo");
            assert!(e.to_string().contains("a FIFO"), "{e}");
            let e = open_disk_file(Path::new("/dev/null"), follow).expect_err("char device");
            assert!(e.to_string().contains("character device"), "{e}");
        }
        let real = d.path().join("real");
        std::fs::write(&real, [0u8; 512]).expect("write");
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        open_disk_file(&link, Follow::Yes).expect("the operator may name a symlink");
        let e = open_disk_file(&link, Follow::No).expect_err("symlink");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = open_disk_file(d.path(), Follow::Yes).expect_err("dir");
        assert!(e.to_string().contains("directory"), "{e}");
    }

    #[test]
    fn backing_files_must_be_the_very_files_named() {
        let d = tempfile::tempdir().expect("tempdir");
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, [1u8; 512]).expect("write");
        std::fs::write(&b, [2u8; 512]).expect("write");
        let ov = d.path().join("ov");
        let e = BackingPolicy::none().open(&ov, &a).expect_err("none");
        assert!(e.to_string().contains("--backing"), "{e}");
        let p = BackingPolicy::allow(std::slice::from_ref(&a)).expect("allow");
        p.open(&ov, &a).expect("named");
        // The same file by another spelling is the same inode.
        p.open(&ov, &d.path().join(".").join("a"))
            .expect("same inode");
        let e = p.open(&ov, &b).expect_err("not named");
        assert!(e.to_string().contains("not one of the files"), "{e}");
        let link = d.path().join("l");
        std::os::unix::fs::symlink(&a, &link).expect("symlink");
        assert!(BackingPolicy::allow(std::slice::from_ref(&link)).is_err());
        assert!(p.open(&ov, &link).is_err(), "a symlink to a named file");
    }
}
