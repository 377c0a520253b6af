//! The device's identity: its own ed25519 key (generated here, never leaves the device),
//! the device id the server bound to that key, the server URL, and the server keys
//! pinned at enrollment.
//!
//! Files under `<dir>/identity/`: `device.key` (base64 secret, mode 0600) and
//! `identity.json` (format `tandem-identity-v1`).

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tandem_proto::auth::{self, RequestSignature};
use tandem_proto::fleet::{DeviceId, EnrollRequest, EnrollResponse, PinnedKeys};
use tandem_proto::SigningKey;

use crate::client::{self, ClientError};
use crate::fsutil::{self, FileError};
use crate::AgentDir;

const FORMAT: &str = "tandem-identity-v1";

/// Loading or creating the identity failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No identity: the device was never enrolled (or was killed).
    #[error(
        "this device is not enrolled ({dir}); run `tandem agent enroll --server URL --token T`"
    )]
    NotEnrolled {
        /// The agent directory.
        dir: String,
    },
    /// The device is enrolled already; enrolling twice would orphan the first identity.
    #[error("this device is already enrolled as {device}; remove {dir}/identity to enroll again")]
    AlreadyEnrolled {
        /// The existing id.
        device: DeviceId,
        /// The agent directory.
        dir: String,
    },
    /// An identity file is unreadable.
    #[error(transparent)]
    File(#[from] FileError),
    /// The key file does not hold a key.
    #[error("device key {path} is damaged: {source}")]
    BadKey {
        /// Which file.
        path: String,
        /// Why.
        source: tandem_proto::SignError,
    },
    /// The server refused or could not be reached.
    #[error("enrollment failed: {0}")]
    Server(#[from] ClientError),
}

/// What `identity.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentityInfo {
    /// The id bound to our key.
    pub device: DeviceId,
    /// The user the device belongs to.
    pub user: String,
    /// Base URL of the server, e.g. `http://127.0.0.1:8080`.
    pub server: String,
    /// Server keys pinned at enrollment.
    pub keys: PinnedKeys,
    /// When we enrolled.
    pub enrolled_at: u64,
}

/// A loaded identity: who we are, and the key that proves it.
pub struct Identity {
    /// Public part.
    pub info: IdentityInfo,
    key: SigningKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("info", &self.info)
            .field("key", &self.key)
            .finish()
    }
}

impl Identity {
    /// Loads the identity under `dir`.
    pub fn load(dir: &AgentDir) -> Result<Identity, IdentityError> {
        let not_enrolled = || IdentityError::NotEnrolled {
            dir: dir.root().display().to_string(),
        };
        let info: IdentityInfo = fsutil::read_state(&dir.identity().join("identity.json"), FORMAT)?
            .ok_or_else(not_enrolled)?;
        let key_path = dir.identity().join("device.key");
        let text = match std::fs::read_to_string(&key_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_enrolled()),
            Err(source) => {
                return Err(FileError::Io {
                    path: key_path,
                    source,
                }
                .into())
            }
        };
        let key = SigningKey::from_base64(&text).map_err(|source| IdentityError::BadKey {
            path: key_path.display().to_string(),
            source,
        })?;
        Ok(Identity { info, key })
    }

    /// Generates a key, enrolls it with `server` using the one-time `token`, pins the
    /// server's keys and saves everything under `dir/identity/`.
    pub async fn enroll(
        dir: &AgentDir,
        server: &str,
        token: &str,
        hostname: &str,
    ) -> Result<Identity, IdentityError> {
        if let Ok(existing) = Identity::load(dir) {
            return Err(IdentityError::AlreadyEnrolled {
                device: existing.info.device,
                dir: dir.root().display().to_string(),
            });
        }
        let server = server.trim_end_matches('/').to_string();
        let key = SigningKey::generate();
        let req = EnrollRequest {
            token: token.to_string(),
            device_key: key.public(),
            hostname: hostname.to_string(),
        };
        let resp: EnrollResponse =
            client::post_unsigned(&client::http()?, &server, "/v1/enroll", &req).await?;
        let info = IdentityInfo {
            device: resp.device,
            user: resp.user,
            server,
            keys: resp.keys,
            enrolled_at: crate::now(),
        };
        // Key first: an identity.json without its key is "not enrolled", never half-usable.
        fsutil::write_atomic(
            &dir.identity().join("device.key"),
            key.to_base64().as_bytes(),
            0o600,
        )?;
        fsutil::write_state(&dir.identity().join("identity.json"), FORMAT, &info)?;
        tracing::info!(device = %info.device, "enrolled");
        Ok(Identity { info, key })
    }

    /// The headers that authenticate one request (see `tandem_proto::auth`). This is the
    /// hook the image sync client signs its requests with.
    pub fn sign_request(
        &self,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> Vec<(&'static str, String)> {
        let s = RequestSignature::sign(
            &self.key,
            &self.info.device.to_string(),
            method,
            path_and_query,
            crate::now(),
            body,
        );
        vec![
            (auth::HEADER_DEVICE, s.device),
            (auth::HEADER_TIME, s.time.to_string()),
            (auth::HEADER_NONCE, s.nonce),
            (auth::HEADER_SIGNATURE, s.signature),
        ]
    }

    /// Signs an artifact (a kill acknowledgement) with the device key.
    pub fn sign_artifact<T: Serialize>(&self, kind: &str, value: &T) -> tandem_proto::Signed {
        self.key.sign(kind, value)
    }

    /// The device's public key.
    pub fn public_key(&self) -> tandem_proto::PublicKey {
        self.key.public()
    }

    /// Shreds the device key: after a kill is acknowledged nothing can speak for this
    /// device again.
    pub fn destroy_key(dir: &AgentDir) -> Result<(), FileError> {
        let p = dir.identity().join("device.key");
        if p.exists() {
            fsutil::shred(&p)?;
        }
        Ok(())
    }
}

/// The host name reported at enrollment.
pub fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Test helper: an identity saved under `dir` without a server.
#[doc(hidden)]
pub fn save_for_tests(dir: &Path, info: &IdentityInfo, key: &SigningKey) -> Result<(), FileError> {
    let d = AgentDir::new(dir);
    fsutil::write_atomic(
        &d.identity().join("device.key"),
        key.to_base64().as_bytes(),
        0o600,
    )?;
    fsutil::write_state(&d.identity().join("identity.json"), FORMAT, info)
}
