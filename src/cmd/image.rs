//! `tandem image`: publish, list, show, delete (server data dir), pull and serve (laptop dir).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use tandem_proto::PublicKey;
use tandem_sync::{Catalog, Local};

use crate::exit;
use crate::output::{print_json, Global};

/// Arguments of `tandem image`.
#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ImageCommand {
    /// Publish a raw or qcow2 disk image as the next version of NAME (server side).
    Publish(PublishArgs),
    /// List images and versions (server data dir or laptop dir).
    List(WhereArgs),
    /// Show one version's manifest summary.
    Show(ShowArgs),
    /// Delete one version from the catalog (its chunks go at the next `tandem store gc`).
    Delete(DeleteArgs),
    /// Print the server's image-signing public key (what laptops pin).
    Key(DataArg),
    /// Pull NAME[@VERSION] from a server into a laptop dir.
    Pull(PullArgs),
    /// Serve a pulled version read-only over NBD on a unix socket.
    Serve(ServeArgs),
    /// Serve only the image HTTP API of a data dir without authentication, on loopback
    /// (development and tests; `tandem server` serves it with authentication).
    #[command(hide = true)]
    ServeHttp(ServeHttpArgs),
    /// Internal: open, check and stream an image for `publish` as a limited child process.
    #[command(hide = true)]
    PublishReader,
}

#[derive(Debug, clap::Args)]
struct DataArg {
    /// Server data directory.
    #[arg(long, env = "TANDEM_DATA")]
    data: PathBuf,
}

#[derive(Debug, clap::Args)]
struct WhereArgs {
    /// Server data directory.
    #[arg(long, conflicts_with = "dir", required_unless_present = "dir")]
    data: Option<PathBuf>,
    /// Laptop directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON document.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct PublishArgs {
    /// Image name (a-z, 0-9, '.', '_', '-').
    name: String,
    /// Raw or qcow2 disk image file.
    file: PathBuf,
    #[command(flatten)]
    data: DataArg,
    /// Chunk size in bytes (power of two, 4096..4194304).
    #[arg(long, default_value_t = tandem_proto::manifest::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// Store blocks that filesystems mark unused as they are (default: as zeros).
    #[arg(long)]
    keep_free_space: bool,
    /// Version number (default: one more than the highest).
    #[arg(long)]
    version: Option<u64>,
    /// A backing file the image's qcow2 chain may use (repeatable). Only files named here
    /// are ever opened, and only regular files that are not symlinks; an image that names
    /// any other backing file is refused, with or without --force.
    #[arg(long = "backing", value_name = "FILE")]
    backing: Vec<PathBuf>,
    /// Publish even when the pre-publish malware scan finds something or cannot scan
    /// everything (never when the image or a backing file is refused).
    #[arg(long)]
    force: bool,
    /// Print one JSON document.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct ShowArgs {
    /// NAME@VERSION (or NAME for the newest).
    spec: String,
    #[command(flatten)]
    place: WhereArgs,
}

#[derive(Debug, clap::Args)]
struct DeleteArgs {
    /// NAME@VERSION.
    spec: String,
    #[command(flatten)]
    data: DataArg,
}

#[derive(Debug, clap::Args)]
struct PullArgs {
    /// NAME or NAME@VERSION.
    spec: String,
    /// Server URL, e.g. http://127.0.0.1:8080 (default: the server DIR is enrolled with).
    #[arg(long)]
    server: Option<String>,
    /// Laptop directory (store, keys).
    #[arg(long)]
    dir: PathBuf,
    /// The server's image-signing key (base64, or @FILE); pinned in DIR on first use.
    #[arg(long)]
    image_key: Option<String>,
    /// Only say how many bytes the update would move.
    #[arg(long)]
    dry_run: bool,
    /// Receive at most this many bytes per second (e.g. 500K, 10M).
    #[arg(long, value_parser = parse_bytes)]
    rate_limit: Option<u64>,
    /// Never use version deltas (fetch whole chunks).
    #[arg(long)]
    no_delta: bool,
    /// Admin bearer token for a server that requires one.
    #[arg(long, env = "TANDEM_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print one JSON document.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// NAME@VERSION.
    spec: String,
    /// Laptop directory.
    #[arg(long)]
    dir: PathBuf,
    /// Unix socket to listen on.
    #[arg(long)]
    socket: PathBuf,
    /// Image-signing key, when DIR has none pinned yet.
    #[arg(long)]
    image_key: Option<String>,
    /// Memory for decompressed, verified chunks (MiB).
    #[arg(long, default_value_t = 32)]
    cache_mb: usize,
}

