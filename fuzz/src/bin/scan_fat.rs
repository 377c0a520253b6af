//! `tandem_fuzz::targets::scan_fat` under AFL++ (see the function's doc).
fn main() {
    tandem_fuzz::install_panic_policy();
    afl::fuzz_nohook!(|data: &[u8]| tandem_fuzz::targets::scan_fat(data));
}
