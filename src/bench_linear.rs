//! `sbdnet bench linear`: one linear layer, diagonal-sparse vs CSR vs dense vs masked dense.
//! (Filled by the DynaDiag kernels work.)

use anyhow::Result;
use clap::Args;

/// `sbdnet bench linear`.
#[derive(Args, Debug, Clone)]
pub struct BenchLinearArgs {
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

pub fn run(_a: BenchLinearArgs) -> Result<()> {
    anyhow::bail!("sbdnet bench linear is not implemented yet")
}
