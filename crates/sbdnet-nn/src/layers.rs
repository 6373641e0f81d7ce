//! The layers: each a plain struct with `forward` and `backward` over planned buffers.
//!
//! Conventions (all NHWC, `n` images of a batch capacity planned by the model):
//! - `forward(n, x, y, ..)` writes `y` entirely; what backward needs is either the input `x`
//!   and output `y` (kept by the model) or saved here in buffers planned by `plan`;
//! - `backward(n, x, y, dy, dx, ..)` *adds* into `dx` and into the parameter gradients.

use crate::model::Shape;
use crate::params::{ParamId, ParamStore};
use crate::quant::WeightBinarizer;
use sbdnet_kernels::conv::{self, ConvGeom};
use sbdnet_kernels::elementwise as ew;
use sbdnet_kernels::matmul::{sgemm, Trans};
use sbdnet_kernels::pool::{self as kpool, PoolGeom};
use sbdnet_kernels::rng::Rng;
use sbdnet_kernels::GradMode;

/// 2-D convolution (no bias): kernel `k x k`, stride, zero padding, groups. Weights OHWI
/// `[cout][k][k][cin/groups]`.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// Input shape per image.
    pub input: Shape,
    /// Output channels.
    pub cout: usize,
    /// Kernel size.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Padding.
    pub pad: usize,
    /// Groups.
    pub groups: usize,
    /// The weight tensor (latent weights when binarized).
    pub weight: ParamId,
    /// Binary weights (`Wb = alpha * sign(W)`), when the layer is binarized.
    pub bin: Option<WeightBinarizer>,
    col: Vec<f32>,
    scratch: Vec<f32>,
}

impl Conv2d {
    /// A convolution reading `input`, its weight already registered.
    pub fn new(input: Shape, cout: usize, k: usize, stride: usize, pad: usize, groups: usize, weight: ParamId) -> Self {
        Conv2d { input, cout, k, stride, pad, groups, weight, bin: None, col: Vec::new(), scratch: Vec::new() }
    }

    /// Geometry for `n` images.
    pub fn geom(&self, n: usize) -> ConvGeom {
        let s = self.input;
        ConvGeom::new(n, s.h, s.w, s.c, self.cout, self.k, self.stride, self.pad, self.groups)
            .expect("geometry validated when the model was built")
    }

    /// Size the saved im2col matrix and scratch for `cap` images.
    pub fn plan(&mut self, cap: usize) {
        let g = self.geom(cap);
        self.col = vec![0.0; g.col_len()];
        self.scratch = vec![0.0; g.scratch_len(sbdnet_kernels::threads())];
    }

    fn ensure_scratch(&mut self, g: &ConvGeom) {
        let need = g.scratch_len(sbdnet_kernels::threads());
        if self.scratch.len() < need {
            // Only when the thread count grew after planning.
            self.scratch.resize(need, 0.0);
        }
    }

    /// Forward.
    pub fn forward(&mut self, n: usize, x: &[f32], y: &mut [f32], p: &ParamStore) {
        let g = self.geom(n);
        self.ensure_scratch(&g);
        let w = &p.data[self.weight.range()];
        let w = WeightBinarizer::forward_weights(&mut self.bin, w, &p.buffers);
        conv::conv2d_forward(&g, x, w, y, &mut self.col, &mut self.scratch);
    }

    /// Backward.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&mut self, n: usize, x: &[f32], dy: &[f32], dx: &mut [f32], p: &mut ParamStore, mode: GradMode) {
        let g = self.geom(n);
        self.ensure_scratch(&g);
        let r = self.weight.range();
        match self.bin.as_mut() {
            Some(b) => {
                b.dwb.fill(0.0);
                conv::conv2d_backward(&g, x, &b.wb, dy, dx, &mut b.dwb, &self.col, &mut self.scratch, mode);
                b.backward(&p.data[r.clone()], &mut p.grad[r], &p.buffers);
            }
            None => {
                let (w, dw) = (&p.data[r.clone()], &mut p.grad[r]);
                conv::conv2d_backward(&g, x, w, dy, dx, dw, &self.col, &mut self.scratch, mode);
            }
        }
    }
}

