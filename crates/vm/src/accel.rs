//! Choosing the accelerator: KVM only where it can run a Linux guest, TCG otherwise.
//!
//! Some machines expose a `/dev/kvm` backed by a software hypervisor without `vmx`/`svm`;
//! a Linux guest does not boot on it in minutes, while TCG boots one in seconds. So `auto`
//! requires both the CPU flag and an openable `/dev/kvm`.

use serde::{Deserialize, Serialize};

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when the CPU advertises hardware virtualization and `/dev/kvm` opens; else TCG.
    #[default]
    Auto,
    /// Hardware virtualization; fails to start when KVM is unusable.
    Kvm,
    /// Software emulation; always available.
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!(
                "unknown accelerator `{other}`; use auto, kvm or tcg"
            )),
        }
    }
}

/// The accelerator QEMU will actually use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResolvedAccel {
    /// `-accel kvm`.
    Kvm,
    /// `-accel tcg`.
    Tcg,
}

impl ResolvedAccel {
    /// The name QEMU uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ResolvedAccel::Kvm => "kvm",
            ResolvedAccel::Tcg => "tcg",
        }
    }
}

/// Whether `cpuinfo` text advertises Intel VT-x or AMD-V.
pub fn cpu_has_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Resolves `auto` by looking at this machine.
pub fn resolve(requested: Accel) -> ResolvedAccel {
    match requested {
        Accel::Kvm => ResolvedAccel::Kvm,
        Accel::Tcg => ResolvedAccel::Tcg,
        Accel::Auto => {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let kvm_opens = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok();
            if cpu_has_virtualization(&cpuinfo) && kvm_opens {
                ResolvedAccel::Kvm
            } else {
                ResolvedAccel::Tcg
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_line_decides() {
        assert!(cpu_has_virtualization("flags\t: fpu vme vmx sse\n"));
        assert!(cpu_has_virtualization("flags\t: fpu svm\n"));
        assert!(!cpu_has_virtualization("flags\t: fpu vme sse hypervisor\n"));
        assert!(!cpu_has_virtualization("model name: vmx inside a name\n"));
    }

    #[test]
    fn explicit_choice_wins() {
        assert_eq!(resolve(Accel::Tcg), ResolvedAccel::Tcg);
        assert_eq!(resolve(Accel::Kvm), ResolvedAccel::Kvm);
    }

    #[test]
    fn auto_picks_tcg_without_cpu_flag() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if !cpu_has_virtualization(&cpuinfo) {
            assert_eq!(resolve(Accel::Auto), ResolvedAccel::Tcg);
        }
    }
}
