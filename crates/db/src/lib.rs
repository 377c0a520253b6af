//! Server metadata behind one trait, [`Db`], on SQLite (the embedded default) or
//! PostgreSQL (for several stateless server replicas).
//!
//! Design:
//! - One trait, two implementations generated from the same SQL text by one macro, so the
//!   back-ends cannot drift apart: every statement uses `$N` placeholders (both SQLite and
//!   PostgreSQL accept them) and only portable types (`TEXT`, 64-bit integers).
//! - Queries are built at run time (`sqlx::query`), never checked at compile time, so a
//!   build needs no database.
//! - Migrations are append-only lists of SQL, one per back-end ([`migrations`]); the
//!   applied versions are recorded in `tandem_schema`, and every start applies what is
//!   missing inside one transaction (PostgreSQL additionally takes an advisory lock so two
//!   replicas starting together do not race). Never edit a released migration: add one.
//! - The audit table is append-only, enforced by triggers on both back-ends.
//! - Request nonces live in the `nonces` table, keyed by (device, nonce), so every replica
//!   on one database refuses a replay any of them saw: recording one is a single
//!   `INSERT … ON CONFLICT DO NOTHING` whose affected-row count says fresh or replayed;
//!   the server prunes rows by request time on a clock ([`Db::prune_nonces`]).
//! - Times are unix seconds; ids are hex text.
//!
//! The trait is object-safe (`Arc<dyn Db>`): methods return boxed futures.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod console;
pub mod migrations;
mod url;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use tandem_proto::fleet::{AuditEntry, DeviceId, DeviceStatus, ImageRef};
use tandem_proto::PublicKey;

pub use console::{AuditSearch, DevicePage, DeviceQuery, DeviceSort, SessionRow};
pub use url::DatabaseUrl;

/// A boxed future returned by [`Db`] methods.
pub type DbFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, DbError>> + Send + 'a>>;

/// A database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL names no back-end we know.
    #[error("unsupported database {url}: use `sqlite:PATH`, a file path, or `postgres://user@host:port/db`")]
    BadUrl {
        /// The URL, password hidden.
        url: String,
    },
    /// The database could not be reached or opened.
    #[error("cannot open database {url}: {source}; check that it is running and reachable, and the URL is right")]
    Connect {
        /// The URL, password hidden.
        url: String,
        /// Why.
        source: sqlx::Error,
    },
    /// A schema migration failed; the database is left at the previous version.
    #[error("schema migration {version} failed: {source}")]
    Migrate {
        /// The migration's number.
        version: i64,
        /// Why.
        source: sqlx::Error,
    },
    /// The database holds a newer schema than this build knows.
    #[error(
        "database schema is at version {found}, newer than this build's {known}; upgrade tandem"
    )]
    TooNew {
        /// Highest version applied in the database.
        found: i64,
        /// Highest version this build knows.
        known: i64,
    },
    /// A query failed.
    #[error("database {op} failed: {source}")]
    Query {
        /// What we were doing.
        op: &'static str,
        /// Why.
        source: sqlx::Error,
    },
    /// A stored value does not parse: the row was edited by hand or is damaged.
    #[error("damaged row: {what}")]
    Corrupt {
        /// Which value.
        what: String,
    },
    /// The thing to create exists already.
    #[error("{what} already exists")]
    Conflict {
        /// What.
        what: String,
    },
    /// The thing to change does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What.
        what: String,
    },
    /// An enrollment token was refused.
    #[error("enrollment token refused: {0}")]
    Token(TokenRefusal),
}

/// Why an enrollment token did not enroll a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// No such token was ever issued.
    #[error("unknown token; ask your administrator for a new one")]
    Unknown,
    /// The token enrolled a device already.
    #[error("token already used; ask your administrator for a new one")]
    Used,
    /// The token's lifetime ended.
    #[error("token expired; ask your administrator for a new one")]
    Expired,
}

/// A user row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    /// Unique name.
    pub name: String,
    /// Policy name.
    pub policy: String,
    /// Corporate gold image.
    pub corporate: Option<ImageRef>,
    /// Personal base image.
    pub personal: Option<ImageRef>,
    /// Creation time.
    pub created_at: u64,
}

/// A device row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    /// Id.
    pub id: DeviceId,
    /// Owner.
    pub user: String,
    /// The key every request must be signed with.
    pub public_key: PublicKey,
    /// Host name given at enrollment.
    pub hostname: String,
    /// Lifecycle state.
    pub status: DeviceStatus,
    /// Enrollment time.
    pub enrolled_at: u64,
    /// Last check-in.
    pub last_checkin: Option<u64>,
    /// Last reported status (JSON of `CheckinRequest`).
    pub last_report: Option<String>,
    /// `not_after` of the last lease issued.
    pub lease_not_after: Option<u64>,
    /// Who ordered the kill.
    pub kill_actor: Option<String>,
    /// Why.
    pub kill_reason: Option<String>,
    /// When.
    pub kill_ordered_at: Option<u64>,
    /// When the device acknowledged.
    pub killed_at: Option<u64>,
    /// The signed acknowledgement (JSON of `Signed`).
    pub kill_ack: Option<String>,
}

impl DeviceRow {
    /// A device about to enroll: active, never checked in. `user` is filled from the
    /// token by [`Db::enroll`].
    pub fn enrolling(id: DeviceId, public_key: PublicKey, hostname: &str, now: u64) -> Self {
        DeviceRow {
            id,
            user: String::new(),
            public_key,
            hostname: hostname.to_string(),
            status: DeviceStatus::Active,
            enrolled_at: now,
            last_checkin: None,
            last_report: None,
            lease_not_after: None,
            kill_actor: None,
            kill_reason: None,
            kill_ordered_at: None,
            killed_at: None,
            kill_ack: None,
        }
    }
}

