//! Unstructured sparse baselines for a linear layer `W[m][n]` (out x in): a CSR matrix with
//! SpMM kernels, and masked dense (a dense `W` with a 0/1 mask, products through [`gemm`]).
//!
//! Kernels take a batch `X[B][n]` (row-major) and compute
//! - forward `Y[B][m] = X W^T` (overwrites `Y`),
//! - input gradient `dX[B][n] (+)= dY W`,
//! - weight gradient `dW += dY^T X` restricted to the stored entries (CSR: one value per
//!   non-zero, in storage order; masked dense: the dense gradient times the mask).
//!
//! The CSR forward works on a tile of 4 batch rows at a time: each non-zero's column index and
//! value are loaded once and used for 4 independent dot products (gathering `x[b][col]`), which
//! also gives the four independent add chains the CPU needs. The value gradient uses the same
//! tile. Sums for one output run over the non-zeros of a row in storage order (forward) and over
//! batch rows in order (value gradient), as in the `reference_*` loops, so those match exactly;
//! the single-row tail of the forward splits a dot product into 4 partial sums and matches to
//! rounding only. The input gradient scatters into `dX` rows and is threaded over the batch.
//!
//! ```
//! use sbdnet_kernels::csr::CsrMatrix;
//! let w = [1.0, 0.0, 2.0, 0.0, 3.0, 0.0]; // 2x3
//! let mask = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
//! let c = CsrMatrix::from_dense_mask(2, 3, &w, &mask).unwrap();
//! assert_eq!(c.nnz(), 3);
//! let mut y = [0.0f32; 2];
//! c.forward(&[1.0, 1.0, 1.0], 1, &mut y);
//! assert_eq!(y, [3.0, 3.0]);
//! ```

use crate::dispatch::{kernel_path, KernelPath};
use crate::matmul::{sgemm, Trans};
use crate::rng::Rng;
use rayon::prelude::*;
use std::fmt;

/// Why a [`CsrMatrix`] could not be built.
#[derive(Clone, Debug, PartialEq)]
pub enum CsrError {
    /// `m` or `n` is zero.
    EmptyShape {
        /// Rows.
        m: usize,
        /// Columns.
        n: usize,
    },
    /// A dense matrix or mask does not hold `m * n` floats.
    DenseLength {
        /// `m * n`.
        expected: usize,
        /// What was given.
        got: usize,
    },
    /// More non-zeros asked for than the matrix has entries.
    TooManyNonZeros {
        /// Asked for.
        nnz: usize,
        /// `m * n`.
        max: usize,
    },
    /// Sparsity not in `[0, 1)`.
    Sparsity {
        /// What was given.
        s: f64,
    },
    /// The matrix has `2^32` columns or more (indices are `u32`).
    TooWide {
        /// Columns.
        n: usize,
    },
}

impl fmt::Display for CsrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CsrError::EmptyShape { m, n } => write!(f, "CSR matrix shape {m}x{n}: both sizes must be at least 1"),
            CsrError::DenseLength { expected, got } => {
                write!(f, "dense matrix or mask: expected {expected} floats, got {got}")
            }
            CsrError::TooManyNonZeros { nnz, max } => {
                write!(f, "{nnz} non-zeros asked for, but the matrix has only {max} entries")
            }
            CsrError::Sparsity { s } => write!(f, "sparsity {s} must be in [0, 1)"),
            CsrError::TooWide { n } => write!(f, "{n} columns: CSR column indices are 32-bit"),
        }
    }
}

impl std::error::Error for CsrError {}

/// Compressed sparse rows: row `i`'s non-zeros are `values[row_ptr[i]..row_ptr[i + 1]]` at
/// columns `col_idx[..]` (increasing within a row).
#[derive(Clone, Debug, PartialEq)]
pub struct CsrMatrix {
    m: usize,
    n: usize,
    row_ptr: Vec<usize>,
    col_idx: Vec<u32>,
    values: Vec<f32>,
}

