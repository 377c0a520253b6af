//! Image serving: manifests, version deltas, batched chunk fetches, and uploads.
//!
//! | method + path                                   | who            | what |
//! |-------------------------------------------------|----------------|------|
//! | `GET /v1/images`                                | any caller     | images and the versions the caller may read |
//! | `GET /v1/images/{name}`                         | any caller     | one image's readable versions |
//! | `GET /v1/images/{name}/{v}/manifest[?against=a]`| may read v     | signed manifest, or a manifest delta against a |
//! | `GET/HEAD /v1/images/{name}/{v}/delta?from=a`   | may read v     | 4 KiB version delta a->v (cached; `Range: bytes=N-` resumes) |
//! | `PUT /v1/images/{name}/{v}/manifest`            | admin          | sign and commit an uploaded manifest whose chunks are all stored |
//! | `POST /v1/chunks/fetch`                         | may read v     | stream of chunk frames for ids that belong to version v |
//! | `POST /v1/chunks/stat`                          | may read v     | bytes such a fetch would move (dry runs) |
//! | `POST /v1/chunks/missing`                       | any caller     | which ids the server lacks (uploaders send only those) |
//! | `PUT /v1/chunks/{id}`                           | any caller     | store one chunk; refused unless its BLAKE3 is `id` |
//!
//! Authentication happens before these handlers: the fleet server's middleware puts the
//! authenticated [`Caller`] in the request extensions. A request without one is refused
//! (401), so forgetting the middleware fails closed. Authorization is the [`ImageAccess`]
//! hook, checked in every handler: a device reads only versions assigned to it, and a chunk
//! fetch names the version it is for and may only ask for chunks of that version.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use tandem_proto::api::ApiErrorBody;
use tandem_proto::manifest::{
    ChunkList, ChunkRequest, ChunkStat, ImageInfo, Manifest, ManifestDelta, CHUNK_FRAME_HEADER,
    MAX_CHUNKS_PER_REQUEST,
};
use tandem_proto::{ChunkId, PublicKey};
use tandem_store::Store;
use tandem_sync::{Catalog, SyncError};
use tandem_tools::atomic::{TempFile, DEFAULT_MODE};

/// Who is asking, as established by the authentication middleware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An administrator (bearer token).
    Admin,
    /// An enrolled device, by id.
    Device(String),
}

/// Decides which image versions a caller may read. The fleet server implements it from its
/// assignments; admins may read everything.
pub trait ImageAccess: Send + Sync + 'static {
    /// Whether `caller` may read `image` at `version`.
    fn may_read(&self, caller: &Caller, image: &str, version: u64) -> bool;

    /// Whether `caller` may name `image` at `version` as the *base* of a delta
    /// (`delta?from=`) or a manifest delta (`manifest?against=`): a version it may read or
    /// already holds. The base matters as much as the target: a delta reveals which blocks
    /// the two versions share, and every (base, target) pair costs a computation and a
    /// cached file.
    fn may_use_base(&self, caller: &Caller, image: &str, version: u64) -> bool {
        self.may_read(caller, image, version)
    }
}

/// Admins read everything, devices nothing: for a server without device assignments yet.
#[derive(Debug, Default, Clone, Copy)]
pub struct AdminOnly;

impl ImageAccess for AdminOnly {
    fn may_read(&self, caller: &Caller, _: &str, _: u64) -> bool {
        *caller == Caller::Admin
    }
}

/// Everyone reads everything (single-user test setups on loopback only).
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

impl ImageAccess for AllowAll {
    fn may_read(&self, _: &Caller, _: &str, _: u64) -> bool {
        true
    }
}

/// Opening the image service failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageServiceError {
    /// The keys could not be loaded.
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] tandem_store::StoreError),
}

/// Everything the image handlers need: the store, the catalog, the image key.
pub struct ImageService {
    store: Arc<Store>,
    catalog: Catalog,
    trusted: Vec<PublicKey>,
    access: Arc<dyn ImageAccess>,
    chunk_sets: Mutex<HashMap<(String, u64), ChunkSet>>,
    /// One delta computation at a time: a burst of requests for uncached deltas queues
    /// instead of taking every core and the disk.
    computing: Mutex<()>,
}

