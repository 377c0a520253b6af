//! Shared helpers for end-to-end tests: temp dirs, running the binary, loopback ports,
//! and a reaper that kills child processes even when a test fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

/// The `tandem` binary under test.
pub fn tandem_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tandem"))
}

/// A `tandem` command with logs quiet and no colour.
pub fn tandem() -> Command {
    let mut c = Command::new(tandem_bin());
    c.env("NO_COLOR", "1").env_remove("TANDEM_LOG");
    c
}

/// Runs a command and returns its output, with stdout/stderr as text.
pub struct Ran {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Ran {
    /// Parses stdout as one JSON document.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// Asserts success and returns self.
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "command failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Asserts the exit code and returns self.
    pub fn code(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "unexpected exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs `cmd` to completion.
pub fn run(cmd: &mut Command) -> Ran {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("spawn command");
    Ran {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// A child process that is killed (whole process group) and reaped when dropped, so a
/// failing test never leaves a server or QEMU behind.
pub struct Reaped(pub Child);

impl Reaped {
    /// Spawns `cmd` in its own process group.
    pub fn spawn(cmd: &mut Command) -> Self {
        use std::os::unix::process::CommandExt as _;
        cmd.process_group(0);
        Reaped(cmd.spawn().expect("spawn child"))
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// A free TCP port on 127.0.0.1 (racy by nature; prefer `--listen 127.0.0.1:0` where the
/// program reports its port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind loopback")
}

/// Waits until `cond` holds or `secs` pass; returns whether it held.
pub fn wait_for(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    cond()
}

/// Waits until `path` contains `needle`.
pub fn wait_for_text(path: &Path, needle: &str, secs: u64) -> bool {
    wait_for(secs, || {
        std::fs::read(path)
            .map(|b| String::from_utf8_lossy(&b).contains(needle))
            .unwrap_or(false)
    })
}

/// Where the built guest assets live (shared across tests; built once per machine by
/// `tandem guest build`, which caches by content).
pub fn guest_dir() -> PathBuf {
    std::env::var_os("TANDEM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/tandem/guest"))
}

/// Whether any live process's command line contains `needle` (used to prove that no QEMU
/// was left behind).
pub fn process_running_with(needle: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            return false;
        };
        if pid == std::process::id() {
            return false;
        }
        std::fs::read(e.path().join("cmdline"))
            .map(|c| {
                let text = String::from_utf8_lossy(&c).replace('\0', " ");
                text.contains(needle) && !text.contains("cargo")
            })
            .unwrap_or(false)
    })
}

/// Builds the guest once per machine (cached by content) and returns its directory.
pub fn guest() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = guest_dir();
            run(tandem()
                .args(["guest", "build", "--out"])
                .arg(&dir)
                .arg("--json"))
            .ok();
            dir
        })
        .clone()
}

/// A named VM under a temporary state directory that is stopped (and its QEMU killed)
/// when the test ends, pass or fail.
pub struct NamedVm {
    /// State directory.
    pub state: tempfile::TempDir,
    /// VM name (unique per test, so leftovers can be found by name).
    pub name: String,
}

impl NamedVm {
    /// A fresh state directory for VM `name`.
    pub fn new(name: &str) -> Self {
        NamedVm {
            state: tempfile::tempdir().expect("tempdir"),
            name: format!("{name}-{}", std::process::id()),
        }
    }

    /// `tandem vm <verb> NAME --state-dir DIR` plus `extra`.
    pub fn cmd(&self, verb: &str, extra: &[&str]) -> Command {
        let mut c = tandem();
        c.args(["vm", verb, &self.name, "--state-dir"])
            .arg(self.state.path())
            .args(extra);
        c
    }

    /// The VM's state as JSON.
    pub fn status(&self) -> serde_json::Value {
        run(&mut self.cmd("status", &["--json"])).ok().json()
    }
}

impl Drop for NamedVm {
    fn drop(&mut self) {
        let _ = self.cmd("stop", &["--timeout", "5"]).output();
        let dir = self.state.path().join(&self.name);
        for file in ["state.json"] {
            if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    for key in ["qemu_pid", "supervisor_pid"] {
                        if let Some(pid) = v[key].as_i64() {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid as i32),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                    }
                }
            }
        }
    }
}
