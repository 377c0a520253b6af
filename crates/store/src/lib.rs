//! Content-addressed chunk store: packs, embedded index, zstd, AEAD at rest, verified reads, GC

#![forbid(unsafe_code)]
