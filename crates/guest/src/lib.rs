//! Builds the reproducible guest that Tandem's tests and demo boot: Debian's stock cloud
//! kernel, an initramfs of `busybox-static` plus the virtio modules, and ext4 root disks
//! (`gold-v1`, `gold-v2`, `personal`) made with `mkfs.ext4 -d`.
//!
//! Outputs are cached by content: `guest.json` in the output directory records a key
//! computed from every input (kernel package name, busybox binary, init scripts, image
//! recipes, this recipe's version). A build whose key matches does nothing.
//!
//! Boot protocol of the guest, which tests and the demo rely on (serial console lines):
//! - `tandem-release: <text of /etc/tandem-release>` once the root disk runs;
//! - `tandem-user-disk: mounted` when a second disk (`/dev/vdb`, ext4) was mounted at
//!   `/home/user`;
//! - the output of `/etc/tandem/boot.sh` and of `tandem.run=<base64 script>` given on the
//!   kernel command line;
//! - `tandem-boot: ready`, then a shell on the console; the ACPI power button (QMP
//!   `system_powerdown`) syncs, unmounts and powers off; `tandem.poweroff=1` powers off
//!   right after boot.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod cpio;
pub mod kernel;
pub mod rootfs;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use rootfs::RootImageSpec;

/// Bump when the recipe changes in a way the key does not see.
const RECIPE_VERSION: u32 = 1;

/// Guest init for the initramfs.
pub const INITRD_INIT: &str = include_str!("assets/initrd-init.sh");

/// The kernel command line that boots the guest from `/dev/vda` on the serial console.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet panic=-1";

/// Where `busybox-static` installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Building the guest failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Which path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A host tool is not installed.
    #[error("`{tool}` is not installed; run scripts/setup.sh (or `apt-get install -y {package}`)")]
    MissingTool {
        /// The program.
        tool: String,
        /// The Debian package that provides it.
        package: String,
    },
    /// A host tool ran and failed.
    #[error("`{tool}` failed ({status}): {stderr}")]
    ToolFailed {
        /// The program.
        tool: String,
        /// Exit status.
        status: String,
        /// Its error output (last lines).
        stderr: String,
    },
    /// The kernel package or one of its modules could not be found.
    #[error("kernel: {detail}")]
    KernelNotFound {
        /// What was missing.
        detail: String,
    },
    /// `/bin/busybox` is the dynamically linked one.
    #[error("{0} is not statically linked; install busybox-static (`apt-get install -y busybox-static`)")]
    BusyboxNotStatic(PathBuf),
}

impl GuestError {
    fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        GuestError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

fn package_of(tool: &str) -> &'static str {
    match tool {
        "mkfs.ext4" => "e2fsprogs",
        "apt-get" | "apt-cache" => "apt",
        "dpkg-deb" => "dpkg",
        _ => "findutils coreutils",
    }
}

pub(crate) fn run_command(
    tool: &str,
    mut cmd: std::process::Command,
) -> Result<String, GuestError> {
    tracing::debug!(tool, "running host tool");
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            GuestError::MissingTool {
                tool: tool.to_string(),
                package: package_of(tool).to_string(),
            }
        } else {
            GuestError::io(tool, e)
        }
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(GuestError::ToolFailed {
            tool: tool.to_string(),
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn run_tool(
    tool: &str,
    args: &[&str],
    cwd: Option<&Path>,
) -> Result<String, GuestError> {
    let mut cmd = std::process::Command::new(tool);
    cmd.args(args);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    run_command(tool, cmd)
}

/// What a build produced, as recorded in `guest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestAssets {
    /// Cache key of the inputs.
    pub key: String,
    /// Kernel package used.
    pub kernel_package: String,
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// Root disks by name (`gold-v1`, `gold-v2`, `personal`).
    pub images: Vec<(String, PathBuf)>,
}

impl GuestAssets {
    /// Path of the root disk called `name`.
    pub fn image(&self, name: &str) -> Option<&Path> {
        self.images
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.as_path())
    }
}

