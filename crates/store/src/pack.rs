//! Pack files: append-only files of chunk records.
//!
//! Layout (frozen; add a new magic for v2, never edit v1):
//!
//! ```text
//! file   := MAGIC (8 bytes, "TNDPACK\x01") record*
//! record := header (48 bytes) payload (stored_len bytes)
//! header := "TCHK" (4) | chunk id (32) | flags u32 LE | raw_len u32 LE | stored_len u32 LE
//! flags  := bit 0 zstd-compressed, bit 1 AEAD-sealed (payload = 24-byte nonce || ciphertext+tag)
//! ```
//!
//! A record repeats its chunk id so a stale index entry or a misplaced offset is detected
//! (the id in the header must match the one looked up) and so a pack can be audited
//! without the index. Records are never modified in place: GC copies live records into a
//! new pack and deletes the old file.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use tandem_proto::ChunkId;

/// First 8 bytes of every pack file.
pub const PACK_MAGIC: [u8; 8] = *b"TNDPACK\x01";
/// Marks the start of a record.
pub const RECORD_MAGIC: [u8; 4] = *b"TCHK";
/// Size of a record header.
pub const HEADER_LEN: usize = 48;
const _: () = assert!(HEADER_LEN == 4 + 32 + 4 + 4 + 4);
/// Payload is zstd-compressed.
pub const FLAG_ZSTD: u32 = 1;
/// Payload is sealed with the store's data key.
pub const FLAG_AEAD: u32 = 2;
/// A pack is closed and a new one started past this size.
pub const PACK_TARGET_SIZE: u64 = 64 << 20;

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Chunk the record holds.
    pub id: ChunkId,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Plaintext length.
    pub raw_len: u32,
    /// Payload length on disk.
    pub stored_len: u32,
}

impl RecordHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&RECORD_MAGIC);
        h[4..36].copy_from_slice(self.id.as_bytes());
        h[36..40].copy_from_slice(&self.flags.to_le_bytes());
        h[40..44].copy_from_slice(&self.raw_len.to_le_bytes());
        h[44..48].copy_from_slice(&self.stored_len.to_le_bytes());
        h
    }

    /// Decodes a header; `None` when the magic is wrong.
    pub fn decode(h: &[u8; HEADER_LEN]) -> Option<RecordHeader> {
        if h[..4] != RECORD_MAGIC {
            return None;
        }
        let u =
            |r: std::ops::Range<usize>| u32::from_le_bytes(h[r].try_into().expect("4-byte slice"));
        let mut id = [0u8; 32];
        id.copy_from_slice(&h[4..36]);
        Some(RecordHeader {
            id: ChunkId(id),
            flags: u(36..40),
            raw_len: u(40..44),
            stored_len: u(44..48),
        })
    }
}

/// File name of pack `id` under the packs directory.
pub fn pack_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.pack"))
}

/// Parses a pack file name back into its id.
pub fn parse_pack_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".pack")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// The pack this process is currently appending to. Each writer process creates its own
/// packs (random ids), so concurrent writers never share a file.
#[derive(Debug)]
pub struct PackWriter {
    /// Pack id.
    pub id: u64,
    file: File,
    /// Bytes written so far (the next record's offset).
    pub len: u64,
}

impl PackWriter {
    /// Creates a new, empty pack with a fresh random id.
    pub fn create(dir: &Path) -> std::io::Result<PackWriter> {
        loop {
            let id: u64 = rand::random();
            let path = pack_path(dir, id);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    file.write_all(&PACK_MAGIC)?;
                    return Ok(PackWriter {
                        id,
                        file,
                        len: PACK_MAGIC.len() as u64,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Appends a record and returns its offset.
    pub fn append(&mut self, header: &RecordHeader, payload: &[u8]) -> std::io::Result<u64> {
        let offset = self.len;
        let h = header.encode();
        self.file.write_all_at(&h, offset)?;
        self.file
            .write_all_at(payload, offset + HEADER_LEN as u64)?;
        self.len += (HEADER_LEN + payload.len()) as u64;
        Ok(offset)
    }

    /// Makes everything appended so far durable (before the index may point at it).
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// Reads a record header and payload at `offset` of an open pack.
pub fn read_record(file: &File, offset: u64) -> std::io::Result<(RecordHeader, Vec<u8>)> {
    let mut h = [0u8; HEADER_LEN];
    file.read_exact_at(&mut h, offset)?;
    let header = RecordHeader::decode(&h).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no record header at this offset",
        )
    })?;
    if header.stored_len as usize > crate::MAX_STORED_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("record claims {} stored bytes", header.stored_len),
        ));
    }
    let mut payload = vec![0u8; header.stored_len as usize];
    file.read_exact_at(&mut payload, offset + HEADER_LEN as u64)?;
    Ok((header, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_reads_back_what_was_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = PackWriter::create(dir.path()).expect("create");
        let mut offs = Vec::new();
        for i in 0..5u8 {
            let payload = vec![i; 100 + i as usize];
            let h = RecordHeader {
                id: ChunkId::of(&payload),
                flags: 0,
                raw_len: payload.len() as u32,
                stored_len: payload.len() as u32,
            };
            offs.push((w.append(&h, &payload).expect("append"), h, payload));
        }
        w.sync().expect("sync");
        let f = File::open(pack_path(dir.path(), w.id)).expect("open");
        for (off, h, payload) in offs {
            let (h2, p2) = read_record(&f, off).expect("read");
            assert_eq!(h2, h);
            assert_eq!(p2, payload);
        }
        assert!(read_record(&f, 9).is_err());
        assert_eq!(parse_pack_name(&format!("{:016x}.pack", w.id)), Some(w.id));
    }
}
