//! Helpers: run a tool, make files of known content.

use std::path::Path;
use std::process::Command;

/// Runs `prog args…`, panicking with its stderr when it fails.
pub fn sh(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic pseudo-random bytes (xorshift), distinct per seed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Reads a whole view.
pub fn read_all(v: &dyn tandem_disk::ReadAt) -> Vec<u8> {
    let mut b = vec![0u8; v.size() as usize];
    v.read_at(&mut b, 0).expect("read whole view");
    b
}

/// Path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

struct View(tandem_disk::RawFile);

impl ext4_view::Ext4Read for View {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        use tandem_disk::ReadAt as _;
        Ok(self.0.read_at(dst, start)?)
    }
}

/// Opens an ext4 image file with ext4-view (an independent reader).
pub fn ext4(p: &Path) -> ext4_view::Ext4 {
    ext4_view::Ext4::load(Box::new(View(tandem_disk::RawFile::open(p).expect("open"))))
        .expect("ext4 loads")
}
