//! Integration tests of tandem-scan's in-process API on images made by mkfs.ext4.

mod it {
    pub mod garbage;
    pub mod scan_disk;
}
