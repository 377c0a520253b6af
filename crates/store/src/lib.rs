//! Content-addressed chunk store: chunks in, verified chunks out.
//!
//! Used on the server (`<data>/store/`, plain) and on every laptop (`<dir>/store/`,
//! sealed with a per-store data key). A chunk is a slice of a disk image named by the
//! BLAKE3 hash of its plaintext ([`ChunkId`]); every read decrypts, decompresses and
//! re-hashes it, so a damaged chunk is an error naming the chunk, never wrong data.
//!
//! # Layout
//!
//! ```text
//! <root>/index.redb        redb database: table "chunks" id -> location, table "meta"
//! <root>/packs/<16 hex>.pack  append-only pack files (see [`pack`] for the record format)
//! <root>/lock              advisory lock file: ingest holds it shared, GC exclusive
//! ```
//!
//! - Payloads are zstd (level 3 on the server, 1 on laptops where it runs at sync time)
//!   when that shrinks them, raw otherwise; on a sealed store
//!   the payload is then sealed with XChaCha20-Poly1305 ([`crypto`]).
//! - The index maps a chunk id to `(pack, offset, stored_len, raw_len, flags, added)`.
//!   A record is written and made durable *before* its index entry is committed, so a crash
//!   leaves at most unreferenced bytes in a pack (GC reclaims them), never an entry that
//!   points at nothing.
//! - All-zero chunks are holes: manifests list them as `None`; they are never stored.
//!
//! # Concurrency
//!
//! redb allows one open handle per file, system-wide. The store therefore holds the index
//! only briefly: it is opened on demand (retrying while another process holds it), kept
//! across back-to-back operations (opening costs fsyncs), and closed after 20 ms idle or
//! 500 ms held. A cache of chunk locations in memory serves most lookups. Locations are checked on use: a record
//! header repeats its chunk id, so a stale cached location (its pack rewritten by GC) is
//! detected, dropped and looked up again. Each process appends to its own pack files.
//!
//! | operation                       | may overlap with                         | guarded by |
//! |---------------------------------|------------------------------------------|------------|
//! | ingest (publish, pull, upload)  | other ingests, reads, check              | `lock` shared; own packs; short index txns |
//! | read (NBD, chunk serving, pull) | everything                               | records carry their id; re-lookup on miss; open packs survive unlink |
//! | check                           | ingest, reads                            | read-only except dropping damaged entries |
//! | GC                              | reads (not ingest, not another GC)       | `lock` exclusive; grace period for entries newer than the last manifest |
//!
//! `tandem image publish --data DIR` therefore runs safely while `tandem server` serves the
//! same directory: both only hold the index for single transactions.
//!
//! # Garbage collection
//!
//! Mark: the caller passes the set of chunk ids referenced by every manifest it keeps.
//! Sweep: index entries not in the set and older than the grace period are deleted; a
//! pack whose live bytes fall under half of its size is rewritten (live records copied to
//! a new pack, index repointed, old file deleted); a pack with no live record is deleted.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod crypto;
pub mod ingest;
pub mod pack;
pub mod reader;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redb::{ReadableTable as _, TableDefinition};
use tandem_proto::ChunkId;
use tandem_tools::clock::now_secs as now;

pub use crypto::DataKey;
pub use ingest::{ingest, IngestOptions, IngestResult};
pub use reader::ImageReader;

use pack::{PackWriter, RecordHeader, FLAG_AEAD, FLAG_ZSTD};

/// Largest plaintext chunk (the largest manifest chunk size).
pub const MAX_CHUNK_LEN: usize = tandem_proto::manifest::MAX_CHUNK_SIZE as usize;
/// Largest payload a record may claim (compression overhead and AEAD framing included).
pub const MAX_STORED_LEN: usize = MAX_CHUNK_LEN + MAX_CHUNK_LEN / 64 + 4096;
/// zstd level on the server, where chunks are compressed once and sent to many laptops.
const ZSTD_LEVEL: i32 = 3;
/// zstd level on sealed (laptop) stores, where chunks are compressed while a sync applies.
const ZSTD_LEVEL_SEALED: i32 = 1;
const INDEX_FORMAT: u32 = 1;

/// Location tuple: (pack, offset, stored_len, raw_len, flags, added unix seconds).
type LocTuple = (u64, u64, u32, u32, u32, u64);
const CHUNKS: TableDefinition<&[u8; 32], LocTuple> = TableDefinition::new("chunks");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Where a chunk's record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Pack id.
    pub pack: u64,
    /// Offset of the record header in the pack.
    pub offset: u64,
    /// Payload bytes on disk.
    pub stored_len: u32,
    /// Plaintext bytes.
    pub raw_len: u32,
    /// `pack::FLAG_*` bits.
    pub flags: u32,
    /// When the entry was committed (unix seconds), for the GC grace period.
    pub added: u64,
}

impl Location {
    fn from_tuple(t: LocTuple) -> Self {
        Location {
            pack: t.0,
            offset: t.1,
            stored_len: t.2,
            raw_len: t.3,
            flags: t.4,
            added: t.5,
        }
    }
    fn to_tuple(self) -> LocTuple {
        (
            self.pack,
            self.offset,
            self.stored_len,
            self.raw_len,
            self.flags,
            self.added,
        )
    }
}

