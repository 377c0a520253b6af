//! ext2/3/4 through `ext4-view` (read-only by construction): the fallback for filesystems
//! whose journal needs replaying, which `ext4-view` does in memory. Sparse files read as zeros
//! where unallocated. `ext4-view` refuses some features (`inline_data`, `ea_inode`,
//! `large_dir`, `meta_bg`…): such a volume is `not_scanned: fs_unsupported_feature`.

use ext4_view::{Ext4, Ext4Error, Ext4Read};
use tandem_disk::{ReadAt, Slice};

use crate::fs::{MAX_DEPTH, MAX_ENTRIES};
use crate::model::{Reason, Verdict};
use crate::volume::Ctx;

struct Reader(Slice);

impl Ext4Read for Reader {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn core::error::Error + Send + Sync>> {
        Ok(self.0.read_at(dst, start)?)
    }
}

fn fail(e: &Ext4Error) -> (Reason, String) {
    match e {
        Ext4Error::Incompatible(i) => {
            let s = i.to_string();
            let hint = if s.contains("DATA_IN_INODE") {
                " (inline_data)"
            } else {
                ""
            };
            (
                Reason::FsUnsupportedFeature,
                format!("ext4 feature not supported{hint}: {s}"),
            )
        }
        Ext4Error::Io(_) => (Reason::ReadError, e.to_string()),
        _ => (Reason::ParseError, e.to_string()),
    }
}

pub(crate) fn walk(view: Slice, ctx: &mut Ctx) -> Result<(), Verdict> {
    let fs = Ext4::load(Box::new(Reader(view))).map_err(|e| {
        let (r, d) = fail(&e);
        Verdict::not_scanned(r, d)
    })?;
    ctx.set_fs_id(fs.uuid().to_string());
    let mut stack = vec![(ext4_view::PathBuf::new("/"), 0usize)];
    let mut entries = 0u64;
    while let Some((dir, depth)) = stack.pop() {
        if ctx.expired() {
            return Err(Verdict::not_scanned(
                Reason::Timeout,
                "volume time budget ran out",
            ));
        }
        let rd = match fs.read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                let (r, d) = fail(&e);
                ctx.skip(
                    format!("{}/", dir.display()),
                    0,
                    r,
                    format!("directory unreadable: {d}"),
                );
                continue;
            }
        };
        for ent in rd {
            entries += 1;
            if entries > MAX_ENTRIES {
                return Err(Verdict::not_scanned(
                    Reason::ParseError,
                    "too many directory entries",
                ));
            }
            let ent = match ent {
                Ok(e) => e,
                Err(e) => {
                    let (r, d) = fail(&e);
                    ctx.skip(
                        format!("{}/", dir.display()),
                        0,
                        r,
                        format!("directory entry unreadable: {d}"),
                    );
                    continue;
                }
            };
            let name = ent.file_name();
            if name.as_ref() == b"." || name.as_ref() == b".." {
                continue;
            }
            let path = ent.path();
            let shown = path.display().to_string();
            let ft = match ent.file_type() {
                Ok(t) => t,
                Err(e) => {
                    let (r, d) = fail(&e);
                    ctx.skip(shown, 0, r, d);
                    continue;
                }
            };
            if ft.is_dir() {
                if depth + 1 > MAX_DEPTH {
                    ctx.skip(shown, 0, Reason::ParseError, "directory nesting too deep");
                } else {
                    stack.push((path, depth + 1));
                }
                continue;
            }
            if !ft.is_regular_file() {
                continue;
            }
            let mut file = match fs.open(&path) {
                Ok(f) => f,
                Err(e) => {
                    let (r, d) = fail(&e);
                    ctx.skip(shown, 0, r, d);
                    continue;
                }
            };
            let size = file.metadata().len();
            let mtime = file.metadata().modified().seconds();
            ctx.file(shown, "", size, mtime, &mut |buf| {
                buf.resize(size as usize, 0);
                let mut off = 0usize;
                while off < buf.len() {
                    let n = file.read_bytes(&mut buf[off..]).map_err(|e| fail(&e))?;
                    if n == 0 {
                        break;
                    }
                    off += n;
                }
                buf.truncate(off);
                Ok(())
            });
        }
    }
    Ok(())
}
