//! Executing a kill order: stop the corporate VMs, crypto-erase every corporate key
//! (`<dir>/keys/**`: overwrite, sync, delete), delete `<dir>/corporate/`, erase what the
//! corporate VM left elsewhere (its console transcripts and logs under
//! `<dir>/vms/corporate/`, secrets handed to QEMU and backup copies under `<dir>/run/`,
//! partial image downloads under `<dir>/store/incoming/`), drop the lease and target
//! state, and sign an acknowledgement with the device key. The personal desktop (its
//! overlay, its VM state) is not touched.
//!
//! [`erase_after_run`] is the part of that which also runs every time the corporate VM
//! ends (and at daemon start when it is not running): the console transcript exists only
//! while the VM runs, and the volatile system overlay (encrypted under a key only that
//! QEMU held) is deleted.
//!
//! `<dir>/state/killed.json` (format `tandem-killed-v1`) is written BEFORE anything is
//! erased, so a crash half-way leaves a device that refuses the corporate VM and resumes
//! the erase at the next start; it records the signed ack and whether the server took it.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tandem_desktop::Desktop;
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
    /// The corporate VM's state could not be scrubbed.
    #[error("kill could not erase the corporate VM's console: {0}")]
    Vm(#[from] tandem_vm::VmError),
}

/// Files of `<dir>/vms/corporate/` a kill keeps: the spec and the state record (no
/// console lines: [`erase_after_run`] clears those), so status still says how the
/// corporate VM ended.
const VM_RECORDS_KEPT: [&str; 2] = ["spec.json", "state.json"];

fn remove_file(p: &Path) -> Result<bool, FileError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(FileError::Io {
            path: p.to_path_buf(),
            source,
        }),
    }
}

/// Shreds a file (a directory: removes it; anything else: unlinks it). A file that
/// vanishes meanwhile (another eraser got there first) is not an error.
fn shred_if_file(p: &Path) -> Result<bool, FileError> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_file() => match fsutil::shred(p) {
            Ok(()) => Ok(true),
            Err(FileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(false)
            }
            Err(e) => Err(e),
        },
        // `pid/` of a confined QEMU: holds only its pidfile.
        Ok(m) if m.is_dir() => {
            std::fs::remove_dir_all(p)
                .map(|()| true)
                .map_err(|source| FileError::Io {
                    path: p.to_path_buf(),
                    source,
                })
        }
        Ok(_) => remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(FileError::Io {
            path: p.to_path_buf(),
            source,
        }),
    }
}

/// Erases what a corporate run leaves outside the user disk and the keys: the console
/// transcripts (`serial.log`, `serial.prev.log`) and the console lines of a crash report,
/// any secret file handed to QEMU (`run/corporate-*.secret`, normally deleted once QEMU
/// read it), and the volatile system overlay. Call only while the corporate VM is not
/// running. Returns how many files it erased.
pub fn erase_after_run(dir: &AgentDir) -> Result<u64, KillError> {
    let layout = tandem_desktop::Layout::new(dir.root());
    let mut n = 0;
    let vm = dir.vms().join(Desktop::Corporate.name());
    for f in ["serial.log", "serial.prev.log"] {
        n += u64::from(shred_if_file(&vm.join(f))?);
    }
    if let Ok(rd) = tandem_vm::rundir::RunDir::existing(&dir.vms(), Desktop::Corporate.name()) {
        rd.forget_console()?;
    }
    if let Ok(entries) = std::fs::read_dir(layout.run_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("corporate-") && name.contains(".secret") {
                n += u64::from(shred_if_file(&e.path())?);
            }
        }
    }
    // Ciphertext under a key only the ended QEMU held: deleting is enough.
    let system = layout.corporate_system();
    n += remove_with_temps(&system)?;
    Ok(n)
}

/// Removes `target` and the temp files writers leave beside it
/// ([`tandem_tools::atomic::temp_files`]). Returns how many went.
fn remove_with_temps(target: &Path) -> Result<u64, FileError> {
    let io = |source| FileError::Io {
        path: target.to_path_buf(),
        source,
    };
    let mut n = u64::from(remove_file(target)?);
    for (tmp, _) in tandem_tools::atomic::temp_files(target).map_err(io)? {
        n += u64::from(remove_file(&tmp)?);
    }
    Ok(n)
}

