//! Integration tests of tandem-nbd: the export served in-process from a real chunk store,
//! read by clients someone else wrote (libnbd's `nbdinfo` and `nbdcopy`, `qemu-img`) and
//! by a small hand-written client that sends what real clients never do. One test binary.

mod it {
    pub mod clients;
    pub mod protocol;
    pub mod util;
}
