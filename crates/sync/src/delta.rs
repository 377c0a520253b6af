//! Version deltas at 4 KiB granularity: "copy these blocks from the old version" plus the
//! blocks that are new, as one zstd stream.
//!
//! The server computes a delta from its block tables (cached per version pair); the laptop
//! applies it against its verified copy of the old version and checks every chunk it
//! builds against the new signed manifest, so the delta itself needs no trust: a chunk
//! that does not hash to the manifest's id is dropped and fetched whole instead.
//!
//! Only chunks whose id does not occur in the old version are described (the laptop has
//! every chunk of the old version already).
//!
//! Format (frozen; new magic for v2). The whole stream is one zstd frame of:
//!
//! ```text
//! header := "TNDDLT\0\x01" | from u64 | to u64 | chunk_size u32 | reserved u32   (32 bytes)
//! entry  := chunk_index u64 | op+ (covering exactly the chunk's 4 KiB blocks)
//! op     := 0 (copy)    | count u32 | src_block u64   blocks src.. of the old version
//!         | 1 (literal) | count u32 | the bytes of those blocks of the new version
//!         | 2 (zero)    | count u32
//! end    := 0xFFFF_FFFF_FFFF_FFFF
//! ```
//! Integers are little-endian. Entries come in increasing chunk order. The last block of
//! an image whose size is not a multiple of 4 KiB is short; its literal bytes are short too.

use std::collections::HashMap;
use std::io::{Read, Write};

use tandem_proto::manifest::Manifest;
use tandem_proto::ChunkId;
use tandem_store::ingest::{block_hash, BlockHash, BLOCK_SIZE};
use tandem_store::{ImageReader, Store};

use crate::SyncError;

/// First bytes of a decompressed delta.
pub const DELTA_MAGIC: [u8; 8] = *b"TNDDLT\0\x01";
const HEADER_LEN: usize = 32;
const OP_COPY: u8 = 0;
const OP_LITERAL: u8 = 1;
const OP_ZERO: u8 = 2;
const END: u64 = u64::MAX;
/// zstd level for deltas: computed once per version pair and sent to many laptops.
const DELTA_LEVEL: i32 = 9;

/// Sizes of a computed delta.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DeltaStats {
    /// Chunks described.
    pub chunks: u64,
    /// Blocks copied from the old version.
    pub copied_blocks: u64,
    /// Blocks sent as literals.
    pub literal_blocks: u64,
    /// All-zero blocks.
    pub zero_blocks: u64,
}

fn delta_err(reason: impl Into<String>) -> SyncError {
    SyncError::Delta {
        reason: reason.into(),
    }
}

fn blocks_of(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE as u64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Copy(u64),
    Literal,
    Zero,
}

/// Computes the delta `old -> new` into `out` (compressed).
pub fn compute(
    store: &Store,
    old: &Manifest,
    old_blocks: &[BlockHash],
    new: &Manifest,
    new_blocks: &[BlockHash],
    out: &mut dyn Write,
) -> Result<DeltaStats, SyncError> {
    if old_blocks.len() as u64 != blocks_of(old.size)
        || new_blocks.len() as u64 != blocks_of(new.size)
    {
        return Err(delta_err(
            "a block table does not match its manifest's size",
        ));
    }
    let zero = block_hash(&[0u8; BLOCK_SIZE]);
    let mut old_map: HashMap<BlockHash, u64> = HashMap::with_capacity(old_blocks.len());
    for (i, h) in old_blocks.iter().enumerate() {
        if *h != zero {
            old_map.entry(*h).or_insert(i as u64);
        }
    }
    let old_ids = old.chunk_set();
    let io = |e: std::io::Error| delta_err(format!("writing delta: {e}"));
    let mut z = zstd::stream::Encoder::new(out, DELTA_LEVEL).map_err(io)?;
    let mut head = Vec::with_capacity(HEADER_LEN);
    head.extend_from_slice(&DELTA_MAGIC);
    head.extend_from_slice(&old.version.to_le_bytes());
    head.extend_from_slice(&new.version.to_le_bytes());
    head.extend_from_slice(&new.chunk_size.to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    z.write_all(&head).map_err(io)?;
    let bpc = u64::from(new.chunk_size) / BLOCK_SIZE as u64;
    let mut stats = DeltaStats::default();
    for (i, id) in new.chunks.iter().enumerate() {
        let Some(id) = id else { continue };
        if old_ids.contains(id) {
            continue;
        }
        stats.chunks += 1;
        let first = i as u64 * bpc;
        let last = (first + bpc).min(new_blocks.len() as u64);
        let kinds: Vec<Kind> = (first..last)
            .map(|b| {
                let h = &new_blocks[b as usize];
                if *h == zero {
                    Kind::Zero
                } else if let Some(src) = old_map.get(h) {
                    Kind::Copy(*src)
                } else {
                    Kind::Literal
                }
            })
            .collect();
        let data = if kinds.contains(&Kind::Literal) {
            Some(store.get(*id)?)
        } else {
            None
        };
        z.write_all(&(i as u64).to_le_bytes()).map_err(io)?;
        let mut k = 0usize;
        while k < kinds.len() {
            let mut n = 1usize;
            while k + n < kinds.len() {
                let same = match (kinds[k], kinds[k + n]) {
                    (Kind::Copy(a), Kind::Copy(b)) => b == a + n as u64,
                    (a, b) => a == b,
                };
                if !same {
                    break;
                }
                n += 1;
            }
            match kinds[k] {
                Kind::Copy(src) => {
                    z.write_all(&[OP_COPY]).map_err(io)?;
                    z.write_all(&(n as u32).to_le_bytes()).map_err(io)?;
                    z.write_all(&src.to_le_bytes()).map_err(io)?;
                    stats.copied_blocks += n as u64;
                }
                Kind::Zero => {
                    z.write_all(&[OP_ZERO]).map_err(io)?;
                    z.write_all(&(n as u32).to_le_bytes()).map_err(io)?;
                    stats.zero_blocks += n as u64;
                }
                Kind::Literal => {
                    let data = data.as_ref().expect("read when a literal exists");
                    let s = k * BLOCK_SIZE;
                    let e = ((k + n) * BLOCK_SIZE).min(data.len());
                    z.write_all(&[OP_LITERAL]).map_err(io)?;
                    z.write_all(&(n as u32).to_le_bytes()).map_err(io)?;
                    z.write_all(&data[s..e]).map_err(io)?;
                    stats.literal_blocks += n as u64;
                }
            }
            k += n;
        }
    }
    z.write_all(&END.to_le_bytes()).map_err(io)?;
    z.finish().map_err(io)?;
    Ok(stats)
}

/// What applying a delta produced.
#[derive(Debug, Clone, Default)]
pub struct ApplyStats {
    /// Chunks built and verified against the manifest.
    pub built: u64,
    /// Chunk indexes whose result did not match the manifest (to be fetched whole).
    pub mismatched: Vec<u64>,
}

fn read_u64(r: &mut dyn Read) -> Result<u64, SyncError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)
        .map_err(|e| delta_err(format!("truncated or damaged delta: {e}")))?;
    Ok(u64::from_le_bytes(b))
}

