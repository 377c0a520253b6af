//! A read-only qcow2 reader (versions 2 and 3), written for hostile files.
//!
//! Layout used (all big-endian; see QEMU's `docs/interop/qcow2.txt`): a header with the
//! cluster size, the guest size and the L1 table; L1 entries point at L2 tables; an L2
//! entry maps one guest cluster to a host cluster, marks it all-zero (v3, bit 0) or
//! compressed (bit 62), or leaves it unallocated, in which case the backing file (another
//! qcow2 or a raw file) supplies the data, or zeros when there is none. Refcounts,
//! snapshots and bitmaps are irrelevant to reading the active image and are ignored.
//!
//! Backing files are opened only as a [`BackingPolicy`] allows (see [`crate::open`]).
//! Refused with a clear error: encryption (old AES or LUKS), external data files,
//! extended L2 entries, zlib-compressed clusters (no deflate decoder in the tree; zstd
//! ones are read), protocol backing files (`nbd:`, `json:`, URLs), chains deeper than
//! [`MAX_CHAIN_DEPTH`]. Every offset and size from the file is checked before use.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tandem_tools::bytes::{be32, be64};

use crate::open::BackingPolicy;
use crate::view::{check_bounds, RawFile, ReadAt};
use crate::DiskError;

/// The qcow2 magic, `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Longest backing chain followed (QEMU itself has no small limit; real chains are short).
pub const MAX_CHAIN_DEPTH: usize = 16;
/// Largest L1 table accepted, in bytes (QEMU's own limit).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Bytes of L2 tables kept in memory per open image.
const L2_CACHE_BYTES: u64 = 32 << 20;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;

/// Where one guest cluster's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    /// Not in this layer: the backing file, or zeros.
    Unallocated,
    /// Reads as zeros, whatever lies beneath.
    Zero,
    /// Stored uncompressed at this host offset.
    Data(u64),
    /// Stored compressed: host offset and length of the compressed bytes.
    Compressed(u64, u64),
}

/// One open qcow2 image with its backing chain already opened.
pub struct Qcow2 {
    host: Arc<dyn ReadAt>,
    path: PathBuf,
    file_len: u64,
    cluster_bits: u32,
    size: u64,
    l1: Vec<u64>,
    zstd: bool,
    backing: Option<Box<dyn ReadAt>>,
    l2_cache: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("cluster_bits", &self.cluster_bits)
            .field("has_backing", &self.backing.is_some())
            .finish()
    }
}

impl Qcow2 {
    /// Reads the qcow2 in the already opened `raw` (named `path`) and its backing chain,
    /// as far as `policy` allows. `depth` is how many overlays sit above it.
    pub(crate) fn open_raw(
        raw: RawFile,
        path: &Path,
        depth: usize,
        policy: &BackingPolicy,
    ) -> Result<Self, DiskError> {
        let host: Arc<dyn ReadAt> = Arc::new(raw);
        Self::open_on(host, path, depth, Some(policy))
    }

    /// Reads a qcow2 whose bytes come from another view (e.g. a qcow2 file kept in the
    /// chunk store). `label` names it in errors. A backing file cannot be followed from
    /// there and is refused.
    pub fn open_view(host: Arc<dyn ReadAt>, label: &Path) -> Result<Self, DiskError> {
        Self::open_on(host, label, 0, None)
    }

