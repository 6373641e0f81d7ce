//! `sbdnet bench linear`: one linear layer `Y[B][M] = X[B][N] W^T` on random data, as a
//! diagonal-sparse matrix, a CSR matrix, dense, or masked dense, timed call by call.
//!
//! Sparse kinds use the same number of non-zeros: that of a diagonal matrix at the given
//! sparsity (`K * min(M, N)`), so comparisons are at equal parameter count. `--train` times a
//! training step of the layer: forward, input gradient (written) and value / weight gradient
//! (accumulated; masked dense multiplies it by the mask).

use anyhow::{ensure, Context, Result};
use clap::{Args, ValueEnum};
use sbdnet_kernels::csr::{self, CsrMatrix};
use sbdnet_kernels::diag::DiagMatrix;
use sbdnet_kernels::rng::Rng;
use std::time::{Duration, Instant};

/// Layer implementations.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearKind {
    /// Diagonal-sparse (DynaDiag).
    Diag,
    /// Unstructured sparse, CSR kernels.
    Csr,
    /// Dense through `gemm`.
    Dense,
    /// Dense through `gemm` with a 0/1 mask (unstructured sparsity, dense compute).
    Masked,
}

impl LinearKind {
    fn name(self) -> &'static str {
        match self {
            LinearKind::Diag => "diag",
            LinearKind::Csr => "csr",
            LinearKind::Dense => "dense",
            LinearKind::Masked => "masked",
        }
    }
}

