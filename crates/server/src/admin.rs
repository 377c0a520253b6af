//! Admin endpoints under `/v1/admin/`: users, enrollment tokens, devices, assignments,
//! policies, kill, audit. Every change is written to the audit log with its actor.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::Json;
use tandem_db::{AuditFilter, UserRow};
use tandem_proto::fleet::{
    Assign, AuditEntry, CreateToken, CreateUser, DeviceId, DeviceInfo, KillRequest, PolicyInfo,
    SetPolicy, TokenCreated, UserInfo,
};

use crate::auth::Admin;
use crate::error::{parse_json, ApiError, InternalError};
use crate::fleet::device_info;
use crate::{audit, now, AppState};

const MAX_ADMIN_BODY: usize = 64 * 1024;
const MAX_NAME: usize = 128;
/// Default and longest lifetime of an enrollment token.
const TOKEN_TTL_DEFAULT: u64 = 3600;
const TOKEN_TTL_MAX: u64 = 7 * 86_400;

fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{what} name {name:?} must be 1 to {MAX_NAME} characters of a-z, 0-9, - _ . @"
        )))
    }
}

fn user_info(u: &UserRow) -> UserInfo {
    UserInfo {
        name: u.name.clone(),
        policy: u.policy.clone(),
        assignments: tandem_proto::fleet::Assignments {
            corporate: u.corporate.clone(),
            personal: u.personal.clone(),
        },
        created_at: u.created_at,
    }
}

/// `GET /v1/admin/whoami`.
pub async fn whoami(Admin(name): Admin) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "admin": name }))
}

/// `POST /v1/admin/users`.
pub async fn create_user(
    State(st): State<AppState>,
    Admin(admin): Admin,
    body: Bytes,
) -> Result<Json<UserInfo>, ApiError> {
    let req: CreateUser = parse_json(&body, MAX_ADMIN_BODY)?;
    check_name("user", &req.name)?;
    let policy = req.policy.unwrap_or_else(|| "default".into());
    if st.db.policy(&policy).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "policy {policy} not found; create it with `tandem admin policy set {policy}`"
        )));
    }
    let now = now();
    st.db.create_user(&req.name, &policy, now).await?;
    audit(
        &st,
        &format!("admin:{admin}"),
        "user.created",
        None,
        None,
        serde_json::json!({"user": req.name, "policy": policy}),
    )
    .await;
    let row = st
        .db
        .user(&req.name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("user {}", req.name)))?;
    Ok(Json(user_info(&row)))
}

/// `GET /v1/admin/users`.
pub async fn list_users(
    State(st): State<AppState>,
    _: Admin,
) -> Result<Json<Vec<UserInfo>>, ApiError> {
    Ok(Json(st.db.users().await?.iter().map(user_info).collect()))
}

/// `POST /v1/admin/tokens`.
pub async fn create_token(
    State(st): State<AppState>,
    Admin(admin): Admin,
    body: Bytes,
) -> Result<Json<TokenCreated>, ApiError> {
    let req: CreateToken = parse_json(&body, MAX_ADMIN_BODY)?;
    let ttl = req.ttl_secs.unwrap_or(TOKEN_TTL_DEFAULT);
    if ttl == 0 || ttl > TOKEN_TTL_MAX {
        return Err(ApiError::BadRequest(format!(
            "token lifetime must be 1 to {TOKEN_TTL_MAX} seconds"
        )));
    }
    if st.db.user(&req.user).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "user {} not found; create it with `tandem admin user create {}`",
            req.user, req.user
        )));
    }
    let token = crate::auth::new_secret("tdm-enroll-");
    let now = now();
    let expires_at = now + ttl;
    st.db
        .add_enroll_token(
            &crate::auth::hash_secret(&token),
            &req.user,
            now,
            expires_at,
        )
        .await?;
    audit(
        &st,
        &format!("admin:{admin}"),
        "token.created",
        None,
        None,
        serde_json::json!({"user": req.user, "expires_at": expires_at}),
    )
    .await;
    Ok(Json(TokenCreated {
        token,
        user: req.user,
        expires_at,
    }))
}

/// `POST /v1/admin/tokens/revoke`: ends every unused enrollment token of a user (a token
/// sent to the wrong person, a laptop that will not be enrolled after all).
pub async fn revoke_tokens(
    State(st): State<AppState>,
    Admin(admin): Admin,
    body: Bytes,
) -> Result<Json<tandem_proto::fleet::TokensRevoked>, ApiError> {
    let req: tandem_proto::fleet::RevokeTokens = parse_json(&body, MAX_ADMIN_BODY)?;
    let revoked = st.db.revoke_enroll_tokens(&req.user, now()).await?;
    audit(
        &st,
        &format!("admin:{admin}"),
        "token.revoked",
        None,
        req.reason.clone(),
        serde_json::json!({"user": req.user, "revoked": revoked}),
    )
    .await;
    Ok(Json(tandem_proto::fleet::TokensRevoked {
        user: req.user,
        revoked,
    }))
}

/// `DELETE /v1/admin/admins/{name}`: revokes an admin credential at once (the next request
/// with it is refused). The last credential cannot be revoked.
pub async fn revoke_admin(
    State(st): State<AppState>,
    Admin(admin): Admin,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_name("admin", &name)?;
    st.db.revoke_admin(&name).await?;
    tracing::warn!(admin = name, by = admin, "admin credential revoked");
    audit(
        &st,
        &format!("admin:{admin}"),
        "admin.revoked",
        None,
        None,
        serde_json::json!({"admin": name}),
    )
    .await;
    Ok(Json(serde_json::json!({ "revoked": name })))
}

