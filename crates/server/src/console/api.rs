//! JSON admin routes added for the console, and the functions behind them that the
//! console's pages call too (one implementation, two views):
//!
//! | route | function |
//! |---|---|
//! | `GET /v1/admin/overview?stale_days=N` | [`overview`] |
//! | `GET /v1/admin/devices/search?q=&status=&user=&sort=&order=&page=&per_page=` | [`search_devices`] |
//! | `GET /v1/admin/devices/{id}/detail` | [`device_detail`] |
//! | `GET /v1/admin/audit/search?device=&actor=&action=&before=&limit=` | [`audit_search`] |
//! | `GET /v1/admin/images/detail` | [`image_details`] |

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use tandem_db::{AuditSearch, DeviceQuery, DeviceSort};
use tandem_proto::backup::BackupInfo;
use tandem_proto::fleet::{AuditEntry, DeviceId, DeviceInfo, DeviceStatus, ImageRef, Policy};

use super::ConsoleState;
use crate::auth::Admin;
use crate::error::{ApiError, InternalError};
use crate::fleet::device_info;
use crate::now;

/// Devices per page unless asked otherwise.
pub const PER_PAGE: u32 = 50;
/// Lease ends within this many seconds count as "expiring soon" on the overview.
pub const EXPIRING_SECS: u64 = 3 * 86_400;
/// Default of "not seen for N days".
pub const STALE_DAYS: u64 = 7;
/// Rows of each overview list.
const OVERVIEW_ROWS: u32 = 10;

/// Query of the device search.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSearch {
    /// Substring of id, host name or owner.
    #[serde(default)]
    pub q: Option<String>,
    /// `active`, `kill-pending` or `killed`.
    #[serde(default)]
    pub status: Option<String>,
    /// Owner.
    #[serde(default)]
    pub user: Option<String>,
    /// `enrolled`, `hostname`, `user`, `status`, `last-checkin`, `lease`.
    #[serde(default)]
    pub sort: Option<String>,
    /// `asc` or `desc`.
    #[serde(default)]
    pub order: Option<String>,
    /// 1-based page.
    #[serde(default)]
    pub page: Option<u64>,
    /// Rows per page (1 to 500).
    #[serde(default)]
    pub per_page: Option<u32>,
}

/// One page of the device search.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceSearchResult {
    /// Devices matching the filters, in all pages.
    pub total: u64,
    /// This page (1-based).
    pub page: u64,
    /// Rows per page.
    pub per_page: u32,
    /// The page's devices.
    pub devices: Vec<DeviceInfo>,
}

fn empty(s: &Option<String>) -> Option<String> {
    s.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// The device search: filtering, sorting and paging happen in the database.
pub async fn search_devices(
    st: &ConsoleState,
    q: &DeviceSearch,
) -> Result<DeviceSearchResult, ApiError> {
    let status = match empty(&q.status) {
        None => None,
        Some(s) => Some(s.parse::<DeviceStatus>().map_err(ApiError::BadRequest)?),
    };
    let sort = match empty(&q.sort) {
        None => DeviceSort::default(),
        Some(s) => DeviceSort::parse(&s).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "unknown sort {s:?}; use one of enrolled, hostname, user, status, last-checkin, lease"
            ))
        })?,
    };
    let descending = match q.order.as_deref().map(str::trim) {
        None | Some("") | Some("asc") => false,
        Some("desc") => true,
        Some(o) => {
            return Err(ApiError::BadRequest(format!(
                "unknown order {o:?}; use asc or desc"
            )))
        }
    };
    let per_page = q.per_page.unwrap_or(PER_PAGE);
    if per_page == 0 || per_page > DeviceQuery::MAX_LIMIT {
        return Err(ApiError::BadRequest(format!(
            "per_page must be 1 to {}",
            DeviceQuery::MAX_LIMIT
        )));
    }
    let page = q.page.unwrap_or(1).max(1);
    let query = DeviceQuery {
        search: empty(&q.q),
        status,
        user: empty(&q.user),
        sort,
        descending,
        offset: (page - 1).saturating_mul(u64::from(per_page)),
        limit: per_page,
        ..Default::default()
    };
    let found = st.app.db.device_page(&query).await?;
    let now = now();
    Ok(DeviceSearchResult {
        total: found.total,
        page,
        per_page,
        devices: found.devices.iter().map(|d| device_info(d, now)).collect(),
    })
}

/// `GET /v1/admin/devices/search`.
pub async fn search_devices_route(
    State(st): State<ConsoleState>,
    _: Admin,
    Query(q): Query<DeviceSearch>,
) -> Result<Json<DeviceSearchResult>, ApiError> {
    Ok(Json(search_devices(&st, &q).await?))
}

