//! `tandem scan`: scan VM disks for malware without booting them.
//!
//! `image FILE` scans a raw or qcow2 file (with the backing files named by `--backing`);
//! `bundle sign` makes a signed rule bundle with the server's rules key; `worker` is the
//! hidden child process that opens and parses the disk (see `tandem_scan::isolate`): this
//! process never parses an image itself.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use tandem_scan::{Outcome, Report, RuleSet, ScanConfig, ScanState, Verdict};

use crate::exit;
use crate::output::Global;

/// Arguments of `tandem scan`.
#[derive(Debug, clap::Args)]
pub struct ScanArgs {
    #[command(subcommand)]
    cmd: ScanCmd,
}

/// Shown under `tandem scan --help` and each verb's help.
const SCAN_HELP: &str =
    "Exit codes: 0 clean, 1 infected, 2 incomplete (something could not be scanned), 3 error.
Docs: docs/scan.md (verdicts, limits, incremental state, rule bundles, blind spots).";

#[derive(Debug, clap::Subcommand)]
#[command(after_help = SCAN_HELP)]
enum ScanCmd {
    /// Scan a raw or qcow2 disk image file (backing files only when named with --backing).
    #[command(after_help = SCAN_HELP)]
    Image(ImageArgs),
    /// Scan a stored image version, NAME@VERSION or NAME for the newest (server side).
    #[command(after_help = SCAN_HELP)]
    Version(VersionArgs),
    /// Scan a user's latest backup (or --seq N), or the latest one a device uploaded.
    #[command(after_help = SCAN_HELP)]
    Backup(BackupArgs),
    /// Scan the disks of a named VM; refused while it runs.
    #[command(after_help = SCAN_HELP)]
    Vm(VmArgs),
    /// Sign a rule bundle with the server's rules key (for distribution to agents).
    Bundle(BundleArgs),
    /// Internal: scan one volume as an isolated child process.
    #[command(hide = true)]
    Worker,
}

/// Which rules to use.
#[derive(Debug, clap::Args)]
struct RuleArgs {
    /// YARA rule file or directory of .yar/.yara files (repeatable).
    #[arg(long = "rules", value_name = "PATH")]
    rules: Vec<PathBuf>,
    /// SHA-256 blocklist: one `<hex sha256> [name]` per line.
    #[arg(long, value_name = "FILE")]
    blocklist: Option<PathBuf>,
    /// A signed rule bundle (`tandem scan bundle sign`); needs --trust.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["rules", "blocklist"])]
    bundle: Option<PathBuf>,
    /// The rules public key (base64, or a file holding it) a bundle must be signed by.
    #[arg(long, value_name = "KEY", requires = "bundle")]
    trust: Option<String>,
}

/// Limits and output.
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// Files larger than this many bytes are not scanned (`too_large`).
    #[arg(long, default_value_t = ScanConfig::default().max_file_size)]
    max_file_size: u64,
    /// Rule-engine timeout per file, seconds.
    #[arg(long, default_value_t = ScanConfig::default().file_timeout_secs)]
    file_timeout: u64,
    /// Time budget per volume, seconds (its worker is killed 30 s later).
    #[arg(long, default_value_t = ScanConfig::default().volume_timeout_secs)]
    volume_timeout: u64,
    /// Memory limit of each scan worker, MiB.
    #[arg(long, default_value_t = ScanConfig::default().worker_memory_mib)]
    worker_memory: u64,
    /// Incremental state file: files unchanged since the last clean scan under the same
    /// rules skip rule matching (content is still read and hashed).
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// List clean files too.
    #[arg(long)]
    all_files: bool,
    /// Print one JSON report on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct ImageArgs {
    /// The image file.
    file: PathBuf,
    /// A backing file the image's qcow2 chain may use (repeatable). Only files named here
    /// are ever opened, and only regular files that are not symlinks; an image naming
    /// any other backing file is refused.
    #[arg(long = "backing", value_name = "FILE")]
    backing: Vec<PathBuf>,
    #[command(flatten)]
    rules: RuleArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Debug, clap::Args)]
struct VersionArgs {
    /// NAME@VERSION, or NAME for the newest version.
    version: String,
    /// Server data directory (store, images, keys).
    #[arg(long, env = "TANDEM_DATA")]
    data: PathBuf,
    #[command(flatten)]
    rules: RuleArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Debug, clap::Args)]
