//! qcow2 reader over in-memory bytes (a backing file is refused there), then read.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let view = tandem_fuzz::disk(data);
        if let Ok(q) = tandem_disk::open_view(view, "fuzz.qcow2".as_ref()) {
            tandem_fuzz::read_some(&*q, 4 << 20);
        }
    });
}