/// A new audit entry.
#[derive(Debug, Clone)]
pub struct NewAudit {
    /// When.
    pub at: u64,
    /// `admin:<name>`, `device:<id>` or `server`.
    pub actor: String,
    /// What happened.
    pub action: String,
    /// Device concerned.
    pub device: Option<DeviceId>,
    /// Reason given by the actor.
    pub reason: Option<String>,
    /// Details.
    pub detail: serde_json::Value,
}

/// A request's nonce, recorded in the transaction of the write the request makes
/// ([`Db::record_checkin`]) instead of in one of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewNonce {
    /// The device that signed the request.
    pub device: DeviceId,
    /// The request's nonce.
    pub nonce: String,
    /// The request's signed time (unix seconds).
    pub at: u64,
}

/// What [`Db::record_checkin`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckinOutcome {
    /// The check-in, its nonce, lease and audit entries committed.
    Recorded,
    /// The device's status is no longer the expected one: nothing was written.
    StatusChanged,
    /// The request's nonce was recorded already (a replay): nothing was written.
    Replayed,
}

/// Which audit entries to read.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this device.
    pub device: Option<DeviceId>,
    /// Only at or after this time.
    pub since: Option<u64>,
    /// At most this many, newest last (default 1000).
    pub limit: Option<u32>,
}

/// Server metadata. Every method is one atomic operation.
pub trait Db: Send + Sync + fmt::Debug {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Number of admin credentials (0 on a fresh server).
    fn admin_count(&self) -> DbFuture<'_, i64>;
    /// Stores an admin credential by hash.
    fn add_admin(&self, name: &str, hash: &str, now: u64) -> DbFuture<'_, ()>;
    /// The admin name for a credential hash.
    fn admin_by_hash(&self, hash: &str) -> DbFuture<'_, Option<String>>;
    /// Revokes the admin credential `name`: [`DbError::NotFound`] when there is none,
    /// [`DbError::Conflict`] when it is the last one (the server would have no admin left).
    fn revoke_admin(&self, name: &str) -> DbFuture<'_, ()>;
    /// Ends every unused, unexpired enrollment token of `user` at `now`; returns how many.
    fn revoke_enroll_tokens(&self, user: &str, now: u64) -> DbFuture<'_, u64>;

    /// Creates a user; [`DbError::Conflict`] when the name is taken.
    fn create_user(&self, name: &str, policy: &str, now: u64) -> DbFuture<'_, ()>;
    /// One user.
    fn user(&self, name: &str) -> DbFuture<'_, Option<UserRow>>;
    /// One user with the JSON of their policy, in one query (the check-in's read).
    fn user_with_policy(&self, name: &str) -> DbFuture<'_, Option<(UserRow, String)>>;
    /// Every user, by name.
    fn users(&self) -> DbFuture<'_, Vec<UserRow>>;
    /// Sets a user's policy and assignments.
    fn update_user(&self, row: &UserRow) -> DbFuture<'_, ()>;

    /// Creates or replaces a named policy (JSON of `Policy`).
    fn put_policy(&self, name: &str, json: &str, now: u64) -> DbFuture<'_, ()>;
    /// One policy's JSON.
    fn policy(&self, name: &str) -> DbFuture<'_, Option<String>>;
    /// Every policy `(name, json)`, by name.
    fn policies(&self) -> DbFuture<'_, Vec<(String, String)>>;

    /// Stores a new enrollment token by hash.
    fn add_enroll_token(
        &self,
        hash: &str,
        user: &str,
        now: u64,
        expires_at: u64,
    ) -> DbFuture<'_, ()>;
    /// Consumes a token and inserts the device it enrolls, atomically; the device's
    /// `user` is taken from the token. Returns the user.
    fn enroll(&self, token_hash: &str, device: &DeviceRow, now: u64) -> DbFuture<'_, String>;

    /// One device.
    fn device(&self, id: DeviceId) -> DbFuture<'_, Option<DeviceRow>>;
    /// Every device, by enrollment time.
    fn devices(&self) -> DbFuture<'_, Vec<DeviceRow>>;
    /// Records a check-in, the lease issued with it (if any), its audit entries and the
    /// nonce of the request that carried it (if given), in one transaction (one commit per
    /// check-in: the fleet's hottest write) — only while the device's status is still
    /// `expected`. [`CheckinOutcome::StatusChanged`]: the status changed since the caller
    /// read it (say, a kill was ordered); nothing was written and the caller must decide
    /// again from the new status, so a lease is never issued past a kill order.
    /// [`CheckinOutcome::Replayed`]: the nonce was recorded already, as by
    /// [`Db::record_nonce`]; nothing was written.
    #[allow(clippy::too_many_arguments)]
    fn record_checkin(
        &self,
        id: DeviceId,
        expected: DeviceStatus,
        now: u64,
        report_json: &str,
        lease_not_after: Option<u64>,
        audit: Vec<NewAudit>,
        nonce: Option<NewNonce>,
    ) -> DbFuture<'_, CheckinOutcome>;
    /// Marks an active device kill-pending; [`DbError::Conflict`] when it is not active.
    fn order_kill(&self, id: DeviceId, actor: &str, reason: &str, now: u64) -> DbFuture<'_, ()>;
    /// Marks a kill-pending device killed with its signed acknowledgement.
    fn complete_kill(&self, id: DeviceId, ack_json: &str, now: u64) -> DbFuture<'_, ()>;

    /// Appends to the audit log.
    fn append_audit(&self, entry: NewAudit) -> DbFuture<'_, ()>;
    /// Reads the audit log, oldest first.
    fn audit(&self, filter: AuditFilter) -> DbFuture<'_, Vec<AuditEntry>>;

