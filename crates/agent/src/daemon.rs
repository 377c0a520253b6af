//! `tandem agent run`: the one long-lived process on the laptop.
//!
//! It composes the rest of the crate: re-attaches to desktops that outlived an earlier
//! daemon, serves the local API ([`crate::api`]) on `<dir>/agent.sock`, runs the backup
//! schedule and the check-in loop (with lease enforcement and kill), and owns the NBD
//! exports of the running desktops' bases. It stops on `shutdown` or when the device is
//! killed; desktops keep running either way (a restarted daemon re-attaches).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use crate::checkin::{self, RunOptions};
use crate::laptop::{Laptop, LaptopConfig, LaptopHooks};
use crate::AgentDir;

/// The daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another daemon serves this directory.
    #[error(
        "another agent daemon already serves {0}; stop it first (`systemctl stop tandem-agent`)"
    )]
    AlreadyRunning(PathBuf),
    /// The socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// Socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The check-in loop failed.
    #[error(transparent)]
    Checkin(#[from] checkin::CheckinError),
}

/// Runs the daemon until `shutdown` resolves or the device is killed.
pub async fn run(
    dir: AgentDir,
    config: LaptopConfig,
    opts: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let socket = crate::api::socket_path(&dir);
    if crate::laptop::socket_alive(&socket) {
        return Err(DaemonError::AlreadyRunning(dir.root().to_path_buf()));
    }
    let listen_err = |source| DaemonError::Listen {
        path: socket.clone(),
        source,
    };
    std::fs::create_dir_all(dir.root()).map_err(listen_err)?;
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket).map_err(listen_err)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        // Anyone may connect; the daemon checks every peer's credentials (see `api`).
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))
            .map_err(listen_err)?;
    }
    let laptop = Arc::new(Laptop::new(
        dir.clone(),
        config,
        tokio::runtime::Handle::current(),
    ));
    let reattached = {
        let l = laptop.clone();
        tokio::task::spawn_blocking(move || l.reattach())
            .await
            .unwrap_or_default()
    };
    tracing::info!(dir = %dir.root().display(), ?reattached, "agent daemon running");
    let api = tokio::spawn(crate::api::serve(listener, laptop.clone()));
    let backups = tokio::spawn(laptop.clone().backup_schedule());
    let hooks = LaptopHooks(laptop.clone());
    let result = checkin::run(&dir, &hooks, opts, shutdown).await;
    api.abort();
    backups.abort();
    let _ = std::fs::remove_file(&socket);
    tracing::info!("agent daemon stopped; running desktops keep running");
    Ok(result?)
}
