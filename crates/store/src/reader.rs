//! Random access to one image version: a manifest over a store, read at any offset.
//!
//! Every chunk is verified on its way out (see [`crate::Store::get`]); a damaged chunk
//! becomes an I/O error for the caller (the guest sees EIO through NBD), is logged, and its
//! index entry is dropped so the next pull fetches it again. It is never served.
//! Decompressed chunks are kept in a small cache because guests read in 4 KiB pieces.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex};

use tandem_proto::manifest::Manifest;
use tandem_proto::ChunkId;

use crate::{Store, StoreError};

/// Default cache budget for decompressed chunks.
pub const DEFAULT_CACHE_BYTES: usize = 32 << 20;

#[derive(Debug, Default)]
struct Cache {
    map: HashMap<u64, Arc<Vec<u8>>>,
    order: VecDeque<u64>,
    cap: usize,
}

impl Cache {
    fn get(&self, i: u64) -> Option<Arc<Vec<u8>>> {
        self.map.get(&i).cloned()
    }
    fn put(&mut self, i: u64, data: Arc<Vec<u8>>) {
        if self.map.insert(i, data).is_none() {
            self.order.push_back(i);
        }
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

/// A read-only view of one image version.
#[derive(Debug)]
pub struct ImageReader {
    store: Arc<Store>,
    manifest: Manifest,
    cache: Mutex<Cache>,
}

impl ImageReader {
    /// Opens a version for reading; fails when any of its chunks is missing from the
    /// store (an incomplete version must not be served).
    pub fn open(store: Arc<Store>, manifest: Manifest) -> Result<ImageReader, StoreError> {
        Self::with_cache(store, manifest, DEFAULT_CACHE_BYTES)
    }

    /// Like [`ImageReader::open`] with a cache budget in bytes.
    pub fn with_cache(
        store: Arc<Store>,
        manifest: Manifest,
        cache_bytes: usize,
    ) -> Result<ImageReader, StoreError> {
        let ids: Vec<ChunkId> = manifest.chunk_set().into_iter().collect();
        let found = store.locate_many(&ids)?;
        if let Some((id, _)) = ids.iter().zip(&found).find(|(_, l)| l.is_none()) {
            return Err(StoreError::Missing(*id));
        }
        let cap = (cache_bytes / manifest.chunk_size as usize).max(2);
        Ok(ImageReader {
            store,
            manifest,
            cache: Mutex::new(Cache {
                cap,
                ..Cache::default()
            }),
        })
    }

    /// The manifest being served.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Virtual disk size.
    pub fn size(&self) -> u64 {
        self.manifest.size
    }

    fn chunk(&self, index: u64) -> io::Result<Option<Arc<Vec<u8>>>> {
        let Some(id) = self.manifest.chunks[index as usize] else {
            return Ok(None);
        };
        if let Some(c) = self.cache.lock().expect("cache mutex poisoned").get(index) {
            return Ok(Some(c));
        }
        match self.store.get(id) {
            Ok(data) => {
                let data = Arc::new(data);
                self.cache
                    .lock()
                    .expect("cache mutex poisoned")
                    .put(index, data.clone());
                Ok(Some(data))
            }
            Err(e) => {
                tracing::error!(
                    image = %self.manifest.name,
                    version = self.manifest.version,
                    chunk = %id,
                    "refusing to serve chunk: {e}"
                );
                if e.is_corrupt() {
                    if let Err(f) = self.store.forget(&[id]) {
                        tracing::warn!(chunk = %id, "could not drop damaged chunk from the index: {f}");
                    }
                }
                Err(io::Error::other(e))
            }
        }
    }

    /// Fills `buf` from holes and already-decoded chunks only, without any I/O; `false`
    /// (and `buf` partly written) when some chunk is not cached or the range is out of
    /// bounds. Lets an async server answer hot reads without a blocking thread.
    pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> bool {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.manifest.size)
        {
            return false;
        }
        let cs = u64::from(self.manifest.chunk_size);
        let cache = self.cache.lock().expect("cache mutex poisoned");
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / cs;
            let within = (pos % cs) as usize;
            let n = (cs as usize - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.manifest.chunks[index as usize] {
                None => out.fill(0),
                Some(_) => match cache.get(index) {
                    Some(c) => out.copy_from_slice(&c[within..within + n]),
                    None => return false,
                },
            }
            done += n;
        }
        true
    }

    /// Reads exactly `buf.len()` bytes at `offset`; past the end is `UnexpectedEof`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.manifest.size) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at {offset} is past the end of the image ({} bytes)",
                    buf.len(),
                    self.manifest.size
                ),
            ));
        }
        let cs = u64::from(self.manifest.chunk_size);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / cs;
            let within = (pos % cs) as usize;
            let n = (cs as usize - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.chunk(index)? {
                None => out.fill(0),
                Some(c) => out.copy_from_slice(&c[within..within + n]),
            }
            done += n;
        }
        Ok(())
    }
}

impl tandem_disk::ReadAt for ImageReader {
    fn size(&self) -> u64 {
        self.manifest.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        ImageReader::read_at(self, buf, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{ingest, FileSource, IngestOptions};

    #[test]
    fn reader_returns_the_ingested_bytes_at_any_offset() {
        let d = tempfile::tempdir().expect("tempdir");
        let img = d.path().join("disk.raw");
        let mut data = vec![0u8; 300_000];
        for (i, b) in data.iter_mut().enumerate().skip(70_000) {
            *b = (i % 251) as u8;
        }
        std::fs::write(&img, &data).expect("write");
        let store = Arc::new(Store::open(&d.path().join("store")).expect("store"));
        let src = FileSource::open(&img).expect("src");
        let opts = IngestOptions {
            chunk_size: 65536,
            ..IngestOptions::default()
        };
        let r = ingest(&store, &src, &opts, &|_| {}).expect("ingest");
        assert_eq!(r.chunks[0], None);
        let m = Manifest {
            format: 1,
            name: "t".into(),
            version: 1,
            size: r.size,
            chunk_size: 65536,
            chunks: r.chunks,
        };
        let reader = ImageReader::open(store, m).expect("open");
        for (off, len) in [
            (0u64, 10usize),
            (65530, 20),
            (70_000, 4096),
            (299_990, 10),
            (0, 300_000),
        ] {
            let mut buf = vec![1u8; len];
            reader.read_at(&mut buf, off).expect("read");
            assert_eq!(&buf[..], &data[off as usize..off as usize + len]);
        }
        let mut buf = [0u8; 20];
        assert!(reader.read_at(&mut buf, 299_990).is_err());
    }
}
