//! Types that travel between Tandem processes: identifiers, signed envelopes and the
//! shapes of API bodies.
//!
//! Everything here is shared by the server, the agent and the command line, so it has no
//! I/O and no async. A type that never leaves one crate does not belong here.
//!
//! Signed artifacts (manifests, target states, leases, kill orders, rule bundles) are
//! carried in a [`sign::Signed`] envelope: the payload is kept as the exact JSON text that
//! was signed, so verification never depends on re-serializing a value the same way.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod api;
pub mod auth;
pub mod backup;
pub mod fleet;
pub mod ids;
pub mod manifest;
pub mod sign;

pub use ids::{ChunkId, HexIdError};
pub use sign::{KeyId, PublicKey, SignError, Signed, SigningKey};