/// The chunk ids of one version, cached for authorizing chunk fetches.
type ChunkSet = Arc<HashSet<ChunkId>>;

impl std::fmt::Debug for ImageService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageService")
            .field("catalog", &self.catalog.root())
            .finish()
    }
}

impl ImageService {
    /// Opens `<data>/store` and `<data>/images` with the server's image key.
    pub fn open(
        data: &Path,
        access: Arc<dyn ImageAccess>,
    ) -> Result<Arc<ImageService>, ImageServiceError> {
        let keys = crate::keys::ServerKeys::load_or_create(data)?;
        let store = Arc::new(Store::open(&data.join("store"))?);
        let trusted = vec![keys.image.public()];
        Ok(Arc::new(ImageService {
            store,
            catalog: Catalog::new(&data.join("images")),
            trusted,
            access,
            chunk_sets: Mutex::new(HashMap::new()),
            computing: Mutex::new(()),
        }))
    }

    /// The store (shared with backups).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn manifest(
        &self,
        name: &str,
        version: u64,
    ) -> Result<(Manifest, tandem_proto::Signed), ApiError> {
        self.catalog
            .load(name, version, &self.trusted)
            .map_err(ApiError::from_sync)
    }

    fn chunk_set(&self, name: &str, version: u64) -> Result<Arc<HashSet<ChunkId>>, ApiError> {
        let key = (name.to_string(), version);
        if let Some(s) = self
            .chunk_sets
            .lock()
            .expect("set mutex poisoned")
            .get(&key)
        {
            return Ok(s.clone());
        }
        let (m, _) = self.manifest(name, version)?;
        let set = Arc::new(m.chunk_set());
        let mut sets = self.chunk_sets.lock().expect("set mutex poisoned");
        if sets.len() > 64 {
            sets.clear();
        }
        sets.insert(key, set.clone());
        Ok(set)
    }

    fn ensure_blocks(&self, m: &Manifest) -> Result<Vec<[u8; 16]>, ApiError> {
        if let Ok(b) = self.catalog.load_blocks(&m.name, m.version) {
            return Ok(b);
        }
        // Uploaded versions have no block table yet: derive it from the stored chunks.
        let reader = tandem_store::ImageReader::open(self.store.clone(), m.clone())
            .map_err(|e| ApiError::internal(&e))?;
        let mut blocks = Vec::with_capacity(m.size.div_ceil(4096) as usize);
        let mut buf = vec![0u8; m.chunk_size as usize];
        for i in 0..m.chunks.len() as u64 {
            let len = m.chunk_len(i) as usize;
            reader
                .read_at(&mut buf[..len], i * u64::from(m.chunk_size))
                .map_err(|e| ApiError::internal(&e))?;
            blocks.extend(
                buf[..len]
                    .chunks(4096)
                    .map(tandem_store::ingest::block_hash),
            );
        }
        self.catalog
            .save_blocks(&m.name, m.version, &blocks)
            .map_err(|e| ApiError::internal(&e))?;
        Ok(blocks)
    }

    /// Computes (once) and returns the path of the cached delta `from -> to`.
    fn delta_file(&self, name: &str, from: u64, to: u64) -> Result<PathBuf, ApiError> {
        let path = self
            .catalog
            .delta_path(name, from, to)
            .map_err(ApiError::from_sync)?;
        if path.exists() {
            return Ok(path);
        }
        let _one_at_a_time = self.computing.lock().expect("delta mutex poisoned");
        if path.exists() {
            return Ok(path);
        }
        let (old, _) = self.manifest(name, from)?;
        let (new, _) = self.manifest(name, to)?;
        if old.chunk_size != new.chunk_size {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "no_delta",
                format!("v{from} and v{to} use different chunk sizes; fetch chunks instead"),
            ));
        }
        let ob = self.ensure_blocks(&old)?;
        let nb = self.ensure_blocks(&new)?;
        // Two requests for one delta each write their own temp file; the last rename wins.
        (|| -> Result<(), String> {
            let mut tmp = TempFile::beside(&path, DEFAULT_MODE).map_err(|e| e.to_string())?;
            let mut w = std::io::BufWriter::new(tmp.file());
            tandem_sync::delta::compute(&self.store, &old, &ob, &new, &nb, &mut w)
                .map_err(|e| e.to_string())?;
            w.into_inner().map_err(|e| e.to_string())?;
            tmp.persist().map_err(|e| e.to_string())
        })()
        .map_err(|e| ApiError::internal(&e))?;
        tracing::info!(image = name, from, to, "delta computed");
        Ok(path)
    }
}

