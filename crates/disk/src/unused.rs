//! "Free space never travels": which bytes of a disk no recognized filesystem uses.
//!
//! For each volume (whole disk or MBR/GPT partition) holding a filesystem we can read the
//! allocation map of, the unused blocks become byte ranges a publisher may store as
//! zeros. The rule is one-sided: **when in doubt, claim nothing.** Bytes outside a
//! recognized filesystem (partition gaps, tables, unknown or encrypted volumes, a volume
//! we failed to parse) are never claimed, so zeroing the claimed ranges can never change
//! what a guest reads from a file.
//!
//! - ext2/3/4: the block bitmap of every group. A group flagged `BLOCK_UNINIT` (only
//!   honoured with `gdt_csum`/`metadata_csum`, as the kernel does) has no bitmap on disk;
//!   its used blocks are computed the kernel's way: superblock and descriptor backups
//!   (sparse_super, sparse_super2) plus every group's bitmaps and inode table that lie in it
//!   (flex_bg places them anywhere). Nothing is claimed on a filesystem whose journal needs
//!   recovery, with `meta_bg` or `bigalloc`, or with a geometry that does not add up.
//! - NTFS: the `$Bitmap` file, one bit per cluster. Nothing is claimed on a volume marked
//!   dirty (its log may still change the bitmap).

use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tandem_tools::bytes::Short;

use crate::ext::{
    GroupDesc, Superblock, BG_BLOCK_UNINIT, INCOMPAT_META_BG, INCOMPAT_RECOVER, RO_COMPAT_BIGALLOC,
    RO_COMPAT_GDT_CSUM, RO_COMPAT_METADATA_CSUM, RO_COMPAT_SPARSE_SUPER, SUPERBLOCK_LEN,
    SUPERBLOCK_OFFSET,
};
use crate::partition::{detect_fs, volumes, FsKind, Volume};
use crate::view::{ReadAt, ReadAtCursor, Slice};
use crate::DiskError;

/// Largest allocation bitmap read for one volume (64 MiB covers 2 TiB of 4 KiB blocks ×8).
const MAX_BITMAP_BYTES: u64 = 256 << 20;

/// What one volume contributed to the unused set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeUsage {
    /// The volume.
    pub volume: Volume,
    /// Its filesystem, by signature.
    pub fs: FsKind,
    /// Bytes claimed unused (0 when nothing could be claimed).
    pub unused_bytes: u64,
    /// Why nothing (or not everything) was claimed, for people.
    pub note: Option<String>,
}

/// The unused byte ranges of a disk and how they were found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnusedMap {
    /// Sorted, non-overlapping, non-adjacent ranges of absolute disk offsets.
    pub ranges: Vec<Range<u64>>,
    /// One entry per volume found.
    pub volumes: Vec<VolumeUsage>,
}

impl UnusedMap {
    /// Total bytes claimed unused.
    pub fn unused_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// Zeroes the parts of `buf` (disk bytes `offset..offset+buf.len()`) that are unused:
    /// what a publisher calls on every chunk before hashing it.
    pub fn zero_unused(&self, buf: &mut [u8], offset: u64) {
        let end = offset + buf.len() as u64;
        let first = self.ranges.partition_point(|r| r.end <= offset);
        for r in &self.ranges[first..] {
            if r.start >= end {
                break;
            }
            let s = r.start.max(offset) - offset;
            let e = r.end.min(end) - offset;
            buf[s as usize..e as usize].fill(0);
        }
    }

    /// Whether every byte of `range` is unused (a chunk that can be stored as a hole).
    pub fn is_unused(&self, range: Range<u64>) -> bool {
        let i = self.ranges.partition_point(|r| r.end <= range.start);
        self.ranges
            .get(i)
            .is_some_and(|r| r.start <= range.start && r.end >= range.end)
    }
}

/// Finds the unused ranges of every recognized filesystem on `disk`.
///
/// Fails only when the partition table itself cannot be read; a volume that cannot be
/// parsed claims nothing and says why in its note.
pub fn unused_ranges(disk: Arc<dyn ReadAt>) -> Result<UnusedMap, DiskError> {
    let mut map = UnusedMap::default();
    let mut all = Vec::new();
    for vol in volumes(&*disk)? {
        let (fs, result) = match vol.view(disk.clone()) {
            Err(e) => (FsKind::Unknown, Err(e.to_string())),
            Ok(view) => match detect_fs(&view) {
                Err(e) => (FsKind::Unknown, Err(format!("cannot read volume: {e}"))),
                Ok(FsKind::Ext) => (FsKind::Ext, ext_unused(&view)),
                Ok(FsKind::Ntfs) => (FsKind::Ntfs, ntfs_unused(&view)),
                Ok(other) => (other, Err(format!("{other} allocation maps are not read"))),
            },
        };
        let (ranges, note) = match result {
            Ok(r) => (r, None),
            Err(note) => (Vec::new(), Some(note)),
        };
        let unused_bytes = ranges.iter().map(|r| r.end - r.start).sum();
        all.extend(
            ranges
                .into_iter()
                .map(|r| r.start + vol.start..r.end + vol.start),
        );
        tracing::debug!(volume = vol.index, %fs, unused_bytes, "volume allocation read");
        map.volumes.push(VolumeUsage {
            volume: vol,
            fs,
            unused_bytes,
            note,
        });
    }
    all.sort_by_key(|r| r.start);
    for r in all {
        match map.ranges.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => map.ranges.push(r),
        }
    }
    Ok(map)
}

