//! Bodies shared by the HTTP server and its clients.

use serde::{Deserialize, Serialize};

/// The body of every non-2xx HTTP response. A 4xx echoes the client's mistake in
/// `message`; a 5xx says little and carries a `request_id` that finds the details in the
/// server's log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiErrorBody {
    /// Stable machine-readable code, e.g. `not_found`, `bad_signature`, `device_killed`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// Correlates a 5xx with the server log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}