/// `sbdnet bench linear`.
#[derive(Args, Debug, Clone)]
pub struct BenchLinearArgs {
    /// Layer implementation.
    #[arg(long, value_enum, default_value = "diag")]
    pub kind: LinearKind,
    /// Out features M (rows of W).
    #[arg(long, default_value_t = 3072)]
    pub out_features: usize,
    /// In features N (columns of W).
    #[arg(long, default_value_t = 768)]
    pub in_features: usize,
    /// Sparsity in [0, 1) (ignored by dense).
    #[arg(long, default_value_t = 0.9)]
    pub sparsity: f64,
    /// Batch rows B.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Time forward + input gradient + weight gradient instead of forward alone.
    #[arg(long)]
    pub train: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Timed calls (default: as many as fill about 0.5 s, at least 10).
    #[arg(long)]
    pub iters: Option<usize>,
    /// Untimed calls first.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Seed of the random data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// The layer under test, with its gradient buffer.
enum Layer {
    Diag(DiagMatrix),
    Csr(CsrMatrix),
    Dense { w: Vec<f32>, mask: Option<Vec<f32>> },
}

pub fn run(a: BenchLinearArgs) -> Result<()> {
    let (m, n, b) = (a.out_features, a.in_features, a.batch);
    ensure!(m >= 1 && n >= 1, "--out-features and --in-features must be at least 1");
    ensure!(b >= 1, "--batch must be at least 1");
    ensure!(a.threads >= 1, "--threads must be at least 1");
    ensure!(a.sparsity.is_finite() && (0.0..1.0).contains(&a.sparsity), "--sparsity {} must be in [0, 1)", a.sparsity);
    ensure!(a.iters != Some(0), "--iters must be at least 1");
    ensure!(m.checked_mul(n).is_some_and(|mn| mn <= 1 << 31), "{m}x{n} is too large");
    ensure!(
        b.checked_mul(m.max(n)).is_some_and(|v| v <= 1 << 28),
        "--batch {b} with {m}x{n} needs more than 2^28 values per activation buffer; use a smaller batch"
    );

    let mut r = Rng::new(a.seed);
    let diag_nnz = DiagMatrix::active_diagonals(m, n, a.sparsity) * m.min(n);
    let layer = match a.kind {
        LinearKind::Diag => Layer::Diag(DiagMatrix::from_sparsity(m, n, a.sparsity, &mut r)?),
        LinearKind::Csr => Layer::Csr(CsrMatrix::random_with_nnz(m, n, diag_nnz, &mut r)?),
        LinearKind::Dense => Layer::Dense { w: (0..m * n).map(|_| r.normal()).collect(), mask: None },
        LinearKind::Masked => {
            let mask = CsrMatrix::random_with_nnz(m, n, diag_nnz, &mut r)?.mask();
            let mut w: Vec<f32> = (0..m * n).map(|_| r.normal()).collect();
            csr::apply_mask(&mut w, &mask);
            Layer::Dense { w, mask: Some(mask) }
        }
    };
    let nnz = match &layer {
        Layer::Diag(w) => w.nnz(),
        Layer::Csr(w) => w.nnz(),
        Layer::Dense { mask: None, .. } => m * n,
        Layer::Dense { mask: Some(k), .. } => k.iter().filter(|v| **v != 0.0).count(),
    };
    let grad_len = match &layer {
        Layer::Diag(w) => w.nnz(),
        Layer::Csr(w) => w.nnz(),
        Layer::Dense { .. } => m * n,
    };
    let x: Vec<f32> = (0..b * n).map(|_| r.normal()).collect(); // (B, N)
    let dy: Vec<f32> = (0..b * m).map(|_| r.normal() * 1e-3).collect(); // (B, M)
    let mut y = vec![0.0f32; b * m]; // (B, M)
    let mut dx = vec![0.0f32; b * n]; // (B, N)
    let mut g = vec![0.0f32; grad_len]; // values (K, D) / (nnz) / (M, N)
    let threads = a.threads;
    let train = a.train;

    let mut step = || match &layer {
        Layer::Diag(w) => {
            w.forward(&x, b, &mut y);
            if train {
                w.backward_input(&dy, b, &mut dx, false);
                w.backward_values(&x, &dy, b, &mut g);
            }
        }
        Layer::Csr(w) => {
            w.forward(&x, b, &mut y);
            if train {
                w.backward_input(&dy, b, &mut dx, false);
                w.backward_values(&x, &dy, b, &mut g);
            }
        }
        Layer::Dense { w, mask } => {
            csr::dense_forward(m, n, w, &x, b, &mut y, threads);
            if train {
                csr::dense_backward_input(m, n, w, &dy, b, &mut dx, false, threads);
                csr::dense_backward_weight(m, n, &x, &dy, b, &mut g, true, mask.as_deref(), threads);
            }
        }
    };

    for _ in 0..a.warmup {
        step();
    }
    let iters = match a.iters {
        Some(i) => i,
        None => {
            // Calls that fill about 0.5 s, from the time of a few calls.
            let t0 = Instant::now();
            let mut probe = 0u32;
            while probe < 3 || t0.elapsed() < Duration::from_millis(20) {
                step();
                probe += 1;
            }
            let per = t0.elapsed().as_secs_f64() / f64::from(probe);
            ((0.5 / per.max(1e-9)).ceil() as usize).clamp(10, 200_000)
        }
    };
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        step();
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    std::hint::black_box((&y, &dx, &g));
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let max = times.iter().copied().fold(0.0, f64::max);
    let median = crate::bench::median(&mut times);

    if a.json {
        let v = serde_json::json!({
            "kind": a.kind.name(),
            "m": m,
            "n": n,
            "batch": b,
            "sparsity": a.sparsity,
            "threads": threads,
            "train": train,
            "nnz": nnz,
            "iters": iters,
            "median_ms": median,
            "min_ms": min,
            "max_ms": max,
            "kernel_path": sbdnet_kernels::kernel_path().name(),
        });
        println!("{}", serde_json::to_string(&v).context("writing JSON")?);
    } else {
        println!(
            "{} {}x{} sparsity {} batch {} threads {} {}: median {:.4} ms (min {:.4}, max {:.4}) over {} calls, nnz {} [{}]",
            a.kind.name(),
            m,
            n,
            a.sparsity,
            b,
            threads,
            if train { "train step" } else { "forward" },
            median,
            min,
            max,
            iters,
            nnz,
            sbdnet_kernels::kernel_path().name(),
        );
    }
    Ok(())
}