impl CsrMatrix {
    fn check_shape(m: usize, n: usize) -> Result<(), CsrError> {
        if m == 0 || n == 0 {
            return Err(CsrError::EmptyShape { m, n });
        }
        if u32::try_from(n).is_err() {
            return Err(CsrError::TooWide { n });
        }
        Ok(())
    }

    /// The entries of dense `w[m][n]` where `mask` is non-zero (kept even when the weight is 0).
    pub fn from_dense_mask(m: usize, n: usize, w: &[f32], mask: &[f32]) -> Result<Self, CsrError> {
        Self::check_shape(m, n)?;
        for len in [w.len(), mask.len()] {
            if len != m * n {
                return Err(CsrError::DenseLength { expected: m * n, got: len });
            }
        }
        let mut row_ptr = Vec::with_capacity(m + 1);
        let (mut col_idx, mut values) = (Vec::new(), Vec::new());
        row_ptr.push(0);
        for i in 0..m {
            for j in 0..n {
                if mask[i * n + j] != 0.0 {
                    col_idx.push(j as u32);
                    values.push(w[i * n + j]);
                }
            }
            row_ptr.push(col_idx.len());
        }
        Ok(CsrMatrix { m, n, row_ptr, col_idx, values })
    }

    /// A random matrix with `round((1 - s) * m * n)` non-zeros (at least 1).
    pub fn random(m: usize, n: usize, s: f64, rng: &mut Rng) -> Result<Self, CsrError> {
        if !(0.0..1.0).contains(&s) {
            return Err(CsrError::Sparsity { s });
        }
        let nnz = (((1.0 - s) * (m * n) as f64).round() as usize).max(1);
        Self::random_with_nnz(m, n, nnz, rng)
    }

    /// A random matrix with exactly `nnz` non-zeros at uniformly chosen positions (selection
    /// sampling), values standard normal scaled by `1/sqrt(nnz / m)`. Use
    /// `DiagMatrix::nnz()` to compare with a diagonal matrix at equal parameter count.
    pub fn random_with_nnz(m: usize, n: usize, nnz: usize, rng: &mut Rng) -> Result<Self, CsrError> {
        Self::check_shape(m, n)?;
        let total = m * n;
        if nnz > total {
            return Err(CsrError::TooManyNonZeros { nnz, max: total });
        }
        let scale = 1.0 / ((nnz as f32 / m as f32).max(1.0)).sqrt();
        let mut row_ptr = Vec::with_capacity(m + 1);
        let (mut col_idx, mut values) = (Vec::with_capacity(nnz), Vec::with_capacity(nnz));
        row_ptr.push(0);
        let mut need = nnz;
        for i in 0..m {
            for j in 0..n {
                let left = total - (i * n + j);
                if need > 0 && rng.below(left) < need {
                    need -= 1;
                    col_idx.push(j as u32);
                    values.push(rng.normal() * scale);
                }
            }
            row_ptr.push(col_idx.len());
        }
        Ok(CsrMatrix { m, n, row_ptr, col_idx, values })
    }

    /// Rows `m`.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Columns `n`.
    pub fn cols(&self) -> usize {
        self.n
    }

    /// Stored entries.
    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// Row pointers, `m + 1` long.
    pub fn row_ptr(&self) -> &[usize] {
        &self.row_ptr
    }

    /// Column of each stored entry.
    pub fn col_idx(&self) -> &[u32] {
        &self.col_idx
    }

