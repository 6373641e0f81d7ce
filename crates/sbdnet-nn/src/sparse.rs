//! Sparse linear layers with dynamic sparse training: DynaDiag diagonal-sparse layers
//! ([`DiagLinear`], SPEC.md section 2) and the unstructured baselines SET and RigL
//! ([`MaskedLinear`]).
//!
//! Every layer computes `y = x W^T + b` with `W` of shape `out x in` (`m x n`) and is chosen per
//! block by [`SparseSpec`] (`Block::Linear { sparse: Some(..), .. }`). All kinds have the same
//! parameter budget at sparsity `s`: `K = DiagMatrix::active_diagonals(m, n, s)` diagonals of
//! length `D = min(m, n)`, so `nnz = K * D` weights (plus the bias).
//!
//! The pattern changes between optimizer steps in [`crate::Model::after_step`], which the
//! training loop calls after every optimizer step with the number of steps done and the
//! run's total; it zeroes the optimizer state of every weight it removes or adds. All random
//! draws come from `Rng::derive(model seed, layer, step)`, so a resumed run replays exactly.
//!
//! # DynaDiag (`diag`): the rule implemented here
//! Let `P = max(m, n)` be the number of possible cyclic diagonals and `C = min(ceil(c K), P)`
//! the candidate-set size (`c` = [`SparseSpec::candidates`], default 2). The layer stores
//! values `v[C][D]` (parameter `<name>.values`), one importance score per candidate `alpha[C]`
//! (parameter `<name>.alpha`, initialized to 0, no weight decay) and the candidates' offsets
//! (buffer `<name>.offsets`, integers stored as `f32`, `-1` for an unused row).
//!
//! 1. **Soft phase** (steps `0 .. F`, `F = ceil(freeze * total_steps)`, `freeze` default 0.3).
//!    The weight is `W = sum_i a_i Shift_i diag(v_i)` over the `C` candidates with
//!    `a = clamp(K * softmax(alpha / T), 0, 1)`; the kernels run on the `C` candidate diagonals
//!    only (`O(B C D)`), never on all `P`. The temperature follows a cosine from
//!    `T0 = 5.0` to `T1 = 0.05`: `T(t) = T1 + (T0 - T1) (1 + cos(pi t / F)) / 2`. Gradients:
//!    `dv_i = a_i dVeff_i`, `da_i = <v_i, dVeff_i>`, and through the clamp and the softmax
//!    `dalpha_l = (K / T) s_l (g_l - sum_i s_i g_i)` with `s = softmax(alpha / T)`,
//!    `g_i = da_i` where `K s_i < 1` and 0 where the clamp is active. The importance scores'
//!    gradient is multiplied by [`SparseSpec::alpha_lr`] (default 1), their learning-rate
//!    multiplier under SGD; `T0`, `T1` are [`SparseSpec::t_start`], [`SparseSpec::t_end`].
//! 2. **Candidate refresh**, every `dT` steps ([`SparseSpec::update_every`], default 100)
//!    during the soft phase, when `C < P`: the `K` candidates with the largest `alpha` are
//!    protected; among the other `C - K`, the `r` with the smallest effective norm
//!    `a_i ||v_i||_2` are dropped, where `r = max(1, round(f (C - K)))` and
//!    `f = drop_fraction * (1 + cos(pi t / F)) / 2` (drop fraction default 0.3). The same
//!    number is regrown from a uniform sample of `S = min(P - C, max(4 r, K))` non-candidate
//!    diagonals, scored by the norm of the loss gradient they would receive, `||(dY^T X)
//!    restricted to diagonal o||_2`, computed sparsely on the last batch with the diagonal
//!    value-gradient kernel over the `S` sampled diagonals only (`O(B S D)` once per `dT`
//!    steps). The `r` best replace the dropped rows with `v = 0` (so the function does not
//!    change) and `alpha` = the mean `alpha` of the candidates kept.
//! 3. **Freeze** at step `F`: the `K` candidates with the largest `alpha` are kept (ties: lower
//!    row first), `a_i` is folded into the values (`V_i = a_i v_i`, so the kept part of the
//!    function is unchanged; the optimizer state of the row is scaled alike), the other rows
//!    are zeroed and never used again, and training continues on the `K` diagonals only with
//!    the plain diagonal kernels.
//!
//! [`DiagLinear::nnz`] is `C * D` during the soft phase and exactly `K * D` from the freeze on.
//! When `C == K` (e.g. `K = P`) there is nothing to choose and the layer starts frozen.
//!
//! # SET and RigL (`set`, `rigl`): masked dense
//! A dense weight `[m][n]` (parameter `<name>.weight`) with a 0/1 mask (buffer `<name>.mask`)
//! of exactly `K * D` ones, initially uniform at random; weights outside the mask are zero and
//! get no gradient. Every `dT` steps before `stop * total_steps` (stop default 0.75), with
//! `f = drop_fraction * (1 + cos(pi t / (stop * total))) / 2`, the `r = round(f nnz)` active
//! weights of smallest magnitude are pruned and `r` inactive positions are regrown at zero:
//! uniformly at random (SET) or those with the largest dense gradient `|dY^T X|` of the last
//! batch (RigL). The mask always holds exactly `K * D` ones.
//!
//! ```
//! use sbdnet_nn::{Model, ModelConfig, Loss};
//! use sbdnet_nn::sparse::{SparseKind, SparseSpec};
//! let cfg = ModelConfig::preset("mlp", [8, 8, 1], 10)
//!     .unwrap()
//!     .with_hidden_linear(Some(SparseSpec::new(SparseKind::Diag, 0.9)));
//! let mut model = Model::new(cfg, 4, 0).unwrap();
//! let stats = model.train_step(&vec![0.1; 4 * 64], &[1, 2, 3, 4], &Loss::default()).unwrap();
//! assert!(stats.loss.is_finite());
//! assert!(model.sparse_layers().iter().all(|l| l.nnz <= l.candidates_nnz));
//! ```

