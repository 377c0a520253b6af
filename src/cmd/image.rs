//! `tandem image`.

use crate::output::Global;

/// Arguments of `tandem image`.
#[derive(Debug, clap::Args)]
pub struct ImageArgs {}

/// Runs `tandem image`.
pub fn run(_args: ImageArgs, _global: &Global) -> anyhow::Result<u8> {
    anyhow::bail!("`tandem image` is not built yet")
}
