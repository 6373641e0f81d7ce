//! `sbdnet plot`: figures from training runs (filled by the plotting work).

use anyhow::Result;
use clap::Args;

/// `sbdnet plot`.
#[derive(Args, Debug, Clone)]
pub struct PlotArgs {}

pub fn run(_a: PlotArgs) -> Result<()> {
    anyhow::bail!("sbdnet plot is not implemented yet")
}