fn read_u32(r: &mut dyn Read) -> Result<u32, SyncError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)
        .map_err(|e| delta_err(format!("truncated or damaged delta: {e}")))?;
    Ok(u32::from_le_bytes(b))
}

/// Applies a compressed delta read from `input` against `old`, producing chunks of `new`.
/// `sink` receives each chunk that hashes to the manifest's id (and only those).
pub fn apply(
    input: &mut dyn Read,
    old: &ImageReader,
    new: &Manifest,
    sink: &mut dyn FnMut(ChunkId, Vec<u8>) -> Result<(), SyncError>,
) -> Result<ApplyStats, SyncError> {
    apply_from(input, old.manifest().version, old, new, sink)
}

/// [`apply`] against any random-access view of version `old_version` (the decoder alone,
/// without a store: what the fuzzer and tests feed).
pub fn apply_from(
    input: &mut dyn Read,
    old_version: u64,
    old: &dyn tandem_disk::ReadAt,
    new: &Manifest,
    sink: &mut dyn FnMut(ChunkId, Vec<u8>) -> Result<(), SyncError>,
) -> Result<ApplyStats, SyncError> {
    let mut z = zstd::stream::Decoder::new(input)
        .map_err(|e| delta_err(format!("not a zstd stream: {e}")))?;
    let mut head = [0u8; HEADER_LEN];
    z.read_exact(&mut head)
        .map_err(|e| delta_err(format!("truncated or damaged delta header: {e}")))?;
    if head[..8] != DELTA_MAGIC {
        return Err(delta_err("not a tandem delta (bad magic)"));
    }
    let from = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    let to = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));
    let cs = u32::from_le_bytes(head[24..28].try_into().expect("4 bytes"));
    if from != old_version || to != new.version || cs != new.chunk_size {
        return Err(delta_err(format!(
            "delta is v{from}->v{to} (chunk size {cs}), wanted v{}->v{} (chunk size {})",
            old_version, new.version, new.chunk_size
        )));
    }
    let old_size = old.size();
    let mut stats = ApplyStats::default();
    let mut next_min = 0u64;
    loop {
        let index = read_u64(&mut z)?;
        if index == END {
            break;
        }
        if index < next_min || index >= new.chunks.len() as u64 {
            return Err(delta_err(format!(
                "chunk index {index} out of order or beyond the image"
            )));
        }
        next_min = index + 1;
        let len = new.chunk_len(index) as usize;
        let mut buf = vec![0u8; len];
        let nblocks = len.div_ceil(BLOCK_SIZE);
        let mut done = 0usize;
        while done < nblocks {
            let mut op = [0u8; 1];
            z.read_exact(&mut op)
                .map_err(|e| delta_err(format!("truncated or damaged delta: {e}")))?;
            let count = read_u32(&mut z)? as usize;
            if count == 0 || count > nblocks - done {
                return Err(delta_err(format!(
                    "op of {count} blocks overruns chunk {index}"
                )));
            }
            let s = done * BLOCK_SIZE;
            let e = ((done + count) * BLOCK_SIZE).min(len);
            match op[0] {
                OP_COPY => {
                    let src = read_u64(&mut z)?;
                    let at = src
                        .checked_mul(BLOCK_SIZE as u64)
                        .filter(|a| {
                            a.checked_add((e - s) as u64)
                                .is_some_and(|end| end <= old_size)
                        })
                        .ok_or_else(|| {
                            delta_err(format!("copy from block {src} lies beyond the old version"))
                        })?;
                    old.read_at(&mut buf[s..e], at)
                        .map_err(|err| SyncError::OldVersion {
                            version: old_version,
                            reason: err.to_string(),
                        })?;
                }
                OP_LITERAL => {
                    z.read_exact(&mut buf[s..e])
                        .map_err(|err| delta_err(format!("truncated or damaged delta: {err}")))?;
                }
                OP_ZERO => {}
                other => return Err(delta_err(format!("unknown op {other}"))),
            }
            done += count;
        }
        let id = ChunkId::of(&buf);
        if new.chunks[index as usize] == Some(id) {
            sink(id, buf)?;
            stats.built += 1;
        } else {
            tracing::warn!(
                chunk_index = index,
                "delta produced a chunk that does not match the manifest"
            );
            stats.mismatched.push(index);
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tandem_store::ingest::{ingest, FileSource, IngestOptions};

    fn publish(store: &Store, path: &std::path::Path, version: u64) -> (Manifest, Vec<BlockHash>) {
        let src = FileSource::open(path).expect("src");
        let opts = IngestOptions {
            chunk_size: 16384,
            block_hashes: true,
            threads: 2,
        };
        let r = ingest(store, &src, &opts, &|_| {}).expect("ingest");
        let m = Manifest {
            format: 1,
            name: "g".into(),
            version,
            size: r.size,
            chunk_size: 16384,
            chunks: r.chunks,
        };
        (m, r.block_hashes)
    }

    #[test]
    fn applying_delta_old_to_new_gives_new() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut v1 = vec![0u8; 40 * 4096 + 1000];
        for (i, b) in v1.iter_mut().enumerate().skip(8192) {
            *b = ((i * 7919) % 253) as u8;
        }
        let mut v2 = v1.clone();
        v2[4096..8192].fill(9); // new block
        let moved: Vec<u8> = v1[20 * 4096..22 * 4096].to_vec();
        v2[30 * 4096..32 * 4096].copy_from_slice(&moved); // moved blocks
        v2[12 * 4096..13 * 4096].fill(0); // zeroed block
        v2.extend_from_slice(&[5u8; 3000]); // grown, short tail
        std::fs::write(d.path().join("v1"), &v1).expect("w");
        std::fs::write(d.path().join("v2"), &v2).expect("w");
        let server = Store::open(&d.path().join("server")).expect("store");
        let (m1, b1) = publish(&server, &d.path().join("v1"), 1);
        let (m2, b2) = publish(&server, &d.path().join("v2"), 2);
        let mut delta = Vec::new();
        let st = compute(&server, &m1, &b1, &m2, &b2, &mut delta).expect("compute");
        assert!(st.copied_blocks >= 2 && st.literal_blocks >= 1, "{st:?}");

        // Laptop holds v1 only.
        let laptop = Arc::new(Store::open(&d.path().join("laptop")).expect("store"));
        publish(&laptop, &d.path().join("v1"), 1);
        let old = ImageReader::open(laptop.clone(), m1.clone()).expect("reader");
        let mut got = Vec::new();
        let r = apply(&mut &delta[..], &old, &m2, &mut |id, data| {
            got.push((id, data));
            Ok(())
        })
        .expect("apply");
        assert!(r.mismatched.is_empty());
        laptop
            .put_many(
                got.into_iter()
                    .map(|(id, d)| (id, tandem_store::Payload::Raw(d)))
                    .collect(),
            )
            .expect("put");
        let new = ImageReader::open(laptop, m2.clone()).expect("complete");
        let mut buf = vec![0u8; v2.len()];
        new.read_at(&mut buf, 0).expect("read");
        assert_eq!(buf, v2);

        // Truncated and tampered deltas are errors or mismatches, never wrong chunks.
        assert!(apply(
            &mut &delta[..delta.len() / 2],
            &old,
            &m2,
            &mut |_, _| Ok(())
        )
        .is_err());
        let mut raw = Vec::new();
        zstd::stream::copy_decode(&delta[..], &mut raw).expect("decode");
        let last = raw.len() - 20;
        raw[last] ^= 0xff;
        let tampered = zstd::bulk::compress(&raw, 3).expect("compress");
        let mut accepted = 0;
        let res = apply(&mut &tampered[..], &old, &m2, &mut |id, data| {
            assert_eq!(ChunkId::of(&data), id);
            accepted += 1;
            Ok(())
        });
        match res {
            Ok(r) => assert!(!r.mismatched.is_empty()),
            Err(e) => assert!(e.to_string().contains("delta"), "{e}"),
        }
    }
}