struct BackupArgs {
    /// Server data directory (store, backups).
    #[arg(long, env = "TANDEM_DATA")]
    data: PathBuf,
    /// Whose backup.
    #[arg(long, required_unless_present = "device", conflicts_with = "device")]
    user: Option<String>,
    /// The latest backup uploaded by this device.
    #[arg(long)]
    device: Option<String>,
    /// A given backup of --user instead of the latest.
    #[arg(long, requires = "user")]
    seq: Option<u64>,
    #[command(flatten)]
    rules: RuleArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Debug, clap::Args)]
struct VmArgs {
    /// VM name.
    name: String,
    /// Where VMs keep their state.
    #[arg(long, env = "TANDEM_STATE_DIR", default_value = "/var/lib/tandem/vms")]
    state_dir: PathBuf,
    #[command(flatten)]
    rules: RuleArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Debug, clap::Args)]
struct BundleArgs {
    #[command(subcommand)]
    cmd: BundleCmd,
}

#[derive(Debug, clap::Subcommand)]
enum BundleCmd {
    /// Sign rules and a blocklist into a bundle file.
    Sign {
        /// YARA rule file or directory (repeatable).
        #[arg(long = "rules", value_name = "PATH")]
        rules: Vec<PathBuf>,
        /// SHA-256 blocklist file.
        #[arg(long, value_name = "FILE")]
        blocklist: Option<PathBuf>,
        /// Bundle version (agents refuse to go backwards).
        #[arg(long = "bundle-version")]
        version: u64,
        /// The server data directory holding keys/rules-signing.key.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Where to write the bundle.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
}

/// Runs `tandem scan`.
pub fn run(args: ScanArgs, global: &Global) -> anyhow::Result<u8> {
    match args.cmd {
        ScanCmd::Image(a) => scan_image(a, global),
        ScanCmd::Version(a) => {
            let (name, version) = resolve_version(&a.data, &a.version)?;
            let source = Source::Version {
                data: a.data.clone(),
                name: name.clone(),
                version,
            };
            let target = format!("{name}@{version}");
            scan_view(
                serde_json::to_value(&source)?,
                &target,
                &a.rules,
                &a.limits,
                global,
            )
        }
        ScanCmd::Backup(a) => {
            let rec = find_backup(&a.data, a.user.as_deref(), a.device.as_deref(), a.seq)?;
            let source = Source::Backup {
                data: a.data.clone(),
                user: rec.user.clone(),
                seq: rec.seq,
            };
            let target = format!(
                "backup {} #{} of {} (device {})",
                rec.manifest.name, rec.seq, rec.user, rec.device
            );
            scan_view(
                serde_json::to_value(&source)?,
                &target,
                &a.rules,
                &a.limits,
                global,
            )
        }
        ScanCmd::Vm(a) => scan_vm(a, global),
        ScanCmd::Bundle(BundleArgs {
            cmd:
                BundleCmd::Sign {
                    rules,
                    blocklist,
                    version,
                    data,
                    output,
                },
        }) => {
            let set = RuleSet::from_paths(&rules, blocklist.as_deref())?;
            set.compile().context("checking the rules before signing")?;
            let keys = tandem_server::keys::ServerKeys::load_or_create(&data)
                .with_context(|| format!("loading the server keys in {}", data.display()))?;
            let signed = set.sign(&keys.rules, version);
            std::fs::write(&output, serde_json::to_vec_pretty(&signed)?)
                .with_context(|| format!("writing {}", output.display()))?;
            if !global.quiet {
                eprintln!(
                    "signed bundle v{version} ({} rule files, {} hashes) → {}; agents verify it with --trust <public_key>",
                    set.rules.len(),
                    set.blocklist.len(),
                    output.display()
                );
            }
            crate::output::print_json(&serde_json::json!({
                "bundle": output,
                "version": version,
                "key_id": keys.rules.public().id(),
                "public_key": keys.rules.public(),
            }))?;
            Ok(exit::SUCCESS)
        }
        ScanCmd::Worker => Ok(tandem_scan::isolate::worker_main(|source| {
            // Test hook: hold the worker (limits and parent-death signal already set)
            // so an end-to-end test can kill the parent and see the worker go too.
            if std::env::var_os("TANDEM_TEST_SCAN_WORKER_HOLD").is_some() {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
            open_source(source)
        })),
    }
}

/// How a worker re-opens the disk the parent is scanning.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Source {
    /// A raw or qcow2 file, and the backing files it may use.
    Image {
        path: PathBuf,
        #[serde(default)]
        backing: Vec<PathBuf>,
    },
    /// A stored image version in a server data dir.
    Version {
        data: PathBuf,
        name: String,
        version: u64,
    },
    /// A user's backup in a server data dir.
    Backup {
        data: PathBuf,
        user: String,
        seq: u64,
    },
    /// A read-only NBD export on a unix socket (qemu-nbd for disks only QEMU can open).
    Nbd { socket: PathBuf },
}

fn open_source(v: &serde_json::Value) -> Result<Arc<dyn tandem_disk::ReadAt>, String> {
    let s: Source = serde_json::from_value(v.clone()).map_err(|e| format!("bad source: {e}"))?;
    open_source_any(&s).map_err(|e| chain_text(&e))
}

/// An error and its causes on one line, each cause said once (library errors often
/// include their source in their own message already).
fn chain_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if !out.contains(&msg) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&msg);
        }
    }
    out
}

