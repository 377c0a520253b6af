//! Partition tables (MBR with logical partitions, GPT) and filesystem signatures.
//!
//! Parsed by hand with limits rather than through `gpt`/`mbrman`, whose APIs want a
//! writable `Read + Write + Seek` device and trust the table sizes they read. Limits: at
//! most [`MAX_GPT_ENTRIES`] GPT entries of at most 4 KiB each, at most [`MAX_LOGICAL`]
//! logical MBR partitions, and CRC32 checked on the GPT header and entry array (the backup
//! GPT is tried when the primary is damaged).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tandem_tools::bytes::{le16, le32, le64, Short};

use crate::view::{ReadAt, Slice};
use crate::DiskError;

/// Most GPT entries read (the UEFI default is 128).
pub const MAX_GPT_ENTRIES: u32 = 1024;
/// Most logical partitions followed in an MBR extended-partition chain.
pub const MAX_LOGICAL: usize = 128;

/// How a volume was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableKind {
    /// No partition table: the whole disk is one volume.
    Whole,
    /// A DOS/MBR primary or logical partition.
    Mbr,
    /// A GPT partition.
    Gpt,
}

/// One volume (partition or whole disk) of a disk, in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Partition number as tools print it (1-based; 0 for a whole-disk volume).
    pub index: u32,
    /// Table it came from.
    pub table: TableKind,
    /// Byte offset of the first byte on the disk.
    pub start: u64,
    /// Length in bytes as the table declares it (may run past a truncated disk).
    pub len: u64,
    /// The type: `0x83` for MBR, the type GUID for GPT, empty for a whole disk.
    pub type_id: String,
    /// GPT partition name, if any.
    pub name: Option<String>,
}

impl Volume {
    /// The volume as its own view; fails when it runs past the end of the disk.
    pub fn view(&self, disk: Arc<dyn ReadAt>) -> Result<Slice, DiskError> {
        Slice::new(disk, self.start, self.len)
    }
}

/// What a volume holds, from its on-disk signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsKind {
    /// ext2, ext3 or ext4.
    Ext,
    /// FAT12, FAT16 or FAT32.
    Fat,
    /// NTFS.
    Ntfs,
    /// A LUKS container (encrypted inside the guest).
    Luks,
    /// A BitLocker volume (encrypted inside the guest).
    Bitlocker,
    /// Linux swap.
    Swap,
    /// An LVM physical volume (logical volumes are not followed).
    Lvm,
    /// Nothing recognized.
    Unknown,
}

impl FsKind {
    /// Lower-case name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            FsKind::Ext => "ext",
            FsKind::Fat => "fat",
            FsKind::Ntfs => "ntfs",
            FsKind::Luks => "luks",
            FsKind::Bitlocker => "bitlocker",
            FsKind::Swap => "swap",
            FsKind::Lvm => "lvm",
            FsKind::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for FsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads `len` bytes at `offset`, or fewer when the view is shorter (signature probes).
fn read_upto(view: &dyn ReadAt, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let n = view.size().saturating_sub(offset).min(len as u64) as usize;
    let mut b = vec![0u8; n];
    if n > 0 {
        view.read_at(&mut b, offset)?;
    }
    Ok(b)
}

/// Recognizes the filesystem (or container) at the start of `view`.
pub fn detect_fs(view: &dyn ReadAt) -> std::io::Result<FsKind> {
    let head = read_upto(view, 0, 4096)?;
    let at = |o: usize, s: &[u8]| head.len() >= o + s.len() && &head[o..o + s.len()] == s;
    if at(0, b"LUKS\xba\xbe") {
        return Ok(FsKind::Luks);
    }
    if at(3, b"-FVE-FS-") {
        return Ok(FsKind::Bitlocker);
    }
    if at(3, b"NTFS    ") {
        return Ok(FsKind::Ntfs);
    }
    if at(1080, &[0x53, 0xef]) {
        return Ok(FsKind::Ext);
    }
    if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        return Ok(FsKind::Swap);
    }
    if at(512, b"LABELONE") {
        return Ok(FsKind::Lvm);
    }
    if head.len() >= 512 && looks_like_fat(&head) {
        return Ok(FsKind::Fat);
    }
    Ok(FsKind::Unknown)
}

/// A FAT boot sector: a jump, a sane BIOS parameter block and the boot signature.
fn looks_like_fat(b: &[u8]) -> bool {
    let (Ok(bps), Ok(reserved)) = (le16(b, 11), le16(b, 14)) else {
        return false;
    };
    let spc = b[13];
    let fats = b[16];
    (b[0] == 0xeb || b[0] == 0xe9)
        && b[510] == 0x55
        && b[511] == 0xaa
        && matches!(bps, 512 | 1024 | 2048 | 4096)
        && spc.is_power_of_two()
        && reserved >= 1
        && (1..=4).contains(&fats)
}

