//! The ext2/3/4 superblock and group descriptors, decoded once for both readers of ext
//! metadata: the allocation map ([`crate::unused`]) and the scanner's file walker
//! (`tandem-scan`).
//!
//! [`Superblock::decode`] reads the fields and refuses what is not an ext superblock (no
//! magic, a block size past 64 KiB); [`Superblock::check`] refuses a geometry no kernel
//! would mount, so that sizes derived from it (groups, descriptor offsets, inode table
//! extents) are bounded before a caller reads anything they point at. Feature policy
//! (what to do with a journal that needs recovery, `meta_bg`, `bigalloc`) stays with each
//! caller: the allocation map claims nothing, the scanner falls back to `ext4-view`.

use tandem_tools::bytes::{le16, le32, Short};

/// Where the superblock starts on the volume.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
/// How many bytes [`Superblock::decode`] wants.
pub const SUPERBLOCK_LEN: usize = 1024;

/// `COMPAT_SPARSE_SUPER2`: superblock backups only in the two groups named.
pub const COMPAT_SPARSE_SUPER2: u32 = 0x200;
/// `INCOMPAT_RECOVER`: the journal needs replaying.
pub const INCOMPAT_RECOVER: u32 = 0x4;
/// `INCOMPAT_META_BG`: descriptors spread over meta block groups.
pub const INCOMPAT_META_BG: u32 = 0x10;
/// `INCOMPAT_64BIT`: 64-bit block numbers and descriptors of `desc_size` bytes.
pub const INCOMPAT_64BIT: u32 = 0x80;
/// `RO_COMPAT_SPARSE_SUPER`: superblock backups in groups 0, 1 and powers of 3, 5, 7.
pub const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
/// `RO_COMPAT_GDT_CSUM`: descriptors are checksummed (and `BLOCK_UNINIT` is honoured).
pub const RO_COMPAT_GDT_CSUM: u32 = 0x10;
/// `RO_COMPAT_BIGALLOC`: allocation in clusters of blocks.
pub const RO_COMPAT_BIGALLOC: u32 = 0x200;
/// `RO_COMPAT_METADATA_CSUM`: metadata is checksummed (and `BLOCK_UNINIT` is honoured).
pub const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
/// Group descriptor flag `BLOCK_UNINIT`: the group's block bitmap is not on disk.
pub const BG_BLOCK_UNINIT: u16 = 0x2;

/// The superblock is not one both readers can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    /// No ext magic.
    #[error("no ext superblock")]
    NotExt,
    /// `s_log_block_size` past 6 (64 KiB blocks).
    #[error("block size 1024<<{0} is invalid")]
    BlockSize(u32),
    /// The buffer is shorter than a superblock.
    #[error("ext superblock: {0}")]
    Short(#[from] Short),
    /// Sizes and counts that do not describe a filesystem.
    #[error("{0}")]
    Geometry(String),
}

/// The superblock fields Tandem reads, widened to `u64` where they size or place things.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Bytes per block (1 KiB to 64 KiB).
    pub block_size: u64,
    /// Blocks in the filesystem.
    pub blocks: u64,
    /// The block group 0 starts at (1 with 1 KiB blocks, else 0).
    pub first_data_block: u64,
    /// Blocks per group.
    pub blocks_per_group: u64,
    /// Inodes in the filesystem.
    pub inodes: u64,
    /// Inodes per group.
    pub inodes_per_group: u64,
    /// Bytes per inode record.
    pub inode_size: u64,
    /// Bytes per group descriptor.
    pub desc_size: u64,
    /// Blocks reserved after the descriptors for their growth.
    pub reserved_gdt_blocks: u64,
    /// Compatible feature flags.
    pub compat: u32,
    /// Incompatible feature flags.
    pub incompat: u32,
    /// Read-only-compatible feature flags.
    pub ro_compat: u32,
    /// The two backup groups of `sparse_super2` (meaningful only with that feature).
    pub backup_bgs: [u64; 2],
    /// The filesystem UUID.
    pub uuid: [u8; 16],
}

