//! Fleet bodies: enrollment, check-in, the signed target state, the lease, the kill order
//! and its acknowledgement, plus the admin API's shapes (so `--json` prints them as-is).
//!
//! Signed artifact kinds (see [`crate::sign`]):
//! - [`KIND_TARGET_STATE`]: [`TargetState`], signed by the server's state key;
//! - [`KIND_LEASE`]: [`Lease`], signed by the state key, carried inside the target state
//!   and stored on its own by the agent (the corporate VM gate reads only the lease);
//! - [`KIND_KILL_ORDER`]: [`KillOrder`], signed by the server's kill key;
//! - [`KIND_KILL_ACK`]: [`KillAck`], signed by the device's own key.
//!
//! Times are unix seconds (UTC). Unknown fields are refused in everything a device or an
//! admin sends, so a typo never silently means "default".

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::sign::{PublicKey, Signed};

/// Envelope kind of a [`TargetState`].
pub const KIND_TARGET_STATE: &str = "target-state";
/// Envelope kind of a [`Lease`].
pub const KIND_LEASE: &str = "lease";
/// Envelope kind of a [`KillOrder`].
pub const KIND_KILL_ORDER: &str = "kill-order";
/// Envelope kind of a [`KillAck`].
pub const KIND_KILL_ACK: &str = "kill-ack";

/// Largest check-in or enrollment body the server reads.
pub const MAX_CHECKIN_BODY: usize = 64 * 1024;

/// A device's name on the server: 16 random bytes, hex. Assigned at enrollment.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub [u8; 16]);

impl DeviceId {
    /// A fresh random id.
    pub fn generate() -> Self {
        DeviceId(rand::random())
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

impl FromStr for DeviceId {
    type Err = crate::HexIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::ids::parse_hex::<16>(s).map(DeviceId)
    }
}

impl Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The server's public keys a device pins at enrollment; every signed artifact is checked
/// against the one key for its kind, so a leaked image key cannot forge a kill or a lease.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PinnedKeys {
    /// Verifies manifests.
    pub image: PublicKey,
    /// Verifies target states and leases.
    pub state: PublicKey,
    /// Verifies kill orders.
    pub kill: PublicKey,
    /// Verifies scan rule bundles.
    pub rules: PublicKey,
}

/// `POST /v1/enroll`: the one unauthenticated device call. The token proves the admin
/// invited this device; the key is what every later request is signed with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The one-time enrollment token.
    pub token: String,
    /// The public half of the key the device just generated.
    pub device_key: PublicKey,
    /// Host name, for the admin's device list.
    pub hostname: String,
}

/// Answer to [`EnrollRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    /// The identity now bound to the device key.
    pub device: DeviceId,
    /// The user the token was made for.
    pub user: String,
    /// Keys to pin.
    pub keys: PinnedKeys,
}

/// One image version a device holds or is assigned.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    /// Image name, e.g. `corp-win11`.
    pub image: String,
    /// Version number within the image.
    pub version: u64,
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.image, self.version)
    }
}

/// What a VM is doing, as the agent reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmReport {
    /// `corporate` or `personal`.
    pub name: String,
    /// Free-form state, e.g. `running`, `stopped`.
    pub state: String,
}

/// `POST /v1/checkin`: the device's status, sent up at every contact.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CheckinRequest {
    /// Agent version string.
    pub agent_version: String,
    /// Image versions committed in the local store.
    #[serde(default)]
    pub images: Vec<ImageRef>,
    /// VM states.
    #[serde(default)]
    pub vms: Vec<VmReport>,
    /// Time of the last finished backup.
    #[serde(default)]
    pub last_backup: Option<u64>,
    /// The device's clock when it sent this (compared with the server's for drift).
    pub clock: u64,
}

/// Answer to [`CheckinRequest`]: a [`TargetState`] in a [`Signed`] envelope.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckinResponse {
    /// Kind [`KIND_TARGET_STATE`], signed by the state key.
    pub target: Signed,
}

/// Whether the guest may use a host device class. Passed on to the corporate VM spec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceControls {
    /// USB pass-through into the corporate VM.
    pub usb: bool,
    /// Clipboard sharing between the VMs and the host.
    pub clipboard: bool,
    /// Network access for the corporate VM.
    pub network: bool,
}

impl Default for DeviceControls {
    fn default() -> Self {
        DeviceControls {
            usb: false,
            clipboard: false,
            network: true,
        }
    }
}

