//! The lease gate: may the corporate VM start now?
//!
//! Refused when the lease is missing, forged, altered or for another device; when the
//! device was killed; when `max(now, high-water) >= not_after`; or when the clock is more
//! than [`ROLLBACK_TOLERANCE_SECS`] behind the persisted high-water mark of trusted time
//! (someone set the clock back to stretch the lease). The high-water mark
//! (`<dir>/state/clock.json`, format `tandem-clock-v1`) only ever moves forward: every
//! successful gate check and every verified target state (server time) raises it.
//!
//! Without a TPM this is a policy control, not a cryptographic one: root on the laptop
//! can delete the mark. It stops casual clock games and enforces expiry offline.

use serde::{Deserialize, Serialize};
use tandem_proto::fleet::{self, Lease};

use crate::fsutil::{self, FileError};
use crate::identity::{Identity, IdentityError};
use crate::AgentDir;

/// How far the clock may go back (NTP corrections, time-zone mistakes) before the gate
/// treats it as tampering.
pub const ROLLBACK_TOLERANCE_SECS: u64 = 600;
/// A running corporate VM gets warnings from this long before expiry.
pub const WARN_BEFORE_SECS: u64 = 24 * 3600;
/// After expiry a running corporate VM gets this long to shut down cleanly.
pub const SHUTDOWN_GRACE_SECS: u64 = 15 * 60;

const CLOCK_FORMAT: &str = "tandem-clock-v1";
pub(crate) const LEASE_FORMAT: &str = "tandem-lease-v1";

/// Why the corporate VM may not start.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// No identity.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The device executed a kill order.
    #[error("corporate VM refused: this device was killed by an administrator; its corporate data is erased")]
    Killed,
    /// Never checked in, or the lease was removed.
    #[error(
        "corporate VM refused: no lease; connect to the network and run `tandem agent check-in`"
    )]
    Missing,
    /// The lease file does not verify with the pinned state key.
    #[error(
        "corporate VM refused: the lease is forged or altered ({0}); run `tandem agent check-in`"
    )]
    Forged(tandem_proto::SignError),
    /// The lease was issued to another device.
    #[error("corporate VM refused: the lease belongs to device {0}, not this one")]
    WrongDevice(fleet::DeviceId),
    /// Expired.
    #[error("corporate VM refused: lease ended at {} (it is now {}); connect and run `tandem agent check-in`", fmt_time(*not_after), fmt_time(*now))]
    Expired {
        /// End of the lease.
        not_after: u64,
        /// `max(clock, high-water)`.
        now: u64,
    },
    /// The clock went backwards past the tolerance.
    #[error("corporate VM refused: the clock ({}) is behind the last trusted time ({}); fix the clock, then run `tandem agent check-in`", fmt_time(*clock), fmt_time(*high_water))]
    ClockRolledBack {
        /// The clock.
        clock: u64,
        /// The high-water mark.
        high_water: u64,
    },
    /// A state file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
}

/// A lease that allows the corporate VM to start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseStatus {
    /// When it was issued (server time).
    pub issued_at: u64,
    /// When it ends.
    pub not_after: u64,
    /// The time the gate used: `max(clock, high-water)`.
    pub now: u64,
    /// Seconds left.
    pub secs_left: u64,
    /// Days left, fractional, for people.
    pub days_left: f64,
    /// A running VM should be warned.
    pub warn: bool,
}

/// What a running corporate VM should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Keep running.
    Run,
    /// Keep running and tell the user how long is left.
    Warn {
        /// Seconds until expiry.
        secs_left: u64,
    },
    /// Expired: shut down cleanly within the grace period.
    Shutdown {
        /// Seconds until a forced stop.
        grace_left: u64,
    },
    /// Past the grace period (or refused for another reason): stop now.
    Stop,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Clock {
    high_water: u64,
}