use crate::optim::Optimizer;
use crate::params::{ParamId, ParamStore};
use sbdnet_kernels::csr;
use sbdnet_kernels::diag::DiagMatrix;
use sbdnet_kernels::elementwise as ew;
use sbdnet_kernels::rng::Rng;
use serde::{Deserialize, Serialize};

/// An invalid sparse-layer setting, or a saved pattern that does not fit its layer; the
/// message names the knob or the buffer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SparseError(pub String);

/// Which sparse layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SparseKind {
    /// DynaDiag: cyclic diagonals chosen by learned importance (see the module docs).
    Diag,
    /// Masked dense, magnitude prune + random regrow.
    Set,
    /// Masked dense, magnitude prune + gradient regrow.
    Rigl,
}

impl SparseKind {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            SparseKind::Diag => "diag",
            SparseKind::Set => "set",
            SparseKind::Rigl => "rigl",
        }
    }
}

fn d_candidates() -> f32 {
    2.0
}
fn d_update_every() -> usize {
    100
}
fn d_drop_fraction() -> f32 {
    0.3
}
fn d_stop() -> f32 {
    0.75
}
fn d_freeze() -> f32 {
    0.3
}
fn d_t0() -> f32 {
    5.0
}
fn d_t1() -> f32 {
    0.05
}
fn d_alpha_lr() -> f32 {
    1.0
}

/// A sparse linear layer's kind, sparsity and dynamic-sparse-training knobs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SparseSpec {
    /// Layer kind.
    pub kind: SparseKind,
    /// Fraction of zero weights, in `[0, 1)`.
    pub sparsity: f64,
    /// DynaDiag: candidate set size as a multiple of `K` (at least 1).
    #[serde(default = "d_candidates")]
    pub candidates: f32,
    /// Steps between pattern updates (`dT`).
    #[serde(default = "d_update_every")]
    pub update_every: usize,
    /// Initial drop fraction (cosine-decayed).
    #[serde(default = "d_drop_fraction")]
    pub drop_fraction: f32,
    /// SET / RigL: fraction of training after which the mask stays fixed.
    #[serde(default = "d_stop")]
    pub stop: f32,
    /// DynaDiag: fraction of training at which the diagonals are frozen (end of annealing).
    #[serde(default = "d_freeze")]
    pub freeze: f32,
    /// DynaDiag: initial temperature.
    #[serde(default = "d_t0")]
    pub t_start: f32,
    /// DynaDiag: final temperature.
    #[serde(default = "d_t1")]
    pub t_end: f32,
    /// DynaDiag: multiplier of the importance scores' gradient (their learning rate relative
    /// to the weights' under SGD).
    #[serde(default = "d_alpha_lr")]
    pub alpha_lr: f32,
}

