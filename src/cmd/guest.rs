//! `tandem guest`.

use crate::output::Global;

/// Arguments of `tandem guest`.
#[derive(Debug, clap::Args)]
pub struct GuestArgs {}

/// Runs `tandem guest`.
pub fn run(_args: GuestArgs, _global: &Global) -> anyhow::Result<u8> {
    anyhow::bail!("`tandem guest` is not built yet")
}
