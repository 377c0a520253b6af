//! `tandem agent`.

use crate::output::Global;

/// Arguments of `tandem agent`.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {}

/// Runs `tandem agent`.
pub fn run(_args: AgentArgs, _global: &Global) -> anyhow::Result<u8> {
    anyhow::bail!("`tandem agent` is not built yet")
}