impl SparseSpec {
    /// `kind` at `sparsity` with the default knobs.
    pub fn new(kind: SparseKind, sparsity: f64) -> Self {
        SparseSpec {
            kind,
            sparsity,
            candidates: d_candidates(),
            update_every: d_update_every(),
            drop_fraction: d_drop_fraction(),
            stop: d_stop(),
            freeze: d_freeze(),
            t_start: d_t0(),
            t_end: d_t1(),
            alpha_lr: d_alpha_lr(),
        }
    }

    /// Check the knobs; the message names the bad one.
    pub fn validate(&self) -> Result<(), SparseError> {
        if !(0.0..1.0).contains(&self.sparsity) {
            return Err(SparseError(format!("sparsity must be in [0, 1), got {}", self.sparsity)));
        }
        if !(self.candidates >= 1.0 && self.candidates.is_finite()) {
            return Err(SparseError(format!("candidates must be >= 1, got {}", self.candidates)));
        }
        if self.update_every == 0 {
            return Err(SparseError("update interval must be at least 1 step".to_string()));
        }
        if !(0.0..=1.0).contains(&self.drop_fraction) {
            return Err(SparseError(format!("drop fraction must be in [0, 1], got {}", self.drop_fraction)));
        }
        if !(0.0..=1.0).contains(&self.stop) || !(0.0..=1.0).contains(&self.freeze) {
            return Err(SparseError(format!(
                "stop and freeze must be in [0, 1], got {} and {}",
                self.stop, self.freeze
            )));
        }
        if !(self.t_start > 0.0 && self.t_end > 0.0 && self.t_start.is_finite()) {
            return Err(SparseError(format!("temperatures must be positive, got {} -> {}", self.t_start, self.t_end)));
        }
        if !(self.alpha_lr >= 0.0 && self.alpha_lr.is_finite()) {
            return Err(SparseError(format!("alpha learning-rate multiplier must be >= 0, got {}", self.alpha_lr)));
        }
        Ok(())
    }
}

/// Cosine from 1 at `t = 0` to 0 at `t >= span`.
fn cosine(t: usize, span: usize) -> f32 {
    let x = (t as f32 / span.max(1) as f32).min(1.0);
    0.5 * (1.0 + (std::f32::consts::PI * x).cos())
}

/// `ceil(frac * total)`, ignoring the rounding of `frac` to `f32` (0.3 of 200 is 60).
fn fraction_of(frac: f32, total: usize) -> usize {
    let x = frac as f64 * total as f64;
    (x - 1e-5 * x.max(1.0)).ceil().max(0.0) as usize
}

/// Zero the optimizer state of parameters `range`.
fn zero_state(opt: &mut Optimizer, r: std::ops::Range<usize>) {
    opt.m[r.clone()].fill(0.0);
    if !opt.v.is_empty() {
        opt.v[r].fill(0.0);
    }
}

/// Indices of the `r` largest `score`s (ties: lower index first), in no particular order.
fn top_r(mut idx: Vec<usize>, score: impl Fn(usize) -> f32, r: usize) -> Vec<usize> {
    let r = r.min(idx.len());
    if r == 0 {
        return Vec::new();
    }
    let cmp = |a: &usize, b: &usize| score(*b).total_cmp(&score(*a)).then(a.cmp(b));
    if r < idx.len() {
        idx.select_nth_unstable_by(r - 1, cmp);
        idx.truncate(r);
    }
    idx
}

/// Layer-level counts reported by [`crate::Model::sparse_layers`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SparseInfo {
    /// Layer name.
    pub name: String,
    /// `diag`, `set` or `rigl`.
    pub kind: &'static str,
    /// Weights the layer uses now (`C * D` in DynaDiag's soft phase, else `K * D`).
    pub nnz: usize,
    /// The budget `K * D`.
    pub target_nnz: usize,
    /// The most weights the layer ever uses (`C * D` for DynaDiag, `K * D` otherwise).
    pub candidates_nnz: usize,
    /// Dense size `out * in`.
    pub dense: usize,
}

