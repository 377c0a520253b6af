//! MBR/GPT: the volume list, each volume's filesystem signature.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let view = tandem_fuzz::disk(data);
        if let Ok(vols) = tandem_disk::volumes(&*view) {
            for v in vols {
                if let Ok(s) = v.view(view.clone()) {
                    let _ = tandem_disk::detect_fs(&s);
                }
            }
        }
    });
}