/// What went wrong in the store. Variants name the chunk, pack or file involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory of the store could not be used.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The index database failed.
    #[error("chunk index {path}: {message}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// What redb reported.
        message: String,
    },
    /// The index stayed locked by another process for too long.
    #[error("chunk index {path} is busy (held by another tandem process for over {secs} s); retry when it finishes")]
    Busy {
        /// The index file.
        path: PathBuf,
        /// How long we waited.
        secs: u64,
    },
    /// The chunk is not in the store.
    #[error("chunk {0} is not in the store")]
    Missing(ChunkId),
    /// The chunk is stored but does not read back as itself.
    #[error("chunk {id} in pack {pack:016x} at offset {offset} is damaged: {reason}; run `tandem store check` and pull again")]
    Corrupt {
        /// Chunk id.
        id: ChunkId,
        /// Pack id.
        pack: u64,
        /// Record offset.
        offset: u64,
        /// What failed (decrypt, decompress, hash).
        reason: String,
    },
    /// Data handed to the store does not hash to the id it was given.
    #[error("chunk content does not match its id {0}: refused")]
    Mismatch(ChunkId),
    /// A chunk larger than any manifest allows.
    #[error("chunk {id} is {len} bytes, more than the 4 MiB limit")]
    TooLarge {
        /// Chunk id.
        id: ChunkId,
        /// Its length.
        len: usize,
    },
    /// The store is sealed and no key (or the wrong key) was given, or the reverse.
    #[error("store {path}: {reason}")]
    Key {
        /// Store root.
        path: PathBuf,
        /// Which mismatch.
        reason: String,
    },
    /// The key file does not hold a key.
    #[error("data key file {path} is damaged; the store cannot be read without it")]
    BadKeyFile {
        /// The file.
        path: PathBuf,
    },
    /// The source being ingested could not be read.
    #[error("reading the image at offset {offset}: {source}")]
    Read {
        /// Byte offset in the source.
        offset: u64,
        /// Why.
        source: std::io::Error,
    },
    /// GC could not get the store to itself.
    #[error("store {path} is in use by a publish or pull; run gc again when it finishes")]
    InUse {
        /// Store root.
        path: PathBuf,
    },
}

impl StoreError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether the error means the chunk's stored copy is bad (fetch it again).
    pub fn is_corrupt(&self) -> bool {
        matches!(self, StoreError::Corrupt { .. })
    }
}

/// A chunk ready to be stored: the plaintext, or a zstd frame of it already checked by
/// the caller (saves recompressing what a server sent compressed).
#[derive(Debug, Clone)]
pub enum Payload {
    /// Plaintext; the store compresses it.
    Raw(Vec<u8>),
    /// zstd frame whose decompression the caller verified against the id.
    Zstd {
        /// Plaintext length.
        raw_len: u32,
        /// The frame.
        bytes: Vec<u8>,
    },
}

/// Counts from [`Store::stats`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StoreStats {
    /// Chunks in the index.
    pub chunks: u64,
    /// Sum of plaintext lengths.
    pub raw_bytes: u64,
    /// Sum of payload bytes on disk referenced by the index.
    pub stored_bytes: u64,
    /// Pack files.
    pub packs: u64,
    /// Total size of pack files (live and garbage).
    pub pack_bytes: u64,
}

/// One damaged or missing item found by [`Store::check`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Damage {
    /// Chunk id.
    pub chunk: String,
    /// Pack file name.
    pub pack: String,
    /// Record offset.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

/// Result of [`Store::check`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    /// Chunks read back and verified.
    pub verified: u64,
    /// Chunks that failed (their index entries were dropped so the next pull refetches).
    pub damaged: Vec<Damage>,
}

/// Result of [`Store::gc`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    /// Index entries removed.
    pub removed_chunks: u64,
    /// Packs rewritten (their live chunks copied).
    pub packs_rewritten: u64,
    /// Packs deleted.
    pub packs_deleted: u64,
    /// Bytes of pack files freed.
    pub bytes_freed: u64,
}

/// A chunk store rooted at one directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    index_path: PathBuf,
    packs_dir: PathBuf,
    key: Option<DataKey>,
    db: Arc<Mutex<Option<OpenIndex>>>,
    writer: Mutex<Option<PackWriter>>,
    locations: Mutex<HashMap<ChunkId, Location>>,
    open_packs: Mutex<HashMap<u64, Arc<File>>>,
}

/// The index while this process holds it. Opening and closing redb costs several fsyncs,
/// so a handle is kept across operations, but only briefly: it is closed after
/// [`INDEX_IDLE`] without use or [`INDEX_MAX_HOLD`] after opening, so another process
/// (a publish next to the server) gets its turn within milliseconds.
#[derive(Debug)]
struct OpenIndex {
    db: redb::Database,
    opened: std::time::Instant,
    used: std::time::Instant,
}

/// Close the index after this long without use.
const INDEX_IDLE: Duration = Duration::from_millis(20);
/// Close the index this long after opening it, busy or not.
const INDEX_MAX_HOLD: Duration = Duration::from_millis(500);