/// Batch normalization over NHWC channels: batch statistics in training (running statistics
/// updated with `momentum`), running statistics in evaluation.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    /// Channels.
    pub c: usize,
    /// Scale `gamma`.
    pub gamma: ParamId,
    /// Shift `beta`.
    pub beta: ParamId,
    /// Running mean (buffer).
    pub running_mean: ParamId,
    /// Running variance (buffer, unbiased).
    pub running_var: ParamId,
    /// Running-statistics momentum (PyTorch convention: `new = (1-m) old + m batch`).
    pub momentum: f32,
    /// While `Some(k)`, running statistics are a plain average over the batches seen since
    /// re-estimation started (`k` so far) instead of an exponential one; see
    /// [`crate::Model::set_bn_recalibration`].
    pub cumulative: Option<u32>,
    /// Variance epsilon.
    pub eps: f32,
    /// Fuse a ReLU into the output (`y = max(bn(x), 0)`).
    pub relu: bool,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    scale: Vec<f32>,
    shift: Vec<f32>,
    k1: Vec<f32>,
    k2: Vec<f32>,
    k3: Vec<f32>,
    s1: Vec<f64>,
    s2: Vec<f64>,
    scratch: Vec<f32>,
}

impl BatchNorm2d {
    /// A batch norm over `c` channels with registered tensors.
    pub fn new(c: usize, gamma: ParamId, beta: ParamId, running_mean: ParamId, running_var: ParamId) -> Self {
        BatchNorm2d {
            c,
            gamma,
            beta,
            running_mean,
            running_var,
            momentum: 0.1,
            cumulative: None,
            eps: 1e-5,
            relu: false,
            mean: vec![0.0; c],
            rstd: vec![0.0; c],
            scale: vec![0.0; c],
            shift: vec![0.0; c],
            k1: vec![0.0; c],
            k2: vec![0.0; c],
            k3: vec![0.0; c],
            s1: vec![0.0; c],
            s2: vec![0.0; c],
            scratch: Vec::new(),
        }
    }

    /// Size the reduction scratch for `rows` pixels.
    pub fn plan(&mut self, rows: usize) {
        self.scratch = vec![0.0; ew::channel_sums_scratch_len(rows, self.c)];
    }

    /// Forward over `rows = n*H*W` pixels.
    pub fn forward(&mut self, x: &[f32], y: &mut [f32], p: &mut ParamStore, train: bool) {
        let c = self.c;
        let rows = x.len() / c;
        let rm = self.running_mean.range();
        let rv = self.running_var.range();
        if train {
            ew::channel_sums(x, c, &p.buffers[rm.clone()], &mut self.s1, &mut self.s2, &mut self.scratch);
            let m = match self.cumulative.as_mut() {
                Some(k) => {
                    *k += 1;
                    1.0 / *k as f32
                }
                None => self.momentum,
            };
            let unbias = if rows > 1 { rows as f32 / (rows - 1) as f32 } else { 1.0 };
            for ch in 0..c {
                let shift = p.buffers[rm.start + ch] as f64;
                let mean = self.s1[ch] / rows as f64;
                let var = (self.s2[ch] / rows as f64 - (mean - shift) * (mean - shift)).max(0.0);
                self.mean[ch] = mean as f32;
                self.rstd[ch] = (1.0 / (var + self.eps as f64).sqrt()) as f32;
                let rmv = &mut p.buffers[rm.start + ch];
                *rmv = (1.0 - m) * *rmv + m * mean as f32;
                let rvv = &mut p.buffers[rv.start + ch];
                *rvv = (1.0 - m) * *rvv + m * var as f32 * unbias;
            }
        } else {
            for ch in 0..c {
                self.mean[ch] = p.buffers[rm.start + ch];
                self.rstd[ch] = 1.0 / (p.buffers[rv.start + ch] + self.eps).sqrt();
            }
        }
        let (g, b) = (&p.data[self.gamma.range()], &p.data[self.beta.range()]);
        for ch in 0..c {
            self.scale[ch] = g[ch] * self.rstd[ch];
            self.shift[ch] = b[ch] - self.mean[ch] * self.scale[ch];
        }
        ew::channel_affine(x, y, c, &self.scale, &self.shift, self.relu);
    }

