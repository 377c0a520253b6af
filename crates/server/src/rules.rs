//! Distribution of the signed scan rule bundle.
//!
//! IT signs a bundle with the server's rules key (`tandem scan bundle sign --data DIR …
//! -o DIR/rules/current.json`); the server serves that file as is at `GET /v1/rules` and
//! announces its version in every target state. Agents verify it against the rules key
//! they pinned at enrollment and never go back to an older version.

use std::path::{Path, PathBuf};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use crate::auth::Caller;
use crate::error::ApiError;

/// Where the current bundle lives in a data directory.
pub fn bundle_path(data_dir: &Path) -> PathBuf {
    data_dir.join("rules").join("current.json")
}

/// The current bundle, if IT published one.
pub fn current(data_dir: &Path) -> Option<tandem_proto::Signed> {
    let bytes = std::fs::read(bundle_path(data_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The current bundle's version, as announced in target states (read from the payload;
/// agents verify the signature before they use it).
pub fn current_version(data_dir: &Path) -> Option<u64> {
    let signed = current(data_dir)?;
    let payload: serde_json::Value = serde_json::from_str(&signed.payload).ok()?;
    payload["version"].as_u64()
}

/// `GET /v1/rules`; mount behind authentication.
pub fn routes(data_dir: PathBuf) -> Router {
    Router::new()
        .route("/v1/rules", get(get_rules))
        .with_state(data_dir)
}

async fn get_rules(
    State(data_dir): State<PathBuf>,
    _caller: Caller,
) -> Result<Json<tandem_proto::Signed>, ApiError> {
    current(&data_dir)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound("no scan rule bundle has been published".into()))
}
