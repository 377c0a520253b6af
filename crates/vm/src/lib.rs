//! One QEMU process per VM, driven over QMP

#![forbid(unsafe_code)]