/// Opens any source as a disk view (in a worker only: this parses untrusted bytes).
fn open_source_any(s: &Source) -> anyhow::Result<Arc<dyn tandem_disk::ReadAt>> {
    match s {
        Source::Image { path, backing } => {
            let policy = tandem_disk::BackingPolicy::allow(backing)?;
            Ok(Arc::from(tandem_disk::open_image_with(path, &policy)?))
        }
        Source::Nbd { socket } => Ok(Arc::new(tandem_disk::NbdClient::connect(socket)?)),
        Source::Version {
            data,
            name,
            version,
        } => {
            let keys = tandem_server::keys::ServerKeys::load_or_create(data)?;
            let store = Arc::new(tandem_store::Store::open(&data.join("store"))?);
            let catalog = tandem_sync::Catalog::new(&data.join("images"));
            let (manifest, _) = catalog
                .load(name, *version, &[keys.image.public()])
                .with_context(|| format!("loading {name}@{version} from {}", data.display()))?;
            let reader: Arc<dyn tandem_disk::ReadAt> =
                Arc::new(tandem_store::ImageReader::open(store, manifest)?);
            Ok(reader)
        }
        Source::Backup { data, user, seq } => {
            let rec = find_backup(data, Some(user), None, Some(*seq))?;
            let store = Arc::new(tandem_store::Store::open(&data.join("store"))?);
            let label = PathBuf::from(format!("backup {user} #{seq}"));
            let reader: Arc<dyn tandem_disk::ReadAt> =
                Arc::new(tandem_store::ImageReader::open(store, rec.manifest)?);
            // A backup holds the disk file's bytes: raw, or a qcow2 (without backing).
            Ok(Arc::from(tandem_disk::open_view(reader, &label)?))
        }
    }
}

/// NAME@VERSION, or NAME → its newest version.
fn resolve_version(data: &Path, spec: &str) -> anyhow::Result<(String, u64)> {
    let catalog = tandem_sync::Catalog::new(&data.join("images"));
    match spec.split_once('@') {
        Some((n, v)) => Ok((
            n.to_string(),
            v.parse()
                .with_context(|| format!("{v:?} is not a version number"))?,
        )),
        None => {
            let v = catalog.versions(spec)?.last().copied().with_context(|| {
                format!(
                    "no versions of {spec} in {}; see `tandem image list --data {}`",
                    data.display(),
                    data.display()
                )
            })?;
            Ok((spec.to_string(), v))
        }
    }
}

