//! HTTP to the server: unsigned enrollment, and requests signed with the device key.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tandem_proto::api::ApiErrorBody;

use crate::identity::Identity;

/// A request to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The HTTP client could not be built.
    #[error("cannot set up HTTP: {0}")]
    Setup(reqwest::Error),
    /// The server could not be reached or the connection broke: retrying can help.
    #[error("server {url} unreachable: {source}")]
    Unreachable {
        /// What we called.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The server answered with an error.
    #[error("server refused {url} ({status} {}): {}", body.code, body.message)]
    Refused {
        /// What we called.
        url: String,
        /// HTTP status.
        status: u16,
        /// The server's error body.
        body: ApiErrorBody,
    },
    /// The answer was not what the protocol says.
    #[error("server answer from {url} is malformed: {why}")]
    Malformed {
        /// What we called.
        url: String,
        /// Why.
        why: String,
    },
}

impl ClientError {
    /// Whether trying again later may succeed (network trouble, server overload).
    pub fn is_temporary(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Refused { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// The server's error code, if it answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Refused { body, .. } => Some(&body.code),
            _ => None,
        }
    }
}

/// The agent's HTTP client: short timeouts, so an unreachable server never blocks the
/// laptop for long.
pub fn http() -> Result<reqwest::Client, ClientError> {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .map_err(ClientError::Setup)
}

/// Reads a response: its body when the status is a success, else the server's error.
async fn body_of(
    url: &str,
    resp: Result<reqwest::Response, reqwest::Error>,
) -> Result<Vec<u8>, ClientError> {
    const LIMIT: usize = 16 * 1024 * 1024;
    let resp = resp.map_err(|source| ClientError::Unreachable {
        url: url.to_string(),
        source,
    })?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|source| ClientError::Unreachable {
            url: url.to_string(),
            source,
        })?;
    if bytes.len() > LIMIT {
        return Err(ClientError::Malformed {
            url: url.to_string(),
            why: format!("answer larger than {LIMIT} bytes"),
        });
    }
    if !status.is_success() {
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| ApiErrorBody {
            code: "http".into(),
            message: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
            request_id: None,
        });
        return Err(ClientError::Refused {
            url: url.to_string(),
            status: status.as_u16(),
            body,
        });
    }
    Ok(bytes.to_vec())
}

async fn finish<R: DeserializeOwned>(
    url: String,
    resp: Result<reqwest::Response, reqwest::Error>,
) -> Result<R, ClientError> {
    let bytes = body_of(&url, resp).await?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Malformed {
        url,
        why: e.to_string(),
    })
}

/// Sends raw bytes signed with the device key and returns the raw answer (chunk uploads
/// and downloads). An empty body for a `GET`.
pub async fn signed_bytes(
    http: &reqwest::Client,
    id: &Identity,
    method: reqwest::Method,
    path: &str,
    body: Vec<u8>,
) -> Result<Vec<u8>, ClientError> {
    let url = format!("{}{path}", id.info.server);
    let mut req = http.request(method.clone(), &url);
    for (name, value) in id.sign_request(method.as_str(), path, &body) {
        req = req.header(name, value);
    }
    body_of(&url, req.body(body).send().await).await
}

/// POSTs JSON without a device signature (enrollment only).
pub async fn post_unsigned<B: Serialize, R: DeserializeOwned>(
    http: &reqwest::Client,
    server: &str,
    path: &str,
    body: &B,
) -> Result<R, ClientError> {
    let url = format!("{server}{path}");
    let resp = http.post(&url).json(body).send().await;
    finish(url, resp).await
}

/// Sends a request signed with the device key.
pub async fn signed<B: Serialize, R: DeserializeOwned>(
    http: &reqwest::Client,
    id: &Identity,
    method: reqwest::Method,
    path: &str,
    body: Option<&B>,
) -> Result<R, ClientError> {
    let url = format!("{}{path}", id.info.server);
    let bytes = match body {
        Some(b) => serde_json::to_vec(b).expect("serializing plain data cannot fail"),
        None => Vec::new(),
    };
    let mut req = http.request(method.clone(), &url);
    for (name, value) in id.sign_request(method.as_str(), path, &bytes) {
        req = req.header(name, value);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json").body(bytes);
    }
    finish(url, req.send().await).await
}
