//! Who is calling: admin bearer credentials and per-request device signatures.
//!
//! Every request except enrollment and the public key list passes [`authenticate`], which
//! puts a [`Caller`] into the request's extensions. Devices sign each request with the
//! key bound at enrollment (`tandem_proto::auth`); the server checks the signature, the
//! time window, that the nonce was not seen before in that window, and the device's
//! current status in the database — a killed device is refused on every request.
//! Admin credentials are random 32-byte tokens stored as BLAKE3 hashes.
//!
//! Nonces are recorded in the database ([`ReplayGuard`]), not in process memory: every
//! replica on one database refuses a request whose nonce any of them saw, and a restart
//! forgets nothing, so there is no "signed before this process started" rule any more.
//! A check-in's nonce goes into the check-in's own transaction ([`CheckinNonce`]), so the
//! hottest request still commits once.
//! Rows are kept [`NONCE_KEEP_SECS`] (twice the skew window) past their request time and
//! pruned on a clock; a replay of a pruned nonce is refused by the time check instead, as
//! long as replicas' clocks are less than `MAX_SKEW_SECS` (300 s) apart. The one request a
//! restart could still admit twice is one accepted by a build that kept nonces in memory
//! only, so requests signed before the database began recording nonces are refused
//! (`stale_request`; this matters only in the minutes after the upgrade).
//!
//! # Device rights
//!
//! What a device may call follows its state, decided in one place: [`capability`] names the
//! right each route needs, [`device_may`] says which rights each state has. Routes not in
//! the table need [`Capability::UserData`], so a new route is closed to kill-pending
//! devices until someone decides otherwise.
//!
//! | state        | check-in | kill-ack | own record | user data (images, backups, escrow, rules) | publishing (`/v1/chunks/missing`, `PUT /v1/chunks/…`) |
//! |--------------|----------|----------|------------|----------------------------------------------|------|
//! | active       | yes      | yes      | yes        | yes                                          | no (admins only) |
//! | kill-pending | yes      | yes      | yes        | no: 403 `kill_pending`, audited              | no |
//! | killed       | no       | no       | no         | no: 403 `device_killed`, audited             | no |

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use tandem_db::{Db, DbError, DeviceRow};
use tandem_proto::auth::{self, RequestSignature};
use tandem_proto::fleet::{DeviceId, DeviceStatus};

use crate::error::ApiError;
use crate::{now, AppState};

/// Largest body a device-signed request may carry (it is hashed before anything else).
pub const MAX_DEVICE_BODY: usize = 8 * 1024 * 1024;
/// Device request bodies buffered at once before their signature is checked: at most
/// `BODY_PERMITS * MAX_DEVICE_BODY` (512 MiB) of memory for unverified bodies.
pub const BODY_PERMITS: usize = 64;
/// How long a device may take to send its body while holding one of those permits.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Bounds the memory of request bodies read before their signature is checked. When every
/// permit is taken a request is refused at once with 503 `busy` (devices retry), rather
/// than queued: a queue would let slow senders hold the memory and everyone's requests.
#[derive(Debug)]
pub struct BodyGate {
    permits: tokio::sync::Semaphore,
}

impl Default for BodyGate {
    fn default() -> Self {
        BodyGate {
            permits: tokio::sync::Semaphore::new(BODY_PERMITS),
        }
    }
}

/// Paths that need no authentication.
const PUBLIC: &[&str] = &["/v1/enroll", "/v1/health", "/v1/keys"];

/// The right a route needs from a device caller (admins hold every right).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// `POST /v1/checkin`: how a kill order reaches the device.
    CheckIn,
    /// `POST /v1/kill-ack`: how a device reports the kill done.
    KillAck,
    /// `GET /v1/devices/{id}`: its own record (the handler refuses other ids).
    OwnRecord,
    /// Anything that reads or writes the user's data: images, chunks, backups, escrow,
    /// rules. The default for every route not named here.
    UserData,
    /// Shared chunk-store writes and dedup queries, used by image publishing: never a
    /// device (it would learn which chunks other users hold, or fill the shared store).
    Publish,
}

/// The right `method path` needs. The single table of device rights.
pub fn capability(method: &axum::http::Method, path: &str) -> Capability {
    use axum::http::Method;
    match path {
        "/v1/checkin" => Capability::CheckIn,
        "/v1/kill-ack" => Capability::KillAck,
        "/v1/chunks/missing" => Capability::Publish,
        p if p.starts_with("/v1/chunks/") && p != "/v1/chunks/fetch" && p != "/v1/chunks/stat" => {
            Capability::Publish
        }
        p if p.starts_with("/v1/devices/") && *method == Method::GET => Capability::OwnRecord,
        _ => Capability::UserData,
    }
}

/// Whether a device in `status` holds `cap`.
pub fn device_may(status: DeviceStatus, cap: Capability) -> bool {
    match (status, cap) {
        (DeviceStatus::Killed, _) | (_, Capability::Publish) => false,
        (DeviceStatus::Active, _) => true,
        (
            DeviceStatus::KillPending,
            Capability::CheckIn | Capability::KillAck | Capability::OwnRecord,
        ) => true,
        (DeviceStatus::KillPending, Capability::UserData) => false,
    }
}

