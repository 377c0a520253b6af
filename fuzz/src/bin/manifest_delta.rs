//! Manifest delta decoder (`manifest?against=`): decoded and applied against a small base.
use tandem_proto::manifest::{Manifest, ManifestDelta, MANIFEST_FORMAT};

fn main() {
    let base = Manifest {
        format: MANIFEST_FORMAT,
        name: "gold".into(),
        version: 1,
        size: 4 * 65536,
        chunk_size: 65536,
        chunks: vec![None; 4],
    };
    afl::fuzz!(|data: &[u8]| {
        if let Ok(d) = serde_json::from_slice::<ManifestDelta>(data) {
            let _ = d.apply(&base, &tandem_fuzz::trusted());
        }
    });
}