impl Superblock {
    /// Decodes the [`SUPERBLOCK_LEN`] bytes read at [`SUPERBLOCK_OFFSET`].
    pub fn decode(sb: &[u8]) -> Result<Superblock, SuperblockError> {
        if le16(sb, 0x38)? != 0xef53 {
            return Err(SuperblockError::NotExt);
        }
        let log = le32(sb, 0x18)?;
        if log > 6 {
            return Err(SuperblockError::BlockSize(log));
        }
        let incompat = le32(sb, 0x60)?;
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let f32 = |at| le32(sb, at).map(u64::from);
        let uuid = sb
            .get(0x68..0x78)
            .and_then(|u| u.try_into().ok())
            .ok_or(Short {
                at: 0x68,
                width: 16,
                len: sb.len(),
            })?;
        Ok(Superblock {
            block_size: 1024 << log,
            blocks: f32(0x4)? | if is64 { f32(0x150)? << 32 } else { 0 },
            first_data_block: f32(0x14)?,
            blocks_per_group: f32(0x20)?,
            inodes: f32(0)?,
            inodes_per_group: f32(0x28)?,
            inode_size: if le32(sb, 0x4c)? >= 1 {
                u64::from(le16(sb, 0x58)?)
            } else {
                128
            },
            desc_size: if is64 { u64::from(le16(sb, 0xfe)?) } else { 32 },
            reserved_gdt_blocks: u64::from(le16(sb, 0xce)?),
            compat: le32(sb, 0x5c)?,
            incompat,
            ro_compat: le32(sb, 0x64)?,
            backup_bgs: [f32(0x24c)?, f32(0x250)?],
            uuid,
        })
    }

    /// Refuses a geometry no kernel would mount: no blocks past the first data block,
    /// more blocks or inodes per group than bits in one bitmap block, descriptors outside
    /// 32..=1024 bytes (64 at least with 64-bit block numbers), inodes outside 128 bytes
    /// ..= one block.
    pub fn check(&self) -> Result<(), SuperblockError> {
        let bs = self.block_size;
        let bad = |d: String| Err(SuperblockError::Geometry(d));
        if self.blocks_per_group == 0
            || self.blocks_per_group > 8 * bs
            || self.blocks <= self.first_data_block
        {
            return bad(format!(
                "geometry does not fit ({} blocks of {bs} bytes, {} per group)",
                self.blocks, self.blocks_per_group
            ));
        }
        let min_desc = if self.is_64bit() { 64 } else { 32 };
        if !(min_desc..=1024).contains(&self.desc_size) || !(128..=bs).contains(&self.inode_size) {
            return bad(format!(
                "descriptor size {} or inode size {} out of range",
                self.desc_size, self.inode_size
            ));
        }
        // The inode bitmap is one block: more inodes per group than bits in a block is not
        // a filesystem (and would make the inode tables' extent absurd).
        if self.inodes_per_group == 0 || self.inodes_per_group > 8 * bs {
            return bad(format!(
                "{} inodes per group does not fit a {bs}-byte inode bitmap",
                self.inodes_per_group
            ));
        }
        Ok(())
    }

    /// Whether block numbers are 64-bit.
    pub fn is_64bit(&self) -> bool {
        self.incompat & INCOMPAT_64BIT != 0
    }

    /// The `sparse_super2` backup groups, when that feature is on.
    pub fn sparse_super2(&self) -> Option<[u64; 2]> {
        (self.compat & COMPAT_SPARSE_SUPER2 != 0).then_some(self.backup_bgs)
    }

    /// How many block groups there are (after [`check`](Self::check) passed).
    pub fn groups(&self) -> u64 {
        (self.blocks - self.first_data_block).div_ceil(self.blocks_per_group)
    }

    /// Where the group descriptor table starts on the volume.
    pub fn gdt_offset(&self) -> u64 {
        (self.first_data_block + 1) * self.block_size
    }

    /// Group `g`'s descriptor in the descriptor table `gdt` (read at
    /// [`gdt_offset`](Self::gdt_offset)).
    pub fn group(&self, gdt: &[u8], g: u64) -> Result<GroupDesc, Short> {
        let at = usize::try_from(g.saturating_mul(self.desc_size)).unwrap_or(usize::MAX);
        let end = at.saturating_add(self.desc_size as usize);
        let d = gdt.get(at..end).ok_or(Short {
            at,
            width: self.desc_size as usize,
            len: gdt.len(),
        })?;
        GroupDesc::decode(d, self.is_64bit())
    }
}