/// The authenticated caller of a request. Image routes and fleet handlers decide what it
/// may read from this alone.
#[derive(Debug, Clone)]
pub enum Caller {
    /// An administrator holding an admin credential.
    Admin {
        /// Credential name (`admin` for the first-start credential).
        name: String,
    },
    /// An enrolled device whose signature verified and which is not killed.
    Device {
        /// Its id.
        id: DeviceId,
        /// Its owner.
        user: String,
    },
}

impl Caller {
    /// The audit log's actor text.
    pub fn actor(&self) -> String {
        match self {
            Caller::Admin { name } => format!("admin:{name}"),
            Caller::Device { id, .. } => format!("device:{id}"),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::Unauthorized {
                code: "unauthenticated",
                message: "this endpoint needs an admin token or a device signature".into(),
            })
    }
}

/// Extractor for admin-only handlers.
#[derive(Debug, Clone)]
pub struct Admin(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, s: &S) -> Result<Self, ApiError> {
        match Caller::from_request_parts(parts, s).await? {
            Caller::Admin { name } => Ok(Admin(name)),
            Caller::Device { .. } => Err(ApiError::Forbidden {
                code: "admin_only",
                message: "this endpoint is for administrators".into(),
            }),
        }
    }
}

/// Extractor for device-only handlers: the device row as read while authenticating.
#[derive(Debug, Clone)]
pub struct Device(pub DeviceRow);

impl<S: Send + Sync> FromRequestParts<S> for Device {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<DeviceRow>()
            .cloned()
            .map(Device)
            .ok_or_else(|| ApiError::Forbidden {
                code: "device_only",
                message: "this endpoint is for enrolled devices".into(),
            })
    }
}

/// How long a nonce is kept past its request time: twice the skew window, so a nonce is
/// still recorded while any replica whose clock is within `MAX_SKEW_SECS` of the pruning
/// replica's could accept its time.
pub const NONCE_KEEP_SECS: u64 = 2 * auth::MAX_SKEW_SECS;
/// A replica prunes old nonces from the database at most this often.
pub const NONCE_PRUNE_SECS: u64 = 60;

/// Replay protection across replicas and restarts. Each verified request's (device,
/// nonce) is recorded in the database with one conflict-free insert (`Db::record_nonce`;
/// a check-in's in the check-in's own transaction, [`CheckinNonce`]), and a nonce recorded
/// already — by any replica — is a replay. Only requests whose signature verified get
/// there, so only enrolled devices can add rows. This guard holds the rest: the time
/// before which requests are refused, and the prune clock — rows older than
/// [`NONCE_KEEP_SECS`] are dropped at most every [`NONCE_PRUNE_SECS`] per replica, off
/// the request path.
///
/// There is no in-memory first filter: every fresh nonce has to be written for the other
/// replicas anyway, and a replay reaches this check only after a database read of the
/// device and a signature check, so a local cache would save little and add state.
#[derive(Debug)]
pub struct ReplayGuard {
    /// When the database began recording nonces: requests signed earlier are refused
    /// (a server keeping nonces in memory only may have accepted them).
    recorded_since: u64,
    /// When this replica last started a prune (unix seconds; 0: never).
    last_prune: AtomicU64,
}

impl ReplayGuard {
    /// The guard for a server on `db`.
    pub async fn open(db: &dyn Db) -> Result<Self, DbError> {
        Ok(ReplayGuard {
            recorded_since: db.nonces_recorded_since().await?,
            last_prune: AtomicU64::new(0),
        })
    }

    /// Drops nonces older than [`NONCE_KEEP_SECS`] in the background when the last prune
    /// of this replica is [`NONCE_PRUNE_SECS`] old (or there was none); the handle of the
    /// started prune.
    pub(crate) fn prune_if_due(
        &self,
        db: &Arc<dyn Db>,
        now: u64,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let last = self.last_prune.load(Ordering::Relaxed);
        if now < last.saturating_add(NONCE_PRUNE_SECS)
            || self
                .last_prune
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        let (db, before) = (db.clone(), now.saturating_sub(NONCE_KEEP_SECS));
        Some(tokio::spawn(async move {
            match db.prune_nonces(before).await {
                Ok(n) => tracing::debug!(pruned = n, before, "old request nonces dropped"),
                Err(e) => tracing::warn!(error = %e, "could not prune old request nonces"),
            }
        }))
    }
}

/// Entries one (action, source) may write to the audit log per [`AUDIT_WINDOW_SECS`].
pub const AUDIT_BURST: u64 = 10;
/// The rate window of [`AuditLimiter`].
pub const AUDIT_WINDOW_SECS: u64 = 60;
/// Distinct (action, source) pairs tracked at once; past it, new sources share one key.
const AUDIT_KEYS: usize = 10_000;

