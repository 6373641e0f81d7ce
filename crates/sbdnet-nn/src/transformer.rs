//! Vision-transformer layers: patch embedding, layer normalization, GELU and multi-head
//! self-attention, each with an explicit forward and backward over planned buffers.
//!
//! Tokens are stored like any other activation, NHWC: an image's `gh x gw` patch grid is an
//! activation of shape `(gh, gw, dim)`, so token `t` of image `b` is row `b * T + t` of a
//! `[n * T][dim]` matrix (`T = gh * gw`). A token-wise linear layer (qkv, proj, fc1, fc2) is
//! then an ordinary linear layer over `n * T` rows (see [`crate::Model`]), and mean pooling
//! over the tokens is the global average pool.
//!
//! Conventions as in [`crate::layers`]: forward writes its output entirely; backward adds
//! into parameter gradients and writes (`add == false`) or adds into the input gradient.
//!
//! ```
//! use sbdnet_nn::{Model, ModelConfig, Loss};
//! // A two-block ViT on 8x8 images: 4x4 patches (4 tokens), dim 8, 2 heads.
//! let cfg = ModelConfig::vit([8, 8, 1], 10, 4, 8, 2, 2, 4.0);
//! let mut model = Model::new(cfg, 2, 0).unwrap();
//! let stats = model.train_step(&vec![0.1; 2 * 64], &[1, 2], &Loss::default()).unwrap();
//! assert!(stats.loss.is_finite());
//! ```

use crate::model::Shape;
use crate::params::{ParamId, ParamStore};
use sbdnet_kernels::elementwise as ew;
use sbdnet_kernels::matmul::{sgemm, sgemm_ld, Trans};
use sbdnet_kernels::GradMode;

/// Patch embedding: cut each `H x W x C` image into non-overlapping `p x p` patches (row-major
/// grid `gh x gw`, each patch flattened in `(dy, dx, c)` order), project each to `dim`
/// features with a dense weight `[dim][p*p*C]` and a bias, and add a learned position
/// embedding `[T][dim]`. Output `(gh, gw, dim)`.
#[derive(Clone, Debug)]
pub struct PatchEmbed {
    /// Input shape per image.
    pub input: Shape,
    /// Patch side.
    pub patch: usize,
    /// Embedding width.
    pub dim: usize,
    /// Projection `[dim][p*p*C]`.
    pub weight: ParamId,
    /// Projection bias `[dim]`.
    pub bias: ParamId,
    /// Position embedding `[T][dim]`.
    pub pos: ParamId,
    col: Vec<f32>,
}

impl PatchEmbed {
    /// A patch embedding of `input` into `dim` features, its tensors already registered.
    pub fn new(input: Shape, patch: usize, dim: usize, weight: ParamId, bias: ParamId, pos: ParamId) -> Self {
        PatchEmbed { input, patch, dim, weight, bias, pos, col: Vec::new() }
    }

    /// Tokens per image.
    pub fn tokens(&self) -> usize {
        (self.input.h / self.patch) * (self.input.w / self.patch)
    }

    /// Floats per flattened patch.
    pub fn patch_len(&self) -> usize {
        self.patch * self.patch * self.input.c
    }

    /// Size the saved patch matrix for `cap` images.
    pub fn plan(&mut self, cap: usize) {
        self.col = vec![0.0; cap * self.tokens() * self.patch_len()];
    }

    /// Call `f(image offset, patch-matrix offset, length)` for every run of `p * C` contiguous
    /// floats a patch row takes from an image (`n` images).
    fn for_each_run(&self, n: usize, mut f: impl FnMut(usize, usize, usize)) {
        let (s, p) = (self.input, self.patch);
        let (gh, gw, pl) = (s.h / p, s.w / p, self.patch_len());
        let run = p * s.c;
        for b in 0..n {
            for ty in 0..gh {
                for tx in 0..gw {
                    let r = ((b * gh + ty) * gw + tx) * pl;
                    for dy in 0..p {
                        f(((b * s.h + ty * p + dy) * s.w + tx * p) * s.c, r + dy * run, run);
                    }
                }
            }
        }
    }

