//! Diagonal-sparse matrices (DynaDiag, SPEC.md section 2.1) and their kernels.
//!
//! A weight `W` of shape `m x n` (out x in) keeps `K` of its `P = max(m, n)` cyclic diagonals,
//! each `D = min(m, n)` long:
//!
//! ```text
//! tall (m >= n): diagonal with offset o holds W[(j + o) mod m][j]   for j in 0..n
//! wide (m <  n): diagonal with offset o holds W[j][(j + o) mod n]   for j in 0..m
//! ```
//!
//! Storage is `values: V[K][D]` (row `k` is diagonal `k`, indexed by `j`) and `offsets: off[K]`
//! (distinct, in `0..P`). `K = ceil((1 - s) * m * n / D)` for sparsity `s`, so `nnz = K * D`.
//!
//! Kernels, for a batch `X[B][n]` (row-major), each `O(B * K * D)`:
//! - [`DiagMatrix::forward`]: `Y[B][m] = X W^T` (overwrites `Y`);
//! - [`DiagMatrix::backward_input`]: `dX[B][n] (+)= dY W`;
//! - [`DiagMatrix::backward_values`]: `dV[K][D] += dW` restricted to the stored entries.
//!
//! # Why this layout is the fast one
//! For a fixed diagonal `k` the products `V[k][j] * x[b][j]` (tall case) run over `j` in
//! order, contiguous in *both* `V[k]` and the row `x[b]`, and land in `y[b]` at
//! `(j + off_k) mod m`: one contiguous run that the wrap splits into at most two pieces. In
//! the wide case the roles swap (`y[b][j]` contiguous, `x[b]` read at `(j + off_k) mod n`, again
//! at most two contiguous pieces). So every `(b, k)` pair is one or two unit-stride
//! multiply-add runs: no index arrays (unlike CSR, which loads a column index per non-zero and
//! gathers), full 8-lane AVX2 loads, and the index arithmetic is per diagonal piece, not per
//! element. The input gradient is the same shifted product with `x`/`y` exchanged (the
//! transpose of a diagonal matrix is diagonal), and the value gradient is the shifted
//! element-wise product of `dy` and `x`, summed over the batch.
//!
//! Two kernel shapes use this:
//! - *blocked* (two or more batch rows): outputs in blocks of 16 stay in registers for a tile
//!   of up to 6 batch rows while every diagonal touching the block is added; a plan built once
//!   per matrix lists, per block, the diagonals in storage order with where they read `V` and
//!   the source row. One 16-wide load of `V[k]` serves all rows of the tile, so a
//!   multiply-add costs about one load and no store. The value gradient keeps 4 diagonals x 16
//!   entries of `dV` in registers while it runs over the batch rows (in L2-sized tiles).
//! - *batch in lanes* (AVX-512, whole groups of 16 rows): the same plan with the 16 rows of a
//!   pass in the lanes of one register. The source is transposed once per pass, so each
//!   multiply-add is one broadcast value and one aligned load of 16 rows' source element (the
//!   row-major tile's source loads shift by each diagonal's offset and mostly straddle two
//!   cache lines); 16 outputs x 16 rows stay in registers and are transposed back at the end
//!   of the block. Bit-identical to the row-major AVX-512 tile, which keeps the rows past the
//!   last whole group. The transposed source takes 64 bytes per element (48 KB for 768
//!   inputs, 192 KB for 3072: the L1 is 48 KB), so each block's diagonals run in *phases*
//!   (consecutive runs of the block's plan entries, about 24 KB of source each): every block
//!   runs phase 1, parking its partial sums, before any runs phase 2. With offsets in
//!   ascending order a phase reads a window of the source that slides slowly from block to
//!   block and stays in L1; the per-element order of the terms is unchanged.
//! - *streaming* (a single row, or output ranges when there are fewer rows than threads):
//!   `out[i] += a[i] * b[i]` over each whole piece.
//!
//! # Exactness and threads
//! Every kernel adds, for each output element, the same terms in the same order as the
//! `reference_*` loops (diagonals in storage order; batch rows in order for `dV`). The
//! portable and streaming kernels multiply, then add, so they are bit-identical to the
//! reference; the AVX2 blocked kernels use FMA (see `FUSED` in the source) and agree to
//! rounding (tests use a relative tolerance of 1e-5 of the sum of absolute terms). Results are
//! deterministic for a given kernel path, batch and thread count. Forward and input gradient
//! are threaded over batch rows, or over output ranges when the batch is smaller than the pool;
//! the value gradient is threaded over diagonals (each thread owns whole rows of `dV`), or over
//! ranges of `j` when there are fewer diagonals than threads, so it needs no scratch buffers and
//! no reduction.
//!
//! ```
//! use sbdnet_kernels::diag::DiagMatrix;
//! // 3x2 (tall): diagonal 0 = W[0][0], W[1][1]; diagonal 2 = W[2][0], W[0][1].
//! let w = DiagMatrix::new(3, 2, vec![0, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
//! assert_eq!(w.to_dense(), vec![1.0, 4.0, 0.0, 2.0, 3.0, 0.0]);
//! let mut y = [0.0f32; 3];
//! w.forward(&[1.0, 10.0], 1, &mut y);
//! assert_eq!(y, [41.0, 20.0, 3.0]);
//! ```

use crate::dispatch::{kernel_path, KernelPath};
use crate::rng::Rng;
use rayon::prelude::*;
use std::fmt;
use std::sync::OnceLock;

/// Why a [`DiagMatrix`] could not be built.
#[derive(Clone, Debug, PartialEq)]
pub enum DiagError {
    /// `m` or `n` is zero.
    EmptyShape {
        /// Rows (out features).
        m: usize,
        /// Columns (in features).
        n: usize,
    },
    /// The number of diagonals is not in `1..=P`.
    DiagonalCount {
        /// Diagonals given.
        k: usize,
        /// Candidate diagonals `max(m, n)`.
        p: usize,
    },
    /// An offset is not below `P = max(m, n)`.
    OffsetOutOfRange {
        /// The offending offset.
        offset: usize,
        /// Candidate diagonals `max(m, n)`.
        p: usize,
    },
    /// The same offset appears twice.
    DuplicateOffset {
        /// The repeated offset.
        offset: usize,
    },
    /// `values.len()` is not `K * D`.
    ValuesLength {
        /// `K * D`.
        expected: usize,
        /// What was given.
        got: usize,
    },
    /// Sparsity not in `[0, 1)`.
    Sparsity {
        /// What was given.
        s: f64,
    },
}

impl fmt::Display for DiagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiagError::EmptyShape { m, n } => write!(f, "diagonal matrix shape {m}x{n}: both sizes must be at least 1"),
            DiagError::DiagonalCount { k, p } => write!(f, "{k} diagonals given; need between 1 and {p} (max(m, n))"),
            DiagError::OffsetOutOfRange { offset, p } => {
                write!(f, "diagonal offset {offset} out of range: offsets must be below {p} (max(m, n))")
            }
            DiagError::DuplicateOffset { offset } => write!(f, "diagonal offset {offset} given twice"),
            DiagError::ValuesLength { expected, got } => {
                write!(f, "diagonal values: expected K*D = {expected} floats, got {got}")
            }
            DiagError::Sparsity { s } => write!(f, "sparsity {s} must be in [0, 1)"),
        }
    }
}

impl std::error::Error for DiagError {}

/// A cyclic diagonal-sparse `m x n` matrix: `K` diagonals of length `D = min(m, n)` with
/// offsets in `0..max(m, n)`. See the [module docs](self) for the exact pattern.
#[derive(Clone)]
pub struct DiagMatrix {
    m: usize,
    n: usize,
    offsets: Vec<usize>,
    values: Vec<f32>,
    /// Block plans of the optimized kernels, built on first use (they depend only on the
    /// shape and the offsets, which never change).
    plans: OnceLock<Box<Plans>>,
}

impl PartialEq for DiagMatrix {
    fn eq(&self, o: &Self) -> bool {
        (self.m, self.n, &self.offsets, &self.values) == (o.m, o.n, &o.offsets, &o.values)
    }
}

impl fmt::Debug for DiagMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiagMatrix")
            .field("m", &self.m)
            .field("n", &self.n)
            .field("offsets", &self.offsets)
            .field("values", &self.values)
            .finish_non_exhaustive()
    }
}

impl DiagMatrix {
    /// Number of active diagonals for sparsity `s`: `ceil((1 - s) * m * n / D)` clamped to
    /// `1..=P` (0 when `m` or `n` is 0). A tiny tolerance absorbs the rounding of `s` itself,
    /// so `s = 0.9` with `P = 1000` gives 100, not 101.
    pub fn active_diagonals(m: usize, n: usize, s: f64) -> usize {
        let (d, p) = (m.min(n), m.max(n));
        if d == 0 {
            return 0;
        }
        let exact = (1.0 - s) * (m as f64) * (n as f64) / d as f64;
        let k = (exact - 1e-6 * p as f64).ceil();
        if k.is_nan() || k < 1.0 {
            1
        } else if k >= p as f64 {
            p
        } else {
            k as usize
        }
    }

    /// A matrix from its parts: `offsets[K]` (distinct, below `max(m, n)`) and
    /// `values[K * D]` (row `k` is the diagonal with offset `offsets[k]`).
    pub fn new(m: usize, n: usize, offsets: Vec<usize>, values: Vec<f32>) -> Result<Self, DiagError> {
        if m == 0 || n == 0 {
            return Err(DiagError::EmptyShape { m, n });
        }
        let (d, p) = (m.min(n), m.max(n));
        let k = offsets.len();
        if k == 0 || k > p {
            return Err(DiagError::DiagonalCount { k, p });
        }
        let mut seen = vec![false; p];
        for &o in &offsets {
            if o >= p {
                return Err(DiagError::OffsetOutOfRange { offset: o, p });
            }
            if std::mem::replace(&mut seen[o], true) {
                return Err(DiagError::DuplicateOffset { offset: o });
            }
        }
        if values.len() != k * d {
            return Err(DiagError::ValuesLength { expected: k * d, got: values.len() });
        }
        Ok(DiagMatrix { m, n, offsets, values, plans: OnceLock::new() })
    }

