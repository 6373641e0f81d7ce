//! Binarization of weights and activations (BD-Net, SPEC 1.2 and 1.4).
//!
//! **Weights** (an option of [`crate::layers::Conv2d`] and [`crate::layers::Linear`]): the
//! latent float weights `W` are what the optimizer updates; the forward pass uses
//!
//! ```text
//! Wb = alpha * sign(W),  sign(0) = +1,  alpha = mean(|W|) over the layer or per output channel
//! ```
//!
//! and the backward pass is the straight-through estimator `dL/dW = dL/dWb`, optionally zeroed
//! where `|W| > clip` and optionally scaled by `1 / alpha`.
//!
//! **Activations** ([`BinAct`]): `a = +1 if x > t_c else -1` with a trainable per-channel
//! threshold `t_c`; backward is the clipped identity `dL/dx = dL/da * [|x - t_c| <= 1]`,
//! `dL/dt_c = -sum dL/da * [|x - t_c| <= 1]`.

use crate::group::GroupLayout;
use crate::params::{ParamId, ParamStore};
use sbdnet_kernels::elementwise as ew;
use serde::{Deserialize, Serialize};

/// Precision of the binarizable layers of a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Full precision.
    #[default]
    Float,
    /// Binary weights, float activations: the multiplication-less BD-Net.
    W1,
    /// Binary weights and binary activations (XNOR + popcount at inference).
    W1A1,
    /// Sparse binary weights (Sparse BD-Net, SPEC 1.3): `w1` with whole groups of weights
    /// pruned to exact zero (see [`crate::group`]), float activations.
    SW1,
    /// Sparse binary weights and binary activations.
    SW1A1,
}

impl Precision {
    /// Binary weights?
    pub fn binary_weights(self) -> bool {
        self != Precision::Float
    }
    /// Binary activations?
    pub fn binary_acts(self) -> bool {
        matches!(self, Precision::W1A1 | Precision::SW1A1)
    }
    /// Group-sparse binary weights (`sw1`, `sw1a1`)?
    pub fn sparse(self) -> bool {
        matches!(self, Precision::SW1 | Precision::SW1A1)
    }
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Float => "float",
            Precision::W1 => "w1",
            Precision::W1A1 => "w1a1",
            Precision::SW1 => "sw1",
            Precision::SW1A1 => "sw1a1",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "float" | "fp32" => Ok(Precision::Float),
            "w1" => Ok(Precision::W1),
            "w1a1" => Ok(Precision::W1A1),
            "sw1" => Ok(Precision::SW1),
            "sw1a1" => Ok(Precision::SW1A1),
            _ => Err(format!("unknown precision '{s}': choose float, w1, w1a1, sw1 or sw1a1")),
        }
    }
}

/// How a model is quantized; stored in its configuration.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QuantConfig {
    /// Precision of the binarizable layers (every convolution but the first, by default).
    pub precision: Precision,
    /// `alpha` per output channel instead of per layer.
    pub alpha_per_channel: bool,
    /// Straight-through estimator clipping: zero `dL/dW` where `|W| > clip` (`None`: no clip).
    pub ste_clip: Option<f32>,
    /// Scale `dL/dW` by `1 / alpha` (as in the authors' group's code).
    pub grad_scale: bool,
    /// Binarize the first convolution and the classifier too.
    pub binarize_first_last: bool,
    /// With binary activations, keep the depthwise convolutions' inputs float (their weights
    /// stay binary): a binary 3x3 depthwise output sees only 9 sign bits, which costs much
    /// accuracy; Larq Compute Engine likewise runs binarized depthwise layers on float inputs.
    pub float_depthwise_input: bool,
    /// With binary activations, add a real-valued shortcut around each binary convolution of
    /// a depthwise-separable block (after its batch norm), as in Bi-Real Net: the identity
    /// where input and output shapes agree, a 2x2 average pool where a stride-2 depthwise
    /// convolution halves an even-sized input; none where the channel count changes. The
    /// float sums carry the information that a sign discards; at inference they cost one
    /// addition per element.
    #[serde(default)]
    pub real_shortcut: bool,
    /// Sparse precisions: input channels per group of a pointwise (or ordinary) convolution,
    /// `G` (a depthwise group is one whole kernel). See [`crate::group`].
    pub group_size: usize,
}