    /// Backward (training mode). With a fused ReLU, the incoming gradient is masked by
    /// `x * scale + shift > 0`, recomputed from the input with the forward's own affine, so
    /// the output is not read again.
    ///
    /// With `xhat = (x - mean) * rstd`, `N` rows:
    /// `dbeta = sum dy`, `dgamma = sum dy * xhat`,
    /// `dx = gamma * rstd / N * (N dy - dbeta - xhat dgamma)`, computed as
    /// `dx += k1 dy + k2 x + k3` with `k1 = gamma rstd`, `k2 = -k1 rstd dgamma / N`,
    /// `k3 = -k1 dbeta / N - k2 mean`.
    pub fn backward(&mut self, x: &[f32], dy: &[f32], dx: &mut [f32], p: &mut ParamStore, add: bool) {
        let c = self.c;
        let mask = self.relu.then_some((&self.scale[..], &self.shift[..]));
        let rows = (x.len() / c) as f32;
        ew::channel_dot_sums(dy, x, mask, c, &self.mean, &mut self.s1, &mut self.s2, &mut self.scratch);
        let (gr, br) = (self.gamma.range(), self.beta.range());
        for ch in 0..c {
            let dbeta = self.s1[ch] as f32;
            let dgamma = self.s2[ch] as f32 * self.rstd[ch];
            p.grad[gr.start + ch] += dgamma;
            p.grad[br.start + ch] += dbeta;
            let k1 = p.data[gr.start + ch] * self.rstd[ch];
            let k2 = -k1 * self.rstd[ch] * dgamma / rows;
            self.k1[ch] = k1;
            self.k2[ch] = k2;
            self.k3[ch] = -k1 * dbeta / rows - k2 * self.mean[ch];
        }
        ew::channel_grad_combine(dy, x, mask, dx, c, [&self.k1, &self.k2, &self.k3], add);
    }
}

/// Fully connected: `y = x W^T + b`, `W` is `[out][in]`.
#[derive(Clone, Debug)]
pub struct Linear {
    /// Input features.
    pub inp: usize,
    /// Output features.
    pub out: usize,
    /// Weight.
    pub weight: ParamId,
    /// Bias.
    pub bias: Option<ParamId>,
    /// Binary weights, when the classifier is binarized too.
    pub bin: Option<WeightBinarizer>,
}

impl Linear {
    /// Forward.
    pub fn forward(&mut self, n: usize, x: &[f32], y: &mut [f32], p: &ParamStore) {
        let t = sbdnet_kernels::threads();
        let w = &p.data[self.weight.range()];
        let w = WeightBinarizer::forward_weights(&mut self.bin, w, &p.buffers);
        sgemm(n, self.out, self.inp, x, Trans::No, w, Trans::Yes, y, false, t);
        if let Some(b) = self.bias {
            let b = &p.data[b.range()];
            ew::add_bias_rows(&mut y[..n * self.out], b);
        }
    }

