//! The random-access view every disk reader implements, and the simple views: a raw file,
//! a byte slice of another view (a partition), and an in-memory image.

use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A disk (or a part of one) that can be read at any byte offset.
///
/// Object-safe and shareable across threads, so one open image can serve a scanner, a
/// publisher and a free-space walker at once. Implementations must fill `buf` completely or
/// fail: a short read is an error, never silently zero-filled, because a reader that cannot
/// see data must never report it as clean or as free.
pub trait ReadAt: Send + Sync {
    /// Size of the view in bytes (the guest-visible size for an image format).
    fn size(&self) -> u64;

    /// Reads exactly `buf.len()` bytes starting at `offset`.
    ///
    /// Reading past [`ReadAt::size`] is an error of kind `UnexpectedEof`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl std::fmt::Debug for dyn ReadAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadAt({} bytes)", self.size())
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Box<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
}

/// Checks that `len` bytes at `offset` lie inside a view of `size` bytes.
pub fn check_bounds(size: u64, offset: u64, len: usize) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "read of {len} bytes at offset {offset} is past the end of the disk ({size} bytes)"
            ),
        )),
    }
}

/// A raw disk image file (or a block device): byte `n` of the file is byte `n` of the disk.
#[derive(Debug)]
pub struct RawFile {
    file: std::fs::File,
    size: u64,
    path: PathBuf,
}

impl RawFile {
    /// Opens `path` read-only: a regular file or a block device (the path may be a
    /// symlink the operator named). FIFOs, sockets and character devices are refused
    /// before anything reads them, and the open itself never blocks (`O_NONBLOCK`), so
    /// a hostile name cannot hang the reader. The size is taken once: a raw image must
    /// not change under a reader (scan a snapshot or a powered-off VM).
    pub fn open(path: &Path) -> Result<Self, crate::DiskError> {
        let file = crate::open::open_disk_file(path, crate::open::Follow::Yes)?;
        Self::from_file(file, path)
    }

    /// Wraps a file already opened (and checked) by the caller.
    pub(crate) fn from_file(file: std::fs::File, path: &Path) -> Result<Self, crate::DiskError> {
        let size = file_size(&file).map_err(|source| crate::DiskError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(RawFile {
            file,
            size,
            path: path.to_path_buf(),
        })
    }

    /// The file this view reads.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Size of a regular file or a block device (whose metadata length is 0).
fn file_size(file: &std::fs::File) -> io::Result<u64> {
    use std::io::Seek as _;
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut f = file;
    let end = f.seek(io::SeekFrom::End(0))?;
    f.seek(io::SeekFrom::Start(0))?;
    Ok(end)
}

impl ReadAt for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_bounds(self.size, offset, buf.len())?;
        self.file.read_exact_at(buf, offset)
    }
}

/// A window `[start, start + len)` of another view: a partition, or a backing file seen at
/// the size its overlay declares.
#[derive(Clone)]
pub struct Slice {
    inner: Arc<dyn ReadAt>,
    start: u64,
    len: u64,
}

impl Slice {
    /// A window of `inner`; fails when the window does not fit inside it.
    pub fn new(inner: Arc<dyn ReadAt>, start: u64, len: u64) -> Result<Self, crate::DiskError> {
        match start.checked_add(len) {
            Some(end) if end <= inner.size() => Ok(Slice { inner, start, len }),
            _ => Err(crate::DiskError::OutOfRange {
                start,
                len,
                size: inner.size(),
            }),
        }
    }

    /// Where the window starts in the underlying view.
    pub fn start(&self) -> u64 {
        self.start
    }
}

impl std::fmt::Debug for Slice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slice({}+{})", self.start, self.len)
    }
}

impl ReadAt for Slice {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_bounds(self.len, offset, buf.len())?;
        self.inner.read_at(buf, self.start + offset)
    }
}

/// A disk held in memory: for tests and for small synthetic views.
#[derive(Debug, Clone, Default)]
pub struct MemDisk(pub Vec<u8>);

impl ReadAt for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_bounds(self.0.len() as u64, offset, buf.len())?;
        let start = offset as usize;
        buf.copy_from_slice(&self.0[start..start + buf.len()]);
        Ok(())
    }
}

/// `Read + Seek` over a [`ReadAt`], for parsers that want a stream (ntfs, fatfs).
/// Reads past the end return 0 bytes (end of stream), like a file.
pub struct ReadAtCursor<R> {
    inner: R,
    pos: u64,
}

impl<R: ReadAt> ReadAtCursor<R> {
    /// A cursor at offset 0.
    pub fn new(inner: R) -> Self {
        ReadAtCursor { inner, pos: 0 }
    }

    /// The view underneath.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

impl<R: ReadAt> io::Read for ReadAtCursor<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size = self.inner.size();
        if self.pos >= size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(size - self.pos) as usize;
        self.inner.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: ReadAt> io::Seek for ReadAtCursor<R> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        let new = match pos {
            io::SeekFrom::Start(p) => Some(p),
            io::SeekFrom::End(d) => self.inner.size().checked_add_signed(d),
            io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the disk",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Seek as _};

    #[test]
    fn slice_reads_its_window_and_refuses_past_end() {
        let disk: Arc<dyn ReadAt> = Arc::new(MemDisk((0u8..=255).collect()));
        let s = Slice::new(disk.clone(), 10, 20).expect("fits");
        let mut b = [0u8; 5];
        s.read_at(&mut b, 15).expect("inside");
        assert_eq!(b, [25, 26, 27, 28, 29]);
        assert_eq!(
            s.read_at(&mut b, 16).expect_err("crosses the end").kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(Slice::new(disk, 250, 10).is_err());
    }

    #[test]
    fn cursor_reads_to_end_then_zero() {
        let mut c = ReadAtCursor::new(MemDisk(vec![7u8; 10]));
        c.seek(io::SeekFrom::Start(8)).expect("seek");
        let mut b = [0u8; 4];
        assert_eq!(c.read(&mut b).expect("read"), 2);
        assert_eq!(c.read(&mut b).expect("read"), 0);
    }

    #[test]
    fn raw_file_reads_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("d.img");
        std::fs::write(&p, b"hello world").expect("write");
        let f = RawFile::open(&p).expect("open");
        assert_eq!(f.size(), 11);
        let mut b = [0u8; 5];
        f.read_at(&mut b, 6).expect("read");
        assert_eq!(&b, b"world");
        assert!(f.read_at(&mut b, 7).is_err());
    }
}