/// Turns a bitmap (bit set = used) of `count` units of `unit` bytes, starting at byte
/// `base`, into ranges of clear bits, appended to `out` merged with their neighbours.
fn clear_runs(bits: &[u8], count: u64, unit: u64, base: u64, out: &mut Vec<Range<u64>>) {
    let mut i = 0u64;
    while i < count {
        let byte = bits[(i / 8) as usize];
        if byte == 0xff && i.is_multiple_of(8) && i + 8 <= count {
            i += 8;
            continue;
        }
        if byte & (1 << (i % 8)) == 0 {
            let start = base + i * unit;
            let end = start + unit;
            match out.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => out.push(start..end),
            }
        }
        i += 1;
    }
}

fn rd(view: &dyn ReadAt, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut b = vec![0u8; len];
    view.read_at(&mut b, offset)
        .map_err(|e| format!("cannot read {len} bytes at volume offset {offset}: {e}"))?;
    Ok(b)
}

/// Whether ext group `g` carries a superblock backup.
fn ext_has_super(g: u64, sparse: bool, sparse2: Option<[u64; 2]>) -> bool {
    if g == 0 {
        return true;
    }
    if let Some(b) = sparse2 {
        return g == b[0] || g == b[1];
    }
    if !sparse || g == 1 {
        return true;
    }
    [3u64, 5, 7].iter().any(|&p| {
        let mut x = p;
        while x < g {
            x *= p;
        }
        x == g
    })
}

/// Unused byte ranges (volume-relative) of an ext2/3/4 filesystem.
pub fn ext_unused(view: &dyn ReadAt) -> Result<Vec<Range<u64>>, String> {
    let sb = Superblock::decode(&rd(view, SUPERBLOCK_OFFSET, SUPERBLOCK_LEN)?)
        .map_err(|e| e.to_string())?;
    if sb.incompat & INCOMPAT_RECOVER != 0 {
        return Err(
            "journal needs recovery; no free space claimed (mount or fsck the filesystem once)"
                .into(),
        );
    }
    if sb.incompat & INCOMPAT_META_BG != 0 {
        return Err("meta_bg layout is not read; no free space claimed".into());
    }
    if sb.ro_compat & RO_COMPAT_BIGALLOC != 0 {
        return Err("bigalloc is not read; no free space claimed".into());
    }
    sb.check().map_err(|e| e.to_string())?;
    let (bs, blocks, first_data, per_group) = (
        sb.block_size,
        sb.blocks,
        sb.first_data_block,
        sb.blocks_per_group,
    );
    if blocks.saturating_mul(bs) > view.size() {
        return Err(format!(
            "geometry does not fit ({blocks} blocks of {bs} bytes, volume {} bytes)",
            view.size()
        ));
    }
    let csum = sb.ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM) != 0;
    let sparse = sb.ro_compat & RO_COMPAT_SPARSE_SUPER != 0;
    let sparse2 = sb.sparse_super2();
    let groups = sb.groups();
    let desc_size = sb.desc_size;
    // Checked before any work: the descriptors and one bitmap block per group are all
    // this reads, so bound them (a hostile image may claim exabytes of sparse disk).
    if groups.saturating_mul(desc_size) > MAX_BITMAP_BYTES
        || groups.saturating_mul(bs) > MAX_BITMAP_BYTES
    {
        return Err(format!(
            "{groups} block groups of {bs}-byte bitmaps exceed the {} MiB bitmap limit",
            MAX_BITMAP_BYTES >> 20
        ));
    }
    let gdt_blocks = (groups * desc_size).div_ceil(bs);
    let gdt = rd(view, sb.gdt_offset(), (gdt_blocks * bs) as usize)?;
    let it_blocks = (sb.inodes_per_group * sb.inode_size).div_ceil(bs);
    // Every group's bitmaps and inode table, as merged block ranges: what a group
    // without a bitmap on disk (BLOCK_UNINIT) may contain besides superblock backups.
    let mut meta: Vec<Range<u64>> = Vec::with_capacity(groups as usize * 3);
    let descs: Vec<GroupDesc> = (0..groups)
        .map(|g| {
            let d = sb.group(&gdt, g)?;
            meta.push(d.block_bitmap..d.block_bitmap.saturating_add(1));
            meta.push(d.inode_bitmap..d.inode_bitmap.saturating_add(1));
            meta.push(d.inode_table..d.inode_table.saturating_add(it_blocks));
            Ok(d)
        })
        .collect::<Result<_, Short>>()?;
    meta.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(meta.len());
    for r in meta {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    let mut out = Vec::new();
    for (g, d) in descs.iter().enumerate() {
        let g = g as u64;
        let gstart = first_data + g * per_group;
        let count = per_group.min(blocks - gstart);
        let gend = gstart + count;
        let bitmap = if csum && d.flags & BG_BLOCK_UNINIT != 0 {
            // No bitmap on disk: rebuild it the way the kernel does. Work is bounded by
            // the group's size: only the metadata ranges that overlap it are visited.
            let mut b = vec![0u8; bs as usize];
            let mut mark = |r: Range<u64>| {
                for x in r.start.max(gstart)..r.end.min(gend) {
                    let i = x - gstart;
                    b[(i / 8) as usize] |= 1 << (i % 8);
                }
            };
            if ext_has_super(g, sparse, sparse2) {
                mark(gstart..gstart.saturating_add(1 + gdt_blocks + sb.reserved_gdt_blocks));
            }
            let first = merged.partition_point(|r| r.end <= gstart);
            for r in merged[first..].iter().take_while(|r| r.start < gend) {
                mark(r.clone());
            }
            b
        } else {
            if d.block_bitmap >= blocks || d.block_bitmap == 0 {
                return Err(format!(
                    "group {g} block bitmap at block {} is outside the filesystem",
                    d.block_bitmap
                ));
            }
            rd(view, d.block_bitmap * bs, bs as usize)?
        };
        clear_runs(&bitmap, count, bs, gstart * bs, &mut out);
    }
    Ok(out)
}

