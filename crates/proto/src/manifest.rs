//! Image manifests: what one version of a disk image is, chunk by chunk.
//!
//! A manifest names an image version and lists, in disk order, the BLAKE3 id of every
//! fixed-size chunk of the virtual disk (`None` for an all-zero chunk, a hole stored
//! nowhere). Chunk `i` covers bytes `[i * chunk_size, min((i + 1) * chunk_size, size))`.
//!
//! Format (frozen; add `format: 2`, never change 1): the manifest is serialized with
//! `serde_json::to_string` of [`Manifest`], whose field order is fixed by the struct, so
//! the same value always gives the same bytes. The server signs that text as kind
//! [`MANIFEST_KIND`] inside a [`Signed`] envelope. A reader verifies the signature first,
//! then [`Manifest::validate`]s the content (chunk size, chunk count against the size, name,
//! limits) before trusting anything in it.
//!
//! Manifest deltas ([`ManifestDelta`]) let a client that holds version A rebuild the exact
//! payload text of version B and check B's signature without downloading B's whole chunk
//! list: the deterministic encoding makes "rebuild, re-serialize, verify" exact.

use serde::{Deserialize, Serialize};

use crate::sign::{PublicKey, SignError, Signed, SigningKey};
use crate::ChunkId;

/// Kind string under which manifests are signed (domain separation).
pub const MANIFEST_KIND: &str = "manifest";
/// The manifest format this code writes and the only one it reads.
pub const MANIFEST_FORMAT: u32 = 1;
/// Smallest chunk size: one filesystem block.
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest chunk size.
pub const MAX_CHUNK_SIZE: u32 = 4 << 20;
/// Default chunk size: small enough that an in-place change moves little, large enough
/// that a 30 GiB image has about half a million chunks.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 << 10;
/// Largest virtual disk a manifest may describe (16 TiB): bounds the chunk list a hostile
/// server could make a client allocate.
pub const MAX_IMAGE_SIZE: u64 = 16 << 40;
/// Longest image name.
pub const MAX_NAME_LEN: usize = 64;

/// A manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The signature did not hold (unsigned, mis-signed, wrong key, altered).
    #[error("manifest refused: {0}")]
    Signature(#[from] SignError),
    /// The envelope or payload is not valid JSON (for example truncated in transit).
    #[error("manifest is not readable (truncated or not JSON): {0}")]
    Json(#[from] serde_json::Error),
    /// The content is signed but inconsistent.
    #[error("manifest {name} v{version} is inconsistent: {reason}")]
    Inconsistent {
        /// Image name as the manifest states it.
        name: String,
        /// Version as the manifest states it.
        version: u64,
        /// What does not add up.
        reason: String,
    },
    /// An image name that cannot be used as a file or URL component.
    #[error("invalid image name {0:?}: use 1-64 characters from a-z, 0-9, '.', '_' and '-', starting with a letter or digit")]
    BadName(String),
    /// A delta does not apply to the base it names.
    #[error("manifest delta does not apply: {0}")]
    Delta(String),
}

/// One version of a disk image, as a list of chunk ids in disk order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Image name, e.g. `corp-debian`.
    pub name: String,
    /// Version number, from 1, increasing per image.
    pub version: u64,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Chunk size in bytes: a power of two from 4 KiB to 4 MiB.
    pub chunk_size: u32,
    /// Chunk ids in disk order; `None` is an all-zero chunk.
    pub chunks: Vec<Option<ChunkId>>,
}

/// Checks an image name (used in paths and URLs, so it is strict).
pub fn validate_name(name: &str) -> Result<(), ManifestError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(ManifestError::BadName(name.to_string()))
    }
}

/// Number of chunks a disk of `size` bytes has with `chunk_size`.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size))
}

