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
            crate::fsutil::write_atomic(path, key.to_base64().as_bytes(), 0o600).map_err(
                |source| KeyError::Io {
                    path: path.to_path_buf(),
                    source,
                },
            )?;
            Ok(key)
        }
        Err(source) => Err(KeyError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
