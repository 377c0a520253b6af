//! The laptop's desktops, owned by the daemon: the start sequence (lease gate → key →
//! base → prepare → launch), stop, status, the personal desktop's recovery points,
//! backups of the corporate user disk, version GC, and the hooks the check-in loop calls.
//!
//! One [`Laptop`] holds the laptop's one open chunk store and serves each running
//! desktop's base version over NBD as a task of the daemon's runtime
//! (`<dir>/run/nbd-<desktop>.sock`). QEMU runs detached from the daemon (see
//! `tandem_vm::rundir`): a daemon that dies leaves both desktops running, their base reads
//! held by QEMU's NBD reconnect; the restarted daemon [`Laptop::reattach`]es — it serves
//! the bases again on the same sockets and watches the QEMUs through their pidfile locks.
//!
//! Both desktops may run at once, each its own QEMU. Starting or stopping one desktop
//! twice at the same time is refused (`busy`), never raced.
//!
//! Confinement: when the daemon runs as root, each desktop's QEMU drops to a uid of its
//! own ([`VmUsers`]) under QEMU's seccomp filter. Everything a QEMU needs at start is
//! opened before the drop; the only later open is the reconnect to its base export, so
//! each export socket sits in a directory only that desktop's uid can enter
//! (`<runtime>/<desktop>/nbd.sock`). The desktops' own directories are 0700 root, so one
//! desktop's QEMU cannot open the other's disks, keys or socket.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_desktop::prepare::{self, BootConfig};
use tandem_desktop::{personal, BaseDisk, Desktop, DesktopError, Layout};
use tandem_proto::fleet::{ImageRef, TargetState};
use tandem_vm::rundir::{RunDir, VmState};
use tandem_vm::{Accel, DeviceControls, Network, RunAs, VmError};

use crate::backup::BackupError;
use crate::escrow::{EscrowError, Provisioning};
use crate::images::LocalStoreError;
use crate::lease::LeaseError;
use crate::versions::{Collected, VersionsError};
use crate::{checkin, kill, lease, AgentDir};

/// Memory for decompressed, verified chunks per NBD export.
const EXPORT_CACHE: usize = 32 << 20;

/// The unprivileged users the desktops' QEMUs run as (see [`RunAs`]): one per desktop,
/// so neither can open the other's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmUsers {
    /// The corporate desktop's QEMU.
    pub corporate: RunAs,
    /// The personal desktop's QEMU.
    pub personal: RunAs,
}

impl VmUsers {
    /// The default first uid (0x7001_0000): above systemd's container range
    /// (0x80000–0x6fffffff), below its foreign-uid range, and far from people's and
    /// system users' ids. Corporate gets it, personal the next one.
    pub const DEFAULT_BASE: u32 = 0x7001_0000;

    /// Corporate `base:base`, personal `base+1:base+1`.
    pub fn from_base(base: u32) -> Self {
        let at = |id: u32| RunAs { uid: id, gid: id };
        VmUsers {
            corporate: at(base),
            personal: at(base.saturating_add(1)),
        }
    }

    /// Users from `base` when this process may switch users (it runs as root), else
    /// `None`: QEMU then runs as the daemon's own user, unconfined by uid.
    pub fn when_root(base: u32) -> Option<Self> {
        nix::unistd::geteuid()
            .is_root()
            .then(|| Self::from_base(base))
    }

    /// The user of `desktop`'s QEMU.
    pub fn of(&self, desktop: Desktop) -> RunAs {
        match desktop {
            Desktop::Corporate => self.corporate,
            Desktop::Personal => self.personal,
        }
    }
}

/// Where confined desktops' export sockets live: a directory of the machine's runtime
/// tree (`RuntimeDirectory=tandem` in the systemd unit), so reaching them never depends
/// on the permissions of the agent directory's parents.
pub const RUNTIME_ROOT: &str = "/run/tandem";

/// What the daemon was configured with (by `tandem agent run`).
#[derive(Debug, Clone)]
pub struct LaptopConfig {
    /// The built guest whose kernel and initramfs boot the bases.
    pub guest_dir: PathBuf,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Accelerator.
    pub accel: Accel,
    /// Size of a new corporate user disk in MiB.
    pub user_disk_mib: u64,
    /// The users the desktops' QEMUs run as; `None` runs them as the daemon's user.
    pub vm_users: Option<VmUsers>,
}

impl LaptopConfig {
    /// The directory holding the desktops' export sockets for the agent directory
    /// `root`: under [`RUNTIME_ROOT`] (one subdirectory per agent directory, so several
    /// daemons on one host never share one) when confined, else `<root>/run`.
    pub fn runtime_dir(&self, root: &Path) -> PathBuf {
        if self.vm_users.is_none() {
            return root.join("run");
        }
        let canonical = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        let id = blake3::hash(canonical.as_os_str().as_encoded_bytes());
        Path::new(RUNTIME_ROOT).join(&id.to_hex()[..16])
    }
}