    fn open_on(
        host: Arc<dyn ReadAt>,
        path: &Path,
        depth: usize,
        policy: Option<&BackingPolicy>,
    ) -> Result<Self, DiskError> {
        let bad = |detail: String| DiskError::Qcow2 {
            path: path.to_path_buf(),
            detail,
        };
        let file_len = host.size();
        let mut h = [0u8; 112];
        if file_len < 72 {
            return Err(bad(format!(
                "file is {file_len} bytes, shorter than a qcow2 header (truncated?)"
            )));
        }
        let hl = (file_len.min(112)) as usize;
        host.read_at(&mut h[..hl], 0)
            .map_err(|source| DiskError::Read {
                path: path.to_path_buf(),
                offset: 0,
                source,
            })?;
        if h[..4] != MAGIC {
            return Err(bad("not a qcow2 file (bad magic)".into()));
        }
        let h32 = |at| be32(&h, at).map_err(|e| bad(format!("header: {e}")));
        let h64 = |at| be64(&h, at).map_err(|e| bad(format!("header: {e}")));
        let version = h32(4)?;
        if version != 2 && version != 3 {
            return Err(bad(format!(
                "unsupported qcow2 version {version} (2 and 3 are read)"
            )));
        }
        let backing_offset = h64(8)?;
        let backing_len = h32(16)?;
        let cluster_bits = h32(20)?;
        let size = h64(24)?;
        let crypt = h32(32)?;
        let l1_size = u64::from(h32(36)?);
        let l1_offset = h64(40)?;
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(format!("cluster_bits {cluster_bits} outside 9..=21")));
        }
        if crypt != 0 {
            return Err(DiskError::Encrypted {
                path: path.to_path_buf(),
            });
        }
        let cluster_size = 1u64 << cluster_bits;
        let (mut header_len, mut zstd) = (72u64, false);
        if version == 3 {
            if file_len < 104 {
                return Err(bad("version 3 header is truncated".into()));
            }
            let incompat = h64(72)?;
            header_len = u64::from(h32(100)?);
            if !(104..=cluster_size).contains(&header_len) {
                return Err(bad(format!("header length {header_len} is invalid")));
            }
            if incompat & (1 << 2) != 0 {
                return Err(bad("external data files are not supported; convert with `qemu-img convert -O qcow2`".into()));
            }
            if incompat & (1 << 4) != 0 {
                return Err(bad("extended L2 entries (subclusters) are not supported; convert with `qemu-img convert -O qcow2`".into()));
            }
            if incompat & (1 << 3) != 0 {
                if header_len < 105 || hl < 105 {
                    return Err(bad(
                        "compression type bit set without a compression type field".into(),
                    ));
                }
                match h[104] {
                    0 => {}
                    1 => zstd = true,
                    t => return Err(bad(format!("unknown compression type {t}"))),
                }
            }
            let known = 0b1_1111u64;
            if incompat & !known != 0 {
                return Err(bad(format!(
                    "unknown incompatible features {:#x}",
                    incompat & !known
                )));
            }
            if incompat & 2 != 0 {
                tracing::warn!(path = %path.display(), "qcow2 image is marked corrupt; reading it anyway");
            }
        }
        let backing_format = read_extensions(&*host, path, header_len, cluster_size, file_len)?;
        // The L1 table must cover the guest size, within QEMU's limit.
        let l2_entries = cluster_size / 8;
        let needed = size.div_ceil(cluster_size).div_ceil(l2_entries);
        if l1_size < needed {
            return Err(bad(format!(
                "L1 table has {l1_size} entries, {needed} needed for {size} bytes"
            )));
        }
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(bad(format!(
                "L1 table of {l1_size} entries is larger than 32 MiB"
            )));
        }
        if !l1_offset.is_multiple_of(cluster_size) && l1_size > 0 {
            return Err(bad(format!(
                "L1 table offset {l1_offset} is not cluster-aligned"
            )));
        }
        if l1_size > 0
            && l1_offset
                .checked_add(l1_size * 8)
                .is_none_or(|e| e > file_len)
        {
            return Err(bad(format!(
                "L1 table at {l1_offset} lies past the end of the file (truncated image?)"
            )));
        }
        let mut raw = vec![0u8; (l1_size * 8) as usize];
        host.read_at(&mut raw, l1_offset)
            .map_err(|source| DiskError::Read {
                path: path.to_path_buf(),
                offset: l1_offset,
                source,
            })?;
        let l1 = raw
            .chunks_exact(8)
            .map(|c| be64(c, 0))
            .collect::<Result<_, _>>()
            .map_err(|e| bad(format!("L1 table: {e}")))?;
        let backing = if backing_offset != 0 {
            if backing_len == 0 || backing_len > 1023 {
                return Err(bad(format!(
                    "backing file name length {backing_len} outside 1..=1023"
                )));
            }
            let mut name = vec![0u8; backing_len as usize];
            if backing_offset
                .checked_add(backing_len as u64)
                .is_none_or(|e| e > file_len)
            {
                return Err(bad("backing file name lies past the end of the file".into()));
            }
            host.read_at(&mut name, backing_offset)
                .map_err(|source| DiskError::Read {
                    path: path.to_path_buf(),
                    offset: backing_offset,
                    source,
                })?;
            let name = String::from_utf8(name)
                .map_err(|_| bad("backing file name is not UTF-8".into()))?;
            let Some(policy) = policy else {
                return Err(DiskError::Unsupported {
                    path: path.to_path_buf(),
                    detail: format!("this qcow2 names a backing file {name:?} that cannot be reached from where it is stored"),
                });
            };
            Some(open_backing(
                path,
                &name,
                backing_format.as_deref(),
                depth,
                policy,
            )?)
        } else {
            None
        };
        tracing::debug!(path = %path.display(), size, cluster_size, backing = backing.is_some(), "opened qcow2");
        Ok(Qcow2 {
            host,
            path: path.to_path_buf(),
            file_len,
            cluster_bits,
            size,
            l1,
            zstd,
            backing,
            l2_cache: Mutex::new(HashMap::new()),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn io_err(&self, msg: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("qcow2 {}: {msg}", self.path.display()),
        )
    }

    fn l2_table(&self, offset: u64) -> io::Result<Arc<Vec<u64>>> {
        let mut cache = self
            .l2_cache
            .lock()
            .expect("l2 cache lock is never poisoned by a panic in safe code paths");
        if let Some(t) = cache.get(&offset) {
            return Ok(t.clone());
        }
        let cs = self.cluster_size();
        if !offset.is_multiple_of(cs) || offset.checked_add(cs).is_none_or(|e| e > self.file_len) {
            return Err(self.io_err(format!("L2 table offset {offset} is misaligned or past the end of the file (truncated image?)")));
        }
        let mut raw = vec![0u8; cs as usize];
        self.host.read_at(&mut raw, offset)?;
        let table: Arc<Vec<u64>> = Arc::new(
            raw.chunks_exact(8)
                .map(|c| be64(c, 0))
                .collect::<Result<_, _>>()?,
        );
        if (cache.len() as u64 + 1) * cs > L2_CACHE_BYTES {
            cache.clear();
        }
        cache.insert(offset, table.clone());
        Ok(table)
    }

    fn mapping(&self, guest_cluster: u64) -> io::Result<Mapping> {
        let l2_bits = self.cluster_bits - 3;
        let l1_index = (guest_cluster >> l2_bits) as usize;
        let l1e = *self
            .l1
            .get(l1_index)
            .ok_or_else(|| self.io_err("guest offset beyond the L1 table".into()))?;
        let l2_offset = l1e & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(Mapping::Unallocated);
        }
        let table = self.l2_table(l2_offset)?;
        let e = table[(guest_cluster & ((1 << l2_bits) - 1)) as usize];
        if e & L2_COMPRESSED != 0 {
            let shift = 62 - (self.cluster_bits - 8);
            let off = e & ((1u64 << shift) - 1);
            let sectors = ((e >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
            let len = (sectors * 512).saturating_sub(off & 511);
            return Ok(Mapping::Compressed(off, len));
        }
        if e & L2_ZERO != 0 {
            return Ok(Mapping::Zero);
        }
        match e & OFFSET_MASK {
            0 => Ok(Mapping::Unallocated),
            off => Ok(Mapping::Data(off)),
        }
    }

    fn read_backing(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        // A backing file may be shorter than its overlay: the rest reads as zeros.
        let bsize = b.size();
        let avail = bsize.saturating_sub(offset).min(buf.len() as u64) as usize;
        if avail > 0 {
            b.read_at(&mut buf[..avail], offset)?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    fn read_compressed(&self, buf: &mut [u8], within: usize, off: u64, len: u64) -> io::Result<()> {
        if !self.zstd {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "qcow2 {}: zlib-compressed clusters are not supported; decompress with `qemu-img convert -O qcow2 IN OUT`",
                    self.path.display()
                ),
            ));
        }
        let len = len.min(self.file_len.saturating_sub(off));
        if len == 0 {
            return Err(self.io_err(format!(
                "compressed cluster at {off} lies past the end of the file"
            )));
        }
        let mut comp = vec![0u8; len as usize];
        self.host.read_at(&mut comp, off)?;
        let mut out = vec![0u8; self.cluster_size() as usize];
        let mut dec = zstd::stream::read::Decoder::new(&comp[..])?;
        use io::Read as _;
        dec.read_exact(&mut out).map_err(|e| {
            self.io_err(format!(
                "compressed cluster at {off} does not decompress: {e}"
            ))
        })?;
        buf.copy_from_slice(&out[within..within + buf.len()]);
        Ok(())
    }
}