    /// Forward: `y[b, t] = W patch(b, t) + bias + pos[t]`; saves the patch matrix.
    pub fn forward(&mut self, n: usize, x: &[f32], y: &mut [f32], p: &ParamStore) {
        let (t, d, pl) = (self.tokens(), self.dim, self.patch_len());
        let mut col = std::mem::take(&mut self.col);
        self.for_each_run(n, |i, c, len| col[c..c + len].copy_from_slice(&x[i..i + len]));
        let th = sbdnet_kernels::threads();
        sgemm(n * t, d, pl, &col, Trans::No, &p.data[self.weight.range()], Trans::Yes, y, false, th);
        self.col = col;
        let (bias, pos) = (&p.data[self.bias.range()], &p.data[self.pos.range()]);
        for img in y[..n * t * d].chunks_exact_mut(t * d) {
            ew::add_assign(img, pos);
        }
        ew::add_bias_rows(&mut y[..n * t * d], bias);
    }

    /// Backward: weight, bias and position gradients added; the image gradient written or
    /// added unless `mode` is [`GradMode::Skip`] (the network input). Reuses the saved patch
    /// matrix as scratch, so it runs once per forward.
    pub fn backward(&mut self, n: usize, dy: &[f32], dx: &mut [f32], p: &mut ParamStore, mode: GradMode) {
        let (t, d, pl) = (self.tokens(), self.dim, self.patch_len());
        let rows = n * t;
        let th = sbdnet_kernels::threads();
        let dy = &dy[..rows * d];
        sgemm(d, pl, rows, dy, Trans::Yes, &self.col, Trans::No, &mut p.grad[self.weight.range()], true, th);
        ew::bias_grad_rows(dy, &mut p.grad[self.bias.range()]);
        let gpos = &mut p.grad[self.pos.range()];
        for img in dy.chunks_exact(t * d) {
            ew::add_assign(gpos, img);
        }
        if mode == GradMode::Skip {
            return;
        }
        let mut col = std::mem::take(&mut self.col);
        sgemm(rows, pl, d, dy, Trans::No, &p.data[self.weight.range()], Trans::No, &mut col, false, th);
        if !mode.adds() {
            dx[..n * self.input.len()].fill(0.0);
        }
        self.for_each_run(n, |i, c, len| ew::add_assign(&mut dx[i..i + len], &col[c..c + len]));
        self.col = col;
    }
}

/// Layer normalization over the channels of every token (row): `y = (x - mean) * rstd *
/// gamma + beta`, `rstd = 1 / sqrt(var + eps)` with the biased variance of the row.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// Channels per row.
    pub c: usize,
    /// Scale `gamma[c]`.
    pub gamma: ParamId,
    /// Shift `beta[c]`.
    pub beta: ParamId,
    /// Variance epsilon.
    pub eps: f32,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

impl LayerNorm {
    /// A layer norm over `c` channels with registered tensors; `eps = 1e-5`.
    pub fn new(c: usize, gamma: ParamId, beta: ParamId) -> Self {
        LayerNorm { c, gamma, beta, eps: 1e-5, mean: Vec::new(), rstd: Vec::new() }
    }

    /// Size the saved statistics for up to `rows` rows.
    pub fn plan(&mut self, rows: usize) {
        self.mean = vec![0.0; rows];
        self.rstd = vec![0.0; rows];
    }

    /// Forward over `x.len() / c` rows; saves each row's mean and `rstd`.
    pub fn forward(&mut self, x: &[f32], y: &mut [f32], p: &ParamStore) {
        let (g, b) = (&p.data[self.gamma.range()], &p.data[self.beta.range()]);
        ln_forward_rows(x, y, self.c, g, b, self.eps, &mut self.mean, &mut self.rstd);
    }

