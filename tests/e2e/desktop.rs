//! End-to-end tests: desktop.
