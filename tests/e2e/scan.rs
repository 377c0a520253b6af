//! End-to-end tests: scan.
