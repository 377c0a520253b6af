//! `tandem vm`.

use crate::output::Global;

/// Arguments of `tandem vm`.
#[derive(Debug, clap::Args)]
pub struct VmArgs {}

/// Runs `tandem vm`.
pub fn run(_args: VmArgs, _global: &Global) -> anyhow::Result<u8> {
    anyhow::bail!("`tandem vm` is not built yet")
}
