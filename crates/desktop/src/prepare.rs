//! Turning a desktop's layered disks into a VM spec the supervisor can run.

use std::path::PathBuf;

use tandem_tools::atomic::{write_atomic, TempFile, DEFAULT_MODE};
use tandem_vm::rundir::Sidecar;
use tandem_vm::{
    Accel, Boot, DeviceControls, DiskFormat, DiskSpec, Network, RunAs, Serial, VmSpec,
};

use crate::disks;
use crate::keys::{SecretFile, SecretKey};
use crate::layout::{BaseDisk, Desktop, Layout};
use crate::DesktopError;

/// Everything about a desktop VM that is not its disks: how it boots and what policy
/// allows it.
#[derive(Debug, Clone)]
pub struct BootConfig {
    /// Kernel for direct boot (the test guest); `None` boots the system disk's firmware path.
    pub kernel: Option<PathBuf>,
    /// initramfs for direct boot.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Accelerator.
    pub accel: Accel,
    /// Network (policy may forbid it for the corporate VM).
    pub network: Network,
    /// Device controls from policy.
    pub controls: DeviceControls,
    /// The unprivileged user this desktop's QEMU runs as (see [`RunAs`]).
    pub run_as: Option<RunAs>,
}

/// A VM ready to hand to the supervisor.
#[derive(Debug)]
pub struct Prepared {
    /// The spec (sockets and logs are placed by the supervisor's run directory).
    pub spec: VmSpec,
    /// Helpers to run alongside (e.g. the NBD export of the base).
    pub sidecars: Vec<Sidecar>,
    /// The passphrase files QEMU reads at start (the user disk's, the volatile system
    /// overlay's); drop them once QEMU runs.
    pub secrets: Vec<SecretFile>,
}

fn spec(name: &str, boot: &BootConfig, disks: Vec<DiskSpec>) -> VmSpec {
    VmSpec {
        name: name.to_string(),
        memory_mib: boot.memory_mib,
        vcpus: boot.vcpus,
        boot: match &boot.kernel {
            Some(k) => Boot::Kernel {
                kernel: k.clone(),
                initrd: boot.initrd.clone(),
                cmdline: boot.cmdline.clone(),
            },
            None => Boot::Disk,
        },
        disks,
        serial: Serial::File {
            log: PathBuf::new(),
        },
        qmp_socket: PathBuf::new(),
        vnc: None,
        network: boot.network,
        accel: boot.accel,
        controls: boot.controls,
        run_as: boot.run_as,
    }
}

fn mkdir(p: &std::path::Path) -> Result<(), DesktopError> {
    std::fs::create_dir_all(p).map_err(|e| DesktopError::io(p, e))
}

/// Prepares the corporate VM: a fresh volatile overlay over `base`, encrypted under a key
/// made for this run only (handed to QEMU in a file deleted once QEMU read it, never
/// stored: once that QEMU is gone, what the system wrote is unreadable), the encrypted
/// user disk (created on first use), and the passphrase files for QEMU. Call only after
/// the lease check passed: `user_key` is the unwrapped key.
pub fn corporate(
    layout: &Layout,
    base: &BaseDisk,
    boot: &BootConfig,
    user_key: &SecretKey,
    user_disk_mib: u64,
    sidecars: Vec<Sidecar>,
) -> Result<Prepared, DesktopError> {
    mkdir(&layout.desktop_dir(Desktop::Corporate))?;
    mkdir(&layout.run_dir())?;
    let size = base
        .size()
        .map_err(|e| DesktopError::io(base.backing(), e))?;
    let system_secret = SecretFile::write(
        &layout.run_dir().join("corporate-system.secret"),
        &SecretKey::generate(),
    )?;
    disks::create_encrypted_overlay(
        &base.backing(),
        size,
        &layout.corporate_system(),
        system_secret.path(),
    )?;
    let secret = SecretFile::write(&layout.run_dir().join("corporate-user.secret"), user_key)?;
    let user = layout.corporate_user_disk();
    if !user.exists() {
        disks::create_luks_user_disk(&user, user_disk_mib, secret.path())?;
    }
    let record = layout.base_record(Desktop::Corporate);
    let json = serde_json::to_vec_pretty(base).expect("base serializes");
    write_atomic(&record, &json, DEFAULT_MODE).map_err(|e| DesktopError::io(&record, e))?;
    let disks = vec![
        DiskSpec {
            path: layout.corporate_system(),
            format: DiskFormat::Qcow2,
            read_only: false,
            snapshot: false,
            secret_file: Some(system_secret.path().to_path_buf()),
            reconnect_backing: base.is_nbd(),
        },
        DiskSpec {
            path: user,
            format: DiskFormat::Qcow2,
            read_only: false,
            snapshot: false,
            secret_file: Some(secret.path().to_path_buf()),
            reconnect_backing: false,
        },
    ];
    Ok(Prepared {
        spec: spec(Desktop::Corporate.name(), boot, disks),
        sidecars,
        secrets: vec![system_secret, secret],
    })
}

