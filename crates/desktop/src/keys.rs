//! The corporate user disk key: random per disk, wrapped on the device, unwrapped only
//! after the lease check passes, destroyed by a kill.
//!
//! Wrapped format (`keys/user-disk.wrapped`): `b"TDWRAP1\0"` || 12-byte nonce ||
//! ChaCha20-Poly1305(wrap key, nonce, 32-byte disk key). The wrap key is 32 random bytes in
//! `keys/wrap.key`. Both live under `keys/`, which a kill overwrites and deletes: without
//! them the LUKS user disk is ciphertext. QEMU gets the disk key as the base64 text of its
//! 32 bytes (QEMU secrets must be UTF-8).

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

use crate::DesktopError;

const MAGIC: &[u8; 8] = b"TDWRAP1\0";

/// 32 secret bytes. `Debug` never prints them.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey([u8; 32]);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(****)")
    }
}

impl SecretKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        SecretKey(rand::random())
    }

    /// The passphrase QEMU's LUKS driver is given.
    pub fn passphrase(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// For escrow on the server (sent only over an authenticated request).
    pub fn to_base64(&self) -> String {
        self.passphrase()
    }

    /// Reads an escrowed key.
    pub fn from_base64(s: &str) -> Result<Self, DesktopError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| DesktopError::KeyUnwrap(e.to_string()))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| DesktopError::KeyUnwrap("escrowed key is not 32 bytes".into()))?;
        Ok(SecretKey(arr))
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), DesktopError> {
    tandem_tools::atomic::write_atomic(path, data, 0o600).map_err(|e| DesktopError::io(path, e))
}

/// Wraps `key` with `wrap`.
pub fn wrap(wrap: &SecretKey, key: &SecretKey) -> Vec<u8> {
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&wrap.0));
    let nonce: [u8; 12] = rand::random();
    let ct = cipher
        .encrypt(Nonce::from_slice(&nonce), key.0.as_slice())
        .expect("encrypting 32 bytes cannot fail");
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

/// Unwraps a key written by [`wrap`].
pub fn unwrap(wrap: &SecretKey, blob: &[u8]) -> Result<SecretKey, DesktopError> {
    if blob.len() != MAGIC.len() + 12 + 32 + 16 || &blob[..8] != MAGIC {
        return Err(DesktopError::KeyUnwrap(
            "wrapped key file is malformed".into(),
        ));
    }
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&wrap.0));
    let pt = cipher
        .decrypt(Nonce::from_slice(&blob[8..20]), &blob[20..])
        .map_err(|_| DesktopError::KeyUnwrap("wrong wrapping key or tampered file".into()))?;
    let arr: [u8; 32] = pt
        .try_into()
        .map_err(|_| DesktopError::KeyUnwrap("unwrapped key is not 32 bytes".into()))?;
    Ok(SecretKey(arr))
}

/// The user disk key files under an agent's `keys/`.
#[derive(Debug, Clone)]
pub struct UserDiskKeys {
    wrap_key: PathBuf,
    wrapped: PathBuf,
}

impl UserDiskKeys {
    /// The key files in `keys_dir`.
    pub fn new(keys_dir: &Path) -> Self {
        UserDiskKeys {
            wrap_key: keys_dir.join("wrap.key"),
            wrapped: keys_dir.join("user-disk.wrapped"),
        }
    }

    /// Whether a user disk key exists.
    pub fn exists(&self) -> bool {
        self.wrapped.is_file()
    }

    /// Creates and stores a fresh key (with a fresh wrap key if there is none). Returns it
    /// for escrow.
    pub fn create(&self) -> Result<SecretKey, DesktopError> {
        let wrap_key = match std::fs::read(&self.wrap_key) {
            Ok(b) => SecretKey(
                b.try_into()
                    .map_err(|_| DesktopError::KeyUnwrap("wrap.key is not 32 bytes".into()))?,
            ),
            Err(_) => {
                let k = SecretKey::generate();
                write_private(&self.wrap_key, &k.0)?;
                k
            }
        };
        let key = SecretKey::generate();
        write_private(&self.wrapped, &wrap(&wrap_key, &key))?;
        Ok(key)
    }

    /// Stores an escrowed key handed back by the server (re-provisioning).
    pub fn install(&self, key: &SecretKey) -> Result<(), DesktopError> {
        let wrap_key = SecretKey::generate();
        write_private(&self.wrap_key, &wrap_key.0)?;
        write_private(&self.wrapped, &wrap(&wrap_key, key))
    }

    /// Unwraps the key. Call only after the lease check passed.
    pub fn unwrap_key(&self) -> Result<SecretKey, DesktopError> {
        let wrap_key = std::fs::read(&self.wrap_key)
            .map_err(|_| DesktopError::KeyMissing(self.wrap_key.clone()))?;
        let wrap_key = SecretKey(
            wrap_key
                .try_into()
                .map_err(|_| DesktopError::KeyUnwrap("wrap.key is not 32 bytes".into()))?,
        );
        let blob = std::fs::read(&self.wrapped)
            .map_err(|_| DesktopError::KeyMissing(self.wrapped.clone()))?;
        unwrap(&wrap_key, &blob)
    }
}

/// A passphrase file for QEMU, removed when dropped.
#[derive(Debug)]
pub struct SecretFile(PathBuf);

impl SecretFile {
    /// Writes `key`'s passphrase to `path` (0600).
    pub fn write(path: &Path, key: &SecretKey) -> Result<Self, DesktopError> {
        write_private(path, key.passphrase().as_bytes())?;
        Ok(SecretFile(path.to_path_buf()))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_round_trips_and_detects_tampering() {
        let w = SecretKey::generate();
        let k = SecretKey::generate();
        let mut blob = wrap(&w, &k);
        assert_eq!(unwrap(&w, &blob).expect("unwraps"), k);
        assert!(unwrap(&SecretKey::generate(), &blob).is_err());
        let last = blob.len() - 1;
        blob[last] ^= 1;
        assert!(unwrap(&w, &blob).is_err());
        assert!(unwrap(&w, b"short").is_err());
    }

    #[test]
    fn key_files_survive_reload_and_vanish_with_the_keys_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = UserDiskKeys::new(dir.path());
        let k = keys.create().expect("create");
        assert_eq!(keys.unwrap_key().expect("unwrap"), k);
        assert!(!format!("{k:?}").contains(&k.passphrase()));
        std::fs::remove_file(dir.path().join("wrap.key")).expect("erase");
        assert!(matches!(
            keys.unwrap_key(),
            Err(DesktopError::KeyMissing(_))
        ));
    }
}
