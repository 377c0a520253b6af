//! Writes the JSON and wire-format seed corpora into `DIR/<target>/` (disk images are made
//! by `scripts/fuzz.sh` with the real tools). Usage: `seeds DIR`.
use std::path::Path;

use tandem_proto::backup::{BackupHead, BackupUpload, ManifestPart, StagedManifest};
use tandem_proto::manifest::{Manifest, ManifestDelta, MANIFEST_FORMAT};
use tandem_proto::{ChunkId, SigningKey};

fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("mkdir");
    std::fs::write(d.join(name), bytes).expect("write seed");
}

fn main() {
    let dir = std::env::args_os().nth(1).expect("usage: seeds DIR");
    let dir = Path::new(&dir);
    let key = SigningKey::generate();
    let id = |i: u8| Some(ChunkId::of(&[i; 64]));
    let m = |v: u64, chunks: Vec<Option<ChunkId>>| Manifest {
        format: MANIFEST_FORMAT,
        name: "gold".into(),
        version: v,
        size: chunks.len() as u64 * 65536 - 512,
        chunk_size: 65536,
        chunks,
    };
    let a = m(1, vec![id(1), None, id(2), id(1)]);
    let b = m(2, vec![id(1), id(3), None, id(1), id(4)]);
    let (sa, sb) = (a.sign(&key), b.sign(&key));
    let json = |v: &dyn erased::Ser| v.json();
    put(dir, "manifest", "signed.json", json(&sa).as_bytes());
    put(dir, "manifest", "bare.json", json(&b).as_bytes());
    put(dir, "envelope", "manifest.json", json(&sb).as_bytes());
    let lease = key.sign("lease", &serde_json::json!({"device": "d1", "not_after": 1}));
    put(dir, "envelope", "lease.json", json(&lease).as_bytes());
    put(dir, "envelope", "key.txt", key.public().to_base64().as_bytes());
    let delta = ManifestDelta::compute(&a, &b, &sb);
    put(dir, "manifest_delta", "delta.json", json(&delta).as_bytes());
    let up = BackupUpload {
        manifest: m(0, vec![id(5), None]),
        taken_at: 1_700_000_000,
        staged: Some(StagedManifest {
            upload: "0123456789abcdef0123456789abcdef".into(),
            parts: 2,
        }),
    };
    put(dir, "backup_manifest", "upload.json", json(&up).as_bytes());
    let part = ManifestPart {
        chunks: vec![id(6), None, id(7)],
    };
    put(dir, "backup_manifest", "part.json", json(&part).as_bytes());
    let head = BackupHead {
        seq: 3,
        size: 1 << 30,
        chunk_size: 65536,
        chunks: 16384,
        parts: 1,
    };
    put(dir, "backup_manifest", "head.json", json(&head).as_bytes());
    let mut req = Vec::new();
    req.extend_from_slice(&tandem_nbd::wire::REQUEST_MAGIC.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes()); // flags
    req.extend_from_slice(&0u16.to_be_bytes()); // read
    req.extend_from_slice(&7u64.to_be_bytes()); // handle
    req.extend_from_slice(&4096u64.to_be_bytes()); // offset
    req.extend_from_slice(&512u32.to_be_bytes()); // length
    put(dir, "nbd_request", "read.bin", &req);
    let mut opt = Vec::new();
    opt.extend_from_slice(&4u32.to_be_bytes());
    opt.extend_from_slice(b"gold");
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&15u32.to_be_bytes());
    opt.extend_from_slice(b"base:allocation");
    put(dir, "nbd_request", "meta.bin", &opt);
}

/// Serializing any of the seed types without naming each one.
mod erased {
    pub trait Ser {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> String {
            serde_json::to_string_pretty(self).expect("plain data serializes")
        }
    }
}
