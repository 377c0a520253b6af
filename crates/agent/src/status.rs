//! What `tandem agent status` shows: identity, lease (days left or why refused), last
//! check-in, kill state, assignments.

use serde::{Deserialize, Serialize};
use tandem_proto::fleet::{Assignments, DeviceId, Policy};

use crate::identity::{Identity, IdentityError};
use crate::{checkin, kill, lease, AgentDir};

/// The agent's state for people and `--json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Whether an identity exists.
    pub enrolled: bool,
    /// Device id.
    pub device: Option<DeviceId>,
    /// User.
    pub user: Option<String>,
    /// Server URL.
    pub server: Option<String>,
    /// Whether the corporate VM may start now.
    pub lease_ok: bool,
    /// The lease, when valid.
    pub lease: Option<lease::LeaseStatus>,
    /// Why the corporate VM is refused, when it is.
    pub lease_refusal: Option<String>,
    /// Trusted-time high-water mark.
    pub high_water: u64,
    /// Check-in history.
    pub checkin: checkin::CheckinLog,
    /// A kill was executed.
    pub killed: bool,
    /// The server has the kill acknowledgement.
    pub kill_acknowledged: bool,
    /// Assigned images from the last target state.
    pub assignments: Option<Assignments>,
    /// Policy from the last target state.
    pub policy: Option<Policy>,
}

/// Collects the status at device time `now`.
pub fn status(dir: &AgentDir, now: u64) -> Result<AgentStatus, crate::fsutil::FileError> {
    let rec = kill::record(dir)?;
    let ident = Identity::load(dir);
    let gate = lease::check(dir, now);
    let target = checkin::current_target(dir).ok().flatten();
    let info = ident.as_ref().ok().map(|i| i.info.clone());
    Ok(AgentStatus {
        enrolled: info.is_some() || rec.is_some(),
        device: info.as_ref().map(|i| i.device),
        user: info.as_ref().map(|i| i.user.clone()),
        server: info.as_ref().map(|i| i.server.clone()),
        lease_ok: gate.is_ok(),
        lease_refusal: gate.as_ref().err().map(|e| match e {
            lease::LeaseError::Identity(IdentityError::NotEnrolled { .. }) if rec.is_some() => {
                lease::LeaseError::Killed.to_string()
            }
            e => e.to_string(),
        }),
        lease: gate.ok(),
        high_water: lease::high_water(dir)?,
        checkin: checkin::log(dir)?,
        killed: rec.is_some(),
        kill_acknowledged: rec.map(|r| r.acknowledged).unwrap_or(false),
        assignments: target.as_ref().map(|t| t.assignments.clone()),
        policy: target.map(|t| t.policy),
    })
}
