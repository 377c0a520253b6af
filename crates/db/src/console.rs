//! Types of the admin console's queries: browser sessions, the paginated device search and
//! the filtered audit search. The SQL lives with the rest in `impl_db!` (one text, two
//! back-ends); this module holds the shapes and the pieces of SQL that are chosen from a
//! closed list (sort columns), so no caller text ever becomes SQL.

use tandem_proto::fleet::{DeviceId, DeviceStatus};

use crate::DeviceRow;

/// One signed-in browser session of the admin console. The database keys it by a hash of
/// the cookie value, so a read of the table does not yield usable cookies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    /// The admin credential's name (`admin:<name>` in the audit log).
    pub admin: String,
    /// The session's CSRF token, echoed by every form.
    pub csrf: String,
    /// Sign-in time.
    pub created_at: u64,
    /// The session ends at this time, whatever happens.
    pub expires_at: u64,
}

/// Column the device list is sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSort {
    /// Enrollment time (the default).
    #[default]
    Enrolled,
    /// Host name.
    Hostname,
    /// Owner.
    User,
    /// Lifecycle state.
    Status,
    /// Last check-in.
    LastCheckin,
    /// Lease end.
    Lease,
}

impl DeviceSort {
    /// Every sort, for building sort links.
    pub const ALL: [DeviceSort; 6] = [
        DeviceSort::Enrolled,
        DeviceSort::Hostname,
        DeviceSort::User,
        DeviceSort::Status,
        DeviceSort::LastCheckin,
        DeviceSort::Lease,
    ];

    /// The name used in URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceSort::Enrolled => "enrolled",
            DeviceSort::Hostname => "hostname",
            DeviceSort::User => "user",
            DeviceSort::Status => "status",
            DeviceSort::LastCheckin => "last-checkin",
            DeviceSort::Lease => "lease",
        }
    }

    /// Parses the URL name.
    pub fn parse(s: &str) -> Option<DeviceSort> {
        DeviceSort::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// The column: a fixed string, never caller text.
    pub(crate) fn column(self) -> &'static str {
        match self {
            DeviceSort::Enrolled => "enrolled_at",
            DeviceSort::Hostname => "hostname",
            DeviceSort::User => "user_name",
            DeviceSort::Status => "status",
            DeviceSort::LastCheckin => "last_checkin",
            DeviceSort::Lease => "lease_not_after",
        }
    }
}

/// Which devices to list, in what order, which page. Filters combine with AND; the
/// database does the filtering, counting and paging (never the server's memory).
#[derive(Debug, Clone, Default)]
pub struct DeviceQuery {
    /// Case-insensitive substring of the id, host name or owner.
    pub search: Option<String>,
    /// Only devices in this state.
    pub status: Option<DeviceStatus>,
    /// Only devices of this user.
    pub user: Option<String>,
    /// Only devices whose lease ends at or after this time.
    pub lease_from: Option<u64>,
    /// Only devices whose lease ends before this time.
    pub lease_until: Option<u64>,
    /// Only devices not seen (no check-in, or enrolled without one) since this time.
    pub not_seen_since: Option<u64>,
    /// Sort column.
    pub sort: DeviceSort,
    /// Descending order.
    pub descending: bool,
    /// Rows to skip.
    pub offset: u64,
    /// Rows to return (capped at [`DeviceQuery::MAX_LIMIT`]).
    pub limit: u32,
}

impl DeviceQuery {
    /// Largest page.
    pub const MAX_LIMIT: u32 = 500;
}

/// One page of devices and the number of devices matching the filters.
#[derive(Debug, Clone)]
pub struct DevicePage {
    /// Matching devices in all pages.
    pub total: u64,
    /// This page.
    pub devices: Vec<DeviceRow>,
}

/// Which audit entries to read, newest first, one page at a time.
#[derive(Debug, Clone, Default)]
pub struct AuditSearch {
    /// Only this device.
    pub device: Option<DeviceId>,
    /// Only actors starting with this (`admin:` for every admin, `admin:alice` for one).
    pub actor: Option<String>,
    /// Only actions starting with this (`device.` or `device.kill-ordered`).
    pub action: Option<String>,
    /// Only entries with an id below this (the next page starts below the last id seen).
    pub before_id: Option<i64>,
    /// At most this many (default 100, capped at 1000).
    pub limit: Option<u32>,
}

/// `text` as a LIKE pattern matching itself literally (`\` escapes), lower-cased, with
/// `%` added where asked.
pub(crate) fn like_pattern(text: &str, leading: bool) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    if leading {
        out.push('%');
    }
    for c in text.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns_escape_wildcards() {
        assert_eq!(like_pattern("Lap_1%", true), "%lap\\_1\\%%");
        assert_eq!(like_pattern("admin:", false), "admin:%");
        assert_eq!(like_pattern("a\\b", false), "a\\\\b%");
    }

    #[test]
    fn sorts_round_trip_through_their_url_names() {
        for s in DeviceSort::ALL {
            assert_eq!(DeviceSort::parse(s.as_str()), Some(s));
        }
        assert_eq!(DeviceSort::parse("id; DROP TABLE devices"), None);
    }
}
