//! The daemon's local API: typed, versioned JSON over a unix socket.
//!
//! Wire format (version [`API_VERSION`]): the client connects, sends one JSON document
//! [`ApiRequest`] on one line, and reads one [`ApiResponse`] line back; then the
//! connection closes. A request line longer than [`MAX_REQUEST`] bytes, a line that is not
//! an `ApiRequest`, and a request of another version are answered with an error
//! (`bad-request`, `unsupported-version`) and never acted on.
//!
//! Who may connect: the socket is world-connectable on purpose and the daemon checks the
//! peer's credentials (`SO_PEERCRED`) before reading a byte: root, the daemon's own user,
//! and members of the `tandem` group are served; anyone else gets `unauthorized`.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tandem_desktop::Desktop;
use tandem_vm::rundir::VmState;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

use crate::checkin::{self, Outcome};
use crate::laptop::{
    BackupDone, BaseChoice, Laptop, LaptopHooks, Peer, Recovered, Recovery, Started,
};
use crate::status::AgentStatus;

/// The API version this build speaks.
pub const API_VERSION: u32 = 1;
/// Longest request line accepted.
pub const MAX_REQUEST: u64 = 64 * 1024;

/// One request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiRequest {
    /// Must be [`API_VERSION`].
    pub version: u32,
    /// What to do.
    pub request: Request,
}

/// What a client may ask.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", tag = "verb", deny_unknown_fields)]
pub enum Request {
    /// Start a desktop.
    DesktopStart {
        /// Which.
        desktop: Desktop,
        /// What it boots (personal only).
        #[serde(default)]
        base: BaseChoice,
    },
    /// Stop a desktop.
    DesktopStop {
        /// Which.
        desktop: Desktop,
        /// Seconds the guest gets to power off.
        timeout_secs: u64,
    },
    /// Both desktops' states.
    DesktopStatus,
    /// A recovery-point operation.
    Recovery {
        /// Which desktop.
        desktop: Desktop,
        /// What.
        action: Recovery,
    },
    /// Back up the corporate user disk now.
    Backup,
    /// The agent's state.
    Status,
    /// Check in now.
    CheckIn,
}

/// A successful answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "value")]
pub enum Reply {
    /// A desktop started.
    Started(Box<Started>),
    /// A desktop stopped.
    Stopped(Box<VmState>),
    /// Desktop states.
    Desktops(Vec<VmState>),
    /// A recovery-point operation.
    Recovered(Recovered),
    /// A backup committed.
    Backup(Box<BackupDone>),
    /// The agent's state.
    Status(Box<AgentStatus>),
    /// A check-in finished.
    CheckedIn(Box<CheckinReport>),
}

/// What a check-in did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckinReport {
    /// The device executed a kill.
    pub killed: bool,
    /// The verified target state.
    pub target: Option<tandem_proto::fleet::TargetState>,
    /// The verified lease.
    pub lease: Option<tandem_proto::fleet::Lease>,
    /// Why acting on the target failed.
    pub hook_error: Option<String>,
    /// Assigned versions pulled.
    pub pulls: Vec<crate::images::PullResult>,
}

impl From<Outcome> for CheckinReport {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Killed => CheckinReport {
                killed: true,
                target: None,
                lease: None,
                hook_error: None,
                pulls: Vec::new(),
            },
            Outcome::Applied {
                target,
                lease,
                hook_error,
                pulls,
            } => CheckinReport {
                killed: false,
                target: Some(*target),
                lease,
                hook_error,
                pulls,
            },
        }
    }
}

/// Why a request was not served.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Not an API request.
    BadRequest,
    /// Another API version.
    UnsupportedVersion,
    /// The peer may not use the daemon.
    Unauthorized,
    /// The operation failed.
    Failed,
}

/// An error answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// Kind.
    pub code: ErrorCode,
    /// For people: what went wrong and what to do next.
    pub message: String,
}

/// One answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiResponse {
    /// The daemon's [`API_VERSION`].
    pub version: u32,
    /// The answer.
    pub result: Result<Reply, ApiError>,
}

/// The daemon's socket for an agent directory.
pub fn socket_path(dir: &crate::AgentDir) -> PathBuf {
    dir.root().join("agent.sock")
}