/// Prepares the personal VM: its persistent overlay over `base` (created on first use or
/// after a reset).
pub fn personal(
    layout: &Layout,
    base: &BaseDisk,
    boot: &BootConfig,
    sidecars: Vec<Sidecar>,
) -> Result<Prepared, DesktopError> {
    mkdir(&layout.desktop_dir(Desktop::Personal))?;
    let overlay = layout.personal_overlay();
    let binding = layout.personal_binding();
    if overlay.exists() {
        match crate::personal::bound_base(layout)? {
            Some(bound) if bound != base.label() => {
                return Err(DesktopError::OverlayBound {
                    bound,
                    requested: base.label().to_string(),
                });
            }
            Some(_) => {}
            None => unbound_overlay_may_use(&overlay, base)?,
        }
    } else {
        let size = base
            .size()
            .map_err(|e| DesktopError::io(base.backing(), e))?;
        disks::create_overlay(&base.backing(), size, &overlay)?;
    }
    disks::retarget_overlay(&overlay, &base.backing())?;
    if !binding.exists() {
        write_atomic(&binding, base.label().as_bytes(), DEFAULT_MODE)
            .map_err(|e| DesktopError::io(&binding, e))?;
    }
    let record = layout.base_record(Desktop::Personal);
    let json = serde_json::to_vec_pretty(base).expect("base serializes");
    write_atomic(&record, &json, DEFAULT_MODE).map_err(|e| DesktopError::io(&record, e))?;
    let disks = vec![DiskSpec {
        path: overlay,
        format: DiskFormat::Qcow2,
        read_only: false,
        snapshot: false,
        secret_file: None,
        reconnect_backing: base.is_nbd(),
    }];
    Ok(Prepared {
        spec: spec(Desktop::Personal.name(), boot, disks),
        sidecars,
        secrets: Vec::new(),
    })
}

/// An overlay that records no base (made before bindings existed, with no start record)
/// is bound only to the base its own header proves: a base file it names by path. A
/// store version is served on a socket whose name is the same for every version, so the
/// header cannot tell v3 from v4: refused, never guessed (the user resets).
fn unbound_overlay_may_use(overlay: &std::path::Path, base: &BaseDisk) -> Result<(), DesktopError> {
    let backing = disks::backing_of(overlay)?.unwrap_or_default();
    match base {
        BaseDisk::File { path, .. }
            if !backing.is_empty() && backing == path.display().to_string() =>
        {
            Ok(())
        }
        _ => Err(DesktopError::OverlayUnbound {
            backing: if backing.is_empty() {
                "no backing file".into()
            } else {
                backing
            },
            requested: base.label().to_string(),
        }),
    }
}