/// A named fleet policy. Every field has a default so an admin sets only what differs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// How long a lease lasts without a check-in.
    pub lease_days: u32,
    /// Minutes between check-ins.
    pub checkin_interval_mins: u32,
    /// Minutes between backups of the corporate user disk.
    pub backup_interval_mins: u32,
    /// When the offline scanner runs, e.g. `daily`, `weekly`, `never`.
    pub scan_schedule: String,
    /// Host device classes the corporate VM may use.
    pub controls: DeviceControls,
    /// Most backup data the server stores for one user, in MiB (what the user's backup
    /// chunks occupy, compressed); uploads past it are refused. 0 = no limit. Default
    /// [`DEFAULT_BACKUP_QUOTA_MB`]. Not serialized while it is the default, so older
    /// agents (and the policy hashes of existing leases) see the same policy as before.
    #[serde(skip_serializing_if = "is_default_backup_quota")]
    pub backup_quota_mb: u64,
}

/// The backup quota of a policy that does not set one: 64 GiB per user.
pub const DEFAULT_BACKUP_QUOTA_MB: u64 = 64 * 1024;

fn is_default_backup_quota(mb: &u64) -> bool {
    *mb == DEFAULT_BACKUP_QUOTA_MB
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            lease_days: 14,
            checkin_interval_mins: 60,
            backup_interval_mins: 240,
            scan_schedule: "daily".into(),
            controls: DeviceControls::default(),
            backup_quota_mb: DEFAULT_BACKUP_QUOTA_MB,
        }
    }
}

impl Policy {
    /// BLAKE3 of the canonical JSON, hex: what a lease binds to.
    pub fn hash(&self) -> String {
        let json = serde_json::to_string(self).expect("serializing plain data cannot fail");
        blake3::hash(json.as_bytes()).to_hex().to_string()
    }
}

/// The images a user's VMs run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Assignments {
    /// Gold image of the corporate VM.
    pub corporate: Option<ImageRef>,
    /// Base image of the personal VM.
    pub personal: Option<ImageRef>,
}

/// What the server wants a device to be. Signed as [`KIND_TARGET_STATE`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TargetState {
    /// The device this is for; the agent refuses a state made for another device.
    pub device: DeviceId,
    /// The server's clock when it signed: trusted time for the lease high-water mark.
    pub issued_at: u64,
    /// Images to hold and run.
    pub assignments: Assignments,
    /// Policy in force, by name and content.
    pub policy_name: String,
    /// The policy itself.
    pub policy: Policy,
    /// Kind [`KIND_LEASE`]; absent once a kill is ordered.
    pub lease: Option<Signed>,
    /// Kind [`KIND_KILL_ORDER`]; present when the admin killed the device.
    pub kill: Option<Signed>,
    /// Version of the scan rule bundle the device should hold.
    pub rules_version: Option<u64>,
}

/// The right to start the corporate VM until `not_after`. Signed as [`KIND_LEASE`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// The device it was issued to.
    pub device: DeviceId,
    /// Server time at issue.
    pub issued_at: u64,
    /// The corporate VM may not start at or after this time.
    pub not_after: u64,
    /// [`Policy::hash`] of the policy it was issued under.
    pub policy_hash: String,
}

/// Orders a device to erase its corporate data. Signed as [`KIND_KILL_ORDER`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KillOrder {
    /// The device to erase.
    pub device: DeviceId,
    /// When the admin ordered it.
    pub ordered_at: u64,
    /// Who ordered it.
    pub actor: String,
    /// Why (lost, stolen, left the company…).
    pub reason: String,
}

/// The device's proof that it executed a kill. Signed as [`KIND_KILL_ACK`] with the
/// device key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KillAck {
    /// The device that erased itself.
    pub device: DeviceId,
    /// `ordered_at` of the order it executed.
    pub ordered_at: u64,
    /// When it finished.
    pub executed_at: u64,
    /// Key files overwritten and deleted.
    pub keys_destroyed: u64,
    /// Whether `corporate/` was removed.
    pub corporate_deleted: bool,
    /// Whether corporate VMs were stopped (or none ran).
    pub vms_stopped: bool,
}

/// `POST /v1/kill-ack` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillAckRequest {
    /// Kind [`KIND_KILL_ACK`], signed by the device key.
    pub ack: Signed,
}

/// Lifecycle of a device on the server.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceStatus {
    /// Enrolled, gets leases.
    Active,
    /// Kill ordered; gets the kill order and no lease until it acknowledges.
    KillPending,
    /// Kill acknowledged; every request is refused.
    Killed,
}

impl DeviceStatus {
    /// The text stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Active => "active",
            DeviceStatus::KillPending => "kill-pending",
            DeviceStatus::Killed => "killed",
        }
    }
}

impl FromStr for DeviceStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(DeviceStatus::Active),
            "kill-pending" => Ok(DeviceStatus::KillPending),
            "killed" => Ok(DeviceStatus::Killed),
            other => Err(format!("unknown device status {other:?}")),
        }
    }
}

