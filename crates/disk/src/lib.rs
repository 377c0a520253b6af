//! Random-access disk views (raw, qcow2 chains), partition tables and filesystem allocation maps

#![forbid(unsafe_code)]