#[derive(Debug, clap::Args)]
struct ServeHttpArgs {
    #[command(flatten)]
    data: DataArg,
    /// Address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
}

/// Parses `123`, `500K`, `10M`, `1G` (powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("unknown unit in {s:?}; use K, M or G")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("{s:?} is not a byte count (e.g. 500K, 10M)"))
}

fn split_spec(spec: &str) -> anyhow::Result<(String, Option<u64>)> {
    match spec.split_once('@') {
        None => Ok((spec.to_string(), None)),
        Some((n, v)) => Ok((
            n.to_string(),
            Some(
                v.parse()
                    .with_context(|| format!("version in {spec:?} is not a number"))?,
            ),
        )),
    }
}

fn server_catalog(data: &Path) -> anyhow::Result<(Catalog, Vec<PublicKey>)> {
    let keys = tandem_server::keys::ServerKeys::load_or_create(data)
        .with_context(|| format!("opening server keys in {}", data.display()))?;
    Ok((
        Catalog::new(&data.join("images")),
        vec![keys.image.public()],
    ))
}

fn read_key(s: &str) -> anyhow::Result<PublicKey> {
    let text = match s.strip_prefix('@') {
        Some(f) => std::fs::read_to_string(f).with_context(|| format!("reading key file {f}"))?,
        None => s.to_string(),
    };
    PublicKey::from_base64(text.trim()).context("--image-key is not a base64 ed25519 public key")
}

/// The device identity enrolled in a laptop dir, if any.
fn enrolled(dir: &Path) -> Option<Arc<tandem_agent::identity::Identity>> {
    tandem_agent::identity::Identity::load(&tandem_agent::AgentDir::new(dir))
        .ok()
        .map(Arc::new)
}