/// The standard root disks: two versions of the corporate gold image that differ the way
/// an update does (a few files changed, added, removed) and a personal base image.
pub fn standard_images() -> Vec<(String, RootImageSpec)> {
    let apps = |changed: &[u64], removed: &[u64], added: &[u64]| -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = (1..=192u64)
            .filter(|i| !removed.contains(i))
            .map(|i| {
                let seed = if changed.contains(&i) { 10_000 + i } else { i };
                (format!("usr/share/tandem/apps/app-{i:03}.dat"), seed)
            })
            .collect();
        v.extend(
            added
                .iter()
                .map(|i| (format!("usr/share/tandem/apps/app-{i:03}.dat"), *i)),
        );
        v
    };
    let corporate_boot = "#!/bin/sh\n\
        echo \"tandem-desktop: corporate $(cat /etc/tandem-release)\"\n\
        if [ -f /home/user/notes.txt ]; then echo \"tandem-user-file: $(cat /home/user/notes.txt)\"; fi\n"
        .to_string();
    let personal_boot = "#!/bin/sh\n\
        echo \"tandem-desktop: personal $(cat /etc/tandem-release)\"\n\
        if [ -f /root/state.txt ]; then echo \"tandem-personal-state: $(cat /root/state.txt)\"; else echo \"tandem-personal-state: pristine\"; fi\n"
        .to_string();
    vec![
        (
            "gold-v1".into(),
            RootImageSpec {
                release: "tandem-gold 1".into(),
                boot_script: Some(corporate_boot.clone()),
                size_mib: 64,
                payload: apps(&[], &[], &[]),
            },
        ),
        (
            "gold-v2".into(),
            RootImageSpec {
                release: "tandem-gold 2".into(),
                boot_script: Some(corporate_boot),
                size_mib: 64,
                payload: apps(&[17, 64, 101], &[150], &[193, 194]),
            },
        ),
        (
            "personal".into(),
            RootImageSpec {
                release: "tandem-personal 1".into(),
                boot_script: Some(personal_boot),
                size_mib: 64,
                payload: (1..=64u64)
                    .map(|i| (format!("usr/share/personal/file-{i:03}.dat"), 50_000 + i))
                    .collect(),
            },
        ),
    ]
}

/// Checks that `path` is a statically linked executable (no ELF interpreter).
fn check_static(path: &Path) -> Result<Vec<u8>, GuestError> {
    let bytes = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            GuestError::MissingTool {
                tool: path.display().to_string(),
                package: "busybox-static".into(),
            }
        } else {
            GuestError::io(path, e)
        }
    })?;
    let has_interp = bytes.windows(14).take(4096).any(|w| w == b"/lib64/ld-linu");
    if has_interp {
        return Err(GuestError::BusyboxNotStatic(path.to_path_buf()));
    }
    Ok(bytes)
}

/// Writes the initramfs: busybox, the stage-1 init, `/dev/console` and the modules.
pub fn build_initrd(
    busybox: &[u8],
    modules: &[(String, PathBuf)],
    out: &Path,
) -> Result<(), GuestError> {
    use cpio::Mode;
    let io = |e| GuestError::io(out, e);
    let mut tmp = tandem_tools::atomic::TempFile::beside(out, tandem_tools::atomic::DEFAULT_MODE)
        .map_err(io)?;
    let mut w = cpio::CpioWriter::new(std::io::BufWriter::new(tmp.file()));
    for d in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        w.entry(d, Mode::Dir(0o755), &[]).map_err(io)?;
    }
    w.entry("dev/console", Mode::CharDev(5, 1), &[])
        .map_err(io)?;
    w.entry("bin/busybox", Mode::File(0o755), busybox)
        .map_err(io)?;
    w.entry("bin/sh", Mode::Symlink, b"busybox").map_err(io)?;
    w.entry("init", Mode::File(0o755), INITRD_INIT.as_bytes())
        .map_err(io)?;
    let mut order = String::new();
    for (name, path) in modules {
        let data = std::fs::read(path).map_err(|e| GuestError::io(path, e))?;
        w.entry(&format!("lib/modules/{name}.ko"), Mode::File(0o644), &data)
            .map_err(io)?;
        order.push_str(name);
        order.push('\n');
    }
    w.entry(
        "lib/modules/load-order",
        Mode::File(0o644),
        order.as_bytes(),
    )
    .map_err(io)?;
    w.finish().map_err(io)?;
    tmp.persist().map_err(io)
}