impl ReadAt for Qcow2 {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_bounds(self.size, offset, buf.len())?;
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let within = (pos % cs) as usize;
            let n = ((cs as usize) - within).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            match self.mapping(pos >> self.cluster_bits)? {
                Mapping::Unallocated => self.read_backing(piece, pos)?,
                Mapping::Zero => piece.fill(0),
                Mapping::Data(host) => {
                    let at = host + within as u64;
                    if at + n as u64 > self.file_len {
                        return Err(self.io_err(format!("data cluster at {host} lies past the end of the file (truncated image?)")));
                    }
                    self.host.read_at(piece, at)?;
                }
                Mapping::Compressed(off, len) => self.read_compressed(piece, within, off, len)?,
            }
            done += n;
        }
        Ok(())
    }
}

/// Walks the header extensions; returns the backing format name if one is recorded.
fn read_extensions(
    file: &dyn ReadAt,
    path: &Path,
    start: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<Option<String>, DiskError> {
    let end = cluster_size.min(file_len);
    let mut pos = start;
    let mut format = None;
    for _ in 0..64 {
        if pos + 8 > end {
            break;
        }
        let mut h = [0u8; 8];
        file.read_at(&mut h, pos)
            .map_err(|source| DiskError::Read {
                path: path.to_path_buf(),
                offset: pos,
                source,
            })?;
        let field = |at| {
            be32(&h, at).map_err(|e| DiskError::Qcow2 {
                path: path.to_path_buf(),
                detail: format!("header extension: {e}"),
            })
        };
        let (ty, len) = (field(0)?, u64::from(field(4)?));
        if ty == 0 {
            break;
        }
        if pos + 8 + len > end {
            return Err(DiskError::Qcow2 {
                path: path.to_path_buf(),
                detail: format!("header extension {ty:#x} runs past the first cluster"),
            });
        }
        match ty {
            0xe279_2aca if len <= 64 => {
                let mut name = vec![0u8; len as usize];
                file.read_at(&mut name, pos + 8)
                    .map_err(|source| DiskError::Read {
                        path: path.to_path_buf(),
                        offset: pos + 8,
                        source,
                    })?;
                format = Some(String::from_utf8_lossy(&name).into_owned());
            }
            0x0537_be77 => {
                return Err(DiskError::Encrypted {
                    path: path.to_path_buf(),
                })
            }
            _ => {}
        }
        pos += 8 + len.div_ceil(8) * 8;
    }
    Ok(format)
}

fn open_backing(
    overlay: &Path,
    name: &str,
    format: Option<&str>,
    depth: usize,
    policy: &BackingPolicy,
) -> Result<Box<dyn ReadAt>, DiskError> {
    if name.contains("://") || name.starts_with("nbd:") || name.starts_with("json:") {
        return Err(DiskError::Unsupported {
            path: overlay.to_path_buf(),
            detail: format!("backing file {name:?} is a network or protocol source; scan the base it points at (e.g. the stored version) or a flattened copy"),
        });
    }
    if depth + 1 >= MAX_CHAIN_DEPTH {
        return Err(DiskError::Qcow2 {
            path: overlay.to_path_buf(),
            detail: format!("backing chain deeper than {MAX_CHAIN_DEPTH} (loop?)"),
        });
    }
    let p = Path::new(name);
    let full = if p.is_absolute() {
        p.to_path_buf()
    } else {
        overlay.parent().unwrap_or(Path::new(".")).join(p)
    };
    if let Some(other) = format.filter(|f| !matches!(*f, "raw" | "qcow2")) {
        return Err(DiskError::Unsupported {
            path: full,
            detail: format!("backing format {other:?} (raw and qcow2 are read)"),
        });
    }
    // Only a file the operator named, opened without following a symlink or blocking.
    let raw = RawFile::from_file(policy.open(overlay, &full)?, &full)?;
    match format {
        Some("raw") => Ok(Box::new(raw)),
        Some(_) => Ok(Box::new(Qcow2::open_raw(raw, &full, depth + 1, policy)?)),
        None => crate::open_raw_at_depth(raw, &full, depth + 1, policy),
    }
}