/// A short list with the number of all its matches.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceList {
    /// Matches in all.
    pub total: u64,
    /// The first few.
    pub devices: Vec<DeviceInfo>,
}

/// The fleet at a glance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Overview {
    /// Server time of the figures.
    pub now: u64,
    /// Devices per state (`active`, `kill-pending`, `killed`).
    pub by_state: Vec<(DeviceStatus, u64)>,
    /// Active devices whose lease ends within three days, soonest first.
    pub leases_expiring: DeviceList,
    /// The N of "not seen for N days".
    pub stale_days: u64,
    /// Devices not seen for that long, longest first.
    pub not_seen: DeviceList,
    /// Active devices whose last reported backup is older than twice their policy's backup
    /// interval (or that reported none); the server keeps no record of failed uploads,
    /// so an overdue backup is how a failing one shows.
    pub backups_overdue: DeviceList,
    /// Infected scan results stored on the server (none are sent up yet: `null`).
    pub infected_scans: Option<u64>,
}

/// Query of the overview.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverviewQuery {
    /// N of "not seen for N days" (default 7).
    #[serde(default)]
    pub stale_days: Option<u64>,
}

/// The fleet overview.
pub async fn overview(st: &ConsoleState, q: &OverviewQuery) -> Result<Overview, ApiError> {
    let now = now();
    let stale_days = q.stale_days.unwrap_or(STALE_DAYS).clamp(1, 3650);
    let db = &st.app.db;
    let list = |query: DeviceQuery| async move {
        let p = db.device_page(&query).await?;
        Ok::<_, ApiError>(DeviceList {
            total: p.total,
            devices: p.devices.iter().map(|d| device_info(d, now)).collect(),
        })
    };
    let leases_expiring = list(DeviceQuery {
        status: Some(DeviceStatus::Active),
        lease_from: Some(now),
        lease_until: Some(now + EXPIRING_SECS),
        sort: DeviceSort::Lease,
        limit: OVERVIEW_ROWS,
        ..Default::default()
    })
    .await?;
    let not_seen = list(DeviceQuery {
        status: Some(DeviceStatus::Active),
        not_seen_since: Some(now.saturating_sub(stale_days * 86_400)),
        sort: DeviceSort::LastCheckin,
        limit: OVERVIEW_ROWS,
        ..Default::default()
    })
    .await?;
    Ok(Overview {
        now,
        by_state: db.device_counts().await?,
        leases_expiring,
        stale_days,
        not_seen,
        backups_overdue: backups_overdue(st, now).await?,
        infected_scans: None,
    })
}

/// Active devices with an overdue backup. The last backup time is inside each device's
/// last report, so this walks the active devices a page at a time.
async fn backups_overdue(st: &ConsoleState, now: u64) -> Result<DeviceList, ApiError> {
    let mut policies = std::collections::HashMap::new();
    for (name, json) in st.app.db.policies().await? {
        let p: Policy = serde_json::from_str(&json).map_err(|source| {
            ApiError::Internal(InternalError::Stored {
                what: "policy",
                source,
            })
        })?;
        policies.insert(name, p);
    }
    let mut users = std::collections::HashMap::new();
    for u in st.app.db.users().await? {
        let mins = policies
            .get(&u.policy)
            .map(|p| p.backup_interval_mins)
            .unwrap_or_else(|| Policy::default().backup_interval_mins);
        users.insert(u.name, u64::from(mins.max(1)) * 60);
    }
    let mut out = DeviceList {
        total: 0,
        devices: Vec::new(),
    };
    let mut offset = 0;
    loop {
        let page = st
            .app
            .db
            .device_page(&DeviceQuery {
                status: Some(DeviceStatus::Active),
                offset,
                limit: DeviceQuery::MAX_LIMIT,
                ..Default::default()
            })
            .await?;
        for d in &page.devices {
            let info = device_info(d, now);
            // A device that never reported is "not seen", not "backup overdue".
            let Some(report) = &info.last_report else {
                continue;
            };
            let interval = users.get(&d.user).copied().unwrap_or(86_400);
            let overdue = match report.last_backup {
                None => true,
                Some(t) => now.saturating_sub(t) > 2 * interval,
            };
            if overdue {
                out.total += 1;
                if out.devices.len() < OVERVIEW_ROWS as usize {
                    out.devices.push(info);
                }
            }
        }
        offset += page.devices.len() as u64;
        if page.devices.len() < DeviceQuery::MAX_LIMIT as usize || offset >= page.total {
            break;
        }
    }
    Ok(out)
}

