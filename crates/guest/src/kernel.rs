//! Debian's stock cloud kernel: resolve the current package, fetch it with
//! `apt-get download`, unpack it, and pick the virtio modules in a load order that works.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{run_tool, GuestError};

/// The metapackage whose dependency names the current cloud kernel.
pub const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// Modules the guest needs, in the order the environment is known to accept them. Their
/// own `depends=` lists are checked too, so a kernel that grows a dependency still loads.
pub const WANTED_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
    "evdev",
    "button",
];

/// An unpacked kernel package.
#[derive(Debug)]
pub struct Kernel {
    /// Package name, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// Release string, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The compressed kernel image.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>/kernel` inside the unpacked package.
    pub modules_root: PathBuf,
}

/// Asks apt which kernel package the metapackage currently depends on.
pub fn resolve_package() -> Result<String, GuestError> {
    let out = run_tool("apt-cache", &["depends", META_PACKAGE], None)?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .map(str::to_string)
        .ok_or_else(|| GuestError::KernelNotFound {
            detail: format!("`apt-cache depends {META_PACKAGE}` names no linux-image-*-cloud-amd64; run `apt-get update` and retry"),
        })
}

/// Downloads (once) and unpacks `package` under `work`.
pub fn fetch(package: &str, work: &Path) -> Result<Kernel, GuestError> {
    let downloads = work.join("downloads");
    std::fs::create_dir_all(&downloads).map_err(|e| GuestError::io(&downloads, e))?;
    let find_deb = || -> Option<PathBuf> {
        std::fs::read_dir(&downloads)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
    };
    let deb = match find_deb() {
        Some(d) => d,
        None => {
            run_tool("apt-get", &["download", package], Some(&downloads))?;
            find_deb().ok_or_else(|| GuestError::KernelNotFound {
                detail: format!("apt-get download {package} produced no .deb"),
            })?
        }
    };
    let unpacked = work.join("kernel");
    if unpacked.exists() {
        std::fs::remove_dir_all(&unpacked).map_err(|e| GuestError::io(&unpacked, e))?;
    }
    run_tool(
        "dpkg-deb",
        &["-x", &deb.to_string_lossy(), &unpacked.to_string_lossy()],
        None,
    )?;
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(package)
        .to_string();
    let vmlinuz = unpacked.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        return Err(GuestError::KernelNotFound {
            detail: format!("{} is not in {package}", vmlinuz.display()),
        });
    }
    Ok(Kernel {
        package: package.to_string(),
        modules_root: unpacked.join("lib/modules").join(&release).join("kernel"),
        release,
        vmlinuz,
    })
}

/// Finds every `.ko` under `root`, by module name (`-` and `_` are the same to the kernel).
fn index_modules(root: &Path) -> Result<BTreeMap<String, PathBuf>, GuestError> {
    let mut found = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| GuestError::io(&dir, e))? {
            let path = entry.map_err(|e| GuestError::io(&dir, e))?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                if let Some(stem) = name.strip_suffix(".ko") {
                    found.insert(stem.replace('-', "_"), path.clone());
                }
            }
        }
    }
    Ok(found)
}

/// Reads the `depends=` entry of a module's `.modinfo` strings.
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    ko.split(|&b| b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .map(|d| {
            String::from_utf8_lossy(d)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default()
}

/// Wanted modules plus their dependencies, each after everything it depends on.
pub fn load_order(kernel: &Kernel) -> Result<Vec<(String, PathBuf)>, GuestError> {
    let index = index_modules(&kernel.modules_root)?;
    let mut order: Vec<(String, PathBuf)> = Vec::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        order: &mut Vec<(String, PathBuf)>,
        depth: usize,
    ) -> Result<(), GuestError> {
        if order.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        let path = index.get(name).ok_or_else(|| GuestError::KernelNotFound {
            detail: format!("module {name} is not in the kernel package (built in, or renamed?)"),
        })?;
        if depth > 32 {
            return Err(GuestError::KernelNotFound {
                detail: format!("module dependencies of {name} loop"),
            });
        }
        let bytes = std::fs::read(path).map_err(|e| GuestError::io(path, e))?;
        for dep in module_depends(&bytes) {
            visit(&dep, index, order, depth + 1)?;
        }
        order.push((name.to_string(), path.clone()));
        Ok(())
    }
    for want in WANTED_MODULES {
        visit(want, &index, &mut order, 0)?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_are_read_from_modinfo_strings() {
        let ko =
            b"\x7fELF junk\0license=GPL\0depends=virtio_ring,virtio,net-failover\0vermagic=6.1\0";
        assert_eq!(
            module_depends(ko),
            vec!["virtio_ring", "virtio", "net_failover"]
        );
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert!(module_depends(b"nothing").is_empty());
    }
}
