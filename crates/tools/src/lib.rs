//! The small toolkit under every Tandem crate: helpers with no Tandem concept in them that
//! several crates need, written once and tested once.
//!
//! Why it exists: each crate used to carry its own copy, and the copies drifted. Thirteen
//! temp-file-and-rename writes, two of them with a fixed `.tmp` name that two concurrent
//! writers of one file collide on and none of them fsyncing the directory (so a crash
//! right after the rename could lose the new name); seven `now()` functions; five sets of
//! byte readers that panicked on short input, two of them widening every field to `u64`.
//!
//! - [`atomic`]: whole-file writes that a crash or a concurrent writer cannot tear.
//! - [`clock`]: wall-clock time as unix seconds.
//! - [`bytes`]: bounds-checked little- and big-endian field readers for parsers of
//!   untrusted input.
//!
//! Rules for what goes in: standard library only (every crate depends on this one), no
//! Tandem types, and a second user before a helper moves here. Errors are plain
//! [`std::io::Error`]s with their kind and OS code intact (callers name the path in
//! their own error types), except [`bytes::Short`], which says which field was cut off.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod atomic;
pub mod bytes;
pub mod clock;