impl Manifest {
    /// Checks everything that a signature cannot: format, limits, and that the chunk list
    /// covers exactly `size` bytes.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |reason: String| ManifestError::Inconsistent {
            name: self.name.clone(),
            version: self.version,
            reason,
        };
        if self.format != MANIFEST_FORMAT {
            return Err(bad(format!(
                "format {} is not supported (this build reads format {MANIFEST_FORMAT}); upgrade tandem",
                self.format
            )));
        }
        validate_name(&self.name)?;
        if self.version == 0 {
            return Err(bad("version 0 does not exist; versions start at 1".into()));
        }
        if !self.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
        {
            return Err(bad(format!(
                "chunk size {} is not a power of two from 4 KiB to 4 MiB",
                self.chunk_size
            )));
        }
        if self.size > MAX_IMAGE_SIZE {
            return Err(bad(format!("size {} exceeds the 16 TiB limit", self.size)));
        }
        let want = chunk_count(self.size, self.chunk_size);
        if self.chunks.len() as u64 != want {
            return Err(bad(format!(
                "{} chunks listed but a {}-byte disk has {want}",
                self.chunks.len(),
                self.size
            )));
        }
        Ok(())
    }

    /// Length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: u64) -> u32 {
        let start = index * u64::from(self.chunk_size);
        let end = (start + u64::from(self.chunk_size)).min(self.size);
        u32::try_from(end.saturating_sub(start)).expect("a chunk is at most 4 MiB")
    }

    /// Signs this manifest with the server's image key.
    pub fn sign(&self, key: &SigningKey) -> Signed {
        key.sign(MANIFEST_KIND, self)
    }

    /// Verifies an envelope against the pinned image keys and validates the content.
    pub fn verify(signed: &Signed, trusted: &[PublicKey]) -> Result<Manifest, ManifestError> {
        let m: Manifest = signed.verify(MANIFEST_KIND, trusted)?;
        m.validate()?;
        Ok(m)
    }

    /// Parses an envelope from JSON text and verifies it.
    pub fn verify_json(
        text: &[u8],
        trusted: &[PublicKey],
    ) -> Result<(Manifest, Signed), ManifestError> {
        let signed: Signed = serde_json::from_slice(text)?;
        let m = Manifest::verify(&signed, trusted)?;
        Ok((m, signed))
    }

    /// The distinct chunk ids this version references.
    pub fn chunk_set(&self) -> std::collections::HashSet<ChunkId> {
        self.chunks.iter().flatten().copied().collect()
    }
}

/// Version B of a manifest expressed against version A that the client already holds:
/// everything but the chunk list, the chunk positions that differ, and B's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestDelta {
    /// Version the delta is against.
    pub base_version: u64,
    /// B without chunks (its `chunks` is empty).
    pub head: Manifest,
    /// `(index, id)` for every position where B differs from A (or lies beyond A's end).
    pub changes: Vec<(u64, Option<ChunkId>)>,
    /// B's envelope with an empty payload: kind, key id and signature.
    pub signature: Signed,
}

impl ManifestDelta {
    /// Computes the delta from `base` to `target` (signed as `target_signed`).
    pub fn compute(base: &Manifest, target: &Manifest, target_signed: &Signed) -> ManifestDelta {
        let changes = target
            .chunks
            .iter()
            .enumerate()
            .filter(|(i, c)| base.chunks.get(*i) != Some(c))
            .map(|(i, c)| (i as u64, *c))
            .collect();
        let mut head = target.clone();
        head.chunks.clear();
        ManifestDelta {
            base_version: base.version,
            head,
            changes,
            signature: Signed {
                payload: String::new(),
                ..target_signed.clone()
            },
        }
    }

    /// Rebuilds B from A, then verifies B's signature over the rebuilt text.
    pub fn apply(
        &self,
        base: &Manifest,
        trusted: &[PublicKey],
    ) -> Result<(Manifest, Signed), ManifestError> {
        if base.version != self.base_version || base.name != self.head.name {
            return Err(ManifestError::Delta(format!(
                "delta is against {} v{}, the base given is {} v{}",
                self.head.name, self.base_version, base.name, base.version
            )));
        }
        let n = chunk_count(
            self.head.size.min(MAX_IMAGE_SIZE),
            self.head.chunk_size.max(1),
        );
        // Every position beyond the base is named by a change, so a delta cannot claim
        // more chunks than base + changes: checked before allocating for what the
        // (not yet verified) head claims, e.g. 16 TiB in 1-byte chunks.
        if n > base.chunks.len() as u64 + self.changes.len() as u64 {
            return Err(ManifestError::Delta(format!(
                "delta claims {n} chunks, but the base has {} and it names {} changes",
                base.chunks.len(),
                self.changes.len()
            )));
        }
        let mut chunks: Vec<Option<ChunkId>> =
            base.chunks.iter().take(n as usize).copied().collect();
        chunks.resize(n as usize, None);
        let mut touched = vec![false; n as usize];
        for (i, c) in &self.changes {
            let slot = chunks.get_mut(*i as usize).ok_or_else(|| {
                ManifestError::Delta(format!(
                    "change at chunk {i} lies beyond the end ({n} chunks)"
                ))
            })?;
            *slot = *c;
            touched[*i as usize] = true;
        }
        // Positions beyond the base that no change names would silently be holes.
        if let Some(i) = (base.chunks.len()..n as usize).find(|i| !touched[*i]) {
            return Err(ManifestError::Delta(format!(
                "chunk {i} is missing from the delta"
            )));
        }
        let mut m = self.head.clone();
        m.chunks = chunks;
        let signed = Signed {
            payload: serde_json::to_string(&m).expect("serializing plain data cannot fail"),
            ..self.signature.clone()
        };
        let verified = Manifest::verify(&signed, trusted)?;
        Ok((verified, signed))
    }
}

/// Most chunk ids in one fetch, stat or missing request.
pub const MAX_CHUNKS_PER_REQUEST: usize = 4096;

