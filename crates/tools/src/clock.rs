//! Wall-clock time as unix seconds, the unit every Tandem record and signature uses.
//!
//! A clock set before 1970 reads as 0 rather than failing: callers compare times
//! (`now.saturating_sub(t)`), and a wrong clock is reported by the lease checks, not here.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix seconds now (0 when the clock is before 1970).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix seconds now as `i64`, the type SQL `BIGINT` columns bind (0 before 1970).
pub fn now_secs_i64() -> i64 {
    i64::try_from(now_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_after_2024_and_both_widths_agree() {
        let (a, b) = (now_secs(), now_secs_i64());
        assert!(a > 1_700_000_000, "{a}");
        assert!((b - a as i64).abs() <= 1, "{a} {b}");
    }
}