/// An error response: a 4xx echoes the client's mistake, a 5xx says little and logs.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ApiErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ApiErrorBody {
                code: code.into(),
                message: message.into(),
                request_id: None,
            },
        }
    }

    fn internal(e: &dyn std::fmt::Display) -> ApiError {
        let id = format!("{:016x}", rand::random::<u64>());
        tracing::error!(request_id = %id, "image request failed: {e}");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            body: ApiErrorBody {
                code: "internal".into(),
                message: "internal error; see the server log".into(),
                request_id: Some(id),
            },
        }
    }

    fn forbidden(name: &str, version: u64) -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{name} v{version} is not assigned to this caller"),
        )
    }

    fn from_sync(e: SyncError) -> ApiError {
        match e {
            SyncError::NoSuchVersion { .. } | SyncError::NoSuchImage { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            SyncError::Manifest(tandem_proto::manifest::ManifestError::BadName(_)) => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_name", e.to_string())
            }
            other => ApiError::internal(&other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

type Svc = State<Arc<ImageService>>;
type MaybeCaller = Option<Extension<Caller>>;

fn caller(c: MaybeCaller) -> Result<Caller, ApiError> {
    c.map(|Extension(c)| c).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "request is not authenticated",
        )
    })
}

fn check_read(svc: &ImageService, who: &Caller, name: &str, version: u64) -> Result<(), ApiError> {
    if svc.access.may_read(who, name, version) {
        Ok(())
    } else {
        Err(ApiError::forbidden(name, version))
    }
}

/// A delta's target must be readable and its base readable or held by the caller.
fn check_delta(
    svc: &ImageService,
    who: &Caller,
    name: &str,
    base: u64,
    target: u64,
) -> Result<(), ApiError> {
    check_read(svc, who, name, target)?;
    if svc.access.may_use_base(who, name, base) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{name} v{base} is neither assigned to nor held by this caller; it cannot be a delta base"),
        ))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(&e))?
}

/// The image router; mount it behind the authentication middleware.
pub fn routes(service: Arc<ImageService>) -> Router {
    Router::new()
        .route("/v1/images", get(list_images))
        .route("/v1/images/{name}", get(image_versions))
        .route("/v1/images/{name}/{version}/manifest", get(get_manifest))
        .route("/v1/images/{name}/{version}/delta", get(get_delta))
        .route("/v1/chunks/fetch", post(fetch_chunks))
        .route("/v1/chunks/stat", post(stat_chunks))
        .route("/v1/chunks/missing", post(missing_chunks))
        .route(
            "/v1/chunks/{id}",
            put(put_chunk).layer(DefaultBodyLimit::max(tandem_store::MAX_CHUNK_LEN + 1)),
        )
        .layer(DefaultBodyLimit::max(4 << 20))
        .with_state(service)
}

async fn list_images(State(svc): Svc, c: MaybeCaller) -> Result<Json<Vec<ImageInfo>>, ApiError> {
    let who = caller(c)?;
    let s = svc.clone();
    let all = blocking(move || s.catalog.list().map_err(ApiError::from_sync)).await?;
    Ok(Json(
        all.into_iter()
            .map(|i| ImageInfo {
                versions: i
                    .versions
                    .into_iter()
                    .filter(|v| svc.access.may_read(&who, &i.name, *v))
                    .collect(),
                name: i.name,
            })
            .filter(|i| !i.versions.is_empty())
            .collect(),
    ))
}

