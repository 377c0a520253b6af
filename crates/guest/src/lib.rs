//! Builds the reproducible test and demo guest: Debian cloud kernel, busybox initramfs, ext4 roots

#![forbid(unsafe_code)]
