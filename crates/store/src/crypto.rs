//! The laptop store's data key and chunk sealing (XChaCha20-Poly1305).
//!
//! One random 256-bit key per store, kept in one file (`<dir>/keys/store.key`, base64
//! text, mode 0600): deleting that file makes every sealed chunk unreadable, which is how
//! a kill order crypto-erases a laptop. Each chunk is sealed with a fresh random 24-byte
//! nonce; the associated data binds the ciphertext to its chunk id and header, so a record
//! moved to another id does not open.

use std::fmt;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::StoreError;

/// Nonce length stored in front of each sealed payload.
pub const NONCE_LEN: usize = 24;
/// Poly1305 tag length.
pub const TAG_LEN: usize = 16;

/// A store's data key. `Debug` never shows it.
#[derive(Clone)]
pub struct DataKey([u8; 32]);

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(****)")
    }
}

impl DataKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> DataKey {
        DataKey(rand::random())
    }

    /// Wraps raw key bytes (e.g. unwrapped by the agent).
    pub fn from_bytes(bytes: [u8; 32]) -> DataKey {
        DataKey(bytes)
    }

    /// Loads the key file, or creates it (0600) when it does not exist yet.
    pub fn load_or_create(path: &Path) -> Result<DataKey, StoreError> {
        let io = |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = DataKey::generate();
                // Never replaced: data sealed under the first key would be lost. When
                // another process created it first, its key is the one.
                match tandem_tools::atomic::write_new(path, hex::encode(key.0).as_bytes(), 0o600) {
                    Ok(()) => Ok(key),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(path),
                    Err(e) => Err(io(e)),
                }
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Loads an existing key file; a missing file is an error (the store was erased).
    pub fn load(path: &Path) -> Result<DataKey, StoreError> {
        let text = std::fs::read_to_string(path).map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<DataKey, StoreError> {
        let mut k = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut k).map_err(|_| StoreError::BadKeyFile {
            path: path.to_path_buf(),
        })?;
        Ok(DataKey(k))
    }

    /// A value stored in the index that tells a wrong key from damaged chunks.
    pub(crate) fn check_value(&self) -> [u8; 32] {
        *blake3::keyed_hash(&self.0, b"tandem-store-key-check-v1").as_bytes()
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }

    /// Seals `plain` for chunk `aad`; output is nonce || ciphertext+tag.
    pub(crate) fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let ct = self
            .cipher()
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad })
            .expect("encryption of an in-memory buffer cannot fail");
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens what [`DataKey::seal`] produced; `None` when it was altered or the key is wrong.
    pub(crate) fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.cipher()
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_data_opens_only_with_same_key_and_aad() {
        let k = DataKey::generate();
        let s = k.seal(b"id", b"hello");
        assert_eq!(k.open(b"id", &s).as_deref(), Some(&b"hello"[..]));
        assert!(k.open(b"other", &s).is_none());
        assert!(DataKey::generate().open(b"id", &s).is_none());
        let mut t = s.clone();
        t[30] ^= 1;
        assert!(k.open(b"id", &t).is_none());
        assert!(!format!("{k:?}").contains(&hex::encode(k.0)));
    }

    #[test]
    fn key_file_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("keys/store.key");
        let a = DataKey::load_or_create(&p).expect("create");
        let b = DataKey::load(&p).expect("load");
        assert_eq!(a.0, b.0);
        std::fs::remove_file(&p).expect("rm");
        assert!(DataKey::load(&p).is_err());
    }
}