/// `GET /v1/admin/overview`.
pub async fn overview_route(
    State(st): State<ConsoleState>,
    _: Admin,
    Query(q): Query<OverviewQuery>,
) -> Result<Json<Overview>, ApiError> {
    Ok(Json(overview(&st, &q).await?))
}

/// Everything about one device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceDetail {
    /// The device as listed.
    pub device: DeviceInfo,
    /// Short id of its key (BLAKE3 of the public key, first 8 bytes, hex).
    pub key_id: String,
    /// Its public key (base64).
    pub public_key: String,
    /// Images assigned to its user.
    pub assigned: Vec<(String, ImageRef)>,
    /// Its user's policy.
    pub policy: String,
    /// Who ordered a kill, when.
    pub kill_actor: Option<String>,
    /// When the kill was ordered.
    pub kill_ordered_at: Option<u64>,
    /// When the device acknowledged the kill.
    pub killed_at: Option<u64>,
    /// Backups of its user, newest first.
    pub backups: Vec<BackupInfo>,
    /// Its audit trail, newest first (at most 100).
    pub audit: Vec<AuditEntry>,
}

/// Parses a device id from a path.
pub fn parse_device(id: &str) -> Result<DeviceId, ApiError> {
    id.parse()
        .map_err(|_| ApiError::BadRequest(format!("malformed device id {id:?}")))
}

/// One device with its key, assignments, backups and audit trail.
pub async fn device_detail(st: &ConsoleState, id: DeviceId) -> Result<DeviceDetail, ApiError> {
    let row = st
        .app
        .db
        .device(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("device {id} not found")))?;
    let user = st.app.db.user(&row.user).await?;
    let mut assigned = Vec::new();
    if let Some(u) = &user {
        if let Some(c) = &u.corporate {
            assigned.push(("corporate".to_string(), c.clone()));
        }
        if let Some(p) = &u.personal {
            assigned.push(("personal".to_string(), p.clone()));
        }
    }
    let svc = st.backups.clone();
    let owner = row.user.clone();
    let mut backups: Vec<BackupInfo> = tokio::task::spawn_blocking(move || svc.list(&owner))
        .await
        .map_err(|e| ApiError::Internal(InternalError::Storage(format!("backup task: {e}"))))?
        .map_err(|e| ApiError::Internal(InternalError::Storage(format!("backup list: {e}"))))?
        .iter()
        .map(BackupInfo::from)
        .collect();
    backups.reverse();
    let audit = st
        .app
        .db
        .audit_search(&AuditSearch {
            device: Some(id),
            limit: Some(100),
            ..Default::default()
        })
        .await?;
    Ok(DeviceDetail {
        device: device_info(&row, now()),
        key_id: row.public_key.id().to_string(),
        public_key: row.public_key.to_base64(),
        assigned,
        policy: user.map(|u| u.policy).unwrap_or_default(),
        kill_actor: row.kill_actor.clone(),
        kill_ordered_at: row.kill_ordered_at,
        killed_at: row.killed_at,
        backups,
        audit,
    })
}

/// `GET /v1/admin/devices/{id}/detail`.
pub async fn device_detail_route(
    State(st): State<ConsoleState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Json<DeviceDetail>, ApiError> {
    Ok(Json(device_detail(&st, parse_device(&id)?).await?))
}

/// Query of the audit search.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Device id.
    #[serde(default)]
    pub device: Option<String>,
    /// Actor prefix (`admin:` or `admin:alice`).
    #[serde(default)]
    pub actor: Option<String>,
    /// Action prefix (`device.` or `device.kill-ordered`).
    #[serde(default)]
    pub action: Option<String>,
    /// Only entries older than this id (the next page).
    #[serde(default)]
    pub before: Option<i64>,
    /// At most this many (default 100, at most 1000).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// The audit log, newest first, filtered.
pub async fn audit_search(st: &ConsoleState, q: &AuditQuery) -> Result<Vec<AuditEntry>, ApiError> {
    let device = empty(&q.device).map(|d| parse_device(&d)).transpose()?;
    Ok(st
        .app
        .db
        .audit_search(&AuditSearch {
            device,
            actor: empty(&q.actor),
            action: empty(&q.action),
            before_id: q.before,
            limit: q.limit,
        })
        .await?)
}

/// `GET /v1/admin/audit/search`.
pub async fn audit_search_route(
    State(st): State<ConsoleState>,
    _: Admin,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    Ok(Json(audit_search(&st, &q).await?))
}

/// Storage figures per (image, version, all versions of the image): a version never
/// changes, but what it shares with its siblings does when one is published or deleted.
pub type StatsCache =
    std::sync::Mutex<std::collections::HashMap<(String, u64, Vec<u64>), VersionStats>>;

/// Storage figures of one image version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionStats {
    /// Virtual disk size.
    pub size: u64,
    /// Chunks holding data (holes excluded).
    pub data_chunks: u64,
    /// Distinct chunks.
    pub unique_chunks: u64,
    /// Bytes those chunks take in the store (compressed, shared with other versions).
    pub stored_bytes: u64,
    /// Bytes of chunks no other version of the same image uses.
    pub own_bytes: u64,
}

