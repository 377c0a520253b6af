//! FAT12/16/32 through `fatfs`, behind [`ReadOnly`], which refuses every write: `fatfs`
//! wants a writable device and may flush on drop, and a scanner must never change a disk.

use std::io::{self, Read as _};

use tandem_disk::{ReadAtCursor, Slice};

use crate::fs::{MAX_DEPTH, MAX_ENTRIES};
use crate::model::{Reason, Verdict};
use crate::volume::Ctx;

/// `Read + Seek` over a volume, with `Write` that always fails.
pub struct ReadOnly(pub ReadAtCursor<Slice>);

impl io::Read for ReadOnly {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl io::Seek for ReadOnly {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        self.0.seek(pos)
    }
}

impl io::Write for ReadOnly {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        tracing::warn!("fatfs tried to write to a scanned volume; refused");
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the scanner never writes to a guest disk",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn read_err(e: io::Error) -> (Reason, String) {
    let r = if e.kind() == io::ErrorKind::UnexpectedEof {
        Reason::ReadError
    } else {
        Reason::ParseError
    };
    (r, e.to_string())
}

pub(crate) fn walk(view: Slice, ctx: &mut Ctx) -> Result<(), Verdict> {
    let opts = fatfs::FsOptions::new().update_accessed_date(false);
    let fs = fatfs::FileSystem::new(ReadOnly(ReadAtCursor::new(view)), opts)
        .map_err(|e| Verdict::not_scanned(Reason::ParseError, format!("FAT: {e}")))?;
    ctx.set_fs_id(format!("{:08x}", fs.volume_id()));
    let mut stack = vec![(fs.root_dir(), String::new(), 0usize)];
    let mut entries = 0u64;
    while let Some((dir, prefix, depth)) = stack.pop() {
        if ctx.expired() {
            return Err(Verdict::not_scanned(
                Reason::Timeout,
                "volume time budget ran out",
            ));
        }
        for ent in dir.iter() {
            entries += 1;
            if entries > MAX_ENTRIES {
                return Err(Verdict::not_scanned(
                    Reason::ParseError,
                    "too many directory entries (loop?)",
                ));
            }
            let ent = match ent {
                Ok(e) => e,
                Err(e) => {
                    let (r, d) = read_err(e);
                    ctx.skip(
                        format!("{prefix}/"),
                        0,
                        r,
                        format!("directory unreadable: {d}"),
                    );
                    break;
                }
            };
            let name = ent.file_name();
            if name == "." || name == ".." {
                continue;
            }
            let path = format!("{prefix}/{name}");
            if ent.is_dir() {
                if depth + 1 > MAX_DEPTH {
                    ctx.skip(path, 0, Reason::ParseError, "directory nesting too deep");
                } else {
                    stack.push((ent.to_dir(), path, depth + 1));
                }
                continue;
            }
            if !ent.is_file() {
                continue;
            }
            let size = ent.len();
            let m = ent.modified();
            let mtime =
                ((((m.date.year as i64 * 13 + m.date.month as i64) * 32 + m.date.day as i64) * 24
                    + m.time.hour as i64)
                    * 60
                    + m.time.min as i64)
                    * 60
                    + m.time.sec as i64;
            let mut file = ent.to_file();
            ctx.file(path, "", size, mtime, &mut |buf| {
                buf.clear();
                (&mut file).take(size).read_to_end(buf).map_err(read_err)?;
                Ok(())
            });
        }
    }
    Ok(())
}
