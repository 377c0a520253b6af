//! End-to-end tests: drive the real `tandem` binary, real QEMU and real servers on loopback.
//! One test binary (linking is the cost on 2 cores); one module per feature.

mod e2e {
    pub mod console;
    pub mod desktop;
    pub mod fleet;
    pub mod image;
    pub mod scan;
    pub mod security;
    pub mod util;
    pub mod vm;
}
