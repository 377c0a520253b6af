//! Choosing a back-end from a URL, and keeping passwords out of logs.

use std::fmt;
use std::path::PathBuf;

use crate::DbError;

/// A PostgreSQL URL; `Debug` and `Display` hide the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// The full URL, for the driver only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({})", redact(&self.0))
    }
}

/// Where the metadata lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database.
    Postgres(SecretUrl),
}

impl DatabaseUrl {
    /// Accepts `sqlite:PATH`, `sqlite://PATH`, `postgres://…` and `postgresql://…`.
    pub fn parse(s: &str) -> Result<Self, DbError> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(DatabaseUrl::Postgres(SecretUrl(s.to_string())))
        } else if let Some(rest) = s.strip_prefix("sqlite://").or(s.strip_prefix("sqlite:")) {
            if rest.is_empty() {
                return Err(DbError::BadUrl { url: s.to_string() });
            }
            Ok(DatabaseUrl::Sqlite(PathBuf::from(rest)))
        } else {
            Err(DbError::BadUrl { url: redact(s) })
        }
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrl::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            DatabaseUrl::Postgres(u) => f.write_str(&redact(&u.0)),
        }
    }
}

/// Replaces the password in `scheme://user:password@host…` with `****`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:****@{host}"),
        None => url.to_string(),
    }
}

/// The same server URL with another database name.
pub(crate) fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let (scheme, rest) = base.split_once("://").unwrap_or(("postgres", base));
    let host = rest.split('/').next().unwrap_or(rest);
    match query {
        Some(q) => format!("{scheme}://{host}/{db}?{q}"),
        None => format!("{scheme}://{host}/{db}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_choose_backends_and_hide_passwords() {
        let u = DatabaseUrl::parse("postgres://tandem:hunter2@127.0.0.1:5432/db").expect("pg");
        assert!(!format!("{u} {u:?}").contains("hunter2"));
        assert_eq!(
            DatabaseUrl::parse("sqlite:/tmp/x.db").expect("sqlite"),
            DatabaseUrl::Sqlite("/tmp/x.db".into())
        );
        assert!(DatabaseUrl::parse("mysql://x").is_err());
        assert_eq!(
            with_database("postgres://u@h:1/postgres?sslmode=disable", "t1"),
            "postgres://u@h:1/t1?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://u@h:1", "t1"),
            "postgres://u@h:1/t1"
        );
    }
}
