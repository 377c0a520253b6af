//! `tandem demo`.

use crate::output::Global;

/// Arguments of `tandem demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {}

/// Runs `tandem demo`.
pub fn run(_args: DemoArgs, _global: &Global) -> anyhow::Result<u8> {
    anyhow::bail!("`tandem demo` is not built yet")
}