/// The group descriptor fields Tandem reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupDesc {
    /// Block of the group's block bitmap.
    pub block_bitmap: u64,
    /// Block of the group's inode bitmap.
    pub inode_bitmap: u64,
    /// First block of the group's inode table.
    pub inode_table: u64,
    /// `BG_*` flags.
    pub flags: u16,
}

impl GroupDesc {
    /// Decodes one descriptor (32 bytes, or `desc_size` with 64-bit block numbers).
    pub fn decode(d: &[u8], is64: bool) -> Result<GroupDesc, Short> {
        let block = |lo, hi| -> Result<u64, Short> {
            let high = if is64 {
                u64::from(le32(d, hi)?) << 32
            } else {
                0
            };
            Ok(u64::from(le32(d, lo)?) | high)
        };
        Ok(GroupDesc {
            block_bitmap: block(0, 0x20)?,
            inode_bitmap: block(4, 0x24)?,
            inode_table: block(8, 0x28)?,
            flags: le16(d, 0x12)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(incompat: u32, desc_size: u16) -> Vec<u8> {
        let mut sb = vec![0u8; SUPERBLOCK_LEN];
        let put32 =
            |sb: &mut [u8], at: usize, v: u32| sb[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put32(&mut sb, 0x0, 2048); // inodes
        put32(&mut sb, 0x4, 8192); // blocks
        put32(&mut sb, 0x18, 2); // 4 KiB blocks
        put32(&mut sb, 0x20, 32768); // blocks per group
        put32(&mut sb, 0x28, 2048); // inodes per group
        put32(&mut sb, 0x4c, 1); // dynamic revision
        put32(&mut sb, 0x60, incompat);
        sb[0x38..0x3a].copy_from_slice(&0xef53u16.to_le_bytes());
        sb[0x58..0x5a].copy_from_slice(&256u16.to_le_bytes());
        sb[0xfe..0x100].copy_from_slice(&desc_size.to_le_bytes());
        sb[0x68] = 0xab;
        sb
    }

    #[test]
    fn decodes_and_checks_a_plain_superblock() {
        let sb = Superblock::decode(&superblock(0, 0)).expect("decodes");
        sb.check().expect("sane");
        assert_eq!(
            (
                sb.block_size,
                sb.blocks,
                sb.groups(),
                sb.inode_size,
                sb.desc_size
            ),
            (4096, 8192, 1, 256, 32)
        );
        assert_eq!(
            (sb.gdt_offset(), sb.uuid[0], sb.sparse_super2()),
            (4096, 0xab, None)
        );
    }

    #[test]
    fn refuses_what_would_index_past_a_descriptor() {
        // 64-bit block numbers with 32-byte descriptors: the high halves lie past each one.
        let sb = Superblock::decode(&superblock(INCOMPAT_64BIT, 32)).expect("decodes");
        assert!(matches!(sb.check(), Err(SuperblockError::Geometry(_))));
        assert!(sb.group(&[0u8; 32], 0).is_err(), "short, not a panic");
        assert!(sb.group(&[0u8; 64], u64::MAX).is_err());
        let ok = Superblock::decode(&superblock(INCOMPAT_64BIT, 64)).expect("decodes");
        ok.check().expect("sane");
        let mut gdt = [0u8; 64];
        gdt[8] = 7;
        gdt[0x28] = 1;
        assert_eq!(ok.group(&gdt, 0).expect("fits").inode_table, (1 << 32) | 7);
    }

    #[test]
    fn refuses_non_ext_and_short_input() {
        let mut b = superblock(0, 0);
        b[0x38] = 0;
        assert_eq!(Superblock::decode(&b), Err(SuperblockError::NotExt));
        assert!(matches!(
            Superblock::decode(&superblock(0, 0)[..0x100]),
            Err(SuperblockError::Short(_))
        ));
        let mut b = superblock(0, 0);
        b[0x18] = 7;
        assert_eq!(Superblock::decode(&b), Err(SuperblockError::BlockSize(7)));
    }
}