impl fmt::Display for DeviceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One device as the admin sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device id.
    pub id: DeviceId,
    /// Owner.
    pub user: String,
    /// Host name given at enrollment.
    pub hostname: String,
    /// Lifecycle state.
    pub status: DeviceStatus,
    /// When it enrolled.
    pub enrolled_at: u64,
    /// Last check-in, if any.
    pub last_checkin: Option<u64>,
    /// `not_after` of the last lease issued.
    pub lease_not_after: Option<u64>,
    /// Seconds of lease left at the time of the listing (0 when expired or none).
    pub lease_secs_left: u64,
    /// Last status the device reported.
    pub last_report: Option<CheckinRequest>,
    /// Reason given when it was killed.
    pub kill_reason: Option<String>,
}

/// A user as the admin sees them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserInfo {
    /// Unique name.
    pub name: String,
    /// Policy in force for the user's devices.
    pub policy: String,
    /// Images assigned.
    pub assignments: Assignments,
    /// When the user was created.
    pub created_at: u64,
}

/// `POST /v1/admin/users`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// Unique name.
    pub name: String,
    /// Policy name (default `default`).
    #[serde(default)]
    pub policy: Option<String>,
}

/// `POST /v1/admin/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// User whose device will enroll.
    pub user: String,
    /// Lifetime in seconds (default one hour, at most seven days).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// `POST /v1/admin/tokens/revoke`: ends every unused enrollment token of a user.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeTokens {
    /// Whose tokens.
    pub user: String,
    /// Why (audit log).
    #[serde(default)]
    pub reason: Option<String>,
}

/// Answer to [`RevokeTokens`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokensRevoked {
    /// Whose tokens.
    pub user: String,
    /// How many unused tokens were ended.
    pub revoked: u64,
}

/// Answer to [`CreateToken`]: the only time the token is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The one-time token.
    pub token: String,
    /// For whom.
    pub user: String,
    /// When it stops working.
    pub expires_at: u64,
}

/// `POST /v1/admin/assign`: set a user's images and/or policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assign {
    /// Which user.
    pub user: String,
    /// New corporate gold image (unchanged when absent).
    #[serde(default)]
    pub corporate: Option<ImageRef>,
    /// New personal base image (unchanged when absent).
    #[serde(default)]
    pub personal: Option<ImageRef>,
    /// New policy name (unchanged when absent).
    #[serde(default)]
    pub policy: Option<String>,
    /// Why, for the audit log.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `PUT /v1/admin/policies/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPolicy {
    /// The whole policy.
    pub policy: Policy,
    /// Why, for the audit log.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A named policy as listed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyInfo {
    /// Name.
    pub name: String,
    /// Content.
    pub policy: Policy,
}

/// `POST /v1/admin/devices/{id}/kill`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillRequest {
    /// Why (required: it goes into the kill order and the audit log).
    pub reason: String,
}

/// One audit log entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEntry {
    /// Monotonic id.
    pub id: i64,
    /// When.
    pub at: u64,
    /// `admin:<name>`, `device:<id>` or `server`.
    pub actor: String,
    /// What, e.g. `device.enrolled`, `device.killed`, `user.created`.
    pub action: String,
    /// Device concerned, if any.
    pub device: Option<DeviceId>,
    /// Reason the actor gave.
    pub reason: Option<String>,
    /// Details (JSON).
    pub detail: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_round_trips_and_rejects_junk() {
        let id = DeviceId::generate();
        let back: DeviceId = id.to_string().parse().expect("parses");
        assert_eq!(back, id);
        assert!("zz".parse::<DeviceId>().is_err());
        let json = serde_json::to_string(&id).expect("json");
        assert_eq!(serde_json::from_str::<DeviceId>(&json).expect("json"), id);
    }

    #[test]
    fn policy_defaults_and_hash_follow_content() {
        let p: Policy = serde_json::from_str("{}").expect("defaults");
        assert_eq!(p.lease_days, 14);
        assert_eq!(p.checkin_interval_mins, 60);
        let mut q = p.clone();
        assert_eq!(p.hash(), q.hash());
        q.controls.usb = true;
        assert_ne!(p.hash(), q.hash());
        assert!(serde_json::from_str::<Policy>(r#"{"lease_dayz":1}"#).is_err());
        // The backup quota: defaulted, omitted while default (same hash as before it
        // existed), kept when set.
        assert_eq!(p.backup_quota_mb, DEFAULT_BACKUP_QUOTA_MB);
        assert!(!serde_json::to_string(&p)
            .expect("json")
            .contains("backup_quota_mb"));
        let mut r = p.clone();
        r.backup_quota_mb = 0;
        let back: Policy =
            serde_json::from_str(&serde_json::to_string(&r).expect("json")).expect("parse");
        assert_eq!(back.backup_quota_mb, 0);
        assert_ne!(p.hash(), r.hash());
    }

    #[test]
    fn status_text_round_trips() {
        for s in [
            DeviceStatus::Active,
            DeviceStatus::KillPending,
            DeviceStatus::Killed,
        ] {
            assert_eq!(s.as_str().parse::<DeviceStatus>(), Ok(s));
        }
    }
}