    /// Backward. With `xhat = (x - mean) rstd` and `g = dy * gamma` per row:
    /// `dgamma += dy xhat`, `dbeta += dy`, `dx = rstd (g - mean(g) - xhat mean(g xhat))`.
    pub fn backward(&mut self, x: &[f32], dy: &[f32], dx: &mut [f32], p: &mut ParamStore, add: bool) {
        let c = self.c;
        let (gr, br) = (self.gamma.range(), self.beta.range());
        let (pd, pg) = (&p.data, &mut p.grad);
        let gamma = &pd[gr.clone()];
        let (dgamma, dbeta) = {
            let (lo, hi) = pg.split_at_mut(gr.start.max(br.start));
            if gr.start < br.start {
                (&mut lo[gr.start..gr.end], &mut hi[..c])
            } else {
                (&mut hi[..c], &mut lo[br.start..br.end])
            }
        };
        ln_backward_rows(x, dy, dx, c, gamma, dgamma, dbeta, &self.mean, &self.rstd, add);
    }
}

/// The 8 partial sums of [`sum8`] folded in their fixed order.
#[inline(always)]
fn fold8(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// `sum f(x_i)` in 8 interleaved partial sums (element `i` into sum `i % 8`, folded in a
/// fixed order, then the tail), so the loop vectorizes and every build gives the same value.
#[inline(always)]
fn sum8(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut ch = x.chunks_exact(8);
    for c in &mut ch {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let mut s = fold8(acc);
    for &v in ch.remainder() {
        s += f(v);
    }
    s
}

sbdnet_kernels::simd_kernel! {
    /// [`LayerNorm::forward`] over the rows of `c` channels of `x`.
    fn ln_forward_rows(x: &[f32], y: &mut [f32], c: usize, g: &[f32], b: &[f32], eps: f32, mean: &mut [f32], rstd: &mut [f32]) {
        for (((xr, yr), m), r) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)).zip(mean.iter_mut()).zip(rstd.iter_mut()) {
            let mu = sum8(xr, |v| v) / c as f32;
            let var = sum8(xr, |v| (v - mu) * (v - mu)) / c as f32;
            let rs = 1.0 / (var + eps).sqrt();
            for (((o, &v), &gg), &bb) in yr.iter_mut().zip(xr).zip(g).zip(b) {
                *o = (v - mu) * rs * gg + bb;
            }
            (*m, *r) = (mu, rs);
        }
    }
}

