//! Ingest: cut a disk image into fixed chunks and store the new ones, on every core.
//!
//! Used by `tandem image publish` and reused by backups (any disk file). The source is read
//! sequentially by one thread in batches of about 8 MiB; each batch is hashed by all
//! workers (chunk ids and, when asked, the BLAKE3 of every 4 KiB block, truncated to 16
//! bytes, for delta computation), looked up in the index in one transaction, and the
//! chunks the store lacks are compressed by all workers and appended in one pack write +
//! one index transaction. All-zero chunks become holes (`None`) and are never stored.
//! A source may zero bytes it knows are unused ([`Source::zero_unused`]): free space
//! never travels.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use tandem_proto::ChunkId;

use crate::{Payload, Store, StoreError};

/// Block size of the block tables used for deltas.
pub const BLOCK_SIZE: usize = 4096;
/// A truncated BLAKE3 of one 4 KiB block.
pub type BlockHash = [u8; 16];

/// Something that can be ingested: a disk view read at offsets.
pub trait Source: Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Zeroes the bytes of `buf` (which holds the disk at `offset`) that a filesystem
    /// does not use; returns how many bytes it zeroed. Default: none.
    fn zero_unused(&self, _buf: &mut [u8], _offset: u64) -> u64 {
        0
    }
}

/// A raw image file.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    size: u64,
}

impl FileSource {
    /// Opens a raw image read-only.
    pub fn open(path: &Path) -> io::Result<FileSource> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(FileSource { file, size })
    }
}

