//! Shared helpers for end-to-end tests: temp dirs, running the binary, loopback ports,
//! and a reaper that kills child processes even when a test fails.