/// DynaDiag diagonal-sparse linear layer (see the [module docs](self) for the rule).
#[derive(Clone, Debug)]
pub struct DiagLinear {
    /// Input features `n`.
    pub inp: usize,
    /// Output features `m`.
    pub out: usize,
    /// Active diagonals after the freeze, `K`.
    pub k: usize,
    /// Candidate rows, `C`.
    pub c: usize,
    /// Values `v[C][D]`.
    pub values: ParamId,
    /// Importance scores `alpha[C]`.
    pub alpha: ParamId,
    /// Bias.
    pub bias: Option<ParamId>,
    /// Buffer: offsets `[C]` as `f32` (`-1`: unused row).
    pub offsets: ParamId,
    /// Buffer: `[frozen (0/1), temperature]`.
    pub state: ParamId,
    /// Knobs.
    pub spec: SparseSpec,
    mat: DiagMatrix,
    frozen: bool,
    temp: f32,
    soft: Vec<f32>,
    a: Vec<f32>,
    ga: Vec<f32>,
    dveff: Vec<f32>,
}

impl DiagLinear {
    /// Register the tensors of an `out x inp` layer named `name` in `p` and draw its initial
    /// candidates (uniformly) and values (uniform, bound `1/sqrt(nnz / out)`).
    pub fn new(
        name: &str,
        inp: usize,
        out: usize,
        bias: bool,
        spec: SparseSpec,
        p: &mut ParamStore,
        rng: &mut Rng,
    ) -> Result<Self, SparseError> {
        spec.validate()?;
        let (d, pp) = (inp.min(out), inp.max(out));
        if d == 0 {
            return Err(SparseError("a diagonal layer needs at least one input and one output".to_string()));
        }
        let k = DiagMatrix::active_diagonals(out, inp, spec.sparsity);
        let c = ((spec.candidates * k as f32).ceil() as usize).clamp(k, pp);
        let mut all: Vec<usize> = (0..pp).collect();
        for i in 0..c {
            let j = i + rng.below(pp - i);
            all.swap(i, j);
        }
        let mut offs = all[..c].to_vec();
        offs.sort_unstable();
        let bound = 1.0 / ((k * d) as f32 / out as f32).max(1.0).sqrt();
        let values = p.add(format!("{name}.values"), vec![c, d], true, || (rng.uniform() * 2.0 - 1.0) * bound);
        let alpha = p.add(format!("{name}.alpha"), vec![c], false, || 0.0);
        let bias = bias.then(|| {
            let fan = inp as f32;
            p.add(format!("{name}.bias"), vec![out], false, || (rng.uniform() * 2.0 - 1.0) / fan.sqrt())
        });
        let offsets = p.add_buffer(format!("{name}.offsets"), vec![c], -1.0);
        for (i, &o) in offs.iter().enumerate() {
            p.buffers[offsets.offset + i] = o as f32;
        }
        let frozen = c == k;
        let state = p.add_buffer(format!("{name}.state"), vec![2], 0.0);
        p.buffers[state.offset] = if frozen { 1.0 } else { 0.0 };
        p.buffers[state.offset + 1] = spec.t_start;
        let mat = DiagMatrix::new(out, inp, offs, vec![0.0; c * d]).map_err(|e| SparseError(e.to_string()))?;
        Ok(DiagLinear {
            inp,
            out,
            k,
            c,
            values,
            alpha,
            bias,
            offsets,
            state,
            spec,
            mat,
            frozen,
            temp: spec.t_start,
            soft: vec![0.0; c],
            a: vec![1.0; c],
            ga: vec![0.0; c],
            dveff: vec![0.0; c * d],
        })
    }

    /// Diagonal length `D`.
    pub fn diag_len(&self) -> usize {
        self.inp.min(self.out)
    }

    /// Whether the diagonals are frozen (exactly `K` in use).
    pub fn frozen(&self) -> bool {
        self.frozen
    }

    /// Current temperature.
    pub fn temperature(&self) -> f32 {
        self.temp
    }

    /// Offsets of the diagonals in use (the `K` kept ones once frozen, else the candidates).
    pub fn active_offsets(&self) -> &[usize] {
        self.mat.offsets()
    }

    /// Weights in use now: `C * D` in the soft phase, exactly `K * D` once frozen.
    pub fn nnz(&self) -> usize {
        self.mat.nnz()
    }

    /// Counts for logging.
    pub fn info(&self, name: &str) -> SparseInfo {
        let d = self.diag_len();
        SparseInfo {
            name: name.to_string(),
            kind: "diag",
            nnz: self.nnz(),
            target_nnz: self.k * d,
            candidates_nnz: self.c * d,
            dense: self.inp * self.out,
        }
    }

    /// The effective dense weight `[out][in]` (soft weights applied), for tests and figures.
    pub fn dense_weight(&mut self, p: &ParamStore) -> Vec<f32> {
        self.load_values(p);
        self.mat.to_dense()
    }