/// Unused byte ranges (volume-relative) of an NTFS volume, from `$Bitmap`.
pub fn ntfs_unused(view: &Slice) -> Result<Vec<Range<u64>>, String> {
    let mut cur = ReadAtCursor::new(view.clone());
    let ntfs = ntfs::Ntfs::new(&mut cur).map_err(|e| format!("ntfs boot sector: {e}"))?;
    let info = ntfs
        .volume_info(&mut cur)
        .map_err(|e| format!("ntfs $Volume: {e}"))?;
    if info
        .flags()
        .contains(ntfs::structured_values::NtfsVolumeFlags::IS_DIRTY)
    {
        return Err(
            "volume is marked dirty; no free space claimed (run chkdsk in the guest)".into(),
        );
    }
    let cs = ntfs.cluster_size() as u64;
    let clusters = ntfs.size().min(view.size()) / cs;
    let file = ntfs
        .file(&mut cur, 6)
        .map_err(|e| format!("ntfs $Bitmap record: {e}"))?;
    let item = file
        .data(&mut cur, "")
        .ok_or("ntfs $Bitmap has no data")?
        .map_err(|e| format!("ntfs $Bitmap data: {e}"))?;
    let attr = item
        .to_attribute()
        .map_err(|e| format!("ntfs $Bitmap attribute: {e}"))?;
    let value = attr
        .value(&mut cur)
        .map_err(|e| format!("ntfs $Bitmap value: {e}"))?;
    let len = value.len();
    if len > MAX_BITMAP_BYTES {
        return Err(format!("ntfs $Bitmap of {len} bytes is too large"));
    }
    let mut bits = vec![0u8; len as usize];
    use std::io::Read as _;
    value
        .attach(&mut cur)
        .read_exact(&mut bits)
        .map_err(|e| format!("ntfs $Bitmap read: {e}"))?;
    let count = clusters.min(len * 8);
    let mut out = Vec::new();
    clear_runs(&bits, count, cs, 0, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_runs_merges_and_respects_count() {
        let mut out = Vec::new();
        // bits: 0b0000_0110 → units 0,3..8 clear (count 8); 0xff → none.
        clear_runs(&[0b0000_0110, 0xff, 0x00], 20, 10, 1000, &mut out);
        assert_eq!(out, vec![1000..1010, 1030..1080, 1160..1200]);
    }

    #[test]
    fn zero_unused_touches_only_claimed_bytes() {
        let map = UnusedMap {
            ranges: vec![2..4, 6..7],
            volumes: vec![],
        };
        let mut b = [1u8; 8];
        map.zero_unused(&mut b, 0);
        assert_eq!(b, [1, 1, 0, 0, 1, 1, 0, 1]);
        let mut b = [1u8; 3];
        map.zero_unused(&mut b, 3);
        assert_eq!(b, [0, 1, 1]);
        assert!(map.is_unused(2..4));
        assert!(!map.is_unused(2..5));
    }

    #[test]
    fn superblock_backups_follow_sparse_super() {
        let has: Vec<u64> = (0..30).filter(|&g| ext_has_super(g, true, None)).collect();
        assert_eq!(has, vec![0, 1, 3, 5, 7, 9, 25, 27]);
    }
}