    /// Stores a new admin console session under the hash of its cookie value.
    fn create_session(&self, id_hash: &str, row: &SessionRow) -> DbFuture<'_, ()>;
    /// The session with this cookie hash, if it exists and has not expired at `now`.
    fn session(&self, id_hash: &str, now: u64) -> DbFuture<'_, Option<SessionRow>>;
    /// Ends a session (sign-out); ending an unknown one is not an error.
    fn delete_session(&self, id_hash: &str) -> DbFuture<'_, ()>;
    /// Drops sessions that expired before `now`; returns how many.
    fn prune_sessions(&self, now: u64) -> DbFuture<'_, u64>;
    /// One page of devices matching `query`, and how many match in all.
    fn device_page(&self, query: &DeviceQuery) -> DbFuture<'_, DevicePage>;
    /// Number of devices in each state.
    fn device_counts(&self) -> DbFuture<'_, Vec<(DeviceStatus, u64)>>;
    /// Audit entries matching `search`, newest first.
    fn audit_search(&self, search: &AuditSearch) -> DbFuture<'_, Vec<AuditEntry>>;

    /// Records that `device` sent `nonce` in a request signed at `at` (unix seconds).
    /// `Ok(true)`: first sighting. `Ok(false)`: this device's nonce is recorded already —
    /// by this replica or another one on the same database — so the request is a replay.
    /// One statement (an insert that does nothing on conflict): of two racing inserts of
    /// the same nonce exactly one returns `true`.
    fn record_nonce(&self, device: DeviceId, nonce: &str, at: u64) -> DbFuture<'_, bool>;
    /// Drops the nonces of requests signed before `before`; returns how many.
    fn prune_nonces(&self, before: u64) -> DbFuture<'_, u64>;
    /// When this database started recording nonces (unix seconds): the time the
    /// migration creating the `nonces` table was applied. A request signed earlier may
    /// have been accepted by a server that kept its nonces in memory only.
    fn nonces_recorded_since(&self) -> DbFuture<'_, u64>;
}

/// Opens the database named by `url`, running migrations first.
pub async fn open(url: &DatabaseUrl) -> Result<std::sync::Arc<dyn Db>, DbError> {
    match url {
        DatabaseUrl::Sqlite(path) => Ok(std::sync::Arc::new(SqliteDb::open(path).await?)),
        DatabaseUrl::Postgres(_) => Ok(std::sync::Arc::new(PgDb::open(url).await?)),
    }
}

