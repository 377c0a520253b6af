//! End-to-end tests: fleet.