    /// Stored values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Stored values, writable (the pattern stays fixed).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// The dense `m x n` matrix, row-major.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut w = vec![0.0f32; self.m * self.n];
        for i in 0..self.m {
            for p in self.row_ptr[i]..self.row_ptr[i + 1] {
                w[i * self.n + self.col_idx[p] as usize] = self.values[p];
            }
        }
        w
    }

    /// The 0/1 mask of the pattern, `m x n` row-major.
    pub fn mask(&self) -> Vec<f32> {
        let mut w = vec![0.0f32; self.m * self.n];
        for i in 0..self.m {
            for p in self.row_ptr[i]..self.row_ptr[i + 1] {
                w[i * self.n + self.col_idx[p] as usize] = 1.0;
            }
        }
        w
    }

    /// Forward `Y[B][m] = X[B][n] W^T` (overwrites `y`), threaded over batch tiles (or over
    /// rows of `W` when the batch is below 4 rows per thread).
    ///
    /// # Panics
    /// If `x` holds fewer than `batch * n` or `y` fewer than `batch * m` floats.
    pub fn forward(&self, x: &[f32], batch: usize, y: &mut [f32]) {
        let (m, n) = (self.m, self.n);
        assert!(x.len() >= batch * n && y.len() >= batch * m, "csr forward: slices too short");
        if kernel_path() == KernelPath::Reference {
            return reference_forward(self, x, batch, y);
        }
        let (x, y) = (&x[..batch * n], &mut y[..batch * m]);
        let threads = crate::threads();
        if threads <= 1 || batch * self.nnz() < 1 << 15 {
            self.forward_rows(x, y, batch, 0, m);
        } else if batch >= 4 * threads {
            let tiles = batch.div_ceil(4);
            let per = tiles.div_ceil(threads) * 4;
            y.par_chunks_mut(per * m).zip(x.par_chunks(per * n)).for_each(|(y, x)| {
                self.forward_rows(x, y, y.len() / m, 0, m);
            });
        } else {
            // Small batch: split the rows of W, one output row of Y at a time.
            let width = m.div_ceil(threads);
            for b in 0..batch {
                let xb = &x[b * n..(b + 1) * n];
                y[b * m..(b + 1) * m].par_chunks_mut(width).enumerate().for_each(|(i, y)| {
                    self.forward_rows(xb, y, 1, i * width, i * width + y.len());
                });
            }
        }
    }

    /// Rows `lo..hi` of `W` against `rows` rows of `x`; `y` rows hold `hi - lo` outputs.
    fn forward_rows(&self, x: &[f32], y: &mut [f32], rows: usize, lo: usize, hi: usize) {
        let (n, w) = (self.n, hi - lo);
        let (ci, vals) = (&self.col_idx[..], &self.values[..]);
        let mut b = 0;
        while b + 4 <= rows {
            let xs = [&x[b * n..][..n], &x[(b + 1) * n..][..n], &x[(b + 2) * n..][..n], &x[(b + 3) * n..][..n]];
            for i in lo..hi {
                let mut acc = [0.0f32; 4];
                for p in self.row_ptr[i]..self.row_ptr[i + 1] {
                    let (c, v) = (ci[p] as usize, vals[p]);
                    for (a, xr) in acc.iter_mut().zip(&xs) {
                        *a += v * xr[c];
                    }
                }
                for (q, a) in acc.iter().enumerate() {
                    y[(b + q) * w + i - lo] = *a;
                }
            }
            b += 4;
        }
        while b < rows {
            let xr = &x[b * n..][..n];
            for i in lo..hi {
                let (s, e) = (self.row_ptr[i], self.row_ptr[i + 1]);
                let mut acc = [0.0f32; 4];
                let mut p = s;
                while p + 4 <= e {
                    for (q, a) in acc.iter_mut().enumerate() {
                        *a += vals[p + q] * xr[ci[p + q] as usize];
                    }
                    p += 4;
                }
                let mut t = (acc[0] + acc[1]) + (acc[2] + acc[3]);
                for p in p..e {
                    t += vals[p] * xr[ci[p] as usize];
                }
                y[b * w + i - lo] = t;
            }
            b += 1;
        }
    }

    /// Input gradient `dX[B][n] (+)= dY[B][m] W` (scatter), threaded over the batch.
    ///
    /// # Panics
    /// If `dy` holds fewer than `batch * m` or `dx` fewer than `batch * n` floats.
    pub fn backward_input(&self, dy: &[f32], batch: usize, dx: &mut [f32], add: bool) {
        let (m, n) = (self.m, self.n);
        assert!(dy.len() >= batch * m && dx.len() >= batch * n, "csr backward_input: slices too short");
        if kernel_path() == KernelPath::Reference {
            return reference_backward_input(self, dy, batch, dx, add);
        }
        let one = |dy: &[f32], dx: &mut [f32]| {
            if !add {
                dx.fill(0.0);
            }
            for (i, &g) in dy[..m].iter().enumerate() {
                let (s, e) = (self.row_ptr[i], self.row_ptr[i + 1]);
                for (&c, &v) in self.col_idx[s..e].iter().zip(&self.values[s..e]) {
                    dx[c as usize] += v * g;
                }
            }
        };
        let dx = &mut dx[..batch * n];
        if crate::threads() <= 1 || batch * self.nnz() < 1 << 15 {
            dx.chunks_exact_mut(n).zip(dy.chunks_exact(m)).for_each(|(dx, dy)| one(dy, dx));
        } else {
            dx.par_chunks_exact_mut(n).zip(dy.par_chunks_exact(m)).for_each(|(dx, dy)| one(dy, dx));
        }
    }

    /// Value gradient `dv[p] += sum_b dY[b][i] * X[b][col_p]` for every stored entry `p` (row
    /// `i`), over `b` in order; `dv` has the layout of [`Self::values`]. Threaded over rows.
    ///
    /// # Panics
    /// If a slice is shorter than its shape says.
    pub fn backward_values(&self, x: &[f32], dy: &[f32], batch: usize, dv: &mut [f32]) {
        let (m, n) = (self.m, self.n);
        assert!(x.len() >= batch * n && dy.len() >= batch * m, "csr backward_values: slices too short");
        assert!(dv.len() >= self.nnz(), "csr backward_values: dv too short");
        if kernel_path() == KernelPath::Reference {
            return reference_backward_values(self, x, dy, batch, dv);
        }
        let threads = crate::threads();
        if threads <= 1 || batch * self.nnz() < 1 << 15 {
            return self.values_grad_rows(x, dy, batch, 0, m, &mut dv[..self.nnz()]);
        }
        // Row ranges with about equal non-zeros; each owns a contiguous run of dv.
        let mut bounds = vec![0usize];
        for t in 1..threads {
            let target = self.nnz() * t / threads;
            let i = self.row_ptr.partition_point(|&p| p < target).min(m);
            bounds.push(i.max(*bounds.last().unwrap_or(&0)));
        }
        bounds.push(m);
        let mut rest = &mut dv[..self.nnz()];
        let mut jobs = Vec::with_capacity(threads);
        for w in bounds.windows(2) {
            let len = self.row_ptr[w[1]] - self.row_ptr[w[0]];
            let (part, tail) = rest.split_at_mut(len);
            rest = tail;
            jobs.push((w[0], w[1], part));
        }
        jobs.into_par_iter().for_each(|(lo, hi, part)| self.values_grad_rows(x, dy, batch, lo, hi, part));
    }

    /// Value gradient of rows `lo..hi`; `dv` holds exactly their entries.
    fn values_grad_rows(&self, x: &[f32], dy: &[f32], batch: usize, lo: usize, hi: usize, dv: &mut [f32]) {
        let (m, n) = (self.m, self.n);
        let base = self.row_ptr[lo];
        let mut b = 0;
        while b < batch {
            let t = (batch - b).min(4);
            for i in lo..hi {
                let (s, e) = (self.row_ptr[i], self.row_ptr[i + 1]);
                let (ci, dv) = (&self.col_idx[s..e], &mut dv[s - base..e - base]);
                if t == 4 {
                    let g = [dy[b * m + i], dy[(b + 1) * m + i], dy[(b + 2) * m + i], dy[(b + 3) * m + i]];
                    let xs = [&x[b * n..][..n], &x[(b + 1) * n..][..n], &x[(b + 2) * n..][..n], &x[(b + 3) * n..][..n]];
                    for (d, &c) in dv.iter_mut().zip(ci) {
                        let c = c as usize;
                        let mut v = *d;
                        v += g[0] * xs[0][c];
                        v += g[1] * xs[1][c];
                        v += g[2] * xs[2][c];
                        v += g[3] * xs[3][c];
                        *d = v;
                    }
                } else {
                    for q in b..b + t {
                        let g = dy[q * m + i];
                        let xr = &x[q * n..][..n];
                        for (d, &c) in dv.iter_mut().zip(ci) {
                            *d += g * xr[c as usize];
                        }
                    }
                }
            }
            b += t;
        }
    }
}

