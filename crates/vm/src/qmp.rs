//! A small typed QMP client over a unix socket, blocking, with timeouts.
//!
//! QMP is line-delimited JSON: a greeting, `qmp_capabilities`, then commands answered by
//! `{"return": …}` or `{"error": {"class", "desc"}}`, with asynchronous `{"event": …}`
//! lines interleaved. Events read while waiting for a reply are kept in [`Qmp::events`].

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

/// Talking to QEMU's monitor failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached.
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Reading or writing the socket failed (QEMU exited or hung).
    #[error("QMP connection lost: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU closed the connection.
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// QEMU sent something that is not QMP.
    #[error("malformed QMP message: {0}")]
    Protocol(String),
    /// QEMU refused the command.
    #[error("QEMU refused `{command}`: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// An open, negotiated QMP session.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events that arrived while waiting for replies, oldest first.
    pub events: Vec<Value>,
}

/// The answer to `query-status`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct VmStatus {
    /// QEMU's run state (`running`, `paused`, `shutdown`, …).
    pub status: String,
    /// Whether vCPUs are running.
    pub running: bool,
}

impl Qmp {
    /// Connects and negotiates capabilities; every read and write times out after `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.reader.read_line(&mut line)?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            if line.len() > 16 * 1024 * 1024 {
                return Err(QmpError::Protocol("message over 16 MiB".into()));
            }
            if !line.trim().is_empty() {
                return serde_json::from_str(&line)
                    .map_err(|e| QmpError::Protocol(format!("{e}: {}", line.trim())));
            }
        }
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes())?;
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: err["class"].as_str().unwrap_or("?").to_string(),
                    desc: err["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected reply {reply}")));
        }
    }

    /// `query-status`.
    pub fn status(&mut self) -> Result<VmStatus, QmpError> {
        let v = self.execute("query-status", None)?;
        serde_json::from_value(v).map_err(|e| QmpError::Protocol(e.to_string()))
    }

    /// Presses the ACPI power button.
    pub fn powerdown(&mut self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).map(|_| ())
    }

    /// Pauses the vCPUs.
    pub fn pause(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).map(|_| ())
    }

    /// Resumes the vCPUs.
    pub fn resume(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).map(|_| ())
    }

    /// Asks QEMU to exit now (no guest shutdown).
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Names of the block devices QEMU has open, with their image files.
    pub fn block_devices(&mut self) -> Result<Vec<(String, String)>, QmpError> {
        let v = self.execute("query-block", None)?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| {
                        Some((
                            d["device"]
                                .as_str()
                                .or_else(|| d["qdev"].as_str())?
                                .to_string(),
                            d["inserted"]["file"].as_str().unwrap_or("").to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}
