//! `tandem desktop`: start, stop and inspect the corporate and personal desktops of this
//! laptop, and manage the personal desktop's recovery points.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use tandem_desktop::prepare::{BootConfig, Prepared};
use tandem_desktop::{personal, prepare, BaseDisk, Desktop, Layout};
use tandem_vm::rundir::{RunDir, Sidecar, VmState};
use tandem_vm::{Accel, DeviceControls, Network};

use crate::exit;
use crate::output::{print_json, Global};

/// Arguments of `tandem desktop`.
#[derive(Debug, clap::Args)]
pub struct DesktopArgs {
    #[command(subcommand)]
    command: DesktopCommand,
}

/// The agent directory the desktops live in.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentDirArg {
    /// Agent directory.
    #[arg(
        long = "dir",
        env = "TANDEM_AGENT_DIR",
        default_value = "/var/lib/tandem-agent"
    )]
    pub dir: PathBuf,
}

/// What a desktop boots from.
#[derive(Debug, Clone, clap::Args)]
struct BaseArgs {
    /// Base image: NAME@VERSION (or NAME for the newest) from this laptop's synced store,
    /// served over NBD while the VM runs. Default: the version IT assigned to this device.
    #[arg(long, conflicts_with = "base_file")]
    image: Option<String>,
    /// Base image: a raw file instead of the synced store (development).
    #[arg(long)]
    base_file: Option<PathBuf>,
    /// Directory of the built guest whose kernel and initramfs boot the base.
    #[arg(
        long,
        env = "TANDEM_GUEST_DIR",
        default_value = "/var/cache/tandem/guest"
    )]
    guest_dir: PathBuf,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Accelerator: auto, kvm or tcg.
    #[arg(long, default_value = "auto")]
    accel: Accel,
    /// Size of a new corporate user disk in MiB.
    #[arg(long, default_value_t = 128)]
    user_disk_mib: u64,
}