    /// A random matrix at sparsity `s` (in `[0, 1)`): [`Self::active_diagonals`] distinct offsets
    /// drawn uniformly (stored in increasing order), values standard normal scaled by `1/sqrt(K)`.
    pub fn from_sparsity(m: usize, n: usize, s: f64, rng: &mut Rng) -> Result<Self, DiagError> {
        if !(0.0..1.0).contains(&s) {
            return Err(DiagError::Sparsity { s });
        }
        if m == 0 || n == 0 {
            return Err(DiagError::EmptyShape { m, n });
        }
        let (d, p) = (m.min(n), m.max(n));
        let k = Self::active_diagonals(m, n, s);
        let mut all: Vec<usize> = (0..p).collect();
        // Partial Fisher-Yates: the first k entries become a uniform k-subset.
        for i in 0..k {
            let j = i + rng.below(p - i);
            all.swap(i, j);
        }
        let mut offsets = all[..k].to_vec();
        offsets.sort_unstable();
        let scale = 1.0 / (k as f32).sqrt();
        let values = (0..k * d).map(|_| rng.normal() * scale).collect();
        Self::new(m, n, offsets, values)
    }

    /// Rows (out features) `m`.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Columns (in features) `n`.
    pub fn cols(&self) -> usize {
        self.n
    }

    /// Diagonal length `D = min(m, n)`.
    pub fn diag_len(&self) -> usize {
        self.m.min(self.n)
    }

    /// Candidate diagonals `P = max(m, n)`.
    pub fn candidates(&self) -> usize {
        self.m.max(self.n)
    }

    /// Active diagonals `K`.
    pub fn num_diagonals(&self) -> usize {
        self.offsets.len()
    }

    /// True when `m >= n` (diagonals run down the columns).
    pub fn is_tall(&self) -> bool {
        self.m >= self.n
    }

    /// Stored entries, `K * D`.
    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// Offsets `off[K]`.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Values `V[K][D]`.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Values `V[K][D]`, writable (the pattern stays fixed).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// Offsets and values, consuming the matrix.
    pub fn into_parts(self) -> (Vec<usize>, Vec<f32>) {
        (self.offsets, self.values)
    }

    /// `(row, col)` of entry `j` of the diagonal stored in row `k` (`k < K`, `j < D`).
    pub fn position(&self, k: usize, j: usize) -> (usize, usize) {
        let o = self.offsets[k];
        if self.is_tall() {
            ((j + o) % self.m, j)
        } else {
            (j, (j + o) % self.n)
        }
    }

    /// The dense `m x n` matrix, row-major.
    pub fn to_dense(&self) -> Vec<f32> {
        let d = self.diag_len();
        let mut w = vec![0.0f32; self.m * self.n];
        for k in 0..self.num_diagonals() {
            for j in 0..d {
                let (r, c) = self.position(k, j);
                w[r * self.n + c] = self.values[k * d + j];
            }
        }
        w
    }

    /// The 0/1 mask of the pattern, `m x n` row-major.
    pub fn mask(&self) -> Vec<f32> {
        let d = self.diag_len();
        let mut w = vec![0.0f32; self.m * self.n];
        for k in 0..self.num_diagonals() {
            for j in 0..d {
                let (r, c) = self.position(k, j);
                w[r * self.n + c] = 1.0;
            }
        }
        w
    }

    fn plans(&self) -> &Plans {
        self.plans.get_or_init(|| {
            let (d, p) = (self.diag_len(), self.candidates());
            Box::new(Plans { scatter: Plan::scatter(&self.offsets, d, p), gather: Plan::gather(&self.offsets, d, p) })
        })
    }

    fn check(&self, what: &str, a: &[f32], a_len: usize, b: &[f32], b_len: usize, batch: usize) {
        assert!(a.len() >= batch * a_len, "diag {what}: input holds {} < {batch}x{a_len}", a.len());
        assert!(b.len() >= batch * b_len, "diag {what}: output holds {} < {batch}x{b_len}", b.len());
    }

    /// Forward `Y[B][m] = X[B][n] W^T` (overwrites `y`), on the process kernel path, threaded
    /// over the current rayon pool.
    ///
    /// # Panics
    /// If `x` holds fewer than `batch * n` or `y` fewer than `batch * m` floats.
    pub fn forward(&self, x: &[f32], batch: usize, y: &mut [f32]) {
        self.check("forward", x, self.n, y, self.m, batch);
        if kernel_path() == KernelPath::Reference {
            return reference_forward(self, x, batch, y);
        }
        let (form, l) = if self.is_tall() { (Form::Scatter, self.m) } else { (Form::Gather, self.n) };
        let plans = self.plans();
        let plan = if form == Form::Scatter { &plans.scatter } else { &plans.gather };
        let job = Job { form, l, d: self.diag_len(), offs: &self.offsets, v: &self.values, plan };
        job.run(&x[..batch * self.n], &mut y[..batch * self.m], batch, false);
    }

    /// Input gradient `dX[B][n] (+)= dY[B][m] W` (adds when `add`, else overwrites).
    ///
    /// # Panics
    /// If `dy` holds fewer than `batch * m` or `dx` fewer than `batch * n` floats.
    pub fn backward_input(&self, dy: &[f32], batch: usize, dx: &mut [f32], add: bool) {
        self.check("backward_input", dy, self.m, dx, self.n, batch);
        if kernel_path() == KernelPath::Reference {
            return reference_backward_input(self, dy, batch, dx, add);
        }
        // The transpose of a tall diagonal matrix is wide and vice versa.
        let (form, l) = if self.is_tall() { (Form::Gather, self.m) } else { (Form::Scatter, self.n) };
        let plans = self.plans();
        let plan = if form == Form::Scatter { &plans.scatter } else { &plans.gather };
        let job = Job { form, l, d: self.diag_len(), offs: &self.offsets, v: &self.values, plan };
        job.run(&dy[..batch * self.m], &mut dx[..batch * self.n], batch, add);
    }

    /// Value gradient `dV[k][j] += sum_b dY[b][row] * X[b][col]` for every stored entry
    /// `(row, col) = position(k, j)`; `dv` has the layout of [`Self::values`].
    ///
    /// # Panics
    /// If a slice is shorter than its shape says.
    pub fn backward_values(&self, x: &[f32], dy: &[f32], batch: usize, dv: &mut [f32]) {
        self.check("backward_values", x, self.n, dy, self.m, batch);
        assert!(dv.len() >= self.nnz(), "diag backward_values: dv holds {} < {}", dv.len(), self.nnz());
        if kernel_path() == KernelPath::Reference {
            return reference_backward_values(self, x, dy, batch, dv);
        }
        let d = self.diag_len();
        // dV[k][j] += a[b][j] * src[b][(j + off_k) mod l]
        let (a, src, l) = if self.is_tall() {
            (&x[..batch * d], &dy[..batch * self.m], self.m)
        } else {
            (&dy[..batch * d], &x[..batch * self.n], self.n)
        };
        values_grad(l, d, &self.offsets, a, src, batch, &mut dv[..self.nnz()]);
    }
}

// ---------------------------------------------------------------------------------------------
// Reference kernels: the math, as plainly as possible.

/// Reference forward: `y[b][row] = sum_k V[k][j] * x[b][col]` over entries
/// `(row, col) = position(k, j)`, accumulated over `k` in storage order from zero.
pub fn reference_forward(w: &DiagMatrix, x: &[f32], batch: usize, y: &mut [f32]) {
    let (m, n, d) = (w.m, w.n, w.diag_len());
    y[..batch * m].fill(0.0);
    for b in 0..batch {
        for k in 0..w.num_diagonals() {
            for j in 0..d {
                let (r, c) = w.position(k, j);
                y[b * m + r] += w.values[k * d + j] * x[b * n + c];
            }
        }
    }
}

/// Reference input gradient: `dx[b][col] (+)= sum_k V[k][j] * dy[b][row]`.
pub fn reference_backward_input(w: &DiagMatrix, dy: &[f32], batch: usize, dx: &mut [f32], add: bool) {
    let (m, n, d) = (w.m, w.n, w.diag_len());
    if !add {
        dx[..batch * n].fill(0.0);
    }
    for b in 0..batch {
        for k in 0..w.num_diagonals() {
            for j in 0..d {
                let (r, c) = w.position(k, j);
                dx[b * n + c] += w.values[k * d + j] * dy[b * m + r];
            }
        }
    }
}

