//! Worker-process isolation: one child process per volume.
//!
//! The parent lists volumes (with `tandem-disk`'s bounded table parsers), saves the
//! compiled engine to a temp file, and runs the worker command once per volume. The
//! worker reads one JSON [`WorkerRequest`] on stdin, sets its own rlimits **before**
//! touching the disk (data segment = memory cap, CPU seconds, no core dumps), opens the
//! view from the request's `source` (interpreted by the binary, so any view — image
//! file, stored version — works), scans the volume and writes one JSON
//! [`WorkerResponse`] on stdout. The parent enforces a wall-clock timeout and turns a
//! killed, crashed or silent worker into `not_scanned` for that volume only.

use std::ffi::OsString;
use std::io::{Read as _, Write as _};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tandem_disk::{ReadAt, Volume};

use crate::engine::Engine;
use crate::model::{Counts, Reason, Report, Verdict, VolumeResult};
use crate::state::ScanState;
use crate::volume::{scan_volume, VolumeState};
use crate::{ScanConfig, ScanError};

/// What a worker is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerRequest {
    /// How to open the disk; meaning is up to the binary's `open` function.
    pub source: serde_json::Value,
    /// The volume to scan.
    pub volume: Volume,
    /// Limits.
    pub config: ScanConfig,
    /// Compiled engine file ([`Engine::save`]).
    pub engine: std::path::PathBuf,
    /// The volume's state from the last scan.
    pub state: Option<VolumeState>,
}

/// What a worker answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerResponse {
    /// The volume's result.
    pub result: VolumeResult,
    /// Its new incremental state.
    pub state: VolumeState,
}

fn failed(vol: &Volume, reason: Reason, detail: String) -> VolumeResult {
    VolumeResult {
        index: vol.index,
        table: vol.table,
        start: vol.start,
        len: vol.len,
        fs: tandem_disk::FsKind::Unknown,
        verdict: Verdict::not_scanned(reason, detail),
        counts: Counts::default(),
        files: Vec::new(),
        millis: 0,
    }
}

/// Scans every volume of `disk`, each in its own worker process started as `worker_cmd`.
/// `state`, when given, is read for skipping and updated with the new scan.
#[allow(clippy::too_many_arguments)]
pub fn scan_isolated(
    disk: Arc<dyn ReadAt>,
    source: &serde_json::Value,
    target: &str,
    engine: &Engine,
    cfg: &ScanConfig,
    worker_cmd: &[OsString],
    mut state: Option<&mut ScanState>,
) -> Result<Report, ScanError> {
    let started = Instant::now();
    let vols = tandem_disk::volumes(&*disk)?;
    let dir = tempfile::tempdir().map_err(|source| ScanError::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    let engine_path = dir.path().join("engine");
    engine.save(&engine_path)?;
    let mut results = Vec::new();
    for vol in &vols {
        let key = ScanState::key(vol);
        let req = WorkerRequest {
            source: source.clone(),
            volume: vol.clone(),
            config: cfg.clone(),
            engine: engine_path.clone(),
            state: state.as_ref().and_then(|s| s.volumes.get(&key).cloned()),
        };
        match run_worker(worker_cmd, &req)? {
            Ok(resp) => {
                if let Some(s) = state.as_deref_mut() {
                    s.volumes.insert(key, resp.state);
                }
                results.push(resp.result);
            }
            Err((reason, detail)) => {
                tracing::warn!(volume = vol.index, %detail, "scan worker failed");
                results.push(failed(vol, reason, detail));
            }
        }
    }
    Ok(Report::new(
        target.to_string(),
        disk.size(),
        engine.info().clone(),
        results,
        started.elapsed().as_millis() as u64,
    ))
}

type WorkerOutcome = Result<WorkerResponse, (Reason, String)>;

fn run_worker(cmd: &[OsString], req: &WorkerRequest) -> Result<WorkerOutcome, ScanError> {
    let exe = cmd.first().cloned().unwrap_or_default();
    let mut child = Command::new(&exe)
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ScanError::Worker {
            exe: exe.clone().into(),
            source,
        })?;
    let input = serde_json::to_vec(req).expect("plain data serializes");
    let mut stdin = child.stdin.take().expect("stdin was piped");
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let mut stdout = child.stdout.take().expect("stdout was piped");
    let reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stdout.read_to_end(&mut b);
        b
    });
    let mut stderr = child.stderr.take().expect("stderr was piped");
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        b
    });
    // The worker's own volume budget plus a grace period for opening and reporting.
    let limit = Duration::from_secs(req.config.volume_timeout_secs + 30);
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(source) => {
                return Err(ScanError::Worker {
                    exe: exe.into(),
                    source,
                })
            }
        }
    };
    let _ = writer.join();
    let out = reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let err_tail = String::from_utf8_lossy(&err)
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string();
    let Some(status) = status else {
        return Ok(Err((
            Reason::Timeout,
            format!("scan worker killed after {}s wall clock", limit.as_secs()),
        )));
    };
    if !status.success() {
        use std::os::unix::process::ExitStatusExt as _;
        let how = match status.signal() {
            Some(sig) => format!("killed by signal {sig} (memory or CPU limit?)"),
            None => format!("exited with {status}"),
        };
        return Ok(Err((
            Reason::WorkerFailed,
            format!("scan worker {how}: {err_tail}"),
        )));
    }
    Ok(serde_json::from_slice::<WorkerResponse>(&out).map_err(|e| {
        (
            Reason::WorkerFailed,
            format!("scan worker answered nonsense ({e}): {err_tail}"),
        )
    }))
}

/// Sets this process's limits: data segment (heap and anonymous maps) to `memory_mib`,
/// CPU time to `cpu_secs`, no core dumps.
pub fn limit_self(memory_mib: u64, cpu_secs: u64) -> std::io::Result<()> {
    use nix::sys::resource::{setrlimit, Resource};
    let to_io = |e: nix::Error| std::io::Error::from_raw_os_error(e as i32);
    let mem = memory_mib.saturating_mul(1 << 20);
    setrlimit(Resource::RLIMIT_DATA, mem, mem).map_err(to_io)?;
    setrlimit(Resource::RLIMIT_CPU, cpu_secs, cpu_secs.saturating_add(5)).map_err(to_io)?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(to_io)?;
    Ok(())
}

/// The worker's main: read the request, limit itself, open the view with `open`, scan,
/// answer. Returns the process exit code.
pub fn worker_main(open: impl FnOnce(&serde_json::Value) -> Result<Arc<dyn ReadAt>, String>) -> u8 {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("scan worker: cannot read request: {e}");
        return 3;
    }
    let req: WorkerRequest = match serde_json::from_slice(&input) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("scan worker: bad request: {e}");
            return 3;
        }
    };
    if let Err(e) = limit_self(req.config.worker_memory_mib, req.config.worker_cpu_secs) {
        eprintln!("scan worker: cannot set limits: {e}");
        return 3;
    }
    let engine = match Engine::load(&req.engine) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("scan worker: {e}");
            return 3;
        }
    };
    let resp = match open(&req.source) {
        Err(e) => WorkerResponse {
            result: failed(&req.volume, Reason::ReadError, e),
            state: VolumeState::default(),
        },
        Ok(disk) => {
            let (result, state) =
                scan_volume(disk, &req.volume, &engine, &req.config, req.state.as_ref());
            WorkerResponse { result, state }
        }
    };
    let out = serde_json::to_vec(&resp).expect("plain data serializes");
    match std::io::stdout().write_all(&out) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("scan worker: cannot answer: {e}");
            3
        }
    }
}
