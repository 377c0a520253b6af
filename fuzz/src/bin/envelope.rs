//! Signed-envelope verification: any kind, any payload, against a pinned key.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(s) = serde_json::from_slice::<tandem_proto::Signed>(data) {
            let keys = tandem_fuzz::trusted();
            let _ = s.verify::<serde_json::Value>(&s.kind.clone(), &keys);
        }
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = tandem_proto::PublicKey::from_base64(text);
        }
    });
}