/// Reference value gradient: `dv[k][j] += sum_b dy[b][row] * x[b][col]`, over `b` in order.
pub fn reference_backward_values(w: &DiagMatrix, x: &[f32], dy: &[f32], batch: usize, dv: &mut [f32]) {
    let (m, n, d) = (w.m, w.n, w.diag_len());
    for b in 0..batch {
        for k in 0..w.num_diagonals() {
            for j in 0..d {
                let (r, c) = w.position(k, j);
                dv[k * d + j] += dy[b * m + r] * x[b * n + c];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Optimized kernels.

/// Below this many multiply-adds a kernel runs on the calling thread.
const PAR_MIN_WORK: usize = 1 << 15;
/// Batch rows processed together by the streaming kernel so each diagonal row is loaded once
/// per tile.
const ROW_TILE: usize = 4;
/// From this many rows in a chunk on, the blocked (register-accumulating) kernel runs; a single
/// row goes through the streaming kernel, whose long contiguous passes have less per-block
/// overhead.
const PLAN_MIN_ROWS: usize = 2;

/// Which index of a diagonal entry addresses the output.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Form {
    /// `out[b][(j + off) mod l] += v[j] * src[b][j]` (out rows `l` long, src rows `d` long).
    Scatter,
    /// `out[b][j] += v[j] * src[b][(j + off) mod l]` (out rows `d` long, src rows `l` long).
    Gather,
}

/// A contiguous piece of a diagonal: entries `j..j + len` meet the other index at `t..t + len`.
#[derive(Clone, Copy, Debug)]
struct Piece {
    j: usize,
    t: usize,
    len: usize,
}

/// The (at most) two pieces of the diagonal with offset `off` (`off < l`, `d <= l`): before the
/// wrap, `t = j + off`; after it, `t = j + off - l`. The second piece may be empty.
#[inline(always)]
fn pieces(off: usize, d: usize, l: usize) -> [Piece; 2] {
    let a = d.min(l - off);
    [Piece { j: 0, t: off, len: a }, Piece { j: a, t: 0, len: d - a }]
}

/// `p` restricted to `j` in `lo..hi`.
#[inline(always)]
fn clip_j(p: Piece, lo: usize, hi: usize) -> Piece {
    let s = p.j.max(lo);
    let e = (p.j + p.len).min(hi);
    if s >= e {
        Piece { j: 0, t: 0, len: 0 }
    } else {
        Piece { j: s, t: p.t + (s - p.j), len: e - s }
    }
}

/// `p` restricted to `t` in `lo..hi`.
#[inline(always)]
fn clip_t(p: Piece, lo: usize, hi: usize) -> Piece {
    let s = p.t.max(lo);
    let e = (p.t + p.len).min(hi);
    if s >= e {
        Piece { j: 0, t: 0, len: 0 }
    } else {
        Piece { j: p.j + (s - p.t), t: s, len: e - s }
    }
}

/// `o += a * b` element-wise (multiply, then add: the rounding of the AVX2 version).
#[inline(always)]
fn axpy_mul(o: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
        *o += a * b;
    }
}

/// One shifted product over all diagonals: forward (`src = x`, `out = y`) or input gradient
/// (`src = dy`, `out = dx`).
struct Job<'a> {
    form: Form,
    l: usize,
    d: usize,
    offs: &'a [usize],
    v: &'a [f32],
    plan: &'a Plan,
}

impl Job<'_> {
    fn lens(&self) -> (usize, usize) {
        match self.form {
            Form::Scatter => (self.d, self.l),
            Form::Gather => (self.l, self.d),
        }
    }

    /// All `batch` rows, threaded.
    fn run(&self, src: &[f32], out: &mut [f32], batch: usize, add: bool) {
        let (src_len, out_len) = self.lens();
        let threads = crate::threads();
        let work = batch * self.offs.len() * self.d;
        if threads <= 1 || work < PAR_MIN_WORK {
            self.chunk(src, out, batch, add);
        } else if batch >= threads {
            let per = batch.div_ceil(threads);
            out.par_chunks_mut(per * out_len).zip(src.par_chunks(per * src_len)).for_each(|(o, s)| {
                self.chunk(s, o, o.len() / out_len, add);
            });
        } else {
            // Fewer rows than threads: split each output row into ranges.
            let width = out_len.div_ceil(threads);
            for b in 0..batch {
                let s = &src[b * src_len..(b + 1) * src_len];
                out[b * out_len..(b + 1) * out_len].par_chunks_mut(width).enumerate().for_each(|(i, o)| {
                    self.rows(s, o, 1, i * width, i * width + o.len(), add);
                });
            }
        }
    }

    /// `rows` whole rows: the blocked kernel from two rows on, the streaming one for one row.
    fn chunk(&self, src: &[f32], out: &mut [f32], rows: usize, add: bool) {
        let (src_len, out_len) = self.lens();
        if rows < PLAN_MIN_ROWS {
            return self.rows(src, out, rows, 0, out_len, add);
        }
        let (plan, v, d) = (self.plan, self.v, self.d);
        #[cfg(target_arch = "x86_64")]
        if kernel_path() == KernelPath::Avx2
            && avx512_available()
            && rows >= avx512::LANE_ROWS
            && !plan.lanes.is_empty()
        {
            // Whole passes of 16 rows with the batch in the lanes, the rest row-major.
            let full = rows / avx512::LANE_ROWS * avx512::LANE_ROWS;
            let (s, o) = (&src[..full * src_len], &mut out[..full * out_len]);
            // SAFETY: AVX-512F is available (checked once per process).
            unsafe { avx512::batch_lanes(plan, v, d, s, src_len, o, out_len, full, add, avx512::phases(src_len)) };
            return self.chunk(&src[full * src_len..], &mut out[full * out_len..], rows - full, add);
        }
        #[cfg(target_arch = "x86_64")]
        if kernel_path() == KernelPath::Avx2 && avx512_available() {
            // SAFETY: AVX-512F is available (checked once per process).
            return unsafe { avx512::plan_chunk(plan, v, d, src, src_len, out, out_len, rows, add) };
        }
        #[cfg(target_arch = "x86_64")]
        if kernel_path() == KernelPath::Avx2 {
            // SAFETY: the AVX2 path is only chosen when the CPU has AVX2 and FMA.
            return unsafe { plan_chunk_avx2(plan, v, d, src, src_len, out, out_len, rows, add) };
        }
        plan_chunk::<Portable>(plan, v, d, src, src_len, out, out_len, rows, add)
    }

    /// `rows` rows of `src` into `out`, whose rows hold outputs `lo..hi` only (streaming:
    /// one multiply-add pass per diagonal piece).
    fn rows(&self, src: &[f32], out: &mut [f32], rows: usize, lo: usize, hi: usize, add: bool) {
        #[cfg(target_arch = "x86_64")]
        if kernel_path() == KernelPath::Avx2 {
            #[target_feature(enable = "avx2")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2(j: &Job, src: &[f32], out: &mut [f32], rows: usize, lo: usize, hi: usize, add: bool) {
                j.rows_with(src, out, rows, lo, hi, add, |o, a, b| unsafe { crate::x86_64::mul_add_into(o, a, b) })
            }
            // SAFETY: the AVX2 path is only chosen when the CPU has AVX2.
            return unsafe { avx2(self, src, out, rows, lo, hi, add) };
        }
        self.rows_with(src, out, rows, lo, hi, add, axpy_mul)
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn rows_with(
        &self,
        src: &[f32],
        out: &mut [f32],
        rows: usize,
        lo: usize,
        hi: usize,
        add: bool,
        axpy: impl Fn(&mut [f32], &[f32], &[f32]),
    ) {
        let (src_len, _) = self.lens();
        let (d, l) = (self.d, self.l);
        let ws = hi - lo;
        let tile = ROW_TILE;
        for r0 in (0..rows).step_by(tile) {
            let r1 = (r0 + tile).min(rows);
            let out = &mut out[r0 * ws..r1 * ws];
            let src = &src[r0 * src_len..r1 * src_len];
            if !add {
                out.fill(0.0);
            }
            for (k, &off) in self.offs.iter().enumerate() {
                let vk = &self.v[k * d..(k + 1) * d];
                for p in pieces(off, d, l) {
                    match self.form {
                        Form::Scatter => {
                            let p = clip_t(p, lo, hi);
                            if p.len == 0 {
                                continue;
                            }
                            let a = &vk[p.j..p.j + p.len];
                            for (o, s) in out.chunks_exact_mut(ws).zip(src.chunks_exact(src_len)) {
                                axpy(&mut o[p.t - lo..p.t - lo + p.len], a, &s[p.j..p.j + p.len]);
                            }
                        }
                        Form::Gather => {
                            let p = clip_j(p, lo, hi);
                            if p.len == 0 {
                                continue;
                            }
                            let a = &vk[p.j..p.j + p.len];
                            for (o, s) in out.chunks_exact_mut(ws).zip(src.chunks_exact(src_len)) {
                                axpy(&mut o[p.j - lo..p.j - lo + p.len], a, &s[p.t..p.t + p.len]);
                            }
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Blocked kernels: outputs in blocks of 16 held in registers for a tile of batch rows while
// every diagonal that touches the block is added, so each multiply-add costs about one load and
// no store. A plan (built once per matrix) lists, per output block, the diagonals that touch it
// in storage order, with where they read `V` and the source row.

/// Outputs per block: two 8-lane vectors.
const R: usize = 16;

/// One diagonal's contribution to one output block: lanes `lo..hi` of the block get
/// `V[k][v + i - lo] * src[s + i - lo]`.
#[derive(Clone, Copy, Debug)]
struct Entry {
    k: u32,
    v: u32,
    s: u32,
    lo: u8,
    hi: u8,
}

/// Dummy entries after a plan's last [`Plan::lanes`] entry (at least the prefetch distance).
const LANE_PAD: usize = 8;

/// Longest source the batch-in-lanes records can address (byte offsets `64 * s` in `i32`).
const LANE_MAX_SRC: usize = i32::MAX as usize / 64 - R;

/// Entries of every output block, blocks in order, diagonals in storage order within a block.
#[derive(Clone, Debug)]
struct Plan {
    out_len: usize,
    ptr: Vec<usize>,
    entries: Vec<Entry>,
    /// Per entry, for the batch-in-lanes kernel: where output lane 0 would read the values,
    /// `k * d + v - lo` (wrapping), and the transposed source, in bytes, `64 * (s - lo)`,
    /// with bit 0 set when the entry is partial (`lo > 0` or `hi < 16`: then `entries` has
    /// the span). [`LANE_PAD`] dummy entries follow the last, so a prefetch a few entries
    /// ahead needs no bounds check. Empty when the source is longer than [`LANE_MAX_SRC`]
    /// (the byte offsets would not fit): the row-major kernels then take every row.
    lanes: Vec<[i32; 2]>,
    /// Diagonal length the records were computed with.
    d: usize,
}

/// The two plans of a matrix: scatter form (tall forward, wide input gradient) and gather form
/// (wide forward, tall input gradient). Both have `l = P` and `d = D`.
#[derive(Clone, Debug)]
struct Plans {
    scatter: Plan,
    gather: Plan,
}

impl Plan {
    fn push(&mut self, k: usize, v: usize, s: usize, lo: usize, hi: usize) {
        if lo < hi {
            let c = |x: usize| u32::try_from(x).expect("diagonal matrix larger than 2^32");
            self.entries.push(Entry { k: c(k), v: c(v), s: c(s), lo: lo as u8, hi: hi as u8 });
            let i = |x: usize| i32::try_from(x).expect("diagonal matrix larger than 2^31") - lo as i32;
            // Wraps only for sources past LANE_MAX_SRC, whose records `finish` drops.
            let bytes = i(s).wrapping_mul(64);
            self.lanes.push([i(k * self.d + v), bytes | i32::from(hi - lo != R)]);
        }
    }

    /// Pad the batch-in-lanes records for a source `src_len` long, or drop them when it is
    /// longer than [`LANE_MAX_SRC`].
    fn finish(&mut self, src_len: usize) {
        if src_len > LANE_MAX_SRC {
            self.lanes = Vec::new();
        } else {
            self.lanes.extend([[0, 0]; LANE_PAD]);
        }
    }

    /// Scatter form: `out[t] += V[k][j] * src[j]` with `t = (j + off) mod l`, `out` `l` long.
    /// Lane `i` of block `t0` has `j = (t0 + i - off) mod l`, valid when `j < d`.
    fn scatter(offs: &[usize], d: usize, l: usize) -> Plan {
        let mut p = Plan { out_len: l, ptr: vec![0], entries: Vec::new(), lanes: Vec::new(), d };
        for t0 in (0..l).step_by(R) {
            let rlen = R.min(l - t0);
            for (k, &off) in offs.iter().enumerate() {
                let jf = (t0 + l - off) % l; // j of lane 0
                let iw = l - jf; // first lane whose j wraps to 0
                if jf < d {
                    p.push(k, jf, jf, 0, rlen.min(iw).min(d - jf));
                }
                if iw < rlen {
                    p.push(k, 0, 0, iw, rlen.min(iw + d));
                }
            }
            p.ptr.push(p.entries.len());
        }
        p.finish(d);
        p
    }

    /// Gather form: `out[j] += V[k][j] * src[(j + off) mod l]`, `out` `d` long.
    fn gather(offs: &[usize], d: usize, l: usize) -> Plan {
        let mut p = Plan { out_len: d, ptr: vec![0], entries: Vec::new(), lanes: Vec::new(), d };
        for j0 in (0..d).step_by(R) {
            let rlen = R.min(d - j0);
            for (k, &off) in offs.iter().enumerate() {
                let t = (j0 + off) % l;
                let iw = l - t; // first lane whose source index wraps to 0
                p.push(k, j0, t, 0, rlen.min(iw));
                if iw < rlen {
                    p.push(k, j0 + iw, 0, iw, rlen);
                }
            }
            p.ptr.push(p.entries.len());
        }
        p.finish(l);
        p
    }
}

/// Eight `f32` lanes: AVX2 registers or a portable array.
trait Lanes: Copy {
    fn zero() -> Self;
    fn load(s: &[f32]) -> Self;
    fn store(self, s: &mut [f32]);
    fn mul(self, o: Self) -> Self;
    fn add(self, o: Self) -> Self;
    /// `self + a * b`: multiply, then add, unless the implementation fuses.
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        self.add(a.mul(b))
    }
    /// For the lanes `i` of this register (block lanes `h..h + 8`) with `lo <= i < hi`:
    /// `self[i] + v[i - lo] * x[i - lo]`, multiply then add; other lanes unchanged. `v` and
    /// `x` hold `hi - lo` values.
    #[inline(always)]
    fn mul_add_part(self, v: &[f32], x: &[f32], lo: usize, hi: usize, h: usize) -> Self {
        let mut t = [0.0f32; 8];
        self.store(&mut t);
        for i in lo.max(h)..hi.min(h + 8) {
            t[i - h] += v[i - lo] * x[i - lo];
        }
        Self::load(&t)
    }
}

/// Portable lanes (the compiler vectorizes with SSE2).
#[derive(Clone, Copy)]
struct Portable([f32; 8]);

impl Lanes for Portable {
    #[inline(always)]
    fn zero() -> Self {
        Portable([0.0; 8])
    }
    #[inline(always)]
    fn load(s: &[f32]) -> Self {
        Portable(s[..8].try_into().unwrap())
    }
    #[inline(always)]
    fn store(self, s: &mut [f32]) {
        s[..8].copy_from_slice(&self.0)
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] * o.0[i]))
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] + o.0[i]))
    }
}

