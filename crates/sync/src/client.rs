//! HTTP client for the image endpoints of `tandem server`.
//!
//! Every request goes through a [`SignRequest`] hook that adds authentication headers: the
//! agent signs with its device key (see `tandem_proto::auth`), an admin tool adds a bearer
//! token, tests use [`NoAuth`]. An optional rate limit paces every byte received so a
//! background sync never saturates the laptop's link.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tandem_proto::api::ApiErrorBody;
use tandem_proto::manifest::{
    ChunkList, ChunkRequest, ChunkStat, ImageInfo, ManifestDelta, CHUNK_FRAME_HEADER,
};
use tandem_proto::{ChunkId, Signed};

use crate::{Progress, SyncError};

/// Adds authentication headers to one request.
pub trait SignRequest: Send + Sync {
    /// Headers for `method path_and_query` with this body.
    fn headers(&self, method: &str, path_and_query: &str, body: &[u8]) -> Vec<(String, String)>;
}

/// No authentication (tests, or a server that authenticates by network).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoAuth;

impl SignRequest for NoAuth {
    fn headers(&self, _: &str, _: &str, _: &[u8]) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// An admin bearer token. `Debug` hides it.
#[derive(Clone)]
pub struct BearerToken(pub String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(****)")
    }
}

impl SignRequest for BearerToken {
    fn headers(&self, _: &str, _: &str, _: &[u8]) -> Vec<(String, String)> {
        vec![("authorization".into(), format!("Bearer {}", self.0))]
    }
}

#[derive(Debug)]
struct RateLimit {
    bytes_per_sec: u64,
    state: Mutex<(Instant, u64)>,
}

/// A chunk as it arrives: verified plaintext length and a zstd frame or plaintext.
#[derive(Debug)]
pub struct FetchedChunk {
    /// Chunk id (checked by the caller before storing).
    pub id: ChunkId,
    /// Whether `bytes` is a zstd frame.
    pub zstd: bool,
    /// Plaintext length.
    pub raw_len: u32,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// The image-API client.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    signer: Arc<dyn SignRequest>,
    rate: Option<Arc<RateLimit>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish()
    }
}

