//! Tandem management server: the fleet API (enrollment, check-in, signed target states,
//! leases, kill orders, audit), image serving, and the admin API.
//!
//! Layout of the data directory:
//! - `keys/`: the server's signing keys ([`keys::ServerKeys`]), one per power;
//! - `tandem.db`: the SQLite metadata database, unless `--database postgres://…`;
//! - `store/`, `images/`: the chunk store and image catalog (images module).
//!
//! Request flow: every route except `/v1/enroll`, `/v1/health` and `/v1/keys` passes
//! [`auth::authenticate`], which turns an admin bearer token or a device signature into
//! an [`auth::Caller`] in the request extensions. Handlers return [`error::ApiError`],
//! whose body is `tandem_proto::api::ApiErrorBody`.
//!
//! Invariants:
//! - a killed device is refused on every request and never gets a lease again;
//! - a device only ever reads its own records;
//! - every admin change and every device event is appended to the audit log;
//! - the first start creates one admin credential, returned once and stored hashed.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod admin;
pub mod auth;
pub mod backups;
pub mod console;
pub mod error;
pub mod fleet;
pub mod images;
pub mod keys;
pub mod rules;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use axum::routing::{delete, get, post, put};
use axum::Router;
use tandem_db::{DatabaseUrl, Db, NewAudit};
use tandem_proto::fleet::DeviceId;

/// How to start the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Data directory (keys, SQLite file, chunk store).
    pub data_dir: PathBuf,
    /// Metadata database; `None` means SQLite at `<data>/tandem.db`.
    pub database: Option<DatabaseUrl>,
    /// The key that seals escrowed disk keys; `None` means
    /// [`keys::EscrowVault::default_key_file`] (beside the data directory, not in it).
    pub escrow_key_file: Option<PathBuf>,
}

/// Starting the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// Which.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key file could not be read or created.
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    /// The metadata database could not be opened or migrated.
    #[error(transparent)]
    Db(#[from] tandem_db::DbError),
    /// The image store could not be opened.
    #[error(transparent)]
    Images(#[from] images::ImageServiceError),
    /// Serving HTTP failed.
    #[error("http server failed: {0}")]
    Serve(std::io::Error),
}

/// The admin credential created at first start. `Debug` hides it.
pub struct AdminToken(pub String);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(****)")
    }
}

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Metadata.
    pub db: Arc<dyn Db>,
    /// Signing keys.
    pub keys: Arc<keys::ServerKeys>,
    /// Replay protection: request nonces recorded in the database, shared by replicas.
    pub nonces: Arc<auth::ReplayGuard>,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Which image versions each device may read (the image routes' authorization).
    pub access: Arc<FleetAccess>,
    /// Rate limit of audit entries that callers can provoke at will.
    pub audit_limiter: Arc<auth::AuditLimiter>,
    /// Caps the memory held by device request bodies read before their signature check.
    pub body_gate: Arc<auth::BodyGate>,
}

/// Image authorization from the fleet's assignments: a device may read exactly the
/// corporate and personal versions assigned to its user; admins read everything. The
/// authentication middleware refreshes a device's entry from the database on every
/// image request, so an assignment change takes effect at the next request.
///
/// A delta base may also be a version the device reported holding at its last check-in
/// (the version it updates from). That list is the device's own claim, so it only widens
/// the bases, never the targets: a device can make the server compute deltas into the at
/// most two versions assigned to it, from versions it claims, and nothing else.
#[derive(Debug, Default)]
pub struct FleetAccess {
    assigned: std::sync::Mutex<std::collections::HashMap<String, tandem_proto::fleet::Assignments>>,
    held: std::sync::Mutex<std::collections::HashMap<String, Vec<tandem_proto::fleet::ImageRef>>>,
}

impl FleetAccess {
    /// Records what `device` may read.
    pub fn set(&self, device: DeviceId, a: tandem_proto::fleet::Assignments) {
        self.assigned
            .lock()
            .expect("access lock poisoned")
            .insert(device.to_string(), a);
    }

    /// Records the versions `device` reported holding (possible delta bases).
    pub fn set_held(&self, device: DeviceId, held: Vec<tandem_proto::fleet::ImageRef>) {
        self.held
            .lock()
            .expect("access lock poisoned")
            .insert(device.to_string(), held);
    }
}

impl images::ImageAccess for FleetAccess {
    fn may_read(&self, caller: &images::Caller, image: &str, version: u64) -> bool {
        match caller {
            images::Caller::Admin => true,
            images::Caller::Device(id) => {
                let map = self.assigned.lock().expect("access lock poisoned");
                map.get(id).is_some_and(|a| {
                    [&a.corporate, &a.personal]
                        .into_iter()
                        .flatten()
                        .any(|r| r.image == image && r.version == version)
                })
            }
        }
    }

    fn may_use_base(&self, caller: &images::Caller, image: &str, version: u64) -> bool {
        if self.may_read(caller, image, version) {
            return true;
        }
        match caller {
            images::Caller::Admin => true,
            images::Caller::Device(id) => {
                let map = self.held.lock().expect("access lock poisoned");
                map.get(id)
                    .is_some_and(|h| h.iter().any(|r| r.image == image && r.version == version))
            }
        }
    }
}

/// An opened server, ready to serve.
#[derive(Debug)]
pub struct Server {
    /// Shared state.
    pub state: AppState,
    /// Set on the first start only: print it once for the administrator.
    pub first_admin_token: Option<AdminToken>,
    /// Escrowed disk keys, sealed.
    pub escrow: keys::EscrowVault,
}

