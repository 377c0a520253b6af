//! Integration tests of tandem-disk against images made by the real tools (qemu-img,
//! qemu-io, mkfs.ext4, mkntfs, sfdisk, sgdisk). One test binary.

mod it {
    pub mod qcow2;
    pub mod tables;
    pub mod unused;
    pub mod util;
}