fn ts(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn uts(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn image_ref(image: Option<String>, version: Option<i64>) -> Option<ImageRef> {
    match (image, version) {
        (Some(image), Some(version)) => Some(ImageRef {
            image,
            version: uts(version),
        }),
        _ => None,
    }
}

fn q(op: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError::Query { op, source }
}

/// Maps an INSERT's error: a unique violation is a [`DbError::Conflict`] on `what`.
fn insert_err(
    op: &'static str,
    what: impl FnOnce() -> String,
) -> impl FnOnce(sqlx::Error) -> DbError {
    move |e| match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => DbError::Conflict { what: what() },
        _ => DbError::Query { op, source: e },
    }
}

/// Appends one audit row on `$exec` (a pool or a transaction).
macro_rules! insert_audit {
    ($db:ty, $exec:expr, $e:expr) => {{
        let e: NewAudit = $e;
        sqlx::query::<$db>(
            "INSERT INTO audit (at, actor, action, device_id, reason, detail) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(ts(e.at))
        .bind(&e.actor)
        .bind(&e.action)
        .bind(e.device.map(|d| d.to_string()))
        .bind(&e.reason)
        .bind(e.detail.to_string())
        .execute($exec)
        .await
        .map_err(q("append audit"))?;
    }};
}

/// Inserts one nonce row on `$exec` (a pool or a transaction); `true` when it is new.
macro_rules! insert_nonce {
    ($db:ty, $exec:expr, $device:expr, $nonce:expr, $at:expr) => {{
        let done = sqlx::query::<$db>(
            "INSERT INTO nonces (device_id, nonce, at) VALUES ($1, $2, $3) \
             ON CONFLICT (device_id, nonce) DO NOTHING",
        )
        .bind($device.to_string())
        .bind($nonce)
        .bind(ts($at))
        .execute($exec)
        .await
        .map_err(q("record nonce"))?;
        done.rows_affected() == 1
    }};
}

/// Generates one [`Db`] implementation from the shared SQL. `$db` is the sqlx database.
macro_rules! impl_db {
    ($name:ident, $db:ty, $row:ty, $backend:literal) => {
        impl $name {
            fn user_from(r: &$row) -> Result<UserRow, DbError> {
                use sqlx::Row as _;
                let g = |e| DbError::Query { op: "read user", source: e };
                Ok(UserRow {
                    name: r.try_get("name").map_err(g)?,
                    policy: r.try_get("policy").map_err(g)?,
                    corporate: image_ref(
                        r.try_get("corp_image").map_err(g)?,
                        r.try_get("corp_version").map_err(g)?,
                    ),
                    personal: image_ref(
                        r.try_get("pers_image").map_err(g)?,
                        r.try_get("pers_version").map_err(g)?,
                    ),
                    created_at: uts(r.try_get("created_at").map_err(g)?),
                })
            }

            fn device_from(r: &$row) -> Result<DeviceRow, DbError> {
                use sqlx::Row as _;
                let g = |e| DbError::Query { op: "read device", source: e };
                let id: String = r.try_get("id").map_err(g)?;
                let key: String = r.try_get("public_key").map_err(g)?;
                let status: String = r.try_get("status").map_err(g)?;
                let opt = |v: Option<i64>| v.map(uts);
                Ok(DeviceRow {
                    id: id.parse().map_err(|_| DbError::Corrupt {
                        what: format!("device id {id:?}"),
                    })?,
                    public_key: PublicKey::from_base64(&key).map_err(|_| DbError::Corrupt {
                        what: format!("public key of device {id}"),
                    })?,
                    status: status.parse().map_err(|_| DbError::Corrupt {
                        what: format!("status {status:?} of device {id}"),
                    })?,
                    user: r.try_get("user_name").map_err(g)?,
                    hostname: r.try_get("hostname").map_err(g)?,
                    enrolled_at: uts(r.try_get("enrolled_at").map_err(g)?),
                    last_checkin: opt(r.try_get("last_checkin").map_err(g)?),
                    last_report: r.try_get("last_report").map_err(g)?,
                    lease_not_after: opt(r.try_get("lease_not_after").map_err(g)?),
                    kill_actor: r.try_get("kill_actor").map_err(g)?,
                    kill_reason: r.try_get("kill_reason").map_err(g)?,
                    kill_ordered_at: opt(r.try_get("kill_ordered_at").map_err(g)?),
                    killed_at: opt(r.try_get("killed_at").map_err(g)?),
                    kill_ack: r.try_get("kill_ack").map_err(g)?,
                })
            }

            fn audit_from(r: &$row) -> Result<AuditEntry, DbError> {
                use sqlx::Row as _;
                let g = |e| DbError::Query { op: "read audit", source: e };
                let device: Option<String> = r.try_get("device_id").map_err(g)?;
                let detail: String = r.try_get("detail").map_err(g)?;
                Ok(AuditEntry {
                    id: r.try_get("id").map_err(g)?,
                    at: uts(r.try_get("at").map_err(g)?),
                    actor: r.try_get("actor").map_err(g)?,
                    action: r.try_get("action").map_err(g)?,
                    device: match device {
                        Some(d) => Some(d.parse().map_err(|_| DbError::Corrupt {
                            what: format!("audit device id {d:?}"),
                        })?),
                        None => None,
                    },
                    reason: r.try_get("reason").map_err(g)?,
                    detail: serde_json::from_str(&detail).map_err(|_| DbError::Corrupt {
                        what: "audit detail".into(),
                    })?,
                })
            }
        }

        impl Db for $name {
            fn backend(&self) -> &'static str {
                $backend
            }

            fn admin_count(&self) -> DbFuture<'_, i64> {
                Box::pin(async move {
                    sqlx::query_scalar::<$db, i64>("SELECT COUNT(*) FROM admins")
                        .fetch_one(&self.pool)
                        .await
                        .map_err(q("count admins"))
                })
            }

            fn add_admin(&self, name: &str, hash: &str, now: u64) -> DbFuture<'_, ()> {
                let (name, hash) = (name.to_string(), hash.to_string());
                Box::pin(async move {
                    sqlx::query::<$db>(
                        "INSERT INTO admins (name, token_hash, created_at) VALUES ($1, $2, $3)",
                    )
                    .bind(&name)
                    .bind(&hash)
                    .bind(ts(now))
                    .execute(&self.pool)
                    .await
                    .map_err(insert_err("add admin", || format!("admin {name}")))?;
                    Ok(())
                })
            }

            fn admin_by_hash(&self, hash: &str) -> DbFuture<'_, Option<String>> {
                let hash = hash.to_string();
                Box::pin(async move {
                    sqlx::query_scalar::<$db, String>(
                        "SELECT name FROM admins WHERE token_hash = $1",
                    )
                    .bind(&hash)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(q("find admin"))
                })
            }

            fn revoke_admin(&self, name: &str) -> DbFuture<'_, ()> {
                let name = name.to_string();
                Box::pin(async move {
                    let mut tx = self.pool.begin().await.map_err(q("begin revoke admin"))?;
                    let n = sqlx::query_scalar::<$db, i64>("SELECT COUNT(*) FROM admins")
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(q("count admins"))?;
                    let done = sqlx::query::<$db>("DELETE FROM admins WHERE name = $1")
                        .bind(&name)
                        .execute(&mut *tx)
                        .await
                        .map_err(q("revoke admin"))?;
                    if done.rows_affected() == 0 {
                        return Err(DbError::NotFound {
                            what: format!("admin credential {name}"),
                        });
                    }
                    if n <= 1 {
                        return Err(DbError::Conflict {
                            what: format!(
                                "revocation of {name}, the last admin credential (create another first); a server with no admin"
                            ),
                        });
                    }
                    tx.commit().await.map_err(q("commit revoke admin"))?;
                    Ok(())
                })
            }

            fn revoke_enroll_tokens(&self, user: &str, now: u64) -> DbFuture<'_, u64> {
                let user = user.to_string();
                Box::pin(async move {
                    let done = sqlx::query::<$db>(
                        "UPDATE enroll_tokens SET expires_at = $2 \
                         WHERE user_name = $1 AND used_at IS NULL AND expires_at > $2",
                    )
                    .bind(&user)
                    .bind(ts(now))
                    .execute(&self.pool)
                    .await
                    .map_err(q("revoke enrollment tokens"))?;
                    Ok(done.rows_affected())
                })
            }

            fn create_user(&self, name: &str, policy: &str, now: u64) -> DbFuture<'_, ()> {
                let (name, policy) = (name.to_string(), policy.to_string());
                Box::pin(async move {
                    sqlx::query::<$db>(
                        "INSERT INTO users (name, policy, created_at) VALUES ($1, $2, $3)",
                    )
                    .bind(&name)
                    .bind(&policy)
                    .bind(ts(now))
                    .execute(&self.pool)
                    .await
                    .map_err(insert_err("create user", || format!("user {name}")))?;
                    Ok(())
                })
            }

            fn user(&self, name: &str) -> DbFuture<'_, Option<UserRow>> {
                let name = name.to_string();
                Box::pin(async move {
                    let row = sqlx::query::<$db>("SELECT * FROM users WHERE name = $1")
                        .bind(&name)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(q("read user"))?;
                    row.as_ref().map(Self::user_from).transpose()
                })
            }

            fn user_with_policy(&self, name: &str) -> DbFuture<'_, Option<(UserRow, String)>> {
                let name = name.to_string();
                Box::pin(async move {
                    use sqlx::Row as _;
                    let row = sqlx::query::<$db>(
                        "SELECT u.*, p.body AS policy_body FROM users u \
                         JOIN policies p ON p.name = u.policy WHERE u.name = $1",
                    )
                    .bind(&name)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(q("read user and policy"))?;
                    match row {
                        None => Ok(None),
                        Some(r) => Ok(Some((
                            Self::user_from(&r)?,
                            r.try_get("policy_body").map_err(q("read policy"))?,
                        ))),
                    }
                })
            }

            fn users(&self) -> DbFuture<'_, Vec<UserRow>> {
                Box::pin(async move {
                    let rows = sqlx::query::<$db>("SELECT * FROM users ORDER BY name")
                        .fetch_all(&self.pool)
                        .await
                        .map_err(q("list users"))?;
                    rows.iter().map(Self::user_from).collect()
                })
            }

            fn update_user(&self, row: &UserRow) -> DbFuture<'_, ()> {
                let row = row.clone();
                Box::pin(async move {
                    let done = sqlx::query::<$db>(
                        "UPDATE users SET policy = $2, corp_image = $3, corp_version = $4, \
                         pers_image = $5, pers_version = $6 WHERE name = $1",
                    )
                    .bind(&row.name)
                    .bind(&row.policy)
                    .bind(row.corporate.as_ref().map(|r| r.image.clone()))
                    .bind(row.corporate.as_ref().map(|r| ts(r.version)))
                    .bind(row.personal.as_ref().map(|r| r.image.clone()))
                    .bind(row.personal.as_ref().map(|r| ts(r.version)))
                    .execute(&self.pool)
                    .await
                    .map_err(q("update user"))?;
                    if done.rows_affected() == 0 {
                        return Err(DbError::NotFound { what: format!("user {}", row.name) });
                    }
                    Ok(())
                })
            }

            fn put_policy(&self, name: &str, json: &str, now: u64) -> DbFuture<'_, ()> {
                let (name, json) = (name.to_string(), json.to_string());
                Box::pin(async move {
                    sqlx::query::<$db>(
                        "INSERT INTO policies (name, body, updated_at) VALUES ($1, $2, $3) \
                         ON CONFLICT (name) DO UPDATE SET body = excluded.body, \
                         updated_at = excluded.updated_at",
                    )
                    .bind(&name)
                    .bind(&json)
                    .bind(ts(now))
                    .execute(&self.pool)
                    .await
                    .map_err(q("store policy"))?;
                    Ok(())
                })
            }

            fn policy(&self, name: &str) -> DbFuture<'_, Option<String>> {
                let name = name.to_string();
                Box::pin(async move {
                    sqlx::query_scalar::<$db, String>("SELECT body FROM policies WHERE name = $1")
                        .bind(&name)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(q("read policy"))
                })
            }

            fn policies(&self) -> DbFuture<'_, Vec<(String, String)>> {
                Box::pin(async move {
                    sqlx::query_as::<$db, (String, String)>(
                        "SELECT name, body FROM policies ORDER BY name",
                    )
                    .fetch_all(&self.pool)
                    .await
                    .map_err(q("list policies"))
                })
            }

            fn add_enroll_token(
                &self,
                hash: &str,
                user: &str,
                now: u64,
                expires_at: u64,
            ) -> DbFuture<'_, ()> {
                let (hash, user) = (hash.to_string(), user.to_string());
                Box::pin(async move {
                    sqlx::query::<$db>(
                        "INSERT INTO enroll_tokens (token_hash, user_name, created_at, expires_at) \
                         VALUES ($1, $2, $3, $4)",
                    )
                    .bind(&hash)
                    .bind(&user)
                    .bind(ts(now))
                    .bind(ts(expires_at))
                    .execute(&self.pool)
                    .await
                    .map_err(q("store enrollment token"))?;
                    Ok(())
                })
            }

            fn enroll(
                &self,
                token_hash: &str,
                device: &DeviceRow,
                now: u64,
            ) -> DbFuture<'_, String> {
                let (hash, device) = (token_hash.to_string(), device.clone());
                Box::pin(async move {
                    let mut tx = self.pool.begin().await.map_err(q("begin enrollment"))?;
                    // Consume first: of two racing enrollments only one updates the row.
                    let user = sqlx::query_scalar::<$db, String>(
                        "UPDATE enroll_tokens SET used_at = $2, device_id = $3 \
                         WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2 \
                         RETURNING user_name",
                    )
                    .bind(&hash)
                    .bind(ts(now))
                    .bind(device.id.to_string())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(q("consume enrollment token"))?;
                    let Some(user) = user else {
                        let row = sqlx::query_as::<$db, (Option<i64>, i64)>(
                            "SELECT used_at, expires_at FROM enroll_tokens WHERE token_hash = $1",
                        )
                        .bind(&hash)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(q("read enrollment token"))?;
                        return Err(DbError::Token(match row {
                            None => TokenRefusal::Unknown,
                            Some((Some(_), _)) => TokenRefusal::Used,
                            Some((None, _)) => TokenRefusal::Expired,
                        }));
                    };
                    sqlx::query::<$db>(
                        "INSERT INTO devices (id, user_name, public_key, hostname, status, \
                         enrolled_at) VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(device.id.to_string())
                    .bind(&user)
                    .bind(device.public_key.to_base64())
                    .bind(&device.hostname)
                    .bind(DeviceStatus::Active.as_str())
                    .bind(ts(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(insert_err("insert device", || {
                        format!("device {} (or its key)", device.id)
                    }))?;
                    tx.commit().await.map_err(q("commit enrollment"))?;
                    Ok(user)
                })
            }

            fn device(&self, id: DeviceId) -> DbFuture<'_, Option<DeviceRow>> {
                Box::pin(async move {
                    let row = sqlx::query::<$db>("SELECT * FROM devices WHERE id = $1")
                        .bind(id.to_string())
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(q("read device"))?;
                    row.as_ref().map(Self::device_from).transpose()
                })
            }

            fn devices(&self) -> DbFuture<'_, Vec<DeviceRow>> {
                Box::pin(async move {
                    let rows =
                        sqlx::query::<$db>("SELECT * FROM devices ORDER BY enrolled_at, id")
                            .fetch_all(&self.pool)
                            .await
                            .map_err(q("list devices"))?;
                    rows.iter().map(Self::device_from).collect()
                })
            }

            fn record_checkin(
                &self,
                id: DeviceId,
                expected: DeviceStatus,
                now: u64,
                report_json: &str,
                lease_not_after: Option<u64>,
                audit: Vec<NewAudit>,
                nonce: Option<NewNonce>,
            ) -> DbFuture<'_, CheckinOutcome> {
                let report = report_json.to_string();
                Box::pin(async move {
                    let mut tx = self.pool.begin().await.map_err(q("begin check-in"))?;
                    // The nonce first: a replay waits on the first copy's row, then bails
                    // out before touching the device.
                    if let Some(n) = &nonce {
                        if !insert_nonce!($db, &mut *tx, n.device, &n.nonce, n.at) {
                            tx.rollback().await.map_err(q("roll back check-in"))?;
                            return Ok(CheckinOutcome::Replayed);
                        }
                    }
                    // The status test and the lease write are one statement: a kill ordered
                    // after the caller read the status makes this update match nothing.
                    let done = sqlx::query::<$db>(
                        "UPDATE devices SET last_checkin = $2, last_report = $3, \
                         lease_not_after = COALESCE($4, lease_not_after) \
                         WHERE id = $1 AND status = $5",
                    )
                    .bind(id.to_string())
                    .bind(ts(now))
                    .bind(&report)
                    .bind(lease_not_after.map(ts))
                    .bind(expected.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(q("record check-in"))?;
                    if done.rows_affected() == 0 {
                        tx.rollback().await.map_err(q("roll back check-in"))?;
                        return Ok(CheckinOutcome::StatusChanged);
                    }
                    for e in audit {
                        insert_audit!($db, &mut *tx, e);
                    }
                    tx.commit().await.map_err(q("commit check-in"))?;
                    Ok(CheckinOutcome::Recorded)
                })
            }

            fn order_kill(
                &self,
                id: DeviceId,
                actor: &str,
                reason: &str,
                now: u64,
            ) -> DbFuture<'_, ()> {
                let (actor, reason) = (actor.to_string(), reason.to_string());
                Box::pin(async move {
                    let done = sqlx::query::<$db>(
                        "UPDATE devices SET status = $2, kill_actor = $3, kill_reason = $4, \
                         kill_ordered_at = $5 WHERE id = $1 AND status = $6",
                    )
                    .bind(id.to_string())
                    .bind(DeviceStatus::KillPending.as_str())
                    .bind(&actor)
                    .bind(&reason)
                    .bind(ts(now))
                    .bind(DeviceStatus::Active.as_str())
                    .execute(&self.pool)
                    .await
                    .map_err(q("order kill"))?;
                    if done.rows_affected() == 0 {
                        return match self.device(id).await? {
                            None => Err(DbError::NotFound { what: format!("device {id}") }),
                            Some(d) => Err(DbError::Conflict {
                                what: format!("kill of device {id} (status {})", d.status),
                            }),
                        };
                    }
                    Ok(())
                })
            }

            fn complete_kill(&self, id: DeviceId, ack_json: &str, now: u64) -> DbFuture<'_, ()> {
                let ack = ack_json.to_string();
                Box::pin(async move {
                    let done = sqlx::query::<$db>(
                        "UPDATE devices SET status = $2, killed_at = $3, kill_ack = $4, \
                         lease_not_after = NULL WHERE id = $1 AND status = $5",
                    )
                    .bind(id.to_string())
                    .bind(DeviceStatus::Killed.as_str())
                    .bind(ts(now))
                    .bind(&ack)
                    .bind(DeviceStatus::KillPending.as_str())
                    .execute(&self.pool)
                    .await
                    .map_err(q("complete kill"))?;
                    if done.rows_affected() == 0 {
                        return Err(DbError::NotFound {
                            what: format!("pending kill of device {id}"),
                        });
                    }
                    Ok(())
                })
            }

            fn append_audit(&self, e: NewAudit) -> DbFuture<'_, ()> {
                Box::pin(async move {
                    insert_audit!($db, &self.pool, e);
                    Ok(())
                })
            }

            fn audit(&self, f: AuditFilter) -> DbFuture<'_, Vec<AuditEntry>> {
                Box::pin(async move {
                    // Newest `limit` entries, returned oldest first.
                    let rows = sqlx::query::<$db>(
                        "SELECT * FROM (SELECT * FROM audit \
                         WHERE ($1 IS NULL OR device_id = $1) AND at >= $2 \
                         ORDER BY id DESC LIMIT $3) AS recent ORDER BY id",
                    )
                    .bind(f.device.map(|d| d.to_string()))
                    .bind(ts(f.since.unwrap_or(0)))
                    .bind(i64::from(f.limit.unwrap_or(1000)))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(q("read audit"))?;
                    rows.iter().map(Self::audit_from).collect()
                })
            }

            fn create_session(&self, id_hash: &str, row: &SessionRow) -> DbFuture<'_, ()> {
                let (hash, row) = (id_hash.to_string(), row.clone());
                Box::pin(async move {
                    sqlx::query::<$db>(
                        "INSERT INTO console_sessions (id_hash, admin, csrf, created_at, \
                         expires_at) VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(&hash)
                    .bind(&row.admin)
                    .bind(&row.csrf)
                    .bind(ts(row.created_at))
                    .bind(ts(row.expires_at))
                    .execute(&self.pool)
                    .await
                    .map_err(insert_err("create session", || "session".to_string()))?;
                    Ok(())
                })
            }

            fn session(&self, id_hash: &str, now: u64) -> DbFuture<'_, Option<SessionRow>> {
                let hash = id_hash.to_string();
                Box::pin(async move {
                    let row = sqlx::query_as::<$db, (String, String, i64, i64)>(
                        "SELECT admin, csrf, created_at, expires_at FROM console_sessions \
                         WHERE id_hash = $1 AND expires_at > $2",
                    )
                    .bind(&hash)
                    .bind(ts(now))
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(q("read session"))?;
                    Ok(row.map(|(admin, csrf, c, e)| SessionRow {
                        admin,
                        csrf,
                        created_at: uts(c),
                        expires_at: uts(e),
                    }))
                })
            }

            fn delete_session(&self, id_hash: &str) -> DbFuture<'_, ()> {
                let hash = id_hash.to_string();
                Box::pin(async move {
                    sqlx::query::<$db>("DELETE FROM console_sessions WHERE id_hash = $1")
                        .bind(&hash)
                        .execute(&self.pool)
                        .await
                        .map_err(q("delete session"))?;
                    Ok(())
                })
            }

            fn prune_sessions(&self, now: u64) -> DbFuture<'_, u64> {
                Box::pin(async move {
                    let done =
                        sqlx::query::<$db>("DELETE FROM console_sessions WHERE expires_at <= $1")
                            .bind(ts(now))
                            .execute(&self.pool)
                            .await
                            .map_err(q("prune sessions"))?;
                    Ok(done.rows_affected())
                })
            }

            fn device_page(&self, query: &DeviceQuery) -> DbFuture<'_, DevicePage> {
                let f = query.clone();
                Box::pin(async move {
                    // Every filter is a bound value; "unset" is '' or -1. The sort column
                    // comes from a closed list.
                    const WHERE: &str = "WHERE ($1 = '' OR LOWER(id) LIKE $1 ESCAPE '\\' \
                         OR LOWER(hostname) LIKE $1 ESCAPE '\\' \
                         OR LOWER(user_name) LIKE $1 ESCAPE '\\') \
                         AND ($2 = '' OR status = $2) AND ($3 = '' OR user_name = $3) \
                         AND ($4 < 0 OR lease_not_after >= $4) \
                         AND ($5 < 0 OR lease_not_after < $5) \
                         AND ($6 < 0 OR COALESCE(last_checkin, enrolled_at) < $6)";
                    let search = f
                        .search
                        .as_deref()
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| console::like_pattern(s, true))
                        .unwrap_or_default();
                    let status = f.status.map(|s| s.as_str()).unwrap_or("");
                    let user = f.user.clone().unwrap_or_default();
                    let opt = |v: Option<u64>| v.map(ts).unwrap_or(-1);
                    let col = f.sort.column();
                    let dir = if f.descending { "DESC" } else { "ASC" };
                    let total = sqlx::query_scalar::<$db, i64>(&format!(
                        "SELECT COUNT(*) FROM devices {WHERE}"
                    ))
                    .bind(&search)
                    .bind(status)
                    .bind(&user)
                    .bind(opt(f.lease_from))
                    .bind(opt(f.lease_until))
                    .bind(opt(f.not_seen_since))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(q("count devices"))?;
                    let sql = format!(
                        "SELECT * FROM devices {WHERE} \
                         ORDER BY ({col} IS NULL), {col} {dir}, id {dir} LIMIT $7 OFFSET $8"
                    );
                    let rows = sqlx::query::<$db>(&sql)
                        .bind(&search)
                        .bind(status)
                        .bind(&user)
                        .bind(opt(f.lease_from))
                        .bind(opt(f.lease_until))
                        .bind(opt(f.not_seen_since))
                        .bind(i64::from(f.limit.clamp(1, DeviceQuery::MAX_LIMIT)))
                        .bind(ts(f.offset))
                        .fetch_all(&self.pool)
                        .await
                        .map_err(q("list devices"))?;
                    Ok(DevicePage {
                        total: uts(total),
                        devices: rows.iter().map(Self::device_from).collect::<Result<_, _>>()?,
                    })
                })
            }

            fn device_counts(&self) -> DbFuture<'_, Vec<(DeviceStatus, u64)>> {
                Box::pin(async move {
                    let rows = sqlx::query_as::<$db, (String, i64)>(
                        "SELECT status, COUNT(*) FROM devices GROUP BY status ORDER BY status",
                    )
                    .fetch_all(&self.pool)
                    .await
                    .map_err(q("count devices by state"))?;
                    rows.into_iter()
                        .map(|(s, n)| {
                            let st = s.parse().map_err(|_| DbError::Corrupt {
                                what: format!("device status {s:?}"),
                            })?;
                            Ok((st, uts(n)))
                        })
                        .collect()
                })
            }

            fn audit_search(&self, f: &AuditSearch) -> DbFuture<'_, Vec<AuditEntry>> {
                let f = f.clone();
                Box::pin(async move {
                    let prefix = |v: &Option<String>| {
                        v.as_deref()
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(|s| console::like_pattern(s, false))
                            .unwrap_or_default()
                    };
                    let rows = sqlx::query::<$db>(
                        "SELECT * FROM audit WHERE ($1 = '' OR device_id = $1) \
                         AND ($2 = '' OR LOWER(actor) LIKE $2 ESCAPE '\\') \
                         AND ($3 = '' OR LOWER(action) LIKE $3 ESCAPE '\\') \
                         AND ($4 < 0 OR id < $4) ORDER BY id DESC LIMIT $5",
                    )
                    .bind(f.device.map(|d| d.to_string()).unwrap_or_default())
                    .bind(prefix(&f.actor))
                    .bind(prefix(&f.action))
                    .bind(f.before_id.unwrap_or(-1))
                    .bind(i64::from(f.limit.unwrap_or(100).clamp(1, 1000)))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(q("search audit"))?;
                    rows.iter().map(Self::audit_from).collect()
                })
            }

            fn record_nonce(&self, device: DeviceId, nonce: &str, at: u64) -> DbFuture<'_, bool> {
                let nonce = nonce.to_string();
                Box::pin(async move { Ok(insert_nonce!($db, &self.pool, device, &nonce, at)) })
            }

            fn prune_nonces(&self, before: u64) -> DbFuture<'_, u64> {
                Box::pin(async move {
                    let done = sqlx::query::<$db>("DELETE FROM nonces WHERE at < $1")
                        .bind(ts(before))
                        .execute(&self.pool)
                        .await
                        .map_err(q("prune nonces"))?;
                    Ok(done.rows_affected())
                })
            }

            fn nonces_recorded_since(&self) -> DbFuture<'_, u64> {
                Box::pin(async move {
                    let at = sqlx::query_scalar::<$db, i64>(
                        "SELECT applied_at FROM tandem_schema WHERE version = $1",
                    )
                    .bind(migrations::NONCES_VERSION)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(q("read when nonces were first recorded"))?;
                    Ok(uts(at))
                })
            }
        }
    };
}