    /// Rebuild the pattern from the buffers (after a checkpoint was loaded into `p`).
    pub fn sync(&mut self, p: &ParamStore) -> Result<(), SparseError> {
        let offs: Vec<usize> =
            p.buffers[self.offsets.range()].iter().take_while(|&&o| o >= 0.0).map(|&o| o as usize).collect();
        self.frozen = p.buffers[self.state.offset] != 0.0;
        self.temp = p.buffers[self.state.offset + 1];
        let want = if self.frozen { self.k } else { self.c };
        if offs.len() != want || self.temp.is_nan() || self.temp <= 0.0 {
            return Err(SparseError(format!("diagonal layer state holds {} offsets, expected {want}", offs.len())));
        }
        let d = self.diag_len();
        self.mat =
            DiagMatrix::new(self.out, self.inp, offs, vec![0.0; want * d]).map_err(|e| SparseError(e.to_string()))?;
        Ok(())
    }

    /// `s = softmax(alpha / T)`, `a = min(K s, 1)` (soft phase only).
    fn soft_weights(&mut self, p: &ParamStore) {
        let al = &p.data[self.alpha.range()];
        let t = self.temp;
        let mx = al.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x / t));
        let mut sum = 0.0f32;
        for (s, &x) in self.soft.iter_mut().zip(al) {
            *s = (x / t - mx).exp();
            sum += *s;
        }
        for (s, a) in self.soft.iter_mut().zip(self.a.iter_mut()) {
            *s /= sum;
            *a = (self.k as f32 * *s).min(1.0);
        }
    }

    /// Copy the (soft-weighted) values into the kernel's matrix.
    fn load_values(&mut self, p: &ParamStore) {
        let d = self.diag_len();
        let rows = self.mat.num_diagonals();
        let v = &p.data[self.values.range()][..rows * d];
        if self.frozen {
            self.mat.values_mut().copy_from_slice(v);
        } else {
            self.soft_weights(p);
            for ((dst, src), &a) in self.mat.values_mut().chunks_exact_mut(d).zip(v.chunks_exact(d)).zip(&self.a) {
                for (o, &x) in dst.iter_mut().zip(src) {
                    *o = a * x;
                }
            }
        }
    }

    /// Forward: `y[n][out] = x W^T + b`.
    pub fn forward(&mut self, n: usize, x: &[f32], y: &mut [f32], p: &ParamStore) {
        self.load_values(p);
        self.mat.forward(x, n, y);
        if let Some(b) = self.bias {
            let b = &p.data[b.range()];
            ew::add_bias_rows(&mut y[..n * self.out], b);
        }
    }

    /// Backward: `dx (+)= dy W`, gradients of values, importance scores and bias added.
    pub fn backward(&mut self, n: usize, x: &[f32], dy: &[f32], dx: &mut [f32], p: &mut ParamStore, add: bool) {
        self.mat.backward_input(dy, n, dx, add);
        let d = self.diag_len();
        let vr = self.values.range();
        if self.frozen {
            let g = &mut p.grad[vr][..self.k * d];
            self.mat.backward_values(x, dy, n, g);
        } else {
            self.dveff.fill(0.0);
            self.mat.backward_values(x, dy, n, &mut self.dveff);
            let (v, g) = (&p.data[vr.clone()], &mut p.grad[vr]);
            let kf = self.k as f32;
            // g_i: gradient w.r.t. a_i, zero where the clamp is active.
            let mut gs = 0.0f32;
            for i in 0..self.c {
                let (vi, dvi) = (&v[i * d..(i + 1) * d], &self.dveff[i * d..(i + 1) * d]);
                let mut ga = 0.0f32;
                for ((gv, &w), &dv) in g[i * d..(i + 1) * d].iter_mut().zip(vi).zip(dvi) {
                    *gv += self.a[i] * dv;
                    ga += w * dv;
                }
                let gi = if kf * self.soft[i] < 1.0 { ga } else { 0.0 };
                self.ga[i] = gi;
                gs += gi * self.soft[i];
            }
            let scale = self.spec.alpha_lr * kf / self.temp;
            for ((g, &s), &gi) in p.grad[self.alpha.range()].iter_mut().zip(&self.soft).zip(&self.ga) {
                *g += scale * s * (gi - gs);
            }
        }
        if let Some(b) = self.bias {
            let gb = &mut p.grad[b.range()];
            ew::bias_grad_rows(&dy[..n * self.out], gb);
        }
    }

    fn write_offsets(&self, p: &mut ParamStore) {
        let buf = &mut p.buffers[self.offsets.range()];
        buf.fill(-1.0);
        for (b, &o) in buf.iter_mut().zip(self.mat.offsets()) {
            *b = o as f32;
        }
        p.buffers[self.state.offset] = if self.frozen { 1.0 } else { 0.0 };
        p.buffers[self.state.offset + 1] = self.temp;
    }

    /// Pattern update after optimizer step `done` (1-based) of `total`; `x`, `dy` are the input
    /// and output gradient of the last batch (`n` rows).
    #[allow(clippy::too_many_arguments)]
    pub fn after_step(
        &mut self,
        done: usize,
        total: usize,
        n: usize,
        x: &[f32],
        dy: &[f32],
        p: &mut ParamStore,
        opt: &mut Optimizer,
        rng: &mut Rng,
    ) {
        if self.frozen {
            return;
        }
        let f = fraction_of(self.spec.freeze, total).max(1);
        let (t0, t1) = (self.spec.t_start, self.spec.t_end);
        self.temp = t1 + (t0 - t1) * cosine(done, f);
        if done >= f {
            self.freeze(p, opt);
        } else if done.is_multiple_of(self.spec.update_every) && self.c < self.inp.max(self.out) && n > 0 {
            self.refresh(done, f, n, x, dy, p, opt, rng);
        }
        self.write_offsets(p);
    }

    /// Candidate indices sorted by `alpha`, largest first (ties: lower row first).
    fn by_alpha(&self, p: &ParamStore) -> Vec<usize> {
        let al = &p.data[self.alpha.range()];
        let mut idx: Vec<usize> = (0..self.c).collect();
        idx.sort_by(|&a, &b| al[b].total_cmp(&al[a]).then(a.cmp(&b)));
        idx
    }

    #[allow(clippy::too_many_arguments)]
    fn refresh(
        &mut self,
        done: usize,
        f: usize,
        n: usize,
        x: &[f32],
        dy: &[f32],
        p: &mut ParamStore,
        opt: &mut Optimizer,
        rng: &mut Rng,
    ) {
        if self.spec.drop_fraction == 0.0 {
            return;
        }
        let d = self.diag_len();
        let pp = self.inp.max(self.out);
        let r = ((self.spec.drop_fraction * cosine(done, f) * (self.c - self.k) as f32).round() as usize)
            .max(1)
            .min(self.c - self.k);
        self.soft_weights(p);
        let order = self.by_alpha(p);
        let v = &p.data[self.values.range()];
        let strength: Vec<f32> =
            (0..self.c).map(|i| self.a[i] * v[i * d..(i + 1) * d].iter().map(|w| w * w).sum::<f32>().sqrt()).collect();
        let drop = top_r(order[self.k..].to_vec(), |i| -strength[i], r);
        // Sample non-candidates and score them by their would-be gradient norm.
        let mut used = vec![false; pp];
        for &o in self.mat.offsets() {
            used[o] = true;
        }
        let mut pool: Vec<usize> = (0..pp).filter(|&o| !used[o]).collect();
        let s = pool.len().min((4 * r).max(self.k));
        for i in 0..s {
            let j = i + rng.below(pool.len() - i);
            pool.swap(i, j);
        }
        pool.truncate(s);
        let probe = match DiagMatrix::new(self.out, self.inp, pool.clone(), vec![0.0; s * d]) {
            Ok(m) => m,
            Err(_) => return,
        };
        let mut g = vec![0.0f32; s * d];
        probe.backward_values(x, dy, n, &mut g);
        let score: Vec<f32> = g.chunks_exact(d).map(|c| c.iter().map(|w| w * w).sum::<f32>()).collect();
        let grow = top_r((0..s).collect(), |i| score[i], drop.len());
        let al = &p.data[self.alpha.range()];
        let kept_mean = {
            let kept: Vec<f32> = (0..self.c).filter(|i| !drop.contains(i)).map(|i| al[i]).collect();
            kept.iter().sum::<f32>() / kept.len().max(1) as f32
        };
        let mut offs = self.mat.offsets().to_vec();
        for (&row, &gi) in drop.iter().zip(&grow) {
            offs[row] = pool[gi];
            let vr = self.values.offset + row * d..self.values.offset + (row + 1) * d;
            p.data[vr.clone()].fill(0.0);
            zero_state(opt, vr);
            let ai = self.alpha.offset + row;
            p.data[ai] = kept_mean;
            zero_state(opt, ai..ai + 1);
        }
        if let Ok(m) = DiagMatrix::new(self.out, self.inp, offs, vec![0.0; self.c * d]) {
            self.mat = m;
        }
    }

    fn freeze(&mut self, p: &mut ParamStore, opt: &mut Optimizer) {
        let d = self.diag_len();
        self.soft_weights(p);
        let mut keep: Vec<usize> = self.by_alpha(p)[..self.k].to_vec();
        let offs_all = self.mat.offsets().to_vec();
        keep.sort_by_key(|&i| offs_all[i]);
        let vr = self.values.range();
        let old_v = p.data[vr.clone()].to_vec();
        let old_m = opt.m[vr.clone()].to_vec();
        let old_s = if opt.v.is_empty() { Vec::new() } else { opt.v[vr.clone()].to_vec() };
        p.data[vr.clone()].fill(0.0);
        zero_state(opt, vr.clone());
        for (row, &i) in keep.iter().enumerate() {
            let a = self.a[i];
            let (src, dst) = (i * d..(i + 1) * d, vr.start + row * d..vr.start + (row + 1) * d);
            for (o, &x) in p.data[dst.clone()].iter_mut().zip(&old_v[src.clone()]) {
                *o = a * x;
            }
            for (o, &x) in opt.m[dst.clone()].iter_mut().zip(&old_m[src.clone()]) {
                *o = a * x;
            }
            if !old_s.is_empty() {
                for (o, &x) in opt.v[dst].iter_mut().zip(&old_s[src]) {
                    *o = a * a * x;
                }
            }
        }
        zero_state(opt, self.alpha.range());
        let offs: Vec<usize> = keep.iter().map(|&i| offs_all[i]).collect();
        if let Ok(m) = DiagMatrix::new(self.out, self.inp, offs, vec![0.0; self.k * d]) {
            self.mat = m;
            self.frozen = true;
        }
    }
}