impl Server {
    /// Creates the data directory and keys, opens and migrates the database, and creates
    /// the first admin credential when there is none.
    pub async fn open(config: ServerConfig) -> Result<Server, ServerError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let keys = keys::ServerKeys::load_or_create(&config.data_dir)?;
        let escrow_key = config
            .escrow_key_file
            .clone()
            .unwrap_or_else(|| keys::EscrowVault::default_key_file(&config.data_dir));
        let escrow = keys::EscrowVault::open(&config.data_dir, &escrow_key)?;
        let url = config
            .database
            .clone()
            .unwrap_or_else(|| DatabaseUrl::Sqlite(config.data_dir.join("tandem.db")));
        let db = tandem_db::open(&url).await?;
        tracing::info!(database = %url, backend = db.backend(), "metadata database open");
        let nonces = Arc::new(auth::ReplayGuard::open(db.as_ref()).await?);
        let state = AppState {
            db,
            keys: Arc::new(keys),
            nonces,
            data_dir: config.data_dir,
            access: Arc::new(FleetAccess::default()),
            audit_limiter: Arc::new(auth::AuditLimiter::default()),
            body_gate: Arc::new(auth::BodyGate::default()),
        };
        let first_admin_token = bootstrap_admin(&state).await?;
        Ok(Server {
            state,
            first_admin_token,
            escrow,
        })
    }
}

async fn bootstrap_admin(state: &AppState) -> Result<Option<AdminToken>, ServerError> {
    if state.db.admin_count().await? > 0 {
        return Ok(None);
    }
    match create_admin(state, "admin", "server").await {
        Ok(t) => Ok(Some(t)),
        // Another replica created it first.
        Err(ServerError::Db(tandem_db::DbError::Conflict { .. })) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Creates an admin credential named `name` and returns it (the only time it is shown;
/// the database keeps its hash). `actor` goes into the audit log.
pub async fn create_admin(
    state: &AppState,
    name: &str,
    actor: &str,
) -> Result<AdminToken, ServerError> {
    let token = auth::new_secret("tdm-admin-");
    state
        .db
        .add_admin(name, &auth::hash_secret(&token), now())
        .await?;
    audit(
        state,
        actor,
        "admin.created",
        None,
        None,
        serde_json::json!({"admin": name}),
    )
    .await;
    Ok(AdminToken(token))
}

/// The fleet API. `extra` routes (e.g. image serving) are mounted behind the same
/// authentication.
pub fn router_with(state: AppState, extra: Router) -> Router {
    let authed = Router::new()
        .route("/v1/checkin", post(fleet::checkin))
        .route("/v1/kill-ack", post(fleet::kill_ack))
        .route("/v1/devices/{id}", get(fleet::device_record))
        .route("/v1/admin/whoami", get(admin::whoami))
        .route(
            "/v1/admin/users",
            post(admin::create_user).get(admin::list_users),
        )
        .route("/v1/admin/tokens", post(admin::create_token))
        .route("/v1/admin/tokens/revoke", post(admin::revoke_tokens))
        .route("/v1/admin/admins/{name}", delete(admin::revoke_admin))
        .route("/v1/admin/devices", get(admin::list_devices))
        .route("/v1/admin/devices/{id}/kill", post(admin::kill_device))
        .route("/v1/admin/assign", post(admin::assign))
        .route("/v1/admin/policies", get(admin::list_policies))
        .route("/v1/admin/policies/{name}", put(admin::set_policy))
        .route("/v1/admin/audit", get(admin::read_audit))
        .route("/v1/enroll", post(fleet::enroll))
        .route("/v1/health", get(|| async { "ok" }))
        .route("/v1/keys", get(server_keys))
        .with_state(state.clone());
    authed
        .merge(extra)
        .layer(axum::middleware::from_fn_with_state(
            state,
            auth::authenticate,
        ))
}

/// The fleet API alone.
pub fn router(state: AppState) -> Router {
    router_with(state, Router::new())
}

async fn server_keys(
    axum::extract::State(st): axum::extract::State<AppState>,
) -> axum::Json<tandem_proto::fleet::PinnedKeys> {
    axum::Json(st.keys.pinned())
}

/// Serves `server` on `listener` until `shutdown` resolves.
pub async fn serve(
    server: Server,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let access: Arc<dyn images::ImageAccess> = server.state.access.clone();
    let service = images::ImageService::open(&server.state.data_dir, access)?;
    let backup_svc = backups::BackupService::new(
        &server.state.data_dir,
        service.store().clone(),
        server.escrow.clone(),
    );
    let backups = backups::routes(backups::BackupState {
        svc: backup_svc.clone(),
        app: server.state.clone(),
    });
    let rules = rules::routes(server.state.data_dir.clone());
    let console = console::ConsoleState::new(
        server.state.clone(),
        service.clone(),
        backup_svc,
        console::ConsoleConfig::from_env(),
    );
    let api = images::routes(service)
        .merge(backups)
        .merge(rules)
        .merge(console::api_routes(console.clone()));
    // The console's pages authenticate by session cookie, outside the bearer layer.
    let app = router_with(server.state, api).merge(console::page_routes(console));
    // Peer addresses key the audit rate limit of unauthenticated callers.
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ServerError::Serve)
}

/// Unix seconds now.
pub use tandem_tools::clock::now_secs as now;

/// Appends to the audit log. An audit failure is logged as an error but does not undo
/// the action it describes (which already happened).
pub async fn audit(
    state: &AppState,
    actor: &str,
    action: &str,
    device: Option<DeviceId>,
    reason: Option<String>,
    detail: serde_json::Value,
) {
    let entry = NewAudit {
        at: now(),
        actor: actor.to_string(),
        action: action.to_string(),
        device,
        reason,
        detail,
    };
    if let Err(e) = state.db.append_audit(entry).await {
        tracing::error!(error = %e, action, "audit log write failed");
    }
}
