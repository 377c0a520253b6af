//! The typed description of one VM and its translation into a QEMU command line.
//!
//! Validation happens before QEMU is spawned and reads only file headers, so a mistake
//! (missing kernel, a qcow2 file declared raw, a socket in use) is reported as one clear
//! error and no half-started QEMU is left behind.

use std::ffi::OsString;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::accel::{Accel, ResolvedAccel};
use crate::VmError;

/// How the VM boots.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Boot {
    /// Direct kernel boot: fast, no firmware or bootloader in the image.
    Kernel {
        /// bzImage.
        kernel: PathBuf,
        /// initramfs.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        cmdline: String,
    },
    /// Firmware boots the first disk.
    Disk,
}

/// On-disk format of a disk image.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A plain image.
    Raw,
    /// QEMU's copy-on-write format (overlays, snapshots, LUKS).
    Qcow2,
}

impl DiskFormat {
    /// The name QEMU uses.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// One virtio disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct DiskSpec {
    /// Image file.
    pub path: PathBuf,
    /// Its format; checked against the file's header.
    pub format: DiskFormat,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Volatile: QEMU keeps the guest's writes in a temporary file and drops them at
    /// exit, so the image itself never changes.
    #[serde(default)]
    pub snapshot: bool,
    /// File holding the LUKS passphrase of an encrypted qcow2 (UTF-8 text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// The qcow2's backing file is an NBD export that may go away for a while (its
    /// server restarts): QEMU holds the guest's reads and reconnects instead of failing
    /// them, for up to [`RECONNECT_SECS`].
    #[serde(default)]
    pub reconnect_backing: bool,
}

/// How long QEMU holds reads of an NBD backing file while its server is away.
pub const RECONNECT_SECS: u32 = 300;

/// Guest networking.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// No network card.
    #[default]
    None,
    /// QEMU user-mode networking (NAT, no host privileges).
    User,
}

/// Where the serial console goes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Serial {
    /// A pipe to the owner of the [`crate::Vm`] (foreground runs), also copied to `log`.
    Stdio {
        /// Optional copy of the output.
        log: Option<PathBuf>,
    },
    /// Output to a file only.
    File {
        /// The log file.
        log: PathBuf,
    },
    /// A unix socket a console client can attach to, with all output kept in `log`.
    Socket {
        /// Socket QEMU listens on.
        socket: PathBuf,
        /// The log file.
        log: PathBuf,
    },
}

/// A VNC display on localhost, optionally with a websocket for noVNC.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Vnc {
    /// Display number (TCP port 5900 + display).
    pub display: u16,
    /// Websocket TCP port on 127.0.0.1.
    pub websocket: Option<u16>,
}

/// Device controls decided by policy.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub struct DeviceControls {
    /// Offer a USB controller (for passthrough and USB input).
    #[serde(default)]
    pub usb: bool,
}

/// The unprivileged identity QEMU switches to before the guest runs (`-run-with user=`).
///
/// QEMU opens every file, socket and accelerator named on its command line while it is
/// still the launching user, then drops to this uid and gid (supplementary groups
/// cleared). From then on the guest's device model can open only what this uid may: a
/// compromised QEMU of one desktop cannot read the other desktop's disks, keys or base
/// export. Reconnecting to an NBD base is the one open that happens later, so its socket
/// must be reachable by this uid.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RunAs {
    /// User id (needs no passwd entry).
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// QEMU's seccomp filter for every VM Tandem starts: obsolete system calls, spawning
/// processes and changing scheduling or resource limits are refused. Raising privileges
/// is not listed: with [`RunAs`] QEMU itself calls setuid after the filter is in place
/// (`elevateprivileges=deny` kills it then), and once it runs as an unprivileged uid
/// that cannot exec (`spawn=deny`) there is nothing left to elevate to.
pub const SANDBOX: &str = "on,obsolete=deny,spawn=deny,resourcecontrol=deny";