/// The volumes of a disk: GPT partitions, else MBR partitions, else the whole disk.
pub fn volumes(disk: &dyn ReadAt) -> Result<Vec<Volume>, DiskError> {
    let rd = |offset: u64, len: usize| {
        read_upto(disk, offset, len).map_err(|source| DiskError::ReadAt { offset, source })
    };
    let whole = || {
        vec![Volume {
            index: 0,
            table: TableKind::Whole,
            start: 0,
            len: disk.size(),
            type_id: String::new(),
            name: None,
        }]
    };
    let mbr = rd(0, 512)?;
    for ss in [512u64, 4096] {
        if let Some(v) = gpt(disk, ss)? {
            return Ok(v);
        }
    }
    if mbr.len() < 512 || mbr[510] != 0x55 || mbr[511] != 0xaa {
        return Ok(whole());
    }
    // A volume boot record (FAT/NTFS without a table) also ends in 55 AA.
    let fs = detect_fs(disk).map_err(|source| DiskError::ReadAt { offset: 0, source })?;
    if matches!(fs, FsKind::Fat | FsKind::Ntfs | FsKind::Bitlocker) {
        return Ok(whole());
    }
    let entries = mbr_entries(&mbr)?;
    if entries.iter().any(|e| e.status & 0x7f != 0) {
        return Ok(whole());
    }
    if entries.iter().any(|e| e.ty == 0xee) {
        return Err(DiskError::Table {
            detail: "protective MBR but no valid GPT (primary and backup are damaged)".into(),
        });
    }
    let mut out = Vec::new();
    let mut next_logical = 5;
    for (i, e) in entries.iter().enumerate() {
        if e.ty == 0 || e.sectors == 0 {
            continue;
        }
        if matches!(e.ty, 0x05 | 0x0f | 0x85) {
            logical(disk, e.lba as u64, &mut out, &mut next_logical)?;
            continue;
        }
        out.push(Volume {
            index: i as u32 + 1,
            table: TableKind::Mbr,
            start: e.lba as u64 * 512,
            len: e.sectors as u64 * 512,
            type_id: format!("{:#04x}", e.ty),
            name: None,
        });
    }
    if out.is_empty() {
        return Ok(whole());
    }
    Ok(out)
}

struct MbrEntry {
    status: u8,
    ty: u8,
    lba: u32,
    sectors: u32,
}

/// The four entries of a 512-byte MBR or EBR sector.
fn mbr_entries(sector: &[u8]) -> Result<Vec<MbrEntry>, DiskError> {
    let short = |e: Short| DiskError::Table {
        detail: format!("partition entry: {e}"),
    };
    (0..4)
        .map(|i| {
            let e = &sector[446 + i * 16..446 + (i + 1) * 16];
            Ok(MbrEntry {
                status: e[0],
                ty: e[4],
                lba: le32(e, 8).map_err(short)?,
                sectors: le32(e, 12).map_err(short)?,
            })
        })
        .collect()
}

/// Follows the extended partition's EBR chain.
fn logical(
    disk: &dyn ReadAt,
    ext_start: u64,
    out: &mut Vec<Volume>,
    next: &mut u32,
) -> Result<(), DiskError> {
    let mut ebr = ext_start;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..MAX_LOGICAL {
        if !seen.insert(ebr) {
            return Err(DiskError::Table {
                detail: format!("extended partition chain loops at sector {ebr}"),
            });
        }
        let offset = ebr * 512;
        let s =
            read_upto(disk, offset, 512).map_err(|source| DiskError::ReadAt { offset, source })?;
        if s.len() < 512 || s[510] != 0x55 || s[511] != 0xaa {
            return Err(DiskError::Table {
                detail: format!("extended boot record at sector {ebr} has no signature"),
            });
        }
        let e = mbr_entries(&s)?;
        if e[0].ty != 0 && e[0].sectors != 0 {
            out.push(Volume {
                index: *next,
                table: TableKind::Mbr,
                start: (ebr + e[0].lba as u64) * 512,
                len: e[0].sectors as u64 * 512,
                type_id: format!("{:#04x}", e[0].ty),
                name: None,
            });
            *next += 1;
        }
        if e[1].ty == 0 || e[1].lba == 0 {
            return Ok(());
        }
        ebr = ext_start + e[1].lba as u64;
    }
    Err(DiskError::Table {
        detail: format!("more than {MAX_LOGICAL} logical partitions"),
    })
}

