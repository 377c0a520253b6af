//! Tandem management server: fleet API, image serving, admin web UI.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod images;
pub mod keys;