/// What a desktop boots from, when the user says (personal desktop only).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BaseChoice {
    /// `NAME@VERSION` or `NAME` (the newest on this laptop).
    pub image: Option<String>,
    /// A raw file (development).
    pub base_file: Option<PathBuf>,
}

/// Who asked (peer credentials of the local API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// User id.
    pub uid: u32,
}

/// A desktop operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LaptopError {
    /// VM layer.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Desktop layer.
    #[error(transparent)]
    Desktop(#[from] DesktopError),
    /// The lease refuses the corporate desktop.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The user disk key.
    #[error(transparent)]
    Escrow(#[from] EscrowError),
    /// The laptop store.
    #[error(transparent)]
    Store(#[from] LocalStoreError),
    /// The catalog.
    #[error(transparent)]
    Sync(#[from] tandem_sync::SyncError),
    /// Backing up.
    #[error("backup failed (the previous backup stays the latest): {0}")]
    Backup(#[from] BackupError),
    /// Checking in.
    #[error(transparent)]
    Checkin(#[from] checkin::CheckinError),
    /// Serving a base.
    #[error(transparent)]
    Nbd(#[from] tandem_nbd::NbdError),
    /// Another start or stop of this desktop is in progress.
    #[error("a start or stop of the {0} desktop is already in progress; wait for it and retry")]
    Busy(Desktop),
    /// The corporate desktop boots only what IT assigned.
    #[error("the corporate desktop boots the gold version IT assigned; --image and --base-file are for the personal desktop")]
    CorporateBase,
    /// No target state yet.
    #[error("no target state yet: run `tandem agent check-in`, or say what the {0} desktop boots from with --image NAME[@VERSION] or --base-file FILE")]
    NoTarget(Desktop),
    /// Nothing assigned.
    #[error("IT assigned no {0} image to this device")]
    NotAssigned(Desktop),
    /// No guest built.
    #[error("no built guest in {0}; run `tandem guest build` (or pass --guest-dir to `tandem agent run`)")]
    NoGuest(PathBuf),
    /// A bad image reference.
    #[error("`{0}` is not NAME or NAME@VERSION")]
    BadImage(String),
    /// No such version here.
    #[error(
        "no version of `{0}` is on this laptop; run `tandem image pull {0}` or let the agent sync"
    )]
    NoVersion(String),
    /// The base file cannot be read.
    #[error("base image {path} cannot be read: {source}")]
    BaseFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The base file is not the asker's to read.
    #[error("base image {0} is neither owned by nor readable for the user who asked; the daemon does not read files for others")]
    BaseFileForbidden(PathBuf),
    /// No corporate user disk yet.
    #[error("no corporate user disk yet: start the corporate desktop once")]
    NoUserDisk,
}

/// A desktop started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Started {
    /// Its VM state.
    pub state: VmState,
    /// The base it boots.
    pub base: String,
    /// Where the corporate user disk key came from.
    pub provisioning: Option<Provisioning>,
    /// Old image versions collected after the start.
    pub collected: Collected,
    /// Why old versions could not be collected (retried at the next start).
    pub collect_error: Option<String>,
}

/// A backup committed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupDone {
    /// The committed backup.
    pub backup: tandem_proto::backup::BackupInfo,
    /// Bytes of the disk file.
    pub disk_bytes: u64,
    /// Distinct chunks holding data.
    pub data_chunks: u64,
    /// Chunks the server lacked and received.
    pub uploaded_chunks: u64,
    /// Bytes sent for them.
    pub uploaded_bytes: u64,
}

/// An NBD export of one desktop's base, served by a task of the daemon's runtime.
struct Export {
    image: ImageRef,
    generation: u64,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The laptop's desktops and their bases (see the module doc).
pub struct Laptop {
    dir: AgentDir,
    layout: Layout,
    config: LaptopConfig,
    rt: tokio::runtime::Handle,
    local: Mutex<Option<Arc<tandem_sync::Local>>>,
    exports: Mutex<HashMap<&'static str, Export>>,
    generation: std::sync::atomic::AtomicU64,
    corporate_busy: Mutex<()>,
    personal_busy: Mutex<()>,
    backup_busy: Mutex<()>,
    last_backup: Mutex<Option<u64>>,
    /// Where the export sockets live ([`LaptopConfig::runtime_dir`]), fixed at start.
    runtime: PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Laptop {
    /// The laptop under `dir`; NBD tasks run on `rt`.
    pub fn new(dir: AgentDir, config: LaptopConfig, rt: tokio::runtime::Handle) -> Self {
        Laptop {
            runtime: config.runtime_dir(dir.root()),
            layout: Layout::new(dir.root()),
            dir,
            config,
            rt,
            local: Mutex::new(None),
            exports: Mutex::new(HashMap::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
            corporate_busy: Mutex::new(()),
            personal_busy: Mutex::new(()),
            backup_busy: Mutex::new(()),
            last_backup: Mutex::new(None),
        }
    }

    /// The agent directory.
    pub fn dir(&self) -> &AgentDir {
        &self.dir
    }

    /// The daemon's runtime.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    /// The one open chunk store (opened on first use: it needs the pinned image key).
    fn local(&self) -> Result<Arc<tandem_sync::Local>, LaptopError> {
        let mut slot = lock(&self.local);
        if let Some(l) = slot.as_ref() {
            return Ok(l.clone());
        }
        let l = Arc::new(crate::images::open_local(&self.dir)?);
        *slot = Some(l.clone());
        Ok(l)
    }

    fn busy(&self, d: Desktop) -> Result<MutexGuard<'_, ()>, LaptopError> {
        let m = match d {
            Desktop::Corporate => &self.corporate_busy,
            Desktop::Personal => &self.personal_busy,
        };
        match m.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) => Err(LaptopError::Busy(d)),
        }
    }

    fn boot_config(&self) -> Result<BootConfig, LaptopError> {
        let text = std::fs::read_to_string(self.config.guest_dir.join("guest.json"))
            .map_err(|_| LaptopError::NoGuest(self.config.guest_dir.clone()))?;
        let assets: tandem_guest::GuestAssets = serde_json::from_str(&text)
            .map_err(|_| LaptopError::NoGuest(self.config.guest_dir.clone()))?;
        Ok(BootConfig {
            kernel: Some(assets.kernel),
            initrd: Some(assets.initrd),
            cmdline: tandem_guest::DEFAULT_CMDLINE.to_string(),
            memory_mib: self.config.memory_mib,
            vcpus: 1,
            accel: self.config.accel,
            network: Network::None,
            controls: DeviceControls::default(),
            run_as: None,
        })
    }

    /// The directory of `desktop`'s export socket, made so that its QEMU's user (and
    /// root) can enter it and nobody else can.
    fn socket_dir(&self, desktop: Desktop) -> Result<PathBuf, LaptopError> {
        use std::os::unix::fs::PermissionsExt as _;
        let runtime = &self.runtime;
        let dir = runtime.join(desktop.name());
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DesktopError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        if self.config.vm_users.is_some() {
            // The runtime root and this daemon's subdirectory: enter-only for the QEMU
            // users, so neither lists nor reaches the other desktop's directory.
            for d in [Path::new(RUNTIME_ROOT), runtime.as_path()] {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711))
                    .map_err(io(d))?;
            }
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
        if let Some(u) = self.config.vm_users {
            let r = u.of(desktop);
            std::os::unix::fs::chown(&dir, Some(r.uid), Some(r.gid)).map_err(io(&dir))?;
        }
        Ok(dir)
    }

    /// Makes `desktop`'s own directories (disks, secrets) root's alone, so the other
    /// desktop's QEMU user cannot open anything in them. Its VM state directory may be
    /// entered by its own QEMU's group only: QEMU removes its pidfile (`pid/`, its own)
    /// at a clean exit, after it has dropped privileges.
    fn private_dirs(&self, desktop: Desktop) -> Result<(), LaptopError> {
        use std::os::unix::fs::PermissionsExt as _;
        let vm_dir = self.layout.vms_dir().join(desktop.name());
        let group = self.config.vm_users.map(|u| u.of(desktop).gid);
        let dirs = [
            (self.layout.desktop_dir(desktop), 0o700, None),
            (self.layout.run_dir(), 0o700, None),
            (vm_dir, if group.is_some() { 0o710 } else { 0o700 }, group),
        ];
        for (d, mode, group) in dirs {
            std::fs::create_dir_all(&d).map_err(|e| DesktopError::io(&d, e))?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))
                .map_err(|e| DesktopError::io(&d, e))?;
            if let Some(g) = group {
                std::os::unix::fs::chown(&d, Some(0), Some(g))
                    .map_err(|e| DesktopError::io(&d, e))?;
            }
        }
        Ok(())
    }

    fn run_dir(&self, d: Desktop) -> Result<RunDir, LaptopError> {
        Ok(RunDir::new(&self.layout.vms_dir(), d.name())?)
    }

    /// Starts a desktop: for the corporate one the lease gate and the user disk key,
    /// then its base (served over NBD), a prepared overlay, and QEMU.
    pub fn start(
        self: &Arc<Self>,
        desktop: Desktop,
        choice: &BaseChoice,
        peer: Peer,
    ) -> Result<Started, LaptopError> {
        let _busy = self.busy(desktop)?;
        let rd = self.run_dir(desktop)?;
        if let Some(pid) = rd.running_supervisor()? {
            return Err(VmError::AlreadyRunning {
                name: desktop.name().to_string(),
                pid,
            }
            .into());
        }
        let mut boot = self.boot_config()?;
        boot.run_as = self.config.vm_users.map(|u| u.of(desktop));
        self.private_dirs(desktop)?;
        // The last verified target state: assignments and device controls. (A personal
        // desktop may run on a device that never enrolled: no target then.)
        let target = checkin::current_target(&self.dir).ok().flatten();
        let (prepared, provisioning, export) = match desktop {
            Desktop::Corporate => {
                if choice.image.is_some() || choice.base_file.is_some() {
                    return Err(LaptopError::CorporateBase);
                }
                if let Some(t) = &target {
                    boot.controls.usb = t.policy.controls.usb;
                    boot.network = if t.policy.controls.network {
                        Network::User
                    } else {
                        Network::None
                    };
                }
                let l = lease::check(&self.dir, crate::now())?;
                tracing::info!(days_left = l.days_left, "lease valid");
                let (key, how) = self
                    .rt
                    .block_on(crate::escrow::user_disk_key(&self.dir, &self.layout))?;
                let (base, export) = self.resolve_base(desktop, choice, target.as_ref(), peer)?;
                let p = prepare::corporate(
                    &self.layout,
                    &base,
                    &boot,
                    &key,
                    self.config.user_disk_mib,
                    Vec::new(),
                )?;
                (p, Some(how), export)
            }
            Desktop::Personal => {
                let (base, export) = self.resolve_base(desktop, choice, target.as_ref(), peer)?;
                (
                    prepare::personal(&self.layout, &base, &boot, Vec::new())?,
                    None,
                    export,
                )
            }
        };
        let base = serde_json::from_slice::<BaseDisk>(
            &std::fs::read(self.layout.base_record(desktop)).unwrap_or_default(),
        )
        .map(|b| b.label().to_string())
        .unwrap_or_default();
        let (state, child) = rd.launch(&prepared.spec)?;
        // QEMU has read the passphrases: remove them from disk.
        drop(prepared.secrets);
        let generation = export.unwrap_or(0);
        self.watch(desktop, rd, Some(child), generation);
        let (collected, collect_error) = match self.collect_old_versions() {
            Ok(c) => (c, None),
            Err(e) => {
                tracing::warn!(error = %e, "old image versions not collected; retried at the next start");
                (Collected::default(), Some(e.to_string()))
            }
        };
        Ok(Started {
            state,
            base,
            provisioning,
            collected,
            collect_error,
        })
    }

    /// Watches a desktop's QEMU on a thread of its own; when it ends, its base export goes.
    fn watch(
        self: &Arc<Self>,
        desktop: Desktop,
        rd: RunDir,
        child: Option<std::process::Child>,
        generation: u64,
    ) {
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            if let Err(e) = rd.watch(child) {
                tracing::warn!(vm = desktop.name(), error = %e, "recording how the VM ended failed");
            }
            {
                let mut exports = lock(&me.exports);
                if exports
                    .get(desktop.name())
                    .is_some_and(|e| e.generation == generation)
                {
                    exports.remove(desktop.name());
                    // Its socket directory goes with the export (and the daemon's
                    // runtime directory once no desktop has one).
                    let _ = std::fs::remove_dir_all(me.runtime.join(desktop.name()));
                    let _ = std::fs::remove_dir(&me.runtime);
                }
            }
            if desktop == Desktop::Corporate {
                me.erase_corporate_run();
            }
        });
    }

    /// Once the corporate VM has ended, its console transcript, any secret file left for
    /// QEMU and its volatile overlay go ([`kill::erase_after_run`]): none of it stays on
    /// the laptop between runs. Waits for a start or stop in progress and does nothing
    /// when a new run began meanwhile.
    fn erase_corporate_run(&self) {
        let _busy = lock(&self.corporate_busy);
        self.erase_corporate_run_locked();
    }

    /// [`Laptop::erase_corporate_run`] for a caller that holds `corporate_busy`.
    fn erase_corporate_run_locked(&self) {
        // A kill in progress erases all of it itself (after stopping the VM).
        if !matches!(kill::is_killed(&self.dir), Ok(false)) {
            return;
        }
        if !matches!(
            personal::is_running(&self.layout, Desktop::Corporate),
            Ok(false)
        ) {
            return;
        }
        match kill::erase_after_run(&self.dir) {
            Ok(n) => tracing::debug!(files = n, "corporate run erased"),
            Err(e) => {
                tracing::warn!(error = %e, "could not erase what the corporate VM left; retried when it next ends and at daemon start")
            }
        }
    }

    /// The base a desktop boots, served over NBD when it comes from the store. Returns
    /// the base and the export's generation.
    fn resolve_base(
        &self,
        desktop: Desktop,
        choice: &BaseChoice,
        target: Option<&TargetState>,
        peer: Peer,
    ) -> Result<(BaseDisk, Option<u64>), LaptopError> {
        if let Some(path) = &choice.base_file {
            let path = std::fs::canonicalize(path).map_err(|source| LaptopError::BaseFile {
                path: path.clone(),
                source,
            })?;
            let meta = std::fs::metadata(&path).map_err(|source| LaptopError::BaseFile {
                path: path.clone(),
                source,
            })?;
            use std::os::unix::fs::MetadataExt as _;
            if peer.uid != 0 && meta.uid() != peer.uid && meta.mode() & 0o004 == 0 {
                return Err(LaptopError::BaseFileForbidden(path));
            }
            return Ok((
                BaseDisk::File {
                    label: path.display().to_string(),
                    path,
                },
                None,
            ));
        }
        let local = self.local()?;
        let spec = match (&choice.image, desktop) {
            (Some(i), _) => i.clone(),
            // The personal overlay keeps the version it was made on until a reset.
            (None, Desktop::Personal)
                if personal::bound_base(&self.layout)?.is_some_and(|b| b.contains('@')) =>
            {
                personal::bound_base(&self.layout)?.unwrap_or_default()
            }
            (None, _) => {
                let t = target.ok_or(LaptopError::NoTarget(desktop))?;
                let a = match desktop {
                    Desktop::Corporate => t.assignments.corporate.clone(),
                    Desktop::Personal => t.assignments.personal.clone(),
                }
                .ok_or(LaptopError::NotAssigned(desktop))?;
                format!("{}@{}", a.image, a.version)
            }
        };
        let image = match spec.split_once('@') {
            Some((n, v)) => ImageRef {
                image: n.to_string(),
                version: v.parse().map_err(|_| LaptopError::BadImage(spec.clone()))?,
            },
            None => ImageRef {
                version: local
                    .catalog
                    .versions(&spec)?
                    .into_iter()
                    .max()
                    .ok_or_else(|| LaptopError::NoVersion(spec.clone()))?,
                image: spec.clone(),
            },
        };
        let (socket, generation) = self.export(desktop, &local, &image)?;
        let (manifest, _) = local.manifest(&image.image, image.version)?;
        Ok((
            BaseDisk::Nbd {
                socket,
                export: String::new(),
                size: manifest.size,
                label: format!("{}@{}", image.image, image.version),
            },
            Some(generation),
        ))
    }

    /// Serves `image` for `desktop` on its socket (replacing an earlier export).
    fn export(
        &self,
        desktop: Desktop,
        local: &tandem_sync::Local,
        image: &ImageRef,
    ) -> Result<(PathBuf, u64), LaptopError> {
        let (manifest, _) = local
            .manifest(&image.image, image.version)
            .map_err(|_| LaptopError::NoVersion(format!("{}@{}", image.image, image.version)))?;
        let reader =
            tandem_store::ImageReader::with_cache(local.store.clone(), manifest, EXPORT_CACHE)
                .map_err(tandem_sync::SyncError::from)?;
        let socket = self.socket_dir(desktop)?.join("nbd.sock");
        let mut exports = lock(&self.exports);
        exports.remove(desktop.name());
        let listener = {
            let _rt = self.rt.enter();
            tandem_nbd::bind(&socket)?
        };
        if let Some(u) = self.config.vm_users {
            // QEMU reconnects as its own user after a daemon restart.
            let r = u.of(desktop);
            std::os::unix::fs::chown(&socket, Some(r.uid), Some(r.gid))
                .map_err(|e| DesktopError::io(&socket, e))?;
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let label = format!("{}@{}", image.image, image.version);
        self.rt.spawn(tandem_nbd::serve(
            listener,
            Arc::new(reader),
            label,
            async move {
                let _ = rx.await;
            },
        ));
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        exports.insert(
            desktop.name(),
            Export {
                image: image.clone(),
                generation,
                stop: Some(tx),
            },
        );
        tracing::info!(desktop = desktop.name(), image = %image, "serving base over NBD");
        Ok((socket, generation))
    }

    /// Versions in use: those running desktops boot, and the one the personal overlay is
    /// bound to (kept until a reset even while the desktop is off).
    fn in_use(&self) -> Vec<ImageRef> {
        let mut v: Vec<ImageRef> = lock(&self.exports)
            .values()
            .map(|e| e.image.clone())
            .collect();
        if let Ok(Some(bound)) = personal::bound_base(&self.layout) {
            if let Some((n, ver)) = bound.split_once('@') {
                if let Ok(version) = ver.parse() {
                    v.push(ImageRef {
                        image: n.to_string(),
                        version,
                    });
                }
            }
        }
        v
    }

    /// Update at the next boot, second half (see [`crate::versions`]).
    pub fn collect_old_versions(&self) -> Result<Collected, LaptopError> {
        let in_use = self.in_use();
        if in_use.is_empty() {
            return Ok(Collected::default());
        }
        let local = self.local()?;
        crate::versions::collect_old(&local, &in_use).map_err(|e| match e {
            VersionsError::Catalog(s) => LaptopError::Sync(s),
            VersionsError::Store(s) => LaptopError::Sync(s.into()),
        })
    }

    /// Re-attaches to desktops whose QEMU outlived an earlier daemon: serves their bases
    /// again on the same sockets and watches them. Returns the desktops re-attached.
    pub fn reattach(self: &Arc<Self>) -> Vec<Desktop> {
        let mut out = Vec::new();
        // A corporate VM that ended while no daemon watched (power loss, crash) left its
        // console transcript and overlay behind.
        self.erase_corporate_run();
        for d in [Desktop::Corporate, Desktop::Personal] {
            let Ok(rd) = RunDir::existing(&self.layout.vms_dir(), d.name()) else {
                continue;
            };
            let Some(pid) = rd.launched_pid() else {
                continue;
            };
            let mut generation = 0;
            let record = std::fs::read(self.layout.base_record(d)).ok();
            if let Some(BaseDisk::Nbd { label, .. }) =
                record.and_then(|b| serde_json::from_slice::<BaseDisk>(&b).ok())
            {
                let served = label
                    .split_once('@')
                    .and_then(|(n, v)| {
                        Some(ImageRef {
                            image: n.to_string(),
                            version: v.parse().ok()?,
                        })
                    })
                    .ok_or(LaptopError::BadImage(label.clone()))
                    .and_then(|image| {
                        let local = self.local()?;
                        self.export(d, &local, &image)
                    });
                match served {
                    Ok((_, g)) => generation = g,
                    Err(e) => {
                        tracing::error!(desktop = d.name(), error = %e, "cannot serve the base of a running desktop again; its disk reads will fail")
                    }
                }
            }
            tracing::info!(desktop = d.name(), pid, "re-attached to a running desktop");
            self.watch(d, rd, None, generation);
            out.push(d);
        }
        out
    }

    /// Stops a desktop: power button, then quit after `timeout`, then kill.
    pub fn stop(&self, desktop: Desktop, timeout: Duration) -> Result<VmState, LaptopError> {
        let _busy = self.busy(desktop)?;
        let rd = RunDir::existing(&self.layout.vms_dir(), desktop.name())?;
        let state = rd.stop(timeout)?;
        if desktop == Desktop::Corporate {
            // Before answering: once stopped, no transcript or overlay is left.
            self.erase_corporate_run_locked();
        }
        Ok(state)
    }

    /// Both desktops' states (those ever started).
    pub fn status(&self) -> Result<Vec<VmState>, LaptopError> {
        Ok(tandem_vm::rundir::list(&self.layout.vms_dir())?)
    }

    /// Whether a desktop runs now.
    pub fn is_running(&self, d: Desktop) -> bool {
        personal::is_running(&self.layout, d).unwrap_or(false)
    }

    /// A recovery-point operation on a desktop (the personal one; the corporate one
    /// refuses them all).
    pub fn recovery(&self, desktop: Desktop, action: &Recovery) -> Result<Recovered, LaptopError> {
        let l = &self.layout;
        Ok(match action {
            Recovery::Snapshot { name } => {
                personal::snapshot(l, desktop, name)?;
                Recovered::Done
            }
            Recovery::List => Recovered::Snapshots(personal::snapshots(l, desktop)?),
            Recovery::Rollback { name } => {
                let _busy = self.busy(desktop)?;
                personal::rollback(l, desktop, name)?;
                Recovered::Done
            }
            Recovery::Reset => {
                let _busy = self.busy(desktop)?;
                personal::reset(l, desktop)?;
                Recovered::Done
            }
        })
    }

    /// Backs up the corporate user disk now: a point-in-time copy (the VM paused for
    /// it), then only the chunks the server lacks.
    pub fn backup(&self) -> Result<BackupDone, LaptopError> {
        let _one = lock(&self.backup_busy);
        if !self.layout.corporate_user_disk().exists() {
            return Err(LaptopError::NoUserDisk);
        }
        let run = self.layout.run_dir();
        std::fs::create_dir_all(&run).map_err(|e| DesktopError::Io {
            path: run.clone(),
            source: e,
        })?;
        let copy = run.join("user-backup.qcow2");
        let taken_at = crate::now();
        prepare::user_disk_copy(&self.layout, &copy)?;
        let result = self
            .rt
            .block_on(crate::backup::upload(&self.dir, &copy, taken_at));
        let _ = std::fs::remove_file(&copy);
        let r = result?;
        *lock(&self.last_backup) = Some(taken_at);
        Ok(BackupDone {
            backup: r.backup,
            disk_bytes: r.disk_bytes,
            data_chunks: r.data_chunks,
            uploaded_chunks: r.uploaded_chunks,
            uploaded_bytes: r.uploaded_bytes,
        })
    }

    /// When the last backup this daemon made was taken.
    pub fn last_backup(&self) -> Option<u64> {
        *lock(&self.last_backup)
    }

    /// Backs up on the policy's interval until the runtime ends. Failures are logged and
    /// retried at the next interval; the previous backup stays the latest.
    pub async fn backup_schedule(self: Arc<Self>) {
        loop {
            let mins = checkin::current_target(&self.dir)
                .ok()
                .flatten()
                .map(|t| t.policy.backup_interval_mins)
                .unwrap_or(240)
                .max(1);
            tokio::time::sleep(Duration::from_secs(u64::from(mins) * 60)).await;
            if !self.layout.corporate_user_disk().exists() {
                continue;
            }
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.backup()).await {
                Ok(Ok(r)) => tracing::info!(
                    seq = r.backup.seq,
                    uploaded_bytes = r.uploaded_bytes,
                    "scheduled backup committed"
                ),
                Ok(Err(LaptopError::Backup(BackupError::Quota(why)))) => {
                    tracing::warn!(why, "scheduled backup refused by the server's backup quota; not retried before the next interval")
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "scheduled backup failed; retrying at the next interval")
                }
                Err(e) => tracing::warn!(error = %e, "scheduled backup task failed"),
            }
        }
    }

    fn stop_in_background(&self, timeout: Duration) {
        if !self.is_running(Desktop::Corporate) {
            return;
        }
        if let Ok(rd) = RunDir::existing(&self.layout.vms_dir(), Desktop::Corporate.name()) {
            std::thread::spawn(move || {
                if let Err(e) = rd.stop(timeout) {
                    tracing::warn!(error = %e, "stopping the corporate VM for the lease failed");
                }
            });
        }
    }
}