/// The GPT with `ss`-byte sectors, primary first then backup; `None` when neither exists.
fn gpt(disk: &dyn ReadAt, ss: u64) -> Result<Option<Vec<Volume>>, DiskError> {
    let last_lba = (disk.size() / ss).saturating_sub(1);
    let mut first_err = None;
    for lba in [1, last_lba] {
        if lba == 0 {
            continue;
        }
        match gpt_at(disk, ss, lba) {
            Ok(Some(v)) => return Ok(Some(v)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(lba, error = %e, "damaged GPT header");
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

fn gpt_at(disk: &dyn ReadAt, ss: u64, lba: u64) -> Result<Option<Vec<Volume>>, DiskError> {
    let offset = lba * ss;
    let h = read_upto(disk, offset, 512).map_err(|source| DiskError::ReadAt { offset, source })?;
    if h.len() < 92 || &h[..8] != b"EFI PART" {
        return Ok(None);
    }
    let bad = |detail: String| DiskError::Table { detail };
    let short = |e: Short| bad(format!("GPT header at LBA {lba}: {e}"));
    let hsize = le32(&h, 12).map_err(short)? as usize;
    if !(92..=512).contains(&hsize) {
        return Err(bad(format!("GPT header at LBA {lba} has size {hsize}")));
    }
    let mut hc = h[..hsize].to_vec();
    hc[16..20].fill(0);
    if crc32(&hc) != le32(&h, 16).map_err(short)? {
        return Err(bad(format!("GPT header at LBA {lba} fails its CRC")));
    }
    let entries_lba = le64(&h, 72).map_err(short)?;
    let count = le32(&h, 80).map_err(short)?;
    let esize = le32(&h, 84).map_err(short)?;
    if count > MAX_GPT_ENTRIES || !(128..=4096).contains(&esize) || !esize.is_multiple_of(8) {
        return Err(bad(format!(
            "GPT at LBA {lba}: {count} entries of {esize} bytes is out of bounds"
        )));
    }
    let bytes = count as usize * esize as usize;
    let eoff = entries_lba
        .checked_mul(ss)
        .ok_or_else(|| bad("GPT entry array offset overflows".into()))?;
    let arr = read_upto(disk, eoff, bytes).map_err(|source| DiskError::ReadAt {
        offset: eoff,
        source,
    })?;
    if arr.len() < bytes {
        return Err(bad(format!(
            "GPT entry array at LBA {entries_lba} lies past the end of the disk"
        )));
    }
    if crc32(&arr) != le32(&h, 88).map_err(short)? {
        return Err(bad(format!(
            "GPT entry array at LBA {entries_lba} fails its CRC"
        )));
    }
    let mut out = Vec::new();
    for (i, e) in arr.chunks_exact(esize as usize).enumerate() {
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let entry = |at| le64(e, at).map_err(|s| bad(format!("GPT partition {}: {s}", i + 1)));
        let (first, last) = (entry(32)?, entry(40)?);
        if last < first {
            return Err(bad(format!(
                "GPT partition {} ends before it starts",
                i + 1
            )));
        }
        let name: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map_while(|c| le16(c, 0).ok())
            .take_while(|&c| c != 0)
            .collect();
        let name = String::from_utf16_lossy(&name);
        out.push(Volume {
            index: i as u32 + 1,
            table: TableKind::Gpt,
            start: first.saturating_mul(ss),
            len: (last - first + 1).saturating_mul(ss),
            type_id: guid_string(e.first_chunk().expect("GPT entries are at least 128 bytes")),
            name: (!name.is_empty()).then_some(name),
        });
    }
    Ok(Some(out))
}

/// A GUID in its mixed-endian text form.
fn guid_string(g: &[u8; 16]) -> String {
    let [a0, a1, a2, a3, b0, b1, c0, c1, d0, d1, node @ ..] = *g;
    format!(
        "{:08x}-{:04x}-{:04x}-{d0:02x}{d1:02x}-{}",
        u32::from_le_bytes([a0, a1, a2, a3]),
        u16::from_le_bytes([b0, b1]),
        u16::from_le_bytes([c0, c1]),
        node.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// CRC-32 (IEEE 802.3, reflected), as GPT uses.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::MemDisk;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn blank_disk_is_one_whole_volume() {
        let d = MemDisk(vec![0u8; 1 << 20]);
        let v = volumes(&d).expect("parses");
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].table, TableKind::Whole);
        assert_eq!(detect_fs(&d).expect("reads"), FsKind::Unknown);
    }

    #[test]
    fn mbr_with_a_looping_extended_chain_is_an_error_not_a_hang() {
        let mut d = vec![0u8; 1 << 20];
        d[510] = 0x55;
        d[511] = 0xaa;
        // Primary 1: extended at sector 8.
        d[446 + 4] = 0x05;
        d[446 + 8..446 + 12].copy_from_slice(&8u32.to_le_bytes());
        d[446 + 12..446 + 16].copy_from_slice(&100u32.to_le_bytes());
        // EBR at sector 8 points to itself as the next EBR.
        let e = 8 * 512;
        d[e + 510] = 0x55;
        d[e + 511] = 0xaa;
        d[e + 446 + 16 + 4] = 0x05;
        // Relative LBA 0 would end the chain; a self-loop needs the EBR at ext+0... use 8+8.
        d[e + 446 + 16 + 8..e + 446 + 16 + 12].copy_from_slice(&8u32.to_le_bytes());
        let e2 = 16 * 512;
        d[e2 + 510] = 0x55;
        d[e2 + 511] = 0xaa;
        d[e2 + 446 + 16 + 4] = 0x05;
        d[e2 + 446 + 16 + 8..e2 + 446 + 16 + 12].copy_from_slice(&8u32.to_le_bytes());
        let err = volumes(&MemDisk(d)).expect_err("loop");
        assert!(err.to_string().contains("loops"), "{err}");
    }
}
