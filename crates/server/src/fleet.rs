//! Device endpoints: enrollment, check-in with the signed target state, kill
//! acknowledgement, and a device's own record.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::Json;
use tandem_db::{CheckinOutcome, DeviceRow};
use tandem_proto::fleet::{
    self, CheckinRequest, CheckinResponse, DeviceId, DeviceInfo, DeviceStatus, EnrollRequest,
    EnrollResponse, KillAck, KillAckRequest, KillOrder, Lease, Policy, TargetState,
};

use crate::auth::{Caller, CheckinNonce, Device};
use crate::error::{parse_json, ApiError, InternalError};
use crate::{audit, now, AppState};

const MAX_HOSTNAME: usize = 255;

/// `POST /v1/enroll`.
#[tracing::instrument(skip_all)]
pub async fn enroll(
    State(st): State<AppState>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    body: Bytes,
) -> Result<Json<EnrollResponse>, ApiError> {
    let source = peer
        .map(|p| p.0 .0.ip().to_string())
        .unwrap_or_else(|| "unknown".into());
    let req: EnrollRequest = parse_json(&body, fleet::MAX_CHECKIN_BODY)?;
    if req.hostname.is_empty() || req.hostname.len() > MAX_HOSTNAME {
        return Err(ApiError::BadRequest(format!(
            "hostname must be 1 to {MAX_HOSTNAME} bytes"
        )));
    }
    let now = now();
    let row = DeviceRow::enrolling(
        DeviceId::generate(),
        req.device_key.clone(),
        &req.hostname,
        now,
    );
    let user = match st
        .db
        .enroll(&crate::auth::hash_secret(&req.token), &row, now)
        .await
    {
        Ok(user) => user,
        Err(tandem_db::DbError::Token(why)) => {
            // Anyone can send these: rate-limited per source address.
            crate::auth::audit_limited(
                &st,
                &source,
                "server",
                "enroll.refused",
                None,
                serde_json::json!({"why": why.to_string(), "hostname": req.hostname, "source": source}),
            )
            .await;
            return Err(tandem_db::DbError::Token(why).into());
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(device = %row.id, user, "device enrolled");
    audit(
        &st,
        &format!("device:{}", row.id),
        "device.enrolled",
        Some(row.id),
        None,
        serde_json::json!({"user": user, "hostname": req.hostname, "key": req.device_key.id()}),
    )
    .await;
    Ok(Json(EnrollResponse {
        device: row.id,
        user,
        keys: st.keys.pinned(),
    }))
}

/// `POST /v1/checkin`.
///
/// The device's status was read while authenticating; a kill may be ordered between that
/// read and this check-in's write. The write is therefore conditional on the status read
/// (one statement in the database), and when it no longer holds the answer is decided
/// again from the new status: a lease is signed only after the database recorded it for a
/// device that was still active.
///
/// The request's nonce is recorded in the same transaction ([`CheckinNonce`]): a replay
/// writes nothing and is refused as `replayed`.
#[tracing::instrument(skip_all, fields(device = %dev.id))]
pub async fn checkin(
    State(st): State<AppState>,
    Device(dev): Device,
    nonce: Option<axum::Extension<CheckinNonce>>,
    body: Bytes,
) -> Result<Json<CheckinResponse>, ApiError> {
    let nonce = nonce.map(|n| n.0);
    let report: CheckinRequest = parse_json(&body, fleet::MAX_CHECKIN_BODY)?;
    let report_json = serde_json::to_string(&report).expect("serializing plain data cannot fail");
    let mut dev = dev;
    // The status only moves forward (active, kill-pending, killed): two retries suffice.
    for _ in 0..3 {
        if let Some(resp) = try_checkin(&st, &dev, &report, &report_json, nonce.as_ref()).await? {
            return Ok(Json(resp));
        }
        dev = st
            .db
            .device(dev.id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("device {} not found", dev.id)))?;
    }
    Err(ApiError::Conflict(format!(
        "device {} changed state during check-in; check in again",
        dev.id
    )))
}

/// One check-in attempt for `dev` as read; `None` when its status changed meanwhile.
async fn try_checkin(
    st: &AppState,
    dev: &DeviceRow,
    report: &CheckinRequest,
    report_json: &str,
    nonce: Option<&CheckinNonce>,
) -> Result<Option<CheckinResponse>, ApiError> {
    let now = now();
    let (user, policy_json) = st
        .db
        .user_with_policy(&dev.user)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("user {} not found", dev.user)))?;
    let policy: Policy = serde_json::from_str(&policy_json).map_err(|source| {
        ApiError::Internal(InternalError::Stored {
            what: "policy",
            source,
        })
    })?;
    let (lease, kill, not_after) = match dev.status {
        DeviceStatus::Active => {
            let not_after = now + u64::from(policy.lease_days) * 86_400;
            let lease = Lease {
                device: dev.id,
                issued_at: now,
                not_after,
                policy_hash: policy.hash(),
            };
            (Some(lease), None, Some(not_after))
        }
        DeviceStatus::KillPending => {
            let order = KillOrder {
                device: dev.id,
                ordered_at: dev.kill_ordered_at.unwrap_or(now),
                actor: dev.kill_actor.clone().unwrap_or_default(),
                reason: dev.kill_reason.clone().unwrap_or_default(),
            };
            (
                None,
                Some(st.keys.kill.sign(fleet::KIND_KILL_ORDER, &order)),
                None,
            )
        }
        DeviceStatus::Killed => {
            return Err(ApiError::Forbidden {
                code: "device_killed",
                message: "this device was killed".into(),
            })
        }
    };
    let actor = format!("device:{}", dev.id);
    let entry = |action: &str, detail: serde_json::Value| tandem_db::NewAudit {
        at: now,
        actor: actor.clone(),
        action: action.to_string(),
        device: Some(dev.id),
        reason: None,
        detail,
    };
    let mut entries = vec![entry(
        "device.checked-in",
        serde_json::json!({
            "agent_version": report.agent_version,
            "clock_skew": report.clock as i64 - now as i64,
            "lease_not_after": not_after,
        }),
    )];
    if kill.is_some() {
        entries.push(entry(
            "lease.refused",
            serde_json::json!({"why": "kill ordered; kill order delivered"}),
        ));
    }
    let outcome = st
        .db
        .record_checkin(
            dev.id,
            dev.status,
            now,
            report_json,
            not_after,
            entries,
            nonce.map(CheckinNonce::row),
        )
        .await?;
    match (outcome, nonce) {
        (CheckinOutcome::Recorded, Some(n)) => n.recorded(),
        (CheckinOutcome::Recorded, None) => {}
        (CheckinOutcome::StatusChanged, _) => {
            tracing::info!(device = %dev.id, "status changed during check-in; deciding again");
            return Ok(None);
        }
        (CheckinOutcome::Replayed, n) => {
            return Err(match n {
                Some(n) => n.replayed(st).await,
                None => crate::auth::replay_refusal(),
            })
        }
    }
    // Signed only now that the database recorded it for a device still in `dev.status`.
    let lease = lease.map(|l| st.keys.state.sign(fleet::KIND_LEASE, &l));
    let target = TargetState {
        device: dev.id,
        issued_at: now,
        assignments: fleet::Assignments {
            corporate: user.corporate.clone(),
            personal: user.personal.clone(),
        },
        policy_name: user.policy.clone(),
        policy,
        lease,
        kill,
        rules_version: crate::rules::current_version(&st.data_dir),
    };
    tracing::debug!(device = %dev.id, not_after, "check-in");
    Ok(Some(CheckinResponse {
        target: st.keys.state.sign(fleet::KIND_TARGET_STATE, &target),
    }))
}