/// `GET /v1/admin/devices`.
pub async fn list_devices(
    State(st): State<AppState>,
    _: Admin,
) -> Result<Json<Vec<DeviceInfo>>, ApiError> {
    let now = now();
    Ok(Json(
        st.db
            .devices()
            .await?
            .iter()
            .map(|d| device_info(d, now))
            .collect(),
    ))
}

fn parse_device(id: &str) -> Result<DeviceId, ApiError> {
    id.parse()
        .map_err(|_| ApiError::BadRequest(format!("malformed device id {id:?}")))
}

/// `POST /v1/admin/devices/{id}/kill`.
pub async fn kill_device(
    State(st): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<DeviceInfo>, ApiError> {
    let id = parse_device(&id)?;
    let req: KillRequest = parse_json(&body, MAX_ADMIN_BODY)?;
    if req.reason.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "a kill needs a reason (--reason)".into(),
        ));
    }
    let actor = format!("admin:{admin}");
    let now = now();
    st.db.order_kill(id, &actor, &req.reason, now).await?;
    tracing::warn!(device = %id, actor, "kill ordered");
    audit(
        &st,
        &actor,
        "device.kill-ordered",
        Some(id),
        Some(req.reason.clone()),
        serde_json::json!({}),
    )
    .await;
    let row = st
        .db
        .device(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("device {id} not found")))?;
    Ok(Json(device_info(&row, now)))
}

/// `POST /v1/admin/assign`.
pub async fn assign(
    State(st): State<AppState>,
    Admin(admin): Admin,
    body: Bytes,
) -> Result<Json<UserInfo>, ApiError> {
    let req: Assign = parse_json(&body, MAX_ADMIN_BODY)?;
    let mut row = st
        .db
        .user(&req.user)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("user {} not found", req.user)))?;
    // Only published versions can be assigned: a typo must not leave a device waiting
    // for an image that never comes.
    let catalog = tandem_sync::Catalog::new(&st.data_dir.join("images"));
    for r in [&req.corporate, &req.personal].into_iter().flatten() {
        let versions = catalog
            .versions(&r.image)
            .map_err(|e| ApiError::BadRequest(format!("image {}: {e}", r.image)))?;
        if !versions.contains(&r.version) {
            return Err(ApiError::NotFound(format!(
                "image {r} is not published (published versions: {versions:?}); publish it with `tandem image publish`"
            )));
        }
    }
    if let Some(p) = &req.policy {
        if st.db.policy(p).await?.is_none() {
            return Err(ApiError::NotFound(format!("policy {p} not found")));
        }
        row.policy = p.clone();
    }
    if req.corporate.is_some() {
        row.corporate = req.corporate.clone();
    }
    if req.personal.is_some() {
        row.personal = req.personal.clone();
    }
    st.db.update_user(&row).await?;
    audit(
        &st,
        &format!("admin:{admin}"),
        "user.assigned",
        None,
        req.reason.clone(),
        serde_json::json!({
            "user": row.name, "policy": row.policy,
            "corporate": row.corporate, "personal": row.personal,
        }),
    )
    .await;
    Ok(Json(user_info(&row)))
}

/// `PUT /v1/admin/policies/{name}`.
pub async fn set_policy(
    State(st): State<AppState>,
    Admin(admin): Admin,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<PolicyInfo>, ApiError> {
    check_name("policy", &name)?;
    let req: SetPolicy = parse_json(&body, MAX_ADMIN_BODY)?;
    if req.policy.lease_days == 0 || req.policy.lease_days > 365 {
        return Err(ApiError::BadRequest("lease days must be 1 to 365".into()));
    }
    if req.policy.checkin_interval_mins == 0 {
        return Err(ApiError::BadRequest(
            "check-in interval must be at least 1 minute".into(),
        ));
    }
    let json = serde_json::to_string(&req.policy).expect("serializing plain data cannot fail");
    st.db.put_policy(&name, &json, now()).await?;
    audit(
        &st,
        &format!("admin:{admin}"),
        "policy.set",
        None,
        req.reason.clone(),
        serde_json::json!({"policy": name, "content": req.policy}),
    )
    .await;
    Ok(Json(PolicyInfo {
        name,
        policy: req.policy,
    }))
}

/// `GET /v1/admin/policies`.
pub async fn list_policies(
    State(st): State<AppState>,
    _: Admin,
) -> Result<Json<Vec<PolicyInfo>>, ApiError> {
    let mut out = Vec::new();
    for (name, json) in st.db.policies().await? {
        let policy = serde_json::from_str(&json).map_err(|source| {
            ApiError::Internal(InternalError::Stored {
                what: "policy",
                source,
            })
        })?;
        out.push(PolicyInfo { name, policy });
    }
    Ok(Json(out))
}

/// Query of `GET /v1/admin/audit`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    device: Option<String>,
    since: Option<u64>,
    limit: Option<u32>,
}

/// `GET /v1/admin/audit`.
pub async fn read_audit(
    State(st): State<AppState>,
    _: Admin,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    let device = q.device.as_deref().map(parse_device).transpose()?;
    Ok(Json(
        st.db
            .audit(AuditFilter {
                device,
                since: q.since,
                limit: q.limit,
            })
            .await?,
    ))
}