    /// Backward.
    pub fn backward(&mut self, n: usize, x: &[f32], dy: &[f32], dx: &mut [f32], p: &mut ParamStore, add: bool) {
        let t = sbdnet_kernels::threads();
        let wr = self.weight.range();
        match self.bin.as_mut() {
            Some(b) => {
                sgemm(n, self.inp, self.out, dy, Trans::No, &b.wb, Trans::No, dx, add, t);
                sgemm(self.out, self.inp, n, dy, Trans::Yes, x, Trans::No, &mut b.dwb, false, t);
                b.backward(&p.data[wr.clone()], &mut p.grad[wr], &p.buffers);
            }
            None => {
                sgemm(n, self.inp, self.out, dy, Trans::No, &p.data[wr.clone()], Trans::No, dx, add, t);
                sgemm(self.out, self.inp, n, dy, Trans::Yes, x, Trans::No, &mut p.grad[wr], true, t);
            }
        }
        if let Some(b) = self.bias {
            let gb = &mut p.grad[b.range()];
            ew::bias_grad_rows(&dy[..n * self.out], gb);
        }
    }
}

/// Pooling layer state.
#[derive(Clone, Debug)]
pub struct Pool {
    /// Input shape.
    pub input: Shape,
    /// Window.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Max (true) or average.
    pub max: bool,
    arg: Vec<u32>,
}

impl Pool {
    /// A pooling layer.
    pub fn new(input: Shape, k: usize, stride: usize, max: bool) -> Self {
        Pool { input, k, stride, max, arg: Vec::new() }
    }
    fn geom(&self, n: usize) -> PoolGeom {
        PoolGeom { batch: n, h: self.input.h, w: self.input.w, c: self.input.c, k: self.k, stride: self.stride }
    }
    /// Size the argmax buffer.
    pub fn plan(&mut self, cap: usize) {
        if self.max {
            self.arg = vec![0; self.geom(cap).out_len()];
        }
    }
    /// Forward.
    pub fn forward(&mut self, n: usize, x: &[f32], y: &mut [f32]) {
        let g = self.geom(n);
        if self.max {
            kpool::max_pool_forward(&g, x, y, &mut self.arg)
        } else {
            kpool::avg_pool_forward(&g, x, y)
        }
    }
    /// Backward.
    pub fn backward(&self, n: usize, dy: &[f32], dx: &mut [f32], add: bool) {
        let g = self.geom(n);
        if self.max {
            kpool::max_pool_backward(&g, &self.arg, dy, dx, add)
        } else {
            kpool::avg_pool_backward(&g, dy, dx, add)
        }
    }
}

/// Dropout: in training, zero each element with probability `p` and scale the rest by
/// `1 / (1 - p)`; identity in evaluation. The mask stream is derived from the model seed and
/// the step, so a resumed run draws the same masks.
#[derive(Clone, Debug)]
pub struct Dropout {
    /// Drop probability.
    pub p: f32,
    mask: Vec<f32>,
}

impl Dropout {
    /// A dropout layer.
    pub fn new(p: f32) -> Self {
        Dropout { p, mask: Vec::new() }
    }
    /// Size the mask.
    pub fn plan(&mut self, len: usize) {
        self.mask = vec![0.0; len];
    }
    /// Forward.
    pub fn forward(&mut self, x: &[f32], y: &mut [f32], train: bool, rng: &mut Rng) {
        if !train || self.p <= 0.0 {
            y.copy_from_slice(x);
            return;
        }
        let keep = 1.0 / (1.0 - self.p);
        for ((y, &x), m) in y.iter_mut().zip(x).zip(self.mask.iter_mut()) {
            *m = if rng.uniform() >= self.p { keep } else { 0.0 };
            *y = x * *m;
        }
    }
    /// Backward.
    pub fn backward(&self, dy: &[f32], dx: &mut [f32], train: bool, add: bool) {
        if !train || self.p <= 0.0 {
            ew::write_or_add(dx, dy, add);
            return;
        }
        for ((dx, &dy), &m) in dx.iter_mut().zip(dy).zip(&self.mask) {
            *dx = if add { *dx + dy * m } else { dy * m };
        }
    }
}