/// What a kill erases besides keys and `corporate/`: everything [`erase_after_run`] does,
/// the corporate VM's other logs, backup copies in flight, and partial image downloads
/// (plaintext deltas of gold images). Returns how many files it erased.
fn erase_residue(dir: &AgentDir) -> Result<u64, KillError> {
    let mut n = erase_after_run(dir)?;
    let vm = dir.vms().join(Desktop::Corporate.name());
    if let Ok(entries) = std::fs::read_dir(&vm) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !VM_RECORDS_KEPT.contains(&name.as_str()) {
                n += u64::from(shred_if_file(&e.path())?);
            }
        }
    }
    let run = tandem_desktop::Layout::new(dir.root()).run_dir();
    n += remove_with_temps(&run.join("user-backup.qcow2"))?;
    let incoming = dir.store().join("incoming");
    if let Ok(entries) = std::fs::read_dir(&incoming) {
        n += entries.count() as u64;
    }
    fsutil::remove_tree(&incoming)?;
    Ok(n)
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
    // After the stop: nothing writes the console or the overlays any more.
    let residue = erase_residue(dir)?;
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
    tracing::warn!(keys_destroyed, residue, "kill executed");
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
        // What a corporate run leaves elsewhere: console transcripts, a crash report's
        // console lines, QEMU's log, a secret file, a backup copy, partial downloads.
        let vm = dir.vms().join("corporate");
        std::fs::create_dir_all(&vm).expect("mkdir");
        for f in ["serial.log", "serial.prev.log", "qemu.log"] {
            std::fs::write(vm.join(f), b"tandem-user-file: Q3 plan").expect("write");
        }
        std::fs::create_dir_all(vm.join("pid")).expect("mkdir");
        std::fs::write(vm.join("pid/qemu.pid"), b"123").expect("write");
        std::fs::write(vm.join("spec.json"), b"{}").expect("write");
        let crashed = tandem_vm::rundir::VmState {
            name: "corporate".into(),
            phase: tandem_vm::rundir::Phase::Crashed,
            supervisor_pid: None,
            qemu_pid: None,
            accel: None,
            started_at: Some(1),
            ended_at: Some(2),
            exit: Some(tandem_vm::Exit::Crashed {
                status: "signal: 9".into(),
                last_serial: vec!["tandem-user-file: Q3 plan".into()],
            }),
            error: None,
        };
        std::fs::write(
            vm.join("state.json"),
            serde_json::to_vec(&crashed).expect("json"),
        )
        .expect("write");
        let run = dir.root().join("run");
        std::fs::create_dir_all(&run).expect("mkdir");
        std::fs::write(run.join("corporate-user.secret"), b"k3").expect("write");
        std::fs::write(run.join("user-backup.qcow2"), b"copy").expect("write");
        std::fs::write(dir.corporate().join("system.qcow2"), b"overlay").expect("write");
        let incoming = dir.store().join("incoming");
        std::fs::create_dir_all(&incoming).expect("mkdir");
        std::fs::write(incoming.join("corp-gold-1-2.delta.part"), b"gold").expect("write");
        let personal_vm = dir.vms().join("personal");
        std::fs::create_dir_all(&personal_vm).expect("mkdir");
        std::fs::write(personal_vm.join("serial.log"), b"mine too").expect("write");
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
        assert!(
            personal_vm.join("serial.log").exists(),
            "personal VM untouched"
        );
        let mut left: Vec<String> = std::fs::read_dir(&vm)
            .expect("vm dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["spec.json", "state.json"]);
        let state = std::fs::read_to_string(vm.join("state.json")).expect("state");
        assert!(!state.contains("Q3 plan"), "{state}");
        assert!(state.contains("crashed"), "{state}");
        assert!(!run.join("corporate-user.secret").exists());
        assert!(!run.join("user-backup.qcow2").exists());
        assert!(!incoming.exists(), "partial downloads erased");
        assert!(is_killed(dir).expect("read"));
        assert!(matches!(
            crate::lease::check(dir, 10),
            Err(crate::lease::LeaseError::Killed)
        ));
    }
}