/// Keeps unauthenticated or failing callers from flooding the audit log: per (action,
/// source) at most [`AUDIT_BURST`] entries per window; the rest are counted, and the first
/// entry of the next window carries `suppressed_before` (how many were dropped), so the
/// log still shows that the flood happened and how large it was.
#[derive(Debug, Default)]
pub struct AuditLimiter {
    windows: Mutex<HashMap<(String, String), AuditWindow>>,
}

#[derive(Debug, Clone, Copy)]
struct AuditWindow {
    start: u64,
    written: u64,
    suppressed: u64,
}

impl AuditLimiter {
    /// `Some(suppressed earlier)` when an entry for `action` from `source` may be written
    /// now; `None` when it is only counted.
    pub fn admit(&self, action: &str, source: &str, now: u64) -> Option<u64> {
        let mut w = self.windows.lock().expect("audit limiter lock poisoned");
        if w.len() >= AUDIT_KEYS {
            w.retain(|_, v| now < v.start + AUDIT_WINDOW_SECS || v.suppressed > 0);
        }
        let key = (action.to_string(), source.to_string());
        let source = if w.len() >= AUDIT_KEYS && !w.contains_key(&key) {
            "(many sources)"
        } else {
            source
        };
        let e = w
            .entry((action.to_string(), source.to_string()))
            .or_insert(AuditWindow {
                start: now,
                written: 0,
                suppressed: 0,
            });
        let mut carried = 0;
        if now >= e.start + AUDIT_WINDOW_SECS {
            carried = e.suppressed;
            *e = AuditWindow {
                start: now,
                written: 0,
                suppressed: 0,
            };
        }
        if e.written < AUDIT_BURST {
            e.written += 1;
            Some(carried)
        } else {
            e.suppressed += 1;
            None
        }
    }
}

/// Appends an audit entry for an event a caller can provoke at will (failed signatures,
/// refused enrollments, refused requests), through the rate limit.
pub async fn audit_limited(
    state: &AppState,
    source: &str,
    actor: &str,
    action: &str,
    device: Option<DeviceId>,
    mut detail: serde_json::Value,
) {
    let Some(suppressed) = state.audit_limiter.admit(action, source, now()) else {
        return;
    };
    if suppressed > 0 {
        detail["suppressed_before"] = suppressed.into();
    }
    crate::audit(state, actor, action, device, None, detail).await;
}

