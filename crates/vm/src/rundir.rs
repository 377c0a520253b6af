//! Named VMs under a state directory, each owned by a detached supervisor process.
//!
//! Layout of `<state>/<name>/`:
//!
//! | file | written by | meaning |
//! |---|---|---|
//! | `spec.json` | `vm start` | the [`VmSpec`], sockets and logs pointing into this dir |
//! | `lock` | supervisor | exclusive `flock` held while the VM lives |
//! | `state.json` | supervisor | [`VmState`], replaced atomically |
//! | `qmp.sock`, `console.sock` | QEMU | monitor and serial console |
//! | `serial.log`, `qemu.log` | QEMU | everything the guest printed; QEMU's stderr |
//! | `stop-requested` | `vm stop` | marks the coming exit as asked for |
//! | `sidecars.json` | `vm start` | helper processes the VM needs (e.g. an NBD export of its base) |
//! | `pid/qemu.pid` | QEMU | pid of a VM [`RunDir::launch`]ed by a long-lived owner, locked by QEMU while it lives; `pid/` belongs to the VM's [`crate::RunAs`] user so a confined QEMU can remove it at a clean exit |
//!
//! Two kinds of owner: a detached supervisor process per VM (`tandem vm start`), which
//! holds `lock`; or a long-lived process such as the laptop daemon, which
//! [`RunDir::launch`]es QEMU detached and [`RunDir::watch`]es it. QEMU then holds the POSIX
//! lock on `qemu.pid` itself, so it keeps running when its owner dies (SIGKILL, upgrade)
//! and the restarted owner re-attaches through that lock and the QMP socket.
//!
//! Sidecars start before QEMU, in order, each waited for until its socket appears; they
//! are killed when QEMU ends and die with the supervisor (`PR_SET_PDEATHSIG`), so a base
//! image export never outlives the VM that reads it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tandem_tools::atomic::{write_atomic, DEFAULT_MODE};
use tandem_tools::clock::now_secs as now;

use crate::qmp::Qmp;
use crate::spec::{Serial, VmSpec};
use crate::vm::{Exit, Vm};
use crate::VmError;

/// Lifecycle of a named VM.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The supervisor is starting QEMU.
    Starting,
    /// QEMU runs and its monitor answers.
    Running,
    /// Powered off or stopped on request.
    Stopped,
    /// Ended without anyone asking.
    Crashed,
    /// Could not start.
    Failed,
}

/// What `tandem vm status` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmState {
    /// VM name.
    pub name: String,
    /// Lifecycle phase.
    pub phase: Phase,
    /// Supervisor process id.
    pub supervisor_pid: Option<u32>,
    /// QEMU process id while it runs.
    pub qemu_pid: Option<u32>,
    /// `kvm` or `tcg`.
    pub accel: Option<String>,
    /// Unix seconds.
    pub started_at: Option<u64>,
    /// Unix seconds.
    pub ended_at: Option<u64>,
    /// How it ended.
    pub exit: Option<Exit>,
    /// Why it could not start.
    pub error: Option<String>,
}

/// A helper process a VM needs while it runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sidecar {
    /// Program to run.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// The VM starts only once this unix socket accepts connections.
    pub ready_socket: Option<PathBuf>,
}

/// Sidecar processes of a running VM; killed on drop.
struct Sidecars(Vec<std::process::Child>);