/// Body of `POST /v1/chunks/fetch` and `POST /v1/chunks/stat`: chunks wanted for one
/// image version (the server checks that the caller may read that version and that every
/// chunk belongs to it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRequest {
    /// Image name.
    pub image: String,
    /// Version the chunks are for.
    pub version: u64,
    /// Chunk ids.
    pub chunks: Vec<ChunkId>,
}

/// Reply of `POST /v1/chunks/stat`: what fetching the named chunks would transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkStat {
    /// Chunks counted.
    pub count: u64,
    /// Bytes they take on the wire.
    pub bytes: u64,
}

/// Body and reply of `POST /v1/chunks/missing`: which of these chunks the server lacks
/// (an uploader then sends only those).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkList {
    /// Chunk ids.
    pub chunks: Vec<ChunkId>,
}

/// One image and the versions a caller may read, as listed by `GET /v1/images`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Image name.
    pub name: String,
    /// Versions, ascending.
    pub versions: Vec<u64>,
}

/// Frame header in a chunk fetch stream: `id (32) | flags u8 | raw_len u32 LE | len u32 LE`
/// followed by `len` bytes (a zstd frame when `flags & 1`, else the plaintext).
pub const CHUNK_FRAME_HEADER: usize = 41;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(version: u64, n: usize) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            name: "corp-debian".into(),
            version,
            size: n as u64 * 65536 - 512,
            chunk_size: 65536,
            chunks: (0..n)
                .map(|i| {
                    if i % 3 == 0 {
                        None
                    } else {
                        Some(ChunkId::of(&[i as u8, version as u8]))
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn signed_manifest_round_trips_and_is_deterministic() {
        let key = SigningKey::generate();
        let m = sample(1, 10);
        let s = m.sign(&key);
        assert_eq!(s.payload, m.sign(&key).payload);
        let text = serde_json::to_vec(&s).expect("json");
        let (back, _) = Manifest::verify_json(&text, &[key.public()]).expect("verifies");
        assert_eq!(back, m);
    }

    #[test]
    fn tampered_truncated_and_inconsistent_manifests_are_refused() {
        let key = SigningKey::generate();
        let m = sample(1, 10);
        let text = serde_json::to_vec(&m.sign(&key)).expect("json");
        let err =
            Manifest::verify_json(&text[..text.len() / 2], &[key.public()]).expect_err("must fail");
        assert!(matches!(err, ManifestError::Json(_)), "{err}");
        let mut s = m.sign(&key);
        s.payload = s.payload.replacen("\"version\":1", "\"version\":2", 1);
        let err = Manifest::verify(&s, &[key.public()]).expect_err("must fail");
        assert!(
            matches!(err, ManifestError::Signature(SignError::BadSignature(_))),
            "{err}"
        );
        let other = SigningKey::generate();
        assert!(Manifest::verify(&m.sign(&other), &[key.public()]).is_err());
        // Signed but one chunk short of its size.
        let mut short = m.clone();
        short.chunks.pop();
        let err = Manifest::verify(&short.sign(&key), &[key.public()]).expect_err("must fail");
        assert!(err.to_string().contains("9 chunks listed"), "{err}");
        let mut odd = m.clone();
        odd.chunk_size = 3000;
        assert!(Manifest::verify(&odd.sign(&key), &[key.public()]).is_err());
    }

    #[test]
    fn names_are_strict() {
        assert!(validate_name("corp-debian.12_x").is_ok());
        for bad in ["", "-x", "../etc", "A", "a/b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    /// A head claiming a huge size made `apply` allocate for it before the signature was
    /// checked (found writing the `manifest_delta` fuzz target).
    #[test]
    fn manifest_delta_claiming_a_huge_image_is_refused_before_allocating() {
        let key = SigningKey::generate();
        let a = sample(1, 10);
        let b = sample(2, 10);
        let mut d = ManifestDelta::compute(&a, &b, &b.sign(&key));
        d.head.size = MAX_IMAGE_SIZE;
        d.head.chunk_size = 1;
        let err = d.apply(&a, &[key.public()]).expect_err("refused");
        assert!(err.to_string().contains("claims"), "{err}");
    }

    #[test]
    fn manifest_delta_rebuilds_and_verifies_the_target() {
        let key = SigningKey::generate();
        let a = sample(1, 10);
        for n in [8, 10, 13] {
            let mut b = sample(2, n);
            b.chunks[1] = a.chunks[1];
            let bs = b.sign(&key);
            let d = ManifestDelta::compute(&a, &b, &bs);
            let (back, signed) = d.apply(&a, &[key.public()]).expect("applies");
            assert_eq!(back, b);
            assert_eq!(signed, bs);
            let mut bad = d.clone();
            if let Some(c) = bad.changes.first_mut() {
                c.1 = Some(ChunkId::of(b"evil"));
            }
            assert!(bad.apply(&a, &[key.public()]).is_err());
        }
    }
}
