//! Hardware-shaped weight groups for Sparse BD-Net (SPEC 1.3): the clipped group-lasso penalty
//! with weight penalty clipping (WPC), pruning of whole groups to exact zero, and the masks
//! that keep them zero.
//!
//! # Groups
//! A convolution's weight is stored OHWI, `[cout][k][k][cin/groups]`. A *group* is what one
//! computing core processes at once:
//! - pointwise (and ordinary `k x k`) convolutions: `G` consecutive input channels of one
//!   output channel at one kernel position, i.e. a contiguous slice of `G` weights (the last
//!   group of a row is shorter when `G` does not divide the row's `cin`; `G` larger than `cin`
//!   gives one group per row);
//! - depthwise convolutions: one whole `k x k` kernel (`k * k` contiguous weights).
//!
//! [`GroupLayout`] describes this: `units` rows of `unit` contiguous weights, each cut into
//! `per_unit` groups of up to `glen` weights. The 0/1 mask (one value per group, `1` = kept)
//! lives in a buffer `<layer>.group_mask` of shape `[cout, k, k, per_unit]` (pointwise
//! `[cout, 1, 1, cin/G]`, depthwise `[c, 1, 1, 1]`), f32 `0.0` / `1.0` like every checkpoint
//! tensor, in the same order as the groups.
//!
//! # The penalty (per layer)
//! With `n_g = ||W_g||_2` over the surviving groups `S` (mask 1) of a layer,
//!
//! ```text
//! tau = r * mean_{g in S} n_g                         (recomputed every step, held constant)
//! R   = sum_{g in S} sqrt(|g|) * min(n_g, tau)
//! dR/dW_g = sqrt(|g|) * W_g / n_g   if n_g < tau,   else 0
//! ```
//!
//! `tau` is recomputed from the current weights at every step but treated as a constant in the
//! gradient (a stop-gradient): if it were differentiated, every group, strong ones included,
//! would feel `r / |S| * W_g / n_g` through the mean, which is exactly what the clipping is
//! meant to prevent. `sqrt(|g|)` is the usual group-lasso size factor; within a layer of equal
//! groups it is a per-layer constant that puts layers with different group sizes (depthwise
//! 9, pointwise `G`) on the same footing. Groups with `n_g = 0` get no gradient (the
//! subgradient 0).
//!
//! ```
//! use sbdnet_nn::group::{GroupLayout, penalty};
//! // Four groups of 2 weights; norms 0.1, 1, 1, 1.9 (mean 1, tau = 0.5 at r = 0.5).
//! let l = GroupLayout::new(8, 2, 2);
//! let w = [0.1f32, 0.0, 1.0, 0.0, 0.0, 1.0, 1.9, 0.0];
//! let mut g = [0.0f32; 8];
//! let s = penalty(&w, &l, &[1.0; 4], 0.5, 1.0, &mut g);
//! assert!((s.tau - 0.5).abs() < 1e-6);
//! assert_eq!(s.active, 1);
//! // Only the weak first group is pushed to zero: sqrt(2) * w / n.
//! assert!((g[0] - 2f32.sqrt()).abs() < 1e-5);
//! assert!(g[2..].iter().all(|&v| v == 0.0));
//! ```

/// How a weight tensor is cut into groups (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupLayout {
    /// Weights in the tensor.
    pub len: usize,
    /// Contiguous weights of one row (`cin / groups` of a convolution, `k * k` for depthwise).
    pub unit: usize,
    /// Weights per group (the last group of a row may be shorter).
    pub glen: usize,
    /// Groups per row: `ceil(unit / glen)`.
    pub per_unit: usize,
}

impl GroupLayout {
    /// `len` weights in rows of `unit`, groups of at most `glen` (clamped to `1..=unit`).
    pub fn new(len: usize, unit: usize, glen: usize) -> Self {
        let unit = unit.max(1);
        let glen = glen.clamp(1, unit);
        GroupLayout { len, unit, glen, per_unit: unit.div_ceil(glen) }
    }