/// The embedded back-end: one SQLite file in WAL mode.
#[derive(Debug, Clone)]
pub struct SqliteDb {
    pool: sqlx::SqlitePool,
}

impl SqliteDb {
    /// Opens (creating) the file and migrates it.
    pub async fn open(path: &std::path::Path) -> Result<Self, DbError> {
        use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await
            .map_err(|source| DbError::Connect {
                url: format!("sqlite:{}", path.display()),
                source,
            })?;
        migrations::run_sqlite(&pool).await?;
        Ok(SqliteDb { pool })
    }
}

impl_db!(SqliteDb, sqlx::Sqlite, sqlx::sqlite::SqliteRow, "sqlite");

/// The scale-out back-end: PostgreSQL, shared by several server replicas.
#[derive(Debug, Clone)]
pub struct PgDb {
    pool: sqlx::PgPool,
}

impl PgDb {
    /// Connects and migrates. Fails within about five seconds when the server is down.
    pub async fn open(url: &DatabaseUrl) -> Result<Self, DbError> {
        let DatabaseUrl::Postgres(secret) = url else {
            return Err(DbError::BadUrl {
                url: url.to_string(),
            });
        };
        let opts: sqlx::postgres::PgConnectOptions =
            secret.expose().parse().map_err(|source| DbError::Connect {
                url: url.to_string(),
                source,
            })?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect_with(opts)
            .await
            .map_err(|source| DbError::Connect {
                url: url.to_string(),
                source,
            })?;
        migrations::run_postgres(&pool).await?;
        Ok(PgDb { pool })
    }
}

