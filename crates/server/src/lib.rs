//! Tandem management server: fleet API, image serving, admin web UI

#![forbid(unsafe_code)]
