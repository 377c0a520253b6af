//! Limits for the processes that parse untrusted disks.
//!
//! Scanning and publishing read hostile images in child processes (the `tandem` binary's
//! hidden worker verbs). A worker calls [`die_with_parent`] first, then [`limit_self`],
//! before it opens anything: if its parent is killed (even with SIGKILL) the kernel kills
//! the worker too, and a parser that loops or allocates without bound meets the CPU-time
//! and data-segment limits instead of the host's.

/// Sets this process's limits: data segment (heap and anonymous maps) to `memory_mib`,
/// CPU time to `cpu_secs` (SIGXCPU, then SIGKILL 5 s later), no core dumps.
pub fn limit_self(memory_mib: u64, cpu_secs: u64) -> std::io::Result<()> {
    use nix::sys::resource::{setrlimit, Resource};
    let to_io = |e: nix::Error| std::io::Error::from_raw_os_error(e as i32);
    let mem = memory_mib.saturating_mul(1 << 20);
    setrlimit(Resource::RLIMIT_DATA, mem, mem).map_err(to_io)?;
    setrlimit(Resource::RLIMIT_CPU, cpu_secs, cpu_secs.saturating_add(5)).map_err(to_io)?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(to_io)?;
    Ok(())
}

/// Asks the kernel to SIGKILL this process when its parent dies, then checks that the
/// parent (`parent`, as the parent itself reported its pid) is still the one: if it died
/// before the request took effect, this process was re-parented and must stop now.
pub fn die_with_parent(parent: u32) -> std::io::Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
    let now = nix::unistd::getppid().as_raw();
    if now != parent as i32 {
        return Err(std::io::Error::other(format!(
            "parent process {parent} is gone (now {now}); stopping"
        )));
    }
    Ok(())
}
