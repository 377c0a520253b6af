//! Identifiers that cross crate and process boundaries. Each is a newtype that displays as
//! lower-case hex, so a chunk id can never be confused with a device id in a signature.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A hex string could not be read as an identifier.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HexIdError {
    /// The text had the wrong number of characters.
    #[error("expected {expected} hex characters, got {got}")]
    Length {
        /// Characters an id of this kind has.
        expected: usize,
        /// Characters that were given.
        got: usize,
    },
    /// The text contained something other than `0-9a-f`.
    #[error("not a hex string")]
    NotHex,
}

/// The BLAKE3 hash of a chunk's plaintext: the only name a chunk has, on the server and
/// on every laptop. Reading a chunk always re-checks its content against this id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Names `data` by its content.
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// Raw bytes, for keys in embedded databases.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &hex::encode(self.0)[..16])
    }
}

/// Parses a fixed-length hex id.
pub fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], HexIdError> {
    if s.len() != N * 2 {
        return Err(HexIdError::Length {
            expected: N * 2,
            got: s.len(),
        });
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|_| HexIdError::NotHex)?;
    Ok(out)
}

impl FromStr for ChunkId {
    type Err = HexIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex::<32>(s).map(ChunkId)
    }
}

impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_id_round_trips_through_hex() {
        let id = ChunkId::of(b"hello");
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<ChunkId>(), Ok(id));
    }

    #[test]
    fn bad_hex_is_refused_with_reason() {
        assert_eq!(
            "abc".parse::<ChunkId>(),
            Err(HexIdError::Length {
                expected: 64,
                got: 3
            })
        );
        let zs = "z".repeat(64);
        assert_eq!(zs.parse::<ChunkId>(), Err(HexIdError::NotHex));
    }
}