sbdnet_kernels::simd_kernel! {
    /// [`LayerNorm::backward`] over the rows of `c` channels.
    fn ln_backward_rows(
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        c: usize,
        gamma: &[f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
        mean: &[f32],
        rstd: &[f32],
        add: bool,
    ) {
        let (gamma, dgamma, dbeta) = (&gamma[..c], &mut dgamma[..c], &mut dbeta[..c]);
        for ((((xr, dyr), dxr), &mu), &rs) in x.chunks_exact(c).zip(dy.chunks_exact(c)).zip(dx.chunks_exact_mut(c)).zip(mean).zip(rstd) {
            // One pass: the parameter gradients and the row's two sums in 8 partial sums each
            // (folded by `fold8`, as in `sum8`).
            let (mut sg, mut sgx) = ([0f32; 8], [0f32; 8]);
            let (mut tg, mut tgx) = (0f32, 0f32);
            let whole = c - c % 8;
            let it = xr[..whole].chunks_exact(8).zip(dyr[..whole].chunks_exact(8)).zip(gamma[..whole].chunks_exact(8));
            for ((((xv, dv), gv), dgv), dbv) in
                it.zip(dgamma[..whole].chunks_exact_mut(8)).zip(dbeta[..whole].chunks_exact_mut(8))
            {
                for l in 0..8 {
                    let (xh, d) = ((xv[l] - mu) * rs, dv[l]);
                    dgv[l] += d * xh;
                    dbv[l] += d;
                    let g = d * gv[l];
                    sg[l] += g;
                    sgx[l] += g * xh;
                }
            }
            for i in whole..c {
                let (xh, d) = ((xr[i] - mu) * rs, dyr[i]);
                dgamma[i] += d * xh;
                dbeta[i] += d;
                let g = d * gamma[i];
                tg += g;
                tgx += g * xh;
            }
            let (mg, mgx) = ((fold8(sg) + tg) / c as f32, (fold8(sgx) + tgx) / c as f32);
            for (((o, &v), &d), &gm) in dxr.iter_mut().zip(xr).zip(dyr).zip(gamma) {
                let xh = (v - mu) * rs;
                let val = rs * (d * gm - mg - xh * mgx);
                *o = if add { *o + val } else { val };
            }
        }
    }
}

const GELU_K: f32 = 0.797_884_6; // sqrt(2 / pi)
const GELU_C: f32 = 0.044_715;

/// `exp(x)` for `x` in `[-80, 80]` (clamped), relative error below `1e-5` (below `1e-6` for
/// `|x| < 10`; the rounding of `x log2 e` dominates), branch-free so that
/// loops over it vectorize: `exp(x) = 2^n 2^f` with `n = round(x log2 e)`, `|f| <= 1/2`, and
/// `2^f = e^(f ln 2)` by its Taylor series to degree 6 (remainder below `0.35^7 / 7! < 2e-7`).
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer.
                                     // Clamp by compare-selects: a NaN `x` becomes -80 (finite, so the conversion below is
                                     // defined; callers that multiply by `x` still return NaN).
    let x = if x > -80.0 { x } else { -80.0 };
    let x = if x < 80.0 { x } else { 80.0 };
    let y = x * std::f32::consts::LOG2_E;
    let n = (y + MAGIC) - MAGIC;
    let g = (y - n) * std::f32::consts::LN_2;
    let p = 1.0 + g * (1.0 + g * (0.5 + g * (1.0 / 6.0 + g * (1.0 / 24.0 + g * (1.0 / 120.0 + g * (1.0 / 720.0))))));
    // SAFETY: `n` is an integer within [-116, 116] (from the clamp, which also removes NaN),
    // so the unchecked conversion is exact (and, unlike the saturating `as`, one vector
    // instruction).
    let n = unsafe { n.to_int_unchecked::<i32>() };
    p * f32::from_bits(((n + 127) << 23) as u32)
}

/// `tanh(u) = 1 - 2 / (exp(2u) + 1)` with [`fast_exp`]: absolute error below `1e-6` (GELU
/// uses `1 + tanh`, so absolute accuracy is what matters).
#[inline(always)]
fn fast_tanh(u: f32) -> f32 {
    1.0 - 2.0 / (fast_exp(2.0 * u) + 1.0)
}

/// Elements per parallel chunk of the GELU passes (below two chunks they run on the calling
/// thread).
const GELU_CHUNK: usize = 1 << 15;

/// GELU, tanh form: `y = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, in chunks across
/// threads (compiled for AVX2 where the process runs it: the same IEEE operations, no
/// contraction into fused multiply-adds, so the same values either way).
pub fn gelu_forward(x: &[f32], y: &mut [f32]) {
    use rayon::prelude::*;
    let y = &mut y[..x.len()];
    if x.len() < 2 * GELU_CHUNK {
        return gelu_forward_chunk(x, y);
    }
    y.par_chunks_mut(GELU_CHUNK).zip(x.par_chunks(GELU_CHUNK)).for_each(|(y, x)| gelu_forward_chunk(x, y));
}

/// GELU backward from the input (see [`gelu_grad`]); writes or adds into `dx`, in chunks
/// across threads.
pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32], add: bool) {
    use rayon::prelude::*;
    let (dy, dx) = (&dy[..x.len()], &mut dx[..x.len()]);
    if x.len() < 2 * GELU_CHUNK {
        return gelu_backward_chunk(x, dy, dx, add);
    }
    dx.par_chunks_mut(GELU_CHUNK)
        .zip(x.par_chunks(GELU_CHUNK).zip(dy.par_chunks(GELU_CHUNK)))
        .for_each(|(dx, (x, dy))| gelu_backward_chunk(x, dy, dx, add));
}

sbdnet_kernels::simd_kernel! {
    /// One chunk of [`gelu_forward`].
    fn gelu_forward_chunk(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            let u = GELU_K * (v + GELU_C * v * v * v);
            *o = 0.5 * v * (1.0 + fast_tanh(u));
        }
    }
}

