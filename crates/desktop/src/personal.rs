//! Recovery points, rollback and reset: the user's tools for the personal desktop. The
//! corporate desktop refuses them all (IT owns it; its system disk is volatile anyway).

use std::time::Duration;

use tandem_vm::rundir::RunDir;

use crate::disks::{self, Snapshot};
use crate::layout::{Desktop, Layout};
use crate::DesktopError;

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

fn only_personal(d: Desktop, what: &str) -> Result<(), DesktopError> {
    match d {
        Desktop::Personal => Ok(()),
        Desktop::Corporate => Err(DesktopError::Locked(what.to_string())),
    }
}

/// Whether the desktop's VM runs now.
pub fn is_running(layout: &Layout, d: Desktop) -> Result<bool, DesktopError> {
    match RunDir::existing(&layout.vms_dir(), d.name()) {
        Ok(rd) => Ok(rd.running_supervisor()?.is_some()),
        Err(tandem_vm::VmError::UnknownVm(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn overlay_exists(layout: &Layout) -> Result<std::path::PathBuf, DesktopError> {
    let ov = layout.personal_overlay();
    if !ov.exists() {
        return Err(DesktopError::NoSuchSnapshot {
            desktop: Desktop::Personal,
            name: String::new(),
            available: "none (the personal VM was never started)".into(),
        });
    }
    Ok(ov)
}

/// Takes a recovery point. Works while the VM runs (QMP internal snapshot) or is off.
pub fn snapshot(layout: &Layout, d: Desktop, name: &str) -> Result<(), DesktopError> {
    only_personal(d, "taking a recovery point")?;
    if !valid_name(name) {
        return Err(DesktopError::BadSnapshotName(name.to_string()));
    }
    let ov = overlay_exists(layout)?;
    if is_running(layout, d)? {
        let rd = RunDir::existing(&layout.vms_dir(), d.name())?;
        let mut q = tandem_vm::Qmp::connect(&rd.qmp_socket(), Duration::from_secs(30))
            .map_err(tandem_vm::VmError::from)?;
        let device = q
            .block_devices()
            .map_err(tandem_vm::VmError::from)?
            .into_iter()
            .find(|(_, file)| file == &ov.display().to_string())
            .map(|(dev, _)| dev)
            .unwrap_or_else(|| "virtio0".into());
        q.execute(
            "blockdev-snapshot-internal-sync",
            Some(serde_json::json!({ "device": device, "name": name })),
        )
        .map_err(tandem_vm::VmError::from)?;
        return Ok(());
    }
    disks::snapshot_create(&ov, name)
}

/// Lists recovery points, oldest first.
pub fn snapshots(layout: &Layout, d: Desktop) -> Result<Vec<Snapshot>, DesktopError> {
    only_personal(d, "listing recovery points")?;
    let ov = layout.personal_overlay();
    if !ov.exists() {
        return Ok(Vec::new());
    }
    if is_running(layout, d)? {
        // qemu-img cannot open an image QEMU holds; ask QEMU instead.
        let rd = RunDir::existing(&layout.vms_dir(), d.name())?;
        let mut q = tandem_vm::Qmp::connect(&rd.qmp_socket(), Duration::from_secs(30))
            .map_err(tandem_vm::VmError::from)?;
        let v = q
            .execute("query-block", None)
            .map_err(tandem_vm::VmError::from)?;
        let file = ov.display().to_string();
        let list = v
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["inserted"]["file"].as_str() == Some(file.as_str()))
            .and_then(|b| b["inserted"]["image"]["snapshots"].as_array().cloned())
            .unwrap_or_default();
        return Ok(list
            .iter()
            .filter_map(|s| {
                Some(Snapshot {
                    name: s["name"].as_str()?.to_string(),
                    date_sec: s["date-sec"].as_u64().unwrap_or(0),
                })
            })
            .collect());
    }
    disks::snapshots(&ov)
}

/// Rolls the personal VM back to a recovery point. The VM must be off.
pub fn rollback(layout: &Layout, d: Desktop, name: &str) -> Result<(), DesktopError> {
    only_personal(d, "rolling back")?;
    if is_running(layout, d)? {
        return Err(DesktopError::Running { desktop: d });
    }
    let ov = overlay_exists(layout)?;
    let list = disks::snapshots(&ov)?;
    if !list.iter().any(|s| s.name == name) {
        let available = if list.is_empty() {
            "none".to_string()
        } else {
            list.iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(DesktopError::NoSuchSnapshot {
            desktop: d,
            name: name.to_string(),
            available,
        });
    }
    disks::snapshot_apply(&ov, name)
}

/// The base the personal overlay is bound to, if it exists: its binding record, or for
/// an overlay made before bindings existed, the base it was last started on.
pub fn bound_base(layout: &Layout) -> Result<Option<String>, DesktopError> {
    if !layout.personal_overlay().exists() {
        return Ok(None);
    }
    let binding = layout.personal_binding();
    match std::fs::read_to_string(&binding) {
        Ok(label) => return Ok(Some(label.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(DesktopError::io(&binding, e)),
    }
    let record = layout.base_record(Desktop::Personal);
    Ok(std::fs::read(&record)
        .ok()
        .and_then(|b| serde_json::from_slice::<crate::BaseDisk>(&b).ok())
        .map(|b| b.label().to_string()))
}

/// Resets the personal VM to its pristine base: drops the overlay and every recovery
/// point. The VM must be off.
pub fn reset(layout: &Layout, d: Desktop) -> Result<(), DesktopError> {
    only_personal(d, "resetting")?;
    if is_running(layout, d)? {
        return Err(DesktopError::Running { desktop: d });
    }
    for p in [layout.personal_overlay(), layout.personal_binding()] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DesktopError::io(&p, e)),
        }
    }
    Ok(())
}