/// One published version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionDetail {
    /// Version number.
    pub version: u64,
    /// Storage figures.
    pub stats: VersionStats,
    /// Users with this version as their corporate image.
    pub corporate_users: Vec<String>,
    /// Users with this version as their personal image.
    pub personal_users: Vec<String>,
}

/// One image and its versions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageDetail {
    /// Name.
    pub name: String,
    /// Versions, ascending.
    pub versions: Vec<VersionDetail>,
}

fn storage(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(InternalError::Storage(format!("{what}: {e}")))
}

/// Every image with its versions' storage figures and assigned users.
pub async fn image_details(st: &ConsoleState) -> Result<Vec<ImageDetail>, ApiError> {
    let users = st.app.db.users().await?;
    let s = st.clone();
    let mut images = tokio::task::spawn_blocking(move || compute_images(&s))
        .await
        .map_err(|e| storage("image task", e))??;
    for image in &mut images {
        for v in &mut image.versions {
            let is = |r: &Option<ImageRef>| {
                r.as_ref()
                    .is_some_and(|r| r.image == image.name && r.version == v.version)
            };
            v.corporate_users = users
                .iter()
                .filter(|u| is(&u.corporate))
                .map(|u| u.name.clone())
                .collect();
            v.personal_users = users
                .iter()
                .filter(|u| is(&u.personal))
                .map(|u| u.name.clone())
                .collect();
        }
    }
    Ok(images)
}

fn compute_images(st: &ConsoleState) -> Result<Vec<ImageDetail>, ApiError> {
    let catalog = st.images.catalog();
    let trusted = [st.app.keys.image.public()];
    let mut out = Vec::new();
    for image in catalog.list().map_err(|e| storage("image catalog", e))? {
        let mut manifests = Vec::new();
        for v in &image.versions {
            let (m, _) = catalog
                .load(&image.name, *v, &trusted)
                .map_err(|e| storage("manifest", e))?;
            manifests.push(m);
        }
        let mut versions = Vec::new();
        for (i, m) in manifests.iter().enumerate() {
            let key = (image.name.clone(), m.version, image.versions.clone());
            let cached = st
                .version_stats
                .lock()
                .expect("stats lock poisoned")
                .get(&key)
                .cloned();
            let stats = match cached {
                Some(s) => s,
                None => {
                    let s = version_stats(st, m, &manifests, i)?;
                    st.version_stats
                        .lock()
                        .expect("stats lock poisoned")
                        .insert(key, s.clone());
                    s
                }
            };
            versions.push(VersionDetail {
                version: m.version,
                stats,
                corporate_users: Vec::new(),
                personal_users: Vec::new(),
            });
        }
        out.push(ImageDetail {
            name: image.name,
            versions,
        });
    }
    Ok(out)
}

fn version_stats(
    st: &ConsoleState,
    m: &tandem_proto::manifest::Manifest,
    all: &[tandem_proto::manifest::Manifest],
    me: usize,
) -> Result<VersionStats, ApiError> {
    let set = m.chunk_set();
    let others: std::collections::HashSet<_> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != me)
        .flat_map(|(_, o)| o.chunks.iter().flatten().copied())
        .collect();
    let ids: Vec<_> = set.iter().copied().collect();
    let locs = st
        .images
        .store()
        .locate_many(&ids)
        .map_err(|e| storage("chunk store", e))?;
    let mut stats = VersionStats {
        size: m.size,
        data_chunks: m.chunks.iter().filter(|c| c.is_some()).count() as u64,
        unique_chunks: ids.len() as u64,
        stored_bytes: 0,
        own_bytes: 0,
    };
    for (id, loc) in ids.iter().zip(locs) {
        let Some(loc) = loc else { continue };
        stats.stored_bytes += u64::from(loc.stored_len);
        if !others.contains(id) {
            stats.own_bytes += u64::from(loc.stored_len);
        }
    }
    Ok(stats)
}

/// `GET /v1/admin/images/detail`.
pub async fn image_details_route(
    State(st): State<ConsoleState>,
    _: Admin,
) -> Result<Json<Vec<ImageDetail>>, ApiError> {
    Ok(Json(image_details(&st).await?))
}