/// Default `G`.
pub const DEFAULT_GROUP_SIZE: usize = 16;

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig {
            precision: Precision::Float,
            alpha_per_channel: false,
            ste_clip: Some(1.0),
            grad_scale: false,
            binarize_first_last: false,
            float_depthwise_input: false,
            real_shortcut: false,
            group_size: DEFAULT_GROUP_SIZE,
        }
    }
}

/// Binary-weight state of one layer: the deployed weights `Wb`, their gradient buffer and
/// the scales.
#[derive(Clone, Debug)]
pub struct WeightBinarizer {
    /// Per output channel (`true`) or one scale for the layer.
    pub per_channel: bool,
    /// STE clip.
    pub clip: Option<f32>,
    /// Scale the gradient by `1 / alpha`.
    pub grad_scale: bool,
    /// Output channels (rows of the weight).
    pub rows: usize,
    /// `alpha` per row (all equal when per layer).
    pub alpha: Vec<f32>,
    /// `Wb`, same layout as the latent weights.
    pub wb: Vec<f32>,
    /// `dL/dWb`.
    pub dwb: Vec<f32>,
    /// Sparse precisions: the layer's groups and their mask (a buffer of the
    /// [`ParamStore`]); masked weights are 0 in `Wb`, get no gradient and do not count in
    /// `alpha`.
    pub groups: Option<Groups>,
    /// Sparse precisions while the lasso is on and `--lasso-fade` is set: the clipping ratio
    /// `r`; groups below the layer's `tau` are faded in `Wb` ([`crate::group::fade`]).
    pub fade: Option<f32>,
    /// The gates of the last faded forward pass, one per group (empty when not fading).
    gates: Vec<f32>,
}

/// The groups of a sparse binarized layer: their layout and the mask buffer (one `0.0` /
/// `1.0` per group, in [`ParamStore::buffers`]).
#[derive(Clone, Copy, Debug)]
pub struct Groups {
    /// How the weight is cut.
    pub layout: GroupLayout,
    /// The mask buffer.
    pub mask: ParamId,
}

impl WeightBinarizer {
    /// State for a weight of `len` values in `rows` output-channel rows.
    pub fn new(q: &QuantConfig, rows: usize, len: usize) -> Self {
        WeightBinarizer {
            per_channel: q.alpha_per_channel,
            clip: q.ste_clip,
            grad_scale: q.grad_scale,
            rows,
            alpha: vec![0.0; rows],
            wb: vec![0.0; len],
            dwb: vec![0.0; len],
            groups: None,
            fade: None,
            gates: Vec::new(),
        }
    }