fn spawn_index_closer(slot: std::sync::Weak<Mutex<Option<OpenIndex>>>) {
    std::thread::spawn(move || loop {
        std::thread::sleep(INDEX_IDLE / 2);
        let Some(slot) = slot.upgrade() else { return };
        let mut guard = slot.lock().expect("index mutex poisoned");
        let close = guard
            .as_ref()
            .is_none_or(|o| o.used.elapsed() >= INDEX_IDLE || o.opened.elapsed() >= INDEX_MAX_HOLD);
        if close {
            *guard = None;
            return;
        }
    });
}

/// Held while chunks are being added; GC waits for all of these to go away.
#[derive(Debug)]
pub struct IngestGuard(#[allow(dead_code)] File);

/// Held by garbage collection from before its mark until after its sweep; excludes every
/// [`IngestGuard`].
#[derive(Debug)]
pub struct GcLock(#[allow(dead_code)] File);

impl Store {
    /// Opens (creating if needed) a plain store: the server side.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        Self::open_with(root, None)
    }

    /// Opens (creating if needed) a store sealed with `key`: the laptop side.
    pub fn open_encrypted(root: &Path, key: DataKey) -> Result<Store, StoreError> {
        Self::open_with(root, Some(key))
    }

    fn open_with(root: &Path, key: Option<DataKey>) -> Result<Store, StoreError> {
        let packs_dir = root.join("packs");
        std::fs::create_dir_all(&packs_dir).map_err(|e| StoreError::io(&packs_dir, e))?;
        let store = Store {
            root: root.to_path_buf(),
            index_path: root.join("index.redb"),
            packs_dir,
            key,
            db: Arc::new(Mutex::new(None)),
            writer: Mutex::new(None),
            locations: Mutex::new(HashMap::new()),
            open_packs: Mutex::new(HashMap::new()),
        };
        store.init_meta()?;
        Ok(store)
    }

    /// Store root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether chunks are sealed with a data key.
    pub fn is_encrypted(&self) -> bool {
        self.key.is_some()
    }

    fn index_err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Index {
            path: self.index_path.clone(),
            message: e.to_string(),
        }
    }

    /// Runs `f` with the index open; the handle is released when `f` returns so other
    /// processes (a publish next to a running server) can use it between transactions.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&redb::Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut slot = self.db.lock().expect("index mutex poisoned");
        if slot.is_none() {
            let start = std::time::Instant::now();
            let limit = Duration::from_secs(120);
            let mut backoff = Duration::from_millis(1);
            let db = loop {
                match redb::Database::create(&self.index_path) {
                    Ok(db) => break db,
                    Err(redb::DatabaseError::DatabaseAlreadyOpen) if start.elapsed() < limit => {
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_millis(50));
                    }
                    Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                        return Err(StoreError::Busy {
                            path: self.index_path.clone(),
                            secs: limit.as_secs(),
                        })
                    }
                    Err(e) => return Err(self.index_err(e)),
                }
            };
            let now = std::time::Instant::now();
            *slot = Some(OpenIndex {
                db,
                opened: now,
                used: now,
            });
            spawn_index_closer(Arc::downgrade(&self.db));
        }
        let open = slot.as_mut().expect("opened above");
        let res = f(&open.db);
        open.used = std::time::Instant::now();
        res
    }

    fn init_meta(&self) -> Result<(), StoreError> {
        let want_check = self
            .key
            .as_ref()
            .map(|k| k.check_value().to_vec())
            .unwrap_or_default();
        // Read-only first: opening an initialized store must work on a full disk.
        let existing = self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.index_err(e))?;
            let meta = match tx.open_table(META) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(self.index_err(e)),
            };
            let check = meta
                .get("key-check")
                .map_err(|e| self.index_err(e))?
                .map(|v| v.value().to_vec());
            Ok(check)
        })?;
        if existing.as_ref() == Some(&want_check) {
            return Ok(());
        }
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| self.index_err(e))?;
            {
                let mut meta = tx.open_table(META).map_err(|e| self.index_err(e))?;
                tx.open_table(CHUNKS).map_err(|e| self.index_err(e))?;
                let existing = meta
                    .get("key-check")
                    .map_err(|e| self.index_err(e))?
                    .map(|v| v.value().to_vec());
                match existing {
                    None => {
                        meta.insert("format", INDEX_FORMAT.to_le_bytes().as_slice())
                            .map_err(|e| self.index_err(e))?;
                        meta.insert("key-check", want_check.as_slice())
                            .map_err(|e| self.index_err(e))?;
                    }
                    Some(have) if have == want_check => {}
                    Some(have) => {
                        let reason = match (have.is_empty(), want_check.is_empty()) {
                            (true, false) => "is a plain store but was opened with a data key",
                            (false, true) => "is sealed with a data key; open it with its key (<dir>/keys/store.key)",
                            _ => "the data key does not match this store (wrong or replaced store.key)",
                        };
                        return Err(StoreError::Key {
                            path: self.root.clone(),
                            reason: reason.into(),
                        });
                    }
                }
                let format = meta
                    .get("format")
                    .map_err(|e| self.index_err(e))?
                    .map(|v| v.value().to_vec());
                if format.is_some_and(|v| v != INDEX_FORMAT.to_le_bytes()) {
                    return Err(self.index_err("index format is newer than this build; upgrade tandem"));
                }
            }
            tx.commit().map_err(|e| self.index_err(e))
        })
    }

    /// Takes the shared ingest lock (GC waits until every ingest lets go).
    pub fn ingest_guard(&self) -> Result<IngestGuard, StoreError> {
        let path = self.root.join("lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        f.lock_shared().map_err(|e| StoreError::io(&path, e))?;
        Ok(IngestGuard(f))
    }

    /// Looks up many chunks in one transaction.
    pub fn locate_many(&self, ids: &[ChunkId]) -> Result<Vec<Option<Location>>, StoreError> {
        let mut out = vec![None; ids.len()];
        if ids.is_empty() {
            return Ok(out);
        }
        let mut todo = Vec::new();
        {
            let cache = self.locations.lock().expect("cache mutex poisoned");
            for (i, id) in ids.iter().enumerate() {
                match cache.get(id) {
                    Some(l) => out[i] = Some(*l),
                    None => todo.push(i),
                }
            }
        }
        if todo.is_empty() {
            return Ok(out);
        }
        let found = self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.index_err(e))?;
            let t = tx.open_table(CHUNKS).map_err(|e| self.index_err(e))?;
            let mut found = Vec::new();
            for i in todo {
                if let Some(v) = t.get(ids[i].as_bytes()).map_err(|e| self.index_err(e))? {
                    found.push((i, Location::from_tuple(v.value())));
                }
            }
            Ok(found)
        })?;
        let mut cache = self.locations.lock().expect("cache mutex poisoned");
        for (i, loc) in found {
            cache.insert(ids[i], loc);
            out[i] = Some(loc);
        }
        Ok(out)
    }

    /// Which of `ids` the store holds.
    pub fn contains_many(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        Ok(self
            .locate_many(ids)?
            .into_iter()
            .map(|l| l.is_some())
            .collect())
    }

    /// Compresses (and seals) one chunk into a record; `check` re-hashes the plaintext
    /// (skipped only by ingest, which has just computed the id itself).
    pub(crate) fn prepare(
        &self,
        id: ChunkId,
        payload: Payload,
        check: bool,
    ) -> Result<(RecordHeader, Vec<u8>), StoreError> {
        let (raw_len, mut flags, bytes) = match payload {
            Payload::Raw(data) => {
                if data.len() > MAX_CHUNK_LEN {
                    return Err(StoreError::TooLarge {
                        id,
                        len: data.len(),
                    });
                }
                if check && ChunkId::of(&data) != id {
                    return Err(StoreError::Mismatch(id));
                }
                let raw_len = data.len() as u32;
                let level = if self.key.is_some() {
                    ZSTD_LEVEL_SEALED
                } else {
                    ZSTD_LEVEL
                };
                match zstd::bulk::compress(&data, level) {
                    Ok(c) if c.len() < data.len() => (raw_len, FLAG_ZSTD, c),
                    _ => (raw_len, 0, data),
                }
            }
            Payload::Zstd { raw_len, bytes } => (raw_len, FLAG_ZSTD, bytes),
        };
        let bytes = match &self.key {
            Some(k) => {
                flags |= FLAG_AEAD;
                k.seal(&aad(&id, flags, raw_len), &bytes)
            }
            None => bytes,
        };
        let header = RecordHeader {
            id,
            flags,
            raw_len,
            stored_len: u32::try_from(bytes.len()).expect("chunks are at most 4 MiB"),
        };
        Ok((header, bytes))
    }

    /// Stores chunks (skipping those already present) and returns how many payload bytes
    /// were written. Each plaintext is checked against its id first. Records are durable
    /// before the index points at them.
    pub fn put_many(&self, items: Vec<(ChunkId, Payload)>) -> Result<u64, StoreError> {
        if items.is_empty() {
            return Ok(0);
        }
        let ids: Vec<ChunkId> = items.iter().map(|(id, _)| *id).collect();
        let present = self.contains_many(&ids)?;
        let mut seen = HashSet::new();
        let todo: Vec<std::sync::Mutex<Option<(ChunkId, Payload)>>> = items
            .into_iter()
            .zip(present)
            .filter(|((id, _), have)| !*have && seen.insert(*id))
            .map(|(item, _)| std::sync::Mutex::new(Some(item)))
            .collect();
        // Hashing and compressing dominate: spread them over the cores.
        let threads = if todo.len() > 4 { 2 } else { 1 };
        let prepared = ingest::par_map(todo.len(), threads, &|i| {
            let (id, payload) = todo[i]
                .lock()
                .expect("item mutex poisoned")
                .take()
                .expect("each item is taken once");
            self.prepare(id, payload, true)
        });
        let prepared: Vec<_> = prepared.into_iter().collect::<Result<_, _>>()?;
        self.write_prepared(prepared, false)
    }

    /// Writes records and commits their index entries; `overwrite` repoints existing
    /// entries (GC relocation), otherwise an entry another process committed first wins.
    pub(crate) fn write_prepared(
        &self,
        prepared: Vec<(RecordHeader, Vec<u8>)>,
        overwrite: bool,
    ) -> Result<u64, StoreError> {
        let (written, entries) = self.append_prepared(&prepared)?;
        self.commit_entries(&entries, overwrite)?;
        Ok(written)
    }

    /// Appends records to this process's pack without syncing; the entries become
    /// visible only through [`Store::commit_entries`].
    pub(crate) fn append_prepared(
        &self,
        prepared: &[(RecordHeader, Vec<u8>)],
    ) -> Result<(u64, Vec<(ChunkId, Location)>), StoreError> {
        let added = now();
        let mut written = 0u64;
        let mut entries = Vec::with_capacity(prepared.len());
        let mut w = self.writer.lock().expect("writer mutex poisoned");
        for (header, bytes) in prepared {
            if w.as_ref().is_none_or(|w| w.len >= pack::PACK_TARGET_SIZE) {
                if let Some(old) = w.as_ref() {
                    old.sync().map_err(|e| StoreError::io(&self.packs_dir, e))?;
                }
                *w = Some(
                    PackWriter::create(&self.packs_dir)
                        .map_err(|e| StoreError::io(&self.packs_dir, e))?,
                );
            }
            let pw = w.as_mut().expect("writer just created");
            let path = pack::pack_path(&self.packs_dir, pw.id);
            let offset = pw
                .append(header, bytes)
                .map_err(|e| StoreError::io(&path, e))?;
            written += bytes.len() as u64;
            entries.push((
                header.id,
                Location {
                    pack: pw.id,
                    offset,
                    stored_len: header.stored_len,
                    raw_len: header.raw_len,
                    flags: header.flags,
                    added,
                },
            ));
        }
        Ok((written, entries))
    }

    /// Makes the current pack durable, then commits `entries` to the index in one
    /// transaction (the order that keeps every index entry pointing at durable bytes).
    pub(crate) fn commit_entries(
        &self,
        entries: &[(ChunkId, Location)],
        overwrite: bool,
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        if let Some(pw) = self.writer.lock().expect("writer mutex poisoned").as_ref() {
            pw.sync()
                .map_err(|e| StoreError::io(&pack::pack_path(&self.packs_dir, pw.id), e))?;
        }
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| self.index_err(e))?;
            {
                let mut t = tx.open_table(CHUNKS).map_err(|e| self.index_err(e))?;
                for (id, loc) in entries {
                    // Another process may have stored the same chunk meanwhile: keep theirs.
                    if overwrite
                        || t.get(id.as_bytes())
                            .map_err(|e| self.index_err(e))?
                            .is_none()
                    {
                        t.insert(id.as_bytes(), loc.to_tuple())
                            .map_err(|e| self.index_err(e))?;
                    }
                }
            }
            tx.commit().map_err(|e| self.index_err(e))
        })
    }

    fn pack_file(&self, pack: u64) -> std::io::Result<Arc<File>> {
        let mut open = self.open_packs.lock().expect("pack mutex poisoned");
        if let Some(f) = open.get(&pack) {
            return Ok(f.clone());
        }
        if open.len() > 256 {
            open.clear();
        }
        let f = Arc::new(File::open(pack::pack_path(&self.packs_dir, pack))?);
        open.insert(pack, f.clone());
        Ok(f)
    }

    /// Reads the raw record of a chunk (header + payload, still compressed/sealed).
    fn read_located(
        &self,
        id: ChunkId,
        loc: Location,
    ) -> Result<(RecordHeader, Vec<u8>), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            id,
            pack: loc.pack,
            offset: loc.offset,
            reason,
        };
        let file = self.pack_file(loc.pack).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                corrupt("its pack file is missing".into())
            } else {
                StoreError::io(&pack::pack_path(&self.packs_dir, loc.pack), e)
            }
        })?;
        let (h, payload) =
            pack::read_record(&file, loc.offset).map_err(|e| corrupt(e.to_string()))?;
        if h.id != id
            || h.stored_len != loc.stored_len
            || h.flags != loc.flags
            || h.raw_len != loc.raw_len
        {
            return Err(corrupt("record header does not match the index".into()));
        }
        Ok((h, payload))
    }

    fn locate_fresh(&self, id: ChunkId) -> Result<Location, StoreError> {
        self.locate_many(&[id])?[0].ok_or(StoreError::Missing(id))
    }

    fn forget_cached(&self, id: &ChunkId) {
        self.locations
            .lock()
            .expect("cache mutex poisoned")
            .remove(id);
    }

    /// Reads a chunk and verifies it: the only way plaintext leaves the store.
    pub fn get(&self, id: ChunkId) -> Result<Vec<u8>, StoreError> {
        let loc = self.locate_fresh(id)?;
        match self.get_at(id, loc) {
            Err(StoreError::Corrupt { .. }) => {
                // The cached location may predate a GC rewrite: look it up once more.
                self.forget_cached(&id);
                self.open_packs
                    .lock()
                    .expect("pack mutex poisoned")
                    .remove(&loc.pack);
                let fresh = self.locate_fresh(id)?;
                self.get_at(id, fresh)
            }
            other => other,
        }
    }

    fn get_at(&self, id: ChunkId, loc: Location) -> Result<Vec<u8>, StoreError> {
        let (h, payload) = self.read_located(id, loc)?;
        let corrupt = |reason: &str| StoreError::Corrupt {
            id,
            pack: loc.pack,
            offset: loc.offset,
            reason: reason.into(),
        };
        let opened = if h.flags & FLAG_AEAD != 0 {
            let key = self
                .key
                .as_ref()
                .ok_or_else(|| corrupt("sealed record in a plain store"))?;
            key.open(&aad(&id, h.flags, h.raw_len), &payload)
                .ok_or_else(|| corrupt("decryption failed (altered on disk)"))?
        } else {
            if self.key.is_some() {
                return Err(corrupt("unsealed record in a sealed store"));
            }
            payload
        };
        let plain = if h.flags & FLAG_ZSTD != 0 {
            decompress(&opened, h.raw_len as usize).map_err(|e| corrupt(&format!("zstd: {e}")))?
        } else {
            opened
        };
        if plain.len() != h.raw_len as usize || ChunkId::of(&plain) != id {
            return Err(corrupt("content does not hash to its id"));
        }
        Ok(plain)
    }

    /// Reads a chunk for sending over the network: verified, then returned as a zstd frame
    /// (or raw when it did not compress). Returns `(zstd?, raw_len, bytes)`.
    pub fn get_for_transfer(&self, id: ChunkId) -> Result<(bool, u32, Vec<u8>), StoreError> {
        let loc = self.locate_fresh(id)?;
        if self.key.is_none() && loc.flags == FLAG_ZSTD {
            if let Ok((h, payload)) = self.read_located(id, loc) {
                if let Ok(plain) = decompress(&payload, h.raw_len as usize) {
                    if ChunkId::of(&plain) == id {
                        return Ok((true, h.raw_len, payload));
                    }
                }
            }
        }
        let plain = self.get(id)?;
        Ok((false, plain.len() as u32, plain))
    }

    /// Drops index entries (a chunk found damaged), so the next pull fetches it again.
    pub fn forget(&self, ids: &[ChunkId]) -> Result<(), StoreError> {
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| self.index_err(e))?;
            {
                let mut t = tx.open_table(CHUNKS).map_err(|e| self.index_err(e))?;
                for id in ids {
                    t.remove(id.as_bytes()).map_err(|e| self.index_err(e))?;
                }
            }
            tx.commit().map_err(|e| self.index_err(e))
        })?;
        for id in ids {
            self.forget_cached(id);
        }
        Ok(())
    }

    fn all_entries(&self) -> Result<Vec<(ChunkId, Location)>, StoreError> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.index_err(e))?;
            let t = tx.open_table(CHUNKS).map_err(|e| self.index_err(e))?;
            let mut out = Vec::new();
            for row in t.iter().map_err(|e| self.index_err(e))? {
                let (k, v) = row.map_err(|e| self.index_err(e))?;
                out.push((ChunkId(*k.value()), Location::from_tuple(v.value())));
            }
            Ok(out)
        })
    }

    fn pack_files(&self) -> Result<Vec<(u64, u64)>, StoreError> {
        let mut out = Vec::new();
        let rd =
            std::fs::read_dir(&self.packs_dir).map_err(|e| StoreError::io(&self.packs_dir, e))?;
        for e in rd {
            let e = e.map_err(|e| StoreError::io(&self.packs_dir, e))?;
            if let Some(id) = e.file_name().to_str().and_then(pack::parse_pack_name) {
                let len = e
                    .metadata()
                    .map_err(|err| StoreError::io(&e.path(), err))?
                    .len();
                out.push((id, len));
            }
        }
        Ok(out)
    }

    /// Counts chunks and bytes.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut s = StoreStats::default();
        for (_, loc) in self.all_entries()? {
            s.chunks += 1;
            s.raw_bytes += u64::from(loc.raw_len);
            s.stored_bytes += u64::from(loc.stored_len);
        }
        for (_, len) in self.pack_files()? {
            s.packs += 1;
            s.pack_bytes += len;
        }
        Ok(s)
    }

    /// Reads back and verifies every chunk; damaged ones are named and their entries
    /// dropped so the next pull fetches them again. `progress` gets the count done.
    pub fn check(&self, progress: &dyn Fn(u64, u64)) -> Result<CheckReport, StoreError> {
        let entries = self.all_entries()?;
        let total = entries.len() as u64;
        let mut report = CheckReport::default();
        let mut bad = Vec::new();
        for (i, (id, loc)) in entries.into_iter().enumerate() {
            match self.get_at(id, loc) {
                Ok(_) => report.verified += 1,
                Err(e @ StoreError::Corrupt { .. }) => {
                    tracing::error!(chunk = %id, pack = loc.pack, offset = loc.offset, "damaged chunk: {e}");
                    let reason = match &e {
                        StoreError::Corrupt { reason, .. } => reason.clone(),
                        _ => e.to_string(),
                    };
                    report.damaged.push(Damage {
                        chunk: id.to_string(),
                        pack: format!("{:016x}.pack", loc.pack),
                        offset: loc.offset,
                        reason,
                    });
                    bad.push(id);
                }
                Err(e) => return Err(e),
            }
            progress(i as u64 + 1, total);
        }
        if !bad.is_empty() {
            self.forget(&bad)?;
        }
        Ok(report)
    }

    /// Deletes chunks not in `live` (and older than `grace`) and compacts packs. The caller
    /// computed `live` before the lock: prefer [`Store::gc_lock`], then the mark, then
    /// [`Store::gc_locked`], so no commit can reference a chunk between mark and sweep.
    pub fn gc(&self, live: &HashSet<ChunkId>, grace: Duration) -> Result<GcReport, StoreError> {
        let lock = self.gc_lock()?;
        self.gc_locked(&lock, live, grace)
    }

    /// Takes the exclusive GC lock without waiting ([`StoreError::InUse`] while any ingest
    /// guard is held). While it is held no ingest guard can be taken, so a caller that
    /// computes its live set after this returns sees every committed manifest.
    pub fn gc_lock(&self) -> Result<GcLock, StoreError> {
        let lock_path = self.root.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => Ok(GcLock(lock)),
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse {
                path: self.root.clone(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::io(&lock_path, e)),
        }
    }

    /// The sweep of [`Store::gc`], under a lock from [`Store::gc_lock`].
    pub fn gc_locked(
        &self,
        _lock: &GcLock,
        live: &HashSet<ChunkId>,
        grace: Duration,
    ) -> Result<GcReport, StoreError> {
        // Our own open writer must not be compacted under us.
        if let Some(w) = self.writer.lock().expect("writer mutex poisoned").take() {
            w.sync().map_err(|e| StoreError::io(&self.packs_dir, e))?;
        }
        let mut report = GcReport::default();
        let cutoff = now().saturating_sub(grace.as_secs());
        let entries = self.all_entries()?;
        let dead: Vec<ChunkId> = entries
            .iter()
            .filter(|(id, loc)| !live.contains(id) && loc.added <= cutoff)
            .map(|(id, _)| *id)
            .collect();
        report.removed_chunks = dead.len() as u64;
        if !dead.is_empty() {
            self.forget(&dead)?;
        }
        let dead: HashSet<ChunkId> = dead.into_iter().collect();
        let mut live_by_pack: HashMap<u64, Vec<(ChunkId, Location)>> = HashMap::new();
        for (id, loc) in entries {
            if !dead.contains(&id) {
                live_by_pack.entry(loc.pack).or_default().push((id, loc));
            }
        }
        for (pack_id, len) in self.pack_files()? {
            let live_recs = live_by_pack.remove(&pack_id).unwrap_or_default();
            let live_bytes: u64 = live_recs
                .iter()
                .map(|(_, l)| pack::HEADER_LEN as u64 + u64::from(l.stored_len))
                .sum();
            if live_bytes * 2 >= len {
                continue;
            }
            if !live_recs.is_empty() {
                let mut moved = Vec::new();
                for (id, loc) in &live_recs {
                    let (h, payload) = self.read_located(*id, *loc)?;
                    moved.push((h, payload));
                }
                self.write_relocated(moved)?;
                report.packs_rewritten += 1;
            } else {
                report.packs_deleted += 1;
            }
            let path = pack::pack_path(&self.packs_dir, pack_id);
            std::fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
            self.open_packs
                .lock()
                .expect("pack mutex poisoned")
                .remove(&pack_id);
            report.bytes_freed += len;
        }
        if let Some(w) = self.writer.lock().expect("writer mutex poisoned").take() {
            w.sync().map_err(|e| StoreError::io(&self.packs_dir, e))?;
        }
        self.locations.lock().expect("cache mutex poisoned").clear();
        Ok(report)
    }

    /// Copies records into the current pack and repoints their index entries.
    fn write_relocated(&self, records: Vec<(RecordHeader, Vec<u8>)>) -> Result<(), StoreError> {
        self.write_prepared(records, true)?;
        Ok(())
    }
}