/// Makes a consistent point-in-time copy of the corporate user disk at `out`. With the VM
/// running, its vCPUs are paused for the copy (QEMU flushes its qcow2 metadata when it
/// stops the VM) and resumed afterwards, even if the copy fails.
pub fn user_disk_copy(layout: &Layout, out: &std::path::Path) -> Result<(), DesktopError> {
    let disk = layout.corporate_user_disk();
    if !disk.exists() {
        return Err(DesktopError::Io {
            path: disk,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no corporate user disk yet: start the corporate desktop once",
            ),
        });
    }
    let copy = |src: &std::path::Path| -> Result<(), DesktopError> {
        let tmp = TempFile::beside(out, DEFAULT_MODE).map_err(|e| DesktopError::io(out, e))?;
        std::fs::copy(src, tmp.path()).map_err(|e| DesktopError::io(tmp.path(), e))?;
        tmp.persist().map_err(|e| DesktopError::io(out, e))
    };
    if !crate::personal::is_running(layout, Desktop::Corporate)? {
        return copy(&disk);
    }
    let rd = tandem_vm::rundir::RunDir::existing(&layout.vms_dir(), Desktop::Corporate.name())?;
    let mut q = tandem_vm::Qmp::connect(&rd.qmp_socket(), std::time::Duration::from_secs(30))
        .map_err(tandem_vm::VmError::from)?;
    q.pause().map_err(tandem_vm::VmError::from)?;
    let result = copy(&disk);
    let resumed = q.resume().map_err(tandem_vm::VmError::from);
    result?;
    resumed?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot() -> BootConfig {
        BootConfig {
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            memory_mib: 64,
            vcpus: 1,
            accel: Accel::Tcg,
            network: Network::None,
            controls: DeviceControls::default(),
            run_as: None,
        }
    }

    /// Issue 12, item 3: an overlay made on one base version is never put on another.
    #[test]
    fn personal_overlay_is_bound_to_its_exact_base_version() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(tmp.path());
        let v3 = tmp.path().join("v3.raw");
        let v4 = tmp.path().join("v4.raw");
        std::fs::write(&v3, vec![3u8; 1 << 20]).expect("write");
        std::fs::write(&v4, vec![4u8; 1 << 20]).expect("write");
        let base = |p: &std::path::Path, label: &str| BaseDisk::File {
            path: p.to_path_buf(),
            label: label.into(),
        };
        personal(&layout, &base(&v3, "personal-base@3"), &boot(), Vec::new())
            .expect("first start makes the overlay");
        let err = personal(&layout, &base(&v4, "personal-base@4"), &boot(), Vec::new())
            .expect_err("another version is refused");
        assert!(
            matches!(&err, DesktopError::OverlayBound { bound, requested }
                if bound == "personal-base@3" && requested == "personal-base@4"),
            "{err}"
        );
        // The same version still starts; after a reset the new one does.
        personal(&layout, &base(&v3, "personal-base@3"), &boot(), Vec::new())
            .expect("same version");
        crate::personal::reset(&layout, Desktop::Personal).expect("reset");
        personal(&layout, &base(&v4, "personal-base@4"), &boot(), Vec::new())
            .expect("after a reset the new version starts");
        assert_eq!(
            crate::personal::bound_base(&layout).expect("read"),
            Some("personal-base@4".to_string())
        );
    }

    /// Issue 12, item 3 leftover: an overlay from before bindings (no `overlay-base`, no
    /// start record) is not bound to whatever version is asked first.
    #[test]
    fn an_overlay_without_a_binding_is_bound_only_to_what_its_header_proves() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(tmp.path());
        std::fs::create_dir_all(layout.desktop_dir(Desktop::Personal)).expect("mkdir");
        let forget_binding = |layout: &Layout| {
            for p in [
                layout.personal_binding(),
                layout.base_record(Desktop::Personal),
            ] {
                let _ = std::fs::remove_file(p);
            }
        };
        // Made over a store version: the socket name says nothing about the version.
        let sock = tmp.path().join("nbd-personal.sock");
        let nbd = |v: u64| BaseDisk::Nbd {
            socket: sock.clone(),
            export: String::new(),
            size: 1 << 20,
            label: format!("debian@{v}"),
        };
        disks::create_overlay(&nbd(3).backing(), 1 << 20, &layout.personal_overlay())
            .expect("old overlay");
        forget_binding(&layout);
        for v in [3, 4] {
            let err = personal(&layout, &nbd(v), &boot(), Vec::new())
                .expect_err("an unbound store overlay is refused");
            assert!(
                matches!(&err, DesktopError::OverlayUnbound { requested, .. } if *requested == format!("debian@{v}")),
                "{err}"
            );
            assert!(
                err.to_string().contains("tandem vm reset personal"),
                "{err}"
            );
        }
        assert!(!layout.personal_binding().exists(), "nothing was bound");

        // Made over a base file: its header names the file, so that very file is allowed
        // (and bound from then on); another file is not.
        let file = tmp.path().join("personal.raw");
        let other = tmp.path().join("other.raw");
        for f in [&file, &other] {
            std::fs::write(f, vec![0u8; 1 << 20]).expect("write");
        }
        let base = |p: &std::path::Path| BaseDisk::File {
            path: p.to_path_buf(),
            label: p.display().to_string(),
        };
        std::fs::remove_file(layout.personal_overlay()).expect("rm");
        disks::create_overlay(
            &file.display().to_string(),
            1 << 20,
            &layout.personal_overlay(),
        )
        .expect("old overlay");
        forget_binding(&layout);
        let err = personal(&layout, &base(&other), &boot(), Vec::new())
            .expect_err("another file is refused");
        assert!(matches!(err, DesktopError::OverlayUnbound { .. }), "{err}");
        personal(&layout, &base(&file), &boot(), Vec::new()).expect("the file it names");
        assert_eq!(
            crate::personal::bound_base(&layout).expect("read"),
            Some(file.display().to_string())
        );
    }
}
