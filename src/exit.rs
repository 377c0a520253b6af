//! The exit-code table: the only place exit codes are defined.

/// Success; for scans, every file was read and none matched.
pub const SUCCESS: u8 = 0;
/// Finished with a negative finding (a scan found something).
pub const FINDING: u8 = 1;
/// Finished, but something could not be read or scanned.
pub const INCOMPLETE: u8 = 2;
/// An error: bad usage, bad input, or a runtime failure.
pub const ERROR: u8 = 3;

/// Shown at the end of `tandem --help`.
pub const HELP: &str = "Exit codes: 0 success/clean, 1 finding (infected), 2 incomplete, 3 error.
Logging: TANDEM_LOG=debug (or -v, -vv) writes logs to stderr.";
