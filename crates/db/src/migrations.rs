//! Append-only schema migrations, one list per back-end. Version N is `LIST[N-1]`.
//! NEVER edit or reorder an entry once committed: add a new one at the end. Both lists
//! must describe the same tables and columns (a test compares their lengths).

use tandem_tools::clock::now_secs_i64 as now;

use crate::DbError;

/// SQLite schema, in order.
pub const SQLITE: &[&str] = &[
    // 1: the fleet model.
    r#"
CREATE TABLE admins (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
CREATE TABLE policies (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
INSERT INTO policies (name, body, updated_at) VALUES ('default', '{}', 0);
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    policy TEXT NOT NULL REFERENCES policies(name),
    corp_image TEXT,
    corp_version INTEGER,
    pers_image TEXT,
    pers_version INTEGER,
    created_at INTEGER NOT NULL
);
CREATE TABLE enroll_tokens (
    token_hash TEXT PRIMARY KEY,
    user_name TEXT NOT NULL REFERENCES users(name),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    device_id TEXT
);
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    user_name TEXT NOT NULL REFERENCES users(name),
    public_key TEXT NOT NULL UNIQUE,
    hostname TEXT NOT NULL,
    status TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL,
    last_checkin INTEGER,
    last_report TEXT,
    lease_not_after INTEGER,
    kill_actor TEXT,
    kill_reason TEXT,
    kill_ordered_at INTEGER,
    killed_at INTEGER,
    kill_ack TEXT
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    device_id TEXT,
    reason TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX audit_device ON audit (device_id, id);
CREATE INDEX audit_at ON audit (at);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"#,
    // 2: admin console sessions (shared by replicas); indexes for the console's device
    // list (sort and filter in SQL at fleet scale).
    r#"
CREATE TABLE console_sessions (
    id_hash TEXT PRIMARY KEY,
    admin TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);
CREATE INDEX devices_user ON devices (user_name);
CREATE INDEX devices_status ON devices (status);
CREATE INDEX devices_hostname ON devices (hostname);
CREATE INDEX devices_enrolled ON devices (enrolled_at);
CREATE INDEX devices_last_checkin ON devices (last_checkin);
CREATE INDEX devices_lease ON devices (lease_not_after);
"#,
    // 3: request nonces, shared by replicas (replay protection); `at` is the request's
    // signed time, by which old rows are pruned.
    r#"
CREATE TABLE nonces (
    device_id TEXT NOT NULL,
    nonce TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (device_id, nonce)
) WITHOUT ROWID;
CREATE INDEX nonces_at ON nonces (at);
"#,
];

/// PostgreSQL schema, in order.
pub const POSTGRES: &[&str] = &[
    // 1: the fleet model.
    r#"
CREATE TABLE admins (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
CREATE TABLE policies (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
INSERT INTO policies (name, body, updated_at) VALUES ('default', '{}', 0);
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    policy TEXT NOT NULL REFERENCES policies(name),
    corp_image TEXT,
    corp_version BIGINT,
    pers_image TEXT,
    pers_version BIGINT,
    created_at BIGINT NOT NULL
);
CREATE TABLE enroll_tokens (
    token_hash TEXT PRIMARY KEY,
    user_name TEXT NOT NULL REFERENCES users(name),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    device_id TEXT
);
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    user_name TEXT NOT NULL REFERENCES users(name),
    public_key TEXT NOT NULL UNIQUE,
    hostname TEXT NOT NULL,
    status TEXT NOT NULL,
    enrolled_at BIGINT NOT NULL,
    last_checkin BIGINT,
    last_report TEXT,
    lease_not_after BIGINT,
    kill_actor TEXT,
    kill_reason TEXT,
    kill_ordered_at BIGINT,
    killed_at BIGINT,
    kill_ack TEXT
);
CREATE TABLE audit (
    id BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    device_id TEXT,
    reason TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX audit_device ON audit (device_id, id);
CREATE INDEX audit_at ON audit (at);
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit
FOR EACH ROW EXECUTE FUNCTION audit_append_only();
"#,
    // 2: admin console sessions (shared by replicas); indexes for the console's device
    // list (sort and filter in SQL at fleet scale).
    r#"
CREATE TABLE console_sessions (
    id_hash TEXT PRIMARY KEY,
    admin TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);
CREATE INDEX devices_user ON devices (user_name);
CREATE INDEX devices_status ON devices (status);
CREATE INDEX devices_hostname ON devices (hostname);
CREATE INDEX devices_enrolled ON devices (enrolled_at);
CREATE INDEX devices_last_checkin ON devices (last_checkin);
CREATE INDEX devices_lease ON devices (lease_not_after);
"#,
    // 3: request nonces, shared by replicas (replay protection); `at` is the request's
    // signed time, by which old rows are pruned.
    r#"
CREATE TABLE nonces (
    device_id TEXT NOT NULL,
    nonce TEXT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (device_id, nonce)
);
CREATE INDEX nonces_at ON nonces (at);
"#,
];

/// The migration that creates the `nonces` table: the time it was applied is when the
/// database started recording nonces ([`crate::Db::nonces_recorded_since`]).
pub const NONCES_VERSION: i64 = 3;

const CREATE_SCHEMA_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS tandem_schema (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)";

macro_rules! runner {
    ($fn:ident, $pool:ty, $db:ty, $list:expr, $lock:expr) => {
        /// Applies the missing migrations in one transaction.
        pub async fn $fn(pool: &$pool) -> Result<(), DbError> {
            let known = $list.len() as i64;
            let mut tx = pool
                .begin()
                .await
                .map_err(|source| DbError::Migrate { version: 0, source })?;
            if let Some(lock) = $lock {
                sqlx::query::<$db>(lock)
                    .execute(&mut *tx)
                    .await
                    .map_err(|source| DbError::Migrate { version: 0, source })?;
            }
            sqlx::raw_sql(CREATE_SCHEMA_TABLE)
                .execute(&mut *tx)
                .await
                .map_err(|source| DbError::Migrate { version: 0, source })?;
            let found: Option<i64> =
                sqlx::query_scalar::<$db, Option<i64>>("SELECT MAX(version) FROM tandem_schema")
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(|source| DbError::Migrate { version: 0, source })?;
            let found = found.unwrap_or(0);
            if found > known {
                return Err(DbError::TooNew { found, known });
            }
            for (i, sql) in $list.iter().enumerate().skip(found as usize) {
                let version = i as i64 + 1;
                sqlx::raw_sql(sql)
                    .execute(&mut *tx)
                    .await
                    .map_err(|source| DbError::Migrate { version, source })?;
                sqlx::query::<$db>(
                    "INSERT INTO tandem_schema (version, applied_at) VALUES ($1, $2)",
                )
                .bind(version)
                .bind(now())
                .execute(&mut *tx)
                .await
                .map_err(|source| DbError::Migrate { version, source })?;
                tracing::info!(version, "applied schema migration");
            }
            tx.commit().await.map_err(|source| DbError::Migrate {
                version: known,
                source,
            })?;
            Ok(())
        }
    };
}

runner!(
    run_sqlite,
    sqlx::SqlitePool,
    sqlx::Sqlite,
    SQLITE,
    None::<&str>
);
runner!(
    run_postgres,
    sqlx::PgPool,
    sqlx::Postgres,
    POSTGRES,
    Some("SELECT pg_advisory_xact_lock(7346716)")
);

#[cfg(test)]
mod tests {
    #[test]
    fn both_backends_have_the_same_number_of_migrations() {
        assert_eq!(super::SQLITE.len(), super::POSTGRES.len());
    }

    #[test]
    fn nonces_version_names_the_migration_that_creates_the_table() {
        let i = super::NONCES_VERSION as usize - 1;
        assert!(super::SQLITE[i].contains("CREATE TABLE nonces"));
        assert!(super::POSTGRES[i].contains("CREATE TABLE nonces"));
    }
}
