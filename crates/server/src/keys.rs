//! The server's keys, generated on first start and kept in `<data>/keys/`.
//!
//! Separate keys for separate powers: a leaked image-signing key cannot forge a kill
//! order or a lease. Files are base64 text, mode 0600.

use std::path::{Path, PathBuf};

use tandem_proto::SigningKey;

/// Reading or creating a key file failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file does not hold a key.
    #[error("key file {path} is damaged ({source}); restore it from backup — a new key would orphan every enrolled device")]
    Damaged {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: tandem_proto::SignError,
    },
}

/// Every signing key the server holds.
#[derive(Debug)]
pub struct ServerKeys {
    /// Signs image manifests and backup manifests' acceptance.
    pub image: SigningKey,
    /// Signs target states and leases.
    pub state: SigningKey,
    /// Signs kill orders.
    pub kill: SigningKey,
    /// Signs scan rule bundles.
    pub rules: SigningKey,
}

/// The public halves a device pins at enrollment (shared with the agent).
pub use tandem_proto::fleet::PinnedKeys;

impl ServerKeys {
    /// Loads the keys under `data_dir/keys`, creating any that do not exist yet.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, KeyError> {
        let dir = data_dir.join("keys");
        std::fs::create_dir_all(&dir).map_err(|source| KeyError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(ServerKeys {
            image: load_or_create_key(&dir.join("image-signing.key"))?,
            state: load_or_create_key(&dir.join("state-signing.key"))?,
            kill: load_or_create_key(&dir.join("kill-signing.key"))?,
            rules: load_or_create_key(&dir.join("rules-signing.key"))?,
        })
    }

    /// The public keys devices pin.
    pub fn pinned(&self) -> PinnedKeys {
        PinnedKeys {
            image: self.image.public(),
            state: self.state.public(),
            kill: self.kill.public(),
            rules: self.rules.public(),
        }
    }
}

fn load_or_create_key(path: &Path) -> Result<SigningKey, KeyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => SigningKey::from_base64(&text).map_err(|source| KeyError::Damaged {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::generate();
            // The first of two starting servers wins; the other uses the key it wrote.
            match tandem_tools::atomic::write_new(path, key.to_base64().as_bytes(), 0o600) {
                Ok(()) => Ok(key),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create_key(path),
                Err(source) => Err(KeyError::Io {
                    path: path.to_path_buf(),
                    source,
                }),
            }
        }
        Err(source) => Err(KeyError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Escrowed user-disk keys, sealed at rest.
///
/// Envelope encryption: each escrowed key is sealed with XChaCha20-Poly1305 under the
/// *escrow key*, a random 256-bit key kept in a file outside the data directory (by
/// default `<data dir>.escrow.key` beside it, or `--escrow-key-file`), so a copy of the
/// data directory — a backup tape, a snapshot, a stolen disk of the data volume — holds
/// only ciphertext. The associated data binds each sealed key to its user: a sealed file
/// copied to another user's name does not open.
///
/// File format of `escrow/<hex user>.key`: the line `tandem-escrow-v1`, then base64 of
/// `nonce (24 bytes) || ciphertext+tag (48 bytes)`. Files written before sealing existed
/// hold the bare base64 key; they are read once and resealed.
///
/// Rotation ([`EscrowVault::reseal_into`]) opens every file with the old key and seals it
/// under the new one.
#[derive(Clone)]
pub struct EscrowVault {
    dir: PathBuf,
    key: [u8; 32],
}

impl std::fmt::Debug for EscrowVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EscrowVault")
            .field("dir", &self.dir)
            .finish()
    }
}

const ESCROW_MAGIC: &str = "tandem-escrow-v1";

/// An escrow operation failed: what the handler tells the caller.
#[derive(Debug, thiserror::Error)]
pub enum EscrowError {
    /// The key sent is not base64 of 32 bytes.
    #[error("escrowed key must be base64 of exactly 32 bytes")]
    Malformed,
    /// The user has a different key escrowed already.
    #[error("user {0} already has an escrowed disk key; restore it with the existing key")]
    Exists(String),
    /// Nothing escrowed for the user.
    #[error("user {0} has no escrowed disk key")]
    Missing(String),
    /// A stored file does not open with the escrow key.
    #[error("escrowed key of user {user} does not open with the escrow key (wrong key file, or the file was altered)")]
    Sealed {
        /// Whose.
        user: String,
    },
    /// Reading or writing a file failed.
    #[error("escrow file {path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn decode_key(b64: &str) -> Option<[u8; 32]> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
}

