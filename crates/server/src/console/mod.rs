//! The admin console: server-rendered HTML pages under `/console/`, for running the fleet
//! from a browser without JavaScript.
//!
//! The console is a view. Every page reads through the same functions as the JSON API
//! routes the CLI uses (`crate::admin`, `crate::backups`, and the console's own additions in
//! [`api`], which are JSON routes too), and every action calls the same handler the CLI's
//! request reaches; nothing here writes the database or the audit log on its own except the
//! session table and the sign-in/sign-out events.
//!
//! Security model:
//! - Sign-in takes an admin credential (the same tokens `tandem admin` uses). The server
//!   stores only the BLAKE3 hash of a 32-byte random session id; the browser holds the id
//!   in the cookie `tandem_console` (`HttpOnly`, `SameSite=Strict`, `Path=/console`, a
//!   `Max-Age` equal to the session's lifetime, and `Secure` when the request came over
//!   TLS — see [`CookieSecurity`]). Sessions live in the metadata database, so replicas
//!   behind a load balancer share them, and end at a fixed time (`TANDEM_CONSOLE_SESSION_SECS`,
//!   default eight hours) or at sign-out.
//! - Every form carries the session's CSRF token (a second random value, compared in
//!   constant time); the sign-in form carries a one-time token tied to a short-lived
//!   cookie. A POST without the right token changes nothing and is audited.
//! - A page asked for without a valid session (missing, expired, unknown or forged cookie)
//!   redirects to the sign-in page; a session from another server's database is unknown
//!   here.
//! - Pages are sent with `Cache-Control: no-store`, a `Content-Security-Policy` that allows
//!   no script at all, and `X-Frame-Options: DENY`.
//! - Every action is audited with the admin's name by the handler it calls, exactly as the
//!   CLI's are; sign-in, sign-in refusals, sign-out and CSRF refusals are audited here.

pub mod api;
mod pages;
mod session;
mod view;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

use crate::backups::BackupService;
use crate::images::ImageService;
use crate::AppState;

pub use session::{CookieSecurity, COOKIE, LOGIN_COOKIE};

/// Default session lifetime.
pub const DEFAULT_SESSION_SECS: u64 = 8 * 3600;

/// How the console is configured, from the environment of `tandem server`.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// Session lifetime (`TANDEM_CONSOLE_SESSION_SECS`).
    pub session_secs: u64,
    /// When cookies are `Secure` (`TANDEM_CONSOLE_SECURE_COOKIE`).
    pub secure: CookieSecurity,
}

impl ConsoleConfig {
    /// Reads `TANDEM_CONSOLE_SESSION_SECS` (1 to 30 days in seconds) and
    /// `TANDEM_CONSOLE_SECURE_COOKIE` (`auto`, `always`, `never`). A bad value is logged
    /// and the default kept.
    pub fn from_env() -> ConsoleConfig {
        let mut c = ConsoleConfig {
            session_secs: DEFAULT_SESSION_SECS,
            secure: CookieSecurity::Auto,
        };
        if let Ok(v) = std::env::var("TANDEM_CONSOLE_SESSION_SECS") {
            match v.trim().parse::<u64>() {
                Ok(n) if (1..=30 * 86_400).contains(&n) => c.session_secs = n,
                _ => tracing::warn!(
                    value = v,
                    "TANDEM_CONSOLE_SESSION_SECS must be 1 to 2592000; using the default"
                ),
            }
        }
        if let Ok(v) = std::env::var("TANDEM_CONSOLE_SECURE_COOKIE") {
            match v.trim() {
                "auto" => c.secure = CookieSecurity::Auto,
                "always" => c.secure = CookieSecurity::Always,
                "never" => c.secure = CookieSecurity::Never,
                _ => tracing::warn!(
                    value = v,
                    "TANDEM_CONSOLE_SECURE_COOKIE must be auto, always or never; using auto"
                ),
            }
        }
        c
    }
}

/// What the console's pages and its JSON routes share.
#[derive(Clone)]
pub struct ConsoleState {
    /// Fleet state (database, keys, audit).
    pub app: AppState,
    /// Image catalog and chunk store.
    pub images: Arc<ImageService>,
    /// Backup records.
    pub backups: Arc<BackupService>,
    /// Sessions and cookies.
    pub config: ConsoleConfig,
    /// Per-version storage figures (versions never change once published).
    pub version_stats: Arc<api::StatsCache>,
}

impl std::fmt::Debug for ConsoleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleState")
            .field("config", &self.config)
            .finish()
    }
}

impl ConsoleState {
    /// The console over a server's state and services.
    pub fn new(
        app: AppState,
        images: Arc<ImageService>,
        backups: Arc<BackupService>,
        config: ConsoleConfig,
    ) -> ConsoleState {
        ConsoleState {
            app,
            images,
            backups,
            config,
            version_stats: Default::default(),
        }
    }
}

/// The HTML pages and form actions under `/console`. Mount these outside the bearer
/// authentication: the console authenticates by its session cookie.
pub fn page_routes(st: ConsoleState) -> Router {
    Router::new()
        .route("/console", get(pages::overview))
        .route("/console/", get(pages::overview))
        .route("/console/style.css", get(view::stylesheet))
        .route(
            "/console/login",
            get(session::login_page).post(session::login),
        )
        .route("/console/logout", post(session::logout))
        .route("/console/devices", get(pages::devices))
        .route("/console/devices/{id}", get(pages::device))
        .route("/console/devices/{id}/kill", post(pages::kill))
        .route("/console/devices/{id}/replace", post(pages::replace))
        .route("/console/users", get(pages::users))
        .route("/console/users/{name}/assign", post(pages::assign_user))
        .route("/console/policies", get(pages::policies))
        .route("/console/policies/{name}", post(pages::set_policy))
        .route("/console/images", get(pages::images))
        .route(
            "/console/images/{name}/{version}/assign",
            post(pages::assign_version),
        )
        .route("/console/backups", get(pages::backups))
        .route("/console/audit", get(pages::audit))
        .layer(axum::middleware::from_fn(view::page_headers))
        .with_state(st)
}

/// The console's JSON routes (for the CLI and scripts); mount them behind the bearer
/// authentication with the rest of the admin API.
pub fn api_routes(st: ConsoleState) -> Router {
    Router::new()
        .route("/v1/admin/overview", get(api::overview_route))
        .route("/v1/admin/devices/search", get(api::search_devices_route))
        .route(
            "/v1/admin/devices/{id}/detail",
            get(api::device_detail_route),
        )
        .route("/v1/admin/audit/search", get(api::audit_search_route))
        .route("/v1/admin/images/detail", get(api::image_details_route))
        .with_state(st)
}