#[derive(Debug, clap::Subcommand)]
enum DesktopCommand {
    /// Start a desktop (the corporate one only with a valid lease).
    Start {
        /// corporate or personal.
        desktop: Desktop,
        #[command(flatten)]
        dir: AgentDirArg,
        #[command(flatten)]
        base: BaseArgs,
        /// Print the VM state as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a desktop (power button, then quit, then kill).
    Stop {
        /// corporate or personal.
        desktop: Desktop,
        #[command(flatten)]
        dir: AgentDirArg,
        /// Seconds the guest gets to power off.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Back up the corporate user disk now (point-in-time; only what the server lacks
    /// travels).
    Backup {
        #[command(flatten)]
        dir: AgentDirArg,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Both desktops' states.
    Status {
        #[command(flatten)]
        dir: AgentDirArg,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `tandem desktop`.
pub fn run(args: DesktopArgs, global: &Global) -> anyhow::Result<u8> {
    match args.command {
        DesktopCommand::Start {
            desktop,
            dir,
            base,
            json,
        } => {
            let st = start(&dir.dir, desktop, &base)?;
            if json {
                print_json(&st)?;
            } else if !global.quiet {
                println!(
                    "{desktop}: {} ({}), console: tandem vm console {desktop} --state-dir {}",
                    if st.phase == tandem_vm::rundir::Phase::Running {
                        "running"
                    } else {
                        "not running"
                    },
                    st.accel.as_deref().unwrap_or("-"),
                    Layout::new(&dir.dir).vms_dir().display()
                );
            }
            Ok(exit::SUCCESS)
        }
        DesktopCommand::Stop {
            desktop,
            dir,
            timeout,
        } => {
            let layout = Layout::new(&dir.dir);
            let rd = RunDir::existing(&layout.vms_dir(), desktop.name())?;
            let st = rd.stop(Duration::from_secs(timeout))?;
            match st.exit {
                Some(tandem_vm::Exit::Stopped { how }) if how != "guest" => {
                    println!("{desktop}: stopped ({how}: the guest did not power off in time)")
                }
                _ => println!("{desktop}: stopped"),
            }
            Ok(exit::SUCCESS)
        }
        DesktopCommand::Backup { dir, json } => backup_and_report(&dir.dir, json, global),
        DesktopCommand::Status { dir, json } => {
            let layout = Layout::new(&dir.dir);
            let all = tandem_vm::rundir::list(&layout.vms_dir())?;
            if json {
                print_json(&all)?;
            } else {
                for d in [Desktop::Corporate, Desktop::Personal] {
                    let phase = all
                        .iter()
                        .find(|s| s.name == d.name())
                        .map(|s| format!("{:?}", s.phase).to_lowercase())
                        .unwrap_or_else(|| "never started".into());
                    println!("{:<10} {phase}", d.name());
                }
            }
            Ok(exit::SUCCESS)
        }
    }
}

/// Resolves the base disk and the NBD sidecar that serves it.
fn resolve_base(
    layout: &Layout,
    desktop: Desktop,
    base: &BaseArgs,
    target: Option<&tandem_proto::fleet::TargetState>,
) -> anyhow::Result<(BaseDisk, Vec<Sidecar>)> {
    if desktop == Desktop::Corporate && (base.base_file.is_some() || base.image.is_some()) {
        // The corporate desktop's definition is IT's: it boots the assigned version only.
        anyhow::bail!(
            "the corporate desktop boots the gold version IT assigned; --image and --base-file are for the personal desktop"
        );
    }
    if let Some(path) = &base.base_file {
        let path = std::fs::canonicalize(path)
            .with_context(|| format!("base image {} cannot be read", path.display()))?;
        return Ok((
            BaseDisk::File {
                label: path.display().to_string(),
                path,
            },
            Vec::new(),
        ));
    }
    let assigned;
    let image = match &base.image {
        Some(image) => image,
        None => {
            let target = target.with_context(|| {
                format!("no target state yet: run `tandem agent check-in`, or say what the {desktop} desktop boots from with --image NAME[@VERSION] or --base-file FILE")
            })?;
            let assignment = match desktop {
                Desktop::Corporate => target.assignments.corporate.clone(),
                Desktop::Personal => target.assignments.personal.clone(),
            };
            let a = assignment
                .with_context(|| format!("IT assigned no {desktop} image to this device"))?;
            assigned = format!("{}@{}", a.image, a.version);
            &assigned
        }
    };
    let catalog = tandem_sync::catalog::Catalog::new(&layout.root().join("store").join("catalog"));
    let (name, version) = match image.split_once('@') {
        Some((n, v)) => (
            n.to_string(),
            v.parse::<u64>()
                .with_context(|| format!("`{v}` is not a version number"))?,
        ),
        None => {
            let versions = catalog.versions(image)?;
            let newest = versions.into_iter().max().with_context(|| {
                format!("no version of `{image}` is on this laptop; run `tandem image pull {image}` or let the agent sync")
            })?;
            (image.clone(), newest)
        }
    };
    let signed = catalog.load_signed(&name, version).with_context(|| {
        format!("{name}@{version} is not on this laptop; run `tandem image pull {name}@{version}`")
    })?;
    let manifest: tandem_proto::manifest::Manifest = serde_json::from_str(&signed.payload)
        .context("the stored manifest is damaged; pull it again")?;
    let socket = layout
        .run_dir()
        .join(format!("nbd-{}.sock", desktop.name()));
    std::fs::create_dir_all(layout.run_dir())?;
    let sidecar = Sidecar {
        program: std::env::current_exe().context("locating the tandem binary")?,
        args: vec![
            "image".into(),
            "serve".into(),
            format!("{name}@{version}"),
            "--dir".into(),
            layout.root().display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
        ],
        ready_socket: Some(socket.clone()),
    };
    Ok((
        BaseDisk::Nbd {
            socket,
            export: String::new(),
            size: manifest.size,
            label: format!("{name}@{version}"),
        },
        vec![sidecar],
    ))
}

fn boot_config(base: &BaseArgs) -> anyhow::Result<BootConfig> {
    let text = std::fs::read_to_string(base.guest_dir.join("guest.json")).with_context(|| {
        format!(
            "no built guest in {}; run `tandem guest build`",
            base.guest_dir.display()
        )
    })?;
    let assets: tandem_guest::GuestAssets =
        serde_json::from_str(&text).context("guest.json is damaged; rebuild it")?;
    Ok(BootConfig {
        kernel: Some(assets.kernel),
        initrd: Some(assets.initrd),
        cmdline: tandem_guest::DEFAULT_CMDLINE.to_string(),
        memory_mib: base.memory,
        vcpus: 1,
        accel: base.accel,
        network: Network::None,
        controls: DeviceControls::default(),
    })
}

/// Starts a desktop: the lease gate and key unwrap for the corporate one, fresh overlay,
/// then the supervisor.
fn start(dir: &Path, desktop: Desktop, base: &BaseArgs) -> anyhow::Result<VmState> {
    let layout = Layout::new(dir);
    let rd = RunDir::new(&layout.vms_dir(), desktop.name())?;
    if let Some(pid) = rd.running_supervisor()? {
        return Err(tandem_vm::VmError::AlreadyRunning {
            name: desktop.name().to_string(),
            pid,
        }
        .into());
    }
    let mut boot = boot_config(base)?;
    // The last verified target state, read once: assignments and device controls.
    // (A personal desktop may run on a device that never enrolled: no target then.)
    let target = tandem_agent::checkin::current_target(&tandem_agent::AgentDir::new(dir))
        .ok()
        .flatten();
    // Device controls come from IT's signed policy, not from the user's command line.
    if let Some(target) = &target {
        if desktop == Desktop::Corporate {
            boot.controls.usb = target.policy.controls.usb;
            boot.network = if target.policy.controls.network {
                Network::User
            } else {
                Network::None
            };
        }
    }
    let prepared: Prepared = match desktop {
        Desktop::Corporate => {
            let agent = tandem_agent::AgentDir::new(dir);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let lease = tandem_agent::lease::check(&agent, now)?;
            tracing::info!(days_left = lease.days_left, "lease valid");
            let key = user_disk_key(&agent, &layout)?;
            let (base_disk, sidecars) = resolve_base(&layout, desktop, base, target.as_ref())?;
            prepare::corporate(
                &layout,
                &base_disk,
                &boot,
                &key,
                base.user_disk_mib,
                sidecars,
            )?
        }
        Desktop::Personal => {
            let (base_disk, sidecars) = resolve_base(&layout, desktop, base, target.as_ref())?;
            prepare::personal(&layout, &base_disk, &boot, sidecars)?
        }
    };
    let spec = rd.place(prepared.spec);
    rd.write_spec(&spec)?;
    rd.write_sidecars(&prepared.sidecars)?;
    let st = crate::cmd::vm::start_supervisor(&layout.vms_dir(), &rd)?;
    if let Err(e) = collect_old_versions(&layout) {
        tracing::warn!(error = %format!("{e:#}"), "old image versions not collected; retried at the next start");
    }
    // QEMU has read the passphrase: remove it from disk.
    drop(prepared.secret);
    Ok(st)
}

/// The corporate user disk key: unwrapped locally; or, on a new or re-provisioned device,
/// the escrowed key plus the latest backup of the user disk; or, for a brand-new user, a
/// fresh key that is escrowed on the server at once.
fn user_disk_key(
    agent: &tandem_agent::AgentDir,
    layout: &Layout,
) -> anyhow::Result<tandem_desktop::keys::SecretKey> {
    use tandem_desktop::keys::{SecretKey, UserDiskKeys};
    let keys = UserDiskKeys::new(&layout.keys_dir());
    if keys.exists() || layout.corporate_user_disk().exists() {
        return Ok(keys.unwrap_key()?);
    }
    let escrowed = crate::output::block_on(tandem_agent::backup::escrow_get(agent))?
        .context("fetching the escrowed user disk key from the server")?;
    match escrowed {
        Some(text) => {
            let key = SecretKey::from_base64(&text)?;
            keys.install(&key)?;
            let disk = layout.corporate_user_disk();
            let restored =
                crate::output::block_on(tandem_agent::backup::restore_latest(agent, &disk))?
                    .context("restoring the latest backup of the user disk")?;
            match restored {
                Some(r) => eprintln!(
                    "corporate: restored the user disk from backup {} ({} chunks, {:.1} MB)",
                    r.seq,
                    r.chunks,
                    r.disk_bytes as f64 / 1e6
                ),
                None => eprintln!(
                    "corporate: the server holds no backup yet; a new user disk is created"
                ),
            }
            Ok(key)
        }
        None => {
            let key = keys.create()?;
            crate::output::block_on(tandem_agent::backup::escrow_put(agent, &key.to_base64()))?
                .context("escrowing the new user disk key on the server (nothing was started; retry when the server is reachable)")
                .inspect_err(|_| {
                    // Without escrow the disk could never be re-provisioned: do not keep it.
                    let _ = std::fs::remove_file(layout.keys_dir().join("user-disk.wrapped"));
                })?;
            Ok(key)
        }
    }
}

/// `tandem desktop backup` / `tandem agent backup`: back up and say what moved.
pub fn backup_and_report(dir: &Path, json: bool, global: &Global) -> anyhow::Result<u8> {
    let report = backup(dir)?;
    if json {
        print_json(&report)?;
    } else if !global.quiet {
        println!(
            "backup {} committed: disk {:.1} MB, {} data chunks, {} uploaded ({:.2} MB); the rest was already on the server",
            report.backup.seq,
            report.disk_bytes as f64 / 1e6,
            report.data_chunks,
            report.uploaded_chunks,
            report.uploaded_bytes as f64 / 1e6
        );
    }
    Ok(exit::SUCCESS)
}

/// Backs up the corporate user disk: a point-in-time copy, then only the chunks the
/// server lacks.
fn backup(dir: &Path) -> anyhow::Result<tandem_agent::backup::BackupReport> {
    let layout = Layout::new(dir);
    let agent = tandem_agent::AgentDir::new(dir);
    std::fs::create_dir_all(layout.run_dir())?;
    let copy = layout.run_dir().join("user-backup.qcow2");
    let taken_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    tandem_desktop::prepare::user_disk_copy(&layout, &copy)?;
    let result = crate::output::block_on(tandem_agent::backup::upload(&agent, &copy, taken_at));
    let _ = std::fs::remove_file(&copy);
    result?.context("uploading the backup (the previous backup stays the latest)")
}

/// The `NAME@VERSION` a desktop runs on, from its base record, if it runs.
fn version_in_use(layout: &Layout, d: Desktop) -> Option<(String, u64)> {
    if !personal::is_running(layout, d).ok()? {
        return None;
    }
    let bytes = std::fs::read(layout.base_record(d)).ok()?;
    let base: BaseDisk = serde_json::from_slice(&bytes).ok()?;
    let (name, version) = base.label().split_once('@')?;
    Some((name.to_string(), version.parse().ok()?))
}

/// Update at the next boot, second half: once a desktop runs on a newer version, older
/// versions of its image that no running desktop uses are dropped from this laptop and
/// their chunks collected. The newest version always stays (the next delta's base).
fn collect_old_versions(layout: &Layout) -> anyhow::Result<()> {
    let catalog = tandem_sync::catalog::Catalog::new(&layout.root().join("store").join("catalog"));
    let running: Vec<(String, u64)> = [Desktop::Corporate, Desktop::Personal]
        .into_iter()
        .filter_map(|d| version_in_use(layout, d))
        .collect();
    let mut dropped = Vec::new();
    for (name, newest_running) in &running {
        for v in catalog.versions(name)? {
            let used = running.iter().any(|(n, rv)| n == name && *rv == v);
            if v < *newest_running && !used {
                catalog.delete(name, v)?;
                dropped.push(format!("{name}@{v}"));
            }
        }
    }
    if dropped.is_empty() {
        return Ok(());
    }
    eprintln!(
        "removed {} (no desktop uses it any more)",
        dropped.join(", ")
    );
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["store", "gc", "--json", "--dir"])
        .arg(layout.root())
        .output()?;
    if !out.status.success() {
        anyhow::bail!("store gc: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `tandem vm snapshot|snapshots|rollback|reset` on a desktop.
pub fn recovery(
    dir: &Path,
    desktop: Desktop,
    action: RecoveryAction,
    json: bool,
) -> anyhow::Result<u8> {
    let layout = Layout::new(dir);
    match action {
        RecoveryAction::Snapshot(name) => {
            personal::snapshot(&layout, desktop, &name)?;
            println!("{desktop}: recovery point `{name}` taken");
        }
        RecoveryAction::List => {
            let list = personal::snapshots(&layout, desktop)?;
            if json {
                print_json(&list)?;
            } else if list.is_empty() {
                println!("{desktop}: no recovery points");
            } else {
                for s in list {
                    println!(
                        "{}\t{}",
                        s.name,
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_secs(s.date_sec)
                        )
                    );
                }
            }
        }
        RecoveryAction::Rollback(name) => {
            personal::rollback(&layout, desktop, &name)?;
            println!("{desktop}: rolled back to `{name}`; it takes effect at the next start");
        }
        RecoveryAction::Reset => {
            personal::reset(&layout, desktop)?;
            println!("{desktop}: reset to the pristine base; every recovery point is gone");
        }
    }
    Ok(exit::SUCCESS)
}

/// A recovery-point operation.
#[derive(Debug, Clone)]
pub enum RecoveryAction {
    /// Take one.
    Snapshot(String),
    /// List them.
    List,
    /// Go back to one.
    Rollback(String),
    /// Back to the pristine base.
    Reset,
}

/// The agent's hooks into the desktops: a kill stops the corporate VM before its keys
/// and disks go; the lease's run loop warns the user on the corporate console, then shuts
/// the VM down cleanly, then stops it.
pub struct DesktopHooks {
    layout: Layout,
}

impl DesktopHooks {
    /// Hooks for the desktops under the agent directory `dir`.
    pub fn new(dir: &Path) -> Self {
        DesktopHooks {
            layout: Layout::new(dir),
        }
    }

    fn corporate(&self) -> Option<RunDir> {
        match personal::is_running(&self.layout, Desktop::Corporate) {
            Ok(true) => RunDir::existing(&self.layout.vms_dir(), Desktop::Corporate.name()).ok(),
            _ => None,
        }
    }

    /// Stops the corporate VM on a worker thread, so the agent's loop is not blocked.
    fn stop_in_background(&self, timeout: Duration) {
        if let Some(rd) = self.corporate() {
            std::thread::spawn(move || {
                if let Err(e) = rd.stop(timeout) {
                    tracing::warn!(error = %e, "stopping the corporate VM for the lease failed");
                }
            });
        }
    }
}

impl tandem_agent::kill::CorporateVms for DesktopHooks {
    fn stop_all(&self) -> Result<(), String> {
        match self.corporate() {
            // Its disks are about to be erased: no need to wait for a clean shutdown.
            Some(rd) => rd
                .stop(Duration::from_secs(3))
                .map(drop)
                .map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

impl tandem_agent::checkin::Hooks for DesktopHooks {
    fn enforce_lease(&self, what: tandem_agent::lease::Enforcement) {
        use tandem_agent::lease::Enforcement;
        match what {
            Enforcement::Run => {}
            Enforcement::Warn { secs_left } => {
                if let Some(rd) = self.corporate() {
                    let hours = secs_left / 3600;
                    let msg = format!(
                        "echo 'tandem: this laptop must check in with IT within {hours} h or the corporate desktop will shut down'\n"
                    );
                    if let Ok(mut sock) =
                        std::os::unix::net::UnixStream::connect(rd.console_socket())
                    {
                        use std::io::Write as _;
                        let _ = sock.write_all(msg.as_bytes());
                    }
                    tracing::warn!(secs_left, "corporate lease ends soon; user warned");
                }
            }
            Enforcement::Shutdown { grace_left } => {
                tracing::warn!(grace_left, "corporate lease expired: shutting the VM down");
                self.stop_in_background(Duration::from_secs(grace_left.max(30)));
            }
            Enforcement::Stop => {
                tracing::warn!("corporate lease expired past its grace period: stopping the VM");
                self.stop_in_background(Duration::from_secs(5));
            }
        }
    }
}

/// Backs up the corporate user disk on the policy's interval while `tandem agent run`
/// runs. Failures are logged and retried at the next interval; the previous backup stays
/// the latest.
pub fn spawn_backup_scheduler(dir: PathBuf) {
    std::thread::spawn(move || {
        let agent = tandem_agent::AgentDir::new(&dir);
        let layout = Layout::new(&dir);
        loop {
            let mins = tandem_agent::checkin::current_target(&agent)
                .ok()
                .flatten()
                .map(|t| t.policy.backup_interval_mins)
                .unwrap_or(240)
                .max(1);
            std::thread::sleep(Duration::from_secs(u64::from(mins) * 60));
            if !layout.corporate_user_disk().exists() {
                continue;
            }
            match backup(&dir) {
                Ok(r) => tracing::info!(
                    seq = r.backup.seq,
                    uploaded_bytes = r.uploaded_bytes,
                    "scheduled backup committed"
                ),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "scheduled backup failed; retrying at the next interval")
                }
            }
        }
    });
}