    /// Compute `alpha` and `Wb` from the latent weights `w` (`buffers`: the model's buffers,
    /// where a sparse layer's group mask lives). With groups, masked weights are 0 in `Wb` and
    /// `alpha` is the mean `|W|` over the surviving weights only (of the layer or of the
    /// output channel; 0 when none survive).
    pub fn binarize(&mut self, w: &[f32], buffers: &[f32]) {
        let per_row = w.len() / self.rows;
        match self.groups {
            None if self.per_channel => {
                for (r, row) in w.chunks_exact(per_row).enumerate() {
                    self.alpha[r] = row.iter().map(|v| v.abs()).sum::<f32>() / per_row as f32;
                }
            }
            None => {
                let a = w.iter().map(|v| v.abs() as f64).sum::<f64>() / w.len().max(1) as f64;
                self.alpha.fill(a as f32);
            }
            Some(g) => {
                // Sums and counts of the surviving weights, per output channel (a group never
                // crosses a channel: its row `unit` divides the channel's `per_row`).
                let mask = &buffers[g.mask.range()];
                self.alpha.fill(0.0);
                self.dwb[..self.rows].fill(0.0); // counts, in scratch that backward overwrites
                for (range, &m) in g.layout.ranges().zip(mask) {
                    if m != 0.0 {
                        let r = range.start / per_row;
                        self.dwb[r] += range.len() as f32;
                        self.alpha[r] += w[range].iter().map(|v| v.abs()).sum::<f32>();
                    }
                }
                if self.per_channel {
                    for (a, &c) in self.alpha.iter_mut().zip(&self.dwb[..self.rows]) {
                        *a = if c > 0.0 { *a / c } else { 0.0 };
                    }
                } else {
                    let s = self.alpha.iter().map(|&a| a as f64).sum::<f64>();
                    let c = self.dwb[..self.rows].iter().map(|&c| c as f64).sum::<f64>();
                    self.alpha.fill(if c > 0.0 { (s / c) as f32 } else { 0.0 });
                }
            }
        }
        for ((row, wb), &a) in w.chunks_exact(per_row).zip(self.wb.chunks_exact_mut(per_row)).zip(&self.alpha) {
            for (b, &v) in wb.iter_mut().zip(row) {
                *b = if v >= 0.0 { a } else { -a };
            }
        }
        self.gates.clear();
        if let Some(g) = self.groups {
            let mask = &buffers[g.mask.range()];
            crate::group::apply_mask(&mut self.wb, &g.layout, mask);
            if let Some(tau) = self.fade.and_then(|r| crate::group::clip_threshold(w, &g.layout, mask, r)) {
                self.gates.resize(g.layout.groups(), 1.0);
                crate::group::fade(&mut self.wb, w, &g.layout, mask, tau, &mut self.gates);
            }
        }
    }

    /// The weights a layer computes with: `Wb` (freshly binarized from the latent `w`) when
    /// the layer has a binarizer, else `w` itself.
    pub fn forward_weights<'a>(bin: &'a mut Option<WeightBinarizer>, w: &'a [f32], buffers: &[f32]) -> &'a [f32] {
        match bin {
            Some(b) => {
                b.binarize(w, buffers);
                &b.wb
            }
            None => w,
        }
    }

    /// Straight-through estimator: add `dL/dWb` (masked and scaled) into `grad`. Weights of
    /// masked groups get nothing.
    pub fn backward(&mut self, w: &[f32], grad: &mut [f32], buffers: &[f32]) {
        if let Some(g) = self.groups {
            crate::group::apply_mask(&mut self.dwb, &g.layout, &buffers[g.mask.range()]);
        }
        let per_row = w.len() / self.rows;
        for (r, ((g, d), wr)) in
            grad.chunks_exact_mut(per_row).zip(self.dwb.chunks_exact(per_row)).zip(w.chunks_exact(per_row)).enumerate()
        {
            let scale = if self.grad_scale && self.alpha[r] > 0.0 { 1.0 / self.alpha[r] } else { 1.0 };
            for ((g, &d), &v) in g.iter_mut().zip(d).zip(wr) {
                let pass = self.clip.is_none_or(|c| v.abs() <= c);
                if pass {
                    *g += d * scale;
                }
            }
        }
        if let (Some(g), false) = (self.groups, self.gates.is_empty()) {
            crate::group::fade_backward(&self.dwb, &self.wb, w, &g.layout, &self.gates, grad);
        }
    }
}

/// Binary activation with a trainable per-channel threshold (NHWC rows of `c` channels).
#[derive(Clone, Debug)]
pub struct BinAct {
    /// Channels.
    pub c: usize,
    /// Thresholds `t_c` (trainable).
    pub threshold: ParamId,
    dt: Vec<f64>,
    scratch: Vec<f32>,
}

