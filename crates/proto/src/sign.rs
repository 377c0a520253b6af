//! ed25519 signatures over exact bytes, with domain separation by artifact kind.
//!
//! A [`Signed`] envelope keeps the payload as the JSON text that was signed. The message
//! the key signs is `b"tandem-signed-v1\0" || kind || b"\0" || payload`, so a signature
//! made for a lease can never be replayed as a manifest or a kill order.

use std::fmt;

use base64::Engine as _;
use ed25519_dalek::{Signer as _, Verifier as _};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

const DOMAIN: &[u8] = b"tandem-signed-v1\0";

/// A signature or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The envelope was made for another kind of artifact.
    #[error("expected a signed {expected}, got a signed {got}")]
    WrongKind {
        /// Kind the caller asked for.
        expected: String,
        /// Kind the envelope says it carries.
        got: String,
    },
    /// The signing key is not one the verifier trusts.
    #[error("signed by unknown key {0}; only keys pinned at enrollment are trusted")]
    UnknownKey(KeyId),
    /// The signature does not match the payload: it was altered or forged.
    #[error("signature does not match the content: the {0} was altered or forged")]
    BadSignature(String),
    /// The signature bytes are not a signature at all.
    #[error("malformed signature: {0}")]
    MalformedSignature(String),
    /// The key material is not a valid ed25519 key.
    #[error("malformed key: {0}")]
    MalformedKey(String),
    /// The signed payload is not the JSON the kind requires.
    #[error("signed {kind} has a malformed payload: {source}")]
    Payload {
        /// Kind of artifact.
        kind: String,
        /// Why the JSON was refused.
        source: serde_json::Error,
    },
}

/// Names a public key: the first 8 bytes of the BLAKE3 hash of its 32 bytes, in hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId([u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl TryFrom<String> for KeyId {
    type Error = crate::HexIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        crate::ids::parse_hex::<8>(&s).map(KeyId)
    }
}

impl From<KeyId> for String {
    fn from(k: KeyId) -> String {
        k.to_string()
    }
}

/// An ed25519 public key that can be pinned, stored and compared.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl PublicKey {
    /// The short name used in envelopes and logs.
    pub fn id(&self) -> KeyId {
        let h = blake3::hash(self.0.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&h.as_bytes()[..8]);
        KeyId(id)
    }

    /// Checks `signature` over `message` (already domain-separated by the caller).
    pub fn verify_raw(&self, message: &[u8], signature: &[u8]) -> Result<(), SignError> {
        let sig = ed25519_dalek::Signature::from_slice(signature)
            .map_err(|e| SignError::MalformedSignature(e.to_string()))?;
        self.0
            .verify(message, &sig)
            .map_err(|_| SignError::BadSignature("message".into()))
    }

    /// The 32 key bytes, base64 (standard alphabet).
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0.as_bytes())
    }

    /// Reads a key written by [`PublicKey::to_base64`].
    pub fn from_base64(s: &str) -> Result<Self, SignError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| SignError::MalformedKey(e.to_string()))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| SignError::MalformedKey("expected 32 bytes".into()))?;
        ed25519_dalek::VerifyingKey::from_bytes(&arr)
            .map(PublicKey)
            .map_err(|e| SignError::MalformedKey(e.to_string()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

impl TryFrom<String> for PublicKey {
    type Error = SignError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        PublicKey::from_base64(&s)
    }
}

impl From<PublicKey> for String {
    fn from(k: PublicKey) -> String {
        k.to_base64()
    }
}

/// A private ed25519 key. Its `Debug` never prints the key.
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        SigningKey(ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The 32 secret bytes, base64: for the key file only.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0.to_bytes())
    }

    /// Reads a key written by [`SigningKey::to_base64`].
    pub fn from_base64(s: &str) -> Result<Self, SignError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| SignError::MalformedKey(e.to_string()))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| SignError::MalformedKey("expected 32 bytes".into()))?;
        Ok(SigningKey(ed25519_dalek::SigningKey::from_bytes(&arr)))
    }

    /// Signs raw bytes (the caller provides domain separation).
    pub fn sign_raw(&self, message: &[u8]) -> Vec<u8> {
        self.0.sign(message).to_bytes().to_vec()
    }

    /// Serializes `value` and signs it as an artifact of `kind`.
    pub fn sign<T: Serialize>(&self, kind: &str, value: &T) -> Signed {
        let payload = serde_json::to_string(value).expect("serializing plain data cannot fail");
        let signature = self.0.sign(&message(kind, &payload)).to_bytes();
        Signed {
            kind: kind.to_string(),
            key_id: self.public().id(),
            payload,
            signature: base64::engine::general_purpose::STANDARD.encode(signature),
        }
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(****, public {})", self.public().id())
    }
}

