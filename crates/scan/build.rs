//! Declares `cfg(fuzzing)` (set by cargo-afl): a fuzzing build leaves YARA-X out.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(fuzzing)");
    println!("cargo::rerun-if-changed=build.rs");
}