/// Everything needed to start one VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VmSpec {
    /// Unique name on this host (letters, digits, `-`, `_`).
    pub name: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Boot method.
    pub boot: Boot,
    /// Virtio disks in order (`/dev/vda`, `/dev/vdb`, …).
    pub disks: Vec<DiskSpec>,
    /// Serial console.
    pub serial: Serial,
    /// QMP socket path.
    pub qmp_socket: PathBuf,
    /// Optional VNC display.
    #[serde(default)]
    pub vnc: Option<Vnc>,
    /// Network.
    #[serde(default)]
    pub network: Network,
    /// Accelerator.
    #[serde(default)]
    pub accel: Accel,
    /// Device controls.
    #[serde(default)]
    pub controls: DeviceControls,
    /// The unprivileged user QEMU runs as (only when launched by root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<RunAs>,
}

/// The QEMU system emulator for x86-64 guests.
pub const QEMU: &str = "qemu-system-x86_64";

fn read_head(path: &Path, n: usize) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        let r = f.read(&mut buf[got..])?;
        if r == 0 {
            break;
        }
        got += r;
    }
    buf.truncate(got);
    Ok(buf)
}

/// Detects a disk image's format from its header.
pub fn detect_format(path: &Path) -> std::io::Result<DiskFormat> {
    let head = read_head(path, 4)?;
    Ok(if head == b"QFI\xfb" {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Fails when something already listens on the unix socket at `path`.
fn check_socket_free(path: &Path) -> Result<(), VmError> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(VmError::SocketInUse(path.to_path_buf()));
    }
    if path.exists() {
        // A stale socket from a process that died: QEMU cannot bind over it.
        std::fs::remove_file(path).map_err(|e| VmError::io(path, e))?;
    }
    Ok(())
}

fn check_port_free(port: u16) -> Result<(), VmError> {
    std::net::TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .map_err(|_| VmError::PortInUse(port))
}

impl VmSpec {
    /// Checks every input that can be checked without starting QEMU.
    pub fn validate(&self) -> Result<(), VmError> {
        if !valid_name(&self.name) {
            return Err(VmError::InvalidSpec(format!(
                "VM name `{}` must be 1-64 letters, digits, `-` or `_`",
                self.name
            )));
        }
        if self.memory_mib < 16 || self.vcpus == 0 || self.vcpus > 64 {
            return Err(VmError::InvalidSpec(format!(
                "memory {} MiB / {} vCPUs is out of range (at least 16 MiB, 1-64 vCPUs)",
                self.memory_mib, self.vcpus
            )));
        }
        if let Boot::Kernel { kernel, initrd, .. } = &self.boot {
            let head = read_head(kernel, 0x206).map_err(|e| VmError::KernelUnreadable {
                path: kernel.clone(),
                source: e,
            })?;
            if head.len() < 0x206 || &head[0x202..0x206] != b"HdrS" {
                return Err(VmError::KernelInvalid(kernel.clone()));
            }
            if let Some(initrd) = initrd {
                let head = read_head(initrd, 6).map_err(|e| VmError::InitrdUnreadable {
                    path: initrd.clone(),
                    source: e,
                })?;
                let known = head.starts_with(b"070701")
                    || head.starts_with(b"070702")
                    || head.starts_with(&[0x1f, 0x8b])
                    || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
                    || head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z'])
                    || head.starts_with(&[0x02, 0x21, 0x4c, 0x18]);
                if !known {
                    return Err(VmError::InitrdInvalid(initrd.clone()));
                }
            }
        }
        if self.disks.is_empty() && self.boot == Boot::Disk {
            return Err(VmError::InvalidSpec(
                "disk boot needs at least one disk".into(),
            ));
        }
        for disk in &self.disks {
            let found = detect_format(&disk.path).map_err(|e| VmError::DiskUnreadable {
                path: disk.path.clone(),
                source: e,
            })?;
            if found != disk.format {
                return Err(VmError::DiskFormatMismatch {
                    path: disk.path.clone(),
                    declared: disk.format,
                    found,
                });
            }
            let len = std::fs::metadata(&disk.path)
                .map_err(|e| VmError::io(&disk.path, e))?
                .len();
            if disk.format == DiskFormat::Raw && (len == 0 || len % 512 != 0) {
                return Err(VmError::DiskInvalid {
                    path: disk.path.clone(),
                    reason: format!("a raw disk must be a non-empty multiple of 512 bytes, this one is {len} bytes"),
                });
            }
            if let Some(secret) = &disk.secret_file {
                if !secret.is_file() {
                    return Err(VmError::DiskInvalid {
                        path: disk.path.clone(),
                        reason: format!("its key file {} is missing", secret.display()),
                    });
                }
            }
        }
        check_socket_free(&self.qmp_socket)?;
        if let Serial::Socket { socket, .. } = &self.serial {
            check_socket_free(socket)?;
        }
        if let Some(vnc) = self.vnc {
            check_port_free(5900u16.saturating_add(vnc.display))?;
            if let Some(ws) = vnc.websocket {
                check_port_free(ws)?;
            }
        }
        Ok(())
    }

    /// The QEMU arguments (without the program name).
    pub fn qemu_args(&self, accel: ResolvedAccel) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(OsString::from(s));
        push("-name");
        push(&format!("{},process=tandem-{}", self.name, self.name));
        push("-machine");
        push(&format!("q35,accel={}", accel.as_str()));
        if accel == ResolvedAccel::Tcg {
            push("-cpu");
            push("max");
        }
        push("-m");
        push(&self.memory_mib.to_string());
        push("-smp");
        push(&self.vcpus.to_string());
        push("-nodefaults");
        push("-no-user-config");
        // A reboot request ends the VM: the supervisor decides what happens next.
        push("-no-reboot");
        match &self.serial {
            Serial::Stdio { log } => {
                let mut c = "stdio,id=ser0,signal=off".to_string();
                if let Some(l) = log {
                    c.push_str(&format!(",logfile={},logappend=on", l.display()));
                }
                push("-chardev");
                push(&c);
            }
            Serial::File { log } => {
                push("-chardev");
                push(&format!("file,id=ser0,path={},append=on", log.display()));
            }
            Serial::Socket { socket, log } => {
                push("-chardev");
                push(&format!(
                    "socket,id=ser0,path={},server=on,wait=off,logfile={},logappend=on",
                    socket.display(),
                    log.display()
                ));
            }
        }
        push("-sandbox");
        push(SANDBOX);
        if let Some(r) = self.run_as {
            push("-run-with");
            push(&format!("user={}:{}", r.uid, r.gid));
        }
        push("-serial");
        push("chardev:ser0");
        push("-qmp");
        push(&format!(
            "unix:{},server=on,wait=off",
            self.qmp_socket.display()
        ));
        match self.vnc {
            Some(vnc) => {
                push("-vga");
                push("std");
                let mut v = format!("127.0.0.1:{}", vnc.display);
                if let Some(ws) = vnc.websocket {
                    v.push_str(&format!(",websocket=127.0.0.1:{ws}"));
                }
                push("-vnc");
                push(&v);
            }
            None => {
                push("-display");
                push("none");
            }
        }
        match self.network {
            Network::None => {
                push("-nic");
                push("none");
            }
            Network::User => {
                push("-nic");
                push("user,model=virtio-net-pci");
            }
        }
        if self.controls.usb {
            push("-device");
            push("qemu-xhci,id=usb");
        }
        for (i, disk) in self.disks.iter().enumerate() {
            let mut d = String::new();
            if let Some(secret) = &disk.secret_file {
                push("-object");
                push(&format!("secret,id=sec{i},file={}", secret.display()));
                d.push_str(&format!(
                    "if=virtio,driver=qcow2,file.filename={},encrypt.key-secret=sec{i}",
                    disk.path.display()
                ));
            } else {
                d.push_str(&format!(
                    "if=virtio,format={},file={}",
                    disk.format.as_str(),
                    disk.path.display()
                ));
            }
            if disk.read_only {
                d.push_str(",readonly=on");
            }
            if disk.snapshot {
                d.push_str(",snapshot=on");
            }
            if disk.reconnect_backing {
                d.push_str(&format!(",backing.file.reconnect-delay={RECONNECT_SECS}"));
            }
            push("-drive");
            push(&d);
        }
        match &self.boot {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                a.push("-kernel".into());
                a.push(kernel.clone().into_os_string());
                if let Some(i) = initrd {
                    a.push("-initrd".into());
                    a.push(i.clone().into_os_string());
                }
                a.push("-append".into());
                a.push(cmdline.into());
            }
            Boot::Disk => {
                a.push("-boot".into());
                a.push("c".into());
            }
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> VmSpec {
        VmSpec {
            name: "t1".into(),
            memory_mib: 256,
            vcpus: 1,
            boot: Boot::Disk,
            disks: vec![DiskSpec {
                path: dir.join("d.raw"),
                format: DiskFormat::Raw,
                read_only: false,
                snapshot: false,
                secret_file: None,
                reconnect_backing: false,
            }],
            serial: Serial::File {
                log: dir.join("serial.log"),
            },
            qmp_socket: dir.join("qmp.sock"),
            vnc: None,
            network: Network::None,
            accel: Accel::Tcg,
            controls: DeviceControls::default(),
            run_as: None,
        }
    }

    #[test]
    fn command_line_has_the_essentials() {
        let dir = tempfile::tempdir().expect("tempdir");
        let args: Vec<String> = spec(dir.path())
            .qemu_args(ResolvedAccel::Tcg)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("q35,accel=tcg"), "{joined}");
        assert!(joined.contains("-nodefaults"));
        assert!(joined.contains("if=virtio,format=raw,file="));
        assert!(joined.contains(",server=on,wait=off"));
        assert!(joined.contains("-nic none"));
        assert!(joined.contains(&format!("-sandbox {SANDBOX}")), "{joined}");
        assert!(!joined.contains("-run-with"), "{joined}");
    }

    #[test]
    fn a_confined_vm_drops_to_its_own_user() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = spec(dir.path());
        s.run_as = Some(RunAs {
            uid: 64301,
            gid: 64302,
        });
        let joined = s
            .qemu_args(ResolvedAccel::Tcg)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(joined.contains("-run-with user=64301:64302"), "{joined}");
        // setuid happens after the filter is installed: elevateprivileges=deny would
        // kill QEMU (SIGSYS) at that moment.
        assert!(!SANDBOX.contains("elevateprivileges"));
    }

    #[test]
    fn qcow2_declared_raw_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = spec(dir.path());
        let mut data = b"QFI\xfb".to_vec();
        data.resize(4096, 0);
        std::fs::write(&s.disks[0].path, data).expect("write");
        match s.validate() {
            Err(VmError::DiskFormatMismatch { found, .. }) => assert_eq!(found, DiskFormat::Qcow2),
            other => panic!("expected a format mismatch, got {other:?}"),
        }
    }

    #[test]
    fn missing_disk_and_bad_names_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = spec(dir.path());
        assert!(matches!(s.validate(), Err(VmError::DiskUnreadable { .. })));
        s.name = "no spaces please".into();
        assert!(matches!(s.validate(), Err(VmError::InvalidSpec(_))));
    }

    #[test]
    fn a_socket_that_answers_is_in_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = spec(dir.path());
        std::fs::write(&s.disks[0].path, vec![0u8; 4096]).expect("write");
        let _listener = std::os::unix::net::UnixListener::bind(&s.qmp_socket).expect("bind");
        assert!(matches!(s.validate(), Err(VmError::SocketInUse(_))));
    }
}