/// Masked dense linear layer for SET and RigL (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct MaskedLinear {
    /// Input features.
    pub inp: usize,
    /// Output features.
    pub out: usize,
    /// Active weights (`K * D` of the diagonal layer at the same sparsity).
    pub target_nnz: usize,
    /// Weight `[out][in]`, zero outside the mask.
    pub weight: ParamId,
    /// Bias.
    pub bias: Option<ParamId>,
    /// Buffer: 0/1 mask `[out][in]`.
    pub mask: ParamId,
    /// Knobs (`kind` is `Set` or `Rigl`).
    pub spec: SparseSpec,
    grad: Vec<f32>,
}

impl MaskedLinear {
    /// Register the tensors of an `out x inp` layer named `name` and draw a uniform random mask
    /// of exactly `K * D` ones; weights uniform with bound `1/sqrt(nnz / out)`.
    pub fn new(
        name: &str,
        inp: usize,
        out: usize,
        bias: bool,
        spec: SparseSpec,
        p: &mut ParamStore,
        rng: &mut Rng,
    ) -> Result<Self, SparseError> {
        spec.validate()?;
        if inp == 0 || out == 0 {
            return Err(SparseError("a masked layer needs at least one input and one output".to_string()));
        }
        let target_nnz = DiagMatrix::active_diagonals(out, inp, spec.sparsity) * inp.min(out);
        let bound = 1.0 / (target_nnz as f32 / out as f32).max(1.0).sqrt();
        let weight = p.add(format!("{name}.weight"), vec![out, inp], true, || (rng.uniform() * 2.0 - 1.0) * bound);
        let bias = bias.then(|| {
            let fan = inp as f32;
            p.add(format!("{name}.bias"), vec![out], false, || (rng.uniform() * 2.0 - 1.0) / fan.sqrt())
        });
        let mask = p.add_buffer(format!("{name}.mask"), vec![out, inp], 0.0);
        let total = out * inp;
        let mut all: Vec<usize> = (0..total).collect();
        for i in 0..target_nnz {
            let j = i + rng.below(total - i);
            all.swap(i, j);
            p.buffers[mask.offset + all[i]] = 1.0;
        }
        csr::apply_mask(&mut p.data[weight.range()], &p.buffers[mask.range()]);
        Ok(MaskedLinear { inp, out, target_nnz, weight, bias, mask, spec, grad: Vec::new() })
    }