/// A user's backup (given seq or latest), or the latest backup a device uploaded.
fn find_backup(
    data: &Path,
    user: Option<&str>,
    device: Option<&str>,
    seq: Option<u64>,
) -> anyhow::Result<tandem_proto::backup::BackupRecord> {
    let store = Arc::new(tandem_store::Store::open(&data.join("store"))?);
    let vault = tandem_server::keys::EscrowVault::open(
        data,
        &tandem_server::keys::EscrowVault::default_key_file(data),
    )?;
    let svc = tandem_server::backups::BackupService::new(data, store, vault);
    let users: Vec<String> = match user {
        Some(u) => vec![u.to_string()],
        None => std::fs::read_dir(data.join("backups"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| unhex(&e.file_name().to_string_lossy()))
                    .filter_map(|b| String::from_utf8(b).ok())
                    .collect()
            })
            .unwrap_or_default(),
    };
    let mut best: Option<tandem_proto::backup::BackupRecord> = None;
    for u in users {
        for r in svc
            .list(&u)
            .with_context(|| format!("listing backups of {u}"))?
        {
            let fits = device.is_none_or(|d| r.device == d) && seq.is_none_or(|s| r.seq == s);
            if fits
                && best
                    .as_ref()
                    .is_none_or(|b| r.committed_at >= b.committed_at)
            {
                best = Some(r);
            }
        }
    }
    best.with_context(|| {
        format!(
            "no such backup in {} (user {:?}, device {:?}, seq {:?})",
            data.display(),
            user,
            device,
            seq
        )
    })
}

/// A `qemu-nbd --read-only` export of one disk on a private unix socket; killed on drop.
struct QemuNbd {
    child: std::process::Child,
    socket: PathBuf,
}

