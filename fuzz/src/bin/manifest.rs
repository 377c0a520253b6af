//! Manifest decoder: a signed envelope as JSON, verified, and a bare manifest validated.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = tandem_proto::manifest::Manifest::verify_json(data, &tandem_fuzz::trusted());
        if let Ok(m) = serde_json::from_slice::<tandem_proto::manifest::Manifest>(data) {
            if m.validate().is_ok() {
                let _ = m.chunk_set();
            }
        }
    });
}
