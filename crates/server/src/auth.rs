//! Who is calling: admin bearer credentials and per-request device signatures.
//!
//! Every request except enrollment and the public key list passes [`authenticate`], which
//! puts a [`Caller`] into the request's extensions. Devices sign each request with the
//! key bound at enrollment (`tandem_proto::auth`); the server checks the signature, the
//! time window, that the nonce was not seen before in that window, and the device's
//! current status in the database — a killed device is refused on every request.
//! Admin credentials are random 32-byte tokens stored as BLAKE3 hashes.
//!
//! The nonce cache is per process: with several replicas behind a load balancer a replay
//! could land on another replica within the skew window. Each replay can only repeat the
//! exact same signed request (same method, path and body), never forge a new one.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use tandem_db::DeviceRow;
use tandem_proto::auth::{self, RequestSignature};
use tandem_proto::fleet::{DeviceId, DeviceStatus};

use crate::error::ApiError;
use crate::{now, AppState};

/// Largest body a device-signed request may carry (it is hashed before anything else).
pub const MAX_DEVICE_BODY: usize = 8 * 1024 * 1024;

/// Paths that need no authentication.
const PUBLIC: &[&str] = &["/v1/enroll", "/v1/health", "/v1/keys"];

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

/// Remembers recent nonces per device so a captured request cannot be replayed. Only
/// requests whose signature verified reach it, so only enrolled devices can fill it;
/// entries older than twice the skew window are dropped at most once a minute.
#[derive(Debug, Default)]
pub struct NonceCache {
    inner: Mutex<Nonces>,
}

#[derive(Debug, Default)]
struct Nonces {
    seen: HashMap<(DeviceId, String), u64>,
    last_prune: u64,
}

impl NonceCache {
    /// Records a nonce; false when it was seen within the window.
    fn insert(&self, device: DeviceId, nonce: &str, time: u64, now: u64) -> bool {
        let mut n = self.inner.lock().expect("nonce cache lock poisoned");
        if now >= n.last_prune + 60 {
            let horizon = now.saturating_sub(2 * auth::MAX_SKEW_SECS);
            n.seen.retain(|_, t| *t >= horizon);
            n.last_prune = now;
        }
        n.seen.insert((device, nonce.to_string()), time).is_none()
    }
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
        let (req, device) = verify_device(&state, req).await?;
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
        }
        let mut req = req;
        req.extensions_mut()
            .insert(crate::images::Caller::Device(device.id.to_string()));
        req.extensions_mut().insert(Caller::Device {
            id: device.id,
            user: device.user.clone(),
        });
        req.extensions_mut().insert(device);
        return Ok(next.run(req).await);
    }
    Err(unauthorized(
        "unauthenticated",
        "this endpoint needs an admin token or a device signature",
    ))
}

async fn verify_device(state: &AppState, req: Request) -> Result<(Request, DeviceRow), ApiError> {
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
    let method = req.method().as_str().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_DEVICE_BODY)
        .await
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
        auth_failed(state, device, "bad_signature", &path).await;
        return Err(unauthorized(
            "bad_signature",
            "signature does not verify with this device's key",
        ));
    }
    if !state.nonces.insert(device, &nonce, time, now) {
        auth_failed(state, device, "replayed", &path).await;
        return Err(unauthorized(
            "replayed",
            "this request was already received (replayed nonce)",
        ));
    }
    if row.status == DeviceStatus::Killed {
        crate::audit(
            state,
            &format!("device:{device}"),
            "device.refused",
            Some(device),
            None,
            serde_json::json!({"why": "killed", "path": path}),
        )
        .await;
        return Err(ApiError::Forbidden {
            code: "device_killed",
            message: "this device was killed by an administrator; it is refused for good".into(),
        });
    }
    Ok((Request::from_parts(parts, Body::from(bytes)), row))
}

/// Records a failed authentication of a known device: someone holds its id but not (or
/// no longer a fresh use of) its key.
async fn auth_failed(state: &AppState, device: DeviceId, code: &str, path: &str) {
    crate::audit(
        state,
        "server",
        "device.auth-failed",
        Some(device),
        None,
        serde_json::json!({"code": code, "path": path}),
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

    #[test]
    fn nonces_are_single_use_per_device_and_expire_after_the_window() {
        let c = NonceCache::default();
        let (a, b) = (DeviceId::generate(), DeviceId::generate());
        assert!(c.insert(a, "n1", 1000, 1000));
        assert!(!c.insert(a, "n1", 1000, 1001), "replay refused");
        assert!(
            c.insert(b, "n1", 1000, 1001),
            "another device's nonce is its own"
        );
        // Long after the window the entry is pruned (a replay would then be refused
        // by the time check instead).
        let later = 1000 + 2 * auth::MAX_SKEW_SECS + 61;
        assert!(c.insert(a, "n2", later, later));
        assert_eq!(c.inner.lock().expect("lock").seen.len(), 1);
    }
}
