//! NTFS through the `ntfs` crate: every file's unnamed `$DATA` stream and its alternate
//! data streams (shown as `path:stream`, a classic hiding place). Compressed and
//! EFS-encrypted streams are `not_scanned` (`ntfs_compressed`, `ntfs_encrypted`): the
//! crate does not decompress, and EFS needs the user's key. The system files (`$MFT`…,
//! records below 24) are not walked.
//!
//! A directory's index is listed under budgets ([`Listing`]): a hostile index whose
//! B-tree subnodes point back at an ancestor makes the `ntfs` crate descend forever
//! inside one `next()` (found by `fuzz/`'s `scan_ntfs`: 20 GiB in a minute). A listing
//! may read at most twice the volume (each node once is at most the volume), at most
//! 4 MiB between two entries (a real index is a few levels deep), nothing once the
//! volume's time is up, and list no more entries than the volume has 16-byte slots (an
//! entry's header alone is 16 bytes).

use std::collections::HashSet;
use std::io::{self, Read as _, Seek as _};

use ntfs::{Ntfs, NtfsAttributeFlags, NtfsAttributeType, NtfsError, NtfsFile};
use tandem_disk::{ReadAt as _, ReadAtCursor, Slice};

use crate::fs::{MAX_DEPTH, MAX_ENTRIES};
use crate::model::{Reason, Verdict};
use crate::volume::Ctx;

type Cur = ReadAtCursor<Slice>;

fn fail(e: &NtfsError) -> (Reason, String) {
    let s = e.to_string();
    let r = if matches!(e, NtfsError::Io(_)) {
        Reason::ReadError
    } else {
        Reason::ParseError
    };
    (r, s)
}

fn vol_err(e: NtfsError) -> Verdict {
    let (r, d) = fail(&e);
    Verdict::not_scanned(r, format!("NTFS: {d}"))
}

struct Child {
    name: String,
    record: u64,
    dir: bool,
}

/// The volume as one directory listing reads it (see the module doc): reads fail once a
/// budget is spent, so a looping index ends in an error instead of growing forever.
struct Listing<'a, 'c> {
    cur: &'a mut Cur,
    ctx: &'a Ctx<'c>,
    left: u64,
    since_entry: u64,
}

/// Most bytes a listing reads between two entries.
const MAX_READ_PER_ENTRY: u64 = 4 << 20;

impl io::Read for Listing<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ctx.expired() {
            return Err(io::Error::other("volume time budget ran out"));
        }
        let n = self.cur.read(buf)?;
        self.since_entry += n as u64;
        match self.left.checked_sub(n as u64) {
            Some(left) if self.since_entry <= MAX_READ_PER_ENTRY => self.left = left,
            _ => return Err(io::Error::other("directory index loops back on itself")),
        }
        Ok(n)
    }
}

impl io::Seek for Listing<'_, '_> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        self.cur.seek(pos)
    }
}

/// A directory's entries, at most `cap` of them (`Ok(None)`: more than `cap`).
fn children(
    ntfs: &Ntfs,
    cur: &mut Cur,
    record: u64,
    cap: u64,
    ctx: &Ctx,
) -> Result<Option<Vec<Child>>, NtfsError> {
    let dir = ntfs.file(cur, record)?;
    let volume = cur.seek(io::SeekFrom::End(0))?;
    let cur = &mut Listing {
        cur,
        ctx,
        left: volume.saturating_mul(2),
        since_entry: 0,
    };
    let index = dir.directory_index(cur)?;
    let mut it = index.entries();
    let mut out = Vec::new();
    let mut listed = 0u64;
    while let Some(e) = it.next(cur) {
        listed += 1;
        if listed > cap {
            return Ok(None);
        }
        let e = e?;
        cur.since_entry = 0;
        let Some(key) = e.key() else { continue };
        let fname = key?;
        if fname.namespace() == ntfs::structured_values::NtfsFileNamespace::Dos {
            continue;
        }
        out.push(Child {
            name: fname.name().to_string_lossy(),
            record: e.file_reference().file_record_number(),
            dir: fname.is_directory(),
        });
    }
    Ok(Some(out))
}