/// The AVX2 blocked kernels use fused multiply-add (one rounding per term instead of two):
/// they are bound by floating-point issue, and FMA halves the instructions there (measured
/// 20-30% faster at batch 16-197). The portable and streaming kernels multiply, then add.
#[cfg(target_arch = "x86_64")]
const FUSED: bool = true;

/// AVX2 + FMA lanes. Only ever used inside `#[target_feature(enable = "avx2,fma")]`
/// functions, where these always-inlined bodies and their intrinsics inline.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx(std::arch::x86_64::__m256);

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx {
    // SAFETY (all methods): AVX2 and FMA are available wherever `Avx` is used (see the type).
    #[inline(always)]
    fn zero() -> Self {
        unsafe { Avx(std::arch::x86_64::_mm256_setzero_ps()) }
    }
    #[inline(always)]
    fn load(s: &[f32]) -> Self {
        let s = &s[..8];
        unsafe { Avx(std::arch::x86_64::_mm256_loadu_ps(s.as_ptr())) }
    }
    #[inline(always)]
    fn store(self, s: &mut [f32]) {
        let s = &mut s[..8];
        unsafe { std::arch::x86_64::_mm256_storeu_ps(s.as_mut_ptr(), self.0) }
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        unsafe { Avx(std::arch::x86_64::_mm256_mul_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        unsafe { Avx(std::arch::x86_64::_mm256_add_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        if FUSED {
            unsafe { Avx(std::arch::x86_64::_mm256_fmadd_ps(a.0, b.0, self.0)) }
        } else {
            self.add(a.mul(b))
        }
    }
    /// Masked loads and a blend, so the accumulator stays in its register.
    #[inline(always)]
    fn mul_add_part(self, v: &[f32], x: &[f32], lo: usize, hi: usize, h: usize) -> Self {
        use std::arch::x86_64::*;
        debug_assert!(v.len() >= hi - lo && x.len() >= hi - lo);
        let lane = |j: i32| -> i32 {
            let i = h as i32 + j;
            if i >= lo as i32 && i < hi as i32 {
                -1
            } else {
                0
            }
        };
        // SAFETY: lane j reads element h + j - lo of v and x only where the mask is set,
        // i.e. inside the pieces (masked loads do not touch masked-off elements).
        unsafe {
            let m = _mm256_setr_epi32(lane(0), lane(1), lane(2), lane(3), lane(4), lane(5), lane(6), lane(7));
            let vp = v.as_ptr().wrapping_add(h).wrapping_sub(lo);
            let xp = x.as_ptr().wrapping_add(h).wrapping_sub(lo);
            let p = _mm256_mul_ps(_mm256_maskload_ps(vp, m), _mm256_maskload_ps(xp, m));
            Avx(_mm256_blendv_ps(self.0, _mm256_add_ps(self.0, p), _mm256_castsi256_ps(m)))
        }
    }
}

/// `rows` whole rows through `plan`, in tiles of up to 6 rows (12 accumulators).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn plan_chunk<L: Lanes>(
    plan: &Plan,
    v: &[f32],
    d: usize,
    src: &[f32],
    src_len: usize,
    out: &mut [f32],
    out_len: usize,
    rows: usize,
    add: bool,
) {
    debug_assert_eq!(plan.out_len, out_len);
    let mut r = 0;
    while r + 6 <= rows {
        let (s, o) = (&src[r * src_len..(r + 6) * src_len], &mut out[r * out_len..(r + 6) * out_len]);
        plan_rows::<L, 6>(plan, v, d, s, src_len, o, out_len, add);
        r += 6;
    }
    let (s, o) = (&src[r * src_len..rows * src_len], &mut out[r * out_len..rows * out_len]);
    match rows - r {
        5 => plan_rows::<L, 5>(plan, v, d, s, src_len, o, out_len, add),
        4 => plan_rows::<L, 4>(plan, v, d, s, src_len, o, out_len, add),
        3 => plan_rows::<L, 3>(plan, v, d, s, src_len, o, out_len, add),
        2 => plan_rows::<L, 2>(plan, v, d, s, src_len, o, out_len, add),
        1 => plan_rows::<L, 1>(plan, v, d, s, src_len, o, out_len, add),
        _ => {}
    }
}

/// `ROWS` rows: for each output block, accumulate every entry in registers, then store.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn plan_rows<L: Lanes, const ROWS: usize>(
    plan: &Plan,
    v: &[f32],
    d: usize,
    src: &[f32],
    src_len: usize,
    out: &mut [f32],
    out_len: usize,
    add: bool,
) {
    let srcs: [&[f32]; ROWS] = std::array::from_fn(|r| &src[r * src_len..(r + 1) * src_len]);
    for (q, w) in plan.ptr.windows(2).enumerate() {
        let o0 = q * R;
        let rlen = R.min(out_len - o0);
        let mut acc = [[L::zero(); 2]; ROWS];
        if add {
            for (r, a) in acc.iter_mut().enumerate() {
                let o = &out[r * out_len + o0..][..rlen];
                *a = if rlen == R {
                    [L::load(&o[..8]), L::load(&o[8..])]
                } else {
                    let mut t = [0.0f32; R];
                    for (t, &o) in t.iter_mut().zip(o) {
                        *t = o;
                    }
                    [L::load(&t[..8]), L::load(&t[8..])]
                };
            }
        }
        for e in &plan.entries[w[0]..w[1]] {
            let vk = &v[e.k as usize * d..][..d];
            let (lo, hi) = (e.lo as usize, e.hi as usize);
            if hi - lo == R {
                let vv = &vk[e.v as usize..][..R];
                let (va, vb) = (L::load(&vv[..8]), L::load(&vv[8..]));
                for (a, s) in acc.iter_mut().zip(&srcs) {
                    let s = &s[e.s as usize..][..R];
                    a[0] = a[0].mul_add(va, L::load(&s[..8]));
                    a[1] = a[1].mul_add(vb, L::load(&s[8..]));
                }
            } else {
                // Part of the block (a diagonal's end or its wrap): lanes lo..hi only,
                // multiply then add.
                let len = hi - lo;
                let vv = &vk[e.v as usize..][..len];
                for (a, s) in acc.iter_mut().zip(&srcs) {
                    let s = &s[e.s as usize..][..len];
                    a[0] = a[0].mul_add_part(vv, s, lo, hi, 0);
                    a[1] = a[1].mul_add_part(vv, s, lo, hi, 8);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let o = &mut out[r * out_len + o0..][..rlen];
            if rlen == R {
                a[0].store(&mut o[..8]);
                a[1].store(&mut o[8..]);
            } else {
                let mut t = [0.0f32; R];
                a[0].store(&mut t[..8]);
                a[1].store(&mut t[8..]);
                for (o, &t) in o.iter_mut().zip(&t) {
                    *o = t;
                }
            }
        }
    }
}

/// [`plan_chunk`] on AVX2 + FMA lanes. Callers check the CPU has both.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn plan_chunk_avx2(
    p: &Plan,
    v: &[f32],
    d: usize,
    s: &[f32],
    sl: usize,
    o: &mut [f32],
    ol: usize,
    r: usize,
    add: bool,
) {
    plan_chunk::<Avx>(p, v, d, s, sl, o, ol, r, add)
}

/// Whether the blocked kernel's AVX-512 form can run (`avx512f`), decided once.
#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX512.get_or_init(|| is_x86_feature_detected!("avx512f"))
}

/// The blocked kernel ([`plan_chunk`]) on 512-bit registers: one register per row and output
/// block of 16, tiles of up to 12 rows (each diagonal block's values loaded once per 12
/// rows instead of 6). Per output lane the same operations in the same order as the AVX2
/// form (full blocks by fused multiply-add, partial ones by multiply then add), so the two
/// agree bit for bit.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Plan, R};
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    const TILE: usize = 12;

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn plan_chunk(
        plan: &Plan,
        v: &[f32],
        d: usize,
        src: &[f32],
        src_len: usize,
        out: &mut [f32],
        out_len: usize,
        rows: usize,
        add: bool,
    ) {
        debug_assert_eq!(plan.out_len, out_len);
        let mut r = 0;
        while r < rows {
            let n = TILE.min(rows - r);
            let (sr, or) = (&src[r * src_len..(r + n) * src_len], &mut out[r * out_len..(r + n) * out_len]);
            match n {
                12 => tile::<12>(plan, v, d, sr, src_len, or, out_len, add),
                11 => tile::<11>(plan, v, d, sr, src_len, or, out_len, add),
                10 => tile::<10>(plan, v, d, sr, src_len, or, out_len, add),
                9 => tile::<9>(plan, v, d, sr, src_len, or, out_len, add),
                8 => tile::<8>(plan, v, d, sr, src_len, or, out_len, add),
                7 => tile::<7>(plan, v, d, sr, src_len, or, out_len, add),
                6 => tile::<6>(plan, v, d, sr, src_len, or, out_len, add),
                5 => tile::<5>(plan, v, d, sr, src_len, or, out_len, add),
                4 => tile::<4>(plan, v, d, sr, src_len, or, out_len, add),
                3 => tile::<3>(plan, v, d, sr, src_len, or, out_len, add),
                2 => tile::<2>(plan, v, d, sr, src_len, or, out_len, add),
                _ => tile::<1>(plan, v, d, sr, src_len, or, out_len, add),
            }
            r += n;
        }
    }

    /// Batch rows per pass of [`batch_lanes`]: one 16-lane register holds one input or
    /// output element for 16 rows.
    pub(super) const LANE_ROWS: usize = 16;

    /// How many plan entries ahead [`batch_lanes`] prefetches values.
    const PREFETCH: usize = 6;

    /// The blocked kernel with the batch in the lanes, for `rows` a multiple of 16: per pass
    /// of 16 rows the source is transposed once (`xt[s]` = element `s` of the 16 rows, one
    /// aligned register), then each output block keeps its 16 outputs x 16 rows in 16
    /// registers while every plan entry adds `V[k][v + t] * xt[s + t]` to output `t` (a
    /// broadcast value and an aligned load per multiply-add: no load straddles two cache
    /// lines, unlike the row-major tile, whose source reads shift by each diagonal's offset),
    /// and the block is transposed back into the rows. Per output element the same
    /// operations in the same order as [`plan_chunk`] (full entries by fused multiply-add,
    /// partial ones by multiply then add), so the two agree bit for bit.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn batch_lanes(
        plan: &Plan,
        v: &[f32],
        d: usize,
        src: &[f32],
        src_len: usize,
        out: &mut [f32],
        out_len: usize,
        rows: usize,
        add: bool,
        phases: usize,
    ) {
        const L: usize = LANE_ROWS;
        assert!(rows.is_multiple_of(L) && src.len() >= rows * src_len && out.len() >= rows * out_len);
        assert!(plan.out_len == out_len && plan.d == d && phases >= 1 && !plan.lanes.is_empty());
        let blocks = plan.ptr.len() - 1;
        // (Taken out of the thread-local rather than borrowed in a closure: a closure would
        // not inherit this function's target features.)
        let mut scratch = LANE_SCRATCH.take();
        {
            // Aligned room for src_len registers, then (with phases) the blocks' partial sums.
            let (xt_len, part_len) = (src_len.div_ceil(L) * L * L, if phases > 1 { blocks * R * L } else { 0 });
            // Grow only: every element a pass reads it has written first, so a training step
            // alternating forward (short source) and input gradient (long source) re-zeroes
            // nothing.
            if scratch.len() < xt_len + part_len + L {
                scratch.resize(xt_len + part_len + L, 0.0);
            }
            let shift = scratch.as_ptr().align_offset(64);
            let (xt, part) = scratch[shift..][..xt_len + part_len].split_at_mut(xt_len);
            for r0 in (0..rows).step_by(L) {
                let (sr, or) = (&src[r0 * src_len..(r0 + L) * src_len], &mut out[r0 * out_len..(r0 + L) * out_len]);
                rows_to_lanes(sr, src_len, L, 1, xt);
                for phase in 0..phases {
                    lane_phase(plan, v, xt, or, out_len, part, add, phase, phases);
                }
            }
        }
        LANE_SCRATCH.set(scratch);
    }

    thread_local! {
        /// Per-thread scratch of [`batch_lanes`]: the transposed source and the partial sums
        /// between phases (kept between calls, so a training step does not allocate them).
        static LANE_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// Transposed-source bytes one phase of [`batch_lanes`] should touch: half of a 48 KB L1
    /// data cache, leaving room for the values streaming through and the accumulators.
    const PHASE_BYTES: usize = 24 << 10;

    /// Phases of [`batch_lanes`] for a source `src_len` long: each block's entries are split
    /// into this many consecutive runs, and every block runs its first run before any block
    /// runs its second. With offsets in ascending order (as `DiagMatrix::from_sparsity` and frozen
    /// layers keep them) a block's entries read the source in one cyclic sweep, so a run
    /// reads about `1 / phases` of it and consecutive blocks' runs overlap: the transposed
    /// source (64 bytes per element) stays in L1 instead of being swept from L2 by every
    /// block. Any order is still correct, only slower.
    pub(super) fn phases(src_len: usize) -> usize {
        (src_len * LANE_ROWS * 4).div_ceil(PHASE_BYTES).max(1)
    }

    /// One phase of [`batch_lanes`] over every output block of one pass: run `phase` of
    /// `phases` of each block's entries, starting from the partial sums of the previous phase
    /// (`part`, 16 x 16 per block in lane order) or from the output (first phase), and
    /// leaving them in `part` or, transposed back, in the output (last phase). The stores and
    /// reloads are exact, so the sum per output element is the one of a single pass.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn lane_phase(
        plan: &Plan,
        v: &[f32],
        xt: &[f32],
        or: &mut [f32],
        out_len: usize,
        part: &mut [f32],
        add: bool,
        phase: usize,
        phases: usize,
    ) {
        const L: usize = LANE_ROWS;
        const { assert!(PREFETCH <= super::LANE_PAD) };
        let xp = xt.as_ptr();
        debug_assert!(plan.lanes.len() == plan.entries.len() + super::LANE_PAD);
        for (q, w) in plan.ptr.windows(2).enumerate() {
            let o0 = q * R;
            let rlen = R.min(out_len - o0);
            let om = first(rlen);
            let n = w[1] - w[0];
            let (e0, e1) = (w[0] + n * phase / phases, w[0] + n * (phase + 1) / phases);
            let pq = part.as_mut_ptr().wrapping_add(q * R * L);
            let mut acc = [_mm512_setzero_ps(); R];
            if phase > 0 {
                for (t, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_load_ps(pq.add(t * L));
                }
            } else if add {
                for (b, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_maskz_loadu_ps(om, or.as_ptr().add(b * out_len + o0));
                }
                acc = transpose(acc);
            }
            // Raw pointers over the entries: the loop's bookkeeping is most of what a
            // multiply-add costs beyond its two loads, so no bounds checks or spans here.
            let (lp, vb) = (plan.lanes.as_ptr(), v.as_ptr());
            for e in e0..e1 {
                // In bounds: e < e1 <= entries.len(), and `lanes` holds LANE_PAD >= PREFETCH
                // more records than there are entries.
                let [vo, so] = *lp.add(e);
                // The values of an entry a few ahead: each entry reads 64 bytes of a
                // different diagonal (from L2), which no hardware prefetcher predicts; both
                // lines, as the 16 values are not aligned to a line in the scatter form.
                let ahead = vb.wrapping_offset((*lp.add(e + PREFETCH))[0] as isize);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(15).cast());
                // Output t reads element t - lo of the piece: lane bases, wrapping.
                let vp = vb.wrapping_offset(vo as isize);
                let sp = xp.cast::<u8>().wrapping_offset((so & !1) as isize).cast::<f32>();
                if so & 1 == 0 {
                    // A whole entry: values v..v + 16 of diagonal k, source s..s + 16 (the plan
                    // built them inside V and the source).
                    debug_assert!({
                        let en = &plan.entries[e];
                        en.v as usize + R <= plan.d && (en.s as usize + R) * L <= xt.len()
                    });
                    for (t, a) in acc.iter_mut().enumerate() {
                        let (vt, st) = (vp.wrapping_add(t), sp.wrapping_add(t * L));
                        *a = _mm512_fmadd_ps(_mm512_set1_ps(*vt), _mm512_load_ps(st), *a);
                    }
                } else {
                    let en = &plan.entries[e];
                    let (lo, hi) = (en.lo as usize, en.hi as usize);
                    debug_assert!(en.v as usize + (hi - lo) <= plan.d && en.s as usize + (hi - lo) <= xt.len() / L);
                    for (t, a) in acc.iter_mut().enumerate() {
                        if t >= lo && t < hi {
                            let (vt, st) = (vp.wrapping_add(t), sp.wrapping_add(t * L));
                            let p = _mm512_mul_ps(_mm512_set1_ps(*vt), _mm512_load_ps(st));
                            *a = _mm512_add_ps(*a, p);
                        }
                    }
                }
            }
            if phase + 1 < phases {
                for (t, &a) in acc.iter().enumerate() {
                    _mm512_store_ps(pq.add(t * L), a);
                }
            } else {
                for (b, &y) in transpose(acc).iter().enumerate() {
                    _mm512_mask_storeu_ps(or.as_mut_ptr().add(b * out_len + o0), om, y);
                }
            }
        }
    }

    /// Transposed-row bytes one tile of [`values_lanes`] holds (both operands): the rows
    /// of a tile of passes stay in L2 while every diagonal reads them.
    const DV_TILE_BYTES: usize = 1 << 20;

    /// Passes of 16 batch rows per tile of [`values_lanes`] for rows of `d` (`a`) and `l`
    /// (`src`) elements.
    pub(super) fn dv_passes(l: usize, d: usize, batch: usize) -> usize {
        let per = (d.div_ceil(LANE_ROWS) + l.div_ceil(LANE_ROWS) + 1) * LANE_ROWS * LANE_ROWS * 4;
        (DV_TILE_BYTES / per).clamp(1, batch.div_ceil(LANE_ROWS))
    }

    /// `rows <= 16 * np` rows of `x` (each `len` long) with the batch in the lanes: element
    /// `t` of pass `p` (rows `16 p .. 16 p + 16`, zero past `rows`) at `out[(t * np + p) * 16..]`,
    /// so one element's passes are consecutive registers.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows_to_lanes(x: &[f32], len: usize, rows: usize, np: usize, out: &mut [f32]) {
        const L: usize = LANE_ROWS;
        assert!(rows <= np * L && x.len() >= rows * len && out.len() >= len.div_ceil(L) * L * np * L);
        for p in 0..np {
            for t0 in (0..len).step_by(L) {
                let m = first(L.min(len - t0));
                let mut r = [_mm512_setzero_ps(); L];
                for (i, v) in r.iter_mut().enumerate() {
                    let b = p * L + i;
                    if b < rows {
                        *v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(b * len + t0));
                    }
                }
                for (j, &c) in transpose(r).iter().enumerate() {
                    _mm512_store_ps(out.as_mut_ptr().add(((t0 + j) * np + p) * L), c);
                }
            }
        }
    }

    /// Lane `t` of the result = the sum of the 16 lanes of `r[t]` (30 shuffles, 15 adds:
    /// pairs of registers, then pairs of pairs, then across the 128-bit quarters).
    #[inline(always)]
    pub(super) unsafe fn sum_lanes(r: [__m512; 16]) -> __m512 {
        // c[i], quarter q: (r[2i], r[2i+1], r[2i], r[2i+1]) partial sums of that quarter.
        let mut c = [_mm512_setzero_ps(); 8];
        for (i, c) in c.iter_mut().enumerate() {
            let (a, b) = (r[2 * i], r[2 * i + 1]);
            *c = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        }
        // e[g], quarter q: the quarter's sums of r[4g], r[4g+1], r[4g+2], r[4g+3].
        let mut e = [_mm512_setzero_ps(); 4];
        for (g, e) in e.iter_mut().enumerate() {
            let (x, y) = (_mm512_castps_pd(c[2 * g]), _mm512_castps_pd(c[2 * g + 1]));
            let (lo, hi) = (_mm512_unpacklo_pd(x, y), _mm512_unpackhi_pd(x, y));
            *e = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
        }
        // Quarter g of the result: the sum of e[g]'s four quarters.
        let (g01, g23) = (fold_quarters(e[0], e[1]), fold_quarters(e[2], e[3]));
        fold_quarters(g01, g23)
    }

    /// Quarters (a0 + a1, a2 + a3, b0 + b1, b2 + b3) of two registers' 128-bit quarters.
    /// (A function, not a closure: a closure would not inherit the caller's target features.)
    #[inline(always)]
    unsafe fn fold_quarters(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b))
    }

    /// The value gradient with the batch in the lanes, for `batch >= 16`:
    /// `dv[k][j] += sum_b a[b][j] * src[b][(j + offs[k]) mod l]`. Per tile of passes (16 rows
    /// each, [`dv_passes`] of them) both operands are transposed once into a scratch (`src`
    /// with its first 16 elements repeated after its end, so a block never wraps); then for
    /// each block of 16 `j` and each diagonal, 16 registers accumulate `a[.][j] *
    /// src[.][t]` over the tile's passes (aligned loads, one multiply-add per 16 rows) and
    /// [`sum_lanes`] folds them into 16 sums added to `dv`. Diagonals are split across
    /// threads when `par`. The sums run in another order than the row-major kernel's (per
    /// lane, then across lanes), so the results agree to rounding, not bit for bit.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn values_lanes(
        l: usize,
        d: usize,
        offs: &[usize],
        a: &[f32],
        src: &[f32],
        batch: usize,
        dv: &mut [f32],
        par: bool,
    ) {
        const L: usize = LANE_ROWS;
        assert!(a.len() >= batch * d && src.len() >= batch * l && dv.len() >= offs.len() * d);
        assert!(offs.iter().all(|&o| o < l) && d <= l);
        let pt = dv_passes(l, d, batch);
        let (dp, lp) = (d.div_ceil(L) * L, l.div_ceil(L) * L + L);
        let mut scratch = DV_SCRATCH.take();
        if scratch.len() < (dp + lp) * pt * L + L {
            scratch.resize((dp + lp) * pt * L + L, 0.0);
        }
        {
            let shift = scratch.as_ptr().align_offset(64);
            let (at, st) = scratch[shift..][..(dp + lp) * pt * L].split_at_mut(dp * pt * L);
            // Tiles of equal numbers of passes (13 passes in tiles of at most 4: 4, 3, 3, 3,
            // not 4, 4, 4, 1: a one-pass tile costs the lane sums of a whole one).
            let passes = batch.div_ceil(L);
            let pt = passes.div_ceil(passes.div_ceil(pt));
            for r0 in (0..batch).step_by(pt * L) {
                let rows = (pt * L).min(batch - r0);
                let np = rows.div_ceil(L);
                rows_to_lanes(&a[r0 * d..(r0 + rows) * d], d, rows, np, at);
                rows_to_lanes(&src[r0 * l..(r0 + rows) * l], l, rows, np, st);
                // Elements l .. l + 16: elements 0 .. 16 again (mod l).
                for e in l..l + L {
                    let from = (e % l) * np * L;
                    st.copy_within(from..from + np * L, e * np * L);
                }
                let (at, st) = (&*at, &*st);
                let per = offs.len().div_ceil(crate::threads().max(1));
                if par && per < offs.len() {
                    dv[..offs.len() * d].par_chunks_mut(per * d).zip(offs.par_chunks(per)).for_each(|(g, o)| {
                        // SAFETY: AVX-512F, as for the caller.
                        unsafe { values_block(l, d, o, at, st, np, g) }
                    });
                } else {
                    values_block(l, d, offs, at, st, np, dv);
                }
            }
        }
        DV_SCRATCH.set(scratch);
    }

    thread_local! {
        /// Per-thread scratch of [`values_lanes`]: both operands with the batch in the lanes.
        static DV_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// The diagonals `offs` of [`values_lanes`] over one tile of `np` passes (`dv` holds their
    /// rows).
    #[target_feature(enable = "avx512f")]
    unsafe fn values_block(l: usize, d: usize, offs: &[usize], at: &[f32], st: &[f32], np: usize, dv: &mut [f32]) {
        const L: usize = LANE_ROWS;
        let stride = np * L;
        debug_assert!(at.len() >= d.div_ceil(L) * L * stride && st.len() >= (l + L) * stride);
        for j0 in (0..d).step_by(L) {
            let m = first(L.min(d - j0));
            let ap = at.as_ptr().add(j0 * stride);
            for (k, &o) in offs.iter().enumerate() {
                // In bounds: t0 < l, and the scratch repeats 16 elements past l.
                let sp = st.as_ptr().add(((j0 + o) % l) * stride);
                let mut acc = [_mm512_setzero_ps(); L];
                for p in 0..np {
                    for (t, a) in acc.iter_mut().enumerate() {
                        let i = t * stride + p * L;
                        *a = _mm512_fmadd_ps(_mm512_load_ps(ap.add(i)), _mm512_load_ps(sp.add(i)), *a);
                    }
                }
                let dst = dv.as_mut_ptr().add(k * d + j0);
                _mm512_mask_storeu_ps(dst, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst), sum_lanes(acc)));
            }
        }
    }

    /// The transpose of a 16 x 16 block held as 16 rows: `out[j]` lane `i` = `r[i]` lane `j`
    /// (64 shuffles: 32-bit and 64-bit unpacks, then two rounds of 128-bit lane shuffles).
    #[inline(always)]
    pub(super) unsafe fn transpose(r: [__m512; 16]) -> [__m512; 16] {
        // (Loops, not closures: a closure does not inherit the caller's target features, so
        // the intrinsics in it would be calls.)
        // t[2i] lane L: r[2i][4L], r[2i+1][4L], r[2i][4L+1], r[2i+1][4L+1]; t[2i+1]: 4L+2, 4L+3.
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // u[g][q] lane L: column 4L + q of rows 4g..4g + 4.
        let mut u = [[_mm512_setzero_ps(); 4]; 4];
        for (g, ug) in u.iter_mut().enumerate() {
            let (l0, h0) = (_mm512_castps_pd(t[4 * g]), _mm512_castps_pd(t[4 * g + 1]));
            let (l1, h1) = (_mm512_castps_pd(t[4 * g + 2]), _mm512_castps_pd(t[4 * g + 3]));
            ug[0] = _mm512_castpd_ps(_mm512_unpacklo_pd(l0, l1));
            ug[1] = _mm512_castpd_ps(_mm512_unpackhi_pd(l0, l1));
            ug[2] = _mm512_castpd_ps(_mm512_unpacklo_pd(h0, h1));
            ug[3] = _mm512_castpd_ps(_mm512_unpackhi_pd(h0, h1));
        }
        let mut out = [_mm512_setzero_ps(); 16];
        for q in 0..4 {
            // Lanes (0, 1) and (2, 3) of groups 0, 1 and of groups 2, 3.
            let a_lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(u[0][q], u[1][q]);
            let a_hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(u[0][q], u[1][q]);
            let b_lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(u[2][q], u[3][q]);
            let b_hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(u[2][q], u[3][q]);
            out[q] = _mm512_shuffle_f32x4::<0b10_00_10_00>(a_lo, b_lo);
            out[4 + q] = _mm512_shuffle_f32x4::<0b11_01_11_01>(a_lo, b_lo);
            out[8 + q] = _mm512_shuffle_f32x4::<0b10_00_10_00>(a_hi, b_hi);
            out[12 + q] = _mm512_shuffle_f32x4::<0b11_01_11_01>(a_hi, b_hi);
        }
        out
    }

    /// The first `n <= 16` of 16 lanes.
    #[inline(always)]
    fn first(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// Load `rlen <= 16` floats (zero past them).
    #[inline(always)]
    unsafe fn load_part(s: &[f32], rlen: usize) -> __m512 {
        _mm512_maskz_loadu_ps(first(rlen), s.as_ptr())
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const ROWS: usize>(
        plan: &Plan,
        v: &[f32],
        d: usize,
        src: &[f32],
        src_len: usize,
        out: &mut [f32],
        out_len: usize,
        add: bool,
    ) {
        let srcs: [&[f32]; ROWS] = std::array::from_fn(|r| &src[r * src_len..(r + 1) * src_len]);
        let sp: [*const f32; ROWS] = std::array::from_fn(|r| srcs[r].as_ptr());
        for (q, w) in plan.ptr.windows(2).enumerate() {
            let o0 = q * R;
            let rlen = R.min(out_len - o0);
            let mut acc = [_mm512_setzero_ps(); ROWS];
            if add {
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = load_part(&out[r * out_len + o0..][..rlen], rlen);
                }
            }
            for e in &plan.entries[w[0]..w[1]] {
                let vk = &v[e.k as usize * d..][..d];
                let (lo, hi) = (e.lo as usize, e.hi as usize);
                if hi - lo == R {
                    // Plan entries lie inside their diagonal and source row (built so, checked
                    // in debug builds); raw loads keep bounds checks out of the inner loop.
                    debug_assert!(e.v as usize + R <= d && e.s as usize + R <= src_len);
                    let vv = _mm512_loadu_ps(vk.as_ptr().add(e.v as usize));
                    for (a, s) in acc.iter_mut().zip(&sp) {
                        *a = _mm512_fmadd_ps(vv, _mm512_loadu_ps(s.add(e.s as usize)), *a);
                    }
                } else {
                    // Part of the block (a diagonal's end or its wrap): lanes lo..hi by masked
                    // loads, multiply then add (as the AVX2 form's scalar loop), in registers.
                    debug_assert!(e.v as usize + (hi - lo) <= d && e.s as usize + (hi - lo) <= src_len);
                    let m = first(hi) & !first(lo);
                    // Lane i reads element i - lo of the piece: pointers start `lo` before it
                    // (masked lanes below `lo` are not read).
                    let vv = _mm512_maskz_loadu_ps(m, vk.as_ptr().add(e.v as usize).wrapping_sub(lo));
                    for (a, s) in acc.iter_mut().zip(&sp) {
                        let x = _mm512_maskz_loadu_ps(m, s.add(e.s as usize).wrapping_sub(lo));
                        *a = _mm512_mask_add_ps(*a, m, *a, _mm512_mul_ps(vv, x));
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let o = &mut out[r * out_len + o0..][..rlen];
                _mm512_mask_storeu_ps(o.as_mut_ptr(), first(rlen), *a);
            }
        }
    }
}

/// Value gradient of `KT` diagonals (`dv` holds their whole rows) over batch rows `b0..b1`:
/// blocks of 16 `dv` entries per diagonal stay in registers across the batch rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dv_tile<L: Lanes, const KT: usize>(
    l: usize,
    d: usize,
    offs: &[usize],
    a: &[f32],
    src: &[f32],
    b0: usize,
    b1: usize,
    dv: &mut [f32],
) {
    let offs: [usize; KT] = offs[..KT].try_into().unwrap();
    let whole = d - d % R;
    for j0 in (0..whole).step_by(R) {
        let mut t = [0usize; KT];
        for (t, &off) in t.iter_mut().zip(&offs) {
            *t = if j0 + off >= l { j0 + off - l } else { j0 + off };
        }
        let mut acc = [[L::zero(); 2]; KT];
        for (i, a) in acc.iter_mut().enumerate() {
            let row = &dv[i * d + j0..][..R];
            *a = [L::load(&row[..8]), L::load(&row[8..])];
        }
        for b in b0..b1 {
            let ar = &a[b * d + j0..][..R];
            let (aa, ab) = (L::load(&ar[..8]), L::load(&ar[8..]));
            let sr = &src[b * l..(b + 1) * l];
            for (acc, &t) in acc.iter_mut().zip(&t) {
                let (sa, sb) = if t + R <= l {
                    let s = &sr[t..t + R];
                    (L::load(&s[..8]), L::load(&s[8..]))
                } else {
                    let mut tmp = [0.0f32; R];
                    let w = l - t;
                    tmp[..w].copy_from_slice(&sr[t..]);
                    tmp[w..].copy_from_slice(&sr[..R - w]);
                    (L::load(&tmp[..8]), L::load(&tmp[8..]))
                };
                acc[0] = acc[0].mul_add(aa, sa);
                acc[1] = acc[1].mul_add(ab, sb);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let row = &mut dv[i * d + j0..][..R];
            a[0].store(&mut row[..8]);
            a[1].store(&mut row[8..]);
        }
    }
    for (i, &off) in offs.iter().enumerate() {
        for j in whole..d {
            let t = (j + off) % l;
            let mut g = dv[i * d + j];
            for b in b0..b1 {
                g += a[b * d + j] * src[b * l + t];
            }
            dv[i * d + j] = g;
        }
    }
}

/// Value gradient of the diagonals `offs` (whole `dv` rows) over all batch rows, in batch
/// tiles whose rows stay in L2.
#[inline(always)]
fn dv_chunk<L: Lanes>(l: usize, d: usize, offs: &[usize], a: &[f32], src: &[f32], batch: usize, dv: &mut [f32]) {
    let tile = ((1usize << 16) / (l + d)).clamp(1, 64);
    for b0 in (0..batch).step_by(tile) {
        let b1 = (b0 + tile).min(batch);
        let mut k = 0;
        while k < offs.len() {
            let kt = (offs.len() - k).min(4);
            let (o, g) = (&offs[k..k + kt], &mut dv[k * d..(k + kt) * d]);
            match kt {
                4 => dv_tile::<L, 4>(l, d, o, a, src, b0, b1, g),
                3 => dv_tile::<L, 3>(l, d, o, a, src, b0, b1, g),
                2 => dv_tile::<L, 2>(l, d, o, a, src, b0, b1, g),
                _ => dv_tile::<L, 1>(l, d, o, a, src, b0, b1, g),
            }
            k += kt;
        }
    }
}

/// [`dv_chunk`] on the process kernel path.
fn dv_chunk_dispatch(l: usize, d: usize, offs: &[usize], a: &[f32], src: &[f32], batch: usize, dv: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if kernel_path() == KernelPath::Avx2 {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(l: usize, d: usize, offs: &[usize], a: &[f32], src: &[f32], batch: usize, dv: &mut [f32]) {
            dv_chunk::<Avx>(l, d, offs, a, src, batch, dv)
        }
        // SAFETY: the AVX2 path is only chosen when the CPU has AVX2 and FMA.
        return unsafe { avx2(l, d, offs, a, src, batch, dv) };
    }
    dv_chunk::<Portable>(l, d, offs, a, src, batch, dv)
}

/// Longest `l + d` for which the value gradient takes the batch-in-lanes kernel: its scratch
/// holds 64 bytes per element of both operands per pass (64 MB at this length and one pass
/// per tile); longer rows keep the row-major kernel, which needs no scratch.
#[cfg(target_arch = "x86_64")]
const DV_LANES_MAX: usize = 1 << 20;

/// `dv[k][j] += a[b][j] * src[b][(j + off_k) mod l]` over `b` in order; `a` rows are `d`
/// long, `src` rows `l` long. Threaded over diagonals (or over `j` ranges when `K` is small).
fn values_grad(l: usize, d: usize, offs: &[usize], a: &[f32], src: &[f32], batch: usize, dv: &mut [f32]) {
    let threads = crate::threads();
    let kk = offs.len();
    #[cfg(target_arch = "x86_64")]
    if kernel_path() == KernelPath::Avx2 && avx512_available() && batch >= avx512::LANE_ROWS && l + d <= DV_LANES_MAX {
        let par = threads > 1 && batch * kk * d >= PAR_MIN_WORK;
        // SAFETY: AVX-512F is available (checked once per process).
        return unsafe { avx512::values_lanes(l, d, offs, a, src, batch, dv, par) };
    }
    if threads <= 1 || batch * kk * d < PAR_MIN_WORK {
        return dv_chunk_dispatch(l, d, offs, a, src, batch, dv);
    }
    if kk >= threads {
        let per = kk.div_ceil(threads);
        dv.par_chunks_mut(per * d).zip(offs.par_chunks(per)).for_each(|(dv, offs)| {
            dv_chunk_dispatch(l, d, offs, a, src, batch, dv);
        });
    } else {
        let width = d.div_ceil(threads);
        for (k, &off) in offs.iter().enumerate() {
            dv[k * d..(k + 1) * d].par_chunks_mut(width).enumerate().for_each(|(i, dv)| {
                values_grad_part(l, d, &[off], a, src, batch, dv, i * width, i * width + dv.len());
            });
        }
    }
}

/// [`values_grad`] for the diagonals `offs` whose `dv` rows hold entries `lo..hi` only.
#[allow(clippy::too_many_arguments)]
fn values_grad_part(
    l: usize,
    d: usize,
    offs: &[usize],
    a: &[f32],
    src: &[f32],
    batch: usize,
    dv: &mut [f32],
    lo: usize,
    hi: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if kernel_path() == KernelPath::Avx2 {
        #[target_feature(enable = "avx2")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx2(
            l: usize,
            d: usize,
            offs: &[usize],
            a: &[f32],
            src: &[f32],
            batch: usize,
            dv: &mut [f32],
            lo: usize,
            hi: usize,
        ) {
            values_grad_with(l, d, offs, a, src, batch, dv, lo, hi, |o, a, b| unsafe {
                crate::x86_64::mul_add_into(o, a, b)
            })
        }
        // SAFETY: the AVX2 path is only chosen when the CPU has AVX2.
        return unsafe { avx2(l, d, offs, a, src, batch, dv, lo, hi) };
    }
    values_grad_with(l, d, offs, a, src, batch, dv, lo, hi, axpy_mul)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn values_grad_with(
    l: usize,
    d: usize,
    offs: &[usize],
    a: &[f32],
    src: &[f32],
    batch: usize,
    dv: &mut [f32],
    lo: usize,
    hi: usize,
    axpy: impl Fn(&mut [f32], &[f32], &[f32]),
) {
    let ws = hi - lo;
    // Batch tile: its rows of `a` and `src` (about 256 KiB) stay in L2 while every diagonal's
    // `dv` row stays in L1 across the tile.
    let tile = ((1usize << 16) / (l + d)).clamp(1, 64);
    for b0 in (0..batch).step_by(tile) {
        let b1 = (b0 + tile).min(batch);
        for (k, &off) in offs.iter().enumerate() {
            let dvk = &mut dv[k * ws..(k + 1) * ws];
            for p in pieces(off, d, l) {
                let p = clip_j(p, lo, hi);
                if p.len == 0 {
                    continue;
                }
                for b in b0..b1 {
                    axpy(
                        &mut dvk[p.j - lo..p.j - lo + p.len],
                        &a[b * d + p.j..][..p.len],
                        &src[b * l + p.t..][..p.len],
                    );
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The AVX-512 blocked kernel equals the AVX2 one bit for bit (same operations per lane,
    /// same order), so the tolerance-based tests of the AVX2 form carry over.
    #[test]
    fn avx512_blocked_equals_avx2_blocked() {
        if !(avx512_available() && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("no AVX-512 here: nothing to compare");
            return;
        }
        let mut rng = Rng::new(3);
        for &(m, n, sp) in &[(96, 32, 0.9), (32, 96, 0.8), (50, 70, 0.5), (128, 128, 0.95), (17, 300, 0.7)] {
            let w = DiagMatrix::from_sparsity(m, n, sp, &mut rng).unwrap();
            let (d, l, v) = (w.diag_len(), w.candidates(), w.values());
            let plans = w.plans();
            for (plan, src_len, out_len) in [(&plans.scatter, d, l), (&plans.gather, l, d)] {
                for rows in [2usize, 5, 12, 13, 30] {
                    for add in [false, true] {
                        let src: Vec<f32> = (0..rows * src_len).map(|_| rng.normal()).collect();
                        let out0: Vec<f32> = (0..rows * out_len).map(|_| rng.normal()).collect();
                        let (mut a, mut b) = (out0.clone(), out0.clone());
                        // SAFETY: features checked above.
                        unsafe {
                            plan_chunk_avx2(plan, v, d, &src, src_len, &mut a, out_len, rows, add);
                            avx512::plan_chunk(plan, v, d, &src, src_len, &mut b, out_len, rows, add);
                        }
                        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&a), bits(&b), "{m}x{n} s{sp} rows {rows} add {add} out_len {out_len}");
                    }
                }
            }
        }
    }

    /// Batch-in-lanes records exist (padded) up to the longest addressable source and are
    /// dropped past it, so such a matrix takes the row-major kernels instead of a panic.
    #[test]
    fn lane_records_only_for_addressable_sources() {
        let fits = Plan::gather(&[0, 5], 1, LANE_MAX_SRC);
        assert_eq!(fits.lanes.len(), fits.entries.len() + LANE_PAD);
        // One-output blocks (d = 1) are partial (bit 0); diagonal 1 reads source element 5.
        assert_eq!(fits.lanes[..2], [[0, 1], [1, 5 * 64 + 1]]);
        let past = Plan::gather(&[0, 5], 1, LANE_MAX_SRC + 1);
        assert!(past.lanes.is_empty() && past.entries.len() == fits.entries.len());
        let scatter = Plan::scatter(&[3], 20, 40);
        assert_eq!(scatter.lanes.len(), scatter.entries.len() + LANE_PAD);
    }

    /// The 16 x 16 register transpose against the index definition.
    #[test]
    fn avx512_transpose_is_the_transpose() {
        if !avx512_available() {
            eprintln!("no AVX-512 here: nothing to check");
            return;
        }
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        // SAFETY: AVX-512F checked above.
        let t = unsafe {
            use std::arch::x86_64::*;
            let r = std::array::from_fn(|i| _mm512_loadu_ps(m.as_ptr().add(16 * i)));
            let t = avx512::transpose(r);
            let mut o = [0f32; 256];
            for (j, v) in t.iter().enumerate() {
                _mm512_storeu_ps(o.as_mut_ptr().add(16 * j), *v);
            }
            o
        };
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(t[16 * j + i], m[16 * i + j], "row {i} column {j}");
            }
        }
    }

    /// The lane sums of 16 registers land in the right lanes (integer values: exact in any
    /// order).
    #[test]
    fn avx512_sum_lanes_sums_each_register() {
        if !avx512_available() {
            eprintln!("no AVX-512 here: nothing to check");
            return;
        }
        let m: Vec<f32> = (0..256).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        // SAFETY: AVX-512F checked above.
        let s = unsafe {
            use std::arch::x86_64::*;
            let r = std::array::from_fn(|i| _mm512_loadu_ps(m.as_ptr().add(16 * i)));
            let mut o = [0f32; 16];
            _mm512_storeu_ps(o.as_mut_ptr(), avx512::sum_lanes(r));
            o
        };
        for (t, &v) in s.iter().enumerate() {
            assert_eq!(v, m[16 * t..16 * t + 16].iter().sum::<f32>(), "register {t}: {s:?}");
        }
    }

    /// The batch-in-lanes value gradient against the reference, to rounding (it sums in
    /// another order), on tall, wide and square shapes, `d` and `l` not multiples of 16,
    /// sources shorter than 16, batches not multiples of 16 and tiles of several passes, 1
    /// and 2 threads.
    #[test]
    fn avx512_values_lanes_match_reference() {
        if !avx512_available() {
            eprintln!("no AVX-512 here: nothing to compare");
            return;
        }
        let mut rng = Rng::new(9);
        for &(m, n, sp, batch) in &[
            (96, 32, 0.9, 16),
            (32, 96, 0.8, 40),
            (50, 70, 0.5, 33),
            (7, 9, 0.3, 17),
            (300, 17, 0.6, 64),
            (40, 800, 0.9, 200),
            (3000, 700, 0.95, 70),
        ] {
            let w = DiagMatrix::from_sparsity(m, n, sp, &mut rng).unwrap();
            let x: Vec<f32> = (0..batch * n).map(|_| rng.normal()).collect();
            let dy: Vec<f32> = (0..batch * m).map(|_| rng.normal()).collect();
            let dv0: Vec<f32> = (0..w.nnz()).map(|_| rng.normal()).collect();
            let (mut want, mut scale) = (dv0.clone(), dv0.iter().map(|v| v.abs()).collect::<Vec<_>>());
            reference_backward_values(&w, &x, &dy, batch, &mut want);
            let wa = DiagMatrix::new(m, n, w.offsets().to_vec(), vec![1.0; w.nnz()]).unwrap();
            let abs = |v: &[f32]| v.iter().map(|f| f.abs()).collect::<Vec<_>>();
            reference_backward_values(&wa, &abs(&x), &abs(&dy), batch, &mut scale);
            let (d, l) = (w.diag_len(), w.candidates());
            let (a, src) = if w.is_tall() { (&x, &dy) } else { (&dy, &x) };
            for par in [false, true] {
                let mut got = dv0.clone();
                // SAFETY: AVX-512F checked above.
                unsafe { avx512::values_lanes(l, d, w.offsets(), a, src, batch, &mut got, par) };
                for (i, ((g, w), s)) in got.iter().zip(&want).zip(&scale).enumerate() {
                    assert!((g - w).abs() <= 1e-5 * s + 1e-6, "{m}x{n} s{sp} b{batch} par {par} entry {i}: {g} vs {w}");
                }
            }
        }
    }

    /// The batch-in-lanes kernel equals the row-major AVX-512 blocked kernel bit for bit, on
    /// tall, wide and square shapes, with partial output blocks, sources whose length is not a
    /// multiple of 16, and in add mode.
    #[test]
    fn avx512_batch_lanes_equals_blocked() {
        if !avx512_available() {
            eprintln!("no AVX-512 here: nothing to compare");
            return;
        }
        let mut rng = Rng::new(5);
        for &(m, n, sp) in &[
            (96, 32, 0.9),
            (32, 96, 0.8),
            (50, 70, 0.5),
            (128, 128, 0.95),
            (17, 300, 0.7),
            (300, 17, 0.6),
            (40, 800, 0.9),
        ] {
            let w = DiagMatrix::from_sparsity(m, n, sp, &mut rng).unwrap();
            let (d, l, v) = (w.diag_len(), w.candidates(), w.values());
            let plans = w.plans();
            for (plan, src_len, out_len) in [(&plans.scatter, d, l), (&plans.gather, l, d)] {
                // Phases split each block's entries; 7 leaves some blocks' runs empty.
                for (rows, phases) in [(16usize, 1usize), (48, 2), (64, 3), (16, 7), (32, avx512::phases(src_len))] {
                    for add in [false, true] {
                        let src: Vec<f32> = (0..rows * src_len).map(|_| rng.normal()).collect();
                        let out0: Vec<f32> = (0..rows * out_len).map(|_| rng.normal()).collect();
                        let (mut a, mut b) = (out0.clone(), out0.clone());
                        // SAFETY: AVX-512F checked above.
                        unsafe {
                            avx512::plan_chunk(plan, v, d, &src, src_len, &mut a, out_len, rows, add);
                            avx512::batch_lanes(plan, v, d, &src, src_len, &mut b, out_len, rows, add, phases);
                        }
                        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        let what = format!("{m}x{n} s{sp} rows {rows} phases {phases} add {add} out_len {out_len}");
                        assert_eq!(bits(&a), bits(&b), "{what}");
                    }
                }
            }
        }
    }
}