impl Drop for Sidecars {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The directory of one named VM.
#[derive(Debug, Clone)]
pub struct RunDir {
    dir: PathBuf,
    name: String,
}

impl RunDir {
    /// Opens (creating) `<state_dir>/<name>`.
    pub fn new(state_dir: &Path, name: &str) -> Result<Self, VmError> {
        let dir = state_dir.join(name);
        std::fs::create_dir_all(&dir).map_err(|source| VmError::StateDirUnwritable {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let probe = dir.join(".write-test");
        std::fs::write(&probe, b"").map_err(|source| VmError::StateDirUnwritable {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let _ = std::fs::remove_file(probe);
        Ok(RunDir {
            dir,
            name: name.to_string(),
        })
    }

    /// Opens an existing run directory.
    pub fn existing(state_dir: &Path, name: &str) -> Result<Self, VmError> {
        let dir = state_dir.join(name);
        if !dir.join("spec.json").is_file() {
            return Err(VmError::UnknownVm(name.to_string()));
        }
        Ok(RunDir {
            dir,
            name: name.to_string(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The serial log.
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    /// The previous run's serial log (kept for post-mortems).
    pub fn previous_serial_log(&self) -> PathBuf {
        self.dir.join("serial.prev.log")
    }

    /// Forgets what the guest printed, for a VM whose console is confidential (the
    /// corporate desktop): removes both console transcripts and the last console lines a
    /// crash report kept in `state.json`. Call once the VM has ended; while it runs its
    /// transcript is needed by console clients. Returns how many transcripts it removed.
    pub fn forget_console(&self) -> Result<u64, VmError> {
        let mut removed = 0;
        for p in [self.serial_log(), self.previous_serial_log()] {
            match std::fs::remove_file(&p) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(VmError::io(&p, e)),
            }
        }
        if let Some(mut state) = self.raw_state() {
            if let Some(Exit::Crashed { last_serial, .. }) = &mut state.exit {
                if !last_serial.is_empty() {
                    last_serial.clear();
                    self.write_state(&state)?;
                }
            }
        }
        Ok(removed)
    }

    /// The serial console socket.
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The pidfile of a launched QEMU.
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("pid").join("qemu.pid")
    }

    /// Makes the pidfile's directory, owned by the user QEMU will run as: QEMU creates
    /// the pidfile before it drops privileges but removes it after (a clean exit is told
    /// from a crash by that removal).
    fn pid_dir(&self, spec: &VmSpec) -> Result<(), VmError> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = self.dir.join("pid");
        std::fs::create_dir_all(&dir).map_err(|e| VmError::io(&dir, e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| VmError::io(&dir, e))?;
        let (uid, gid) = match spec.run_as {
            Some(r) => (r.uid, r.gid),
            None => (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            ),
        };
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| VmError::io(&dir, e))
    }

    /// The pid of a launched QEMU that is alive (it holds the lock on `qemu.pid`).
    pub fn launched_pid(&self) -> Option<u32> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.pidfile())
            .ok()?;
        let mut lk = whole_file_lock();
        nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            nix::fcntl::FcntlArg::F_GETLK(&mut lk),
        )
        .ok()?;
        (i32::from(lk.l_type) != libc::F_UNLCK && lk.l_pid > 0).then_some(lk.l_pid as u32)
    }

    fn stop_marker(&self) -> PathBuf {
        self.dir.join("stop-requested")
    }

    /// Points `spec`'s sockets and logs into this directory.
    pub fn place(&self, mut spec: VmSpec) -> VmSpec {
        spec.name = self.name.clone();
        spec.qmp_socket = self.qmp_socket();
        spec.serial = Serial::Socket {
            socket: self.console_socket(),
            log: self.serial_log(),
        };
        spec
    }

    /// Writes the spec the supervisor will run.
    pub fn write_spec(&self, spec: &VmSpec) -> Result<(), VmError> {
        let path = self.dir.join("spec.json");
        let json = serde_json::to_vec_pretty(spec).expect("spec serializes");
        write_atomic(&path, &json, DEFAULT_MODE).map_err(|e| VmError::io(&path, e))
    }

    /// Records the helper processes the supervisor starts before QEMU.
    pub fn write_sidecars(&self, sidecars: &[Sidecar]) -> Result<(), VmError> {
        let path = self.dir.join("sidecars.json");
        let json = serde_json::to_vec_pretty(sidecars).expect("sidecars serialize");
        write_atomic(&path, &json, DEFAULT_MODE).map_err(|e| VmError::io(&path, e))
    }

    fn read_sidecars(&self) -> Result<Vec<Sidecar>, VmError> {
        let path = self.dir.join("sidecars.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| VmError::InvalidSpec(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(VmError::io(&path, e)),
        }
    }

    fn start_sidecars(&self) -> Result<Sidecars, VmError> {
        let mut running = Sidecars(Vec::new());
        for (i, sc) in self.read_sidecars()?.into_iter().enumerate() {
            let log_path = self.dir.join(format!("sidecar-{i}.log"));
            let log = File::create(&log_path).map_err(|e| VmError::io(&log_path, e))?;
            let err = log.try_clone().map_err(|e| VmError::io(&log_path, e))?;
            let mut cmd = std::process::Command::new(&sc.program);
            cmd.args(&sc.args)
                .stdin(std::process::Stdio::null())
                .stdout(log)
                .stderr(err);
            crate::sys::kill_with_parent(&mut cmd);
            let child = cmd.spawn().map_err(|e| VmError::io(&sc.program, e))?;
            running.0.push(child);
            if let Some(sock) = &sc.ready_socket {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    if std::os::unix::net::UnixStream::connect(sock).is_ok() {
                        break;
                    }
                    let exited = running
                        .0
                        .last_mut()
                        .and_then(|c| c.try_wait().ok().flatten());
                    if exited.is_some() || Instant::now() > deadline {
                        let tail = crate::tail_lines(&log_path, 3).join(" | ");
                        return Err(VmError::StartFailed {
                            status: format!("helper {} did not come up", sc.program.display()),
                            stderr: tail,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        Ok(running)
    }

    /// Reads the spec.
    pub fn read_spec(&self) -> Result<VmSpec, VmError> {
        let path = self.dir.join("spec.json");
        let bytes = std::fs::read(&path).map_err(|e| VmError::io(&path, e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| VmError::InvalidSpec(format!("{}: {e}", path.display())))
    }

    fn try_lock(&self) -> Result<Option<Flock<File>>, VmError> {
        let path = self.dir.join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| VmError::io(&path, e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(VmError::io(&path, e.into())),
        }
    }

    /// Whether this VM lives: the pid of its supervisor (which holds `lock`) or of its
    /// launched QEMU (which holds `qemu.pid`).
    pub fn running_supervisor(&self) -> Result<Option<u32>, VmError> {
        match self.try_lock()? {
            Some(_released_on_drop) => Ok(self.launched_pid()),
            None => Ok(Some(
                self.raw_state().and_then(|s| s.supervisor_pid).unwrap_or(0),
            )),
        }
    }

    /// Starts the VM's QEMU detached from the caller (see the module doc) and returns its
    /// state and process; pass the process to [`RunDir::watch`] on a thread of its own.
    pub fn launch(&self, spec: &VmSpec) -> Result<(VmState, std::process::Child), VmError> {
        if let Some(pid) = self.running_supervisor()? {
            return Err(VmError::AlreadyRunning {
                name: self.name.clone(),
                pid,
            });
        }
        let _ = std::fs::remove_file(self.stop_marker());
        let _ = std::fs::rename(self.serial_log(), self.dir.join("serial.prev.log"));
        let _ = std::fs::remove_file(self.pidfile());
        self.pid_dir(spec)?;
        let spec = self.place(spec.clone());
        self.write_spec(&spec)?;
        let mut state = VmState {
            name: self.name.clone(),
            phase: Phase::Starting,
            supervisor_pid: None,
            qemu_pid: None,
            accel: None,
            started_at: Some(now()),
            ended_at: None,
            exit: None,
            error: None,
        };
        self.write_state(&state)?;
        let vm = match Vm::start_detached(&spec, &self.dir.join("qemu.log"), &self.pidfile()) {
            Ok(vm) => vm,
            Err(e) => {
                state.phase = Phase::Failed;
                state.error = Some(e.to_string());
                state.ended_at = Some(now());
                self.write_state(&state)?;
                return Err(e);
            }
        };
        state.phase = Phase::Running;
        state.qemu_pid = vm.pid();
        state.accel = Some(vm.accel().as_str().to_string());
        self.write_state(&state)?;
        tracing::info!(vm = %self.name, pid = ?vm.pid(), "VM running");
        let child = vm.detach().ok_or(VmError::StartTimeout(0))?;
        Ok((state, child))
    }

    /// Blocks until a launched QEMU ends and records how it ended. `child` is the process
    /// when this process launched it (its exit status is then known); `None` re-attaches
    /// to a QEMU launched by an earlier owner, through the lock it holds on `qemu.pid`.
    pub fn watch(&self, child: Option<std::process::Child>) -> Result<VmState, VmError> {
        let status = match child {
            Some(mut c) => Some(c.wait().map_err(|e| VmError::io(crate::QEMU, e))?),
            None => {
                if let Ok(file) = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(self.pidfile())
                {
                    let lk = whole_file_lock();
                    // Blocks until QEMU (the holder) exits; our lock goes with `file`.
                    let _ = nix::fcntl::fcntl(
                        std::os::fd::AsRawFd::as_raw_fd(&file),
                        nix::fcntl::FcntlArg::F_SETLKW(&lk),
                    );
                }
                None
            }
        };
        let requested = self.stop_marker().exists();
        // QEMU removes its pidfile when it exits normally; a killed QEMU leaves it.
        let clean = match status {
            Some(s) => s.success(),
            None => !self.pidfile().exists(),
        };
        let exit = if requested {
            Exit::Stopped {
                how: if clean { "guest" } else { "killed" }.into(),
            }
        } else if clean {
            Exit::Stopped {
                how: "guest".into(),
            }
        } else {
            Exit::Crashed {
                status: status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "QEMU ended abnormally".into()),
                last_serial: crate::tail_lines(&self.serial_log(), 20),
            }
        };
        let mut state = self.raw_state().unwrap_or(VmState {
            name: self.name.clone(),
            phase: Phase::Running,
            supervisor_pid: None,
            qemu_pid: None,
            accel: None,
            started_at: None,
            ended_at: None,
            exit: None,
            error: None,
        });
        state.phase = match exit {
            Exit::Stopped { .. } => Phase::Stopped,
            Exit::Crashed { .. } => Phase::Crashed,
        };
        state.qemu_pid = None;
        state.ended_at = Some(now());
        state.exit = Some(exit);
        self.write_state(&state)?;
        let _ = std::fs::remove_file(self.pidfile());
        let _ = std::fs::remove_file(self.qmp_socket());
        let _ = std::fs::remove_file(self.console_socket());
        tracing::info!(vm = %self.name, phase = ?state.phase, "VM ended");
        Ok(state)
    }

    fn raw_state(&self) -> Option<VmState> {
        let bytes = std::fs::read(self.state_path()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The VM's state, corrected for a supervisor that died without recording it.
    pub fn state(&self) -> Result<VmState, VmError> {
        let mut state = self.raw_state().unwrap_or(VmState {
            name: self.name.clone(),
            phase: Phase::Stopped,
            supervisor_pid: None,
            qemu_pid: None,
            accel: None,
            started_at: None,
            ended_at: None,
            exit: None,
            error: None,
        });
        let live = matches!(state.phase, Phase::Starting | Phase::Running);
        if live && self.running_supervisor()?.is_none() {
            state.phase = Phase::Crashed;
            state.qemu_pid = None;
            state.exit = Some(Exit::Crashed {
                status: if state.supervisor_pid.is_some() {
                    "supervisor died".into()
                } else {
                    "QEMU ended while no owner watched it".into()
                },
                last_serial: crate::tail_lines(&self.serial_log(), 20),
            });
        }
        Ok(state)
    }

    fn write_state(&self, state: &VmState) -> Result<(), VmError> {
        let path = self.state_path();
        let json = serde_json::to_vec_pretty(state).expect("state serializes");
        write_atomic(&path, &json, DEFAULT_MODE).map_err(|e| VmError::io(&path, e))
    }

    /// The supervisor's body: hold the lock, run QEMU, record how it ended.
    pub fn supervise(&self) -> Result<Exit, VmError> {
        let Some(_lock) = self.try_lock()? else {
            return Err(VmError::AlreadyRunning {
                name: self.name.clone(),
                pid: self.raw_state().and_then(|s| s.supervisor_pid).unwrap_or(0),
            });
        };
        let _ = std::fs::remove_file(self.stop_marker());
        // Each run gets a fresh console log; the previous run's stays for post-mortems.
        let _ = std::fs::rename(self.serial_log(), self.dir.join("serial.prev.log"));
        let spec = self.read_spec()?;
        let mut state = VmState {
            name: self.name.clone(),
            phase: Phase::Starting,
            supervisor_pid: Some(std::process::id()),
            qemu_pid: None,
            accel: None,
            started_at: Some(now()),
            ended_at: None,
            exit: None,
            error: None,
        };
        self.write_state(&state)?;
        let started = self
            .start_sidecars()
            .and_then(|sc| Ok((sc, Vm::start(&spec, &self.dir.join("qemu.log"))?)));
        let (_sidecars, mut vm) = match started {
            Ok(both) => both,
            Err(e) => {
                state.phase = Phase::Failed;
                state.error = Some(e.to_string());
                state.ended_at = Some(now());
                self.write_state(&state)?;
                return Err(e);
            }
        };
        state.phase = Phase::Running;
        state.qemu_pid = vm.pid();
        state.accel = Some(vm.accel().as_str().to_string());
        self.write_state(&state)?;
        tracing::info!(vm = %self.name, pid = ?vm.pid(), "VM running");
        let mut exit = vm.wait()?;
        if self.stop_marker().exists() {
            if let Exit::Crashed { .. } = exit {
                exit = Exit::Stopped {
                    how: "killed".into(),
                };
            }
        }
        state.phase = match exit {
            Exit::Stopped { .. } => Phase::Stopped,
            Exit::Crashed { .. } => Phase::Crashed,
        };
        state.qemu_pid = None;
        state.ended_at = Some(now());
        state.exit = Some(exit.clone());
        self.write_state(&state)?;
        let _ = std::fs::remove_file(self.qmp_socket());
        let _ = std::fs::remove_file(self.console_socket());
        Ok(exit)
    }

    /// Waits until a freshly launched supervisor reports running (or failed).
    pub fn wait_started(&self, timeout: Duration) -> Result<VmState, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(state) = self.raw_state() {
                match state.phase {
                    Phase::Running | Phase::Stopped | Phase::Crashed | Phase::Failed
                        if state.supervisor_pid.is_some() =>
                    {
                        return Ok(state)
                    }
                    _ => {}
                }
            }
            if Instant::now() > deadline {
                return Err(VmError::StartTimeout(timeout.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Clears the previous run's state before a new supervisor starts.
    pub fn reset_state(&self) -> Result<(), VmError> {
        match std::fs::remove_file(self.state_path()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VmError::io(self.state_path(), e)),
        }
    }

    /// The state once the owner recorded the end (a launched VM's watcher writes it just
    /// after QEMU exits), or the corrected state if nobody does within a few seconds.
    fn settled_state(&self) -> VmState {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(s) = self.raw_state() {
                if !matches!(s.phase, Phase::Running | Phase::Starting) {
                    return s;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.state().unwrap_or_else(|_| {
            self.raw_state().unwrap_or(VmState {
                name: self.name.clone(),
                phase: Phase::Stopped,
                supervisor_pid: None,
                qemu_pid: None,
                accel: None,
                started_at: None,
                ended_at: None,
                exit: None,
                error: None,
            })
        })
    }

    /// Stops the VM: power button, then `quit` after `timeout`, then SIGKILL to QEMU.
    pub fn stop(&self, timeout: Duration) -> Result<VmState, VmError> {
        let state = self.state()?;
        if !matches!(state.phase, Phase::Running | Phase::Starting) {
            return Err(VmError::NotRunning(self.name.clone()));
        }
        std::fs::write(self.stop_marker(), b"").map_err(|e| VmError::io(self.stop_marker(), e))?;
        let ended = |me: &Self| me.running_supervisor().map(|p| p.is_none());
        if let Ok(mut q) = Qmp::connect(&self.qmp_socket(), Duration::from_secs(10)) {
            let _ = q.powerdown();
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if ended(self)? {
                return Ok(self.settled_state());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        tracing::warn!(vm = %self.name, "guest did not power off in time; quitting QEMU");
        if let Ok(mut q) = Qmp::connect(&self.qmp_socket(), Duration::from_secs(5)) {
            let _ = q.quit();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if ended(self)? {
                return Ok(self.settled_state());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(pid) = state.qemu_pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !ended(self)? {
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(self.settled_state())
    }
}

/// A write lock over the whole file, as QEMU's `lockf` takes it on its pidfile.
fn whole_file_lock() -> libc::flock {
    libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// Every VM known under `state_dir`, sorted by name.
pub fn list(state_dir: &Path) -> Result<Vec<VmState>, VmError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(state_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(VmError::io(state_dir, e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(rd) = RunDir::existing(state_dir, &name) {
            out.push(rd.state()?);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
