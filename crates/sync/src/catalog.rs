//! The catalog of image versions: signed manifests, block tables and cached deltas.
//!
//! Server: `<data>/images/`; laptop: `<dir>/store/catalog/`. Layout:
//!
//! ```text
//! <root>/<name>/<version>.manifest.json   the Signed envelope (commit point of a version)
//! <root>/<name>/<version>.blocks          block table (server only, see below)
//! <root>/<name>/deltas/<from>-<to>.delta  cached version deltas (server only)
//! <root>/<name>/.lock                     held exclusively while a version is published
//! ```
//!
//! A version exists exactly when its manifest file exists; everything is written to a
//! temporary file and renamed into place, so readers (a running server) never see half a
//! version, and a crashed publish leaves nothing but unreferenced chunks.
//!
//! Block table format (frozen; add a new magic for v2): `"TNDBLK\0\x01"` (8 bytes), block
//! size u32 LE (4096), count u64 LE, then `count` 16-byte truncated BLAKE3 hashes of the
//! image's 4 KiB blocks in disk order.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use tandem_proto::manifest::{validate_name, Manifest};
use tandem_proto::{ChunkId, PublicKey, Signed};
use tandem_store::ingest::{BlockHash, BLOCK_SIZE};

use crate::SyncError;

/// First bytes of a block table file.
pub const BLOCKS_MAGIC: [u8; 8] = *b"TNDBLK\0\x01";
/// Largest block table read (covers the 16 TiB manifest limit).
const MAX_BLOCKS: u64 = (16u64 << 40) / BLOCK_SIZE as u64;

/// One image and the versions the catalog holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageVersions {
    /// Image name.
    pub name: String,
    /// Versions, ascending.
    pub versions: Vec<u64>,
}

/// A catalog directory.
#[derive(Debug, Clone)]
pub struct Catalog {
    root: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SyncError + '_ {
    move |source| SyncError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// [`tandem_tools::atomic::write_atomic`] (mode as `File::create`), its error naming `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SyncError> {
    tandem_tools::atomic::write_atomic(path, bytes, tandem_tools::atomic::DEFAULT_MODE)
        .map_err(io_err(path))
}