/// A recovery-point operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", tag = "action", deny_unknown_fields)]
pub enum Recovery {
    /// Take one.
    Snapshot {
        /// Its name.
        name: String,
    },
    /// List them.
    List,
    /// Go back to one (VM off).
    Rollback {
        /// Its name.
        name: String,
    },
    /// Back to the pristine base (VM off).
    Reset,
}

/// What a recovery-point operation returned.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "value")]
pub enum Recovered {
    /// Done.
    Done,
    /// The recovery points, oldest first.
    Snapshots(Vec<tandem_desktop::disks::Snapshot>),
}

/// The check-in loop's hooks into the desktops: a kill stops the corporate VM before its
/// keys and disks go; the lease warns the user on the corporate console, then shuts the
/// VM down cleanly, then stops it; each check-in reports the desktops and the last backup.
pub struct LaptopHooks(pub Arc<Laptop>);

impl kill::CorporateVms for LaptopHooks {
    fn stop_all(&self) -> Result<(), VmError> {
        if !self.0.is_running(Desktop::Corporate) {
            return Ok(());
        }
        // Its disks are about to be erased: no need to wait for a clean shutdown.
        let rd = RunDir::existing(&self.0.layout.vms_dir(), Desktop::Corporate.name())?;
        rd.stop(Duration::from_secs(3)).map(drop)
    }
}

