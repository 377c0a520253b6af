//! Random-access disk views, partition tables and filesystem allocation maps.
//!
//! Everything that reads a guest disk without booting it starts here: the scanner walks
//! files through these views, the image publisher asks which bytes are free, and a
//! stored image version (in `tandem-store`) implements [`ReadAt`] so both work on it too.
//!
//! - [`ReadAt`]: the one trait, `size()` + `read_at(buf, offset)` filling `buf` or failing.
//!   Implemented by [`RawFile`], [`Qcow2`] (with its backing chain), [`Slice`] (a
//!   partition), [`MemDisk`], [`NbdClient`] (a read-only NBD export, e.g. `qemu-nbd` over an
//!   encrypted qcow2). [`open_image`] picks raw or qcow2 from the file's magic.
//! - [`volumes`]: GPT (CRC-checked, backup used if the primary is damaged), MBR with
//!   logical partitions, or the whole disk as one volume; [`detect_fs`] names what a volume
//!   holds (ext, FAT, NTFS, LUKS, BitLocker, swap, LVM).
//! - [`ext::Superblock`]: the ext2/3/4 superblock and group descriptors, decoded and
//!   checked once for the allocation map and the scanner's ext walker.
//! - [`unused_ranges`]: "free space never travels" — the byte ranges that ext2/3/4 block
//!   bitmaps and NTFS `$Bitmap` mark unused, inside any partition, plus a per-volume report.
//!   It never claims a byte outside a filesystem it fully understood.
//!
//! Hostile input: host files are opened only as [`open`] allows (the image the operator
//! named, and backing files only when named too; never FIFOs, sockets or character
//! devices, never blocking). Every size and offset read from a disk is bounded before use (qcow2
//! tables ≤ 32 MiB, chains ≤ 16 deep, GPT ≤ 1024 entries, ≤ 128 logical partitions,
//! bitmaps ≤ 256 MiB). Reads past the end of a view are errors, never zeros.
//!
//! ```no_run
//! use std::sync::Arc;
//! let disk: Arc<dyn tandem_disk::ReadAt> = Arc::from(tandem_disk::open_image("vm.qcow2".as_ref())?);
//! let map = tandem_disk::unused_ranges(disk.clone())?;
//! let mut chunk = vec![0u8; 65536];
//! disk.read_at(&mut chunk, 0)?;
//! map.zero_unused(&mut chunk, 0); // free blocks become zeros, i.e. holes
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod ext;
pub mod nbd;
pub mod open;
pub mod partition;
pub mod qcow2;
pub mod unused;
pub mod view;
pub mod worker;

use std::path::{Path, PathBuf};

pub use nbd::NbdClient;
pub use open::BackingPolicy;
pub use partition::{detect_fs, volumes, FsKind, TableKind, Volume};
pub use qcow2::Qcow2;
pub use unused::{unused_ranges, UnusedMap, VolumeUsage};
pub use view::{MemDisk, RawFile, ReadAt, ReadAtCursor, Slice};

/// Opening or interpreting a disk failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image file could not be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Reading the image file itself failed.
    #[error("cannot read {path} at offset {offset}: {source}")]
    Read {
        /// The image.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// Why.
        source: std::io::Error,
    },
    /// Reading the disk view failed.
    #[error("cannot read the disk at offset {offset}: {source}")]
    ReadAt {
        /// Where, in disk bytes.
        offset: u64,
        /// Why.
        source: std::io::Error,
    },
    /// The qcow2 file is damaged or hostile.
    #[error("{path} is not a usable qcow2 image: {detail}")]
    Qcow2 {
        /// The image.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// A path names something that is not a disk image file (a FIFO, a device, a symlink
    /// where none may be).
    #[error("{path} is {kind}, not a disk image file; name a regular file (or a block device)")]
    NotADiskFile {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: String,
    },
    /// An image names a backing file the operator did not allow.
    #[error("{path} names the backing file {backing}, which is refused: {detail}")]
    Backing {
        /// The image whose header names it.
        path: PathBuf,
        /// The backing file, resolved against the image's directory.
        backing: PathBuf,
        /// Why it was refused, and what to do.
        detail: String,
    },
    /// The image is encrypted at the image level; we do not hold its key.
    #[error("{path} is an encrypted qcow2 image; scan it where it is attached decrypted (e.g. `tandem scan vm`), or decrypt a copy with `qemu-img convert`")]
    Encrypted {
        /// The image.
        path: PathBuf,
    },
    /// A valid image uses something this reader does not implement.
    #[error("{path}: unsupported: {detail}")]
    Unsupported {
        /// The image.
        path: PathBuf,
        /// What.
        detail: String,
    },
    /// A partition table is damaged.
    #[error("damaged partition table: {detail}")]
    Table {
        /// What was wrong.
        detail: String,
    },
    /// A window does not fit in the disk (a partition past the end of a truncated image).
    #[error("range {start}+{len} lies outside the disk ({size} bytes); is the image truncated?")]
    OutOfRange {
        /// Start of the window.
        start: u64,
        /// Its length.
        len: u64,
        /// Size of the disk.
        size: u64,
    },
}

/// Opens a disk image file, raw or qcow2 (by its magic). A qcow2 that names a backing
/// file is refused: see [`open_image_with`] and [`open`] for why and how to allow one.
pub fn open_image(path: &Path) -> Result<Box<dyn ReadAt>, DiskError> {
    open_image_with(path, &BackingPolicy::none())
}

/// Opens a disk image file with the backing files `policy` allows (and only those).
pub fn open_image_with(path: &Path, policy: &BackingPolicy) -> Result<Box<dyn ReadAt>, DiskError> {
    let raw = RawFile::open(path)?;
    open_raw_at_depth(raw, path, 0, policy)
}

pub(crate) fn open_raw_at_depth(
    raw: RawFile,
    path: &Path,
    depth: usize,
    policy: &BackingPolicy,
) -> Result<Box<dyn ReadAt>, DiskError> {
    let mut magic = [0u8; 4];
    if raw.size() >= 4 {
        raw.read_at(&mut magic, 0)
            .map_err(|source| DiskError::Read {
                path: path.to_path_buf(),
                offset: 0,
                source,
            })?;
    }
    if magic == qcow2::MAGIC {
        Ok(Box::new(Qcow2::open_raw(raw, path, depth, policy)?))
    } else {
        Ok(Box::new(raw))
    }
}

/// Interprets a view that holds an image file's bytes (e.g. a qcow2 kept in the chunk
/// store as a backup): a qcow2 (without backing file) is opened over it, anything else is
/// taken as a raw disk.
pub fn open_view(
    view: std::sync::Arc<dyn ReadAt>,
    label: &Path,
) -> Result<Box<dyn ReadAt>, DiskError> {
    let mut magic = [0u8; 4];
    if view.size() >= 4 {
        view.read_at(&mut magic, 0)
            .map_err(|source| DiskError::ReadAt { offset: 0, source })?;
    }
    if magic == qcow2::MAGIC {
        Ok(Box::new(Qcow2::open_view(view, label)?))
    } else {
        Ok(Box::new(view))
    }
}