fn message(kind: &str, payload: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + kind.len() + 1 + payload.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(kind.as_bytes());
    m.push(0);
    m.extend_from_slice(payload.as_bytes());
    m
}

/// A signed artifact: the exact payload text, the kind it was signed as, and who signed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed {
    /// Artifact kind, e.g. `manifest`, `target-state`, `lease`, `kill-order`.
    pub kind: String,
    /// Which key signed it.
    pub key_id: KeyId,
    /// The signed JSON text, byte for byte.
    pub payload: String,
    /// ed25519 signature, base64.
    pub signature: String,
}

impl Signed {
    /// Checks kind, signer and signature against the trusted keys, then parses the payload.
    /// Nothing in the payload is looked at before the signature holds.
    pub fn verify<T: DeserializeOwned>(
        &self,
        kind: &str,
        trusted: &[PublicKey],
    ) -> Result<T, SignError> {
        if self.kind != kind {
            return Err(SignError::WrongKind {
                expected: kind.to_string(),
                got: self.kind.clone(),
            });
        }
        let key = trusted
            .iter()
            .find(|k| k.id() == self.key_id)
            .ok_or(SignError::UnknownKey(self.key_id))?;
        let sig = base64::engine::general_purpose::STANDARD
            .decode(&self.signature)
            .map_err(|e| SignError::MalformedSignature(e.to_string()))?;
        key.verify_raw(&message(&self.kind, &self.payload), &sig)
            .map_err(|e| match e {
                SignError::BadSignature(_) => SignError::BadSignature(kind.to_string()),
                other => other,
            })?;
        serde_json::from_str(&self.payload).map_err(|source| SignError::Payload {
            kind: kind.to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Lease {
        device: String,
        not_after: u64,
    }

    fn lease() -> Lease {
        Lease {
            device: "d1".into(),
            not_after: 42,
        }
    }

    #[test]
    fn signed_value_verifies_with_the_pinned_key() {
        let key = SigningKey::generate();
        let env = key.sign("lease", &lease());
        let back: Lease = env.verify("lease", &[key.public()]).expect("verifies");
        assert_eq!(back, lease());
    }

    #[test]
    fn altered_payload_is_refused() {
        let key = SigningKey::generate();
        let mut env = key.sign("lease", &lease());
        env.payload = env.payload.replace("42", "4200000");
        let err = env.verify::<Lease>("lease", &[key.public()]).unwrap_err();
        assert!(matches!(err, SignError::BadSignature(_)), "{err}");
    }

    #[test]
    fn other_kind_and_other_key_are_refused() {
        let key = SigningKey::generate();
        let env = key.sign("lease", &lease());
        assert!(matches!(
            env.verify::<Lease>("manifest", &[key.public()]),
            Err(SignError::WrongKind { .. })
        ));
        let stranger = SigningKey::generate();
        assert!(matches!(
            env.verify::<Lease>("lease", &[stranger.public()]),
            Err(SignError::UnknownKey(_))
        ));
        // A forger who reuses the trusted key id but signs with another key.
        let mut forged = stranger.sign("lease", &lease());
        forged.key_id = key.public().id();
        assert!(matches!(
            forged.verify::<Lease>("lease", &[key.public()]),
            Err(SignError::BadSignature(_))
        ));
    }

    #[test]
    fn keys_round_trip_and_debug_hides_secret() {
        let key = SigningKey::generate();
        let again = SigningKey::from_base64(&key.to_base64()).expect("reads");
        assert_eq!(again.public(), key.public());
        assert!(!format!("{key:?}").contains(&key.to_base64()));
        let p = PublicKey::from_base64(&key.public().to_base64()).expect("reads");
        assert_eq!(p, key.public());
    }
}