fn aad(id: &ChunkId, flags: u32, raw_len: u32) -> Vec<u8> {
    let mut a = Vec::with_capacity(40);
    a.extend_from_slice(id.as_bytes());
    a.extend_from_slice(&flags.to_le_bytes());
    a.extend_from_slice(&raw_len.to_le_bytes());
    a
}

/// Decompresses a zstd frame that must yield exactly `raw_len` bytes (bounded: hostile
/// frames cannot allocate more).
pub fn decompress(frame: &[u8], raw_len: usize) -> std::io::Result<Vec<u8>> {
    if raw_len > MAX_CHUNK_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "chunk too large",
        ));
    }
    let out = zstd::bulk::decompress(frame, raw_len)?;
    if out.len() != raw_len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("decompressed to {} bytes, expected {raw_len}", out.len()),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seed: u8, len: usize) -> (ChunkId, Vec<u8>) {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
            .collect();
        (ChunkId::of(&data), data)
    }

    fn stores() -> Vec<(tempfile::TempDir, Store)> {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let sa = Store::open(a.path()).expect("open");
        let sb = Store::open_encrypted(b.path(), DataKey::generate()).expect("open");
        vec![(a, sa), (b, sb)]
    }

    #[test]
    fn chunks_read_back_verified_in_plain_and_sealed_stores() {
        for (_d, s) in stores() {
            let items: Vec<_> = (1..20u8).map(|i| chunk(i, 65536)).collect();
            let n = s
                .put_many(
                    items
                        .iter()
                        .map(|(id, d)| (*id, Payload::Raw(d.clone())))
                        .collect(),
                )
                .expect("put");
            assert!(n > 0);
            // Deduplicated: a second put writes nothing.
            let again = s
                .put_many(
                    items
                        .iter()
                        .map(|(id, d)| (*id, Payload::Raw(d.clone())))
                        .collect(),
                )
                .expect("put");
            assert_eq!(again, 0);
            for (id, d) in &items {
                assert_eq!(&s.get(*id).expect("get"), d);
            }
            assert!(matches!(
                s.get(ChunkId::of(b"nope")),
                Err(StoreError::Missing(_))
            ));
            let (id, _) = chunk(99, 100);
            assert!(matches!(
                s.put_many(vec![(id, Payload::Raw(vec![1; 100]))]),
                Err(StoreError::Mismatch(_))
            ));
        }
    }

    #[test]
    fn reopened_store_needs_the_right_key() {
        let d = tempfile::tempdir().expect("tempdir");
        let k = DataKey::generate();
        let (id, data) = chunk(3, 5000);
        {
            let s = Store::open_encrypted(d.path(), k.clone()).expect("open");
            s.put_many(vec![(id, Payload::Raw(data.clone()))])
                .expect("put");
        }
        let err = Store::open_encrypted(d.path(), DataKey::generate()).expect_err("must fail");
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(Store::open(d.path()).is_err());
        let s = Store::open_encrypted(d.path(), k).expect("open");
        assert_eq!(s.get(id).expect("get"), data);
    }

    fn corrupt_one_byte(root: &Path, loc: Location) {
        use std::os::unix::fs::FileExt as _;
        let p = pack::pack_path(&root.join("packs"), loc.pack);
        let f = File::options()
            .read(true)
            .write(true)
            .open(p)
            .expect("open pack");
        let at = loc.offset + pack::HEADER_LEN as u64 + u64::from(loc.stored_len) / 2;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).expect("read");
        b[0] ^= 0x55;
        f.write_all_at(&b, at).expect("write");
    }

    #[test]
    fn corrupted_chunk_fails_to_read_and_check_names_it() {
        for (d, s) in stores() {
            let items: Vec<_> = (1..5u8).map(|i| chunk(i, 8192)).collect();
            s.put_many(
                items
                    .iter()
                    .map(|(id, d)| (*id, Payload::Raw(d.clone())))
                    .collect(),
            )
            .expect("put");
            let victim = items[2].0;
            let loc = s.locate_many(&[victim]).expect("locate")[0].expect("present");
            corrupt_one_byte(d.path(), loc);
            let err = s.get(victim).expect_err("must fail");
            assert!(err.is_corrupt(), "{err}");
            assert!(err.to_string().contains(&victim.to_string()), "{err}");
            let report = s.check(&|_, _| {}).expect("check");
            assert_eq!(report.verified, 3);
            assert_eq!(report.damaged.len(), 1);
            assert_eq!(report.damaged[0].chunk, victim.to_string());
            // Dropped from the index: a re-put (the next pull) repairs it.
            assert!(matches!(s.get(victim), Err(StoreError::Missing(_))));
            s.put_many(vec![(victim, Payload::Raw(items[2].1.clone()))])
                .expect("repair");
            assert_eq!(s.get(victim).expect("get"), items[2].1);
        }
    }

    #[test]
    fn gc_removes_unreferenced_chunks_and_compacts_packs() {
        for (_d, s) in stores() {
            let items: Vec<_> = (1..40u8).map(|i| chunk(i, 65536)).collect();
            s.put_many(
                items
                    .iter()
                    .map(|(id, d)| (*id, Payload::Raw(d.clone())))
                    .collect(),
            )
            .expect("put");
            let live: HashSet<ChunkId> = items.iter().take(5).map(|(id, _)| *id).collect();
            let before = s.stats().expect("stats");
            let r = s.gc(&live, Duration::ZERO).expect("gc");
            assert_eq!(r.removed_chunks, 34);
            assert_eq!(r.packs_rewritten, 1);
            let after = s.stats().expect("stats");
            assert_eq!(after.chunks, 5);
            assert!(
                after.pack_bytes < before.pack_bytes / 4,
                "{after:?} vs {before:?}"
            );
            for (id, d) in items.iter().take(5) {
                assert_eq!(&s.get(*id).expect("get"), d);
            }
            // Grace period protects fresh chunks.
            let r = s
                .gc(&HashSet::new(), Duration::from_secs(3600))
                .expect("gc");
            assert_eq!(r.removed_chunks, 0);
            // An ingest in progress blocks GC.
            let g = s.ingest_guard().expect("guard");
            assert!(matches!(
                s.gc(&live, Duration::ZERO),
                Err(StoreError::InUse { .. })
            ));
            drop(g);
        }
    }

    #[test]
    fn two_handles_share_the_index_between_transactions() {
        let d = tempfile::tempdir().expect("tempdir");
        let a = Store::open(d.path()).expect("open a");
        let b = Store::open(d.path()).expect("open b");
        let (id, data) = chunk(7, 4096);
        a.put_many(vec![(id, Payload::Raw(data.clone()))])
            .expect("put");
        assert_eq!(b.get(id).expect("b reads a's chunk"), data);
    }
}
