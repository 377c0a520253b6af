//! ext2/3/4 block bitmaps and NTFS `$Bitmap` (what publish reads to drop free space).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = tandem_disk::unused_ranges(tandem_fuzz::disk(data));
    });
}