/// Talking to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon listens.
    #[error("no Tandem agent daemon is running for this laptop (nothing listens on {0}); start it with `tandem agent run` (or `systemctl start tandem-agent`, unit in dist/) and retry")]
    NoDaemon(PathBuf),
    /// The connection failed.
    #[error("talking to the agent daemon on {path}: {source}")]
    Io {
        /// Socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The answer is not an API response.
    #[error("the agent daemon sent an answer this client does not understand ({0}); are the daemon and the CLI the same version?")]
    Malformed(String),
    /// The daemon refused or failed.
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// Sends one request to the daemon on `socket` and waits for its answer.
pub fn call(socket: &Path, request: Request) -> Result<Reply, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ClientError::NoDaemon(socket.to_path_buf()))
        }
        Err(e) => return Err(io(e)),
    };
    let mut line = serde_json::to_vec(&ApiRequest {
        version: API_VERSION,
        request,
    })
    .expect("requests serialize");
    line.push(b'\n');
    // The daemon answers an unauthorized peer before reading its request and closes: the
    // write may then fail although the refusal is waiting to be read.
    let written = stream.write_all(&line);
    let mut answer = String::new();
    let read = BufReader::new(stream).read_line(&mut answer);
    if let Err(e) = written {
        if answer.is_empty()
            || !matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            )
        {
            return Err(io(e));
        }
    }
    read.map_err(io)?;
    if answer.is_empty() {
        return Err(ClientError::Malformed(
            "the daemon closed the connection".into(),
        ));
    }
    let resp: ApiResponse =
        serde_json::from_str(&answer).map_err(|e| ClientError::Malformed(e.to_string()))?;
    Ok(resp.result?)
}

/// Whether `uid`/`gid` may use the daemon: root, the daemon's own user, or a member of
/// the `tandem` group.
pub fn authorized(uid: u32, gid: u32) -> bool {
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        return true;
    }
    let Ok(Some(group)) = nix::unistd::Group::from_name("tandem") else {
        return false;
    };
    if group.gid.as_raw() == gid {
        return true;
    }
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => user.gid == group.gid || group.mem.contains(&user.name),
        _ => false,
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> ApiResponse {
    ApiResponse {
        version: API_VERSION,
        result: Err(ApiError {
            code,
            message: message.into(),
        }),
    }
}

/// Serves the API on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::UnixListener, laptop: Arc<Laptop>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let l = laptop.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, l).await {
                        tracing::debug!(error = %e, "local API connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "local API accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(stream: tokio::net::UnixStream, laptop: Arc<Laptop>) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let (rd, mut wr) = stream.into_split();
    let resp = if !authorized(cred.uid(), cred.gid()) {
        tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "local API: refused an unauthorized peer");
        error(
            ErrorCode::Unauthorized,
            "only root and members of the `tandem` group may use the Tandem agent; ask IT to add you to the group",
        )
    } else {
        let mut line = Vec::new();
        let mut limited = tokio::io::BufReader::new(rd).take(MAX_REQUEST + 1);
        limited.read_until(b'\n', &mut line).await?;
        let peer = Peer { uid: cred.uid() };
        match parse(&line) {
            Ok(request) => {
                tracing::debug!(?request, uid = cred.uid(), "local API request");
                let result = tokio::task::spawn_blocking(move || handle(&laptop, request, peer))
                    .await
                    .unwrap_or_else(|e| {
                        Err(ApiError {
                            code: ErrorCode::Failed,
                            message: format!("the daemon failed while serving the request: {e}"),
                        })
                    });
                ApiResponse {
                    version: API_VERSION,
                    result,
                }
            }
            Err(resp) => resp,
        }
    };
    let mut out = serde_json::to_vec(&resp).expect("responses serialize");
    out.push(b'\n');
    wr.write_all(&out).await?;
    wr.shutdown().await
}