async fn image_versions(
    State(svc): Svc,
    c: MaybeCaller,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<ImageInfo>, ApiError> {
    let who = caller(c)?;
    let s = svc.clone();
    let n = name.clone();
    let versions = blocking(move || s.catalog.versions(&n).map_err(ApiError::from_sync)).await?;
    let versions: Vec<u64> = versions
        .into_iter()
        .filter(|v| svc.access.may_read(&who, &name, *v))
        .collect();
    if versions.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no readable versions of image {name}"),
        ));
    }
    Ok(Json(ImageInfo { name, versions }))
}

#[derive(Debug, serde::Deserialize)]
struct AgainstQuery {
    against: Option<u64>,
}

async fn get_manifest(
    State(svc): Svc,
    c: MaybeCaller,
    UrlPath((name, version)): UrlPath<(String, u64)>,
    Query(q): Query<AgainstQuery>,
) -> Result<Response, ApiError> {
    let who = caller(c)?;
    match q.against {
        Some(a) => check_delta(&svc, &who, &name, a, version)?,
        None => check_read(&svc, &who, &name, version)?,
    }
    blocking(move || {
        // Served as stored: laptops verify the signature themselves.
        let Some(a) = q.against else {
            let s = svc
                .catalog
                .load_signed(&name, version)
                .map_err(ApiError::from_sync)?;
            return Ok(Json(s).into_response());
        };
        let (m, s) = svc.manifest(&name, version)?;
        let (base, _) = svc.manifest(&name, a)?;
        Ok(Json(ManifestDelta::compute(&base, &m, &s)).into_response())
    })
    .await
}

#[derive(Debug, serde::Deserialize)]
struct FromQuery {
    from: u64,
}

async fn get_delta(
    State(svc): Svc,
    c: MaybeCaller,
    method: Method,
    headers: HeaderMap,
    UrlPath((name, version)): UrlPath<(String, u64)>,
    Query(q): Query<FromQuery>,
) -> Result<Response, ApiError> {
    let who = caller(c)?;
    check_delta(&svc, &who, &name, q.from, version)?;
    if q.from == version {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "from equals the target version",
        ));
    }
    let s = svc.clone();
    let n = name.clone();
    let path = blocking(move || s.delta_file(&n, q.from, version)).await?;
    let len = tokio::fs::metadata(&path)
        .await
        .map_err(|e| ApiError::internal(&e))?
        .len();
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<u64>().ok());
    let (status, start) = match start {
        Some(s) if s >= len => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{len}"))],
            )
                .into_response())
        }
        Some(s) => (StatusCode::PARTIAL_CONTENT, s),
        None => (StatusCode::OK, 0),
    };
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, len - start);
    if status == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", len - 1),
        );
    }
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        use tokio::io::AsyncSeekExt as _;
        let mut f = tokio::fs::File::open(&path)
            .await
            .map_err(|e| ApiError::internal(&e))?;
        f.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| ApiError::internal(&e))?;
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(f, 256 << 10))
    };
    resp.body(body).map_err(|e| ApiError::internal(&e))
}

fn check_chunk_request(
    svc: &ImageService,
    who: &Caller,
    req: &ChunkRequest,
) -> Result<(), ApiError> {
    if req.chunks.len() > MAX_CHUNKS_PER_REQUEST {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_chunks",
            format!("at most {MAX_CHUNKS_PER_REQUEST} chunks per request"),
        ));
    }
    check_read(svc, who, &req.image, req.version)?;
    let set = svc.chunk_set(&req.image, req.version)?;
    if let Some(id) = req.chunks.iter().find(|id| !set.contains(id)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("chunk {id} is not part of {} v{}", req.image, req.version),
        ));
    }
    Ok(())
}