    /// Ones in the mask (always [`Self::target_nnz`]).
    pub fn nnz(&self, p: &ParamStore) -> usize {
        p.buffers[self.mask.range()].iter().filter(|&&m| m != 0.0).count()
    }

    /// Counts for logging.
    pub fn info(&self, name: &str, p: &ParamStore) -> SparseInfo {
        SparseInfo {
            name: name.to_string(),
            kind: self.spec.kind.name(),
            nnz: self.nnz(p),
            target_nnz: self.target_nnz,
            candidates_nnz: self.target_nnz,
            dense: self.inp * self.out,
        }
    }

    /// Forward: `y = x (W * mask)^T + b` (the stored `W` is already zero off the mask).
    pub fn forward(&mut self, n: usize, x: &[f32], y: &mut [f32], p: &ParamStore) {
        let t = sbdnet_kernels::threads();
        csr::dense_forward(self.out, self.inp, &p.data[self.weight.range()], x, n, y, t);
        if let Some(b) = self.bias {
            let b = &p.data[b.range()];
            ew::add_bias_rows(&mut y[..n * self.out], b);
        }
    }

    /// Backward: `dx (+)= dy W`; the weight gradient is masked.
    pub fn backward(&mut self, n: usize, x: &[f32], dy: &[f32], dx: &mut [f32], p: &mut ParamStore, add: bool) {
        let t = sbdnet_kernels::threads();
        let wr = self.weight.range();
        csr::dense_backward_input(self.out, self.inp, &p.data[wr.clone()], dy, n, dx, add, t);
        let mask = &p.buffers[self.mask.range()];
        csr::dense_backward_weight(self.out, self.inp, x, dy, n, &mut p.grad[wr], true, Some(mask), t);
        if let Some(b) = self.bias {
            let gb = &mut p.grad[b.range()];
            ew::bias_grad_rows(&dy[..n * self.out], gb);
        }
    }