impl BinAct {
    /// A binary activation over `c` channels with its registered thresholds.
    pub fn new(c: usize, threshold: ParamId) -> Self {
        BinAct { c, threshold, dt: vec![0.0; c], scratch: Vec::new() }
    }

    /// Size the reduction scratch for `rows` pixels.
    pub fn plan(&mut self, rows: usize) {
        self.scratch = vec![0.0; ew::channel_sums_scratch_len(rows, self.c)];
    }

    /// Forward: `y = x > t ? 1 : -1`.
    pub fn forward(&self, x: &[f32], y: &mut [f32], p: &ParamStore) {
        ew::sign_threshold_forward(x, y, self.c, &p.data[self.threshold.range()]);
    }

    /// Backward: clipped identity for `x` (written, or added when `add`), its negative summed
    /// for `t`.
    pub fn backward(&mut self, x: &[f32], dy: &[f32], dx: &mut [f32], p: &mut ParamStore, add: bool) {
        let r = self.threshold.range();
        let rows = x.len() / self.c;
        if self.scratch.len() < ew::channel_sums_scratch_len(rows, self.c) {
            self.plan(rows);
        }
        ew::sign_threshold_backward(x, dy, dx, self.c, &p.data[r.clone()], add, &mut self.dt, &mut self.scratch);
        for (g, &d) in p.grad[r].iter_mut().zip(&self.dt) {
            *g += d as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_take_plus_minus_alpha_and_ste_clips() {
        let q = QuantConfig { precision: Precision::W1, ..Default::default() };
        let w = [0.5f32, -1.5, 0.0, -0.25, 2.0, 1.0];
        let mut b = WeightBinarizer::new(&q, 2, 6);
        b.binarize(&w, &[]);
        let a = (0.5 + 1.5 + 0.0 + 0.25 + 2.0 + 1.0) / 6.0;
        assert_eq!(b.wb, vec![a, -a, a, -a, a, a]);
        b.dwb.copy_from_slice(&[1.0; 6]);
        let mut g = [0.0; 6];
        b.backward(&w, &mut g, &[]);
        assert_eq!(g, [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]);

        let q = QuantConfig { alpha_per_channel: true, grad_scale: true, ste_clip: None, ..q };
        let mut b = WeightBinarizer::new(&q, 2, 6);
        b.binarize(&w, &[]);
        let (a0, a1) = (2.0f32 / 3.0, 3.25f32 / 3.0);
        assert_eq!(b.alpha, vec![a0, a1]);
        assert_eq!(b.wb, vec![a0, -a0, a0, -a1, a1, a1]);
        b.dwb.copy_from_slice(&[1.0; 6]);
        let mut g = [0.0; 6];
        b.backward(&w, &mut g, &[]);
        assert!((g[0] - 1.0 / a0).abs() < 1e-6 && (g[5] - 1.0 / a1).abs() < 1e-6);
    }

    #[test]
    fn binary_activation_forward_and_ste() {
        let mut p = ParamStore::default();
        let t = p.add("t".into(), vec![2], false, || 0.0);
        p.data[1] = 0.5;
        let mut act = BinAct::new(2, t);
        let x = [0.3f32, 0.3, -2.0, 2.0];
        let mut y = [0.0; 4];
        act.forward(&x, &mut y, &p);
        assert_eq!(y, [1.0, -1.0, -1.0, 1.0]);
        let mut dx = [0.0; 4];
        act.backward(&x, &[1.0, 2.0, 3.0, 4.0], &mut dx, &mut p, false);
        // |x - t| <= 1 passes: (0.3-0)=0.3 yes, (0.3-0.5) yes, (-2-0) no, (2-0.5)=1.5 no.
        assert_eq!(dx, [1.0, 2.0, 0.0, 0.0]);
        assert_eq!(p.grad, vec![-1.0, -2.0]);
    }
}
