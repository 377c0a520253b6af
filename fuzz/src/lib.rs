//! Shared helpers for the fuzz targets (each target is a `src/bin/*.rs`).

use std::sync::Arc;

/// An in-memory disk holding the fuzzer's bytes.
pub fn disk(data: &[u8]) -> Arc<dyn tandem_disk::ReadAt> {
    Arc::new(tandem_disk::MemDisk(data.to_vec()))
}

/// Reads every byte of `view` in 64 KiB pieces, up to `limit` bytes (a view may claim
/// terabytes; reading a bounded prefix exercises every mapping path).
pub fn read_some(view: &dyn tandem_disk::ReadAt, limit: u64) {
    let end = view.size().min(limit);
    let mut buf = vec![0u8; 65536];
    let mut off = 0u64;
    while off < end {
        let n = (end - off).min(buf.len() as u64) as usize;
        if view.read_at(&mut buf[..n], off).is_err() {
            return;
        }
        off += n as u64;
    }
}

/// A fixed trusted key (its private half is irrelevant: the fuzzer cannot sign).
pub fn trusted() -> Vec<tandem_proto::PublicKey> {
    static KEY: std::sync::OnceLock<tandem_proto::PublicKey> = std::sync::OnceLock::new();
    vec![KEY
        .get_or_init(|| tandem_proto::SigningKey::generate().public())
        .clone()]
}
