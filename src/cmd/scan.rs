//! `tandem scan`.

use crate::output::Global;

/// Arguments of `tandem scan`.
#[derive(Debug, clap::Args)]
pub struct ScanArgs {}

/// Runs `tandem scan`.
pub fn run(_args: ScanArgs, _global: &Global) -> anyhow::Result<u8> {
    anyhow::bail!("`tandem scan` is not built yet")
}
