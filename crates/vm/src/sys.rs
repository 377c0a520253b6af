//! The one place this crate needs `unsafe`: asking the kernel to kill QEMU when the
//! process that started it dies.
//!
//! JUSTIFICATION: `prctl(PR_SET_PDEATHSIG)` must run in the child between `fork` and
//! `exec`, which std only offers through the unsafe `CommandExt::pre_exec`. Without it a
//! supervisor killed with SIGKILL would leave QEMU running with the user's disks open.
#![allow(unsafe_code)]

use std::os::unix::process::CommandExt as _;
use std::process::Command;

/// Makes the spawned program receive SIGKILL when the spawning *thread* exits. Spawn
/// from a thread that lives as long as the child (the one that waits for it).
pub fn kill_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as i32;
    // SAFETY: the closure runs in the forked child before exec. It calls only
    // async-signal-safe system calls (prctl, getppid, _exit) and touches no memory shared
    // with the parent: `parent` is a copied integer. If the parent already died before
    // prctl took effect, getppid differs and the child exits instead of running orphaned.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)?;
            if nix::unistd::getppid().as_raw() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}