impl EscrowVault {
    /// The default escrow key file for a data directory: beside it, not inside it.
    pub fn default_key_file(data_dir: &Path) -> PathBuf {
        let mut name = data_dir
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "tandem-server".into());
        name.push(".escrow.key");
        data_dir.with_file_name(name)
    }

    /// Opens the escrow area of `data_dir` with the key in `key_file` (created, 0600, on
    /// first use).
    pub fn open(data_dir: &Path, key_file: &Path) -> Result<Self, KeyError> {
        if let Some(p) = key_file.parent() {
            std::fs::create_dir_all(p).map_err(|source| KeyError::Io {
                path: p.to_path_buf(),
                source,
            })?;
        }
        let key = match std::fs::read_to_string(key_file) {
            Ok(text) => decode_key(&text).ok_or_else(|| KeyError::Damaged {
                path: key_file.to_path_buf(),
                source: tandem_proto::SignError::MalformedKey("not base64 of 32 bytes".into()),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use base64::Engine as _;
                let key: [u8; 32] = rand::random();
                let text = base64::engine::general_purpose::STANDARD.encode(key);
                // Never replaced: escrowed keys sealed under it would be lost. When another
                // server created it first, its key is the one.
                match tandem_tools::atomic::write_new(key_file, text.as_bytes(), 0o600) {
                    Ok(()) => key,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        return Self::open(data_dir, key_file)
                    }
                    Err(source) => {
                        return Err(KeyError::Io {
                            path: key_file.to_path_buf(),
                            source,
                        })
                    }
                }
            }
            Err(source) => {
                return Err(KeyError::Io {
                    path: key_file.to_path_buf(),
                    source,
                })
            }
        };
        Ok(EscrowVault {
            dir: data_dir.join("escrow"),
            key,
        })
    }

    fn path(&self, user: &str) -> PathBuf {
        self.dir
            .join(format!("{}.key", hex::encode(user.as_bytes())))
    }

    fn aad(user: &str) -> Vec<u8> {
        format!("{ESCROW_MAGIC}\0{user}").into_bytes()
    }

    fn seal(&self, user: &str, key: &[u8; 32]) -> String {
        use base64::Engine as _;
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        let cipher = chacha20poly1305::XChaCha20Poly1305::new((&self.key).into());
        let nonce: [u8; 24] = rand::random();
        let aad = Self::aad(user);
        let ct = cipher
            .encrypt(
                chacha20poly1305::XNonce::from_slice(&nonce),
                Payload {
                    msg: key,
                    aad: &aad,
                },
            )
            .expect("sealing 32 bytes cannot fail");
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ct);
        format!(
            "{ESCROW_MAGIC}\n{}\n",
            base64::engine::general_purpose::STANDARD.encode(blob)
        )
    }

    fn open_sealed(&self, user: &str, text: &str) -> Result<[u8; 32], EscrowError> {
        use base64::Engine as _;
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        let sealed = || EscrowError::Sealed {
            user: user.to_string(),
        };
        let body = text
            .strip_prefix(ESCROW_MAGIC)
            .and_then(|r| r.strip_prefix('\n'))
            .ok_or_else(sealed)?;
        let blob = base64::engine::general_purpose::STANDARD
            .decode(body.trim())
            .map_err(|_| sealed())?;
        if blob.len() != 24 + 32 + 16 {
            return Err(sealed());
        }
        let cipher = chacha20poly1305::XChaCha20Poly1305::new((&self.key).into());
        let aad = Self::aad(user);
        let pt = cipher
            .decrypt(
                chacha20poly1305::XNonce::from_slice(&blob[..24]),
                Payload {
                    msg: &blob[24..],
                    aad: &aad,
                },
            )
            .map_err(|_| sealed())?;
        <[u8; 32]>::try_from(pt.as_slice()).map_err(|_| sealed())
    }

    /// Escrows `key_b64` for `user`. `Ok(true)`: stored now; `Ok(false)`: the same key
    /// was already escrowed. A different key is refused: the first one encrypts the
    /// backups.
    pub fn put(&self, user: &str, key_b64: &str) -> Result<bool, EscrowError> {
        let key = decode_key(key_b64).ok_or(EscrowError::Malformed)?;
        match self.get_raw(user) {
            Ok(existing) if existing == key => return Ok(false),
            Ok(_) => return Err(EscrowError::Exists(user.to_string())),
            Err(EscrowError::Missing(_)) => {}
            Err(e) => return Err(e),
        }
        let path = self.path(user);
        tandem_tools::atomic::write_atomic(&path, self.seal(user, &key).as_bytes(), 0o600)
            .map_err(|source| EscrowError::Io { path, source })?;
        Ok(true)
    }

    /// The escrowed key of `user`, base64.
    pub fn get(&self, user: &str) -> Result<String, EscrowError> {
        use base64::Engine as _;
        Ok(base64::engine::general_purpose::STANDARD.encode(self.get_raw(user)?))
    }

    /// Rotation: reseals every escrowed key under `new` (same directory, new escrow key).
    /// Returns how many keys were resealed. Run with the server stopped, then switch the
    /// server to the new key file and destroy the old one.
    pub fn reseal_into(&self, new: &EscrowVault) -> Result<u64, EscrowError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(source) => {
                return Err(EscrowError::Io {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        let mut n = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(user) = name
                .strip_suffix(".key")
                .and_then(|h| hex::decode(h).ok())
                .and_then(|b| String::from_utf8(b).ok())
            else {
                continue;
            };
            let key = self.get_raw(&user)?;
            let path = new.path(&user);
            tandem_tools::atomic::write_atomic(&path, new.seal(&user, &key).as_bytes(), 0o600)
                .map_err(|source| EscrowError::Io { path, source })?;
            n += 1;
        }
        Ok(n)
    }

    fn get_raw(&self, user: &str) -> Result<[u8; 32], EscrowError> {
        let path = self.path(user);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EscrowError::Missing(user.to_string()))
            }
            Err(source) => return Err(EscrowError::Io { path, source }),
        };
        if text.starts_with(ESCROW_MAGIC) {
            return self.open_sealed(user, &text);
        }
        // Written before escrow was sealed: reseal it now.
        let key = decode_key(&text).ok_or_else(|| EscrowError::Sealed {
            user: user.to_string(),
        })?;
        tandem_tools::atomic::write_atomic(&path, self.seal(user, &key).as_bytes(), 0o600)
            .map_err(|source| EscrowError::Io { path, source })?;
        tracing::info!(user, "escrowed key from before sealing resealed");
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escrowed_keys_are_sealed_bound_to_their_user_and_validated() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("srv");
        let keyfile = EscrowVault::default_key_file(&data);
        assert!(
            !keyfile.starts_with(&data),
            "the escrow key lives outside the data dir"
        );
        let v = EscrowVault::open(&data, &keyfile).expect("open");
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        // Malformed keys are refused: not base64, wrong length (44 characters, 33 bytes).
        assert!(matches!(
            v.put("alice", &"!".repeat(44)),
            Err(EscrowError::Malformed)
        ));
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 31]);
        assert!(matches!(
            v.put("alice", &short),
            Err(EscrowError::Malformed)
        ));
        assert!(v.put("alice", &key).expect("put"));
        assert!(!v.put("alice", &key).expect("same key again"));
        let other = base64::engine::general_purpose::STANDARD.encode([8u8; 32]);
        assert!(matches!(
            v.put("alice", &other),
            Err(EscrowError::Exists(_))
        ));
        // At rest: no trace of the key bytes or their base64.
        let file = std::fs::read_to_string(v.path("alice")).expect("read");
        assert!(file.starts_with(ESCROW_MAGIC));
        assert!(!file.contains(&key));
        assert_eq!(v.get("alice").expect("get"), key);
        // Copied under another user's name, it does not open.
        std::fs::copy(v.path("alice"), v.path("mallory")).expect("copy");
        assert!(matches!(v.get("mallory"), Err(EscrowError::Sealed { .. })));
        // With another escrow key (the data dir alone, stolen), nothing opens.
        let stolen = EscrowVault::open(&data, &dir.path().join("other.key")).expect("open");
        assert!(matches!(
            stolen.get("alice"),
            Err(EscrowError::Sealed { .. })
        ));
        // A plaintext file from before sealing is read and resealed.
        std::fs::write(v.path("bob"), &other).expect("write legacy");
        assert_eq!(v.get("bob").expect("legacy"), other);
        assert!(std::fs::read_to_string(v.path("bob"))
            .expect("read")
            .starts_with(ESCROW_MAGIC));
    }

    #[test]
    fn keys_persist_across_loads_and_differ_by_purpose() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = ServerKeys::load_or_create(dir.path()).expect("create");
        let b = ServerKeys::load_or_create(dir.path()).expect("load");
        assert_eq!(a.pinned(), b.pinned());
        assert_ne!(a.image.public(), a.state.public());
        assert_ne!(a.state.public(), a.kill.public());
    }

    #[test]
    fn damaged_key_file_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        ServerKeys::load_or_create(dir.path()).expect("create");
        std::fs::write(dir.path().join("keys/state-signing.key"), "garbage").expect("write");
        let err = ServerKeys::load_or_create(dir.path()).expect_err("damaged key must fail");
        assert!(err.to_string().contains("damaged"), "{err}");
    }
}
