//! Worker-process isolation: the parent never parses the disk.
//!
//! The parent saves the compiled engine to a temp file and runs the worker command once
//! to read the disk's layout (open the source, size, partition table), then once per
//! volume. A worker reads one JSON [`WorkerRequest`] on stdin, asks the kernel to kill it
//! when its parent dies ([`tandem_disk::worker::die_with_parent`]), sets its own rlimits
//! **before** touching the disk (data segment = memory cap, CPU seconds, no core dumps),
//! opens the view from the request's `source` (interpreted by the binary, so any view —
//! image file, stored version — works), does its task and writes one JSON
//! [`WorkerResponse`] on stdout. The parent enforces a wall-clock timeout; a killed,
//! crashed or silent volume worker makes that volume `not_scanned`, and a layout worker
//! that fails makes the scan an error ([`ScanError::Open`]): nothing hostile is parsed in
//! the parent, which may itself be a long-lived process (publish, the server).

use std::ffi::OsString;
use std::io::{Read as _, Write as _};
use std::process::{Command, Stdio};
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
    /// The parent's pid: the worker stops if it is no longer its parent.
    pub parent: u32,
    /// Limits.
    pub config: ScanConfig,
    /// What to do.
    pub task: Task,
}

/// A worker's one job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Task {
    /// Open the disk and list its volumes.
    Layout,
    /// Scan one volume.
    Volume {
        /// The volume to scan.
        volume: Volume,
        /// Compiled engine file ([`Engine::save`]).
        engine: std::path::PathBuf,
        /// The volume's state from the last scan.
        state: Option<VolumeState>,
    },
}

/// What a worker answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WorkerResponse {
    /// The disk's size and volumes.
    Layout {
        /// Disk size in bytes.
        size: u64,
        /// Its volumes.
        volumes: Vec<Volume>,
    },
    /// The disk could not be opened or its partition table read.
    Refused {
        /// Why, for people.
        detail: String,
    },
    /// One volume's scan.
    Volume {
        /// The volume's result.
        result: VolumeResult,
        /// Its new incremental state.
        state: VolumeState,
    },
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

/// Scans every volume of the disk `source` names, each in its own worker process started
/// as `worker_cmd` (after one worker reads the layout). `state`, when given, is read for
/// skipping and updated with the new scan.
pub fn scan_isolated(
    source: &serde_json::Value,
    target: &str,
    engine: &Engine,
    cfg: &ScanConfig,
    worker_cmd: &[OsString],
    mut state: Option<&mut ScanState>,
) -> Result<Report, ScanError> {
    let started = Instant::now();
    let layout = WorkerRequest {
        source: source.clone(),
        parent: std::process::id(),
        config: cfg.clone(),
        task: Task::Layout,
    };
    let (size, vols) = match run_worker(worker_cmd, &layout)? {
        Ok(WorkerResponse::Layout { size, volumes }) => (size, volumes),
        Ok(WorkerResponse::Refused { detail }) => return Err(ScanError::Open(detail)),
        Ok(WorkerResponse::Volume { .. }) => {
            return Err(ScanError::Open(
                "the layout worker answered with a volume".into(),
            ))
        }
        Err((_, detail)) => return Err(ScanError::Open(detail)),
    };
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
            parent: std::process::id(),
            config: cfg.clone(),
            task: Task::Volume {
                volume: vol.clone(),
                engine: engine_path.clone(),
                state: state.as_ref().and_then(|s| s.volumes.get(&key).cloned()),
            },
        };
        match run_worker(worker_cmd, &req)? {
            Ok(WorkerResponse::Volume { result, state: st }) => {
                if let Some(s) = state.as_deref_mut() {
                    s.volumes.insert(key, st);
                }
                results.push(result);
            }
            Ok(WorkerResponse::Refused { detail }) => {
                results.push(failed(vol, Reason::ReadError, detail));
            }
            Ok(WorkerResponse::Layout { .. }) => results.push(failed(
                vol,
                Reason::WorkerFailed,
                "the scan worker answered with a layout".into(),
            )),
            Err((reason, detail)) => {
                tracing::warn!(volume = vol.index, %detail, "scan worker failed");
                results.push(failed(vol, reason, detail));
            }
        }
    }
    Ok(Report::new(
        target.to_string(),
        size,
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

/// Sets this process's limits (see [`tandem_disk::worker::limit_self`]).
pub fn limit_self(memory_mib: u64, cpu_secs: u64) -> std::io::Result<()> {
    tandem_disk::worker::limit_self(memory_mib, cpu_secs)
}

/// The worker's main: read the request, tie its life to the parent's, limit itself, open
/// the view with `open`, do the task, answer. Returns the process exit code.
pub fn worker_main(
    open: impl FnOnce(&serde_json::Value) -> Result<std::sync::Arc<dyn ReadAt>, String>,
) -> u8 {
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
    if let Err(e) = tandem_disk::worker::die_with_parent(req.parent) {
        eprintln!("scan worker: {e}");
        return 3;
    }
    if let Err(e) = limit_self(req.config.worker_memory_mib, req.config.worker_cpu_secs) {
        eprintln!("scan worker: cannot set limits: {e}");
        return 3;
    }
    let resp = match req.task {
        Task::Layout => match open(&req.source) {
            Err(detail) => WorkerResponse::Refused { detail },
            Ok(disk) => match tandem_disk::volumes(&*disk) {
                Ok(volumes) => WorkerResponse::Layout {
                    size: disk.size(),
                    volumes,
                },
                Err(e) => WorkerResponse::Refused {
                    detail: format!("cannot read the disk layout: {e}"),
                },
            },
        },
        Task::Volume {
            volume,
            engine,
            state,
        } => {
            let engine = match Engine::load(&engine) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("scan worker: {e}");
                    return 3;
                }
            };
            match open(&req.source) {
                Err(e) => WorkerResponse::Volume {
                    result: failed(&volume, Reason::ReadError, e),
                    state: VolumeState::default(),
                },
                Ok(disk) => {
                    let (result, state) =
                        scan_volume(disk, &volume, &engine, &req.config, state.as_ref());
                    WorkerResponse::Volume { result, state }
                }
            }
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