impl QemuNbd {
    fn start(image: &Path, secret: Option<&Path>, n: usize) -> anyhow::Result<Self> {
        let socket =
            std::env::temp_dir().join(format!("tandem-scan-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let mut cmd = std::process::Command::new("qemu-nbd");
        cmd.args(["--read-only", "--persistent", "--shared=8", "--socket"])
            .arg(&socket);
        match secret {
            Some(key) => {
                cmd.arg("--object")
                    .arg(format!("secret,id=sec0,file={}", key.display()))
                    .arg("--image-opts")
                    .arg(format!(
                        "driver=qcow2,file.driver=file,file.filename={},encrypt.key-secret=sec0",
                        image.display()
                    ));
            }
            None => {
                cmd.arg(image);
            }
        }
        let child = cmd.stdout(std::process::Stdio::null()).spawn().context(
            "starting qemu-nbd (apt-get install qemu-utils) to read a disk only QEMU can open",
        )?;
        let mut q = QemuNbd { child, socket };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !q.socket.exists() {
            if let Some(st) = q.child.try_wait()? {
                anyhow::bail!("qemu-nbd could not open {}: {st}", image.display());
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "qemu-nbd did not start serving {} within 60 s",
                    image.display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(q)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Backup directories are named by the hex of the user name.
fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Scans every disk of a stopped VM, one report each.
fn scan_vm(mut a: VmArgs, global: &Global) -> anyhow::Result<u8> {
    // A desktop's VMs live in `<agent dir>/vms`: without explicit rules, use the bundle
    // the agent received from the server, verified against the rules key it pinned.
    let no_rules =
        a.rules.rules.is_empty() && a.rules.blocklist.is_none() && a.rules.bundle.is_none();
    if let (true, Some(agent_root)) = (no_rules, a.state_dir.parent()) {
        let agent = tandem_agent::AgentDir::new(agent_root);
        let bundle = tandem_agent::rules::bundle_path(&agent);
        if bundle.is_file() {
            if let Ok(id) = tandem_agent::identity::Identity::load(&agent) {
                a.rules.trust = Some(id.info.keys.rules.to_base64());
                a.rules.bundle = Some(bundle);
            }
        }
    }
    let rd = tandem_vm::rundir::RunDir::existing(&a.state_dir, &a.name)
        .with_context(|| format!("looking up VM {} in {}", a.name, a.state_dir.display()))?;
    let st = rd.state()?;
    if matches!(
        st.phase,
        tandem_vm::rundir::Phase::Running | tandem_vm::rundir::Phase::Starting
    ) {
        anyhow::bail!(
            "VM {} is running; its disks change under a scan. Stop it first (`tandem vm stop {}`) and scan again",
            a.name,
            a.name
        );
    }
    let spec = rd.read_spec()?;
    let mut worst = exit::SUCCESS;
    let mut docs = Vec::new();
    for (i, disk) in spec.disks.iter().enumerate() {
        let target = format!("{} disk {} ({})", a.name, i, disk.path.display());
        // Disks our reader cannot open itself (LUKS-encrypted qcow2, overlays on an NBD
        // base or on backing files) are exported read-only by qemu-nbd, which decrypts
        // with the VM's own key. Which is which, a worker finds out: this process does
        // not parse the disk.
        let mut export = None;
        let direct = if disk.secret_file.is_some() {
            None
        } else {
            let source = serde_json::to_value(Source::Image {
                path: disk.path.clone(),
                backing: Vec::new(),
            })?;
            match scan_view_report(source, &target, &a.rules, &a.limits, global) {
                Ok(done) => Some(Ok(done)),
                Err(e)
                    if e.downcast_ref::<tandem_scan::ScanError>()
                        .is_some_and(|e| matches!(e, tandem_scan::ScanError::Open(_))) =>
                {
                    None
                }
                Err(e) => Some(Err(e)),
            }
        };
        let scanned = match direct {
            Some(r) => r,
            None => QemuNbd::start(&disk.path, disk.secret_file.as_deref(), i).and_then(|q| {
                let socket = q.socket.clone();
                export = Some(q);
                let source = serde_json::to_value(Source::Nbd { socket })?;
                scan_view_report(source, &target, &a.rules, &a.limits, global)
            }),
        };
        let code = match scanned {
            Ok((code, report)) => {
                docs.push(serde_json::json!({ "disk": i, "path": disk.path, "report": report }));
                code
            }
            Err(e) => {
                if !a.limits.json {
                    println!("{target}: NOT SCANNED ({e:#})");
                }
                docs.push(
                    serde_json::json!({ "disk": i, "path": disk.path, "error": format!("{e:#}") }),
                );
                exit::INCOMPLETE
            }
        };
        drop(export);
        worst = match (worst, code) {
            (exit::FINDING, _) | (_, exit::FINDING) => exit::FINDING,
            (exit::INCOMPLETE, _) | (_, exit::INCOMPLETE) => exit::INCOMPLETE,
            _ => exit::SUCCESS,
        };
    }
    if a.limits.json {
        crate::output::print_json(&serde_json::json!({ "vm": a.name, "disks": docs }))?;
    }
    Ok(worst)
}

fn load_rules(r: &RuleArgs) -> anyhow::Result<RuleSet> {
    if let Some(b) = &r.bundle {
        let trust = r
            .trust
            .as_deref()
            .context("--bundle needs --trust KEY (the server's rules public key)")?;
        let key_text = if Path::new(trust).is_file() {
            std::fs::read_to_string(trust).with_context(|| format!("reading {trust}"))?
        } else {
            trust.to_string()
        };
        let key = tandem_proto::PublicKey::from_base64(&key_text)
            .context("--trust is not a public key")?;
        let text = std::fs::read(b).with_context(|| format!("reading bundle {}", b.display()))?;
        let signed: tandem_proto::Signed = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a signed bundle", b.display()))?;
        let (set, _) = RuleSet::from_bundle(&signed, &[key])?;
        return Ok(set);
    }
    if r.rules.is_empty() && r.blocklist.is_none() {
        return Ok(RuleSet::builtin());
    }
    Ok(RuleSet::from_paths(&r.rules, r.blocklist.as_deref())?)
}

fn config(l: &LimitArgs) -> ScanConfig {
    ScanConfig {
        max_file_size: l.max_file_size,
        file_timeout_secs: l.file_timeout,
        volume_timeout_secs: l.volume_timeout,
        worker_memory_mib: l.worker_memory,
        list_clean: l.all_files,
        incremental: l.state.is_some(),
        ..ScanConfig::default()
    }
}

/// Scans a disk through workers and prints the report; returns the exit code.
fn scan_view(
    source: serde_json::Value,
    target: &str,
    rules: &RuleArgs,
    limits: &LimitArgs,
    global: &Global,
) -> anyhow::Result<u8> {
    let (code, report) = scan_view_report(source, target, rules, limits, global)?;
    if limits.json {
        crate::output::print_json(&report)?;
    }
    Ok(code)
}

/// Scans a disk through workers; prints the human report unless --json.
fn scan_view_report(
    source: serde_json::Value,
    target: &str,
    rules: &RuleArgs,
    limits: &LimitArgs,
    global: &Global,
) -> anyhow::Result<(u8, Report)> {
    let set = load_rules(rules)?;
    let engine = set.compile()?;
    if !global.quiet && !limits.json {
        eprintln!("scanning {target} with {}", engine.info().source);
    }
    let cfg = config(limits);
    let mut state = match &limits.state {
        Some(p) => Some(ScanState::load(p, &engine.info().digest)?),
        None => None,
    };
    let exe = std::env::current_exe().context("locating the tandem binary for scan workers")?;
    let cmd: Vec<OsString> = vec![exe.into(), "scan".into(), "worker".into()];
    let report =
        tandem_scan::isolate::scan_isolated(&source, target, &engine, &cfg, &cmd, state.as_mut())
            .with_context(|| format!("scanning {target}"))?;
    if let (Some(p), Some(s)) = (&limits.state, &state) {
        s.save(p)?;
    }
    if !limits.json {
        print_human(&report);
    }
    let code = match report.outcome {
        Outcome::Clean => exit::SUCCESS,
        Outcome::Infected => exit::FINDING,
        Outcome::Incomplete => exit::INCOMPLETE,
    };
    Ok((code, report))
}

fn scan_image(a: ImageArgs, global: &Global) -> anyhow::Result<u8> {
    let source = serde_json::to_value(image_source(&a.file, &a.backing)?)?;
    scan_view(
        source,
        &a.file.display().to_string(),
        &a.rules,
        &a.limits,
        global,
    )
}

/// An image file for a worker: absolute paths (workers may run elsewhere), symlinks not
/// resolved (a backing file named through a symlink must stay refused).
fn image_source(file: &Path, backing: &[PathBuf]) -> anyhow::Result<Source> {
    let abs =
        |p: &Path| std::path::absolute(p).with_context(|| format!("resolving {}", p.display()));
    Ok(Source::Image {
        path: abs(file)?,
        backing: backing
            .iter()
            .map(|b| abs(b))
            .collect::<anyhow::Result<_>>()?,
    })
}

/// The scan `tandem image publish` runs first: `tandem scan image FILE --json` in this
/// process's workers, with the server's signed rule bundle when there is one.
pub(crate) fn scan_before_publish(
    file: &Path,
    backing: &[PathBuf],
    bundle: Option<(PathBuf, String)>,
    global: &Global,
) -> anyhow::Result<Report> {
    let (bundle, trust) = match bundle {
        Some((b, t)) => (Some(b), Some(t)),
        None => (None, None),
    };
    let rules = RuleArgs {
        rules: Vec::new(),
        blocklist: None,
        bundle,
        trust,
    };
    let d = ScanConfig::default();
    let limits = LimitArgs {
        max_file_size: d.max_file_size,
        file_timeout: d.file_timeout_secs,
        volume_timeout: d.volume_timeout_secs,
        worker_memory: d.worker_memory_mib,
        state: None,
        all_files: false,
        json: true,
    };
    let source = serde_json::to_value(image_source(file, backing)?)?;
    let (_, report) =
        scan_view_report(source, &file.display().to_string(), &rules, &limits, global)?;
    Ok(report)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn verdict_text(v: &Verdict) -> String {
    match v {
        Verdict::Clean => "clean".into(),
        Verdict::Infected { hits } => format!(
            "INFECTED [{}]",
            hits.iter()
                .map(|h| format!("{} {}", h.engine, h.name))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Verdict::NotScanned { reason, detail } => {
            format!("NOT SCANNED ({}: {detail})", reason.as_str())
        }
    }
}

fn print_human(r: &Report) {
    let secs = r.millis as f64 / 1000.0;
    let outcome = match r.outcome {
        Outcome::Clean => "CLEAN",
        Outcome::Infected => "INFECTED",
        Outcome::Incomplete => "INCOMPLETE",
    };
    println!(
        "{}: {outcome} — {} files, {} infected, {} not scanned, {} unchanged; {} read in {secs:.1} s",
        r.target,
        r.counts.files,
        r.counts.infected,
        r.counts.not_scanned,
        r.counts.unchanged,
        mib(r.counts.bytes)
    );
    for v in &r.volumes {
        println!(
            "volume {} ({}, {}, {} at {}): {} — {} files",
            v.index,
            serde_json::to_value(v.table)
                .ok()
                .and_then(|t| t.as_str().map(String::from))
                .unwrap_or_default(),
            v.fs,
            mib(v.len),
            v.start,
            verdict_text(&v.verdict),
            v.counts.files
        );
        for f in &v.files {
            println!("  {}  {}", verdict_text(&f.verdict), f.path);
        }
    }
}