impl checkin::Hooks for LaptopHooks {
    fn status(&self, report: &mut tandem_proto::fleet::CheckinRequest) {
        for d in [Desktop::Corporate, Desktop::Personal] {
            let state = RunDir::existing(&self.0.layout.vms_dir(), d.name())
                .and_then(|rd| rd.state())
                .map(|s| format!("{:?}", s.phase).to_lowercase())
                .unwrap_or_else(|_| "never-started".into());
            report.vms.push(tandem_proto::fleet::VmReport {
                name: d.name().to_string(),
                state,
            });
        }
        report.last_backup = self.0.last_backup();
    }

    fn enforce_lease(&self, what: lease::Enforcement) {
        use lease::Enforcement;
        match what {
            Enforcement::Run => {}
            Enforcement::Warn { secs_left } => {
                if !self.0.is_running(Desktop::Corporate) {
                    return;
                }
                if let Ok(rd) =
                    RunDir::existing(&self.0.layout.vms_dir(), Desktop::Corporate.name())
                {
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
            Enforcement::Shutdown { .. } | Enforcement::Stop
                if !self.0.is_running(Desktop::Corporate) => {}
            Enforcement::Shutdown { grace_left } => {
                tracing::warn!(grace_left, "corporate lease expired: shutting the VM down");
                self.0
                    .stop_in_background(Duration::from_secs(grace_left.max(30)));
            }
            Enforcement::Stop => {
                tracing::warn!("corporate lease expired past its grace period: stopping the VM");
                self.0.stop_in_background(Duration::from_secs(5));
            }
        }
    }
}

/// Whether `path` is a socket someone listens on.
pub fn socket_alive(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_proto::manifest::{Manifest, DEFAULT_CHUNK_SIZE, MANIFEST_FORMAT};
    use tandem_proto::{ChunkId, SigningKey};

    fn publish(local: &tandem_sync::Local, key: &SigningKey, name: &str, version: u64) {
        let data = format!("{name}@{version} ").into_bytes().repeat(64);
        let id = ChunkId::of(&data);
        local
            .store
            .put_many(vec![(id, tandem_store::Payload::Raw(data.clone()))])
            .expect("put");
        let m = Manifest {
            format: MANIFEST_FORMAT,
            name: name.into(),
            version,
            size: data.len() as u64,
            chunk_size: DEFAULT_CHUNK_SIZE,
            chunks: vec![Some(id)],
        };
        local.catalog.save(&m, &m.sign(key)).expect("save");
    }

    fn running(laptop: &Laptop, desktop: Desktop, image: &str, version: u64) {
        lock(&laptop.exports).insert(
            desktop.name(),
            Export {
                image: ImageRef {
                    image: image.into(),
                    version,
                },
                generation: version,
                stop: None,
            },
        );
    }

    /// Issue 12, item 3: version GC keeps the version the personal overlay is bound to —
    /// with the personal desktop off, a newer personal version pulled, and the corporate
    /// desktop moved on (to another image, or to a newer version of the same one).
    #[test]
    fn version_gc_keeps_the_base_the_personal_overlay_is_bound_to() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = AgentDir::new(tmp.path());
        let key = SigningKey::generate();
        std::fs::create_dir_all(dir.keys()).expect("mkdir");
        std::fs::write(
            dir.keys().join("image-signing.pub"),
            key.public().to_base64(),
        )
        .expect("pin");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let laptop = Laptop::new(
            dir.clone(),
            LaptopConfig {
                guest_dir: tmp.path().join("guest"),
                memory_mib: 64,
                accel: Accel::Tcg,
                user_disk_mib: 16,
                vm_users: None,
            },
            rt.handle().clone(),
        );
        let local = laptop.local().expect("store");
        for (name, v) in [
            ("debian", 1),
            ("debian", 2),
            ("corp-gold", 1),
            ("corp-gold", 2),
            ("corp-gold", 3),
        ] {
            publish(&local, &key, name, v);
        }
        let layout = Layout::new(tmp.path());
        std::fs::create_dir_all(layout.desktop_dir(Desktop::Personal)).expect("mkdir");
        std::fs::write(layout.personal_overlay(), b"the user's clusters").expect("overlay");
        std::fs::write(layout.personal_binding(), "debian@1").expect("binding");

        running(&laptop, Desktop::Corporate, "corp-gold", 3);
        let c = laptop.collect_old_versions().expect("collect");
        let mut dropped: Vec<String> = c.dropped.iter().map(|r| r.to_string()).collect();
        dropped.sort();
        assert_eq!(dropped, ["corp-gold:1", "corp-gold:2"]);
        assert_eq!(local.catalog.versions("debian").expect("list"), [1, 2]);
        assert_eq!(local.catalog.versions("corp-gold").expect("list"), [3]);

        // The personal desktop on the corporate image's v3, the corporate one moved to v4:
        // v3 stays while the overlay is bound to it, and goes after a reset.
        publish(&local, &key, "corp-gold", 4);
        std::fs::write(layout.personal_binding(), "corp-gold@3").expect("binding");
        running(&laptop, Desktop::Corporate, "corp-gold", 4);
        let c = laptop.collect_old_versions().expect("collect");
        assert!(c.dropped.is_empty(), "{:?}", c.dropped);
        assert_eq!(local.catalog.versions("corp-gold").expect("list"), [3, 4]);
        personal::reset(&layout, Desktop::Personal).expect("reset");
        let c = laptop.collect_old_versions().expect("collect");
        assert_eq!(c.dropped.len(), 1, "{:?}", c.dropped);
        assert_eq!(local.catalog.versions("corp-gold").expect("list"), [4]);
    }
}
