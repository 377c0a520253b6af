//! Executing a kill order: stop the corporate VMs, crypto-erase every corporate key
//! (`<dir>/keys/**`: overwrite, sync, delete), delete `<dir>/corporate/`, drop the lease
//! and target state, and sign an acknowledgement with the device key.
//!
//! `<dir>/state/killed.json` (format `tandem-killed-v1`) is written BEFORE anything is
//! erased, so a crash half-way leaves a device that refuses the corporate VM and resumes
//! the erase at the next start; it records the signed ack and whether the server took it.

use serde::{Deserialize, Serialize};
use tandem_proto::fleet::{self, KillAck, KillOrder};

use crate::fsutil::{self, FileError};
use crate::identity::Identity;
use crate::AgentDir;

const FORMAT: &str = "tandem-killed-v1";

/// The corporate VMs, as the kill sees them. The VM supervisor implements this; the
/// default [`NoVms`] is for devices (and tests) without a supervisor.
pub trait CorporateVms: Send + Sync {
    /// Stops every corporate VM now (hard stop is fine: its disks are about to go).
    fn stop_all(&self) -> Result<(), tandem_vm::VmError>;
}

/// No VM supervisor: nothing to stop.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoVms;

impl CorporateVms for NoVms {
    fn stop_all(&self) -> Result<(), tandem_vm::VmError> {
        Ok(())
    }
}

/// A kill could not be executed completely.
#[derive(Debug, thiserror::Error)]
pub enum KillError {
    /// A file could not be erased.
    #[error("kill could not erase: {0}")]
    File(#[from] FileError),
}

/// What the device remembers about its kill.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KillRecord {
    /// The verified order.
    pub order: KillOrder,
    /// The signed acknowledgement, once erasure finished.
    pub ack: Option<tandem_proto::Signed>,
    /// Whether the server accepted the acknowledgement.
    pub acknowledged: bool,
}

/// Whether this device executed (or started executing) a kill.
pub fn is_killed(dir: &AgentDir) -> Result<bool, FileError> {
    Ok(record(dir)?.is_some())
}

/// The kill record, if any.
pub fn record(dir: &AgentDir) -> Result<Option<KillRecord>, FileError> {
    fsutil::read_state(&dir.state().join("killed.json"), FORMAT)
}

pub(crate) fn save_record(dir: &AgentDir, r: &KillRecord) -> Result<(), FileError> {
    fsutil::write_state(&dir.state().join("killed.json"), FORMAT, r)
}

/// Executes a verified kill order and returns the signed acknowledgement.
pub fn execute(
    dir: &AgentDir,
    id: &Identity,
    order: &KillOrder,
    vms: &dyn CorporateVms,
) -> Result<tandem_proto::Signed, KillError> {
    tracing::warn!(device = %order.device, reason = order.reason, "executing kill order");
    save_record(
        dir,
        &KillRecord {
            order: order.clone(),
            ack: None,
            acknowledged: false,
        },
    )?;
    let vms_stopped = match vms.stop_all() {
        Ok(()) => true,
        Err(e) => {
            // Erase anyway: without keys the disks are unreadable even to a running VM's
            // next open; the ack reports the failure.
            tracing::error!(error = %e, "could not stop corporate VMs; erasing anyway");
            false
        }
    };
    let keys_destroyed = fsutil::shred_tree(&dir.keys())?;
    let corporate_deleted = fsutil::remove_tree(&dir.corporate())?;
    for f in ["lease.json", "target.json"] {
        let p = dir.state().join(f);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|source| FileError::Io { path: p, source })?;
        }
    }
    let ack = KillAck {
        device: order.device,
        ordered_at: order.ordered_at,
        executed_at: crate::now(),
        keys_destroyed,
        corporate_deleted: corporate_deleted || !dir.corporate().exists(),
        vms_stopped,
    };
    let signed = id.sign_artifact(fleet::KIND_KILL_ACK, &ack);
    save_record(
        dir,
        &KillRecord {
            order: order.clone(),
            ack: Some(signed.clone()),
            acknowledged: false,
        },
    )?;
    tracing::warn!(keys_destroyed, "kill executed");
    Ok(signed)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Failing;
    impl CorporateVms for Failing {
        fn stop_all(&self) -> Result<(), tandem_vm::VmError> {
            Err(tandem_vm::VmError::NotRunning("corporate".into()))
        }
    }

    #[test]
    fn kill_erases_keys_and_corporate_data_and_signs_ack() {
        let f = crate::testkit::fixture();
        let (dir, device, device_key) = (&f.dir, f.device, &f.device_key);
        std::fs::create_dir_all(dir.keys().join("disks")).expect("mkdir");
        std::fs::write(dir.keys().join("store.key"), b"k1").expect("write");
        std::fs::write(dir.keys().join("disks/user.key"), b"k2").expect("write");
        std::fs::create_dir_all(dir.corporate()).expect("mkdir");
        std::fs::write(dir.corporate().join("user.qcow2"), b"data").expect("write");
        std::fs::create_dir_all(dir.personal()).expect("mkdir");
        std::fs::write(dir.personal().join("overlay.qcow2"), b"mine").expect("write");
        let id = Identity::load(dir).expect("load");
        let order = KillOrder {
            device,
            ordered_at: 5,
            actor: "admin:x".into(),
            reason: "stolen".into(),
        };
        let ack = execute(dir, &id, &order, &Failing).expect("kill");
        let ack: KillAck = ack
            .verify(fleet::KIND_KILL_ACK, &[device_key.public()])
            .expect("ack verifies with the device key");
        assert_eq!(ack.keys_destroyed, 2);
        assert!(ack.corporate_deleted);
        assert!(!ack.vms_stopped);
        assert!(!dir.keys().exists());
        assert!(!dir.corporate().exists());
        assert!(
            dir.personal().join("overlay.qcow2").exists(),
            "personal data stays"
        );
        assert!(is_killed(dir).expect("read"));
        assert!(matches!(
            crate::lease::check(dir, 10),
            Err(crate::lease::LeaseError::Killed)
        ));
    }
}
