//! A running QEMU owned by the caller.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::accel::{self, Accel, ResolvedAccel};
use crate::qmp::Qmp;
use crate::spec::{Serial, VmSpec, QEMU};
use crate::{tail_lines, VmError};

/// How long QEMU gets to open its monitor.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `quit` gets before SIGKILL.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a VM ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Exit {
    /// The guest powered off, or a requested stop completed.
    Stopped {
        /// How the stop completed: `guest` (power-off), `quit` or `killed`.
        how: String,
    },
    /// QEMU ended without anyone asking.
    Crashed {
        /// Exit status as text (`exit status: 1`, `signal: 9 (SIGKILL)`).
        status: String,
        /// The last lines the guest printed on its serial console.
        last_serial: Vec<String>,
    },
}

/// A QEMU process started from a [`VmSpec`]. Dropping it kills QEMU.
pub struct Vm {
    name: String,
    child: Option<Child>,
    qmp_socket: PathBuf,
    serial_log: Option<PathBuf>,
    stderr_log: PathBuf,
    accel: ResolvedAccel,
    stop_requested: bool,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.name)
            .field("pid", &self.pid())
            .field("accel", &self.accel)
            .finish()
    }
}

fn serial_log_of(spec: &VmSpec) -> Option<PathBuf> {
    match &spec.serial {
        Serial::Stdio { log } => log.clone(),
        Serial::File { log } | Serial::Socket { log, .. } => Some(log.clone()),
    }
}

impl Vm {
    /// Validates `spec`, starts QEMU (its stderr goes to `stderr_log`) and returns once
    /// the monitor answers. On any failure nothing is left running.
    pub fn start(spec: &VmSpec, stderr_log: &Path) -> Result<Vm, VmError> {
        Self::spawn(spec, stderr_log, None)
    }

    /// Like [`Vm::start`], but QEMU outlives its starter: it runs in its own process
    /// group, gets no parent-death signal, and keeps `pidfile` locked (QEMU's own
    /// `-pidfile` lock) for as long as it lives, so a restarted owner can find it again.
    /// Hand the process over with [`Vm::detach`].
    pub fn start_detached(spec: &VmSpec, stderr_log: &Path, pidfile: &Path) -> Result<Vm, VmError> {
        Self::spawn(spec, stderr_log, Some(pidfile))
    }

    fn spawn(spec: &VmSpec, stderr_log: &Path, pidfile: Option<&Path>) -> Result<Vm, VmError> {
        spec.validate()?;
        let accel = accel::resolve(spec.accel);
        if spec.accel == Accel::Kvm {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .map_err(|e| VmError::KvmUnavailable(e.to_string()))?;
        }
        let stderr = std::fs::File::create(stderr_log).map_err(|e| VmError::io(stderr_log, e))?;
        let mut cmd = Command::new(QEMU);
        cmd.args(spec.qemu_args(accel)).stderr(stderr);
        match spec.serial {
            Serial::Stdio { .. } => cmd.stdin(Stdio::null()).stdout(Stdio::piped()),
            _ => cmd.stdin(Stdio::null()).stdout(Stdio::null()),
        };
        match pidfile {
            None => crate::sys::kill_with_parent(&mut cmd),
            Some(p) => {
                use std::os::unix::process::CommandExt as _;
                cmd.arg("-pidfile").arg(p).process_group(0);
            }
        }
        tracing::info!(vm = %spec.name, accel = accel.as_str(), "starting QEMU");
        let child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                VmError::QemuNotInstalled
            } else {
                VmError::io(QEMU, e)
            }
        })?;
        let mut vm = Vm {
            name: spec.name.clone(),
            child: Some(child),
            qmp_socket: spec.qmp_socket.clone(),
            serial_log: serial_log_of(spec),
            stderr_log: stderr_log.to_path_buf(),
            accel,
            stop_requested: false,
        };
        vm.wait_for_monitor()?;
        Ok(vm)
    }

    fn wait_for_monitor(&mut self) -> Result<(), VmError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    let stderr = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
                    return Err(VmError::StartFailed {
                        status: status.to_string(),
                        stderr: stderr.trim().lines().last().unwrap_or("").to_string(),
                    });
                }
            }
            if self.qmp_socket.exists() {
                if let Ok(mut q) = Qmp::connect(&self.qmp_socket, Duration::from_secs(5)) {
                    if q.status().is_ok() {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(VmError::StartTimeout(START_TIMEOUT.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Gives up ownership without stopping QEMU: the caller now waits for the process.
    pub fn detach(mut self) -> Option<Child> {
        self.child.take()
    }

    /// The guest's serial output when the spec says [`Serial::Stdio`]: the caller copies
    /// it where it wants (and may watch it for a marker).
    pub fn take_serial_output(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// QEMU's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The accelerator in use.
    pub fn accel(&self) -> ResolvedAccel {
        self.accel
    }

    /// Opens a monitor session (QEMU serves one session at a time; drop it when done).
    pub fn qmp(&self) -> Result<Qmp, VmError> {
        Ok(Qmp::connect(&self.qmp_socket, Duration::from_secs(10))?)
    }

    /// Returns how the VM ended if it has, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<Exit>, VmError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(Some(Exit::Stopped { how: "quit".into() }));
        };
        match child.try_wait().map_err(|e| VmError::io(QEMU, e))? {
            Some(status) => {
                self.child = None;
                Ok(Some(self.classify(status, "guest")))
            }
            None => Ok(None),
        }
    }

    /// Blocks until QEMU exits.
    pub fn wait(&mut self) -> Result<Exit, VmError> {
        let Some(mut child) = self.child.take() else {
            return Ok(Exit::Stopped { how: "quit".into() });
        };
        let status = child.wait().map_err(|e| VmError::io(QEMU, e))?;
        Ok(self.classify(status, "guest"))
    }

    fn classify(&self, status: std::process::ExitStatus, how: &str) -> Exit {
        if status.success() || self.stop_requested {
            Exit::Stopped { how: how.into() }
        } else {
            Exit::Crashed {
                status: status.to_string(),
                last_serial: self
                    .serial_log
                    .as_deref()
                    .map(|p| tail_lines(p, 20))
                    .unwrap_or_default(),
            }
        }
    }

    fn wait_until(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<std::process::ExitStatus>, VmError> {
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().map_err(|e| VmError::io(QEMU, e))? {
                    self.child = None;
                    return Ok(Some(status));
                }
            } else {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(None)
    }

    /// Stops the VM: ACPI power button, then `quit` after `timeout`, then SIGKILL.
    pub fn stop(&mut self, timeout: Duration) -> Result<Exit, VmError> {
        if self.child.is_none() {
            return Ok(Exit::Stopped { how: "quit".into() });
        }
        self.stop_requested = true;
        if let Ok(mut q) = self.qmp() {
            let _ = q.powerdown();
        }
        if let Some(status) = self.wait_until(Instant::now() + timeout)? {
            return Ok(self.classify(status, "guest"));
        }
        tracing::warn!(vm = %self.name, "guest did not power off in time; quitting QEMU");
        if let Ok(mut q) = self.qmp() {
            let _ = q.quit();
        }
        if let Some(status) = self.wait_until(Instant::now() + QUIT_TIMEOUT)? {
            return Ok(self.classify(status, "quit"));
        }
        self.kill();
        Ok(Exit::Stopped {
            how: "killed".into(),
        })
    }

    /// Kills QEMU at once (no guest shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}