impl Source for FileSource {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// How to ingest.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Chunk size (power of two, 4 KiB to 4 MiB).
    pub chunk_size: u32,
    /// Also compute the 4 KiB block table.
    pub block_hashes: bool,
    /// Worker threads (default: available cores).
    pub threads: usize,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            chunk_size: tandem_proto::manifest::DEFAULT_CHUNK_SIZE,
            block_hashes: false,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

/// What an ingest produced and what it cost.
#[derive(Debug, Clone, Default)]
pub struct IngestResult {
    /// Bytes read.
    pub size: u64,
    /// Chunk ids in disk order (`None` = hole).
    pub chunks: Vec<Option<ChunkId>>,
    /// 4 KiB block hashes in disk order (empty unless asked for).
    pub block_hashes: Vec<BlockHash>,
    /// Chunks that were all zeros.
    pub zero_chunks: u64,
    /// Non-zero chunks the store already had (from any version or within this image).
    pub dedup_chunks: u64,
    /// Chunks newly stored.
    pub new_chunks: u64,
    /// Plaintext bytes of the new chunks.
    pub new_raw_bytes: u64,
    /// Payload bytes written for the new chunks.
    pub new_stored_bytes: u64,
    /// Bytes the source zeroed as unused filesystem space.
    pub zeroed_free_bytes: u64,
}

/// Hash of one block, as kept in block tables.
pub fn block_hash(block: &[u8]) -> BlockHash {
    let mut h = [0u8; 16];
    h.copy_from_slice(&blake3::hash(block).as_bytes()[..16]);
    h
}

struct Hashed {
    id: Option<ChunkId>,
    blocks: Vec<BlockHash>,
    zeroed: u64,
}

/// Runs `f(i)` for every `i < n` on up to `threads` threads, results in order.
pub(crate) fn par_map<T: Send>(
    n: usize,
    threads: usize,
    f: &(dyn Fn(usize) -> T + Sync),
) -> Vec<T> {
    let threads = threads.clamp(1, n.max(1));
    if threads == 1 {
        return (0..n).map(f).collect();
    }
    let mut parts: Vec<Vec<(usize, T)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..threads)
            .map(|t| {
                s.spawn(move || {
                    (t..n)
                        .step_by(threads)
                        .map(|i| (i, f(i)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mine: Vec<(usize, T)> = (0..n).step_by(threads).map(|i| (i, f(i))).collect();
        let mut all = vec![mine];
        for h in handles {
            all.push(h.join().expect("ingest worker panicked"));
        }
        all
    });
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for part in parts.drain(..) {
        for (i, v) in part {
            out[i] = Some(v);
        }
    }
    out.into_iter()
        .map(|v| v.expect("every index is computed once"))
        .collect()
}

/// Ingests `src` into `store`. `progress` is called with the bytes processed so far.
pub fn ingest(
    store: &Store,
    src: &dyn Source,
    opts: &IngestOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<IngestResult, StoreError> {
    let _guard = store.ingest_guard()?;
    let size = src.size();
    let cs = opts.chunk_size as u64;
    let per_batch = ((8u64 << 20) / cs).max(1);
    let total_chunks = size.div_ceil(cs);
    let mut result = IngestResult {
        size,
        ..IngestResult::default()
    };
    let mut seen: HashSet<ChunkId> = HashSet::new();
    let mut uncommitted = Vec::new();
    let mut committed_upto = 0u64;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(u64, Vec<Vec<u8>>), StoreError>>(2);
    std::thread::scope(|s| -> Result<(), StoreError> {
        s.spawn(move || {
            let mut first = 0u64;
            while first < total_chunks {
                let last = (first + per_batch).min(total_chunks);
                let mut bufs = Vec::with_capacity((last - first) as usize);
                for i in first..last {
                    let off = i * cs;
                    let len = cs.min(size - off) as usize;
                    let mut b = vec![0u8; len];
                    if let Err(source) = src.read_at(&mut b, off) {
                        let _ = tx.send(Err(StoreError::Read {
                            offset: off,
                            source,
                        }));
                        return;
                    }
                    bufs.push(b);
                }
                if tx.send(Ok((first, bufs))).is_err() {
                    return;
                }
                first = last;
            }
        });
        for batch in rx {
            let (first, mut bufs) = batch?;
            let n = bufs.len();
            // Zero unused space and hash, in parallel.
            let hashed: Vec<Hashed> = {
                let cells: Vec<std::sync::Mutex<&mut Vec<u8>>> =
                    bufs.iter_mut().map(std::sync::Mutex::new).collect();
                par_map(n, opts.threads, &|i| {
                    let mut b = cells[i].lock().expect("buffer mutex poisoned");
                    let zeroed = src.zero_unused(&mut b, (first + i as u64) * cs);
                    let id = if b.iter().all(|&x| x == 0) {
                        None
                    } else {
                        Some(ChunkId::of(&b))
                    };
                    let blocks = if opts.block_hashes {
                        b.chunks(BLOCK_SIZE).map(block_hash).collect()
                    } else {
                        Vec::new()
                    };
                    Hashed { id, blocks, zeroed }
                })
            };
            let ids: Vec<ChunkId> = hashed.iter().filter_map(|h| h.id).collect();
            let present = store.contains_many(&ids)?;
            let mut have: HashSet<ChunkId> = ids
                .iter()
                .zip(present)
                .filter(|(_, p)| *p)
                .map(|(id, _)| *id)
                .collect();
            let mut todo = Vec::new();
            for (i, h) in hashed.iter().enumerate() {
                result.zeroed_free_bytes += h.zeroed;
                match h.id {
                    None => result.zero_chunks += 1,
                    Some(id) if have.contains(&id) || seen.contains(&id) => {
                        result.dedup_chunks += 1
                    }
                    Some(id) => {
                        have.insert(id);
                        seen.insert(id);
                        todo.push((i, id));
                    }
                }
            }
            let prepared = par_map(todo.len(), opts.threads, &|k| {
                let (i, id) = todo[k];
                store.prepare(id, Payload::Raw(bufs[i].clone()), false)
            });
            let prepared: Vec<_> = prepared.into_iter().collect::<Result<_, _>>()?;
            result.new_chunks += prepared.len() as u64;
            let (written, entries) = store.append_prepared(&prepared)?;
            result.new_stored_bytes += written;
            uncommitted.extend(entries);
            // One durable index commit per ~64 MiB of image, not per batch: fsyncs are
            // what limits ingest on ordinary disks.
            if (first + n as u64) * cs >= committed_upto + (64 << 20) {
                store.commit_entries(&uncommitted, false)?;
                uncommitted.clear();
                committed_upto = (first + n as u64) * cs;
            }
            result.new_raw_bytes += todo.iter().map(|(i, _)| bufs[*i].len() as u64).sum::<u64>();
            for h in hashed {
                result.chunks.push(h.id);
                result.block_hashes.extend(h.blocks);
            }
            progress(((first + n as u64) * cs).min(size));
        }
        Ok(())
    })?;
    store.commit_entries(&uncommitted, false)?;
    if result.chunks.len() as u64 != total_chunks {
        return Err(StoreError::Read {
            offset: result.chunks.len() as u64 * cs,
            source: io::Error::new(io::ErrorKind::UnexpectedEof, "source ended early"),
        });
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_skips_zeros_dedups_and_records_blocks() {
        let d = tempfile::tempdir().expect("tempdir");
        let img = d.path().join("a.raw");
        let mut data = vec![0u8; 16 * 65536 + 4096];
        let pattern: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        data[65536..131072].copy_from_slice(&pattern);
        data[3 * 65536..4 * 65536].copy_from_slice(&pattern); // duplicate
        data[16 * 65536..].fill(7); // short last chunk
        std::fs::write(&img, &data).expect("write");
        let store = Store::open(&d.path().join("s")).expect("store");
        let src = FileSource::open(&img).expect("src");
        let opts = IngestOptions {
            chunk_size: 65536,
            block_hashes: true,
            threads: 2,
        };
        let r = ingest(&store, &src, &opts, &|_| {}).expect("ingest");
        assert_eq!(r.chunks.len(), 17);
        assert_eq!(r.zero_chunks, 15 - 1);
        assert_eq!(r.new_chunks, 2);
        assert_eq!(r.dedup_chunks, 1);
        assert_eq!(r.block_hashes.len(), 16 * 16 + 1);
        assert_eq!(r.block_hashes[16], block_hash(&pattern[..4096]));
        assert_eq!(r.chunks[1], r.chunks[3]);
        // Second ingest of the same file stores nothing new.
        let r2 = ingest(&store, &src, &opts, &|_| {}).expect("ingest");
        assert_eq!(r2.new_chunks, 0);
        assert_eq!(r2.chunks, r.chunks);
    }
}