/// Builds (or finds in the cache) the guest in `out`. `progress` hears each step.
pub fn build(out: &Path, progress: &mut dyn FnMut(&str)) -> Result<GuestAssets, GuestError> {
    std::fs::create_dir_all(out).map_err(|e| GuestError::io(out, e))?;
    let busybox = check_static(Path::new(BUSYBOX))?;
    progress("resolving Debian's current cloud kernel");
    let package = kernel::resolve_package()?;
    let images = standard_images();
    let key = {
        let mut h = blake3::Hasher::new();
        h.update(&RECIPE_VERSION.to_le_bytes());
        h.update(package.as_bytes());
        h.update(blake3::hash(&busybox).as_bytes());
        h.update(INITRD_INIT.as_bytes());
        h.update(rootfs::ROOT_INIT.as_bytes());
        h.update(format!("{:?}", kernel::WANTED_MODULES).as_bytes());
        h.update(format!("{images:?}").as_bytes());
        h.finalize().to_hex()[..32].to_string()
    };
    let stamp = out.join("guest.json");
    if let Ok(text) = std::fs::read_to_string(&stamp) {
        if let Ok(cached) = serde_json::from_str::<GuestAssets>(&text) {
            let complete = cached.kernel.is_file()
                && cached.initrd.is_file()
                && cached.images.iter().all(|(_, p)| p.is_file());
            if cached.key == key && complete {
                progress("guest is up to date (cached)");
                return Ok(cached);
            }
        }
    }
    let work = out.join("work");
    std::fs::create_dir_all(&work).map_err(|e| GuestError::io(&work, e))?;
    progress(&format!("fetching {package} with apt-get download"));
    let k = kernel::fetch(&package, &work)?;
    let kernel_out = out.join("vmlinuz");
    std::fs::copy(&k.vmlinuz, &kernel_out).map_err(|e| GuestError::io(&kernel_out, e))?;
    progress("building the initramfs (busybox + virtio modules)");
    let modules = kernel::load_order(&k)?;
    let initrd = out.join("initrd.img");
    build_initrd(&busybox, &modules, &initrd)?;
    let mut built = Vec::new();
    for (name, spec) in &images {
        progress(&format!("building root disk {name} ({})", spec.release));
        let path = out.join(format!("{name}.ext4"));
        rootfs::build_root_image(spec, Path::new(BUSYBOX), &work, &path)?;
        built.push((name.clone(), path));
    }
    let _ = std::fs::remove_dir_all(work.join("kernel"));
    let assets = GuestAssets {
        key,
        kernel_package: package,
        kernel: kernel_out,
        initrd,
        images: built,
    };
    let json = serde_json::to_string_pretty(&assets).expect("plain data serializes");
    std::fs::write(&stamp, json).map_err(|e| GuestError::io(&stamp, e))?;
    Ok(assets)
}

/// Builds one extra root disk from `spec` (for tests that need their own boot script).
pub fn build_root_image(spec: &RootImageSpec, out: &Path) -> Result<PathBuf, GuestError> {
    let work = tempfile_dir(out)?;
    let result = rootfs::build_root_image(spec, Path::new(BUSYBOX), &work, out);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn tempfile_dir(near: &Path) -> Result<PathBuf, GuestError> {
    let parent = near.parent().unwrap_or(Path::new("."));
    let dir = parent.join(format!(".tandem-stage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| GuestError::io(&dir, e))?;
    Ok(dir)
}