impl_db!(PgDb, sqlx::Postgres, sqlx::postgres::PgRow, "postgres");

/// Test support: a fresh, empty PostgreSQL database per test.
pub mod scratch {
    use super::{DatabaseUrl, DbError};

    /// Environment variable naming a PostgreSQL server for tests (any database on it).
    pub const ENV_URL: &str = "TANDEM_TEST_POSTGRES_URL";
    /// When `1`, PostgreSQL tests fail instead of skipping without [`ENV_URL`].
    pub const ENV_REQUIRE: &str = "TANDEM_REQUIRE_POSTGRES";

    /// The PostgreSQL server tests should use, or `None` to skip. Panics when
    /// [`ENV_REQUIRE`] is `1` and none is configured, so CI cannot silently skip.
    pub fn test_server() -> Option<String> {
        match std::env::var(ENV_URL) {
            Ok(u) if !u.is_empty() => Some(u),
            _ => {
                if std::env::var(ENV_REQUIRE).as_deref() == Ok("1") {
                    panic!("{ENV_REQUIRE}=1 but {ENV_URL} is not set: start PostgreSQL with scripts/postgres.sh");
                }
                eprintln!("skipping PostgreSQL half: {ENV_URL} is not set (scripts/postgres.sh start DIR)");
                None
            }
        }
    }

    /// Creates a new database with a random name on the server at `server_url` and
    /// returns its URL. Databases are cheap; tests never share one.
    pub async fn create(server_url: &str) -> Result<DatabaseUrl, DbError> {
        use sqlx::Connection as _;
        let name = format!("tandem_test_{}", tandem_proto::fleet::DeviceId::generate());
        let mut conn = sqlx::PgConnection::connect(server_url)
            .await
            .map_err(|source| DbError::Connect {
                url: super::url::redact(server_url),
                source,
            })?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .map_err(super::q("create scratch database"))?;
        let url = super::url::with_database(server_url, &name);
        DatabaseUrl::parse(&url)
    }
}