/// GELU's derivative at `v`: `(1 + t)/2 + x/2 (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)`
/// with `t = tanh(u)`.
#[inline(always)]
fn gelu_grad(v: f32) -> f32 {
    let t = fast_tanh(GELU_K * (v + GELU_C * v * v * v));
    0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_C * v * v)
}

sbdnet_kernels::simd_kernel! {
    /// One chunk of [`gelu_backward`].
    fn gelu_backward_chunk(x: &[f32], dy: &[f32], dx: &mut [f32], add: bool) {
        if add {
            for ((o, &v), &d) in dx.iter_mut().zip(x).zip(dy) {
                *o += d * gelu_grad(v);
            }
        } else {
            for ((o, &v), &d) in dx.iter_mut().zip(x).zip(dy) {
                *o = d * gelu_grad(v);
            }
        }
    }
}

/// Multi-head self-attention core (the qkv and output projections are separate linear
/// layers). Input per image: `T` tokens of `3 * dim` features laid out `[q | k | v]`, each
/// split into `heads` heads of `hd = dim / heads` features; output `T x dim` with head `h` in
/// columns `h*hd .. (h+1)*hd`. For each image and head:
///
/// `S = Q K^T / sqrt(hd)`, `P = softmax_rows(S)`, `O = P V`.
///
/// Backward: `dV = P^T dO`, `dP = dO V^T`, `dS = P * (dP - rowsum(dP * P)) / sqrt(hd)`,
/// `dQ = dS K`, `dK = dS^T Q`. `P` is saved (`[n][heads][T][T]`); images run in parallel.
#[derive(Clone, Debug)]
pub struct Attention {
    /// Tokens per image `T`.
    pub tokens: usize,
    /// Model width `dim`.
    pub dim: usize,
    /// Heads.
    pub heads: usize,
    probs: Vec<f32>,
    dprobs: Vec<f32>,
}

impl Attention {
    /// Attention over `tokens` tokens of width `dim` with `heads` heads (`dim % heads == 0`).
    pub fn new(tokens: usize, dim: usize, heads: usize) -> Self {
        Attention { tokens, dim, heads, probs: Vec::new(), dprobs: Vec::new() }
    }

    /// Size the saved probabilities and their gradient for `cap` images.
    pub fn plan(&mut self, cap: usize) {
        let len = cap * self.heads * self.tokens * self.tokens;
        self.probs = vec![0.0; len];
        self.dprobs = vec![0.0; len];
    }

    fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    fn forward_image(&self, qkv: &[f32], out: &mut [f32], probs: &mut [f32]) {
        let (t, d, hd) = (self.tokens, self.dim, self.head_dim());
        let scale = 1.0 / (hd as f32).sqrt();
        for (h, pr) in probs.chunks_exact_mut(t * t).enumerate() {
            let (q, k, v) = (&qkv[h * hd..], &qkv[d + h * hd..], &qkv[2 * d + h * hd..]);
            sgemm_ld(t, t, hd, q, Trans::No, 3 * d, k, Trans::Yes, 3 * d, pr, t, false);
            for row in pr.chunks_exact_mut(t) {
                let mx = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                let mut sum = 0.0f32;
                for s in row.iter_mut() {
                    *s = ((*s - mx) * scale).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|s| *s *= inv);
            }
            sgemm_ld(t, hd, t, pr, Trans::No, t, v, Trans::No, 3 * d, &mut out[h * hd..], d, false);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_image(
        &self,
        qkv: &[f32],
        dout: &[f32],
        dqkv: &mut [f32],
        probs: &[f32],
        dprobs: &mut [f32],
        add: bool,
    ) {
        let (t, d, hd) = (self.tokens, self.dim, self.head_dim());
        let scale = 1.0 / (hd as f32).sqrt();
        for (h, (pr, dp)) in probs.chunks_exact(t * t).zip(dprobs.chunks_exact_mut(t * t)).enumerate() {
            let (q, k, v) = (&qkv[h * hd..], &qkv[d + h * hd..], &qkv[2 * d + h * hd..]);
            let dout = &dout[h * hd..];
            // dV = P^T dO
            sgemm_ld(t, hd, t, pr, Trans::Yes, t, dout, Trans::No, d, &mut dqkv[2 * d + h * hd..], 3 * d, add);
            // dP = dO V^T, then dS in place.
            sgemm_ld(t, t, hd, dout, Trans::No, d, v, Trans::Yes, 3 * d, dp, t, false);
            for (dr, pr) in dp.chunks_exact_mut(t).zip(pr.chunks_exact(t)) {
                let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                for (g, &pv) in dr.iter_mut().zip(pr) {
                    *g = pv * (*g - dot) * scale;
                }
            }
            // dQ = dS K, dK = dS^T Q
            sgemm_ld(t, hd, t, dp, Trans::No, t, k, Trans::No, 3 * d, &mut dqkv[h * hd..], 3 * d, add);
            sgemm_ld(t, hd, t, dp, Trans::Yes, t, q, Trans::No, 3 * d, &mut dqkv[d + h * hd..], 3 * d, add);
        }
    }

    /// Forward for `n` images: `qkv` is `[n][T][3 dim]`, `y` is `[n][T][dim]`.
    pub fn forward(&mut self, n: usize, qkv: &[f32], y: &mut [f32]) {
        use rayon::prelude::*;
        let (t, d) = (self.tokens, self.dim);
        let pl = self.heads * t * t;
        let mut probs = std::mem::take(&mut self.probs);
        let this = &*self;
        qkv[..n * t * 3 * d]
            .par_chunks_exact(t * 3 * d)
            .zip(y[..n * t * d].par_chunks_exact_mut(t * d))
            .zip(probs[..n * pl].par_chunks_exact_mut(pl))
            .for_each(|((x, o), pr)| this.forward_image(x, o, pr));
        self.probs = probs;
    }

    /// Backward for the `n` images of the last forward: writes (`add == false`) or adds the
    /// gradient of `qkv` into `dqkv`.
    pub fn backward(&mut self, n: usize, qkv: &[f32], dy: &[f32], dqkv: &mut [f32], add: bool) {
        use rayon::prelude::*;
        let (t, d) = (self.tokens, self.dim);
        let pl = self.heads * t * t;
        let mut dprobs = std::mem::take(&mut self.dprobs);
        let this = &*self;
        qkv[..n * t * 3 * d]
            .par_chunks_exact(t * 3 * d)
            .zip(dy[..n * t * d].par_chunks_exact(t * d))
            .zip(dqkv[..n * t * 3 * d].par_chunks_exact_mut(t * 3 * d))
            .zip(this.probs[..n * pl].par_chunks_exact(pl))
            .zip(dprobs[..n * pl].par_chunks_exact_mut(pl))
            .for_each(|((((x, g), dx), pr), dp)| this.backward_image(x, g, dx, pr, dp, add));
        self.dprobs = dprobs;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_and_tanh_match_std() {
        let mut x = -90.0f32;
        while x < 90.0 {
            let (e, want) = (fast_exp(x), (x.clamp(-80.0, 80.0) as f64).exp());
            let tol = if x.abs() < 10.0 { 1e-6 } else { 1e-5 };
            assert!(((e as f64 - want) / want).abs() < tol, "exp({x}) = {e}, want {want}");
            let t = fast_tanh(x);
            assert!((t as f64 - (x as f64).tanh()).abs() < 1e-6, "tanh({x}) = {t}");
            x += 0.0137;
        }
    }

    /// The LayerNorm row kernels against the formulas in `f64`, for widths with and without
    /// a tail past the 8-lane sums, in write and add modes.
    #[test]
    fn layer_norm_rows_match_f64() {
        for c in [13usize, 16, 192] {
            let rows = 5;
            let x: Vec<f32> = (0..rows * c).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.03).collect();
            let dy: Vec<f32> = (0..rows * c).map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.01).collect();
            let g: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.01).collect();
            let b: Vec<f32> = (0..c).map(|i| i as f32 * -0.02).collect();
            let (mut y, mut mean, mut rstd) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
            ln_forward_rows(&x, &mut y, c, &g, &b, 1e-5, &mut mean, &mut rstd);
            let (mut dg, mut db, mut dx) = (vec![0.0; c], vec![0.0; c], vec![1.0; rows * c]);
            ln_backward_rows(&x, &dy, &mut dx, c, &g, &mut dg, &mut db, &mean, &rstd, true);
            let (mut wdg, mut wdb) = (vec![0f64; c], vec![0f64; c]);
            for r in 0..rows {
                let (xr, dyr) = (&x[r * c..][..c], &dy[r * c..][..c]);
                let mu = xr.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
                let var = xr.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / c as f64;
                let rs = 1.0 / (var + 1e-5).sqrt();
                let xh: Vec<f64> = xr.iter().map(|&v| (v as f64 - mu) * rs).collect();
                let gg: Vec<f64> = (0..c).map(|i| dyr[i] as f64 * g[i] as f64).collect();
                let (mg, mgx) =
                    (gg.iter().sum::<f64>() / c as f64, gg.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / c as f64);
                for i in 0..c {
                    let want = xh[i] * g[i] as f64 + b[i] as f64;
                    assert!((y[r * c + i] as f64 - want).abs() < 1e-5, "c {c} y[{r}][{i}]");
                    let want = 1.0 + rs * (gg[i] - mg - xh[i] * mgx);
                    assert!((dx[r * c + i] as f64 - want).abs() < 1e-4, "c {c} dx[{r}][{i}]");
                    wdg[i] += dyr[i] as f64 * xh[i];
                    wdb[i] += dyr[i] as f64;
                }
            }
            for i in 0..c {
                assert!(
                    (dg[i] as f64 - wdg[i]).abs() < 1e-4 && (db[i] as f64 - wdb[i]).abs() < 1e-4,
                    "c {c} dgamma/dbeta[{i}]"
                );
            }
        }
    }

