//! `tandem store`.

use crate::output::Global;

/// Arguments of `tandem store`.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {}

/// Runs `tandem store`.
pub fn run(_args: StoreArgs, _global: &Global) -> anyhow::Result<u8> {
    anyhow::bail!("`tandem store` is not built yet")
}