    /// Number of groups.
    pub fn groups(&self) -> usize {
        self.len / self.unit * self.per_unit
    }

    /// The weights of group `g`.
    pub fn range(&self, g: usize) -> std::ops::Range<usize> {
        let (u, j) = (g / self.per_unit, g % self.per_unit);
        let start = u * self.unit + j * self.glen;
        start..(start + self.glen).min((u + 1) * self.unit)
    }

    /// Every group's range, in order.
    pub fn ranges(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        (0..self.groups()).map(|g| self.range(g))
    }
}

/// What one evaluation of the penalty found in a layer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PenaltyStats {
    /// `R` of the layer (without `lambda`).
    pub value: f64,
    /// The threshold `tau` used.
    pub tau: f32,
    /// Groups below `tau` (those the penalty pushes).
    pub active: usize,
}

fn norm(w: &[f32]) -> f32 {
    w.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt() as f32
}

/// The clipped group lasso of one layer: returns `R` and adds `lambda * dR/dW` into `grad`
/// (module documentation). `mask` has one value per group; masked groups are skipped.
pub fn penalty(w: &[f32], layout: &GroupLayout, mask: &[f32], r: f32, lambda: f32, grad: &mut [f32]) -> PenaltyStats {
    let Some(tau) = clip_threshold(w, layout, mask, r) else {
        return PenaltyStats::default();
    };
    let mut s = PenaltyStats { value: 0.0, tau, active: 0 };
    for (range, &m) in layout.ranges().zip(mask) {
        if m == 0.0 {
            continue;
        }
        let size = (range.len() as f32).sqrt();
        let n = norm(&w[range.clone()]);
        s.value += (size * n.min(tau)) as f64;
        if n < tau && n > 0.0 {
            s.active += 1;
            let k = lambda * size / n;
            for (g, &v) in grad[range.clone()].iter_mut().zip(&w[range]) {
                *g += k * v;
            }
        }
    }
    s
}

/// The clipping threshold `tau = r * mean_{g in S} ||W_g||_2` over the surviving groups `S`
/// (`None` when every group is pruned).
pub fn clip_threshold(w: &[f32], layout: &GroupLayout, mask: &[f32], r: f32) -> Option<f32> {
    let (mut sum, mut count) = (0.0f64, 0usize);
    for (range, &m) in layout.ranges().zip(mask) {
        if m != 0.0 {
            sum += norm(&w[range]) as f64;
            count += 1;
        }
    }
    (count > 0).then(|| (r as f64 * sum / count as f64) as f32)
}

/// Lasso fade (`--lasso-fade`, see docs/SPARSE.md): scale the binary weights `wb` of every
/// surviving group whose latent norm `n_g` is below `tau` by `gate_g = n_g / tau`, so that a
/// group the lasso shrinks also shrinks in the forward pass instead of keeping its full
/// `+-alpha` with signs that flip at random near zero. Writes each group's gate into `gates`
/// (1 for groups at or above `tau` and for pruned groups).
pub fn fade(wb: &mut [f32], w: &[f32], layout: &GroupLayout, mask: &[f32], tau: f32, gates: &mut [f32]) {
    for ((range, &m), gate) in layout.ranges().zip(mask).zip(gates.iter_mut()) {
        let n = norm(&w[range.clone()]);
        *gate = if m != 0.0 && n < tau { n / tau } else { 1.0 };
        if *gate < 1.0 {
            wb[range].iter_mut().for_each(|v| *v *= *gate);
        }
    }
}

