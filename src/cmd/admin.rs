//! `tandem admin`.

use crate::output::Global;

/// Arguments of `tandem admin`.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {}

/// Runs `tandem admin`.
pub fn run(_args: AdminArgs, _global: &Global) -> anyhow::Result<u8> {
    anyhow::bail!("`tandem admin` is not built yet")
}