/// Held while publishing into one image, so two publishes never pick the same version.
#[derive(Debug)]
pub struct ImageLock(#[allow(dead_code)] File);

impl Catalog {
    /// A catalog rooted at `root` (created on first write).
    pub fn new(root: &Path) -> Catalog {
        Catalog {
            root: root.to_path_buf(),
        }
    }

    /// Root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, name: &str) -> Result<PathBuf, SyncError> {
        validate_name(name)?;
        Ok(self.root.join(name))
    }

    /// Path of a version's manifest.
    pub fn manifest_path(&self, name: &str, version: u64) -> Result<PathBuf, SyncError> {
        Ok(self.dir(name)?.join(format!("{version}.manifest.json")))
    }

    /// Path of a version's block table.
    pub fn blocks_path(&self, name: &str, version: u64) -> Result<PathBuf, SyncError> {
        Ok(self.dir(name)?.join(format!("{version}.blocks")))
    }

    /// Path of a cached delta.
    pub fn delta_path(&self, name: &str, from: u64, to: u64) -> Result<PathBuf, SyncError> {
        Ok(self
            .dir(name)?
            .join("deltas")
            .join(format!("{from}-{to}.delta")))
    }

    /// Locks an image for publishing.
    pub fn lock_image(&self, name: &str) -> Result<ImageLock, SyncError> {
        let dir = self.dir(name)?;
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let p = dir.join(".lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io_err(&p))?;
        f.lock().map_err(io_err(&p))?;
        Ok(ImageLock(f))
    }

    /// Every image and its versions.
    pub fn list(&self) -> Result<Vec<ImageVersions>, SyncError> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(&self.root)(e)),
        };
        for e in rd {
            let e = e.map_err(io_err(&self.root))?;
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if validate_name(&name).is_err() {
                continue;
            }
            let versions = self.versions(&name)?;
            if !versions.is_empty() {
                out.push(ImageVersions { name, versions });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Versions of one image, ascending.
    pub fn versions(&self, name: &str) -> Result<Vec<u64>, SyncError> {
        let dir = self.dir(name)?;
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut v = Vec::new();
        for e in rd {
            let e = e.map_err(io_err(&dir))?;
            if let Some(n) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".manifest.json"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                v.push(n);
            }
        }
        v.sort_unstable();
        Ok(v)
    }

    /// Versions of one image that were deleted (their numbers are never reused).
    pub fn deleted_versions(&self, name: &str) -> Result<Vec<u64>, SyncError> {
        let dir = self.dir(name)?;
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        Ok(rd
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".deleted"))
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .collect())
    }

    /// The signed envelope of a version, as stored.
    pub fn load_signed(&self, name: &str, version: u64) -> Result<Signed, SyncError> {
        let p = self.manifest_path(name, version)?;
        let text = match std::fs::read(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SyncError::NoSuchVersion {
                    name: name.to_string(),
                    version,
                })
            }
            Err(e) => return Err(io_err(&p)(e)),
        };
        serde_json::from_slice(&text).map_err(|e| SyncError::Manifest(e.into()))
    }

    /// A version, its signature verified against `trusted` and its content validated.
    pub fn load(
        &self,
        name: &str,
        version: u64,
        trusted: &[PublicKey],
    ) -> Result<(Manifest, Signed), SyncError> {
        let signed = self.load_signed(name, version)?;
        let m = Manifest::verify(&signed, trusted)?;
        if m.name != name || m.version != version {
            return Err(SyncError::WrongManifest {
                want: format!("{name} v{version}"),
                got: format!("{} v{}", m.name, m.version),
            });
        }
        Ok((m, signed))
    }

    /// Commits a version: the manifest file appears atomically, last.
    pub fn save(&self, manifest: &Manifest, signed: &Signed) -> Result<(), SyncError> {
        let p = self.manifest_path(&manifest.name, manifest.version)?;
        let text = serde_json::to_vec(signed).expect("serializing plain data cannot fail");
        write_atomic(&p, &text)
    }

    /// Removes a version (manifest first, so it disappears atomically) and its side files.
    pub fn delete(&self, name: &str, version: u64) -> Result<(), SyncError> {
        let p = self.manifest_path(name, version)?;
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SyncError::NoSuchVersion {
                    name: name.to_string(),
                    version,
                })
            }
            Err(e) => return Err(io_err(&p)(e)),
        }
        // A tombstone: version numbers are never reused, so a cached "chunks of v3" or a
        // laptop's v3 can never be confused with a different, later v3.
        let _ = std::fs::write(self.dir(name)?.join(format!("{version}.deleted")), b"");
        let _ = std::fs::remove_file(self.blocks_path(name, version)?);
        let deltas = self.dir(name)?.join("deltas");
        if let Ok(rd) = std::fs::read_dir(&deltas) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                let involved = n
                    .strip_suffix(".delta")
                    .and_then(|s| s.split_once('-'))
                    .is_some_and(|(a, b)| a == version.to_string() || b == version.to_string());
                if involved {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// Every chunk referenced by any version: the GC mark set.
    pub fn live_chunks(&self, trusted: &[PublicKey]) -> Result<HashSet<ChunkId>, SyncError> {
        let mut live = HashSet::new();
        for img in self.list()? {
            for v in img.versions {
                let (m, _) = self.load(&img.name, v, trusted)?;
                live.extend(m.chunks.into_iter().flatten());
            }
        }
        Ok(live)
    }

    /// Writes a version's block table.
    pub fn save_blocks(
        &self,
        name: &str,
        version: u64,
        blocks: &[BlockHash],
    ) -> Result<(), SyncError> {
        let mut out = Vec::with_capacity(20 + blocks.len() * 16);
        out.extend_from_slice(&BLOCKS_MAGIC);
        out.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&(blocks.len() as u64).to_le_bytes());
        for b in blocks {
            out.extend_from_slice(b);
        }
        write_atomic(&self.blocks_path(name, version)?, &out)
    }

    /// Reads a version's block table.
    pub fn load_blocks(&self, name: &str, version: u64) -> Result<Vec<BlockHash>, SyncError> {
        let p = self.blocks_path(name, version)?;
        let mut f = File::open(&p).map_err(io_err(&p))?;
        let mut head = [0u8; 20];
        f.read_exact(&mut head).map_err(io_err(&p))?;
        let bad = |why: &str| SyncError::Format {
            what: p.display().to_string(),
            reason: why.to_string(),
        };
        if head[..8] != BLOCKS_MAGIC {
            return Err(bad("not a block table (bad magic)"));
        }
        if u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) != BLOCK_SIZE as u32 {
            return Err(bad("unsupported block size"));
        }
        let count = u64::from_le_bytes(head[12..20].try_into().expect("8 bytes"));
        if count > MAX_BLOCKS {
            return Err(bad("block count beyond limits"));
        }
        let mut body = Vec::new();
        f.read_to_end(&mut body).map_err(io_err(&p))?;
        if body.len() as u64 != count * 16 {
            return Err(bad("truncated"));
        }
        Ok(body
            .chunks_exact(16)
            .map(|c| c.try_into().expect("16-byte chunks"))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_appear_on_save_and_vanish_on_delete() {
        let d = tempfile::tempdir().expect("tempdir");
        let c = Catalog::new(d.path());
        let key = tandem_proto::SigningKey::generate();
        let m = Manifest {
            format: 1,
            name: "gold".into(),
            version: 3,
            size: 4096,
            chunk_size: 4096,
            chunks: vec![Some(ChunkId::of(b"x"))],
        };
        c.save(&m, &m.sign(&key)).expect("save");
        c.save_blocks("gold", 3, &[[1u8; 16]]).expect("blocks");
        assert_eq!(c.versions("gold").expect("versions"), vec![3]);
        assert_eq!(c.load("gold", 3, &[key.public()]).expect("load").0, m);
        assert_eq!(c.load_blocks("gold", 3).expect("blocks"), vec![[1u8; 16]]);
        assert!(c
            .load("gold", 3, &[tandem_proto::SigningKey::generate().public()])
            .is_err());
        assert_eq!(c.live_chunks(&[key.public()]).expect("live").len(), 1);
        c.delete("gold", 3).expect("delete");
        assert!(c.list().expect("list").is_empty());
        assert_eq!(c.deleted_versions("gold").expect("tombstones"), vec![3]);
        assert!(matches!(
            c.load_signed("gold", 3),
            Err(SyncError::NoSuchVersion { .. })
        ));
        assert!(c.versions("../x").is_err());
    }
}