    /// Re-apply the mask, then prune and regrow every `dT` steps before the stop point.
    #[allow(clippy::too_many_arguments)]
    pub fn after_step(
        &mut self,
        done: usize,
        total: usize,
        n: usize,
        x: &[f32],
        dy: &[f32],
        p: &mut ParamStore,
        opt: &mut Optimizer,
        rng: &mut Rng,
    ) {
        let (wr, mr) = (self.weight.range(), self.mask.range());
        csr::apply_mask(&mut p.data[wr.clone()], &p.buffers[mr.clone()]);
        let stop = fraction_of(self.spec.stop, total);
        if !done.is_multiple_of(self.spec.update_every) || done >= stop || n == 0 {
            return;
        }
        let frac = self.spec.drop_fraction * cosine(done, stop);
        let r = (frac * self.target_nnz as f32).round() as usize;
        if r == 0 {
            return;
        }
        let total_w = self.inp * self.out;
        let (w0, m0) = (wr.start, mr.start);
        let active: Vec<usize> = (0..total_w).filter(|&i| p.buffers[m0 + i] != 0.0).collect();
        let r = r.min(active.len()).min(total_w - active.len());
        if r == 0 {
            return;
        }
        let drop = top_r(active, |i| -p.data[w0 + i].abs(), r);
        for &i in &drop {
            p.buffers[m0 + i] = 0.0;
            p.data[w0 + i] = 0.0;
            zero_state(opt, w0 + i..w0 + i + 1);
        }
        // Candidates for growth: every position inactive after the drop.
        let inactive: Vec<usize> = (0..total_w).filter(|&i| p.buffers[m0 + i] == 0.0).collect();
        let grow = match self.spec.kind {
            SparseKind::Rigl => {
                self.grad.resize(total_w, 0.0);
                let t = sbdnet_kernels::threads();
                csr::dense_backward_weight(self.out, self.inp, x, dy, n, &mut self.grad, false, None, t);
                let g = &self.grad;
                top_r(inactive, |i| g[i].abs(), r)
            }
            _ => {
                let mut pool = inactive;
                for i in 0..r {
                    let j = i + rng.below(pool.len() - i);
                    pool.swap(i, j);
                }
                pool.truncate(r);
                pool
            }
        };
        for &i in &grow {
            p.buffers[m0 + i] = 1.0;
            p.data[w0 + i] = 0.0;
            zero_state(opt, w0 + i..w0 + i + 1);
        }
    }
}