/// Gradient through the gates of [`fade`], holding the signs, `alpha` and `tau` fixed: with
/// `wb_g = gate_g * u_g` and `gate_g = n_g / tau`, `dL/dW_g += (dL/dwb_g . u_g) * W_g / (n_g * tau)
/// = (dL/dwb_g . wb_g) * W_g / n_g^2`, added into `grad`. Groups with a gate of 1 or 0 get
/// nothing (no dependence, or the subgradient 0 at `n_g = 0`).
pub fn fade_backward(dwb: &[f32], wb: &[f32], w: &[f32], layout: &GroupLayout, gates: &[f32], grad: &mut [f32]) {
    for (range, &gate) in layout.ranges().zip(gates) {
        if gate <= 0.0 || gate >= 1.0 {
            continue;
        }
        let n2 = w[range.clone()].iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
        let s = dwb[range.clone()].iter().zip(&wb[range.clone()]).map(|(&d, &b)| d as f64 * b as f64).sum::<f64>();
        let k = (s / n2) as f32;
        for (g, &v) in grad[range.clone()].iter_mut().zip(&w[range]) {
            *g += k * v;
        }
    }
}

/// Rank the surviving groups by `||W_g||_2 / sqrt(|g|)` (the root mean square, so that
/// shorter groups compare fairly) and set the mask of the weakest to 0 until `target` groups
/// of the layer are zero (`target` counts groups already pruned; groups never come back).
/// Returns the groups pruned now. Ties: lower index first.
pub fn prune_to(w: &[f32], layout: &GroupLayout, mask: &mut [f32], target: usize) -> Vec<usize> {
    let zero = mask.iter().filter(|&&m| m == 0.0).count();
    if target <= zero {
        return Vec::new();
    }
    let mut alive: Vec<(f32, usize)> = layout
        .ranges()
        .enumerate()
        .filter(|&(g, _)| mask[g] != 0.0)
        .map(|(g, r)| {
            let len = r.len() as f32;
            (norm(&w[r]) / len.sqrt(), g)
        })
        .collect();
    alive.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let pruned: Vec<usize> = alive.iter().take(target - zero).map(|&(_, g)| g).collect();
    for &g in &pruned {
        mask[g] = 0.0;
    }
    pruned
}

/// Prune every surviving group whose root mean square `||W_g||_2 / sqrt(|g|)` is below `eps`
/// (the threshold rule). Returns the groups pruned now.
pub fn prune_below(w: &[f32], layout: &GroupLayout, mask: &mut [f32], eps: f32) -> Vec<usize> {
    let mut pruned = Vec::new();
    for (g, r) in layout.ranges().enumerate() {
        if mask[g] != 0.0 && norm(&w[r.clone()]) / (r.len() as f32).sqrt() < eps {
            mask[g] = 0.0;
            pruned.push(g);
        }
    }
    pruned
}

/// Zero `v` (weights, gradients, optimizer state) on every masked group.
pub fn apply_mask(v: &mut [f32], layout: &GroupLayout, mask: &[f32]) {
    for (range, &m) in layout.ranges().zip(mask) {
        if m == 0.0 {
            v[range].fill(0.0);
        }
    }
}