/// The network source of a request, when the server records it.
pub fn peer(req: &Request) -> String {
    req.extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn unauthorized(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::Unauthorized {
        code,
        message: message.into(),
    }
}

/// The authentication middleware.
pub async fn authenticate(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if PUBLIC.contains(&req.uri().path()) {
        return Ok(next.run(req).await);
    }
    if let Some(value) = header(&req, "authorization") {
        let token = value.strip_prefix("Bearer ").ok_or_else(|| {
            unauthorized(
                "bad_credential",
                "authorization must be `Bearer <admin token>`",
            )
        })?;
        let hash = hash_secret(token.trim());
        let Some(name) = state.db.admin_by_hash(&hash).await? else {
            return Err(unauthorized("bad_credential", "unknown admin token"));
        };
        let mut req = req;
        req.extensions_mut().insert(Caller::Admin { name });
        req.extensions_mut().insert(crate::images::Caller::Admin);
        return Ok(next.run(req).await);
    }
    if header(&req, auth::HEADER_DEVICE).is_some() {
        let Ok(permit) = state.body_gate.permits.try_acquire() else {
            return Ok(busy());
        };
        let (req, device, deferred) = verify_device(&state, req).await?;
        drop(permit);
        let resp = device_request(&state, req, device, deferred.clone(), next).await;
        if let Some(n) = deferred {
            n.record_if_unsettled(&state).await;
        }
        return resp;
    }
    Err(unauthorized(
        "unauthenticated",
        "this endpoint needs an admin token or a device signature",
    ))
}

/// The rest of a device request once its signature, time and nonce passed (or, for a
/// check-in, once its nonce is left to the check-in's transaction).
async fn device_request(
    state: &AppState,
    req: Request,
    device: DeviceRow,
    deferred: Option<CheckinNonce>,
    next: Next,
) -> Result<Response, ApiError> {
    let cap = capability(req.method(), req.uri().path());
    if !device_may(device.status, cap) {
        return Err(refuse_device(state, &device, cap, req.uri().path()).await);
    }
    let path = req.uri().path();
    if path.starts_with("/v1/images") || path.starts_with("/v1/chunks") {
        let user = state.db.user(&device.user).await?;
        state.access.set(
            device.id,
            tandem_proto::fleet::Assignments {
                corporate: user.as_ref().and_then(|u| u.corporate.clone()),
                personal: user.as_ref().and_then(|u| u.personal.clone()),
            },
        );
        let held = device
            .last_report
            .as_deref()
            .and_then(|r| serde_json::from_str::<tandem_proto::fleet::CheckinRequest>(r).ok())
            .map(|r| r.images)
            .unwrap_or_default();
        state.access.set_held(device.id, held);
    }
    let mut req = req;
    req.extensions_mut()
        .insert(crate::images::Caller::Device(device.id.to_string()));
    req.extensions_mut().insert(Caller::Device {
        id: device.id,
        user: device.user.clone(),
    });
    req.extensions_mut().insert(device);
    if let Some(n) = deferred {
        req.extensions_mut().insert(n);
    }
    Ok(next.run(req).await)
}

/// Checks a device request's signature, time and nonce. A check-in's nonce is not recorded
/// here but returned, for the check-in's own transaction ([`CheckinNonce`]).
async fn verify_device(
    state: &AppState,
    req: Request,
) -> Result<(Request, DeviceRow, Option<CheckinNonce>), ApiError> {
    let missing = |h: &str| unauthorized("bad_signature", format!("missing header {h}"));
    let device: DeviceId = header(&req, auth::HEADER_DEVICE)
        .ok_or_else(|| missing(auth::HEADER_DEVICE))?
        .parse()
        .map_err(|_| unauthorized("bad_signature", "malformed device id"))?;
    let time: u64 = header(&req, auth::HEADER_TIME)
        .ok_or_else(|| missing(auth::HEADER_TIME))?
        .parse()
        .map_err(|_| unauthorized("bad_signature", "malformed request time"))?;
    let nonce = header(&req, auth::HEADER_NONCE)
        .ok_or_else(|| missing(auth::HEADER_NONCE))?
        .to_string();
    if nonce.len() != 32 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(unauthorized(
            "bad_signature",
            "nonce must be 32 hex characters",
        ));
    }
    let signature = header(&req, auth::HEADER_SIGNATURE)
        .ok_or_else(|| missing(auth::HEADER_SIGNATURE))?
        .to_string();
    let now = now();
    if time < state.nonces.recorded_since {
        return Err(unauthorized(
            "stale_request",
            format!(
                "request time {time} is before the server began recording request nonces ({}); sign the request again",
                state.nonces.recorded_since
            ),
        ));
    }
    if time.abs_diff(now) > auth::MAX_SKEW_SECS {
        return Err(unauthorized(
            "stale_request",
            format!(
                "request time {time} is more than {}s from the server's {now}; fix the device clock",
                auth::MAX_SKEW_SECS
            ),
        ));
    }
    let Some(row) = state.db.device(device).await? else {
        return Err(unauthorized(
            "unknown_device",
            "unknown device; enroll it again",
        ));
    };
    let source = peer(&req);
    let defer = req.method() == axum::http::Method::POST && req.uri().path() == CHECKIN_PATH;
    let method = req.method().as_str().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    let (parts, body) = req.into_parts();
    let bytes = tokio::time::timeout(
        BODY_READ_TIMEOUT,
        axum::body::to_bytes(body, MAX_DEVICE_BODY),
    )
    .await
    .map_err(|_| {
        ApiError::BadRequest(format!(
            "request body not received within {}s",
            BODY_READ_TIMEOUT.as_secs()
        ))
    })?
    .map_err(|_| ApiError::TooLarge {
        limit: MAX_DEVICE_BODY,
    })?;
    let sig = RequestSignature {
        device: device.to_string(),
        time,
        nonce: nonce.clone(),
        signature,
    };
    if sig.verify(&row.public_key, &method, &path, &bytes).is_err() {
        tracing::warn!(device = %device, path, "device signature refused");
        auth_failed(state, device, &source, "bad_signature", &path).await;
        return Err(unauthorized(
            "bad_signature",
            "signature does not verify with this device's key",
        ));
    }
    state.nonces.prune_if_due(&state.db, now);
    let req = Request::from_parts(parts, Body::from(bytes));
    if defer {
        let n = CheckinNonce(Arc::new(DeferredNonce {
            nonce: tandem_db::NewNonce {
                device,
                nonce,
                at: time,
            },
            source,
            path,
            settled: AtomicBool::new(false),
        }));
        return Ok((req, row, Some(n)));
    }
    if !state.db.record_nonce(device, &nonce, time).await? {
        return Err(replayed(state, device, &source, &path).await);
    }
    Ok((req, row, None))
}

/// Audits a replayed request and builds its refusal.
async fn replayed(state: &AppState, device: DeviceId, source: &str, path: &str) -> ApiError {
    auth_failed(state, device, source, "replayed", path).await;
    replay_refusal()
}

/// The refusal of a replayed request: 401 `replayed`.
pub fn replay_refusal() -> ApiError {
    unauthorized(
        "replayed",
        "this request was already received (replayed nonce)",
    )
}

/// The route whose nonce is recorded in its own transaction ([`CheckinNonce`]).
const CHECKIN_PATH: &str = "/v1/checkin";

/// A check-in's nonce, left by [`authenticate`] in the request's extensions for the
/// check-in handler to record in the check-in's transaction (`Db::record_checkin`): one
/// commit per check-in, the fleet's hottest request, instead of two. Nothing before that
/// write has effects. If the handler does not settle it (an error before the write, a
/// refused device), [`authenticate`] records it once the handler has returned, so every
/// verified request's nonce is recorded either way.
#[derive(Debug, Clone)]
pub struct CheckinNonce(Arc<DeferredNonce>);