/// The image key a laptop dir trusts: the one pinned at enrollment, else the one pinned by
/// an earlier `--image-key` (pinning `given` on first use).
fn pinned_key(dir: &Path, given: Option<&str>) -> anyhow::Result<Vec<PublicKey>> {
    if let Some(id) = enrolled(dir) {
        let k = id.info.keys.image.clone();
        if let Some(g) = given {
            if read_key(g)? != k {
                bail!(
                    "--image-key differs from the image key pinned at enrollment in {}",
                    dir.display()
                );
            }
        }
        return Ok(vec![k]);
    }
    let path = dir.join("keys").join("image-signing.pub");
    let stored = match std::fs::read_to_string(&path) {
        Ok(t) => Some(
            PublicKey::from_base64(t.trim())
                .with_context(|| format!("{} is damaged", path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    match (stored, given) {
        (Some(k), Some(g)) => {
            let g = read_key(g)?;
            if g != k {
                bail!(
                    "--image-key {} differs from the key pinned in {} ({}); refusing to trust another signer",
                    g.id(),
                    path.display(),
                    k.id()
                );
            }
            Ok(vec![k])
        }
        (Some(k), None) => Ok(vec![k]),
        (None, Some(g)) => {
            let k = read_key(g)?;
            std::fs::create_dir_all(path.parent().expect("has parent"))?;
            std::fs::write(&path, k.to_base64())?;
            Ok(vec![k])
        }
        (None, None) => bail!(
            "no image-signing key pinned in {}; pass --image-key (from `tandem image key --data DIR` on the server)",
            dir.display()
        ),
    }
}

/// Runs `tandem image`.
pub fn run(args: ImageArgs, global: &Global) -> anyhow::Result<u8> {
    match args.command {
        ImageCommand::Publish(a) => publish(a, global),
        ImageCommand::List(a) => list(a),
        ImageCommand::Show(a) => show(a),
        ImageCommand::Delete(a) => {
            let (name, version) = split_spec(&a.spec)?;
            let version = version.context("delete needs NAME@VERSION")?;
            let (cat, _) = server_catalog(&a.data.data)?;
            cat.delete(&name, version)?;
            eprintln!(
                "deleted {name} v{version}; run `tandem store gc --data {}` to free its chunks",
                a.data.data.display()
            );
            Ok(exit::SUCCESS)
        }
        ImageCommand::Key(a) => {
            let (_, keys) = server_catalog(&a.data)?;
            println!("{}", keys[0].to_base64());
            Ok(exit::SUCCESS)
        }
        ImageCommand::Pull(a) => pull(a, global),
        ImageCommand::Serve(a) => serve(a),
        ImageCommand::ServeHttp(a) => serve_http(a),
        ImageCommand::PublishReader => Ok(tandem_sync::publish::reader_main()),
    }
}

fn bar(global: &Global, json: bool, len: u64, msg: &str) -> Option<indicatif::ProgressBar> {
    if !global.progress(json) {
        return None;
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    b.set_message(msg.to_string());
    Some(b)
}

/// Scans a gold image before it is published, in isolated workers (the same scan as
/// `tandem scan image`), with the server's current signed rule bundle when IT published
/// one. Infected or incomplete refuses the publish unless --force; an image the scan
/// cannot open at all (e.g. a refused backing file) is refused, --force or not.
fn scan_before_publish(
    a: &PublishArgs,
    keys: &tandem_server::keys::ServerKeys,
    global: &Global,
) -> anyhow::Result<()> {
    let bundle = tandem_server::rules::bundle_path(&a.data.data);
    let bundle = bundle
        .is_file()
        .then(|| (bundle, keys.rules.public().to_base64()));
    if !global.quiet && !a.json {
        eprintln!(
            "scanning {} for malware before publishing",
            a.file.display()
        );
    }
    let report = crate::cmd::scan::scan_before_publish(&a.file, &a.backing, bundle, global)
        .with_context(|| {
            format!(
                "the pre-publish scan of {} failed; nothing was published",
                a.file.display()
            )
        })?;
    let files = |want: fn(&tandem_scan::Verdict) -> bool| -> Vec<String> {
        report
            .volumes
            .iter()
            .flat_map(|v| &v.files)
            .filter(|f| want(&f.verdict))
            .map(|f| f.path.clone())
            .collect()
    };
    let listed = |v: Vec<String>| {
        if v.is_empty() {
            String::new()
        } else {
            format!(": {}", v.join(", "))
        }
    };
    let verdict = match report.outcome {
        tandem_scan::Outcome::Clean => return Ok(()),
        tandem_scan::Outcome::Infected => format!(
            "the pre-publish scan found malware in {}{}",
            a.file.display(),
            listed(files(|v| matches!(
                v,
                tandem_scan::Verdict::Infected { .. }
            )))
        ),
        tandem_scan::Outcome::Incomplete => {
            let vols: Vec<String> = report
                .volumes
                .iter()
                .filter_map(|v| match &v.verdict {
                    tandem_scan::Verdict::NotScanned { reason, detail } => {
                        Some(format!("volume {} {}: {detail}", v.index, reason.as_str()))
                    }
                    _ => None,
                })
                .collect();
            let mut what = files(|v| matches!(v, tandem_scan::Verdict::NotScanned { .. }));
            what.extend(vols);
            format!(
                "parts of {} could not be scanned (see `tandem scan image {}`){}",
                a.file.display(),
                a.file.display(),
                listed(what)
            )
        }
    };
    if a.force {
        eprintln!("warning: {verdict}; publishing anyway because of --force");
        return Ok(());
    }
    anyhow::bail!(
        "{verdict}; nothing was published (fix the image, or pass --force to publish it anyway)"
    )
}

fn publish(a: PublishArgs, global: &Global) -> anyhow::Result<u8> {
    let data = &a.data.data;
    let (cat, _) = server_catalog(data)?;
    let keys = tandem_server::keys::ServerKeys::load_or_create(data)?;
    // Cheap refusals first (a bad name, a file that is plainly no disk: by its magic),
    // then the scan; everything that parses the image runs in limited children.
    tandem_proto::manifest::validate_name(&a.name)?;
    tandem_sync::publish::check_disk_image(&a.file)
        .with_context(|| format!("publishing {} as {}", a.file.display(), a.name))?;
    scan_before_publish(&a, &keys, global)?;
    let store = tandem_store::Store::open(&data.join("store"))
        .with_context(|| format!("opening chunk store in {}", data.display()))?;
    let size = std::fs::metadata(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?
        .len();
    let pb = bar(global, a.json, size, "publish");
    let opts = tandem_sync::PublishOptions {
        chunk_size: a.chunk_size,
        keep_free_space: a.keep_free_space,
        version: a.version,
        backing: a.backing.clone(),
        ..Default::default()
    };
    // The image is opened, checked and read by a limited child process (the hidden
    // `image publish-reader`): this process never parses it.
    let exe =
        std::env::current_exe().context("locating the tandem binary for the publish reader")?;
    let reader: Vec<std::ffi::OsString> = vec![exe.into(), "image".into(), "publish-reader".into()];
    let progress = |done: u64, total: u64| {
        if let Some(b) = &pb {
            b.set_length(total);
            b.set_position(done);
        }
    };
    let (_, _, report) = tandem_sync::publish::publish_isolated(
        &store,
        &cat,
        &keys.image,
        &a.name,
        &a.file,
        &opts,
        &reader,
        &tandem_sync::publish::ReaderLimits::default(),
        &progress,
    )
    .with_context(|| format!("publishing {} as {}", a.file.display(), a.name))?;
    if let Some(b) = pb {
        b.finish_and_clear();
    }
    if a.json {
        print_json(&report)?;
    } else {
        let mb = |b: u64| b as f64 / 1e6;
        println!("published {} v{}", report.name, report.version);
        println!(
            "  size {:.1} MB, {} chunks of {} KiB ({} holes, {} already stored, {} new)",
            mb(report.size),
            report.chunks,
            report.chunk_size / 1024,
            report.zero_chunks,
            report.dedup_chunks,
            report.new_chunks
        );
        println!(
            "  new data {:.1} MB stored as {:.1} MB (dedup {:.2}x, compression {:.2}x)",
            mb(report.new_bytes),
            mb(report.stored_bytes),
            report.dedup_ratio,
            report.compression_ratio
        );
        if a.keep_free_space {
            println!("  free space kept (--keep-free-space)");
        } else {
            println!(
                "  free space dropped: {:.1} MB",
                mb(report.free_space_dropped)
            );
        }
        for v in &report.volumes {
            println!("    {v}");
        }
        println!(
            "  {:.2} s, {:.0} MB/s",
            report.seconds, report.throughput_mb_s
        );
    }
    Ok(exit::SUCCESS)
}

fn open_place(
    data: &Option<PathBuf>,
    dir: &Option<PathBuf>,
) -> anyhow::Result<(Catalog, Vec<PublicKey>)> {
    match (data, dir) {
        (Some(d), _) => server_catalog(d),
        (None, Some(dir)) => {
            let keys = pinned_key(dir, None)?;
            Ok((Catalog::new(&dir.join("store").join("catalog")), keys))
        }
        (None, None) => bail!("pass --data DIR (server) or --dir DIR (laptop)"),
    }
}

fn list(a: WhereArgs) -> anyhow::Result<u8> {
    let (cat, _) = open_place(&a.data, &a.dir)?;
    let all = cat.list()?;
    if a.json {
        print_json(&all)?;
    } else if all.is_empty() {
        eprintln!("no images");
    } else {
        for i in all {
            let v: Vec<String> = i.versions.iter().map(|v| v.to_string()).collect();
            println!("{}\t{}", i.name, v.join(","));
        }
    }
    Ok(exit::SUCCESS)
}

fn show(a: ShowArgs) -> anyhow::Result<u8> {
    let (cat, keys) = open_place(&a.place.data, &a.place.dir)?;
    let (name, version) = split_spec(&a.spec)?;
    let version = match version {
        Some(v) => v,
        None => *cat
            .versions(&name)?
            .last()
            .with_context(|| format!("no versions of {name}"))?,
    };
    let (m, signed) = cat.load(&name, version, &keys)?;
    let holes = m.chunks.iter().filter(|c| c.is_none()).count();
    let summary = serde_json::json!({
        "name": m.name,
        "version": m.version,
        "size": m.size,
        "chunk_size": m.chunk_size,
        "chunks": m.chunks.len(),
        "holes": holes,
        "distinct_chunks": m.chunk_set().len(),
        "signed_by": signed.key_id.to_string(),
    });
    if a.place.json {
        print_json(&summary)?;
    } else {
        println!(
            "{} v{}: {} bytes, {} chunks of {} KiB ({} holes, {} distinct), signed by {}",
            m.name,
            m.version,
            m.size,
            m.chunks.len(),
            m.chunk_size / 1024,
            holes,
            m.chunk_set().len(),
            signed.key_id
        );
    }
    Ok(exit::SUCCESS)
}

struct BarProgress(Option<indicatif::ProgressBar>);

impl tandem_sync::Progress for BarProgress {
    fn start(&self, phase: &str, total: u64) {
        if let Some(b) = &self.0 {
            b.set_message(phase.to_string());
            b.set_length(total);
            b.set_position(0);
        }
    }
    fn inc(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }
}

fn pull(a: PullArgs, global: &Global) -> anyhow::Result<u8> {
    let (name, version) = split_spec(&a.spec)?;
    let trusted = pinned_key(&a.dir, a.image_key.as_deref())?;
    let local = Local::open(&a.dir, trusted)
        .with_context(|| format!("opening laptop store in {}", a.dir.display()))?;
    // An enrolled dir signs every request with its device key; otherwise an admin token
    // or nothing (a server that serves images without authentication, e.g. in tests).
    let identity = enrolled(&a.dir);
    let server = match (&a.server, &identity) {
        (Some(s), _) => s.clone(),
        (None, Some(id)) => id.info.server.clone(),
        (None, None) => bail!("pass --server URL ({} is not enrolled)", a.dir.display()),
    };
    let signer: Arc<dyn tandem_sync::SignRequest> = match (a.token, identity) {
        (Some(t), _) => Arc::new(tandem_sync::client::BearerToken(t)),
        (None, Some(id)) => Arc::new(tandem_agent::images::DeviceSigner(id)),
        (None, None) => Arc::new(tandem_sync::NoAuth),
    };
    let client = tandem_sync::Client::new(&server, signer).with_rate_limit(a.rate_limit);
    let progress = BarProgress(bar(global, a.json, 0, "pull"));
    let opts = tandem_sync::PullOptions {
        dry_run: a.dry_run,
        no_delta: a.no_delta,
    };
    let report = crate::output::block_on(tandem_sync::pull(
        &client, &local, &name, version, &opts, &progress,
    ))?
    .with_context(|| format!("pulling {} from {server}", a.spec))?;
    if let Some(b) = &progress.0 {
        b.finish_and_clear();
    }
    if a.json {
        print_json(&report)?;
    } else if report.dry_run {
        println!(
            "{} v{}: {} would move {} bytes ({} chunks already here, base {:?})",
            report.name,
            report.version,
            report.method,
            report.estimated_bytes.unwrap_or(0),
            report.chunks_present,
            report.base
        );
    } else {
        println!(
            "{} v{} committed via {}: {} bytes received ({} chunks from delta, {} fetched, {} already here)",
            report.name,
            report.version,
            report.method,
            report.bytes_received,
            report.chunks_from_delta,
            report.chunks_fetched,
            report.chunks_present
        );
    }
    Ok(exit::SUCCESS)
}

fn serve(a: ServeArgs) -> anyhow::Result<u8> {
    let (name, version) = split_spec(&a.spec)?;
    let version = version.context("serve needs NAME@VERSION")?;
    let trusted = pinned_key(&a.dir, a.image_key.as_deref())?;
    let local = Local::open(&a.dir, trusted)?;
    let (manifest, _) = local
        .manifest(&name, version)
        .with_context(|| format!("opening {name} v{version} in {}", a.dir.display()))?;
    let reader = Arc::new(
        tandem_store::ImageReader::with_cache(local.store.clone(), manifest, a.cache_mb << 20)
            .with_context(|| format!("{name} v{version} is incomplete; pull it again"))?,
    );
    crate::output::block_on(async move {
        let listener = tandem_nbd::bind(&a.socket)?;
        eprintln!(
            "serving {name} v{version} over NBD on {}",
            a.socket.display()
        );
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        tandem_nbd::serve(listener, reader, format!("{name}@{version}"), shutdown).await;
        let _ = std::fs::remove_file(&a.socket);
        anyhow::Ok(())
    })??;
    Ok(exit::SUCCESS)
}

fn serve_http(a: ServeHttpArgs) -> anyhow::Result<u8> {
    use tandem_server::images::{self, AllowAll, Caller, ImageService};
    if !a.listen.ip().is_loopback() {
        bail!("serve-http has no authentication and only listens on loopback addresses");
    }
    let svc = ImageService::open(&a.data.data, Arc::new(AllowAll))?;
    crate::output::block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen).await?;
        let addr = listener.local_addr()?;
        println!("listening on http://{addr}");
        images::serve_with_fixed_caller(svc, listener, Caller::Admin).await?;
        anyhow::Ok(())
    })??;
    Ok(exit::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_parse_with_units() {
        assert_eq!(parse_bytes("500K"), Ok(500 * 1024));
        assert_eq!(parse_bytes("10M"), Ok(10 << 20));
        assert_eq!(parse_bytes("77"), Ok(77));
        assert!(parse_bytes("1X").is_err());
    }
}