impl Client {
    /// A client for the server at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str, signer: Arc<dyn SignRequest>) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()
                .expect("building an HTTP client with static settings cannot fail"),
            signer,
            rate: None,
        }
    }

    /// Limits received bytes per second (`None`: unlimited).
    pub fn with_rate_limit(mut self, bytes_per_sec: Option<u64>) -> Client {
        self.rate = bytes_per_sec.filter(|b| *b > 0).map(|b| {
            Arc::new(RateLimit {
                bytes_per_sec: b,
                state: Mutex::new((Instant::now(), 0)),
            })
        });
        self
    }

    /// Server base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn throttle(&self, n: usize) {
        let Some(r) = &self.rate else { return };
        let wait = {
            let mut s = r.state.lock().expect("rate mutex poisoned");
            s.1 += n as u64;
            let due = Duration::from_secs_f64(s.1 as f64 / r.bytes_per_sec as f64);
            due.checked_sub(s.0.elapsed())
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        extra: &[(&str, String)],
    ) -> Result<reqwest::Response, SyncError> {
        let url = format!("{}{}", self.base, path_and_query);
        let body_bytes = body.unwrap_or_default();
        let mut req = self.http.request(method.clone(), &url);
        for (k, v) in self
            .signer
            .headers(method.as_str(), path_and_query, &body_bytes)
        {
            req = req.header(k, v);
        }
        for (k, v) in extra {
            req = req.header(*k, v);
        }
        if !body_bytes.is_empty() {
            req = req
                .header("content-type", "application/json")
                .body(body_bytes);
        }
        let resp = req.send().await.map_err(|source| SyncError::Http {
            url: url.clone(),
            source,
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ApiErrorBody>(&text)
            .map(|b| b.message)
            .unwrap_or_else(|_| text.chars().take(300).collect());
        Err(SyncError::Status {
            url,
            status: status.as_u16(),
            message,
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, SyncError> {
        let resp = self.send(method, path_and_query, body, &[]).await?;
        let url = resp.url().to_string();
        let bytes = self.read_all(resp, 256 << 20).await?;
        serde_json::from_slice(&bytes).map_err(|e| SyncError::Protocol {
            url,
            reason: format!("not the JSON expected: {e}"),
        })
    }

    async fn read_all(&self, resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, SyncError> {
        let url = resp.url().to_string();
        let mut out = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|source| SyncError::Http {
                url: url.clone(),
                source,
            })?;
            self.throttle(piece.len()).await;
            if out.len() + piece.len() > limit {
                return Err(SyncError::Protocol {
                    url,
                    reason: format!("response larger than {limit} bytes"),
                });
            }
            out.extend_from_slice(&piece);
        }
        Ok(out)
    }

    /// Images and versions the caller may read.
    pub async fn images(&self) -> Result<Vec<ImageInfo>, SyncError> {
        self.json(reqwest::Method::GET, "/v1/images", None).await
    }

    /// Versions of one image the caller may read.
    pub async fn versions(&self, name: &str) -> Result<Vec<u64>, SyncError> {
        let info: ImageInfo = self
            .json(reqwest::Method::GET, &format!("/v1/images/{name}"), None)
            .await?;
        Ok(info.versions)
    }

    /// The signed manifest of a version (verify it before use).
    pub async fn manifest(&self, name: &str, version: u64) -> Result<Signed, SyncError> {
        self.json(
            reqwest::Method::GET,
            &format!("/v1/images/{name}/{version}/manifest"),
            None,
        )
        .await
    }

    /// The manifest of a version as a delta against one the caller holds.
    pub async fn manifest_delta(
        &self,
        name: &str,
        version: u64,
        against: u64,
    ) -> Result<ManifestDelta, SyncError> {
        self.json(
            reqwest::Method::GET,
            &format!("/v1/images/{name}/{version}/manifest?against={against}"),
            None,
        )
        .await
    }

    /// Size of the version delta `from -> to` (the server computes and caches it).
    pub async fn delta_size(&self, name: &str, from: u64, to: u64) -> Result<u64, SyncError> {
        let path = format!("/v1/images/{name}/{to}/delta?from={from}");
        let resp = self.send(reqwest::Method::HEAD, &path, None, &[]).await?;
        resp.headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| SyncError::Protocol {
                url: format!("{}{path}", self.base),
                reason: "no content-length".into(),
            })
    }

    /// Downloads the delta `from -> to` into `part`, continuing a partial download.
    /// Returns the bytes received by this call.
    pub async fn download_delta(
        &self,
        name: &str,
        from: u64,
        to: u64,
        part: &Path,
        progress: &dyn Progress,
    ) -> Result<u64, SyncError> {
        use tokio::io::AsyncWriteExt as _;
        let path = format!("/v1/images/{name}/{to}/delta?from={from}");
        let have = tokio::fs::metadata(part)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        let extra = if have > 0 {
            vec![("range", format!("bytes={have}-"))]
        } else {
            Vec::new()
        };
        let io = |source| SyncError::Io {
            path: part.to_path_buf(),
            source,
        };
        let resp = match self.send(reqwest::Method::GET, &path, None, &extra).await {
            // The part file is already complete.
            Err(SyncError::Status { status: 416, .. }) if have > 0 => return Ok(0),
            other => other?,
        };
        let resumed = resp.status() == reqwest::StatusCode::PARTIAL_CONTENT;
        let total = resp.content_length().unwrap_or(0) + if resumed { have } else { 0 };
        progress.start("delta", total);
        if resumed {
            progress.inc(have);
        }
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(part)
            .await
            .map_err(io)?;
        let url = resp.url().to_string();
        let mut got = 0u64;
        let mut stream = resp.bytes_stream();
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|source| SyncError::Http {
                url: url.clone(),
                source,
            })?;
            self.throttle(piece.len()).await;
            f.write_all(&piece).await.map_err(io)?;
            got += piece.len() as u64;
            progress.inc(piece.len() as u64);
        }
        f.sync_all().await.map_err(io)?;
        Ok(got)
    }

    /// What fetching these chunks would transfer.
    pub async fn stat_chunks(&self, req: &ChunkRequest) -> Result<ChunkStat, SyncError> {
        let body = serde_json::to_vec(req).expect("serializing plain data cannot fail");
        self.json(reqwest::Method::POST, "/v1/chunks/stat", Some(body))
            .await
    }

    /// Which of these chunks the server lacks (for uploads).
    pub async fn missing_chunks(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, SyncError> {
        let body = serde_json::to_vec(&ChunkList {
            chunks: ids.to_vec(),
        })
        .expect("serializing plain data cannot fail");
        let l: ChunkList = self
            .json(reqwest::Method::POST, "/v1/chunks/missing", Some(body))
            .await?;
        Ok(l.chunks)
    }

    /// Asks the server (as an admin) to sign and commit `m`, whose chunks must all be
    /// uploaded already. Returns the signed manifest.
    pub async fn commit_manifest(
        &self,
        m: &tandem_proto::manifest::Manifest,
    ) -> Result<Signed, SyncError> {
        let body = serde_json::to_vec(m).expect("serializing plain data cannot fail");
        let path = format!("/v1/images/{}/{}/manifest", m.name, m.version);
        let resp = self
            .send(reqwest::Method::PUT, &path, Some(body), &[])
            .await?;
        let url = resp.url().to_string();
        let bytes = self.read_all(resp, 256 << 20).await?;
        serde_json::from_slice(&bytes).map_err(|e| SyncError::Protocol {
            url,
            reason: format!("not a signed manifest: {e}"),
        })
    }

    /// Uploads one chunk's plaintext; the server refuses content that does not match `id`.
    pub async fn upload_chunk(&self, id: ChunkId, data: Vec<u8>) -> Result<(), SyncError> {
        let path = format!("/v1/chunks/{id}");
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.put(&url);
        for (k, v) in self.signer.headers("PUT", &path, &data) {
            req = req.header(k, v);
        }
        let resp = req
            .header("content-type", "application/octet-stream")
            .body(data)
            .send()
            .await
            .map_err(|source| SyncError::Http {
                url: url.clone(),
                source,
            })?;
        if resp.status().is_success() {
            Ok(())
        } else {
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            Err(SyncError::Status {
                url,
                status,
                message: serde_json::from_str::<ApiErrorBody>(&text)
                    .map(|b| b.message)
                    .unwrap_or(text),
            })
        }
    }

    /// Fetches chunks of one version in one streamed request; `on_chunk` gets each as it
    /// arrives (unverified: the caller checks it against its id). Returns bytes received.
    pub async fn fetch_chunks(
        &self,
        req: &ChunkRequest,
        max_chunk: u32,
        on_chunk: &mut (dyn FnMut(FetchedChunk) -> Result<(), SyncError> + Send),
        progress: &dyn Progress,
    ) -> Result<u64, SyncError> {
        let body = serde_json::to_vec(req).expect("serializing plain data cannot fail");
        let resp = self
            .send(reqwest::Method::POST, "/v1/chunks/fetch", Some(body), &[])
            .await?;
        let url = resp.url().to_string();
        let bad = |reason: String| SyncError::Protocol {
            url: url.clone(),
            reason,
        };
        let mut buf: Vec<u8> = Vec::new();
        let mut received = 0u64;
        let mut count = 0usize;
        let mut stream = resp.bytes_stream();
        loop {
            // Parse every complete frame in the buffer.
            loop {
                if buf.len() < CHUNK_FRAME_HEADER {
                    break;
                }
                let mut id = [0u8; 32];
                id.copy_from_slice(&buf[..32]);
                let flags = buf[32];
                let raw_len = u32::from_le_bytes(buf[33..37].try_into().expect("4 bytes"));
                let len = u32::from_le_bytes(buf[37..41].try_into().expect("4 bytes"));
                if raw_len > max_chunk || len > max_chunk + max_chunk / 16 + 1024 {
                    return Err(bad(format!(
                        "chunk frame claims {len} bytes ({raw_len} plain)"
                    )));
                }
                let end = CHUNK_FRAME_HEADER + len as usize;
                if buf.len() < end {
                    break;
                }
                count += 1;
                if count > req.chunks.len() {
                    return Err(bad("more chunks than asked for".into()));
                }
                let bytes = buf[CHUNK_FRAME_HEADER..end].to_vec();
                buf.drain(..end);
                on_chunk(FetchedChunk {
                    id: ChunkId(id),
                    zstd: flags & 1 != 0,
                    raw_len,
                    bytes,
                })?;
            }
            match stream.next().await {
                Some(piece) => {
                    let piece = piece.map_err(|source| SyncError::Http {
                        url: url.clone(),
                        source,
                    })?;
                    self.throttle(piece.len()).await;
                    received += piece.len() as u64;
                    progress.inc(piece.len() as u64);
                    buf.extend_from_slice(&piece);
                }
                None => break,
            }
        }
        if !buf.is_empty() {
            return Err(bad(format!(
                "stream ended inside a chunk frame ({} bytes left)",
                buf.len()
            )));
        }
        Ok(received)
    }
}