    /// The dispatched (AVX2 where available) GELU and its gradient against the formula in
    /// `f64` with the standard `tanh`, over whole vectors and a ragged tail, in both write
    /// and add modes.
    #[test]
    fn gelu_kernels_match_the_formula() {
        // Longer than two parallel chunks, with a ragged last chunk.
        let x: Vec<f32> = (0..2 * GELU_CHUNK + 1003).map(|i| ((i % 1003) as f32 - 501.0) * 0.0173).collect();
        let dy: Vec<f32> = (0..x.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let k = (2.0 / std::f64::consts::PI).sqrt();
        let mut y = vec![0.0; x.len()];
        gelu_forward(&x, &mut y);
        let (mut dx, mut dxa) = (vec![f32::NAN; x.len()], vec![1.0; x.len()]);
        gelu_backward(&x, &dy, &mut dx, false);
        gelu_backward(&x, &dy, &mut dxa, true);
        for i in 0..x.len() {
            let v = x[i] as f64;
            let t = (k * (v + 0.044715 * v * v * v)).tanh();
            let g = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * v * v);
            assert!((y[i] as f64 - 0.5 * v * (1.0 + t)).abs() < 1e-5, "gelu({v}) = {}", y[i]);
            assert!((dx[i] as f64 - dy[i] as f64 * g).abs() < 1e-5, "gelu'({v})");
            assert!((dxa[i] as f64 - 1.0 - dy[i] as f64 * g).abs() < 1e-5, "gelu'({v}), add");
        }
        // NaN and infinities: NaN stays NaN (a diverging run is still caught), infinities
        // saturate, and `fast_exp` never converts a NaN to an integer.
        assert!(fast_exp(f32::NAN).is_finite() && fast_exp(f32::INFINITY) == fast_exp(80.0));
        let x = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
        let mut y = [0.0; 3];
        gelu_forward(&x, &mut y);
        assert!(y[0].is_nan() && y[1] == f32::INFINITY, "{y:?}");
    }
}
