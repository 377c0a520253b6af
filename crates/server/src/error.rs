//! One error type for every handler. A 4xx echoes the client's mistake; a 5xx says
//! little, logs the details under a request id and returns that id.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tandem_proto::api::ApiErrorBody;

/// Why a request failed, and what the client is told.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body or a parameter is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The caller did not prove who it is.
    #[error("{message}")]
    Unauthorized {
        /// Stable code, e.g. `bad_signature`.
        code: &'static str,
        /// For people.
        message: String,
    },
    /// The caller is known but may not do this.
    #[error("{message}")]
    Forbidden {
        /// Stable code, e.g. `device_killed`.
        code: &'static str,
        /// For people.
        message: String,
    },
    /// No such thing.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// The body is larger than this endpoint reads.
    #[error("request body larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// Our fault: logged, not shown.
    #[error("internal error")]
    Internal(#[from] InternalError),
}

/// Server-side failures, never shown to clients.
#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    /// The chunk store or a data file failed.
    #[error("storage: {0}")]
    Storage(String),
    /// The metadata database failed.
    #[error(transparent)]
    Db(#[from] tandem_db::DbError),
    /// A stored value does not parse.
    #[error("stored {what} does not parse: {source}")]
    Stored {
        /// Which value.
        what: &'static str,
        /// Why.
        source: serde_json::Error,
    },
}

impl From<tandem_db::DbError> for ApiError {
    fn from(e: tandem_db::DbError) -> Self {
        use tandem_db::DbError as E;
        match e {
            E::Conflict { what } => ApiError::Conflict(format!("{what} already exists")),
            E::NotFound { what } => ApiError::NotFound(format!("{what} not found")),
            E::Token(r) => ApiError::Unauthorized {
                code: "token_refused",
                message: format!("enrollment token refused: {r}"),
            },
            other => ApiError::Internal(InternalError::Db(other)),
        }
    }
}

impl From<crate::keys::EscrowError> for ApiError {
    fn from(e: crate::keys::EscrowError) -> Self {
        use crate::keys::EscrowError as E;
        match e {
            E::Malformed => ApiError::BadRequest(e.to_string()),
            E::Exists(_) => ApiError::Conflict(e.to_string()),
            E::Missing(_) => ApiError::NotFound(e.to_string()),
            other => ApiError::Internal(InternalError::Storage(other.to_string())),
        }
    }
}

impl ApiError {
    /// Stable code and status.
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized { code, .. } => (StatusCode::UNAUTHORIZED, code),
            ApiError::Forbidden { code, .. } => (StatusCode::FORBIDDEN, code),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        let body = match &self {
            ApiError::Internal(e) => {
                let request_id = hex::encode(rand::random::<[u8; 8]>());
                tracing::error!(request_id, error = %e, "request failed");
                ApiErrorBody {
                    code: code.into(),
                    message: "internal server error; the server log has the details".into(),
                    request_id: Some(request_id),
                }
            }
            other => {
                tracing::debug!(code, error = %other, "request refused");
                ApiErrorBody {
                    code: code.into(),
                    message: other.to_string(),
                    request_id: None,
                }
            }
        };
        (status, axum::Json(body)).into_response()
    }
}

/// Parses a JSON body with a size limit, as a 4xx on failure.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
    limit: usize,
) -> Result<T, ApiError> {
    if body.len() > limit {
        return Err(ApiError::TooLarge { limit });
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("malformed body: {e}")))
}