pub(crate) fn walk(view: Slice, ctx: &mut Ctx) -> Result<(), Verdict> {
    let cap = MAX_ENTRIES.min(view.size() / 16);
    let mut cur = ReadAtCursor::new(view);
    let mut ntfs = Ntfs::new(&mut cur).map_err(vol_err)?;
    ntfs.read_upcase_table(&mut cur).map_err(vol_err)?;
    ctx.set_fs_id(format!("{:016x}", ntfs.serial_number()));
    let mut seen = HashSet::new();
    let mut stack = vec![(5u64, String::new(), 0usize)];
    let mut entries = 0u64;
    while let Some((record, prefix, depth)) = stack.pop() {
        if ctx.expired() {
            return Err(Verdict::not_scanned(
                Reason::Timeout,
                "volume time budget ran out",
            ));
        }
        let kids = match children(&ntfs, &mut cur, record, cap.saturating_sub(entries), ctx) {
            Ok(Some(k)) => k,
            Ok(None) => {
                return Err(Verdict::not_scanned(
                    Reason::ParseError,
                    "more directory entries than the volume can hold (an index loop?)",
                ))
            }
            Err(e) if record == 5 => return Err(vol_err(e)),
            Err(e) => {
                let (r, d) = fail(&e);
                ctx.skip(
                    format!("{prefix}/"),
                    0,
                    r,
                    format!("directory unreadable: {d}"),
                );
                continue;
            }
        };
        for k in kids {
            entries += 1;
            if entries > cap {
                return Err(Verdict::not_scanned(
                    Reason::ParseError,
                    "too many directory entries",
                ));
            }
            if k.record < 24 || k.name == "." {
                continue;
            }
            let path = format!("{prefix}/{}", k.name);
            if k.dir {
                if depth + 1 > MAX_DEPTH {
                    ctx.skip(path, 0, Reason::ParseError, "directory nesting too deep");
                } else if seen.insert(k.record) {
                    stack.push((k.record, path, depth + 1));
                }
                continue;
            }
            match ntfs.file(&mut cur, k.record) {
                Ok(f) => file(&f, &mut cur, &path, ctx),
                Err(e) => {
                    let (r, d) = fail(&e);
                    ctx.skip(path, 0, r, d);
                }
            }
        }
    }
    Ok(())
}

/// Scans every `$DATA` stream of one file.
fn file(f: &NtfsFile, cur: &mut Cur, path: &str, ctx: &mut Ctx) {
    let mtime = f
        .info()
        .map(|i| i.modification_time().nt_timestamp() as i64)
        .unwrap_or(0);
    let id = format!("{}", f.file_record_number());
    let mut attrs = f.attributes();
    while let Some(item) = attrs.next(cur) {
        let attr_item = match item {
            Ok(i) => i,
            Err(e) => {
                let (r, d) = fail(&e);
                return ctx.skip(
                    path.to_string(),
                    0,
                    r,
                    format!("attributes unreadable: {d}"),
                );
            }
        };
        let attr = match attr_item.to_attribute() {
            Ok(a) => a,
            Err(e) => {
                let (r, d) = fail(&e);
                return ctx.skip(path.to_string(), 0, r, d);
            }
        };
        if !matches!(attr.ty(), Ok(NtfsAttributeType::Data)) {
            continue;
        }
        let stream = attr.name().map(|n| n.to_string_lossy()).unwrap_or_default();
        let shown = if stream.is_empty() {
            path.to_string()
        } else {
            format!("{path}:{stream}")
        };
        let size = attr.value_length();
        let flags = attr.flags();
        if flags.contains(NtfsAttributeFlags::COMPRESSED) {
            ctx.skip(
                shown,
                size,
                Reason::NtfsCompressed,
                "NTFS-compressed stream",
            );
            continue;
        }
        if flags.contains(NtfsAttributeFlags::ENCRYPTED) {
            ctx.skip(shown, size, Reason::NtfsEncrypted, "EFS-encrypted stream");
            continue;
        }
        let sid = if stream.is_empty() {
            id.clone()
        } else {
            format!("{id}:{stream}")
        };
        ctx.file(shown, &sid, size, mtime, &mut |buf| {
            let value = attr.value(cur).map_err(|e| fail(&e))?;
            buf.clear();
            value
                .attach(cur)
                .take(size)
                .read_to_end(buf)
                .map_err(|e| (Reason::ReadError, e.to_string()))?;
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::{Outcome, RuleSet, ScanConfig};

    /// Fuzzer finding (`fuzz/regressions/scan_ntfs/index-loop-c2b8197e63e48092`, an mkntfs volume
    /// mutated by AFL++): an index subnode pointing back at an ancestor made the `ntfs`
    /// crate descend forever inside one `next()`, 20 GiB in a minute. The listing's read
    /// budget ends it: the scan returns, and does not call the volume clean.
    #[test]
    fn a_looping_directory_index_ends_the_listing() {
        let mut b =
            include_bytes!("../../../../fuzz/regressions/scan_ntfs/index-loop-c2b8197e63e48092")
                .to_vec();
        b.resize(1100 << 10, 0);
        let engine = RuleSet {
            origin: "test".into(),
            rules: Vec::new(),
            blocklist: Vec::new(),
        }
        .compile()
        .expect("compile");
        let disk: Arc<dyn tandem_disk::ReadAt> = Arc::new(tandem_disk::MemDisk(b));
        let r = crate::scan_disk(disk, "loop", &engine, &ScanConfig::default()).expect("scan");
        assert_ne!(r.outcome, Outcome::Clean, "{r:?}");
    }
}