/// `POST /v1/kill-ack`.
#[tracing::instrument(skip_all, fields(device = %dev.id))]
pub async fn kill_ack(
    State(st): State<AppState>,
    Device(dev): Device,
    body: Bytes,
) -> Result<Json<DeviceInfo>, ApiError> {
    let req: KillAckRequest = parse_json(&body, fleet::MAX_CHECKIN_BODY)?;
    let ack: KillAck = req
        .ack
        .verify(fleet::KIND_KILL_ACK, std::slice::from_ref(&dev.public_key))
        .map_err(|e| ApiError::BadRequest(format!("kill acknowledgement refused: {e}")))?;
    if ack.device != dev.id {
        return Err(ApiError::BadRequest(
            "kill acknowledgement names another device".into(),
        ));
    }
    if dev.status != DeviceStatus::KillPending {
        return Err(ApiError::Conflict(format!(
            "device {} has no pending kill (status {})",
            dev.id, dev.status
        )));
    }
    if Some(ack.ordered_at) != dev.kill_ordered_at {
        return Err(ApiError::BadRequest(
            "kill acknowledgement is for another kill order".into(),
        ));
    }
    let now = now();
    let ack_json = serde_json::to_string(&req.ack).expect("serializing plain data cannot fail");
    st.db.complete_kill(dev.id, &ack_json, now).await?;
    tracing::warn!(device = %dev.id, "kill executed and acknowledged");
    audit(
        &st,
        &format!("device:{}", dev.id),
        "device.kill-executed",
        Some(dev.id),
        dev.kill_reason.clone(),
        serde_json::to_value(&ack).expect("serializing plain data cannot fail"),
    )
    .await;
    let row = st
        .db
        .device(dev.id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("device {}", dev.id)))?;
    Ok(Json(device_info(&row, now)))
}

/// `GET /v1/devices/{id}`: a device reads its own record; an admin reads any.
pub async fn device_record(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeviceInfo>, ApiError> {
    let id: DeviceId = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("malformed device id {id:?}")))?;
    if let Caller::Device { id: me, .. } = &caller {
        if *me != id {
            audit(
                &st,
                &caller.actor(),
                "device.forbidden",
                Some(*me),
                None,
                serde_json::json!({"asked_for": id}),
            )
            .await;
            return Err(ApiError::Forbidden {
                code: "not_yours",
                message: "a device may only read its own record".into(),
            });
        }
    }
    let row = st
        .db
        .device(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("device {id} not found")))?;
    Ok(Json(device_info(&row, now())))
}

/// The admin's view of a device row.
pub fn device_info(row: &DeviceRow, now: u64) -> DeviceInfo {
    DeviceInfo {
        id: row.id,
        user: row.user.clone(),
        hostname: row.hostname.clone(),
        status: row.status,
        enrolled_at: row.enrolled_at,
        last_checkin: row.last_checkin,
        lease_not_after: row.lease_not_after,
        lease_secs_left: row
            .lease_not_after
            .map(|n| n.saturating_sub(now))
            .unwrap_or(0),
        last_report: row
            .last_report
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok()),
        kill_reason: row.kill_reason.clone(),
    }
}