async fn fetch_chunks(
    State(svc): Svc,
    c: MaybeCaller,
    Json(req): Json<ChunkRequest>,
) -> Result<Response, ApiError> {
    let who = caller(c)?;
    let s = svc.clone();
    let req = blocking(move || {
        check_chunk_request(&s, &who, &req)?;
        Ok(req)
    })
    .await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    tokio::task::spawn_blocking(move || {
        for id in req.chunks {
            let frame = match svc.store.get_for_transfer(id) {
                Ok((zstd, raw_len, bytes)) => {
                    let mut f = Vec::with_capacity(CHUNK_FRAME_HEADER + bytes.len());
                    f.extend_from_slice(id.as_bytes());
                    f.push(u8::from(zstd));
                    f.extend_from_slice(&raw_len.to_le_bytes());
                    f.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                    f.extend_from_slice(&bytes);
                    Ok(Bytes::from(f))
                }
                Err(e) => {
                    tracing::error!(chunk = %id, "cannot serve chunk: {e}");
                    Err(std::io::Error::other(e.to_string()))
                }
            };
            let stop = frame.is_err();
            if tx.blocking_send(frame).is_err() || stop {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(&e))
}

async fn stat_chunks(
    State(svc): Svc,
    c: MaybeCaller,
    Json(req): Json<ChunkRequest>,
) -> Result<Json<ChunkStat>, ApiError> {
    let who = caller(c)?;
    blocking(move || {
        check_chunk_request(&svc, &who, &req)?;
        let locs = svc
            .store
            .locate_many(&req.chunks)
            .map_err(|e| ApiError::internal(&e))?;
        let mut st = ChunkStat { count: 0, bytes: 0 };
        for l in locs.into_iter().flatten() {
            st.count += 1;
            st.bytes += CHUNK_FRAME_HEADER as u64 + u64::from(l.stored_len);
        }
        Ok(Json(st))
    })
    .await
}

async fn missing_chunks(
    State(svc): Svc,
    c: MaybeCaller,
    Json(req): Json<ChunkList>,
) -> Result<Json<ChunkList>, ApiError> {
    caller(c)?;
    if req.chunks.len() > MAX_CHUNKS_PER_REQUEST {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_chunks",
            format!("at most {MAX_CHUNKS_PER_REQUEST} chunks per request"),
        ));
    }
    blocking(move || {
        let have = svc
            .store
            .contains_many(&req.chunks)
            .map_err(|e| ApiError::internal(&e))?;
        Ok(Json(ChunkList {
            chunks: req
                .chunks
                .into_iter()
                .zip(have)
                .filter(|(_, h)| !h)
                .map(|(id, _)| id)
                .collect(),
        }))
    })
    .await
}

async fn put_chunk(
    State(svc): Svc,
    c: MaybeCaller,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller(c)?;
    let id: ChunkId = id.parse().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_chunk_id",
            format!("chunk id: {e}"),
        )
    })?;
    if ChunkId::of(&body) != id {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "chunk_mismatch",
            format!("content does not hash to {id}; refused"),
        ));
    }
    blocking(move || {
        let _g = svc
            .store
            .ingest_guard()
            .map_err(|e| ApiError::internal(&e))?;
        svc.store
            .put_many(vec![(id, tandem_store::Payload::Raw(body.to_vec()))])
            .map_err(|e| ApiError::internal(&e))?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// Middleware for tests and single-user loopback setups: every request is `caller`.
pub fn with_fixed_caller(router: Router, caller: Caller) -> Router {
    router.layer(axum::middleware::from_fn(
        move |mut req: axum::extract::Request, next: axum::middleware::Next| {
            let c = caller.clone();
            async move {
                req.extensions_mut().insert(c);
                next.run(req).await
            }
        },
    ))
}

/// Serves only the image API, every request as `caller` (no authentication): for tests and
/// `tandem image serve-http` on loopback.
pub async fn serve_with_fixed_caller(
    service: Arc<ImageService>,
    listener: tokio::net::TcpListener,
    caller: Caller,
) -> std::io::Result<()> {
    axum::serve(listener, with_fixed_caller(routes(service), caller)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_sync::{Client, NoAuth, SyncError};

    /// Lets devices read only `gold` v1.
    struct OnlyV1;
    impl ImageAccess for OnlyV1 {
        fn may_read(&self, caller: &Caller, image: &str, version: u64) -> bool {
            *caller == Caller::Admin || (image == "gold" && version == 1)
        }
    }

    async fn start(svc: Arc<ImageService>, caller: Option<Caller>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let app = match caller {
            Some(c) => with_fixed_caller(routes(svc), c),
            None => routes(svc),
        };
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    fn status(e: SyncError) -> u16 {
        match e {
            SyncError::Status { status, .. } => status,
            other => panic!("expected an HTTP status, got {other}"),
        }
    }

    /// The image-signing key of the data dir `svc` serves.
    fn image_key(svc: &ImageService) -> tandem_proto::SigningKey {
        let data = svc
            .catalog
            .root()
            .parent()
            .expect("catalog inside the data dir");
        crate::keys::ServerKeys::load_or_create(data)
            .expect("server keys")
            .image
    }

    fn chunk(i: u8) -> (ChunkId, Vec<u8>) {
        let d = vec![i; 4096];
        (ChunkId::of(&d), d)
    }

    fn manifest(version: u64, ids: &[ChunkId]) -> Manifest {
        Manifest {
            format: 1,
            name: "gold".into(),
            version,
            size: ids.len() as u64 * 4096,
            chunk_size: 4096,
            chunks: ids.iter().map(|i| Some(*i)).collect(),
        }
    }

    #[tokio::test]
    async fn uploads_are_verified_and_no_manifest_is_committed_over_http() {
        let d = tempfile::tempdir().expect("tempdir");
        let svc = ImageService::open(d.path(), Arc::new(OnlyV1)).expect("open");
        let admin = Client::new(
            &start(svc.clone(), Some(Caller::Admin)).await,
            Arc::new(NoAuth),
        );
        let device = Client::new(
            &start(svc.clone(), Some(Caller::Device("d1".into()))).await,
            Arc::new(NoAuth),
        );
        let (a, da) = chunk(1);
        let (b, db) = chunk(2);
        // Content that does not match its id is refused.
        assert_eq!(
            status(
                device
                    .upload_chunk(a, db.clone())
                    .await
                    .expect_err("refused")
            ),
            422
        );
        assert_eq!(
            device.missing_chunks(&[a, b]).await.expect("missing"),
            vec![a, b]
        );
        device.upload_chunk(a, da).await.expect("upload");
        assert_eq!(
            device.missing_chunks(&[a, b]).await.expect("missing"),
            vec![b]
        );

        // No manifest is committed over HTTP, by anyone: a version exists only through
        // `tandem image publish`, which opens the image in a limited reader (backing files
        // only when named) and scans it first. The route that signed any admin-uploaded
        // chunk list (and so skipped both) is gone.
        let m = manifest(1, &[a, b]);
        admin.upload_chunk(b, db).await.expect("upload");
        for c in [&device, &admin] {
            match c.commit_manifest(&m).await {
                Err(SyncError::Status { status, .. }) => assert_eq!(status, 405),
                other => panic!("a manifest upload was not refused: {other:?}"),
            }
        }
        assert!(svc.catalog.versions("gold").expect("versions").is_empty());
    }

    /// Lets devices read only `gold` v2 (as if v2 were assigned and v1 never was).
    struct OnlyV2;
    impl ImageAccess for OnlyV2 {
        fn may_read(&self, caller: &Caller, image: &str, version: u64) -> bool {
            *caller == Caller::Admin || (image == "gold" && version == 2)
        }
    }

    /// Issue 12, must-fix 9: the base of a delta or manifest delta is authorized like the
    /// target; an unassigned base is refused before anything is computed or cached.
    #[tokio::test]
    async fn delta_bases_must_be_assigned_or_held() {
        let d = tempfile::tempdir().expect("tempdir");
        let svc = ImageService::open(d.path(), Arc::new(OnlyV2)).expect("open");
        let (a, da) = chunk(1);
        let (b, db) = chunk(2);
        svc.store
            .put_many(vec![
                (a, tandem_store::Payload::Raw(da)),
                (b, tandem_store::Payload::Raw(db)),
            ])
            .expect("put");
        for (v, ids) in [(1, vec![a]), (2, vec![a, b]), (3, vec![b])] {
            let m = manifest(v, &ids);
            svc.catalog
                .save(&m, &m.sign(&image_key(&svc)))
                .expect("save");
        }
        let device = Client::new(
            &start(svc.clone(), Some(Caller::Device("d1".into()))).await,
            Arc::new(NoAuth),
        );
        device
            .manifest("gold", 2)
            .await
            .expect("the target alone is readable");
        assert_eq!(
            status(
                device
                    .delta_size("gold", 1, 2)
                    .await
                    .expect_err("base v1 not held")
            ),
            403
        );
        assert_eq!(
            status(
                device
                    .manifest_delta("gold", 2, 1)
                    .await
                    .expect_err("base v1 not held")
            ),
            403
        );
        assert_eq!(
            status(
                device
                    .delta_size("gold", 3, 2)
                    .await
                    .expect_err("base v3 not held")
            ),
            403
        );
        // Nothing was computed for the refused pairs.
        for from in [1, 3] {
            let p = svc.catalog.delta_path("gold", from, 2).expect("path");
            assert!(
                !p.exists(),
                "delta {from}->2 was computed for a refused base"
            );
        }
        // An admin may use any base.
        let admin = Client::new(
            &start(svc.clone(), Some(Caller::Admin)).await,
            Arc::new(NoAuth),
        );
        assert!(admin.delta_size("gold", 1, 2).await.expect("admin delta") > 0);
    }

    #[tokio::test]
    async fn devices_read_only_assigned_versions_and_their_chunks() {
        let d = tempfile::tempdir().expect("tempdir");
        let svc = ImageService::open(d.path(), Arc::new(OnlyV1)).expect("open");
        let (a, da) = chunk(1);
        let (b, db) = chunk(2);
        svc.store
            .put_many(vec![
                (a, tandem_store::Payload::Raw(da)),
                (b, tandem_store::Payload::Raw(db)),
            ])
            .expect("put");
        for (v, ids) in [(1, vec![a]), (2, vec![a, b])] {
            let m = manifest(v, &ids);
            svc.catalog
                .save(&m, &m.sign(&image_key(&svc)))
                .expect("save");
        }
        let device = Client::new(
            &start(svc.clone(), Some(Caller::Device("d1".into()))).await,
            Arc::new(NoAuth),
        );
        assert_eq!(device.versions("gold").await.expect("versions"), vec![1]);
        device.manifest("gold", 1).await.expect("assigned");
        assert_eq!(
            status(device.manifest("gold", 2).await.expect_err("not assigned")),
            403
        );
        assert_eq!(
            status(
                device
                    .delta_size("gold", 1, 2)
                    .await
                    .expect_err("not assigned")
            ),
            403
        );
        let req = |v: u64, ids: Vec<ChunkId>| ChunkRequest {
            image: "gold".into(),
            version: v,
            chunks: ids,
        };
        let mut got = Vec::new();
        device
            .fetch_chunks(
                &req(1, vec![a]),
                4096,
                &mut |c| {
                    got.push(c.id);
                    Ok(())
                },
                &tandem_sync::NoProgress,
            )
            .await
            .expect("fetch");
        assert_eq!(got, vec![a]);
        // b exists, but not in v1: asking for it through v1 is refused; v2 is not assigned.
        let mut sink = |_c: tandem_sync::client::FetchedChunk| Ok(());
        let e = device
            .fetch_chunks(&req(1, vec![b]), 4096, &mut sink, &tandem_sync::NoProgress)
            .await
            .expect_err("b is not in v1");
        assert_eq!(status(e), 403);
        let e = device
            .fetch_chunks(&req(2, vec![b]), 4096, &mut sink, &tandem_sync::NoProgress)
            .await
            .expect_err("v2 not assigned");
        assert_eq!(status(e), 403);

        // Without the authentication middleware every request is refused.
        let anon = Client::new(&start(svc, None).await, Arc::new(NoAuth));
        assert_eq!(
            status(anon.images().await.expect_err("unauthenticated")),
            401
        );
    }
}