#[derive(Debug)]
struct DeferredNonce {
    nonce: tandem_db::NewNonce,
    source: String,
    path: String,
    settled: AtomicBool,
}

impl CheckinNonce {
    /// The row to write with the check-in.
    pub fn row(&self) -> tandem_db::NewNonce {
        self.0.nonce.clone()
    }

    /// The check-in's transaction committed with the nonce.
    pub fn recorded(&self) {
        self.0.settled.store(true, Ordering::Relaxed);
    }

    /// The check-in's transaction found the nonce recorded already: audits the replay and
    /// returns the refusal.
    pub async fn replayed(&self, state: &AppState) -> ApiError {
        self.0.settled.store(true, Ordering::Relaxed);
        let n = &self.0;
        replayed(state, n.nonce.device, &n.source, &n.path).await
    }

    async fn record_if_unsettled(&self, state: &AppState) {
        if self.0.settled.load(Ordering::Relaxed) {
            return;
        }
        let n = &self.0.nonce;
        if let Err(e) = state.db.record_nonce(n.device, &n.nonce, n.at).await {
            tracing::warn!(device = %n.device, error = %e, "could not record a check-in's nonce");
        }
    }
}

/// 503 `busy`: every body permit is taken; the device retries later.
fn busy() -> Response {
    use axum::response::IntoResponse as _;
    (
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(tandem_proto::api::ApiErrorBody {
            code: "busy".into(),
            message: "the server is receiving too many requests; retry shortly".into(),
            request_id: None,
        }),
    )
        .into_response()
}

/// Audits and builds the refusal of a device that lacks `cap` in its current state.
async fn refuse_device(
    state: &AppState,
    device: &DeviceRow,
    cap: Capability,
    path: &str,
) -> ApiError {
    let (code, why, message) = match (device.status, cap) {
        (DeviceStatus::Killed, _) => (
            "device_killed",
            "killed",
            "this device was killed by an administrator; it is refused for good".to_string(),
        ),
        (_, Capability::Publish) => (
            "admin_only",
            "publish-route",
            "devices do not write or query the shared chunk store; backups use /v1/backups/chunks"
                .to_string(),
        ),
        _ => (
            "kill_pending",
            "kill-pending",
            "an administrator ordered this device killed: it may only check in, acknowledge the kill and read its own record"
                .to_string(),
        ),
    };
    tracing::warn!(device = %device.id, path, why, "device request refused");
    audit_limited(
        state,
        &device.id.to_string(),
        &format!("device:{}", device.id),
        "device.refused",
        Some(device.id),
        serde_json::json!({"why": why, "path": path}),
    )
    .await;
    ApiError::Forbidden { code, message }
}

/// Records a failed authentication of a known device: someone holds its id but not (or
/// no longer a fresh use of) its key.
async fn auth_failed(state: &AppState, device: DeviceId, source: &str, code: &str, path: &str) {
    audit_limited(
        state,
        &format!("{device}@{source}"),
        "server",
        "device.auth-failed",
        Some(device),
        serde_json::json!({"code": code, "path": path, "source": source}),
    )
    .await;
}