/// Decodes one request line; the error is the answer to send.
pub fn parse(line: &[u8]) -> Result<Request, ApiResponse> {
    if line.len() as u64 > MAX_REQUEST {
        return Err(error(
            ErrorCode::BadRequest,
            format!("request longer than {MAX_REQUEST} bytes"),
        ));
    }
    #[derive(Deserialize)]
    struct VersionOnly {
        version: u32,
    }
    let v: VersionOnly = serde_json::from_slice(line).map_err(|e| {
        error(
            ErrorCode::BadRequest,
            format!("not a Tandem agent API request ({e})"),
        )
    })?;
    if v.version != API_VERSION {
        return Err(error(
            ErrorCode::UnsupportedVersion,
            format!(
                "API version {} is not supported; this daemon speaks version {API_VERSION} (update the CLI or the daemon so they match)",
                v.version
            ),
        ));
    }
    let r: ApiRequest = serde_json::from_slice(line).map_err(|e| {
        error(
            ErrorCode::BadRequest,
            format!("not a valid version-{API_VERSION} request ({e})"),
        )
    })?;
    Ok(r.request)
}

fn failed(e: impl std::fmt::Display) -> ApiError {
    ApiError {
        code: ErrorCode::Failed,
        message: e.to_string(),
    }
}

/// Serves one request (on a blocking thread).
fn handle(laptop: &Arc<Laptop>, request: Request, peer: Peer) -> Result<Reply, ApiError> {
    match request {
        Request::DesktopStart { desktop, base } => laptop
            .start(desktop, &base, peer)
            .map(|s| Reply::Started(Box::new(s)))
            .map_err(failed),
        Request::DesktopStop {
            desktop,
            timeout_secs,
        } => laptop
            .stop(desktop, std::time::Duration::from_secs(timeout_secs))
            .map(|s| Reply::Stopped(Box::new(s)))
            .map_err(failed),
        Request::DesktopStatus => laptop.status().map(Reply::Desktops).map_err(failed),
        Request::Recovery { desktop, action } => laptop
            .recovery(desktop, &action)
            .map(Reply::Recovered)
            .map_err(failed),
        Request::Backup => laptop
            .backup()
            .map(|b| Reply::Backup(Box::new(b)))
            .map_err(failed),
        Request::Status => crate::status::status(laptop.dir(), crate::now())
            .map(|s| Reply::Status(Box::new(s)))
            .map_err(failed),
        Request::CheckIn => {
            let hooks = LaptopHooks(laptop.clone());
            let dir = laptop.dir().clone();
            laptop
                .runtime()
                .block_on(async move { checkin::checkin_once(&dir, &hooks).await })
                .map(|o| Reply::CheckedIn(Box::new(o.into())))
                .map_err(failed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_unknown_versions_and_unknown_verbs_are_refused_with_a_reason() {
        let code = |line: &[u8]| {
            parse(line)
                .expect_err("refused")
                .result
                .expect_err("error")
                .code
        };
        assert_eq!(code(b"\x00\xffnot json\n"), ErrorCode::BadRequest);
        assert_eq!(code(b"{}\n"), ErrorCode::BadRequest);
        assert_eq!(
            code(b"{\"version\": 2, \"request\": {\"verb\": \"status\"}}\n"),
            ErrorCode::UnsupportedVersion
        );
        assert_eq!(
            code(b"{\"version\": 1, \"request\": {\"verb\": \"format-disk\"}}\n"),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(b"{\"version\": 1, \"request\": {\"verb\": \"status\"}, \"sudo\": true}\n"),
            ErrorCode::BadRequest
        );
        let long = vec![b' '; MAX_REQUEST as usize + 2];
        assert_eq!(code(&long), ErrorCode::BadRequest);
        assert_eq!(
            parse(b"{\"version\": 1, \"request\": {\"verb\": \"desktop-start\", \"desktop\": \"personal\"}}\n")
                .expect("valid"),
            Request::DesktopStart {
                desktop: Desktop::Personal,
                base: BaseChoice::default()
            }
        );
    }

    #[test]
    fn root_and_the_daemons_own_user_are_authorized_strangers_are_not() {
        assert!(authorized(0, 0));
        assert!(authorized(nix::unistd::geteuid().as_raw(), 12345));
        // A uid/gid that names no user and is not the `tandem` group's.
        if nix::unistd::Group::from_name("tandem")
            .ok()
            .flatten()
            .is_none()
        {
            assert!(!authorized(54_321, 54_321));
        }
    }
}