/// Reads the high-water mark (0 when none).
pub fn high_water(dir: &AgentDir) -> Result<u64, FileError> {
    Ok(
        fsutil::read_state::<Clock>(&dir.state().join("clock.json"), CLOCK_FORMAT)?
            .map(|c| c.high_water)
            .unwrap_or(0),
    )
}

/// Raises the high-water mark to `t` (never lowers it).
pub fn raise_high_water(dir: &AgentDir, t: u64) -> Result<u64, FileError> {
    let hw = high_water(dir)?;
    if t > hw {
        fsutil::write_state(
            &dir.state().join("clock.json"),
            CLOCK_FORMAT,
            &Clock { high_water: t },
        )?;
        return Ok(t);
    }
    Ok(hw)
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StoredLease {
    pub lease: tandem_proto::Signed,
}

/// The gate the corporate VM start calls. `now` is the device clock (unix seconds).
pub fn check(dir: &AgentDir, now: u64) -> Result<LeaseStatus, LeaseError> {
    if crate::kill::is_killed(dir)? {
        return Err(LeaseError::Killed);
    }
    let id = Identity::load(dir)?;
    let stored: StoredLease = fsutil::read_state(&dir.state().join("lease.json"), LEASE_FORMAT)?
        .ok_or(LeaseError::Missing)?;
    let lease: Lease = stored
        .lease
        .verify(fleet::KIND_LEASE, std::slice::from_ref(&id.info.keys.state))
        .map_err(LeaseError::Forged)?;
    if lease.device != id.info.device {
        return Err(LeaseError::WrongDevice(lease.device));
    }
    let hw = high_water(dir)?;
    if now + ROLLBACK_TOLERANCE_SECS < hw {
        tracing::warn!(clock = now, high_water = hw, "clock rolled back");
        return Err(LeaseError::ClockRolledBack {
            clock: now,
            high_water: hw,
        });
    }
    let effective = now.max(hw).max(lease.issued_at);
    if effective >= lease.not_after {
        return Err(LeaseError::Expired {
            not_after: lease.not_after,
            now: effective,
        });
    }
    raise_high_water(dir, now)?;
    let secs_left = lease.not_after - effective;
    Ok(LeaseStatus {
        issued_at: lease.issued_at,
        not_after: lease.not_after,
        now: effective,
        secs_left,
        days_left: secs_left as f64 / 86_400.0,
        warn: secs_left <= WARN_BEFORE_SECS,
    })
}

/// What a running corporate VM should do, given the gate's answer now and the moment it
/// first saw the lease expired (if it did).
pub fn enforcement(
    gate: &Result<LeaseStatus, LeaseError>,
    now: u64,
    expired_since: Option<u64>,
) -> Enforcement {
    match gate {
        Ok(s) if s.warn => Enforcement::Warn {
            secs_left: s.secs_left,
        },
        Ok(_) => Enforcement::Run,
        Err(LeaseError::Expired { not_after, .. }) => {
            let since = expired_since.unwrap_or(*not_after).max(*not_after);
            let end = since + SHUTDOWN_GRACE_SECS;
            if now < end {
                Enforcement::Shutdown {
                    grace_left: end - now,
                }
            } else {
                Enforcement::Stop
            }
        }
        Err(_) => Enforcement::Stop,
    }
}

fn fmt_time(t: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{fixture, Fixture};
    use tandem_proto::fleet::DeviceId;
    use tandem_proto::SigningKey;

    fn store(f: &Fixture, signed: tandem_proto::Signed) {
        fsutil::write_state(
            &f.dir.state().join("lease.json"),
            LEASE_FORMAT,
            &StoredLease { lease: signed },
        )
        .expect("store");
    }

    fn lease(f: &Fixture, issued_at: u64, not_after: u64) -> tandem_proto::Signed {
        f.state_key.sign(
            fleet::KIND_LEASE,
            &Lease {
                device: f.device,
                issued_at,
                not_after,
                policy_hash: "p".into(),
            },
        )
    }

    #[test]
    fn valid_lease_passes_and_counts_days() {
        let f = fixture();
        store(&f, lease(&f, 1000, 1000 + 14 * 86_400));
        let s = check(&f.dir, 1000 + 86_400).expect("allowed");
        assert_eq!(s.secs_left, 13 * 86_400);
        assert!((s.days_left - 13.0).abs() < 1e-9);
        assert!(!s.warn);
        assert_eq!(high_water(&f.dir).expect("hw"), 1000 + 86_400);
    }

    #[test]
    fn missing_lease_is_refused() {
        let f = fixture();
        assert!(matches!(check(&f.dir, 5), Err(LeaseError::Missing)));
    }

    #[test]
    fn expired_lease_is_refused_at_not_after() {
        let f = fixture();
        store(&f, lease(&f, 1000, 2000));
        assert!(check(&f.dir, 1999).is_ok());
        assert!(matches!(
            check(&f.dir, 2000),
            Err(LeaseError::Expired {
                not_after: 2000,
                ..
            })
        ));
    }

    #[test]
    fn clock_rolled_back_past_tolerance_is_refused() {
        let f = fixture();
        store(&f, lease(&f, 1000, 100_000));
        check(&f.dir, 50_000).expect("allowed");
        // Within tolerance: allowed, and the gate uses the high-water time.
        let s = check(&f.dir, 50_000 - ROLLBACK_TOLERANCE_SECS).expect("within tolerance");
        assert_eq!(s.now, 50_000);
        assert!(matches!(
            check(&f.dir, 50_000 - ROLLBACK_TOLERANCE_SECS - 1),
            Err(LeaseError::ClockRolledBack { .. })
        ));
    }

    #[test]
    fn high_water_mark_expires_a_lease_even_with_an_old_clock() {
        let f = fixture();
        store(&f, lease(&f, 1000, 2000));
        raise_high_water(&f.dir, 2100).expect("raise");
        // Clock set back to inside the lease, but within tolerance of the mark.
        assert!(matches!(
            check(&f.dir, 1900),
            Err(LeaseError::Expired { now: 2100, .. })
        ));
    }

    #[test]
    fn altered_forged_and_foreign_leases_are_refused() {
        let f = fixture();
        let mut altered = lease(&f, 1000, 2000);
        altered.payload = altered.payload.replace("2000", "9999999");
        store(&f, altered);
        assert!(matches!(check(&f.dir, 1500), Err(LeaseError::Forged(_))));

        let forger = SigningKey::generate();
        let mut forged = forger.sign(
            fleet::KIND_LEASE,
            &Lease {
                device: f.device,
                issued_at: 1000,
                not_after: 9_999_999,
                policy_hash: "p".into(),
            },
        );
        forged.key_id = f.state_key.public().id();
        store(&f, forged);
        assert!(matches!(check(&f.dir, 1500), Err(LeaseError::Forged(_))));

        let other = f.state_key.sign(
            fleet::KIND_LEASE,
            &Lease {
                device: DeviceId::generate(),
                issued_at: 1000,
                not_after: 2000,
                policy_hash: "p".into(),
            },
        );
        store(&f, other);
        assert!(matches!(
            check(&f.dir, 1500),
            Err(LeaseError::WrongDevice(_))
        ));
    }

    #[test]
    fn enforcement_warns_then_gives_grace_then_stops() {
        let f = fixture();
        store(&f, lease(&f, 0, 100_000));
        let g = check(&f.dir, 100_000 - 10);
        assert_eq!(
            enforcement(&g, 100_000 - 10, None),
            Enforcement::Warn { secs_left: 10 }
        );
        let g = check(&f.dir, 100_000);
        assert_eq!(
            enforcement(&g, 100_000, None),
            Enforcement::Shutdown {
                grace_left: SHUTDOWN_GRACE_SECS
            }
        );
        assert_eq!(
            enforcement(&g, 100_000 + SHUTDOWN_GRACE_SECS, None),
            Enforcement::Stop
        );
    }
}