/// BLAKE3 of a secret token, hex: what the database stores.
pub fn hash_secret(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// A fresh random secret with a recognisable prefix.
pub fn new_secret(prefix: &str) -> String {
    format!("{prefix}{}", hex::encode(rand::random::<[u8; 32]>()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use tandem_proto::SigningKey;
    use tower::ServiceExt as _;

    /// A server with every route (fleet, images, backups) on a fresh data directory.
    async fn server(dir: &std::path::Path) -> (AppState, axum::Router) {
        let server = crate::Server::open(crate::ServerConfig {
            data_dir: dir.join("srv"),
            database: None,
            escrow_key_file: Some(dir.join("escrow.key")),
        })
        .await
        .expect("open server");
        let access: Arc<dyn crate::images::ImageAccess> = server.state.access.clone();
        let images =
            crate::images::ImageService::open(&server.state.data_dir, access).expect("images");
        let backups = crate::backups::routes(crate::backups::BackupState {
            svc: crate::backups::BackupService::new(
                &server.state.data_dir,
                images.store().clone(),
                server.escrow.clone(),
            ),
            app: server.state.clone(),
        });
        let app = crate::router_with(
            server.state.clone(),
            crate::images::routes(images).merge(backups),
        );
        (server.state, app)
    }

    async fn enroll(state: &AppState, user: &str) -> (DeviceId, SigningKey) {
        let now = now();
        state
            .db
            .create_user(user, "default", now)
            .await
            .expect("user");
        let token = new_secret("tdm-enroll-");
        state
            .db
            .add_enroll_token(&hash_secret(&token), user, now, now + 3600)
            .await
            .expect("token");
        let key = SigningKey::generate();
        let row = DeviceRow::enrolling(DeviceId::generate(), key.public(), "laptop", now);
        state
            .db
            .enroll(&hash_secret(&token), &row, now)
            .await
            .expect("enroll");
        (row.id, key)
    }

    /// Sends `method path` signed as `id`; returns the status and the error code, if any.
    async fn call(
        app: &axum::Router,
        id: DeviceId,
        key: &SigningKey,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> (StatusCode, serde_json::Value) {
        let s = RequestSignature::sign(key, &id.to_string(), method, path, now(), body);
        send(app, &s, method, path, body).await
    }

    /// Sends the request signed as `s` (again, when it was sent before: a replay).
    async fn send(
        app: &axum::Router,
        s: &RequestSignature,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> (StatusCode, serde_json::Value) {
        let req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header(auth::HEADER_DEVICE, &s.device)
            .header(auth::HEADER_TIME, s.time.to_string())
            .header(auth::HEADER_NONCE, &s.nonce)
            .header(auth::HEADER_SIGNATURE, &s.signature)
            .body(Body::from(body.to_vec()))
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
            .await
            .expect("body");
        let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, v)
    }

    fn checkin_body() -> Vec<u8> {
        serde_json::to_vec(&tandem_proto::fleet::CheckinRequest {
            agent_version: "test".into(),
            clock: now(),
            ..Default::default()
        })
        .expect("json")
    }

    /// Issue 12, must-fix 1: while a kill is pending the device may check in (to receive
    /// the kill order), acknowledge it and read its own record — nothing else. Every
    /// refusal is a 403 with its own code and an audit entry. Once killed: nothing.
    #[tokio::test]
    async fn device_rights_follow_its_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (state, app) = server(dir.path()).await;
        let (id, key) = enroll(&state, "alice").await;
        let escrow = serde_json::to_vec(&serde_json::json!({
            "key": "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc="
        }))
        .expect("json");
        let chunk = vec![9u8; 4096];
        let chunk_id = tandem_proto::ChunkId::of(&chunk);
        let chunk_path = format!("/v1/backups/chunks/{chunk_id}");
        let shared_chunk_path = format!("/v1/chunks/{chunk_id}");
        let own = format!("/v1/devices/{id}");
        let user_data: Vec<(&str, &str, Vec<u8>)> = vec![
            ("GET", "/v1/escrow", vec![]),
            ("PUT", "/v1/escrow", escrow.clone()),
            ("PUT", &chunk_path, chunk.clone()),
            (
                "POST",
                "/v1/backups/chunks/missing",
                br#"{"chunks":[]}"#.to_vec(),
            ),
            ("GET", "/v1/backups/latest/head", vec![]),
            ("GET", "/v1/images", vec![]),
            ("GET", "/v1/rules", vec![]),
        ];
        // Active: user data is open to it.
        let (s, _) = call(&app, id, &key, "PUT", "/v1/escrow", &escrow).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let (s, _) = call(&app, id, &key, "GET", "/v1/escrow", &[]).await;
        assert_eq!(s, StatusCode::OK);
        let (s, _) = call(&app, id, &key, "PUT", &chunk_path, &chunk).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        // Never a device: the shared store's upload and dedup query (publishing).
        for (m, p, b) in [
            ("POST", "/v1/chunks/missing", br#"{"chunks":[]}"#.to_vec()),
            ("PUT", shared_chunk_path.as_str(), chunk.clone()),
        ] {
            let (s, body) = call(&app, id, &key, m, p, &b).await;
            assert_eq!(
                (s, body["code"].as_str()),
                (StatusCode::FORBIDDEN, Some("admin_only")),
                "{m} {p}"
            );
        }

        state
            .db
            .order_kill(id, "admin:admin", "stolen", now())
            .await
            .expect("kill");
        for (m, p, b) in &user_data {
            let (s, body) = call(&app, id, &key, m, p, b).await;
            assert_eq!(
                (s, body["code"].as_str()),
                (StatusCode::FORBIDDEN, Some("kill_pending")),
                "{m} {p} must be refused while a kill is pending: {body}"
            );
        }
        let (s, body) = call(&app, id, &key, "POST", "/v1/checkin", &checkin_body()).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let resp: tandem_proto::fleet::CheckinResponse =
            serde_json::from_value(body).expect("check-in response");
        let target: tandem_proto::fleet::TargetState = resp
            .target
            .verify(
                tandem_proto::fleet::KIND_TARGET_STATE,
                &[state.keys.state.public()],
            )
            .expect("signed");
        assert!(target.kill.is_some() && target.lease.is_none());
        let (s, _) = call(&app, id, &key, "GET", &own, &[]).await;
        assert_eq!(s, StatusCode::OK);
        let refused = state
            .db
            .audit(tandem_db::AuditFilter {
                device: Some(id),
                ..Default::default()
            })
            .await
            .expect("audit")
            .into_iter()
            .filter(|e| e.action == "device.refused" && e.detail["why"] == "kill-pending")
            .count();
        assert_eq!(refused, user_data.len(), "every refusal is audited");

        // Killed: nothing, not even check-in or its own record.
        state
            .db
            .complete_kill(id, "{}", now())
            .await
            .expect("complete");
        for (m, p, b) in [
            ("POST", "/v1/checkin", checkin_body()),
            ("GET", own.as_str(), vec![]),
            ("GET", "/v1/escrow", vec![]),
        ] {
            let (s, body) = call(&app, id, &key, m, p, &b).await;
            assert_eq!(
                (s, body["code"].as_str()),
                (StatusCode::FORBIDDEN, Some("device_killed")),
                "{m} {p}"
            );
        }
    }

    /// Should-fix: while every body permit is taken, a device request is refused with 503
    /// before its body is read (bounded memory for unverified bodies); once one is free,
    /// the same kind of request goes through.
    #[tokio::test]
    async fn unverified_bodies_are_capped_and_refused_when_the_cap_is_reached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (state, app) = server(dir.path()).await;
        let (id, key) = enroll(&state, "carol").await;
        let held = state
            .body_gate
            .permits
            .try_acquire_many(BODY_PERMITS as u32)
            .expect("all permits");
        let (s, body) = call(&app, id, &key, "POST", "/v1/checkin", &checkin_body()).await;
        assert_eq!(
            (s, body["code"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("busy")),
            "{body}"
        );
        drop(held);
        let (s, body) = call(&app, id, &key, "POST", "/v1/checkin", &checkin_body()).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(
            state.body_gate.permits.available_permits(),
            BODY_PERMITS,
            "permits come back"
        );
    }

    /// A replica: the fleet routes on `data` (keys shared through it, as a shared volume
    /// would) and on `database` (`None`: the SQLite file in `data`).
    async fn replica(
        data: &std::path::Path,
        database: Option<tandem_db::DatabaseUrl>,
    ) -> (AppState, axum::Router) {
        let server = crate::Server::open(crate::ServerConfig {
            data_dir: data.join("srv"),
            database,
            escrow_key_file: Some(data.join("escrow.key")),
        })
        .await
        .expect("open replica");
        let app = crate::router(server.state.clone());
        (server.state, app)
    }

    /// The PostgreSQL database for a test, or `None` to skip (see `tandem_db::scratch`).
    async fn postgres() -> Option<tandem_db::DatabaseUrl> {
        let server = tandem_db::scratch::test_server()?;
        Some(
            tandem_db::scratch::create(&server)
                .await
                .expect("scratch database"),
        )
    }

    fn is_replay(r: &(StatusCode, serde_json::Value)) -> bool {
        r.0 == StatusCode::UNAUTHORIZED && r.1["code"] == "replayed"
    }

    /// Two replicas on one database: a request signed once is accepted by the first that
    /// receives it and refused as a replay by the other, in both directions, for a
    /// check-in and for a plain read.
    async fn replicas_share_replay_protection(database: Option<tandem_db::DatabaseUrl>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a_state, a) = replica(dir.path(), database.clone()).await;
        let (b_state, b) = replica(dir.path(), database).await;
        let (id, key) = enroll(&a_state, "dora").await;
        let own = format!("/v1/devices/{id}");
        let checkin = checkin_body();
        let requests: [(&str, &str, &[u8]); 2] =
            [("POST", "/v1/checkin", &checkin), ("GET", &own, &[])];
        for (m, p, body) in requests {
            for (first, second, dir) in [(&a, &b, "A then B"), (&b, &a, "B then A")] {
                let s = RequestSignature::sign(&key, &id.to_string(), m, p, now(), body);
                let r = send(first, &s, m, p, body).await;
                assert_eq!(r.0, StatusCode::OK, "{m} {p} {dir}: {}", r.1);
                let r = send(second, &s, m, p, body).await;
                assert!(is_replay(&r), "{m} {p} {dir}: {r:?}");
                let r = send(first, &s, m, p, body).await;
                assert!(is_replay(&r), "{m} {p} {dir}, back on the first: {r:?}");
            }
        }
        // Every replay was audited as one, whichever replica refused it.
        let replays = b_state
            .db
            .audit(tandem_db::AuditFilter {
                device: Some(id),
                ..Default::default()
            })
            .await
            .expect("audit")
            .into_iter()
            .filter(|e| e.action == "device.auth-failed" && e.detail["code"] == "replayed")
            .count();
        assert_eq!(replays, 8);
    }

    #[tokio::test]
    async fn a_request_accepted_by_one_replica_is_refused_by_another_on_sqlite() {
        replicas_share_replay_protection(None).await;
    }

    #[tokio::test]
    async fn a_request_accepted_by_one_replica_is_refused_by_another_on_postgres() {
        let Some(url) = postgres().await else { return };
        replicas_share_replay_protection(Some(url)).await;
    }

    /// A check-in's nonce is recorded in the check-in's transaction; one refused before
    /// that write (here: a malformed body) still has its nonce recorded afterwards. (Its
    /// replay fails the same way before reaching the nonce, with no effect either.)
    #[tokio::test]
    async fn a_check_in_failing_before_its_write_still_records_its_nonce() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (state, app) = server(dir.path()).await;
        let (id, key) = enroll(&state, "fred").await;
        let (m, p, body) = ("POST", "/v1/checkin", b"{not json".as_slice());
        let s = RequestSignature::sign(&key, &id.to_string(), m, p, now(), body);
        let r = send(&app, &s, m, p, body).await;
        assert_eq!(r.0, StatusCode::BAD_REQUEST, "{}", r.1);
        let fresh = state.db.record_nonce(id, &s.nonce, s.time).await;
        assert!(!fresh.expect("record"), "the nonce was recorded");
    }

    /// A server restarted on the same database refuses a replay of a request its previous
    /// process accepted: the nonces outlive the process.
    async fn restarts_keep_replay_protection(database: Option<tandem_db::DatabaseUrl>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (state, app) = replica(dir.path(), database.clone()).await;
        let (id, key) = enroll(&state, "erin").await;
        let body = checkin_body();
        let s = RequestSignature::sign(&key, &id.to_string(), "POST", "/v1/checkin", now(), &body);
        let r = send(&app, &s, "POST", "/v1/checkin", &body).await;
        assert_eq!(r.0, StatusCode::OK, "{}", r.1);
        // Signed before the restart, sent after it.
        let (m, p) = ("GET", format!("/v1/devices/{id}"));
        let early = RequestSignature::sign(&key, &id.to_string(), m, &p, now(), &[]);
        drop((state, app));
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let (_state, app) = replica(dir.path(), database).await;
        let r = send(&app, &s, "POST", "/v1/checkin", &body).await;
        assert!(is_replay(&r), "after the restart: {r:?}");
        // There is no "signed before this process started" rule any more: a request
        // signed before the restart and never sent is accepted.
        let r = send(&app, &early, m, &p, &[]).await;
        assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    }

    #[tokio::test]
    async fn a_restarted_server_refuses_replays_of_requests_accepted_before_on_sqlite() {
        restarts_keep_replay_protection(None).await;
    }

    #[tokio::test]
    async fn a_restarted_server_refuses_replays_of_requests_accepted_before_on_postgres() {
        let Some(url) = postgres().await else { return };
        restarts_keep_replay_protection(Some(url)).await;
    }

    /// A request signed before the database began recording nonces (an older server may
    /// have accepted it with its nonce in memory only) is refused as stale.
    #[tokio::test]
    async fn requests_signed_before_nonces_were_recorded_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (state, app) = server(dir.path()).await;
        let (id, key) = enroll(&state, "bob").await;
        let body = checkin_body();
        let s = RequestSignature::sign(
            &key,
            &id.to_string(),
            "POST",
            "/v1/checkin",
            state.nonces.recorded_since - 1,
            &body,
        );
        let (status, v) = send(&app, &s, "POST", "/v1/checkin", &body).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("stale_request")),
            "{v}"
        );
    }

    /// Old nonces are pruned on a clock (at most once a minute per replica), by request
    /// time, keeping twice the skew window.
    #[tokio::test]
    async fn old_nonces_are_pruned_at_most_once_a_minute() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (state, _app) = server(dir.path()).await;
        let (db, guard, d) = (&state.db, &state.nonces, DeviceId::generate());
        let t = 1_000_000;
        assert!(db.record_nonce(d, "n1", t).await.expect("record"));
        // The first call starts a prune (nothing this old yet) and the minute's clock.
        let p = guard.prune_if_due(db, t).expect("first prune");
        p.await.expect("prune");
        assert!(guard.prune_if_due(db, t + NONCE_PRUNE_SECS - 1).is_none());
        assert!(!db.record_nonce(d, "n1", t).await.expect("record"), "kept");
        // A prune a minute later keeps the nonce: it is inside twice the window.
        let p = guard.prune_if_due(db, t + NONCE_PRUNE_SECS).expect("due");
        p.await.expect("prune");
        assert!(!db.record_nonce(d, "n1", t).await.expect("record"), "kept");
        // Past twice the window it goes (a replay would now fail the time check).
        let p = guard
            .prune_if_due(db, t + NONCE_KEEP_SECS + 1)
            .expect("due");
        p.await.expect("prune");
        assert!(db.record_nonce(d, "n1", t).await.expect("record"), "pruned");
    }

    /// Should-fix: a flood of failures from one source writes a bounded number of audit
    /// entries per window, and the next window says how many were dropped; another source
    /// is not starved by it.
    #[test]
    fn audit_floods_are_limited_per_source_and_aggregated() {
        let l = AuditLimiter::default();
        let t = 1_000;
        let written = (0..1000)
            .filter(|_| l.admit("enroll.refused", "10.0.0.1", t).is_some())
            .count() as u64;
        assert_eq!(written, AUDIT_BURST);
        assert_eq!(l.admit("enroll.refused", "10.0.0.2", t), Some(0));
        assert_eq!(
            l.admit("enroll.refused", "10.0.0.1", t + AUDIT_WINDOW_SECS),
            Some(1000 - AUDIT_BURST),
            "the next window reports what was suppressed"
        );
        assert_eq!(
            l.admit("enroll.refused", "10.0.0.1", t + AUDIT_WINDOW_SECS),
            Some(0)
        );
    }
}