/// Gradual pruning schedule (cubic, Zhu and Gupta 2017): the fraction of zero groups at step
/// `t` of a window `[t0, t1]` rising from 0 to `target`:
/// `target * (1 - (1 - (t - t0) / (t1 - t0))^3)`, 0 before `t0`, `target` from `t1` on.
pub fn cubic_sparsity(target: f64, t: usize, t0: usize, t1: usize) -> f64 {
    if t < t0 {
        return 0.0;
    }
    if t >= t1 {
        return target;
    }
    let x = (t - t0) as f64 / (t1 - t0) as f64;
    target * (1.0 - (1.0 - x).powi(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_cover_every_weight_once() {
        // Pointwise 3 outputs x 40 inputs, G = 16: rows of 40 cut into 16, 16, 8.
        let l = GroupLayout::new(120, 40, 16);
        assert_eq!((l.groups(), l.per_unit), (9, 3));
        assert_eq!(l.range(2), 32..40);
        assert_eq!(l.range(3), 40..56);
        let mut seen = vec![0; 120];
        for r in l.ranges() {
            for i in r {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&s| s == 1));
        // G larger than the row: one group per row.
        let l = GroupLayout::new(64, 32, 64);
        assert_eq!((l.groups(), l.glen), (2, 32));
    }

    #[test]
    fn prune_keeps_the_strongest_and_never_regrows() {
        let l = GroupLayout::new(8, 8, 2);
        let w = [3.0f32, 3.0, 0.1, 0.1, 2.0, 2.0, 0.5, 0.5];
        let mut m = [1.0f32; 4];
        assert_eq!(prune_to(&w, &l, &mut m, 1), vec![1]);
        assert_eq!(prune_to(&w, &l, &mut m, 2), vec![3]);
        assert_eq!(m, [1.0, 0.0, 1.0, 0.0]);
        assert!(prune_to(&w, &l, &mut m, 1).is_empty());
        assert_eq!(prune_below(&w, &l, &mut m, 2.5), vec![2]);
        let mut v = w;
        apply_mask(&mut v, &l, &m);
        assert_eq!(v, [3.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn fade_scales_weak_groups_and_its_gradient_matches_finite_differences() {
        // Three groups of 3 (the last pruned); tau = 1.5 puts group 0 (n = sqrt(0.26)) below it.
        let l = GroupLayout::new(9, 9, 3);
        let mask = [1.0f32, 1.0, 0.0];
        let w = [0.3f32, -0.4, 0.1, 1.0, 2.0, -2.0, 0.0, 0.0, 0.0];
        let u = [0.5f32, -0.5, 0.5, 0.5, 0.5, -0.5, 0.0, 0.0, 0.0]; // alpha * sign, masked
        let tau = 1.5;
        let (mut wb, mut gates) = (u, [0.0f32; 3]);
        fade(&mut wb, &w, &l, &mask, tau, &mut gates);
        let g0 = 0.26f32.sqrt() / 1.5;
        assert!((gates[0] - g0).abs() < 1e-6 && gates[1..] == [1.0, 1.0]);
        assert_eq!(&wb[3..], &u[3..]);
        for i in 0..3 {
            assert!((wb[i] - u[i] * g0).abs() < 1e-6);
        }
        // L = sum c_i wb_i(W) with signs, alpha and tau fixed.
        let c = [0.7f32, -1.3, 0.4, 2.0, -0.5, 1.0, 3.0, 3.0, 3.0];
        let loss = |w: &[f32]| -> f64 {
            let (mut b, mut g) = (u, [0.0f32; 3]);
            fade(&mut b, w, &l, &mask, tau, &mut g);
            b.iter().zip(&c).map(|(&b, &c)| b as f64 * c as f64).sum()
        };
        let mut grad = [0.0f32; 9];
        fade_backward(&c, &wb, &w, &l, &gates, &mut grad);
        for i in 0..9 {
            let h = 1e-3f32;
            let (mut p, mut m) = (w, w);
            p[i] += h;
            m[i] -= h;
            let fd = (loss(&p) - loss(&m)) / (2.0 * h as f64);
            assert!((fd - grad[i] as f64).abs() < 1e-3, "weight {i}: fd {fd} vs {}", grad[i]);
        }
        assert!(grad[..3].iter().all(|&g| g != 0.0) && grad[3..].iter().all(|&g| g == 0.0));
        let tau = clip_threshold(&w, &l, &mask, 0.6).unwrap();
        assert!((tau - 0.6 * (0.26f32.sqrt() + 3.0) / 2.0).abs() < 1e-6);
        assert_eq!(clip_threshold(&w, &l, &[0.0; 3], 0.6), None);
    }

    #[test]
    fn cubic_schedule_ends_at_the_target() {
        assert_eq!(cubic_sparsity(0.7, 5, 10, 110), 0.0);
        assert!((cubic_sparsity(0.7, 60, 10, 110) - 0.7 * 0.875).abs() < 1e-12);
        assert_eq!(cubic_sparsity(0.7, 110, 10, 110), 0.7);
    }
}
