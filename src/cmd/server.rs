//! `tandem server`.

use crate::output::Global;

/// Arguments of `tandem server`.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {}

/// Runs `tandem server`.
pub fn run(_args: ServerArgs, _global: &Global) -> anyhow::Result<u8> {
    anyhow::bail!("`tandem server` is not built yet")
}