/// Reference CSR forward: `y[b][i] = sum_p values[p] * x[b][col_p]` over row `i`'s entries.
pub fn reference_forward(w: &CsrMatrix, x: &[f32], batch: usize, y: &mut [f32]) {
    for b in 0..batch {
        for i in 0..w.m {
            let mut s = 0.0f32;
            for p in w.row_ptr[i]..w.row_ptr[i + 1] {
                s += w.values[p] * x[b * w.n + w.col_idx[p] as usize];
            }
            y[b * w.m + i] = s;
        }
    }
}

/// Reference CSR input gradient: `dx[b][col_p] (+)= sum values[p] * dy[b][i]`.
pub fn reference_backward_input(w: &CsrMatrix, dy: &[f32], batch: usize, dx: &mut [f32], add: bool) {
    if !add {
        dx[..batch * w.n].fill(0.0);
    }
    for b in 0..batch {
        for i in 0..w.m {
            for p in w.row_ptr[i]..w.row_ptr[i + 1] {
                dx[b * w.n + w.col_idx[p] as usize] += w.values[p] * dy[b * w.m + i];
            }
        }
    }
}

/// Reference CSR value gradient: `dv[p] += sum_b dy[b][i] * x[b][col_p]`, `b` in order.
pub fn reference_backward_values(w: &CsrMatrix, x: &[f32], dy: &[f32], batch: usize, dv: &mut [f32]) {
    for b in 0..batch {
        for i in 0..w.m {
            for p in w.row_ptr[i]..w.row_ptr[i + 1] {
                dv[p] += dy[b * w.m + i] * x[b * w.n + w.col_idx[p] as usize];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Masked dense: W[m][n] stored dense with zeros outside the mask; products through `gemm`.

/// `w[i] *= mask[i]` (zero the entries outside a 0/1 mask).
pub fn apply_mask(w: &mut [f32], mask: &[f32]) {
    assert_eq!(w.len(), mask.len(), "apply_mask: lengths differ");
    crate::dispatch::with_simd(|| {
        for (w, &k) in w.iter_mut().zip(mask) {
            *w *= k;
        }
    })
}

/// Dense forward `Y[B][m] = X[B][n] W^T` through `gemm` (`W[m][n]`, already masked for
/// masked dense), `threads` as for [`sgemm`].
pub fn dense_forward(m: usize, n: usize, w: &[f32], x: &[f32], batch: usize, y: &mut [f32], threads: usize) {
    sgemm(batch, m, n, x, Trans::No, w, Trans::Yes, y, false, threads);
}

/// Dense input gradient `dX[B][n] (+)= dY[B][m] W`.
#[allow(clippy::too_many_arguments)]
pub fn dense_backward_input(
    m: usize,
    n: usize,
    w: &[f32],
    dy: &[f32],
    batch: usize,
    dx: &mut [f32],
    add: bool,
    threads: usize,
) {
    sgemm(batch, n, m, dy, Trans::No, w, Trans::No, dx, add, threads);
}

/// Dense weight gradient `dW[m][n] (+)= dY^T X`; with `mask`, the result is multiplied by it
/// afterwards (masked dense: entries outside the pattern get no gradient). With
/// `accumulate` and a mask, the masked-out entries of `dw` are zeroed too.
#[allow(clippy::too_many_arguments)]
pub fn dense_backward_weight(
    m: usize,
    n: usize,
    x: &[f32],
    dy: &[f32],
    batch: usize,
    dw: &mut [f32],
    accumulate: bool,
    mask: Option<&[f32]>,
    threads: usize,
) {
    sgemm(m, n, batch, dy, Trans::Yes, x, Trans::No, dw, accumulate, threads);
    if let Some(mask) = mask {
        apply_mask(&mut dw[..m * n], mask);
    }
}
